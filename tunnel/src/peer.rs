//! Gateway peering: a user's gateway (A) reaching an agent connected to another gateway (B)
//! of the same cluster (docs/scale-out.md "Gateway peering").
//!
//! A connects to B's tunnel port with ALPN [`postern_proto::ALPN_PEER`], both sides
//! presenting their gateway certificate from the cluster's CA (A checks that the server is
//! exactly B by its name `<B>.postern-gateway`; B accepts only gateway certificates). For
//! each session A opens one stream to B and asks for an agent:
//!
//! ```text
//! A -> B   agent id, then "\n"                   (at most 256 bytes)
//! B -> A   0                                     the agent is here: the stream is now its
//!          | 1, u16 length, reason (UTF-8)       not connected here / refused
//! ```
//!
//! After `0`, B opens a session stream to the agent and copies bytes both ways, unread: A
//! speaks the session protocol to the agent itself (`Open`, `Accept`, frames), so what is
//! authorized, recorded and audited is decided at A, where the user is, and does not depend
//! on where the agent is connected.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postern_proto::SessionRequest;
use quinn::crypto::rustls::QuicClientConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info};

use crate::pki::{cert_info, gateway_cert_name};
use crate::server::{AgentRegistry, OpenError, SessionStream, ViolationReporter, close};
use crate::tls::TlsError;
use crate::transport::{RecvStream, SendStream};

/// Most bytes of an agent id in a peer request.
const MAX_AGENT_ID: usize = 256;
/// Most bytes of a refusal's reason.
const MAX_REASON: usize = 1024;
/// Sessions one peer may have open through this gateway at once.
pub const PEER_STREAMS: u32 = 4096;
/// Silence after which a peer connection counts as lost.
pub const PEER_IDLE: Duration = Duration::from_secs(5);
/// Connecting to a peer and each step of a stream's set-up are bounded by this.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);

const HERE: u8 = 0;
const NOT_HERE: u8 = 1;

/// The common-name prefix of a gateway certificate (`postern gateway <id>`).
const GATEWAY_CN_PREFIX: &str = "postern gateway ";

/// Whether `id` may be a gateway id (1 to 32 of `a-z`, `0-9`, `-`, not starting with `-`).
pub fn valid_gateway_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
}

/// The gateway a verified client certificate names, if it is a gateway certificate (agent
/// certificates, from the same CA, name an agent id and never this prefix).
pub fn gateway_of(cert: &CertificateDer<'_>) -> Option<String> {
    let cn = cert_info(cert).ok()?.common_name;
    let id = cn.strip_prefix(GATEWAY_CN_PREFIX)?;
    valid_gateway_id(id).then(|| id.to_owned())
}

/// B's side of one peer connection: answer each stream until the connection ends.
pub(crate) async fn serve(registry: AgentRegistry, conn: quinn::Connection, peer: String) {
    info!(peer_gateway = %peer, "peer gateway connected");
    conn.set_max_concurrent_bi_streams(PEER_STREAMS.into());
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(peer_gateway = %peer, error = %e, "peer connection ended");
                break;
            }
        };
        tasks.spawn(relay(registry.clone(), SendStream::Quic(send), RecvStream::Quic(recv)));
    }
    tasks.close();
    info!(peer_gateway = %peer, "peer gateway disconnected");
}

/// Read the agent id A asks for (bounded in size and time).
async fn read_request(recv: &mut RecvStream) -> Result<String, String> {
    let mut id = Vec::with_capacity(32);
    let read = async {
        loop {
            let byte = recv.read_u8().await.map_err(|e| e.to_string())?;
            if byte == b'\n' {
                return Ok::<_, String>(());
            }
            if id.len() >= MAX_AGENT_ID {
                return Err("agent id too long".to_owned());
            }
            id.push(byte);
        }
    };
    tokio::time::timeout(PEER_TIMEOUT, read).await.map_err(|_| "timed out reading the request".to_owned())??;
    String::from_utf8(id).map_err(|_| "agent id is not UTF-8".to_owned())
}

