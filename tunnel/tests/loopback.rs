#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! Tunnel integration tests: a gateway listener and real agents in one process on 127.0.0.1.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use postern_proto::*;
use postern_tunnel::CancellationToken;
use postern_tunnel::agent::{self, Backoff, JoinOptions, RunOptions};
use postern_tunnel::dial::{Route, TransportChoice};
use postern_tunnel::pki::CertAuthority;
use postern_tunnel::server::{AgentDirectory, AgentRegistry, EnrolledAgent, Refusal, TunnelServer, TunnelSettings};
use postern_tunnel::services::LocalLimits;
use postern_tunnel::tls::TransportTimers;
use postern_tunnel::transport::Transport;

#[derive(Default)]
struct MemDirectory {
    tokens: Mutex<HashMap<String, bool>>, // token -> used
    revoked: Mutex<Vec<String>>,
    violations: Mutex<Vec<String>>,
    renewals: Mutex<Vec<String>>, // serials
}

impl AgentDirectory for MemDirectory {
    async fn enroll(&self, token: &str, req: &EnrollRequest, _remote: SocketAddr) -> Result<EnrolledAgent, Refusal> {
        let mut tokens = self.tokens.lock().unwrap();
        match tokens.get_mut(token) {
            None => Err(Refusal { code: ErrorCode::TokenUnknown, message: "unknown token".into() }),
            Some(used) if *used => Err(Refusal { code: ErrorCode::TokenUsed, message: "token already used".into() }),
            Some(used) => {
                *used = true;
                Ok(EnrolledAgent { agent_id: format!("ag-{token}"), name: req.hostname.clone() })
            }
        }
    }
    async fn admit(
        &self,
        agent_id: &str,
        _hello: &Hello,
        _remote: SocketAddr,
        _transport: Transport,
    ) -> Result<String, Refusal> {
        if self.revoked.lock().unwrap().iter().any(|r| r == agent_id) {
            return Err(Refusal { code: ErrorCode::AgentRevoked, message: "agent revoked".into() });
        }
        Ok(agent_id.to_owned())
    }
    async fn departed(&self, _agent_id: &str) {}
    async fn renewed(&self, _agent_id: &str, _remote: SocketAddr, serial_hex: &str, _not_after: SystemTime) {
        self.renewals.lock().unwrap().push(serial_hex.to_owned());
    }
    async fn protocol_violation(&self, _remote: SocketAddr, _agent_id: Option<&str>, error: &str) {
        self.violations.lock().unwrap().push(error.to_owned());
    }
}

struct Gateway {
    addr: SocketAddr,
    registry: AgentRegistry,
    directory: Arc<MemDirectory>,
    ca: Arc<CertAuthority>,
    shutdown: CancellationToken,
    peers: Option<Arc<postern_tunnel::peer::PeerClient>>,
}

async fn gateway(settings: TunnelSettings) -> Gateway {
    gateway_with(Arc::new(CertAuthority::generate("test agent CA").unwrap()), settings).await
}

/// A gateway with the CA `ca` (gateways of one cluster share it).
async fn gateway_with(ca: Arc<CertAuthority>, mut settings: TunnelSettings) -> Gateway {
    // Both transports, on the same port number.
    settings.tcp_listen.get_or_insert("127.0.0.1:0".parse().unwrap());
    let directory = Arc::new(MemDirectory::default());
    let server =
        TunnelServer::bind("127.0.0.1:0".parse().unwrap(), ca.clone(), directory.clone(), settings, &[7u8; 32])
            .unwrap();
    let addr = server.local_addr().unwrap();
    let registry = server.registry();
    let peers = server.peers();
    let shutdown = CancellationToken::new();
    tokio::spawn(server.serve(shutdown.clone()));
    Gateway { addr, registry, directory, ca, shutdown, peers }
}

