//! The SSH front door.
//!
//! Three ways in, all on one port:
//! - `ssh -p 2222 alice%web-01@gateway`: the user name names the instance;
//! - `ssh alice@web-01.<suffix>` with the config from `postern ssh-config`: OpenSSH jumps
//!   through the gateway (`ProxyJump`) and opens a `direct-tcpip` channel to
//!   `web-01.<suffix>:22`; the gateway answers that channel itself with a second, inner SSH
//!   server whose host certificate covers `*.<suffix>`, so the client checks the host name
//!   it asked for, strictly, against the gateway's host CA;
//! - `ssh -J alice@gateway alice@web-01`: a `direct-tcpip` channel to a plain instance name
//!   is raw TCP to that instance's own sshd (passthrough, end-to-end encrypted, unlogged).
//!
//! The russh handler only authenticates and accepts channels; each channel is served by its
//! own task that owns the channel, the agent stream and the recording.

pub mod commands;
pub mod hostkeys;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use postern_proto::write_frame;
use postern_proto::{ExecCommand, ExecRequest, Message, Resize, SessionRequest, ShellRequest, Signal, TcpRequest};
use postern_tunnel::CancellationToken;
use postern_tunnel::server::{OpenError, SessionStream};
use russh::server::{Auth, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelMsg, ChannelOpenFailure};
use serde_json::json;
use tokio::net::TcpListener;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::access::{Authorization, authorize_request};
use crate::config::GatewayConfig;
use crate::gateway::GatewayState;
use crate::recording::Recorder;
use postern_core::util::glob_match;
use postern_core::{Action, Identity};

/// Runs the first sftp-server found on the instance.
const SFTP_SERVER: &str = "for p in /usr/lib/openssh/sftp-server /usr/libexec/openssh/sftp-server \
    /usr/libexec/sftp-server /usr/lib/ssh/sftp-server; do [ -x \"$p\" ] && exec \"$p\"; done; \
    echo 'postern: no sftp-server on this instance' >&2; exit 127";

/// The `direct-tcpip` host that means "this instance's RDP server" (`postern rdp --local`,
/// or `ssh -L 13389:@rdp:3389 alice%win-01@gateway`). Not a valid DNS name, so it cannot
/// shadow a real destination.
pub const RDP_DESTINATION: &str = "@rdp";

/// Names the host certificate must cover: every instance, and the gateway itself.
pub fn host_principals(cfg: &GatewayConfig) -> Vec<String> {
    let mut p = vec![format!("*.{}", cfg.ssh.suffix), "localhost".into(), "127.0.0.1".into(), "::1".into()];
    p.push(postern_tunnel::agent::hostname());
    if let Some(h) = &cfg.ssh.public_host {
        p.push(h.clone());
    }
    p.dedup();
    p
}

/// Patterns for the `@cert-authority` line: instances, and the gateway on its SSH port.
pub fn known_hosts_patterns(cfg: &GatewayConfig, port: u16) -> Vec<String> {
    let mut names = vec![public_host(cfg), "localhost".into(), "127.0.0.1".into()];
    names.dedup();
    let mut p: Vec<String> = names.into_iter().map(|n| if port == 22 { n } else { format!("[{n}]:{port}") }).collect();
    p.push(format!("*.{}", cfg.ssh.suffix));
    p
}

/// The `~/.ssh/config` block and known_hosts line printed by `postern ssh-config`.
pub fn client_config(
    cfg: &GatewayConfig,
    host_keys: &hostkeys::HostKeys,
    port: u16,
    known_hosts_file: &str,
) -> anyhow::Result<String> {
    let host = public_host(cfg);
    let suffix = &cfg.ssh.suffix;
    let line = host_keys.known_hosts_line(&known_hosts_patterns(cfg, port))?;
    Ok(format!(
        "# Postern: add to ~/.ssh/config\n\
         Host *.{suffix}\n\
         \x20   ProxyJump %r@{host}:{port}\n\
         \x20   UserKnownHostsFile ~/.ssh/known_hosts {known_hosts_file}\n\
         Host {host}\n\
         \x20   UserKnownHostsFile ~/.ssh/known_hosts {known_hosts_file}\n\
         \n\
         # Postern: put this line in {known_hosts_file} (it trusts the gateway's host CA\n\
         # for *.{suffix} and the gateway itself; host key checking stays strict)\n\
         {line}\n"
    ))
}

/// The name clients use for the gateway.
pub fn public_host(cfg: &GatewayConfig) -> String {
    cfg.ssh.public_host.clone().unwrap_or_else(postern_tunnel::agent::hostname)
}

/// Map `[ssh] ciphers` names to russh's; unknown names are a configuration error.
pub fn ciphers(names: &[String]) -> anyhow::Result<Vec<russh::cipher::Name>> {
    use russh::cipher::{AES_128_CTR, AES_128_GCM, AES_192_CTR, AES_256_CTR, AES_256_GCM, CHACHA20_POLY1305};
    let known = [CHACHA20_POLY1305, AES_256_GCM, AES_128_GCM, AES_256_CTR, AES_192_CTR, AES_128_CTR];
    names
        .iter()
        .map(|n| {
            known.iter().find(|k| k.as_ref() == n.as_str()).copied().ok_or_else(|| {
                anyhow::anyhow!(
                    "[ssh] ciphers: unsupported cipher {n:?}; use {}",
                    known.iter().map(|k| k.as_ref()).collect::<Vec<_>>().join(", ")
                )
            })
        })
        .collect()
}

