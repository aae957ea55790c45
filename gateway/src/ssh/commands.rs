//! Commands run on the gateway itself (`ssh -p 2222 alice@gateway COMMAND`), answered as
//! the authenticated user with one JSON document ([`postern_core::command`] is the
//! contract). The `postern` client (and any SSH client) uses them: `whoami`, `ls [SELECTOR]`,
//! `rdp-token INSTANCE`, `ssh-config [FILE]`, `run-begin JSON`, `run-end JSON`.

use postern_core::Identity;
use postern_core::command::{CertificateInfo, DEFAULT_KNOWN_HOSTS, RunBegin, RunEnd, USAGE, WhoAmI};
use russh::server::Msg;
use serde::Serialize;
use serde_json::Value;

use super::channel::refuse;
use crate::services::Services;

/// Answer one gateway command on the channel: the JSON document and exit status 0, or the
/// refusal on stderr and exit status 1.
pub(super) async fn answer(
    state: &Services,
    identity: &Identity,
    source: &str,
    wr: &russh::ChannelWriteHalf<Msg>,
    command: &str,
) {
    // The connection may have outlived the user's access (it is closed shortly after, by
    // the enforcer): a disabled or removed user gets no answer from the gateway.
    if !state.access.user_active(&identity.user) {
        refuse(wr, postern_core::DENIED, 1).await;
        return;
    }
    match run(state, identity, source, command).await {
        Ok(v) => {
            let _ = wr.data_bytes(format!("{v}\n").into_bytes()).await;
            let _ = wr.exit_status(0).await;
            let _ = wr.eof().await;
            let _ = wr.close().await;
        }
        Err(msg) => refuse(wr, &msg, 1).await,
    }
}

fn to_json(v: impl Serialize) -> Result<Value, String> {
    serde_json::to_value(v).map_err(|e| format!("internal error: {e}"))
}

async fn run(state: &Services, identity: &Identity, source: &str, command: &str) -> Result<Value, String> {
    let command = command.trim();
    let (verb, rest) = command.split_once(char::is_whitespace).unwrap_or((command, ""));
    let rest = rest.trim();
    match verb {
        "whoami" => to_json(WhoAmI {
            user: identity.user.clone(),
            source: source.to_owned(),
            groups: state.access.user_groups(&identity.user),
            certificate: identity.cert.map(|c| CertificateInfo {
                serial: format!("{:016x}", c.serial),
                valid_before: c.valid_before,
                mfa: c.mfa,
            }),
        }),
        // `postern logout`: the certificate this connection came in with stops working, on
        // every gateway sharing the store.
        "logout" => {
            let Some(cert) = identity.cert else {
                return Err("this connection did not authenticate with a certificate from the gateway".to_owned());
            };
            let revoked = state
                .certifier
                .revoke(&identity.user, Some(cert.serial))
                .await
                .map_err(|e| format!("gateway storage error: {e}"))?;
            if let Err(e) = state.access.reload(state.store.as_ref()).await {
                postern_tunnel::warn_limited!(error = %e, "cannot reload access after a logout");
            }
            state.access_changed.notify_one();
            let _ = state.audit.event(&crate::audit::events::Event::Logout(crate::audit::events::Logout {
                user: identity.user.clone(),
                source: source.to_owned(),
                cert_serial: format!("{:016x}", cert.serial),
            }));
            Ok(serde_json::json!({"revoked": revoked == 1, "serial": format!("{:016x}", cert.serial)}))
        }
        // `postern web-login`: a one-time link that signs a browser in to the console as you.
        "web-login" => {
            let Some((signin, origin)) = &state.web_signin else {
                return Err("this gateway's web console is off ([web] enabled = false)".to_owned());
            };
            let token = signin.issue_link(&identity.user).map_err(|e| e.to_string())?;
            Ok(serde_json::json!({"url": format!("{origin}/signin?token={token}"), "user": identity.user}))
        }
        "ls" => to_json(state.visible_instances(identity, (!rest.is_empty()).then_some(rest)).await?),
        "rdp-token" if !rest.is_empty() && !rest.contains(char::is_whitespace) => {
            to_json(state.rdp_tokens.issue(identity, rest).await?)
        }
        "rdp-token" => Err("usage: rdp-token INSTANCE".to_owned()),
        "run-begin" => {
            let req: RunBegin = serde_json::from_str(rest).map_err(|e| format!("run-begin: {e}"))?;
            to_json(state.runs.begin(identity, source, &req)?)
        }
        "run-end" => {
            let req: RunEnd = serde_json::from_str(rest).map_err(|e| format!("run-end: {e}"))?;
            to_json(state.runs.end(identity, &req)?)
        }
        "ssh-config" => {
            let file = if rest.is_empty() { DEFAULT_KNOWN_HOSTS } else { rest };
            let listen = state.addresses.ssh.unwrap_or(state.config.ssh.listen);
            crate::addressing::client_config(&state.config, &state.host_keys, listen, file, &identity.user)
                .map_err(|e| format!("{e:#}"))
                .and_then(to_json)
        }
        "" | "help" => Err(USAGE.to_owned()),
        other => Err(format!("unknown gateway command {:?}; {USAGE}", other.chars().take(40).collect::<String>())),
    }
}

/// The name of an instance this user may reach that `typed` is a near miss of: the hint
/// for "access denied (or no such instance)". Only instances `ls` shows this user are
/// candidates, so the hint says nothing about others (nor whether `typed` exists).
pub(super) async fn near_miss(state: &Services, identity: &Identity, typed: &str) -> Option<String> {
    let visible = state.visible_instances(identity, None).await.ok()?;
    postern_core::util::near_miss(typed, visible.iter().map(|i| i.name.as_str())).map(str::to_owned)
}
