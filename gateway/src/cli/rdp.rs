//! `postern rdp INSTANCE`: a routing token for the gateway's RDP port (with a FreeRDP
//! command line and an `.rdp` file for mstsc), or `--local PORT`, a local port forward to the
//! instance's RDP server through the SSH connection.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, bail};
use clap::Args;
use tokio::sync::Mutex;

use crate::client::{Client, ClientOptions, RdpToken};

/// How to reach the gateway as a user (shared by user commands).
#[derive(Args, Debug, Clone)]
pub struct GatewayArgs {
    /// The gateway's SSH front door, HOST or HOST:PORT (port 2222 by default).
    #[arg(long, env = "POSTERN_GATEWAY")]
    pub gateway: Option<String>,
    /// Your Postern user name. Default: $USER.
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
        let user = match &self.user {
            Some(u) => u.clone(),
            None => std::env::var("USER").context("no --user given and $USER is not set")?,
        };
        Ok(ClientOptions {
            gateway,
            user,
            identity_files: self.identity.clone(),
            known_hosts: self.known_hosts.clone(),
        })
    }
}

#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    postern rdp win-01                          token, FreeRDP command line and win-01.rdp for mstsc\n  \
    postern rdp win-01 --launch -- /u:alice     start xfreerdp with the token\n  \
    postern rdp win-01 --local 13389            then: xfreerdp /v:127.0.0.1:13389\n  \
    postern rdp win-01 --json                   the token as JSON, for scripts")]
pub struct RdpArgs {
    /// The Windows (or xrdp) instance.
    pub instance: String,
    #[command(flatten)]
    pub gateway: GatewayArgs,
    /// Instead of a token: forward this local port to the instance's RDP server through the
    /// SSH connection (for clients that cannot send a preconnection blob). Runs until Ctrl-C.
    #[arg(long, value_name = "PORT", conflicts_with_all = ["launch", "rdp_file", "json"])]
    pub local: Option<u16>,
    /// Address the local port listens on.
    #[arg(long, default_value = "127.0.0.1", requires = "local")]
    pub bind: std::net::IpAddr,
    /// Where to write the `.rdp` file. Default: ./INSTANCE.rdp.
    #[arg(long, value_name = "FILE")]
    pub rdp_file: Option<PathBuf>,
    /// Start a local FreeRDP client with the token (arguments after `--` are passed to it).
    #[arg(long)]
    pub launch: bool,
    /// Print the token as JSON (no file written).
    #[arg(long)]
    pub json: bool,
    /// Extra arguments for the client started by --launch.
    #[arg(last = true)]
    pub client_args: Vec<String>,
}

/// FreeRDP client programs looked for by `--launch`, in order.
const CLIENTS: &[&str] = &["xfreerdp", "xfreerdp3", "sdl-freerdp", "sdl-freerdp3", "wlfreerdp"];

pub async fn run(args: &RdpArgs) -> anyhow::Result<i32> {
    let opts = args.gateway.options()?;
    if let Some(port) = args.local {
        return local_forward(&opts, &args.instance, std::net::SocketAddr::new(args.bind, port)).await;
    }
    let client = Client::connect(&opts, None).await?;
    let token = client.rdp_token(&args.instance).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&token)?);
        return Ok(0);
    }
    if args.launch {
        let program = CLIENTS
            .iter()
            .find_map(|c| which(c))
            .with_context(|| format!("no RDP client found (looked for {}); use the .rdp file", CLIENTS.join(", ")))?;
        eprintln!("postern: starting {} for {} (token valid {}s)", program.display(), token.instance, token.expires_in);
        let status = tokio::process::Command::new(&program)
            .arg(format!("/v:{}", token.rdp_address))
            .arg(format!("/pcb:{}", token.token))
            .args(&args.client_args)
            .status()
            .await
            .with_context(|| format!("starting {}", program.display()))?;
        return Ok(status.code().unwrap_or(1));
    }
    let path = args.rdp_file.clone().unwrap_or_else(|| PathBuf::from(format!("{}.rdp", token.instance)));
    std::fs::write(&path, rdp_file(&token)).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "Routing token for {inst}: single use, valid for {ttl}s.\n\n\
         \x20 FreeRDP:  xfreerdp /v:{addr} /pcb:{tok}\n\
         \x20 mstsc:    open {file}  (or: xfreerdp {file})\n\n\
         Run `postern rdp {inst}` again for each new connection.",
        inst = token.instance,
        ttl = token.expires_in,
        addr = token.rdp_address,
        tok = token.token,
        file = path.display(),
    );
    Ok(0)
}

/// An `.rdp` file: the gateway's address and the token as the preconnection blob.
pub fn rdp_file(token: &RdpToken) -> String {
    format!(
        "full address:s:{}\r\npcb:s:{}\r\nprompt for credentials:i:1\r\nauthentication level:i:2\r\n",
        token.rdp_address, token.token
    )
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(program)).find(|p| p.is_file())
}

/// Accept local connections and carry each over its own SSH channel to the instance's RDP
/// server. If the SSH connection drops, the next connection reconnects.
async fn local_forward(opts: &ClientOptions, instance: &str, bind: std::net::SocketAddr) -> anyhow::Result<i32> {
    let client = Arc::new(Mutex::new(Arc::new(Client::connect(opts, Some(instance)).await?)));
    // Fail now, not at the first connection, when RDP to this instance is not allowed.
    drop(client.lock().await.open_rdp().await?);
    let listener = tokio::net::TcpListener::bind(bind).await.with_context(|| format!("listening on {bind}"))?;
    let local = listener.local_addr()?;
    eprintln!("postern: RDP to {instance} on {local}; connect with: xfreerdp /v:{local}   (Ctrl-C to stop)");
    let stats = Arc::new(Stats::default());
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut stop => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("postern: accept failed: {e}");
                    continue;
                }
            },
        };
        let (client, stats, opts, instance) = (client.clone(), stats.clone(), opts.clone(), instance.to_owned());
        tokio::spawn(async move {
            let stream = match open(&client, &opts, &instance).await {
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
            tokio::join!(pipe(tcp_read, ch_write, &stats.bytes_up), pipe(ch_read, tcp_write, &stats.bytes_down));
        });
    }
    eprintln!(
        "postern: {} connection(s), {} failed; {} bytes sent, {} received",
        stats.connections.load(Ordering::Relaxed),
        stats.failed.load(Ordering::Relaxed),
        stats.bytes_up.load(Ordering::Relaxed),
        stats.bytes_down.load(Ordering::Relaxed),
    );
    Ok(0)
}

/// Copy until end of input, counting as it goes (the summary is right even for
/// connections still open at Ctrl-C), then pass the end on.
async fn pipe(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    counter: &AtomicU64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

#[derive(Default)]
struct Stats {
    connections: AtomicU64,
    failed: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

/// A channel on the current connection, reconnecting once if that connection has ended.
async fn open(
    client: &Mutex<Arc<Client>>,
    opts: &ClientOptions,
    instance: &str,
) -> anyhow::Result<russh::ChannelStream<russh::client::Msg>> {
    let current = client.lock().await.clone();
    if !current.is_closed() {
        return current.open_rdp().await;
    }
    let mut guard = client.lock().await;
    if guard.is_closed() {
        eprintln!("postern: connection to the gateway lost; reconnecting");
        *guard = Arc::new(Client::connect(opts, Some(instance)).await?);
    }
    guard.open_rdp().await
}
