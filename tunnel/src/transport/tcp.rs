//! The TCP transport: HTTP/2 over TLS 1.3 over one TCP connection (docs/protocol.md
//! "Transports").
//!
//! The agent dials, as on QUIC, and TLS is the same mutual TLS with the same ALPN. On top,
//! the roles are turned round: the **gateway is the HTTP/2 client**, because it is the side
//! that opens streams (one per session), and the agent serves them. HTTP/2 lets only the
//! client open streams, so right after the handshake the gateway opens two for the agent:
//!
//! - `/postern/lifeline`: carries at most one close message each way
//!   (`u32` code, big-endian, then the reason in UTF-8; at most [`MAX_REASON`] bytes), so a
//!   close says why with the same codes as QUIC's application close;
//! - `/postern/first`: the agent's own stream (the control stream of a tunnel connection,
//!   or the one exchange of an enrollment), which the agent's `open_bi` returns.
//!
//! Every later stream is `/postern/stream`, opened by the gateway. A stream ends with
//! END_STREAM (a finish) or RST_STREAM (a reset), which the reader tells apart. Flow control
//! is HTTP/2's, per stream and per connection, with windows sized for a long fat link
//! ([`STREAM_WINDOW`], [`CONNECTION_WINDOW`]). The agent pings every keep-alive interval
//! and drops a connection whose pings go unanswered for the idle timeout (through a proxy,
//! TCP keep-alives only cover the first hop); the gateway relies on TCP keep-alives and
//! `TCP_USER_TIMEOUT` set to the same timers.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::{Closed, RecvStream as AnyRecv, SendStream as AnySend};
use crate::tls::TransportTimers;

const LIFELINE: &str = "https://postern-gateway/postern/lifeline";
const FIRST: &str = "https://postern-gateway/postern/first";
const STREAM: &str = "https://postern-gateway/postern/stream";

/// Most bytes of a close reason on the lifeline.
pub const MAX_REASON: usize = 1024;
/// Receive window of one stream: a stream moves at most this much per round trip, so 16 MiB
/// keeps one stream above 300 MiB/s at 50 ms. A limit, not an allocation: only data the
/// reader has not taken yet is held.
pub const STREAM_WINDOW: u32 = 16 << 20;
/// Receive window of a whole connection (every stream together).
pub const CONNECTION_WINDOW: u32 = 64 << 20;
/// Largest HTTP/2 frame either side accepts: fewer frames per megabyte than the 16 KiB
/// default, still small enough to interleave streams.
const MAX_FRAME: u32 = 64 << 10;
/// Data one stream may have queued for sending beyond what the socket took.
const SEND_BUFFER: usize = 1 << 20;
/// Streams the agent has accepted but not yet handed to a session.
const INBOUND_QUEUE: usize = 32;
/// After a close, how long the connection is still driven so the close message gets out.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Largest chunk handed to HTTP/2 in one piece by `poll_write`.
const MAX_WRITE: usize = 256 << 10;

type Tls<S> = tokio_rustls::TlsStream<S>;

static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

/// Set TCP keep-alives and a user timeout from the tunnel's timers, so a peer that vanished
/// (a crash sends nothing) is noticed as on QUIC.
pub fn tune_socket(tcp: &TcpStream, timers: TransportTimers) {
    let sock = socket2::SockRef::from(tcp);
    let keepalive =
        socket2::TcpKeepalive::new().with_time(timers.keep_alive).with_interval(Duration::from_secs(2)).with_retries(3);
    let _ = sock.set_tcp_keepalive(&keepalive);
    let _ = sock.set_tcp_user_timeout(Some(timers.idle_timeout));
    let _ = tcp.set_nodelay(true);
}

fn h2_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("connection error"));
    }
    if e.is_reset() {
        return io::Error::new(io::ErrorKind::ConnectionReset, format!("stream reset by peer ({e})"));
    }
    io::Error::other(e)
}

fn connection_gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the connection is closed")
}

