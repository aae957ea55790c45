//! Client side: talk to a Postern gateway over SSH as a user, with the SSH identity the
//! user already has (ssh-agent, or key files), checking the gateway's host key or host
//! certificate against known_hosts files (the `@cert-authority` line from `postern
//! ssh-config`).
//!
//! It is the SDK the `postern` command itself is built on: portals and automation can use
//! the same calls.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use postern_gateway::client::{Client, ClientOptions};
//! // ssh-agent or ~/.ssh/id_*; the gateway's host CA from ~/.ssh/postern_known_hosts.
//! let opts = ClientOptions::new("gw.example.com:2222", "alice");
//! let gateway = Client::connect(&opts, None).await?;
//! for i in gateway.instances(Some("env=prod")).await? {
//!     if !i.online || !i.actions.iter().any(|a| a == "exec") {
//!         continue;
//!     }
//!     // One connection per instance (`alice%NAME`), as with `ssh -p 2222 alice%NAME@gw`.
//!     let on = Client::connect(&opts, Some(&i.name)).await?;
//!     let out = on.exec_capture("uptime", &[], 1 << 20).await?;
//!     println!("{}: exit {:?}: {}", i.name, out.exit_code, String::from_utf8_lossy(&out.stdout.data));
//! }
//! let token = gateway.rdp_token("win-01").await?;
//! println!("xfreerdp /v:{} /pcb:{}", token.rdp_address, token.token);
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use russh::ChannelMsg;
use russh::keys::ssh_key::certificate::CertType;
use russh::keys::ssh_key::{Certificate, HashAlg, PublicKey};
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use serde::Deserialize;

/// Bound on connecting, key exchange and authentication together.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on one gateway command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer to a gateway command.
const MAX_REPLY: usize = 64 << 20;

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `host` or `host:port` of the gateway's SSH front door (port 2222 when omitted).
    pub gateway: String,
    /// The Postern user name.
    pub user: String,
    /// Private key files to try. Empty: ssh-agent (`SSH_AUTH_SOCK`), then ~/.ssh/id_ed25519,
    /// id_ecdsa, id_rsa.
    pub identity_files: Vec<PathBuf>,
    /// known_hosts files to trust. Empty: ~/.ssh/known_hosts and ~/.ssh/postern_known_hosts.
    pub known_hosts: Vec<PathBuf>,
}

impl ClientOptions {
    pub fn new(gateway: &str, user: &str) -> Self {
        Self { gateway: gateway.to_owned(), user: user.to_owned(), identity_files: Vec::new(), known_hosts: Vec::new() }
    }

    fn host_port(&self) -> anyhow::Result<(String, u16)> {
        split_host_port(&self.gateway, 2222)
    }

    fn known_hosts_files(&self) -> Vec<PathBuf> {
        if !self.known_hosts.is_empty() {
            return self.known_hosts.clone();
        }
        let home = home_dir();
        vec![home.join(".ssh/known_hosts"), home.join(".ssh/postern_known_hosts")]
    }
}

/// `host`, `host:port`, `[v6]:port` or a bare IPv6 address.
pub fn split_host_port(s: &str, default_port: u16) -> anyhow::Result<(String, u16)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, tail) = rest.split_once(']').with_context(|| format!("missing ']' in {s:?}"))?;
        let port = match tail.strip_prefix(':') {
            Some(p) => p.parse().with_context(|| format!("invalid port in {s:?}"))?,
            None if tail.is_empty() => default_port,
            None => bail!("unexpected {tail:?} after ']' in {s:?}"),
        };
        return Ok((host.to_owned(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => {
            Ok((h.to_owned(), p.parse().with_context(|| format!("invalid port in {s:?}"))?))
        }
        _ if s.is_empty() => bail!("empty gateway address"),
        _ => Ok((s.to_owned(), default_port)),
    }
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"))
}

/// What the gateway answers to `rdp-token`.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct RdpToken {
    pub token: String,
    pub instance: String,
    pub expires_at: i64,
    pub expires_in: u64,
    pub rdp_address: String,
}

/// An instance as `ls` shows it to a user.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct Instance {
    pub name: String,
    pub id: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub online: bool,
    pub platform: String,
    pub hostname: String,
    pub last_seen: Option<i64>,
    /// What this user may do there now (`shell`, `exec`, `port-forward`, `rdp`, ...).
    pub actions: Vec<String>,
}

