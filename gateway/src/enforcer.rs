//! The enforcer: live sessions are re-checked against policy whenever access changes and at
//! least every [`RECHECK_EVERY`]; those no longer allowed are ended, with an audit event.
//! Revocation must end sessions within 5 seconds.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use postern_tunnel::CancellationToken;
use tokio::sync::Notify;
use tracing::info;

use crate::access::{Authorizer, Disallowed};
use crate::audit::AuditLog;
use crate::audit::events::{Event, GrantExpired, SessionTerminated};
use crate::connections::Connections;
use crate::metrics::{StoreOp, timed_store};
use crate::sessions::SessionTable;
use crate::store::{AgentRecord, Store};

/// How often live sessions are re-checked against policy even without a change (expiring
/// grants, time windows).
pub const RECHECK_EVERY: Duration = Duration::from_secs(1);

/// Re-check every live session against the current policy whenever access changes, and at
/// least every [`RECHECK_EVERY`]; end those no longer allowed, with an audit event (written
/// when the session has ended), and close the SSH connections of users no longer active.
/// Grants that expire meanwhile get their `grant.expired` event.
#[allow(clippy::too_many_arguments)]
pub async fn enforce(
    audit: Arc<AuditLog>,
    authorizer: Arc<Authorizer>,
    sessions: Arc<SessionTable>,
    store: Arc<dyn Store>,
    connections: Arc<Connections>,
    access_changed: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut active_grants = HashSet::new();
    let mut follower = Follower::default();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = access_changed.notified() => {}
            _ = tokio::time::sleep(RECHECK_EVERY) => {}
        }
        follower.follow(&authorizer, store.as_ref()).await;
        announce_expired_grants(&authorizer, &audit, &mut active_grants);
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

/// How often a failure to read the store while following it is logged (it is retried every
/// tick meanwhile).
const FOLLOW_WARN_EVERY: Duration = Duration::from_secs(60);

/// Follows changes to users, policies and grants made through other gateways sharing the
/// store: each tick reads the store's access generation (one row) and, when it is not the
/// one this gateway's copy was loaded at, reloads the copy (a change made here was reloaded
/// at once and is not loaded again); the re-check that follows then ends sessions no longer
/// allowed. A store that cannot be read keeps the last copy in force (logged at most once a
/// [`FOLLOW_WARN_EVERY`]) and is tried again next tick.
#[derive(Debug, Default)]
struct Follower {
    last_warning: Option<tokio::time::Instant>,
}

impl Follower {
    async fn follow(&mut self, authorizer: &Authorizer, store: &dyn Store) {
        let result = async {
            let generation = timed_store(StoreOp::AccessPoll, store.access_generation()).await?;
            if authorizer.list().loaded_generation() != Some(generation) {
                timed_store(StoreOp::AccessReload, authorizer.list().reload(store)).await?;
            }
            Ok::<_, crate::store::StoreError>(())
        }
        .await;
        if let Err(e) = result {
            let now = tokio::time::Instant::now();
            if self.last_warning.is_none_or(|t| now.duration_since(t) >= FOLLOW_WARN_EVERY) {
                self.last_warning = Some(now);
                postern_tunnel::warn_limited!(error = %e, "cannot read users, policies and grants from the store; keeping the last copy");
            }
        }
    }
}

/// Write `grant.expired` for each grant that was active at the last look and has expired
/// since (not revoked: that has its own event). `active` holds the ids of active grants
/// (bounded by the grants in the store). Grants that expire while the gateway is stopped get
/// no event (their `expires_at` is in `grant.created`).
fn announce_expired_grants(authorizer: &Authorizer, audit: &AuditLog, active: &mut HashSet<String>) {
    let now = postern_core::util::now_unix();
    let grants = authorizer.list().grants();
    for g in &grants {
        if g.active_at(now) {
            active.insert(g.id.clone());
        } else if active.remove(&g.id) && g.revoked_at.is_none() {
            info!(grant_id = %g.id, user = %g.user, policy = %g.policy, "grant expired");
            let _ = audit.event(&Event::GrantExpired(GrantExpired {
                grant_id: g.id.clone(),
                user: g.user.clone(),
                policy: g.policy.clone(),
                expires_at: g.expires_at,
            }));
        }
    }
    // Grants deleted from the store are forgotten.
    active.retain(|id| grants.iter().any(|g| &g.id == id));
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
                postern_tunnel::warn_limited!(error = %e, "cannot re-check live sessions");
                return;
            }
        };
        let now = jiff::Timestamp::now();
        for s in live {
            if let Err(why) = authorizer.recheck(agents.get(&s.party.agent_id), &s, now) {
                let reason = match why {
                    Disallowed::Revoked(why) => format!("access revoked ({why})"),
                    Disallowed::LimitShortened(max) => {
                        format!("maximum session length of {} reached (the limit was lowered)", human_secs(max))
                    }
                };
                // The event is written when the session has ended (broker::Running::finish).
                let event = Event::SessionTerminated(SessionTerminated {
                    session_id: s.id.clone(),
                    user: s.party.user.clone(),
                    target: s.party.target.clone(),
                    kind: s.party.action,
                    actor: "policy".to_owned(),
                    reason: reason.clone(),
                    from_gateway: None,
                });
                if s.end_with_event(&reason, event) {
                    info!(session_id = %s.id, user = %s.party.user, %reason, "ending session no longer allowed");
                }
            }
        }
    }
}

/// `90s`, `5m`, `2h`: a lowered limit as the session's end notice gives it.
fn human_secs(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        _ if s >= 3600 && s.is_multiple_of(3600) => format!("{}h", s / 3600),
        _ if s >= 60 && s.is_multiple_of(60) => format!("{}m", s / 60),
        _ => format!("{s}s"),
    }
}
