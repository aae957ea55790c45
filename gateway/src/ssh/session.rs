//! A session channel: shell, exec or sftp on an instance, recorded, within its limits; or,
//! on a connection to the gateway itself, a gateway command.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use postern_core::util::glob_match;
use postern_core::{Action, Identity};
use russh::server::Msg;
use russh::{Channel, ChannelMsg};

use super::channel::{clamp16, refuse, refuse_session};
use crate::audit::events::{Event, SessionDenied, SshDenied};
use crate::launch::{Launch, Pty, Request, plan};
use crate::services::Services;
use crate::session_relay::{Terms, relay};

/// What a session channel's task knows of its connection.
pub(super) struct SessionCtx {
    pub state: Arc<Services>,
    pub identity: Identity,
    /// The instance the connection names; `None` on a connection to the gateway itself.
    pub target: Option<String>,
    /// The OS login asked for (the inner hop's user name), decided by the policy's logins.
    pub login: Option<String>,
    pub peer: SocketAddr,
    /// The connection's handle (for what a channel half cannot send: the refusal marker).
    pub handle: russh::server::Handle,
}

/// What the client asked for before it said what to run.
struct Asked {
    request: Request,
    pty: Option<Pty>,
    /// Variables the client set that `[ssh] accept_env` lets through.
    env: Vec<(String, String)>,
    /// `POSTERN_PROFILE`.
    profile: Option<String>,
    /// `POSTERN_RUN_ID`: the `postern run` this invocation belongs to (if the user's own).
    run_id: Option<String>,
}

/// Phase 1: collect pty and env requests until the client says what to run (at most 60 s
/// between requests); `None` when the client goes away first.
async fn read_request(rd: &mut russh::ChannelReadHalf, accept_env: &[String]) -> Option<Asked> {
    let mut pty: Option<Pty> = None;
    let mut env: Vec<(String, String)> = Vec::new();
    let mut profile: Option<String> = None;
    let mut run_id: Option<String> = None;
    let request = loop {
        match tokio::time::timeout(Duration::from_secs(60), rd.wait()).await {
            Ok(Some(ChannelMsg::RequestPty { term, col_width, row_height, .. })) => {
                pty = Some(Pty { term, cols: clamp16(col_width), rows: clamp16(row_height) })
            }
            Ok(Some(ChannelMsg::SetEnv { variable_name, variable_value, .. }))
                if variable_name == "POSTERN_PROFILE" =>
            {
                profile = Some(variable_value.chars().take(64).collect());
            }
            // `postern run` tags each invocation with its run (only the user's own runs count).
            Ok(Some(ChannelMsg::SetEnv { variable_name, variable_value, .. })) if variable_name == "POSTERN_RUN_ID" => {
                run_id = Some(variable_value.chars().take(64).collect());
            }
            Ok(Some(ChannelMsg::SetEnv { variable_name, variable_value, .. })) => {
                if accept_env.iter().any(|p| glob_match(p, &variable_name)) && env.len() < 64 {
                    env.push((variable_name, variable_value));
                }
            }
            Ok(Some(ChannelMsg::RequestShell { .. })) => break Request::Shell,
            Ok(Some(ChannelMsg::Exec { command, .. })) => {
                break Request::Exec(String::from_utf8_lossy(&command).into_owned());
            }
            Ok(Some(ChannelMsg::RequestSubsystem { name, .. })) => break Request::Subsystem(name),
            Ok(Some(ChannelMsg::Eof | ChannelMsg::Close)) | Ok(None) | Err(_) => return None,
            Ok(Some(_)) => {}
        }
    };
    Some(Asked { request, pty, env, profile, run_id })
}

