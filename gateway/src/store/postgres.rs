//! The scale-out store: PostgreSQL through sqlx, with numbered migrations. The same tables,
//! columns and queries as `sqlite.rs` (kept side by side: `$n` placeholders instead of `?`,
//! BIGINT for every integer column, `"user"` quoted), plus what several gateways on one
//! database need: migrations under an advisory lock, and a table lock around the one
//! read-then-write (the next policy version). Single-use tokens and grant revocation are
//! conditional UPDATEs, which PostgreSQL re-checks after a concurrent writer commits.
//! The conformance suite (tests/tests/store.rs) runs against both backends.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use postern_core::store::{
    AgentLocation, AgentRecord, AuditAnchor, GatewayAnchor, GrantRecord, Labels, LiveSessionRecord, NewAgent, NewToken,
    PolicyVersion, RedeemError, SessionEnding, SessionQuery, SessionRecord, Store, StoreError, TERMINATE_PENDING,
    TOKEN_REVOKED_BY, TerminateRequest, TokenRecord, UserRecord,
};
use postern_core::store::{CertificateRecord, LoginUser, PortableStore as _};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Row};

use super::sqlite::{
    AGENT_COLUMNS, SESSION_COLUMNS, SPENT_TOKEN_GRACE, TERMINATE_REQUEST_KEPT, bytes_sql, cert_sql, db, labels_json,
    live_sessions_json, to_json,
};

/// Schema migrations, applied in order; `schema_version` records how far a database got.
/// The same tables as SQLite's migrations at the same numbers.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE tokens (
    hash        TEXT PRIMARY KEY,
    labels      TEXT NOT NULL,
    name        TEXT,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    used_at     BIGINT,
    used_by     TEXT
);
CREATE TABLE agents (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    labels        TEXT NOT NULL,
    hostname      TEXT NOT NULL,
    platform      TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    enrolled_at   BIGINT NOT NULL,
    last_seen     BIGINT,
    revoked       BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX agents_name ON agents(name);
"#,
    r#"
CREATE TABLE users (
    name        TEXT PRIMARY KEY,
    groups      TEXT NOT NULL,
    keys        TEXT NOT NULL,
    principals  TEXT NOT NULL,
    disabled    BIGINT NOT NULL DEFAULT 0,
    created_at  BIGINT NOT NULL
);
CREATE TABLE policies (
    name        TEXT NOT NULL,
    version     BIGINT NOT NULL,
    source      TEXT NOT NULL,
    file        TEXT NOT NULL,
    applied_at  BIGINT NOT NULL,
    applied_by  TEXT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE grants (
    id          TEXT PRIMARY KEY,
    "user"      TEXT NOT NULL,
    policy      TEXT NOT NULL,
    reason      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    created_by  TEXT NOT NULL,
    expires_at  BIGINT NOT NULL,
    revoked_at  BIGINT,
    revoked_by  TEXT
);
"#,
    r#"
CREATE TABLE audit_anchor (
    id    BIGINT PRIMARY KEY CHECK (id = 1),
    seq   BIGINT NOT NULL,
    hash  TEXT NOT NULL
);
"#,
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
    logged          BIGINT NOT NULL,
    unlogged_reason TEXT,
    recording       TEXT
);
CREATE INDEX session_history_started ON session_history(started_ms, id);
CREATE INDEX session_history_user ON session_history(user_name, started_ms);
"#,
    r#"
CREATE TABLE access_generation (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    generation  BIGINT NOT NULL
);
INSERT INTO access_generation (id, generation) VALUES (1, 0);
CREATE FUNCTION bump_access_generation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE access_generation SET generation = generation + 1 WHERE id = 1;
    RETURN NULL;
END;
$$;
CREATE TRIGGER access_users AFTER INSERT OR UPDATE OR DELETE ON users
    FOR EACH STATEMENT EXECUTE FUNCTION bump_access_generation();
CREATE TRIGGER access_policies AFTER INSERT OR UPDATE OR DELETE ON policies
    FOR EACH STATEMENT EXECUTE FUNCTION bump_access_generation();
CREATE TRIGGER access_grants AFTER INSERT OR UPDATE OR DELETE ON grants
    FOR EACH STATEMENT EXECUTE FUNCTION bump_access_generation();
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
    logged      BIGINT NOT NULL,
    started_at  BIGINT NOT NULL,
    bytes_in    BIGINT NOT NULL,
    bytes_out   BIGINT NOT NULL,
    lease_until BIGINT NOT NULL
);
CREATE INDEX live_sessions_gateway ON live_sessions(gateway_id);
CREATE TABLE terminate_requests (
    id          TEXT PRIMARY KEY,
    session_id  TEXT NOT NULL,
    gateway_id  TEXT NOT NULL,
    actor       TEXT NOT NULL,
    asked_by    TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    state       TEXT NOT NULL
);
CREATE INDEX terminate_requests_gateway ON terminate_requests(gateway_id, state);
CREATE TABLE rdp_tokens_spent (
    token_id    TEXT PRIMARY KEY,
    expires_at  BIGINT NOT NULL
);
"#,
    r#"
