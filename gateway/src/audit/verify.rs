//! `postern audit verify`: walk the log, recompute the hash chain, check every checkpoint's
//! signature, and say where the log stops being trustworthy.

use serde::Serialize;
use serde_json::Value;

use super::anchor::AuditAnchor;
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
    /// The seq of the last checkpoint the gateway signed, from its database or the object
    /// store, that the log was checked to reach (None: no anchor given, so a removed tail
    /// cannot be seen).
    pub anchor_seq: Option<u64>,
    /// Where that anchor was recorded (`"in its database"`, `"in the object store at …"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anchor_recorded: Option<String>,
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
    verify_parts(&[Part { name: "log".into(), text, ending: None }], public_key, None)
}

/// Where verification stands while walking the log.
struct Walk {
    problems: Vec<Problem>,
    prev_hash: String,
    expected_seq: u64,
    events: usize,
    checkpoints: usize,
    last_cp: u64,
    since_cp: usize,
    first_seq: u64,
    /// Seq up to which events are missing at the start, and up to which retention says so.
    missing_through: u64,
    deleted_through: u64,
    start: Option<(String, usize)>,
    anchor_signed: bool,
    verifier: Option<ring::signature::UnparsedPublicKey<Vec<u8>>>,
    our_key: Option<String>,
    /// The anchor to find, and the hash of the line found at its seq.
    anchor: Option<AuditAnchor>,
    at_anchor: Option<(String, usize, String)>,
    /// The last seq seen.
    last_seq: u64,
}

/// The seq and prev of a line, if it is a JSON event.
fn seq_prev(raw: &[u8]) -> Option<(Option<u64>, String)> {
    let v = serde_json::from_slice::<Value>(raw).ok()?;
    Some((v.get("seq").and_then(Value::as_u64), v.get("prev").and_then(Value::as_str).unwrap_or("").to_owned()))
}

impl Walk {
    /// Lines `a` (written first) and `b` are the two events the chain expects next, in the
    /// other order: a swap of two adjacent lines.
    fn swapped(&self, a: &[u8], b: &[u8]) -> bool {
        let (Some((Some(sa), pa)), Some((Some(sb), pb))) = (seq_prev(a), seq_prev(b)) else { return false };
        sb == self.expected_seq && sa == self.expected_seq + 1 && pb == self.prev_hash && pa == line_hash(b)
    }

