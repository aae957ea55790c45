//! Durations as people write them in configs, policies and on the command line.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("invalid duration {0:?}: expected e.g. 90s, 15m, 8h, 30d")]
    Number(String),
    #[error("invalid duration unit in {0:?}: use s, m, h or d")]
    Unit(String),
    #[error("duration {0:?} is too large")]
    TooLarge(String),
    #[error("duration {0:?} must be positive")]
    Zero(String),
}

/// A session limit: `None` when disabled with "0".
pub fn parse_limit(s: &str) -> Result<Option<Duration>, DurationError> {
    if s.trim() == "0" { Ok(None) } else { parse_duration(s).map(Some) }
}

/// Parse "90s", "15m", "8h", "30d" (or a bare number of seconds).
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| DurationError::Number(s.to_owned()))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(DurationError::Unit(s.to_owned())),
    };
    let secs = n.checked_mul(mult).ok_or_else(|| DurationError::TooLarge(s.to_owned()))?;
    if secs == 0 {
        return Err(DurationError::Zero(s.to_owned()));
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("8h").unwrap(), Duration::from_secs(8 * 3600));
        assert_eq!(parse_duration("30d").unwrap(), Duration::from_secs(30 * 86400));
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5w").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }
}
