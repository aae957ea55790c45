//! Gateway configuration (`gateway.toml`). Every field has a default, so no file is needed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
pub use postern_core::duration::{parse_duration, parse_limit};
use serde::Deserialize;

mod oidc;
pub use oidc::{ClientSecret, OidcConfig, check_provider_url, default_mfa_amr, is_loopback};

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Where the gateway keeps its database, CA, audit log and admin socket.
    pub data_dir: PathBuf,
    pub tunnel: TunnelConfig,
    pub ssh: SshConfig,
    pub audit: AuditConfig,
    pub rdp: RdpConfig,
    pub web: WebConfig,
    pub metrics: MetricsConfig,
    pub store: StoreConfig,
    pub cluster: ClusterConfig,
    pub identity: IdentityConfig,
    pub testing: TestingConfig,
    /// The log filter (a level such as "debug", or tracing directives such as
    /// "info,postern_gateway=debug"). Set, it overrides `--log`/`POSTERN_LOG`, at start and at
    /// every reload; removed again, a reload goes back to the `--log` one.
    pub log_level: Option<String>,
}

/// Who users are beyond their registered keys (docs/ssh.md, "Certificates from the gateway").
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityConfig {
    /// How long a user certificate from the gateway's user CA is valid unless `postern user
    /// cert --ttl` says otherwise ("8h"; at most "7d").
    pub cert_ttl: String,
    /// `[identity.oidc]`: single sign-on with an OpenID Connect provider (docs/sso.md).
    pub oidc: Option<OidcConfig>,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self { cert_ttl: "8h".into(), oidc: None }
    }
}

/// The longest a gateway-issued user certificate may be valid.
pub const MAX_CERT_TTL: Duration = Duration::from_secs(7 * 86400);

/// Several gateways serving as one cluster on a shared store (docs/scale-out.md). Unset (the
/// default): a single gateway, exactly as before.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// This gateway's id, unique in the cluster: 1 to 32 of `a-z`, `0-9` and `-`, starting
    /// with a letter or digit. It names the gateway's audit segments, its agents' locations and
    /// its live sessions in the shared store. Setting it needs a shared `[store] url`.
    pub gateway_id: Option<String>,
    /// The cluster master key that seals the cluster's keys in the store: a file of 64 hex
    /// digits (`postern audit keygen FILE`) ...
    pub key_file: Option<PathBuf>,
    /// ... or a program holding it (a KMS or vault client; the protocol of
    /// `[audit.encryption] key_command`, docs/audit.md).
    pub key_command: Option<Vec<String>>,
    /// `host:port` the other gateways reach this one's tunnel listener at, to reach agents
    /// connected here. Default: `[tunnel] advertise`, else the listen address.
    pub peer_address: Option<String>,
}

/// Whether `id` is a valid `[cluster] gateway_id` (the rule gateway certificates are
/// checked by, so the two cannot drift apart).
pub use postern_tunnel::peer::valid_gateway_id;

/// Where users, policies, grants, agents, tokens and the session history are kept
/// (docs/scale-out.md).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE` for a PostgreSQL database; unset
    /// (the default): the embedded SQLite file `postern.db` in the data directory.
    pub url: Option<String>,
}

/// The RDP front door (docs/rdp.md). Off by default: a gateway without Windows hosts opens
/// no RDP port.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RdpConfig {
    pub enabled: bool,
    /// TCP address RDP clients connect to (with a routing token from `postern rdp`).
    pub listen: SocketAddr,
    /// `host:port` written into `.rdp` files and FreeRDP command lines, if clients reach the
    /// gateway by another name. Default: `[ssh] public_host` and the listen port.
    pub public_address: Option<String>,
    /// How long a routing token stays valid ("5m"; at most "1h"). Tokens are single-use.
    pub token_ttl: String,
    /// Time a client has to send the preconnection blob and connection request ("5s").
    pub handshake_timeout: String,
    /// Most connections still before their token (reading the preconnection blob and
    /// connection request) at once; more are closed on arrival.
    pub max_handshakes: usize,
    /// Most of those from one source address.
    pub max_handshakes_per_source: usize,
}

/// `[metrics]`: Prometheus metrics and health endpoints over plain HTTP
/// (docs/operations.md); off by default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// TCP address serving `/metrics`, `/healthz` and `/readyz` ("127.0.0.1:9190"). No
    /// authentication and no TLS: bind it to loopback or a management network. Absent: no
    /// listener.
    pub listen: Option<SocketAddr>,
}

