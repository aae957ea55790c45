//! Instances: enrollment tokens, the tunnel's view of the store (who may enroll and connect,
//! with an audit event for every decision), listing and revoking enrolled agents.

use std::net::SocketAddr;
use std::sync::Arc;

use postern_core::util::{RandomError, clean_text, name_from_hostname, now_unix, random_hex, sha256_hex, valid_name};
use postern_proto::{EnrollRequest, ErrorCode, Hello};
use postern_tunnel::pki::CertAuthority;
use postern_tunnel::server::{AgentDirectory, AgentRegistry, EnrolledAgent, Refusal};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::accept::{FailureBackoff, RefusalDigest};
use crate::audit::AuditLog;
use crate::audit::events::{
    AgentConnected, AgentDisconnected, AgentEnrollRefused, AgentEnrolled, AgentProtocolViolation, AgentRefused,
    AgentRenewed, AgentRevoked, Event, TokenCreated, TokenRevoked,
};
use crate::locations::AgentLocations;
use crate::metrics::{StoreOp, timed_store};
use crate::store::{Labels, NewAgent, NewToken, RedeemError, Store, StoreError, resolve_instance};

/// Enrollment tokens are stored and audited only by their SHA-256.
pub fn token_hash(token: &str) -> String {
    sha256_hex(token.as_bytes())
}

/// How the audit log names a token: the first 12 characters of its hash.
fn token_id(hash: &str) -> String {
    hash.get(..12).unwrap_or(hash).to_owned()
}

/// Why a token was not created or an instance not revoked.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("invalid instance name {0:?}: use letters, digits, '-', '_' and '.', at most 63 characters")]
    InvalidName(String),
    /// No such instance, or a name several instances share (the message says which).
    #[error("{0}")]
    Unknown(String),
    #[error("a token may live at most {} days (--ttl)", MAX_TOKEN_TTL.as_secs() / 86400)]
    TtlTooLong,
    #[error("no unused token {0:?}; see `postern token list` (ids are 12 hex digits)")]
    NoSuchToken(String),
    #[error(transparent)]
    Random(#[from] RandomError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The longest an enrollment token may stay valid: it is a bearer secret that enrolls a
/// machine, meant to be used minutes after it is made (docs/quickstart.md).
pub const MAX_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(7 * 86400);

/// Enrolled instances and their tokens.
pub struct Instances {
    store: Arc<dyn Store>,
    audit: Arc<AuditLog>,
    registry: AgentRegistry,
    ca: Arc<CertAuthority>,
    advertised: Vec<String>,
    locations: Arc<AgentLocations>,
}

impl std::fmt::Debug for Instances {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instances").field("advertised", &self.advertised).finish_non_exhaustive()
    }
}

/// An instance as `postern instances` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceRow {
    pub id: String,
    pub name: String,
    pub labels: Labels,
    pub hostname: String,
    pub platform: String,
    pub agent_version: String,
    pub online: bool,
    pub last_seen: Option<i64>,
    pub remote: Option<String>,
    /// Cluster mode: the id of the gateway an online agent is connected to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// How an agent connected to this gateway reaches it: `quic` or `tcp` (the fallback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
}

/// What `postern instances revoke` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Revoked {
    pub id: String,
    pub name: String,
    pub was_online: bool,
}

#[derive(Debug, serde::Serialize)]
pub struct CreatedToken {
    pub token: String,
    pub expires_at: i64,
    pub ca_pin: String,
    /// The first address agents should dial (what `gateways` held alone before clusters).
    pub gateway: String,
    /// Every address agents should dial (`[tunnel] advertise`), one `--gateway` each.
    pub gateways: Vec<String>,
    pub labels: Labels,
    pub name: Option<String>,
}

impl Instances {
    pub fn new(
        store: Arc<dyn Store>,
        audit: Arc<AuditLog>,
        registry: AgentRegistry,
        ca: Arc<CertAuthority>,
        advertised: Vec<String>,
        locations: Arc<AgentLocations>,
    ) -> Self {
        Instances { store, audit, registry, ca, advertised, locations }
    }

    /// Addresses agents should dial, for printed join commands (never empty).
    pub fn advertised_tunnel(&self) -> &[String] {
        &self.advertised
    }

