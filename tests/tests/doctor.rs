//! `postern doctor` and `postern-agent doctor` end to end (docs/operations.md, "Doctor"):
//! a healthy gateway and agent pass both with every check ok (or a documented skip); then
//! each thing is broken for real — a listen port held by another process, a world-writable
//! data directory, a key file readable by others and a missing CA key, a config file with a
//! syntax error, a PostgreSQL store on a closed port, an agent whose UDP does not get
//! through, an agent whose gateway is down, an agent's key readable by others — and the
//! right check fails (or warns) with its fix, and the exit status says so.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use postern_e2e::*;
use serde_json::Value;

/// `postern --config CONFIG doctor --json`: (exit status, report).
fn gateway_doctor(config: &Path) -> (i32, Value) {
    let out = Command::new("timeout")
        .arg("60")
        .arg(bin("postern"))
        .arg("--config")
        .arg(config)
        .args(["doctor", "--json"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    report(out)
}

/// `postern-agent --state-dir STATE doctor --json ARGS`: (exit status, report).
fn agent_doctor(state: &Path, args: &[&str]) -> (i32, Value) {
    let out = Command::new("timeout")
        .arg("60")
        .arg(bin("postern-agent"))
        .arg("--state-dir")
        .arg(state)
        .args(["doctor", "--json"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    report(out)
}

fn report(out: Output) -> (i32, Value) {
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}{}", text(&out.stdout), text(&out.stderr)));
    (out.status.code().unwrap(), v)
}

/// The check named `name` of a report.
fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name}: {report:#}"))
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Every check ok, or skipped for one of the reasons `skips` allows (name → reason part).
fn assert_healthy(report: &Value, skips: &[(&str, &str)]) {
    assert_eq!(report["status"], "ok", "{report:#}");
    for c in report["checks"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        match c["status"].as_str().unwrap() {
            "ok" => assert!(c["fix"].is_null(), "{c}"),
            "skip" => assert!(
                skips.iter().any(|(n, why)| *n == name && c["detail"].as_str().unwrap().contains(why)),
                "unexpected skip: {c}"
            ),
            other => panic!("{name} is {other}: {report:#}"),
        }
    }
}

#[test]
fn a_healthy_gateway_and_agent_pass_both_doctors() {
    let metrics = free_tcp_port();
    let gw = Gateway::start(&format!("[metrics]\nlisten = \"127.0.0.1:{metrics}\""));
    let agent = Agent::start(&gw, "web-01", vec![], &gw.listen);

    let (code, r) = gateway_doctor(&gw.config_path());
    assert_eq!(code, 0, "{r:#}");
    assert_healthy(
        &r,
        &[("port_rdp", "[rdp] listen: off"), ("port_web", "[web] listen: off"), ("s3", "[audit.s3] not configured")],
    );
    let names: Vec<&str> = r["checks"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "config",
            "data_dir",
            "key_files",
            "running",
            "port_ssh",
            "port_rdp",
            "port_web",
            "port_tunnel_udp",
            "port_tunnel_tcp",
            "port_metrics",
            "certificates",
            "disk_space",
            "store",
            "s3",
            "readyz"
        ]
    );
    assert!(check(&r, "running")["detail"].as_str().unwrap().contains("a gateway answers"), "{r:#}");
    for port in ["port_ssh", "port_tunnel_udp", "port_tunnel_tcp", "port_metrics"] {
        assert!(check(&r, port)["detail"].as_str().unwrap().contains("the running gateway listens"), "{r:#}");
    }
    assert!(check(&r, "key_files")["detail"].as_str().unwrap().contains("ca.key"), "{r:#}");
    assert!(check(&r, "certificates")["detail"].as_str().unwrap().contains("the agent CA until"), "{r:#}");
    assert!(check(&r, "store")["detail"].as_str().unwrap().contains("schema version"), "{r:#}");
    assert!(check(&r, "readyz")["detail"].as_str().unwrap().contains("/readyz"), "{r:#}");

    let (code, a) = agent_doctor(&agent.state_dir(), &[]);
    assert_eq!(code, 0, "{a:#}");
    assert_healthy(&a, &[]);
    assert!(check(&a, "gateway_udp")["detail"].as_str().unwrap().contains("QUIC handshake"), "{a:#}");
    assert!(check(&a, "gateway_tcp")["detail"].as_str().unwrap().contains("TLS over TCP"), "{a:#}");
    let clock = check(&a, "clock")["detail"].as_str().unwrap();
    assert!(clock.contains("the gateway (±"), "{a:#}");
    assert!(check(&a, "certificate")["detail"].as_str().unwrap().contains("renews it itself"), "{a:#}");
    // The agent's probes are no sessions: it is still online, on its own connection.
    assert!(gw.is_online("web-01"));

    // The human form: one line per check and the summary; exit 0.
    let out = Command::new(bin("postern-agent"))
        .arg("--state-dir")
        .arg(agent.state_dir())
        .arg("doctor")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let human = text(&out.stdout);
    assert!(human.lines().any(|l| l.starts_with("OK    clock")), "{human}");
    assert!(human.lines().last().unwrap().starts_with("OK: 10 ok, 0 warning(s), 0 failing"), "{human}");
}

#[test]
fn a_listen_port_held_by_another_process_fails() {
    let gw = Gateway::prepare_on(&format!("127.0.0.1:{}", free_udp_port()), "");
    let squatter = std::net::TcpListener::bind(("127.0.0.1", gw.ssh_port)).unwrap();
    let (code, r) = gateway_doctor(&gw.config_path());
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["status"], "fail");
    let c = check(&r, "port_ssh");
    assert_eq!(c["status"], "fail", "{r:#}");
    assert!(c["detail"].as_str().unwrap().contains("in use by another process"), "{c}");
    assert!(c["fix"].as_str().unwrap().contains(&format!("ss -ltpn 'sport = :{}'", gw.ssh_port)), "{c}");
    assert_eq!(check(&r, "port_tunnel_udp")["status"], "ok", "only the held port fails: {r:#}");
    drop(squatter);
    let (code, r) = gateway_doctor(&gw.config_path());
    assert_eq!((code, &r["status"]), (0, &Value::from("ok")), "{r:#}");
}

#[test]
fn loose_data_dir_and_key_permissions_fail() {
    let mut gw = Gateway::start("");
    gw.stop();
    let data = gw.data_dir();
    let (code, r) = gateway_doctor(&gw.config_path());
    assert_eq!(code, 0, "{r:#}");

    set_mode(&data, 0o777);
    let (code, r) = gateway_doctor(&gw.config_path());
    assert_eq!(code, 1, "{r:#}");
    let c = check(&r, "data_dir");
    assert_eq!(c["status"], "fail", "{c}");
    assert!(c["detail"].as_str().unwrap().contains("mode 0777: others can replace its keys"), "{c}");
    assert_eq!(c["fix"].as_str().unwrap(), format!("chmod 700 {}", data.display()));
    set_mode(&data, 0o755);
    let c = check(&gateway_doctor(&gw.config_path()).1, "data_dir").clone();
    assert_eq!(c["status"], "fail", "{c}");
    assert!(c["detail"].as_str().unwrap().contains("mode 0755: others can read into it"), "{c}");
    set_mode(&data, 0o700);

    let key = data.join("ca.key");
    set_mode(&key, 0o644);
    let (code, r) = gateway_doctor(&gw.config_path());
    assert_eq!(code, 1, "{r:#}");
    let c = check(&r, "key_files");
    assert_eq!(c["status"], "fail", "{c}");
    assert!(c["detail"].as_str().unwrap().contains("ca.key has mode 0644"), "{c}");
    assert!(c["fix"].as_str().unwrap().starts_with(&format!("chmod 600 {}", key.display())), "{c}");
    set_mode(&key, 0o600);

    std::fs::rename(&key, data.join("ca.key.away")).unwrap();
    let (code, r) = gateway_doctor(&gw.config_path());
    assert_eq!(code, 1, "{r:#}");
    let c = check(&r, "key_files");
    assert!(c["detail"].as_str().unwrap().ends_with("ca.key is missing"), "{c}");
    assert!(c["fix"].as_str().unwrap().contains("every enrolled agent has to join again"), "{c}");
}

#[test]
fn a_bad_config_file_fails_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, "[ssh]\nlisten = \"127.0.0.1:2222\"\n\n[audit]\nfail_closed = maybe\n").unwrap();
    let (code, r) = gateway_doctor(&config);
    assert_eq!(code, 1, "{r:#}");
    let c = check(&r, "config");
    assert_eq!(c["status"], "fail", "{c}");
    let detail = c["detail"].as_str().unwrap();
    assert!(detail.contains(&config.display().to_string()) && detail.contains("line 5"), "{c}");
    // Everything that needs the configuration is skipped, not guessed.
    let rest: Vec<&Value> = r["checks"].as_array().unwrap().iter().filter(|c| c["name"] != "config").collect();
    assert_eq!(rest.len(), 14);
    assert!(rest.iter().all(|c| c["status"] == "skip"), "{r:#}");
    // The human form shows the line too, and the fix under it.
    let out = Command::new(bin("postern")).arg("--config").arg(&config).arg("doctor").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let human = text(&out.stdout);
    assert!(
        human.starts_with("FAIL  config") && human.contains("line 5") && human.contains("fix: correct the file"),
        "{human}"
    );
}

