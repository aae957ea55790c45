//! Browser sign-in for the web console: one-time links (`postern web-login`, issued to a user
//! the SSH door authenticated) and the browser sessions they open. Only hashes of links and
//! session ids are kept; both tables are bounded; a session counts only while its user is
//! still active (checked on every request by the console).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Unused links kept at once (expired ones are dropped first).
const MAX_LINKS: usize = 1024;
/// Browser sessions kept at once.
const MAX_SESSIONS: usize = 4096;
/// Sign-ins through the identity provider under way at once.
const MAX_PENDING: usize = 256;
/// How long a browser has at the identity provider.
const PENDING_TTL: Duration = crate::oidc::PENDING_TTL;
/// Sign-in attempts (links spent, identity-provider sign-ins begun) one address may make
/// per [`ATTEMPT_WINDOW`]; more are refused until the window passes.
pub const MAX_ATTEMPTS: u32 = 20;
pub const ATTEMPT_WINDOW: Duration = Duration::from_secs(60);
/// Addresses counted at once.
const MAX_COUNTED: usize = 4096;

/// A signed-in browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebSession {
    pub user: String,
    /// The token every form that changes something must carry (CSRF).
    pub csrf: String,
    expires: Instant,
}

#[derive(Debug)]
struct Link {
    user: String,
    expires: Instant,
}

pub struct WebSignIn {
    links: Mutex<HashMap<[u8; 32], Link>>,
    sessions: Mutex<HashMap<[u8; 32], WebSession>>,
    /// Sign-ins at the identity provider, by the hash of the browser's binding cookie.
    pending: Mutex<HashMap<[u8; 32], (crate::oidc::PendingLogin, Instant)>>,
    /// Sign-in attempts per address in the current window.
    attempts: Mutex<HashMap<std::net::IpAddr, (Instant, u32)>>,
    link_ttl: Duration,
    session_ttl: Duration,
}

impl std::fmt::Debug for WebSignIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebSignIn").finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebSignInError {
    #[error("too many sign-in links or browser sessions at once; try again shortly")]
    Full,
    #[error("no random numbers from the system")]
    Random,
}

fn random_token() -> Result<String, WebSignInError> {
    let mut b = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).map_err(|_| WebSignInError::Random)?;
    Ok(URL_SAFE_NO_PAD.encode(b))
}

