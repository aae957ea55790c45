//! Admin operations on users, groups, policies, grants and sessions, as the admin socket runs
//! them. Each change is stored, audited with the acting admin, reloaded into the policy engine
//! and followed by a re-check of live sessions.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::access::parse_key;
use std::sync::Arc;

use tokio::sync::Notify;

use crate::access::AccessList;
use crate::audit::AuditLog;
use crate::audit::events::{
    AdminAction, Event, GrantCreated, GrantRevoked, PolicyChange, PolicyChanged, SessionTerminated,
};
use crate::audit::ship::Shipper;
use crate::cluster_sessions::{ClusterSessions, RemoteTerminateError};
use crate::history::{HistoryError, HistoryRow, SessionHistory};
use crate::sessions::SessionTable;
use crate::store::{GrantRecord, UserRecord};
use crate::store::{Store, StoreError};
use postern_core::policy::Target;
use postern_core::util::valid_name;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "what", rename_all = "snake_case", deny_unknown_fields)]
pub enum ManageRequest {
    UserAdd {
        name: String,
        groups: Vec<String>,
        keys: Vec<String>,
        principals: Vec<String>,
    },
    UserRm {
        name: String,
    },
    UserList,
    UserSetDisabled {
        name: String,
        disabled: bool,
    },
    UserKeyAdd {
        name: String,
        key: String,
    },
    UserKeyRm {
        name: String,
        fingerprint: String,
    },
    UserSetGroups {
        name: String,
        groups: Vec<String>,
    },
    /// A short-lived user certificate from the gateway's user CA for `key`, naming `name`.
    UserCert {
        name: String,
        key: String,
        /// Validity in seconds (default `[identity] cert_ttl`; at most 7 days).
        #[serde(default)]
        ttl_secs: Option<u64>,
    },
    GroupList,
    PolicyApply {
        file: String,
        source: String,
    },
    PolicyList,
    PolicyHistory {
        name: String,
    },
    PolicyRm {
        name: String,
    },
    GrantCreate {
        user: String,
        policy: String,
        ttl_secs: u64,
        reason: String,
    },
    GrantList {
        all: bool,
    },
    GrantRevoke {
        id: Option<String>,
        user: Option<String>,
        policy: Option<String>,
    },
    Explain {
        user: String,
        target: String,
        action: String,
        at: Option<String>,
        from: Option<IpAddr>,
        to: Option<String>,
        /// Decide as for a login with a second factor (`require_mfa` statements apply).
        #[serde(default)]
        mfa: bool,
    },
    Sessions {
        all: bool,
        /// With `all`: which sessions of the history, and which page.
        #[serde(default)]
        filter: crate::history::SessionFilter,
    },
    SessionTerminate {
        id: String,
    },
}

impl ManageRequest {
    /// Whether the request changes state (and so is audited with its arguments).
    fn changes(&self) -> bool {
        !matches!(
            self,
            ManageRequest::UserList
                | ManageRequest::GroupList
                | ManageRequest::PolicyList
                | ManageRequest::PolicyHistory { .. }
                | ManageRequest::GrantList { .. }
                | ManageRequest::Explain { .. }
                | ManageRequest::Sessions { .. }
        )
    }

    fn name(&self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.get("what").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_default()
    }
}

/// What admin operations change and read.
pub struct Manage {
    store: Arc<dyn Store>,
    access: Arc<AccessList>,
    audit: Arc<AuditLog>,
    sessions: Arc<SessionTable>,
    history: Arc<SessionHistory>,
    access_changed: Arc<Notify>,
    /// Held while a user's keys change, so that two requests cannot bind one key to two
    /// users between the check and the write.
    key_writes: tokio::sync::Mutex<()>,
    /// The object store recordings are copied to, if any.
    shipper: Option<Arc<Shipper>>,
    /// With `[cluster]`: the live sessions of every gateway.
    cluster: Option<Arc<ClusterSessions>>,
    /// Signs `user cert` certificates; revokes certificates (`revoke --user`, `user disable`).
    certifier: Option<crate::certs::Certifier>,
}

