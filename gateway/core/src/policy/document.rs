//! Policy documents as written by admins (TOML), validated while they are parsed so that every
//! error names the file, line and field, and nothing half-valid is ever applied.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

/// Action names a statement may use (globs such as `*` and `admin:*` are allowed too).
pub const ACTIONS: &[&str] = &["shell", "exec", "sftp", "port-forward", "ssh-passthrough", "rdp", "run"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    Allow,
    Deny,
}

/// A whole policy document.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Document {
    /// Name the policy is stored and granted under.
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default, rename = "statement")]
    pub statements: Vec<toml::Spanned<Statement>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statement {
    /// Statement id shown by `explain` (default: `#N`, its position).
    #[serde(default)]
    pub sid: Option<String>,
    pub effect: Effect,
    #[serde(default)]
    pub users: Vec<Name>,
    #[serde(default)]
    pub groups: Vec<Name>,
    pub actions: Vec<ActionPattern>,
    #[serde(default)]
    pub instances: Vec<Name>,
    #[serde(default)]
    pub labels: Vec<Selector>,
    #[serde(default)]
    pub forward_to: Option<Vec<Destination>>,
    #[serde(default)]
    pub not_before: Option<Instant>,
    #[serde(default)]
    pub not_after: Option<Instant>,
    #[serde(default)]
    pub schedule: Vec<Window>,
    #[serde(default)]
    pub source: Vec<Cidr>,
    /// Applies only to sessions whose login used a second factor (a `postern login`
    /// certificate whose identity provider reported MFA). Allow statements only.
    #[serde(default)]
    pub require_mfa: bool,
    // Session settings (allow statements only).
    #[serde(default)]
    pub run_as: Vec<Name>,
    #[serde(default)]
    pub allow_root: bool,
    #[serde(default)]
    pub profile: Option<Name>,
    #[serde(default)]
    pub profiles: Vec<Name>,
    #[serde(default)]
    pub idle_timeout: Option<Limit>,
    #[serde(default)]
    pub max_session: Option<Limit>,
    #[serde(default)]
    pub max_sessions: Option<u32>,
}

/// A user, group, instance, profile or OS user name; `*` and `?` globs where noted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name(pub String);

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let ok =
            !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@*?:".contains(c));
        if ok { Ok(Name(s)) } else { Err(de::Error::custom(format!("{s:?} is not a valid name or glob"))) }
    }
}

/// An action name or glob (`shell`, `admin:*`, `*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionPattern(pub String);

impl<'de> Deserialize<'de> for ActionPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let known = ACTIONS.contains(&s.as_str())
            || s == "*"
            || s.strip_prefix("admin:")
                .is_some_and(|a| !a.is_empty() && a.chars().all(|c| c.is_ascii_lowercase() || "-*".contains(c)));
        if known {
            Ok(ActionPattern(s))
        } else {
            Err(de::Error::custom(format!("unknown action {s:?}; expected one of {}, admin:*, *", ACTIONS.join(", "))))
        }
    }
}

/// A label selector: comma-separated terms, all of which must hold:
/// `key=value` (value may be a glob), `key!=value` (absent or different), `key` (present),
/// `!key` (absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector(pub Vec<Term>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Term {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
}

fn label_key_ok(k: &str) -> bool {
    !k.is_empty() && k.len() <= 63 && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

impl Selector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for raw in s.split(',') {
            let t = raw.trim();
            let term = if let Some((k, v)) = t.split_once("!=") {
                Term::Ne(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, v)) = t.split_once('=') {
                Term::Eq(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some(k) = t.strip_prefix('!') {
                Term::Absent(k.trim().to_owned())
            } else {
                Term::Exists(t.to_owned())
            };
            let key = match &term {
                Term::Eq(k, _) | Term::Ne(k, _) | Term::Exists(k) | Term::Absent(k) => k,
            };
            if !label_key_ok(key) {
                return Err(format!("label selector {s:?}: bad term {t:?} (use key=value, key!=value, key or !key)"));
            }
            terms.push(term);
        }
        Ok(Selector(terms))
    }
}

impl<'de> Deserialize<'de> for Selector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Selector::parse(&String::deserialize(d)?).map_err(de::Error::custom)
    }
}

/// Where a port forward may go: `HOST:PORTS`. HOST is `*`, an address or CIDR (IPv6 in
/// brackets), or a host name glob; PORTS is `N`, `N-M` or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub host: HostPattern,
    pub ports: (u16, u16),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Any,
    Net(IpNet),
    Name(String),
}