    /// Check one line, `n` (1-based) of segment `file`.
    fn line(&mut self, file: &str, n: usize, raw: &[u8]) {
        let mut problems = Vec::new();
        let mut problem = |message: String| problems.push(Problem { file: file.to_owned(), line: n, message });
        let hash = line_hash(raw);
        let Ok(v) = serde_json::from_slice::<Value>(raw) else {
            problem("not a JSON event (damaged, or torn by a crash mid-write)".into());
            self.prev_hash = hash;
            self.problems.append(&mut problems);
            return;
        };
        let seq = v.get("seq").and_then(Value::as_u64);
        let prev = v.get("prev").and_then(Value::as_str).unwrap_or("");
        let is_checkpoint = v.get("event").and_then(Value::as_str) == Some("audit.checkpoint");
        if self.events == 0 {
            self.first_seq = seq.unwrap_or(1);
            // The log may start later than seq 1 at a segment anchor (checked below).
            if self.first_seq > 1 && is_checkpoint && v.get("segment_start").is_some() {
                self.expected_seq = self.first_seq;
                self.prev_hash = prev.to_owned();
                self.missing_through = self.first_seq - 1;
                self.start = Some((file.to_owned(), n));
            }
        }
        self.events += 1;
        self.since_cp += 1;
        match seq {
            Some(s) if s == self.expected_seq => {}
            Some(s) if s > self.expected_seq => problem(format!(
                "seq {s} where {} was expected: {} event(s) deleted before this line",
                self.expected_seq,
                s - self.expected_seq
            )),
            Some(s) => {
                // An earlier event again: reported here, and the chain goes on from the line
                // before it, so the lines after it verify again.
                problem(format!(
                    "seq {s} where {} was expected: this line was inserted, duplicated or moved",
                    self.expected_seq
                ));
                self.problems.append(&mut problems);
                return;
            }
            None => problem("no seq: not written by the gateway".into()),
        }
        if prev != self.prev_hash {
            let what = if self.events == 1 {
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
            self.deleted_through = self.deleted_through.max(through);
        }
        if is_checkpoint {
            self.checkpoints += 1;
            let covers = v.get("covers_seq").and_then(Value::as_u64).unwrap_or(0);
            let covers_hash = v.get("covers_hash").and_then(Value::as_str).unwrap_or("");
            let sig = v.get("sig").and_then(Value::as_str).and_then(unhex).unwrap_or_default();
            if covers + 1 != seq.unwrap_or(0) || covers_hash != self.prev_hash {
                problem(format!("checkpoint covers seq {covers} with a hash the log before it does not have"));
            }
            match (&self.verifier, &self.our_key) {
                (Some(ver), Some(id)) => {
                    let signed = ver.verify(&checkpoint_message(covers, covers_hash), &sig).is_ok();
                    if !signed || v.get("key_id").and_then(Value::as_str) != Some(id.as_str()) {
                        problem("checkpoint signature does not verify with the gateway's audit key".into());
                    } else if covers + 1 == seq.unwrap_or(0) && covers_hash == self.prev_hash {
                        self.last_cp = covers;
                        self.since_cp = 0;
                        self.anchor_signed |= self.events == 1;
                    }
                }
                _ => problem("checkpoint signature cannot be checked: no public key given".into()),
            }
        }
        if let (Some(a), Some(s)) = (&self.anchor, seq)
            && a.seq == s
        {
            self.at_anchor = Some((file.to_owned(), n, hash.clone()));
        }
        self.problems.append(&mut problems);
        self.prev_hash = hash;
        self.expected_seq = seq.map(|s| s.max(self.expected_seq) + 1).unwrap_or(self.expected_seq + 1);
        self.last_seq = seq.unwrap_or(self.last_seq).max(self.last_seq);
    }
}

/// Verify the segments of a log, oldest first. `public_key` is the raw ed25519 public key
/// checkpoints must be signed with; without it, checkpoint signatures are reported as
/// unverifiable. A log may start past seq 1 only at a signed segment anchor, and only if a
/// retention event later in the log records deleting the events before it. `anchor` is the
/// last checkpoint the gateway signed, as its database or the object store recorded it
/// ([`super::anchor`]), with where (`"in its database"`): the log must reach it, or its tail
/// was removed (without it, a missing tail cannot be seen).
pub fn verify_parts(parts: &[Part<'_>], public_key: Option<&[u8]>, anchor: Option<(&AuditAnchor, &str)>) -> Report {
    let (anchor, recorded) = (anchor.map(|a| a.0), anchor.map(|a| a.1).unwrap_or_default());
    let mut w = Walk {
        problems: Vec::new(),
        prev_hash: GENESIS.to_owned(),
        expected_seq: 1,
        events: 0,
        checkpoints: 0,
        last_cp: 0,
        since_cp: 0,
        first_seq: 0,
        missing_through: 0,
        deleted_through: 0,
        start: None,
        anchor_signed: false,
        verifier: public_key.map(|k| ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, k.to_vec())),
        our_key: public_key.map(key_id),
        anchor: anchor.cloned(),
        at_anchor: None,
        last_seq: 0,
    };
    let mut end = None::<(String, usize)>;
    for part in parts {
        let body = part.text.strip_suffix(b"\n").unwrap_or(part.text);
        let lines: Vec<&[u8]> = if body.is_empty() { Vec::new() } else { body.split(|b| *b == b'\n').collect() };
        let mut i = 0;
        while let Some(raw) = lines.get(i) {
            let next = lines.get(i + 1);
            if let Some(next) = next.filter(|next| w.events > 0 && w.swapped(raw, next)) {
                // Named once, as what it is; both lines then verify in chain order.
                w.problems.push(Problem {
                    file: part.name.clone(),
                    line: i + 1,
                    message: format!(
                        "lines {} and {} are swapped: seq {} is written before seq {} (their chain is intact in the other order)",
                        i + 1,
                        i + 2,
                        w.expected_seq + 1,
                        w.expected_seq
                    ),
                });
                w.line(&part.name, i + 2, next);
                w.line(&part.name, i + 1, raw);
                i += 2;
            } else {
                w.line(&part.name, i + 1, raw);
                i += 1;
            }
        }
        end = Some((part.name.clone(), lines.len()));
        if part.ending == Some(Ending::Torn) {
            w.problems.push(Problem {
                file: part.name.clone(),
                line: lines.len() + 1,
                message: "the segment ends with a record cut off mid-write (crash), or was truncated".into(),
            });
        }
    }
    if let Some(first) = parts.first()
        && w.events > 0
        && w.first_seq > 1
    {
        let (file, line) = w.start.clone().unwrap_or((first.name.clone(), 1));
        let (first_seq, missing_through) = (w.first_seq, w.missing_through);
        let message = if missing_through == 0 {
            Some(format!(
                "the log starts at seq {first_seq} without a signed segment anchor: earlier events are missing"
            ))
        } else if w.deleted_through < missing_through {
            Some(format!(
                "the log starts at seq {first_seq}, but no audit.retention event records deleting events 1-{missing_through}"
            ))
        } else if !w.anchor_signed {
            Some("the segment anchor the log starts at is not signed".into())
        } else {
            None
        };
        if let Some(message) = message {
            w.problems.insert(0, Problem { file, line, message });
        }
    }
    if let Some(a) = &w.anchor {
        let (file, line) = end.unwrap_or_default();
        match &w.at_anchor {
            Some((_, _, hash)) if *hash == a.hash => {}
            Some((file, line, _)) => w.problems.push(Problem {
                file: file.clone(),
                line: *line,
                message: format!(
                    "this line (seq {}) is not the checkpoint the gateway signed at that seq (recorded {recorded}): \
                     the log was cut back and written on, or rewritten, from there",
                    a.seq
                ),
            }),
            // A log that starts after the anchor (retention) has nothing to compare.
            None if w.events > 0 && w.first_seq > a.seq => {}
            None => w.problems.push(Problem {
                file,
                line: line + 1,
                message: format!(
                    "the log ends at seq {}, but the gateway signed a checkpoint at seq {} (recorded {recorded}): \
                     events {}-{} at least were removed from the end of the log",
                    w.last_seq,
                    a.seq,
                    w.last_seq + 1,
                    a.seq
                ),
            }),
        }
    }
    Report {
        segments: parts.len(),
        events: w.events,
        checkpoints: w.checkpoints,
        first_seq: w.first_seq,
        last_checkpoint_seq: w.last_cp,
        unsigned_tail: w.since_cp,
        anchor_seq: anchor.map(|a| a.seq),
        anchor_recorded: anchor.map(|_| recorded.to_owned()),
        problems: w.problems,
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

    #[test]
    fn a_swap_of_two_adjacent_lines_is_named_as_such_and_the_lines_after_it_verify() {
        let (text, key) = log(50);
        for at in [20, 49] {
            // Two events, and (at 49) an event and the checkpoint after it.
            let mut l = lines(&text);
            l.swap(at, at + 1);
            let r = verify(&join(&l), Some(&key));
            assert_eq!(r.problems.len(), 1, "exactly one problem: {:#?}", r.problems);
            assert_eq!(r.problems[0].line, at + 1);
            let named = format!("lines {} and {} are swapped", at + 1, at + 2);
            assert!(r.problems[0].message.contains(&named), "{:?}", r.problems[0]);
            assert_eq!(r.last_checkpoint_seq, 50, "the checkpoint after the swap still verifies");
        }
    }

    #[test]
    fn an_inserted_or_duplicated_line_is_one_problem_and_the_chain_goes_on() {
        let (text, key) = log(50);
        let l = lines(&text);
        let mut ins = l.clone();
        ins.insert(30, l[5].clone());
        let r = verify(&join(&ins), Some(&key));
        assert_eq!(r.problems.len(), 1, "{:#?}", r.problems);
        assert_eq!(r.problems[0].line, 31);
        assert_eq!(r.last_checkpoint_seq, 50);
    }

    #[test]
    fn a_log_cut_back_to_a_checkpoint_or_emptied_is_caught_against_the_anchor() {
        // 250 events: checkpoints at seq 101, 202 and 253 (the last, the anchor).
        let (text, key) = log(250);
        let l = lines(&text);
        let anchor = AuditAnchor { seq: 253, hash: line_hash(&l[252]) };
        let check = |text: &[u8], anchor: Option<&AuditAnchor>| {
            verify_parts(
                &[Part { name: "log".into(), text, ending: None }],
                Some(&key),
                anchor.map(|a| (a, "in its database")),
            )
        };
        let whole = check(&text, Some(&anchor));
        assert!(whole.ok(), "{:?}", whole.problems);
        assert_eq!(whole.anchor_seq, Some(253));

        // Cut back to the checkpoint at seq 101: the chain alone is intact ...
        let cut = join(&l[..101]);
        assert!(check(&cut, None).ok(), "without the anchor the hole is invisible");
        // ... the anchor shows what is missing.
        let r = check(&cut, Some(&anchor));
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert_eq!(r.problems[0].line, 102);
        assert!(r.problems[0].message.contains("events 102-253"), "{:?}", r.problems[0]);

        // An emptied segment.
        assert!(check(b"", None).ok());
        let r = check(b"", Some(&anchor));
        assert!(r.problems.iter().any(|p| p.message.contains("events 1-253")), "{:?}", r.problems);

        // Cut back and written on past the anchor's seq: the line there is not the anchor.
        let other = AuditAnchor { seq: 253, hash: line_hash(&l[251]) };
        let r = check(&text, Some(&other));
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert!(r.problems[0].message.contains("not the checkpoint the gateway signed"), "{:?}", r.problems[0]);
    }
}
