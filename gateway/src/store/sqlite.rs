//! The embedded store: SQLite through sqlx (WAL), with numbered migrations.
//!
//! (Over 900 lines with its tests, on purpose: the queries and the round-trip tests that pin
//! them down stay together; the code alone is about 700 lines.)

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection as _, Row, SqliteConnection};

use postern_core::store::{
    AgentLocation, AgentRecord, AuditAnchor, GatewayAnchor, GrantRecord, Labels, LiveSessionRecord, NewAgent, NewToken,
    PolicyVersion, RedeemError, SessionEnding, SessionQuery, SessionRecord, Store, StoreError, TERMINATE_PENDING,
    TOKEN_REVOKED_BY, TerminateRequest, TokenRecord, UserRecord,
};
use postern_core::store::{CertificateRecord, LoginUser, PortableStore as _};

/// The store's error for a failed database call.
pub(super) fn db(e: sqlx::Error) -> StoreError {
    StoreError::Database(Box::new(e))
}

/// Schema migrations, applied in order; `schema_version` records how far a database got.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE tokens (
    hash        TEXT PRIMARY KEY,
    labels      TEXT NOT NULL,
    name        TEXT,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER,
    used_by     TEXT
);
CREATE TABLE agents (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    labels        TEXT NOT NULL,
    hostname      TEXT NOT NULL,
    platform      TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    enrolled_at   INTEGER NOT NULL,
    last_seen     INTEGER,
    revoked       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX agents_name ON agents(name);
"#,
    r#"
CREATE TABLE users (
    name        TEXT PRIMARY KEY,
    groups      TEXT NOT NULL,
    keys        TEXT NOT NULL,
    principals  TEXT NOT NULL,
    disabled    INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL
);
CREATE TABLE policies (
    name        TEXT NOT NULL,
    version     INTEGER NOT NULL,
    source      TEXT NOT NULL,
    file        TEXT NOT NULL,
    applied_at  INTEGER NOT NULL,
    applied_by  TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE grants (
    id          TEXT PRIMARY KEY,
    user        TEXT NOT NULL,
    policy      TEXT NOT NULL,
    reason      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    created_by  TEXT NOT NULL,
    expires_at  INTEGER NOT NULL,
    revoked_at  INTEGER,
    revoked_by  TEXT
);
"#,
    // 3: the audit anchor, kept outside the log: the seq and line hash of the last signed
    // checkpoint, so a log cut back to an older checkpoint is noticed (docs/audit.md).
    r#"
CREATE TABLE audit_anchor (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    seq   INTEGER NOT NULL,
    hash  TEXT NOT NULL
);
"#,
    // 4: the session history (`postern sessions --all`, `postern replay`), one row per
    // session of every door; bounded by `[history]` retention (docs/audit.md).
    r#"
CREATE TABLE session_history (
    id              TEXT PRIMARY KEY,
    user_name       TEXT NOT NULL,
    source          TEXT,
    instance        TEXT NOT NULL,
    agent_id        TEXT NOT NULL,
    kind            TEXT NOT NULL,
    door            TEXT NOT NULL,
    command         TEXT,
    destination     TEXT,
    started_ms      BIGINT NOT NULL,
    ended_at        BIGINT,
    end_reason      TEXT,
    exit_code       INTEGER,
    bytes_in        BIGINT NOT NULL DEFAULT 0,
    bytes_out       BIGINT NOT NULL DEFAULT 0,
    logged          INTEGER NOT NULL,
    unlogged_reason TEXT,
    recording       TEXT
);
CREATE INDEX session_history_started ON session_history(started_ms, id);
CREATE INDEX session_history_user ON session_history(user_name, started_ms);
"#,
    // 5: the access generation, bumped in the same transaction as every write to users,
    // policies or grants (by these triggers, so no write path can forget it); gateways
    // sharing the store poll it and reload their copy when it moves (docs/scale-out.md).
    r#"
CREATE TABLE access_generation (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    generation  BIGINT NOT NULL
);
INSERT INTO access_generation (id, generation) VALUES (1, 0);
CREATE TRIGGER access_users_insert AFTER INSERT ON users BEGIN
    UPDATE access_generation SET generation = generation + 1 WHERE id = 1;
END;
CREATE TRIGGER access_users_update AFTER UPDATE ON users BEGIN
    UPDATE access_generation SET generation = generation + 1 WHERE id = 1;
END;
CREATE TRIGGER access_users_delete AFTER DELETE ON users BEGIN
    UPDATE access_generation SET generation = generation + 1 WHERE id = 1;
END;
CREATE TRIGGER access_policies_insert AFTER INSERT ON policies BEGIN
    UPDATE access_generation SET generation = generation + 1 WHERE id = 1;
END;
CREATE TRIGGER access_policies_update AFTER UPDATE ON policies BEGIN
    UPDATE access_generation SET generation = generation + 1 WHERE id = 1;
END;
CREATE TRIGGER access_policies_delete AFTER DELETE ON policies BEGIN
    UPDATE access_generation SET generation = generation + 1 WHERE id = 1;
END;
CREATE TRIGGER access_grants_insert AFTER INSERT ON grants BEGIN
    UPDATE access_generation SET generation = generation + 1 WHERE id = 1;
END;
CREATE TRIGGER access_grants_update AFTER UPDATE ON grants BEGIN
    UPDATE access_generation SET generation = generation + 1 WHERE id = 1;
END;
CREATE TRIGGER access_grants_delete AFTER DELETE ON grants BEGIN
    UPDATE access_generation SET generation = generation + 1 WHERE id = 1;
END;
"#,
    r#"
CREATE TABLE live_sessions (
    id          TEXT PRIMARY KEY,
    gateway_id  TEXT NOT NULL,
    user_name   TEXT NOT NULL,
    source      TEXT,
    instance    TEXT NOT NULL,
    agent_id    TEXT NOT NULL,
    kind        TEXT NOT NULL,
    destination TEXT,
    logged      INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    bytes_in    INTEGER NOT NULL,
    bytes_out   INTEGER NOT NULL,
    lease_until INTEGER NOT NULL
);
CREATE INDEX live_sessions_gateway ON live_sessions(gateway_id);
CREATE TABLE terminate_requests (
    id          TEXT PRIMARY KEY,
    session_id  TEXT NOT NULL,
    gateway_id  TEXT NOT NULL,
    actor       TEXT NOT NULL,
    asked_by    TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    state       TEXT NOT NULL
);
CREATE INDEX terminate_requests_gateway ON terminate_requests(gateway_id, state);
CREATE TABLE rdp_tokens_spent (
    token_id    TEXT PRIMARY KEY,
    expires_at  INTEGER NOT NULL
);
"#,
    r#"
CREATE TABLE cluster_keys (
    name        TEXT PRIMARY KEY,
    sealed      BLOB NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE TABLE gateways (
    id          TEXT PRIMARY KEY,
    address     TEXT NOT NULL,
    lease_until INTEGER NOT NULL
);
"#,
    // Where each agent is connected in a cluster, under a lease its gateway renews
    // (docs/scale-out.md, "Agents on any gateway"); a single gateway never writes it.
    r#"
CREATE TABLE agent_locations (
    agent_id        TEXT PRIMARY KEY,
    gateway_id      TEXT NOT NULL,
    connected_since BIGINT NOT NULL,
    lease_expires   BIGINT NOT NULL
);
CREATE INDEX agent_locations_gateway ON agent_locations(gateway_id);
"#,
    // Audit in a cluster (issue 17): each gateway of a cluster keeps its own hash chain,
    // so its own anchor, with the public key its checkpoints are signed with (for `audit
    // verify --bucket`); and the session history says which gateway carried a session.
    r#"
CREATE TABLE gateway_audit_anchors (
    gateway_id  TEXT PRIMARY KEY,
    seq         BIGINT NOT NULL,
    hash        TEXT NOT NULL,
    public_key  TEXT NOT NULL
);
ALTER TABLE session_history ADD COLUMN gateway TEXT;
"#,
    // Single sign-on (issue 18): users from the identity provider name their IdP identity;
    // the certificates the gateway signs are kept until they expire so they can be revoked
    // (a revocation moves the access generation, so every gateway refuses it within 5 s).
    r#"
ALTER TABLE users ADD COLUMN idp_subject TEXT;
CREATE TABLE certificates (
    serial          TEXT PRIMARY KEY,
    user_name       TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL,
    issued_at       BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    origin          TEXT NOT NULL,
    idp_subject     TEXT,
    mfa             INTEGER NOT NULL,
    revoked_at      BIGINT
);
CREATE INDEX certificates_user ON certificates(user_name, expires_at);
CREATE TRIGGER access_certificates_update AFTER UPDATE ON certificates BEGIN
    UPDATE access_generation SET generation = generation + 1 WHERE id = 1;
END;
"#,
];

/// SQL shared by both stores (numbered parameters, which SQLite reads as well).
pub(super) mod cert_sql {
    /// Create the user, or sync the groups of the same IdP identity, or (with `$7`) link a
    /// user that has no IdP identity yet; any other existing user is left as it is.
    pub const LOGIN_USER: &str = "INSERT INTO users (name, groups, keys, principals, disabled, created_at, idp_subject) \
         VALUES ($1, $2, '[]', '[]', 0, $3, $4) \
         ON CONFLICT (name) DO UPDATE SET groups = excluded.groups, idp_subject = excluded.idp_subject \
         WHERE users.idp_subject = excluded.idp_subject OR (users.idp_subject IS NULL AND $5 = 1)";
    pub const RECORD: &str = "INSERT INTO certificates (serial, user_name, key_fingerprint, issued_at, expires_at, \
         origin, idp_subject, mfa, revoked_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
    pub const REVOKE_ALL: &str = "UPDATE certificates SET revoked_at = $1 \
         WHERE user_name = $2 AND expires_at > $3 AND revoked_at IS NULL";
    pub const REVOKE_ONE: &str = "UPDATE certificates SET revoked_at = $1 \
         WHERE user_name = $2 AND expires_at > $3 AND revoked_at IS NULL AND serial = $4";
    pub const LIST_ALL: &str = "SELECT * FROM certificates WHERE expires_at > $1 ORDER BY issued_at DESC, serial";
    pub const LIST_USER: &str =
        "SELECT * FROM certificates WHERE expires_at > $1 AND user_name = $2 ORDER BY issued_at DESC, serial";
    pub const PRUNE: &str = "DELETE FROM certificates WHERE expires_at < $1";

    /// Serials are kept as 16 hex digits: every database sorts and compares them alike.
    pub fn serial_text(serial: u64) -> String {
        format!("{serial:016x}")
    }

    pub fn serial_of(text: &str) -> Result<u64, postern_core::store::StoreError> {
        u64::from_str_radix(text, 16).map_err(|e| {
            postern_core::store::StoreError::Database(Box::new(std::io::Error::other(format!(
                "certificate serial {text:?} in the store: {e}"
            ))))
        })
    }
}

/// The sign-in users and certificates (issue 18) of both stores: the same SQL
/// ([`cert_sql`]) on each one's pool and rows.
macro_rules! sign_in_store {
    ($store:ty, $row:ty) => {
        #[async_trait::async_trait]
        impl postern_core::store::SignInStore for $store {
            async fn login_user(
                &self,
                name: &str,
                subject: &str,
                groups: &[String],
                link_existing: bool,
                now: i64,
            ) -> Result<LoginUser, StoreError> {
                let existed = sqlx::query("SELECT 1 FROM users WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?
                    .is_some();
                let r = sqlx::query(cert_sql::LOGIN_USER)
                    .bind(name)
                    .bind(to_json(groups))
                    .bind(now)
                    .bind(subject)
                    .bind(i64::from(link_existing))
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                let user = self.users().await?.into_iter().find(|u| u.name == name);
                Ok(match user {
                    Some(u) if r.rows_affected() == 1 && u.idp_subject.as_deref() == Some(subject) => {
                        LoginUser::Ready { created: !existed, user: u }
                    }
                    Some(u) if u.idp_subject.is_none() => LoginUser::NotFromIdp,
                    _ => LoginUser::OtherSubject,
                })
            }

            async fn record_certificate(&self, c: &CertificateRecord) -> Result<(), StoreError> {
                sqlx::query(cert_sql::RECORD)
                    .bind(cert_sql::serial_text(c.serial))
                    .bind(&c.user)
                    .bind(&c.key_fingerprint)
                    .bind(c.issued_at)
                    .bind(c.expires_at)
                    .bind(&c.origin)
                    .bind(&c.idp_subject)
                    .bind(i64::from(c.mfa))
                    .bind(c.revoked_at)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                Ok(())
            }

            async fn revoke_certificates(&self, user: &str, serial: Option<u64>, now: i64) -> Result<u64, StoreError> {
                let q = match serial {
                    None => sqlx::query(cert_sql::REVOKE_ALL).bind(now).bind(user).bind(now),
                    Some(s) => {
                        sqlx::query(cert_sql::REVOKE_ONE).bind(now).bind(user).bind(now).bind(cert_sql::serial_text(s))
                    }
                };
                Ok(q.execute(&self.pool).await.map_err(db)?.rows_affected())
            }

            async fn certificates(&self, user: Option<&str>, now: i64) -> Result<Vec<CertificateRecord>, StoreError> {
                let q = match user {
                    None => sqlx::query(cert_sql::LIST_ALL).bind(now),
                    Some(u) => sqlx::query(cert_sql::LIST_USER).bind(now).bind(u),
                };
                q.fetch_all(&self.pool).await.map_err(db)?.iter().map(certificate_of).collect()
            }

            async fn prune_certificates(&self, before: i64) -> Result<u64, StoreError> {
                let r = sqlx::query(cert_sql::PRUNE).bind(before).execute(&self.pool).await.map_err(db)?;
                Ok(r.rows_affected())
            }
        }

        fn certificate_of(r: &$row) -> Result<CertificateRecord, StoreError> {
            Ok(CertificateRecord {
                serial: cert_sql::serial_of(&r.try_get::<String, _>("serial").map_err(db)?)?,
                user: r.try_get("user_name").map_err(db)?,
                key_fingerprint: r.try_get("key_fingerprint").map_err(db)?,
                issued_at: r.try_get("issued_at").map_err(db)?,
                expires_at: r.try_get("expires_at").map_err(db)?,
                origin: r.try_get("origin").map_err(db)?,
                idp_subject: r.try_get("idp_subject").map_err(db)?,
                mfa: r.try_get::<i64, _>("mfa").map_err(db)? != 0,
                revoked_at: r.try_get("revoked_at").map_err(db)?,
            })
        }
    };
}
pub(super) use sign_in_store;

/// The store methods whose SQL is the same on both databases (numbered parameters, which
/// SQLite reads too): one implementation, expanded for each store with its own row
/// helpers (`gateway_anchor_of`, `json_list`, ...) in scope.
macro_rules! portable_store {
    ($store:ty) => {
        #[async_trait::async_trait]
        impl postern_core::store::PortableStore for $store {
            async fn create_token(&self, t: &NewToken) -> Result<(), StoreError> {
                sqlx::query("INSERT INTO tokens (hash, labels, name, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)")
                    .bind(&t.hash)
                    .bind(labels_json(&t.labels))
                    .bind(&t.name)
                    .bind(t.created_at)
                    .bind(t.expires_at)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                Ok(())
            }
            async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
                let rows = sqlx::query("SELECT * FROM tokens ORDER BY created_at DESC, hash")
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
                rows.iter()
                    .map(|r| {
                        let hash: String = r.try_get("hash").map_err(db)?;
                        let labels: String = r.try_get("labels").map_err(db)?;
                        Ok(TokenRecord {
                            id: hash.get(..12).unwrap_or(&hash).to_owned(),
                            name: r.try_get("name").map_err(db)?,
                            labels: serde_json::from_str(&labels).unwrap_or_default(),
                            created_at: r.try_get("created_at").map_err(db)?,
                            expires_at: r.try_get("expires_at").map_err(db)?,
                            used_at: r.try_get("used_at").map_err(db)?,
                            used_by: r.try_get("used_by").map_err(db)?,
                        })
                    })
                    .collect()
            }
            async fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
                let row = sqlx::query(&format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1"))
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?;
                row.as_ref().map(row_to_agent).transpose()
            }
            async fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
                let rows = sqlx::query(&format!("SELECT {AGENT_COLUMNS} FROM agents WHERE revoked = 0 ORDER BY name"))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
                rows.iter().map(row_to_agent).collect()
            }
            async fn agent_seen(
                &self,
                id: &str,
                hostname: Option<&str>,
                platform: Option<&str>,
                version: Option<&str>,
                now: i64,
            ) -> Result<(), StoreError> {
                sqlx::query(
                    "UPDATE agents SET last_seen = $1, hostname = COALESCE($2, hostname), platform = COALESCE($3, platform), \
                     agent_version = COALESCE($4, agent_version) WHERE id = $5",
                )
                .bind(now)
                .bind(hostname)
                .bind(platform)
                .bind(version)
                .bind(id)
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(())
            }
            async fn revoke_agent(&self, id: &str) -> Result<bool, StoreError> {
                let r = sqlx::query("UPDATE agents SET revoked = 1 WHERE id = $1 AND revoked = 0")
                    .bind(id)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                Ok(r.rows_affected() > 0)
            }
            async fn insert_agents(&self, agents: &[(String, String)], labels: &Labels, now: i64) -> Result<(), StoreError> {
                let labels = labels_json(labels);
                let mut tx = self.pool.begin().await.map_err(db)?;
                for (id, name) in agents {
                    sqlx::query(
                        "INSERT INTO agents (id, name, labels, hostname, platform, agent_version, enrolled_at) \
                         VALUES ($1, $2, $3, 'simulated', 'simulated', 'simulated', $4)",
                    )
                    .bind(id)
                    .bind(name)
                    .bind(&labels)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                }
                tx.commit().await.map_err(db)?;
                Ok(())
            }
            async fn users(&self) -> Result<Vec<UserRecord>, StoreError> {
                let rows = sqlx::query("SELECT * FROM users ORDER BY name").fetch_all(&self.pool).await.map_err(db)?;
                rows.iter()
                    .map(|r| {
                        Ok(UserRecord {
                            name: r.try_get("name").map_err(db)?,
                            groups: json_list(r, "groups")?,
                            keys: json_list(r, "keys")?,
                            principals: json_list(r, "principals")?,
                            disabled: r.try_get::<i64, _>("disabled").map_err(db)? != 0,
                            created_at: r.try_get("created_at").map_err(db)?,
                            idp_subject: r.try_get("idp_subject").map_err(db)?,
                        })
                    })
                    .collect()
            }
            async fn delete_user(&self, name: &str) -> Result<bool, StoreError> {
                let r = sqlx::query("DELETE FROM users WHERE name = $1").bind(name).execute(&self.pool).await.map_err(db)?;
                Ok(r.rows_affected() > 0)
            }
            async fn policies(&self) -> Result<Vec<PolicyVersion>, StoreError> {
                let rows = sqlx::query(
                    "SELECT p.* FROM policies p JOIN (SELECT name, MAX(version) AS v FROM policies GROUP BY name) latest \
                     ON p.name = latest.name AND p.version = latest.v WHERE p.source != '' ORDER BY p.name",
                )
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
                rows.iter().map(row_to_policy).collect()
            }
            async fn policy_history(&self, name: &str) -> Result<Vec<PolicyVersion>, StoreError> {
                let rows = sqlx::query("SELECT * FROM policies WHERE name = $1 ORDER BY version")
                    .bind(name)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
                rows.iter().map(row_to_policy).collect()
            }
            async fn grants(&self) -> Result<Vec<GrantRecord>, StoreError> {
                let rows =
                    sqlx::query("SELECT * FROM grants ORDER BY created_at, id").fetch_all(&self.pool).await.map_err(db)?;
                rows.iter()
                    .map(|r| {
                        Ok(GrantRecord {
                            id: r.try_get("id").map_err(db)?,
                            user: r.try_get("user").map_err(db)?,
                            policy: r.try_get("policy").map_err(db)?,
                            reason: r.try_get("reason").map_err(db)?,
                            created_at: r.try_get("created_at").map_err(db)?,
                            created_by: r.try_get("created_by").map_err(db)?,
                            expires_at: r.try_get("expires_at").map_err(db)?,
                            revoked_at: r.try_get("revoked_at").map_err(db)?,
                            revoked_by: r.try_get("revoked_by").map_err(db)?,
                        })
                    })
                    .collect()
            }
            async fn revoke_grant(&self, id: &str, now: i64, by: &str) -> Result<bool, StoreError> {
                let r = sqlx::query("UPDATE grants SET revoked_at = $1, revoked_by = $2 WHERE id = $3 AND revoked_at IS NULL")
                    .bind(now)
                    .bind(by)
                    .bind(id)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                Ok(r.rows_affected() > 0)
            }
            async fn access_generation(&self) -> Result<i64, StoreError> {
                sqlx::query("SELECT generation FROM access_generation WHERE id = 1")
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db)?
                    .try_get(0)
                    .map_err(db)
            }
            async fn audit_anchor(&self) -> Result<Option<AuditAnchor>, StoreError> {
                let row = sqlx::query("SELECT seq, hash FROM audit_anchor WHERE id = 1")
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?;
                row.map(|r| {
                    let seq: i64 = r.try_get("seq").map_err(db)?;
                    let seq = u64::try_from(seq).map_err(|_| StoreError::Corrupt(format!("audit anchor seq {seq}")))?;
                    Ok(AuditAnchor { seq, hash: r.try_get("hash").map_err(db)? })
                })
                .transpose()
            }
            async fn set_audit_anchor(&self, anchor: &AuditAnchor) -> Result<(), StoreError> {
                let seq =
                    i64::try_from(anchor.seq).map_err(|_| StoreError::Corrupt(format!("audit anchor seq {}", anchor.seq)))?;
                sqlx::query(
                    "INSERT INTO audit_anchor (id, seq, hash) VALUES (1, $1, $2) \
                     ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                )
                .bind(seq)
                .bind(&anchor.hash)
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(())
            }
            async fn end_session(&self, e: &SessionEnding) -> Result<bool, StoreError> {
                let r = sqlx::query(
                    "UPDATE session_history SET ended_at = $1, end_reason = $2, exit_code = $3, bytes_in = $4, bytes_out = $5, \
                     logged = COALESCE($6, logged), unlogged_reason = COALESCE($7, unlogged_reason) WHERE id = $8",
                )
                .bind(e.ended_at)
                .bind(&e.end_reason)
                .bind(e.exit_code)
                .bind(bytes_sql(e.bytes_in))
                .bind(bytes_sql(e.bytes_out))
                .bind(e.logged.map(i64::from))
                .bind(&e.unlogged_reason)
                .bind(&e.id)
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(r.rows_affected() > 0)
            }
            async fn sessions_by_prefix(&self, prefix: &str, limit: u32) -> Result<Vec<SessionRecord>, StoreError> {
                let rows = sqlx::query(&format!(
                    "SELECT {SESSION_COLUMNS} FROM session_history WHERE id LIKE $1 ORDER BY started_ms DESC, id DESC LIMIT $2"
                ))
                .bind(format!("{prefix}%"))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
                rows.iter().map(row_to_session).collect()
            }
            async fn add_terminate_request(&self, r: &TerminateRequest) -> Result<(), StoreError> {
                sqlx::query(
                    "INSERT INTO terminate_requests (id, session_id, gateway_id, actor, asked_by, created_at, expires_at, state) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&r.id)
                .bind(&r.session_id)
                .bind(&r.gateway_id)
                .bind(&r.actor)
                .bind(&r.asked_by)
                .bind(r.created_at)
                .bind(r.expires_at)
                .bind(&r.state)
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(())
            }
            async fn pending_terminate_requests(
                &self,
                gateway_id: &str,
                now: i64,
                limit: u32,
            ) -> Result<Vec<TerminateRequest>, StoreError> {
                let rows = sqlx::query(
                    "SELECT * FROM terminate_requests WHERE gateway_id = $1 AND state = $2 AND expires_at > $3 \
                     ORDER BY created_at, id LIMIT $4",
                )
                .bind(gateway_id)
                .bind(TERMINATE_PENDING)
                .bind(now)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
                rows.iter().map(row_to_request).collect()
            }
            async fn terminate_request(&self, id: &str) -> Result<Option<TerminateRequest>, StoreError> {
                let row = sqlx::query("SELECT * FROM terminate_requests WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?;
                row.as_ref().map(row_to_request).transpose()
            }
            async fn prune_cluster_sessions(&self, now: i64) -> Result<u64, StoreError> {
                let mut deleted = 0;
                for (sql, before) in [
                    ("DELETE FROM live_sessions WHERE lease_until <= $1", now),
                    ("DELETE FROM terminate_requests WHERE expires_at < $1", now - TERMINATE_REQUEST_KEPT),
                    ("DELETE FROM rdp_tokens_spent WHERE expires_at < $1", now - SPENT_TOKEN_GRACE),
                ] {
                    deleted += sqlx::query(sql).bind(before).execute(&self.pool).await.map_err(db)?.rows_affected();
                }
                Ok(deleted)
            }
            async fn cluster_keys(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
                let rows = sqlx::query("SELECT name, sealed FROM cluster_keys ORDER BY name")
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
                rows.iter().map(|r| Ok((r.try_get("name").map_err(db)?, r.try_get("sealed").map_err(db)?))).collect()
            }
            async fn add_cluster_key(&self, name: &str, sealed: &[u8], now: i64) -> Result<bool, StoreError> {
                let done = sqlx::query(
                    "INSERT INTO cluster_keys (name, sealed, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
                )
                .bind(name)
                .bind(sealed)
                .bind(now)
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(done.rows_affected() == 1)
            }
            async fn gateway_alive(&self, id: &str, address: &str, lease_until: i64) -> Result<(), StoreError> {
                sqlx::query(
                    "INSERT INTO gateways (id, address, lease_until) VALUES ($1, $2, $3) \
                     ON CONFLICT (id) DO UPDATE SET address = excluded.address, lease_until = excluded.lease_until",
                )
                .bind(id)
                .bind(address)
                .bind(lease_until)
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(())
            }
            async fn live_gateways(&self, now: i64) -> Result<Vec<(String, String)>, StoreError> {
                let rows = sqlx::query("SELECT id, address FROM gateways WHERE lease_until > $1 ORDER BY id")
                    .bind(now)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(db)?;
                rows.iter().map(|r| Ok((r.try_get("id").map_err(db)?, r.try_get("address").map_err(db)?))).collect()
            }
            async fn gateway_left(&self, id: &str, now: i64) -> Result<(), StoreError> {
                sqlx::query("UPDATE gateways SET lease_until = $1 WHERE id = $2 AND lease_until > $3")
                    .bind(now)
                    .bind(id)
                    .bind(now)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                Ok(())
            }
            async fn record_agent_location(&self, l: &AgentLocation) -> Result<(), StoreError> {
                sqlx::query(
                    "INSERT INTO agent_locations (agent_id, gateway_id, connected_since, lease_expires) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (agent_id) DO UPDATE SET gateway_id = EXCLUDED.gateway_id, \
                     connected_since = EXCLUDED.connected_since, lease_expires = EXCLUDED.lease_expires",
                )
                .bind(&l.agent_id)
                .bind(&l.gateway_id)
                .bind(l.connected_since)
                .bind(l.lease_expires)
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(())
            }
            async fn remove_agent_location(&self, agent_id: &str, gateway_id: &str) -> Result<bool, StoreError> {
                let r = sqlx::query("DELETE FROM agent_locations WHERE agent_id = $1 AND gateway_id = $2")
                    .bind(agent_id)
                    .bind(gateway_id)
                    .execute(&self.pool)
                    .await
                    .map_err(db)?;
                Ok(r.rows_affected() > 0)
            }
            async fn agent_locations(&self, now: i64) -> Result<Vec<AgentLocation>, StoreError> {
                let rows = sqlx::query(
                    "SELECT agent_id, gateway_id, connected_since, lease_expires FROM agent_locations \
                     WHERE lease_expires > $1 ORDER BY agent_id",
                )
                .bind(now)
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
                rows.iter().map(row_to_location).collect()
            }
            async fn agent_location(&self, agent_id: &str, now: i64) -> Result<Option<AgentLocation>, StoreError> {
                let row = sqlx::query(
                    "SELECT agent_id, gateway_id, connected_since, lease_expires FROM agent_locations \
                     WHERE agent_id = $1 AND lease_expires > $2",
                )
                .bind(agent_id)
                .bind(now)
                .fetch_optional(&self.pool)
                .await
                .map_err(db)?;
                row.as_ref().map(row_to_location).transpose()
            }
            async fn gateway_audit_anchor(&self, gateway_id: &str) -> Result<Option<GatewayAnchor>, StoreError> {
                let row = sqlx::query("SELECT seq, hash, public_key FROM gateway_audit_anchors WHERE gateway_id = $1")
                    .bind(gateway_id)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db)?;
                row.as_ref().map(gateway_anchor_of).transpose()
            }
            async fn set_gateway_audit_anchor(&self, gateway_id: &str, anchor: &GatewayAnchor) -> Result<(), StoreError> {
                let seq = i64::try_from(anchor.anchor.seq)
                    .map_err(|_| StoreError::Corrupt(format!("audit anchor seq {}", anchor.anchor.seq)))?;
                sqlx::query(
                    "INSERT INTO gateway_audit_anchors (gateway_id, seq, hash, public_key) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (gateway_id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, \
                     public_key = excluded.public_key",
                )
                .bind(gateway_id)
                .bind(seq)
                .bind(&anchor.anchor.hash)
                .bind(&anchor.public_key)
                .execute(&self.pool)
                .await
                .map_err(db)?;
                Ok(())
            }
            async fn gateway_audit_anchors(&self) -> Result<Vec<(String, GatewayAnchor)>, StoreError> {
                let rows =
                    sqlx::query("SELECT gateway_id, seq, hash, public_key FROM gateway_audit_anchors ORDER BY gateway_id")
                        .fetch_all(&self.pool)
                        .await
                        .map_err(db)?;
                rows.iter().map(|r| Ok((r.try_get("gateway_id").map_err(db)?, gateway_anchor_of(r)?))).collect()
            }
        }
    };
}
pub(super) use portable_store;

/// The database (users, keys, grants, agents) is readable by the gateway's user only. The
/// file is created 0600 before SQLite opens it, and SQLite gives the `-wal` and `-shm` files
/// it creates the database file's mode; files left by an older version are tightened.
fn owner_only(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |e: std::io::Error| {
        StoreError::Database(Box::new(std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))))
    };
    std::fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(path).map_err(io)?;
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        match std::fs::set_permissions(&name, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        owner_only(path)?;
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        // The schema is brought up to date on a connection of its own, closed before the
        // pool opens: a pooled connection that had read the schema half-way through the
        // migrations would prepare `SELECT *` against the old columns (sqlx keeps the column
        // list of its first preparation, and SQLite only notices the change when it steps).
        let mut conn = SqliteConnection::connect_with(&opts).await.map_err(db)?;
        migrate(&mut conn).await?;
        conn.close().await.map_err(db)?;
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(db)?;
        Ok(Self { pool })
    }
}

