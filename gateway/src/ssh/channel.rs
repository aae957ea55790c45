//! Small things said on a session channel: refusals, notices on the user's terminal, and
//! the numbers they quote.

use std::time::Duration;

use russh::server::Msg;

pub(super) fn clamp16(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}

pub(super) fn sig_name(s: &russh::Sig) -> String {
    format!("{s:?}").trim_start_matches("Custom(\"").trim_end_matches("\")").to_owned()
}

/// Refuse a session channel (shell, exec, sftp on an instance): marked as the gateway's
/// refusal with the [`postern_core::command::REFUSED_SIGNAL`] exit-signal carrying the
/// text (first, so the `postern` client knows the text that follows is the refusal's),
/// then the text on stderr and exit status `code` for plain `ssh` (which ignores the
/// signal): 1, or 255 when the instance could not be reached.
pub(super) async fn refuse_session(
    handle: &russh::server::Handle,
    ch: &russh::ChannelWriteHalf<Msg>,
    message: &str,
    code: u32,
) {
    let signal = russh::Sig::Custom(postern_core::command::REFUSED_SIGNAL.to_owned());
    // Through the connection's one outgoing queue, so it arrives before the text.
    let _ = handle.exit_signal_request(ch.id(), signal, false, message.to_owned(), String::new()).await;
    refuse(ch, message, code).await;
}

/// Tell the client why nothing happened, and end the channel with `code`.
pub(super) async fn refuse(ch: &russh::ChannelWriteHalf<Msg>, message: &str, code: u32) {
    let _ = ch.extended_data_bytes(1, format!("postern: {message}\r\n").into_bytes()).await;
    let _ = ch.exit_status(code).await;
    let _ = ch.eof().await;
    let _ = ch.close().await;
}

/// How long before a limit the user is warned: a quarter of it, at most a minute.
pub(super) fn warn_lead(limit: Duration) -> Duration {
    (limit / 4).min(Duration::from_secs(60))
}

pub(super) fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

/// How long a notice may wait for the client to read: one that stopped reading must not
/// hold up the end of its session.
pub(super) const NOTICE_WAIT: Duration = Duration::from_secs(1);

/// A line from the gateway to the user's terminal (stderr when there is no PTY), given up
/// after [`NOTICE_WAIT`] when the client is not reading.
pub(super) async fn notice(ch: &russh::ChannelWriteHalf<Msg>, on_pty: bool, message: &str) {
    let line = format!("\r\npostern: {message}\r\n").into_bytes();
    let write = async { if on_pty { ch.data_bytes(line).await } else { ch.extended_data_bytes(1, line).await } };
    let _ = tokio::time::timeout(NOTICE_WAIT, write).await;
}
