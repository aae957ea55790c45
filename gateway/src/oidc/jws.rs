//! ID tokens as compact JWS (RFC 7515) and the provider's keys as a JWK set (RFC 7517),
//! verified with ring. No I/O. Only asymmetric algorithms are accepted: `none` and the HMAC
//! ones (whose "key" would be the public key everybody can fetch) are refused by name before
//! any key is looked at.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::{Map, Value};

use super::error::OidcError;

/// Longest ID token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Most keys kept from one JWK set.
pub const MAX_KEYS: usize = 64;

/// The signature algorithms the gateway accepts (RFC 7518, RFC 8037).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Es256,
    Es384,
    EdDsa,
}

impl Alg {
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "RS256" => Self::Rs256,
            "RS384" => Self::Rs384,
            "RS512" => Self::Rs512,
            "PS256" => Self::Ps256,
            "ES256" => Self::Es256,
            "ES384" => Self::Es384,
            "EdDSA" => Self::EdDsa,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Rs384 => "RS384",
            Self::Rs512 => "RS512",
            Self::Ps256 => "PS256",
            Self::Es256 => "ES256",
            Self::Es384 => "ES384",
            Self::EdDsa => "EdDSA",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Curve {
    P256,
    P384,
}

#[derive(Clone, PartialEq, Eq)]
enum PublicKey {
    /// Modulus and exponent, big-endian without leading zeros.
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// The uncompressed point 0x04 || x || y.
    Ec {
        curve: Curve,
        point: Vec<u8>,
    },
    Ed25519(Vec<u8>),
}

/// One usable signing key of the provider.
#[derive(Clone, PartialEq, Eq)]
pub struct Jwk {
    pub kid: Option<String>,
    /// The key's own `alg`, when it names one: the token's must then be the same.
    pub alg: Option<String>,
    key: PublicKey,
}

impl std::fmt::Debug for Jwk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kty = match self.key {
            PublicKey::Rsa { .. } => "RSA",
            PublicKey::Ec { curve: Curve::P256, .. } => "EC P-256",
            PublicKey::Ec { curve: Curve::P384, .. } => "EC P-384",
            PublicKey::Ed25519(_) => "OKP Ed25519",
        };
        f.debug_struct("Jwk").field("kid", &self.kid).field("alg", &self.alg).field("kty", &kty).finish()
    }
}

impl Jwk {
    /// Whether this key can check a signature made with `alg`.
    pub fn fits(&self, alg: Alg) -> bool {
        if self.alg.as_deref().is_some_and(|a| a != alg.name()) {
            return false;
        }
        matches!(
            (&self.key, alg),
            (PublicKey::Rsa { .. }, Alg::Rs256 | Alg::Rs384 | Alg::Rs512 | Alg::Ps256)
                | (PublicKey::Ec { curve: Curve::P256, .. }, Alg::Es256)
                | (PublicKey::Ec { curve: Curve::P384, .. }, Alg::Es384)
                | (PublicKey::Ed25519(_), Alg::EdDsa)
        )
    }

    /// Check `sig` over `msg`; the caller has checked [`Jwk::fits`].
    fn verify(&self, alg: Alg, msg: &[u8], sig: &[u8]) -> bool {
        match &self.key {
            PublicKey::Rsa { n, e } => {
                let params: &signature::RsaParameters = match alg {
                    Alg::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    Alg::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    Alg::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    Alg::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
                    _ => return false,
                };
                RsaPublicKeyComponents { n: n.as_slice(), e: e.as_slice() }.verify(params, msg, sig).is_ok()
            }
            PublicKey::Ec { curve, point } => {
                let params = match (curve, alg) {
                    (Curve::P256, Alg::Es256) => &signature::ECDSA_P256_SHA256_FIXED,
                    (Curve::P384, Alg::Es384) => &signature::ECDSA_P384_SHA384_FIXED,
                    _ => return false,
                };
                UnparsedPublicKey::new(params, point).verify(msg, sig).is_ok()
            }
            PublicKey::Ed25519(x) => {
                alg == Alg::EdDsa && UnparsedPublicKey::new(&signature::ED25519, x).verify(msg, sig).is_ok()
            }
        }
    }
}

fn b64(v: &Value, field: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(v.get(field)?.as_str()?).ok()
}

fn strip_leading_zeros(mut b: Vec<u8>) -> Vec<u8> {
    let zeros = b.iter().take_while(|&&x| x == 0).count();
    b.drain(..zeros);
    b
}

