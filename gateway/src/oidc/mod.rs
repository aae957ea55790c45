//! The gateway as an OpenID Connect relying party (docs/sso.md): a confidential client that
//! runs the authorization-code flow with PKCE for a loopback redirect, or the device flow
//! (RFC 8628), redeems the result itself and validates the ID token (signature with the
//! provider's published keys, iss, aud/azp, exp, iat, nbf, nonce, sub) before turning its
//! claims into [`LoginFacts`]. Discovery and the key set are cached; a token signed with a
//! key not in the cache fetches the keys again at most once per 30 s (key rotation).
//!
//! A leaf: it knows the configuration and nothing of users, certificates or doors.

mod claims;
mod error;
#[cfg(test)]
mod flow_tests;
mod http;
mod jws;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom, SystemRandom};
use serde_json::Value;

pub use claims::{LEEWAY_SECS, LoginFacts};
pub use error::{OidcError, from_idp};
use http::{FormReply, IdpHttp};
use jws::{Jwk, KeyChoice};

use crate::config::{ClientSecret, OidcConfig, check_provider_url};

/// How long a discovery document and a key set are used before they are fetched again.
pub const CACHE_TTL: Duration = Duration::from_secs(3600);
/// Least time between two key-set fetches caused by an unknown key id.
pub const JWKS_REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// How long a started browser login may take before [`Oidc::finish`].
pub const PENDING_TTL: Duration = Duration::from_secs(600);
/// Longest a device login is waited for, whatever the provider says.
pub const MAX_DEVICE_WAIT: Duration = Duration::from_secs(900);
/// Longest authorization code accepted.
const MAX_CODE_BYTES: usize = 4096;

/// The provider's endpoints, from its discovery document.
#[derive(Debug)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
    device_authorization_endpoint: Option<String>,
}

#[derive(Default)]
struct Cache {
    discovery: Option<(Instant, Arc<Discovery>)>,
    keys: Option<(Instant, Arc<Vec<Jwk>>)>,
    /// When a token naming an unknown key last made the gateway fetch the key set (the
    /// fetch may still be running): such fetches happen at most once per
    /// [`JWKS_REFETCH_INTERVAL`], however many tokens name keys nobody publishes.
    last_rotation_fetch: Option<Instant>,
}

/// The relying party for one provider. `Send + Sync`; share it in an `Arc`.
pub struct Oidc {
    cfg: OidcConfig,
    secret: ClientSecret,
    discovery_url: String,
    http: IdpHttp,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for Oidc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Oidc").field("issuer", &self.cfg.issuer).field("client_id", &self.cfg.client_id).finish()
    }
}

/// A started browser login: send the user to `authorization_url`; give the returned code to
/// [`Oidc::finish`] after checking the returned state with [`PendingLogin::check_state`].
#[derive(Clone)]
pub struct PendingLogin {
    pub authorization_url: String,
    pub state: String,
    nonce: String,
    verifier: String,
    redirect_uri: String,
    created: Instant,
}

impl std::fmt::Debug for PendingLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingLogin").field("redirect_uri", &self.redirect_uri).finish_non_exhaustive()
    }
}

impl PendingLogin {
    /// The `state` the redirect brought back must be this login's (else the code belongs
    /// to another login, perhaps one an attacker started).
    pub fn check_state(&self, returned: &str) -> Result<(), OidcError> {
        // Compared without an early exit, so timing does not tell how much of a guess matched.
        let (a, b) = (returned.as_bytes(), self.state.as_bytes());
        let differ = a.iter().zip(b).fold(u8::from(a.len() != b.len()), |acc, (x, y)| acc | (x ^ y));
        if differ == 0 { Ok(()) } else { Err(OidcError::StateMismatch) }
    }
}

/// A started device login: show `user_code` and `verification_uri` to the user, then
/// [`Oidc::device_wait`].
#[derive(Clone)]
pub struct DeviceLogin {
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    pub user_code: String,
    pub expires_in: u64,
    device_code: String,
    interval: Duration,
    created: Instant,
}

impl std::fmt::Debug for DeviceLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceLogin")
            .field("verification_uri", &self.verification_uri)
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

