//! The parts of OpenSSH known_hosts files that apply to one host: plain host keys,
//! `@cert-authority` lines (the gateway's host CA, from `postern ssh-config`) and
//! `@revoked` keys.

use std::path::PathBuf;

use postern_core::util::glob_match;
use russh::keys::ssh_key::certificate::CertType;
use russh::keys::ssh_key::{Certificate, Fingerprint, HashAlg, PublicKey};

/// The known_hosts entries for one host.
#[derive(Debug, Default)]
pub struct Trust {
    pub keys: Vec<PublicKey>,
    pub authorities: Vec<PublicKey>,
    pub revoked: Vec<PublicKey>,
}

/// Entries for `host` on `port` from these files (missing files are skipped).
pub fn load(files: &[PathBuf], host: &str, port: u16) -> Trust {
    let mut t = Trust::default();
    for f in files {
        if let Ok(text) = std::fs::read_to_string(f) {
            parse_into(&mut t, &text, host, port);
        }
    }
    t
}

/// Add the entries of one known_hosts text that apply to `host` on `port`.
pub fn parse_into(t: &mut Trust, text: &str, host: &str, port: u16) {
    let name = if port == 22 { host.to_owned() } else { format!("[{host}]:{port}") };
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        let (marker, patterns) = if first.starts_with('@') { (Some(first), words.next()) } else { (None, Some(first)) };
        let (Some(patterns), Some(kind), Some(b64)) = (patterns, words.next(), words.next()) else { continue };
        if !host_matches(patterns, &name) {
            continue;
        }
        let Ok(key) = PublicKey::from_openssh(&format!("{kind} {b64}")) else { continue };
        match marker {
            None => t.keys.push(key),
            Some("@cert-authority") => t.authorities.push(key),
            Some("@revoked") => t.revoked.push(key),
            Some(_) => {}
        }
    }
}

/// OpenSSH host pattern lists: `a,b,*.example.com,!bad`, and hashed `|1|salt|hash`.
fn host_matches(patterns: &str, name: &str) -> bool {
    if let Some(hashed) = patterns.strip_prefix("|1|") {
        return hashed_matches(hashed, name);
    }
    let mut hit = false;
    for p in patterns.split(',') {
        match p.strip_prefix('!') {
            Some(neg) if glob_match(neg, name) => return false,
            Some(_) => {}
            None => hit |= glob_match(p, name),
        }
    }
    hit
}

fn hashed_matches(hashed: &str, name: &str) -> bool {
    // base64ct through russh's ssh-encoding: no extra base64 crate for the SDK.
    use russh::keys::ssh_encoding::base64::{Base64, Encoding};
    let Some((salt, hash)) = hashed.split_once('|') else { return false };
    let (Ok(salt), Ok(hash)) = (Base64::decode_vec(salt), Base64::decode_vec(hash)) else { return false };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &salt);
    ring::hmac::verify(&key, name.as_bytes(), &hash).is_ok()
}

impl Trust {
    /// A plain host key: trusted when listed and not `@revoked`. The error says why not.
    pub fn check_key(&self, key: &PublicKey) -> Result<(), String> {
        if self.revoked.iter().any(|r| r.key_data() == key.key_data()) {
            return Err("its host key is marked @revoked".into());
        }
        if self.keys.iter().any(|k| k.key_data() == key.key_data()) {
            Ok(())
        } else if self.keys.is_empty() {
            Err(format!("no known_hosts entry for it (host key {})", key.fingerprint(HashAlg::Sha256)))
        } else {
            Err(format!("its host key {} differs from the one in known_hosts", key.fingerprint(HashAlg::Sha256)))
        }
    }

    /// A host certificate: signed by a trusted `@cert-authority`, valid now, of host type,
    /// and naming `host`. The error says why not.
    pub fn check_certificate(&self, cert: &Certificate, host: &str) -> Result<(), String> {
        if self.revoked.iter().any(|r| r.key_data() == cert.public_key() || r.key_data() == cert.signature_key()) {
            return Err("its host certificate or CA is marked @revoked".into());
        }
        let cas: Vec<Fingerprint> = self.authorities.iter().map(|k| k.fingerprint(HashAlg::Sha256)).collect();
        if cas.is_empty() {
            return Err("no @cert-authority entry for it".into());
        }
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
        cert.validate_at(now, &cas).map_err(|e| format!("its host certificate does not verify: {e}"))?;
        if cert.cert_type() != CertType::Host {
            return Err("it presented a user certificate as host certificate".into());
        }
        if !cert.valid_principals().iter().any(|p| glob_match(p, host) || p == host) {
            return Err(format!("its host certificate does not name {host:?}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn known_hosts_patterns_and_markers() {
        let ed = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
        let text = format!(
            "# comment\n[gw.example]:2222,[localhost]:2222 {ed}\n\
             @cert-authority *.postern,[gw.example]:2222 {ed} ca\n\
             other.example {ed}\n[gw.example]:2200 {ed}\n!gw.example,* {ed}\n"
        );
        let mut t = Trust::default();
        parse_into(&mut t, &text, "gw.example", 2222);
        // The first line, and the last: its `!gw.example` does not exclude `[gw.example]:2222`.
        assert_eq!((t.keys.len(), t.authorities.len()), (2, 1));
        let mut t = Trust::default();
        parse_into(&mut t, &text, "web-01.postern", 22);
        // `*` matches, but the negated pattern only excludes gw.example itself.
        assert_eq!((t.keys.len(), t.authorities.len()), (1, 1));
        let key = PublicKey::from_openssh(ed).unwrap();
        assert!(t.check_key(&key).is_ok());
        let mut none = Trust::default();
        parse_into(&mut none, &text, "unknown.example", 2222);
        assert_eq!(none.keys.len(), 1, "only the `*` line applies");
    }

    #[test]
    fn hashed_known_hosts_entry() {
        // `ssh-keygen -H` form of "[127.0.0.1]:2222" with salt "salt-salt-salt-salt!".
        use russh::keys::ssh_encoding::base64::{Base64, Encoding};
        let salt = b"salt-salt-salt-salt!";
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, salt);
        let tag = ring::hmac::sign(&key, b"[127.0.0.1]:2222");
        let line = format!(
            "|1|{}|{} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n",
            Base64::encode_string(salt),
            Base64::encode_string(tag.as_ref())
        );
        let mut t = Trust::default();
        parse_into(&mut t, &line, "127.0.0.1", 2222);
        assert_eq!(t.keys.len(), 1);
        let mut t = Trust::default();
        parse_into(&mut t, &line, "127.0.0.2", 2222);
        assert!(t.keys.is_empty());
    }

    #[test]
    fn revoked_key_is_refused() {
        let ed = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
        let mut t = Trust::default();
        parse_into(&mut t, &format!("gw {ed}\n@revoked gw {ed}\n"), "gw", 22);
        let key = PublicKey::from_openssh(ed).unwrap();
        assert_eq!(t.check_key(&key).unwrap_err(), "its host key is marked @revoked");
    }
}
