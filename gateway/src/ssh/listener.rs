//! The SSH door's accept loop: one russh session per TCP connection, ended at shutdown.

use std::sync::Arc;
use std::time::Duration;

use postern_tunnel::CancellationToken;
use tokio::net::TcpListener;
use tracing::{Instrument, debug, info_span, warn};

use super::handler::{ConnHandler, run_connection};
use super::settings::{Throttle, server_config};
use crate::services::Services;

/// Accept SSH connections until `shutdown`.
pub async fn serve(listener: TcpListener, state: Arc<Services>, shutdown: CancellationToken) {
    let config = Arc::new(server_config(&state, state.host_keys.certificate.clone()));
    let throttle = Arc::new(Throttle::default());
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => { warn!(error = %e, "ssh accept failed"); continue; }
            },
        };
        let _ = stream.set_nodelay(true);
        if throttle.is_blocked(peer.ip()) {
            debug!(%peer, "refusing connection from a throttled source");
            continue;
        }
        // On the connection table (by user once authenticated): closed when the user is
        // disabled or removed.
        let conn = Arc::new(state.connections.open());
        let handler = ConnHandler::new(state.clone(), throttle.clone(), peer, None, conn.clone());
        let config = config.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(
            async move {
                match russh::server::run_stream(config, stream, handler).await {
                    Ok(session) => run_connection(session, &conn, &shutdown).await,
                    Err(e) => debug!(error = %e, "ssh handshake failed"),
                }
            }
            .instrument(info_span!("ssh", %peer)),
        );
    }
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(3), tasks.wait()).await;
}
