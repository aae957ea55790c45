//! The Postern QUIC tunnel, both ends.
//!
//! - gateway side ([`server`]): listener, enrollment, [`server::AgentRegistry`] of online
//!   agents, [`server::AgentRegistry::open_session`];
//! - caps on connections per source address ([`slots`]), for enrollment and the gateway's
//!   doors;
//! - agent side ([`agent`]): `join`, the dial loop with backoff and renewal, and the local
//!   [`services`] (PTY shell, exec, TCP connect) that serve session streams.
//!
//! Both ends use rustls with the ring provider over quinn; see `docs/architecture.md`.

pub mod agent;
pub mod dial;
pub mod peer;
pub mod pki;
pub mod renewal;
pub mod server;
pub mod services;
pub mod slots;
pub mod tls;
pub mod transport;

pub use tokio_util::sync::CancellationToken;

/// Structured logs to stderr for both binaries: `filter` is a level or tracing directive
/// (invalid ones fall back to `info`), `json` switches to JSON lines.
pub fn init_logging(filter: &str, json: bool) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
