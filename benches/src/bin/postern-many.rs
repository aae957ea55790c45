//! Load driver for "many sessions at once" (benches/many-sessions.sh): holds N interactive
//! shells through one gateway's SSH door, each on a PTY typing one keystroke a second and
//! timing its echo (keystroke sent -> echoed byte received), and, once they all type, runs M
//! bulk transfers at the same time (`direct-tcpip` forwards, as `ssh -L`, into a TCP sink in
//! this process). Reads the CPU time and RSS of the processes named by `--watch` (the gateway,
//! the agents) in each phase.
//!
//! One russh connection per shell and per transfer, as separate `ssh` clients would make,
//! spread over several loopback source addresses (127.0.0.10 and up). Each shell runs
//! `stty raw -echo; exec cat` so the one byte that comes back is the echo of the one typed.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use russh::ChannelMsg;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

#[derive(Parser)]
#[command(about = "Many interactive shells and bulk transfers through one gateway at once")]
struct Args {
    /// The gateway's SSH door.
    #[arg(long)]
    gateway: SocketAddr,
    /// Private key of the Postern user.
    #[arg(long)]
    key: PathBuf,
    /// The Postern user (logins are `USER%INSTANCE`).
    #[arg(long)]
    user: String,
    /// Instances to spread the sessions over (round robin).
    #[arg(long, value_delimiter = ',', required = true)]
    instances: Vec<String>,
    /// Interactive shells held open, each typing once a second.
    #[arg(long, default_value_t = 1000)]
    shells: usize,
    /// Bulk transfers run at once while the shells type.
    #[arg(long, default_value_t = 100)]
    transfers: usize,
    /// MiB each transfer moves.
    #[arg(long, default_value_t = 64)]
    transfer_mib: u64,
    /// Seconds the shells type before the transfers start (the steady state measured).
    #[arg(long, default_value_t = 30)]
    steady_secs: u64,
    /// Seconds a keystroke may wait for its echo before it counts as timed out.
    #[arg(long, default_value_t = 10)]
    echo_timeout_secs: u64,
    /// Connections being set up at once.
    #[arg(long, default_value_t = 8)]
    connect_parallel: usize,
    /// Loopback source addresses to spread connections over (127.0.0.10 and up).
    #[arg(long, default_value_t = 32)]
    sources: u8,
    /// Processes to read CPU and RSS of, as NAME=PID (repeatable).
    #[arg(long)]
    watch: Vec<String>,
}

struct AcceptAny;

impl russh::client::Handler for AcceptAny {
    type Error = russh::Error;

    // Loopback benchmark against a gateway this script just started: no host key to check.
    async fn check_server_key(&mut self, _key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// Failures by kind, counted.
#[derive(Default)]
struct Failures(Mutex<BTreeMap<String, u64>>);

impl Failures {
    fn add(&self, what: &str, e: &anyhow::Error) {
        let text: String = format!("{what}: {e:#}").chars().take(200).collect();
        if let Ok(mut m) = self.0.lock() {
            *m.entry(text).or_default() += 1;
        }
    }
    fn report(&self) {
        if let Ok(m) = self.0.lock() {
            for (k, n) in m.iter() {
                println!("  failure x{n}: {k}");
            }
        }
    }
}

struct Shared {
    args: Args,
    key: Arc<PrivateKey>,
    config: Arc<russh::client::Config>,
    connects: Semaphore,
    failures: Failures,
    /// Keystrokes may start (all shells are up, or set-up gave up on the rest).
    typing: tokio::sync::watch::Receiver<bool>,
    /// Which phase a keystroke belongs to: 0 shells only, 1 with transfers, 2 stop.
    phase: AtomicU64,
    /// Echo latencies in microseconds, by phase.
    echoes: [Mutex<Vec<u32>>; 2],
    timeouts: [AtomicU64; 2],
    shells_up: AtomicU64,
    shells_lost: AtomicU64,
    stop: AtomicBool,
}

async fn connect(sh: &Shared, n: usize, instance: &str) -> anyhow::Result<russh::client::Handle<AcceptAny>> {
    let _permit = sh.connects.acquire().await?;
    let source = Ipv4Addr::new(127, 0, 0, 10u8.saturating_add(u8::try_from(n % usize::from(sh.args.sources.max(1)))?));
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    let tcp = socket.connect(sh.args.gateway).await.context("tcp connect")?;
    tcp.set_nodelay(true)?;
    let mut handle =
        tokio::time::timeout(Duration::from_secs(30), russh::client::connect_stream(sh.config.clone(), tcp, AcceptAny))
            .await
            .context("ssh handshake timed out")?
            .context("ssh handshake")?;
    let login = format!("{}%{instance}", sh.args.user);
    let ok = tokio::time::timeout(
        Duration::from_secs(30),
        handle.authenticate_publickey(login, PrivateKeyWithHashAlg::new(sh.key.clone(), None)),
    )
    .await
    .context("authentication timed out")??
    .success();
    if !ok {
        bail!("authentication refused");
    }
    Ok(handle)
}

/// Wait for any channel data.
async fn wait_output(ch: &mut russh::Channel<russh::client::Msg>, within: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ch.wait()).await {
            Err(_) => bail!("no output"),
            Ok(None) | Ok(Some(ChannelMsg::Close)) | Ok(Some(ChannelMsg::Eof)) => bail!("channel closed"),
            Ok(Some(ChannelMsg::Data { .. })) => return Ok(()),
            Ok(Some(ChannelMsg::ExtendedData { data, .. })) => {
                bail!("refused: {}", String::from_utf8_lossy(&data).trim())
            }
            Ok(Some(_)) => {}
        }
    }
}

