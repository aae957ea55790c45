//! Live watch: a member of `[web] admin_groups` opens a live shell or exec session (from
//! any door) read-only and sees its output as it happens. The session's user is told, in
//! their terminal, who is watching and when they stop; `session.watch.start` and
//! `session.watch.end` are audited.
//!
//! The page (`GET /watch?session=ID`) is a read-only xterm.js on `GET
//! /ws/watch?session=ID`: the gateway sends the session's output as binary messages and
//! JSON events as text (`{"watching":{...}}`, `{"lagged":N}` when the watcher fell behind
//! and missed N chunks, `{"ended":{"reason":WHY}}`); what the browser sends is ignored.
//! A watcher who falls behind misses output rather than slowing the session.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use postern_core::Action;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tracing::{Instrument, info_span};

use super::common::{Answer, Web, answer, is_admin, query_param};
use super::socket::{self, Socket, close_with};
use crate::audit::events::{Event, SessionWatchEnd, SessionWatchStart};
use crate::services::Services;
use crate::sessions::LiveSession;

/// How often a watcher's right to watch is checked again.
const RECHECK: Duration = Duration::from_secs(1);

/// The live session `id` an administrator may watch: a shell or exec session on this
/// gateway's live table. `None` for anyone else, or another kind.
pub(super) fn watchable(state: &Services, watcher: &str, id: &str) -> Option<Arc<LiveSession>> {
    if !is_admin(state, watcher) {
        return None;
    }
    state.sessions.get(id).filter(|s| matches!(s.party.action, Action::Shell | Action::Exec) && !s.party.via_admin)
}

/// Answer the watch WebSocket's handshake ([`socket::upgrade`] checks it).
pub(super) fn upgrade(state: &Arc<Services>, web: &Web, req: Request<Incoming>, peer: SocketAddr) -> Answer {
    let Some(id) = query_param(&req, "session").filter(|i| i.len() <= 64) else {
        return answer(StatusCode::BAD_REQUEST, "text/plain; charset=utf-8", "name a session");
    };
    let state = state.clone();
    socket::upgrade(&state.clone(), web, req, move |socket, session| {
        async move { serve(&state, socket, &session.user, peer, &id).await }.instrument(info_span!("web watch", %peer))
    })
}

async fn serve(state: &Services, socket: Socket, watcher: &str, peer: SocketAddr, id: &str) {
    let (sink, mut input) = socket.split();
    let sink = tokio::sync::Mutex::new(sink);
    let Some(live) = watchable(state, watcher, id) else {
        let refused = json!({"refused": "there is no live session with this id that you may watch"});
        return close_with(&sink, refused, CloseCode::Policy, "refused").await;
    };
    // Subscribed before anyone is told, so nothing said after the notice is missed.
    let mut output = live.watch();
    let _ = state.audit.event(&Event::SessionWatchStart(SessionWatchStart {
        session_id: live.id.clone(),
        watcher: watcher.to_owned(),
        user: live.party.user.clone(),
        target: live.party.target.clone(),
        source: peer.to_string(),
    }));
    live.tell_user(format!("{watcher} is watching this session (read-only)"));
    let started = Instant::now();
    let hello = json!({"watching": {"session": live.id, "user": live.party.user, "instance": live.party.target}});
    let _ = sink.lock().await.send(Message::text(hello.to_string())).await;
    let mut recheck = tokio::time::interval(RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let reason = loop {
        tokio::select! {
            chunk = output.recv() => match chunk {
                Ok(data) => {
                    if sink.lock().await.send(Message::binary(data)).await.is_err() {
                        break "closed";
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    let _ = sink.lock().await.send(Message::text(json!({"lagged": missed}).to_string())).await;
                }
                Err(RecvError::Closed) => break "session-ended",
            },
            _ = live.over() => break "session-ended",
            msg = input.next() => match msg {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break "closed",
                // Read-only: keystrokes and anything else from the watcher are dropped.
                Some(Ok(_)) => {}
            },
            _ = recheck.tick() => {
                if !state.access.user_active(watcher) || !is_admin(state, watcher) {
                    break "not-allowed";
                }
            }
        }
    };
    let _ = state.audit.event(&Event::SessionWatchEnd(SessionWatchEnd {
        session_id: live.id.clone(),
        watcher: watcher.to_owned(),
        reason: reason.to_owned(),
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    }));
    let why = match reason {
        "session-ended" => "the session ended".to_owned(),
        "not-allowed" => "you may no longer watch sessions".to_owned(),
        _ => "closed".to_owned(),
    };
    if reason != "session-ended" {
        live.tell_user(format!("{watcher} stopped watching"));
    }
    close_with(&sink, json!({"ended": {"reason": why}}), CloseCode::Normal, "watch ended").await;
}