/// Offered when `[ssh] ciphers` is not set. Clients take the first cipher of *their* list
/// that the server offers, so only AES-GCM is offered: OpenSSH prefers ChaCha20 and then
/// AES-CTR (with a separate HMAC-SHA-256 pass, 17% of gateway CPU in an `ssh -L` profile),
/// while AES-GCM with AES instructions moves the most data (docs/benchmarks.md). Clients
/// without AES-GCM (OpenSSH before 6.2, PuTTY before 0.76) need `[ssh] ciphers` extended.
const DEFAULT_CIPHERS: &[russh::cipher::Name] = &[russh::cipher::AES_256_GCM, russh::cipher::AES_128_GCM];

fn server_config(state: &GatewayState, certificate: russh::keys::Certificate) -> russh::server::Config {
    let preferred = russh::Preferred {
        cipher: match &state.config.ssh.ciphers {
            // Validated at start-up.
            Some(names) => ciphers(names).unwrap_or_default().into(),
            None => DEFAULT_CIPHERS.into(),
        },
        ..russh::Preferred::default()
    };
    let mut methods = russh::MethodSet::empty();
    methods.push(russh::MethodKind::PublicKey);
    russh::server::Config {
        server_id: russh::SshId::Standard("SSH-2.0-Postern".into()),
        methods,
        // Unknown keys, unknown users and wrong keys all take the same time to be refused.
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::from_millis(0)),
        keys: vec![state.host_keys.host_key.clone()],
        certificates: vec![certificate],
        max_auth_attempts: 6,
        inactivity_timeout: Some(Duration::from_secs(3600)),
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 3,
        nodelay: true,
        window_size: 2 * 1024 * 1024,
        maximum_packet_size: 65535,
        preferred,
        ..Default::default()
    }
}

/// Accept SSH connections until `shutdown`.
pub async fn serve(listener: TcpListener, state: Arc<GatewayState>, shutdown: CancellationToken) {
    let config = Arc::new(server_config(&state, state.host_keys.certificate.clone()));
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => { warn!(error = %e, "ssh accept failed"); continue; }
            },
        };
        let _ = stream.set_nodelay(true);
        if state.ssh_throttle.is_blocked(peer.ip()) {
            debug!(%peer, "refusing connection from a throttled source");
            continue;
        }
        let handler = ConnHandler::new(state.clone(), peer, None);
        let config = config.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(
            async move {
                match russh::server::run_stream(config, stream, handler).await {
                    Ok(session) => {
                        let handle = session.handle();
                        tokio::select! {
                            r = session => if let Err(e) = r { debug!(error = %e, "ssh connection ended with error") },
                            _ = shutdown.cancelled() => {
                                let _ = handle.disconnect(russh::Disconnect::ByApplication, "gateway shutting down".into(), "en".into()).await;
                            }
                        }
                    }
                    Err(e) => debug!(error = %e, "ssh handshake failed"),
                }
            }
            .instrument(info_span!("ssh", %peer)),
        );
    }
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(3), tasks.wait()).await;
}

/// Per-source counter of failed authentications; a source with too many recent failures
/// is refused for a while.
#[derive(Debug, Default)]
pub struct Throttle {
    failures: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (u32, std::time::Instant)>>,
}

impl Throttle {
    const WINDOW: Duration = Duration::from_secs(60);
    const LIMIT: u32 = 20;
    /// Most sources remembered; older entries are dropped first (bounded memory).
    const MAX_SOURCES: usize = 10_000;

    pub fn is_blocked(&self, ip: std::net::IpAddr) -> bool {
        let Ok(map) = self.failures.lock() else { return false };
        map.get(&ip).is_some_and(|(n, since)| *n >= Self::LIMIT && since.elapsed() < Self::WINDOW)
    }

    pub fn failed(&self, ip: std::net::IpAddr) {
        let Ok(mut map) = self.failures.lock() else { return };
        if map.len() >= Self::MAX_SOURCES {
            map.retain(|_, (_, since)| since.elapsed() < Self::WINDOW);
        }
        let entry = map.entry(ip).or_insert((0, std::time::Instant::now()));
        if entry.1.elapsed() >= Self::WINDOW {
            *entry = (0, std::time::Instant::now());
        }
        entry.0 = entry.0.saturating_add(1);
    }
}

struct ConnHandler {
    state: Arc<GatewayState>,
    peer: SocketAddr,
    /// Instance this connection is about: fixed for inner connections, or from `user%instance`.
    target: Option<String>,
    /// Set for an inner connection (the instance comes from the outer direct-tcpip channel).
    inner: bool,
    identity: Option<Identity>,
    /// Keys offered or tried without success, for one audit event per connection.
    failed_keys: Vec<String>,
    failed_user: Option<String>,
}