/// Wait for channel data containing `needle`, up to `deadline`.
async fn read_until(
    ch: &mut russh::Channel<russh::client::Msg>,
    needle: &[u8],
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    let mut seen: Vec<u8> = Vec::new();
    let mut total = 0usize;
    loop {
        match tokio::time::timeout_at(deadline, ch.wait()).await {
            Err(_) => bail!(
                "timed out waiting for {:?} ({} bytes came{})",
                String::from_utf8_lossy(needle),
                total,
                if total > 0 { ", ending with output" } else { "" }
            ),
            Ok(None) | Ok(Some(ChannelMsg::Close)) | Ok(Some(ChannelMsg::Eof)) => bail!("channel closed"),
            Ok(Some(ChannelMsg::Data { data })) => {
                total += data.len();
                seen.extend_from_slice(&data);
                if seen.windows(needle.len()).any(|w| w == needle) {
                    return Ok(());
                }
                // Keep the tail only: the needle may straddle two packets.
                if seen.len() > 4096 {
                    seen.drain(..seen.len() - 64);
                }
            }
            Ok(Some(_)) => {}
        }
    }
}

async fn shell(sh: Arc<Shared>, n: usize) -> anyhow::Result<()> {
    let instance = sh.args.instances.get(n % sh.args.instances.len()).context("no instance")?.clone();
    let handle = connect(&sh, n, &instance).await?;
    let mut ch = handle.channel_open_session().await.context("opening the session channel")?;
    ch.request_pty(true, "xterm", 80, 24, 0, 0, &[]).await.context("pty request")?;
    ch.request_shell(true).await.context("shell request")?;
    // As a person does: wait for the prompt before typing (a shell that starts after the
    // line arrived may discard it as type-ahead, once it has been echoed).
    wait_output(&mut ch, Duration::from_secs(60)).await.context("waiting for the prompt")?;
    ch.data(&b"stty raw -echo; echo READY; exec cat\r"[..]).await.context("typing the set-up line")?;
    read_until(&mut ch, b"READY\n", Duration::from_secs(60)).await.context("shell set-up")?;
    sh.shells_up.fetch_add(1, Ordering::Relaxed);
    let mut typing = sh.typing.clone();
    typing.wait_for(|t| *t).await?;
    // Spread the keystrokes over the second so that they do not all arrive together.
    let offset = Duration::from_micros(1_000_000 * n as u64 / sh.args.shells.max(1) as u64);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut k = 0u8;
    while !sh.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let phase = sh.phase.load(Ordering::Relaxed);
        if phase > 1 {
            break;
        }
        let c = b'a' + k % 26;
        k = k.wrapping_add(1);
        let sent = Instant::now();
        ch.data(&[c][..]).await.context("typing")?;
        let idx = usize::try_from(phase)?;
        match read_until(&mut ch, &[c], Duration::from_secs(sh.args.echo_timeout_secs)).await {
            Ok(()) => {
                let us = u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX);
                if let Some(Ok(mut v)) = sh.echoes.get(idx).map(|m| m.lock()) {
                    v.push(us);
                }
            }
            Err(e) => {
                if let Some(t) = sh.timeouts.get(idx) {
                    t.fetch_add(1, Ordering::Relaxed);
                }
                if e.to_string().contains("closed") {
                    return Err(e.context("shell ended while typing"));
                }
            }
        }
    }
    let _ = ch.eof().await;
    let _ = handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
    Ok(())
}

