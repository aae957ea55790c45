//! Single sign-on fixtures: a real OpenID Provider (node's oidc-provider, `tests/oidc`), the
//! browser and device-flow drivers that sign in at it, and a reverse proxy in front of it
//! that can tamper with ID tokens on their way out of the token endpoint.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use crate::{Proc, text};

/// The client `postern login` uses in the default configuration.
pub const OIDC_CLIENT_ID: &str = "postern";
pub const OIDC_CLIENT_SECRET: &str = "postern-test-secret";
/// A second client of the same provider: its tokens have the wrong audience for `postern`.
pub const OIDC_OTHER_CLIENT_ID: &str = "other";
pub const OIDC_OTHER_CLIENT_SECRET: &str = "other-test-secret";

/// Bound on the provider's start-up (node loading oidc-provider and making an RSA key).
const PROVIDER_START: Duration = Duration::from_secs(30);
/// Bound on one browser or device-flow login, above the scripts' own 30 s deadline.
const LOGIN_BOUND_SECS: &str = "60";

/// `tests/oidc`, the node project with the provider and the drivers.
pub fn oidc_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("oidc");
    assert!(
        dir.join("node_modules/oidc-provider").exists() && dir.join("node_modules/playwright-core").exists(),
        "{}/node_modules is missing: run `npm ci` there (tests/run.sh does)",
        dir.display()
    );
    dir
}

/// `tests/oidc/open-browser.sh`, a `$BROWSER` for `postern login` that signs in with headless
/// Chromium as `POSTERN_TEST_OIDC_LOGIN` / `_PASSWORD` / `_OTP` (see tests/oidc/README.md).
pub fn open_browser_script() -> PathBuf {
    oidc_dir().join("open-browser.sh")
}

/// A running oidc-provider on 127.0.0.1 (killed on drop). See tests/oidc/provider.mjs.
pub struct OidcProvider {
    /// The issuer: `http://127.0.0.1:<port>`, or the proxy's URL when behind an [`OidcProxy`].
    pub issuer: String,
    /// The port the provider itself listens on.
    pub port: u16,
    /// The configuration it was started with (as written to `config.json`).
    pub config: Value,
    pub dir: tempfile::TempDir,
    proc: Option<Proc>,
}

impl OidcProvider {
    /// Clients `postern` and `other` (native, loopback redirect `http://127.0.0.1/callback`
    /// with any port, code and device flows, client_secret_basic) and users alice
    /// (group eng, one-time code 424242), bob (sales) and carol (eng, another mail domain).
    pub fn default_config() -> Value {
        let client = |id: &str, secret: &str| {
            json!({
                "client_id": id,
                "client_secret": secret,
                "redirect_uris": ["http://127.0.0.1/callback"],
                "application_type": "native",
                "grant_types": ["authorization_code", "urn:ietf:params:oauth:grant-type:device_code"],
                "response_types": ["code"],
                "token_endpoint_auth_method": "client_secret_basic",
            })
        };
        json!({
            "port": 0,
            "clients": [client(OIDC_CLIENT_ID, OIDC_CLIENT_SECRET), client(OIDC_OTHER_CLIENT_ID, OIDC_OTHER_CLIENT_SECRET)],
            "users": {
                "alice": {"password": "alice-pw", "email": "alice@example.com", "email_verified": true, "groups": ["eng"], "otp": "424242"},
                "bob": {"password": "bob-pw", "email": "bob@example.com", "email_verified": true, "groups": ["sales"]},
                "carol": {"password": "carol-pw", "email": "carol@elsewhere.test", "email_verified": true, "groups": ["eng"]},
            },
            "id_token_ttl": 3600,
        })
    }

    pub fn start() -> OidcProvider {
        OidcProvider::start_with(OidcProvider::default_config())
    }

