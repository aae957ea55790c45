//! The `postern` client as a user: `ls`, `exec`, `forward` (curl through it, a refused
//! destination, a tunnel reconnect), and `run` across labelled agents with a failing and an
//! offline instance. Everything goes through the gateway's SSH door with the user's key.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::io::{BufRead, Read};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use postern_e2e::*;
use serde_json::Value;

struct Setup {
    gw: Gateway,
    dir: tempfile::TempDir,
    key: PathBuf,
}

impl Setup {
    fn new(policy: &str) -> Setup {
        Self::with_config(policy, "")
    }

    /// With more gateway config (after `[ssh] idle_timeout`).
    fn with_config(policy: &str, extra: &str) -> Setup {
        let gw = Gateway::start(&format!("idle_timeout = \"0\"\n{extra}"));
        let dir = tempfile::tempdir().unwrap();
        gw.write_known_hosts(&dir.path().join("known_hosts"));
        let key = dir.path().join("alice");
        ssh_keygen(&key, "alice");
        let s = Setup { gw, dir, key };
        s.admin(&["user", "add", "alice", "--key-file", s.key.with_extension("pub").to_str().unwrap()]);
        let file = s.dir.path().join("policy.toml");
        std::fs::write(&file, policy).unwrap();
        s.admin(&["policy", "apply", file.to_str().unwrap()]);
        s
    }

    fn admin(&self, args: &[&str]) -> String {
        let out = self.gw.postern(args);
        assert!(out.status.success(), "postern {args:?}: {}{}", text(&out.stdout), text(&out.stderr));
        text(&out.stdout)
    }

    /// `postern ARGS` as alice through the gateway (POSTERN_GATEWAY, a scratch HOME).
    fn user(&self, args: &[&str]) -> Command {
        let mut c = Command::new("timeout");
        c.arg("120")
            .arg(bin("postern"))
            .args(args)
            .env("POSTERN_GATEWAY", format!("127.0.0.1:{}", self.gw.ssh_port))
            .env("POSTERN_USER", "alice")
            .env("HOME", self.dir.path())
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("POSTERN_DATA_DIR")
            .env_remove("POSTERN_CONFIG")
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        // Identity and trust as a user would configure them, from their own HOME.
        let ssh = self.dir.path().join(".ssh");
        if !ssh.exists() {
            std::fs::create_dir_all(&ssh).unwrap();
            std::fs::copy(&self.key, ssh.join("id_ed25519")).unwrap();
            std::fs::copy(self.dir.path().join("known_hosts"), ssh.join("postern_known_hosts")).unwrap();
        }
        c
    }

    fn out(&self, args: &[&str]) -> Output {
        self.user(args).output().unwrap()
    }
}

const POLICY: &str = r#"name = "prod-ops"
[[statement]]
sid = "prod"
effect = "allow"
users = ["alice"]
actions = ["shell", "exec"]
labels = ["env=prod"]
# The test agents run as root.
allow_root = true
"#;

