//! How an agent reaches a gateway: QUIC first, and HTTP/2 over TLS over TCP when no QUIC
//! handshake completes in time (UDP dropped on the way), directly or through an HTTP proxy
//! (docs/protocol.md "Transports").

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use serde::Deserialize;
use tokio::net::TcpStream;

use crate::agent::Candidate;
use crate::pki::GATEWAY_SERVER_NAME;
use crate::tls::TransportTimers;
use crate::transport::Connection;
use crate::transport::proxy::Proxy;

/// How long a QUIC handshake may take before `auto` tries TCP. Short: on a network that
/// drops UDP nothing ever answers, and every second here is a second offline.
pub const QUIC_PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the TCP connection (through the proxy, if any), TLS and HTTP/2 set-up may take.
pub const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// While on TCP, how often `auto` tries QUIC again by default.
pub const DEFAULT_QUIC_RETRY: Duration = Duration::from_secs(60);

/// Which transports the agent may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// QUIC, falling back to TCP (and moving back to QUIC when it works again).
    #[default]
    Auto,
    Quic,
    Tcp,
}

impl FromStr for TransportChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "quic" => Ok(Self::Quic),
            "tcp" => Ok(Self::Tcp),
            other => Err(format!("unknown transport {other:?}: expected auto, quic or tcp")),
        }
    }
}

impl std::fmt::Display for TransportChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Quic => "quic",
            Self::Tcp => "tcp",
        })
    }
}

/// The agent's network settings: `[agent]` in its configuration file, and flags.
#[derive(Debug, Clone)]
pub struct Route {
    pub choice: TransportChoice,
    /// An HTTP proxy for the TCP transport (QUIC never goes through it).
    pub proxy: Option<Proxy>,
    /// While on TCP under `auto`: how often to try QUIC again.
    pub quic_retry: Duration,
    /// The gateway's TCP port when it is not the QUIC port (`[tunnel] tcp_listen` on
    /// another port, say 443).
    pub tcp_port: Option<u16>,
}

impl Default for Route {
    fn default() -> Self {
        Self { choice: TransportChoice::Auto, proxy: None, quic_retry: DEFAULT_QUIC_RETRY, tcp_port: None }
    }
}

/// A connection made, and the QUIC endpoint under it (to wait for its close at the end).
#[derive(Debug)]
pub struct Dialed {
    pub conn: Connection,
    pub endpoint: Option<quinn::Endpoint>,
}

impl Dialed {
    /// Let the close reach the gateway (QUIC: wait for the endpoint to go idle, briefly).
    pub async fn wait_idle(&self) {
        match &self.endpoint {
            Some(ep) => {
                let _ = tokio::time::timeout(Duration::from_secs(2), ep.wait_idle()).await;
            }
            None => {
                let _ = tokio::time::timeout(Duration::from_secs(1), self.conn.closed()).await;
            }
        }
    }
}

/// The client configurations for one purpose (tunnel or enrollment), both transports.
#[derive(Clone)]
pub struct Clients {
    pub quic: quinn::ClientConfig,
    pub tls: Arc<rustls::ClientConfig>,
    /// Sessions the gateway may have open at once on a tunnel connection (the agent's
    /// `max_sessions`; 0 for an enrollment).
    pub sessions: u32,
}

/// A QUIC connection to `candidate`, within `timeout`.
pub async fn quic(clients: &Clients, candidate: &Candidate, timeout: Duration) -> anyhow::Result<Dialed> {
    let addr = candidate.addr;
    let bind: std::net::SocketAddr = if addr.is_ipv6() { "[::]:0".parse()? } else { "0.0.0.0:0".parse()? };
    let socket = std::net::UdpSocket::bind(bind).context("opening a UDP socket")?;
    crate::tls::size_udp_buffers(&socket);
    let runtime = quinn::default_runtime().context("no async runtime for QUIC")?;
    let endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime)
        .context("opening a UDP socket")?;
    let connecting = endpoint.connect_with(clients.quic.clone(), addr, GATEWAY_SERVER_NAME)?;
    let conn = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| anyhow!("no QUIC answer from {} ({addr}) within {timeout:?}", candidate.gateway))?
        .map_err(|e| tls_error(e.to_string(), candidate))?;
    Ok(Dialed { conn: Connection::Quic(conn), endpoint: Some(endpoint) })
}

fn tls_error(e: String, candidate: &Candidate) -> anyhow::Error {
    if e.contains(crate::tls::PIN_MISMATCH) {
        anyhow!("gateway {} ({}): {}", candidate.gateway, candidate.addr, crate::tls::PIN_MISMATCH)
    } else {
        anyhow!("connecting to gateway {} ({}): {e}", candidate.gateway, candidate.addr)
    }
}

