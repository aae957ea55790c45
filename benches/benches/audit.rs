//! Audit events per second: the hash-chained log as the gateway writes it (flushed to the OS
//! per event, fsync at signed checkpoints), and with an fsync after every event (the
//! durability ceiling of the disk), and sealed (encryption at rest). Each event is a typical
//! `session.start`, written as the gateway writes it (typed, through `AuditLog::event`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use postern_core::Action;
use postern_gateway::audit::events::{Event, SessionStart, SshSessionStart};
use postern_gateway::audit::seal::{FileKey, Keyring};
use postern_gateway::audit::{AuditLog, LogOptions};
use ring::signature::Ed25519KeyPair;

fn event(i: u64) -> Event {
    Event::SessionStart(SessionStart::Ssh(SshSessionStart {
        session_id: format!("5b0e6f3c-1f0a-4d8e-9c1e-{i:012x}"),
        user: "alice".into(),
        target: "web-01".into(),
        agent_id: "ag-212e65583fb9951f".into(),
        kind: Action::Shell,
        command: None,
        pty: true,
        source: "10.0.0.5:51234".into(),
        profile: None,
        run_as: None,
        logged: true,
        reason: None,
        run_id: None,
        recording: Some("/var/lib/postern/recordings/5b0e6f3c.cast".into()),
        via_gateway: None,
        cert_serial: None,
        door: None,
    }))
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(std::env::var("AUDIT_BENCH_DIR").unwrap_or_else(|_| ".".into())).unwrap();
    let key =
        Ed25519KeyPair::from_pkcs8(Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap().as_ref())
            .unwrap();
    let log = AuditLog::open_signed(&dir.path().join("clear"), key, LogOptions::default()).unwrap();
    let sealed_key =
        Ed25519KeyPair::from_pkcs8(Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap().as_ref())
            .unwrap();
    let keyring = Keyring::new(vec![std::sync::Arc::new(FileKey::from_bytes(&[7; 32]).unwrap())]);
    let sealed =
        AuditLog::open_signed(&dir.path().join("sealed"), sealed_key, LogOptions { keyring, ..LogOptions::default() })
            .unwrap();
    let mut g = c.benchmark_group("audit");
    g.throughput(Throughput::Elements(1));
    let mut i = 0u64;
    g.bench_function("record (chained, checkpoint+fsync every 100)", |b| {
        b.iter(|| {
            i += 1;
            log.event(black_box(&event(i))).unwrap()
        })
    });
    g.bench_function("record, sealed (AES-256-GCM record per event)", |b| {
        b.iter(|| {
            i += 1;
            sealed.event(black_box(&event(i))).unwrap()
        })
    });
    g.bench_function("record + signed checkpoint + fsync, per event", |b| {
        b.iter(|| {
            i += 1;
            log.event(black_box(&event(i))).unwrap();
            log.checkpoint(true).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
