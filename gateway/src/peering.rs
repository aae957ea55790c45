//! Reaching agents connected to other gateways of the cluster (docs/scale-out.md "Gateway
//! peering"); the transport is `postern_tunnel::peer`.
//!
//! Every cluster gateway keeps a lease in the store (`gateways`: its id and the address its
//! tunnel listener is reached at), renewed every [`HEARTBEAT`]. A session to an agent that is
//! not connected here asks the live gateways for it, one after another, and goes through the
//! first that has it: authorization, recording and audit stay here, where the user is.

use std::sync::Arc;
use std::time::Duration;

use postern_core::util::now_unix;
use postern_proto::SessionRequest;
use postern_tunnel::CancellationToken;
use postern_tunnel::peer::PeerClient;
use postern_tunnel::server::{OpenError, SessionStream};

use crate::store::Store;

/// How often a gateway renews its lease ...
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// ... and how long the lease runs: a gateway that stopped renewing is no longer asked
/// after this.
pub const LEASE: Duration = Duration::from_secs(15);

pub struct Peering {
    /// This gateway's id.
    id: String,
    /// Where other gateways reach this one (`host:port`).
    address: String,
    store: Arc<dyn Store>,
    client: Arc<PeerClient>,
}

impl std::fmt::Debug for Peering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peering").field("id", &self.id).field("address", &self.address).finish_non_exhaustive()
    }
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

impl Peering {
    pub fn new(id: String, address: String, store: Arc<dyn Store>, client: Arc<PeerClient>) -> Self {
        Self { id, address, store, client }
    }

    pub fn gateway_id(&self) -> &str {
        &self.id
    }

    /// Open a session to `agent_id`, which is not connected here, through the live gateway
    /// that has it: `hint` (where the store says the agent is) first, then the others.
    /// `Offline` when none has it.
    pub async fn open(
        &self,
        agent_id: &str,
        hint: Option<&str>,
        request: SessionRequest,
    ) -> Result<SessionStream, OpenError> {
        let mut gateways = self.store.live_gateways(now_unix()).await.map_err(|e| {
            postern_tunnel::warn_limited!(error = %e, "cannot read the cluster's gateways from the store");
            OpenError::Offline
        })?;
        gateways.sort_by_key(|(id, _)| Some(id.as_str()) != hint);
        let mut last = OpenError::Offline;
        for (id, address) in gateways.iter().filter(|(id, _)| *id != self.id) {
            match self.client.open_session(id, address, agent_id, request.clone()).await {
                Ok(stream) => return Ok(stream),
                // Not there: ask the next one.
                Err(OpenError::Offline) => {}
                // Unreachable: remembered, and the next one asked (the agent may have moved).
                Err(e @ OpenError::Tunnel(_)) => {
                    tracing::debug!(gateway = %id, error = %e, "peer gateway unreachable");
                    last = e;
                }
                // The agent answered (accepted or refused): that is the answer.
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// Renew this gateway's lease every [`HEARTBEAT`] until `shutdown`, then end it.
    pub async fn keep_lease(self: Arc<Self>, shutdown: CancellationToken) {
        let mut failing = false;
        loop {
            let until = now_unix().saturating_add(secs(LEASE));
            match self.store.gateway_alive(&self.id, &self.address, until).await {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    postern_tunnel::warn_limited!(error = %e, "cannot renew this gateway's lease in the store");
                }
                Err(_) => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(HEARTBEAT) => {}
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.store.gateway_left(&self.id, now_unix())).await;
        self.client.close();
    }
}
