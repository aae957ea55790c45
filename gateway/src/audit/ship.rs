//! Copies of closed event-log segments and finished recordings in S3-compatible object
//! storage, and the audit anchor (the last signed checkpoint) beside them: a second copy of
//! the anchor outside the gateway's disk, so that cutting the log back and lowering the
//! anchor in the database is still seen.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, PutPayload, RetryConfig, WriteMultipart};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::events::{AuditSink, Event, SinkState};

/// `[audit.s3]`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix: objects are `PREFIX/audit/events-….jsonl[.sealed]`,
    /// `PREFIX/recordings/SESSION.cast[.sealed]`, and the audit anchor `PREFIX/anchor.json`
    /// with its history `PREFIX/anchors/SEQ.json`. A gateway of a cluster keeps the same
    /// layout under `PREFIX/gateways/GATEWAY_ID/`, so gateways sharing a bucket never
    /// write each other's objects.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Endpoint of an S3-compatible service ("http://127.0.0.1:9000"); default: AWS.
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    /// Credentials; default: the AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY environment.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Allow a plain-http endpoint (test set-ups only).
    #[serde(default)]
    pub allow_http: bool,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key.as_ref().map(|_| "(set)"))
            .field("allow_http", &self.allow_http)
            .finish()
    }
}

fn default_prefix() -> String {
    "postern".into()
}

fn default_region() -> String {
    "us-east-1".into()
}

/// What a file is, for its object key and its upload marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Segment,
    Recording,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Segment => "audit",
            Kind::Recording => "recordings",
        }
    }
}

/// Longest one upload may take before it counts as failed.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(300);
/// Files above this size are uploaded in parts of this size.
const PART: usize = 16 << 20;
/// Retry delays while the store is unreachable: doubling from the first to the second.
const BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));
/// Look for new segments at least this often (closing a segment or a recording also wakes
/// the shipper).
const SCAN_EVERY: Duration = Duration::from_secs(30);
/// List the whole recordings directory this often (and at start, after a failed pass, or
/// when too many finished recordings were queued); in between, a pass uploads the
/// recordings sessions handed over as they ended, so a busy gateway with a large archive
/// does not list it at every session end.
const FULL_SCAN_EVERY: Duration = Duration::from_secs(600);
/// Finished recordings queued for the next pass, at most (more: a full scan finds them).
const MAX_QUEUED: usize = 4096;
/// The anchor object, overwritten at every upload, and the folder of its history.
const ANCHOR: &str = "anchor.json";
const HISTORY: &str = "anchors";
/// Longest one anchor request may take.
const ANCHOR_TIMEOUT: Duration = Duration::from_secs(30);
/// Pages (1000 keys each) of anchor history read at most when looking for the newest.
const MAX_ANCHOR_PAGES: usize = 1000;
/// The folder under the prefix holding each cluster gateway's objects.
const GATEWAYS: &str = "gateways";
/// Pages (1000 keys each) read at most when listing a gateway's segments or the gateways:
/// a million segments (64 MiB each by default) is far beyond any log; more is an error.
const MAX_LIST_PAGES: usize = 1000;

/// The audit anchor as kept in the object store: the last signed checkpoint's seq and line
/// hash, the signing key's id, and when it was uploaded (RFC 3339).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct S3Anchor {
    pub v: u32,
    pub seq: u64,
    pub hash: String,
    pub key_id: Option<String>,
    pub time: String,
}

/// `anchors/SEQ.json`, the seq zero-padded so that names sort by it.
fn history_name(seq: u64) -> String {
    format!("{HISTORY}/{seq:020}.json")
}

/// The seq of a history object's name (`SEQ.json`, without the folder).
fn seq_of_history(name: &str) -> Option<u64> {
    name.strip_suffix(".json").filter(|n| n.len() == 20).and_then(|n| n.parse().ok())
}

/// Uploads closed files to the object store, and remembers (in marker files under
/// `DATA_DIR/uploaded/`) what is there. The local directory is the spool: nothing is
/// deleted locally before it is uploaded.
pub struct Shipper {
    store: Arc<dyn ObjectStore>,
    /// The same store, for listings that start at a key (the anchor's history).
    s3: Arc<AmazonS3>,
    bucket: String,
    prefix: String,
    markers: PathBuf,
    /// The cluster gateway whose folder this is (None: directly under the prefix).
    gateway_id: Option<String>,
    wake: tokio::sync::Notify,
    /// Recordings finished since the last pass, and whether some did not fit.
    queued: std::sync::Mutex<(Vec<PathBuf>, bool)>,
    /// Files waiting for upload at the last pass.
    pending: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Shipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shipper").field("store", &self.store.to_string()).field("prefix", &self.prefix).finish()
    }
}