/// `ls` offers `rdp` only where it can be used: the policy allows it and the gateway's RDP
/// door is on. An instance the user may only RDP to is not listed while the door is off.
#[test]
fn ls_offers_rdp_only_when_the_rdp_door_is_on() {
    let policy = r#"name = "mixed"
[[statement]]
sid = "shells"
effect = "allow"
users = ["alice"]
actions = ["shell", "rdp"]
instances = ["web-01"]
allow_root = true
[[statement]]
sid = "desktops"
effect = "allow"
users = ["alice"]
actions = ["rdp"]
instances = ["win-01"]
"#;
    let listed = |s: &Setup| -> Vec<(String, Value)> {
        let out = s.out(&["ls", "--json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let list: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        list.iter().map(|i| (i["name"].as_str().unwrap().to_owned(), i["actions"].clone())).collect()
    };
    let off = Setup::new(policy);
    let _web = Agent::start(&off.gw, "web-01", vec![], &off.gw.listen);
    let _win = Agent::start(&off.gw, "win-01", vec![], &off.gw.listen);
    assert_eq!(listed(&off), [("web-01".to_owned(), serde_json::json!(["shell"]))]);

    let on = Setup::with_config(policy, &format!("[rdp]\nenabled = true\nlisten = \"127.0.0.1:{}\"", free_tcp_port()));
    let _web = Agent::start(&on.gw, "web-01", vec![], &on.gw.listen);
    let _win = Agent::start(&on.gw, "win-01", vec![], &on.gw.listen);
    assert_eq!(
        listed(&on),
        [("web-01".to_owned(), serde_json::json!(["shell", "rdp"])), ("win-01".to_owned(), serde_json::json!(["rdp"]))]
    );
}

#[test]
fn ls_and_exec_as_a_user() {
    let s = Setup::new(POLICY);
    let _web = Agent::start_labeled(&s.gw, "web-01", "env=prod,role=web", vec![], &s.gw.listen);
    let _db = Agent::start_labeled(&s.gw, "db-01", "env=prod,role=db", vec![], &s.gw.listen);
    let _dev = Agent::start_labeled(&s.gw, "dev-01", "env=dev", vec![], &s.gw.listen);

    // Only what alice may reach, with what she may do there.
    let out = s.out(&["ls", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = list.iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["db-01", "web-01"]);
    assert_eq!(list[1]["actions"], serde_json::json!(["shell", "exec"]));
    assert_eq!(list[1]["online"], true);
    let out = s.out(&["ls", "--labels", "role=db"]);
    let table = text(&out.stdout);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.contains("db-01") && !table.contains("web-01"), "{table}");
    let out = s.out(&["ls", "--labels", "role=,"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("label selector"), "{}", text(&out.stderr));

    // exec: output, stderr and the exit status come back; stdin goes in.
    let out = s.out(&["exec", "web-01", "--", "echo hi; echo oops >&2; exit 7"]);
    assert_eq!((text(&out.stdout).as_str(), text(&out.stderr).as_str()), ("hi\n", "oops\n"));
    assert_eq!(out.status.code(), Some(7));
    let mut child =
        s.user(&["exec", "web-01", "--", "wc -c"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &[b'x'; 100_000]).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(text(&out.stdout).trim(), "100000");

    // Not allowed and not existing look the same.
    for target in ["dev-01", "nope-01"] {
        let out = s.out(&["exec", target, "--", "true"]);
        assert_ne!(out.status.code(), Some(0));
        assert!(text(&out.stderr).contains("access denied"), "{target}: {}", text(&out.stderr));
    }
    // The sessions are the user's own, recorded like ssh ones.
    let starts: Vec<Value> =
        s.gw.audit_events().into_iter().filter(|e| e["event"] == "session.start" && e["user"] == "alice").collect();
    assert_eq!(starts.len(), 2);
    assert!(starts.iter().all(|e| e["logged"] == true && e["target"] == "web-01"));

    // A user gets the same ssh config an admin prints.
    let out = s.out(&["ssh-config", "--known-hosts-file", "~/.ssh/pk"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), s.admin(&["ssh-config", "--user", "alice", "--known-hosts-file", "~/.ssh/pk"]));
    assert!(text(&out.stdout).contains("@cert-authority"));

    // shell: on a PTY, exit status back.
    let out = s.out(&["shell", "web-01", "-c", "tty; exit 3"]);
    assert!(text(&out.stdout).contains("/dev/pts/"), "{}", text(&out.stdout));
    assert_eq!(out.status.code(), Some(3));

    // Completions are generated from the same command definitions.
    let out = Command::new(bin("postern")).args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("forward") && text(&out.stdout).contains("--max-concurrency"));
}

/// A running `postern forward INSTANCE LOCAL:DEST`, listening once started.
struct Forward {
    child: std::process::Child,
    stderr: std::io::BufReader<std::process::ChildStderr>,
}

impl Forward {
    fn start(s: &Setup, instance: &str, local: u16, dest: &str) -> Forward {
        let mut child =
            s.user(&["forward", instance, &format!("{local}:{dest}")]).stderr(Stdio::piped()).spawn().unwrap();
        let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        // It says where it listens once it does.
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        assert!(line.contains(&format!("127.0.0.1:{local}")), "{line}");
        Forward { child, stderr }
    }

    /// Ctrl-C; returns the rest of its stderr (the summary) after a clean exit.
    fn stop(mut self) -> String {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGINT)
            .unwrap();
        let mut rest = String::new();
        self.stderr.read_to_string(&mut rest).unwrap();
        assert!(self.child.wait().unwrap().success(), "{rest}");
        rest
    }
}

/// A local HTTP server serving one file; returns (server, port).
fn http_server(dir: &std::path::Path, body: &str) -> (std::process::Child, u16) {
    std::fs::write(dir.join("hello.txt"), body).unwrap();
    let port = free_tcp_port();
    let child = Command::new("python3")
        .args(["-m", "http.server", "--bind", "127.0.0.1", &port.to_string()])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("http server", Duration::from_secs(20), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    (child, port)
}

fn curl(port: u16) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "20", &format!("http://127.0.0.1:{port}/hello.txt")])
        .output()
        .unwrap()
}

