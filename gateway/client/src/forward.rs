//! Local port forwards through the gateway: every accepted local connection is its own
//! SSH channel on one connection to `user%instance`, reconnected when it drops.
//!
//! Nothing here prints: what happens is reported as [`ForwardEvent`]s to a callback, and the
//! counts are in [`ForwardStats`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

use crate::connect::{Client, ClientOptions};
use crate::error::ClientError;

/// `LPORT:PORT` (the instance itself) or `LPORT:HOST:PORT` (a host the instance can reach).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardSpec {
    pub local: u16,
    pub host: String,
    pub port: u16,
}

impl std::str::FromStr for ForwardSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: expected LOCAL_PORT:PORT or LOCAL_PORT:HOST:PORT");
        let (local, rest) = s.split_once(':').ok_or_else(bad)?;
        let local: u16 = local.parse().map_err(|_| bad())?;
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h.trim_start_matches('[').trim_end_matches(']').to_owned(), p),
            None => ("localhost".to_owned(), rest),
        };
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        Ok(ForwardSpec { local, host, port })
    }
}

/// Counts over all forwards of one [`serve_forwards`], updated as bytes move (so they are
/// right even for connections still open when it stops).
#[derive(Debug, Default)]
pub struct ForwardStats {
    pub connections: AtomicU64,
    pub failed: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
}

impl ForwardStats {
    /// `N connection(s), N failed; N bytes sent, N received`.
    pub fn summary(&self) -> String {
        format!(
            "{} connection(s), {} failed; {} bytes sent, {} received",
            self.connections.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.bytes_up.load(Ordering::Relaxed),
            self.bytes_down.load(Ordering::Relaxed),
        )
    }
}

/// One SSH connection to `user%instance`, reconnected when it drops.
pub struct Connection {
    opts: ClientOptions,
    instance: String,
    current: Mutex<Arc<Client>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("instance", &self.instance).finish_non_exhaustive()
    }
}

impl Connection {
    pub async fn open(opts: &ClientOptions, instance: &str) -> Result<Connection, ClientError> {
        let client = Client::connect(opts, Some(instance)).await?;
        Ok(Connection { opts: opts.clone(), instance: instance.to_owned(), current: Mutex::new(Arc::new(client)) })
    }

    /// The instance this connection goes to.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The live client, reconnecting first if the connection has ended.
    pub async fn client(&self) -> Result<Arc<Client>, ClientError> {
        self.client_noting(|| {}).await
    }

    /// As [`Connection::client`], calling `reconnecting` before a reconnect.
    async fn client_noting(&self, reconnecting: impl FnOnce()) -> Result<Arc<Client>, ClientError> {
        let mut guard = self.current.lock().await;
        if guard.is_closed() {
            reconnecting();
            *guard = Arc::new(Client::connect(&self.opts, Some(&self.instance)).await?);
        }
        Ok(guard.clone())
    }
}

/// What a local forward connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `host:port` as the instance sees it.
    Tcp(String, u16),
    /// The instance's RDP server.
    Rdp,
}

/// What [`serve_forwards`] reports as it goes.
#[derive(Debug)]
#[non_exhaustive]
pub enum ForwardEvent {
    /// A forward listens on `local` (the bound address: port 0 resolved).
    Listening { local: SocketAddr, instance: String, target: Target },
    /// Every forward listens; connections are carried until shutdown.
    Forwarding,
    /// The SSH connection had ended; a new one is being made for the next local connection.
    Reconnecting,
    /// A local connection from `peer` could not be carried (counted as failed).
    Refused { peer: SocketAddr, error: ClientError },
}

