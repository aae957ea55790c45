//! rustls and quinn configuration for both ends, always with the ring provider and TLS 1.3.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::pki::ca_pin;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("tls configuration: {0}")]
    Verifier(String),
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Timers shared by both ends. The agent sends keep-alives well below the idle timeout so
/// NAT bindings and the gateway's view of the agent stay fresh.
#[derive(Debug, Clone, Copy)]
pub struct TransportTimers {
    pub keep_alive: Duration,
    pub idle_timeout: Duration,
}

impl Default for TransportTimers {
    fn default() -> Self {
        // 5 s, not more: after a gateway crash and restart, an agent learns its connection is
        // gone from the stateless reset answering its next packet, so this bounds how long
        // it stays away from a restarted gateway.
        Self { keep_alive: Duration::from_secs(5), idle_timeout: Duration::from_secs(30) }
    }
}

impl TransportTimers {
    /// An agent with several gateways to choose from: keep-alives every 2 s and a 5 s idle
    /// timeout (the smaller of the two ends' applies to both). The idle timer restarts with
    /// the first keep-alive sent after the last packet received, so a gateway killed without
    /// a word is noticed within 7 s and the agent is on another within the 10 s a cluster
    /// promises. Never longer than `self`.
    pub fn for_failover(self) -> Self {
        Self {
            keep_alive: self.keep_alive.min(Duration::from_secs(2)),
            idle_timeout: self.idle_timeout.min(Duration::from_secs(5)),
        }
    }
}

/// Flow-control windows sized for the bandwidth-delay product of a WAN link: 16 MiB in
/// flight on one stream is 1.3 Gbit/s at 100 ms RTT (quinn's default, 1.25 MB, caps one
/// stream at 25 MB/s at 50 ms). They are limits, not allocations: an idle connection holds
/// none of it (benches/wan.sh, docs/benchmarks.md "Over a WAN link").
const STREAM_RECEIVE_WINDOW: u32 = 16 << 20;
/// All streams of one connection together. Every stream shares it, so it must not be what
/// stops an interactive session while bulk streams wait for a slow reader: at 32 MiB, two
/// bulk streams whose readers lagged used all of it and keystrokes waited seconds for credit
/// (1,000 shells and 100 transfers on 2 cores). What one peer can make the other buffer is
/// bounded per stream ([`STREAM_RECEIVE_WINDOW`]) times the streams it may have open.
const CONNECTION_RECEIVE_WINDOW: u32 = 1 << 30;
/// Bytes a sender keeps for retransmission until acknowledged, over all streams.
const SEND_WINDOW: u64 = 32 << 20;

fn transport(timers: TransportTimers, agent_side: bool) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(quinn::IdleTimeout::try_from(timers.idle_timeout).ok());
    // Agents and gateways are usually close; a lower first RTT guess makes handshake
    // retransmissions (and so reconnects to a restarted gateway) quicker.
    t.initial_rtt(Duration::from_millis(100));
    t.stream_receive_window(STREAM_RECEIVE_WINDOW.into());
    t.receive_window(CONNECTION_RECEIVE_WINDOW.into());
    t.send_window(SEND_WINDOW);
    // CUBIC on a short path, BBR on a long one (crate::congestion has why).
    t.congestion_controller_factory(Arc::new(crate::congestion::ByPathConfig::default()));
    if agent_side {
        t.keep_alive_interval(Some(timers.keep_alive));
        // Sessions are streams the gateway opens towards the agent: this bounds concurrent
        // sessions per agent at the protocol level.
        t.max_concurrent_bidi_streams(256u32.into());
        t.max_concurrent_uni_streams(0u32.into());
    } else {
        // An agent opens one control stream (plus one on enrollment); nothing else.
        t.max_concurrent_bidi_streams(2u32.into());
        t.max_concurrent_uni_streams(0u32.into());
    }
    t
}

/// What the tunnel's UDP sockets ask the kernel to buffer, each way. The kernel's default
/// (`net.core.rmem_default`, 208 KiB on Linux) overflows when a busy receiver falls behind
/// a sender for a moment, and every datagram dropped there costs a retransmission: with 1,000
/// shells and 100 transfers on 2 cores, about 630,000 drops over two runs with the default,
/// under 5,000 a run with this. The kernel caps the request at `net.core.rmem_max` and
/// `wmem_max` (docs/operations.md says how to raise them).
pub const UDP_BUFFER: usize = 4 << 20;

