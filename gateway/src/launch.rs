//! Starting and ending a shell, exec or sftp session, whichever door asked for it (the SSH
//! door's session channels, the web console's terminals): the phases after authorization.
//!
//! ```text
//! door:    authorize -> plan -> launch ------------------------------> relay -> Launched::finish
//! launch:                      free space, recording, session.authorized   end event, off the
//!                              (fail closed), tunnel stream, start event   live table, shipping
//! ```
//!
//! A door keeps only what is its own: how the user asked, and how a refusal or the session's
//! bytes reach them. What is recorded, what is audited and when a session may not run
//! (the fail-closed rule) is decided here, once.

use std::net::SocketAddr;

use postern_core::Action;
use postern_core::profile::{Profile, interactive_script, render_command, wrap_command};
use postern_proto::{ExecCommand, ExecRequest, SessionRequest, ShellRequest};
use postern_tunnel::server::{OpenError, SessionStream};
use tracing::info;

use crate::access::Authorization;
use crate::audit::events::{
    Event, GatewayDiskLow, SessionAuthorized, SessionDenied, SessionEnd, SessionStart, SshDenied, SshSessionEnd,
    SshSessionStart,
};
use crate::broker::Running;
use crate::recording::Recorder;
use crate::services::Services;
use crate::session_relay::Relayed;

/// Runs the first sftp-server found on the instance.
const SFTP_SERVER: &str = "for p in /usr/lib/openssh/sftp-server /usr/libexec/openssh/sftp-server \
    /usr/libexec/sftp-server /usr/lib/ssh/sftp-server; do [ -x \"$p\" ] && exec \"$p\"; done; \
    echo 'postern: no sftp-server on this instance' >&2; exit 127";

/// What the user asked to run.
pub enum Request {
    Shell,
    Exec(String),
    Subsystem(String),
}

/// The user's terminal.
pub struct Pty {
    pub term: String,
    pub cols: u16,
    pub rows: u16,
}

/// What the agent is asked to run: the profile's one command, or the user's request shaped
/// by the profile (working directory, startup commands, shell, environment). `Err` is the
/// refusal to show the user.
pub fn plan(
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

/// A session to start: authorized and planned.
pub struct Launch<'a> {
    pub authz: &'a Authorization,
    pub action: Action,
    /// What the agent runs ([`plan`]).
    pub agent_request: SessionRequest,
    /// What the user asked to run, for the audit trail (none for a shell, "sftp" for sftp).
    pub command: Option<String>,
    /// Whether `command` is an exec (the recording's header names it).
    pub exec: bool,
    /// The terminal's size when there is one.
    pub pty: Option<(u16, u16)>,
    /// The user's address.
    pub peer: SocketAddr,
    /// The door, when it is not the SSH door (`web`): it is named in the audit events.
    pub door: Option<&'static str>,
    /// The `postern run` this invocation belongs to (already checked to be the user's own).
    pub run_id: Option<String>,
}

/// Why a session was not started: the message for the user, and the exit status a plain
/// `ssh` client gets (1; 255 when the instance could not be reached).
pub struct Refused {
    pub message: String,
    pub code: u32,
}

/// A started session: on the live table, its start event written. [`launch`] returns it
/// with the agent's stream to relay.
pub struct Launched {
    pub session_id: String,
    pub recorder: Option<Recorder>,
    pub running: Running,
    logged: bool,
    reason: Option<String>,
    user: String,
    target: String,
    action: Action,
    door: Option<&'static str>,
}

impl Launch<'_> {
    fn denied(&self, state: &Services, reason: String) {
        let _ = state.audit.event(&Event::SessionDenied(SessionDenied::Ssh(SshDenied {
            user: self.authz.user().to_owned(),
            target: self.authz.instance().to_owned(),
            action: self.action,
            source: self.peer.to_string(),
            reason,
            destination: None,
            door: self.door.map(str::to_owned),
        })));
    }
}

