//! `postern doctor` and `postern-agent doctor`: checks of an installation, each bounded in
//! time, printed one line each (the fix indented under a failure) or as JSON
//! (docs/operations.md, "Doctor"). This module has the report both commands print and the
//! agent's checks; the gateway's are in the gateway crate.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::agent::{Candidate, load_state};
use crate::dial::{Clients, Route, TransportChoice};
use crate::tls::TransportTimers;
use crate::transport::Transport;

/// How long one check may take before it fails as "did not finish".
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// A QUIC handshake to one gateway address.
pub const QUIC_TIMEOUT: Duration = Duration::from_secs(3);
/// Clock difference to the gateway that is worth a warning, and a failure.
pub const SKEW_WARN: Duration = Duration::from_secs(5);
pub const SKEW_FAIL: Duration = Duration::from_secs(60);

/// A check's outcome. `warn` does not make the command fail; `skip` says the check did not
/// apply (or depended on one that failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Skip,
    Warn,
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Skip => "SKIP",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

/// One check: a stable name, what was found, and what to do about it.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
    pub fix: Option<String>,
}

impl Check {
    pub fn ok(name: &str, detail: impl Into<String>) -> Self {
        Self { name: name.to_owned(), status: Status::Ok, detail: detail.into(), fix: None }
    }
    pub fn skip(name: &str, detail: impl Into<String>) -> Self {
        Self { name: name.to_owned(), status: Status::Skip, detail: detail.into(), fix: None }
    }
    pub fn warn(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self { name: name.to_owned(), status: Status::Warn, detail: detail.into(), fix: Some(fix.into()) }
    }
    pub fn fail(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self { name: name.to_owned(), status: Status::Fail, detail: detail.into(), fix: Some(fix.into()) }
    }
}

/// Run one check within `limit`: one that does not finish fails, so the doctor never hangs.
pub async fn bounded(name: &str, limit: Duration, check: impl Future<Output = Check>) -> Check {
    match tokio::time::timeout(limit, check).await {
        Ok(c) => c,
        Err(_) => Check::fail(
            name,
            format!("did not finish within {}s", limit.as_secs()),
            "see the other checks; a network peer or file system that does not answer",
        ),
    }
}

/// Every check, in a stable order, and the overall status.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub status: Status,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn new(checks: Vec<Check>) -> Self {
        let status = match checks.iter().map(|c| c.status).max() {
            Some(Status::Fail) => Status::Fail,
            Some(Status::Warn) => Status::Warn,
            _ => Status::Ok,
        };
        Self { status, checks }
    }

    /// One line per check, the fix indented under it, and a summary line.
    pub fn human(&self) -> String {
        let width = self.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        let mut out = String::new();
        for c in &self.checks {
            // Continuation lines (a parse error's excerpt) under the detail column.
            let detail = c.detail.trim_end().replace('\n', &format!("\n      {:<width$}  ", ""));
            out.push_str(&format!("{:<4}  {:<width$}  {detail}\n", c.status.label(), c.name));
            if let Some(fix) = &c.fix
                && matches!(c.status, Status::Fail | Status::Warn)
            {
                out.push_str(&format!("      {:<width$}  fix: {fix}\n", ""));
            }
        }
        let count = |s| self.checks.iter().filter(|c| c.status == s).count();
        out.push_str(&format!(
            "{}: {} ok, {} warning(s), {} failing, {} skipped\n",
            self.status.label(),
            count(Status::Ok),
            count(Status::Warn),
            count(Status::Fail),
            count(Status::Skip)
        ));
        out
    }

    /// The exit status: 1 when a check fails, else 0 (warnings do not fail).
    pub fn exit_code(&self) -> u8 {
        u8::from(self.status == Status::Fail)
    }
}