/// `[web]`: the browser console over HTTPS (docs/web.md); off by default.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    pub enabled: bool,
    /// TCP address the console listens on (HTTPS).
    pub listen: SocketAddr,
    /// The console's address as browsers reach it (`https://gw.example.com:8443`): links from
    /// `postern web-login` point there, and requests that change something must come from
    /// it (Origin check). Default: `https://` with `[ssh] public_host` (or the listen
    /// address) and the listen port.
    pub public_url: Option<String>,
    /// PEM certificate chain and private key. Default: a certificate from the gateway's own
    /// CA (the tunnel CA, `ca.crt` in the data directory) for the public URL's host.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// How long a browser stays signed in ("8h").
    pub session_ttl: String,
    /// How long a `postern web-login` link can be used ("2m"; once).
    pub link_ttl: String,
    /// Members of these groups see everyone's sessions in the console's history, replay them
    /// and watch live ones; everyone else sees only their own. Empty (the default): nobody
    /// sees others'.
    pub admin_groups: Vec<String>,
}

impl Default for WebConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            public_url: None,
            cert_file: None,
            key_file: None,
            session_ttl: "8h".into(),
            link_ttl: "2m".into(),
            admin_groups: Vec::new(),
        }
    }
}

impl Default for RdpConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([0, 0, 0, 0], 3389)),
            public_address: None,
            token_ttl: "5m".into(),
            handshake_timeout: "5s".into(),
            max_handshakes: 256,
            max_handshakes_per_source: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Refuse a session that should be recorded when its recording or its audit events
    /// cannot be written (default), instead of running it unrecorded. See docs/audit.md.
    pub fail_closed: bool,
    /// Delete session recordings older than this ("90d"; "0", the default, keeps them).
    /// Checked at start and hourly; each run that deletes something is an audit event.
    pub retention: String,
    /// Where to POST events (see docs/audit.md).
    pub webhooks: Vec<crate::audit::webhooks::WebhookConfig>,
    /// Also print every event (one JSON line) to standard output, for log shippers.
    pub stdout: bool,
    /// Start a new event-log segment when the current one reaches this many bytes ...
    pub rotate_bytes: u64,
    /// ... or this age ("1d"; "0": size only).
    pub rotate_after: String,
    /// Delete event-log segments older than this ("0", the default, keeps them). Only whole,
    /// closed segments, oldest first, and (with [audit.s3]) only once uploaded.
    pub log_retention: String,
    /// Also record what users type in shell sessions. Off by default: input includes
    /// passwords typed at prompts that do not echo.
    pub record_input: bool,
    /// Encryption at rest of recordings and event-log segments.
    pub encryption: EncryptionConfig,
    /// Copy closed segments and finished recordings to S3-compatible object storage.
    pub s3: Option<crate::audit::ship::S3Config>,
    /// The gateway refuses to start when the log does not reach the last checkpoint it
    /// signed (the log was cut back). Set this to that checkpoint's seq (the refusal names
    /// it) to accept the loss and go on; it has no effect on any other checkpoint.
    pub accept_truncation: Option<u64>,
    /// A session's recording stops before it passes this many bytes (default 1 GiB; 0: no
    /// limit). Failing closed the session is then ended; failing open it goes on unrecorded.
    pub max_recording_bytes: u64,
    /// Free space the recordings' file system must have for a new logged session to start:
    /// bytes ("1GiB"), a percentage of the file system ("5%") or "0" (no check). Not set:
    /// the smaller of 1 GiB and 5 % of the file system.
    pub min_free_space: Option<String>,
    /// Refusals of connections that never proved who they are (RDP connections without a
    /// valid token, enrollments with a bad token) are written at most once per source
    /// address per interval: the first at once, then one summary with a `count` ("10s";
    /// "0" writes every refusal).
    pub refusal_interval: String,
    /// Keep sessions in the session history (`postern sessions --all`, `postern replay`)
    /// for this long after they end ("400d", the default; "0" keeps them) ...
    pub history_retention: String,
    /// ... and at most this many (the newest; default 200000, 0: no limit). Both are
    /// applied at start and hourly.
    pub history_max_rows: u64,
}

