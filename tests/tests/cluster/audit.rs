//! Issue 17, audit in a cluster: two real gateways with different `[cluster] gateway_id`s on
//! one PostgreSQL database and one S3-compatible bucket (moto). Each keeps its own hash
//! chain (segment names carry its id), ships it to its own folder of the bucket, and keeps
//! its own anchor in the store; `postern audit verify --bucket` checks every chain apart;
//! `postern replay` at one gateway finds a recording made at the other.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use postern_e2e::*;

const BUCKET: &str = "postern-audit";

/// A signed S3 request to moto on `port` through boto3 (which moto brings): "create" the
/// bucket, "get KEY" (`None`: no such key), "put KEY FILE", "delete KEY", or "list PREFIX"
/// (one key a line).
fn s3(port: u16, args: &[&str]) -> Option<Vec<u8>> {
    const SCRIPT: &str = "import sys, boto3\n\
s3 = boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1')\n\
op, b = sys.argv[2], 'postern-audit'\n\
if op == 'create':\n    s3.create_bucket(Bucket=b)\n\
elif op == 'put':\n    s3.put_object(Bucket=b, Key=sys.argv[3], Body=open(sys.argv[4], 'rb').read())\n\
elif op == 'delete':\n    s3.delete_object(Bucket=b, Key=sys.argv[3])\n\
elif op == 'list':\n    r = s3.list_objects_v2(Bucket=b, Prefix=sys.argv[3])\n    print('\\n'.join(o['Key'] for o in r.get('Contents', [])))\n\
else:\n    try:\n        sys.stdout.buffer.write(s3.get_object(Bucket=b, Key=sys.argv[3])['Body'].read())\n    except s3.exceptions.NoSuchKey:\n        sys.exit(3)\n";
    let out = Command::new("timeout")
        .args(["60", "python3", "-c", SCRIPT, &format!("http://127.0.0.1:{port}")])
        .args(args)
        .output()
        .unwrap();
    match out.status.code() {
        Some(0) => Some(out.stdout),
        Some(3) => None,
        _ => panic!("s3 {args:?}: {}", text(&out.stderr)),
    }
}