/// Permissions of a directory holding keys: owned by this user, not writable by group or
/// others; `private` also wants it unreadable by others.
pub fn check_dir(name: &str, dir: &Path, private: bool) -> Check {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) => return Check::fail(name, format!("{}: {e}", dir.display()), "create it, or point to the right one"),
    };
    if !meta.is_dir() {
        return Check::fail(name, format!("{} is not a directory", dir.display()), "point to the right directory");
    }
    let mode = meta.mode() & 0o7777;
    let me = nix::unistd::Uid::effective();
    if meta.uid() != me.as_raw() && !me.is_root() {
        return Check::fail(
            name,
            format!("{} is owned by uid {}, not by this user (uid {me})", dir.display(), meta.uid()),
            format!("run as the service's user, or chown -R {me} {}", dir.display()),
        );
    }
    if mode & 0o022 != 0 {
        return Check::fail(
            name,
            format!("{} has mode {mode:04o}: others can replace its keys", dir.display()),
            format!("chmod 700 {}", dir.display()),
        );
    }
    if private && mode & 0o007 != 0 {
        return Check::fail(
            name,
            format!("{} has mode {mode:04o}: others can read into it", dir.display()),
            format!("chmod 700 {}", dir.display()),
        );
    }
    Check::ok(name, format!("{} (mode {mode:04o}, owner uid {})", dir.display(), meta.uid()))
}

/// Modes of key files: none may be readable or writable by group or others. Missing files
/// are left to the caller (`required` ones fail).
pub fn check_key_files(name: &str, files: &[&Path], required: &[&Path]) -> Check {
    use std::os::unix::fs::MetadataExt;
    let mut seen = Vec::new();
    for f in files {
        match std::fs::metadata(f) {
            Ok(m) => {
                let mode = m.mode() & 0o7777;
                if mode & 0o077 != 0 {
                    return Check::fail(
                        name,
                        format!("{} has mode {mode:04o}: a private key readable by others", f.display()),
                        format!("chmod 600 {} (and consider the key exposed: replace it)", f.display()),
                    );
                }
                seen.push(f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if required.contains(f) {
                    return Check::fail(
                        name,
                        format!("{} is missing", f.display()),
                        "restore it from a backup of the data directory",
                    );
                }
            }
            Err(e) => return Check::fail(name, format!("{}: {e}", f.display()), "check the file's owner and mode"),
        }
    }
    if seen.is_empty() {
        Check::ok(name, "no key files yet")
    } else {
        Check::ok(name, format!("{} mode 0600", seen.join(", ")))
    }
}

/// Free space on the file system of `dir`: (free for unprivileged users, total).
#[allow(clippy::useless_conversion)] // the widths differ between platforms
pub fn space_of(dir: &Path) -> std::io::Result<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    let unit = u64::from(st.fragment_size());
    Ok((u64::from(st.blocks_available()).saturating_mul(unit), u64::from(st.blocks()).saturating_mul(unit)))
}

/// `n` bytes in MiB, for details.
pub fn mib(n: u64) -> String {
    format!("{} MiB", n >> 20)
}

/// What `postern-agent doctor` needs: where the state is and how the agent dials.
pub struct AgentDoctor {
    pub state_dir: std::path::PathBuf,
    /// Addresses from the command line (`--gateway`), else those of the state file.
    pub gateways: Vec<String>,
    pub route: Route,
}

