use super::*;
use postern_core::Action;
use serde_json::json;

const DOC: &str = include_str!("../../../../docs/audit.md");
const ENVELOPE: [&str; 6] = ["v", "seq", "id", "time", "event", "prev"];

/// Event names in docs/audit.md's table.
fn listed() -> Vec<String> {
    let table = DOC.split("## Events").nth(1).unwrap().split("### One example").next().unwrap();
    let mut names = Vec::new();
    for row in table.lines().filter(|l| l.starts_with("| `")) {
        let first = row.split('|').nth(1).unwrap();
        names.extend(first.split('`').skip(1).step_by(2).map(str::to_owned));
    }
    names
}

/// The example lines of docs/audit.md: (event name, fields without the envelope).
fn examples() -> Vec<(String, Map<String, Value>)> {
    let block = DOC.split("### One example of each").nth(1).unwrap();
    let json = block.split("```json\n").nth(1).unwrap().split("```").next().unwrap();
    json.lines()
        .map(|line| {
            let Value::Object(mut m) = serde_json::from_str(line).unwrap() else { panic!("not an object: {line}") };
            let name = m["event"].as_str().unwrap().to_owned();
            for k in ENVELOPE {
                m.remove(k);
            }
            (name, m)
        })
        .collect()
}

/// The types write exactly what the gateway wrote before them: every real example in the
/// docs reads into its type and writes back unchanged.
#[test]
fn every_doc_example_round_trips_through_its_type() {
    let examples = examples();
    assert!(examples.len() > 30);
    for (name, fields) in examples {
        let event = Event::from_name_and_fields(&name, fields.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(event.name(), name);
        assert_eq!(Value::Object(event.fields().unwrap()), Value::Object(fields), "{name}");
    }
}

#[test]
fn every_listed_event_has_a_type_and_every_type_is_listed() {
    let listed = listed();
    for name in &listed {
        assert!(Event::NAMES.contains(&name.as_str()), "{name} is in docs/audit.md but has no variant");
    }
    for name in Event::NAMES {
        assert!(listed.iter().any(|l| l == name), "{name} is not in docs/audit.md's table");
    }
    let mut unique = Event::NAMES.to_vec();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), Event::NAMES.len(), "a name is listed twice");
}

fn check(event: Event, today: Value) {
    assert_eq!(Value::Object(event.fields().unwrap()), today, "{}", event.name());
    // ... and reads back as the same shape (untagged enums pick the first that fits).
    let Value::Object(fields) = today else { panic!("not an object") };
    assert_eq!(Event::from_name_and_fields(event.name(), fields).unwrap(), event);
}

