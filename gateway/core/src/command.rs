//! The user-command contract: what `ssh -p 2222 alice@gateway COMMAND` answers, as types
//! both the gateway (which serializes them) and the client SDK (which parses them) use, so
//! the two cannot drift apart. Every answer is one JSON document; a refusal is a message on
//! stderr and exit status 1.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The gateway commands, as `help` and unknown commands print them.
pub const USAGE: &str = "gateway commands: whoami | ls [LABEL-SELECTOR] | rdp-token INSTANCE | ssh-config [KNOWN_HOSTS_FILE] | run-begin JSON | run-end JSON";

/// The special `direct-tcpip` host that means "the instance's RDP service" (the agent's
/// configured `rdp_address`): `ssh -L 13389:@rdp:3389 alice%win-01@gateway`.
pub const RDP_DESTINATION: &str = "@rdp";

/// Where `ssh-config` points `UserKnownHostsFile` when the user names no file.
pub const DEFAULT_KNOWN_HOSTS: &str = "~/.ssh/postern_known_hosts";

/// `whoami`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoAmI {
    pub user: String,
    pub source: String,
}

/// One row of `ls`: an instance as a user sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub name: String,
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub online: bool,
    pub platform: String,
    pub hostname: String,
    pub last_seen: Option<i64>,
    /// What this user may do there now (`shell`, `exec`, `port-forward`, `rdp`, ...).
    pub actions: Vec<String>,
}

/// `rdp-token INSTANCE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdpToken {
    pub token: String,
    pub instance: String,
    pub expires_at: i64,
    pub expires_in: u64,
    pub rdp_address: String,
}

/// `ssh-config [KNOWN_HOSTS_FILE]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshConfig {
    pub config: String,
}

/// The body of `run-begin JSON`: a fleet run about to start (for its audit event).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunBegin {
    pub targets: Option<String>,
    pub command: String,
    pub instances: Vec<String>,
    #[serde(default)]
    pub max_concurrency: Option<usize>,
    #[serde(default)]
    pub max_errors: Option<usize>,
}

/// The answer to `run-begin`: the id sessions of this run carry (`POSTERN_RUN_ID`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStarted {
    pub run_id: String,
}

/// The body of `run-end JSON`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunEnd {
    pub run_id: String,
    pub summary: serde_json::Value,
}

/// The answer to `run-end`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunEnded {
    pub run_id: String,
    pub ok: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_rows_round_trip() {
        let text = r#"{"name":"web-01","id":"ag-1","labels":{"env":"prod"},"online":true,"platform":"linux",
                       "hostname":"web-01","last_seen":5,"actions":["shell","exec"]}"#;
        let row: Instance = serde_json::from_str(text).unwrap();
        assert_eq!(row.actions, ["shell", "exec"]);
        let again: Instance = serde_json::from_value(serde_json::to_value(&row).unwrap()).unwrap();
        assert_eq!(again, row);
    }

    #[test]
    fn run_begin_limits_are_optional() {
        let b: RunBegin = serde_json::from_str(r#"{"targets":null,"command":"true","instances":["a"]}"#).unwrap();
        assert_eq!(b.max_concurrency, None);
    }
}
