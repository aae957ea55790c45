//! `postern login`, `postern logout`, `postern whoami`: single sign-on from the user's side.
//!
//! `login` generates a key, signs in at the company's identity provider through the gateway
//! (a browser with a loopback redirect, or `--device` for machines without one), and keeps
//! the short-lived certificate the gateway signs next to the key in `~/.ssh/postern/`, where
//! the `postern` client finds it and where the ssh config it installs points OpenSSH at it
//! (and adds both to a running ssh-agent). `logout` revokes the certificate at the gateway
//! and removes them.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use postern_client::{Client, ClientOptions};
use postern_core::command::{
    DevicePrompt, LOGIN_USER, LoginBegin, LoginDevice, LoginFinish, LoginResult, LoginStarted,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use super::user::GatewayArgs;

/// How long `login` waits for the browser to come back to the loopback address.
const BROWSER_WAIT: Duration = Duration::from_secs(300);
/// How long a device sign-in may take (the identity provider's code lives shorter).
const DEVICE_WAIT: Duration = Duration::from_secs(16 * 60);
/// Largest request the loopback listener reads.
const MAX_REDIRECT: u64 = 16 << 10;

#[derive(clap::Args, Debug, Clone)]
pub struct LoginArgs {
    #[command(flatten)]
    pub gateway: GatewayArgs,
    /// Sign in on another device (a phone, a laptop) with a code, for a machine without a
    /// browser (OAuth device authorization grant).
    #[arg(long)]
    pub device: bool,
    /// Do not open a browser; print the address to open instead.
    #[arg(long)]
    pub no_browser: bool,
    /// Loopback port for the identity provider's redirect (default: any free port; some
    /// providers need a fixed, registered one).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Do not write the ssh config for `ssh INSTANCE.<suffix>` (`postern ssh-config --install`).
    #[arg(long)]
    pub no_ssh_config: bool,
}

pub async fn login(args: &LoginArgs) -> anyhow::Result<i32> {
    let Some(gateway) = args.gateway.gateway.clone() else {
        bail!("which gateway? pass --gateway HOST[:PORT] or set POSTERN_GATEWAY");
    };
    let mut opts = ClientOptions::new(&gateway, LOGIN_USER);
    opts.known_hosts = args.gateway.known_hosts.clone();
    let key = crate::hostkeys::new_key("postern login")?;
    let public_key = key.public_key().to_openssh().context("encoding the key")?;
    let client = Client::connect_sign_in(&opts).await?;
    let result =
        if args.device { device(&client, &public_key).await? } else { browser(&client, args, &public_key).await? };

    // Keep the key and its certificate where OpenSSH and the postern client find them.
    let path = super::home::key_path(&gateway)?;
    let dir = path.parent().context("key path")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let private = key.to_openssh(russh::keys::ssh_key::LineEnding::LF).context("encoding the key")?;
    postern_tunnel::agent::write_private(&path, private.as_bytes())?;
    postern_tunnel::agent::write_private(
        &super::home::cert_path(&path),
        format!("{}\n", result.certificate).as_bytes(),
    )?;
    postern_tunnel::agent::write_private(
        &PathBuf::from(format!("{}.pub", path.display())),
        format!("{public_key}\n").as_bytes(),
    )?;

    let mut ssh_hint = String::new();
    if !args.no_ssh_config {
        // With the new certificate: which also shows it works.
        let as_user = GatewayArgs {
            gateway: Some(gateway.clone()),
            user: Some(result.user.clone()),
            identity: vec![path.clone()],
            known_hosts: args.gateway.known_hosts.clone(),
        };
        let user_client = Client::connect(&as_user.options()?, None).await?;
        let config = user_client.ssh_config(postern_core::command::DEFAULT_KNOWN_HOSTS).await?;
        let identity = path.to_str().context("the key path is not UTF-8")?.to_owned();
        let home = super::home::home_dir()?;
        super::ssh_config::install_config(&home, &config, postern_core::command::DEFAULT_KNOWN_HOSTS, &[identity])?;
        ssh_hint = format!(
            "\nTry: ssh {}@INSTANCE.{}   (the ssh config is in ~/.ssh/postern/; `postern ls` lists instances)",
            result.user, config.suffix
        );
    }
    let left = result.info.valid_before.saturating_sub(u64::try_from(jiff::Timestamp::now().as_second()).unwrap_or(0));
    add_to_agent(&path, left);
    let groups = if result.groups.is_empty() { "none".to_owned() } else { result.groups.join(", ") };
    println!(
        "Signed in as {} (groups: {groups}{}); the certificate is valid until {} ({} left).\nKey and certificate: {}{ssh_hint}",
        result.user,
        if result.info.mfa { "; with MFA" } else { "" },
        super::format::timestamp(i64::try_from(result.info.valid_before).unwrap_or(i64::MAX)),
        super::format::duration_secs(left),
        path.display(),
    );
    Ok(0)
}

async fn browser(client: &Client, args: &LoginArgs, public_key: &str) -> anyhow::Result<LoginResult> {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, args.port)))
        .await
        .with_context(|| format!("listening on 127.0.0.1:{} for the identity provider's redirect", args.port))?;
    let port = listener.local_addr()?.port();
    let begin = LoginBegin { redirect_uri: format!("http://127.0.0.1:{port}/callback") };
    let started: LoginStarted = client
        .sign_in_command(&format!("login-begin {}", serde_json::to_string(&begin)?), Duration::from_secs(60), |_| {})
        .await?;
    eprintln!("To sign in, open this address in a browser:\n\n  {}\n", started.authorization_url);
    if !args.no_browser {
        open_browser(&started.authorization_url);
    }
    eprintln!("Waiting for the identity provider (up to {} minutes)...", BROWSER_WAIT.as_secs() / 60);
    let code = wait_for_redirect(&listener, &started.state).await?;
    let finish = LoginFinish { state: started.state, code, public_key: public_key.to_owned() };
    let result = client
        .sign_in_command(&format!("login-finish {}", serde_json::to_string(&finish)?), Duration::from_secs(120), |_| {})
        .await?;
    Ok(result)
}

