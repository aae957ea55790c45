//! User commands: talk to a gateway's SSH front door as a user, with the SSH identity the
//! user already has (see [`crate::client`]): `ls`, `exec`/`shell` with `--gateway`,
//! `forward`, `run`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use russh::ChannelMsg;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

use crate::client::{Client, ClientOptions, Instance};

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
        // As ssh does: the local account's name unless told otherwise.
        let user = match &self.user {
            Some(u) => u.clone(),
            None => nix::unistd::User::from_uid(nix::unistd::Uid::current())
                .ok()
                .flatten()
                .map(|u| u.name)
                .or_else(|| std::env::var("USER").ok())
                .context("no --user given and the local account has no name")?,
        };
        Ok(ClientOptions {
            gateway,
            user,
            identity_files: self.identity.clone(),
            known_hosts: self.known_hosts.clone(),
        })
    }
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
    let rows: Vec<[String; 5]> = list
        .iter()
        .map(|i| {
            [
                i.name.clone(),
                if i.online { "online".into() } else { "offline".into() },
                i.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
                i.platform.clone(),
                i.actions.join(","),
            ]
        })
        .collect();
    table(&["NAME", "STATUS", "LABELS", "PLATFORM", "YOU MAY"], &rows);
}

/// A plain left-aligned table.
pub fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
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
    Ok(code.unwrap_or(255))
}

// ---------------------------------------------------------------------------------------
// forward

/// `LPORT:PORT` (the instance itself) or `LPORT:HOST:PORT` (a host the instance can reach).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardSpec {
    pub local: u16,
    pub host: String,
    pub port: u16,
}

impl std::str::FromStr for ForwardSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: expected LOCAL_PORT:PORT or LOCAL_PORT:HOST:PORT");
        let (local, rest) = s.split_once(':').ok_or_else(bad)?;
        let local: u16 = local.parse().map_err(|_| bad())?;
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h.trim_start_matches('[').trim_end_matches(']').to_owned(), p),
            None => ("localhost".to_owned(), rest),
        };
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(ForwardSpec { local, host, port })
    }
}

#[derive(Default)]
pub struct ForwardStats {
    pub connections: AtomicU64,
    pub failed: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
}

impl ForwardStats {
    pub fn summary(&self) -> String {
        format!(
            "{} connection(s), {} failed; {} bytes sent, {} received",
            self.connections.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.bytes_up.load(Ordering::Relaxed),
            self.bytes_down.load(Ordering::Relaxed),
        )
    }
}

/// One SSH connection to `user%instance`, reconnected when it drops.
pub struct Connection {
    opts: ClientOptions,
    instance: String,
    current: Mutex<Arc<Client>>,
}

impl Connection {
    pub async fn open(opts: &ClientOptions, instance: &str) -> anyhow::Result<Connection> {
        let client = Client::connect(opts, Some(instance)).await?;
        Ok(Connection { opts: opts.clone(), instance: instance.to_owned(), current: Mutex::new(Arc::new(client)) })
    }

    /// The live client, reconnecting first if the connection has ended.
    pub async fn client(&self) -> anyhow::Result<Arc<Client>> {
        let mut guard = self.current.lock().await;
        if guard.is_closed() {
            eprintln!("postern: connection to the gateway lost; reconnecting");
            *guard = Arc::new(Client::connect(&self.opts, Some(&self.instance)).await?);
        }
        Ok(guard.clone())
    }
}

/// What a local forward connects to.
#[derive(Debug, Clone)]
pub enum Target {
    Tcp(String, u16),
    Rdp,
}