/// One key of a JWK set; `None` for keys not for signatures (`use` other than `sig`), of a
/// type or curve the gateway does not use, or malformed.
fn parse_key(v: &Value) -> Option<Jwk> {
    if v.get("use").is_some_and(|u| u.as_str() != Some("sig")) {
        return None;
    }
    let key = match (v.get("kty")?.as_str()?, v.get("crv").and_then(Value::as_str)) {
        ("RSA", _) => {
            let (n, e) = (strip_leading_zeros(b64(v, "n")?), strip_leading_zeros(b64(v, "e")?));
            (!n.is_empty() && !e.is_empty()).then_some(PublicKey::Rsa { n, e })?
        }
        ("EC", Some(crv)) => {
            let (curve, len) = match crv {
                "P-256" => (Curve::P256, 32),
                "P-384" => (Curve::P384, 48),
                _ => return None,
            };
            let (x, y) = (b64(v, "x")?, b64(v, "y")?);
            if x.len() != len || y.len() != len {
                return None;
            }
            let point = [&[4u8][..], &x, &y].concat();
            PublicKey::Ec { curve, point }
        }
        ("OKP", Some("Ed25519")) => {
            let x = b64(v, "x")?;
            (x.len() == 32).then_some(PublicKey::Ed25519(x))?
        }
        _ => return None,
    };
    let text = |f: &str| v.get(f).and_then(Value::as_str).map(String::from);
    Some(Jwk { kid: text("kid"), alg: text("alg"), key })
}

/// The signing keys of a JWK set document (`{"keys": [...]}`), at most [`MAX_KEYS`].
pub fn parse_jwks(doc: &Value) -> Result<Vec<Jwk>, String> {
    let keys = doc.get("keys").and_then(Value::as_array).ok_or("no \"keys\" array")?;
    Ok(keys.iter().filter_map(parse_key).take(MAX_KEYS).collect())
}

/// A compact JWS, split and decoded, its signature not yet checked.
#[derive(Debug)]
pub struct Jws<'a> {
    pub alg: Alg,
    pub kid: Option<String>,
    signing_input: &'a str,
    payload: Vec<u8>,
    signature: Vec<u8>,
}

/// Split and decode a compact JWS and check its header: an accepted `alg`, no `crit`.
pub fn parse(token: &str) -> Result<Jws<'_>, OidcError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(OidcError::MalformedToken("longer than 16 KiB"));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(OidcError::MalformedToken("not three dot-separated parts"));
    };
    let decode = |part: &str| URL_SAFE_NO_PAD.decode(part).map_err(|_| OidcError::MalformedToken("bad base64url"));
    let header: Map<String, Value> = serde_json::from_slice(&decode(h)?)
        .map_err(|_| OidcError::MalformedToken("the header is not a JSON object"))?;
    let alg_name = header.get("alg").and_then(Value::as_str).ok_or(OidcError::MalformedToken("no alg"))?;
    let alg =
        Alg::from_name(alg_name).ok_or_else(|| OidcError::UnsupportedAlgorithm(super::error::from_idp(alg_name)))?;
    if header.contains_key("crit") {
        return Err(OidcError::MalformedToken("critical header extensions are not supported"));
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(OidcError::MalformedToken("kid is not a string")),
    };
    let signing_input = token.get(..h.len() + 1 + p.len()).ok_or(OidcError::MalformedToken("bad layout"))?;
    Ok(Jws { alg, kid, signing_input, payload: decode(p)?, signature: decode(s)? })
}

/// Which key a token names.
pub enum KeyChoice<'k> {
    Found(&'k Jwk),
    /// Not in this set: the provider may have rotated its keys.
    Missing,
}

impl Jws<'_> {
    /// The key to check this token with: the one with the token's `kid`, or without a
    /// `kid` the only key that fits the algorithm. A key that is found but does not fit the
    /// algorithm is an error, not a reason to fetch the keys again.
    pub fn choose_key<'k>(&self, keys: &'k [Jwk]) -> Result<KeyChoice<'k>, OidcError> {
        if let Some(kid) = &self.kid {
            return match keys.iter().find(|k| k.kid.as_deref() == Some(kid)) {
                None => Ok(KeyChoice::Missing),
                Some(k) if k.fits(self.alg) => Ok(KeyChoice::Found(k)),
                Some(_) => Err(OidcError::UnknownKey(format!(
                    "key {:?} is not a {} key",
                    super::error::from_idp(kid),
                    self.alg.name()
                ))),
            };
        }
        let mut fitting = keys.iter().filter(|k| k.fits(self.alg));
        match (fitting.next(), fitting.next()) {
            (None, _) => Ok(KeyChoice::Missing),
            (Some(k), None) => Ok(KeyChoice::Found(k)),
            (Some(_), Some(_)) => Err(OidcError::UnknownKey(format!(
                "the token names no key (kid) and several {} keys are published",
                self.alg.name()
            ))),
        }
    }

    /// The claims, once the signature checks out with `key`.
    pub fn verified_claims(&self, key: &Jwk) -> Result<Map<String, Value>, OidcError> {
        if !key.fits(self.alg) || !key.verify(self.alg, self.signing_input.as_bytes(), &self.signature) {
            return Err(OidcError::BadSignature);
        }
        serde_json::from_slice(&self.payload).map_err(|_| OidcError::MalformedToken("the payload is not a JSON object"))
    }
}
