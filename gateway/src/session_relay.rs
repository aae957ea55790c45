//! The relay of an interactive or exec session, whichever door it came through: the user's
//! end (an SSH channel, a browser's WebSocket) on one side, the agent's framed session stream
//! on the other, with the recording, the session's limits (idle and maximum length, warned
//! before they strike), termination, and a recording that fails mid-session.
//!
//! A door gives the relay its user's end as two halves, [`UserInput`] and [`UserOutput`];
//! everything else (what is recorded, when a session ends and what the user is told) is
//! decided here, once for every door.

use std::future::Future;
use std::time::{Duration, Instant};

use postern_core::Limits;
use postern_proto::{Message, Resize, Signal, write_frame};
use postern_tunnel::server::SessionStream;
use postern_tunnel::transport::SendStream;
use tokio::sync::{mpsc, oneshot};

use crate::recording::Recorder;
use crate::sessions::LiveSession;

/// What the user's side sent.
pub enum FromUser {
    Data(Vec<u8>),
    Eof,
    Resize {
        cols: u16,
        rows: u16,
    },
    /// A signal by its SSH name ("INT", "TERM", ...).
    Signal(String),
    /// Anything the relay has no use for.
    Other,
    /// The user went away.
    Gone,
}

/// The user's side, as the relay reads it.
pub trait UserInput {
    /// The next thing the user sent; [`FromUser::Gone`] once they left.
    fn next(&mut self) -> impl Future<Output = FromUser> + Send;
}

/// The user's side, as the relay writes it.
pub trait UserOutput: Sync {
    /// Output for the user (`stderr`: the error stream, where the door has one). `Err`: the
    /// user is gone.
    fn output(&self, data: Vec<u8>, stderr: bool) -> impl Future<Output = Result<(), ()>> + Send;
    /// The session's exit status.
    fn exit_status(&self, code: u32) -> impl Future<Output = ()> + Send;
}

