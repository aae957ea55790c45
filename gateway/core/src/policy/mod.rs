//! The policy engine: compiled statements from every applied document, evaluated for one
//! request at a time. Deny by default; an applicable deny statement always wins; an allow
//! needs an applicable allow statement. Every decision names the statements that made it, so
//! `postern explain` can show its work.
//!
//! A statement applies to a request when all of these hold: the user is one of its principals
//! (by name, group, `*`, or an active grant of the statement's policy), one of its actions
//! matches, the instance matches its targets (names/ids and label selectors), the forward
//! destination matches (port forwards), and its conditions (validity period, weekly windows,
//! source ranges) hold at the request's time and address.
//!
//! Destinations are matched in their canonical form ([`host::Host`]): `127.1`, `0x7f000001`
//! and `127.0.0.1` are one address, `DB.internal.` and `db.internal` one name. A name is not
//! resolved here: address rules of applicable deny statements are handed to the agent
//! ([`Decision::address_denies`]), which checks what the name resolves to before it connects.

pub mod document;
pub mod host;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::IpNet;
use serde::Serialize;

use crate::store::Labels;
use crate::util::glob_match;
use document::{Destination, HostPattern, Selector, Statement, Term};
pub use document::{Document, Effect};
use host::{Host, HostError};

/// Destinations an allow statement with no `forward_to` permits: the instance itself.
const LOOPBACK_ONLY: &str = "loopback only (no forward_to)";

#[derive(Debug, Clone)]
struct Compiled {
    policy: String,
    sid: String,
    line: usize,
    stmt: Statement,
    users: Vec<Pat>,
    groups: Vec<Pat>,
    actions: Vec<Pat>,
    instances: Vec<Pat>,
}

/// A name pattern, classified once when the policy is compiled.
#[derive(Debug, Clone)]
enum Pat {
    Any,
    Exact(String),
    Glob(String),
}

impl Pat {
    fn new(p: &str) -> Pat {
        if p == "*" {
            Pat::Any
        } else if p.bytes().any(|b| b == b'*' || b == b'?') {
            Pat::Glob(p.to_owned())
        } else {
            Pat::Exact(p.to_owned())
        }
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            Pat::Any => true,
            Pat::Exact(p) => p == v,
            Pat::Glob(p) => glob_match(p, v),
        }
    }

    fn all<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<Pat> {
        names.into_iter().map(Pat::new).collect()
    }
}

/// Where a statement came from, as `explain` and audit events name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatementRef {
    pub policy: String,
    pub sid: String,
    pub line: usize,
    pub effect: Effect,
}

/// The instance a request is about.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub labels: &'a Labels,
}

/// Everything a decision depends on.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub user: &'a str,
    pub groups: &'a [String],
    /// Policies granted to the user right now (expired grants already left out).
    pub grants: &'a [String],
    pub action: &'a str,
    pub target: Option<Target<'a>>,
    /// For port forwards: where the agent is asked to connect, in any spelling (it is
    /// matched in its canonical form; a host that has none is denied).
    pub destination: Option<(&'a str, u16)>,
    pub source: Option<IpAddr>,
    /// The session's login used a second factor (see [`Statement::require_mfa`]).
    pub mfa: bool,
    pub at: jiff::Timestamp,
}

/// Session settings merged from every applicable allow statement.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Settings {
    /// OS users sessions may run as; the first is the default. Empty: the agent's own user.
    pub run_as: Vec<String>,
    pub allow_root: bool,
    /// The profile used when the user names none.
    pub profile: Option<String>,
    pub profiles: Vec<String>,
    /// The shortest limit any applicable statement sets (None: the gateway default).
    #[serde(with = "opt_secs")]
    pub idle_timeout: Option<Option<Duration>>,
    #[serde(with = "opt_secs")]
    pub max_session: Option<Option<Duration>>,
    pub max_sessions: Option<u32>,
}

