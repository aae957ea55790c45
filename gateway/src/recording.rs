//! Session recordings in asciicast v2: a JSON header line, then `[time, "o", data]` output
//! events, `[time, "r", "COLSxROWS"]` resizes, `[time, "i", data]` input (only with
//! `[audit] record_input`), and a closing `[time, "m", "exit CODE"]` marker. Output that is
//! not text (not UTF-8, or mostly control bytes that JSON spells in six bytes each) is a
//! `[time, "b", BASE64]` event instead: the exact bytes at 4/3 of their size, where `"o"`
//! would cost up to six times (`\u0000`) or lose them (invalid UTF-8). asciicast's event
//! codes are open to extension and asciinema skips codes it does not know, so `asciinema
//! play FILE` still replays a clear recording (without the binary chunks, which a terminal
//! shows as noise); `postern replay` writes them back byte for byte. Sealed recordings
//! (encryption at rest, `.cast.sealed`) are read through `postern replay`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::json;

use crate::audit::seal::{Ending, Keyring, Plain, Sealer};

pub mod space;

/// Longest time recorded output may sit in the gateway's buffer.
pub const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
/// Buffered events are written once they reach this size, whatever their age.
const FLUSH_BYTES: usize = 256 * 1024;

/// What a new recording looks like.
#[derive(Debug, Clone, Default)]
pub struct RecordingOptions {
    /// Seal the file with the active key, if any.
    pub keyring: Keyring,
    /// Record input as well as output.
    pub input: bool,
    /// Stop recording before the content would pass this many bytes (`[audit]
    /// max_recording_bytes`; 0: no limit).
    pub max_bytes: u64,
}

/// Room kept under the limit for the closing markers (the limit's and the exit status).
const LIMIT_RESERVE: u64 = 512;

/// Event code of output recorded as text (asciicast's own).
pub const OUTPUT: &str = "o";
/// Event code of output recorded as base64 of its exact bytes (Postern's extension).
pub const OUTPUT_BYTES: &str = "b";

/// What an event carries: text (a JSON string) or bytes (a base64 string).
#[derive(Clone, Copy)]
enum Payload<'a> {
    Text(&'a str),
    Bytes(&'a [u8]),
}

/// Whether text of `len` bytes, `odd` of which JSON spells as `\u00XX` though a terminal
/// does nothing with them, costs more as a JSON string than as base64 (`4 * ceil(len / 3)`).
/// Bytes terminal programs send as part of ordinary output (ESC, BEL, SO, SI) are not
/// counted in `odd`, so colourful or full-screen output stays text whatever its escapes cost;
/// nor do chunks shorter than [`MIN_BYTES_EVENT`], where there is little to save and a stray
/// control byte next to a few characters would hide them from asciinema.
fn cheaper_as_bytes(len: usize, odd: usize) -> bool {
    len >= MIN_BYTES_EVENT && len + 5 * odd > len.div_ceil(3) * 4
}

/// Text output shorter than this stays text whatever it costs (see [`cheaper_as_bytes`]).
const MIN_BYTES_EVENT: usize = 64;

pub struct Recorder {
    path: PathBuf,
    /// The file, here while no write is in flight (a blocking thread has it meanwhile).
    sink: Option<Sink>,
    /// The write in flight: it hands back the file and the emptied buffer.
    inflight: Option<tokio::task::JoinHandle<Written>>,
    /// Whether the file is sealed (encryption at rest; its name ends in `.sealed`).
    sealed_file: bool,
    /// Events not yet handed to the OS (sealed as one record when they are).
    buf: Vec<u8>,
    /// The other buffer: filled while `buf`'s previous contents are being written.
    spare: Vec<u8>,
    /// Why the recording stopped being written, once a write failed.
    failed: Option<(std::io::ErrorKind, String)>,
    /// `[audit] max_recording_bytes` (0: none), the content so far, and why recording
    /// stopped once it reached the limit.
    max_bytes: u64,
    recorded: u64,
    limited: Option<String>,
    input: bool,
    start: Instant,
    last_flush: Instant,
    /// Bytes of an incomplete UTF-8 sequence carried to the next chunk.
    pending: Vec<u8>,
}

/// What a write hands back: the file, the emptied buffer and how it went.
type Written = (Sink, Vec<u8>, std::io::Result<()>);

/// The file end of a recording, moved to a blocking thread for each write.
struct Sink {
    file: std::fs::File,
    sealer: Option<Sealer>,
    /// Scratch space for sealing.
    sealed: Vec<u8>,
    /// Bytes written completely so far: a write that fails half-way is cut back to this.
    len: u64,
}

impl Sink {
    /// Append `plain` (as one sealed record when sealing; `last` closes a sealed file). A
    /// write that fails (a full disk) is cut back, so the file ends with the last complete
    /// line or record rather than a torn one.
    fn write(&mut self, plain: &[u8], last: bool) -> std::io::Result<()> {
        if plain.is_empty() && !last {
            return Ok(());
        }
        let data = match self.sealer.as_mut() {
            Some(s) => {
                self.sealed.clear();
                s.seal_into(plain, last, &mut self.sealed)?;
                &self.sealed
            }
            None => plain,
        };
        match self.file.write_all(data) {
            Ok(()) => {
                self.len += data.len() as u64;
                crate::metrics::METRICS.recording_written(data.len());
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(self.len);
                Err(e)
            }
        }
    }
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").field("path", &self.path).finish_non_exhaustive()
    }
}

