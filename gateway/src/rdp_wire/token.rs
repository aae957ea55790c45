//! Routing tokens for the RDP front door.
//!
//! `postern rdp web-01` asks the gateway (over SSH, so the user is authenticated by their SSH
//! key) for a token; the RDP client sends it in the preconnection blob. A token is
//! `pr1.<claims>.<mac>`: base64url JSON claims (token id, user, instance, agent id, issue and
//! expiry time) and an HMAC-SHA256 over `pr1.<claims>` with a key that lives only in this
//! gateway process's memory. So a token is worthless after a gateway restart (they last
//! minutes anyway), and the set of redeemed token ids, also in memory, is enough to make each
//! token single-use.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "pr1.";
/// Longest token accepted; real ones are about 250 characters.
pub const MAX_TOKEN_LEN: usize = 1024;
/// Redeemed tokens remembered until they expire; beyond this many, redemption is refused
/// (fail closed) rather than forgetting one early.
const MAX_REMEMBERED: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Random token id (what makes a token single-use).
    pub id: String,
    /// The Postern user the token was issued to.
    #[serde(rename = "u")]
    pub user: String,
    /// The instance name it routes to ...
    #[serde(rename = "i")]
    pub instance: String,
    /// ... and the agent that instance resolved to when it was issued.
    #[serde(rename = "a")]
    pub agent_id: String,
    pub iat: i64,
    pub exp: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the routing token is malformed")]
    Malformed,
    #[error("the routing token's signature is not valid (issued by another gateway, or before a restart?)")]
    BadSignature,
    #[error("the routing token has expired")]
    Expired,
    #[error("the routing token was already used")]
    Used,
    #[error("too many routing tokens in use; try again shortly")]
    Busy,
}

impl TokenError {
    /// Short stable name for audit events.
    pub fn code(self) -> &'static str {
        match self {
            TokenError::Malformed => "token-malformed",
            TokenError::BadSignature => "token-invalid",
            TokenError::Expired => "token-expired",
            TokenError::Used => "token-used",
            TokenError::Busy => "token-busy",
        }
    }
}

/// The shortest signing key [`TokenIssuer::with_key`] takes (HMAC-SHA256's output size).
pub const MIN_KEY_LEN: usize = 32;

/// A signing key shorter than [`MIN_KEY_LEN`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the rdp token signing key must be at least {MIN_KEY_LEN} bytes")]
pub struct KeyTooShort;

pub struct TokenIssuer {
    key: ring::hmac::Key,
    /// Redeemed token id -> its expiry.
    redeemed: Mutex<HashMap<String, i64>>,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer").finish_non_exhaustive()
    }
}

impl TokenIssuer {
    /// A fresh key from the system random number generator.
    pub fn new() -> Result<Self, postern_core::util::RandomError> {
        let rng = ring::rand::SystemRandom::new();
        let key =
            ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng).map_err(|_| postern_core::util::RandomError)?;
        Ok(Self { key, redeemed: Mutex::new(HashMap::new()) })
    }

    /// A key given from outside (the cluster's, so that any gateway of it can check the
    /// tokens another issued): at least [`MIN_KEY_LEN`] bytes.
    pub fn with_key(key: &[u8]) -> Result<Self, KeyTooShort> {
        if key.len() < MIN_KEY_LEN {
            return Err(KeyTooShort);
        }
        Ok(Self { key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), redeemed: Mutex::new(HashMap::new()) })
    }

    /// A token for these claims.
    pub fn issue(&self, claims: &Claims) -> String {
        let body = serde_json::to_vec(claims).unwrap_or_default();
        let signed = format!("{PREFIX}{}", B64.encode(body));
        let tag = ring::hmac::sign(&self.key, signed.as_bytes());
        format!("{signed}.{}", B64.encode(tag.as_ref()))
    }

    /// Check signature and expiry (at unix time `now`) without spending the token.
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN || !token.starts_with(PREFIX) {
            return Err(TokenError::Malformed);
        }
        let (signed, tag) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        if signed.len() <= PREFIX.len() || signed.get(PREFIX.len()..).is_some_and(|c| c.contains('.')) {
            return Err(TokenError::Malformed);
        }
        let tag = B64.decode(tag).map_err(|_| TokenError::Malformed)?;
        if tag.len() != 32 {
            return Err(TokenError::Malformed);
        }
        ring::hmac::verify(&self.key, signed.as_bytes(), &tag).map_err(|_| TokenError::BadSignature)?;
        let body = B64.decode(signed.get(PREFIX.len()..).unwrap_or_default()).map_err(|_| TokenError::Malformed)?;
        let claims: Claims = serde_json::from_slice(&body).map_err(|_| TokenError::Malformed)?;
        if now >= claims.exp {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    /// Verify and spend: the second redemption of a token fails with [`TokenError::Used`].
    pub fn redeem(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        let claims = self.verify(token, now)?;
        let mut seen = self.redeemed.lock().map_err(|_| TokenError::Busy)?;
        if seen.contains_key(&claims.id) {
            return Err(TokenError::Used);
        }
        if seen.len() >= MAX_REMEMBERED {
            seen.retain(|_, exp| *exp > now);
            if seen.len() >= MAX_REMEMBERED {
                return Err(TokenError::Busy);
            }
        }
        seen.insert(claims.id.clone(), claims.exp);
        Ok(claims)
    }

    /// Forget redeemed tokens that have expired (they fail on expiry now).
    pub fn prune(&self, now: i64) {
        if let Ok(mut seen) = self.redeemed.lock() {
            seen.retain(|_, exp| *exp > now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> Claims {
        Claims {
            id: "0123456789abcdef".into(),
            user: "alice".into(),
            instance: "win-01".into(),
            agent_id: "ag_1".into(),
            iat: 100,
            exp,
        }
    }

    #[test]
    fn issue_verify_redeem_once() {
        let t = TokenIssuer::new().unwrap();
        let tok = t.issue(&claims(200));
        assert!(tok.starts_with("pr1.") && tok.len() < 300, "{tok}");
        assert_eq!(t.verify(&tok, 150).unwrap(), claims(200));
        assert_eq!(t.redeem(&tok, 150).unwrap().user, "alice");
        assert_eq!(t.redeem(&tok, 151), Err(TokenError::Used));
        t.prune(300);
        assert_eq!(t.redeem(&tok, 300), Err(TokenError::Expired));
    }

    #[test]
    fn expired_forged_and_foreign_tokens_fail() {
        let t = TokenIssuer::new().unwrap();
        let tok = t.issue(&claims(200));
        assert_eq!(t.verify(&tok, 200), Err(TokenError::Expired));
        // Another gateway (or this one before a restart) signed with another key.
        let other = TokenIssuer::new().unwrap();
        assert_eq!(other.verify(&tok, 150), Err(TokenError::BadSignature));
        // Claims changed after signing: the MAC no longer matches.
        let (_, mac) = tok.rsplit_once('.').unwrap();
        let mut forged = claims(200);
        forged.user = "mallory".into();
        let forged = format!("pr1.{}.{mac}", B64.encode(serde_json::to_vec(&forged).unwrap()));
        assert_eq!(t.verify(&forged, 150), Err(TokenError::BadSignature));
        for junk in ["", "pr1.", "pr1..", "xyz.abc.def", "pr1.!!!.@@@", &"pr1.a".repeat(300)] {
            assert_eq!(t.verify(junk, 150), Err(TokenError::Malformed), "{junk:?}");
        }
    }
}
