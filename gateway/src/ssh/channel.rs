//! Small things said on a session channel: refusals, notices on the user's terminal, and
//! the numbers they quote.

use russh::server::Msg;
use russh::{ChannelMsg, ChannelWriteHalf};

use crate::session_relay::FromUser;

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

/// The SSH channel as a session relay reads it.
impl crate::session_relay::UserInput for russh::ChannelReadHalf {
    async fn next(&mut self) -> FromUser {
        match self.wait().await {
            Some(ChannelMsg::Data { data }) => FromUser::Data(data.to_vec()),
            Some(ChannelMsg::Eof) => FromUser::Eof,
            Some(ChannelMsg::WindowChange { col_width, row_height, .. }) => {
                FromUser::Resize { cols: clamp16(col_width), rows: clamp16(row_height) }
            }
            Some(ChannelMsg::Signal { signal }) => FromUser::Signal(sig_name(&signal)),
            Some(ChannelMsg::Close) | None => FromUser::Gone,
            Some(_) => FromUser::Other,
        }
    }
}

/// The SSH channel as a session relay writes it: stderr is extended data 1.
impl crate::session_relay::UserOutput for russh::ChannelWriteHalf<Msg> {
    async fn output(&self, data: Vec<u8>, stderr: bool) -> Result<(), ()> {
        let sent = if stderr { self.extended_data_bytes(1, data).await } else { self.data_bytes(data).await };
        sent.map_err(|_| ())
    }
    async fn exit_status(&self, code: u32) {
        let _ = ChannelWriteHalf::exit_status(self, code).await;
    }
}
