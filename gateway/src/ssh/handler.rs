//! The russh handler of the SSH door. It only authenticates and answers channel opens;
//! each channel is served by its own task ([`super::session`], [`super::forward`]) that owns
//! the channel, its agent stream and its recording.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use postern_tunnel::CancellationToken;

use postern_core::command::RDP_DESTINATION;
use postern_core::{Action, Identity};
use russh::server::{Auth, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure};
use tracing::{Instrument, debug, info, info_span};

use super::forward::{ChannelOpen, open_channel};
use super::session::{SessionCtx, serve_session_channel};
use super::settings::server_config;
use super::startups::{LoginDeadline, Startup};
use super::throttle::AuthThrottle;
use crate::audit::events::{AuthFailed, Event, SessionDenied, SshDenied};
use crate::connections::Conn;
use crate::services::Services;

/// `direct-tcpip` channels of one connection being decided at once; more are refused
/// (`ResourceShortage`) until one is decided.
const MAX_OPENING_CHANNELS: usize = 64;

/// How long a connection whose user lost access stays up before it is disconnected, so that
/// the notices of the sessions ended with it go out first.
const REVOKED_GRACE: Duration = Duration::from_millis(500);

/// The one port a jump to a plain instance name (`ssh -J`, `-W instance:22`) may ask for:
/// the agent connects to its own sshd (`ssh_address`), never to another service.
pub(super) const PASSTHROUGH_PORT: u16 = 22;

pub(super) struct ConnHandler {
    state: Arc<Services>,
    throttle: Arc<AuthThrottle>,
    peer: SocketAddr,
    /// Instance this connection is about: fixed for inner connections, or from `user%instance`.
    target: Option<String>,
    /// For an inner connection (the instance comes from the outer direct-tcpip channel): the
    /// person the outer connection authenticated. The inner hop must authenticate as them
    /// again; its user name is the OS login, not an identity.
    outer: Option<Identity>,
    /// The OS login the inner hop's user name asks for (`ssh deploy@web-01.<suffix>`).
    login: Option<String>,
    identity: Option<Identity>,
    /// Keys offered or tried without success, for one audit event per connection.
    failed_keys: Vec<String>,
    failed_user: Option<String>,
    /// The key whose offer was accepted because it is bound to the user: its signed request
    /// follows at once and does not wait its turn again.
    vetted_key: Option<russh::keys::PublicKey>,
    /// Channel opens being decided in their own tasks (bounded per connection).
    opening: Arc<tokio::sync::Semaphore>,
    /// This connection on the connection table (closed when its user loses access).
    conn: Arc<Conn>,
    /// Its place among the connections not yet authenticated, until it authenticates.
    startup: Option<Startup>,
    /// Set when this is `postern login`'s sign-in connection ([`super::login`]).
    sign_in: Option<super::login::SignIn>,
}

impl Drop for ConnHandler {
    fn drop(&mut self) {
        // One event per connection that never authenticated, however many keys the client
        // offered (the throttle counted each attempt as it came).
        if self.identity.is_none() && !self.failed_keys.is_empty() {
            let _ = self.state.audit.event(&Event::AuthFailed(AuthFailed {
                source: self.peer.to_string(),
                user: self.failed_user.clone(),
                method: "publickey".to_owned(),
                keys: self.failed_keys.clone(),
                inner: self.outer.is_some(),
            }));
        }
    }
}

impl ConnHandler {
    pub(super) fn new(
        state: Arc<Services>,
        throttle: Arc<AuthThrottle>,
        peer: SocketAddr,
        inner: Option<(String, Identity)>,
        conn: Arc<Conn>,
    ) -> Self {
        let (target, outer) = inner.map(|(t, o)| (Some(t), Some(o))).unwrap_or_default();
        Self {
            state,
            throttle,
            peer,
            target,
            outer,
            login: None,
            identity: None,
            failed_keys: Vec::new(),
            failed_user: None,
            vetted_key: None,
            opening: Arc::new(tokio::sync::Semaphore::new(MAX_OPENING_CHANNELS)),
            conn,
            startup: None,
            sign_in: None,
        }
    }

