//! Single sign-on (`postern login`): the identity provider vouches for a person
//! ([`crate::oidc`] validates what it says), the person becomes (or is) a Postern user from
//! the IdP with the IdP's groups, and the gateway signs a short-lived SSH certificate for a
//! key the client generated. Every sign-in, refused or not, is an audit event.

use std::sync::Arc;

use postern_core::command::{CertificateInfo, LoginResult};
use postern_core::store::{LoginUser, Store};
use russh::keys::PublicKey;
use tokio::sync::Notify;

use crate::access::AccessList;
use crate::audit::AuditLog;
use crate::audit::events::{Event, LoginFailed, LoginSucceeded};
use crate::certs::{Certifier, LoginExtras};
use crate::oidc::{DeviceLogin, LoginFacts, Oidc, OidcError, PendingLogin};

/// Sign-in connections at once (each may wait minutes for its person), and from one
/// address; more are refused until one ends.
pub const MAX_LOGINS: usize = 64;
pub const MAX_LOGINS_PER_SOURCE: usize = 8;

/// Which flow a sign-in used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Authorization code with PKCE and a loopback redirect.
    Browser,
    /// Device authorization grant.
    Device,
    /// The web console's sign-in (authorization code with PKCE, back to the console).
    Web,
}

impl Flow {
    fn name(self) -> &'static str {
        match self {
            Flow::Browser => "browser",
            Flow::Device => "device",
            Flow::Web => "web",
        }
    }
}

pub struct Sso {
    oidc: Arc<Oidc>,
    certifier: Certifier,
    store: Arc<dyn Store>,
    access: Arc<AccessList>,
    access_changed: Arc<Notify>,
    audit: Arc<AuditLog>,
    /// `[identity.oidc] link_existing`.
    link_existing: bool,
    /// The gateway's `@cert-authority` line, handed to clients with their certificate.
    known_hosts: String,
    /// Places for sign-in connections, per source address and in all.
    places: Arc<crate::accept::SourceSlots>,
}

impl std::fmt::Debug for Sso {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sso").finish_non_exhaustive()
    }
}

/// A place among the sign-in connections, held for the connection's life.
pub type LoginPlace = crate::accept::Slot;