impl Destination {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("forward destination {s:?}: {why} (expected HOST:PORT, HOST:N-M or HOST:*)");
        let (host, ports) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest.split_once("]:").ok_or_else(|| bad("IPv6 addresses go in brackets"))?;
            (h, p)
        } else {
            s.rsplit_once(':').ok_or_else(|| bad("no port"))?
        };
        let ports = if ports == "*" {
            (1, u16::MAX)
        } else if let Some((a, b)) = ports.split_once('-') {
            let a: u16 = a.parse().map_err(|_| bad("bad port range"))?;
            let b: u16 = b.parse().map_err(|_| bad("bad port range"))?;
            if a == 0 || a > b {
                return Err(bad("bad port range"));
            }
            (a, b)
        } else {
            let p: u16 = ports.parse().map_err(|_| bad("bad port"))?;
            if p == 0 {
                return Err(bad("port 0"));
            }
            (p, p)
        };
        let host = if host == "*" {
            HostPattern::Any
        } else if let Ok(net) = host.parse::<IpNet>() {
            HostPattern::Net(net.trunc())
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            HostPattern::Net(IpNet::from(ip))
        } else if !host.contains(['*', '?']) {
            // One spelling per host, as requests are matched (`127.1` is 127.0.0.1).
            match super::host::Host::parse(host) {
                Ok(super::host::Host::Ip(ip)) => HostPattern::Net(IpNet::from(ip)),
                Ok(super::host::Host::Name(n)) => HostPattern::Name(n),
                Err(e) => return Err(bad(&e.to_string())),
            }
        } else if host.chars().all(|c| c.is_ascii_alphanumeric() || "-_.*?".contains(c)) {
            HostPattern::Name(host.to_ascii_lowercase())
        } else {
            return Err(bad("bad host, address or CIDR"));
        };
        Ok(Destination { host, ports })
    }
}

impl<'de> Deserialize<'de> for Destination {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Destination::parse(&String::deserialize(d)?).map_err(de::Error::custom)
    }
}

/// A point in time, RFC 3339 (`2026-12-01T09:00:00Z`, `2026-12-01T09:00:00+01:00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Instant(pub jiff::Timestamp);

impl<'de> Deserialize<'de> for Instant {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<jiff::Timestamp>()
            .map(Instant)
            .map_err(|e| de::Error::custom(format!("{s:?} is not an RFC 3339 time with an offset: {e}")))
    }
}

/// A weekly window in a time zone: `{ days = "mon-fri", hours = "09:00-18:00", tz = "Europe/Berlin" }`.
/// Windows that cross midnight (`22:00-06:00`) belong to the day they start on.
#[derive(Debug, Clone)]
pub struct Window {
    /// Bit 0 = Monday ... bit 6 = Sunday.
    pub days: u8,
    /// Minutes since local midnight, start inclusive, end exclusive.
    pub start: u16,
    pub end: u16,
    pub tz: jiff::tz::TimeZone,
    pub tz_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowRaw {
    #[serde(default)]
    days: Option<String>,
    #[serde(default)]
    hours: Option<String>,
    tz: String,
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn parse_days(s: &str) -> Result<u8, String> {
    let day = |d: &str| {
        DAYS.iter()
            .position(|x| *x == d.trim().to_ascii_lowercase())
            .ok_or_else(|| format!("days {s:?}: unknown day {d:?} (mon..sun)"))
    };
    let mut bits = 0u8;
    for part in s.split(',') {
        if let Some((a, b)) = part.split_once('-') {
            let (a, b) = (day(a)?, day(b)?);
            let mut i = a;
            loop {
                bits |= 1 << i;
                if i == b {
                    break;
                }
                i = (i + 1) % 7;
            }
        } else {
            bits |= 1 << day(part)?;
        }
    }
    Ok(bits)
}

fn parse_hhmm(s: &str) -> Option<u16> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
}

impl Window {
    pub fn new(days: Option<&str>, hours: Option<&str>, tz: &str) -> Result<Self, String> {
        let days = match days {
            Some(d) => parse_days(d)?,
            None => 0x7f,
        };
        let (start, end) = match hours {
            None => (0, 24 * 60),
            Some(h) => {
                let (a, b) = h.split_once('-').ok_or_else(|| format!("hours {h:?}: expected HH:MM-HH:MM"))?;
                let a = parse_hhmm(a).ok_or_else(|| format!("hours {h:?}: bad start"))?;
                let b = parse_hhmm(b).ok_or_else(|| format!("hours {h:?}: bad end"))?;
                if a == b {
                    return Err(format!("hours {h:?}: empty window"));
                }
                (a, b)
            }
        };
        let zone = jiff::tz::TimeZone::get(tz).map_err(|e| format!("tz {tz:?}: unknown time zone: {e}"))?;
        Ok(Window { days, start, end, tz: zone, tz_name: tz.to_owned() })
    }

