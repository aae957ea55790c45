//! A rogue peer sending malformed and oversized frames is dropped by the gateway, and a
//! session running at the same time through a real agent is not disturbed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::io::Read;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

use postern_e2e::*;
use postern_proto::{EnrollRequest, Hello, Message, StreamKind, read_frame, write_frame};
use postern_tunnel::agent::{self, Candidate, JoinOptions};
use postern_tunnel::dial::{self, Clients, Dialed};
use postern_tunnel::pki::GATEWAY_SERVER_NAME;
use postern_tunnel::tls::{TransportTimers, agent_enroll_config, agent_enroll_tls};
use postern_tunnel::transport::{Connection, RecvStream, SendStream, Transport};

const PROTOCOL_ERROR: u32 = postern_tunnel::server::close::PROTOCOL_ERROR;
const REFUSED: u32 = postern_tunnel::server::close::REFUSED;

/// The close code the gateway sent (either transport).
async fn closed_with(conn: &Connection) -> u32 {
    let closed =
        tokio::time::timeout(Duration::from_secs(10), conn.closed()).await.expect("gateway did not drop the rogue");
    closed.code.filter(|_| closed.by_peer).unwrap_or_else(|| panic!("unexpected close: {closed}"))
}

/// A connection to `gw` over `transport` with the client settings `clients` (an enrollment's
/// or an agent's), as the real agent dials it.
async fn dial_on(transport: Transport, clients: &Clients, gw: &Gateway) -> Dialed {
    let candidate = Candidate { gateway: gw.listen.clone(), addr: gw.listen.parse().unwrap(), resolved: true };
    match transport {
        Transport::Quic => dial::quic(clients, &candidate, Duration::from_secs(5)).await.unwrap(),
        Transport::Tcp => dial::tcp(clients, &candidate, None, TransportTimers::default()).await.unwrap(),
    }
}

fn enroll_clients(pin: &str) -> Clients {
    Clients {
        quic: agent_enroll_config(pin, TransportTimers::default()).unwrap(),
        tls: std::sync::Arc::new(agent_enroll_tls(pin).unwrap()),
        sessions: 0,
    }
}

/// Open the control stream with a valid hello, as a real agent would.
async fn hello(conn: &Connection) -> (SendStream, RecvStream) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = Hello { agent_version: "x".into(), hostname: "rogue".into(), platform: "x".into() };
    write_frame(&mut send, &Message::Hello(hello)).await.unwrap();
    assert!(matches!(read_frame(&mut recv, StreamKind::Control).await.unwrap(), Some(Message::HelloAck(_))));
    (send, recv)
}

async fn send_raw(conn: &Connection, bytes: &[u8]) {
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    // Keep the stream open: the gateway must act on the header alone.
    assert_eq!(closed_with(conn).await, PROTOCOL_ERROR);
}

#[test]
fn rogue_frames_are_dropped_without_disturbing_a_session() {
    rogue_frames_on(Transport::Quic);
}

/// Issue 20: the same rogue, on the TCP transport.
#[test]
fn rogue_frames_are_dropped_without_disturbing_a_session_over_tcp() {
    rogue_frames_on(Transport::Tcp);
}

