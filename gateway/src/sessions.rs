//! Live sessions: what `postern sessions` lists, what `sessions terminate` and the policy
//! enforcer end. Each session registers here for as long as it runs and keeps its byte
//! counters current; ended sessions are in the session history ([`crate::history`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use postern_tunnel::CancellationToken;
use serde::Serialize;
use serde_json::{Map, Value};

use postern_core::Action;

use crate::audit::events::{CrashedSessionEnd, Event, LiveMarker, SessionEnd};
use crate::history::SessionHistory;
use crate::metrics::{Direction, Door, METRICS};

/// Who a session is for and what it reaches, as the live table shows it.
#[derive(Debug, Clone)]
pub struct Party {
    pub user: String,
    pub source: Option<IpAddr>,
    /// The instance's name.
    pub target: String,
    pub agent_id: String,
    pub action: Action,
    /// For forwards and passthrough: where the agent connects.
    pub destination: Option<(String, u16)>,
    /// Whether the session's content is recorded.
    pub logged: bool,
    /// Opened by an administrator on the admin socket (`postern exec/shell` on the gateway
    /// host): `user` is the local actor, and policy does not apply (revocation of the
    /// instance and `postern sessions terminate` do).
    pub via_admin: bool,
    /// The concurrent-session slot the authorization reserved; the live entry takes its
    /// place when the session registers.
    pub reservation: Option<Arc<Reservation>>,
    /// The gateway-issued certificate the user came in with (its serial goes in the
    /// session's events; `require_mfa` is re-checked with it).
    pub cert: Option<postern_core::identity::CertFacts>,
    /// The `max_session` limit the session started with (None: none). The enforcer ends the
    /// session when the limit in force now is shorter and already passed (a reload of the
    /// gateway config, a changed policy); a longer one does not extend it.
    pub max_session: Option<Duration>,
}

impl Party {
    /// Who this session is, as policy sees them.
    pub fn identity(&self) -> postern_core::Identity {
        postern_core::Identity { user: self.user.clone(), source: self.source, cert: self.cert }
    }
}

/// A slot counted against a user's `max_sessions` from the authorization until the session
/// registers (or the authorization is dropped without a session), so that concurrent
/// requests cannot all pass the check before any of them is on the live table.
#[derive(Debug)]
pub struct Reservation {
    table: Weak<SessionTable>,
    user: String,
    held: std::sync::atomic::AtomicBool,
}

impl Reservation {
    /// Give the slot back (`reserved` is the table's locked reservation counts).
    fn release(&self, reserved: &mut HashMap<String, usize>) {
        if self.held.swap(false, Ordering::AcqRel)
            && let Some(n) = reserved.get_mut(&self.user)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                reserved.remove(&self.user);
            }
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(table) = self.table.upgrade()
            && let Ok(mut reserved) = table.reserved.lock()
        {
            self.release(&mut reserved);
        }
    }
}

#[derive(Debug)]
pub struct LiveSession {
    pub id: String,
    /// Who it is for and what it reaches.
    pub party: Party,
    pub started_at: i64,
    /// When it registered, on the monotonic clock (its age, to the millisecond).
    pub started: std::time::Instant,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// The front door it came through (a metrics label).
    pub door: Door,
    /// This door's process-wide relayed-bytes counters (`postern_relayed_bytes_total`).
    relayed_in: &'static crate::metrics::Counter,
    relayed_out: &'static crate::metrics::Counter,
    cancel: CancellationToken,
    reason: Mutex<Option<String>>,
    /// The `session.terminated` event of whoever ended it, written when the session has
    /// actually ended (just before its end event), not when it was asked to.
    terminated_event: Mutex<Option<Event>>,
    /// Ended because the gateway is stopping ([`SessionTable::end_all_for_stop`]).
    stopping: std::sync::atomic::AtomicBool,
    /// Watchers of its output, and notices for its user.
    watch: WatchHub,
}

/// Output chunks a watcher may fall behind by before it misses some (it is told how many):
/// a slow watcher never slows the session.
const WATCH_BACKLOG: usize = 256;
/// Notices waiting for the session's relay to show them.
const MAX_NOTICES: usize = 8;