fn list(port: u16, prefix: &str) -> Vec<String> {
    text(&s3(port, &["list", prefix]).unwrap()).lines().filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

/// A moto S3 server on a free loopback port with the bucket.
fn moto_with_bucket(dir: &Path) -> (u16, Proc) {
    let port = free_tcp_port();
    let mut moto = Command::new("moto_server");
    moto.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
    let proc = spawn_logged(moto, &dir.join("moto.log"));
    wait_until("moto listens", Duration::from_secs(30), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    s3(port, &["create"]);
    (port, proc)
}

/// `postern --config GATEWAY.toml ARGS` (offline commands, gateway stopped or not).
fn offline(gw: &Gateway, args: &[&str]) -> Output {
    Command::new(bin("postern"))
        .arg("--config")
        .arg(gw.dir.path().join("gateway.toml"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// `audit verify --bucket` at `gw`: (exit code, stdout).
fn verify_bucket(gw: &Gateway) -> (Option<i32>, String) {
    let out = offline(gw, &["audit", "verify", "--bucket"]);
    (out.status.code(), format!("{}{}", text(&out.stdout), text(&out.stderr)))
}

/// The report's line for `gateway`.
fn line_of<'a>(report: &'a str, gateway: &str) -> &'a str {
    report.lines().find(|l| l.starts_with(&format!("gateway {gateway} ("))).unwrap_or_else(|| panic!("{report}"))
}

#[test]
fn each_gateway_ships_its_own_chain_and_verify_over_the_bucket_checks_every_one_apart() {
    let cluster = Cluster::new("cluster_audit");
    let dir = tempfile::tempdir().unwrap();
    let (port, _moto) = moto_with_bucket(dir.path());
    let config = |id: &str| {
        format!(
            "{}[audit.s3]\nbucket = \"{BUCKET}\"\n\
             prefix = \"site\"\nendpoint = \"http://127.0.0.1:{port}\"\nallow_http = true\naccess_key_id = \"test\"\n\
             secret_access_key = \"test\"\n",
            cluster.config(id)
        )
    };
    let mut a = Gateway::start(&config("gw-a"));
    let mut b = Gateway::start(&config("gw-b"));
    // One agent on each gateway.
    let web1 = Agent::start(&a, "web-01", vec![], &a.listen);
    let web2 = Agent::start(&b, "web-02", vec![], &b.listen);
    let key = super::alice_may_exec(&a, dir.path(), "web-*");
    let ssh = |gw: &Gateway, target: &str, command: &str| {
        let known = dir.path().join(format!("known_hosts-{}", gw.ssh_port));
        gw.write_known_hosts(&known);
        let out = Command::new("timeout")
            .args(["60", "ssh", "-p", &gw.ssh_port.to_string(), "-i"])
            .arg(&key)
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o"])
            .arg(format!("UserKnownHostsFile={}", known.display()))
            .args([&format!("alice%{target}@127.0.0.1"), command])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        text(&out.stdout)
    };
    assert_eq!(ssh(&a, "web-01", "echo made-at-a"), "made-at-a\n");
    // The user and policy reach B through the store (within a second or so).
    wait_until("alice is let in at B", Duration::from_secs(15), || {
        ssh(&b, "web-02", "echo made-at-b") == "made-at-b\n"
    });

    // The gateway id is where an operator looks for it: gateway.started, the segment names.
    let started = |gw: &Gateway| gw.audit_events().into_iter().find(|e| e["event"] == "gateway.started").unwrap();
    assert_eq!(started(&a)["gateway_id"], "gw-a");
    assert_eq!(started(&b)["gateway_id"], "gw-b");
    let names = |gw: &Gateway| -> Vec<String> {
        gw.audit_segments().iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect()
    };
    assert_eq!(names(&a), ["events-gw-a-000000000001.jsonl"]);
    assert_eq!(names(&b), ["events-gw-b-000000000001.jsonl"]);
    let b_session = b
        .audit_events()
        .into_iter()
        .find(|e| e["event"] == "session.end")
        .and_then(|e| e["session_id"].as_str().map(str::to_owned))
        .unwrap();

    // A graceful stop ships the whole chain (and the recordings) to the gateway's folder.
    drop(web1);
    drop(web2);
    a.stop();
    b.stop();
    // B once more, so its chain runs over two segments (a restart continues in a new one).
    b.restart();
    let _ = b.postern(&["instances"]);
    b.stop();
    let b_names = names(&b);
    assert_eq!(b_names.len(), 2, "{b_names:?}");
    assert!(b_names.iter().all(|n| n.starts_with("events-gw-b-")), "{b_names:?}");
    let b_segments = list(port, "site/gateways/gw-b/audit/");
    assert_eq!(b_segments.len(), 2, "{b_segments:?}");
    for (key, local) in b_segments.iter().zip(b.audit_segments()) {
        assert_eq!(key, &format!("site/gateways/gw-b/audit/{}", local.file_name().unwrap().to_string_lossy()));
        assert_eq!(s3(port, &["get", key]), Some(std::fs::read(&local).unwrap()), "{key}");
    }
    assert_eq!(list(port, "site/gateways/gw-a/audit/"), ["site/gateways/gw-a/audit/events-gw-a-000000000001.jsonl"]);
    assert!(list(port, "site/audit/").is_empty(), "nothing in a single gateway's place");
    assert!(s3(port, &["get", "site/anchor.json"]).is_none());
    for gw in ["gw-a", "gw-b"] {
        let anchor: serde_json::Value =
            serde_json::from_slice(&s3(port, &["get", &format!("site/gateways/{gw}/anchor.json")]).unwrap()).unwrap();
        assert!(anchor["seq"].as_u64().unwrap() > 5, "{gw}: {anchor}");
    }
    assert!(s3(port, &["get", &format!("site/gateways/gw-b/recordings/{b_session}.cast")]).is_some());

    // Both gateways start again: each checks its log against its own anchor (their chains
    // have different lengths, so one shared anchor would refuse one of them).
    a.restart();
    b.restart();
    a.stop();
    b.stop();

    // Every chain in the bucket verifies, each reported by its gateway's id.
    let (code, report) = verify_bucket(&a);
    assert_eq!(code, Some(0), "{report}");
    assert!(line_of(&report, "gw-a").contains("intact."), "{report}");
    assert!(line_of(&report, "gw-b").contains("intact."), "{report}");
    assert!(line_of(&report, "gw-b").contains("s3://postern-audit/site/gateways/gw-b/audit/"), "{report}");
    assert!(report.contains("2 audit chains in the object store, all intact"), "{report}");

    // A's own log verifies on its disk, against A's own anchor.
    let out = offline(&a, &["audit", "verify"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        text(&out.stdout).contains("in the object store at s3://postern-audit/site/gateways/gw-a/anchor.json)"),
        "{}",
        text(&out.stdout)
    );

    // Replay at A finds the recording B made, in B's folder of the bucket.
    let out = offline(&a, &["replay", &b_session[..10], "--speed", "1000", "--idle-limit", "0"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "made-at-b\n");
    assert!(
        text(&out.stderr).contains("fetched it from s3://postern-audit/site/gateways/gw-b/recordings/"),
        "{}",
        text(&out.stderr)
    );

    // One event of B's chain altered in the bucket: B is NOT intact, named; A still is.
    let b_segments = list(port, "site/gateways/gw-b/audit/");
    let first = b_segments[0].clone();
    let original = s3(port, &["get", &first]).unwrap();
    let altered = dir.path().join("altered");
    std::fs::write(&altered, text(&original).replacen("\"alice\"", "\"mallory\"", 1)).unwrap();
    assert_ne!(std::fs::read(&altered).unwrap(), original);
    s3(port, &["put", &first, altered.to_str().unwrap()]);
    let (code, report) = verify_bucket(&a);
    assert_eq!(code, Some(1), "{report}");
    assert!(line_of(&report, "gw-b").contains("NOT intact"), "{report}");
    assert!(line_of(&report, "gw-a").contains("intact."), "{report}");
    assert!(report.contains("NOT intact: gateway gw-b"), "{report}");
    let restored = dir.path().join("restored");
    std::fs::write(&restored, &original).unwrap();
    s3(port, &["put", &first, restored.to_str().unwrap()]);
    assert_eq!(verify_bucket(&a).0, Some(0));

    // A's segment copied into B's folder is reported there, by name.
    let a_first = "site/gateways/gw-a/audit/events-gw-a-000000000001.jsonl";
    let copy = dir.path().join("copy");
    std::fs::write(&copy, s3(port, &["get", a_first]).unwrap()).unwrap();
    let moved = "site/gateways/gw-b/audit/events-gw-a-000000000001.jsonl";
    s3(port, &["put", moved, copy.to_str().unwrap()]);
    let (code, report) = verify_bucket(&a);
    assert_eq!(code, Some(1), "{report}");
    assert!(report.contains("named for gateway gw-a, in the folder of gateway gw-b"), "{report}");
    s3(port, &["delete", moved]);
    // A folder for a gateway the store does not know, holding a copy of A's whole chain
    // (signed, intact): its key is not taken from the bucket or from A, so it fails.
    let forged = "site/gateways/gw-c/audit/events-gw-c-000000000001.jsonl";
    s3(port, &["put", forged, copy.to_str().unwrap()]);
    let (code, report) = verify_bucket(&a);
    assert_eq!(code, Some(1), "{report}");
    assert!(report.contains("no checkpoint key recorded for gateway gw-c in the database"), "{report}");
    assert!(report.contains("NOT intact: gateway gw-c"), "{report}");
    s3(port, &["delete", forged]);
    assert_eq!(verify_bucket(&a).0, Some(0));

    // B's last segment deleted from the bucket: the chain that is left is whole, but it no
    // longer reaches B's own anchor; A's is still intact.
    let last = b_segments.last().unwrap();
    s3(port, &["delete", last]);
    let (code, report) = verify_bucket(&a);
    assert_eq!(code, Some(1), "{report}");
    assert!(line_of(&report, "gw-b").contains("NOT intact"), "{report}");
    assert!(line_of(&report, "gw-a").contains("intact."), "{report}");
    assert!(report.contains("NOT intact: gateway gw-b"), "{report}");
    assert!(report.contains("gateway signed"), "the anchor names what is missing: {report}");

    // A's own log cut back on its disk (its last segment removed): A refuses to continue it,
    // measured against A's anchor (B's chain and anchor are longer, and do not matter).
    let a_segments = a.audit_segments();
    assert_eq!(a_segments.len(), 2, "{a_segments:?}");
    std::fs::remove_file(a_segments.last().unwrap()).unwrap();
    let out = Command::new("timeout")
        .args(["30"])
        .arg(bin("postern"))
        .arg("--config")
        .arg(a.dir.path().join("gateway.toml"))
        .arg("gateway")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success() && out.status.code() != Some(124), "{err}");
    assert!(err.contains("refusing to continue the audit log"), "{err}");
    let a_anchor: serde_json::Value =
        serde_json::from_slice(&s3(port, &["get", "site/gateways/gw-a/anchor.json"]).unwrap()).unwrap();
    assert!(err.contains(&format!("signed a checkpoint at seq {}", a_anchor["seq"])), "A's own anchor: {err}");
}

#[test]
fn a_gateway_killed_mid_session_loses_no_audit_and_every_chain_verifies() {
    let cluster = Cluster::new("crash_audit");
    let dir = tempfile::tempdir().unwrap();
    let (port, _moto) = moto_with_bucket(dir.path());
    let config = |id: &str| {
        format!(
            "{}[audit.s3]\nbucket = \"{BUCKET}\"\nprefix = \"site\"\nendpoint = \"http://127.0.0.1:{port}\"\n\
             allow_http = true\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\n",
            cluster.config(id)
        )
    };
    let mut a = Gateway::start(&config("gw-a"));
    let mut b = Gateway::start(&config("gw-b"));
    let mut c = Gateway::start(&config("gw-c"));
    let web = Agent::start(&b, "web-01", vec![], &b.listen);
    let key = super::alice_may_exec(&c, dir.path(), "web-*");
    // A long session through B (the gateway that dies) and one through A to the agent on B.
    let long = |gw: &Gateway, tag: &str| {
        let known = dir.path().join(format!("known_hosts-{tag}"));
        gw.write_known_hosts(&known);
        let mut child = Command::new("timeout")
            .args(["60", "ssh", "-p", &gw.ssh_port.to_string(), "-i"])
            .arg(&key)
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o"])
            .arg(format!("UserKnownHostsFile={}", known.display()))
            .args(["alice%web-01@127.0.0.1", &format!("echo {tag}; exec sleep 300")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut first = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.as_mut().unwrap()), &mut first).unwrap();
        assert_eq!(first, format!("{tag}\n"));
        child
    };
    wait_until("the policy at every gateway", Duration::from_secs(10), || {
        [&a, &b].iter().all(|gw| {
            let out = gw.postern(&["explain", "--user", "alice", "--target", "web-01", "--action", "exec", "--json"]);
            serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|v| v.pointer("/decision/allowed") == Some(&serde_json::Value::Bool(true)))
        })
    });
    let mut at_b = long(&b, "through-b");
    let mut at_a = long(&a, "through-a");
    let b_session = b
        .audit_events()
        .into_iter()
        .find(|e| e["event"] == "session.start")
        .and_then(|e| e["session_id"].as_str().map(str::to_owned))
        .unwrap();

    b.kill();
    // Both users' sessions end: the one through B with B, the one through A when A loses B.
    for child in [&mut at_b, &mut at_a] {
        let mut status = None;
        wait_until("the ssh client to end", Duration::from_secs(20), || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
    }
    wait_until("A ends its session to the lost agent", Duration::from_secs(10), || {
        a.audit_events().iter().any(|e| e["event"] == "session.end" && e["end_reason"] == "instance-lost")
    });
    // B comes back: it closes the session the crash cut short, in its own chain.
    b.restart();
    drop(web);
    for gw in [&mut a, &mut b, &mut c] {
        gw.stop();
    }

    // Nothing is missing: every chain in the bucket verifies, and B's holds the session that
    // was live when it died, from its start to the end its restart wrote.
    let (code, report) = verify_bucket(&a);
    assert_eq!(code, Some(0), "{report}");
    assert!(report.contains("3 audit chains in the object store, all intact"), "{report}");
    let b_chain: String =
        list(port, "site/gateways/gw-b/audit/").iter().map(|k| text(&s3(port, &["get", k]).unwrap())).collect();
    let events: Vec<serde_json::Value> = b_chain.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(events.iter().any(|e| e["event"] == "session.start" && e["session_id"] == b_session.as_str()));
    assert!(
        events.iter().any(|e| e["event"] == "session.end"
            && e["session_id"] == b_session.as_str()
            && e["end_reason"] == "gateway-crash"),
        "{b_chain}"
    );
}
