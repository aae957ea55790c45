//! Single sign-on end to end. The `the_test_provider_*` tests check the fixture itself
//! (tests/oidc and `postern_e2e::OidcProvider`): a real oidc-provider behind the test
//! proxy, signed in at with headless Chromium and over the device flow, its ID tokens
//! checked against its published keys.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use postern_e2e::{
    OidcProvider, OidcProxy, ProxyMode, browser_login, device_login, jwt_claims, pkce_pair, tamper_jwt_payload,
};
use serde_json::{Value, json};

/// RFC 3986 unreserved characters stay, everything else is percent-encoded.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.replace("%3A", ":").replace("%2F", "/"))
    })
}

/// A loopback redirect target on a random port, as `postern login` will open: it answers
/// `/callback` and hands its query string to the test; other paths (a favicon) get 404.
fn callback_listener() -> (String, Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let redirect_uri = format!("http://127.0.0.1:{}/callback", listener.local_addr().unwrap().port());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(16) {
            let Ok(mut conn) = conn else { continue };
            conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut line = String::new();
            if BufReader::new(&conn).read_line(&mut line).is_err() {
                continue;
            }
            let target = line.split(' ').nth(1).unwrap_or_default().to_owned();
            if let Some(query) = target.strip_prefix("/callback?") {
                let body = "postern test callback: signed in";
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tx.send(query.to_owned());
                return;
            }
            let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (redirect_uri, rx)
}

fn basic(id: &str, secret: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", enc(id), enc(secret))))
}

/// POST a form with client_secret_basic; the JSON answer, or the status and body.
fn post_form(url: &str, id: &str, secret: &str, form: &[(&str, &str)]) -> Result<Value, (u16, Value)> {
    let response =
        ureq::post(url).timeout(Duration::from_secs(10)).set("Authorization", &basic(id, secret)).send_form(form);
    match response {
        Ok(r) => Ok(serde_json::from_str(&r.into_string().unwrap()).unwrap()),
        Err(ureq::Error::Status(code, r)) => Err((code, serde_json::from_str(&r.into_string().unwrap()).unwrap())),
        Err(e) => panic!("POST {url}: {e}"),
    }
}

/// Whether `token`'s RS256 signature verifies with a key of the provider's JWKS.
fn signature_verifies(discovery: &Value, token: &str) -> bool {
    let jwks_uri = discovery["jwks_uri"].as_str().unwrap();
    let jwks: Value = serde_json::from_str(
        &ureq::get(jwks_uri).timeout(Duration::from_secs(10)).call().unwrap().into_string().unwrap(),
    )
    .unwrap();
    let (signed, sig) = token.rsplit_once('.').unwrap();
    let header: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').next().unwrap()).unwrap()).unwrap();
    assert_eq!(header["alg"], "RS256");
    let Ok(sig) = URL_SAFE_NO_PAD.decode(sig) else { return false };
    jwks["keys"].as_array().unwrap().iter().filter(|k| k["kid"] == header["kid"]).any(|k| {
        let n = URL_SAFE_NO_PAD.decode(k["n"].as_str().unwrap()).unwrap();
        let e = URL_SAFE_NO_PAD.decode(k["e"].as_str().unwrap()).unwrap();
        ring::signature::RsaPublicKeyComponents { n: &n, e: &e }
            .verify(&ring::signature::RSA_PKCS1_2048_8192_SHA256, signed.as_bytes(), &sig)
            .is_ok()
    })
}

/// One authorization code login with PKCE as client `postern`, through `provider`'s issuer
/// (the proxy): the browser signs in, the test exchanges the code. Returns the token
/// response and the nonce sent.
fn code_flow(provider: &OidcProvider, login: &str, password: &str, otp: Option<&str>) -> (Value, String) {
    code_flow_as(provider, (&provider.client_id(), &provider.client_secret()), login, password, otp)
}

/// [`code_flow`] as another client (`(id, secret)`).
fn code_flow_as(
    provider: &OidcProvider,
    client: (&str, &str),
    login: &str,
    password: &str,
    otp: Option<&str>,
) -> (Value, String) {
    let discovery = provider.discovery();
    let (redirect_uri, callback) = callback_listener();
    let (verifier, challenge) = pkce_pair();
    let (nonce, _) = pkce_pair();
    let (state, _) = pkce_pair();
    let url = format!(
        "{}?client_id={}&response_type=code&scope={}&redirect_uri={}&code_challenge={challenge}\
         &code_challenge_method=S256&nonce={nonce}&state={state}",
        discovery["authorization_endpoint"].as_str().unwrap(),
        client.0,
        enc("openid email profile groups"),
        enc(&redirect_uri),
    );
    let page = browser_login(&url, login, password, otp).unwrap_or_else(|e| panic!("{e}\n{}", provider.log_text()));
    assert!(page.starts_with(&redirect_uri), "the browser landed on {page}");
    assert!(page.contains("postern test callback: signed in"), "{page}");
    let query = callback.recv_timeout(Duration::from_secs(10)).expect("the redirect reached the callback listener");
    assert_eq!(query_param(&query, "state").as_deref(), Some(state.as_str()), "{query}");
    assert_eq!(query_param(&query, "iss").as_deref(), Some(provider.issuer.as_str()), "RFC 9207 iss: {query}");
    let code = query_param(&query, "code").unwrap();
    let tokens = post_form(
        discovery["token_endpoint"].as_str().unwrap(),
        client.0,
        client.1,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", &redirect_uri),
            ("code_verifier", &verifier),
        ],
    )
    .unwrap_or_else(|e| panic!("token request refused: {e:?}\n{}", provider.log_text()));
    (tokens, nonce)
}

