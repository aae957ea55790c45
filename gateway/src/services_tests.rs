//! Unit tests of the services, built alone (no doors, no agents): an SQLite store in a
//! temporary directory, a temporary audit log, the access list, the session table, and
//! the services on top of them, wired as `app::start` wires them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::sync::Arc;
use std::time::Duration;

use postern_core::{Action, DENIED, Identity};
use postern_tunnel::CancellationToken;
use postern_tunnel::server::AgentRegistry;
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::access::{AccessList, Authorizer};
use crate::audit::AuditLog;
use crate::audit::events::{AdminSessionEnd, AdminSessionStart, Event, SessionEnd, SessionStart};
use crate::broker::Broker;
use crate::manage::{Manage, ManageRequest};
use crate::sessions::SessionTable;
use crate::store::sqlite::SqliteStore;
use crate::store::{Labels, Store};

const ALICE_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHNV6u6wpsWtZv2s0S8Gb3qH8lO1xDZ0m2qgDPbOwD3r alice@laptop";

struct Kit {
    dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    sessions: Arc<SessionTable>,
    authorizer: Arc<Authorizer>,
    broker: Broker,
    manage: Manage,
    access_changed: Arc<Notify>,
    audit: Arc<AuditLog>,
}

impl Kit {
    /// Instances web-01, web-02 and db-01 enrolled (not connected); user alice in the store.
    async fn new() -> Kit {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("postern.db")).await.unwrap());
        let audit = Arc::new(AuditLog::open(&dir.path().join("audit")).unwrap());
        let access = Arc::new(AccessList::default());
        let sessions = Arc::new(SessionTable::default());
        let access_changed = Arc::new(Notify::new());
        let authorizer = Arc::new(Authorizer::new(access.clone(), store.clone(), sessions.clone()));
        let history = crate::history::SessionHistory::start(store.clone(), audit.clone(), Default::default());
        let broker = Broker::new(AgentRegistry::default(), sessions.clone(), audit.clone(), history.clone());
        let manage = Manage::new(
            store.clone(),
            access.clone(),
            audit.clone(),
            sessions.clone(),
            history,
            access_changed.clone(),
        );
        let audit_log = audit.clone();
        let agents = [("ag-1", "web-01"), ("ag-2", "web-02"), ("ag-3", "db-01")];
        let agents: Vec<(String, String)> = agents.iter().map(|(i, n)| (i.to_string(), n.to_string())).collect();
        store.insert_agents(&agents, &Labels::new(), 0).await.unwrap();
        let kit = Kit { dir, store, sessions, authorizer, broker, manage, access_changed, audit: audit_log };
        kit.admin(
            json!({"what": "user_add", "name": "alice", "groups": ["ops"], "keys": [ALICE_KEY], "principals": []}),
        )
        .await
        .unwrap();
        kit
    }

    async fn admin(&self, req: Value) -> Result<Value, crate::manage::ManageError> {
        let req: ManageRequest = serde_json::from_value(req).unwrap();
        crate::manage::run(&self.manage, req, "test-admin").await
    }

    async fn apply(&self, policy: &str) {
        self.admin(json!({"what": "policy_apply", "file": "test.toml", "source": policy})).await.unwrap();
    }

    fn events(&self, name: &str) -> Vec<Value> {
        let mut out = Vec::new();
        for (_, path) in crate::audit::segments(&self.dir.path().join("audit")).unwrap() {
            for line in std::fs::read_to_string(path).unwrap().lines() {
                let v: Value = serde_json::from_str(line).unwrap();
                if v["event"] == name {
                    out.push(v);
                }
            }
        }
        out
    }
}

/// A start event for session `id` (the admin-socket shape: the simplest one).
fn start_event(id: &str) -> Event {
    Event::SessionStart(SessionStart::AdminSocket(AdminSessionStart {
        session_id: id.into(),
        actor: "test".into(),
        target: "web-01".into(),
        agent_id: "ag-1".into(),
        kind: Action::Shell,
        via: "test".into(),
        command: None,
        logged: true,
        reason: String::new(),
    }))
}

/// The end event of session `id`, with the duration the broker measured.
fn end_event(id: &str) -> impl FnOnce(u64) -> Event {
    let id = id.to_owned();
    move |duration_ms| {
        Event::SessionEnd(SessionEnd::AdminSocket(AdminSessionEnd {
            session_id: id,
            user: "root".into(),
            target: "web-01".into(),
            kind: Action::Shell,
            via: "admin-socket".into(),
            exit_code: None,
            bytes_in: 0,
            bytes_out: 0,
            end_reason: None,
            duration_ms,
            logged: false,
        }))
    }
}

