//! The store conformance suite: one set of checks, written once against the `Store` trait,
//! run against the embedded SQLite store and a real PostgreSQL server; two store instances on
//! one database (two gateways) racing for the same token, policy and grant; and a real
//! gateway on PostgreSQL serving an agent and `ssh`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postern_e2e::*;
use postern_gateway::store::postgres::PgStore;
use postern_gateway::store::sqlite::SqliteStore;
use postern_gateway::store::*;

fn new_agent(id: &str, host: &str, now: i64) -> NewAgent {
    NewAgent { id: id.into(), hostname: host.into(), platform: "linux".into(), agent_version: "1".into(), now }
}

fn token(hash: &str, expires_at: i64) -> NewToken {
    let mut labels = Labels::new();
    labels.insert("env".into(), "dev".into());
    NewToken { hash: hash.into(), labels, name: None, created_at: 0, expires_at }
}

async fn tokens_and_agents(s: &dyn Store) {
    s.create_token(&token("aaaaaaaaaaaa01", 200)).await.unwrap();
    s.create_token(&token("bbbbbbbbbbbb01", 50)).await.unwrap();
    s.create_token(&token("cccccccccccc01", 200)).await.unwrap();
    let rec = s.redeem_token("aaaaaaaaaaaa01", &new_agent("ag-1", "web", 100)).await.unwrap().unwrap();
    assert_eq!((rec.name.as_str(), rec.labels.get("env").map(String::as_str)), ("web", Some("dev")));
    let again = s.redeem_token("aaaaaaaaaaaa01", &new_agent("ag-2", "web", 100)).await.unwrap();
    assert_eq!(again.unwrap_err(), RedeemError::Used);
    let expired = s.redeem_token("bbbbbbbbbbbb01", &new_agent("ag-3", "web", 100)).await.unwrap();
    assert_eq!(expired.unwrap_err(), RedeemError::Expired);
    assert_eq!(s.redeem_token("zz", &new_agent("ag-4", "web", 100)).await.unwrap().unwrap_err(), RedeemError::Unknown);
    // Revoked: spent without enrolling; only a whole 12-digit id; only once.
    assert!(!s.revoke_token("cccccc", 110, "admin").await.unwrap());
    assert!(s.revoke_token("CCCCCCCCCCCC", 110, "admin").await.unwrap());
    assert!(!s.revoke_token("cccccccccccc", 111, "admin").await.unwrap());
    let revoked = s.redeem_token("cccccccccccc01", &new_agent("ag-5", "web", 120)).await.unwrap();
    assert_eq!(revoked.unwrap_err(), RedeemError::Used);
    let states: Vec<(String, &str)> = s.tokens().await.unwrap().iter().map(|t| (t.id.clone(), t.state(120))).collect();
    assert_eq!(states.len(), 3);
    assert!(states.contains(&("aaaaaaaaaaaa".into(), "used")), "{states:?}");
    assert!(states.contains(&("bbbbbbbbbbbb".into(), "expired")), "{states:?}");
    assert!(states.contains(&("cccccccccccc".into(), "revoked")), "{states:?}");

    // A second host with the same hostname gets a distinct name.
    s.create_token(&token("dddddddddddd01", 200)).await.unwrap();
    let rec2 = s.redeem_token("dddddddddddd01", &new_agent("ag-abcdef99", "web", 100)).await.unwrap().unwrap();
    assert_eq!(rec2.name, "web-abcdef");
    s.agent_seen("ag-1", Some("web.example"), None, Some("2"), 130).await.unwrap();
    let seen = s.agent("ag-1").await.unwrap().unwrap();
    assert_eq!(
        (seen.hostname.as_str(), seen.platform.as_str(), seen.agent_version.as_str()),
        ("web.example", "linux", "2")
    );
    assert_eq!(seen.last_seen, Some(130));
    assert_eq!(s.find_agents("web").await.unwrap().len(), 1);
    assert_eq!(s.find_agents("ag-abcdef99").await.unwrap()[0].name, "web-abcdef");
    s.insert_agents(&[("ag-s1".into(), "sim-1".into()), ("ag-s2".into(), "sim-2".into())], &Labels::new(), 140)
        .await
        .unwrap();
    assert_eq!(s.agents().await.unwrap().len(), 4);
    assert!(s.revoke_agent("ag-1").await.unwrap());
    assert!(!s.revoke_agent("ag-1").await.unwrap());
    assert!(s.agent("ag-1").await.unwrap().unwrap().revoked);
    assert!(s.find_agents("web").await.unwrap().is_empty());
    assert_eq!(s.agents().await.unwrap().len(), 3);
    assert!(s.agent("ag-none").await.unwrap().is_none());
}