fn hash(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl WebSignIn {
    pub fn new(link_ttl: Duration, session_ttl: Duration) -> Self {
        Self {
            links: Mutex::default(),
            sessions: Mutex::default(),
            pending: Mutex::default(),
            attempts: Mutex::default(),
            link_ttl,
            session_ttl,
        }
    }

    pub fn session_ttl(&self) -> Duration {
        self.session_ttl
    }

    /// A one-time sign-in link token for `user` (the SSH door authenticated them).
    pub fn issue_link(&self, user: &str) -> Result<String, WebSignInError> {
        let token = random_token()?;
        let now = Instant::now();
        let mut links = self.links.lock().map_err(|_| WebSignInError::Full)?;
        if links.len() >= MAX_LINKS {
            links.retain(|_, l| l.expires > now);
        }
        if links.len() >= MAX_LINKS {
            return Err(WebSignInError::Full);
        }
        links.insert(hash(&token), Link { user: user.to_owned(), expires: now + self.link_ttl });
        Ok(token)
    }

    /// Spend a link: the user it was issued to, if it was issued, unused and unexpired.
    pub fn redeem_link(&self, token: &str) -> Result<Option<String>, WebSignInError> {
        let now = Instant::now();
        let link = self.links.lock().map_err(|_| WebSignInError::Full)?.remove(&hash(token));
        Ok(link.filter(|l| l.expires > now).map(|l| l.user))
    }

    /// A new browser session for `user` (signed in by a link or the identity provider): its
    /// id (the cookie) and the session.
    pub fn open_session(&self, user: &str) -> Result<(String, WebSession), WebSignInError> {
        let now = Instant::now();
        let id = random_token()?;
        let session = WebSession { user: user.to_owned(), csrf: random_token()?, expires: now + self.session_ttl };
        let mut sessions = self.sessions.lock().map_err(|_| WebSignInError::Full)?;
        if sessions.len() >= MAX_SESSIONS {
            sessions.retain(|_, s| s.expires > now);
        }
        if sessions.len() >= MAX_SESSIONS {
            return Err(WebSignInError::Full);
        }
        sessions.insert(hash(&id), session.clone());
        Ok((id, session))
    }

    /// Keep a sign-in at the identity provider until the browser comes back: the value for
    /// the browser's binding cookie, which the return must carry (a return into another
    /// browser, or a forged one, finds nothing).
    pub fn await_idp(&self, pending: crate::oidc::PendingLogin) -> Result<String, WebSignInError> {
        let binding = random_token()?;
        let now = Instant::now();
        let mut p = self.pending.lock().map_err(|_| WebSignInError::Full)?;
        if p.len() >= MAX_PENDING {
            p.retain(|_, (_, at)| now.duration_since(*at) < PENDING_TTL);
        }
        if p.len() >= MAX_PENDING {
            return Err(WebSignInError::Full);
        }
        p.insert(hash(&binding), (pending, now));
        Ok(binding)
    }

    /// The sign-in this browser's binding cookie began, taken (it is used once).
    pub fn returned_from_idp(&self, binding: &str) -> Option<crate::oidc::PendingLogin> {
        let (pending, at) = self.pending.lock().ok()?.remove(&hash(binding))?;
        (at.elapsed() < PENDING_TTL).then_some(pending)
    }

    /// Count one sign-in attempt from `source`: false when it has made [`MAX_ATTEMPTS`] in
    /// the current window (or, with every place taken by addresses still counting, fail
    /// closed).
    pub fn attempt(&self, source: std::net::IpAddr) -> bool {
        let now = Instant::now();
        let Ok(mut a) = self.attempts.lock() else { return false };
        if a.len() >= MAX_COUNTED && !a.contains_key(&source) {
            a.retain(|_, (start, _)| now.duration_since(*start) < ATTEMPT_WINDOW);
            if a.len() >= MAX_COUNTED {
                return false;
            }
        }
        let entry = a.entry(source).or_insert((now, 0));
        if now.duration_since(entry.0) >= ATTEMPT_WINDOW {
            *entry = (now, 0);
        }
        entry.1 += 1;
        entry.1 <= MAX_ATTEMPTS
    }

    /// The session a cookie names, while it lasts.
    pub fn session(&self, id: &str) -> Option<WebSession> {
        let now = Instant::now();
        self.sessions.lock().ok()?.get(&hash(id)).filter(|s| s.expires > now).cloned()
    }

    /// Sign a browser out.
    pub fn end(&self, id: &str) {
        if let Ok(mut s) = self.sessions.lock() {
            s.remove(&hash(id));
        }
    }

    /// Forget the sessions of users who are no longer `active` (and expired ones).
    pub fn end_inactive(&self, active: impl Fn(&str) -> bool) -> usize {
        let now = Instant::now();
        let Ok(mut s) = self.sessions.lock() else { return 0 };
        let before = s.len();
        s.retain(|_, v| v.expires > now && active(&v.user));
        before - s.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_link_opens_one_session_once_and_sessions_end() {
        let w = WebSignIn::new(Duration::from_secs(60), Duration::from_secs(3600));
        let link = w.issue_link("alice").unwrap();
        assert_eq!(w.redeem_link(&link).unwrap().as_deref(), Some("alice"));
        let (id, s) = w.open_session("alice").unwrap();
        assert_eq!(s.user, "alice");
        assert!(w.redeem_link(&link).unwrap().is_none(), "a link works once");
        assert!(w.redeem_link("not-a-link").unwrap().is_none());
        assert_eq!(w.session(&id).unwrap().csrf, s.csrf);
        assert!(w.session(&link).is_none(), "the link is not a session id");
        assert_eq!(w.end_inactive(|u| u != "alice"), 1);
        assert!(w.session(&id).is_none());
        let expired = WebSignIn::new(Duration::ZERO, Duration::from_secs(3600));
        let link = expired.issue_link("bob").unwrap();
        assert!(expired.redeem_link(&link).unwrap().is_none(), "an expired link is refused");
    }

    #[test]
    fn sign_in_attempts_are_limited_per_address() {
        let w = WebSignIn::new(Duration::from_secs(60), Duration::from_secs(3600));
        let (a, b): (std::net::IpAddr, std::net::IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..MAX_ATTEMPTS {
            assert!(w.attempt(a));
        }
        assert!(!w.attempt(a), "one more than the limit was let through");
        assert!(w.attempt(b), "another address is not held back");
    }
}
