//! `postern audit verify`: walk the log, recompute the hash chain, check every checkpoint's
//! signature, and say where the log stops being trustworthy.

use serde::Serialize;
use serde_json::Value;

use super::seal::Ending;
use super::{GENESIS, checkpoint_message, key_id, line_hash};
use postern_core::util::unhex;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    /// The segment file.
    pub file: String,
    /// 1-based line number in the segment.
    pub line: usize,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub segments: usize,
    pub events: usize,
    pub checkpoints: usize,
    /// `seq` of the first event present (above 1 when retention deleted older segments).
    pub first_seq: u64,
    /// `seq` covered by the last valid checkpoint (0: none).
    pub last_checkpoint_seq: u64,
    /// Events after the last valid checkpoint: chained, but not yet covered by a signature
    /// (a truncated tail could only be noticed by comparing with a copy).
    pub unsigned_tail: usize,
    pub problems: Vec<Problem>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One segment's plaintext, in chain order.
#[derive(Debug)]
pub struct Part<'a> {
    pub name: String,
    pub text: &'a [u8],
    /// How a sealed segment ended (`None` for a clear one).
    pub ending: Option<Ending>,
}

/// Verify `text`, a log in one piece. See [`verify_parts`].
pub fn verify(text: &[u8], public_key: Option<&[u8]>) -> Report {
    verify_parts(&[Part { name: "log".into(), text, ending: None }], public_key)
}

