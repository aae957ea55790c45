//! What every accept loop (ssh, rdp, admin socket, enrollment) shares: a backoff on accept
//! errors, so that running out of file descriptors (EMFILE) does not turn the loop into a
//! busy spin; warnings rate-limited (`postern_tunnel::log_limit`);
//! and, against floods of connections that never prove who they are, per-source caps
//! ([`SourceSlots`]), a per-source backoff after refusals ([`FailureBackoff`]) and audit
//! events for refusals limited to one per source per interval ([`RefusalDigest`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postern_tunnel::CancellationToken;
pub use postern_tunnel::slots::{Full, Slot, SourceSlots};

/// Backoff of an accept loop: after an error, wait [`Self::FIRST`], doubling on each
/// consecutive error up to [`Self::MAX`]; a successful accept resets it.
#[derive(Debug)]
pub struct AcceptBackoff {
    next: Duration,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
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
        postern_tunnel::warn_limited!(door, error = %error, retry_in_ms = delay.as_millis() as u64,
            "accept failed (too many open files? see RLIMIT_NOFILE); backing off");
        tokio::time::sleep(delay).await;
    }
}

/// Refusals of connections that never proved who they are (an RDP client without a valid
/// token, an enrollment with a bad token), written to the audit log at most once per source
/// address per interval: the first refusal of an interval is written at once, the others
/// are counted, and when the interval ends one summary stands for them all (the last
/// refusal, with how many). A flood from one address thus writes two events per interval,
/// whatever its rate. An interval of zero writes every refusal.
#[derive(Debug)]
pub struct RefusalDigest<T> {
    interval: Duration,
    /// Open intervals by source; `None` gathers the sources beyond [`Self::MAX_SOURCES`].
    windows: Mutex<HashMap<Option<IpAddr>, Window<T>>>,
}

#[derive(Debug)]
struct Window<T> {
    started: Instant,
    /// Refusals since the interval started, not yet written.
    count: u64,
    last: Option<T>,
}

impl<T> RefusalDigest<T> {
    /// Sources tracked at once; refusals from further sources share one count.
    pub const MAX_SOURCES: usize = 4096;

    pub fn new(interval: Duration) -> Self {
        Self { interval, windows: Mutex::new(HashMap::new()) }
    }

    /// A refusal from `source` at `now`: `Some(refusal)` when it is to be written now,
    /// `None` when it was counted for the summary.
    pub fn refused(&self, source: IpAddr, refusal: T, now: Instant) -> Option<T> {
        if self.interval.is_zero() {
            return Some(refusal);
        }
        let Ok(mut windows) = self.windows.lock() else { return Some(refusal) };
        let key = if windows.len() >= Self::MAX_SOURCES && !windows.contains_key(&Some(source)) {
            None
        } else {
            Some(source)
        };
        match windows.get_mut(&key) {
            Some(w) => {
                w.count = w.count.saturating_add(1);
                w.last = Some(refusal);
                None
            }
            None => {
                windows.insert(key, Window { started: now, count: 0, last: None });
                Some(refusal)
            }
        }
    }

    /// The summaries of the intervals ended by `now`: the last refusal of each and how many
    /// it stands for. A source with no refusal left to summarise is forgotten.
    pub fn due(&self, now: Instant) -> Vec<(T, u64)> {
        let mut out = Vec::new();
        let Ok(mut windows) = self.windows.lock() else { return out };
        windows.retain(|_, w| {
            if now.saturating_duration_since(w.started) < self.interval {
                return true;
            }
            match w.last.take() {
                Some(last) => {
                    out.push((last, std::mem::take(&mut w.count)));
                    // A flood going on is summarised again one interval from now.
                    w.started = now;
                    true
                }
                None => false,
            }
        });
        out
    }

    /// Every summary still open (at shutdown).
    pub fn drain(&self) -> Vec<(T, u64)> {
        let Ok(mut windows) = self.windows.lock() else { return Vec::new() };
        windows.drain().filter_map(|(_, w)| w.last.map(|l| (l, w.count))).collect()
    }

    /// Sources with an open interval.
    pub fn sources(&self) -> usize {
        self.windows.lock().map(|w| w.len()).unwrap_or(0)
    }
}

impl<T> RefusalDigest<T> {
    /// Hand each summary to `write` as its interval ends, until `shutdown`; then the rest.
    pub async fn summarise(self: Arc<Self>, write: impl Fn(T, u64), shutdown: CancellationToken) {
        if self.interval.is_zero() {
            return;
        }
        let mut tick = tokio::time::interval((self.interval / 4).max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            for (last, count) in self.due(Instant::now()) {
                write(last, count);
            }
        }
        for (last, count) in self.drain() {
            write(last, count);
        }
    }
}

/// A per-source backoff after refusals: the first [`Self::FREE`] refusals in a row from an
/// address cost nothing more; each further one shuts the address out for a while, from
/// [`Self::FIRST`] doubling to [`Self::MAX`]. A success, or [`Self::FORGET`] without a
/// refusal, starts the address afresh.
#[derive(Debug, Default)]
pub struct FailureBackoff {
    sources: Mutex<HashMap<IpAddr, Failures>>,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    blocked_until: Instant,
}