/// One bulk transfer: a `direct-tcpip` channel to the sink, `bytes` written, then EOF and
/// the sink's one-byte receipt. Returns (start, end).
async fn transfer(sh: Arc<Shared>, n: usize, sink: u16, bytes: u64) -> anyhow::Result<(Instant, Instant)> {
    let instance = sh.args.instances.get(n % sh.args.instances.len()).context("no instance")?.clone();
    let handle = connect(&sh, n + sh.args.shells, &instance).await?;
    let start = Instant::now();
    let ch =
        handle.channel_open_direct_tcpip("127.0.0.1", u32::from(sink), "127.0.0.1", 0).await.context("forward open")?;
    let mut stream = ch.into_stream();
    let chunk = vec![0u8; 256 << 10];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(chunk.len() as u64))?;
        stream.write_all(chunk.get(..n).context("chunk")?).await.context("sending")?;
        left -= n as u64;
    }
    stream.flush().await?;
    stream.shutdown().await.context("eof")?;
    let mut receipt = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(120), stream.read_exact(&mut receipt))
        .await
        .context("no receipt from the sink")??;
    if receipt != *b"k" {
        bail!("unexpected receipt");
    }
    let end = Instant::now();
    let _ = handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
    Ok((start, end))
}

/// TCP sink: reads to EOF, counts, answers `k`.
async fn sink(listener: tokio::net::TcpListener, received: Arc<AtomicU64>) {
    while let Ok((mut c, _)) = listener.accept().await {
        let received = received.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 256 << 10];
            loop {
                match c.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
            let _ = c.write_all(b"k").await;
        });
    }
}

struct Watched {
    name: String,
    pid: u32,
}

fn rss_mib(pid: u32) -> f64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return 0.0 };
    text.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// utime + stime in seconds (USER_HZ is 100 on Linux).
fn cpu_secs(pid: u32) -> f64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let Some((_, rest)) = text.rsplit_once(')') else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (t(11) + t(12)) as f64 / 100.0
}

/// CPU and peak RSS of the watched processes over one phase, sampled every 250 ms.
struct Meter {
    procs: Vec<Watched>,
    cpu0: Vec<f64>,
    t0: Instant,
    peak: Arc<Mutex<Vec<f64>>>,
    sampler: tokio::task::JoinHandle<()>,
}

impl Meter {
    fn start(procs: &[Watched]) -> Meter {
        let procs: Vec<Watched> = procs.iter().map(|w| Watched { name: w.name.clone(), pid: w.pid }).collect();
        let pids: Vec<u32> = procs.iter().map(|w| w.pid).collect();
        let peak = Arc::new(Mutex::new(pids.iter().map(|&p| rss_mib(p)).collect::<Vec<f64>>()));
        let p = peak.clone();
        let sampler = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if let Ok(mut peak) = p.lock() {
                    for (slot, &pid) in peak.iter_mut().zip(&pids) {
                        *slot = slot.max(rss_mib(pid));
                    }
                }
            }
        });
        Meter { cpu0: procs.iter().map(|w| cpu_secs(w.pid)).collect(), t0: Instant::now(), procs, peak, sampler }
    }

    fn report(self) {
        self.sampler.abort();
        let dt = self.t0.elapsed().as_secs_f64();
        let peak = self.peak.lock().map(|p| p.clone()).unwrap_or_default();
        for ((w, c0), pk) in self.procs.iter().zip(&self.cpu0).zip(peak) {
            let cpu = (cpu_secs(w.pid) - c0) / dt * 100.0;
            println!("  {:<10} CPU {:>5.0}%  RSS now {:>6.0} MiB, peak {:>6.0} MiB", w.name, cpu, rss_mib(w.pid), pk);
        }
    }
}