/// Shapes the docs have no example of, against what their call sites wrote with `json!`.
#[test]
fn shapes_without_a_doc_example_serialize_as_before() {
    let s = |v: &str| v.to_owned();
    check(
        Event::SessionStart(SessionStart::AdminSocket(AdminSessionStart {
            session_id: s("sid"),
            actor: s("root"),
            target: s("web-01"),
            agent_id: s("ag-1"),
            kind: Action::Exec,
            via: s("admin-socket"),
            command: Some(s("uptime")),
            logged: false,
            reason: s("admin-socket sessions are not recorded"),
        })),
        json!({"session_id": "sid", "actor": "root", "target": "web-01", "agent_id": "ag-1", "kind": "exec",
               "via": "admin-socket", "command": "uptime", "logged": false,
               "reason": "admin-socket sessions are not recorded"}),
    );
    check(
        Event::SessionEnd(SessionEnd::AdminSocket(AdminSessionEnd {
            session_id: s("sid"),
            user: s("local-admin(uid=0)"),
            target: s("web-01"),
            kind: Action::Shell,
            via: s("admin-socket"),
            exit_code: Some(0),
            bytes_in: 1,
            bytes_out: 2,
            end_reason: None,
            duration_ms: 3,
            logged: false,
        })),
        json!({"session_id": "sid", "user": "local-admin(uid=0)", "target": "web-01", "kind": "shell",
               "via": "admin-socket", "exit_code": 0, "bytes_in": 1, "bytes_out": 2, "end_reason": null,
               "duration_ms": 3, "logged": false}),
    );
    let marker = json!({"user": "alice", "target": "web-01", "agent_id": "ag-1", "kind": "shell",
                        "logged": true, "started_at": 1700000000});
    check(
        Event::SessionEnd(SessionEnd::Crashed(CrashedSessionEnd {
            session_id: s("sid"),
            end_reason: s("gateway-crash"),
            marker: serde_json::from_value(marker).unwrap(),
        })),
        json!({"session_id": "sid", "end_reason": "gateway-crash", "user": "alice", "target": "web-01",
               "agent_id": "ag-1", "kind": "shell", "logged": true, "started_at": 1700000000}),
    );
    // A marker that could not be read adds nothing.
    check(
        Event::SessionEnd(SessionEnd::Crashed(CrashedSessionEnd {
            session_id: s("sid"),
            end_reason: s("gateway-crash"),
            marker: LiveMarker::default(),
        })),
        json!({"session_id": "sid", "end_reason": "gateway-crash"}),
    );
    check(
        Event::SessionDenied(SessionDenied::Ssh(SshDenied {
            user: s("alice"),
            target: s("web-01"),
            action: Action::PortForward,
            source: s("1.2.3.4:5"),
            reason: s("no"),
            destination: Some(s("127.1:6379")),
            door: None,
        })),
        json!({"user": "alice", "target": "web-01", "action": "port-forward", "source": "1.2.3.4:5", "reason": "no",
               "destination": "127.1:6379"}),
    );
    check(
        Event::SessionDenied(SessionDenied::RdpToken(RdpTokenDenied {
            user: s("alice"),
            target: s("win-01"),
            action: Action::Rdp,
            stage: s("token"),
            source: None,
            reason: s("no"),
        })),
        json!({"user": "alice", "target": "win-01", "action": "rdp", "stage": "token", "source": null, "reason": "no"}),
    );
    // The RDP door before the connection request was read, and after it but before the
    // token was redeemed.
    let early = RdpDenied {
        action: Action::Rdp,
        source: s("1.2.3.4:5"),
        reason: s("late"),
        code: s("timeout"),
        token: None,
        request: None,
        count: None,
    };
    check(
        Event::SessionDenied(SessionDenied::Rdp(early.clone())),
        json!({"reason": "late", "code": "timeout", "action": "rdp", "source": "1.2.3.4:5"}),
    );
    // A summary of refusals from one address.
    check(
        Event::SessionDenied(SessionDenied::Rdp(RdpDenied { count: Some(299), ..early.clone() })),
        json!({"reason": "late", "code": "timeout", "action": "rdp", "source": "1.2.3.4:5", "count": 299}),
    );
    check(
        Event::SessionDenied(SessionDenied::Rdp(RdpDenied {
            request: Some(RdpRequest { cookie: None, protocols: vec![] }),
            ..early
        })),
        json!({"reason": "late", "code": "timeout", "action": "rdp", "source": "1.2.3.4:5", "cookie": null, "protocols": []}),
    );
    // RDP through `ssh -L`: mode local, a destination, no token.
    check(
        Event::RdpOpen(RdpOpen {
            session_id: s("sid"),
            user: s("alice"),
            target: s("win-01"),
            source: s("1.2.3.4:5"),
            mode: RdpMode::Local,
            destination: Some(s("rdp")),
            token_id: None,
            request: None,
            logged: false,
            reason: s("e2e"),
            via_gateway: None,
        }),
        json!({"session_id": "sid", "user": "alice", "target": "win-01", "destination": "rdp",
               "source": "1.2.3.4:5", "logged": false, "reason": "e2e", "mode": "local"}),
    );
    // Through another gateway of a cluster: the gateway is named.
    check(
        Event::RdpOpen(RdpOpen {
            session_id: s("sid"),
            user: s("alice"),
            target: s("win-01"),
            source: s("1.2.3.4:5"),
            mode: RdpMode::Local,
            destination: Some(s("rdp")),
            token_id: None,
            request: None,
            logged: false,
            reason: s("e2e"),
            via_gateway: Some(s("gw-b")),
        }),
        json!({"session_id": "sid", "user": "alice", "target": "win-01", "destination": "rdp",
               "source": "1.2.3.4:5", "logged": false, "reason": "e2e", "mode": "local", "via_gateway": "gw-b"}),
    );
    check(
        Event::RdpClose(RdpClose {
            session_id: s("sid"),
            user: s("alice"),
            target: s("win-01"),
            mode: RdpMode::Local,
            destination: Some(s("rdp")),
            bytes_to_target: 1,
            bytes_from_target: 2,
            end_reason: None,
            duration_ms: 3,
            logged: false,
            reason: s("e2e"),
        }),
        json!({"session_id": "sid", "user": "alice", "target": "win-01", "destination": "rdp",
               "bytes_to_target": 1, "bytes_from_target": 2, "end_reason": null, "duration_ms": 3,
               "logged": false, "reason": "e2e", "mode": "local"}),
    );
    let failed = RdpFailed {
        user: s("alice"),
        target: s("win-01"),
        destination: Some(s("rdp")),
        source: None,
        token_id: None,
        error: s("offline"),
    };
    check(
        Event::RdpFailed(failed.clone()),
        json!({"user": "alice", "target": "win-01", "destination": "rdp", "error": "offline"}),
    );
    check(
        Event::RdpFailed(RdpFailed {
            destination: None,
            source: Some(s("1.2.3.4:5")),
            token_id: Some(s("t")),
            ..failed
        }),
        json!({"user": "alice", "target": "win-01", "source": "1.2.3.4:5", "token_id": "t", "error": "offline"}),
    );
    check(
        Event::AgentBulkEnrolled(AgentBulkEnrolled { actor: s("root"), count: 3, prefix: s("sim-") }),
        json!({"actor": "root", "count": 3, "prefix": "sim-"}),
    );
    check(
        Event::PolicyChanged(PolicyChanged {
            actor: s("root"),
            policy: s("p"),
            version: 2,
            change: PolicyChange::Removed { removed: true },
        }),
        json!({"actor": "root", "policy": "p", "version": 2, "removed": true}),
    );
    check(
        Event::AdminAction(AdminAction { actor: s("root"), op: s("instances"), ok: None, args: None, error: None }),
        json!({"actor": "root", "op": "instances"}),
    );
    check(
        Event::AdminAction(AdminAction {
            actor: s("root"),
            op: s("grant_revoke"),
            ok: Some(false),
            args: None,
            error: Some(s("no active grant matches")),
        }),
        json!({"actor": "root", "op": "grant_revoke", "ok": false, "error": "no active grant matches"}),
    );
    check(
        Event::AuditRetention(AuditRetention {
            deleted_recordings: 2,
            bytes: 10,
            older_than_secs: Some(60),
            segments: None,
        }),
        json!({"deleted_recordings": 2, "bytes": 10, "older_than_secs": 60}),
    );
    check(
        Event::AuditSink(AuditSink { sink: s("s3"), state: SinkState::Recovered { uploaded: 4 } }),
        json!({"sink": "s3", "state": "recovered", "uploaded": 4}),
    );
    check(
        Event::AuditCheckpoint(AuditCheckpoint {
            covers_seq: 1,
            covers_hash: s("h"),
            key_id: s("k"),
            sig: s("s"),
            segment_start: Some(s("events-000000000001.jsonl")),
        }),
        json!({"covers_seq": 1, "covers_hash": "h", "key_id": "k", "sig": "s", "segment_start": "events-000000000001.jsonl"}),
    );
}

#[test]
fn the_log_writes_a_typed_event_under_its_name_and_refuses_a_checkpoint_from_outside() {
    let dir = tempfile::tempdir().unwrap();
    let log = crate::audit::AuditLog::open(dir.path()).unwrap();
    log.event(&Event::AgentDisconnected(AgentDisconnected { agent_id: "ag-1".to_owned() })).unwrap();
    let checkpoint = AuditCheckpoint {
        covers_seq: 1,
        covers_hash: "h".into(),
        key_id: "k".into(),
        sig: "s".into(),
        segment_start: None,
    };
    assert!(log.event(&Event::AuditCheckpoint(checkpoint)).is_err());
    let (_, path) = crate::audit::segments(dir.path()).unwrap().remove(0);
    let text = std::fs::read_to_string(path).unwrap();
    assert_eq!(text.lines().count(), 1);
    let line: Value = serde_json::from_str(text.trim_end()).unwrap();
    assert_eq!(line["event"], "agent.disconnected");
    assert_eq!(line["agent_id"], "ag-1");
    assert_eq!(line["seq"], 1);
}
