//! The admin socket: a Unix socket in the data directory (mode 0600, same-user peers only)
//! carrying one JSON request line and one JSON reply line. A `session` request then turns
//! the socket into a relay of protocol frames to the agent's session stream.
//!
//! There is no network-reachable admin surface.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use postern_proto::{
    ExecCommand, ExecRequest, Message, SessionRequest, ShellRequest, StreamKind, read_frame, write_frame,
};
use postern_tunnel::CancellationToken;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::debug;

use crate::audit::events::{
    AdminAction, AdminSessionEnd, AdminSessionStart, AgentBulkEnrolled, Event, SessionEnd, SessionStart,
};
use crate::services::Services;
use crate::sessions::Party;
use crate::store::{Labels, resolve_instance};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminRequest {
    TokenCreate {
        labels: Labels,
        ttl_secs: u64,
        name: Option<String>,
    },
    Instances,
    TokenList,
    TokenRevoke {
        id: String,
    },
    Revoke {
        instance: String,
    },
    Session {
        instance: String,
        session: SessionSpec,
    },
    BulkEnroll {
        count: usize,
        csr_hex: String,
        prefix: String,
    },
    SshConfig {
        known_hosts_file: String,
        /// The Postern identity the gateway hop logs in as.
        user: String,
    },
    /// Read gateway.toml again ([`crate::reload`]).
    Reload,
    /// Users, groups, policies, grants, explain and sessions (see [`crate::manage`]).
    Manage {
        request: crate::manage::ManageRequest,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SessionSpec {
    Exec { command: String, env: Vec<(String, String)> },
    Shell { term: String, cols: u16, rows: u16, env: Vec<(String, String)>, command: Option<String> },
}

pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if path.exists() {
        // A live gateway answers; a stale socket from a crash does not and is replaced.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("another gateway is already using {}", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("binding admin socket {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, state: Arc<Services>, shutdown: CancellationToken) {
    let tasks = tokio_util::task::TaskTracker::new();
    let mut backoff = crate::accept::AcceptBackoff::default();
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => { backoff.reset(); s }
                Err(e) => { backoff.failed("admin", &e).await; continue; }
            },
        };
        let me = nix::unistd::Uid::effective().as_raw();
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == me || cred.uid() == 0 => {}
            _ => {
                postern_tunnel::warn_limited!("refusing admin connection from another user");
                continue;
            }
        }
        let state = state.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                r = handle(stream, &state) => if let Err(e) = r { debug!(error = %format!("{e:#}"), "admin request ended with error") },
            }
        });
    }
    tasks.close();
    tasks.wait().await;
}

async fn reply(stream: &mut UnixStream, value: Value) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(&value)?;
    line.push(b'\n');
    stream.write_all(&line).await?;
    Ok(())
}

fn actor() -> String {
    // The admin socket only admits the gateway's own user or root; name them for the log.
    format!("local-admin(uid={})", nix::unistd::Uid::effective())
}

