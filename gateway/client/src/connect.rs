//! One authenticated SSH connection to the gateway ([`Client`]): authentication with the
//! identity the user already has (ssh-agent, `~/.ssh/id_*` with `-cert.pub` beside it, or
//! explicit key files), the gateway's host key or host certificate checked against
//! known_hosts, and the calls made over it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postern_core::command::{Instance, LOGIN_USER, RDP_DESTINATION, RdpToken, SshConfig, WhoAmI};
use russh::ChannelMsg;
use russh::keys::ssh_key::{Certificate, HashAlg};
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use serde::de::DeserializeOwned;

use crate::error::{ClientError, describe};
use crate::known_hosts;

/// Bound on connecting, key exchange and authentication together.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on one gateway command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer to a gateway command (`ls` on a large fleet is megabytes).
const MAX_REPLY: usize = 64 << 20;

/// How long a connection the gateway closed before its SSH banner is retried, the first
/// pause between tries and the longest one. A time budget, not a count: how long a busy
/// gateway takes to let everyone in depends on how many clients arrive at once and how
/// loaded the machine is, and a count tuned on a quiet machine gives up on a busy one.
const STARTUP_RETRY_BUDGET: Duration = Duration::from_secs(10);
const STARTUP_RETRY_FIRST: Duration = Duration::from_millis(50);
const STARTUP_RETRY_MAX: Duration = Duration::from_secs(1);

/// `d` plus up to half of it again, so that clients that were turned away together do not
/// come back together.
fn jittered(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    let half_ms = u64::try_from(d.as_millis() / 2).unwrap_or(u64::MAX).max(1);
    d + Duration::from_millis(u64::from(u16::from_le_bytes(b)) % half_ms)
}

/// Retry `attempt` while the gateway closes the connection before its banner (see
/// [`Client::connect`]), for up to [`STARTUP_RETRY_BUDGET`].
async fn retry_early_drops<T, F, Fut>(mut attempt: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let give_up = tokio::time::Instant::now() + STARTUP_RETRY_BUDGET;
    let mut pause = STARTUP_RETRY_FIRST;
    loop {
        match attempt().await {
            Err(ClientError::Handshake { .. }) if tokio::time::Instant::now() + pause < give_up => {
                tokio::time::sleep(jittered(pause)).await;
                pause = pause.saturating_mul(2).min(STARTUP_RETRY_MAX);
            }
            other => return other,
        }
    }
}

/// Largest refusal message kept from a gateway command's stderr.
const MAX_REFUSAL: usize = 64 << 10;

/// Where and as whom to connect.
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

    fn host_port(&self) -> Result<(String, u16), ClientError> {
        split_host_port(&self.gateway, 2222)
    }

    /// The known_hosts files read for the gateway's identity.
    pub fn known_hosts_files(&self) -> Vec<PathBuf> {
        if !self.known_hosts.is_empty() {
            return self.known_hosts.clone();
        }
        let home = home_dir();
        vec![home.join(".ssh/known_hosts"), home.join(".ssh/postern_known_hosts")]
    }

    fn identities_tried(&self) -> String {
        if self.identity_files.is_empty() {
            "ssh-agent and ~/.ssh/id_*".to_owned()
        } else {
            describe(&self.identity_files)
        }
    }
}