/// `candidate` with its port replaced by `port` (`host:port`, `[v6]:port`).
fn on_port(candidate: &Candidate, port: Option<u16>) -> Candidate {
    let Some(port) = port else { return candidate.clone() };
    let gateway = match candidate.gateway.rsplit_once(':') {
        Some((host, _)) => format!("{host}:{port}"),
        None => format!("{}:{port}", candidate.gateway),
    };
    let mut addr = candidate.addr;
    addr.set_port(port);
    Candidate { gateway, addr, resolved: candidate.resolved }
}

/// A TCP-transport connection to `candidate` (through `proxy` when given), within
/// [`TCP_CONNECT_TIMEOUT`].
pub async fn tcp(
    clients: &Clients,
    candidate: &Candidate,
    proxy: Option<&Proxy>,
    timers: TransportTimers,
) -> anyhow::Result<Dialed> {
    let setup = async {
        let stream = match proxy {
            Some(p) => p.connect(&candidate.gateway, TCP_CONNECT_TIMEOUT).await?,
            None => TcpStream::connect(candidate.addr)
                .await
                .map_err(|e| std::io::Error::new(e.kind(), format!("TCP connection to {}: {e}", candidate.addr)))?,
        };
        crate::transport::tcp::tune_socket(&stream, timers);
        let remote = stream.peer_addr()?;
        let tls = clients.tls.clone();
        crate::transport::tcp::connect(stream, remote, tls, GATEWAY_SERVER_NAME, timers, clients.sessions).await
    };
    let conn = tokio::time::timeout(TCP_CONNECT_TIMEOUT, setup)
        .await
        .map_err(|_| anyhow!("no TCP answer from {} within {TCP_CONNECT_TIMEOUT:?}", candidate.gateway))?
        .map_err(|e| tls_error(e.to_string(), candidate))?;
    Ok(Dialed { conn: Connection::Tcp(conn), endpoint: None })
}

/// Remembers that QUIC did not work, so that reconnects under `auto` go straight to TCP
/// until it is time to try QUIC again.
#[derive(Debug, Default)]
pub struct QuicMemory {
    failed_at: Option<Instant>,
}

impl QuicMemory {
    fn skip_quic(&self, retry: Duration) -> bool {
        self.failed_at.is_some_and(|t| t.elapsed() < retry)
    }
    pub fn worked(&mut self) {
        self.failed_at = None;
    }
    fn failed(&mut self) {
        self.failed_at = Some(Instant::now());
    }
}

/// Connect to `candidate` as `route` allows: under `auto`, QUIC within
/// [`QUIC_PROBE_TIMEOUT`] and then TCP (a pin mismatch is final: it is not the network).
pub async fn dial(
    route: &Route,
    clients: &Clients,
    candidate: &Candidate,
    timers: TransportTimers,
    memory: &mut QuicMemory,
) -> anyhow::Result<Dialed> {
    let quic_first = match route.choice {
        TransportChoice::Quic => return quic(clients, candidate, QUIC_PROBE_TIMEOUT).await,
        TransportChoice::Tcp => false,
        TransportChoice::Auto => candidate.resolved && !memory.skip_quic(route.quic_retry),
    };
    let mut quic_error = None;
    if quic_first {
        match quic(clients, candidate, QUIC_PROBE_TIMEOUT).await {
            Ok(d) => {
                memory.worked();
                return Ok(d);
            }
            Err(e) if e.to_string().contains(crate::tls::PIN_MISMATCH) => return Err(e),
            Err(e) => {
                tracing::info!(gateway = %candidate.gateway, error = %format!("{e:#}"), "QUIC did not connect; trying TCP");
                quic_error = Some(e);
            }
        }
    }
    match tcp(clients, &on_port(candidate, route.tcp_port), route.proxy.as_ref(), timers).await {
        Ok(d) => {
            if quic_error.is_some() {
                memory.failed();
            }
            Ok(d)
        }
        Err(e) => match quic_error {
            Some(q) => Err(anyhow!("{q:#}; then {e:#}")),
            None => Err(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::TransportChoice;

    #[test]
    fn transport_choices_parse() {
        assert_eq!("auto".parse::<TransportChoice>(), Ok(TransportChoice::Auto));
        assert_eq!("tcp".parse::<TransportChoice>(), Ok(TransportChoice::Tcp));
        assert!("udp".parse::<TransportChoice>().unwrap_err().contains("auto, quic or tcp"));
    }
}
