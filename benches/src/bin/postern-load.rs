//! Load driver: connects many simulated agents (real QUIC connections with mutual TLS, each
//! with its own certificate from the gateway's test-mode bulk enrollment) to one running
//! gateway, then reports the gateway's memory per agent and its CPU while they sit idle.
//!
//! `--transport tcp` connects them over the TCP transport instead (TLS and HTTP/2), each
//! from one of 250 loopback source addresses: the gateway bounds handshakes in flight per
//! source address.
//!
//! The gateway must run with `[testing] bulk_enroll = true`. See benches/load.sh.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use postern_gateway::admin::{AdminRequest, request};
use postern_proto::{Hello, Message, StreamKind, read_frame, write_frame};
use postern_tunnel::pki::{GATEWAY_SERVER_NAME, new_key_and_csr, pem_to_der, private_key_der};
use postern_tunnel::tls::{TransportTimers, agent_tunnel_config, agent_tunnel_tls};
use postern_tunnel::transport::{Connection, RecvStream, SendStream};
use serde_json::json;

#[derive(Parser)]
#[command(about = "Connect N simulated agents to a running gateway and measure it")]
struct Args {
    /// The gateway's data directory (for its admin socket).
    #[arg(long)]
    data_dir: PathBuf,
    /// The gateway's tunnel address.
    #[arg(long)]
    gateway: std::net::SocketAddr,
    /// The gateway's process id, for RSS and CPU readings.
    #[arg(long)]
    gateway_pid: u32,
    /// Number of simulated agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// The transport the simulated agents use: quic or tcp.
    #[arg(long, default_value = "quic", value_parser = ["quic", "tcp"])]
    transport: String,
    /// Client UDP sockets to spread the agents over (QUIC).
    #[arg(long, default_value_t = 8)]
    endpoints: usize,
    /// Seconds to stay connected and idle while measuring CPU.
    #[arg(long, default_value_t = 30)]
    idle_secs: u64,
    /// Cluster failover: after the idle period, kill the gateway (SIGKILL) and have every
    /// agent reconnect to this other gateway of the cluster, timing how long they take.
    /// Agents then use the failover timers of an agent that knows several gateways.
    #[arg(long)]
    failover: Option<std::net::SocketAddr>,
    /// The failover gateway's data directory (to count its online agents).
    #[arg(long, requires = "failover")]
    failover_data_dir: Option<PathBuf>,
    /// How many agents the failover gateway should list online once all have moved (its
    /// own plus these).
    #[arg(long, default_value_t = 0)]
    failover_expect_online: usize,
    /// Stay connected this many seconds after printing the report (while another driver
    /// measures something else), then exit.
    #[arg(long, default_value_t = 0)]
    linger_secs: u64,
}

fn proc_field(pid: u32, key: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text.lines().find(|l| l.starts_with(key)).with_context(|| format!("{key} not in /proc/{pid}/status"))?;
    Ok(line.split_whitespace().nth(1).context("malformed status line")?.parse()?)
}

/// (utime + stime) in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = text.rsplit_once(')').context("malformed stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).context("utime")?.parse()?;
    let stime: u64 = f.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

