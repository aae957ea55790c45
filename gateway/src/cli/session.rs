//! Client side of `postern exec` and `postern shell` over the admin socket.

use std::os::fd::AsFd;
use std::path::Path;

use anyhow::Context;
use postern_proto::{Message, Resize, write_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::admin::{AdminRequest, SessionSpec, request};

/// Restores the terminal mode when dropped, also on error paths.
pub(crate) struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    pub(crate) fn enable() -> Option<Self> {
        let stdin = std::io::stdin();
        let fd = stdin.as_fd();
        let saved = rustix::termios::tcgetattr(fd).ok()?;
        let mut raw = saved.clone();
        raw.make_raw();
        // `Now`, not `Flush`: keys typed while the session was being set up must not be lost.
        rustix::termios::tcsetattr(fd, rustix::termios::OptionalActions::Now, &raw).ok()?;
        Some(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let stdin = std::io::stdin();
        let _ = rustix::termios::tcsetattr(stdin.as_fd(), rustix::termios::OptionalActions::Drain, &self.saved);
    }
}

pub fn stdin_is_tty() -> bool {
    rustix::termios::isatty(std::io::stdin().as_fd())
}

pub fn terminal_size() -> (u16, u16) {
    rustix::termios::tcgetwinsize(std::io::stdout().as_fd())
        .ok()
        .filter(|w| w.ws_col > 0 && w.ws_row > 0)
        .map(|w| (w.ws_col, w.ws_row))
        .unwrap_or((80, 24))
}

/// Run a session and return the remote exit status.
pub async fn run(socket: &Path, instance: &str, spec: SessionSpec, interactive: bool) -> anyhow::Result<i32> {
    let (_, conn) = request(socket, &AdminRequest::Session { instance: instance.to_owned(), session: spec }).await?;
    let crate::admin::AdminConnection { reader, mut writer } = conn;
    let _raw = if interactive { RawMode::enable() } else { None };
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok();
    let mut stdin = tokio::io::stdin();
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut buf = vec![0u8; 16 * 1024];
    let mut stdin_open = true;
    let mut frames = crate::frames::FrameReader::spawn(reader);
    loop {
        tokio::select! {
            n = stdin.read(&mut buf), if stdin_open => {
                match n {
                    Ok(0) | Err(_) => {
                        stdin_open = false;
                        let _ = write_frame(&mut writer, &Message::Eof).await;
                    }
                    Ok(n) => {
                        let data = buf.get(..n).unwrap_or_default().to_vec();
                        if write_frame(&mut writer, &Message::Stdin(data)).await.is_err() {
                            stdin_open = false;
                        }
                    }
                }
            }
            _ = async { match winch.as_mut() { Some(w) => { w.recv().await; } None => std::future::pending().await } }, if interactive => {
                let (cols, rows) = terminal_size();
                let _ = write_frame(&mut writer, &Message::Resize(Resize { cols, rows })).await;
            }
            frame = frames.next() => {
                match frame.context("session stream")? {
                    Some(Message::Stdout(d)) => { stdout.write_all(&d).await?; stdout.flush().await?; }
                    Some(Message::Stderr(d)) => { stderr.write_all(&d).await?; stderr.flush().await?; }
                    Some(Message::Exit(e)) => {
                        if let Some(sig) = e.signal {
                            drop(_raw);
                            eprintln!("postern: remote process killed by signal {sig}");
                        }
                        return Ok(e.code);
                    }
                    Some(Message::Error(e)) => anyhow::bail!("session error: {}", e.message),
                    Some(_) => {}
                    None => anyhow::bail!("the session ended without an exit status (agent disconnected?)"),
                }
            }
        }
    }
}
