//! Gateway side of the tunnel: the QUIC listener, enrollment, the registry of connected
//! agents, and opening session streams to them.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use postern_proto::{
    EnrollRequest, EnrollResponse, ErrorCode, ErrorMsg, FrameError, Hello, HelloAck, Message, OpenSession, SessionId,
    SessionRequest, StreamKind, read_frame, write_frame,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span};

use crate::pki::{CertAuthority, cert_info};
use crate::renewal::{RenewalGate, Validity};
use crate::slots::{Full, SourceSlots};
use crate::tls::TransportTimers;
use crate::transport::{Connection, RecvStream, SendStream, Transport};

/// How long a peer may take for one handshake step (TLS, first frame, reply).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// QUIC application close codes the gateway uses.
pub mod close {
    pub const NORMAL: u32 = 0;
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const REFUSED: u32 = 2;
    pub const REPLACED: u32 = 3;
    pub const SHUTDOWN: u32 = 4;
}

/// How many characters of what an agent says about itself (`Hello`) the registry keeps.
pub mod limits {
    pub const HOSTNAME: usize = 255;
    pub const PLATFORM: usize = 64;
    pub const VERSION: usize = 64;
}

/// Agent-supplied text as the registry keeps it: bounded, control characters (terminal
/// escapes) replaced by '?', so listing agents cannot drive an administrator's terminal.
pub fn clean_text(s: &str, max: usize) -> String {
    s.chars().take(max).map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// An enrollment the directory approved: the identity the certificate will carry.
#[derive(Debug, Clone)]
pub struct EnrolledAgent {
    pub agent_id: String,
    pub name: String,
}

/// Why the directory refused something; the message goes to the agent verbatim.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

/// What the tunnel needs from the gateway's store. Implemented by the gateway; tests use
/// an in-memory version.
pub trait AgentDirectory: Send + Sync + 'static {
    /// Redeem a single-use token for a new agent identity. Must be atomic: a token redeemed
    /// concurrently twice succeeds at most once.
    fn enroll(
        &self,
        token: &str,
        request: &EnrollRequest,
        remote: SocketAddr,
    ) -> impl Future<Output = Result<EnrolledAgent, Refusal>> + Send;

    /// An agent with a valid certificate connected. Refuse revoked or unknown agents.
    /// Returns the agent's current display name.
    fn admit(
        &self,
        agent_id: &str,
        hello: &Hello,
        remote: SocketAddr,
        transport: Transport,
    ) -> impl Future<Output = Result<String, Refusal>> + Send;

    /// The agent's current connection ended (a connection replaced by a newer one of the
    /// same agent does not count).
    fn departed(&self, agent_id: &str) -> impl Future<Output = ()> + Send;

    /// A certificate was renewed for a connected agent (`serial_hex`, valid until `not_after`).
    fn renewed(
        &self,
        agent_id: &str,
        remote: SocketAddr,
        serial_hex: &str,
        not_after: SystemTime,
    ) -> impl Future<Output = ()> + Send;

    /// A rogue or broken peer was dropped; for the audit log.
    fn protocol_violation(
        &self,
        remote: SocketAddr,
        agent_id: Option<&str>,
        error: &str,
    ) -> impl Future<Output = ()> + Send;
}

#[derive(Debug, Clone)]
pub struct TunnelSettings {
    pub timers: TransportTimers,
    /// Lifetime of agent certificates; agents renew at two thirds of it, and the gateway
    /// refuses renewals before half of it ([`crate::renewal`]).
    pub agent_cert_ttl: Duration,
    /// Upper bound on connected agents; further connections are refused.
    pub max_agents: usize,
    /// Upper bound on enrollments in progress at once ...
    pub max_enrollments: usize,
    /// ... and from one source address, so that idle enrollment connections from one
    /// address cannot take every place.
    pub max_enrollments_per_source: usize,
    /// In a cluster, this gateway's id, named in its tunnel certificate.
    pub gateway_id: Option<String>,
    /// Where the TCP transport listens (agents whose network drops UDP); `None`: QUIC only.
    pub tcp_listen: Option<SocketAddr>,
    /// TCP connections still in their TLS and HTTP/2 set-up, at most, in all ...
    pub tcp_handshakes: usize,
    /// ... and from one source address (more are closed at once).
    pub tcp_handshakes_per_source: usize,
}

