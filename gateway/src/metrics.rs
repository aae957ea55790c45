//! The gateway's Prometheus metrics (`[metrics] listen`, docs/operations.md "Metrics"): one
//! process-wide set of typed handles ([`METRICS`]) that the modules where things happen
//! bump (audit, sessions, broker, recording, store callers), and [`Metrics::render`], the
//! text exposition format the metrics listener serves.
//!
//! Hand-written rather than the `prometheus-client` crate: every label set here is small,
//! fixed and known at compile time (door, kind, direction, transport, store operation), so a
//! metric is an array of atomics indexed by enums, bumped without a lock, a map lookup or an
//! allocation (the relays count every chunk), and the text format is a few dozen lines.
//! `prometheus-client` would add a dependency (and its derive macros) to a 2-core build for
//! label maps we do not need. No label value ever comes from outside this file's enums, so
//! no user, instance or session name can become a label.
//!
//! Gauges that mirror state someone else already keeps (agents online, sessions active) are
//! not kept here: the listener reads them from their owners at scrape time and passes them
//! to [`Metrics::render`] as [`Snapshot`], so they cannot drift.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use postern_core::Action;

/// The process-wide metrics.
pub static METRICS: Metrics = Metrics::new();

/// Which front door a session or an authentication came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    Ssh,
    Rdp,
    Web,
    /// The admin socket (`postern exec/shell` on the gateway host).
    Admin,
}

impl Door {
    const ALL: [Door; 4] = [Door::Ssh, Door::Rdp, Door::Web, Door::Admin];
    pub fn name(self) -> &'static str {
        match self {
            Door::Ssh => "ssh",
            Door::Rdp => "rdp",
            Door::Web => "web",
            Door::Admin => "admin",
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

const DOORS: usize = Door::ALL.len();
const KINDS: usize = postern_core::action::SESSION_ACTIONS.len();

fn kind_index(a: Action) -> usize {
    match a {
        Action::Shell => 0,
        Action::Exec => 1,
        Action::Sftp => 2,
        Action::PortForward => 3,
        Action::SshPassthrough => 4,
        Action::Rdp => 5,
    }
}

/// Bytes relayed: `In` from the user towards the instance, `Out` from the instance to the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    In,
    Out,
}

/// The store operations whose latency is measured (the ones on a session's path and the
/// periodic ones; not every store call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    /// Recording a session's start or end in the history.
    SessionHistory,
    /// The enforcer's poll for changed users, policies and grants.
    AccessPoll,
    /// Reading users, policies and grants after a change.
    AccessReload,
    /// An agent's arrival or departure.
    AgentSeen,
    /// The readiness probe (`/readyz`).
    Readiness,
}

impl StoreOp {
    const ALL: [StoreOp; 5] =
        [StoreOp::SessionHistory, StoreOp::AccessPoll, StoreOp::AccessReload, StoreOp::AgentSeen, StoreOp::Readiness];
    fn name(self) -> &'static str {
        match self {
            StoreOp::SessionHistory => "session_history",
            StoreOp::AccessPoll => "access_poll",
            StoreOp::AccessReload => "access_reload",
            StoreOp::AgentSeen => "agent_seen",
            StoreOp::Readiness => "readiness",
        }
    }
}

const STORE_OPS: usize = StoreOp::ALL.len();

/// Run the store operation `f`, recording how long it took under `op`.
pub async fn timed_store<T>(op: StoreOp, f: impl std::future::Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let out = f.await;
    METRICS.store_op(op, started.elapsed());
    out
}

/// A monotonic counter.
#[derive(Debug)]
pub struct Counter(AtomicU64);

impl Counter {
    const fn new() -> Self {
        Self(AtomicU64::new(0))
    }
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (seconds) of the latency histograms' buckets: from half a millisecond (a
/// local file append) to ten seconds (a stalled database).
const LATENCY_BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Upper bounds (seconds) of the tunnel round-trip histogram: loopback to a bad satellite link.
const RTT_BUCKETS: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0];
const BUCKETS: usize = 14;

