//! End-to-end: the real `postern` gateway and `postern-agent` processes on loopback and in a
//! network namespace, driven through the CLI as a user would.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::process::Command;
use std::time::Duration;

use postern_e2e::*;

#[test]
fn exec_and_pty_shell_through_the_tunnel() {
    let gw = Gateway::start("");
    let agent = Agent::start(&gw, "web-01", vec![], &gw.listen);

    // stdout, stderr and exit status stay separate.
    let out = gw.postern(&["exec", "web-01", "--", "echo hello; echo oops >&2; exit 3"]);
    assert_eq!(text(&out.stdout), "hello\n");
    assert_eq!(text(&out.stderr), "oops\n");
    assert_eq!(out.status.code(), Some(3));

    // stdin is piped through and closed at EOF.
    let payload = vec![b'x'; 300_000];
    let out = gw.postern_stdin(&["exec", "web-01", "--", "wc", "-c"], &payload);
    assert_eq!(text(&out.stdout).trim(), "300000", "{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0));

    // Admin-socket sessions end with who, the exit code and what they carried (the live
    // table's counters, which `postern sessions --all` shows, feed the end event).
    // The end event is written once the relay has finished, which may be just after the
    // client has its exit status: wait for it.
    let ends = || gw.audit_events().into_iter().filter(|e| e["event"] == "session.end").collect::<Vec<_>>();
    wait_until("both session.end events", Duration::from_secs(10), || ends().len() >= 2);
    let ends = ends();
    assert_eq!(ends.len(), 2, "{ends:#?}");
    assert_eq!(ends[0]["exit_code"], 3, "{ends:#?}");
    assert_eq!(ends[0]["bytes_out"], 11, "{ends:#?}");
    assert_eq!(ends[1]["exit_code"], 0, "{ends:#?}");
    assert_eq!((ends[1]["bytes_in"].as_u64(), ends[1]["bytes_out"].as_u64()), (Some(300_000), Some(7)), "{ends:#?}");
    for end in &ends {
        assert!(end["user"].as_str().unwrap().starts_with("local-admin(uid="), "{end}");
        assert_eq!((&end["logged"], &end["via"]), (&serde_json::json!(false), &serde_json::json!("admin-socket")));
    }

    // A PTY shell: the remote side has a terminal of the requested size.
    let out = gw.postern_stdin(&["shell", "web-01"], b"tty; stty size; echo TERM=$TERM; exit 5\n");
    let shown = text(&out.stdout);
    assert!(shown.contains("/dev/pts/"), "no pty: {shown}");
    assert!(shown.contains("24 80"), "size: {shown}");
    assert_eq!(out.status.code(), Some(5), "{shown}");

    // A client that goes away ends the remote command (no orphaned processes).
    let marker = format!("sleep {}", 3000 + std::process::id() % 1000);
    let mut client = Command::new(bin("postern"))
        .arg("--data-dir")
        .arg(gw.data_dir())
        .args(["exec", "web-01", "--", &format!("echo started; exec {marker}")])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(client.stdout.as_mut().unwrap()), &mut first).unwrap();
    assert_eq!(first, "started\n");
    let running = || Command::new("pgrep").args(["-f", &marker]).output().unwrap().status.success();
    assert!(running());
    // Its crash marker names the user and the target: private, as the database is.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let markers: Vec<_> =
        std::fs::read_dir(gw.data_dir().join("live-sessions")).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(markers.len(), 1, "{markers:?}");
    assert_eq!(mode(&markers[0]), 0o600, "{markers:?}");
    for db in ["postern.db", "postern.db-wal", "postern.db-shm"] {
        assert_eq!(mode(&gw.data_dir().join(db)), 0o600, "{db}");
    }
    client.kill().unwrap();
    client.wait().unwrap();
    wait_until("remote command to end after the client left", Duration::from_secs(5), || !running());

    // Unknown instance: a clear error and a failing exit status.
    let out = gw.postern(&["exec", "no-such-host", "--", "true"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("no instance named"), "{}", text(&out.stderr));

    // The instance list shows what the agent reported.
    let list = gw.instances();
    let me = list.iter().find(|i| i["name"] == "web-01").unwrap();
    assert_eq!(me["labels"]["env"], "test");
    assert_eq!(me["online"], true);
    assert!(me["platform"].as_str().unwrap().starts_with("linux-"));
    let table = text(&gw.postern(&["instances"]).stdout);
    assert!(table.contains("web-01") && table.contains("online"), "{table}");

    // Key material on the agent is private.
    assert_eq!(mode(&agent.state_dir().join("identity.pem")), 0o600);
}

#[test]
fn agent_comes_back_within_5s_after_gateway_restart() {
    let mut gw = Gateway::start("");
    let _agent = Agent::start(&gw, "db-01", vec![], &gw.listen);
    gw.stop();
    gw.restart();
    let took = wait_until("agent online after restart", Duration::from_secs(5), || gw.is_online("db-01"));
    eprintln!("agent back online {took:?} after the gateway's admin socket answered");
    let out = gw.postern(&["exec", "db-01", "--", "echo", "back"]);
    assert_eq!(text(&out.stdout), "back\n");
    let events = gw.audit_events();
    assert!(events.iter().filter(|e| e["event"] == "agent.connected").count() >= 2);
}

/// After a crash (SIGKILL: no connection close reaches the agents) and a restart on the
/// same data directory and port, agents are back well before their QUIC idle timeout
/// (30 s): the new process answers their next keep-alive with a stateless reset.
#[test]
fn agents_come_back_within_10s_after_the_gateway_is_killed() {
    let mut gw = Gateway::start("");
    let names = ["crash-1", "crash-2", "crash-3"];
    let _agents: Vec<Agent> = names.iter().map(|n| Agent::start(&gw, n, vec![], &gw.listen)).collect();
    let all_online = |gw: &Gateway| {
        let list = gw.instances();
        names.iter().all(|n| list.iter().any(|i| i["name"] == *n && i["online"] == true))
    };
    let crash = std::time::Instant::now();
    gw.kill();
    gw.restart();
    let restarted = crash.elapsed();
    let left = Duration::from_secs(10).saturating_sub(restarted);
    wait_until("agents online within 10 s of the crash", left, || all_online(&gw));
    eprintln!("gateway answering {restarted:?} after the crash, agents back {:?} after it", crash.elapsed());
    let out = gw.postern(&["exec", "crash-2", "--", "echo", "back"]);
    assert_eq!(text(&out.stdout), "back\n", "{}", text(&out.stderr));
}

#[test]
fn tokens_reused_expired_or_wrong_pin_are_refused() {
    // Every refusal written on its own, to read each reason (rogue.rs tests the summaries).
    let gw = Gateway::start("[audit]\nrefusal_interval = \"0\"");
    let dir = tempfile::tempdir().unwrap();

    let (token, pin) = gw.token(&[]);
    let ok = Agent::try_join(&[], &gw.listen, &token, &pin, &dir.path().join("a"));
    assert!(ok.status.success(), "{}", text(&ok.stderr));

    let reused = Agent::try_join(&[], &gw.listen, &token, &pin, &dir.path().join("b"));
    assert!(!reused.status.success());
    assert!(text(&reused.stderr).contains("already used"), "{}", text(&reused.stderr));

    let (short, pin) = gw.token(&["--ttl", "1s"]);
    // Waiting for the clock is the point of this step: the token must be past its expiry.
    std::thread::sleep(Duration::from_millis(2100));
    let expired = Agent::try_join(&[], &gw.listen, &short, &pin, &dir.path().join("c"));
    assert!(!expired.status.success());
    assert!(text(&expired.stderr).contains("expired"), "{}", text(&expired.stderr));

    let (fresh, _) = gw.token(&[]);
    let wrong_pin = format!("sha256:{}", "ab".repeat(32));
    let bad = Agent::try_join(&[], &gw.listen, &fresh, &wrong_pin, &dir.path().join("d"));
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("does not match --ca-pin"), "{}", text(&bad.stderr));
    // The token was not spent by the failed attempt: it still works with the right pin.
    let good = Agent::try_join(&[], &gw.listen, &fresh, &pin, &dir.path().join("e"));
    assert!(good.status.success(), "{}", text(&good.stderr));

    let garbage = Agent::try_join(&[], &gw.listen, "pt_garbage", &pin, &dir.path().join("f"));
    assert!(text(&garbage.stderr).contains("unknown enrollment token"), "{}", text(&garbage.stderr));

    let refused: Vec<String> = gw
        .audit_events()
        .iter()
        .filter(|e| e["event"] == "agent.enroll_refused")
        .map(|e| e["reason"].as_str().unwrap().to_owned())
        .collect();
    assert!(refused.iter().any(|r| r.contains("already used")), "{refused:?}");
    assert!(refused.iter().any(|r| r.contains("expired")), "{refused:?}");
    assert!(refused.iter().any(|r| r.contains("unknown")), "{refused:?}");
    // The secret never reaches the audit log, nor the gateway's own log (debug for the tunnel).
    let log = gw.audit_text();
    assert!(!log.contains(&token) && !log.contains(&fresh));
    let log = gw.proc.as_ref().unwrap().log_text();
    assert!(log.contains("enrollment refused"), "the refusals are logged:\n{log}");
    assert!(!log.contains(&token) && !log.contains(&fresh), "{log}");
}