impl Default for TunnelSettings {
    fn default() -> Self {
        Self {
            timers: TransportTimers::default(),
            agent_cert_ttl: Duration::from_secs(30 * 24 * 3600),
            max_agents: 50_000,
            max_enrollments: 64,
            max_enrollments_per_source: 8,
            gateway_id: None,
            tcp_listen: None,
            tcp_handshakes: 1024,
            tcp_handshakes_per_source: 32,
        }
    }
}

/// A connected agent as the registry knows it.
#[derive(Debug, Clone)]
pub struct ConnectedAgent {
    pub agent_id: String,
    pub name: String,
    pub hostname: String,
    pub platform: String,
    pub agent_version: String,
    pub remote: SocketAddr,
    pub connected_at: SystemTime,
    /// QUIC, or the TCP fallback.
    pub transport: Transport,
}

struct Entry {
    info: ConnectedAgent,
    conn: Connection,
    violation: ViolationSlot,
}

/// The first protocol violation seen on a connection's session streams, reported to the
/// directory by the task that owns the connection once the connection has closed.
type ViolationSlot = Arc<std::sync::Mutex<Option<String>>>;

/// Lets whoever reads a session stream report that the agent broke the protocol on it
/// (garbage, an oversized or unknown frame, a kind the agent must not send): the agent's
/// whole connection is closed with [`close::PROTOCOL_ERROR`] and the directory hears of it
/// (`AgentDirectory::protocol_violation`), as on the control stream.
#[derive(Debug, Clone)]
pub struct ViolationReporter {
    /// The agent's connection; `None` for an agent reached through another gateway, whose
    /// connection is that gateway's to close.
    conn: Option<Connection>,
    slot: ViolationSlot,
}

impl ViolationReporter {
    /// For a stream to an agent that is not connected here (through a peer gateway): a
    /// violation ends the session that saw it and is logged.
    pub fn detached() -> Self {
        Self { conn: None, slot: ViolationSlot::default() }
    }

    pub fn report(&self, error: &str) {
        if let Ok(mut slot) = self.slot.lock()
            && slot.is_none()
        {
            *slot = Some(error.to_owned());
        }
        match &self.conn {
            Some(conn) => conn.close(close::PROTOCOL_ERROR, b"protocol error"),
            None => {
                crate::warn_limited!(%error, "protocol violation by an agent reached through another gateway; its session ends")
            }
        }
    }
}

/// Who is online right now. Cheap to clone; all clones share one map.
#[derive(Clone, Default)]
pub struct AgentRegistry {
    inner: Arc<RwLock<HashMap<String, Entry>>>,
}

impl std::fmt::Debug for AgentRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentRegistry").field("online", &self.len()).finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("instance is offline")]
    Offline,
    #[error("agent refused the session: {reason}")]
    Rejected { code: ErrorCode, reason: String },
    #[error("agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The agent's connection let no new stream open in time: it has as many sessions open
    /// as its tunnel allows at once (the QUIC stream limit the agent grants), whatever its
    /// `[limits] max_sessions` says. Said as such, not as an agent that does not answer.
    #[error(
        "the agent's tunnel has no room for another session (all the streams it allows at once are in use) within {0:?}; try again when one of its sessions ends"
    )]
    NoStream(Duration),
    #[error("tunnel error: {0}")]
    Tunnel(String),
}

/// An accepted session: frames (shell, exec) or raw bytes (tcp) both ways.
#[derive(Debug)]
pub struct SessionStream {
    pub id: SessionId,
    pub send: SendStream,
    pub recv: RecvStream,
    /// Report a protocol violation on this stream (closes the agent's connection).
    pub violation: ViolationReporter,
    /// For a `TcpByName` session: the address the agent says it connected to.
    pub connected_to: Option<String>,
    /// The gateway the agent is connected to, when it is not this one (crate::peer).
    pub via: Option<String>,
}

pub fn new_session_id() -> SessionId {
    let mut b = [0u8; 16];
    b.iter_mut().for_each(|x| *x = fastrand::u8(..));
    SessionId(b)
}

