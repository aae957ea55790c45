//! Session recordings in asciicast v2: a JSON header line, then `[time, "o", data]` output
//! events and `[time, "r", "COLSxROWS"]` resizes. `asciinema play FILE` replays them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;

/// Longest time recorded output may sit in the gateway's buffer.
pub const FLUSH_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

pub struct Recorder {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    start: Instant,
    last_flush: Instant,
    /// Bytes of an incomplete UTF-8 sequence carried to the next chunk.
    pending: Vec<u8>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Recorder {
    pub fn create(dir: &Path, session_id: &str, cols: u16, rows: u16, title: &str) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{session_id}.cast"));
        let file = std::fs::OpenOptions::new().create_new(true).write(true).mode(0o600).open(&path)?;
        let mut rec = Self {
            path,
            file: std::io::BufWriter::with_capacity(64 * 1024, file),
            start: Instant::now(),
            last_flush: Instant::now(),
            pending: Vec::new(),
        };
        let header = json!({
            "version": 2,
            "width": cols.max(1),
            "height": rows.max(1),
            "timestamp": crate::audit::now_unix(),
            "title": title,
        });
        writeln!(rec.file, "{header}")?;
        rec.file.flush()?;
        Ok(rec)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Give the recording its session's name once the session id is known (recordings are
    /// created before the session starts, so that one that cannot be written stops it).
    pub fn rename_to(&mut self, session_id: &str) -> std::io::Result<()> {
        let to = self.path.with_file_name(format!("{session_id}.cast"));
        std::fs::rename(&self.path, &to)?;
        self.path = to;
        Ok(())
    }

    fn event(&mut self, kind: &str, data: &str) -> std::io::Result<()> {
        let t = (self.start.elapsed().as_secs_f64() * 1e6).round() / 1e6;
        // Serialized straight into the buffer: no intermediate JSON value or string.
        serde_json::to_writer(&mut self.file, &(t, kind, data)).map_err(std::io::Error::other)?;
        self.file.write_all(b"\n")?;
        self.flush_if_due()
    }

    /// Hand buffered events to the OS if the last flush is older than [`FLUSH_EVERY`]. The
    /// session loop also calls this on a timer, so a crash loses at most that much output;
    /// flushing per event instead cost a third of shell output throughput.
    pub fn flush_if_due(&mut self) -> std::io::Result<()> {
        if self.last_flush.elapsed() >= FLUSH_EVERY {
            self.last_flush = Instant::now();
            self.file.flush()?;
        }
        Ok(())
    }

    /// Flush everything (end of session).
    pub fn finish(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }

    pub fn output(&mut self, data: &[u8]) -> std::io::Result<()> {
        // The common case: no carried-over bytes and valid UTF-8, used in place.
        if self.pending.is_empty()
            && let Ok(text) = std::str::from_utf8(data)
        {
            return if text.is_empty() { Ok(()) } else { self.event("o", text) };
        }
        let mut bytes = std::mem::take(&mut self.pending);
        bytes.extend_from_slice(data);
        let valid_up_to = match std::str::from_utf8(&bytes) {
            Ok(_) => bytes.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => bytes.len(),
        };
        let (text, rest) = bytes.split_at(valid_up_to);
        self.pending = rest.to_vec();
        let text = String::from_utf8_lossy(text).into_owned();
        if text.is_empty() { Ok(()) } else { self.event("o", &text) }
    }

    pub fn resize(&mut self, cols: u16, rows: u16) -> std::io::Result<()> {
        self.event("r", &format!("{cols}x{rows}"))
    }
}

/// Play a recording to `out` in real time divided by `speed`, with pauses longer than
/// `max_wait` shortened to it (as `asciinema play -i`). Errors name the line that is bad.
pub fn replay(path: &Path, speed: f64, max_wait: Option<f64>, out: &mut dyn Write) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::BufRead;
    if !(speed.is_finite() && speed > 0.0) {
        anyhow::bail!("--speed must be a positive number");
    }
    let file = std::fs::File::open(path).with_context(|| format!("opening recording {}", path.display()))?;
    let mut lines = std::io::BufReader::new(file).lines();
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
        if ev.1 == "o" {
            out.write_all(ev.2.as_bytes())?;
        }
    }
    out.flush()?;
    Ok(())
}

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
        replay(&p, 1000.0, Some(0.01), &mut out).unwrap();
        assert_eq!(out, b"hello");
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        assert!(replay(&p, 0.0, None, &mut Vec::new()).is_err());
        std::fs::write(&p, "{\"version\":2}\n[0.1,\"o\"]\n").unwrap();
        let e = replay(&p, 1.0, None, &mut Vec::new()).unwrap_err();
        assert!(format!("{e:#}").contains("s.cast:2:"), "{e:#}");
    }

    #[test]
    fn writes_asciicast_v2_and_keeps_utf8_split_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Recorder::create(dir.path(), "s1", 80, 24, "t").unwrap();
        let euro = "€".as_bytes();
        r.output(&[b'a', euro[0]]).unwrap();
        r.output(&euro[1..]).unwrap();
        r.resize(100, 30).unwrap();
        r.finish().unwrap();
        let text = std::fs::read_to_string(r.path()).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines[0]["version"], 2);
        assert_eq!(lines[0]["width"], 80);
        assert_eq!(lines[1][1], "o");
        assert_eq!(lines[1][2], "a");
        assert_eq!(lines[2][2], "€");
        assert_eq!(lines[3][1], "r");
        assert_eq!(lines[3][2], "100x30");
    }
}
