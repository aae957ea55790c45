//! `postern user|group|policy|grant|revoke|explain|sessions`: identity and policy
//! administration through the admin socket.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use serde_json::Value;

use super::format::{ago, table};
use crate::admin::{AdminRequest, request};
use crate::config::parse_duration;
use crate::manage::ManageRequest;
use postern_core::util::line_diff;

#[derive(Subcommand)]
pub enum UserAction {
    /// Add a user with SSH keys and groups.
    #[command(
        after_help = "Examples:\n  postern user add alice --group ops --key-file ~/.ssh/id_ed25519.pub\n  postern user add bob --key 'ssh-ed25519 AAAA... bob@laptop'\n  postern user add carol                      no key yet: a grant or `user key add` later"
    )]
    Add {
        name: String,
        /// Group memberships (repeat or comma-separate).
        #[arg(long = "group", value_delimiter = ',')]
        groups: Vec<String>,
        /// An OpenSSH public key line (repeatable).
        #[arg(long = "key")]
        keys: Vec<String>,
        /// A file of OpenSSH public key lines (repeatable).
        #[arg(long = "key-file")]
        key_files: Vec<PathBuf>,
        /// Certificate principals from a trusted user CA that mean this user (default: the name).
        #[arg(long = "principal")]
        principals: Vec<String>,
    },
    /// Remove a user; their live sessions end.
    #[command(after_help = "Examples:\n  postern user rm alice")]
    Rm { name: String },
    /// List users.
    #[command(after_help = "Examples:\n  postern user list\n  postern user list --json")]
    List {
        #[arg(long)]
        json: bool,
    },
    /// Disable a user: they cannot log in and their live sessions end.
    #[command(after_help = "Examples:\n  postern user disable alice")]
    Disable { name: String },
    /// Enable a disabled user.
    #[command(after_help = "Examples:\n  postern user enable alice")]
    Enable { name: String },
    /// Set a user's groups (replaces the list; empty removes all).
    #[command(
        after_help = "Examples:\n  postern user groups alice ops,oncall\n  postern user groups alice                  no groups"
    )]
    Groups {
        name: String,
        #[arg(value_delimiter = ',')]
        groups: Vec<String>,
    },
    /// Issue a short-lived SSH user certificate for a user's key, from the gateway's user CA:
    /// the user logs in with key and certificate, nothing registered. Written beside the key
    /// as KEY-cert.pub, where OpenSSH looks for it.
    #[command(
        after_help = "Examples:\n  postern user cert alice --key-file alice.pub             valid for [identity] cert_ttl (8h)\n  postern user cert alice --key-file alice.pub --ttl 1h    writes alice-cert.pub\n  ssh -i alice alice@web-01.postern                        OpenSSH offers alice-cert.pub with it"
    )]
    Cert {
        name: String,
        /// The user's OpenSSH public key file (`KEY.pub`).
        #[arg(long)]
        key_file: PathBuf,
        /// How long the certificate is valid ("1h", "30m"; at most "7d"). Default: `[identity] cert_ttl`.
        #[arg(long)]
        ttl: Option<String>,
        /// Where to write the certificate (default: KEY-cert.pub beside the key; "-": standard output).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print the result as JSON (the certificate, its serial and its end).
        #[arg(long)]
        json: bool,
    },
    /// Add or remove SSH keys.
    #[command(
        after_help = "Examples:\n  postern user key add alice --file alice-laptop.pub\n  postern user key rm alice SHA256:q3l7...     (fingerprints: postern user list)"
    )]
    Key {
        #[command(subcommand)]
        action: KeyAction,
    },
}

#[derive(Subcommand)]
pub enum KeyAction {
    /// Bind a public key (line or --file) to a user.
    #[command(
        after_help = "Examples:\n  postern user key add alice --file alice-laptop.pub\n  postern user key add alice 'ssh-ed25519 AAAA... alice@laptop'"
    )]
    Add {
        name: String,
        key: Option<String>,
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Unbind a key by its SHA256 fingerprint (as `postern user list` shows it).
    #[command(after_help = "Examples:\n  postern user key rm alice SHA256:q3l7...")]
    Rm { name: String, fingerprint: String },
}

