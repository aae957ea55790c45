#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! Golden tests: these literal bytes ARE the wire format of protocol version 1.
//! If one fails, the format changed: bump `PROTOCOL_VERSION` and the ALPN instead of
//! editing the bytes, unless the change is deliberate and documented in docs/protocol.md.

use postern_proto::*;

fn sid() -> SessionId {
    SessionId([0x11; 16])
}

fn check(msg: Message, stream: StreamKind, expected: &[u8]) {
    let mut buf = Vec::new();
    encode_frame(&msg, &mut buf);
    assert_eq!(buf, expected, "encoding of {msg:?}");
    let (decoded, used) = decode_frame(expected, stream).unwrap().unwrap();
    assert_eq!(used, expected.len());
    assert_eq!(decoded, msg);
}

#[test]
fn alpn_strings() {
    assert_eq!(ALPN_TUNNEL, b"postern/1");
    assert_eq!(ALPN_ENROLL, b"postern-enroll/1");
}

#[test]
fn hello() {
    check(
        Message::Hello(Hello { agent_version: "0.1".into(), hostname: "h".into(), platform: "linux".into() }),
        StreamKind::Control,
        &[
            1, 0x02, 0, 0, 0, 21, //
            0, 0, 0, 3, b'0', b'.', b'1', //
            0, 0, 0, 1, b'h', //
            0, 0, 0, 5, b'l', b'i', b'n', b'u', b'x',
        ],
    );
}

#[test]
fn hello_ack() {
    check(
        Message::HelloAck(HelloAck { agent_id: "a1".into(), name: "web".into() }),
        StreamKind::Control,
        &[1, 0x03, 0, 0, 0, 13, 0, 0, 0, 2, b'a', b'1', 0, 0, 0, 3, b'w', b'e', b'b'],
    );
}

#[test]
fn error_message() {
    check(
        Message::Error(ErrorMsg { code: ErrorCode::TokenExpired, message: "expired".into() }),
        StreamKind::Enroll,
        &[1, 0x01, 0, 0, 0, 13, 0, 3, 0, 0, 0, 7, b'e', b'x', b'p', b'i', b'r', b'e', b'd'],
    );
}

#[test]
fn enroll_request() {
    check(
        Message::EnrollRequest(EnrollRequest {
            token: "T".into(),
            csr_der: vec![0xde, 0xad],
            hostname: "h".into(),
            platform: "p".into(),
            agent_version: "v".into(),
        }),
        StreamKind::Enroll,
        &[
            1, 0x10, 0, 0, 0, 26, //
            0, 0, 0, 1, b'T', //
            0, 0, 0, 2, 0xde, 0xad, //
            0, 0, 0, 1, b'h', //
            0, 0, 0, 1, b'p', //
            0, 0, 0, 1, b'v',
        ],
    );
}

#[test]
fn enroll_response() {
    check(
        Message::EnrollResponse(EnrollResponse {
            agent_id: "i".into(),
            name: "n".into(),
            cert_der: vec![1],
            ca_der: vec![2, 3],
        }),
        StreamKind::Enroll,
        &[1, 0x11, 0, 0, 0, 21, 0, 0, 0, 1, b'i', 0, 0, 0, 1, b'n', 0, 0, 0, 1, 1, 0, 0, 0, 2, 2, 3],
    );
}

#[test]
fn renew() {
    check(
        Message::RenewRequest(RenewRequest { csr_der: vec![9, 8] }),
        StreamKind::Control,
        &[1, 0x04, 0, 0, 0, 6, 0, 0, 0, 2, 9, 8],
    );
    check(
        Message::RenewResponse(RenewResponse { cert_der: vec![7] }),
        StreamKind::Control,
        &[1, 0x05, 0, 0, 0, 5, 0, 0, 0, 1, 7],
    );
}

