//! The cluster's keys (docs/scale-out.md "Cluster keys").
//!
//! A single gateway makes its keys in its data directory. Gateways of a cluster must share
//! them instead, so that any gateway is a valid host, tunnel server and checkpoint signer for
//! the same names: the agent CA (agents enrolled at one gateway connect to any other), the
//! SSH host CA (one `@cert-authority` line covers every gateway), the audit signing key (one
//! public key verifies every gateway's chain), the RDP routing token key (a token issued
//! at one gateway is redeemed at another) and the SSH user CA (a user certificate issued at
//! one gateway is accepted at every other).
//!
//! `postern cluster init` makes the keys once and keeps them in the shared store, each sealed
//! with the cluster master key (`[cluster] key_file` or `key_command`, the same key formats
//! as `[audit.encryption]`); the store alone never holds them in the clear. Each sealed value
//! names the key it is, so a value moved to another row is refused. Keys are added, never
//! replaced: init is safe to run again (it adds only what is missing) and two runs at once
//! keep one set. A gateway with `[cluster] gateway_id` loads them at start and refuses to
//! start without them.

use std::sync::Arc;

use anyhow::{Context, bail};
use russh::keys::PrivateKey;
use russh::keys::ssh_key::LineEnding;
use serde::{Deserialize, Serialize};

use postern_core::util::{hex, now_unix, unhex};
use postern_tunnel::pki::CertAuthority;

use crate::audit::seal::{Ending, Keyring, MAGIC, Sealer, Unsealer};
use crate::hostkeys::{new_key, random_bytes};
use crate::store::Store;

/// The agent CA: signs agent certificates and every gateway's tunnel certificate.
pub const AGENT_CA: &str = "agent-ca";
/// The SSH host CA: signs every gateway's host key.
pub const HOST_CA: &str = "ssh-host-ca";
/// Signs the checkpoints of every gateway's audit chain.
pub const AUDIT_SIGNING: &str = "audit-signing";
/// The HMAC key of RDP routing tokens.
pub const RDP_TOKEN: &str = "rdp-token";
/// The SSH user CA: signs short-lived user certificates (`postern user cert`).
pub const USER_CA: &str = "ssh-user-ca";

/// Every cluster key, in the order `cluster init` reports them.
pub const NAMES: [&str; 5] = [AGENT_CA, HOST_CA, AUDIT_SIGNING, RDP_TOKEN, USER_CA];

/// What is sealed for one key.
#[derive(Serialize, Deserialize)]
struct Entry {
    /// Which key this is (checked against the row it is read from).
    name: String,
    /// The secret: PEM or OpenSSH text, or hex.
    secret: String,
    /// The public half that goes with it, where there is one (the CA certificate's PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    public: Option<String>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry").field("name", &self.name).finish_non_exhaustive()
    }
}

/// The cluster's keys, unsealed.
pub struct ClusterKeys {
    pub agent_ca: Arc<CertAuthority>,
    pub host_ca: PrivateKey,
    /// PKCS#8 of the ed25519 audit signing key.
    pub audit_signing: Vec<u8>,
    pub rdp_token: [u8; 32],
    pub user_ca: PrivateKey,
}

impl std::fmt::Debug for ClusterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterKeys").field("agent_ca", &self.agent_ca.pin()).finish_non_exhaustive()
    }
}

/// What `cluster init` did with one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Created,
    /// Already in the store (kept as it was).
    Kept,
}

fn generate(name: &str) -> anyhow::Result<Entry> {
    let (secret, public) = match name {
        AGENT_CA => {
            let ca = CertAuthority::generate("Postern cluster agent CA")?;
            (ca.key_pem().to_owned(), Some(ca.cert_pem().to_owned()))
        }
        HOST_CA | USER_CA => {
            let key = new_key(if name == HOST_CA { "postern cluster host CA" } else { "postern cluster user CA" })?;
            (key.to_openssh(LineEnding::LF).context("encoding the host CA")?.to_string(), None)
        }
        AUDIT_SIGNING => {
            let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                .map_err(|_| anyhow::anyhow!("cannot generate the audit signing key"))?;
            (hex(doc.as_ref()), None)
        }
        RDP_TOKEN => (hex(&random_bytes::<32>()?), None),
        other => bail!("unknown cluster key {other:?}"),
    };
    Ok(Entry { name: name.to_owned(), secret, public })
}

/// Seal one entry with the keyring's active master key.
fn seal(keyring: &Keyring, entry: &Entry) -> anyhow::Result<Vec<u8>> {
    let master = keyring.active().context("no cluster master key: set [cluster] key_file or key_command")?;
    let (mut sealer, mut out) = Sealer::new(master.as_ref())?;
    out.extend(sealer.seal(&serde_json::to_vec(entry)?, true)?);
    Ok(out)
}

/// Open the value stored as `name`; it must be whole and name itself `name`.
fn unseal(keyring: &Keyring, name: &str, sealed: &[u8]) -> anyhow::Result<Entry> {
    let what = format!("cluster key {name:?}");
    let body = sealed.strip_prefix(MAGIC).with_context(|| format!("{what} in the store is not sealed"))?;
    let mut reader = Unsealer::new(body, keyring, &what)?;
    let plain = reader.next_record().with_context(|| format!("{what} does not open with the master key"))?;
    let (Some(plain), Ending::Complete) = (plain, reader.ending) else {
        bail!("{what} in the store is incomplete");
    };
    let entry: Entry = serde_json::from_slice(&plain).with_context(|| format!("{what} is damaged"))?;
    if entry.name != name {
        bail!("{what} in the store holds the key {:?}: the store was changed by hand", entry.name);
    }
    Ok(entry)
}

