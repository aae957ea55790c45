//! Persistent state behind one trait. The embedded default is SQLite (the gateway's `store::sqlite`);
//! a PostgreSQL backend for scale-out implements the same trait with the same SQL dialect
//! subset (see docs/architecture.md).

use async_trait::async_trait;
use serde::Serialize;

pub type Labels = std::collections::BTreeMap<String, String>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed (connection, query, constraint); its own error is the source.
    #[error("database error: {0}")]
    Database(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// The last signed checkpoint of the audit log, kept outside the log so that cutting the log
/// back to an older checkpoint is noticed: its `seq` and the SHA-256 (hex) of its line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct AuditAnchor {
    pub seq: u64,
    pub hash: String,
}

/// A cluster gateway's audit anchor and the public key (hex ed25519) its checkpoints are
/// signed with: `postern audit verify --bucket` checks each gateway's chain in the object
/// store with the key its gateway recorded here, not with one taken from the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayAnchor {
    pub anchor: AuditAnchor,
    pub public_key: String,
}

/// An enrollment token as stored: only the SHA-256 of the secret is kept.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub hash: String,
    pub labels: Labels,
    pub name: Option<String>,
    pub created_at: i64,
    pub expires_at: i64,
}

/// An enrollment token as listed (`postern token list`): never the secret, nor its full hash.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct TokenRecord {
    /// The first 12 hex digits of the secret's SHA-256 (the audit log's `token_id`).
    pub id: String,
    pub name: Option<String>,
    pub labels: Labels,
    pub created_at: i64,
    pub expires_at: i64,
    pub used_at: Option<i64>,
    /// The agent it enrolled, or `revoked by ACTOR` for a revoked token.
    pub used_by: Option<String>,
}

/// What `used_by` starts with for a revoked token (agent ids never do).
pub const TOKEN_REVOKED_BY: &str = "revoked by ";

impl TokenRecord {
    /// `unused`, `used`, `expired` or `revoked` at `now`.
    pub fn state(&self, now: i64) -> &'static str {
        match (&self.used_by, self.used_at) {
            (Some(by), _) if by.starts_with(TOKEN_REVOKED_BY) => "revoked",
            (_, Some(_)) => "used",
            _ if now >= self.expires_at => "expired",
            _ => "unused",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedeemError {
    Unknown,
    Used,
    Expired,
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentRecord {
    pub id: String,
    pub name: String,
    pub labels: Labels,
    pub hostname: String,
    pub platform: String,
    pub agent_version: String,
    pub enrolled_at: i64,
    pub last_seen: Option<i64>,
    pub revoked: bool,
}

/// What an enrollment supplies; the store picks the final (unique) name.
#[derive(Debug, Clone)]
pub struct NewAgent {
    pub id: String,
    pub hostname: String,
    pub platform: String,
    pub agent_version: String,
    pub now: i64,
}

/// A Postern user: who they are, which groups they are in, how they prove it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct UserRecord {
    pub name: String,
    pub groups: Vec<String>,
    /// OpenSSH public key lines (`ssh-ed25519 AAAA... comment`).
    pub keys: Vec<String>,
    /// Principals of user certificates (from a trusted user CA) that mean this user.
    /// Empty: the user's own name.
    pub principals: Vec<String>,
    pub disabled: bool,
    pub created_at: i64,
    /// Set for a user from the identity provider (`postern login`): `issuer subject`, the
    /// one IdP identity this user is. Such a user's groups are the IdP's, synced at every
    /// login.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idp_subject: Option<String>,
}

/// A user certificate the gateway signed (`postern login`, `postern user cert`), kept until
/// it expires so it can be revoked before then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertificateRecord {
    pub serial: u64,
    pub user: String,
    /// SHA-256 fingerprint of the certified key (`SHA256:...`).
    pub key_fingerprint: String,
    pub issued_at: i64,
    pub expires_at: i64,
    /// `login` (postern login) or `admin` (postern user cert).
    pub origin: String,
    pub idp_subject: Option<String>,
    pub mfa: bool,
    pub revoked_at: Option<i64>,
}

/// What [`Store::login_user`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginUser {
    /// The user as stored now (created, or groups synced).
    Ready { user: UserRecord, created: bool },
    /// A user of that name exists and is not from the identity provider.
    NotFromIdp,
    /// A user of that name exists and is another IdP identity.
    OtherSubject,
}

