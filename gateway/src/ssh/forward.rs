//! `direct-tcpip` channels that go through an agent: `-L` forwards, passthrough to the
//! instance's own sshd (`-J`), and `@rdp` (`postern rdp --local`). Each channel is decided and
//! opened in its own task ([`open_channel`]), never inside russh's handler callback: the
//! callback runs inside the connection's packet loop, and a destination that takes seconds
//! to answer would otherwise stall every other channel of that SSH connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use postern_core::policy::host::Host;
use postern_core::{Action, Identity};
use postern_proto::ErrorCode;
use postern_proto::{SessionRequest, TcpByNameRequest, TcpRequest};
use postern_tunnel::server::{OpenError, SessionStream};
use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelMsg, ChannelOpenFailure};
use tokio::sync::OwnedSemaphorePermit;

use crate::access::Authorization;
use crate::audit::events::{
    Event, ForwardClose, ForwardFailed, ForwardOpen, RdpClose, RdpFailed, RdpMode, RdpOpen, SessionDenied, SshDenied,
};
use crate::broker::unlogged;
use crate::services::Services;
use crate::sessions::LiveSession;

/// A `direct-tcpip` channel waiting for its decision.
pub(super) struct ChannelOpen {
    pub identity: Identity,
    pub peer: SocketAddr,
    /// The instance the channel reaches (a name or id).
    pub target: String,
    pub action: Action,
    /// For forwards and passthrough: where the agent connects.
    pub destination: Option<(String, u16)>,
    pub channel: Channel<Msg>,
    pub reply: ChannelOpenHandle,
}

/// Decide one channel, open its tunnel stream and relay it until it ends.
pub(super) async fn open_channel(state: Arc<Services>, open: ChannelOpen, permit: OwnedSemaphorePermit) {
    let ChannelOpen { identity, peer, target, action, destination, channel, reply } = open;
    let dest = destination.as_ref().map(|(h, p)| (h.as_str(), *p));
    // What the client asked for, as it spelled it (audited beside what was dialled).
    let requested = match (action, &destination) {
        (Action::PortForward, Some((h, p))) => Some(format!("{}:{p}", h.chars().take(255).collect::<String>())),
        _ => None,
    };
    let authz = match state.authorizer.authorize(&identity, &target, action, None, None, dest).await {
        Ok(a) => a,
        Err(msg) => {
            let _ = state.audit.event(&Event::SessionDenied(SessionDenied::Ssh(SshDenied {
                user: identity.user.clone(),
                target: target.clone(),
                action,
                source: peer.to_string(),
                reason: msg.to_string(),
                destination: requested,
                door: None,
            })));
            // The reason is the channel-open failure's text (`ssh -L` prints it), with a near
            // miss among the instances this user may reach.
            let why = match msg.as_ref() {
                postern_core::DENIED => match super::commands::near_miss(&state, &identity, &target).await {
                    Some(near) => format!("{msg}; did you mean {near}?"),
                    None => msg.into_owned(),
                },
                _ => msg.into_owned(),
            };
            reply.reject(refusal(ChannelOpenFailure::AdministrativelyProhibited, &why)).await;
            return;
        }
    };
    let why = match action {
        Action::SshPassthrough => unlogged::PASSTHROUGH,
        Action::Rdp => unlogged::RDP,
        _ => unlogged::FORWARD,
    };
    forward(&state, peer, (authz, requested), channel, reply, why, permit).await;
}

/// A channel-open failure of `kind` whose text says why (the client shows it: OpenSSH as
/// "open failed: administratively prohibited: TEXT").
fn refusal(kind: ChannelOpenFailure, why: &str) -> ChannelOpenFailure {
    ChannelOpenFailure::Other { code: kind.code(), reason: why.chars().take(400).collect() }
}

/// Whether the agent's report of where it connected (`IP:PORT`) is outside the policy's
/// deny ranges.
fn resolved_allowed(denies: &[ipnet::IpNet], resolved: &str) -> bool {
    resolved.parse::<SocketAddr>().is_ok_and(|a| {
        let ip = match a.ip() {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(a.ip()),
            v4 => v4,
        };
        !ip.is_unspecified() && !denies.iter().any(|n| n.contains(&ip))
    })
}