#[test]
fn open_exec_shell_command() {
    let mut expected = vec![1, 0x20, 0, 0, 0, 38];
    expected.extend_from_slice(&[0x11; 16]);
    expected.extend_from_slice(&[1, 1, 0, 0, 0, 2, b'i', b'd']); // exec, shell command "id"
    expected.extend_from_slice(&[0, 1, 0, 0, 0, 1, b'K', 0, 0, 0, 1, b'V']); // env K=V
    expected.extend_from_slice(&[0]); // no run_as
    expected.extend_from_slice(&[0]); // root not allowed
    check(
        Message::Open(OpenSession {
            session_id: sid(),
            request: SessionRequest::Exec(ExecRequest {
                command: ExecCommand::Shell("id".into()),
                env: vec![("K".into(), "V".into())],
                run_as: None,
                allow_root: false,
            }),
        }),
        StreamKind::Session,
        &expected,
    );
}

#[test]
fn open_exec_argv() {
    let mut expected = vec![1, 0x20, 0, 0, 0, 40];
    expected.extend_from_slice(&[0x11; 16]);
    expected.extend_from_slice(&[1, 2, 0, 2, 0, 0, 0, 2, b'l', b's', 0, 0, 0, 1, b'/']);
    expected.extend_from_slice(&[0, 0]); // no env
    expected.extend_from_slice(&[1, 0, 0, 0, 1, b'u']); // run_as "u"
    expected.extend_from_slice(&[1]); // root allowed
    check(
        Message::Open(OpenSession {
            session_id: sid(),
            request: SessionRequest::Exec(ExecRequest {
                command: ExecCommand::Argv(vec!["ls".into(), "/".into()]),
                env: vec![],
                run_as: Some("u".into()),
                allow_root: true,
            }),
        }),
        StreamKind::Session,
        &expected,
    );
}

#[test]
fn open_shell() {
    let mut expected = vec![1, 0x20, 0, 0, 0, 35];
    expected.extend_from_slice(&[0x11; 16]);
    expected.extend_from_slice(&[2, 0, 0, 0, 5, b'x', b't', b'e', b'r', b'm']);
    expected.extend_from_slice(&[0, 80, 0, 24]); // cols, rows
    expected.extend_from_slice(&[0, 0]); // no env
    expected.extend_from_slice(&[0, 0]); // no run_as, no command
    expected.extend_from_slice(&[0]); // root not allowed
    check(
        Message::Open(OpenSession {
            session_id: sid(),
            request: SessionRequest::Shell(ShellRequest {
                term: "xterm".into(),
                cols: 80,
                rows: 24,
                env: vec![],
                run_as: None,
                command: None,
                allow_root: false,
            }),
        }),
        StreamKind::Session,
        &expected,
    );
}

#[test]
fn open_tcp() {
    let mut expected = vec![1, 0x20, 0, 0, 0, 32];
    expected.extend_from_slice(&[0x11; 16]);
    expected.extend_from_slice(&[3, 0, 0, 0, 9]);
    expected.extend_from_slice(b"127.0.0.1");
    expected.extend_from_slice(&[0x1f, 0x90]); // 8080
    check(
        Message::Open(OpenSession {
            session_id: sid(),
            request: SessionRequest::Tcp(TcpRequest { host: "127.0.0.1".into(), port: 8080 }),
        }),
        StreamKind::Session,
        &expected,
    );
}

/// Tag 6: a name the agent resolves, with the deny ranges it must skip; answered by
/// `Connected` (0x23) with the address it connected to.
#[test]
fn open_tcp_by_name_and_connected() {
    let mut expected = vec![1, 0x20, 0, 0, 0, 50];
    expected.extend_from_slice(&[0x11; 16]);
    expected.extend_from_slice(&[6, 0, 0, 0, 9]);
    expected.extend_from_slice(b"localhost");
    expected.extend_from_slice(&[0x18, 0xeb]); // 6379
    expected.extend_from_slice(&[0, 1, 0, 0, 0, 12]);
    expected.extend_from_slice(b"127.0.0.1/32");
    check(
        Message::Open(OpenSession {
            session_id: sid(),
            request: SessionRequest::TcpByName(TcpByNameRequest {
                host: "localhost".into(),
                port: 6379,
                deny: vec!["127.0.0.1/32".into()],
            }),
        }),
        StreamKind::Session,
        &expected,
    );

    let mut expected = vec![1, 0x23, 0, 0, 0, 30];
    expected.extend_from_slice(&[0x11; 16]);
    expected.extend_from_slice(&[0, 0, 0, 10]);
    expected.extend_from_slice(b"[::1]:6379");
    check(
        Message::Connected(Connected { session_id: sid(), address: "[::1]:6379".into() }),
        StreamKind::Session,
        &expected,
    );
}

