//! The free-space guard (`[audit] min_free_space`): before a logged session starts, the
//! file system that holds the recordings must have this much free space, so sessions are
//! refused (or run unrecorded, failing open) before the disk is full rather than after.
//! One alert event per episode: the guard remembers that space is low until a later check
//! finds enough again.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// The threshold, as configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MinFree {
    /// Not set: the smaller of 1 GiB and 5 % of the file system's size.
    Auto,
    /// "0": no guard.
    Off,
    Bytes(u64),
    /// A percentage of the file system's size.
    Percent(f64),
}

const AUTO_BYTES: u64 = 1 << 30;
const AUTO_PERCENT: f64 = 5.0;

/// Parse `[audit] min_free_space`: bytes ("1073741824", "512MiB", "2G"), a percentage of
/// the file system ("5%"), or "0" (no guard).
pub fn parse_min_free(s: &str) -> Result<MinFree, String> {
    let s = s.trim();
    if let Some(p) = s.strip_suffix('%') {
        return match p.trim().parse::<f64>() {
            Ok(p) if (0.0..=100.0).contains(&p) => Ok(if p == 0.0 { MinFree::Off } else { MinFree::Percent(p) }),
            _ => Err(format!("{s:?} is not a percentage from 0% to 100%")),
        };
    }
    match parse_bytes(s) {
        Some(0) => Ok(MinFree::Off),
        Some(n) => Ok(MinFree::Bytes(n)),
        None => Err(format!("{s:?} is not a size (bytes, or with K, M, G or T: \"512MiB\"; or \"5%\")")),
    }
}

/// Bytes with an optional binary suffix (K, M, G, T; "KiB", "KB" and "K" all mean 1024).
fn parse_bytes(s: &str) -> Option<u64> {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits);
    let number: u64 = number.parse().ok()?;
    let shift = match unit.trim().to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return None,
    };
    number.checked_mul(1u64 << shift)
}

/// Space on a file system: (free for unprivileged users, total), in bytes.
#[allow(clippy::useless_conversion)] // the widths differ between platforms
pub fn space_of(dir: &Path) -> std::io::Result<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    let unit = u64::from(st.fragment_size());
    Ok((u64::from(st.blocks_available()).saturating_mul(unit), u64::from(st.blocks()).saturating_mul(unit)))
}

/// Below the threshold: what was found.
#[derive(Debug, Clone, PartialEq)]
pub struct LowSpace {
    pub free: u64,
    pub needed: u64,
    /// The first check of this episode (write the alert event).
    pub first: bool,
}

impl LowSpace {
    /// Why, for events and the user.
    pub fn reason(&self) -> String {
        format!(
            "low disk space for recordings: {} free, below [audit] min_free_space ({})",
            human(self.free),
            human(self.needed)
        )
    }
}

/// `n` bytes, readably ("512.0 MiB").
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    let name = UNITS.get(unit).copied().unwrap_or("bytes");
    if unit == 0 { format!("{n} bytes") } else { format!("{v:.1} {name}") }
}

/// The guard: the threshold and whether space is low now (the episode).
#[derive(Debug)]
pub struct SpaceGuard {
    min_free: MinFree,
    low: AtomicBool,
}

impl SpaceGuard {
    pub fn new(min_free: MinFree) -> Self {
        Self { min_free, low: AtomicBool::new(false) }
    }

    /// The threshold in bytes for a file system of `total` bytes (0: no guard).
    fn needed(&self, total: u64) -> u64 {
        let percent = |p: f64| (total as f64 * p / 100.0) as u64;
        match self.min_free {
            MinFree::Off => 0,
            MinFree::Bytes(n) => n,
            MinFree::Percent(p) => percent(p),
            MinFree::Auto => AUTO_BYTES.min(percent(AUTO_PERCENT)),
        }
    }

    /// Check the file system of `dir` (or of its nearest existing ancestor: the recordings
    /// directory is created with the first recording). A file system that cannot be asked
    /// passes: the recording's own creation then says what is wrong.
    pub fn check(&self, dir: &Path) -> Result<(), LowSpace> {
        if self.min_free == MinFree::Off {
            return Ok(());
        }
        let Some((free, total)) = dir.ancestors().find_map(|d| space_of(d).ok()) else {
            return Ok(());
        };
        let needed = self.needed(total);
        if free >= needed {
            self.low.store(false, Ordering::Relaxed);
            return Ok(());
        }
        let first = !self.low.swap(true, Ordering::Relaxed);
        Err(LowSpace { free, needed, first })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_parse_and_low_space_is_reported_once_per_episode() {
        assert_eq!(parse_min_free("0"), Ok(MinFree::Off));
        assert_eq!(parse_min_free("0%"), Ok(MinFree::Off));
        assert_eq!(parse_min_free("4096"), Ok(MinFree::Bytes(4096)));
        assert_eq!(parse_min_free("512MiB"), Ok(MinFree::Bytes(512 << 20)));
        assert_eq!(parse_min_free("2G"), Ok(MinFree::Bytes(2 << 30)));
        assert_eq!(parse_min_free("1 TB"), Ok(MinFree::Bytes(1 << 40)));
        assert_eq!(parse_min_free("5%"), Ok(MinFree::Percent(5.0)));
        for bad in ["", "lots", "5 PB", "101%", "-1", "99999999999T"] {
            assert!(parse_min_free(bad).is_err(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(SpaceGuard::new(MinFree::Off).check(dir.path()), Ok(()));
        assert_eq!(SpaceGuard::new(MinFree::Bytes(1)).check(&dir.path().join("not/yet")), Ok(()));
        let guard = SpaceGuard::new(MinFree::Percent(100.0));
        let low = guard.check(dir.path()).unwrap_err();
        assert!(low.first && low.needed > low.free, "{low:?}");
        assert!(!guard.check(dir.path()).unwrap_err().first, "one alert per episode");
        assert!(low.reason().contains("min_free_space"));
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(10), "10 bytes");
    }
}
