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
    /// The SSH door, when enabled.
    pub ssh: Option<SocketAddr>,
    /// The RDP door, when enabled.
    pub rdp: Option<SocketAddr>,
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
    /// Signalled after users, policies or grants change: live sessions are re-checked.
    pub access_changed: Arc<Notify>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services").field("addresses", &self.addresses).finish_non_exhaustive()
    }
}

impl Services {
    /// The port users reach the SSH door on (its configured one when it is off).
    pub fn ssh_port(&self) -> u16 {
        self.addresses.ssh.map(|a| a.port()).unwrap_or(self.config.ssh.listen.port())
    }
}