impl Manage {
    pub fn new(
        store: Arc<dyn Store>,
        access: Arc<AccessList>,
        audit: Arc<AuditLog>,
        sessions: Arc<SessionTable>,
        history: Arc<SessionHistory>,
        access_changed: Arc<Notify>,
    ) -> Self {
        Manage {
            store,
            access,
            audit,
            sessions,
            history,
            access_changed,
            key_writes: tokio::sync::Mutex::new(()),
            shipper: None,
            cluster: None,
            certifier: None,
        }
    }

    /// `user cert` signs with this; `revoke --user` and `user disable` revoke through it.
    pub fn with_certifier(mut self, certifier: crate::certs::Certifier) -> Self {
        self.certifier = Some(certifier);
        self
    }

    /// With `[cluster]`: `sessions` lists every gateway's live sessions and `sessions
    /// terminate` reaches them.
    pub fn with_cluster(mut self, cluster: Option<Arc<ClusterSessions>>) -> Self {
        self.cluster = cluster;
        self
    }

    /// With `[audit.s3]`: history listings say which recordings are in the object store.
    pub fn with_shipper(mut self, shipper: Option<Arc<Shipper>>) -> Self {
        self.shipper = shipper;
        self
    }
}

/// How long a history listing waits for queued writes, so that it shows the sessions that
/// ended before it was asked for.
const LIST_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// Why an admin operation was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    /// Not possible as asked (a bad name, an unknown user, an invalid policy, ...); the
    /// message says what to change.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Random(#[from] postern_core::util::RandomError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<HistoryError> for ManageError {
    fn from(e: HistoryError) -> Self {
        match e {
            HistoryError::Invalid(m) => ManageError::Invalid(m),
            HistoryError::Store(e) => ManageError::Store(e),
        }
    }
}

fn bad(msg: impl Into<String>) -> ManageError {
    ManageError::Invalid(msg.into())
}

fn check_name(kind: &str, name: &str) -> Result<(), ManageError> {
    if valid_name(name) { Ok(()) } else { Err(bad(format!("{kind} {name:?}: use letters, digits, '-' and '_'"))) }
}

fn normalize_key(line: &str) -> Result<String, ManageError> {
    let key = parse_key(line).map_err(bad)?;
    key.to_openssh().map_err(|e| bad(format!("cannot encode key: {e}")))
}

/// The built-in policy of the config users' statements.
const CONFIG_POLICY: &str = "config";

fn fingerprint(line: &str) -> String {
    parse_key(line).map(|k| k.fingerprint(Default::default()).to_string()).unwrap_or_else(|_| "?".into())
}

/// A public key names one person: refuse `keys` (normalized) when one is already bound to
/// a user other than `name`, in the store or in the gateway config.
async fn check_keys_unbound(state: &Manage, name: &str, keys: &[String]) -> Result<(), ManageError> {
    let users = state.store.users().await?;
    for key in keys {
        let blob = key.split_whitespace().nth(1);
        let stored =
            users.iter().find(|u| u.name != name && u.keys.iter().any(|k| k.split_whitespace().nth(1) == blob));
        let owner = match stored {
            Some(u) => Some(u.name.clone()),
            None => parse_key(key).ok().and_then(|k| state.access.configured_key_owner(&k)).filter(|o| o != name),
        };
        if let Some(owner) = owner {
            return Err(bad(format!(
                "key {} is already bound to user {owner:?}: a key names one person; remove it there first \
                 (postern user key rm {owner} FINGERPRINT) or give {name} a key of their own",
                fingerprint(key)
            )));
        }
    }
    Ok(())
}

/// A user as listed: keys shown by fingerprint.
fn user_view(u: &UserRecord) -> Value {
    json!({"name": u.name, "groups": u.groups, "principals": u.principals, "disabled": u.disabled,
           "created_at": u.created_at,
           "keys": u.keys.iter().map(|k| json!({"fingerprint": fingerprint(k),
                "comment": k.split_whitespace().nth(2).unwrap_or("")})).collect::<Vec<_>>()})
}