#[derive(Subcommand)]
pub enum GroupAction {
    /// List groups and their members.
    #[command(after_help = "Examples:\n  postern group list\n  postern group list --json")]
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum PolicyAction {
    /// Validate and apply a policy document (TOML); its `name` decides which policy it replaces.
    #[command(after_help = "Examples:\n  postern policy apply ops.toml                (the document: docs/policy.md)")]
    Apply { file: PathBuf },
    /// Validate a document without applying it (works without a gateway).
    #[command(
        after_help = "Examples:\n  postern policy check ops.toml                no gateway needed: for CI on a policy repository"
    )]
    Check { file: PathBuf },
    /// List applied policies.
    #[command(after_help = "Examples:\n  postern policy list\n  postern policy list --json")]
    List {
        #[arg(long)]
        json: bool,
    },
    /// Print a policy (the current version, or --version N).
    #[command(after_help = "Examples:\n  postern policy show ops\n  postern policy show ops --version 3")]
    Show {
        name: String,
        #[arg(long)]
        version: Option<i64>,
    },
    /// Versions of a policy: when, by whom.
    #[command(after_help = "Examples:\n  postern policy history ops")]
    History { name: String },
    /// Differences between two versions (default: the previous and the current one).
    #[command(
        after_help = "Examples:\n  postern policy diff ops                      the previous version against the current one\n  postern policy diff ops 2 5"
    )]
    Diff { name: String, from: Option<i64>, to: Option<i64> },
    /// Remove a policy (recorded as a new version; history is kept).
    #[command(after_help = "Examples:\n  postern policy rm ops")]
    Rm { name: String },
}

#[derive(Subcommand)]
pub enum SessionsAction {
    /// End a live session now, with a message to its user.
    #[command(
        after_help = "Examples:\n  postern sessions terminate 3f9c2a71b0de4a55c1e8d7f6a9b2c3d4   (ids: postern sessions)"
    )]
    Terminate { id: String },
}

async fn manage(socket: &Path, req: ManageRequest) -> anyhow::Result<Value> {
    let (v, _) = request(socket, &AdminRequest::Manage { request: req }).await?;
    Ok(v.get("result").cloned().unwrap_or(Value::Null))
}

/// A table with one row per element of the JSON array `v`.
fn print_table(v: &Value, headers: &[&str], row: impl Fn(&Value) -> Vec<String>) {
    let rows: Vec<Vec<String>> = v.as_array().map(|a| a.iter().map(row).collect()).unwrap_or_default();
    print!("{}", table(headers, &rows));
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(x)) => x.clone(),
        Some(Value::Null) | None => String::new(),
        Some(Value::Array(a)) => {
            a.iter().map(|x| x.as_str().map(str::to_owned).unwrap_or(x.to_string())).collect::<Vec<_>>().join(",")
        }
        Some(other) => other.to_string(),
    }
}

fn read_keys(keys: &[String], files: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let mut out = keys.to_vec();
    for f in files {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        out.extend(text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).map(str::to_owned));
    }
    Ok(out)
}

/// Where a user or policy comes from: `store` (managed with these commands) or `config
/// (read-only)` (the gateway config file, or quickstart).
fn from(v: &Value) -> String {
    if v.get("read_only") == Some(&Value::Bool(true)) { "config (read-only)".into() } else { "store".into() }
}

