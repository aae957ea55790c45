#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
//! Property-driven fuzzing of the decoders, runnable in CI with a fixed budget
//! (`PROPTEST_CASES`, default 2048 here). The coverage-guided libFuzzer target lives in
//! `proto/fuzz/` for longer runs (`cargo +nightly fuzz run decode_frame`).

use postern_proto::*;
use proptest::prelude::*;

fn any_string() -> impl Strategy<Value = String> {
    proptest::string::string_regex(".{0,24}").unwrap()
}

fn any_pairs() -> impl Strategy<Value = Vec<(String, String)>> {
    proptest::collection::vec((any_string(), any_string()), 0..4)
}

fn any_bytes() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..256)
}

fn any_request() -> impl Strategy<Value = SessionRequest> {
    prop_oneof![
        (any_string(), any_pairs(), proptest::option::of(any_string()), any::<bool>()).prop_map(
            |(c, env, run_as, allow_root)| {
                SessionRequest::Exec(ExecRequest { command: ExecCommand::Shell(c), env, run_as, allow_root })
            }
        ),
        (proptest::collection::vec(any_string(), 0..4), any_pairs()).prop_map(|(a, env)| {
            SessionRequest::Exec(ExecRequest { command: ExecCommand::Argv(a), env, run_as: None, allow_root: false })
        }),
        (any_string(), any::<u16>(), any::<u16>(), any_pairs(), proptest::option::of(any_string())).prop_map(
            |(term, cols, rows, env, command)| SessionRequest::Shell(ShellRequest {
                term,
                cols,
                rows,
                env,
                run_as: None,
                command,
                allow_root: true,
            })
        ),
        (any_string(), any::<u16>()).prop_map(|(host, port)| SessionRequest::Tcp(TcpRequest { host, port })),
        Just(SessionRequest::Rdp),
        Just(SessionRequest::Ssh),
        (any_string(), any::<u16>(), proptest::collection::vec(any_string(), 0..4))
            .prop_map(|(host, port, deny)| SessionRequest::TcpByName(TcpByNameRequest { host, port, deny })),
    ]
}

fn any_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u16>(), any_string())
            .prop_map(|(c, m)| Message::Error(ErrorMsg { code: ErrorCode::from_u16(c), message: m })),
        (any_string(), any_string(), any_string()).prop_map(|(a, h, p)| Message::Hello(Hello {
            agent_version: a,
            hostname: h,
            platform: p
        })),
        (any_string(), any_string()).prop_map(|(a, n)| Message::HelloAck(HelloAck { agent_id: a, name: n })),
        any_bytes().prop_map(|b| Message::RenewRequest(RenewRequest { csr_der: b })),
        any_bytes().prop_map(|b| Message::RenewResponse(RenewResponse { cert_der: b })),
        (any_string(), any_bytes(), any_string()).prop_map(|(t, c, h)| Message::EnrollRequest(EnrollRequest {
            token: t,
            csr_der: c,
            hostname: h,
            platform: "linux".into(),
            agent_version: "1".into()
        })),
        (any::<[u8; 16]>(), any_request())
            .prop_map(|(id, request)| Message::Open(OpenSession { session_id: SessionId(id), request })),
        any::<[u8; 16]>().prop_map(|id| Message::Accept(Accept { session_id: SessionId(id) })),
        (any::<[u8; 16]>(), any_string())
            .prop_map(|(id, address)| Message::Connected(Connected { session_id: SessionId(id), address })),
        (any::<[u8; 16]>(), any::<u16>(), any_string()).prop_map(|(id, c, r)| Message::Reject(Reject {
            session_id: SessionId(id),
            code: ErrorCode::from_u16(c),
            reason: r
        })),
        any_bytes().prop_map(Message::Stdin),
        any_bytes().prop_map(Message::Stdout),
        any_bytes().prop_map(Message::Stderr),
        (any::<u16>(), any::<u16>()).prop_map(|(cols, rows)| Message::Resize(Resize { cols, rows })),
        any_string().prop_map(|name| Message::Signal(Signal { name })),
        Just(Message::Eof),
        (any::<i32>(), proptest::option::of(any_string()))
            .prop_map(|(code, signal)| Message::Exit(Exit { code, signal })),
    ]
}

/// An AsyncRead that hands out at most `chunk` bytes per read.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl tokio::io::AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        let (head, rest) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = rest;
        std::task::Poll::Ready(Ok(()))
    }
}

fn stream_for(kind: Kind) -> StreamKind {
    [StreamKind::Enroll, StreamKind::Control, StreamKind::Session].into_iter().find(|s| s.allows(kind)).unwrap()
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2048);
    ProptestConfig { cases, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    /// Arbitrary bytes never panic any decoder, and a success never claims more bytes than given.
    #[test]
    fn decode_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        for stream in [StreamKind::Enroll, StreamKind::Control, StreamKind::Session] {
            if let Ok(Some((_, used))) = decode_frame(&data, stream) {
                prop_assert!(used <= data.len());
            }
        }
    }

    /// Valid headers with arbitrary payloads exercise the payload decoders, not just the header.
    #[test]
    fn decode_arbitrary_payload(kind in proptest::sample::select(Kind::ALL.to_vec()),
                                payload in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut data = vec![PROTOCOL_VERSION, kind as u8];
        data.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        data.extend_from_slice(&payload);
        let _ = decode_frame(&data, stream_for(kind));
    }

    /// Every message survives a round trip, and every strict prefix is "incomplete" or an error.
    #[test]
    fn roundtrip(msg in any_message()) {
        let mut buf = Vec::new();
        encode_frame(&msg, &mut buf);
        let stream = stream_for(msg.kind());
        let (decoded, used) = decode_frame(&buf, stream).unwrap().unwrap();
        prop_assert_eq!(used, buf.len());
        prop_assert_eq!(&decoded, &msg);
        for cut in 0..buf.len() {
            prop_assert!(!matches!(decode_frame(&buf[..cut], stream), Ok(Some(_))));
        }
    }

    /// The async reader agrees with the slice decoder on any input, however it is chunked.
    #[test]
    fn async_reader_matches_slice_decoder(data in proptest::collection::vec(any::<u8>(), 0..256), chunk in 1usize..16) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        for stream in [StreamKind::Enroll, StreamKind::Control, StreamKind::Session] {
            let expected = decode_frame(&data, stream);
            let got = rt.block_on(async {
                let mut reader = Chunked { data: &data, chunk };
                read_frame(&mut reader, stream).await
            });
            match (expected, got) {
                (Ok(Some((m, _))), Ok(Some(g))) => prop_assert_eq!(m, g),
                (Err(e), Err(FrameError::Proto(g))) => prop_assert_eq!(e, g),
                // Input ends inside a frame: the slice decoder waits, the reader reports EOF.
                (Ok(None), Ok(None) | Err(FrameError::UnexpectedEof)) => {}
                (e, g) => prop_assert!(false, "slice decoder {:?} vs reader {:?}", e, g),
            }
        }
    }

    /// Mutating one byte of a valid frame is either still a valid frame or a clean error.
    #[test]
    fn mutate_one_byte(msg in any_message(), pos in any::<usize>(), val in any::<u8>()) {
        let mut buf = Vec::new();
        encode_frame(&msg, &mut buf);
        let i = pos % buf.len();
        buf[i] = val;
        let _ = decode_frame(&buf, stream_for(msg.kind()));
    }
}
