//! The running gateway: data directory, CA, store, audit log, tunnel listener and admin socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use postern_proto::{EnrollRequest, ErrorCode, Hello};
use postern_tunnel::CancellationToken;
use postern_tunnel::agent::write_private;
use postern_tunnel::pki::CertAuthority;
use postern_tunnel::server::{AgentDirectory, AgentRegistry, EnrolledAgent, Refusal, TunnelServer, TunnelSettings};
use serde_json::json;
use tracing::info;

use crate::audit::AuditLog;
use crate::config::GatewayConfig;
use crate::store::sqlite::SqliteStore;
use crate::store::{Labels, NewAgent, NewToken, RedeemError, Store};
use postern_core::util::{name_from_hostname, now_unix, random_hex, valid_name};

/// Everything request handlers share.
pub struct GatewayState {
    pub config: GatewayConfig,
    pub store: Arc<dyn Store>,
    pub audit: Arc<AuditLog>,
    /// How new recordings are written (encryption, input capture).
    pub recording: crate::recording::RecordingOptions,
    /// Copies closed segments and recordings to object storage (`[audit.s3]`).
    pub shipper: Option<Arc<crate::audit::ship::Shipper>>,
    pub registry: AgentRegistry,
    pub ca: Arc<CertAuthority>,
    pub tunnel_addr: SocketAddr,
    pub access: crate::access::AccessList,
    pub host_keys: Arc<crate::ssh::hostkeys::HostKeys>,
    /// Address of the SSH front door, when enabled.
    pub ssh_addr: Option<SocketAddr>,
    pub ssh_throttle: crate::ssh::Throttle,
    /// Address of the RDP front door, when enabled.
    pub rdp_addr: Option<SocketAddr>,
    /// Issues and redeems RDP routing tokens (key in memory only).
    pub rdp_tokens: crate::rdp::token::TokenIssuer,
    /// `postern run` runs in progress (for their audit events).
    pub runs: crate::ssh::commands::Runs,
    pub sessions: Arc<crate::sessions::SessionTable>,
    /// Signalled after users, policies or grants change: live sessions are re-checked.
    pub access_changed: tokio::sync::Notify,
}

impl std::fmt::Debug for GatewayState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayState").field("tunnel_addr", &self.tunnel_addr).finish_non_exhaustive()
    }
}

pub fn admin_socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}

pub fn token_hash(token: &str) -> String {
    postern_core::util::sha256_hex(token.as_bytes())
}

/// Load the agent CA from the data directory, creating it on first start.
fn load_or_create_ca(dir: &Path) -> anyhow::Result<CertAuthority> {
    let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    if crt.exists() && key.exists() {
        let c = std::fs::read_to_string(&crt).with_context(|| format!("reading {}", crt.display()))?;
        let k = std::fs::read_to_string(&key).with_context(|| format!("reading {}", key.display()))?;
        return CertAuthority::from_pem(&c, &k).context("loading the agent CA");
    }
    let ca = CertAuthority::generate("Postern agent CA")?;
    write_private(&key, ca.key_pem().as_bytes())?;
    write_private(&crt, ca.cert_pem().as_bytes())?;
    info!(pin = %ca.pin(), "created agent CA");
    Ok(ca)
}

/// The key behind QUIC stateless resets; kept so a restarted gateway can reset old connections.
fn load_or_create_reset_key(dir: &Path) -> anyhow::Result<[u8; 32]> {
    let path = dir.join("reset.key");
    if let Ok(bytes) = std::fs::read(&path)
        && let Ok(key) = <[u8; 32]>::try_from(bytes.as_slice())
    {
        return Ok(key);
    }
    let mut key = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| anyhow::anyhow!("system random number generator failed"))?;
    write_private(&path, &key)?;
    Ok(key)
}

pub struct RunningGateway {
    pub state: Arc<GatewayState>,
    shutdown: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
}

impl RunningGateway {
    /// Stop accepting, close agent connections, remove the admin socket.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        let _ = std::fs::remove_file(admin_socket_path(&self.state.config.data_dir));
        let _ = self.state.audit.record("gateway.stopped", json!({}));
        let _ = self.state.audit.checkpoint(true);
        info!("gateway stopped");
    }
}

/// What retention keeps: recordings and closed event-log segments younger than these.
#[derive(Debug, Clone, Copy)]
struct Retention {
    recordings: Option<std::time::Duration>,
    log: Option<std::time::Duration>,
}

