//! The monitoring door (`[metrics] listen`, docs/operations.md): plain HTTP for Prometheus
//! and load balancers, off by default. `GET /metrics` (the text exposition format of
//! [`crate::metrics`]), `GET /healthz` (200 while the process serves), `GET /readyz` (200
//! when the store answers, the audit log can be written and the key material is usable;
//! else 503 with one line per failing check). Anything else is 404; request bodies are
//! refused. No authentication and no TLS: nothing here is secret or changes anything, and
//! the documentation says to bind it to loopback or a management network.
//!
//! Also samples the agents' tunnel round-trip times for `postern_tunnel_rtt_seconds`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use postern_tunnel::CancellationToken;
use postern_tunnel::transport::Transport;
use tracing::debug;

use crate::metrics::{METRICS, Snapshot, StoreOp, timed_store};
use crate::services::Services;

/// Connections served at once (a scraper and a load balancer or two); more wait in the
/// kernel's accept queue.
const MAX_CONNECTIONS: usize = 16;
/// Time to read a request's headers, and to answer it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the readiness probe waits for the store.
const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often each agent's round-trip time is sampled.
const RTT_EVERY: Duration = Duration::from_secs(15);

type Answer = Response<Full<Bytes>>;

pub async fn serve(listener: tokio::net::TcpListener, state: Arc<Services>, shutdown: CancellationToken) {
    let places = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let tasks = tokio_util::task::TaskTracker::new();
    tasks.spawn(sample_rtt(state.clone(), shutdown.clone()));
    loop {
        let Ok(place) = places.clone().acquire_owned().await else { break };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    postern_tunnel::warn_limited!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (state, shutdown) = (state.clone(), shutdown.clone());
        tasks.spawn(async move {
            let _place = place;
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move {
                    let answer = tokio::time::timeout(REQUEST_TIMEOUT, handle(&state, req))
                        .await
                        .unwrap_or_else(|_| plain(StatusCode::SERVICE_UNAVAILABLE, "timed out\n".into()));
                    Ok::<_, std::convert::Infallible>(answer)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(REQUEST_TIMEOUT)
                .max_buf_size(16 << 10)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { debug!(error = %e, "metrics connection ended") },
                _ = tokio::time::sleep(REQUEST_TIMEOUT * 6) => {}
                _ = shutdown.cancelled() => {}
            }
        });
    }
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(3), tasks.wait()).await;
}

async fn handle(state: &Services, req: Request<Incoming>) -> Answer {
    // Nothing here takes a body: one announced or sent is refused unread.
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req.body().size_hint().lower() > 0
        || req.headers().get(header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes() != b"0");
    if has_body {
        return plain(StatusCode::PAYLOAD_TOO_LARGE, "request bodies are not accepted\n".into());
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let mut r = plain(StatusCode::OK, METRICS.render(&snapshot(state)));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            r
        }
        (&Method::GET, "/healthz") => plain(StatusCode::OK, "ok\n".into()),
        (&Method::GET, "/readyz") => {
            let failing = readiness(state).await;
            if failing.is_empty() {
                plain(StatusCode::OK, "ready\n".into())
            } else {
                plain(StatusCode::SERVICE_UNAVAILABLE, failing.iter().map(|f| format!("{f}\n")).collect())
            }
        }
        (_, "/metrics" | "/healthz" | "/readyz") => plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into()),
        _ => plain(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn plain(status: StatusCode, body: String) -> Answer {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The gauges whose state lives elsewhere, read now.
fn snapshot(state: &Services) -> Snapshot {
    let mut now = Snapshot::default();
    for (transport, _) in state.instances.registry().links() {
        match transport {
            Transport::Quic => now.agents_quic += 1,
            Transport::Tcp => now.agents_tcp += 1,
        }
    }
    for s in state.sessions.live() {
        now.add_session(s.door, s.party.action);
    }
    now
}

/// The failing readiness checks, one short line each; empty when ready.
async fn readiness(state: &Services) -> Vec<String> {
    let mut failing = Vec::new();
    // The store (in a cluster, the shared one): a cheap one-row read.
    let probe = timed_store(StoreOp::Readiness, state.store.access_generation());
    match tokio::time::timeout(STORE_PROBE_TIMEOUT, probe).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => failing.push(format!("store: {e}")),
        Err(_) => failing.push(format!("store: no answer within {}s", STORE_PROBE_TIMEOUT.as_secs())),
    }
    if let Err(e) = state.audit.check_writable() {
        failing.push(format!("audit: {e}"));
    }
    // Key material: the SSH door's host certificate must be valid now.
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
    let cert = &state.host_keys.certificate;
    if cert.valid_after() > now || cert.valid_before() <= now {
        failing.push("keys: the SSH host certificate is not valid now".into());
    }
    failing
}

/// Sample every connected agent's QUIC round-trip time every [`RTT_EVERY`] (TCP-transport
/// agents have no cheap estimate and are left out).
async fn sample_rtt(state: Arc<Services>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(RTT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        for (_, rtt) in state.instances.registry().links() {
            if let Some(rtt) = rtt {
                METRICS.tunnel_rtt(rtt);
            }
        }
    }
}