/// Verify the segments of a log, oldest first. `public_key` is the raw ed25519 public key
/// checkpoints must be signed with; without it, checkpoint signatures are reported as
/// unverifiable. A log may start past seq 1 only at a signed segment anchor, and only if a
/// retention event later in the log records deleting the events before it.
pub fn verify_parts(parts: &[Part<'_>], public_key: Option<&[u8]>) -> Report {
    let mut problems = Vec::new();
    let mut prev_hash = GENESIS.to_owned();
    let mut expected_seq = 1u64;
    let (mut events, mut checkpoints, mut last_cp, mut since_cp) = (0usize, 0usize, 0u64, 0usize);
    let mut first_seq = 0u64;
    // Seq up to which events are missing at the start, and up to which retention says so.
    let (mut missing_through, mut deleted_through) = (0u64, 0u64);
    let mut start = None::<(String, usize)>;
    let mut anchor_signed = false;
    let verifier = public_key.map(|k| ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, k.to_vec()));
    let our_key = public_key.map(key_id);
    for part in parts {
        let body = part.text.strip_suffix(b"\n").unwrap_or(part.text);
        let mut n = 0;
        for (i, raw) in body.split(|b| *b == b'\n').enumerate().filter(|_| !body.is_empty()) {
            n = i + 1;
            let mut problem = |message: String| problems.push(Problem { file: part.name.clone(), line: n, message });
            let hash = line_hash(raw);
            let Ok(v) = serde_json::from_slice::<Value>(raw) else {
                problem("not a JSON event (damaged, or torn by a crash mid-write)".into());
                prev_hash = hash;
                continue;
            };
            let seq = v.get("seq").and_then(Value::as_u64);
            let prev = v.get("prev").and_then(Value::as_str).unwrap_or("");
            let is_checkpoint = v.get("event").and_then(Value::as_str) == Some("audit.checkpoint");
            if events == 0 {
                first_seq = seq.unwrap_or(1);
                // The log may start later than seq 1 at a segment anchor (checked below).
                if first_seq > 1 && is_checkpoint && v.get("segment_start").is_some() {
                    expected_seq = first_seq;
                    prev_hash = prev.to_owned();
                    missing_through = first_seq - 1;
                    start = Some((part.name.clone(), n));
                }
            }
            events += 1;
            since_cp += 1;
            match seq {
                Some(s) if s == expected_seq => {}
                Some(s) if s > expected_seq => problem(format!(
                    "seq {s} where {expected_seq} was expected: {} event(s) deleted before this line",
                    s - expected_seq
                )),
                Some(s) => problem(format!(
                    "seq {s} where {expected_seq} was expected: this line was inserted, duplicated or moved"
                )),
                None => problem("no seq: not written by the gateway".into()),
            }
            if prev != prev_hash {
                let what = if events == 1 {
                    "the first line does not start the chain".to_owned()
                } else if n == 1 {
                    "the previous segment's last line was modified or removed, or a segment is missing".to_owned()
                } else {
                    format!("line {} was modified, deleted or reordered (its hash is not this line's prev)", n - 1)
                };
                problem(format!("chain broken: {what}"));
            }
            if v.get("event").and_then(Value::as_str) == Some("audit.retention") {
                let through = v.get("deleted_through_seq").and_then(Value::as_u64).unwrap_or(0);
                deleted_through = deleted_through.max(through);
            }
            if is_checkpoint {
                checkpoints += 1;
                let covers = v.get("covers_seq").and_then(Value::as_u64).unwrap_or(0);
                let covers_hash = v.get("covers_hash").and_then(Value::as_str).unwrap_or("");
                let sig = v.get("sig").and_then(Value::as_str).and_then(unhex).unwrap_or_default();
                if covers + 1 != seq.unwrap_or(0) || covers_hash != prev_hash {
                    problem(format!("checkpoint covers seq {covers} with a hash the log before it does not have"));
                }
                match (&verifier, &our_key) {
                    (Some(ver), Some(id)) => {
                        let signed = ver.verify(&checkpoint_message(covers, covers_hash), &sig).is_ok();
                        if !signed || v.get("key_id").and_then(Value::as_str) != Some(id.as_str()) {
                            problem("checkpoint signature does not verify with the gateway's audit key".into());
                        } else if covers + 1 == seq.unwrap_or(0) && covers_hash == prev_hash {
                            last_cp = covers;
                            since_cp = 0;
                            anchor_signed |= events == 1;
                        }
                    }
                    _ => problem("checkpoint signature cannot be checked: no public key given".into()),
                }
            }
            prev_hash = hash;
            expected_seq = seq.map(|s| s.max(expected_seq) + 1).unwrap_or(expected_seq + 1);
        }
        if part.ending == Some(Ending::Torn) {
            problems.push(Problem {
                file: part.name.clone(),
                line: n + 1,
                message: "the segment ends with a record cut off mid-write (crash), or was truncated".into(),
            });
        }
    }
    if let Some(first) = parts.first()
        && events > 0
        && first_seq > 1
    {
        let (file, line) = start.unwrap_or((first.name.clone(), 1));
        if missing_through == 0 {
            problems.insert(
                0,
                Problem {
                    file,
                    line,
                    message: format!(
                        "the log starts at seq {first_seq} without a signed segment anchor: earlier events are missing"
                    ),
                },
            );
        } else if deleted_through < missing_through {
            problems.insert(0, Problem { file, line, message: format!(
                "the log starts at seq {first_seq}, but no audit.retention event records deleting events 1-{missing_through}"
            )});
        } else if !anchor_signed {
            problems.insert(
                0,
                Problem { file, line, message: "the segment anchor the log starts at is not signed".into() },
            );
        }
    }
    Report {
        segments: parts.len(),
        events,
        checkpoints,
        first_seq,
        last_checkpoint_seq: last_cp,
        unsigned_tail: since_cp,
        problems,
    }
}

/// Parse the hex public key file the gateway writes next to its signing key.
pub fn parse_public_key(text: &str) -> Option<Vec<u8>> {
    unhex(text.trim()).filter(|k| k.len() == 32)
}

#[cfg(test)]
mod tests {
    use ring::signature::{Ed25519KeyPair, KeyPair};
    use serde_json::json;

    use super::super::AuditLog;
    use super::*;

