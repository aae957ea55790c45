//! Who may do what on which instance. Identities (users from the store, plus the
//! `[[ssh.users]]` of the gateway config and the one `quickstart` registers) and the policy
//! engine ([`postern_core::policy`]) meet here: every decision goes through [`Authorizer::authorize`],
//! and the only way to get an [`Authorization`] — which carries the resolved target and
//! destination the session code dials — is from it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use russh::keys::PublicKey;

use crate::config::{SshConfig, UserConfig};
use crate::sessions::{LiveSession, Party, Reservation, SessionTable};
use crate::store::{AgentRecord, GrantRecord, Store, StoreError, UserRecord, resolve_instance};
use postern_core::duration::{DurationError, parse_limit};
use postern_core::identity::CertFacts;
use postern_core::policy::document::{ActionPattern, Destination, HostPattern, Limit, Name, Statement};
use postern_core::policy::host::Host;
use postern_core::policy::{Decision, Document, Effect, PolicySet, Target};
use postern_core::{Action, DENIED, Identity, Limits, SESSION_ACTIONS};

/// Why a forward to a host with no canonical form (`[::1%1]`, `a b`, `08.1`) is refused.
pub const BAD_DESTINATION: &str = "that forward destination is not a valid host name or address";

/// A user defined in the gateway config (or by quickstart): keys only; what they may do is
/// a statement in the built-in `config` policy.
#[derive(Debug, Clone)]
struct StaticUser {
    name: String,
    keys: Vec<PublicKey>,
    /// Its statement in the `config` policy, as TOML (empty: it reaches no instance).
    statement: String,
}

/// The extension a certificate from `postern login` carries when the identity provider
/// reported a second factor for the login (only trusted on the gateway's own certificates).
pub const MFA_EXTENSION: &str = "mfa@postern";

/// A user from the gateway config (`[[ssh.users]]`, or quickstart's), as `user list` shows it.
#[derive(Debug, Clone)]
pub struct ConfigUser {
    pub name: String,
    pub keys: Vec<PublicKey>,
}

/// Users, groups, policies and grants from the store, as of the last reload.
#[derive(Debug, Default)]
struct Directory {
    users: HashMap<String, (UserRecord, Vec<PublicKey>)>,
    grants: Vec<GrantRecord>,
    policy: PolicySet,
    /// The store's access generation this copy was loaded at (None: never loaded).
    generation: Option<i64>,
    /// Serials of unexpired certificates of the gateway's own user CA that were revoked.
    revoked_certs: std::collections::HashSet<u64>,
}

#[derive(Debug, Default)]
pub struct AccessList {
    static_users: RwLock<Vec<StaticUser>>,
    /// Statements for `[[ssh.users]]`, the policy named `config`.
    config_statements: RwLock<Vec<Statement>>,
    store_documents: RwLock<Vec<(Document, String)>>,
    directory: RwLock<Arc<Directory>>,
    profiles: RwLock<Vec<postern_core::profile::Profile>>,
    user_cas: RwLock<Vec<russh::keys::ssh_key::public::KeyData>>,
    /// The gateway's own user CA (`postern login`, `postern user cert`): its certificates
    /// are checked against the revocation list and may carry login facts (MFA).
    own_user_ca: RwLock<Option<russh::keys::ssh_key::public::KeyData>>,
    defaults: RwLock<Limits>,
}

/// Why a live session may not go on ([`Authorizer::recheck`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disallowed {
    /// Policy no longer allows it; the reason.
    Revoked(String),
    /// Its `max_session` limit in force now is shorter than the one it started with, and the
    /// session is older than that.
    LimitShortened(std::time::Duration),
}

/// Permission for one action on one resolved instance. Only [`Authorizer::authorize`] creates
/// it; session code dials `agent_id()` (and `destination()` for forwards) and nothing else.
#[derive(Debug, Clone)]
pub struct Authorization {
    user: String,
    agent_id: String,
    instance: String,
    action: Action,
    /// In canonical form ([`Host`]), as the policy decided it and the agent dials it.
    destination: Option<(Host, u16)>,
    /// Address ranges the agent must not connect to, whatever a name resolves to.
    address_denies: Vec<ipnet::IpNet>,
    run_as: Option<String>,
    /// Whether a policy (or the profile) lets the session run as root; the agent refuses uid 0
    /// without it, also when no `run_as` is set and the agent itself runs as root.
    allow_root: bool,
    limits: Limits,
    profile: postern_core::profile::Profile,
    /// The user's concurrent-session slot, held until the session registers (or this
    /// authorization is dropped).
    reservation: Arc<Reservation>,
    /// The gateway-issued certificate the user came in with, if any.
    cert: Option<postern_core::identity::CertFacts>,
}

