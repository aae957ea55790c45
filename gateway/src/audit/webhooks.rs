//! Webhooks: audit events POSTed as JSON to HTTP(S) endpoints (the EventBridge/SNS
//! analog). Each body is the event's log line; `X-Postern-Signature: sha256=HEX` is the
//! HMAC-SHA256 of the body with the webhook's secret. Failed deliveries are retried with
//! exponential backoff; after `max_attempts` the event goes to a dead-letter file, so nothing
//! is silently dropped. Delivery never blocks the gateway: each webhook has a bounded queue,
//! and an event that finds it full goes to the dead-letter file at once.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use postern_tunnel::CancellationToken;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::debug;

use postern_core::util::glob_match;

const QUEUE: usize = 10_000;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://` endpoint.
    pub url: String,
    /// File holding the HMAC secret (trimmed). Without one, no signature header is sent.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Event names or globs to send (default: session start, end, denied and terminated).
    #[serde(default = "default_events")]
    pub events: Vec<String>,
    /// Attempts before an event goes to the dead-letter file.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
}

fn default_events() -> Vec<String> {
    ["session.start", "session.end", "session.denied", "session.terminated"].map(String::from).to_vec()
}

fn default_attempts() -> u32 {
    5
}

struct Delivery {
    event: String,
    id: String,
    body: Vec<u8>,
}

struct Sink {
    url: String,
    events: Vec<String>,
    tx: mpsc::Sender<Delivery>,
}

pub struct Webhooks {
    sinks: Vec<Sink>,
    dead_letter: Arc<DeadLetter>,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks").field("count", &self.sinks.len()).finish_non_exhaustive()
    }
}

struct DeadLetter {
    path: PathBuf,
    lock: Mutex<()>,
}

impl DeadLetter {
    fn write(&self, url: &str, d: &Delivery, attempts: u32, error: &str) {
        let body: Value = serde_json::from_slice(&d.body).unwrap_or(Value::Null);
        let line = json!({"time": postern_core::util::rfc3339(postern_core::util::now_unix()), "url": url, "event": d.event,
                          "id": d.id, "attempts": attempts, "error": error, "body": body});
        let _guard = self.lock.lock();
        use std::os::unix::fs::OpenOptionsExt;
        let result = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
            .and_then(|mut f| writeln!(f, "{line}"));
        match result {
            Ok(()) => {
                postern_tunnel::warn_limited!(url, event = %d.event, error, "webhook delivery failed; event written to the dead-letter file")
            }
            Err(e) => {
                postern_tunnel::error_limited!(url, event = %d.event, error = %e, "webhook delivery failed and the dead-letter file cannot be written")
            }
        }
    }
}

impl Webhooks {
    /// Validate the configs, load secrets and start one delivery task per webhook.
    pub fn start(
        configs: &[WebhookConfig],
        dead_letter: PathBuf,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let dead_letter = Arc::new(DeadLetter { path: dead_letter, lock: Mutex::new(()) });
        let mut sinks = Vec::new();
        for (i, c) in configs.iter().enumerate() {
            let what = || format!("[[audit.webhooks]] #{} ({})", i + 1, c.url);
            if !(c.url.starts_with("http://") || c.url.starts_with("https://")) {
                anyhow::bail!("{}: url must start with http:// or https://", what());
            }
            if c.max_attempts == 0 {
                anyhow::bail!("{}: max_attempts must be at least 1", what());
            }
            let secret = match &c.secret_file {
                Some(p) => Some(
                    std::fs::read_to_string(p)
                        .with_context(|| format!("{}: reading secret_file {}", what(), p.display()))?
                        .trim()
                        .as_bytes()
                        .to_vec(),
                ),
                None => None,
            };
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(deliver(c.clone(), secret, rx, dead_letter.clone(), shutdown.clone()));
            sinks.push(Sink { url: c.url.clone(), events: c.events.clone(), tx });
        }
        Ok(Arc::new(Webhooks { sinks, dead_letter }))
    }

    /// Queue one written event for every webhook whose filter matches it.
    pub fn offer(&self, event: &str, id: &str, line: &[u8]) {
        for s in &self.sinks {
            if !s.events.iter().any(|p| glob_match(p, event)) {
                continue;
            }
            let d = Delivery { event: event.to_owned(), id: id.to_owned(), body: line.to_vec() };
            if let Err(e) = s.tx.try_send(d) {
                let (d, why) = match e {
                    mpsc::error::TrySendError::Full(d) => (d, "delivery queue full"),
                    mpsc::error::TrySendError::Closed(d) => (d, "gateway shutting down"),
                };
                self.dead_letter.write(&s.url, &d, 0, why);
            }
        }
    }
}

fn signature(secret: &[u8], body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    format!("sha256={}", postern_core::util::hex(ring::hmac::sign(&key, body).as_ref()))
}

fn post(agent: &ureq::Agent, url: &str, secret: Option<&[u8]>, d: &Delivery) -> Result<(), String> {
    let mut req = agent
        .post(url)
        .set("Content-Type", "application/json")
        .set("User-Agent", concat!("postern/", env!("CARGO_PKG_VERSION")))
        .set("X-Postern-Event", &d.event)
        .set("X-Postern-Delivery", &d.id);
    if let Some(s) = secret {
        req = req.set("X-Postern-Signature", &signature(s, &d.body));
    }
    match req.send_bytes(&d.body) {
        Ok(_) => Ok(()),
        Err(ureq::Error::Status(code, _)) => Err(format!("HTTP {code}")),
        Err(e) => Err(e.to_string()),
    }
}

async fn deliver(
    cfg: WebhookConfig,
    secret: Option<Vec<u8>>,
    mut rx: mpsc::Receiver<Delivery>,
    dead_letter: Arc<DeadLetter>,
    shutdown: CancellationToken,
) {
    let agent = ureq::AgentBuilder::new().timeout(REQUEST_TIMEOUT).redirects(0).build();
    let secret = secret.map(Arc::new);
    loop {
        let d = tokio::select! {
            d = rx.recv() => match d { Some(d) => d, None => return },
            _ = shutdown.cancelled() => return,
        };
        let d = Arc::new(d);
        let mut last_error = String::new();
        let mut delivered = false;
        for attempt in 1..=cfg.max_attempts {
            let (agent, url, secret, d2) = (agent.clone(), cfg.url.clone(), secret.clone(), d.clone());
            let result =
                tokio::task::spawn_blocking(move || post(&agent, &url, secret.as_deref().map(Vec::as_slice), &d2))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()));
            match result {
                Ok(()) => {
                    delivered = true;
                    break;
                }
                Err(e) => {
                    debug!(url = %cfg.url, attempt, error = %e, "webhook attempt failed");
                    last_error = e;
                }
            }
            if attempt < cfg.max_attempts {
                let backoff = Duration::from_millis(250u64.saturating_mul(1 << (attempt - 1).min(6)))
                    .min(Duration::from_secs(10));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => {
                        dead_letter.write(&cfg.url, &d, attempt, "gateway shut down before delivery");
                        return;
                    }
                }
            }
        }
        if !delivered {
            dead_letter.write(&cfg.url, &d, cfg.max_attempts, &last_error);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        let sig = super::signature(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(sig, "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }
}