/// One TCP-transport connection. Cheap to clone.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

struct Inner {
    id: usize,
    remote: SocketAddr,
    peer_cert: Option<CertificateDer<'static>>,
    alpn: Option<Vec<u8>>,
    /// Gateway side: opens streams.
    opener: Option<h2::client::SendRequest<Bytes>>,
    /// The agent's own stream, until taken (by the agent's `open_bi` or the gateway's
    /// `accept_bi`).
    first: Mutex<Option<(AnySend, AnyRecv)>>,
    /// Agent side: streams the gateway opened.
    inbound: tokio::sync::Mutex<Option<mpsc::Receiver<(AnySend, AnyRecv)>>>,
    lifeline: Mutex<Option<h2::SendStream<Bytes>>>,
    state: watch::Sender<Option<Closed>>,
    stop: CancellationToken,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("tcp::Connection").field("id", &self.inner.id).field("remote", &self.inner.remote).finish()
    }
}

impl Connection {
    fn new(
        remote: SocketAddr,
        peer_cert: Option<CertificateDer<'static>>,
        alpn: Option<Vec<u8>>,
        opener: Option<h2::client::SendRequest<Bytes>>,
        first: (AnySend, AnyRecv),
        inbound: Option<mpsc::Receiver<(AnySend, AnyRecv)>>,
        lifeline: h2::SendStream<Bytes>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                remote,
                peer_cert,
                alpn,
                opener,
                first: Mutex::new(Some(first)),
                inbound: tokio::sync::Mutex::new(inbound),
                lifeline: Mutex::new(Some(lifeline)),
                state: watch::Sender::new(None),
                stop: CancellationToken::new(),
            }),
        }
    }

    pub fn stable_id(&self) -> usize {
        self.inner.id
    }
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.remote
    }
    pub fn peer_certificate(&self) -> Option<CertificateDer<'static>> {
        self.inner.peer_cert.clone()
    }
    pub fn alpn(&self) -> Option<Vec<u8>> {
        self.inner.alpn.clone()
    }

    fn take_first(&self) -> Option<(AnySend, AnyRecv)> {
        self.inner.first.lock().ok().and_then(|mut f| f.take())
    }

    pub(super) async fn open_bi(&self) -> io::Result<(AnySend, AnyRecv)> {
        let Some(opener) = self.inner.opener.clone() else {
            // The agent's one stream of its own.
            return self.take_first().ok_or_else(|| {
                io::Error::new(io::ErrorKind::Unsupported, "on the TCP transport only the gateway opens streams")
            });
        };
        if self.close_reason().is_some() {
            return Err(connection_gone());
        }
        let mut ready = tokio::select! {
            r = opener.ready() => r.map_err(h2_error)?,
            _ = self.inner.stop.cancelled() => return Err(connection_gone()),
        };
        let (response, send) = ready.send_request(request(STREAM), false).map_err(h2_error)?;
        Ok((AnySend::Tcp(SendStream::new(send)), AnyRecv::Tcp(RecvStream::waiting(response))))
    }

    pub(super) async fn accept_bi(&self) -> io::Result<(AnySend, AnyRecv)> {
        let mut inbound = self.inner.inbound.lock().await;
        let Some(rx) = inbound.as_mut() else {
            drop(inbound);
            // Gateway side: the agent's stream once, then nothing until the end.
            if let Some(first) = self.take_first() {
                return Ok(first);
            }
            let closed = self.closed().await;
            return Err(io::Error::new(io::ErrorKind::NotConnected, closed.to_string()));
        };
        tokio::select! {
            s = rx.recv() => s.ok_or_else(connection_gone),
            _ = self.inner.stop.cancelled() => Err(connection_gone()),
        }
    }

    /// Close with `code` and `reason`: the close message goes out on the lifeline, and the
    /// connection is driven [`CLOSE_GRACE`] longer for it to arrive.
    pub fn close(&self, code: u32, reason: &[u8]) {
        let reason = reason.get(..reason.len().min(MAX_REASON)).unwrap_or_default();
        let mut first = true;
        self.inner.state.send_if_modified(|s| {
            if s.is_some() {
                first = false;
                return false;
            }
            *s =
                Some(Closed { code: Some(code), by_peer: false, reason: String::from_utf8_lossy(reason).into_owned() });
            true
        });
        // The lifeline's sending half stays in place: dropped, with the receiving half gone
        // too, it would reset the stream and could take the queued message with it.
        if first
            && let Ok(mut guard) = self.inner.lifeline.lock()
            && let Some(lifeline) = guard.as_mut()
        {
            let mut message = BytesMut::with_capacity(4 + reason.len());
            message.extend_from_slice(&code.to_be_bytes());
            message.extend_from_slice(reason);
            lifeline.reserve_capacity(message.len());
            let _ = lifeline.send_data(message.freeze(), true);
        }
        self.inner.stop.cancel();
    }

    pub async fn closed(&self) -> Closed {
        let mut rx = self.inner.state.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(c) => c.clone().unwrap_or_else(|| lost("closed")),
            Err(_) => lost("closed"),
        }
    }

    pub fn close_reason(&self) -> Option<Closed> {
        self.inner.state.borrow().clone()
    }

    /// Record how the connection ended, unless that is already known.
    fn ended(&self, how: Closed) {
        self.inner.state.send_if_modified(|s| {
            if s.is_some() {
                return false;
            }
            *s = Some(how);
            true
        });
        self.inner.stop.cancel();
    }
}

