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

impl Console {
    fn start() -> Console {
        let port = free_tcp_port();
        let gw = Gateway::start(&format!("[web]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\n"));
        let agents = vec![
            Agent::start_labeled(&gw, "web-01", "env=prod", vec![], &gw.listen),
            Agent::start_labeled(&gw, "web-02", "env=dev", vec![], &gw.listen),
            Agent::start_labeled(&gw, "db-01", "env=prod", vec![], &gw.listen),
        ];
        let dir = tempfile::tempdir().unwrap();
        for who in ["alice", "bob"] {
            let key = dir.path().join(who);
            ssh_keygen(&key, who);
            let out = gw.postern(&["user", "add", who, "--key-file", key.with_extension("pub").to_str().unwrap()]);
            assert!(out.status.success(), "{}", text(&out.stderr));
        }
        let policy = dir.path().join("p.toml");
        std::fs::write(
            &policy,
            "name = \"web\"\n[[statement]]\neffect = \"allow\"\nusers = [\"alice\"]\nactions = [\"shell\", \"exec\"]\n\
             instances = [\"web-*\"]\n",
        )
        .unwrap();
        assert!(gw.postern(&["policy", "apply", policy.to_str().unwrap()]).status.success());
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
