//! Audit events as types: every event the gateway writes is a variant of [`Event`], its name
//! is spelled once (in the `events!` list below), and its fields are a struct, so a call
//! site cannot misspell a name or a key, or give a field the wrong type.
//!
//! The JSON an event serializes to is exactly what the log has always held (docs/audit.md
//! shows one real example of each; the tests here read them back through these types): an
//! `Option` is written as `null` unless the field only ever appeared in some cases, and then
//! it is skipped when absent. Where one name is written by several doors with different
//! fields (`session.start` from SSH or the admin socket, ...), the struct is an untagged enum
//! of one shape per door.
//!
//! Split into files only for length: this one (the list and shared pieces), [`session`]
//! (what users do), [`gateway`] (the gateway itself, agents, administration) and the tests.

mod common;
pub mod gateway;
pub mod session;

use serde_json::{Map, Value};

pub use common::{RdpMode, RdpRequest};
pub use gateway::*;
pub use session::*;

/// Declares [`Event`] from one list of `Variant(Type) = "name"`: the only place event names
/// are spelled. Generates [`Event::name`], [`Event::NAMES`], serialization and parsing.
macro_rules! events {
    ($( $(#[$doc:meta])* $variant:ident($ty:ty) = $name:literal, )*) => {
        /// One audit event: its name is [`Event::name`], its fields the variant's struct.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Event {
            $( $(#[$doc])* $variant($ty), )*
        }

        impl Event {
            /// Every event name, in the order of the list.
            pub const NAMES: &'static [&'static str] = &[$($name),*];

            /// The event's name (`session.start`, ...), the log's `event` key.
            pub fn name(&self) -> &'static str {
                match self {
                    $( Self::$variant(_) => $name, )*
                }
            }

            fn to_value(&self) -> Result<Value, serde_json::Error> {
                match self {
                    $( Self::$variant(e) => serde_json::to_value(e), )*
                }
            }

            /// Read an event back from its name and fields (the log line without `v`, `seq`,
            /// `id`, `time`, `event` and `prev`).
            pub fn from_name_and_fields(name: &str, fields: Map<String, Value>) -> Result<Event, serde_json::Error> {
                match name {
                    $( $name => serde_json::from_value(Value::Object(fields)).map(Self::$variant), )*
                    other => Err(serde::de::Error::custom(format!("unknown audit event {other:?}"))),
                }
            }
        }
    };
}

events! {
    GatewayStarted(GatewayStarted) = "gateway.started",
    GatewayStopped(GatewayStopped) = "gateway.stopped",
    /// Free space for recordings fell below `[audit] min_free_space` (once per episode).
    GatewayDiskLow(GatewayDiskLow) = "gateway.disk_low",
    /// A session could not be written to the session history (once per episode).
    GatewayHistoryFailed(GatewayHistoryFailed) = "gateway.history_failed",
    TokenCreated(TokenCreated) = "token.created",
    TokenRevoked(TokenRevoked) = "token.revoked",
    AgentEnrolled(AgentEnrolled) = "agent.enrolled",
    AgentEnrollRefused(AgentEnrollRefused) = "agent.enroll_refused",
    AgentConnected(AgentConnected) = "agent.connected",
    AgentDisconnected(AgentDisconnected) = "agent.disconnected",
    AgentRefused(AgentRefused) = "agent.refused",
    AgentRenewed(AgentRenewed) = "agent.renewed",
    AgentRevoked(AgentRevoked) = "agent.revoked",
    AgentBulkEnrolled(AgentBulkEnrolled) = "agent.bulk_enrolled",
    AgentProtocolViolation(AgentProtocolViolation) = "agent.protocol_violation",
    AuthFailed(AuthFailed) = "auth.failed",
    /// `postern login`: the identity provider vouched for the user and a certificate was issued.
    LoginSucceeded(LoginSucceeded) = "login.succeeded",
    /// `postern login` was refused (bad or forged token, not allowed, disabled user, ...).
    LoginFailed(LoginFailed) = "login.failed",
    /// `postern logout`: the certificate the client came in with was revoked.
    Logout(Logout) = "logout",
    /// A browser signed in to the web console (with a `postern web-login` link).
    WebSignin(WebSignin) = "web.signin",
    SessionAuthorized(SessionAuthorized) = "session.authorized",
    SessionStart(SessionStart) = "session.start",
    SessionEnd(SessionEnd) = "session.end",
    SessionDenied(SessionDenied) = "session.denied",
    SessionTerminated(SessionTerminated) = "session.terminated",
    /// An administrator began watching a live session in the web console (read-only).
    SessionWatchStart(SessionWatchStart) = "session.watch.start",
    /// ... and stopped.
    SessionWatchEnd(SessionWatchEnd) = "session.watch.end",
    ForwardOpen(ForwardOpen) = "forward.open",
    ForwardClose(ForwardClose) = "forward.close",
    ForwardFailed(ForwardFailed) = "forward.failed",
    /// `ssh -J`: the same fields as a forward.
    PassthroughOpen(ForwardOpen) = "passthrough.open",
    PassthroughClose(ForwardClose) = "passthrough.close",
    RdpTokenIssued(RdpTokenIssued) = "rdp.token_issued",
    RdpOpen(RdpOpen) = "rdp.open",
    RdpClose(RdpClose) = "rdp.close",
    RdpFailed(RdpFailed) = "rdp.failed",
    RunStart(RunStart) = "run.start",
    RunEnd(RunEnd) = "run.end",
    PolicyChanged(PolicyChanged) = "policy.changed",
    GrantCreated(GrantCreated) = "grant.created",
    GrantRevoked(GrantRevoked) = "grant.revoked",
    /// A grant reached its expiry while the gateway ran (written by the enforcer).
    GrantExpired(GrantExpired) = "grant.expired",
    AdminAction(AdminAction) = "admin.action",
    /// gateway.toml was read again (SIGHUP or `postern reload`) and what could change live did.
    ConfigReloaded(ConfigReloaded) = "config.reloaded",
    /// A reload found the file unreadable or invalid; nothing changed.
    ConfigReloadFailed(ConfigReloadFailed) = "config.reload_failed",
    /// Written by the log itself ([`super::AuditLog`]), never through [`super::AuditLog::event`].
    AuditCheckpoint(AuditCheckpoint) = "audit.checkpoint",
    AuditRetention(AuditRetention) = "audit.retention",
    AuditTruncated(AuditTruncated) = "audit.truncated",
    AuditSink(AuditSink) = "audit.sink",
}

impl Event {
    /// The event's fields, as they go into its log line next to the envelope.
    pub fn fields(&self) -> Result<Map<String, Value>, serde_json::Error> {
        match self.to_value()? {
            Value::Object(m) => Ok(m),
            // Every event type is a struct (or an enum of structs), so this does not happen;
            // an error is still better than a line without fields.
            other => Err(serde::ser::Error::custom(format!("audit event fields are not an object: {other}"))),
        }
    }
}

#[cfg(test)]
mod tests;