fn lost(reason: impl Into<String>) -> Closed {
    Closed { code: None, by_peer: true, reason: reason.into() }
}

fn request(uri: &'static str) -> http::Request<()> {
    let mut req = http::Request::new(());
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::from_static(uri);
    req
}

/// Read the other side's close message from its half of the lifeline. Completes when the
/// lifeline ends: with the message, or as a lost connection.
async fn read_close(mut recv: RecvStream) -> Closed {
    let mut message = Vec::new();
    loop {
        match recv.read_chunk().await {
            Ok(Some(chunk)) => {
                if message.len() + chunk.len() > 4 + MAX_REASON {
                    return lost("oversized close message");
                }
                message.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => return lost(e.to_string()),
        }
    }
    match message.split_first_chunk::<4>() {
        Some((code, reason)) => Closed {
            code: Some(u32::from_be_bytes(*code)),
            by_peer: true,
            reason: String::from_utf8_lossy(reason).into_owned(),
        },
        None => lost("the peer closed the connection"),
    }
}

/// Gateway side: TLS is done (the caller checked ALPN and timed it); set up HTTP/2 as the
/// client and open the two set-up streams. The caller bounds this with a timeout.
pub async fn accept(tls: tokio_rustls::server::TlsStream<TcpStream>, remote: SocketAddr) -> io::Result<Connection> {
    let (_, session) = tls.get_ref();
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    let peer_cert = session.peer_certificates().and_then(|c| c.first()).map(|c| c.clone().into_owned());
    let (opener, conn) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        // The agent never opens streams of its own (HTTP/2 servers cannot), nor pushes.
        .max_concurrent_streams(0)
        .enable_push(false)
        .handshake::<_, Bytes>(Tls::from(tls))
        .await
        .map_err(h2_error)?;
    let mut opener = opener.ready().await.map_err(h2_error)?;
    let (lifeline_response, lifeline) = opener.send_request(request(LIFELINE), false).map_err(h2_error)?;
    let (first_response, first_send) = opener.send_request(request(FIRST), false).map_err(h2_error)?;
    let first = (AnySend::Tcp(SendStream::new(first_send)), AnyRecv::Tcp(RecvStream::waiting(first_response)));
    let connection = Connection::new(remote, peer_cert, alpn, Some(opener), first, None, lifeline);
    let handle = connection.clone();
    tokio::spawn(async move {
        let mut conn = conn;
        // Kept until the connection is gone, so that a close message of ours is not
        // followed by a reset of the lifeline.
        let peer_close = read_close(RecvStream::waiting(lifeline_response));
        tokio::pin!(peer_close);
        let how = tokio::select! {
            r = &mut conn => match r {
                Ok(()) => lost("the agent closed the connection"),
                Err(e) => lost(e.to_string()),
            },
            closed = &mut peer_close => closed,
            () = handle.inner.stop.cancelled() => {
                let _ = tokio::time::timeout(CLOSE_GRACE, &mut conn).await;
                lost("closed")
            }
        };
        debug!(remote = %handle.inner.remote, how = %how, "tcp tunnel connection ended");
        handle.ended(how);
    });
    Ok(connection)
}

/// Agent side: over `io` (a TCP stream to the gateway, perhaps through a proxy), do TLS as
/// `tls` says, then serve HTTP/2 and take the two set-up streams. The caller bounds this
/// with a timeout.
pub async fn connect(
    tcp: TcpStream,
    remote: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    server_name: &str,
    timers: TransportTimers,
    sessions: u32,
) -> io::Result<Connection> {
    let name = ServerName::try_from(server_name.to_owned()).map_err(|e| io::Error::other(e.to_string()))?;
    let tls = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await?;
    let (_, session) = tls.get_ref();
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    let peer_cert = session.peer_certificates().and_then(|c| c.first()).map(|c| c.clone().into_owned());
    let mut conn = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        // The sessions the gateway may open at once (one past the agent's limit, which the
        // agent refuses with a reason, as on QUIC), plus the two set-up streams.
        .max_concurrent_streams(sessions.saturating_add(3))
        .handshake::<_, Bytes>(Tls::from(tls))
        .await
        .map_err(h2_error)?;
    let mut lifeline = None;
    let mut first = None;
    while lifeline.is_none() || first.is_none() {
        let (req, mut respond) = conn.accept().await.ok_or_else(connection_gone)?.map_err(h2_error)?;
        let path = req.uri().path().to_owned();
        let send = respond.send_response(http::Response::new(()), false).map_err(h2_error)?;
        let recv = RecvStream::open(req.into_body());
        match path.as_str() {
            "/postern/lifeline" if lifeline.is_none() => lifeline = Some((send, recv)),
            "/postern/first" if first.is_none() => {
                first = Some((AnySend::Tcp(SendStream::new(send)), AnyRecv::Tcp(recv)));
            }
            other => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected set-up stream {other}")));
            }
        }
    }
    let (Some((lifeline_send, lifeline_recv)), Some(first)) = (lifeline, first) else {
        return Err(connection_gone());
    };
    let ping = conn.ping_pong();
    let (tx, rx) = mpsc::channel(INBOUND_QUEUE);
    let connection = Connection::new(remote, peer_cert, alpn, None, first, Some(rx), lifeline_send);
    let handle = connection.clone();
    tokio::spawn(async move {
        let peer_close = read_close(lifeline_recv);
        tokio::pin!(peer_close);
        let how = tokio::select! {
            how = serve_streams(&mut conn, &tx) => how,
            closed = &mut peer_close => closed,
            how = keep_alive(ping, timers) => how,
            () = handle.inner.stop.cancelled() => {
                conn.graceful_shutdown();
                let _ = tokio::time::timeout(CLOSE_GRACE, std::future::poll_fn(|cx| conn.poll_closed(cx))).await;
                lost("closed")
            }
        };
        debug!(how = %how, "tcp tunnel connection ended");
        handle.ended(how);
    });
    Ok(connection)
}