pub async fn user(socket: &Path, action: &UserAction) -> anyhow::Result<()> {
    let show = |v: &Value| {
        let keys = v.get("keys").and_then(Value::as_array).map(|a| a.len()).unwrap_or(0);
        println!(
            "user {}  groups: {}  keys: {keys}{}",
            s(v, "name"),
            s(v, "groups"),
            if v.get("disabled") == Some(&Value::Bool(true)) { "  DISABLED" } else { "" }
        );
    };
    match action {
        UserAction::Add { name, groups, keys, key_files, principals } => {
            let keys = read_keys(keys, key_files)?;
            let v = manage(
                socket,
                ManageRequest::UserAdd {
                    name: name.clone(),
                    groups: groups.clone(),
                    keys,
                    principals: principals.clone(),
                },
            )
            .await?;
            show(&v);
        }
        UserAction::Rm { name } => {
            manage(socket, ManageRequest::UserRm { name: name.clone() }).await?;
            println!("removed user {name}");
        }
        UserAction::List { json } => {
            let v = manage(socket, ManageRequest::UserList).await?;
            if *json {
                return print_json(&v);
            }
            print_table(&v, &["USER", "GROUPS", "STATE", "FROM", "KEYS"], |u| {
                let fps: Vec<String> = u
                    .get("keys")
                    .and_then(Value::as_array)
                    .map(|k| k.iter().map(|x| s(x, "fingerprint")).collect())
                    .unwrap_or_default();
                vec![
                    s(u, "name"),
                    s(u, "groups"),
                    if u.get("disabled") == Some(&Value::Bool(true)) { "disabled" } else { "active" }.into(),
                    from(u),
                    fps.join(" "),
                ]
            });
        }
        UserAction::Disable { name } => {
            show(&manage(socket, ManageRequest::UserSetDisabled { name: name.clone(), disabled: true }).await?)
        }
        UserAction::Enable { name } => {
            show(&manage(socket, ManageRequest::UserSetDisabled { name: name.clone(), disabled: false }).await?)
        }
        UserAction::Groups { name, groups } => {
            show(&manage(socket, ManageRequest::UserSetGroups { name: name.clone(), groups: groups.clone() }).await?)
        }
        UserAction::Key { action: KeyAction::Add { name, key, file } } => {
            let keys = read_keys(&key.iter().cloned().collect::<Vec<_>>(), &file.iter().cloned().collect::<Vec<_>>())?;
            if keys.is_empty() {
                bail!("give a key line or --file");
            }
            for key in keys {
                show(&manage(socket, ManageRequest::UserKeyAdd { name: name.clone(), key }).await?);
            }
        }
        UserAction::Cert { name, key_file, ttl, out, json } => {
            let key = std::fs::read_to_string(key_file)
                .with_context(|| format!("reading {}", key_file.display()))?
                .lines()
                .find(|l| !l.trim().is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .with_context(|| format!("{} holds no public key", key_file.display()))?;
            let ttl_secs = ttl.as_deref().map(parse_duration).transpose()?.map(|d| d.as_secs());
            let v = manage(socket, ManageRequest::UserCert { name: name.clone(), key, ttl_secs }).await?;
            let cert = v.get("certificate").and_then(Value::as_str).context("no certificate in the answer")?;
            let until = v.get("valid_before").and_then(Value::as_i64).unwrap_or_default();
            let until = jiff::Timestamp::from_second(until).map(|t| t.to_string()).unwrap_or_default();
            let path = match out {
                Some(p) if p.as_os_str() == "-" => None,
                Some(p) => Some(p.clone()),
                None => {
                    let stem = key_file.to_string_lossy();
                    Some(PathBuf::from(format!("{}-cert.pub", stem.strip_suffix(".pub").unwrap_or(&stem))))
                }
            };
            match &path {
                Some(p) => {
                    std::fs::write(p, format!("{cert}\n")).with_context(|| format!("writing {}", p.display()))?
                }
                None if !json => println!("{cert}"),
                None => {}
            }
            if *json {
                print_json(&v)?;
            } else if let Some(p) = &path {
                println!(
                    "certificate for {name} (serial {}) valid until {until}: {}",
                    v.get("serial").and_then(Value::as_u64).unwrap_or_default(),
                    p.display()
                );
            }
        }
        UserAction::Key { action: KeyAction::Rm { name, fingerprint } } => show(
            &manage(socket, ManageRequest::UserKeyRm { name: name.clone(), fingerprint: fingerprint.clone() }).await?,
        ),
    }
    Ok(())
}

pub async fn group(socket: &Path, action: &GroupAction) -> anyhow::Result<()> {
    let GroupAction::List { json } = action;
    let v = manage(socket, ManageRequest::GroupList).await?;
    if *json {
        return print_json(&v);
    }
    print_table(&v, &["GROUP", "MEMBERS"], |g| vec![s(g, "group"), s(g, "members")]);
    Ok(())
}

pub async fn policy(socket: Option<&Path>, action: &PolicyAction) -> anyhow::Result<()> {
    let read = |f: &PathBuf| std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()));
    if let PolicyAction::Check { file } = action {
        let doc = postern_core::policy::document::parse(&file.display().to_string(), &read(file)?)
            .map_err(anyhow::Error::msg)?;
        println!("{}: policy {} is valid ({} statements)", file.display(), doc.name, doc.statements.len());
        return Ok(());
    }
    let socket = socket.context("no admin socket")?;
    let history = |name: &str| {
        let name = name.to_owned();
        async move { manage(socket, ManageRequest::PolicyHistory { name }).await }
    };
    match action {
        PolicyAction::Check { .. } => {}
        PolicyAction::Apply { file } => {
            let v =
                manage(socket, ManageRequest::PolicyApply { file: file.display().to_string(), source: read(file)? })
                    .await?;
            if v.get("unchanged") == Some(&Value::Bool(true)) {
                println!("policy {} unchanged (version {})", s(&v, "name"), s(&v, "version"));
            } else {
                println!(
                    "applied policy {} version {} ({} statements)",
                    s(&v, "name"),
                    s(&v, "version"),
                    s(&v, "statements")
                );
            }
        }
        PolicyAction::List { json } => {
            let v = manage(socket, ManageRequest::PolicyList).await?;
            if *json {
                return print_json(&v);
            }
            print_table(&v, &["POLICY", "VERSION", "APPLIED", "BY", "FROM", "FILE"], |p| {
                let read_only = p.get("read_only") == Some(&Value::Bool(true));
                vec![
                    s(p, "name"),
                    if read_only { "-".into() } else { s(p, "version") },
                    if read_only { "-".into() } else { ago(p.get("applied_at").and_then(Value::as_i64)) },
                    if read_only { "-".into() } else { s(p, "applied_by") },
                    from(p),
                    s(p, "file"),
                ]
            });
        }
        PolicyAction::Show { name, version } => {
            let h = history(name).await?;
            let versions = h.as_array().cloned().unwrap_or_default();
            let pick = match version {
                Some(n) => versions.iter().find(|p| p.get("version").and_then(Value::as_i64) == Some(*n)),
                None => versions.last(),
            };
            let p = pick.context("no such version")?;
            if p.get("removed") == Some(&Value::Bool(true)) {
                bail!("policy {name} was removed in version {}", s(p, "version"));
            }
            print!("{}", s(p, "source"));
        }
        PolicyAction::History { name } => {
            let h = history(name).await?;
            print_table(&h, &["VERSION", "APPLIED", "BY", "FILE"], |p| {
                vec![
                    s(p, "version"),
                    ago(p.get("applied_at").and_then(Value::as_i64)),
                    s(p, "applied_by"),
                    if p.get("removed") == Some(&Value::Bool(true)) { "removed".into() } else { s(p, "file") },
                ]
            });
        }
        PolicyAction::Diff { name, from, to } => {
            let h = history(name).await?;
            let versions = h.as_array().cloned().unwrap_or_default();
            let source = |n: i64| {
                versions
                    .iter()
                    .find(|p| p.get("version").and_then(Value::as_i64) == Some(n))
                    .map(|p| s(p, "source"))
                    .with_context(|| format!("policy {name} has no version {n}"))
            };
            let last = versions.last().and_then(|p| p.get("version")).and_then(Value::as_i64).unwrap_or(1);
            let to = to.unwrap_or(last);
            let from = from.unwrap_or(to - 1);
            let old = if from < 1 { String::new() } else { source(from)? };
            println!("--- {name} version {from}\n+++ {name} version {to}");
            print!("{}", line_diff(&old, &source(to)?));
        }
        PolicyAction::Rm { name } => {
            let v = manage(socket, ManageRequest::PolicyRm { name: name.clone() }).await?;
            println!("removed policy {name} (version {})", s(&v, "version"));
        }
    }
    Ok(())
}