impl AuditConfig {
    /// `[audit] min_free_space`, parsed (checked at load).
    pub fn min_free_space(&self) -> anyhow::Result<crate::recording::space::MinFree> {
        match &self.min_free_space {
            None => Ok(crate::recording::space::MinFree::Auto),
            Some(s) => {
                crate::recording::space::parse_min_free(s).map_err(|e| anyhow::anyhow!("[audit] min_free_space: {e}"))
            }
        }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            fail_closed: true,
            retention: "0".into(),
            webhooks: Vec::new(),
            stdout: false,
            rotate_bytes: 64 << 20,
            rotate_after: "1d".into(),
            log_retention: "0".into(),
            record_input: false,
            encryption: EncryptionConfig::default(),
            s3: None,
            accept_truncation: None,
            max_recording_bytes: 1 << 30,
            min_free_space: None,
            refusal_interval: "10s".into(),
            history_retention: "400d".into(),
            history_max_rows: 200_000,
        }
    }
}

/// Master keys for envelope encryption (docs/audit.md). Without `key_file` or
/// `key_command`, files are written in the clear.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EncryptionConfig {
    /// File holding the master key (64 hex digits; `postern audit keygen FILE`).
    pub key_file: Option<PathBuf>,
    /// Or a program wrapping data keys with a key it holds (KMS, vault): see docs/audit.md.
    pub key_command: Option<Vec<String>>,
    /// Retired master key files, still used to read what they sealed.
    pub previous_key_files: Vec<PathBuf>,
}

impl EncryptionConfig {
    /// The keyring these settings describe (empty: encryption off).
    pub fn keyring(&self) -> anyhow::Result<crate::audit::seal::Keyring> {
        use crate::audit::seal::{FileKey, KeyProvider, Keyring, master_key};
        let active = master_key("[audit.encryption]", self.key_file.as_deref(), self.key_command.as_deref())?;
        if active.is_none() && !self.previous_key_files.is_empty() {
            anyhow::bail!("[audit.encryption]: previous_key_files needs a key_file or key_command");
        }
        let mut keys: Vec<std::sync::Arc<dyn KeyProvider>> = active.into_iter().collect();
        for f in &self.previous_key_files {
            keys.push(std::sync::Arc::new(FileKey::load(f)?));
        }
        Ok(Keyring::new(keys))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SshConfig {
    /// TCP address of the SSH front door; `enabled = false` turns it off.
    pub listen: SocketAddr,
    pub enabled: bool,
    /// Instances are reached as `<name>.<suffix>` with the generated ssh config.
    pub suffix: String,
    /// Name (or address) clients use for the gateway, for `postern ssh-config`
    /// and the host certificate. Default: this machine's hostname.
    pub public_host: Option<String>,
    /// Environment variables a client may pass (`SendEnv`/`SetEnv`), besides `TERM`.
    pub accept_env: Vec<String>,
    /// Users and what they may reach, until the policy engine replaces this list.
    pub users: Vec<UserConfig>,
    /// Shell profiles users may be given (see docs/ssh.md).
    pub profiles: Vec<postern_core::profile::Profile>,
    /// User certificate authorities: certificates they sign log in as the user named in a
    /// principal (who must still be listed in `users`, with or without keys).
    pub user_ca_keys: Vec<String>,
    /// A session without input for this long is warned, then closed ("30m"; "0" disables).
    pub idle_timeout: String,
    /// Longest a session may last ("12h"; "0" disables). Warned before it ends.
    pub max_session: String,
    /// Ciphers offered to clients (OpenSSH names). Default: AES-GCM only (see
    /// docs/ssh.md); add "chacha20-poly1305@openssh.com" for hosts without AES instructions.
    pub ciphers: Option<Vec<String>>,
    /// Most connections that have not authenticated yet, in all; more are closed at once
    /// (OpenSSH's MaxStartups).
    pub max_startups: usize,
    /// Most connections that have not authenticated yet from one source address.
    pub max_startups_per_source: usize,
    /// A connection not authenticated this long after it was accepted is closed ("30s";
    /// "0" disables; OpenSSH's LoginGraceTime).
    pub login_grace_time: String,
    /// Longest wait before an authentication attempt by one user from one source address
    /// is looked at, after repeated failures ("30s"; "0" turns the backoff off).
    pub auth_delay_max: String,
    /// Longest wait for any attempt from a source address with many failures, whatever the
    /// user: short, so others at that address (an administrator, a NAT) still get in.
    pub auth_delay_max_per_source: String,
}

impl Default for SshConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 2222)),
            enabled: true,
            suffix: "postern".into(),
            public_host: None,
            accept_env: vec!["LANG".into(), "LC_*".into()],
            users: Vec::new(),
            profiles: Vec::new(),
            user_ca_keys: Vec::new(),
            idle_timeout: "30m".into(),
            max_session: "12h".into(),
            ciphers: None,
            max_startups: 100,
            max_startups_per_source: 10,
            login_grace_time: "30s".into(),
            auth_delay_max: "30s".into(),
            auth_delay_max_per_source: "2s".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TunnelConfig {
    /// UDP address agents connect to (QUIC).
    pub listen: SocketAddr,
    /// TCP address of the fallback transport (TLS over TCP) for agents whose network drops
    /// UDP: `"same"` (the default: the listen address and port), `"off"`, or an address
    /// (agents then need `[agent] tcp_port`).
    pub tcp_listen: String,
    /// Address printed in join commands, if agents reach the gateway by another name; a
    /// list for a cluster (`["gw-a.example.com:4433", "gw-b.example.com:4433"]`): the join
    /// command then carries one `--gateway` per entry.
    #[serde(deserialize_with = "one_or_many")]
    pub advertise: Vec<String>,
    /// Lifetime of agent certificates ("30d", "12h", ...); agents renew at two thirds.
    pub agent_cert_ttl: String,
    /// Most agents connected at once; more are refused.
    pub max_agents: usize,
    /// Most enrollments (`postern-agent join`) in progress at once; more are refused.
    pub max_enrollments: usize,
    /// Most enrollments in progress from one source address.
    pub max_enrollments_per_source: usize,
}