#[test]
fn the_test_provider_publishes_discovery_with_the_proxy_as_issuer() {
    let (provider, proxy) = OidcProvider::start_behind_proxy();
    assert_eq!(provider.issuer, proxy.url);
    let discovery = provider.discovery();
    assert_eq!(discovery["issuer"], json!(proxy.url));
    for endpoint in ["authorization_endpoint", "token_endpoint", "jwks_uri", "device_authorization_endpoint"] {
        let url = discovery[endpoint].as_str().unwrap_or_else(|| panic!("no {endpoint} in {discovery}"));
        assert!(url.starts_with(&format!("{}/", proxy.url)), "{endpoint} {url} is not behind the proxy");
    }
    assert_eq!(discovery["code_challenge_methods_supported"], json!(["S256"]));
    for claim in ["sub", "email", "email_verified", "preferred_username", "groups", "acr", "amr"] {
        assert!(discovery["claims_supported"].as_array().unwrap().contains(&json!(claim)), "{claim}: {discovery}");
    }
}

#[test]
fn the_test_provider_signs_in_with_pkce_and_puts_the_claims_and_mfa_in_the_id_token() {
    let (provider, proxy) = OidcProvider::start_behind_proxy();
    let discovery = provider.discovery();

    let (tokens, nonce) = code_flow(&provider, "alice", "alice-pw", Some("424242"));
    let id_token = tokens["id_token"].as_str().unwrap();
    assert!(signature_verifies(&discovery, id_token), "the ID token does not verify with the provider's JWKS");
    let claims = jwt_claims(id_token);
    assert_eq!(claims["iss"], json!(proxy.url));
    assert_eq!(claims["aud"], json!("postern"));
    assert_eq!(claims["nonce"], json!(nonce));
    assert_eq!(claims["sub"], json!("sub-alice"));
    assert_eq!(claims["preferred_username"], json!("alice"));
    assert_eq!(claims["email"], json!("alice@example.com"));
    assert_eq!(claims["email_verified"], json!(true));
    assert_eq!(claims["groups"], json!(["eng"]));
    assert_eq!(claims["amr"], json!(["pwd", "otp"]));
    assert_eq!(claims["acr"], json!("mfa"));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let exp = claims["exp"].as_u64().unwrap();
    assert!(exp > now + 3000 && exp <= now + 3700, "id_token_ttl 3600: exp {exp}, now {now}");

    // Without the one-time code: a password login, visible in amr and acr.
    let (tokens, _) = code_flow(&provider, "bob", "bob-pw", None);
    let bob = jwt_claims(tokens["id_token"].as_str().unwrap());
    assert_eq!(bob["sub"], json!("sub-bob"));
    assert_eq!(bob["groups"], json!(["sales"]));
    assert_eq!(bob["amr"], json!(["pwd"]));
    assert_eq!(bob["acr"], json!("pwd"));

    // The proxy saw both tokens, as issued.
    assert_eq!(proxy.id_tokens(), vec![id_token.to_owned(), tokens["id_token"].as_str().unwrap().to_owned()]);
}

#[test]
fn the_test_provider_refuses_a_wrong_password_and_a_request_without_pkce() {
    let (provider, _proxy) = OidcProvider::start_behind_proxy();
    let discovery = provider.discovery();
    let auth = discovery["authorization_endpoint"].as_str().unwrap();
    let (redirect_uri, callback) = callback_listener();
    let (_, challenge) = pkce_pair();
    let url = format!(
        "{auth}?client_id=postern&response_type=code&scope=openid&redirect_uri={}&code_challenge={challenge}\
         &code_challenge_method=S256&nonce=n&state=s",
        enc(&redirect_uri)
    );
    let err = browser_login(&url, "alice", "not-alice-pw", None).unwrap_err();
    assert!(err.contains("Invalid login or password"), "{err}");
    assert!(callback.try_recv().is_err(), "a refused login reached the callback");

    let no_redirects = ureq::AgentBuilder::new().redirects(0).timeout(Duration::from_secs(10)).build();
    let without_pkce =
        format!("{auth}?client_id=postern&response_type=code&scope=openid&redirect_uri={}&state=s", enc(&redirect_uri));
    let response = no_redirects.get(&without_pkce).call().unwrap();
    let location = response.header("location").unwrap_or_default();
    assert!(
        location.starts_with(&redirect_uri) && location.contains("error=invalid_request") && location.contains("PKCE"),
        "{} {location}",
        response.status()
    );

    // The loopback port may vary (RFC 8252 7.3), the rest of the redirect URI may not.
    let other_path = redirect_uri.replace("/callback", "/elsewhere");
    let url = format!(
        "{auth}?client_id=postern&response_type=code&scope=openid&redirect_uri={}&code_challenge={challenge}\
         &code_challenge_method=S256&state=s",
        enc(&other_path)
    );
    match no_redirects.get(&url).call() {
        Err(ureq::Error::Status(400, r)) => {
            assert!(r.into_string().unwrap().contains("redirect_uri"), "400 without reason")
        }
        other => panic!("an unregistered redirect path was accepted: {other:?}"),
    }
}