/// Bounded capture of one output stream.
#[derive(Debug, Clone, Default)]
pub struct Stream {
    pub data: Vec<u8>,
    /// Total bytes seen, including what was not kept.
    pub total: u64,
}

impl Stream {
    fn push(&mut self, b: &[u8], limit: usize) {
        self.total += b.len() as u64;
        let room = limit.saturating_sub(self.data.len());
        self.data.extend_from_slice(b.get(..room.min(b.len())).unwrap_or_default());
    }
}

/// What a command run with [`Client::exec_capture`] produced.
#[derive(Debug, Clone, Default)]
pub struct Captured {
    pub exit_code: Option<u32>,
    pub signal: Option<String>,
    pub stdout: Stream,
    pub stderr: Stream,
}

/// An authenticated SSH connection to the gateway.
pub struct Client {
    handle: russh::client::Handle<Verifier>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

impl Client {
    /// Connect and authenticate. With `instance`, the connection is to that instance
    /// (`user%instance`), as needed for [`Client::open_rdp`].
    pub async fn connect(opts: &ClientOptions, instance: Option<&str>) -> anyhow::Result<Client> {
        tokio::time::timeout(CONNECT_TIMEOUT, Self::connect_inner(opts, instance))
            .await
            .with_context(|| format!("connecting to the gateway {} timed out", opts.gateway))?
    }

    async fn connect_inner(opts: &ClientOptions, instance: Option<&str>) -> anyhow::Result<Client> {
        let (host, port) = opts.host_port()?;
        let verdict = Arc::new(Mutex::new(None));
        let trust = known_hosts::load(&opts.known_hosts_files(), &host, port);
        // As OpenSSH does: ask for a host certificate only when a CA is trusted for the host.
        let mut preferred = russh::Preferred::default();
        if !trust.authorities.is_empty() {
            use russh::keys::ssh_key::{Algorithm, EcdsaCurve};
            preferred.host_key_certificates = std::borrow::Cow::Owned(vec![
                Algorithm::Ed25519,
                Algorithm::Ecdsa { curve: EcdsaCurve::NistP256 },
                Algorithm::Rsa { hash: Some(HashAlg::Sha512) },
            ]);
        }
        let verifier = Verifier { host: host.clone(), port, trust, verdict: verdict.clone() };
        let config = Arc::new(russh::client::Config {
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_max: 3,
            preferred,
            ..Default::default()
        });
        let mut handle = match russh::client::connect(config, (host.as_str(), port), verifier).await {
            Ok(h) => h,
            Err(e) => {
                if let Some(why) = verdict.lock().ok().and_then(|v| v.clone()) {
                    bail!("{why}");
                }
                return Err(anyhow::Error::new(e).context(format!("connecting to the gateway {host}:{port}")));
            }
        };
        let login = match instance {
            Some(i) => format!("{}%{i}", opts.user),
            None => opts.user.clone(),
        };
        if authenticate(&mut handle, &login, &opts.identity_files).await? {
            Ok(Client { handle })
        } else {
            bail!(
                "the gateway did not accept any of your SSH keys for user {:?} (tried {}); \
                 is your key registered (`postern user key add`)?",
                opts.user,
                if opts.identity_files.is_empty() {
                    "ssh-agent and ~/.ssh/id_*".to_owned()
                } else {
                    describe(&opts.identity_files)
                }
            )
        }
    }

    /// Run a gateway command and parse its JSON answer.
    pub async fn gateway_command(&self, command: &str) -> anyhow::Result<serde_json::Value> {
        tokio::time::timeout(COMMAND_TIMEOUT, self.command_inner(command))
            .await
            .with_context(|| format!("the gateway did not answer {command:?} in time"))?
    }