fn alice() -> Identity {
    Identity::new("alice", Some("127.0.0.9".parse().unwrap()))
}

const WEB_SHELL: &str = r#"
name = "web"

[[statement]]
effect = "allow"
users = ["alice"]
actions = ["shell", "exec"]
instances = ["web-*"]
max_sessions = 1
"#;

#[tokio::test]
async fn the_authorizer_resolves_the_instance_and_denies_unknown_and_forbidden_alike() {
    let kit = Kit::new().await;
    let denied = kit.authorizer.authorize(&alice(), "web-01", Action::Shell, None, None, None).await.unwrap_err();
    assert_eq!(denied, DENIED, "deny by default");
    kit.apply(WEB_SHELL).await;
    let authz = kit.authorizer.authorize(&alice(), "web-01", Action::Shell, None, None, None).await.unwrap();
    assert_eq!((authz.agent_id(), authz.instance(), authz.user()), ("ag-1", "web-01", "alice"));
    // An authorization holds one of alice's max_sessions = 1 slots until it is dropped.
    drop(authz);
    // By id too, resolved to the same instance.
    let by_id = kit.authorizer.authorize(&alice(), "ag-2", Action::Exec, None, None, None).await.unwrap();
    assert_eq!(by_id.instance(), "web-02");
    for (instance, action) in [("db-01", Action::Shell), ("web-01", Action::PortForward), ("nope", Action::Shell)] {
        let e = kit.authorizer.authorize(&alice(), instance, action, None, None, None).await.unwrap_err();
        assert_eq!(e, DENIED, "{instance} {action}: not allowed and unknown look the same");
    }
    let bob = Identity::new("bob", None);
    assert_eq!(kit.authorizer.authorize(&bob, "web-01", Action::Shell, None, None, None).await.unwrap_err(), DENIED);
}

const LOGINS: &str = r#"
name = "logins"

[[statement]]
effect = "allow"
users = ["alice"]
actions = ["shell", "exec"]
instances = ["web-*"]
run_as = ["deploy", "www", "root"]
"#;

#[tokio::test]
async fn the_login_asked_for_is_one_the_policy_allows_or_the_default() {
    let kit = Kit::new().await;
    kit.apply(LOGINS).await;
    let login = |asked: Option<&'static str>| {
        let authorizer = kit.authorizer.clone();
        async move {
            authorizer
                .authorize(&alice(), "web-01", Action::Shell, None, asked, None)
                .await
                .map(|a| a.run_as().map(str::to_owned))
        }
    };
    // No login, or the person's own identity name: the default login (the first).
    assert_eq!(login(None).await.unwrap().as_deref(), Some("deploy"));
    assert_eq!(login(Some("alice")).await.unwrap().as_deref(), Some("deploy"));
    // Another allowed login: that one.
    assert_eq!(login(Some("www")).await.unwrap().as_deref(), Some("www"));
    // One not allowed: refused, naming those that are.
    let refused = login(Some("postgres")).await.unwrap_err();
    assert!(refused.contains("login \"postgres\" is not allowed for you on web-01"), "{refused}");
    assert!(refused.ends_with("allowed logins: deploy (the default), www"), "{refused}");
    // root is listed, but no statement allows root: not a login to have, nor to list.
    let refused = login(Some("root")).await.unwrap_err();
    assert!(refused.contains("login \"root\" is not allowed") && !refused.contains(", root"), "{refused}");
    kit.apply(&LOGINS.replace("run_as =", "allow_root = true\nrun_as =")).await;
    assert_eq!(login(Some("root")).await.unwrap().as_deref(), Some("root"));
    let refused = login(Some("postgres")).await.unwrap_err();
    assert!(refused.ends_with("allowed logins: deploy (the default), www, root"), "{refused}");
    // A policy with no logins: only the default (the agent's own user) is there to have.
    kit.apply(&LOGINS.replace("run_as = [\"deploy\", \"www\", \"root\"]", "")).await;
    assert_eq!(login(Some("alice")).await.unwrap(), None);
    let refused = login(Some("deploy")).await.unwrap_err();
    assert!(refused.contains("names no logins for you"), "{refused}");
}

