//! The audit event log: one JSON object per line, schema version in every event, and a hash
//! chain that makes tampering detectable.
//!
//! Every line carries `seq` (1, 2, 3, ...) and `prev`, the SHA-256 (hex) of the previous
//! line's bytes (64 zeros for the first line). Changing, deleting, inserting or reordering a
//! line breaks the chain at that point. Rewriting the whole tail with recomputed hashes is
//! caught by **checkpoints**: `audit.checkpoint` events, written every
//! [`CHECKPOINT_EVERY_EVENTS`] events, every [`CHECKPOINT_EVERY`] and at shutdown, carrying
//! an ed25519 signature (key in the data directory) over the hash of the line before them.
//! `postern audit verify` checks both (see [`verify`]).

pub mod verify;
pub mod webhooks;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::Serialize;
use serde_json::{Map, Value, json};

/// Version of the event schema; bumped on incompatible changes.
pub const SCHEMA_VERSION: u32 = 1;
pub const CHECKPOINT_EVERY_EVENTS: u64 = 100;
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(60);
/// `prev` of the first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    inner: Mutex<Chain>,
    signer: Option<Signer>,
    /// Where written events are also sent (set once the runtime is up).
    webhooks: std::sync::OnceLock<std::sync::Arc<webhooks::Webhooks>>,
    /// Also print every event line to standard output (for log shippers).
    to_stdout: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct Chain {
    file: std::fs::File,
    /// Length of the file after the last complete line.
    len: u64,
    seq: u64,
    last_hash: String,
    since_checkpoint: u64,
    last_checkpoint: Instant,
}

struct Signer {
    key: Ed25519KeyPair,
    key_id: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

#[derive(Debug, Serialize)]
struct Envelope<'a> {
    v: u32,
    seq: u64,
    id: String,
    time: String,
    event: &'a str,
    #[serde(flatten)]
    fields: Map<String, Value>,
    prev: &'a str,
}

pub fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

pub fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes of a hex string; `None` for odd length or a non-hex digit.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|p| u8::from_str_radix(p, 16).ok())).collect()
}

/// SHA-256 (hex) of one line's bytes, without its newline.
pub fn line_hash(line: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, line).as_ref())
}

/// What a checkpoint signs: the position and hash of the line before it.
pub fn checkpoint_message(seq: u64, hash: &str) -> Vec<u8> {
    format!("postern-audit-checkpoint/v1 seq={seq} hash={hash}").into_bytes()
}

/// Short id of a public key: the first 16 hex digits of its SHA-256.
pub fn key_id(public: &[u8]) -> String {
    line_hash(public).chars().take(16).collect()
}

/// The last complete line of the file (and its `seq`), read from the end.
fn last_line(file: &mut std::fs::File) -> std::io::Result<Option<(Vec<u8>, u64)>> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(None);
    }
    let take = len.min(1 << 20);
    file.seek(SeekFrom::Start(len - take))?;
    let mut tail = Vec::with_capacity(take as usize);
    file.read_to_end(&mut tail)?;
    let body = tail.strip_suffix(b"\n").unwrap_or(&tail);
    let mut lines = body.rsplit(|b| *b == b'\n');
    let last = lines.next().unwrap_or_default();
    // The sequence continues from the last line that parses (a torn line has none).
    let seq_of = |l: &[u8]| serde_json::from_slice::<Value>(l).ok().and_then(|v| v.get("seq").and_then(Value::as_u64));
    let seq = std::iter::once(last).chain(lines).find_map(seq_of).unwrap_or(0);
    Ok(Some((last.to_vec(), seq)))
}

/// Load the checkpoint signing key from `path` (PKCS#8), creating it (mode 0600) and its
/// public half (`path` with `.pub`, hex) on first use.
pub fn load_or_create_signing_key(path: &Path) -> anyhow::Result<Ed25519KeyPair> {
    use anyhow::Context;
    let pkcs8 = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                .map_err(|_| anyhow::anyhow!("cannot generate the audit signing key"))?;
            postern_tunnel::agent::write_private(path, doc.as_ref())?;
            doc.as_ref().to_vec()
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let key =
        Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| anyhow::anyhow!("{} is not an ed25519 key", path.display()))?;
    std::fs::write(path.with_extension("pub"), format!("{}\n", hex(key.public_key().as_ref())))
        .with_context(|| format!("writing {}", path.with_extension("pub").display()))?;
    Ok(key)
}