impl AgentRegistry {
    pub fn len(&self) -> usize {
        self.inner.read().map(|m| m.len()).unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Each connected agent's transport and round-trip estimate
    /// ([`Connection::rtt`](crate::transport::Connection::rtt)), without copying their details.
    pub fn links(&self) -> Vec<(Transport, Option<Duration>)> {
        self.inner.read().map(|m| m.values().map(|e| (e.info.transport, e.conn.rtt())).collect()).unwrap_or_default()
    }
    pub fn online(&self) -> Vec<ConnectedAgent> {
        self.inner.read().map(|m| m.values().map(|e| e.info.clone()).collect()).unwrap_or_default()
    }
    /// Whether `agent_id` is connected here (no copy of its details).
    pub fn is_connected(&self, agent_id: &str) -> bool {
        self.inner.read().is_ok_and(|m| m.contains_key(agent_id))
    }
    pub fn get(&self, agent_id: &str) -> Option<ConnectedAgent> {
        self.inner.read().ok()?.get(agent_id).map(|e| e.info.clone())
    }
    fn connection(&self, agent_id: &str) -> Option<Connection> {
        self.inner.read().ok()?.get(agent_id).map(|e| e.conn.clone())
    }
    fn reporter(&self, agent_id: &str) -> Option<ViolationReporter> {
        let map = self.inner.read().ok()?;
        map.get(agent_id).map(|e| ViolationReporter { conn: Some(e.conn.clone()), slot: e.violation.clone() })
    }

    /// Register a connection; an older connection of the same agent is closed.
    fn insert(&self, info: ConnectedAgent, conn: Connection, violation: ViolationSlot) {
        let old =
            self.inner.write().ok().and_then(|mut m| m.insert(info.agent_id.clone(), Entry { info, conn, violation }));
        if let Some(old) = old {
            old.conn.close(close::REPLACED, b"replaced by a newer connection of the same agent");
        }
    }

    /// Remove `agent_id` only if `conn` is still its current connection.
    fn remove(&self, agent_id: &str, conn: &Connection) -> bool {
        let Ok(mut m) = self.inner.write() else { return false };
        if m.get(agent_id).is_some_and(|e| e.conn.stable_id() == conn.stable_id()) {
            m.remove(agent_id);
            true
        } else {
            false
        }
    }

    /// Disconnect an agent now (revocation, removal).
    pub fn disconnect(&self, agent_id: &str, reason: &str) -> bool {
        match self.connection(agent_id) {
            Some(conn) => {
                conn.close(close::REFUSED, reason.as_bytes());
                true
            }
            None => false,
        }
    }

    /// Open a session stream to an online agent and wait for accept or reject.
    pub async fn open_session(&self, agent_id: &str, request: SessionRequest) -> Result<SessionStream, OpenError> {
        let violation = self.reporter(agent_id).ok_or(OpenError::Offline)?;
        let conn = self.connection(agent_id).ok_or(OpenError::Offline)?;
        let (send, recv) = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.open_bi())
            .await
            .map_err(|_| OpenError::NoStream(HANDSHAKE_TIMEOUT))?
            .map_err(|e| OpenError::Tunnel(e.to_string()))?;
        open_on(send, recv, violation, request).await
    }

    /// A bare stream to an online agent, for a peer gateway that speaks the session protocol
    /// over it itself (crate::peer). `None`: the agent is not connected here.
    pub(crate) async fn open_raw(&self, agent_id: &str) -> Option<(SendStream, RecvStream)> {
        let conn = self.connection(agent_id)?;
        tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.open_bi()).await.ok()?.ok()
    }
}