fn clock_ticks_per_sec() -> u64 {
    // Linux reports CPU times in USER_HZ, which is 100 on every mainstream architecture.
    100
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct Connected {
    conn: Connection,
    _send: SendStream,
    _recv: RecvStream,
}

/// How one simulated agent reaches the gateway.
#[derive(Clone)]
enum Dial {
    Quic(quinn::ClientConfig, quinn::Endpoint),
    /// The TLS configuration and the loopback source address to connect from.
    Tcp(Arc<rustls::ClientConfig>, std::net::Ipv4Addr),
}

async fn connect_one(dial: &Dial, addr: std::net::SocketAddr, timers: TransportTimers) -> anyhow::Result<Connected> {
    let conn = match dial {
        Dial::Quic(cfg, endpoint) => {
            Connection::Quic(endpoint.connect_with(cfg.clone(), addr, GATEWAY_SERVER_NAME)?.await?)
        }
        Dial::Tcp(tls, source) => {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind((*source, 0).into())?;
            let stream = tokio::time::timeout(Duration::from_secs(30), socket.connect(addr)).await??;
            postern_tunnel::transport::tcp::tune_socket(&stream, timers);
            let setup =
                postern_tunnel::transport::tcp::connect(stream, addr, tls.clone(), GATEWAY_SERVER_NAME, timers, 256);
            Connection::Tcp(tokio::time::timeout(Duration::from_secs(30), setup).await??)
        }
    };
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(
        &mut send,
        &Message::Hello(Hello { agent_version: "sim".into(), hostname: "sim".into(), platform: "sim".into() }),
    )
    .await?;
    match tokio::time::timeout(Duration::from_secs(30), read_frame(&mut recv, StreamKind::Control)).await?? {
        Some(Message::HelloAck(_)) => Ok(Connected { conn, _send: send, _recv: recv }),
        other => bail!("unexpected reply {other:?}"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let socket = args.data_dir.join("admin.sock");
    // Baseline before anything else, so memory the gateway keeps after building the bulk
    // enrollment reply counts against the agents, not for them.
    let rss_baseline = proc_field(args.gateway_pid, "VmRSS:")?;
    let (key, csr) = new_key_and_csr()?;
    let prefix = format!("{:x}-", std::process::id());
    eprintln!("bulk-enrolling {} simulated agents...", args.agents);
    let (reply, _) =
        request(&socket, &AdminRequest::BulkEnroll { count: args.agents, csr_hex: hex(&csr), prefix }).await?;
    let result = reply.get("result").context("no result")?;
    let ca = pem_to_der(result.get("ca_pem").and_then(|v| v.as_str()).context("ca_pem")?)?;
    let certs: Vec<_> = result
        .get("agents")
        .and_then(|v| v.as_array())
        .context("agents")?
        .iter()
        .map(|a| pem_to_der(a.get("cert_pem").and_then(|v| v.as_str()).unwrap_or_default()))
        .collect::<Result<_, _>>()?;

    let rss_before = proc_field(args.gateway_pid, "VmRSS:")?;
    let endpoints: Vec<quinn::Endpoint> = (0..args.endpoints.max(1))
        .map(|_| quinn::Endpoint::client(std::net::SocketAddr::from(([127, 0, 0, 1], 0))))
        .collect::<Result<_, _>>()?;
    let sem = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let timers =
        if args.failover.is_some() { TransportTimers::default().for_failover() } else { TransportTimers::default() };
    let mut configs = Vec::with_capacity(certs.len());
    for (i, cert) in certs.into_iter().enumerate() {
        let dial = if args.transport == "tcp" {
            let tls = agent_tunnel_tls(&ca, cert, private_key_der(&key))?;
            Dial::Tcp(Arc::new(tls), std::net::Ipv4Addr::new(127, 0, 1, 1 + (i % 250) as u8))
        } else {
            let cfg = agent_tunnel_config(&ca, cert, private_key_der(&key), timers, 256)?;
            Dial::Quic(cfg, endpoints.get(i % endpoints.len()).context("endpoint")?.clone())
        };
        configs.push(dial.clone());
        let sem = sem.clone();
        let addr = args.gateway;
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let mut last = None;
            for _ in 0..3 {
                match connect_one(&dial, addr, timers).await {
                    Ok(c) => return Ok((i, c)),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt")))
        });
    }
    let mut connected = Vec::with_capacity(args.agents);
    let mut failed = 0usize;
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok((i, c))) => {
                connected.push((i, c));
                if connected.len() % 1000 == 0 {
                    eprintln!("  {} connected ({:.1} s)", connected.len(), start.elapsed().as_secs_f64());
                }
            }
            Ok(Err(e)) => {
                failed += 1;
                if failed <= 3 {
                    eprintln!("  connection failed: {e:#}");
                }
            }
            Err(e) => bail!("task failed: {e}"),
        }
    }
    let connect_secs = start.elapsed().as_secs_f64();
    eprintln!("{} connected, {} failed, in {:.1} s; settling...", connected.len(), failed, connect_secs);

    // Wait until the gateway lists them online.
    let deadline = Instant::now() + Duration::from_secs(60);
    let online = loop {
        let (reply, _) = request(&socket, &AdminRequest::Instances).await?;
        let online = reply
            .get("result")
            .and_then(|r| r.as_array())
            .map(|a| a.iter().filter(|i| i.get("online") == Some(&json!(true))).count())
            .unwrap_or(0);
        if online >= connected.len() || Instant::now() > deadline {
            break online;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let rss_connected = proc_field(args.gateway_pid, "VmRSS:")?;
    let cpu0 = cpu_ticks(args.gateway_pid)?;
    eprintln!("idle for {} s...", args.idle_secs);
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let cpu1 = cpu_ticks(args.gateway_pid)?;
    let rss_idle = proc_field(args.gateway_pid, "VmRSS:")?;
    let idle_cpu_pct =
        (cpu1.saturating_sub(cpu0)) as f64 / clock_ticks_per_sec() as f64 / args.idle_secs as f64 * 100.0;
    let per_agent_kib = (rss_idle.saturating_sub(rss_baseline)) as f64 / connected.len().max(1) as f64;
    let driver_rss = proc_field(std::process::id(), "VmRSS:")?;
    let failover = match (args.failover, &args.failover_data_dir) {
        (Some(to), Some(dir)) => {
            Some(fail_over(args.gateway_pid, to, dir, args.failover_expect_online, &connected, &configs, timers).await?)
        }
        _ => None,
    };
    let report = json!({
        "failover": failover,
        "transport": args.transport,
        "agents_requested": args.agents,
        "agents_connected": connected.len(),
        "agents_failed": failed,
        "gateway_online": online,
        "connect_seconds": (connect_secs * 10.0).round() / 10.0,
        "handshakes_per_second": (connected.len() as f64 / connect_secs).round(),
        "gateway_rss_kib_baseline": rss_baseline,
        "gateway_rss_kib_after_enroll": rss_before,
        "gateway_rss_kib_connected": rss_connected,
        "gateway_rss_kib_after_idle": rss_idle,
        "gateway_rss_kib_per_agent": (per_agent_kib * 10.0).round() / 10.0,
        "gateway_idle_cpu_percent": (idle_cpu_pct * 100.0).round() / 100.0,
        "idle_seconds": args.idle_secs,
        "driver_rss_kib": driver_rss,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    tokio::time::sleep(Duration::from_secs(args.linger_secs)).await;
    drop(connected);
    for e in &endpoints {
        e.close(0u32.into(), b"done");
    }
    Ok(())
}

/// Kill the gateway the agents are connected to, reconnect each to `to` as soon as it sees
/// its connection lost, and time it: until every agent is connected again, and until the
/// gateway at `to` (admin socket in `dir`) lists `expect` agents online.
async fn fail_over(
    pid: u32,
    to: std::net::SocketAddr,
    dir: &std::path::Path,
    expect: usize,
    connected: &[(usize, Connected)],
    configs: &[Dial],
    timers: TransportTimers,
) -> anyhow::Result<serde_json::Value> {
    let kill = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status()?;
    anyhow::ensure!(kill.success(), "cannot kill the gateway {pid}");
    let killed = Instant::now();
    eprintln!("killed the gateway; {} agents fail over to {to}...", connected.len());
    let sem = Arc::new(tokio::sync::Semaphore::new(256));
    let mut set = tokio::task::JoinSet::new();
    for (i, c) in connected {
        let conn = c.conn.clone();
        let dial = configs.get(*i).context("config")?.clone();
        let sem = sem.clone();
        set.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(60), conn.closed()).await;
            let noticed = killed.elapsed();
            let _permit = sem.acquire_owned().await;
            for attempt in 0..20u32 {
                match connect_one(&dial, to, timers).await {
                    // Kept (the failover gateway counts it online) until the end.
                    Ok(c) => return Ok((noticed, killed.elapsed(), c)),
                    Err(e) if attempt == 19 => return Err(e),
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
            bail!("no attempt")
        });
    }
    let (mut noticed, mut moved, mut failed, mut held) = (Vec::new(), Vec::new(), 0usize, Vec::new());
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok((n, m, c))) => {
                noticed.push(n.as_secs_f64());
                moved.push(m.as_secs_f64());
                held.push(c);
            }
            _ => failed += 1,
        }
    }
    let all_moved = killed.elapsed().as_secs_f64();
    noticed.sort_by(f64::total_cmp);
    moved.sort_by(f64::total_cmp);
    let pct = |v: &[f64], p: f64| v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1))).copied();
    let socket = dir.join("admin.sock");
    let deadline = Instant::now() + Duration::from_secs(120);
    let listed = loop {
        let (reply, _) = request(&socket, &AdminRequest::Instances).await?;
        let online = reply
            .get("result")
            .and_then(|r| r.as_array())
            .map(|a| a.iter().filter(|i| i.get("online") == Some(&json!(true))).count())
            .unwrap_or(0);
        if online >= expect || Instant::now() > deadline {
            break (online, killed.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    drop(held);
    Ok(json!({
        "agents_moved": moved.len(),
        "agents_failed_to_move": failed,
        "noticed_p50_seconds": pct(&noticed, 0.5),
        "noticed_max_seconds": noticed.last(),
        "reconnected_p50_seconds": pct(&moved, 0.5),
        "reconnected_p99_seconds": pct(&moved, 0.99),
        "all_reconnected_seconds": (all_moved * 10.0).round() / 10.0,
        "failover_gateway_online": listed.0,
        "failover_gateway_lists_all_seconds": (listed.1 * 10.0).round() / 10.0,
    }))
}