/// Bit 7 of each byte of the result is set where the byte of `w` must be escaped in a JSON
/// string: a control byte (below 0x20), `"` or `\` (exact for "any"; bytes from 0x80
/// never match).
fn escape_flags(w: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let below = |x: u64, n: u64| x.wrapping_sub(ONES * n) & !x & HIGH;
    let zero = |x: u64| below(x, 1);
    below(w, 0x20) | zero(w ^ (ONES * u64::from(b'"'))) | zero(w ^ (ONES * u64::from(b'\\')))
}

/// Whether none of `block`'s bytes (a multiple of 8 of them) needs escaping.
fn clean(block: &[u8]) -> bool {
    block
        .chunks_exact(8)
        .map(|w| <[u8; 8]>::try_from(w).map(u64::from_le_bytes).unwrap_or(u64::MAX))
        .fold(0, |acc, w| acc | escape_flags(w))
        == 0
}

/// Append `s` as a JSON string. Terminal output is mostly text that needs no escaping, so
/// it is checked 32 and 8 bytes at a time, jumping straight to the next byte that needs an
/// escape, and copied in runs; this is the recorder's hot loop (serde_json's byte-at-a-time
/// escaper cost a measurable share of shell throughput). Returns how many bytes it spelled
/// as `\u00XX` that are not ESC, BEL, SO or SI (see [`cheaper_as_bytes`]).
pub fn json_string(out: &mut Vec<u8>, s: &str) -> usize {
    let bytes = s.as_bytes();
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut run = 0; // start of the bytes not yet copied
    let mut i = 0;
    let mut odd = 0;
    while i < bytes.len() {
        if let Some(block) = bytes.get(i..i + 32)
            && clean(block)
        {
            i += 32;
            continue;
        }
        let at = match bytes.get(i..i + 8).and_then(|w| <[u8; 8]>::try_from(w).ok()) {
            Some(word) => match escape_flags(u64::from_le_bytes(word)) {
                0 => {
                    i += 8;
                    continue;
                }
                // The lowest flagged byte is exact (borrows only disturb the ones above it).
                flags => i + (flags.trailing_zeros() / 8) as usize,
            },
            None => i,
        };
        let b = bytes.get(at).copied().unwrap_or_default();
        let esc: Option<&[u8]> = match b {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            b'\t' => Some(b"\\t"),
            0x08 => Some(b"\\b"),
            0x0c => Some(b"\\f"),
            0..0x20 => None,
            _ => {
                // Only in the last few bytes, checked one at a time.
                i = at + 1;
                continue;
            }
        };
        out.extend_from_slice(bytes.get(run..at).unwrap_or_default());
        match esc {
            Some(e) => out.extend_from_slice(e),
            None => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                if !matches!(b, 0x07 | 0x0e | 0x0f | 0x1b) {
                    odd += 1;
                }
                out.extend_from_slice(b"\\u00");
                out.push(HEX.get(usize::from(b >> 4)).copied().unwrap_or(b'0'));
                out.push(HEX.get(usize::from(b & 15)).copied().unwrap_or(b'0'));
            }
        }
        i = at + 1;
        run = i;
    }
    out.extend_from_slice(bytes.get(run..).unwrap_or_default());
    out.push(b'"');
    odd
}

