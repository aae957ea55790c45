//! Where the command line keeps the user's files: the home directory, and the sign-in key
//! and certificate of `postern login` for each gateway (`~/.ssh/postern/login-<gateway>`),
//! which user commands use by default for that gateway.

use std::path::{Path, PathBuf};

use anyhow::Context;

pub fn home_dir() -> anyhow::Result<PathBuf> {
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    nix::unistd::User::from_uid(nix::unistd::Uid::current())
        .ok()
        .flatten()
        .map(|u| u.dir)
        .context("no HOME and no home directory for this account")
}

/// Where the sign-in key for `gateway` lives: `~/.ssh/postern/login-<gateway>`, with the
/// certificate at `...-cert.pub` (where OpenSSH looks for it).
pub fn key_path(gateway: &str) -> anyhow::Result<PathBuf> {
    let slug: String = gateway.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '_' }).collect();
    Ok(home_dir()?.join(".ssh").join("postern").join(format!("login-{slug}")))
}

pub fn cert_path(key: &Path) -> PathBuf {
    PathBuf::from(format!("{}-cert.pub", key.display()))
}

/// The sign-in key for `gateway` and the user its certificate names, when there is one that
/// has not expired: the default identity of user commands for that gateway.
pub fn current_login(gateway: &str) -> Option<(PathBuf, String)> {
    let key = key_path(gateway).ok()?;
    let cert = russh::keys::load_openssh_certificate(cert_path(&key)).ok()?;
    let now = u64::try_from(jiff::Timestamp::now().as_second()).unwrap_or(0);
    if cert.valid_before() <= now || !key.is_file() {
        return None;
    }
    Some((key, cert.valid_principals().first()?.clone()))
}
