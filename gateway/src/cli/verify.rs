//! `postern audit verify`'s anchor lookup and its report. The anchor is the last
//! checkpoint the gateway signed, recorded in its database and, with `[audit.s3]`, in the
//! object store; the log is checked against the later of the two.

use std::path::Path;

use anyhow::Context;

use crate::audit::anchor::AuditAnchor;
use crate::audit::ship::{S3Config, Shipper};
use crate::audit::verify::Report;
use crate::store::Store as _;
use crate::store::sqlite::SqliteStore;

/// The anchor the log is checked against, and where it was recorded (`"in its database"`,
/// `"in the object store at s3://…"`).
#[derive(Debug)]
pub struct Chosen {
    pub anchor: AuditAnchor,
    pub recorded: String,
}

/// The anchor to check the log against (None: none, so a removed tail cannot be seen), and
/// notes for the reader: why there is none, which sources were not available or disagree.
/// With `s3` (`[audit.s3]`) the object store's anchor is read too, and the later of the two
/// is used (the object store's on a tie): cutting the log back and lowering the database's
/// anchor to match is then still seen.
pub async fn anchor(
    data_dir: &Path,
    store_url: Option<&str>,
    s3: Option<&S3Config>,
    loose: bool,
) -> anyhow::Result<(Option<Chosen>, Vec<String>)> {
    let mut notes = Vec::new();
    let db = database_anchor(data_dir, store_url, loose).await?;
    let s3 = match s3 {
        None => None,
        Some(cfg) => {
            let shipper = Shipper::new(cfg, data_dir)?;
            match shipper.get_anchor().await {
                Ok(Some((a, from))) => Some((AuditAnchor { seq: a.seq, hash: a.hash }, from)),
                Ok(None) => {
                    notes.push(format!("the object store holds no audit anchor yet ({})", shipper.anchor_location()));
                    None
                }
                Err(e) => {
                    notes.push(format!(
                        "the object store's audit anchor could not be read ({e:#}); checked against the database's only"
                    ));
                    None
                }
            }
        }
    };
    let chosen = match (db, s3) {
        (Ok(d), Some((s, from))) => {
            if d.seq > s.seq {
                notes.push(format!(
                    "the object store's anchor (seq {}) is behind the database's (seq {}): its last uploads have not \
                     happened (the store was unreachable); checked against the database's",
                    s.seq, d.seq
                ));
                Chosen { anchor: d, recorded: "in its database".into() }
            } else {
                if d.seq < s.seq {
                    notes.push(format!(
                        "the database's anchor (seq {}) is behind the object store's (seq {}): the database was \
                         changed, or restored from an older copy; checked against the object store's",
                        d.seq, s.seq
                    ));
                } else if d.hash != s.hash {
                    notes.push(format!(
                        "the database's anchor and the object store's name different checkpoints at seq {}; checked \
                         against the object store's",
                        s.seq
                    ));
                }
                Chosen { anchor: s, recorded: format!("in the object store at {from}") }
            }
        }
        (Err(why), Some((s, from))) => {
            notes.push(format!("no anchor in the database ({why}); checked against the object store's"));
            Chosen { anchor: s, recorded: format!("in the object store at {from}") }
        }
        (Ok(d), None) => Chosen { anchor: d, recorded: "in its database".into() },
        (Err(why), None) => {
            notes.push(why);
            return Ok((None, notes));
        }
    };
    Ok((Some(chosen), notes))
}

/// The last checkpoint the gateway signed, from its database in `data_dir`, or why the end
/// of the log cannot be checked. `loose`: segments given with --file, and no data directory.
async fn database_anchor(
    data_dir: &Path,
    store_url: Option<&str>,
    loose: bool,
) -> anyhow::Result<Result<AuditAnchor, String>> {
    let unchecked = "the end of the log cannot be checked (a removed tail is not seen)";
    if loose {
        return Ok(Err(format!(
            "{unchecked}: --file segments without --data-dir or --config; give the gateway's data directory, \
             whose database records the last checkpoint the gateway signed"
        )));
    }
    if let Some(url) = store_url {
        // `[store] url`: the anchor is in that database.
        let store = crate::store::open(Some(url), data_dir).await?;
        let what = format!("the [store] url database {}", crate::store::postgres::describe(url));
        return Ok(store
            .audit_anchor()
            .await
            .with_context(|| format!("reading the audit anchor from {what}"))?
            .ok_or_else(|| format!("{unchecked}: {what} records no signed checkpoint yet")));
    }
    let db = data_dir.join("postern.db");
    if !db.exists() {
        return Ok(Err(format!("{unchecked}: no gateway database at {}", db.display())));
    }
    let store = SqliteStore::open(&db).await.with_context(|| format!("opening {}", db.display()))?;
    Ok(store
        .audit_anchor()
        .await
        .with_context(|| format!("reading the audit anchor from {}", db.display()))?
        .ok_or_else(|| format!("{unchecked}: {} records no signed checkpoint yet", db.display())))
}

/// Print `report` on `what` (the log or a file); `notes` (to standard error): why the end
/// was not checked, which anchors were not available or disagree.
pub fn print(what: &str, report: &Report, notes: &[String], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else if report.ok() {
        println!(
            "{what}: intact. {} events{}, {} signed checkpoints; the last covers seq {}{}{}",
            report.events,
            if report.first_seq > 1 {
                format!(" from seq {} (older segments deleted by retention)", report.first_seq)
            } else {
                String::new()
            },
            report.checkpoints,
            report.last_checkpoint_seq,
            if report.unsigned_tail > 0 {
                format!(" ({} newer events are chained but not yet under a checkpoint)", report.unsigned_tail)
            } else {
                String::new()
            },
            match (report.anchor_seq, &report.anchor_recorded) {
                (Some(seq), Some(recorded)) =>
                    format!("; it reaches the last checkpoint the gateway recorded (seq {seq}, {recorded})"),
                _ => String::new(),
            }
        );
    } else {
        println!("{what}: NOT intact ({} problems)", report.problems.len());
        for p in report.problems.iter().take(20) {
            println!("  {} line {}: {}", p.file, p.line, p.message);
        }
        if let (Some(seq), Some(recorded)) = (report.anchor_seq, &report.anchor_recorded) {
            println!("  (checked against the last checkpoint the gateway recorded: seq {seq}, {recorded})");
        }
    }
    for note in notes {
        eprintln!("note: {note}");
    }
    Ok(())
}