impl Authorization {
    /// The shell profile in force (an empty default when none applies).
    pub fn profile(&self) -> &postern_core::profile::Profile {
        &self.profile
    }
    pub fn limits(&self) -> Limits {
        self.limits
    }
    pub fn user(&self) -> &str {
        &self.user
    }
    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }
    pub fn instance(&self) -> &str {
        &self.instance
    }
    pub fn action(&self) -> Action {
        self.action
    }
    pub fn run_as(&self) -> Option<&str> {
        self.run_as.as_deref()
    }
    pub fn allow_root(&self) -> bool {
        self.allow_root
    }
    /// The serial of the gateway-issued certificate the user came in with.
    pub fn cert_serial(&self) -> Option<u64> {
        self.cert.map(|c| c.serial)
    }

    /// The party of this session from `source`, for the live table.
    pub fn party(&self, source: Option<IpAddr>, logged: bool) -> Party {
        Party {
            user: self.user.clone(),
            source,
            target: self.instance.clone(),
            agent_id: self.agent_id.clone(),
            action: self.action,
            destination: self.destination.as_ref().map(|(h, p)| (h.to_string(), *p)),
            logged,
            via_admin: false,
            reservation: Some(self.reservation.clone()),
            cert: self.cert,
            max_session: self.limits.max_session,
        }
    }

    /// For port forwards and passthrough: the host (canonical) and port the agent connects to.
    pub fn destination(&self) -> Option<(&Host, u16)> {
        self.destination.as_ref().map(|(h, p)| (h, *p))
    }

    /// For forwards to a name: the address ranges the policy denies on its port, which the
    /// agent checks every resolved address against.
    pub fn address_denies(&self) -> &[ipnet::IpNet] {
        &self.address_denies
    }
}

pub fn parse_key(line: &str) -> Result<PublicKey, String> {
    PublicKey::from_openssh(line.trim()).map_err(|e| format!("not an OpenSSH public key: {e}"))
}

/// The statement a `[[ssh.users]]` entry stands for.
fn config_statement(u: &UserConfig) -> Option<Statement> {
    if u.instances.is_empty() {
        return None;
    }
    let actions = u.actions.clone().unwrap_or_else(|| SESSION_ACTIONS.iter().map(|a| a.name().to_owned()).collect());
    Some(Statement {
        sid: Some(format!("ssh.users.{}", u.name)),
        effect: Effect::Allow,
        users: vec![Name(u.name.clone())],
        groups: Vec::new(),
        actions: actions.into_iter().map(ActionPattern).collect(),
        instances: u.instances.iter().cloned().map(Name).collect(),
        labels: Vec::new(),
        // Config users were only ever limited by the agent's own forward allow-list.
        forward_to: Some(vec![Destination { host: HostPattern::Any, ports: (1, u16::MAX) }]),
        not_before: None,
        not_after: None,
        schedule: Vec::new(),
        source: Vec::new(),
        require_mfa: false,
        run_as: u.run_as.iter().cloned().map(Name).collect(),
        allow_root: u.allow_root,
        profile: u.default_profile.clone().map(Name),
        profiles: u.profiles.iter().cloned().map(Name).collect(),
        idle_timeout: None,
        max_session: None,
        max_sessions: None,
    })
}

/// A config user's statement as policy TOML, for `postern policy show config` (read-only:
/// it comes from the gateway config, or `postern quickstart`).
fn config_statement_text(u: &UserConfig, st: &Statement) -> String {
    let list = |v: Vec<String>| v.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>().join(", ");
    let mut out = format!(
        "[[statement]]\nsid = {:?}\neffect = \"allow\"\nusers = [{:?}]\nactions = [{}]\ninstances = [{}]\nforward_to = [\"*:*\"]\n",
        st.sid.clone().unwrap_or_default(),
        u.name,
        list(st.actions.iter().map(|a| a.0.clone()).collect()),
        list(u.instances.clone()),
    );
    if let Some(r) = &u.run_as {
        out.push_str(&format!("run_as = [{r:?}]\n"));
    }
    if u.allow_root {
        out.push_str("allow_root = true\n");
    }
    for (k, v) in [("idle_timeout", &u.idle_timeout), ("max_session", &u.max_session)] {
        if let Some(v) = v {
            out.push_str(&format!("{k} = {v:?}\n"));
        }
    }
    out
}

