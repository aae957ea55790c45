//! Recorder throughput: shell output as the gateway records it (16 KiB chunks, asciicast v2,
//! clear and sealed), and the JSON string escaping at its core against serde_json's.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use postern_gateway::audit::seal::{FileKey, Keyring};
use postern_gateway::recording::{Recorder, RecordingOptions, json_string};

/// 16 KiB of terminal-like output: text lines with a colour escape now and then.
fn chunk() -> Vec<u8> {
    let mut out = Vec::with_capacity(16 << 10);
    let mut i = 0;
    while out.len() < (16 << 10) - 100 {
        out.extend_from_slice(
            format!("drwxr-xr-x  2 alice staff  4096 Nov 28 03:{i:02} \x1b[34mdir-{i}\x1b[0m\r\n").as_bytes(),
        );
        i = (i + 1) % 60;
    }
    out
}

fn bench(c: &mut Criterion) {
    let data = chunk();
    let text = std::str::from_utf8(&data).unwrap();
    let plain = "a".repeat(data.len());
    let mut g = c.benchmark_group("recording");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("json string: recorder's escaper", |b| {
        let mut out = Vec::with_capacity(64 << 10);
        b.iter(|| {
            out.clear();
            json_string(&mut out, black_box(text));
        })
    });
    g.bench_function("json string, plain text: recorder's escaper", |b| {
        let mut out = Vec::with_capacity(64 << 10);
        b.iter(|| {
            out.clear();
            json_string(&mut out, black_box(&plain));
        })
    });
    g.bench_function("json string, plain text: serde_json", |b| {
        let mut out = Vec::with_capacity(64 << 10);
        b.iter(|| {
            out.clear();
            serde_json::to_writer(&mut out, black_box(&plain)).unwrap();
        })
    });
    g.bench_function("json string: serde_json", |b| {
        let mut out = Vec::with_capacity(64 << 10);
        b.iter(|| {
            out.clear();
            serde_json::to_writer(&mut out, black_box(text)).unwrap();
        })
    });
    let dir = tempfile::tempdir_in(std::env::var("RECORDING_BENCH_DIR").unwrap_or_else(|_| ".".into())).unwrap();
    let keys = Keyring::new(vec![std::sync::Arc::new(FileKey::from_bytes(&[7; 32]).unwrap())]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (name, opts) in [
        ("output 16 KiB chunk, clear file", RecordingOptions::default()),
        ("output 16 KiB chunk, sealed file", RecordingOptions { keyring: keys, input: false, max_bytes: 0 }),
    ] {
        let mut n = 0u64;
        let mut rec: Option<Recorder> = None;
        g.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    // A new file every 64 MiB, so the bench does not fill the disk.
                    if n.is_multiple_of(4096) {
                        if let Some(mut r) = rec.take() {
                            r.finish(Some(0)).await.unwrap();
                            std::fs::remove_file(r.path()).unwrap();
                        }
                        rec = Some(
                            Recorder::create(dir.path(), &format!("b{n}"), (80, 24), "bench", None, &opts).unwrap(),
                        );
                    }
                    n += 1;
                    rec.as_mut().unwrap().output(black_box(&data)).await.unwrap();
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