/// Agent side: hand each stream the gateway opens to `accept_bi`, until the connection ends.
async fn serve_streams(
    conn: &mut h2::server::Connection<Tls<TcpStream>, Bytes>,
    tx: &mpsc::Sender<(AnySend, AnyRecv)>,
) -> Closed {
    loop {
        match conn.accept().await {
            Some(Ok((req, mut respond))) => {
                if req.uri().path() != "/postern/stream" {
                    respond.send_reset(h2::Reason::PROTOCOL_ERROR);
                    continue;
                }
                let Ok(send) = respond.send_response(http::Response::new(()), false) else { continue };
                let stream = (AnySend::Tcp(SendStream::new(send)), AnyRecv::Tcp(RecvStream::open(req.into_body())));
                if let Err(mpsc::error::TrySendError::Full((mut send, _))) = tx.try_send(stream) {
                    // Nobody is taking streams fast enough: refuse this one, as QUIC's stream
                    // limit would have.
                    send.reset(0);
                }
            }
            Some(Err(e)) => return lost(e.to_string()),
            None => return lost("the gateway closed the connection"),
        }
    }
}

/// Agent side: a ping every keep-alive interval; a connection whose pong does not come
/// within the idle timeout is lost. Never completes while pongs come.
async fn keep_alive(ping: Option<h2::PingPong>, timers: TransportTimers) -> Closed {
    let Some(mut ping) = ping else { return std::future::pending().await };
    loop {
        tokio::time::sleep(timers.keep_alive).await;
        match tokio::time::timeout(timers.idle_timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return lost(e.to_string()),
            Err(_) => return lost(format!("no answer to a ping within {:?}", timers.idle_timeout)),
        }
    }
}