fn random_token() -> Result<String, OidcError> {
    let mut b = [0u8; 32];
    SystemRandom::new().fill(&mut b).map_err(|_| OidcError::Config("no randomness available".into()))?;
    Ok(URL_SAFE_NO_PAD.encode(b))
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Only a loopback redirect, on an explicit port, is accepted: the code must come back to
/// the `postern login` that asked for it, never to a host an attacker names. The literal
/// prefix and an all-digit port leave no room for a user name or another host
/// (`http://127.0.0.1:80@evil.com/` has no all-digit port); the URL must also parse and
/// carry no fragment (RFC 6749 3.1.2).
pub fn check_redirect_uri(uri: &str) -> Result<(), OidcError> {
    let refuse = || OidcError::BadRedirectUri(error::from_idp(uri));
    let rest = ["http://127.0.0.1:", "http://[::1]:", "http://localhost:"]
        .iter()
        .find_map(|p| uri.strip_prefix(p))
        .ok_or_else(refuse)?;
    let port = rest.split('/').next().unwrap_or("");
    if uri.len() > 512 || port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(refuse());
    }
    let u = url::Url::parse(uri).map_err(|_| refuse())?;
    if u.fragment().is_some() {
        return Err(refuse());
    }
    Ok(())
}

fn field(doc: &Value, name: &str) -> Option<String> {
    doc.get(name).and_then(Value::as_str).map(String::from)
}

/// The endpoint named `name` in a discovery document, held to the issuer's URL rule.
fn endpoint(doc: &Value, name: &'static str) -> Result<Option<String>, OidcError> {
    let Some(url) = field(doc, name) else { return Ok(None) };
    check_provider_url(&url)
        .map_err(|e| OidcError::IdpBadResponse { what: "discovery document", detail: format!("{name}: {e}") })?;
    Ok(Some(url))
}

/// Issuers compare equal ignoring one trailing '/' (docs/sso.md).
fn same_issuer(a: &str, b: &str) -> bool {
    a.strip_suffix('/').unwrap_or(a) == b.strip_suffix('/').unwrap_or(b)
}