mod opt_secs {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(v: &Option<Option<Duration>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_none(),
            Some(None) => s.serialize_str("unlimited"),
            Some(Some(d)) => s.serialize_str(&format!("{}s", d.as_secs())),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub allowed: bool,
    /// The statements that decided: the applicable denies when denied by one, the applicable
    /// allows when allowed, none when nothing applied (deny by default).
    pub decided_by: Vec<StatementRef>,
    pub settings: Settings,
    /// Only filled by [`PolicySet::explain`]: statements naming this user that did not apply,
    /// and why not.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_applicable: Vec<(StatementRef, String)>,
    /// Only filled by [`PolicySet::explain`]: allow statements that applied but lost to a deny.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub overridden: Vec<StatementRef>,
    /// For an allowed forward: the address ranges that deny statements applying to this
    /// request name for its port. The agent refuses to connect to a resolved address in
    /// them, so a name cannot reach what an address rule denies.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub address_denies: Vec<IpNet>,
}

impl Decision {
    pub fn summary(&self) -> String {
        let names: Vec<String> = self.decided_by.iter().map(|r| format!("{}/{}", r.policy, r.sid)).collect();
        match (self.allowed, names.is_empty()) {
            (true, _) => format!("allowed by {}", names.join(", ")),
            (false, true) => "denied: no statement allows it (deny by default)".to_owned(),
            (false, false) => format!("denied by {}", names.join(", ")),
        }
    }
}

/// Every applied policy, compiled and indexed by principal.
#[derive(Debug, Default, Clone)]
pub struct PolicySet {
    statements: Vec<Compiled>,
    by_user: HashMap<String, Vec<usize>>,
    by_group: HashMap<String, Vec<usize>>,
    /// Statements whose principals use globs (`*`, `ops-*`): checked for every request.
    wildcard: Vec<usize>,
    by_policy: HashMap<String, Vec<usize>>,
    /// Per statement, the actions it lists as bits (see [`action_bit`]): a cheap first filter
    /// kept apart from the statements so scanning it stays in cache.
    action_bits: Vec<u16>,
}

/// Bit of an action name: one per known action, one shared by all others (`admin:...`).
fn action_bit(action: &str) -> u16 {
    document::ACTIONS.iter().position(|a| *a == action).map(|i| 1u16 << i).unwrap_or(1 << 15)
}

/// Bits an action pattern can match: a glob may match anything.
fn pattern_bits(pattern: &str) -> u16 {
    if pattern.bytes().any(|b| b == b'*' || b == b'?') { u16::MAX } else { action_bit(pattern) }
}

impl PolicySet {
    /// Compile documents; `sources` gives each document's text (for line numbers).
    pub fn new<'a>(documents: impl IntoIterator<Item = (&'a Document, &'a str)>) -> Self {
        let mut set = PolicySet::default();
        for (doc, text) in documents {
            let lines = document::LineIndex::new(text);
            for (i, st) in doc.statements.iter().enumerate() {
                let stmt = st.get_ref().clone();
                let idx = set.statements.len();
                set.by_policy.entry(doc.name.clone()).or_default().push(idx);
                let mut wild = false;
                for u in &stmt.users {
                    if u.0.contains(['*', '?']) {
                        wild = true;
                    } else {
                        set.by_user.entry(u.0.clone()).or_default().push(idx);
                    }
                }
                for g in &stmt.groups {
                    if g.0.contains(['*', '?']) {
                        wild = true;
                    } else {
                        set.by_group.entry(g.0.clone()).or_default().push(idx);
                    }
                }
                if wild {
                    set.wildcard.push(idx);
                }
                set.action_bits.push(stmt.actions.iter().fold(0, |acc, a| acc | pattern_bits(&a.0)));
                set.statements.push(Compiled {
                    policy: doc.name.clone(),
                    sid: stmt.sid.clone().unwrap_or_else(|| format!("#{}", i + 1)),
                    line: lines.statement_line(st.span().start),
                    users: Pat::all(stmt.users.iter().map(|n| n.0.as_str())),
                    groups: Pat::all(stmt.groups.iter().map(|n| n.0.as_str())),
                    actions: Pat::all(stmt.actions.iter().map(|n| n.0.as_str())),
                    instances: Pat::all(stmt.instances.iter().map(|n| n.0.as_str())),
                    stmt,
                });
            }
        }
        set
    }

    pub fn len(&self) -> usize {
        self.statements.len()
    }

    pub fn is_empty(&self) -> bool {
        self.statements.is_empty()
    }

    pub fn has_policy(&self, name: &str) -> bool {
        self.by_policy.contains_key(name)
    }

