//! Agent side of the tunnel: enrollment (`join`), the dial loop with backoff, renewal, and
//! dispatch of session streams to the local services.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, anyhow, bail};
use postern_proto::{EnrollRequest, ErrorCode, Hello, Message, RenewRequest, StreamKind, read_frame, write_frame};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span};

use crate::pki::{cert_info, der_to_pem, new_key_and_csr, pem_to_der, renewal_time};
use crate::services::{LocalLimits, serve_session};
use crate::tls::TransportTimers;
use crate::transport::{Connection, RecvStream, SendStream, Transport};

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

const STATE_FILE: &str = "agent.toml";
/// The agent's private key followed by its certificate, in one file so that renewal
/// replaces both in a single atomic rename.
pub(crate) const IDENTITY_FILE: &str = "identity.pem";
pub(crate) const CA_FILE: &str = "ca.crt";

/// What `join` stores next to the key and certificates.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentState {
    /// The first gateway address (the only one before agents knew several; kept so that a
    /// state file stays readable by older agents).
    pub gateway: String,
    pub agent_id: String,
    pub name: String,
    pub ca_pin: String,
    /// Every gateway address given at join time, in order (absent in state files written
    /// before there could be several: then `gateway` is the one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
}

impl AgentState {
    /// The addresses to dial, in order.
    pub fn addresses(&self) -> Vec<String> {
        if self.gateways.is_empty() { vec![self.gateway.clone()] } else { self.gateways.clone() }
    }
}

/// Reconnect policy: exponential backoff with jitter, reset after a stable connection.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    /// A connection that stayed up this long resets the backoff.
    pub stable_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { initial: Duration::from_millis(200), max: Duration::from_secs(4), stable_after: Duration::from_secs(30) }
    }
}

impl Backoff {
    /// Delay before attempt `n` (0-based): "equal jitter", half fixed, half random, so a
    /// restarted gateway is not hit by every agent in the same instant.
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self.initial.saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX)).min(self.max);
        let half = exp / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

/// Where the dial loop is in its backoff: each round (every address tried once, or a
/// connection that was up and ended) is followed by the next delay; a connection that
/// lasted [`Backoff::stable_after`] starts the schedule again.
#[derive(Debug, Clone)]
pub struct Retry {
    backoff: Backoff,
    attempt: u32,
}

impl Retry {
    pub fn new(backoff: Backoff) -> Self {
        Self { backoff, attempt: 0 }
    }

    /// A connection was up for `up`, then ended.
    pub fn connection_ended(&mut self, up: Duration) {
        if up >= self.backoff.stable_after {
            self.attempt = 0;
        }
    }

    /// How long to wait before the next round.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.backoff.delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }
}

pub fn platform() -> String {
    format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH)
}

pub fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "unknown".into())
}

/// Write a file readable only by its owner, atomically (write to a temporary, then rename).
pub fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(data).with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} into place", tmp.display()))?;
    Ok(())
}

/// The gateway's tunnel port when an address names none (`postern gateway`'s default).
pub const DEFAULT_GATEWAY_PORT: u16 = 4433;

/// `HOST`, `HOST:PORT`, `[V6]`, `[V6]:PORT` or a bare IPv6 address, with
/// [`DEFAULT_GATEWAY_PORT`] added where no port is given.
pub fn with_default_port(addr: &str) -> String {
    let addr = addr.trim();
    if let Some(rest) = addr.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((_, "")) => format!("{addr}:{DEFAULT_GATEWAY_PORT}"),
            _ => addr.to_owned(),
        };
    }
    match addr.matches(':').count() {
        0 => format!("{addr}:{DEFAULT_GATEWAY_PORT}"),
        1 => addr.to_owned(),
        // A bare IPv6 address.
        _ => format!("[{addr}]:{DEFAULT_GATEWAY_PORT}"),
    }
}

/// One address to dial: a socket address and the gateway address it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// As given to `join --gateway` (a name may stand for several candidates).
    pub gateway: String,
    pub addr: SocketAddr,
    /// False for a name this host could not resolve, kept because a proxy can reach it
    /// (then `addr` is unspecified and only the TCP transport through the proxy is tried).
    pub resolved: bool,
}