/// The sending half of a TCP-transport stream.
pub struct SendStream {
    inner: h2::SendStream<Bytes>,
}

impl std::fmt::Debug for SendStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("tcp::SendStream").field("id", &self.id()).finish()
    }
}

impl SendStream {
    fn new(inner: h2::SendStream<Bytes>) -> Self {
        Self { inner }
    }

    pub fn id(&self) -> u64 {
        u64::from(u32::from(self.inner.stream_id()))
    }

    /// Credit to send at least one byte of `want`.
    fn poll_credit(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        loop {
            let have = self.inner.capacity();
            if have > 0 {
                return Poll::Ready(Ok(have));
            }
            self.inner.reserve_capacity(want);
            match ready!(self.inner.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(h2_error(e))),
                None => return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"))),
            }
        }
    }

    pub async fn write_chunk(&mut self, mut data: Bytes) -> io::Result<()> {
        while !data.is_empty() {
            let credit = std::future::poll_fn(|cx| self.poll_credit(cx, data.len())).await?;
            let piece = data.split_to(credit.min(data.len()));
            self.inner.send_data(piece, false).map_err(h2_error)?;
        }
        Ok(())
    }

    pub fn finish(&mut self) -> io::Result<()> {
        self.inner.send_data(Bytes::new(), true).map_err(h2_error)
    }

    pub fn reset(&mut self, _code: u32) {
        self.inner.send_reset(h2::Reason::CANCEL);
    }
}

impl AsyncWrite for SendStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = self.get_mut();
        let want = buf.len().min(MAX_WRITE);
        let credit = ready!(this.poll_credit(cx, want))?;
        let n = credit.min(want);
        let piece = Bytes::copy_from_slice(buf.get(..n).unwrap_or_default());
        this.inner.send_data(piece, false).map_err(h2_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes what is queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.get_mut().finish())
    }
}

enum Body {
    /// Gateway side: the agent has not answered the stream's request yet.
    Waiting(h2::client::ResponseFuture),
    Open(h2::RecvStream),
    Finished,
    Failed(io::ErrorKind, String),
}

/// The receiving half of a TCP-transport stream.
pub struct RecvStream {
    body: Body,
    /// Chunks read while waiting for a reset, not yet taken (their credit is given back
    /// only when they are, so the sender stays within the window).
    stash: VecDeque<Bytes>,
    /// The rest of a chunk `poll_read` took in part.
    partial: Bytes,
}

impl std::fmt::Debug for RecvStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("tcp::RecvStream").finish_non_exhaustive()
    }
}

impl RecvStream {
    fn waiting(response: h2::client::ResponseFuture) -> Self {
        Self { body: Body::Waiting(response), stash: VecDeque::new(), partial: Bytes::new() }
    }