/// `host`, `host:port`, `[v6]:port` or a bare IPv6 address.
pub fn split_host_port(s: &str, default_port: u16) -> Result<(String, u16), ClientError> {
    let invalid = |problem: &str| ClientError::InvalidAddress { address: s.to_owned(), problem: problem.to_owned() };
    let port = |p: &str| p.parse::<u16>().map_err(|_| invalid("invalid port"));
    if let Some(rest) = s.strip_prefix('[') {
        let (host, tail) = rest.split_once(']').ok_or_else(|| invalid("missing ']'"))?;
        let port = match tail.strip_prefix(':') {
            Some(p) => port(p)?,
            None if tail.is_empty() => default_port,
            None => return Err(invalid(&format!("unexpected {tail:?} after ']'"))),
        };
        return Ok((host.to_owned(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Ok((h.to_owned(), port(p)?)),
        _ if s.is_empty() => Err(invalid("empty gateway address")),
        _ => Ok((s.to_owned(), default_port)),
    }
}

fn home_dir() -> PathBuf {
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"))
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

/// Which output stream a chunk of a command's output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
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
    /// The description of the last channel-open failure (numbered): russh hands only the
    /// reason code to the opener, the text (the gateway's reason) to the handler.
    open_failures: tokio::sync::watch::Receiver<(u64, String)>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

fn channel_error(what: &str) -> impl FnOnce(russh::Error) -> ClientError + '_ {
    move |source| ClientError::Channel { what: what.to_owned(), source }
}

impl Client {
    /// Connect and authenticate. With `instance`, the connection is to that instance
    /// (`user%instance`), as needed for [`Client::exec_capture`], [`Client::open_tcp`] and
    /// [`Client::open_rdp`].
    pub async fn connect(opts: &ClientOptions, instance: Option<&str>) -> Result<Client, ClientError> {
        tokio::time::timeout(CONNECT_TIMEOUT, Self::connect_retrying(opts, instance)).await.unwrap_or_else(|_| {
            Err(ClientError::ConnectTimeout { address: opts.gateway.clone(), after: CONNECT_TIMEOUT })
        })
    }

    /// A gateway that has too many connections still authenticating from this address
    /// closes new ones before the SSH banner (`[ssh] max_startups_per_source`, as OpenSSH's
    /// MaxStartups): that is a handshake failure worth a few retries with growing, jittered
    /// pauses (e.g. `postern run` opening many connections at once), for up to
    /// [`STARTUP_RETRY_BUDGET`]. Every other error is final at once.
    async fn connect_retrying(opts: &ClientOptions, instance: Option<&str>) -> Result<Client, ClientError> {
        retry_early_drops(|| Self::connect_inner(opts, instance)).await
    }

    async fn handshake_retrying(
        opts: &ClientOptions,
    ) -> Result<(russh::client::Handle<Verifier>, tokio::sync::watch::Receiver<(u64, String)>), ClientError> {
        retry_early_drops(|| Self::handshake(opts)).await
    }

    /// TCP, SSH version exchange, key exchange and the gateway's host key check.
    async fn handshake(
        opts: &ClientOptions,
    ) -> Result<(russh::client::Handle<Verifier>, tokio::sync::watch::Receiver<(u64, String)>), ClientError> {
        let (host, port) = opts.host_port()?;
        let address = format!("{host}:{port}");
        let verdict = Arc::new(Mutex::new(None));
        let files = opts.known_hosts_files();
        let trust = known_hosts::load(&files, &host, port);
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
        let (failures_tx, open_failures) = tokio::sync::watch::channel((0, String::new()));
        let verifier = Verifier { host: host.clone(), trust, verdict: verdict.clone(), open_failures: failures_tx };
        let config = Arc::new(russh::client::Config {
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_max: 3,
            preferred,
            ..Default::default()
        });
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|source| ClientError::Connect { address: address.clone(), source })?;
        let handle = match russh::client::connect_stream(config, tcp, verifier).await {
            Ok(h) => h,
            Err(source) => {
                if let Some(reason) = verdict.lock().ok().and_then(|mut v| v.take()) {
                    return Err(ClientError::HostKeyNotTrusted { address, reason, files });
                }
                return Err(ClientError::Handshake { address, source });
            }
        };
        Ok((handle, open_failures))
    }

    async fn connect_inner(opts: &ClientOptions, instance: Option<&str>) -> Result<Client, ClientError> {
        let (mut handle, open_failures) = Self::handshake(opts).await?;
        let login = match instance {
            Some(i) => format!("{}%{i}", opts.user),
            None => opts.user.clone(),
        };
        match authenticate(&mut handle, &login, &opts.identity_files).await? {
            Authenticated::Yes => Ok(Client { handle, open_failures }),
            Authenticated::Refused => {
                Err(ClientError::AuthenticationRefused { user: opts.user.clone(), tried: opts.identities_tried() })
            }
            Authenticated::NothingOffered => {
                Err(ClientError::NoIdentity { user: opts.user.clone(), tried: opts.identities_tried() })
            }
        }
    }

    /// Run a gateway command (`ls`, `whoami`, `rdp-token X`, ...) and parse its JSON answer.
    /// A refusal is [`ClientError::CommandRefused`] with the gateway's message.
    pub async fn gateway_command(&self, command: &str) -> Result<serde_json::Value, ClientError> {
        tokio::time::timeout(COMMAND_TIMEOUT, self.command_inner(command)).await.unwrap_or_else(|_| {
            Err(ClientError::CommandTimeout { command: command.to_owned(), after: COMMAND_TIMEOUT })
        })
    }

    /// A gateway command whose answer is one of the contract types of
    /// [`postern_core::command`].
    pub async fn gateway_command_as<T: DeserializeOwned>(&self, command: &str) -> Result<T, ClientError> {
        let value = self.gateway_command(command).await?;
        let verb = command.split_whitespace().next().unwrap_or_default().to_owned();
        serde_json::from_value(value).map_err(|source| ClientError::UnexpectedReply { command: verb, source })
    }

    async fn command_inner(&self, command: &str) -> Result<serde_json::Value, ClientError> {
        let out = self.command_output(command, |_| {}).await?;
        serde_json::from_slice(&out).map_err(|source| ClientError::NotJson { command: command.to_owned(), source })
    }

    /// A command's standard output once it succeeded, each complete line also given to
    /// `on_line` as it arrives; its refusal otherwise.
    async fn command_output(&self, command: &str, mut on_line: impl FnMut(&str)) -> Result<Vec<u8>, ClientError> {
        let mut ch =
            self.handle.channel_open_session().await.map_err(channel_error("opening a channel to the gateway"))?;
        ch.exec(true, command).await.map_err(channel_error("sending a command to the gateway"))?;
        let (mut out, mut err, mut status) = (Vec::new(), Vec::new(), None);
        let mut seen = 0;
        while let Some(msg) = ch.wait().await {
            match msg {
                ChannelMsg::Data { data } if out.len() < MAX_REPLY => {
                    out.extend_from_slice(&data);
                    while let Some(end) = out.get(seen..).and_then(|rest| rest.iter().position(|&b| b == b'\n')) {
                        on_line(&String::from_utf8_lossy(out.get(seen..seen + end).unwrap_or_default()));
                        seen += end + 1;
                    }
                }
                ChannelMsg::Data { .. } => {
                    return Err(ClientError::ReplyTooLarge { command: command.to_owned(), limit: MAX_REPLY });
                }
                ChannelMsg::ExtendedData { data, .. } if err.len() < MAX_REFUSAL => err.extend_from_slice(&data),
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        if status != Some(0) {
            let msg = String::from_utf8_lossy(&err);
            let msg = msg.trim().trim_start_matches("postern: ");
            return Err(ClientError::CommandRefused {
                command: command.to_owned(),
                message: if msg.is_empty() { "the gateway refused the request".to_owned() } else { msg.to_owned() },
                exit_status: status,
            });
        }
        Ok(out)
    }

    /// Connect for `postern login`: the sign-in connection ([`LOGIN_USER`], no key), which
    /// can only run the `login-*` commands ([`Client::sign_in_command`]).
    pub async fn connect_sign_in(opts: &ClientOptions) -> Result<Client, ClientError> {
        let connect = async {
            let (mut handle, open_failures) = Self::handshake_retrying(opts).await?;
            let ok = handle
                .authenticate_none(LOGIN_USER)
                .await
                .map(|r| r.success())
                .map_err(|source| ClientError::Handshake { address: opts.gateway.clone(), source })?;
            if !ok {
                return Err(ClientError::SignInUnavailable { address: opts.gateway.clone() });
            }
            Ok(Client { handle, open_failures })
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect).await.unwrap_or_else(|_| {
            Err(ClientError::ConnectTimeout { address: opts.gateway.clone(), after: CONNECT_TIMEOUT })
        })
    }

    /// A sign-in command on the sign-in connection, bounded by `wait` (a device sign-in
    /// waits for its person): the answer is the last line; earlier lines go to `on_line`.
    pub async fn sign_in_command<T: DeserializeOwned>(
        &self,
        command: &str,
        wait: Duration,
        on_line: impl FnMut(&str),
    ) -> Result<T, ClientError> {
        let verb = command.split_whitespace().next().unwrap_or_default().to_owned();
        let out = tokio::time::timeout(wait, self.command_output(command, on_line))
            .await
            .unwrap_or_else(|_| Err(ClientError::CommandTimeout { command: verb.clone(), after: wait }))?;
        let text = String::from_utf8_lossy(&out);
        let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
        serde_json::from_str(last).map_err(|source| ClientError::UnexpectedReply { command: verb, source })
    }

    /// Who the gateway says you are (`whoami`).
    pub async fn whoami(&self) -> Result<WhoAmI, ClientError> {
        self.gateway_command_as("whoami").await
    }

    /// The `~/.ssh/config` block and `@cert-authority` line for plain `ssh` (`ssh-config`).
    pub async fn ssh_config(&self, known_hosts_file: &str) -> Result<SshConfig, ClientError> {
        self.gateway_command_as(&format!("ssh-config {known_hosts_file}")).await
    }

    /// A single-use routing token for the RDP front door.
    pub async fn rdp_token(&self, instance: &str) -> Result<RdpToken, ClientError> {
        self.gateway_command_as(&format!("rdp-token {instance}")).await
    }

    /// The instances this user may reach now (any action allowed), optionally only those
    /// matching a label selector (`env=prod,role!=db`).
    pub async fn instances(&self, selector: Option<&str>) -> Result<Vec<Instance>, ClientError> {
        let cmd = match selector {
            Some(s) => format!("ls {s}"),
            None => "ls".to_owned(),
        };
        self.gateway_command_as(&cmd).await
    }

    /// A byte stream to the instance's RDP server (connect with `instance` set).
    pub async fn open_rdp(&self) -> Result<russh::ChannelStream<russh::client::Msg>, ClientError> {
        let before = self.open_failures.borrow().0;
        match self.handle.channel_open_direct_tcpip(RDP_DESTINATION, 3389, "127.0.0.1", 0).await {
            Ok(ch) => Ok(ch.into_stream()),
            Err(source) => Err(ClientError::RdpRefused {
                reason: self.open_failure_reason(before, &source).await,
                source: Box::new(source),
            }),
        }
    }

    /// A session channel on this connection (connect with `instance` set to run things there).
    pub async fn session_channel(&self) -> Result<russh::Channel<russh::client::Msg>, ClientError> {
        self.handle.channel_open_session().await.map_err(channel_error("opening a session channel"))
    }

    /// Run `command` on the instance this client is connected to and collect its output
    /// (at most `limit` bytes of each stream are kept; the rest is counted, not stored). A
    /// session the gateway refused is [`ClientError::SessionRefused`].
    pub async fn exec_capture(
        &self,
        command: &str,
        env: &[(&str, &str)],
        limit: usize,
    ) -> Result<Captured, ClientError> {
        self.exec_streaming(command, env, limit, |_, _| async {}).await
    }

    /// [`Client::exec_capture`], also handing each chunk of output to `on_output` as it
    /// arrives (e.g. to show it while the command runs).
    pub async fn exec_streaming<F, Fut>(
        &self,
        command: &str,
        env: &[(&str, &str)],
        limit: usize,
        mut on_output: F,
    ) -> Result<Captured, ClientError>
    where
        F: FnMut(OutputStream, Vec<u8>) -> Fut,
        Fut: Future<Output = ()>,
    {
        let mut ch = self.session_channel().await?;
        for (k, v) in env {
            ch.set_env(false, *k, *v).await.map_err(channel_error("setting the command's environment"))?;
        }
        ch.exec(true, command).await.map_err(channel_error("starting the command"))?;
        let mut out = Captured::default();
        let mut refused: Option<String> = None;
        while let Some(msg) = ch.wait().await {
            match msg {
                // After a refusal, the stderr text is the refusal's, for plain ssh users.
                _ if refused.is_some() && !matches!(msg, ChannelMsg::Close) => {}
                ChannelMsg::Data { data } => {
                    out.stdout.push(&data, limit);
                    on_output(OutputStream::Stdout, data.to_vec()).await;
                }
                ChannelMsg::ExtendedData { data, .. } => {
                    out.stderr.push(&data, limit);
                    on_output(OutputStream::Stderr, data.to_vec()).await;
                }
                ChannelMsg::ExitStatus { exit_status } => out.exit_code = Some(exit_status),
                ChannelMsg::ExitSignal { signal_name, error_message, .. } => {
                    match refusal(&signal_name, &error_message) {
                        Some(why) => refused = Some(why),
                        None => out.signal = Some(format!("{signal_name:?}")),
                    }
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        match refused {
            Some(message) => Err(ClientError::SessionRefused { message }),
            None => Ok(out),
        }
    }

    /// A TCP stream to `host:port` as seen from the instance (policy's `forward_to` and the
    /// agent's `tcp_allow` decide whether it opens).
    pub async fn open_tcp(
        &self,
        host: &str,
        port: u16,
    ) -> Result<russh::ChannelStream<russh::client::Msg>, ClientError> {
        let before = self.open_failures.borrow().0;
        match self.handle.channel_open_direct_tcpip(host, u32::from(port), "127.0.0.1", 0).await {
            Ok(ch) => Ok(ch.into_stream()),
            Err(source) => Err(ClientError::ForwardRefused {
                host: host.to_owned(),
                port,
                reason: self.open_failure_reason(before, &source).await,
                source: Box::new(source),
            }),
        }
    }

    /// The gateway's text for a channel open that failed after failure number `before`
    /// (it reaches the handler just after the opener learns of the failure: waited for,
    /// briefly). `None` for other errors, or when the text is only the code's generic name.
    async fn open_failure_reason(&self, before: u64, error: &russh::Error) -> Option<Box<str>> {
        if !matches!(error, russh::Error::ChannelOpenFailure(_)) {
            return None;
        }
        let mut rx = self.open_failures.clone();
        let got = tokio::time::timeout(Duration::from_secs(1), rx.wait_for(|(n, _)| *n > before)).await;
        let text = got.ok()?.ok()?.1.trim().to_owned();
        let generic = ["", "Administratively prohibited", "Connect failed", "open failed"];
        (!generic.iter().any(|g| g.eq_ignore_ascii_case(&text))).then(|| text.into_boxed_str())
    }

    /// Whether the SSH connection has ended.
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }
}

enum Authenticated {
    Yes,
    /// Keys were offered; none was accepted.
    Refused,
    /// No agent key and no key file to offer.
    NothingOffered,
}

/// Try ssh-agent keys, then key files.
async fn authenticate(
    handle: &mut russh::client::Handle<Verifier>,
    login: &str,
    files: &[PathBuf],
) -> Result<Authenticated, ClientError> {
    let rsa_hash = handle.best_supported_rsa_hash().await.ok().flatten().flatten();
    let mut offered = false;
    if files.is_empty()
        && let Ok(mut agent) = russh::keys::agent::client::AgentClient::connect_env().await
    {
        for id in agent.request_identities().await.unwrap_or_default() {
            offered = true;
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
                return Ok(Authenticated::Yes);
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
            Err(error) if explicit => return Err(ClientError::UnusableKey { path, error }),
            Err(_) => continue,
        };
        offered = true;
        let hash = if key.algorithm().is_rsa() { rsa_hash } else { None };
        let result = match cert_beside(&path) {
            Some(cert) => handle.authenticate_openssh_cert(login, key, cert).await,
            None => handle.authenticate_publickey(login, PrivateKeyWithHashAlg::new(key, hash)).await,
        };
        if result.map(|r| r.success()).unwrap_or(false) {
            return Ok(Authenticated::Yes);
        }
    }
    Ok(if offered { Authenticated::Refused } else { Authenticated::NothingOffered })
}

/// `KEY-cert.pub` next to a key file, as OpenSSH uses it.
fn cert_beside(key: &Path) -> Option<Certificate> {
    let path = PathBuf::from(format!("{}-cert.pub", key.display()));
    russh::keys::load_openssh_certificate(path).ok()
}

/// Checks the gateway's host key against known_hosts (plain keys and `@cert-authority`).
/// The gateway's refusal of a session channel, when `signal` is its marker
/// ([`postern_core::command::REFUSED_SIGNAL`]): the refusal's text.
pub fn refusal(signal: &russh::Sig, message: &str) -> Option<String> {
    match signal {
        russh::Sig::Custom(name) if name == postern_core::command::REFUSED_SIGNAL => {
            Some(if message.is_empty() { "the gateway refused the session".to_owned() } else { message.to_owned() })
        }
        _ => None,
    }
}

struct Verifier {
    host: String,
    /// The known_hosts entries for this host, read once per connection.
    trust: known_hosts::Trust,
    /// Why the host key was refused, for the error `connect` returns.
    verdict: Arc<Mutex<Option<String>>>,
    /// Channel-open failure descriptions, numbered (see [`Client::open_failure_reason`]).
    open_failures: tokio::sync::watch::Sender<(u64, String)>,
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
                    *v = Some(why);
                }
                Ok(false)
            }
        }
    }

    async fn channel_open_failure(
        &mut self,
        _channel: russh::ChannelId,
        _reason: russh::ChannelOpenFailure,
        description: &str,
        _language: &str,
        _session: &mut russh::client::Session,
    ) -> Result<(), Self::Error> {
        let text: String = description.chars().take(512).collect();
        self.open_failures.send_modify(|(n, last)| {
            *n += 1;
            *last = text;
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("gw", 2222).unwrap(), ("gw".into(), 2222));
        assert_eq!(split_host_port("gw:22", 2222).unwrap(), ("gw".into(), 22));
        assert_eq!(split_host_port("[::1]:2200", 2222).unwrap(), ("::1".into(), 2200));
        assert_eq!(split_host_port("::1", 2222).unwrap(), ("::1".into(), 2222));
        assert!(split_host_port("gw:x", 2222).is_err());
        assert!(split_host_port("", 2222).is_err());
        assert!(matches!(split_host_port("[::1", 2222), Err(ClientError::InvalidAddress { .. })));
    }

    #[test]
    fn captured_streams_are_bounded_but_counted() {
        let mut s = Stream::default();
        s.push(b"hello", 3);
        s.push(b"world", 3);
        assert_eq!((s.data.as_slice(), s.total), (&b"hel"[..], 10));
    }

    #[tokio::test]
    async fn unreachable_gateway_is_a_connect_error() {
        // Bind then drop: a loopback port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let opts = ClientOptions::new(&format!("127.0.0.1:{port}"), "alice");
        let err = Client::connect(&opts, None).await.unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    }
}
