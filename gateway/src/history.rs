//! The session history: every session of every door (shell, exec, sftp, forwards,
//! passthrough, RDP, the admin socket) as a row in the store, written when it starts and
//! completed when it ends, for `postern sessions --all` and `postern replay`.
//!
//! Sessions never wait for the database: the broker hands each write to a queue (at most
//! [`QUEUE`] pending) and one task applies them in order. A write that fails, or that finds
//! the queue full, is dropped: the session goes on, the failure is logged, and the first
//! failure of an episode is a `gateway.history_failed` audit event. The audit log remains
//! the record; the history is an index of it that may then miss a session.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::audit::ship::Kind;
use tracing::info;

use crate::audit::AuditLog;
use crate::audit::events::{Event, GatewayHistoryFailed, LiveMarker, RdpMode, SessionEnd, SessionStart, SshSessionEnd};
use crate::metrics::{StoreOp, timed_store};
use crate::store::{SessionEnding, SessionQuery, SessionRecord, Store};

/// Writes waiting for the database; more are dropped (and reported).
pub const QUEUE: usize = 1024;

/// How often retention runs (and once at start).
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// The end reason of sessions a crash cut short.
pub const CRASH: &str = "gateway-crash";

/// `[audit] history_retention` and `history_max_rows`: what the history keeps.
#[derive(Debug, Clone, Copy, Default)]
pub struct HistoryRetention {
    pub max_age: Option<Duration>,
    pub max_rows: Option<u64>,
}

enum Write {
    Start(Box<SessionRecord>),
    End(SessionEnding),
    /// A session a crash cut short: ended now; inserted from its marker when its start row
    /// never reached the database.
    Crashed(SessionEnding, Option<Box<SessionRecord>>),
    /// Answered once every write queued before it is applied.
    Flush(oneshot::Sender<()>),
}

impl Write {
    fn describe(&self) -> (&str, &'static str) {
        match self {
            Write::Start(r) => (&r.id, "start"),
            Write::End(e) => (&e.id, "end"),
            Write::Crashed(e, _) => (&e.id, "crash"),
            Write::Flush(_) => ("", "flush"),
        }
    }
}

/// The history's writer side, shared by the broker and start-up.
#[derive(Debug)]
pub struct SessionHistory {
    queue: mpsc::Sender<Write>,
    failures: Arc<Failures>,
    /// `[cluster] gateway_id`, written into every row (None: a single gateway).
    gateway: Option<String>,
}

/// Episode state for `gateway.history_failed`: reported at the first failure after a
/// success (or after start), not at every one.
#[derive(Debug)]
struct Failures {
    failing: AtomicBool,
    audit: Arc<AuditLog>,
}

impl Failures {
    fn failed(&self, session_id: &str, write: &str, error: &str) {
        postern_tunnel::warn_limited!(%session_id, write, error, "cannot write the session history; the audit log keeps the session");
        if !self.failing.swap(true, Ordering::AcqRel) {
            let _ = self.audit.event(&Event::GatewayHistoryFailed(GatewayHistoryFailed {
                session_id: session_id.to_owned(),
                write: write.to_owned(),
                error: postern_core::util::clean_text(error, 500),
            }));
        }
    }

    fn succeeded(&self) {
        if self.failing.swap(false, Ordering::AcqRel) {
            info!("session history writes succeed again");
        }
    }
}

impl SessionHistory {
    /// Start the writer task on `store`; it runs until the last handle is dropped, pruning
    /// to `keep` at start and hourly.
    pub fn start(store: Arc<dyn Store>, audit: Arc<AuditLog>, keep: HistoryRetention) -> Arc<Self> {
        Self::start_as(store, audit, keep, None)
    }

    /// [`SessionHistory::start`] for gateway `gateway` of a cluster: its rows say so, and
    /// `postern replay` then looks for their recordings in that gateway's place in the
    /// object store.
    pub fn start_as(
        store: Arc<dyn Store>,
        audit: Arc<AuditLog>,
        keep: HistoryRetention,
        gateway: Option<String>,
    ) -> Arc<Self> {
        let (queue, rx) = mpsc::channel(QUEUE);
        let failures = Arc::new(Failures { failing: AtomicBool::new(false), audit });
        tokio::spawn(write_loop(store, rx, failures.clone(), keep));
        Arc::new(SessionHistory { queue, failures, gateway })
    }

    fn send(&self, write: Write) {
        if let Err(e) = self.queue.try_send(write) {
            let (reason, write) = match e {
                mpsc::error::TrySendError::Full(w) => (format!("{QUEUE} writes already waiting for the database"), w),
                mpsc::error::TrySendError::Closed(w) => ("the history writer has stopped".to_owned(), w),
            };
            let (id, what) = write.describe();
            self.failures.failed(id, what, &reason);
        }
    }