    /// Count this connection among the startups until it authenticates.
    pub(super) fn with_startup(mut self, startup: Startup) -> Self {
        self.startup = Some(startup);
        self
    }

    /// Authentication succeeded as `identity`.
    fn authenticated(&mut self, identity: Identity) {
        self.conn.authenticated(&identity.user);
        self.identity = Some(identity);
        if let Some(s) = self.startup.take() {
            s.authenticated();
        }
    }

    /// Who is authenticating, and what the SSH user name asks for: on the gateway hop the
    /// user name is the Postern identity (`alice`, or `alice%web-01` naming the instance too);
    /// on an inner hop the identity is the outer hop's person and the user name is the OS
    /// login (`(alice, None, Some(deploy))`).
    fn split_user(&self, user: &str) -> (String, Option<String>, Option<String>) {
        if let Some(outer) = &self.outer {
            return (outer.user.clone(), None, Some(user.to_owned()));
        }
        match user.split_once('%') {
            Some((u, i)) if !i.is_empty() => (u.to_owned(), Some(i.to_owned()), None),
            _ => (user.to_owned(), None, None),
        }
    }
}

impl russh::server::Handler for ConnHandler {
    type Error = russh::Error;

    /// Only `postern login`'s sign-in connection gets in without a key, and only to sign in
    /// ([`super::login`]); with no `[identity.oidc]`, nobody does.
    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        if user != postern_core::command::LOGIN_USER || self.outer.is_some() || self.sign_in.is_some() {
            return Ok(Auth::reject());
        }
        let Some(sso) = self.state.sso.clone() else { return Ok(Auth::reject()) };
        let Some(place) = sso.admit(self.peer.ip()) else {
            postern_tunnel::info_limited!("too many sign-in connections; refusing one");
            return Ok(Auth::reject());
        };
        debug!("sign-in connection");
        self.sign_in = Some(super::login::SignIn {
            sso,
            flows: Default::default(),
            commands: Arc::new(tokio::sync::Semaphore::new(super::login::MAX_COMMANDS)),
            _place: place,
        });
        // Its place among the startups goes back (a sign-in waits minutes for its person);
        // its life is bounded instead.
        if let Some(s) = self.startup.take() {
            s.authenticated();
        }
        let conn = Arc::downgrade(&self.conn);
        tokio::spawn(async move {
            tokio::time::sleep(super::login::LOGIN_CONNECTION_MAX).await;
            if let Some(c) = conn.upgrade() {
                c.close_because("the sign-in took too long (15 minutes); run postern login again");
            }
        });
        Ok(Auth::Accept)
    }

    async fn auth_publickey_offered(&mut self, user: &str, offer: PublicKeyOffer<'_>) -> Result<Auth, Self::Error> {
        let (name, _, _) = self.split_user(user);
        let name = name.as_str();
        self.wait_turn(name).await;
        if self.state.access.authenticate(name, offer.public_key, None).is_some() {
            self.vetted_key = Some(offer.public_key.clone());
            self.throttle.forgive(self.peer.ip(), name);
            Ok(Auth::Accept)
        } else if self.state.access.has_user_cas() {
            // A certificate offer carries the certificate's key, bound to nobody: let the
            // client prove possession and decide (and count) in auth_openssh_certificate.
            self.throttle.forgive(self.peer.ip(), name);
            Ok(Auth::Accept)
        } else {
            self.note_failure(name, offer.public_key);
            Ok(Auth::reject())
        }
    }

    async fn auth_publickey(&mut self, user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
        let (name, instance, login) = self.split_user(user);
        let name = name.as_str();
        if self.vetted_key.as_ref() == Some(key.public_key) {
            // Counted, so that success forgives it as any other attempt, but not delayed:
            // the offer of this very key waited its turn.
            let _ = self.throttle.attempt(self.peer.ip(), name);
        } else {
            self.wait_turn(name).await;
        }
        match self.state.access.authenticate(name, key.public_key, Some(self.peer.ip())) {
            Some(identity) => {
                if let Some(i) = instance {
                    self.target = Some(i);
                }
                self.login = login;
                info!(user = %identity.user, target = self.target.as_deref(), login = self.login.as_deref(), "ssh user authenticated");
                self.throttle.succeeded(self.peer.ip(), name);
                self.authenticated(identity);
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
        let (name, instance, login) = self.split_user(user);
        let name = name.as_str();
        self.wait_turn(name).await;
        match self.state.access.authenticate_certificate(name, cert, Some(self.peer.ip())) {
            Some(identity) => {
                if let Some(i) = instance {
                    self.target = Some(i);
                }
                self.login = login;
                info!(user = %identity.user, key_id = cert.key_id(), "ssh user authenticated by certificate");
                self.throttle.succeeded(self.peer.ip(), name);
                self.authenticated(identity);
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
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(s) = &self.sign_in {
            let Ok(place) = s.commands.clone().try_acquire_owned() else {
                reply.reject(ChannelOpenFailure::ResourceShortage).await;
                return Ok(());
            };
            reply.accept().await;
            let (sso, flows, source) = (s.sso.clone(), s.flows.clone(), self.peer.to_string());
            let serve = super::login::serve_login_channel(sso, flows, source, channel);
            tokio::spawn(
                async move {
                    serve.await;
                    drop(place);
                }
                .instrument(tracing::Span::current()),
            );
            return Ok(());
        }
        let Some(identity) = self.identity.clone() else { return Ok(()) };
        reply.accept().await;
        let ctx = SessionCtx {
            state: self.state.clone(),
            identity,
            target: self.target.clone(),
            login: self.login.clone(),
            peer: self.peer,
            handle: session.handle(),
        };
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
        let (target, action, destination) = match (&self.target, host.strip_suffix(&suffix)) {
            // Jump host hop to `<instance>.<suffix>`: serve an inner SSH session ourselves.
            (None, Some(instance)) if !instance.is_empty() => {
                self.serve_inner(identity, instance, channel, reply).await;
                return Ok(());
            }
            // Jump host hop to a plain instance name: passthrough to its own sshd, and to
            // nothing else (other ports are port forwards, with their own action and rules).
            (None, _) if port != PASSTHROUGH_PORT => {
                self.refuse_passthrough(&identity, host, port);
                reply.reject(ChannelOpenFailure::AdministrativelyProhibited).await;
                return Ok(());
            }
            (None, _) => (host.to_owned(), Action::SshPassthrough, Some(("127.0.0.1".to_owned(), PASSTHROUGH_PORT))),
            // `postern rdp --local`: the instance's RDP server, wherever its agent says it is.
            (Some(target), _) if host == RDP_DESTINATION => (target.clone(), Action::Rdp, None),
            // `-L` on a connection to an instance: forward through its agent.
            (Some(target), _) => (target.clone(), Action::PortForward, Some((host.to_owned(), port))),
        };
        // Decided and opened in the channel's own task: the agent may take seconds to reach
        // the destination, and this callback runs inside the connection's packet loop.
        let Ok(permit) = self.opening.clone().try_acquire_owned() else {
            debug!("too many channel opens in progress on this connection");
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        };
        let open = ChannelOpen { identity, peer: self.peer, target, action, destination, channel, reply };
        let state = self.state.clone();
        tokio::spawn(
            async move {
                open_channel(state, open, permit).await;
            }
            .instrument(tracing::Span::current()),
        );
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
    /// A jump to a plain instance name on a port other than SSH's: refused and audited.
    fn refuse_passthrough(&self, identity: &Identity, host: &str, port: u16) {
        let suffix = &self.state.config.ssh.suffix;
        let reason = format!(
            "ssh-passthrough reaches only the instance's sshd (port {PASSTHROUGH_PORT}); for port {port} use a \
             port forward: ssh -L <local>:127.0.0.1:{port} {user}%{host}@<gateway> (or {user}@{host}.{suffix})",
            user = identity.user,
        );
        postern_tunnel::info_limited!(target = %host, port, "passthrough to a port other than ssh refused");
        let _ = self.state.audit.event(&Event::SessionDenied(SessionDenied::Ssh(SshDenied {
            user: identity.user.clone(),
            target: host.chars().take(255).collect(),
            action: Action::SshPassthrough,
            source: self.peer.to_string(),
            reason,
            destination: None,
            door: None,
        })));
    }

    /// Count an authentication attempt by `user` and wait as long as the throttle says
    /// (nothing unless this address, or this user at it, failed repeatedly of late). The
    /// wait is inside the connection's packet loop: this connection only.
    async fn wait_turn(&self, user: &str) {
        let delay = self.throttle.attempt(self.peer.ip(), user);
        if !delay.is_zero() {
            debug!(?delay, "repeated authentication failures; delaying this attempt");
            tokio::time::sleep(delay).await;
        }
    }

    fn note_failure(&mut self, user: &str, key: &russh::keys::PublicKey) {
        self.failed_user = Some(user.chars().take(64).collect());
        if self.failed_keys.len() < 16 {
            self.failed_keys.push(key.fingerprint(Default::default()).to_string());
        }
    }

    /// `ssh alice@web-01.<suffix>` through the gateway as ProxyJump: the gateway answers
    /// the channel with an inner SSH server whose host certificate names that instance.
    async fn serve_inner(
        &self,
        identity: Identity,
        instance: &str,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
    ) {
        let principal = format!("{instance}.{}", self.state.config.ssh.suffix);
        let config = match self.state.host_keys.certificate_for(&[principal]) {
            Ok(cert) => Arc::new(server_config(&self.state, cert)),
            Err(e) => {
                postern_tunnel::warn_limited!(error = %format!("{e:#}"), "cannot issue host certificate");
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
                return;
            }
        };
        reply.accept().await;
        // The inner connection is on the connection table too (closed with its person's access).
        let conn = Arc::new(self.state.connections.open());
        let handler = ConnHandler::new(
            self.state.clone(),
            self.throttle.clone(),
            self.peer,
            Some((instance.to_owned(), identity)),
            conn.clone(),
        );
        let span = info_span!("inner", instance = %instance);
        let never = CancellationToken::new();
        tokio::spawn(
            async move {
                match russh::server::run_stream(config, channel.into_stream(), handler).await {
                    Ok(session) => run_connection(session, &conn, &never, None).await,
                    Err(e) => debug!(error = %e, "inner ssh handshake failed"),
                }
            }
            .instrument(span),
        );
    }
}

/// Drive one SSH connection until it ends, the gateway shuts down, its user loses access
/// (`conn` is closed by the enforcer), or it has not authenticated by the `login` deadline
/// (the token is cancelled on authentication): then disconnect it, whatever its channels
/// are doing.
pub(super) async fn run_connection<H>(
    session: russh::server::RunningSession<H>,
    conn: &Conn,
    shutdown: &CancellationToken,
    mut login: Option<LoginDeadline>,
) where
    H: russh::server::Handler + Send + 'static,
    H::Error: std::fmt::Display,
{
    let handle = session.handle();
    let mut session = std::pin::pin!(session);
    let mut linger = Duration::from_secs(2);
    let why = tokio::select! {
        r = &mut session => {
            if let Err(e) = r { debug!(error = %e, "ssh connection ended with error") }
            return;
        }
        _ = shutdown.cancelled() => "gateway shutting down",
        _ = LoginDeadline::expired(&mut login) => {
            debug!("not authenticated within the login grace time; closing");
            linger = Duration::from_millis(200);
            "not authenticated within the login grace time"
        }
        _ = conn.closed() => {
            // The user's sessions were told to end just before: let their notices and exit
            // statuses reach the client first (they end at once, even when it is not reading).
            if tokio::time::timeout(REVOKED_GRACE, &mut session).await.is_ok() {
                return;
            }
            conn.closed_because().unwrap_or("your access to this gateway was revoked (user disabled or removed)")
        }
    };
    let _ = handle.disconnect(russh::Disconnect::ByApplication, why.into(), "en".into()).await;
    // Let the disconnect message go out, briefly.
    let _ = tokio::time::timeout(linger, session).await;
    // russh does not act on the disconnect while a key exchange waits for the client:
    // close the socket under it (it then ends, and the connection gives its place back).
    if let Some(l) = &login {
        l.close();
    }
}
