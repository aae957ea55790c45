//! Events about what users do: authentication, sessions, forwards, RDP and `postern run`.

use postern_core::Action;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::common::{RdpMode, RdpRequest, action_name};

/// `auth.failed`: one per SSH connection that never authenticated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthFailed {
    pub source: String,
    /// The last user name tried (cut to 64 characters); null if none was.
    pub user: Option<String>,
    pub method: String,
    /// Fingerprints of the keys offered (at most 16).
    pub keys: Vec<String>,
    /// An inner connection (through `-J` passthrough to the gateway itself).
    pub inner: bool,
}

/// `login.succeeded`: a sign-in through the identity provider (`postern login`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoginSucceeded {
    pub user: String,
    /// `ISSUER SUBJECT`: the identity provider's name for this person.
    pub idp_subject: String,
    /// The Postern groups the login synced (after `[identity.oidc.groups]` mapping).
    pub groups: Vec<String>,
    pub mfa: bool,
    pub amr: Vec<String>,
    /// "browser" (authorization code with PKCE) or "device" (device authorization grant).
    pub flow: String,
    pub cert_serial: String,
    /// Unix seconds.
    pub valid_before: u64,
    /// The user was created by this login.
    pub created: bool,
    pub source: String,
}

/// `login.failed`: a sign-in that was refused, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoginFailed {
    /// The user the identity provider named, when it got that far.
    pub user: Option<String>,
    pub idp_subject: Option<String>,
    /// A short stable reason (`bad_signature`, `wrong_audience`, `expired`, `nonce_mismatch`,
    /// `code_rejected`, `user_disabled`, `mfa_required`, ...).
    pub reason: String,
    /// The message the client was given.
    pub detail: String,
    pub flow: String,
    pub source: String,
}

/// `logout`: `postern logout` revoked the certificate it came in with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Logout {
    pub user: String,
    pub source: String,
    pub cert_serial: String,
}

/// `web.signin`: a browser signed in to the web console.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebSignin {
    pub user: String,
    /// The browser's address.
    pub source: String,
    /// How: "link" (`postern web-login`).
    pub via: String,
}

/// `session.watch.start`: an administrator (a member of `[web] admin_groups`) began
/// watching a live shell or exec session in the web console, read-only; its user was told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionWatchStart {
    pub session_id: String,
    /// Who watches.
    pub watcher: String,
    /// Whose session it is, and where.
    pub user: String,
    pub target: String,
    /// The watcher's browser.
    pub source: String,
}

/// `session.watch.end`: the watcher stopped watching (closed the page, the session ended,
/// or the watcher lost the right to watch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionWatchEnd {
    pub session_id: String,
    pub watcher: String,
    /// "closed", "session-ended", "not-allowed".
    pub reason: String,
    pub duration_ms: u64,
}

/// `session.authorized`: a shell, exec or sftp session passed policy (written before it
/// starts, so a log that cannot be written stops it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionAuthorized {
    pub user: String,
    pub target: String,
    pub agent_id: String,
    #[serde(with = "action_name")]
    pub kind: Action,
    pub source: String,
    pub recording_ok: bool,
}

/// `session.start`, one shape per door.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SessionStart {
    Ssh(SshSessionStart),
    AdminSocket(AdminSessionStart),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SshSessionStart {
    pub session_id: String,
    pub user: String,
    pub target: String,
    pub agent_id: String,
    #[serde(with = "action_name")]
    pub kind: Action,
    /// What the user asked to run (null for a shell, "sftp" for sftp).
    pub command: Option<String>,
    pub pty: bool,
    pub source: String,
    pub profile: Option<String>,
    pub run_as: Option<String>,
    pub logged: bool,
    /// Why the session is not recorded (null when it is).
    pub reason: Option<String>,
    pub run_id: Option<String>,
    pub recording: Option<String>,
    /// In a cluster, the gateway the agent is connected to when it is not this one (the
    /// session went through it; recorded and audited here all the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via_gateway: Option<String>,
    /// The serial (16 hex digits) of the gateway-issued certificate the user came in with
    /// (`postern login`, `postern user cert`): which login this session belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_serial: Option<String>,
    /// The door, when it is not the SSH door: "web" (a terminal in the web console).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub door: Option<String>,
}

