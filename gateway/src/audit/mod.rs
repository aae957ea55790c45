//! The audit event log: one JSON object per line, schema version in every event.
//!
//! This is the minimal append-only log the foundation needs (enrollment, agents, tokens,
//! protocol violations); hash chaining, signed checkpoints, sinks and encryption build on it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;
use serde_json::{Map, Value};

/// Version of the event schema; bumped on incompatible changes.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

#[derive(Debug, Serialize)]
struct Envelope<'a> {
    v: u32,
    id: String,
    time: String,
    event: &'a str,
    #[serde(flatten)]
    fields: Map<String, Value>,
}

pub fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

impl AuditLog {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
        Ok(Self { path: path.to_owned(), file: Mutex::new(file) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one event. `fields` must be a JSON object; secrets never go in it.
    /// A write failure is logged and returned so callers that must fail closed can.
    pub fn record(&self, event: &str, fields: Value) -> std::io::Result<()> {
        let fields = match fields {
            Value::Object(m) => m,
            other => {
                let mut m = Map::new();
                m.insert("detail".into(), other);
                m
            }
        };
        let mut id = [0u8; 8];
        // An id collision only weakens cross-referencing, never integrity; no need to fail.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id);
        let env = Envelope {
            v: SCHEMA_VERSION,
            id: id.iter().map(|b| format!("{b:02x}")).collect(),
            time: now_rfc3339(),
            event,
            fields,
        };
        let mut line = serde_json::to_vec(&env).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let result = match self.file.lock() {
            Ok(mut f) => f.write_all(&line).and_then(|()| f.flush()),
            Err(_) => Err(std::io::Error::other("audit log lock poisoned")),
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, path = %self.path.display(), event, "cannot write audit event");
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_json_lines_with_version() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(&dir.path().join("audit.log")).unwrap();
        log.record("token.created", serde_json::json!({"labels": {"env": "dev"}})).unwrap();
        log.record("agent.connected", serde_json::json!({"agent_id": "ag-1"})).unwrap();
        let text = std::fs::read_to_string(log.path()).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["v"], 1);
        assert_eq!(lines[0]["event"], "token.created");
        assert_eq!(lines[1]["agent_id"], "ag-1");
        assert_ne!(lines[0]["id"], lines[1]["id"]);
    }
}