    /// Where agents are connected in a cluster.
    pub fn locations(&self) -> &Arc<AgentLocations> {
        &self.locations
    }

    /// Who is connected now (the live truth for "online").
    pub fn registry(&self) -> &AgentRegistry {
        &self.registry
    }

    /// The agent CA (its pin goes into join commands).
    pub fn ca(&self) -> &CertAuthority {
        &self.ca
    }

    /// Every enrolled instance with what its live connection says, for `postern instances`.
    /// In a cluster an agent connected to another gateway (a live lease in the store) is
    /// online too, with that gateway named.
    pub async fn rows(&self) -> Result<Vec<InstanceRow>, StoreError> {
        let agents = self.store.agents().await?;
        let here = self.locations.gateway_id().map(str::to_owned);
        let elsewhere = self.locations.all_elsewhere().await;
        Ok(agents
            .into_iter()
            .map(|a| {
                let live = self.registry.get(&a.id);
                let gateway = match &live {
                    Some(_) => here.clone(),
                    None => elsewhere.get(&a.id).cloned(),
                };
                let online = live.is_some() || gateway.is_some();
                InstanceRow {
                    online,
                    gateway,
                    remote: live.as_ref().map(|l| l.remote.to_string()),
                    transport: live.as_ref().map(|l| l.transport.to_string()),
                    last_seen: if online { Some(now_unix()) } else { a.last_seen },
                    hostname: live.as_ref().map(|l| l.hostname.clone()).unwrap_or(a.hostname),
                    platform: live.as_ref().map(|l| l.platform.clone()).unwrap_or(a.platform),
                    agent_version: live.as_ref().map(|l| l.agent_version.clone()).unwrap_or(a.agent_version),
                    id: a.id,
                    name: a.name,
                    labels: a.labels,
                }
            })
            .collect())
    }

    /// Revoke `instance` (name or id): marked in the store, its connection closed.
    pub async fn revoke(&self, instance: &str, actor: &str) -> Result<Revoked, InstanceError> {
        let agents = self.store.agents().await?;
        let agent = resolve_instance(&agents, instance).map_err(InstanceError::Unknown)?.clone();
        self.store.revoke_agent(&agent.id).await?;
        let was_online = self.registry.disconnect(&agent.id, "agent revoked");
        let _ = self.audit.event(&Event::AgentRevoked(AgentRevoked {
            actor: actor.to_owned(),
            agent_id: agent.id.clone(),
            name: agent.name.clone(),
        }));
        info!(agent_id = %agent.id, "agent revoked");
        Ok(Revoked { id: agent.id, name: agent.name, was_online })
    }

    pub async fn create_token(
        &self,
        labels: Labels,
        ttl: std::time::Duration,
        name: Option<String>,
        actor: &str,
    ) -> Result<CreatedToken, InstanceError> {
        if let Some(n) = &name
            && !valid_name(n)
        {
            return Err(InstanceError::InvalidName(n.clone()));
        }
        if ttl > MAX_TOKEN_TTL {
            return Err(InstanceError::TtlTooLong);
        }
        let token = format!("pt_{}", random_hex(24)?);
        let now = now_unix();
        let expires_at = now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX));
        self.store
            .create_token(&NewToken {
                hash: token_hash(&token),
                labels: labels.clone(),
                name: name.clone(),
                created_at: now,
                expires_at,
            })
            .await?;
        // The audit line names the token by a hash prefix, never the secret itself.
        let _ = self.audit.event(&Event::TokenCreated(TokenCreated {
            actor: actor.to_owned(),
            token_id: token_id(&token_hash(&token)),
            labels: labels.clone(),
            name: name.clone(),
            expires_at,
        }));
        Ok(CreatedToken {
            token,
            expires_at,
            ca_pin: self.ca.pin(),
            gateway: self.advertised.first().cloned().unwrap_or_default(),
            gateways: self.advertised.clone(),
            labels,
            name,
        })
    }

    /// Every enrollment token (never a secret), with its state now.
    pub async fn tokens(&self) -> Result<Vec<TokenRow>, InstanceError> {
        let now = now_unix();
        Ok(self
            .store
            .tokens()
            .await?
            .into_iter()
            .map(|t| TokenRow { state: t.state(now).to_owned(), token: t })
            .collect())
    }

    /// Make the unused token `id` unusable (audited).
    pub async fn revoke_token(&self, id: &str, actor: &str) -> Result<(), InstanceError> {
        if !self.store.revoke_token(id, now_unix(), actor).await? {
            return Err(InstanceError::NoSuchToken(id.chars().take(40).collect()));
        }
        let _ = self
            .audit
            .event(&Event::TokenRevoked(TokenRevoked { actor: actor.to_owned(), token_id: id.to_ascii_lowercase() }));
        Ok(())
    }
}