async fn handle(mut stream: UnixStream, state: &Services) -> anyhow::Result<()> {
    let mut line = String::new();
    {
        let mut reader = BufReader::new((&mut stream).take(MAX_REQUEST));
        tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await.context("request timed out")??;
    }
    let req: AdminRequest = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => return reply(&mut stream, json!({"ok": false, "error": format!("bad request: {e}")})).await,
    };
    if !matches!(req, AdminRequest::Manage { .. } | AdminRequest::BulkEnroll { .. }) {
        // `op` is the request's serde tag, so always there.
        let op =
            serde_json::to_value(&req).ok().and_then(|v| v.get("op")?.as_str().map(str::to_owned)).unwrap_or_default();
        let _ = state.audit.event(&Event::AdminAction(AdminAction {
            actor: actor(),
            op,
            ok: None,
            args: None,
            error: None,
        }));
    }
    match req {
        AdminRequest::Manage { request } => match crate::manage::run(&state.manage, request, &actor()).await {
            Ok(v) => reply(&mut stream, json!({"ok": true, "result": v})).await,
            Err(e) => reply(&mut stream, json!({"ok": false, "error": format!("{e:#}")})).await,
        },
        AdminRequest::TokenCreate { labels, ttl_secs, name } => {
            let result =
                state.instances.create_token(labels, Duration::from_secs(ttl_secs.max(1)), name, &actor()).await;
            match result {
                Ok(t) => reply(&mut stream, json!({"ok": true, "result": t})).await,
                Err(e) => reply(&mut stream, json!({"ok": false, "error": format!("{e:#}")})).await,
            }
        }
        AdminRequest::TokenList => match state.instances.tokens().await {
            Ok(rows) => reply(&mut stream, json!({"ok": true, "result": rows})).await,
            Err(e) => reply(&mut stream, json!({"ok": false, "error": format!("{e:#}")})).await,
        },
        AdminRequest::TokenRevoke { id } => match state.instances.revoke_token(&id, &actor()).await {
            Ok(()) => reply(&mut stream, json!({"ok": true, "result": {"revoked": id}})).await,
            Err(e) => reply(&mut stream, json!({"ok": false, "error": format!("{e:#}")})).await,
        },
        AdminRequest::Reload => match state.reload.reload(&actor()) {
            Ok(report) => reply(&mut stream, json!({"ok": true, "result": report})).await,
            Err(e) => reply(&mut stream, json!({"ok": false, "error": e.to_string()})).await,
        },
        AdminRequest::Instances => {
            let rows = state.instances.rows().await?;
            reply(&mut stream, json!({"ok": true, "result": rows})).await
        }
        AdminRequest::Revoke { instance } => match state.instances.revoke(&instance, &actor()).await {
            Ok(r) => reply(&mut stream, json!({"ok": true, "result": r})).await,
            Err(e) => reply(&mut stream, json!({"ok": false, "error": format!("{e:#}")})).await,
        },
        AdminRequest::Session { instance, session } => relay_session(stream, state, &instance, session).await,
        AdminRequest::SshConfig { known_hosts_file, user } => {
            let Some(addr) = state.addresses.ssh else {
                return reply(
                    &mut stream,
                    json!({"ok": false, "error": "the SSH front door is disabled ([ssh] enabled = false)"}),
                )
                .await;
            };
            match crate::addressing::client_config(&state.config, &state.host_keys, addr, &known_hosts_file, &user) {
                Ok(config) => reply(&mut stream, json!({"ok": true, "result": config})).await,
                Err(e) => reply(&mut stream, json!({"ok": false, "error": format!("{e:#}")})).await,
            }
        }
        AdminRequest::BulkEnroll { count, csr_hex, prefix } => {
            if !state.config.testing.bulk_enroll {
                return reply(
                    &mut stream,
                    json!({"ok": false, "error": "bulk enrollment is disabled (testing.bulk_enroll)"}),
                )
                .await;
            }
            let csr = postern_core::util::unhex(&csr_hex).context("csr_hex: not hex")?;
            let ttl = state.config.agent_cert_ttl()?;
            let mut ids = Vec::with_capacity(count);
            let mut certs = Vec::with_capacity(count);
            for i in 0..count {
                let id = format!("ag-{prefix}{i:06}");
                let cert = state.instances.ca().issue_agent_cert(&csr, &id, ttl)?;
                certs.push(json!({"id": id, "cert_pem": postern_tunnel::pki::der_to_pem(&cert)}));
                ids.push((id, format!("{prefix}{i:06}")));
            }
            state
                .store
                .insert_agents(
                    &ids,
                    &Labels::from([("sim".to_owned(), "true".to_owned())]),
                    postern_core::util::now_unix(),
                )
                .await?;
            let _ = state.audit.event(&Event::AgentBulkEnrolled(AgentBulkEnrolled {
                actor: actor(),
                count: u64::try_from(count).unwrap_or(u64::MAX),
                prefix: prefix.clone(),
            }));
            reply(
                &mut stream,
                json!({"ok": true, "result": {"ca_pem": state.instances.ca().cert_pem(), "agents": certs}}),
            )
            .await
        }
    }
}