async fn users_policies_grants_anchor(s: &dyn Store) {
    let mut u = UserRecord {
        name: "bob".into(),
        groups: vec!["ops".into()],
        keys: vec!["ssh-ed25519 AAAA bob".into()],
        principals: vec!["bob@corp".into()],
        disabled: false,
        created_at: 5,
        idp_subject: None,
    };
    s.put_user(&u).await.unwrap();
    u.disabled = true;
    u.groups.push("dba".into());
    s.put_user(&u).await.unwrap();
    assert_eq!(s.users().await.unwrap(), vec![u]);
    assert!(s.delete_user("bob").await.unwrap());
    assert!(!s.delete_user("bob").await.unwrap());
    assert!(s.users().await.unwrap().is_empty());

    assert_eq!(s.put_policy("p", "a", "p.toml", 1, "me").await.unwrap(), 1);
    assert_eq!(s.put_policy("p", "b", "p.toml", 2, "me").await.unwrap(), 2);
    assert_eq!(s.put_policy("q", "c", "q.toml", 2, "me").await.unwrap(), 1);
    let current: Vec<(String, i64)> = s.policies().await.unwrap().into_iter().map(|p| (p.source, p.version)).collect();
    assert_eq!(current, vec![("b".into(), 2), ("c".into(), 1)]);
    assert_eq!(s.put_policy("q", "", "", 3, "me").await.unwrap(), 2);
    assert_eq!(s.policies().await.unwrap().len(), 1);
    let history = s.policy_history("q").await.unwrap();
    assert_eq!(history.iter().map(|p| (p.version, p.removed)).collect::<Vec<_>>(), [(1, false), (2, true)]);

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
    s.put_grant(&g).await.unwrap();
    assert_eq!(s.grants().await.unwrap(), vec![g.clone()]);
    assert!(s.revoke_grant("gr-1", 15, "me").await.unwrap());
    assert!(!s.revoke_grant("gr-1", 16, "you").await.unwrap());
    assert!(!s.revoke_grant("gr-none", 16, "you").await.unwrap());
    let back = s.grants().await.unwrap();
    assert_eq!((back[0].revoked_at, back[0].revoked_by.as_deref()), (Some(15), Some("me")));

    assert_eq!(s.audit_anchor().await.unwrap(), None);
    s.set_audit_anchor(&AuditAnchor { seq: 101, hash: "ab".into() }).await.unwrap();
    s.set_audit_anchor(&AuditAnchor { seq: 202, hash: "cd".into() }).await.unwrap();
    assert_eq!(s.audit_anchor().await.unwrap(), Some(AuditAnchor { seq: 202, hash: "cd".into() }));
}