impl Drop for ConnHandler {
    fn drop(&mut self) {
        // One event (and one throttle strike) per connection that never authenticated,
        // however many keys the client offered.
        if self.identity.is_none() && !self.failed_keys.is_empty() {
            self.state.ssh_throttle.failed(self.peer.ip());
            let _ = self.state.audit.record(
                "auth.failed",
                json!({"source": self.peer.to_string(), "user": self.failed_user, "method": "publickey",
                       "keys": self.failed_keys, "inner": self.inner}),
            );
        }
    }
}

impl ConnHandler {
    fn new(state: Arc<GatewayState>, peer: SocketAddr, inner_target: Option<String>) -> Self {
        let inner = inner_target.is_some();
        Self { state, peer, target: inner_target, inner, identity: None, failed_keys: Vec::new(), failed_user: None }
    }

    /// `alice%web-01` names user and instance; inner connections take only a user.
    fn split_user<'a>(&self, user: &'a str) -> (&'a str, Option<&'a str>) {
        match user.split_once('%') {
            Some((u, i)) if !self.inner && !i.is_empty() => (u, Some(i)),
            _ => (user, None),
        }
    }
}

impl russh::server::Handler for ConnHandler {
    type Error = russh::Error;

    async fn auth_publickey_offered(&mut self, user: &str, offer: PublicKeyOffer<'_>) -> Result<Auth, Self::Error> {
        let (name, _) = self.split_user(user);
        // A certificate offer carries the certificate's key, bound to nobody: let the client
        // prove possession and decide in auth_openssh_certificate.
        if self.state.access.authenticate(name, offer.public_key, None).is_some() || self.state.access.has_user_cas() {
            Ok(Auth::Accept)
        } else {
            self.note_failure(name, offer.public_key);
            Ok(Auth::reject())
        }
    }

    async fn auth_publickey(&mut self, user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        let (name, instance) = self.split_user(user);
        match self.state.access.authenticate(name, key.public_key, Some(self.peer.ip())) {
            Some(identity) => {
                if let Some(i) = instance {
                    self.target = Some(i.to_owned());
                }
                info!(user = %identity.user, target = ?self.target, "ssh user authenticated");
                self.identity = Some(identity);
                Ok(Auth::Accept)
            }
            None => {
                self.note_failure(name, key.public_key);
                Ok(Auth::reject())
            }
        }
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        cert: &russh::keys::Certificate,
    ) -> Result<Auth, Self::Error> {
        let (name, instance) = self.split_user(user);
        match self.state.access.authenticate_certificate(name, cert, Some(self.peer.ip())) {
            Some(identity) => {
                if let Some(i) = instance {
                    self.target = Some(i.to_owned());
                }
                info!(user = %identity.user, key_id = cert.key_id(), "ssh user authenticated by certificate");
                self.identity = Some(identity);
                Ok(Auth::Accept)
            }
            None => {
                self.failed_user = Some(name.chars().take(64).collect());
                if self.failed_keys.len() < 16 {
                    self.failed_keys.push(format!("certificate key_id={:?}", cert.key_id()));
                }
                Ok(Auth::reject())
            }
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(identity) = self.identity.clone() else { return Ok(()) };
        reply.accept().await;
        let ctx = SessionCtx { state: self.state.clone(), identity, target: self.target.clone(), peer: self.peer };
        tokio::spawn(serve_session_channel(ctx, channel).instrument(tracing::Span::current()));
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(identity) = self.identity.clone() else { return Ok(()) };
        let Ok(port) = u16::try_from(port) else {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        };
        let suffix = format!(".{}", self.state.config.ssh.suffix);
        match (&self.target, host.strip_suffix(&suffix)) {
            // Jump host hop to `<instance>.<suffix>`: serve an inner SSH session ourselves.
            (None, Some(instance)) if !instance.is_empty() => {
                let principal = format!("{instance}{suffix}");
                let config = match self.state.host_keys.certificate_for(&[principal]) {
                    Ok(cert) => Arc::new(server_config(&self.state, cert)),
                    Err(e) => {
                        warn!(error = %format!("{e:#}"), "cannot issue host certificate");
                        reply.reject(ChannelOpenFailure::ConnectFailed).await;
                        return Ok(());
                    }
                };
                reply.accept().await;
                let handler = ConnHandler::new(self.state.clone(), self.peer, Some(instance.to_owned()));
                let span = info_span!("inner", instance = %instance);
                tokio::spawn(
                    async move {
                        match russh::server::run_stream(config, channel.into_stream(), handler).await {
                            Ok(session) => {
                                if let Err(e) = session.await {
                                    debug!(error = %e, "inner ssh session ended with error");
                                }
                            }
                            Err(e) => debug!(error = %e, "inner ssh handshake failed"),
                        }
                    }
                    .instrument(span),
                );
            }
            // Jump host hop to a plain instance name: passthrough to its own sshd.
            (None, _) => {
                let dest = Some(("127.0.0.1", port));
                let authz =
                    match authorize_request(&self.state, &identity, host, Action::SshPassthrough, None, dest).await {
                        Ok(a) => a,
                        Err(msg) => {
                            self.deny(&identity, host, Action::SshPassthrough, msg);
                            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
                            return Ok(());
                        }
                    };
                self.forward(authz, channel, reply, "end-to-end encrypted SSH passthrough").await;
            }
            // `postern rdp --local`: the instance's RDP server, wherever its agent says it is.
            (Some(target), _) if host == RDP_DESTINATION => {
                let target = target.clone();
                let authz = match authorize_request(&self.state, &identity, &target, Action::Rdp, None, None).await {
                    Ok(a) => a,
                    Err(msg) => {
                        self.deny(&identity, &target, Action::Rdp, msg);
                        reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
                        return Ok(());
                    }
                };
                self.forward(authz, channel, reply, crate::rdp::UNLOGGED_REASON).await;
            }
            // `-L` on a connection to an instance: forward through its agent.
            (Some(target), _) => {
                let target = target.clone();
                let dest = Some((host, port));
                let authz =
                    match authorize_request(&self.state, &identity, &target, Action::PortForward, None, dest).await {
                        Ok(a) => a,
                        Err(msg) => {
                            self.deny(&identity, &target, Action::PortForward, msg);
                            reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
                            return Ok(());
                        }
                    };
                self.forward(authz, channel, reply, "forwarded TCP content is not inspected").await;
            }
        }
        Ok(())
    }

    // Channel requests are answered here; the channel's task acts on them.
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _c: u32,
        _r: u32,
        _pw: u32,
        _ph: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }
    async fn env_request(
        &mut self,
        channel: ChannelId,
        _k: &str,
        _v: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }
    async fn shell_request(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }
    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }
    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }
    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        _c: u32,
        _r: u32,
        _pw: u32,
        _ph: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }
}