fn older_than(meta: &std::fs::Metadata, keep: std::time::Duration) -> bool {
    let cutoff = std::time::SystemTime::now().checked_sub(keep);
    cutoff.is_some_and(|c| meta.modified().is_ok_and(|m| m < c))
}

/// Delete recordings past `[audit] retention` (not live sessions') and the oldest closed
/// log segments past `[audit] log_retention` (a prefix of the log, so it stays one chain);
/// neither before it is uploaded when `[audit.s3]` is set. Each run that deletes something
/// is an `audit.retention` event.
fn apply_retention(state: &GatewayState, keep: Retention) {
    let uploaded =
        |kind: crate::audit::ship::Kind, path: &Path| state.shipper.as_ref().is_none_or(|s| s.is_uploaded(kind, path));
    let (mut deleted, mut bytes) = (0u64, 0u64);
    if let Some(keep) = keep.recordings {
        let dir = state.config.data_dir.join("recordings");
        let live = state.sessions.live_ids();
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(session) = crate::recording::session_of(&name) else { continue };
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_file()
                && older_than(&meta, keep)
                && !live.contains(session)
                // Left-over `pending-…` files (sessions that never started) are never uploaded.
                && (session.starts_with("pending-") || uploaded(crate::audit::ship::Kind::Recording, &path))
                && std::fs::remove_file(&path).is_ok()
            {
                deleted += 1;
                bytes += meta.len();
            }
        }
    }
    let (mut segments, mut segment_bytes, mut through) = (0u64, 0u64, 0u64);
    if let Some(keep) = keep.log {
        // Every segment but the newest (being written) is closed; a segment's events end
        // where the next one starts.
        let all = crate::audit::segments(state.audit.dir()).unwrap_or_default();
        for pair in all.windows(2) {
            let [(_, path), (next_first, _)] = pair else { break };
            let Ok(meta) = std::fs::metadata(path) else { break };
            if !older_than(&meta, keep)
                || !uploaded(crate::audit::ship::Kind::Segment, path)
                || std::fs::remove_file(path).is_err()
            {
                break;
            }
            segments += 1;
            segment_bytes += meta.len();
            through = next_first.saturating_sub(1);
        }
    }
    if deleted > 0 || segments > 0 {
        info!(deleted_recordings = deleted, deleted_segments = segments, "retention deleted old audit data");
        let mut fields = serde_json::Map::new();
        fields.insert("deleted_recordings".into(), json!(deleted));
        fields.insert("bytes".into(), json!(bytes));
        fields.insert("older_than_secs".into(), json!(keep.recordings.map(|k| k.as_secs())));
        if segments > 0 {
            fields.insert("deleted_segments".into(), json!(segments));
            fields.insert("segment_bytes".into(), json!(segment_bytes));
            fields.insert("deleted_through_seq".into(), json!(through));
            fields.insert("log_older_than_secs".into(), json!(keep.log.map(|k| k.as_secs())));
        }
        let _ = state.audit.record("audit.retention", serde_json::Value::Object(fields));
    }
}

/// Files that are complete and may be uploaded: closed log segments, and (`with_recordings`:
/// a full scan, which lists the recordings directory) recordings of sessions that are not
/// live (finished, or orphaned by a crash).
fn upload_candidates(state: &GatewayState, with_recordings: bool) -> Vec<(crate::audit::ship::Kind, PathBuf)> {
    use crate::audit::ship::Kind;
    let mut out: Vec<(Kind, PathBuf)> =
        state.audit.closed_segments().into_iter().map(|(_, p)| (Kind::Segment, p)).collect();
    if !with_recordings {
        return out;
    }
    let live = state.sessions.live_ids();
    for e in std::fs::read_dir(state.config.data_dir.join("recordings")).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // Recordings are named `pending-…` until their session starts.
        if let Some(session) = crate::recording::session_of(&name)
            && !session.starts_with("pending-")
            && !live.contains(session)
        {
            out.push((Kind::Recording, e.path()));
        }
    }
    out
}