async fn device(client: &Client, public_key: &str) -> anyhow::Result<LoginResult> {
    let req = LoginDevice { public_key: public_key.to_owned() };
    let result = client
        .sign_in_command(&format!("login-device {}", serde_json::to_string(&req)?), DEVICE_WAIT, |line| {
            if let Ok(p) = serde_json::from_str::<DevicePrompt>(line) {
                eprintln!(
                    "To sign in, open {} on any device and enter the code {} (valid for {} minutes).{}",
                    p.verification_uri,
                    p.user_code,
                    p.expires_in / 60,
                    p.verification_uri_complete.map(|u| format!("\n(or open {u})")).unwrap_or_default(),
                );
                eprintln!("Waiting for you to approve...");
            }
        })
        .await?;
    Ok(result)
}

/// `$BROWSER URL` when set, else the desktop's opener; detached, quiet.
fn open_browser(url: &str) {
    let opener = std::env::var("BROWSER").ok().filter(|b| !b.is_empty()).unwrap_or_else(|| "xdg-open".to_owned());
    let spawned = std::process::Command::new(&opener)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn();
    if spawned.is_err() {
        eprintln!("(could not start a browser with {opener}; open the address yourself)");
    }
}

/// Serve the loopback redirect: the first request to `/callback` carrying `state` gives the
/// code (or the identity provider's error). Other requests get a 404 and waiting goes on.
async fn wait_for_redirect(listener: &TcpListener, state: &str) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + BROWSER_WAIT;
    loop {
        let Ok(accepted) = tokio::time::timeout_at(deadline, listener.accept()).await else {
            bail!("no answer from the identity provider within {} minutes", BROWSER_WAIT.as_secs() / 60);
        };
        let (mut stream, _) = accepted.context("accepting the redirect")?;
        let mut line = String::new();
        let mut request = BufReader::new((&mut stream).take(MAX_REDIRECT));
        if !matches!(tokio::time::timeout(Duration::from_secs(10), request.read_line(&mut line)).await, Ok(Ok(_))) {
            continue;
        }
        let target = line.split_whitespace().nth(1).unwrap_or_default();
        let Some(query) = target.strip_prefix("/callback?") else {
            respond(&mut stream, "404 Not Found", "Not found.").await;
            continue;
        };
        let params: Vec<(String, String)> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (postern_core::util::url_decode(k), postern_core::util::url_decode(v)))
            .collect();
        let get = |k: &str| params.iter().find(|(x, _)| x == k).map(|(_, v)| v.clone());
        if get("state").as_deref() != Some(state) {
            // Not our flow (another page, or a forged redirect): not an answer.
            respond(&mut stream, "400 Bad Request", "This sign-in is not the one postern is waiting for.").await;
            continue;
        }
        if let Some(error) = get("error") {
            let why = get("error_description").map(|d| format!(": {d}")).unwrap_or_default();
            respond(&mut stream, "200 OK", &format!("Sign-in refused by the identity provider ({error}{why}).")).await;
            bail!("the identity provider refused the sign-in: {error}{why}");
        }
        let Some(code) = get("code") else {
            respond(&mut stream, "400 Bad Request", "No code in the redirect.").await;
            bail!("the identity provider's redirect carried no code");
        };
        respond(&mut stream, "200 OK", "Signed in. You can close this window and go back to the terminal.").await;
        return Ok(code);
    }
}

