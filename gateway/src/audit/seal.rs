//! Encryption at rest for recordings and event-log segments (envelope encryption).
//!
//! Every sealed file gets a fresh 256-bit AES-GCM **data key**, stored in the file's header
//! wrapped (encrypted) by a **master key** from a [`KeyProvider`]: a key file, or an external
//! command that talks to a KMS or vault. The file body is a sequence of records, each sealed
//! on its own so a file can be appended to while a session runs and read up to the last whole
//! record after a crash:
//!
//! ```text
//! POSTERN-SEALED/1\n
//! {"cipher":"aes-256-gcm","key_provider":"file","key_id":"…","wrapped_key":"<hex>"}\n
//! record*   = flags (1 byte: 1 = final) | length (u32 BE) | ciphertext and tag
//! ```
//!
//! Record `n` (from 0) uses nonce `0u32 || n as u64` (big-endian) and associated data
//! `n || flags`, so records cannot be reordered, dropped from the middle, or have their final
//! flag changed without failing authentication. A file whose last record is not marked final
//! was cut short (a crash, or truncation); readers say so.
//!
//! (Over 600 lines with its tests, on purpose: the sealed-file format, its writer, its reader
//! and the tamper tests that pin it down are one unit; the code alone is under 600.)

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use postern_core::util::{hex, unhex};

pub const MAGIC: &[u8] = b"POSTERN-SEALED/1\n";
/// Largest record a reader accepts (writers seal at most a few hundred KiB at a time).
pub const MAX_RECORD: usize = 16 << 20;
const TAG_LEN: usize = 16;
const FINAL: u8 = 1;
const WRAP_AAD: &[u8] = b"postern-data-key/v1";

/// Wraps and unwraps data keys with a master key the gateway may never see in full.
pub trait KeyProvider: Send + Sync + std::fmt::Debug {
    /// "file", "command", ...: recorded in each header for the reader's error messages.
    fn kind(&self) -> &'static str;
    /// Stable id of the master key; readers pick the provider whose id a header names.
    fn key_id(&self) -> &str;
    fn wrap(&self, data_key: &[u8; 32]) -> anyhow::Result<Vec<u8>>;
    fn unwrap_key(&self, wrapped: &[u8]) -> anyhow::Result<[u8; 32]>;
}

/// A master key held in a file: 64 hex digits (32 bytes), see `postern audit keygen`.
pub struct FileKey {
    key: LessSafeKey,
    id: String,
}

impl std::fmt::Debug for FileKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileKey").field("id", &self.id).finish_non_exhaustive()
    }
}

/// Id of a master key: the first 16 hex digits of a domain-separated SHA-256 of it.
pub fn master_key_id(key: &[u8]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"postern-master-key-id/v1");
    ctx.update(key);
    hex(ctx.finish().as_ref()).chars().take(16).collect()
}

impl FileKey {
    pub fn from_bytes(key: &[u8; 32]) -> anyhow::Result<Self> {
        let unbound = UnboundKey::new(&AES_256_GCM, key).map_err(|_| anyhow::anyhow!("bad master key"))?;
        Ok(Self { key: LessSafeKey::new(unbound), id: master_key_id(key) })
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading master key {}", path.display()))?;
        let bytes: [u8; 32] = unhex(text.trim()).and_then(|b| b.try_into().ok()).with_context(|| {
            format!(
                "{} is not a master key: expected 64 hex digits (create one with `postern audit keygen`)",
                path.display()
            )
        })?;
        Self::from_bytes(&bytes)
    }

    /// Create a new random key file (mode 0600); refuses to overwrite an existing file.
    pub fn generate(path: &Path) -> anyhow::Result<Self> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut key = [0u8; 32];
        SystemRandom::new().fill(&mut key).map_err(|_| anyhow::anyhow!("no randomness for the master key"))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
        f.write_all(format!("{}\n", hex(&key)).as_bytes())?;
        f.sync_all()?;
        Self::from_bytes(&key)
    }
}