/// Every write to users, policies or grants moves the access generation (which other
/// gateways poll); reads and unrelated writes do not.
async fn access_generation(s: &dyn Store) {
    let mut last = s.access_generation().await.unwrap();
    let mut moved = |now: i64, what: &str| {
        assert!(now > last, "{what}: the access generation did not move ({last} -> {now})");
        last = now;
    };
    let mut u = UserRecord {
        name: "dave".into(),
        groups: vec![],
        keys: vec!["ssh-ed25519 AAAA dave".into()],
        principals: vec![],
        disabled: false,
        created_at: 5,
        idp_subject: None,
    };
    s.put_user(&u).await.unwrap();
    moved(s.access_generation().await.unwrap(), "user added");
    u.disabled = true;
    s.put_user(&u).await.unwrap();
    moved(s.access_generation().await.unwrap(), "user disabled");
    u.keys.clear();
    s.put_user(&u).await.unwrap();
    moved(s.access_generation().await.unwrap(), "user keys changed");
    assert!(s.delete_user("dave").await.unwrap());
    moved(s.access_generation().await.unwrap(), "user removed");
    s.put_policy("gen", "x", "gen.toml", 1, "me").await.unwrap();
    moved(s.access_generation().await.unwrap(), "policy applied");
    s.put_policy("gen", "", "", 2, "me").await.unwrap();
    moved(s.access_generation().await.unwrap(), "policy removed");
    let g = GrantRecord {
        id: "gr-gen".into(),
        user: "dave".into(),
        policy: "gen".into(),
        reason: "r".into(),
        created_at: 1,
        created_by: "me".into(),
        expires_at: 9,
        revoked_at: None,
        revoked_by: None,
    };
    s.put_grant(&g).await.unwrap();
    moved(s.access_generation().await.unwrap(), "grant created");
    assert!(s.revoke_grant("gr-gen", 2, "me").await.unwrap());
    moved(s.access_generation().await.unwrap(), "grant revoked");
    // Reads and writes that do not change access leave it alone.
    s.users().await.unwrap();
    s.policies().await.unwrap();
    s.grants().await.unwrap();
    s.insert_session(&session("gen01", "dave", "exec", 1)).await.unwrap();
    s.set_audit_anchor(&AuditAnchor { seq: 303, hash: "ef".into() }).await.unwrap();
    assert_eq!(s.access_generation().await.unwrap(), last);
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

async fn session_history(s: &dyn Store) {
    let mut a = session("aa01", "alice", "exec", 100_000);
    s.insert_session(&a).await.unwrap();
    // A second insert with the same id changes nothing.
    s.insert_session(&session("aa01", "mallory", "shell", 1_000)).await.unwrap();
    s.insert_session(&session("aa02", "bob", "shell", 200_000)).await.unwrap();
    s.insert_session(&session("ab03", "alice", "port-forward", 200_000)).await.unwrap();
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
    assert!(s.end_session(&ending).await.unwrap());
    assert!(!s.end_session(&SessionEnding { id: "zz".into(), ..ending.clone() }).await.unwrap());

    let ids = |rows: Vec<SessionRecord>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
    let q = SessionQuery { limit: 50, ..SessionQuery::default() };
    assert_eq!(ids(s.sessions(&q).await.unwrap()), ["ab03", "aa02", "aa01"]);
    let back = s.sessions(&SessionQuery { user: Some("alice".into()), ..q.clone() }).await.unwrap();
    assert_eq!(ids(back.clone()), ["ab03", "aa01"]);
    (a.ended_at, a.end_reason, a.exit_code, a.bytes_in, a.bytes_out) =
        (Some(150), Some("idle-timeout".into()), Some(3), 5, i64::MAX as u64);
    (a.logged, a.unlogged_reason) = (false, Some("recording failed".into()));
    assert_eq!(back[1], a);
    let kind = |k: &str| SessionQuery { kind: Some(k.into()), ..q.clone() };
    assert_eq!(ids(s.sessions(&kind("port-forward")).await.unwrap()), ["ab03"]);
    assert_eq!(ids(s.sessions(&kind("ssh")).await.unwrap()).len(), 3);
    let inst = |i: &str| SessionQuery { instance: Some(i.into()), ..q.clone() };
    assert_eq!(ids(s.sessions(&inst("ag-1")).await.unwrap()).len(), 3);
    assert_eq!(ids(s.sessions(&inst("web-01")).await.unwrap()).len(), 3);
    assert!(s.sessions(&inst("db")).await.unwrap().is_empty());
    let window = SessionQuery { since: Some(100_000), until: Some(200_000), ..q.clone() };
    assert_eq!(ids(s.sessions(&window).await.unwrap()), ["aa01"]);
    let first = s.sessions(&SessionQuery { limit: 2, ..q.clone() }).await.unwrap();
    assert_eq!(ids(first.clone()), ["ab03", "aa02"]);
    let last = first.last().unwrap();
    let next = SessionQuery { limit: 2, before: Some((last.started_ms, last.id.clone())), ..q.clone() };
    assert_eq!(ids(s.sessions(&next).await.unwrap()), ["aa01"]);

    assert_eq!(ids(s.sessions_by_prefix("aa", 10).await.unwrap()), ["aa02", "aa01"]);
    assert_eq!(ids(s.sessions_by_prefix("aa", 1).await.unwrap()), ["aa02"]);
    assert_eq!(ids(s.sessions_by_prefix("ab03", 10).await.unwrap()), ["ab03"]);
    assert!(s.sessions_by_prefix("ac", 10).await.unwrap().is_empty());

    assert_eq!(s.prune_sessions(Some(160), None).await.unwrap(), 1);
    assert_eq!(s.prune_sessions(None, Some(5)).await.unwrap(), 0);
    s.insert_session(&session("ac04", "carol", "sftp", 300_000)).await.unwrap();
    assert_eq!(s.prune_sessions(None, Some(1)).await.unwrap(), 2);
    assert_eq!(ids(s.sessions(&q).await.unwrap()), ["ac04"]);
}

fn live(id: &str, gateway: &str, started_at: i64, lease_until: i64) -> LiveSessionRecord {
    LiveSessionRecord {
        id: id.into(),
        gateway_id: gateway.into(),
        user: "alice".into(),
        source: Some("127.0.0.1".into()),
        instance: "web-01".into(),
        agent_id: "ag-1".into(),
        kind: "shell".into(),
        destination: None,
        logged: true,
        started_at,
        bytes_in: 0,
        bytes_out: 0,
        lease_until,
    }
}

/// Live sessions of a cluster, terminate requests between gateways, spent RDP tokens.
async fn cluster_sessions(s: &dyn Store) {
    let ids = |rows: Vec<LiveSessionRecord>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
    // One batched write puts several rows; a renewal moves bytes and lease, nothing else.
    s.put_live_sessions(&[live("ls-1", "gw-a", 100, 115), live("ls-2", "gw-a", 101, 115)]).await.unwrap();
    s.put_live_sessions(&[live("ls-3", "gw-b", 102, 117)]).await.unwrap();
    assert_eq!(ids(s.live_sessions(110, 100).await.unwrap()), ["ls-3", "ls-2", "ls-1"]);
    let mut renewed = live("ls-1", "gw-a", 999, 130);
    renewed.user = "mallory".into();
    (renewed.bytes_in, renewed.bytes_out) = (5, u64::MAX);
    s.put_live_sessions(&[renewed]).await.unwrap();
    let rows = s.live_sessions(110, 100).await.unwrap();
    let one = rows.iter().find(|r| r.id == "ls-1").unwrap();
    assert_eq!(one, &LiveSessionRecord { bytes_in: 5, bytes_out: i64::MAX as u64, ..live("ls-1", "gw-a", 100, 130) });
    assert_eq!(rows.iter().find(|r| r.id == "ls-3").unwrap(), &live("ls-3", "gw-b", 102, 117));
    s.put_live_sessions(&[]).await.unwrap();
    // Expired leases are not listed; the limit holds.
    assert_eq!(ids(s.live_sessions(116, 100).await.unwrap()), ["ls-3", "ls-1"]);
    assert_eq!(ids(s.live_sessions(110, 1).await.unwrap()), ["ls-3"]);
    // A gateway removes only its own rows.
    s.remove_live_sessions("gw-b", &["ls-1".into()]).await.unwrap();
    s.remove_live_sessions("gw-a", &["ls-1".into(), "ls-none".into()]).await.unwrap();
    assert_eq!(ids(s.live_sessions(110, 100).await.unwrap()), ["ls-3", "ls-2"]);
    s.remove_live_sessions("gw-a", &[]).await.unwrap();

    // Terminate requests: pending ones for a gateway until they expire; one move from a state.
    let request = |id: &str, gateway: &str, expires_at: i64| TerminateRequest {
        id: id.into(),
        session_id: "ls-3".into(),
        gateway_id: gateway.into(),
        actor: "local-admin(uid=0)".into(),
        asked_by: "gw-a".into(),
        created_at: 100,
        expires_at,
        state: TERMINATE_PENDING.into(),
    };
    s.add_terminate_request(&request("tr-1", "gw-b", 110)).await.unwrap();
    s.add_terminate_request(&request("tr-2", "gw-b", 120)).await.unwrap();
    s.add_terminate_request(&request("tr-3", "gw-c", 120)).await.unwrap();
    let pending = |now| async move { s.pending_terminate_requests("gw-b", now, 10).await.unwrap() };
    assert_eq!(pending(105).await, [request("tr-1", "gw-b", 110), request("tr-2", "gw-b", 120)]);
    assert_eq!(pending(110).await, [request("tr-2", "gw-b", 120)]);
    // An expired request can no longer be claimed; an unexpired one once.
    assert!(!s.move_terminate_request("tr-1", TERMINATE_PENDING, TERMINATE_CLAIMED, 110).await.unwrap());
    assert!(s.move_terminate_request("tr-2", TERMINATE_PENDING, TERMINATE_CLAIMED, 110).await.unwrap());
    assert!(!s.move_terminate_request("tr-2", TERMINATE_PENDING, TERMINATE_CLAIMED, 110).await.unwrap());
    assert!(!s.move_terminate_request("tr-2", TERMINATE_PENDING, TERMINATE_WITHDRAWN, 110).await.unwrap());
    assert!(s.move_terminate_request("tr-2", TERMINATE_CLAIMED, TERMINATE_DONE, 111).await.unwrap());
    assert_eq!(s.terminate_request("tr-2").await.unwrap().unwrap().state, TERMINATE_DONE);
    assert!(pending(105).await.iter().all(|r| r.id != "tr-2"));
    // Withdrawn: the gateway asked finds nothing to do.
    assert!(s.move_terminate_request("tr-3", TERMINATE_PENDING, TERMINATE_WITHDRAWN, 111).await.unwrap());
    assert!(s.pending_terminate_requests("gw-c", 105, 10).await.unwrap().is_empty());
    assert!(!s.move_terminate_request("tr-3", TERMINATE_PENDING, TERMINATE_CLAIMED, 111).await.unwrap());
    assert!(s.terminate_request("tr-none").await.unwrap().is_none());

    // Spent RDP tokens: once each.
    assert!(s.spend_rdp_token("tok-1", 200).await.unwrap());
    assert!(!s.spend_rdp_token("tok-1", 200).await.unwrap());
    assert!(s.spend_rdp_token("tok-2", 1000).await.unwrap());

    // Pruning: expired leases, requests a minute past expiry, tokens well past theirs.
    assert_eq!(s.prune_cluster_sessions(100).await.unwrap(), 0);
    // At 700: ls-2 and ls-3 (leases out), tr-1, tr-2 and tr-3 (expired over 60 s ago),
    // tok-1 (expired over 300 s ago); tok-2 stays spent.
    assert_eq!(s.prune_cluster_sessions(700).await.unwrap(), 6);
    assert!(s.terminate_request("tr-2").await.unwrap().is_none());
    assert!(!s.spend_rdp_token("tok-2", 1000).await.unwrap());
    assert!(s.spend_rdp_token("tok-1", 200).await.unwrap(), "forgotten after pruning");
}

/// Agent locations: recorded, renewed in one batch, not live once expired, and deleted only
/// by the gateway that holds them.
async fn agent_locations(s: &dyn Store) {
    let at = |agent: &str, gateway: &str, since: i64, lease: i64| AgentLocation {
        agent_id: agent.into(),
        gateway_id: gateway.into(),
        connected_since: since,
        lease_expires: lease,
    };
    let live = |now: i64| async move {
        s.agent_locations(now).await.unwrap().into_iter().map(|l| (l.agent_id, l.gateway_id)).collect::<Vec<_>>()
    };
    let pair = |a: &str, g: &str| (a.to_owned(), g.to_owned());
    assert!(live(0).await.is_empty());
    s.record_agent_location(&at("ag-1", "gw-a", 1_000, 16_000)).await.unwrap();
    s.record_agent_location(&at("ag-2", "gw-a", 1_000, 16_000)).await.unwrap();
    assert_eq!(live(15_999).await, [pair("ag-1", "gw-a"), pair("ag-2", "gw-a")]);
    assert_eq!(s.agent_location("ag-1", 15_999).await.unwrap(), Some(at("ag-1", "gw-a", 1_000, 16_000)));
    // Expired: not live any more (the row is still there for its gateway to renew).
    assert!(live(16_000).await.is_empty());
    assert_eq!(s.agent_location("ag-1", 16_000).await.unwrap(), None);

    // One batch renews A's rows and adds a missing one; connected_since stays.
    let mine = [("ag-1".to_owned(), 1_000), ("ag-2".to_owned(), 1_000), ("ag-3".to_owned(), 5_000)];
    assert_eq!(s.renew_agent_locations("gw-a", &mine, 30_000).await.unwrap(), 3);
    assert_eq!(s.agent_location("ag-1", 20_000).await.unwrap(), Some(at("ag-1", "gw-a", 1_000, 30_000)));
    assert_eq!(s.agent_location("ag-3", 20_000).await.unwrap(), Some(at("ag-3", "gw-a", 5_000, 30_000)));

    // ag-2 moves to B: its row is B's, and A's next renewal (A has not noticed yet) leaves it.
    s.record_agent_location(&at("ag-2", "gw-b", 21_000, 36_000)).await.unwrap();
    assert_eq!(s.renew_agent_locations("gw-a", &mine, 45_000).await.unwrap(), 2);
    assert_eq!(s.agent_location("ag-2", 40_000).await.unwrap(), None, "B's lease, not renewed by A, expired");
    assert_eq!(s.agent_location("ag-2", 35_000).await.unwrap(), Some(at("ag-2", "gw-b", 21_000, 36_000)));

    // A cannot delete B's row; each gateway deletes its own.
    assert!(!s.remove_agent_location("ag-2", "gw-a").await.unwrap());
    assert_eq!(s.agent_location("ag-2", 35_000).await.unwrap().unwrap().gateway_id, "gw-b");
    assert!(s.remove_agent_location("ag-1", "gw-a").await.unwrap());
    assert!(!s.remove_agent_location("ag-1", "gw-a").await.unwrap());
    assert!(s.remove_agent_location("ag-2", "gw-b").await.unwrap());
    assert_eq!(s.renew_agent_locations("gw-a", &[], 50_000).await.unwrap(), 0);
    assert_eq!(live(40_000).await, [pair("ag-3", "gw-a")]);
}

/// Issue 17, audit in a cluster: each gateway's anchor (and checkpoint key) is its own,
/// apart from the others' and from a single gateway's; the history says which gateway
/// carried a session.
async fn gateway_anchors_and_history(s: &dyn Store) {
    let anchor = |seq: u64, hash: &str, key: &str| GatewayAnchor {
        anchor: AuditAnchor { seq, hash: hash.into() },
        public_key: key.into(),
    };
    assert_eq!(s.gateway_audit_anchor("gw-a").await.unwrap(), None);
    let single = s.audit_anchor().await.unwrap();
    s.set_gateway_audit_anchor("gw-a", &anchor(10, "a10", "ka")).await.unwrap();
    s.set_gateway_audit_anchor("gw-b", &anchor(500, "b500", "kb")).await.unwrap();
    s.set_gateway_audit_anchor("gw-a", &anchor(12, "a12", "ka")).await.unwrap();
    assert_eq!(s.gateway_audit_anchor("gw-a").await.unwrap(), Some(anchor(12, "a12", "ka")));
    assert_eq!(s.gateway_audit_anchor("gw-b").await.unwrap(), Some(anchor(500, "b500", "kb")));
    assert_eq!(s.gateway_audit_anchor("gw-c").await.unwrap(), None);
    assert_eq!(
        s.gateway_audit_anchors().await.unwrap(),
        [("gw-a".to_owned(), anchor(12, "a12", "ka")), ("gw-b".to_owned(), anchor(500, "b500", "kb"))]
    );
    // The single gateway's anchor is not one of them.
    assert_eq!(s.audit_anchor().await.unwrap(), single);

    let mut at_b = session("cc01", "alice", "exec", 400_000);
    at_b.gateway = Some("gw-b".into());
    s.insert_session(&at_b).await.unwrap();
    assert_eq!(s.sessions_by_prefix("cc01", 1).await.unwrap(), [at_b]);
}

async fn conformance(s: &dyn Store) {
    tokens_and_agents(s).await;
    users_policies_grants_anchor(s).await;
    session_history(s).await;
    access_generation(s).await;
    cluster_keys(s).await;
    gateway_leases(s).await;
    cluster_sessions(s).await;
    agent_locations(s).await;
    gateway_anchors_and_history(s).await;
    sign_in_users_and_certificates(s).await;
}

/// Users from the identity provider and the certificates the gateway signs (issue 18).
async fn sign_in_users_and_certificates(s: &dyn Store) {
    use postern_gateway::store::{CertificateRecord, LoginUser};
    let g = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let before = s.access_generation().await.unwrap();
    // Created on first sign-in, groups synced on the next; the same subject only.
    match s.login_user("sso-ann", "https://idp sub-1", &g(&["eng"]), false, 50).await.unwrap() {
        LoginUser::Ready { user, created } => {
            assert!(created);
            assert_eq!((user.groups, user.idp_subject.as_deref()), (g(&["eng"]), Some("https://idp sub-1")));
        }
        other => panic!("{other:?}"),
    }
    match s.login_user("sso-ann", "https://idp sub-1", &g(&["ops"]), false, 60).await.unwrap() {
        LoginUser::Ready { user, created } => assert!(!created && user.groups == g(&["ops"]) && user.created_at == 50),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.login_user("sso-ann", "https://idp sub-2", &[], true, 70).await.unwrap(), LoginUser::OtherSubject);
    // A user who is not from the IdP is taken over only with link_existing.
    s.put_user(&UserRecord {
        name: "sso-local".into(),
        groups: g(&["x"]),
        keys: vec![],
        principals: vec![],
        disabled: false,
        created_at: 1,
        idp_subject: None,
    })
    .await
    .unwrap();
    assert_eq!(s.login_user("sso-local", "https://idp sub-3", &[], false, 80).await.unwrap(), LoginUser::NotFromIdp);
    let u = s.users().await.unwrap().into_iter().find(|u| u.name == "sso-local").unwrap();
    assert_eq!((u.groups, u.idp_subject), (g(&["x"]), None), "a refused sign-in changed the user");
    assert!(matches!(
        s.login_user("sso-local", "https://idp sub-3", &g(&["eng"]), true, 90).await.unwrap(),
        LoginUser::Ready { created: false, .. }
    ));
    // An administrator's edit keeps the IdP identity.
    let mut u = s.users().await.unwrap().into_iter().find(|u| u.name == "sso-local").unwrap();
    u.disabled = true;
    s.put_user(&u).await.unwrap();
    let u = s.users().await.unwrap().into_iter().find(|u| u.name == "sso-local").unwrap();
    assert_eq!(u.idp_subject.as_deref(), Some("https://idp sub-3"));

    // Certificates: kept until they expire, revoked one or all, pruned after.
    let cert = |serial: u64, user: &str, expires_at: i64| CertificateRecord {
        serial,
        user: user.into(),
        key_fingerprint: "SHA256:x".into(),
        issued_at: 100,
        expires_at,
        origin: "login".into(),
        idp_subject: Some("https://idp sub-1".into()),
        mfa: serial.is_multiple_of(2),
        revoked_at: None,
    };
    s.record_certificate(&cert(u64::MAX, "sso-ann", 1000)).await.unwrap();
    s.record_certificate(&cert(2, "sso-ann", 1000)).await.unwrap();
    s.record_certificate(&cert(3, "sso-ann", 150)).await.unwrap();
    s.record_certificate(&cert(4, "sso-local", 1000)).await.unwrap();
    assert!(s.record_certificate(&cert(4, "sso-ann", 1000)).await.is_err(), "a serial is recorded once");
    let generation = s.access_generation().await.unwrap();
    assert_eq!(s.revoke_certificates("sso-ann", Some(2), 200).await.unwrap(), 1);
    assert_eq!(s.revoke_certificates("sso-ann", Some(2), 201).await.unwrap(), 0, "already revoked");
    assert_eq!(s.revoke_certificates("sso-ann", Some(4), 201).await.unwrap(), 0, "another user's serial");
    assert!(s.access_generation().await.unwrap() > generation, "a revocation moves the access generation");
    // All of a user's unexpired ones: the expired one (150) is left alone.
    assert_eq!(s.revoke_certificates("sso-ann", None, 200).await.unwrap(), 1);
    let ann = s.certificates(Some("sso-ann"), 200).await.unwrap();
    let serials: Vec<(u64, bool)> = ann.iter().map(|c| (c.serial, c.revoked_at.is_some())).collect();
    assert_eq!(serials.len(), 2, "{serials:?}");
    assert!(serials.contains(&(u64::MAX, true)) && serials.contains(&(2, true)), "{serials:?}");
    assert_eq!(ann.iter().find(|c| c.serial == 2).unwrap().revoked_at, Some(200));
    assert!(ann.iter().find(|c| c.serial == 2).unwrap().mfa);
    assert_eq!(s.certificates(None, 200).await.unwrap().len(), 3);
    assert_eq!(s.prune_certificates(151).await.unwrap(), 1);
    assert_eq!(s.prune_certificates(151).await.unwrap(), 0);
    assert!(s.access_generation().await.unwrap() > before);
}

/// A gateway is live while its lease runs; it leaves at once when it stops.
async fn gateway_leases(s: &dyn Store) {
    s.gateway_alive("gw-b", "10.0.0.2:4433", 115).await.unwrap();
    s.gateway_alive("gw-a", "10.0.0.1:4433", 110).await.unwrap();
    let pair = |id: &str, a: &str| (id.to_owned(), a.to_owned());
    assert_eq!(s.live_gateways(100).await.unwrap(), vec![pair("gw-a", "10.0.0.1:4433"), pair("gw-b", "10.0.0.2:4433")]);
    assert_eq!(s.live_gateways(110).await.unwrap(), vec![pair("gw-b", "10.0.0.2:4433")], "a lease ends at its time");
    // Renewal moves the lease (and the address).
    s.gateway_alive("gw-a", "10.0.0.9:4433", 130).await.unwrap();
    assert_eq!(s.live_gateways(120).await.unwrap(), vec![pair("gw-a", "10.0.0.9:4433")]);
    s.gateway_left("gw-a", 121).await.unwrap();
    assert!(s.live_gateways(121).await.unwrap().is_empty());
}

/// Cluster keys are added once and never replaced.
async fn cluster_keys(s: &dyn Store) {
    assert!(s.cluster_keys().await.unwrap().is_empty());
    assert!(s.add_cluster_key("rdp-token", b"sealed-1", 1).await.unwrap());
    assert!(s.add_cluster_key("agent-ca", &[0, 159, 255], 2).await.unwrap());
    assert!(!s.add_cluster_key("rdp-token", b"sealed-2", 3).await.unwrap(), "a key is never replaced");
    assert_eq!(
        s.cluster_keys().await.unwrap(),
        vec![("agent-ca".to_owned(), vec![0, 159, 255]), ("rdp-token".to_owned(), b"sealed-1".to_vec())]
    );
}

/// Two stores on one database (two gateways), each racing 30 callers for the same token,
/// the same policy and the same grant.
async fn concurrent_gateways(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    const N: usize = 30;
    let pick = |i: usize| if i.is_multiple_of(2) { a.clone() } else { b.clone() };
    a.create_token(&token("feedfeedfeed01", i64::MAX)).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let s = pick(i);
        tasks.spawn(async move { s.redeem_token("feedfeedfeed01", &new_agent(&format!("ag-race{i}"), "h", 1)).await });
    }
    let results = tasks.join_all().await;
    let won = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
    let used = results.iter().filter(|r| matches!(r, Ok(Err(RedeemError::Used)))).count();
    assert_eq!((won, used), (1, N - 1), "{results:?}");
    assert_eq!(b.agents().await.unwrap().len(), 1);

    // Policy versions: every write gets its own number, none lost.
    let generation = b.access_generation().await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let s = pick(i);
        tasks.spawn(async move { s.put_policy("shared", &format!("v{i}"), "shared.toml", 1, "me").await });
    }
    let mut versions: Vec<i64> = tasks.join_all().await.into_iter().map(|r| r.unwrap()).collect();
    versions.sort_unstable();
    assert_eq!(versions, (1..=N as i64).collect::<Vec<_>>());
    assert_eq!(a.policy_history("shared").await.unwrap().len(), N);
    // Each of those writes moved the access generation both gateways poll: none lost.
    let moved = a.access_generation().await.unwrap() - generation;
    assert!(moved >= N as i64, "{moved}");

    // A grant is revoked once: one revoker is recorded.
    a.put_grant(&GrantRecord {
        id: "gr-race".into(),
        user: "bob".into(),
        policy: "shared".into(),
        reason: "race".into(),
        created_at: 1,
        created_by: "me".into(),
        expires_at: i64::MAX,
        revoked_at: None,
        revoked_by: None,
    })
    .await
    .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let s = pick(i);
        tasks.spawn(async move { s.revoke_grant("gr-race", 2, &format!("admin{i}")).await.unwrap() });
    }
    assert_eq!(tasks.join_all().await.into_iter().filter(|done| *done).count(), 1);

    // User changes: each write is whole (no mix of two writers' fields).
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let s = pick(i);
        tasks.spawn(async move {
            let u = UserRecord {
                name: "carol".into(),
                groups: vec![format!("g{i}")],
                keys: vec![format!("ssh-ed25519 K{i}")],
                principals: vec![],
                disabled: false,
                created_at: 1,
                idp_subject: None,
            };
            s.put_user(&u).await.unwrap()
        });
    }
    tasks.join_all().await;
    let users = b.users().await.unwrap();
    assert_eq!(users.len(), 1);
    let i = users[0].groups[0].trim_start_matches('g');
    assert_eq!(users[0].keys, [format!("ssh-ed25519 K{i}")]);

    // An RDP routing token is spent once across gateways.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let s = pick(i);
        tasks.spawn(async move { s.spend_rdp_token("tok-race", i64::MAX).await.unwrap() });
    }
    assert_eq!(tasks.join_all().await.into_iter().filter(|won| *won).count(), 1);

    // Of a claim by the session's gateway and a withdrawal by the asking one, racing on one
    // terminate request, exactly one wins.
    for round in 0..N {
        let id = format!("tr-race{round}");
        a.add_terminate_request(&TerminateRequest {
            id: id.clone(),
            session_id: "s".into(),
            gateway_id: "gw-b".into(),
            actor: "admin".into(),
            asked_by: "gw-a".into(),
            created_at: 1,
            expires_at: i64::MAX,
            state: TERMINATE_PENDING.into(),
        })
        .await
        .unwrap();
        let (claim, withdraw) = tokio::join!(
            b.move_terminate_request(&id, TERMINATE_PENDING, TERMINATE_CLAIMED, 2),
            a.move_terminate_request(&id, TERMINATE_PENDING, TERMINATE_WITHDRAWN, 2)
        );
        assert!(claim.unwrap() ^ withdraw.unwrap(), "round {round}");
    }
}

