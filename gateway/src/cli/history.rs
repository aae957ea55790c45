//! `postern sessions --all` (the session history) and what `postern replay` says around a
//! recording: which session a prefix names, the header, the exit status, and why a session
//! has no recording.

use std::path::Path;

use anyhow::{Context, bail};
use serde_json::Value;

use super::format::{printable, table};
use crate::history::{HistoryRow, SessionFilter, valid_prefix};
use crate::store::{PortableStore as _, SessionRecord};

/// Candidates listed when a prefix names several sessions.
const CANDIDATES: u32 = 10;

/// A point in time for `--since`/`--until` (unix seconds).
fn when(flag: &str, s: &str) -> anyhow::Result<i64> {
    crate::manage::parse_when(s).map_err(|e| anyhow::anyhow!("{flag} {e}"))
}

/// `postern sessions --all`'s filters and paging.
#[derive(clap::Args)]
pub struct HistoryArgs {
    /// Only this user's sessions (admin-socket sessions: `local-admin(uid=N)`).
    #[arg(long, requires = "all")]
    pub user: Option<String>,
    /// Only sessions on this instance (name or id).
    #[arg(long, requires = "all")]
    pub instance: Option<String>,
    /// Only this kind (shell, exec, sftp, forward, passthrough, rdp) or door (ssh, rdp, web, admin).
    #[arg(long, requires = "all")]
    pub kind: Option<String>,
    /// Started at or after: a time (2026-12-01T10:00Z; UTC without an offset) or an age (2h, 7d).
    #[arg(long, requires = "all")]
    pub since: Option<String>,
    /// Started before: a time or an age, as --since.
    #[arg(long, requires = "all")]
    pub until: Option<String>,
    /// Rows per page (1-1000).
    #[arg(long, requires = "all", default_value_t = crate::history::DEFAULT_PAGE)]
    pub limit: u32,
    /// Continue after this session (the last id of the previous page; a unique prefix will do).
    #[arg(long, requires = "all")]
    pub before: Option<String>,
}

/// The filter `postern sessions --all` sends.
pub fn filter(args: &HistoryArgs) -> anyhow::Result<SessionFilter> {
    Ok(SessionFilter {
        user: args.user.clone(),
        instance: args.instance.clone(),
        kind: args.kind.clone(),
        since: args.since.as_deref().map(|s| when("--since", s)).transpose()?,
        until: args.until.as_deref().map(|s| when("--until", s)).transpose()?,
        before: args.before.clone(),
        limit: Some(args.limit),
    })
}

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// How a session ended, in a few words: "exit 3", "idle-timeout", "running".
fn outcome(r: &HistoryRow) -> String {
    match (r.active, r.ended_at, r.exit_code, &r.end_reason) {
        (true, _, _, _) => "running".into(),
        (false, None, _, _) => "unfinished".into(),
        (false, Some(_), Some(code), None) => format!("exit {code}"),
        (false, Some(_), Some(code), Some(why)) => format!("exit {code}, {why}"),
        (false, Some(_), None, Some(why)) => why.clone(),
        (false, Some(_), None, None) => "ended".into(),
    }
}

