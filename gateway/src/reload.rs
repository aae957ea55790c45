//! Configuration reload (SIGHUP, `postern reload`): gateway.toml is read again and what can
//! change while sessions run does — users, profiles, user CAs and limits of `[ssh]`
//! ([`LIVE_KEYS`]), `[audit] webhooks` and `log_level` — without dropping a session. Every
//! other key that changed in the file is reported as needing a restart and left as it is.
//! A file that cannot be read, parsed or checked changes nothing. Both outcomes are audit
//! events (`config.reloaded`, `config.reload_failed`).
//!
//! Live sessions are re-checked at once against the new users and limits by the enforcer
//! (through `access_changed`), as after any change to users or policies.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use postern_tunnel::CancellationToken;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::access::AccessList;
use crate::audit::AuditLog;
use crate::audit::events::{ConfigReloadFailed, ConfigReloaded, Event};
use crate::audit::webhooks::Webhooks;
use crate::config::GatewayConfig;

/// The keys of gateway.toml a reload applies (a key below one of them counts as it). Every
/// other key needs a restart.
pub const LIVE_KEYS: &[&str] = &[
    "log_level",
    "ssh.users",
    "ssh.profiles",
    "ssh.user_ca_keys",
    "ssh.idle_timeout",
    "ssh.max_session",
    "audit.webhooks",
];

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    pub file: String,
    /// Keys whose change took effect.
    pub changed: Vec<String>,
    /// Keys that changed in the file and take effect at the next start only.
    pub needs_restart: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(
        "this gateway was not started with a config file (--config), so there is nothing to read again; \
         restart it to change its settings"
    )]
    NoFile,
    /// The file's problem (it names the file, and the line for a syntax error); nothing changed.
    #[error("{0}; nothing was changed")]
    Invalid(String),
}

/// Where the running configuration came from, and what was applied of it.
#[derive(Debug)]
struct Source {
    path: PathBuf,
    /// The log filter of `--log`/`POSTERN_LOG`, in force when the file sets no `log_level`.
    base_log: String,
    /// The file as the gateway started with it (the baseline of keys needing a restart) ...
    started: toml::Table,
    /// ... and as last applied (the baseline of keys a reload applies).
    applied: toml::Table,
}

/// Reloads gateway.toml into the running services. One reload at a time.
pub struct ConfigReload {
    access: Arc<AccessList>,
    access_changed: Arc<Notify>,
    audit: Arc<AuditLog>,
    dead_letter: PathBuf,
    shutdown: CancellationToken,
    source: OnceLock<Mutex<Source>>,
}

impl std::fmt::Debug for ConfigReload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigReload").finish_non_exhaustive()
    }
}

impl ConfigReload {
    /// `dead_letter` and `shutdown` are what webhooks started by a reload use.
    pub fn new(
        access: Arc<AccessList>,
        access_changed: Arc<Notify>,
        audit: Arc<AuditLog>,
        dead_letter: PathBuf,
        shutdown: CancellationToken,
    ) -> Self {
        ConfigReload { access, access_changed, audit, dead_letter, shutdown, source: OnceLock::new() }
    }

    /// Reload from `path`, the file the gateway started with; `base_log` is the log filter
    /// of the command line. Without this, a reload is refused ([`ReloadError::NoFile`]).
    pub fn watch_file(&self, path: &Path, base_log: &str) -> anyhow::Result<()> {
        let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let table = parse_table(&path, &text).map_err(anyhow::Error::msg)?;
        let source = Source { path, base_log: base_log.to_owned(), started: table.clone(), applied: table };
        let _ = self.source.set(Mutex::new(source));
        Ok(())
    }

    /// Read the file again and apply what can change live; `by` is `signal` or the admin
    /// actor. Logged, audited, and reported to the caller.
    pub fn reload(&self, by: &str) -> Result<ReloadReport, ReloadError> {
        let Some(source) = self.source.get() else {
            warn!(by, "configuration reload asked for, but the gateway was started without --config");
            return Err(ReloadError::NoFile);
        };
        let Ok(mut source) = source.lock() else { return Err(ReloadError::Invalid("reload state poisoned".into())) };
        let file = source.path.display().to_string();
        match self.apply(&mut source) {
            Ok(report) => {
                let _ = self.audit.event(&Event::ConfigReloaded(ConfigReloaded {
                    by: by.to_owned(),
                    file: file.clone(),
                    changed: report.changed.clone(),
                    needs_restart: report.needs_restart.clone(),
                }));
                info!(by, %file, changed = ?report.changed, "configuration reloaded");
                if !report.needs_restart.is_empty() {
                    warn!(
                        by,
                        %file,
                        needs_restart = ?report.needs_restart,
                        "these changed settings take effect only when the gateway restarts"
                    );
                }
                Ok(report)
            }
            Err(message) => {
                let _ = self.audit.event(&Event::ConfigReloadFailed(ConfigReloadFailed {
                    by: by.to_owned(),
                    file,
                    error: message.clone(),
                }));
                error!(by, error = %message, "configuration reload failed; the configuration in force stays");
                Err(ReloadError::Invalid(message))
            }
        }
    }