#[test]
fn an_unreachable_store_fails_and_a_reachable_one_is_read_without_changes() {
    let closed = free_tcp_port();
    let gw = Gateway::prepare_on(
        &format!("127.0.0.1:{}", free_udp_port()),
        &format!("[store]\nurl = \"postgres://postern:secret-pw@127.0.0.1:{closed}/postern\""),
    );
    let started = Instant::now();
    let (code, r) = gateway_doctor(&gw.config_path());
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(code, 1, "{r:#}");
    let c = check(&r, "store");
    assert_eq!(c["status"], "fail", "{c}");
    let detail = c["detail"].as_str().unwrap();
    assert!(detail.contains(&format!("postgres://127.0.0.1:{closed}/postern")), "{c}");
    assert!(!r.to_string().contains("secret-pw"), "the password is never printed: {r:#}");
    assert!(c["fix"].as_str().unwrap().contains("start the database"), "{c}");

    // A real PostgreSQL: an empty database is ok (the gateway migrates it at start), and
    // the doctor changed nothing in it; after a gateway's start it shows the schema version.
    let pg = Postgres::start();
    let url = pg.new_database("doctor");
    let gw = Gateway::prepare_on(&format!("127.0.0.1:{}", free_udp_port()), &format!("[store]\nurl = {url:?}"));
    let (code, r) = gateway_doctor(&gw.config_path());
    assert_eq!(code, 0, "{r:#}");
    let detail = check(&r, "store")["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("schema version 0, this version migrates it to"), "{r:#}");
    assert_eq!(pg.sql("doctor", "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"), "0");
    let mut gw = gw;
    gw.restart();
    gw.stop();
    let (code, r) = gateway_doctor(&gw.config_path());
    assert_eq!(code, 0, "{r:#}");
    let detail = check(&r, "store")["detail"].as_str().unwrap();
    assert!(
        detail.starts_with(&format!("PostgreSQL postgres://127.0.0.1:{}/doctor opens; schema version ", pg.port)),
        "{r:#}"
    );
    assert!(!detail.contains("migrates"), "{r:#}");
}

#[test]
fn an_agent_whose_udp_does_not_get_through_warns_and_uses_tcp() {
    // The agent is pointed at a UDP port where nothing answers, with the gateway's real
    // tunnel port as its TCP port (`[agent] tcp_port`): QUIC fails, TCP works.
    let udp = free_udp_port();
    let gw = Gateway::start_on(&format!("127.0.0.1:{udp}"), "");
    let agent = Agent::start(&gw, "web-01", vec![], &gw.listen);
    let file = agent.dir.path().join("agent.toml");
    std::fs::write(&file, format!("[agent]\ntcp_port = {udp}\n")).unwrap();
    let silent = free_udp_port();
    let (code, a) = agent_doctor(
        &agent.state_dir(),
        &["--config", file.to_str().unwrap(), "--gateway", &format!("127.0.0.1:{silent}")],
    );
    assert_eq!(code, 0, "warnings do not fail: {a:#}");
    assert_eq!(a["status"], "warn", "{a:#}");
    let udp_check = check(&a, "gateway_udp");
    assert_eq!(udp_check["status"], "warn", "{a:#}");
    assert!(udp_check["detail"].as_str().unwrap().contains("no QUIC answer"), "{udp_check}");
    assert!(udp_check["fix"].as_str().unwrap().contains(&format!("allow UDP port {silent}")), "{udp_check}");
    assert_eq!(check(&a, "gateway_tcp")["status"], "ok", "{a:#}");
    let summary = check(&a, "gateway");
    assert_eq!(summary["status"], "warn", "{a:#}");
    assert!(summary["fix"].as_str().unwrap().contains(&format!("open UDP port {silent}")), "{summary}");
    // The clock is asked over the transport that works.
    assert_eq!(check(&a, "clock")["status"], "ok", "{a:#}");
}

#[test]
fn an_agent_whose_gateway_is_down_fails() {
    let mut gw = Gateway::start("");
    let agent = Agent::start(&gw, "web-01", vec![], &gw.listen);
    gw.kill();
    let started = Instant::now();
    let (code, a) = agent_doctor(&agent.state_dir(), &[]);
    assert!(started.elapsed() < Duration::from_secs(20), "bounded: {:?}", started.elapsed());
    assert_eq!(code, 1, "{a:#}");
    let c = check(&a, "gateway");
    assert_eq!(c["status"], "fail", "{a:#}");
    let port = gw.listen.rsplit(':').next().unwrap();
    assert!(c["fix"].as_str().unwrap().contains(&format!("open UDP port {port} (QUIC) or TCP port {port}")), "{c}");
    assert_eq!(check(&a, "clock")["status"], "skip", "{a:#}");
    assert_eq!(check(&a, "joined")["status"], "ok", "{a:#}");
}

#[test]
fn an_agent_with_loose_permissions_or_no_state_fails() {
    let gw = Gateway::start("");
    let mut agent = Agent::start(&gw, "web-01", vec![], &gw.listen);
    drop(agent.proc.take());
    let state = agent.state_dir();
    let identity = state.join("identity.pem");
    set_mode(&identity, 0o644);
    let (code, a) = agent_doctor(&state, &[]);
    assert_eq!(code, 1, "{a:#}");
    let c = check(&a, "key_files");
    assert_eq!(c["status"], "fail", "{c}");
    assert!(c["fix"].as_str().unwrap().starts_with(&format!("chmod 600 {}", identity.display())), "{c}");
    set_mode(&identity, 0o600);
    set_mode(&state, 0o755);
    let (code, a) = agent_doctor(&state, &[]);
    assert_eq!(code, 1, "{a:#}");
    assert_eq!(check(&a, "state_dir")["status"], "fail", "{a:#}");
    set_mode(&state, 0o700);
    assert_eq!(agent_doctor(&state, &[]).0, 0);

    let empty = tempfile::tempdir().unwrap();
    let (code, a) = agent_doctor(empty.path(), &[]);
    assert_eq!(code, 1, "{a:#}");
    let c = check(&a, "joined");
    assert!(c["fix"].as_str().unwrap().contains("postern-agent --state-dir"), "{c}");
    for name in ["key_files", "certificate", "gateway_udp", "gateway_tcp", "gateway", "clock"] {
        assert_eq!(check(&a, name)["status"], "skip", "{a:#}");
    }
}

#[test]
fn s3_is_listed_when_configured_and_fails_when_unreachable_or_missing() {
    let port = free_tcp_port();
    let gw = Gateway::prepare_on(
        &format!("127.0.0.1:{}", free_udp_port()),
        &format!(
            "[audit.s3]\nbucket = \"postern-audit\"\nendpoint = \"http://127.0.0.1:{port}\"\nallow_http = true\n\
             access_key_id = \"test\"\nsecret_access_key = \"test-secret\"\n"
        ),
    );
    // Nothing listens: a failure with the fix, within the check's bound.
    let started = Instant::now();
    let (code, r) = gateway_doctor(&gw.config_path());
    assert!(started.elapsed() < Duration::from_secs(15), "{:?}", started.elapsed());
    assert_eq!(code, 1, "{r:#}");
    let c = check(&r, "s3");
    assert_eq!(c["status"], "fail", "{c}");
    assert!(c["fix"].as_str().unwrap().contains("[audit.s3]"), "{c}");
    assert!(!r.to_string().contains("test-secret"), "{r:#}");

    // A real S3 service (moto) without the bucket: the listing fails; with it, ok.
    let mut moto = Command::new("moto_server");
    moto.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
    let _moto = spawn_logged(moto, &gw.dir.path().join("moto.log"));
    wait_until("moto listens", Duration::from_secs(30), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    let (code, r) = gateway_doctor(&gw.config_path());
    assert_eq!((code, &check(&r, "s3")["status"]), (1, &Value::from("fail")), "{r:#}");
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, boto3\nboto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id='test', \
             aws_secret_access_key='test', region_name='us-east-1').create_bucket(Bucket='postern-audit')",
            &format!("http://127.0.0.1:{port}"),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (code, r) = gateway_doctor(&gw.config_path());
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(check(&r, "s3")["detail"], "bucket postern-audit lists", "{r:#}");
}

#[test]
fn an_agent_behind_an_http_proxy_reaches_the_gateway_over_tcp_through_it() {
    let gw = Gateway::start("");
    let agent = Agent::start(&gw, "web-01", vec![], &gw.listen);
    let tunnel_port = gw.listen.rsplit(':').next().unwrap().to_owned();
    let proxy_port = free_tcp_port();
    let conf = agent.dir.path().join("tinyproxy.conf");
    std::fs::write(
        &conf,
        format!(
            "User nobody\nGroup nogroup\nPort {proxy_port}\nListen 127.0.0.1\nTimeout 60\nLogLevel Connect\n\
             MaxClients 20\nAllow 127.0.0.1\nConnectPort {tunnel_port}\n"
        ),
    )
    .unwrap();
    let mut tinyproxy = Command::new("tinyproxy");
    tinyproxy.arg("-d").arg("-c").arg(&conf);
    let proxy = spawn_logged(tinyproxy, &agent.dir.path().join("tinyproxy.log"));
    wait_until("tinyproxy listening", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", proxy_port)).is_ok()
    });
    let (code, a) =
        agent_doctor(&agent.state_dir(), &["--transport", "tcp", "--proxy", &format!("http://127.0.0.1:{proxy_port}")]);
    assert_eq!(code, 0, "{a:#}");
    assert_healthy(&a, &[("gateway_udp", "transport = tcp")]);
    assert!(check(&a, "gateway_tcp")["detail"].as_str().unwrap().ends_with("through the proxy"), "{a:#}");
    assert_eq!(check(&a, "gateway")["detail"], "reachable over TCP (transport = tcp)", "{a:#}");
    // Both the handshake and the clock query went through the proxy.
    let connects = proxy.log_text().matches(&format!("CONNECT 127.0.0.1:{tunnel_port}")).count();
    assert!(connects >= 2, "{}", proxy.log_text());
}
