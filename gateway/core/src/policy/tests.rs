use proptest::prelude::*;

use super::*;

fn set(texts: &[&str]) -> PolicySet {
    let docs: Vec<(Document, &str)> =
        texts.iter().map(|t| (document::parse("test.toml", t).unwrap_or_else(|e| panic!("{e}")), *t)).collect();
    PolicySet::new(docs.iter().map(|(d, t)| (d, *t)))
}

fn ts(s: &str) -> jiff::Timestamp {
    s.parse().unwrap()
}

struct Req {
    user: &'static str,
    groups: Vec<String>,
    grants: Vec<String>,
    action: &'static str,
    name: &'static str,
    labels: Labels,
    dest: Option<(&'static str, u16)>,
    source: Option<IpAddr>,
    mfa: bool,
    at: jiff::Timestamp,
}

impl Req {
    fn new(user: &'static str, action: &'static str, name: &'static str) -> Self {
        Req {
            user,
            groups: vec![],
            grants: vec![],
            action,
            name,
            labels: Labels::new(),
            dest: None,
            source: Some("10.1.2.3".parse().unwrap()),
            mfa: false,
            at: ts("2026-11-25T12:00:00Z"),
        }
    }
    fn labels(mut self, l: &[(&str, &str)]) -> Self {
        self.labels = l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self
    }
    fn groups(mut self, g: &[&str]) -> Self {
        self.groups = g.iter().map(|s| s.to_string()).collect();
        self
    }
    fn at(mut self, t: &str) -> Self {
        self.at = ts(t);
        self
    }
    fn check(&self, set: &PolicySet) -> Decision {
        set.explain(&Request {
            user: self.user,
            groups: &self.groups,
            grants: &self.grants,
            action: self.action,
            target: Some(Target { id: "ag-0001", name: self.name, labels: &self.labels }),
            destination: self.dest,
            source: self.source,
            mfa: self.mfa,
            at: self.at,
        })
    }
}

const BASE: &str = r#"
name = "base"

[[statement]]
sid = "web-shell"
effect = "allow"
users = ["alice"]
groups = ["ops"]
actions = ["shell", "exec"]
instances = ["web-*"]
run_as = ["deploy"]
idle_timeout = "15m"

[[statement]]
sid = "prod-db-forward"
effect = "allow"
users = ["alice"]
actions = ["port-forward"]
labels = ["env=prod,role=db"]
forward_to = ["127.0.0.1:5432", "10.0.0.0/8:5432-5439", "*.internal:443"]

[[statement]]
sid = "no-legacy"
effect = "deny"
users = ["*"]
actions = ["*"]
labels = ["legacy"]
"#;

#[test]
fn table() {
    let s = set(&[BASE]);
    let prod_db: &[(&str, &str)] = &[("env", "prod"), ("role", "db")];
    let cases: Vec<(Req, bool, &str)> = vec![
        (Req::new("alice", "shell", "web-01"), true, "web-shell"),
        (Req::new("alice", "sftp", "web-01"), false, ""),
        (Req::new("alice", "shell", "db-01"), false, ""),
        (Req::new("bob", "shell", "web-01"), false, ""),
        (Req::new("bob", "exec", "web-01").groups(&["ops"]), true, "web-shell"),
        (Req::new("bob", "exec", "web-01").groups(&["dev"]), false, ""),
        (Req::new("alice", "shell", "web-01").labels(&[("legacy", "1")]), false, "no-legacy"),
        (
            Req { dest: Some(("127.0.0.1", 5432)), ..Req::new("alice", "port-forward", "db-01").labels(prod_db) },
            true,
            "prod-db-forward",
        ),
        (
            Req { dest: Some(("10.9.9.9", 5439)), ..Req::new("alice", "port-forward", "db-01").labels(prod_db) },
            true,
            "prod-db-forward",
        ),
        (
            Req { dest: Some(("10.9.9.9", 5440)), ..Req::new("alice", "port-forward", "db-01").labels(prod_db) },
            false,
            "",
        ),
        (
            Req { dest: Some(("11.0.0.1", 5432)), ..Req::new("alice", "port-forward", "db-01").labels(prod_db) },
            false,
            "",
        ),
        (
            Req { dest: Some(("api.internal", 443)), ..Req::new("alice", "port-forward", "db-01").labels(prod_db) },
            true,
            "prod-db-forward",
        ),
        (
            Req {
                dest: Some(("api.internal.evil", 443)),
                ..Req::new("alice", "port-forward", "db-01").labels(prod_db)
            },
            false,
            "",
        ),
        (
            Req {
                dest: Some(("127.0.0.1", 5432)),
                ..Req::new("alice", "port-forward", "db-01").labels(&[("env", "prod"), ("role", "web")])
            },
            false,
            "",
        ),
    ];
    for (i, (req, allowed, by)) in cases.iter().enumerate() {
        let d = req.check(&s);
        assert_eq!(d.allowed, *allowed, "case {i}: {}", d.summary());
        if !by.is_empty() {
            assert!(d.decided_by.iter().any(|r| r.sid == *by), "case {i}: {:?}", d.decided_by);
        }
    }
    let d = Req::new("alice", "shell", "web-01").check(&s);
    assert_eq!(d.settings.run_as, vec!["deploy".to_owned()]);
    assert_eq!(d.settings.idle_timeout, Some(Some(Duration::from_secs(900))));
    // explain names the statements that did not apply, and why.
    let d = Req::new("alice", "sftp", "web-01").check(&s);
    assert!(d.not_applicable.iter().any(|(r, why)| r.sid == "web-shell" && why.contains("action sftp")), "{d:?}");
}

#[test]
fn forwards_without_forward_to_stay_on_the_instance() {
    let s = set(&[r#"
name = "p"
[[statement]]
effect = "allow"
users = ["alice"]
actions = ["port-forward"]
instances = ["*"]
"#]);
    let ok =
        |host: &'static str| Req { dest: Some((host, 80)), ..Req::new("alice", "port-forward", "w") }.check(&s).allowed;
    assert!(ok("127.0.0.1"));
    assert!(ok("localhost"));
    assert!(ok("::1"));
    assert!(!ok("10.0.0.1"));
    assert!(!ok("db.internal"));
}

/// Issue 15 item 8: a deny holds whatever the spelling of the destination.
#[test]
fn denies_hold_for_every_spelling_of_a_destination() {
    let s = set(&[r#"
name = "p"
[[statement]]
sid = "anything"
effect = "allow"
users = ["alice"]
actions = ["port-forward"]
instances = ["*"]
forward_to = ["*:*"]

[[statement]]
sid = "no-redis"
effect = "deny"
users = ["alice"]
actions = ["port-forward"]
instances = ["*"]
forward_to = ["127.0.0.1/32:6379", "secret.internal:*", "[fd00::/8]:6379"]

[[statement]]
sid = "no-admin-ui"
effect = "deny"
users = ["alice"]
actions = ["port-forward"]
instances = ["*"]
forward_to = ["localhost:9000"]
"#]);
    let decide = |host: &'static str, port: u16| {
        Req { dest: Some((host, port)), ..Req::new("alice", "port-forward", "w") }.check(&s)
    };
    let denied = [
        "127.0.0.1",
        "localhost",
        "LOCALHOST",
        "localhost.",
        "app.localhost",
        "127.1",
        "2130706433",
        "0x7f000001",
        "0177.0.0.1",
        "127.000.000.001",
        "[::1%1]",
        "::ffff:127.0.0.1",
        "0.0.0.0",
        "127.0.0.1 ",
        "",
    ];
    for host in denied {
        let d = decide(host, 6379);
        assert!(!d.allowed, "{host:?} reached a denied destination: {d:?}");
    }
    for host in ["secret.internal", "secret.internal.", "SECRET.Internal"] {
        assert!(!decide(host, 443).allowed, "{host:?}");
    }
    // A name rule about localhost covers its addresses too.
    for host in ["127.0.0.1", "127.0.0.2", "::1", "localhost", "0x7f.1"] {
        assert!(!decide(host, 9000).allowed, "{host:?}");
    }
    assert!(decide("127.0.0.1", 6380).allowed);
    assert!(decide("127.0.0.2", 6379).allowed, "another address than the one denied");
    assert!(decide("db.internal", 6379).allowed);
    // The agent gets the address denies for the port, to check what names resolve to.
    let nets: Vec<String> = decide("db.internal", 6379).address_denies.iter().map(|n| n.to_string()).collect();
    assert_eq!(nets, ["127.0.0.1/32", "fd00::/8"]);
    assert!(decide("db.internal", 6380).address_denies.is_empty());
}

#[test]
fn loopback_names_take_the_narrow_reading_in_allows() {
    let s = set(&[r#"
name = "p"
[[statement]]
effect = "allow"
users = ["alice"]
actions = ["port-forward"]
instances = ["*"]
forward_to = ["127.0.0.1:80", "127.0.0.0/8:81", "[::1]:81", "localhost:82"]
"#]);
    let ok = |host: &'static str, port| {
        Req { dest: Some((host, port)), ..Req::new("alice", "port-forward", "w") }.check(&s).allowed
    };
    assert!(ok("127.1", 80));
    assert!(!ok("localhost", 80), "localhost may be ::1, which 127.0.0.1 does not allow");
    assert!(ok("localhost", 81));
    assert!(ok("localhost", 82) && ok("127.0.0.1", 82) && ok("::1", 82));
    assert!(!ok("127.0.0.2", 82), "localhost is 127.0.0.1 and ::1 only");
    assert!(!ok("0177.0.0.1 ", 80), "no canonical form, no allow");
}

#[test]
fn label_selectors() {
    let sel = |s: &str| document::Selector::parse(s).unwrap();
    let l: Labels = [("env", "prod"), ("role", "web")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    assert!(selector_matches(&sel("env=prod"), &l));
    assert!(selector_matches(&sel("env=prod,role!=db"), &l));
    assert!(!selector_matches(&sel("env=prod,role!=web"), &l));
    assert!(selector_matches(&sel("team!=x"), &l), "!= matches an absent label");
    assert!(!selector_matches(&sel("team"), &l));
    assert!(selector_matches(&sel("!team"), &l));
    assert!(selector_matches(&sel("env=pr*"), &l));
    assert!(!selector_matches(&sel("env=staging"), &l));
}

#[test]
fn source_ranges_and_mapped_addresses() {
    let s = set(&[r#"
name = "p"
[[statement]]
effect = "allow"
users = ["alice"]
actions = ["shell"]
instances = ["*"]
source = ["10.0.0.0/8", "2001:db8::/32"]
"#]);
    let from =
        |ip: &str| Req { source: Some(ip.parse().unwrap()), ..Req::new("alice", "shell", "w") }.check(&s).allowed;
    assert!(from("10.255.255.255"));
    assert!(!from("11.0.0.0"));
    assert!(from("::ffff:10.0.0.1"));
    assert!(from("2001:db8::1"));
    assert!(!from("2001:db9::1"));
    assert!(!Req { source: None, ..Req::new("alice", "shell", "w") }.check(&s).allowed);
}

#[test]
fn require_mfa_allows_only_sessions_whose_login_had_a_second_factor() {
    let s = set(&[r#"
name = "p"
[[statement]]
sid = "prod-with-mfa"
effect = "allow"
users = ["alice"]
actions = ["shell"]
instances = ["*"]
require_mfa = true
"#]);
    let without = Req::new("alice", "shell", "w").check(&s);
    assert!(!without.allowed);
    assert!(without.not_applicable.iter().any(|(r, why)| r.sid == "prod-with-mfa" && why.contains("requires MFA")));
    assert!(Req { mfa: true, ..Req::new("alice", "shell", "w") }.check(&s).allowed);
    // A deny with require_mfa would read as "deny only when MFA was used": refused.
    let deny = "name = \"p\"\n[[statement]]\neffect = \"deny\"\nusers = [\"a\"]\nactions = [\"shell\"]\ninstances = [\"*\"]\nrequire_mfa = true\n";
    let err = document::parse("p.toml", deny).unwrap_err().to_string();
    assert!(err.contains("require_mfa") && err.contains("allow statements"), "{err}");
}

#[test]
fn validity_period_and_windows_across_dst() {
    let s = set(&[r#"
name = "p"
[[statement]]
effect = "allow"
users = ["alice"]
actions = ["shell"]
instances = ["*"]
not_before = "2026-03-01T00:00:00Z"
not_after = "2026-12-01T00:00:00+01:00"
schedule = [{ days = "sat-sun", hours = "01:00-03:00", tz = "Europe/Berlin" },
            { days = "mon-fri", hours = "22:00-06:00", tz = "America/New_York" }]
"#]);
    let at = |t: &str| Req::new("alice", "shell", "w").at(t).check(&s).allowed;
    // Berlin springs forward on Sunday 2026-03-29 at 02:00 CET -> 03:00 CEST.
    assert!(at("2026-03-29T00:00:00Z"), "01:00 CET");
    assert!(at("2026-03-29T00:59:59Z"), "01:59:59 CET");
    assert!(!at("2026-03-29T01:00:00Z"), "03:00 CEST: the window ended after one real hour");
    // Falls back on Sunday 2026-10-25 at 03:00 CEST -> 02:00 CET: 02:xx happens twice.
    assert!(at("2026-10-25T00:30:00Z"), "02:30 CEST");
    assert!(at("2026-10-25T01:30:00Z"), "02:30 CET");
    assert!(!at("2026-10-25T02:00:00Z"), "03:00 CET");
    // Overnight window in New York belongs to the day it starts: Friday 23:00 and the
    // following Saturday 05:00 are in, Saturday 23:00 is not.
    assert!(at("2026-11-07T04:00:00Z"), "Fri 23:00 EST");
    assert!(at("2026-11-07T10:00:00Z"), "Sat 05:00 EST");
    assert!(!at("2026-11-08T04:00:00Z"), "Sat 23:00 EST");
    // Validity period bounds.
    assert!(!at("2026-02-28T23:00:00Z"), "before not_before (Saturday 00:00 Berlin)");
    assert!(!at("2026-11-30T23:00:00Z"), "at not_after");
}

#[test]
fn grants_make_the_user_a_principal_of_the_granted_policy() {
    let s = set(&[r#"
name = "oncall-prod"
[[statement]]
effect = "allow"
groups = ["oncall"]
actions = ["shell"]
labels = ["env=prod"]
max_session = "1h"
"#]);
    let mut r = Req::new("bob", "shell", "web-01").labels(&[("env", "prod")]);
    assert!(!r.check(&s).allowed);
    r.grants = vec!["oncall-prod".into()];
    let d = r.check(&s);
    assert!(d.allowed);
    assert_eq!(d.settings.max_session, Some(Some(Duration::from_secs(3600))));
    r.grants = vec!["other".into()];
    assert!(!r.check(&s).allowed);
}

#[test]
fn settings_merge_to_the_most_restrictive_limits() {
    let s = set(&[r#"
name = "p"
[[statement]]
effect = "allow"
users = ["alice"]
actions = ["shell"]
instances = ["*"]
run_as = ["deploy"]
idle_timeout = "0"
max_sessions = 3
[[statement]]
effect = "allow"
users = ["alice"]
actions = ["shell"]
instances = ["web-*"]
run_as = ["www", "deploy"]
idle_timeout = "10m"
max_sessions = 1
profile = "readonly"
"#]);
    let d = Req::new("alice", "shell", "web-01").check(&s);
    assert_eq!(d.settings.run_as, vec!["deploy".to_owned(), "www".to_owned()]);
    assert_eq!(d.settings.idle_timeout, Some(Some(Duration::from_secs(600))));
    assert_eq!(d.settings.max_sessions, Some(1));
    assert_eq!(d.settings.profile.as_deref(), Some("readonly"));
}

// ---- properties ----

#[derive(Debug, Clone)]
struct GenStatement {
    deny: bool,
    users: Vec<&'static str>,
    groups: Vec<&'static str>,
    actions: Vec<&'static str>,
    instances: Vec<&'static str>,
    labels: Vec<&'static str>,
    source: Vec<&'static str>,
}

fn gen_statement() -> impl Strategy<Value = GenStatement> {
    let users = prop::sample::subsequence(vec!["alice", "bob", "*", "a*"], 0..=2);
    let groups = prop::sample::subsequence(vec!["ops", "dev"], 0..=1);
    let actions = prop::sample::subsequence(vec!["shell", "exec", "sftp", "port-forward", "*"], 1..=2);
    let instances = prop::sample::subsequence(vec!["web-01", "web-*", "db-?1", "*"], 0..=2);
    let labels = prop::sample::subsequence(vec!["env=prod", "env!=prod", "role", "!role,env=dev"], 0..=1);
    let source = prop::sample::subsequence(vec!["10.0.0.0/8", "192.168.0.0/16"], 0..=1);
    (any::<bool>(), users, groups, actions, instances, labels, source).prop_map(
        |(deny, users, mut groups, actions, mut instances, labels, source)| {
            let users = if users.is_empty() && groups.is_empty() {
                groups = vec!["ops"];
                users
            } else {
                users
            };
            if instances.is_empty() && labels.is_empty() {
                instances = vec!["*"];
            }
            GenStatement { deny, users, groups, actions, instances, labels, source }
        },
    )
}

fn render(name: &str, stmts: &[GenStatement]) -> String {
    let q = |v: &[&str]| v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ");
    let mut out = format!("name = {name:?}\n");
    for s in stmts {
        out += &format!(
            "[[statement]]\neffect = {:?}\nusers = [{}]\ngroups = [{}]\nactions = [{}]\ninstances = [{}]\nlabels = [{}]\nsource = [{}]\n",
            if s.deny { "deny" } else { "allow" },
            q(&s.users),
            q(&s.groups),
            q(&s.actions),
            q(&s.instances),
            q(&s.labels),
            q(&s.source)
        );
    }
    out
}

fn gen_request() -> impl Strategy<Value = (&'static str, Vec<String>, &'static str, &'static str, Labels, IpAddr)> {
    (
        prop::sample::select(vec!["alice", "bob", "carol"]),
        prop::sample::subsequence(vec!["ops".to_owned(), "dev".to_owned()], 0..=2),
        prop::sample::select(vec!["shell", "exec", "sftp"]),
        prop::sample::select(vec!["web-01", "web-02", "db-01"]),
        prop::sample::subsequence(vec![("env", "prod"), ("env", "dev"), ("role", "db")], 0..=2)
            .prop_map(|v| v.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Labels>()),
        prop::sample::select(vec!["10.0.0.1", "192.168.1.1", "8.8.8.8"]).prop_map(|s| s.parse::<IpAddr>().unwrap()),
    )
}

fn decide(text: &str, r: &(&'static str, Vec<String>, &'static str, &'static str, Labels, IpAddr)) -> Decision {
    let doc = document::parse("gen.toml", text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let set = PolicySet::new([(&doc, text)]);
    set.evaluate(&Request {
        user: r.0,
        groups: &r.1,
        grants: &[],
        action: r.2,
        target: Some(Target { id: "ag-1", name: r.3, labels: &r.4 }),
        destination: None,
        source: Some(r.5),
        mfa: false,
        at: ts("2026-11-25T12:00:00Z"),
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// An applicable deny always wins, and an allow is always backed by an applicable allow.
    #[test]
    fn deny_wins_and_allows_need_an_allow(stmts in prop::collection::vec(gen_statement(), 0..8), r in gen_request()) {
        let d = decide(&render("p", &stmts), &r);
        if d.allowed {
            prop_assert!(!d.decided_by.is_empty());
            prop_assert!(d.decided_by.iter().all(|s| s.effect == Effect::Allow));
        } else {
            prop_assert!(d.decided_by.iter().all(|s| s.effect == Effect::Deny));
        }
        // With every deny removed, anything the full set allowed stays allowed, and with every
        // allow removed nothing is allowed.
        let allows: Vec<GenStatement> = stmts.iter().filter(|s| !s.deny).cloned().collect();
        let denies: Vec<GenStatement> = stmts.iter().filter(|s| s.deny).cloned().collect();
        if d.allowed {
            prop_assert!(decide(&render("p", &allows), &r).allowed);
        }
        prop_assert!(!decide(&render("p", &denies), &r).allowed);
    }

    /// Adding a deny statement never widens access.
    #[test]
    fn adding_a_deny_never_widens(stmts in prop::collection::vec(gen_statement(), 0..8), extra in gen_statement(), r in gen_request()) {
        let before = decide(&render("p", &stmts), &r).allowed;
        let mut more = stmts.clone();
        more.push(GenStatement { deny: true, ..extra });
        let after = decide(&render("p", &more), &r).allowed;
        prop_assert!(!after || before);
    }
}

#[test]
fn every_example_in_the_policy_docs_is_valid() {
    let docs = include_str!("../../../../docs/policy.md");
    let mut n = 0;
    for block in docs.split("```toml\n").skip(1) {
        let text = block.split("```").next().unwrap();
        document::parse("docs/policy.md", text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        n += 1;
    }
    assert!(n >= 4);
}