/// Listen on each `(bind, target)` and carry every accepted connection over its own SSH
/// channel, until `shutdown` completes; then return the counts. Connections still open at
/// shutdown are dropped (their channels close).
pub async fn serve_forwards(
    conn: Arc<Connection>,
    forwards: Vec<(SocketAddr, Target)>,
    events: impl Fn(ForwardEvent) + Send + Sync + 'static,
    shutdown: impl Future<Output = ()>,
) -> Result<Arc<ForwardStats>, ClientError> {
    let events = Arc::new(events);
    let stats = Arc::new(ForwardStats::default());
    let mut listeners = Vec::new();
    for (bind, target) in forwards {
        let listen_error = |source| ClientError::Listen { address: bind, source };
        let l = tokio::net::TcpListener::bind(bind).await.map_err(listen_error)?;
        let local = l.local_addr().map_err(listen_error)?;
        events(ForwardEvent::Listening { local, instance: conn.instance.clone(), target: target.clone() });
        listeners.push((l, target));
    }
    events(ForwardEvent::Forwarding);
    let mut tasks = tokio::task::JoinSet::new();
    for (l, target) in listeners {
        let (conn, stats, events) = (conn.clone(), stats.clone(), events.clone());
        tasks.spawn(async move {
            // Connection tasks are children of this one: aborting it at shutdown ends them.
            let mut carried = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, peer)) = l.accept().await else { continue };
                let _ = tcp.set_nodelay(true);
                let (conn, stats, events, target) = (conn.clone(), stats.clone(), events.clone(), target.clone());
                carried.spawn(async move {
                    let stream = match conn.client_noting(|| events(ForwardEvent::Reconnecting)).await {
                        Ok(c) => match &target {
                            Target::Tcp(h, p) => c.open_tcp(h, *p).await,
                            Target::Rdp => c.open_rdp().await,
                        },
                        Err(e) => Err(e),
                    };
                    let stream = match stream {
                        Ok(s) => s,
                        Err(error) => {
                            stats.failed.fetch_add(1, Ordering::Relaxed);
                            events(ForwardEvent::Refused { peer, error });
                            return;
                        }
                    };
                    stats.connections.fetch_add(1, Ordering::Relaxed);
                    let (tcp_read, tcp_write) = tcp.into_split();
                    let (ch_read, ch_write) = tokio::io::split(stream);
                    tokio::join!(
                        pipe(tcp_read, ch_write, &stats.bytes_up),
                        pipe(ch_read, tcp_write, &stats.bytes_down)
                    );
                });
                // Reap finished connections so the set stays as large as what is open.
                while carried.try_join_next().is_some() {}
            }
        });
    }
    shutdown.await;
    tasks.abort_all();
    Ok(stats)
}

/// Copy until end of input, counting as it goes (the summary is right even for
/// connections still open at shutdown), then pass the end on.
async fn pipe(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    counter: &AtomicU64,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(buf.get(..n).unwrap_or_default()).await.is_err() {
                    break;
                }
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn forward_specs() {
        let f: ForwardSpec = "8080:80".parse().unwrap();
        assert_eq!(f, ForwardSpec { local: 8080, host: "localhost".into(), port: 80 });
        let f: ForwardSpec = "5432:db.internal:5432".parse().unwrap();
        assert_eq!((f.host.as_str(), f.port), ("db.internal", 5432));
        let f: ForwardSpec = "9000:[::1]:90".parse().unwrap();
        assert_eq!(f.host, "::1");
        for bad in ["8080", "x:80", "8080:", "8080:host:", "8080:host:0", "70000:80"] {
            assert!(bad.parse::<ForwardSpec>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn pipe_counts_and_passes_the_end_on() {
        let (mut a, b) = tokio::io::duplex(64);
        let (c, mut d) = tokio::io::duplex(64);
        let counter = AtomicU64::new(0);
        a.write_all(b"hello").await.unwrap();
        drop(a);
        pipe(b, c, &counter).await;
        let mut got = Vec::new();
        d.read_to_end(&mut got).await.unwrap();
        assert_eq!((got.as_slice(), counter.load(Ordering::Relaxed)), (&b"hello"[..], 5));
    }
}