/// The schema version of the database at `path`, and the one this binary migrates to, read
/// without creating or changing anything (`postern doctor`).
pub async fn probe(path: &Path) -> Result<(i64, usize), StoreError> {
    let opts = SqliteConnectOptions::new().filename(path).read_only(true).busy_timeout(Duration::from_secs(2));
    let mut conn = SqliteConnection::connect_with(&opts).await.map_err(db)?;
    let version: i64 = sqlx::query("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        .fetch_one(&mut conn)
        .await
        .map_err(db)?
        .get(0);
    conn.close().await.map_err(db)?;
    Ok((version, MIGRATIONS.len()))
}

async fn migrate(conn: &mut SqliteConnection) -> Result<(), StoreError> {
    sqlx::query("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        .execute(&mut *conn)
        .await
        .map_err(db)?;
    let current: i64 = sqlx::query("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        .fetch_one(&mut *conn)
        .await
        .map_err(db)?
        .try_get(0)
        .map_err(db)?;
    for (i, sql) in MIGRATIONS.iter().enumerate() {
        let version = i64::try_from(i).unwrap_or(i64::MAX) + 1;
        if version <= current {
            continue;
        }
        let mut tx = conn.begin().await.map_err(db)?;
        sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(db)?;
        sqlx::query("INSERT INTO schema_version (version) VALUES (?)")
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
    }
    Ok(())
}

pub(super) fn labels_json(labels: &Labels) -> String {
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".into())
}

fn row_to_agent(row: &sqlx::sqlite::SqliteRow) -> Result<AgentRecord, StoreError> {
    let labels: String = row.try_get("labels").map_err(db)?;
    Ok(AgentRecord {
        id: row.try_get("id").map_err(db)?,
        name: row.try_get("name").map_err(db)?,
        labels: serde_json::from_str(&labels).map_err(|e| StoreError::Corrupt(format!("agent labels: {e}")))?,
        hostname: row.try_get("hostname").map_err(db)?,
        platform: row.try_get("platform").map_err(db)?,
        agent_version: row.try_get("agent_version").map_err(db)?,
        enrolled_at: row.try_get("enrolled_at").map_err(db)?,
        last_seen: row.try_get("last_seen").map_err(db)?,
        revoked: row.try_get::<i64, _>("revoked").map_err(db)? != 0,
    })
}

fn json_list(row: &sqlx::sqlite::SqliteRow, col: &str) -> Result<Vec<String>, StoreError> {
    let text: String = row.try_get(col).map_err(db)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
}

pub(super) fn to_json(v: &[String]) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

fn row_to_policy(row: &sqlx::sqlite::SqliteRow) -> Result<PolicyVersion, StoreError> {
    let source: String = row.try_get("source").map_err(db)?;
    Ok(PolicyVersion {
        name: row.try_get("name").map_err(db)?,
        version: row.try_get("version").map_err(db)?,
        removed: source.is_empty(),
        source,
        file: row.try_get("file").map_err(db)?,
        applied_at: row.try_get("applied_at").map_err(db)?,
        applied_by: row.try_get("applied_by").map_err(db)?,
    })
}

pub(super) const SESSION_COLUMNS: &str = "id, user_name, source, instance, agent_id, kind, door, command, destination, \
     started_ms, ended_at, end_reason, exit_code, bytes_in, bytes_out, logged, unlogged_reason, recording, gateway";

/// Byte counts are kept as signed 64-bit integers (what SQL has); more than 2^63 bytes is
/// stored as the largest.
pub(super) fn bytes_sql(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A `gateway_audit_anchors` row's anchor and key.
fn gateway_anchor_of(row: &sqlx::sqlite::SqliteRow) -> Result<GatewayAnchor, StoreError> {
    let seq: i64 = row.try_get("seq").map_err(db)?;
    let seq = u64::try_from(seq).map_err(|_| StoreError::Corrupt(format!("audit anchor seq {seq}")))?;
    Ok(GatewayAnchor {
        anchor: AuditAnchor { seq, hash: row.try_get("hash").map_err(db)? },
        public_key: row.try_get("public_key").map_err(db)?,
    })
}

fn row_to_session(row: &sqlx::sqlite::SqliteRow) -> Result<SessionRecord, StoreError> {
    let bytes = |col: &str| -> Result<u64, StoreError> {
        let n: i64 = row.try_get(col).map_err(db)?;
        u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("session {col} {n}")))
    };
    Ok(SessionRecord {
        id: row.try_get("id").map_err(db)?,
        user: row.try_get("user_name").map_err(db)?,
        source: row.try_get("source").map_err(db)?,
        instance: row.try_get("instance").map_err(db)?,
        agent_id: row.try_get("agent_id").map_err(db)?,
        kind: row.try_get("kind").map_err(db)?,
        door: row.try_get("door").map_err(db)?,
        command: row.try_get("command").map_err(db)?,
        destination: row.try_get("destination").map_err(db)?,
        started_ms: row.try_get("started_ms").map_err(db)?,
        ended_at: row.try_get("ended_at").map_err(db)?,
        end_reason: row.try_get("end_reason").map_err(db)?,
        exit_code: row.try_get("exit_code").map_err(db)?,
        bytes_in: bytes("bytes_in")?,
        bytes_out: bytes("bytes_out")?,
        logged: row.try_get::<i64, _>("logged").map_err(db)? != 0,
        unlogged_reason: row.try_get("unlogged_reason").map_err(db)?,
        recording: row.try_get("recording").map_err(db)?,
        gateway: row.try_get("gateway").map_err(db)?,
    })
}

/// Live-session rows as one JSON array (the batched upsert reads it with `json_each` here,
/// `json_to_recordset` in PostgreSQL).
pub(super) fn live_sessions_json(rows: &[LiveSessionRecord]) -> String {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({"id": r.id, "gateway_id": r.gateway_id, "user_name": r.user, "source": r.source,
                "instance": r.instance, "agent_id": r.agent_id, "kind": r.kind, "destination": r.destination,
                "logged": i64::from(r.logged), "started_at": r.started_at, "bytes_in": bytes_sql(r.bytes_in),
                "bytes_out": bytes_sql(r.bytes_out), "lease_until": r.lease_until})
        })
        .collect();
    serde_json::Value::Array(rows).to_string()
}