/// Retention now and then every hour (more often for short retention periods).
async fn retention(state: Arc<GatewayState>, keep: Retention, shutdown: CancellationToken) {
    let shortest =
        [keep.recordings, keep.log].into_iter().flatten().min().unwrap_or(std::time::Duration::from_secs(3600));
    let every = (shortest / 2).clamp(std::time::Duration::from_secs(1), std::time::Duration::from_secs(3600));
    loop {
        apply_retention(&state, keep);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Signed audit checkpoints at least every [`crate::audit::CHECKPOINT_EVERY`] while events
/// arrive (the log also writes one every [`crate::audit::CHECKPOINT_EVERY_EVENTS`] events).
async fn checkpoints(audit: Arc<AuditLog>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
        }
        let _ = audit.checkpoint(false);
    }
}

/// Earlier versions kept the whole log in `DATA_DIR/audit.log`: it becomes the first segment.
fn migrate_single_file_log(dir: &std::path::Path) -> anyhow::Result<()> {
    let old = dir.join("audit.log");
    let segments = dir.join("audit");
    if old.exists() && crate::audit::segments(&segments)?.is_empty() {
        std::fs::create_dir_all(&segments)?;
        let to = segments.join(crate::audit::segment_name(1, false));
        std::fs::rename(&old, &to).with_context(|| format!("moving {} to {}", old.display(), to.display()))?;
        info!(to = %to.display(), "audit log moved into the segment directory");
    }
    Ok(())
}

pub async fn start(config: GatewayConfig) -> anyhow::Result<RunningGateway> {
    let keep = Retention {
        recordings: crate::config::parse_limit(&config.audit.retention).context("[audit] retention")?,
        log: crate::config::parse_limit(&config.audit.log_retention).context("[audit] log_retention")?,
    };
    let dir = config.data_dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating data directory {}", dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting permissions of {}", dir.display()))?;
    }
    let ca = Arc::new(load_or_create_ca(&dir)?);
    let reset_key = load_or_create_reset_key(&dir)?;
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&dir.join("postern.db"))
            .await
            .with_context(|| format!("opening database in {}", dir.display()))?,
    );
    let signing_key = crate::audit::load_or_create_signing_key(&dir.join("audit-signing.key"))?;
    let keyring = config.audit.encryption.keyring()?;
    let log_options = crate::audit::LogOptions {
        rotate_bytes: config.audit.rotate_bytes,
        rotate_after: crate::config::parse_limit(&config.audit.rotate_after).context("[audit] rotate_after")?,
        keyring: keyring.clone(),
    };
    migrate_single_file_log(&dir)?;
    let audit =
        Arc::new(AuditLog::open_signed(&dir.join("audit"), signing_key, log_options).context("opening the audit log")?);
    audit.set_stdout(config.audit.stdout);
    let directory = Arc::new(StoreDirectory { store: store.clone(), audit: audit.clone() });
    let settings = TunnelSettings {
        agent_cert_ttl: config.agent_cert_ttl()?,
        max_agents: config.tunnel.max_agents,
        ..TunnelSettings::default()
    };
    let server =
        TunnelServer::bind(config.tunnel.listen, ca.clone(), directory, settings, &reset_key).with_context(|| {
            format!("listening for agents on udp {} (is another gateway running?)", config.tunnel.listen)
        })?;
    let tunnel_addr = server.local_addr()?;
    let access = crate::access::AccessList::from_config(&config.ssh)?;
    access.reload(store.as_ref()).await.context("loading users, policies and grants")?;
    if let Some(names) = &config.ssh.ciphers {
        crate::ssh::ciphers(names)?;
    }
    let host_keys = Arc::new(crate::ssh::hostkeys::HostKeys::load(&dir, &crate::ssh::host_principals(&config))?);
    let ssh_listener = if config.ssh.enabled {
        Some(tokio::net::TcpListener::bind(config.ssh.listen).await.with_context(|| {
            format!("listening for SSH on tcp {} (port in use? set [ssh] listen)", config.ssh.listen)
        })?)
    } else {
        None
    };
    let ssh_addr = ssh_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    let rdp_listener = if config.rdp.enabled {
        Some(tokio::net::TcpListener::bind(config.rdp.listen).await.with_context(|| {
            format!("listening for RDP on tcp {} (port in use? set [rdp] listen)", config.rdp.listen)
        })?)
    } else {
        None
    };
    let rdp_addr = rdp_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    let sessions = Arc::new(
        crate::sessions::SessionTable::with_markers(dir.join("live-sessions"))
            .with_context(|| format!("creating {}", dir.join("live-sessions").display()))?,
    );
    sessions.close_orphans(&audit);
    let record_input = config.audit.record_input;
    let shipper =
        config.audit.s3.as_ref().map(|c| crate::audit::ship::Shipper::new(c, &dir).map(Arc::new)).transpose()?;
    let state = Arc::new(GatewayState {
        config,
        store,
        audit,
        recording: crate::recording::RecordingOptions { keyring, input: record_input },
        shipper,
        registry: server.registry(),
        ca,
        tunnel_addr,
        access,
        host_keys,
        ssh_addr,
        ssh_throttle: crate::ssh::Throttle::default(),
        rdp_addr,
        rdp_tokens: crate::rdp::token::TokenIssuer::new()?,
        runs: crate::ssh::commands::Runs::default(),
        sessions,
        access_changed: tokio::sync::Notify::new(),
    });
    let shutdown = CancellationToken::new();
    let hooks = crate::audit::webhooks::Webhooks::start(
        &state.config.audit.webhooks,
        dir.join("webhooks-dead-letter.jsonl"),
        shutdown.clone(),
    )?;
    state.audit.set_webhooks(hooks);
    let tasks = tokio_util::task::TaskTracker::new();
    let listener = crate::admin::bind(&admin_socket_path(&dir))?;
    tasks.spawn(server.serve(shutdown.clone()));
    tasks.spawn(crate::sessions::enforce(state.clone(), shutdown.clone()));
    tasks.spawn(checkpoints(state.audit.clone(), shutdown.clone()));
    if let Some(shipper) = state.shipper.clone() {
        let st = state.clone();
        tasks.spawn(shipper.run(move |full| upload_candidates(&st, full), state.audit.clone(), shutdown.clone()));
    }
    if keep.recordings.is_some() || keep.log.is_some() {
        tasks.spawn(retention(state.clone(), keep, shutdown.clone()));
    }
    tasks.spawn(crate::admin::serve(listener, state.clone(), shutdown.clone()));
    if let Some(l) = ssh_listener {
        tasks.spawn(crate::ssh::serve(l, state.clone(), shutdown.clone()));
    }
    if let Some(l) = rdp_listener {
        tasks.spawn(crate::rdp::serve(l, state.clone(), shutdown.clone()));
    }
    let _ = state.audit.record(
        "gateway.started",
        json!({"tunnel": tunnel_addr.to_string(), "ssh": ssh_addr.map(|a| a.to_string()),
               "rdp": rdp_addr.map(|a| a.to_string()), "ca_pin": state.ca.pin()}),
    );
    info!(tunnel = %tunnel_addr, data_dir = %dir.display(), ca_pin = %state.ca.pin(), "gateway started");
    Ok(RunningGateway { state, shutdown, tasks })
}