#[tokio::test]
async fn a_key_is_bound_to_one_user() {
    let kit = Kit::new().await;
    let e = kit
        .admin(json!({"what": "user_add", "name": "bob", "groups": [], "keys": [ALICE_KEY], "principals": []}))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("already bound to user \"alice\"") && e.contains("SHA256:"), "{e}");
    kit.admin(json!({"what": "user_add", "name": "bob", "groups": [], "keys": [], "principals": []})).await.unwrap();
    let e = kit.admin(json!({"what": "user_key_add", "name": "bob", "key": ALICE_KEY})).await.unwrap_err().to_string();
    assert!(e.contains("already bound to user \"alice\""), "{e}");
    // Adding it to its own user again is not a conflict.
    kit.admin(json!({"what": "user_key_add", "name": "alice", "key": ALICE_KEY})).await.unwrap();
    let users = kit.store.users().await.unwrap();
    assert!(users.iter().find(|u| u.name == "bob").unwrap().keys.is_empty());
}

#[tokio::test]
async fn the_broker_keeps_a_session_on_the_live_table_from_its_start_to_its_end_event() {
    let kit = Kit::new().await;
    kit.apply(WEB_SHELL).await;
    let authz = kit.authorizer.authorize(&alice(), "web-01", Action::Shell, None, None, None).await.unwrap();
    let running = kit.broker.start("s-1", authz.party(alice().source, true), &start_event("s-1"));
    assert_eq!(kit.events("session.start").len(), 1, "the start event is written before the session runs");
    let rows = kit.sessions.rows();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].id.as_str(), rows[0].user.as_str(), rows[0].kind.as_str()), ("s-1", "alice", "shell"));
    running.live().add_in(3);
    // In the history from its start, with the live counts while it runs.
    let all = kit.admin(json!({"what": "sessions", "all": true})).await.unwrap();
    assert_eq!((all[0]["id"].as_str(), &all[0]["active"], &all[0]["bytes_in"]), (Some("s-1"), &json!(true), &json!(3)));
    assert_eq!(all[0]["ended_at"], Value::Null);
    running.finish(end_event("s-1"));
    let end = kit.events("session.end");
    assert_eq!(end.len(), 1);
    assert!(end[0]["duration_ms"].is_u64(), "the broker adds the duration: {}", end[0]);
    assert!(kit.sessions.rows().is_empty(), "off the live table after its end event");
    let all = kit.admin(json!({"what": "sessions", "all": true})).await.unwrap();
    assert_eq!(all.as_array().unwrap().len(), 1);
    assert_eq!(
        (&all[0]["active"], &all[0]["user"], &all[0]["target"]),
        (&json!(false), &json!("alice"), &json!("web-01"))
    );
    assert!(all[0]["ended_at"].is_i64(), "{all}");
    // Filters: another user's sessions, an unknown kind.
    assert_eq!(
        kit.admin(json!({"what": "sessions", "all": true, "filter": {"user": "bob"}})).await.unwrap(),
        json!([])
    );
    let e = kit.admin(json!({"what": "sessions", "all": true, "filter": {"kind": "telnet"}})).await.unwrap_err();
    assert!(e.to_string().contains("unknown kind \"telnet\""), "{e}");
}

#[tokio::test]
async fn max_sessions_counts_the_users_live_sessions() {
    let kit = Kit::new().await;
    kit.apply(WEB_SHELL).await;
    let authz = kit.authorizer.authorize(&alice(), "web-01", Action::Shell, None, None, None).await.unwrap();
    let running = kit.broker.start("s-1", authz.party(None, true), &start_event("s-1"));
    let refused = kit.authorizer.authorize(&alice(), "web-02", Action::Shell, None, None, None).await.unwrap_err();
    assert!(refused.contains("maximum number of concurrent sessions"), "{refused}");
    running.finish(end_event("s-1"));
    assert!(kit.authorizer.authorize(&alice(), "web-02", Action::Shell, None, None, None).await.is_ok());
}

#[tokio::test]
async fn max_sessions_counts_authorizations_not_yet_started() {
    let kit = Kit::new().await;
    kit.apply(WEB_SHELL).await;
    // Authorized but not yet on the live table (its stream is still opening): the slot is
    // already taken, so a simultaneous request cannot pass the check too.
    let first = kit.authorizer.authorize(&alice(), "web-01", Action::Shell, None, None, None).await.unwrap();
    let refused = kit.authorizer.authorize(&alice(), "web-02", Action::Shell, None, None, None).await.unwrap_err();
    assert!(refused.contains("maximum number of concurrent sessions"), "{refused}");
    // An authorization dropped without a session gives its slot back.
    drop(first);
    let second = kit.authorizer.authorize(&alice(), "web-02", Action::Shell, None, None, None).await.unwrap();
    // Starting converts the slot into the live entry (counted once, released at the end).
    let running = kit.broker.start("s-2", second.party(None, true), &start_event("s-2"));
    drop(second);
    assert!(kit.authorizer.authorize(&alice(), "web-01", Action::Shell, None, None, None).await.is_err());
    running.finish(end_event("s-2"));
    assert!(kit.authorizer.authorize(&alice(), "web-01", Action::Shell, None, None, None).await.is_ok());
}

