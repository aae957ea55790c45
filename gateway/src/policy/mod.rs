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

pub mod document;

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use serde::Serialize;

use crate::access::glob_match;
use crate::store::Labels;
use document::{Destination, HostPattern, Selector, Statement, Term};
pub use document::{Document, Effect};

/// Destinations an allow statement with no `forward_to` permits: the instance itself.
const LOOPBACK_ONLY: &str = "loopback only (no forward_to)";

#[derive(Debug, Clone)]
struct Compiled {
    policy: String,
    sid: String,
    line: usize,
    stmt: Statement,
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
    /// For port forwards: where the agent is asked to connect.
    pub destination: Option<(&'a str, u16)>,
    pub source: Option<IpAddr>,
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
}

impl PolicySet {
    /// Compile documents; `sources` gives each document's text (for line numbers).
    pub fn new<'a>(documents: impl IntoIterator<Item = (&'a Document, &'a str)>) -> Self {
        let mut set = PolicySet::default();
        for (doc, text) in documents {
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
                set.statements.push(Compiled {
                    policy: doc.name.clone(),
                    sid: stmt.sid.clone().unwrap_or_else(|| format!("#{}", i + 1)),
                    line: document::statement_line(text, st.span().start),
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

    /// Indices of statements that might name this user, in document order.
    fn candidates(&self, req: &Request) -> Vec<usize> {
        let mut out: Vec<usize> = Vec::new();
        if let Some(v) = self.by_user.get(req.user) {
            out.extend(v);
        }
        for g in req.groups {
            if let Some(v) = self.by_group.get(g) {
                out.extend(v);
            }
        }
        out.extend(&self.wildcard);
        for p in req.grants {
            if let Some(v) = self.by_policy.get(p) {
                out.extend(v);
            }
        }
        out.sort_unstable();
        out.dedup();
        out
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
        let mut allows = Vec::new();
        let mut denies = Vec::new();
        let mut not_applicable = Vec::new();
        for idx in self.candidates(req) {
            let Some(c) = self.statements.get(idx) else { continue };
            match applies(c, req) {
                Ok(()) => {
                    if c.stmt.effect == Effect::Deny {
                        denies.push(c);
                    } else {
                        allows.push(c);
                    }
                }
                Err(why) if explain => not_applicable.push((reference(c), why)),
                Err(_) => {}
            }
        }
        let not_applicable = if explain { not_applicable } else { Vec::new() };
        if !denies.is_empty() {
            return Decision {
                allowed: false,
                decided_by: denies.into_iter().map(reference).collect(),
                settings: Settings::default(),
                not_applicable,
                overridden: if explain { allows.into_iter().map(reference).collect() } else { Vec::new() },
            };
        }
        if allows.is_empty() {
            return Decision {
                allowed: false,
                decided_by: Vec::new(),
                settings: Settings::default(),
                not_applicable,
                overridden: Vec::new(),
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
        Decision {
            allowed: true,
            decided_by: allows.into_iter().map(reference).collect(),
            settings,
            not_applicable,
            overridden: Vec::new(),
        }
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

fn applies(c: &Compiled, req: &Request) -> Result<(), String> {
    let s = &c.stmt;
    let named = s.users.iter().any(|u| glob_match(&u.0, req.user))
        || s.groups.iter().any(|g| req.groups.iter().any(|rg| glob_match(&g.0, rg)))
        || req.grants.contains(&c.policy);
    if !named {
        return Err("does not name this user".into());
    }
    if !s.actions.iter().any(|a| glob_match(&a.0, req.action)) {
        return Err(format!("action {} not listed", req.action));
    }
    if let Some(t) = req.target {
        let by_name =
            s.instances.is_empty() || s.instances.iter().any(|p| glob_match(&p.0, t.name) || glob_match(&p.0, t.id));
        if !by_name {
            return Err(format!("instance {} not in instances", t.name));
        }
        if !s.labels.is_empty() && !s.labels.iter().any(|sel| selector_matches(sel, t.labels)) {
            return Err(format!("instance {} does not match the label selectors", t.name));
        }
    } else if !(s.instances.is_empty() && s.labels.is_empty()) {
        return Err("no instance in the request".into());
    }
    if let Some((host, port)) = req.destination {
        let ok = match &s.forward_to {
            Some(list) => list.iter().any(|d| destination_matches(d, host, port)),
            // Deny statements without forward_to deny every destination.
            None if s.effect == Effect::Deny => true,
            None => is_loopback(host),
        };
        if !ok {
            let why = if s.forward_to.is_none() { LOOPBACK_ONLY.to_owned() } else { "not in forward_to".to_owned() };
            return Err(format!("destination {host}:{port}: {why}"));
        }
    }
    if let Some(nb) = s.not_before
        && req.at < nb.0
    {
        return Err(format!("not before {}", nb.0));
    }
    if let Some(na) = s.not_after
        && req.at >= na.0
    {
        return Err(format!("expired at {}", na.0));
    }
    if !s.schedule.is_empty() && !s.schedule.iter().any(|w| w.contains(req.at)) {
        return Err("outside its schedule".into());
    }
    if !s.source.is_empty() {
        match req.source {
            Some(ip) if s.source.iter().any(|n| n.0.contains(&canonical(ip))) => {}
            Some(ip) => return Err(format!("source {ip} not in its source ranges")),
            None => return Err("request has no source address".into()),
        }
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

pub fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| canonical(ip).is_loopback())
}

fn destination_matches(d: &Destination, host: &str, port: u16) -> bool {
    if port < d.ports.0 || port > d.ports.1 {
        return false;
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match (&d.host, bare.parse::<IpAddr>()) {
        (HostPattern::Any, _) => true,
        (HostPattern::Net(net), Ok(ip)) => net.contains(&canonical(ip)),
        (HostPattern::Net(_), Err(_)) => false,
        (HostPattern::Name(_), Ok(_)) => false,
        (HostPattern::Name(p), Err(_)) => glob_match(p, &bare.to_ascii_lowercase()),
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
