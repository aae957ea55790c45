//! Configuration reload end to end (SIGHUP and `postern reload`, docs/operations.md,
//! "Reload"): a live interactive `ssh` session survives reloads that change other users and
//! its own limits (it is typed into after each), and ends when a reload lowers its
//! `max_session` below its age or removes its user; a user added to the file logs in
//! without a restart; a changed listen address is reported as needing a restart while the
//! old port keeps serving; a broken file changes nothing; a raised `log_level` shows debug
//! lines; webhooks added by a reload get the events after it, replaced ones nothing more.
//! Every reload is awaited through its audit event (or `postern reload`'s answer), not a
//! sleep.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postern_e2e::*;
use serde_json::Value;

/// A gateway whose `[ssh]` users and settings a test rewrites, an agent `web-01`, and keys
/// for `alice`, `bob` and `carol`.
struct Setup {
    gw: Gateway,
    _agent: Agent,
    dir: tempfile::TempDir,
    known_hosts: PathBuf,
    /// The file as the harness wrote it, up to and inside `[ssh]` (listen addresses).
    header: String,
}

/// `[[ssh.users]]` for `name` with its key, reaching `web-*`, and `extra` lines.
fn user(dir: &Path, name: &str, extra: &str) -> String {
    let public = std::fs::read_to_string(dir.join(format!("{name}.pub"))).unwrap();
    format!(
        "[[ssh.users]]\nname = {name:?}\nkeys = [{:?}]\ninstances = [\"web-*\"]\nallow_root = true\n{extra}",
        public.trim()
    )
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        for name in ["alice", "bob", "carol"] {
            ssh_keygen(&dir.path().join(name), name);
        }
        let body = format!("idle_timeout = \"0\"\nmax_session = \"1h\"\n{}", user(dir.path(), "alice", ""));
        let gw = Gateway::start(&body);
        let written = std::fs::read_to_string(gw.config_path()).unwrap();
        let header = written.strip_suffix(&format!("{body}\n")).unwrap().to_owned();
        let agent = Agent::start(&gw, "web-01", vec![], &gw.listen);
        let known_hosts = dir.path().join("known_hosts");
        gw.write_known_hosts(&known_hosts);
        Setup { gw, _agent: agent, dir, known_hosts, header }
    }

    fn key(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Rewrite gateway.toml: the harness's header, then `body` (`[ssh]` keys first).
    fn write_config(&self, body: &str) {
        std::fs::write(self.gw.config_path(), format!("{}{body}\n", self.header)).unwrap();
    }

    fn user(&self, name: &str, extra: &str) -> String {
        user(self.dir.path(), name, extra)
    }

    fn ssh_cmd(&self, port: u16, name: &str, extra: &[&str]) -> Command {
        let mut c = Command::new("timeout");
        c.args(["60", "ssh", "-p", &port.to_string(), "-i"])
            .arg(self.key(name))
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o"])
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args(extra)
            .arg(format!("{name}%web-01@127.0.0.1"));
        c
    }

    /// `ssh NAME%web-01@127.0.0.1 echo ok` on the SSH door: whether it ran.
    fn can_run(&self, name: &str) -> bool {
        let out = self.ssh_cmd(self.gw.ssh_port, name, &[]).arg("echo ok-$((40+2))").stdin(Stdio::null()).output();
        let out = out.unwrap();
        out.status.success() && text(&out.stdout).contains("ok-42")
    }

    /// `postern reload`, asserted to succeed; its output.
    fn reload(&self) -> String {
        let out = self.gw.postern(&["reload"]);
        assert!(out.status.success(), "postern reload: {}{}", text(&out.stdout), text(&out.stderr));
        text(&out.stdout)
    }

    /// The `n`th (from 1) event named `name`, once written.
    fn wait_event(&self, name: &str, n: usize) -> Value {
        let mut found = None;
        wait_until(&format!("audit event {name} #{n}"), Duration::from_secs(20), || {
            found = self.gw.audit_events().into_iter().filter(|e| e["event"] == name).nth(n - 1);
            found.is_some()
        });
        found.unwrap()
    }

    fn gateway_log(&self) -> String {
        self.gw.proc.as_ref().unwrap().log_text()
    }
}

/// An interactive `ssh -tt` session (a login shell on a PTY) that a test types into.
struct Interactive {
    child: Child,
    stdin: ChildStdin,
    seen: Arc<Mutex<String>>,
    marks: u32,
}