CREATE TABLE cluster_keys (
    name        TEXT PRIMARY KEY,
    sealed      BYTEA NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE TABLE gateways (
    id          TEXT PRIMARY KEY,
    address     TEXT NOT NULL,
    lease_until BIGINT NOT NULL
);
"#,
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
    mfa             BIGINT NOT NULL,
    revoked_at      BIGINT
);
CREATE INDEX certificates_user ON certificates(user_name, expires_at);
CREATE TRIGGER access_certificates AFTER UPDATE ON certificates
    FOR EACH STATEMENT EXECUTE FUNCTION bump_access_generation();
"#,
];

/// How long connecting (or waiting for a pooled connection) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The advisory lock key that serialises migrations between gateways starting together.
const MIGRATION_LOCK: i64 = 0x706f_7374_6572_6e01;

/// Where a `[store] url` points, without its password: for error messages and logs.
pub fn describe(url: &str) -> String {
    match PgConnectOptions::from_str(url) {
        Ok(o) => format!("postgres://{}:{}/{}", o.get_host(), o.get_port(), o.get_database().unwrap_or("")),
        Err(_) => "postgres://(unparsable url)".into(),
    }
}

#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connect (bounded: a database that does not answer within 10 s is an error) and bring
    /// the schema up to date.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let opts = PgConnectOptions::from_str(url).map_err(db)?;
        // One connection first, for its own error ("Connection refused", a failed
        // password): the pool would only say that it timed out.
        // It also brings the schema up to date before any pooled connection exists.
        let mut first = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&opts))
            .await
            .map_err(|_| db(sqlx::Error::PoolTimedOut))?
            .map_err(db)?;
        migrate(&mut first).await?;
        first.close().await.map_err(db)?;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_with(opts)
            .await
            .map_err(db)?;
        Ok(Self { pool })
    }
}

/// The schema version of the database at `url`, and the one this binary migrates to, read
/// without changing anything (`postern doctor`); bounded like [`PgStore::connect`].
pub async fn probe(url: &str) -> Result<(i64, usize), StoreError> {
    let opts = PgConnectOptions::from_str(url).map_err(db)?;
    let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&opts))
        .await
        .map_err(|_| db(sqlx::Error::PoolTimedOut))?
        .map_err(db)?;
    // A database no gateway has started on yet has no schema: version 0.
    let exists: bool =
        sqlx::query("SELECT to_regclass('schema_version') IS NOT NULL").fetch_one(&mut conn).await.map_err(db)?.get(0);
    let version: i64 = if exists {
        sqlx::query("SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_version")
            .fetch_one(&mut conn)
            .await
            .map_err(db)?
            .get(0)
    } else {
        0
    };
    conn.close().await.map_err(db)?;
    Ok((version, MIGRATIONS.len()))
}