#[tokio::test]
async fn sqlite_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("postern.db")).await.unwrap();
    conformance(&store).await;
    // Reopening keeps the data and does not re-run migrations.
    drop(store);
    let store = SqliteStore::open(&dir.path().join("postern.db")).await.unwrap();
    assert_eq!(store.agents().await.unwrap().len(), 3);
}

#[tokio::test]
async fn postgres_store_conforms() {
    let pg = Postgres::start();
    let url = pg.new_database("conformance");
    let store = PgStore::connect(&url).await.unwrap();
    conformance(&store).await;
    drop(store);
    let store = PgStore::connect(&url).await.unwrap();
    assert_eq!(store.agents().await.unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_on_one_sqlite_file_stay_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("postern.db");
    let a = Arc::new(SqliteStore::open(&path).await.unwrap());
    let b = Arc::new(SqliteStore::open(&path).await.unwrap());
    concurrent_gateways(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_on_one_postgres_database_stay_atomic() {
    let pg = Postgres::start();
    let url = pg.new_database("shared");
    // Both start (and migrate) at once.
    let (a, b) = tokio::join!(PgStore::connect(&url), PgStore::connect(&url));
    concurrent_gateways(Arc::new(a.unwrap()), Arc::new(b.unwrap())).await;
}

#[test]
fn a_gateway_whose_store_is_unreachable_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_tcp_port();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[tunnel]\nlisten = \"127.0.0.1:{}\"\n[ssh]\nlisten = \"127.0.0.1:{}\"\n\
             [store]\nurl = \"postgres://postern:s3cret-pw@127.0.0.1:{port}/postern\"\n",
            dir.path().join("data"),
            free_udp_port(),
            free_tcp_port()
        ),
    )
    .unwrap();
    let out = Command::new("timeout")
        .arg("60")
        .arg(bin("postern"))
        .arg("--config")
        .arg(&config)
        .arg("gateway")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("Connection refused"), "the cause is named: {err}");
    assert!(err.contains(&format!("[store] url database postgres://127.0.0.1:{port}/postern")), "{err}");
    assert!(!err.contains("s3cret-pw"), "the password is not shown: {err}");
    // A URL that is not PostgreSQL's is refused when the configuration is read.
    std::fs::write(&config, std::fs::read_to_string(&config).unwrap().replace("postgres://", "mysql://")).unwrap();
    let out = Command::new(bin("postern")).arg("--config").arg(&config).arg("gateway").output().unwrap();
    assert!(text(&out.stderr).contains("[store] url must be a postgres:// URL"), "{}", text(&out.stderr));
}