async fn respond(stream: &mut tokio::net::TcpStream, status: &str, text: &str) {
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Postern</title></head>\
         <body><p id=\"postern\">{}</p></body></html>",
        text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
    );
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.write_all(response.as_bytes())).await;
}

/// Put the key and certificate into a running ssh-agent for the certificate's life
/// (`ssh-add -t`), so that ssh finds them however it is configured. Best effort.
fn add_to_agent(key: &Path, secs: u64) {
    if std::env::var_os("SSH_AUTH_SOCK").is_none() {
        return;
    }
    let out = std::process::Command::new("ssh-add")
        .arg("-t")
        .arg(secs.max(1).to_string())
        .arg(key)
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => eprintln!("Added to ssh-agent until the certificate expires."),
        _ => eprintln!("(could not add the key to ssh-agent; ssh uses the files directly)"),
    }
}

fn remove_from_agent(key: &Path) {
    if std::env::var_os("SSH_AUTH_SOCK").is_none() {
        return;
    }
    let _ = std::process::Command::new("ssh-add")
        .arg("-d")
        .arg(key)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// `postern logout`: revoke the sign-in certificate at the gateway (it stops working on
/// every gateway sharing the store), then remove it and its key.
pub async fn logout(gw: &GatewayArgs) -> anyhow::Result<i32> {
    let Some(gateway) = gw.gateway.clone() else {
        bail!("which gateway? pass --gateway HOST[:PORT] or set POSTERN_GATEWAY");
    };
    let path = super::home::key_path(&gateway)?;
    if !super::home::cert_path(&path).exists() && !path.exists() {
        println!("Not signed in to {gateway} (no {}).", path.display());
        return Ok(0);
    }
    let mut revoked = false;
    if let Some((key, user)) = super::home::current_login(&gateway) {
        let as_user = GatewayArgs {
            gateway: Some(gateway.clone()),
            user: Some(user),
            identity: vec![key],
            known_hosts: gw.known_hosts.clone(),
        };
        match Client::connect(&as_user.options()?, None).await {
            Ok(c) => match c.gateway_command("logout").await {
                Ok(_) => revoked = true,
                Err(e) => eprintln!("postern: the gateway did not revoke the certificate: {e}"),
            },
            Err(e) => eprintln!("postern: cannot reach the gateway to revoke the certificate: {e}"),
        }
    }
    remove_from_agent(&path);
    for p in [super::home::cert_path(&path), PathBuf::from(format!("{}.pub", path.display())), path.clone()] {
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                eprintln!("postern: cannot remove {}: {e}", p.display());
            }
            _ => {}
        }
    }
    if revoked {
        println!("Signed out of {gateway}: the certificate was revoked and removed.");
        Ok(0)
    } else {
        println!(
            "Removed the sign-in key and certificate for {gateway} (the certificate was not revoked; it expires by itself)."
        );
        Ok(1)
    }
}

/// `postern whoami`: who the gateway says you are, your groups, and your certificate.
pub async fn whoami(gw: &GatewayArgs, json: bool) -> anyhow::Result<i32> {
    let client = Client::connect(&gw.options()?, None).await?;
    let me = client.whoami().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&me)?);
        return Ok(0);
    }
    println!("user:   {}", me.user);
    println!("groups: {}", if me.groups.is_empty() { "none".to_owned() } else { me.groups.join(", ") });
    println!("from:   {}", me.source);
    match &me.certificate {
        Some(c) => {
            let now = u64::try_from(jiff::Timestamp::now().as_second()).unwrap_or(0);
            println!(
                "certificate: serial {}, valid until {} ({} left){}",
                c.serial,
                super::format::timestamp(i64::try_from(c.valid_before).unwrap_or(i64::MAX)),
                super::format::duration_secs(c.valid_before.saturating_sub(now)),
                if c.mfa { ", with MFA" } else { "" }
            );
        }
        None => println!("certificate: none (signed in with an SSH key)"),
    }
    Ok(0)
}

/// `postern web-login`: a one-time link that signs a browser in to the web console as you.
pub async fn web_login(gw: &GatewayArgs) -> anyhow::Result<i32> {
    let client = Client::connect(&gw.options()?, None).await?;
    let v = client.gateway_command("web-login").await?;
    let url = v.get("url").and_then(|u| u.as_str()).context("unexpected web-login answer from the gateway")?;
    eprintln!("Open this link in your browser within two minutes (it works once):");
    println!("{url}");
    Ok(0)
}
