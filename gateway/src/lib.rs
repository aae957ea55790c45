//! Postern gateway: the server and the `postern` command, in layers (docs/architecture.md;
//! tests/tests/layout.rs checks them): leaves (accept, config, store, audit, recording, frames,
//! host keys, the RDP wire format, addressing, the OIDC relying party, metrics) → services (access,
//! instances, agent locations, sessions, enforcer, manage, broker, runs, RDP tokens, certificates, sign-in) → the
//! [`services::Services`] set → doors (ssh, rdp, admin, web, monitor), which never import one another → app
//! (start-up, background jobs) → cli. The vocabulary is the `postern-core` crate; the client
//! SDK is `postern-client`.

// leaves
pub mod accept;
pub mod addressing;
pub mod audit;
pub mod cluster;
pub mod config;
pub mod frames;
pub mod hostkeys;
pub mod metrics;
pub mod oidc;
pub mod rdp_wire;
pub mod recording;
pub mod store;
// services
pub mod access;
pub mod broker;
pub mod certs;
pub mod cluster_sessions;
pub mod connections;
pub mod enforcer;
pub mod history;
pub mod instances;
pub mod launch;
pub mod locations;
pub mod manage;
pub mod peering;
pub mod rdp_tokens;
pub mod reload;
pub mod runs;
pub mod services;

#[cfg(test)]
mod services_tests;
pub mod session_relay;
pub mod sessions;
pub mod sso;
pub mod web_signin;
// doors
pub mod admin;
pub mod monitor;
pub mod rdp;
pub mod ssh;
pub mod web;
// start-up and the command line
pub mod app;
pub mod cli;