/// How long a spent RDP token is remembered past its expiry: a gateway whose clock is behind
/// still takes it for unexpired that long, and must still find it spent.
pub(super) const SPENT_TOKEN_GRACE: i64 = 300;

/// How long a finished or expired terminate request is kept (the asking gateway reads its
/// outcome within seconds).
pub(super) const TERMINATE_REQUEST_KEPT: i64 = 60;

fn row_to_live(row: &sqlx::sqlite::SqliteRow) -> Result<LiveSessionRecord, StoreError> {
    let bytes = |col: &str| -> Result<u64, StoreError> {
        let n: i64 = row.try_get(col).map_err(db)?;
        u64::try_from(n).map_err(|_| StoreError::Corrupt(format!("live session {col} {n}")))
    };
    Ok(LiveSessionRecord {
        id: row.try_get("id").map_err(db)?,
        gateway_id: row.try_get("gateway_id").map_err(db)?,
        user: row.try_get("user_name").map_err(db)?,
        source: row.try_get("source").map_err(db)?,
        instance: row.try_get("instance").map_err(db)?,
        agent_id: row.try_get("agent_id").map_err(db)?,
        kind: row.try_get("kind").map_err(db)?,
        destination: row.try_get("destination").map_err(db)?,
        logged: row.try_get::<i64, _>("logged").map_err(db)? != 0,
        started_at: row.try_get("started_at").map_err(db)?,
        bytes_in: bytes("bytes_in")?,
        bytes_out: bytes("bytes_out")?,
        lease_until: row.try_get("lease_until").map_err(db)?,
    })
}