fn rogue_frames_on(transport: Transport) {
    let gw = Gateway::start("");
    let _agent = Agent::start(&gw, "app-01", vec![], &gw.listen);

    // A session that streams for a while, started before the rogue shows up.
    let mut session = Command::new(bin("postern"))
        .arg("--data-dir")
        .arg(gw.data_dir())
        .args(["exec", "app-01", "--", "for i in $(seq 1 60); do echo line$i; sleep 0.05; done"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let (token, pin) = gw.token(&[]);
    let rogue_dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        // 1. Enrollment connection, garbage instead of a frame (bad version byte).
        let enroll = enroll_clients(&pin);
        let conn = dial_on(transport, &enroll, &gw).await.conn;
        send_raw(&conn, &[9u8; 64]).await;

        // 2. Enrollment connection, a header announcing a 2 GiB request.
        let conn = dial_on(transport, &enroll, &gw).await.conn;
        send_raw(&conn, &[1, 0x10, 0x7f, 0xff, 0xff, 0xff]).await;

        // 3. Enrollment connection, a message kind that does not exist.
        let conn = dial_on(transport, &enroll, &gw).await.conn;
        send_raw(&conn, &[1, 0x7e, 0, 0, 0, 0]).await;

        // 4. An enrolled (authenticated) rogue agent: valid hello, then an oversized control frame.
        agent::join(&JoinOptions {
            gateways: vec![gw.listen.clone()],
            token: token.clone(),
            ca_pin: pin.clone(),
            state_dir: rogue_dir.path().to_owned(),
            route: dial::Route { choice: dial::TransportChoice::Auto, ..Default::default() },
        })
        .await
        .unwrap();
        let (tunnel, _) = agent::tunnel_clients(rogue_dir.path(), TransportTimers::default(), 256).unwrap();
        let conn = dial_on(transport, &tunnel, &gw).await.conn;
        let (mut send, _recv) = hello(&conn).await;
        send.write_all(&[1, 0x04, 0x00, 0x10, 0x00, 0x00]).await.unwrap();
        assert_eq!(closed_with(&conn).await, PROTOCOL_ERROR);

        // 5. Same identity, a session-stream message on the control stream.
        let conn = dial_on(transport, &tunnel, &gw).await.conn;
        let (mut send, _recv) = hello(&conn).await;
        write_frame(&mut send, &Message::Stdout(b"not here".to_vec())).await.unwrap();
        assert_eq!(closed_with(&conn).await, PROTOCOL_ERROR);
    });

    // The concurrent session finished intact.
    let mut out = String::new();
    session.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let status = session.wait().unwrap();
    let expected: String = (1..=60).map(|i| format!("line{i}\n")).collect();
    assert_eq!(out, expected);
    assert_eq!(status.code(), Some(0));

    // The gateway still serves new sessions and recorded every violation.
    let again = gw.postern(&["exec", "app-01", "--", "echo", "fine"]);
    assert_eq!(text(&again.stdout), "fine\n");
    let violations = gw.audit_events().iter().filter(|e| e["event"] == "agent.protocol_violation").count();
    assert_eq!(violations, 5, "{:#?}", gw.audit_events());
}

/// Enroll a raw rogue agent (a token named `name`, labels `labels`) and return its tunnel config.
fn enroll_rogue(
    gw: &Gateway,
    name: &str,
    labels: &str,
    dir: &std::path::Path,
    rt: &tokio::runtime::Runtime,
) -> Clients {
    let (token, pin) = gw.token(&["--name", name, "--labels", labels]);
    rt.block_on(agent::join(&JoinOptions {
        gateways: vec![gw.listen.clone()],
        token,
        ca_pin: pin,
        state_dir: dir.to_owned(),
        route: Default::default(),
    }))
    .unwrap();
    agent::tunnel_clients(dir, TransportTimers::default(), 256).unwrap().0
}

/// A QUIC tunnel connection with `clients` (the endpoint lives as long as the process).
async fn connect(gw: &Gateway, clients: &Clients) -> Connection {
    let dialed = dial_on(Transport::Quic, clients, gw).await;
    std::mem::forget(dialed.endpoint);
    dialed.conn
}

const ESC_HELLO: &str = "\x1b]0;pwned\x07\x1b[2J\x1b[31m";