impl Shipper {
    pub fn new(cfg: &S3Config, data_dir: &Path) -> anyhow::Result<Self> {
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_retry(RetryConfig {
                max_retries: 2,
                retry_timeout: Duration::from_secs(30),
                ..RetryConfig::default()
            })
            .with_client_options(
                // Options set here replace the builder's, so allow_http belongs here too.
                ClientOptions::new()
                    .with_allow_http(cfg.allow_http)
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(120)),
            );
        if let Some(e) = &cfg.endpoint {
            b = b.with_endpoint(e);
        }
        if let Some(k) = &cfg.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(k) = &cfg.secret_access_key {
            b = b.with_secret_access_key(k);
        }
        let s3 = Arc::new(b.build().context("[audit.s3]")?);
        Ok(Self {
            store: s3.clone(),
            s3,
            bucket: cfg.bucket.clone(),
            prefix: cfg.prefix.trim_matches('/').to_owned(),
            markers: data_dir.join("uploaded"),
            gateway_id: None,
            wake: tokio::sync::Notify::new(),
            queued: std::sync::Mutex::new((Vec::new(), false)),
            pending: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    fn marker(&self, kind: Kind, path: &Path) -> Option<PathBuf> {
        path.file_name().map(|n| self.markers.join(kind.dir()).join(n))
    }

    /// Whether `path` is in the object store already.
    pub fn is_uploaded(&self, kind: Kind, path: &Path) -> bool {
        self.marker(kind, path).is_some_and(|m| m.exists())
    }

    /// A session's recording is complete: upload it at the next pass, which starts now.
    pub fn recording_finished(&self, path: &Path) {
        if let Ok(mut q) = self.queued.lock() {
            if q.0.len() < MAX_QUEUED {
                q.0.push(path.to_owned());
            } else {
                q.1 = true;
            }
        }
        self.wake.notify_one();
    }

    /// Recordings queued since the last pass, and whether the queue overflowed.
    fn take_queued(&self) -> (Vec<PathBuf>, bool) {
        self.queued.lock().map(|mut q| std::mem::take(&mut *q)).unwrap_or((Vec::new(), true))
    }

    /// Files waiting for upload, as of the last pass.
    pub fn pending(&self) -> usize {
        self.pending.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The same store for the objects of cluster gateway `gateway_id` (its own folder
    /// `PREFIX/gateways/ID/`); `None`: a single gateway's, directly under the prefix.
    #[must_use]
    pub fn for_gateway(mut self, gateway_id: Option<&str>) -> Self {
        if let Some(id) = gateway_id {
            self.prefix = self.object(&format!("{GATEWAYS}/{id}"));
            self.gateway_id = Some(id.to_owned());
        }
        self
    }

    /// The cluster gateway whose folder this is (None: a single gateway's objects).
    pub fn gateway_id(&self) -> Option<&str> {
        self.gateway_id.as_deref()
    }

    /// Every key under `PREFIX/FOLDER/` (sorted), or the sub-folder names there when
    /// `folders`; an error beyond [`MAX_LIST_PAGES`] pages.
    async fn list(&self, folder: &str, folders: bool) -> anyhow::Result<Vec<String>> {
        let prefix = format!("{}/", self.object(folder));
        let mut opts = PaginatedListOptions {
            delimiter: folders.then_some(std::borrow::Cow::Borrowed("/")),
            ..PaginatedListOptions::default()
        };
        let mut out = Vec::new();
        for _ in 0..MAX_LIST_PAGES {
            let page = tokio::time::timeout(ANCHOR_TIMEOUT, self.s3.list_paginated(Some(&prefix), opts.clone()))
                .await
                .map_err(|_| anyhow::anyhow!("the object store did not answer within {}s", ANCHOR_TIMEOUT.as_secs()))?
                .with_context(|| format!("listing s3://{}/{prefix}", self.bucket))?;
            if folders {
                out.extend(page.result.common_prefixes.iter().filter_map(|p| {
                    let p = p.to_string();
                    p.strip_prefix(&prefix).map(|n| n.trim_end_matches('/').to_owned()).filter(|n| !n.is_empty())
                }));
            } else {
                out.extend(page.result.objects.iter().map(|o| o.location.to_string()));
            }
            match page.page_token {
                Some(t) => opts.page_token = Some(t),
                None => {
                    out.sort();
                    out.dedup();
                    return Ok(out);
                }
            }
        }
        anyhow::bail!("more than {MAX_LIST_PAGES} pages of keys under s3://{}/{prefix}", self.bucket)
    }

    /// The cluster gateways with a folder in the bucket (`PREFIX/gateways/ID/`), sorted.
    pub async fn gateways(&self) -> anyhow::Result<Vec<String>> {
        self.list(GATEWAYS, true).await
    }

    /// The names of the segments in the store (this gateway's), oldest first.
    pub async fn segment_names(&self) -> anyhow::Result<Vec<String>> {
        let keys = self.list(Kind::Segment.dir(), false).await?;
        let mut named: Vec<(u64, String)> = keys
            .iter()
            .filter_map(|k| k.rsplit('/').next())
            .filter_map(|n| super::parse_segment_name(n).map(|(_, seq)| (seq, n.to_owned())))
            .collect();
        named.sort();
        Ok(named.into_iter().map(|(_, n)| n).collect())
    }

    /// The object key of a file.
    pub fn key(&self, kind: Kind, path: &Path) -> String {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if self.prefix.is_empty() {
            format!("{}/{name}", kind.dir())
        } else {
            format!("{}/{}/{name}", self.prefix, kind.dir())
        }
    }

    /// Copy the stored object of the file `file_name` to `dest` (created new, mode 0600),
    /// in pieces of [`PART`] so memory stays bounded. `Ok(false)`: the store has no such
    /// object.
    pub async fn fetch(&self, kind: Kind, file_name: &str, dest: &Path) -> anyhow::Result<bool> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let location = ObjectPath::from(self.key(kind, Path::new(file_name)));
        let late = || format!("the object store did not answer within {}s", UPLOAD_TIMEOUT.as_secs());
        let meta = match tokio::time::timeout(UPLOAD_TIMEOUT, self.store.head(&location)).await {
            Err(_) => anyhow::bail!(late()),
            Ok(Err(object_store::Error::NotFound { .. })) => return Ok(false),
            Ok(r) => r.with_context(|| format!("looking up {location}"))?,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dest)
            .with_context(|| format!("creating {}", dest.display()))?;
        let mut at = 0u64;
        while at < meta.size {
            let end = (at + PART as u64).min(meta.size);
            let piece = tokio::time::timeout(UPLOAD_TIMEOUT, self.store.get_range(&location, at..end))
                .await
                .map_err(|_| anyhow::anyhow!(late()))?
                .with_context(|| format!("reading {location}"))?;
            file.write_all(&piece).with_context(|| format!("writing {}", dest.display()))?;
            at = end;
        }
        Ok(true)
    }

    /// The object of the file `path`: `s3://BUCKET/PREFIX/KIND/NAME`.
    pub fn url(&self, kind: Kind, path: &Path) -> String {
        format!("s3://{}/{}", self.bucket, self.key(kind, path))
    }

    /// Where objects of `kind` are kept, for messages: `s3://BUCKET/PREFIX/KIND/`.
    pub fn location(&self, kind: Kind) -> String {
        format!("s3://{}/{}", self.bucket, self.key(kind, Path::new("")))
    }

    /// The object key of `name` under the prefix.
    fn object(&self, name: &str) -> String {
        if self.prefix.is_empty() { name.to_owned() } else { format!("{}/{name}", self.prefix) }
    }

    /// Where the anchor is kept, for messages: `s3://BUCKET/PREFIX/anchor.json`.
    pub fn anchor_location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.object(ANCHOR))
    }

    /// Upload `anchor`: first as `PREFIX/anchors/SEQ.json`, a new object per checkpoint
    /// (under S3 object lock, a history nobody can lower), then over `PREFIX/anchor.json`.
    pub async fn put_anchor(&self, anchor: &S3Anchor) -> anyhow::Result<()> {
        let body = serde_json::to_vec(anchor)?;
        for key in [self.object(&history_name(anchor.seq)), self.object(ANCHOR)] {
            let location = ObjectPath::from(key);
            tokio::time::timeout(ANCHOR_TIMEOUT, self.store.put(&location, PutPayload::from(body.clone())))
                .await
                .map_err(|_| anyhow::anyhow!("the object store did not answer within {}s", ANCHOR_TIMEOUT.as_secs()))?
                .with_context(|| format!("uploading {location}"))?;
        }
        Ok(())
    }

    /// The newest anchor in the store: `PREFIX/anchor.json`, unless the history holds a
    /// later checkpoint (then `anchor.json` was lowered or lost, and the later one wins).
    /// `None`: the store has no anchor yet. Returns the anchor and the object it came from.
    pub async fn get_anchor(&self) -> anyhow::Result<Option<(S3Anchor, String)>> {
        let late = || anyhow::anyhow!("the object store did not answer within {}s", ANCHOR_TIMEOUT.as_secs());
        let latest = ObjectPath::from(self.object(ANCHOR));
        let mut best: Option<(S3Anchor, String)> =
            match tokio::time::timeout(ANCHOR_TIMEOUT, self.store.get(&latest)).await.map_err(|_| late())? {
                Ok(got) => {
                    let bytes = tokio::time::timeout(ANCHOR_TIMEOUT, got.bytes())
                        .await
                        .map_err(|_| late())?
                        .with_context(|| format!("reading {latest}"))?;
                    let anchor = serde_json::from_slice::<S3Anchor>(&bytes)
                        .with_context(|| format!("{latest} is not an audit anchor"))?;
                    Some((anchor, latest.to_string()))
                }
                Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => return Err(e).with_context(|| format!("reading {latest}")),
            };
        // History names sort by seq: list only those after the latest's (usually none).
        let prefix = format!("{}/", self.object(HISTORY));
        let mut opts = PaginatedListOptions {
            offset: best.as_ref().map(|(a, _)| self.object(&history_name(a.seq))),
            ..PaginatedListOptions::default()
        };
        let mut newest: Option<String> = None;
        for _ in 0..MAX_ANCHOR_PAGES {
            let page = tokio::time::timeout(ANCHOR_TIMEOUT, self.s3.list_paginated(Some(&prefix), opts.clone()))
                .await
                .map_err(|_| late())?
                .with_context(|| format!("listing s3://{}/{prefix}", self.bucket))?;
            for o in page.result.objects {
                let key = o.location.to_string();
                if key.strip_prefix(&prefix).and_then(seq_of_history).is_some()
                    && newest.as_ref().is_none_or(|n| key > *n)
                {
                    newest = Some(key);
                }
            }
            match page.page_token {
                Some(t) => opts.page_token = Some(t),
                None => break,
            }
        }
        if let Some(key) = newest {
            let location = ObjectPath::from(key.clone());
            let got = tokio::time::timeout(ANCHOR_TIMEOUT, self.store.get(&location))
                .await
                .map_err(|_| late())?
                .with_context(|| format!("reading {location}"))?;
            let bytes = tokio::time::timeout(ANCHOR_TIMEOUT, got.bytes()).await.map_err(|_| late())??;
            let anchor = serde_json::from_slice::<S3Anchor>(&bytes)
                .with_context(|| format!("{location} is not an audit anchor"))?;
            // The seq in the name counts, whatever the content says: it cannot be lowered by
            // rewriting the object.
            let named = key.strip_prefix(&prefix).and_then(seq_of_history).unwrap_or(anchor.seq);
            if best.as_ref().is_none_or(|(b, _)| named > b.seq) {
                best = Some((S3Anchor { seq: named.max(anchor.seq), ..anchor }, format!("s3://{}/{key}", self.bucket)));
            }
        }
        Ok(best.map(|(a, from)| {
            let from = if from.starts_with("s3://") { from } else { format!("s3://{}/{from}", self.bucket) };
            (a, from)
        }))
    }

    async fn upload(&self, kind: Kind, path: &Path) -> anyhow::Result<()> {
        use tokio::io::AsyncReadExt;
        let location = ObjectPath::from(self.key(kind, path));
        let mut file = tokio::fs::File::open(path).await.with_context(|| format!("opening {}", path.display()))?;
        let len = file.metadata().await?.len();
        if len <= PART as u64 {
            let mut bytes = Vec::with_capacity(len as usize);
            file.read_to_end(&mut bytes).await?;
            self.store.put(&location, PutPayload::from(bytes)).await?;
        } else {
            let upload = self.store.put_multipart(&location).await?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = file.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                w.write(buf.get(..n).unwrap_or_default());
                w.wait_for_capacity(2).await?;
            }
            w.finish().await?;
        }
        if let Some(m) = self.marker(kind, path) {
            if let Some(d) = m.parent() {
                std::fs::create_dir_all(d)?;
            }
            std::fs::write(&m, format!("{location}\n"))?;
        }
        Ok(())
    }

