//! `postern rdp INSTANCE`: a routing token for the gateway's RDP port (with a FreeRDP
//! command line and an `.rdp` file for mstsc), or `--local PORT`, a local port forward to the
//! instance's RDP server through the SSH connection.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use postern_client::{Client, ClientOptions, Connection, RdpToken, Target};

use super::user::{GatewayArgs, serve_forwards};

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
    // The token is a credential for its short life: the file is readable by its owner only.
    postern_tunnel::agent::write_private(&path, rdp_file(&token).as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
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

/// Forward a local port to the instance's RDP server over SSH channels, until Ctrl-C.
async fn local_forward(opts: &ClientOptions, instance: &str, bind: std::net::SocketAddr) -> anyhow::Result<i32> {
    let conn = Arc::new(Connection::open(opts, instance).await?);
    // Fail now, not at the first connection, when RDP to this instance is not allowed.
    drop(conn.client().await?.open_rdp().await?);
    serve_forwards(conn, vec![(bind, Target::Rdp)]).await
}
