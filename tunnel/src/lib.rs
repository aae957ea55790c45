//! The Postern QUIC tunnel, both ends.
//!
//! - gateway side ([`server`]): listener, enrollment, [`server::AgentRegistry`] of online
//!   agents, [`server::AgentRegistry::open_session`];
//! - agent side ([`agent`]): `join`, the dial loop with backoff and renewal, and the local
//!   [`services`] (PTY shell, exec, TCP connect) that serve session streams.
//!
//! Both ends use rustls with the ring provider over quinn; see `docs/architecture.md`.

pub mod agent;
pub mod pki;
pub mod server;
pub mod services;
pub mod tls;

pub use tokio_util::sync::CancellationToken;