    /// Record a session that has started: `record` as the broker knows it from the live
    /// table's party, completed from the door's start event (command, recording, door).
    pub fn started(&self, mut record: SessionRecord, start: &Event) {
        fill_from_start(&mut record, start);
        record.gateway.clone_from(&self.gateway);
        self.send(Write::Start(Box::new(record)));
    }

    /// Record how a session ended, from its end event; `ended_at` in Unix seconds, and the
    /// live table's byte counts for events that do not carry them.
    pub fn ended(&self, id: &str, ended_at: i64, end: &Event, counted: (u64, u64)) {
        self.send(Write::End(ending_of(id, ended_at, end, counted)));
    }

    /// A session that was live when the gateway crashed: ended now with reason
    /// `gateway-crash` (its row is inserted from `marker` if its start never got written).
    pub fn crashed(&self, id: &str, marker: &LiveMarker, now: i64) {
        let ending = SessionEnding {
            id: id.to_owned(),
            ended_at: now,
            end_reason: Some(CRASH.to_owned()),
            exit_code: None,
            bytes_in: 0,
            bytes_out: 0,
            logged: marker.logged,
            unlogged_reason: None,
        };
        let record = match (&marker.user, &marker.target, &marker.kind) {
            (Some(user), Some(instance), Some(kind)) => Some(Box::new(SessionRecord {
                id: id.to_owned(),
                user: user.clone(),
                source: None,
                instance: instance.clone(),
                agent_id: marker.agent_id.clone().unwrap_or_default(),
                kind: kind.clone(),
                door: "unknown".into(),
                command: None,
                destination: None,
                started_ms: marker.started_at.unwrap_or(now).saturating_mul(1000),
                ended_at: Some(now),
                end_reason: Some(CRASH.to_owned()),
                exit_code: None,
                bytes_in: 0,
                bytes_out: 0,
                logged: marker.logged.unwrap_or(false),
                unlogged_reason: None,
                recording: None,
                gateway: self.gateway.clone(),
            })),
            _ => None,
        };
        self.send(Write::Crashed(ending, record));
    }

    /// Wait (at most `within`) until every write queued so far is applied: a listing
    /// then shows every session that ended before it was asked for. False on timeout.
    pub async fn flush(&self, within: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.queue.send_timeout(Write::Flush(tx), within).await.is_err() {
            return false;
        }
        matches!(tokio::time::timeout(within, rx).await, Ok(Ok(())))
    }
}

async fn write_loop(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<Write>,
    failures: Arc<Failures>,
    keep: HistoryRetention,
) {
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let write = tokio::select! {
            w = rx.recv() => match w { Some(w) => w, None => return },
            _ = prune.tick() => {
                prune_history(store.as_ref(), keep).await;
                continue;
            }
        };
        let (id, what) = write.describe();
        let (id, what) = (id.to_owned(), what);
        let result = match write {
            Write::Flush(done) => {
                let _ = done.send(());
                continue;
            }
            Write::Start(record) => timed_store(StoreOp::SessionHistory, store.insert_session(&record)).await,
            Write::End(ending) => timed_store(StoreOp::SessionHistory, store.end_session(&ending)).await.map(|_| ()),
            Write::Crashed(ending, record) => {
                timed_store(StoreOp::SessionHistory, async {
                    match store.end_session(&ending).await {
                        Ok(false) => match record {
                            Some(r) => store.insert_session(&r).await,
                            None => Ok(()),
                        },
                        other => other.map(|_| ()),
                    }
                })
                .await
            }
        };
        match result {
            Ok(()) => failures.succeeded(),
            Err(e) => failures.failed(&id, what, &e.to_string()),
        }
    }
}

async fn prune_history(store: &dyn Store, keep: HistoryRetention) {
    if keep.max_age.is_none() && keep.max_rows.is_none() {
        return;
    }
    let cutoff = keep
        .max_age
        .map(|age| postern_core::util::now_unix().saturating_sub(i64::try_from(age.as_secs()).unwrap_or(i64::MAX)));
    match store.prune_sessions(cutoff, keep.max_rows).await {
        Ok(0) => {}
        Ok(n) => info!(deleted = n, "session history retention"),
        Err(e) => postern_tunnel::warn_limited!(error = %e, "session history retention failed"),
    }
}