/// One version of a policy document. `source` is empty for a removal.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyVersion {
    pub name: String,
    pub version: i64,
    pub source: String,
    pub file: String,
    pub applied_at: i64,
    pub applied_by: String,
    pub removed: bool,
}

/// Temporary access: `user` is a principal of every statement of `policy` until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GrantRecord {
    pub id: String,
    pub user: String,
    pub policy: String,
    pub reason: String,
    pub created_at: i64,
    pub created_by: String,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
    pub revoked_by: Option<String>,
}

impl GrantRecord {
    pub fn active_at(&self, now: i64) -> bool {
        self.revoked_at.is_none() && now < self.expires_at
    }
}

/// One session in the history (`postern sessions --all`, `postern replay`): written when it
/// starts, completed when it ends. Every door's sessions are kept, recorded or not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SessionRecord {
    pub id: String,
    /// The Postern user (for admin-socket sessions the local actor, `local-admin(uid=N)`).
    pub user: String,
    /// The client's address, when there is one.
    pub source: Option<String>,
    /// The instance's name when the session started.
    pub instance: String,
    pub agent_id: String,
    /// What it is: shell, exec, sftp, port-forward, ssh-passthrough, rdp.
    pub kind: String,
    /// The way in: ssh, rdp (the RDP port) or admin-socket.
    pub door: String,
    /// What the user asked to run (exec, or a shell's command), if anything.
    pub command: Option<String>,
    /// Forwards, passthrough and RDP: HOST:PORT the agent connected to.
    pub destination: Option<String>,
    /// Unix milliseconds: the history's order (sessions start many to a second).
    pub started_ms: i64,
    /// None while it runs (or when a crash cut it short and no gateway has seen it since).
    pub ended_at: Option<i64>,
    /// Why it ended ("idle-timeout", "terminated by ...", "gateway-crash"); None when the
    /// session ended by itself.
    pub end_reason: Option<String>,
    pub exit_code: Option<i32>,
    /// Bytes from the client towards the instance, and back.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Whether its content was recorded, and why not when it was not.
    pub logged: bool,
    pub unlogged_reason: Option<String>,
    /// The recording's file in the gateway's data directory (it may since have been moved
    /// to `[audit.s3]` by retention).
    pub recording: Option<String>,
    /// The `[cluster] gateway_id` of the gateway that carried it (None: a single gateway).
    pub gateway: Option<String>,
}

/// How a session in the history ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEnding {
    pub id: String,
    pub ended_at: i64,
    pub end_reason: Option<String>,
    pub exit_code: Option<i32>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// A recording that failed part-way turns a logged session into an unlogged one
    /// (None: as it started).
    pub logged: Option<bool>,
    /// None: as it started.
    pub unlogged_reason: Option<String>,
}

/// Which sessions of the history to list: every filter that is set must match. Newest first
/// (`started_ms`, then `id`, descending); `before` continues a listing after that row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SessionQuery {
    pub user: Option<String>,
    /// Matches the instance name or the agent id.
    pub instance: Option<String>,
    /// Matches the kind or the door.
    pub kind: Option<String>,
    /// Started at or after (Unix milliseconds).
    pub since: Option<i64>,
    /// Started before (Unix milliseconds).
    pub until: Option<i64>,
    /// Only rows after this one in the order: (started_ms, id).
    pub before: Option<(i64, String)>,
    pub limit: u32,
}