impl KeyProvider for FileKey {
    fn kind(&self) -> &'static str {
        "file"
    }
    fn key_id(&self) -> &str {
        &self.id
    }
    fn wrap(&self, data_key: &[u8; 32]) -> anyhow::Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).map_err(|_| anyhow::anyhow!("no randomness"))?;
        let mut out = data_key.to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(WRAP_AAD), &mut out)
            .map_err(|_| anyhow::anyhow!("cannot wrap the data key"))?;
        let mut wrapped = nonce.to_vec();
        wrapped.extend_from_slice(&out);
        Ok(wrapped)
    }
    fn unwrap_key(&self, wrapped: &[u8]) -> anyhow::Result<[u8; 32]> {
        let (nonce, body) = wrapped.split_at_checked(NONCE_LEN).context("wrapped key too short")?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| anyhow::anyhow!("bad nonce"))?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(WRAP_AAD), &mut body)
            .map_err(|_| anyhow::anyhow!("the data key does not unwrap with master key {}", self.id))?;
        plain.try_into().map_err(|_| anyhow::anyhow!("unwrapped data key has the wrong length"))
    }
}

/// A master key behind an external program (a KMS or vault client):
/// `PROGRAM... id` prints the key id; `PROGRAM... wrap` and `PROGRAM... unwrap` read hex on
/// standard input and print hex. Each call must finish within [`COMMAND_TIMEOUT`].
#[derive(Debug)]
pub struct CommandKey {
    argv: Vec<String>,
    id: String,
}

pub const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl CommandKey {
    pub fn new(argv: Vec<String>) -> anyhow::Result<Self> {
        if argv.is_empty() {
            bail!("key_command is empty");
        }
        let mut k = Self { argv, id: String::new() };
        k.id = k.call("id", "")?;
        if k.id.is_empty() || !k.id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:/".contains(c)) {
            bail!("key_command `id` printed {:?}, not a key id", k.id);
        }
        Ok(k)
    }

    /// Runs the program; on the gateway's multi-threaded runtime the wait moves off the
    /// async worker (`block_in_place`), so a slow KMS does not stall the sessions on it.
    fn call(&self, verb: &str, input: &str) -> anyhow::Result<String> {
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| self.call_blocking(verb, input))
            }
            _ => self.call_blocking(verb, input),
        }
    }

    fn call_blocking(&self, verb: &str, input: &str) -> anyhow::Result<String> {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let (program, args) = self.argv.split_first().context("key_command is empty")?;
        let mut child = Command::new(program)
            .args(args)
            .arg(verb)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting key_command {program}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A program that does not read its input is fine; it only fails on its own.
            let _ = stdin.write_all(input.as_bytes()).and_then(|()| stdin.write_all(b"\n"));
        }
        let deadline = std::time::Instant::now() + COMMAND_TIMEOUT;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("key_command {program} {verb} did not finish within {}s", COMMAND_TIMEOUT.as_secs());
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        let mut out = String::new();
        let mut err = String::new();
        if let Some(mut o) = child.stdout.take() {
            o.read_to_string(&mut out)?;
        }
        if let Some(mut e) = child.stderr.take() {
            e.read_to_string(&mut err)?;
        }
        if !status.success() {
            bail!("key_command {program} {verb} failed ({status}): {}", err.trim());
        }
        Ok(out.trim().to_owned())
    }
}

impl KeyProvider for CommandKey {
    fn kind(&self) -> &'static str {
        "command"
    }
    fn key_id(&self) -> &str {
        &self.id
    }
    fn wrap(&self, data_key: &[u8; 32]) -> anyhow::Result<Vec<u8>> {
        let out = self.call("wrap", &hex(data_key))?;
        unhex(&out).filter(|w| !w.is_empty()).context("key_command wrap did not print hex")
    }
    fn unwrap_key(&self, wrapped: &[u8]) -> anyhow::Result<[u8; 32]> {
        let out = self.call("unwrap", &hex(wrapped))?;
        unhex(&out).and_then(|k| k.try_into().ok()).context("key_command unwrap did not print a 32-byte hex key")
    }
}