/// The door a start event came through, and what it says about the session.
fn fill_from_start(record: &mut SessionRecord, start: &Event) {
    match start {
        Event::SessionStart(SessionStart::Ssh(s)) => {
            record.door = s.door.clone().unwrap_or_else(|| "ssh".into());
            record.command = s.command.clone();
            record.unlogged_reason = s.reason.clone();
            record.recording = s.recording.clone();
        }
        Event::SessionStart(SessionStart::AdminSocket(s)) => {
            record.door = "admin-socket".into();
            record.command = s.command.clone();
            record.unlogged_reason = Some(s.reason.clone());
        }
        Event::ForwardOpen(f) | Event::PassthroughOpen(f) => {
            record.door = "ssh".into();
            record.unlogged_reason = Some(f.reason.clone());
        }
        Event::RdpOpen(r) => {
            record.door = match r.mode {
                RdpMode::Gateway => "rdp",
                RdpMode::Local => "ssh",
            }
            .into();
            record.unlogged_reason = Some(r.reason.clone());
        }
        _ => {}
    }
}

/// How a session ended, from its end event.
fn ending_of(id: &str, ended_at: i64, end: &Event, counted: (u64, u64)) -> SessionEnding {
    let mut e = SessionEnding {
        id: id.to_owned(),
        ended_at,
        end_reason: None,
        exit_code: None,
        bytes_in: counted.0,
        bytes_out: counted.1,
        logged: Some(false),
        unlogged_reason: None,
    };
    match end {
        Event::SessionEnd(SessionEnd::Ssh(SshSessionEnd {
            exit_code,
            bytes_in,
            bytes_out,
            end_reason,
            terminated_because,
            logged,
            reason,
            ..
        })) => {
            e.exit_code = *exit_code;
            (e.bytes_in, e.bytes_out) = (*bytes_in, *bytes_out);
            e.end_reason = terminated_because.clone().or(end_reason.clone());
            e.logged = Some(*logged);
            e.unlogged_reason = reason.clone();
        }
        Event::SessionEnd(SessionEnd::AdminSocket(a)) => {
            e.exit_code = a.exit_code;
            (e.bytes_in, e.bytes_out) = (a.bytes_in, a.bytes_out);
            e.end_reason = a.end_reason.clone();
        }
        Event::ForwardClose(f) | Event::PassthroughClose(f) => {
            (e.bytes_in, e.bytes_out) = (f.bytes_to_target, f.bytes_from_target);
            e.end_reason = f.end_reason.clone();
            e.unlogged_reason = Some(f.reason.clone());
        }
        Event::RdpClose(r) => {
            (e.bytes_in, e.bytes_out) = (r.bytes_to_target, r.bytes_from_target);
            e.end_reason = r.end_reason.clone();
            e.unlogged_reason = Some(r.reason.clone());
        }
        _ => {}
    }
    e
}

/// What `postern sessions` filters by (each that is set must match) and how it pages.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionFilter {
    pub user: Option<String>,
    /// Instance name or agent id.
    pub instance: Option<String>,
    /// A kind (shell, exec, sftp, port-forward, ssh-passthrough, rdp; `forward` and
    /// `passthrough` for short) or a door (ssh, rdp, web, admin-socket; `admin` for short).
    pub kind: Option<String>,
    /// Started at or after, before (Unix seconds).
    pub since: Option<i64>,
    pub until: Option<i64>,
    /// Continue after this session (the last one of the previous page).
    pub before: Option<String>,
    /// Rows per page (default [`DEFAULT_PAGE`], at most [`MAX_PAGE`]).
    pub limit: Option<u32>,
}

pub const DEFAULT_PAGE: u32 = 50;
pub const MAX_PAGE: u32 = 1000;

/// The kinds and doors `--kind` accepts, with their short forms.
const KINDS: &[(&str, &str)] = &[
    ("shell", "shell"),
    ("exec", "exec"),
    ("sftp", "sftp"),
    ("port-forward", "port-forward"),
    ("forward", "port-forward"),
    ("ssh-passthrough", "ssh-passthrough"),
    ("passthrough", "ssh-passthrough"),
    ("rdp", "rdp"),
    ("ssh", "ssh"),
    ("web", "web"),
    ("admin-socket", "admin-socket"),
    ("admin", "admin-socket"),
];

