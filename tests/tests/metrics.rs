//! Metrics and health endpoints end to end (`[metrics] listen`, docs/operations.md): a real
//! Prometheus scrapes a gateway that served real `ssh` sessions (one run, one refused by
//! policy, one failed authentication) and its query API shows the counts; a live session
//! shows in the active gauge and, ended by `postern sessions terminate`, in the terminated
//! counter; `/readyz` turns 503 while the audit directory is read-only and back to 200
//! after; a gateway without `[metrics]` opens no port for it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use postern_e2e::*;
use serde_json::Value;

/// A gateway with static SSH users `alice` (every instance) and `bob` (only `db-*`, so
/// refused on `web-01`), an agent `web-01`, and `extra` configuration.
struct Setup {
    gw: Gateway,
    _agent: Agent,
    dir: tempfile::TempDir,
    alice: PathBuf,
    bob: PathBuf,
    known_hosts: PathBuf,
}

impl Setup {
    fn new(extra: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let mut keys = Vec::new();
        for user in ["alice", "bob"] {
            let key = dir.path().join(user);
            ssh_keygen(&key, user);
            keys.push((key.clone(), std::fs::read_to_string(key.with_extension("pub")).unwrap()));
        }
        let config = format!(
            "idle_timeout = \"0\"\n\
             [[ssh.users]]\nname = \"alice\"\nkeys = [{:?}]\ninstances = [\"*\"]\nallow_root = true\n\
             [[ssh.users]]\nname = \"bob\"\nkeys = [{:?}]\ninstances = [\"db-*\"]\nallow_root = true\n{extra}",
            keys[0].1.trim(),
            keys[1].1.trim()
        );
        let gw = Gateway::start(&config);
        let agent = Agent::start(&gw, "web-01", vec![], &gw.listen);
        let known_hosts = dir.path().join("known_hosts");
        gw.write_known_hosts(&known_hosts);
        let (alice, bob) = (keys[0].0.clone(), keys[1].0.clone());
        Setup { gw, _agent: agent, dir, alice, bob, known_hosts }
    }