async fn user(state: &Manage, name: &str) -> Result<UserRecord, ManageError> {
    state
        .store
        .users()
        .await?
        .into_iter()
        .find(|u| u.name == name)
        .ok_or_else(|| bad(format!("no user {name:?}; see `postern user list`")))
}

/// Reload the policy engine from the store and re-check live sessions now.
async fn changed(state: &Manage) -> Result<(), ManageError> {
    state.access.reload(state.store.as_ref()).await?;
    state.access_changed.notify_one();
    Ok(())
}

pub async fn run(state: &Manage, req: ManageRequest, actor: &str) -> Result<Value, ManageError> {
    let op = req.name();
    let audit_args = serde_json::to_value(&req).unwrap_or(Value::Null);
    let result = run_inner(state, req.clone(), actor).await;
    // Every admin action is an audit event; changes carry their arguments (keys as
    // fingerprints), reads only their name.
    let mut event =
        AdminAction { actor: actor.to_owned(), op: op.to_owned(), ok: Some(result.is_ok()), args: None, error: None };
    if req.changes() {
        let mut args = audit_args;
        if let Some(obj) = args.as_object_mut() {
            obj.remove("what");
            if let Some(keys) = obj.get_mut("keys").and_then(Value::as_array_mut) {
                for k in keys.iter_mut() {
                    *k = json!(fingerprint(k.as_str().unwrap_or("")));
                }
            }
            if let Some(k) = obj.get_mut("key") {
                *k = json!(fingerprint(k.as_str().unwrap_or("")));
            }
            obj.remove("source");
        }
        // What the gateway chose for a certificate it issued: its serial and end.
        if let (Ok(v), Some(obj)) = (&result, args.as_object_mut())
            && let Some(serial) = v.get("serial")
        {
            obj.insert("serial".into(), serial.clone());
            obj.insert("valid_before".into(), v.get("valid_before").cloned().unwrap_or_default());
        }
        event.args = Some(args);
    }
    if let Err(e) = &result {
        event.error = Some(format!("{e:#}"));
    }
    let _ = state.audit.event(&Event::AdminAction(event));
    result
}

