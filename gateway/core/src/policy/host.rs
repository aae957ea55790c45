//! Forward destinations in one spelling. A client names a host however it likes (`127.1`,
//! `0x7f000001`, `LOCALHOST`, `db.internal.`); the resolver on the instance would take most
//! of those spellings to the same place, so rules are matched against one canonical form
//! and the agent is asked to dial exactly that form, never the client's text:
//!
//! - numbers in every `inet_aton` spelling (decimal, octal `0177`, hex `0x7f`, one to four
//!   parts, leading zeros) become a dotted quad; IPv4-mapped IPv6 (`::ffff:127.0.0.1`)
//!   becomes IPv4;
//! - IPv6 addresses lose their brackets; a zone (`fe80::1%eth0`, `::1%1`) is refused;
//! - names are lowercased and lose one trailing dot; only letters, digits, `-` and `_` in
//!   labels of 1 to 63 characters; a name whose last label starts with a digit must be a
//!   valid number (else it is refused, never looked up);
//! - `0.0.0.0` and `::` are refused (connecting to them reaches the host's own listeners);
//! - anything else (spaces, `%`, `/`, non-ASCII) is refused.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The longest host the gateway accepts (DNS names stop at 253).
pub const MAX_HOST_LEN: usize = 253;

/// A forward destination host in its canonical form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    /// Lowercase, no trailing dot, never a number in any spelling.
    Name(String),
}

/// Why a requested host was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("empty host")]
    Empty,
    #[error("host longer than {MAX_HOST_LEN} characters")]
    TooLong,
    #[error("non-ASCII host name (use its ASCII form, xn--...)")]
    NonAscii,
    #[error("IPv6 address with a zone (%...): not accepted as a destination")]
    Zoned,
    #[error("not a valid IPv6 address")]
    BadIpv6,
    #[error("not a valid IPv4 address in any spelling")]
    BadNumber,
    #[error("character {0:?} is not allowed in a host name")]
    BadChar(char),
    #[error("empty or over-long label in the host name")]
    BadLabel,
    #[error("the unspecified address (0.0.0.0, ::) is not a destination")]
    Unspecified,
}

impl Host {
    /// The canonical form of `raw`, or why it is refused.
    pub fn parse(raw: &str) -> Result<Host, HostError> {
        if raw.is_empty() {
            return Err(HostError::Empty);
        }
        if raw.len() > MAX_HOST_LEN + 2 {
            return Err(HostError::TooLong);
        }
        if !raw.is_ascii() {
            return Err(HostError::NonAscii);
        }
        let bare = raw.strip_prefix('[').and_then(|r| r.strip_suffix(']'));
        if raw.contains('%') {
            return Err(if raw.contains(':') { HostError::Zoned } else { HostError::BadChar('%') });
        }
        if let Some(bare) = bare.or_else(|| raw.contains(':').then_some(raw)) {
            let v6: Ipv6Addr = bare.parse().map_err(|_| HostError::BadIpv6)?;
            return Host::ip(v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)));
        }
        let lower = raw.to_ascii_lowercase();
        let name = lower.strip_suffix('.').unwrap_or(&lower);
        if name.len() > MAX_HOST_LEN {
            return Err(HostError::TooLong);
        }
        let labels: Vec<&str> = name.split('.').collect();
        if labels.iter().any(|l| l.is_empty() || l.len() > 63) {
            return Err(HostError::BadLabel);
        }
        if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_' || *c == '.')) {
            return Err(HostError::BadChar(c));
        }
        // A last label that starts with a digit makes the whole host a number to resolvers
        // (`127.1`, `0x7f000001`): it must be one, or it is refused.
        if labels.last().is_some_and(|l| l.starts_with(|c: char| c.is_ascii_digit())) {
            return inet_aton(name).ok_or(HostError::BadNumber).and_then(|v4| Host::ip(IpAddr::V4(v4)));
        }
        Ok(Host::Name(name.to_owned()))
    }

    fn ip(ip: IpAddr) -> Result<Host, HostError> {
        if ip.is_unspecified() { Err(HostError::Unspecified) } else { Ok(Host::Ip(ip)) }
    }

    /// `localhost` and names under it (RFC 6761): always the instance itself.
    pub fn is_loopback_name(&self) -> bool {
        matches!(self, Host::Name(n) if is_loopback_name(n))
    }

    /// A loopback address or a loopback name.
    pub fn is_loopback(&self) -> bool {
        match self {
            Host::Ip(ip) => ip.is_loopback(),
            Host::Name(_) => self.is_loopback_name(),
        }
    }

    /// `host:port`, IPv6 in brackets.
    pub fn with_port(&self, port: u16) -> String {
        match self {
            Host::Ip(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
            other => format!("{other}:{port}"),
        }
    }
}

/// `localhost` or a name ending in `.localhost` (already lowercase).
pub fn is_loopback_name(name: &str) -> bool {
    name == "localhost" || name.ends_with(".localhost")
}

/// The bare address or the name, as the agent is asked to dial it.
impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(n) => f.write_str(n),
        }
    }
}

