//! Tunnel throughput and session-open latency on loopback: an in-process gateway listener,
//! a real agent (same process), and a local TCP target behind the agent.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use postern_benches::{start_in_process_on, start_tcp_target};
use postern_proto::{SessionRequest, TcpRequest};
use postern_tunnel::dial::TransportChoice;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOTAL: u64 = 64 * 1024 * 1024;

fn tcp_req(addr: std::net::SocketAddr) -> SessionRequest {
    SessionRequest::Tcp(TcpRequest { host: addr.ip().to_string(), port: addr.port() })
}

async fn upload(reg: &postern_tunnel::server::AgentRegistry, id: &str, target: std::net::SocketAddr, bytes: u64) {
    let mut s = reg.open_session(id, tcp_req(target)).await.unwrap();
    s.send.write_all(b"u").await.unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.send.write_all(&chunk[..n]).await.unwrap();
        left -= n as u64;
    }
    s.send.finish().unwrap();
    let mut ack = [0u8; 1];
    s.recv.read_exact(&mut ack).await.unwrap();
}

async fn download(reg: &postern_tunnel::server::AgentRegistry, id: &str, target: std::net::SocketAddr, bytes: u64) {
    let mut s = reg.open_session(id, tcp_req(target)).await.unwrap();
    s.send.write_all(b"d").await.unwrap();
    s.send.write_all(&bytes.to_be_bytes()).await.unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < bytes {
        match s.recv.read(&mut buf).await.unwrap() {
            0 => break,
            n => got += n as u64,
        }
    }
    assert_eq!(got, bytes);
}

/// Run `transfer` on 8 sessions at once and wait for all of them.
async fn on_8_streams<F, Fut>(reg: &postern_tunnel::server::AgentRegistry, id: &str, transfer: F)
where
    F: Fn(postern_tunnel::server::AgentRegistry, String) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let tasks: Vec<_> = (0..8).map(|_| tokio::spawn(transfer(reg.clone(), id.to_owned()))).collect();
    for t in tasks {
        t.await.unwrap();
    }
}

fn tunnel(c: &mut Criterion) {
    for (choice, name) in [(TransportChoice::Quic, "quic"), (TransportChoice::Tcp, "tcp")] {
        on_transport(c, choice, name);
    }
}

/// The throughput and open benchmarks with the agent on one transport.
fn on_transport(c: &mut Criterion, choice: TransportChoice, name: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (env, target) = rt.block_on(async { (start_in_process_on(choice).await, start_tcp_target().await) });
    let reg = env.registry.clone();
    let id = env.agent_id.clone();

    let mut g = c.benchmark_group(format!("stream_throughput_{name}"));
    g.sample_size(10).measurement_time(Duration::from_secs(15)).throughput(Throughput::Bytes(TOTAL));
    g.bench_function("upload_1_stream_64MiB", |b| b.to_async(&rt).iter(|| upload(&reg, &id, target, TOTAL)));
    g.bench_function("download_1_stream_64MiB", |b| b.to_async(&rt).iter(|| download(&reg, &id, target, TOTAL)));
    g.bench_function("upload_8_streams_64MiB", |b| {
        b.to_async(&rt)
            .iter(|| on_8_streams(&reg, &id, |reg, id| async move { upload(&reg, &id, target, TOTAL / 8).await }))
    });
    g.bench_function("download_8_streams_64MiB", |b| {
        b.to_async(&rt)
            .iter(|| on_8_streams(&reg, &id, |reg, id| async move { download(&reg, &id, target, TOTAL / 8).await }))
    });
    g.finish();

    let mut g = c.benchmark_group(format!("session_open_{name}"));
    g.sample_size(50);
    // Open request -> agent connects to the local TCP target -> accept, on an established tunnel.
    g.bench_function("tcp_open_accept", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (reg, id) = (reg.clone(), id.clone());
            async move {
                let start = Instant::now();
                for _ in 0..iters {
                    let s = reg.open_session(&id, tcp_req(target)).await.unwrap();
                    drop(s);
                }
                start.elapsed()
            }
        })
    });
    g.finish();
    env.shutdown.cancel();
}

criterion_group!(benches, tunnel);
criterion_main!(benches);
