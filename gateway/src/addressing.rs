//! How users address the gateway: the names its host certificate covers, the known_hosts
//! line that trusts it, the `~/.ssh/config` block `postern ssh-config` prints, and the
//! public addresses of the SSH and RDP doors. Pure functions of the configuration.

use postern_core::command::SshConfig;

use crate::config::GatewayConfig;
use crate::hostkeys::HostKeys;

/// The name clients use for the gateway.
pub fn public_host(cfg: &GatewayConfig) -> String {
    cfg.ssh.public_host.clone().unwrap_or_else(postern_tunnel::agent::hostname)
}

/// `host:port` clients use for the RDP front door, which listens on `rdp_port`.
pub fn rdp_public_address(cfg: &GatewayConfig, rdp_port: u16) -> String {
    match &cfg.rdp.public_address {
        Some(a) => a.clone(),
        None => format!("{}:{rdp_port}", public_host(cfg)),
    }
}

/// The address `postern ssh-config` writes for the SSH door listening on `listen`: the
/// configured `public_host`, else the listen address when it is a specific one (a gateway
/// on 127.0.0.1 is not reachable at this machine's hostname), else the hostname.
pub fn ssh_public_host(cfg: &GatewayConfig, listen: std::net::SocketAddr) -> String {
    match &cfg.ssh.public_host {
        Some(h) => h.clone(),
        None if listen.ip().is_unspecified() => postern_tunnel::agent::hostname(),
        None => listen.ip().to_string(),
    }
}

/// Names the host certificate must cover: every instance, and the gateway itself.
pub fn host_principals(cfg: &GatewayConfig) -> Vec<String> {
    let mut p = vec![format!("*.{}", cfg.ssh.suffix), "localhost".into(), "127.0.0.1".into(), "::1".into()];
    p.push(postern_tunnel::agent::hostname());
    if let Some(h) = &cfg.ssh.public_host {
        p.push(h.clone());
    }
    if !cfg.ssh.listen.ip().is_unspecified() {
        p.push(cfg.ssh.listen.ip().to_string());
    }
    dedup(p)
}

fn dedup(names: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for n in names {
        if !out.contains(&n) {
            out.push(n);
        }
    }
    out
}

/// Patterns for the `@cert-authority` line: instances, and the gateway on its SSH port.
pub fn known_hosts_patterns(cfg: &GatewayConfig, port: u16) -> Vec<String> {
    let listen = std::net::SocketAddr::new(cfg.ssh.listen.ip(), port);
    let names = dedup(vec![ssh_public_host(cfg, listen), public_host(cfg), "localhost".into(), "127.0.0.1".into()]);
    let mut p: Vec<String> = names.into_iter().map(|n| if port == 22 { n } else { format!("[{n}]:{port}") }).collect();
    p.push(format!("*.{}", cfg.ssh.suffix));
    p
}

/// What `postern ssh-config` prints and installs, for the person `user`, with the SSH door
/// listening on `listen`.
pub fn client_config(
    cfg: &GatewayConfig,
    host_keys: &HostKeys,
    listen: std::net::SocketAddr,
    known_hosts_file: &str,
    user: &str,
) -> anyhow::Result<SshConfig> {
    let mut c = SshConfig {
        config: String::new(),
        user: user.to_owned(),
        host: ssh_public_host(cfg, listen),
        port: listen.port(),
        suffix: cfg.ssh.suffix.clone(),
        known_hosts_line: host_keys.known_hosts_line(&known_hosts_patterns(cfg, listen.port()))?,
    };
    c.config = c.printed(known_hosts_file, &[]);
    Ok(c)
}