/// Every agent check, in order.
pub async fn agent_checks(opts: &AgentDoctor) -> Vec<Check> {
    let dir = opts.state_dir.as_path();
    let mut checks = Vec::new();
    let state = load_state(dir);
    checks.push(match &state {
        Ok(s) => {
            Check::ok("joined", format!("as {} (id {}), gateway {}", s.name, s.agent_id, s.addresses().join(", ")))
        }
        Err(e) => Check::fail(
            "joined",
            format!("{e:#}"),
            format!(
                "join first: postern-agent --state-dir {} join --gateway HOST --token ... --ca-pin ...",
                dir.display()
            ),
        ),
    });
    let joined = state.is_ok();
    checks.push(if dir.exists() {
        check_dir("state_dir", dir, true)
    } else {
        Check::skip("state_dir", "no state directory")
    });
    let identity = dir.join(crate::agent::IDENTITY_FILE);
    checks.push(if joined {
        check_key_files("key_files", &[&identity], &[&identity])
    } else {
        Check::skip("key_files", "not joined")
    });
    checks.push(if joined { certificate(dir) } else { Check::skip("certificate", "not joined") });
    checks.push(space(dir));
    let gateways = match (&state, opts.gateways.is_empty()) {
        (_, false) => opts.gateways.clone(),
        (Ok(s), true) => s.addresses(),
        (Err(_), true) => Vec::new(),
    };
    let clients = if joined {
        crate::agent::tunnel_clients(dir, TransportTimers::default(), 1).map(|(c, _)| c).and_then(|tunnel| {
            let (quic, tls) = time_clients(dir)?;
            Ok((tunnel, Clients { quic, tls: std::sync::Arc::new(tls), sessions: 0 }))
        })
    } else {
        Err(anyhow::anyhow!("not joined"))
    };
    match clients {
        Ok((tunnel, time)) => checks.extend(reachability(&gateways, &opts.route, &tunnel, &time).await),
        Err(e) => {
            let why = format!("{e:#}");
            for name in ["gateway_udp", "gateway_tcp", "gateway", "clock"] {
                checks.push(Check::skip(name, why.clone()));
            }
        }
    }
    checks
}

fn time_clients(dir: &Path) -> anyhow::Result<(quinn::ClientConfig, rustls::ClientConfig)> {
    use anyhow::Context;
    let read =
        |f: &str| std::fs::read_to_string(dir.join(f)).with_context(|| format!("reading {}", dir.join(f).display()));
    let ca = crate::pki::pem_to_der(&read(crate::agent::CA_FILE)?)?;
    let identity = read(crate::agent::IDENTITY_FILE)?;
    let cert = crate::pki::pem_to_der(&identity)?;
    let key = rcgen::KeyPair::from_pem(&identity).context("parsing agent key")?;
    Ok(crate::tls::agent_time_tls(&ca, cert, crate::pki::private_key_der(&key), TransportTimers::default())?)
}

fn certificate(dir: &Path) -> Check {
    const NAME: &str = "certificate";
    let info = match crate::agent::identity_info(dir) {
        Ok(i) => i,
        Err(e) => return Check::fail(NAME, format!("{e:#}"), "join again: postern-agent join --force ..."),
    };
    let now = SystemTime::now();
    let renew = crate::pki::renewal_time(&info);
    let left = info.not_after.duration_since(now).unwrap_or_default();
    if info.not_after <= now {
        return Check::fail(
            NAME,
            format!("expired {} ago", days(now.duration_since(info.not_after).unwrap_or_default())),
            "the gateway refuses it and it cannot renew itself any more: join again with a new token (postern-agent join --force ...)",
        );
    }
    // Renewal is due at two thirds of the lifetime; past five sixths it should have happened.
    let lifetime = info.not_after.duration_since(info.not_before).unwrap_or_default();
    if left < lifetime / 6 {
        return Check::warn(
            NAME,
            format!("expires in {}; it should have been renewed already", days(left)),
            "the agent renews its certificate itself while connected: check that `postern-agent run` is running and reaches the gateway",
        );
    }
    let until_renew = renew.duration_since(now).unwrap_or_default();
    Check::ok(NAME, format!("expires in {}; the agent renews it itself in {}", days(left), days(until_renew)))
}

fn days(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 86_400 {
        format!("{}d {}h", s / 86_400, s % 86_400 / 3600)
    } else {
        format!("{}h {}m", s / 3600, s % 3600 / 60)
    }
}

fn space(dir: &Path) -> Check {
    const NAME: &str = "disk_space";
    const LOW: u64 = 100 << 20;
    let Some((free, _)) = dir.ancestors().find_map(|d| space_of(d).ok()) else {
        return Check::skip(NAME, format!("cannot ask the file system of {}", dir.display()));
    };
    if free < (1 << 20) {
        Check::fail(
            NAME,
            format!("{} free for {}", mib(free), dir.display()),
            "free some space: the agent cannot renew its certificate on a full disk",
        )
    } else if free < LOW {
        Check::warn(NAME, format!("{} free for {}", mib(free), dir.display()), "free some space (under 100 MiB left)")
    } else {
        Check::ok(NAME, format!("{} free for {}", mib(free), dir.display()))
    }
}