/// Make the cluster keys that are not in the store yet; keep those that are. Every key in
/// the store must then open with `keyring` (so a wrong master key is found here, not at a
/// gateway's start).
pub async fn init(store: &dyn Store, keyring: &Keyring) -> anyhow::Result<(Vec<(&'static str, Outcome)>, ClusterKeys)> {
    keyring.active().context("no cluster master key: set [cluster] key_file or key_command")?;
    let present: Vec<String> =
        store.cluster_keys().await.context("reading the cluster keys")?.into_iter().map(|(n, _)| n).collect();
    let mut report = Vec::new();
    for name in NAMES {
        let outcome = if present.iter().any(|p| p == name) {
            Outcome::Kept
        } else {
            let sealed = seal(keyring, &generate(name)?)?;
            if store.add_cluster_key(name, &sealed, now_unix()).await.context("storing a cluster key")? {
                Outcome::Created
            } else {
                Outcome::Kept
            }
        };
        report.push((name, outcome));
    }
    let keys = load(store, keyring).await?;
    Ok((report, keys))
}

/// The cluster keys from the store, opened with `keyring`. Fails (naming what is missing and
/// what to run) unless every key is there and opens.
pub async fn load(store: &dyn Store, keyring: &Keyring) -> anyhow::Result<ClusterKeys> {
    let rows = store.cluster_keys().await.context("reading the cluster keys from the store")?;
    let missing: Vec<&str> = NAMES.into_iter().filter(|n| !rows.iter().any(|(r, _)| r == n)).collect();
    if !missing.is_empty() {
        bail!(
            "the cluster keys are not in the store (missing: {}): run `postern cluster init --config FILE` once \
             for the cluster, with this gateway's [store] url and [cluster] master key",
            missing.join(", ")
        );
    }
    let get = |name: &str| -> anyhow::Result<Entry> {
        let (_, sealed) = rows.iter().find(|(r, _)| r == name).context("missing")?;
        unseal(keyring, name, sealed)
    };
    let ca = get(AGENT_CA)?;
    let agent_ca =
        CertAuthority::from_pem(ca.public.as_deref().context("the agent CA has no certificate")?, &ca.secret)
            .context("loading the cluster agent CA")?;
    let host_ca = PrivateKey::from_openssh(get(HOST_CA)?.secret).context("loading the cluster host CA")?;
    let audit_signing = unhex(&get(AUDIT_SIGNING)?.secret).context("the audit signing key is damaged")?;
    ring::signature::Ed25519KeyPair::from_pkcs8(&audit_signing)
        .map_err(|_| anyhow::anyhow!("the cluster audit signing key is not an ed25519 key"))?;
    let rdp_token = unhex(&get(RDP_TOKEN)?.secret)
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .context("the RDP token key is damaged")?;
    let user_ca = PrivateKey::from_openssh(get(USER_CA)?.secret).context("loading the cluster user CA")?;
    Ok(ClusterKeys { agent_ca: Arc::new(agent_ca), host_ca, audit_signing, rdp_token, user_ca })
}

/// The cluster master keyring from `[cluster]` (empty when neither key is set).
pub fn keyring(config: &crate::config::ClusterConfig) -> anyhow::Result<Keyring> {
    let key = crate::audit::seal::master_key("[cluster]", config.key_file.as_deref(), config.key_command.as_deref())?;
    Ok(Keyring::new(key.into_iter().collect()))
}

impl ClusterKeys {
    /// The public key that verifies every gateway's checkpoints (hex, as `audit-signing.pub`).
    pub fn audit_public_hex(&self) -> anyhow::Result<String> {
        use ring::signature::KeyPair;
        let key = ring::signature::Ed25519KeyPair::from_pkcs8(&self.audit_signing)
            .map_err(|_| anyhow::anyhow!("the cluster audit signing key is not an ed25519 key"))?;
        Ok(hex(key.public_key().as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_with(byte: u8) -> Keyring {
        Keyring::new(vec![Arc::new(crate::audit::seal::FileKey::from_bytes(&[byte; 32]).unwrap())])
    }

    #[test]
    fn a_sealed_key_opens_only_as_itself_with_its_master_key() {
        let keyring = ring_with(7);
        let sealed = seal(&keyring, &generate(RDP_TOKEN).unwrap()).unwrap();
        assert!(!String::from_utf8_lossy(&sealed).contains("secret"), "sealed, not in the clear");
        assert_eq!(unseal(&keyring, RDP_TOKEN, &sealed).unwrap().name, RDP_TOKEN);
        let moved = unseal(&keyring, HOST_CA, &sealed).unwrap_err();
        assert!(format!("{moved:#}").contains("changed by hand"), "{moved:#}");
        let wrong = unseal(&ring_with(8), RDP_TOKEN, &sealed).unwrap_err();
        assert!(format!("{wrong:#}").contains("not configured here"), "{wrong:#}");
        let mut cut = sealed.clone();
        cut.truncate(sealed.len() - 3);
        assert!(unseal(&keyring, RDP_TOKEN, &cut).is_err());
        let mut flipped = sealed.clone();
        if let Some(b) = flipped.last_mut() {
            *b ^= 1;
        }
        assert!(unseal(&keyring, RDP_TOKEN, &flipped).is_err());
        assert!(unseal(&keyring, RDP_TOKEN, b"{\"name\":\"rdp-token\"}").is_err());
    }
}