/// Split `rest`, which starts with an invalid UTF-8 sequence, into the bytes up to the end of
/// its last invalid sequence, the valid text after them, and an incomplete character at the
/// very end (carried to the next chunk).
fn split_binary(rest: &[u8]) -> (&[u8], &[u8], &[u8]) {
    let (mut at, mut binary_end, mut text_end) = (0, 0, rest.len());
    for chunk in rest.utf8_chunks() {
        at += chunk.valid().len();
        let invalid = chunk.invalid();
        if invalid.is_empty() {
            continue;
        }
        if at + invalid.len() == rest.len() && std::str::from_utf8(invalid).is_err_and(|e| e.error_len().is_none()) {
            text_end = at;
            break;
        }
        at += invalid.len();
        binary_end = at;
    }
    let (binary, after) = rest.split_at(binary_end.min(rest.len()));
    let (tail, pending) = after.split_at(text_end.saturating_sub(binary_end).min(after.len()));
    (binary, tail, pending)
}

/// Append `bytes` as a JSON string of their base64.
fn base64_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    let start = out.len();
    out.resize(start + bytes.len().div_ceil(3) * 4, 0);
    if let Some(room) = out.get_mut(start..) {
        let written = B64.encode_slice(bytes, room).unwrap_or(0);
        out.truncate(start + written);
    }
    out.push(b'"');
}

/// File name of a session's recording.
pub fn file_name(session_id: &str, sealed: bool) -> String {
    format!("{session_id}.cast{}", if sealed { ".sealed" } else { "" })
}

/// The session a recording file belongs to (`None` for other files).
pub fn session_of(file_name: &str) -> Option<&str> {
    file_name.strip_suffix(".cast.sealed").or_else(|| file_name.strip_suffix(".cast"))
}

/// A recording downloaded from the object store: a private file, removed when dropped.
pub struct Downloaded {
    path: PathBuf,
    /// The recording's own file name (`ID.cast`, `ID.cast.sealed`).
    name: String,
}

