//! The SSH door against connections that never authenticate (OpenSSH's MaxStartups and
//! LoginGraceTime): a per-source cap closes extra connections at once while others still
//! get in, and a connection not authenticated within the grace time is closed. Hostile
//! clients (no version line, an 8 MB one, a 4 GiB packet claim, a stalled key exchange,
//! half-open floods) are closed promptly with the gateway's memory bounded.
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

/// The gateway's resident memory, in KiB.
fn gateway_rss_kib(s: &Setup) -> u64 {
    let pid = s.gw.proc.as_ref().unwrap().child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// One SSH binary packet, unencrypted (before the first key exchange): length, padding
/// length, payload, at least 4 bytes of padding to a multiple of 8 (RFC 4253 §6).
fn clear_packet(payload: &[u8]) -> Vec<u8> {
    let mut padding = 8 - (5 + payload.len()) % 8;
    if padding < 4 {
        padding += 8;
    }
    let mut p = Vec::new();
    p.extend_from_slice(&((1 + payload.len() + padding) as u32).to_be_bytes());
    p.push(padding as u8);
    p.extend_from_slice(payload);
    p.extend(std::iter::repeat_n(0u8, padding));
    p
}

/// A client KEXINIT (RFC 4253 §7.1) the gateway accepts: it answers and waits for the key
/// exchange to go on.
fn client_kexinit() -> Vec<u8> {
    let mut m = vec![20u8];
    m.extend_from_slice(&[7u8; 16]);
    for list in [
        "curve25519-sha256",
        "ssh-ed25519",
        "aes256-gcm@openssh.com",
        "aes256-gcm@openssh.com",
        "hmac-sha2-256",
        "hmac-sha2-256",
        "none",
        "none",
        "",
        "",
    ] {
        m.extend_from_slice(&(list.len() as u32).to_be_bytes());
        m.extend_from_slice(list.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&0u32.to_be_bytes());
    clear_packet(&m)
}

/// Hostile clients, all at once from 127.0.0.1: one that never sends its version line, one
/// that sends an 8 MB one, one that claims a 4 GiB packet, one that stalls in the middle of
/// the key exchange, and a flood of half-open connections (a partial version line, then the
/// client's sending side closed). Each is closed promptly — at once when the input is
/// invalid, at the login grace time when it is merely silent — while a real `ssh` login from
/// another address succeeds at the same time, and the gateway's memory stays bounded.
#[test]
fn hostile_clients_are_closed_promptly_with_bounded_memory_while_others_log_in() {
    let s = Setup::new("login_grace_time = \"3s\"\nmax_startups_per_source = 20\nmax_startups = 100");
    // Warm up (a first login allocates what every login shares), then measure.
    let (out, _) = s.whoami_from("127.0.0.1");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rss_before = gateway_rss_kib(&s);
    // Each hostile client is let in (has its place among the startups) before the flood
    // from the same address begins, which fills the places left and is closed beyond them.
    let admitted = std::sync::Barrier::new(7);
    let version = |c: &mut TcpStream| {
        assert!(first_bytes(c).starts_with(b"SSH-2.0-Postern"));
        admitted.wait();
    };

    std::thread::scope(|scope| {
        let silent = scope.spawn(|| {
            let mut c = s.connect();
            version(&mut c);
            until_closed(&mut c, Duration::from_secs(10))
        });
        let huge_banners: Vec<_> = (0..3)
            .map(|_| {
                scope.spawn(|| {
                    let mut c = s.connect();
                    version(&mut c);
                    // 8 MB with no end of line; the gateway stops reading long before.
                    let chunk = vec![b'A'; 64 * 1024];
                    let start = Instant::now();
                    let mut sent = 0usize;
                    while sent < 8 * 1024 * 1024 && c.write_all(&chunk).is_ok() {
                        sent += chunk.len();
                    }
                    (until_closed(&mut c, Duration::from_secs(10)).max(start.elapsed()), sent)
                })
            })
            .collect();
        let huge_packet = scope.spawn(|| {
            let mut c = s.connect();
            version(&mut c);
            c.write_all(b"SSH-2.0-OpenSSH_9.6 hostile\r\n").unwrap();
            // Length 0xFFFFFFFF, then a little of the "packet".
            c.write_all(&[0xFF, 0xFF, 0xFF, 0xFF, 4, 20, 0, 0, 0, 0, 0, 0]).unwrap();
            until_closed(&mut c, Duration::from_secs(10))
        });
        let mid_kex = scope.spawn(|| {
            let mut c = s.connect();
            c.write_all(b"SSH-2.0-OpenSSH_9.6 stalls\r\n").unwrap();
            c.write_all(&client_kexinit()).unwrap();
            // The gateway answers with its own KEXINIT (after its version line), then waits
            // for the key exchange that never comes.
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.windows(17).any(|w| w == b"curve25519-sha256") {
                let n = c.read(&mut buf).unwrap();
                assert!(n > 0, "closed before answering the key exchange");
                got.extend_from_slice(&buf[..n]);
            }
            admitted.wait();
            until_closed(&mut c, Duration::from_secs(10))
        });
        let half_open = scope.spawn(|| {
            admitted.wait();
            let start = Instant::now();
            let mut held: Vec<TcpStream> = (0..200)
                .filter_map(|_| TcpStream::connect(("127.0.0.1", s.gw.ssh_port)).ok())
                .map(|mut c| {
                    let _ = c.write_all(b"SSH-2.0-half");
                    let _ = c.shutdown(std::net::Shutdown::Write);
                    c
                })
                .collect();
            for c in &mut held {
                until_closed(c, Duration::from_secs(10));
            }
            (held.len(), start.elapsed())
        });

        // Meanwhile a real login from another address.
        let (out, login) = s.whoami_from("127.0.0.2");
        assert!(out.status.success(), "ssh from 127.0.0.2 failed during the attack: {}", text(&out.stderr));
        assert!(login < Duration::from_secs(5), "ssh from 127.0.0.2 took {login:?} during the attack");

        let took = silent.join().unwrap();
        eprintln!("login from 127.0.0.2 during the attack: {login:?}; silent client closed after {took:?}");
        assert!(took < Duration::from_secs(5), "silent client closed after {took:?}");
        for h in huge_banners {
            let (took, sent) = h.join().unwrap();
            eprintln!("8 MB version line: closed after {took:?}, {sent} bytes written");
            assert!(took < Duration::from_secs(2), "8 MB version line: closed after {took:?}");
        }
        let took = huge_packet.join().unwrap();
        eprintln!("4 GiB packet claim: closed after {took:?}");
        assert!(took < Duration::from_secs(2), "4 GiB packet claim: closed after {took:?}");
        let took = mid_kex.join().unwrap();
        eprintln!("stalled key exchange: closed after {took:?}");
        assert!(took < Duration::from_secs(5), "stalled key exchange: closed after {took:?}");
        let (n, took) = half_open.join().unwrap();
        eprintln!("{n} half-open connections: all closed after {took:?}");
        assert_eq!(n, 200);
        assert!(took < Duration::from_secs(5), "200 half-open connections: all closed after {took:?}");
    });

    let rss_after = gateway_rss_kib(&s);
    eprintln!("gateway RSS {rss_before} KiB before the attack, {rss_after} KiB after");
    assert!(rss_after < rss_before + 32 * 1024, "gateway RSS grew from {rss_before} KiB to {rss_after} KiB");
    // And the attacked address can log in again.
    let (out, _) = s.whoami_from("127.0.0.1");
    assert!(out.status.success(), "{}", text(&out.stderr));
}