/// A session through the admin socket (`postern exec`/`shell` on the gateway host).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdminSessionStart {
    pub session_id: String,
    pub actor: String,
    pub target: String,
    pub agent_id: String,
    #[serde(with = "action_name")]
    pub kind: Action,
    /// "admin-socket".
    pub via: String,
    /// What was asked to run (exec, or a shell's `-c` command; null for a login shell).
    #[serde(default)]
    pub command: Option<String>,
    pub logged: bool,
    pub reason: String,
}

/// `session.end`, one shape per door, and one for sessions a crash cut short.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SessionEnd {
    // First: an SSH end has no `via`, so it never parses as an admin-socket one.
    AdminSocket(AdminSessionEnd),
    Ssh(SshSessionEnd),
    Crashed(CrashedSessionEnd),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SshSessionEnd {
    pub session_id: String,
    pub user: String,
    pub target: String,
    #[serde(with = "action_name")]
    pub kind: Action,
    pub exit_code: Option<i32>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// "recording-failed", "idle-timeout", ... (null: the session ended by itself).
    pub end_reason: Option<String>,
    /// Why it was terminated, when it was.
    pub terminated_because: Option<String>,
    pub duration_ms: u64,
    pub logged: bool,
    pub reason: Option<String>,
    /// The door, when it is not the SSH door: "web" (a terminal in the web console).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub door: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdminSessionEnd {
    pub session_id: String,
    /// The local administrator (`local-admin(uid=N)`), as in the start event's `actor`.
    pub user: String,
    pub target: String,
    #[serde(with = "action_name")]
    pub kind: Action,
    /// "admin-socket".
    pub via: String,
    /// From the agent's exit frame; null when the session ended without one.
    pub exit_code: Option<i32>,
    /// Bytes of stdin, and of stdout and stderr, the session carried.
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub end_reason: Option<String>,
    pub duration_ms: u64,
    /// Always false: admin-socket sessions are not recorded.
    pub logged: bool,
}

/// Written at the next start for a session whose live marker a crash left behind: what the
/// marker said, when it could be read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CrashedSessionEnd {
    pub session_id: String,
    /// "gateway-crash".
    pub end_reason: String,
    #[serde(flatten)]
    pub marker: LiveMarker,
}

/// A live session's marker file (`DATA_DIR/live-sessions/ID`). Every field is optional
/// because the file is read back after a crash, when it may be damaged: what cannot be
/// read is left out of the end event.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LiveMarker {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logged: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<i64>,
}

/// `session.denied`, one shape per door (the most specific first: untagged parsing takes
/// the first that fits).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SessionDenied {
    RdpToken(RdpTokenDenied),
    Rdp(RdpDenied),
    Ssh(SshDenied),
}

/// A session, forward or passthrough refused at the SSH door.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SshDenied {
    pub user: String,
    pub target: String,
    #[serde(with = "action_name")]
    pub action: Action,
    pub source: String,
    pub reason: String,
    /// Forwards: the destination `HOST:PORT` as the client spelled it (cut to 255 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// The door, when it is not the SSH door: "web" (a terminal in the web console).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub door: Option<String>,
}

/// An RDP routing token refused (policy said no when it was asked for).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RdpTokenDenied {
    pub user: String,
    pub target: String,
    #[serde(with = "action_name")]
    pub action: Action,
    /// "token".
    pub stage: String,
    /// The client's address, when the request came with one.
    pub source: Option<String>,
    pub reason: String,
}

/// A connection to the RDP port refused; what is known grows with each stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RdpDenied {
    #[serde(with = "action_name")]
    pub action: Action,
    pub source: String,
    pub reason: String,
    /// Machine-readable reason (docs/rdp.md).
    pub code: String,
    /// Once the token was redeemed: whose it was.
    #[serde(flatten)]
    pub token: Option<RdpTokenHolder>,
    /// Once the connection request was read.
    #[serde(flatten)]
    pub request: Option<RdpRequest>,
    /// On a summary of refusals before a token was redeemed: how many connections from
    /// this address it stands for (docs/rdp.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RdpTokenHolder {
    pub user: String,
    pub target: String,
    pub token_id: String,
}

