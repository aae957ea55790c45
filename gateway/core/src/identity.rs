//! Who a verified user is, and the limits a session runs under.

use std::net::IpAddr;
use std::time::Duration;

/// A user whose key or certificate was verified, and where they came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub source: Option<IpAddr>,
    /// Set when the user came in with a certificate the gateway itself issued (`postern
    /// login`, `postern user cert`): what it says about the login behind it.
    pub cert: Option<CertFacts>,
}

impl Identity {
    pub fn new(user: impl Into<String>, source: Option<IpAddr>) -> Self {
        Self { user: user.into(), source, cert: None }
    }

    /// Whether the login behind this connection used a second factor (only a certificate
    /// from `postern login` can say so).
    pub fn mfa(&self) -> bool {
        self.cert.as_ref().is_some_and(|c| c.mfa)
    }

    /// The serial of the gateway-issued certificate this connection authenticated with.
    pub fn cert_serial(&self) -> Option<u64> {
        self.cert.as_ref().map(|c| c.serial)
    }
}

/// What a gateway-issued user certificate carries beyond the user's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertFacts {
    pub serial: u64,
    /// The identity provider reported a second factor for the login it was issued for.
    pub mfa: bool,
    /// Unix seconds.
    pub valid_before: u64,
}

/// Session time limits; `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub idle_timeout: Option<Duration>,
    pub max_session: Option<Duration>,
}

/// The one answer for "no such instance" and "not allowed", so users cannot probe names.
pub const DENIED: &str = "access denied (or no such instance)";
