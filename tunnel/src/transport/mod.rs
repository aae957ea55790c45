//! The tunnel's two transports behind one interface: QUIC (the default), and HTTP/2 over
//! TLS over TCP ([`tcp`]) for networks that drop UDP or allow only an HTTP proxy
//! ([`proxy`]). Both give the same things to the code above them: a mutually authenticated
//! connection, bidirectional streams with their own flow control that end with a finish
//! (an end of stream) or a reset, and a close with a code and a reason. docs/protocol.md
//! ("Transports") says why HTTP/2 was chosen for the fallback.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub mod proxy;
pub mod tcp;

/// Which transport a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Quic,
    Tcp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Tcp => "tcp",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a connection ended, as the code above the transports sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// The application close code (`crate::server::close`) when one side closed the
    /// connection on purpose; `None` when it was lost (timed out, reset, broken).
    pub code: Option<u32>,
    /// Whether the other side closed it (as opposed to this side).
    pub by_peer: bool,
    pub reason: String,
}

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.by_peer) {
            (Some(code), true) => write!(f, "closed by peer: {} (code {code})", self.reason),
            (Some(code), false) => write!(f, "closed locally: {} (code {code})", self.reason),
            (None, _) => write!(f, "connection lost: {}", self.reason),
        }
    }
}

fn quic_closed(e: &quinn::ConnectionError) -> Closed {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => Closed {
            code: u32::try_from(c.error_code.into_inner()).ok(),
            by_peer: true,
            reason: String::from_utf8_lossy(&c.reason).into_owned(),
        },
        quinn::ConnectionError::LocallyClosed => Closed { code: Some(0), by_peer: false, reason: e.to_string() },
        other => Closed { code: None, by_peer: true, reason: other.to_string() },
    }
}

/// One connection between an agent and a gateway, on either transport. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Connection {
    Quic(quinn::Connection),
    Tcp(tcp::Connection),
}

impl Connection {
    pub fn transport(&self) -> Transport {
        match self {
            Self::Quic(_) => Transport::Quic,
            Self::Tcp(_) => Transport::Tcp,
        }
    }

    /// Open a stream to the other side. On TCP only the gateway opens streams, and an
    /// agent's one stream of its own (control or enrollment) is prepared by the gateway at
    /// set-up ([`tcp`]).
    pub async fn open_bi(&self) -> io::Result<(SendStream, RecvStream)> {
        match self {
            Self::Quic(c) => {
                let (s, r) = c.open_bi().await.map_err(io::Error::other)?;
                Ok((SendStream::Quic(s), RecvStream::Quic(r)))
            }
            Self::Tcp(c) => c.open_bi().await,
        }
    }

    /// The next stream the other side opened.
    pub async fn accept_bi(&self) -> io::Result<(SendStream, RecvStream)> {
        match self {
            Self::Quic(c) => {
                let (s, r) = c.accept_bi().await.map_err(io::Error::other)?;
                Ok((SendStream::Quic(s), RecvStream::Quic(r)))
            }
            Self::Tcp(c) => c.accept_bi().await,
        }
    }

    /// Close with an application `code` and `reason` (both reach the other side).
    pub fn close(&self, code: u32, reason: &[u8]) {
        match self {
            Self::Quic(c) => c.close(code.into(), reason),
            Self::Tcp(c) => c.close(code, reason),
        }
    }

    /// Wait until the connection has ended, and say how.
    pub async fn closed(&self) -> Closed {
        match self {
            Self::Quic(c) => quic_closed(&c.closed().await),
            Self::Tcp(c) => c.closed().await,
        }
    }

    /// How it ended, if it has.
    pub fn close_reason(&self) -> Option<Closed> {
        match self {
            Self::Quic(c) => c.close_reason().map(|e| quic_closed(&e)),
            Self::Tcp(c) => c.close_reason(),
        }
    }

    /// Identifies this connection among all of this process's (not reused while it lives).
    pub fn stable_id(&self) -> usize {
        match self {
            // QUIC ids and TCP ids come from different counters: keep them apart.
            Self::Quic(c) => c.stable_id() << 1,
            Self::Tcp(c) => (c.stable_id() << 1) | 1,
        }
    }

    pub fn remote_address(&self) -> SocketAddr {
        match self {
            Self::Quic(c) => c.remote_address(),
            Self::Tcp(c) => c.remote_address(),
        }
    }

