//! `postern-agent`: runs on each server, dials out to the gateway, serves sessions.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use postern_tunnel::agent::{self, Backoff, JoinOptions, RunOptions};
use postern_tunnel::dial::{Route, TransportChoice};
use postern_tunnel::services::LocalLimits;
use postern_tunnel::tls::TransportTimers;
use postern_tunnel::transport::proxy::Proxy;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "postern-agent",
    version,
    about = "Postern agent: dials out to a Postern gateway over QUIC (or TCP) and serves sessions on this host",
    long_about = "Postern agent: dials out to a Postern gateway and serves sessions on this host.\n\n\
The agent opens no inbound port. It enrolls once with a single-use token, keeps its private key \
in the state directory, and renews its certificate on its own. It reaches the gateway over QUIC \
(UDP), and over TLS on TCP (the same port number) where UDP does not get through, directly or \
through an HTTP proxy (HTTPS_PROXY or --proxy).",
    after_help = "Examples:\n  postern-agent join --gateway gw.example.com:4433 --token pt_... --ca-pin sha256:...\n  postern-agent run\n  postern-agent status"
)]
struct Cli {
    /// Directory holding the agent's key, certificates and state.
    #[arg(long, global = true, env = "POSTERN_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Log filter (error, warn, info, debug, trace or a tracing directive).
    #[arg(long, global = true, env = "POSTERN_LOG", default_value = "info")]
    log: String,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll with a gateway using a single-use token (only a CSR leaves this host).
    #[command(
        after_help = "Examples:\n  postern-agent join --gateway gw.example.com:4433 --token pt_... --ca-pin sha256:... --run\n  postern-agent join --gateway gw-a.example.com --gateway gw-b.example.com --token pt_... --ca-pin sha256:...\n  (the token can come from POSTERN_JOIN_TOKEN instead, out of the process list)"
    )]
    Join {
        /// Gateway tunnel address, HOST or HOST:PORT (UDP and TCP; port 4433 by default). Repeat it
        /// for the gateways of a cluster (a name with several DNS addresses counts as all of
        /// them): the agent enrolls at the first that answers and fails over between them.
        #[arg(long, required = true)]
        gateway: Vec<String>,
        /// Enrollment token from `postern token create`.
        #[arg(long, env = "POSTERN_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// SHA-256 pin of the gateway CA, as printed by `postern token create`.
        #[arg(long)]
        ca_pin: String,
        /// Start serving right after a successful join.
        #[arg(long)]
        run: bool,
        /// Local limits file (see `run --config`).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Replace the identity already in the state directory (the old one stops working
        /// here; revoke it on the gateway with `postern instances revoke`).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        net: NetFlags,
    },
    /// Keep the connection to the gateway up and serve sessions until stopped.
    #[command(
        after_help = "Examples:\n  postern-agent run\n  postern-agent run --config /etc/postern-agent/agent.toml\n  postern-agent run --transport tcp --proxy http://proxy.example:3128\n  postern-agent --state-dir /srv/agent run --gateway gw2.example.com:4433 --gateway gw3.example.com"
    )]
    Run {
        /// Local limits file (TOML): `[limits] tcp_allow = ["127.0.0.0/8"]`, `run_as = [...]`, ...
        #[arg(long, env = "POSTERN_AGENT_CONFIG")]
        config: Option<PathBuf>,
        /// Override the gateway addresses recorded at join time (HOST or HOST:PORT, port 4433
        /// by default; repeatable).
        #[arg(long)]
        gateway: Vec<String>,
        #[command(flatten)]
        net: NetFlags,
    },
    /// Check this agent's installation and print what to fix: joined, state directory and
    /// key permissions, certificate expiry, free disk space, the gateway reachable over QUIC
    /// (UDP) and over TCP (through the proxy, if any), and the clock against the gateway's.
    /// Each check is bounded in time. Exit status 0 when no check fails (warnings do not
    /// fail), 1 when one does.
    #[command(
        after_help = "Examples:\n  postern-agent doctor\n  postern-agent doctor --json | jq '.checks[] | select(.status != \"ok\")'\n  postern-agent --state-dir /srv/agent doctor --config /etc/postern-agent/agent.toml\n\nEvery check, what it means and how to fix it: docs/operations.md, \"Doctor\"."
    )]
    Doctor {
        /// The configuration file `run` uses ([agent] transport, proxy, tcp_port).
        #[arg(long, env = "POSTERN_AGENT_CONFIG")]
        config: Option<PathBuf>,
        /// Check these gateway addresses instead of those recorded at join time (repeatable).
        #[arg(long)]
        gateway: Vec<String>,
        #[command(flatten)]
        net: NetFlags,
        /// Print JSON: {"status": "ok"|"warn"|"fail", "checks": [{"name", "status", "detail", "fix"}]}.
        #[arg(long)]
        json: bool,
    },
    /// Show this agent's identity and certificate.
    #[command(after_help = "Examples:\n  postern-agent status\n  postern-agent --state-dir /srv/agent status")]
    Status,
}