/// A live session as the whole cluster sees it (`postern sessions` with `[cluster]`): its
/// gateway keeps the row current while the session runs, under a lease it renews; a row
/// whose lease has run out (its gateway stopped renewing: killed, cut off) is ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct LiveSessionRecord {
    pub id: String,
    /// The gateway carrying it (`[cluster] gateway_id`).
    pub gateway_id: String,
    pub user: String,
    pub source: Option<String>,
    /// The instance's name.
    pub instance: String,
    pub agent_id: String,
    /// shell, exec, sftp, port-forward, ssh-passthrough, rdp.
    pub kind: String,
    pub destination: Option<String>,
    pub logged: bool,
    /// Unix seconds.
    pub started_at: i64,
    /// As of the last renewal.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Unix seconds: the row counts until then.
    pub lease_until: i64,
}

/// A request, written by one gateway, that the gateway carrying a session end it
/// (`postern sessions terminate` for a session elsewhere in the cluster).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TerminateRequest {
    pub id: String,
    pub session_id: String,
    /// The gateway asked to act (the session's).
    pub gateway_id: String,
    /// The administrator who asked.
    pub actor: String,
    /// The gateway they asked at.
    pub asked_by: String,
    pub created_at: i64,
    /// Unix seconds: not acted on after this.
    pub expires_at: i64,
    /// One of the `TERMINATE_*` states.
    pub state: String,
}

/// Waiting for the session's gateway.
pub const TERMINATE_PENDING: &str = "pending";
/// Taken by the session's gateway, which is ending the session.
pub const TERMINATE_CLAIMED: &str = "claimed";
/// The session was asked to end.
pub const TERMINATE_DONE: &str = "terminated";
/// The session was not live (any more) at its gateway.
pub const TERMINATE_NOT_LIVE: &str = "not-live";
/// The asking gateway gave up waiting; the request is not acted on any more.
pub const TERMINATE_WITHDRAWN: &str = "withdrawn";

/// The instance `wanted` names: an agent id, or a name that only one agent has.
pub fn resolve_instance<'a>(agents: &'a [AgentRecord], wanted: &str) -> Result<&'a AgentRecord, String> {
    if let Some(a) = agents.iter().find(|a| a.id == wanted) {
        return Ok(a);
    }
    let matches: Vec<&AgentRecord> = agents.iter().filter(|a| a.name == wanted).collect();
    match matches.as_slice() {
        [one] => Ok(one),
        // Every agent given may be named: callers pass only what their user may see (the
        // admin socket: all; a user's refusal never comes from here).
        [] => match crate::util::near_miss(wanted, agents.iter().map(|a| a.name.as_str())) {
            Some(near) => Err(format!("no instance named {wanted:?}; did you mean {near}? (see `postern instances`)")),
            None => Err(format!("no instance named {wanted:?}; see `postern instances`")),
        },
        _ => Err(format!("{wanted:?} names several instances; use the instance id")),
    }
}