#[test]
fn open_rdp() {
    let mut expected = vec![1, 0x20, 0, 0, 0, 17];
    expected.extend_from_slice(&[0x11; 16]);
    expected.push(4);
    check(
        Message::Open(OpenSession { session_id: sid(), request: SessionRequest::Rdp }),
        StreamKind::Session,
        &expected,
    );
}

#[test]
fn open_ssh() {
    let mut expected = vec![1, 0x20, 0, 0, 0, 17];
    expected.extend_from_slice(&[0x11; 16]);
    expected.push(5);
    check(
        Message::Open(OpenSession { session_id: sid(), request: SessionRequest::Ssh }),
        StreamKind::Session,
        &expected,
    );
}

#[test]
fn accept_reject() {
    let mut expected = vec![1, 0x21, 0, 0, 0, 16];
    expected.extend_from_slice(&[0x11; 16]);
    check(Message::Accept(Accept { session_id: sid() }), StreamKind::Session, &expected);

    let mut expected = vec![1, 0x22, 0, 0, 0, 24];
    expected.extend_from_slice(&[0x11; 16]);
    expected.extend_from_slice(&[0, 5, 0, 0, 0, 2, b'n', b'o']);
    check(
        Message::Reject(Reject { session_id: sid(), code: ErrorCode::Forbidden, reason: "no".into() }),
        StreamKind::Session,
        &expected,
    );
}

#[test]
fn session_traffic() {
    check(Message::Stdin(b"ls\n".to_vec()), StreamKind::Session, &[1, 0x30, 0, 0, 0, 3, b'l', b's', b'\n']);
    check(Message::Stdout(b"ok".to_vec()), StreamKind::Session, &[1, 0x31, 0, 0, 0, 2, b'o', b'k']);
    check(Message::Stderr(vec![]), StreamKind::Session, &[1, 0x32, 0, 0, 0, 0]);
    check(Message::Resize(Resize { cols: 132, rows: 43 }), StreamKind::Session, &[1, 0x33, 0, 0, 0, 4, 0, 132, 0, 43]);
    check(
        Message::Signal(Signal { name: "INT".into() }),
        StreamKind::Session,
        &[1, 0x34, 0, 0, 0, 7, 0, 0, 0, 3, b'I', b'N', b'T'],
    );
    check(Message::Eof, StreamKind::Session, &[1, 0x35, 0, 0, 0, 0]);
    check(Message::Exit(Exit { code: 3, signal: None }), StreamKind::Session, &[1, 0x36, 0, 0, 0, 5, 0, 0, 0, 3, 0]);
    check(
        Message::Exit(Exit { code: 130, signal: Some("INT".into()) }),
        StreamKind::Session,
        &[1, 0x36, 0, 0, 0, 12, 0, 0, 0, 130, 1, 0, 0, 0, 3, b'I', b'N', b'T'],
    );
}

