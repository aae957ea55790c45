//! RDP routing tokens for users: issued when policy lets the user use RDP on the instance
//! now (checked again when the token is used at the RDP door), redeemed once by that door.

use std::sync::Arc;
use std::time::Duration;

use postern_core::command::RdpToken;
use postern_core::util::{now_unix, random_hex};
use postern_core::{Action, Identity};

use crate::access::Authorizer;
use crate::audit::AuditLog;
use crate::audit::events::{Event, RdpTokenDenied, RdpTokenIssued, SessionDenied};
use crate::rdp_wire::token::{Claims, TokenError, TokenIssuer};

#[derive(Debug)]
pub struct RdpTokens {
    issuer: TokenIssuer,
    authorizer: Arc<Authorizer>,
    audit: Arc<AuditLog>,
    ttl: Duration,
    /// `host:port` of the RDP door; `None` when the door is turned off.
    door: Option<String>,
}

impl RdpTokens {
    /// Tokens valid for `ttl`, for the RDP door at `door` (`None`: the door is off, and no
    /// token is issued). Tokens are signed with `key` (a cluster's, so any of its gateways
    /// takes them); without one a key is made here and lives in memory only.
    pub fn new(
        authorizer: Arc<Authorizer>,
        audit: Arc<AuditLog>,
        ttl: Duration,
        door: Option<String>,
        key: Option<&[u8; 32]>,
    ) -> Result<Self, postern_core::util::RandomError> {
        let issuer = match key {
            Some(k) => TokenIssuer::with_key(k),
            None => TokenIssuer::new()?,
        };
        Ok(RdpTokens { issuer, authorizer, audit, ttl, door })
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

    /// Redeem a token at the door: valid, unexpired and not used before.
    pub fn redeem(&self, token: &str) -> Result<Claims, TokenError> {
        self.issuer.redeem(token, now_unix())
    }

    /// Forget redeemed tokens that have expired anyway.
    pub fn prune(&self) {
        self.issuer.prune(now_unix());
    }
}