#[async_trait]
pub trait Store: PortableStore + SignInStore + Send + Sync + 'static {
    /// Atomically spend the token `hash` and create the agent it enrolls. A token is
    /// redeemed at most once, even under concurrent attempts.
    async fn redeem_token(&self, hash: &str, agent: &NewAgent) -> Result<Result<AgentRecord, RedeemError>, StoreError>;

    /// Spend the unused token whose id (hash prefix) is `id` without enrolling anything;
    /// false if there is none (unknown, used or already revoked).
    async fn revoke_token(&self, id: &str, now: i64, by: &str) -> Result<bool, StoreError>;

    /// Agents that are not revoked whose id or name is `wanted` (one indexed lookup).
    async fn find_agents(&self, wanted: &str) -> Result<Vec<AgentRecord>, StoreError>;

    /// Insert or replace the user `user.name`.
    async fn put_user(&self, user: &UserRecord) -> Result<(), StoreError>;

    /// Store a new version (or a removal when `source` is empty); returns its number.
    async fn put_policy(&self, name: &str, source: &str, file: &str, now: i64, by: &str) -> Result<i64, StoreError>;

    async fn put_grant(&self, grant: &GrantRecord) -> Result<(), StoreError>;

    /// Add a session to the history; a row with its id already there is left as it is.
    async fn insert_session(&self, session: &SessionRecord) -> Result<(), StoreError>;

    /// The sessions `query` selects, newest first, at most `query.limit`.
    async fn sessions(&self, query: &SessionQuery) -> Result<Vec<SessionRecord>, StoreError>;

    /// Retention: delete sessions that ended (or, unfinished, started) before `cutoff` (Unix
    /// seconds), then
    /// the oldest beyond the newest `keep_rows`. Returns how many rows were deleted.
    async fn prune_sessions(&self, cutoff: Option<i64>, keep_rows: Option<u64>) -> Result<u64, StoreError>;

    /// Cluster sessions: insert or refresh these live-session rows (new ones, bytes and
    /// lease of existing ones) in one statement.
    async fn put_live_sessions(&self, sessions: &[LiveSessionRecord]) -> Result<(), StoreError>;

    /// Delete the live-session rows `ids` of gateway `gateway_id` (sessions that ended).
    async fn remove_live_sessions(&self, gateway_id: &str, ids: &[String]) -> Result<(), StoreError>;

    /// Live sessions of every gateway whose lease runs past `now`, newest first, at most `limit`.
    async fn live_sessions(&self, now: i64, limit: u32) -> Result<Vec<LiveSessionRecord>, StoreError>;

    /// Move request `id` from state `from` to `to`; false when it was not in `from` (someone
    /// else moved it first). From pending to claimed only while unexpired at `now`.
    async fn move_terminate_request(&self, id: &str, from: &str, to: &str, now: i64) -> Result<bool, StoreError>;

    /// Spend RDP routing token `token_id` (valid until `expires_at`): true for the one caller
    /// that spends it first, across every gateway sharing the store.
    async fn spend_rdp_token(&self, token_id: &str, expires_at: i64) -> Result<bool, StoreError>;

    /// Renew, in one statement, the leases of `agents` (id, connected since) at `gateway_id`
    /// until `lease_expires`: this gateway's rows are extended, missing rows are added, a row
    /// that names another gateway is left alone. Returns how many rows were written.
    async fn renew_agent_locations(
        &self,
        gateway_id: &str,
        agents: &[(String, i64)],
        lease_expires: i64,
    ) -> Result<u64, StoreError>;
}

/// The part of the store whose SQL is the same on SQLite and PostgreSQL (implemented once
/// for both, gateway/src/store/sqlite.rs `portable_store!`). Part of [`Store`].
#[async_trait]
pub trait PortableStore {
    async fn create_token(&self, token: &NewToken) -> Result<(), StoreError>;

    /// Every enrollment token, newest first.
    async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;

    async fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError>;

    /// All agents that are not revoked.
    async fn agents(&self) -> Result<Vec<AgentRecord>, StoreError>;

