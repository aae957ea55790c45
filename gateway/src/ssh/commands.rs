//! Commands run on the gateway itself (`ssh -p 2222 alice@gateway COMMAND`), answered as
//! the authenticated user with one JSON document. The `postern` client (and any SSH client)
//! uses them: `whoami`, `ls [SELECTOR]`, `rdp-token INSTANCE`, `run-begin JSON`,
//! `run-end JSON`.

use std::collections::HashMap;
use std::sync::Mutex;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::gateway::GatewayState;
use postern_core::policy::Target;
use postern_core::{Identity, SESSION_ACTIONS};

pub const USAGE: &str = "gateway commands: whoami | ls [LABEL-SELECTOR] | rdp-token INSTANCE | ssh-config [KNOWN_HOSTS_FILE] | run-begin JSON | run-end JSON";

/// Runs begun and not yet ended: run id -> (user, started at). Bounded.
#[derive(Debug, Default)]
pub struct Runs(Mutex<HashMap<String, (String, i64)>>);

const MAX_OPEN_RUNS: usize = 10_000;
/// Runs one user may have open at once (so one user cannot use up the table).
const MAX_OPEN_RUNS_PER_USER: usize = 100;
/// A run not ended after this long is forgotten (its `run.end` is then refused).
const RUN_FORGET_SECS: i64 = 7 * 86_400;

impl Runs {
    /// Whether `run_id` is a run `user` began (so sessions may carry it).
    pub fn owned_by(&self, run_id: &str, user: &str) -> bool {
        self.0.lock().map(|m| m.get(run_id).is_some_and(|(u, _)| u == user)).unwrap_or(false)
    }
}

pub async fn run(state: &GatewayState, identity: &Identity, source: &str, command: &str) -> Result<Value, String> {
    let command = command.trim();
    let (verb, rest) = command.split_once(char::is_whitespace).unwrap_or((command, ""));
    let rest = rest.trim();
    match verb {
        "whoami" => Ok(json!({"user": identity.user, "source": source})),
        "ls" => list(state, identity, (!rest.is_empty()).then_some(rest)).await,
        "rdp-token" if !rest.is_empty() && !rest.contains(char::is_whitespace) => {
            crate::rdp::issue_token(state, identity, rest)
                .await
                .map(|t| serde_json::to_value(t).unwrap_or_default())
                .map_err(str::to_owned)
        }
        "rdp-token" => Err("usage: rdp-token INSTANCE".to_owned()),
        "run-begin" => run_begin(state, identity, source, rest),
        "ssh-config" => {
            let file = if rest.is_empty() { "~/.ssh/postern_known_hosts" } else { rest };
            let port = state.ssh_addr.map(|a| a.port()).unwrap_or(state.config.ssh.listen.port());
            crate::ssh::client_config(&state.config, &state.host_keys, port, file)
                .map(|text| json!({"config": text}))
                .map_err(|e| format!("{e:#}"))
        }
        "run-end" => run_end(state, identity, rest),
        "" | "help" => Err(USAGE.to_owned()),
        other => Err(format!("unknown gateway command {:?}; {USAGE}", other.chars().take(40).collect::<String>())),
    }
}

/// Instances the user may reach now: not revoked, matching the selector, with at least one
/// action the policy allows (listed per instance).
async fn list(state: &GatewayState, identity: &Identity, selector: Option<&str>) -> Result<Value, String> {
    let sel = selector
        .map(postern_core::policy::document::Selector::parse)
        .transpose()
        .map_err(|e| format!("label selector {:?}: {e}", selector.unwrap_or_default()))?;
    let agents = state.store.agents().await.map_err(|_| "gateway storage error".to_owned())?;
    let now = jiff::Timestamp::now();
    let mut rows = Vec::new();
    for a in agents.into_iter().filter(|a| !a.revoked) {
        if let Some(sel) = &sel
            && !postern_core::policy::selector_matches(sel, &a.labels)
        {
            continue;
        }
        let target = Target { id: &a.id, name: &a.name, labels: &a.labels };
        let actions: Vec<&str> = SESSION_ACTIONS
            .iter()
            .filter(|act| {
                state.access.decide(&identity.user, identity.source, Some(target), act.name(), None, now, false).allowed
            })
            .map(|act| act.name())
            .collect();
        if actions.is_empty() {
            continue;
        }
        let live = state.registry.get(&a.id);
        rows.push(json!({
            "name": a.name, "id": a.id, "labels": a.labels, "online": live.is_some(),
            "platform": live.as_ref().map(|l| l.platform.clone()).unwrap_or(a.platform),
            "hostname": live.as_ref().map(|l| l.hostname.clone()).unwrap_or(a.hostname),
            "last_seen": if live.is_some() { Some(postern_core::util::now_unix()) } else { a.last_seen },
            "actions": actions,
        }));
    }
    Ok(Value::Array(rows))
}

#[derive(Deserialize)]
struct RunBegin {
    targets: Option<String>,
    command: String,
    instances: Vec<String>,
    #[serde(default)]
    max_concurrency: Option<usize>,
    #[serde(default)]
    max_errors: Option<usize>,
}

fn run_begin(state: &GatewayState, identity: &Identity, source: &str, body: &str) -> Result<Value, String> {
    let req: RunBegin = serde_json::from_str(body).map_err(|e| format!("run-begin: {e}"))?;
    if req.instances.len() > 100_000 || req.command.len() > 64 * 1024 {
        return Err("run-begin: too large".to_owned());
    }
    let id = format!("run-{}", postern_core::util::random_hex(8).map_err(|e| e.to_string())?);
    let now = postern_core::util::now_unix();
    {
        let mut runs = state.runs.0.lock().map_err(|_| "internal error".to_owned())?;
        runs.retain(|_, (_, t)| now - *t < RUN_FORGET_SECS);
        if runs.len() >= MAX_OPEN_RUNS {
            return Err("too many runs in progress on this gateway".to_owned());
        }
        if runs.values().filter(|(u, _)| *u == identity.user).count() >= MAX_OPEN_RUNS_PER_USER {
            return Err(format!("you have {MAX_OPEN_RUNS_PER_USER} runs in progress; let one finish first"));
        }
        runs.insert(id.clone(), (identity.user.clone(), now));
    }
    let _ = state.audit.record(
        "run.start",
        json!({"run_id": id, "user": identity.user, "source": source, "targets": req.targets,
               "command": req.command, "instances": req.instances,
               "max_concurrency": req.max_concurrency, "max_errors": req.max_errors}),
    );
    Ok(json!({"run_id": id}))
}

#[derive(Deserialize)]
struct RunEnd {
    run_id: String,
    summary: Value,
}

fn run_end(state: &GatewayState, identity: &Identity, body: &str) -> Result<Value, String> {
    let req: RunEnd = serde_json::from_str(body).map_err(|e| format!("run-end: {e}"))?;
    let started = {
        let mut runs = state.runs.0.lock().map_err(|_| "internal error".to_owned())?;
        match runs.get(&req.run_id) {
            Some((user, started)) if *user == identity.user => {
                let t = *started;
                runs.remove(&req.run_id);
                t
            }
            _ => return Err(format!("no run {:?} of yours is in progress", req.run_id)),
        }
    };
    let _ = state.audit.record(
        "run.end",
        json!({"run_id": req.run_id, "user": identity.user, "summary": req.summary,
               "duration_ms": (postern_core::util::now_unix() - started).saturating_mul(1000)}),
    );
    Ok(json!({"run_id": req.run_id, "ok": true}))
}