/// `session.terminated`: ended by an admin or because access was revoked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionTerminated {
    pub session_id: String,
    pub user: String,
    pub target: String,
    #[serde(with = "action_name")]
    pub kind: Action,
    /// "policy" or the admin.
    pub actor: String,
    pub reason: String,
    /// With `[cluster]`: the gateway the admin asked at, when it is not the one that
    /// carried the session (`postern sessions terminate` for a session elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_gateway: Option<String>,
}

/// `forward.open` and `passthrough.open`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardOpen {
    pub session_id: String,
    pub user: String,
    pub target: String,
    /// HOST:PORT, the host in canonical form (`127.1` is `127.0.0.1`, `DB.` is `db`): what
    /// the policy decided and the agent was asked to dial.
    pub destination: String,
    pub source: String,
    pub logged: bool,
    pub reason: String,
    /// `-L` forwards: the destination as the client spelled it (cut to 255 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested: Option<String>,
    /// `-L` forwards: the address (`IP:PORT`) the agent connected to; for a name, what it
    /// resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<String>,
    /// In a cluster, the gateway the agent is connected to when it is not this one (the
    /// session went through it; recorded and audited here all the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via_gateway: Option<String>,
    /// The serial (16 hex digits) of the gateway-issued certificate the user came in with
    /// (`postern login`, `postern user cert`): which login this session belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_serial: Option<String>,
}

/// `forward.close` and `passthrough.close`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardClose {
    pub session_id: String,
    pub user: String,
    pub target: String,
    pub destination: String,
    pub bytes_to_target: u64,
    pub bytes_from_target: u64,
    pub end_reason: Option<String>,
    pub duration_ms: u64,
    pub logged: bool,
    pub reason: String,
}

/// `forward.failed`: the agent could not open it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardFailed {
    pub user: String,
    pub target: String,
    pub destination: String,
    pub error: String,
}

/// `rdp.token_issued`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RdpTokenIssued {
    pub user: String,
    pub target: String,
    pub agent_id: String,
    pub token_id: String,
    pub expires_at: i64,
    pub source: Option<String>,
}

/// `rdp.open`. Through the RDP port (`mode` gateway) it names the token and what the client
/// asked for; through `ssh -L` (`mode` local) the destination "rdp".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RdpOpen {
    pub session_id: String,
    pub user: String,
    pub target: String,
    pub source: String,
    pub mode: RdpMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    #[serde(flatten)]
    pub request: Option<RdpRequest>,
    pub logged: bool,
    pub reason: String,
    /// In a cluster, the gateway the agent is connected to when it is not this one (the
    /// session went through it; recorded and audited here all the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via_gateway: Option<String>,
}

/// `rdp.close`; `destination` only through `ssh -L`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RdpClose {
    pub session_id: String,
    pub user: String,
    pub target: String,
    pub mode: RdpMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    pub bytes_to_target: u64,
    pub bytes_from_target: u64,
    pub end_reason: Option<String>,
    pub duration_ms: u64,
    pub logged: bool,
    pub reason: String,
}

/// `rdp.failed`: the agent could not open it. Through the RDP port it has `source` and
/// `token_id`, through `ssh -L` `destination`; neither says `mode`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RdpFailed {
    pub user: String,
    pub target: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    pub error: String,
}

/// `run.start`: `postern run` across instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStart {
    pub run_id: String,
    pub user: String,
    pub source: String,
    /// The selector the user gave (`env=prod`), if any.
    pub targets: Option<String>,
    pub command: String,
    pub instances: Vec<String>,
    pub max_concurrency: Option<u64>,
    pub max_errors: Option<u64>,
}

/// `run.end`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunEnd {
    pub run_id: String,
    pub user: String,
    /// The client's tally, as it sent it (free-form counts by outcome).
    pub summary: Value,
    /// Whole seconds (the start is kept in Unix seconds) times 1000.
    pub duration_ms: i64,
}
