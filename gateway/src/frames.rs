//! Session frames read by a task of their own.
//!
//! `read_frame` is not cancel-safe: dropped half-way through a frame, it loses the bytes it
//! had read. Loops that `select!` between frames and other input (a terminal, an SSH
//! channel, timers) take frames from this reader's queue instead, which is cancel-safe.

use postern_proto::{FrameError, Message, StreamKind, read_frame};
use tokio::io::AsyncRead;
use tokio::sync::mpsc;

/// Frames read ahead of the consumer; the reading task pauses when the queue is full.
const QUEUE: usize = 32;

pub struct FrameReader {
    frames: mpsc::Receiver<Result<Option<Message>, FrameError>>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FrameReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReader").finish_non_exhaustive()
    }
}

impl FrameReader {
    /// Read session frames from `reader` until it ends or fails.
    pub fn spawn<R: AsyncRead + Unpin + Send + 'static>(mut reader: R) -> Self {
        let (tx, frames) = mpsc::channel(QUEUE);
        let task = tokio::spawn(async move {
            loop {
                let frame = read_frame(&mut reader, StreamKind::Session).await;
                let done = !matches!(frame, Ok(Some(_)));
                if tx.send(frame).await.is_err() || done {
                    return;
                }
            }
        });
        Self { frames, task }
    }

    /// The next frame; `Ok(None)` once the stream has ended. Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<Message>, FrameError> {
        self.frames.recv().await.unwrap_or(Ok(None))
    }
}

impl Drop for FrameReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}
