//! The audit anchor: the last signed checkpoint, kept outside the log (in the store) so that
//! a log cut back to an older checkpoint — or emptied — is noticed. The hash chain and the
//! signatures cannot show that on their own: a log truncated right after a checkpoint is a
//! shorter log that is still intact.
//!
//! The log publishes every checkpoint it writes ([`super::AuditLog::anchors`]); start-up
//! (`app.rs`) stores it and, before the log is opened again, checks with [`check`] that the
//! log still reaches it. `postern audit verify` checks it too (see [`super::verify`]).
//! This module never touches the store itself: the anchor is passed in and out.

use std::path::Path;

use serde_json::Value;

pub use postern_core::store::AuditAnchor;

use super::{line_hash, seal, segment_tail, segments};

/// How the log on disk relates to the anchor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// The log holds the anchored checkpoint (and perhaps more after it).
    Reaches,
    /// The log ends before the anchored checkpoint: its tail was removed.
    Shorter { log_seq: u64 },
    /// The log reaches the anchor's seq, but the line there is not the anchored checkpoint:
    /// the log was cut back and written on (or rewritten) from there.
    Differs { log_seq: u64 },
}

impl Standing {
    /// What happened, for an error message or an event.
    pub fn describe(&self, anchor: &AuditAnchor) -> String {
        match self {
            Standing::Reaches => format!("the log holds the anchored checkpoint at seq {}", anchor.seq),
            Standing::Shorter { log_seq } => format!(
                "the audit log ends at seq {log_seq}, but the gateway signed a checkpoint at seq {} \
                 (recorded in the database): events {}-{} at least were removed from the end of the log",
                anchor.seq,
                log_seq + 1,
                anchor.seq
            ),
            Standing::Differs { log_seq } => format!(
                "the audit log's line at seq {} is not the checkpoint the gateway signed there (recorded \
                 in the database; the log now ends at seq {log_seq}): the log was cut back and written on, \
                 or rewritten",
                anchor.seq
            ),
        }
    }
}

/// The seq the log in `dir` ends at (0: no event).
pub fn log_end(dir: &Path, keyring: &seal::Keyring) -> anyhow::Result<u64> {
    for (_, path) in segments(dir)?.iter().rev() {
        if let Some((_, seq)) = segment_tail(path, keyring)? {
            return Ok(seq);
        }
    }
    Ok(0)
}

/// The hash of the line with `seq` in `text` (None: no such line). Searched from the end:
/// the anchor is the last checkpoint, so it is near the end of its segment.
pub fn hash_at(text: &[u8], seq: u64) -> Option<String> {
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    body.rsplit(|b| *b == b'\n').find_map(|raw| {
        let v = serde_json::from_slice::<Value>(raw).ok()?;
        (v.get("seq").and_then(Value::as_u64) == Some(seq)).then(|| line_hash(raw))
    })
}

/// Does the log in `dir` still reach `anchor`? Reads the segment that holds the anchor's seq.
pub fn check(dir: &Path, keyring: &seal::Keyring, anchor: &AuditAnchor) -> anyhow::Result<Standing> {
    let log_seq = log_end(dir, keyring)?;
    if log_seq < anchor.seq {
        return Ok(Standing::Shorter { log_seq });
    }
    // Segments are named by their first seq: the anchor is in the last one starting at or
    // before it. A log that starts after it (retention) has nothing to compare.
    let segs = segments(dir)?;
    let Some((_, path)) = segs.iter().rev().find(|(first, _)| *first <= anchor.seq) else {
        return Ok(Standing::Reaches);
    };
    let (text, _) = seal::Plain::read_all(path, keyring)?;
    Ok(match hash_at(&text, anchor.seq) {
        Some(h) if h == anchor.hash => Standing::Reaches,
        _ => Standing::Differs { log_seq },
    })
}

#[cfg(test)]
mod tests {
    use ring::signature::Ed25519KeyPair;
    use serde_json::json;

    use super::super::{AuditLog, LogOptions};
    use super::*;

    fn signed_log(dir: &Path) -> AuditLog {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        AuditLog::open_signed(dir, key, LogOptions::default()).unwrap()
    }

    #[test]
    fn every_checkpoint_is_published_and_a_log_cut_back_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let log = signed_log(dir.path());
        let anchors = log.anchors();
        for i in 0..250 {
            log.record("session.start", json!({"n": i})).unwrap();
        }
        log.checkpoint(true).unwrap();
        let anchor = anchors.borrow().clone().unwrap();
        assert_eq!(anchor.seq, 253, "250 events and 3 checkpoints; the last is the anchor");
        let keyring = seal::Keyring::default();
        assert_eq!(check(dir.path(), &keyring, &anchor).unwrap(), Standing::Reaches);
        drop(log);

        // Cut the log back to the checkpoint at seq 101: still a valid chain, but short.
        let (_, path) = segments(dir.path()).unwrap().pop().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let kept: String = text.lines().take(101).map(|l| format!("{l}\n")).collect();
        std::fs::write(&path, &kept).unwrap();
        assert_eq!(check(dir.path(), &keyring, &anchor).unwrap(), Standing::Shorter { log_seq: 101 });
        let message = Standing::Shorter { log_seq: 101 }.describe(&anchor);
        assert!(message.contains("events 102-253"), "{message}");

        // ... and written on past the anchor's seq: the line there is not the anchor.
        let log = AuditLog::open(dir.path()).unwrap();
        for i in 0..200 {
            log.record("session.start", json!({"n": i})).unwrap();
        }
        assert_eq!(check(dir.path(), &keyring, &anchor).unwrap(), Standing::Differs { log_seq: 301 });

        // An emptied log is shorter too.
        std::fs::write(&path, b"").unwrap();
        assert_eq!(check(dir.path(), &keyring, &anchor).unwrap(), Standing::Shorter { log_seq: 0 });
    }
}