/// The gateway over QUIC and over TCP (through the proxy, if any), the transport the agent
/// would use, and the clock difference over it.
async fn reachability(gateways: &[String], route: &Route, tunnel: &Clients, time: &Clients) -> Vec<Check> {
    // Through a proxy, a name this host cannot resolve is still tried (the proxy resolves it).
    let (candidates, errors) = crate::agent::resolve_for(gateways, route.proxy.is_some()).await;
    let port_of = |c: &Candidate| c.addr.port();
    let tcp_candidate = |c: &Candidate| match route.tcp_port {
        Some(p) => {
            let mut c = c.clone();
            c.addr.set_port(p);
            if let Some((host, _)) = c.gateway.rsplit_once(':') {
                c.gateway = format!("{host}:{p}");
            }
            c
        }
        None => c.clone(),
    };
    if candidates.is_empty() && route.proxy.is_none() {
        let detail = if errors.is_empty() { "no gateway address".to_owned() } else { errors.join("; ") };
        let mut out = vec![Check::fail("gateway_udp", detail.clone(), "check the gateway address (DNS, --gateway)")];
        out.push(Check::fail("gateway_tcp", detail.clone(), "check the gateway address (DNS, --gateway)"));
        out.push(Check::fail("gateway", detail, "check the gateway address (DNS, --gateway)"));
        out.push(Check::skip("clock", "no gateway reached"));
        return out;
    }
    // QUIC: the first address that answers.
    let mut quic_ok: Option<Candidate> = None;
    let mut quic_errors = Vec::new();
    let quic_check = if route.choice == TransportChoice::Tcp {
        Check::skip("gateway_udp", "transport = tcp: QUIC is not used")
    } else {
        for c in candidates.iter().filter(|c| c.resolved) {
            match crate::dial::quic(tunnel, c, QUIC_TIMEOUT).await {
                Ok(d) => {
                    d.conn.close(crate::server::close::NORMAL, b"doctor");
                    d.wait_idle().await;
                    quic_ok = Some(c.clone());
                    break;
                }
                Err(e) => quic_errors.push(format!("{e:#}")),
            }
        }
        match &quic_ok {
            Some(c) => Check::ok("gateway_udp", format!("QUIC handshake with {} over UDP", at(c))),
            None => Check::warn(
                "gateway_udp",
                if quic_errors.is_empty() {
                    "no gateway address resolves on this host: QUIC cannot be tried".to_owned()
                } else {
                    quic_errors.join("; ")
                },
                format!(
                    "allow UDP port {} from this host to the gateway (the agent falls back to TCP, which is slower on lossy links)",
                    candidates.first().map(port_of).unwrap_or(crate::agent::DEFAULT_GATEWAY_PORT)
                ),
            ),
        }
    };
    let mut tcp_ok: Option<Candidate> = None;
    let mut tcp_errors = Vec::new();
    let via = route.proxy.as_ref().map(|_| " through the proxy").unwrap_or("");
    let tcp_check = if route.choice == TransportChoice::Quic {
        Check::skip("gateway_tcp", "transport = quic: TCP is not used")
    } else {
        for c in candidates.iter().map(tcp_candidate) {
            let dialed = tokio::time::timeout(
                CHECK_TIMEOUT,
                crate::dial::tcp(tunnel, &c, route.proxy.as_ref(), TransportTimers::default()),
            )
            .await;
            match dialed {
                Ok(Ok(d)) => {
                    d.conn.close(crate::server::close::NORMAL, b"doctor");
                    d.wait_idle().await;
                    tcp_ok = Some(c);
                    break;
                }
                Ok(Err(e)) => tcp_errors.push(format!("{e:#}")),
                Err(_) => {
                    tcp_errors.push(format!("no TCP answer from {} within {}s", c.gateway, CHECK_TIMEOUT.as_secs()))
                }
            }
        }
        match &tcp_ok {
            Some(c) => Check::ok("gateway_tcp", format!("TLS over TCP with {}{via}", at(c))),
            None => Check::warn(
                "gateway_tcp",
                tcp_errors.join("; "),
                "allow TCP to the gateway's tunnel port, or set a proxy ([agent] proxy, HTTPS_PROXY)",
            ),
        }
    };
    let port = candidates.first().map(port_of).unwrap_or(crate::agent::DEFAULT_GATEWAY_PORT);
    let summary = match (&quic_ok, &tcp_ok) {
        (Some(_), _) => Check::ok("gateway", "reachable over QUIC (the agent's first choice)"),
        (None, Some(_)) if route.choice == TransportChoice::Tcp => {
            Check::ok("gateway", "reachable over TCP (transport = tcp)")
        }
        (None, Some(_)) => Check::warn(
            "gateway",
            "reachable over TCP only: the agent works, on the fallback transport",
            format!("open UDP port {port} to the gateway for QUIC"),
        ),
        (None, None) => Check::fail(
            "gateway",
            "unreachable over every transport the agent may use",
            format!(
                "open UDP port {port} (QUIC) or TCP port {} to the gateway, or set a proxy ([agent] proxy); check the gateway is running",
                route.tcp_port.unwrap_or(port)
            ),
        ),
    };
    let clock = match (&quic_ok, &tcp_ok) {
        (Some(c), _) => clock(time, c, Transport::Quic, route).await,
        (None, Some(c)) => clock(time, c, Transport::Tcp, route).await,
        (None, None) => Check::skip("clock", "no gateway reached"),
    };
    vec![quic_check, tcp_check, summary, clock]
}