impl Oidc {
    /// Check the settings; nothing is fetched until the first login.
    pub fn new(cfg: &OidcConfig) -> Result<Self, OidcError> {
        cfg.check().map_err(|(key, why)| OidcError::Config(format!("[identity.oidc] {key} {why}")))?;
        let secret = cfg.client_secret.clone().ok_or_else(|| {
            OidcError::Config("[identity.oidc] has no client secret (client_secret_file or client_secret_env)".into())
        })?;
        // OpenID Connect Discovery 4: a trailing '/' is dropped before the well-known path.
        let discovery_url =
            format!("{}/.well-known/openid-configuration", cfg.issuer.strip_suffix('/').unwrap_or(&cfg.issuer));
        Ok(Self { cfg: cfg.clone(), secret, discovery_url, http: IdpHttp::new(), cache: Mutex::new(Cache::default()) })
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The discovery document, cached for [`CACHE_TTL`]; a failed fetch is not cached.
    async fn discovery(&self) -> Result<Arc<Discovery>, OidcError> {
        if let Some((at, d)) = &self.cache().discovery
            && at.elapsed() < CACHE_TTL
        {
            return Ok(d.clone());
        }
        let doc = self.http.get_json("discovery document", &self.discovery_url).await?;
        let issuer = field(&doc, "issuer").unwrap_or_default();
        if !same_issuer(&issuer, &self.cfg.issuer) {
            return Err(OidcError::DiscoveryIssuer {
                expected: self.cfg.issuer.clone(),
                got: error::from_idp(&issuer),
            });
        }
        let missing =
            |name: &str| OidcError::IdpBadResponse { what: "discovery document", detail: format!("no {name}") };
        let d = Arc::new(Discovery {
            issuer,
            authorization_endpoint: endpoint(&doc, "authorization_endpoint")?
                .ok_or_else(|| missing("authorization_endpoint"))?,
            token_endpoint: endpoint(&doc, "token_endpoint")?.ok_or_else(|| missing("token_endpoint"))?,
            jwks_uri: endpoint(&doc, "jwks_uri")?.ok_or_else(|| missing("jwks_uri"))?,
            device_authorization_endpoint: endpoint(&doc, "device_authorization_endpoint")?,
        });
        self.cache().discovery = Some((Instant::now(), d.clone()));
        Ok(d)
    }

    /// The provider's signing keys: cached for [`CACHE_TTL`]; with `rotated`, fetched again
    /// unless a fetch started less than [`JWKS_REFETCH_INTERVAL`] ago (then `None`).
    async fn keys(&self, d: &Discovery, rotated: bool) -> Result<Option<Arc<Vec<Jwk>>>, OidcError> {
        {
            let mut cache = self.cache();
            if !rotated
                && let Some((at, keys)) = &cache.keys
                && at.elapsed() < CACHE_TTL
            {
                return Ok(Some(keys.clone()));
            }
            if rotated {
                if cache.last_rotation_fetch.is_some_and(|at| at.elapsed() < JWKS_REFETCH_INTERVAL) {
                    return Ok(None);
                }
                cache.last_rotation_fetch = Some(Instant::now());
            }
        }
        let doc = self.http.get_json("key set (jwks_uri)", &d.jwks_uri).await?;
        let keys = Arc::new(
            jws::parse_jwks(&doc).map_err(|detail| OidcError::IdpBadResponse { what: "key set (jwks_uri)", detail })?,
        );
        tracing::debug!(keys = keys.len(), rotated, "fetched the identity provider's keys");
        self.cache().keys = Some((Instant::now(), keys.clone()));
        Ok(Some(keys))
    }

    /// Validate an ID token and turn it into [`LoginFacts`].
    async fn validate(&self, d: &Discovery, id_token: &str, nonce: Option<&str>) -> Result<LoginFacts, OidcError> {
        let token = jws::parse(id_token)?;
        let keys = self.keys(d, false).await?.unwrap_or_default();
        let claims = match token.choose_key(&keys)? {
            KeyChoice::Found(key) => token.verified_claims(key)?,
            KeyChoice::Missing => {
                let unknown = || OidcError::UnknownKey(format!("kid {:?}", token.kid.as_deref().unwrap_or("(none)")));
                let fresh = self.keys(d, true).await?.ok_or_else(unknown)?;
                match token.choose_key(&fresh)? {
                    KeyChoice::Found(key) => token.verified_claims(key)?,
                    KeyChoice::Missing => return Err(unknown()),
                }
            }
        };
        let want = claims::Expected { issuer: &d.issuer, client_id: &self.cfg.client_id, nonce, now: now_unix() };
        claims::check(&claims, want)?;
        claims::login_facts(&self.cfg, &d.issuer, &claims)
    }

    /// The scope parameter: "openid" first, then the configured scopes.
    fn scope(&self) -> String {
        let mut scopes = vec!["openid"];
        scopes.extend(self.cfg.scopes.iter().map(String::as_str).filter(|s| *s != "openid"));
        scopes.join(" ")
    }

    /// Start an authorization-code flow with PKCE (S256) for a loopback `redirect_uri`.
    pub async fn begin(&self, redirect_uri: &str) -> Result<PendingLogin, OidcError> {
        check_redirect_uri(redirect_uri)?;
        self.begin_to(redirect_uri).await
    }

    /// The same for the web console: `callback` is the console's own sign-in address
    /// (`[web] public_url` + `/signin/oidc`, from the gateway's configuration, never from a
    /// request), so it is held only to being an https URL without a fragment.
    pub async fn begin_console(&self, callback: &str) -> Result<PendingLogin, OidcError> {
        let refuse = || OidcError::BadRedirectUri(error::from_idp(callback));
        let u = url::Url::parse(callback).map_err(|_| refuse())?;
        if u.scheme() != "https" || u.fragment().is_some() || callback.len() > 512 {
            return Err(refuse());
        }
        self.begin_to(callback).await
    }

    async fn begin_to(&self, redirect_uri: &str) -> Result<PendingLogin, OidcError> {
        let d = self.discovery().await?;
        let (state, nonce, verifier) = (random_token()?, random_token()?, random_token()?);
        let challenge = URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()));
        let mut url = url::Url::parse(&d.authorization_endpoint).map_err(|e| OidcError::IdpBadResponse {
            what: "discovery document",
            detail: format!("authorization_endpoint: {e}"),
        })?;
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.cfg.client_id)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("scope", &self.scope())
            .append_pair("state", &state)
            .append_pair("nonce", &nonce)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        Ok(PendingLogin {
            authorization_url: url.into(),
            state,
            nonce,
            verifier,
            redirect_uri: redirect_uri.into(),
            created: Instant::now(),
        })
    }

    /// Redeem `code` at the token endpoint (client_secret_basic, with the PKCE verifier and
    /// the same redirect URI) and validate the ID token against the login's nonce. The
    /// caller checks the returned `state` first ([`PendingLogin::check_state`]).
    pub async fn finish(&self, pending: &PendingLogin, code: &str) -> Result<LoginFacts, OidcError> {
        if pending.created.elapsed() > PENDING_TTL {
            return Err(OidcError::LoginExpired);
        }
        if code.is_empty() || code.len() > MAX_CODE_BYTES {
            return Err(OidcError::CodeRejected { error: "malformed code".into(), description: String::new() });
        }
        let d = self.discovery().await?;
        let form = vec![
            ("grant_type", "authorization_code".to_string()),
            ("code", code.to_string()),
            ("redirect_uri", pending.redirect_uri.clone()),
            ("code_verifier", pending.verifier.clone()),
        ];
        let id_token = match self.token_request("token endpoint", &d.token_endpoint, form).await? {
            FormReply::Ok(v) => id_token_of(&v)?,
            FormReply::OAuthError { error, description } => {
                let description = description.map(|s| format!(": {s}")).unwrap_or_default();
                return Err(if error == "invalid_grant" {
                    OidcError::CodeRejected { error, description }
                } else {
                    OidcError::IdpError { error, description }
                });
            }
        };
        self.validate(&d, &id_token, Some(&pending.nonce)).await
    }

    async fn token_request(
        &self,
        what: &'static str,
        url: &str,
        form: Vec<(&'static str, String)>,
    ) -> Result<FormReply, OidcError> {
        self.http.post_form(what, url, (&self.cfg.client_id, self.secret.expose()), form).await
    }

    /// Start a device login (RFC 8628): ask the provider for a user code.
    pub async fn device_begin(&self) -> Result<DeviceLogin, OidcError> {
        let d = self.discovery().await?;
        let url = d.device_authorization_endpoint.clone().ok_or(OidcError::DeviceUnsupported)?;
        let what = "device authorization endpoint";
        let v = match self.token_request(what, &url, vec![("scope", self.scope())]).await? {
            FormReply::Ok(v) => v,
            FormReply::OAuthError { error, description } => {
                let description = description.map(|s| format!(": {s}")).unwrap_or_default();
                return Err(OidcError::IdpError { error, description });
            }
        };
        let bad = |detail: &str| OidcError::IdpBadResponse { what, detail: detail.into() };
        let text = |name: &str| field(&v, name).filter(|s| !s.is_empty() && s.len() <= 2048);
        let device_code = text("device_code").ok_or_else(|| bad("no device_code"))?;
        let user_code = text("user_code").ok_or_else(|| bad("no user_code"))?;
        // Google calls it verification_url.
        let verification_uri =
            text("verification_uri").or_else(|| text("verification_url")).ok_or_else(|| bad("no verification_uri"))?;
        check_provider_url(&verification_uri).map_err(|e| bad(&format!("verification_uri: {e}")))?;
        let verification_uri_complete = text("verification_uri_complete").filter(|u| check_provider_url(u).is_ok());
        let expires_in = v.get("expires_in").and_then(Value::as_u64).ok_or_else(|| bad("no expires_in"))?;
        let interval = v.get("interval").and_then(Value::as_u64).unwrap_or(5).clamp(1, 60);
        Ok(DeviceLogin {
            verification_uri,
            verification_uri_complete,
            user_code: error::from_idp(&user_code),
            expires_in: expires_in.min(MAX_DEVICE_WAIT.as_secs()),
            device_code,
            interval: Duration::from_secs(interval),
            created: Instant::now(),
        })
    }

    /// Poll the token endpoint at the provider's interval (`slow_down` adds 5 s) until the
    /// user approves or denies, or the code expires (at most `expires_in`, at most 15
    /// minutes); then validate the ID token (this flow has no nonce).
    pub async fn device_wait(&self, device: &DeviceLogin) -> Result<LoginFacts, OidcError> {
        let d = self.discovery().await?;
        let deadline = device.created + Duration::from_secs(device.expires_in).min(MAX_DEVICE_WAIT);
        let mut interval = device.interval;
        loop {
            let wake = Instant::now() + interval;
            if wake >= deadline {
                return Err(OidcError::DeviceExpired);
            }
            tokio::time::sleep_until(wake.into()).await;
            let form = vec![
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code".to_string()),
                ("device_code", device.device_code.clone()),
            ];
            match self.token_request("token endpoint", &d.token_endpoint, form).await? {
                FormReply::Ok(v) => return self.validate(&d, &id_token_of(&v)?, None).await,
                FormReply::OAuthError { error, description } => {
                    interval = match next_poll(&error, interval) {
                        Poll::Again(i) => i,
                        Poll::Stop(e) => {
                            let description = description.map(|s| format!(": {s}")).unwrap_or_default();
                            return Err(e.unwrap_or(OidcError::IdpError { error, description }));
                        }
                    }
                }
            }
        }
    }
}

/// What a device-flow poll's error means (RFC 8628 3.5).
enum Poll {
    Again(Duration),
    /// The login is over: a known reason, or `None` for the provider's own error.
    Stop(Option<OidcError>),
}

fn next_poll(error: &str, interval: Duration) -> Poll {
    match error {
        "authorization_pending" => Poll::Again(interval),
        "slow_down" => Poll::Again((interval + Duration::from_secs(5)).min(Duration::from_secs(60))),
        "access_denied" => Poll::Stop(Some(OidcError::AccessDenied)),
        "expired_token" => Poll::Stop(Some(OidcError::DeviceExpired)),
        _ => Poll::Stop(None),
    }
}

fn id_token_of(v: &Value) -> Result<String, OidcError> {
    field(v, "id_token").ok_or(OidcError::IdpBadResponse {
        what: "token endpoint",
        detail: "no id_token in the answer (is \"openid\" among the client's scopes?)".into(),
    })
}