#[test]
fn errors_are_clean() {
    // wrong version
    assert_eq!(decode_frame(&[2, 0x35, 0, 0, 0, 0], StreamKind::Session), Err(ProtoError::UnsupportedVersion(2)));
    // unknown kind
    assert_eq!(decode_frame(&[1, 0x7f, 0, 0, 0, 0], StreamKind::Session), Err(ProtoError::UnknownKind(0x7f)));
    // kind not allowed on this stream
    assert!(matches!(
        decode_frame(&[1, 0x10, 0, 0, 0, 0], StreamKind::Session),
        Err(ProtoError::UnexpectedKind { kind: Kind::EnrollRequest, stream: StreamKind::Session })
    ));
    // oversized frame is refused from the header alone, before the payload arrives
    assert_eq!(
        decode_frame(&[1, 0x31, 0x00, 0x01, 0x00, 0x01], StreamKind::Session),
        Err(ProtoError::FrameTooLarge { len: 65537, max: 65536, stream: StreamKind::Session })
    );
    assert!(matches!(
        decode_frame(&[1, 0x02, 0x00, 0x00, 0x40, 0x01], StreamKind::Control),
        Err(ProtoError::FrameTooLarge { .. })
    ));
    // incomplete input is not an error
    assert_eq!(decode_frame(&[1, 0x31, 0, 0], StreamKind::Session), Ok(None));
    assert_eq!(decode_frame(&[1, 0x31, 0, 0, 0, 2, b'x'], StreamKind::Session), Ok(None));
    // a string length pointing past the payload
    assert_eq!(
        decode_frame(&[1, 0x34, 0, 0, 0, 5, 0, 0, 0, 9, b'X'], StreamKind::Session),
        Err(ProtoError::Truncated("signal.name"))
    );
    // trailing bytes
    assert_eq!(decode_frame(&[1, 0x35, 0, 0, 0, 1, 0], StreamKind::Session), Err(ProtoError::TrailingBytes(1)));
    // bad UTF-8
    assert_eq!(
        decode_frame(&[1, 0x34, 0, 0, 0, 5, 0, 0, 0, 1, 0xff], StreamKind::Session),
        Err(ProtoError::InvalidUtf8("signal.name"))
    );
    // bad option tag
    assert!(matches!(
        decode_frame(&[1, 0x36, 0, 0, 0, 5, 0, 0, 0, 0, 7], StreamKind::Session),
        Err(ProtoError::InvalidValue { field: "exit.signal", value: 7 })
    ));
    // unknown error codes survive as Other
    let (m, _) = decode_frame(&[1, 0x01, 0, 0, 0, 6, 0x12, 0x34, 0, 0, 0, 0], StreamKind::Control).unwrap().unwrap();
    assert_eq!(m, Message::Error(ErrorMsg { code: ErrorCode::Other(0x1234), message: String::new() }));
}

#[test]
fn enroll_request_debug_redacts_token() {
    let req = EnrollRequest {
        token: "super-secret-token".into(),
        csr_der: vec![],
        hostname: String::new(),
        platform: String::new(),
        agent_version: String::new(),
    };
    assert!(!format!("{req:?}").contains("super-secret"));
}

#[tokio::test]
async fn async_reader_rejects_oversize_without_reading_payload() {
    // Header announces 1 MiB; only the header is present. The reader must fail on the header.
    let data: &[u8] = &[1, 0x31, 0x00, 0x10, 0x00, 0x00];
    let mut r = data;
    let err = read_frame(&mut r, StreamKind::Session).await.unwrap_err();
    assert!(matches!(err, FrameError::Proto(ProtoError::FrameTooLarge { .. })), "{err}");

    let mut r: &[u8] = &[1, 0x31, 0, 0];
    assert!(matches!(read_frame(&mut r, StreamKind::Session).await, Err(FrameError::UnexpectedEof)));
    let mut r: &[u8] = &[];
    assert!(read_frame(&mut r, StreamKind::Session).await.unwrap().is_none());

    let mut buf = Vec::new();
    write_frame(&mut buf, &Message::Eof).await.unwrap();
    write_frame(&mut buf, &Message::Stdout(b"x".to_vec())).await.unwrap();
    let mut r = buf.as_slice();
    assert_eq!(read_frame(&mut r, StreamKind::Session).await.unwrap(), Some(Message::Eof));
    assert_eq!(read_frame(&mut r, StreamKind::Session).await.unwrap(), Some(Message::Stdout(b"x".to_vec())));
}
