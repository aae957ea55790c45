//! Small pure helpers used across the gateway, the client and the policy engine.

/// `*` matches any run of characters, `?` exactly one; everything else matches itself.
/// Iterative with one backtrack point and no allocation: policy evaluation calls this for
/// every candidate statement.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    if !pattern.bytes().any(|b| b == b'*' || b == b'?') {
        return pattern == name;
    }
    // Names and patterns are ASCII almost always; work on bytes then, on chars otherwise.
    if pattern.is_ascii() && name.is_ascii() {
        return glob_slices(pattern.as_bytes(), name.as_bytes(), b'*', b'?');
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    glob_slices(&p, &n, '*', '?')
}

fn glob_slices<T: PartialEq + Copy>(p: &[T], n: &[T], star: T, one: T) -> bool {
    let (mut pi, mut ni) = (0, 0);
    let mut back: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some(&c) if c == star => {
                back = Some((pi, ni));
                pi += 1;
            }
            Some(&c) if c == one || Some(&c) == n.get(ni) => {
                pi += 1;
                ni += 1;
            }
            _ => match back {
                Some((bp, bn)) => {
                    pi = bp + 1;
                    ni = bn + 1;
                    back = Some((bp, bn + 1));
                }
                None => return false,
            },
        }
    }
    p.get(pi..).is_some_and(|rest| rest.iter().all(|&c| c == star))
}

/// Instance, user, group and policy names appear in host names (`web-01.<suffix>`) and
/// commands: keep them to letters, digits, '-', '_' and '.', at most 63 characters.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 63 && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// A usable instance name from whatever hostname an agent reported. A name that looks like
/// an agent id (`ag-…`) is prefixed with `host-`: `resolve_instance` tries ids first, so an
/// agent must not be able to pass itself off as another one by its hostname.
pub fn name_from_hostname(hostname: &str) -> String {
    let cleaned: String = hostname
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '-' })
        .take(63)
        .collect();
    if cleaned.is_empty() {
        "instance".into()
    } else if cleaned.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("ag-")) {
        format!("host-{cleaned}").chars().take(63).collect()
    } else {
        cleaned
    }
}

/// Text a peer supplied (an agent's hostname, platform, version), made safe to store and
/// print: at most `max` characters, control characters (ESC, CR, BEL, ...) replaced by '?'.
pub fn clean_text(s: &str, max: usize) -> String {
    s.chars().take(max).map(|c| if c.is_control() { '?' } else { c }).collect()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A query string or form value decoded: `%XX` and `+` (a `%` not followed by two hex
/// digits stays as it is; invalid UTF-8 becomes U+FFFD).
pub fn url_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => match bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(v) => {
                    out.push(v);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            _ => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Bytes of a hex string; `None` for odd length or a non-hex digit.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|p| u8::from_str_radix(p, 16).ok())).collect()
}

/// SHA-256 of `bytes`, as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// The system random number generator failed (no entropy source).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("system random number generator failed")]
pub struct RandomError;

/// `n` random bytes from the system generator, as lowercase hex.
pub fn random_hex(n: usize) -> Result<String, RandomError> {
    let mut b = vec![0u8; n];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).map_err(|_| RandomError)?;
    Ok(hex(&b))
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// A Unix time as RFC 3339 (UTC); the number itself if it is out of range.
pub fn rfc3339(unix: i64) -> String {
    jiff::Timestamp::from_second(unix).map(|t| t.to_string()).unwrap_or_else(|_| unix.to_string())
}

/// A line diff (`-` old, `+` new, two lines of context), for policy versions.
pub fn line_diff(old: &str, new: &str) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    // Longest common subsequence table (flat, row-major); policy documents are small.
    let w = b.len() + 1;
    let mut lcs = vec![0u32; (a.len() + 1) * w];
    let at = |t: &[u32], i: usize, j: usize| t.get(i * w + j).copied().unwrap_or(0);
    for (i, x) in a.iter().enumerate().rev() {
        for (j, y) in b.iter().enumerate().rev() {
            let v = if x == y { at(&lcs, i + 1, j + 1) + 1 } else { at(&lcs, i + 1, j).max(at(&lcs, i, j + 1)) };
            if let Some(cell) = lcs.get_mut(i * w + j) {
                *cell = v;
            }
        }
    }
    let mut ops: Vec<(char, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    loop {
        match (a.get(i), b.get(j)) {
            (None, None) => break,
            (Some(x), Some(y)) if x == y => {
                ops.push((' ', x));
                i += 1;
                j += 1;
            }
            (Some(x), y) if y.is_none() || at(&lcs, i + 1, j) >= at(&lcs, i, j + 1) => {
                ops.push(('-', x));
                i += 1;
            }
            (_, Some(y)) => {
                ops.push(('+', y));
                j += 1;
            }
            (_, None) => break,
        }
    }
    let near = |k: usize| {
        ops.get(k.saturating_sub(2)..(k + 3).min(ops.len())).is_some_and(|w| w.iter().any(|(c, _)| *c != ' '))
    };
    let mut out = String::new();
    let mut skipped = false;
    for (k, (c, line)) in ops.iter().enumerate() {
        if *c == ' ' && !near(k) {
            skipped = true;
            continue;
        }
        if skipped {
            out.push_str("  ...\n");
            skipped = false;
        }
        out.push_str(&format!("{c} {line}\n"));
    }
    out
}

