//! Agents on any gateway (issue 17): an agent joined with several gateway addresses fails
//! over when its gateway is killed, the store keeps where each agent is connected under a
//! lease, and a name with several addresses is tried in full. Real gateways on one real
//! PostgreSQL database, agents in a network namespace with no inbound route, OpenSSH.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use postern_e2e::*;
use serde_json::Value;

/// A gateway with its own directory and ports; `tunnel` goes into its `[tunnel]` section.
fn gateway_with(listen: &str, tunnel: &str, extra_config: &str) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Gateway { dir, listen: listen.to_owned(), ssh_port: free_tcp_port(), proc: None };
    std::fs::create_dir_all(gw.data_dir()).unwrap();
    std::fs::write(
        gw.dir.path().join("gateway.toml"),
        format!(
            "data_dir = {:?}\n[tunnel]\nlisten = {listen:?}\n{tunnel}\n[ssh]\nlisten = \"127.0.0.1:{}\"\npublic_host = \"127.0.0.1\"\n{extra_config}\n",
            gw.data_dir(),
            gw.ssh_port
        ),
    )
    .unwrap();
    gw.restart();
    gw
}

/// `name`'s row in `postern instances --json` at `gw`.
fn row(gw: &Gateway, name: &str) -> Value {
    gw.instances().into_iter().find(|i| i["name"] == name).unwrap_or(Value::Null)
}

/// Whether `gw` lists `name` online and connected to gateway `at`.
fn online_at(gw: &Gateway, name: &str, at: &str) -> bool {
    let r = row(gw, name);
    r["online"] == true && r["gateway"] == at
}

fn ssh(gw: &Gateway, key: &Path, known_hosts: &Path, target: &str, command: &str) -> Output {
    Command::new("timeout")
        .args(["60", "ssh", "-p", &gw.ssh_port.to_string(), "-i"])
        .arg(key)
        .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o"])
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg(format!("alice%{target}@127.0.0.1"))
        .arg(command)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Join `name` through `gateways` (one `--gateway` each) inside `prefix` (a namespace), then
/// start `postern-agent run`.
fn join_agent(gw: &Gateway, name: &str, prefix: Vec<String>, gateways: &[&str], log: &str) -> (Agent, Output) {
    let (token, pin) = gw.token(&["--name", name]);
    let agent = Agent { dir: tempfile::tempdir().unwrap(), name: name.to_owned(), proc: None, prefix };
    let mut cmd = match agent.prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bin("postern-agent"));
            c
        }
        None => Command::new(bin("postern-agent")),
    };
    cmd.arg("--log").arg(log).arg("--state-dir").arg(agent.state_dir()).arg("join");
    for g in gateways {
        cmd.args(["--gateway", g]);
    }
    let out = cmd.args(["--token", &token, "--ca-pin", &pin]).stdin(Stdio::null()).output().unwrap();
    assert!(out.status.success(), "join failed: {}{}", text(&out.stdout), text(&out.stderr));
    let mut agent = agent;
    agent.run();
    (agent, out)
}

fn agent_log(agent: &Agent) -> String {
    std::fs::read_to_string(agent.dir.path().join("agent.log")).unwrap_or_default()
}