impl FailureBackoff {
    pub const FREE: u32 = 5;
    pub const FIRST: Duration = Duration::from_secs(1);
    pub const MAX: Duration = Duration::from_secs(60);
    pub const FORGET: Duration = Duration::from_secs(600);
    /// Addresses remembered at once (bounded memory); past it, the idle ones are dropped.
    pub const MAX_SOURCES: usize = 10_000;

    /// How much longer `source` is shut out at `now`, if it is.
    pub fn blocked(&self, source: IpAddr, now: Instant) -> Option<Duration> {
        let sources = self.sources.lock().ok()?;
        let f = sources.get(&source)?;
        (f.blocked_until > now).then(|| f.blocked_until.saturating_duration_since(now))
    }

    /// `source` was refused at `now`.
    pub fn failed(&self, source: IpAddr, now: Instant) {
        let Ok(mut sources) = self.sources.lock() else { return };
        if sources.len() >= Self::MAX_SOURCES && !sources.contains_key(&source) {
            sources.retain(|_, f| now.saturating_duration_since(f.last) < Self::FORGET && f.blocked_until > now);
            if sources.len() >= Self::MAX_SOURCES {
                return;
            }
        }
        let f = sources.entry(source).or_insert(Failures { count: 0, last: now, blocked_until: now });
        if now.saturating_duration_since(f.last) >= Self::FORGET {
            f.count = 0;
        }
        f.count = f.count.saturating_add(1);
        f.last = now;
        if let Some(over) = f.count.checked_sub(Self::FREE + 1) {
            let wait = Self::FIRST.saturating_mul(1u32 << over.min(16)).min(Self::MAX);
            f.blocked_until = now + wait;
        }
    }

    /// `source` succeeded: forget its refusals.
    pub fn succeeded(&self, source: IpAddr) {
        if let Ok(mut sources) = self.sources.lock() {
            sources.remove(&source);
        }
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
    fn refusal_digest_writes_the_first_at_once_and_one_summary_per_interval() {
        let d = RefusalDigest::new(Duration::from_secs(10));
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        assert_eq!(d.refused(a, 0, t0), Some(0));
        for i in 1..=999 {
            assert_eq!(d.refused(a, i, t0 + Duration::from_millis(i)), None);
        }
        // Another source is not held back by the first.
        assert_eq!(d.refused(b, 1000, t0), Some(1000));
        assert!(d.due(t0 + Duration::from_secs(9)).is_empty());
        // The interval ends: one summary for `a` (the last refusal, 999 of them); `b` had
        // nothing more and is forgotten.
        assert_eq!(d.due(t0 + Duration::from_secs(10)), vec![(999, 999)]);
        assert_eq!(d.sources(), 1);
        // The flood goes on: counted, summarised an interval later; then quiet: forgotten.
        assert_eq!(d.refused(a, 2000, t0 + Duration::from_secs(11)), None);
        assert!(d.due(t0 + Duration::from_secs(15)).is_empty());
        assert_eq!(d.due(t0 + Duration::from_secs(20)), vec![(2000, 1)]);
        assert!(d.due(t0 + Duration::from_secs(30)).is_empty());
        assert_eq!(d.sources(), 0);
        assert_eq!(d.refused(a, 3000, t0 + Duration::from_secs(31)), Some(3000));
        // Zero: every refusal is written.
        let every = RefusalDigest::new(Duration::ZERO);
        assert_eq!((every.refused(a, 1, t0), every.refused(a, 2, t0)), (Some(1), Some(2)));
    }

    #[test]
    fn refusal_digest_is_bounded_in_sources() {
        let d = RefusalDigest::new(Duration::from_secs(10));
        let t0 = Instant::now();
        for i in 0..(RefusalDigest::<u32>::MAX_SOURCES as u32 + 100) {
            d.refused(IpAddr::from(std::net::Ipv6Addr::from(u128::from(i))), i, t0);
        }
        assert_eq!(d.sources(), RefusalDigest::<u32>::MAX_SOURCES + 1, "the rest share one entry");
    }

    #[test]
    fn failure_backoff_grows_after_the_free_refusals_and_resets_on_success() {
        let b = FailureBackoff::default();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..FailureBackoff::FREE {
            b.failed(a, t0);
        }
        assert_eq!(b.blocked(a, t0), None, "the first refusals cost nothing more");
        b.failed(a, t0);
        assert_eq!(b.blocked(a, t0), Some(Duration::from_secs(1)));
        b.failed(a, t0);
        assert_eq!(b.blocked(a, t0), Some(Duration::from_secs(2)));
        for _ in 0..20 {
            b.failed(a, t0);
        }
        assert_eq!(b.blocked(a, t0), Some(FailureBackoff::MAX));
        assert_eq!(b.blocked("127.0.0.2".parse().unwrap(), t0), None, "other sources are not shut out");
        assert_eq!(b.blocked(a, t0 + FailureBackoff::MAX), None);
        b.succeeded(a);
        b.failed(a, t0);
        assert_eq!(b.blocked(a, t0), None);
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