    /// Start with `config` (the keys are described in tests/oidc/provider.mjs); waits for
    /// the provider's `ready <port>` line.
    pub fn start_with(config: Value) -> OidcProvider {
        let script = oidc_dir().join("provider.mjs");
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("config.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        let log = dir.path().join("provider.log");
        let mut child = Command::new("node")
            .arg(&script)
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("node (apt-get install nodejs, or see tests/run.sh)");
        let stdout = child.stdout.take().unwrap();
        let proc = Proc { child, log: log.clone() };
        // The first stdout line is `ready <port>`; anything after it goes to the log.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().and_then(Result::ok);
            let _ = tx.send(first);
            if let Ok(mut log) = std::fs::OpenOptions::new().append(true).open(&log) {
                for line in lines.map_while(Result::ok) {
                    let _ = writeln!(log, "stdout: {line}");
                }
            }
        });
        let line = match rx.recv_timeout(PROVIDER_START) {
            Ok(Some(line)) => line,
            Ok(None) => panic!("the OpenID Provider exited before it was ready:\n{}", proc.log_text()),
            Err(_) => panic!("the OpenID Provider was not ready within {PROVIDER_START:?}:\n{}", proc.log_text()),
        };
        let port: u16 = line
            .strip_prefix("ready ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from the OpenID Provider: {line:?}\n{}", proc.log_text()));
        let issuer = match config.get("issuer").and_then(Value::as_str) {
            Some(issuer) if !issuer.is_empty() => issuer.to_owned(),
            _ => format!("http://127.0.0.1:{port}"),
        };
        OidcProvider { issuer, port, config, dir, proc: Some(proc) }
    }

    /// The default configuration behind an [`OidcProxy`]: the proxy's URL is the issuer.
    pub fn start_behind_proxy() -> (OidcProvider, OidcProxy) {
        OidcProvider::start_behind_proxy_with(OidcProvider::default_config())
    }

    /// `config` (its `issuer` replaced by the proxy's URL) behind an [`OidcProxy`].
    pub fn start_behind_proxy_with(mut config: Value) -> (OidcProvider, OidcProxy) {
        let proxy = OidcProxy::bind();
        config["issuer"] = Value::String(proxy.url.clone());
        let provider = OidcProvider::start_with(config);
        let token_endpoint = provider.discovery_at(&provider.url())["token_endpoint"].as_str().unwrap().to_owned();
        let token_path = path_of(&token_endpoint);
        proxy.connect(provider.port, &token_path);
        (provider, proxy)
    }

    /// The provider's own address, `http://127.0.0.1:<port>` (not the issuer when proxied).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn client(&self, i: usize, key: &str) -> String {
        self.config["clients"][i][key].as_str().unwrap().to_owned()
    }
    /// The first configured client's id (`postern` by default).
    pub fn client_id(&self) -> String {
        self.client(0, "client_id")
    }
    pub fn client_secret(&self) -> String {
        self.client(0, "client_secret")
    }
    /// The second configured client's id (`other` by default).
    pub fn other_client_id(&self) -> String {
        self.client(1, "client_id")
    }
    pub fn other_client_secret(&self) -> String {
        self.client(1, "client_secret")
    }

    /// The discovery document, fetched through the issuer's URL.
    pub fn discovery(&self) -> Value {
        self.discovery_at(&self.issuer)
    }

    fn discovery_at(&self, base: &str) -> Value {
        let url = format!("{base}/.well-known/openid-configuration");
        let body = ureq::get(&url)
            .timeout(Duration::from_secs(10))
            .call()
            .unwrap_or_else(|e| panic!("GET {url}: {e}\n{}", self.log_text()))
            .into_string()
            .unwrap();
        serde_json::from_str(&body).unwrap()
    }

    /// The provider's stderr: one line per request, and why requests were refused.
    pub fn log_text(&self) -> String {
        self.proc.as_ref().map(Proc::log_text).unwrap_or_default()
    }

    /// SIGTERM, and a clean exit within 10 s.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.signal(nix::sys::signal::Signal::SIGTERM);
            let code = p.wait_exit(Duration::from_secs(10));
            assert_eq!(code, Some(0), "the OpenID Provider did not stop cleanly:\n{}", p.log_text());
        }
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        drop(self.proc.take());
        if std::env::var_os("POSTERN_KEEP_TEST_DIRS").is_some()
            && let Ok(replacement) = tempfile::tempdir()
        {
            let kept = std::mem::replace(&mut self.dir, replacement).keep();
            eprintln!("kept OpenID Provider directory {}", kept.display());
        }
    }
}