    /// Record what a connecting agent reported, and when it was last seen.
    async fn agent_seen(
        &self,
        id: &str,
        hostname: Option<&str>,
        platform: Option<&str>,
        version: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError>;

    async fn revoke_agent(&self, id: &str) -> Result<bool, StoreError>;

    /// Test-mode bulk enrollment for load tests: create agents without tokens.
    async fn insert_agents(&self, agents: &[(String, String)], labels: &Labels, now: i64) -> Result<(), StoreError>;

    async fn users(&self) -> Result<Vec<UserRecord>, StoreError>;

    async fn delete_user(&self, name: &str) -> Result<bool, StoreError>;

    /// The newest version of every policy that is not removed.
    async fn policies(&self) -> Result<Vec<PolicyVersion>, StoreError>;

    /// Every version of `name`, oldest first.
    async fn policy_history(&self, name: &str) -> Result<Vec<PolicyVersion>, StoreError>;

    async fn grants(&self) -> Result<Vec<GrantRecord>, StoreError>;

    /// Mark a grant revoked; false if it was unknown or already revoked.
    async fn revoke_grant(&self, id: &str, now: i64, by: &str) -> Result<bool, StoreError>;

    /// A number that moves (up) with every committed change to users, policies or grants,
    /// from any gateway sharing the store; bumped in the same transaction as the change.
    /// Gateways poll it and reload their copy of access state when it moved.
    async fn access_generation(&self) -> Result<i64, StoreError>;

    /// The audit anchor: the last signed checkpoint the gateway wrote (None: none yet).
    async fn audit_anchor(&self) -> Result<Option<AuditAnchor>, StoreError>;

    /// Record a new audit anchor (replacing the old one).
    async fn set_audit_anchor(&self, anchor: &AuditAnchor) -> Result<(), StoreError>;

    /// Complete a session's row; false when there is no row with its id.
    async fn end_session(&self, ending: &SessionEnding) -> Result<bool, StoreError>;

    /// Sessions whose id starts with `prefix` (at most `limit`, newest first). `prefix`
    /// holds only hex digits and '-' (callers check), so it has no pattern characters.
    async fn sessions_by_prefix(&self, prefix: &str, limit: u32) -> Result<Vec<SessionRecord>, StoreError>;

    /// Record a terminate request (its `state` is pending).
    async fn add_terminate_request(&self, request: &TerminateRequest) -> Result<(), StoreError>;

    /// Pending, unexpired requests for gateway `gateway_id`, oldest first, at most `limit`.
    async fn pending_terminate_requests(
        &self,
        gateway_id: &str,
        now: i64,
        limit: u32,
    ) -> Result<Vec<TerminateRequest>, StoreError>;

    async fn terminate_request(&self, id: &str) -> Result<Option<TerminateRequest>, StoreError>;

    /// Delete what has run out by `now`: expired live-session rows, old terminate requests,
    /// spent RDP tokens well past their expiry. Returns how many rows were deleted.
    async fn prune_cluster_sessions(&self, now: i64) -> Result<u64, StoreError>;

    /// The cluster's keys, each sealed with the cluster master key: (name, sealed bytes).
    async fn cluster_keys(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Add the cluster key `name` unless one by that name is already there (then false: keys
    /// are never replaced, so two `postern cluster init` at once keep one set).
    async fn add_cluster_key(&self, name: &str, sealed: &[u8], now: i64) -> Result<bool, StoreError>;

    /// Gateway `id` of a cluster is alive and other gateways reach it at `address`
    /// (`host:port` of its tunnel listener) until `lease_until` (Unix seconds).
    async fn gateway_alive(&self, id: &str, address: &str, lease_until: i64) -> Result<(), StoreError>;

    /// The gateways whose lease has not run out at `now`: (id, address), by id.
    async fn live_gateways(&self, now: i64) -> Result<Vec<(String, String)>, StoreError>;

    /// Gateway `id` stopped: its lease ends now.
    async fn gateway_left(&self, id: &str, now: i64) -> Result<(), StoreError>;

    // Agent locations (cluster mode, docs/scale-out.md): one row per agent, naming the
    // gateway it is connected to, under a lease that gateway renews. Times are Unix ms.

    /// Agent `location.agent_id` connected to `location.gateway_id`: its row becomes this one,
    /// whichever gateway held it before (the agent has moved here).
    async fn record_agent_location(&self, location: &AgentLocation) -> Result<(), StoreError>;

    /// Delete the agent's row only if it still names `gateway_id` (an agent that moved to
    /// another gateway keeps its new row); true when a row was deleted.
    async fn remove_agent_location(&self, agent_id: &str, gateway_id: &str) -> Result<bool, StoreError>;

    /// Every location whose lease has not expired at `now` (expired ones are not live).
    async fn agent_locations(&self, now: i64) -> Result<Vec<AgentLocation>, StoreError>;

    /// Where `agent_id` is, if its lease has not expired at `now`.
    async fn agent_location(&self, agent_id: &str, now: i64) -> Result<Option<AgentLocation>, StoreError>;

    /// The audit anchor of gateway `gateway_id` of a cluster, with its checkpoint key. Each
    /// gateway of a cluster keeps its own chain, so its own anchor; a single gateway (no
    /// `[cluster] gateway_id`) keeps its one in [`Store::audit_anchor`].
    async fn gateway_audit_anchor(&self, gateway_id: &str) -> Result<Option<GatewayAnchor>, StoreError>;

    /// Record gateway `gateway_id`'s new anchor (replacing its old one; other gateways' stay).
    async fn set_gateway_audit_anchor(&self, gateway_id: &str, anchor: &GatewayAnchor) -> Result<(), StoreError>;

    /// Every cluster gateway's anchor, by gateway id (sorted).
    async fn gateway_audit_anchors(&self) -> Result<Vec<(String, GatewayAnchor)>, StoreError>;
}

/// Single sign-on's part of the store: users from the identity provider and the
/// certificates the gateway signs. Both stores implement it with the same SQL.
#[async_trait]
pub trait SignInStore {
    /// A user signing in through the identity provider as `name`, IdP identity `subject`,
    /// in `groups`: created when new, groups replaced when it is that same identity; a user
    /// of that name who is not from the IdP is taken over only with `link_existing`. One
    /// statement, so two gateways logging the same person in at once agree.
    async fn login_user(
        &self,
        name: &str,
        subject: &str,
        groups: &[String],
        link_existing: bool,
        now: i64,
    ) -> Result<LoginUser, StoreError>;

    /// Keep a certificate the gateway issued (until it expires).
    async fn record_certificate(&self, cert: &CertificateRecord) -> Result<(), StoreError>;

    /// Revoke `user`'s certificates that have not expired at `now` (only `serial`, when
    /// given). Returns how many were revoked now (already revoked ones are not counted).
    async fn revoke_certificates(&self, user: &str, serial: Option<u64>, now: i64) -> Result<u64, StoreError>;

    /// Certificates not expired at `now`, revoked or not, of `user` or everyone, newest first.
    async fn certificates(&self, user: Option<&str>, now: i64) -> Result<Vec<CertificateRecord>, StoreError>;

    /// Forget certificates that expired before `before`; returns how many.
    async fn prune_certificates(&self, before: i64) -> Result<u64, StoreError>;
}

/// Which gateway an agent is connected to, as the store keeps it (cluster mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentLocation {
    pub agent_id: String,
    pub gateway_id: String,
    /// When this connection began (Unix ms).
    pub connected_since: i64,
    /// The row stops counting at this time (Unix ms) unless its gateway renews it.
    pub lease_expires: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, name: &str) -> AgentRecord {
        AgentRecord {
            id: id.into(),
            name: name.into(),
            labels: Labels::new(),
            hostname: String::new(),
            platform: String::new(),
            agent_version: String::new(),
            enrolled_at: 0,
            last_seen: None,
            revoked: false,
        }
    }

    #[test]
    fn instances_resolve_by_id_or_by_a_unique_name() {
        let agents = [agent("ag-1", "web-01"), agent("ag-2", "db"), agent("ag-3", "db")];
        assert_eq!(resolve_instance(&agents, "web-01").unwrap().id, "ag-1");
        assert_eq!(resolve_instance(&agents, "ag-3").unwrap().id, "ag-3");
        assert!(resolve_instance(&agents, "db").unwrap_err().contains("several instances"));
        assert!(resolve_instance(&agents, "web-02").unwrap_err().contains("no instance named"));
    }
}