    /// Check the whole file first, then apply; an error leaves everything as it was.
    fn apply(&self, source: &mut Source) -> Result<ReloadReport, String> {
        let path = source.path.clone();
        let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let table = parse_table(&path, &text)?;
        let config: GatewayConfig = toml::from_str(&text).map_err(|e| toml_error(&path, &text, &e))?;
        let config = config.checked(&path).map_err(|e| format!("{e:#}"))?;
        let access = AccessList::from_config(&config.ssh).map_err(|e| format!("{}: {e}", path.display()))?;

        let mut changed = Vec::new();
        diff(Some(&source.applied), Some(&table), "", &mut changed);
        changed.retain(|k| is_live(k));
        let mut needs_restart = Vec::new();
        diff(Some(&source.started), Some(&table), "", &mut needs_restart);
        needs_restart.retain(|k| !is_live(k));

        let touched = |prefix: &str| changed.iter().any(|k| k == prefix || k.starts_with(&format!("{prefix}.")));
        // Started before anything changes: a webhook that cannot start (its secret file is
        // unreadable) fails the reload as a whole.
        let webhooks = if touched("audit.webhooks") {
            let hooks = Webhooks::start(&config.audit.webhooks, self.dead_letter.clone(), self.shutdown.clone())
                .map_err(|e| format!("{}: {e:#}", path.display()))?;
            Some(hooks)
        } else {
            None
        };
        if touched("log_level") {
            let filter = config.log_level.as_deref().unwrap_or(&source.base_log);
            if let Err(e) = postern_tunnel::set_log_filter(filter) {
                warn!(error = %e, "cannot change the log level");
            }
        }
        if changed.iter().any(|k| k.starts_with("ssh.")) {
            self.access.replace_config(access);
            // Live sessions are re-checked now, against the new users and limits.
            self.access_changed.notify_one();
        }
        if let Some(hooks) = webhooks {
            self.audit.set_webhooks(hooks);
        }
        source.applied = table;
        Ok(ReloadReport { file: path.display().to_string(), changed, needs_restart })
    }
}

/// Whether a change to `key` takes effect on reload.
pub fn is_live(key: &str) -> bool {
    LIVE_KEYS.iter().any(|l| key == *l || key.strip_prefix(l).is_some_and(|rest| rest.starts_with('.')))
}

fn parse_table(path: &Path, text: &str) -> Result<toml::Table, String> {
    toml::from_str(text).map_err(|e| toml_error(path, text, &e))
}

/// `FILE line L, column C: MESSAGE`, without the excerpt of the line toml adds (the line
/// may hold a secret, and this goes into the audit log).
fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("{} line {line}, column {column}: {}", path.display(), e.message().trim().replace('\n', "; "))
        }
        None => format!("{}: {}", path.display(), e.message().trim().replace('\n', "; ")),
    }
}

/// The dotted keys that differ between `old` and `new` (tables are compared key by key,
/// anything else — values, arrays such as `ssh.users` — as a whole), sorted.
fn diff(old: Option<&toml::Table>, new: Option<&toml::Table>, prefix: &str, out: &mut Vec<String>) {
    let empty = toml::Table::new();
    let (old, new) = (old.unwrap_or(&empty), new.unwrap_or(&empty));
    let keys = new.keys().chain(old.keys().filter(|k| !new.contains_key(*k)));
    for key in keys {
        let name = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        match (old.get(key), new.get(key)) {
            (a, b) if a == b => {}
            (a, b) if a.is_none_or(toml::Value::is_table) && b.is_none_or(toml::Value::is_table) => {
                diff(a.and_then(toml::Value::as_table), b.and_then(toml::Value::as_table), &name, out);
            }
            _ => out.push(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(old: &str, new: &str) -> Vec<String> {
        let mut out = Vec::new();
        diff(Some(&toml::from_str(old).unwrap()), Some(&toml::from_str(new).unwrap()), "", &mut out);
        out
    }

    #[test]
    fn changed_keys_are_named_by_their_dotted_path() {
        assert!(keys("[ssh]\nlisten = \"127.0.0.1:1\"\n", "[ssh]\nlisten = \"127.0.0.1:1\"\n").is_empty());
        assert_eq!(keys("[ssh]\nlisten = \"127.0.0.1:1\"\n", "[ssh]\nlisten = \"127.0.0.1:2\"\n"), ["ssh.listen"]);
        // A section that appears or goes names each of its keys.
        assert_eq!(keys("", "[metrics]\nlisten = \"127.0.0.1:9\"\n"), ["metrics.listen"]);
        assert_eq!(keys("log_level = \"debug\"\n", ""), ["log_level"]);
        // Arrays of tables are one key.
        assert_eq!(
            keys("[[ssh.users]]\nname = \"a\"\n", "[[ssh.users]]\nname = \"a\"\n[[ssh.users]]\nname = \"b\"\n"),
            ["ssh.users"]
        );
    }

    #[test]
    fn only_the_listed_keys_change_live() {
        for k in ["ssh.users", "ssh.max_session", "audit.webhooks", "log_level", "ssh.profiles"] {
            assert!(is_live(k), "{k}");
        }
        for k in ["ssh.listen", "ssh.users_extra", "tunnel.listen", "audit.retention", "data_dir", "web.cert_file"] {
            assert!(!is_live(k), "{k}");
        }
    }

    #[test]
    fn a_syntax_error_names_the_file_and_line_without_the_line_itself() {
        let text = "[ssh]\nlisten = \"127.0.0.1:1\"\nsecret = \"hunter2\n";
        let e = parse_table(Path::new("/etc/postern/gateway.toml"), text).unwrap_err();
        assert!(e.starts_with("/etc/postern/gateway.toml line 3, column "), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }
}