fn path_of(url: &str) -> String {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    after_scheme.find('/').map_or_else(|| "/".to_owned(), |i| after_scheme[i..].to_owned())
}

fn run_node_script(what: &str, script: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("timeout")
        .args(["-k", "5", LOGIN_BOUND_SECS, "node"])
        .arg(oidc_dir().join(script))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: cannot run node: {e}"))?;
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            text(&out.stderr).trim(),
            if out.stdout.is_empty() { String::new() } else { format!("\nstdout: {}", text(&out.stdout).trim()) }
        ))
    }
}

/// The browser part of an authorization code login: headless Chromium opens `url`, signs
/// in as `login` (with the one-time code `otp` when given) and follows the redirects to the
/// application's loopback page. Returns that page's URL (first line) and text.
pub fn browser_login(url: &str, login: &str, password: &str, otp: Option<&str>) -> Result<String, String> {
    let mut args = vec![url, login, password];
    args.extend(otp);
    run_node_script("browser login", "browser.mjs", &args)
}

/// The user's part of the device flow over HTTP: confirms the code in `uri_complete`
/// (`verification_uri_complete`), signs in, and expects the provider's success page.
pub fn device_login(uri_complete: &str, login: &str, password: &str, otp: Option<&str>) -> Result<(), String> {
    let mut args = vec![uri_complete, login, password];
    args.extend(otp);
    run_node_script("device login", "device.mjs", &args).map(drop)
}

/// A PKCE pair (RFC 7636, S256): a fresh verifier and its challenge.
pub fn pkce_pair() -> (String, String) {
    let mut random = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random).unwrap();
    let verifier = URL_SAFE_NO_PAD.encode(random);
    let challenge = URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()));
    (verifier, challenge)
}

/// The claims of a JWT, decoded without any check (for assertions in tests).
pub fn jwt_claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap_or_else(|| panic!("not a JWT: {token:?}"));
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

/// `token` with one character of its signature changed (a middle one: every bit of it is
/// part of the signature, unlike the last character's).
pub fn tamper_jwt_signature(token: &str) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let sig = parts.last_mut().unwrap();
    let i = sig.len() / 2;
    let flipped = if &sig[i..=i] == "A" { "B" } else { "A" };
    sig.replace_range(i..=i, flipped);
    parts.join(".")
}

/// `token` with its `email` claim changed to mallory@example.com, its header and signature
/// kept.
pub fn tamper_jwt_payload(token: &str) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut claims = jwt_claims(token);
    claims["email"] = json!("mallory@example.com");
    parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    parts.join(".")
}

/// What the proxy does to responses of the token endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward unchanged.
    Pass,
    /// Change one character of the ID token's signature ([`tamper_jwt_signature`]).
    TamperIdToken,
    /// Change the ID token's `email` claim, keeping the signature ([`tamper_jwt_payload`]).
    TamperIdTokenPayload,
    /// Replace the ID token with this one (from another client, with another nonce,
    /// expired, ...).
    ReplaceIdToken(String),
}

/// Connections the proxy serves at once; more are closed unanswered.
const PROXY_MAX_CONNECTIONS: usize = 64;
/// Bounds on one proxied exchange.
const PROXY_MAX_HEAD: usize = 64 * 1024;
const PROXY_MAX_BODY: usize = 1024 * 1024;
const PROXY_MAX_RESPONSE: usize = 8 * 1024 * 1024;
const PROXY_IO_TIMEOUT: Duration = Duration::from_secs(30);
/// ID tokens remembered (the oldest are dropped beyond this).
const PROXY_MAX_TOKENS: usize = 1000;

struct ProxyShared {
    upstream_port: AtomicU16,
    token_path: Mutex<String>,
    mode: Mutex<ProxyMode>,
    id_tokens: Mutex<Vec<String>>,
    stop: AtomicBool,
    active: AtomicUsize,
}