/// Ask the agent at the other end of a fresh stream for `request` and wait for its accept or
/// reject (bounded by [`HANDSHAKE_TIMEOUT`]).
pub(crate) async fn open_on(
    mut send: SendStream,
    mut recv: RecvStream,
    violation: ViolationReporter,
    request: SessionRequest,
) -> Result<SessionStream, OpenError> {
    let id = new_session_id();
    let by_name = matches!(request, SessionRequest::TcpByName(_));
    if request.is_interactive() {
        send.prefer();
    }
    let exchange = async {
        write_frame(&mut send, &Message::Open(OpenSession { session_id: id, request }))
            .await
            .map_err(|e| OpenError::Tunnel(e.to_string()))?;
        match read_frame(&mut recv, StreamKind::Session).await {
            Ok(Some(Message::Accept(a))) if a.session_id == id && !by_name => {
                Ok(SessionStream { id, send, recv, violation, connected_to: None, via: None })
            }
            // A name's session is accepted only with the address it reached.
            Ok(Some(Message::Connected(c))) if c.session_id == id && by_name => {
                Ok(SessionStream { id, send, recv, violation, connected_to: Some(c.address), via: None })
            }
            Ok(Some(Message::Reject(r))) => Err(OpenError::Rejected { code: r.code, reason: r.reason }),
            Ok(None) => Err(OpenError::Tunnel("the agent closed the session stream".into())),
            Ok(Some(other)) => {
                let error = format!("unexpected answer to open: {:?}", other.kind());
                violation.report(&error);
                Err(OpenError::Tunnel(error))
            }
            Err(e) => {
                if is_violation(&e) {
                    violation.report(&e.to_string());
                }
                Err(OpenError::Tunnel(e.to_string()))
            }
        }
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange).await.map_err(|_| OpenError::Timeout(HANDSHAKE_TIMEOUT))?
}

/// The key of the connection-ID generator, derived from the reset key (so it persists with
/// it) under its own label (so neither reveals the other).
fn cid_generator_key(reset_key: &ring::hmac::Key) -> u64 {
    let tag = ring::hmac::sign(reset_key, b"postern quic connection-id generator");
    let mut first = [0u8; 8];
    first.copy_from_slice(tag.as_ref().get(..8).unwrap_or(&[0; 8]));
    u64::from_le_bytes(first)
}

/// The QUIC socket on `addr` and, when `tcp` is set, the TCP listener (port 0 there: the
/// port the UDP socket got). With an ephemeral UDP port (0) whose number is taken for TCP,
/// another is tried.
fn bind_both(
    addr: SocketAddr,
    tcp: Option<SocketAddr>,
) -> anyhow::Result<(std::net::UdpSocket, Option<std::net::TcpListener>)> {
    for _ in 0..32 {
        let udp = std::net::UdpSocket::bind(addr)?;
        crate::tls::size_udp_buffers(&udp);
        let Some(mut tcp_addr) = tcp else { return Ok((udp, None)) };
        let same_port = tcp_addr.port() == 0;
        if same_port {
            tcp_addr.set_port(udp.local_addr()?.port());
        }
        match std::net::TcpListener::bind(tcp_addr) {
            Ok(listener) => return Ok((udp, Some(listener))),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && same_port && addr.port() == 0 => continue,
            Err(e) => anyhow::bail!("binding the tunnel's TCP listener on {tcp_addr}: {e}"),
        }
    }
    anyhow::bail!("no port number on {} is free for both UDP and TCP", addr.ip())
}

/// The gateway's QUIC listener.
pub struct TunnelServer<D: AgentDirectory> {
    endpoint: quinn::Endpoint,
    /// The TCP transport's listener and TLS, when it is on.
    tcp: Option<(tokio::net::TcpListener, tokio_rustls::TlsAcceptor)>,
    registry: AgentRegistry,
    directory: Arc<D>,
    ca: Arc<CertAuthority>,
    settings: TunnelSettings,
    /// In a cluster: a client to the other gateways, with this gateway's certificate.
    peers: Option<Arc<crate::peer::PeerClient>>,
}

