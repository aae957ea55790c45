//! Backoff for failed SSH authentications, by source address and by user at that address.
//!
//! Every authentication attempt (a key offered, a signature, a certificate) counts as a
//! failure from the moment it arrives, and is forgiven if it succeeds: so many parallel
//! connections see each other's attempts at once, not when they end. Once a source address,
//! or one user name at that address, has more recent failures than a free allowance, its
//! next attempt waits before it is looked at: 250 ms, doubling with each further failure,
//! up to `[ssh] auth_delay_max` for the user and `auth_delay_max_per_source` for the source
//! as a whole. Failures fade: their count halves every minute.
//!
//! There is no lockout: the right key always gets in, after at most the delays. The
//! per-source cap is short so that others at an address being used for guessing (an
//! administrator, users behind the same NAT) get in within seconds; the long delay falls
//! on the user name being guessed. The user name counts per source address, so guessing
//! from elsewhere cannot slow down a user's own logins.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures answered without delay: per user name at one source address ...
const FREE_PER_USER: f64 = 5.0;
/// ... and per source address, whatever the user names.
const FREE_PER_SOURCE: f64 = 20.0;
/// The first delay; it doubles with each further failure, up to the caps.
const FIRST_DELAY: Duration = Duration::from_millis(250);
/// Recent failures count fully; each minute halves their weight.
const HALF_LIFE: Duration = Duration::from_secs(60);
/// Most entries in each table (memory stays bounded under a spread-out flood); when full,
/// forgotten entries go first, then the least recently touched one.
const MAX_ENTRIES: usize = 10_000;
/// A user name is remembered by its first 64 characters.
const MAX_USER_CHARS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Caps {
    pub per_user: Duration,
    pub per_source: Duration,
}

#[derive(Debug)]
pub(super) struct AuthThrottle {
    /// `None`: the backoff is off (`[ssh] auth_delay_max = "0"`).
    caps: Option<Caps>,
    tables: Mutex<Tables>,
}

#[derive(Debug)]
struct Tables {
    sources: Scores<IpAddr>,
    users: Scores<(IpAddr, String)>,
}

impl AuthThrottle {
    pub(super) fn new(caps: Option<Caps>) -> Self {
        Self { caps, tables: Mutex::new(Tables { sources: Scores::new(MAX_ENTRIES), users: Scores::new(MAX_ENTRIES) }) }
    }

    /// An attempt by `user` from `source` starts: count it as failed (until
    /// [`Self::forgive`] or [`Self::succeeded`]) and say how long it must wait first.
    pub(super) fn attempt(&self, source: IpAddr, user: &str) -> Duration {
        self.attempt_at(source, user, Instant::now())
    }

    /// The attempt was not a failure after all (a key offer that was accepted: the signed
    /// request that follows is counted in its turn).
    pub(super) fn forgive(&self, source: IpAddr, user: &str) {
        self.forgive_at(source, user, Instant::now());
    }

    fn forgive_at(&self, source: IpAddr, user: &str, now: Instant) {
        let Ok(mut t) = self.tables.lock() else { return };
        t.sources.add(source, -1.0, now);
        t.users.add(user_key(source, user), -1.0, now);
    }

    /// The attempt authenticated `user`: forgive it, and the user's earlier failures from
    /// this address (the right person was fumbling keys, or someone else was guessing).
    pub(super) fn succeeded(&self, source: IpAddr, user: &str) {
        self.succeeded_at(source, user, Instant::now());
    }

    fn succeeded_at(&self, source: IpAddr, user: &str, now: Instant) {
        let Ok(mut t) = self.tables.lock() else { return };
        t.sources.add(source, -1.0, now);
        t.users.remove(&user_key(source, user));
    }

    fn attempt_at(&self, source: IpAddr, user: &str, now: Instant) -> Duration {
        let Some(caps) = self.caps else { return Duration::ZERO };
        let Ok(mut t) = self.tables.lock() else { return Duration::ZERO };
        let key = user_key(source, user);
        let by_user = delay(t.users.get(&key, now), FREE_PER_USER, caps.per_user);
        let by_source = delay(t.sources.get(&source, now), FREE_PER_SOURCE, caps.per_source);
        t.sources.add(source, 1.0, now);
        t.users.add(key, 1.0, now);
        by_user.max(by_source)
    }
}

fn user_key(source: IpAddr, user: &str) -> (IpAddr, String) {
    (source, user.chars().take(MAX_USER_CHARS).collect())
}

/// The wait for an attempt after `failures` recent ones: none up to `free`, then
/// [`FIRST_DELAY`] doubling per failure, at most `cap`.
fn delay(failures: f64, free: f64, cap: Duration) -> Duration {
    if failures < free {
        return Duration::ZERO;
    }
    // Bounded exponent: 2^20 times the first delay is far beyond any cap.
    let over = (failures - free).floor().min(20.0) as i32;
    FIRST_DELAY.mul_f64(2f64.powi(over)).min(cap)
}

/// Decaying failure counts by key, at most `max` keys.
#[derive(Debug)]
struct Scores<K> {
    map: HashMap<K, Score>,
    max: usize,
}

