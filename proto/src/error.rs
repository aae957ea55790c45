use crate::frame::StreamKind;

/// A frame or payload that violates the protocol. Always a clean error, never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("unsupported protocol version {0} (this build speaks version {v})", v = crate::PROTOCOL_VERSION)]
    UnsupportedVersion(u8),
    #[error("unknown message kind 0x{0:02x}")]
    UnknownKind(u8),
    #[error("message kind {kind:?} is not allowed on a {stream:?} stream")]
    UnexpectedKind { kind: crate::Kind, stream: StreamKind },
    #[error("frame of {len} bytes exceeds the {max}-byte limit of a {stream:?} stream")]
    FrameTooLarge { len: u32, max: u32, stream: StreamKind },
    #[error("payload ended early while reading {0}")]
    Truncated(&'static str),
    #[error("{0} trailing bytes after the payload")]
    TrailingBytes(usize),
    #[error("field {0} is not valid UTF-8")]
    InvalidUtf8(&'static str),
    #[error("invalid value {value} for {field}")]
    InvalidValue { field: &'static str, value: u32 },
}

/// Failure while reading or writing frames on a byte stream.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error("stream closed in the middle of a frame")]
    UnexpectedEof,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}