async fn wait_online(registry: &AgentRegistry, agent_id: &str) {
    let start = Instant::now();
    while registry.get(agent_id).is_none() {
        assert!(start.elapsed() < Duration::from_secs(10), "agent {agent_id} did not come online");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn route(choice: TransportChoice) -> Route {
    Route { choice, ..Route::default() }
}

async fn join_and_run(
    gw: &Gateway,
    token: &str,
    limits: LocalLimits,
) -> (tempfile::TempDir, String, CancellationToken) {
    join_and_run_on(gw, token, limits, TransportChoice::Auto).await
}

/// Join and run an agent that uses `choice`; it is online on that transport (`auto` on
/// loopback: QUIC) when this returns.
async fn join_and_run_on(
    gw: &Gateway,
    token: &str,
    limits: LocalLimits,
    choice: TransportChoice,
) -> (tempfile::TempDir, String, CancellationToken) {
    join_and_run_route(gw, token, limits, route(choice)).await
}

async fn join_and_run_route(
    gw: &Gateway,
    token: &str,
    limits: LocalLimits,
    route: Route,
) -> (tempfile::TempDir, String, CancellationToken) {
    let choice = route.choice;
    gw.directory.tokens.lock().unwrap().insert(token.into(), false);
    let dir = tempfile::tempdir().unwrap();
    let state = agent::join(&JoinOptions {
        gateways: vec![gw.addr.to_string()],
        token: token.into(),
        ca_pin: gw.ca.pin(),
        state_dir: dir.path().to_owned(),
        route: route.clone(),
    })
    .await
    .unwrap();
    let stop = CancellationToken::new();
    let opts = RunOptions {
        state_dir: dir.path().to_owned(),
        gateways: Vec::new(),
        limits,
        backoff: Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
            stable_after: Duration::from_secs(5),
        },
        timers: TransportTimers::default(),
        route,
    };
    tokio::spawn(agent::run(opts, stop.clone()));
    wait_online(&gw.registry, &state.agent_id).await;
    let expected = if choice == TransportChoice::Tcp { Transport::Tcp } else { Transport::Quic };
    assert_eq!(gw.registry.get(&state.agent_id).unwrap().transport, expected);
    (dir, state.agent_id, stop)
}

struct Output {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Exit,
}

async fn collect(stream: &mut postern_tunnel::server::SessionStream) -> Output {
    let mut out = Output { stdout: vec![], stderr: vec![], exit: Exit { code: -1, signal: None } };
    loop {
        match tokio::time::timeout(Duration::from_secs(20), read_frame(&mut stream.recv, StreamKind::Session))
            .await
            .unwrap()
            .unwrap()
        {
            Some(Message::Stdout(d)) => out.stdout.extend(d),
            Some(Message::Stderr(d)) => out.stderr.extend(d),
            Some(Message::Exit(e)) => out.exit = e,
            None => return out,
            Some(other) => panic!("unexpected {other:?}"),
        }
    }
}

/// An exec as the agent's own user, which may be root (these tests are not about root).
fn exec_req(cmd: &str) -> SessionRequest {
    SessionRequest::Exec(ExecRequest {
        command: ExecCommand::Shell(cmd.into()),
        env: vec![],
        run_as: None,
        allow_root: true,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_run_as_root_only_when_the_gateway_allows_root() {
    let am_root = nix::unistd::Uid::current().is_root();
    let gw = gateway(TunnelSettings::default()).await;
    let (_dir, id, _stop) = join_and_run(&gw, "t-root", LocalLimits::default()).await;
    let not_allowed = |cmd: &str| {
        SessionRequest::Exec(ExecRequest {
            command: ExecCommand::Shell(cmd.into()),
            env: vec![],
            run_as: None,
            allow_root: false,
        })
    };
    let shell = SessionRequest::Shell(ShellRequest {
        term: "xterm".into(),
        cols: 80,
        rows: 24,
        env: vec![],
        run_as: None,
        command: Some("id -u".into()),
        allow_root: false,
    });
    for request in [not_allowed("id -u"), shell] {
        match gw.registry.open_session(&id, request).await {
            // An agent running as root refuses: the session would run as uid 0.
            Err(e) => {
                assert!(am_root, "a non-root agent refused: {e}");
                assert!(e.to_string().contains("allow_root"), "{e}");
            }
            Ok(mut s) => {
                assert!(!am_root, "an agent running as root ran a session without allow_root");
                let out = collect(&mut s).await;
                assert_ne!(String::from_utf8_lossy(&out.stdout).trim(), "0");
            }
        }
    }
    // With allow_root the agent's own user, root or not, runs it.
    let out = collect(&mut gw.registry.open_session(&id, exec_req("id -u")).await.unwrap()).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), nix::unistd::Uid::current().to_string());
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_stdin_stdout_stderr_and_exit_status() {
    exec_stdin_stdout_stderr_and_exit_status_on(TransportChoice::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_stdin_stdout_stderr_and_exit_status_over_tcp() {
    exec_stdin_stdout_stderr_and_exit_status_on(TransportChoice::Tcp).await;
}

async fn exec_stdin_stdout_stderr_and_exit_status_on(choice: TransportChoice) {
    let gw = gateway(TunnelSettings::default()).await;
    let (_dir, id, _stop) = join_and_run_on(&gw, "t1", LocalLimits::default(), choice).await;

    let mut s = gw.registry.open_session(&id, exec_req("echo out; echo err >&2; exit 3")).await.unwrap();
    let out = collect(&mut s).await;
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.exit.code, 3);

    // stdin is piped through, EOF closes it.
    let mut s = gw.registry.open_session(&id, exec_req("tr a-z A-Z")).await.unwrap();
    write_frame(&mut s.send, &Message::Stdin(b"hello tunnel".to_vec())).await.unwrap();
    write_frame(&mut s.send, &Message::Eof).await.unwrap();
    let out = collect(&mut s).await;
    assert_eq!(out.stdout, b"HELLO TUNNEL");
    assert_eq!(out.exit.code, 0);

    // A signal reaches the process group.
    let mut s = gw.registry.open_session(&id, exec_req("echo ready; exec sleep 30")).await.unwrap();
    let first = read_frame(&mut s.recv, StreamKind::Session).await.unwrap();
    assert_eq!(first, Some(Message::Stdout(b"ready\n".to_vec())));
    write_frame(&mut s.send, &Message::Signal(Signal { name: "TERM".into() })).await.unwrap();
    let out = collect(&mut s).await;
    assert_eq!(out.exit, Exit { code: 143, signal: Some("TERM".into()) });
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pty_shell_with_resize() {
    pty_shell_with_resize_on(TransportChoice::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pty_shell_with_resize_over_tcp() {
    pty_shell_with_resize_on(TransportChoice::Tcp).await;
}

async fn pty_shell_with_resize_on(choice: TransportChoice) {
    let gw = gateway(TunnelSettings::default()).await;
    let (_dir, id, _stop) = join_and_run_on(&gw, "t2", LocalLimits::default(), choice).await;
    let mut s = gw
        .registry
        .open_session(
            &id,
            SessionRequest::Shell(ShellRequest {
                term: "xterm-256color".into(),
                cols: 100,
                rows: 30,
                env: vec![],
                run_as: None,
                command: Some("stty size; echo TERM=$TERM; test -t 0 && echo tty; read line; stty size; exit 7".into()),
                allow_root: true,
            }),
        )
        .await
        .unwrap();
    // Wait for the first size before resizing, so the order is certain.
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("tty") {
        match read_frame(&mut s.recv, StreamKind::Session).await.unwrap() {
            Some(Message::Stdout(d)) => seen.extend(d),
            other => panic!("unexpected {other:?}"),
        }
    }
    write_frame(&mut s.send, &Message::Resize(Resize { cols: 120, rows: 40 })).await.unwrap();
    write_frame(&mut s.send, &Message::Stdin(b"go\n".to_vec())).await.unwrap();
    let out = collect(&mut s).await;
    seen.extend(out.stdout);
    let text = String::from_utf8_lossy(&seen);
    assert!(text.contains("30 100"), "{text}");
    assert!(text.contains("TERM=xterm-256color"), "{text}");
    assert!(text.contains("40 120"), "{text}");
    assert_eq!(out.exit.code, 7);
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_forward_and_local_allow_list() {
    tcp_forward_and_local_allow_list_on(TransportChoice::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_forward_and_local_allow_list_over_tcp() {
    tcp_forward_and_local_allow_list_on(TransportChoice::Tcp).await;
}

async fn tcp_forward_and_local_allow_list_on(choice: TransportChoice) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = gateway(TunnelSettings::default()).await;
    // Only 127.0.0.1 allowed, so a refusal can be shown on loopback too (no traffic leaves
    // the machine even if the check were missing).
    let limits = LocalLimits { tcp_allow: vec!["127.0.0.1/32".parse().unwrap()], ..LocalLimits::default() };
    let (_dir, id, _stop) = join_and_run_on(&gw, "t3", limits, choice).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 5];
        sock.read_exact(&mut buf).await.unwrap();
        sock.write_all(b"echo:").await.unwrap();
        sock.write_all(&buf).await.unwrap();
    });
    let mut s = gw
        .registry
        .open_session(&id, SessionRequest::Tcp(TcpRequest { host: "127.0.0.1".into(), port }))
        .await
        .unwrap();
    s.send.write_all(b"hello").await.unwrap();
    s.send.finish().unwrap();
    let mut got = Vec::new();
    AsyncReadExt::read_to_end(&mut s.recv, &mut got).await.unwrap();
    assert_eq!(got, b"echo:hello");

    // Not on the agent's allow-list: refused by the agent, whatever the gateway wants, and
    // nothing is dialled (a listener there sees no connection).
    let other = std::net::TcpListener::bind("127.0.0.3:0").unwrap();
    other.set_nonblocking(true).unwrap();
    let other_port = other.local_addr().unwrap().port();
    let err = gw
        .registry
        .open_session(&id, SessionRequest::Tcp(TcpRequest { host: "127.0.0.3".into(), port: other_port }))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not allowed"), "{err}");
    assert!(other.accept().is_err(), "the agent connected to an address outside its tcp_allow");
    gw.shutdown.cancel();
}

/// Issue 15 item 8: a name is checked by what it resolves to, on the agent. `localhost`
/// resolves to loopback addresses only; with those denied, nothing reaches the listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_never_reaches_an_address_the_policy_denies() {
    use tokio::io::AsyncReadExt;
    let gw = gateway(TunnelSettings::default()).await;
    let (_dir, id, _stop) = join_and_run(&gw, "t-deny", LocalLimits::default()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let by_name = |deny: &[&str]| {
        SessionRequest::TcpByName(TcpByNameRequest {
            host: "localhost".into(),
            port,
            deny: deny.iter().map(|d| d.to_string()).collect(),
        })
    };
    for deny in [&["127.0.0.1/32", "::1/128"][..], &["127.0.0.0/8", "::/0"][..]] {
        let err = gw.registry.open_session(&id, by_name(deny)).await.unwrap_err();
        assert!(err.to_string().contains("denied by policy"), "{err}");
    }
    let err = gw.registry.open_session(&id, by_name(&["not a range"])).await.unwrap_err();
    assert!(err.to_string().contains("bad deny range"), "{err}");
    // Nothing connected to the listener.
    let accepted = tokio::time::timeout(Duration::from_millis(300), listener.accept()).await;
    assert!(accepted.is_err(), "a denied address was connected to: {accepted:?}");

    // Allowed: the agent says where it connected.
    let mut s = gw.registry.open_session(&id, by_name(&["10.0.0.0/8", "::/0"])).await.unwrap();
    let (sock, peer) = listener.accept().await.unwrap();
    assert_eq!(s.connected_to.as_deref(), Some(format!("127.0.0.1:{port}").as_str()), "{peer}");
    drop(sock);
    s.send.finish().unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), AsyncReadExt::read_to_end(&mut s.recv, &mut rest)).await;
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_single_use_and_pins_are_checked() {
    tokens_are_single_use_and_pins_are_checked_on(TransportChoice::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_single_use_and_pins_are_checked_over_tcp() {
    tokens_are_single_use_and_pins_are_checked_on(TransportChoice::Tcp).await;
}

async fn tokens_are_single_use_and_pins_are_checked_on(choice: TransportChoice) {
    let gw = gateway(TunnelSettings::default()).await;
    gw.directory.tokens.lock().unwrap().insert("once".into(), false);
    let dir = tempfile::tempdir().unwrap();
    let opts = |token: &str, pin: String| JoinOptions {
        gateways: vec![gw.addr.to_string()],
        token: token.into(),
        ca_pin: pin,
        state_dir: dir.path().to_owned(),
        route: route(choice),
    };
    agent::join(&opts("once", gw.ca.pin())).await.unwrap();
    let err = agent::join(&opts("once", gw.ca.pin())).await.unwrap_err();
    assert!(format!("{err:#}").contains("already used"), "{err:#}");
    let err = agent::join(&opts("never-issued", gw.ca.pin())).await.unwrap_err();
    assert!(format!("{err:#}").contains("unknown token"), "{err:#}");
    let other = CertAuthority::generate("other").unwrap();
    let err = agent::join(&opts("once", other.pin())).await.unwrap_err();
    assert!(format!("{err:#}").contains("does not match --ca-pin"), "{err:#}");

    // Key and state files are private.
    use std::os::unix::fs::PermissionsExt;
    for f in ["identity.pem", "ca.crt", "agent.toml"] {
        let mode = std::fs::metadata(dir.path().join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_agent_is_refused_and_run_returns_error() {
    revoked_agent_is_refused_and_run_returns_error_on(TransportChoice::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_agent_is_refused_and_run_returns_error_over_tcp() {
    revoked_agent_is_refused_and_run_returns_error_on(TransportChoice::Tcp).await;
}

async fn revoked_agent_is_refused_and_run_returns_error_on(choice: TransportChoice) {
    let gw = gateway(TunnelSettings::default()).await;
    let (dir, id, stop) = join_and_run_on(&gw, "t5", LocalLimits::default(), choice).await;
    stop.cancel();
    let start = Instant::now();
    while gw.registry.get(&id).is_some() {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.directory.revoked.lock().unwrap().push(id.clone());
    let opts = RunOptions {
        state_dir: dir.path().to_owned(),
        gateways: Vec::new(),
        limits: LocalLimits::default(),
        backoff: Backoff::default(),
        timers: TransportTimers::default(),
        route: route(choice),
    };
    let err = tokio::time::timeout(Duration::from_secs(10), agent::run(opts, CancellationToken::new()))
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("revoked"), "{err}");
    gw.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_is_renewed_before_expiry() {
    certificate_is_renewed_before_expiry_on(TransportChoice::Quic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_is_renewed_before_expiry_over_tcp() {
    certificate_is_renewed_before_expiry_on(TransportChoice::Tcp).await;
}

async fn certificate_is_renewed_before_expiry_on(choice: TransportChoice) {
    let settings = TunnelSettings { agent_cert_ttl: Duration::from_secs(6), ..TunnelSettings::default() };
    let gw = gateway(settings).await;
    let (dir, id, _stop) = join_and_run_on(&gw, "t6", LocalLimits::default(), choice).await;
    let first = agent::identity_info(dir.path()).unwrap();
    let start = Instant::now();
    loop {
        let now = agent::identity_info(dir.path()).unwrap();
        if now.serial_hex != first.serial_hex {
            assert!(now.not_after > first.not_after);
            assert_eq!(now.common_name, id);
            // The directory heard of it (the gateway audits each renewal).
            assert!(gw.directory.renewals.lock().unwrap().contains(&now.serial_hex));
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "certificate was not renewed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The agent is still online and serving.
    let mut s = gw.registry.open_session(&id, exec_req("echo still-here")).await.unwrap();
    assert_eq!(collect(&mut s).await.stdout, b"still-here\n");
    gw.shutdown.cancel();
}

#[test]
fn backoff_grows_with_jitter_and_caps() {
    let b = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(2),
        stable_after: Duration::from_secs(1),
    };
    for attempt in 0..30 {
        let d = b.delay(attempt);
        let cap = (Duration::from_millis(100) * 2u32.saturating_pow(attempt.min(20))).min(Duration::from_secs(2));
        assert!(d >= cap / 2 && d <= cap, "attempt {attempt}: {d:?} vs cap {cap:?}");
    }
    let samples: std::collections::HashSet<_> = (0..20).map(|_| b.delay(5)).collect();
    assert!(samples.len() > 1, "no jitter");
}

fn member(id: &str) -> TunnelSettings {
    TunnelSettings { gateway_id: Some(id.into()), ..TunnelSettings::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_reaches_an_agent_connected_to_its_peer() {
    let ca = Arc::new(CertAuthority::generate("cluster CA").unwrap());
    let a = gateway_with(ca.clone(), member("gw-a")).await;
    let b = gateway_with(ca.clone(), member("gw-b")).await;
    // The agent is on TCP at B: the peer relay joins QUIC (A to B) and TCP (B to agent).
    let (_dir, id, _stop) = join_and_run_on(&b, "p1", LocalLimits::default(), TransportChoice::Tcp).await;
    let peers = a.peers.as_ref().expect("a cluster gateway has a peer client");
    let at_b = b.addr.to_string();

    // The session protocol runs end to end through B: stdin in, stdout, stderr, exit out.
    let mut s = peers.open_session("gw-b", &at_b, &id, exec_req("tr a-z A-Z; echo err >&2; exit 5")).await.unwrap();
    write_frame(&mut s.send, &Message::Stdin(b"through b".to_vec())).await.unwrap();
    write_frame(&mut s.send, &Message::Eof).await.unwrap();
    let out = collect(&mut s).await;
    assert_eq!((out.stdout.as_slice(), out.stderr.as_slice(), out.exit.code), (&b"THROUGH B"[..], &b"err\n"[..], 5));

    // Several at once over the one peer connection.
    let runs = (0..8).map(|i| {
        let (peers, at_b, id) = (peers.clone(), at_b.clone(), id.clone());
        tokio::spawn(async move {
            let mut s = peers.open_session("gw-b", &at_b, &id, exec_req(&format!("echo {i}"))).await.unwrap();
            collect(&mut s).await.stdout
        })
    });
    for (i, run) in runs.enumerate() {
        assert_eq!(run.await.unwrap(), format!("{i}\n").into_bytes());
    }

    // An agent B does not have is offline, as for a local lookup.
    let err = peers.open_session("gw-b", &at_b, "ag-nowhere", exec_req("true")).await.unwrap_err();
    assert!(matches!(err, postern_tunnel::server::OpenError::Offline), "{err:?}");

    // A checks it talks to exactly the gateway it named: B's certificate is not gw-c's.
    let err = peers.open_session("gw-c", &at_b, &id, exec_req("true")).await.unwrap_err();
    assert!(format!("{err}").contains("cannot reach gateway gw-c"), "{err}");

    // Agents of the same CA cannot pose as a gateway: B refuses an agent certificate.
    let (key, csr) = postern_tunnel::pki::new_key_and_csr().unwrap();
    let agent_cert = ca.issue_agent_cert(&csr, "ag-rogue", Duration::from_secs(600)).unwrap();
    let rogue = postern_tunnel::peer::PeerClient::new(
        ca.cert_der(),
        vec![agent_cert, ca.cert_der().clone()],
        postern_tunnel::pki::private_key_der(&key),
    )
    .unwrap();
    let err = rogue.open_session("gw-b", &at_b, &id, exec_req("echo no")).await.unwrap_err();
    assert!(!matches!(err, postern_tunnel::server::OpenError::Rejected { .. }), "{err:?}");

    // A single gateway (no gateway id) is no peer: it has no peer client, names no gateway
    // in its certificate and does not offer the peer protocol.
    let single = gateway_with(ca.clone(), TunnelSettings::default()).await;
    assert!(single.peers.is_none());
    let err = peers.open_session("gw-s", &single.addr.to_string(), &id, exec_req("true")).await.unwrap_err();
    assert!(format!("{err}").contains("cannot reach gateway"), "{err}");
    for gw in [a, b, single] {
        gw.shutdown.cancel();
    }
}

/// A gateway end and an agent end of one TCP-transport connection (enrollment TLS: the agent
/// checks the gateway by the CA pin and presents nothing).
async fn tcp_pair() -> (postern_tunnel::transport::Connection, postern_tunnel::transport::Connection) {
    use postern_tunnel::transport::{Connection, tcp};
    let ca = CertAuthority::generate("tcp pair CA").unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = ca.issue_server_cert(&key, Duration::from_secs(600), None).unwrap();
    let server = postern_tunnel::tls::server_tls(
        ca.cert_der(),
        vec![cert, ca.cert_der().clone()],
        postern_tunnel::pki::private_key_der(&key),
        false,
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gateway = tokio::spawn(async move {
        let (stream, remote) = listener.accept().await.unwrap();
        let tls = tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(stream).await.unwrap();
        tcp::accept(tls, remote).await.unwrap()
    });
    let client = Arc::new(postern_tunnel::tls::agent_enroll_tls(&ca.pin()).unwrap());
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let agent = tcp::connect(stream, addr, client, "postern-gateway", TransportTimers::default(), 8).await.unwrap();
    (Connection::Tcp(gateway.await.unwrap()), Connection::Tcp(agent))
}

/// The TCP transport keeps QUIC's stream semantics the agent relies on: a finish is an end
/// of stream, a reset is an error that `received_reset` sees even with data unread (an exec
/// whose command does not read its input is killed by it), only the gateway opens streams
/// beyond the agent's first, and a close carries its code and reason to the other side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_transport_finishes_resets_and_closes_with_a_code() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (gw, ag) = tcp_pair().await;
    // The agent's own stream, once.
    let (mut a_send, _a_recv) = ag.open_bi().await.unwrap();
    let (_g_send, mut g_recv) = gw.accept_bi().await.unwrap();
    a_send.write_all(b"hello").await.unwrap();
    a_send.finish().unwrap();
    let mut got = Vec::new();
    g_recv.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"hello");
    let err = ag.open_bi().await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::Unsupported, "{err}");

    // A finish: data, then the end.
    let (mut send, _recv) = gw.open_bi().await.unwrap();
    send.write_chunk(bytes::Bytes::from_static(b"one")).await.unwrap();
    send.finish().unwrap();
    let (_s, mut recv) = ag.accept_bi().await.unwrap();
    assert_eq!(recv.read_chunk().await.unwrap().as_deref(), Some(&b"one"[..]));
    assert_eq!(recv.read_chunk().await.unwrap(), None);

    // A reset with data unread: seen by received_reset, and reading ends in an error.
    let (mut send, _recv) = gw.open_bi().await.unwrap();
    send.write_chunk(bytes::Bytes::from(vec![7u8; 100_000])).await.unwrap();
    let (_s, mut recv) = ag.accept_bi().await.unwrap();
    send.reset(0);
    tokio::time::timeout(Duration::from_secs(5), recv.received_reset()).await.expect("the reset was not seen");
    let mut rest = Vec::new();
    assert!(recv.read_to_end(&mut rest).await.is_err(), "a reset read as an end of stream");

    // A finish is never taken for a reset.
    let (mut send, _recv) = gw.open_bi().await.unwrap();
    send.write_chunk(bytes::Bytes::from_static(b"x")).await.unwrap();
    send.finish().unwrap();
    let (_s, mut recv) = ag.accept_bi().await.unwrap();
    let waited = tokio::time::timeout(Duration::from_millis(500), recv.received_reset()).await;
    assert!(waited.is_err(), "received_reset completed after a finish");
    assert_eq!(recv.read_chunk().await.unwrap().as_deref(), Some(&b"x"[..]));

    // A close: the code and reason reach the agent.
    gw.close(3, b"replaced by a newer connection");
    let closed = tokio::time::timeout(Duration::from_secs(5), ag.closed()).await.expect("the close did not arrive");
    assert_eq!(closed.code, Some(3), "{closed}");
    assert!(closed.by_peer && closed.reason == "replaced by a newer connection", "{closed}");
    assert!(ag.accept_bi().await.is_err());
}

/// A command that does not read its input, with input pending, is killed when the gateway
/// resets the session stream (terminate, revoke), on both transports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_kills_a_command_whose_input_is_pending() {
    for (choice, token) in [(TransportChoice::Quic, "k-quic"), (TransportChoice::Tcp, "k-tcp")] {
        let gw = gateway(TunnelSettings::default()).await;
        let (_dir, id, _stop) = join_and_run_on(&gw, token, LocalLimits::default(), choice).await;
        let mut s = gw.registry.open_session(&id, exec_req("echo $$; exec sleep 60")).await.unwrap();
        let pid = match read_frame(&mut s.recv, StreamKind::Session).await.unwrap() {
            Some(Message::Stdout(d)) => String::from_utf8_lossy(&d).trim().parse::<i32>().unwrap(),
            other => panic!("{choice}: unexpected {other:?}"),
        };
        // More input than the pipe holds: the agent's write to the command blocks.
        for _ in 0..8 {
            write_frame(&mut s.send, &Message::Stdin(vec![b'x'; 32 * 1024])).await.unwrap();
        }
        s.send.reset(0);
        let proc = format!("/proc/{pid}");
        let start = Instant::now();
        while std::path::Path::new(&proc).exists() {
            let zombie = std::fs::read_to_string(format!("{proc}/stat")).is_ok_and(|st| st.contains(") Z "));
            if zombie {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "{choice}: the command outlived the reset");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        gw.shutdown.cancel();
    }
}

/// `[tunnel] tcp_listen` on another port than QUIC's (say 443): an agent told the port
/// (`[agent] tcp_port`) enrolls and connects there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reaches_a_tcp_listener_on_another_port() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let settings =
        TunnelSettings { tcp_listen: Some(format!("127.0.0.1:{port}").parse().unwrap()), ..TunnelSettings::default() };
    let gw = gateway(settings).await;
    assert_ne!(gw.addr.port(), port);
    let route = Route { choice: TransportChoice::Tcp, tcp_port: Some(port), ..Route::default() };
    let (_dir, id, _stop) = join_and_run_route(&gw, "t-port", LocalLimits::default(), route).await;
    let mut s = gw.registry.open_session(&id, exec_req("echo on-another-port")).await.unwrap();
    assert_eq!(collect(&mut s).await.stdout, b"on-another-port\n");
    gw.shutdown.cancel();
}

/// Idle TCP connections (no TLS) from one address take at most
/// `tcp_handshakes_per_source` set-up places: an agent from another address still gets in
/// at once, though the flood outnumbers every place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tcp_connections_from_one_address_do_not_keep_an_agent_out() {
    let settings = TunnelSettings { tcp_handshakes: 16, tcp_handshakes_per_source: 4, ..TunnelSettings::default() };
    let gw = gateway(settings).await;
    let mut idle = Vec::new();
    for _ in 0..24 {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&"127.0.0.2:0".parse::<SocketAddr>().unwrap().into()).unwrap();
        sock.connect(&gw.addr.into()).unwrap();
        idle.push(sock);
    }
    let start = Instant::now();
    let (_dir, id, _stop) = join_and_run_on(&gw, "t-flood", LocalLimits::default(), TransportChoice::Tcp).await;
    assert!(start.elapsed() < Duration::from_secs(5), "the agent took {:?} to get past the flood", start.elapsed());
    let mut s = gw.registry.open_session(&id, exec_req("echo past-the-flood")).await.unwrap();
    assert_eq!(collect(&mut s).await.stdout, b"past-the-flood\n");
    drop(idle);
    gw.shutdown.cancel();
}

/// An agent's `max_sessions` is what limits its sessions at once, on both transports: above
/// 256 (the protocol's old fixed stream limit) every session opens, and the one past a small
/// limit is refused by the agent with its reason, at once, not after a wait for a stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_max_sessions_is_its_limit_on_both_transports() {
    for (choice, name) in [(TransportChoice::Quic, "quic"), (TransportChoice::Tcp, "tcp")] {
        let gw = gateway(TunnelSettings::default()).await;
        let limits = LocalLimits { max_sessions: 300, ..LocalLimits::default() };
        let (_dir, id, _stop) = join_and_run_on(&gw, &format!("many-{name}"), limits, choice).await;
        let mut open = Vec::new();
        for i in 0..270 {
            let s = gw.registry.open_session(&id, exec_req("exec sleep 60")).await;
            open.push(s.unwrap_or_else(|e| panic!("{name}: session {i} refused: {e}")));
        }
        drop(open);
        gw.shutdown.cancel();

        let gw = gateway(TunnelSettings::default()).await;
        let limits = LocalLimits { max_sessions: 2, ..LocalLimits::default() };
        let (_dir, id, _stop) = join_and_run_on(&gw, &format!("few-{name}"), limits, choice).await;
        let _two = [
            gw.registry.open_session(&id, exec_req("exec sleep 60")).await.unwrap(),
            gw.registry.open_session(&id, exec_req("exec sleep 60")).await.unwrap(),
        ];
        let start = Instant::now();
        let err = gw.registry.open_session(&id, exec_req("true")).await.unwrap_err();
        assert!(err.to_string().contains("at its limit of 2 sessions"), "{name}: {err}");
        assert!(start.elapsed() < Duration::from_secs(5), "{name}: refused after {:?}", start.elapsed());
        gw.shutdown.cancel();
    }
}