#[derive(Debug, Clone, Copy)]
struct Score {
    value: f64,
    at: Instant,
}

impl Score {
    fn at(self, now: Instant) -> f64 {
        let halvings = now.saturating_duration_since(self.at).as_secs_f64() / HALF_LIFE.as_secs_f64();
        self.value * 0.5f64.powf(halvings)
    }
}

/// Below this a count is forgotten.
const FORGOTTEN: f64 = 0.5;

impl<K: Hash + Eq + Clone> Scores<K> {
    fn new(max: usize) -> Self {
        Self { map: HashMap::new(), max }
    }

    fn get(&self, key: &K, now: Instant) -> f64 {
        self.map.get(key).map_or(0.0, |s| s.at(now))
    }

    fn add(&mut self, key: K, delta: f64, now: Instant) {
        if let Some(s) = self.map.get_mut(&key) {
            *s = Score { value: (s.at(now) + delta).max(0.0), at: now };
            return;
        }
        if delta <= 0.0 {
            return;
        }
        if self.map.len() >= self.max {
            self.map.retain(|_, s| s.at(now) >= FORGOTTEN);
        }
        if self.map.len() >= self.max
            && let Some(oldest) = self.map.iter().min_by_key(|(_, s)| s.at).map(|(k, _)| k.clone())
        {
            self.map.remove(&oldest);
        }
        self.map.insert(key, Score { value: delta, at: now });
    }

    fn remove(&mut self, key: &K) {
        self.map.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: Caps = Caps { per_user: Duration::from_secs(30), per_source: Duration::from_secs(2) };

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn delays_start_after_the_free_failures_and_double_up_to_the_cap() {
        let t = AuthThrottle::new(Some(CAPS));
        let now = Instant::now();
        let delays: Vec<u64> = (0..14).map(|_| t.attempt_at(ip(1), "mallory", now).as_millis() as u64).collect();
        assert_eq!(delays, [0, 0, 0, 0, 0, 250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
    }

    #[test]
    fn another_user_at_the_same_address_waits_at_most_the_source_cap() {
        let t = AuthThrottle::new(Some(CAPS));
        let now = Instant::now();
        for _ in 0..100 {
            t.attempt_at(ip(1), "mallory", now);
        }
        assert_eq!(t.attempt_at(ip(1), "admin", now), Duration::from_secs(2));
        // Another address is not slowed down at all, even for the same user name.
        assert_eq!(t.attempt_at(ip(2), "mallory", now), Duration::ZERO);
    }

    #[test]
    fn failures_fade_and_success_forgives() {
        let t = AuthThrottle::new(Some(CAPS));
        let now = Instant::now();
        for _ in 0..12 {
            t.attempt_at(ip(1), "alice", now);
        }
        assert_eq!(t.attempt_at(ip(1), "alice", now), Duration::from_secs(30));
        // 13 failures, halved every minute: under the free 5 after two minutes.
        assert_eq!(t.attempt_at(ip(1), "alice", now + 2 * HALF_LIFE), Duration::ZERO);
        let later = now + 2 * HALF_LIFE;
        t.succeeded_at(ip(1), "alice", later);
        assert_eq!(t.tables.lock().unwrap().users.get(&user_key(ip(1), "alice"), later), 0.0);
        // Forgiving an attempt takes its strike back.
        let before = t.tables.lock().unwrap().sources.get(&ip(1), later);
        t.attempt_at(ip(1), "bob", later);
        t.forgive_at(ip(1), "bob", later);
        let after = t.tables.lock().unwrap().sources.get(&ip(1), later);
        assert!((after - before).abs() < 0.1, "{before} -> {after}");
    }

    #[test]
    fn off_means_no_delay() {
        let t = AuthThrottle::new(None);
        let now = Instant::now();
        assert!((0..100).all(|_| t.attempt_at(ip(1), "mallory", now).is_zero()));
    }

    #[test]
    fn tables_stay_bounded_and_drop_forgotten_then_oldest_entries() {
        let mut s: Scores<u32> = Scores::new(3);
        let now = Instant::now();
        s.add(1, 1.0, now);
        s.add(2, 5.0, now + Duration::from_secs(1));
        s.add(3, 5.0, now + Duration::from_secs(2));
        s.add(4, 1.0, now + Duration::from_secs(3));
        assert_eq!(s.map.len(), 3);
        assert_eq!(s.get(&1, now), 0.0, "the oldest entry goes");
        // Ten minutes later everything is forgotten: all make room.
        let later = now + 10 * HALF_LIFE;
        s.add(5, 1.0, later);
        assert_eq!(s.map.len(), 1);
        // Many user names from many addresses: never more than the bound.
        let t = AuthThrottle::new(Some(CAPS));
        for i in 0..(MAX_ENTRIES + 50) {
            t.attempt_at(IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8]), &format!("u{i}"), now);
        }
        let tables = t.tables.lock().unwrap();
        assert_eq!((tables.sources.map.len(), tables.users.map.len()), (MAX_ENTRIES, MAX_ENTRIES));
    }
}
