//! The sign-in connection of `postern login`: an SSH connection as [`LOGIN_USER`],
//! accepted with the `none` method when `[identity.oidc]` is configured, that can do
//! nothing but the sign-in commands (each on its own session channel, answered with one
//! JSON line, or a refusal on stderr and exit status 1):
//!
//! - `login-begin {"redirect_uri": ...}` → `{"authorization_url", "state"}`;
//! - `login-finish {"state", "code", "public_key"}` → the certificate ([`LoginResult`]);
//! - `login-device {"public_key"}` → a [`DevicePrompt`] line at once, the certificate line
//!   once the person approved at the identity provider.
//!
//! The SSH layer gives the client the gateway's host key check and an encrypted channel;
//! the flows a connection started belong to it alone (a code can only be finished on the
//! connection that began its flow). Everything is bounded: flows per connection, sign-in
//! connections in all ([`crate::sso::MAX_LOGINS`]), and the connection's life.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use postern_core::command::{DevicePrompt, LoginBegin, LoginDevice, LoginFinish, LoginResult, LoginStarted};
use russh::ChannelMsg;
use russh::server::Msg;
use serde::Serialize;

use super::channel::refuse;
use crate::oidc::PendingLogin;
use crate::sso::Sso;

/// Flows one sign-in connection may have begun and not finished, and sign-in commands it
/// may have running at once (a device sign-in waits minutes for its person).
const MAX_FLOWS: usize = 4;
pub(super) const MAX_COMMANDS: usize = 4;
/// How long a sign-in connection may last, whatever it does.
pub(super) const LOGIN_CONNECTION_MAX: Duration = Duration::from_secs(15 * 60);
/// Largest sign-in command (a public key and a code fit easily).
const MAX_COMMAND: usize = 16 << 10;

/// The flows a sign-in connection began, by state.
#[derive(Debug, Default)]
pub(super) struct Flows(Mutex<Vec<PendingLogin>>);

/// What makes a connection a sign-in connection.
pub(super) struct SignIn {
    pub sso: Arc<Sso>,
    pub flows: Arc<Flows>,
    /// Places for the commands running on this connection ([`MAX_COMMANDS`]).
    pub commands: Arc<tokio::sync::Semaphore>,
    /// Its place among the sign-in connections.
    pub _place: crate::sso::LoginPlace,
}

pub(super) async fn serve_login_channel(
    sso: Arc<Sso>,
    flows: Arc<Flows>,
    source: String,
    channel: russh::Channel<Msg>,
) {
    let (mut rd, wr) = channel.split();
    let command = loop {
        match tokio::time::timeout(Duration::from_secs(60), rd.wait()).await {
            Ok(Some(ChannelMsg::Exec { command, .. })) => break command,
            Ok(Some(ChannelMsg::RequestShell { .. } | ChannelMsg::RequestSubsystem { .. })) => {
                refuse(&wr, "this connection is for `postern login` only", 2).await;
                return;
            }
            Ok(Some(ChannelMsg::Eof | ChannelMsg::Close)) | Ok(None) | Err(_) => return,
            Ok(Some(_)) => {}
        }
    };
    if command.len() > MAX_COMMAND {
        refuse(&wr, "sign-in command too long", 1).await;
        return;
    }
    let command = String::from_utf8_lossy(&command).into_owned();
    let (verb, rest) = command.trim().split_once(' ').unwrap_or((command.trim(), ""));
    let work = async {
        match verb {
            "login-begin" => begin(&sso, &flows, rest, &source).await.and_then(to_line),
            "login-finish" => finish(&sso, &flows, rest, &source).await.and_then(to_line),
            "login-device" => device(&sso, rest, &source, &wr).await.and_then(to_line),
            _ => {
                Err("this connection is for `postern login` only (login-begin, login-finish, login-device)".to_owned())
            }
        }
    };
    // A client that closes the channel gives up its sign-in: stop waiting for the identity
    // provider (a device sign-in would otherwise poll on for minutes) and free its place.
    let closed = async {
        loop {
            match rd.wait().await {
                Some(ChannelMsg::Close) | None => return,
                Some(_) => {}
            }
        }
    };
    let outcome = tokio::select! {
        outcome = work => outcome,
        () = closed => return,
    };
    match outcome {
        Ok(line) => {
            let _ = wr.data_bytes(line.into_bytes()).await;
            let _ = wr.exit_status(0).await;
            let _ = wr.eof().await;
            let _ = wr.close().await;
        }
        Err(msg) => refuse(&wr, &msg, 1).await,
    }
}

fn to_line(v: impl Serialize) -> Result<String, String> {
    serde_json::to_string(&v).map(|s| s + "\n").map_err(|e| format!("internal error: {e}"))
}

fn parse<T: serde::de::DeserializeOwned>(verb: &str, rest: &str) -> Result<T, String> {
    serde_json::from_str(rest).map_err(|e| format!("{verb}: {e}"))
}

async fn begin(sso: &Sso, flows: &Flows, rest: &str, source: &str) -> Result<LoginStarted, String> {
    let req: LoginBegin = parse("login-begin", rest)?;
    if flows.0.lock().map(|f| f.len()).unwrap_or(MAX_FLOWS) >= MAX_FLOWS {
        return Err("too many sign-ins begun on this connection".to_owned());
    }
    let pending = sso.begin(&req.redirect_uri, source).await?;
    let started = LoginStarted { authorization_url: pending.authorization_url.clone(), state: pending.state.clone() };
    if let Ok(mut f) = flows.0.lock() {
        f.push(pending);
    }
    Ok(started)
}

async fn finish(sso: &Sso, flows: &Flows, rest: &str, source: &str) -> Result<LoginResult, String> {
    let req: LoginFinish = parse("login-finish", rest)?;
    // Taken off the list: a flow is finished once, whatever the outcome.
    let pending = flows.0.lock().ok().and_then(|mut f| {
        // The relying party's own comparison (constant time), as its contract asks.
        let at = f.iter().position(|p| p.check_state(&req.state).is_ok())?;
        Some(f.remove(at))
    });
    let Some(pending) = pending else {
        return Err("no sign-in with that state was begun on this connection (or it was already finished)".to_owned());
    };
    sso.finish(&pending, &req.code, &req.public_key, source).await
}

async fn device(sso: &Sso, rest: &str, source: &str, wr: &russh::ChannelWriteHalf<Msg>) -> Result<LoginResult, String> {
    let req: LoginDevice = parse("login-device", rest)?;
    crate::access::parse_key(&req.public_key).map_err(|e| format!("public_key: {e}"))?;
    let device = sso.device_begin(source).await?;
    let prompt = DevicePrompt {
        verification_uri: device.verification_uri.clone(),
        verification_uri_complete: device.verification_uri_complete.clone(),
        user_code: device.user_code.clone(),
        expires_in: device.expires_in,
    };
    let line = to_line(prompt)?;
    wr.data_bytes(line.into_bytes()).await.map_err(|_| "the client went away".to_owned())?;
    sso.device_finish(&device, &req.public_key, source).await
}
