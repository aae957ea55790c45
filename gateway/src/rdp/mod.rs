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
//!
//! Before its token is redeemed a connection has proved nothing, so that phase is bounded:
//! at most `[rdp] max_handshakes` connections at once and `max_handshakes_per_source` from
//! one address (more are closed on arrival), each for at most `handshake_timeout`; and its
//! refusals are audited at most once per address per `[audit] refusal_interval`, the rest
//! as one summary with a `count`. Refusals of a redeemed token (policy) name a user and are
//! always written.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use postern_proto::SessionRequest;
use postern_tunnel::CancellationToken;
use postern_tunnel::server::SessionStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, info, info_span};

use crate::accept::{Full, RefusalDigest, Slot, SourceSlots};
use crate::access::Authorization;
use crate::audit::events::{
    Event, RdpClose, RdpDenied, RdpFailed, RdpMode, RdpOpen, RdpRequest, RdpTokenHolder, SessionDenied,
};
use crate::broker::{Running, unlogged};
use crate::rdp_wire::preamble::{self, Preamble};
use crate::rdp_wire::token::Claims;
use crate::services::Services;
use postern_core::{Action, Identity};

/// Refusals before a token was redeemed, audited once per source per interval.
type Denials = RefusalDigest<RdpDenied>;

pub async fn serve(listener: TcpListener, state: Arc<Services>, shutdown: CancellationToken) {
    let rdp = &state.config.rdp;
    let handshakes = SourceSlots::new(rdp.max_handshakes, rdp.max_handshakes_per_source);
    let denials = Arc::new(Denials::new(state.config.refusal_interval()));
    let audit = state.audit.clone();
    let summaries = tokio::spawn(denials.clone().summarise(
        move |last: RdpDenied, count| {
            let _ = audit.event(&Event::SessionDenied(SessionDenied::Rdp(RdpDenied { count: Some(count), ..last })));
        },
        shutdown.clone(),
    ));
    let mut prune = tokio::time::interval(Duration::from_secs(60));
    let mut backoff = crate::accept::AcceptBackoff::default();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = prune.tick() => {
                state.rdp_tokens.prune();
                continue;
            }
            r = listener.accept() => match r {
                Ok(c) => { backoff.reset(); c }
                Err(e) => { backoff.failed("rdp", &e).await; continue; }
            },
        };
        let slot = match handshakes.admit(peer.ip()) {
            Ok(s) => s,
            Err(full) => {
                // Closed at once (dropping the stream), before any work is spent on it.
                debug!(%peer, ?full, "too many rdp handshakes in progress; closing");
                let (cap, limit) = match full {
                    Full::Total => ("max_handshakes", handshakes.max_total()),
                    Full::Source => ("max_handshakes_per_source", handshakes.max_per_source()),
                };
                deny_unproven(
                    &state,
                    &denials,
                    peer,
                    format!("too many connections still in their handshake ([rdp] {cap} = {limit})"),
                    "too-many-handshakes",
                    None,
                );
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let st = state.clone();
        let stop = shutdown.clone();
        let denials = denials.clone();
        tokio::spawn(
            async move {
                tokio::select! {
                    _ = handle(st, &denials, tcp, peer, slot) => {}
                    _ = stop.cancelled() => {}
                }
            }
            .instrument(info_span!("rdp", %peer)),
        );
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), summaries).await;
}

/// `session.denied` for a connection that has not redeemed a token: at once if it is the
/// first from its address this interval, else counted for the summary.
fn deny_unproven(
    state: &Services,
    denials: &Denials,
    peer: SocketAddr,
    reason: String,
    code: &str,
    seen: Option<&Preamble>,
) {
    let denial = RdpDenied {
        action: Action::Rdp,
        source: peer.to_string(),
        reason,
        code: code.to_owned(),
        token: None,
        request: seen.map(rdp_request),
        count: None,
    };
    if let Some(d) = denials.refused(peer.ip(), denial, Instant::now()) {
        let _ = state.audit.event(&Event::SessionDenied(SessionDenied::Rdp(d)));
    }
}

