//! User certificates the gateway signs (`postern login`, `postern user cert`): issued with the
//! gateway's user CA, kept in the store until they expire, and revocable before then
//! (`postern revoke --user`, `user disable`, `postern logout`). A revocation moves the access
//! generation, so every gateway sharing the store refuses the certificate within seconds;
//! live sessions are ended by the enforcer as for any access change.

use std::sync::Arc;
use std::time::Duration;

use postern_core::store::{CertificateRecord, Store, StoreError};
use russh::keys::PublicKey;

use crate::access::MFA_EXTENSION;
use crate::hostkeys::{IssuedCert, UserCa};

/// What the identity provider said about the login a certificate is issued for, written into
/// the certificate's extensions (`idp-subject@postern`, `groups@postern`, `amr@postern`, and
/// [`MFA_EXTENSION`] when a second factor was used).
#[derive(Debug, Clone, Default)]
pub struct LoginExtras {
    pub idp_subject: String,
    pub groups: Vec<String>,
    pub amr: Vec<String>,
    pub mfa: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("a certificate's validity must be between 1s and 7d")]
    BadTtl,
    #[error("cannot sign the certificate: {0}")]
    Sign(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Signs user certificates and keeps track of them.
#[derive(Clone)]
pub struct Certifier {
    ca: Arc<UserCa>,
    store: Arc<dyn Store>,
    /// `[identity] cert_ttl`.
    pub default_ttl: Duration,
}

impl std::fmt::Debug for Certifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certifier").field("default_ttl", &self.default_ttl).finish_non_exhaustive()
    }
}

impl Certifier {
    pub fn new(ca: Arc<UserCa>, store: Arc<dyn Store>, default_ttl: Duration) -> Self {
        Self { ca, store, default_ttl }
    }

    /// A certificate for `key` naming `user`, valid for `ttl` (default `[identity]
    /// cert_ttl`), recorded in the store before it is handed out (so that it can always be
    /// revoked).
    pub async fn issue(
        &self,
        user: &str,
        key: &PublicKey,
        ttl: Option<Duration>,
        login: Option<&LoginExtras>,
    ) -> Result<IssuedCert, CertError> {
        let ttl = ttl.unwrap_or(self.default_ttl);
        if ttl.is_zero() || ttl > crate::config::MAX_CERT_TTL {
            return Err(CertError::BadTtl);
        }
        let mut extensions: Vec<(&str, String)> = Vec::new();
        if let Some(l) = login {
            extensions.push(("idp-subject@postern", l.idp_subject.clone()));
            extensions.push(("groups@postern", l.groups.join(",")));
            extensions.push(("amr@postern", l.amr.join(",")));
            if l.mfa {
                extensions.push((MFA_EXTENSION, String::new()));
            }
        }
        let issued = self.ca.issue(user, key, ttl, &extensions).map_err(|e| CertError::Sign(format!("{e:#}")))?;
        let issued_at = jiff::Timestamp::now().as_second();
        self.store
            .record_certificate(&CertificateRecord {
                serial: issued.serial,
                user: user.to_owned(),
                key_fingerprint: key.fingerprint(Default::default()).to_string(),
                issued_at,
                expires_at: i64::try_from(issued.valid_before).unwrap_or(i64::MAX),
                origin: if login.is_some() { "login" } else { "admin" }.to_owned(),
                idp_subject: login.map(|l| l.idp_subject.clone()),
                mfa: login.is_some_and(|l| l.mfa),
                revoked_at: None,
            })
            .await?;
        Ok(issued)
    }

    /// Revoke `user`'s unexpired certificates (only `serial`, when given); how many.
    pub async fn revoke(&self, user: &str, serial: Option<u64>) -> Result<u64, StoreError> {
        self.store.revoke_certificates(user, serial, jiff::Timestamp::now().as_second()).await
    }
}
