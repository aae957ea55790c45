//! User commands: talk to a gateway's SSH front door as a user, with the SSH identity the
//! user already has (through the `postern_client` SDK): `ls`, `exec`/`shell` with
//! `--gateway`, `forward`, `run`. The SDK does the work; this module parses arguments and
//! does all the printing (tables, progress, summaries, `--json`) and Ctrl-C handling.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use postern_client::fleet::{self, FleetEvent, Outcome, RunLimits, Status};
use postern_client::{Client, ClientOptions, Connection, ForwardEvent, Instance, Target};
use russh::ChannelMsg;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How to reach the gateway as a user (shared by user commands).
#[derive(Args, Debug, Clone, Default)]
pub struct GatewayArgs {
    /// The gateway's SSH front door, HOST or HOST:PORT (port 2222 by default). Given (or
    /// POSTERN_GATEWAY set), `exec` and `shell` go through it as you instead of the local
    /// admin socket.
    #[arg(long, env = "POSTERN_GATEWAY")]
    pub gateway: Option<String>,
    /// Your Postern user name. Default: your local account name (as with ssh).
    #[arg(long, short = 'l', env = "POSTERN_USER")]
    pub user: Option<String>,
    /// Private key file (repeatable). Default: ssh-agent, then ~/.ssh/id_ed25519, id_ecdsa, id_rsa.
    #[arg(long = "identity", short = 'i')]
    pub identity: Vec<PathBuf>,
    /// known_hosts file trusted for the gateway (repeatable). Default: ~/.ssh/known_hosts and
    /// ~/.ssh/postern_known_hosts.
    #[arg(long = "known-hosts")]
    pub known_hosts: Vec<PathBuf>,
}

impl GatewayArgs {
    pub fn options(&self) -> anyhow::Result<ClientOptions> {
        let Some(gateway) = self.gateway.clone() else {
            bail!("which gateway? pass --gateway HOST[:PORT] or set POSTERN_GATEWAY");
        };
        // Signed in with `postern login` (and not told otherwise): that key, as that user.
        let login = if self.identity.is_empty() { super::home::current_login(&gateway) } else { None };
        let login = login.filter(|(_, u)| self.user.as_ref().is_none_or(|x| x == u));
        // As ssh does: the local account's name unless told otherwise.
        let user = match (&self.user, &login) {
            (Some(u), _) => u.clone(),
            (None, Some((_, u))) => u.clone(),
            (None, None) => local_user_name()?,
        };
        let identity_files = match login {
            Some((key, _)) => vec![key],
            None => self.identity.clone(),
        };
        Ok(ClientOptions { gateway, user, identity_files, known_hosts: self.known_hosts.clone() })
    }
}

/// The local account's name (the default Postern user name, as ssh's default user).
pub fn local_user_name() -> anyhow::Result<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::current())
        .ok()
        .flatten()
        .map(|u| u.name)
        .or_else(|| std::env::var("USER").ok())
        .context("no --user given and the local account has no name")
}

// ---------------------------------------------------------------------------------------
// ls

pub async fn ls(gw: &GatewayArgs, labels: Option<&str>, json: bool) -> anyhow::Result<i32> {
    let client = Client::connect(&gw.options()?, None).await?;
    let list = client.instances(labels).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(0);
    }
    print_instances(&list);
    Ok(0)
}

fn print_instances(list: &[Instance]) {
    let rows: Vec<[String; 6]> = list
        .iter()
        .map(|i| {
            [
                i.name.clone(),
                if i.online { "online".into() } else { "offline".into() },
                i.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
                i.platform.clone(),
                i.actions.join(","),
                // The default login first; "-": none to choose (the agent's own user).
                if i.logins.is_empty() { "-".into() } else { i.logins.join(",") },
            ]
        })
        .collect();
    table(&["NAME", "STATUS", "LABELS", "PLATFORM", "YOU MAY", "LOGINS"], &rows);
}