/// Item 14: what an agent says about itself (hostname, platform, version) reaches every
/// table the CLI prints; terminal escapes in it must not.
#[test]
fn agent_supplied_text_cannot_drive_the_terminal() {
    let gw = Gateway::start("idle_timeout = \"0\"");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("alice");
    ssh_keygen(&key, "alice");
    gw.write_known_hosts(&dir.path().join("known_hosts"));
    let admin = |args: &[&str]| {
        let out = gw.postern(args);
        assert!(out.status.success(), "postern {args:?}: {}", text(&out.stderr));
        out.stdout
    };
    admin(&["user", "add", "alice", "--key-file", key.with_extension("pub").to_str().unwrap()]);
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "name = \"all\"\n[[statement]]\nsid = \"all\"\neffect = \"allow\"\nusers = [\"alice\"]\nactions = [\"exec\"]\nlabels = [\"env=rogue\"]\nallow_root = true\n",
    )
    .unwrap();
    admin(&["policy", "apply", policy.to_str().unwrap()]);
    let ssh = dir.path().join(".ssh");
    std::fs::create_dir_all(&ssh).unwrap();
    std::fs::copy(&key, ssh.join("id_ed25519")).unwrap();
    std::fs::copy(dir.path().join("known_hosts"), ssh.join("postern_known_hosts")).unwrap();
    let ls = || {
        let out = Command::new(bin("postern"))
            .arg("ls")
            .env("POSTERN_GATEWAY", format!("127.0.0.1:{}", gw.ssh_port))
            .env("POSTERN_USER", "alice")
            .env("HOME", dir.path())
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("POSTERN_DATA_DIR")
            .env_remove("POSTERN_CONFIG")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "ls: {}", text(&out.stderr));
        out.stdout
    };

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let state = tempfile::tempdir().unwrap();
    let cfg = enroll_rogue(&gw, "rogue-01", "env=rogue", state.path(), &rt);
    let conn = rt.block_on(async {
        let conn = connect(&gw, &cfg).await;
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let big = format!("{ESC_HELLO}{}", "A".repeat(4000));
        let hello = Hello { agent_version: big.clone(), hostname: big.clone(), platform: big };
        write_frame(&mut send, &Message::Hello(hello)).await.unwrap();
        assert!(matches!(read_frame(&mut recv, StreamKind::Control).await.unwrap(), Some(Message::HelloAck(_))));
        (conn, send, recv)
    });
    wait_until("rogue online", Duration::from_secs(10), || gw.is_online("rogue-01"));

    // Online: the live registry's view; then offline: the store's.
    for _ in 0..2 {
        let instances = admin(&["instances"]);
        assert!(instances.windows(8).any(|w| w == b"rogue-01"), "{}", text(&instances));
        assert!(!instances.contains(&0x1b) && !instances.contains(&0x07), "{:?}", text(&instances));
        let listed = ls();
        assert!(listed.windows(8).any(|w| w == b"rogue-01"), "{}", text(&listed));
        assert!(!listed.contains(&0x1b) && !listed.contains(&0x07), "{:?}", text(&listed));
        let json = gw.instances();
        let rogue = json.iter().find(|i| i["name"] == "rogue-01").unwrap();
        assert!(rogue["platform"].as_str().unwrap().chars().count() <= 64, "{rogue}");
        assert!(rogue["hostname"].as_str().unwrap().chars().count() <= 255, "{rogue}");
        conn.0.close(0, b"bye");
        wait_until("rogue offline", Duration::from_secs(10), || !gw.is_online("rogue-01"));
    }
}

/// Item 16: an agent that breaks the protocol on a session stream (garbage, a 50 MB header,
/// a kind it must not send) loses its whole connection, as docs/protocol.md says, and the
/// log says why.
#[test]
fn session_stream_violations_close_the_agent_connection() {
    session_stream_violations_on(Transport::Quic);
}

/// Issue 20: the same violations, by an agent on the TCP transport.
#[test]
fn session_stream_violations_close_the_agent_connection_over_tcp() {
    session_stream_violations_on(Transport::Tcp);
}

