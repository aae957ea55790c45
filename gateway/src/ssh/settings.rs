//! How the SSH door talks: russh server settings (ciphers, timeouts, windows).

use std::time::Duration;

use crate::services::Services;

/// Map `[ssh] ciphers` names to russh's; unknown names are a configuration error.
pub fn ciphers(names: &[String]) -> anyhow::Result<Vec<russh::cipher::Name>> {
    use russh::cipher::{AES_128_CTR, AES_128_GCM, AES_192_CTR, AES_256_CTR, AES_256_GCM, CHACHA20_POLY1305};
    let known = [CHACHA20_POLY1305, AES_256_GCM, AES_128_GCM, AES_256_CTR, AES_192_CTR, AES_128_CTR];
    names
        .iter()
        .map(|n| {
            known.iter().find(|k| k.as_ref() == n.as_str()).copied().ok_or_else(|| {
                anyhow::anyhow!(
                    "[ssh] ciphers: unsupported cipher {n:?}; use {}",
                    known.iter().map(|k| k.as_ref()).collect::<Vec<_>>().join(", ")
                )
            })
        })
        .collect()
}

/// Offered when `[ssh] ciphers` is not set. Clients take the first cipher of *their* list
/// that the server offers, so only AES-GCM is offered: OpenSSH prefers ChaCha20 and then
/// AES-CTR (with a separate HMAC-SHA-256 pass, 17% of gateway CPU in an `ssh -L` profile),
/// while AES-GCM with AES instructions moves the most data (docs/benchmarks.md). Clients
/// without AES-GCM (OpenSSH before 6.2, PuTTY before 0.76) need `[ssh] ciphers` extended.
const DEFAULT_CIPHERS: &[russh::cipher::Name] = &[russh::cipher::AES_256_GCM, russh::cipher::AES_128_GCM];

pub(super) fn server_config(state: &Services, certificate: russh::keys::Certificate) -> russh::server::Config {
    let preferred = russh::Preferred {
        cipher: match &state.config.ssh.ciphers {
            // Validated at start-up.
            Some(names) => ciphers(names).unwrap_or_default().into(),
            None => DEFAULT_CIPHERS.into(),
        },
        ..russh::Preferred::default()
    };
    let mut methods = russh::MethodSet::empty();
    methods.push(russh::MethodKind::PublicKey);
    russh::server::Config {
        server_id: russh::SshId::Standard("SSH-2.0-Postern".into()),
        methods,
        // Unknown keys, unknown users and wrong keys all take the same time to be refused.
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::from_millis(0)),
        keys: vec![state.host_keys.host_key.clone()],
        certificates: vec![certificate],
        max_auth_attempts: 6,
        inactivity_timeout: Some(Duration::from_secs(3600)),
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 3,
        nodelay: true,
        window_size: 2 * 1024 * 1024,
        maximum_packet_size: 65535,
        preferred,
        ..Default::default()
    }
}
