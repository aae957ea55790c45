//! The web console (`[web]`): a one-time sign-in link from `postern web-login`, the
//! instances page in a real browser, and the console's refusals (CSRF, Origin, reused or
//! forged links, a disabled user), checked with curl.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

use postern_e2e::*;

struct Console {
    gw: Gateway,
    _agents: Vec<Agent>,
    port: u16,
    dir: tempfile::TempDir,
}

/// alice may run shells and commands on web-*, as root.
const POLICY: &str = "name = \"web\"\n[[statement]]\neffect = \"allow\"\nusers = [\"alice\"]\nactions = [\"shell\", \"exec\"]\n\
                      instances = [\"web-*\"]\nallow_root = true\n";

impl Console {
    fn start() -> Console {
        Console::with("", POLICY)
    }

    /// A gateway with the console, `config` added to its file, three agents, users alice,
    /// bob (both ops) and carol (auditors), and `policy` applied.
    fn with(config: &str, policy: &str) -> Console {
        let port = free_tcp_port();
        let gw = Gateway::start(&format!(
            "{config}\n[web]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\nadmin_groups = [\"auditors\"]\n"
        ));
        let agents = vec![
            Agent::start_labeled(&gw, "web-01", "env=prod", vec![], &gw.listen),
            Agent::start_labeled(&gw, "web-02", "env=dev", vec![], &gw.listen),
            Agent::start_labeled(&gw, "db-01", "env=prod", vec![], &gw.listen),
        ];
        let dir = tempfile::tempdir().unwrap();
        // carol audits: she may reach nothing, but sees everyone's sessions in the console.
        for (who, group) in [("alice", "ops"), ("bob", "ops"), ("carol", "auditors")] {
            let key = dir.path().join(who);
            ssh_keygen(&key, who);
            let out = gw.postern(&[
                "user",
                "add",
                who,
                "--group",
                group,
                "--key-file",
                key.with_extension("pub").to_str().unwrap(),
            ]);
            assert!(out.status.success(), "{}", text(&out.stderr));
        }
        let policy_file = dir.path().join("p.toml");
        std::fs::write(&policy_file, policy).unwrap();
        assert!(gw.postern(&["policy", "apply", policy_file.to_str().unwrap()]).status.success());
        gw.write_known_hosts(&dir.path().join("known_hosts"));
        Console { gw, _agents: agents, port, dir }
    }

    fn origin(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// `postern web-login` as `who`, with their key: the link.
    fn link(&self, who: &str) -> String {
        let out = Command::new(bin("postern"))
            .args(["web-login", "--gateway", &format!("127.0.0.1:{}", self.gw.ssh_port), "--user", who, "-i"])
            .arg(self.dir.path().join(who))
            .arg("--known-hosts")
            .arg(self.dir.path().join("known_hosts"))
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "web-login: {}", text(&out.stderr));
        let url = text(&out.stdout).trim().to_owned();
        assert!(url.starts_with(&format!("{}/signin?token=", self.origin())), "{url}");
        url
    }

    /// curl against the console, trusting the gateway's CA; headers and body.
    fn curl(&self, args: &[&str]) -> Output {
        Command::new("curl")
            .args(["-sS", "-i", "--max-time", "10", "--cacert"])
            .arg(self.gw.data_dir().join("ca.crt"))
            .args(args)
            .output()
            .unwrap()
    }
}

fn cookie_of(response: &str) -> String {
    let line = response.lines().find(|l| l.to_ascii_lowercase().starts_with("set-cookie:")).expect("a cookie");
    line.split_once(':').unwrap().1.trim().split(';').next().unwrap().to_owned()
}

#[test]
fn a_one_time_link_signs_a_browser_in_and_the_page_lists_what_the_user_may_reach() {
    let c = Console::start();
    let link = c.link("alice");
    let shot = c.dir.path().join("instances.png");
    let seen = console_visit(&link, &shot, Some("env=prod")).unwrap();
    assert_eq!(seen["landed"], format!("{}/", c.origin()), "{seen}");
    let page = seen["text"].as_str().unwrap();
    assert!(page.contains("web-01") && page.contains("web-02"), "{page}");
    assert!(!page.contains("db-01"), "an instance alice may not reach is listed: {page}");
    assert!(page.contains("env=prod") && page.contains("shell"), "{page}");
    let filtered = seen["filtered"].as_str().unwrap();
    assert!(filtered.contains("web-01") && !filtered.contains("web-02"), "{filtered}");
    assert!(seen["after_signout"].as_str().unwrap().contains("Sign in to Postern"), "{seen}");
    assert!(seen["reused"].as_str().unwrap().contains("This sign-in link is not valid"), "{seen}");
    // Audited once: the second use signed nobody in.
    let signins: Vec<_> = c.gw.audit_events().into_iter().filter(|e| e["event"] == "web.signin").collect();
    assert_eq!(signins.len(), 1, "{signins:?}");
    assert_eq!((signins[0]["user"].as_str(), signins[0]["via"].as_str()), (Some("alice"), Some("link")));
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "the screenshot is not a page");
    if let Ok(dir) = std::env::var("POSTERN_SCREENSHOT_DIR") {
        std::fs::copy(&shot, Path::new(&dir).join("web-instances.png")).unwrap();
    }
}