    /// A signed log of `n` events (checkpoints every 100, and one at the end).
    fn log(n: usize) -> (Vec<u8>, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let public = key.public_key().as_ref().to_vec();
        let log = AuditLog::open_signed(dir.path(), key, super::super::LogOptions::default()).unwrap();
        for i in 0..n {
            log.record("session.start", json!({"n": i})).unwrap();
        }
        log.checkpoint(true).unwrap();
        let segs = super::super::segments(dir.path()).unwrap();
        (std::fs::read(&segs[0].1).unwrap(), public)
    }

    fn lines(text: &[u8]) -> Vec<Vec<u8>> {
        text.strip_suffix(b"\n").unwrap().split(|b| *b == b'\n').map(<[u8]>::to_vec).collect()
    }

    fn join(lines: &[Vec<u8>]) -> Vec<u8> {
        let mut out = lines.join(&b'\n');
        out.push(b'\n');
        out
    }

    fn first_problem(text: &[u8], key: &[u8]) -> Problem {
        let r = verify(text, Some(key));
        assert!(!r.ok(), "tampering not detected");
        r.problems[0].clone()
    }

    #[test]
    fn an_intact_log_verifies() {
        let (text, key) = log(250);
        let r = verify(&text, Some(&key));
        assert!(r.ok(), "{:?}", r.problems);
        assert_eq!(r.events, 253, "250 events and 3 checkpoints");
        assert_eq!(r.checkpoints, 3);
        assert_eq!(r.unsigned_tail, 0);
        assert_eq!(r.last_checkpoint_seq, 252);
    }

    #[test]
    fn modified_deleted_inserted_and_reordered_lines_are_located() {
        let (text, key) = log(50);
        let l = lines(&text);

        let mut m = l.clone();
        m[9] = String::from_utf8(m[9].clone()).unwrap().replace("\"n\":9", "\"n\":99").into_bytes();
        let p = first_problem(&join(&m), &key);
        assert_eq!(p.line, 11);
        assert!(p.message.contains("line 10 was modified"), "{p:?}");

        let mut d = l.clone();
        d.remove(20);
        let p = first_problem(&join(&d), &key);
        assert_eq!(p.line, 21);
        assert!(p.message.contains("1 event(s) deleted"), "{p:?}");

        let mut ins = l.clone();
        ins.insert(30, l[5].clone());
        let p = first_problem(&join(&ins), &key);
        assert_eq!(p.line, 31);
        assert!(p.message.contains("inserted"), "{p:?}");

        let mut re = l.clone();
        re.swap(40, 41);
        let p = first_problem(&join(&re), &key);
        assert_eq!(p.line, 41);

        // A torn line is reported where it is.
        let mut torn = l.clone();
        torn[45].truncate(20);
        assert_eq!(first_problem(&join(&torn), &key).line, 46);
    }

    #[test]
    fn a_rewritten_chain_is_caught_by_the_signed_checkpoint() {
        let (text, key) = log(20);
        let mut l: Vec<Value> = lines(&text).iter().map(|x| serde_json::from_slice(x).unwrap()).collect();
        // Change event 5 and recompute every later prev hash, as an attacker without the key can.
        l[4]["n"] = json!(500);
        let mut out: Vec<Vec<u8>> = Vec::new();
        for (i, v) in l.iter_mut().enumerate() {
            if i > 0 {
                v["prev"] = json!(line_hash(&out[i - 1]));
            }
            out.push(serde_json::to_vec(v).unwrap());
        }
        let p = first_problem(&join(&out), &key);
        assert_eq!(p.line, 21, "the checkpoint after the events: {p:?}");
        assert!(p.message.contains("checkpoint"), "{p:?}");
        // A checkpoint forged with another key does not verify either.
        let other = Ed25519KeyPair::from_pkcs8(
            Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap().as_ref(),
        )
        .unwrap();
        let r = verify(&text, Some(other.public_key().as_ref()));
        assert!(r.problems.iter().any(|p| p.message.contains("signature does not verify")));
    }
}