    /// Whether `at` falls in the window, on the wall clock of the window's time zone.
    pub fn contains(&self, at: jiff::Timestamp) -> bool {
        let local = at.to_zoned(self.tz.clone());
        let dow = local.weekday().to_monday_zero_offset() as u8;
        let minute = local.hour() as u16 * 60 + local.minute() as u16;
        let on = |d: u8| self.days & (1 << d) != 0;
        if self.start < self.end {
            on(dow) && minute >= self.start && minute < self.end
        } else {
            (on(dow) && minute >= self.start) || (on((dow + 6) % 7) && minute < self.end)
        }
    }
}

impl<'de> Deserialize<'de> for Window {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = WindowRaw::deserialize(d)?;
        Window::new(raw.days.as_deref(), raw.hours.as_deref(), &raw.tz).map_err(de::Error::custom)
    }
}

/// A source address range (`10.0.0.0/8`, `2001:db8::/32`, or a single address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr(pub IpNet);

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Ok(n) = s.parse::<IpNet>() {
            return Ok(Cidr(n.trunc()));
        }
        s.parse::<IpAddr>()
            .map(|ip| Cidr(IpNet::from(ip)))
            .map_err(|_| de::Error::custom(format!("{s:?} is not an IP address or CIDR")))
    }
}

/// A duration such as `30m`, `8h`, `1d`; `0` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit(pub Option<Duration>);

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        crate::duration::parse_limit(&s).map(Limit).map_err(|e| de::Error::custom(e.to_string()))
    }
}

/// Line numbers of byte offsets in one document, by binary search over line starts.
pub struct LineIndex<'a> {
    text: &'a str,
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    pub fn new(text: &'a str) -> Self {
        let starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1)).collect();
        LineIndex { text, starts }
    }

    /// Line (1-based) of byte offset `at`.
    pub fn line(&self, at: usize) -> usize {
        self.starts.partition_point(|&s| s <= at).max(1)
    }

    /// Line of the `[[statement]]` header of the statement whose table starts at byte `at`.
    pub fn statement_line(&self, at: usize) -> usize {
        let line = self.line(at);
        let text_of = |n: usize| {
            let start = self.starts.get(n - 1).copied().unwrap_or(0);
            let end = self.starts.get(n).copied().unwrap_or(self.text.len());
            self.text.get(start..end).unwrap_or("")
        };
        (1..=line).rev().find(|&n| text_of(n).trim() == "[[statement]]").unwrap_or(line)
    }
}