#[derive(Debug, serde::Serialize)]
pub struct CreatedToken {
    pub token: String,
    pub expires_at: i64,
    pub ca_pin: String,
    pub gateway: String,
    pub labels: Labels,
    pub name: Option<String>,
}

impl GatewayState {
    /// Address agents should dial, for printed join commands.
    pub fn advertised_tunnel(&self) -> String {
        if let Some(a) = &self.config.tunnel.advertise {
            return a.clone();
        }
        if self.tunnel_addr.ip().is_unspecified() {
            format!("{}:{}", postern_tunnel::agent::hostname(), self.tunnel_addr.port())
        } else {
            self.tunnel_addr.to_string()
        }
    }

    pub async fn create_token(
        &self,
        labels: Labels,
        ttl: std::time::Duration,
        name: Option<String>,
        actor: &str,
    ) -> anyhow::Result<CreatedToken> {
        if let Some(n) = &name
            && !valid_name(n)
        {
            anyhow::bail!("invalid instance name {n:?}: use letters, digits, '-', '_' and '.', at most 63 characters");
        }
        let token = format!("pt_{}", random_hex(24)?);
        let now = now_unix();
        let expires_at = now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
        self.store
            .create_token(&NewToken {
                hash: token_hash(&token),
                labels: labels.clone(),
                name: name.clone(),
                created_at: now,
                expires_at,
            })
            .await?;
        // The audit line names the token by a hash prefix, never the secret itself.
        let _ = self.audit.record(
            "token.created",
            json!({"actor": actor, "token_id": token_hash(&token).get(..12), "labels": labels, "name": name, "expires_at": expires_at}),
        );
        Ok(CreatedToken { token, expires_at, ca_pin: self.ca.pin(), gateway: self.advertised_tunnel(), labels, name })
    }
}

