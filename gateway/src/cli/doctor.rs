//! `postern doctor`: checks of a gateway installation (docs/operations.md, "Doctor"). It
//! reads the configuration as `postern gateway --config` does and changes nothing: the store
//! is opened read-only, ports are bound and released at once, S3 gets one listing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use postern_tunnel::doctor::{CHECK_TIMEOUT, Check, Report, bounded, check_dir, check_key_files, mib, space_of};

use super::{Cli, resolve_config};
use crate::config::GatewayConfig;

/// Certificates closer than this to their end are a warning.
const CERT_WARN: Duration = Duration::from_secs(30 * 86_400);
/// One listing of the S3 bucket (below [`CHECK_TIMEOUT`]).
const S3_TIMEOUT: Duration = Duration::from_secs(4);
/// Below this much free space for recordings, a warning even when no floor is configured.
const LOW_SPACE: u64 = 1 << 30;

/// Every check, in a stable order; the names are documented.
pub async fn report(cli: &Cli) -> Report {
    let cfg = match resolve_config(cli) {
        Ok(cfg) => cfg,
        Err(e) => {
            let mut checks = vec![Check::fail(
                "config",
                format!("{e:#}"),
                "correct the file at the line shown (docs: README, \"Configuration\")",
            )];
            for name in NEEDS_CONFIG {
                checks.push(Check::skip(name, "the configuration does not load"));
            }
            return Report::new(checks);
        }
    };
    let what = match &cli.config {
        Some(p) => format!("{} loads", p.display()),
        None => "no --config file: every setting at its default".to_owned(),
    };
    let mut checks = vec![Check::ok("config", what)];
    checks.extend(config_checks(&cfg).await);
    Report::new(checks)
}

/// The checks after `config`, by name (skipped when the configuration does not load).
const NEEDS_CONFIG: [&str; 14] = [
    "data_dir",
    "key_files",
    "running",
    "port_ssh",
    "port_rdp",
    "port_web",
    "port_tunnel_udp",
    "port_tunnel_tcp",
    "port_metrics",
    "certificates",
    "disk_space",
    "store",
    "s3",
    "readyz",
];

async fn config_checks(cfg: &GatewayConfig) -> Vec<Check> {
    let dir = cfg.data_dir.as_path();
    let mut checks = Vec::new();
    let exists = dir.exists();
    checks.push(if exists {
        check_dir("data_dir", dir, true)
    } else {
        Check::ok("data_dir", format!("{} does not exist yet: the gateway creates it (mode 0700)", dir.display()))
    });
    checks.push(key_files(cfg));
    let running = running(dir).await;
    checks.push(if running {
        Check::ok("running", format!("a gateway answers on {}", crate::app::admin_socket_path(dir).display()))
    } else {
        Check::ok("running", "no gateway running with this data directory: its ports must be free")
    });
    let tcp = |on: bool, a: SocketAddr| on.then_some(a);
    // "same": the TCP port of the UDP one (port 0 there means an ephemeral port: nothing to check).
    let tunnel_tcp = cfg.tunnel.tcp_address().ok().flatten().map(|a| match a.port() {
        0 => cfg.tunnel.listen,
        _ => a,
    });
    let ports: [(&str, &str, Option<SocketAddr>, bool); 6] = [
        ("port_ssh", "[ssh] listen", tcp(cfg.ssh.enabled, cfg.ssh.listen), false),
        ("port_rdp", "[rdp] listen", tcp(cfg.rdp.enabled, cfg.rdp.listen), false),
        ("port_web", "[web] listen", tcp(cfg.web.enabled, cfg.web.listen), false),
        ("port_tunnel_udp", "[tunnel] listen", Some(cfg.tunnel.listen), true),
        ("port_tunnel_tcp", "[tunnel] tcp_listen", tunnel_tcp, false),
        ("port_metrics", "[metrics] listen", cfg.metrics.listen, false),
    ];
    for (name, key, addr, udp) in ports {
        checks.push(match addr {
            Some(a) if a.port() == 0 => Check::skip(name, format!("{key}: an ephemeral port ({a})")),
            Some(a) => port(name, key, a, udp, running),
            None => Check::skip(name, format!("{key}: off")),
        });
    }
    checks.push(certificates(cfg));
    checks.push(disk_space(cfg));
    checks.push(bounded("store", CHECK_TIMEOUT, store(cfg)).await);
    checks.push(match &cfg.audit.s3 {
        Some(s3) => bounded("s3", CHECK_TIMEOUT, s3_check(s3, dir)).await,
        None => Check::skip("s3", "[audit.s3] not configured"),
    });
    checks.push(match (running, cfg.metrics.listen) {
        (true, Some(a)) => bounded("readyz", CHECK_TIMEOUT, readyz(a)).await,
        (false, Some(_)) => Check::skip("readyz", "the gateway is not running"),
        (_, None) => Check::skip("readyz", "[metrics] listen: off"),
    });
    checks
}

