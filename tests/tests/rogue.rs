//! A rogue peer sending malformed and oversized frames is dropped by the gateway, and a
//! session running at the same time through a real agent is not disturbed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use postern_e2e::*;
use postern_proto::{Hello, Message, StreamKind, read_frame, write_frame};
use postern_tunnel::agent::{self, JoinOptions};
use postern_tunnel::pki::GATEWAY_SERVER_NAME;
use postern_tunnel::tls::{TransportTimers, agent_enroll_config};

const PROTOCOL_ERROR: u32 = postern_tunnel::server::close::PROTOCOL_ERROR;

async fn closed_with(conn: &quinn::Connection) -> u64 {
    match tokio::time::timeout(Duration::from_secs(10), conn.closed()).await.expect("gateway did not drop the rogue") {
        quinn::ConnectionError::ApplicationClosed(c) => c.error_code.into_inner(),
        other => panic!("unexpected close: {other}"),
    }
}

/// Open the control stream with a valid hello, as a real agent would.
async fn hello(conn: &quinn::Connection) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let hello = Hello { agent_version: "x".into(), hostname: "rogue".into(), platform: "x".into() };
    write_frame(&mut send, &Message::Hello(hello)).await.unwrap();
    assert!(matches!(read_frame(&mut recv, StreamKind::Control).await.unwrap(), Some(Message::HelloAck(_))));
    (send, recv)
}

async fn send_raw(conn: &quinn::Connection, bytes: &[u8]) {
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    // Keep the stream open: the gateway must act on the header alone.
    assert_eq!(closed_with(conn).await, u64::from(PROTOCOL_ERROR));
}

#[test]
fn rogue_frames_are_dropped_without_disturbing_a_session() {
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
        let addr: std::net::SocketAddr = gw.listen.parse().unwrap();
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();

        // 1. Enrollment connection, garbage instead of a frame (bad version byte).
        let cfg = agent_enroll_config(&pin, TransportTimers::default()).unwrap();
        let conn = endpoint.connect_with(cfg.clone(), addr, GATEWAY_SERVER_NAME).unwrap().await.unwrap();
        send_raw(&conn, &[9u8; 64]).await;

        // 2. Enrollment connection, a header announcing a 2 GiB request.
        let conn = endpoint.connect_with(cfg.clone(), addr, GATEWAY_SERVER_NAME).unwrap().await.unwrap();
        send_raw(&conn, &[1, 0x10, 0x7f, 0xff, 0xff, 0xff]).await;

        // 3. Enrollment connection, a message kind that does not exist.
        let conn = endpoint.connect_with(cfg, addr, GATEWAY_SERVER_NAME).unwrap().await.unwrap();
        send_raw(&conn, &[1, 0x7e, 0, 0, 0, 0]).await;

        // 4. An enrolled (authenticated) rogue agent: valid hello, then an oversized control frame.
        agent::join(&JoinOptions {
            gateway: gw.listen.clone(),
            token: token.clone(),
            ca_pin: pin.clone(),
            state_dir: rogue_dir.path().to_owned(),
        })
        .await
        .unwrap();
        let (tunnel_cfg, _) = agent::tunnel_config(rogue_dir.path(), TransportTimers::default()).unwrap();
        let conn = endpoint.connect_with(tunnel_cfg.clone(), addr, GATEWAY_SERVER_NAME).unwrap().await.unwrap();
        let (mut send, _recv) = hello(&conn).await;
        send.write_all(&[1, 0x04, 0x00, 0x10, 0x00, 0x00]).await.unwrap();
        assert_eq!(closed_with(&conn).await, u64::from(PROTOCOL_ERROR));

        // 5. Same identity, a session-stream message on the control stream.
        let conn = endpoint.connect_with(tunnel_cfg, addr, GATEWAY_SERVER_NAME).unwrap().await.unwrap();
        let (mut send, _recv) = hello(&conn).await;
        write_frame(&mut send, &Message::Stdout(b"not here".to_vec())).await.unwrap();
        assert_eq!(closed_with(&conn).await, u64::from(PROTOCOL_ERROR));
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
