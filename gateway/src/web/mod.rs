//! The web console's front door (`[web]`, docs/web.md): HTTPS on its own port. A browser
//! signs in with a one-time link from `postern web-login` (the SSH door authenticated the
//! user who asked for it) or through the identity provider ([`signin`]), sees the
//! instances it may reach, as `postern ls` does, opens a recorded terminal on one
//! ([`terminal`]), searches and replays past sessions ([`history`]) and, for members of
//! `[web] admin_groups`, watches live ones ([`watch`]).
//!
//! Every answer carries a strict Content-Security-Policy (nothing but this origin's own
//! scripts and stylesheets, WebSockets to itself only), `no-store` (but for the embedded
//! front-end packages) and `nosniff`; the session cookie is HttpOnly, Secure,
//! SameSite=Strict; a request that changes something must come from the console's own
//! origin (Origin header) and carry the session's CSRF token. A session counts only while
//! its user is active: disabling or removing the user signs their browsers out at once.

mod assets;
mod common;
mod history;
mod pages;
mod signin;
mod socket;
mod terminal;
mod watch;

pub use common::Web;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode};
use postern_core::Identity;
use postern_tunnel::CancellationToken;
use tracing::{Instrument, debug, info_span};

use crate::services::Services;
use crate::web_signin::WebSession;
use common::{Answer, CSP, CSP_INLINE_STYLES, answer, html, query_param, redirect, signed_in, with_csp};

/// Connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 256;
/// Time for the TLS handshake and for each request's headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request body read (forms are a few fields).
const MAX_BODY: usize = 4096;

pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<Services>,
    web: Arc<Web>,
    shutdown: CancellationToken,
) {
    let places = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let acceptor = tokio_rustls::TlsAcceptor::from(web.tls.clone());
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let Ok(place) = places.clone().acquire_owned().await else { break };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    postern_tunnel::warn_limited!(error = %e, "web console: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Keystrokes and their echoes are small writes: sent at once, as the SSH door does.
        let _ = stream.set_nodelay(true);
        let (acceptor, state, web, shutdown) = (acceptor.clone(), state.clone(), web.clone(), shutdown.clone());
        tasks.spawn(
            async move {
                let _place = place;
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => s,
                    _ => return debug!("TLS handshake failed or timed out"),
                };
                let service = hyper::service::service_fn(move |req| {
                    let (state, web) = (state.clone(), web.clone());
                    async move { Ok::<_, std::convert::Infallible>(secured(handle(&state, &web, req, peer).await)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HANDSHAKE_TIMEOUT)
                    .max_buf_size(64 << 10)
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .with_upgrades();
                let mut conn = std::pin::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => if let Err(e) = r { debug!(error = %e, "web connection ended") },
                    _ = shutdown.cancelled() => {}
                }
            }
            .instrument(info_span!("web", %peer)),
        );
    }
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(3), tasks.wait()).await;
}

/// The headers every answer carries.
fn secured(mut r: Answer) -> Answer {
    let h = r.headers_mut();
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    }
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // Same-origin: the console's own forms carry their Origin (with no-referrer Chromium
    // sends `Origin: null`), and no address of the console leaves it in a Referer.
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::STRICT_TRANSPORT_SECURITY, HeaderValue::from_static("max-age=31536000"));
    r
}

