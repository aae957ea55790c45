use crate::{HEADER_LEN, Kind, Message, PROTOCOL_VERSION, ProtoError};

/// The kind of QUIC stream a frame travels on. Each has its own frame-size limit and its
/// own set of allowed messages, so a peer cannot, say, send an enrollment request where a
/// session is being opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// The one stream of an enrollment connection.
    Enroll,
    /// The agent's long-lived control stream (hello, renewal).
    Control,
    /// A session stream: open/accept/reject, then shell or exec traffic.
    Session,
}

impl StreamKind {
    /// Largest payload accepted on this stream kind, in bytes.
    pub const fn max_payload(self) -> u32 {
        match self {
            // A CSR, a certificate chain and a few short strings.
            StreamKind::Enroll => 16 * 1024,
            StreamKind::Control => 16 * 1024,
            // Data chunks are at most MAX_DATA_CHUNK (32 KiB); leave room for a larger
            // chunk from a future sender without allowing unbounded buffering.
            StreamKind::Session => 64 * 1024,
        }
    }

    pub fn allows(self, kind: Kind) -> bool {
        match self {
            StreamKind::Enroll => matches!(kind, Kind::EnrollRequest | Kind::EnrollResponse | Kind::Error),
            StreamKind::Control => {
                matches!(kind, Kind::Hello | Kind::HelloAck | Kind::RenewRequest | Kind::RenewResponse | Kind::Error)
            }
            StreamKind::Session => matches!(
                kind,
                Kind::Open
                    | Kind::Accept
                    | Kind::Reject
                    | Kind::Connected
                    | Kind::Stdin
                    | Kind::Stdout
                    | Kind::Stderr
                    | Kind::Resize
                    | Kind::Signal
                    | Kind::Eof
                    | Kind::Exit
                    | Kind::Error
            ),
        }
    }
}

/// A validated frame header: known version and kind, allowed on the stream, within limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: Kind,
    pub len: u32,
}

impl FrameHeader {
    pub fn parse(bytes: [u8; HEADER_LEN], stream: StreamKind) -> Result<Self, ProtoError> {
        let [version, kind, l0, l1, l2, l3] = bytes;
        if version != PROTOCOL_VERSION {
            return Err(ProtoError::UnsupportedVersion(version));
        }
        let kind = Kind::from_byte(kind)?;
        if !stream.allows(kind) {
            return Err(ProtoError::UnexpectedKind { kind, stream });
        }
        let len = u32::from_be_bytes([l0, l1, l2, l3]);
        let max = stream.max_payload();
        if len > max {
            return Err(ProtoError::FrameTooLarge { len, max, stream });
        }
        Ok(FrameHeader { kind, len })
    }
}

/// Append one frame (header and payload) for `msg` to `out`.
pub fn encode_frame(msg: &Message, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[PROTOCOL_VERSION, msg.kind() as u8, 0, 0, 0, 0]);
    msg.encode_payload(out);
    let len = u32::try_from(out.len() - start - HEADER_LEN).unwrap_or(u32::MAX);
    if let Some(slot) = out.get_mut(start + 2..start + HEADER_LEN) {
        slot.copy_from_slice(&len.to_be_bytes());
    }
}

/// Decode one frame from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame, or the message and the
/// number of bytes it used. Errors are detected as early as possible: a bad header fails
/// before its payload has arrived.
pub fn decode_frame(buf: &[u8], stream: StreamKind) -> Result<Option<(Message, usize)>, ProtoError> {
    let Some((head, rest)) = buf.split_first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let header = FrameHeader::parse(*head, stream)?;
    let len = header.len as usize;
    let Some(payload) = rest.get(..len) else {
        return Ok(None);
    };
    let msg = Message::decode_payload(header.kind, payload)?;
    Ok(Some((msg, HEADER_LEN + len)))
}