    fn ssh(&self, key: &Path, login: &str, command: &str) -> Output {
        Command::new("timeout")
            .args(["60", "ssh", "-p", &self.gw.ssh_port.to_string(), "-i"])
            .arg(key)
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o"])
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .arg(login)
            .arg(command)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

/// `GET http://ADDR/PATH` with curl: (status, body).
fn get(addr: &str, path: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"])
        .arg(format!("http://{addr}{path}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "curl {path}: {}", text(&out.stderr));
    let all = text(&out.stdout);
    let (body, code) = all.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_owned())
}

/// The TCP ports process `pid` listens on.
fn listening_ports(pid: u32) -> BTreeSet<u16> {
    let out = Command::new("ss").args(["-Hltnp"]).output().unwrap();
    text(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .filter_map(|l| l.split_whitespace().nth(3)?.rsplit_once(':')?.1.parse().ok())
        .collect()
}

/// A Prometheus server scraping `target` every second, killed on drop.
struct Prometheus {
    _proc: Proc,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: postern\n    scrape_interval: 1s\n    scrape_timeout: 1s\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_tcp_port());
        let mut cmd = Command::new("/usr/bin/prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"));
        let proc = spawn_logged(cmd, &dir.path().join("prometheus.log"));
        let p = Prometheus { _proc: proc, addr, _dir: dir };
        wait_until("prometheus ready", Duration::from_secs(60), || {
            Command::new("curl")
                .args(["-sf", "--max-time", "2"])
                .arg(format!("http://{}/-/ready", p.addr))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        p
    }

    /// The value of the instant query `q` when it has exactly one series.
    fn value(&self, q: &str) -> Option<f64> {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", "-G", "--data-urlencode"])
            .arg(format!("query={q}"))
            .arg(format!("http://{}/api/v1/query", self.addr))
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        let result = v["data"]["result"].as_array()?;
        if result.len() != 1 {
            return None;
        }
        result[0]["value"][1].as_str()?.parse().ok()
    }
}

/// What a query must show: (what, PromQL, test of its value).
type Wanted = (&'static str, &'static str, fn(f64) -> bool);

/// Every label value in the text exposition `text`.
fn label_values(text: &str) -> BTreeSet<String> {
    let mut values = BTreeSet::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((_, rest)) = line.split_once('{') else { continue };
        let Some((labels, _)) = rest.rsplit_once('}') else { continue };
        for pair in labels.split(',') {
            if let Some((_, v)) = pair.split_once('=') {
                values.insert(v.trim_matches('"').to_owned());
            }
        }
    }
    values
}

#[test]
fn prometheus_scrapes_sessions_denials_auth_failures_and_agents() {
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let s = Setup::new(&format!("[metrics]\nlisten = {metrics:?}\n"));

    // A session that runs, one refused by policy, one that fails to authenticate.
    let ok = s.ssh(&s.alice, "alice%web-01@127.0.0.1", "echo metrics-check");
    assert!(ok.status.success() && text(&ok.stdout).contains("metrics-check"), "{}", text(&ok.stderr));
    let denied = s.ssh(&s.bob, "bob%web-01@127.0.0.1", "true");
    assert!(!denied.status.success(), "bob reached web-01: {}", text(&denied.stdout));
    let stranger = s.dir.path().join("stranger");
    ssh_keygen(&stranger, "stranger");
    let refused = s.ssh(&stranger, "alice%web-01@127.0.0.1", "true");
    assert!(!refused.status.success(), "an unregistered key got in");
    wait_until("auth.failed, session.denied audited", Duration::from_secs(20), || {
        let events = s.gw.audit_events();
        ["auth.failed", "session.denied", "session.end"].iter().all(|e| events.iter().any(|v| v["event"] == *e))
    });

    let prom = Prometheus::start(&metrics);
    let wanted: &[Wanted] = &[
        ("scrape succeeded", "up{job=\"postern\"}", |v| v == 1.0),
        ("agents online over QUIC", "postern_agents_online{transport=\"quic\"}", |v| v == 1.0),
        ("agents online over TCP", "postern_agents_online{transport=\"tcp\"}", |v| v == 0.0),
        ("ssh exec sessions started", "postern_sessions_started_total{door=\"ssh\",kind=\"exec\"}", |v| v >= 1.0),
        ("sessions denied at the ssh door", "postern_sessions_denied_total{door=\"ssh\"}", |v| v >= 1.0),
        ("ssh auth failures", "postern_auth_failures_total{door=\"ssh\"}", |v| v >= 1.0),
        ("bytes relayed to users", "sum(postern_relayed_bytes_total{direction=\"out\"})", |v| v > 0.0),
        ("audit writes", "postern_audit_write_duration_seconds_count", |v| v > 0.0),
        ("session history writes", "postern_store_operation_duration_seconds_count{op=\"session_history\"}", |v| {
            v > 0.0
        }),
        ("no live session now", "sum(postern_sessions_active)", |v| v == 0.0),
        ("build info", "count(postern_build_info{version!=\"\"} == 1)", |v| v == 1.0),
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let last = loop {
        let last: Vec<String> = wanted
            .iter()
            .filter_map(|(what, q, good)| {
                let v = prom.value(q);
                (!v.is_some_and(good)).then(|| format!("{what}: {q} = {v:?}"))
            })
            .collect();
        if last.is_empty() || std::time::Instant::now() > deadline {
            break last;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(last.is_empty(), "Prometheus does not show: {last:#?}\nexposition:\n{}", get(&metrics, "/metrics").1);

    // No user, instance or agent name is a label value.
    let (status, exposition) = get(&metrics, "/metrics");
    assert_eq!(status, 200);
    let values = label_values(&exposition);
    assert!(values.contains("quic") && values.contains("exec"), "label parsing found {values:?}");
    let agent_id = s.gw.instances()[0]["id"].as_str().unwrap_or("web-01").to_owned();
    for name in ["alice", "bob", "web-01", agent_id.as_str()] {
        assert!(!values.contains(name), "{name:?} is a label value:\n{exposition}");
    }
}

#[test]
fn readiness_fails_while_the_audit_directory_is_read_only_and_recovers() {
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let s = Setup::new(&format!("[metrics]\nlisten = {metrics:?}\n"));
    assert_eq!(get(&metrics, "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(get(&metrics, "/readyz"), (200, "ready\n".to_owned()));
    assert_eq!(get(&metrics, "/nothing-here").0, 404);
    // No bodies, no other methods.
    let post = Command::new("curl")
        .args(["-s", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}", "--data", "x=1"])
        .arg(format!("http://{metrics}/readyz"))
        .output()
        .unwrap();
    assert_eq!(text(&post.stdout), "413");

    // The audit directory read-only (a read-only bind mount over it).
    let audit = s.gw.data_dir().join("audit");
    sh(&format!("mount --bind {0} {0} && mount -o remount,ro,bind {0}", audit.display()));
    let guard = Unmount(audit.clone());
    let (status, body) = get(&metrics, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("audit: cannot create a file in") && body.contains("Read-only"), "{body}");
    assert!(!body.contains("store:") && !body.contains("keys:"), "{body}");
    assert_eq!(get(&metrics, "/healthz").0, 200, "the process is still up");

    drop(guard);
    assert_eq!(get(&metrics, "/readyz"), (200, "ready\n".to_owned()));
    let ok = s.ssh(&s.alice, "alice%web-01@127.0.0.1", "echo still-fine");
    assert!(text(&ok.stdout).contains("still-fine"), "{}", text(&ok.stderr));
}

/// Unmounts a mount made by a test when dropped.
struct Unmount(PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn without_a_metrics_section_the_gateway_opens_no_extra_port() {
    let metrics_port = free_tcp_port();
    let with = Gateway::start(&format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"));
    let without = Gateway::start("");
    let ports_with = listening_ports(with.proc.as_ref().unwrap().child.id());
    let ports_without = listening_ports(without.proc.as_ref().unwrap().child.id());
    let tunnel_port = |gw: &Gateway| gw.listen.rsplit_once(':').unwrap().1.parse::<u16>().unwrap();
    // The SSH door and the tunnel's TCP transport; with [metrics], its port too.
    assert_eq!(ports_without, BTreeSet::from([without.ssh_port, tunnel_port(&without)]), "without [metrics]");
    assert_eq!(ports_with, BTreeSet::from([with.ssh_port, tunnel_port(&with), metrics_port]), "with [metrics]");
}

/// The value of the series `series` (name and labels exactly as exposed) in `/metrics`.
fn series(metrics: &str, series: &str) -> Option<f64> {
    let (_, text) = get(metrics, "/metrics");
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn a_live_session_is_active_and_counted_as_terminated_when_ended() {
    let metrics = format!("127.0.0.1:{}", free_tcp_port());
    let s = Setup::new(&format!("[metrics]\nlisten = {metrics:?}\n"));
    let active = "postern_sessions_active{door=\"ssh\",kind=\"exec\"}";
    let terminated = "postern_sessions_terminated_total{door=\"ssh\",kind=\"exec\"}";
    assert_eq!((series(&metrics, active), series(&metrics, terminated)), (Some(0.0), Some(0.0)));

    let mut child = Command::new("timeout")
        .args(["60", "ssh", "-p", &s.gw.ssh_port.to_string(), "-i"])
        .arg(&s.alice)
        .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o"])
        .arg(format!("UserKnownHostsFile={}", s.known_hosts.display()))
        .args(["alice%web-01@127.0.0.1", "sleep 50"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the session active in /metrics", Duration::from_secs(20), || series(&metrics, active) == Some(1.0));
    let out = s.gw.postern(&["sessions", "--json"]);
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let id = rows[0]["id"].as_str().unwrap().to_owned();
    let out = s.gw.postern(&["sessions", "terminate", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_until("the session counted as terminated and no longer active", Duration::from_secs(20), || {
        series(&metrics, terminated) == Some(1.0) && series(&metrics, active) == Some(0.0)
    });
    let _ = child.kill();
    let _ = child.wait();
}