pub(super) async fn serve_session_channel(ctx: SessionCtx, channel: Channel<Msg>) {
    let (mut rd, wr) = channel.split();
    let Some(Asked { request, pty, env, profile: requested_profile, run_id }) =
        read_request(&mut rd, &ctx.state.config.ssh.accept_env).await
    else {
        return;
    };
    // On a connection to the gateway itself: a gateway command, or help.
    let Some(target) = ctx.target.clone() else {
        if let Request::Exec(command) = &request {
            super::commands::answer(&ctx.state, &ctx.identity, &ctx.peer.ip().to_string(), &wr, command).await;
            return;
        }
        let help = format!(
            "this is the Postern gateway; name an instance: ssh -p PORT {user}%INSTANCE@HOST, \
             or use the config from `postern ssh-config` and ssh {user}@INSTANCE.{suffix}; \
             gateway commands: whoami, ls, rdp-token INSTANCE (or use the postern client)",
            user = ctx.identity.user,
            suffix = ctx.state.config.ssh.suffix
        );
        refuse(&wr, &help, 2).await;
        return;
    };
    let action = match &request {
        Request::Shell => Action::Shell,
        Request::Exec(_) => Action::Exec,
        Request::Subsystem(s) if s == "sftp" => Action::Sftp,
        Request::Subsystem(other) => {
            refuse_session(&ctx.handle, &wr, &format!("unsupported subsystem {other:?}"), 1).await;
            return;
        }
    };
    // Phase 2: authorize (the only way to an Authorization, which names the agent to dial).
    let authz = match ctx
        .state
        .authorizer
        .authorize(&ctx.identity, &target, action, requested_profile.as_deref(), ctx.login.as_deref(), None)
        .await
    {
        Ok(a) => a,
        Err(msg) => {
            let _ = ctx.state.audit.event(&Event::SessionDenied(SessionDenied::Ssh(SshDenied {
                user: ctx.identity.user.clone(),
                target: target.clone(),
                action,
                source: ctx.peer.to_string(),
                reason: msg.to_string(),
                destination: None,
                door: None,
            })));
            // A near miss among the instances this user may reach (never others).
            let hint = match msg.as_ref() {
                postern_core::DENIED => super::commands::near_miss(&ctx.state, &ctx.identity, &target).await,
                _ => None,
            };
            let message = match hint {
                Some(name) => format!("{msg}; did you mean {name}?"),
                None => msg.into_owned(),
            };
            refuse_session(&ctx.handle, &wr, &message, 1).await;
            return;
        }
    };
    let profile = authz.profile().clone();
    let command_text = match &request {
        Request::Shell => None,
        Request::Exec(c) => Some(c.clone()),
        Request::Subsystem(_) => Some("sftp".to_owned()),
    };
    let agent_request = match plan(&request, pty.as_ref(), env, &profile, authz.run_as(), authz.allow_root()) {
        Ok(r) => r,
        Err(message) => {
            refuse_session(&ctx.handle, &wr, &message, 1).await;
            return;
        }
    };
    // Phases 4 and 5 (shared with the other doors): the recording and the audit trail must
    // be writable before anything runs (fail closed); open the agent's stream; start.
    let run_id = run_id.filter(|r| ctx.state.runs.owned_by(r, &ctx.identity.user));
    let launch = Launch {
        authz: &authz,
        action,
        agent_request,
        exec: matches!(request, Request::Exec(_)),
        command: command_text,
        pty: pty.as_ref().map(|p| (p.cols, p.rows)),
        peer: ctx.peer,
        door: None,
        run_id,
    };
    let (mut launched, stream) = match crate::launch::launch(&ctx.state, launch).await {
        Ok(l) => l,
        Err(refused) => {
            refuse_session(&ctx.handle, &wr, &refused.message, refused.code).await;
            return;
        }
    };
    // Phase 6: relay until it ends; phase 7: the end event, off the live table.
    let live = launched.running.live().clone();
    let terms = Terms {
        live: &live,
        limits: authz.limits(),
        started: launched.running.started(),
        on_pty: pty.is_some(),
        fail_closed: ctx.state.config.audit.fail_closed,
    };
    let relayed = relay(&mut rd, &wr, stream, &mut launched.recorder, terms).await;
    let _ = wr.eof().await;
    let _ = wr.close().await;
    launched.finish(&ctx.state, &relayed);
}
