//! Live sessions across a cluster (`[cluster] gateway_id`): each gateway keeps its own live
//! sessions in the shared store under a lease, so `postern sessions` at any gateway lists
//! them all; `postern sessions terminate` for a session on another gateway writes a request
//! to the store that the session's gateway carries out (docs/scale-out.md, "Sessions across
//! the cluster").
//!
//! One task per gateway ([`ClusterSessions::run`]) does all of this gateway's writes, once a
//! [`POLL_EVERY`]: rows for sessions that started, deletions for those that ended, a renewal
//! of every row (one statement) each [`RENEW_EVERY`], and the terminate requests addressed
//! to this gateway. Because one task computes every write from one snapshot of the live
//! table at a time, a session's row is never written again after its deletion.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use postern_core::util::{now_unix, random_hex};
use postern_tunnel::CancellationToken;
use tracing::info;

use crate::audit::events::{Event, SessionTerminated};
use crate::sessions::{LiveSession, SessionRow, SessionTable};
use crate::store::{
    LiveSessionRecord, Store, StoreError, TERMINATE_CLAIMED, TERMINATE_DONE, TERMINATE_NOT_LIVE, TERMINATE_PENDING,
    TERMINATE_WITHDRAWN, TerminateRequest,
};

/// How often the task looks at the live table and at terminate requests for this gateway.
pub const POLL_EVERY: Duration = Duration::from_secs(1);
/// How often every row of this gateway is renewed (one statement).
pub const RENEW_EVERY: Duration = Duration::from_secs(5);
/// How long a row counts without a renewal: a gateway that stops renewing (killed, cut off
/// from the store) drops out of the list this long after its last renewal.
pub const LEASE: Duration = Duration::from_secs(15);
/// How long `sessions terminate` waits for another gateway to act before it gives up (and
/// withdraws the request, so that it is not carried out later).
pub const ASK_WAIT: Duration = Duration::from_secs(10);
/// How long the asking side waits for the outcome once the session's gateway has claimed the
/// request (ending a session is immediate; this covers a slow store).
const OUTCOME_WAIT: Duration = Duration::from_secs(5);
/// How often the asking side reads the request's state while it waits.
const ASK_POLL: Duration = Duration::from_millis(200);
/// Expired rows are deleted this often (listings ignore them meanwhile).
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How often a failure to reach the store is logged (retried every poll meanwhile).
const WARN_EVERY: Duration = Duration::from_secs(60);
/// The most live sessions one listing shows, and terminate requests taken per poll.
pub const MAX_LISTED: u32 = 10_000;
const MAX_REQUESTS_PER_POLL: u32 = 100;