async fn refuse(send: &mut SendStream, reason: &str) {
    let reason = reason.as_bytes().get(..reason.len().min(MAX_REASON)).unwrap_or_default();
    let mut answer = vec![NOT_HERE];
    answer.extend_from_slice(&u16::try_from(reason.len()).unwrap_or(0).to_be_bytes());
    answer.extend_from_slice(reason);
    let _ = tokio::time::timeout(PEER_TIMEOUT, send.write_all(&answer)).await;
    let _ = send.finish();
}

/// One stream from a peer: open a stream to the agent it names and copy both ways.
async fn relay(registry: AgentRegistry, mut send: SendStream, mut recv: RecvStream) {
    let agent_id = match read_request(&mut recv).await {
        Ok(id) => id,
        Err(e) => {
            debug!(error = %e, "bad peer request");
            return refuse(&mut send, &format!("bad request: {e}")).await;
        }
    };
    let Some((mut agent_send, mut agent_recv)) = registry.open_raw(&agent_id).await else {
        return refuse(&mut send, "the agent is not connected to this gateway").await;
    };
    if tokio::time::timeout(PEER_TIMEOUT, send.write_all(&[HERE])).await.map_or(true, |r| r.is_err()) {
        return;
    }
    // Each direction ends on its own: an end of stream is passed on as one, a reset as a
    // reset. Chunks move as they arrive (owned `Bytes`, no copy through a buffer).
    tokio::join!(pass(&mut recv, &mut agent_send), pass(&mut agent_recv, &mut send));
}

/// Move every chunk from `from` to `to` until `from` ends (then finish `to`) or breaks
/// (then reset `to`; a `to` that went away stops `from`).
async fn pass(from: &mut RecvStream, to: &mut SendStream) {
    loop {
        match from.read_chunk().await {
            Ok(Some(chunk)) => {
                if to.write_chunk(chunk).await.is_err() {
                    from.stop(0);
                    return;
                }
            }
            Ok(None) => {
                let _ = to.finish();
                return;
            }
            Err(_) => {
                to.reset(0);
                return;
            }
        }
    }
}

/// A's side: connections to the other gateways of the cluster, one per gateway, made when
/// first needed and again after one is lost.
pub struct PeerClient {
    config: quinn::ClientConfig,
    endpoints: Mutex<(Option<quinn::Endpoint>, Option<quinn::Endpoint>)>,
    connections: Mutex<HashMap<String, quinn::Connection>>,
}

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.connections.lock().map(|c| c.len()).unwrap_or(0);
        f.debug_struct("PeerClient").field("connections", &n).finish_non_exhaustive()
    }
}

/// Transport settings for peer connections: a lost peer (a crash sends no close) is noticed
/// after [`PEER_IDLE`] of silence. Gateways of a cluster are close to each other, so a
/// keep-alive every second costs nothing.
fn peer_transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(quinn::IdleTimeout::try_from(PEER_IDLE).ok());
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t.initial_rtt(Duration::from_millis(100));
    t.max_concurrent_bidi_streams(0u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t
}

