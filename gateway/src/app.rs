//! Start-up and background jobs: the data directory, the agent CA, the store, the audit log,
//! the services ([`Services`]), the tunnel listener and the doors; checkpoints, uploads,
//! retention and the enforcer run beside them until shutdown.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use postern_tunnel::CancellationToken;
use postern_tunnel::agent::write_private;
use postern_tunnel::pki::CertAuthority;
use postern_tunnel::server::{TunnelServer, TunnelSettings};
use tracing::info;

use crate::access::{AccessList, Authorizer};
use crate::audit::AuditLog;
use crate::audit::anchor::Standing;
use crate::audit::events::{AuditRetention, AuditTruncated, Event, GatewayStarted, GatewayStopped, SegmentsDeleted};
use crate::audit::ship::Kind;
use crate::broker::Broker;
use crate::cluster_sessions::ClusterSessions;
use crate::config::GatewayConfig;
use crate::history::{HistoryRetention, SessionHistory};
use crate::instances::{Instances, StoreDirectory};
use crate::manage::Manage;
use crate::rdp_tokens::RdpTokens;
use crate::runs::Runs;
use crate::services::{Addresses, Services};
use crate::sessions::SessionTable;
use crate::store::Store;

/// Where webhook deliveries that failed for good are written.
fn webhooks_dead_letter(data_dir: &Path) -> PathBuf {
    data_dir.join("webhooks-dead-letter.jsonl")
}

pub fn admin_socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
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

