//! `postern audit verify`'s anchor lookup and its report. The anchor is the last
//! checkpoint the gateway signed, recorded in its database and, with `[audit.s3]`, in the
//! object store; the log is checked against the later of the two.

use std::os::unix::fs::DirBuilderExt as _;
use std::path::Path;

use anyhow::Context;

use crate::audit::anchor::AuditAnchor;
use crate::audit::ship::{S3Config, Shipper};
use crate::audit::verify::Report;
use crate::store::PortableStore as _;
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
/// `gateway_id`: the chain of that gateway of a cluster, checked against its own anchor
/// (in the database and in its folder of the object store), never another gateway's.
pub async fn anchor(
    data_dir: &Path,
    store_url: Option<&str>,
    s3: Option<&S3Config>,
    loose: bool,
    gateway_id: Option<&str>,
) -> anyhow::Result<(Option<Chosen>, Vec<String>)> {
    let mut notes = Vec::new();
    let db = database_anchor(data_dir, store_url, loose, gateway_id).await?;
    let s3 = match s3 {
        None => None,
        Some(cfg) => {
            let shipper = Shipper::new(cfg, data_dir)?.for_gateway(gateway_id);
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
    gateway_id: Option<&str>,
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
        let anchor = match gateway_id {
            Some(id) => store.gateway_audit_anchor(id).await.map(|g| g.map(|g| g.anchor)),
            None => store.audit_anchor().await,
        };
        let what = match gateway_id {
            Some(id) => format!("{what} (gateway {id})"),
            None => what,
        };
        return Ok(anchor
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

/// One chain found in the bucket: a cluster gateway's (`Some(id)`) or a single gateway's.
#[derive(Debug, serde::Serialize)]
struct BucketChain {
    gateway: Option<String>,
    /// Where its segments are: `s3://BUCKET/PREFIX[/gateways/ID]/audit/`.
    location: String,
    report: Report,
    notes: Vec<String>,
}

/// `postern audit verify --bucket`: every gateway's chain in `[audit.s3]` (a folder per
/// cluster gateway, and a single gateway's segments directly under the prefix), each checked
/// with the checkpoint key its gateway recorded in the store and against its own anchor.
/// One report per gateway; 1 when any chain is not intact.
pub async fn bucket(
    cfg: &crate::config::GatewayConfig,
    keyring: &crate::audit::seal::Keyring,
    own_key: &Path,
    json: bool,
) -> anyhow::Result<i32> {
    use std::collections::BTreeMap;
    let s3 = cfg.audit.s3.as_ref().context("--bucket reads the [audit.s3] object store, and the config has none")?;
    let base = Shipper::new(s3, &cfg.data_dir)?;
    // The keys (and anchors) the gateways recorded: a chain is checked with its gateway's
    // key from the database, not with anything found beside it in the bucket.
    let recorded: BTreeMap<String, crate::store::GatewayAnchor> = match cfg.store.url.as_deref() {
        Some(url) => crate::store::open(Some(url), &cfg.data_dir)
            .await?
            .gateway_audit_anchors()
            .await
            .context("reading the gateways' audit anchors from the database")?
            .into_iter()
            .collect(),
        None => BTreeMap::new(),
    };
    let mut chains: Vec<Option<String>> = Vec::new();
    if !base.segment_names().await?.is_empty() {
        chains.push(None);
    }
    // Folder names come from the bucket: only gateway ids are chains (and safe to print).
    let (mut ids, strays): (Vec<String>, Vec<String>) =
        base.gateways().await?.into_iter().partition(|g| crate::config::valid_gateway_id(g));
    ids.extend(recorded.keys().cloned());
    ids.sort();
    ids.dedup();
    chains.extend(ids.into_iter().map(Some));
    if chains.is_empty() {
        anyhow::bail!("no audit log in {}", base.location(crate::audit::ship::Kind::Segment));
    }
    let scratch = std::env::temp_dir().join(format!("postern-verify-{}", postern_core::util::random_hex(8)?));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&scratch)
        .with_context(|| format!("creating {}", scratch.display()))?;
    let _cleanup = RemoveDir(scratch.clone());
    let mut out = Vec::new();
    for (i, gateway) in chains.into_iter().enumerate() {
        let dir = scratch.join(i.to_string());
        out.push(verify_chain(cfg, keyring, own_key, gateway, &recorded, &dir).await?);
    }
    if let Some(first) = out.first_mut()
        && !strays.is_empty()
    {
        first.notes.push(format!(
            "{} folder(s) under the prefix's gateways/ are not named like a gateway id and were not verified",
            strays.len()
        ));
    }
    let failed: Vec<String> = out.iter().filter(|c| !c.report.ok()).map(|c| name_of(c.gateway.as_deref())).collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for c in &out {
            print(&format!("{} ({})", name_of(c.gateway.as_deref()), c.location), &c.report, &c.notes, false)?;
        }
        if failed.is_empty() {
            println!("{} audit chains in the object store, all intact", out.len());
        } else {
            println!("{} audit chains in the object store; NOT intact: {}", out.len(), failed.join(", "));
        }
    }
    Ok(if failed.is_empty() { 0 } else { 1 })
}

/// How a chain is named in the report.
fn name_of(gateway: Option<&str>) -> String {
    match gateway {
        Some(id) => format!("gateway {id}"),
        None => "single gateway".to_owned(),
    }
}

/// A scratch directory, removed when done.
struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Download and verify one gateway's chain from the bucket.
async fn verify_chain(
    cfg: &crate::config::GatewayConfig,
    keyring: &crate::audit::seal::Keyring,
    own_key: &Path,
    gateway: Option<String>,
    recorded: &std::collections::BTreeMap<String, crate::store::GatewayAnchor>,
    dir: &Path,
) -> anyhow::Result<BucketChain> {
    use crate::audit::ship::Kind;
    use crate::audit::verify::{Part, Problem, verify_parts};
    let s3 = cfg.audit.s3.as_ref().context("[audit.s3]")?;
    let shipper = Shipper::new(s3, &cfg.data_dir)?.for_gateway(gateway.as_deref());
    let location = shipper.location(Kind::Segment);
    let mut early = Vec::new();
    let problem = |message: String| Problem { file: location.clone(), line: 0, message };
    // The checkpoint key: the one the gateway recorded in the database; this gateway's own
    // (and a single gateway's) from the data directory or --key.
    let own = gateway.is_none() || gateway.as_deref() == cfg.gateway_id();
    let key_text = match gateway.as_deref().and_then(|g| recorded.get(g)) {
        Some(r) => Some(r.public_key.clone()),
        None if own => std::fs::read_to_string(own_key).ok(),
        None => None,
    };
    let key = key_text.as_deref().and_then(crate::audit::verify::parse_public_key);
    if key.is_none() {
        early.push(problem(format!(
            "no checkpoint key recorded for {} in the database: its signatures cannot be checked",
            name_of(gateway.as_deref())
        )));
    }
    let (anchor, notes) = anchor(&cfg.data_dir, cfg.store.url.as_deref(), Some(s3), false, gateway.as_deref()).await?;
    let names = shipper.segment_names().await?;
    if names.is_empty() {
        early.push(problem(format!("no segments of {} in the object store", name_of(gateway.as_deref()))));
    }
    std::fs::DirBuilder::new().mode(0o700).create(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut texts = Vec::with_capacity(names.len());
    for name in &names {
        // A segment named for another gateway in this one's folder was moved there.
        let named = crate::audit::parse_segment_name(name).and_then(|(g, _)| g);
        if named != gateway.as_deref() {
            early.push(Problem {
                file: format!("{location}{name}"),
                line: 0,
                message: format!("named for {}, in the folder of {}", name_of(named), name_of(gateway.as_deref())),
            });
        }
        let dest = dir.join(name);
        if !shipper.fetch(Kind::Segment, name, &dest).await? {
            early.push(Problem {
                file: format!("{location}{name}"),
                line: 0,
                message: "listed, but gone when read".into(),
            });
            continue;
        }
        // A segment that cannot be read (a sealed one without its key) fails this chain only.
        match crate::audit::seal::Plain::read_all(&dest, keyring) {
            Ok(plain) => texts.push((format!("{location}{name}"), plain)),
            Err(e) => early.push(Problem { file: format!("{location}{name}"), line: 0, message: format!("{e:#}") }),
        }
        let _ = std::fs::remove_file(&dest);
    }
    let parts: Vec<Part<'_>> =
        texts.iter().map(|(n, (text, ending))| Part { name: n.clone(), text, ending: *ending }).collect();
    let mut report = verify_parts(&parts, key.as_deref(), anchor.as_ref().map(|c| (&c.anchor, c.recorded.as_str())));
    if key.is_none() {
        // Without a key nothing is signed as far as this check knows: say so, once.
        report.problems.retain(|p| !p.message.contains("cannot be checked: no public key"));
    }
    early.append(&mut report.problems);
    report.problems = early;
    Ok(BucketChain { gateway, location, report, notes })
}
