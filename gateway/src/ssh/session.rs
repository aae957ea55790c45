//! A session channel: shell, exec or sftp on an instance, recorded, within its limits; or,
//! on a connection to the gateway itself, a gateway command.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use postern_core::profile::{Profile, interactive_script, render_command, wrap_command};
use postern_core::util::glob_match;
use postern_core::{Action, Identity};
use postern_proto::{ExecCommand, ExecRequest, SessionRequest, ShellRequest};
use postern_tunnel::server::OpenError;
use russh::server::Msg;
use russh::{Channel, ChannelMsg};
use tracing::{info, warn};

use super::channel::{clamp16, refuse, refuse_session};
use super::relay::{Relayed, Terms, relay};
use crate::audit::events::{
    Event, GatewayDiskLow, SessionAuthorized, SessionDenied, SessionEnd, SessionStart, SshDenied, SshSessionEnd,
    SshSessionStart,
};
use crate::recording::Recorder;
use crate::services::Services;

/// Runs the first sftp-server found on the instance.
const SFTP_SERVER: &str = "for p in /usr/lib/openssh/sftp-server /usr/libexec/openssh/sftp-server \
    /usr/libexec/sftp-server /usr/lib/ssh/sftp-server; do [ -x \"$p\" ] && exec \"$p\"; done; \
    echo 'postern: no sftp-server on this instance' >&2; exit 127";

