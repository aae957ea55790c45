use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{FrameError, FrameHeader, HEADER_LEN, Message, StreamKind, encode_frame};

/// Read one frame. `Ok(None)` means the stream ended cleanly between frames.
///
/// The header is validated before the payload is read, so an oversized or unknown frame is
/// rejected without buffering it.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    stream: StreamKind,
) -> Result<Option<Message>, FrameError> {
    let mut head = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        let n = reader.read(head.get_mut(filled..).unwrap_or_default()).await?;
        if n == 0 {
            return if filled == 0 { Ok(None) } else { Err(FrameError::UnexpectedEof) };
        }
        filled += n;
    }
    let header = FrameHeader::parse(head, stream)?;
    let mut payload = vec![0u8; header.len as usize];
    reader.read_exact(&mut payload).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof { FrameError::UnexpectedEof } else { FrameError::Io(e) }
    })?;
    Ok(Some(Message::decode_payload(header.kind, &payload)?))
}

/// Encode and write one frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, msg: &Message) -> Result<(), FrameError> {
    let mut buf = Vec::new();
    encode_frame(msg, &mut buf);
    writer.write_all(&buf).await?;
    Ok(())
}