/// How long before a limit the user is warned: a quarter of it, at most a minute.
fn warn_lead(limit: Duration) -> Duration {
    (limit / 4).min(Duration::from_secs(60))
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

/// How long a notice may wait for the user to read: one that stopped reading must not hold
/// up the end of its session.
const NOTICE_WAIT: Duration = Duration::from_secs(1);

/// A line from the gateway to the user's terminal (stderr when there is no PTY), given up
/// after [`NOTICE_WAIT`] when the user is not reading.
pub async fn notice(out: &impl UserOutput, on_pty: bool, message: &str) {
    let line = format!("\r\npostern: {message}\r\n").into_bytes();
    let _ = tokio::time::timeout(NOTICE_WAIT, out.output(line, !on_pty)).await;
}

/// A frame from the agent: output (stdout and stderr are handled alike but for the stream
/// they go to) or anything else.
enum Frame {
    Output { data: Vec<u8>, to_stderr: bool },
    Other(Message),
}

fn split_output(frame: Option<Message>) -> Option<Frame> {
    frame.map(|m| match m {
        Message::Stdout(data) => Frame::Output { data, to_stderr: false },
        Message::Stderr(data) => Frame::Output { data, to_stderr: true },
        other => Frame::Other(other),
    })
}

/// How a relayed session went.
pub struct Relayed {
    /// The remote exit status; `None` when the client went away first.
    pub exit_code: Option<i32>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Why the gateway ended it ("terminated", "idle-timeout", "max-duration",
    /// "recording-failed", "recording-limit"); `None` when it ended by itself.
    pub end_reason: Option<&'static str>,
    /// Why the recording stopped before the session ended, if it did (the end event's
    /// `reason`, with `logged: false`). Not set when a fail-closed session was ended at the
    /// recording limit: all it showed is recorded.
    pub recording_lost: Option<String>,
}

/// What the relay needs to know about the session besides its two ends.
pub struct Terms<'a> {
    pub live: &'a LiveSession,
    pub limits: Limits,
    pub started: Instant,
    /// Notices go to the terminal (with a PTY) or to stderr.
    pub on_pty: bool,
    /// A recording that fails ends the session.
    pub fail_closed: bool,
}

/// Relay until the remote process exits, the client goes away, or the gateway ends the
/// session; then finish the recording.
pub async fn relay(
    rd: &mut impl UserInput,
    wr: &impl UserOutput,
    stream: SessionStream,
    recorder: &mut Option<Recorder>,
    terms: Terms<'_>,
) -> Relayed {
    let Terms { live, limits, started, on_pty, fail_closed } = terms;
    let SessionStream { send, recv, violation, .. } = stream;
    let mut frames = crate::frames::FrameReader::spawn(recv);
    // The two directions never wait for each other. Input goes to the agent through a task
    // of its own, and output to the user is one write in flight while everything else goes
    // on. An SSH server (russh) takes in a client's packets, window adjustments included,
    // only as fast as its channels are read: a relay that stopped reading input while it
    // waited for the client's window to write output waited for an adjustment queued behind
    // that input, for ever (a 1 GiB sftp download stalled so).
    let mut to_agent = ToAgent::spawn(send);
    let mut input_slot: Option<mpsc::OwnedPermit<Message>> = None;
    let mut output: Option<PendingOutput<'_>> = None;
    let mut bytes_out: u64 = 0;
    let mut bytes_in: u64 = 0;
    let mut last_input = Instant::now();
    let (mut warned_idle, mut warned_max) = (false, false);
    let mut end_reason: Option<&'static str> = None;
    let mut recording_lost: Option<String> = None;
    // Timers armed for when they have work, not ticking: with a thousand sessions open, two
    // 250 ms ticks each woke the gateway 8,000 times a second for nothing (docs/benchmarks.md,
    // "Many sessions at once"). The recording's flush is armed while it holds unwritten
    // events; the limits are checked when the next warning or end can be due.
    let far = || tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    let flush_timer = tokio::time::sleep_until(far());
    tokio::pin!(flush_timer);
    let mut flush_armed: Option<Instant> = None;
    let has_limits = limits.idle_timeout.is_some() || limits.max_session.is_some();
    let limits_timer = tokio::time::sleep_until(
        next_check(limits, started, last_input, (warned_max, warned_idle)).map_or_else(far, Into::into),
    );
    tokio::pin!(limits_timer);
    let exit_code: Option<i32> = loop {
        let flush_due = recorder.as_ref().and_then(Recorder::flush_due);
        if flush_due != flush_armed {
            if let Some(at) = flush_due {
                flush_timer.as_mut().reset(at.into());
            }
            flush_armed = flush_due;
        }
        tokio::select! {
            // Room for one more message to the agent: only then is the user's next input
            // read (a remote process that does not read its input holds the user's input
            // back, as a full pipe would, and nothing else).
            slot = to_agent.reserve(), if input_slot.is_none() && to_agent.is_open() => match slot {
                Some(slot) => input_slot = Some(slot),
                // The stream to the agent failed; its loss shows in the frames below.
                None => to_agent.closed(),
            },
            msg = rd.next(), if input_slot.is_some() => {
                let mut forward = |m: Message| {
                    if let Some(slot) = input_slot.take() {
                        slot.send(m);
                    }
                };
                match msg {
                    FromUser::Data(data) => {
                        if let Some(rec) = recorder.as_mut() { let _ = rec.input(&data).await; }
                        bytes_in += data.len() as u64;
                        live.add_in(data.len());
                        last_input = Instant::now();
                        // The idle limit moved later: the limits' timer, armed for the earlier
                        // one, looks too early and re-arms (see `next_check`).
                        warned_idle = false;
                        forward(Message::Stdin(data));
                    }
                    FromUser::Eof => forward(Message::Eof),
                    FromUser::Resize { cols: c, rows: r } => {
                        forward(Message::Resize(Resize { cols: c, rows: r }));
                        if let Some(rec) = recorder.as_mut() { let _ = rec.resize(c, r).await; }
                    }
                    FromUser::Signal(name) => forward(Message::Signal(Signal { name })),
                    FromUser::Gone => {
                        // The client went away: stop the remote process.
                        to_agent.reset();
                        break None;
                    }
                    FromUser::Other => {}
                }
            },
            written = async {
                match output.as_mut() {
                    Some(write) => write.await,
                    None => std::future::pending().await,
                }
            }, if output.is_some() => {
                output = None;
                if written.is_err() {
                    // The client is gone.
                    to_agent.reset();
                    break None;
                }
            }
            lines = live.notices() => {
                // From the gateway to the user (someone began or stopped watching); the
                // watchers see the same line.
                settle(&mut output).await;
                for line in lines {
                    notice(wr, on_pty, &line).await;
                    live.publish(format!("\r\npostern: {line}\r\n").as_bytes());
                }
            }
            () = &mut flush_timer, if flush_armed.is_some() => {
                // Re-armed at the top of the loop from what the recording then holds.
                flush_armed = None;
                if let Some(rec) = recorder.as_mut() { let _ = rec.flush_if_due().await; }
            }
            _ = live.terminated() => {
                // Output the user was not taking is dropped with the session.
                drop(output.take());
                let why = live.reason().unwrap_or_else(|| "ended by the gateway".into());
                notice(wr, on_pty, &format!("session ended: {why}")).await;
                to_agent.reset();
                let _ = tokio::time::timeout(NOTICE_WAIT, wr.exit_status(255)).await;
                end_reason = Some(live.ended_by());
                break Some(255);
            }
            () = &mut limits_timer, if has_limits => {
                let now = Instant::now();
                if let Some((reason, message)) = due(limits, started, last_input, now) {
                    drop(output.take());
                    notice(wr, on_pty, &message).await;
                    to_agent.reset();
                    let _ = tokio::time::timeout(NOTICE_WAIT, wr.exit_status(255)).await;
                    end_reason = Some(reason);
                    break Some(255);
                }
                if let Some(max) = limits.max_session {
                    let end = started + max;
                    if now < end && !warned_max && now + warn_lead(max) >= end {
                        warned_max = true;
                        settle(&mut output).await;
                        notice(wr, on_pty, &format!("this session reaches its maximum length of {} in {}s and will be closed", human(max), (end - now).as_secs().max(1))).await;
                    }
                }
                if let Some(idle) = limits.idle_timeout {
                    let end = last_input + idle;
                    if now < end && !warned_idle && now + warn_lead(idle) >= end {
                        warned_idle = true;
                        settle(&mut output).await;
                        notice(wr, on_pty, &format!("no input for a while: this session closes in {}s unless you type something", (end - now).as_secs().max(1))).await;
                    }
                }
                let next = next_check(limits, started, last_input, (warned_max, warned_idle));
                limits_timer.as_mut().reset(next.map_or_else(far, Into::into));
            }
            // The next frame only once the user took the last output: the agent's output
            // waits in the stream (its flow control), and its exit status comes after it.
            frame = frames.next(), if output.is_none() => match frame.map(split_output) {
                Ok(Some(Frame::Output { data: d, to_stderr })) => {
                    bytes_out += d.len() as u64;
                    live.add_out(d.len());
                    if let Some(rec) = recorder.as_mut() { let _ = rec.output(&d).await; }
                    // Failing closed, output the recording did not take is not shown.
                    if !(fail_closed && recorder.as_ref().is_some_and(stopped)) {
                        live.publish(&d);
                        output = Some(Box::pin(wr.output(d, to_stderr)));
                    }
                }
                Ok(Some(Frame::Other(Message::Exit(e)))) => {
                    let _ = wr.exit_status(u32::try_from(e.code).unwrap_or(255)).await;
                    break Some(e.code);
                }
                Ok(Some(Frame::Other(Message::Error(_)))) => {}
                Ok(Some(Frame::Other(other))) => {
                    // A kind the agent must not send on a session stream: the protocol says
                    // the connection is closed (and the violation audited), not just this session.
                    violation.report(&format!("unexpected session message {:?}", other.kind()));
                    let _ = wr.output(b"\r\npostern: the instance broke the protocol; session closed\r\n".to_vec(), true).await;
                    let _ = wr.exit_status(255).await;
                    break Some(255);
                }
                Err(e) if postern_tunnel::server::is_violation(&e) => {
                    violation.report(&e.to_string());
                    let _ = wr.output(b"\r\npostern: the instance broke the protocol; session closed\r\n".to_vec(), true).await;
                    let _ = wr.exit_status(255).await;
                    break Some(255);
                }
                Ok(None) | Err(_) => {
                    let _ = wr.output(b"\r\npostern: connection to the instance was lost\r\n".to_vec(), true).await;
                    let _ = wr.exit_status(255).await;
                    end_reason = Some("instance-lost");
                    break Some(255);
                }
            },
        }
        // A recording that stops being written (a full disk) ends the session when the
        // gateway fails closed; otherwise the session goes on and its end says unlogged.
        if recording_lost.is_none()
            && let Some(why) = recorder.as_ref().and_then(Recorder::failure)
        {
            recording_lost = Some(format!("recording failed during the session: {why}"));
            if fail_closed {
                drop(output.take());
                notice(wr, on_pty, "the session recording can no longer be written on the gateway, and sessions are not run unrecorded here; closing the session").await;
                to_agent.reset();
                let _ = tokio::time::timeout(NOTICE_WAIT, wr.exit_status(255)).await;
                end_reason = Some("recording-failed");
                break Some(255);
            }
        }
        // The recording reached `[audit] max_recording_bytes`: the same choice.
        if recording_lost.is_none()
            && let Some(why) = recorder.as_ref().and_then(Recorder::limit_reached)
        {
            if fail_closed {
                drop(output.take());
                notice(wr, on_pty, "this session's output reached the gateway's recording limit ([audit] max_recording_bytes), and sessions are not run unrecorded here; closing the session").await;
                to_agent.reset();
                let _ = tokio::time::timeout(NOTICE_WAIT, wr.exit_status(255)).await;
                end_reason = Some("recording-limit");
                break Some(255);
            }
            recording_lost = Some(why.to_owned());
        }
    };
    drop(frames);
    if let Some(rec) = recorder.as_mut() {
        let _ = rec.finish(exit_code).await;
        // The last write can fail too: the end event then says what was lost.
        if recording_lost.is_none() {
            recording_lost = rec.failure().map(|why| format!("recording failed during the session: {why}"));
        }
    }
    Relayed { exit_code, bytes_in, bytes_out, end_reason, recording_lost }
}

/// Whether the recording stopped taking output (it failed, or reached its limit).
fn stopped(rec: &Recorder) -> bool {
    rec.failure().is_some() || rec.limit_reached().is_some()
}

/// Which of the session's limits has struck at `now`, with the message for the user.
fn due(limits: Limits, started: Instant, last_input: Instant, now: Instant) -> Option<(&'static str, String)> {
    if let Some(max) = limits.max_session
        && now >= started + max
    {
        return Some((
            "max-duration",
            format!("maximum session length of {} reached; closing the session", human(max)),
        ));
    }
    if let Some(idle) = limits.idle_timeout
        && now >= last_input + idle
    {
        return Some(("idle-timeout", format!("no input for {}; closing the session", human(idle))));
    }
    None
}

/// When the limits' timer must next look: the first warning not yet given or, once given,
/// the limit itself (`warned` is (max_session, idle) warned). Never later than the
/// conditions checked when it fires become true; earlier only costs a look. Input moves the
/// idle limit only later, and a new warning is due at least `idle - 2 * warn_lead` (half
/// the limit) after the end the timer was armed for, so input need not re-arm it.
fn next_check(limits: Limits, started: Instant, last_input: Instant, warned: (bool, bool)) -> Option<Instant> {
    let at = |from: Instant, limit: Duration, warned: bool| {
        let end = from + limit;
        if warned { end } else { end.checked_sub(warn_lead(limit)).unwrap_or(end) }
    };
    let max = limits.max_session.map(|m| at(started, m, warned.0));
    let idle = limits.idle_timeout.map(|i| at(last_input, i, warned.1));
    match (max, idle) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A write of output to the user in flight.
type PendingOutput<'a> = std::pin::Pin<Box<dyn Future<Output = Result<(), ()>> + Send + 'a>>;

/// Before a notice, the output in flight goes first, for as long as a notice may wait: a
/// notice must not cut into it (an escape sequence split in two), nor wait on a user who
/// does not read.
async fn settle(output: &mut Option<PendingOutput<'_>>) {
    // A failed write shows again on the next one: the user is gone.
    if let Some(write) = output.as_mut()
        && tokio::time::timeout(NOTICE_WAIT, write).await.is_ok()
    {
        *output = None;
    }
}

/// How many messages to the agent may wait for its stream: input beyond them waits in the
/// user's connection (its SSH window, its WebSocket), not in the gateway.
const TO_AGENT_QUEUE: usize = 16;

/// The session stream towards the agent (the user's input, resizes, signals), written by a
/// task of its own, so that a remote process that does not read its input holds back only
/// more input.
struct ToAgent {
    tx: Option<mpsc::Sender<Message>>,
    reset: Option<oneshot::Sender<()>>,
}

impl ToAgent {
    fn spawn(mut send: SendStream) -> Self {
        let (tx, mut rx) = mpsc::channel::<Message>(TO_AGENT_QUEUE);
        let (reset, mut reset_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let write_all = async {
                while let Some(msg) = rx.recv().await {
                    if write_message(&mut send, &msg).await.is_err() {
                        return;
                    }
                }
            };
            // A reset wins over a write in progress; the relay dropping its end (the
            // session over) leaves the stream to be finished when dropped.
            let reset = tokio::select! {
                biased;
                r = &mut reset_rx => r.is_ok(),
                () = write_all => false,
            };
            if reset {
                send.reset(0);
            }
        });
        Self { tx: Some(tx), reset: Some(reset) }
    }

    fn is_open(&self) -> bool {
        self.tx.is_some()
    }

    /// Room for one message; `None` once the stream has failed.
    async fn reserve(&self) -> Option<mpsc::OwnedPermit<Message>> {
        self.tx.clone()?.reserve_owned().await.ok()
    }

    fn closed(&mut self) {
        self.tx = None;
    }

    /// End the stream now, with a reset: the agent stops the remote process, even with
    /// input still waiting to be written.
    fn reset(&mut self) {
        self.tx = None;
        if let Some(reset) = self.reset.take() {
            let _ = reset.send(());
        }
    }
}

/// One message to the agent; input in chunks of at most [`postern_proto::MAX_DATA_CHUNK`].
async fn write_message(send: &mut SendStream, msg: &Message) -> Result<(), postern_proto::FrameError> {
    match msg {
        Message::Stdin(data) => {
            for chunk in data.chunks(postern_proto::MAX_DATA_CHUNK) {
                write_frame(send, &Message::Stdin(chunk.to_vec())).await?;
            }
            Ok(())
        }
        other => write_frame(send, other).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(idle: Option<u64>, max: Option<u64>) -> Limits {
        Limits { idle_timeout: idle.map(Duration::from_secs), max_session: max.map(Duration::from_secs) }
    }

    /// The limits' timer is armed for the first warning, then for the limit itself, and for
    /// the earlier of the two limits; a session without limits arms none.
    #[test]
    fn the_limits_timer_is_armed_for_the_next_warning_or_end() {
        let t0 = Instant::now();
        let idle = limits(Some(600), None);
        assert_eq!(next_check(idle, t0, t0, (false, false)), Some(t0 + Duration::from_secs(540)));
        assert_eq!(next_check(idle, t0, t0, (false, true)), Some(t0 + Duration::from_secs(600)));
        let both = limits(Some(600), Some(120));
        assert_eq!(next_check(both, t0, t0, (false, false)), Some(t0 + Duration::from_secs(90)));
        assert_eq!(next_check(both, t0, t0, (true, false)), Some(t0 + Duration::from_secs(120)));
        assert_eq!(next_check(limits(None, None), t0, t0, (false, false)), None);
    }

    /// Input after the idle warning moves the next check later than the end the timer was
    /// armed for, so the relay need not re-arm it on input (it looks early, then re-arms).
    #[test]
    fn input_never_makes_the_next_idle_check_earlier() {
        let t0 = Instant::now();
        for secs in [4, 60, 600, 3600] {
            let l = limits(Some(secs), None);
            let armed = next_check(l, t0, t0, (false, true)).unwrap();
            // The warning came at the earliest moment; input just after it.
            let typed = t0 + Duration::from_secs(secs) - warn_lead(Duration::from_secs(secs));
            assert!(next_check(l, t0, typed, (false, false)).unwrap() >= armed, "idle {secs}s");
        }
    }
}