#[test]
fn the_console_refuses_forged_requests_reused_links_and_disabled_users() {
    let c = Console::start();
    // The certificate is the gateway CA's, for the console's address: curl checks it.
    let out = c.curl(&[&format!("{}/", c.origin())]);
    let page = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(page.contains("Sign in to Postern"), "{page}");
    for header in
        ["content-security-policy: default-src 'none'", "x-content-type-options: nosniff", "cache-control: no-store"]
    {
        assert!(page.to_ascii_lowercase().contains(header), "no {header}: {page}");
    }
    // A made-up link is refused.
    let out = c.curl(&[&format!("{}/signin?token=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", c.origin())]);
    assert!(text(&out.stdout).starts_with("HTTP/1.1 403"), "{}", text(&out.stdout));
    // A real one signs in, with a cookie browsers keep to this site.
    let link = c.link("alice");
    let out = c.curl(&[&link]);
    let response = text(&out.stdout);
    assert!(response.starts_with("HTTP/1.1 303"), "{response}");
    let set = response.lines().find(|l| l.to_ascii_lowercase().starts_with("set-cookie:")).unwrap().to_owned();
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "cookie without {attr}: {set}");
    }
    let cookie = cookie_of(&response);
    let out = c.curl(&["-b", &cookie, &format!("{}/api/instances", c.origin())]);
    let body = text(&out.stdout);
    assert!(body.contains("\"web-01\"") && !body.contains("db-01"), "{body}");
    // Used once: the same link again is refused.
    assert!(text(&c.curl(&[&link]).stdout).starts_with("HTTP/1.1 403"));
    // Signing out needs the console's Origin and the session's CSRF token.
    let page = text(&c.curl(&["-b", &cookie, &format!("{}/", c.origin())]).stdout);
    let csrf = page.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    let signout = format!("{}/signout", c.origin());
    let forged_origin =
        c.curl(&["-b", &cookie, "-H", "Origin: https://evil.example", "-d", &format!("csrf={csrf}"), &signout]);
    assert!(text(&forged_origin.stdout).starts_with("HTTP/1.1 403"), "{}", text(&forged_origin.stdout));
    let no_csrf = c.curl(&["-b", &cookie, "-H", &format!("Origin: {}", c.origin()), "-d", "csrf=wrong", &signout]);
    assert!(text(&no_csrf.stdout).starts_with("HTTP/1.1 403"), "{}", text(&no_csrf.stdout));
    // Still signed in after both forgeries.
    let out = c.curl(&["-b", &cookie, &format!("{}/api/instances", c.origin())]);
    assert!(text(&out.stdout).starts_with("HTTP/1.1 200"), "{}", text(&out.stdout));
    // Disabling alice signs her browser out at once.
    assert!(c.gw.postern(&["user", "disable", "alice"]).status.success());
    let out = c.curl(&["-b", &cookie, &format!("{}/api/instances", c.origin())]);
    assert!(text(&out.stdout).starts_with("HTTP/1.1 401"), "{}", text(&out.stdout));
    // A user with nothing allowed sees an empty list, not an error.
    let bob = c.link("bob");
    let cookie = cookie_of(&text(&c.curl(&[&bob]).stdout));
    let page = text(&c.curl(&["-b", &cookie, &format!("{}/", c.origin())]).stdout);
    assert!(page.contains("No instance you may reach"), "{page}");
}

/// The start and end events of the console's terminal sessions.
fn web_sessions(gw: &Gateway) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let events = gw.audit_events();
    let of = |name: &str| -> Vec<serde_json::Value> {
        events.iter().filter(|e| e["event"] == name && e["door"] == "web").cloned().collect()
    };
    (of("session.start"), of("session.end"))
}

