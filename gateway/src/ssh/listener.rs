//! The SSH door's accept loop: one russh session per TCP connection, ended at shutdown.
//! Connections that have not authenticated are capped (in all and per source address) and
//! must authenticate within the login grace time; accept errors back off.

use std::sync::Arc;
use std::time::Duration;

use postern_tunnel::CancellationToken;
use tokio::net::TcpListener;
use tracing::{Instrument, debug, info_span};

use super::handler::{ConnHandler, run_connection};
use super::settings::server_config;
use super::startups::{LoginDeadline, Startups};
use super::throttle::{AuthThrottle, Caps};
use crate::accept::{AcceptBackoff, Full};
use crate::services::Services;

/// Accept SSH connections until `shutdown`.
pub async fn serve(listener: TcpListener, state: Arc<Services>, shutdown: CancellationToken) {
    let config = Arc::new(server_config(&state, state.host_keys.certificate.clone()));
    let caps = state.config.ssh_auth_delays().map(|(per_user, per_source)| Caps { per_user, per_source });
    let throttle = Arc::new(AuthThrottle::new(caps));
    let ssh = &state.config.ssh;
    let startups = Startups::new(ssh.max_startups, ssh.max_startups_per_source);
    let grace = state.config.ssh_login_grace_time();
    let mut backoff = AcceptBackoff::default();
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => { backoff.reset(); s }
                Err(e) => { backoff.failed("ssh", &e).await; continue; }
            },
        };
        let startup = match startups.admit(peer.ip()) {
            Ok(s) => s,
            Err(full) => {
                // Closed at once (dropping the stream), before any work is spent on it.
                let (cap, limit) = match full {
                    Full::Total => ("max_startups", ssh.max_startups),
                    Full::Source => ("max_startups_per_source", ssh.max_startups_per_source),
                };
                postern_tunnel::warn_limited!(%peer, cap, limit, "too many unauthenticated ssh connections; closing new ones");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let login = grace.map(|g| LoginDeadline::new(tokio::time::Instant::now() + g, &startup, &stream));
        // On the connection table (by user once authenticated): closed when the user is
        // disabled or removed.
        let conn = Arc::new(state.connections.open());
        let handler = ConnHandler::new(state.clone(), throttle.clone(), peer, None, conn.clone()).with_startup(startup);
        let config = config.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(
            async move {
                // The version exchange too must finish within the grace time.
                let handshake = russh::server::run_stream(config, stream, handler);
                let result = match &login {
                    Some(l) => match tokio::time::timeout_at(l.deadline(), handshake).await {
                        Ok(r) => r,
                        Err(_) => return debug!("no ssh version exchange within the login grace time; closing"),
                    },
                    None => handshake.await,
                };
                match result {
                    Ok(session) => run_connection(session, &conn, &shutdown, login).await,
                    Err(e) => debug!(error = %e, "ssh handshake failed"),
                }
            }
            .instrument(info_span!("ssh", %peer)),
        );
    }
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(3), tasks.wait()).await;
}
