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
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    keys: Vec<PublicKey>,
    instances: Vec<String>,
    actions: Option<Vec<String>>,
    run_as: Option<String>,
}

#[derive(Debug, Default)]
pub struct AccessList {
    entries: RwLock<Vec<Entry>>,
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
}

impl Authorization {
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
    pub fn from_config(users: &[UserConfig]) -> anyhow::Result<Self> {
        let list = AccessList::default();
        for u in users {
            list.add(u)?;
        }
        Ok(list)
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
        let entry = Entry {
            name: u.name.clone(),
            keys,
            instances: u.instances.clone(),
            actions: u.actions.clone(),
            run_as: u.run_as.clone(),
        };
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

    fn permits(&self, user: &str, instance: &str, action: Action) -> Option<Option<String>> {
        let entries = self.entries.read().ok()?;
        entries
            .iter()
            .filter(|e| e.name == user)
            .filter(|e| e.instances.iter().any(|p| glob_match(p, instance)))
            .find(|e| e.actions.as_ref().is_none_or(|a| a.iter().any(|x| x == action.name())))
            .map(|e| e.run_as.clone())
    }
}

/// Decide whether `identity` may do `action` on `instance` (name or id).
pub async fn authorize(
    state: &GatewayState,
    identity: &Identity,
    instance: &str,
    action: Action,
) -> Result<Authorization, &'static str> {
    let agents = state.store.agents().await.map_err(|_| "gateway storage error")?;
    let Ok(agent) = crate::admin::resolve_instance(&agents, instance) else { return Err(DENIED) };
    match state.access.permits(&identity.user, &agent.name, action) {
        Some(run_as) => Ok(Authorization {
            user: identity.user.clone(),
            agent_id: agent.id.clone(),
            instance: agent.name.clone(),
            action,
            run_as,
        }),
        None => Err(DENIED),
    }
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
        let list = AccessList::from_config(&[UserConfig {
            name: "alice".into(),
            keys: vec![key.into()],
            instances: vec!["web-*".into()],
            actions: Some(vec!["shell".into(), "exec".into()]),
            run_as: None,
        }])
        .unwrap();
        let pk = PublicKey::from_openssh(key).unwrap();
        assert!(list.authenticate("alice", &pk).is_some());
        assert!(list.authenticate("bob", &pk).is_none());
        assert!(list.permits("alice", "web-01", Action::Shell).is_some());
        assert!(list.permits("alice", "web-01", Action::PortForward).is_none());
        assert!(list.permits("alice", "db-01", Action::Shell).is_none());
        assert!(
            AccessList::from_config(&[UserConfig {
                name: "x".into(),
                keys: vec!["not a key".into()],
                instances: vec![],
                actions: None,
                run_as: None
            }])
            .is_err()
        );
    }
}