/// The master key a configuration section names: `key_file` or `key_command` (not both);
/// `None` when it names neither. `section` (`[audit.encryption]`, `[cluster]`) is for errors.
pub fn master_key(
    section: &str,
    key_file: Option<&Path>,
    key_command: Option<&[String]>,
) -> anyhow::Result<Option<Arc<dyn KeyProvider>>> {
    Ok(match (key_file, key_command) {
        (Some(_), Some(_)) => bail!("{section}: set key_file or key_command, not both"),
        (Some(f), None) => Some(Arc::new(FileKey::load(f).with_context(|| format!("{section} key_file"))?)),
        (None, Some(cmd)) => {
            Some(Arc::new(CommandKey::new(cmd.to_vec()).with_context(|| format!("{section} key_command"))?))
        }
        (None, None) => None,
    })
}

/// The master keys the gateway knows: the first seals new files; all of them open old ones
/// (keep a retired key here after rotating to a new one).
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    keys: Vec<Arc<dyn KeyProvider>>,
}

impl Keyring {
    pub fn new(keys: Vec<Arc<dyn KeyProvider>>) -> Self {
        Self { keys }
    }

    /// These keys, then those of `other` not already here.
    pub fn merged(mut self, other: &Keyring) -> Self {
        for k in &other.keys {
            if self.find(k.key_id()).is_none() {
                self.keys.push(k.clone());
            }
        }
        self
    }

    /// The key new files are sealed with; `None`: encryption at rest is off.
    pub fn active(&self) -> Option<&Arc<dyn KeyProvider>> {
        self.keys.first()
    }

    fn find(&self, id: &str) -> Option<&Arc<dyn KeyProvider>> {
        self.keys.iter().find(|k| k.key_id() == id)
    }

    fn ids(&self) -> String {
        if self.keys.is_empty() {
            "none".into()
        } else {
            self.keys.iter().map(|k| k.key_id().to_owned()).collect::<Vec<_>>().join(", ")
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    cipher: String,
    key_provider: String,
    key_id: String,
    wrapped_key: String,
}

/// Seals records for one file.
pub struct Sealer {
    key: LessSafeKey,
    next: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("next", &self.next).finish_non_exhaustive()
    }
}

fn nonce_and_aad(n: u64, flags: u8) -> ([u8; NONCE_LEN], [u8; 9]) {
    let mut nonce = [0u8; NONCE_LEN];
    nonce[4..].copy_from_slice(&n.to_be_bytes());
    let mut aad = [0u8; 9];
    aad[..8].copy_from_slice(&n.to_be_bytes());
    aad[8] = flags;
    (nonce, aad)
}

impl Sealer {
    /// A fresh data key wrapped by `master`; returns the sealer and the file header to write
    /// before any record.
    pub fn new(master: &dyn KeyProvider) -> anyhow::Result<(Self, Vec<u8>)> {
        let mut dk = [0u8; 32];
        SystemRandom::new().fill(&mut dk).map_err(|_| anyhow::anyhow!("no randomness for a data key"))?;
        let header = Header {
            cipher: "aes-256-gcm".into(),
            key_provider: master.kind().into(),
            key_id: master.key_id().into(),
            wrapped_key: hex(&master.wrap(&dk)?),
        };
        let unbound = UnboundKey::new(&AES_256_GCM, &dk).map_err(|_| anyhow::anyhow!("bad data key"))?;
        let mut bytes = MAGIC.to_vec();
        serde_json::to_writer(&mut bytes, &header)?;
        bytes.push(b'\n');
        Ok((Self { key: LessSafeKey::new(unbound), next: 0 }, bytes))
    }