async fn forward(
    state: &Services,
    peer: SocketAddr,
    (authz, requested): (Authorization, Option<String>),
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
    unlogged_reason: &'static str,
    permit: OwnedSemaphorePermit,
) {
    // The agent dials exactly what was authorized, in its canonical form.
    let (req, destination) = match (authz.action(), authz.destination()) {
        (Action::Rdp, _) => (SessionRequest::Rdp, "rdp".to_owned()),
        // The instance's own sshd, where its agent says (`ssh_address`): never another port.
        (Action::SshPassthrough, _) => (SessionRequest::Ssh, "ssh".to_owned()),
        // An address was decided exactly; a name is resolved by the agent, which checks
        // every address it gets against the policy's deny ranges.
        (_, Some((host @ Host::Ip(_), port))) => {
            (SessionRequest::Tcp(TcpRequest { host: host.to_string(), port }), host.with_port(port))
        }
        (_, Some((host @ Host::Name(_), port))) => (
            SessionRequest::TcpByName(TcpByNameRequest {
                host: host.to_string(),
                port,
                deny: authz.address_denies().iter().map(|n| n.to_string()).collect(),
            }),
            host.with_port(port),
        ),
        (_, None) => {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return;
        }
    };
    let opened = state.broker.open(&authz, req).await.and_then(|mut s| {
        // The agent checked its addresses; this catches one that did not (nothing is relayed).
        let denied =
            s.connected_to.as_deref().filter(|a| !resolved_allowed(authz.address_denies(), a)).map(str::to_owned);
        match denied {
            Some(addr) => {
                s.send.reset(0);
                Err(postern_tunnel::server::OpenError::Tunnel(format!(
                    "the agent connected to a denied address {addr}"
                )))
            }
            None => Ok(s),
        }
    });
    let stream = match opened {
        Ok(s) => s,
        Err(e) => {
            postern_tunnel::info_limited!(error = %e, "forward refused");
            let (user, target, error) = (authz.user().to_owned(), authz.instance().to_owned(), e.to_string());
            let _ = state.audit.event(&match authz.action() {
                Action::Rdp => Event::RdpFailed(RdpFailed {
                    user,
                    target,
                    destination: Some(destination.clone()),
                    source: None,
                    token_id: None,
                    error,
                }),
                _ => Event::ForwardFailed(ForwardFailed { user, target, destination: destination.clone(), error }),
            });
            // Why, in the channel-open failure's text: what the agent said (its `tcp_allow`,
            // a refused connection), or that it is offline.
            let (kind, why) = match &e {
                OpenError::Rejected { code: ErrorCode::Forbidden, reason } => {
                    (ChannelOpenFailure::AdministrativelyProhibited, format!("{}: {reason}", authz.instance()))
                }
                OpenError::Rejected { reason, .. } => {
                    (ChannelOpenFailure::ConnectFailed, format!("{}: {reason}", authz.instance()))
                }
                OpenError::Offline => (
                    ChannelOpenFailure::ConnectFailed,
                    format!("instance {} is offline (its agent is not connected)", authz.instance()),
                ),
                other => (ChannelOpenFailure::ConnectFailed, format!("{} {destination}: {other}", authz.instance())),
            };
            reply.reject(refusal(kind, &why)).await;
            return;
        }
    };
    reply.accept().await;
    // Opened: the connection may open more channels while this one relays.
    drop(permit);
    let sid = stream.id.to_string();
    // Where the agent connected: what it reported for a name, the address itself otherwise.
    let resolved = requested.as_ref().map(|_| stream.connected_to.clone().unwrap_or_else(|| destination.clone()));
    let running = state.broker.start(
        &sid,
        authz.party(Some(peer.ip()), false),
        &open_event(&authz, &sid, &destination, peer, unlogged_reason, (requested, resolved), stream.via.clone()),
    );
    let SessionStream { send, recv, .. } = stream;
    let max = authz.limits().max_session;
    let (bytes_up, bytes_down) = relay_forward(channel, send, recv, running.live(), max).await;
    let end_reason = running.live().reason();
    running.finish(|duration_ms| {
        let (session_id, user, target) = (sid.clone(), authz.user().to_owned(), authz.instance().to_owned());
        let reason = unlogged_reason.to_owned();
        match authz.action() {
            // RDP events say which way in was used: "local" here, "gateway" for the RDP port.
            Action::Rdp => Event::RdpClose(RdpClose {
                session_id,
                user,
                target,
                mode: RdpMode::Local,
                destination: Some(destination),
                bytes_to_target: bytes_up,
                bytes_from_target: bytes_down,
                end_reason,
                duration_ms,
                logged: false,
                reason,
            }),
            action => {
                let close = ForwardClose {
                    session_id,
                    user,
                    target,
                    destination,
                    bytes_to_target: bytes_up,
                    bytes_from_target: bytes_down,
                    end_reason,
                    duration_ms,
                    logged: false,
                    reason,
                };
                if action == Action::SshPassthrough {
                    Event::PassthroughClose(close)
                } else {
                    Event::ForwardClose(close)
                }
            }
        }
    });
}

