//! What the console's handlers share: the console's settings, answers, and who is signed in.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};

use crate::services::Services;
use crate::web_signin::{WebSession, WebSignIn};

/// The session cookie's name.
pub const COOKIE: &str = "postern_session";

/// What the console needs beyond the services.
pub struct Web {
    pub signin: Arc<WebSignIn>,
    /// `https://host:port`, as browsers reach the console.
    pub origin: String,
    pub tls: Arc<rustls::ServerConfig>,
    /// Places for open WebSockets (terminals and watches), which outlive the HTTP
    /// connection's place: [`MAX_SOCKETS`] at once.
    pub sockets: Arc<tokio::sync::Semaphore>,
}

/// WebSockets (terminals and watches) open at once; more are refused (503).
pub const MAX_SOCKETS: usize = 256;

impl Web {
    pub fn new(signin: Arc<WebSignIn>, origin: String, tls: Arc<rustls::ServerConfig>) -> Self {
        Web { signin, origin, tls, sockets: Arc::new(tokio::sync::Semaphore::new(MAX_SOCKETS)) }
    }
}

pub type Answer = Response<Full<Bytes>>;

/// The Content-Security-Policy of every page: this origin's own scripts, stylesheets and
/// WebSockets, nothing inline.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; font-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
/// The terminal and replay pages': the same, but xterm.js and asciinema-player size and
/// colour their rows with inline styles (scripts stay this origin's own only).
pub const CSP_INLINE_STYLES: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self'; \
                   font-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
/// The replay page's: as the terminal's, and asciinema-player's terminal emulator is
/// WebAssembly, compiled in the page ('wasm-unsafe-eval' allows that, not JavaScript eval).
pub const CSP_PLAYER: &str = "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self'; font-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub fn answer(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Answer {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

pub fn html(status: StatusCode, body: String) -> Answer {
    answer(status, "text/html; charset=utf-8", body)
}

/// `r` with its own Content-Security-Policy instead of [`CSP`].
pub fn with_csp(mut r: Answer, csp: &'static str) -> Answer {
    r.headers_mut().insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(csp));
    r
}

/// See `to` (a path of the console, or the identity provider's sign-in page).
pub fn redirect(to: &str) -> Answer {
    let mut r = answer(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "");
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// The session cookie's value, if the request carries one.
pub fn cookie(req: &Request<Incoming>) -> Option<String> {
    cookie_named(req, COOKIE)
}

/// The value of the cookie `name`, if the request carries one.
pub fn cookie_named(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|line| {
            line.split(';').map(str::trim).find_map(|kv| kv.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
        })
        .map(str::to_owned)
}

/// The signed-in session of this request: its cookie names one, and its user is active.
pub fn signed_in(state: &Services, web: &Web, req: &Request<Incoming>) -> Option<(String, WebSession)> {
    let id = cookie(req)?;
    let s = web.signin.session(&id)?;
    if !state.access.user_active(&s.user) {
        web.signin.end(&id);
        return None;
    }
    Some((id, s))
}

/// Whether `user` is one of the console's administrators: sees everyone's sessions and may
/// watch live ones: a member of one of `[web] admin_groups`.
pub fn is_admin(state: &Services, user: &str) -> bool {
    let admins = &state.config.web.admin_groups;
    !admins.is_empty() && state.access.user_groups(user).iter().any(|g| admins.contains(g))
}

/// The query parameter `name`, decoded and trimmed, when the request has one that is not
/// empty.
pub fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.uri()
        .query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| postern_core::util::url_decode(v).trim().to_owned())
        .filter(|v| !v.is_empty())
}