    /// The current round-trip estimate: QUIC's own (quinn's smoothed RTT); `None` on TCP,
    /// whose HTTP/2 connection keeps no such estimate that is cheap to read.
    pub fn rtt(&self) -> Option<std::time::Duration> {
        match self {
            Self::Quic(c) => Some(c.rtt()),
            Self::Tcp(_) => None,
        }
    }

    /// The verified certificate the other side presented, if any.
    pub fn peer_certificate(&self) -> Option<CertificateDer<'static>> {
        match self {
            Self::Quic(c) => c
                .peer_identity()
                .and_then(|p| p.downcast::<Vec<CertificateDer<'static>>>().ok())
                .and_then(|chain| chain.first().cloned()),
            Self::Tcp(c) => c.peer_certificate(),
        }
    }

    /// The application protocol agreed in the TLS handshake.
    pub fn alpn(&self) -> Option<Vec<u8>> {
        match self {
            Self::Quic(c) => c
                .handshake_data()
                .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                .and_then(|h| h.protocol),
            Self::Tcp(c) => c.alpn(),
        }
    }
}

/// The sending half of a stream.
#[derive(Debug)]
pub enum SendStream {
    Quic(quinn::SendStream),
    Tcp(tcp::SendStream),
}

impl SendStream {
    /// Send `data` (an owned chunk: no copy on either transport), waiting for flow-control
    /// credit.
    pub async fn write_chunk(&mut self, data: Bytes) -> io::Result<()> {
        match self {
            Self::Quic(s) => s.write_chunk(data).await.map_err(io::Error::other),
            Self::Tcp(s) => s.write_chunk(data).await,
        }
    }

    /// Send this stream's data ahead of other streams' (an interactive session sharing the
    /// connection with bulk transfers). QUIC only: the HTTP/2 crate has no stream
    /// priorities, so on TCP streams share the connection in turn.
    pub fn prefer(&self) {
        if let Self::Quic(s) = self {
            let _ = s.set_priority(1);
        }
    }

    /// End the stream after what was written (the other side reads an end of stream).
    pub fn finish(&mut self) -> io::Result<()> {
        match self {
            Self::Quic(s) => s.finish().map_err(io::Error::other),
            Self::Tcp(s) => s.finish(),
        }
    }

    /// Abandon the stream: the other side reads an error, not an end of stream.
    pub fn reset(&mut self, code: u32) {
        match self {
            Self::Quic(s) => {
                let _ = s.reset(code.into());
            }
            Self::Tcp(s) => s.reset(code),
        }
    }

    /// The stream's number on its connection, for logs.
    pub fn id(&self) -> u64 {
        match self {
            Self::Quic(s) => s.id().index(),
            Self::Tcp(s) => s.id(),
        }
    }
}

impl AsyncWrite for SendStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Quic(s) => tokio::io::AsyncWrite::poll_write(Pin::new(s), cx, buf),
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Quic(s) => Pin::new(s).poll_flush(cx),
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Quic(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The receiving half of a stream.
#[derive(Debug)]
pub enum RecvStream {
    Quic(quinn::RecvStream),
    Tcp(tcp::RecvStream),
}

impl RecvStream {
    /// The next chunk as it arrived (no copy); `None` at the end of the stream; an error
    /// when the stream was reset or the connection lost.
    pub async fn read_chunk(&mut self) -> io::Result<Option<Bytes>> {
        match self {
            Self::Quic(r) => match r.read_chunk(usize::MAX, true).await {
                Ok(c) => Ok(c.map(|c| c.bytes)),
                Err(e) => Err(io::Error::other(e)),
            },
            Self::Tcp(r) => r.read_chunk().await,
        }
    }

    /// Tell the other side to stop sending (it sees its stream reset).
    pub fn stop(&mut self, code: u32) {
        match self {
            Self::Quic(r) => {
                let _ = r.stop(code.into());
            }
            Self::Tcp(r) => r.stop(code),
        }
    }

    /// Completes when the other side resets the stream (or the connection is lost), even
    /// while data it sent before is still unread. Never completes after a plain finish.
    pub async fn received_reset(&mut self) {
        match self {
            Self::Quic(r) => {
                if let Ok(None) = r.received_reset().await {
                    std::future::pending::<()>().await;
                }
            }
            Self::Tcp(r) => r.received_reset().await,
        }
    }
}

impl AsyncRead for RecvStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Quic(r) => Pin::new(r).poll_read(cx, buf),
            Self::Tcp(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}