/// `forward.open`, `passthrough.open` or (`@rdp`) `rdp.open` with mode "local"; `spelled`
/// is (requested, resolved) for `-L` forwards.
fn open_event(
    authz: &Authorization,
    sid: &str,
    destination: &str,
    peer: SocketAddr,
    reason: &str,
    spelled: (Option<String>, Option<String>),
    via_gateway: Option<String>,
) -> Event {
    let (requested, resolved) = spelled;
    let (session_id, user, target) = (sid.to_owned(), authz.user().to_owned(), authz.instance().to_owned());
    let (destination, source, reason) = (destination.to_owned(), peer.to_string(), reason.to_owned());
    match authz.action() {
        Action::Rdp => Event::RdpOpen(RdpOpen {
            session_id,
            user,
            target,
            source,
            mode: RdpMode::Local,
            destination: Some(destination),
            token_id: None,
            request: None,
            logged: false,
            reason,
            via_gateway,
        }),
        action => {
            let open = ForwardOpen {
                session_id,
                user,
                target,
                destination,
                source,
                logged: false,
                reason,
                requested,
                resolved,
                via_gateway,
                cert_serial: authz.cert_serial().map(|s| format!("{s:016x}")),
            };
            if action == Action::SshPassthrough { Event::PassthroughOpen(open) } else { Event::ForwardOpen(open) }
        }
    }
}

/// Moves a forward's bytes between an SSH channel and a tunnel stream until both directions
/// end. Chunks are handed over as `Bytes`, never copied through an intermediate buffer (the
/// copy showed up in profiles of `ssh -L` throughput). Returns bytes (to target, from target).
pub(super) async fn relay_forward(
    channel: Channel<Msg>,
    mut send: postern_tunnel::transport::SendStream,
    mut recv: postern_tunnel::transport::RecvStream,
    live: &LiveSession,
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
        while let Ok(Some(chunk)) = recv.read_chunk().await {
            n += chunk.len() as u64;
            live.add_out(chunk.len());
            if ch_write.data_bytes(chunk).await.is_err() {
                break;
            }
        }
        let _ = ch_write.eof().await;
        n
    };
    let both = async { tokio::join!(up, down) };
    let counted = || (live.bytes_in.load(Ordering::Relaxed), live.bytes_out.load(Ordering::Relaxed));
    let mut ended = false;
    let (up, down) = tokio::select! {
        r = both => r,
        // Ended by an admin, by policy or at its maximum length: the relay (and any write
        // blocked on a client that stopped reading) is dropped.
        _ = live.terminated_or_after(max_session) => { ended = true; counted() }
    };
    if ended {
        // Reset, not finish, so that the agent closes its connection at once.
        send.reset(0);
    }
    let _ = ch_write.close().await;
    (up, down)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_report_of_a_denied_address_is_caught() {
        let denies: Vec<ipnet::IpNet> = vec!["127.0.0.1/32".parse().unwrap(), "fd00::/8".parse().unwrap()];
        assert!(resolved_allowed(&denies, "127.0.0.2:6379"));
        assert!(resolved_allowed(&denies, "[::1]:6379"));
        for bad in ["127.0.0.1:6379", "[::ffff:127.0.0.1]:6379", "[fd00::5]:1", "0.0.0.0:1", "[::]:1", "nonsense", ""] {
            assert!(!resolved_allowed(&denies, bad), "{bad}");
        }
    }
}
