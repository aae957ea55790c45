//! What every accept loop (ssh, rdp, admin socket) shares: a backoff on accept errors, so
//! that running out of file descriptors (EMFILE) does not turn the loop into a busy spin,
//! and warnings limited to one line per interval with a count of what was left out.

use std::time::{Duration, Instant};

use tracing::warn;

/// At most one log line per `every`; the lines left out are counted and reported with the
/// next one.
#[derive(Debug)]
pub struct LogLimiter {
    every: Duration,
    last: Option<Instant>,
    skipped: u64,
}

impl LogLimiter {
    pub const fn new(every: Duration) -> Self {
        Self { every, last: None, skipped: 0 }
    }

    /// `Some(lines left out since the last one)` when a line may be written `now`.
    pub fn tick(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.saturating_duration_since(last) < self.every => {
                self.skipped = self.skipped.saturating_add(1);
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.skipped))
            }
        }
    }
}

/// Backoff of an accept loop: after an error, wait [`Self::FIRST`], doubling on each
/// consecutive error up to [`Self::MAX`]; a successful accept resets it.
#[derive(Debug)]
pub struct AcceptBackoff {
    next: Duration,
    log: LogLimiter,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self { next: Self::FIRST, log: LogLimiter::new(Duration::from_secs(1)) }
    }
}

impl AcceptBackoff {
    pub const FIRST: Duration = Duration::from_millis(10);
    pub const MAX: Duration = Duration::from_secs(1);

    /// How long to wait after this error (and double the wait for the next one).
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        delay
    }

    /// An accept succeeded.
    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    /// An accept of `door` failed: warn (rate-limited) and wait before the next accept.
    pub async fn failed(&mut self, door: &str, error: &std::io::Error) {
        let delay = self.next_delay();
        if let Some(skipped) = self.log.tick(Instant::now()) {
            warn!(door, error = %error, retry_in_ms = delay.as_millis() as u64, suppressed = skipped,
                "accept failed (too many open files? see RLIMIT_NOFILE); backing off");
        }
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_ceiling_and_resets() {
        let mut b = AcceptBackoff::default();
        let delays: Vec<u128> = (0..10).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), AcceptBackoff::FIRST);
        assert_eq!(b.next_delay(), Duration::from_millis(20));
    }

    #[test]
    fn log_limiter_writes_one_line_per_interval_with_a_count() {
        let mut l = LogLimiter::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(l.tick(t0), Some(0));
        for i in 1..=999u64 {
            assert_eq!(l.tick(t0 + Duration::from_micros(i)), None);
        }
        assert_eq!(l.tick(t0 + Duration::from_millis(1000)), Some(999));
        assert_eq!(l.tick(t0 + Duration::from_millis(1001)), None);
    }

    /// An accept loop failing at once, every time (EMFILE), makes few attempts in 10 s:
    /// not a spin.
    #[test]
    fn a_failing_accept_loop_does_not_spin() {
        let mut b = AcceptBackoff::default();
        let (mut waited, mut attempts) = (Duration::ZERO, 0u32);
        while waited < Duration::from_secs(10) {
            attempts += 1;
            waited += b.next_delay();
        }
        // 10+20+...+640 ms, then one a second: 17 attempts in 10 s.
        assert!(attempts < 20, "{attempts} attempts in 10 s");
    }
}