/// The tunnel's view of the store, with audit events for every decision.
struct StoreDirectory {
    store: Arc<dyn Store>,
    audit: Arc<AuditLog>,
}

impl AgentDirectory for StoreDirectory {
    async fn enroll(&self, token: &str, req: &EnrollRequest, remote: SocketAddr) -> Result<EnrolledAgent, Refusal> {
        let hash = token_hash(token);
        let id = random_hex(8)
            .map(|h| format!("ag-{h}"))
            .map_err(|e| Refusal { code: ErrorCode::Internal, message: e.to_string() })?;
        let new = NewAgent {
            id,
            hostname: name_from_hostname(&req.hostname),
            platform: req.platform.chars().take(64).collect(),
            agent_version: req.agent_version.chars().take(64).collect(),
            now: now_unix(),
        };
        let outcome = self.store.redeem_token(&hash, &new).await;
        let refuse = |code: ErrorCode, message: &str| {
            let _ = self.audit.record(
                "agent.enroll_refused",
                json!({"source": remote.to_string(), "token_id": hash.get(..12), "hostname": new.hostname, "reason": message}),
            );
            Refusal { code, message: message.to_owned() }
        };
        match outcome {
            Ok(Ok(rec)) => {
                let _ = self.audit.record(
                    "agent.enrolled",
                    json!({"source": remote.to_string(), "agent_id": rec.id, "name": rec.name, "labels": rec.labels,
                           "hostname": rec.hostname, "token_id": hash.get(..12)}),
                );
                Ok(EnrolledAgent { agent_id: rec.id, name: rec.name })
            }
            Ok(Err(RedeemError::Unknown)) => Err(refuse(ErrorCode::TokenUnknown, "unknown enrollment token")),
            Ok(Err(RedeemError::Used)) => Err(refuse(ErrorCode::TokenUsed, "enrollment token already used")),
            Ok(Err(RedeemError::Expired)) => Err(refuse(ErrorCode::TokenExpired, "enrollment token expired")),
            Err(e) => {
                tracing::error!(error = %e, "store error during enrollment");
                Err(refuse(ErrorCode::Internal, "gateway storage error; try again later"))
            }
        }
    }

    async fn admit(&self, agent_id: &str, hello: &Hello, remote: SocketAddr) -> Result<String, Refusal> {
        let rec = match self.store.agent(agent_id).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "store error admitting agent");
                return Err(Refusal { code: ErrorCode::Unavailable, message: "gateway storage error".into() });
            }
        };
        let refusal = match &rec {
            None => Some("agent is not registered with this gateway"),
            Some(r) if r.revoked => Some("agent has been revoked"),
            Some(_) => None,
        };
        if let Some(reason) = refusal {
            let _ = self
                .audit
                .record("agent.refused", json!({"agent_id": agent_id, "source": remote.to_string(), "reason": reason}));
            return Err(Refusal { code: ErrorCode::AgentRevoked, message: reason.into() });
        }
        let trim = |s: &str, n| s.chars().take(n).collect::<String>();
        let _ = self
            .store
            .agent_seen(
                agent_id,
                Some(&trim(&hello.hostname, 255)),
                Some(&trim(&hello.platform, 64)),
                Some(&trim(&hello.agent_version, 64)),
                now_unix(),
            )
            .await;
        let name = rec.map(|r| r.name).unwrap_or_default();
        let _ = self.audit.record(
            "agent.connected",
            json!({"agent_id": agent_id, "name": name, "source": remote.to_string(), "agent_version": hello.agent_version}),
        );
        Ok(name)
    }

    async fn departed(&self, agent_id: &str) {
        let _ = self.store.agent_seen(agent_id, None, None, None, now_unix()).await;
        let _ = self.audit.record("agent.disconnected", json!({"agent_id": agent_id}));
    }

    async fn protocol_violation(&self, remote: SocketAddr, agent_id: Option<&str>, error: &str) {
        let _ = self.audit.record(
            "agent.protocol_violation",
            json!({"source": remote.to_string(), "agent_id": agent_id, "error": error}),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_hash_is_sha256_hex() {
        assert_eq!(token_hash("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