impl<D: AgentDirectory> TunnelServer<D> {
    /// Bind the listener. `reset_key` should persist across restarts: with it, a restarted
    /// gateway answers packets of connections it lost with a stateless reset, so agents
    /// notice at once instead of waiting for their idle timeout.
    pub fn bind(
        addr: SocketAddr,
        ca: Arc<CertAuthority>,
        directory: Arc<D>,
        settings: TunnelSettings,
        reset_key: &[u8; 32],
    ) -> anyhow::Result<Self> {
        let server_key = rcgen::KeyPair::generate()?;
        let server_cert =
            ca.issue_server_cert(&server_key, Duration::from_secs(365 * 24 * 3600), settings.gateway_id.as_deref())?;
        let chain = vec![server_cert, ca.cert_der().clone()];
        let peers = match settings.gateway_id {
            Some(_) => Some(Arc::new(crate::peer::PeerClient::new(
                ca.cert_der(),
                chain.clone(),
                crate::pki::private_key_der(&server_key),
            )?)),
            None => None,
        };
        let tcp_chain = chain.clone();
        let server_config = crate::tls::server_config(
            ca.cert_der(),
            chain,
            crate::pki::private_key_der(&server_key),
            settings.timers,
            peers.is_some(),
        )?;
        let hmac = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, reset_key);
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(hmac.clone()));
        // quinn drops a packet whose connection ID its generator did not make, without a
        // reset; its default generator has a fresh key per process, so a restarted gateway
        // ignored every packet of its lost connections and agents waited for their idle
        // timeout. A key derived from the persisted reset key makes the new process
        // recognise the old IDs and answer them with a stateless reset.
        let cid_key = cid_generator_key(&hmac);
        endpoint_config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
        let (socket, tcp_listener) = bind_both(addr, settings.tcp_listen)?;
        let runtime = quinn::default_runtime().ok_or_else(|| anyhow::anyhow!("no async runtime"))?;
        let endpoint = quinn::Endpoint::new(endpoint_config, Some(server_config), socket, runtime)?;
        let tcp = match tcp_listener {
            Some(listener) => {
                let tls =
                    crate::tls::server_tls(ca.cert_der(), tcp_chain, crate::pki::private_key_der(&server_key), false)?;
                listener.set_nonblocking(true)?;
                Some((tokio::net::TcpListener::from_std(listener)?, tokio_rustls::TlsAcceptor::from(Arc::new(tls))))
            }
            None => None,
        };
        Ok(Self { endpoint, tcp, registry: AgentRegistry::default(), directory, ca, settings, peers })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Where the TCP transport listens, when it is on.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    pub fn registry(&self) -> AgentRegistry {
        self.registry.clone()
    }

    /// In a cluster (`gateway_id` set): the client this gateway reaches agents connected to
    /// other gateways with.
    pub fn peers(&self) -> Option<Arc<crate::peer::PeerClient>> {
        self.peers.clone()
    }

    /// Accept connections until `shutdown`, then close every connection and wait briefly for
    /// the close to reach agents.
    pub async fn serve(self, shutdown: CancellationToken) {
        let tasks = tokio_util::task::TaskTracker::new();
        let enrollments = SourceSlots::new(self.settings.max_enrollments, self.settings.max_enrollments_per_source);
        let renewals = Arc::new(RenewalGate::new(self.settings.agent_cert_ttl));
        let tcp_handshakes = SourceSlots::new(self.settings.tcp_handshakes, self.settings.tcp_handshakes_per_source);
        let ctx = |shutdown: &CancellationToken| ConnCtx {
            registry: self.registry.clone(),
            directory: self.directory.clone(),
            ca: self.ca.clone(),
            settings: self.settings.clone(),
            enrollments: enrollments.clone(),
            renewals: renewals.clone(),
            shutdown: shutdown.clone(),
        };
        loop {
            let full = self.registry.len() >= self.settings.max_agents;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                i = self.endpoint.accept() => {
                    let Some(incoming) = i else { break };
                    if full {
                        crate::warn_limited!(limit = self.settings.max_agents, "agent limit reached, refusing connection");
                        incoming.refuse();
                        continue;
                    }
                    let remote = incoming.remote_address();
                    tasks.spawn(handle_incoming(ctx(&shutdown), incoming).instrument(info_span!("conn", %remote)));
                }
                Some(accepted) = accept_tcp(self.tcp.as_ref()) => {
                    let (tcp, remote) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of descriptors and the like: do not spin on it.
                            crate::warn_limited!(error = %e, "accepting a tunnel TCP connection failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    if full {
                        crate::warn_limited!(limit = self.settings.max_agents, "agent limit reached, refusing connection");
                        continue;
                    }
                    let place = match tcp_handshakes.admit(remote.ip()) {
                        Ok(place) => place,
                        Err(full) => {
                            debug!(%remote, ?full, "too many TCP handshakes in progress; closing a connection");
                            continue;
                        }
                    };
                    let Some((_, acceptor)) = self.tcp.as_ref() else { continue };
                    let acceptor = acceptor.clone();
                    tasks.spawn(
                        handle_tcp(ctx(&shutdown), tcp, remote, acceptor, place)
                            .instrument(info_span!("conn", %remote, transport = "tcp")),
                    );
                }
            }
        }
        self.endpoint.close(close::SHUTDOWN.into(), b"gateway shutting down");
        drop(self.tcp);
        tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(3), tasks.wait()).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