#[test]
fn revoked_agent_is_disconnected_and_stays_out() {
    let gw = Gateway::start("");
    let mut agent = Agent::start(&gw, "old-01", vec![], &gw.listen);
    let out = gw.postern(&["instances", "revoke", "old-01"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let proc = agent.proc.as_mut().unwrap();
    let code = proc.wait_exit(Duration::from_secs(15));
    assert_eq!(code, Some(1));
    assert!(proc.log_text().contains("revoked"), "{}", proc.log_text());
    assert!(!gw.instances().iter().any(|i| i["name"] == "old-01"));
}

#[test]
fn quickstart_serves_the_local_host_and_stops_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_udp_port();
    let data = dir.path().join("data");
    // The person running quickstart has an SSH key; quickstart registers it.
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    sh(&format!("ssh-keygen -q -t ed25519 -N '' -C me -f {}", home.join(".ssh/id_ed25519").display()));
    let mut cmd = Command::new(bin("postern"));
    let ssh_listen = format!("127.0.0.1:{}", free_tcp_port());
    let web_port = free_tcp_port();
    cmd.arg("--data-dir").arg(&data).args(["quickstart", "--listen", &format!("127.0.0.1:{port}")]);
    cmd.args(["--ssh-listen", &ssh_listen, "--web-listen", &format!("127.0.0.1:{web_port}")]);
    cmd.env("HOME", &home).env_remove("SSH_AUTH_SOCK");
    let mut qs = spawn_logged(cmd, &dir.path().join("quickstart.log"));
    wait_until("quickstart banner", Duration::from_secs(30), || qs.log_text().contains("Press Ctrl-C"));
    let banner = qs.log_text();
    let host = postern_tunnel::agent::hostname();
    assert!(banner.contains(&format!("exec {host} -- uname -a")), "{banner}");
    let out = Command::new(bin("postern"))
        .arg("--data-dir")
        .arg(&data)
        .args(["exec", &host, "--", "echo", "hi"])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "hi\n", "{}", text(&out.stderr));
    // A command the banner prints, run as printed (the key from ~/.ssh, no ssh-agent).
    let as_printed = |start: &str, more: &[&str]| {
        let line = banner.lines().map(str::trim).find(|l| l.starts_with(start)).expect("a hint in the banner");
        let out = Command::new(bin("postern"))
            .args(line.split_whitespace().skip(1))
            .args(more)
            .env("HOME", &home)
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("POSTERN_USER")
            .env_remove("POSTERN_GATEWAY")
            .output()
            .unwrap();
        assert!(out.status.success(), "{line}: {}", text(&out.stderr));
        out
    };
    // The printed user-client command works as printed.
    let out = as_printed("postern ls ", &["--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["name"], host.as_str(), "{listed}");
    // The person's own account is their login: plain ssh with the installed config.
    let me = nix::unistd::User::from_uid(nix::unistd::Uid::current()).unwrap().unwrap().name;
    assert_eq!(listed[0]["logins"], serde_json::json!([me]), "{listed}");
    // The web console is on, and the printed sign-in command works as printed.
    let out = as_printed("postern web-login ", &[]);
    assert!(
        text(&out.stdout).starts_with(&format!("https://127.0.0.1:{web_port}/signin?token=")),
        "{}",
        text(&out.stdout)
    );
    let out = Command::new(bin("postern"))
        .arg("--data-dir")
        .arg(&data)
        .args(["ssh-config", "--install", "-i"])
        .arg(home.join(".ssh/id_ed25519"))
        .env("HOME", &home)
        .env_remove("POSTERN_USER")
        .env_remove("POSTERN_GATEWAY")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = Command::new("timeout")
        .args(["30", "ssh", "-F"])
        .arg(home.join(".ssh/config"))
        .args(["-o", "BatchMode=yes", &format!("{me}@{host}.postern"), "id -un"])
        .env_remove("SSH_AUTH_SOCK")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), format!("{me}\n"), "{}", text(&out.stderr));
    qs.signal(nix::sys::signal::Signal::SIGINT);
    assert_eq!(qs.wait_exit(Duration::from_secs(10)), Some(0), "{}", qs.log_text());
    assert!(!data.join("admin.sock").exists());
}

