//! The RDP front door.
//!
//! An RDP client connects to the gateway's RDP port and first sends a preconnection blob
//! (MS-RDPEPS) holding a routing token from `postern rdp INSTANCE`. The gateway reads it and
//! the X.224 Connection Request that follows (bounded in size and time), redeems the token
//! (signature, expiry, single use), asks the policy engine whether the token's user may use
//! `rdp` on its instance *now*, and only then opens a tunnel stream to that instance's agent,
//! which connects to the RDP server its own configuration names. From there bytes are
//! relayed unchanged: TLS and CredSSP run end to end between client and host, so the session
//! is audited as metadata with `logged=false`.
//!
//! Without a valid token nothing is dialled: the connection is closed and `session.denied`
//! is written, with the cookie and protocols from the Connection Request when it parsed.

pub mod preamble;
pub mod token;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use postern_proto::SessionRequest;
use postern_tunnel::CancellationToken;
use postern_tunnel::server::SessionStream;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::access::{Authorization, authorize_request};
use crate::gateway::GatewayState;
use postern_core::{Action, Identity};
use preamble::Preamble;
use token::Claims;

/// Why RDP sessions carry `logged=false`.
pub const UNLOGGED_REASON: &str = "RDP content is end-to-end encrypted (TLS/CredSSP)";
/// Connections still in their preamble at once; more are closed on arrival.
const MAX_HANDSHAKES: usize = 256;
/// Longest token lifetime `[rdp] token_ttl` may set.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// A token handed to a user, with where to use it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct IssuedToken {
    pub token: String,
    pub instance: String,
    pub expires_at: i64,
    pub expires_in: u64,
    /// `host:port` of the gateway's RDP front door.
    pub rdp_address: String,
}

/// `host:port` clients use for the RDP front door.
pub fn public_address(state: &GatewayState) -> String {
    if let Some(a) = &state.config.rdp.public_address {
        return a.clone();
    }
    let port = state.rdp_addr.map(|a| a.port()).unwrap_or(state.config.rdp.listen.port());
    format!("{}:{port}", crate::ssh::public_host(&state.config))
}

/// Issue a routing token to an authenticated user, if policy lets them use RDP on the
/// instance now (checked again when the token is used).
pub async fn issue_token(
    state: &GatewayState,
    identity: &Identity,
    instance: &str,
) -> Result<IssuedToken, &'static str> {
    if state.rdp_addr.is_none() {
        return Err("the RDP front door is turned off on this gateway ([rdp] enabled = false)");
    }
    let authz = match authorize_request(state, identity, instance, Action::Rdp, None, None).await {
        Ok(a) => a,
        Err(msg) => {
            let _ = state.audit.record(
                "session.denied",
                json!({"user": identity.user, "target": instance, "action": "rdp", "stage": "token",
                       "source": identity.source.map(|s| s.to_string()), "reason": msg}),
            );
            return Err(msg);
        }
    };
    let ttl = state.config.rdp_token_ttl();
    let now = postern_core::util::now_unix();
    let exp = now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
    let id = postern_core::util::random_hex(16).map_err(|_| "gateway random number generator failed")?;
    let claims = Claims {
        id: id.clone(),
        user: authz.user().to_owned(),
        instance: authz.instance().to_owned(),
        agent_id: authz.agent_id().to_owned(),
        iat: now,
        exp,
    };
    let token = state.rdp_tokens.issue(&claims);
    let _ = state.audit.record(
        "rdp.token_issued",
        json!({"user": claims.user, "target": claims.instance, "agent_id": claims.agent_id, "token_id": id,
               "expires_at": exp, "source": identity.source.map(|s| s.to_string())}),
    );
    Ok(IssuedToken {
        token,
        instance: claims.instance,
        expires_at: exp,
        expires_in: ttl.as_secs(),
        rdp_address: public_address(state),
    })
}

pub async fn serve(listener: TcpListener, state: Arc<GatewayState>, shutdown: CancellationToken) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let mut prune = tokio::time::interval(Duration::from_secs(60));
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = prune.tick() => {
                state.rdp_tokens.prune(postern_core::util::now_unix());
                continue;
            }
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "rdp accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            debug!(%peer, "too many rdp handshakes in progress; closing");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let st = state.clone();
        let stop = shutdown.clone();
        tokio::spawn(
            async move {
                tokio::select! {
                    _ = handle(st, tcp, peer, permit) => {}
                    _ = stop.cancelled() => {}
                }
            }
            .instrument(info_span!("rdp", %peer)),
        );
    }
}