    /// Seal `plain` as the next record, appending its bytes to `out`. `last` marks the end of
    /// the file: nothing may follow it.
    pub fn seal_into(&mut self, plain: &[u8], last: bool, out: &mut Vec<u8>) -> std::io::Result<()> {
        let flags = if last { FINAL } else { 0 };
        let (nonce, aad) = nonce_and_aad(self.next, flags);
        let len = u32::try_from(plain.len() + TAG_LEN)
            .ok()
            .filter(|l| *l as usize <= MAX_RECORD)
            .ok_or_else(|| std::io::Error::other("record too large to seal"))?;
        out.reserve(5 + plain.len() + TAG_LEN);
        out.push(flags);
        out.extend_from_slice(&len.to_be_bytes());
        let start = out.len();
        out.extend_from_slice(plain);
        let body = out.get_mut(start..).unwrap_or_default();
        let tag = self
            .key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), body)
            .map_err(|_| std::io::Error::other("sealing failed"))?;
        out.extend_from_slice(tag.as_ref());
        self.next += 1;
        Ok(())
    }

    pub fn seal(&mut self, plain: &[u8], last: bool) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.seal_into(plain, last, &mut out)?;
        Ok(out)
    }
}

/// Create the new file `path` (mode 0600, appended to) for what `keyring` seals: with its
/// header and sealer when there is an active key, clear otherwise. Returns the file, the
/// sealer and the header's length; on failure nothing is left behind.
pub fn create_file(path: &Path, keyring: &Keyring) -> std::io::Result<(std::fs::File, Option<Sealer>, u64)> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new().create_new(true).read(true).append(true).mode(0o600).open(path)?;
    let Some(key) = keyring.active() else { return Ok((file, None, 0)) };
    let sealed = Sealer::new(key.as_ref())
        .map_err(|e| std::io::Error::other(format!("{e:#}")))
        .and_then(|(sealer, header)| file.write_all(&header).map(|()| (sealer, header.len() as u64)));
    match sealed {
        Ok((sealer, len)) => Ok((file, Some(sealer), len)),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(e)
        }
    }
}

/// How a sealed file ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Not read to the end yet.
    Open,
    /// The final record was read.
    Complete,
    /// The file ends without a final record: the writer stopped (crash, or still writing),
    /// or the file was truncated.
    Unfinished,
    /// The last record is cut off mid-way (a crash during a write).
    Torn,
}

/// Reads the plaintext of a sealed file record by record (`Read` gives the records'
/// concatenation). A record that fails authentication is an error naming it.
pub struct Unsealer<R> {
    inner: R,
    key: LessSafeKey,
    next: u64,
    buf: Vec<u8>,
    pos: usize,
    pub ending: Ending,
    name: String,
}

impl<R> std::fmt::Debug for Unsealer<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Unsealer").field("name", &self.name).field("next", &self.next).finish_non_exhaustive()
    }
}

/// Read up to `buf.len()` bytes; fewer only at end of input.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(buf.get_mut(got..).unwrap_or_default()) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

impl<R: Read> Unsealer<R> {
    /// Read the header (after [`MAGIC`], which the caller has consumed) and unwrap the data
    /// key with the keyring's key of the id it names. `name` is used in errors.
    pub fn new(mut inner: R, keyring: &Keyring, name: &str) -> anyhow::Result<Self> {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        loop {
            if read_full(&mut inner, &mut b)? == 0 || line.len() > 4096 {
                bail!("{name}: damaged header");
            }
            if b[0] == b'\n' {
                break;
            }
            line.push(b[0]);
        }
        let header: Header = serde_json::from_slice(&line).with_context(|| format!("{name}: damaged header"))?;
        if header.cipher != "aes-256-gcm" {
            bail!("{name}: unknown cipher {:?}", header.cipher);
        }
        let Some(master) = keyring.find(&header.key_id) else {
            bail!(
                "{name} is encrypted with master key {} ({} provider), which is not configured here (configured: {}); \
                 give the right key with --master-key or [audit.encryption]",
                header.key_id,
                header.key_provider,
                keyring.ids()
            );
        };
        let wrapped = unhex(&header.wrapped_key).with_context(|| format!("{name}: damaged header"))?;
        let dk = master.unwrap_key(&wrapped).with_context(|| format!("{name}: wrong master key or damaged header"))?;
        let unbound = UnboundKey::new(&AES_256_GCM, &dk).map_err(|_| anyhow::anyhow!("bad data key"))?;
        Ok(Self {
            inner,
            key: LessSafeKey::new(unbound),
            next: 0,
            buf: Vec::new(),
            pos: 0,
            ending: Ending::Open,
            name: name.to_owned(),
        })
    }