/// An HTTP/1.1 reverse proxy on 127.0.0.1 in front of an [`OidcProvider`], which has the
/// proxy's URL as its issuer. It forwards everything unchanged (one request per connection)
/// except token endpoint responses in the modes of [`ProxyMode`], and records every ID
/// token the provider issued.
pub struct OidcProxy {
    /// `http://127.0.0.1:<port>`: the issuer.
    pub url: String,
    pub port: u16,
    shared: Arc<ProxyShared>,
    accept: Option<JoinHandle<()>>,
}

impl OidcProxy {
    fn bind() -> OidcProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(ProxyShared {
            upstream_port: AtomicU16::new(0),
            token_path: Mutex::new("/token".to_owned()),
            mode: Mutex::new(ProxyMode::Pass),
            id_tokens: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            active: AtomicUsize::new(0),
        });
        let accept_shared = shared.clone();
        let accept = std::thread::spawn(move || accept_loop(&listener, &accept_shared));
        OidcProxy { url: format!("http://127.0.0.1:{port}"), port, shared, accept: Some(accept) }
    }

    fn connect(&self, upstream_port: u16, token_path: &str) {
        *self.shared.token_path.lock().unwrap() = token_path.to_owned();
        self.shared.upstream_port.store(upstream_port, Ordering::SeqCst);
    }

    /// What to do with the next token endpoint responses.
    pub fn set_mode(&self, mode: ProxyMode) {
        *self.shared.mode.lock().unwrap() = mode;
    }

    /// The ID tokens the provider issued through the proxy, oldest first, as the provider
    /// sent them (before any tampering).
    pub fn id_tokens(&self) -> Vec<String> {
        self.shared.id_tokens.lock().unwrap().clone()
    }
}

