//! The user-command contract: what `ssh -p 2222 alice@gateway COMMAND` answers, as types
//! both the gateway (which serializes them) and the client SDK (which parses them) use, so
//! the two cannot drift apart. Every answer is one JSON document; a refusal is a message on
//! stderr and exit status 1.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The gateway commands, as `help` and unknown commands print them.
pub const USAGE: &str = "gateway commands: whoami | ls [LABEL-SELECTOR] | rdp-token INSTANCE | ssh-config [KNOWN_HOSTS_FILE] | run-begin JSON | run-end JSON | logout";

/// The special `direct-tcpip` host that means "the instance's RDP service" (the agent's
/// configured `rdp_address`): `ssh -L 13389:@rdp:3389 alice%win-01@gateway`.
pub const RDP_DESTINATION: &str = "@rdp";

/// The `exit-signal` name with which the gateway marks a session channel it refused
/// (access denied, unknown or offline instance, ...): sent before the refusal's text and
/// exit status 1, with the refusal's text as the signal's error message. OpenSSH ignores
/// it (plain `ssh` shows the text and exits 1, as for any remote failure); the `postern`
/// client reports the text as its own error and exits 255, so a script can tell a refusal
/// from a remote `exit 1`. (RFC 4254 6.10: other signal names take the form `name@domain`.)
pub const REFUSED_SIGNAL: &str = "REFUSED@postern";

/// Where `ssh-config` points `UserKnownHostsFile` when the user names no file.
pub const DEFAULT_KNOWN_HOSTS: &str = "~/.ssh/postern_known_hosts";

/// `whoami`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoAmI {
    pub user: String,
    pub source: String,
    /// The user's groups (from the identity provider for a user who signs in with it).
    #[serde(default)]
    pub groups: Vec<String>,
    /// When the connection authenticated with a certificate from `postern login` or
    /// `postern user cert`: which one, and what it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<CertificateInfo>,
}

/// A gateway-issued certificate, as `whoami` and `login` describe it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateInfo {
    /// 16 hex digits.
    pub serial: String,
    /// Unix seconds.
    pub valid_before: u64,
    /// The login used a second factor.
    pub mfa: bool,
}

/// The SSH user name of the sign-in connection: `postern login` authenticates as it with
/// the `none` method, and the connection can do nothing but the `login-*` commands. (Not a
/// valid user name, so it never names a user.)
pub const LOGIN_USER: &str = "postern:login";

/// `login-begin JSON` on the sign-in connection: start the authorization-code flow with a
/// loopback redirect. The answer is [`LoginStarted`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginBegin {
    /// `http://127.0.0.1:PORT/...` (or `[::1]`, `localhost`), where the client listens.
    pub redirect_uri: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginStarted {
    /// Open this in a browser.
    pub authorization_url: String,
    /// Echoed by the identity provider on the redirect; names the flow in `login-finish`.
    pub state: String,
}

/// `login-finish JSON`: the code the redirect brought, for the flow `state` names on this
/// connection, and the public key to certify. The answer is [`LoginResult`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginFinish {
    pub state: String,
    pub code: String,
    /// OpenSSH public key line of the key the client generated.
    pub public_key: String,
}

/// `login-device JSON`: the device authorization grant. The gateway writes a
/// [`DevicePrompt`] line at once, then (when the user approved, or the code expired) the
/// [`LoginResult`] line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginDevice {
    pub public_key: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicePrompt {
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    pub user_code: String,
    /// Seconds the code stays valid.
    pub expires_in: u64,
}

/// A successful sign-in: the certificate and who it says the user is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginResult {
    pub user: String,
    pub groups: Vec<String>,
    /// OpenSSH certificate line (`ssh-ed25519-cert-v01@openssh.com AAAA...`).
    pub certificate: String,
    pub info: CertificateInfo,
    /// The user was created by this sign-in.
    pub created: bool,
    /// `@cert-authority` line for the gateway's host certificates, for known_hosts.
    pub known_hosts: String,
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
    /// The OS logins this user may choose there for shell, exec and sftp (`ssh
    /// LOGIN@INSTANCE.<suffix>`), the default first; empty: none to choose, sessions run
    /// as the agent's own user.
    #[serde(default)]
    pub logins: Vec<String>,
    /// The shell profiles this user may choose there (`POSTERN_PROFILE`, `--profile`), the
    /// default first; empty: none to choose.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<String>,
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

/// `ssh-config [KNOWN_HOSTS_FILE]`: the config text as printed, and its parts, so that a
/// client can write it with its own identity files (`postern ssh-config -i KEY --install`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshConfig {
    /// The Host blocks and the known_hosts line, as `postern ssh-config` prints them.
    pub config: String,
    /// The Postern identity the gateway hop (ProxyJump) logs in as.
    #[serde(default)]
    pub user: String,
    /// An address the gateway's SSH door listens on (a name or an IP address, no brackets).
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub port: u16,
    /// Instances are `<name>.<suffix>`.
    #[serde(default)]
    pub suffix: String,
    /// The `@cert-authority` line trusting the gateway's host CA.
    #[serde(default)]
    pub known_hosts_line: String,
}

/// A value for an ssh_config keyword: quoted when it has spaces.
fn ssh_config_value(v: &str) -> String {
    if v.contains(char::is_whitespace) { format!("\"{v}\"") } else { v.to_owned() }
}

impl SshConfig {
    /// The Host alias of the gateway hop: it carries the gateway's address, port, the
    /// person's identity and their key, for this hop only (a `Host <gateway>` block with
    /// `IdentitiesOnly` would also bind other SSH servers on that machine to the key).
    pub fn jump_alias(&self) -> String {
        format!("{}-gateway", self.suffix)
    }

    /// The `~/.ssh/config` Host blocks: `ssh LOGIN@INSTANCE.<suffix>` jumps through the
    /// gateway as `user` (ProxyJump), and the user name before `@` is the OS login. With
    /// `identity_files`, both hops use those keys and only those.
    pub fn host_blocks(&self, known_hosts_file: &str, identity_files: &[String]) -> String {
        let known = format!("    UserKnownHostsFile ~/.ssh/known_hosts {}\n", ssh_config_value(known_hosts_file));
        let mut ids: String =
            identity_files.iter().map(|f| format!("    IdentityFile {}\n", ssh_config_value(f))).collect();
        if !identity_files.is_empty() {
            ids.push_str("    IdentitiesOnly yes\n");
        }
        let alias = self.jump_alias();
        format!(
            "Host {alias}\n    HostName {host}\n    Port {port}\n    User {user}\n{known}{ids}\
             Host *.{suffix}\n    ProxyJump {user}@{alias}\n{known}{ids}\
             Host {host}\n{known}",
            host = self.host,
            port = self.port,
            user = self.user,
            suffix = self.suffix,
        )
    }

    /// What `postern ssh-config` prints: the Host blocks, a blank line, the known_hosts line.
    pub fn printed(&self, known_hosts_file: &str, identity_files: &[String]) -> String {
        format!(
            "# Postern: add to ~/.ssh/config (or let `postern ssh-config --install` do it)\n{blocks}\n\
             # Postern: put this line in {known_hosts_file} (it trusts the gateway's host CA\n\
             # for *.{suffix} and the gateway itself; host key checking stays strict)\n\
             {line}\n",
            blocks = self.host_blocks(known_hosts_file, identity_files),
            suffix = self.suffix,
            line = self.known_hosts_line,
        )
    }
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
