//! `postern run` across instances: runs begun and not yet ended, for their `run.start` and
//! `run.end` events and so that each invocation's `session.start` can name its run (only a
//! run the same user began counts).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use postern_core::Identity;
use postern_core::command::{RunBegin, RunEnd, RunEnded, RunStarted};
use postern_core::util::{now_unix, random_hex};

use crate::audit::AuditLog;
use crate::audit::events::{self, Event};

/// Runs open on this gateway at once (bounded memory).
const MAX_OPEN_RUNS: usize = 10_000;
/// Runs one user may have open at once (so one user cannot use up the table).
const MAX_OPEN_RUNS_PER_USER: usize = 100;
/// A run not ended after this long is forgotten (its `run.end` is then refused).
const RUN_FORGET_SECS: i64 = 7 * 86_400;
/// Largest run-begin accepted: instance names and the command's length.
const MAX_RUN_INSTANCES: usize = 100_000;
const MAX_RUN_COMMAND: usize = 64 * 1024;

/// Runs begun and not yet ended: run id -> (user, started at).
#[derive(Debug)]
pub struct Runs {
    open: Mutex<HashMap<String, (String, i64)>>,
    audit: Arc<AuditLog>,
}

impl Runs {
    pub fn new(audit: Arc<AuditLog>) -> Self {
        Runs { open: Mutex::new(HashMap::new()), audit }
    }

    /// Whether `run_id` is a run `user` began (so sessions may carry it).
    pub fn owned_by(&self, run_id: &str, user: &str) -> bool {
        self.open.lock().map(|m| m.get(run_id).is_some_and(|(u, _)| u == user)).unwrap_or(false)
    }

    /// Open a run for `identity`; the answer carries its id.
    pub fn begin(&self, identity: &Identity, source: &str, req: &RunBegin) -> Result<RunStarted, String> {
        if req.instances.len() > MAX_RUN_INSTANCES || req.command.len() > MAX_RUN_COMMAND {
            return Err("run-begin: too large".to_owned());
        }
        let id = format!("run-{}", random_hex(8).map_err(|e| e.to_string())?);
        let now = now_unix();
        {
            let mut runs = self.open.lock().map_err(|_| "internal error".to_owned())?;
            runs.retain(|_, (_, t)| now - *t < RUN_FORGET_SECS);
            if runs.len() >= MAX_OPEN_RUNS {
                return Err("too many runs in progress on this gateway".to_owned());
            }
            if runs.values().filter(|(u, _)| *u == identity.user).count() >= MAX_OPEN_RUNS_PER_USER {
                return Err(format!("you have {MAX_OPEN_RUNS_PER_USER} runs in progress; let one finish first"));
            }
            runs.insert(id.clone(), (identity.user.clone(), now));
        }
        let count = |n: Option<usize>| n.map(|n| u64::try_from(n).unwrap_or(u64::MAX));
        let _ = self.audit.event(&Event::RunStart(events::RunStart {
            run_id: id.clone(),
            user: identity.user.clone(),
            source: source.to_owned(),
            targets: req.targets.clone(),
            command: req.command.clone(),
            instances: req.instances.clone(),
            max_concurrency: count(req.max_concurrency),
            max_errors: count(req.max_errors),
        }));
        Ok(RunStarted { run_id: id })
    }

    /// Close one of `identity`'s runs with its summary.
    pub fn end(&self, identity: &Identity, req: &RunEnd) -> Result<RunEnded, String> {
        let started = {
            let mut runs = self.open.lock().map_err(|_| "internal error".to_owned())?;
            match runs.get(&req.run_id) {
                Some((user, started)) if *user == identity.user => {
                    let t = *started;
                    runs.remove(&req.run_id);
                    t
                }
                _ => return Err(format!("no run {:?} of yours is in progress", req.run_id)),
            }
        };
        let _ = self.audit.event(&Event::RunEnd(events::RunEnd {
            run_id: req.run_id.clone(),
            user: identity.user.clone(),
            summary: req.summary.clone(),
            duration_ms: (now_unix() - started).saturating_mul(1000),
        }));
        Ok(RunEnded { run_id: req.run_id.clone(), ok: true })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn runs() -> (Runs, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let audit = Arc::new(AuditLog::open(dir.path()).unwrap());
        (Runs::new(audit), dir)
    }

    fn who(user: &str) -> Identity {
        Identity::new(user, None)
    }

    fn begin_body() -> RunBegin {
        RunBegin {
            targets: None,
            command: "true".into(),
            instances: vec!["a".into()],
            max_concurrency: None,
            max_errors: None,
        }
    }

    #[test]
    fn a_run_belongs_to_the_user_who_began_it() {
        let (runs, _dir) = runs();
        let id = runs.begin(&who("alice"), "127.0.0.1", &begin_body()).unwrap().run_id;
        assert!(runs.owned_by(&id, "alice"));
        assert!(!runs.owned_by(&id, "bob"));
        let end = RunEnd { run_id: id.clone(), summary: json!({}) };
        assert!(runs.end(&who("bob"), &end).is_err(), "bob cannot end alice's run");
        assert!(runs.end(&who("alice"), &end).unwrap().ok);
        assert!(!runs.owned_by(&id, "alice"), "an ended run is forgotten");
        assert!(runs.end(&who("alice"), &end).is_err(), "a run ends once");
    }

    #[test]
    fn one_user_cannot_fill_the_table() {
        let (runs, _dir) = runs();
        for _ in 0..MAX_OPEN_RUNS_PER_USER {
            runs.begin(&who("alice"), "x", &begin_body()).unwrap();
        }
        assert!(runs.begin(&who("alice"), "x", &begin_body()).unwrap_err().contains("runs in progress"));
        assert!(runs.begin(&who("bob"), "x", &begin_body()).is_ok());
    }
}
