//! The keys a cluster shares, gateway peering, failures (docs/scale-out.md).

use std::process::{Command, Stdio};
use std::time::Duration;

use postern_e2e::*;

fn listen() -> String {
    format!("127.0.0.1:{}", free_udp_port())
}

#[test]
fn every_gateway_of_a_cluster_uses_the_keys_sealed_in_the_store() {
    let cluster = Cluster::new("keys");
    // Sealed, never in the clear: every row is a sealed file's bytes.
    assert_eq!(
        cluster.sql("SELECT string_agg(name, ',' ORDER BY name) FROM cluster_keys"),
        "agent-ca,audit-signing,rdp-token,ssh-host-ca,ssh-user-ca"
    );
    assert_eq!(
        cluster.sql(
            "SELECT COUNT(*) FROM cluster_keys WHERE substring(sealed from 1 for 17) = 'POSTERN-SEALED/1\\012'::bytea"
        ),
        "5"
    );
    assert_eq!(
        cluster.sql(
            "SELECT COUNT(*) FROM cluster_keys WHERE position('PRIVATE KEY'::bytea in sealed) > 0 \
             OR position('BEGIN'::bytea in sealed) > 0"
        ),
        "0"
    );
    // init again keeps them.
    let again = cluster.init();
    assert!(again.status.success(), "{}", text(&again.stderr));
    let out = text(&again.stdout);
    assert_eq!(out.lines().filter(|l| l.contains(" kept ")).count(), 5, "{out}");
    assert!(!out.contains("created"), "{out}");

    let mut a = Gateway::start_on(&listen(), &cluster.config("gw-a"));
    let b = Gateway::start_on(&listen(), &cluster.config("gw-b"));
    // One agent CA: both hand out the same pin, and it is the one init printed.
    let (token, pin_a) = a.token(&["--name", "web-01"]);
    let (_, pin_b) = b.token(&[]);
    assert_eq!(pin_a, pin_b);
    assert!(out.contains(&pin_a), "{out}");
    // No private key of the cluster is written to a gateway's disk; the audit public key is
    // the cluster's on both.
    for gw in [&a, &b] {
        for f in ["ca.key", "ssh_host_ca", "ssh_user_ca", "audit-signing.key"] {
            assert!(!gw.data_dir().join(f).exists(), "{f} written to {}", gw.data_dir().display());
        }
    }
    let public = |gw: &Gateway| std::fs::read_to_string(gw.data_dir().join("audit-signing.pub")).unwrap();
    assert_eq!(public(&a), public(&b));
    assert!(out.contains(public(&a).trim()), "{out}");

    // A token made at A enrolls an agent at B (the store is shared, the CA is the same).
    let agent_dir = tempfile::tempdir().unwrap();
    let state = agent_dir.path().join("state");
    let join = Agent::try_join(&[], &b.listen, &token, &pin_a, &state);
    assert!(join.status.success(), "{}{}", text(&join.stdout), text(&join.stderr));
    let mut agent = Agent { dir: agent_dir, name: "web-01".into(), proc: None, prefix: vec![] };
    agent.run();
    wait_until("web-01 online at B", Duration::from_secs(20), || b.is_online("web-01"));

    // One host CA: A's `@cert-authority` key lets plain ssh into B with strict checking (the
    // pattern is widened to every port: in a real cluster the gateways share a name and port).
    let dir = tempfile::tempdir().unwrap();
    a.write_known_hosts(&dir.path().join("known_hosts"));
    let line = std::fs::read_to_string(dir.path().join("known_hosts")).unwrap();
    let ca_key = line.split_whitespace().skip(2).collect::<Vec<_>>().join(" ");
    std::fs::write(dir.path().join("known_hosts"), format!("@cert-authority [127.0.0.1]:* {ca_key}\n")).unwrap();
    let key = super::alice_may_exec(&a, dir.path(), "web-*");
    let out = wait_for_output(|| {
        Command::new("timeout")
            .args(["60", "ssh", "-p", &b.ssh_port.to_string(), "-i"])
            .arg(&key)
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o"])
            .arg(format!("UserKnownHostsFile={}", dir.path().join("known_hosts").display()))
            .args(["alice%web-01@127.0.0.1", "echo through-b"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    });
    assert_eq!(text(&out.stdout), "through-b\n", "{}", text(&out.stderr));

    // One user CA: a certificate issued at A (for erin, who has no key registered) gets her
    // into B.
    let erin = dir.path().join("erin");
    ssh_keygen(&erin, "erin");
    for args in [
        vec!["user", "add", "erin"],
        vec!["user", "cert", "erin", "--key-file", erin.with_extension("pub").to_str().unwrap()],
    ] {
        let out = a.postern(&args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
    let policy = dir.path().join("erin.toml");
    std::fs::write(&policy, super::exec_policy("erin", "erin", "web-*")).unwrap();
    let out = a.postern(&["policy", "apply", policy.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = wait_for_output(|| {
        Command::new("timeout")
            .args(["60", "ssh", "-p", &b.ssh_port.to_string(), "-i"])
            .arg(&erin)
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o"])
            .arg(format!("UserKnownHostsFile={}", dir.path().join("known_hosts").display()))
            .args(["erin%web-01@127.0.0.1", "echo erin-at-b"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    });
    assert_eq!(text(&out.stdout), "erin-at-b\n", "{}", text(&out.stderr));
    a.stop();
}

/// Users and policies written at A reach B within its poll (a second): retry until then.
fn wait_for_output(mut run: impl FnMut() -> std::process::Output) -> std::process::Output {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let out = run();
        if out.status.success() || std::time::Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_cluster_gateway_refuses_to_start_without_its_keys_or_with_keys_it_cannot_trust() {
    let cluster = Cluster::create("refusals");
    let gw = Gateway::prepare_on(&listen(), &cluster.config("gw-a"));
    let refused = |why: &str| {
        let out = gw.postern_config(&["gateway"]);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "started: {err}");
        assert!(err.contains(why), "wanted {why:?} in: {err}");
        assert!(!gw.data_dir().join("admin.sock").exists());
    };
    // Before init: nothing to load, nothing made up.
    refused("missing: agent-ca, ssh-host-ca, audit-signing, rdp-token, ssh-user-ca): run `postern cluster init");
    assert_eq!(cluster.sql("SELECT COUNT(*) FROM cluster_keys"), "0");

    let init = cluster.init();
    assert!(init.status.success(), "{}", text(&init.stderr));
    assert_eq!(text(&init.stdout).lines().filter(|l| l.contains(" created ")).count(), 5);

    // A different master key opens nothing: init and the gateway both say so.
    let other = cluster.dir.path().join("other.key");
    let keygen = Command::new(bin("postern")).args(["audit", "keygen"]).arg(&other).output().unwrap();
    assert!(keygen.status.success());
    let config = std::fs::read_to_string(gw.config_path()).unwrap();
    let key_line = format!("key_file = {:?}", cluster.key_file());
    std::fs::write(gw.config_path(), config.replace(&key_line, &format!("key_file = {other:?}"))).unwrap();
    refused("which is not configured here");
    let wrong = gw.postern_config(&["cluster", "init"]);
    assert!(!wrong.status.success() && text(&wrong.stderr).contains("not configured here"), "{}", text(&wrong.stderr));
    std::fs::write(gw.config_path(), &config).unwrap();

    // A sealed value moved to another key's row is refused by name.
    cluster.sql(
        "UPDATE cluster_keys SET sealed = (SELECT sealed FROM cluster_keys WHERE name = 'rdp-token') \
         WHERE name = 'ssh-host-ca'",
    );
    refused("cluster key \"ssh-host-ca\" in the store holds the key \"rdp-token\": the store was changed by hand");
    // One key missing: named.
    cluster.sql("DELETE FROM cluster_keys WHERE name IN ('ssh-host-ca', 'audit-signing')");
    refused("missing: ssh-host-ca, audit-signing)");
}

/// Plain OpenSSH against gateway `gw` as alice, trusting the cluster's host CA on any port.
struct Client {
    dir: tempfile::TempDir,
    key: std::path::PathBuf,
}

impl Client {
    /// alice's key, added at `gw` with `policy` applied there.
    fn new(gw: &Gateway, policy: &str) -> Client {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("alice");
        ssh_keygen(&key, "alice");
        gw.write_known_hosts(&dir.path().join("known_hosts"));
        let line = std::fs::read_to_string(dir.path().join("known_hosts")).unwrap();
        let ca_key = line.split_whitespace().skip(2).collect::<Vec<_>>().join(" ");
        std::fs::write(dir.path().join("known_hosts"), format!("@cert-authority [127.0.0.1]:* {ca_key}\n")).unwrap();
        let file = dir.path().join("policy.toml");
        std::fs::write(&file, policy).unwrap();
        for args in [
            vec!["user", "add", "alice", "--key-file", key.with_extension("pub").to_str().unwrap()],
            vec!["policy", "apply", file.to_str().unwrap()],
        ] {
            let out = gw.postern(&args);
            assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        }
        Client { dir, key }
    }

    /// `PROGRAM -P/-p PORT` with alice's key and strict host key checking.
    fn cmd(&self, program: &str, port_flag: &str, gw: &Gateway) -> Command {
        let mut c = Command::new("timeout");
        c.args(["60", program, port_flag, &gw.ssh_port.to_string(), "-i"])
            .arg(&self.key)
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o"])
            .arg(format!("UserKnownHostsFile={}", self.dir.path().join("known_hosts").display()))
            .stdin(Stdio::null());
        c
    }
}

#[test]
fn a_user_on_one_gateway_reaches_an_agent_connected_to_another() {
    assert!(nix::unistd::Uid::effective().is_root(), "creates a network namespace; CI runs as root");
    let cluster = Cluster::new("peering");
    // The agent is in a namespace with no inbound route, connected to B only.
    let ns = NetNs::create();
    let a = Gateway::start_on(&listen(), &cluster.config("gw-a"));
    let b = Gateway::start_on(&format!("{}:{}", ns.host_ip, free_udp_port()), &cluster.config("gw-b"));
    let limits = cluster.dir.path().join("agent.toml");
    std::fs::write(&limits, format!("[limits]\ntcp_allow = [\"{}/32\"]\n", ns.host_ip)).unwrap();
    let prefix = vec!["ip".to_owned(), "netns".to_owned(), "exec".to_owned(), ns.name.clone()];
    let _agent =
        Agent::start_with(&b, "web-01", "env=test", prefix, &b.listen, &["--config", limits.to_str().unwrap()]);
    let client = Client::new(
        &a,
        &format!(
            "name = \"ops\"\n[[statement]]\neffect = \"allow\"\nusers = [\"alice\"]\n\
             actions = [\"exec\", \"shell\", \"sftp\", \"port-forward\"]\ninstances = [\"web-*\"]\n\
             forward_to = [\"{}:*\"]\nallow_root = true\n",
            ns.host_ip
        ),
    );
    let login = "alice%web-01@127.0.0.1";

    // exec through A: output, stderr and exit status come back as from a local agent.
    let out = client.cmd("ssh", "-p", &a).args([login, "echo via-peer; echo err >&2; exit 4"]).output().unwrap();
    assert_eq!((text(&out.stdout).as_str(), text(&out.stderr).as_str()), ("via-peer\n", "err\n"));
    assert_eq!(out.status.code(), Some(4));

    // A shell on a PTY, recorded at A.
    let out = client
        .cmd("ssh", "-p", &a)
        .args(["-tt", login])
        .stdin(
            std::fs::File::open({
                let input = client.dir.path().join("typed");
                std::fs::write(&input, "echo typed-$((6*7))\nexit\n").unwrap();
                input
            })
            .unwrap(),
        )
        .output()
        .unwrap();
    assert!(text(&out.stdout).contains("typed-42"), "{}{}", text(&out.stdout), text(&out.stderr));

    // scp both ways.
    let blob = client.dir.path().join("blob");
    sh(&format!("head -c 3000000 /dev/urandom > {}", blob.display()));
    let remote = format!("/tmp/postern-peer-{}", std::process::id());
    let up = client.cmd("scp", "-P", &a).arg(&blob).arg(format!("{login}:{remote}")).output().unwrap();
    assert!(up.status.success(), "scp up: {}", text(&up.stderr));
    let back = client.dir.path().join("back");
    let down = client.cmd("scp", "-P", &a).arg(format!("{login}:{remote}")).arg(&back).output().unwrap();
    assert!(down.status.success(), "scp down: {}", text(&down.stderr));
    assert_eq!(std::fs::read(&blob).unwrap(), std::fs::read(&back).unwrap());
    let _ = std::fs::remove_file(&remote);

    // ssh -L to a service the instance reaches (on the host side of its namespace).
    let service = std::net::TcpListener::bind((ns.host_ip.as_str(), 0)).unwrap();
    let service_port = service.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in service.incoming().flatten() {
            use std::io::Write;
            let mut c = c;
            let _ = c.write_all(b"from-the-service\n");
        }
    });
    let local = free_tcp_port();
    let mut forward = client
        .cmd("ssh", "-p", &a)
        .args(["-N", "-L", &format!("{local}:{}:{service_port}", ns.host_ip), login])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("ssh -L listening", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", local)).is_ok()
    });
    let mut got = String::new();
    {
        use std::io::Read;
        let mut c = std::net::TcpStream::connect(("127.0.0.1", local)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = c.read_to_string(&mut got);
    }
    let _ = forward.kill();
    let _ = forward.wait();
    assert_eq!(got, "from-the-service\n");

    // Recorded and audited at A, where alice is, with the gateway it went through; B, which
    // only carried the bytes, has no session of hers.
    let mut starts = Vec::new();
    wait_until("A's session and forward events", Duration::from_secs(10), || {
        starts = a
            .audit_events()
            .into_iter()
            .filter(|e| e["event"] == "session.start" || e["event"] == "forward.open")
            .collect();
        starts.len() >= 5
    });
    for e in &starts {
        assert_eq!(e["via_gateway"], "gw-b", "{e}");
    }
    let shell = starts.iter().find(|e| e["kind"] == "shell").unwrap();
    let recording = std::fs::read_to_string(shell["recording"].as_str().unwrap()).unwrap();
    assert!(recording.contains("typed-42"), "{recording}");
    assert!(
        !b.audit_events().iter().any(|e| e["event"] == "session.start" || e["event"] == "forward.open"),
        "B audits sessions of users connected to it only"
    );
}

#[test]
fn a_session_through_a_gateway_that_dies_ends_cleanly_at_the_users_gateway() {
    let cluster = Cluster::new("peerdeath");
    let a = Gateway::start_on(&listen(), &cluster.config("gw-a"));
    let mut b = Gateway::start_on(&listen(), &cluster.config("gw-b"));
    let _agent = Agent::start(&b, "web-01", vec![], &b.listen);
    let client = Client::new(
        &a,
        "name = \"ops\"\n[[statement]]\neffect = \"allow\"\nusers = [\"alice\"]\nactions = [\"exec\"]\n\
         instances = [\"web-*\"]\nallow_root = true\n",
    );
    let mut ssh = client
        .cmd("ssh", "-p", &a)
        .args(["alice%web-01@127.0.0.1", "echo started; exec sleep 300"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::BufRead;
        let mut first = String::new();
        std::io::BufReader::new(ssh.stdout.as_mut().unwrap()).read_line(&mut first).unwrap();
        assert_eq!(first, "started\n");
    }
    b.kill();
    let killed = std::time::Instant::now();
    let mut status = None;
    wait_until("the ssh client to end", Duration::from_secs(30), || {
        status = ssh.try_wait().unwrap();
        status.is_some()
    });
    let took = killed.elapsed();
    let mut stderr = String::new();
    {
        use std::io::Read;
        ssh.stderr.as_mut().unwrap().read_to_string(&mut stderr).unwrap();
    }
    eprintln!("the session through the killed gateway ended {took:?} after the kill");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(status.unwrap().code(), Some(255));
    assert!(stderr.contains("connection to the instance was lost"), "{stderr}");
    // A, which carried the session, ends it in its log with the reason.
    wait_until("session.end at A", Duration::from_secs(10), || {
        a.audit_events()
            .iter()
            .any(|e| e["event"] == "session.end" && e["user"] == "alice" && e["end_reason"] == "instance-lost")
    });
}

#[test]
fn a_cluster_gateway_waits_for_an_unreachable_store_serving_nothing_and_recovers() {
    let cluster = Cluster::new("outage");
    let mut a = Gateway::start_on(&listen(), &cluster.config("gw-a"));
    a.stop();
    cluster.pg.pause();
    // Restarted while the store is down: the process stays up, says why, and opens nothing.
    let log = a.dir.path().join("gateway-outage.log");
    let mut cmd = Command::new(bin("postern"));
    cmd.arg("--config").arg(a.config_path()).arg("gateway");
    a.proc = Some(spawn_logged(cmd, &log));
    wait_until("two failed attempts to reach the store", Duration::from_secs(20), || {
        std::fs::read_to_string(&log).unwrap_or_default().matches("the store is unreachable").count() >= 2
    });
    assert!(a.proc.as_mut().unwrap().child.try_wait().unwrap().is_none(), "the gateway exited");
    assert!(std::net::TcpStream::connect(("127.0.0.1", a.ssh_port)).is_err(), "the SSH door is open");
    assert!(!a.data_dir().join("admin.sock").exists());
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(!logged.contains("postgres@"), "the store URL's user (and any password) stays out of the log: {logged}");
    // The store comes back: the gateway starts by itself and serves.
    cluster.pg.resume();
    let back = std::time::Instant::now();
    wait_until("the gateway serving", Duration::from_secs(30), || {
        std::os::unix::net::UnixStream::connect(a.data_dir().join("admin.sock")).is_ok()
    });
    eprintln!("serving {:?} after the store came back", back.elapsed());
    assert!(std::net::TcpStream::connect(("127.0.0.1", a.ssh_port)).is_ok());
    let out = a.postern(&["instances", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    a.stop();
}

#[test]
fn an_rdp_token_from_one_gateway_is_redeemed_once_at_another_and_refused_at_a_third() {
    use std::io::{Read, Write};
    let cluster = Cluster::new("rdp");
    let rdp_door = |port: u16| format!("[rdp]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\n");
    let ports = [free_tcp_port(), free_tcp_port(), free_tcp_port()];
    let a = Gateway::start_on(&listen(), &format!("{}{}", cluster.config("gw-a"), rdp_door(ports[0])));
    let b = Gateway::start_on(&listen(), &format!("{}{}", cluster.config("gw-b"), rdp_door(ports[1])));
    let c = Gateway::start_on(&listen(), &format!("{}{}", cluster.config("gw-c"), rdp_door(ports[2])));
    // A stand-in RDP host behind an agent connected to A: it echoes what it receives.
    let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host_port = host.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in host.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut buf = [0u8; 4096];
                while let Ok(k) = conn.read(&mut buf) {
                    if k == 0 || conn.write_all(&buf[..k]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let limits = cluster.dir.path().join("win.toml");
    std::fs::write(&limits, format!("[limits]\nrdp_address = \"127.0.0.1:{host_port}\"\n")).unwrap();
    let _agent =
        Agent::start_with(&a, "win-01", "os=windows", vec![], &a.listen, &["--config", limits.to_str().unwrap()]);
    let client = Client::new(
        &a,
        "name = \"rdp\"\n[[statement]]\neffect = \"allow\"\nusers = [\"alice\"]\nactions = [\"rdp\"]\ninstances = [\"win-*\"]\n",
    );
    // B and C have the policy applied at A (their copies follow the store within seconds).
    for gw in [&b, &c] {
        wait_until("the policy at the other gateways", Duration::from_secs(10), || {
            let out = gw.postern(&["explain", "--user", "alice", "--target", "win-01", "--action", "rdp", "--json"]);
            serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .is_ok_and(|v| v.pointer("/decision/allowed") == Some(&serde_json::Value::Bool(true)))
        });
    }
    // The token, from A (`postern rdp` through A's SSH door as alice).
    let out = Command::new("timeout")
        .arg("60")
        .arg(bin("postern"))
        .args(["rdp", "--gateway", &format!("127.0.0.1:{}", a.ssh_port), "--user", "alice", "-i"])
        .arg(&client.key)
        .arg("--known-hosts")
        .arg(client.dir.path().join("known_hosts"))
        .args(["win-01", "--json"])
        .env("HOME", client.dir.path())
        .env_remove("SSH_AUTH_SOCK")
        .env_remove("POSTERN_CONFIG")
        .env_remove("POSTERN_DATA_DIR")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "postern rdp: {}", text(&out.stderr));
    let token = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["token"].as_str().unwrap().to_owned();
    let request = rdp_connection_request("alice");
    let redeem = |port: u16| {
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        conn.write_all(&[rdp_pcb(&token), request.clone()].concat()).unwrap();
        let mut back = vec![0u8; request.len()];
        let got = conn.read_exact(&mut back).map(|()| back);
        (conn, got)
    };
    // Redeemed at B (the key is the cluster's): the host gets the request, through A where
    // the agent is.
    let (_open, got) = redeem(ports[1]);
    assert_eq!(got.unwrap(), request, "the request reached the host and its echo came back");
    wait_until("rdp.open at B", Duration::from_secs(10), || {
        b.audit_events().iter().any(|e| e["event"] == "rdp.open" && e["via_gateway"] == "gw-a")
    });
    // Replayed at C, and again at B: refused as used, nothing reaches the host.
    for (gw, port) in [(&c, ports[2]), (&b, ports[1])] {
        let (_conn, got) = redeem(port);
        assert!(got.is_err(), "a spent token was let in again");
        wait_until("token-used refusal", Duration::from_secs(10), || {
            gw.audit_events().iter().any(|e| e["event"] == "session.denied" && e["code"] == "token-used")
        });
    }
}

#[test]
fn ssh_passthrough_reaches_an_instance_sshd_through_another_gateway() {
    assert!(nix::unistd::Uid::effective().is_root(), "logs into a real sshd as root; CI runs as root");
    let cluster = Cluster::new("passthrough");
    let a = Gateway::start_on(&listen(), &cluster.config("gw-a"));
    let b = Gateway::start_on(&listen(), &cluster.config("gw-b"));
    let client = Client::new(
        &a,
        "name = \"jump\"\n[[statement]]\neffect = \"allow\"\nusers = [\"alice\"]\nactions = [\"ssh-passthrough\"]\n\
         instances = [\"web-*\"]\n",
    );
    // The instance's own sshd (where its agent, connected to B, says it is).
    let target_key = client.dir.path().join("root_key");
    ssh_keygen(&target_key, "root");
    let authorized = client.dir.path().join("authorized_keys");
    std::fs::copy(target_key.with_extension("pub"), &authorized).unwrap();
    let sshd = start_sshd(client.dir.path(), &authorized);
    let agent_cfg = client.dir.path().join("web-01.toml");
    std::fs::write(&agent_cfg, format!("[limits]\nssh_address = \"127.0.0.1:{}\"\n", sshd.port)).unwrap();
    let _agent =
        Agent::start_with(&b, "web-01", "env=test", vec![], &b.listen, &["--config", agent_cfg.to_str().unwrap()]);
    let kh = client.dir.path().join("known_hosts");
    let mut known = std::fs::read_to_string(&kh).unwrap();
    known.push_str(&format!("web-01 {}", sshd.host_key_pub));
    std::fs::write(&kh, known).unwrap();
    let config = client.dir.path().join("ssh_config");
    std::fs::write(
        &config,
        format!(
            "Host jump\n    HostName 127.0.0.1\n    Port {}\n    User alice\n    IdentityFile {}\n    IdentitiesOnly yes\n\
             Host web-01\n    ProxyJump jump\n    User root\n    IdentityFile {}\n    IdentitiesOnly yes\n\
             Host *\n    BatchMode yes\n    StrictHostKeyChecking yes\n    UserKnownHostsFile {}\n",
            a.ssh_port,
            client.key.display(),
            target_key.display(),
            kh.display()
        ),
    )
    .unwrap();
    // ssh -J through A: end to end to the instance's sshd, which B's agent reaches.
    let mut out = None;
    wait_until("the policy applied at A", Duration::from_secs(10), || {
        let o = Command::new("timeout")
            .args(["60", "ssh", "-F"])
            .arg(&config)
            .args(["web-01", "echo passthrough-ok $(id -un)"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let done = o.status.success();
        out = Some(o);
        done
    });
    let out = out.unwrap();
    assert_eq!(text(&out.stdout), "passthrough-ok root\n", "{}", text(&out.stderr));
    wait_until("passthrough.open at A, through B", Duration::from_secs(10), || {
        a.audit_events().iter().any(|e| e["event"] == "passthrough.open" && e["via_gateway"] == "gw-b")
    });
    drop(sshd);
}
