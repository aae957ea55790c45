//! The RDP front door with a real FreeRDP client (headless, under Xvfb) against real RDP
//! servers on loopback behind agents: xrdp (TLS) and FreeRDP's shadow server (NLA: CredSSP
//! with NTLM, so a wrong password fails end to end). Refusals are driven with raw bytes
//! against a stand-in host that counts connections, to show nothing is ever dialled.
//!
//! (Over 600 lines, on purpose: one test binary per area keeps link times down on this
//! 2-core machine; the tests share one set-up.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::io::{BufRead, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use postern_e2e::*;
use serde_json::Value;

const RDP_POLICY: &str = r#"name = "rdp-users"
[[statement]]
sid = "windows"
effect = "allow"
users = ["alice"]
actions = ["rdp"]
instances = ["win-*"]
"#;

/// A gateway with the RDP door on, user alice (store user) with a key, allowed `rdp` on
/// `win-*` by a policy, and a known_hosts file trusting the gateway's host CA.
struct Setup {
    gw: Gateway,
    dir: tempfile::TempDir,
    rdp_port: u16,
    key: PathBuf,
}

impl Setup {
    fn new(rdp_settings: &str) -> Setup {
        let rdp_port = free_tcp_port();
        let gw = Gateway::start(&format!("[rdp]\nenabled = true\nlisten = \"127.0.0.1:{rdp_port}\"\n{rdp_settings}\n"));
        let dir = tempfile::tempdir().unwrap();
        gw.write_known_hosts(&dir.path().join("known_hosts"));
        let key = dir.path().join("alice");
        ssh_keygen(&key, "alice");
        let s = Setup { gw, dir, rdp_port, key };
        s.ok(&["user", "add", "alice", "--key-file", s.key.with_extension("pub").to_str().unwrap()]);
        s.apply(RDP_POLICY);
        s
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.gw.postern(args);
        assert!(out.status.success(), "postern {args:?}: {}{}", text(&out.stdout), text(&out.stderr));
        text(&out.stdout)
    }

    fn apply(&self, policy: &str) {
        let file = self.dir.path().join("policy.toml");
        std::fs::write(&file, policy).unwrap();
        self.ok(&["policy", "apply", file.to_str().unwrap()]);
    }

    /// An agent for `name` whose RDP server is `rdp_address`.
    fn agent(&self, name: &str, rdp_address: &str) -> Agent {
        let config = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&config, format!("[limits]\nrdp_address = {rdp_address:?}\n")).unwrap();
        Agent::start_with(
            &self.gw,
            name,
            "os=windows",
            vec![],
            &self.gw.listen,
            &["--config", config.to_str().unwrap()],
        )
    }

    /// `postern rdp ARGS` as alice: no ssh-agent, a scratch HOME, the test's known_hosts.
    fn user_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("timeout");
        c.arg("60")
            .arg(bin("postern"))
            .arg("rdp")
            .args(["--gateway", &format!("127.0.0.1:{}", self.gw.ssh_port), "--user", "alice", "-i"])
            .arg(&self.key)
            .arg("--known-hosts")
            .arg(self.dir.path().join("known_hosts"))
            .args(args)
            .env("HOME", self.dir.path())
            .env_remove("SSH_AUTH_SOCK")
            .env_remove("POSTERN_CONFIG")
            .env_remove("POSTERN_DATA_DIR")
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        c
    }

    fn rdp(&self, args: &[&str]) -> Output {
        self.user_cmd(args).output().unwrap()
    }

    /// A fresh routing token for `instance`.
    fn token(&self, instance: &str) -> String {
        let out = self.rdp(&[instance, "--json"]);
        assert!(out.status.success(), "postern rdp {instance}: {}", text(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["instance"], instance);
        assert_eq!(v["rdp_address"], format!("127.0.0.1:{}", self.rdp_port));
        v["token"].as_str().unwrap().to_owned()
    }

    fn events(&self, name: &str) -> Vec<Value> {
        self.gw.audit_events().into_iter().filter(|e| e["event"] == name).collect()
    }

    /// The `rdp.open` of the one session, among those opened after the first `since`, that is
    /// still open: the connection in use. Readiness probes (a connect to the forward's port)
    /// open sessions too, and the gateway opens channels concurrently, so the last `rdp.open`
    /// written need not be the one in use; the probes close at once.
    fn live_open(&self, since: usize) -> Value {
        let still_open = || {
            let closed: Vec<Value> = self.events("rdp.close").into_iter().map(|e| e["session_id"].clone()).collect();
            let open: Vec<Value> = self.events("rdp.open").into_iter().skip(since).collect();
            open.into_iter().filter(|o| !closed.contains(&o["session_id"])).collect::<Vec<_>>()
        };
        wait_until("one rdp session open (probes closed)", Duration::from_secs(20), || still_open().len() == 1);
        still_open().remove(0)
    }

    /// Wait for the `rdp.close` of the session `open` started.
    fn wait_close(&self, open: &Value) -> Value {
        let sid = open["session_id"].clone();
        let find = || self.events("rdp.close").into_iter().find(|e| e["session_id"] == sid);
        wait_until(&format!("rdp.close of {sid}"), Duration::from_secs(60), || find().is_some());
        find().unwrap()
    }

    /// Wait for the `n`-th event called `name` and return it.
    fn wait_event(&self, name: &str, n: usize) -> Value {
        wait_until(&format!("{n} {name} event(s)"), Duration::from_secs(60), || self.events(name).len() >= n);
        self.events(name)[n - 1].clone()
    }
}

