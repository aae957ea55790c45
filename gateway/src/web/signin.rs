//! Signing a browser in: with a one-time link from `postern web-login`, or through the
//! identity provider (`[identity.oidc]`, docs/sso.md) with an authorization-code flow back
//! to the console. Both are limited per address ([`crate::web_signin::MAX_ATTEMPTS`] a
//! minute) and audited as `web.signin`.

use std::net::SocketAddr;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode};

use super::common::{Answer, COOKIE, Web, cookie_named, html, query_param, redirect};
use super::pages;
use crate::audit::events::{Event, WebSignin};
use crate::services::Services;

/// The cookie that binds a return from the identity provider to the browser that left.
const BINDING: &str = "postern_oidc";

fn too_many() -> Answer {
    let mut r = html(
        StatusCode::TOO_MANY_REQUESTS,
        pages::message("Too many sign-in attempts", "Too many sign-in attempts from your address; wait a minute."),
    );
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
    r
}

/// Signed in: the session cookie, the audit event, and on to the console.
fn signed_in(state: &Services, web: &Web, user: &str, peer: SocketAddr, via: &str, mut r: Answer) -> Answer {
    let (id, _) = match web.signin.open_session(user) {
        Ok(s) => s,
        Err(e) => return html(StatusCode::SERVICE_UNAVAILABLE, pages::message("Try again shortly", &e.to_string())),
    };
    tracing::info!(user, %peer, via, "web console: signed in");
    let _ = state.audit.event(&Event::WebSignin(WebSignin {
        user: user.to_owned(),
        source: peer.to_string(),
        via: via.to_owned(),
    }));
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={}",
        web.signin.session_ttl().as_secs()
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

/// `GET /signin?token=...`: a one-time link.
pub(super) fn with_link(state: &Services, web: &Web, req: &Request<Incoming>, peer: SocketAddr) -> Answer {
    let refused = || {
        html(
            StatusCode::FORBIDDEN,
            pages::signed_out(
                Some(
                    "This sign-in link is not valid: it was used already, it expired, or it was never issued. \
                     Run postern web-login again for a new one.",
                ),
                state.sso.is_some(),
            ),
        )
    };
    if !web.signin.attempt(peer.ip()) {
        return too_many();
    }
    let Some(token) = query_param(req, "token") else { return refused() };
    let user = match web.signin.redeem_link(&token) {
        Ok(Some(user)) => user,
        Ok(None) => return refused(),
        Err(e) => return html(StatusCode::SERVICE_UNAVAILABLE, pages::message("Try again shortly", &e.to_string())),
    };
    if !state.access.user_active(&user) {
        return refused();
    }
    signed_in(state, web, &user, peer, "link", redirect("/"))
}

/// `GET /signin/oidc/start`: off to the identity provider, with a cookie that binds the
/// return to this browser.
pub(super) async fn to_idp(state: &Services, web: &Web, peer: SocketAddr) -> Answer {
    let Some(sso) = &state.sso else {
        return html(
            StatusCode::NOT_FOUND,
            pages::message("No identity provider", "This gateway signs browsers in with postern web-login only."),
        );
    };
    if !web.signin.attempt(peer.ip()) {
        return too_many();
    }
    let callback = format!("{}/signin/oidc", web.origin);
    let pending = match sso.web_begin(&callback, &peer.to_string()).await {
        Ok(p) => p,
        Err(e) => {
            return html(
                StatusCode::BAD_GATEWAY,
                pages::signed_out(Some(&format!("The identity provider: {e}")), true),
            );
        }
    };
    let to = pending.authorization_url.clone();
    let binding = match web.signin.await_idp(pending) {
        Ok(b) => b,
        Err(e) => return html(StatusCode::SERVICE_UNAVAILABLE, pages::message("Try again shortly", &e.to_string())),
    };
    let mut r = redirect(&to);
    let h = r.headers_mut();
    // Lax: the return is a top-level navigation from the identity provider's site.
    let cookie = format!(
        "{BINDING}={binding}; Path=/signin/oidc; HttpOnly; Secure; SameSite=Lax; Max-Age={}",
        crate::oidc::PENDING_TTL.as_secs()
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        h.insert(header::SET_COOKIE, v);
    }
    r
}

/// `GET /signin/oidc?code=...&state=...`: back from the identity provider.
pub(super) async fn from_idp(state: &Services, web: &Web, req: &Request<Incoming>, peer: SocketAddr) -> Answer {
    let Some(sso) = &state.sso else { return redirect("/") };
    let source = peer.to_string();
    let refused = |status: StatusCode, why: &str| html(status, pages::signed_out(Some(why), true));
    // Taken whatever happens next: a return is used once.
    let pending = cookie_named(req, BINDING).and_then(|b| web.signin.returned_from_idp(&b));
    let Some(pending) = pending else {
        sso.web_refused(
            "no_pending_login",
            "a return from the identity provider this browser did not begin (or too late)",
            &source,
        );
        return refused(
            StatusCode::FORBIDDEN,
            "This sign-in was not begun in this browser, or took too long. Sign in again.",
        );
    };
    if let Some(error) = query_param(req, "error") {
        let detail = crate::oidc::from_idp(&error);
        sso.web_refused("idp_error", &detail, &source);
        return refused(StatusCode::FORBIDDEN, &format!("The identity provider refused the sign-in: {detail}"));
    }
    let returned = query_param(req, "state").unwrap_or_default();
    if let Err(e) = pending.check_state(&returned) {
        sso.web_refused("bad_state", &e.to_string(), &source);
        return refused(StatusCode::FORBIDDEN, "This sign-in did not come back as it left (state). Sign in again.");
    }
    let Some(code) = query_param(req, "code") else {
        sso.web_refused("no_code", "the identity provider sent no code", &source);
        return refused(StatusCode::FORBIDDEN, "The identity provider sent no code. Sign in again.");
    };
    let user = match sso.web_finish(&pending, &code, &source).await {
        Ok(u) => u,
        Err(why) => return refused(StatusCode::FORBIDDEN, &format!("Sign-in refused: {why}")),
    };
    let mut r = html(StatusCode::OK, pages::signed_in_continue());
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("postern_oidc=; Path=/signin/oidc; HttpOnly; Secure; SameSite=Lax; Max-Age=0"),
    );
    signed_in(state, web, &user, peer, "oidc", r)
}
