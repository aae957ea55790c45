//! Shared set-up for benchmarks: an in-process gateway listener and a real agent on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use postern_proto::{EnrollRequest, ErrorCode, Hello};
use postern_tunnel::CancellationToken;
use postern_tunnel::agent::{self, Backoff, JoinOptions, RunOptions};
use postern_tunnel::pki::CertAuthority;
use postern_tunnel::server::{AgentDirectory, AgentRegistry, EnrolledAgent, Refusal, TunnelServer, TunnelSettings};
use postern_tunnel::services::LocalLimits;
use postern_tunnel::tls::TransportTimers;

/// Admits everyone; enrollment accepts the token "bench" any number of times.
struct OpenDirectory;

impl AgentDirectory for OpenDirectory {
    async fn enroll(&self, token: &str, _req: &EnrollRequest, _remote: SocketAddr) -> Result<EnrolledAgent, Refusal> {
        if token != "bench" {
            return Err(Refusal { code: ErrorCode::TokenUnknown, message: "unknown token".into() });
        }
        Ok(EnrolledAgent { agent_id: "ag-bench".into(), name: "bench".into() })
    }
    async fn admit(
        &self,
        agent_id: &str,
        _hello: &Hello,
        _remote: SocketAddr,
        _transport: postern_tunnel::transport::Transport,
    ) -> Result<String, Refusal> {
        Ok(agent_id.to_owned())
    }
    async fn departed(&self, _agent_id: &str) {}
    async fn renewed(&self, _agent_id: &str, _remote: SocketAddr, _serial_hex: &str, _not_after: SystemTime) {}
    async fn protocol_violation(&self, _remote: SocketAddr, _agent_id: Option<&str>, _error: &str) {}
}

pub struct InProcess {
    pub registry: AgentRegistry,
    pub agent_id: String,
    pub shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

/// Start a gateway listener and one enrolled agent in this process; returns once online.
pub async fn start_in_process() -> InProcess {
    start_in_process_on(postern_tunnel::dial::TransportChoice::Auto).await
}

/// As [`start_in_process`], the agent on the transport `choice` says (`Auto`: QUIC here).
pub async fn start_in_process_on(choice: postern_tunnel::dial::TransportChoice) -> InProcess {
    let ca = Arc::new(CertAuthority::generate("bench CA").unwrap());
    let server = TunnelServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        ca.clone(),
        Arc::new(OpenDirectory),
        TunnelSettings { tcp_listen: Some("127.0.0.1:0".parse().unwrap()), ..TunnelSettings::default() },
        &[1u8; 32],
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let registry = server.registry();
    let shutdown = CancellationToken::new();
    tokio::spawn(server.serve(shutdown.clone()));
    let dir = tempfile::tempdir().unwrap();
    let state = agent::join(&JoinOptions {
        gateways: vec![addr.to_string()],
        token: "bench".into(),
        ca_pin: ca.pin(),
        state_dir: dir.path().to_owned(),
        route: postern_tunnel::dial::Route { choice, ..Default::default() },
    })
    .await
    .unwrap();
    let opts = RunOptions {
        state_dir: dir.path().to_owned(),
        gateways: Vec::new(),
        limits: LocalLimits::default(),
        backoff: Backoff::default(),
        timers: TransportTimers::default(),
        route: postern_tunnel::dial::Route { choice, ..Default::default() },
    };
    tokio::spawn(agent::run(opts, shutdown.clone()));
    while registry.get(&state.agent_id).is_none() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    InProcess { registry, agent_id: state.agent_id, shutdown, _dir: dir }
}

/// A TCP server on 127.0.0.1 for forwarding benchmarks. Each connection sends one byte
/// selecting the mode: `u` reads to EOF then answers one byte (upload sink);
/// `d` + u64 count writes that many zero bytes then closes (download source).
pub async fn start_tcp_target() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let _ = sock.set_nodelay(true);
            tokio::spawn(async move {
                let mut mode = [0u8; 1];
                if sock.read_exact(&mut mode).await.is_err() {
                    return;
                }
                if mode[0] == b'u' {
                    let mut buf = vec![0u8; 256 * 1024];
                    while let Ok(n) = sock.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                    let _ = sock.write_all(b"k").await;
                } else {
                    let count = sock.read_u64().await.unwrap_or(0);
                    let buf = vec![0u8; 256 * 1024];
                    let mut left = count;
                    while left > 0 {
                        let n = left.min(buf.len() as u64) as usize;
                        if sock.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                }
            });
        }
    });
    addr
}
