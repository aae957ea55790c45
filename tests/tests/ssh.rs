//! The SSH front door with stock OpenSSH clients: ssh, scp, sftp, -L forwards, and
//! passthrough to a real sshd, all on loopback.
//!
//! (Over 600 lines, on purpose: one test binary per area keeps link times down on this
//! 2-core machine; the tests share one set-up.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use postern_e2e::*;

/// A user key, a gateway that allows it on `web-*`, and an ssh config from `postern ssh-config`.
struct SshSetup {
    gw: Gateway,
    dir: tempfile::TempDir,
}

fn keygen(path: &Path) {
    sh(&format!("ssh-keygen -q -t ed25519 -N '' -C test -f {}", path.display()));
}

impl SshSetup {
    fn new() -> SshSetup {
        Self::with("", "")
    }

    /// `ssh_settings` go into `[ssh]`; `more` is appended after alice's user entry.
    fn with(ssh_settings: &str, more: &str) -> SshSetup {
        Self::on(&format!("127.0.0.1:{}", free_udp_port()), ssh_settings, more)
    }

    /// As `with`, with the agent tunnel listening on `listen`.
    fn on(listen: &str, ssh_settings: &str, more: &str) -> SshSetup {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("alice");
        keygen(&key);
        let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
        let users = format!(
            "{ssh_settings}\n[[ssh.users]]\nname = \"alice\"\nkeys = [{:?}]\ninstances = [\"web-*\"]\nallow_root = true\n{more}",
            public.trim()
        );
        let gw = Gateway::start_on(listen, &users);
        let setup = SshSetup { gw, dir };
        // Client config exactly as printed by `postern ssh-config`, plus the identity to use.
        let kh = setup.known_hosts();
        let out = setup.gw.postern(&["ssh-config", "--user", "alice", "--known-hosts-file", kh.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let printed = text(&out.stdout);
        let (config, rest) = printed.split_once("\n\n").unwrap();
        let ca_line = rest.lines().find(|l| l.starts_with("@cert-authority")).unwrap();
        assert!(!printed.contains("StrictHostKeyChecking"));
        std::fs::write(&kh, format!("{ca_line}\n")).unwrap();
        std::fs::write(
            setup.config(),
            format!(
                "{config}\nHost *\n    IdentityFile {}\n    IdentitiesOnly yes\n    BatchMode yes\n    ConnectTimeout 10\n",
                key.display()
            ),
        )
        .unwrap();
        setup
    }

    fn known_hosts(&self) -> PathBuf {
        self.dir.path().join("known_hosts")
    }
    fn config(&self) -> PathBuf {
        self.dir.path().join("ssh_config")
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("timeout");
        c.arg("180").arg(program).arg("-F").arg(self.config());
        c
    }

    /// The form without client config: `ssh -p PORT -i KEY USER%INSTANCE@127.0.0.1 COMMAND`,
    /// trusting only the gateway's host CA. `extra` are more ssh options.
    fn ssh_no_config(&self, key: &Path, extra: &[String], login: &str, command: &str) -> Output {
        Command::new("timeout")
            .args(["30", "ssh", "-p", &self.gw.ssh_port.to_string(), "-i"])
            .arg(key)
            .args(extra)
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o"])
            .arg(format!("UserKnownHostsFile={}", self.known_hosts().display()))
            .args([login, command])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn ssh(&self, args: &[&str]) -> Output {
        self.cmd("ssh").args(args).stdin(Stdio::null()).output().unwrap()
    }
}

#[test]
fn exec_stdin_stderr_exit_status_and_recording() {
    let s = SshSetup::new();
    let _agent = Agent::start(&s.gw, "web-01", vec![], &s.gw.listen);

    let out = s.ssh(&["alice@web-01.postern", "uname -s; echo oops >&2; exit 3"]);
    assert_eq!(text(&out.stdout), "Linux\n", "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "oops\n");
    assert_eq!(out.status.code(), Some(3));

    // stdin piping: tar through the session.
    let src = s.dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/file.txt"), "payload\n").unwrap();
    let dest = s.dir.path().join("dest");
    std::fs::create_dir_all(&dest).unwrap();
    let mut tar = Command::new("tar").arg("c").arg("-C").arg(&src).arg(".").stdout(Stdio::piped()).spawn().unwrap();
    let out = s
        .cmd("ssh")
        .args(["alice@web-01.postern", &format!("tar x -C {}", dest.display())])
        .stdin(tar.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(tar.wait().unwrap().success());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(dest.join("sub/file.txt")).unwrap(), "payload\n");

    // The form without any client config: user%instance@gateway, strict host checking.
    let out = s.ssh_no_config(&s.dir.path().join("alice"), &[], "alice%web-01@127.0.0.1", "echo no-config");
    assert_eq!(text(&out.stdout), "no-config\n", "{}", text(&out.stderr));

    // Logged: a session.start/end pair with logged=true and an asciicast recording.
    let events = s.gw.audit_events();
    let start = events.iter().find(|e| e["event"] == "session.start" && e["kind"] == "exec").unwrap();
    assert_eq!(start["logged"], true);
    assert_eq!(start["user"], "alice");
    let cast_path = start["recording"].as_str().unwrap();
    // The real asciinema player parses it (installed by tests/run.sh).
    let played = asciinema_cat(std::path::Path::new(cast_path));
    assert!(played.status.success(), "asciinema cat: {}", text(&played.stderr));
    assert!(text(&played.stdout).contains("Linux"));
    // `postern replay` plays it in the terminal (offline, from the data directory).
    let sid = start["session_id"].as_str().unwrap();
    let replayed = s.gw.postern(&["replay", sid, "--speed", "100"]);
    assert!(replayed.status.success(), "{}", text(&replayed.stderr));
    assert!(text(&replayed.stdout).contains("Linux"));
    let missing = s.gw.postern(&["replay", "00000000-0000-0000-0000-000000000000"]);
    assert!(text(&missing.stderr).contains("no recording for session"));
    let cast = std::fs::read_to_string(cast_path).unwrap();
    let mut lines = cast.lines();
    let header: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(header["version"], 2);
    assert!(lines.any(|l| l.contains("Linux")), "{cast}");
    let end = events.iter().find(|e| e["event"] == "session.end" && e["session_id"] == start["session_id"]).unwrap();
    assert_eq!(end["exit_code"], 3);
}

#[test]
fn pty_shell_over_ssh() {
    let s = SshSetup::new();
    let _agent = Agent::start(&s.gw, "web-02", vec![], &s.gw.listen);
    // -tt forces a PTY even without a local terminal; the remote side sees a tty and TERM.
    let out = s
        .cmd("ssh")
        .args(["-tt", "-o", "SetEnv=TERM=xterm-256color LANG=C.UTF-8", "alice@web-02.postern"])
        .arg("tty; echo TERM=$TERM LANG=$LANG; exit 6")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let shown = text(&out.stdout);
    assert!(shown.contains("/dev/pts/"), "{shown}{}", text(&out.stderr));
    assert!(shown.contains("LANG=C.UTF-8"), "{shown}");
    assert_eq!(out.status.code(), Some(6));
    // -T: no PTY.
    let out = s.ssh(&["-T", "alice@web-02.postern", "tty"]);
    assert_eq!(text(&out.stdout).trim(), "not a tty");
}

#[test]
fn scp_and_sftp_both_ways() {
    let s = SshSetup::new();
    let _agent = Agent::start(&s.gw, "web-03", vec![], &s.gw.listen);
    let blob = s.dir.path().join("blob");
    // 1 GiB of random data, up with scp and back down with sftp.
    sh(&format!("head -c 1073741824 /dev/urandom > {}", blob.display()));
    let remote = s.dir.path().join("remote-copy");
    let back = s.dir.path().join("back");
    let out = s.cmd("scp").arg(&blob).arg(format!("alice@web-03.postern:{}", remote.display())).output().unwrap();
    assert!(out.status.success(), "scp up: {}", text(&out.stderr));
    let batch = s.dir.path().join("batch");
    std::fs::write(&batch, format!("get {} {}\n", remote.display(), back.display())).unwrap();
    let out = s.cmd("sftp").arg("-b").arg(&batch).arg("alice@web-03.postern").output().unwrap();
    assert!(out.status.success(), "sftp down: {}", text(&out.stderr));
    let sum = |p: &Path| {
        text(&Command::new("sha256sum").arg(p).output().unwrap().stdout).split(' ').next().unwrap().to_owned()
    };
    assert_eq!(sum(&blob), sum(&back));
    assert_eq!(std::fs::metadata(&back).unwrap().len(), 1 << 30);
    let events = s.gw.audit_events();
    assert!(events.iter().any(|e| e["event"] == "session.start" && e["kind"] == "sftp" && e["logged"] == false));
}

/// Input keeps flowing while the client is not taking output. The SSH server library
/// (russh) reads a client's packets, its window adjustments among them, only as fast as the
/// channel's messages are taken: a relay that stopped taking input while it waited for
/// window to write output never saw the adjustment that would let it write (a 1 GiB sftp
/// download stalled so).
#[test]
fn input_keeps_flowing_while_the_client_is_not_reading_output() {
    use std::io::{Read, Write};
    let s = SshSetup::new();
    let _agent = Agent::start(&s.gw, "web-12", vec![], &s.gw.listen);
    // Far more output than the client's window (2 MiB) and its stdout pipe take unread.
    const OUT: usize = 16 << 20;
    let child = s
        .cmd("ssh")
        .args(["alice@web-12.postern", &format!("head -c {OUT} /dev/zero & cat >/dev/null; wait")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed on drop, should the session hang.
    let mut ssh = Proc { child, log: PathBuf::new() };
    let mut stdin = ssh.child.stdin.take().unwrap();
    // Many small packets while the output is not read: each write is paced so that ssh sends
    // it as a packet of its own, ten times the messages russh queues for a channel.
    for _ in 0..1000 {
        stdin.write_all(&[b'x'; 64]).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(stdin);
    let mut stdout = ssh.child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut total = 0;
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            total += n;
        }
        total
    });
    let mut status = None;
    wait_until("the session to end with all its output", Duration::from_secs(60), || {
        status = ssh.child.try_wait().unwrap();
        status.is_some()
    });
    let mut err = String::new();
    ssh.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.unwrap().success(), "{err}");
    assert_eq!(reader.join().unwrap(), OUT);
}

#[test]
fn local_forward_through_the_instance() {
    let s = SshSetup::new();
    let _agent = Agent::start(&s.gw, "web-04", vec![], &s.gw.listen);

    // -L through the instance to a local HTTP server.
    let http_port = free_tcp_port();
    let mut http = Command::new("python3")
        .args(["-m", "http.server", &http_port.to_string(), "--bind", "127.0.0.1"])
        .current_dir(s.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::fs::write(s.dir.path().join("hello.txt"), "through the tunnel\n").unwrap();
    wait_until("http server", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", http_port)).is_ok()
    });
    let local = free_tcp_port();
    let mut fwd = s
        .cmd("ssh")
        .args([
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-L",
            &format!("{local}:127.0.0.1:{http_port}"),
            "alice@web-04.postern",
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("forward listening", Duration::from_secs(15), || {
        std::net::TcpStream::connect(("127.0.0.1", local)).is_ok()
    });
    let fetch = |path: &str| {
        let out = Command::new("python3")
            .arg("-c")
            .arg(format!("import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:{local}/{path}').read().decode(),end='')"))
            .output()
            .unwrap();
        text(&out.stdout)
    };
    // Several connections at once.
    let results: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..8).map(|_| sc.spawn(|| fetch("hello.txt"))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(results.iter().all(|r| r == "through the tunnel\n"), "{results:?}");
    let _ = fwd.kill();
    let _ = fwd.wait();
    let _ = http.kill();
    let _ = http.wait();

    assert!(s.gw.audit_events().iter().any(|e| e["event"] == "forward.open" && e["logged"] == false));
}

/// Item 9: `ssh-passthrough` reaches the instance's own sshd (where its agent's `ssh_address`
/// says) and nothing else: a user allowed only passthrough gets the sshd through `-J`, and
/// `-W instance:<another port>` is refused (the listener there sees no connection).
#[test]
fn passthrough_reaches_only_the_instance_sshd() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the passthrough test logs into a real sshd as root (CI runs as root)"
    );
    let keys = tempfile::tempdir().unwrap();
    let bob_key = keys.path().join("bob");
    keygen(&bob_key);
    let bob_pub = std::fs::read_to_string(bob_key.with_extension("pub")).unwrap();
    let s = SshSetup::with(
        "",
        &format!(
            "[[ssh.users]]\nname = \"bob\"\nkeys = [{:?}]\ninstances = [\"web-*\"]\nactions = [\"ssh-passthrough\"]\n",
            bob_pub.trim()
        ),
    );
    let target_key = s.dir.path().join("root_key");
    keygen(&target_key);
    let authorized = s.dir.path().join("authorized_keys");
    std::fs::copy(target_key.with_extension("pub"), &authorized).unwrap();
    let sshd = start_sshd(s.dir.path(), &authorized);
    // The instance's sshd is where its agent says, not on port 22 (tests cannot own it).
    let agent_cfg = s.dir.path().join("web-04.toml");
    std::fs::write(&agent_cfg, format!("[limits]\nssh_address = \"127.0.0.1:{}\"\n", sshd.port)).unwrap();
    let _agent = Agent::start_with(
        &s.gw,
        "web-04",
        "env=test",
        vec![],
        &s.gw.listen,
        &["--config", agent_cfg.to_str().unwrap()],
    );
    // Another service on the instance, which passthrough must not reach.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    other.set_nonblocking(true).unwrap();
    let other_port = other.local_addr().unwrap().port();

    // The target's own host key goes in known_hosts under the instance name (port 22).
    let kh = s.known_hosts();
    let mut known = std::fs::read_to_string(&kh).unwrap();
    known.push_str(&format!("web-04 {}", sshd.host_key_pub));
    std::fs::write(&kh, known).unwrap();
    let cfg = std::fs::read_to_string(s.config()).unwrap();
    std::fs::write(
        s.config(),
        format!(
            "Host bobjump\n    HostName 127.0.0.1\n    Port {gw}\n    User bob\n    IdentityFile {bob}\n    UserKnownHostsFile {kh}\n\
             Host web-04\n    ProxyJump bobjump\n    User root\n    IdentityFile {key}\n    UserKnownHostsFile {kh}\n{cfg}",
            gw = s.gw.ssh_port,
            bob = bob_key.display(),
            key = target_key.display(),
            kh = kh.display(),
        ),
    )
    .unwrap();

    // -W to another port of the instance: refused, with a reason in the audit log.
    let out = s.ssh(&["-W", &format!("web-04:{other_port}"), "bobjump"]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("administratively prohibited"), "{}", text(&out.stderr));
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        matches!(other.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the other service was reached through passthrough"
    );
    let events = s.gw.audit_events();
    let denied = events
        .iter()
        .find(|e| e["event"] == "session.denied" && e["action"] == "ssh-passthrough")
        .expect("passthrough denial in the audit log");
    assert_eq!(denied["user"], "bob");
    assert_eq!(denied["target"], "web-04");
    let reason = denied["reason"].as_str().unwrap();
    assert!(reason.contains("only the instance's sshd") && reason.contains("-L"), "{reason}");
    // explain agrees: passthrough to another port is not a thing, port 22 is allowed.
    let explain = |to: &str| {
        s.gw.postern(&["explain", "--user", "bob", "--target", "web-04", "--action", "ssh-passthrough", "--to", to])
    };
    let out = explain(&format!("127.0.0.1:{other_port}"));
    assert!(!out.status.success() && text(&out.stderr).contains("only the instance's sshd"), "{}", text(&out.stderr));
    let out = explain("127.0.0.1:22");
    assert!(out.status.success() && text(&out.stdout).contains("allow"), "{}", text(&out.stdout));

    // ssh -J to the instance's own sshd (port 22 asked, the agent's ssh_address reached).
    let out = s.ssh(&["web-04", "echo passthrough-ok $(id -un)"]);
    assert_eq!(
        text(&out.stdout),
        "passthrough-ok root\n",
        "{}\nsshd log:\n{}",
        text(&out.stderr),
        sshd.proc.log_text()
    );
    let events = s.gw.audit_events();
    let open = events.iter().find(|e| e["event"] == "passthrough.open").expect("passthrough audit event");
    assert_eq!(open["logged"], false);
    assert_eq!(open["user"], "bob");
    assert_eq!(open["destination"], "ssh");
    assert_eq!(open["reason"], "end-to-end encrypted SSH passthrough");
    wait_until("passthrough.close", Duration::from_secs(10), || {
        s.gw.audit_events().iter().any(|e| e["event"] == "passthrough.close" && e["destination"] == "ssh")
    });
}

#[test]
fn denied_unknown_offline_and_wrong_key() {
    let s = SshSetup::new();
    let mut web = Agent::start(&s.gw, "web-05", vec![], &s.gw.listen);
    let _db = Agent::start(&s.gw, "db-01", vec![], &s.gw.listen);

    // Not allowed and not existing look the same.
    let denied = s.ssh(&["alice@db-01.postern", "true"]);
    let unknown = s.ssh(&["alice@nope-01.postern", "true"]);
    assert_ne!(denied.status.code(), Some(0));
    assert_eq!(denied.status.code(), unknown.status.code());
    assert_eq!(text(&denied.stderr), text(&unknown.stderr));
    assert!(text(&denied.stderr).contains("access denied"), "{}", text(&denied.stderr));

    // A key that is not bound to alice is refused.
    let stranger = s.dir.path().join("stranger");
    keygen(&stranger);
    let out = s.ssh_no_config(&stranger, &[], "alice%web-05@127.0.0.1", "true");
    assert_eq!(out.status.code(), Some(255));
    assert!(text(&out.stderr).contains("Permission denied"), "{}", text(&out.stderr));
    // Written when the refused connection is torn down, just after the client gives up.
    wait_until("auth.failed audit event", Duration::from_secs(5), || {
        s.gw.audit_events().iter().any(|e| e["event"] == "auth.failed")
    });

    // An offline instance: a clear message, no hang.
    let agent = web.proc.as_mut().unwrap();
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    agent.wait_exit(Duration::from_secs(10));
    wait_until("web-05 offline", Duration::from_secs(10), || !s.gw.is_online("web-05"));
    let out = s.ssh(&["alice@web-05.postern", "true"]);
    assert_eq!(out.status.code(), Some(255));
    assert!(text(&out.stderr).contains("offline"), "{}", text(&out.stderr));
}

#[test]
fn interactive_ssh_in_a_terminal() {
    let s = SshSetup::new();
    let _agent = Agent::start(&s.gw, "web-06", vec![], &s.gw.listen);
    drive_interactive_terminal(&format!("ssh -F {} alice@web-06.postern", s.config().display()));
}

#[test]
fn idle_sessions_are_warned_then_closed() {
    let s = SshSetup::with("idle_timeout = \"3s\"", "");
    let _agent = Agent::start(&s.gw, "web-07", vec![], &s.gw.listen);
    let start = std::time::Instant::now();
    let out = s.ssh(&["-tt", "alice@web-07.postern", "sleep 60"]);
    let took = start.elapsed();
    let shown = text(&out.stdout);
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(shown.contains("closes in"), "no warning: {shown}");
    assert!(shown.contains("no input for 3s; closing the session"), "{shown}");
    assert_eq!(out.status.code(), Some(255));
    let events = s.gw.audit_events();
    assert!(events.iter().any(|e| e["event"] == "session.end" && e["end_reason"] == "idle-timeout"));
}

#[test]
fn user_certificates_from_a_trusted_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("user_ca");
    keygen(&ca);
    let ca_pub = std::fs::read_to_string(ca.with_extension("pub")).unwrap();
    // bob has no keys at all: only certificates from the CA let him in.
    let s = SshSetup::with(
        &format!("user_ca_keys = [{:?}]", ca_pub.trim()),
        "[[ssh.users]]\nname = \"bob\"\nkeys = []\ninstances = [\"web-*\"]\nallow_root = true\n",
    );
    let _agent = Agent::start(&s.gw, "web-08", vec![], &s.gw.listen);
    let bob = dir.path().join("bob");
    keygen(&bob);
    let login = |principal: &str| {
        sh(&format!(
            "ssh-keygen -q -s {} -I cert-{principal} -n {principal} -V -5m:+1h {}",
            ca.display(),
            bob.with_extension("pub").display()
        ));
        let cert = vec!["-o".to_owned(), format!("CertificateFile={}-cert.pub", bob.display())];
        s.ssh_no_config(&bob, &cert, "bob%web-08@127.0.0.1", "echo cert-ok")
    };
    let ok = login("bob");
    assert_eq!(text(&ok.stdout), "cert-ok\n", "{}", text(&ok.stderr));
    // A certificate for another principal does not make its holder bob.
    let wrong = login("mallory");
    assert_eq!(wrong.status.code(), Some(255), "{}", text(&wrong.stdout));
    // Only the gateway's own certificates speak for the login behind them: one from this CA
    // claiming MFA (the extension `postern login` certificates carry) is a certificate login
    // without any.
    sh(&format!(
        "ssh-keygen -q -s {} -I cert-bob -n bob -V -5m:+1h -O extension:mfa@postern {}",
        ca.display(),
        bob.with_extension("pub").display()
    ));
    let cert = vec!["-o".to_owned(), format!("CertificateFile={}-cert.pub", bob.display())];
    let me = s.ssh_no_config(&bob, &cert, "bob@127.0.0.1", "whoami");
    let me: serde_json::Value = serde_json::from_slice(&me.stdout).expect("whoami answers JSON");
    assert_eq!(me["user"], "bob");
    assert!(me.get("certificate").is_none(), "another CA's certificate was taken for the gateway's: {me}");

    // A certificate from a CA the gateway does not trust is no login at all.
    let rogue_ca = dir.path().join("rogue_ca");
    keygen(&rogue_ca);
    let sign = |ca: &Path, principal: &str| {
        sh(&format!(
            "ssh-keygen -q -s {} -I cert-{principal} -n {principal} -V -5m:+1h {}",
            ca.display(),
            bob.with_extension("pub").display()
        ))
    };
    sign(&rogue_ca, "bob");
    let cert = vec!["-o".to_owned(), format!("CertificateFile={}-cert.pub", bob.display())];
    let rogue = s.ssh_no_config(&bob, &cert, "bob%web-08@127.0.0.1", "echo cert-ok");
    assert_eq!(rogue.status.code(), Some(255), "{}", text(&rogue.stdout));
    assert!(text(&rogue.stdout).is_empty());

    // Users of the store: without principals of their own, the certificate must name the
    // user; with principals, one of those (the name alone is not enough). Authenticated but
    // not allowed anywhere shows as "access denied" (1), not authenticated as 255.
    assert!(s.gw.postern(&["user", "add", "dave"]).status.success());
    assert!(s.gw.postern(&["user", "add", "carol", "--principal", "ops-carol"]).status.success());
    let as_user = |user: &str, principal: &str| {
        sign(&ca, principal);
        s.ssh_no_config(&bob, &cert, &format!("{user}%web-08@127.0.0.1"), "true").status.code()
    };
    assert_eq!(as_user("dave", "dave"), Some(1));
    assert_eq!(as_user("dave", "mallory"), Some(255));
    assert_eq!(as_user("carol", "ops-carol"), Some(1));
    assert_eq!(as_user("carol", "carol"), Some(255));
}

#[test]
fn agent_disappearing_mid_session_ends_it_cleanly() {
    let s = SshSetup::new();
    let mut agent = Agent::start(&s.gw, "web-09", vec![], &s.gw.listen);
    let mut client = s
        .cmd("ssh")
        .args(["alice@web-09.postern", "echo started; sleep 120"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(client.stdout.as_mut().unwrap()), &mut first).unwrap();
    assert_eq!(first, "started\n");
    // The agent's host goes away without a word: no close frame reaches the gateway.
    agent.proc.as_mut().unwrap().signal(nix::sys::signal::Signal::SIGKILL);
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(st) = client.try_wait().unwrap() {
            break st;
        }
        // The gateway notices at the QUIC idle timeout (30 s).
        assert!(start.elapsed() < Duration::from_secs(45), "client still hanging");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(255));
    let mut err = String::new();
    std::io::Read::read_to_string(client.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("connection to the instance was lost"), "{err}");
    let events = s.gw.audit_events();
    let start_ev = events.iter().find(|e| e["event"] == "session.start").unwrap();
    let end = events.iter().find(|e| e["event"] == "session.end" && e["session_id"] == start_ev["session_id"]).unwrap();
    assert_eq!(end["exit_code"], 255);
    let cast = std::fs::read_to_string(start_ev["recording"].as_str().unwrap()).unwrap();
    // In an output event, not only in the header's title (which holds the command).
    assert!(cast.lines().skip(1).any(|l| l.contains("started")), "{cast}");
    // The agent died without reaping its child; tidy up (exact match: not the ssh client).
    let _ = Command::new("pkill").args(["-x", "-f", "sleep 120"]).status();
}

#[test]
fn shell_profiles_and_command_profiles() {
    let s = SshSetup::with(
        "",
        "profiles = [\"ops\", \"logs\", \"rooty\"]\n\
         [[ssh.profiles]]\nname = \"ops\"\nworkdir = \"/tmp\"\nenv = { GREETING = \"hello-from-profile\" }\n\
         startup = [\"echo started-$GREETING\"]\n\
         [[ssh.profiles]]\nname = \"logs\"\ncommand = \"echo unit={unit} lines={lines}\"\nparameters = [\"unit\", \"lines\"]\n\
         [[ssh.profiles]]\nname = \"rooty\"\nrun_as = \"root\"\n",
    );
    let _agent = Agent::start(&s.gw, "web-10", vec![], &s.gw.listen);
    let with = |profile: &str, args: &[&str]| {
        let mut a = vec!["-o".to_owned(), format!("SetEnv=POSTERN_PROFILE={profile}")];
        a.extend(args.iter().map(|x| (*x).to_owned()));
        s.cmd("ssh").args(a).stdin(Stdio::null()).output().unwrap()
    };

    // Exec under a profile: its working directory and environment.
    let out = with("ops", &["alice@web-10.postern", "pwd; echo $GREETING"]);
    assert_eq!(text(&out.stdout), "/tmp\nhello-from-profile\n", "{}", text(&out.stderr));

    // Interactive shell under a profile: startup commands run first.
    let mut child = s
        .cmd("ssh")
        .args(["-tt", "-o", "SetEnv=POSTERN_PROFILE=ops", "alice@web-10.postern"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"echo in-$(pwd)\nexit 3\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let shown = text(&out.stdout);
    assert!(shown.contains("started-hello-from-profile"), "{shown}");
    assert!(shown.contains("in-/tmp"), "{shown}");
    assert_eq!(out.status.code(), Some(3));

    // A command profile runs its command only, with checked parameters.
    let out = with("logs", &["alice@web-10.postern", "unit=nginx lines=5"]);
    assert_eq!(text(&out.stdout), "unit=nginx lines=5\n", "{}", text(&out.stderr));
    let out = with("logs", &["alice@web-10.postern", "unit=$(id) lines=1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("may only contain"), "{}", text(&out.stderr));
    assert!(text(&out.stdout).is_empty());
    let out = with("logs", &["alice@web-10.postern", "uname -a"]);
    assert_eq!(out.status.code(), Some(1));

    // A profile may name root for a user allowed root (alice is: the test agents run as
    // root); sessions_run_as_root_only_where_allowed covers the refusals. Unknown profiles
    // are refused.
    let out = with("rooty", &["alice@web-10.postern", "id -un"]);
    assert_eq!(text(&out.stdout), "root\n", "{}", text(&out.stderr));
    let out = with("nope", &["alice@web-10.postern", "true"]);
    assert!(text(&out.stderr).contains("not allowed for you"), "{}", text(&out.stderr));

    let events = s.gw.audit_events();
    assert!(events.iter().any(|e| e["event"] == "session.start" && e["profile"] == "logs"));
}

#[test]
fn sessions_run_as_root_only_where_allowed() {
    assert!(nix::unistd::Uid::effective().is_root(), "this test needs an agent running as root (CI runs as root)");
    let keys = tempfile::tempdir().unwrap();
    let key = |name: &str| {
        let k = keys.path().join(name);
        keygen(&k);
        (k.clone(), std::fs::read_to_string(k.with_extension("pub")).unwrap().trim().to_owned())
    };
    let (bob, bob_pub) = key("bob");
    let (carol, carol_pub) = key("carol");
    // bob: no OS user named for him, no allow_root. carol: run_as nobody. alice (the
    // fixture's user): allow_root = true.
    let s = SshSetup::with(
        "",
        &format!(
            "[[ssh.users]]\nname = \"bob\"\nkeys = [{bob_pub:?}]\ninstances = [\"web-*\"]\nprofiles = [\"rooty\"]\n\
             [[ssh.users]]\nname = \"carol\"\nkeys = [{carol_pub:?}]\ninstances = [\"web-*\"]\nrun_as = \"nobody\"\n\
             [[ssh.profiles]]\nname = \"rooty\"\nrun_as = \"root\"\n"
        ),
    );
    let agent_cfg = s.dir.path().join("web-20.toml");
    std::fs::write(&agent_cfg, "[limits]\nrun_as = [\"nobody\"]\n").unwrap();
    let _agent = Agent::start_with(
        &s.gw,
        "web-20",
        "env=test",
        vec![],
        &s.gw.listen,
        &["--config", agent_cfg.to_str().unwrap()],
    );
    let as_user = |key: &Path, user: &str, extra: &[&str], command: &str| {
        let extra: Vec<String> = extra.iter().map(|x| (*x).to_owned()).collect();
        s.ssh_no_config(key, &extra, &format!("{user}%web-20@127.0.0.1"), command)
    };

    // The agent runs as root and nothing names another user for bob: refused, saying what
    // to configure, and nothing ran.
    let marker = s.dir.path().join("bob-ran");
    for extra in [&[][..], &["-tt"][..]] {
        let out = as_user(&bob, "bob", extra, &format!("touch {}", marker.display()));
        let shown = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert_ne!(out.status.code(), Some(0), "{shown}");
        assert!(
            shown.contains("would run as root") && shown.contains("run_as") && shown.contains("allow_root"),
            "{shown}"
        );
        assert!(!marker.exists(), "bob's command ran as root");
    }
    // sftp runs as the same user: refused too.
    let batch = s.dir.path().join("batch");
    std::fs::write(&batch, "ls /\n").unwrap();
    let out = Command::new("timeout")
        .args(["30", "sftp", "-P", &s.gw.ssh_port.to_string(), "-i"])
        .arg(&bob)
        .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o"])
        .arg(format!("UserKnownHostsFile={}", s.known_hosts().display()))
        .arg("-b")
        .arg(&batch)
        .arg("bob%web-20@127.0.0.1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0), "sftp as bob: {}", text(&out.stdout));
    // A profile naming root is refused for a user not allowed root.
    let out = as_user(&bob, "bob", &["-o", "SetEnv=POSTERN_PROFILE=rooty"], "id -un");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("root is not allowed"), "{}", text(&out.stderr));

    // carol has an OS user: her sessions run as nobody, through nobody's login shell (on
    // Debian nologin, which answers for itself).
    let out = as_user(&carol, "carol", &[], "id -un");
    let shown = text(&out.stdout);
    assert!(
        shown == "nobody\n" || shown.contains("account is currently not available"),
        "{shown}{}",
        text(&out.stderr)
    );
    // alice is allowed root: the agent's own user.
    let out = s.ssh(&["alice@web-20.postern", "id -u"]);
    assert_eq!(text(&out.stdout), "0\n", "{}", text(&out.stderr));
    let events = s.gw.audit_events();
    assert!(events.iter().any(|e| e["event"] == "session.start" && e["user"] == "carol" && e["run_as"] == "nobody"));
}

#[test]
fn sessions_end_at_their_maximum_length() {
    let s = SshSetup::with("idle_timeout = \"0\"\nmax_session = \"3s\"", "");
    let _agent = Agent::start(&s.gw, "web-11", vec![], &s.gw.listen);
    let start = std::time::Instant::now();
    let out = s.ssh(&["-tt", "alice@web-11.postern", "sleep 60"]);
    assert!(start.elapsed() < Duration::from_secs(20));
    let shown = text(&out.stdout);
    assert!(shown.contains("reaches its maximum length of 3s"), "{shown}");
    assert!(shown.contains("maximum session length of 3s reached"), "{shown}");
    assert_eq!(out.status.code(), Some(255));
    assert!(s.gw.audit_events().iter().any(|e| e["event"] == "session.end" && e["end_reason"] == "max-duration"));
}

/// Failed logins are counted as they happen, and back off by the user name being guessed
/// at that address (and, a little, by the address): sixty connections at once do not all
/// get an answer at once, and the right key from the same address still gets in within
/// seconds (no lockout).
#[test]
fn failed_logins_back_off_by_user_and_source_and_the_right_key_still_gets_in() {
    // Caps on unauthenticated connections high enough that all sixty reach authentication.
    let s = SshSetup::with("max_startups = 200\nmax_startups_per_source = 100", "");
    let alice = s.dir.path().join("alice");
    let stranger = s.dir.path().join("stranger");
    keygen(&stranger);
    let whoami = |key: &Path, login: &str| {
        let start = std::time::Instant::now();
        let out = s.ssh_no_config(key, &[], login, "whoami");
        (out, start.elapsed())
    };
    let (out, _) = whoami(&alice, "alice@127.0.0.1");
    assert!(out.status.success(), "{}", text(&out.stderr));

    let mut flood: Vec<std::process::Child> = (0..60)
        .map(|_| {
            Command::new("timeout")
                .args(["60", "ssh", "-p", &s.gw.ssh_port.to_string(), "-i"])
                .arg(&stranger)
                .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o"])
                .arg(format!("UserKnownHostsFile={}", s.known_hosts().display()))
                .args(["mallory@127.0.0.1", "whoami"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut answered = 0;
    let mut count_answered = |flood: &mut Vec<std::process::Child>| {
        flood.retain_mut(|c| match c.try_wait().unwrap() {
            Some(status) => {
                assert_eq!(status.code(), Some(255), "a wrong key got in");
                answered += 1;
                false
            }
            None => true,
        });
        answered
    };
    // The first few failures are answered without delay.
    wait_until("the first refusals", Duration::from_secs(20), || count_answered(&mut flood) >= 5);

    // Meanwhile the right key, from the same address, gets in within seconds.
    let (out, took) = whoami(&alice, "alice@127.0.0.1");
    assert!(out.status.success(), "alice was refused during the flood: {}", text(&out.stderr));
    assert!(took < Duration::from_secs(5), "alice got in only after {took:?}");

    // Most of the sixty still wait for their turn, the later ones up to 30 s: two seconds
    // more (what must not happen needs time not to happen), and still few were answered.
    std::thread::sleep(Duration::from_secs(2));
    let answered = count_answered(&mut flood);
    eprintln!("alice got in after {took:?}; {answered} of 60 failing connections answered 2 s later");
    assert!(answered <= 20, "{answered} of 60 failing connections were answered 2 s after alice's login");
    for c in &mut flood {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// `-L` to another host that only the instance can reach: the agent runs in its own network
/// namespace, the destination listens on the far side of the namespace's veth link, and the
/// agent's local `tcp_allow` admits exactly that host (its loopback is refused).
#[test]
fn local_forward_to_another_host_reachable_from_the_instance() {
    assert!(nix::unistd::Uid::effective().is_root(), "creates a network namespace; CI runs as root");
    let ns = NetNs::create();
    let s = SshSetup::on(&format!("{}:{}", ns.host_ip, free_udp_port()), "", "");
    let limits = s.dir.path().join("agent.toml");
    std::fs::write(&limits, format!("[limits]\ntcp_allow = [\"{}/32\"]\n", ns.host_ip)).unwrap();
    let prefix = vec!["ip".to_owned(), "netns".to_owned(), "exec".to_owned(), ns.name.clone()];
    let _agent =
        Agent::start_with(&s.gw, "web-ns", "env=test", prefix, &s.gw.listen, &["--config", limits.to_str().unwrap()]);

    // "db host": a service on the host side of the veth, answering every connection.
    let db = std::net::TcpListener::bind((ns.host_ip.as_str(), 0)).unwrap();
    let db_port = db.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in db.incoming().flatten() {
            use std::io::Write;
            let mut c = c;
            let _ = c.write_all(b"from-the-db-host\n");
        }
    });
    let forward = |dest: &str| {
        let local = free_tcp_port();
        let mut child = s
            .cmd("ssh")
            .args(["-N", "-L", &format!("{local}:{dest}"), "alice@web-ns.postern"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_until("forward listening", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", local)).is_ok()
        });
        // Several connections at once through the same forward.
        let reads: Vec<String> = (0..4)
            .map(|_| std::net::TcpStream::connect(("127.0.0.1", local)).unwrap())
            .map(|mut c| {
                use std::io::Read;
                c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut got = String::new();
                let _ = c.read_to_string(&mut got);
                got
            })
            .collect();
        let _ = child.kill();
        let _ = child.wait();
        reads
    };
    for got in forward(&format!("{}:{db_port}", ns.host_ip)) {
        assert_eq!(got, "from-the-db-host\n");
    }
    // The agent's own allow-list refuses what it does not list, whatever the gateway allows.
    for got in forward(&format!("127.0.0.1:{db_port}")) {
        assert_eq!(got, "");
    }
    assert!(
        s.gw.audit_events()
            .iter()
            .any(|e| e["event"] == "forward.failed" && e["destination"] == format!("127.0.0.1:{db_port}"))
    );
}

/// An nftables table that silently drops TCP SYNs to one loopback port, so a connect to it
/// hangs instead of being refused; deleted on drop (also when the test panics).
struct DropSyns {
    table: String,
}

impl DropSyns {
    fn to_port(port: u16) -> DropSyns {
        // The pid keeps tables of concurrent test processes apart; one per process suffices.
        let table = format!("postern_test_{}", std::process::id());
        let script = format!(
            "table inet {table} {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    \
             ip daddr 127.0.0.1 tcp dport {port} tcp flags & (syn | ack) == syn drop\n  }}\n}}\n"
        );
        let mut nft = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nft (tests/run.sh installs nftables)");
        std::io::Write::write_all(nft.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
        drop(nft.stdin.take());
        assert!(nft.wait().unwrap().success(), "nft could not add table {table}");
        DropSyns { table }
    }
}

impl Drop for DropSyns {
    fn drop(&mut self) {
        let _ = Command::new("nft").args(["delete", "table", "inet", &self.table]).status();
    }
}

/// Sockets in /proc/net/tcp{,6} as (local port, remote port, state) with the state in the
/// kernel's hex form ("0A" listening, "02" SYN sent).
fn tcp_sockets() -> Vec<(u16, u16, String)> {
    let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next().unwrap_or(""), 16).unwrap_or(0);
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|t| {
            t.lines()
                .skip(1)
                .filter_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    Some((port(f.get(1)?), port(f.get(2)?), (*f.get(3)?).to_owned()))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Regression: the russh handler's `channel_open_direct_tcpip` awaited authorization and the
/// agent's stream open (the agent first connects to the destination, for up to 10 s) inside
/// the callback, which russh awaits in the connection's packet loop; so one `-L` destination
/// that is slow to connect stalled every other channel of the same SSH connection.
#[test]
fn a_slow_forward_destination_does_not_stall_other_channels() {
    use std::io::Read;
    assert!(nix::unistd::Uid::effective().is_root(), "installs an nftables rule; CI runs as root");
    let s = SshSetup::new();
    let _agent = Agent::start(&s.gw, "web-07", vec![], &s.gw.listen);

    // The fast destination answers every connection with a banner.
    let fast = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fast_port = fast.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in fast.incoming().flatten() {
            let _ = std::io::Write::write_all(&mut c, b"fast-banner\n");
        }
    });
    // The slow destination: nothing answers and nothing refuses, so a connect just waits.
    let slow_port = free_tcp_port();
    let nft = DropSyns::to_port(slow_port);
    let probe = std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], slow_port).into(), Duration::from_millis(300));
    assert_eq!(
        probe.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::TimedOut),
        "the nftables rule must make connects to {slow_port} hang"
    );

    let (slow_local, fast_local) = (free_tcp_port(), free_tcp_port());
    // Both forwards in one ssh, so both channels share one SSH connection.
    let mut cmd = s.cmd("ssh");
    cmd.args([
        "-N",
        "-o",
        "ExitOnForwardFailure=yes",
        "-L",
        &format!("{slow_local}:127.0.0.1:{slow_port}"),
        "-L",
        &format!("{fast_local}:127.0.0.1:{fast_port}"),
        "alice@web-07.postern",
    ]);
    let fwd = spawn_logged(cmd, &s.dir.path().join("ssh-forward.log"));
    let banner_through = |port: u16, timeout: Duration| {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        c.set_read_timeout(Some(timeout)).unwrap();
        let mut got = [0u8; 12];
        c.read_exact(&mut got).ok().map(|_| got)
    };
    // Ready: the fast forward works end to end, and the slow one's listener is up (seen in
    // /proc rather than by connecting, which would already open a slow channel).
    wait_until("fast forward answering", Duration::from_secs(20), || {
        banner_through(fast_local, Duration::from_secs(5)).as_ref() == Some(b"fast-banner\n")
    });
    wait_until("slow forward listening", Duration::from_secs(10), || {
        tcp_sockets().iter().any(|(local, _, st)| *local == slow_local && st == "0A")
    });

    // Open the slow channel and wait until the agent is stuck connecting to its destination:
    // by then the gateway has the channel open in hand.
    let _slow = std::net::TcpStream::connect(("127.0.0.1", slow_local)).unwrap();
    wait_until("the agent connecting to the slow destination", Duration::from_secs(10), || {
        tcp_sockets().iter().any(|(_, remote, st)| *remote == slow_port && st == "02")
    });

    // Another channel of the same connection must not wait for it.
    let start = std::time::Instant::now();
    let got = banner_through(fast_local, Duration::from_secs(15)).map(|b| text(&b));
    let took = start.elapsed();
    assert!(
        got.as_deref() == Some("fast-banner\n") && took < Duration::from_secs(2),
        "a second -L channel took {took:?} (got {got:?}) while another channel's destination was slow to connect; \
         it must not wait for it (at most 2 s)"
    );

    drop(fwd);
    let table = nft.table.clone();
    drop(nft);
    let out = Command::new("nft").args(["list", "tables"]).output().unwrap();
    assert!(!text(&out.stdout).contains(&table), "nft table {table} left behind");
}

/// Issue 16: every door's sessions are kept in the store and listed after a restart, with
/// filters and pages; `postern replay` finds a session by a unique prefix and says who,
/// where, when and what before the recording and its exit status after it.
#[test]
fn session_history_survives_a_restart_and_replays_by_prefix() {
    let mut s = SshSetup::new();
    let _agent = Agent::start(&s.gw, "web-21", vec![], &s.gw.listen);
    // exec (its command carries an escape sequence, which the replay header must not print raw)
    let exec_cmd = "echo hist-$((6*7)); exit 3 # \x1b[2J";
    let out = s.ssh(&["alice@web-21.postern", exec_cmd]);
    assert_eq!((text(&out.stdout).as_str(), out.status.code()), ("hist-42\n", Some(3)), "{}", text(&out.stderr));
    // a shell on a PTY
    let mut shell = s
        .cmd("ssh")
        .args(["-tt", "alice@web-21.postern"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        shell.stdin.take().unwrap().write_all(b"echo shell-$((2+3)); exit 5\n").unwrap();
    }
    let out = shell.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stdout));
    // sftp
    let batch = s.dir.path().join("batch");
    std::fs::write(&batch, "ls /\n").unwrap();
    let out = s.cmd("sftp").arg("-b").arg(&batch).arg("alice@web-21.postern").output().unwrap();
    assert!(out.status.success(), "sftp: {}", text(&out.stderr));
    // a -L forward to a listener here, one connection through it
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dest = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        use std::io::Write;
        let (mut c, _) = listener.accept().unwrap();
        c.write_all(b"hello through -L\n").unwrap();
    });
    let local = free_tcp_port();
    let mut fwd = s
        .cmd("ssh")
        .args([
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-L",
            &format!("{local}:127.0.0.1:{dest}"),
            "alice@web-21.postern",
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut got = String::new();
    wait_until("the forward answers", Duration::from_secs(15), || {
        use std::io::Read;
        std::net::TcpStream::connect(("127.0.0.1", local))
            .is_ok_and(|mut c| c.read_to_string(&mut got).is_ok() && !got.is_empty())
    });
    assert_eq!(got, "hello through -L\n");
    server.join().unwrap();
    let _ = fwd.kill();
    let _ = fwd.wait();
    // an exec through the admin socket
    let out = s.gw.postern(&["exec", "web-21", "--", "echo admin-$((1+1))"]);
    assert_eq!(text(&out.stdout), "admin-2\n", "{}", text(&out.stderr));

    // All five after a restart, newest first, with what each was.
    let all = |gw: &Gateway, args: &[&str]| -> Vec<serde_json::Value> {
        let mut a = vec!["sessions", "--all", "--json"];
        a.extend_from_slice(args);
        let out = gw.postern(&a);
        assert!(out.status.success(), "{a:?}: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    wait_until("the forward's session has ended", Duration::from_secs(10), || {
        all(&s.gw, &[]).iter().all(|r| r["active"] == false)
    });
    s.gw.stop();
    s.gw.restart();
    let rows = all(&s.gw, &[]);
    let kinds: Vec<&str> = rows.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["exec", "port-forward", "sftp", "shell", "exec"], "{rows:#?}");
    let (admin, forward, sftp, shell, exec) = (&rows[0], &rows[1], &rows[2], &rows[3], &rows[4]);
    for r in &rows {
        assert_eq!(r["target"], "web-21");
        assert!(r["ended_at"].as_i64().unwrap() >= r["started_at"].as_i64().unwrap(), "{r}");
        assert_eq!(r["active"], false);
    }
    assert_eq!((&exec["user"], &exec["door"], &exec["source"]), (&"alice".into(), &"ssh".into(), &"127.0.0.1".into()));
    assert_eq!((&exec["command"], &exec["exit_code"], &exec["logged"]), (&exec_cmd.into(), &3.into(), &true.into()));
    assert!(exec["bytes_out"].as_u64().unwrap() >= 8, "{exec}");
    let cast = std::path::PathBuf::from(exec["recording"].as_str().unwrap());
    assert!(cast.exists(), "{cast:?}");
    assert_eq!(
        (&shell["exit_code"], &shell["logged"], &shell["command"]),
        (&5.into(), &true.into(), &serde_json::Value::Null)
    );
    assert_eq!(
        (&sftp["logged"], &sftp["reason"]),
        (&false.into(), &"sftp file transfer content is not recorded".into())
    );
    assert_eq!(forward["destination"], format!("127.0.0.1:{dest}"));
    assert_eq!(
        (&forward["logged"], &forward["reason"]),
        (&false.into(), &"forwarded TCP content is not inspected".into())
    );
    assert_eq!(forward["bytes_out"], 17);
    assert_eq!(
        (&admin["door"], &admin["command"], &admin["exit_code"]),
        (&"admin-socket".into(), &"echo admin-$((1+1))".into(), &0.into())
    );
    assert!(admin["user"].as_str().unwrap().starts_with("local-admin(uid="), "{admin}");

    // Filters.
    let ids =
        |rows: Vec<serde_json::Value>| rows.iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
    let id = |r: &serde_json::Value| r["id"].as_str().unwrap().to_owned();
    assert_eq!(ids(all(&s.gw, &["--user", "alice"])), [id(forward), id(sftp), id(shell), id(exec)]);
    assert_eq!(ids(all(&s.gw, &["--kind", "forward"])), [id(forward)]);
    assert_eq!(ids(all(&s.gw, &["--kind", "admin"])), [id(admin)]);
    assert_eq!(ids(all(&s.gw, &["--kind", "exec", "--instance", "web-21"])), [id(admin), id(exec)]);
    assert_eq!(all(&s.gw, &["--since", "1h"]).len(), 5);
    assert_eq!(all(&s.gw, &["--since", "2000-01-01T00:00Z", "--until", "2000-01-02T00:00Z"]).len(), 0);
    assert!(all(&s.gw, &["--instance", "web-22"]).is_empty());
    let bad = s.gw.postern(&["sessions", "--all", "--since", "yesterday"]);
    assert!(
        !bad.status.success() && text(&bad.stderr).contains("expected an age (2h, 7d) or a time"),
        "{}",
        text(&bad.stderr)
    );
    let bad = s.gw.postern(&["sessions", "--user", "alice"]);
    assert!(!bad.status.success() && text(&bad.stderr).contains("--all"), "{}", text(&bad.stderr));
    // The table: ids cut to 12 characters, the escape sequence escaped.
    let table = s.gw.postern(&["sessions", "--all"]);
    let shown = text(&table.stdout);
    assert!(shown.starts_with("SESSION") && shown.contains(&id(exec)[..12]) && !shown.contains(&id(exec)), "{shown}");
    assert!(!shown.contains('\x1b') && shown.contains("\\u{1b}[2J"), "{shown}");

    // Pages of two: newest first, then from the last one shown.
    let page = s.gw.postern(&["sessions", "--all", "--limit", "2"]);
    assert!(text(&page.stderr).contains(&format!("--before {}", &id(forward)[..12])), "{}", text(&page.stderr));
    let mut paged = ids(all(&s.gw, &["--limit", "2"]));
    let last = paged.last().unwrap().clone();
    paged.extend(ids(all(&s.gw, &["--limit", "2", "--before", &last])));
    let last = paged.last().unwrap().clone();
    paged.extend(ids(all(&s.gw, &["--limit", "2", "--before", &last[..12]])));
    assert_eq!(paged, ids(rows.clone()));

    // Replay by a unique prefix: header, output, exit status.
    let unique = |full: &str| -> String {
        let others: Vec<String> = ids(rows.clone()).into_iter().filter(|i| i != full).collect();
        (1..=full.len())
            .map(|n| full[..n].to_owned())
            .find(|p| others.iter().all(|o| !o.starts_with(p.as_str())))
            .unwrap()
    };
    let prefix = unique(&id(exec));
    let played = s.gw.postern(&["replay", &prefix, "--speed", "100", "--idle-limit", "0"]);
    assert!(played.status.success(), "{}", text(&played.stderr));
    assert!(text(&played.stdout).contains("hist-42"), "{}", text(&played.stdout));
    let said = text(&played.stderr);
    assert!(
        said.starts_with(&format!("session {}\n  user:     alice from 127.0.0.1\n  target:   web-21", id(exec))),
        "{said}"
    );
    assert!(said.contains("  kind:     exec via ssh\n  command:  echo hist-$((6*7)); exit 3 # \\u{1b}[2J\n"), "{said}");
    assert!(!said.contains('\x1b'), "the header printed the escape sequence raw: {said:?}");
    assert!(said.contains(&format!("  recording: {}", cast.display())), "{said}");
    assert!(said.trim_end().ends_with("exit status 3"), "{said}");
    // --raw: the recording itself, nothing else.
    let raw = s.gw.postern(&["replay", &prefix, "--raw"]);
    assert!(raw.status.success());
    assert_eq!(raw.stdout, std::fs::read(&cast).unwrap());
    assert_eq!(text(&raw.stderr), "");
    // A forward has nothing to replay, and says why.
    let out = s.gw.postern(&["replay", &unique(&id(forward))]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr)
            .contains("port-forward on web-21 by alice) has no recording: forwarded TCP content is not inspected"),
        "{}",
        text(&out.stderr)
    );
    // No session, or several, with that prefix.
    let none =
        (0..).map(|n| format!("{n:012x}")).find(|p| rows.iter().all(|r| !id(r).starts_with(p.as_str()))).unwrap();
    let out = s.gw.postern(&["replay", &none]);
    assert!(!out.status.success() && text(&out.stderr).contains("no session id starts with"), "{}", text(&out.stderr));
    // More sessions until two ids share a first digit (at most 17 by pigeonhole).
    wait_until("the agent is back", Duration::from_secs(20), || s.gw.is_online("web-21"));
    let shared = loop {
        let ids = ids(all(&s.gw, &["--limit", "100"]));
        let first = ids
            .iter()
            .map(|i| i[..1].to_owned())
            .find(|c| ids.iter().filter(|i| i.starts_with(c.as_str())).count() > 1);
        if let Some(c) = first {
            let sharing: Vec<String> = ids.into_iter().filter(|i| i.starts_with(c.as_str())).collect();
            break (c, sharing);
        }
        assert!(ids.len() <= 17);
        let out = s.gw.postern(&["exec", "web-21", "--", "true"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    };
    let out = s.gw.postern(&["replay", &shared.0]);
    let said = text(&out.stderr);
    assert!(!out.status.success() && said.contains("is the start of several session ids"), "{said}");
    assert!(shared.1.iter().all(|i| said.contains(i.as_str())), "{said}");
}

/// The OS account with a real shell that tests/run.sh creates for login tests.
const LOGIN: &str = "postern-login";

fn os_account_exists(name: &str) -> bool {
    nix::unistd::User::from_name(name).ok().flatten().is_some()
}

/// `ssh LOGIN@INSTANCE.postern`: the user before `@` is the OS login, allowed by the policy's
/// logins (run_as) for the person the gateway hop authenticated (by key: the ProxyJump
/// names their Postern identity); their own name means the default login; a login not
/// allowed is refused with the list; the inner hop must be that same person's key.
#[test]
fn the_user_before_the_at_is_the_os_login() {
    assert!(nix::unistd::Uid::effective().is_root(), "this test needs an agent running as root (CI runs as root)");
    assert!(os_account_exists(LOGIN), "tests/run.sh creates the OS account {LOGIN}; run it (as root) first");
    let keys = tempfile::tempdir().unwrap();
    let bob = keys.path().join("bob");
    keygen(&bob);
    let bob_pub = std::fs::read_to_string(bob.with_extension("pub")).unwrap();
    let s = SshSetup::with(
        "",
        &format!("[[ssh.users]]\nname = \"bob\"\nkeys = [{:?}]\ninstances = [\"web-*\"]\n", bob_pub.trim()),
    );
    // alice's logins: postern-login (the default) and nobody; root is not among them,
    // although she is allowed root.
    let policy = s.dir.path().join("logins.toml");
    std::fs::write(
        &policy,
        format!(
            "name = \"logins\"\n[[statement]]\neffect = \"allow\"\nusers = [\"alice\"]\nactions = [\"shell\", \"exec\"]\n\
             instances = [\"web-*\"]\nrun_as = [\"{LOGIN}\", \"nobody\"]\n"
        ),
    )
    .unwrap();
    let out = s.gw.postern(&["policy", "apply", policy.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let agent_cfg = s.dir.path().join("web-21.toml");
    std::fs::write(&agent_cfg, format!("[limits]\nrun_as = [\"nobody\", \"{LOGIN}\"]\n")).unwrap();
    let _agent = Agent::start_with(
        &s.gw,
        "web-21",
        "env=test",
        vec![],
        &s.gw.listen,
        &["--config", agent_cfg.to_str().unwrap()],
    );

    // The login asked for, allowed: the session runs as it.
    let out = s.ssh(&[&format!("{LOGIN}@web-21.postern"), "id -un"]);
    assert_eq!(text(&out.stdout), format!("{LOGIN}\n"), "{}", text(&out.stderr));
    // The person's own name, and no login at all (alice%web-21@gateway): the default login.
    let out = s.ssh(&["alice@web-21.postern", "id -un"]);
    assert_eq!(text(&out.stdout), format!("{LOGIN}\n"), "{}", text(&out.stderr));
    let out = s.ssh_no_config(&s.dir.path().join("alice"), &[], "alice%web-21@127.0.0.1", "id -un");
    assert_eq!(text(&out.stdout), format!("{LOGIN}\n"), "{}", text(&out.stderr));
    // The other allowed login (nobody: its shell is nologin on Debian, which answers itself).
    let out = s.ssh(&["nobody@web-21.postern", "id -un"]);
    let shown = text(&out.stdout);
    assert!(shown == "nobody\n" || shown.contains("account is currently not available"), "{shown}");

    // Logins not allowed: refused on stderr with exit status 1, naming those that are.
    let marker = s.dir.path().join("ran");
    for login in ["root", "daemon"] {
        let out = s.ssh(&[&format!("{login}@web-21.postern"), &format!("touch {}", marker.display())]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{login}: {err}");
        assert!(err.contains(&format!("login \"{login}\" is not allowed for you on web-21")), "{err}");
        assert!(err.contains(&format!("allowed logins: {LOGIN} (the default), nobody")), "{err}");
        assert!(!marker.exists(), "the command ran as {login}");
    }
    let events = s.gw.audit_events();
    let denied: Vec<_> = events.iter().filter(|e| e["event"] == "session.denied" && e["user"] == "alice").collect();
    assert!(denied.iter().any(|e| e["reason"].as_str().unwrap().contains("login \"daemon\"")), "{denied:?}");
    let starts: Vec<_> = events.iter().filter(|e| e["event"] == "session.start" && e["user"] == "alice").collect();
    assert!(starts.iter().filter(|e| e["run_as"] == LOGIN).count() >= 3, "{starts:?}");
    assert!(starts.iter().any(|e| e["run_as"] == "nobody"), "{starts:?}");

    // The inner hop authenticates the same person: bob's key there, behind alice's gateway
    // hop, is refused whatever login it names, bob's own name included.
    let mixed = s.dir.path().join("mixed_config");
    let mixed_config = |jump_user: &str, jump_key: &Path| {
        let text = format!(
            "Host jump\n    HostName 127.0.0.1\n    Port {port}\n    User {jump_user}\n    IdentityFile {jump_key}\n\
             Host *.postern\n    ProxyJump jump\n    IdentityFile {bob}\n\
             Host *\n    IdentitiesOnly yes\n    BatchMode yes\n    UserKnownHostsFile {kh}\n",
            port = s.gw.ssh_port,
            jump_key = jump_key.display(),
            bob = bob.display(),
            kh = s.known_hosts().display(),
        );
        std::fs::write(&mixed, text).unwrap();
    };
    mixed_config("alice", &s.dir.path().join("alice"));
    for login in ["bob", LOGIN] {
        let out = Command::new("timeout")
            .args(["30", "ssh", "-F"])
            .arg(&mixed)
            .args([&format!("{login}@web-21.postern"), "id -un"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(255), "{login}: {}{}", text(&out.stdout), text(&out.stderr));
        assert!(text(&out.stderr).contains("Permission denied"), "{}", text(&out.stderr));
    }
    // ... while bob through his own gateway hop gets in, with his default (the agent's own
    // user is root and bob is not allowed root: refused by the agent, saying so).
    mixed_config("bob", &bob);
    let out = Command::new("timeout")
        .args(["30", "ssh", "-F"])
        .arg(&mixed)
        .args(["bob@web-21.postern", "id -un"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(text(&out.stderr).contains("would run as root"), "{}{}", text(&out.stdout), text(&out.stderr));

    // A key names one person: giving alice's key to another user is refused.
    let alice_pub = s.dir.path().join("alice.pub");
    let out = s.gw.postern(&["user", "add", "carol", "--key-file", alice_pub.to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("already bound to user \"alice\""), "{}", text(&out.stderr));
    let out = s.gw.postern(&["user", "add", "carol"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = s.gw.postern(&["user", "key", "add", "carol", "--file", bob.with_extension("pub").to_str().unwrap()]);
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("already bound to user \"bob\""), "{}", text(&out.stderr));

    // explain and ls show the logins.
    let out = s.gw.postern(&["explain", "--user", "alice", "--target", "web-21", "--action", "shell"]);
    assert!(
        text(&out.stdout).contains(&format!("allowed logins: {LOGIN} (the default), nobody")),
        "{}",
        text(&out.stdout)
    );
    let out = Command::new(bin("postern"))
        .args(["ls", "--json", "--gateway", &format!("127.0.0.1:{}", s.gw.ssh_port), "--user", "alice", "-i"])
        .arg(s.dir.path().join("alice"))
        .arg("--known-hosts")
        .arg(s.known_hosts())
        .env_remove("SSH_AUTH_SOCK")
        .output()
        .unwrap();
    let listed: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{}", text(&out.stderr)));
    let web = listed.as_array().unwrap().iter().find(|i| i["name"] == "web-21").unwrap();
    assert_eq!(web["logins"], serde_json::json!([LOGIN, "nobody"]), "{web}");
}

/// `postern ssh-config --install -i KEY`: the Host blocks in a file included from
/// ~/.ssh/config and the host CA line in the known hosts file, written once however often
/// it runs; the blocks carry the key for both hops, so plain ssh works with a key ssh
/// would not try by itself.
#[test]
fn ssh_config_install_writes_blocks_that_work_with_the_given_key() {
    assert!(os_account_exists(LOGIN), "tests/run.sh creates the OS account {LOGIN}; run it (as root) first");
    let keys = tempfile::tempdir().unwrap();
    let bob = keys.path().join("bob-key");
    keygen(&bob);
    let bob_pub = std::fs::read_to_string(bob.with_extension("pub")).unwrap();
    let s = SshSetup::with(
        "",
        &format!(
            "[[ssh.users]]\nname = \"bob\"\nkeys = [{:?}]\ninstances = [\"web-*\"]\nrun_as = \"{LOGIN}\"\n",
            bob_pub.trim()
        ),
    );
    let agent_cfg = s.dir.path().join("web-22.toml");
    std::fs::write(&agent_cfg, format!("[limits]\nrun_as = [\"{LOGIN}\"]\n")).unwrap();
    let _agent = Agent::start_with(
        &s.gw,
        "web-22",
        "env=test",
        vec![],
        &s.gw.listen,
        &["--config", agent_cfg.to_str().unwrap()],
    );
    let home = s.dir.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    std::fs::write(home.join(".ssh/config"), "Host elsewhere\n    User someone\n").unwrap();
    let install = || {
        let out = Command::new(bin("postern"))
            .arg("--data-dir")
            .arg(s.gw.data_dir())
            .args(["ssh-config", "--install", "--user", "bob", "-i"])
            .arg(&bob)
            .env("HOME", &home)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        ["config", "postern/postern.conf", "postern_known_hosts"]
            .map(|f| std::fs::read_to_string(home.join(".ssh").join(f)).unwrap())
    };
    let first = install();
    assert_eq!(install(), first, "a second --install changes nothing");
    let [main, blocks, known] = first;
    let include = format!("Include {}/.ssh/postern/*.conf", home.display());
    assert_eq!(main.lines().filter(|l| l.starts_with("Include")).collect::<Vec<_>>(), [include.as_str()], "{main}");
    assert!(main.ends_with("Host elsewhere\n    User someone\n"), "{main}");
    let gw = format!("[127.0.0.1]:{}", s.gw.ssh_port);
    assert!(blocks.contains(&format!("HostName 127.0.0.1\n    Port {}\n    User bob\n", s.gw.ssh_port)), "{blocks}");
    assert!(blocks.contains("ProxyJump bob@postern-gateway\n"), "{blocks}");
    assert_eq!(blocks.matches(&format!("IdentityFile {}\n    IdentitiesOnly yes", bob.display())).count(), 2);
    assert_eq!(known.lines().count(), 1, "{known}");
    assert!(known.starts_with("@cert-authority ") && known.contains(&gw), "{known}");

    // Plain ssh with that config only (no agent, no default keys): bob's key on both hops,
    // bob's login.
    let out = Command::new("timeout")
        .args(["30", "ssh", "-F"])
        .arg(home.join(".ssh/config"))
        .args(["-o", "BatchMode=yes", &format!("{LOGIN}@web-22.postern"), "id -un"])
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), format!("{LOGIN}\n"), "{}", text(&out.stderr));
    let events = s.gw.audit_events();
    assert!(events.iter().any(|e| e["event"] == "session.start" && e["user"] == "bob" && e["run_as"] == LOGIN));
}

#[test]
fn gateway_issued_user_certificates_let_a_user_in_until_they_expire_or_the_user_is_disabled() {
    let gw = Gateway::start("[identity]\ncert_ttl = \"1h\"\n");
    let _agent = Agent::start(&gw, "web-01", vec![], &gw.listen);
    let dir = tempfile::tempdir().unwrap();
    let ok = |args: &[&str]| {
        let out = gw.postern(args);
        assert!(out.status.success(), "postern {args:?}: {}{}", text(&out.stdout), text(&out.stderr));
        text(&out.stdout)
    };
    // carol has no key registered at all.
    ok(&["user", "add", "carol"]);
    ok(&["user", "add", "dave"]);
    let policy = dir.path().join("p.toml");
    std::fs::write(
        &policy,
        "name = \"certs\"\n[[statement]]\neffect = \"allow\"\nusers = [\"carol\", \"dave\"]\nactions = [\"exec\"]\n\
         instances = [\"web-*\"]\nallow_root = true\n",
    )
    .unwrap();
    ok(&["policy", "apply", policy.to_str().unwrap()]);
    let key = dir.path().join("carol");
    keygen(&key);
    let kh = dir.path().join("known_hosts");
    gw.write_known_hosts(&kh);
    let ssh = |login: &str, cert: &Path| {
        Command::new("timeout")
            .args(["30", "ssh", "-p", &gw.ssh_port.to_string(), "-i"])
            .arg(&key)
            .arg("-o")
            .arg(format!("CertificateFile={}", cert.display()))
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o"])
            .arg(format!("UserKnownHostsFile={}", kh.display()))
            .args([&format!("{login}%web-01@127.0.0.1"), "echo cert-ok"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    // Issued for carol's key, written beside it as carol-cert.pub.
    let said = ok(&["user", "cert", "carol", "--key-file", key.with_extension("pub").to_str().unwrap()]);
    let cert = dir.path().join("carol-cert.pub");
    assert!(said.contains("certificate for carol") && said.contains(&cert.display().to_string()), "{said}");
    let shown = text(&Command::new("ssh-keygen").arg("-L").arg("-f").arg(&cert).output().unwrap().stdout);
    assert!(shown.contains("Type: ssh-ed25519-cert-v01@openssh.com user certificate"), "{shown}");
    assert!(shown.contains("postern:carol:"), "{shown}");
    let principals: Vec<&str> =
        shown.split("Principals:").nth(1).unwrap().split("Critical").next().unwrap().split_whitespace().collect();
    assert_eq!(principals, ["carol"], "{shown}");
    let out = ssh("carol", &cert);
    assert_eq!(text(&out.stdout), "cert-ok\n", "{}", text(&out.stderr));
    // It names carol only: dave cannot use it.
    assert_ne!(ssh("dave", &cert).status.code(), Some(0));
    // The admin action is in the audit log with the serial the gateway chose.
    let issued = gw
        .audit_events()
        .into_iter()
        .find(|e| e["event"] == "admin.action" && e["op"] == "user_cert")
        .expect("user_cert in the audit log");
    assert_eq!(issued["args"]["name"], "carol");
    assert!(issued["args"]["serial"].as_u64().is_some(), "{issued}");
    assert!(issued["args"]["key"].as_str().unwrap().starts_with("SHA256:"), "{issued}");

    // Disabled: the unexpired certificate is refused at once, and stays refused when she is
    // enabled again (disabling revoked it); a new one works.
    ok(&["user", "disable", "carol"]);
    let out = ssh("carol", &cert);
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("Permission denied (publickey)"), "refused at login: {}", text(&out.stderr));
    let out = gw.postern(&["user", "cert", "carol", "--key-file", key.with_extension("pub").to_str().unwrap()]);
    assert!(!out.status.success() && text(&out.stderr).contains("is disabled"), "{}", text(&out.stderr));
    ok(&["user", "enable", "carol"]);
    assert_ne!(ssh("carol", &cert).status.code(), Some(0), "a certificate revoked by the disable worked again");
    ok(&["user", "cert", "carol", "--key-file", key.with_extension("pub").to_str().unwrap()]);
    assert_eq!(text(&ssh("carol", &cert).stdout), "cert-ok\n");
    // `revoke --user` takes back her unexpired certificates too.
    let said = ok(&["revoke", "--user", "carol"]);
    assert!(said.contains("1 certificate"), "{said}");
    assert_ne!(ssh("carol", &cert).status.code(), Some(0), "a certificate revoked with revoke --user worked");
    ok(&["user", "cert", "carol", "--key-file", key.with_extension("pub").to_str().unwrap()]);

    // A short one works, then expires and is refused.
    let short = dir.path().join("short-cert.pub");
    ok(&[
        "user",
        "cert",
        "carol",
        "--key-file",
        key.with_extension("pub").to_str().unwrap(),
        "--ttl",
        "4s",
        "--out",
        short.to_str().unwrap(),
    ]);
    assert_eq!(text(&ssh("carol", &short).stdout), "cert-ok\n");
    wait_until("the short certificate to be refused", Duration::from_secs(20), || {
        ssh("carol", &short).status.code() != Some(0)
    });
    // Unknown users and bad lifetimes are refused with a reason.
    let out = gw.postern(&["user", "cert", "nobody", "--key-file", key.with_extension("pub").to_str().unwrap()]);
    assert!(!out.status.success() && text(&out.stderr).contains("no user \"nobody\""), "{}", text(&out.stderr));
    let out = gw.postern(&[
        "user",
        "cert",
        "carol",
        "--key-file",
        key.with_extension("pub").to_str().unwrap(),
        "--ttl",
        "30d",
    ]);
    assert!(!out.status.success() && text(&out.stderr).contains("between 1s and 7d"), "{}", text(&out.stderr));
}

/// Rules in the output hook of a network namespace's nftables (say, "drop every UDP
/// packet"), removed on drop or with [`NsFirewall::remove`].
struct NsFirewall {
    ns: String,
    table: String,
}

impl NsFirewall {
    fn add(ns: &NetNs, name: &str, rules: &str) -> NsFirewall {
        let table = format!("postern_{name}");
        sh(&format!(
            "ip netns exec {} nft -f - <<'EOF'\ntable inet {table} {{\n  chain out {{\n    \
             type filter hook output priority 0; policy accept;\n    {rules}\n  }}\n}}\nEOF",
            ns.name
        ));
        NsFirewall { ns: ns.name.clone(), table }
    }

    fn remove(&self) {
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft", "delete", "table", "inet", &self.table])
            .status();
    }
}

impl Drop for NsFirewall {
    fn drop(&mut self) {
        self.remove();
    }
}

/// An agent's row in `postern instances --json`.
fn instance_row(gw: &Gateway, name: &str) -> serde_json::Value {
    let out = gw.postern(&["instances", "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    rows.as_array().and_then(|r| r.iter().find(|r| r["name"] == name).cloned()).unwrap_or_default()
}

fn transport_of(gw: &Gateway, name: &str) -> Option<String> {
    let row = instance_row(gw, name);
    if row["online"] != true {
        return None;
    }
    row["transport"].as_str().map(str::to_owned)
}

/// `postern-agent ARGS` inside the namespace.
fn agent_in(ns: &NetNs, args: &[&str]) -> Output {
    Command::new("timeout")
        .args(["60", "ip", "netns", "exec", &ns.name])
        .arg(bin("postern-agent"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Moves `size` bytes from a service on the host side of the namespace's link, through
/// `ssh -L` to `instance`, and checks they all arrive intact.
fn forward_bulk(s: &SshSetup, ns: &NetNs, instance: &str, size: usize) {
    use std::io::{Read, Write};
    let source = std::net::TcpListener::bind((ns.host_ip.as_str(), 0)).unwrap();
    let port = source.local_addr().unwrap().port();
    let payload: std::sync::Arc<Vec<u8>> = std::sync::Arc::new((0..size).map(|i| (i % 251) as u8).collect());
    std::thread::spawn(move || {
        for mut c in source.incoming().flatten() {
            let payload = payload.clone();
            std::thread::spawn(move || c.write_all(&payload));
        }
    });
    let local = free_tcp_port();
    let mut fwd = s
        .cmd("ssh")
        .args(["-N", "-o", "ExitOnForwardFailure=yes", "-L", &format!("{local}:{}:{port}", ns.host_ip)])
        .arg(format!("alice@{instance}.postern"))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("forward listening", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", local)).is_ok()
    });
    let mut c = std::net::TcpStream::connect(("127.0.0.1", local)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut got = Vec::new();
    let read = c.read_to_end(&mut got);
    let _ = (fwd.kill(), fwd.wait());
    assert!(read.is_ok(), "{read:?}");
    assert_eq!(got.len(), size, "bytes through -L");
    assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8), "the bytes changed on the way");
}

/// Issue 20: an agent whose network drops every UDP packet (nftables in its namespace)
/// enrolls and comes online over TCP within 10 s; ssh, scp and `-L` work through it, and
/// `postern instances` and the audit log say `tcp`. Once UDP passes again, it moves back to
/// QUIC by itself.
#[test]
fn an_agent_whose_network_drops_udp_works_over_tcp_and_moves_back_to_quic() {
    assert!(nix::unistd::Uid::effective().is_root(), "creates a network namespace; CI runs as root");
    let ns = NetNs::create();
    let s = SshSetup::on(&format!("{}:{}", ns.host_ip, free_udp_port()), "", "");
    let udp = NsFirewall::add(&ns, "no_udp", "meta l4proto udp drop");
    let (token, pin) = s.gw.token(&["--name", "web-tcp", "--labels", "env=test"]);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let started = std::time::Instant::now();
    let out = agent_in(
        &ns,
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "join",
            "--gateway",
            &s.gw.listen,
            "--token",
            &token,
            "--ca-pin",
            &pin,
        ],
    );
    assert!(out.status.success(), "join with UDP dropped: {}{}", text(&out.stdout), text(&out.stderr));
    assert!(started.elapsed() < Duration::from_secs(10), "join took {:?}", started.elapsed());
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, format!("[agent]\nquic_retry_secs = 2\n[limits]\ntcp_allow = [\"{}/32\"]\n", ns.host_ip))
        .unwrap();
    let prefix = vec!["ip".to_owned(), "netns".to_owned(), "exec".to_owned(), ns.name.clone()];
    let mut agent = Agent { dir, name: "web-tcp".into(), proc: None, prefix };
    agent.run_with(&["--config", config.to_str().unwrap()]);
    let online = wait_until("web-tcp online over TCP", Duration::from_secs(20), || {
        transport_of(&s.gw, "web-tcp").as_deref() == Some("tcp")
    });
    assert!(online < Duration::from_secs(10), "online over TCP after {online:?}");
    let table = text(&s.gw.postern(&["instances"]).stdout);
    assert!(
        table.contains("TRANSPORT") && table.lines().any(|l| l.contains("web-tcp") && l.contains(" tcp ")),
        "{table}"
    );

    let out = s.ssh(&["alice@web-tcp.postern", "echo over-tcp; exit 3"]);
    assert_eq!((text(&out.stdout).as_str(), out.status.code()), ("over-tcp\n", Some(3)), "{}", text(&out.stderr));
    // scp both ways, 3 MiB.
    let blob: Vec<u8> = (0..3 << 20).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let (up, remote, back) =
        (s.dir.path().join("up.bin"), agent.dir.path().join("remote.bin"), s.dir.path().join("back.bin"));
    std::fs::write(&up, &blob).unwrap();
    let out =
        s.cmd("scp").arg("-q").arg(&up).arg(format!("alice@web-tcp.postern:{}", remote.display())).output().unwrap();
    assert!(out.status.success(), "scp up: {}", text(&out.stderr));
    let out =
        s.cmd("scp").arg("-q").arg(format!("alice@web-tcp.postern:{}", remote.display())).arg(&back).output().unwrap();
    assert!(out.status.success(), "scp down: {}", text(&out.stderr));
    assert!(std::fs::read(&back).unwrap() == blob, "scp over TCP changed the file");
    forward_bulk(&s, &ns, "web-tcp", 8 << 20);
    let connected = |transport: &str| {
        s.gw.audit_events().iter().any(|e| e["event"] == "agent.connected" && e["transport"] == transport)
    };
    assert!(connected("tcp"), "agent.connected names the transport");

    // UDP passes again: the agent tries QUIC every 2 s here and moves.
    udp.remove();
    let moved = wait_until("web-tcp back on QUIC", Duration::from_secs(20), || {
        transport_of(&s.gw, "web-tcp").as_deref() == Some("quic")
    });
    eprintln!("back on QUIC {moved:?} after UDP was allowed");
    let log = std::fs::read_to_string(agent.dir.path().join("agent.log")).unwrap_or_default();
    assert!(log.contains("moving the tunnel back"), "{log}");
    assert!(connected("quic"));
    let out = s.ssh(&["alice@web-tcp.postern", "echo over-quic"]);
    assert_eq!(text(&out.stdout), "over-quic\n", "{}", text(&out.stderr));
}

/// Issue 20: with UDP dropped and the gateway's TCP port closed too, the only way out is an
/// HTTP proxy (Debian's tinyproxy, with basic authentication): the agent enrolls and comes
/// online through it, a wrong password is a clear error that does not show the password,
/// and when the gateway restarts the agent is back through the proxy within 10 s.
#[test]
fn through_an_http_proxy_with_udp_blocked_and_across_a_gateway_restart() {
    assert!(nix::unistd::Uid::effective().is_root(), "creates a network namespace; CI runs as root");
    let ns = NetNs::create();
    let mut s = SshSetup::on(&format!("{}:{}", ns.host_ip, free_udp_port()), "", "");
    let tunnel_port = s.gw.listen.rsplit(':').next().unwrap().to_owned();
    let _fw = NsFirewall::add(
        &ns,
        "proxy_only",
        &format!("meta l4proto udp drop\n    ip daddr {} tcp dport {tunnel_port} drop", ns.host_ip),
    );
    let proxy_port = free_tcp_port();
    let conf = s.dir.path().join("tinyproxy.conf");
    std::fs::write(
        &conf,
        format!(
            "User nobody\nGroup nogroup\nPort {proxy_port}\nListen {host}\nTimeout 600\nLogLevel Connect\n\
             MaxClients 20\nAllow {ns_ip}\nBasicAuth agent s3cret-pw\nConnectPort {tunnel_port}\n",
            host = ns.host_ip,
            ns_ip = ns.ns_ip
        ),
    )
    .unwrap();
    let mut tinyproxy = Command::new("tinyproxy");
    tinyproxy.arg("-d").arg("-c").arg(&conf);
    let proxy = spawn_logged(tinyproxy, &s.dir.path().join("tinyproxy.log"));
    wait_until("tinyproxy listening", Duration::from_secs(10), || {
        std::net::TcpStream::connect((ns.host_ip.as_str(), proxy_port)).is_ok()
    });
    let via = |password: &str| format!("http://agent:{password}@{}:{proxy_port}", ns.host_ip);

    let (token, pin) = s.gw.token(&["--name", "web-proxied", "--labels", "env=test"]);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let join = |proxy: &str| {
        let st = state.to_str().unwrap();
        let args = ["--state-dir", st, "join", "--gateway", &s.gw.listen, "--token", &token, "--ca-pin", &pin];
        let mut args = args.to_vec();
        args.extend(["--proxy", proxy]);
        agent_in(&ns, &args)
    };
    let out = join(&via("wrong-pw"));
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success() && said.contains("wants credentials") && said.contains("were refused"), "{said}");
    assert!(!said.contains("wrong-pw"), "the proxy password was shown: {said}");
    let out = join(&via("s3cret-pw"));
    assert!(out.status.success(), "join through the proxy: {}{}", text(&out.stdout), text(&out.stderr));

    let prefix = vec!["ip".to_owned(), "netns".to_owned(), "exec".to_owned(), ns.name.clone()];
    let mut agent = Agent { dir, name: "web-proxied".into(), proc: None, prefix };
    agent.run_with(&["--proxy", &via("s3cret-pw")]);
    let online = wait_until("web-proxied online through the proxy", Duration::from_secs(20), || {
        transport_of(&s.gw, "web-proxied").as_deref() == Some("tcp")
    });
    assert!(online < Duration::from_secs(10), "online through the proxy after {online:?}");
    let out = s.ssh(&["alice@web-proxied.postern", "echo via-proxy"]);
    assert_eq!(text(&out.stdout), "via-proxy\n", "{}", text(&out.stderr));
    let proxy_log = std::fs::read_to_string(&proxy.log).unwrap_or_default();
    assert!(proxy_log.contains(&format!("CONNECT {}:{tunnel_port}", ns.host_ip)), "{proxy_log}");
    let agent_log = std::fs::read_to_string(agent.dir.path().join("agent.log")).unwrap_or_default();
    assert!(!agent_log.contains("s3cret-pw"), "the agent logged the proxy password:\n{agent_log}");

    // The gateway restarts: the agent sees its TCP connection end and comes back at once.
    s.gw.kill();
    let restarted = std::time::Instant::now();
    s.gw.restart();
    wait_until("web-proxied back after the restart", Duration::from_secs(20), || {
        transport_of(&s.gw, "web-proxied").as_deref() == Some("tcp")
    });
    let back = restarted.elapsed();
    assert!(back < Duration::from_secs(10), "back {back:?} after the restart");
    let out = s.ssh(&["alice@web-proxied.postern", "echo after-restart"]);
    assert_eq!(text(&out.stdout), "after-restart\n", "{}", text(&out.stderr));
}