/// A live session's output for watchers (the web console's live watch) and lines for its
/// user from the gateway ("... is watching this session").
#[derive(Debug, Default)]
struct WatchHub {
    /// Made when the first watcher comes.
    out: std::sync::OnceLock<tokio::sync::broadcast::Sender<bytes::Bytes>>,
    notices: Mutex<std::collections::VecDeque<String>>,
    noticed: tokio::sync::Notify,
    /// Cancelled when the session leaves the live table.
    over: CancellationToken,
}

impl LiveSession {
    pub fn add_in(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
        self.relayed_in.add(n as u64);
    }
    pub fn add_out(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
        self.relayed_out.add(n as u64);
    }
    /// Resolves when the session must end; then [`reason`](Self::reason) says why.
    pub async fn terminated(&self) {
        self.cancel.cancelled().await
    }
    /// Whether the session has been asked to end.
    pub fn is_ending(&self) -> bool {
        self.cancel.is_cancelled()
    }
    /// End the session with `reason`; false when it was already ending.
    pub fn end(&self, reason: &str) -> bool {
        if self.cancel.is_cancelled() {
            return false;
        }
        if let Ok(mut r) = self.reason.lock() {
            *r = Some(reason.to_owned());
        }
        self.cancel.cancel();
        true
    }

    /// As [`end`](Self::end), with the `session.terminated` event to write once the session
    /// has ended ([`take_terminated_event`](Self::take_terminated_event)).
    pub fn end_with_event(&self, reason: &str, event: Event) -> bool {
        if self.cancel.is_cancelled() {
            return false;
        }
        if let Ok(mut e) = self.terminated_event.lock() {
            *e = Some(event);
        }
        self.end(reason)
    }

    /// The `session.terminated` event to write now that the session has ended, if it was
    /// ended by someone.
    pub fn take_terminated_event(&self) -> Option<Event> {
        self.terminated_event.lock().ok().and_then(|mut e| e.take())
    }

    /// As [`terminated`](Self::terminated), and the session also ends once `max` (its
    /// `max_session` limit) has passed: for relays (forwards, passthrough, RDP), which have
    /// no terminal to warn on.
    pub async fn terminated_or_after(&self, max: Option<Duration>) {
        let Some(max) = max else { return self.terminated().await };
        tokio::select! {
            _ = self.terminated() => {}
            _ = tokio::time::sleep(max) => {
                self.end(&format!("maximum session length ({}s) reached", max.as_secs()));
            }
        }
    }

    pub fn reason(&self) -> Option<String> {
        self.reason.lock().ok().and_then(|r| r.clone())
    }

    /// The end event's `end_reason` for a session asked to end: `gateway-stopped` when the
    /// gateway stopped it, else `terminated` (an administrator, the policy).
    pub fn ended_by(&self) -> &'static str {
        if self.stopping.load(Ordering::Relaxed) { "gateway-stopped" } else { "terminated" }
    }

    /// Output the session's user saw, for whoever watches (nothing is kept when nobody does).
    pub fn publish(&self, data: &[u8]) {
        if let Some(tx) = self.watch.out.get()
            && tx.receiver_count() > 0
        {
            let _ = tx.send(bytes::Bytes::copy_from_slice(data));
        }
    }

    /// Watch the session's output from now on.
    pub fn watch(&self) -> tokio::sync::broadcast::Receiver<bytes::Bytes> {
        self.watch.out.get_or_init(|| tokio::sync::broadcast::channel(WATCH_BACKLOG).0).subscribe()
    }

    /// Show `line` to the session's user (its relay writes it to their terminal); at most a
    /// few wait, the oldest give way.
    pub fn tell_user(&self, line: String) {
        if let Ok(mut q) = self.watch.notices.lock() {
            if q.len() == MAX_NOTICES {
                q.pop_front();
            }
            q.push_back(line);
        }
        self.watch.noticed.notify_one();
    }

    /// The lines waiting for the user, once there are some. Waits on the notification
    /// first (a line told before anyone waited left its permit), so the relay's loop takes
    /// no lock until there is something to show.
    pub async fn notices(&self) -> Vec<String> {
        loop {
            self.watch.noticed.notified().await;
            let waiting: Vec<String> = self.watch.notices.lock().map(|mut q| q.drain(..).collect()).unwrap_or_default();
            if !waiting.is_empty() {
                return waiting;
            }
        }
    }

    /// Resolves once the session has left the live table (it ended).
    pub async fn over(&self) {
        self.watch.over.cancelled().await
    }
}