/// How long resolving one gateway name may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Every socket address of every gateway address, in order, without repeats: a DNS name
/// with several addresses gives several candidates. Names that do not resolve are left out
/// with their error, so one bad name does not stop the agent reaching the others.
pub async fn resolve_all(gateways: &[String]) -> (Vec<Candidate>, Vec<String>) {
    resolve_for(gateways, false).await
}

/// [`resolve_all`]; with `proxied`, a name that does not resolve here is still a candidate
/// (the proxy resolves it).
pub(crate) async fn resolve_for(gateways: &[String], proxied: bool) -> (Vec<Candidate>, Vec<String>) {
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut errors = Vec::new();
    for gateway in gateways {
        match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(gateway.as_str())).await {
            Ok(Ok(addrs)) => {
                let mut any = false;
                for addr in addrs {
                    any = true;
                    if !candidates.iter().any(|c| c.addr == addr) {
                        candidates.push(Candidate { gateway: gateway.clone(), addr, resolved: true });
                    }
                }
                if !any {
                    errors.push(format!("gateway address {gateway} resolved to nothing"));
                }
            }
            Ok(Err(e)) => errors.push(format!("resolving gateway address {gateway}: {e}")),
            Err(_) => errors.push(format!("resolving gateway address {gateway} timed out")),
        }
        if proxied && !candidates.iter().any(|c| &c.gateway == gateway) {
            let addr = SocketAddr::from(([0, 0, 0, 0], 0));
            candidates.push(Candidate { gateway: gateway.clone(), addr, resolved: false });
        }
    }
    (candidates, errors)
}

#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// Gateway addresses (`HOST:PORT`), tried in order; every gateway of a cluster shares
    /// the agent CA, so enrolling at any one of them is enough.
    pub gateways: Vec<String>,
    pub token: String,
    pub ca_pin: String,
    pub state_dir: PathBuf,
    /// Transports and proxy, as for `run`.
    pub route: crate::dial::Route,
}

