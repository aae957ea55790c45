//! RDP routing tokens for users: issued when policy lets the user use RDP on the instance
//! now (checked again when the token is used at the RDP door), redeemed once by that door.
//! With `[cluster]`, spent tokens are kept in the store, so that a token is redeemed once
//! across every gateway.

use std::sync::Arc;
use std::time::Duration;

use postern_core::command::RdpToken;
use postern_core::util::{now_unix, random_hex};
use postern_core::{Action, Identity};

use crate::access::Authorizer;
use crate::audit::AuditLog;
use crate::audit::events::{Event, RdpTokenDenied, RdpTokenIssued, SessionDenied};
use crate::rdp_wire::token::{Claims, KeyTooShort, TokenError, TokenIssuer};
use crate::store::Store;

pub struct RdpTokens {
    issuer: TokenIssuer,
    authorizer: Arc<Authorizer>,
    audit: Arc<AuditLog>,
    ttl: Duration,
    /// `host:port` of the RDP door; `None` when the door is turned off.
    door: Option<String>,
    /// With `[cluster]`: where spent tokens are kept (else in the issuer's memory).
    spent: Option<Arc<dyn Store>>,
}

impl std::fmt::Debug for RdpTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdpTokens")
            .field("ttl", &self.ttl)
            .field("door", &self.door)
            .field("spent_in_store", &self.spent.is_some())
            .finish_non_exhaustive()
    }
}

impl RdpTokens {
    /// Tokens valid for `ttl`, for the RDP door at `door` (`None`: the door is off, and no
    /// token is issued). The signing key is made here and lives in memory only.
    pub fn new(
        authorizer: Arc<Authorizer>,
        audit: Arc<AuditLog>,
        ttl: Duration,
        door: Option<String>,
    ) -> Result<Self, postern_core::util::RandomError> {
        Ok(RdpTokens { issuer: TokenIssuer::new()?, authorizer, audit, ttl, door, spent: None })
    }

    /// Sign and check tokens with `key` (the cluster's, the same at every gateway) instead of
    /// the key made by [`new`](Self::new).
    pub fn with_signing_key(mut self, key: &[u8]) -> Result<Self, KeyTooShort> {
        self.issuer = TokenIssuer::with_key(key)?;
        Ok(self)
    }

    /// Keep spent tokens in `store`, shared by the gateways of a cluster, instead of in memory.
    pub fn spent_in(mut self, store: Arc<dyn Store>) -> Self {
        self.spent = Some(store);
        self
    }

    /// Issue a routing token to an authenticated user, if policy lets them use RDP on the
    /// instance now.
    pub async fn issue(&self, identity: &Identity, instance: &str) -> Result<RdpToken, std::borrow::Cow<'static, str>> {
        let Some(door) = &self.door else {
            return Err("the RDP front door is turned off on this gateway ([rdp] enabled = false)".into());
        };
        let authz = match self.authorizer.authorize(identity, instance, Action::Rdp, None, None, None).await {
            Ok(a) => a,
            Err(msg) => {
                let _ = self.audit.event(&Event::SessionDenied(SessionDenied::RdpToken(RdpTokenDenied {
                    user: identity.user.clone(),
                    target: instance.to_owned(),
                    action: Action::Rdp,
                    stage: "token".to_owned(),
                    source: identity.source.map(|s| s.to_string()),
                    reason: msg.to_string(),
                })));
                return Err(msg);
            }
        };
        let now = now_unix();
        let exp = now.saturating_add(i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX));
        let id = random_hex(16).map_err(|_| "gateway random number generator failed")?;
        let claims = Claims {
            id: id.clone(),
            user: authz.user().to_owned(),
            instance: authz.instance().to_owned(),
            agent_id: authz.agent_id().to_owned(),
            iat: now,
            exp,
        };
        let token = self.issuer.issue(&claims);
        let _ = self.audit.event(&Event::RdpTokenIssued(RdpTokenIssued {
            user: claims.user.clone(),
            target: claims.instance.clone(),
            agent_id: claims.agent_id.clone(),
            token_id: id,
            expires_at: exp,
            source: identity.source.map(|s| s.to_string()),
        }));
        Ok(RdpToken {
            token,
            instance: claims.instance,
            expires_at: exp,
            expires_in: self.ttl.as_secs(),
            rdp_address: door.clone(),
        })
    }

    /// Redeem a token at the door: valid, unexpired and not used before (at any gateway of
    /// the cluster, with `[cluster]`).
    pub async fn redeem(&self, token: &str) -> Result<Claims, TokenError> {
        redeem(&self.issuer, self.spent.as_deref(), token, now_unix()).await
    }

    /// Forget redeemed tokens that have expired anyway.
    pub fn prune(&self) {
        self.issuer.prune(now_unix());
    }
}

/// Verify `token` and spend it: in `spent` (the cluster's store) when given, where one
/// conditional insert decides which of several gateways redeeming it at once wins; else in
/// the issuer's memory. A store that cannot be reached refuses the token (fail closed).
async fn redeem(issuer: &TokenIssuer, spent: Option<&dyn Store>, token: &str, now: i64) -> Result<Claims, TokenError> {
    let Some(store) = spent else { return issuer.redeem(token, now) };
    let claims = issuer.verify(token, now)?;
    match store.spend_rdp_token(&claims.id, claims.exp).await {
        Ok(true) => Ok(claims),
        Ok(false) => Err(TokenError::Used),
        Err(e) => {
            postern_tunnel::warn_limited!(error = %e, "cannot record a spent rdp token in the store; refusing it");
            Err(TokenError::Busy)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(id: &str) -> Claims {
        Claims {
            id: id.into(),
            user: "alice".into(),
            instance: "win-01".into(),
            agent_id: "ag_1".into(),
            iat: 100,
            exp: 200,
        }
    }

    /// Two gateways with the cluster's key and one store: a token redeemed at one is
    /// refused at the other, and each gateway's own memory plays no part.
    #[tokio::test]
    async fn a_token_spent_at_one_gateway_is_refused_at_another() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("postern.db");
        let store_a = crate::store::sqlite::SqliteStore::open(&path).await.unwrap();
        let store_b = crate::store::sqlite::SqliteStore::open(&path).await.unwrap();
        let key = [7u8; 32];
        let (a, b) = (TokenIssuer::with_key(&key).unwrap(), TokenIssuer::with_key(&key).unwrap());
        let token = a.issue(&claims("0123456789abcdef"));
        assert_eq!(redeem(&a, Some(&store_a), &token, 150).await.unwrap().user, "alice");
        assert_eq!(redeem(&b, Some(&store_b), &token, 151).await, Err(TokenError::Used));
        assert_eq!(redeem(&a, Some(&store_a), &token, 151).await, Err(TokenError::Used));
        // Without the store (a single gateway), each issuer's memory: b has not seen it.
        assert_eq!(redeem(&b, None, &token, 151).await.unwrap().id, "0123456789abcdef");
        // Forged or expired tokens never reach the store.
        let other = TokenIssuer::with_key(&[8u8; 32]).unwrap().issue(&claims("fedcba9876543210"));
        assert_eq!(redeem(&a, Some(&store_a), &other, 150).await, Err(TokenError::BadSignature));
        assert_eq!(redeem(&a, Some(&store_a), &a.issue(&claims("1111")), 200).await, Err(TokenError::Expired));
        assert!(store_b.spend_rdp_token("fedcba9876543210", 200).await.unwrap());
    }
}
