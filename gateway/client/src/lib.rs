//! Postern client SDK: talk to a Postern gateway over SSH as a user, with the SSH identity
//! the user already has (ssh-agent, or key files), checking the gateway's host key or host
//! certificate against known_hosts files (the `@cert-authority` line from `postern
//! ssh-config`).
//!
//! It is what the `postern` command's user commands (`ls`, `exec`, `shell`, `forward`,
//! `run`, `rdp`) are built on; portals and automation can make the same calls without
//! depending on the gateway server crate.
//!
//! - [`Client`] ([`connect`](mod@connect)): one authenticated connection, to the gateway
//!   (gateway commands: [`Client::instances`], [`Client::rdp_token`], ...) or to
//!   `user%instance` ([`Client::exec_capture`], [`Client::open_tcp`], [`Client::open_rdp`]).
//! - [`forward`]: local port forwards over a reconnecting [`Connection`], reported as events.
//! - [`fleet`]: one command on many instances, with concurrency, error budget, timeout and
//!   cancellation; outcomes and summary as data.
//! - [`known_hosts`]: the OpenSSH known_hosts entries that apply to one host.
//! - Answers are the contract types of [`postern_core::command`], re-exported here.
//!
//! ```no_run
//! # async fn demo() -> Result<(), postern_client::ClientError> {
//! use postern_client::{Client, ClientOptions};
//! // ssh-agent or ~/.ssh/id_*; the gateway's host CA from ~/.ssh/postern_known_hosts.
//! let opts = ClientOptions::new("gw.example.com:2222", "alice");
//! let gateway = Client::connect(&opts, None).await?;
//! for i in gateway.instances(Some("env=prod")).await? {
//!     if !i.online || !i.actions.iter().any(|a| a == "exec") {
//!         continue;
//!     }
//!     // One connection per instance (`alice%NAME`), as with `ssh -p 2222 alice%NAME@gw`.
//!     let on = Client::connect(&opts, Some(&i.name)).await?;
//!     let out = on.exec_capture("uptime", &[], 1 << 20).await?;
//!     println!("{}: exit {:?}: {}", i.name, out.exit_code, String::from_utf8_lossy(&out.stdout.data));
//! }
//! let token = gateway.rdp_token("win-01").await?;
//! println!("xfreerdp /v:{} /pcb:{}", token.rdp_address, token.token);
//! # Ok(()) }
//! ```

pub mod connect;
pub mod error;
pub mod fleet;
pub mod forward;
pub mod known_hosts;

pub use connect::{
    COMMAND_TIMEOUT, CONNECT_TIMEOUT, Captured, Client, ClientOptions, OutputStream, Stream, refusal, split_host_port,
};
pub use error::{ClientError, error_chain};
pub use forward::{Connection, ForwardEvent, ForwardSpec, ForwardStats, Target, serve_forwards};
pub use postern_core::command::{Instance, RdpToken, SshConfig, WhoAmI};
/// The SSH library the channels and streams come from.
pub use russh;
