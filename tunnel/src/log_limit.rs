//! Log lines that can repeat under load or attack (one per connection, per refused
//! handshake, per failed retry) are rate-limited by call site: at most [`BURST`] lines per
//! [`WINDOW`] from one site, the rest counted, and when the window ends one summary line
//! `N more suppressed in the last 60 s` (with the site in the `site` field) stands for
//! them. A flood thus writes at most `BURST + 1` lines per site per minute, whatever its
//! rate.
//!
//! The state is one [`Site`] per call site, a `static` made by the macros
//! ([`warn_limited!`](crate::warn_limited), [`info_limited!`](crate::info_limited),
//! [`error_limited!`](crate::error_limited)): nothing is keyed by peer, so nothing grows with
//! the traffic. Sites with lines suppressed are listed (at most [`MAX_LISTED`], a fixed
//! bound above the number of call sites) so that [`flush_due`] — run every second by
//! [`run_summaries`] — writes a summary when a window ends even if the site is quiet by
//! then, and [`flush_all`] writes the counts left when the process stops.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::Level;

/// Lines written per site per window.
pub const BURST: u32 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Sites listed for the periodic summary (more than there are call sites; a site beyond it
/// still gets its summary, with its next line).
pub const MAX_LISTED: usize = 256;

/// The counts of one site in its current window; no I/O, time given (unit-testable).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Window {
    started: Option<Instant>,
    written: u32,
    suppressed: u64,
}

/// What a site does with one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Write the line.
    pub write: bool,
    /// Lines suppressed in the window that just ended: write the summary first.
    pub ended_window: Option<u64>,
}

impl Window {
    /// One line at `now`.
    pub fn admit(&mut self, now: Instant) -> Admission {
        let ended_window = self.roll(now);
        self.started.get_or_insert(now);
        if self.written < BURST {
            self.written += 1;
            Admission { write: true, ended_window }
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            Admission { write: false, ended_window }
        }
    }

    /// If the window has ended by `now`: start afresh and return how many lines it
    /// suppressed (`None` if none).
    pub fn roll(&mut self, now: Instant) -> Option<u64> {
        let started = self.started?;
        if now.saturating_duration_since(started) < WINDOW {
            return None;
        }
        let suppressed = std::mem::take(self).suppressed;
        (suppressed > 0).then_some(suppressed)
    }

    /// Whatever the window: the lines suppressed so far and for how long (the process
    /// stops), and start afresh.
    pub fn take(&mut self, now: Instant) -> Option<(u64, Duration)> {
        let started = self.started?;
        let suppressed = std::mem::take(self).suppressed;
        (suppressed > 0).then(|| (suppressed, now.saturating_duration_since(started)))
    }
}

/// One rate-limited call site (a `static`, made by the macros).
#[derive(Debug)]
pub struct Site {
    /// `module::path:line`, in the summary's `site` field.
    module: &'static str,
    line: u32,
    level: Level,
    window: Mutex<Window>,
    listed: AtomicBool,
}

static LISTED: Mutex<Vec<&'static Site>> = Mutex::new(Vec::new());

impl Site {
    pub const fn new(module: &'static str, line: u32, level: Level) -> Self {
        Site {
            module,
            line,
            level,
            window: Mutex::new(Window { started: None, written: 0, suppressed: 0 }),
            listed: AtomicBool::new(false),
        }
    }

    /// Whether to write a line now (writing the summary of an ended window first).
    pub fn admit(&'static self) -> bool {
        let Ok(mut window) = self.window.lock() else { return true };
        let a = window.admit(Instant::now());
        drop(window);
        if let Some(n) = a.ended_window {
            self.summary(n, WINDOW);
        }
        if !a.write
            && !self.listed.swap(true, Ordering::AcqRel)
            && let Ok(mut listed) = LISTED.lock()
            && listed.len() < MAX_LISTED
        {
            listed.push(self);
        }
        a.write
    }

    fn summary(&self, suppressed: u64, over: Duration) {
        // Whole seconds, rounded up: "in the last 60 s" for a full window.
        let secs = over.as_secs() + u64::from(over.subsec_nanos() > 0);
        let site = format!("{}:{}", self.module, self.line);
        macro_rules! at {
            ($level:expr) => {
                tracing::event!($level, %site, suppressed, "{suppressed} more suppressed in the last {secs} s")
            };
        }
        match self.level {
            Level::ERROR => at!(Level::ERROR),
            Level::WARN => at!(Level::WARN),
            Level::INFO => at!(Level::INFO),
            Level::DEBUG => at!(Level::DEBUG),
            _ => at!(Level::TRACE),
        }
    }
}

fn listed() -> Vec<&'static Site> {
    LISTED.lock().map(|l| l.clone()).unwrap_or_default()
}