/// Longest wait between two attempts to reach the store at start (cluster gateways).
const STORE_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// A cluster gateway's store: it serves nothing without one (fail closed), so while the
/// store cannot be reached it waits (opening no port) and tries again, every second at
/// first and then every [`STORE_RETRY_MAX`], logging each failure; it starts as soon as the
/// store answers. A single gateway instead stops with the error, as a misconfiguration.
async fn open_store_when_reachable(url: Option<&str>, dir: &Path) -> Arc<dyn Store> {
    let mut wait = std::time::Duration::from_secs(1);
    loop {
        match crate::store::open(url, dir).await {
            Ok(store) => return store,
            Err(e) => {
                postern_tunnel::warn_limited!(
                    error = %format!("{e:#}"),
                    retry_in_secs = wait.as_secs(),
                    "the store is unreachable; this gateway serves nothing until it answers"
                );
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(STORE_RETRY_MAX);
    }
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
    pub services: Arc<Services>,
    shutdown: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
    anchors: AnchorBook,
}

/// Where this gateway's audit anchor is kept in the store: the one row of a single gateway,
/// or (`[cluster] gateway_id`) the gateway's own row with its checkpoint key, so that each
/// gateway of a cluster checks its log against its own last checkpoint, never another's.
#[derive(Clone)]
struct AnchorBook {
    store: Arc<dyn Store>,
    gateway_id: Option<String>,
    /// The checkpoint signing key's public half (hex), recorded with a cluster anchor.
    public_key: String,
}

impl AnchorBook {
    async fn read(&self) -> Result<Option<crate::audit::anchor::AuditAnchor>, crate::store::StoreError> {
        match &self.gateway_id {
            Some(id) => Ok(self.store.gateway_audit_anchor(id).await?.map(|g| g.anchor)),
            None => self.store.audit_anchor().await,
        }
    }

    async fn write(&self, anchor: &crate::audit::anchor::AuditAnchor) -> Result<(), crate::store::StoreError> {
        match &self.gateway_id {
            Some(id) => {
                let entry = crate::store::GatewayAnchor { anchor: anchor.clone(), public_key: self.public_key.clone() };
                self.store.set_gateway_audit_anchor(id, &entry).await
            }
            None => self.store.set_audit_anchor(anchor).await,
        }
    }
}

/// How long a graceful stop waits for live sessions to end before it closes their
/// connections under them.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

impl RunningGateway {
    /// End live sessions (each writes its `session.end`), then stop accepting, close agent
    /// connections, remove the admin socket.
    pub async fn stop(self) {
        // First, while connections are still up: a client that reads gets its notice and
        // exit status, and every session writes its end event, also one whose client stopped
        // reading (termination wins over a blocked write). Asked again on every poll, so a
        // session that started meanwhile ends too. Sessions still live at the bound are cut
        // off with their connections; their markers give them an end at the next start.
        let waiting = tokio::time::Instant::now();
        loop {
            let live = self.services.sessions.end_all_for_stop();
            if live == 0 {
                break;
            }
            if waiting.elapsed() >= STOP_GRACE {
                tracing::warn!(live, "sessions did not end within the stop grace period; closing their connections");
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        let _ = std::fs::remove_file(admin_socket_path(&self.services.config.data_dir));
        // The sessions' last history writes (they ended as the doors stopped).
        if !self.services.history.flush(SHUTDOWN_FLUSH).await {
            tracing::warn!("the session history writes did not finish in time; the audit log has the sessions");
        }
        let _ = self.services.audit.event(&Event::GatewayStopped(GatewayStopped {}));
        let _ = self.services.audit.checkpoint(true);
        // The final checkpoint's anchor, now rather than through the keeper (stopped above).
        let last = self.services.audit.anchors().borrow().clone();
        if let Some(anchor) = &last
            && let Err(e) = self.anchors.write(anchor).await
        {
            tracing::error!(error = %e, "cannot record the audit anchor in the database");
        }
        // ... and in the object store (bounded: a store that is down does not hold the stop).
        if let (Some(anchor), Some(shipper)) = (last, &self.services.shipper) {
            let anchor = s3_anchor(&self.services.audit, anchor);
            match tokio::time::timeout(STOP_GRACE, shipper.put_anchor(&anchor)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot upload the audit anchor to the object store")
                }
                Err(_) => tracing::warn!("the object store did not take the audit anchor in time"),
            }
        }
        // A cluster gateway ships its log whole as it stops (it continues in a new segment at
        // its next start), with the recordings of the sessions that just ended, so the bucket
        // holds every gateway's complete chain (`postern audit verify --bucket`). Bounded: a
        // store that is down does not hold the stop; what is left goes up at the next start.
        if let (Some(_), Some(shipper)) = (self.services.config.gateway_id(), &self.services.shipper) {
            let mut todo: Vec<(Kind, PathBuf)> = crate::audit::segments(self.services.audit.dir())
                .unwrap_or_default()
                .into_iter()
                .map(|(_, p)| (Kind::Segment, p))
                .collect();
            todo.extend(upload_candidates(&self.services, true).into_iter().filter(|(k, _)| *k == Kind::Recording));
            match tokio::time::timeout(STOP_GRACE, shipper.ship_now(&todo)).await {
                Ok(Ok(n)) => info!(uploaded = n, "the audit log and recordings are in the object store"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot ship the audit log at stop; it goes up at the next start")
                }
                Err(_) => {
                    tracing::warn!("the object store did not take the audit log in time; it goes up at the next start")
                }
            }
        }
        info!("gateway stopped");
    }
}

/// How long a stopping gateway waits for queued session history writes.
const SHUTDOWN_FLUSH: std::time::Duration = std::time::Duration::from_secs(5);

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
fn apply_retention(state: &Services, keep: Retention) {
    let uploaded = |kind: Kind, path: &Path| state.shipper.as_ref().is_none_or(|s| s.is_uploaded(kind, path));
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
                && (session.starts_with("pending-") || uploaded(Kind::Recording, &path))
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
            if !older_than(&meta, keep) || !uploaded(Kind::Segment, path) || std::fs::remove_file(path).is_err() {
                break;
            }
            segments += 1;
            segment_bytes += meta.len();
            through = next_first.saturating_sub(1);
        }
    }
    if deleted > 0 || segments > 0 {
        info!(deleted_recordings = deleted, deleted_segments = segments, "retention deleted old audit data");
        let _ = state.audit.event(&Event::AuditRetention(AuditRetention {
            deleted_recordings: deleted,
            bytes,
            older_than_secs: keep.recordings.map(|k| k.as_secs()),
            segments: (segments > 0).then(|| SegmentsDeleted {
                deleted_segments: segments,
                segment_bytes,
                deleted_through_seq: through,
                log_older_than_secs: keep.log.map(|k| k.as_secs()),
            }),
        }));
    }
}

/// Files that are complete and may be uploaded: closed log segments, and (`with_recordings`:
/// a full scan, which lists the recordings directory) recordings of sessions that are not
/// live (finished, or orphaned by a crash).
fn upload_candidates(state: &Services, with_recordings: bool) -> Vec<(Kind, PathBuf)> {
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
async fn retention(state: Arc<Services>, keep: Retention, shutdown: CancellationToken) {
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

/// `https://host:port` as browsers reach the console: `[web] public_url`, else `[ssh]
/// public_host` (or the listen address; `localhost` for an unspecified one) and the port.
fn web_origin(config: &GatewayConfig, bound: std::net::SocketAddr) -> String {
    if let Some(url) = &config.web.public_url {
        return url.trim_end_matches('/').to_owned();
    }
    let host = match (&config.ssh.public_host, bound.ip()) {
        (Some(h), _) => h.clone(),
        (None, ip) if ip.is_unspecified() => "localhost".to_owned(),
        (None, std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
        (None, ip) => ip.to_string(),
    };
    if bound.port() == 443 { format!("https://{host}") } else { format!("https://{host}:{}", bound.port()) }
}

/// The console's TLS: `[web] cert_file`/`key_file`, else a certificate from the gateway's
/// CA for the origin's host (valid 90 days; made again at every start).
fn web_tls(
    config: &GatewayConfig,
    ca: &postern_tunnel::pki::CertAuthority,
    origin: &str,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls_pki_types::pem::PemObject;
    let (chain, key) = match (&config.web.cert_file, &config.web.key_file) {
        (Some(cert), Some(key)) => {
            let chain = rustls_pki_types::CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("[web] cert_file {}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("[web] cert_file {}", cert.display()))?;
            let key = rustls_pki_types::PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("[web] key_file {}", key.display()))?;
            (chain, key)
        }
        _ => {
            let host = origin
                .trim_start_matches("https://")
                .rsplit_once(':')
                .map(|(h, _)| h)
                .unwrap_or(origin.trim_start_matches("https://"));
            let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
            let key = rcgen::KeyPair::generate().context("web console key")?;
            let cert = ca
                .issue_web_cert(&key, &[host], std::time::Duration::from_secs(90 * 86400))
                .context("web console certificate")?;
            (vec![cert], postern_tunnel::pki::private_key_der(&key))
        }
    };
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("web console TLS")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("web console certificate and key")?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// Certificates the gateway signed are kept (to be revocable) until they expire: forget the
/// expired ones at start and then every hour.
async fn forget_expired_certificates(state: Arc<Services>, shutdown: CancellationToken) {
    loop {
        match state.store.prune_certificates(postern_core::util::now_unix()).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(forgotten = n, "expired user certificates forgotten"),
            Err(e) => postern_tunnel::warn_limited!(error = %e, "cannot forget expired user certificates"),
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

/// Before the log is continued: does it still reach the last checkpoint the gateway signed
/// (the anchor in the store)? `Some(event)` when it does not; `accepted` when
/// `[audit] accept_truncation` names the seq of that checkpoint.
async fn check_audit_anchor(
    anchors: &AnchorBook,
    dir: &Path,
    keyring: &crate::audit::seal::Keyring,
    accept: Option<u64>,
) -> anyhow::Result<Option<AuditTruncated>> {
    let Some(anchor) = anchors.read().await.context("reading the audit anchor from the database")? else {
        return Ok(None);
    };
    let standing = crate::audit::anchor::check(dir, keyring, &anchor).with_context(|| {
        format!("cannot continue the audit chain: checking the log in {} against its anchor", dir.display())
    })?;
    let log_seq = match standing {
        Standing::Reaches => return Ok(None),
        Standing::Shorter { log_seq } | Standing::Differs { log_seq } => log_seq,
    };
    Ok(Some(AuditTruncated {
        log_seq,
        anchor_seq: anchor.seq,
        anchor_hash: anchor.hash.clone(),
        reason: standing.describe(&anchor),
        accepted: accept == Some(anchor.seq),
    }))
}

/// The anchor as uploaded: the checkpoint, the signing key's id and the time.
fn s3_anchor(audit: &AuditLog, anchor: crate::audit::anchor::AuditAnchor) -> crate::audit::ship::S3Anchor {
    crate::audit::ship::S3Anchor {
        v: 1,
        seq: anchor.seq,
        hash: anchor.hash,
        key_id: audit.key_id(),
        time: postern_core::util::rfc3339(postern_core::util::now_unix()),
    }
}

/// Keep the last checkpoint the log wrote in the object store too (`[audit.s3]`), as it is
/// written. One upload at a time, and the latest wins: checkpoints written meanwhile are
/// skipped (the watch holds only the newest). A failed upload is retried with backoff, with
/// whatever is newest by then; the first failure and the recovery are logged.
async fn ship_audit_anchor(
    audit: Arc<AuditLog>,
    shipper: Arc<crate::audit::ship::Shipper>,
    shutdown: CancellationToken,
) {
    let mut anchors = audit.anchors();
    anchors.mark_changed();
    let mut failing = false;
    let mut backoff = std::time::Duration::from_secs(1);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = anchors.changed() => if changed.is_err() { return },
        }
        loop {
            let Some(anchor) = anchors.borrow_and_update().clone() else { break };
            match shipper.put_anchor(&s3_anchor(&audit, anchor)).await {
                Ok(()) => {
                    if std::mem::take(&mut failing) {
                        tracing::info!("the audit anchor reaches the object store again");
                    }
                    backoff = std::time::Duration::from_secs(1);
                    break;
                }
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(error = %format!("{e:#}"), "cannot upload the audit anchor to the object store; retrying");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(60));
                }
            }
        }
    }
}

/// Keep the last checkpoint the log wrote in the store, as it is written.
async fn keep_audit_anchor(audit: Arc<AuditLog>, store: AnchorBook, shutdown: CancellationToken) {
    let mut anchors = audit.anchors();
    anchors.mark_changed();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = anchors.changed() => if changed.is_err() { return },
        }
        let anchor = anchors.borrow_and_update().clone();
        if let Some(anchor) = anchor
            && let Err(e) = store.write(&anchor).await
        {
            postern_tunnel::error_limited!(error = %e, seq = anchor.seq, "cannot record the audit anchor in the database");
        }
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

/// The services, wired together (each takes only the others it needs).
#[allow(clippy::too_many_arguments)]
fn build_services(
    config: GatewayConfig,
    addresses: Addresses,
    store: Arc<dyn Store>,
    audit: Arc<AuditLog>,
    keyring: crate::audit::seal::Keyring,
    shipper: Option<Arc<crate::audit::ship::Shipper>>,
    access: Arc<AccessList>,
    sessions: Arc<SessionTable>,
    history: Arc<SessionHistory>,
    host_keys: Arc<crate::hostkeys::HostKeys>,
    registry: postern_tunnel::server::AgentRegistry,
    ca: Arc<postern_tunnel::pki::CertAuthority>,
    rdp_key: Option<[u8; 32]>,
    peers: Option<Arc<postern_tunnel::peer::PeerClient>>,
    locations: Arc<crate::locations::AgentLocations>,
    user_ca: Arc<crate::hostkeys::UserCa>,
    shutdown: CancellationToken,
) -> anyhow::Result<Services> {
    let authorizer = Arc::new(Authorizer::new(access.clone(), store.clone(), sessions.clone()));
    let access_changed = Arc::new(tokio::sync::Notify::new());
    let certifier = crate::certs::Certifier::new(user_ca, store.clone(), config.cert_ttl());
    let web_signin = addresses.web.map(|a| {
        let (session_ttl, link_ttl) = config.web_ttls();
        (Arc::new(crate::web_signin::WebSignIn::new(link_ttl, session_ttl)), web_origin(&config, a))
    });
    let sso = match &config.identity.oidc {
        Some(oidc) => {
            let ssh_port = addresses.ssh.map(|a| a.port()).unwrap_or(config.ssh.listen.port());
            let known_hosts =
                host_keys.known_hosts_line(&crate::addressing::known_hosts_patterns(&config, ssh_port))?;
            Some(Arc::new(crate::sso::Sso::new(
                Arc::new(crate::oidc::Oidc::new(oidc)?),
                certifier.clone(),
                store.clone(),
                access.clone(),
                access_changed.clone(),
                audit.clone(),
                oidc.link_existing,
                known_hosts,
            )))
        }
        None => None,
    };
    let advertised = if !config.tunnel.advertise.is_empty() {
        config.tunnel.advertise.clone()
    } else if addresses.tunnel.ip().is_unspecified() {
        vec![format!("{}:{}", postern_tunnel::agent::hostname(), addresses.tunnel.port())]
    } else {
        vec![addresses.tunnel.to_string()]
    };
    let rdp_door = addresses.rdp.map(|a| crate::addressing::rdp_public_address(&config, a.port()));
    let peering = match (config.gateway_id(), peers) {
        (Some(id), Some(client)) => {
            let address =
                config.cluster.peer_address.clone().or_else(|| advertised.first().cloned()).unwrap_or_default();
            Some(Arc::new(crate::peering::Peering::new(id.to_owned(), address, store.clone(), client)))
        }
        _ => None,
    };
    let cluster_sessions =
        config.gateway_id().map(|id| Arc::new(ClusterSessions::new(id.to_owned(), store.clone(), sessions.clone())));
    let mut rdp_tokens = RdpTokens::new(authorizer.clone(), audit.clone(), config.rdp_token_ttl(), rdp_door)?;
    if let Some(key) = rdp_key {
        // The cluster's key: a token issued at one gateway is checked at any other.
        rdp_tokens = rdp_tokens.with_signing_key(&key)?;
    }
    if config.gateway_id().is_some() {
        // A token may be redeemed at any gateway of the cluster: spent ones are kept in the store.
        rdp_tokens = rdp_tokens.spent_in(store.clone());
    }
    let reload = Arc::new(crate::reload::ConfigReload::new(
        access.clone(),
        access_changed.clone(),
        audit.clone(),
        webhooks_dead_letter(&config.data_dir),
        shutdown,
    ));
    Ok(Services {
        recording: crate::recording::RecordingOptions {
            keyring,
            input: config.audit.record_input,
            max_bytes: config.audit.max_recording_bytes,
        },
        space: std::sync::Arc::new(crate::recording::space::SpaceGuard::new(config.audit.min_free_space()?)),
        instances: Instances::new(store.clone(), audit.clone(), registry.clone(), ca, advertised, locations.clone()),
        broker: Broker::new(registry, sessions.clone(), audit.clone(), history.clone())
            .with_peering(peering)
            .with_locations(locations),
        runs: Runs::new(audit.clone()),
        rdp_tokens,
        manage: Manage::new(
            store.clone(),
            access.clone(),
            audit.clone(),
            sessions.clone(),
            history.clone(),
            access_changed.clone(),
        )
        .with_shipper(shipper.clone())
        .with_cluster(cluster_sessions.clone())
        .with_certifier(certifier.clone()),
        certifier,
        sso,
        web_signin,
        cluster_sessions,
        config: Arc::new(config),
        addresses,
        store,
        audit,
        shipper,
        access,
        authorizer,
        sessions,
        history,
        connections: Arc::new(crate::connections::Connections::default()),
        host_keys,
        reload,
        access_changed,
    })
}

/// Raise the soft limit on open files to the hard limit: every connection is a descriptor,
/// and the usual soft limit (1024) is soon reached. Logs the limit in force.
fn raise_nofile_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit { current: limit.maximum, maximum: limit.maximum };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, soft = ?limit.current, hard = ?limit.maximum, "cannot raise the open files limit");
        }
    }
    let now = getrlimit(Resource::Nofile);
    let show = |v: Option<u64>| v.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
    info!(soft = %show(now.current), hard = %show(now.maximum), "open files limit (RLIMIT_NOFILE)");
}