impl Downloaded {
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Downloaded {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Download `session_id`'s recording (sealed or clear) from the object store `shipper`
/// writes to, as `DIR/PREFIX-RANDOM-NAME`, for a replay after retention deleted the local
/// copy. `None`: the store does not have it either.
pub async fn download(
    shipper: &crate::audit::ship::Shipper,
    session_id: &str,
    dir: &Path,
    prefix: &str,
) -> anyhow::Result<Option<Downloaded>> {
    for sealed in [true, false] {
        let name = file_name(session_id, sealed);
        let path = dir.join(format!("{prefix}-{}-{name}", postern_core::util::random_hex(8)?));
        let file = Downloaded { path, name };
        if shipper.fetch(crate::audit::ship::Kind::Recording, &file.name, &file.path).await? {
            return Ok(Some(file));
        }
    }
    Ok(None)
}

/// The recording of `session_id` in `dir`, clear or sealed.
pub fn find(dir: &Path, session_id: &str) -> Option<PathBuf> {
    [false, true].into_iter().map(|sealed| dir.join(file_name(session_id, sealed))).find(|p| p.exists())
}

impl Recorder {
    /// Start a recording. `command` is the exec command, if it is not a shell.
    pub fn create(
        dir: &Path,
        session_id: &str,
        size: (u16, u16),
        title: &str,
        command: Option<&str>,
        options: &RecordingOptions,
    ) -> std::io::Result<Self> {
        let mut header = json!({
            "version": 2,
            "width": size.0.max(1),
            "height": size.1.max(1),
            "timestamp": postern_core::util::now_unix(),
            "title": title,
        });
        if let (Some(c), Some(h)) = (command, header.as_object_mut()) {
            h.insert("command".into(), json!(c));
        }
        let mut line = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
        line.push(b'\n');
        std::fs::create_dir_all(dir)?;
        let path = dir.join(file_name(session_id, options.keyring.active().is_some()));
        let (file, sealer, header_len) = crate::audit::seal::create_file(&path, &options.keyring)?;
        let sealed_file = sealer.is_some();
        let mut sink = Sink { file, sealer, sealed: Vec::new(), len: header_len };
        // Written here and now: a recording that cannot be started stops its session.
        if let Err(e) = sink.write(&line, false) {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(Self {
            path,
            sealed_file,
            sink: Some(sink),
            inflight: None,
            buf: Vec::with_capacity(FLUSH_BYTES + 4096),
            spare: Vec::with_capacity(FLUSH_BYTES + 4096),
            failed: None,
            max_bytes: options.max_bytes,
            recorded: line.len() as u64,
            limited: None,
            input: options.input,
            start: Instant::now(),
            last_flush: Instant::now(),
            pending: Vec::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Give the recording its session's name once the session id is known (recordings are
    /// created before the session starts, so that one that cannot be written stops it).
    pub fn rename_to(&mut self, session_id: &str) -> std::io::Result<()> {
        let to = self.path.with_file_name(file_name(session_id, self.sealed_file));
        std::fs::rename(&self.path, &to)?;
        self.path = to;
        Ok(())
    }

    /// Append one event line to the buffer; output text that would cost more as a JSON
    /// string than as base64 becomes an [`OUTPUT_BYTES`] event.
    fn push_event(&mut self, t: f64, kind: &str, data: Payload<'_>) -> std::io::Result<()> {
        let mark = self.buf.len();
        // Written straight into the buffer: no intermediate JSON value or string.
        self.buf.push(b'[');
        serde_json::to_writer(&mut self.buf, &t).map_err(std::io::Error::other)?;
        self.buf.extend_from_slice(b",\"");
        self.buf.extend_from_slice(kind.as_bytes());
        self.buf.extend_from_slice(b"\",");
        match data {
            Payload::Text(text) => {
                let odd = json_string(&mut self.buf, text);
                if kind == OUTPUT && cheaper_as_bytes(text.len(), odd) {
                    self.buf.truncate(mark);
                    return self.push_event(t, OUTPUT_BYTES, Payload::Bytes(text.as_bytes()));
                }
            }
            Payload::Bytes(bytes) => base64_string(&mut self.buf, bytes),
        }
        self.buf.extend_from_slice(b"]\n");
        Ok(())
    }

    async fn event(&mut self, kind: &str, data: Payload<'_>) -> std::io::Result<()> {
        self.check()?;
        if self.limited.is_some() {
            return Ok(());
        }
        let t = (self.start.elapsed().as_secs_f64() * 1e6).round() / 1e6;
        let mark = self.buf.len();
        self.push_event(t, kind, data)?;
        let line = (self.buf.len() - mark) as u64;
        if self.max_bytes > 0 && self.recorded + line + LIMIT_RESERVE > self.max_bytes {
            // The limit: this event is not recorded, nor anything after it; a marker says so.
            self.buf.truncate(mark);
            let why = format!(
                "the recording reached [audit] max_recording_bytes ({} bytes); the rest of the session is not recorded",
                self.max_bytes
            );
            postern_tunnel::warn_limited!(path = %self.path.display(), limit = self.max_bytes, "recording limit reached; the rest of this session is not recorded");
            serde_json::to_writer(&mut self.buf, &(t, "m", &why)).map_err(std::io::Error::other)?;
            self.buf.push(b'\n');
            self.limited = Some(why);
            return self.write_out(false).await;
        }
        self.recorded += line;
        if self.buf.len() >= FLUSH_BYTES { self.write_out(false).await } else { self.flush_if_due().await }
    }

    /// Wait for the write in flight, if any, and take the file back.
    async fn settle(&mut self) -> std::io::Result<()> {
        if let Some(write) = self.inflight.take() {
            match write.await {
                Ok((sink, mut spare, result)) => {
                    self.sink = Some(sink);
                    spare.clear();
                    self.spare = spare;
                    if let Err(e) = result {
                        self.fail(&e);
                    }
                }
                Err(e) => self.fail(&std::io::Error::other(format!("recording writer stopped: {e}"))),
            }
        }
        self.check()
    }

    /// The error that stopped the recording, if one did.
    fn check(&self) -> std::io::Result<()> {
        match &self.failed {
            Some((kind, why)) => Err(std::io::Error::new(*kind, why.clone())),
            None => Ok(()),
        }
    }

    /// Why the recording is no longer being written, once a write has failed (noticed at
    /// the next event or flush after it).
    pub fn failure(&self) -> Option<&str> {
        self.failed.as_ref().map(|(_, why)| why.as_str())
    }

    /// Why the recording stopped at `[audit] max_recording_bytes`, once it did (at the
    /// event that would have passed it: nothing of that event or after it is recorded).
    pub fn limit_reached(&self) -> Option<&str> {
        self.limited.as_deref()
    }

    /// After a failed write nothing more is written: what follows would land after a torn
    /// line or record.
    fn fail(&mut self, e: &std::io::Error) {
        if self.failed.is_none() {
            postern_tunnel::warn_limited!(path = %self.path.display(), error = %e, "recording write failed; the rest of this session is not recorded");
            self.failed = Some((e.kind(), e.to_string()));
        }
    }

    /// Hand the buffer to a blocking thread to write (as one sealed record when sealing;
    /// `last` closes the file and waits for it). The `write` system call into the page
    /// cache is most of what recording costs, so it runs beside the session rather than in
    /// its path; one write is in flight at a time, which keeps the file in order and makes
    /// a session that outruns the disk wait for it (two buffers per session at most).
    async fn write_out(&mut self, last: bool) -> std::io::Result<()> {
        self.last_flush = Instant::now();
        self.settle().await?;
        if self.buf.is_empty() && !last {
            return Ok(());
        }
        let Some(mut sink) = self.sink.take() else {
            return Err(std::io::Error::other("recording file is gone"));
        };
        let plain = std::mem::replace(&mut self.buf, std::mem::take(&mut self.spare));
        self.inflight = Some(tokio::task::spawn_blocking(move || {
            let result = sink.write(&plain, last);
            (sink, plain, result)
        }));
        if last { self.settle().await } else { Ok(()) }
    }

    /// Hand buffered events to the OS if the last flush is older than [`FLUSH_EVERY`]. The
    /// session loop also calls this on a timer, so a crash loses at most that much output;
    /// flushing per event instead cost a third of shell output throughput.
    pub async fn flush_if_due(&mut self) -> std::io::Result<()> {
        if self.last_flush.elapsed() >= FLUSH_EVERY { self.write_out(false).await } else { Ok(()) }
    }

    /// When [`Recorder::flush_if_due`] next has work: events are buffered or a write is in
    /// flight (its result is collected then). `None`: nothing to do until the next event, so
    /// an idle session's loop need not wake for its recording.
    pub fn flush_due(&self) -> Option<Instant> {
        (!self.buf.is_empty() || self.inflight.is_some()).then(|| self.last_flush + FLUSH_EVERY)
    }

    /// End the recording: an `exit CODE` marker when the command's status is known, then
    /// everything buffered (and, sealed, the final record), waiting until it is written.
    pub async fn finish(&mut self, exit_code: Option<i32>) -> std::io::Result<()> {
        // The start of a UTF-8 sequence the output ended in the middle of.
        if !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            self.event(OUTPUT_BYTES, Payload::Bytes(&rest)).await?;
        }
        if let Some(code) = exit_code {
            let t = (self.start.elapsed().as_secs_f64() * 1e6).round() / 1e6;
            serde_json::to_writer(&mut self.buf, &(t, "m", format!("exit {code}"))).map_err(std::io::Error::other)?;
            self.buf.push(b'\n');
        }
        self.write_out(true).await
    }

    /// Record output: as text while it is UTF-8 (a sequence split across chunks is carried
    /// to the next), as its exact bytes (`"b"`, base64) where it is not.
    pub async fn output(&mut self, data: &[u8]) -> std::io::Result<()> {
        // The common case: no carried-over bytes and valid UTF-8, used in place.
        if self.pending.is_empty()
            && let Ok(text) = std::str::from_utf8(data)
        {
            return if text.is_empty() { Ok(()) } else { self.event(OUTPUT, Payload::Text(text)).await };
        }
        let mut bytes = std::mem::take(&mut self.pending);
        bytes.extend_from_slice(data);
        match std::str::from_utf8(&bytes) {
            Ok(text) => self.event(OUTPUT, Payload::Text(text)).await,
            // Only the end is incomplete: the text before it now, the rest with the next chunk.
            Err(e) if e.error_len().is_none() => {
                let (text, rest) = bytes.split_at(e.valid_up_to());
                self.pending = rest.to_vec();
                match std::str::from_utf8(text) {
                    Ok(text) if !text.is_empty() => self.event(OUTPUT, Payload::Text(text)).await,
                    _ => Ok(()),
                }
            }
            Err(e) => {
                // Text before the first invalid byte and after the last stays text (a prompt
                // printed right after binary output is still seen in asciinema); the bytes
                // from the one to the other are recorded as they are.
                let (head, rest) = bytes.split_at(e.valid_up_to());
                let (binary, tail, pending) = split_binary(rest);
                self.pending = pending.to_vec();
                for (code, part) in [(OUTPUT, head), (OUTPUT_BYTES, binary), (OUTPUT, tail)] {
                    match std::str::from_utf8(part) {
                        _ if part.is_empty() => {}
                        Ok(text) if code == OUTPUT => self.event(OUTPUT, Payload::Text(text)).await?,
                        _ => self.event(OUTPUT_BYTES, Payload::Bytes(part)).await?,
                    }
                }
                Ok(())
            }
        }
    }

    /// What the user typed, if input is recorded (`[audit] record_input`).
    pub async fn input(&mut self, data: &[u8]) -> std::io::Result<()> {
        if !self.input || data.is_empty() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(data).into_owned();
        self.event("i", Payload::Text(&text)).await
    }

    pub async fn resize(&mut self, cols: u16, rows: u16) -> std::io::Result<()> {
        self.event("r", Payload::Text(&format!("{cols}x{rows}"))).await
    }
}

/// Play a recording to `out` in real time divided by `speed`, with pauses longer than
/// `max_wait` shortened to it (as `asciinema play -i`). Sealed recordings are decrypted with
/// `keyring`. Errors name the line that is bad. Returns how a sealed recording ended.
pub fn replay(
    path: &Path,
    keyring: &Keyring,
    speed: f64,
    max_wait: Option<f64>,
    out: &mut dyn Write,
) -> anyhow::Result<Option<Ending>> {
    use anyhow::Context;
    use std::io::BufRead;
    if !(speed.is_finite() && speed > 0.0) {
        anyhow::bail!("--speed must be a positive number");
    }
    let mut reader = std::io::BufReader::new(Plain::open(path, keyring)?);
    let mut lines = (&mut reader).lines();
    let header: serde_json::Value = serde_json::from_str(&lines.next().context("empty recording")??)
        .with_context(|| format!("{}:1: not an asciicast header", path.display()))?;
    if header.get("version").and_then(serde_json::Value::as_u64) != Some(2) {
        anyhow::bail!("{}:1: only asciicast version 2 is supported", path.display());
    }
    let mut last = 0.0f64;
    for (i, line) in lines.enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = || format!("{}:{}: not an asciicast event", path.display(), i + 2);
        let ev: (f64, String, String) = serde_json::from_str(&line).with_context(bad)?;
        let mut wait = ((ev.0 - last).max(0.0)) / speed;
        if let Some(cap) = max_wait {
            wait = wait.min(cap);
        }
        last = ev.0;
        if wait > 0.0 {
            out.flush()?;
            std::thread::sleep(std::time::Duration::from_secs_f64(wait));
        }
        match ev.1.as_str() {
            OUTPUT => out.write_all(ev.2.as_bytes())?,
            OUTPUT_BYTES => out.write_all(&B64.decode(&ev.2).with_context(|| format!("{}: not base64", bad()))?)?,
            _ => {}
        }
    }
    out.flush()?;
    Ok(reader.into_inner().ending())
}

#[cfg(test)]
mod limit_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_output_in_order_and_rejects_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.cast");
        std::fs::write(&p, "{\"version\":2,\"width\":80,\"height\":24}\n[0.1,\"o\",\"he\"]\n[0.2,\"r\",\"90x30\"]\n[5.0,\"o\",\"llo\"]\n").unwrap();
        let mut out = Vec::new();
        let t = Instant::now();
        replay(&p, &Keyring::default(), 1000.0, Some(0.01), &mut out).unwrap();
        assert_eq!(out, b"hello");
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        assert!(replay(&p, &Keyring::default(), 0.0, None, &mut Vec::new()).is_err());
        std::fs::write(&p, "{\"version\":2}\n[0.1,\"o\"]\n").unwrap();
        let e = replay(&p, &Keyring::default(), 1.0, None, &mut Vec::new()).unwrap_err();
        assert!(format!("{e:#}").contains("s.cast:2:"), "{e:#}");
    }

    #[tokio::test]
    async fn writes_asciicast_v2_and_keeps_utf8_split_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let mut r =
            Recorder::create(dir.path(), "s1", (80, 24), "t", Some("ls"), &RecordingOptions::default()).unwrap();
        let euro = "€".as_bytes();
        r.output(&[b'a', euro[0]]).await.unwrap();
        r.output(&euro[1..]).await.unwrap();
        r.resize(100, 30).await.unwrap();
        r.input(b"secret").await.unwrap();
        r.finish(Some(3)).await.unwrap();
        let text = std::fs::read_to_string(r.path()).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines[0]["version"], 2);
        assert_eq!(lines[0]["width"], 80);
        assert_eq!(lines[1][1], "o");
        assert_eq!(lines[1][2], "a");
        assert_eq!(lines[2][2], "€");
        assert_eq!(lines[3][1], "r");
        assert_eq!(lines[3][2], "100x30");
        assert_eq!(lines[0]["command"], "ls");
        assert_eq!(lines[4][1], "m", "input is not recorded unless asked for");
        assert_eq!(lines[4][2], "exit 3");
        assert_eq!(lines.len(), 5);
    }