fn latency_line(v: &mut [u32], timeouts: u64) -> String {
    v.sort_unstable();
    let q = |p: f64| {
        let i = ((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1));
        v.get(i).map_or(f64::NAN, |&us| f64::from(us) / 1000.0)
    };
    format!(
        "{} keystrokes, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, {} without echo within the timeout",
        v.len(),
        q(0.5),
        q(0.99),
        v.last().map_or(f64::NAN, |&us| f64::from(us) / 1000.0),
        timeouts
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let key = Arc::new(russh::keys::load_secret_key(&args.key, None).context("loading the key")?);
    let mut watched = vec![Watched { name: "driver".into(), pid: std::process::id() }];
    for w in &args.watch {
        let (name, pid) = w.split_once('=').context("--watch NAME=PID")?;
        watched.push(Watched { name: name.into(), pid: pid.parse()? });
    }
    let config =
        Arc::new(russh::client::Config { inactivity_timeout: None, keepalive_interval: None, ..Default::default() });
    let (typing_tx, typing) = tokio::sync::watch::channel(false);
    let sh = Arc::new(Shared {
        connects: Semaphore::new(args.connect_parallel.max(1)),
        args,
        key,
        config,
        failures: Failures::default(),
        typing,
        phase: AtomicU64::new(0),
        echoes: [Mutex::new(Vec::new()), Mutex::new(Vec::new())],
        timeouts: [AtomicU64::new(0), AtomicU64::new(0)],
        shells_up: AtomicU64::new(0),
        shells_lost: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let a = &sh.args;
    println!(
        "{} shells and {} transfers of {} MiB through {} ({} instance(s))",
        a.shells,
        a.transfers,
        a.transfer_mib,
        a.gateway,
        a.instances.len()
    );

    // Set-up: every shell connects, authenticates, gets its PTY and shell, and is ready.
    let meter = Meter::start(&watched);
    let t = Instant::now();
    let mut shells = tokio::task::JoinSet::new();
    for n in 0..a.shells {
        let sh = sh.clone();
        shells.spawn(async move {
            if let Err(e) = shell(sh.clone(), n).await {
                sh.shells_lost.fetch_add(1, Ordering::Relaxed);
                sh.failures.add("shell", &e);
            }
        });
    }
    let target = a.shells as u64;
    while sh.shells_up.load(Ordering::Relaxed) + sh.shells_lost.load(Ordering::Relaxed) < target {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "## set-up: {} of {} shells up in {:.1} s ({} failed)",
        sh.shells_up.load(Ordering::Relaxed),
        a.shells,
        t.elapsed().as_secs_f64(),
        sh.shells_lost.load(Ordering::Relaxed)
    );
    meter.report();

    // Steady state: the shells type.
    let _ = typing_tx.send(true);
    let meter = Meter::start(&watched);
    tokio::time::sleep(Duration::from_secs(a.steady_secs)).await;
    let steady: Vec<u32> = sh.echoes.first().and_then(|m| m.lock().ok()).map(|v| v.clone()).unwrap_or_default();
    let mut steady = steady;
    println!("## {} shells typing, {} s", sh.shells_up.load(Ordering::Relaxed), a.steady_secs);
    println!("  echo: {}", latency_line(&mut steady, sh.timeouts.first().map_or(0, |t| t.load(Ordering::Relaxed))));
    meter.report();

    // Transfers while the shells go on typing.
    sh.phase.store(1, Ordering::Relaxed);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let sink_port = listener.local_addr()?.port();
    let received = Arc::new(AtomicU64::new(0));
    let sink_task = tokio::spawn(sink(listener, received.clone()));
    let bytes = a.transfer_mib << 20;
    let meter = Meter::start(&watched);
    let t = Instant::now();
    let mut transfers = tokio::task::JoinSet::new();
    for n in 0..a.transfers {
        let sh = sh.clone();
        transfers.spawn(async move {
            match transfer(sh.clone(), n, sink_port, bytes).await {
                Ok(span) => Some(span),
                Err(e) => {
                    sh.failures.add("transfer", &e);
                    None
                }
            }
        });
    }
    let (mut ok, mut first, mut last) = (0u64, None::<Instant>, None::<Instant>);
    while let Some(r) = transfers.join_next().await {
        if let Ok(Some((s, e))) = r {
            ok += 1;
            first = Some(first.map_or(s, |f| f.min(s)));
            last = Some(last.map_or(e, |l| l.max(e)));
        }
    }
    let wall = t.elapsed().as_secs_f64();
    sh.phase.store(2, Ordering::Relaxed);
    let moved = received.load(Ordering::Relaxed);
    let span = match (first, last) {
        (Some(f), Some(l)) => l.duration_since(f).as_secs_f64(),
        _ => wall,
    };
    println!(
        "## {} shells typing + {} transfers of {} MiB ({} completed, {} failed) in {:.1} s",
        sh.shells_up.load(Ordering::Relaxed),
        a.transfers,
        a.transfer_mib,
        ok,
        a.transfers as u64 - ok,
        wall
    );
    println!(
        "  aggregate throughput: {:.0} MB/s ({:.0} MiB/s; {} MiB arrived at the sink)",
        moved as f64 / span / 1e6,
        moved as f64 / span / f64::from(1 << 20),
        moved >> 20
    );
    let mut during: Vec<u32> = sh.echoes.get(1).and_then(|m| m.lock().ok()).map(|v| v.clone()).unwrap_or_default();
    println!("  echo: {}", latency_line(&mut during, sh.timeouts.get(1).map_or(0, |t| t.load(Ordering::Relaxed))));
    meter.report();

    sh.stop.store(true, Ordering::Relaxed);
    sink_task.abort();
    let end =
        tokio::time::timeout(Duration::from_secs(20), async { while shells.join_next().await.is_some() {} }).await;
    if end.is_err() {
        println!("  (some shells did not end within 20 s)");
    }
    println!("## shells lost along the way: {}; failures:", sh.shells_lost.load(Ordering::Relaxed));
    sh.failures.report();
    Ok(())
}