    /// The next record's plaintext; `None` at the end (see [`Self::ending`]).
    pub fn next_record(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        if self.ending != Ending::Open {
            return Ok(None);
        }
        let mut head = [0u8; 5];
        match read_full(&mut self.inner, &mut head)? {
            0 => {
                self.ending = Ending::Unfinished;
                return Ok(None);
            }
            5 => {}
            _ => {
                self.ending = Ending::Torn;
                return Ok(None);
            }
        }
        let flags = head[0];
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
        if flags & !FINAL != 0 || !(TAG_LEN..=MAX_RECORD).contains(&len) {
            return Err(bad(&format!("{}: record {} is damaged (bad length or flags)", self.name, self.next)));
        }
        let mut body = vec![0u8; len];
        if read_full(&mut self.inner, &mut body)? < len {
            self.ending = Ending::Torn;
            return Ok(None);
        }
        let (nonce, aad) = nonce_and_aad(self.next, flags);
        let plain_len = self
            .key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut body)
            .map_err(|_| {
                bad(&format!("{}: record {} fails authentication (damaged or tampered)", self.name, self.next))
            })?
            .len();
        body.truncate(plain_len);
        self.next += 1;
        if flags & FINAL != 0 {
            self.ending = Ending::Complete;
            let mut extra = [0u8; 1];
            if read_full(&mut self.inner, &mut extra)? != 0 {
                return Err(bad(&format!("{}: data after the final record", self.name)));
            }
        }
        Ok(Some(body))
    }
}

impl<R: Read> Read for Unsealer<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.buf.len() {
            match self.next_record()? {
                Some(b) => {
                    self.buf = b;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let n = rest.len().min(out.len());
        for (o, r) in out.iter_mut().zip(rest) {
            *o = *r;
        }
        self.pos += n;
        Ok(n)
    }
}

/// A file's plaintext: sealed files are decrypted with `keyring`, others read as they are.
pub enum Plain {
    Clear(std::fs::File),
    Sealed(Box<Unsealer<std::io::BufReader<std::fs::File>>>),
}

impl std::fmt::Debug for Plain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Plain::Clear(_) => "Plain::Clear",
            Plain::Sealed(_) => "Plain::Sealed",
        })
    }
}

impl Plain {
    pub fn open(path: &Path, keyring: &Keyring) -> anyhow::Result<Self> {
        use std::io::{Seek, SeekFrom};
        let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut magic = [0u8; MAGIC.len()];
        let n = read_full(&mut file, &mut magic)?;
        if n == MAGIC.len() && magic == MAGIC {
            let r = std::io::BufReader::with_capacity(256 * 1024, file);
            Ok(Plain::Sealed(Box::new(Unsealer::new(r, keyring, &path.display().to_string())?)))
        } else {
            file.seek(SeekFrom::Start(0))?;
            Ok(Plain::Clear(file))
        }
    }

    /// How a sealed file ended (after reading it to the end); `None` for a clear file.
    pub fn ending(&self) -> Option<Ending> {
        match self {
            Plain::Clear(_) => None,
            Plain::Sealed(u) => Some(u.ending),
        }
    }

    /// Read the whole plaintext.
    pub fn read_all(path: &Path, keyring: &Keyring) -> anyhow::Result<(Vec<u8>, Option<Ending>)> {
        let mut p = Self::open(path, keyring)?;
        let mut out = Vec::new();
        p.read_to_end(&mut out).with_context(|| format!("reading {}", path.display()))?;
        Ok((out, p.ending()))
    }
}

