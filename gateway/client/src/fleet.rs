//! Fleet runs: one command on many instances, as `postern run` does it.
//!
//! The steps, each a call: [`select_instances`] (a label selector and/or names, checked
//! against what the user may reach), [`RunLimits::new`] (concurrency `N` or `N%`, error
//! budget, per-invocation timeout), [`begin`] (the gateway's `run.start` audit event and the
//! run id), [`run`] (the invocations, each on its own connection to `user%instance` with
//! `POSTERN_RUN_ID` set), [`end`] (`run.end` with the [`Summary`]).
//!
//! Nothing here prints or writes files: [`run`] reports each start and each finished
//! instance (with its captured output) as a [`FleetEvent`], and returns the outcomes and
//! the summary as data.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postern_core::command::{Instance, RunBegin, RunEnd, RunStarted};
use serde::Serialize;

use crate::connect::{Captured, Client, ClientOptions, OutputStream};
use crate::error::{ClientError, error_chain};

/// Default bound on the output kept per stream and instance (the byte counts stay exact).
pub const KEEP_OUTPUT: usize = 64 << 20;

/// Why a run could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    #[error("invalid percentage {value:?}")]
    InvalidPercentage {
        value: String,
        #[source]
        source: std::num::ParseFloatError,
    },
    #[error("percentage {value:?} must be between 0% and 100%")]
    PercentageOutOfRange { value: String },
    #[error("invalid number {value:?} (use a number or a percentage like 10%)")]
    InvalidNumber {
        value: String,
        #[source]
        source: std::num::ParseIntError,
    },
    /// A named instance is not among those the user may reach (`near`: one of those it is
    /// a near miss of).
    #[error("instance {instance:?}: access denied (or no such instance){}", near.as_ref().map(|n| format!("; did you mean {n}?")).unwrap_or_default())]
    Denied { instance: String, near: Option<String> },
    /// The selection is empty.
    #[error("no instance you may reach matches {selection}")]
    NoMatch { selection: String },
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// `10` or `10%` of `total` (a percentage is rounded up, and at most `total`).
pub fn amount(s: &str, total: usize) -> Result<usize, FleetError> {
    match s.strip_suffix('%') {
        Some(p) => {
            let p: f64 = p.parse().map_err(|source| FleetError::InvalidPercentage { value: s.to_owned(), source })?;
            if !(0.0..=100.0).contains(&p) {
                return Err(FleetError::PercentageOutOfRange { value: s.to_owned() });
            }
            let n = (total as f64 * p / 100.0).ceil() as usize;
            Ok(n.min(total))
        }
        None => s.parse().map_err(|source| FleetError::InvalidNumber { value: s.to_owned(), source }),
    }
}

/// How a run proceeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunLimits {
    /// At most this many invocations at once (at least 1).
    pub concurrency: usize,
    /// No new invocation starts once more than this many have not succeeded.
    pub max_errors: usize,
    /// Bound on one invocation (connecting included).
    pub timeout: Duration,
    /// Bytes kept of each output stream per instance.
    pub keep_output: usize,
}

impl RunLimits {
    /// Limits for `total` targets from `N` / `N%` strings (as `--max-concurrency` and
    /// `--max-errors` take them).
    pub fn new(total: usize, max_concurrency: &str, max_errors: &str, timeout: Duration) -> Result<Self, FleetError> {
        Ok(RunLimits {
            concurrency: amount(max_concurrency, total)?.max(1),
            max_errors: amount(max_errors, total)?,
            timeout,
            keep_output: KEEP_OUTPUT,
        })
    }
}

/// What happened on one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Ran, exit status 0.
    Success,
    /// Ran, non-zero exit status.
    Failed,
    /// Could not run (connection, refusal, killed by a signal).
    Error,
    /// No result within the per-invocation timeout.
    Timeout,
    /// The instance's agent is not connected.
    Offline,
    /// The user may not exec there.
    NotAllowed,
    /// Not started: the error budget ran out, or the run was cancelled first.
    NotStarted,
    /// Cancelled while running.
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Success => "success",
            Status::Failed => "failed",
            Status::Error => "error",
            Status::Timeout => "timeout",
            Status::Offline => "offline",
            Status::NotAllowed => "not-allowed",
            Status::NotStarted => "not-started",
            Status::Cancelled => "cancelled",
        }
    }

    /// Whether an invocation was started for it (it counted as running until it finished).
    pub fn was_started(self) -> bool {
        !matches!(self, Status::Offline | Status::NotAllowed | Status::NotStarted)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One instance's result, as `summary.json` and `--json` list it.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub instance: String,
    pub status: Status,
    pub exit_code: Option<u32>,
    pub duration_ms: u64,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub error: Option<String>,
}