    /// An idle session's loop does not wake for its recording: the flush is due only while
    /// events wait to be written or a write waits to be collected.
    #[tokio::test]
    async fn a_flush_is_due_only_while_something_waits() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Recorder::create(dir.path(), "s1", (80, 24), "t", None, &RecordingOptions::default()).unwrap();
        assert_eq!(r.flush_due(), None, "nothing recorded yet");
        r.last_flush = Instant::now();
        r.output(b"x").await.unwrap();
        let due = r.flush_due().expect("a buffered event makes a flush due");
        assert_eq!(due, r.last_flush + FLUSH_EVERY);
        r.last_flush -= FLUSH_EVERY;
        r.flush_if_due().await.unwrap();
        assert!(r.flush_due().is_some(), "the write in flight is still to be collected");
        r.last_flush -= FLUSH_EVERY;
        r.flush_if_due().await.unwrap();
        assert_eq!(r.flush_due(), None, "written and collected: nothing left to do");
    }

    /// Output far larger than one buffer goes through several writes in flight, clear and
    /// sealed, and comes back whole and in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn output_across_many_buffers_is_written_in_order() {
        use crate::audit::seal::FileKey;
        let dir = tempfile::tempdir().unwrap();
        let keys = Keyring::new(vec![std::sync::Arc::new(FileKey::from_bytes(&[9; 32]).unwrap())]);
        let expected: String = (0..200_000).map(|i| format!("line {i}\r\n")).collect();
        for (name, keyring) in [("clear", Keyring::default()), ("sealed", keys.clone())] {
            let opts = RecordingOptions { keyring: keyring.clone(), input: false, max_bytes: 0 };
            let mut r = Recorder::create(dir.path(), name, (80, 24), "t", None, &opts).unwrap();
            for chunk in expected.as_bytes().chunks(16 << 10) {
                r.output(chunk).await.unwrap();
            }
            r.finish(Some(0)).await.unwrap();
            assert!(r.failure().is_none());
            let mut out = Vec::new();
            let path = r.path().to_owned();
            let ending = replay(&path, &keyring, 1e9, Some(0.0), &mut out).unwrap();
            assert!(out == expected.as_bytes(), "{name}: {} bytes back of {}", out.len(), expected.len());
            assert!(expected.len() > 8 * FLUSH_BYTES);
            if name == "sealed" {
                assert_eq!(ending, Some(Ending::Complete));
            }
        }
    }

    /// Output that is not text is recorded as its exact bytes, at 4/3 of their size; text,
    /// escapes and all, stays text; a UTF-8 sequence cut by the end of the output is kept.
    #[tokio::test]
    async fn binary_output_is_recorded_exactly_and_compactly_and_text_stays_text() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Recorder::create(dir.path(), "b", (80, 24), "t", None, &RecordingOptions::default()).unwrap();
        let zeros = vec![0u8; 30_000];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..30_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let colour = "\u{1b}[1;31mred\u{1b}[0m \u{7}\u{e}q\u{f}\u{1b}[K\r\n";
        let euro = "€".as_bytes();
        let mut expected = Vec::new();
        for chunk in [&zeros[..], colour.as_bytes(), &noise[..], &[b'a', euro[0]], &euro[1..], b"x\0y", &euro[..2]] {
            r.output(chunk).await.unwrap();
            expected.extend_from_slice(chunk);
        }
        r.finish(Some(0)).await.unwrap();
        let text = std::fs::read_to_string(r.path()).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let codes: Vec<&str> = lines[1..].iter().map(|l| l[1].as_str().unwrap()).collect();
        assert_eq!(codes, ["b", "o", "b", "o", "o", "o", "b", "m"]);
        assert_eq!(lines[2][2], colour, "terminal escapes stay text");
        assert_eq!(lines[4][2], "a");
        assert_eq!(lines[6][2], "x\u{0}y", "a stray NUL in text stays text");
        let zeros_line = text.lines().nth(1).unwrap().len();
        assert!(zeros_line < zeros.len() * 4 / 3 + 40, "{zeros_line} bytes for {} zeros", zeros.len());
        let mut out = Vec::new();
        replay(r.path(), &Keyring::default(), 1e9, Some(0.0), &mut out).unwrap();
        assert!(out == expected, "{} bytes back of {}", out.len(), expected.len());

        std::fs::write(r.path(), "{\"version\":2}\n[0.1,\"b\",\"not base64!\"]\n").unwrap();
        let e = replay(r.path(), &Keyring::default(), 1.0, None, &mut Vec::new()).unwrap_err();
        assert!(format!("{e:#}").contains("b.cast:2: not an asciicast event: not base64"), "{e:#}");
    }

    #[test]
    fn binary_is_split_from_the_text_after_it_and_an_incomplete_end() {
        let (b, t, p) = split_binary(b"\xff\x00\xfeprompt$ \xe2\x82");
        assert_eq!((b, t, p), (&b"\xff\x00\xfe"[..], &b"prompt$ "[..], &b"\xe2\x82"[..]));
        let (b, t, p) = split_binary(b"\xffab\xc0");
        assert_eq!((b, t, p), (&b"\xffab\xc0"[..], &b""[..], &b""[..]));
        let (b, t, p) = split_binary(b"\xff\xe2\x82");
        assert_eq!((b, t, p), (&b"\xff"[..], &b""[..], &b"\xe2\x82"[..]));
    }

    #[test]
    fn json_strings_match_serde_json() {
        let samples = [
            "",
            "plain text that needs nothing",
            "quote \" and back\\slash",
            "ctl \u{1}\u{1f}\x7f \n\r\t\u{8}\u{c}",
            "€uro ✓ 𝄞 and \u{1b}[31mred\u{1b}[0m",
            "12345678\"12345678\\1234567\n",
        ];
        let mut all: Vec<String> = samples.iter().map(|s| s.to_string()).collect();
        // Every ASCII byte at every position of a 32-byte block and the words after it.
        for c in (0u8..0x80).map(char::from) {
            for pos in 0..48 {
                let mut s = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKL".to_string();
                s.insert(pos, c);
                all.push(s);
            }
        }
        for s in &all {
            let mut ours = Vec::new();
            json_string(&mut ours, s);
            assert_eq!(String::from_utf8(ours).unwrap(), serde_json::to_string(s).unwrap(), "{s:?}");
        }
    }

    #[tokio::test]
    async fn sealed_recordings_replay_with_the_key_and_record_input_when_asked() {
        use crate::audit::seal::FileKey;
        let dir = tempfile::tempdir().unwrap();
        let keys = Keyring::new(vec![std::sync::Arc::new(FileKey::from_bytes(&[5; 32]).unwrap())]);
        let opts = RecordingOptions { keyring: keys.clone(), input: true, max_bytes: 0 };
        let mut r = Recorder::create(dir.path(), "pending", (80, 24), "t", None, &opts).unwrap();
        r.rename_to("s2").unwrap();
        r.output(b"top secret output").await.unwrap();
        r.input(b"typed").await.unwrap();
        r.finish(Some(0)).await.unwrap();
        let path = find(dir.path(), "s2").unwrap();
        assert!(path.to_string_lossy().ends_with("s2.cast.sealed"));
        assert!(!std::fs::read(&path).unwrap().windows(6).any(|w| w == b"secret"));
        let mut out = Vec::new();
        let ending = replay(&path, &keys, 1000.0, Some(0.01), &mut out).unwrap();
        assert_eq!(out, b"top secret output", "input is not played back");
        assert_eq!(ending, Some(Ending::Complete));
        let (text, _) = Plain::read_all(&path, &keys).unwrap();
        assert!(String::from_utf8(text).unwrap().contains(r#","i","typed"]"#));
        let e = replay(&path, &Keyring::default(), 1.0, None, &mut Vec::new()).unwrap_err();
        assert!(format!("{e:#}").contains("not configured here"), "{e:#}");
        assert_eq!(session_of("abc.cast.sealed"), Some("abc"));
        assert_eq!(session_of("abc.cast"), Some("abc"));
        assert_eq!(session_of("abc.txt"), None);
    }
}
