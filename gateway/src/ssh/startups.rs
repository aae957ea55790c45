//! Connections that have not authenticated yet ("startups", as OpenSSH calls them): at most
//! `[ssh] max_startups` at once, and `[ssh] max_startups_per_source` from one address.
//! A connection beyond either cap is closed as soon as it is accepted; a connection gives
//! its place back when it authenticates or ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use postern_tunnel::CancellationToken;

#[derive(Debug)]
pub(super) struct Startups {
    max_total: usize,
    max_per_source: usize,
    /// Startups in progress: in all, and by source address.
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Full {
    Total,
    Source,
}

/// One connection's place among the startups, given back when dropped. Its token is
/// cancelled when the connection authenticates.
#[derive(Debug)]
pub(super) struct Startup {
    table: Arc<Startups>,
    source: IpAddr,
    authenticated: CancellationToken,
}

impl Startups {
    pub(super) fn new(max_total: usize, max_per_source: usize) -> Arc<Self> {
        Arc::new(Self { max_total, max_per_source, open: Mutex::new((0, HashMap::new())) })
    }

    /// A place for a new connection from `source`, or which cap it is over.
    pub(super) fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Startup, Full> {
        let Ok(mut open) = self.open.lock() else { return Err(Full::Total) };
        let (total, by_source) = &mut *open;
        if *total >= self.max_total {
            return Err(Full::Total);
        }
        let n = by_source.entry(source).or_insert(0);
        if *n >= self.max_per_source {
            return Err(Full::Source);
        }
        *n += 1;
        *total += 1;
        Ok(Startup { table: self.clone(), source, authenticated: CancellationToken::new() })
    }

    /// Startups in progress (in all, from `source`).
    #[cfg(test)]
    fn count(&self, source: IpAddr) -> (usize, usize) {
        let open = self.open.lock().unwrap();
        (open.0, open.1.get(&source).copied().unwrap_or(0))
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

impl Drop for Startup {
    fn drop(&mut self) {
        let Ok(mut open) = self.table.open.lock() else { return };
        let (total, by_source) = &mut *open;
        *total = total.saturating_sub(1);
        if let Some(n) = by_source.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                by_source.remove(&self.source);
            }
        }
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
        assert!(t.open.lock().unwrap().1.is_empty(), "no entry left for idle sources");
    }
}