fn row_to_request(row: &sqlx::sqlite::SqliteRow) -> Result<TerminateRequest, StoreError> {
    Ok(TerminateRequest {
        id: row.try_get("id").map_err(db)?,
        session_id: row.try_get("session_id").map_err(db)?,
        gateway_id: row.try_get("gateway_id").map_err(db)?,
        actor: row.try_get("actor").map_err(db)?,
        asked_by: row.try_get("asked_by").map_err(db)?,
        created_at: row.try_get("created_at").map_err(db)?,
        expires_at: row.try_get("expires_at").map_err(db)?,
        state: row.try_get("state").map_err(db)?,
    })
}

pub(super) const AGENT_COLUMNS: &str =
    "id, name, labels, hostname, platform, agent_version, enrolled_at, last_seen, revoked";

fn row_to_location(row: &sqlx::sqlite::SqliteRow) -> Result<AgentLocation, StoreError> {
    Ok(AgentLocation {
        agent_id: row.try_get("agent_id").map_err(db)?,
        gateway_id: row.try_get("gateway_id").map_err(db)?,
        connected_since: row.try_get("connected_since").map_err(db)?,
        lease_expires: row.try_get("lease_expires").map_err(db)?,
    })
}

#[async_trait]
impl Store for SqliteStore {
    async fn revoke_token(&self, id: &str, now: i64, by: &str) -> Result<bool, StoreError> {
        // Only a full 12-digit id: a shorter prefix could name several tokens.
        if id.len() != 12 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Ok(false);
        }
        // Spent like a used token (redeem_token's conditional UPDATE then refuses it), with
        // who revoked it in `used_by`: no schema change.
        let done =
            sqlx::query("UPDATE tokens SET used_at = ?, used_by = ? WHERE substr(hash, 1, 12) = ? AND used_at IS NULL")
                .bind(now)
                .bind(format!("{TOKEN_REVOKED_BY}{by}"))
                .bind(id.to_ascii_lowercase())
                .execute(&self.pool)
                .await
                .map_err(db)?;
        Ok(done.rows_affected() > 0)
    }

    async fn redeem_token(&self, hash: &str, agent: &NewAgent) -> Result<Result<AgentRecord, RedeemError>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        // The conditional UPDATE is the single point that makes tokens single-use.
        let spent = sqlx::query(
            "UPDATE tokens SET used_at = ?, used_by = ? WHERE hash = ? AND used_at IS NULL AND expires_at > ? \
             RETURNING labels, name",
        )
        .bind(agent.now)
        .bind(&agent.id)
        .bind(hash)
        .bind(agent.now)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        let Some(spent) = spent else {
            let why = sqlx::query("SELECT used_at, expires_at FROM tokens WHERE hash = ?")
                .bind(hash)
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
            return Ok(Err(match why {
                None => RedeemError::Unknown,
                Some(row) if row.try_get::<Option<i64>, _>("used_at").map_err(db)?.is_some() => RedeemError::Used,
                Some(_) => RedeemError::Expired,
            }));
        };
        let labels: String = spent.try_get("labels").map_err(db)?;
        let requested: Option<String> = spent.try_get("name").map_err(db)?;
        let base = requested.unwrap_or_else(|| agent.hostname.clone());
        let taken: i64 = sqlx::query("SELECT COUNT(*) FROM agents WHERE name = ? AND revoked = 0")
            .bind(&base)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?
            .try_get(0)
            .map_err(db)?;
        // Names stay unique among live agents; a clash gets the id's short suffix.
        let name = if taken == 0 {
            base
        } else {
            format!("{base}-{}", agent.id.trim_start_matches("ag-").chars().take(6).collect::<String>())
        };
        sqlx::query(
            "INSERT INTO agents (id, name, labels, hostname, platform, agent_version, enrolled_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&agent.id)
        .bind(&name)
        .bind(&labels)
        .bind(&agent.hostname)
        .bind(&agent.platform)
        .bind(&agent.agent_version)
        .bind(agent.now)
        .execute(&mut *tx)
        .await.map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(Ok(AgentRecord {
            id: agent.id.clone(),
            name,
            labels: serde_json::from_str(&labels).map_err(|e| StoreError::Corrupt(format!("token labels: {e}")))?,
            hostname: agent.hostname.clone(),
            platform: agent.platform.clone(),
            agent_version: agent.agent_version.clone(),
            enrolled_at: agent.now,
            last_seen: None,
            revoked: false,
        }))
    }

    async fn find_agents(&self, wanted: &str) -> Result<Vec<AgentRecord>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE revoked = 0 AND (id = ? OR name = ?) ORDER BY name"
        ))
        .bind(wanted)
        .bind(wanted)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(row_to_agent).collect()
    }

    async fn put_user(&self, u: &UserRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO users (name, groups, keys, principals, disabled, created_at) VALUES (?, ?, ?, ?, ?, ?) \
             ON CONFLICT(name) DO UPDATE SET groups = excluded.groups, keys = excluded.keys, \
             principals = excluded.principals, disabled = excluded.disabled",
        )
        .bind(&u.name)
        .bind(to_json(&u.groups))
        .bind(to_json(&u.keys))
        .bind(to_json(&u.principals))
        .bind(i64::from(u.disabled))
        .bind(u.created_at)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn put_policy(&self, name: &str, source: &str, file: &str, now: i64, by: &str) -> Result<i64, StoreError> {
        // One statement that writes first: it takes SQLite's write lock (waiting up to the
        // busy timeout) before it reads the newest version. A transaction that read first
        // and wrote second fails with "database is locked" when another writer got in
        // between (tests/store.rs, two gateways on one file).
        let version: i64 = sqlx::query(
            "INSERT INTO policies (name, version, source, file, applied_at, applied_by) \
             SELECT ?, COALESCE(MAX(version), 0) + 1, ?, ?, ?, ? FROM policies WHERE name = ? RETURNING version",
        )
        .bind(name)
        .bind(source)
        .bind(file)
        .bind(now)
        .bind(by)
        .bind(name)
        .fetch_one(&self.pool)
        .await
        .map_err(db)?
        .try_get(0)
        .map_err(db)?;
        Ok(version)
    }

    async fn put_grant(&self, g: &GrantRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO grants (id, user, policy, reason, created_at, created_by, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&g.id)
        .bind(&g.user)
        .bind(&g.policy)
        .bind(&g.reason)
        .bind(g.created_at)
        .bind(&g.created_by)
        .bind(g.expires_at)
        .execute(&self.pool)
        .await.map_err(db)?;
        Ok(())
    }

    async fn insert_session(&self, r: &SessionRecord) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO session_history ({SESSION_COLUMNS}) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"
        ))
        .bind(&r.id)
        .bind(&r.user)
        .bind(&r.source)
        .bind(&r.instance)
        .bind(&r.agent_id)
        .bind(&r.kind)
        .bind(&r.door)
        .bind(&r.command)
        .bind(&r.destination)
        .bind(r.started_ms)
        .bind(r.ended_at)
        .bind(&r.end_reason)
        .bind(r.exit_code)
        .bind(bytes_sql(r.bytes_in))
        .bind(bytes_sql(r.bytes_out))
        .bind(i64::from(r.logged))
        .bind(&r.unlogged_reason)
        .bind(&r.recording)
        .bind(&r.gateway)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn sessions(&self, q: &SessionQuery) -> Result<Vec<SessionRecord>, StoreError> {
        // Each filter is `(? IS NULL OR ...)`, so the statement is one fixed text.
        let rows = sqlx::query(&format!(
            "SELECT {SESSION_COLUMNS} FROM session_history WHERE \
             (? IS NULL OR user_name = ?) AND (? IS NULL OR instance = ? OR agent_id = ?) \
             AND (? IS NULL OR kind = ? OR door = ?) AND (? IS NULL OR started_ms >= ?) \
             AND (? IS NULL OR started_ms < ?) \
             AND (? IS NULL OR started_ms < ? OR (started_ms = ? AND id < ?)) \
             ORDER BY started_ms DESC, id DESC LIMIT ?"
        ))
        .bind(&q.user)
        .bind(&q.user)
        .bind(&q.instance)
        .bind(&q.instance)
        .bind(&q.instance)
        .bind(&q.kind)
        .bind(&q.kind)
        .bind(&q.kind)
        .bind(q.since)
        .bind(q.since)
        .bind(q.until)
        .bind(q.until)
        .bind(q.before.as_ref().map(|b| b.0))
        .bind(q.before.as_ref().map(|b| b.0))
        .bind(q.before.as_ref().map(|b| b.0))
        .bind(q.before.as_ref().map(|b| b.1.as_str()))
        .bind(i64::from(q.limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(row_to_session).collect()
    }

    async fn prune_sessions(&self, cutoff: Option<i64>, keep_rows: Option<u64>) -> Result<u64, StoreError> {
        let mut deleted = 0;
        if let Some(cutoff) = cutoff {
            let r = sqlx::query("DELETE FROM session_history WHERE COALESCE(ended_at, started_ms / 1000) < ?")
                .bind(cutoff)
                .execute(&self.pool)
                .await
                .map_err(db)?;
            deleted += r.rows_affected();
        }
        if let Some(keep) = keep_rows {
            // The newest `keep` rows stay (and any that started in the same second as the
            // last of them: the bound is exact to a second, which is enough for retention).
            let r = sqlx::query(
                "DELETE FROM session_history WHERE started_ms < \
                 (SELECT started_ms FROM session_history ORDER BY started_ms DESC, id DESC LIMIT 1 OFFSET ?)",
            )
            .bind(bytes_sql(keep.saturating_sub(1)))
            .execute(&self.pool)
            .await
            .map_err(db)?;
            deleted += r.rows_affected();
        }
        Ok(deleted)
    }
    async fn put_live_sessions(&self, sessions: &[LiveSessionRecord]) -> Result<(), StoreError> {
        // `WHERE true`: SQLite's parser needs it before ON CONFLICT after a SELECT.
        sqlx::query(
            "INSERT INTO live_sessions (id, gateway_id, user_name, source, instance, agent_id, kind, destination, \
             logged, started_at, bytes_in, bytes_out, lease_until) \
             SELECT json_extract(value, '$.id'), json_extract(value, '$.gateway_id'), \
             json_extract(value, '$.user_name'), json_extract(value, '$.source'), json_extract(value, '$.instance'), \
             json_extract(value, '$.agent_id'), json_extract(value, '$.kind'), json_extract(value, '$.destination'), \
             json_extract(value, '$.logged'), json_extract(value, '$.started_at'), json_extract(value, '$.bytes_in'), \
             json_extract(value, '$.bytes_out'), json_extract(value, '$.lease_until') FROM json_each(?) WHERE true \
             ON CONFLICT(id) DO UPDATE SET bytes_in = excluded.bytes_in, bytes_out = excluded.bytes_out, \
             lease_until = excluded.lease_until",
        )
        .bind(live_sessions_json(sessions))
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn remove_live_sessions(&self, gateway_id: &str, ids: &[String]) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM live_sessions WHERE gateway_id = ? AND id IN (SELECT value FROM json_each(?))")
            .bind(gateway_id)
            .bind(to_json(ids))
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn live_sessions(&self, now: i64, limit: u32) -> Result<Vec<LiveSessionRecord>, StoreError> {
        let rows =
            sqlx::query("SELECT * FROM live_sessions WHERE lease_until > ? ORDER BY started_at DESC, id DESC LIMIT ?")
                .bind(now)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err(db)?;
        rows.iter().map(row_to_live).collect()
    }

    async fn move_terminate_request(&self, id: &str, from: &str, to: &str, now: i64) -> Result<bool, StoreError> {
        let r = sqlx::query(
            "UPDATE terminate_requests SET state = ? WHERE id = ? AND state = ? \
             AND (state <> 'pending' OR ? <> 'claimed' OR expires_at > ?)",
        )
        .bind(to)
        .bind(id)
        .bind(from)
        .bind(to)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected() > 0)
    }

    async fn spend_rdp_token(&self, token_id: &str, expires_at: i64) -> Result<bool, StoreError> {
        let r = sqlx::query("INSERT INTO rdp_tokens_spent (token_id, expires_at) VALUES (?, ?) ON CONFLICT DO NOTHING")
            .bind(token_id)
            .bind(expires_at)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    async fn renew_agent_locations(
        &self,
        gateway_id: &str,
        agents: &[(String, i64)],
        lease_expires: i64,
    ) -> Result<u64, StoreError> {
        if agents.is_empty() {
            return Ok(0);
        }
        // One statement for all: the list goes in as one JSON array of [id, since] pairs.
        let list = serde_json::to_string(agents).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let r = sqlx::query(
            "INSERT INTO agent_locations (agent_id, gateway_id, connected_since, lease_expires) \
             SELECT json_extract(value, '$[0]'), ?, json_extract(value, '$[1]'), ? FROM json_each(?) WHERE true \
             ON CONFLICT (agent_id) DO UPDATE SET lease_expires = excluded.lease_expires \
             WHERE agent_locations.gateway_id = excluded.gateway_id",
        )
        .bind(gateway_id)
        .bind(lease_expires)
        .bind(list)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected())
    }
}

sign_in_store!(SqliteStore, sqlx::sqlite::SqliteRow);
portable_store!(SqliteStore);

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(id: &str, host: &str) -> NewAgent {
        NewAgent { id: id.into(), hostname: host.into(), platform: "linux".into(), agent_version: "1".into(), now: 100 }
    }

    #[tokio::test]
    async fn tokens_are_single_use_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db")).await.unwrap();
        let mut labels = Labels::new();
        labels.insert("env".into(), "dev".into());
        let tok = |hash: &str, expires_at| NewToken {
            hash: hash.into(),
            labels: labels.clone(),
            name: None,
            created_at: 0,
            expires_at,
        };
        store.create_token(&tok("a", 200)).await.unwrap();
        store.create_token(&tok("old", 50)).await.unwrap();

        let rec = store.redeem_token("a", &agent("ag-1", "web")).await.unwrap().unwrap();
        assert_eq!(rec.name, "web");
        assert_eq!(rec.labels.get("env").map(String::as_str), Some("dev"));
        assert_eq!(store.redeem_token("a", &agent("ag-2", "web")).await.unwrap().unwrap_err(), RedeemError::Used);
        assert_eq!(store.redeem_token("old", &agent("ag-3", "web")).await.unwrap().unwrap_err(), RedeemError::Expired);
        assert_eq!(store.redeem_token("zzz", &agent("ag-4", "web")).await.unwrap().unwrap_err(), RedeemError::Unknown);

        // A second host with the same hostname gets a distinct name.
        store.create_token(&tok("b", 200)).await.unwrap();
        let rec2 = store.redeem_token("b", &agent("ag-abcdef99", "web")).await.unwrap().unwrap();
        assert_eq!(rec2.name, "web-abcdef");
        assert_eq!(store.agents().await.unwrap().len(), 2);
        assert!(store.revoke_agent("ag-1").await.unwrap());
        assert_eq!(store.agents().await.unwrap().len(), 1);
        assert!(store.agent("ag-1").await.unwrap().unwrap().revoked);

        // Reopening keeps data and does not re-run migrations.
        drop(store);
        let store = SqliteStore::open(&dir.path().join("db")).await.unwrap();
        assert_eq!(store.agents().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn concurrent_redemption_succeeds_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(SqliteStore::open(&dir.path().join("db")).await.unwrap());
        store
            .create_token(&NewToken {
                hash: "t".into(),
                labels: Labels::new(),
                name: None,
                created_at: 0,
                expires_at: 1000,
            })
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for i in 0..8 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move { s.redeem_token("t", &agent(&format!("ag-{i}"), "h")).await }));
        }
        let mut ok = 0;
        for t in tasks {
            if matches!(t.await.unwrap(), Ok(Ok(_))) {
                ok += 1;
            }
        }
        assert_eq!(ok, 1);
    }

    #[tokio::test]
    async fn users_policies_and_grants_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).await.unwrap();
        let mut u = UserRecord {
            name: "bob".into(),
            groups: vec!["ops".into()],
            keys: vec!["ssh-ed25519 AAAA bob".into()],
            principals: vec![],
            disabled: false,
            created_at: 5,
            idp_subject: None,
        };
        store.put_user(&u).await.unwrap();
        u.disabled = true;
        store.put_user(&u).await.unwrap();
        assert_eq!(store.users().await.unwrap(), vec![u]);
        assert!(store.delete_user("bob").await.unwrap());
        assert!(!store.delete_user("bob").await.unwrap());

        assert_eq!(store.put_policy("p", "a", "p.toml", 1, "me").await.unwrap(), 1);
        assert_eq!(store.put_policy("p", "b", "p.toml", 2, "me").await.unwrap(), 2);
        assert_eq!(store.put_policy("q", "c", "q.toml", 2, "me").await.unwrap(), 1);
        let current: Vec<(String, i64)> =
            store.policies().await.unwrap().into_iter().map(|p| (p.source, p.version)).collect();
        assert_eq!(current, vec![("b".into(), 2), ("c".into(), 1)]);
        store.put_policy("q", "", "", 3, "me").await.unwrap();
        assert_eq!(store.policies().await.unwrap().len(), 1);
        assert_eq!(store.policy_history("q").await.unwrap().len(), 2);

        let g = GrantRecord {
            id: "gr-1".into(),
            user: "bob".into(),
            policy: "p".into(),
            reason: "oncall".into(),
            created_at: 10,
            created_by: "me".into(),
            expires_at: 20,
            revoked_at: None,
            revoked_by: None,
        };
        store.put_grant(&g).await.unwrap();
        assert!(g.active_at(19) && !g.active_at(20));
        assert!(store.revoke_grant("gr-1", 15, "me").await.unwrap());
        assert!(!store.revoke_grant("gr-1", 16, "me").await.unwrap());
        let back = store.grants().await.unwrap();
        assert_eq!(back[0].revoked_at, Some(15));
        assert!(!back[0].active_at(16));
    }

    #[tokio::test]
    async fn the_audit_anchor_is_kept_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("postern.db");
        let store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(store.audit_anchor().await.unwrap(), None);
        store.set_audit_anchor(&AuditAnchor { seq: 101, hash: "ab".into() }).await.unwrap();
        store.set_audit_anchor(&AuditAnchor { seq: 202, hash: "cd".into() }).await.unwrap();
        drop(store);
        let store = SqliteStore::open(&path).await.unwrap();
        assert_eq!(store.audit_anchor().await.unwrap(), Some(AuditAnchor { seq: 202, hash: "cd".into() }));
    }

    fn session(id: &str, user: &str, kind: &str, started_ms: i64) -> SessionRecord {
        SessionRecord {
            id: id.into(),
            user: user.into(),
            source: Some("127.0.0.1".into()),
            instance: "web-01".into(),
            agent_id: "ag-1".into(),
            kind: kind.into(),
            door: "ssh".into(),
            command: Some("uname -a".into()),
            destination: None,
            started_ms,
            ended_at: None,
            end_reason: None,
            exit_code: None,
            bytes_in: 0,
            bytes_out: 0,
            logged: true,
            unlogged_reason: None,
            recording: Some("/data/recordings/a.cast".into()),
            gateway: None,
        }
    }

    #[tokio::test]
    async fn session_history_filters_pages_and_prunes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("postern.db");
        let store = SqliteStore::open(&path).await.unwrap();
        let mut a = session("aa01", "alice", "exec", 100_000);
        store.insert_session(&a).await.unwrap();
        // A second insert with the same id changes nothing.
        store.insert_session(&session("aa01", "mallory", "shell", 1_000)).await.unwrap();
        store.insert_session(&session("aa02", "bob", "shell", 200_000)).await.unwrap();
        store.insert_session(&session("ab03", "alice", "port-forward", 200_000)).await.unwrap();
        let ending = SessionEnding {
            id: "aa01".into(),
            ended_at: 150,
            end_reason: Some("idle-timeout".into()),
            exit_code: Some(3),
            bytes_in: 5,
            bytes_out: u64::MAX,
            logged: Some(false),
            unlogged_reason: Some("recording failed".into()),
        };
        assert!(store.end_session(&ending).await.unwrap());
        assert!(!store.end_session(&SessionEnding { id: "zz".into(), ..ending.clone() }).await.unwrap());
        drop(store);
        let store = SqliteStore::open(&path).await.unwrap();

        let ids = |rows: Vec<SessionRecord>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
        let q = SessionQuery { limit: 50, ..SessionQuery::default() };
        // Newest first; same second: by id, descending.
        assert_eq!(ids(store.sessions(&q).await.unwrap()), ["ab03", "aa02", "aa01"]);
        let back = store.sessions(&SessionQuery { user: Some("alice".into()), ..q.clone() }).await.unwrap();
        assert_eq!(ids(back.clone()), ["ab03", "aa01"]);
        (a.ended_at, a.end_reason, a.exit_code, a.bytes_in, a.bytes_out) =
            (Some(150), Some("idle-timeout".into()), Some(3), 5, i64::MAX as u64);
        (a.logged, a.unlogged_reason) = (false, Some("recording failed".into()));
        assert_eq!(back[1], a);
        let kind = |k: &str| SessionQuery { kind: Some(k.into()), ..q.clone() };
        assert_eq!(ids(store.sessions(&kind("port-forward")).await.unwrap()), ["ab03"]);
        assert_eq!(ids(store.sessions(&kind("ssh")).await.unwrap()).len(), 3);
        let inst = |i: &str| SessionQuery { instance: Some(i.into()), ..q.clone() };
        assert_eq!(ids(store.sessions(&inst("ag-1")).await.unwrap()).len(), 3);
        assert!(store.sessions(&inst("db")).await.unwrap().is_empty());
        let window = SessionQuery { since: Some(100_000), until: Some(200_000), ..q.clone() };
        assert_eq!(ids(store.sessions(&window).await.unwrap()), ["aa01"]);
        // Pages: two, then the rest after the last row shown.
        let first = store.sessions(&SessionQuery { limit: 2, ..q.clone() }).await.unwrap();
        assert_eq!(ids(first.clone()), ["ab03", "aa02"]);
        let last = first.last().unwrap();
        let next = SessionQuery { limit: 2, before: Some((last.started_ms, last.id.clone())), ..q.clone() };
        assert_eq!(ids(store.sessions(&next).await.unwrap()), ["aa01"]);

        assert_eq!(ids(store.sessions_by_prefix("aa", 10).await.unwrap()), ["aa02", "aa01"]);
        assert_eq!(ids(store.sessions_by_prefix("ab03", 10).await.unwrap()), ["ab03"]);
        assert!(store.sessions_by_prefix("ac", 10).await.unwrap().is_empty());

        // Retention by age (aa01 ended at 150) and by count (the newest row stays).
        assert_eq!(store.prune_sessions(Some(160), None).await.unwrap(), 1);
        assert_eq!(store.prune_sessions(None, Some(5)).await.unwrap(), 0);
        store.insert_session(&session("ac04", "carol", "sftp", 300_000)).await.unwrap();
        assert_eq!(store.prune_sessions(None, Some(1)).await.unwrap(), 2);
        assert_eq!(ids(store.sessions(&q).await.unwrap()), ["ac04"]);
    }
}