/// Why a session on another gateway was not ended.
#[derive(Debug, thiserror::Error)]
pub enum RemoteTerminateError {
    #[error("no live session {0:?} on any gateway of the cluster; see `postern sessions`")]
    NotLive(String),
    #[error("session {id:?} had already ended at gateway {gateway}")]
    Ended { id: String, gateway: String },
    #[error(
        "gateway {gateway} did not act on the request to end session {id:?} within {}s; the request is \
         withdrawn (is that gateway running? its sessions leave `postern sessions` at most {}s after it stopped)",
        ASK_WAIT.as_secs(), LEASE.as_secs()
    )]
    NotActed { id: String, gateway: String },
    #[error(transparent)]
    Random(#[from] postern_core::util::RandomError),
    #[error("cannot reach the cluster's live sessions in the store: {0}")]
    Store(#[from] StoreError),
}

/// This gateway's part in the cluster's live sessions.
pub struct ClusterSessions {
    gateway_id: String,
    store: Arc<dyn Store>,
    sessions: Arc<SessionTable>,
}

impl ClusterSessions {
    pub fn new(gateway_id: String, store: Arc<dyn Store>, sessions: Arc<SessionTable>) -> Self {
        ClusterSessions { gateway_id, store, sessions }
    }

    pub fn gateway_id(&self) -> &str {
        &self.gateway_id
    }

    /// Every live session of the cluster, newest first, each with its gateway: this
    /// gateway's from its own table (current), the others' from the store (as of their last
    /// renewal), leaving out rows whose lease has run out.
    pub async fn rows(&self) -> Result<Vec<SessionRow>, StoreError> {
        let now = now_unix();
        let mut rows = self.sessions.rows();
        for r in &mut rows {
            r.gateway = Some(self.gateway_id.clone());
        }
        let elsewhere = self.store.live_sessions(now, MAX_LISTED).await?;
        rows.extend(elsewhere.into_iter().filter(|r| r.gateway_id != self.gateway_id).map(|r| SessionRow {
            id: r.id,
            user: r.user,
            source: r.source,
            target: r.instance,
            kind: r.kind,
            destination: r.destination,
            logged: r.logged,
            active: true,
            started_at: r.started_at,
            duration_secs: (now - r.started_at).max(0),
            bytes_in: r.bytes_in,
            bytes_out: r.bytes_out,
            end_reason: None,
            gateway: Some(r.gateway_id),
        }));
        rows.sort_by(|a, b| b.started_at.cmp(&a.started_at).then(b.id.cmp(&a.id)));
        Ok(rows)
    }

    /// Ask the gateway carrying live session `id` (not this one) to end it on behalf of
    /// `actor`, and wait (at most [`ASK_WAIT`], then [`OUTCOME_WAIT`] once it has claimed
    /// the request) until it has: returns that gateway's id. A request not claimed in time
    /// is withdrawn, so the session's gateway never acts on it later.
    pub async fn terminate_elsewhere(&self, id: &str, actor: &str) -> Result<String, RemoteTerminateError> {
        let now = now_unix();
        let owner = self
            .store
            .live_sessions(now, MAX_LISTED)
            .await?
            .into_iter()
            .find(|r| r.id == id && r.gateway_id != self.gateway_id)
            .map(|r| r.gateway_id)
            .ok_or_else(|| RemoteTerminateError::NotLive(id.to_owned()))?;
        let request = TerminateRequest {
            id: random_hex(16)?,
            session_id: id.to_owned(),
            gateway_id: owner.clone(),
            actor: actor.to_owned(),
            asked_by: self.gateway_id.clone(),
            created_at: now,
            expires_at: now.saturating_add(ASK_WAIT.as_secs() as i64),
            state: TERMINATE_PENDING.to_owned(),
        };
        self.store.add_terminate_request(&request).await?;
        info!(session_id = %id, gateway = %owner, %actor, "asked another gateway to end a session");
        let asked = tokio::time::Instant::now();
        let mut claimed = false;
        loop {
            tokio::time::sleep(ASK_POLL).await;
            let state = self.store.terminate_request(&request.id).await?.map(|r| r.state);
            match state.as_deref() {
                Some(TERMINATE_DONE) => return Ok(owner),
                Some(TERMINATE_NOT_LIVE) => {
                    return Err(RemoteTerminateError::Ended { id: id.to_owned(), gateway: owner });
                }
                Some(TERMINATE_CLAIMED) => claimed = true,
                _ => {}
            }
            let waited = asked.elapsed();
            if !claimed && waited >= ASK_WAIT {
                // Of this withdrawal and a late claim, exactly one wins (a conditional update).
                if self
                    .store
                    .move_terminate_request(&request.id, TERMINATE_PENDING, TERMINATE_WITHDRAWN, now_unix())
                    .await?
                {
                    return Err(RemoteTerminateError::NotActed { id: id.to_owned(), gateway: owner });
                }
                claimed = true;
            }
            if waited >= ASK_WAIT + OUTCOME_WAIT {
                return Err(RemoteTerminateError::NotActed { id: id.to_owned(), gateway: owner });
            }
        }
    }

    /// Keep this gateway's rows current and act on terminate requests for it, until
    /// `shutdown`; then delete its rows (best effort: they expire anyway).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut published = self.rows_left_before().await;
        let mut last_renewal: Option<tokio::time::Instant> = None;
        let mut last_prune = tokio::time::Instant::now();
        let mut last_warning: Option<tokio::time::Instant> = None;
        let mut tick = tokio::time::interval(POLL_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let mut result = self.publish(&mut published, &mut last_renewal).await;
            if result.is_ok() {
                result = self.act_on_requests().await;
            }
            if result.is_ok() && last_prune.elapsed() >= PRUNE_EVERY {
                last_prune = tokio::time::Instant::now();
                result = self.store.prune_cluster_sessions(now_unix()).await.map(drop);
            }
            if let Err(e) = result {
                let now = tokio::time::Instant::now();
                if last_warning.is_none_or(|t| now.duration_since(t) >= WARN_EVERY) {
                    last_warning = Some(now);
                    postern_tunnel::warn_limited!(error = %e, "cannot keep this gateway's live sessions in the store; retrying every second");
                }
            }
        }
        let ids: Vec<String> = published.into_iter().collect();
        let _ =
            tokio::time::timeout(Duration::from_secs(2), self.store.remove_live_sessions(&self.gateway_id, &ids)).await;
    }

    /// Rows this gateway id left in the store before this process started (after a crash):
    /// their sessions no longer run. Counted as published, the first look deletes them
    /// rather than letting them wait for their lease. None when the store cannot be read
    /// (they expire then).
    async fn rows_left_before(&self) -> HashSet<String> {
        match self.store.live_sessions(now_unix(), MAX_LISTED).await {
            Ok(rows) => rows.into_iter().filter(|r| r.gateway_id == self.gateway_id).map(|r| r.id).collect(),
            Err(_) => HashSet::new(),
        }
    }

    /// Write what changed since the last call: rows for new sessions, deletions for ended
    /// ones, and every row again when a renewal is due. `published`: the ids whose rows are
    /// in the store (bounded by the live table, plus ended ones whose deletion failed).
    async fn publish(
        &self,
        published: &mut HashSet<String>,
        last_renewal: &mut Option<tokio::time::Instant>,
    ) -> Result<(), StoreError> {
        let live = self.sessions.live();
        let ids: HashSet<&str> = live.iter().map(|s| s.id.as_str()).collect();
        let ended: Vec<String> = published.iter().filter(|id| !ids.contains(id.as_str())).cloned().collect();
        if !ended.is_empty() {
            self.store.remove_live_sessions(&self.gateway_id, &ended).await?;
            for id in &ended {
                published.remove(id);
            }
        }
        let renew = last_renewal.is_none_or(|t| t.elapsed() >= RENEW_EVERY);
        let lease_until = now_unix().saturating_add(LEASE.as_secs() as i64);
        let rows: Vec<LiveSessionRecord> =
            live.iter().filter(|s| renew || !published.contains(&s.id)).map(|s| self.record(s, lease_until)).collect();
        if !rows.is_empty() {
            self.store.put_live_sessions(&rows).await?;
            published.extend(rows.into_iter().map(|r| r.id));
        }
        if renew {
            *last_renewal = Some(tokio::time::Instant::now());
        }
        Ok(())
    }

    fn record(&self, s: &LiveSession, lease_until: i64) -> LiveSessionRecord {
        let row = SessionRow::of(s, 0, true);
        LiveSessionRecord {
            id: row.id,
            gateway_id: self.gateway_id.clone(),
            user: row.user,
            source: row.source,
            instance: row.target,
            agent_id: s.party.agent_id.clone(),
            kind: row.kind,
            destination: row.destination,
            logged: row.logged,
            started_at: row.started_at,
            bytes_in: row.bytes_in,
            bytes_out: row.bytes_out,
            lease_until,
        }
    }

    /// End the sessions other gateways asked this one to end, as `postern sessions
    /// terminate` here would (the same notice and events), recording who asked and where.
    /// A request is claimed first (only while pending and unexpired): one the asking gateway
    /// has withdrawn or that has expired is never carried out.
    async fn act_on_requests(&self) -> Result<(), StoreError> {
        let now = now_unix();
        for request in self.store.pending_terminate_requests(&self.gateway_id, now, MAX_REQUESTS_PER_POLL).await? {
            if !self.store.move_terminate_request(&request.id, TERMINATE_PENDING, TERMINATE_CLAIMED, now).await? {
                continue;
            }
            let reason = format!("terminated by {} (at gateway {})", request.actor, request.asked_by);
            // The session.terminated event is written when the session has actually ended,
            // just before its end event (broker::Running::finish), as for a local terminate.
            let ended = self.sessions.terminate_with_event(&request.session_id, &reason, |s| {
                Event::SessionTerminated(SessionTerminated {
                    session_id: s.id.clone(),
                    user: s.party.user.clone(),
                    target: s.party.target.clone(),
                    kind: s.party.action,
                    actor: request.actor.clone(),
                    reason: reason.clone(),
                    from_gateway: Some(request.asked_by.clone()),
                })
            });
            info!(session_id = %request.session_id, actor = %request.actor, asked_by = %request.asked_by, ended,
                  "terminate request from another gateway");
            let outcome = if ended { TERMINATE_DONE } else { TERMINATE_NOT_LIVE };
            self.store.move_terminate_request(&request.id, TERMINATE_CLAIMED, outcome, now_unix()).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postern_core::Action;

    use crate::sessions::Party;

    fn party(user: &str) -> Party {
        Party {
            user: user.into(),
            source: None,
            target: "web-01".into(),
            agent_id: "ag-1".into(),
            action: Action::Exec,
            destination: None,
            logged: true,
            via_admin: false,
            reservation: None,
            cert: None,
            max_session: None,
        }
    }

    /// Two gateways on one store: rows appear, renew and go with the sessions; a request
    /// from B is carried out by A once, with who asked and where in the event.
    #[tokio::test]
    async fn rows_follow_the_live_table_and_requests_are_carried_out_once() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::sqlite::SqliteStore::open(&dir.path().join("postern.db")).await.unwrap());
        let (table_a, table_b) = (Arc::new(SessionTable::default()), Arc::new(SessionTable::default()));
        let a = ClusterSessions::new("gw-a".into(), store.clone(), table_a.clone());
        let b = ClusterSessions::new("gw-b".into(), store.clone(), table_b.clone());
        let (mut published, mut renewed) = (HashSet::new(), None);

        let s1 = table_a.register("s1", party("alice"));
        let s2 = table_a.register("s2", party("bob"));
        a.publish(&mut published, &mut renewed).await.unwrap();
        let ids = |rows: Vec<SessionRow>| rows.into_iter().map(|r| (r.id, r.gateway.unwrap())).collect::<Vec<_>>();
        let mut at_b = ids(b.rows().await.unwrap());
        at_b.sort();
        assert_eq!(at_b, [("s1".to_owned(), "gw-a".to_owned()), ("s2".to_owned(), "gw-a".to_owned())]);

        // An ended session's row goes with the next look; the other stays.
        drop(s2);
        a.publish(&mut published, &mut renewed).await.unwrap();
        assert_eq!(ids(b.rows().await.unwrap()), [("s1".to_owned(), "gw-a".to_owned())]);
        assert_eq!(published.len(), 1);

        // B asks, A acts (as its task would within a second), B hears back.
        let (asked, ()) = tokio::join!(b.terminate_elsewhere("s1", "local-admin(uid=0)"), async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            a.act_on_requests().await.unwrap();
        });
        assert_eq!(asked.unwrap(), "gw-a");
        assert!(s1.session.is_ending());
        assert_eq!(s1.session.reason().unwrap(), "terminated by local-admin(uid=0) (at gateway gw-b)");
        let Some(Event::SessionTerminated(ev)) = s1.session.take_terminated_event() else { panic!("no event") };
        assert_eq!((ev.actor.as_str(), ev.from_gateway.as_deref()), ("local-admin(uid=0)", Some("gw-b")));
        // Acting again finds nothing to do.
        a.act_on_requests().await.unwrap();

        // Unknown ids, and sessions of the asking gateway itself, are not asked for.
        assert!(matches!(b.terminate_elsewhere("nope", "x").await, Err(RemoteTerminateError::NotLive(_))));
        let s3 = table_b.register("s3", party("carol"));
        let mut b_published = HashSet::new();
        b.publish(&mut b_published, &mut None).await.unwrap();
        assert!(matches!(b.terminate_elsewhere("s3", "x").await, Err(RemoteTerminateError::NotLive(_))));

        // B crashes and starts again (a new table, nothing live): its first look deletes the
        // row it left, without waiting for the lease.
        std::mem::forget(s3);
        let b = ClusterSessions::new("gw-b".into(), store.clone(), Arc::new(SessionTable::default()));
        let mut left = b.rows_left_before().await;
        assert_eq!(left, HashSet::from(["s3".to_owned()]));
        b.publish(&mut left, &mut None).await.unwrap();
        assert!(a.rows().await.unwrap().iter().all(|r| r.id != "s3"));
        assert!(left.is_empty());
    }
}