impl AuditLog {
    /// Open (or create) the log without checkpoint signatures (tests, tools).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Self::open_with(path, None)
    }

    /// Open (or create) the log; checkpoints are signed with `key`.
    pub fn open_signed(path: &Path, key: Ed25519KeyPair) -> std::io::Result<Self> {
        let key_id = key_id(key.public_key().as_ref());
        Self::open_with(path, Some(Signer { key, key_id }))
    }

    fn open_with(path: &Path, signer: Option<Signer>) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new().create(true).read(true).append(true).mode(0o600).open(path)?;
        // Continue the chain from the last line; a torn last line (crash mid-write) is closed
        // with a newline so the next event starts on its own line (verify reports the torn one).
        let (seq, last_hash) = match last_line(&mut file)? {
            Some((line, seq)) => {
                let len = file.seek(SeekFrom::End(0))?;
                let mut last = [0u8; 1];
                file.seek(SeekFrom::Start(len - 1))?;
                file.read_exact(&mut last)?;
                if last[0] != b'\n' {
                    file.write_all(b"\n")?;
                }
                (seq, line_hash(&line))
            }
            None => (0, GENESIS.to_owned()),
        };
        let len = file.seek(SeekFrom::End(0))?;
        Ok(Self {
            path: path.to_owned(),
            inner: Mutex::new(Chain {
                file,
                len,
                seq,
                last_hash,
                since_checkpoint: 0,
                last_checkpoint: Instant::now(),
            }),
            signer,
            webhooks: std::sync::OnceLock::new(),
            to_stdout: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Also print every event line to standard output from now on.
    pub fn set_stdout(&self, on: bool) {
        self.to_stdout.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Send written events to these webhooks from now on.
    pub fn set_webhooks(&self, hooks: std::sync::Arc<webhooks::Webhooks>) {
        let _ = self.webhooks.set(hooks);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one event. `fields` must be a JSON object; secrets never go in it.
    /// A write failure is logged and returned so callers that must fail closed can.
    pub fn record(&self, event: &str, fields: Value) -> std::io::Result<()> {
        let fields = match fields {
            Value::Object(m) => m,
            other => {
                let mut m = Map::new();
                m.insert("detail".into(), other);
                m
            }
        };
        let result = match self.inner.lock() {
            Ok(mut chain) => {
                let r = self.append(&mut chain, event, fields).map(|(id, line)| {
                    if self.to_stdout.load(std::sync::atomic::Ordering::Relaxed) {
                        let mut out = std::io::stdout().lock();
                        let _ = out.write_all(&line).and_then(|()| out.write_all(b"\n")).and_then(|()| out.flush());
                    }
                    // The log's own housekeeping events are never sent out.
                    if let Some(h) = self.webhooks.get()
                        && !event.starts_with("audit.")
                    {
                        h.offer(event, &id, &line);
                    }
                });
                if r.is_ok() && self.signer.is_some() && chain.since_checkpoint >= CHECKPOINT_EVERY_EVENTS {
                    let _ = self.checkpoint_locked(&mut chain);
                }
                r
            }
            Err(_) => Err(std::io::Error::other("audit log lock poisoned")),
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, path = %self.path.display(), event, "cannot write audit event");
        }
        result
    }

    /// Write one event; returns its id and line (without the newline).
    fn append(&self, chain: &mut Chain, event: &str, fields: Map<String, Value>) -> std::io::Result<(String, Vec<u8>)> {
        let mut id = [0u8; 8];
        // An id collision only weakens cross-referencing, never integrity; no need to fail.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id);
        let id = hex(&id);
        let env = Envelope {
            v: SCHEMA_VERSION,
            seq: chain.seq + 1,
            id: id.clone(),
            time: now_rfc3339(),
            event,
            fields,
            prev: &chain.last_hash,
        };
        let mut line = serde_json::to_vec(&env).map_err(std::io::Error::other)?;
        let hash = line_hash(&line);
        line.push(b'\n');
        if let Err(e) = chain.file.write_all(&line).and_then(|()| chain.file.flush()) {
            // A partial line (disk full) is cut off again so the log stays whole lines.
            let _ = chain.file.set_len(chain.len);
            return Err(e);
        }
        chain.len += line.len() as u64;
        chain.seq += 1;
        chain.last_hash = hash;
        chain.since_checkpoint += 1;
        line.pop();
        Ok((id, line))
    }

    fn checkpoint_locked(&self, chain: &mut Chain) -> std::io::Result<()> {
        let Some(signer) = &self.signer else { return Ok(()) };
        let sig = signer.key.sign(&checkpoint_message(chain.seq, &chain.last_hash));
        let fields = json!({"covers_seq": chain.seq, "covers_hash": chain.last_hash, "key_id": signer.key_id,
                            "sig": hex(sig.as_ref())});
        let Value::Object(fields) = fields else { return Ok(()) };
        self.append(chain, "audit.checkpoint", fields)?;
        chain.file.sync_data()?;
        chain.since_checkpoint = 0;
        chain.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Write a signed checkpoint if events were added since the last one and `force` or
    /// [`CHECKPOINT_EVERY`] has passed.
    pub fn checkpoint(&self, force: bool) -> std::io::Result<()> {
        let Ok(mut chain) = self.inner.lock() else { return Err(std::io::Error::other("audit log lock poisoned")) };
        if chain.since_checkpoint == 0 || !(force || chain.last_checkpoint.elapsed() >= CHECKPOINT_EVERY) {
            return Ok(());
        }
        self.checkpoint_locked(&mut chain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_chained_json_lines_with_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::open(&path).unwrap();
        log.record("token.created", json!({"labels": {"env": "dev"}})).unwrap();
        log.record("agent.connected", json!({"agent_id": "ag-1"})).unwrap();
        drop(log);
        // Reopening continues the chain.
        AuditLog::open(&path).unwrap().record("agent.disconnected", json!({})).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let raw: Vec<&str> = text.lines().collect();
        let lines: Vec<Value> = raw.iter().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["v"], 1);
        assert_eq!(lines[0]["event"], "token.created");
        assert_eq!(lines[1]["agent_id"], "ag-1");
        assert_ne!(lines[0]["id"], lines[1]["id"]);
        assert_eq!(lines[0]["prev"], GENESIS);
        for i in 1..3 {
            assert_eq!(lines[i]["seq"], i as u64 + 1);
            assert_eq!(lines[i]["prev"].as_str().unwrap(), line_hash(raw[i - 1].as_bytes()));
        }
    }

    #[test]
    fn a_torn_last_line_is_closed_before_the_next_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        AuditLog::open(&path).unwrap().record("a", json!({})).unwrap();
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"v\":1,\"seq\":2,\"tor").unwrap();
        drop(f);
        AuditLog::open(&path).unwrap().record("b", json!({})).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(serde_json::from_str::<Value>(text.lines().last().unwrap()).is_ok());
    }
}
