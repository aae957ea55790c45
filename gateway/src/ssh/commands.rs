//! Commands run on the gateway itself (`ssh -p 2222 alice@gateway COMMAND`), answered as
//! the authenticated user with one JSON document ([`postern_core::command`] is the
//! contract). The `postern` client (and any SSH client) uses them: `whoami`, `ls [SELECTOR]`,
//! `rdp-token INSTANCE`, `ssh-config [FILE]`, `run-begin JSON`, `run-end JSON`.

use postern_core::command::{CertificateInfo, DEFAULT_KNOWN_HOSTS, Instance, RunBegin, RunEnd, USAGE, WhoAmI};
use postern_core::policy::Target;
use postern_core::util::now_unix;
use postern_core::{Action, Identity, SESSION_ACTIONS};
use russh::server::Msg;
use serde::Serialize;
use serde_json::Value;

use super::channel::refuse;
use crate::access::usable_logins;
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
                tracing::warn!(error = %e, "cannot reload access after a logout");
            }
            state.access_changed.notify_one();
            let _ = state.audit.event(&crate::audit::events::Event::Logout(crate::audit::events::Logout {
                user: identity.user.clone(),
                source: source.to_owned(),
                cert_serial: format!("{:016x}", cert.serial),
            }));
            Ok(serde_json::json!({"revoked": revoked == 1, "serial": format!("{:016x}", cert.serial)}))
        }
        "ls" => to_json(list(state, identity, (!rest.is_empty()).then_some(rest)).await?),
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
    let visible = list(state, identity, None).await.ok()?;
    postern_core::util::near_miss(typed, visible.iter().map(|i| i.name.as_str())).map(str::to_owned)
}

/// Instances the user may reach now: not revoked, matching the selector, with at least one
/// action the policy allows and a door that is on (listed per instance).
async fn list(state: &Services, identity: &Identity, selector: Option<&str>) -> Result<Vec<Instance>, String> {
    let sel = selector
        .map(postern_core::policy::document::Selector::parse)
        .transpose()
        .map_err(|e| format!("label selector {:?}: {e}", selector.unwrap_or_default()))?;
    let agents = state.store.agents().await.map_err(|_| "gateway storage error".to_owned())?;
    let now = jiff::Timestamp::now();
    let registry = state.instances.registry();
    // In a cluster, connected to another gateway counts as online too.
    let elsewhere = state.instances.locations().all_elsewhere().await;
    let mut rows = Vec::new();
    for a in agents.into_iter().filter(|a| !a.revoked) {
        if let Some(sel) = &sel
            && !postern_core::policy::selector_matches(sel, &a.labels)
        {
            continue;
        }
        let target = Target { id: &a.id, name: &a.name, labels: &a.labels };
        let decisions: Vec<(Action, postern_core::policy::Decision)> = SESSION_ACTIONS
            .iter()
            // `rdp` only where it can be used: not while the RDP door is off.
            .filter(|act| **act != Action::Rdp || state.addresses.rdp.is_some())
            .map(|act| (*act, state.access.decide(identity, Some(target), act.name(), None, now, false)))
            .filter(|(_, d)| d.allowed)
            .collect();
        if decisions.is_empty() {
            continue;
        }
        let actions: Vec<String> = decisions.iter().map(|(act, _)| act.name().to_owned()).collect();
        // The logins of the first login-bearing action allowed (shell, exec, sftp).
        let logins = decisions
            .iter()
            .find(|(act, _)| matches!(act, Action::Shell | Action::Exec | Action::Sftp))
            .map(|(_, d)| usable_logins(&d.settings.run_as, d.settings.allow_root))
            .unwrap_or_default();
        let live = registry.get(&a.id);
        let online = live.is_some() || elsewhere.contains_key(&a.id);
        rows.push(Instance {
            online,
            platform: live.as_ref().map(|l| l.platform.clone()).unwrap_or(a.platform),
            hostname: live.as_ref().map(|l| l.hostname.clone()).unwrap_or(a.hostname),
            last_seen: if online { Some(now_unix()) } else { a.last_seen },
            name: a.name,
            id: a.id,
            labels: a.labels,
            actions,
            logins,
        });
    }
    Ok(rows)
}