#[test]
fn the_test_provider_runs_the_device_flow() {
    let (provider, _proxy) = OidcProvider::start_behind_proxy();
    let discovery = provider.discovery();
    let token_endpoint = discovery["token_endpoint"].as_str().unwrap();
    let (id, secret) = (provider.client_id(), provider.client_secret());
    let device = post_form(
        discovery["device_authorization_endpoint"].as_str().unwrap(),
        &id,
        &secret,
        &[("client_id", id.as_str()), ("scope", "openid email groups")],
    )
    .unwrap();
    let device_code = device["device_code"].as_str().unwrap();
    let uri_complete = device["verification_uri_complete"].as_str().unwrap();
    assert!(uri_complete.starts_with(&provider.issuer), "{device}");
    let poll = || {
        post_form(
            token_endpoint,
            &id,
            &secret,
            &[("grant_type", "urn:ietf:params:oauth:grant-type:device_code"), ("device_code", device_code)],
        )
    };
    let pending = poll().unwrap_err();
    assert_eq!(pending.1["error"], json!("authorization_pending"), "{pending:?}");

    device_login(uri_complete, "carol", "carol-pw", None).unwrap_or_else(|e| panic!("{e}\n{}", provider.log_text()));

    // The provider rate-limits polling (slow_down inside `interval`); poll as a client would.
    let interval = Duration::from_secs(device["interval"].as_u64().unwrap_or(5));
    let deadline = Instant::now() + Duration::from_secs(30);
    let tokens = loop {
        match poll() {
            Ok(tokens) => break tokens,
            Err((_, e)) if e["error"] == "authorization_pending" || e["error"] == "slow_down" => {
                assert!(Instant::now() < deadline, "no token 30 s after the device login");
                std::thread::sleep(interval);
            }
            Err(e) => panic!("device token request refused: {e:?}"),
        }
    };
    let id_token = tokens["id_token"].as_str().unwrap();
    assert!(signature_verifies(&discovery, id_token));
    let claims = jwt_claims(id_token);
    assert_eq!(claims["sub"], json!("sub-carol"));
    assert_eq!(claims["email"], json!("carol@elsewhere.test"));
    assert_eq!(claims["groups"], json!(["eng"]));
    assert_eq!(claims["amr"], json!(["pwd"]));
    assert_eq!(claims["aud"], json!("postern"));
}

#[test]
fn the_test_provider_proxy_tampers_with_id_tokens_on_demand() {
    let (provider, proxy) = OidcProvider::start_behind_proxy();
    let discovery = provider.discovery();
    let issued = |proxy: &OidcProxy| proxy.id_tokens().last().unwrap().clone();

    proxy.set_mode(ProxyMode::TamperIdToken);
    let (tokens, _) = code_flow(&provider, "bob", "bob-pw", None);
    let received = tokens["id_token"].as_str().unwrap();
    let real = issued(&proxy);
    assert_ne!(received, real);
    assert_eq!(jwt_claims(received), jwt_claims(&real), "only the signature changes");
    assert!(signature_verifies(&discovery, &real));
    assert!(!signature_verifies(&discovery, received), "the tampered signature verifies");

    proxy.set_mode(ProxyMode::TamperIdTokenPayload);
    let (tokens, _) = code_flow(&provider, "bob", "bob-pw", None);
    let received = tokens["id_token"].as_str().unwrap();
    let real = issued(&proxy);
    assert_eq!(jwt_claims(received)["email"], json!("mallory@example.com"));
    assert_eq!(received.rsplit('.').next(), real.rsplit('.').next(), "the signature is kept");
    assert_eq!(received, tamper_jwt_payload(&real));
    assert!(!signature_verifies(&discovery, received));

    let earlier = proxy.id_tokens()[0].clone();
    proxy.set_mode(ProxyMode::ReplaceIdToken(earlier.clone()));
    let (tokens, nonce) = code_flow(&provider, "alice", "alice-pw", None);
    assert_eq!(tokens["id_token"], json!(earlier));
    assert_ne!(jwt_claims(&earlier)["nonce"], json!(nonce));

    proxy.set_mode(ProxyMode::Pass);
    let (tokens, nonce) = code_flow(&provider, "alice", "alice-pw", None);
    let received = tokens["id_token"].as_str().unwrap();
    assert_eq!(received, issued(&proxy));
    assert_eq!(jwt_claims(received)["nonce"], json!(nonce));
    assert!(signature_verifies(&discovery, received));
}

#[test]
fn the_test_provider_stops_cleanly() {
    let mut provider = OidcProvider::start();
    assert_eq!(provider.issuer, format!("http://127.0.0.1:{}", provider.port));
    assert_eq!(provider.discovery()["issuer"], json!(provider.issuer));
    provider.stop();
}

// ---------------------------------------------------------------------------------------
// The gateway's single sign-on, end to end: `postern login` against the real provider,
// then plain ssh/scp and the postern client with the certificate it got.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use postern_e2e::{Agent, Gateway, bin, free_tcp_port, open_browser_script, text, wait_until};

/// A gateway signing in at `provider` (through the test proxy's URL as the issuer), one
/// agent `web-01`, and a policy: group `eng` may run sessions on `web-*`; `db-*` needs MFA.
struct Sso {
    gw: Gateway,
    _agent: Agent,
    _secret_dir: tempfile::TempDir,
}

fn sso_gateway(issuer: &str, extra_oidc: &str) -> Sso {
    sso_gateway_with_ttl(issuer, "1h", extra_oidc)
}