/// A virtual X display, chosen by Xvfb itself so parallel tests do not collide.
struct Xvfb {
    child: Child,
    display: String,
}

impl Xvfb {
    fn start() -> Xvfb {
        let mut child = Command::new("Xvfb")
            .args(["-displayfd", "1", "-screen", "0", "1024x768x24", "-nolisten", "tcp"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("Xvfb (apt-get install xvfb)");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let display = format!(":{}", line.trim());
        assert!(line.trim().parse::<u32>().is_ok(), "Xvfb did not report a display: {line:?}");
        Xvfb { child, display }
    }
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A background server process, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_listening(port: u16, what: &str) {
    wait_until(what, Duration::from_secs(60), || TcpStream::connect(("127.0.0.1", port)).is_ok());
}

/// xrdp on its own port with a self-signed certificate (TLS security; xrdp has no NLA).
fn start_xrdp(dir: &Path) -> (Server, u16) {
    let port = free_tcp_port();
    std::fs::create_dir_all("/run/xrdp/sockdir").unwrap();
    sh("chmod 3777 /run/xrdp/sockdir");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    sh(&format!(
        "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=localhost -keyout {} -out {} 2>/dev/null",
        key.display(),
        cert.display()
    ));
    let ini: String = std::fs::read_to_string("/etc/xrdp/xrdp.ini")
        .expect("/etc/xrdp/xrdp.ini (apt-get install xrdp)")
        .lines()
        .map(|l| match l {
            "port=3389" => format!("port=tcp://127.0.0.1:{port}"),
            "certificate=" => format!("certificate={}", cert.display()),
            "key_file=" => format!("key_file={}", key.display()),
            "LogFile=xrdp.log" => format!("LogFile={}", dir.join("xrdp.log").display()),
            "EnableSyslog=true" => "EnableSyslog=false".to_owned(),
            other => other.to_owned(),
        })
        .map(|l| l + "\n")
        .collect();
    assert!(ini.contains(&format!("port=tcp://127.0.0.1:{port}")), "unexpected xrdp.ini layout");
    let conf = dir.join("xrdp.ini");
    std::fs::write(&conf, ini).unwrap();
    let child = Command::new("xrdp")
        .arg("--nodaemon")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server(child);
    wait_listening(port, "xrdp listening");
    (server, port)
}

/// FreeRDP's shadow server sharing an Xvfb screen: NLA (CredSSP/NTLM) against a SAM file.
fn start_nla_server(dir: &Path, screen: &Xvfb, user: &str, password: &str) -> (Server, u16) {
    let port = free_tcp_port();
    let sam = dir.join("sam");
    let out = Command::new("winpr-hash").args(["-u", user, "-p", password, "-f", "sam"]).output().unwrap();
    assert!(out.status.success());
    std::fs::write(&sam, out.stdout).unwrap();
    let home = dir.join("shadow-home");
    std::fs::create_dir_all(&home).unwrap();
    let child = Command::new("freerdp-shadow-cli")
        .args(["/bind-address:127.0.0.1", &format!("/port:{port}"), "/sec:nla", "+auth"])
        .arg(format!("/sam-file:{}", sam.display()))
        .env("DISPLAY", &screen.display)
        .env("HOME", &home)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server(child);
    wait_listening(port, "freerdp-shadow-cli listening");
    (server, port)
}

/// `xfreerdp ARGS +auth-only` (connects, completes TLS and authentication, exits).
fn xfreerdp(screen: &Xvfb, home: &Path, args: &[&str]) -> Output {
    std::fs::create_dir_all(home).unwrap();
    Command::new("timeout")
        .args(["60", "xfreerdp"])
        // An .rdp file must be the first argument.
        .args(args)
        .args(["/cert:ignore", "+auth-only", "/log-level:ERROR"])
        .env("DISPLAY", &screen.display)
        .env("HOME", home)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn freerdp_reaches_xrdp_and_an_nla_server_through_the_gateway() {
    let s = Setup::new("");
    let (_xrdp, xrdp_port) = start_xrdp(s.dir.path());
    let client_screen = Xvfb::start();
    let shadow_screen = Xvfb::start();
    let (_nla, nla_port) = start_nla_server(s.dir.path(), &shadow_screen, "tester", "s3cret");
    let _win1 = s.agent("win-01", &format!("127.0.0.1:{xrdp_port}"));
    let _win2 = s.agent("win-02", &format!("127.0.0.1:{nla_port}"));
    let home = s.dir.path().join("freerdp-home");
    let gw_rdp = format!("/v:127.0.0.1:{}", s.rdp_port);

    // Token mode, TLS to xrdp: the preconnection blob carries the token.
    let token = s.token("win-01");
    let out = xfreerdp(&client_screen, &home, &[&gw_rdp, &format!("/pcb:{token}"), "/u:alice", "/p:x", "/sec:tls"]);
    assert_eq!(out.status.code(), Some(0), "xfreerdp via gateway: {}{}", text(&out.stdout), text(&out.stderr));
    let open = s.wait_event("rdp.open", 1);
    assert_eq!(open["user"], "alice");
    assert_eq!(open["target"], "win-01");
    assert_eq!(open["mode"], "gateway");
    assert_eq!(open["cookie"], "alice", "mstshash cookie from the X.224 request");
    assert_eq!(open["protocols"], serde_json::json!(["tls"]));
    assert_eq!(open["logged"], false);
    assert_eq!(open["reason"], "RDP content is end-to-end encrypted (TLS/CredSSP)");
    let close = s.wait_close(&open);
    assert!(close["bytes_to_target"].as_u64().unwrap() > 1000, "{close}");
    assert!(close["bytes_from_target"].as_u64().unwrap() > 1000, "{close}");

    // The same token again: refused, and nothing reaches xrdp.
    let out = xfreerdp(&client_screen, &home, &[&gw_rdp, &format!("/pcb:{token}"), "/u:alice", "/p:x", "/sec:tls"]);
    assert_ne!(out.status.code(), Some(0));
    let denied = s.wait_event("session.denied", 1);
    assert_eq!(denied["code"], "token-used", "{denied}");
    assert_eq!(denied["cookie"], "alice");
    assert_eq!(s.events("rdp.open").len(), 1);

    // The .rdp file (what mstsc opens) works with FreeRDP too; NLA runs end to end, so the
    // password is checked by the host: right one connects, wrong one fails.
    let out = s.rdp(&["win-02", "--rdp-file", "win-02.rdp"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("xfreerdp /v:127.0.0.1:"), "{}", text(&out.stdout));
    let file = s.dir.path().join("win-02.rdp");
    let content = std::fs::read_to_string(&file).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600, "the token file is private");
    assert!(content.contains(&format!("full address:s:127.0.0.1:{}\r\n", s.rdp_port)), "{content}");
    assert!(content.contains("pcb:s:pr1."), "{content}");
    let f = file.to_str().unwrap();
    let out = xfreerdp(&client_screen, &home, &[f, "/u:tester", "/p:s3cret", "/sec:nla"]);
    assert_eq!(out.status.code(), Some(0), "NLA via .rdp file: {}{}", text(&out.stdout), text(&out.stderr));
    let open = s.wait_event("rdp.open", 2);
    assert_eq!(open["target"], "win-02");
    assert_eq!(open["protocols"], serde_json::json!(["tls", "credssp"]));
    let token = s.token("win-02");
    let out =
        xfreerdp(&client_screen, &home, &[&gw_rdp, &format!("/pcb:{token}"), "/u:tester", "/p:wrong", "/sec:nla"]);
    // 147: FreeRDP's logon failure, reported by the host's CredSSP through the gateway.
    assert_eq!(out.status.code(), Some(147), "a wrong password must fail at the host: {}", text(&out.stderr));
    assert_eq!(s.wait_event("rdp.open", 3)["target"], "win-02");

    // --launch starts the local FreeRDP with the token; its exit status comes back.
    let out = s
        .user_cmd(&["win-01", "--launch", "--", "/cert:ignore", "+auth-only", "/u:alice", "/p:x", "/sec:tls"])
        .env("DISPLAY", &client_screen.display)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "--launch: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("starting"), "{}", text(&out.stderr));
    let open = s.wait_event("rdp.open", 4);
    assert_eq!((open["mode"].as_str(), open["target"].as_str()), (Some("gateway"), Some("win-01")));

    // Local forward mode: no token, through the SSH connection.
    let port = free_tcp_port();
    let mut local = s
        .user_cmd(&["win-01", "--local", &port.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It says where it listens once it does.
    let mut stderr = std::io::BufReader::new(local.stderr.take().unwrap());
    let mut ready = String::new();
    stderr.read_line(&mut ready).unwrap();
    assert!(ready.contains(&format!("127.0.0.1:{port}")), "{ready}");
    let out = xfreerdp(&client_screen, &home, &[&format!("/v:127.0.0.1:{port}"), "/u:alice", "/p:x", "/sec:tls"]);
    assert_eq!(out.status.code(), Some(0), "xfreerdp via --local: {}{}", text(&out.stdout), text(&out.stderr));
    let open = s.wait_event("rdp.open", 5);
    assert_eq!(open["mode"], "local");
    assert_eq!(open["target"], "win-01");
    assert_eq!(open["logged"], false);
    s.wait_close(&open);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(local.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let mut summary = String::new();
    stderr.read_to_string(&mut summary).unwrap();
    assert!(local.wait().unwrap().success(), "{summary}");
    assert!(summary.contains("1 connection(s), 0 failed"), "{summary}");
    assert!(!summary.contains(" 0 bytes sent"), "{summary}");

    // The instance name now belongs to another agent (re-enrolled after a revocation): a
    // token issued for the old one does not follow the name.
    let token = s.token("win-02");
    s.ok(&["instances", "revoke", "win-02"]);
    let _win2_again = s.agent("win-02", &format!("127.0.0.1:{nla_port}"));
    let (back, _) = raw(&s, &[rdp_pcb(&token), rdp_connection_request("alice")].concat(), false);
    assert!(back.is_empty());
    let denied = s.events("session.denied").into_iter().last().unwrap();
    assert_eq!(denied["code"], "instance-changed", "{denied}");
}

/// A stand-in RDP host: counts connections and echoes what it receives.
struct Echo {
    port: u16,
    connections: Arc<AtomicUsize>,
}

impl Echo {
    fn start() -> Echo {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let n = connections.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                n.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut c = c;
                    let mut buf = [0u8; 4096];
                    while let Ok(k) = c.read(&mut buf) {
                        if k == 0 || c.write_all(&buf[..k]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Echo { port, connections }
    }

    fn count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Through the RDP door with a fresh token for `instance`: connect, send the preconnection
/// blob and a Connection Request for alice, and read back as many bytes as the request had
/// (the stand-in host echoes). Returns the connection, the request and what came back.
fn through_rdp_door(s: &Setup, instance: &str) -> (TcpStream, Vec<u8>, Vec<u8>) {
    let token = s.token(instance);
    let mut c = TcpStream::connect(("127.0.0.1", s.rdp_port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let cr = rdp_connection_request("alice");
    c.write_all(&[rdp_pcb(&token), cr.clone()].concat()).unwrap();
    let mut back = vec![0u8; cr.len()];
    c.read_exact(&mut back).unwrap();
    (c, cr, back)
}

/// Connect to the gateway's RDP port, send `bytes`, then read until the gateway closes
/// (or `hold` elapses); returns what came back and how long the gateway took to close.
fn raw(s: &Setup, bytes: &[u8], close_write: bool) -> (Vec<u8>, Duration) {
    let mut c = TcpStream::connect(("127.0.0.1", s.rdp_port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let t = Instant::now();
    c.write_all(bytes).unwrap();
    if close_write {
        c.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut back = Vec::new();
    let _ = c.read_to_end(&mut back);
    (back, t.elapsed())
}

#[test]
fn refusals_are_audited_and_never_dial_the_host() {
    // Every refusal written on its own (they all come from 127.0.0.1): this test reads them
    // one by one; the summaries are tested below.
    let s = Setup::new("token_ttl = \"5s\"\nhandshake_timeout = \"2s\"\n[audit]\nrefusal_interval = \"0\"");
    let echo = Echo::start();
    let _win = s.agent("win-01", &format!("127.0.0.1:{}", echo.port));
    let _other = s.agent("web-01", &format!("127.0.0.1:{}", echo.port));
    let denied = |n: usize| s.wait_event("session.denied", n);
    let mut n = 0;

    // A valid token works and the host sees exactly the connection request (the blob is
    // consumed by the gateway); what the host sends comes back.
    let (mut c, cr, back) = through_rdp_door(&s, "win-01");
    assert_eq!(back, cr, "the host must receive the X.224 request without the blob");
    assert_eq!(echo.count(), 1);
    let open = s.wait_event("rdp.open", 1);
    assert_eq!(open["protocols"], serde_json::json!(["tls", "credssp"]));

    // Removing the policy ends the live session (revocation), like SSH sessions.
    s.ok(&["policy", "rm", "rdp-users"]);
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    let close = s.wait_event("rdp.close", 1);
    assert!(close["end_reason"].is_string(), "ended by policy, with the reason: {close}");
    // ... and a token issued before the change no longer works.
    s.apply(RDP_POLICY);
    let token = s.token("win-01");
    s.ok(&["policy", "rm", "rdp-users"]);
    let (back, _) = raw(&s, &[rdp_pcb(&token), rdp_connection_request("alice")].concat(), false);
    assert!(back.is_empty());
    n += 1;
    assert_eq!(denied(n)["code"], "policy");
    s.apply(RDP_POLICY);

    // No blob at all (a client pointed straight at the gateway): closed at once.
    let (_, took) = raw(&s, &rdp_connection_request("mallory"), false);
    assert!(took < Duration::from_secs(2), "{took:?}");
    n += 1;
    assert_eq!(denied(n)["code"], "no-token");
    // Garbage and an oversized blob: closed without waiting for more.
    let (_, took) = raw(&s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false);
    assert!(took < Duration::from_secs(2), "{took:?}");
    n += 1;
    assert_eq!(denied(n)["code"], "oversized");
    let mut big = rdp_pcb(&"A".repeat(100));
    big[..4].copy_from_slice(&(1u32 << 20).to_le_bytes());
    raw(&s, &big, false);
    n += 1;
    assert_eq!(denied(n)["code"], "oversized");
    // A blob that is not valid inside: its string runs past its own size.
    let mut bad = rdp_pcb("pr1.x");
    bad[16] = 200;
    raw(&s, &bad, false);
    n += 1;
    assert_eq!(denied(n)["code"], "malformed");
    // Truncated: the client stops half way and closes ...
    raw(&s, &rdp_pcb(&token)[..20], true);
    n += 1;
    assert_eq!(denied(n)["code"], "truncated");
    // ... or stops half way and waits: dropped at the handshake timeout.
    let (_, took) = raw(&s, &rdp_pcb(&token)[..20], false);
    assert!(took >= Duration::from_millis(1900) && took < Duration::from_secs(10), "{took:?}");
    n += 1;
    assert_eq!(denied(n)["code"], "timeout");
    // A token with a valid form from another gateway (or before a restart).
    let forged = format!("{}A.{}", &token[..40], &token[41..]);
    raw(&s, &[rdp_pcb(&forged), rdp_connection_request("alice")].concat(), false);
    n += 1;
    assert!(["token-invalid", "token-malformed"].contains(&denied(n)["code"].as_str().unwrap()));

    // A token for an instance the policy does not cover is never issued.
    let out = s.rdp(&["web-01", "--json"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("access denied"), "{}", text(&out.stderr));
    n += 1;
    assert_eq!(denied(n)["stage"], "token");

    // Expired: tokens here live 5 s.
    let token = s.token("win-01");
    let issued = Instant::now();
    wait_until("the token to expire", Duration::from_secs(10), || issued.elapsed() > Duration::from_millis(5100));
    raw(&s, &[rdp_pcb(&token), rdp_connection_request("alice")].concat(), false);
    n += 1;
    assert_eq!(denied(n)["code"], "token-expired");

    // Through all of it the host saw only the first, valid connection.
    assert_eq!(echo.count(), 1);

    // Plain OpenSSH can use the local mode too: `-L PORT:@rdp:3389` to the instance.
    let port = free_tcp_port();
    let opened = s.events("rdp.open").len();
    let mut ssh = Server(
        Command::new("ssh")
            .args(["-N", "-p", &s.gw.ssh_port.to_string(), "-i"])
            .arg(&s.key)
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-o"])
            .arg(format!("UserKnownHostsFile={}", s.dir.path().join("known_hosts").display()))
            .args(["-L", &format!("127.0.0.1:{port}:@rdp:3389"), "alice%win-01@127.0.0.1"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("ssh -L listening", Duration::from_secs(20), || {
        assert!(ssh.0.try_wait().unwrap().is_none(), "ssh -L exited");
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(b"through ssh -L").unwrap();
    let mut back = [0u8; 14];
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"through ssh -L");
    let open = s.live_open(opened);
    assert_eq!((open["mode"].as_str(), open["target"].as_str()), (Some("local"), Some("win-01")));
    drop(c);
    let _ = ssh.0.kill();

    // A policy's max_session ends RDP sessions (no terminal to warn on: the connection
    // closes) whichever way they came in.
    s.apply(&RDP_POLICY.replace("instances = [\"win-*\"]", "instances = [\"win-*\"]\nmax_session = \"2s\""));
    let (mut c, _, _) = through_rdp_door(&s, "win-01");
    let open = s.events("rdp.open").into_iter().last().unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    let close = s.wait_close(&open);
    assert!(close["end_reason"].as_str().unwrap().contains("maximum session length"), "{close}");
    assert!(close["duration_ms"].as_u64().unwrap() >= 1900, "{close}");
    let port = free_tcp_port();
    let opened = s.events("rdp.open").len();
    let _ssh = Server(
        Command::new("ssh")
            .args(["-N", "-p", &s.gw.ssh_port.to_string(), "-i"])
            .arg(&s.key)
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o"])
            .arg(format!("UserKnownHostsFile={}", s.dir.path().join("known_hosts").display()))
            .args(["-L", &format!("127.0.0.1:{port}:@rdp:3389"), "alice%win-01@127.0.0.1"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(port, "ssh -L listening");
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    c.read_exact(&mut back).unwrap();
    let open = s.live_open(opened);
    assert_eq!(open["mode"], "local");
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    let close = s.wait_close(&open);
    assert!(close["end_reason"].as_str().unwrap().contains("maximum session length"), "{close}");

    let out = s.gw.postern(&["audit", "verify"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// `n` TCP connections to `port` from the local address `source` (a loopback address other
/// than the one the kernel picks, so that the gateway sees another client).
fn connect_from(source: &str, port: u16, n: usize) -> Vec<TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut out = Vec::new();
        for _ in 0..n {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
            let c = socket.connect(format!("127.0.0.1:{port}").parse().unwrap()).await.unwrap();
            let c = c.into_std().unwrap();
            c.set_nonblocking(false).unwrap();
            out.push(c);
        }
        out
    })
}

/// The `session.denied` events from `ip`, and how many refusals they stand for (a summary
/// stands for `count`, any other for one).
fn denials_from(s: &Setup, ip: &str) -> (Vec<Value>, u64) {
    let from: Vec<Value> = s
        .events("session.denied")
        .into_iter()
        .filter(|e| e["source"].as_str().is_some_and(|src| src.starts_with(&format!("{ip}:"))))
        .collect();
    let stands_for = from.iter().map(|e| e["count"].as_u64().unwrap_or(1)).sum();
    (from, stands_for)
}

/// Issue 15 (RDP slowloris): 300 idle connections from one address used to fill the one
/// global handshake cap, so a valid token from anywhere was reset at once, and each wrote
/// its own `session.denied`. Now one address holds at most `max_handshakes_per_source`
/// places (the rest are closed on arrival), and its refusals are audited as the first one
/// plus one summary per interval with a count.
#[test]
fn an_idle_flood_from_one_address_keeps_no_token_out_and_is_audited_in_summaries() {
    let s = Setup::new("[audit]\nrefusal_interval = \"2s\"");
    let echo = Echo::start();
    let _win = s.agent("win-01", &format!("127.0.0.1:{}", echo.port));
    let token = s.token("win-01");

    // 300 connections from 127.0.0.2 that send nothing, held open.
    let idle = connect_from("127.0.0.2", s.rdp_port, 300);
    // A real token from 127.0.0.1 (accepted after all of them: the listen queue is FIFO)
    // goes through the door to the agent and its host, quickly.
    let start = Instant::now();
    let mut c = TcpStream::connect(("127.0.0.1", s.rdp_port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let cr = rdp_connection_request("alice");
    c.write_all(&[rdp_pcb(&token), cr.clone()].concat()).unwrap();
    let mut back = vec![0u8; cr.len()];
    c.read_exact(&mut back).expect("the door closed a valid token's connection during an idle flood");
    assert_eq!(back, cr);
    assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
    assert_eq!(s.wait_event("rdp.open", 1)["source"].as_str().unwrap().split(':').next(), Some("127.0.0.1"));
    assert_eq!(echo.count(), 1);

    // Every one of the 300 is refused (290 on arrival, 10 at the handshake timeout), and
    // the audit log says so in a handful of events whose counts add up to 300.
    wait_until("300 refusals from 127.0.0.2 in the audit log", Duration::from_secs(30), || {
        denials_from(&s, "127.0.0.2").1 >= 300
    });
    let (events, stands_for) = denials_from(&s, "127.0.0.2");
    assert_eq!(stands_for, 300, "{events:#?}");
    assert!(events.len() <= 5, "{} session.denied events for one flood: {events:#?}", events.len());
    assert_eq!(events[0]["code"], "too-many-handshakes", "the first is written at once: {events:#?}");
    assert!(events[0]["count"].is_null());
    assert!(events[1]["count"].as_u64() >= Some(280), "the next is a summary of the others: {events:#?}");
    let codes: Vec<&str> = events.iter().map(|e| e["code"].as_str().unwrap()).collect();
    assert!(codes.contains(&"timeout"), "the held ones time out: {codes:?}");
    drop(idle);
    drop(c);

    let out = s.gw.postern(&["audit", "verify"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// A hostile-peer fixture: a client that connects, sends part of its preconnection blob and
/// stalls is closed at the (default, 5 s) handshake timeout, with one `session.denied`.
#[test]
fn a_client_that_stalls_in_its_preamble_is_closed_at_the_handshake_timeout() {
    let s = Setup::new("");
    let mut c = TcpStream::connect(("127.0.0.1", s.rdp_port)).unwrap();
    let local = c.local_addr().unwrap().to_string();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let start = Instant::now();
    c.write_all(&rdp_pcb("pr1.never-finished")[..20]).unwrap();
    let mut back = Vec::new();
    let _ = c.read_to_end(&mut back);
    let took = start.elapsed();
    assert!(back.is_empty());
    assert!(took >= Duration::from_millis(4900) && took < Duration::from_secs(8), "closed after {took:?}");
    let denied = s.wait_event("session.denied", 1);
    assert_eq!((denied["code"].as_str(), denied["source"].as_str()), (Some("timeout"), Some(local.as_str())));
    assert!(denied["count"].is_null());
    assert_eq!(s.events("session.denied").len(), 1);
}