/// `gw.example.com:4433 (192.0.2.1:4433)`, or the address alone when it was given as one.
fn at(c: &Candidate) -> String {
    if c.gateway == c.addr.to_string() { c.gateway.clone() } else { format!("{} ({})", c.gateway, c.addr) }
}

/// Ask the gateway its clock (`postern-time/1`) and compare it with ours. The gateway's
/// answer left it between our sending the first packet and our reading the answer, so the
/// difference is known to within that round trip, which the detail states.
async fn clock(time: &Clients, c: &Candidate, over: Transport, route: &Route) -> Check {
    const NAME: &str = "clock";
    let started = SystemTime::now();
    let t0 = std::time::Instant::now();
    let dialed = match over {
        Transport::Quic => crate::dial::quic(time, c, QUIC_TIMEOUT).await,
        Transport::Tcp => match tokio::time::timeout(
            CHECK_TIMEOUT,
            crate::dial::tcp(time, c, route.proxy.as_ref(), TransportTimers::default()),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!("no TCP answer within {}s", CHECK_TIMEOUT.as_secs())),
        },
    };
    let d = match dialed {
        Ok(d) => d,
        Err(e) => {
            return Check::warn(
                NAME,
                format!("the gateway did not tell its time: {e:#}"),
                "a gateway older than this agent does not answer the time query (postern-time/1); compare the clocks by hand, or upgrade the gateway",
            );
        }
    };
    let closed = tokio::time::timeout(QUIC_TIMEOUT, d.conn.closed()).await;
    let round_trip = t0.elapsed();
    let gateway_ms = match closed {
        Ok(c) if c.code == Some(postern_proto::CLOSE_TIME) => c.reason.trim().parse::<u64>().ok(),
        _ => None,
    };
    let Some(gateway_ms) = gateway_ms else {
        return Check::warn(
            NAME,
            "the gateway did not tell its time",
            "upgrade the gateway; compare the clocks by hand",
        );
    };
    // Our clock at the middle of the exchange, against the gateway's.
    let middle = started + round_trip / 2;
    let ours = middle.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    skew(ours, gateway_ms, round_trip)
}