/// Phase 3: what the agent is asked to run: the profile's one command, or the user's request
/// shaped by the profile (working directory, startup commands, shell, environment). `Err`
/// is the refusal to show the user.
fn plan(
    request: &Request,
    pty: Option<&Pty>,
    mut env: Vec<(String, String)>,
    profile: &Profile,
    run_as: Option<&str>,
    allow_root: bool,
) -> Result<SessionRequest, String> {
    let run_as = run_as.map(str::to_owned);
    env.extend(profile.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let command = if profile.command.is_some() {
        let args = match request {
            Request::Exec(c) => c.clone(),
            Request::Shell => String::new(),
            Request::Subsystem(_) => return Err(format!("profile {} only runs its command", profile.name)),
        };
        Some(render_command(profile, &args).map_err(|e| format!("profile {}: {e}", profile.name))?)
    } else {
        match request {
            Request::Shell => interactive_script(profile),
            Request::Exec(c) => Some(wrap_command(profile, c)),
            Request::Subsystem(_) => Some(SFTP_SERVER.to_owned()),
        }
    };
    let exec =
        |command: String, env, run_as| ExecRequest { command: ExecCommand::Shell(command), env, run_as, allow_root };
    Ok(match (command, pty) {
        (Some(c), _) if matches!(request, Request::Subsystem(_)) => SessionRequest::Exec(exec(c, env, run_as)),
        (command, Some(p)) => SessionRequest::Shell(ShellRequest {
            term: p.term.clone(),
            cols: p.cols,
            rows: p.rows,
            env,
            run_as,
            command,
            allow_root,
        }),
        (Some(c), None) => SessionRequest::Exec(exec(c, env, run_as)),
        (None, None) => SessionRequest::Exec(exec("exec \"$SHELL\" -l".into(), env, run_as)),
    })
}

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

enum Request {
    Shell,
    Exec(String),
    Subsystem(String),
}

struct Pty {
    term: String,
    cols: u16,
    rows: u16,
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
    let (cols, rows) = pty.as_ref().map(|p| (p.cols, p.rows)).unwrap_or((80, 24));
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
    // Phase 4: the recording and the audit trail must be writable before anything runs
    // (fail closed).
    let recording_dir = ctx.state.config.data_dir.join("recordings");
    let fail_closed = ctx.state.config.audit.fail_closed;
    // The free-space guard: a logged session does not start on a nearly full disk.
    let low_space = if action == Action::Sftp { None } else { ctx.state.space.check(&recording_dir).err() };
    if let Some(low) = &low_space {
        warn!(dir = %recording_dir.display(), free = low.free, needed = low.needed, "low disk space for recordings");
        if low.first {
            let _ = ctx.state.audit.event(&Event::GatewayDiskLow(GatewayDiskLow {
                path: recording_dir.display().to_string(),
                free_bytes: low.free,
                min_free_bytes: low.needed,
                fail_closed,
            }));
        }
        if fail_closed {
            let _ = ctx.state.audit.event(&Event::SessionDenied(SessionDenied::Ssh(SshDenied {
                user: authz.user().to_owned(),
                target: authz.instance().to_owned(),
                action,
                source: ctx.peer.to_string(),
                reason: format!("{} (fail_closed)", low.reason()),
                destination: None,
            })));
            let message = format!(
                "the session recording cannot be written on the gateway: {}, and sessions are not run unrecorded here; tell your administrator",
                low.reason()
            );
            refuse_session(&ctx.handle, &wr, &message, 1).await;
            return;
        }
    }
    let mut recorder = if action == Action::Sftp || low_space.is_some() {
        None
    } else {
        let title = format!("{}@{}: {}", authz.user(), authz.instance(), command_text.as_deref().unwrap_or("shell"));
        let created = postern_core::util::random_hex(8).map_err(std::io::Error::other).and_then(|r| {
            let exec = if matches!(request, Request::Exec(_)) { command_text.as_deref() } else { None };
            Recorder::create(&recording_dir, &format!("pending-{r}"), (cols, rows), &title, exec, &ctx.state.recording)
        });
        match created {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(error = %e, dir = %recording_dir.display(), "cannot create recording");
                None
            }
        }
    };
    let authorized = ctx.state.audit.event(&Event::SessionAuthorized(SessionAuthorized {
        user: authz.user().to_owned(),
        target: authz.instance().to_owned(),
        agent_id: authz.agent_id().to_owned(),
        kind: action,
        source: ctx.peer.to_string(),
        recording_ok: recorder.is_some() || action == Action::Sftp,
    }));
    if fail_closed && (authorized.is_err() || (recorder.is_none() && action != Action::Sftp)) {
        let what = if authorized.is_err() { "the audit log" } else { "the session recording" };
        let _ = ctx.state.audit.event(&Event::SessionDenied(SessionDenied::Ssh(SshDenied {
            user: authz.user().to_owned(),
            target: authz.instance().to_owned(),
            action,
            source: ctx.peer.to_string(),
            reason: format!("{what} cannot be written (fail_closed)"),
            destination: None,
        })));
        refuse_session(
            &ctx.handle,
            &wr,
            &format!("{what} cannot be written on the gateway, and sessions are not run unrecorded here; tell your administrator"),
            1,
        )
        .await;
        if let Some(r) = recorder {
            let _ = std::fs::remove_file(r.path());
        }
        return;
    }
    // Phase 5: open the agent's stream and start the session (start event, live table).
    let stream = match ctx.state.broker.open(&authz, agent_request).await {
        Ok(s) => s,
        Err(e) => {
            let msg = match e {
                OpenError::Offline => format!("instance {} is offline (its agent is not connected)", authz.instance()),
                OpenError::Rejected { reason, .. } => {
                    format!("instance {} refused the session: {reason}", authz.instance())
                }
                other => format!("instance {}: {other}", authz.instance()),
            };
            refuse_session(&ctx.handle, &wr, &msg, 255).await;
            if let Some(r) = recorder {
                let _ = std::fs::remove_file(r.path());
            }
            return;
        }
    };
    let sid = stream.id.to_string();
    if let Some(r) = recorder.as_mut()
        && let Err(e) = r.rename_to(&sid)
    {
        warn!(error = %e, "cannot name the recording after its session");
    }
    let (logged, reason) = match (&recorder, action, &low_space) {
        (Some(_), _, _) => (true, None),
        (None, Action::Sftp, _) => (false, Some("sftp file transfer content is not recorded".to_owned())),
        (None, _, Some(low)) => (false, Some(low.reason())),
        (None, _, None) => (false, Some("recording could not be created".to_owned())),
    };
    let running = ctx.state.broker.start(
        &sid,
        authz.party(ctx.identity.source, logged),
        &Event::SessionStart(SessionStart::Ssh(SshSessionStart {
            session_id: sid.clone(),
            user: authz.user().to_owned(),
            target: authz.instance().to_owned(),
            agent_id: authz.agent_id().to_owned(),
            kind: action,
            command: command_text.clone(),
            pty: pty.is_some(),
            source: ctx.peer.to_string(),
            profile: if profile.name.is_empty() { None } else { Some(profile.name.clone()) },
            run_as: authz.run_as().map(str::to_owned),
            logged,
            reason: reason.clone(),
            run_id: run_id.filter(|r| ctx.state.runs.owned_by(r, &ctx.identity.user)),
            recording: recorder.as_ref().map(|r| r.path().display().to_string()),
            via_gateway: stream.via.clone(),
            cert_serial: authz.cert_serial().map(|s| format!("{s:016x}")),
        })),
    );
    info!(session_id = %sid, user = %authz.user(), target = %authz.instance(), kind = action.name(), "ssh session started");
    let live = running.live().clone();
    let started = running.started();

    // Phase 6: relay until it ends; phase 7: the end event, off the live table.
    let limits = authz.limits();
    let terms = Terms { live: &live, limits, started, on_pty: pty.is_some(), fail_closed };
    let Relayed { exit_code, bytes_in, bytes_out, end_reason, recording_lost } =
        relay(&mut rd, &wr, stream, &mut recorder, terms).await;
    let _ = wr.eof().await;
    let _ = wr.close().await;
    running.finish(|duration_ms| {
        Event::SessionEnd(SessionEnd::Ssh(SshSessionEnd {
            session_id: sid.clone(),
            user: authz.user().to_owned(),
            target: authz.instance().to_owned(),
            kind: action,
            exit_code,
            bytes_in,
            bytes_out,
            end_reason: end_reason.map(str::to_owned),
            terminated_because: live.reason(),
            duration_ms,
            logged: logged && recording_lost.is_none(),
            reason: recording_lost.clone().or(reason.clone()),
        }))
    });
    if let (Some(shipper), Some(rec)) = (&ctx.state.shipper, recorder.as_ref()) {
        shipper.recording_finished(rec.path());
    }
    info!(session_id = %sid, ?exit_code, "ssh session ended");
}
