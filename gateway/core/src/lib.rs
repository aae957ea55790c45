//! Postern's core tier: the vocabulary every other part of the gateway speaks, with no
//! sockets, no async runtime and no database driver (`cargo tree -p postern-core -e normal`
//! shows it; a test in tests/tests/layout.rs keeps it so).
//!
//! - [`util`]: names, globs, hex, time stamps, random ids, line diffs
//! - [`duration`]: "90s", "15m", "8h", "30d" and "0" for unlimited
//! - [`action`]: the one [`Action`] enum
//! - [`identity`]: who a verified user is, session limits, the one denial message
//! - [`profile`]: shell profiles
//! - [`policy`]: policy documents and the engine that evaluates them
//! - [`store`]: the [`store::Store`] trait and its records (backends live in the gateway)
//! - [`command`]: the user-command contract shared by the gateway and the client SDK

pub mod action;
pub mod command;
pub mod duration;
pub mod identity;
pub mod policy;
pub mod profile;
pub mod store;
pub mod util;

pub use action::{Action, SESSION_ACTIONS};
pub use identity::{DENIED, Identity, Limits};
pub use store::Labels;
