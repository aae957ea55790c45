//! `postern audit verify`'s anchor lookup and its report.

use std::path::Path;

use anyhow::Context;

use crate::audit::anchor::AuditAnchor;
use crate::audit::verify::Report;
use crate::store::Store as _;
use crate::store::sqlite::SqliteStore;

/// The last checkpoint the gateway signed, from its database in `data_dir`, or why the end
/// of the log cannot be checked. `loose`: segments given with --file, and no data directory.
pub async fn anchor(data_dir: &Path, loose: bool) -> anyhow::Result<Result<AuditAnchor, String>> {
    let unchecked = "the end of the log cannot be checked (a removed tail is not seen)";
    if loose {
        return Ok(Err(format!(
            "{unchecked}: --file segments without --data-dir or --config; give the gateway's data directory, \
             whose database records the last checkpoint the gateway signed"
        )));
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

/// Print `report` on `what` (the log or a file); `unchecked`: why the end was not checked.
pub fn print(what: &str, report: &Report, unchecked: Option<&str>, json: bool) -> anyhow::Result<()> {
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
            match report.anchor_seq {
                Some(seq) => format!("; it reaches the last checkpoint the gateway recorded (seq {seq})"),
                None => String::new(),
            }
        );
    } else {
        println!("{what}: NOT intact ({} problems)", report.problems.len());
        for p in report.problems.iter().take(20) {
            println!("  {} line {}: {}", p.file, p.line, p.message);
        }
    }
    if let Some(why) = unchecked {
        eprintln!("note: {why}");
    }
    Ok(())
}