/// A histogram of durations with fixed buckets (non-cumulative counts; the sum in nanoseconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64; BUCKETS],
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    const fn new(bounds: &'static [f64; BUCKETS]) -> Self {
        Self {
            bounds,
            buckets: [const { AtomicU64::new(0) }; BUCKETS],
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(b) = self.bounds.iter().zip(&self.buckets).find(|(le, _)| secs <= **le).map(|(_, b)| b) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_nanos.fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Every metric the gateway keeps itself.
#[derive(Debug)]
pub struct Metrics {
    sessions_started: [[Counter; KINDS]; DOORS],
    sessions_denied: [Counter; DOORS],
    sessions_terminated: [[Counter; KINDS]; DOORS],
    auth_failures: [Counter; DOORS],
    /// `[door][0]` in, `[door][1]` out.
    bytes_relayed: [[Counter; 2]; DOORS],
    audit_write: Histogram,
    audit_write_failures: Counter,
    recording_bytes: Counter,
    store_op: [Histogram; STORE_OPS],
    tunnel_rtt: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub const fn new() -> Self {
        Self {
            sessions_started: [const { [const { Counter::new() }; KINDS] }; DOORS],
            sessions_denied: [const { Counter::new() }; DOORS],
            sessions_terminated: [const { [const { Counter::new() }; KINDS] }; DOORS],
            auth_failures: [const { Counter::new() }; DOORS],
            bytes_relayed: [const { [const { Counter::new() }; 2] }; DOORS],
            audit_write: Histogram::new(&LATENCY_BUCKETS),
            audit_write_failures: Counter::new(),
            recording_bytes: Counter::new(),
            store_op: [const { Histogram::new(&LATENCY_BUCKETS) }; STORE_OPS],
            tunnel_rtt: Histogram::new(&RTT_BUCKETS),
        }
    }

    pub fn session_started(&self, door: Door, kind: Action) {
        cell(&self.sessions_started, door.index(), kind_index(kind)).inc();
    }
    pub fn session_denied(&self, door: Door) {
        self.sessions_denied(door, 1);
    }
    pub fn sessions_denied(&self, door: Door, n: u64) {
        cell1(&self.sessions_denied, door.index()).add(n);
    }
    pub fn session_terminated(&self, door: Door, kind: Action) {
        cell(&self.sessions_terminated, door.index(), kind_index(kind)).inc();
    }
    pub fn auth_failed(&self, door: Door) {
        cell1(&self.auth_failures, door.index()).inc();
    }
    /// The counter for bytes through `door` in `direction`: a relay looks it up once and
    /// adds to it per chunk.
    pub fn bytes_relayed(&self, door: Door, direction: Direction) -> &Counter {
        cell(&self.bytes_relayed, door.index(), direction as usize)
    }
    /// One audit event written (or not: `ok` false) in `took`.
    pub fn audit_written(&self, took: Duration, ok: bool) {
        self.audit_write.observe(took);
        if !ok {
            self.audit_write_failures.inc();
        }
    }
    pub fn recording_written(&self, bytes: usize) {
        self.recording_bytes.add(bytes as u64);
    }
    pub fn store_op(&self, op: StoreOp, took: Duration) {
        if let Some(h) = self.store_op.get(op as usize) {
            h.observe(took);
        }
    }
    pub fn tunnel_rtt(&self, rtt: Duration) {
        self.tunnel_rtt.observe(rtt);
    }

    /// The text exposition format (version 0.0.4) of every metric, with `now`'s gauges.
    pub fn render(&self, now: &Snapshot) -> String {
        let mut out = String::with_capacity(16 << 10);
        let w = &mut out;
        family(w, "postern_build_info", "gauge", "The gateway's version; always 1.");
        let _ = writeln!(w, "postern_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));

        family(w, "postern_agents_online", "gauge", "Agents connected to this gateway, by tunnel transport.");
        for (transport, n) in [("quic", now.agents_quic), ("tcp", now.agents_tcp)] {
            let _ = writeln!(w, "postern_agents_online{{transport=\"{transport}\"}} {n}");
        }
        family(w, "postern_sessions_active", "gauge", "Sessions live on this gateway, by door and kind.");
        for door in Door::ALL {
            for kind in postern_core::action::SESSION_ACTIONS {
                let n = now.sessions_active.get(door.index()).and_then(|k| k.get(kind_index(*kind))).copied();
                let _ = writeln!(
                    w,
                    "postern_sessions_active{{door=\"{}\",kind=\"{}\"}} {}",
                    door.name(),
                    kind.name(),
                    n.unwrap_or(0)
                );
            }
        }
        by_door_kind(
            w,
            "postern_sessions_started_total",
            "Sessions started, by door and kind.",
            &self.sessions_started,
        );
        family(w, "postern_sessions_denied_total", "counter", "Sessions refused by policy or limits, by door.");
        for door in Door::ALL {
            let _ = writeln!(
                w,
                "postern_sessions_denied_total{{door=\"{}\"}} {}",
                door.name(),
                cell1(&self.sessions_denied, door.index()).get()
            );
        }
        by_door_kind(
            w,
            "postern_sessions_terminated_total",
            "Sessions ended by an administrator or the enforcer, by door and kind.",
            &self.sessions_terminated,
        );
        family(w, "postern_auth_failures_total", "counter", "Failed authentications, by door.");
        for door in Door::ALL {
            let _ = writeln!(
                w,
                "postern_auth_failures_total{{door=\"{}\"}} {}",
                door.name(),
                cell1(&self.auth_failures, door.index()).get()
            );
        }
        family(
            w,
            "postern_relayed_bytes_total",
            "counter",
            "Session bytes relayed, by door and direction (in: user to instance; out: instance to user).",
        );
        for door in Door::ALL {
            for (d, name) in [(Direction::In, "in"), (Direction::Out, "out")] {
                let _ = writeln!(
                    w,
                    "postern_relayed_bytes_total{{door=\"{}\",direction=\"{name}\"}} {}",
                    door.name(),
                    self.bytes_relayed(door, d).get()
                );
            }
        }
        family(w, "postern_audit_write_duration_seconds", "histogram", "Time to append one audit event.");
        histogram(w, "postern_audit_write_duration_seconds", "", &self.audit_write);
        family(w, "postern_audit_write_failures_total", "counter", "Audit events that could not be written.");
        let _ = writeln!(w, "postern_audit_write_failures_total {}", self.audit_write_failures.get());
        family(w, "postern_recording_written_bytes_total", "counter", "Session recording bytes written.");
        let _ = writeln!(w, "postern_recording_written_bytes_total {}", self.recording_bytes.get());
        family(w, "postern_store_operation_duration_seconds", "histogram", "Store operation latency, by operation.");
        for op in StoreOp::ALL {
            if let Some(h) = self.store_op.get(op as usize) {
                histogram(w, "postern_store_operation_duration_seconds", &format!("op=\"{}\"", op.name()), h);
            }
        }
        family(
            w,
            "postern_tunnel_rtt_seconds",
            "histogram",
            "Round-trip time of agents' QUIC connections, sampled every 15 s per agent.",
        );
        histogram(w, "postern_tunnel_rtt_seconds", "", &self.tunnel_rtt);
        out
    }
}

/// Gauges read from their owners when scraped.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub agents_quic: u64,
    pub agents_tcp: u64,
    /// `[door][kind]`; add with [`Snapshot::add_session`].
    sessions_active: [[u64; KINDS]; DOORS],
}

impl Snapshot {
    pub fn add_session(&mut self, door: Door, kind: Action) {
        if let Some(n) = self.sessions_active.get_mut(door.index()).and_then(|k| k.get_mut(kind_index(kind))) {
            *n += 1;
        }
    }
}

/// Where an index out of range would count (none is: every index comes from an enum whose
/// values are the array's positions; this keeps the code free of panicking indexing).
static NOWHERE: Counter = Counter::new();

fn cell1(row: &[Counter], i: usize) -> &Counter {
    row.get(i).unwrap_or(&NOWHERE)
}

fn cell<const N: usize>(table: &[[Counter; N]], i: usize, j: usize) -> &Counter {
    table.get(i).and_then(|r| r.get(j)).unwrap_or(&NOWHERE)
}

fn family(w: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(w, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn by_door_kind(w: &mut String, name: &str, help: &str, counters: &[[Counter; KINDS]; DOORS]) {
    family(w, name, "counter", help);
    for door in Door::ALL {
        for kind in postern_core::action::SESSION_ACTIONS {
            let n = cell(counters, door.index(), kind_index(*kind)).get();
            let _ = writeln!(w, "{name}{{door=\"{}\",kind=\"{}\"}} {n}", door.name(), kind.name());
        }
    }
}

/// One histogram's series; `labels` are its other labels (`op="x"`) or empty.
fn histogram(w: &mut String, name: &str, labels: &str, h: &Histogram) {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0u64;
    for (le, b) in h.bounds.iter().zip(&h.buckets) {
        cumulative += b.load(Ordering::Relaxed);
        let _ = writeln!(w, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}");
    }
    // Read after the buckets: a concurrent observation never makes +Inf smaller than a bucket.
    let count = h.count.load(Ordering::Relaxed).max(cumulative);
    let _ = writeln!(w, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
    let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
    let sum = h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
    let _ = writeln!(w, "{name}_sum{braces} {sum}");
    let _ = writeln!(w, "{name}_count{braces} {count}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_count_includes_overflow() {
        let m = Metrics::new();
        m.audit_written(Duration::from_micros(300), true);
        m.audit_written(Duration::from_millis(3), false);
        m.audit_written(Duration::from_secs(60), true);
        let text = m.render(&Snapshot::default());
        assert!(text.contains("postern_audit_write_duration_seconds_bucket{le=\"0.0005\"} 1\n"), "{text}");
        assert!(text.contains("postern_audit_write_duration_seconds_bucket{le=\"0.005\"} 2\n"), "{text}");
        assert!(text.contains("postern_audit_write_duration_seconds_bucket{le=\"10\"} 2\n"), "{text}");
        assert!(text.contains("postern_audit_write_duration_seconds_bucket{le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("postern_audit_write_duration_seconds_count 3\n"), "{text}");
        assert!(text.contains("postern_audit_write_failures_total 1\n"), "{text}");
    }

    #[test]
    fn labelled_series_and_snapshot_gauges() {
        let m = Metrics::new();
        m.session_started(Door::Ssh, Action::Exec);
        m.bytes_relayed(Door::Rdp, Direction::Out).add(42);
        m.store_op(StoreOp::AccessPoll, Duration::from_millis(2));
        let mut now = Snapshot { agents_quic: 2, ..Snapshot::default() };
        now.add_session(Door::Web, Action::Shell);
        let text = m.render(&now);
        for line in [
            "postern_sessions_started_total{door=\"ssh\",kind=\"exec\"} 1\n",
            "postern_relayed_bytes_total{door=\"rdp\",direction=\"out\"} 42\n",
            "postern_store_operation_duration_seconds_count{op=\"access_poll\"} 1\n",
            "postern_store_operation_duration_seconds_bucket{op=\"access_poll\",le=\"0.0025\"} 1\n",
            "postern_agents_online{transport=\"quic\"} 2\n",
            "postern_agents_online{transport=\"tcp\"} 0\n",
            "postern_sessions_active{door=\"web\",kind=\"shell\"} 1\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
