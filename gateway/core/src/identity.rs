//! Who a verified user is, and the limits a session runs under.

use std::net::IpAddr;
use std::time::Duration;

/// A user whose key or certificate was verified, and where they came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub source: Option<IpAddr>,
}

/// Session time limits; `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub idle_timeout: Option<Duration>,
    pub max_session: Option<Duration>,
}

/// The one answer for "no such instance" and "not allowed", so users cannot probe names.
pub const DENIED: &str = "access denied (or no such instance)";