/// Enroll with a single-use token. Only a CSR leaves this machine; the key stays in
/// `state_dir` with mode 0600. The addresses are tried in order (each name with all its DNS
/// addresses); the token goes to the first gateway that completes a handshake presenting the
/// pinned CA, and what that gateway answers is final.
pub async fn join(opts: &JoinOptions) -> anyhow::Result<AgentState> {
    let pin = crate::pki::parse_pin(&opts.ca_pin).map_err(|e| anyhow!(e))?;
    let Some(first) = opts.gateways.first() else { bail!("no gateway address given (--gateway HOST[:PORT])") };
    std::fs::create_dir_all(&opts.state_dir)
        .with_context(|| format!("creating state directory {}", opts.state_dir.display()))?;
    set_dir_private(&opts.state_dir)?;
    let (candidates, mut failures) = resolve_for(&opts.gateways, opts.route.proxy.is_some()).await;
    let (key, csr) = new_key_and_csr()?;
    let timers = TransportTimers::default();
    let clients = crate::dial::Clients {
        quic: crate::tls::agent_enroll_config(&pin, timers)?,
        tls: Arc::new(crate::tls::agent_enroll_tls(&pin)?),
        sessions: 0,
    };
    let mut answered = None;
    let mut memory = crate::dial::QuicMemory::default();
    for candidate in &candidates {
        match crate::dial::dial(&opts.route, &clients, candidate, timers, &mut memory).await {
            Ok(found) => {
                answered = Some((found, candidate.clone()));
                break;
            }
            Err(e) => {
                debug!(gateway = %candidate.gateway, address = %candidate.addr, error = %format!("{e:#}"), "enrollment candidate failed");
                failures.push(format!("{e:#}"));
            }
        }
    }
    let Some((dialed, candidate)) = answered else {
        if failures.iter().any(|f| f.contains(crate::tls::PIN_MISMATCH)) {
            bail!(
                "{}: this is not the gateway you meant, or the pin is wrong ({})",
                crate::tls::PIN_MISMATCH,
                failures.join("; ")
            );
        }
        bail!("no gateway answered (is it running, are its UDP and TCP ports reachable?): {}", failures.join("; "));
    };
    let conn = &dialed.conn;
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await.context("opening enrollment stream")?;
        write_frame(
            &mut send,
            &Message::EnrollRequest(EnrollRequest {
                token: opts.token.trim().to_owned(),
                csr_der: csr,
                hostname: hostname(),
                platform: platform(),
                agent_version: AGENT_VERSION.into(),
            }),
        )
        .await?;
        let _ = send.finish();
        let reply = read_frame(&mut recv, StreamKind::Enroll).await.context("reading enrollment reply")?;
        conn.close(0, b"enrolled");
        Ok::<_, anyhow::Error>(reply)
    };
    let reply = tokio::time::timeout(Duration::from_secs(20), exchange).await.map_err(|_| {
        anyhow!("gateway {} ({}) did not answer the enrollment within 20 s", candidate.gateway, candidate.addr)
    })??;
    dialed.wait_idle().await;
    let resp = match reply {
        Some(Message::EnrollResponse(r)) => r,
        Some(Message::Error(e)) => bail!("enrollment refused: {}", explain_refusal(e.code, &e.message)),
        other => bail!("unexpected enrollment reply: {other:?}"),
    };
    if crate::pki::ca_pin(&resp.ca_der) != pin {
        bail!("{}: the gateway returned a different CA than it presented", crate::tls::PIN_MISMATCH);
    }
    info!(gateway = %candidate.gateway, address = %candidate.addr, transport = %conn.transport(), "enrolled");
    write_identity(&opts.state_dir, &key, &resp.cert_der)?;
    write_private(&opts.state_dir.join(CA_FILE), der_to_pem(&resp.ca_der).as_bytes())?;
    let gateways = if opts.gateways.len() > 1 { opts.gateways.clone() } else { Vec::new() };
    let state = AgentState { gateway: first.clone(), agent_id: resp.agent_id, name: resp.name, ca_pin: pin, gateways };
    write_private(&opts.state_dir.join(STATE_FILE), toml::to_string(&state)?.as_bytes())?;
    Ok(state)
}

fn write_identity(dir: &Path, key: &rcgen::KeyPair, cert_der: &[u8]) -> anyhow::Result<()> {
    let mut pem = key.serialize_pem();
    pem.push_str(&der_to_pem(cert_der));
    write_private(&dir.join(IDENTITY_FILE), pem.as_bytes())
}

/// The current certificate's details, for `postern-agent status`.
pub fn identity_info(state_dir: &Path) -> anyhow::Result<crate::pki::CertInfo> {
    let path = state_dir.join(IDENTITY_FILE);
    let pem = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    Ok(cert_info(&pem_to_der(&pem)?)?)
}

fn explain_refusal(code: ErrorCode, message: &str) -> String {
    let hint = match code {
        ErrorCode::TokenExpired => " (ask an admin for a new token: postern token create)",
        ErrorCode::TokenUsed => " (tokens are single-use; ask an admin for a new one)",
        ErrorCode::TokenUnknown => " (check that the token was copied completely)",
        _ => "",
    };
    format!("{message}{hint}")
}

fn set_dir_private(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting permissions of {}", dir.display()))
}

