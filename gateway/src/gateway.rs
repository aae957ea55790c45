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

use crate::audit::{AuditLog, now_unix};
use crate::config::GatewayConfig;
use crate::store::sqlite::SqliteStore;
use crate::store::{Labels, NewAgent, NewToken, RedeemError, Store};

/// Everything request handlers share.
pub struct GatewayState {
    pub config: GatewayConfig,
    pub store: Arc<dyn Store>,
    pub audit: Arc<AuditLog>,
    pub registry: AgentRegistry,
    pub ca: Arc<CertAuthority>,
    pub tunnel_addr: SocketAddr,
    pub access: crate::access::AccessList,
    pub host_keys: Arc<crate::ssh::hostkeys::HostKeys>,
    /// Address of the SSH front door, when enabled.
    pub ssh_addr: Option<SocketAddr>,
    pub ssh_throttle: crate::ssh::Throttle,
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

/// `n` random bytes from the system generator, as lowercase hex.
pub fn random_hex(n: usize) -> anyhow::Result<String> {
    let mut b = vec![0u8; n];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| anyhow::anyhow!("system random number generator failed"))?;
    Ok(crate::audit::hex(&b))
}

/// Instance names appear in host names (`web-01.<suffix>`) and commands: keep them to
/// letters, digits, '-', '_' and '.', at most 63 characters.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 63 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// A usable name from whatever hostname an agent reported.
fn name_from_hostname(hostname: &str) -> String {
    let cleaned: String = hostname
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '-' })
        .take(63)
        .collect();
    if cleaned.is_empty() { "instance".into() } else { cleaned }
}

pub fn token_hash(token: &str) -> String {
    crate::audit::line_hash(token.as_bytes())
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

/// Delete recordings older than `[audit] retention` now and every hour; skip live sessions'.
async fn retention(state: Arc<GatewayState>, keep: std::time::Duration, shutdown: CancellationToken) {
    loop {
        let dir = state.config.data_dir.join("recordings");
        let live: std::collections::HashSet<String> = state.sessions.live().iter().map(|s| s.id.clone()).collect();
        let (mut deleted, mut bytes) = (0u64, 0u64);
        let cutoff = std::time::SystemTime::now().checked_sub(keep);
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = e.path();
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let Ok(meta) = e.metadata() else { continue };
            let old = cutoff.is_some_and(|c| meta.modified().is_ok_and(|m| m < c));
            if old && meta.is_file() && !live.contains(&stem) && std::fs::remove_file(&path).is_ok() {
                deleted += 1;
                bytes += meta.len();
            }
        }
        if deleted > 0 {
            info!(deleted, bytes, "recordings past retention deleted");
            let _ = state.audit.record(
                "audit.retention",
                json!({"deleted_recordings": deleted, "bytes": bytes, "older_than_secs": keep.as_secs()}),
            );
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
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

pub async fn start(config: GatewayConfig) -> anyhow::Result<RunningGateway> {
    let keep_recordings = crate::config::parse_limit(&config.audit.retention).context("[audit] retention")?;
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
    let audit = Arc::new(AuditLog::open_signed(&dir.join("audit.log"), signing_key).context("opening audit log")?);
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
    let sessions = Arc::new(
        crate::sessions::SessionTable::with_markers(dir.join("live-sessions"))
            .with_context(|| format!("creating {}", dir.join("live-sessions").display()))?,
    );
    sessions.close_orphans(&audit);
    let state = Arc::new(GatewayState {
        config,
        store,
        audit,
        registry: server.registry(),
        ca,
        tunnel_addr,
        access,
        host_keys,
        ssh_addr,
        ssh_throttle: crate::ssh::Throttle::default(),
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
    if let Some(keep) = keep_recordings {
        tasks.spawn(retention(state.clone(), keep, shutdown.clone()));
    }
    tasks.spawn(crate::admin::serve(listener, state.clone(), shutdown.clone()));
    if let Some(l) = ssh_listener {
        tasks.spawn(crate::ssh::serve(l, state.clone(), shutdown.clone()));
    }
    let _ = state.audit.record(
        "gateway.started",
        json!({"tunnel": tunnel_addr.to_string(), "ssh": ssh_addr.map(|a| a.to_string()), "ca_pin": state.ca.pin()}),
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
    fn names() {
        assert!(valid_name("web-01.prod"));
        assert!(!valid_name("web 01"));
        assert!(!valid_name(""));
        assert!(!valid_name(&"a".repeat(64)));
        assert_eq!(name_from_hostname("my host;rm -rf"), "my-host-rm--rf");
        assert_eq!(name_from_hostname(""), "instance");
        assert_eq!(name_from_hostname(&"h".repeat(300)).len(), 63);
    }

    #[test]
    fn token_hash_is_sha256_hex() {
        assert_eq!(token_hash("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