async fn run_inner(state: &Manage, req: ManageRequest, actor: &str) -> Result<Value, ManageError> {
    let now = postern_core::util::now_unix();
    match req {
        ManageRequest::UserAdd { name, groups, keys, principals } => {
            check_name("user", &name)?;
            for g in &groups {
                check_name("group", g)?;
            }
            if state.store.users().await?.iter().any(|u| u.name == name) {
                return Err(bad(format!("user {name:?} already exists")));
            }
            let keys = keys.iter().map(|k| normalize_key(k)).collect::<Result<Vec<_>, ManageError>>()?;
            let _writing = state.key_writes.lock().await;
            check_keys_unbound(state, &name, &keys).await?;
            let u = UserRecord { name, groups, keys, principals, disabled: false, created_at: now, idp_subject: None };
            state.store.put_user(&u).await?;
            changed(state).await?;
            Ok(user_view(&u))
        }
        ManageRequest::UserRm { name } => {
            if !state.store.delete_user(&name).await? {
                return Err(bad(format!("no user {name:?}")));
            }
            changed(state).await?;
            Ok(json!({"removed": name}))
        }
        ManageRequest::UserList => {
            let mut users: Vec<Value> = state.store.users().await?.iter().map(user_view).collect();
            // Users of the gateway config (and quickstart's) too, marked read-only.
            for u in state.access.config_users() {
                if users.iter().any(|x| x["name"] == u.name.as_str()) {
                    continue;
                }
                users.push(json!({"name": u.name, "groups": [], "principals": [], "disabled": false,
                    "created_at": null, "source": "config", "read_only": true,
                    "keys": u.keys.iter().map(|k| json!({"fingerprint": k.fingerprint(Default::default()).to_string(),
                        "comment": k.comment().to_string()})).collect::<Vec<_>>()}));
            }
            Ok(Value::Array(users))
        }
        ManageRequest::UserSetDisabled { name, disabled } => {
            let mut u = user(state, &name).await?;
            u.disabled = disabled;
            state.store.put_user(&u).await?;
            // Certificates issued before the disable stay refused after an enable.
            if disabled && let Some(certifier) = &state.certifier {
                certifier.revoke(&name, None).await?;
            }
            changed(state).await?;
            Ok(user_view(&u))
        }
        ManageRequest::UserKeyAdd { name, key } => {
            let _writing = state.key_writes.lock().await;
            let mut u = user(state, &name).await?;
            let key = normalize_key(&key)?;
            check_keys_unbound(state, &name, std::slice::from_ref(&key)).await?;
            if !u.keys.iter().any(|k| k.split_whitespace().nth(1) == key.split_whitespace().nth(1)) {
                u.keys.push(key);
            }
            state.store.put_user(&u).await?;
            changed(state).await?;
            Ok(user_view(&u))
        }
        ManageRequest::UserCert { name, key, ttl_secs } => {
            let Some(certifier) = &state.certifier else {
                return Err(bad("this gateway has no user CA"));
            };
            let u = user(state, &name).await?;
            if u.disabled {
                return Err(bad(format!("user {name:?} is disabled; `postern user enable {name}` first")));
            }
            let key = parse_key(&key).map_err(bad)?;
            let ttl = ttl_secs.map(std::time::Duration::from_secs);
            let issued = certifier.issue(&name, &key, ttl, None).await.map_err(|e| match e {
                crate::certs::CertError::Store(e) => ManageError::from(e),
                other => bad(other.to_string()),
            })?;
            let certificate =
                issued.certificate.to_openssh().map_err(|e| bad(format!("cannot encode the certificate: {e}")))?;
            Ok(json!({
                "user": name,
                "certificate": certificate,
                "serial": issued.serial,
                "valid_before": issued.valid_before,
                "key": key.fingerprint(Default::default()).to_string(),
            }))
        }
        ManageRequest::UserKeyRm { name, fingerprint: fp } => {
            let mut u = user(state, &name).await?;
            let before = u.keys.len();
            u.keys.retain(|k| fingerprint(k) != fp);
            if u.keys.len() == before {
                return Err(bad(format!("user {name:?} has no key {fp}")));
            }
            state.store.put_user(&u).await?;
            changed(state).await?;
            Ok(user_view(&u))
        }
        ManageRequest::UserSetGroups { name, groups } => {
            for g in &groups {
                check_name("group", g)?;
            }
            let mut u = user(state, &name).await?;
            u.groups = groups;
            state.store.put_user(&u).await?;
            changed(state).await?;
            Ok(user_view(&u))
        }
        ManageRequest::GroupList => {
            let mut groups: std::collections::BTreeMap<String, Vec<String>> = Default::default();
            for u in state.store.users().await? {
                for g in u.groups {
                    groups.entry(g).or_default().push(u.name.clone());
                }
            }
            Ok(json!(groups.into_iter().map(|(g, m)| json!({"group": g, "members": m})).collect::<Vec<_>>()))
        }
        ManageRequest::PolicyApply { file, source } => {
            // Invalid documents are refused whole; the policy in force stays as it was.
            let doc = postern_core::policy::document::parse(&file, &source).map_err(bad)?;
            if doc.name == "config" {
                return Err(bad(format!("{file}: the name \"config\" is reserved for [[ssh.users]]")));
            }
            let previous = state.store.policy_history(&doc.name).await?.pop();
            if previous.as_ref().is_some_and(|p| p.source == source) {
                return Ok(json!({"name": doc.name, "version": previous.map(|p| p.version), "unchanged": true}));
            }
            let version = state.store.put_policy(&doc.name, &source, &file, now, actor).await?;
            changed(state).await?;
            let _ = state.audit.event(&Event::PolicyChanged(PolicyChanged {
                actor: actor.to_owned(),
                policy: doc.name.clone(),
                version,
                change: PolicyChange::Applied {
                    file: file.clone(),
                    statements: u64::try_from(doc.statements.len()).unwrap_or(u64::MAX),
                    diff: postern_core::util::line_diff(
                        previous.as_ref().map(|p| p.source.as_str()).unwrap_or(""),
                        &source,
                    ),
                },
            }));
            Ok(json!({"name": doc.name, "version": version, "statements": doc.statements.len(), "unchanged": false}))
        }
        ManageRequest::PolicyList => {
            // The built-in `config` policy first (read-only), then the stored ones.
            let mut list = vec![json!({"name": CONFIG_POLICY, "version": null, "file": "gateway config",
                "applied_at": null, "applied_by": null, "source": "config", "read_only": true})];
            list.extend(state.store.policies().await?.into_iter().map(|p| {
                json!({"name": p.name, "version": p.version, "file": p.file,
                       "applied_at": p.applied_at, "applied_by": p.applied_by, "source": "store", "read_only": false})
            }));
            Ok(json!(list))
        }
        ManageRequest::PolicyHistory { name } if name == CONFIG_POLICY => Ok(json!([{
            "name": CONFIG_POLICY, "version": 1, "file": "gateway config", "source": state.access.config_policy_source(),
            "applied_at": null, "applied_by": null, "removed": false, "read_only": true,
        }])),
        ManageRequest::PolicyHistory { name } => {
            let h = state.store.policy_history(&name).await?;
            if h.is_empty() {
                return Err(bad(format!("no policy {name:?}; see `postern policy list`")));
            }
            Ok(json!(h))
        }
        ManageRequest::PolicyRm { name } => {
            if !state.store.policies().await?.iter().any(|p| p.name == name) {
                return Err(bad(format!("no policy {name:?}")));
            }
            let version = state.store.put_policy(&name, "", "", now, actor).await?;
            changed(state).await?;
            let _ = state.audit.event(&Event::PolicyChanged(PolicyChanged {
                actor: actor.to_owned(),
                policy: name.clone(),
                version,
                change: PolicyChange::Removed { removed: true },
            }));
            Ok(json!({"name": name, "version": version, "removed": true}))
        }
        ManageRequest::GrantCreate { user: name, policy, ttl_secs, reason } => {
            user(state, &name).await?;
            if !state.access.has_policy(&policy) {
                return Err(bad(format!("no policy {policy:?} (or it has no statements); see `postern policy list`")));
            }
            if ttl_secs == 0 || ttl_secs > 366 * 86400 {
                return Err(bad("--for must be between 1s and 366d"));
            }
            if reason.trim().is_empty() {
                return Err(bad("give a --reason; it goes into the audit log"));
            }
            let grant = GrantRecord {
                id: format!("gr-{}", postern_core::util::random_hex(6)?),
                user: name,
                policy,
                reason,
                created_at: now,
                created_by: actor.to_owned(),
                expires_at: now.saturating_add(i64::try_from(ttl_secs).unwrap_or(i64::MAX)),
                revoked_at: None,
                revoked_by: None,
            };
            state.store.put_grant(&grant).await?;
            changed(state).await?;
            let _ = state.audit.event(&Event::GrantCreated(GrantCreated {
                actor: actor.to_owned(),
                grant_id: grant.id.clone(),
                user: grant.user.clone(),
                policy: grant.policy.clone(),
                expires_at: grant.expires_at,
                reason: grant.reason.clone(),
            }));
            Ok(json!(grant))
        }
        ManageRequest::GrantList { all } => {
            // Each with its state at `now`: active, expired or revoked.
            let grants: Vec<Value> = state
                .store
                .grants()
                .await?
                .into_iter()
                .filter(|g| all || g.active_at(now))
                .map(|g| {
                    let state = grant_state(&g, now);
                    let mut v = json!(g);
                    if let Some(o) = v.as_object_mut() {
                        o.insert("state".to_owned(), json!(state));
                    }
                    v
                })
                .collect();
            Ok(json!(grants))
        }
        ManageRequest::GrantRevoke { id, user: who, policy } => {
            if id.is_none() && who.is_none() {
                return Err(bad("name a grant id or --user"));
            }
            // `revoke --user NAME` also takes back the user's unexpired certificates.
            let mut certificates = 0;
            if let (Some(name), None, None, Some(certifier)) = (&who, &id, &policy, &state.certifier) {
                certificates = certifier.revoke(name, None).await?;
            }
            let mut revoked = Vec::new();
            for g in state.store.grants().await? {
                let hit = g.active_at(now)
                    && id.as_ref().is_none_or(|i| *i == g.id)
                    && who.as_ref().is_none_or(|u| *u == g.user)
                    && policy.as_ref().is_none_or(|p| *p == g.policy);
                if hit && state.store.revoke_grant(&g.id, now, actor).await? {
                    let _ = state.audit.event(&Event::GrantRevoked(GrantRevoked {
                        actor: actor.to_owned(),
                        grant_id: g.id.clone(),
                        user: g.user.clone(),
                        policy: g.policy.clone(),
                    }));
                    revoked.push(g.id);
                }
            }
            if revoked.is_empty() && certificates == 0 {
                return Err(bad(if who.is_some() && id.is_none() && policy.is_none() {
                    "no active grant or unexpired certificate matches"
                } else {
                    "no active grant matches"
                }));
            }
            changed(state).await?;
            Ok(json!({"revoked": revoked, "certificates_revoked": certificates}))
        }
        ManageRequest::Explain { user: name, target, action, at, from, to, mfa } => {
            let at = match at {
                Some(t) => parse_time(&t)?,
                None => jiff::Timestamp::now(),
            };
            if !postern_core::policy::document::ACTIONS.contains(&action.as_str()) {
                return Err(bad(format!("unknown action {action:?}")));
            }
            let destination = match &to {
                Some(d) => {
                    let (h, p) = d.rsplit_once(':').ok_or_else(|| bad("--to: expected HOST:PORT"))?;
                    Some((h.trim_matches(['[', ']']).to_owned(), p.parse::<u16>().map_err(|_| bad("--to: bad port"))?))
                }
                None if action == "port-forward" => Some(("127.0.0.1".to_owned(), 80)),
                None if action == "ssh-passthrough" => Some(("127.0.0.1".to_owned(), 22)),
                None => None,
            };
            // As the SSH door decides: passthrough reaches the instance's sshd and nothing else.
            if action == "ssh-passthrough" && destination.as_ref().is_some_and(|(_, p)| *p != 22) {
                return Err(bad(
                    "ssh-passthrough reaches only the instance's sshd (port 22); other ports are port-forward",
                ));
            }
            let agents = state.store.agents().await?;
            let agent = crate::store::resolve_instance(&agents, &target).map_err(bad)?;
            let who = postern_core::Identity {
                user: name.clone(),
                source: from,
                cert: mfa.then_some(postern_core::identity::CertFacts { serial: 0, mfa: true, valid_before: 0 }),
            };
            let d = state.access.decide(
                &who,
                Some(Target { id: &agent.id, name: &agent.name, labels: &agent.labels }),
                &action,
                destination.as_ref().map(|(h, p)| (h.as_str(), *p)),
                at,
                true,
            );
            // The OS logins shell, exec and sftp may choose (`ssh LOGIN@instance`), default first.
            let logins = (d.allowed && matches!(action.as_str(), "shell" | "exec" | "sftp"))
                .then(|| crate::access::usable_logins(&d.settings.run_as, d.settings.allow_root));
            let logins_text = logins.as_ref().map(|l| crate::access::describe_logins(l, &name));
            Ok(json!({"user": name, "user_active": state.access.user_active(&name), "target": agent.name,
                      "action": action, "at": at.to_string(), "from": from,
                      "logins": logins, "logins_text": logins_text,
                      "destination": destination.map(|(h, p)| format!("{h}:{p}")),
                      "summary": d.summary(), "decision": d}))
        }
        ManageRequest::Sessions { all: false, .. } => match &state.cluster {
            Some(cluster) => Ok(json!(cluster.rows().await?)),
            None => Ok(json!(state.sessions.rows())),
        },
        ManageRequest::Sessions { all: true, filter } => Ok(json!(history(state, &filter).await?)),
        ManageRequest::SessionTerminate { id } => {
            let reason = format!("terminated by {actor}");
            // The session.terminated event is written when the session has actually ended,
            // just before its end event (broker::Running::finish).
            let ended = state.sessions.terminate_with_event(&id, &reason, |s| {
                Event::SessionTerminated(SessionTerminated {
                    session_id: s.id.clone(),
                    user: s.party.user.clone(),
                    target: s.party.target.clone(),
                    kind: s.party.action,
                    actor: actor.to_owned(),
                    reason: reason.clone(),
                    from_gateway: None,
                })
            });
            if ended {
                return Ok(json!({"terminated": id}));
            }
            // Not here: with `[cluster]`, the gateway carrying it is asked (the admin socket
            // admitted the actor, as for a local terminate).
            let Some(cluster) = &state.cluster else {
                return Err(bad(format!("no live session {id:?}; see `postern sessions`")));
            };
            match cluster.terminate_elsewhere(&id, actor).await {
                Ok(gateway) => Ok(json!({"terminated": id, "gateway": gateway})),
                Err(RemoteTerminateError::Store(e)) => Err(ManageError::Store(e)),
                Err(RemoteTerminateError::Random(e)) => Err(ManageError::Random(e)),
                Err(e) => Err(bad(e.to_string())),
            }
        }
    }
}