/// Switches for load tests. Never enable in production.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TestingConfig {
    /// Allow the admin socket's `bulk_enroll` (agent identities without tokens).
    pub bulk_enroll: bool,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            tunnel: TunnelConfig::default(),
            ssh: SshConfig::default(),
            audit: AuditConfig::default(),
            rdp: RdpConfig::default(),
            web: WebConfig::default(),
            metrics: MetricsConfig::default(),
            store: StoreConfig::default(),
            cluster: ClusterConfig::default(),
            identity: IdentityConfig::default(),
            testing: TestingConfig::default(),
            log_level: None,
        }
    }
}

impl TunnelConfig {
    /// Where the TCP transport listens: `None` when it is off; port 0 means the port the
    /// QUIC listener got.
    pub fn tcp_address(&self) -> anyhow::Result<Option<SocketAddr>> {
        match self.tcp_listen.trim() {
            "off" => Ok(None),
            "same" | "" => Ok(Some(SocketAddr::new(self.listen.ip(), 0))),
            other => other.parse().map(Some).map_err(|_| {
                anyhow::anyhow!(
                    "[tunnel] tcp_listen = {other:?}: expected \"same\", \"off\" or an address like 0.0.0.0:443"
                )
            }),
        }
    }
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 4433)),
            tcp_listen: "same".into(),
            advertise: Vec::new(),
            agent_cert_ttl: "30d".into(),
            max_agents: 50_000,
            max_enrollments: 64,
            max_enrollments_per_source: 8,
        }
    }
}

/// A cap in all and its per-source part (`NAME` and `NAME_per_source`): both at least 1, the
/// part no larger than the whole.
/// A string or a list of strings (`advertise = "a"` or `advertise = ["a", "b"]`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

fn check_caps(path: &Path, name: &str, total: usize, per_source: usize) -> anyhow::Result<()> {
    if total == 0 || per_source == 0 {
        anyhow::bail!("{}: {name} and {name}_per_source must be at least 1", path.display());
    }
    if per_source > total {
        anyhow::bail!("{}: {name}_per_source may not exceed {name}", path.display());
    }
    Ok(())
}

/// Longest routing-token lifetime `[rdp] token_ttl` may set.
pub const MAX_RDP_TOKEN_TTL: Duration = Duration::from_secs(3600);

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
    /// Allowed actions: shell, exec, sftp, port-forward, ssh-passthrough, rdp. Default: all.
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

/// `/var/lib/postern` for root, else `$XDG_DATA_HOME/postern` or `~/.local/share/postern`.
pub fn default_data_dir() -> PathBuf {
    if nix::unistd::Uid::effective().is_root() {
        PathBuf::from("/var/lib/postern")
    } else if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        PathBuf::from(d).join("postern")
    } else if let Some(h) = std::env::var_os("HOME") {
        PathBuf::from(h).join(".local/share/postern")
    } else {
        PathBuf::from("postern-data")
    }
}

