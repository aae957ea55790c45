//! Who may do what on which instance. Until the policy engine lands this is an allow-list
//! from the gateway config (`[[ssh.users]]`) plus identities registered by `quickstart`,
//! but every decision already goes through [`authorize`], and the only way to get an
//! [`Authorization`] — which carries the resolved target the session code dials — is from it.

use std::sync::RwLock;

use russh::keys::PublicKey;
use serde::Deserialize;

use crate::gateway::GatewayState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Shell,
    Exec,
    Sftp,
    PortForward,
    SshPassthrough,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Shell => "shell",
            Action::Exec => "exec",
            Action::Sftp => "sftp",
            Action::PortForward => "port-forward",
            Action::SshPassthrough => "ssh-passthrough",
        }
    }
}

/// One `[[ssh.users]]` entry of the gateway config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// The Postern user name (what goes before `@` or `%` in ssh).
    pub name: String,
    /// OpenSSH public key lines bound to this user.
    pub keys: Vec<String>,
    /// Instance names (globs with `*` and `?`) this user may reach. Default: none.
    #[serde(default)]
    pub instances: Vec<String>,
    /// Allowed actions: shell, exec, sftp, port-forward, ssh-passthrough. Default: all.
    #[serde(default)]
    pub actions: Option<Vec<String>>,
    /// OS user sessions run as on the instance. Default: the agent's own user.
    #[serde(default)]
    pub run_as: Option<String>,
    /// Overrides `[ssh] idle_timeout` for this user.
    #[serde(default)]
    pub idle_timeout: Option<String>,
    /// Overrides `[ssh] max_session` for this user.
    #[serde(default)]
    pub max_session: Option<String>,
    /// Shell profiles this user may choose (`ssh -o SetEnv=POSTERN_PROFILE=NAME`).
    #[serde(default)]
    pub profiles: Vec<String>,
    /// Profile used when the user names none.
    #[serde(default)]
    pub default_profile: Option<String>,
    /// Whether sessions may run as root (also possible per profile).
    #[serde(default)]
    pub allow_root: bool,
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    keys: Vec<PublicKey>,
    instances: Vec<String>,
    actions: Option<Vec<String>>,
    limits: Limits,
    run_as: Option<String>,
    profiles: Vec<String>,
    default_profile: Option<String>,
    allow_root: bool,
}

/// Session time limits; `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub idle_timeout: Option<std::time::Duration>,
    pub max_session: Option<std::time::Duration>,
}

#[derive(Debug, Default)]
pub struct AccessList {
    entries: RwLock<Vec<Entry>>,
    profiles: RwLock<Vec<crate::ssh::profile::Profile>>,
    user_cas: RwLock<Vec<russh::keys::ssh_key::public::KeyData>>,
    defaults: RwLock<Limits>,
}

/// A user whose key was verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
}

/// Permission for one action on one resolved, online-or-not instance. Only [`authorize`]
/// creates it; session code dials `agent_id()` and nothing else.
#[derive(Debug, Clone)]
pub struct Authorization {
    user: String,
    agent_id: String,
    instance: String,
    action: Action,
    run_as: Option<String>,
    limits: Limits,
    profile: crate::ssh::profile::Profile,
}

