//! Live sessions across a cluster: two real gateways with their own ids on one PostgreSQL
//! database, a real OpenSSH session through one of them, `postern sessions` and `postern
//! sessions terminate` at the other (docs/scale-out.md, "Sessions across the cluster").

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use postern_e2e::*;
use serde_json::Value;

/// Two gateways, `gw-a` and `gw-b`, on one database; an agent on A; alice may exec on it.
struct Cluster {
    a: Gateway,
    b: Gateway,
    _agent: Agent,
    dir: tempfile::TempDir,
    key: PathBuf,
    _shared: postern_e2e::Cluster,
}

impl Cluster {
    fn start() -> Cluster {
        let shared = postern_e2e::Cluster::new("cluster");
        let a = Gateway::start(&shared.config("gw-a"));
        let b = Gateway::start(&shared.config("gw-b"));
        let dir = tempfile::tempdir().unwrap();
        a.write_known_hosts(&dir.path().join("known_hosts"));
        let agent = Agent::start(&a, "web-01", vec![], &a.listen);
        let key = super::alice_may_exec(&a, dir.path(), "web-*");
        Cluster { a, b, _agent: agent, dir, key, _shared: shared }
    }

    /// A long session through A (its stderr, where the end notice goes, in `stderr`);
    /// returns it with its session id once it has started.
    fn session_at_a(&self, stderr: &Path) -> (Child, String) {
        let child = Command::new("timeout")
            .args(["60", "ssh", "-p", &self.a.ssh_port.to_string(), "-i"])
            .arg(&self.key)
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o"])
            .arg(format!("UserKnownHostsFile={}", self.dir.path().join("known_hosts").display()))
            .args(["alice%web-01@127.0.0.1", "sleep 60"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(stderr).unwrap())
            .spawn()
            .unwrap();
        let mut id = None;
        wait_until("alice's session to start at A", Duration::from_secs(30), || {
            id = self
                .a
                .audit_events()
                .iter()
                .find(|e| e["event"] == "session.start" && e["user"] == "alice")
                .map(|e| e["session_id"].as_str().unwrap().to_owned());
            id.is_some()
        });
        (child, id.unwrap())
    }
}

fn ok(gw: &Gateway, args: &[&str]) -> String {
    let out = gw.postern(args);
    assert!(out.status.success(), "postern {args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

fn live(gw: &Gateway) -> Vec<Value> {
    serde_json::from_str(&ok(gw, &["sessions", "--json"])).unwrap()
}

fn listed(gw: &Gateway, id: &str) -> Option<Value> {
    live(gw).into_iter().find(|r| r["id"] == id)
}

fn terminate_as(user: &str, gw: &Gateway, id: &str) -> Output {
    Command::new("runuser")
        .args(["-u", user, "--"])
        .arg(bin("postern"))
        .arg("--data-dir")
        .arg(gw.data_dir())
        .args(["sessions", "terminate", id])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A session through A is listed at B with its gateway, and `sessions terminate` at B ends
/// it within 5 s, with the same notice and events as a terminate at A, naming who asked and
/// where. An unknown id and an OS user the admin socket does not admit are refused.
#[test]
fn a_session_through_one_gateway_is_listed_and_ended_at_another() {
    let c = Cluster::start();
    let notice = c.dir.path().join("ssh-stderr");
    let (mut child, id) = c.session_at_a(&notice);

    // Listed at B (from the store) and at A (its own), each with gateway gw-a.
    let mut row = None;
    let took = wait_until("B to list the session through A", Duration::from_secs(5), || {
        row = listed(&c.b, &id);
        row.is_some()
    });
    assert!(took < Duration::from_secs(3), "listed at B after {took:?}");
    let row = row.unwrap();
    assert_eq!(
        (&row["gateway"], &row["user"], &row["target"], &row["kind"], &row["active"], &row["logged"]),
        (
            &Value::from("gw-a"),
            &Value::from("alice"),
            &Value::from("web-01"),
            &Value::from("exec"),
            &Value::from(true),
            &Value::from(true)
        )
    );
    assert_eq!(listed(&c.a, &id).unwrap()["gateway"], "gw-a");
    let table = ok(&c.b, &["sessions"]);
    eprintln!("postern sessions at B:\n{table}");
    let header = table.lines().next().unwrap();
    assert!(header.starts_with("SESSION") && header.contains("GATEWAY"), "{table}");
    let line = table.lines().find(|l| l.starts_with(&id)).unwrap();
    assert!(line.contains("gw-a") && line.contains("alice") && line.contains("web-01"), "{table}");

    // Unknown id: a clear error.
    let out = c.b.postern(&["sessions", "terminate", "0123456789abcdef0123456789abcdef"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(
            "no live session \"0123456789abcdef0123456789abcdef\" on any gateway of the cluster; see `postern sessions`"
        ),
        "{}",
        text(&out.stderr)
    );

    // An OS user other than the gateway's (and not root) is refused by B's admin socket,
    // even with the file permissions opened to them: the socket checks who connects.
    for p in [c.b.dir.path().to_path_buf(), c.b.data_dir()] {
        sh(&format!("chmod o+x {}", p.display()));
    }
    sh(&format!("chmod o+rw {}", c.b.data_dir().join("admin.sock").display()));
    let out = terminate_as("nobody", &c.b, &id);
    assert!(!out.status.success(), "nobody ended a session: {}", text(&out.stdout));
    let said = text(&out.stderr);
    assert!(said.contains("admits only the gateway's own user and root"), "{said}");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(child.try_wait().unwrap().is_none(), "the session ended after a refused terminate");
    assert!(!c.a.audit_text().contains("session.terminated"));

    // An admin at B ends it: the user sees the notice, within 5 s.
    let asked = Instant::now();
    let said = ok(&c.b, &["sessions", "terminate", &id]);
    assert_eq!(said, format!("terminated session {id} (at gateway gw-a)\n"));
    let mut status = None;
    wait_until("the session at A to end", Duration::from_secs(15), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let took = asked.elapsed();
    eprintln!("terminate at B ended the session at A after {took:?}");
    assert!(took < Duration::from_secs(5), "the session at A ended {took:?} after the request at B");
    assert_eq!(status.unwrap().code(), Some(255));
    let seen = std::fs::read_to_string(&notice).unwrap();
    assert!(seen.contains("session ended: terminated by local-admin(uid=0) (at gateway gw-b)"), "{seen}");

    // A's audit log: session.terminated naming the admin and the gateway asked at, then
    // session.end; B's: the admin action.
    wait_until("session.terminated and session.end at A", Duration::from_secs(5), || {
        let text = c.a.audit_text();
        text.contains("session.terminated") && text.contains("session.end")
    });
    let events = c.a.audit_events();
    let terminated = events.iter().find(|e| e["event"] == "session.terminated").unwrap();
    assert_eq!(
        (&terminated["session_id"], &terminated["actor"], &terminated["from_gateway"], &terminated["user"]),
        (&Value::from(id.as_str()), &Value::from("local-admin(uid=0)"), &Value::from("gw-b"), &Value::from("alice"))
    );
    let end = events.iter().find(|e| e["event"] == "session.end" && e["session_id"] == id.as_str()).unwrap();
    assert_eq!(end["end_reason"], "terminated");
    assert!(c.b.audit_events().iter().any(|e| e["event"] == "admin.action"
        && e["op"] == "session_terminate"
        && e["ok"] == true
        && e["args"]["id"] == id.as_str()));

    // And it leaves the list everywhere.
    wait_until("the ended session to leave B's list", Duration::from_secs(5), || listed(&c.b, &id).is_none());
    assert!(listed(&c.a, &id).is_none());
    // Terminating it again: it is gone.
    let out = c.b.postern(&["sessions", "terminate", &id]);
    assert!(text(&out.stderr).contains("no live session"), "{}", text(&out.stderr));
}

/// A gateway that does not act (stopped) makes `sessions terminate` at another fail after
/// its bound, and the withdrawn request is not carried out when it wakes; a gateway killed
/// with SIGKILL: its sessions leave the list once its lease runs out.
#[test]
fn a_stopped_or_killed_gateway_neither_acts_late_nor_stays_listed() {
    let mut c = Cluster::start();
    let (mut child, id) = c.session_at_a(&c.dir.path().join("ssh-stderr"));
    wait_until("B to list the session through A", Duration::from_secs(5), || listed(&c.b, &id).is_some());

    // A stops (SIGSTOP): B's request is not acted on; B says so after its bound (10 s).
    c.a.proc.as_ref().unwrap().signal(nix::sys::signal::Signal::SIGSTOP);
    let asked = Instant::now();
    let out = c.b.postern(&["sessions", "terminate", &id]);
    let took = asked.elapsed();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr)
            .contains(&format!("gateway gw-a did not act on the request to end session {id:?} within 10s")),
        "{}",
        text(&out.stderr)
    );
    assert!(took >= Duration::from_secs(10) && took < Duration::from_secs(17), "{took:?}");

    // A wakes up: the withdrawn request is not carried out late.
    c.a.proc.as_ref().unwrap().signal(nix::sys::signal::Signal::SIGCONT);
    wait_until("A to answer again", Duration::from_secs(10), || c.a.postern(&["sessions", "--json"]).status.success());
    std::thread::sleep(Duration::from_secs(3));
    assert!(child.try_wait().unwrap().is_none(), "the session ended after its request was withdrawn");
    assert!(!c.a.audit_text().contains("session.terminated"));
    assert!(listed(&c.b, &id).is_some());

    // A killed: its session leaves B's list once A's lease runs out (15 s after its last
    // renewal), not before the lease says so.
    c.a.kill();
    let killed = Instant::now();
    assert!(listed(&c.b, &id).is_some(), "listed while A's lease runs");
    let took = wait_until("A's session to leave B's list", Duration::from_secs(30), || listed(&c.b, &id).is_none());
    eprintln!("the killed gateway's session left the list after {took:?}");
    assert!(killed.elapsed() < Duration::from_secs(16), "{:?}", killed.elapsed());
    let out = c.b.postern(&["sessions", "terminate", &id]);
    assert!(text(&out.stderr).contains("no live session"), "{}", text(&out.stderr));
    let _ = child.kill();
}