/// Listen on each `(bind, target)` and carry every accepted connection over its own SSH
/// channel, until Ctrl-C; then print a summary.
pub async fn serve_forwards(conn: Arc<Connection>, forwards: Vec<(SocketAddr, Target)>) -> anyhow::Result<i32> {
    let stats = Arc::new(ForwardStats::default());
    let mut listeners = Vec::new();
    for (bind, target) in forwards {
        let l = tokio::net::TcpListener::bind(bind).await.with_context(|| format!("listening on {bind}"))?;
        let what = match &target {
            Target::Tcp(h, p) => format!("{h}:{p}"),
            Target::Rdp => "its RDP server".to_owned(),
        };
        eprintln!("postern: {} -> {} {what} via the gateway", l.local_addr()?, conn.instance);
        listeners.push((l, target));
    }
    eprintln!("postern: forwarding; Ctrl-C to stop");
    let mut tasks = tokio::task::JoinSet::new();
    for (l, target) in listeners {
        let (conn, stats) = (conn.clone(), stats.clone());
        tasks.spawn(async move {
            loop {
                let Ok((tcp, peer)) = l.accept().await else { continue };
                let _ = tcp.set_nodelay(true);
                let (conn, stats, target) = (conn.clone(), stats.clone(), target.clone());
                tokio::spawn(async move {
                    let stream = match conn.client().await {
                        Ok(c) => match &target {
                            Target::Tcp(h, p) => c.open_tcp(h, *p).await,
                            Target::Rdp => c.open_rdp().await,
                        },
                        Err(e) => Err(e),
                    };
                    let stream = match stream {
                        Ok(s) => s,
                        Err(e) => {
                            eprintln!("postern: connection from {peer} refused: {e:#}");
                            stats.failed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                    };
                    stats.connections.fetch_add(1, Ordering::Relaxed);
                    let (tcp_read, tcp_write) = tcp.into_split();
                    let (ch_read, ch_write) = tokio::io::split(stream);
                    tokio::join!(
                        pipe(tcp_read, ch_write, &stats.bytes_up),
                        pipe(ch_read, tcp_write, &stats.bytes_down)
                    );
                });
            }
        });
    }
    let _ = tokio::signal::ctrl_c().await;
    tasks.abort_all();
    eprintln!("postern: {}", stats.summary());
    Ok(0)
}

/// Copy until end of input, counting as it goes (the summary is right even for
/// connections still open at Ctrl-C), then pass the end on.
async fn pipe(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    counter: &AtomicU64,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(buf.get(..n).unwrap_or_default()).await.is_err() {
                    break;
                }
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
    let _ = to.shutdown().await;
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
    /// Print the summary as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// The command (run by the remote user's shell).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// `10` or `10%` of `total` (at least 1 when a percentage of a non-empty set).
pub fn amount(s: &str, total: usize) -> anyhow::Result<usize> {
    match s.strip_suffix('%') {
        Some(p) => {
            let p: f64 = p.parse().with_context(|| format!("invalid percentage {s:?}"))?;
            if !(0.0..=100.0).contains(&p) {
                bail!("percentage {s:?} must be between 0% and 100%");
            }
            let n = (total as f64 * p / 100.0).ceil() as usize;
            Ok(n.min(total))
        }
        None => s.parse().with_context(|| format!("invalid number {s:?} (use a number or a percentage like 10%)")),
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub instance: String,
    /// `success`, `failed` (non-zero exit), `error` (could not run), `timeout`, `offline`,
    /// `not-allowed`, `not-started` (error budget used up, or interrupted), `cancelled`
    /// (interrupted while running).
    pub status: &'static str,
    pub exit_code: Option<u32>,
    pub duration_ms: u64,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub error: Option<String>,
}

const KEEP_OUTPUT: usize = 64 << 20;

pub async fn run(args: &RunArgs) -> anyhow::Result<i32> {
    let opts = args.gateway.options()?;
    let timeout = crate::config::parse_duration(&args.timeout).context("--timeout")?;
    let command = args.command.join(" ");
    let client = Client::connect(&opts, None).await?;
    let mut candidates = client.instances(args.targets.as_deref()).await?;
    if !args.instances.is_empty() {
        candidates.retain(|i| args.instances.contains(&i.name));
        for name in &args.instances {
            if !candidates.iter().any(|i| &i.name == name) {
                bail!("instance {name:?}: access denied (or no such instance)");
            }
        }
    }
    if candidates.is_empty() {
        bail!("no instance you may reach matches {}", args.targets.as_deref().unwrap_or("--instances"));
    }
    let total = candidates.len();
    let concurrency = amount(&args.max_concurrency, total)?.max(1);
    let max_errors = amount(&args.max_errors, total)?;
    let begin = serde_json::json!({"targets": args.targets, "command": command,
        "instances": candidates.iter().map(|i| i.name.clone()).collect::<Vec<_>>(),
        "max_concurrency": concurrency, "max_errors": max_errors});
    let run_id = client
        .gateway_command(&format!("run-begin {begin}"))
        .await?
        .get("run_id")
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .context("the gateway did not return a run id")?;
    let dir = args.output_dir.clone().unwrap_or_else(|| PathBuf::from(format!("postern-run-{run_id}")));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    eprintln!(
        "postern: {run_id}: {total} instance(s), {concurrency} at a time, error budget {max_errors}; output in {}",
        dir.display()
    );

    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut queue = std::collections::VecDeque::new();
    for i in candidates {
        let skip = if !i.online {
            Some(("offline", "the instance's agent is not connected"))
        } else if !i.actions.iter().any(|a| a == "exec") {
            Some(("not-allowed", "exec is not allowed for you there"))
        } else {
            None
        };
        match skip {
            Some((status, why)) => outcomes.push(Outcome {
                instance: i.name,
                status,
                exit_code: None,
                duration_ms: 0,
                stdout_bytes: 0,
                stderr_bytes: 0,
                error: Some(why.to_owned()),
            }),
            None => queue.push_back(i.name),
        }
    }
    let progress = Progress::new(total);
    for o in &outcomes {
        progress.done(o);
    }
    let mut running = tokio::task::JoinSet::new();
    let mut names = std::collections::HashMap::new();
    let mut errors = 0usize;
    let mut interrupted = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        while !interrupted && running.len() < concurrency && errors <= max_errors {
            let Some(name) = queue.pop_front() else { break };
            let (opts, command, dir, run_id) = (opts.clone(), command.clone(), dir.clone(), run_id.clone());
            let n = name.clone();
            let task = running.spawn(async move { invoke(&opts, &n, &command, &dir, &run_id, timeout).await });
            names.insert(task.id(), name);
            progress.started();
        }
        let joined = tokio::select! {
            j = running.join_next_with_id() => j,
            _ = &mut ctrl_c, if !interrupted => {
                // Stop: no new invocations; the running ones end with their SSH connections
                // (the gateway stops the remote processes); the run is still summarised.
                interrupted = true;
                running.abort_all();
                continue;
            }
        };
        let o = match joined {
            None => break,
            Some(Ok((_, o))) => o,
            Some(Err(e)) => Outcome {
                instance: names.get(&e.id()).cloned().unwrap_or_default(),
                status: "cancelled",
                exit_code: None,
                duration_ms: 0,
                stdout_bytes: 0,
                stderr_bytes: 0,
                error: Some("interrupted (Ctrl-C) while running".to_owned()),
            },
        };
        if o.status != "success" {
            errors += 1;
        }
        progress.done(&o);
        outcomes.push(o);
    }
    for name in queue {
        let o = Outcome {
            instance: name,
            status: "not-started",
            exit_code: None,
            duration_ms: 0,
            stdout_bytes: 0,
            stderr_bytes: 0,
            error: Some(if interrupted {
                "not started: interrupted (Ctrl-C)".to_owned()
            } else {
                format!("not started: more than {max_errors} error(s)")
            }),
        };
        progress.done(&o);
        outcomes.push(o);
    }
    progress.finish();
    outcomes.sort_by(|a, b| a.instance.cmp(&b.instance));
    let count = |s: &str| outcomes.iter().filter(|o| o.status == s).count();
    let summary = serde_json::json!({
        "run_id": run_id, "command": command, "output_dir": dir.display().to_string(),
        "total": total, "success": count("success"), "failed": count("failed"), "error": count("error"),
        "timeout": count("timeout"), "offline": count("offline"), "not_allowed": count("not-allowed"),
        "not_started": count("not-started"), "cancelled": count("cancelled"), "interrupted": interrupted,
        "instances": outcomes,
    });
    std::fs::write(dir.join("summary.json"), serde_json::to_vec_pretty(&summary)?)
        .with_context(|| format!("writing {}", dir.join("summary.json").display()))?;
    let end = serde_json::json!({"run_id": run_id, "summary": {
        "total": total, "success": count("success"), "failed": count("failed"), "error": count("error"),
        "timeout": count("timeout"), "offline": count("offline"), "not_allowed": count("not-allowed"),
        "not_started": count("not-started"), "cancelled": count("cancelled"), "interrupted": interrupted}});
    if let Err(e) = client.gateway_command(&format!("run-end {end}")).await {
        eprintln!("postern: could not record the end of the run: {e:#}");
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        let rows: Vec<[String; 5]> = outcomes
            .iter()
            .map(|o| {
                [
                    o.instance.clone(),
                    o.status.to_owned(),
                    o.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                    format!("{:.1}s", o.duration_ms as f64 / 1000.0),
                    o.error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        table(&["INSTANCE", "STATUS", "EXIT", "TIME", "NOTE"], &rows);
        println!("\n{} of {total} succeeded; output in {}", count("success"), dir.display());
    }
    Ok(if interrupted {
        130
    } else if count("success") == total {
        0
    } else {
        1
    })
}

async fn invoke(
    opts: &ClientOptions,
    instance: &str,
    command: &str,
    dir: &std::path::Path,
    run_id: &str,
    timeout: Duration,
) -> Outcome {
    let started = Instant::now();
    let attempt = async {
        let client = Client::connect(opts, Some(instance)).await?;
        client.exec_capture(command, &[("POSTERN_RUN_ID", run_id)], KEEP_OUTPUT).await
    };
    let (status, exit_code, error, out) = match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(c)) => {
            let status = match c.exit_code {
                Some(0) => "success",
                Some(_) => "failed",
                None => "error",
            };
            let err = c.signal.as_ref().map(|s| format!("killed by signal {s}"));
            (status, c.exit_code, err, Some(c))
        }
        Ok(Err(e)) => ("error", None, Some(format!("{e:#}")), None),
        Err(_) => ("timeout", None, Some(format!("no result after {}s", timeout.as_secs())), None),
    };
    let safe: String =
        instance.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect();
    let (mut so, mut se) = (0, 0);
    if let Some(c) = &out {
        so = c.stdout.total;
        se = c.stderr.total;
        let _ = std::fs::write(dir.join(format!("{safe}.stdout")), &c.stdout.data);
        let _ = std::fs::write(dir.join(format!("{safe}.stderr")), &c.stderr.data);
    }
    Outcome {
        instance: instance.to_owned(),
        status,
        exit_code,
        duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        stdout_bytes: so,
        stderr_bytes: se,
        error,
    }
}

/// Progress on stderr: a redrawn line on a terminal, one line per finished instance otherwise.
struct Progress {
    total: usize,
    tty: bool,
    state: std::sync::Mutex<(usize, usize, usize)>, // done, failed, running
}

impl Progress {
    fn new(total: usize) -> Self {
        let tty = rustix::termios::isatty(std::io::stderr());
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
            if o.status != "success" {
                s.1 += 1;
            }
            if !["offline", "not-allowed", "not-started"].contains(&o.status) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_specs() {
        let f: ForwardSpec = "8080:80".parse().unwrap();
        assert_eq!(f, ForwardSpec { local: 8080, host: "localhost".into(), port: 80 });
        let f: ForwardSpec = "5432:db.internal:5432".parse().unwrap();
        assert_eq!((f.host.as_str(), f.port), ("db.internal", 5432));
        let f: ForwardSpec = "9000:[::1]:90".parse().unwrap();
        assert_eq!(f.host, "::1");
        for bad in ["8080", "x:80", "8080:", "8080:host:", "8080:host:0", "70000:80"] {
            assert!(bad.parse::<ForwardSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn amounts() {
        assert_eq!(amount("10%", 100).unwrap(), 10);
        assert_eq!(amount("10%", 3).unwrap(), 1);
        assert_eq!(amount("0%", 3).unwrap(), 0);
        assert_eq!(amount("100%", 7).unwrap(), 7);
        assert_eq!(amount("4", 2).unwrap(), 4);
        assert!(amount("150%", 2).is_err());
        assert!(amount("x", 2).is_err());
    }
}