/// Two gateways of a cluster on one PostgreSQL database, sharing the agent CA; an agent in a
/// namespace with no inbound route joined with both addresses. Killing its gateway moves it
/// to the other within 10 s, where `ssh` reaches it; the store tells every gateway where it
/// is; a lease of the dead gateway stops counting once it expires; and the agent stays where
/// it is when the dead gateway comes back.
#[test]
fn an_agent_moves_to_another_gateway_within_10s_when_its_gateway_is_killed() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test creates a network namespace and must run as root (CI does)"
    );
    let cluster = Cluster::new("agents");
    let ns = NetNs::create();
    let mut a = Gateway::start_on(&format!("{}:{}", ns.host_ip, free_udp_port()), &cluster.config("gw-a"));
    let dir = tempfile::tempdir().unwrap();
    let key = super::alice_may_exec(&a, dir.path(), "*");
    let b = gateway_with(&format!("{}:{}", ns.host_ip, free_udp_port()), "", &cluster.config("gw-b"));
    let (known_a, known_b) = (dir.path().join("known_hosts_a"), dir.path().join("known_hosts_b"));
    a.write_known_hosts(&known_a);
    b.write_known_hosts(&known_b);

    // The token printed at either gateway names both when [tunnel] advertise lists them (see
    // token_create_prints_every_advertised_address); here the test passes both itself.
    let prefix = vec!["ip".to_owned(), "netns".to_owned(), "exec".to_owned(), ns.name.clone()];
    let (web, _) = join_agent(&a, "web-01", prefix, &[&a.listen, &b.listen], "info");
    wait_until("web-01 online at A", Duration::from_secs(20), || online_at(&a, "web-01", "gw-a"));
    let state = std::fs::read_to_string(web.state_dir().join("agent.toml")).unwrap();
    assert!(state.contains(&a.listen) && state.contains(&b.listen), "both addresses are kept: {state}");
    // B sees it online too, at A (its lease in the store), without a connection of its own.
    wait_until("B to see web-01 at gw-a", Duration::from_secs(10), || online_at(&b, "web-01", "gw-a"));
    let table = text(&b.postern(&["instances"]).stdout);
    assert!(table.contains("GATEWAY") && table.contains("gw-a"), "{table}");
    // A session through B reaches it through A (peering), the store naming A.
    let out = ssh(&b, &key, &known_b, "web-01", "echo through-b");
    assert_eq!(text(&out.stdout), "through-b\n", "{}", text(&out.stderr));
    assert_eq!(text(&ssh(&a, &key, &known_a, "web-01", "echo through-a").stdout), "through-a\n");

    // An agent that knows only A, to watch A's lease expire once A is gone.
    let solo = Agent::start(&a, "solo-01", vec![], &a.listen);
    wait_until("B to see solo-01 at gw-a", Duration::from_secs(10), || online_at(&b, "solo-01", "gw-a"));

    let killed = Instant::now();
    a.kill();
    let moved = wait_until("web-01 online at B", Duration::from_secs(30), || online_at(&b, "web-01", "gw-b"));
    eprintln!("web-01 online at B {moved:?} after A was killed");
    assert!(moved < Duration::from_secs(10), "web-01 took {moved:?} to move to B");
    let log = agent_log(&web);
    let on_b = |l: &&str| l.contains("connected to gateway") && !l.contains("disconnected") && l.contains(&b.listen);
    assert!(log.lines().any(|l| on_b(&l)), "the agent logs the gateway it is on:\n{log}");
    let out = ssh(&b, &key, &known_b, "web-01", "echo after-failover");
    assert_eq!(text(&out.stdout), "after-failover\n", "{}", text(&out.stderr));

    // A's lease of solo-01 counts until it expires (15 s after A's last renewal), then not.
    let expired = wait_until("solo-01's lease at A to expire", Duration::from_secs(40), || {
        !row(&b, "solo-01")["online"].as_bool().unwrap_or(true)
    });
    let since_kill = killed.elapsed();
    eprintln!("solo-01 offline at B {since_kill:?} after A was killed ({expired:?} after web-01 moved)");
    // 15 s after A's last write at most, plus the time a `postern instances` poll takes.
    assert!(since_kill <= Duration::from_secs(18), "the lease outlived its 15 s: {since_kill:?}");
    assert!(row(&b, "solo-01")["gateway"].is_null());
    let out = ssh(&b, &key, &known_b, "solo-01", "true");
    assert!(text(&out.stderr).contains("instance solo-01 is offline"), "{}", text(&out.stderr));

    // A comes back: it sees web-01 at B (and gets solo-01 back), and web-01 stays on B.
    let connects = |log: &str| log.matches("connected to gateway").count();
    let before = connects(&agent_log(&web));
    a.restart();
    wait_until("A to see web-01 at gw-b", Duration::from_secs(15), || online_at(&a, "web-01", "gw-b"));
    wait_until("solo-01 back at A", Duration::from_secs(15), || online_at(&a, "solo-01", "gw-a"));
    // Watch for longer than the 7 s in which the agent would notice a lost connection: no move back, no reconnect.
    std::thread::sleep(Duration::from_secs(8));
    assert!(online_at(&b, "web-01", "gw-b") && online_at(&a, "web-01", "gw-b"));
    assert_eq!(connects(&agent_log(&web)), before, "web-01 reconnected needlessly:\n{}", agent_log(&web));
    drop(solo);
}

