//! Encode/decode cost of the wire protocol's common frames.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use postern_proto::*;
use std::hint::black_box;

fn samples() -> Vec<(&'static str, Message, StreamKind)> {
    vec![
        ("stdout_32KiB", Message::Stdout(vec![0x61; MAX_DATA_CHUNK]), StreamKind::Session),
        ("stdin_1B", Message::Stdin(vec![b'a']), StreamKind::Session),
        (
            "open_shell",
            Message::Open(OpenSession {
                session_id: SessionId([7; 16]),
                request: SessionRequest::Shell(ShellRequest {
                    term: "xterm-256color".into(),
                    cols: 200,
                    rows: 50,
                    env: vec![("LANG".into(), "C.UTF-8".into()), ("LC_ALL".into(), "C.UTF-8".into())],
                    run_as: Some("deploy".into()),
                    command: None,
                    allow_root: false,
                }),
            }),
            StreamKind::Session,
        ),
        (
            "hello",
            Message::Hello(Hello {
                agent_version: "0.1.0".into(),
                hostname: "web-01".into(),
                platform: "linux-x86_64".into(),
            }),
            StreamKind::Control,
        ),
    ]
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    for (name, msg, _) in samples() {
        let mut buf = Vec::new();
        encode_frame(&msg, &mut buf);
        g.throughput(Throughput::Bytes(buf.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(name), &msg, |b, m| {
            let mut out = Vec::with_capacity(64 * 1024);
            b.iter(|| {
                out.clear();
                encode_frame(black_box(m), &mut out);
                black_box(out.len())
            })
        });
    }
    g.finish();
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    for (name, msg, stream) in samples() {
        let mut buf = Vec::new();
        encode_frame(&msg, &mut buf);
        g.throughput(Throughput::Bytes(buf.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(name), &buf, |b, bytes| {
            b.iter(|| black_box(decode_frame(black_box(bytes), stream).unwrap()))
        });
    }
    g.finish();
}

criterion_group!(benches, encode, decode);
criterion_main!(benches);