/// A token as `postern token list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRow {
    #[serde(flatten)]
    pub token: crate::store::TokenRecord,
    /// `unused`, `used`, `expired` or `revoked`.
    pub state: String,
}

/// The tunnel's view of the store, with audit events for every decision. Enrollments with
/// a bad token are not told apart from a flood: an address refused again and again is
/// shut out for a growing while (no store lookup), and the refusals are audited once per
/// address per interval (`[audit] refusal_interval`), with a count.
pub struct StoreDirectory {
    store: Arc<dyn Store>,
    audit: Arc<AuditLog>,
    backoff: FailureBackoff,
    refusals: Arc<RefusalDigest<AgentEnrollRefused>>,
    locations: Arc<AgentLocations>,
}

impl StoreDirectory {
    pub fn new(
        store: Arc<dyn Store>,
        audit: Arc<AuditLog>,
        refusal_interval: std::time::Duration,
        locations: Arc<AgentLocations>,
    ) -> Self {
        StoreDirectory {
            store,
            audit,
            locations,
            backoff: FailureBackoff::default(),
            refusals: Arc::new(RefusalDigest::new(refusal_interval)),
        }
    }

    /// Write the summaries of refused enrollments as their intervals end, until `shutdown`.
    pub fn summarise_refusals(
        &self,
        shutdown: postern_tunnel::CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let audit = self.audit.clone();
        self.refusals.clone().summarise(
            move |last: AgentEnrollRefused, count| {
                let _ = audit.event(&Event::AgentEnrollRefused(AgentEnrollRefused { count: Some(count), ..last }));
            },
            shutdown,
        )
    }

    /// Audit a refused enrollment (at once, or counted for the source's summary).
    fn refused(&self, remote: SocketAddr, refusal: AgentEnrollRefused) {
        if let Some(r) = self.refusals.refused(remote.ip(), refusal, std::time::Instant::now()) {
            let _ = self.audit.event(&Event::AgentEnrollRefused(r));
        }
    }
}

impl AgentDirectory for StoreDirectory {
    async fn enroll(&self, token: &str, req: &EnrollRequest, remote: SocketAddr) -> Result<EnrolledAgent, Refusal> {
        let hash = token_hash(token);
        let now = std::time::Instant::now();
        if let Some(wait) = self.backoff.blocked(remote.ip(), now) {
            // Refused again without a look at the store; audited with the others.
            let message = format!(
                "too many refused enrollments from this address; retry in {} s",
                wait.as_secs().saturating_add(1)
            );
            self.refused(
                remote,
                AgentEnrollRefused {
                    source: remote.to_string(),
                    token_id: token_id(&hash),
                    hostname: name_from_hostname(&req.hostname),
                    reason: message.clone(),
                    count: None,
                },
            );
            return Err(Refusal { code: ErrorCode::Unavailable, message });
        }
        let id = random_hex(8)
            .map(|h| format!("ag-{h}"))
            .map_err(|e| Refusal { code: ErrorCode::Internal, message: e.to_string() })?;
        let new = NewAgent {
            id,
            hostname: name_from_hostname(&req.hostname),
            platform: clean_text(&req.platform, 64),
            agent_version: clean_text(&req.agent_version, 64),
            now: now_unix(),
        };
        let outcome = self.store.redeem_token(&hash, &new).await;
        let refuse = |code: ErrorCode, message: &str| {
            if code != ErrorCode::Internal {
                self.backoff.failed(remote.ip(), now);
            }
            self.refused(
                remote,
                AgentEnrollRefused {
                    source: remote.to_string(),
                    token_id: token_id(&hash),
                    hostname: new.hostname.clone(),
                    reason: message.to_owned(),
                    count: None,
                },
            );
            Refusal { code, message: message.to_owned() }
        };
        match outcome {
            Ok(Ok(rec)) => {
                self.backoff.succeeded(remote.ip());
                let _ = self.audit.event(&Event::AgentEnrolled(AgentEnrolled {
                    source: remote.to_string(),
                    agent_id: rec.id.clone(),
                    name: rec.name.clone(),
                    labels: rec.labels.clone(),
                    hostname: rec.hostname.clone(),
                    token_id: token_id(&hash),
                }));
                Ok(EnrolledAgent { agent_id: rec.id, name: rec.name })
            }
            Ok(Err(RedeemError::Unknown)) => Err(refuse(ErrorCode::TokenUnknown, "unknown enrollment token")),
            Ok(Err(RedeemError::Used)) => Err(refuse(ErrorCode::TokenUsed, "enrollment token already used")),
            Ok(Err(RedeemError::Expired)) => Err(refuse(ErrorCode::TokenExpired, "enrollment token expired")),
            Err(e) => {
                postern_tunnel::error_limited!(error = %e, "store error during enrollment");
                Err(refuse(ErrorCode::Internal, "gateway storage error; try again later"))
            }
        }
    }