/// quickstart takes its listen addresses from the command line, else from `--config`
/// (`[tunnel]`, `[ssh]`, `[rdp]`, `[web]`), and prints every listener in an aligned banner.
#[test]
fn quickstart_listens_where_the_config_says_and_prints_every_listener() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let home = dir.path().join("home");
    std::fs::create_dir_all(home.join(".ssh")).unwrap();
    sh(&format!("ssh-keygen -q -t ed25519 -N '' -C me -f {}", home.join(".ssh/id_ed25519").display()));
    let (file_udp, flag_udp, ssh, rdp) = (free_udp_port(), free_udp_port(), free_tcp_port(), free_tcp_port());
    let web = free_tcp_port();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\n[tunnel]\nlisten = \"127.0.0.1:{file_udp}\"\n[ssh]\nlisten = \"127.0.0.1:{ssh}\"\n\
             [rdp]\nenabled = true\nlisten = \"127.0.0.1:{rdp}\"\n[web]\nlisten = \"127.0.0.1:{web}\"\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin("postern"));
    // The command line wins over the file for the tunnel; the file's SSH and RDP addresses hold.
    cmd.arg("--config").arg(&config).args(["quickstart", "--listen", &format!("127.0.0.1:{flag_udp}")]);
    cmd.env("HOME", &home).env_remove("SSH_AUTH_SOCK");
    let mut qs = spawn_logged(cmd, &dir.path().join("quickstart.log"));
    wait_until("quickstart banner", Duration::from_secs(30), || qs.log_text().contains("Press Ctrl-C"));
    let log = qs.log_text();
    let banner = &log[log.find("Postern is running.").unwrap()..];
    let squeezed: Vec<String> = banner.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect();
    for want in [
        format!("agents (tunnel): udp 127.0.0.1:{flag_udp}, tcp 127.0.0.1:{flag_udp} CA pin sha256:"),
        format!("SSH door: tcp 127.0.0.1:{ssh}"),
        format!("RDP door: tcp 127.0.0.1:{rdp}"),
        format!("web console: https://127.0.0.1:{web} (tcp 127.0.0.1:{web}; sign in with: postern web-login)"),
        format!("admin socket: {}", data.join("admin.sock").display()),
        format!("data directory: {}", data.display()),
        format!("ssh -o UserKnownHostsFile={} -p {ssh} ", data.join("known_hosts").display()),
    ] {
        assert!(squeezed.iter().any(|l| l.starts_with(&want)), "no line {want:?} in:\n{banner}");
    }
    // Aligned: lines start in the first column, or indented by two for a listed item.
    for line in banner.lines().filter(|l| l.starts_with(' ')) {
        assert!(line.starts_with("  ") && !line.starts_with("   "), "misaligned line {line:?} in:\n{banner}");
    }
    // The doors really listen there (and the tunnel where the flag said: the agent is online).
    for port in [ssh, rdp, web] {
        std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    }
    assert!(std::net::UdpSocket::bind(("127.0.0.1", flag_udp)).is_err(), "the tunnel is not on the flag's port");
    assert!(std::net::UdpSocket::bind(("127.0.0.1", file_udp)).is_ok(), "the file's tunnel port is in use");
    qs.signal(nix::sys::signal::Signal::SIGINT);
    assert_eq!(qs.wait_exit(Duration::from_secs(10)), Some(0), "{}", qs.log_text());
}

