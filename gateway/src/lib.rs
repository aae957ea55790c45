//! Postern gateway: everything a user or admin touches.
//!
//! Today: the agent tunnel listener (from `postern-tunnel`), the embedded store, the audit
//! event log, the admin socket and the `postern` command. The SSH and RDP front doors,
//! identity and policy arrive as their own modules (see docs/architecture.md).

pub mod access;
pub mod admin;
pub mod audit;
pub mod cli;
pub mod client;
pub mod config;
pub mod frames;
pub mod gateway;
pub mod manage;
pub mod rdp;
pub mod recording;
pub mod sessions;
pub mod ssh;
pub mod store;