fn session_stream_violations_on(transport: Transport) {
    let gw = Gateway::start("");
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("alice");
    ssh_keygen(&key, "alice");
    let known_hosts = dir.path().join("known_hosts");
    gw.write_known_hosts(&known_hosts);
    assert!(
        gw.postern(&["user", "add", "alice", "--key-file", key.with_extension("pub").to_str().unwrap()])
            .status
            .success()
    );
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "name = \"all\"\n[[statement]]\neffect = \"allow\"\nusers = [\"alice\"]\nactions = [\"exec\"]\nlabels = [\"env=rogue\"]\nallow_root = true\n",
    )
    .unwrap();
    assert!(gw.postern(&["policy", "apply", policy.to_str().unwrap()]).status.success());
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let state = tempfile::tempdir().unwrap();
    let cfg = enroll_rogue(&gw, "rogue-02", "env=rogue", state.path(), &rt);
    // (bytes the rogue sends, whether it accepts the session first, through ssh or the
    // admin socket): every place a session stream is read, each way a frame can be wrong.
    let cases: [(&[u8], bool, bool); 5] = [
        (&[9u8; 64], true, false),                         // garbage: bad version byte
        (&[1, 0x31, 0x03, 0x20, 0x00, 0x00], true, true),  // Stdout announcing 50 MB
        (&[1, 0x30, 0, 0, 0, 2, b'h', b'i'], true, false), // Stdin: a kind only the gateway sends
        (&[1, 0x30, 0, 0, 0, 2, b'h', b'i'], true, true),  // the same, through ssh
        (&[9u8; 64], false, false),                        // garbage instead of Accept/Reject
    ];
    for (i, (bad, accept, via_ssh)) in cases.iter().enumerate() {
        let conn = rt.block_on(async {
            let dialed = dial_on(transport, &cfg, &gw).await;
            std::mem::forget(dialed.endpoint);
            let conn = dialed.conn;
            let control = hello(&conn).await;
            let c = conn.clone();
            let (bad, accept) = (bad.to_vec(), *accept);
            tokio::spawn(async move {
                let (mut send, mut recv) = c.accept_bi().await.unwrap();
                let Some(Message::Open(open)) = read_frame(&mut recv, StreamKind::Session).await.unwrap() else {
                    panic!("expected open")
                };
                if accept {
                    let accepted = Message::Accept(postern_proto::Accept { session_id: open.session_id });
                    write_frame(&mut send, &accepted).await.unwrap();
                }
                send.write_all(&bad).await.unwrap();
                let _keep = (send, recv, control);
                std::future::pending::<()>().await;
            });
            conn
        });
        wait_until("rogue online", Duration::from_secs(10), || gw.is_online("rogue-02"));
        let out = if *via_ssh {
            Command::new("timeout")
                .args(["30", "ssh", "-p", &gw.ssh_port.to_string(), "-i"])
                .arg(&key)
                .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o"])
                .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
                .args(["alice%rogue-02@127.0.0.1", "true"])
                .stdin(Stdio::null())
                .output()
                .unwrap()
        } else {
            gw.postern(&["exec", "rogue-02", "--", "true"])
        };
        assert!(!out.status.success(), "case {i}: {}", text(&out.stdout));
        assert_eq!(rt.block_on(closed_with(&conn)), PROTOCOL_ERROR, "case {i}: {}", text(&out.stderr));
        // The event is written just after the connection is closed: wait for it.
        let violations =
            || gw.audit_events().into_iter().filter(|e| e["event"] == "agent.protocol_violation").collect::<Vec<_>>();
        wait_until("the violation event", Duration::from_secs(10), || violations().len() > i);
        let violations = violations();
        assert_eq!(violations.len(), i + 1, "case {i}: {violations:#?}");
        assert!(violations[i]["agent_id"].as_str().unwrap().starts_with("ag-"), "{violations:#?}");
    }
}

/// Item 18a: an agent closing its connection (stopping, a gateway shutting down with its
/// local agent) is a departure, not a protocol violation. Ctrl-C of `postern quickstart`
/// used to log "i/o error: connection lost" as `agent.protocol_violation` (a race, so a few
/// rounds).
#[test]
fn clean_stops_are_not_violations() {
    let home = tempfile::tempdir().unwrap();
    for round in 0..6 {
        let data = home.path().join(format!("data-{round}"));
        let mut cmd = Command::new(bin("postern"));
        cmd.args(["quickstart", "--listen", &format!("127.0.0.1:{}", free_udp_port())])
            .args(["--ssh-listen", &format!("127.0.0.1:{}", free_tcp_port())])
            .arg("--data-dir")
            .arg(&data)
            .env("HOME", home.path())
            .env_remove("POSTERN_CONFIG")
            .stdin(Stdio::null());
        let mut qs = spawn_logged(cmd, &home.path().join(format!("quickstart-{round}.log")));
        let events = || -> String {
            std::fs::read_dir(data.join("audit"))
                .map(|d| d.flatten().map(|e| std::fs::read_to_string(e.path()).unwrap_or_default()).collect())
                .unwrap_or_default()
        };
        wait_until("local agent online", Duration::from_secs(30), || events().contains("agent.connected"));
        qs.signal(nix::sys::signal::Signal::SIGINT);
        assert_eq!(qs.wait_exit(Duration::from_secs(15)), Some(0), "{}", qs.log_text());
        let log = events();
        assert!(log.contains("gateway.stopped"), "{log}");
        assert!(!log.contains("agent.protocol_violation"), "round {round}:\n{log}");
    }
}