#[tokio::test]
async fn the_enforcer_ends_a_live_session_when_its_user_is_disabled() {
    let kit = Kit::new().await;
    kit.apply(WEB_SHELL).await;
    let authz = kit.authorizer.authorize(&alice(), "web-01", Action::Shell, None, None, None).await.unwrap();
    let running = kit.broker.start("s-1", authz.party(None, true), &start_event("s-1"));
    let shutdown = CancellationToken::new();
    let enforcer = tokio::spawn(crate::enforcer::enforce(
        kit.audit.clone(),
        kit.authorizer.clone(),
        kit.sessions.clone(),
        kit.store.clone(),
        Arc::new(crate::connections::Connections::default()),
        kit.access_changed.clone(),
        shutdown.clone(),
    ));
    // Still allowed: the enforcer's periodic re-check leaves it alone.
    assert!(
        tokio::time::timeout(crate::enforcer::RECHECK_EVERY * 2, running.live().terminated()).await.is_err(),
        "an allowed session must not be ended"
    );
    kit.admin(json!({"what": "user_set_disabled", "name": "alice", "disabled": true})).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), running.live().terminated())
        .await
        .expect("the session ends within 5 s of the user being disabled");
    assert!(running.live().reason().unwrap().contains("alice is disabled"), "{:?}", running.live().reason());
    // session.terminated is written when the session has actually ended, before its end.
    assert!(kit.events("session.terminated").is_empty(), "written before the session ended");
    running.finish(end_event("s-1"));
    let t = kit.events("session.terminated");
    assert_eq!((t.len(), t[0]["actor"].as_str(), t[0]["session_id"].as_str()), (1, Some("policy"), Some("s-1")));
    shutdown.cancel();
    enforcer.await.unwrap();
}

const ONCALL: &str = r#"
name = "oncall"

[[statement]]
effect = "allow"
users = ["nobody-by-default"]
actions = ["shell"]
instances = ["web-*"]
"#;

/// Regression (issue 16): a session ended by its grant's expiry said only "deny by default";
/// it names the grant and when it expired, and the expiry is an audit event of its own.
#[tokio::test]
async fn a_session_ended_by_grant_expiry_names_the_grant_and_the_expiry_is_audited() {
    let kit = Kit::new().await;
    kit.apply(ONCALL).await;
    let grant = kit
        .admin(json!({"what": "grant_create", "user": "alice", "policy": "oncall", "ttl_secs": 2, "reason": "INC-1"}))
        .await
        .unwrap();
    let id = grant["id"].as_str().unwrap().to_owned();
    let authz = kit.authorizer.authorize(&alice(), "web-01", Action::Shell, None, None, None).await.unwrap();
    let running = kit.broker.start("s-1", authz.party(None, true), &start_event("s-1"));
    let shutdown = CancellationToken::new();
    let enforcer = tokio::spawn(crate::enforcer::enforce(
        kit.audit.clone(),
        kit.authorizer.clone(),
        kit.sessions.clone(),
        kit.store.clone(),
        Arc::new(crate::connections::Connections::default()),
        kit.access_changed.clone(),
        shutdown.clone(),
    ));
    tokio::time::timeout(Duration::from_secs(6), running.live().terminated())
        .await
        .expect("the session ends within a few seconds of its grant expiring");
    let reason = running.live().reason().unwrap();
    let expires = postern_core::util::rfc3339(grant["expires_at"].as_i64().unwrap());
    assert!(reason.contains(&format!("grant {id} for policy oncall expired at {expires}")), "{reason}");
    running.finish(end_event("s-1"));
    let expired = kit.events("grant.expired");
    assert_eq!(expired.len(), 1, "one event per expired grant");
    assert_eq!((expired[0]["grant_id"].as_str(), expired[0]["policy"].as_str()), (Some(id.as_str()), Some("oncall")));
    assert_eq!(expired[0]["user"], "alice");
    shutdown.cancel();
    enforcer.await.unwrap();
}