async fn handle(state: &Arc<Services>, web: &Web, req: Request<Incoming>, peer: SocketAddr) -> Answer {
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/app.css") => answer(StatusCode::OK, "text/css; charset=utf-8", pages::STYLE),
        (Method::GET, "/favicon.svg" | "/favicon.ico") => answer(StatusCode::OK, "image/svg+xml", pages::ICON),
        (Method::GET, "/terminal.js") => answer(StatusCode::OK, "text/javascript; charset=utf-8", pages::TERMINAL_JS),
        (Method::GET, "/watch") => match signed_in(state, web, &req) {
            Some((_, s)) => watch_page(state, &s, &req),
            None => redirect("/"),
        },
        (Method::GET, "/ws/watch") => watch::upgrade(state, web, req, peer),
        (Method::GET, "/replay.js") => answer(StatusCode::OK, "text/javascript; charset=utf-8", pages::REPLAY_JS),
        (Method::GET, "/sessions") => match signed_in(state, web, &req) {
            Some((_, s)) => history::list(state, &s, &req).await,
            None => redirect("/"),
        },
        (Method::GET, p) if p.starts_with("/sessions/") => {
            let Some((_, s)) = signed_in(state, web, &req) else { return redirect("/") };
            let rest = &p["/sessions/".len()..];
            match rest.strip_suffix("/cast") {
                Some(id) => history::cast(state, &s, id).await,
                None => history::replay_page(state, &s, rest).await,
            }
        }
        (Method::GET, p) if p.starts_with("/assets/") => match assets::get(&p["/assets/".len()..]) {
            Some((body, content_type)) => {
                let mut r = answer(StatusCode::OK, content_type, body);
                r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=86400"));
                r
            }
            None => html(StatusCode::NOT_FOUND, pages::message("Not found", "There is no such file.")),
        },
        (Method::GET, "/terminal") => match signed_in(state, web, &req) {
            Some((_, s)) => terminal_page(&s, &req),
            None => redirect("/"),
        },
        (Method::GET, "/ws/terminal") => terminal::upgrade(state, web, req, peer),
        (Method::GET, "/signin") => signin::with_link(state, web, &req, peer),
        (Method::GET, "/signin/oidc/start") => signin::to_idp(state, web, peer).await,
        (Method::GET, "/signin/oidc") => signin::from_idp(state, web, &req, peer).await,
        (Method::GET, "/") => match signed_in(state, web, &req) {
            Some((_, s)) => instances_page(state, &s, query_param(&req, "labels"), peer).await,
            None => html(StatusCode::OK, pages::signed_out(None, state.sso.is_some())),
        },
        (Method::GET, "/api/instances") => match signed_in(state, web, &req) {
            Some((_, s)) => {
                let who = Identity::new(s.user.clone(), Some(peer.ip()));
                match state.visible_instances(&who, query_param(&req, "labels").as_deref()).await {
                    Ok(rows) => {
                        answer(StatusCode::OK, "application/json", serde_json::to_vec(&rows).unwrap_or_default())
                    }
                    Err(e) => answer(StatusCode::BAD_REQUEST, "text/plain; charset=utf-8", e),
                }
            }
            None => answer(StatusCode::UNAUTHORIZED, "text/plain; charset=utf-8", "not signed in"),
        },
        (Method::POST, "/signout") => sign_out(state, web, req).await,
        _ => html(StatusCode::NOT_FOUND, pages::message("Not found", "There is no such page.")),
    }
}

async fn sign_out(state: &Services, web: &Web, req: Request<Incoming>) -> Answer {
    let forbidden = |why: &str| html(StatusCode::FORBIDDEN, pages::message("Refused", why));
    // From the console's own pages only.
    let origin = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok()).map(str::to_owned);
    if origin.as_deref() != Some(web.origin.as_str()) {
        return forbidden("This request did not come from the console's own page (Origin).");
    }
    let Some((id, session)) = signed_in(state, web, &req) else { return redirect("/") };
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return forbidden("The form is too large."),
    };
    let form = String::from_utf8_lossy(&body);
    let csrf = form
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "csrf")
        .map(|(_, v)| pages::url_decode(v));
    if csrf.as_deref() != Some(session.csrf.as_str()) {
        return forbidden("This form is stale or forged (CSRF token); reload the page.");
    }
    web.signin.end(&id);
    let mut r = redirect("/");
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("postern_session=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0"),
    );
    r
}

/// A page that runs xterm.js, or why this build cannot.
fn with_terminal(page: impl FnOnce() -> String) -> Answer {
    if assets::MISSING.is_some() {
        return html(
            StatusCode::NOT_IMPLEMENTED,
            pages::message(
                "No terminal in this build",
                "This gateway was built without the web terminal's scripts (npm was not available when it was \
                 built); use ssh, or rebuild it with Node.js and npm installed.",
            ),
        );
    }
    with_csp(html(StatusCode::OK, page()), CSP_INLINE_STYLES)
}

/// `GET /terminal?instance=NAME[&login=L][&profile=P]`.
fn terminal_page(s: &WebSession, req: &Request<Incoming>) -> Answer {
    let Some(instance) = query_param(req, "instance") else { return redirect("/") };
    with_terminal(|| {
        let (login, profile) = (query_param(req, "login"), query_param(req, "profile"));
        pages::terminal(s, &instance, login.as_deref(), profile.as_deref())
    })
}

/// `GET /watch?session=ID`: for those who may watch it.
fn watch_page(state: &Services, s: &WebSession, req: &Request<Incoming>) -> Answer {
    let id = query_param(req, "session").unwrap_or_default();
    match watch::watchable(state, &s.user, &id) {
        Some(live) => with_terminal(|| pages::watch(s, &live.id, &live.party.user, &live.party.target)),
        None => html(
            StatusCode::NOT_FOUND,
            pages::message(
                "No such session",
                "There is no live shell or exec session with this id that you may watch.",
            ),
        ),
    }
}

async fn instances_page(state: &Services, s: &WebSession, labels: Option<String>, peer: SocketAddr) -> Answer {
    let who = Identity::new(s.user.clone(), Some(peer.ip()));
    match state.visible_instances(&who, labels.as_deref()).await {
        Ok(rows) => html(StatusCode::OK, pages::instances(s, &rows, labels.as_deref(), None)),
        Err(e) => html(StatusCode::BAD_REQUEST, pages::instances(s, &[], labels.as_deref(), Some(&e))),
    }
}