#[test]
fn forward_carries_http_refuses_other_destinations_and_survives_a_tunnel_reconnect() {
    let www = tempfile::tempdir().unwrap();
    let (mut http, http_port) = http_server(www.path(), "hello through the tunnel\n");
    let other = free_tcp_port();
    let s = Setup::new(&format!(
        "{POLICY}\n[[statement]]\nsid = \"web\"\neffect = \"allow\"\nusers = [\"alice\"]\nactions = [\"port-forward\"]\n\
         instances = [\"web-01\"]\nforward_to = [\"127.0.0.1:{http_port}\"]\n"
    ));
    let mut web = Agent::start_labeled(&s.gw, "web-01", "env=prod", vec![], &s.gw.listen);

    // A destination the policy does not name is refused before anything listens.
    let out = s.out(&["forward", "web-01", &format!("{}:127.0.0.1:{other}", free_tcp_port())]);
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("refused"), "{}", text(&out.stderr));

    let local = free_tcp_port();
    let fwd = Forward::start(&s, "web-01", local, &format!("127.0.0.1:{http_port}"));

    // Several concurrent connections.
    let handles: Vec<_> = (0..6).map(|_| std::thread::spawn(move || curl(local))).collect();
    for h in handles {
        let out = h.join().unwrap();
        assert_eq!(text(&out.stdout), "hello through the tunnel\n", "{}", text(&out.stderr));
    }

    // The agent's tunnel drops and comes back: new connections work again.
    web.proc.as_mut().unwrap().signal(nix::sys::signal::Signal::SIGTERM);
    web.proc.as_mut().unwrap().wait_exit(Duration::from_secs(10));
    wait_until("agent offline", Duration::from_secs(20), || !s.gw.is_online("web-01"));
    web.run();
    wait_until("agent online again", Duration::from_secs(20), || s.gw.is_online("web-01"));
    let out = curl(local);
    assert_eq!(text(&out.stdout), "hello through the tunnel\n", "{}", text(&out.stderr));

    let rest = fwd.stop();
    assert!(rest.contains("7 connection(s), 0 failed"), "{rest}");
    let opens = s.gw.audit_events().into_iter().filter(|e| e["event"] == "forward.open").count();
    assert_eq!(opens, 7 + 1, "seven forwarded connections and the up-front check");
    let _ = http.kill();
}