/// Check that the session can be recorded and audited (refused when it cannot and the
/// gateway fails closed), open the agent's stream and start the session.
pub async fn launch(state: &Services, l: Launch<'_>) -> Result<(Launched, SessionStream), Refused> {
    let authz = l.authz;
    let action = l.action;
    let recording_dir = state.config.data_dir.join("recordings");
    let fail_closed = state.config.audit.fail_closed;
    let refused = |message: String| Refused { message, code: 1 };
    // The free-space guard: a logged session does not start on a nearly full disk.
    let low_space = if action == Action::Sftp { None } else { state.space.check(&recording_dir).err() };
    if let Some(low) = &low_space {
        postern_tunnel::warn_limited!(dir = %recording_dir.display(), free = low.free, needed = low.needed, "low disk space for recordings");
        if low.first {
            let _ = state.audit.event(&Event::GatewayDiskLow(GatewayDiskLow {
                path: recording_dir.display().to_string(),
                free_bytes: low.free,
                min_free_bytes: low.needed,
                fail_closed,
            }));
        }
        if fail_closed {
            l.denied(state, format!("{} (fail_closed)", low.reason()));
            return Err(refused(format!(
                "the session recording cannot be written on the gateway: {}, and sessions are not run unrecorded here; tell your administrator",
                low.reason()
            )));
        }
    }
    let (cols, rows) = l.pty.unwrap_or((80, 24));
    let recorder = if action == Action::Sftp || low_space.is_some() {
        None
    } else {
        let title = format!("{}@{}: {}", authz.user(), authz.instance(), l.command.as_deref().unwrap_or("shell"));
        let created = postern_core::util::random_hex(8).map_err(std::io::Error::other).and_then(|r| {
            let exec = if l.exec { l.command.as_deref() } else { None };
            Recorder::create(&recording_dir, &format!("pending-{r}"), (cols, rows), &title, exec, &state.recording)
        });
        match created {
            Ok(r) => Some(r),
            Err(e) => {
                postern_tunnel::warn_limited!(error = %e, dir = %recording_dir.display(), "cannot create recording");
                None
            }
        }
    };
    let discard = |recorder: Option<Recorder>| {
        if let Some(r) = recorder {
            let _ = std::fs::remove_file(r.path());
        }
    };
    let authorized = state.audit.event(&Event::SessionAuthorized(SessionAuthorized {
        user: authz.user().to_owned(),
        target: authz.instance().to_owned(),
        agent_id: authz.agent_id().to_owned(),
        kind: action,
        source: l.peer.to_string(),
        recording_ok: recorder.is_some() || action == Action::Sftp,
    }));
    if fail_closed && (authorized.is_err() || (recorder.is_none() && action != Action::Sftp)) {
        let what = if authorized.is_err() { "the audit log" } else { "the session recording" };
        l.denied(state, format!("{what} cannot be written (fail_closed)"));
        discard(recorder);
        return Err(refused(format!(
            "{what} cannot be written on the gateway, and sessions are not run unrecorded here; tell your administrator"
        )));
    }
    // Open the agent's stream and start the session (start event, live table).
    let stream = match state.broker.open(authz, l.agent_request).await {
        Ok(s) => s,
        Err(e) => {
            let message = match e {
                OpenError::Offline => format!("instance {} is offline (its agent is not connected)", authz.instance()),
                OpenError::Rejected { reason, .. } => {
                    format!("instance {} refused the session: {reason}", authz.instance())
                }
                other => format!("instance {}: {other}", authz.instance()),
            };
            discard(recorder);
            return Err(Refused { message, code: 255 });
        }
    };
    let sid = stream.id.to_string();
    let mut recorder = recorder;
    if let Some(r) = recorder.as_mut()
        && let Err(e) = r.rename_to(&sid)
    {
        postern_tunnel::warn_limited!(error = %e, "cannot name the recording after its session");
    }
    let (logged, reason) = match (&recorder, action, &low_space) {
        (Some(_), _, _) => (true, None),
        (None, Action::Sftp, _) => (false, Some("sftp file transfer content is not recorded".to_owned())),
        (None, _, Some(low)) => (false, Some(low.reason())),
        (None, _, None) => (false, Some("recording could not be created".to_owned())),
    };
    let profile = authz.profile();
    let running = state.broker.start(
        &sid,
        authz.party(Some(l.peer.ip()), logged),
        &Event::SessionStart(SessionStart::Ssh(SshSessionStart {
            session_id: sid.clone(),
            user: authz.user().to_owned(),
            target: authz.instance().to_owned(),
            agent_id: authz.agent_id().to_owned(),
            kind: action,
            command: l.command.clone(),
            pty: l.pty.is_some(),
            source: l.peer.to_string(),
            profile: if profile.name.is_empty() { None } else { Some(profile.name.clone()) },
            run_as: authz.run_as().map(str::to_owned),
            logged,
            reason: reason.clone(),
            run_id: l.run_id,
            recording: recorder.as_ref().map(|r| r.path().display().to_string()),
            via_gateway: stream.via.clone(),
            cert_serial: authz.cert_serial().map(|s| format!("{s:016x}")),
            door: l.door.map(str::to_owned),
        })),
    );
    info!(session_id = %sid, user = %authz.user(), target = %authz.instance(), kind = action.name(),
          door = l.door.unwrap_or("ssh"), "session started");
    let launched = Launched {
        session_id: sid,
        recorder,
        running,
        logged,
        reason,
        user: authz.user().to_owned(),
        target: authz.instance().to_owned(),
        action,
        door: l.door,
    };
    Ok((launched, stream))
}

impl Launched {
    /// Write the end event from how the relay went, take the session off the live table,
    /// and hand the recording to the shipper.
    pub fn finish(self, state: &Services, relayed: &Relayed) {
        let Launched { session_id, recorder, running, logged, reason, user, target, action, door } = self;
        let live = running.live().clone();
        running.finish(|duration_ms| {
            Event::SessionEnd(SessionEnd::Ssh(SshSessionEnd {
                session_id: session_id.clone(),
                user,
                target,
                kind: action,
                exit_code: relayed.exit_code,
                bytes_in: relayed.bytes_in,
                bytes_out: relayed.bytes_out,
                end_reason: relayed.end_reason.map(str::to_owned),
                terminated_because: live.reason(),
                duration_ms,
                logged: logged && relayed.recording_lost.is_none(),
                reason: relayed.recording_lost.clone().or(reason),
                door: door.map(str::to_owned),
            }))
        });
        if let (Some(shipper), Some(rec)) = (&state.shipper, recorder.as_ref()) {
            shipper.recording_finished(rec.path());
        }
        info!(session_id = %session_id, exit_code = ?relayed.exit_code, "session ended");
    }
}