/// Levenshtein distance between two names (characters), for "did you mean" hints.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row.first().copied().unwrap_or(0);
        if let Some(first) = row.first_mut() {
            *first = i + 1;
        }
        for (j, cb) in b.iter().enumerate() {
            let above = row.get(j + 1).copied().unwrap_or(0);
            let left = row.get(j).copied().unwrap_or(0);
            let best = (prev + usize::from(ca != *cb)).min(above + 1).min(left + 1);
            prev = above;
            if let Some(x) = row.get_mut(j + 1) {
                *x = best;
            }
        }
    }
    row.last().copied().unwrap_or(0)
}

/// The candidate closest to `typed` when it is a near miss (1 edit for names of 3 to 5
/// characters, 2 for longer ones; none for shorter); ties go to the first in `candidates`. Only
/// names the caller may show go in: the hint must not reveal others.
pub fn near_miss<'a>(typed: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = match typed.chars().count() {
        0..=2 => return None,
        3..=5 => 1,
        _ => 2,
    };
    let scored: Vec<(usize, &str)> = candidates.into_iter().map(|c| (edit_distance(typed, c), c)).collect();
    if scored.iter().any(|(d, _)| *d == 0) {
        return None;
    }
    scored.into_iter().filter(|(d, _)| *d <= limit).min_by_key(|(d, _)| *d).map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    #[test]
    fn url_values_are_decoded() {
        use super::url_decode;
        assert_eq!(url_decode("env%3Dprod%2Crole%21%3Ddb"), "env=prod,role!=db");
        assert_eq!(url_decode("a+b%20c"), "a b c");
        assert_eq!(url_decode("100%"), "100%");
        assert_eq!(url_decode("%zz%4"), "%zz%4");
        assert_eq!(url_decode("%ff"), "\u{fffd}");
    }

    #[test]
    fn near_misses() {
        use super::{edit_distance, near_miss};
        assert_eq!(edit_distance("web-01", "web-01"), 0);
        assert_eq!(edit_distance("web-1", "web-01"), 1);
        assert_eq!(edit_distance("wbe-01", "web-01"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
        let seen = ["db-01", "web-01", "web-02"];
        assert_eq!(near_miss("web-1", seen), Some("web-01"));
        assert_eq!(near_miss("web-03", seen), Some("web-01"));
        assert_eq!(near_miss("mail-01", seen), None);
        assert_eq!(near_miss("web-01", seen), None, "an exact name is not a near miss");
        assert_eq!(near_miss("x", ["y"]), None, "one-letter names are too short to guess");
    }

    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("*", "web-01"));
        assert!(glob_match("web-*", "web-01"));
        assert!(glob_match("web-0?", "web-01"));
        assert!(!glob_match("web-0?", "web-010"));
        assert!(!glob_match("db-*", "web-01"));
        assert!(glob_match("*-01", "web-01"));
        assert!(!glob_match("", "x"));
        assert!(glob_match("", ""));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("*.internal", "db.eu.internal"));
        assert!(glob_match("**?", "x"));
        assert!(!glob_match("?", ""));
        assert!(glob_match("é*", "éa"));
        assert!(glob_match("?", "é"));
    }

    #[test]
    fn times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_126_400), "2026-12-01T12:00:00Z");
        assert_eq!(rfc3339(i64::MAX), i64::MAX.to_string());
        assert!(now_unix() > 1_700_000_000);
    }

    #[test]
    fn names() {
        assert!(valid_name("web-01.prod"));
        assert!(!valid_name("web 01"));
        assert!(!valid_name(""));
        assert!(!valid_name(&"a".repeat(64)));
        assert_eq!(name_from_hostname("my host;rm -rf"), "my-host-rm--rf");
        assert_eq!(name_from_hostname(""), "instance");
        assert_eq!(name_from_hostname(&"h".repeat(300)).len(), 63);
        assert_eq!(name_from_hostname("ag-0123456789abcdef"), "host-ag-0123456789abcdef");
        assert_eq!(name_from_hostname("AG-x"), "host-AG-x");
        assert_eq!(name_from_hostname(&format!("ag-{}", "h".repeat(300))).len(), 63);
        assert_eq!(clean_text("a\x1b[31mb\r\u{9b}c", 100), "a?[31mb??c");
        assert_eq!(clean_text(&"x".repeat(100), 10).len(), 10);
    }

    #[test]
    fn diffs_show_changed_lines_with_context() {
        let d = line_diff("a\nb\nc\nd\ne\nf\ng\n", "a\nb\nc\nD\ne\nf\ng\nh\n");
        assert_eq!(d, "  b\n  c\n- d\n+ D\n  e\n  f\n  g\n+ h\n".replace("  b", "  ...\n  b"));
        assert_eq!(line_diff("", "x\n"), "+ x\n");
        assert_eq!(line_diff("same\n", "same\n"), "");
    }
}