impl Interactive {
    fn start(s: &Setup, name: &str) -> Interactive {
        let mut child = s
            .ssh_cmd(s.gw.ssh_port, name, &["-tt"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let seen = Arc::new(Mutex::new(String::new()));
        for mut pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()) as Box<dyn Read + Send>,
        ] {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    seen.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let stdin = child.stdin.take().unwrap();
        let mut live = Interactive { child, stdin, seen, marks: 0 };
        live.type_and_see();
        live
    }

    fn seen(&self) -> String {
        self.seen.lock().unwrap().clone()
    }

    /// Type a command and wait for its output (computed remotely, so the echo of what was
    /// typed does not count).
    fn type_and_see(&mut self) {
        self.marks += 1;
        let n = self.marks;
        writeln!(self.stdin, "echo mark-$((1000+{n}))").unwrap();
        self.stdin.flush().unwrap();
        let want = format!("mark-{}", 1000 + n);
        let start = Instant::now();
        while !self.seen().contains(&want) {
            assert!(self.child.try_wait().unwrap().is_none(), "the session ended; it showed:\n{}", self.seen());
            assert!(start.elapsed() < Duration::from_secs(15), "no {want:?} from the session:\n{}", self.seen());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait (bounded) for the client to exit; its status and everything it showed.
    fn ended(mut self, within: Duration) -> (Option<i32>, String) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The reader threads finish with the pipes.
                let _ = wait_until_quiet(&self.seen);
                return (status.code(), self.seen());
            }
            if start.elapsed() > within {
                let _ = self.child.kill();
                panic!("the session was still running after {within:?}; it showed:\n{}", self.seen());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// After the client exited, its last output may still be in the reader threads: wait until
/// the buffer stops growing (bounded).
fn wait_until_quiet(seen: &Arc<Mutex<String>>) -> usize {
    let mut last = usize::MAX;
    let start = Instant::now();
    loop {
        let now = seen.lock().unwrap().len();
        if now == last || start.elapsed() > Duration::from_secs(2) {
            return now;
        }
        last = now;
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn keys(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_owned()).collect()
}

/// The check: a reload re-evaluates live sessions against the limits it brings. Disabled
/// (the enforcer ignoring a lowered `max_session`), the session runs on (docs/security.md).
#[test]
fn a_live_session_survives_reloads_and_ends_when_sighup_lowers_its_max_session() {
    let s = Setup::new();
    let mut live = Interactive::start(&s, "alice");
    let alice = s.user("alice", "");

    // A change to another user: applied, the session untouched.
    s.write_config(&format!("idle_timeout = \"0\"\nmax_session = \"1h\"\n{alice}{}", s.user("bob", "")));
    let out = s.reload();
    assert!(out.contains("applied: ssh.users"), "{out}");
    assert!(!out.contains("restart"), "{out}");
    live.type_and_see();
    assert!(s.can_run("bob"), "bob was added to the file");

    // Its own limit lowered, still above its age: it goes on.
    s.write_config(&format!("idle_timeout = \"0\"\nmax_session = \"30m\"\n{alice}"));
    let out = s.reload();
    assert!(out.contains("applied: ssh.max_session, ssh.users"), "{out}");
    live.type_and_see();
    let event = s.wait_event("config.reloaded", 2);
    assert_eq!(keys(&event["changed"]), ["ssh.max_session", "ssh.users"]);
    assert!(event["by"].as_str().unwrap().starts_with("local-admin(uid="), "{event}");

    // SIGHUP with alice's own max_session below the session's age: it ends within seconds,
    // with the usual notice and a session.terminated event.
    wait_until("the session older than 2s", Duration::from_secs(20), || {
        let out = s.gw.postern(&["sessions", "--json"]);
        let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        rows.iter().any(|r| r["user"] == "alice" && r["duration_secs"].as_i64().unwrap() >= 3)
    });
    s.write_config(&format!(
        "idle_timeout = \"0\"\nmax_session = \"30m\"\n{}",
        s.user("alice", "max_session = \"2s\"\n")
    ));
    s.gw.proc.as_ref().unwrap().signal(nix::sys::signal::Signal::SIGHUP);
    let event = s.wait_event("config.reloaded", 3);
    let reloaded_at = Instant::now();
    assert_eq!(event["by"], "signal");
    assert_eq!(keys(&event["changed"]), ["ssh.users"]);
    assert!(keys(&event["needs_restart"]).is_empty(), "{event}");
    let (code, seen) = live.ended(Duration::from_secs(10));
    assert!(reloaded_at.elapsed() < Duration::from_secs(5), "ended {:?} after the reload", reloaded_at.elapsed());
    assert_eq!(code, Some(255));
    assert!(seen.contains("session ended: maximum session length of 2s reached (the limit was lowered)"), "{seen}");
    let terminated = s.wait_event("session.terminated", 1);
    assert_eq!(terminated["user"], "alice");
    assert_eq!(terminated["actor"], "policy");
    let mut end = None;
    wait_until("alice's shell session.end", Duration::from_secs(10), || {
        end = s.gw.audit_events().into_iter().find(|e| e["event"] == "session.end" && e["kind"] == "shell");
        end.is_some()
    });
    let end = end.unwrap();
    assert_eq!((&end["user"], &end["end_reason"]), (&Value::from("alice"), &Value::from("terminated")));
    assert!(end["terminated_because"].as_str().unwrap().contains("the limit was lowered"), "{end}");
    // A new session of alice gets the new limit (and runs: the limit is not yet reached).
    assert!(s.can_run("alice"));
}

/// The check: a reload that removes a user ends their live session and refuses them after.
/// Disabled (the reload leaving the users in force as they were), the session runs on and
/// the removed user still logs in (docs/security.md).
#[test]
fn a_reload_ends_the_session_of_a_removed_user_and_lets_a_new_one_in() {
    let s = Setup::new();
    let live = Interactive::start(&s, "alice");
    assert!(!s.can_run("carol"), "carol is not in the file yet");

    // alice removed, carol added: alice's live session ends as on revocation; carol logs in.
    s.write_config(&format!("idle_timeout = \"0\"\nmax_session = \"1h\"\n{}", s.user("carol", "")));
    let reloaded_at = Instant::now();
    let out = s.reload();
    assert!(out.contains("applied: ssh.users"), "{out}");
    let (code, seen) = live.ended(Duration::from_secs(10));
    assert!(reloaded_at.elapsed() < Duration::from_secs(5), "ended {:?} after the reload", reloaded_at.elapsed());
    assert_eq!(code, Some(255));
    assert!(seen.contains("session ended: access revoked (user alice is disabled or removed)"), "{seen}");
    let terminated = s.wait_event("session.terminated", 1);
    assert_eq!(terminated["user"], "alice");
    assert!(terminated["reason"].as_str().unwrap().starts_with("access revoked"), "{terminated}");
    assert!(!s.can_run("alice"), "alice was removed from the file");
    assert!(s.can_run("carol"), "carol was added to the file");

    // Instance access taken away (the user stays): refused too.
    s.write_config(&format!(
        "idle_timeout = \"0\"\nmax_session = \"1h\"\n{}",
        s.user("carol", "").replace("instances = [\"web-*\"]", "instances = [\"db-*\"]")
    ));
    s.reload();
    assert!(!s.can_run("carol"), "carol no longer reaches web-*");
}

/// `[ssh] listen` changed: listed as needing a restart, the old port keeps serving (and the
/// user change in the same reload applies). A syntax error or a bad value: non-zero exit,
/// the file and line (or key) named, nothing changed, `config.reload_failed` written.
#[test]
fn a_changed_listen_address_needs_a_restart_and_an_invalid_file_changes_nothing() {
    let s = Setup::new();
    let alice = s.user("alice", "");
    let new_port = free_tcp_port();
    let moved = s.header.replace(&format!("127.0.0.1:{}", s.gw.ssh_port), &format!("127.0.0.1:{new_port}"));
    assert_ne!(moved, s.header);
    std::fs::write(
        s.gw.config_path(),
        format!("{moved}idle_timeout = \"0\"\nmax_session = \"1h\"\n{alice}{}\n", s.user("bob", "")),
    )
    .unwrap();
    let out = s.reload();
    assert!(out.contains("applied: ssh.users"), "{out}");
    assert!(out.contains("needs a restart to take effect (unchanged until then): ssh.listen"), "{out}");
    let event = s.wait_event("config.reloaded", 1);
    assert_eq!(keys(&event["needs_restart"]), ["ssh.listen"]);
    assert!(s.can_run("bob"), "bob logs in on the old port");
    assert!(std::net::TcpStream::connect(("127.0.0.1", new_port)).is_err(), "nothing listens on the new port yet");

    // A syntax error on line 3 of the body: nothing changes.
    let lines_before = moved.lines().count();
    std::fs::write(s.gw.config_path(), format!("{moved}idle_timeout = \"0\"\n[[ssh.users]\nname = \"x\"\n")).unwrap();
    let out: Output = s.gw.postern(&["reload"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    let path = s.gw.config_path().display().to_string();
    assert!(err.contains(&format!("{path} line {}, column", lines_before + 2)), "{err}");
    assert!(err.contains("nothing was changed"), "{err}");
    let failed = s.wait_event("config.reload_failed", 1);
    assert!(failed["error"].as_str().unwrap().starts_with(&format!("{path} line {}", lines_before + 2)), "{failed}");
    assert!(s.can_run("alice") && s.can_run("bob"), "the configuration in force stays");

    // A bad value: the key is named; bob (removed in that file) still gets in.
    std::fs::write(s.gw.config_path(), format!("{moved}idle_timeout = \"0\"\nmax_session = \"soon\"\n{alice}\n"))
        .unwrap();
    let out = s.gw.postern(&["reload"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("ssh.max_session"), "{}", text(&out.stderr));
    s.wait_event("config.reload_failed", 2);
    assert!(s.can_run("bob"), "the invalid file was not applied");
}

/// `log_level` raised by a reload: a debug line of the gateway appears (a connection that
/// closes before the SSH version exchange logs one, at debug only).
#[test]
fn a_reload_that_raises_log_level_shows_debug_lines() {
    let s = Setup::new();
    let handshake_failures = || s.gateway_log().matches("ssh handshake failed").count();
    let poke = || {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", s.gw.ssh_port)).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
    };
    poke();
    let alice = s.user("alice", "");
    // A top-level key, so before the header's first table.
    std::fs::write(
        s.gw.config_path(),
        format!("log_level = \"debug\"\n{}idle_timeout = \"0\"\nmax_session = \"1h\"\n{alice}\n", s.header),
    )
    .unwrap();
    assert_eq!(handshake_failures(), 0, "at info, the failed handshake is not logged");
    let out = s.reload();
    assert!(out.contains("applied: log_level"), "{out}");
    poke();
    wait_until("a debug line in the gateway's log", Duration::from_secs(10), || handshake_failures() == 1);
}

/// A webhook receiver on loopback: the `X-Postern-Event` of every POST it got, answered 200
/// (one request per connection).
fn receiver() -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let seen = got.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            // Headers, then as much body as Content-Length says.
            let complete = |r: &[u8]| {
                let text = String::from_utf8_lossy(r);
                let Some(end) = text.find("\r\n\r\n") else { return false };
                let length = text[..end]
                    .lines()
                    .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                r.len() >= end + 4 + length
            };
            while !complete(&request) {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&request).into_owned();
            if let Some(event) = text
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("x-postern-event:").map(|v| v.trim().to_owned()))
            {
                seen.lock().unwrap().push(event);
            }
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (port, got)
}

/// `[[audit.webhooks]]` added by a reload receive the events written after it (the
/// reload's own `config.reloaded` first); replaced ones receive nothing more.
#[test]
fn webhooks_change_on_reload() {
    let s = Setup::new();
    let (first_port, first) = receiver();
    let (second_port, second) = receiver();
    let alice = s.user("alice", "");
    let hook = |port: u16| {
        format!("[[audit.webhooks]]\nurl = \"http://127.0.0.1:{port}/hook\"\nevents = [\"config.*\", \"session.*\"]\n")
    };
    s.write_config(&format!("idle_timeout = \"0\"\nmax_session = \"1h\"\n{alice}{}", hook(first_port)));
    assert!(s.reload().contains("applied: audit.webhooks"));
    wait_until("config.reloaded at the first webhook", Duration::from_secs(10), || {
        first.lock().unwrap().iter().any(|e| e == "config.reloaded")
    });

    s.write_config(&format!("idle_timeout = \"0\"\nmax_session = \"1h\"\n{alice}{}", hook(second_port)));
    assert!(s.reload().contains("applied: audit.webhooks"));
    assert!(s.can_run("alice"));
    wait_until("the reload and alice's session at the second webhook", Duration::from_secs(10), || {
        let got = second.lock().unwrap();
        ["config.reloaded", "session.start", "session.end"].iter().all(|e| got.iter().any(|g| g == e))
    });
    assert_eq!(*first.lock().unwrap(), ["config.reloaded"], "the replaced webhook got nothing more");
}
