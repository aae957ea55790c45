//! Why a login failed: a message for the user and a short stable reason for the audit log.
//! Messages never hold a code, token or secret; what the provider said is cut short and
//! stripped of control characters ([`from_idp`]).

/// A failed OIDC step. `Display` is meant for the person logging in; [`OidcError::kind`] for
/// the audit log.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("single sign-on is misconfigured: {0}")]
    Config(String),
    #[error(
        "refused redirect URI {0:?}: it must be http://127.0.0.1:PORT/..., http://[::1]:PORT/... or http://localhost:PORT/..."
    )]
    BadRedirectUri(String),
    #[error("the identity provider could not be reached ({what}): {detail}; try again later")]
    IdpUnreachable { what: &'static str, detail: String },
    #[error("the identity provider sent an unusable {what}: {detail}")]
    IdpBadResponse { what: &'static str, detail: String },
    #[error("the identity provider's discovery document names issuer {got:?}, not the configured {expected:?}")]
    DiscoveryIssuer { expected: String, got: String },
    #[error(
        "the identity provider does not offer the device flow (no device_authorization_endpoint); log in with the browser"
    )]
    DeviceUnsupported,
    #[error("the identity provider refused the login code ({error}{description}); log in again")]
    CodeRejected { error: String, description: String },
    #[error("the identity provider refused the request ({error}{description})")]
    IdpError { error: String, description: String },
    #[error("the ID token is malformed: {0}")]
    MalformedToken(&'static str),
    #[error("the ID token is signed with {0:?}, which the gateway does not accept")]
    UnsupportedAlgorithm(String),
    #[error("the ID token is signed with a key the identity provider does not publish ({0})")]
    UnknownKey(String),
    #[error("the ID token's signature is not valid")]
    BadSignature,
    #[error("the ID token was issued by {got:?}, not {expected:?}")]
    WrongIssuer { expected: String, got: String },
    #[error("the ID token is not meant for this gateway: {0}")]
    WrongAudience(String),
    #[error("the ID token has expired")]
    Expired,
    #[error("the ID token is not valid yet (issued in the future or before its nbf); check the clocks")]
    NotYetValid,
    #[error("the ID token does not belong to this login (nonce mismatch); log in again")]
    NonceMismatch,
    #[error("the login's state does not match: the answer belongs to another login; log in again")]
    StateMismatch,
    #[error("the ID token has no subject (sub)")]
    NoSubject,
    #[error("{0}")]
    NotAllowedDomain(String),
    #[error("the identity provider has not verified the email address {0:?} (email_verified is not true)")]
    EmailNotVerified(String),
    #[error(
        "claim {claim:?} is {value:?}, not a usable Postern user name (letters, digits, '-', '_', '.', at most 63); \
         set [identity.oidc] user_claim to a claim that is one"
    )]
    BadUserClaim { claim: String, value: String },
    #[error("this gateway requires a second factor (MFA) and the identity provider reports none for this login")]
    MfaRequired,
    #[error("the login was denied at the identity provider")]
    AccessDenied,
    #[error("the device code expired before the login was approved; log in again")]
    DeviceExpired,
    #[error("the login took too long; log in again")]
    LoginExpired,
}

impl OidcError {
    /// A short stable reason for the audit log (`login.failed`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Config(_) => "config",
            Self::BadRedirectUri(_) => "bad_redirect_uri",
            Self::IdpUnreachable { .. } => "idp_unreachable",
            Self::IdpBadResponse { .. } => "idp_bad_response",
            Self::DiscoveryIssuer { .. } => "wrong_issuer",
            Self::DeviceUnsupported => "device_unsupported",
            Self::CodeRejected { .. } => "code_rejected",
            Self::IdpError { .. } => "idp_error",
            Self::MalformedToken(_) => "malformed_token",
            Self::UnsupportedAlgorithm(_) => "bad_algorithm",
            Self::UnknownKey(_) => "unknown_key",
            Self::BadSignature => "bad_signature",
            Self::WrongIssuer { .. } => "wrong_issuer",
            Self::WrongAudience(_) => "wrong_audience",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::NonceMismatch => "nonce_mismatch",
            Self::StateMismatch => "state_mismatch",
            Self::NoSubject => "no_subject",
            Self::NotAllowedDomain(_) => "not_allowed_domain",
            Self::EmailNotVerified(_) => "email_not_verified",
            Self::BadUserClaim { .. } => "bad_user_claim",
            Self::MfaRequired => "mfa_required",
            Self::AccessDenied => "access_denied",
            Self::DeviceExpired => "device_expired",
            Self::LoginExpired => "login_expired",
        }
    }
}

/// Text from the provider (an `error_description`, a claim value) made safe to show: at most
/// 200 characters, control characters replaced.
pub fn from_idp(s: &str) -> String {
    let mut out: String = s.chars().take(200).map(|c| if c.is_control() { '?' } else { c }).collect();
    if s.chars().nth(200).is_some() {
        out.push('…');
    }
    out
}
