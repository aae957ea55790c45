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

#[derive(Debug)]
pub struct WebSignIn {
    links: Mutex<HashMap<[u8; 32], Link>>,
    sessions: Mutex<HashMap<[u8; 32], WebSession>>,
    link_ttl: Duration,
    session_ttl: Duration,
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
        Self { links: Mutex::default(), sessions: Mutex::default(), link_ttl, session_ttl }
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

    /// Spend a link: the new session's id (the cookie) and the session, if the link was
    /// issued, unused and unexpired.
    pub fn redeem(&self, token: &str) -> Result<Option<(String, WebSession)>, WebSignInError> {
        let now = Instant::now();
        let link = self.links.lock().map_err(|_| WebSignInError::Full)?.remove(&hash(token));
        let Some(link) = link.filter(|l| l.expires > now) else { return Ok(None) };
        let id = random_token()?;
        let session = WebSession { user: link.user, csrf: random_token()?, expires: now + self.session_ttl };
        let mut sessions = self.sessions.lock().map_err(|_| WebSignInError::Full)?;
        if sessions.len() >= MAX_SESSIONS {
            sessions.retain(|_, s| s.expires > now);
        }
        if sessions.len() >= MAX_SESSIONS {
            return Err(WebSignInError::Full);
        }
        sessions.insert(hash(&id), session.clone());
        Ok(Some((id, session)))
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
        let (id, s) = w.redeem(&link).unwrap().unwrap();
        assert_eq!(s.user, "alice");
        assert!(w.redeem(&link).unwrap().is_none(), "a link works once");
        assert!(w.redeem("not-a-link").unwrap().is_none());
        assert_eq!(w.session(&id).unwrap().csrf, s.csrf);
        assert!(w.session(&link).is_none(), "the link is not a session id");
        assert_eq!(w.end_inactive(|u| u != "alice"), 1);
        assert!(w.session(&id).is_none());
        let expired = WebSignIn::new(Duration::ZERO, Duration::from_secs(3600));
        let link = expired.issue_link("bob").unwrap();
        assert!(expired.redeem(&link).unwrap().is_none(), "an expired link is refused");
    }
}
