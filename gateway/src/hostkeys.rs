//! The gateway's SSH host CA and host certificate, and its SSH user CA (short-lived user
//! certificates, `postern user cert`).
//!
//! The host CA (`ssh_host_ca`, 0600) signs the gateway's host key with principals for every
//! name a client may use: `*.<suffix>` (OpenSSH accepts wildcard principals in host
//! certificates) and the gateway's own names. Clients trust the CA once with a
//! `@cert-authority` line and keep strict host key checking.

use std::path::Path;

use anyhow::Context;
use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::{self, LineEnding};
use russh::keys::{Certificate, PrivateKey};

use postern_tunnel::agent::write_private;

pub struct HostKeys {
    pub ca: PrivateKey,
    pub host_key: PrivateKey,
    pub certificate: Certificate,
}

impl std::fmt::Debug for HostKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostKeys").finish_non_exhaustive()
    }
}

pub(crate) fn random_bytes<const N: usize>() -> anyhow::Result<[u8; N]> {
    let mut b = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| anyhow::anyhow!("system random number generator failed"))?;
    Ok(b)
}

/// A new ed25519 key (a CA's or the host's) with `comment`.
pub(crate) fn new_key(comment: &str) -> anyhow::Result<PrivateKey> {
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&random_bytes::<32>()?));
    key.set_comment(comment);
    Ok(key)
}

fn load_or_create_key(path: &Path, comment: &str) -> anyhow::Result<PrivateKey> {
    if path.exists() {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        return PrivateKey::from_openssh(text).with_context(|| format!("parsing {}", path.display()));
    }
    let key = new_key(comment)?;
    let pem = key.to_openssh(LineEnding::LF).context("encoding key")?;
    write_private(path, pem.as_bytes())?;
    Ok(key)
}

fn issue(ca: &PrivateKey, host_key: &PrivateKey, principals: &[String]) -> anyhow::Result<Certificate> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp().max(0).unsigned_abs();
    let mut b = Builder::new(
        random_bytes::<16>()?.to_vec(),
        host_key.public_key().key_data().clone(),
        now.saturating_sub(300),
        now + 365 * 86400,
    )
    .context("certificate builder")?;
    b.cert_type(CertType::Host).context("cert type")?;
    b.key_id("postern-gateway").context("key id")?;
    b.serial(u64::from_be_bytes(random_bytes::<8>()?)).context("serial")?;
    for p in principals {
        b.valid_principal(p.clone()).context("principal")?;
    }
    b.sign(ca).context("signing host certificate")
}

/// The gateway's SSH user CA (`ssh_user_ca`, 0600; a cluster's is shared): signs short-lived
/// user certificates whose one principal is the Postern user name. The gateway trusts it
/// like a `user_ca_keys` entry, so the usual checks apply at login (the user must exist and
/// be enabled, the certificate must name them and be within its validity).
pub struct UserCa {
    key: PrivateKey,
}

impl std::fmt::Debug for UserCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserCa").finish_non_exhaustive()
    }
}

/// A user certificate as issued: the certificate, its serial and its end (Unix seconds).
#[derive(Debug)]
pub struct IssuedCert {
    pub certificate: Certificate,
    pub serial: u64,
    pub valid_before: u64,
}

impl UserCa {
    /// Load (or create) the user CA in `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        Ok(Self { key: load_or_create_key(&dir.join("ssh_user_ca"), "postern user CA")? })
    }

    /// The user CA `key` (a cluster's).
    pub fn with_key(key: PrivateKey) -> Self {
        Self { key }
    }

    /// The CA's public key, to trust certificates it signed.
    pub fn public_key(&self) -> ssh_key::PublicKey {
        self.key.public_key().clone()
    }

    /// A user certificate for `key`, naming `user` as its one principal, valid from five
    /// minutes ago (clock skew) for `ttl`, with `extensions` besides the usual permits. Its
    /// key id says who and which serial.
    pub fn issue(
        &self,
        user: &str,
        key: &ssh_key::PublicKey,
        ttl: std::time::Duration,
        extensions: &[(&str, String)],
    ) -> anyhow::Result<IssuedCert> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp().max(0).unsigned_abs();
        let valid_before = now.saturating_add(ttl.as_secs().max(1));
        let serial = u64::from_be_bytes(random_bytes::<8>()?);
        let mut b =
            Builder::new(random_bytes::<16>()?.to_vec(), key.key_data().clone(), now.saturating_sub(300), valid_before)
                .context("certificate builder")?;
        b.cert_type(CertType::User).context("cert type")?;
        b.key_id(format!("postern:{user}:{serial:016x}")).context("key id")?;
        b.serial(serial).context("serial")?;
        b.valid_principal(user.to_owned()).context("principal")?;
        for ext in ["permit-pty", "permit-port-forwarding", "permit-agent-forwarding"] {
            b.extension(ext, "").context("extension")?;
        }
        for (name, value) in extensions {
            b.extension(*name, value.as_str()).context("extension")?;
        }
        let certificate = b.sign(&self.key).context("signing the user certificate")?;
        Ok(IssuedCert { certificate, serial, valid_before })
    }
}

impl HostKeys {
    /// Load (or create) the CA and host key in `dir`, and issue a fresh host certificate
    /// valid for `principals` for one year.
    pub fn load(dir: &Path, principals: &[String]) -> anyhow::Result<Self> {
        let ca = load_or_create_key(&dir.join("ssh_host_ca"), "postern host CA")?;
        Self::with_ca(ca, dir, principals)
    }

    /// The same with the host CA given (a cluster's, shared by its gateways); the host key
    /// stays this gateway's own, in `dir`.
    pub fn with_ca(ca: PrivateKey, dir: &Path, principals: &[String]) -> anyhow::Result<Self> {
        let host_key = load_or_create_key(&dir.join("ssh_host_ed25519"), "postern gateway")?;
        let certificate = issue(&ca, &host_key, principals)?;
        Ok(Self { ca, host_key, certificate })
    }

    /// A host certificate for exactly these names (OpenSSH before 9.5 does not accept
    /// wildcard principals, so inner connections get one naming the instance they reach).
    pub fn certificate_for(&self, principals: &[String]) -> anyhow::Result<Certificate> {
        issue(&self.ca, &self.host_key, principals)
    }

    /// `@cert-authority PATTERNS ssh-ed25519 AAAA... postern host CA` for known_hosts.
    pub fn known_hosts_line(&self, patterns: &[String]) -> anyhow::Result<String> {
        let public: ssh_key::PublicKey = self.ca.public_key().clone();
        Ok(format!("@cert-authority {} {}", patterns.join(","), public.to_openssh().context("encoding CA key")?))
    }
}