async fn relay_session(
    mut stream: UnixStream,
    state: &Services,
    instance: &str,
    spec: SessionSpec,
) -> anyhow::Result<()> {
    let agents = state.store.agents().await?;
    let agent = match resolve_instance(&agents, instance) {
        Ok(a) => a.clone(),
        Err(e) => return reply(&mut stream, json!({"ok": false, "error": e})).await,
    };
    // The admin socket is the gateway operator's own door (peer credentials checked): whoever
    // holds it can write any policy, root included, so its sessions are not limited to
    // non-root users. docs/ssh.md ("Who sessions run as") says so.
    let asked = match &spec {
        SessionSpec::Exec { command, .. } => Some(command.clone()),
        SessionSpec::Shell { command, .. } => command.clone(),
    };
    let (kind, request) = match spec {
        SessionSpec::Exec { command, env } => (
            "exec",
            SessionRequest::Exec(ExecRequest {
                command: ExecCommand::Shell(command),
                env,
                run_as: None,
                allow_root: true,
            }),
        ),
        SessionSpec::Shell { term, cols, rows, env, command } => (
            "shell",
            SessionRequest::Shell(ShellRequest { term, cols, rows, env, run_as: None, command, allow_root: true }),
        ),
    };
    let session = match state.broker.open_for_admin(&agent, request).await {
        Ok(s) => s,
        Err(e) => {
            let msg = match e {
                postern_tunnel::server::OpenError::Offline => format!("instance {} is offline", agent.name),
                other => other.to_string(),
            };
            return reply(&mut stream, json!({"ok": false, "error": msg})).await;
        }
    };
    let sid = session.id.to_string();
    let action = if kind == "exec" { postern_core::Action::Exec } else { postern_core::Action::Shell };
    let party = Party {
        user: actor(),
        source: None,
        target: agent.name.clone(),
        agent_id: agent.id.clone(),
        action,
        destination: None,
        logged: false,
        via_admin: true,
        reservation: None,
        cert: None,
        max_session: None,
    };
    let running = state.broker.start(
        &sid,
        party,
        &Event::SessionStart(SessionStart::AdminSocket(AdminSessionStart {
            session_id: sid.clone(),
            actor: actor(),
            target: agent.name.clone(),
            agent_id: agent.id.clone(),
            kind: action,
            via: "admin-socket".to_owned(),
            command: asked,
            logged: false,
            reason: "admin-socket sessions are not recorded".to_owned(),
        })),
    );
    reply(&mut stream, json!({"ok": true, "session_id": sid})).await?;
    let live = running.live().clone();
    let (from_client, mut to_client) = stream.into_split();
    let mut from_client = BufReader::new(from_client);
    let postern_tunnel::server::SessionStream { mut send, mut recv, violation, .. } = session;
    // Frames are decoded both ways: to count what the session carried (`sessions --all`,
    // the end event), to see the exit code, and so that an agent breaking the protocol is
    // dropped (its connection closed, `agent.protocol_violation` written) as docs/protocol.md
    // says. The agent ends a session by finishing its stream after the exit frame. The client
    // never half-closes, so end of input from it means it went away: reset the stream so the
    // agent stops the remote process instead of leaving it running.
    // `postern sessions terminate` (or the instance revoked) ends it the same way.
    let up = async {
        let pump = async {
            while let Ok(Some(msg)) = read_frame(&mut from_client, StreamKind::Session).await {
                if let Message::Stdin(d) = &msg {
                    live.add_in(d.len());
                }
                if write_frame(&mut send, &msg).await.is_err() {
                    break;
                }
            }
        };
        tokio::select! {
            () = pump => {}
            () = live.terminated() => {}
        }
        send.reset(0);
    };
    let down = async {
        let mut exit_code = None;
        loop {
            let msg = match read_frame(&mut recv, StreamKind::Session).await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    if postern_tunnel::server::is_violation(&e) {
                        violation.report(&e.to_string());
                    }
                    break;
                }
            };
            match &msg {
                Message::Stdout(d) | Message::Stderr(d) => live.add_out(d.len()),
                Message::Exit(e) => exit_code = Some(e.code),
                Message::Error(_) => {}
                other => {
                    violation.report(&format!("unexpected session message {:?}", other.kind()));
                    break;
                }
            }
            if write_frame(&mut to_client, &msg).await.is_err() {
                break;
            }
        }
        let _ = to_client.shutdown().await;
        exit_code
    };
    tokio::pin!(up, down);
    let exit_code = tokio::select! {
        code = &mut down => {
            // Session over; whatever the client still sends is moot.
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut up).await;
            code
        }
        () = &mut up => tokio::time::timeout(Duration::from_secs(5), &mut down).await.unwrap_or(None),
    };
    let end_reason = live.reason();
    let (bytes_in, bytes_out) = (live.bytes_in.load(Ordering::Relaxed), live.bytes_out.load(Ordering::Relaxed));
    running.finish(|duration_ms| {
        Event::SessionEnd(SessionEnd::AdminSocket(AdminSessionEnd {
            session_id: sid.clone(),
            user: actor(),
            target: agent.name.clone(),
            kind: action,
            via: "admin-socket".to_owned(),
            exit_code,
            bytes_in,
            bytes_out,
            end_reason,
            duration_ms,
            logged: false,
        }))
    });
    Ok(())
}

/// A client's connection after a successful reply; sessions continue on it.
pub struct AdminConnection {
    pub reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    pub writer: tokio::net::unix::OwnedWriteHalf,
}

/// Client side: send one request and read the reply line.
pub async fn request(socket: &Path, req: &AdminRequest) -> anyhow::Result<(Value, AdminConnection)> {
    let stream = UnixStream::connect(socket).await.with_context(|| {
        format!(
            "connecting to the gateway's admin socket {} (is `postern gateway` running with this --data-dir?)",
            socket.display()
        )
    })?;
    let (reader, mut writer) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    // The gateway drops a connection from a user other than its own and root at once.
    writer.write_all(&line).await.context(
        "sending the request to the gateway's admin socket (it admits only the gateway's own user and root)",
    )?;
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), reader.read_until(b'\n', &mut buf))
        .await
        .context("gateway did not answer")?
        .context("reading the gateway's reply (the admin socket admits only the gateway's own user and root)")?;
    if buf.is_empty() {
        anyhow::bail!(
            "the gateway closed the admin connection without answering (the admin socket admits only the gateway's \
             own user and root)"
        );
    }
    let value: Value = serde_json::from_slice(&buf).context("parsing gateway reply")?;
    if value.get("ok").and_then(Value::as_bool) != Some(true) {
        let err = value.get("error").and_then(Value::as_str).unwrap_or("unknown error");
        anyhow::bail!("{err}");
    }
    Ok((value, AdminConnection { reader, writer }))
}