/// `postern gateway` prints every address it listens on, and which doors are off.
#[test]
fn gateway_prints_every_listener() {
    let gw = Gateway::start("");
    let proc = gw.proc.as_ref().unwrap();
    wait_until("the gateway's banner", Duration::from_secs(10), || proc.log_text().contains("to stop it"));
    let log = proc.log_text();
    let squeezed: Vec<String> = log.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect();
    for want in [
        "Postern gateway is running.".to_owned(),
        format!("agents (tunnel): udp {0}, tcp {0} CA pin sha256:", gw.listen),
        format!("SSH door: tcp 127.0.0.1:{}", gw.ssh_port),
        "RDP door: off (turn it on with [rdp] enabled = true)".to_owned(),
        format!("admin socket: {}", gw.data_dir().join("admin.sock").display()),
    ] {
        assert!(squeezed.iter().any(|l| l.starts_with(&want)), "no line {want:?} in:\n{log}");
    }
}

/// An agent in its own network namespace whose firewall drops every inbound connection
/// still serves sessions: it only ever dials out.
#[test]
fn agent_in_outbound_only_network_namespace() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test creates a network namespace and must run as root (CI does)"
    );
    let ns = NetNs::create();
    let gw = Gateway::start_on(&format!("{}:{}", ns.host_ip, free_udp_port()), "");
    let prefix = vec!["ip".to_owned(), "netns".to_owned(), "exec".to_owned(), ns.name.clone()];
    let _agent = Agent::start(&gw, "edge-01", prefix.clone(), &gw.listen);

    let out = gw.postern(&["exec", "edge-01", "--", "ip -brief addr show; echo from-inside"]);
    let shown = text(&out.stdout);
    assert!(shown.contains(&ns.ns_ip) && shown.contains("from-inside"), "{shown}{}", text(&out.stderr));

    // Prove the namespace accepts nothing inbound: a listener inside it is unreachable.
    let mut listener = Command::new("ip")
        .args(["netns", "exec", &ns.name, "python3", "-c"])
        .arg("import socket,sys;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',18080));s.listen();print('up',flush=True);s.accept()")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(listener.stdout.as_mut().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "up");
    let target = format!("{}:18080", ns.ns_ip).parse().unwrap();
    let inbound = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2));
    assert!(inbound.is_err(), "inbound connection into the namespace should be dropped");
    let _ = listener.kill();
    let _ = listener.wait();
}