pub async fn start(config: GatewayConfig) -> anyhow::Result<RunningGateway> {
    raise_nofile_limit();
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
    let reset_key = load_or_create_reset_key(&dir)?;
    let store = match config.gateway_id() {
        Some(_) => open_store_when_reachable(config.store.url.as_deref(), &dir).await,
        None => crate::store::open(config.store.url.as_deref(), &dir).await?,
    };
    // A cluster's gateways share their keys through the store (crate::cluster); a single
    // gateway makes its own in the data directory.
    let cluster = match config.gateway_id() {
        Some(id) => {
            let keyring = crate::cluster::keyring(&config.cluster)?;
            let keys = crate::cluster::load(store.as_ref(), &keyring).await?;
            info!(gateway_id = id, agent_ca = %keys.agent_ca.pin(), "loaded the cluster keys from the store");
            Some(keys)
        }
        None => None,
    };
    let (ca, signing_key) = match &cluster {
        Some(keys) => (
            keys.agent_ca.clone(),
            crate::audit::signing_key(
                &keys.audit_signing,
                "the cluster audit signing key",
                &dir.join("audit-signing.pub"),
            )?,
        ),
        None => (
            Arc::new(load_or_create_ca(&dir)?),
            crate::audit::load_or_create_signing_key(&dir.join("audit-signing.key"))?,
        ),
    };
    let anchors = AnchorBook {
        store: store.clone(),
        gateway_id: config.gateway_id().map(str::to_owned),
        public_key: postern_core::util::hex(ring::signature::KeyPair::public_key(&signing_key).as_ref()),
    };
    let keyring = config.audit.encryption.keyring()?;
    let log_options = crate::audit::LogOptions {
        rotate_bytes: config.audit.rotate_bytes,
        rotate_after: crate::config::parse_limit(&config.audit.rotate_after).context("[audit] rotate_after")?,
        keyring: keyring.clone(),
        gateway_id: config.gateway_id().map(str::to_owned),
    };
    migrate_single_file_log(&dir)?;
    let truncated = check_audit_anchor(&anchors, &dir.join("audit"), &keyring, config.audit.accept_truncation).await?;
    let audit =
        Arc::new(AuditLog::open_signed(&dir.join("audit"), signing_key, log_options).context("opening the audit log")?);
    if let Some(t) = truncated {
        // Written (not signed) into the short log, so the gap stays on record either way.
        let _ = audit.event(&Event::AuditTruncated(t.clone()));
        if !t.accepted {
            anyhow::bail!(
                "refusing to continue the audit log in {}: {}.\n\
                 The end of the log was removed (or an older copy was restored), and continuing would sign \
                 over the gap. Restore the log from a backup or from [audit.s3] into that directory and start \
                 again; `postern audit verify` shows what is missing. To go on with the shorter log anyway \
                 (it keeps an audit.truncated event), set `accept_truncation = {}` in [audit].",
                dir.join("audit").display(),
                t.reason,
                t.anchor_seq
            );
        }
        tracing::warn!(
            log_seq = t.log_seq,
            anchor_seq = t.anchor_seq,
            "audit log truncation accepted by [audit] accept_truncation"
        );
        audit.checkpoint(true).context("writing a checkpoint after the accepted truncation")?;
    }
    audit.set_stdout(config.audit.stdout);
    let locations =
        Arc::new(crate::locations::AgentLocations::new(store.clone(), config.gateway_id().map(str::to_owned)));
    let directory =
        Arc::new(StoreDirectory::new(store.clone(), audit.clone(), config.refusal_interval(), locations.clone()));
    let settings = TunnelSettings {
        agent_cert_ttl: config.agent_cert_ttl()?,
        max_agents: config.tunnel.max_agents,
        max_enrollments: config.tunnel.max_enrollments,
        max_enrollments_per_source: config.tunnel.max_enrollments_per_source,
        gateway_id: config.gateway_id().map(str::to_owned),
        tcp_listen: config.tunnel.tcp_address()?,
        ..TunnelSettings::default()
    };
    let server = TunnelServer::bind(config.tunnel.listen, ca.clone(), directory.clone(), settings, &reset_key)
        .with_context(|| format!("listening for agents on {} (is another gateway running?)", config.tunnel.listen))?;
    let tunnel_addr = server.local_addr()?;
    let tunnel_tcp = server.tcp_addr();
    let access = Arc::new(AccessList::from_config(&config.ssh)?);
    access.reload(store.as_ref()).await.context("loading users, policies and grants")?;
    if let Some(names) = &config.ssh.ciphers {
        crate::ssh::ciphers(names)?;
    }
    let user_ca = Arc::new(match &cluster {
        Some(keys) => crate::hostkeys::UserCa::with_key(keys.user_ca.clone()),
        None => crate::hostkeys::UserCa::load(&dir)?,
    });
    access.trust_user_ca(&user_ca.public_key());
    let principals = crate::addressing::host_principals(&config);
    let host_keys = Arc::new(match &cluster {
        Some(keys) => crate::hostkeys::HostKeys::with_ca(keys.host_ca.clone(), &dir, &principals)?,
        None => crate::hostkeys::HostKeys::load(&dir, &principals)?,
    });
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
    let web_listener = if config.web.enabled {
        Some(tokio::net::TcpListener::bind(config.web.listen).await.with_context(|| {
            format!("listening for the web console on tcp {} (port in use? set [web] listen)", config.web.listen)
        })?)
    } else {
        None
    };
    let web_addr = web_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    let metrics_listener = match config.metrics.listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("listening for metrics on tcp {a} (port in use? set [metrics] listen)"))?,
        ),
        None => None,
    };
    let sessions = Arc::new(
        SessionTable::with_markers(dir.join("live-sessions"))
            .with_context(|| format!("creating {}", dir.join("live-sessions").display()))?,
    );
    let history = SessionHistory::start_as(
        store.clone(),
        audit.clone(),
        HistoryRetention {
            max_age: crate::config::parse_limit(&config.audit.history_retention)
                .context("[audit] history_retention")?,
            max_rows: Some(config.audit.history_max_rows).filter(|n| *n > 0),
        },
        config.gateway_id().map(str::to_owned),
    );
    sessions.close_orphans(&audit, &history);
    let shipper = config
        .audit
        .s3
        .as_ref()
        .map(|c| crate::audit::ship::Shipper::new(c, &dir).map(|s| Arc::new(s.for_gateway(config.gateway_id()))))
        .transpose()?;
    let addresses = Addresses { tunnel: tunnel_addr, tunnel_tcp, ssh: ssh_addr, rdp: rdp_addr, web: web_addr };
    let shutdown = CancellationToken::new();
    let services = Arc::new(build_services(
        config,
        addresses,
        store,
        audit,
        keyring,
        shipper,
        access,
        sessions,
        history,
        host_keys,
        server.registry(),
        ca,
        cluster.as_ref().map(|k| k.rdp_token),
        server.peers(),
        locations.clone(),
        user_ca,
        shutdown.clone(),
    )?);
    let state = services.clone();
    let hooks = crate::audit::webhooks::Webhooks::start(
        &state.config.audit.webhooks,
        webhooks_dead_letter(&dir),
        shutdown.clone(),
    )?;
    state.audit.set_webhooks(hooks);
    let tasks = tokio_util::task::TaskTracker::new();
    let listener = crate::admin::bind(&admin_socket_path(&dir))?;
    tasks.spawn(server.serve(shutdown.clone()));
    tasks.spawn(directory.summarise_refusals(shutdown.clone()));
    tasks.spawn(locations.keep_leases(state.instances.registry().clone(), shutdown.clone()));
    tasks.spawn(crate::enforcer::enforce(
        state.audit.clone(),
        state.authorizer.clone(),
        state.sessions.clone(),
        state.store.clone(),
        state.connections.clone(),
        state.access_changed.clone(),
        shutdown.clone(),
    ));
    if let Some(peering) = state.broker.peering() {
        tasks.spawn(peering.clone().keep_lease(shutdown.clone()));
    }
    if let Some(cluster) = state.cluster_sessions.clone() {
        tasks.spawn(cluster.run(shutdown.clone()));
    }
    tasks.spawn(checkpoints(state.audit.clone(), shutdown.clone()));
    tasks.spawn(keep_audit_anchor(state.audit.clone(), anchors.clone(), shutdown.clone()));
    if let Some(shipper) = state.shipper.clone() {
        let st = state.clone();
        tasks.spawn(ship_audit_anchor(state.audit.clone(), shipper.clone(), shutdown.clone()));
        tasks.spawn(shipper.run(move |full| upload_candidates(&st, full), state.audit.clone(), shutdown.clone()));
    }
    if keep.recordings.is_some() || keep.log.is_some() {
        tasks.spawn(retention(state.clone(), keep, shutdown.clone()));
    }
    tasks.spawn(forget_expired_certificates(state.clone(), shutdown.clone()));
    tasks.spawn(crate::admin::serve(listener, state.clone(), shutdown.clone()));
    if let Some(l) = ssh_listener {
        tasks.spawn(crate::ssh::serve(l, state.clone(), shutdown.clone()));
    }
    if let Some(l) = rdp_listener {
        tasks.spawn(crate::rdp::serve(l, state.clone(), shutdown.clone()));
    }
    if let (Some(l), Some((signin, origin))) = (web_listener, state.web_signin.clone()) {
        let tls = web_tls(&state.config, state.instances.ca(), &origin)?;
        let web = Arc::new(crate::web::Web::new(signin, origin, tls));
        tasks.spawn(crate::web::serve(l, state.clone(), web, shutdown.clone()));
    }
    if let Some(l) = metrics_listener {
        info!(metrics = %l.local_addr()?, "serving metrics and health checks");
        tasks.spawn(crate::monitor::serve(l, state.clone(), shutdown.clone()));
    }
    let _ = state.audit.event(&Event::GatewayStarted(GatewayStarted {
        tunnel: tunnel_addr.to_string(),
        ssh: ssh_addr.map(|a| a.to_string()),
        rdp: rdp_addr.map(|a| a.to_string()),
        ca_pin: state.instances.ca().pin(),
        gateway_id: state.config.gateway_id().map(str::to_owned),
    }));
    info!(tunnel = %tunnel_addr, data_dir = %dir.display(), ca_pin = %state.instances.ca().pin(), "gateway started");
    Ok(RunningGateway { services, shutdown, tasks, anchors })
}
