//! Events about the gateway itself, its agents, its administration and its audit log.

use postern_core::store::Labels;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `gateway.started`: where it listens (null: that door is off).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayStarted {
    pub tunnel: String,
    pub ssh: Option<String>,
    pub rdp: Option<String>,
    pub ca_pin: String,
    /// `[cluster] gateway_id` (absent for a single gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_id: Option<String>,
}

/// `gateway.stopped` (graceful stop); no fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayStopped {}

/// `token.created`. Names the token by a hash prefix, never the secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenCreated {
    pub actor: String,
    pub token_id: String,
    pub labels: Labels,
    pub name: Option<String>,
    pub expires_at: i64,
}

/// `token.revoked`: an unused enrollment token made unusable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenRevoked {
    pub actor: String,
    pub token_id: String,
}

/// `agent.enrolled`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentEnrolled {
    pub source: String,
    pub agent_id: String,
    pub name: String,
    pub labels: Labels,
    pub hostname: String,
    pub token_id: String,
}

/// `agent.enroll_refused`. Written once per source address per interval: the first refusal
/// at once, then a summary (the last refusal) with `count`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentEnrollRefused {
    pub source: String,
    pub token_id: String,
    pub hostname: String,
    pub reason: String,
    /// On a summary: how many refusals from this address it stands for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

/// `agent.connected`: its tunnel is up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentConnected {
    pub agent_id: String,
    pub name: String,
    pub source: String,
    pub agent_version: String,
    /// `quic` or `tcp` (absent in lines written before agents had a TCP fallback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
}

/// `agent.disconnected`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentDisconnected {
    pub agent_id: String,
}

/// `agent.refused`: an unknown or revoked agent tried to connect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRefused {
    pub agent_id: String,
    pub source: String,
    pub reason: String,
}

/// `agent.renewed`: a connected agent got a new certificate (at most one per half lifetime).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRenewed {
    pub agent_id: String,
    pub source: String,
    /// Serial of the new certificate (hex).
    pub serial: String,
    /// When the new certificate expires (Unix seconds).
    pub not_after: i64,
}

/// `agent.revoked`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRevoked {
    pub actor: String,
    pub agent_id: String,
    pub name: String,
}

/// `agent.bulk_enrolled` (load tests only: `testing.bulk_enroll`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentBulkEnrolled {
    pub actor: String,
    pub count: u64,
    pub prefix: String,
}

/// `agent.protocol_violation`; `agent_id` is null before the agent said who it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentProtocolViolation {
    pub source: String,
    pub agent_id: Option<String>,
    pub error: String,
}

/// `policy.changed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyChanged {
    pub actor: String,
    pub policy: String,
    pub version: i64,
    #[serde(flatten)]
    pub change: PolicyChange,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PolicyChange {
    Applied {
        file: String,
        statements: u64,
        /// Line diff against the previous version.
        diff: String,
    },
    /// `removed` is always true: it is what tells a removal in the log.
    Removed { removed: bool },
}

/// `grant.created`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrantCreated {
    pub actor: String,
    pub grant_id: String,
    pub user: String,
    pub policy: String,
    pub expires_at: i64,
    pub reason: String,
}

/// `grant.revoked`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrantRevoked {
    pub actor: String,
    pub grant_id: String,
    pub user: String,
    pub policy: String,
}

/// `grant.expired`: a grant's time ran out (within a second of `expires_at`, while the
/// gateway runs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrantExpired {
    pub grant_id: String,
    pub user: String,
    pub policy: String,
    pub expires_at: i64,
}

/// `admin.action`: every admin request. Requests answered by the admin socket itself say
/// only `actor` and `op`; managed ones also `ok`, their `args` if they change something, and
/// the `error` if they failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdminAction {
    pub actor: String,
    pub op: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<bool>,
    /// The request's arguments (keys as fingerprints): free-form, one shape per op.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `audit.checkpoint`: a signature over the line before it (see [`super::super::verify`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditCheckpoint {
    pub covers_seq: u64,
    pub covers_hash: String,
    pub key_id: String,
    pub sig: String,
    /// The previous segment, when this checkpoint is the first line of a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment_start: Option<String>,
}

/// `audit.truncated`: at start-up the log did not reach the last checkpoint the gateway
/// signed (the anchor kept in the database, see [`super::super::anchor`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditTruncated {
    /// The seq the log ends at.
    pub log_seq: u64,
    /// The anchored checkpoint: its seq and line hash.
    pub anchor_seq: u64,
    pub anchor_hash: String,
    /// What was found, in words.
    pub reason: String,
    /// false: the gateway refused to start; true: `[audit] accept_truncation` let it go on.
    pub accepted: bool,
}

/// `gateway.disk_low`: the file system of the recordings has less free space than `[audit]
/// min_free_space`; written at the first session that finds it so, not again until a later
/// check finds enough space (an episode).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayDiskLow {
    /// The recordings directory.
    pub path: String,
    pub free_bytes: u64,
    pub min_free_bytes: u64,
    /// `[audit] fail_closed`: true, new logged sessions are refused meanwhile; false, they
    /// run unrecorded (`logged: false`).
    pub fail_closed: bool,
}

/// `gateway.history_failed`: a session could not be written to the session history in the
/// database (`postern sessions --all`, `postern replay`); the session itself went on, and
/// its events here remain the record. Written at the first failure, not again until a write
/// has succeeded (an episode).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayHistoryFailed {
    /// The session whose row was not written.
    pub session_id: String,
    /// "start", "end" or "crash" (a session a crash cut short, marked ended at start-up).
    pub write: String,
    pub error: String,
}

/// `audit.retention`: a retention run deleted something.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRetention {
    pub deleted_recordings: u64,
    pub bytes: u64,
    /// `[audit] retention` (null: recordings are kept).
    pub older_than_secs: Option<u64>,
    /// Only when log segments were deleted.
    #[serde(flatten)]
    pub segments: Option<SegmentsDeleted>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentsDeleted {
    pub deleted_segments: u64,
    pub segment_bytes: u64,
    /// The log now starts after this `seq` (`audit verify` accepts that).
    pub deleted_through_seq: u64,
    pub log_older_than_secs: Option<u64>,
}

/// `audit.sink`: the object store became unreachable, or reachable again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditSink {
    /// "s3".
    pub sink: String,
    #[serde(flatten)]
    pub state: SinkState,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum SinkState {
    /// Files waiting to be uploaded when it happened.
    Unreachable { error: String, pending: u64 },
    /// Files uploaded since it came back.
    Recovered { uploaded: u64 },
}

/// `config.reloaded`: gateway.toml was read again. `changed` names the keys whose change took
/// effect (`ssh.users`, `audit.webhooks`, `log_level`, ...), `needs_restart` those that
/// changed in the file but only take effect at the next start (listen addresses, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigReloaded {
    /// `signal` (SIGHUP) or the local user of `postern reload`.
    pub by: String,
    pub file: String,
    pub changed: Vec<String>,
    pub needs_restart: Vec<String>,
}

/// `config.reload_failed`: the file could not be read, parsed or checked; the configuration
/// in force stays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigReloadFailed {
    pub by: String,
    pub file: String,
    pub error: String,
}