#[test]
fn run_across_instances_with_a_failing_and_an_offline_one() {
    let s = Setup::new(POLICY);
    // A failing instance: its agent runs in its own UTS namespace named "failing".
    let failing = vec![
        "unshare".to_owned(),
        "--uts".to_owned(),
        "sh".to_owned(),
        "-c".to_owned(),
        "hostname failing && exec \"$@\"".to_owned(),
        "sh".to_owned(),
    ];
    let _a = Agent::start_labeled(&s.gw, "app-fail", "env=prod", failing, &s.gw.listen);
    let _w1 = Agent::start_labeled(&s.gw, "web-01", "env=prod", vec![], &s.gw.listen);
    let _w2 = Agent::start_labeled(&s.gw, "web-02", "env=prod", vec![], &s.gw.listen);
    let mut off = Agent::start_labeled(&s.gw, "web-03", "env=prod", vec![], &s.gw.listen);
    off.proc.as_mut().unwrap().signal(nix::sys::signal::Signal::SIGTERM);
    wait_until("web-03 offline", Duration::from_secs(20), || !s.gw.is_online("web-03"));

    let cmd = "echo out-$(hostname); test \"$(hostname)\" != failing";
    let out = s.out(&[
        "run",
        "--targets",
        "env=prod",
        "--max-concurrency",
        "50%",
        "--max-errors",
        "5",
        "--output-dir",
        "r1",
        "--json",
        "--",
        cmd,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((summary["total"].as_u64(), summary["success"].as_u64()), (Some(4), Some(2)), "{summary}");
    let by_name =
        |n: &str| summary["instances"].as_array().unwrap().iter().find(|i| i["instance"] == n).unwrap().clone();
    assert_eq!(by_name("app-fail")["status"], "failed");
    assert_eq!(by_name("app-fail")["exit_code"], 1);
    assert_eq!(by_name("web-01")["status"], "success");
    assert_eq!(by_name("web-03")["status"], "offline");
    let dir = s.dir.path().join("r1");
    assert_eq!(std::fs::read_to_string(dir.join("app-fail.stdout")).unwrap(), "out-failing\n");
    assert!(std::fs::read_to_string(dir.join("web-02.stdout")).unwrap().starts_with("out-"));
    let saved: Value = serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(saved["run_id"], summary["run_id"]);

    // The run and each invocation are audited, tied by the run id.
    let events = s.gw.audit_events();
    let run_id = summary["run_id"].as_str().unwrap();
    let start = events.iter().find(|e| e["event"] == "run.start" && e["run_id"] == run_id).unwrap();
    assert_eq!(start["user"], "alice");
    let end = events.iter().find(|e| e["event"] == "run.end" && e["run_id"] == run_id).unwrap();
    assert_eq!(end["summary"]["failed"], 1);
    let tagged = events.iter().filter(|e| e["event"] == "session.start" && e["run_id"] == run_id).count();
    assert_eq!(tagged, 3);

    // Error budget 0, one at a time: the failure (first by name) stops the rest.
    let out = s.out(&["run", "--targets", "env=prod", "--max-concurrency", "1", "--output-dir", "r2", "--", cmd]);
    assert_eq!(out.status.code(), Some(1));
    let table = text(&out.stdout);
    assert!(table.contains("not-started"), "{table}");
    assert!(table.contains("0 of 4 succeeded"), "{table}");

    // Ctrl-C: nothing new starts, the running invocation is stopped, the run is summarised
    // and its end recorded.
    let mut child = s
        .user(&[
            "run",
            "--instances",
            "web-01,web-02",
            "--max-concurrency",
            "1",
            "--output-dir",
            "r3",
            "--json",
            "--",
            "sleep 60",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let sleeping = || {
        s.gw.audit_events()
            .iter()
            .any(|e| e["event"] == "session.start" && e["command"].as_str().is_some_and(|c| c.contains("sleep 60")))
    };
    wait_until("the first invocation to start", Duration::from_secs(30), sleeping);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(130));
    let summary: Value = serde_json::from_str(&out).unwrap();
    assert_eq!((summary["cancelled"].as_u64(), summary["not_started"].as_u64()), (Some(1), Some(1)), "{summary}");
    let run_id = summary["run_id"].clone();
    wait_until("run.end of the interrupted run", Duration::from_secs(20), || {
        s.gw.audit_events()
            .iter()
            .any(|e| e["event"] == "run.end" && e["run_id"] == run_id && e["summary"]["interrupted"] == true)
    });
    // The remote command was stopped with the connection, not left running.
    wait_until("the cancelled session to end", Duration::from_secs(20), || {
        s.gw.audit_events().iter().any(|e| {
            e["event"] == "session.end"
                && e["target"] == "web-01"
                && e["kind"] == "exec"
                && e["duration_ms"].as_u64().is_some_and(|d| d < 30_000)
                && e["exit_code"] != 0
        })
    });
}

#[test]
fn psql_through_a_forward_to_a_host_the_instance_reaches() {
    let pg = Postgres::start();
    let s = Setup::new(&format!(
        "{POLICY}\n[[statement]]\nsid = \"dba\"\neffect = \"allow\"\nusers = [\"alice\"]\nactions = [\"port-forward\"]\n\
         labels = [\"role=db\"]\nforward_to = [\"127.0.0.1:{}\"]\n",
        pg.port
    ));
    let _db = Agent::start_labeled(&s.gw, "db-01", "env=prod,role=db", vec![], &s.gw.listen);
    let local = free_tcp_port();
    let fwd = Forward::start(&s, "db-01", local, &format!("127.0.0.1:{}", pg.port));
    let psql = |sql: &str| {
        Command::new("timeout")
            .args(["30", "psql", "-h", "127.0.0.1", "-p", &local.to_string(), "-U", "postgres", "-At", "-c", sql])
            .output()
            .unwrap()
    };
    let out = psql("create table t(x int); insert into t select generate_series(1, 1000); select sum(x) from t");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().last(), Some("500500"));
    let out = psql("select count(*) from t");
    assert_eq!(text(&out.stdout).trim(), "1000");
    let rest = fwd.stop();
    assert!(rest.contains("2 connection(s), 0 failed"), "{rest}");
}

#[test]
fn admin_socket_sessions_are_listed_and_can_be_terminated() {
    let s = Setup::new(POLICY);
    let _web = Agent::start_labeled(&s.gw, "web-01", "env=prod", vec![], &s.gw.listen);
    let mut child = Command::new(bin("postern"))
        .arg("--data-dir")
        .arg(s.gw.data_dir())
        .args(["exec", "web-01", "--", "echo started; sleep 60"])
        .env_remove("POSTERN_GATEWAY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "started\n");
    let sessions: Vec<Value> = serde_json::from_str(&s.admin(&["sessions", "--json"])).unwrap();
    let mine = sessions.iter().find(|x| x["target"] == "web-01").expect("the admin session is listed");
    assert!(mine["user"].as_str().unwrap().starts_with("local-admin"), "{mine}");
    assert_eq!(mine["kind"], "exec");
    // Policy does not apply to it: a policy change (which re-checks live sessions) leaves it.
    let file = s.dir.path().join("other.toml");
    std::fs::write(&file, "name = \"other\"\n[[statement]]\neffect = \"allow\"\nusers = [\"bob\"]\nactions = [\"exec\"]\ninstances = [\"x\"]\n").unwrap();
    s.admin(&["policy", "apply", file.to_str().unwrap()]);
    s.admin(&["sessions", "terminate", mine["id"].as_str().unwrap()]);
    let started = std::time::Instant::now();
    let status = child.wait().unwrap();
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(!status.success());
    // The gateway writes the end event once the relay has wound down, which can be just
    // after the client saw its connection close.
    let is_end = |e: &Value| e["event"] == "session.end" && e["session_id"] == mine["id"];
    wait_until("the admin session's session.end", Duration::from_secs(10), || s.gw.audit_events().iter().any(is_end));
    let events = s.gw.audit_events();
    let end = events.iter().find(|e| is_end(e)).unwrap();
    assert!(end["end_reason"].is_string(), "{end}");
    assert!(
        !events.iter().any(|e| e["event"] == "session.terminated" && e["actor"] == "policy"),
        "policy must not end admin sessions"
    );
}

const WEB_ONLY: &str = r#"name = "web-ops"
[[statement]]
sid = "web"
effect = "allow"
users = ["alice"]
actions = ["shell", "exec", "port-forward"]
labels = ["env=prod"]
forward_to = ["*:*"]
allow_root = true
"#;

/// One exit-code rule for every command (docs/client.md, "Exit status"): a refusal or a
/// client error is `postern: error: ...` and 255, whatever the command and whichever way
/// it goes (as a user through the gateway, or through the admin socket); otherwise the
/// remote status. Plain ssh keeps exit status 1 for a refusal.
#[test]
fn every_command_follows_the_exit_code_rule() {
    let s = Setup::new(WEB_ONLY);
    let _web = Agent::start_labeled(&s.gw, "web-01", "env=prod", vec![], &s.gw.listen);
    let _dev = Agent::start_labeled(&s.gw, "dev-01", "env=dev", vec![], &s.gw.listen);
    let data_dir = s.gw.data_dir();
    let admin = |args: &[&str]| -> Output {
        let mut c = Command::new("timeout");
        c.arg("60").arg(bin("postern")).arg("--data-dir").arg(&data_dir).args(args).env_remove("POSTERN_GATEWAY");
        c.stdin(Stdio::null()).output().unwrap()
    };
    const REFUSED: i32 = 255;
    // (how, command, expected status, stderr must contain, stderr must not contain)
    let cases: Vec<(&str, Vec<&str>, i32, &str, &str)> = vec![
        ("user", vec!["exec", "web-01", "--", "exit 7"], 7, "", "postern: error"),
        ("user", vec!["exec", "dev-01", "--", "true"], REFUSED, "postern: error: access denied", ""),
        ("user", vec!["exec", "web-1", "--", "true"], REFUSED, "did you mean web-01?", ""),
        // dev-01 exists and is one letter away, but alice may not see it: never suggested.
        ("user", vec!["exec", "dev-02", "--", "true"], REFUSED, "access denied", "did you mean"),
        ("user", vec!["shell", "web-01", "-c", "exit 7"], 7, "", "postern: error"),
        ("user", vec!["shell", "dev-01", "-c", "true"], REFUSED, "postern: error: access denied", ""),
        ("user", vec!["shell", "web-1", "-c", "true"], REFUSED, "did you mean web-01?", ""),
        ("user", vec!["run", "--instances", "web-01", "-q", "--", "exit 7"], 1, "", "postern: error"),
        ("user", vec!["run", "--instances", "web-1", "--", "true"], REFUSED, "did you mean web-01?", ""),
        (
            "user",
            vec!["run", "--instances", "dev-01", "--", "true"],
            REFUSED,
            "postern: error: instance \"dev-01\": access denied",
            "",
        ),
        ("user", vec!["forward", "dev-01", "18080:80"], REFUSED, "postern: error: the gateway refused a forward", ""),
        ("user", vec!["forward", "web-1", "18080:80"], REFUSED, "did you mean web-01?", ""),
        ("user", vec!["ls", "--labels", "role=,"], REFUSED, "postern: error: label selector", ""),
        ("admin", vec!["exec", "web-01", "--", "exit 7"], 7, "", "postern: error"),
        (
            "admin",
            vec!["exec", "web-1", "--", "true"],
            REFUSED,
            "postern: error: no instance named \"web-1\"; did you mean web-01?",
            "",
        ),
        ("admin", vec!["shell", "web-01", "-c", "exit 7"], 7, "", "postern: error"),
        ("admin", vec!["shell", "nope", "-c", "true"], REFUSED, "postern: error: no instance named", ""),
    ];
    for (how, args, want, has, has_not) in cases {
        let out = if how == "user" { s.out(&args) } else { admin(&args) };
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(want), "{how} {args:?}: {err}");
        assert!(err.contains(has), "{how} {args:?}: {err}");
        assert!(has_not.is_empty() || !err.contains(has_not), "{how} {args:?}: {err}");
    }

    // Plain ssh: what OpenSSH users expect, the refusal on stderr and exit status 1 (the
    // marker the postern client reads is an exit-signal OpenSSH ignores).
    let ssh = |login: &str| {
        Command::new("ssh")
            .args(["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", s.dir.path().join("known_hosts").display()))
            .arg("-i")
            .arg(&s.key)
            .args(["-p", &s.gw.ssh_port.to_string(), &format!("{login}@127.0.0.1"), "true"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = ssh("alice%web-1");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("postern: access denied (or no such instance); did you mean web-01?"));

    // A forward the agent's tcp_allow refuses: the reason reaches ssh -L and postern forward.
    let port = free_tcp_port();
    let mut fwd = Command::new("ssh")
        .args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-N",
            "-o",
            "ExitOnForwardFailure=no",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", s.dir.path().join("known_hosts").display()))
        .arg("-i")
        .arg(&s.key)
        .arg("-L")
        .arg(format!("{port}:192.0.2.1:80"))
        .args(["-p", &s.gw.ssh_port.to_string(), "alice%web-01@127.0.0.1"])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("ssh -L listening", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    drop(std::net::TcpStream::connect(("127.0.0.1", port)));
    let mut err = std::io::BufReader::new(fwd.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    fwd.kill().unwrap();
    fwd.wait().unwrap();
    assert!(line.contains("open failed: administratively prohibited: web-01: destination 192.0.2.1:80"), "{line}");
    assert!(line.contains("tcp_allow"), "{line}");
    let out = s.out(&["forward", "web-01", &format!("{}:192.0.2.1:80", free_tcp_port())]);
    assert_eq!(out.status.code(), Some(255));
    let err = text(&out.stderr);
    assert!(
        err.contains("refused a forward to 192.0.2.1:80: web-01: destination 192.0.2.1:80 is not allowed"),
        "{err}"
    );

    // postern run shows each instance's output as it comes, prefixed with its name; the
    // files and the summary stay; --quiet shows only the summary.
    let out =
        s.out(&["run", "--instances", "web-01", "--output-dir", "r1", "--", "echo one; echo two >&2; printf three"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(stdout.starts_with("web-01: one\nweb-01: three\n"), "{stdout}");
    assert!(stdout.contains("1 of 1 succeeded"), "{stdout}");
    assert!(stderr.contains("web-01: two\n"), "{stderr}");
    assert_eq!(std::fs::read_to_string(s.dir.path().join("r1/web-01.stdout")).unwrap(), "one\nthree");
    let out = s.out(&["run", "--instances", "web-01", "--quiet", "--output-dir", "r2", "--", "echo one"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(!text(&out.stdout).contains("web-01: one"), "{}", text(&out.stdout));
    assert_eq!(std::fs::read_to_string(s.dir.path().join("r2/web-01.stdout")).unwrap(), "one\n");
    let out = s.out(&["run", "--instances", "web-01", "--json", "--output-dir", "r3", "--", "echo one"]);
    let summary: Value = serde_json::from_slice(&out.stdout).expect("--json prints only the summary");
    assert_eq!(summary["success"], 1);
}

/// Tokens, grants, agents and config users as an administrator sees them (issue 16, part 5).
#[test]
fn tokens_grants_agents_and_config_users() {
    let bob = tempfile::tempdir().unwrap();
    let bob_key = bob.path().join("bob");
    ssh_keygen(&bob_key, "bob");
    let bob_pub = std::fs::read_to_string(bob_key.with_extension("pub")).unwrap();
    let config = format!(
        "[[ssh.users]]\nname = \"bob\"\nkeys = [{:?}]\ninstances = [\"web-*\"]\nactions = [\"exec\"]\n",
        bob_pub.trim()
    );
    let oncall = "name = \"oncall\"\n[[statement]]\neffect = \"allow\"\nusers = [\"nobody-by-default\"]\nactions = [\"exec\"]\ninstances = [\"*\"]\n";
    let s = Setup::with_config(oncall, &config);

    // Config users and the built-in policy are listed, marked read-only.
    let users: Vec<Value> = serde_json::from_str(&s.admin(&["user", "list", "--json"])).unwrap();
    let b = users.iter().find(|u| u["name"] == "bob").expect("the config user is listed");
    assert_eq!((b["source"].as_str(), b["read_only"].as_bool()), (Some("config"), Some(true)));
    assert!(s.admin(&["user", "list"]).contains("config (read-only)"));
    let table = s.admin(&["policy", "list"]);
    assert!(table.lines().any(|l| l.starts_with("config") && l.contains("config (read-only)")), "{table}");
    let shown = s.admin(&["policy", "show", "config"]);
    assert!(
        shown.contains("read-only") && shown.contains("users = [\"bob\"]") && shown.contains("actions = [\"exec\"]"),
        "{shown}"
    );

    // Tokens: the name echoed, listed with their state, revoked, TTL capped.
    let out = s.admin(&["token", "create", "--name", "app-01", "--ttl", "10m"]);
    assert!(out.contains("name:    app-01"), "{out}");
    let token = out.lines().find_map(|l| l.strip_prefix("token:")).unwrap().trim().to_owned();
    let pin = out.lines().find_map(|l| l.strip_prefix("ca pin:")).unwrap().trim().to_owned();
    let list: Vec<Value> = serde_json::from_str(&s.admin(&["token", "list", "--json"])).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!((list[0]["name"].as_str(), list[0]["state"].as_str()), (Some("app-01"), Some("unused")));
    assert!(!s.admin(&["token", "list", "--json"]).contains(&token), "the secret is never listed");
    let id = list[0]["id"].as_str().unwrap().to_owned();
    assert!(s.admin(&["token", "revoke", &id]).contains("revoked"));
    let list: Vec<Value> = serde_json::from_str(&s.admin(&["token", "list", "--json"])).unwrap();
    assert_eq!(list[0]["state"], "revoked");
    let dir = tempfile::tempdir().unwrap();
    let out = Agent::try_join(&[], &s.gw.listen, &token, &pin, &dir.path().join("a"));
    assert!(!out.status.success(), "a revoked token enrolls nothing");
    let out = s.gw.postern(&["token", "revoke", &id]);
    assert_eq!(out.status.code(), Some(255), "revoked twice: {}", text(&out.stderr));
    let out = s.gw.postern(&["token", "create", "--ttl", "8d"]);
    assert_eq!(out.status.code(), Some(255));
    assert!(text(&out.stderr).contains("at most 7 days"), "{}", text(&out.stderr));

    // Agents: join refuses to replace an identity without --force; status reads as dates.
    let state = dir.path().join("b");
    let (t1, pin) = s.gw.token(&["--name", "app-02"]);
    assert!(Agent::try_join(&[], &s.gw.listen, &t1, &pin, &state).status.success());
    let (t2, _) = s.gw.token(&["--name", "app-03"]);
    let out = Agent::try_join(&[], &s.gw.listen, &t2, &pin, &state);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("already holds the identity of app-02") && text(&out.stderr).contains("--force")
    );
    let out = Command::new(bin("postern-agent"))
        .arg("--state-dir")
        .arg(&state)
        .args(["join", "--force", "--gateway", &s.gw.listen, "--token", &t2, "--ca-pin", &pin])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = Command::new(bin("postern-agent")).arg("--state-dir").arg(&state).arg("status").output().unwrap();
    let status = text(&out.stdout);
    assert!(status.contains("name:         app-03"), "{status}");
    let expires = status.lines().find(|l| l.starts_with("cert expires:")).unwrap();
    assert!(expires.contains(" UTC (in ") && expires.contains("-"), "{expires}");

    // Grants: STATE for every grant (also --json); an expiring one ends up "expired", with
    // a grant.expired event.
    s.admin(&["grant", "--user", "alice", "--policy", "oncall", "--for", "2s", "--reason", "INC-1"]);
    s.admin(&["grant", "--user", "alice", "--policy", "oncall", "--for", "1h", "--reason", "INC-2"]);
    s.admin(&["revoke", "--user", "alice"]);
    let states = || -> Vec<String> {
        let v: Vec<Value> = serde_json::from_str(&s.admin(&["grants", "--all", "--json"])).unwrap();
        let mut st: Vec<String> = v.iter().map(|g| g["state"].as_str().unwrap().to_owned()).collect();
        st.sort();
        st
    };
    assert_eq!(states(), ["revoked", "revoked"]);
    s.admin(&["grant", "--user", "alice", "--policy", "oncall", "--for", "2s", "--reason", "INC-3"]);
    assert!(s.admin(&["grants"]).contains("active"));
    wait_until("grant expired", Duration::from_secs(10), || states().contains(&"expired".to_owned()));
    assert!(s.admin(&["grants", "--all"]).contains("expired"));
    wait_until("grant.expired event", Duration::from_secs(5), || {
        s.gw.audit_events().iter().any(|e| e["event"] == "grant.expired" && e["reason"].is_null())
    });
    let n = s.gw.audit_events().iter().filter(|e| e["event"] == "grant.expired").count();
    assert_eq!(n, 1, "only the grant that expired (not the revoked ones)");
    assert!(s.gw.audit_events().iter().any(|e| e["event"] == "token.revoked" && e["token_id"] == id.as_str()));
}