#[test]
fn a_browser_terminal_runs_a_recorded_shell_through_the_broker() {
    let c = Console::start();
    let link = c.link("alice");
    let shot = c.dir.path().join("terminal.png");
    let (terminal, ready) = BrowserTerminal::open(&link, "web-01", &shot).unwrap();
    assert_eq!(ready["echoed"], true, "{ready}");
    assert_eq!(ready["sized"], true, "the shell did not see the new size: {ready}");
    assert_eq!(ready["pasted"], true, "a paste did not reach the shell: {ready}");
    assert_eq!(ready["violations"], serde_json::json!([]), "the page logged errors (CSP?): {ready}");
    // On the live table like any session, with its door.
    let (starts, _) = web_sessions(&c.gw);
    assert_eq!(starts.len(), 1, "{starts:?}");
    let start = &starts[0];
    assert_eq!(
        (start["user"].as_str(), start["target"].as_str(), start["kind"].as_str()),
        (Some("alice"), Some("web-01"), Some("shell"))
    );
    assert_eq!(start["logged"], true, "{start}");
    let sid = start["session_id"].as_str().unwrap().to_owned();
    assert!(ready["session"].as_str().unwrap().contains(&sid), "{ready}");
    let live = text(&c.gw.postern(&["sessions"]).stdout);
    assert!(live.contains(&sid[..8]) && live.contains("alice"), "{live}");
    let done = terminal.finish("exit").unwrap();
    assert!(done["ended"].as_str().unwrap().contains("Session ended: the shell exited (exit status 0)"), "{done}");
    // Ended, recorded: the recording replays the same output.
    let (_, ends) = web_sessions(&c.gw);
    assert_eq!(ends.len(), 1, "{ends:?}");
    assert_eq!((ends[0]["session_id"].as_str(), ends[0]["exit_code"].as_i64()), (Some(sid.as_str()), Some(0)));
    assert_eq!(ends[0]["logged"], true);
    let replay = c.gw.postern(&["replay", &sid, "--speed", "1000", "--max-wait", "0.001"]);
    let shown = text(&replay.stdout);
    assert!(replay.status.success(), "{}", text(&replay.stderr));
    // Lines as the terminal showed them (bash's bracketed-paste switches and carriage
    // returns stripped).
    let lines: Vec<String> =
        shown.lines().map(|l| l.replace("\x1b[?2004l", "").replace("\x1b[?2004h", "").replace('\r', "")).collect();
    assert!(shown.contains("echo $((6*7))") && lines.iter().any(|l| l == "42"), "{shown:?}");
    assert!(shown.contains("grüße ✓"), "{shown}");
    // In the history, as a web session.
    let history = text(&c.gw.postern(&["sessions", "--all", "--kind", "web"]).stdout);
    assert!(history.contains(&sid[..8]), "{history}");
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "the screenshot is not a page");
    if let Ok(dir) = std::env::var("POSTERN_SCREENSHOT_DIR") {
        std::fs::copy(&shot, Path::new(&dir).join("web-terminal.png")).unwrap();
    }

    // The history page finds it, and the recording plays in the page with the same output.
    let replay_shot = c.dir.path().join("replay.png");
    let seen = history_visit(&c.link("alice"), "web-01", &sid, "42", &replay_shot).unwrap();
    assert_eq!(seen["found"], true, "{seen}");
    assert!(seen["list"].as_str().unwrap().contains("via web"), "{seen}");
    assert!(seen["replay"].as_str().unwrap().contains("exit status 0"), "{seen}");
    assert_eq!(seen["shown"], true, "the player never showed 42: {seen}");
    assert_eq!(seen["errors"], serde_json::json!([]), "the page logged errors (CSP?): {seen}");
    if let Ok(dir) = std::env::var("POSTERN_SCREENSHOT_DIR") {
        std::fs::copy(&replay_shot, Path::new(&dir).join("web-replay.png")).unwrap();
    }

    // Users see their own sessions only; members of [web] admin_groups see everyone's.
    let page = |who: &str, path: &str| {
        let cookie = cookie_of(&text(&c.curl(&[&c.link(who)]).stdout));
        text(&c.curl(&["-b", &cookie, &format!("{}{path}", c.origin())]).stdout)
    };
    let cast = page("alice", &format!("/sessions/{sid}/cast"));
    assert!(cast.starts_with("HTTP/1.1 200") && cast.contains("\"version\"") && cast.contains("42"), "{cast}");
    for path in [format!("/sessions/{sid}"), format!("/sessions/{sid}/cast")] {
        let bob = page("bob", &path);
        assert!(bob.starts_with("HTTP/1.1 404"), "bob saw alice's session: {bob}");
        assert!(page("carol", &path).starts_with("HTTP/1.1 200"), "an auditor cannot see it");
    }
    assert!(!page("bob", "/sessions?user=alice").contains(&sid), "bob's history lists alice's session");
    assert!(page("carol", "/sessions?user=alice").contains(&sid), "the auditor's history does not list it");
    // Bad searches say what is wrong.
    assert!(page("alice", "/sessions?since=yesterday").contains("expected an age"), "a bad time was not explained");
    assert!(page("alice", "/sessions?kind=telnet").contains("unknown kind"), "a bad kind was not explained");
}

