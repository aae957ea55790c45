//! The Postern QUIC tunnel, both ends.
//!
//! - gateway side ([`server`]): listener, enrollment, [`server::AgentRegistry`] of online
//!   agents, [`server::AgentRegistry::open_session`];
//! - rate limits on log lines that can repeat ([`log_limit`]);
//! - caps on connections per source address ([`slots`]), for enrollment and the gateway's
//!   doors;
//! - `postern doctor` / `postern-agent doctor` ([`doctor`]): the report both print, the
//!   permission checks both make, and the agent's checks;
//! - agent side ([`agent`]): `join`, the dial loop with backoff and renewal, and the local
//!   [`services`] (PTY shell, exec, TCP connect) that serve session streams.
//!
//! Both ends use rustls with the ring provider over quinn; see `docs/architecture.md`.

pub mod agent;
pub mod congestion;
pub mod dial;
pub mod doctor;
pub mod log_limit;
pub mod peer;
pub mod pki;
pub mod renewal;
pub mod server;
pub mod services;
pub mod slots;
pub mod tls;
pub mod transport;

pub use tokio_util::sync::CancellationToken;

/// The log filter in force, changeable while the process runs ([`set_log_filter`]).
static LOG_FILTER: std::sync::OnceLock<
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>,
> = std::sync::OnceLock::new();

/// Structured logs to stderr for both binaries: `filter` is a level or tracing directive
/// (invalid ones fall back to `info`), `json` switches to JSON lines. The filter can be
/// replaced later with [`set_log_filter`] (the gateway's reload).
pub fn init_logging(filter: &str, json: bool) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    // Colours only on a terminal: a file or journald gets plain `key=value` text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let text = (!json).then(|| tracing_subscriber::fmt::layer().with_ansi(colour).with_writer(std::io::stderr));
    let lines = json.then(|| tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr));
    if tracing_subscriber::registry().with(filter).with(text).with(lines).try_init().is_ok() {
        let _ = LOG_FILTER.set(handle);
    }
}

/// Whether `filter` is a valid level or tracing directive (`debug`, `info,postern=debug`).
pub fn check_log_filter(filter: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::try_new(filter).map(drop).map_err(|e| e.to_string())
}

/// Replace the log filter in force (after [`init_logging`]; before it, or for an invalid
/// filter, an error and nothing changes).
pub fn set_log_filter(filter: &str) -> Result<(), String> {
    let parsed = tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
    let handle = LOG_FILTER.get().ok_or("logging is not set up")?;
    handle.reload(parsed).map_err(|e| e.to_string())
}