impl Read for Plain {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Plain::Clear(f) => f.read(buf),
            Plain::Sealed(u) => u.read(buf),
        }
    }
}

/// Whether a file starts like a sealed file.
pub fn is_sealed(path: &Path) -> bool {
    let mut magic = [0u8; MAGIC.len()];
    std::fs::File::open(path).and_then(|mut f| read_full(&mut f, &mut magic)).is_ok_and(|n| n == MAGIC.len())
        && magic == MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_with(key: &[u8; 32]) -> Keyring {
        Keyring::new(vec![Arc::new(FileKey::from_bytes(key).unwrap())])
    }

    fn sealed_file(dir: &Path, keys: &Keyring, records: &[&[u8]], finish: bool) -> std::path::PathBuf {
        let (mut s, mut bytes) = Sealer::new(keys.active().unwrap().as_ref()).unwrap();
        for r in records {
            s.seal_into(r, false, &mut bytes).unwrap();
        }
        if finish {
            s.seal_into(b"", true, &mut bytes).unwrap();
        }
        let p = dir.join("f.sealed");
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn round_trip_and_endings() {
        let dir = tempfile::tempdir().unwrap();
        let keys = ring_with(&[7; 32]);
        let p = sealed_file(dir.path(), &keys, &[b"hello ", b"world\n"], true);
        let raw = std::fs::read(&p).unwrap();
        assert!(!raw.windows(5).any(|w| w == b"hello"), "plaintext visible in the file");
        assert!(is_sealed(&p));
        assert_eq!(Plain::read_all(&p, &keys).unwrap(), (b"hello world\n".to_vec(), Some(Ending::Complete)));

        let p = sealed_file(dir.path(), &keys, &[b"abc"], false);
        assert_eq!(Plain::read_all(&p, &keys).unwrap(), (b"abc".to_vec(), Some(Ending::Unfinished)));
        // Cut mid-record: what came before is still readable, the tail is reported torn.
        let p = sealed_file(dir.path(), &keys, &[b"first", b"second"], true);
        let raw = std::fs::read(&p).unwrap();
        std::fs::write(&p, &raw[..raw.len() - 30]).unwrap();
        assert_eq!(Plain::read_all(&p, &keys).unwrap(), (b"first".to_vec(), Some(Ending::Torn)));
    }

    #[test]
    fn wrong_key_tampering_and_reordering_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let keys = ring_with(&[1; 32]);
        let p = sealed_file(dir.path(), &keys, &[b"one", b"two"], true);
        let e = format!("{:#}", Plain::read_all(&p, &ring_with(&[2; 32])).unwrap_err());
        assert!(e.contains("not configured here") && e.contains(keys.active().unwrap().key_id()), "{e}");
        let e = format!("{:#}", Plain::read_all(&p, &Keyring::default()).unwrap_err());
        assert!(e.contains("configured: none"), "{e}");

        let raw = std::fs::read(&p).unwrap();
        let body_start = raw.iter().skip(MAGIC.len()).position(|b| *b == b'\n').unwrap() + MAGIC.len() + 1;
        let mut flipped = raw.clone();
        flipped[body_start + 6] ^= 1;
        std::fs::write(&p, &flipped).unwrap();
        let e = format!("{:#}", Plain::read_all(&p, &keys).unwrap_err());
        assert!(e.contains("record 0 fails authentication"), "{e}");

        // Swap the two (equal-length) records: authentication fails on the first.
        let rec = 5 + 3 + TAG_LEN;
        let mut swapped = raw.clone();
        swapped[body_start..body_start + 2 * rec].rotate_left(rec);
        std::fs::write(&p, &swapped).unwrap();
        assert!(Plain::read_all(&p, &keys).is_err());

        // Dropping the final flag is detected too.
        let mut unflagged = raw.clone();
        unflagged[body_start + 2 * rec] = 0;
        std::fs::write(&p, &unflagged).unwrap();
        assert!(Plain::read_all(&p, &keys).is_err());
    }

    #[test]
    fn key_files_and_a_retired_key_in_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let old = FileKey::generate(&path).unwrap();
        assert!(FileKey::generate(&path).is_err(), "never overwrites a key");
        let loaded = FileKey::load(&path).unwrap();
        assert_eq!(old.key_id(), loaded.key_id());
        std::fs::write(dir.path().join("bad.key"), "not hex\n").unwrap();
        assert!(format!("{:#}", FileKey::load(&dir.path().join("bad.key")).unwrap_err()).contains("64 hex digits"));

        let old_ring = Keyring::new(vec![Arc::new(loaded)]);
        let p = sealed_file(dir.path(), &old_ring, &[b"x"], true);
        let rotated = Keyring::new(vec![Arc::new(FileKey::from_bytes(&[9; 32]).unwrap()), Arc::new(old)]);
        assert_eq!(Plain::read_all(&p, &rotated).unwrap().0, b"x");
        // A clear file reads as it is.
        std::fs::write(dir.path().join("clear"), "text").unwrap();
        assert_eq!(Plain::read_all(&dir.path().join("clear"), &rotated).unwrap(), (b"text".to_vec(), None));
    }

    /// A stand-in for a KMS client: wraps by XOR with its own secret and a checksum byte, so
    /// a key it did not wrap fails to unwrap.
    const FAKE_KMS: &str = r#"#!/usr/bin/env python3