fn duration(secs: i64) -> String {
    match secs {
        ..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

/// Print a page of the history (`v`: the rows as the gateway sent them).
pub fn print_rows(v: &Value, args: &HistoryArgs, json: bool) -> anyhow::Result<()> {
    let rows: Vec<HistoryRow> = serde_json::from_value(v.clone()).context("reading the session history")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("No sessions match.");
        return Ok(());
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let what = r.command.clone().or_else(|| r.destination.clone()).unwrap_or_default();
            let what = if what.chars().count() > 40 {
                format!("{}…", what.chars().take(39).collect::<String>())
            } else {
                what
            };
            vec![
                short(&r.id).to_owned(),
                postern_core::util::rfc3339(r.started_at),
                r.user.clone(),
                r.target.clone(),
                r.kind.clone(),
                r.door.clone(),
                what,
                outcome(r),
                duration(r.duration_secs),
                format!("{}/{}", r.bytes_in, r.bytes_out),
                if r.logged { "yes" } else { "no" }.into(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["SESSION", "STARTED", "USER", "TARGET", "KIND", "DOOR", "WHAT", "END", "DURATION", "BYTES IN/OUT", "REC"],
            &cells
        )
    );
    if rows.len() == args.limit as usize
        && let Some(last) = rows.last()
    {
        eprintln!("(first {} shown; for more, add --before {})", rows.len(), short(&last.id));
    }
    Ok(())
}

/// The session a replay names, from the history in the data directory's database, or the
/// `[store] url` database when the config names one (read directly: replay works with the
/// gateway stopped). `Ok(None)`: the history does not have
/// it (no database, or an older or pruned session), and `wanted` is a whole id to look up
/// as a file. A prefix of several sessions, or of none, is an error that says so.
pub async fn find(data_dir: &Path, store_url: Option<&str>, wanted: &str) -> anyhow::Result<Option<SessionRecord>> {
    if !valid_prefix(wanted) {
        bail!("{wanted:?} is not a session id (hex digits; a unique prefix will do)");
    }
    let db = data_dir.join("postern.db");
    let found = if let Some(url) = store_url {
        // `[store] url`: the history is in that database, shared by the cluster's gateways.
        let store = crate::store::open(Some(url), data_dir).await?;
        store.sessions_by_prefix(wanted, CANDIDATES + 1).await.context("reading the session history")?
    } else if db.exists() {
        let store = crate::store::sqlite::SqliteStore::open(&db)
            .await
            .with_context(|| format!("opening the session history in {}", db.display()))?;
        store.sessions_by_prefix(wanted, CANDIDATES + 1).await.context("reading the session history")?
    } else {
        Vec::new()
    };
    // As long as an id: looked up as a file too (sessions from before the history, or pruned).
    let whole = wanted.len() >= 32;
    match found.as_slice() {
        [one] => Ok(Some(one.clone())),
        [] if whole => Ok(None),
        [] => bail!("no session id starts with {wanted:?} in the session history; see `postern sessions --all`"),
        many => {
            let mut msg = format!("{wanted:?} is the start of several session ids; give more of one:\n");
            for r in many.iter().take(CANDIDATES as usize) {
                msg.push_str(&format!(
                    "  {}  {}  {}@{}  {}\n",
                    r.id,
                    postern_core::util::rfc3339(r.started_ms.div_euclid(1000)),
                    printable(&r.user),
                    printable(&r.instance),
                    r.kind
                ));
            }
            if many.len() > CANDIDATES as usize {
                msg.push_str("  ... and more\n");
            }
            bail!("{}", msg.trim_end())
        }
    }
}

/// Why a session has no recording to replay, or None when it should have one.
pub fn not_recorded(r: &SessionRecord) -> Option<String> {
    let why = crate::history::unrecorded(r)?;
    Some(format!(
        "session {} ({} on {} by {}) has no recording: {}",
        r.id,
        r.kind,
        printable(&r.instance),
        printable(&r.user),
        printable(&why)
    ))
}

/// Who, where, when and what: printed before the replay (on standard error, so that
/// standard output is the session's output alone). Text from users and agents is escaped.
pub fn header(r: &SessionRecord) -> String {
    let mut h = format!("session {}\n", r.id);
    let from = r.source.as_deref().map(|s| format!(" from {s}")).unwrap_or_default();
    h.push_str(&format!("  user:     {}{}\n", printable(&r.user), from));
    h.push_str(&format!("  target:   {} ({})\n", printable(&r.instance), printable(&r.agent_id)));
    h.push_str(&format!("  kind:     {} via {}\n", r.kind, r.door));
    if let Some(c) = &r.command {
        h.push_str(&format!("  command:  {}\n", printable(c)));
    }
    let ended = match r.ended_at {
        Some(e) => format!(
            ", ended {} ({})",
            postern_core::util::rfc3339(e),
            duration((e - r.started_ms.div_euclid(1000)).max(0))
        ),
        None => ", not ended".to_owned(),
    };
    h.push_str(&format!("  started:  {}{ended}\n", postern_core::util::rfc3339(r.started_ms.div_euclid(1000))));
    h
}

/// The line after the replay: how the session ended.
pub fn footer(r: &SessionRecord) -> String {
    let why = r.end_reason.as_deref().map(|w| format!(" ({})", printable(w))).unwrap_or_default();
    match (r.ended_at, r.exit_code) {
        (Some(_), Some(code)) => format!("exit status {code}{why}"),
        (Some(_), None) => format!("no exit status{why}"),
        (None, _) => "no exit status: the session has not ended (or the gateway stopped before it did)".to_owned(),
    }
}