fn sso_gateway_with_ttl(issuer: &str, cert_ttl: &str, extra_oidc: &str) -> Sso {
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("oidc-secret");
    std::fs::write(&secret, "postern-test-secret\n").unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(&mut std::fs::metadata(&secret).unwrap().permissions(), 0o600);
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let gw = Gateway::start(&format!(
        "[identity]\ncert_ttl = \"{cert_ttl}\"\n[identity.oidc]\nissuer = \"{issuer}\"\nclient_id = \"postern\"\n\
         client_secret_file = \"{}\"\nscopes = [\"openid\", \"email\", \"profile\", \"groups\"]\n{extra_oidc}",
        secret.display()
    ));
    let agent = Agent::start(&gw, "web-01", vec![], &gw.listen);
    let policy = gw.dir.path().join("eng.toml");
    std::fs::write(
        &policy,
        "name = \"eng\"\n[[statement]]\nsid = \"eng-web\"\neffect = \"allow\"\ngroups = [\"eng\"]\n\
         actions = [\"shell\", \"exec\", \"sftp\"]\ninstances = [\"web-*\"]\nallow_root = true\n",
    )
    .unwrap();
    let out = gw.postern(&["policy", "apply", policy.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    Sso { gw, _agent: agent, _secret_dir: secret_dir }
}

/// One person's laptop: a home directory, and the gateway's host CA trusted there.
struct Laptop {
    home: tempfile::TempDir,
    known_hosts: PathBuf,
}

impl Laptop {
    fn new(gw: &Gateway) -> Laptop {
        let home = tempfile::tempdir().unwrap();
        let known_hosts = home.path().join("trusted_hosts");
        gw.write_known_hosts(&known_hosts);
        Laptop { home, known_hosts }
    }

    fn postern(&self, gw: &Gateway, args: &[&str], login: Option<(&str, &str, Option<&str>)>) -> Output {
        let mut cmd = Command::new("timeout");
        cmd.arg("120").arg(bin("postern")).args(args);
        cmd.arg("--gateway").arg(format!("127.0.0.1:{}", gw.ssh_port));
        cmd.arg("--known-hosts").arg(&self.known_hosts);
        cmd.env("HOME", self.home.path()).env_remove("SSH_AUTH_SOCK").env_remove("POSTERN_GATEWAY");
        cmd.env("BROWSER", open_browser_script());
        if let Some((who, password, otp)) = login {
            cmd.env("POSTERN_TEST_OIDC_LOGIN", who).env("POSTERN_TEST_OIDC_PASSWORD", password);
            if let Some(otp) = otp {
                cmd.env("POSTERN_TEST_OIDC_OTP", otp);
            }
        }
        cmd.stdin(Stdio::null()).output().unwrap()
    }

    fn login(&self, gw: &Gateway, who: &str, password: &str, otp: Option<&str>) -> Output {
        self.postern(gw, &["login"], Some((who, password, otp)))
    }

    /// Plain OpenSSH with the config `postern login` installed.
    fn ssh(&self) -> Command {
        let mut cmd = Command::new("timeout");
        cmd.args(["60", "ssh", "-F"]).arg(self.home.path().join(".ssh/config"));
        cmd.args(["-o", "BatchMode=yes"]).env("HOME", self.home.path()).env_remove("SSH_AUTH_SOCK");
        cmd
    }

    fn key(&self, gw: &Gateway) -> PathBuf {
        self.home.path().join(format!(".ssh/postern/login-127.0.0.1_{}", gw.ssh_port))
    }
}

fn find_event(gw: &Gateway, name: &str, matches: impl Fn(&Value) -> bool) -> Option<Value> {
    gw.audit_events().into_iter().find(|e| e["event"] == name && matches(e))
}

fn wait_event(gw: &Gateway, name: &str, matches: impl Fn(&Value) -> bool) -> Value {
    let mut found = None;
    wait_until(name, Duration::from_secs(10), || {
        found = find_event(gw, name, &matches);
        found.is_some()
    });
    found.unwrap()
}

#[test]
fn alice_signs_in_and_reaches_her_instances_with_plain_ssh_and_scp_with_no_key_registered() {
    let (_provider, proxy) = OidcProvider::start_behind_proxy();
    let s = sso_gateway(&proxy.url, "");
    let gw = &s.gw;
    let alice = Laptop::new(gw);

    // Nobody registered alice; the browser signs her in at the provider.
    let out = alice.login(gw, "alice", "alice-pw", None);
    assert!(out.status.success(), "postern login: {}{}", text(&out.stdout), text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains("Signed in as alice (groups: eng)"), "{said}");
    assert!(text(&out.stderr).contains("open this address in a browser"), "{}", text(&out.stderr));
    let key = alice.key(gw);
    let cert = PathBuf::from(format!("{}-cert.pub", key.display()));
    assert!(cert.is_file() && key.is_file());
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o077, 0, "the key is private");
    let shown = text(&Command::new("ssh-keygen").arg("-L").arg("-f").arg(&cert).output().unwrap().stdout);
    assert!(shown.contains("postern:alice:") && shown.contains("idp-subject@postern"), "{shown}");

    // The gateway made her a user from the IdP, in her IdP group.
    let users = text(&gw.postern(&["user", "list", "--json"]).stdout);
    let users: Value = serde_json::from_str(&users).unwrap();
    let row = users.as_array().unwrap().iter().find(|u| u["name"] == "alice").expect("alice was created");
    assert_eq!(row["groups"], json!(["eng"]), "{row}");

    // Plain ssh and scp with the installed config, no key of hers anywhere else.
    let out = alice.ssh().args(["alice@web-01.postern", "echo sso-ok"]).output().unwrap();
    assert_eq!(text(&out.stdout), "sso-ok\n", "{}", text(&out.stderr));
    let local = alice.home.path().join("up.txt");
    std::fs::write(&local, "through sso\n").unwrap();
    let remote = format!("/tmp/postern-sso-{}.txt", gw.ssh_port);
    let out = Command::new("timeout")
        .args(["60", "scp", "-F"])
        .arg(alice.home.path().join(".ssh/config"))
        .args(["-o", "BatchMode=yes"])
        .arg(&local)
        .arg(format!("alice@web-01.postern:{remote}"))
        .env("HOME", alice.home.path())
        .env_remove("SSH_AUTH_SOCK")
        .output()
        .unwrap();
    assert!(out.status.success(), "scp: {}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(&remote).unwrap(), "through sso\n");
    let _ = std::fs::remove_file(&remote);
    // The postern client uses the certificate by itself.
    let out = alice.postern(gw, &["ls", "--json"], None);
    assert!(out.status.success() && text(&out.stdout).contains("web-01"), "{}", text(&out.stderr));
    let out = alice.postern(gw, &["whoami"], None);
    let me = text(&out.stdout);
    assert!(me.contains("user:   alice") && me.contains("groups: eng") && me.contains("certificate: serial"), "{me}");

    // Audited: the sign-in with her IdP subject and the certificate, and the session with its serial.
    let login = wait_event(gw, "login.succeeded", |e| e["user"] == "alice");
    assert_eq!(login["groups"], json!(["eng"]));
    assert_eq!(login["flow"], "browser");
    assert!(login["idp_subject"].as_str().unwrap().ends_with(" sub-alice"), "{login}");
    let serial = login["cert_serial"].as_str().unwrap().to_owned();
    wait_event(gw, "session.start", |e| e["user"] == "alice" && e["cert_serial"] == serial.as_str());

    // bob signs in too, but his group (sales) is given nothing.
    let bob = Laptop::new(gw);
    let out = bob.login(gw, "bob", "bob-pw", None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("Signed in as bob (groups: sales)"), "{}", text(&out.stdout));
    let out = bob.postern(gw, &["ls", "--json"], None);
    assert_eq!(text(&out.stdout).trim(), "[]", "{}", text(&out.stderr));
    let out = bob.ssh().args(["bob@web-01.postern", "echo no"]).output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("access denied"), "{}", text(&out.stderr));

    // bob signs out: the certificate is revoked at the gateway and removed.
    let bob_cert = std::fs::read_to_string(format!("{}-cert.pub", bob.key(gw).display())).unwrap();
    let bob_key = std::fs::read(bob.key(gw)).unwrap();
    let out = bob.postern(gw, &["logout"], None);
    assert!(out.status.success() && text(&out.stdout).contains("revoked"), "{}", text(&out.stderr));
    assert!(!bob.key(gw).exists());
    wait_event(gw, "logout", |e| e["user"] == "bob");
    // The revoked certificate, put back in place, no longer gets in.
    std::fs::write(format!("{}-cert.pub", bob.key(gw).display()), &bob_cert).unwrap();
    std::fs::write(bob.key(gw), &bob_key).unwrap();
    std::fs::set_permissions(bob.key(gw), std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = bob.postern(gw, &["whoami", "--user", "bob", "-i", bob.key(gw).to_str().unwrap()], None);
    assert!(!out.status.success(), "a revoked certificate still got in: {}", text(&out.stdout));

    // alice is disabled while a session of hers runs: it ends, and her unexpired
    // certificate is refused.
    let mut live = alice.ssh().args(["alice@web-01.postern", "sleep 60"]).stdout(Stdio::null()).spawn().unwrap();
    wait_event(gw, "session.start", |e| e["user"] == "alice" && e["command"] == "sleep 60");
    let out = gw.postern(&["user", "disable", "alice"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let took = wait_until("alice's live session to end", Duration::from_secs(5), || live.try_wait().unwrap().is_some());
    assert!(took < Duration::from_secs(5));
    let out = alice.ssh().args(["alice@web-01.postern", "echo no"]).output().unwrap();
    assert_ne!(out.status.code(), Some(0), "a disabled user's certificate still worked");
    // Signing in again is refused too, and says why.
    let out = alice.login(gw, "alice", "alice-pw", None);
    assert!(!out.status.success() && text(&out.stderr).contains("is disabled"), "{}", text(&out.stderr));
    let failed = wait_event(gw, "login.failed", |e| e["user"] == "alice");
    assert_eq!(failed["reason"], "user_disabled");
}

use std::os::unix::fs::PermissionsExt;

#[test]
fn forged_replayed_and_misdirected_id_tokens_are_refused_with_clear_errors() {
    let (_provider, proxy) = OidcProvider::start_behind_proxy();
    let s = sso_gateway(&proxy.url, "");
    let gw = &s.gw;
    let laptop = Laptop::new(gw);
    // A good sign-in first, whose real token is replayed below.
    let out = laptop.login(gw, "alice", "alice-pw", None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let earlier = proxy.id_tokens().last().cloned().expect("the proxy saw the ID token");
    for (mode, expect, reason) in [
        (ProxyMode::TamperIdToken, "signature", "bad_signature"),
        (ProxyMode::TamperIdTokenPayload, "signature", "bad_signature"),
        // A real token of the provider's, from another sign-in: its nonce is not this one's.
        (ProxyMode::ReplaceIdToken(earlier.clone()), "nonce", "nonce_mismatch"),
    ] {
        proxy.set_mode(mode);
        let out = laptop.login(gw, "alice", "alice-pw", None);
        assert!(!out.status.success(), "a forged token was accepted ({reason})");
        let err = text(&out.stderr).to_lowercase();
        assert!(err.contains(expect), "{reason}: {err}");
        wait_event(gw, "login.failed", |e| e["reason"] == reason);
    }
    proxy.set_mode(ProxyMode::Pass);
    let out = laptop.login(gw, "alice", "alice-pw", None);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn require_mfa_refuses_a_sign_in_without_a_second_factor_and_policy_can_demand_one() {
    let (_provider, proxy) = OidcProvider::start_behind_proxy();
    let s = sso_gateway(&proxy.url, "require_mfa = true\n");
    let gw = &s.gw;
    let laptop = Laptop::new(gw);
    let out = laptop.login(gw, "alice", "alice-pw", None);
    assert!(!out.status.success(), "a sign-in without MFA was accepted");
    assert!(text(&out.stderr).to_lowercase().contains("mfa"), "{}", text(&out.stderr));
    wait_event(gw, "login.failed", |e| e["reason"] == "mfa_required");
    let out = laptop.login(gw, "alice", "alice-pw", Some("424242"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("with MFA"), "{}", text(&out.stdout));
    let me = text(&laptop.postern(gw, &["whoami"], None).stdout);
    assert!(me.contains("with MFA"), "{me}");
    let login = wait_event(gw, "login.succeeded", |e| e["user"] == "alice");
    assert_eq!(login["mfa"], true);
    assert!(login["amr"].as_array().unwrap().iter().any(|a| a == "otp"), "{login}");
}

#[test]
fn the_device_flow_signs_in_a_machine_without_a_browser_and_policy_require_mfa_holds_at_session_start() {
    let (_provider, proxy) = OidcProvider::start_behind_proxy();
    let s = sso_gateway(&proxy.url, "");
    let gw = &s.gw;
    // web-* with MFA only, for group eng, beside the plain statement for the rest: a
    // statement with require_mfa applies only to sessions whose login had a second factor.
    let policy = gw.dir.path().join("mfa.toml");
    std::fs::write(
        &policy,
        "name = \"eng\"\n[[statement]]\nsid = \"eng-web-mfa\"\neffect = \"allow\"\ngroups = [\"eng\"]\n\
         actions = [\"exec\"]\ninstances = [\"web-*\"]\nallow_root = true\nrequire_mfa = true\n",
    )
    .unwrap();
    assert!(gw.postern(&["policy", "apply", policy.to_str().unwrap()]).status.success());
    let laptop = Laptop::new(gw);
    let mut child = Command::new("timeout")
        .arg("120")
        .arg(bin("postern"))
        .args(["login", "--device", "--gateway", &format!("127.0.0.1:{}", gw.ssh_port), "--known-hosts"])
        .arg(&laptop.known_hosts)
        .env("HOME", laptop.home.path())
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The prompt names the address to open; the person approves there, over HTTP.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut uri = None;
    let mut seen = String::new();
    for _ in 0..20 {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            break;
        }
        seen.push_str(&line);
        if let Some(u) = line.trim().strip_prefix("(or open ").and_then(|u| u.strip_suffix(')')) {
            uri = Some(u.to_owned());
            break;
        }
    }
    let uri = uri.unwrap_or_else(|| panic!("no device address in: {seen}"));
    device_login(&uri, "alice", "alice-pw", None).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("Signed in as alice"), "{}", text(&out.stdout));
    wait_event(gw, "login.succeeded", |e| e["user"] == "alice" && e["flow"] == "device");
    // Without MFA, the require_mfa statement does not apply: exec is refused...
    let out = laptop.ssh().args(["alice@web-01.postern", "echo no"]).output().unwrap();
    assert_ne!(out.status.code(), Some(0), "require_mfa let a login without MFA in");
    // ... and explain says why, and what MFA would change.
    let out = gw.postern(&["explain", "--user", "alice", "--target", "web-01", "--action", "exec"]);
    assert!(text(&out.stdout).contains("requires MFA"), "{}", text(&out.stdout));
    let out = gw.postern(&["explain", "--user", "alice", "--target", "web-01", "--action", "exec", "--mfa"]);
    assert!(out.status.success() && text(&out.stdout).contains("ALLOW"), "{}", text(&out.stdout));
}

#[test]
fn an_id_token_issued_to_another_client_is_refused_as_the_wrong_audience() {
    let (provider, proxy) = OidcProvider::start_behind_proxy();
    let s = sso_gateway(&proxy.url, "");
    let gw = &s.gw;
    // A real token of the provider's, signed with its key, for the client `other`.
    let (tokens, _) = code_flow_as(
        &provider,
        (&provider.other_client_id(), &provider.other_client_secret()),
        "alice",
        "alice-pw",
        None,
    );
    let other = tokens["id_token"].as_str().unwrap().to_owned();
    assert_eq!(jwt_claims(&other)["aud"], "other");
    proxy.set_mode(ProxyMode::ReplaceIdToken(other));
    let laptop = Laptop::new(gw);
    let out = laptop.login(gw, "alice", "alice-pw", None);
    assert!(!out.status.success(), "a token for another client was accepted");
    assert!(text(&out.stderr).contains("audience"), "{}", text(&out.stderr));
    wait_event(gw, "login.failed", |e| e["reason"] == "wrong_audience");
    assert!(!laptop.key(gw).exists(), "a refused sign-in left a key behind");
}

#[test]
fn an_expired_id_token_is_refused() {
    let mut config = OidcProvider::default_config();
    config["id_token_ttl"] = json!(1);
    let (_provider, proxy) = OidcProvider::start_behind_proxy_with(config);
    let s = sso_gateway(&proxy.url, "");
    let gw = &s.gw;
    let laptop = Laptop::new(gw);
    let out = laptop.login(gw, "alice", "alice-pw", None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = proxy.id_tokens().last().cloned().unwrap();
    // The gateway allows 60 s of clock skew past `exp`: wait until the token is past that.
    let exp = jwt_claims(&token)["exp"].as_i64().unwrap();
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let left = (exp + 61 - now()).max(0);
    std::thread::sleep(Duration::from_secs(left as u64));
    proxy.set_mode(ProxyMode::ReplaceIdToken(token));
    let out = laptop.login(gw, "alice", "alice-pw", None);
    assert!(!out.status.success(), "an expired token was accepted");
    assert!(text(&out.stderr).contains("expired"), "{}", text(&out.stderr));
    wait_event(gw, "login.failed", |e| e["reason"] == "expired");
}

/// The sign-in connection driven with plain OpenSSH (one master connection, commands
/// multiplexed over it): a code is redeemed once, and a flow is finished only on the
/// connection that began it.
#[test]
fn a_replayed_code_and_a_flow_finished_on_another_connection_are_refused() {
    let (provider, proxy) = OidcProvider::start_behind_proxy();
    let s = sso_gateway(&proxy.url, "");
    let gw = &s.gw;
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("kh");
    gw.write_known_hosts(&kh);
    let ctl = dir.path().join("ctl");
    let ssh = |extra: &[&str], command: Option<&str>| {
        let mut c = Command::new("timeout");
        c.args(["60", "ssh", "-p", &gw.ssh_port.to_string(), "-l", "postern:login", "-o", "BatchMode=yes", "-o"])
            .arg(format!("UserKnownHostsFile={}", kh.display()))
            .args(extra)
            .arg("127.0.0.1");
        if let Some(cmd) = command {
            c.arg(cmd);
        }
        c.stdin(Stdio::null()).output().unwrap()
    };
    let master = ["-S", ctl.to_str().unwrap()];
    let out = ssh(&["-M", "-S", ctl.to_str().unwrap(), "-f", "-N", "-o", "ControlPersist=60"], None);
    assert!(out.status.success(), "sign-in connection: {}", text(&out.stderr));
    let key = dir.path().join("k");
    assert!(
        Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key).status().unwrap().success()
    );
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap().trim().to_owned();
    let (redirect_uri, callback) = callback_listener();
    let begin = |over: &[&str]| -> Value {
        let out = ssh(over, Some(&format!("login-begin {}", json!({"redirect_uri": redirect_uri}))));
        assert!(out.status.success(), "login-begin: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let finish = |over: &[&str], state: &str, code: &str| {
        ssh(over, Some(&format!("login-finish {}", json!({"state": state, "code": code, "public_key": public}))))
    };
    // A sign-in the ordinary way, over the master connection.
    let started = begin(&master);
    browser_login(started["authorization_url"].as_str().unwrap(), "alice", "alice-pw", None).unwrap();
    let query = callback.recv_timeout(Duration::from_secs(10)).unwrap();
    let code = query_param(&query, "code").unwrap();
    let out = finish(&master, started["state"].as_str().unwrap(), &code);
    assert!(out.status.success(), "login-finish: {}", text(&out.stderr));
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["user"], "alice");
    assert!(result["certificate"].as_str().unwrap().starts_with("ssh-ed25519-cert-v01@openssh.com "));
    // The same state again: that flow is finished.
    let out = finish(&master, started["state"].as_str().unwrap(), &code);
    assert!(!out.status.success() && text(&out.stderr).contains("no sign-in with that state"), "{}", text(&out.stderr));
    // The same code for a new flow: the provider redeems a code once.
    let again = begin(&master);
    let out = finish(&master, again["state"].as_str().unwrap(), &code);
    assert!(!out.status.success(), "a replayed code was redeemed again");
    wait_event(gw, "login.failed", |e| e["reason"] == "code_rejected");
    // A flow begun on the master connection cannot be finished on another connection.
    let third = begin(&master);
    let out = finish(&[], third["state"].as_str().unwrap(), "whatever");
    assert!(!out.status.success() && text(&out.stderr).contains("no sign-in with that state"), "{}", text(&out.stderr));
    // Nothing else runs on a sign-in connection.
    let out = ssh(&master, Some("ls"));
    assert!(!out.status.success() && text(&out.stderr).contains("for `postern login` only"), "{}", text(&out.stderr));
    let out = ssh(&["-W", "127.0.0.1:22"], None);
    assert!(!out.status.success(), "a forward from a sign-in connection was opened");
    // At most four sign-in commands at once on one connection: four device sign-ins wait for
    // their person, a fifth is turned away (on a connection of the client SDK's).
    let device = format!("login-device {}", json!({"public_key": public}));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut opts = postern_client::ClientOptions::new(&format!("127.0.0.1:{}", gw.ssh_port), "postern:login");
        opts.known_hosts = vec![kh.clone()];
        let client = postern_client::Client::connect_sign_in(&opts).await.unwrap();
        let mut waiting = Vec::new();
        for _ in 0..4 {
            let mut ch = client.session_channel().await.unwrap();
            ch.exec(true, device.as_bytes()).await.unwrap();
            // Each gets its prompt: it is running, waiting for its person.
            loop {
                match tokio::time::timeout(Duration::from_secs(20), ch.wait()).await.expect("a device prompt") {
                    Some(russh::ChannelMsg::Data { data }) => {
                        assert!(String::from_utf8_lossy(&data).contains("user_code"));
                        break;
                    }
                    Some(_) => {}
                    None => panic!("the device sign-in ended early"),
                }
            }
            waiting.push(ch);
        }
        assert!(client.session_channel().await.is_err(), "a fifth sign-in command was let in");
        // One ends: its place comes back.
        let first = waiting.remove(0);
        first.close().await.unwrap();
        drop(first);
        wait_until_async(|| async { client.session_channel().await.is_ok() }).await;
    });
    let _ = ssh(&["-S", ctl.to_str().unwrap(), "-O", "exit"], None);
    // Only the sign-in user gets in without a key: alice with none is refused.
    let out = Command::new("timeout")
        .args(["30", "ssh", "-p", &gw.ssh_port.to_string(), "-l", "alice", "-o", "BatchMode=yes"])
        .args(["-o", "PubkeyAuthentication=no", "-o"])
        .arg(format!("UserKnownHostsFile={}", kh.display()))
        .args(["127.0.0.1", "whoami"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255), "alice got in without a key: {}", text(&out.stdout));
    assert!(text(&out.stderr).contains("Permission denied"), "{}", text(&out.stderr));
    drop(provider);
}

/// Poll `ok` until it is true, for at most 10 s.
async fn wait_until_async<F, Fut>(mut ok: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok().await {
        assert!(Instant::now() < deadline, "not within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn a_sign_in_certificate_expires_and_ssh_is_then_refused() {
    let (_provider, proxy) = OidcProvider::start_behind_proxy();
    let s = sso_gateway_with_ttl(&proxy.url, "8s", "");
    let gw = &s.gw;
    let laptop = Laptop::new(gw);
    let out = laptop.login(gw, "alice", "alice-pw", None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = laptop.ssh().args(["alice@web-01.postern", "echo ok"]).output().unwrap();
    assert_eq!(text(&out.stdout), "ok\n", "{}", text(&out.stderr));
    // Once it has expired, OpenSSH's offer is refused by the gateway; postern no longer uses it.
    wait_until("the certificate to be refused", Duration::from_secs(30), || {
        laptop.ssh().args(["alice@web-01.postern", "echo ok"]).output().unwrap().status.code() != Some(0)
    });
    let out = laptop.postern(gw, &["whoami"], None);
    assert!(!out.status.success(), "whoami with an expired certificate: {}", text(&out.stdout));
}

/// The web console signs a browser in through the identity provider: the user is made from
/// the IdP as for `postern login`, the browser lands on the instances page, and a return
/// the browser did not begin (no binding cookie, a forged state) is refused and audited.
#[test]
fn the_web_console_signs_in_through_the_identity_provider() {
    let web_port = free_tcp_port();
    let origin = format!("https://127.0.0.1:{web_port}");
    let mut config = OidcProvider::default_config();
    // The console's return address is an https URL, so the client is a web client here
    // (oidc-provider holds native clients to loopback http and claimed https URIs).
    config["clients"][0]["redirect_uris"] = json!([format!("{origin}/signin/oidc")]);
    config["clients"][0]["application_type"] = json!("web");
    let provider = OidcProvider::start_with(config);
    let sso = sso_gateway(&provider.issuer, &format!("\n[web]\nenabled = true\nlisten = \"127.0.0.1:{web_port}\"\n"));
    let seen = postern_e2e::console_idp_login(&origin, "alice", "alice-pw").unwrap();
    assert_eq!(seen["landed"], format!("{origin}/"), "{seen}");
    assert_eq!(seen["user"], "alice", "{seen}");
    assert!(seen["text"].as_str().unwrap().contains("web-01"), "eng may reach web-01: {seen}");
    let signin = wait_event(&sso.gw, "web.signin", |e| e["user"] == "alice");
    assert_eq!(signin["via"], "oidc");
    // The user came from the identity provider, with its groups.
    let users = text(&sso.gw.postern(&["user", "list", "--json"]).stdout);
    assert!(users.contains("\"alice\"") && users.contains("\"eng\""), "{users}");

    // A return this browser did not begin: refused, audited, nobody signed in.
    let out = std::process::Command::new("curl")
        .args(["-sS", "-i", "--max-time", "10", "--cacert"])
        .arg(sso.gw.data_dir().join("ca.crt"))
        .arg(format!("{origin}/signin/oidc?code=forged&state=forged"))
        .output()
        .unwrap();
    let page = text(&out.stdout);
    assert!(
        page.starts_with("HTTP/1.1 403") && !page.to_ascii_lowercase().contains("set-cookie: postern_session"),
        "{page}"
    );
    let failed = wait_event(&sso.gw, "login.failed", |e| e["flow"] == "web");
    assert_eq!(failed["reason"], "no_pending_login", "{failed}");
}