import sys
secret = bytes(range(7, 39))
verb = sys.argv[1]
if verb == "id":
    print("fake-kms/key-1")
    sys.exit(0)
data = bytes.fromhex(sys.stdin.readline().strip())
if verb == "wrap":
    body = bytes(a ^ b for a, b in zip(data, secret))
    print((body + bytes([sum(data) % 256])).hex())
elif verb == "unwrap":
    body = bytes(a ^ b for a, b in zip(data[:-1], secret))
    if sum(body) % 256 != data[-1]:
        print("not wrapped by this key", file=sys.stderr)
        sys.exit(1)
    print(body.hex())
else:
    sys.exit(2)
"#;

    /// Inside the gateway (multi-threaded runtime) the program runs off the async worker.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_key_command_inside_the_runtime() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let prog = dir.path().join("kms");
        std::fs::write(&prog, FAKE_KMS).unwrap();
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o700)).unwrap();
        let kms = CommandKey::new(vec![prog.display().to_string()]).unwrap();
        let wrapped = kms.wrap(&[7u8; 32]).unwrap();
        assert_eq!(kms.unwrap_key(&wrapped).unwrap(), [7u8; 32]);
    }

    #[test]
    fn a_key_command_wraps_and_unwraps_data_keys() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let prog = dir.path().join("kms");
        std::fs::write(&prog, FAKE_KMS).unwrap();
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o700)).unwrap();
        let kms = CommandKey::new(vec![prog.display().to_string()]).unwrap();
        assert_eq!(kms.key_id(), "fake-kms/key-1");
        let keys = Keyring::new(vec![Arc::new(kms)]);
        let p = sealed_file(dir.path(), &keys, &[b"via kms"], true);
        assert_eq!(Plain::read_all(&p, &keys).unwrap().0, b"via kms");
        // The program refusing to unwrap is an error that says so.
        let kms = CommandKey::new(vec![prog.display().to_string()]).unwrap();
        let e = format!("{:#}", kms.unwrap_key(&[0u8; 33]).unwrap_err());
        assert!(e.contains("not wrapped by this key"), "{e}");
        // A program that does not exist or prints nonsense is a clear error at start-up.
        assert!(CommandKey::new(vec!["/nonexistent/kms".into()]).is_err());
        let e = format!("{:#}", CommandKey::new(vec!["/bin/echo".into(), "two words".into()]).unwrap_err());
        assert!(e.contains("not a key id"), "{e}");
    }
}