impl Outcome {
    /// An outcome with no invocation behind it.
    fn without_run(instance: String, status: Status, why: String) -> Outcome {
        Outcome {
            instance,
            status,
            exit_code: None,
            duration_ms: 0,
            stdout_bytes: 0,
            stderr_bytes: 0,
            error: Some(why),
        }
    }
}

/// Counts per status over a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub total: usize,
    pub success: usize,
    pub failed: usize,
    pub error: usize,
    pub timeout: usize,
    pub offline: usize,
    pub not_allowed: usize,
    pub not_started: usize,
    pub cancelled: usize,
    /// The run was cancelled.
    pub interrupted: bool,
}

impl Summary {
    pub fn of(outcomes: &[Outcome], interrupted: bool) -> Summary {
        let count = |s: Status| outcomes.iter().filter(|o| o.status == s).count();
        Summary {
            total: outcomes.len(),
            success: count(Status::Success),
            failed: count(Status::Failed),
            error: count(Status::Error),
            timeout: count(Status::Timeout),
            offline: count(Status::Offline),
            not_allowed: count(Status::NotAllowed),
            not_started: count(Status::NotStarted),
            cancelled: count(Status::Cancelled),
            interrupted,
        }
    }
}

/// What [`run`] returns: outcomes sorted by instance name, and their summary.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub outcomes: Vec<Outcome>,
    pub summary: Summary,
}

/// What [`run`] reports as it goes.
#[derive(Debug)]
#[non_exhaustive]
pub enum FleetEvent<'a> {
    /// An invocation started on this instance.
    Started { instance: &'a str },
    /// Output of a running invocation, as it arrives (in order per instance and stream; all
    /// of an instance's output comes before its `Finished`).
    Output { instance: &'a str, stream: OutputStream, data: &'a [u8] },
    /// An instance is done (including those skipped or never started); `output` is what it
    /// printed, when it ran to an exit.
    Finished { outcome: &'a Outcome, output: Option<&'a Captured> },
}

/// A chunk of output on its way from an invocation to the [`run`] caller.
struct Chunk {
    instance: Arc<str>,
    stream: OutputStream,
    data: Vec<u8>,
}

/// Bound on chunks waiting to be reported: a caller slow to print slows the invocations
/// (SSH flow control), it does not make the client buffer without limit.
const CHUNKS_WAITING: usize = 64;

/// The instances to run on: those matching `selector` that the user may reach, narrowed to
/// `names` when given (each of which must be reachable).
pub async fn select_instances(
    client: &Client,
    selector: Option<&str>,
    names: &[String],
) -> Result<Vec<Instance>, FleetError> {
    let mut candidates = client.instances(selector).await?;
    if !names.is_empty() {
        if let Some(missing) = names.iter().find(|n| !candidates.iter().any(|i| &i.name == *n)) {
            // Only names this user may reach are suggested.
            let near = postern_core::util::near_miss(missing, candidates.iter().map(|i| i.name.as_str()));
            return Err(FleetError::Denied { instance: missing.clone(), near: near.map(str::to_owned) });
        }
        candidates.retain(|i| names.contains(&i.name));
    }
    if candidates.is_empty() {
        return Err(FleetError::NoMatch { selection: selector.unwrap_or("--instances").to_owned() });
    }
    Ok(candidates)
}

/// Tell the gateway a run starts (its `run.start` audit event); returns the run id.
pub async fn begin(
    client: &Client,
    targets: Option<&str>,
    command: &str,
    instances: &[Instance],
    limits: &RunLimits,
) -> Result<String, ClientError> {
    let body = RunBegin {
        targets: targets.map(str::to_owned),
        command: command.to_owned(),
        instances: instances.iter().map(|i| i.name.clone()).collect(),
        max_concurrency: Some(limits.concurrency),
        max_errors: Some(limits.max_errors),
    };
    let body = serde_json::to_string(&body).unwrap_or_default();
    let started: RunStarted = client.gateway_command_as(&format!("run-begin {body}")).await?;
    Ok(started.run_id)
}