    async fn admit(
        &self,
        agent_id: &str,
        hello: &Hello,
        remote: SocketAddr,
        transport: postern_tunnel::transport::Transport,
    ) -> Result<String, Refusal> {
        let rec = match self.store.agent(agent_id).await {
            Ok(r) => r,
            Err(e) => {
                postern_tunnel::error_limited!(error = %e, "store error admitting agent");
                return Err(Refusal { code: ErrorCode::Unavailable, message: "gateway storage error".into() });
            }
        };
        let refusal = match &rec {
            None => Some("agent is not registered with this gateway"),
            Some(r) if r.revoked => Some("agent has been revoked"),
            Some(_) => None,
        };
        if let Some(reason) = refusal {
            let _ = self.audit.event(&Event::AgentRefused(AgentRefused {
                agent_id: agent_id.to_owned(),
                source: remote.to_string(),
                reason: reason.to_owned(),
            }));
            return Err(Refusal { code: ErrorCode::AgentRevoked, message: reason.into() });
        }
        let agent_version = clean_text(&hello.agent_version, 64);
        let (hostname, platform) = (clean_text(&hello.hostname, 255), clean_text(&hello.platform, 64));
        let seen = self.store.agent_seen(agent_id, Some(&hostname), Some(&platform), Some(&agent_version), now_unix());
        let _ = timed_store(StoreOp::AgentSeen, seen).await;
        let name = rec.map(|r| r.name).unwrap_or_default();
        self.locations.connected(agent_id).await;
        let _ = self.audit.event(&Event::AgentConnected(AgentConnected {
            agent_id: agent_id.to_owned(),
            name: name.clone(),
            source: remote.to_string(),
            agent_version,
            transport: Some(transport.to_string()),
        }));
        Ok(name)
    }

    async fn departed(&self, agent_id: &str) {
        self.locations.departed(agent_id).await;
        let _ = timed_store(StoreOp::AgentSeen, self.store.agent_seen(agent_id, None, None, None, now_unix())).await;
        let _ = self.audit.event(&Event::AgentDisconnected(AgentDisconnected { agent_id: agent_id.to_owned() }));
    }

    async fn renewed(&self, agent_id: &str, remote: SocketAddr, serial_hex: &str, not_after: std::time::SystemTime) {
        let not_after = not_after
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        let _ = self.audit.event(&Event::AgentRenewed(AgentRenewed {
            agent_id: agent_id.to_owned(),
            source: remote.to_string(),
            serial: serial_hex.to_owned(),
            not_after,
        }));
    }

    async fn protocol_violation(&self, remote: SocketAddr, agent_id: Option<&str>, error: &str) {
        let _ = self.audit.event(&Event::AgentProtocolViolation(AgentProtocolViolation {
            source: remote.to_string(),
            agent_id: agent_id.map(str::to_owned),
            error: error.to_owned(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_hash_is_sha256_hex() {
        assert_eq!(token_hash("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