/// The `clock` check: our clock `ours` (Unix ms, at the middle of the query) against the
/// gateway's answer, known to within half the query's `round_trip`.
fn skew(ours: u128, gateway_ms: u64, round_trip: Duration) -> Check {
    const NAME: &str = "clock";
    let skew_ms = i128::try_from(ours).unwrap_or(0) - i128::from(gateway_ms);
    let abs = Duration::from_millis(u64::try_from(skew_ms.unsigned_abs()).unwrap_or(u64::MAX));
    let direction = if skew_ms >= 0 { "ahead of" } else { "behind" };
    let detail = format!(
        "this host is {:.1}s {direction} the gateway (± {:.1}s, the query's round trip)",
        abs.as_secs_f64(),
        round_trip.as_secs_f64() / 2.0
    );
    let fix = "synchronise both clocks with NTP (timedatectl set-ntp true; chronyc tracking): certificates and tokens are checked against the clock";
    let margin = round_trip / 2;
    if abs > SKEW_FAIL + margin {
        Check::fail(NAME, detail, fix)
    } else if abs > SKEW_WARN + margin {
        Check::warn(NAME, detail, fix)
    } else {
        Check::ok(NAME, detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overall_status_and_exit_code() {
        let r = Report::new(vec![Check::ok("a", "x"), Check::skip("b", "y")]);
        assert_eq!((r.status, r.exit_code()), (Status::Ok, 0));
        let r = Report::new(vec![Check::ok("a", "x"), Check::warn("b", "y", "z")]);
        assert_eq!((r.status, r.exit_code()), (Status::Warn, 0));
        let r = Report::new(vec![Check::fail("a", "x", "do this"), Check::warn("b", "y", "z")]);
        assert_eq!((r.status, r.exit_code()), (Status::Fail, 1));
        let text = r.human();
        assert!(text.contains("FAIL  a  x\n") && text.contains("fix: do this"), "{text}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["status"], "fail");
        assert_eq!(json["checks"][0]["fix"], "do this");
        assert_eq!(json["checks"][1]["status"], "warn");
    }

    #[test]
    fn clock_skew_beyond_the_round_trip_warns_then_fails() {
        let rt = Duration::from_millis(200);
        let at = |ours: u128| skew(ours, 1_000_000, rt);
        assert_eq!(at(1_000_000).status, Status::Ok);
        assert_eq!(at(1_005_050).status, Status::Ok, "within 5 s plus half the round trip");
        let w = at(1_005_200);
        assert_eq!(w.status, Status::Warn);
        assert!(w.detail.starts_with("this host is 5.2s ahead of the gateway"), "{}", w.detail);
        let f = at(900_000);
        assert_eq!(f.status, Status::Fail);
        assert!(f.detail.starts_with("this host is 100.0s behind"), "{}", f.detail);
        assert!(f.fix.unwrap().contains("NTP"));
    }

    #[test]
    fn loose_modes_fail() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let set = |p: &Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        set(dir.path(), 0o700);
        assert_eq!(check_dir("d", dir.path(), true).status, Status::Ok);
        set(dir.path(), 0o777);
        assert_eq!(check_dir("d", dir.path(), false).status, Status::Fail);
        set(dir.path(), 0o755);
        assert_eq!(check_dir("d", dir.path(), false).status, Status::Ok);
        assert_eq!(check_dir("d", dir.path(), true).status, Status::Fail);
        let key = dir.path().join("k.key");
        std::fs::write(&key, "x").unwrap();
        set(&key, 0o644);
        assert_eq!(check_key_files("k", &[&key], &[]).status, Status::Fail);
        set(&key, 0o600);
        assert_eq!(check_key_files("k", &[&key], &[]).status, Status::Ok);
        let gone = dir.path().join("gone.key");
        assert_eq!(check_key_files("k", &[&gone], &[]).status, Status::Ok);
        assert_eq!(check_key_files("k", &[&gone], &[&gone]).status, Status::Fail);
    }
}