/// How to reach the gateway; flags win over the configuration file's `[agent]`.
#[derive(clap::Args, Debug, Default)]
struct NetFlags {
    /// auto (QUIC, else TLS over TCP), quic or tcp. Default: `[agent] transport`, else auto.
    #[arg(long, value_parser = clap::builder::ValueParser::new(|s: &str| s.parse::<TransportChoice>()))]
    transport: Option<TransportChoice>,
    /// HTTP proxy for the TCP transport, http://[user:password@]host[:port], or "none".
    /// Default: `[agent] proxy`, else HTTPS_PROXY / ALL_PROXY from the environment.
    #[arg(long)]
    proxy: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct AgentConfigFile {
    agent: NetSection,
    limits: LocalLimits,
}

/// `[agent]` in the agent's configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct NetSection {
    transport: Option<TransportChoice>,
    proxy: Option<String>,
    /// While on TCP: seconds between tries of QUIC (default 60).
    quic_retry_secs: Option<u64>,
    /// The gateway's TCP port, when not the same as its QUIC port.
    tcp_port: Option<u16>,
}

fn load_file(path: Option<&Path>) -> anyhow::Result<AgentConfigFile> {
    let Some(path) = path else { return Ok(AgentConfigFile::default()) };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The route from flags, then the file, then the environment.
fn route(flags: &NetFlags, file: &NetSection) -> anyhow::Result<Route> {
    let choice = flags.transport.or(file.transport).unwrap_or_default();
    let proxy = match flags.proxy.as_deref().or(file.proxy.as_deref()) {
        Some(p) if p.trim().is_empty() || p.trim() == "none" => None,
        Some(p) => Some(Proxy::parse(p).map_err(|e| anyhow::anyhow!(e))?),
        None => Proxy::from_env().map_err(|e| anyhow::anyhow!(e))?,
    };
    if proxy.is_some() && choice == TransportChoice::Quic {
        anyhow::bail!("a proxy carries only the TCP transport; use --transport auto or tcp with it");
    }
    let quic_retry = match file.quic_retry_secs {
        Some(0) => anyhow::bail!("[agent] quic_retry_secs must be at least 1"),
        Some(s) => std::time::Duration::from_secs(s),
        None => postern_tunnel::dial::DEFAULT_QUIC_RETRY,
    };
    if file.tcp_port == Some(0) {
        anyhow::bail!("[agent] tcp_port must be a port number (1-65535)");
    }
    Ok(Route { choice, proxy, quic_retry, tcp_port: file.tcp_port })
}

fn default_state_dir() -> PathBuf {
    if nix::unistd::Uid::effective().is_root() {
        PathBuf::from("/var/lib/postern-agent")
    } else if let Some(dir) = std::env::var_os("XDG_STATE_HOME") {
        PathBuf::from(dir).join("postern-agent")
    } else if let Some(home) = std::env::var_os("HOME") {
        PathBuf::from(home).join(".local/state/postern-agent")
    } else {
        PathBuf::from("postern-agent-state")
    }
}

fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    // Registered here, before anything else starts: a SIGTERM that arrives while the agent
    // is connecting is a clean shutdown, not the default action.
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    tokio::spawn(async move {
        let Ok(mut term) = term else { return };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}

async fn run_agent(
    state_dir: PathBuf,
    config: Option<PathBuf>,
    gateways: Vec<String>,
    net: &NetFlags,
) -> anyhow::Result<()> {
    let file = load_file(config.as_deref())?;
    let opts = RunOptions {
        state_dir,
        gateways,
        route: route(net, &file.agent)?,
        limits: file.limits,
        backoff: Backoff::default(),
        timers: TransportTimers::default(),
    };
    agent::run(opts, shutdown_on_signal()).await
}

/// `2026-12-01 10:00:00 UTC (in 6d 23h)`: a date a person reads, and how far from now.
fn readable(t: std::time::SystemTime, now: std::time::SystemTime) -> String {
    let date = time::OffsetDateTime::from(t);
    let fmt = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    let text = date.format(&fmt).unwrap_or_else(|_| "?".to_owned());
    let (secs, future) = match t.duration_since(now) {
        Ok(d) => (d.as_secs(), true),
        Err(e) => (e.duration().as_secs(), false),
    };
    let span = match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h {}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d {}h", secs / 86400, secs % 86400 / 3600),
    };
    if future { format!("{text} (in {span})") } else { format!("{text} ({span} ago)") }
}

/// `postern-agent doctor`: the report, printed; its exit status.
async fn doctor(
    state_dir: PathBuf,
    config: Option<PathBuf>,
    gateways: Vec<String>,
    net: &NetFlags,
    json: bool,
) -> anyhow::Result<ExitCode> {
    use postern_tunnel::doctor::{Check, Report};
    let mut checks = Vec::new();
    let file = match load_file(config.as_deref()) {
        Ok(f) => {
            let what = config.as_ref().map(|p| format!("{} parses", p.display()));
            checks.push(Check::ok("config", what.unwrap_or_else(|| "no --config file: defaults".to_owned())));
            f
        }
        Err(e) => {
            checks.push(Check::fail("config", format!("{e:#}"), "correct the file at the line shown"));
            AgentConfigFile::default()
        }
    };
    let route = match route(net, &file.agent) {
        Ok(r) => r,
        Err(e) => {
            checks.push(Check::fail("route", format!("{e:#}"), "correct [agent] in the file, or the flags"));
            route(&NetFlags::default(), &NetSection::default())?
        }
    };
    let opts = postern_tunnel::doctor::AgentDoctor {
        state_dir,
        gateways: gateways.iter().map(|g| agent::with_default_port(g)).collect(),
        route,
    };
    checks.extend(postern_tunnel::doctor::agent_checks(&opts).await);
    let report = Report::new(checks);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.human());
    }
    Ok(ExitCode::from(report.exit_code()))
}

async fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    let state_dir = cli.state_dir.unwrap_or_else(default_state_dir);
    let done: anyhow::Result<()> = match cli.command {
        Command::Join { gateway, token, ca_pin, run, config, force, net } => {
            if !force && let Ok(old) = agent::load_state(&state_dir) {
                anyhow::bail!(
                    "{} already holds the identity of {} (id {}, gateway {}); joining again would replace it. \
                     Use another --state-dir, or pass --force to replace it",
                    state_dir.display(),
                    old.name,
                    old.agent_id,
                    old.addresses().join(", ")
                );
            }
            let gateways = gateway.iter().map(|g| agent::with_default_port(g)).collect();
            let route = route(&net, &load_file(config.as_deref())?.agent)?;
            let state =
                agent::join(&JoinOptions { gateways, token, ca_pin, state_dir: state_dir.clone(), route }).await?;
            println!("joined as {} (id {}); state in {}", state.name, state.agent_id, state_dir.display());
            if run {
                run_agent(state_dir, config, Vec::new(), &net).await?;
            } else {
                println!("next: postern-agent run --state-dir {}", state_dir.display());
            }
            Ok(())
        }
        Command::Run { config, gateway, net } => {
            run_agent(state_dir, config, gateway.iter().map(|g| agent::with_default_port(g)).collect(), &net).await
        }
        Command::Doctor { config, gateway, net, json } => return doctor(state_dir, config, gateway, &net, json).await,
        Command::Status => {
            let state = agent::load_state(&state_dir)?;
            let cert = agent::identity_info(&state_dir)?;
            let now = std::time::SystemTime::now();
            println!("agent id:     {}", state.agent_id);
            println!("name:         {}", state.name);
            println!("gateway:      {}", state.addresses().join(", "));
            println!("ca pin:       {}", state.ca_pin);
            println!("cert serial:  {}", cert.serial_hex);
            println!("cert issued:  {}", readable(cert.not_before, now));
            println!("cert expires: {}", readable(cert.not_after, now));
            Ok(())
        }
    };
    done.map(|()| ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    postern_tunnel::init_logging(&cli.log, cli.log_json);
    // Two worker threads are plenty for an agent and keep its idle footprint small.
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("postern-agent: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Summaries of rate-limited log lines (postern_tunnel::log_limit): each minute, and what
    // is left when the command ends.
    let summaries = CancellationToken::new();
    rt.spawn(postern_tunnel::log_limit::run_summaries(summaries.clone()));
    let result = rt.block_on(real_main(cli));
    summaries.cancel();
    postern_tunnel::log_limit::flush_all();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("postern-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every command's `--help` ends with examples, as `postern`'s do.
    #[test]
    fn every_command_has_examples() {
        let cmd = super::Cli::command();
        let all = std::iter::once(&cmd).chain(cmd.get_subcommands().filter(|s| s.get_name() != "help"));
        let missing: Vec<&str> = all
            .filter(|c| !c.get_after_help().is_some_and(|h| h.to_string().contains("Examples:\n  postern-agent ")))
            .map(|c| c.get_name())
            .collect();
        assert!(missing.is_empty(), "postern-agent commands without examples: {missing:?}");
    }
}