    fn open(body: h2::RecvStream) -> Self {
        Self { body: Body::Open(body), stash: VecDeque::new(), partial: Bytes::new() }
    }

    fn fail(&mut self, e: &io::Error) {
        self.body = Body::Failed(e.kind(), e.to_string());
    }

    /// The body, once the agent answered the request.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Body::Waiting(response) = &mut self.body {
            match ready!(Pin::new(response).poll(cx)) {
                Ok(r) if r.status() == http::StatusCode::OK => self.body = Body::Open(r.into_body()),
                Ok(r) => {
                    let e = io::Error::other(format!("the agent answered the stream with {}", r.status()));
                    self.fail(&e);
                    return Poll::Ready(Err(e));
                }
                Err(e) => {
                    let e = h2_error(e);
                    self.fail(&e);
                    return Poll::Ready(Err(e));
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    fn release(&mut self, n: usize) {
        if let Body::Open(body) = &mut self.body {
            let _ = body.flow_control().release_capacity(n);
        }
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if let Some(chunk) = self.stash.pop_front() {
            self.release(chunk.len());
            return Poll::Ready(Ok(Some(chunk)));
        }
        ready!(self.poll_body(cx))?;
        loop {
            let polled = match &mut self.body {
                Body::Open(body) => ready!(body.poll_data(cx)),
                Body::Finished => return Poll::Ready(Ok(None)),
                Body::Failed(kind, msg) => return Poll::Ready(Err(io::Error::new(*kind, msg.clone()))),
                Body::Waiting(_) => return Poll::Ready(Err(io::Error::other("stream not open"))),
            };
            match polled {
                Some(Ok(chunk)) if chunk.is_empty() => {}
                Some(Ok(chunk)) => {
                    self.release(chunk.len());
                    return Poll::Ready(Ok(Some(chunk)));
                }
                Some(Err(e)) => {
                    let e = h2_error(e);
                    self.fail(&e);
                    return Poll::Ready(Err(e));
                }
                None => {
                    self.body = Body::Finished;
                    return Poll::Ready(Ok(None));
                }
            }
        }
    }

    pub async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        if !self.partial.is_empty() {
            return Ok(Some(std::mem::take(&mut self.partial)));
        }
        std::future::poll_fn(|cx| self.poll_chunk(cx)).await
    }

    /// Stop reading: what arrives is dropped, and once the sending half is gone too, the
    /// stream is reset.
    pub fn stop(&mut self, _code: u32) {
        self.stash.clear();
        self.partial = Bytes::new();
        self.body = Body::Failed(io::ErrorKind::ConnectionAborted, "stopped".into());
    }

    pub async fn received_reset(&mut self) {
        std::future::poll_fn(|cx| {
            // Still waiting for the answer: its waker is set; a failed answer is a reset.
            let _ = self.poll_body(cx);
            loop {
                let Body::Open(body) = &mut self.body else {
                    return if matches!(self.body, Body::Failed(..)) { Poll::Ready(()) } else { Poll::Pending };
                };
                match ready!(body.poll_data(cx)) {
                    Some(Ok(chunk)) => {
                        if !chunk.is_empty() {
                            self.stash.push_back(chunk);
                        }
                    }
                    Some(Err(e)) => {
                        let e = h2_error(e);
                        self.fail(&e);
                        return Poll::Ready(());
                    }
                    None => {
                        // A finish, not a reset: the stashed data is still to be read.
                        self.body = Body::Finished;
                        return Poll::Pending;
                    }
                }
            }
        })
        .await
    }
}

impl AsyncRead for RecvStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.partial.is_empty() {
            match ready!(this.poll_chunk(cx))? {
                Some(chunk) => this.partial = chunk,
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.partial.len().min(buf.remaining());
        buf.put_slice(this.partial.get(..n).unwrap_or_default());
        this.partial.advance(n);
        Poll::Ready(Ok(()))
    }
}