async fn handle(
    state: Arc<GatewayState>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    // `session.denied`, with what the client's connection request said once it was read.
    let denied = |mut ev: Value, seen: Option<&Preamble>| {
        if let Some(o) = ev.as_object_mut() {
            o.insert("action".into(), "rdp".into());
            o.insert("source".into(), peer.to_string().into());
            if let Some(p) = seen {
                o.insert("cookie".into(), json!(p.cookie));
                o.insert("protocols".into(), json!(p.protocols));
            }
        }
        let _ = state.audit.record("session.denied", ev);
    };
    let limit = state.config.rdp_handshake_timeout();
    let pre = match tokio::time::timeout(limit, preamble::read(&mut tcp)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            info!(reason = %e, "rdp connection refused");
            denied(json!({"reason": e.to_string(), "code": e.code()}), None);
            return;
        }
        Err(_) => {
            info!("rdp preamble timed out");
            denied(
                json!({"reason": format!("no preconnection blob and connection request within {}s",
                                             limit.as_secs()), "code": "timeout"}),
                None,
            );
            return;
        }
    };
    drop(permit);
    let claims = match state.rdp_tokens.redeem(&pre.token, postern_core::util::now_unix()) {
        Ok(c) => c,
        Err(e) => {
            info!(reason = %e, "rdp token refused");
            denied(json!({"reason": e.to_string(), "code": e.code()}), Some(&pre));
            return;
        }
    };
    let identity = Identity { user: claims.user.clone(), source: Some(peer.ip()) };
    let authz = match authorize_request(&state, &identity, &claims.instance, Action::Rdp, None, None).await {
        Ok(a) if a.agent_id() == claims.agent_id => a,
        Ok(_) => {
            denied(
                json!({"user": claims.user, "target": claims.instance, "token_id": claims.id,
                       "reason": "the instance is now a different agent than when the token was issued",
                       "code": "instance-changed"}),
                Some(&pre),
            );
            return;
        }
        Err(msg) => {
            denied(
                json!({"user": claims.user, "target": claims.instance, "token_id": claims.id,
                       "reason": msg, "code": "policy"}),
                Some(&pre),
            );
            return;
        }
    };
    connect(&state, authz, tcp, peer, pre, &claims.id).await;
}

async fn connect(
    state: &GatewayState,
    authz: Authorization,
    tcp: TcpStream,
    peer: SocketAddr,
    pre: Preamble,
    token_id: &str,
) {
    let stream = match state.registry.open_session(authz.agent_id(), SessionRequest::Rdp).await {
        Ok(s) => s,
        Err(e) => {
            info!(error = %e, "rdp session refused by the instance");
            let _ = state.audit.record(
                "rdp.failed",
                json!({"user": authz.user(), "target": authz.instance(), "source": peer.to_string(),
                       "token_id": token_id, "error": e.to_string()}),
            );
            return;
        }
    };
    let sid = stream.id.to_string();
    let _ = state.audit.record(
        "rdp.open",
        json!({"session_id": sid, "user": authz.user(), "target": authz.instance(), "source": peer.to_string(),
               "mode": "gateway", "token_id": token_id, "cookie": pre.cookie, "protocols": pre.protocols,
               "logged": false, "reason": UNLOGGED_REASON}),
    );
    info!(session = %sid, user = authz.user(), target = authz.instance(), "rdp session opened");
    let reg = state.sessions.register(
        &sid,
        authz.user(),
        Some(peer.ip()),
        authz.instance(),
        authz.agent_id(),
        Action::Rdp,
        None,
        false,
        false,
    );
    let started = Instant::now();
    let SessionStream { send, recv, .. } = stream;
    let max = authz.limits().max_session;
    let (up, down) = relay(tcp, pre.connection_request, send, recv, &reg.session, max).await;
    let _ = state.audit.record(
        "rdp.close",
        json!({"session_id": sid, "user": authz.user(), "target": authz.instance(), "mode": "gateway",
               "bytes_to_target": up, "bytes_from_target": down, "end_reason": reg.session.reason(),
               "duration_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
               "logged": false, "reason": UNLOGGED_REASON}),
    );
}

/// Pass the connection request on, then move bytes both ways until both directions end or
/// the session is terminated. Returns bytes (to the host, from the host).
async fn relay(
    tcp: TcpStream,
    first: Vec<u8>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    live: &crate::sessions::LiveSession,
    max_session: Option<Duration>,
) -> (u64, u64) {
    let (mut rd, mut wr) = tcp.into_split();
    let up = async {
        let mut n = first.len() as u64;
        live.add_in(first.len());
        if send.write_all(&first).await.is_err() {
            return n;
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    n += k as u64;
                    live.add_in(k);
                    if send.write_all(buf.get(..k).unwrap_or_default()).await.is_err() {
                        break;
                    }
                }
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
            if wr.write_all(&chunk.bytes).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
        n
    };
    let counted = || (live.bytes_in.load(Ordering::Relaxed), live.bytes_out.load(Ordering::Relaxed));
    tokio::select! {
        r = async { tokio::join!(up, down) } => r,
        // Ended by an admin or by policy: dropping the relay closes both sides.
        _ = live.terminated_or_after(max_session) => counted(),
    }
}