    /// Statements that might name this user (by index, group, glob or grant), possibly
    /// with repeats, in no particular order.
    fn candidates<'a>(&'a self, req: &'a Request) -> impl Iterator<Item = usize> + 'a {
        let by_user = self.by_user.get(req.user).into_iter().flatten();
        let by_group = req.groups.iter().filter_map(|g| self.by_group.get(g)).flatten();
        let by_grant = req.grants.iter().filter_map(|p| self.by_policy.get(p)).flatten();
        by_user.chain(by_group).chain(self.wildcard.iter()).chain(by_grant).copied()
    }

    pub fn evaluate(&self, req: &Request) -> Decision {
        self.decide(req, false)
    }

    /// As [`evaluate`](Self::evaluate), also listing statements that name the user but did
    /// not apply, with the reason.
    pub fn explain(&self, req: &Request) -> Decision {
        self.decide(req, true)
    }

    fn decide(&self, req: &Request, explain: bool) -> Decision {
        let bit = action_bit(req.action);
        let dest = req.destination.map(|(h, p)| (Host::parse(h), p));
        let mut applicable: Vec<usize> = Vec::new();
        let mut missed: Vec<(usize, Miss)> = Vec::new();
        for idx in self.candidates(req) {
            if !explain && self.action_bits.get(idx).is_none_or(|b| b & bit == 0) {
                continue;
            }
            let Some(c) = self.statements.get(idx) else { continue };
            match applies(c, req, dest.as_ref()) {
                Ok(()) => applicable.push(idx),
                Err(miss) if explain => missed.push((idx, miss)),
                Err(_) => {}
            }
        }
        // Document order (settings merge in it) and no repeats (a statement can be reached
        // through the user and a group).
        applicable.sort_unstable();
        applicable.dedup();
        missed.sort_unstable_by_key(|(i, _)| *i);
        missed.dedup_by_key(|(i, _)| *i);
        let (denies, allows): (Vec<&Compiled>, Vec<&Compiled>) =
            applicable.iter().filter_map(|&i| self.statements.get(i)).partition(|c| c.stmt.effect == Effect::Deny);
        let not_applicable: Vec<(StatementRef, String)> = missed
            .into_iter()
            .filter_map(|(i, m)| self.statements.get(i).map(|c| (reference(c), m.describe(&c.stmt, req))))
            .collect();
        if !denies.is_empty() {
            return Decision {
                allowed: false,
                decided_by: denies.into_iter().map(reference).collect(),
                settings: Settings::default(),
                not_applicable,
                overridden: if explain { allows.into_iter().map(reference).collect() } else { Vec::new() },
                address_denies: Vec::new(),
            };
        }
        if allows.is_empty() {
            return Decision {
                allowed: false,
                decided_by: Vec::new(),
                settings: Settings::default(),
                not_applicable,
                overridden: Vec::new(),
                address_denies: Vec::new(),
            };
        }
        let mut settings = Settings::default();
        for c in &allows {
            let s = &c.stmt;
            for u in &s.run_as {
                if !settings.run_as.contains(&u.0) {
                    settings.run_as.push(u.0.clone());
                }
            }
            settings.allow_root |= s.allow_root;
            if settings.profile.is_none() {
                settings.profile = s.profile.as_ref().map(|p| p.0.clone());
            }
            for p in s.profiles.iter().chain(s.profile.iter()) {
                if !settings.profiles.contains(&p.0) {
                    settings.profiles.push(p.0.clone());
                }
            }
            settings.idle_timeout = shorter(settings.idle_timeout, s.idle_timeout.map(|l| l.0));
            settings.max_session = shorter(settings.max_session, s.max_session.map(|l| l.0));
            settings.max_sessions = match (settings.max_sessions, s.max_sessions) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        let address_denies = match req.destination {
            Some((_, port)) => self.address_denies(req, port),
            None => Vec::new(),
        };
        Decision {
            allowed: true,
            decided_by: allows.into_iter().map(reference).collect(),
            settings,
            not_applicable,
            overridden: Vec::new(),
            address_denies,
        }
    }

    /// Address ranges of the deny statements that apply to `req` whatever its destination
    /// host, for destinations on `port`.
    fn address_denies(&self, req: &Request, port: u16) -> Vec<IpNet> {
        let any_host = Request { destination: None, ..req.clone() };
        let mut nets: Vec<IpNet> = Vec::new();
        for idx in self.candidates(req) {
            let Some(c) = self.statements.get(idx) else { continue };
            if c.stmt.effect != Effect::Deny || applies(c, &any_host, None).is_err() {
                continue;
            }
            for d in c.stmt.forward_to.iter().flatten() {
                if let HostPattern::Net(net) = &d.host
                    && (d.ports.0..=d.ports.1).contains(&port)
                    && !nets.contains(net)
                {
                    nets.push(*net);
                }
            }
        }
        nets
    }
}

fn reference(c: &Compiled) -> StatementRef {
    StatementRef { policy: c.policy.clone(), sid: c.sid.clone(), line: c.line, effect: c.stmt.effect }
}

/// The more restrictive of two optional limits (`Some(None)` is "unlimited").
fn shorter(a: Option<Option<Duration>>, b: Option<Option<Duration>>) -> Option<Option<Duration>> {
    match (a, b) {
        (None, x) | (x, None) => x,
        (Some(None), x) | (x, Some(None)) => x,
        (Some(Some(x)), Some(Some(y))) => Some(Some(x.min(y))),
    }
}

/// Why a statement did not apply; turned into text only for `explain`.
#[derive(Debug, Clone, Copy)]
enum Miss {
    Principal,
    Action,
    Instance,
    Labels,
    NoTarget,
    Destination,
    NotBefore,
    Expired,
    Schedule,
    Source,
    Mfa,
}

impl Miss {
    fn describe(self, s: &Statement, req: &Request) -> String {
        let target = req.target.map(|t| t.name).unwrap_or("");
        match self {
            Miss::Principal => "does not name this user".into(),
            Miss::Action => format!("action {} not listed", req.action),
            Miss::Instance => format!("instance {target} not in instances"),
            Miss::Labels => format!("instance {target} does not match the label selectors"),
            Miss::NoTarget => "no instance in the request".into(),
            Miss::Destination => {
                let (h, p) = req.destination.unwrap_or(("", 0));
                let why = if s.forward_to.is_none() { LOOPBACK_ONLY } else { "not in forward_to" };
                format!("destination {h}:{p}: {why}")
            }
            Miss::NotBefore => format!("not before {}", s.not_before.map(|t| t.0.to_string()).unwrap_or_default()),
            Miss::Expired => format!("expired at {}", s.not_after.map(|t| t.0.to_string()).unwrap_or_default()),
            Miss::Schedule => "outside its schedule".into(),
            Miss::Mfa => "requires MFA (require_mfa), and this login had no second factor".into(),
            Miss::Source => match req.source {
                Some(ip) => format!("source {ip} not in its source ranges"),
                None => "request has no source address".into(),
            },
        }
    }
}

type Dest = (Result<Host, HostError>, u16);

/// Cheapest checks first: this runs for every candidate statement of every decision.
/// `dest` is the request's destination in canonical form.
fn applies(c: &Compiled, req: &Request, dest: Option<&Dest>) -> Result<(), Miss> {
    let s = &c.stmt;
    let named = c.users.iter().any(|u| u.matches(req.user))
        || c.groups.iter().any(|g| req.groups.iter().any(|rg| g.matches(rg)))
        || req.grants.contains(&c.policy);
    if !named {
        return Err(Miss::Principal);
    }
    if !c.actions.iter().any(|a| a.matches(req.action)) {
        return Err(Miss::Action);
    }
    if let Some(t) = req.target {
        let by_name = c.instances.is_empty() || c.instances.iter().any(|p| p.matches(t.name) || p.matches(t.id));
        if !by_name {
            return Err(Miss::Instance);
        }
        if !s.labels.is_empty() && !s.labels.iter().any(|sel| selector_matches(sel, t.labels)) {
            return Err(Miss::Labels);
        }
    } else if !(s.instances.is_empty() && s.labels.is_empty()) {
        return Err(Miss::NoTarget);
    }
    if let Some((host, port)) = dest {
        let ok = match (&s.forward_to, host) {
            (Some(list), _) => {
                list.iter().any(|d| destination_matches(d, host, *port, s.effect))
                    || (s.effect == Effect::Allow && loopback_name_allowed(list, host, *port))
            }
            // Deny statements without forward_to deny every destination.
            (None, _) if s.effect == Effect::Deny => true,
            (None, Ok(h)) => h.is_loopback(),
            (None, Err(_)) => false,
        };
        if !ok {
            return Err(Miss::Destination);
        }
    }
    if s.not_before.is_some_and(|nb| req.at < nb.0) {
        return Err(Miss::NotBefore);
    }
    if s.not_after.is_some_and(|na| req.at >= na.0) {
        return Err(Miss::Expired);
    }
    if !s.source.is_empty() && !req.source.is_some_and(|ip| s.source.iter().any(|n| n.0.contains(&canonical(ip)))) {
        return Err(Miss::Source);
    }
    if !s.schedule.is_empty() && !s.schedule.iter().any(|w| w.contains(req.at)) {
        return Err(Miss::Schedule);
    }
    if s.require_mfa && !req.mfa {
        return Err(Miss::Mfa);
    }
    Ok(())
}

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) match IPv4 ranges.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Whether `host`, in any spelling, is the instance itself.
pub fn is_loopback(host: &str) -> bool {
    Host::parse(host).is_ok_and(|h| h.is_loopback())
}

