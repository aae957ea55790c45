//! The session broker: the one lifecycle every door hands its sessions to.
//!
//! ```text
//! door:    authorize (access::Authorizer) -> Broker::open -> Broker::start -> relay -> Running::finish
//! broker:                                   tunnel stream    start event,      (door)   end event with
//!                                           to exactly the   live table                  duration, off the
//!                                           authorized agent                             live table
//! ```
//!
//! Doors differ only in how bytes reach the client (an SSH channel, a TCP socket, the admin
//! socket). A session is on the live table — where `postern sessions` lists it, the
//! enforcer re-checks it and `sessions terminate` ends it — from its start event to its end
//! event, however the door's relay ends (the registration is dropped on every path). The
//! broker also writes each session to the session history ([`crate::history`]) as it
//! starts and ends, so every door's sessions are there, recorded or not.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use postern_proto::SessionRequest;
use postern_tunnel::server::{AgentRegistry, OpenError, SessionStream};

use crate::access::Authorization;
use crate::audit::AuditLog;
use crate::audit::events::{Event, SessionStart};
use crate::history::SessionHistory;
use crate::locations::AgentLocations;
use crate::metrics::Door;
use crate::sessions::{LiveSession, Party, Registration, SessionTable};
use crate::store::{AgentRecord, SessionRecord};

/// Why sessions whose content the gateway cannot see are marked `logged: false`.
pub mod unlogged {
    pub const RDP: &str = "RDP content is end-to-end encrypted (TLS/CredSSP)";
    pub const PASSTHROUGH: &str = "end-to-end encrypted SSH passthrough";
    pub const FORWARD: &str = "forwarded TCP content is not inspected";
}

#[derive(Debug)]
pub struct Broker {
    registry: AgentRegistry,
    sessions: Arc<SessionTable>,
    audit: Arc<AuditLog>,
    history: Arc<SessionHistory>,
    /// In a cluster: the way to agents connected to other gateways.
    peering: Option<Arc<crate::peering::Peering>>,
    /// Where agents not connected here are (cluster mode): their gateway is asked first.
    locations: Option<Arc<AgentLocations>>,
}

impl Broker {
    pub fn new(
        registry: AgentRegistry,
        sessions: Arc<SessionTable>,
        audit: Arc<AuditLog>,
        history: Arc<SessionHistory>,
    ) -> Self {
        Broker { registry, sessions, audit, history, peering: None, locations: None }
    }

    /// Reach agents that are not connected here through the cluster's other gateways.
    pub fn with_peering(mut self, peering: Option<Arc<crate::peering::Peering>>) -> Self {
        self.peering = peering;
        self
    }

    pub fn peering(&self) -> Option<&Arc<crate::peering::Peering>> {
        self.peering.as_ref()
    }

    /// Name the gateway an agent is connected to when it is another one of the cluster.
    pub fn with_locations(mut self, locations: Arc<AgentLocations>) -> Self {
        self.locations = Some(locations);
        self
    }

    /// A stream to `agent_id`: here if it is connected here, else (in a cluster) through the
    /// gateway the store says it is connected to (asked first), or any live gateway that has it.
    async fn open_to(&self, agent_id: &str, request: SessionRequest) -> Result<SessionStream, OpenError> {
        match &self.peering {
            Some(peering) if !self.registry.is_connected(agent_id) => {
                let hint = match &self.locations {
                    Some(locations) => locations.elsewhere(agent_id).await,
                    None => None,
                };
                peering.open(agent_id, hint.as_deref(), request).await
            }
            _ => self.registry.open_session(agent_id, request).await,
        }
    }

    /// Open a tunnel stream to the authorized agent, asking it for `request`. The agent id
    /// comes from the authorization only, so a door cannot dial another instance.
    pub async fn open(&self, authz: &Authorization, request: SessionRequest) -> Result<SessionStream, OpenError> {
        self.open_to(authz.agent_id(), request).await
    }

    /// Open a stream for an administrator on the admin socket (no policy applies there:
    /// the socket only admits the gateway's own user and root).
    pub async fn open_for_admin(
        &self,
        agent: &AgentRecord,
        request: SessionRequest,
    ) -> Result<SessionStream, OpenError> {
        self.open_to(&agent.id, request).await
    }

    /// Write the session's start event, put it on the live table and in the history.
    pub fn start(&self, session_id: &str, party: Party, event: &Event) -> Running {
        let _ = self.audit.event(event);
        let record = SessionRecord {
            id: session_id.to_owned(),
            user: party.user.clone(),
            source: party.source.map(|ip| ip.to_string()),
            instance: party.target.clone(),
            agent_id: party.agent_id.clone(),
            kind: party.action.name().to_owned(),
            door: String::new(),
            command: None,
            destination: party.destination.as_ref().map(|(h, p)| format!("{h}:{p}")),
            started_ms: jiff::Timestamp::now().as_millisecond(),
            ended_at: None,
            end_reason: None,
            exit_code: None,
            bytes_in: 0,
            bytes_out: 0,
            logged: party.logged,
            unlogged_reason: None,
            recording: None,
            gateway: None,
        };
        let door = match event {
            Event::SessionStart(SessionStart::Ssh(s)) if s.door.as_deref() == Some("web") => Door::Web,
            Event::SessionStart(SessionStart::AdminSocket(_)) => Door::Admin,
            _ if party.action == postern_core::Action::Rdp => Door::Rdp,
            _ => Door::Ssh,
        };
        let registration = self.sessions.register_through(session_id, party, door);
        self.history.started(record, event);
        Running { registration, started: Instant::now(), audit: self.audit.clone(), history: self.history.clone() }
    }
}

/// A session on the live table, from its start event to its end event (preceded by its
/// `session.terminated` event when an administrator or the enforcer ended it).
pub struct Running {
    registration: Registration,
    started: Instant,
    audit: Arc<AuditLog>,
    history: Arc<SessionHistory>,
}

impl Running {
    /// The live entry: byte counters, termination.
    pub fn live(&self) -> &Arc<LiveSession> {
        &self.registration.session
    }

    /// When the session started (for its limits).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Write the end event `end` builds from the session's duration (`duration_ms`), and
    /// take the session off the table.
    pub fn finish(self, end: impl FnOnce(u64) -> Event) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        // Who ended it is recorded now that it has ended (not when it was asked to end).
        if let Some(terminated) = self.registration.session.take_terminated_event() {
            let _ = self.audit.event(&terminated);
        }
        let end = end(ms);
        let _ = self.audit.event(&end);
        let live = &self.registration.session;
        let counted = (live.bytes_in.load(Ordering::Relaxed), live.bytes_out.load(Ordering::Relaxed));
        self.history.ended(&live.id, postern_core::util::now_unix(), &end, counted);
        drop(self.registration);
    }
}