/// `[tunnel] advertise` may list a cluster's addresses: `token create` prints one `--gateway`
/// for each (and the JSON has them all), and that command joins.
#[test]
fn token_create_prints_every_advertised_address() {
    let port = free_udp_port();
    let listen = format!("127.0.0.1:{port}");
    let gw = gateway_with(&listen, &format!("advertise = [\"127.0.0.2:{port}\", {listen:?}]"), "");
    let out = gw.postern(&["token", "create", "--name", "multi-01"]);
    let printed = text(&out.stdout);
    let command = printed.lines().find(|l| l.contains("postern-agent join")).unwrap().trim().to_owned();
    assert!(
        command.starts_with(&format!("postern-agent join --gateway 127.0.0.2:{port} --gateway {listen} --token pt_")),
        "{printed}"
    );
    let out = gw.postern(&["token", "create", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["gateways"], serde_json::json!([format!("127.0.0.2:{port}"), listen]));
    assert_eq!(v["gateway"], format!("127.0.0.2:{port}"));
    // The printed command works: 127.0.0.2 has no gateway, the second address does.
    let state = tempfile::tempdir().unwrap();
    let args: Vec<&str> = command.split_whitespace().skip(1).filter(|a| *a != "--run").collect();
    let out = Command::new(bin("postern-agent"))
        .arg("--state-dir")
        .arg(state.path())
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("joined as multi-01"), "{}", text(&out.stdout));
}

/// Removes a namespace's `/etc/netns/NAME` (files `ip netns exec` mounts over `/etc`).
struct NetnsEtc(std::path::PathBuf);

impl Drop for NetnsEtc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A gateway name with several addresses is tried in full: inside the namespace
/// `gw.cluster.test` resolves to `::1` (first, by address selection; nothing listens there)
/// and to the host end of the link, where the gateway is. Join and run both get past the
/// dead address to the live one.
#[test]
fn every_address_of_a_gateway_name_is_tried() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test creates a network namespace and must run as root (CI does)"
    );
    let ns = NetNs::create();
    let port = free_udp_port();
    let gw = Gateway::start_on(&format!("{}:{port}", ns.host_ip), "");
    // `ip netns exec` bind-mounts /etc/netns/NAME/hosts over /etc/hosts for that command.
    let etc = NetnsEtc(Path::new("/etc/netns").join(&ns.name));
    std::fs::create_dir_all(&etc.0).unwrap();
    std::fs::write(etc.0.join("hosts"), format!("::1 gw.cluster.test\n{} gw.cluster.test\n", ns.host_ip)).unwrap();
    let prefix = vec!["ip".to_owned(), "netns".to_owned(), "exec".to_owned(), ns.name.clone()];
    let resolved =
        Command::new("ip").args(["netns", "exec", &ns.name, "getent", "ahostsv6", "gw.cluster.test"]).output().unwrap();
    assert!(text(&resolved.stdout).contains("::1"), "{}", text(&resolved.stdout));

    let (agent, joined) = join_agent(&gw, "dns-01", prefix, &[&format!("gw.cluster.test:{port}")], "debug");
    let tried = text(&joined.stderr);
    assert!(tried.contains(&format!("[::1]:{port}")), "join tried the dead address first:\n{tried}");
    wait_until("dns-01 online", Duration::from_secs(30), || gw.is_online("dns-01"));
    let log = agent_log(&agent);
    let on = |l: &&str| l.contains("connected to gateway") && !l.contains("disconnected");
    let connected = log.lines().find(on).unwrap_or_default().to_owned();
    assert!(connected.contains(&format!("{}:{port}", ns.host_ip)), "{log}");
    let out = gw.postern(&["exec", "dns-01", "--", "echo", "found"]);
    assert_eq!(text(&out.stdout), "found\n", "{}", text(&out.stderr));
}