/// The next TCP connection, or `None` (never ready) when the TCP transport is off.
async fn accept_tcp(
    tcp: Option<&(tokio::net::TcpListener, tokio_rustls::TlsAcceptor)>,
) -> Option<std::io::Result<(tokio::net::TcpStream, SocketAddr)>> {
    match tcp {
        Some((listener, _)) => Some(listener.accept().await),
        None => std::future::pending().await,
    }
}

struct ConnCtx<D> {
    registry: AgentRegistry,
    directory: Arc<D>,
    ca: Arc<CertAuthority>,
    settings: TunnelSettings,
    enrollments: Arc<SourceSlots>,
    renewals: Arc<RenewalGate>,
    shutdown: CancellationToken,
}

async fn handle_incoming<D: AgentDirectory>(ctx: ConnCtx<D>, incoming: quinn::Incoming) {
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, async { incoming.accept()?.await }).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            debug!(error = %e, "handshake failed");
            return;
        }
        Err(_) => {
            debug!("handshake timed out");
            return;
        }
    };
    let remote = conn.remote_address();
    let peer = ctx.settings.gateway_id.is_some()
        && Connection::Quic(conn.clone()).alpn().is_some_and(|p| p == postern_proto::ALPN_PEER);
    if peer {
        return handle_peer(ctx, conn, remote).await;
    }
    dispatch(ctx, Connection::Quic(conn)).await;
}

/// A TCP-transport connection: TLS, then HTTP/2, each step within [`HANDSHAKE_TIMEOUT`];
/// the handshake place is held until both are done.
async fn handle_tcp<D: AgentDirectory>(
    ctx: ConnCtx<D>,
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    place: crate::slots::Slot,
) {
    crate::transport::tcp::tune_socket(&tcp, ctx.settings.timers);
    let setup = async {
        let tls = acceptor.accept(tcp).await.map_err(|e| format!("TLS handshake failed: {e}"))?;
        crate::transport::tcp::accept(tls, remote).await.map_err(|e| format!("HTTP/2 set-up failed: {e}"))
    };
    let conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, setup).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return debug!(error = %e, "tcp handshake failed"),
        Err(_) => return debug!("tcp handshake timed out"),
    };
    drop(place);
    dispatch(ctx, Connection::Tcp(conn)).await;
}

/// This host's clock as Unix milliseconds, in decimal (the `postern-time/1` answer).
fn unix_millis() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis().to_string())
        .unwrap_or_else(|_| "0".to_owned())
}

/// An agent's connection, either transport, by its ALPN.
async fn dispatch<D: AgentDirectory>(ctx: ConnCtx<D>, conn: Connection) {
    let remote = conn.remote_address();
    match conn.alpn().as_deref() {
        Some(p) if p == postern_proto::ALPN_ENROLL => handle_enrollment(ctx, conn, remote).await,
        Some(p) if p == postern_proto::ALPN_TUNNEL => handle_agent(ctx, conn, remote).await,
        // The clock, for `postern-agent doctor`: public, harmless, and nothing to keep.
        Some(p) if p == postern_proto::ALPN_TIME => conn.close(postern_proto::CLOSE_TIME, unix_millis().as_bytes()),
        _ => conn.close(close::PROTOCOL_ERROR, b"unsupported ALPN"),
    }
}

/// Another gateway of the cluster: only a gateway certificate from the cluster's CA (an
/// agent's certificate, from the same CA, is refused).
async fn handle_peer<D: AgentDirectory>(ctx: ConnCtx<D>, conn: quinn::Connection, remote: SocketAddr) {
    let cert = conn
        .peer_identity()
        .and_then(|p| p.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().cloned());
    let Some(peer) = cert.as_ref().and_then(crate::peer::gateway_of) else {
        crate::peer::refused(remote, "not a gateway certificate");
        return conn.close(close::REFUSED.into(), b"a gateway certificate is required");
    };
    tokio::select! {
        _ = ctx.shutdown.cancelled() => conn.close(close::SHUTDOWN.into(), b"gateway shutting down"),
        () = crate::peer::serve(ctx.registry.clone(), conn.clone(), peer) => {}
    }
}