/// One part of an `inet_aton` number: `0x` hex, a leading `0` octal, else decimal.
fn aton_part(p: &str) -> Option<u32> {
    let (digits, radix) = if let Some(h) = p.strip_prefix("0x") {
        (h, 16)
    } else if p.len() > 1
        && let Some(o) = p.strip_prefix('0')
    {
        (o, 8)
    } else {
        (p, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    // Leading zeros cannot overflow: only the value counts.
    let significant = digits.trim_start_matches('0');
    if significant.is_empty() {
        return Some(0);
    }
    u32::from_str_radix(significant, radix).ok()
}

/// An IPv4 address in any spelling `inet_aton` accepts: `a.b.c.d`, `a.b.c` (c: 16 bits),
/// `a.b` (b: 24 bits) or `a` (32 bits), each part decimal, octal or hex.
fn inet_aton(s: &str) -> Option<Ipv4Addr> {
    let parts: Vec<u32> = s.split('.').map(aton_part).collect::<Option<_>>()?;
    let (last, head) = parts.split_last()?;
    if head.len() > 3 || head.iter().any(|&p| p > 255) {
        return None;
    }
    let tail_bits = 32 - 8 * head.len() as u32;
    if tail_bits < 32 && *last >> tail_bits != 0 {
        return None;
    }
    let value = head.iter().fold(0u32, |acc, &p| (acc << 8) | p);
    let value = if head.is_empty() { *last } else { (value << tail_bits) | last };
    Some(Ipv4Addr::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Result<Host, HostError> {
        Ok(Host::Ip(s.parse().unwrap()))
    }

    fn name(s: &str) -> Result<Host, HostError> {
        Ok(Host::Name(s.into()))
    }

    #[test]
    fn every_spelling_has_one_canonical_form() {
        let table: &[(&str, Result<Host, HostError>)] = &[
            ("127.0.0.1", ip("127.0.0.1")),
            ("127.1", ip("127.0.0.1")),
            ("127.0.1", ip("127.0.0.1")),
            ("2130706433", ip("127.0.0.1")),
            ("0x7f000001", ip("127.0.0.1")),
            ("0X7F000001", ip("127.0.0.1")),
            ("0x7f.1", ip("127.0.0.1")),
            ("0177.0.0.1", ip("127.0.0.1")),
            ("0177.0.0.01", ip("127.0.0.1")),
            ("127.000.000.001", ip("127.0.0.1")),
            ("017700000001", ip("127.0.0.1")),
            ("00000000000000127.0.0.1", ip("87.0.0.1")),
            ("127.0.0.1.", ip("127.0.0.1")),
            ("10.0.258", ip("10.0.1.2")),
            ("255.255.255.255", ip("255.255.255.255")),
            ("4294967295", ip("255.255.255.255")),
            ("::1", ip("::1")),
            ("[::1]", ip("::1")),
            ("[0:0:0:0:0:0:0:1]", ip("::1")),
            ("::ffff:127.0.0.1", ip("127.0.0.1")),
            ("[::ffff:7f00:1]", ip("127.0.0.1")),
            ("localhost", name("localhost")),
            ("LOCALHOST", name("localhost")),
            ("localhost.", name("localhost")),
            ("Secret.Internal.", name("secret.internal")),
            ("db_1.internal", name("db_1.internal")),
            ("3com.example", name("3com.example")),
            ("[::1%1]", Err(HostError::Zoned)),
            ("fe80::1%eth0", Err(HostError::Zoned)),
            ("127.0.0.1%1", Err(HostError::BadChar('%'))),
            ("0.0.0.0", Err(HostError::Unspecified)),
            ("0", Err(HostError::Unspecified)),
            ("[::]", Err(HostError::Unspecified)),
            ("4294967296", Err(HostError::BadNumber)),
            ("256.0.0.1", Err(HostError::BadNumber)),
            ("1.2.3.4.5", Err(HostError::BadNumber)),
            ("1.2.65536", Err(HostError::BadNumber)),
            ("08.0.0.1", Err(HostError::BadNumber)),
            ("0x", Err(HostError::BadNumber)),
            ("0xg1", Err(HostError::BadNumber)),
            ("example.123abc", Err(HostError::BadNumber)),
            ("127..1", Err(HostError::BadLabel)),
            ("localhost..", Err(HostError::BadLabel)),
            (".", Err(HostError::BadLabel)),
            ("", Err(HostError::Empty)),
            ("127.0.0.1 x", Err(HostError::BadChar(' '))),
            ("a/b", Err(HostError::BadChar('/'))),
            ("[127.0.0.1]", Err(HostError::BadIpv6)),
            ("[::1", Err(HostError::BadIpv6)),
            ("bücher.example", Err(HostError::NonAscii)),
        ];
        for (raw, want) in table {
            assert_eq!(&Host::parse(raw), want, "{raw:?}");
        }
        assert_eq!(Host::parse(&"a".repeat(300)), Err(HostError::TooLong));
        assert_eq!(Host::parse(&"a".repeat(64)), Err(HostError::BadLabel));
    }

    #[test]
    fn loopback_names_and_display() {
        assert!(Host::parse("LOCALHOST.").unwrap().is_loopback_name());
        assert!(Host::parse("app.localhost").unwrap().is_loopback());
        assert!(!Host::parse("notlocalhost").unwrap().is_loopback());
        assert!(Host::parse("127.9").unwrap().is_loopback());
        assert_eq!(Host::parse("::1").unwrap().with_port(22), "[::1]:22");
        assert_eq!(Host::parse("0x7f.1").unwrap().with_port(22), "127.0.0.1:22");
        assert_eq!(Host::parse("DB.").unwrap().to_string(), "db");
    }
}