/// Parse and validate a document. Errors name `file`, the line and the field.
pub fn parse(file: &str, text: &str) -> Result<Document, String> {
    let doc: Document = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| LineIndex::new(text).line(s.start)).unwrap_or(0);
        format!("{file}:{line}: {}", e.message())
    })?;
    if !crate::util::valid_name(&doc.name) {
        return Err(format!("{file}:1: name {:?}: use letters, digits, '-' and '_'", doc.name));
    }
    let mut sids = std::collections::HashSet::new();
    let lines = LineIndex::new(text);
    for (i, st) in doc.statements.iter().enumerate() {
        let line = lines.statement_line(st.span().start);
        let s = st.get_ref();
        let at = |field: &str, msg: &str| format!("{file}:{line}: statement {}: {field}: {msg}", i + 1);
        if s.users.is_empty() && s.groups.is_empty() {
            return Err(at("users", "a statement needs users or groups (\"*\" for everyone)"));
        }
        if s.actions.is_empty() {
            return Err(at("actions", "empty"));
        }
        let only_admin = s.actions.iter().all(|a| a.0.starts_with("admin:"));
        if !only_admin && s.instances.is_empty() && s.labels.is_empty() {
            return Err(at("instances", "name the targets with instances or labels (instances = [\"*\"] for all)"));
        }
        if let (Some(a), Some(b)) = (s.not_before, s.not_after)
            && a.0 >= b.0
        {
            return Err(at("not_after", "must be later than not_before"));
        }
        if s.effect == Effect::Deny {
            if s.require_mfa {
                return Err(at(
                    "require_mfa",
                    "goes on allow statements (a deny applies whatever the login; to refuse sessions without MFA, allow only with require_mfa)",
                ));
            }
            let settings = !s.run_as.is_empty()
                || s.allow_root
                || s.profile.is_some()
                || !s.profiles.is_empty()
                || s.idle_timeout.is_some()
                || s.max_session.is_some()
                || s.max_sessions.is_some();
            if settings {
                return Err(at(
                    "effect",
                    "session settings (run_as, profile, timeouts, ...) only go on allow statements",
                ));
            }
        }
        if s.run_as.iter().any(|u| u.0.contains(['*', '?'])) {
            return Err(at("run_as", "list OS user names, not globs"));
        }
        if let Some(sid) = &s.sid
            && !sids.insert(sid.clone())
        {
            return Err(at("sid", &format!("{sid:?} is used twice")));
        }
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_file_line_and_field() {
        let text = "name = \"p\"\n\n[[statement]]\neffect = \"allow\"\nusers = [\"a\"]\nactions = [\"shell\"]\ninstances = [\"*\"]\nsource = [\"10.0.0.0/33\"]\n";
        let e = parse("p.toml", text).unwrap_err();
        assert!(e.starts_with("p.toml:8:"), "{e}");
        assert!(e.contains("10.0.0.0/33"), "{e}");

        let text = "name = \"p\"\n[[statement]]\neffect = \"alow\"\nusers = [\"a\"]\nactions = [\"shell\"]\ninstances = [\"*\"]\n";
        let e = parse("p.toml", text).unwrap_err();
        assert!(e.starts_with("p.toml:3:"), "{e}");

        let text = "name = \"p\"\n[[statement]]\neffect = \"deny\"\nusers = [\"a\"]\nactions = [\"shell\"]\ninstances = [\"*\"]\nrun_as = [\"x\"]\n";
        let e = parse("p.toml", text).unwrap_err();
        assert!(e.starts_with("p.toml:2: statement 1: effect:"), "{e}");

        let text = "name = \"p\"\n[[statement]]\neffect = \"allow\"\nusers = [\"a\"]\nactions = [\"shel\"]\ninstances = [\"*\"]\n";
        let e = parse("p.toml", text).unwrap_err();
        assert!(e.starts_with("p.toml:5:") && e.contains("unknown action"), "{e}");

        let text = "name = \"p\"\n[[statement]]\neffect = \"allow\"\nusers = [\"a\"]\nactions = [\"shell\"]\n";
        let e = parse("p.toml", text).unwrap_err();
        assert!(e.contains("statement 1: instances"), "{e}");

        let text = "name = \"p\"\nbogus = 1\n";
        let e = parse("p.toml", text).unwrap_err();
        assert!(e.starts_with("p.toml:2:") && e.contains("bogus"), "{e}");
    }

    #[test]
    fn destinations() {
        assert_eq!(Destination::parse("*:*").unwrap(), Destination { host: HostPattern::Any, ports: (1, 65535) });
        let d = Destination::parse("10.1.2.3/8:5432").unwrap();
        assert_eq!(d.host, HostPattern::Net("10.0.0.0/8".parse().unwrap()));
        assert_eq!(d.ports, (5432, 5432));
        let d = Destination::parse("[::1]:8000-8099").unwrap();
        assert_eq!(d.host, HostPattern::Net("::1/128".parse().unwrap()));
        assert_eq!(d.ports, (8000, 8099));
        assert_eq!(Destination::parse("DB.internal:5432").unwrap().host, HostPattern::Name("db.internal".into()));
        assert_eq!(Destination::parse("DB.internal.:5432").unwrap().host, HostPattern::Name("db.internal".into()));
        assert_eq!(Destination::parse("127.1:80").unwrap().host, HostPattern::Net("127.0.0.1/32".parse().unwrap()));
        assert_eq!(Destination::parse("*.Internal:80").unwrap().host, HostPattern::Name("*.internal".into()));
        for bad in [
            "db",
            "db:0",
            "db:9-3",
            "db:70000",
            "[::1:22",
            "10.0.0.0/40:22",
            ":22",
            "1.2.3.999:22",
            "a b:1",
            "0.0.0.0.0:1",
        ] {
            assert!(Destination::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn selectors() {
        let s = Selector::parse("env=prod, role!=db,team,!legacy").unwrap();
        assert_eq!(
            s.0,
            vec![
                Term::Eq("env".into(), "prod".into()),
                Term::Ne("role".into(), "db".into()),
                Term::Exists("team".into()),
                Term::Absent("legacy".into())
            ]
        );
        assert!(Selector::parse("env=prod,,x").is_err());
        assert!(Selector::parse("=prod").is_err());
    }

    #[test]
    fn windows_and_days() {
        assert_eq!(parse_days("mon-fri").unwrap(), 0b0011111);
        assert_eq!(parse_days("sat,sun").unwrap(), 0b1100000);
        assert_eq!(parse_days("fri-mon").unwrap(), 0b1110001);
        assert!(parse_days("funday").is_err());
        assert!(Window::new(None, Some("09:00-25:00"), "UTC").is_err());
        assert!(Window::new(None, Some("09:00-09:00"), "UTC").is_err());
        assert!(Window::new(None, None, "Mars/Olympus").is_err());
    }
}
