//! Authenticated SSH connections by user, so that disabling or removing a user closes their
//! connections and not only their sessions: a multiplexed connection (OpenSSH
//! `ControlMaster`) would otherwise keep answering gateway commands and opening channels
//! for someone who no longer has access. The SSH door registers each connection here and
//! closes it when [`Conn::closed`] resolves; the enforcer asks for the closing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use postern_tunnel::CancellationToken;

#[derive(Debug, Default)]
pub struct Connections {
    next: AtomicU64,
    /// Connection number → (the user once authenticated, its close signal).
    open: Mutex<HashMap<u64, (Option<String>, CancellationToken)>>,
}

/// One connection's entry: off the table when dropped.
#[derive(Debug)]
pub struct Conn {
    table: Arc<Connections>,
    id: u64,
    close: CancellationToken,
    /// Why it was closed, when not because its user lost access.
    why: std::sync::OnceLock<&'static str>,
}

impl Connections {
    /// Register a new (not yet authenticated) connection.
    pub fn open(self: &Arc<Self>) -> Conn {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let close = CancellationToken::new();
        if let Ok(mut open) = self.open.lock() {
            open.insert(id, (None, close.clone()));
        }
        Conn { table: self.clone(), id, close, why: std::sync::OnceLock::new() }
    }

    /// Close every connection whose user is no longer `active`; the users whose connections
    /// were closed.
    pub fn close_inactive(&self, active: impl Fn(&str) -> bool) -> Vec<String> {
        let Ok(open) = self.open.lock() else { return Vec::new() };
        let mut closed = Vec::new();
        for (user, close) in open.values() {
            if let Some(user) = user
                && !close.is_cancelled()
                && !active(user)
            {
                close.cancel();
                closed.push(user.clone());
            }
        }
        closed
    }

    /// Connections currently registered (authenticated or not).
    pub fn len(&self) -> usize {
        self.open.lock().map(|o| o.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Conn {
    /// The connection authenticated as `user`.
    pub fn authenticated(&self, user: &str) {
        if let Ok(mut open) = self.table.open.lock()
            && let Some(entry) = open.get_mut(&self.id)
        {
            entry.0 = Some(user.to_owned());
        }
    }

    /// Resolves when the connection must be closed (its user lost access).
    pub async fn closed(&self) {
        self.close.cancelled().await
    }

    /// Ask for the connection to be closed for another reason than lost access (a sign-in
    /// connection that lived too long), told to the client.
    pub fn close_because(&self, why: &'static str) {
        let _ = self.why.set(why);
        self.close.cancel();
    }

    /// Why the connection was closed, when it was not because its user lost access.
    pub fn closed_because(&self) -> Option<&'static str> {
        self.why.get().copied()
    }

    /// Whether the connection has been asked to close.
    pub fn is_closed(&self) -> bool {
        self.close.is_cancelled()
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Ok(mut open) = self.table.open.lock() {
            open.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_inactive_users_connections_close() {
        let table = Arc::new(Connections::default());
        let (a, b, anon) = (table.open(), table.open(), table.open());
        a.authenticated("alice");
        b.authenticated("bob");
        assert_eq!(table.close_inactive(|u| u != "alice"), vec!["alice".to_owned()]);
        assert!(a.is_closed() && !b.is_closed() && !anon.is_closed());
        drop(a);
        assert_eq!(table.len(), 2);
    }
}