/// Ask for [`UDP_BUFFER`] on a tunnel UDP socket, both ways; what the kernel grants is logged
/// at debug level (it may cap it).
pub fn size_udp_buffers(socket: &std::net::UdpSocket) {
    let s = socket2::SockRef::from(socket);
    let _ = s.set_recv_buffer_size(UDP_BUFFER);
    let _ = s.set_send_buffer_size(UDP_BUFFER);
    tracing::debug!(
        recv = s.recv_buffer_size().unwrap_or(0),
        send = s.send_buffer_size().unwrap_or(0),
        "tunnel UDP socket buffers"
    );
}

/// Gateway side, the TLS of both transports: enrollment (no client certificate) and the
/// tunnel (client certificate required, checked after the handshake by ALPN); with
/// `peering`, also the ALPN of the cluster's other gateways (QUIC only).
pub fn server_tls(
    ca: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    peering: bool,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone())?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![
        postern_proto::ALPN_TUNNEL.to_vec(),
        postern_proto::ALPN_ENROLL.to_vec(),
        postern_proto::ALPN_TIME.to_vec(),
    ];
    if peering {
        tls.alpn_protocols.push(postern_proto::ALPN_PEER.to_vec());
    }
    tls.max_early_data_size = 0;
    Ok(tls)
}

/// Gateway side, QUIC: one endpoint serves enrollment, the tunnel and (with `peering`) the
/// cluster's other gateways.
pub fn server_config(
    ca: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    timers: TransportTimers,
    peering: bool,
) -> Result<quinn::ServerConfig, TlsError> {
    let tls = server_tls(ca, chain, key, peering)?;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(transport(timers, false)));
    // Address validation costs a round trip; only ask for it under load (quinn's default
    // retry policy), not on every reconnect.
    Ok(cfg)
}

/// Agent side, authenticated tunnel: trust exactly the CA pinned at enrollment.
/// `sessions` is how many session streams the gateway may have open at once (the agent's
/// `[limits] max_sessions`): the agent refuses the one past its limit itself, with a reason.
pub fn agent_tunnel_config(
    ca: &CertificateDer<'static>,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    timers: TransportTimers,
    sessions: u32,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut cfg = finish_client(agent_tunnel_tls(ca, cert, key)?, timers)?;
    let mut t = transport(timers, true);
    // One more than the limit: the session past it reaches the agent and is refused with
    // "at its limit of N sessions" instead of waiting for a stream.
    t.max_concurrent_bidi_streams(sessions.saturating_add(1).into());
    cfg.transport_config(Arc::new(t));
    Ok(cfg)
}

/// The TLS of an agent's tunnel, either transport: trust exactly the CA pinned at
/// enrollment, present the agent's certificate.
pub fn agent_tunnel_tls(
    ca: &CertificateDer<'static>,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ClientConfig, TlsError> {
    mutual_client(ca, vec![cert], key, postern_proto::ALPN_TUNNEL)
}

/// A TLS 1.3 client trusting exactly `ca`, presenting `chain` and `key`, speaking `alpn`:
/// an agent's tunnel, or a gateway towards its peers (crate::peer).
pub(crate) fn mutual_client(
    ca: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone())?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// Agent side, the clock query (`postern-time/1`) of `postern-agent doctor`, both
/// transports: the tunnel's trust and certificate, another ALPN.
pub fn agent_time_tls(
    ca: &CertificateDer<'static>,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    timers: TransportTimers,
) -> Result<(quinn::ClientConfig, rustls::ClientConfig), TlsError> {
    let tls = mutual_client(ca, vec![cert], key, postern_proto::ALPN_TIME)?;
    Ok((finish_client(tls.clone(), timers)?, tls))
}

/// Agent side, enrollment: no CA yet, only a pin. The server must present the CA whose
/// SHA-256 matches the pin in its chain, and its certificate must verify against that CA.
pub fn agent_enroll_config(pin: &str, timers: TransportTimers) -> Result<quinn::ClientConfig, TlsError> {
    finish_client(agent_enroll_tls(pin)?, timers)
}

/// The TLS of an enrollment, either transport (see [`agent_enroll_config`]).
pub fn agent_enroll_tls(pin: &str) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PinnedCaVerifier { pin: pin.to_owned(), provider: provider.clone() });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![postern_proto::ALPN_ENROLL.to_vec()];
    Ok(tls)
}

fn finish_client(tls: rustls::ClientConfig, timers: TransportTimers) -> Result<quinn::ClientConfig, TlsError> {
    let quic = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport(timers, true)));
    Ok(cfg)
}

/// Message a verifier failure carries so the agent can tell the operator what happened.
pub const PIN_MISMATCH: &str = "the gateway's CA does not match --ca-pin";

#[derive(Debug)]
struct PinnedCaVerifier {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| ca_pin(c) == self.pin)
            .ok_or_else(|| rustls::Error::General(PIN_MISMATCH.into()))?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