/// An interactive `postern shell` in a real terminal (tmux): raw mode, prompt, Ctrl-C
/// reaching the remote process, window resizes reaching the remote PTY, exit status.
#[test]
fn interactive_shell_in_a_terminal() {
    let gw = Gateway::start("");
    let _agent = Agent::start(&gw, "tty-01", vec![], &gw.listen);
    let cmd = format!("{} --data-dir {} shell tty-01", bin("postern").display(), gw.data_dir().display());
    drive_interactive_terminal(&cmd);
}

/// `postern completions bash | head`: the reader going away ends the command quietly.
#[test]
fn completions_into_a_closed_pipe_exit_quietly() {
    use std::io::Read;
    let mut child = Command::new(bin("postern"))
        .args(["completions", "bash"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    child.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(!text(&out.stderr).contains("panicked"), "{}", text(&out.stderr));
    assert!(matches!(out.status.code(), Some(0 | 141)), "{:?}: {}", out.status, text(&out.stderr));
}

/// Tests that need a terminal (asciinema opens `/dev/tty`) get one of their own, so the
/// suite passes with no terminal at all (`setsid bash .ci/run </dev/null`).
#[test]
fn commands_that_need_a_terminal_get_their_own() {
    let out = on_own_terminal(r#"exec 3<>/dev/tty && echo "$ARG" >&3 && echo "$ARG""#, std::path::Path::new("tty-ok"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "tty-ok\n");
}