/// A plain left-aligned table.
pub fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    // Cells carry text from agents (platform, hostname): no control characters reach the terminal.
    let rows: Vec<[String; N]> =
        rows.iter().map(|r| r.clone().map(|c| super::format::printable(&c).into_owned())).collect();
    let rows = rows.as_slice();
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(x) = w.get_mut(i) {
                *x = (*x).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            let width = w.get(i).copied().unwrap_or(0);
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<width$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

// ---------------------------------------------------------------------------------------
// exec and shell

/// `postern exec INSTANCE -- CMD` through the gateway: exit status passed through.
pub async fn exec(gw: &GatewayArgs, instance: &str, command: &[String]) -> anyhow::Result<i32> {
    let client = Client::connect(&gw.options()?, Some(instance)).await?;
    let ch = client.session_channel().await?;
    ch.exec(true, command.join(" ")).await?;
    interact(ch, false).await
}

/// `postern shell INSTANCE` through the gateway, on a PTY, recorded by the gateway.
pub async fn shell(
    gw: &GatewayArgs,
    instance: &str,
    command: Option<String>,
    profile: Option<&str>,
) -> anyhow::Result<i32> {
    let client = Client::connect(&gw.options()?, Some(instance)).await?;
    let ch = client.session_channel().await?;
    let tty = super::session::stdin_is_tty();
    let (cols, rows) = super::session::terminal_size();
    let term = std::env::var("TERM").unwrap_or_else(|_| "xterm".into());
    ch.request_pty(false, &term, u32::from(cols), u32::from(rows), 0, 0, &[]).await?;
    if let Some(p) = profile {
        ch.set_env(false, "POSTERN_PROFILE", p).await?;
    }
    match command {
        Some(c) => ch.exec(true, c).await?,
        None => ch.request_shell(true).await?,
    }
    interact(ch, tty).await
}

/// Move stdin/stdout/stderr (and terminal size changes) until the remote side exits.
async fn interact(ch: russh::Channel<russh::client::Msg>, tty: bool) -> anyhow::Result<i32> {
    let _raw = if tty { super::session::RawMode::enable() } else { None };
    let (mut rd, wr) = ch.split();
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok();
    let mut stdin = tokio::io::stdin();
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut buf = vec![0u8; 32 * 1024];
    let mut stdin_open = true;
    let mut code: Option<i32> = None;
    // The gateway's refusal (access denied, unknown or offline instance): our error, not a
    // remote exit status (docs/client.md, "Exit status").
    let mut refused: Option<String> = None;
    loop {
        tokio::select! {
            n = stdin.read(&mut buf), if stdin_open => match n {
                Ok(0) | Err(_) => {
                    stdin_open = false;
                    let _ = wr.eof().await;
                }
                Ok(n) => {
                    if wr.data_bytes(buf.get(..n).unwrap_or_default().to_vec()).await.is_err() {
                        stdin_open = false;
                    }
                }
            },
            _ = async { match winch.as_mut() { Some(w) => { w.recv().await; } None => std::future::pending().await } }, if tty => {
                let (cols, rows) = super::session::terminal_size();
                let _ = wr.window_change(u32::from(cols), u32::from(rows), 0, 0).await;
            }
            msg = rd.wait() => match msg {
                // After the refusal marker the gateway repeats the text on stderr for ssh users.
                Some(ChannelMsg::Data { .. } | ChannelMsg::ExtendedData { .. }) if refused.is_some() => {}
                Some(ChannelMsg::ExitSignal { signal_name, error_message, .. })
                    if postern_client::refusal(&signal_name, &error_message).is_some() =>
                {
                    refused = postern_client::refusal(&signal_name, &error_message);
                }
                Some(ChannelMsg::Data { data }) => {
                    stdout.write_all(&data).await?;
                    stdout.flush().await?;
                }
                Some(ChannelMsg::ExtendedData { data, .. }) => {
                    stderr.write_all(&data).await?;
                    stderr.flush().await?;
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => code = Some(i32::try_from(exit_status).unwrap_or(255)),
                Some(ChannelMsg::ExitSignal { .. }) => code = code.or(Some(255)),
                Some(ChannelMsg::Close) | None => break,
                Some(_) => {}
            },
        }
    }
    drop(_raw);
    if let Some(message) = refused {
        return Err(postern_client::ClientError::SessionRefused { message }.into());
    }
    Ok(code.unwrap_or(255))
}

// ---------------------------------------------------------------------------------------
// forward

pub use postern_client::ForwardSpec;

/// Serve forwards until Ctrl-C, printing where each listens, refused connections and
/// reconnects as they happen, then the summary.
pub async fn serve_forwards(conn: Arc<Connection>, forwards: Vec<(SocketAddr, Target)>) -> anyhow::Result<i32> {
    let report = |event: ForwardEvent| match event {
        ForwardEvent::Listening { local, instance, target } => {
            let what = match &target {
                Target::Tcp(h, p) => format!("{h}:{p}"),
                Target::Rdp => "its RDP server".to_owned(),
            };
            eprintln!("postern: {local} -> {instance} {what} via the gateway");
        }
        ForwardEvent::Forwarding => eprintln!("postern: forwarding; Ctrl-C to stop"),
        ForwardEvent::Reconnecting => eprintln!("postern: connection to the gateway lost; reconnecting"),
        ForwardEvent::Refused { peer, error } => {
            eprintln!("postern: connection from {peer} refused: {}", postern_client::error_chain(&error));
        }
        _ => {}
    };
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let stats = postern_client::serve_forwards(conn, forwards, report, ctrl_c).await?;
    eprintln!("postern: {}", stats.summary());
    Ok(0)
}

/// `postern forward INSTANCE SPEC...`
pub async fn forward(
    gw: &GatewayArgs,
    instance: &str,
    specs: &[ForwardSpec],
    bind: std::net::IpAddr,
) -> anyhow::Result<i32> {
    let conn = Arc::new(Connection::open(&gw.options()?, instance).await?);
    // Refuse up front what the policy refuses, rather than at the first connection.
    for s in specs {
        drop(conn.client().await?.open_tcp(&s.host, s.port).await?);
    }
    let forwards =
        specs.iter().map(|s| (SocketAddr::new(bind, s.local), Target::Tcp(s.host.clone(), s.port))).collect();
    serve_forwards(conn, forwards).await
}

// ---------------------------------------------------------------------------------------
// run

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    postern run --targets env=prod -- uptime\n  \
    postern run --targets role=web --max-concurrency 10% --max-errors 2 -- 'apt-get -y upgrade'\n  \
    postern run --instances web-01,web-02 --json -- systemctl is-active nginx\n\n\
    Exit status: 0 when every targeted instance ran the command with status 0; 1 otherwise\n  \
    (a failure, an offline instance, or one not started after the error budget ran out);\n  \
    130 when interrupted with Ctrl-C (the run is still summarised).")]
pub struct RunArgs {
    #[command(flatten)]
    pub gateway: GatewayArgs,
    /// Label selector for the instances to run on (`env=prod,role!=db`).
    #[arg(long, required_unless_present = "instances")]
    pub targets: Option<String>,
    /// Instance names, comma-separated (instead of, or narrowing, --targets).
    #[arg(long, value_delimiter = ',')]
    pub instances: Vec<String>,
    /// At most this many at once: a number, or a percentage of the targets (`10%`).
    #[arg(long, default_value = "10")]
    pub max_concurrency: String,
    /// Stop starting new invocations once more than this many failed (number or `N%`).
    #[arg(long, default_value = "0")]
    pub max_errors: String,
    /// Give up on one invocation after this long ("30m").
    #[arg(long, default_value = "30m")]
    pub timeout: String,
    /// Where each instance's stdout and stderr are saved. Default: ./postern-run-<RUN ID>.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Print the summary as JSON on stdout (progress still goes to stderr; output only to files).
    #[arg(long)]
    pub json: bool,
    /// Do not show the instances' output as it comes (it is still saved in --output-dir).
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// The command (run by the remote user's shell).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

pub async fn run(args: &RunArgs) -> anyhow::Result<i32> {
    let opts = args.gateway.options()?;
    let timeout = crate::config::parse_duration(&args.timeout).context("--timeout")?;
    let command = args.command.join(" ");
    let client = Client::connect(&opts, None).await?;
    let candidates = fleet::select_instances(&client, args.targets.as_deref(), &args.instances).await?;
    let total = candidates.len();
    let limits = RunLimits::new(total, &args.max_concurrency, &args.max_errors, timeout)?;
    let run_id = fleet::begin(&client, args.targets.as_deref(), &command, &candidates, &limits).await?;
    let dir = args.output_dir.clone().unwrap_or_else(|| PathBuf::from(format!("postern-run-{run_id}")));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    eprintln!(
        "postern: {run_id}: {total} instance(s), {} at a time, error budget {}; output in {}",
        limits.concurrency,
        limits.max_errors,
        dir.display()
    );

    // Output is shown as it comes, each line after its instance's name, unless --quiet or
    // --json; then the progress is one line per finished instance (a redrawn bar would
    // tear the output), as it is off a terminal.
    let stream = !args.quiet && !args.json;
    let progress = Progress::new(total, !stream);
    let mut lines = PrefixedLines::default();
    let on_event = |event: FleetEvent<'_>| match event {
        FleetEvent::Started { .. } => progress.started(),
        FleetEvent::Output { instance, stream: which, data } if stream => lines.push(instance, which, data),
        FleetEvent::Finished { outcome, output } => {
            if stream {
                lines.finish(&outcome.instance);
            }
            if let Some(captured) = output {
                save_output(&dir, &outcome.instance, captured);
            }
            progress.done(outcome);
        }
        _ => {}
    };
    // Ctrl-C stops the run: no new invocations; the running ones end with their SSH
    // connections (the gateway stops the remote processes); the run is still summarised.
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let report = fleet::run(&opts, &run_id, &command, candidates, &limits, on_event, ctrl_c).await;
    progress.finish();
    let (outcomes, s) = (&report.outcomes, &report.summary);
    let summary = serde_json::json!({
        "run_id": run_id, "command": command, "output_dir": dir.display().to_string(),
        "total": total, "success": s.success, "failed": s.failed, "error": s.error,
        "timeout": s.timeout, "offline": s.offline, "not_allowed": s.not_allowed,
        "not_started": s.not_started, "cancelled": s.cancelled, "interrupted": s.interrupted,
        "instances": outcomes,
    });
    std::fs::write(dir.join("summary.json"), serde_json::to_vec_pretty(&summary)?)
        .with_context(|| format!("writing {}", dir.join("summary.json").display()))?;
    if let Err(e) = fleet::end(&client, &run_id, s).await {
        eprintln!("postern: could not record the end of the run: {}", postern_client::error_chain(&e));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        let rows: Vec<[String; 5]> = outcomes
            .iter()
            .map(|o| {
                [
                    o.instance.clone(),
                    o.status.as_str().to_owned(),
                    o.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                    format!("{:.1}s", o.duration_ms as f64 / 1000.0),
                    o.error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        table(&["INSTANCE", "STATUS", "EXIT", "TIME", "NOTE"], &rows);
        println!("\n{} of {total} succeeded; output in {}", s.success, dir.display());
    }
    Ok(if s.interrupted {
        130
    } else if s.success == total {
        0
    } else {
        1
    })
}

/// `INSTANCE.stdout` and `INSTANCE.stderr` in the run's output directory (what was kept).
fn save_output(dir: &std::path::Path, instance: &str, captured: &postern_client::Captured) {
    let safe: String =
        instance.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    let _ = std::fs::write(dir.join(format!("{safe}.stdout")), &captured.stdout.data);
    let _ = std::fs::write(dir.join(format!("{safe}.stderr")), &captured.stderr.data);
}

/// Bound on a partial line held back for its prefix: a longer one is shown in pieces.
const MAX_HELD_LINE: usize = 64 << 10;

/// Instances' output as `NAME: line`, stdout to stdout and stderr to stderr; a line is
/// shown once complete (or when its instance finishes), so lines of different instances
/// never mix.
#[derive(Default)]
struct PrefixedLines {
    partial: std::collections::HashMap<(String, bool), Vec<u8>>,
}

impl PrefixedLines {
    fn push(&mut self, instance: &str, stream: postern_client::OutputStream, data: &[u8]) {
        let to_stderr = stream == postern_client::OutputStream::Stderr;
        let held = self.partial.entry((instance.to_owned(), to_stderr)).or_default();
        held.extend_from_slice(data);
        let mut out = Vec::new();
        while let Some(end) = held.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = held.drain(..=end).collect();
            prefixed(&mut out, instance, &line);
        }
        if held.len() > MAX_HELD_LINE {
            let mut line = std::mem::take(held);
            line.push(b'\n');
            prefixed(&mut out, instance, &line);
        }
        emit(to_stderr, &out);
    }

    /// Show what is left of an instance's output (a last line without a newline).
    fn finish(&mut self, instance: &str) {
        for to_stderr in [false, true] {
            if let Some(mut rest) = self.partial.remove(&(instance.to_owned(), to_stderr))
                && !rest.is_empty()
            {
                rest.push(b'\n');
                let mut out = Vec::new();
                prefixed(&mut out, instance, &rest);
                emit(to_stderr, &out);
            }
        }
    }
}

fn prefixed(out: &mut Vec<u8>, instance: &str, line: &[u8]) {
    out.extend_from_slice(instance.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(line);
}

fn emit(to_stderr: bool, bytes: &[u8]) {
    use std::io::Write;
    if bytes.is_empty() {
        return;
    }
    let _ = if to_stderr {
        std::io::stderr().lock().write_all(bytes)
    } else {
        let mut out = std::io::stdout().lock();
        out.write_all(bytes).and_then(|()| out.flush())
    };
}

/// Progress on stderr: a redrawn line on a terminal, one line per finished instance otherwise.
struct Progress {
    total: usize,
    tty: bool,
    state: std::sync::Mutex<(usize, usize, usize)>, // done, failed, running
}

impl Progress {
    /// `bar`: a redrawn bar when stderr is a terminal.
    fn new(total: usize, bar: bool) -> Self {
        let tty = bar && rustix::termios::isatty(std::io::stderr());
        Progress { total, tty, state: std::sync::Mutex::new((0, 0, 0)) }
    }

    fn started(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.2 += 1;
        }
        self.draw(None);
    }

    fn done(&self, o: &Outcome) {
        if let Ok(mut s) = self.state.lock() {
            s.0 += 1;
            if o.status != Status::Success {
                s.1 += 1;
            }
            if o.status.was_started() {
                s.2 = s.2.saturating_sub(1);
            }
        }
        self.draw(Some(o));
    }

    fn draw(&self, finished: Option<&Outcome>) {
        let Ok(s) = self.state.lock().map(|s| *s) else { return };
        let (done, failed, running) = s;
        if self.tty {
            let width = 30;
            let filled = (done * width).checked_div(self.total).unwrap_or(width).min(width);
            eprint!(
                "\r[{}{}] {done}/{} done, {failed} not ok, {running} running ",
                "#".repeat(filled),
                ".".repeat(width - filled),
                self.total
            );
        } else if let Some(o) = finished {
            eprintln!("postern: [{done}/{}] {} {}", self.total, o.instance, o.status);
        }
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}
