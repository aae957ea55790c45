//! The gateway's shared state: a set of narrow services, built once at start-up
//! ([`crate::app::start`]) and handed to the doors. Each service takes only the few others
//! it needs; nothing below this module knows the whole set (docs/architecture.md).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::Notify;

use crate::access::{AccessList, Authorizer};
use crate::audit::AuditLog;
use crate::audit::ship::Shipper;
use crate::broker::Broker;
use crate::cluster_sessions::ClusterSessions;
use crate::config::GatewayConfig;
use crate::connections::Connections;
use crate::history::SessionHistory;
use crate::hostkeys::HostKeys;
use crate::instances::Instances;
use crate::manage::Manage;
use crate::rdp_tokens::RdpTokens;
use crate::recording::RecordingOptions;
use crate::runs::Runs;
use crate::sessions::SessionTable;
use crate::store::Store;

/// Where the gateway listens, once bound.
#[derive(Debug, Clone, Copy)]
pub struct Addresses {
    pub tunnel: SocketAddr,
    /// The tunnel's TCP fallback, when it is on.
    pub tunnel_tcp: Option<SocketAddr>,
    /// The SSH door, when enabled.
    pub ssh: Option<SocketAddr>,
    /// The RDP door, when enabled.
    pub rdp: Option<SocketAddr>,
    /// The web console, when enabled.
    pub web: Option<SocketAddr>,
}

/// Everything the doors share.
pub struct Services {
    pub config: Arc<GatewayConfig>,
    pub addresses: Addresses,
    pub store: Arc<dyn Store>,
    pub audit: Arc<AuditLog>,
    /// How new recordings are written (encryption, input capture).
    pub recording: RecordingOptions,
    /// `[audit] min_free_space`: checked before each logged session.
    pub space: Arc<crate::recording::space::SpaceGuard>,
    /// Copies closed segments and recordings to object storage (`[audit.s3]`).
    pub shipper: Option<Arc<Shipper>>,
    /// Identities, policies and grants (reloaded after every change).
    pub access: Arc<AccessList>,
    /// The one decision point for sessions.
    pub authorizer: Arc<Authorizer>,
    pub instances: Instances,
    pub sessions: Arc<SessionTable>,
    /// Every session, kept in the store (`postern sessions --all`, `postern replay`).
    pub history: Arc<SessionHistory>,
    /// Authenticated SSH connections by user (closed when the user is disabled or removed).
    pub connections: Arc<Connections>,
    pub broker: Broker,
    pub runs: Runs,
    pub rdp_tokens: RdpTokens,
    /// With `[cluster]`: this gateway's live sessions kept in the store, and terminate
    /// requests from other gateways.
    pub cluster_sessions: Option<Arc<ClusterSessions>>,
    pub manage: Manage,
    pub host_keys: Arc<HostKeys>,
    /// Signs and revokes user certificates (`postern login`, `user cert`, `logout`).
    pub certifier: crate::certs::Certifier,
    /// With `[identity.oidc]`: sign-in through the identity provider (`postern login`).
    pub sso: Option<Arc<crate::sso::Sso>>,
    /// With `[web]`: the console's one-time links and browser sessions, and its origin
    /// (`https://host:port`, where `postern web-login` links point).
    pub web_signin: Option<(Arc<crate::web_signin::WebSignIn>, String)>,
    /// Signalled after users, policies or grants change: live sessions are re-checked.
    pub access_changed: Arc<Notify>,
    /// Reads gateway.toml again (SIGHUP, `postern reload`).
    pub reload: Arc<crate::reload::ConfigReload>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services").field("addresses", &self.addresses).finish_non_exhaustive()
    }
}

impl Services {
    /// Instances the user may reach now: not revoked, matching the selector, with at least one
    /// action the policy allows and a door that is on (listed per instance).
    pub async fn visible_instances(
        &self,
        identity: &postern_core::Identity,
        selector: Option<&str>,
    ) -> Result<Vec<postern_core::command::Instance>, String> {
        let state = self;
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
            let target = postern_core::policy::Target { id: &a.id, name: &a.name, labels: &a.labels };
            let decisions: Vec<(postern_core::Action, postern_core::policy::Decision)> = postern_core::SESSION_ACTIONS
                .iter()
                // `rdp` only where it can be used: not while the RDP door is off.
                .filter(|act| **act != postern_core::Action::Rdp || state.addresses.rdp.is_some())
                .map(|act| (*act, state.access.decide(identity, Some(target), act.name(), None, now, false)))
                .filter(|(_, d)| d.allowed)
                .collect();
            if decisions.is_empty() {
                continue;
            }
            let actions: Vec<String> = decisions.iter().map(|(act, _)| act.name().to_owned()).collect();
            // The logins and profiles of the first login-bearing action allowed (shell, exec, sftp).
            let session = decisions.iter().find(|(act, _)| {
                matches!(act, postern_core::Action::Shell | postern_core::Action::Exec | postern_core::Action::Sftp)
            });
            let logins = session
                .map(|(_, d)| crate::access::usable_logins(&d.settings.run_as, d.settings.allow_root))
                .unwrap_or_default();
            let profiles = session
                .map(|(_, d)| {
                    let mut p: Vec<String> = d.settings.profile.iter().cloned().collect();
                    p.extend(d.settings.profiles.iter().filter(|x| Some(*x) != d.settings.profile.as_ref()).cloned());
                    p
                })
                .unwrap_or_default();
            let live = registry.get(&a.id);
            let online = live.is_some() || elsewhere.contains_key(&a.id);
            rows.push(postern_core::command::Instance {
                online,
                platform: live.as_ref().map(|l| l.platform.clone()).unwrap_or(a.platform),
                hostname: live.as_ref().map(|l| l.hostname.clone()).unwrap_or(a.hostname),
                last_seen: if online { Some(postern_core::util::now_unix()) } else { a.last_seen },
                name: a.name,
                id: a.id,
                labels: a.labels,
                actions,
                logins,
                profiles,
            });
        }
        Ok(rows)
    }

    /// The port users reach the SSH door on (its configured one when it is off).
    pub fn ssh_port(&self) -> u16 {
        self.addresses.ssh.map(|a| a.port()).unwrap_or(self.config.ssh.listen.port())
    }
}
