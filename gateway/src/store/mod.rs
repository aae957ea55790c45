//! Persistent state behind one trait. The embedded default is SQLite ([`sqlite::SqliteStore`]);
//! a PostgreSQL backend for scale-out implements the same trait with the same SQL dialect
//! subset (see docs/architecture.md).

pub mod sqlite;

use async_trait::async_trait;
use serde::Serialize;

pub type Labels = std::collections::BTreeMap<String, String>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// An enrollment token as stored: only the SHA-256 of the secret is kept.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub hash: String,
    pub labels: Labels,
    pub name: Option<String>,
    pub created_at: i64,
    pub expires_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedeemError {
    Unknown,
    Used,
    Expired,
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentRecord {
    pub id: String,
    pub name: String,
    pub labels: Labels,
    pub hostname: String,
    pub platform: String,
    pub agent_version: String,
    pub enrolled_at: i64,
    pub last_seen: Option<i64>,
    pub revoked: bool,
}

/// What an enrollment supplies; the store picks the final (unique) name.
#[derive(Debug, Clone)]
pub struct NewAgent {
    pub id: String,
    pub hostname: String,
    pub platform: String,
    pub agent_version: String,
    pub now: i64,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn create_token(&self, token: &NewToken) -> Result<(), StoreError>;

    /// Atomically spend the token `hash` and create the agent it enrolls. A token is
    /// redeemed at most once, even under concurrent attempts.
    async fn redeem_token(&self, hash: &str, agent: &NewAgent) -> Result<Result<AgentRecord, RedeemError>, StoreError>;

    async fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError>;

    /// All agents that are not revoked.
    async fn agents(&self) -> Result<Vec<AgentRecord>, StoreError>;

    /// Record what a connecting agent reported, and when it was last seen.
    async fn agent_seen(
        &self,
        id: &str,
        hostname: Option<&str>,
        platform: Option<&str>,
        version: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError>;

    async fn revoke_agent(&self, id: &str) -> Result<bool, StoreError>;

    /// Test-mode bulk enrollment for load tests: create agents without tokens.
    async fn insert_agents(&self, agents: &[(String, String)], labels: &Labels, now: i64) -> Result<(), StoreError>;
}