/// Write the summary of every window that has ended.
pub fn flush_due() {
    let now = Instant::now();
    for site in listed() {
        let ended = site.window.lock().ok().and_then(|mut w| w.roll(now));
        if let Some(n) = ended {
            site.summary(n, WINDOW);
        }
    }
}

/// Write every count not yet summarised (the process stops).
pub fn flush_all() {
    let now = Instant::now();
    for site in listed() {
        let left = site.window.lock().ok().and_then(|mut w| w.take(now));
        if let Some((n, over)) = left {
            site.summary(n, over);
        }
    }
}

/// [`flush_due`] every second until `shutdown`, then [`flush_all`].
pub async fn run_summaries(shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => flush_due(),
        }
    }
    flush_all();
}

#[doc(hidden)]
pub use tracing as __tracing;

/// `tracing::event!` at `$level` (a [`tracing::Level`] constant name), rate-limited by call
/// site (see the module).
#[macro_export]
macro_rules! event_limited {
    ($level:ident, $($arg:tt)+) => {{
        static SITE: $crate::log_limit::Site =
            $crate::log_limit::Site::new(module_path!(), line!(), $crate::log_limit::__tracing::Level::$level);
        if SITE.admit() {
            $crate::log_limit::__tracing::event!($crate::log_limit::__tracing::Level::$level, $($arg)+);
        }
    }};
}

/// `warn!`, rate-limited by call site ([`crate::log_limit`]).
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => { $crate::event_limited!(WARN, $($arg)+) };
}

/// `info!`, rate-limited by call site ([`crate::log_limit`]).
#[macro_export]
macro_rules! info_limited {
    ($($arg:tt)+) => { $crate::event_limited!(INFO, $($arg)+) };
}

/// `error!`, rate-limited by call site ([`crate::log_limit`]).
#[macro_export]
macro_rules! error_limited {
    ($($arg:tt)+) => { $crate::event_limited!(ERROR, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_silence_then_one_summary_when_the_window_ends() {
        let t0 = Instant::now();
        let mut w = Window::default();
        for i in 0..BURST {
            assert_eq!(
                w.admit(t0 + Duration::from_millis(u64::from(i))),
                Admission { write: true, ended_window: None }
            );
        }
        for i in 0..190u64 {
            assert_eq!(w.admit(t0 + Duration::from_millis(100 + i)), Admission { write: false, ended_window: None });
        }
        assert_eq!(w.roll(t0 + WINDOW - Duration::from_millis(1)), None, "the window has not ended");
        // The next line after the window: the summary of 190, then the line itself.
        assert_eq!(w.admit(t0 + WINDOW), Admission { write: true, ended_window: Some(190) });
        // A new window: BURST lines again (one used just now).
        for _ in 1..BURST {
            assert!(w.admit(t0 + WINDOW + Duration::from_secs(1)).write);
        }
        assert!(!w.admit(t0 + WINDOW + Duration::from_secs(2)).write);
    }

    #[test]
    fn a_quiet_site_is_summarised_by_the_periodic_roll_once() {
        let t0 = Instant::now();
        let mut w = Window::default();
        for _ in 0..BURST + 5 {
            w.admit(t0);
        }
        assert_eq!(w.roll(t0 + WINDOW), Some(5));
        assert_eq!(w.roll(t0 + WINDOW * 3), None, "summarised once");
        // Nothing suppressed: no summary at all.
        let mut quiet = Window::default();
        quiet.admit(t0);
        assert_eq!(quiet.roll(t0 + WINDOW * 2), None);
        assert_eq!(quiet, Window::default(), "the ended window is forgotten");
    }

    #[test]
    fn at_stop_the_count_so_far_with_its_duration() {
        let t0 = Instant::now();
        let mut w = Window::default();
        for _ in 0..BURST + 3 {
            w.admit(t0);
        }
        assert_eq!(w.take(t0 + Duration::from_secs(7)), Some((3, Duration::from_secs(7))));
        assert_eq!(w.take(t0 + Duration::from_secs(8)), None);
    }

    #[test]
    fn the_macro_writes_at_most_the_burst_from_one_site() {
        // The macro expands to a site of its own (nothing to observe without a subscriber).
        for _ in 0..100 {
            crate::event_limited!(TRACE, n = 1, "unit test line");
        }
        let mut written = 0;
        static PROBE: Site = Site::new("probe", 1, Level::TRACE);
        for _ in 0..100 {
            written += usize::from(PROBE.admit());
        }
        assert_eq!(written, BURST as usize);
        assert_eq!(PROBE.window.lock().unwrap().suppressed, 100 - u64::from(BURST));
        assert!(PROBE.listed.load(Ordering::Acquire), "listed for the periodic summary");
    }
}