pub async fn grant(socket: &Path, user: &str, policy: &str, ttl: &str, reason: &str, json: bool) -> anyhow::Result<()> {
    let ttl = parse_duration(ttl)?;
    let v = manage(
        socket,
        ManageRequest::GrantCreate {
            user: user.to_owned(),
            policy: policy.to_owned(),
            ttl_secs: ttl.as_secs(),
            reason: reason.to_owned(),
        },
    )
    .await?;
    if json {
        return print_json(&v);
    }
    println!("granted policy {policy} to {user} until {} (grant {})", when(&v, "expires_at"), s(&v, "id"));
    Ok(())
}

fn when(v: &Value, k: &str) -> String {
    v.get(k)
        .and_then(Value::as_i64)
        .and_then(|t| jiff::Timestamp::from_second(t).ok())
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%SZ").to_string())
        .unwrap_or_default()
}

pub async fn grants(socket: &Path, all: bool, json: bool) -> anyhow::Result<()> {
    let v = manage(socket, ManageRequest::GrantList { all }).await?;
    if json {
        return print_json(&v);
    }
    print_table(&v, &["GRANT", "USER", "POLICY", "EXPIRES", "STATE", "REASON"], |g| {
        vec![s(g, "id"), s(g, "user"), s(g, "policy"), when(g, "expires_at"), s(g, "state"), s(g, "reason")]
    });
    Ok(())
}

