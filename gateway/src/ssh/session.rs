//! A session channel: shell, exec or sftp on an instance, recorded, within its limits; or,
//! on a connection to the gateway itself, a gateway command.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use postern_core::util::glob_match;
use postern_core::{Action, Identity};
use postern_proto::{ExecCommand, ExecRequest, Message, Resize, SessionRequest, ShellRequest, Signal, write_frame};
use postern_tunnel::server::{OpenError, SessionStream};
use russh::server::Msg;
use russh::{Channel, ChannelMsg};
use tracing::{info, warn};

use super::channel::{clamp16, human, notice, refuse, sig_name, warn_lead};
use crate::audit::events::{
    Event, SessionAuthorized, SessionDenied, SessionEnd, SessionStart, SshDenied, SshSessionEnd, SshSessionStart,
};
use crate::recording::Recorder;
use crate::services::Services;

/// Runs the first sftp-server found on the instance.
const SFTP_SERVER: &str = "for p in /usr/lib/openssh/sftp-server /usr/libexec/openssh/sftp-server \
    /usr/libexec/sftp-server /usr/lib/ssh/sftp-server; do [ -x \"$p\" ] && exec \"$p\"; done; \
    echo 'postern: no sftp-server on this instance' >&2; exit 127";

/// What a session channel's task knows of its connection.
pub(super) struct SessionCtx {
    pub state: Arc<Services>,
    pub identity: Identity,
    /// The instance the connection names; `None` on a connection to the gateway itself.
    pub target: Option<String>,
    pub peer: SocketAddr,
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

pub(super) async fn serve_session_channel(ctx: SessionCtx, channel: Channel<Msg>) {
    let (mut rd, wr) = channel.split();
    let mut pty: Option<Pty> = None;
    let mut env: Vec<(String, String)> = Vec::new();
    let mut requested_profile: Option<String> = None;
    let mut run_id: Option<String> = None;
    // Phase 1: collect pty/env until the client says what to run.
    let request = loop {
        match tokio::time::timeout(Duration::from_secs(60), rd.wait()).await {
            Ok(Some(ChannelMsg::RequestPty { term, col_width, row_height, .. })) => {
                pty = Some(Pty { term, cols: clamp16(col_width), rows: clamp16(row_height) })
            }
            Ok(Some(ChannelMsg::SetEnv { variable_name, variable_value, .. }))
                if variable_name == "POSTERN_PROFILE" =>
            {
                requested_profile = Some(variable_value.chars().take(64).collect());
            }
            // `postern run` tags each invocation with its run (only the user's own runs count).
            Ok(Some(ChannelMsg::SetEnv { variable_name, variable_value, .. })) if variable_name == "POSTERN_RUN_ID" => {
                run_id = Some(variable_value.chars().take(64).collect());
            }
            Ok(Some(ChannelMsg::SetEnv { variable_name, variable_value, .. })) => {
                if ctx.state.config.ssh.accept_env.iter().any(|p| glob_match(p, &variable_name)) && env.len() < 64 {
                    env.push((variable_name, variable_value));
                }
            }
            Ok(Some(ChannelMsg::RequestShell { .. })) => break Request::Shell,
            Ok(Some(ChannelMsg::Exec { command, .. })) => {
                break Request::Exec(String::from_utf8_lossy(&command).into_owned());
            }
            Ok(Some(ChannelMsg::RequestSubsystem { name, .. })) => break Request::Subsystem(name),
            Ok(Some(ChannelMsg::Eof | ChannelMsg::Close)) | Ok(None) | Err(_) => return,
            Ok(Some(_)) => {}
        }
    };
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
            refuse(&wr, &format!("unsupported subsystem {other:?}"), 1).await;
            return;
        }
    };
    let authz = match ctx
        .state
        .authorizer
        .authorize(&ctx.identity, &target, action, requested_profile.as_deref(), None)
        .await
    {
        Ok(a) => a,
        Err(msg) => {
            let _ = ctx.state.audit.event(&Event::SessionDenied(SessionDenied::Ssh(SshDenied {
                user: ctx.identity.user.clone(),
                target: target.clone(),
                action,
                source: ctx.peer.to_string(),
                reason: msg.to_owned(),
            })));
            refuse(&wr, msg, 1).await;
            return;
        }
    };
    let run_as = authz.run_as().map(str::to_owned);
    let (cols, rows) = pty.as_ref().map(|p| (p.cols, p.rows)).unwrap_or((80, 24));
    let command_text = match &request {
        Request::Shell => None,
        Request::Exec(c) => Some(c.clone()),
        Request::Subsystem(_) => Some("sftp".to_owned()),
    };
    let profile = authz.profile().clone();
    env.extend(profile.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    // What runs on the instance: the profile's one command, or the user's request shaped
    // by the profile (working directory, startup commands, shell).
    let command = if profile.command.is_some() {
        let args = match &request {
            Request::Exec(c) => c.clone(),
            Request::Shell => String::new(),
            Request::Subsystem(_) => {
                refuse(&wr, &format!("profile {} only runs its command", profile.name), 1).await;
                return;
            }
        };
        match postern_core::profile::render_command(&profile, &args) {
            Ok(c) => Some(c),
            Err(e) => {
                refuse(&wr, &format!("profile {}: {e}", profile.name), 1).await;
                return;
            }
        }
    } else {
        match &request {
            Request::Shell => postern_core::profile::interactive_script(&profile),
            Request::Exec(c) => Some(postern_core::profile::wrap_command(&profile, c)),
            Request::Subsystem(_) => Some(SFTP_SERVER.to_owned()),
        }
    };
    let agent_request = match (&command, &pty) {
        (Some(c), _) if matches!(request, Request::Subsystem(_)) => {
            SessionRequest::Exec(ExecRequest { command: ExecCommand::Shell(c.clone()), env, run_as })
        }
        (command, Some(p)) => SessionRequest::Shell(ShellRequest {
            term: p.term.clone(),
            cols: p.cols,
            rows: p.rows,
            env,
            run_as,
            command: command.clone(),
        }),
        (Some(c), None) => SessionRequest::Exec(ExecRequest { command: ExecCommand::Shell(c.clone()), env, run_as }),
        (None, None) => {
            SessionRequest::Exec(ExecRequest { command: ExecCommand::Shell("exec \"$SHELL\" -l".into()), env, run_as })
        }
    };
    // Recording and audit trail must be writable before anything runs (fail closed).
    let recording_dir = ctx.state.config.data_dir.join("recordings");
    let fail_closed = ctx.state.config.audit.fail_closed;
    let mut recorder = if action == Action::Sftp {
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
        })));
        refuse(
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
            refuse(&wr, &msg, 255).await;
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
    let (logged, reason) = match (&recorder, action) {
        (Some(_), _) => (true, None),
        (None, Action::Sftp) => (false, Some("sftp file transfer content is not recorded")),
        (None, _) => (false, Some("recording could not be created")),
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
            reason: reason.map(str::to_owned),
            run_id: run_id.filter(|r| ctx.state.runs.owned_by(r, &ctx.identity.user)),
            recording: recorder.as_ref().map(|r| r.path().display().to_string()),
        })),
    );
    info!(session_id = %sid, user = %authz.user(), target = %authz.instance(), kind = action.name(), "ssh session started");
    let live = running.live().clone();
    let started = running.started();

    let SessionStream { mut send, recv, .. } = stream;
    let mut frames = crate::frames::FrameReader::spawn(recv);
    let mut bytes_out: u64 = 0;
    let mut bytes_in: u64 = 0;
    let limits = authz.limits();
    let mut last_input = std::time::Instant::now();
    let (mut warned_idle, mut warned_max) = (false, false);
    let mut end_reason: Option<&'static str> = None;
    let mut recording_lost: Option<String> = None;
    let mut flush_tick = tokio::time::interval(crate::recording::FLUSH_EVERY);
    flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let on_pty = pty.is_some();
    let exit_code: Option<i32> = loop {
        tokio::select! {
            msg = rd.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    if let Some(rec) = recorder.as_mut() { let _ = rec.input(&data).await; }
                    bytes_in += data.len() as u64;
                    live.add_in(data.len());
                    last_input = std::time::Instant::now();
                    warned_idle = false;
                    for chunk in data.chunks(postern_proto::MAX_DATA_CHUNK) {
                        if write_frame(&mut send, &Message::Stdin(chunk.to_vec())).await.is_err() {
                            break;
                        }
                    }
                }
                Some(ChannelMsg::Eof) => { let _ = write_frame(&mut send, &Message::Eof).await; }
                Some(ChannelMsg::WindowChange { col_width, row_height, .. }) => {
                    let (c, r) = (clamp16(col_width), clamp16(row_height));
                    let _ = write_frame(&mut send, &Message::Resize(Resize { cols: c, rows: r })).await;
                    if let Some(rec) = recorder.as_mut() { let _ = rec.resize(c, r).await; }
                }
                Some(ChannelMsg::Signal { signal }) => {
                    let _ = write_frame(&mut send, &Message::Signal(Signal { name: sig_name(&signal) })).await;
                }
                Some(ChannelMsg::Close) | None => {
                    // The client went away: stop the remote process.
                    let _ = send.reset(0u32.into());
                    break None;
                }
                Some(_) => {}
            },
            _ = flush_tick.tick(), if recorder.is_some() => {
                if let Some(rec) = recorder.as_mut() { let _ = rec.flush_if_due().await; }
            }
            _ = live.terminated() => {
                let why = live.reason().unwrap_or_else(|| "ended by the gateway".into());
                notice(&wr, on_pty, &format!("session ended: {why}")).await;
                let _ = send.reset(0u32.into());
                let _ = wr.exit_status(255).await;
                end_reason = Some("terminated");
                break Some(255);
            }
            _ = tick.tick(), if limits.idle_timeout.is_some() || limits.max_session.is_some() => {
                let now = std::time::Instant::now();
                let mut close: Option<(&'static str, String)> = None;
                if let Some(max) = limits.max_session {
                    let end = started + max;
                    if now >= end {
                        close = Some(("max-duration", format!("maximum session length of {} reached; closing the session", human(max))));
                    } else if !warned_max && now + warn_lead(max) >= end {
                        warned_max = true;
                        notice(&wr, on_pty, &format!("this session reaches its maximum length of {} in {}s and will be closed", human(max), (end - now).as_secs().max(1))).await;
                    }
                }
                if let (None, Some(idle)) = (&close, limits.idle_timeout) {
                    let end = last_input + idle;
                    if now >= end {
                        close = Some(("idle-timeout", format!("no input for {}; closing the session", human(idle))));
                    } else if !warned_idle && now + warn_lead(idle) >= end {
                        warned_idle = true;
                        notice(&wr, on_pty, &format!("no input for a while: this session closes in {}s unless you type something", (end - now).as_secs().max(1))).await;
                    }
                }
                if let Some((reason, message)) = close {
                    notice(&wr, on_pty, &message).await;
                    let _ = send.reset(0u32.into());
                    let _ = wr.exit_status(255).await;
                    end_reason = Some(reason);
                    break Some(255);
                }
            }
            frame = frames.next() => match frame {
                Ok(Some(Message::Stdout(d))) => {
                    bytes_out += d.len() as u64;
                    live.add_out(d.len());
                    if let Some(rec) = recorder.as_mut() { let _ = rec.output(&d).await; }
                    if wr.data_bytes(d).await.is_err() { let _ = send.reset(0u32.into()); break None; }
                }
                Ok(Some(Message::Stderr(d))) => {
                    bytes_out += d.len() as u64;
                    live.add_out(d.len());
                    if let Some(rec) = recorder.as_mut() { let _ = rec.output(&d).await; }
                    if wr.extended_data_bytes(1, d).await.is_err() { let _ = send.reset(0u32.into()); break None; }
                }
                Ok(Some(Message::Exit(e))) => {
                    let _ = wr.exit_status(u32::try_from(e.code).unwrap_or(255)).await;
                    break Some(e.code);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    let _ = wr.extended_data_bytes(1, b"\r\npostern: connection to the instance was lost\r\n".to_vec()).await;
                    let _ = wr.exit_status(255).await;
                    break Some(255);
                }
            },
        }
        // A recording that stops being written (a full disk) ends the session when the
        // gateway fails closed; otherwise the session goes on and its end says unlogged.
        if recording_lost.is_none()
            && let Some(why) = recorder.as_ref().and_then(Recorder::failure)
        {
            recording_lost = Some(why.to_owned());
            if fail_closed {
                notice(&wr, on_pty, "the session recording can no longer be written on the gateway, and sessions are not run unrecorded here; closing the session").await;
                let _ = send.reset(0u32.into());
                let _ = wr.exit_status(255).await;
                end_reason = Some("recording-failed");
                break Some(255);
            }
        }
    };
    drop(frames);
    if let Some(rec) = recorder.as_mut() {
        let _ = rec.finish(exit_code).await;
        // The last write can fail too: the end event then says what was lost.
        if recording_lost.is_none() {
            recording_lost = rec.failure().map(str::to_owned);
        }
    }
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
            reason: recording_lost
                .as_ref()
                .map(|e| format!("recording failed during the session: {e}"))
                .or(reason.map(str::to_owned)),
        }))
    });
    if let (Some(shipper), Some(rec)) = (&ctx.state.shipper, recorder.as_ref()) {
        shipper.recording_finished(rec.path());
    }
    info!(session_id = %sid, ?exit_code, "ssh session ended");
}