/// A point in time for a history filter: an age ("2h", "7d": that long ago) or a time
/// (RFC 3339, or without an offset in UTC). Unix seconds.
pub fn parse_when(s: &str) -> Result<i64, String> {
    if let Ok(age) = crate::config::parse_duration(s) {
        let secs = i64::try_from(age.as_secs()).unwrap_or(i64::MAX);
        return Ok(postern_core::util::now_unix().saturating_sub(secs));
    }
    parse_time(s)
        .map(|t| t.as_second())
        .map_err(|_| format!("{s:?}: expected an age (2h, 7d) or a time like 2026-12-01T10:00Z"))
}

/// RFC 3339, or a date and time without offset in UTC (`2026-12-01 09:00`).
pub fn parse_time(s: &str) -> Result<jiff::Timestamp, ManageError> {
    if let Ok(t) = s.parse::<jiff::Timestamp>() {
        return Ok(t);
    }
    let civil: jiff::civil::DateTime =
        s.parse().map_err(|_| bad(format!("{s:?}: expected a time like 2026-12-01T09:00:00Z")))?;
    civil.to_zoned(jiff::tz::TimeZone::UTC).map(|z| z.timestamp()).map_err(|e| bad(e.to_string()))
}

/// A grant's state at `now`: `revoked` (whatever its expiry), else `active` or `expired`.
pub fn grant_state(g: &GrantRecord, now: i64) -> &'static str {
    match (g.revoked_at, g.active_at(now)) {
        (Some(_), _) => "revoked",
        (None, true) => "active",
        (None, false) => "expired",
    }
}

/// The session history `filter` selects, each row with its live byte counts (when it runs
/// here) and where its recording is now (`postern sessions --all`, the web console).
pub async fn history(state: &Manage, filter: &crate::history::SessionFilter) -> Result<Vec<HistoryRow>, ManageError> {
    let query = filter.query(state.store.as_ref()).await?;
    state.history.flush(LIST_FLUSH).await;
    let live: std::collections::HashMap<String, (u64, u64)> = state
        .sessions
        .live()
        .iter()
        .map(|s| {
            let load = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
            (s.id.clone(), (load(&s.bytes_in), load(&s.bytes_out)))
        })
        .collect();
    let now = postern_core::util::now_unix();
    Ok(state
        .store
        .sessions(&query)
        .await?
        .into_iter()
        .map(|r| {
            let counted = live.get(&r.id).copied();
            let mut row = HistoryRow::of(r, counted, now);
            row.locate_recording(state.shipper.as_deref());
            row
        })
        .collect())
}
