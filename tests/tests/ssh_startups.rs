//! The SSH door against connections that never authenticate (OpenSSH's MaxStartups and
//! LoginGraceTime): a per-source cap closes extra connections at once while others still
//! get in, and a connection not authenticated within the grace time is closed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use postern_e2e::*;

/// A gateway with `ssh_settings` in `[ssh]` and user alice, and her key.
struct Setup {
    gw: Gateway,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new(ssh_settings: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("alice");
        sh(&format!("ssh-keygen -q -t ed25519 -N '' -C test -f {}", key.display()));
        let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
        let gw = Gateway::start(&format!(
            "{ssh_settings}\n[[ssh.users]]\nname = \"alice\"\nkeys = [{:?}]\ninstances = [\"web-*\"]\nallow_root = true\n",
            public.trim()
        ));
        gw.write_known_hosts(&dir.path().join("known_hosts"));
        Setup { gw, dir }
    }

    fn ssh_cmd(&self, source: &str, args: &[&str]) -> Command {
        let mut c = Command::new("timeout");
        c.args(["30", "ssh", "-p", &self.gw.ssh_port.to_string(), "-b", source, "-i"])
            .arg(self.key())
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o"])
            .arg(format!("UserKnownHostsFile={}", self.dir.path().join("known_hosts").display()))
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// `ssh -b SOURCE alice@127.0.0.1 whoami` (a gateway command) and how long it took.
    fn whoami_from(&self, source: &str) -> (Output, Duration) {
        let start = Instant::now();
        let out = self.ssh_cmd(source, &["alice@127.0.0.1", "whoami"]).output().unwrap();
        (out, start.elapsed())
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("alice")
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.gw.ssh_port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }
}

/// Read what the server sends first: its version line, or nothing (EOF or reset) when it
/// closed the connection at once.
fn first_bytes(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(n) => buf[..n].to_vec(),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => Vec::new(),
        Err(e) => panic!("no answer from the gateway: {e}"),
    }
}

/// Read until the server closes the connection; how long that took.
fn until_closed(s: &mut TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return start.elapsed(),
        }
    }
    panic!("the connection was still open after {limit:?}");
}

fn still_open(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut buf = [0u8; 4096];
    matches!(s.read(&mut buf), Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut))
}

#[test]
fn idle_connections_beyond_the_per_source_cap_are_closed_at_once() {
    let s = Setup::new("max_startups_per_source = 3\nmax_startups = 20");
    // Three idle connections (they never send a version line) are let in...
    let mut held: Vec<TcpStream> = (0..3).map(|_| s.connect()).collect();
    for c in &mut held {
        assert!(first_bytes(c).starts_with(b"SSH-2.0-Postern"), "the first three are served");
    }
    // ... the next ones from the same address are closed at once, without a version line.
    for _ in 0..5 {
        let mut extra = s.connect();
        let start = Instant::now();
        let got = first_bytes(&mut extra);
        assert!(got.is_empty(), "a connection beyond the per-source cap was served: {:?}", text(&got));
        assert!(start.elapsed() < Duration::from_secs(2), "closed, but late: {:?}", start.elapsed());
    }
    // Another source address still gets in, quickly.
    let (out, took) = s.whoami_from("127.0.0.2");
    assert!(out.status.success(), "ssh from 127.0.0.2 failed: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("127.0.0.2"), "{}", text(&out.stdout));
    assert!(took < Duration::from_secs(5), "ssh from 127.0.0.2 took {took:?}");
    // The held connections are untouched, and closing them gives their places back.
    for c in &mut held {
        assert!(still_open(c));
    }
    drop(held);
    let back = wait_until("places given back", Duration::from_secs(5), || {
        let mut c = s.connect();
        first_bytes(&mut c).starts_with(b"SSH-2.0-Postern")
    });
    assert!(back < Duration::from_secs(5));
    let (out, _) = s.whoami_from("127.0.0.1");
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn connections_not_authenticated_within_the_grace_time_are_closed() {
    let s = Setup::new("login_grace_time = \"2s\"");
    // Silent after connecting: closed during the version exchange.
    let mut silent = s.connect();
    assert!(first_bytes(&mut silent).starts_with(b"SSH-2.0-Postern"));
    // Through the version exchange, then silent: closed during key exchange/authentication.
    let mut stalled = s.connect();
    stalled.write_all(b"SSH-2.0-OpenSSH_9.6 stalled\r\n").unwrap();
    let took = until_closed(&mut silent, Duration::from_secs(10));
    assert!(took > Duration::from_millis(1000) && took < Duration::from_secs(5), "silent closed after {took:?}");
    let took = until_closed(&mut stalled, Duration::from_secs(5));
    assert!(took < Duration::from_secs(5), "stalled closed after {took:?}");

    // An authenticated connection outlives the grace time.
    let mut held = s.ssh_cmd("127.0.0.1", &["-N", "alice@127.0.0.1"]).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert!(held.try_wait().unwrap().is_none(), "an authenticated connection was closed");
    let _ = held.kill();
    let _ = held.wait();
}

/// The client SDK (and so `postern ls/exec/run`) retries a connection the gateway closed
/// before its banner because too many from this address were still authenticating: many
/// clients at once from one address all get through.
#[test]
fn clients_turned_away_by_the_startup_cap_retry_and_get_in() {
    let s = Setup::new("max_startups_per_source = 1");
    let clients: Vec<_> = (0..8)
        .map(|_| {
            Command::new(bin("postern"))
                .args(["ls", "--json", "--gateway", &format!("127.0.0.1:{}", s.gw.ssh_port), "--user", "alice", "-i"])
                .arg(s.key())
                .arg("--known-hosts")
                .arg(s.dir.path().join("known_hosts"))
                .env_remove("SSH_AUTH_SOCK")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in clients {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "postern ls failed: {}", text(&out.stderr));
    }
}