/// Why sessions end at a graceful stop (the notice users see).
pub const GATEWAY_STOPPING: &str = "the gateway is shutting down";

#[derive(Debug, Clone, Serialize)]
pub struct SessionRow {
    pub id: String,
    pub user: String,
    pub source: Option<String>,
    pub target: String,
    pub kind: String,
    pub destination: Option<String>,
    pub logged: bool,
    pub active: bool,
    pub started_at: i64,
    pub duration_secs: i64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub end_reason: Option<String>,
    /// With `[cluster]`: the gateway carrying the session (absent for a single gateway).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

impl SessionRow {
    pub(crate) fn of(s: &LiveSession, now: i64, active: bool) -> Self {
        SessionRow {
            id: s.id.clone(),
            user: s.party.user.clone(),
            source: s.party.source.map(|ip| ip.to_string()),
            target: s.party.target.clone(),
            kind: s.party.action.name().to_owned(),
            destination: s.party.destination.as_ref().map(|(h, p)| format!("{h}:{p}")),
            logged: s.party.logged,
            active,
            started_at: s.started_at,
            duration_secs: (now - s.started_at).max(0),
            bytes_in: s.bytes_in.load(Ordering::Relaxed),
            bytes_out: s.bytes_out.load(Ordering::Relaxed),
            end_reason: s.reason(),
            gateway: None,
        }
    }
}

#[derive(Debug, Default)]
pub struct SessionTable {
    live: Mutex<HashMap<String, Arc<LiveSession>>>,
    /// Reserved slots per user (authorized, not yet live). Locked after `live`, never before.
    reserved: Mutex<HashMap<String, usize>>,
    /// One marker file per live session, so that sessions a crash cut short can be given an
    /// end event when the gateway starts again.
    markers: Option<std::path::PathBuf>,
}

/// Removes its session from the live table when dropped (however the session ends).
pub struct Registration {
    table: Arc<SessionTable>,
    pub session: Arc<LiveSession>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.session.watch.over.cancel();
        if let Some(dir) = &self.table.markers {
            let _ = std::fs::remove_file(dir.join(&self.session.id));
        }
        if let Ok(mut live) = self.table.live.lock() {
            live.remove(&self.session.id);
        }
    }
}