/// A gateway of this data directory answers on its admin socket.
async fn running(dir: &Path) -> bool {
    let socket = crate::app::admin_socket_path(dir);
    matches!(tokio::time::timeout(Duration::from_secs(2), tokio::net::UnixStream::connect(&socket)).await, Ok(Ok(_)))
}

/// The private keys the gateway keeps: in its data directory, and the files the
/// configuration names. The agent CA's key is required once its certificate exists (without
/// it the gateway would make a new CA, and every enrolled agent would stop trusting it).
fn key_files(cfg: &GatewayConfig) -> Check {
    let dir = &cfg.data_dir;
    let mut files: Vec<PathBuf> = Vec::new();
    for name in ["ca.key", "reset.key", "audit-signing.key"] {
        files.push(dir.join(name));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "key") && !files.contains(&p) {
                files.push(p);
            }
        }
    }
    files.extend(cfg.audit.encryption.key_file.iter().cloned());
    files.extend(cfg.cluster.key_file.iter().cloned());
    files.extend(cfg.web.key_file.iter().cloned());
    let refs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let ca_key = dir.join("ca.key");
    let required: Vec<&Path> =
        if cfg.gateway_id().is_none() && dir.join("ca.crt").exists() { vec![ca_key.as_path()] } else { Vec::new() };
    let mut check = check_key_files("key_files", &refs, &required);
    if check.status == postern_tunnel::doctor::Status::Fail && check.detail.ends_with("ca.key is missing") {
        check.fix = Some(
            "restore ca.key from a backup of the data directory; started without it, the gateway makes a new agent CA and every enrolled agent has to join again"
                .into(),
        );
    }
    check
}

