//! The Postern wire protocol between the gateway and its agents.
//!
//! This crate owns the bytes: message types, their encoding, the frame header, and the
//! per-stream limits. It does no networking and runs no runtime; the only I/O it knows is
//! the `AsyncRead`/`AsyncWrite` traits used by [`read_frame`] and [`write_frame`].
//! The format is specified in `docs/protocol.md`; golden tests in `tests/golden.rs` lock it.
//!
//! Every frame starts with a 6-byte header:
//!
//! ```text
//! +---------+------+----------------------+
//! | version | kind | payload length (BE)  |  then `length` bytes of payload
//! |   u8    |  u8  |        u32           |
//! +---------+------+----------------------+
//! ```

mod codec;
mod error;
mod frame;
mod io;
mod message;

pub use error::{FrameError, ProtoError};
pub use frame::{FrameHeader, StreamKind, decode_frame, encode_frame};
pub use io::{read_frame, write_frame};
pub use message::{
    Accept, Connected, EnrollRequest, EnrollResponse, ErrorCode, ErrorMsg, ExecCommand, ExecRequest, Exit, Hello,
    HelloAck, Kind, Message, OpenSession, Reject, RenewRequest, RenewResponse, Resize, SessionId, SessionRequest,
    ShellRequest, Signal, TcpByNameRequest, TcpRequest,
};

/// Version of the frame format and message set carried in every frame header.
pub const PROTOCOL_VERSION: u8 = 1;

/// ALPN of an authenticated agent connection (mutual TLS).
pub const ALPN_TUNNEL: &[u8] = b"postern/1";

/// ALPN of a connection between two gateways of a cluster (mutual TLS with gateway
/// certificates; the tunnel crate's `peer` module).
pub const ALPN_PEER: &[u8] = b"postern-peer/1";

/// ALPN of an enrollment connection: server-authenticated only, carries one token exchange.
pub const ALPN_ENROLL: &[u8] = b"postern-enroll/1";

/// ALPN of a time query (`postern-agent doctor`'s clock check): the gateway closes the
/// connection at once with close code [`CLOSE_TIME`] and its clock, Unix milliseconds in
/// ASCII decimal, as the reason. Nothing else is exchanged.
pub const ALPN_TIME: &[u8] = b"postern-time/1";

/// The close code of a `postern-time/1` answer.
pub const CLOSE_TIME: u32 = 5;

/// Length of the frame header in bytes.
pub const HEADER_LEN: usize = 6;

/// Largest chunk of stdin/stdout/stderr a sender puts into one data frame.
/// Receivers accept up to [`StreamKind::Session`]'s frame limit, which is larger.
pub const MAX_DATA_CHUNK: usize = 32 * 1024;