/// Tell the gateway the run ended (its `run.end` audit event, with the summary).
pub async fn end(client: &Client, run_id: &str, summary: &Summary) -> Result<(), ClientError> {
    let body = RunEnd { run_id: run_id.to_owned(), summary: serde_json::to_value(summary).unwrap_or_default() };
    let body = serde_json::to_string(&body).unwrap_or_default();
    client.gateway_command(&format!("run-end {body}")).await.map(drop)
}

/// Run `command` on `instances` within `limits`, each invocation on its own connection
/// with `POSTERN_RUN_ID` set, until all are done or `cancel` completes (then nothing new
/// starts and running invocations are dropped: their connections close and the gateway
/// ends the remote processes).
pub async fn run(
    opts: &ClientOptions,
    run_id: &str,
    command: &str,
    instances: Vec<Instance>,
    limits: &RunLimits,
    events: impl FnMut(FleetEvent<'_>),
    cancel: impl Future<Output = ()>,
) -> RunReport {
    let (opts, command, run_id) = (Arc::new(opts.clone()), Arc::<str>::from(command), Arc::<str>::from(run_id));
    let (timeout, keep) = (limits.timeout, limits.keep_output);
    let invoke = move |name: String, chunks: tokio::sync::mpsc::Sender<Chunk>| {
        let (opts, command, run_id) = (opts.clone(), command.clone(), run_id.clone());
        async move { invoke(&opts, &name, &command, &run_id, timeout, keep, chunks).await }
    };
    schedule(instances, limits, invoke, events, cancel).await
}

/// One invocation's result and, when it ran to an exit, its output.
type Invocation = (Outcome, Option<Captured>);

/// The scheduler behind [`run`], with the invocation passed in (so tests can count).
async fn schedule<F, Fut>(
    instances: Vec<Instance>,
    limits: &RunLimits,
    invoke: F,
    mut events: impl FnMut(FleetEvent<'_>),
    cancel: impl Future<Output = ()>,
) -> RunReport
where
    F: Fn(String, tokio::sync::mpsc::Sender<Chunk>) -> Fut,
    Fut: Future<Output = Invocation> + Send + 'static,
{
    let mut outcomes = Vec::new();
    let mut queue = VecDeque::new();
    for i in instances {
        if !i.online {
            outcomes.push(Outcome::without_run(
                i.name,
                Status::Offline,
                "the instance's agent is not connected".into(),
            ));
        } else if !i.actions.iter().any(|a| a == "exec") {
            outcomes.push(Outcome::without_run(i.name, Status::NotAllowed, "exec is not allowed for you there".into()));
        } else {
            queue.push_back(i.name);
        }
    }
    for o in &outcomes {
        events(FleetEvent::Finished { outcome: o, output: None });
    }
    let mut running = tokio::task::JoinSet::new();
    let (chunks_tx, mut chunks) = tokio::sync::mpsc::channel::<Chunk>(CHUNKS_WAITING);
    let mut names = HashMap::new();
    let mut errors = 0usize;
    let mut interrupted = false;
    tokio::pin!(cancel);
    loop {
        while !interrupted && running.len() < limits.concurrency && errors <= limits.max_errors {
            let Some(name) = queue.pop_front() else { break };
            let task = running.spawn(invoke(name.clone(), chunks_tx.clone()));
            events(FleetEvent::Started { instance: &name });
            names.insert(task.id(), name);
        }
        let joined = tokio::select! {
            // Output first: an invocation's chunks are all queued before it finishes.
            biased;
            Some(c) = chunks.recv() => {
                events(FleetEvent::Output { instance: &c.instance, stream: c.stream, data: &c.data });
                continue;
            }
            j = running.join_next_with_id() => j,
            () = &mut cancel, if !interrupted => {
                interrupted = true;
                running.abort_all();
                continue;
            }
        };
        let (o, output) = match joined {
            None => break,
            Some(Ok((_, invocation))) => invocation,
            Some(Err(e)) => {
                let name = names.get(&e.id()).cloned().unwrap_or_default();
                let o = if e.is_cancelled() {
                    Outcome::without_run(name, Status::Cancelled, "interrupted (Ctrl-C) while running".into())
                } else {
                    Outcome::without_run(name, Status::Error, "the invocation failed inside the client".into())
                };
                (o, None)
            }
        };
        if o.status != Status::Success {
            errors += 1;
        }
        events(FleetEvent::Finished { outcome: &o, output: output.as_ref() });
        outcomes.push(o);
    }
    for name in queue {
        let why = if interrupted {
            "not started: interrupted (Ctrl-C)".to_owned()
        } else {
            format!("not started: more than {} error(s)", limits.max_errors)
        };
        let o = Outcome::without_run(name, Status::NotStarted, why);
        events(FleetEvent::Finished { outcome: &o, output: None });
        outcomes.push(o);
    }
    outcomes.sort_by(|a, b| a.instance.cmp(&b.instance));
    let summary = Summary::of(&outcomes, interrupted);
    RunReport { outcomes, summary }
}

async fn invoke(
    opts: &ClientOptions,
    instance: &str,
    command: &str,
    run_id: &str,
    timeout: Duration,
    keep: usize,
    chunks: tokio::sync::mpsc::Sender<Chunk>,
) -> Invocation {
    let started = Instant::now();
    let name: Arc<str> = Arc::from(instance);
    let attempt = async {
        let client = Client::connect(opts, Some(instance)).await?;
        // Waiting for room in the queue holds up this invocation's reading (and so, through
        // SSH flow control, the remote command), never the others.
        let forward = |stream: OutputStream, data: Vec<u8>| {
            let (chunks, instance) = (chunks.clone(), name.clone());
            async move {
                let _ = chunks.send(Chunk { instance, stream, data }).await;
            }
        };
        client.exec_streaming(command, &[("POSTERN_RUN_ID", run_id)], keep, forward).await
    };
    let (status, exit_code, error, out) = match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(c)) => {
            let status = match c.exit_code {
                Some(0) => Status::Success,
                Some(_) => Status::Failed,
                None => Status::Error,
            };
            let err = c.signal.as_ref().map(|s| format!("killed by signal {s}"));
            (status, c.exit_code, err, Some(c))
        }
        Ok(Err(e)) => (Status::Error, None, Some(error_chain(&e)), None),
        Err(_) => (Status::Timeout, None, Some(format!("no result after {}s", timeout.as_secs())), None),
    };
    let outcome = Outcome {
        instance: instance.to_owned(),
        status,
        exit_code,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        stdout_bytes: out.as_ref().map_or(0, |c| c.stdout.total),
        stderr_bytes: out.as_ref().map_or(0, |c| c.stderr.total),
        error,
    };
    (outcome, out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn amounts() {
        assert_eq!(amount("10%", 100).unwrap(), 10);
        assert_eq!(amount("10%", 3).unwrap(), 1);
        assert_eq!(amount("0%", 3).unwrap(), 0);
        assert_eq!(amount("100%", 7).unwrap(), 7);
        assert_eq!(amount("4", 2).unwrap(), 4);
        assert!(amount("150%", 2).is_err());
        assert!(amount("x", 2).is_err());
    }

    #[test]
    fn limits_run_at_least_one() {
        let l = RunLimits::new(3, "0%", "34%", Duration::from_secs(1)).unwrap();
        assert_eq!((l.concurrency, l.max_errors), (1, 2));
        assert!(matches!(RunLimits::new(3, "ten", "0", Duration::ZERO), Err(FleetError::InvalidNumber { .. })));
    }

    fn instance(name: &str, online: bool, actions: &[&str]) -> Instance {
        Instance {
            name: name.into(),
            id: format!("ag-{name}"),
            labels: Default::default(),
            online,
            platform: "linux".into(),
            hostname: name.into(),
            last_seen: None,
            actions: actions.iter().map(|a| (*a).to_owned()).collect(),
            logins: Vec::new(),
            profiles: Vec::new(),
        }
    }

    fn limits(concurrency: usize, max_errors: usize) -> RunLimits {
        RunLimits { concurrency, max_errors, timeout: Duration::from_secs(5), keep_output: 1024 }
    }

    /// A fake invocation: instances named `fail-*` fail; tracks the most running at once.
    fn fake(running: Arc<AtomicUsize>, peak: Arc<AtomicUsize>) -> impl Fn(String, Sender) -> futures_like::Boxed {
        move |name: String, _chunks| {
            let (running, peak) = (running.clone(), peak.clone());
            Box::pin(async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                let status = if name.starts_with("fail") { Status::Failed } else { Status::Success };
                let o = Outcome {
                    status,
                    exit_code: Some(u32::from(status != Status::Success)),
                    ..Outcome::without_run(name, status, String::new())
                };
                (o, None)
            })
        }
    }

    type Sender = tokio::sync::mpsc::Sender<Chunk>;

    mod futures_like {
        pub type Boxed = std::pin::Pin<Box<dyn Future<Output = super::Invocation> + Send>>;
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_is_bounded_and_skips_are_reported() {
        let (running, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let mut fleet: Vec<Instance> = (0..7).map(|n| instance(&format!("web-{n}"), true, &["exec"])).collect();
        fleet.push(instance("off", false, &["exec"]));
        fleet.push(instance("shell-only", true, &["shell"]));
        let mut started = 0;
        let report = schedule(
            fleet,
            &limits(3, 0),
            fake(running, peak.clone()),
            |e| started += usize::from(matches!(e, FleetEvent::Started { .. })),
            std::future::pending(),
        )
        .await;
        assert_eq!(peak.load(Ordering::SeqCst), 3);
        assert_eq!(started, 7);
        let s = &report.summary;
        assert_eq!((s.total, s.success, s.offline, s.not_allowed, s.interrupted), (9, 7, 1, 1, false));
        assert_eq!(report.outcomes[0].instance, "off", "sorted by name");
    }

    #[tokio::test(start_paused = true)]
    async fn error_budget_stops_new_invocations() {
        let (running, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let fleet: Vec<Instance> =
            ["fail-1", "fail-2", "web-1", "web-2"].iter().map(|n| instance(n, true, &["exec"])).collect();
        // One error is within the budget; the second exhausts it.
        let report = schedule(fleet, &limits(1, 1), fake(running, peak), |_| {}, std::future::pending()).await;
        let s = &report.summary;
        assert_eq!((s.failed, s.not_started, s.success), (2, 2, 0));
        let skipped = report.outcomes.iter().find(|o| o.instance == "web-1").unwrap();
        assert_eq!(skipped.error.as_deref(), Some("not started: more than 1 error(s)"));
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_stops_running_and_pending() {
        let fleet: Vec<Instance> = ["a", "b", "c"].iter().map(|n| instance(n, true, &["exec"])).collect();
        let hang = |_name: String, _chunks: Sender| -> futures_like::Boxed { Box::pin(std::future::pending()) };
        let cancel = tokio::time::sleep(Duration::from_millis(50));
        let report = schedule(fleet, &limits(2, 0), hang, |_| {}, cancel).await;
        let s = &report.summary;
        assert_eq!((s.cancelled, s.not_started, s.interrupted), (2, 1, true));
    }

    #[tokio::test(start_paused = true)]
    async fn output_is_reported_as_it_comes_and_before_the_instance_finishes() {
        let fleet: Vec<Instance> = ["a", "b"].iter().map(|n| instance(n, true, &["exec"])).collect();
        let talk = |name: String, chunks: Sender| -> futures_like::Boxed {
            Box::pin(async move {
                for i in 0..100 {
                    let data = format!("{name} {i}\n").into_bytes();
                    let c = Chunk { instance: Arc::from(name.as_str()), stream: OutputStream::Stdout, data };
                    chunks.send(c).await.unwrap();
                }
                let o = Outcome { exit_code: Some(0), ..Outcome::without_run(name, Status::Success, String::new()) };
                (o, None)
            })
        };
        let mut seen: Vec<String> = Vec::new();
        schedule(
            fleet,
            &limits(2, 0),
            talk,
            |e| match e {
                FleetEvent::Output { instance, data, .. } => seen.push(format!("{instance}: {}", text(data))),
                FleetEvent::Finished { outcome, .. } => seen.push(format!("{} done", outcome.instance)),
                _ => {}
            },
            std::future::pending(),
        )
        .await;
        for name in ["a", "b"] {
            let mine: Vec<&String> = seen.iter().filter(|l| l.starts_with(name)).collect();
            assert_eq!(mine.len(), 101);
            assert_eq!(mine[0], &format!("{name}: {name} 0\n"));
            assert_eq!(mine[99], &format!("{name}: {name} 99\n"), "in order");
            assert_eq!(mine[100], &format!("{name} done"), "all output before the end");
        }
    }

    fn text(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }
}
