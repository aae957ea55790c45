//! What an ID token's claims must say (OpenID Connect Core 3.1.3.7), and what they mean for
//! Postern: the user name, groups and whether a second factor was used. No I/O.

use serde_json::{Map, Value};

use super::error::{OidcError, from_idp};
use crate::config::OidcConfig;

/// Clock skew allowed between the gateway and the provider, in seconds.
pub const LEEWAY_SECS: i64 = 60;
/// Most group values read from a token, and most Postern groups kept.
const MAX_GROUPS: usize = 256;

/// What the ID token must match.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// The issuer as the provider's discovery document names it.
    pub issuer: &'a str,
    pub client_id: &'a str,
    /// The login's nonce (authorization-code flow); `None` in the device flow, which has none.
    pub nonce: Option<&'a str>,
    /// Unix time now.
    pub now: i64,
}

fn number(claims: &Map<String, Value>, name: &str) -> Option<i64> {
    let v = claims.get(name)?;
    #[allow(clippy::cast_possible_truncation)]
    v.as_i64().or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
}

fn text<'c>(claims: &'c Map<String, Value>, name: &str) -> Option<&'c str> {
    claims.get(name).and_then(Value::as_str)
}

/// Check `iss`, `aud`/`azp`, `exp`, `iat`, `nbf`, `nonce` and `sub` (in that order).
pub fn check(claims: &Map<String, Value>, want: Expected<'_>) -> Result<(), OidcError> {
    let iss = text(claims, "iss").unwrap_or("");
    if iss != want.issuer {
        return Err(OidcError::WrongIssuer { expected: want.issuer.into(), got: from_idp(iss) });
    }
    let audiences: Vec<&str> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !audiences.contains(&want.client_id) {
        return Err(OidcError::WrongAudience(format!("its audience does not include {:?}", want.client_id)));
    }
    match text(claims, "azp") {
        Some(azp) if azp != want.client_id => {
            return Err(OidcError::WrongAudience(format!("it was issued to {:?} (azp)", from_idp(azp))));
        }
        None if audiences.len() > 1 => {
            return Err(OidcError::WrongAudience("it has several audiences and no azp naming this gateway".into()));
        }
        _ => {}
    }
    let exp = number(claims, "exp").ok_or(OidcError::MalformedToken("no exp"))?;
    if want.now >= exp.saturating_add(LEEWAY_SECS) {
        return Err(OidcError::Expired);
    }
    let iat = number(claims, "iat").ok_or(OidcError::MalformedToken("no iat"))?;
    if iat > want.now.saturating_add(LEEWAY_SECS) {
        return Err(OidcError::NotYetValid);
    }
    if claims.contains_key("nbf") {
        let nbf = number(claims, "nbf").ok_or(OidcError::MalformedToken("nbf is not a number"))?;
        if nbf > want.now.saturating_add(LEEWAY_SECS) {
            return Err(OidcError::NotYetValid);
        }
    }
    if let Some(nonce) = want.nonce
        && text(claims, "nonce") != Some(nonce)
    {
        return Err(OidcError::NonceMismatch);
    }
    if text(claims, "sub").is_none_or(str::is_empty) {
        return Err(OidcError::NoSubject);
    }
    Ok(())
}

/// Who logged in, from a validated ID token, in Postern's terms.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LoginFacts {
    pub issuer: String,
    pub subject: String,
    /// The Postern user name (from `user_claim`).
    pub user: String,
    pub email: Option<String>,
    /// Postern groups, after `[identity.oidc.groups]` mapping; sorted, no duplicates.
    pub groups: Vec<String>,
    /// Whether the provider reports a second factor (`amr` or `acr`).
    pub mfa: bool,
    pub amr: Vec<String>,
    pub acr: Option<String>,
    /// The ID token's `exp` (Unix time).
    pub expires_at: i64,
}

/// Turn checked claims into [`LoginFacts`]: allowed email domains, the user name, groups,
/// MFA (in that order).
pub fn login_facts(cfg: &OidcConfig, issuer: &str, claims: &Map<String, Value>) -> Result<LoginFacts, OidcError> {
    let email = text(claims, "email").map(String::from);
    if !cfg.allowed_domains.is_empty() {
        let Some(addr) = &email else {
            return Err(OidcError::NotAllowedDomain(
                "the ID token has no email claim, and this gateway only admits some email domains (ask for the \
                 \"email\" scope)"
                    .into(),
            ));
        };
        let domain = addr.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
        if !cfg.allowed_domains.iter().any(|d| d.eq_ignore_ascii_case(domain)) {
            return Err(OidcError::NotAllowedDomain(format!(
                "the email address {:?} is not in a domain this gateway admits",
                from_idp(addr)
            )));
        }
        let verified = matches!(claims.get("email_verified"), Some(Value::Bool(true)))
            || text(claims, "email_verified") == Some("true");
        if !verified {
            return Err(OidcError::EmailNotVerified(from_idp(addr)));
        }
    }
    let user = user_name(cfg, claims)?;
    let groups = groups(cfg, claims);
    let amr: Vec<String> = strings(claims.get("amr")).into_iter().take(MAX_GROUPS).map(|s| from_idp(&s)).collect();
    let acr = text(claims, "acr").map(from_idp);
    let mfa = amr.iter().any(|a| cfg.mfa_amr.contains(a)) || acr.as_ref().is_some_and(|a| cfg.mfa_acr.contains(a));
    if cfg.require_mfa && !mfa {
        return Err(OidcError::MfaRequired);
    }
    Ok(LoginFacts {
        issuer: issuer.into(),
        subject: text(claims, "sub").unwrap_or_default().into(),
        user,
        email,
        groups,
        mfa,
        amr,
        acr,
        expires_at: number(claims, "exp").unwrap_or_default(),
    })
}

/// The `user_claim` value as a Postern name. An address in the only allowed domain is
/// shortened to its local part (`alice@example.com` -> `alice`); anything else that is not a
/// valid name is refused rather than mangled, so two people cannot end up as one user.
fn user_name(cfg: &OidcConfig, claims: &Map<String, Value>) -> Result<String, OidcError> {
    let claim = &cfg.user_claim;
    let refuse = |value: &str| OidcError::BadUserClaim { claim: claim.clone(), value: from_idp(value) };
    let value = match claims.get(claim) {
        Some(Value::String(s)) => s.as_str(),
        Some(other) => return Err(refuse(&other.to_string())),
        None => return Err(refuse("(missing)")),
    };
    let name = match (value.rsplit_once('@'), cfg.allowed_domains.as_slice()) {
        (Some((local, domain)), [only]) if domain.eq_ignore_ascii_case(only) => local,
        _ => value,
    };
    if postern_core::util::valid_name(name) { Ok(name.to_string()) } else { Err(refuse(value)) }
}

/// A claim holding an array of strings or one string (other values ignored).
fn strings(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(list)) => {
            list.iter().filter_map(Value::as_str).take(MAX_GROUPS * 4).map(String::from).collect()
        }
        _ => Vec::new(),
    }
}

/// Postern groups from `groups_claim`: with a mapping table only mapped values (as mapped),
/// without one the values that are valid names.
fn groups(cfg: &OidcConfig, claims: &Map<String, Value>) -> Vec<String> {
    let values = strings(claims.get(&cfg.groups_claim));
    let mut out: Vec<String> = match &cfg.groups {
        Some(map) => values.iter().filter_map(|v| map.get(v).cloned()).collect(),
        None => values.into_iter().filter(|v| postern_core::util::valid_name(v)).collect(),
    };
    out.sort();
    out.dedup();
    out.truncate(MAX_GROUPS);
    out
}