impl PeerClient {
    /// A client presenting this gateway's certificate `chain` and `key`, trusting servers
    /// certified by `ca` (the cluster's).
    pub fn new(
        ca: &CertificateDer<'static>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        let tls = crate::tls::mutual_client(ca, chain, key, postern_proto::ALPN_PEER)?;
        let quic = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::new(peer_transport()));
        Ok(Self { config, endpoints: Mutex::new((None, None)), connections: Mutex::new(HashMap::new()) })
    }

    fn endpoint(&self, to: SocketAddr) -> Result<quinn::Endpoint, OpenError> {
        let mut eps = self.endpoints.lock().map_err(|_| OpenError::Tunnel("peer endpoints poisoned".into()))?;
        let slot = if to.is_ipv4() { &mut eps.0 } else { &mut eps.1 };
        if let Some(ep) = slot {
            return Ok(ep.clone());
        }
        let bind: SocketAddr = if to.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
        let ep = quinn::Endpoint::client(bind).map_err(|e| OpenError::Tunnel(format!("peer endpoint: {e}")))?;
        *slot = Some(ep.clone());
        Ok(ep)
    }

    /// The connection to gateway `id` at `address` (`host:port`), made if there is none.
    async fn connection(&self, id: &str, address: &str) -> Result<quinn::Connection, OpenError> {
        let live = self.connections.lock().ok().and_then(|c| c.get(id).cloned());
        if let Some(conn) = live.filter(|c| c.close_reason().is_none()) {
            return Ok(conn);
        }
        let unreachable = |e: String| OpenError::Tunnel(format!("cannot reach gateway {id} at {address}: {e}"));
        let to = tokio::time::timeout(PEER_TIMEOUT, tokio::net::lookup_host(address))
            .await
            .map_err(|_| unreachable("name lookup timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?
            .next()
            .ok_or_else(|| unreachable("no address".into()))?;
        let endpoint = self.endpoint(to)?;
        let connecting = endpoint
            .connect_with(self.config.clone(), to, &gateway_cert_name(id))
            .map_err(|e| unreachable(e.to_string()))?;
        let conn = tokio::time::timeout(PEER_TIMEOUT, connecting)
            .await
            .map_err(|_| unreachable("timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        if let Ok(mut c) = self.connections.lock() {
            c.insert(id.to_owned(), conn.clone());
        }
        Ok(conn)
    }

    /// Open a session with `request` to agent `agent_id` through gateway `id` at `address`.
    /// The answer is the agent's, as for an agent connected here.
    pub async fn open_session(
        &self,
        id: &str,
        address: &str,
        agent_id: &str,
        request: SessionRequest,
    ) -> Result<SessionStream, OpenError> {
        if agent_id.len() > MAX_AGENT_ID || agent_id.contains('\n') {
            return Err(OpenError::Tunnel("agent id too long".into()));
        }
        let conn = self.connection(id, address).await?;
        let setup = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| OpenError::Tunnel(e.to_string()))?;
            send.write_all(format!("{agent_id}\n").as_bytes()).await.map_err(|e| OpenError::Tunnel(e.to_string()))?;
            let lost = |e: std::io::Error| OpenError::Tunnel(format!("gateway {id}: {e}"));
            match recv.read_u8().await.map_err(lost)? {
                HERE => Ok((send, recv)),
                NOT_HERE => {
                    let len = recv.read_u16().await.map_err(lost)?;
                    let mut reason = vec![0u8; usize::from(len).min(MAX_REASON)];
                    AsyncReadExt::read_exact(&mut recv, &mut reason).await.map_err(lost)?;
                    debug!(gateway = id, reason = %String::from_utf8_lossy(&reason), "peer has no such agent");
                    Err(OpenError::Offline)
                }
                other => Err(OpenError::Tunnel(format!("gateway {id} answered {other}"))),
            }
        };
        let (send, recv) =
            tokio::time::timeout(PEER_TIMEOUT, setup).await.map_err(|_| OpenError::Timeout(PEER_TIMEOUT))??;
        // A violation by an agent reached through a peer ends this session only: the agent's
        // connection is the peer's to close.
        let mut stream = crate::server::open_on(
            SendStream::Quic(send),
            RecvStream::Quic(recv),
            ViolationReporter::detached(),
            request,
        )
        .await?;
        stream.via = Some(id.to_owned());
        Ok(stream)
    }

    /// Close every peer connection (at shutdown).
    pub fn close(&self) {
        if let Ok(mut c) = self.connections.lock() {
            for conn in c.values() {
                conn.close(close::SHUTDOWN.into(), b"gateway shutting down");
            }
            c.clear();
        }
    }
}

/// Log once that a peer connection was refused (not a gateway certificate).
pub(crate) fn refused(remote: SocketAddr, why: &str) {
    crate::warn_limited!(%remote, why, "refused a peer connection");
}