pub async fn revoke_grants(
    socket: &Path,
    id: Option<String>,
    user: Option<String>,
    policy: Option<String>,
) -> anyhow::Result<()> {
    let v = manage(socket, ManageRequest::GrantRevoke { id, user, policy }).await?;
    let grants = s(&v, "revoked");
    if !grants.is_empty() {
        println!("revoked {grants}");
    }
    match v.get("certificates_revoked").and_then(Value::as_u64) {
        Some(0) | None => {}
        Some(1) => println!("revoked 1 certificate"),
        Some(n) => println!("revoked {n} certificates"),
    }
    Ok(())
}

/// `request` is a [`ManageRequest::Explain`].
pub async fn explain(socket: &Path, request: ManageRequest, json: bool) -> anyhow::Result<i32> {
    let v = manage(socket, request).await?;
    let user = s(&v, "user");
    let action = s(&v, "action");
    let allowed = v.pointer("/decision/allowed") == Some(&Value::Bool(true));
    if json {
        print_json(&v)?;
    } else {
        println!(
            "{}: {user} {action} on {} at {}",
            if allowed { "ALLOW" } else { "DENY" },
            s(&v, "target"),
            s(&v, "at")
        );
        if v.get("user_active") == Some(&Value::Bool(false)) {
            println!("  user {user} is unknown or disabled");
        }
        println!("  {}", s(&v, "summary"));
        for st in v.pointer("/decision/decided_by").and_then(Value::as_array).into_iter().flatten() {
            println!(
                "  decided by: {}/{} ({}, line {})",
                s(st, "policy"),
                s(st, "sid"),
                s(st, "effect"),
                s(st, "line")
            );
        }
        for st in v.pointer("/decision/overridden").and_then(Value::as_array).into_iter().flatten() {
            println!("  overridden allow: {}/{} (line {})", s(st, "policy"), s(st, "sid"), s(st, "line"));
        }
        for pair in v.pointer("/decision/not_applicable").and_then(Value::as_array).into_iter().flatten() {
            if let (Some(st), Some(why)) = (pair.get(0), pair.get(1).and_then(Value::as_str)) {
                println!("  not applicable: {}/{} ({}): {why}", s(st, "policy"), s(st, "sid"), s(st, "effect"));
            }
        }
        if let Some(logins) = v.get("logins_text").and_then(Value::as_str) {
            println!("  {logins}");
        }
        if allowed && let Some(settings) = v.pointer("/decision/settings") {
            println!("  session settings: {}", serde_json::to_string(settings)?);
        }
    }
    Ok(if allowed { 0 } else { 1 })
}

pub async fn sessions(
    socket: &Path,
    all: bool,
    json: bool,
    history: &super::history::HistoryArgs,
    action: Option<&SessionsAction>,
) -> anyhow::Result<()> {
    if let Some(SessionsAction::Terminate { id }) = action {
        let v = manage(socket, ManageRequest::SessionTerminate { id: id.clone() }).await?;
        match v.get("gateway").and_then(Value::as_str) {
            Some(gateway) => println!("terminated session {id} (at gateway {gateway})"),
            None => println!("terminated session {id}"),
        }
        return Ok(());
    }
    if all {
        let filter = super::history::filter(history)?;
        let v = manage(socket, ManageRequest::Sessions { all: true, filter }).await?;
        return super::history::print_rows(&v, history, json);
    }
    let v = manage(socket, ManageRequest::Sessions { all: false, filter: Default::default() }).await?;
    if json {
        return print_json(&v);
    }
    // With `[cluster]` every row names its gateway; a single gateway's table is as before.
    let cluster = v.as_array().is_some_and(|rows| rows.iter().any(|x| x.get("gateway").is_some()));
    let mut headers =
        vec!["SESSION", "USER", "TARGET", "KIND", "LOGGED", "STATE", "STARTED", "DURATION", "BYTES IN/OUT"];
    if cluster {
        headers.insert(1, "GATEWAY");
    }
    print_table(&v, &headers, |x| {
        let secs = x.get("duration_secs").and_then(Value::as_i64).unwrap_or(0);
        let mut row = vec![
            s(x, "id"),
            s(x, "user"),
            s(x, "target"),
            s(x, "kind"),
            if x.get("logged") == Some(&Value::Bool(true)) { "yes" } else { "no" }.into(),
            if x.get("active") == Some(&Value::Bool(true)) { "active" } else { "ended" }.into(),
            ago(x.get("started_at").and_then(Value::as_i64)),
            format!("{}m{:02}s", secs / 60, secs % 60),
            format!("{}/{}", s(x, "bytes_in"), s(x, "bytes_out")),
        ];
        if cluster {
            row.insert(1, s(x, "gateway"));
        }
        row
    });
    Ok(())
}
