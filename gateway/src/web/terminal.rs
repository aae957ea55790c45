//! A terminal in the browser: xterm.js on a WebSocket, a shell on the instance through the
//! same authorization, launch (recording, audit, fail closed) and relay as an SSH session;
//! its audit events name `door: "web"`.
//!
//! The WebSocket (`GET /ws/terminal?instance=NAME&cols=C&rows=R[&login=L][&profile=P]`) is
//! upgraded only for a signed-in browser on the console's own page (its Origin); anything
//! else is refused before it is upgraded. On it:
//!
//! - browser -> gateway: binary messages are keystrokes; text messages are JSON controls,
//!   `{"resize":{"cols":C,"rows":R}}`.
//! - gateway -> browser: binary messages are terminal output; text messages are JSON
//!   events: `{"started":{"session":ID,"instance":NAME}}`, `{"refused":MESSAGE}`,
//!   `{"ended":{"reason":WHY,"exit":CODE}}`.

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use postern_core::util::glob_match;
use postern_core::{Action, Identity};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tracing::{Instrument, info_span};

use super::common::{Answer, Web, answer, query_param};
use super::socket::{self, Socket, close_with};
use crate::audit::events::{Event, SessionDenied, SshDenied};
use crate::launch::{Launch, Pty, Request as Asked, plan};
use crate::services::Services;
use crate::session_relay::{FromUser, Terms, UserInput, UserOutput, relay};

/// Largest terminal the browser may ask for.
const MAX_SIZE: u16 = 1000;

/// A terminal size from the browser, within bounds.
fn size(v: Option<String>, default: u16) -> u16 {
    v.and_then(|s| s.parse::<u16>().ok()).unwrap_or(default).clamp(1, MAX_SIZE)
}

/// Answer the WebSocket handshake for a terminal ([`socket::upgrade`] checks it), or
/// refuse it.
pub(super) fn upgrade(state: &Arc<Services>, web: &Web, req: Request<Incoming>, peer: SocketAddr) -> Answer {
    let Some(instance) = query_param(&req, "instance").filter(|i| i.len() <= 255) else {
        return answer(StatusCode::BAD_REQUEST, "text/plain; charset=utf-8", "name an instance");
    };
    let ask = Ask {
        instance,
        cols: size(query_param(&req, "cols"), 80),
        rows: size(query_param(&req, "rows"), 24),
        login: query_param(&req, "login"),
        profile: query_param(&req, "profile"),
    };
    let state = state.clone();
    socket::upgrade(&state.clone(), web, req, move |socket, session| {
        async move { serve(&state, socket, Identity::new(session.user, Some(peer.ip())), peer, ask).await }
            .instrument(info_span!("web terminal", %peer))
    })
}

/// What the browser asked for.
struct Ask {
    instance: String,
    cols: u16,
    rows: u16,
    login: Option<String>,
    profile: Option<String>,
}

async fn serve(state: &Services, socket: Socket, identity: Identity, peer: SocketAddr, ask: Ask) {
    let (sink, stream) = socket.split();
    let out = Output(tokio::sync::Mutex::new(sink));
    let mut input = Input(stream);
    let action = Action::Shell;
    let authz = match state
        .authorizer
        .authorize(&identity, &ask.instance, action, ask.profile.as_deref(), ask.login.as_deref(), None)
        .await
    {
        Ok(a) => a,
        Err(msg) => {
            let _ = state.audit.event(&Event::SessionDenied(SessionDenied::Ssh(SshDenied {
                user: identity.user.clone(),
                target: ask.instance.clone(),
                action,
                source: peer.to_string(),
                reason: msg.to_string(),
                destination: None,
                door: Some("web".to_owned()),
            })));
            return close_with(&out.0, json!({ "refused": msg }), CloseCode::Policy, "refused").await;
        }
    };
    let pty = Pty { term: "xterm-256color".to_owned(), cols: ask.cols, rows: ask.rows };
    // The browser's terminal is UTF-8: say so, as `ssh` passes the client's LANG (when
    // `[ssh] accept_env` lets LANG through).
    let env: Vec<(String, String)> = if state.config.ssh.accept_env.iter().any(|p| glob_match(p, "LANG")) {
        vec![("LANG".to_owned(), "C.UTF-8".to_owned())]
    } else {
        Vec::new()
    };
    let agent_request = match plan(&Asked::Shell, Some(&pty), env, authz.profile(), authz.run_as(), authz.allow_root())
    {
        Ok(r) => r,
        Err(message) => return close_with(&out.0, json!({ "refused": message }), CloseCode::Policy, "refused").await,
    };
    let launch = Launch {
        authz: &authz,
        action,
        agent_request,
        command: None,
        exec: false,
        pty: Some((ask.cols, ask.rows)),
        peer,
        door: Some("web"),
        run_id: None,
    };
    let (mut launched, stream) = match crate::launch::launch(state, launch).await {
        Ok(l) => l,
        Err(refused) => {
            return close_with(&out.0, json!({ "refused": refused.message }), CloseCode::Policy, "refused").await;
        }
    };
    {
        let started = json!({"started": {"session": launched.session_id, "instance": authz.instance()}});
        let _ = out.0.lock().await.send(Message::text(started.to_string())).await;
    }
    let live = launched.running.live().clone();
    let terms = Terms {
        live: &live,
        limits: authz.limits(),
        started: launched.running.started(),
        on_pty: true,
        fail_closed: state.config.audit.fail_closed,
    };
    let relayed = relay(&mut input, &out, stream, &mut launched.recorder, terms).await;
    let reason = match (live.reason(), relayed.end_reason) {
        (Some(why), _) => why,
        (None, Some(r)) => r.to_owned(),
        (None, None) if relayed.exit_code.is_some() => "the shell exited".to_owned(),
        (None, None) => "the browser went away".to_owned(),
    };
    let ended = json!({"ended": {"reason": reason, "exit": relayed.exit_code}});
    launched.finish(state, &relayed);
    close_with(&out.0, ended, CloseCode::Normal, "session ended").await;
}

/// The browser's side of the WebSocket, as the relay reads it.
struct Input(SplitStream<Socket>);

impl UserInput for Input {
    async fn next(&mut self) -> FromUser {
        match self.0.next().await {
            Some(Ok(Message::Binary(data))) => FromUser::Data(data.to_vec()),
            Some(Ok(Message::Text(text))) => {
                match serde_json::from_str::<serde_json::Value>(text.as_str()).ok().and_then(|v| {
                    let r = v.get("resize")?;
                    Some((r.get("cols")?.as_u64()?, r.get("rows")?.as_u64()?))
                }) {
                    Some((cols, rows)) => FromUser::Resize {
                        cols: u16::try_from(cols).unwrap_or(MAX_SIZE).clamp(1, MAX_SIZE),
                        rows: u16::try_from(rows).unwrap_or(MAX_SIZE).clamp(1, MAX_SIZE),
                    },
                    None => FromUser::Other,
                }
            }
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => FromUser::Gone,
            Some(Ok(_)) => FromUser::Other,
        }
    }
}

/// The browser's side of the WebSocket, as the relay writes it.
struct Output(tokio::sync::Mutex<SplitSink<Socket, Message>>);

impl UserOutput for Output {
    async fn output(&self, data: Vec<u8>, _stderr: bool) -> Result<(), ()> {
        // A terminal has one stream: stderr is shown where stdout is.
        self.0.lock().await.send(Message::binary(data)).await.map_err(|_| ())
    }
    async fn exit_status(&self, _code: u32) {
        // Said in the `ended` event once the session is over.
    }
}