/// What is wrong with the `[ssh]` users, user CAs or limits of the gateway config.
#[derive(Debug, thiserror::Error)]
pub enum AccessConfigError {
    #[error("[ssh] {field}: {source}")]
    Default { field: &'static str, source: DurationError },
    #[error("ssh.user_ca_keys: key {index} is not an OpenSSH public key: {reason}")]
    UserCaKey { index: usize, reason: String },
    #[error("ssh.users {user:?}: key {index}: {reason}")]
    UserKey { user: String, index: usize, reason: String },
    #[error("ssh.users {user:?}: unknown action {action:?}")]
    UnknownAction { user: String, action: String },
    #[error("ssh.users {user:?}: {field}: {source}")]
    Limit { user: String, field: &'static str, source: DurationError },
    #[error("ssh.users {user:?}: unknown profile {profile:?} (define it under [[ssh.profiles]])")]
    UnknownProfile { user: String, profile: String },
    #[error("ssh.users {user:?}: key {index} is already bound to user {owner:?} (a key names one person)")]
    KeyBound { user: String, index: usize, owner: String },
}

impl AccessList {
    pub fn from_config(cfg: &SshConfig) -> Result<Self, AccessConfigError> {
        let list = AccessList::default();
        let limit = |field, v: &str| parse_limit(v).map_err(|source| AccessConfigError::Default { field, source });
        if let Ok(mut d) = list.defaults.write() {
            *d = Limits {
                idle_timeout: limit("idle_timeout", &cfg.idle_timeout)?,
                max_session: limit("max_session", &cfg.max_session)?,
            };
        }
        for (i, line) in cfg.user_ca_keys.iter().enumerate() {
            let key = PublicKey::from_openssh(line.trim())
                .map_err(|e| AccessConfigError::UserCaKey { index: i + 1, reason: e.to_string() })?;
            if let Ok(mut cas) = list.user_cas.write() {
                cas.push(key.key_data().clone());
            }
        }
        if let Ok(mut p) = list.profiles.write() {
            *p = cfg.profiles.clone();
        }
        for u in &cfg.users {
            list.add(u)?;
        }
        Ok(list)
    }

    /// Put what `fresh` took from a (reloaded) gateway config in place of this list's: the
    /// `[[ssh.users]]` and their `config` policy, `[[ssh.profiles]]`, `user_ca_keys` and the
    /// default limits. Users, policies and grants from the store, and the gateway's own user
    /// CA, stay. All parts change at once (no decision sees new users with old statements).
    pub fn replace_config(&self, fresh: AccessList) {
        let own = self.own_user_ca.read().ok().and_then(|o| o.clone());
        {
            let (Ok(mut users), Ok(mut statements), Ok(mut profiles), Ok(mut cas), Ok(mut defaults)) = (
                self.static_users.write(),
                self.config_statements.write(),
                self.profiles.write(),
                self.user_cas.write(),
                self.defaults.write(),
            ) else {
                return;
            };
            *users = fresh.static_users.into_inner().unwrap_or_default();
            *statements = fresh.config_statements.into_inner().unwrap_or_default();
            *profiles = fresh.profiles.into_inner().unwrap_or_default();
            *cas = fresh.user_cas.into_inner().unwrap_or_default();
            if let Some(own) = own
                && !cas.contains(&own)
            {
                cas.push(own);
            }
            *defaults = fresh.defaults.into_inner().unwrap_or_default();
        }
        self.recompile();
    }

    /// Trust user certificates signed by `ca`, the gateway's own user CA.
    pub fn trust_user_ca(&self, ca: &PublicKey) {
        if let Ok(mut cas) = self.user_cas.write()
            && !cas.contains(ca.key_data())
        {
            cas.push(ca.key_data().clone());
        }
        if let Ok(mut own) = self.own_user_ca.write() {
            *own = Some(ca.key_data().clone());
        }
    }

    /// Whether any user CA is trusted (then certificate offers are worth a signature check).
    pub fn has_user_cas(&self) -> bool {
        self.user_cas.read().map(|c| !c.is_empty()).unwrap_or(false)
    }

    /// The store's access generation the users, policies and grants in memory were loaded
    /// at (None: not loaded from the store yet).
    pub fn loaded_generation(&self) -> Option<i64> {
        self.directory().generation
    }

    fn directory(&self) -> Arc<Directory> {
        self.directory.read().map(|d| d.clone()).unwrap_or_default()
    }

    /// Re-read users, policies and grants from the store and recompile the policy set.
    pub async fn reload(&self, store: &dyn Store) -> Result<(), StoreError> {
        // Read before loading: a change committed meanwhile moves it again, and whoever
        // follows the store (the enforcer) reloads once more.
        let generation = Some(store.access_generation().await?);
        let mut users = HashMap::new();
        for u in store.users().await? {
            let keys = u.keys.iter().filter_map(|k| parse_key(k).ok()).collect();
            users.insert(u.name.clone(), (u, keys));
        }
        let mut documents = Vec::new();
        for p in store.policies().await? {
            match postern_core::policy::document::parse(&p.file, &p.source) {
                Ok(doc) => documents.push((doc, p.source)),
                // Only validated documents are stored; a failure here means the store was edited.
                Err(e) => {
                    postern_tunnel::error_limited!(policy = %p.name, error = %e, "stored policy no longer parses; ignored")
                }
            }
        }
        let grants = store.grants().await?;
        let now = jiff::Timestamp::now().as_second();
        let revoked_certs = store
            .certificates(None, now)
            .await?
            .into_iter()
            .filter(|c| c.revoked_at.is_some())
            .map(|c| c.serial)
            .collect();
        if let Ok(mut d) = self.store_documents.write() {
            *d = documents;
        }
        let policy = self.compile();
        if let Ok(mut d) = self.directory.write() {
            *d = Arc::new(Directory { users, grants, policy, generation, revoked_certs });
        }
        Ok(())
    }

    fn compile(&self) -> PolicySet {
        let config = Document {
            name: "config".into(),
            description: "[[ssh.users]] of the gateway config".into(),
            statements: self
                .config_statements
                .read()
                .map(|v| v.iter().cloned().map(|s| toml::Spanned::new(0..0, s)).collect())
                .unwrap_or_default(),
        };
        let stored = self.store_documents.read().map(|d| d.clone()).unwrap_or_default();
        PolicySet::new(std::iter::once((&config, "")).chain(stored.iter().map(|(d, t)| (d, t.as_str()))))
    }

    fn recompile(&self) {
        let policy = self.compile();
        if let Ok(mut d) = self.directory.write() {
            let old = d.clone();
            *d = Arc::new(Directory {
                users: old.users.clone(),
                grants: old.grants.clone(),
                policy,
                generation: old.generation,
                revoked_certs: old.revoked_certs.clone(),
            });
        }
    }

    /// The identity `user` if `cert` is a user certificate from a trusted CA naming one of
    /// the user's principals, and not revoked. (russh has already checked its signature and
    /// validity period.) A certificate of the gateway's own CA also says whether its login
    /// used a second factor ([`MFA_EXTENSION`]).
    pub fn authenticate_certificate(
        &self,
        user: &str,
        cert: &russh::keys::Certificate,
        source: Option<IpAddr>,
    ) -> Option<Identity> {
        use russh::keys::ssh_key::certificate::CertType;
        let trusted = self.user_cas.read().ok()?.iter().any(|ca| ca == cert.signature_key());
        if !trusted || cert.cert_type() != CertType::User {
            return None;
        }
        let names = |p: &str| cert.valid_principals().iter().any(|x| x == p);
        let dir = self.directory();
        let ok = match dir.users.get(user) {
            Some((u, _)) if u.disabled => false,
            Some((u, _)) if !u.principals.is_empty() => u.principals.iter().any(|p| names(p)),
            Some(_) => names(user),
            None => names(user) && self.static_users.read().ok()?.iter().any(|e| e.name == user),
        };
        let own = self.own_user_ca.read().ok()?.as_ref().is_some_and(|ca| ca == cert.signature_key());
        if own && dir.revoked_certs.contains(&cert.serial()) {
            return None;
        }
        let facts = own.then(|| CertFacts {
            serial: cert.serial(),
            mfa: cert.extensions().contains_key(MFA_EXTENSION),
            valid_before: cert.valid_before(),
        });
        ok.then(|| Identity { user: user.to_owned(), source, cert: facts })
    }

    pub fn add(&self, u: &UserConfig) -> Result<(), AccessConfigError> {
        let mut keys = Vec::new();
        for (i, line) in u.keys.iter().enumerate() {
            let key = parse_key(line).map_err(|reason| AccessConfigError::UserKey {
                user: u.name.clone(),
                index: i + 1,
                reason,
            })?;
            let owner = self.configured_key_owner(&key).or_else(|| {
                let dir = self.directory();
                dir.users
                    .values()
                    .find(|(_, ks)| ks.iter().any(|k| k.key_data() == key.key_data()))
                    .map(|(r, _)| r.name.clone())
            });
            if let Some(owner) = owner.filter(|o| *o != u.name) {
                return Err(AccessConfigError::KeyBound { user: u.name.clone(), index: i + 1, owner });
            }
            keys.push(key);
        }
        if let Some(actions) = &u.actions {
            for a in actions {
                if Action::parse(a).is_none() {
                    return Err(AccessConfigError::UnknownAction { user: u.name.clone(), action: a.clone() });
                }
            }
        }
        let mut st = config_statement(u);
        if let Some(st) = st.as_mut() {
            for (field, v) in [("idle_timeout", &u.idle_timeout), ("max_session", &u.max_session)] {
                if let Some(v) = v {
                    let limit = parse_limit(v).map_err(|source| AccessConfigError::Limit {
                        user: u.name.clone(),
                        field,
                        source,
                    })?;
                    if field == "idle_timeout" {
                        st.idle_timeout = Some(Limit(limit));
                    } else {
                        st.max_session = Some(Limit(limit));
                    }
                }
            }
        }
        let known =
            self.profiles.read().map(|p| p.iter().map(|x| x.name.clone()).collect::<Vec<_>>()).unwrap_or_default();
        for name in u.profiles.iter().chain(u.default_profile.iter()) {
            if !known.contains(name) {
                return Err(AccessConfigError::UnknownProfile { user: u.name.clone(), profile: name.clone() });
            }
        }
        let statement = st.as_ref().map(|st| config_statement_text(u, st)).unwrap_or_default();
        if let Ok(mut e) = self.static_users.write() {
            e.push(StaticUser { name: u.name.clone(), keys, statement });
        }
        if let Some(st) = st
            && let Ok(mut c) = self.config_statements.write()
        {
            c.push(st);
        }
        self.recompile();
        Ok(())
    }

    /// The `[[ssh.users]]` entry (or quickstart's user) `key` is bound to, if any.
    pub fn configured_key_owner(&self, key: &PublicKey) -> Option<String> {
        let users = self.static_users.read().ok()?;
        users.iter().find(|u| u.keys.iter().any(|k| k.key_data() == key.key_data())).map(|u| u.name.clone())
    }

    /// The identity `user` if `key` is bound to it (and the user is not disabled).
    pub fn authenticate(&self, user: &str, key: &PublicKey, source: Option<IpAddr>) -> Option<Identity> {
        let same = |k: &PublicKey| k.key_data() == key.key_data();
        let dir = self.directory();
        let stored = dir.users.get(user).is_some_and(|(u, keys)| !u.disabled && keys.iter().any(same));
        let configured = !dir.users.get(user).is_some_and(|(u, _)| u.disabled)
            && self.static_users.read().ok()?.iter().any(|e| e.name == user && e.keys.iter().any(same));
        (stored || configured).then(|| Identity::new(user, source))
    }

    /// The groups of a user in the store (none for a config user).
    pub fn user_groups(&self, user: &str) -> Vec<String> {
        self.directory().users.get(user).map(|(u, _)| u.groups.clone()).unwrap_or_default()
    }

    /// Whether `user` exists (in the store or the config) and is not disabled.
    pub fn user_active(&self, user: &str) -> bool {
        match self.directory().users.get(user) {
            Some((u, _)) => !u.disabled,
            None => self.static_users.read().map(|s| s.iter().any(|e| e.name == user)).unwrap_or(false),
        }
    }

    /// The policy decision for one request at time `at`. Disabled and unknown users get a
    /// default deny.
    #[allow(clippy::too_many_arguments)]
    pub fn decide(
        &self,
        who: &Identity,
        target: Option<Target<'_>>,
        action: &str,
        destination: Option<(&str, u16)>,
        at: jiff::Timestamp,
        explain: bool,
    ) -> Decision {
        self.decide_inner(who, target, action, destination, at, explain, &[])
    }

    /// [`AccessList::decide`] as if the user also held grants of `extra` policies.
    #[allow(clippy::too_many_arguments)]
    fn decide_with_grants(
        &self,
        who: &Identity,
        target: Option<Target<'_>>,
        action: &str,
        destination: Option<(&str, u16)>,
        at: jiff::Timestamp,
        extra: &[String],
    ) -> Decision {
        self.decide_inner(who, target, action, destination, at, false, extra)
    }

    /// Users from the gateway config (read-only: not in the store).
    pub fn config_users(&self) -> Vec<ConfigUser> {
        self.static_users
            .read()
            .map(|v| v.iter().map(|u| ConfigUser { name: u.name.clone(), keys: u.keys.clone() }).collect())
            .unwrap_or_default()
    }

    /// The built-in `config` policy (the config users' statements) as policy TOML.
    pub fn config_policy_source(&self) -> String {
        let mut out = "# Built in, read-only: the gateway config's [[ssh.users]] (and `postern quickstart`'s user).\n\
                       # Change them in the config file, not with `postern policy`.\nname = \"config\"\n"
            .to_owned();
        for u in self
            .static_users
            .read()
            .map(|v| v.iter().map(|u| u.statement.clone()).collect::<Vec<_>>())
            .unwrap_or_default()
        {
            if !u.is_empty() {
                out.push('\n');
                out.push_str(&u);
            }
        }
        out
    }

    /// The grants as of the last reload (all of them: active, expired and revoked).
    pub fn grants(&self) -> Vec<GrantRecord> {
        self.directory().grants.clone()
    }

    /// Of `user`'s grants no longer active at `at`, the most recently ended one that
    /// `allows` says would allow again: "grant gr-... for policy P expired at T" (or "was
    /// revoked at T").
    fn ended_grant_explaining(
        &self,
        user: &str,
        at: jiff::Timestamp,
        allows: impl Fn(&[String]) -> bool,
    ) -> Option<String> {
        let now = at.as_second();
        let mut ended: Vec<GrantRecord> =
            self.directory().grants.iter().filter(|g| g.user == user && !g.active_at(now)).cloned().collect();
        ended.sort_by_key(|g| std::cmp::Reverse(g.revoked_at.unwrap_or(g.expires_at)));
        ended.into_iter().take(16).find(|g| allows(std::slice::from_ref(&g.policy))).map(|g| match g.revoked_at {
            Some(t) => {
                format!("grant {} for policy {} was revoked at {}", g.id, g.policy, postern_core::util::rfc3339(t))
            }
            None => format!(
                "grant {} for policy {} expired at {}",
                g.id,
                g.policy,
                postern_core::util::rfc3339(g.expires_at)
            ),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn decide_inner(
        &self,
        who: &Identity,
        target: Option<Target<'_>>,
        action: &str,
        destination: Option<(&str, u16)>,
        at: jiff::Timestamp,
        explain: bool,
        extra_grants: &[String],
    ) -> Decision {
        let (user, source) = (who.user.as_str(), who.source);
        let dir = self.directory();
        let none = || Decision {
            allowed: false,
            decided_by: Vec::new(),
            settings: Default::default(),
            not_applicable: Vec::new(),
            overridden: Vec::new(),
            address_denies: Vec::new(),
        };
        if !self.user_active(user) {
            return none();
        }
        let groups = dir.users.get(user).map(|(u, _)| u.groups.clone()).unwrap_or_default();
        let now = at.as_second();
        let mut grants: Vec<String> =
            dir.grants.iter().filter(|g| g.user == user && g.active_at(now)).map(|g| g.policy.clone()).collect();
        grants.extend(extra_grants.iter().cloned());
        let req = postern_core::policy::Request {
            user,
            groups: &groups,
            grants: &grants,
            action,
            target,
            destination,
            source,
            mfa: who.mfa(),
            at,
        };
        if explain { dir.policy.explain(&req) } else { dir.policy.evaluate(&req) }
    }

    pub fn has_policy(&self, name: &str) -> bool {
        self.directory().policy.has_policy(name)
    }

    fn profile(&self, name: &str) -> Option<postern_core::profile::Profile> {
        self.profiles.read().ok()?.iter().find(|p| p.name == name).cloned()
    }

    fn defaults(&self) -> Limits {
        self.defaults.read().map(|d| *d).unwrap_or_default()
    }
}

/// The OS login a session runs as (`None`: the agent's own user): the login the person asked
/// for when the policy's logins (`run_as`) allow it; else, when they asked for none or for
/// their own identity name, the profile's run-as or the policy's default login (the first).
/// A login asked for and not allowed is refused with the list of those that are (root is
/// one only where root is allowed).
fn resolve_login(
    identity: &Identity,
    instance: &str,
    requested: Option<&str>,
    profile: &postern_core::profile::Profile,
    logins: &[String],
    allow_root: bool,
) -> Result<Option<String>, Cow<'static, str>> {
    let Some(login) = requested.filter(|l| *l != identity.user) else {
        return Ok(profile.run_as.clone().or(logins.first().cloned()));
    };
    let logins = usable_logins(logins, allow_root);
    if !logins.iter().any(|l| l == login) {
        let login: String = login.chars().take(64).collect();
        return Err(format!(
            "login {login:?} is not allowed for you on {instance}; {}",
            describe_logins(&logins, &identity.user)
        )
        .into());
    }
    match &profile.run_as {
        Some(p) if p != login => Err(format!(
            "profile {} runs as {p:?}, not as the login {login:?} you asked for; log in as {p} or choose another profile",
            profile.name
        )
        .into()),
        _ => Ok(Some(login.to_owned())),
    }
}

/// The logins a person may choose from the policy's `run_as` list (the first is the
/// default): root only where root is allowed.
pub fn usable_logins(logins: &[String], allow_root: bool) -> Vec<String> {
    logins.iter().filter(|l| allow_root || *l != "root").cloned().collect()
}

/// The logins a policy's `run_as` list gives a person, as refusals and `explain` say it.
pub fn describe_logins(logins: &[String], user: &str) -> String {
    match logins.split_first() {
        None => format!(
            "the policy names no logins for you there (run_as), so there is none to choose: log in as {user} \
             (your own name) and the session runs as the agent's own user"
        ),
        Some((default, [])) => format!("allowed login: {default} (the default)"),
        Some((default, rest)) => format!("allowed logins: {default} (the default), {}", rest.join(", ")),
    }
}

/// Decisions for sessions: the policy engine and identities ([`AccessList`]) applied to the
/// instances in the store and the sessions already running (concurrent-session caps).
pub struct Authorizer {
    list: Arc<AccessList>,
    store: Arc<dyn Store>,
    sessions: Arc<SessionTable>,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer").finish_non_exhaustive()
    }
}

impl Authorizer {
    pub fn new(list: Arc<AccessList>, store: Arc<dyn Store>, sessions: Arc<SessionTable>) -> Self {
        Authorizer { list, store, sessions }
    }

    /// Identities, policies and grants, as of the last reload.
    pub fn list(&self) -> &AccessList {
        &self.list
    }

    /// The one decision point: may `identity` do `action` on `instance` (name or id), with the
    /// shell profile they asked for (or their default), as the OS login they asked for (the
    /// user name of `ssh LOGIN@instance`; `None` or their own identity name: the default
    /// login) and, for forwards, this destination (in any spelling: it is decided, and
    /// dialled, in its canonical form; a host with none is refused)? Resolves policy,
    /// profile, login (run-as), limits and concurrent-session caps. The error is the refusal
    /// to show the user.
    pub async fn authorize(
        &self,
        identity: &Identity,
        instance: &str,
        action: Action,
        requested_profile: Option<&str>,
        requested_login: Option<&str>,
        destination: Option<(&str, u16)>,
    ) -> Result<Authorization, Cow<'static, str>> {
        let destination = match destination {
            Some((host, port)) => match Host::parse(host) {
                Ok(h) => Some((h, port)),
                Err(_) => return Err(BAD_DESTINATION.into()),
            },
            None => None,
        };
        let spelled = destination.as_ref().map(|(h, p)| (h.to_string(), *p));
        let agents = self.store.find_agents(instance).await.map_err(|_| "gateway storage error")?;
        let found = resolve_instance(&agents, instance).ok();
        // An unknown instance is evaluated against a placeholder, so that "unknown" and "denied"
        // cost the same work and give the same answer.
        let empty = crate::store::Labels::new();
        let target = match found {
            Some(a) => Target { id: &a.id, name: &a.name, labels: &a.labels },
            None => Target { id: "", name: "", labels: &empty },
        };
        let decision = self.list.decide(
            identity,
            Some(target),
            action.name(),
            spelled.as_ref().map(|(h, p)| (h.as_str(), *p)),
            jiff::Timestamp::now(),
            false,
        );
        let Some(agent) = found.filter(|_| decision.allowed) else { return Err(DENIED.into()) };
        let settings = decision.settings;
        let profile = match requested_profile.or(settings.profile.as_deref()) {
            None => postern_core::profile::Profile::default(),
            Some(name) => match self.list.profile(name) {
                Some(p) if settings.profiles.iter().any(|x| x == name) => p,
                _ => return Err("that profile does not exist or is not allowed for you".into()),
            },
        };
        if let (Some(wanted), false) = (&profile.run_as, settings.run_as.is_empty())
            && !settings.run_as.contains(wanted)
        {
            return Err("the profile's run-as user is not allowed for you".into());
        }
        let allow_root = profile.allow_root || settings.allow_root;
        let run_as = resolve_login(identity, &agent.name, requested_login, &profile, &settings.run_as, allow_root)?;
        if run_as.as_deref() == Some("root") && !allow_root {
            return Err("running as root is not allowed for you (allow_root)".into());
        }
        // Reserved now, atomically with the count: the slot is held until the session is on
        // the live table, so simultaneous requests cannot all pass the check.
        let Some(reservation) = self.sessions.reserve(&identity.user, settings.max_sessions) else {
            return Err("you have reached your maximum number of concurrent sessions".into());
        };
        let defaults = self.list.defaults();
        Ok(Authorization {
            user: identity.user.clone(),
            agent_id: agent.id.clone(),
            instance: agent.name.clone(),
            action,
            destination,
            address_denies: decision.address_denies,
            run_as,
            allow_root,
            limits: Limits {
                idle_timeout: settings.idle_timeout.unwrap_or(defaults.idle_timeout),
                max_session: settings.max_session.unwrap_or(defaults.max_session),
            },
            profile,
            reservation,
            cert: identity.cert,
        })
    }

    /// Whether a live session is still allowed now; why not when it is not. `agent` is the
    /// session's instance as stored now (`None`: revoked).
    pub fn recheck(
        &self,
        agent: Option<&AgentRecord>,
        session: &LiveSession,
        at: jiff::Timestamp,
    ) -> Result<(), Disallowed> {
        if session.party.via_admin {
            return match agent {
                Some(_) => Ok(()),
                None => Err(Disallowed::Revoked(format!("instance {} was revoked", session.party.target))),
            };
        }
        if !self.list.user_active(&session.party.user) {
            return Err(Disallowed::Revoked(format!("user {} is disabled or removed", session.party.user)));
        }
        let Some(agent) = agent else {
            return Err(Disallowed::Revoked(format!("instance {} was revoked", session.party.target)));
        };
        let destination = session.party.destination.as_ref().map(|(h, p)| (h.as_str(), *p));
        let who = session.party.identity();
        let d = self.list.decide(
            &who,
            Some(Target { id: &agent.id, name: &agent.name, labels: &agent.labels }),
            session.party.action.name(),
            destination,
            at,
            false,
        );
        if d.allowed {
            // The limit in force now (a reloaded config, a changed policy): a shorter one than
            // the session started with ends it once passed; a longer one changes nothing (the
            // session's own timer keeps the limit it started with).
            let now_max = d.settings.max_session.unwrap_or(self.list.defaults().max_session);
            if let Some(max) = now_max
                && session.party.max_session.is_none_or(|started_with| max < started_with)
                && session.started.elapsed() >= max
            {
                return Err(Disallowed::LimitShortened(max));
            }
            return Ok(());
        }
        // A grant that ended (expired or revoked) is the reason when the session would be
        // allowed with it: say which, and when.
        let party = &session.party;
        let ended = self.list.ended_grant_explaining(&party.user, at, |grants| {
            self.list
                .decide_with_grants(
                    &who,
                    Some(Target { id: &agent.id, name: &agent.name, labels: &agent.labels }),
                    party.action.name(),
                    destination,
                    at,
                    grants,
                )
                .allowed
        });
        Err(Disallowed::Revoked(ended.unwrap_or_else(|| d.summary())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reload's users, statements and limits replace the old ones whole; the gateway's own
    /// user CA, trusted at start, stays trusted.
    #[test]
    fn replacing_the_config_swaps_users_and_limits_and_keeps_the_own_user_ca() {
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHNV6u6wpsWtZv2s0S8Gb3qH8lO1xDZ0m2qgDPbOwD3r alice@laptop";
        let own_ca = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGnFhCZyq0Yd5IxP2gHqkS0Xc3MLrVcJm6HG6sA0U4ye own-ca";
        let user = |name: &str| UserConfig {
            name: name.into(),
            keys: vec![key.into()],
            instances: vec!["web-*".into()],
            actions: None,
            run_as: None,
            idle_timeout: None,
            max_session: None,
            profiles: vec![],
            default_profile: None,
            allow_root: false,
        };
        let config = |name: &str, max_session: &str| SshConfig {
            users: vec![user(name)],
            max_session: max_session.into(),
            ..SshConfig::default()
        };
        let list = AccessList::from_config(&config("alice", "12h")).unwrap();
        let own = PublicKey::from_openssh(own_ca).unwrap();
        list.trust_user_ca(&own);
        list.replace_config(AccessList::from_config(&config("bob", "5m")).unwrap());
        let pk = PublicKey::from_openssh(key).unwrap();
        assert!(list.authenticate("alice", &pk, None).is_none(), "alice was removed");
        assert!(list.authenticate("bob", &pk, None).is_some(), "bob was added");
        assert!(!list.user_active("alice") && list.user_active("bob"));
        assert_eq!(list.defaults().max_session, Some(std::time::Duration::from_secs(300)));
        assert!(list.user_cas.read().unwrap().contains(own.key_data()), "the own user CA stays trusted");
        assert!(list.config_policy_source().contains("\"bob\""), "the config policy names bob");
        assert!(!list.config_policy_source().contains("\"alice\""), "and no longer alice");
    }

    #[test]
    fn config_users_become_policy_statements() {
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHNV6u6wpsWtZv2s0S8Gb3qH8lO1xDZ0m2qgDPbOwD3r alice@laptop";
        let list = AccessList::default();
        list.add(&UserConfig {
            name: "alice".into(),
            keys: vec![key.into()],
            instances: vec!["web-*".into()],
            actions: Some(vec!["shell".into(), "exec".into()]),
            run_as: None,
            idle_timeout: Some("5m".into()),
            max_session: None,
            profiles: vec![],
            default_profile: None,
            allow_root: false,
        })
        .unwrap();
        let pk = PublicKey::from_openssh(key).unwrap();
        assert!(list.authenticate("alice", &pk, None).is_some());
        assert!(list.authenticate("bob", &pk, None).is_none());
        let labels = crate::store::Labels::new();
        let at = jiff::Timestamp::now();
        let decide = |name: &str, action: Action| {
            list.decide(
                &Identity::new("alice", None),
                Some(Target { id: "ag-1", name, labels: &labels }),
                action.name(),
                None,
                at,
                false,
            )
        };
        assert!(decide("web-01", Action::Shell).allowed);
        assert!(!decide("web-01", Action::PortForward).allowed);
        assert!(!decide("db-01", Action::Shell).allowed);
        assert_eq!(
            decide("web-01", Action::Exec).settings.idle_timeout,
            Some(Some(std::time::Duration::from_secs(300)))
        );
        assert_eq!(decide("web-01", Action::Exec).decided_by[0].policy, "config");
        let bad = UserConfig {
            name: "x".into(),
            keys: vec!["not a key".into()],
            instances: vec![],
            actions: None,
            run_as: None,
            idle_timeout: None,
            max_session: None,
            profiles: vec![],
            default_profile: None,
            allow_root: false,
        };
        assert!(AccessList::default().add(&bad).is_err());
        // The same key for a second config user: refused, naming its owner.
        let twice = UserConfig { name: "mallory".into(), keys: vec![key.into()], ..bad };
        let e = list.add(&twice).unwrap_err().to_string();
        assert!(e.contains("already bound to user \"alice\""), "{e}");
    }
}