/// Whether a read error is the peer's fault (bytes that break the protocol) rather than the
/// stream or connection ending (reset, closed, lost), which is no violation.
pub fn is_violation(e: &FrameError) -> bool {
    matches!(e, FrameError::Proto(_))
}

async fn violation<D: AgentDirectory>(ctx: &ConnCtx<D>, conn: &Connection, agent: Option<&str>, error: String) {
    crate::warn_limited!(agent_id = agent.unwrap_or("-"), %error, "dropping peer after protocol violation");
    conn.close(close::PROTOCOL_ERROR, b"protocol error");
    ctx.directory.protocol_violation(conn.remote_address(), agent, &error).await;
}

async fn handle_enrollment<D: AgentDirectory>(ctx: ConnCtx<D>, conn: Connection, remote: SocketAddr) {
    let _slot = match ctx.enrollments.admit(remote.ip()) {
        Ok(s) => s,
        Err(Full::Total) => {
            return conn.close(close::REFUSED, b"too many enrollments in progress, retry later");
        }
        Err(Full::Source) => {
            debug!("too many enrollments in progress from this address; refusing");
            return conn.close(close::REFUSED, b"too many enrollments in progress from this address, retry later");
        }
    };
    let step = async {
        let (send, recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((send, recv))
    };
    let (mut send, mut recv) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, step).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return debug!(error = %e, "enrollment stream failed"),
        Err(_) => return conn.close(close::PROTOCOL_ERROR, b"timed out waiting for enrollment request"),
    };
    let req = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_frame(&mut recv, StreamKind::Enroll)).await {
        Ok(Ok(Some(Message::EnrollRequest(r)))) => r,
        Ok(Ok(other)) => {
            return violation(&ctx, &conn, None, format!("expected enrollment request, got {other:?}")).await;
        }
        Ok(Err(e)) if is_violation(&e) => return violation(&ctx, &conn, None, e.to_string()).await,
        Ok(Err(e)) => return debug!(error = %e, "enrollment stream ended"),
        Err(_) => return conn.close(close::PROTOCOL_ERROR, b"timed out waiting for enrollment request"),
    };
    // Validate the CSR before the token is spent, so a broken agent does not burn it.
    let reply = if let Err(e) = CertAuthority::check_csr(&req.csr_der) {
        Message::Error(ErrorMsg { code: ErrorCode::BadRequest, message: e.to_string() })
    } else {
        match ctx.directory.enroll(&req.token, &req, remote).await {
            Ok(agent) => match ctx.ca.issue_agent_cert(&req.csr_der, &agent.agent_id, ctx.settings.agent_cert_ttl) {
                Ok(cert) => {
                    info!(agent_id = %agent.agent_id, name = %agent.name, "agent enrolled");
                    Message::EnrollResponse(EnrollResponse {
                        agent_id: agent.agent_id,
                        name: agent.name,
                        cert_der: cert.to_vec(),
                        ca_der: ctx.ca.cert_der().to_vec(),
                    })
                }
                Err(e) => Message::Error(ErrorMsg { code: ErrorCode::Internal, message: e.to_string() }),
            },
            Err(refusal) => {
                crate::info_limited!(code = ?refusal.code, reason = %refusal.message, "enrollment refused");
                Message::Error(ErrorMsg { code: refusal.code, message: refusal.message })
            }
        }
    };
    let _ = write_frame(&mut send, &reply).await;
    let _ = send.finish();
    // Let the agent read the answer and close; do not wait forever.
    let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, conn.closed()).await;
}

