//! Connections that have not authenticated yet ("startups", as OpenSSH calls them): at most
//! `[ssh] max_startups` at once, and `[ssh] max_startups_per_source` from one address.
//! A connection beyond either cap is closed as soon as it is accepted; a connection gives
//! its place back when it authenticates or ends.

use std::net::IpAddr;
use std::sync::Arc;

use postern_tunnel::CancellationToken;

use crate::accept::{Full, Slot, SourceSlots};

/// The startups in progress: a per-source table of places.
#[derive(Debug)]
pub(super) struct Startups {
    slots: Arc<SourceSlots>,
}

/// One connection's place among the startups, given back when dropped. Its token is
/// cancelled when the connection authenticates.
#[derive(Debug)]
pub(super) struct Startup {
    _slot: Slot,
    authenticated: CancellationToken,
}

impl Startups {
    pub(super) fn new(max_total: usize, max_per_source: usize) -> Self {
        Self { slots: SourceSlots::new(max_total, max_per_source) }
    }

    /// A place for a new connection from `source`, or which cap it is over.
    pub(super) fn admit(&self, source: IpAddr) -> Result<Startup, Full> {
        let slot = self.slots.admit(source)?;
        Ok(Startup { _slot: slot, authenticated: CancellationToken::new() })
    }

    /// Startups in progress (in all, from `source`).
    #[cfg(test)]
    fn count(&self, source: IpAddr) -> (usize, usize) {
        self.slots.taken(source)
    }
}

impl Startup {
    /// Cancelled when the connection authenticates.
    pub(super) fn token(&self) -> CancellationToken {
        self.authenticated.clone()
    }

    /// The connection authenticated: give the place back and tell the connection task.
    pub(super) fn authenticated(self) {
        self.authenticated.cancel();
    }
}

/// The login grace time of one connection: when it passes before authentication, the
/// connection is closed.
#[derive(Debug)]
pub(super) struct LoginDeadline {
    deadline: tokio::time::Instant,
    authenticated: CancellationToken,
    /// The connection's socket (a second descriptor), to close it whatever russh is doing;
    /// let go once authenticated.
    socket: Option<std::net::TcpStream>,
}

impl LoginDeadline {
    pub(super) fn new(
        deadline: tokio::time::Instant,
        startup: &Startup,
        stream: &tokio::net::TcpStream,
    ) -> LoginDeadline {
        use std::os::fd::AsFd;
        let socket = stream.as_fd().try_clone_to_owned().ok().map(std::net::TcpStream::from);
        LoginDeadline { deadline, authenticated: startup.token(), socket }
    }

    pub(super) fn deadline(&self) -> tokio::time::Instant {
        self.deadline
    }

    /// Resolves when the deadline passes before authentication; never otherwise (and
    /// without a deadline).
    pub(super) async fn expired(login: &mut Option<LoginDeadline>) {
        if let Some(l) = login {
            if tokio::time::timeout_at(l.deadline, l.authenticated.cancelled()).await.is_err() {
                return;
            }
            l.socket = None;
        }
        std::future::pending::<()>().await
    }

    /// Close the connection's socket, both ways.
    pub(super) fn close(&self) {
        if let Some(s) = &self.socket {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn caps_per_source_and_in_all_and_places_come_back() {
        let t = Startups::new(5, 3);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| t.admit(a).unwrap()).collect();
        assert_eq!(t.admit(a).unwrap_err(), Full::Source);
        let b1 = t.admit(b).unwrap();
        let b2 = t.admit(b).unwrap();
        assert_eq!(t.admit(b).unwrap_err(), Full::Total);
        assert_eq!(t.count(a), (5, 3));
        // Authenticating gives the place back, as does ending.
        b1.authenticated();
        drop(b2);
        assert_eq!(t.count(b), (3, 0));
        drop(held);
        assert_eq!(t.count(a), (0, 0));
    }
}