    async fn command_inner(&self, command: &str) -> anyhow::Result<serde_json::Value> {
        let mut ch = self.handle.channel_open_session().await.context("opening a channel to the gateway")?;
        ch.exec(true, command).await?;
        let (mut out, mut err, mut status) = (Vec::new(), Vec::new(), None);
        while let Some(msg) = ch.wait().await {
            match msg {
                // `ls` on a large fleet is megabytes; anything past this bound is not a reply.
                ChannelMsg::Data { data } if out.len() < MAX_REPLY => out.extend_from_slice(&data),
                ChannelMsg::Data { .. } => bail!("the gateway's answer is larger than {} MiB", MAX_REPLY >> 20),
                ChannelMsg::ExtendedData { data, .. } if err.len() < 64 << 10 => err.extend_from_slice(&data),
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        if status != Some(0) {
            let msg = String::from_utf8_lossy(&err);
            let msg = msg.trim().trim_start_matches("postern: ");
            bail!("{}", if msg.is_empty() { "the gateway refused the request" } else { msg });
        }
        serde_json::from_slice(&out).context("the gateway's answer is not JSON (is this a Postern gateway?)")
    }

    /// A single-use routing token for the RDP front door.
    pub async fn rdp_token(&self, instance: &str) -> anyhow::Result<RdpToken> {
        let v = self.gateway_command(&format!("rdp-token {instance}")).await?;
        serde_json::from_value(v).context("unexpected answer to rdp-token")
    }

    /// A byte stream to the instance's RDP server (connect with `instance` set).
    pub async fn open_rdp(&self) -> anyhow::Result<russh::ChannelStream<russh::client::Msg>> {
        let ch = self
            .handle
            .channel_open_direct_tcpip(postern_core::command::RDP_DESTINATION, 3389, "127.0.0.1", 0)
            .await
            .context("the gateway refused RDP to this instance")?;
        Ok(ch.into_stream())
    }

    /// The instances this user may reach now (any action allowed), optionally only those
    /// matching a label selector (`env=prod,role!=db`).
    pub async fn instances(&self, selector: Option<&str>) -> anyhow::Result<Vec<Instance>> {
        let cmd = match selector {
            Some(s) => format!("ls {s}"),
            None => "ls".to_owned(),
        };
        serde_json::from_value(self.gateway_command(&cmd).await?).context("unexpected answer to ls")
    }

    /// A session channel on this connection (connect with `instance` set to run things there).
    pub async fn session_channel(&self) -> anyhow::Result<russh::Channel<russh::client::Msg>> {
        self.handle.channel_open_session().await.context("opening a session channel")
    }

    /// Run `command` on the instance this client is connected to and collect its output
    /// (at most `limit` bytes of each stream are kept; the rest is counted, not stored).
    pub async fn exec_capture(&self, command: &str, env: &[(&str, &str)], limit: usize) -> anyhow::Result<Captured> {
        let mut ch = self.session_channel().await?;
        for (k, v) in env {
            ch.set_env(false, *k, *v).await?;
        }
        ch.exec(true, command).await?;
        let mut out = Captured::default();
        while let Some(msg) = ch.wait().await {
            match msg {
                ChannelMsg::Data { data } => out.stdout.push(&data, limit),
                ChannelMsg::ExtendedData { data, .. } => out.stderr.push(&data, limit),
                ChannelMsg::ExitStatus { exit_status } => out.exit_code = Some(exit_status),
                ChannelMsg::ExitSignal { signal_name, .. } => out.signal = Some(format!("{signal_name:?}")),
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        Ok(out)
    }

    /// A TCP stream to `host:port` as seen from the instance (policy's `forward_to` and the
    /// agent's `tcp_allow` decide whether it opens).
    pub async fn open_tcp(&self, host: &str, port: u16) -> anyhow::Result<russh::ChannelStream<russh::client::Msg>> {
        let ch = self
            .handle
            .channel_open_direct_tcpip(host, u32::from(port), "127.0.0.1", 0)
            .await
            .with_context(|| format!("the gateway refused a forward to {host}:{port}"))?;
        Ok(ch.into_stream())
    }

    /// Whether the SSH connection has ended.
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }
}

fn describe(files: &[PathBuf]) -> String {
    files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// Try ssh-agent keys, then key files; true once one is accepted.
async fn authenticate(
    handle: &mut russh::client::Handle<Verifier>,
    login: &str,
    files: &[PathBuf],
) -> anyhow::Result<bool> {
    let rsa_hash = handle.best_supported_rsa_hash().await.ok().flatten().flatten();
    if files.is_empty()
        && let Ok(mut agent) = russh::keys::agent::client::AgentClient::connect_env().await
    {
        for id in agent.request_identities().await.unwrap_or_default() {
            let ok = match &id {
                russh::keys::agent::AgentIdentity::PublicKey { key, .. } => handle
                    .authenticate_publickey_with(login, key.clone(), rsa_hash, &mut agent)
                    .await
                    .map(|r| r.success())
                    .unwrap_or(false),
                russh::keys::agent::AgentIdentity::Certificate { certificate, .. } => handle
                    .authenticate_certificate_with(login, certificate.clone(), rsa_hash, &mut agent)
                    .await
                    .map(|r| r.success())
                    .unwrap_or(false),
            };
            if ok {
                return Ok(true);
            }
        }
    }
    let explicit = !files.is_empty();
    let candidates: Vec<PathBuf> = if explicit {
        files.to_vec()
    } else {
        ["id_ed25519", "id_ecdsa", "id_rsa"].iter().map(|n| home_dir().join(".ssh").join(n)).collect()
    };
    for path in candidates {
        if !explicit && !path.exists() {
            continue;
        }
        let key = match russh::keys::load_secret_key(&path, None) {
            Ok(k) => Arc::new(k),
            Err(e) if explicit => {
                bail!("cannot use {}: {e} (a key with a passphrase must be loaded into ssh-agent)", path.display())
            }
            Err(_) => continue,
        };
        let hash = if key.algorithm().is_rsa() { rsa_hash } else { None };
        let cert = cert_beside(&path);
        let result = match cert {
            Some(cert) => handle.authenticate_openssh_cert(login, key, cert).await,
            None => handle.authenticate_publickey(login, PrivateKeyWithHashAlg::new(key, hash)).await,
        };
        if result.map(|r| r.success()).unwrap_or(false) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `KEY-cert.pub` next to a key file, as OpenSSH uses it.
fn cert_beside(key: &Path) -> Option<Certificate> {
    let path = PathBuf::from(format!("{}-cert.pub", key.display()));
    russh::keys::load_openssh_certificate(path).ok()
}

/// Checks the gateway's host key against known_hosts (plain keys and `@cert-authority`).
struct Verifier {
    host: String,
    port: u16,
    /// The known_hosts entries for this host, read once per connection.
    trust: known_hosts::Trust,
    verdict: Arc<Mutex<Option<String>>>,
}

impl russh::client::Handler for Verifier {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let result = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => self.trust.check_key(key),
            PublicKeyOrCertificate::Certificate(cert) => self.trust.check_certificate(cert, &self.host),
        };
        match result {
            Ok(()) => Ok(true),
            Err(why) => {
                if let Ok(mut v) = self.verdict.lock() {
                    *v = Some(format!(
                        "the gateway {}:{} is not trusted: {why}. Put the `@cert-authority` line from \
                         `postern ssh-config` in ~/.ssh/postern_known_hosts (or pass --known-hosts FILE)",
                        self.host, self.port
                    ));
                }
                Ok(false)
            }
        }
    }
}

/// The parts of OpenSSH known_hosts files that apply to one host.
pub mod known_hosts {
    use super::*;
    use russh::keys::ssh_key::Fingerprint;

    #[derive(Debug, Default)]
    pub struct Trust {
        pub keys: Vec<PublicKey>,
        pub authorities: Vec<PublicKey>,
        pub revoked: Vec<PublicKey>,
    }

    /// Entries for `host` on `port` from these files (missing files are skipped).
    pub fn load(files: &[PathBuf], host: &str, port: u16) -> Trust {
        let mut t = Trust::default();
        for f in files {
            if let Ok(text) = std::fs::read_to_string(f) {
                parse_into(&mut t, &text, host, port);
            }
        }
        t
    }

    pub fn parse_into(t: &mut Trust, text: &str, host: &str, port: u16) {
        let name = if port == 22 { host.to_owned() } else { format!("[{host}]:{port}") };
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let first = words.next().unwrap_or_default();
            let (marker, patterns) =
                if first.starts_with('@') { (Some(first), words.next()) } else { (None, Some(first)) };
            let (Some(patterns), Some(kind), Some(b64)) = (patterns, words.next(), words.next()) else { continue };
            if !host_matches(patterns, &name) {
                continue;
            }
            let Ok(key) = PublicKey::from_openssh(&format!("{kind} {b64}")) else { continue };
            match marker {
                None => t.keys.push(key),
                Some("@cert-authority") => t.authorities.push(key),
                Some("@revoked") => t.revoked.push(key),
                Some(_) => {}
            }
        }
    }

    /// OpenSSH host pattern lists: `a,b,*.example.com,!bad`, and hashed `|1|salt|hash`.
    fn host_matches(patterns: &str, name: &str) -> bool {
        if let Some(hashed) = patterns.strip_prefix("|1|") {
            return hashed_matches(hashed, name);
        }
        let mut hit = false;
        for p in patterns.split(',') {
            match p.strip_prefix('!') {
                Some(neg) if postern_core::util::glob_match(neg, name) => return false,
                Some(_) => {}
                None => hit |= postern_core::util::glob_match(p, name),
            }
        }
        hit
    }

    fn hashed_matches(hashed: &str, name: &str) -> bool {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let Some((salt, hash)) = hashed.split_once('|') else { return false };
        let (Ok(salt), Ok(hash)) = (b64.decode(salt), b64.decode(hash)) else { return false };
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &salt);
        ring::hmac::verify(&key, name.as_bytes(), &hash).is_ok()
    }

    impl Trust {
        pub fn check_key(&self, key: &PublicKey) -> Result<(), String> {
            if self.revoked.iter().any(|r| r.key_data() == key.key_data()) {
                return Err("its host key is marked @revoked".into());
            }
            if self.keys.iter().any(|k| k.key_data() == key.key_data()) {
                Ok(())
            } else if self.keys.is_empty() {
                Err(format!("no known_hosts entry for it (host key {})", key.fingerprint(HashAlg::Sha256)))
            } else {
                Err(format!("its host key {} differs from the one in known_hosts", key.fingerprint(HashAlg::Sha256)))
            }
        }

        pub fn check_certificate(&self, cert: &Certificate, host: &str) -> Result<(), String> {
            if self.revoked.iter().any(|r| r.key_data() == cert.public_key() || r.key_data() == cert.signature_key()) {
                return Err("its host certificate or CA is marked @revoked".into());
            }
            let cas: Vec<Fingerprint> = self.authorities.iter().map(|k| k.fingerprint(HashAlg::Sha256)).collect();
            if cas.is_empty() {
                return Err("no @cert-authority entry for it".into());
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            cert.validate_at(now, &cas).map_err(|e| format!("its host certificate does not verify: {e}"))?;
            if cert.cert_type() != CertType::Host {
                return Err("it presented a user certificate as host certificate".into());
            }
            if !cert.valid_principals().iter().any(|p| postern_core::util::glob_match(p, host) || p == host) {
                return Err(format!("its host certificate does not name {host:?}"));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("gw", 2222).unwrap(), ("gw".into(), 2222));
        assert_eq!(split_host_port("gw:22", 2222).unwrap(), ("gw".into(), 22));
        assert_eq!(split_host_port("[::1]:2200", 2222).unwrap(), ("::1".into(), 2200));
        assert_eq!(split_host_port("::1", 2222).unwrap(), ("::1".into(), 2222));
        assert!(split_host_port("gw:x", 2222).is_err());
        assert!(split_host_port("", 2222).is_err());
    }

    #[test]
    fn known_hosts_patterns_and_markers() {
        let ed = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
        let text = format!(
            "# comment\n[gw.example]:2222,[localhost]:2222 {ed}\n\
             @cert-authority *.postern,[gw.example]:2222 {ed} ca\n\
             other.example {ed}\n[gw.example]:2200 {ed}\n!gw.example,* {ed}\n"
        );
        let mut t = known_hosts::Trust::default();
        known_hosts::parse_into(&mut t, &text, "gw.example", 2222);
        // The first line, and the last: its `!gw.example` does not exclude `[gw.example]:2222`.
        assert_eq!((t.keys.len(), t.authorities.len()), (2, 1));
        let mut t = known_hosts::Trust::default();
        known_hosts::parse_into(&mut t, &text, "web-01.postern", 22);
        // `*` matches, but the negated pattern only excludes gw.example itself.
        assert_eq!((t.keys.len(), t.authorities.len()), (1, 1));
        let key = PublicKey::from_openssh(ed).unwrap();
        assert!(t.check_key(&key).is_ok());
        let mut none = known_hosts::Trust::default();
        known_hosts::parse_into(&mut none, &text, "unknown.example", 2222);
        assert_eq!(none.keys.len(), 1, "only the `*` line applies");
    }

    #[test]
    fn hashed_known_hosts_entry() {
        // `ssh-keygen -H` form of "[127.0.0.1]:2222" with salt "salt-salt-salt-salt!".
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let salt = b"salt-salt-salt-salt!";
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, salt);
        let tag = ring::hmac::sign(&key, b"[127.0.0.1]:2222");
        let line = format!(
            "|1|{}|{} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n",
            b64.encode(salt),
            b64.encode(tag.as_ref())
        );
        let mut t = known_hosts::Trust::default();
        known_hosts::parse_into(&mut t, &line, "127.0.0.1", 2222);
        assert_eq!(t.keys.len(), 1);
        let mut t = known_hosts::Trust::default();
        known_hosts::parse_into(&mut t, &line, "127.0.0.2", 2222);
        assert!(t.keys.is_empty());
    }
}