impl ConnHandler {
    fn note_failure(&mut self, user: &str, key: &russh::keys::PublicKey) {
        self.failed_user = Some(user.chars().take(64).collect());
        if self.failed_keys.len() < 16 {
            self.failed_keys.push(key.fingerprint(Default::default()).to_string());
        }
    }

    fn deny(&self, identity: &Identity, target: &str, action: Action, reason: &str) {
        let _ = self.state.audit.record(
            "session.denied",
            json!({"user": identity.user, "target": target, "action": action.name(), "source": self.peer.to_string(), "reason": reason}),
        );
    }

    async fn forward(
        &self,
        authz: Authorization,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        unlogged_reason: &'static str,
    ) {
        // The agent dials exactly what was authorized.
        let (req, destination) = match (authz.action(), authz.destination()) {
            (Action::Rdp, _) => (SessionRequest::Rdp, "rdp".to_owned()),
            (_, Some((host, port))) => {
                (SessionRequest::Tcp(TcpRequest { host: host.to_owned(), port }), format!("{host}:{port}"))
            }
            (_, None) => {
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
                return;
            }
        };
        let event = match authz.action() {
            Action::SshPassthrough => "passthrough",
            Action::Rdp => "rdp",
            _ => "forward",
        };
        // RDP events say which way in was used: "local" here, "gateway" for the RDP port.
        let action = authz.action();
        let with_mode = move |mut v: serde_json::Value| {
            if let (Action::Rdp, Some(o)) = (action, v.as_object_mut()) {
                o.insert("mode".into(), "local".into());
            }
            v
        };
        let stream = match self.state.registry.open_session(authz.agent_id(), req).await {
            Ok(s) => s,
            Err(e) => {
                info!(error = %e, "forward refused");
                let _ = self.state.audit.record(
                    if event == "rdp" { "rdp.failed" } else { "forward.failed" },
                    json!({"user": authz.user(), "target": authz.instance(), "destination": destination, "error": e.to_string()}),
                );
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
                return;
            }
        };
        reply.accept().await;
        let sid = stream.id.to_string();
        let _ = self.state.audit.record(
            &format!("{event}.open"),
            with_mode(
                json!({"session_id": sid, "user": authz.user(), "target": authz.instance(), "destination": destination,
                   "source": self.peer.to_string(), "logged": false, "reason": unlogged_reason}),
            ),
        );
        let audit = self.state.audit.clone();
        let started = std::time::Instant::now();
        let authz2 = authz.clone();
        let reg = self.state.sessions.register(
            &sid,
            authz.user(),
            Some(self.peer.ip()),
            authz.instance(),
            authz.agent_id(),
            authz.action(),
            authz.destination().map(|(h, p)| (h.to_owned(), p)),
            false,
            false,
        );
        tokio::spawn(async move {
            let SessionStream { send, recv, .. } = stream;
            let max = authz2.limits().max_session;
            let (bytes_up, bytes_down) = relay_forward(channel, send, recv, &reg.session, max).await;
            let end_reason = reg.session.reason();
            let fields = json!({"session_id": sid, "user": authz2.user(), "target": authz2.instance(), "destination": destination,
                       "bytes_to_target": bytes_up, "bytes_from_target": bytes_down, "end_reason": end_reason,
                       "duration_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                       "logged": false, "reason": unlogged_reason});
            let _ = audit.record(&format!("{event}.close"), with_mode(fields));
        });
    }
}

/// A command for the gateway itself: answered with one JSON document (see [`commands`]).
async fn gateway_command(ctx: &SessionCtx, wr: &russh::ChannelWriteHalf<Msg>, command: &str) {
    match commands::run(&ctx.state, &ctx.identity, &ctx.peer.ip().to_string(), command).await {
        Ok(v) => {
            let _ = wr.data_bytes(format!("{v}\n").into_bytes()).await;
            let _ = wr.exit_status(0).await;
            let _ = wr.eof().await;
            let _ = wr.close().await;
        }
        Err(msg) => refuse(wr, &msg, 1).await,
    }
}

/// Moves a forward's bytes between an SSH channel and a tunnel stream until both directions
/// end. Chunks are handed over as `Bytes`, never copied through an intermediate buffer (the
/// copy showed up in profiles of `ssh -L` throughput). Returns bytes (to target, from target).
async fn relay_forward(
    channel: Channel<Msg>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    live: &crate::sessions::LiveSession,
    max_session: Option<Duration>,
) -> (u64, u64) {
    let (mut ch_read, ch_write) = channel.split();
    let up = async {
        let mut n = 0u64;
        while let Some(msg) = ch_read.wait().await {
            match msg {
                ChannelMsg::Data { data } => {
                    n += data.len() as u64;
                    live.add_in(data.len());
                    if send.write_chunk(data).await.is_err() {
                        break;
                    }
                }
                ChannelMsg::Eof | ChannelMsg::Close => break,
                _ => {}
            }
        }
        let _ = send.finish();
        n
    };
    let down = async {
        let mut n = 0u64;
        while let Ok(Some(chunk)) = recv.read_chunk(usize::MAX, true).await {
            n += chunk.bytes.len() as u64;
            live.add_out(chunk.bytes.len());
            if ch_write.data_bytes(chunk.bytes).await.is_err() {
                break;
            }
        }
        let _ = ch_write.eof().await;
        n
    };
    let both = async { tokio::join!(up, down) };
    let counted = || (live.bytes_in.load(Ordering::Relaxed), live.bytes_out.load(Ordering::Relaxed));
    let (up, down) = tokio::select! {
        r = both => r,
        // Ended by an admin or by policy: dropping the relay resets the tunnel stream.
        _ = live.terminated_or_after(max_session) => counted(),
    };
    let _ = ch_write.close().await;
    (up, down)
}

struct SessionCtx {
    state: Arc<GatewayState>,
    identity: Identity,
    target: Option<String>,
    peer: SocketAddr,
}

enum Request {
    Shell,
    Exec(String),
    Subsystem(String),
}

struct Pty {
    term: String,
    cols: u16,
    rows: u16,
}

fn clamp16(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}

fn sig_name(s: &russh::Sig) -> String {
    format!("{s:?}").trim_start_matches("Custom(\"").trim_end_matches("\")").to_owned()
}

/// Tell the client why nothing happened, and end the channel with `code`.
async fn refuse(ch: &russh::ChannelWriteHalf<Msg>, message: &str, code: u32) {
    let _ = ch.extended_data_bytes(1, format!("postern: {message}\r\n").into_bytes()).await;
    let _ = ch.exit_status(code).await;
    let _ = ch.eof().await;
    let _ = ch.close().await;
}

/// How long before a limit the user is warned: a quarter of it, at most a minute.
fn warn_lead(limit: Duration) -> Duration {
    (limit / 4).min(Duration::from_secs(60))
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

/// A line from the gateway to the user's terminal (stderr when there is no PTY).
async fn notice(ch: &russh::ChannelWriteHalf<Msg>, on_pty: bool, message: &str) {
    let line = format!("\r\npostern: {message}\r\n").into_bytes();
    let _ = if on_pty { ch.data_bytes(line).await } else { ch.extended_data_bytes(1, line).await };
}

async fn serve_session_channel(ctx: SessionCtx, channel: Channel<Msg>) {
    let (mut rd, wr) = channel.split();
    let mut pty: Option<Pty> = None;
    let mut env: Vec<(String, String)> = Vec::new();
    let mut requested_profile: Option<String> = None;
    let mut run_id: Option<String> = None;
    // Phase 1: collect pty/env until the client says what to run.
    let request = loop {
        match tokio::time::timeout(Duration::from_secs(60), rd.wait()).await {
            Ok(Some(ChannelMsg::RequestPty { term, col_width, row_height, .. })) => {
                pty = Some(Pty { term, cols: clamp16(col_width), rows: clamp16(row_height) })
            }
            Ok(Some(ChannelMsg::SetEnv { variable_name, variable_value, .. }))
                if variable_name == "POSTERN_PROFILE" =>
            {
                requested_profile = Some(variable_value.chars().take(64).collect());
            }
            // `postern run` tags each invocation with its run (only the user's own runs count).
            Ok(Some(ChannelMsg::SetEnv { variable_name, variable_value, .. })) if variable_name == "POSTERN_RUN_ID" => {
                run_id = Some(variable_value.chars().take(64).collect());
            }
            Ok(Some(ChannelMsg::SetEnv { variable_name, variable_value, .. })) => {
                if ctx.state.config.ssh.accept_env.iter().any(|p| glob_match(p, &variable_name)) && env.len() < 64 {
                    env.push((variable_name, variable_value));
                }
            }
            Ok(Some(ChannelMsg::RequestShell { .. })) => break Request::Shell,
            Ok(Some(ChannelMsg::Exec { command, .. })) => {
                break Request::Exec(String::from_utf8_lossy(&command).into_owned());
            }
            Ok(Some(ChannelMsg::RequestSubsystem { name, .. })) => break Request::Subsystem(name),
            Ok(Some(ChannelMsg::Eof | ChannelMsg::Close)) | Ok(None) | Err(_) => return,
            Ok(Some(_)) => {}
        }
    };
    let Some(target) = ctx.target.clone() else {
        if let Request::Exec(command) = &request {
            gateway_command(&ctx, &wr, command).await;
            return;
        }
        let help = format!(
            "this is the Postern gateway; name an instance: ssh -p PORT {user}%INSTANCE@HOST, \
             or use the config from `postern ssh-config` and ssh {user}@INSTANCE.{suffix}; \
             gateway commands: whoami, ls, rdp-token INSTANCE (or use the postern client)",
            user = ctx.identity.user,
            suffix = ctx.state.config.ssh.suffix
        );
        refuse(&wr, &help, 2).await;
        return;
    };
    let action = match &request {
        Request::Shell => Action::Shell,
        Request::Exec(_) => Action::Exec,
        Request::Subsystem(s) if s == "sftp" => Action::Sftp,
        Request::Subsystem(other) => {
            refuse(&wr, &format!("unsupported subsystem {other:?}"), 1).await;
            return;
        }
    };
    let authz = match authorize_request(&ctx.state, &ctx.identity, &target, action, requested_profile.as_deref(), None)
        .await
    {
        Ok(a) => a,
        Err(msg) => {
            let _ = ctx.state.audit.record(
                "session.denied",
                json!({"user": ctx.identity.user, "target": target, "action": action.name(), "source": ctx.peer.to_string(), "reason": msg}),
            );
            refuse(&wr, msg, 1).await;
            return;
        }
    };
    let run_as = authz.run_as().map(str::to_owned);
    let (cols, rows) = pty.as_ref().map(|p| (p.cols, p.rows)).unwrap_or((80, 24));
    let command_text = match &request {
        Request::Shell => None,
        Request::Exec(c) => Some(c.clone()),
        Request::Subsystem(_) => Some("sftp".to_owned()),
    };
    let profile = authz.profile().clone();
    env.extend(profile.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    // What runs on the instance: the profile's one command, or the user's request shaped
    // by the profile (working directory, startup commands, shell).
    let command = if profile.command.is_some() {
        let args = match &request {
            Request::Exec(c) => c.clone(),
            Request::Shell => String::new(),
            Request::Subsystem(_) => {
                refuse(&wr, &format!("profile {} only runs its command", profile.name), 1).await;
                return;
            }
        };
        match postern_core::profile::render_command(&profile, &args) {
            Ok(c) => Some(c),
            Err(e) => {
                refuse(&wr, &format!("profile {}: {e}", profile.name), 1).await;
                return;
            }
        }
    } else {
        match &request {
            Request::Shell => postern_core::profile::interactive_script(&profile),
            Request::Exec(c) => Some(postern_core::profile::wrap_command(&profile, c)),
            Request::Subsystem(_) => Some(SFTP_SERVER.to_owned()),
        }
    };
    let agent_request = match (&command, &pty) {
        (Some(c), _) if matches!(request, Request::Subsystem(_)) => {
            SessionRequest::Exec(ExecRequest { command: ExecCommand::Shell(c.clone()), env, run_as })
        }
        (command, Some(p)) => SessionRequest::Shell(ShellRequest {
            term: p.term.clone(),
            cols: p.cols,
            rows: p.rows,
            env,
            run_as,
            command: command.clone(),
        }),
        (Some(c), None) => SessionRequest::Exec(ExecRequest { command: ExecCommand::Shell(c.clone()), env, run_as }),
        (None, None) => {
            SessionRequest::Exec(ExecRequest { command: ExecCommand::Shell("exec \"$SHELL\" -l".into()), env, run_as })
        }
    };
    // Recording and audit trail must be writable before anything runs (fail closed).
    let recording_dir = ctx.state.config.data_dir.join("recordings");
    let fail_closed = ctx.state.config.audit.fail_closed;
    let mut recorder = if action == Action::Sftp {
        None
    } else {
        let title = format!("{}@{}: {}", authz.user(), authz.instance(), command_text.as_deref().unwrap_or("shell"));
        let created = postern_core::util::random_hex(8).map_err(std::io::Error::other).and_then(|r| {
            let exec = if matches!(request, Request::Exec(_)) { command_text.as_deref() } else { None };
            Recorder::create(&recording_dir, &format!("pending-{r}"), (cols, rows), &title, exec, &ctx.state.recording)
        });
        match created {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(error = %e, dir = %recording_dir.display(), "cannot create recording");
                None
            }
        }
    };
    let authorized = ctx.state.audit.record(
        "session.authorized",
        json!({"user": authz.user(), "target": authz.instance(), "agent_id": authz.agent_id(), "kind": action.name(),
               "source": ctx.peer.to_string(), "recording_ok": recorder.is_some() || action == Action::Sftp}),
    );
    if fail_closed && (authorized.is_err() || (recorder.is_none() && action != Action::Sftp)) {
        let what = if authorized.is_err() { "the audit log" } else { "the session recording" };
        let _ = ctx.state.audit.record(
            "session.denied",
            json!({"user": authz.user(), "target": authz.instance(), "action": action.name(), "source": ctx.peer.to_string(),
                   "reason": format!("{what} cannot be written (fail_closed)")}),
        );
        refuse(
            &wr,
            &format!("{what} cannot be written on the gateway, and sessions are not run unrecorded here; tell your administrator"),
            1,
        )
        .await;
        if let Some(r) = recorder {
            let _ = std::fs::remove_file(r.path());
        }
        return;
    }
    let stream = match ctx.state.registry.open_session(authz.agent_id(), agent_request).await {
        Ok(s) => s,
        Err(e) => {
            let msg = match e {
                OpenError::Offline => format!("instance {} is offline (its agent is not connected)", authz.instance()),
                OpenError::Rejected { reason, .. } => {
                    format!("instance {} refused the session: {reason}", authz.instance())
                }
                other => format!("instance {}: {other}", authz.instance()),
            };
            refuse(&wr, &msg, 255).await;
            if let Some(r) = recorder {
                let _ = std::fs::remove_file(r.path());
            }
            return;
        }
    };
    let sid = stream.id.to_string();
    if let Some(r) = recorder.as_mut()
        && let Err(e) = r.rename_to(&sid)
    {
        warn!(error = %e, "cannot name the recording after its session");
    }
    let (logged, reason) = match (&recorder, action) {
        (Some(_), _) => (true, None),
        (None, Action::Sftp) => (false, Some("sftp file transfer content is not recorded")),
        (None, _) => (false, Some("recording could not be created")),
    };
    let _ = ctx.state.audit.record(
        "session.start",
        json!({"session_id": sid, "user": authz.user(), "target": authz.instance(), "agent_id": authz.agent_id(),
               "kind": action.name(), "command": command_text, "pty": pty.is_some(), "source": ctx.peer.to_string(),
               "profile": if profile.name.is_empty() { None } else { Some(profile.name.clone()) }, "run_as": authz.run_as(),
               "logged": logged, "reason": reason,
               "run_id": run_id.filter(|r| ctx.state.runs.owned_by(r, &ctx.identity.user)),
               "recording": recorder.as_ref().map(|r| r.path().display().to_string())}),
    );
    info!(session_id = %sid, user = %authz.user(), target = %authz.instance(), kind = action.name(), "ssh session started");
    let reg = ctx.state.sessions.register(
        &sid,
        authz.user(),
        ctx.identity.source,
        authz.instance(),
        authz.agent_id(),
        action,
        None,
        logged,
        false,
    );
    let live = reg.session.clone();
    let started = std::time::Instant::now();

    let SessionStream { mut send, recv, .. } = stream;
    let mut frames = crate::frames::FrameReader::spawn(recv);
    let mut bytes_out: u64 = 0;
    let mut bytes_in: u64 = 0;
    let limits = authz.limits();
    let mut last_input = std::time::Instant::now();
    let (mut warned_idle, mut warned_max) = (false, false);
    let mut end_reason: Option<&'static str> = None;
    let mut recording_lost: Option<String> = None;
    let mut flush_tick = tokio::time::interval(crate::recording::FLUSH_EVERY);
    flush_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let on_pty = pty.is_some();
    let exit_code: Option<i32> = loop {
        tokio::select! {
            msg = rd.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    if let Some(rec) = recorder.as_mut() { let _ = rec.input(&data).await; }
                    bytes_in += data.len() as u64;
                    live.add_in(data.len());
                    last_input = std::time::Instant::now();
                    warned_idle = false;
                    for chunk in data.chunks(postern_proto::MAX_DATA_CHUNK) {
                        if write_frame(&mut send, &Message::Stdin(chunk.to_vec())).await.is_err() {
                            break;
                        }
                    }
                }
                Some(ChannelMsg::Eof) => { let _ = write_frame(&mut send, &Message::Eof).await; }
                Some(ChannelMsg::WindowChange { col_width, row_height, .. }) => {
                    let (c, r) = (clamp16(col_width), clamp16(row_height));
                    let _ = write_frame(&mut send, &Message::Resize(Resize { cols: c, rows: r })).await;
                    if let Some(rec) = recorder.as_mut() { let _ = rec.resize(c, r).await; }
                }
                Some(ChannelMsg::Signal { signal }) => {
                    let _ = write_frame(&mut send, &Message::Signal(Signal { name: sig_name(&signal) })).await;
                }
                Some(ChannelMsg::Close) | None => {
                    // The client went away: stop the remote process.
                    let _ = send.reset(0u32.into());
                    break None;
                }
                Some(_) => {}
            },
            _ = flush_tick.tick(), if recorder.is_some() => {
                if let Some(rec) = recorder.as_mut() { let _ = rec.flush_if_due().await; }
            }
            _ = live.terminated() => {
                let why = live.reason().unwrap_or_else(|| "ended by the gateway".into());
                notice(&wr, on_pty, &format!("session ended: {why}")).await;
                let _ = send.reset(0u32.into());
                let _ = wr.exit_status(255).await;
                end_reason = Some("terminated");
                break Some(255);
            }
            _ = tick.tick(), if limits.idle_timeout.is_some() || limits.max_session.is_some() => {
                let now = std::time::Instant::now();
                let mut close: Option<(&'static str, String)> = None;
                if let Some(max) = limits.max_session {
                    let end = started + max;
                    if now >= end {
                        close = Some(("max-duration", format!("maximum session length of {} reached; closing the session", human(max))));
                    } else if !warned_max && now + warn_lead(max) >= end {
                        warned_max = true;
                        notice(&wr, on_pty, &format!("this session reaches its maximum length of {} in {}s and will be closed", human(max), (end - now).as_secs().max(1))).await;
                    }
                }
                if let (None, Some(idle)) = (&close, limits.idle_timeout) {
                    let end = last_input + idle;
                    if now >= end {
                        close = Some(("idle-timeout", format!("no input for {}; closing the session", human(idle))));
                    } else if !warned_idle && now + warn_lead(idle) >= end {
                        warned_idle = true;
                        notice(&wr, on_pty, &format!("no input for a while: this session closes in {}s unless you type something", (end - now).as_secs().max(1))).await;
                    }
                }
                if let Some((reason, message)) = close {
                    notice(&wr, on_pty, &message).await;
                    let _ = send.reset(0u32.into());
                    let _ = wr.exit_status(255).await;
                    end_reason = Some(reason);
                    break Some(255);
                }
            }
            frame = frames.next() => match frame {
                Ok(Some(Message::Stdout(d))) => {
                    bytes_out += d.len() as u64;
                    live.add_out(d.len());
                    if let Some(rec) = recorder.as_mut() { let _ = rec.output(&d).await; }
                    if wr.data_bytes(d).await.is_err() { let _ = send.reset(0u32.into()); break None; }
                }
                Ok(Some(Message::Stderr(d))) => {
                    bytes_out += d.len() as u64;
                    live.add_out(d.len());
                    if let Some(rec) = recorder.as_mut() { let _ = rec.output(&d).await; }
                    if wr.extended_data_bytes(1, d).await.is_err() { let _ = send.reset(0u32.into()); break None; }
                }
                Ok(Some(Message::Exit(e))) => {
                    let _ = wr.exit_status(u32::try_from(e.code).unwrap_or(255)).await;
                    break Some(e.code);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    let _ = wr.extended_data_bytes(1, b"\r\npostern: connection to the instance was lost\r\n".to_vec()).await;
                    let _ = wr.exit_status(255).await;
                    break Some(255);
                }
            },
        }
        // A recording that stops being written (a full disk) ends the session when the
        // gateway fails closed; otherwise the session goes on and its end says unlogged.
        if recording_lost.is_none()
            && let Some(why) = recorder.as_ref().and_then(Recorder::failure)
        {
            recording_lost = Some(why.to_owned());
            if fail_closed {
                notice(&wr, on_pty, "the session recording can no longer be written on the gateway, and sessions are not run unrecorded here; closing the session").await;
                let _ = send.reset(0u32.into());
                let _ = wr.exit_status(255).await;
                end_reason = Some("recording-failed");
                break Some(255);
            }
        }
    };
    drop(frames);
    if let Some(rec) = recorder.as_mut() {
        let _ = rec.finish(exit_code).await;
        // The last write can fail too: the end event then says what was lost.
        if recording_lost.is_none() {
            recording_lost = rec.failure().map(str::to_owned);
        }
    }
    let _ = wr.eof().await;
    let _ = wr.close().await;
    let _ = ctx.state.audit.record(
        "session.end",
        json!({"session_id": sid, "user": authz.user(), "target": authz.instance(), "kind": action.name(),
               "exit_code": exit_code, "bytes_in": bytes_in, "bytes_out": bytes_out, "end_reason": end_reason,
               "terminated_because": live.reason(),
               "duration_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
               "logged": logged && recording_lost.is_none(),
               "reason": recording_lost.as_ref().map(|e| format!("recording failed during the session: {e}")).or(reason.map(str::to_owned))}),
    );
    drop(reg);
    if let (Some(shipper), Some(rec)) = (&ctx.state.shipper, recorder.as_ref()) {
        shipper.recording_finished(rec.path());
    }
    info!(session_id = %sid, ?exit_code, "ssh session ended");
}