async fn migrate(conn: &mut PgConnection) -> Result<(), StoreError> {
    // One transaction under an advisory lock: a second gateway starting at the same time
    // waits, then finds the schema current. PostgreSQL's DDL is transactional.
    let mut tx = conn.begin().await.map_err(db)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(MIGRATION_LOCK).execute(&mut *tx).await.map_err(db)?;
    sqlx::query("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    let current: i64 = sqlx::query("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?
        .try_get(0)
        .map_err(db)?;
    for (i, sql) in MIGRATIONS.iter().enumerate() {
        let version = i64::try_from(i).unwrap_or(i64::MAX) + 1;
        if version <= current {
            continue;
        }
        sqlx::raw_sql(sql).execute(&mut *tx).await.map_err(db)?;
        sqlx::query("INSERT INTO schema_version (version) VALUES ($1)")
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
    }
    tx.commit().await.map_err(db)?;
    Ok(())
}

fn row_to_agent(row: &PgRow) -> Result<AgentRecord, StoreError> {
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

fn json_list(row: &PgRow, col: &str) -> Result<Vec<String>, StoreError> {
    let text: String = row.try_get(col).map_err(db)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
}

fn row_to_policy(row: &PgRow) -> Result<PolicyVersion, StoreError> {
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

/// A `gateway_audit_anchors` row's anchor and key.
fn gateway_anchor_of(row: &PgRow) -> Result<GatewayAnchor, StoreError> {
    let seq: i64 = row.try_get("seq").map_err(db)?;
    let seq = u64::try_from(seq).map_err(|_| StoreError::Corrupt(format!("audit anchor seq {seq}")))?;
    Ok(GatewayAnchor {
        anchor: AuditAnchor { seq, hash: row.try_get("hash").map_err(db)? },
        public_key: row.try_get("public_key").map_err(db)?,
    })
}

fn row_to_session(row: &PgRow) -> Result<SessionRecord, StoreError> {
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

fn row_to_live(row: &PgRow) -> Result<LiveSessionRecord, StoreError> {
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

fn row_to_request(row: &PgRow) -> Result<TerminateRequest, StoreError> {
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

fn row_to_location(row: &PgRow) -> Result<AgentLocation, StoreError> {
    Ok(AgentLocation {
        agent_id: row.try_get("agent_id").map_err(db)?,
        gateway_id: row.try_get("gateway_id").map_err(db)?,
        connected_since: row.try_get("connected_since").map_err(db)?,
        lease_expires: row.try_get("lease_expires").map_err(db)?,
    })
}

#[async_trait]
impl Store for PgStore {
    async fn revoke_token(&self, id: &str, now: i64, by: &str) -> Result<bool, StoreError> {
        // Only a full 12-digit id: a shorter prefix could name several tokens.
        if id.len() != 12 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Ok(false);
        }
        let done = sqlx::query(
            "UPDATE tokens SET used_at = $1, used_by = $2 WHERE substr(hash, 1, 12) = $3 AND used_at IS NULL",
        )
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
        // The conditional UPDATE is the single point that makes tokens single-use: a
        // concurrent redeem (from any gateway) waits on the row lock, then re-checks
        // `used_at IS NULL` against the committed row and updates nothing.
        let spent = sqlx::query(
            "UPDATE tokens SET used_at = $1, used_by = $2 WHERE hash = $3 AND used_at IS NULL AND expires_at > $1 \
             RETURNING labels, name",
        )
        .bind(agent.now)
        .bind(&agent.id)
        .bind(hash)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
        let Some(spent) = spent else {
            let why = sqlx::query("SELECT used_at, expires_at FROM tokens WHERE hash = $1")
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
        let taken: i64 = sqlx::query("SELECT COUNT(*) FROM agents WHERE name = $1 AND revoked = 0")
            .bind(&base)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?
            .try_get(0)
            .map_err(db)?;
        let name = if taken == 0 {
            base
        } else {
            format!("{base}-{}", agent.id.trim_start_matches("ag-").chars().take(6).collect::<String>())
        };
        sqlx::query(
            "INSERT INTO agents (id, name, labels, hostname, platform, agent_version, enrolled_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&agent.id)
        .bind(&name)
        .bind(&labels)
        .bind(&agent.hostname)
        .bind(&agent.platform)
        .bind(&agent.agent_version)
        .bind(agent.now)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
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
            "SELECT {AGENT_COLUMNS} FROM agents WHERE revoked = 0 AND (id = $1 OR name = $1) ORDER BY name"
        ))
        .bind(wanted)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(row_to_agent).collect()
    }

    async fn put_user(&self, u: &UserRecord) -> Result<(), StoreError> {
        // One upsert statement: atomic between gateways.
        sqlx::query(
            "INSERT INTO users (name, groups, keys, principals, disabled, created_at) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (name) DO UPDATE SET groups = excluded.groups, keys = excluded.keys, \
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
        let mut tx = self.pool.begin().await.map_err(db)?;
        // Reading the newest version and writing the next is one step: writers (from any
        // gateway) take turns, so no two get the same number. Readers are not blocked.
        sqlx::query("LOCK TABLE policies IN SHARE ROW EXCLUSIVE MODE").execute(&mut *tx).await.map_err(db)?;
        let version: i64 = sqlx::query("SELECT COALESCE(MAX(version), 0) + 1 FROM policies WHERE name = $1")
            .bind(name)
            .fetch_one(&mut *tx)
            .await
            .map_err(db)?
            .try_get(0)
            .map_err(db)?;
        sqlx::query(
            "INSERT INTO policies (name, version, source, file, applied_at, applied_by) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(name)
        .bind(version)
        .bind(source)
        .bind(file)
        .bind(now)
        .bind(by)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(version)
    }

    async fn put_grant(&self, g: &GrantRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO grants (id, \"user\", policy, reason, created_at, created_by, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&g.id)
        .bind(&g.user)
        .bind(&g.policy)
        .bind(&g.reason)
        .bind(g.created_at)
        .bind(&g.created_by)
        .bind(g.expires_at)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn insert_session(&self, r: &SessionRecord) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO session_history ({SESSION_COLUMNS}) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19) \
             ON CONFLICT (id) DO NOTHING"
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
        // Each filter is `($n IS NULL OR ...)`, so the statement is one fixed text.
        let rows = sqlx::query(&format!(
            "SELECT {SESSION_COLUMNS} FROM session_history WHERE \
             ($1::TEXT IS NULL OR user_name = $1) AND ($2::TEXT IS NULL OR instance = $2 OR agent_id = $2) \
             AND ($3::TEXT IS NULL OR kind = $3 OR door = $3) AND ($4::BIGINT IS NULL OR started_ms >= $4) \
             AND ($5::BIGINT IS NULL OR started_ms < $5) \
             AND ($6::BIGINT IS NULL OR started_ms < $6 OR (started_ms = $6 AND id < $7)) \
             ORDER BY started_ms DESC, id DESC LIMIT $8"
        ))
        .bind(&q.user)
        .bind(&q.instance)
        .bind(&q.kind)
        .bind(q.since)
        .bind(q.until)
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
            let r = sqlx::query("DELETE FROM session_history WHERE COALESCE(ended_at, started_ms / 1000) < $1")
                .bind(cutoff)
                .execute(&self.pool)
                .await
                .map_err(db)?;
            deleted += r.rows_affected();
        }
        if let Some(keep) = keep_rows {
            let r = sqlx::query(
                "DELETE FROM session_history WHERE started_ms < \
                 (SELECT started_ms FROM session_history ORDER BY started_ms DESC, id DESC LIMIT 1 OFFSET $1)",
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
        sqlx::query(
            "INSERT INTO live_sessions (id, gateway_id, user_name, source, instance, agent_id, kind, destination, \
             logged, started_at, bytes_in, bytes_out, lease_until) \
             SELECT * FROM json_to_recordset($1::text::json) AS r(id TEXT, gateway_id TEXT, user_name TEXT, \
             source TEXT, instance TEXT, agent_id TEXT, kind TEXT, destination TEXT, logged BIGINT, \
             started_at BIGINT, bytes_in BIGINT, bytes_out BIGINT, lease_until BIGINT) \
             ON CONFLICT (id) DO UPDATE SET bytes_in = EXCLUDED.bytes_in, bytes_out = EXCLUDED.bytes_out, \
             lease_until = EXCLUDED.lease_until",
        )
        .bind(live_sessions_json(sessions))
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn remove_live_sessions(&self, gateway_id: &str, ids: &[String]) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM live_sessions WHERE gateway_id = $1 AND id = ANY($2)")
            .bind(gateway_id)
            .bind(ids)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    async fn live_sessions(&self, now: i64, limit: u32) -> Result<Vec<LiveSessionRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM live_sessions WHERE lease_until > $1 ORDER BY started_at DESC, id DESC LIMIT $2",
        )
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.iter().map(row_to_live).collect()
    }

    async fn move_terminate_request(&self, id: &str, from: &str, to: &str, now: i64) -> Result<bool, StoreError> {
        // A conditional UPDATE: PostgreSQL re-checks `state` after a concurrent writer
        // commits, so of a claim and a withdrawal racing, one wins.
        let r = sqlx::query(
            "UPDATE terminate_requests SET state = $1 WHERE id = $2 AND state = $3 \
             AND (state <> 'pending' OR $1 <> 'claimed' OR expires_at > $4)",
        )
        .bind(to)
        .bind(id)
        .bind(from)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected() > 0)
    }

    async fn spend_rdp_token(&self, token_id: &str, expires_at: i64) -> Result<bool, StoreError> {
        // The primary key decides: of concurrent inserts, one commits a row, the others
        // wait for it and then insert nothing.
        let r =
            sqlx::query("INSERT INTO rdp_tokens_spent (token_id, expires_at) VALUES ($1, $2) ON CONFLICT DO NOTHING")
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
        let (ids, since): (Vec<&str>, Vec<i64>) = agents.iter().map(|(id, s)| (id.as_str(), *s)).unzip();
        // One statement for all, the lists bound as two arrays.
        let r = sqlx::query(
            "INSERT INTO agent_locations (agent_id, gateway_id, connected_since, lease_expires) \
             SELECT a.id, $1, a.since, $2 FROM UNNEST($3::TEXT[], $4::BIGINT[]) AS a(id, since) \
             ON CONFLICT (agent_id) DO UPDATE SET lease_expires = EXCLUDED.lease_expires \
             WHERE agent_locations.gateway_id = EXCLUDED.gateway_id",
        )
        .bind(gateway_id)
        .bind(lease_expires)
        .bind(ids)
        .bind(since)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected())
    }
}

super::sqlite::sign_in_store!(PgStore, PgRow);
super::sqlite::portable_store!(PgStore);
