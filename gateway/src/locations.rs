//! Where each agent is connected, in a cluster (`[cluster] gateway_id`): a row per agent in
//! the shared store naming its gateway, under a lease that gateway renews (docs/scale-out.md,
//! "Agents on any gateway").
//!
//! ```text
//! agent connects    -> record (agent, this gateway, since, now + LEASE): the row is ours
//! every RENEW       -> one statement renews the leases of every agent connected here
//! agent disconnects -> delete the row if it still names this gateway (not if it moved)
//! lookups           -> rows whose lease has not expired; a killed gateway's rows stop
//!                      counting LEASE after its last renewal at most
//! ```
//!
//! A single gateway (no `gateway_id`) does none of this: every method is a no-op answering
//! "nowhere else", so a single gateway behaves as it did before clusters.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use postern_tunnel::CancellationToken;
use postern_tunnel::server::AgentRegistry;
use tracing::info;

use crate::store::{AgentLocation, Store};

/// How long a location counts after its last renewal.
pub const LEASE: Duration = Duration::from_secs(15);
/// How often a gateway renews the leases of its agents (a third of the lease: two renewals
/// may fail before a connected agent stops counting as here).
pub const RENEW: Duration = Duration::from_secs(5);

/// Unix milliseconds.
fn millis(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0)
}

fn now_ms() -> i64 {
    millis(SystemTime::now())
}

fn lease_ms() -> i64 {
    i64::try_from(LEASE.as_millis()).unwrap_or(i64::MAX)
}

/// The agent locations of this gateway's cluster, or nothing for a single gateway.
pub struct AgentLocations {
    store: Arc<dyn Store>,
    /// `[cluster] gateway_id`; `None`: a single gateway, nothing is kept.
    gateway_id: Option<String>,
    /// Whether the last store call failed (a warning is logged on the change only).
    failing: AtomicBool,
}

impl std::fmt::Debug for AgentLocations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentLocations").field("gateway_id", &self.gateway_id).finish_non_exhaustive()
    }
}

impl AgentLocations {
    pub fn new(store: Arc<dyn Store>, gateway_id: Option<String>) -> Self {
        AgentLocations { store, gateway_id, failing: AtomicBool::new(false) }
    }

    /// This gateway's id in the cluster, if it is in one.
    pub fn gateway_id(&self) -> Option<&str> {
        self.gateway_id.as_deref()
    }

    /// Log a failed store call once per run of failures, and the recovery.
    fn outcome<T>(&self, what: &str, r: Result<T, crate::store::StoreError>) -> Option<T> {
        match r {
            Ok(v) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    info!("agent locations: the store answers again");
                }
                Some(v)
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    postern_tunnel::warn_limited!(error = %e, "agent locations: cannot {what}; retrying with the next renewal");
                }
                None
            }
        }
    }

    /// `agent_id` connected here: its location becomes this gateway.
    pub async fn connected(&self, agent_id: &str) {
        let Some(gateway_id) = &self.gateway_id else { return };
        let now = now_ms();
        let location = AgentLocation {
            agent_id: agent_id.to_owned(),
            gateway_id: gateway_id.clone(),
            connected_since: now,
            lease_expires: now.saturating_add(lease_ms()),
        };
        self.outcome("record an agent's location", self.store.record_agent_location(&location).await);
    }

    /// `agent_id`'s connection here ended: its row goes, unless it already names another
    /// gateway (the agent moved there first). A newer connection of the same agent to this
    /// gateway that raced this removal is put back by the next renewal.
    pub async fn departed(&self, agent_id: &str) {
        let Some(gateway_id) = &self.gateway_id else { return };
        self.outcome("remove an agent's location", self.store.remove_agent_location(agent_id, gateway_id).await);
    }

    /// The gateway `agent_id` is connected to if it is another one with a live lease.
    pub async fn elsewhere(&self, agent_id: &str) -> Option<String> {
        let gateway_id = self.gateway_id.as_ref()?;
        let found = self.outcome("look up an agent's location", self.store.agent_location(agent_id, now_ms()).await)?;
        found.map(|l| l.gateway_id).filter(|g| g != gateway_id)
    }

    /// Every agent connected to another gateway with a live lease, by agent id.
    pub async fn all_elsewhere(&self) -> HashMap<String, String> {
        let Some(gateway_id) = &self.gateway_id else { return HashMap::new() };
        let rows = self.outcome("list agent locations", self.store.agent_locations(now_ms()).await).unwrap_or_default();
        rows.into_iter().filter(|l| &l.gateway_id != gateway_id).map(|l| (l.agent_id, l.gateway_id)).collect()
    }

    /// Renew the leases of every agent connected here, every [`RENEW`], until `shutdown`:
    /// one statement per period whatever the number of agents.
    pub async fn keep_leases(self: Arc<Self>, registry: AgentRegistry, shutdown: CancellationToken) {
        let Some(gateway_id) = self.gateway_id.clone() else { return };
        let mut tick = tokio::time::interval(RENEW);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let here: Vec<(String, i64)> =
                registry.online().into_iter().map(|a| (a.agent_id, millis(a.connected_at))).collect();
            let expires = now_ms().saturating_add(lease_ms());
            self.outcome("renew agent leases", self.store.renew_agent_locations(&gateway_id, &here, expires).await);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::sqlite::SqliteStore;

    /// Two gateways on one store: each sees the other's agents (and not its own) as
    /// elsewhere; a departure at the old gateway does not remove the agent's new location;
    /// a single gateway keeps nothing.
    #[tokio::test]
    async fn gateways_see_each_others_agents_and_only_their_own_rows_go() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("postern.db")).await.unwrap());
        let a = AgentLocations::new(store.clone(), Some("gw-a".into()));
        let b = AgentLocations::new(store.clone(), Some("gw-b".into()));
        let single = AgentLocations::new(store.clone(), None);

        a.connected("ag-1").await;
        assert_eq!(b.elsewhere("ag-1").await.as_deref(), Some("gw-a"));
        assert_eq!(a.elsewhere("ag-1").await, None, "its own agent is not elsewhere");
        assert_eq!(b.all_elsewhere().await.get("ag-1").map(String::as_str), Some("gw-a"));
        assert!(a.all_elsewhere().await.is_empty());

        // ag-1 moves to B before A notices it left: A's departure leaves B's row.
        b.connected("ag-1").await;
        a.departed("ag-1").await;
        assert_eq!(a.elsewhere("ag-1").await.as_deref(), Some("gw-b"));
        b.departed("ag-1").await;
        assert_eq!(a.elsewhere("ag-1").await, None);

        // A single gateway writes nothing and finds nothing elsewhere.
        single.connected("ag-2").await;
        assert_eq!(a.elsewhere("ag-2").await, None);
        assert!(store.agent_locations(0).await.unwrap().is_empty());
        a.connected("ag-3").await;
        assert_eq!(single.elsewhere("ag-3").await, None);
        assert!(single.all_elsewhere().await.is_empty());
    }
}