impl Authorization {
    /// The shell profile in force (an empty default when none applies).
    pub fn profile(&self) -> &crate::ssh::profile::Profile {
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
}

/// The one answer for "no such instance" and "not allowed", so users cannot probe names.
pub const DENIED: &str = "access denied (or no such instance)";

pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match (p.split_first(), n.split_first()) {
            (None, None) => true,
            (Some(('*', rest)), _) => go(rest, n) || n.split_first().is_some_and(|(_, nr)| go(p, nr)),
            (Some(('?', rest)), Some((_, nr))) => go(rest, nr),
            (Some((pc, rest)), Some((nc, nr))) if pc == nc => go(rest, nr),
            _ => false,
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

impl AccessList {
    pub fn from_config(cfg: &crate::config::SshConfig) -> anyhow::Result<Self> {
        let list = AccessList::default();
        if let Ok(mut d) = list.defaults.write() {
            *d = Limits {
                idle_timeout: crate::config::parse_limit(&cfg.idle_timeout)?,
                max_session: crate::config::parse_limit(&cfg.max_session)?,
            };
        }
        for (i, line) in cfg.user_ca_keys.iter().enumerate() {
            let key = PublicKey::from_openssh(line.trim())
                .map_err(|e| anyhow::anyhow!("ssh.user_ca_keys: key {} is not an OpenSSH public key: {e}", i + 1))?;
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

    /// Whether any user CA is trusted (then certificate offers are worth a signature check).
    pub fn has_user_cas(&self) -> bool {
        self.user_cas.read().map(|c| !c.is_empty()).unwrap_or(false)
    }

    /// The identity `user` if `cert` is a user certificate from a trusted CA naming `user`.
    /// (russh has already checked its signature and validity period.)
    pub fn authenticate_certificate(&self, user: &str, cert: &russh::keys::Certificate) -> Option<Identity> {
        use russh::keys::ssh_key::certificate::CertType;
        let trusted = self.user_cas.read().ok()?.iter().any(|ca| ca == cert.signature_key());
        let named = cert.valid_principals().iter().any(|p| p == user);
        let known = self.entries.read().ok()?.iter().any(|e| e.name == user);
        (trusted && named && known && cert.cert_type() == CertType::User).then(|| Identity { user: user.to_owned() })
    }

    pub fn add(&self, u: &UserConfig) -> anyhow::Result<()> {
        let mut keys = Vec::new();
        for (i, line) in u.keys.iter().enumerate() {
            let key = PublicKey::from_openssh(line.trim()).map_err(|e| {
                anyhow::anyhow!("ssh.users {:?}: key {} is not an OpenSSH public key: {e}", u.name, i + 1)
            })?;
            keys.push(key);
        }
        if let Some(actions) = &u.actions {
            for a in actions {
                if !["shell", "exec", "sftp", "port-forward", "ssh-passthrough"].contains(&a.as_str()) {
                    anyhow::bail!("ssh.users {:?}: unknown action {a:?}", u.name);
                }
            }
        }
        let defaults = self.defaults.read().map(|d| *d).unwrap_or_default();
        let limits = Limits {
            idle_timeout: match &u.idle_timeout {
                Some(v) => crate::config::parse_limit(v)
                    .map_err(|e| anyhow::anyhow!("ssh.users {:?}: idle_timeout: {e}", u.name))?,
                None => defaults.idle_timeout,
            },
            max_session: match &u.max_session {
                Some(v) => crate::config::parse_limit(v)
                    .map_err(|e| anyhow::anyhow!("ssh.users {:?}: max_session: {e}", u.name))?,
                None => defaults.max_session,
            },
        };
        let entry = Entry {
            name: u.name.clone(),
            keys,
            instances: u.instances.clone(),
            actions: u.actions.clone(),
            limits,
            run_as: u.run_as.clone(),
            profiles: u.profiles.clone(),
            default_profile: u.default_profile.clone(),
            allow_root: u.allow_root,
        };
        let known =
            self.profiles.read().map(|p| p.iter().map(|x| x.name.clone()).collect::<Vec<_>>()).unwrap_or_default();
        for name in entry.profiles.iter().chain(entry.default_profile.iter()) {
            if !known.contains(name) {
                anyhow::bail!("ssh.users {:?}: unknown profile {name:?} (define it under [[ssh.profiles]])", u.name);
            }
        }
        if let Ok(mut e) = self.entries.write() {
            e.push(entry);
        }
        Ok(())
    }

    /// The identity `user` if `key` is bound to it.
    pub fn authenticate(&self, user: &str, key: &PublicKey) -> Option<Identity> {
        let entries = self.entries.read().ok()?;
        entries
            .iter()
            .any(|e| e.name == user && e.keys.iter().any(|k| k.key_data() == key.key_data()))
            .then(|| Identity { user: user.to_owned() })
    }

    fn permits(&self, user: &str, instance: &str, action: Action) -> Option<Entry> {
        let entries = self.entries.read().ok()?;
        entries
            .iter()
            .filter(|e| e.name == user)
            .filter(|e| e.instances.iter().any(|p| glob_match(p, instance)))
            .find(|e| e.actions.as_ref().is_none_or(|a| a.iter().any(|x| x == action.name())))
            .cloned()
    }

    fn profile(&self, name: &str) -> Option<crate::ssh::profile::Profile> {
        self.profiles.read().ok()?.iter().find(|p| p.name == name).cloned()
    }
}

/// Decide whether `identity` may do `action` on `instance` (name or id).
pub async fn authorize(
    state: &GatewayState,
    identity: &Identity,
    instance: &str,
    action: Action,
) -> Result<Authorization, &'static str> {
    authorize_with_profile(state, identity, instance, action, None).await
}

/// As [`authorize`], also resolving the shell profile the user asked for (or their default).
pub async fn authorize_with_profile(
    state: &GatewayState,
    identity: &Identity,
    instance: &str,
    action: Action,
    requested_profile: Option<&str>,
) -> Result<Authorization, &'static str> {
    let agents = state.store.agents().await.map_err(|_| "gateway storage error")?;
    let Ok(agent) = crate::admin::resolve_instance(&agents, instance) else { return Err(DENIED) };
    let Some(entry) = state.access.permits(&identity.user, &agent.name, action) else { return Err(DENIED) };
    let profile = match requested_profile.or(entry.default_profile.as_deref()) {
        None => crate::ssh::profile::Profile::default(),
        Some(name) => {
            let allowed = entry.profiles.iter().any(|p| p == name) || entry.default_profile.as_deref() == Some(name);
            match state.access.profile(name) {
                Some(p) if allowed => p,
                _ => return Err("that profile does not exist or is not allowed for you"),
            }
        }
    };
    let run_as = profile.run_as.clone().or(entry.run_as.clone());
    if run_as.as_deref() == Some("root") && !(profile.allow_root || entry.allow_root) {
        return Err("running as root is not allowed for you (allow_root)");
    }
    Ok(Authorization {
        user: identity.user.clone(),
        agent_id: agent.id.clone(),
        instance: agent.name.clone(),
        action,
        run_as,
        limits: entry.limits,
        profile,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*", "web-01"));
        assert!(glob_match("web-*", "web-01"));
        assert!(glob_match("web-0?", "web-01"));
        assert!(!glob_match("web-0?", "web-010"));
        assert!(!glob_match("db-*", "web-01"));
        assert!(glob_match("*-01", "web-01"));
        assert!(!glob_match("", "x"));
    }

    #[test]
    fn allow_list() {
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
        assert!(list.authenticate("alice", &pk).is_some());
        assert!(list.authenticate("bob", &pk).is_none());
        assert!(list.permits("alice", "web-01", Action::Shell).is_some());
        assert!(list.permits("alice", "web-01", Action::PortForward).is_none());
        assert!(list.permits("alice", "db-01", Action::Shell).is_none());
        assert_eq!(
            list.permits("alice", "web-01", Action::Exec).unwrap().limits.idle_timeout,
            Some(std::time::Duration::from_secs(300))
        );
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
    }
}