/// Item 4: an enrolled agent cannot mint certificates at will. Renewals are granted from half
/// of the current certificate's lifetime and at most once per agent per interval, each one
/// audited (`agent.renewed`); a normal agent still renews on its own.
#[test]
fn renewal_flood_gets_one_certificate_and_each_renewal_is_audited() {
    let mut gw = Gateway::start("");
    // Short certificates (6 s): renewals are due after 3.75 s, agents renew at 5 s.
    gw.stop();
    let config = gw.dir.path().join("gateway.toml");
    let text_cfg = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text_cfg.replacen("[tunnel]\n", "[tunnel]\nagent_cert_ttl = \"6s\"\n", 1)).unwrap();
    gw.restart();

    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let cfg = enroll_rogue(&gw, "rogue-renew", "env=rogue", dir.path(), &rt);
    let agent_id = agent::identity_info(dir.path()).unwrap().common_name;
    rt.block_on(async {
        let conn = connect(&gw, &cfg).await;
        let (mut send, mut recv) = hello(&conn).await;
        // A fresh certificate is not due: every request is refused.
        let (certs, refusals) = renew_many(&mut send, &mut recv, 50).await;
        assert_eq!(certs, 0, "{refusals:?}");
        assert!(refusals.iter().all(|r| r.contains("renewal refused") && r.contains("not due")), "{refusals:?}");
        // Past half of its lifetime: one certificate, then refusals again.
        tokio::time::sleep(Duration::from_millis(2600)).await;
        let (certs, refusals) = renew_many(&mut send, &mut recv, 200).await;
        assert_eq!(certs, 1, "{refusals:?}");
        assert_eq!(refusals.len(), 199);
        assert!(refusals.iter().all(|r| r.contains("renewal refused")), "{refusals:?}");
        // A new connection with the old (still valid, due) certificate: the agent was just
        // renewed, so it is refused too.
        let conn2 = connect(&gw, &cfg).await;
        let (mut send2, mut recv2) = hello(&conn2).await;
        let (certs, refusals) = renew_many(&mut send2, &mut recv2, 20).await;
        assert_eq!(certs, 0, "{refusals:?}");
        assert!(refusals.iter().all(|r| r.contains("at most one renewal per")), "{refusals:?}");
    });

    // One audit event for the one certificate issued.
    let renewed: Vec<_> = gw
        .audit_events()
        .into_iter()
        .filter(|e| e["event"] == "agent.renewed" && e["agent_id"] == agent_id.as_str())
        .collect();
    assert_eq!(renewed.len(), 1, "{renewed:#?}");
    assert!(renewed[0]["serial"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(renewed[0]["not_after"].as_i64().is_some());

    // A normal agent still renews on its own (at two thirds of its lifetime), audited.
    let real = Agent::start(&gw, "app-01", vec![], &gw.listen);
    let real_id = agent::identity_info(&real.state_dir()).unwrap().common_name;
    wait_until("the real agent renewed", Duration::from_secs(20), || {
        gw.audit_events().iter().any(|e| e["event"] == "agent.renewed" && e["agent_id"] == real_id.as_str())
    });
    let again = gw.postern(&["exec", "app-01", "--", "echo", "renewed"]);
    assert_eq!(text(&again.stdout), "renewed\n", "{}", text(&again.stderr));
}

/// Send `n` renewal requests in a row (each with a fresh CSR, answered before the next):
/// how many certificates came back, and the refusals' messages.
async fn renew_many(send: &mut SendStream, recv: &mut RecvStream, n: usize) -> (usize, Vec<String>) {
    let (mut certs, mut refusals) = (0, Vec::new());
    for _ in 0..n {
        let (_key, csr) = postern_tunnel::pki::new_key_and_csr().unwrap();
        write_frame(send, &Message::RenewRequest(postern_proto::RenewRequest { csr_der: csr })).await.unwrap();
        match read_frame(recv, StreamKind::Control).await.unwrap() {
            Some(Message::RenewResponse(_)) => certs += 1,
            Some(Message::Error(e)) => refusals.push(e.message),
            other => panic!("unexpected answer to a renewal: {other:?}"),
        }
    }
    (certs, refusals)
}

/// The gateway's default `[tunnel] max_enrollments_per_source`.
const ENROLLMENTS_PER_SOURCE: usize = 8;

/// Issue 15: 70 idle enrollment connections (QUIC handshake done, no request) from one
/// address used to take every enrollment place, so a real `postern-agent join` failed with
/// "too many enrollments in progress". Now one address holds at most
/// `max_enrollments_per_source` places; the rest are refused at once.
#[test]
fn idle_enrollments_from_one_address_do_not_block_a_join_from_another() {
    let gw = Gateway::start("");
    let (token, pin) = gw.token(&[]);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let addr: std::net::SocketAddr = gw.listen.parse().unwrap();
    let (_endpoint, idle) = rt.block_on(async {
        let endpoint = quinn::Endpoint::client("127.0.0.2:0".parse().unwrap()).unwrap();
        let cfg = agent_enroll_config(&pin, TransportTimers::default()).unwrap();
        let mut idle = Vec::new();
        for _ in 0..70 {
            idle.push(endpoint.connect_with(cfg.clone(), addr, GATEWAY_SERVER_NAME).unwrap().await.unwrap());
        }
        (endpoint, idle)
    });
    let refused = || idle.iter().filter(|c| c.close_reason().is_some()).count();
    // Give the gateway a bounded moment to turn the extra ones away (it does at once);
    // without the per-source cap it never does, and the join below is what fails.
    let deadline = Instant::now() + Duration::from_secs(5);
    while refused() < idle.len() - ENROLLMENTS_PER_SOURCE && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    // A real join from 127.0.0.1 while the idle ones are still held.
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let out = Agent::try_join(&[], &gw.listen, &token, &pin, &dir.path().join("agent"));
    assert!(out.status.success(), "join during an idle enrollment flood: {}", text(&out.stderr));
    assert!(start.elapsed() < Duration::from_secs(5), "join took {:?}", start.elapsed());
    assert_eq!(refused(), idle.len() - ENROLLMENTS_PER_SOURCE, "only the per-source cap's worth are held");
    for c in idle.iter().filter(|c| c.close_reason().is_some()) {
        match c.close_reason().unwrap() {
            quinn::ConnectionError::ApplicationClosed(a) => {
                assert_eq!(a.error_code.into_inner(), u64::from(REFUSED));
                assert!(String::from_utf8_lossy(&a.reason).contains("from this address"), "{a:?}");
            }
            other => panic!("unexpected close: {other}"),
        }
    }
    assert!(gw.audit_events().iter().any(|e| e["event"] == "agent.enrolled"));
}

/// One enrollment attempt with `token` and a valid CSR; the gateway's answer (the refusal's
/// message, or "enrolled").
async fn enroll_once(
    endpoint: &quinn::Endpoint,
    cfg: &quinn::ClientConfig,
    addr: std::net::SocketAddr,
    token: &str,
) -> String {
    let conn = endpoint.connect_with(cfg.clone(), addr, GATEWAY_SERVER_NAME).unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let (_key, csr) = postern_tunnel::pki::new_key_and_csr().unwrap();
    let request = EnrollRequest {
        token: token.to_owned(),
        csr_der: csr,
        hostname: "flood".into(),
        platform: "x".into(),
        agent_version: "x".into(),
    };
    write_frame(&mut send, &Message::EnrollRequest(request)).await.unwrap();
    let _ = send.finish();
    let answer = match read_frame(&mut recv, StreamKind::Enroll).await.unwrap() {
        Some(Message::Error(e)) => e.message,
        Some(Message::EnrollResponse(_)) => "enrolled".into(),
        other => panic!("unexpected answer: {other:?}"),
    };
    conn.close(0u32.into(), b"done");
    answer
}

/// Issue 15: a client with a bad token wrote 3,499 `agent.enroll_refused` events in 20 s.
/// Now an address refused again and again is shut out for a growing while (no store lookup),
/// and its refusals are audited as the first one plus one summary per interval with a count;
/// another address still enrolls.
#[test]
fn a_bad_token_enrollment_flood_is_throttled_and_audited_in_summaries() {
    let gw = Gateway::start("[audit]\nrefusal_interval = \"2s\"");
    let (token, pin) = gw.token(&[]);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let addr: std::net::SocketAddr = gw.listen.parse().unwrap();
    let answers = rt.block_on(async {
        let endpoint = quinn::Endpoint::client("127.0.0.2:0".parse().unwrap()).unwrap();
        let cfg = agent_enroll_config(&pin, TransportTimers::default()).unwrap();
        // At least 3 s and 50 attempts (a loaded machine makes fewer QUIC handshakes a
        // second; the bounds below follow the time the flood took), at most 20 s.
        let mut answers = Vec::new();
        let start = Instant::now();
        while (start.elapsed() < Duration::from_secs(3) || answers.len() < 50)
            && start.elapsed() < Duration::from_secs(20)
        {
            answers.push(enroll_once(&endpoint, &cfg, addr, "pt_0000000000000000000000000000000000000000000000").await);
        }
        (answers, start.elapsed())
    });
    let (answers, took) = answers;
    let looked_up = answers.iter().filter(|a| a.contains("unknown enrollment token")).count();
    let shut_out = answers.iter().filter(|a| a.contains("too many refused enrollments from this address")).count();
    assert_eq!(looked_up + shut_out, answers.len(), "{answers:?}");
    assert!(answers.len() >= 50, "only {} attempts in {took:?}", answers.len());
    // Five free refusals, then shut out for 1 s, 2 s, 4 s, ...: a handful of store lookups,
    // one more each time the shut-out doubles (three in the first 3 s).
    let doublings = (took.as_secs_f64() + 1.0).log2().ceil() as usize;
    assert!(looked_up <= 6 + doublings, "{looked_up} of {} bad tokens were looked up in {took:?}", answers.len());

    // The audit log: a few events whose counts add up to every refusal.
    let from_flood = || {
        let events: Vec<serde_json::Value> = gw
            .audit_events()
            .into_iter()
            .filter(|e| e["event"] == "agent.enroll_refused" && e["source"].as_str().unwrap().starts_with("127.0.0.2:"))
            .collect();
        let stands_for: u64 = events.iter().map(|e| e["count"].as_u64().unwrap_or(1)).sum();
        (events, stands_for)
    };
    wait_until("every refusal in the audit log", Duration::from_secs(20), || from_flood().1 >= answers.len() as u64);
    let (events, stands_for) = from_flood();
    assert_eq!(stands_for, answers.len() as u64);
    // The first refusal, then one summary per refusal_interval (2 s) at most.
    let most = 3 + (took.as_secs() / 2) as usize;
    assert!(events.len() <= most, "{} events for {} refusals in {took:?}: {events:#?}", events.len(), answers.len());
    assert!(events[0]["count"].is_null() && events[1]["count"].as_u64().is_some(), "{events:#?}");

    // Another address is not shut out.
    let dir = tempfile::tempdir().unwrap();
    let out = Agent::try_join(&[], &gw.listen, &token, &pin, &dir.path().join("agent"));
    assert!(out.status.success(), "join from another address: {}", text(&out.stderr));
    let out = gw.postern(&["audit", "verify"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// The upgrade promise (docs/operations.md, "Upgrade"): the release an agent reports is
/// shown, never checked; any agent speaking `postern/1` with a certificate from the CA is
/// admitted, whatever version string it sends.
#[test]
fn an_agent_reporting_another_release_is_admitted() {
    let gw = Gateway::start("");
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (name, version) in [("old-01", "0.0.1-an-older-release"), ("new-01", "99.0.0")] {
        let dir = tempfile::tempdir().unwrap();
        let clients = enroll_rogue(&gw, name, "env=test", dir.path(), &rt);
        let conn = rt.block_on(connect(&gw, &clients));
        let _control = rt.block_on(async {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            let hello = Hello { agent_version: version.into(), hostname: name.into(), platform: "linux".into() };
            write_frame(&mut send, &Message::Hello(hello)).await.unwrap();
            let ack = read_frame(&mut recv, StreamKind::Control).await.unwrap();
            assert!(matches!(ack, Some(Message::HelloAck(_))), "{version}: {ack:?}");
            (send, recv)
        });
        wait_until(&format!("{name} online"), Duration::from_secs(10), || {
            gw.instances().iter().any(|i| i["name"] == name && i["online"] == true && i["agent_version"] == version)
        });
    }
}

/// A peer speaking another protocol version (a future `postern/2` only) fails the TLS
/// handshake with no_application_protocol, before any frame is read.
#[test]
fn a_peer_speaking_another_protocol_version_fails_the_handshake() {
    let gw = Gateway::start("");
    let (_, pin) = gw.token(&["--name", "v2-01"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let error = rt.block_on(async {
        let mut tls = agent_enroll_tls(&pin).unwrap();
        tls.alpn_protocols = vec![b"postern/2".to_vec()];
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(std::sync::Arc::new(tls)).unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(quic)));
        let connecting = endpoint.connect(gw.listen.parse().unwrap(), GATEWAY_SERVER_NAME).unwrap();
        tokio::time::timeout(Duration::from_secs(10), connecting).await.expect("the handshake did not end").unwrap_err()
    });
    let shown = error.to_string();
    // TLS alert 120: no_application_protocol.
    assert!(shown.contains("error 120: peer doesn't support any known protocol"), "{shown}");
}
