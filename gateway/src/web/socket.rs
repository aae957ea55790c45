//! The console's WebSockets (terminals, live watch): the handshake's checks and answer,
//! and closing with a last event.

use std::future::Future;

use futures_util::SinkExt;
use futures_util::stream::SplitSink;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::upgrade::Upgraded;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, handshake::derive_accept_key};
use tracing::debug;

use super::common::{Answer, Web, answer, signed_in};
use crate::services::Services;
use crate::web_signin::WebSession;

/// Largest message a browser may send (keystrokes and pastes come in far smaller ones).
const MAX_MESSAGE: usize = 64 << 10;

pub(super) type Socket = WebSocketStream<TokioIo<Upgraded>>;

fn plain(status: StatusCode, text: &'static str) -> Answer {
    answer(status, "text/plain; charset=utf-8", text)
}

/// Answer a WebSocket handshake, or refuse it: it must come from the console's own page
/// (its Origin: a page elsewhere cannot use the browser's cookie, no cross-site WebSocket
/// hijacking) and a signed-in browser, before anything is upgraded. Once upgraded, `then`
/// runs with the socket and the session in a task of its own.
pub(super) fn upgrade<F, Fut>(state: &Services, web: &Web, mut req: Request<Incoming>, then: F) -> Answer
where
    F: FnOnce(Socket, WebSession) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let origin = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok());
    if origin != Some(web.origin.as_str()) {
        return plain(StatusCode::FORBIDDEN, "refused: this request did not come from the console's own page (Origin)");
    }
    let Some((_, session)) = signed_in(state, web, &req) else {
        return plain(StatusCode::UNAUTHORIZED, "refused: not signed in");
    };
    let h = req.headers();
    let upgrade_asked =
        h.get(header::UPGRADE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let version_13 = h.get(header::SEC_WEBSOCKET_VERSION).is_some_and(|v| v == "13");
    let Some(key) = h.get(header::SEC_WEBSOCKET_KEY).map(|k| derive_accept_key(k.as_bytes())) else {
        return plain(StatusCode::BAD_REQUEST, "a WebSocket request was expected");
    };
    if !upgrade_asked || !version_13 {
        return plain(StatusCode::BAD_REQUEST, "a WebSocket (version 13) request was expected");
    }
    let Ok(place) = web.sockets.clone().try_acquire_owned() else {
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many terminals are open on this gateway; try again shortly",
        );
    };
    let upgrading = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let _place = place;
        let io = match upgrading.await {
            Ok(io) => TokioIo::new(io),
            Err(e) => return debug!(error = %e, "WebSocket upgrade failed"),
        };
        let config = WebSocketConfig::default().max_message_size(Some(MAX_MESSAGE)).max_frame_size(Some(MAX_MESSAGE));
        then(WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await, session).await;
    });
    let mut r = answer(StatusCode::SWITCHING_PROTOCOLS, "text/plain; charset=utf-8", "");
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&key) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    h.remove(header::CONTENT_TYPE);
    r
}

/// Send a JSON event and close the socket (a refusal, or the end).
pub(super) async fn close_with(
    sink: &tokio::sync::Mutex<SplitSink<Socket, Message>>,
    event: serde_json::Value,
    code: CloseCode,
    why: &str,
) {
    let mut sink = sink.lock().await;
    let _ = sink.send(Message::text(event.to_string())).await;
    let reason: String = why.chars().take(100).collect();
    let _ = sink.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
}
