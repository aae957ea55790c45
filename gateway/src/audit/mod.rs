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
//!
//! The log is a directory of **segments** (`events-<first seq>.jsonl`, or `.jsonl.sealed`
//! when encrypted at rest, see [`seal`]; a gateway of a cluster names them
//! `events-<gateway id>-<first seq>.jsonl`, so each gateway's chain is told apart wherever
//! the files end up). The chain runs on across them: a new segment starts
//! when the current one reaches a size or an age, and its first line is a signed checkpoint
//! (`segment_start`) over the last line of the previous one, so a segment can be verified
//! on its own and the log still verifies after retention has deleted the oldest segments.
//!
//! (Over 600 lines with its tests, on purpose: the chain, rotation and checkpoints are one
//! state machine under one lock, tested together; the code alone is under 600.)

pub mod anchor;
pub mod events;
pub mod seal;
pub mod ship;
pub mod verify;
pub mod webhooks;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::Serialize;
use serde_json::{Map, Value};

use postern_core::util::hex;
use postern_core::util::sha256_hex;

/// Version of the event schema; bumped on incompatible changes.
pub const SCHEMA_VERSION: u32 = 1;
pub const CHECKPOINT_EVERY_EVENTS: u64 = 100;
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(60);
/// `prev` of the first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// How the log is cut into segments and whether they are encrypted.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Start a new segment once the current one holds this many bytes.
    pub rotate_bytes: u64,
    /// ... or is this old (checked on every event and every few seconds).
    pub rotate_after: Option<Duration>,
    /// New segments are sealed with the active key, if there is one; older ones are opened
    /// with whichever key they name.
    pub keyring: seal::Keyring,
    /// `[cluster] gateway_id`: segment names carry it, and a restarted gateway continues its
    /// chain in a new segment (the last one was shipped whole at its stop).
    pub gateway_id: Option<String>,
}

impl Default for LogOptions {
    fn default() -> Self {
        Self {
            rotate_bytes: 64 << 20,
            rotate_after: Some(Duration::from_secs(86400)),
            keyring: seal::Keyring::default(),
            gateway_id: None,
        }
    }
}

/// File name of the segment whose first event has `first_seq`.
pub fn segment_name(first_seq: u64, sealed: bool) -> String {
    segment_name_of(None, first_seq, sealed)
}

/// File name of gateway `gateway_id`'s segment whose first event has `first_seq`
/// (`events-<id>-<seq>.jsonl`; without an id, a single gateway's `events-<seq>.jsonl`).
pub fn segment_name_of(gateway_id: Option<&str>, first_seq: u64, sealed: bool) -> String {
    let gateway = gateway_id.map(|g| format!("{g}-")).unwrap_or_default();
    format!("events-{gateway}{first_seq:012}.jsonl{}", if sealed { ".sealed" } else { "" })
}

