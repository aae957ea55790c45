//! How users address the gateway: the names its host certificate covers, the known_hosts
//! line that trusts it, the `~/.ssh/config` block `postern ssh-config` prints, and the
//! public addresses of the SSH and RDP doors. Pure functions of the configuration.

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

/// Names the host certificate must cover: every instance, and the gateway itself.
pub fn host_principals(cfg: &GatewayConfig) -> Vec<String> {
    let mut p = vec![format!("*.{}", cfg.ssh.suffix), "localhost".into(), "127.0.0.1".into(), "::1".into()];
    p.push(postern_tunnel::agent::hostname());
    if let Some(h) = &cfg.ssh.public_host {
        p.push(h.clone());
    }
    p.dedup();
    p
}

/// Patterns for the `@cert-authority` line: instances, and the gateway on its SSH port.
pub fn known_hosts_patterns(cfg: &GatewayConfig, port: u16) -> Vec<String> {
    let mut names = vec![public_host(cfg), "localhost".into(), "127.0.0.1".into()];
    names.dedup();
    let mut p: Vec<String> = names.into_iter().map(|n| if port == 22 { n } else { format!("[{n}]:{port}") }).collect();
    p.push(format!("*.{}", cfg.ssh.suffix));
    p
}

/// The `~/.ssh/config` block and known_hosts line printed by `postern ssh-config`.
pub fn client_config(
    cfg: &GatewayConfig,
    host_keys: &HostKeys,
    port: u16,
    known_hosts_file: &str,
) -> anyhow::Result<String> {
    let host = public_host(cfg);
    let suffix = &cfg.ssh.suffix;
    let line = host_keys.known_hosts_line(&known_hosts_patterns(cfg, port))?;
    Ok(format!(
        "# Postern: add to ~/.ssh/config\n\
         Host *.{suffix}\n\
         \x20   ProxyJump %r@{host}:{port}\n\
         \x20   UserKnownHostsFile ~/.ssh/known_hosts {known_hosts_file}\n\
         Host {host}\n\
         \x20   UserKnownHostsFile ~/.ssh/known_hosts {known_hosts_file}\n\
         \n\
         # Postern: put this line in {known_hosts_file} (it trusts the gateway's host CA\n\
         # for *.{suffix} and the gateway itself; host key checking stays strict)\n\
         {line}\n"
    ))
}