/// curl's attempt at the terminal's WebSocket: the response (headers, then whatever the
/// socket sent before `--max-time` cut it).
fn websocket(c: &Console, cookie: Option<&str>, origin: Option<&str>, instance: &str) -> String {
    let mut args = vec![
        "--http1.1".to_owned(),
        "-N".to_owned(),
        "--max-time".to_owned(),
        "4".to_owned(),
        "-H".to_owned(),
        "Connection: Upgrade".to_owned(),
        "-H".to_owned(),
        "Upgrade: websocket".to_owned(),
        "-H".to_owned(),
        "Sec-WebSocket-Version: 13".to_owned(),
        "-H".to_owned(),
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==".to_owned(),
    ];
    if let Some(cookie) = cookie {
        args.extend(["-b".to_owned(), cookie.to_owned()]);
    }
    if let Some(origin) = origin {
        args.extend(["-H".to_owned(), format!("Origin: {origin}")]);
    }
    args.push(format!("{}/ws/terminal?instance={instance}&cols=80&rows=24", c.origin()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    String::from_utf8_lossy(&c.curl(&args).stdout).into_owned()
}

#[test]
fn crafted_terminal_sockets_are_refused_and_revocation_closes_an_open_terminal() {
    let c = Console::start();
    let cookie = cookie_of(&text(&c.curl(&[&c.link("alice")]).stdout));
    let origin = c.origin();
    // Not from the console's page (no Origin, another site's), or not signed in: refused
    // before any upgrade.
    let r = websocket(&c, Some(&cookie), None, "web-01");
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    let r = websocket(&c, Some(&cookie), Some("https://evil.example"), "web-01");
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    let r = websocket(&c, None, Some(&origin), "web-01");
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    let r = websocket(&c, Some("postern_session=forged"), Some(&origin), "web-01");
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    // Signed in, but the policy does not let alice onto db-01, nor bob anywhere: the socket
    // says why and closes; nothing runs, and the refusal is audited with its door.
    let r = websocket(&c, Some(&cookie), Some(&origin), "db-01");
    assert!(r.starts_with("HTTP/1.1 101") && r.contains("\"refused\""), "{r}");
    let bob = cookie_of(&text(&c.curl(&[&c.link("bob")]).stdout));
    let r = websocket(&c, Some(&bob), Some(&origin), "web-01");
    assert!(r.starts_with("HTTP/1.1 101") && r.contains("\"refused\""), "{r}");
    let denied: Vec<_> =
        c.gw.audit_events().into_iter().filter(|e| e["event"] == "session.denied" && e["door"] == "web").collect();
    assert_eq!(denied.len(), 2, "{denied:?}");
    assert!(web_sessions(&c.gw).0.is_empty(), "a refused socket started a session");

    // A terminal open in a browser ends within 5 s of alice's disabling, and says so.
    let link = c.link("alice");
    let (terminal, _) = BrowserTerminal::open(&link, "web-01", &c.dir.path().join("t.png")).unwrap();
    let asked = std::time::Instant::now();
    assert!(c.gw.postern(&["user", "disable", "alice"]).status.success());
    let done = terminal.finish("wait").unwrap();
    let took = asked.elapsed();
    assert!(took < std::time::Duration::from_secs(5), "the terminal outlived the revocation by {took:?}: {done}");
    let ended = done["ended"].as_str().unwrap();
    assert!(ended.starts_with("Session ended:") && ended.contains("disabled"), "{done}");
    assert!(done["screen"].as_str().unwrap().contains("postern: session ended"), "{done}");
    let (_, ends) = web_sessions(&c.gw);
    assert_eq!(ends.len(), 1, "{ends:?}");
    assert!(ends[0]["terminated_because"].as_str().unwrap_or("").contains("disabled"), "{ends:?}");
}

/// An SSH session of alice's with a terminal, typed into from the test; what it printed so
/// far is in `seen`.
struct SshTerminal {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    seen: std::sync::Arc<std::sync::Mutex<String>>,
}

impl SshTerminal {
    fn open(c: &Console, who: &str, instance: &str) -> SshTerminal {
        let mut child = Command::new("timeout")
            .args(["60", "ssh", "-tt", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i"])
            .arg(c.dir.path().join(who))
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", c.dir.path().join("known_hosts").display()))
            .args(["-p", &c.gw.ssh_port.to_string(), &format!("{who}%{instance}@127.0.0.1")])
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let into = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut stdout, &mut buf) {
                if n == 0 {
                    break;
                }
                into.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        SshTerminal { child, stdin, seen }
    }

    fn type_line(&mut self, line: &str) {
        std::io::Write::write_all(&mut self.stdin, format!("{line}\n").as_bytes()).unwrap();
    }

    /// Wait (up to 20 s) until the terminal has shown `want`.
    fn wait_for(&self, want: &str) -> String {
        wait_until(&format!("{want:?} in alice's terminal"), std::time::Duration::from_secs(20), || {
            self.seen.lock().unwrap().contains(want)
        });
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for SshTerminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_admin_watches_a_live_ssh_session_read_only_and_its_user_is_told() {
    let c = Console::start();
    let mut ssh = SshTerminal::open(&c, "alice", "web-01");
    ssh.type_line("echo ready-$((1+1))");
    ssh.wait_for("ready-2");
    let start =
        c.gw.audit_events()
            .into_iter()
            .find(|e| e["event"] == "session.start" && e["user"] == "alice")
            .expect("alice's session started");
    let sid = start["session_id"].as_str().unwrap().to_owned();

    // Only members of [web] admin_groups may watch: bob may not, page or socket.
    let bob = cookie_of(&text(&c.curl(&[&c.link("bob")]).stdout));
    let page = text(&c.curl(&["-b", &bob, &format!("{}/watch?session={sid}", c.origin())]).stdout);
    assert!(page.starts_with("HTTP/1.1 404"), "{page}");
    let mut args = vec!["--http1.1", "-N", "--max-time", "4", "-H", "Connection: Upgrade", "-H", "Upgrade: websocket"];
    args.extend(["-H", "Sec-WebSocket-Version: 13", "-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "-b", &bob]);
    let origin = format!("Origin: {}", c.origin());
    let url = format!("{}/ws/watch?session={sid}", c.origin());
    args.extend(["-H", &origin, &url]);
    let r = String::from_utf8_lossy(&c.curl(&args).stdout).into_owned();
    assert!(r.contains("\"refused\""), "bob's watch socket was not refused: {r}");

    // carol (auditors) watches from the Sessions page.
    let shot = c.dir.path().join("watch.png");
    let (watch, _ready) = BrowserTerminal::watch(&c.link("carol"), &sid, &shot).unwrap();
    let told = ssh.wait_for("carol is watching this session (read-only)");
    assert!(told.contains("postern: carol is watching"), "{told}");
    ssh.type_line("echo watched-$((6*7))");
    let done = watch.finish("watched-42").unwrap();
    assert_eq!(done["seen"], true, "the watcher never saw the output: {done}");
    assert_eq!(done["errors"], serde_json::json!([]), "{done}");
    // The page closed: alice is told, and both ends are audited.
    ssh.wait_for("carol stopped watching");
    let events = c.gw.audit_events();
    let watch_start = events.iter().find(|e| e["event"] == "session.watch.start").expect("session.watch.start");
    assert_eq!((watch_start["watcher"].as_str(), watch_start["user"].as_str()), (Some("carol"), Some("alice")));
    assert_eq!(watch_start["session_id"], sid.as_str());
    wait_until("session.watch.end", std::time::Duration::from_secs(10), || {
        c.gw.audit_events().iter().any(|e| e["event"] == "session.watch.end" && e["reason"] == "closed")
    });
    if let Ok(dir) = std::env::var("POSTERN_SCREENSHOT_DIR") {
        std::fs::copy(&shot, Path::new(&dir).join("web-watch.png")).unwrap();
    }
}

/// Where the policy lets a user choose among logins and profiles, the instances page asks,
/// and the terminal opens with the choice: the session runs with that profile and login.
#[test]
fn a_terminal_opens_with_the_login_and_profile_chosen() {
    let c = Console::with(
        "[[ssh.profiles]]\nname = \"ops\"\nworkdir = \"/tmp\"\n",
        "name = \"web\"\n[[statement]]\neffect = \"allow\"\nusers = [\"alice\"]\nactions = [\"shell\"]\n\
         instances = [\"web-01\"]\nallow_root = true\nrun_as = [\"root\", \"postern-login\"]\nprofiles = [\"ops\"]\n",
    );
    let cookie = cookie_of(&text(&c.curl(&[&c.link("alice")]).stdout));
    let page = text(&c.curl(&["-b", &cookie, &format!("{}/", c.origin())]).stdout);
    assert!(page.contains("<select name=\"login\"><option value=\"root\">root (default)</option><option value=\"postern-login\">postern-login</option></select>"), "{page}");
    assert!(
        page.contains(
            "<select name=\"profile\"><option value=\"\">default</option><option value=\"ops\">ops</option></select>"
        ),
        "{page}"
    );
    // The form's choice reaches the terminal page and its socket.
    let term = text(
        &c.curl(&["-b", &cookie, &format!("{}/terminal?instance=web-01&login=root&profile=ops", c.origin())]).stdout,
    );
    assert!(term.contains("data-login=\"root\" data-profile=\"ops\""), "{term}");
    let r = websocket(&c, Some(&cookie), Some(&c.origin()), "web-01&login=root&profile=ops");
    assert!(r.starts_with("HTTP/1.1 101") && r.contains("\"started\""), "{r}");
    let (starts, _) = web_sessions(&c.gw);
    assert_eq!(
        (starts[0]["profile"].as_str(), starts[0]["run_as"].as_str()),
        (Some("ops"), Some("root")),
        "{starts:?}"
    );
    // A profile the policy does not give is refused with the reason.
    let r = websocket(&c, Some(&cookie), Some(&c.origin()), "web-01&profile=nope");
    assert!(r.contains("\"refused\"") && r.contains("profile"), "{r}");
}

/// A recording the gateway uploaded to the object store and no longer has on disk (as
/// retention leaves it) still plays in the console: fetched from the store for the page.
#[test]
fn a_recording_only_in_the_object_store_replays_in_the_console() {
    let moto_dir = tempfile::tempdir().unwrap();
    let port = free_tcp_port();
    let mut moto = Command::new("moto_server");
    moto.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
    let _moto = spawn_logged(moto, &moto_dir.path().join("moto.log"));
    wait_until("moto listens", std::time::Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let created = Command::new("python3")
        .args([
            "-c",
            "import sys, boto3\nboto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id='test', \
             aws_secret_access_key='test', region_name='us-east-1').create_bucket(Bucket='postern-audit')",
            &format!("http://127.0.0.1:{port}"),
        ])
        .output()
        .unwrap();
    assert!(created.status.success(), "{}", text(&created.stderr));
    let c = Console::with(
        &format!(
            "[audit.s3]\nbucket = \"postern-audit\"\nprefix = \"site-a\"\nendpoint = \"http://127.0.0.1:{port}\"\n\
             allow_http = true\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\n"
        ),
        POLICY,
    );
    let out = Command::new("timeout")
        .args(["30", "ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i"])
        .arg(c.dir.path().join("alice"))
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", c.dir.path().join("known_hosts").display()))
        .args(["-p", &c.gw.ssh_port.to_string(), "alice%web-01@127.0.0.1", "echo from-the-bucket"])
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let sid = c.gw.audit_events().into_iter().rfind(|e| e["event"] == "session.end").unwrap()["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_until("the recording is uploaded", std::time::Duration::from_secs(30), || {
        let out = c.gw.postern(&["sessions", "--all", "--json"]);
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        rows.iter().any(|r| r["id"] == sid.as_str() && r["recording_s3"].is_string())
    });
    std::fs::remove_file(c.gw.data_dir().join("recordings").join(format!("{sid}.cast"))).unwrap();
    let cookie = cookie_of(&text(&c.curl(&[&c.link("alice")]).stdout));
    let cast = text(&c.curl(&["-b", &cookie, &format!("{}/sessions/{sid}/cast", c.origin())]).stdout);
    assert!(cast.starts_with("HTTP/1.1 200") && cast.contains("from-the-bucket"), "{cast}");
    let page = text(&c.curl(&["-b", &cookie, &format!("{}/sessions/{sid}", c.origin())]).stdout);
    assert!(page.contains("id=\"player\""), "the page offers no player: {page}");
    // The downloaded copy is not left behind.
    let left: Vec<_> = std::fs::read_dir(c.gw.data_dir())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("web-replay-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