const POLICY: &str = r#"
name = "ops"
[[statement]]
effect = "allow"
users = ["alice"]
actions = ["exec"]
instances = ["web-*"]
allow_root = true
"#;

#[test]
fn a_gateway_on_postgres_enrolls_an_agent_and_serves_ssh() {
    let pg = Postgres::start();
    let url = pg.new_database("gateway");
    let mut gw = Gateway::start(&format!("[store]\nurl = {url:?}\n"));
    let dir = tempfile::tempdir().unwrap();
    gw.write_known_hosts(&dir.path().join("known_hosts"));
    let _web = Agent::start(&gw, "web-01", vec![], &gw.listen);
    let key = dir.path().join("alice");
    ssh_keygen(&key, "alice");
    let ok = |args: &[&str]| {
        let out = gw.postern(args);
        assert!(out.status.success(), "postern {args:?}: {}", text(&out.stderr));
    };
    ok(&["user", "add", "alice", "--key-file", key.with_extension("pub").to_str().unwrap()]);
    let policy = dir.path().join("ops.toml");
    std::fs::write(&policy, POLICY).unwrap();
    ok(&["policy", "apply", policy.to_str().unwrap()]);
    let ssh = |command: &str| {
        Command::new("timeout")
            .args(["60", "ssh", "-p", &gw.ssh_port.to_string(), "-i"])
            .arg(&key)
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o"])
            .arg(format!("UserKnownHostsFile={}", dir.path().join("known_hosts").display()))
            .args(["alice%web-01@127.0.0.1", command])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = ssh("echo on-postgres");
    assert_eq!(text(&out.stdout), "on-postgres\n", "{}", text(&out.stderr));
    // A policy change takes effect: exec is no longer allowed.
    std::fs::write(&policy, POLICY.replace("actions = [\"exec\"]", "actions = [\"shell\"]")).unwrap();
    ok(&["policy", "apply", policy.to_str().unwrap()]);
    let out = ssh("echo on-postgres");
    assert!(!out.status.success() && text(&out.stdout).is_empty(), "{}", text(&out.stderr));
    // What the gateway stored is in PostgreSQL, not in a SQLite file beside it.
    assert!(!gw.data_dir().join("postern.db").exists());
    let psql = |sql: &str| {
        let out = Command::new("timeout")
            .args(["30", "psql", "-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "postgres", "-d", "gateway"])
            .args(["-Atc", sql])
            .output()
            .unwrap();
        text(&out.stdout).trim().to_owned()
    };
    assert_eq!(psql("SELECT name FROM agents"), "web-01");
    assert_eq!(psql("SELECT MAX(version) FROM policies WHERE name = 'ops'"), "2");
    let history: u32 = psql("SELECT COUNT(*) FROM session_history WHERE user_name = 'alice'").parse().unwrap();
    assert!(history >= 1, "{history}");

    // The offline commands read that database too (given the config): replay finds the
    // session by a prefix of its id, and audit verify checks the log against the anchor
    // kept there (a stop writes a last checkpoint).
    let sid =
        psql("SELECT id FROM session_history WHERE user_name = 'alice' AND kind = 'exec' ORDER BY started_ms LIMIT 1");
    drop(_web);
    gw.stop();
    let offline = |args: &[&str]| {
        Command::new(bin("postern"))
            .arg("--config")
            .arg(gw.dir.path().join("gateway.toml"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = offline(&["replay", &sid[..10], "--speed", "1000", "--idle-limit", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "on-postgres\n");
    assert!(text(&out.stderr).contains("alice"), "{}", text(&out.stderr));
    assert!(!gw.data_dir().join("postern.db").exists(), "replay made a SQLite file");
    let out = offline(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("reaches the last checkpoint the gateway recorded"), "{}", text(&out.stdout));
}

/// Two gateways on one PostgreSQL database: a change made through one (a user disabled, a
/// policy applied) takes effect on the other within 5 seconds — its live sessions end, new
/// sessions are let in — because each gateway polls the store's access generation.
#[test]
fn access_changes_through_one_gateway_reach_another_within_5s() {
    let pg = Postgres::start();
    let url = pg.new_database("cluster");
    let a = Gateway::start(&format!("[store]\nurl = {url:?}\n"));
    let b = Gateway::start(&format!("[store]\nurl = {url:?}\n"));
    let dir = tempfile::tempdir().unwrap();
    a.write_known_hosts(&dir.path().join("known_hosts"));
    let _web = Agent::start(&a, "web-01", vec![], &a.listen);
    let key = dir.path().join("alice");
    ssh_keygen(&key, "alice");
    let ok = |gw: &Gateway, args: &[&str]| {
        let out = gw.postern(args);
        assert!(out.status.success(), "postern {args:?}: {}", text(&out.stderr));
    };
    let policy = dir.path().join("ops.toml");
    let apply = |gw: &Gateway, source: &str| {
        std::fs::write(&policy, source).unwrap();
        ok(gw, &["policy", "apply", policy.to_str().unwrap()]);
    };
    let ssh_at_a = |command: &str| {
        let mut cmd = Command::new("timeout");
        cmd.args(["60", "ssh", "-p", &a.ssh_port.to_string(), "-i"])
            .arg(&key)
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o"])
            .arg(format!("UserKnownHostsFile={}", dir.path().join("known_hosts").display()))
            .args(["alice%web-01@127.0.0.1", command])
            .stdin(Stdio::null());
        cmd
    };
    ok(&a, &["user", "add", "alice", "--key-file", key.with_extension("pub").to_str().unwrap()]);
    apply(&a, POLICY);

    // A user disabled through B: her session through A ends within 5 s.
    let mut child = ssh_at_a("sleep 60").stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_until("alice's session to start at A", Duration::from_secs(30), || {
        a.audit_events().iter().any(|e| e["event"] == "session.start" && e["user"] == "alice")
    });
    ok(&b, &["user", "disable", "alice"]);
    let disabled_at = Instant::now();
    let mut status = None;
    wait_until("alice's session at A to end", Duration::from_secs(15), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let took = disabled_at.elapsed();
    assert!(took < Duration::from_secs(5), "the session at A ended {took:?} after the change at B");
    assert_eq!(status.unwrap().code(), Some(255));
    wait_until("session.terminated and session.end at A", Duration::from_secs(5), || {
        let events = a.audit_events();
        let of = |name: &str| events.iter().any(|e| e["event"] == name && e["user"] == "alice");
        of("session.terminated") && of("session.end")
    });
    let events = a.audit_events();
    let terminated = events.iter().find(|e| e["event"] == "session.terminated").unwrap();
    assert_eq!(terminated["actor"], "policy");
    assert!(terminated["reason"].as_str().unwrap().contains("user alice is disabled"), "{terminated}");
    // And A refuses her from then on.
    assert!(!ssh_at_a("true").output().unwrap().status.success());

    // A policy applied through B lets a new session in at A within 5 s.
    ok(&a, &["user", "enable", "alice"]);
    apply(&a, &POLICY.replace("actions = [\"exec\"]", "actions = [\"shell\"]"));
    assert!(!ssh_at_a("true").output().unwrap().status.success(), "exec is not allowed yet");
    apply(&b, POLICY);
    let applied_at = Instant::now();
    wait_until("the policy applied at B to let alice in at A", Duration::from_secs(15), || {
        text(&ssh_at_a("echo in").output().unwrap().stdout) == "in\n"
    });
    let took = applied_at.elapsed();
    assert!(took < Duration::from_secs(5), "A let alice in {took:?} after the change at B");
}

#[tokio::test]
async fn the_store_is_reached_over_tls_with_the_server_certificate_verified() {
    let pg = Postgres::start();
    let url = pg.new_database("tls");
    let ca = pg.require_tls();
    // verify-full against the database's CA: connected (over TLS: the server refuses anything
    // else now), and it works.
    let verified = format!("{url}?sslmode=verify-full&sslrootcert={}", ca.display());
    let store = PgStore::connect(&verified).await.unwrap();
    store.create_token(&token("feedfeed0001", i64::MAX)).await.unwrap();
    assert_eq!(store.tokens().await.unwrap().len(), 1);
    drop(store);
    // Without TLS the server refuses.
    let plain = PgStore::connect(&format!("{url}?sslmode=disable")).await.unwrap_err();
    assert!(format!("{plain}").contains("no encryption"), "{plain}");
    // Another CA: the server's certificate is not trusted, nothing is sent.
    let other = tempfile::tempdir().unwrap();
    sh(&format!(
        "cd {} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=other \
         -keyout o.key -out o.crt 2>/dev/null",
        other.path().display()
    ));
    let wrong = format!("{url}?sslmode=verify-full&sslrootcert={}", other.path().join("o.crt").display());
    let err = PgStore::connect(&wrong).await.unwrap_err();
    assert!(format!("{err}").to_lowercase().contains("certificate"), "{err}");

    // A real gateway with that URL starts and serves.
    let gw = Gateway::start(&format!("[store]\nurl = {verified:?}\n"));
    assert!(gw.instances().is_empty());
    assert!(!gw.data_dir().join("postern.db").exists());
}