    /// Upload `todo` now (what is not uploaded yet), in order; stops at the first failure.
    /// Returns how many files were uploaded.
    pub async fn ship_now(&self, todo: &[(Kind, PathBuf)]) -> anyhow::Result<usize> {
        let mut n = 0;
        for (kind, path) in todo.iter().filter(|(k, p)| !self.is_uploaded(*k, p)) {
            tokio::time::timeout(UPLOAD_TIMEOUT, self.upload(*kind, path))
                .await
                .map_err(|_| anyhow::anyhow!("upload of {} timed out", path.display()))??;
            n += 1;
        }
        Ok(n)
    }

    /// Upload what `candidates` lists (files that are complete; recordings only when its
    /// argument, a full scan, is true) and the recordings handed over by
    /// [`Shipper::recording_finished`], until `shutdown`; while the store is unreachable,
    /// retry with backoff and keep everything spooled locally. The first failure and the
    /// recovery are audit events (`audit.sink`).
    pub async fn run(
        self: Arc<Self>,
        candidates: impl Fn(bool) -> Vec<(Kind, PathBuf)> + Send + 'static,
        audit: Arc<super::AuditLog>,
        shutdown: CancellationToken,
    ) {
        let mut backoff = BACKOFF.0;
        let mut down_since: Option<usize> = None;
        let mut uploaded_while_down = 0usize;
        let mut last_full: Option<std::time::Instant> = None;
        loop {
            let (queued, overflowed) = self.take_queued();
            let full = overflowed || down_since.is_some() || last_full.is_none_or(|t| t.elapsed() >= FULL_SCAN_EVERY);
            if full {
                last_full = Some(std::time::Instant::now());
            }
            let mut todo = candidates(full);
            // A full scan lists the queued recordings too (their sessions have ended).
            if !full {
                todo.extend(queued.into_iter().map(|p| (Kind::Recording, p)));
            }
            let todo: Vec<(Kind, PathBuf)> = todo.into_iter().filter(|(k, p)| !self.is_uploaded(*k, p)).collect();
            self.pending.store(todo.len(), std::sync::atomic::Ordering::Relaxed);
            let mut failure = None;
            for (kind, path) in &todo {
                if shutdown.is_cancelled() {
                    return;
                }
                match tokio::time::timeout(UPLOAD_TIMEOUT, self.upload(*kind, path)).await {
                    Ok(Ok(())) => {
                        uploaded_while_down += 1;
                        self.pending.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::debug!(file = %path.display(), "uploaded to the object store");
                    }
                    Ok(Err(e)) => {
                        failure = Some(format!("{e:#}"));
                        break;
                    }
                    Err(_) => {
                        failure = Some(format!("upload of {} timed out", path.display()));
                        break;
                    }
                }
            }
            let wait = match failure {
                Some(error) => {
                    if down_since.is_none() {
                        tracing::warn!(%error, pending = self.pending(), "object store unreachable; spooling locally");
                        let _ = audit.event(&Event::AuditSink(AuditSink {
                            sink: "s3".to_owned(),
                            state: SinkState::Unreachable { error, pending: count(self.pending()) },
                        }));
                        down_since = Some(self.pending());
                        uploaded_while_down = 0;
                    }
                    let w = backoff;
                    backoff = (backoff * 2).min(BACKOFF.1);
                    w
                }
                None => {
                    if down_since.take().is_some() {
                        tracing::info!(uploaded = uploaded_while_down, "object store reachable again");
                        let _ = audit.event(&Event::AuditSink(AuditSink {
                            sink: "s3".to_owned(),
                            state: SinkState::Recovered { uploaded: count(uploaded_while_down) },
                        }));
                    }
                    backoff = BACKOFF.0;
                    SCAN_EVERY
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = audit.segment_closed.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}