/// The first seq of a segment named `name` (either form of [`segment_name_of`]), and the
/// gateway id it names, if any.
pub fn parse_segment_name(name: &str) -> Option<(Option<&str>, u64)> {
    let rest = name.strip_prefix("events-")?;
    let stem = rest.strip_suffix(".jsonl").or_else(|| rest.strip_suffix(".jsonl.sealed"))?;
    let (gateway, digits) = match stem.rsplit_once('-') {
        Some((g, d)) if !g.is_empty() => (Some(g), d),
        Some(_) => return None,
        None => (None, stem),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((gateway, digits.parse().ok()?))
}

/// The log's segments in `dir`, oldest first, with the `seq` of their first event.
pub fn segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        // A single gateway that joined a cluster keeps its older segments: the chain runs on
        // across both names, ordered by seq.
        if let Some((_, seq)) = parse_segment_name(&name) {
            out.push((seq, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

#[derive(Debug)]
pub struct AuditLog {
    dir: PathBuf,
    options: LogOptions,
    inner: Mutex<Chain>,
    signer: Option<Signer>,
    /// Where written events are also sent (set once the runtime is up, replaced by a reload).
    webhooks: std::sync::RwLock<Option<std::sync::Arc<webhooks::Webhooks>>>,
    /// Also print every event line to standard output (for log shippers).
    to_stdout: std::sync::atomic::AtomicBool,
    /// The last write failed (readiness reports it until a write succeeds).
    write_failed: std::sync::atomic::AtomicBool,
    /// Signalled when a segment is closed (the object-store shipper waits on it).
    pub segment_closed: tokio::sync::Notify,
    /// The last checkpoint written, for start-up to keep outside the log ([`anchor`]).
    checkpointed: tokio::sync::watch::Sender<Option<postern_core::store::AuditAnchor>>,
}

#[derive(Debug)]
struct Chain {
    /// The segment being written.
    file: std::fs::File,
    path: PathBuf,
    /// Length of the segment after the last complete line (or record).
    len: u64,
    opened: Instant,
    sealer: Option<seal::Sealer>,
    /// A write to a sealed segment failed part-way: the next event starts a new segment (a
    /// record number is never reused, so nothing is sealed twice under one nonce).
    broken: bool,
    /// Events in this segment (its anchor included).
    segment_events: u64,
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

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// SHA-256 (hex) of one line's bytes, without its newline.
pub fn line_hash(line: &[u8]) -> String {
    sha256_hex(line)
}

/// What a checkpoint signs: the position and hash of the line before it.
pub fn checkpoint_message(seq: u64, hash: &str) -> Vec<u8> {
    format!("postern-audit-checkpoint/v1 seq={seq} hash={hash}").into_bytes()
}

/// Short id of a public key: the first 16 hex digits of its SHA-256.
pub fn key_id(public: &[u8]) -> String {
    line_hash(public).chars().take(16).collect()
}

/// The last complete line of `text` and the `seq` the chain stands at (from the last line
/// that parses: a torn line has none).
fn last_line_in(text: &[u8]) -> Option<(Vec<u8>, u64)> {
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    if body.is_empty() {
        return None;
    }
    let mut lines = body.rsplit(|b| *b == b'\n');
    let last = lines.next().unwrap_or_default();
    let seq_of = |l: &[u8]| serde_json::from_slice::<Value>(l).ok().and_then(|v| v.get("seq").and_then(Value::as_u64));
    let seq = std::iter::once(last).chain(lines).find_map(seq_of).unwrap_or(0);
    Some((last.to_vec(), seq))
}

/// The last line of a segment and the chain's `seq` there; `None` if it holds no event.
fn segment_tail(path: &Path, keyring: &seal::Keyring) -> anyhow::Result<Option<(Vec<u8>, u64)>> {
    use anyhow::Context;
    if seal::is_sealed(path) {
        let (text, _) = seal::Plain::read_all(path, keyring)?;
        return Ok(last_line_in(&text));
    }
    // A clear segment can be large: its last MiB is enough.
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file.seek(SeekFrom::End(0))?;
    let take = len.min(1 << 20);
    file.seek(SeekFrom::Start(len - take))?;
    let mut tail = Vec::with_capacity(take as usize);
    file.read_to_end(&mut tail)?;
    Ok(last_line_in(&tail))
}

/// Create segment `first_seq` in `dir`, with its header if `keyring` seals.
fn create_segment(
    dir: &Path,
    first_seq: u64,
    options: &LogOptions,
) -> std::io::Result<(std::fs::File, PathBuf, Option<seal::Sealer>, u64)> {
    let keyring = &options.keyring;
    let path = dir.join(segment_name_of(options.gateway_id.as_deref(), first_seq, keyring.active().is_some()));
    let (file, sealer, len) = seal::create_file(&path, keyring)?;
    Ok((file, path, sealer, len))
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
    signing_key(&pkcs8, &path.display().to_string(), &path.with_extension("pub"))
}

/// The signing key in `pkcs8` (from `what`), with its public half written to `public` (hex),
/// where `postern audit verify` looks for it.
pub fn signing_key(pkcs8: &[u8], what: &str, public: &Path) -> anyhow::Result<Ed25519KeyPair> {
    use anyhow::Context;
    let key = Ed25519KeyPair::from_pkcs8(pkcs8).map_err(|_| anyhow::anyhow!("{what} is not an ed25519 key"))?;
    std::fs::write(public, format!("{}\n", hex(key.public_key().as_ref())))
        .with_context(|| format!("writing {}", public.display()))?;
    Ok(key)
}

impl AuditLog {
    /// Open (or create) the log in directory `dir` without checkpoint signatures (tests, tools).
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        Self::open_with(dir, None, LogOptions::default())
    }

    /// Open (or create) the log in directory `dir`; checkpoints are signed with `key`.
    pub fn open_signed(dir: &Path, key: Ed25519KeyPair, options: LogOptions) -> anyhow::Result<Self> {
        let key_id = key_id(key.public_key().as_ref());
        Self::open_with(dir, Some(Signer { key, key_id }), options)
    }

    fn open_with(dir: &Path, signer: Option<Signer>, options: LogOptions) -> anyhow::Result<Self> {
        use anyhow::Context;
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        let mut segs = segments(dir).with_context(|| format!("listing {}", dir.display()))?;
        // Where the chain stands: the newest segment holding an event (a segment created just
        // before a crash may hold none, and is dropped).
        let mut at = None;
        while let Some((_, path)) = segs.last() {
            let tail = segment_tail(path, &options.keyring)
                .with_context(|| format!("cannot continue the audit chain from {}", path.display()))?;
            match tail {
                Some((line, seq)) => {
                    at = Some((seq, line_hash(&line)));
                    break;
                }
                None => {
                    std::fs::remove_file(path).with_context(|| format!("removing empty {}", path.display()))?;
                    segs.pop();
                }
            }
        }
        let (seq, last_hash) = at.unwrap_or((0, GENESIS.to_owned()));
        let sealing = options.keyring.active().is_some();
        // A clear newest segment is appended to while the log stays clear; a sealed one is
        // never reopened (its data key is not kept): the chain continues in a new segment.
        // Nor is a cluster gateway's: it shipped that segment whole when it stopped.
        let reuse = segs
            .last()
            .filter(|(_, p)| !sealing && !seal::is_sealed(p) && options.gateway_id.is_none())
            .map(|(_, p)| p.clone());
        let (file, path, sealer, len, fresh) = match reuse {
            Some(path) => {
                let mut file = std::fs::OpenOptions::new().read(true).append(true).mode(0o600).open(&path)?;
                // A torn last line (crash mid-write) is closed with a newline so the next
                // event starts on its own line (verify reports the torn one).
                let len = file.seek(SeekFrom::End(0))?;
                let mut last = [0u8; 1];
                file.seek(SeekFrom::Start(len.saturating_sub(1)))?;
                file.read_exact(&mut last)?;
                if last[0] != b'\n' {
                    file.write_all(b"\n")?;
                }
                let len = file.seek(SeekFrom::End(0))?;
                (file, path, None, len, false)
            }
            None => {
                let (file, path, sealer, len) = create_segment(dir, seq + 1, &options)
                    .with_context(|| format!("creating an audit log segment in {}", dir.display()))?;
                (file, path, sealer, len, true)
            }
        };
        let previous =
            segs.last().filter(|_| fresh).and_then(|(_, p)| p.file_name()).map(|n| n.to_string_lossy().into_owned());
        let log = Self {
            dir: dir.to_owned(),
            options,
            inner: Mutex::new(Chain {
                file,
                path,
                len,
                opened: Instant::now(),
                sealer,
                broken: false,
                segment_events: 0,
                seq,
                last_hash,
                since_checkpoint: 0,
                last_checkpoint: Instant::now(),
            }),
            signer,
            webhooks: std::sync::RwLock::new(None),
            to_stdout: std::sync::atomic::AtomicBool::new(false),
            write_failed: std::sync::atomic::AtomicBool::new(false),
            segment_closed: tokio::sync::Notify::new(),
            checkpointed: tokio::sync::watch::Sender::new(None),
        };
        // A new segment that continues a chain starts with a signed anchor, so it can be
        // verified after older segments are gone (retention) or on its own.
        if let (Some(previous), Ok(mut chain)) = (previous, log.inner.lock()) {
            log.checkpoint_locked(&mut chain, Some(&previous)).context("writing the segment's first checkpoint")?;
        }
        Ok(log)
    }

    /// Also print every event line to standard output from now on.
    pub fn set_stdout(&self, on: bool) {
        self.to_stdout.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Send written events to these webhooks from now on. The ones they replace deliver
    /// what they had queued and stop.
    pub fn set_webhooks(&self, hooks: std::sync::Arc<webhooks::Webhooks>) {
        if let Ok(mut w) = self.webhooks.write() {
            *w = Some(hooks);
        }
    }

    /// The last checkpoint written (its seq and line hash), updated on every new one.
    pub fn anchors(&self) -> tokio::sync::watch::Receiver<Option<postern_core::store::AuditAnchor>> {
        self.checkpointed.subscribe()
    }

    /// The id of the key checkpoints are signed with (None: an unsigned log).
    pub fn key_id(&self) -> Option<String> {
        self.signer.as_ref().map(|s| s.key_id.clone())
    }

    /// The directory holding the segments.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Segments that are complete (every one but the one being written), oldest first.
    pub fn closed_segments(&self) -> Vec<(u64, PathBuf)> {
        let current = self.inner.lock().map(|c| c.path.clone()).unwrap_or_default();
        segments(&self.dir).unwrap_or_default().into_iter().filter(|(_, p)| *p != current).collect()
    }

    /// Append one event by name, with any fields: for the log's own tests only (names that
    /// no event has, lines of a chosen size). The gateway writes typed events through
    /// [`AuditLog::event`], so that no event name or field can be misspelled.
    #[cfg(test)]
    pub(crate) fn record(&self, event: &str, fields: Value) -> std::io::Result<()> {
        let fields = match fields {
            Value::Object(m) => m,
            other => {
                let mut m = Map::new();
                m.insert("detail".into(), other);
                m
            }
        };
        self.write(event, fields)
    }

    /// Append one typed event (see [`events`]); secrets never go in one. A write failure is
    /// logged and returned so callers that must fail closed can.
    pub fn event(&self, e: &events::Event) -> std::io::Result<()> {
        // Checkpoints carry the log's own signature over its chain; one from outside would
        // only be a forgery that verify rejects.
        if let events::Event::AuditCheckpoint(_) = e {
            return Err(std::io::Error::other("audit.checkpoint is written by the log itself"));
        }
        count(e);
        match e.fields() {
            Ok(fields) => self.write(e.name(), fields),
            Err(err) => {
                postern_tunnel::error_limited!(error = %err, event = e.name(), "cannot serialize audit event");
                Err(std::io::Error::other(err))
            }
        }
    }

    /// Append `event` with `fields`, then send it on (standard output, webhooks) and
    /// checkpoint or rotate if due.
    fn write(&self, event: &str, fields: Map<String, Value>) -> std::io::Result<()> {
        let started = Instant::now();
        let result = match self.inner.lock() {
            Ok(mut chain) => {
                let r = self.append(&mut chain, event, fields).map(|(id, line)| {
                    if self.to_stdout.load(std::sync::atomic::Ordering::Relaxed) {
                        let mut out = std::io::stdout().lock();
                        let _ = out.write_all(&line).and_then(|()| out.write_all(b"\n")).and_then(|()| out.flush());
                    }
                    // The log's own housekeeping events are never sent out.
                    if !event.starts_with("audit.")
                        && let Ok(hooks) = self.webhooks.read()
                        && let Some(h) = hooks.as_ref()
                    {
                        h.offer(event, &id, &line);
                    }
                });
                if r.is_ok() && self.signer.is_some() && chain.since_checkpoint >= CHECKPOINT_EVERY_EVENTS {
                    let _ = self.checkpoint_locked(&mut chain, None);
                }
                if r.is_ok() && self.rotation_due(&chain) {
                    let _ = self.start_segment(&mut chain, true);
                }
                r
            }
            Err(_) => Err(std::io::Error::other("audit log lock poisoned")),
        };
        crate::metrics::METRICS.audit_written(started.elapsed(), result.is_ok());
        self.write_failed.store(result.is_err(), std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = &result {
            postern_tunnel::error_limited!(error = %e, dir = %self.dir.display(), event, "cannot write audit event");
        }
        result
    }

    /// Whether the log can take events: its last write succeeded and a file can be created
    /// in its directory (a segment rotation would need one). For `/readyz`.
    pub fn check_writable(&self) -> Result<(), String> {
        if self.write_failed.load(std::sync::atomic::Ordering::Relaxed) {
            return Err("the last audit event could not be written".into());
        }
        let probe = self.dir.join(".ready-probe");
        let made = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&probe);
        let _ = std::fs::remove_file(&probe);
        made.map(drop).map_err(|e| format!("cannot create a file in {}: {e}", self.dir.display()))
    }

    fn rotation_due(&self, chain: &Chain) -> bool {
        // A segment holding nothing but its anchor is never closed for its age.
        chain.segment_events > 1
            && (chain.len >= self.options.rotate_bytes
                || self.options.rotate_after.is_some_and(|a| chain.opened.elapsed() >= a))
    }

    /// Close the current segment (`close`: with a checkpoint and, if sealed, a final record)
    /// and continue the chain in a new one that starts with a signed anchor.
    fn start_segment(&self, chain: &mut Chain, close: bool) -> std::io::Result<()> {
        if close {
            if chain.since_checkpoint > 0 {
                self.checkpoint_locked(chain, None)?;
            }
            if let Some(s) = chain.sealer.as_mut() {
                let last = s.seal(b"", true)?;
                chain.file.write_all(&last)?;
            }
            chain.file.sync_data()?;
        }
        let previous = chain.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let (file, path, sealer, len) = create_segment(&self.dir, chain.seq + 1, &self.options)?;
        chain.file = file;
        chain.path = path;
        chain.sealer = sealer;
        chain.len = len;
        chain.opened = Instant::now();
        chain.broken = false;
        chain.segment_events = 0;
        tracing::info!(segment = %chain.path.display(), "audit log continues in a new segment");
        self.segment_closed.notify_one();
        self.checkpoint_locked(chain, Some(&previous))
    }

    /// Write one event; returns its id and line (without the newline).
    fn append(&self, chain: &mut Chain, event: &str, fields: Map<String, Value>) -> std::io::Result<(String, Vec<u8>)> {
        if chain.broken {
            self.start_segment(chain, false)?;
        }
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
        let sealed;
        let bytes = match chain.sealer.as_mut() {
            Some(s) => {
                sealed = s.seal(&line, false)?;
                &sealed
            }
            None => &line,
        };
        if let Err(e) = chain.file.write_all(bytes).and_then(|()| chain.file.flush()) {
            // A partial line (disk full) is cut off again so the log stays whole lines.
            let _ = chain.file.set_len(chain.len);
            chain.broken = chain.sealer.is_some();
            return Err(e);
        }
        chain.len += bytes.len() as u64;
        chain.seq += 1;
        chain.last_hash = hash;
        chain.since_checkpoint += 1;
        chain.segment_events += 1;
        line.pop();
        Ok((id, line))
    }

    /// Write a signed checkpoint over the last line; `segment_start` names the previous
    /// segment when this checkpoint is the first line of a new one.
    fn checkpoint_locked(&self, chain: &mut Chain, segment_start: Option<&str>) -> std::io::Result<()> {
        let Some(signer) = &self.signer else { return Ok(()) };
        let sig = signer.key.sign(&checkpoint_message(chain.seq, &chain.last_hash));
        let event = events::Event::AuditCheckpoint(events::AuditCheckpoint {
            covers_seq: chain.seq,
            covers_hash: chain.last_hash.clone(),
            key_id: signer.key_id.clone(),
            sig: hex(sig.as_ref()),
            segment_start: segment_start.map(str::to_owned),
        });
        let fields = event.fields().map_err(std::io::Error::other)?;
        self.append(chain, event.name(), fields)?;
        chain.file.sync_data()?;
        chain.since_checkpoint = 0;
        chain.last_checkpoint = Instant::now();
        self.checkpointed
            .send_replace(Some(postern_core::store::AuditAnchor { seq: chain.seq, hash: chain.last_hash.clone() }));
        Ok(())
    }

    /// Write a signed checkpoint if events were added since the last one and `force` or
    /// [`CHECKPOINT_EVERY`] has passed; start a new segment if the current one is old enough.
    pub fn checkpoint(&self, force: bool) -> std::io::Result<()> {
        let Ok(mut chain) = self.inner.lock() else { return Err(std::io::Error::other("audit log lock poisoned")) };
        if chain.since_checkpoint > 0 && (force || chain.last_checkpoint.elapsed() >= CHECKPOINT_EVERY) {
            self.checkpoint_locked(&mut chain, None)?;
        }
        if !force && self.rotation_due(&chain) {
            self.start_segment(&mut chain, true)?;
        }
        Ok(())
    }

    /// Start a new segment now (`postern audit rotate`, tests).
    pub fn rotate(&self) -> std::io::Result<()> {
        let Ok(mut chain) = self.inner.lock() else { return Err(std::io::Error::other("audit log lock poisoned")) };
        self.start_segment(&mut chain, true)
    }
}

/// Count the events that are metrics too (sessions started, denied and terminated,
/// authentication failures), whether or not they can be written.
fn count(e: &events::Event) {
    use crate::metrics::{Door, METRICS};
    use events::{Event, SessionDenied, SessionStart};
    use postern_core::Action;
    let door_named = |door: &Option<String>| if door.as_deref() == Some("web") { Door::Web } else { Door::Ssh };
    let door_of_kind = |kind: Action| if kind == Action::Rdp { Door::Rdp } else { Door::Ssh };
    match e {
        Event::SessionStart(SessionStart::Ssh(s)) => METRICS.session_started(door_named(&s.door), s.kind),
        Event::SessionStart(SessionStart::AdminSocket(s)) => METRICS.session_started(Door::Admin, s.kind),
        Event::ForwardOpen(_) => METRICS.session_started(Door::Ssh, Action::PortForward),
        Event::PassthroughOpen(_) => METRICS.session_started(Door::Ssh, Action::SshPassthrough),
        Event::RdpOpen(_) => METRICS.session_started(Door::Rdp, Action::Rdp),
        Event::SessionDenied(SessionDenied::Ssh(d)) => METRICS.session_denied(door_named(&d.door)),
        // A summary of refusals stands for `count` of them.
        Event::SessionDenied(SessionDenied::Rdp(d)) => METRICS.sessions_denied(Door::Rdp, d.count.unwrap_or(1)),
        Event::SessionDenied(SessionDenied::RdpToken(_)) => METRICS.session_denied(Door::Rdp),
        Event::SessionTerminated(t) => METRICS.session_terminated(door_of_kind(t.kind), t.kind),
        Event::AuthFailed(_) => METRICS.auth_failed(Door::Ssh),
        Event::LoginFailed(f) => METRICS.auth_failed(if f.flow == "web" { Door::Web } else { Door::Ssh }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    /// docs/audit.md lists every event in its table and shows one real example of each.
    #[test]
    fn audit_doc_has_an_example_for_every_listed_event() {
        let doc = include_str!("../../../docs/audit.md");
        let events = doc.split("## Events").nth(1).unwrap().split("### One example").next().unwrap();
        let mut listed = Vec::new();
        for row in events.lines().filter(|l| l.starts_with("| `")) {
            let first = row.split('|').nth(1).unwrap();
            for name in first.split('`').skip(1).step_by(2) {
                listed.push(name.to_owned());
            }
        }
        assert!(listed.len() > 30, "{listed:?}");
        let block = doc.split("### One example of each").nth(1).unwrap();
        let json = block.split("```json\n").nth(1).unwrap().split("```").next().unwrap();
        let mut shown = std::collections::BTreeSet::new();
        for line in json.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            for field in ["v", "seq", "id", "time", "event", "prev"] {
                assert!(v.get(field).is_some(), "{field} missing in {line}");
            }
            shown.insert(v["event"].as_str().unwrap().to_owned());
        }
        let exempt = ["rdp.failed", "agent.bulk_enrolled"];
        for name in &listed {
            assert!(shown.contains(name) || exempt.contains(&name.as_str()), "no example for {name}");
        }
        for name in &shown {
            assert!(listed.contains(name), "example for {name}, which the table does not list");
        }
    }

    use super::*;
    use serde_json::json;

    /// Every line of the log, all segments in order (clear segments only).
    fn all_lines(dir: &Path) -> Vec<String> {
        segments(dir)
            .unwrap()
            .iter()
            .flat_map(|(_, p)| std::fs::read_to_string(p).unwrap().lines().map(str::to_owned).collect::<Vec<_>>())
            .collect()
    }

    fn signing_key() -> Ed25519KeyPair {
        Ed25519KeyPair::from_pkcs8(Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap().as_ref())
            .unwrap()
    }

    #[test]
    fn events_are_chained_json_lines_with_version() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        log.record("token.created", json!({"labels": {"env": "dev"}})).unwrap();
        log.record("agent.connected", json!({"agent_id": "ag-1"})).unwrap();
        drop(log);
        // Reopening continues the chain (in the same clear segment).
        AuditLog::open(dir.path()).unwrap().record("agent.disconnected", json!({})).unwrap();
        assert_eq!(segments(dir.path()).unwrap().len(), 1);
        let raw = all_lines(dir.path());
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
    fn a_cluster_gateways_segments_carry_its_id_and_a_restart_starts_a_new_one() {
        assert_eq!(segment_name(7, false), "events-000000000007.jsonl");
        assert_eq!(segment_name_of(Some("gw-a"), 7, true), "events-gw-a-000000000007.jsonl.sealed");
        assert_eq!(parse_segment_name("events-000000000007.jsonl"), Some((None, 7)));
        assert_eq!(parse_segment_name("events-gw-b-2-000000000042.jsonl.sealed"), Some((Some("gw-b-2"), 42)));
        for bad in ["events-.jsonl", "events--000000000001.jsonl", "events-gw-a-.jsonl", "events-gw-a-12x.jsonl"] {
            assert_eq!(parse_segment_name(bad), None, "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let opts = LogOptions { gateway_id: Some("gw-a".into()), ..LogOptions::default() };
        let log = AuditLog::open_signed(dir.path(), signing_key(), opts.clone()).unwrap();
        log.record("a", json!({})).unwrap();
        drop(log);
        let log = AuditLog::open_signed(dir.path(), signing_key(), opts).unwrap();
        log.record("b", json!({})).unwrap();
        let names: Vec<String> = segments(dir.path())
            .unwrap()
            .iter()
            .map(|(_, p)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["events-gw-a-000000000001.jsonl", "events-gw-a-000000000002.jsonl"]);
        assert_eq!(log.closed_segments().len(), 1);
    }

    #[test]
    fn a_torn_last_line_is_closed_before_the_next_event() {
        let dir = tempfile::tempdir().unwrap();
        AuditLog::open(dir.path()).unwrap().record("a", json!({})).unwrap();
        let path = segments(dir.path()).unwrap()[0].1.clone();
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"v\":1,\"seq\":2,\"tor").unwrap();
        drop(f);
        AuditLog::open(dir.path()).unwrap().record("b", json!({})).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(serde_json::from_str::<Value>(text.lines().last().unwrap()).is_ok());
    }

    #[test]
    fn segments_rotate_by_size_and_each_new_one_starts_with_a_signed_anchor() {
        let dir = tempfile::tempdir().unwrap();
        let key = signing_key();
        let public = key.public_key().as_ref().to_vec();
        let opts = LogOptions { rotate_bytes: 2000, ..LogOptions::default() };
        let log = AuditLog::open_signed(dir.path(), key, opts).unwrap();
        for i in 0..40 {
            log.record("session.start", json!({"n": i})).unwrap();
        }
        let segs = segments(dir.path()).unwrap();
        assert!(segs.len() >= 4, "{segs:?}");
        assert_eq!(log.closed_segments().len(), segs.len() - 1);
        for (first, path) in segs.iter().skip(1) {
            let text = std::fs::read_to_string(path).unwrap();
            let anchor: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
            assert_eq!(anchor["event"], "audit.checkpoint");
            assert_eq!(anchor["seq"], *first);
            assert!(anchor["segment_start"].as_str().unwrap().starts_with("events-"));
        }
        // The chain runs on across segments and verifies.
        let texts: Vec<Vec<u8>> = segs.iter().map(|(_, p)| std::fs::read(p).unwrap()).collect();
        let parts: Vec<verify::Part<'_>> = segs
            .iter()
            .zip(&texts)
            .map(|((_, p), t)| verify::Part { name: p.display().to_string(), text: t, ending: None })
            .collect();
        let r = verify::verify_parts(&parts, Some(&public), None);
        assert!(r.ok(), "{:?}", r.problems);
        assert_eq!(r.segments, segs.len());
    }

    #[test]
    fn segments_rotate_by_age_but_never_for_an_anchor_alone() {
        let dir = tempfile::tempdir().unwrap();
        let age = Duration::from_millis(50);
        let log = AuditLog::open_signed(
            dir.path(),
            signing_key(),
            LogOptions { rotate_after: Some(age), ..LogOptions::default() },
        )
        .unwrap();
        log.record("a", json!({})).unwrap();
        log.record("b", json!({})).unwrap();
        log.checkpoint(false).unwrap();
        assert_eq!(segments(dir.path()).unwrap().len(), 1, "too young to rotate");
        // The passing of time is what is tested here.
        std::thread::sleep(age * 2);
        log.checkpoint(false).unwrap();
        assert_eq!(segments(dir.path()).unwrap().len(), 2, "rotated by age");
        std::thread::sleep(age * 2);
        log.checkpoint(false).unwrap();
        assert_eq!(segments(dir.path()).unwrap().len(), 2, "a segment holding only its anchor stays open");
        log.record("c", json!({})).unwrap();
        assert_eq!(segments(dir.path()).unwrap().len(), 3, "an event in an old segment rotates it");
    }

    #[test]
    fn a_sealed_log_hides_its_events_and_continues_in_a_new_segment_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let keys = seal::Keyring::new(vec![std::sync::Arc::new(seal::FileKey::from_bytes(&[3; 32]).unwrap())]);
        let opts = LogOptions { keyring: keys.clone(), ..LogOptions::default() };
        let public;
        {
            let key = signing_key();
            public = key.public_key().as_ref().to_vec();
            let log = AuditLog::open_signed(dir.path(), key, opts.clone()).unwrap();
            log.record("session.start", json!({"user": "alice-secret-name"})).unwrap();
        }
        // Reopening with another signing key is fine for this test: only the chain matters.
        let key2 = signing_key();
        let log = AuditLog::open_signed(dir.path(), key2, opts).unwrap();
        log.record("session.end", json!({})).unwrap();
        let segs = segments(dir.path()).unwrap();
        assert_eq!(segs.len(), 2);
        for (_, p) in &segs {
            assert!(p.to_string_lossy().ends_with(".jsonl.sealed"));
            let raw = std::fs::read(p).unwrap();
            assert!(!raw.windows(5).any(|w| w == b"alice"), "plaintext in a sealed segment");
        }
        let first = seal::Plain::read_all(&segs[0].1, &keys).unwrap().0;
        assert!(String::from_utf8_lossy(&first).contains("alice-secret-name"));
        let second = seal::Plain::read_all(&segs[1].1, &keys).unwrap().0;
        let anchor: Value = serde_json::from_slice(second.split(|b| *b == b'\n').next().unwrap()).unwrap();
        assert_eq!(anchor["seq"], 2);
        assert_eq!(anchor["prev"].as_str().unwrap(), line_hash(first.strip_suffix(b"\n").unwrap()));
        let _ = public;
        // Without the key the log cannot be continued: a clear error, nothing overwritten.
        let e = format!("{:#}", AuditLog::open(dir.path()).unwrap_err());
        assert!(e.contains("not configured here"), "{e}");
        assert_eq!(segments(dir.path()).unwrap().len(), 2);
    }
}