/// Why a listing was not made.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// A session as `postern sessions --all` shows it: its history row, and for a session
/// live on this gateway its current byte counts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryRow {
    pub id: String,
    pub user: String,
    pub source: Option<String>,
    pub target: String,
    pub agent_id: String,
    pub kind: String,
    pub door: String,
    pub command: Option<String>,
    pub destination: Option<String>,
    /// Live on this gateway now.
    pub active: bool,
    pub started_at: i64,
    pub ended_at: Option<i64>,
    pub duration_secs: i64,
    pub end_reason: Option<String>,
    pub exit_code: Option<i32>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub logged: bool,
    /// Why it is not recorded.
    pub reason: Option<String>,
    /// The recording's path in the gateway's data directory, as it was written.
    pub recording: Option<String>,
    /// Whether that file is still there (retention may have removed it after upload).
    #[serde(default)]
    pub recording_local: bool,
    /// Its copy in the object store (`s3://BUCKET/PREFIX/recordings/NAME`), once uploaded.
    #[serde(default)]
    pub recording_s3: Option<String>,
    /// The `[cluster] gateway_id` of the gateway that carried it (absent: a single gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

impl HistoryRow {
    pub fn of(r: SessionRecord, live: Option<(u64, u64)>, now: i64) -> Self {
        let (bytes_in, bytes_out) = live.unwrap_or((r.bytes_in, r.bytes_out));
        HistoryRow {
            duration_secs: (r.ended_at.unwrap_or(now) - r.started_ms.div_euclid(1000)).max(0),
            id: r.id,
            user: r.user,
            source: r.source,
            target: r.instance,
            agent_id: r.agent_id,
            kind: r.kind,
            door: r.door,
            command: r.command,
            destination: r.destination,
            active: live.is_some(),
            started_at: r.started_ms.div_euclid(1000),
            ended_at: r.ended_at,
            end_reason: r.end_reason,
            exit_code: r.exit_code,
            bytes_in,
            bytes_out,
            logged: r.logged,
            reason: r.unlogged_reason,
            recording: r.recording,
            recording_local: false,
            recording_s3: None,
            gateway: r.gateway,
        }
    }

    /// Where the recording is now: on this gateway's disk, in the object store, or both.
    pub fn locate_recording(&mut self, shipper: Option<&crate::audit::ship::Shipper>) {
        let Some(path) = self.recording.as_deref().map(std::path::Path::new) else { return };
        // Another gateway's recording is on its disk and in its folder of the bucket, which
        // this gateway's upload markers do not cover (`postern replay` fetches it from there).
        if shipper.is_some_and(|s| s.gateway_id() != self.gateway.as_deref()) {
            return;
        }
        self.recording_local = path.is_file();
        self.recording_s3 =
            shipper.filter(|s| s.is_uploaded(Kind::Recording, path)).map(|s| s.url(Kind::Recording, path));
    }
}

impl SessionFilter {
    /// The store query this filter means (the `before` session looked up in `store`).
    pub async fn query(&self, store: &dyn Store) -> Result<SessionQuery, HistoryError> {
        let kind = match &self.kind {
            None => None,
            Some(k) => {
                Some(KINDS.iter().find(|(name, _)| name == k).map(|(_, kind)| (*kind).to_owned()).ok_or_else(|| {
                    let names: Vec<&str> = KINDS.iter().map(|(n, _)| *n).collect();
                    HistoryError::Invalid(format!("unknown kind {k:?}; one of: {}", names.join(", ")))
                })?)
            }
        };
        let before = match &self.before {
            None => None,
            Some(id) => {
                let found = if valid_prefix(id) { store.sessions_by_prefix(id, 2).await? } else { Vec::new() };
                match found.as_slice() {
                    [one] => Some((one.started_ms, one.id.clone())),
                    [] => return Err(HistoryError::Invalid(format!("--before {id:?}: no such session"))),
                    _ => return Err(HistoryError::Invalid(format!("--before {id:?}: more than one session"))),
                }
            }
        };
        let limit = self.limit.unwrap_or(DEFAULT_PAGE);
        if limit == 0 || limit > MAX_PAGE {
            return Err(HistoryError::Invalid(format!("--limit must be between 1 and {MAX_PAGE}")));
        }
        Ok(SessionQuery {
            user: self.user.clone(),
            instance: self.instance.clone(),
            kind,
            since: self.since.map(|s| s.saturating_mul(1000)),
            until: self.until.map(|s| s.saturating_mul(1000)),
            before,
            limit,
        })
    }
}

/// Why a session has no recording (`None`: it has one).
pub fn unrecorded(r: &SessionRecord) -> Option<String> {
    if r.logged && r.recording.is_some() {
        return None;
    }
    Some(r.unlogged_reason.clone().unwrap_or_else(|| match r.kind.as_str() {
        "port-forward" | "ssh-passthrough" | "rdp" => format!("{} sessions are not recorded", r.kind),
        _ => "it was not recorded".to_owned(),
    }))
}

/// A session id or a prefix of one: hex digits (and '-'), so it has no SQL pattern
/// characters; at most the length of an id.
pub fn valid_prefix(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}