impl Sso {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        oidc: Arc<Oidc>,
        certifier: Certifier,
        store: Arc<dyn Store>,
        access: Arc<AccessList>,
        access_changed: Arc<Notify>,
        audit: Arc<AuditLog>,
        link_existing: bool,
        known_hosts: String,
    ) -> Self {
        Self {
            oidc,
            certifier,
            store,
            access,
            access_changed,
            audit,
            link_existing,
            known_hosts,
            places: crate::accept::SourceSlots::new(MAX_LOGINS, MAX_LOGINS_PER_SOURCE),
        }
    }

    /// A place for one more sign-in connection from `source`, if there is one.
    pub fn admit(&self, source: std::net::IpAddr) -> Option<LoginPlace> {
        self.places.admit(source).ok()
    }

    pub async fn begin(&self, redirect_uri: &str, source: &str) -> Result<PendingLogin, String> {
        self.oidc.begin(redirect_uri).await.map_err(|e| self.failed(None, &e, Flow::Browser, source))
    }

    pub async fn finish(
        &self,
        pending: &PendingLogin,
        code: &str,
        public_key: &str,
        source: &str,
    ) -> Result<LoginResult, String> {
        let key = self.key(public_key, Flow::Browser, source)?;
        let facts = self.oidc.finish(pending, code).await;
        self.complete(facts, &key, Flow::Browser, source).await
    }

    /// The web console's sign-in: to the identity provider, back to `callback`.
    pub async fn web_begin(&self, callback: &str, source: &str) -> Result<PendingLogin, String> {
        self.oidc.begin_console(callback).await.map_err(|e| self.failed(None, &e, Flow::Web, source))
    }

    /// The identity provider sent the browser back with `code`: the user (made or synced as
    /// for `postern login`, with their groups) the console signs in. No certificate: the
    /// browser's session is the console's cookie.
    pub async fn web_finish(&self, pending: &PendingLogin, code: &str, source: &str) -> Result<String, String> {
        let facts = self.oidc.finish(pending, code).await;
        let (facts, _, _) = self.admit_user(facts, Flow::Web, source).await?;
        self.changed().await;
        Ok(facts.user)
    }

    /// A refusal before the identity provider was asked (a stale or forged return): audited.
    pub fn web_refused(&self, reason: &str, detail: &str, source: &str) {
        self.refused(None, None, reason, detail, Flow::Web, source);
    }

    pub async fn device_begin(&self, source: &str) -> Result<DeviceLogin, String> {
        self.oidc.device_begin().await.map_err(|e| self.failed(None, &e, Flow::Device, source))
    }

    pub async fn device_finish(
        &self,
        device: &DeviceLogin,
        public_key: &str,
        source: &str,
    ) -> Result<LoginResult, String> {
        let key = self.key(public_key, Flow::Device, source)?;
        let facts = self.oidc.device_wait(device).await;
        self.complete(facts, &key, Flow::Device, source).await
    }

    fn key(&self, public_key: &str, flow: Flow, source: &str) -> Result<PublicKey, String> {
        crate::access::parse_key(public_key).map_err(|e| {
            let detail = format!("public_key: {e}");
            self.refused(None, None, "bad_public_key", &detail, flow, source);
            detail
        })
    }

    /// The identity provider vouched for someone: make or sync the user, who must be
    /// enabled. Refusals are audited. Returns the facts, the user's subject and whether the
    /// user was made now.
    async fn admit_user(
        &self,
        facts: Result<LoginFacts, OidcError>,
        flow: Flow,
        source: &str,
    ) -> Result<(LoginFacts, String, bool), String> {
        let facts = facts.map_err(|e| self.failed(None, &e, flow, source))?;
        let subject = format!("{} {}", facts.issuer, facts.subject);
        let refuse = |reason: &str, detail: String| {
            self.refused(Some(&facts.user), Some(&subject), reason, &detail, flow, source);
            detail
        };
        let now = jiff::Timestamp::now().as_second();
        let stored = self
            .store
            .login_user(&facts.user, &subject, &facts.groups, self.link_existing, now)
            .await
            .map_err(|e| refuse("store_error", format!("gateway storage error: {e}")))?;
        let (user, created) = match stored {
            LoginUser::Ready { user, created } => (user, created),
            LoginUser::NotFromIdp => {
                return Err(refuse(
                    "user_not_from_idp",
                    format!(
                        "user {} exists on the gateway and is not from the identity provider; an administrator can \
                         remove it, or set [identity.oidc] link_existing = true to let the first sign-in take it over",
                        facts.user
                    ),
                ));
            }
            LoginUser::OtherSubject => {
                return Err(refuse(
                    "other_idp_subject",
                    format!("user {} belongs to another identity at the identity provider", facts.user),
                ));
            }
        };
        if user.disabled {
            return Err(refuse("user_disabled", format!("user {} is disabled on this gateway", facts.user)));
        }
        Ok((facts, subject, created))
    }

    /// The user (new, or with new groups) counts at once here; other gateways sharing the
    /// store follow within a second (the access generation moved).
    async fn changed(&self) {
        if let Err(e) = self.access.reload(self.store.as_ref()).await {
            postern_tunnel::warn_limited!(error = %e, "cannot reload access after a sign-in");
        }
        self.access_changed.notify_one();
    }

    /// The identity provider answered: make the user, sign the certificate, audit.
    async fn complete(
        &self,
        facts: Result<LoginFacts, OidcError>,
        key: &PublicKey,
        flow: Flow,
        source: &str,
    ) -> Result<LoginResult, String> {
        let (facts, subject, created) = self.admit_user(facts, flow, source).await?;
        let refuse = |reason: &str, detail: String| {
            self.refused(Some(&facts.user), Some(&subject), reason, &detail, flow, source);
            detail
        };
        let extras = LoginExtras {
            idp_subject: subject.clone(),
            groups: facts.groups.clone(),
            amr: facts.amr.clone(),
            mfa: facts.mfa,
        };
        let issued = self
            .certifier
            .issue(&facts.user, key, None, Some(&extras))
            .await
            .map_err(|e| refuse("certificate_error", e.to_string()))?;
        let certificate =
            issued.certificate.to_openssh().map_err(|e| refuse("certificate_error", format!("encoding: {e}")))?;
        self.changed().await;
        let serial = format!("{:016x}", issued.serial);
        let _ = self.audit.event(&Event::LoginSucceeded(LoginSucceeded {
            user: facts.user.clone(),
            idp_subject: subject,
            groups: facts.groups.clone(),
            mfa: facts.mfa,
            amr: facts.amr.clone(),
            flow: flow.name().to_owned(),
            cert_serial: serial.clone(),
            valid_before: issued.valid_before,
            created,
            source: source.to_owned(),
        }));
        tracing::info!(user = %facts.user, serial = %serial, flow = flow.name(), "signed in through the identity provider");
        Ok(LoginResult {
            user: facts.user,
            groups: facts.groups,
            certificate,
            info: CertificateInfo { serial, valid_before: issued.valid_before, mfa: facts.mfa },
            created,
            known_hosts: self.known_hosts.clone(),
        })
    }

    fn failed(&self, user: Option<&str>, e: &OidcError, flow: Flow, source: &str) -> String {
        let detail = e.to_string();
        self.refused(user, None, e.kind(), &detail, flow, source);
        detail
    }

    fn refused(&self, user: Option<&str>, subject: Option<&str>, reason: &str, detail: &str, flow: Flow, source: &str) {
        postern_tunnel::info_limited!(reason, detail, "sign-in refused");
        let _ = self.audit.event(&Event::LoginFailed(LoginFailed {
            user: user.map(str::to_owned),
            idp_subject: subject.map(str::to_owned),
            reason: reason.to_owned(),
            detail: detail.to_owned(),
            flow: flow.name().to_owned(),
            source: source.to_owned(),
        }));
    }
}