pub fn load_state(state_dir: &Path) -> anyhow::Result<AgentState> {
    let path = state_dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("reading {} (has this agent joined? run `postern-agent join` first)", path.display())
    })?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Options of `postern-agent run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub state_dir: PathBuf,
    /// Overrides the gateway addresses stored at join time (empty: use those).
    pub gateways: Vec<String>,
    pub limits: LocalLimits,
    pub backoff: Backoff,
    pub timers: TransportTimers,
    /// Transports and proxy.
    pub route: crate::dial::Route,
}

enum Ended {
    /// Connection was up and then ended; how long it lasted.
    After(Duration),
    Shutdown,
}

/// Keep a connection to a gateway until `shutdown`. Returns an error only for conditions
/// retrying cannot fix (no state, revoked agent, expired certificate).
///
/// With several candidate addresses (several `--gateway`, or a name with several DNS
/// addresses) the agent fails over: a round tries each candidate once, starting after the
/// one it was last connected to, and rounds are separated by the backoff ([`Retry`]). So a
/// lost connection moves the agent to the next gateway at once, and a dead cluster is not
/// hammered. It stays where it is while its connection lives (no moving back).
///
/// Each candidate is dialled as [`crate::dial::dial`] says: QUIC, then TCP when UDP does
/// not get through; on TCP under `auto`, QUIC is tried again every `quic_retry` while no
/// session is open, and the agent moves back when it answers.
pub async fn run(opts: RunOptions, shutdown: CancellationToken) -> anyhow::Result<()> {
    let state = load_state(&opts.state_dir)?;
    let gateways = if opts.gateways.is_empty() { state.addresses() } else { opts.gateways.clone() };
    let sessions = Arc::new(Semaphore::new(opts.limits.max_sessions));
    let limits = Arc::new(opts.limits.clone());
    let mut retry = Retry::new(opts.backoff);
    let mut memory = crate::dial::QuicMemory::default();
    // Where the next round starts: after the candidate last connected to.
    let mut start: usize = 0;
    let proxy = opts.route.proxy.as_ref().map(|p| p.to_string()).unwrap_or_else(|| "none".into());
    info!(agent_id = %state.agent_id, name = %state.name, gateways = %gateways.join(","), transport = %opts.route.choice, %proxy, "agent starting");
    loop {
        let (candidates, errors) = resolve_for(&gateways, opts.route.proxy.is_some()).await;
        for e in &errors {
            crate::warn_limited!(error = %e, "gateway address not usable this round");
        }
        // Several gateways: notice a dead one within seconds, to move to another in time.
        let timers = if candidates.len() > 1 { opts.timers.for_failover() } else { opts.timers };
        let count = candidates.len();
        for k in 0..count {
            let i = (start + k) % count;
            let Some(candidate) = candidates.get(i) else { break };
            let link =
                Link { opts: &opts, timers, candidate, limits: &limits, sessions: &sessions, shutdown: &shutdown };
            match link.connect(&mut memory).await {
                Ok(Ended::Shutdown) => return Ok(()),
                Ok(Ended::After(up)) => {
                    retry.connection_ended(up);
                    start = i + 1;
                    break;
                }
                Err(e) => {
                    if let Some(Fatal(msg)) = e.downcast_ref::<Fatal>() {
                        bail!("{msg}");
                    }
                    crate::warn_limited!(gateway = %candidate.gateway, address = %candidate.addr, error = %format!("{e:#}"), "gateway connection failed");
                }
            }
            if shutdown.is_cancelled() {
                return Ok(());
            }
        }
        let delay = retry.next_delay();
        debug!(?delay, "reconnecting after backoff");
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[derive(Debug)]
struct Fatal(String);
impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Fatal {}

/// The mutual-TLS client configurations (QUIC and TCP) built from an enrolled agent's state
/// directory.
pub fn tunnel_clients(
    dir: &Path,
    timers: TransportTimers,
    sessions: usize,
) -> anyhow::Result<(crate::dial::Clients, crate::pki::CertInfo)> {
    let sessions = u32::try_from(sessions).unwrap_or(u32::MAX);
    let read =
        |f: &str| std::fs::read_to_string(dir.join(f)).with_context(|| format!("reading {}", dir.join(f).display()));
    let ca = pem_to_der(&read(CA_FILE)?)?;
    let identity = read(IDENTITY_FILE)?;
    let cert = pem_to_der(&identity)?;
    let key = rcgen::KeyPair::from_pem(&identity).context("parsing agent key")?;
    let info = cert_info(&cert)?;
    let tls = crate::tls::agent_tunnel_tls(&ca, cert.clone(), crate::pki::private_key_der(&key))?;
    let quic = crate::tls::agent_tunnel_config(&ca, cert, crate::pki::private_key_der(&key), timers, sessions)?;
    Ok((crate::dial::Clients { quic, tls: Arc::new(tls), sessions }, info))
}

/// A connection made and greeted: the gateway acknowledged the hello.
struct Greeted {
    dialed: crate::dial::Dialed,
    ctl_send: SendStream,
    ctl_recv: RecvStream,
}

/// How a connection's service ended.
enum Served {
    Ended(Ended),
    /// QUIC works again: carry on over this connection (the gateway closes the old one).
    Moved(Box<Greeted>),
}

/// One candidate, and what serving a connection to it needs.
struct Link<'a> {
    opts: &'a RunOptions,
    timers: TransportTimers,
    candidate: &'a Candidate,
    limits: &'a Arc<LocalLimits>,
    sessions: &'a Arc<Semaphore>,
    shutdown: &'a CancellationToken,
}

impl Link<'_> {
    async fn connect(&self, memory: &mut crate::dial::QuicMemory) -> anyhow::Result<Ended> {
        let (clients, cert) = tunnel_clients(&self.opts.state_dir, self.timers, self.opts.limits.max_sessions)?;
        if cert.not_after <= SystemTime::now() {
            return Err(Fatal(format!(
                "the agent certificate expired at {:?}; enroll again with a new token (postern-agent join)",
                cert.not_after
            ))
            .into());
        }
        let dialed = crate::dial::dial(&self.opts.route, &clients, self.candidate, self.timers, memory).await?;
        let mut greeted = self.greet(dialed).await?;
        let mut renew_at = renewal_time(&cert);
        loop {
            match self.serve(greeted, &clients, &mut renew_at).await? {
                Served::Ended(ended) => return Ok(ended),
                Served::Moved(next) => {
                    memory.worked();
                    greeted = *next;
                }
            }
        }
    }

    /// Say hello on a new connection and wait for the gateway's acknowledgement.
    async fn greet(&self, dialed: crate::dial::Dialed) -> anyhow::Result<Greeted> {
        let (gateway, addr) = (&self.candidate.gateway, dialed.conn.remote_address());
        let conn = &dialed.conn;
        let (mut ctl_send, mut ctl_recv) = conn.open_bi().await.context("opening control stream")?;
        write_frame(
            &mut ctl_send,
            &Message::Hello(Hello { agent_version: AGENT_VERSION.into(), hostname: hostname(), platform: platform() }),
        )
        .await?;
        let ack =
            tokio::time::timeout(crate::server::HANDSHAKE_TIMEOUT, read_frame(&mut ctl_recv, StreamKind::Control))
                .await
                .map_err(|_| anyhow!("gateway did not acknowledge hello"))??;
        match ack {
            Some(Message::HelloAck(a)) => {
                info!(agent_id = %a.agent_id, name = %a.name, %gateway, address = %addr, transport = %conn.transport(), "connected to gateway");
            }
            Some(Message::Error(e)) if e.code == ErrorCode::AgentRevoked => {
                return Err(Fatal(format!("gateway refused this agent: {}", e.message)).into());
            }
            Some(Message::Error(e)) => bail!("gateway refused this agent: {}", e.message),
            other => bail!("unexpected reply to hello: {other:?}"),
        }
        Ok(Greeted { dialed, ctl_send, ctl_recv })
    }

    /// Whether it is worth trying QUIC again now: on TCP under `auto`, with no session open
    /// (moving closes the old connection, and its sessions with it).
    fn may_move(&self, conn: &Connection) -> bool {
        conn.transport() == Transport::Tcp
            && self.opts.route.choice == crate::dial::TransportChoice::Auto
            && self.candidate.resolved
            && self.sessions.available_permits() == self.opts.limits.max_sessions
    }

    /// Serve sessions on `greeted` until it ends, the agent stops, or QUIC answers again.
    async fn serve(
        &self,
        greeted: Greeted,
        clients: &crate::dial::Clients,
        renew_at: &mut SystemTime,
    ) -> anyhow::Result<Served> {
        let Greeted { dialed, mut ctl_send, mut ctl_recv } = greeted;
        let conn = dialed.conn.clone();
        let (gateway, addr) = (&self.candidate.gateway, conn.remote_address());
        let up_since = Instant::now();
        let tasks = tokio_util::task::TaskTracker::new();
        let mut next_probe = Instant::now() + self.opts.route.quic_retry;
        let served = loop {
            let until_renewal =
                renew_at.duration_since(SystemTime::now()).unwrap_or_default().max(Duration::from_secs(1));
            tokio::select! {
                _ = self.shutdown.cancelled() => {
                    conn.close(0, b"agent shutting down");
                    break Served::Ended(Ended::Shutdown);
                }
                reason = conn.closed() => {
                    info!(%reason, %gateway, address = %addr, "disconnected from gateway");
                    break Served::Ended(Ended::After(up_since.elapsed()));
                }
                _ = tokio::time::sleep(until_renewal) => {
                    match renew(&self.opts.state_dir, &mut ctl_send, &mut ctl_recv).await {
                        Ok(next) => *renew_at = next,
                        Err(e) => {
                            crate::warn_limited!(error = %format!("{e:#}"), "certificate renewal failed; retrying in 60 s");
                            *renew_at = SystemTime::now() + Duration::from_secs(60);
                        }
                    }
                }
                _ = tokio::time::sleep_until(next_probe.into()), if conn.transport() == Transport::Tcp => {
                    next_probe = Instant::now() + self.opts.route.quic_retry;
                    if !self.may_move(&conn) {
                        continue;
                    }
                    match crate::dial::quic(clients, self.candidate, crate::dial::QUIC_PROBE_TIMEOUT).await {
                        Ok(quic) => match self.greet(quic).await {
                            Ok(next) => {
                                info!(%gateway, "QUIC answers again; moving the tunnel back to it");
                                conn.close(0, b"moved to QUIC");
                                break Served::Moved(Box::new(next));
                            }
                            Err(e) => debug!(error = %format!("{e:#}"), "QUIC connected but the hello failed; staying on TCP"),
                        },
                        Err(e) => debug!(error = %format!("{e:#}"), "QUIC still does not answer; staying on TCP"),
                    }
                }
                stream = conn.accept_bi() => {
                    let (send, recv) = match stream {
                        Ok(s) => s,
                        Err(e) => {
                            info!(reason = %e, %gateway, address = %addr, "disconnected from gateway");
                            break Served::Ended(Ended::After(up_since.elapsed()));
                        }
                    };
                    let limits = self.limits.clone();
                    let permit = self.sessions.clone().try_acquire_owned().ok();
                    let span = info_span!("session", stream = %send.id());
                    tasks.spawn(async move {
                        serve_session(send, recv, &limits, permit).await;
                    }.instrument(span));
                }
            }
        };
        // Sessions end with the connection; give them a moment to report, then drop them.
        tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(2), tasks.wait()).await;
        if !matches!(served, Served::Moved(_)) {
            dialed.wait_idle().await;
        }
        Ok(served)
    }
}

/// Renew the certificate over the control stream with a fresh key; returns the next renewal time.
async fn renew(dir: &Path, send: &mut SendStream, recv: &mut RecvStream) -> anyhow::Result<SystemTime> {
    let (key, csr) = new_key_and_csr()?;
    write_frame(send, &Message::RenewRequest(RenewRequest { csr_der: csr })).await?;
    let reply = tokio::time::timeout(crate::server::HANDSHAKE_TIMEOUT, read_frame(recv, StreamKind::Control))
        .await
        .map_err(|_| anyhow!("gateway did not answer the renewal"))??;
    let cert = match reply {
        Some(Message::RenewResponse(r)) => r.cert_der,
        Some(Message::Error(e)) => bail!("renewal refused: {}", e.message),
        other => bail!("unexpected renewal reply: {other:?}"),
    };
    let info = cert_info(&cert)?;
    write_identity(dir, &key, &cert)?;
    info!(serial = %info.serial_hex, not_after = ?info.not_after, "certificate renewed");
    Ok(renewal_time(&info))
}

#[cfg(test)]
mod default_port_tests {
    #[test]
    fn gateway_addresses_get_the_default_port() {
        use super::with_default_port as p;
        assert_eq!(p("gw.example.com"), "gw.example.com:4433");
        assert_eq!(p("gw.example.com:5000"), "gw.example.com:5000");
        assert_eq!(p("127.0.0.1"), "127.0.0.1:4433");
        assert_eq!(p("::1"), "[::1]:4433");
        assert_eq!(p("[::1]"), "[::1]:4433");
        assert_eq!(p("[::1]:5000"), "[::1]:5000");
    }
}

#[cfg(test)]
mod failover_tests {
    use std::time::Duration;

    use super::{Backoff, Retry, resolve_all};

    fn backoff() -> Backoff {
        Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(4),
            stable_after: Duration::from_secs(30),
        }
    }

    /// The delays double from the first, stay within [half, whole] of each step (jitter),
    /// never exceed the maximum, and start again after a connection that lasted.
    #[test]
    fn backoff_doubles_with_jitter_is_bounded_and_resets_after_a_stable_connection() {
        let b = backoff();
        let mut retry = Retry::new(b);
        let mut delays = Vec::new();
        for attempt in 0..40u32 {
            let d = retry.next_delay();
            let step = b.initial.saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX)).min(b.max);
            assert!(d >= step / 2 && d <= step, "attempt {attempt}: {d:?} outside [{:?}, {step:?}]", step / 2);
            delays.push(d);
        }
        assert!(delays.iter().all(|d| *d <= b.max), "{delays:?}");
        assert!(delays[..2].iter().all(|d| *d <= Duration::from_millis(400)), "{delays:?}");
        assert!(delays[30..].iter().all(|d| *d >= b.max / 2), "capped at the maximum: {delays:?}");
        // Jitter: not every capped delay is the same.
        let first = delays[30];
        assert!(delays[30..].iter().any(|d| *d != first), "no jitter: {delays:?}");
        // A short connection does not reset the schedule...
        retry.connection_ended(Duration::from_secs(1));
        assert!(retry.next_delay() >= b.max / 2);
        // ... one that lasted does.
        retry.connection_ended(Duration::from_secs(30));
        assert!(retry.next_delay() <= b.initial);
        assert!(retry.next_delay() <= b.initial * 2);
    }

    /// A state file written before agents knew several gateways still reads (one address),
    /// and one with several keeps the first in `gateway` for older agents.
    #[test]
    fn old_and_new_state_files_read() {
        let old = "gateway = \"gw:4433\"\nagent_id = \"ag-1\"\nname = \"web-01\"\nca_pin = \"sha256:00\"\n";
        let state: super::AgentState = toml::from_str(old).unwrap();
        assert_eq!(state.addresses(), ["gw:4433"]);
        assert!(!toml::to_string(&state).unwrap().contains("gateways"), "a single gateway is written as before");
        let many = super::AgentState { gateways: vec!["a:1".into(), "b:2".into()], gateway: "a:1".into(), ..state };
        let text = toml::to_string(&many).unwrap();
        let back: super::AgentState = toml::from_str(&text).unwrap();
        assert_eq!(back.addresses(), ["a:1", "b:2"]);
        assert!(text.contains("gateway = \"a:1\""), "{text}");
    }

    /// A name with several addresses gives every one of them, in order, once.
    #[tokio::test]
    async fn a_name_with_several_addresses_gives_every_one() {
        let (candidates, errors) = resolve_all(&[
            "localhost:4433".to_owned(),
            "127.0.0.1:4433".to_owned(),
            "nonexistent.invalid:1".to_owned(),
        ])
        .await;
        let addrs: Vec<String> = candidates.iter().map(|c| c.addr.to_string()).collect();
        assert!(addrs.contains(&"127.0.0.1:4433".to_owned()), "{addrs:?}");
        assert_eq!(addrs.iter().filter(|a| *a == "127.0.0.1:4433").count(), 1, "no repeats: {addrs:?}");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("nonexistent.invalid"), "{errors:?}");
    }
}