impl Drop for OidcProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<ProxyShared>) {
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else { continue };
        if shared.active.fetch_add(1, Ordering::SeqCst) >= PROXY_MAX_CONNECTIONS {
            shared.active.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let shared = shared.clone();
        std::thread::spawn(move || {
            if let Err(e) = proxy_one(conn, &shared) {
                eprintln!("oidc proxy: {e}");
            }
            shared.active.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// A request or response head: the start line and the header fields.
struct Head {
    start: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    /// The head with hop-by-hop and length fields replaced: one message per connection.
    fn encode(&self, content_length: Option<usize>) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.start);
        for (n, v) in &self.headers {
            let hop = ["connection", "keep-alive", "proxy-connection", "transfer-encoding", "content-length"];
            if !hop.iter().any(|h| n.eq_ignore_ascii_case(h)) {
                out.push_str(&format!("{n}: {v}\r\n"));
            }
        }
        if let Some(len) = content_length {
            out.push_str(&format!("Content-Length: {len}\r\n"));
        }
        out.push_str("Connection: close\r\n\r\n");
        out.into_bytes()
    }
}

fn parse_head(bytes: &[u8]) -> Result<Head, String> {
    let s = std::str::from_utf8(bytes).map_err(|_| "head is not UTF-8".to_owned())?;
    let mut lines = s.split("\r\n");
    let start = lines.next().unwrap_or_default().to_owned();
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (n, v) = line.split_once(':').ok_or_else(|| format!("bad header line {line:?}"))?;
        headers.push((n.trim().to_owned(), v.trim().to_owned()));
    }
    Ok(Head { start, headers })
}

/// Reads a head (up to the blank line) and returns it with the bytes read past it.
fn read_head(stream: &mut TcpStream) -> Result<(Head, Vec<u8>), String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok((parse_head(&buf[..end])?, rest));
        }
        if buf.len() > PROXY_MAX_HEAD {
            return Err("head too large".into());
        }
        let n = stream.read(&mut chunk).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed before the end of the head".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn proxy_one(mut client: TcpStream, shared: &ProxyShared) -> Result<(), String> {
    client.set_read_timeout(Some(PROXY_IO_TIMEOUT)).map_err(|e| e.to_string())?;
    client.set_write_timeout(Some(PROXY_IO_TIMEOUT)).map_err(|e| e.to_string())?;
    let (head, mut body) = match read_head(&mut client) {
        Ok(read) => read,
        // The wake-up connection of Drop, or a client that gave up.
        Err(_) if shared.stop.load(Ordering::SeqCst) => return Ok(()),
        Err(e) => return Err(e),
    };
    if head.get("transfer-encoding").is_some() {
        let _ = client.write_all(b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return Err("chunked request bodies are not supported".into());
    }
    let length: usize = head.get("content-length").map_or(Ok(0), str::parse).map_err(|_| "bad Content-Length")?;
    if length > PROXY_MAX_BODY {
        return Err(format!("request body of {length} bytes"));
    }
    while body.len() < length {
        let mut chunk = vec![0u8; length - body.len()];
        let n = client.read(&mut chunk).map_err(|e| format!("read body: {e}"))?;
        if n == 0 {
            return Err("connection closed in the request body".into());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);

    let port = shared.upstream_port.load(Ordering::SeqCst);
    if port == 0 {
        let _ = client.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return Err("request before the provider was ready".into());
    }
    let mut upstream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect to the provider: {e}"))?;
    upstream.set_read_timeout(Some(PROXY_IO_TIMEOUT)).map_err(|e| e.to_string())?;
    upstream.set_write_timeout(Some(PROXY_IO_TIMEOUT)).map_err(|e| e.to_string())?;
    upstream.write_all(&head.encode(Some(length))).map_err(|e| format!("write to the provider: {e}"))?;
    upstream.write_all(&body).map_err(|e| format!("write to the provider: {e}"))?;
    let mut response = Vec::new();
    upstream
        .take(PROXY_MAX_RESPONSE as u64 + 1)
        .read_to_end(&mut response)
        .map_err(|e| format!("read from the provider: {e}"))?;
    if response.len() > PROXY_MAX_RESPONSE {
        return Err("response too large".into());
    }

    let mut parts = head.start.split(' ');
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default();
    if method == "POST" && path == *shared.token_path.lock().unwrap() {
        response = token_response(&response, shared).unwrap_or(response);
    }
    client.write_all(&response).map_err(|e| format!("write to the client: {e}"))?;
    Ok(())
}

/// A token endpoint response with its ID token recorded and, in a tampering mode, changed.
/// None: leave the response as it is (not a success with an ID token).
fn token_response(response: &[u8], shared: &ProxyShared) -> Option<Vec<u8>> {
    let end = response.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = parse_head(&response[..end]).ok()?;
    let raw = &response[end + 4..];
    let body = if head.get("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
        dechunk(raw)?
    } else {
        raw.to_vec()
    };
    let mut json: Value = serde_json::from_slice(&body).ok()?;
    let id_token = json.get("id_token")?.as_str()?.to_owned();
    {
        let mut tokens = shared.id_tokens.lock().unwrap();
        if tokens.len() >= PROXY_MAX_TOKENS {
            tokens.remove(0);
        }
        tokens.push(id_token.clone());
    }
    let replacement = match &*shared.mode.lock().unwrap() {
        ProxyMode::Pass => return None,
        ProxyMode::TamperIdToken => tamper_jwt_signature(&id_token),
        ProxyMode::TamperIdTokenPayload => tamper_jwt_payload(&id_token),
        ProxyMode::ReplaceIdToken(token) => token.clone(),
    };
    json["id_token"] = Value::String(replacement);
    let body = serde_json::to_vec(&json).ok()?;
    let mut out = head.encode(Some(body.len()));
    out.extend_from_slice(&body);
    Some(out)
}

fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&raw[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}

/// The web console in headless Chromium (tests/oidc/console.mjs): opens the sign-in link
/// `url`, screenshots the page to `screenshot`, filters by `labels` when given, signs out
/// and tries the link again. Returns the script's JSON report.
pub fn console_visit(url: &str, screenshot: &Path, labels: Option<&str>) -> Result<Value, String> {
    let shot = screenshot.to_str().ok_or("the screenshot path is not UTF-8")?;
    let mut args = vec![url, shot];
    args.extend(labels);
    let out = run_node_script("web console", "console.mjs", &args)?;
    serde_json::from_str(out.trim()).map_err(|e| format!("web console: not JSON ({e}): {out}"))
}

/// A terminal in the web console driven by headless Chromium (tests/oidc/terminal.mjs): it
/// signs in with `url`, opens a terminal on `instance` from the instances page, runs a
/// command, resizes, takes a screenshot, and reports `ready`; [`BrowserTerminal::finish`]
/// then tells it what to do last.
pub struct BrowserTerminal {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    lines: BufReader<std::process::ChildStdout>,
}

impl BrowserTerminal {
    pub fn open(url: &str, instance: &str, screenshot: &Path) -> Result<(BrowserTerminal, Value), String> {
        let shot = screenshot.to_str().ok_or("the screenshot path is not UTF-8")?;
        Self::start("terminal.mjs", &[url, instance, shot])
    }

    /// Live watch in the console (tests/oidc/watch.mjs): signs in with `url`, opens the
    /// Sessions page and clicks Watch on `session`; `ready` once it is watching. Then
    /// [`BrowserTerminal::finish`] with the line to wait for on the watcher's screen.
    pub fn watch(url: &str, session: &str, screenshot: &Path) -> Result<(BrowserTerminal, Value), String> {
        let shot = screenshot.to_str().ok_or("the screenshot path is not UTF-8")?;
        Self::start("watch.mjs", &[url, session, shot])
    }

    fn start(script: &str, args: &[&str]) -> Result<(BrowserTerminal, Value), String> {
        let mut child = Command::new("timeout")
            .args(["-k", "5", "90", "node"])
            .arg(oidc_dir().join(script))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("browser terminal: cannot run node: {e}"))?;
        let stdin = child.stdin.take();
        let lines = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let mut t = BrowserTerminal { child, stdin, lines };
        let ready = t.next_event("ready")?;
        Ok((t, ready))
    }

    /// The next JSON line, which must hold `key`; the script's stderr when it failed instead.
    fn next_event(&mut self, key: &str) -> Result<Value, String> {
        let mut line = String::new();
        let _ = self.lines.read_line(&mut line);
        match serde_json::from_str::<Value>(line.trim()) {
            Ok(v) if v.get(key).is_some() => Ok(v[key].clone()),
            _ => {
                let _ = self.child.kill();
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                let _ = self.child.wait();
                Err(format!("browser terminal: no {key} ({}): {}", line.trim(), err.trim()))
            }
        }
    }

    /// `exit`, `wait` or `ws URL` (see the script); its `done` report.
    pub fn finish(mut self, command: &str) -> Result<Value, String> {
        if let Some(mut stdin) = self.stdin.take() {
            writeln!(stdin, "{command}").map_err(|e| format!("browser terminal: {e}"))?;
        }
        let done = self.next_event("done");
        let _ = self.child.wait();
        done
    }
}

impl Drop for BrowserTerminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The console's session history in headless Chromium (tests/oidc/history.mjs): signs in
/// with `url`, searches the Sessions page by `instance`, replays `session` until the player
/// shows the line `want`, and takes a screenshot of the replay page.
pub fn history_visit(url: &str, instance: &str, session: &str, want: &str, screenshot: &Path) -> Result<Value, String> {
    let shot = screenshot.to_str().ok_or("the screenshot path is not UTF-8")?;
    let out = run_node_script("web history", "history.mjs", &[url, instance, session, want, shot])?;
    serde_json::from_str(out.trim()).map_err(|e| format!("web history: not JSON ({e}): {out}"))
}

/// Signing in to the web console at `origin` through the identity provider, in headless
/// Chromium (tests/oidc/console-idp.mjs): `{landed, user, text}`.
pub fn console_idp_login(origin: &str, login: &str, password: &str) -> Result<Value, String> {
    let out = run_node_script("console sign-in", "console-idp.mjs", &[origin, login, password])?;
    serde_json::from_str(out.trim()).map_err(|e| format!("console sign-in: not JSON ({e}): {out}"))
}
