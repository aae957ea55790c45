//! The enforcer: live sessions are re-checked against policy whenever access changes and at
//! least every [`RECHECK_EVERY`]; those no longer allowed are ended, with an audit event.
//! Revocation must end sessions within 5 seconds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use postern_tunnel::CancellationToken;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::access::Authorizer;
use crate::audit::events::{Event, SessionTerminated};
use crate::connections::Connections;
use crate::sessions::SessionTable;
use crate::store::{AgentRecord, Store};

/// How often live sessions are re-checked against policy even without a change (expiring
/// grants, time windows).
pub const RECHECK_EVERY: Duration = Duration::from_secs(1);

/// Re-check every live session against the current policy whenever access changes, and at
/// least every [`RECHECK_EVERY`]; end those no longer allowed, with an audit event (written
/// when the session has ended), and close the SSH connections of users no longer active.
pub async fn enforce(
    authorizer: Arc<Authorizer>,
    sessions: Arc<SessionTable>,
    store: Arc<dyn Store>,
    connections: Arc<Connections>,
    access_changed: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = access_changed.notified() => {}
            _ = tokio::time::sleep(RECHECK_EVERY) => {}
        }
        end_disallowed(&authorizer, &sessions, store.as_ref()).await;
        // A user who is disabled or removed keeps no connection either (a multiplexed
        // connection could otherwise still run gateway commands and open channels). After
        // their sessions were told to end, so that the session notices go out first (the
        // SSH door gives a closed connection a moment before it disconnects).
        for user in connections.close_inactive(|u| authorizer.list().user_active(u)) {
            info!(%user, "closing an ssh connection of a user who is disabled or removed");
        }
    }
}

/// End the live sessions policy no longer allows.
async fn end_disallowed(authorizer: &Authorizer, sessions: &SessionTable, store: &dyn Store) {
    {
        let live = sessions.live();
        if live.is_empty() {
            return;
        }
        let agents: HashMap<String, AgentRecord> = match store.agents().await {
            Ok(a) => a.into_iter().map(|a| (a.id.clone(), a)).collect(),
            Err(e) => {
                warn!(error = %e, "cannot re-check live sessions");
                return;
            }
        };
        let now = jiff::Timestamp::now();
        for s in live {
            if let Err(why) = authorizer.recheck(agents.get(&s.party.agent_id), &s, now) {
                let reason = format!("access revoked ({why})");
                // The event is written when the session has ended (broker::Running::finish).
                let event = Event::SessionTerminated(SessionTerminated {
                    session_id: s.id.clone(),
                    user: s.party.user.clone(),
                    target: s.party.target.clone(),
                    kind: s.party.action,
                    actor: "policy".to_owned(),
                    reason: reason.clone(),
                });
                if s.end_with_event(&reason, event) {
                    info!(session_id = %s.id, user = %s.party.user, %reason, "ending session no longer allowed");
                }
            }
        }
    }
}