/// The addresses a loopback name (`localhost`) stands for.
const LOOPBACK_ADDRESSES: [IpAddr; 2] = [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)];

/// An allow list covers a loopback name when it covers both its addresses (by any entries).
fn loopback_name_allowed(list: &[Destination], host: &Result<Host, HostError>, port: u16) -> bool {
    host.as_ref().is_ok_and(|h| h.is_loopback_name())
        && LOOPBACK_ADDRESSES
            .iter()
            .all(|a| list.iter().any(|d| destination_matches(d, &Ok(Host::Ip(*a)), port, Effect::Allow)))
}

/// Whether one `forward_to` entry covers a canonical destination. Where a spelling could
/// mean more than one thing, a deny takes the broad reading and an allow the narrow one:
/// - a host with no canonical form is covered by every deny and no allow;
/// - `localhost` (and `*.localhost`) is 127.0.0.1 or ::1: a deny range holding either covers
///   it; allow ranges must hold both (the list is checked in [`loopback_name_allowed`]);
/// - a name pattern naming `localhost` covers, in a deny, every loopback address and name;
///   in an allow, 127.0.0.1 and ::1;
/// - other names are never matched by address ranges here: the agent checks what they
///   resolve to against the deny ranges ([`Decision::address_denies`]).
fn destination_matches(d: &Destination, host: &Result<Host, HostError>, port: u16, effect: Effect) -> bool {
    if port < d.ports.0 || port > d.ports.1 {
        return false;
    }
    let deny = effect == Effect::Deny;
    let Ok(host) = host else { return deny };
    match (&d.host, host) {
        (HostPattern::Any, _) => true,
        (HostPattern::Net(net), Host::Ip(ip)) => net.contains(&canonical(*ip)),
        // Allows: see [`loopback_name_allowed`].
        (HostPattern::Net(net), h) if h.is_loopback_name() => {
            deny && LOOPBACK_ADDRESSES.iter().any(|a| net.contains(a))
        }
        (HostPattern::Net(_), Host::Name(_)) => false,
        (HostPattern::Name(p), Host::Ip(ip)) => {
            glob_match(p, "localhost") && if deny { ip.is_loopback() } else { LOOPBACK_ADDRESSES.contains(ip) }
        }
        (HostPattern::Name(p), Host::Name(n)) => {
            glob_match(p, n) || (deny && host.is_loopback_name() && glob_match(p, "localhost"))
        }
    }
}

pub fn selector_matches(sel: &Selector, labels: &Labels) -> bool {
    sel.0.iter().all(|t| match t {
        Term::Eq(k, v) => labels.get(k).is_some_and(|x| glob_match(v, x)),
        Term::Ne(k, v) => labels.get(k).is_none_or(|x| !glob_match(v, x)),
        Term::Exists(k) => labels.contains_key(k),
        Term::Absent(k) => !labels.contains_key(k),
    })
}

#[cfg(test)]
mod tests;