/// Whether the config file at `path` sets `[section] key` itself, rather than leaving it to
/// the default: quickstart's loopback defaults give way to what a file says, and only to that.
pub fn file_sets(path: &Path, section: &str, key: &str) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let table: toml::Table = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(table.get(section).and_then(toml::Value::as_table).is_some_and(|t| t.contains_key(key)))
}

impl GatewayConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: Self = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        cfg.checked(path)
    }

    /// The checks [`load`](Self::load) makes after parsing `path` (and the OIDC settings'
    /// preparation), for a config parsed elsewhere (the reload).
    pub fn checked(mut self, path: &Path) -> anyhow::Result<Self> {
        let cfg = &mut self;
        if let Some(level) = &cfg.log_level {
            postern_tunnel::check_log_filter(level)
                .map_err(|e| anyhow::anyhow!("{}: log_level {level:?}: {e}", path.display()))?;
        }
        parse_duration(&cfg.tunnel.agent_cert_ttl)
            .with_context(|| format!("{}: tunnel.agent_cert_ttl", path.display()))?;
        parse_limit(&cfg.ssh.idle_timeout).with_context(|| format!("{}: ssh.idle_timeout", path.display()))?;
        parse_limit(&cfg.ssh.max_session).with_context(|| format!("{}: ssh.max_session", path.display()))?;
        parse_limit(&cfg.ssh.login_grace_time)
            .with_context(|| format!("{}: [ssh] login_grace_time", path.display()))?;
        parse_limit(&cfg.ssh.auth_delay_max).with_context(|| format!("{}: [ssh] auth_delay_max", path.display()))?;
        parse_limit(&cfg.ssh.auth_delay_max_per_source)
            .with_context(|| format!("{}: [ssh] auth_delay_max_per_source", path.display()))?;
        if cfg.ssh.max_startups == 0 || cfg.ssh.max_startups_per_source == 0 {
            anyhow::bail!("{}: [ssh] max_startups and max_startups_per_source must be at least 1", path.display());
        }
        if cfg.ssh.max_startups_per_source > cfg.ssh.max_startups {
            anyhow::bail!("{}: [ssh] max_startups_per_source may not exceed max_startups", path.display());
        }
        parse_limit(&cfg.audit.retention).with_context(|| format!("{}: [audit] retention", path.display()))?;
        parse_limit(&cfg.audit.log_retention).with_context(|| format!("{}: [audit] log_retention", path.display()))?;
        parse_limit(&cfg.audit.rotate_after).with_context(|| format!("{}: [audit] rotate_after", path.display()))?;
        parse_limit(&cfg.audit.history_retention)
            .with_context(|| format!("{}: [audit] history_retention", path.display()))?;
        let ttl = parse_duration(&cfg.rdp.token_ttl).with_context(|| format!("{}: [rdp] token_ttl", path.display()))?;
        if ttl > MAX_RDP_TOKEN_TTL {
            anyhow::bail!(
                "{}: [rdp] token_ttl may be at most 1h (tokens are meant to be used at once)",
                path.display()
            );
        }
        parse_duration(&cfg.rdp.handshake_timeout)
            .with_context(|| format!("{}: [rdp] handshake_timeout", path.display()))?;
        check_caps(path, "[rdp] max_handshakes", cfg.rdp.max_handshakes, cfg.rdp.max_handshakes_per_source)?;
        if let Some(bad) = cfg.tunnel.advertise.iter().find(|a| a.trim().is_empty() || a.contains(char::is_whitespace))
        {
            anyhow::bail!(
                "{}: [tunnel] advertise {bad:?}: each address is HOST or HOST:PORT, without spaces",
                path.display()
            );
        }
        check_caps(
            path,
            "[tunnel] max_enrollments",
            cfg.tunnel.max_enrollments,
            cfg.tunnel.max_enrollments_per_source,
        )?;
        parse_limit(&cfg.audit.refusal_interval)
            .with_context(|| format!("{}: [audit] refusal_interval", path.display()))?;
        cfg.audit.min_free_space().with_context(|| path.display().to_string())?;
        if cfg.audit.max_recording_bytes != 0 && cfg.audit.max_recording_bytes < 4096 {
            anyhow::bail!("{}: [audit] max_recording_bytes must be at least 4096 (or 0: no limit)", path.display());
        }
        if cfg.audit.rotate_bytes < 4096 {
            anyhow::bail!("{}: [audit] rotate_bytes must be at least 4096", path.display());
        }
        if let Some(url) = &cfg.store.url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            anyhow::bail!(
                "{}: [store] url must be a postgres:// URL (leave it unset for the embedded SQLite database)",
                path.display()
            );
        }
        let cert_ttl = parse_duration(&cfg.identity.cert_ttl)
            .with_context(|| format!("{}: [identity] cert_ttl", path.display()))?;
        if cert_ttl > MAX_CERT_TTL {
            anyhow::bail!(
                "{}: [identity] cert_ttl may be at most 7d (certificates are meant to be short-lived)",
                path.display()
            );
        }
        if let Some(oidc) = &mut cfg.identity.oidc {
            oidc.prepare(path)?;
        }
        for (key, value) in [("session_ttl", &cfg.web.session_ttl), ("link_ttl", &cfg.web.link_ttl)] {
            let d = parse_duration(value).with_context(|| format!("{}: [web] {key}", path.display()))?;
            if d.is_zero() || d > Duration::from_secs(7 * 86400) {
                anyhow::bail!("{}: [web] {key} must be between 1s and 7d", path.display());
            }
        }
        if cfg.web.cert_file.is_some() != cfg.web.key_file.is_some() {
            anyhow::bail!("{}: [web] cert_file and key_file go together", path.display());
        }
        if let Some(url) = &cfg.web.public_url
            && (!url.starts_with("https://") || url.trim_end_matches('/').matches('/').count() != 2)
        {
            anyhow::bail!("{}: [web] public_url must be https://HOST[:PORT], got {url:?}", path.display());
        }
        if let Some(id) = &cfg.cluster.gateway_id {
            if !valid_gateway_id(id) {
                anyhow::bail!(
                    "{}: [cluster] gateway_id {id:?} must be 1 to 32 of a-z, 0-9 and '-', starting with a letter or digit",
                    path.display()
                );
            }
            if cfg.cluster.key_file.is_none() && cfg.cluster.key_command.is_none() {
                anyhow::bail!(
                    "{}: [cluster] gateway_id needs the cluster master key: set [cluster] key_file (or key_command)",
                    path.display()
                );
            }
            if cfg.store.url.is_none() {
                anyhow::bail!(
                    "{}: [cluster] gateway_id needs a store shared by the cluster: set [store] url to a postgres:// URL",
                    path.display()
                );
            }
        }
        Ok(self)
    }

    /// `[web] session_ttl` and `link_ttl`, checked at load.
    pub fn web_ttls(&self) -> (Duration, Duration) {
        let get = |s: &str, d: u64| parse_duration(s).unwrap_or(Duration::from_secs(d));
        (get(&self.web.session_ttl, 8 * 3600), get(&self.web.link_ttl, 120))
    }

    /// `[identity] cert_ttl`, checked at load.
    pub fn cert_ttl(&self) -> Duration {
        parse_duration(&self.identity.cert_ttl).map(|d| d.min(MAX_CERT_TTL)).unwrap_or(Duration::from_secs(8 * 3600))
    }

    /// `[cluster] gateway_id`: this gateway's id in a cluster, `None` for a single gateway.
    pub fn gateway_id(&self) -> Option<&str> {
        self.cluster.gateway_id.as_deref()
    }

    /// `[rdp] token_ttl`, checked at load; the default when it does not parse.
    pub fn rdp_token_ttl(&self) -> Duration {
        parse_duration(&self.rdp.token_ttl).map(|d| d.min(MAX_RDP_TOKEN_TTL)).unwrap_or(Duration::from_secs(300))
    }

    /// `[rdp] handshake_timeout`, checked at load.
    pub fn rdp_handshake_timeout(&self) -> Duration {
        parse_duration(&self.rdp.handshake_timeout).unwrap_or(Duration::from_secs(5))
    }

    /// `[audit] refusal_interval`, checked at load (zero: every refusal is written).
    pub fn refusal_interval(&self) -> Duration {
        parse_limit(&self.audit.refusal_interval).map(Option::unwrap_or_default).unwrap_or(Duration::from_secs(10))
    }

    /// `[ssh] login_grace_time`, checked at load: `None` when disabled with "0".
    pub fn ssh_login_grace_time(&self) -> Option<Duration> {
        parse_limit(&self.ssh.login_grace_time).unwrap_or(Some(Duration::from_secs(30)))
    }

    /// `[ssh] auth_delay_max` and `auth_delay_max_per_source`, checked at load: `None` when
    /// the backoff is off (`auth_delay_max = "0"`). A per-source cap of "0" means no delay
    /// for the source as a whole (the per-user one still applies).
    pub fn ssh_auth_delays(&self) -> Option<(Duration, Duration)> {
        let per_user = parse_limit(&self.ssh.auth_delay_max).unwrap_or(Some(Duration::from_secs(30)))?;
        let per_source = parse_limit(&self.ssh.auth_delay_max_per_source)
            .unwrap_or(Some(Duration::from_secs(2)))
            .unwrap_or_default();
        Some((per_user, per_source))
    }

    pub fn agent_cert_ttl(&self) -> anyhow::Result<Duration> {
        parse_duration(&self.tunnel.agent_cert_ttl).context("tunnel.agent_cert_ttl")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_unknown_fields() {
        let cfg: GatewayConfig = toml::from_str("[tunnel]\nlisten = \"127.0.0.1:5000\"\n").unwrap();
        assert_eq!(cfg.tunnel.listen.port(), 5000);
        assert_eq!(cfg.tunnel.agent_cert_ttl, "30d");
        assert!(toml::from_str::<GatewayConfig>("[tunnel]\nlisen = \"x\"\n").is_err());
    }

    #[test]
    fn metrics_listener_is_off_unless_an_address_is_given() {
        assert!(toml::from_str::<GatewayConfig>("").unwrap().metrics.listen.is_none());
        let cfg: GatewayConfig = toml::from_str("[metrics]\nlisten = \"127.0.0.1:9190\"\n").unwrap();
        assert_eq!(cfg.metrics.listen, Some(SocketAddr::from(([127, 0, 0, 1], 9190))));
        assert!(toml::from_str::<GatewayConfig>("[metrics]\nlisten = \"9190\"\n").is_err());
        assert!(toml::from_str::<GatewayConfig>("[metrics]\nenabled = true\n").is_err());
    }

    #[test]
    fn advertise_is_one_address_or_a_list() {
        let one: GatewayConfig = toml::from_str("[tunnel]\nadvertise = \"gw:4433\"\n").unwrap();
        assert_eq!(one.tunnel.advertise, ["gw:4433"]);
        let many: GatewayConfig = toml::from_str("[tunnel]\nadvertise = [\"a:1\", \"b:2\"]\n").unwrap();
        assert_eq!(many.tunnel.advertise, ["a:1", "b:2"]);
        assert!(GatewayConfig::default().tunnel.advertise.is_empty());
        assert!(toml::from_str::<GatewayConfig>("[tunnel]\nadvertise = 5\n").is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.toml");
        std::fs::write(&p, "[tunnel]\nadvertise = [\"a:1\", \"\"]\n").unwrap();
        let err = format!("{:#}", GatewayConfig::load(&p).unwrap_err());
        assert!(err.contains("[tunnel] advertise \"\""), "{err}");
    }

    #[test]
    fn file_sets_tells_set_keys_from_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.toml");
        std::fs::write(&p, "[tunnel]\nlisten = \"0.0.0.0:5000\"\n[rdp]\nenabled = true\n").unwrap();
        assert!(file_sets(&p, "tunnel", "listen").unwrap());
        assert!(!file_sets(&p, "ssh", "listen").unwrap());
        assert!(!file_sets(&p, "rdp", "listen").unwrap());
        assert!(file_sets(&dir.path().join("missing.toml"), "ssh", "listen").is_err());
    }

    #[test]
    fn a_gateway_id_is_checked_and_needs_a_shared_store() {
        let dir = tempfile::tempdir().unwrap();
        let load = |text: &str| {
            let p = dir.path().join("g.toml");
            std::fs::write(&p, text).unwrap();
            GatewayConfig::load(&p)
        };
        let pg = "[store]\nurl = \"postgres://p@127.0.0.1/p\"\n";
        let member =
            |id: &str| format!("{pg}[cluster]\nkey_file = \"/etc/postern/cluster.key\"\ngateway_id = {id:?}\n");
        assert_eq!(load("").unwrap().gateway_id(), None);
        assert_eq!(load(&member("gw-a1")).unwrap().gateway_id(), Some("gw-a1"));
        for bad in ["", "-a", "GW", "a/b", "a.b", &"a".repeat(33)] {
            let e = load(&member(bad)).unwrap_err();
            assert!(format!("{e:#}").contains("gateway_id"), "{bad:?}: {e:#}");
        }
        let e = load("[cluster]\nkey_file = \"/k\"\ngateway_id = \"gw-a\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("[store] url"), "{e:#}");
        let e = load(&format!("{pg}[cluster]\ngateway_id = \"gw-a\"\n")).unwrap_err();
        assert!(format!("{e:#}").contains("key_file"), "{e:#}");
    }

    #[test]
    fn ssh_startup_settings_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let load = |ssh: &str| {
            let p = dir.path().join("g.toml");
            std::fs::write(&p, format!("[ssh]\n{ssh}\n")).unwrap();
            GatewayConfig::load(&p)
        };
        let cfg = load("").unwrap();
        assert_eq!((cfg.ssh.max_startups, cfg.ssh.max_startups_per_source), (100, 10));
        assert_eq!(cfg.ssh_login_grace_time(), Some(Duration::from_secs(30)));
        assert_eq!(load("login_grace_time = \"0\"").unwrap().ssh_login_grace_time(), None);
        assert_eq!(cfg.ssh_auth_delays(), Some((Duration::from_secs(30), Duration::from_secs(2))));
        assert_eq!(load("auth_delay_max = \"0\"").unwrap().ssh_auth_delays(), None);
        assert_eq!(
            load("auth_delay_max_per_source = \"0\"").unwrap().ssh_auth_delays(),
            Some((Duration::from_secs(30), Duration::ZERO))
        );
        assert!(load("auth_delay_max = \"long\"").is_err());
        assert!(load("login_grace_time = \"soon\"").is_err());
        assert!(load("max_startups = 0").is_err());
        assert!(load("max_startups_per_source = 0").is_err());
        assert!(load("max_startups = 5\nmax_startups_per_source = 6").is_err());
        assert!(load("max_startups = 5\nmax_startups_per_source = 5").is_ok());
    }

    #[test]
    fn unauthenticated_caps_and_refusal_interval_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let load = |text: &str| {
            let p = dir.path().join("g.toml");
            std::fs::write(&p, text).unwrap();
            GatewayConfig::load(&p)
        };
        let cfg = load("").unwrap();
        assert_eq!((cfg.rdp.max_handshakes, cfg.rdp.max_handshakes_per_source), (256, 10));
        assert_eq!(cfg.rdp_handshake_timeout(), Duration::from_secs(5));
        assert_eq!((cfg.tunnel.max_enrollments, cfg.tunnel.max_enrollments_per_source), (64, 8));
        assert_eq!(cfg.refusal_interval(), Duration::from_secs(10));
        assert_eq!(load("[audit]\nrefusal_interval = \"0\"").unwrap().refusal_interval(), Duration::ZERO);
        assert!(load("[audit]\nrefusal_interval = \"often\"").is_err());
        assert!(load("[rdp]\nmax_handshakes_per_source = 0").is_err());
        assert!(load("[rdp]\nmax_handshakes = 4\nmax_handshakes_per_source = 5").is_err());
        assert!(load("[tunnel]\nmax_enrollments = 0").is_err());
        assert!(load("[tunnel]\nmax_enrollments = 8\nmax_enrollments_per_source = 9").is_err());
    }

    #[test]
    fn identity_oidc_is_checked_at_load_naming_the_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.toml");
        assert!(GatewayConfig::load(&p).is_err());
        std::fs::write(&p, "").unwrap();
        assert!(GatewayConfig::load(&p).unwrap().identity.oidc.is_none());
        std::fs::write(&p, "[identity.oidc]\nissuer = \"http://idp.example.com\"\nclient_id = \"c\"\n").unwrap();
        let e = format!("{:#}", GatewayConfig::load(&p).unwrap_err());
        assert!(e.contains("g.toml: [identity.oidc] issuer") && e.contains("https"), "{e}");
        std::fs::write(&p, "[identity.oidc]\nissuer = \"https://idp.example.com\"\nclient_id = \"c\"\nclient_secret_env = \"CARGO_PKG_NAME\"\n").unwrap();
        let cfg = GatewayConfig::load(&p).unwrap();
        assert!(cfg.identity.oidc.unwrap().client_secret.is_some());
    }
}