async fn handle(state: Arc<Services>, denials: &Denials, mut tcp: TcpStream, peer: SocketAddr, slot: Slot) {
    // `session.denied` once the token was redeemed: it names a user, so always written.
    let denied = |reason: String, code: &str, token: RdpTokenHolder, seen: &Preamble| {
        let _ = state.audit.event(&Event::SessionDenied(SessionDenied::Rdp(RdpDenied {
            action: Action::Rdp,
            source: peer.to_string(),
            reason,
            code: code.to_owned(),
            token: Some(token),
            request: Some(rdp_request(seen)),
            count: None,
        })));
    };
    let holder =
        |c: &Claims| RdpTokenHolder { user: c.user.clone(), target: c.instance.clone(), token_id: c.id.clone() };
    let limit = state.config.rdp_handshake_timeout();
    let pre = match tokio::time::timeout(limit, preamble::read(&mut tcp)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => {
            postern_tunnel::info_limited!(reason = %e, "rdp connection refused");
            deny_unproven(&state, denials, peer, e.to_string(), e.code(), None);
            return;
        }
        Err(_) => {
            postern_tunnel::info_limited!("rdp preamble timed out");
            deny_unproven(
                &state,
                denials,
                peer,
                format!("no preconnection blob and connection request within {}s", limit.as_secs()),
                "timeout",
                None,
            );
            return;
        }
    };
    drop(slot);
    let claims = match state.rdp_tokens.redeem(&pre.token).await {
        Ok(c) => c,
        Err(e) => {
            postern_tunnel::info_limited!(reason = %e, "rdp token refused");
            deny_unproven(&state, denials, peer, e.to_string(), e.code(), Some(&pre));
            return;
        }
    };
    let identity = Identity::new(claims.user.clone(), Some(peer.ip()));
    let authz = match state.authorizer.authorize(&identity, &claims.instance, Action::Rdp, None, None, None).await {
        Ok(a) if a.agent_id() == claims.agent_id => a,
        Ok(_) => {
            denied(
                "the instance is now a different agent than when the token was issued".to_owned(),
                "instance-changed",
                holder(&claims),
                &pre,
            );
            return;
        }
        Err(msg) => {
            denied(msg.into_owned(), "policy", holder(&claims), &pre);
            return;
        }
    };
    connect(&state, authz, tcp, peer, pre, &claims.id).await;
}

async fn connect(
    state: &Services,
    authz: Authorization,
    tcp: TcpStream,
    peer: SocketAddr,
    pre: Preamble,
    token_id: &str,
) {
    let stream = match state.broker.open(&authz, SessionRequest::Rdp).await {
        Ok(s) => s,
        Err(e) => {
            postern_tunnel::info_limited!(error = %e, "rdp session refused by the instance");
            let _ = state.audit.event(&Event::RdpFailed(RdpFailed {
                user: authz.user().to_owned(),
                target: authz.instance().to_owned(),
                destination: None,
                source: Some(peer.to_string()),
                token_id: Some(token_id.to_owned()),
                error: e.to_string(),
            }));
            return;
        }
    };
    let sid = stream.id.to_string();
    let running: Running = state.broker.start(
        &sid,
        authz.party(Some(peer.ip()), false),
        &Event::RdpOpen(RdpOpen {
            session_id: sid.clone(),
            user: authz.user().to_owned(),
            target: authz.instance().to_owned(),
            source: peer.to_string(),
            mode: RdpMode::Gateway,
            destination: None,
            token_id: Some(token_id.to_owned()),
            request: Some(rdp_request(&pre)),
            logged: false,
            reason: unlogged::RDP.to_owned(),
            via_gateway: stream.via.clone(),
        }),
    );
    info!(session_id = %sid, user = authz.user(), target = authz.instance(), "rdp session opened");
    let SessionStream { send, recv, .. } = stream;
    let max = authz.limits().max_session;
    let (up, down) = relay(tcp, pre.connection_request, send, recv, running.live(), max).await;
    let end_reason = running.live().reason();
    running.finish(|duration_ms| {
        Event::RdpClose(RdpClose {
            session_id: sid.clone(),
            user: authz.user().to_owned(),
            target: authz.instance().to_owned(),
            mode: RdpMode::Gateway,
            destination: None,
            bytes_to_target: up,
            bytes_from_target: down,
            end_reason,
            duration_ms,
            logged: false,
            reason: unlogged::RDP.to_owned(),
        })
    });
}

/// What the client's connection request said, for the audit log.
fn rdp_request(p: &Preamble) -> RdpRequest {
    RdpRequest { cookie: p.cookie.clone(), protocols: p.protocols.iter().map(|&s| s.to_owned()).collect() }
}

/// Pass the connection request on, then move bytes both ways until both directions end or
/// the session is terminated. Returns bytes (to the host, from the host).
async fn relay(
    tcp: TcpStream,
    first: Vec<u8>,
    mut send: postern_tunnel::transport::SendStream,
    mut recv: postern_tunnel::transport::RecvStream,
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
        while let Ok(Some(chunk)) = recv.read_chunk().await {
            n += chunk.len() as u64;
            live.add_out(chunk.len());
            if wr.write_all(&chunk).await.is_err() {
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