async fn handle_agent<D: AgentDirectory>(ctx: ConnCtx<D>, conn: Connection, remote: SocketAddr) {
    // Identity comes from the verified client certificate and nothing else.
    let Some(cert) = conn.peer_certificate().and_then(|c| cert_info(&c).ok()) else {
        conn.close(close::REFUSED, b"a client certificate is required");
        return;
    };
    // The certificate the agent holds now: the one it connected with, then each renewal.
    let mut current = Validity::from(&cert);
    let agent_id = cert.common_name;
    let span = info_span!("agent", %agent_id);
    async move {
        let first = async {
            let (send, mut recv) = conn.accept_bi().await.map_err(FrameError::Io)?;
            let hello = read_frame(&mut recv, StreamKind::Control).await?;
            Ok::<_, FrameError>((send, recv, hello))
        };
        let (mut send, mut recv, hello) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, first).await {
            Ok(Ok((s, r, Some(Message::Hello(h))))) => (s, r, h),
            Ok(Ok((_, _, other))) => {
                return violation(&ctx, &conn, Some(&agent_id), format!("expected hello, got {other:?}")).await;
            }
            Ok(Err(e)) if is_violation(&e) => return violation(&ctx, &conn, Some(&agent_id), e.to_string()).await,
            Ok(Err(e)) => return debug!(error = %e, "connection ended before hello"),
            Err(_) => return conn.close(close::PROTOCOL_ERROR, b"timed out waiting for hello"),
        };
        let name = match ctx.directory.admit(&agent_id, &hello, remote, conn.transport()).await {
            Ok(name) => name,
            Err(refusal) => {
                crate::info_limited!(reason = %refusal.message, "agent refused");
                let _ =
                    write_frame(&mut send, &Message::Error(ErrorMsg { code: refusal.code, message: refusal.message }))
                        .await;
                let _ = send.finish();
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                conn.close(close::REFUSED, b"agent refused");
                return;
            }
        };
        let violations = ViolationSlot::default();
        if write_frame(&mut send, &Message::HelloAck(HelloAck { agent_id: agent_id.clone(), name: name.clone() }))
            .await
            .is_err()
        {
            return;
        }
        ctx.registry.insert(
            ConnectedAgent {
                agent_id: agent_id.clone(),
                name,
                hostname: clean_text(&hello.hostname, limits::HOSTNAME),
                platform: clean_text(&hello.platform, limits::PLATFORM),
                agent_version: clean_text(&hello.agent_version, limits::VERSION),
                remote,
                connected_at: SystemTime::now(),
                transport: conn.transport(),
            },
            conn.clone(),
            violations.clone(),
        );
        info!(transport = %conn.transport(), "agent online");

        // Control loop: renewals until the connection ends.
        loop {
            let msg = tokio::select! {
                _ = ctx.shutdown.cancelled() => break,
                reason = conn.closed() => {
                    debug!(%reason, "connection closed");
                    break;
                }
                m = read_frame(&mut recv, StreamKind::Control) => m,
            };
            match msg {
                Ok(Some(Message::RenewRequest(r))) => {
                    let ttl = ctx.settings.agent_cert_ttl;
                    let reply = match ctx.renewals.answer(&ctx.ca, &agent_id, &mut current, &r.csr_der, ttl) {
                        Ok(renewed) => {
                            let info = renewed.info;
                            ctx.directory.renewed(&agent_id, remote, &info.serial_hex, info.not_after).await;
                            renewed.reply
                        }
                        Err(refusal) => Message::Error(refusal),
                    };
                    if write_frame(&mut send, &reply).await.is_err() {
                        break;
                    }
                }
                Ok(None) => {
                    // Control stream closed: wait for the connection itself to end.
                    tokio::select! {
                        _ = ctx.shutdown.cancelled() => {}
                        _ = conn.closed() => {}
                    }
                    break;
                }
                Ok(Some(other)) => {
                    violation(&ctx, &conn, Some(&agent_id), format!("unexpected control message {:?}", other.kind()))
                        .await;
                    break;
                }
                Err(e) if is_violation(&e) => {
                    violation(&ctx, &conn, Some(&agent_id), e.to_string()).await;
                    break;
                }
                Err(e) => {
                    // The connection closed or the stream was reset (an agent stopping, the
                    // gateway shutting down): a departure, not a violation.
                    debug!(error = %e, "control stream ended");
                    break;
                }
            }
        }
        // A violation on a session stream closed the connection; say so once it has.
        let seen = violations.lock().ok().and_then(|mut v| v.take());
        if let Some(error) = seen {
            crate::warn_limited!(%error, "dropped agent after a protocol violation on a session stream");
            ctx.directory.protocol_violation(remote, Some(&agent_id), &error).await;
        }
        if ctx.registry.remove(&agent_id, &conn) {
            info!("agent offline");
            ctx.directory.departed(&agent_id).await;
        }
    }
    .instrument(span)
    .await
}