impl SessionTable {
    /// A table that keeps crash markers in `dir`.
    pub fn with_markers(dir: std::path::PathBuf) -> std::io::Result<Self> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(SessionTable { markers: Some(dir), ..Default::default() })
    }

    /// Sessions that were live when the gateway last stopped without ending them (a crash):
    /// write their end event with reason `gateway-crash`, mark them ended in the history
    /// and forget them.
    pub fn close_orphans(&self, audit: &crate::audit::AuditLog, history: &SessionHistory) {
        let Some(dir) = &self.markers else { return };
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        let now = postern_core::util::now_unix();
        for e in entries.flatten() {
            let marker = std::fs::read(e.path()).map(|b| read_marker(&b)).unwrap_or_default();
            let session_id = e.file_name().to_string_lossy().into_owned();
            history.crashed(&session_id, &marker, now);
            let end = Event::SessionEnd(SessionEnd::Crashed(CrashedSessionEnd {
                session_id,
                end_reason: crate::history::CRASH.to_owned(),
                marker,
            }));
            if audit.event(&end).is_ok() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Reserve a concurrent-session slot for `user`: refused (`None`) when their live
    /// sessions and reserved slots already reach `max`. Counting and reserving happen under
    /// the table's lock, so concurrent requests cannot overshoot the limit.
    pub fn reserve(self: &Arc<Self>, user: &str, max: Option<u32>) -> Option<Arc<Reservation>> {
        let live = self.live.lock().ok()?;
        let mut reserved = self.reserved.lock().ok()?;
        let in_use = live.values().filter(|s| s.party.user == user).count() + reserved.get(user).copied().unwrap_or(0);
        if max.is_some_and(|max| in_use >= max as usize) {
            return None;
        }
        *reserved.entry(user.to_owned()).or_default() += 1;
        Some(Arc::new(Reservation {
            table: Arc::downgrade(self),
            user: user.to_owned(),
            held: std::sync::atomic::AtomicBool::new(true),
        }))
    }

    /// Put session `id` on the live table until the returned registration is dropped. A
    /// reserved slot in `party` becomes the live entry (in one step, under the lock).
    pub fn register(self: &Arc<Self>, id: &str, party: Party) -> Registration {
        let door = match party.action {
            _ if party.via_admin => Door::Admin,
            Action::Rdp => Door::Rdp,
            _ => Door::Ssh,
        };
        self.register_through(id, party, door)
    }

    /// As [`register`](Self::register), naming the door the session came through.
    pub fn register_through(self: &Arc<Self>, id: &str, mut party: Party, door: Door) -> Registration {
        let reservation = party.reservation.take();
        let session = Arc::new(LiveSession {
            id: id.to_owned(),
            party,
            started_at: postern_core::util::now_unix(),
            started: std::time::Instant::now(),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            door,
            relayed_in: METRICS.bytes_relayed(door, Direction::In),
            relayed_out: METRICS.bytes_relayed(door, Direction::Out),
            cancel: CancellationToken::new(),
            reason: Mutex::new(None),
            terminated_event: Mutex::new(None),
            stopping: std::sync::atomic::AtomicBool::new(false),
            watch: WatchHub::default(),
        });
        if let Some(dir) = &self.markers {
            let p = &session.party;
            let marker = LiveMarker {
                user: Some(p.user.clone()),
                target: Some(p.target.clone()),
                agent_id: Some(p.agent_id.clone()),
                kind: Some(p.action.name().to_owned()),
                logged: Some(p.logged),
                started_at: Some(session.started_at),
            };
            // Only the id is used as a file name; ids are generated by the gateway (UUIDs).
            if id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && let Ok(text) = serde_json::to_string(&marker)
            {
                let _ = write_owner_only(&dir.join(id), text.as_bytes());
            }
        }
        if let Ok(mut live) = self.live.lock() {
            live.insert(id.to_owned(), session.clone());
            if let (Some(r), Ok(mut reserved)) = (&reservation, self.reserved.lock()) {
                r.release(&mut reserved);
            }
        }
        Registration { table: self.clone(), session }
    }

    pub fn live(&self) -> Vec<Arc<LiveSession>> {
        self.live.lock().map(|l| l.values().cloned().collect()).unwrap_or_default()
    }

    /// The live session `id`, if it is on this gateway's table.
    pub fn get(&self, id: &str) -> Option<Arc<LiveSession>> {
        self.live.lock().ok().and_then(|l| l.get(id).cloned())
    }

    /// Ids of the live sessions.
    pub fn live_ids(&self) -> std::collections::HashSet<String> {
        self.live.lock().map(|l| l.values().map(|s| s.id.clone()).collect()).unwrap_or_default()
    }

    /// Ask a live session to end with `reason`; false if it is not live (or already ending).
    pub fn terminate(&self, id: &str, reason: &str) -> bool {
        let Some(s) = self.live.lock().ok().and_then(|l| l.get(id).cloned()) else { return false };
        s.end(reason)
    }

    /// Ask every live session to end because the gateway is stopping; returns how many are
    /// still live (ending ones included). Called repeatedly while the gateway waits for
    /// them, so one that started meanwhile is ended too.
    pub fn end_all_for_stop(&self) -> usize {
        let live = self.live();
        for s in &live {
            if !s.is_ending() {
                s.stopping.store(true, Ordering::Relaxed);
                s.end(GATEWAY_STOPPING);
            }
        }
        live.len()
    }

    /// As [`terminate`](Self::terminate), with the `session.terminated` event `event` builds
    /// from the session: it is written when the session has actually ended, just before its
    /// end event ([`crate::broker::Running::finish`]).
    pub fn terminate_with_event(&self, id: &str, reason: &str, event: impl FnOnce(&LiveSession) -> Event) -> bool {
        let Some(s) = self.live.lock().ok().and_then(|l| l.get(id).cloned()) else { return false };
        let ev = event(&s);
        s.end_with_event(reason, ev)
    }

    /// Live sessions, newest first.
    pub fn rows(&self) -> Vec<SessionRow> {
        let now = postern_core::util::now_unix();
        let mut rows: Vec<SessionRow> = self.live().iter().map(|s| SessionRow::of(s, now, true)).collect();
        rows.sort_by(|a, b| b.started_at.cmp(&a.started_at).then(b.id.cmp(&a.id)));
        rows
    }
}

/// Markers name users and targets: readable by the gateway's user only, like the rest of
/// the data directory.
fn write_owner_only(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?.write_all(data)
}

/// A crash marker as written by [`SessionTable::register`]. It is read back after a crash,
/// when it may be damaged: a field that does not read as its type is left out (the others
/// are kept), and a file that is not a JSON object gives an empty marker.
fn read_marker(bytes: &[u8]) -> LiveMarker {
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(bytes) else { return LiveMarker::default() };
    let readable: Map<String, Value> = fields
        .into_iter()
        .filter(|(k, v)| {
            let one = Map::from_iter([(k.clone(), v.clone())]);
            serde_json::from_value::<LiveMarker>(Value::Object(one)).is_ok()
        })
        .collect();
    serde_json::from_value(Value::Object(readable)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn a_crash_marker_comes_back_as_the_end_event() {
        let dir = tempfile::tempdir().unwrap();
        let table = Arc::new(SessionTable::with_markers(dir.path().join("live")).unwrap());
        let party = Party {
            user: "alice".into(),
            source: None,
            target: "web-01".into(),
            agent_id: "ag-1".into(),
            action: Action::Shell,
            destination: None,
            logged: true,
            via_admin: false,
            reservation: None,
            cert: None,
            max_session: None,
        };
        let reg = table.register("sid-1", party);
        let started_at = reg.session.started_at;
        // A crash: the registration is never dropped, so the marker stays.
        std::mem::forget(reg);
        let audit = Arc::new(crate::audit::AuditLog::open(&dir.path().join("audit")).unwrap());
        let store: Arc<dyn crate::store::Store> =
            Arc::new(crate::store::sqlite::SqliteStore::open(&dir.path().join("postern.db")).await.unwrap());
        let history = SessionHistory::start(store.clone(), audit.clone(), Default::default());
        table.close_orphans(&audit, &history);
        // Its start row never reached the database: it is made from the marker, ended.
        assert!(history.flush(Duration::from_secs(5)).await);
        let row = store.sessions_by_prefix("sid-1", 2).await.unwrap().pop().unwrap();
        assert_eq!((row.user.as_str(), row.instance.as_str(), row.kind.as_str()), ("alice", "web-01", "shell"));
        assert_eq!((row.started_ms, row.end_reason.as_deref()), (started_at * 1000, Some("gateway-crash")));
        assert!(row.ended_at.is_some());
        let (_, segment) = crate::audit::segments(&dir.path().join("audit")).unwrap().pop().unwrap();
        let text = std::fs::read_to_string(segment).unwrap();
        let mut end: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        let end = end.as_object_mut().unwrap();
        assert_eq!(end.remove("event").unwrap(), "session.end");
        for k in ["v", "seq", "id", "time", "prev"] {
            end.remove(k);
        }
        assert_eq!(
            Value::Object(end.clone()),
            json!({"session_id": "sid-1", "end_reason": "gateway-crash", "user": "alice", "target": "web-01",
                   "agent_id": "ag-1", "kind": "shell", "logged": true, "started_at": started_at})
        );
        assert!(std::fs::read_dir(dir.path().join("live")).unwrap().next().is_none());
    }

    #[test]
    fn a_damaged_marker_keeps_what_can_be_read() {
        let m = read_marker(br#"{"user": "alice", "logged": "yes", "started_at": 5, "other": 1}"#);
        assert_eq!(m, LiveMarker { user: Some("alice".into()), started_at: Some(5), ..LiveMarker::default() });
        assert_eq!(read_marker(b"not json"), LiveMarker::default());
        assert_eq!(read_marker(b"[1]"), LiveMarker::default());
    }
}