/// A configured listen address: free, or held by the running gateway.
fn port(name: &str, key: &str, addr: SocketAddr, udp: bool, running: bool) -> Check {
    let proto = if udp { "UDP" } else { "TCP" };
    let bound =
        if udp { std::net::UdpSocket::bind(addr).map(drop) } else { std::net::TcpListener::bind(addr).map(drop) };
    match bound {
        Ok(()) if running => Check::warn(
            name,
            format!("{proto} {addr} ({key}) is free, but the running gateway should be listening there"),
            "the running gateway was started with another configuration: restart it with this one",
        ),
        Ok(()) => Check::ok(name, format!("{proto} {addr} ({key}) is free")),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && running => {
            Check::ok(name, format!("{proto} {addr} ({key}): the running gateway listens"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Check::fail(
            name,
            format!("{proto} {addr} ({key}) is in use by another process"),
            format!(
                "stop that process (ss -l{}pn 'sport = :{}' shows it) or choose another address in {key}",
                if udp { "u" } else { "t" },
                addr.port()
            ),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Check::fail(
            name,
            format!("{proto} {addr} ({key}): {e}"),
            "ports below 1024 need CAP_NET_BIND_SERVICE (the packaged unit grants it) or a higher port",
        ),
        Err(e) => {
            Check::fail(name, format!("{proto} {addr} ({key}): {e}"), format!("use an address of this host in {key}"))
        }
    }
}

/// The agent CA (whose expiry ends every agent's trust) and the web console's certificate.
fn certificates(cfg: &GatewayConfig) -> Check {
    const NAME: &str = "certificates";
    // (file, what it is, whether it may be missing: the agent CA until the first start).
    let mut files = Vec::new();
    let mut notes = Vec::new();
    if cfg.gateway_id().is_some() {
        notes.push("the agent CA is in the cluster's store (not checked here)".to_owned());
    } else {
        files.push((cfg.data_dir.join("ca.crt"), "the agent CA", true));
    }
    if let Some(c) = &cfg.web.cert_file {
        files.push((c.clone(), "[web] cert_file", false));
    }
    let now = SystemTime::now();
    let mut seen = Vec::new();
    for (path, what, optional) in &files {
        let pem = match std::fs::read_to_string(path) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && *optional => {
                notes.push("no agent CA yet: the gateway creates it at first start".to_owned());
                continue;
            }
            Err(e) => return Check::fail(NAME, format!("{} ({what}): {e}", path.display()), "restore the file"),
        };
        let info = match postern_tunnel::pki::pem_to_der(&pem)
            .map_err(anyhow::Error::from)
            .and_then(|d| Ok(postern_tunnel::pki::cert_info(&d)?))
        {
            Ok(i) => i,
            Err(e) => {
                return Check::fail(
                    NAME,
                    format!("{} ({what}): {e:#}", path.display()),
                    "replace it with a valid PEM certificate",
                );
            }
        };
        match info.not_after.duration_since(now) {
            Err(_) => {
                return Check::fail(
                    NAME,
                    format!("{} ({what}) expired on {}", path.display(), date(info.not_after)),
                    "issue a new certificate; for the agent CA, every agent must join again",
                );
            }
            Ok(left) if left < CERT_WARN => {
                return Check::warn(
                    NAME,
                    format!(
                        "{} ({what}) expires on {} (in {} days)",
                        path.display(),
                        date(info.not_after),
                        left.as_secs() / 86_400
                    ),
                    "renew it before it expires",
                );
            }
            Ok(left) => seen.push(format!("{what} until {} ({} days)", date(info.not_after), left.as_secs() / 86_400)),
        }
    }
    seen.extend(notes);
    Check::ok(NAME, seen.join("; "))
}

fn date(t: SystemTime) -> String {
    let d = time::OffsetDateTime::from(t);
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// Free space for recordings and the audit log, against `[audit] min_free_space` (the
/// gateway's own guard, crate::recording::space) and [`LOW_SPACE`].
fn disk_space(cfg: &GatewayConfig) -> Check {
    use crate::recording::space::{SpaceGuard, human};
    const NAME: &str = "disk_space";
    let dir = cfg.data_dir.join("recordings");
    let Some((free, _)) = dir.ancestors().find_map(|d| space_of(d).ok()) else {
        return Check::skip(NAME, format!("cannot ask the file system of {}", dir.display()));
    };
    let min = match cfg.audit.min_free_space() {
        Ok(m) => m,
        Err(e) => return Check::fail(NAME, format!("{e:#}"), "correct [audit] min_free_space"),
    };
    if let Err(low) = SpaceGuard::new(min).check(&dir) {
        return Check::warn(
            NAME,
            format!("{}: {}", dir.display(), low.reason()),
            "free space there: below the floor, logged sessions are refused (or run unrecorded with [audit] fail_closed = false)",
        );
    }
    if free < LOW_SPACE {
        return Check::warn(
            NAME,
            format!("{}: {} free", dir.display(), human(free)),
            "free space for recordings and the audit log (under 1 GiB left)",
        );
    }
    Check::ok(NAME, format!("{} free for {}", mib(free), dir.display()))
}

async fn store(cfg: &GatewayConfig) -> Check {
    const NAME: &str = "store";
    let what = match &cfg.store.url {
        Some(url) => format!("PostgreSQL {}", crate::store::postgres::describe(url)),
        None => "SQLite postern.db".to_owned(),
    };
    match crate::store::probe(cfg.store.url.as_deref(), &cfg.data_dir).await {
        Ok(None) => Check::ok(NAME, format!("{what}: not created yet (the gateway creates it at first start)")),
        Ok(Some((have, want))) if have < want as i64 => {
            Check::ok(NAME, format!("{what} opens; schema version {have}, this version migrates it to {want} at start"))
        }
        Ok(Some((have, want))) if have > want as i64 => Check::warn(
            NAME,
            format!("{what} opens; schema version {have} is newer than this binary's {want}"),
            "run the newer postern binary the database was migrated by",
        ),
        Ok(Some((have, _))) => Check::ok(NAME, format!("{what} opens; schema version {have}")),
        Err(e) => Check::fail(
            NAME,
            format!("{e:#}"),
            match &cfg.store.url {
                Some(_) => "start the database, or correct [store] url (host, port, password, sslmode)",
                None => "check the data directory's owner and mode, and the disk",
            },
        ),
    }
}

/// One authenticated listing of the bucket, as the shipper makes.
async fn s3_check(cfg: &crate::audit::ship::S3Config, dir: &Path) -> Check {
    const NAME: &str = "s3";
    let shipper = match crate::audit::ship::Shipper::new(cfg, dir) {
        Ok(s) => s,
        Err(e) => return Check::fail(NAME, format!("{e:#}"), "correct [audit.s3]"),
    };
    // Under the check's own bound, so that an endpoint that does not answer gets this fix.
    let listed = tokio::time::timeout(S3_TIMEOUT, shipper.gateways())
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {}s", S3_TIMEOUT.as_secs())));
    match listed {
        Ok(_) => Check::ok(NAME, format!("bucket {} lists", cfg.bucket)),
        Err(e) => Check::fail(
            NAME,
            format!("{e:#}"),
            "check [audit.s3] endpoint, region, bucket and credentials (AWS_ACCESS_KEY_ID, ...), and that the gateway host reaches the endpoint",
        ),
    }
}

/// `GET /readyz` on the metrics listener (loopback when it listens on every address).
async fn readyz(addr: SocketAddr) -> Check {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const NAME: &str = "readyz";
    let mut target = addr;
    if addr.ip().is_unspecified() {
        target.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(target).await?;
        s.write_all(b"GET /readyz HTTP/1.1\r\nHost: postern\r\nConnection: close\r\n\r\n").await?;
        let mut body = Vec::new();
        s.take(64 << 10).read_to_end(&mut body).await?;
        std::io::Result::Ok(String::from_utf8_lossy(&body).into_owned())
    };
    match exchange.await {
        Ok(text) => {
            let status = text.lines().next().unwrap_or_default().to_owned();
            let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().trim().replace('\n', "; ");
            if status.contains(" 200 ") {
                Check::ok(NAME, format!("http://{target}/readyz: {body}"))
            } else {
                Check::fail(
                    NAME,
                    format!("http://{target}/readyz: {status}: {body}"),
                    "see the reasons it gives (docs/operations.md, \"Health endpoints\")",
                )
            }
        }
        Err(e) => {
            Check::fail(NAME, format!("http://{target}/readyz: {e}"), "check [metrics] listen and the gateway's log")
        }
    }
}
