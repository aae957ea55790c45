//! ID-token checks, one test per check, with keys made here (ring for EC and Ed25519, a
//! fixed test key for RSA). Each test would pass a token the check exists to stop, if the
//! check were gone.

use serde_json::{Map, Value, json};

use super::claims::{self, Expected, login_facts};
use super::error::OidcError;
use super::jws::{self, Jwk, KeyChoice};
use super::test_support::*;
use crate::config::{ClientSecret, OidcConfig};

const ISSUER: &str = "https://idp.example.com";
const NONCE: &str = "n-0S6_WzA2Mj";

fn keys_of(keys: &[&TestKey]) -> Vec<Jwk> {
    jws::parse_jwks(&jwks(keys)).unwrap()
}

/// Everything `Oidc::validate` does after fetching keys: parse, choose, verify, check.
fn validate(keys: &[Jwk], token: &str, nonce: Option<&str>, now: i64) -> Result<Map<String, Value>, OidcError> {
    let jws = jws::parse(token)?;
    let KeyChoice::Found(key) = jws.choose_key(keys)? else {
        return Err(OidcError::UnknownKey("missing".into()));
    };
    let claims = jws.verified_claims(key)?;
    claims::check(&claims, Expected { issuer: ISSUER, client_id: CLIENT_ID, nonce, now })?;
    Ok(claims)
}

fn kind(r: Result<Map<String, Value>, OidcError>) -> &'static str {
    match r {
        Ok(_) => "accepted",
        Err(e) => e.kind(),
    }
}

fn good() -> Value {
    claims(ISSUER, NONCE)
}

fn with(mut c: Value, key: &str, v: Value) -> Value {
    c[key] = v;
    c
}

fn without(mut c: Value, key: &str) -> Value {
    c.as_object_mut().unwrap().remove(key);
    c
}

#[test]
fn valid_tokens_of_every_key_type_are_accepted() {
    for key in [TestKey::es256("e"), TestKey::ed25519("d"), TestKey::rsa("r", false), TestKey::rsa("p", true)] {
        let keys = keys_of(&[&key]);
        let claims = validate(&keys, &key.token(&good()), Some(NONCE), now()).unwrap();
        assert_eq!(claims["sub"], "sub-alice", "{}", key.alg());
        // Without a kid, the one key that fits the algorithm is used.
        let header = json!({"alg": key.alg()});
        assert_eq!(kind(validate(&keys, &key.token_with_header(&header, &good()), Some(NONCE), now())), "accepted");
    }
}

#[test]
fn a_tampered_payload_or_signature_is_refused() {
    for key in [TestKey::es256("e"), TestKey::rsa("r", false), TestKey::ed25519("d")] {
        let keys = keys_of(&[&key]);
        let token = key.token(&good());
        let parts: Vec<&str> = token.split('.').collect();
        let evil = b64json(&with(good(), "preferred_username", json!("root")));
        let tampered = format!("{}.{evil}.{}", parts[0], parts[2]);
        assert_eq!(kind(validate(&keys, &tampered, Some(NONCE), now())), "bad_signature", "{}", key.alg());
        let mut sig = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, parts[2]).unwrap();
        sig[10] ^= 1;
        let bad_sig = format!("{}.{}.{}", parts[0], parts[1], b64(&sig));
        assert_eq!(kind(validate(&keys, &bad_sig, Some(NONCE), now())), "bad_signature", "{}", key.alg());
        // Signed by another key of the same type under this key's kid.
        let other = match key.alg() {
            "ES256" => TestKey::es256("e"),
            "EdDSA" => TestKey::ed25519("d"),
            _ => continue,
        };
        assert_eq!(kind(validate(&keys, &other.token(&good()), Some(NONCE), now())), "bad_signature");
    }
}

fn b64(b: &[u8]) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b)
}

#[test]
fn alg_none_and_hmac_with_the_public_key_as_secret_are_refused() {
    let key = TestKey::rsa("r", false);
    let keys = keys_of(&[&key]);
    let none = format!("{}.{}.", b64json(&json!({"alg": "none", "kid": "r"})), b64json(&good()));
    assert_eq!(kind(validate(&keys, &none, Some(NONCE), now())), "bad_algorithm");
    // The classic confusion attack: HMAC keyed with the public key everyone can fetch.
    let input = format!("{}.{}", b64json(&json!({"alg": "HS256", "kid": "r"})), b64json(&good()));
    let public = serde_json::to_vec(&key.jwk()).unwrap();
    let mac = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &public), input.as_bytes());
    let hs = format!("{input}.{}", b64(mac.as_ref()));
    assert_eq!(kind(validate(&keys, &hs, Some(NONCE), now())), "bad_algorithm");
}

#[test]
fn a_key_must_fit_the_tokens_algorithm() {
    let ec = TestKey::es256("k1");
    let ed = TestKey::ed25519("k1");
    // The token says EdDSA under kid k1, but k1 is a P-256 key.
    let keys = keys_of(&[&ec]);
    assert_eq!(kind(validate(&keys, &ed.token(&good()), Some(NONCE), now())), "unknown_key");
    // A key that names its own alg accepts only that one.
    let mut jwk = ec.jwk();
    jwk["alg"] = json!("ES384");
    let keys = jws::parse_jwks(&json!({"keys": [jwk]})).unwrap();
    assert_eq!(kind(validate(&keys, &ec.token(&good()), Some(NONCE), now())), "unknown_key");
    // An RS256 header on a PS256 signature does not verify.
    let pss = TestKey::rsa("r", true);
    let lying = pss.token_with_header(&json!({"alg": "RS256", "kid": "r"}), &good());
    assert_eq!(kind(validate(&keys_of(&[&pss]), &lying, Some(NONCE), now())), "bad_signature");
}

#[test]
fn malformed_tokens_are_refused() {
    let key = TestKey::es256("e");
    let keys = keys_of(&[&key]);
    let token = key.token(&good());
    let two = token.rsplit_once('.').unwrap().0;
    assert_eq!(kind(validate(&keys, two, Some(NONCE), now())), "malformed_token");
    assert_eq!(kind(validate(&keys, &format!("{token}.x"), Some(NONCE), now())), "malformed_token");
    let big = key.token(&with(good(), "pad", json!("x".repeat(jws::MAX_TOKEN_BYTES))));
    assert_eq!(kind(validate(&keys, &big, Some(NONCE), now())), "malformed_token");
    let crit = key.token_with_header(&json!({"alg": "ES256", "kid": "e", "crit": ["exp"]}), &good());
    assert_eq!(kind(validate(&keys, &crit, Some(NONCE), now())), "malformed_token");
}

#[test]
fn keys_not_for_signing_or_of_unknown_types_are_ignored() {
    let key = TestKey::es256("e");
    let mut enc = key.jwk();
    enc["use"] = json!("enc");
    let doc = json!({"keys": [enc, {"kty": "oct", "k": "c2VjcmV0", "kid": "h"},
                              {"kty": "OKP", "crv": "X25519", "x": "AAAA"}, {"kty": "EC", "crv": "P-256"}]});
    assert!(jws::parse_jwks(&doc).unwrap().is_empty());
    assert!(jws::parse_jwks(&json!({"nokeys": []})).is_err());
    // With no usable key, a token's key is "missing" (a reason to fetch again), not found.
    let token = key.token(&good());
    let jws = jws::parse(&token).unwrap();
    assert!(matches!(jws.choose_key(&jws::parse_jwks(&doc).unwrap()), Ok(KeyChoice::Missing)));
    // Without a kid and two keys that fit, the gateway does not guess.
    let (a, b) = (TestKey::es256("a"), TestKey::es256("b"));
    let no_kid = a.token_with_header(&json!({"alg": "ES256"}), &good());
    assert_eq!(kind(validate(&keys_of(&[&a, &b]), &no_kid, Some(NONCE), now())), "unknown_key");
}

#[test]
fn the_issuer_must_be_the_providers() {
    let key = TestKey::es256("e");
    let keys = keys_of(&[&key]);
    for iss in [json!("https://evil.example.com"), json!("https://idp.example.com/"), json!(null)] {
        let t = key.token(&with(good(), "iss", iss.clone()));
        assert_eq!(kind(validate(&keys, &t, Some(NONCE), now())), "wrong_issuer", "{iss}");
    }
}

#[test]
fn the_audience_must_be_this_client_and_azp_must_name_it_among_several() {
    let key = TestKey::es256("e");
    let keys = keys_of(&[&key]);
    let check = |c: Value| kind(validate(&keys, &key.token(&c), Some(NONCE), now()));
    assert_eq!(check(with(good(), "aud", json!("other-app"))), "wrong_audience");
    assert_eq!(check(with(good(), "aud", json!(["other-app"]))), "wrong_audience");
    assert_eq!(check(without(good(), "aud")), "wrong_audience");
    assert_eq!(check(with(good(), "aud", json!([CLIENT_ID]))), "accepted");
    let several = with(good(), "aud", json!([CLIENT_ID, "other-app"]));
    assert_eq!(check(several.clone()), "wrong_audience");
    assert_eq!(check(with(several.clone(), "azp", json!(CLIENT_ID))), "accepted");
    assert_eq!(check(with(several, "azp", json!("other-app"))), "wrong_audience");
    assert_eq!(check(with(good(), "azp", json!("other-app"))), "wrong_audience");
}

#[test]
fn expiry_issue_time_and_not_before_are_checked_with_a_minute_of_leeway() {
    let key = TestKey::es256("e");
    let keys = keys_of(&[&key]);
    let t = now();
    let at = |c: Value, now: i64| kind(validate(&keys, &key.token(&c), Some(NONCE), now));
    let c = with(with(good(), "exp", json!(t + 300)), "iat", json!(t));
    assert_eq!(at(c.clone(), t + 300 + 59), "accepted");
    assert_eq!(at(c.clone(), t + 300 + 60), "expired");
    assert_eq!(at(without(c.clone(), "exp"), t), "malformed_token");
    assert_eq!(at(c.clone(), t - 59), "accepted");
    assert_eq!(at(c.clone(), t - 61), "not_yet_valid");
    assert_eq!(at(without(c.clone(), "iat"), t), "malformed_token");
    let nbf = with(c.clone(), "nbf", json!(t + 120));
    assert_eq!(at(nbf.clone(), t), "not_yet_valid");
    assert_eq!(at(nbf, t + 61), "accepted");
    assert_eq!(at(with(c, "nbf", json!("soon")), t), "malformed_token");
}

#[test]
fn the_nonce_must_be_the_logins_and_the_subject_present() {
    let key = TestKey::es256("e");
    let keys = keys_of(&[&key]);
    let token = key.token(&good());
    assert_eq!(kind(validate(&keys, &token, Some("another-login"), now())), "nonce_mismatch");
    assert_eq!(kind(validate(&keys, &key.token(&without(good(), "nonce")), Some(NONCE), now())), "nonce_mismatch");
    // The device flow has no nonce to compare.
    assert_eq!(kind(validate(&keys, &key.token(&without(good(), "nonce")), None, now())), "accepted");
    assert_eq!(kind(validate(&keys, &key.token(&with(good(), "sub", json!(""))), Some(NONCE), now())), "no_subject");
    assert_eq!(kind(validate(&keys, &key.token(&without(good(), "sub")), Some(NONCE), now())), "no_subject");
}

fn cfg() -> OidcConfig {
    OidcConfig::new(ISSUER, CLIENT_ID, ClientSecret::new(SECRET))
}

fn facts(cfg: &OidcConfig, c: &Value) -> Result<super::LoginFacts, OidcError> {
    login_facts(cfg, ISSUER, c.as_object().unwrap())
}

#[test]
fn login_facts_carry_the_tokens_identity() {
    let f = facts(&cfg(), &good()).unwrap();
    assert_eq!((f.issuer.as_str(), f.subject.as_str(), f.user.as_str()), (ISSUER, "sub-alice", "alice"));
    assert_eq!(f.email.as_deref(), Some("alice@example.com"));
    assert_eq!(f.groups, ["eng", "ops"]);
    assert_eq!(f.expires_at, good()["exp"].as_i64().unwrap());
}

#[test]
fn the_user_claim_must_be_a_valid_name_or_an_address_in_the_only_allowed_domain() {
    let mut c = cfg();
    let user = |c: &OidcConfig, v: Value| facts(c, &with(good(), "preferred_username", v)).map(|f| f.user);
    assert_eq!(user(&c, json!("bob.smith_2")).unwrap(), "bob.smith_2");
    for bad in
        [json!("alice@example.com"), json!("al ice"), json!("root;rm"), json!(""), json!(42), json!("a".repeat(64))]
    {
        let e = user(&c, bad.clone()).unwrap_err();
        assert_eq!(e.kind(), "bad_user_claim", "{bad}");
        assert!(e.to_string().contains("preferred_username") && e.to_string().contains("user_claim"), "{e}");
    }
    assert_eq!(facts(&c, &without(good(), "preferred_username")).unwrap_err().kind(), "bad_user_claim");
    c.allowed_domains = vec!["Example.com".into()];
    assert_eq!(user(&c, json!("alice@example.com")).unwrap(), "alice");
    assert_eq!(user(&c, json!("alice@evil.com")).unwrap_err().kind(), "bad_user_claim");
    c.allowed_domains.push("example.org".into());
    // Two domains: alice@example.com and alice@example.org would be one user; refused.
    assert_eq!(user(&c, json!("alice@example.com")).unwrap_err().kind(), "bad_user_claim");
    c.user_claim = "email".into();
    assert_eq!(facts(&c, &good()).unwrap_err().kind(), "bad_user_claim");
}

#[test]
fn allowed_domains_need_a_verified_email_in_one_of_them() {
    let mut c = cfg();
    c.allowed_domains = vec!["example.com".into()];
    assert!(facts(&c, &good()).is_ok());
    let kind_of = |v: Value| facts(&c, &v).map(|_| "accepted").unwrap_or_else(|e| e.kind());
    assert_eq!(kind_of(with(good(), "email", json!("alice@evil.com"))), "not_allowed_domain");
    assert_eq!(kind_of(with(good(), "email", json!("alice@example.com.evil.com"))), "not_allowed_domain");
    assert_eq!(kind_of(without(good(), "email")), "not_allowed_domain");
    assert_eq!(kind_of(with(good(), "email_verified", json!(false))), "email_not_verified");
    assert_eq!(kind_of(without(good(), "email_verified")), "email_not_verified");
    assert_eq!(kind_of(with(good(), "email_verified", json!("true"))), "accepted");
    // Without allowed domains, the email is only reported.
    assert!(facts(&cfg(), &with(good(), "email", json!("x@evil.com"))).is_ok());
}

#[test]
fn groups_are_mapped_or_kept_when_they_are_valid_names() {
    let mut c = cfg();
    let groups = |c: &OidcConfig, v: Value| facts(c, &with(good(), "groups", v)).unwrap().groups;
    assert_eq!(groups(&c, json!(["ops", "eng", "has space", "eng", 7])), ["eng", "ops"]);
    assert_eq!(groups(&c, json!("solo")), ["solo"]);
    assert!(groups(&c, json!({"eng": true})).is_empty());
    assert!(facts(&c, &without(good(), "groups")).unwrap().groups.is_empty());
    c.groups = Some([("eng@example.com", "eng"), ("CN=Ops,OU=x", "ops")].map(|(a, b)| (a.into(), b.into())).into());
    assert_eq!(groups(&c, json!(["eng@example.com", "CN=Ops,OU=x", "admins", "eng"])), ["eng", "ops"]);
    c.groups_claim = "roles".into();
    assert!(facts(&c, &good()).unwrap().groups.is_empty());
    assert_eq!(facts(&c, &with(good(), "roles", json!(["eng@example.com"]))).unwrap().groups, ["eng"]);
}

#[test]
fn mfa_comes_from_amr_or_acr_and_can_be_required() {
    let mut c = cfg();
    let mfa = |c: &OidcConfig, v: &Value| facts(c, v).map(|f| f.mfa);
    assert!(mfa(&c, &good()).unwrap());
    assert!(!mfa(&c, &with(good(), "amr", json!(["pwd"]))).unwrap());
    assert!(!mfa(&c, &without(good(), "amr")).unwrap());
    let pwd_gold = with(with(good(), "amr", json!(["pwd"])), "acr", json!("gold"));
    assert!(!mfa(&c, &pwd_gold).unwrap(), "an acr counts only when listed in mfa_acr");
    c.mfa_acr = vec!["gold".into()];
    let gold = with(with(good(), "amr", json!(["pwd"])), "acr", json!("gold"));
    let f = facts(&c, &gold).unwrap();
    assert!(f.mfa);
    assert_eq!((f.amr, f.acr.as_deref()), (vec!["pwd".to_string()], Some("gold")));
    c.require_mfa = true;
    assert!(mfa(&c, &good()).unwrap());
    assert!(mfa(&c, &gold).unwrap());
    let e = facts(&c, &with(good(), "amr", json!(["pwd"]))).unwrap_err();
    assert_eq!(e.kind(), "mfa_required");
    assert!(e.to_string().contains("second factor"), "{e}");
}

#[test]
fn only_loopback_redirect_uris_are_accepted() {
    for ok in ["http://127.0.0.1:8765/callback", "http://[::1]:1/", "http://localhost:49152", "http://127.0.0.1:80/"] {
        assert!(super::check_redirect_uri(ok).is_ok(), "{ok}");
    }
    for bad in [
        "https://127.0.0.1:8765/callback",
        "http://127.0.0.1/callback",
        "http://127.0.0.2:8765/",
        "http://evil.com:8765/",
        "http://127.0.0.1:8765@evil.com/",
        "http://127.0.0.1:80x/",
        "http://localhost.evil.com:80/",
        "http://127.0.0.1:8765/#frag",
        "http://user@127.0.0.1:8765/",
        "urn:ietf:wg:oauth:2.0:oob",
        "",
    ] {
        let e = super::check_redirect_uri(bad).unwrap_err();
        assert_eq!(e.kind(), "bad_redirect_uri", "{bad}");
    }
}

#[test]
fn device_polls_slow_down_by_five_seconds_and_stop_on_denial_or_expiry() {
    use super::{Poll, next_poll};
    use std::time::Duration;
    let five = Duration::from_secs(5);
    assert!(matches!(next_poll("authorization_pending", five), Poll::Again(d) if d == five));
    assert!(matches!(next_poll("slow_down", five), Poll::Again(d) if d == Duration::from_secs(10)));
    assert!(matches!(next_poll("slow_down", Duration::from_secs(58)), Poll::Again(d) if d == Duration::from_secs(60)));
    assert!(matches!(next_poll("access_denied", five), Poll::Stop(Some(OidcError::AccessDenied))));
    assert!(matches!(next_poll("expired_token", five), Poll::Stop(Some(OidcError::DeviceExpired))));
    assert!(matches!(next_poll("invalid_client", five), Poll::Stop(None)));
}

#[test]
fn messages_from_the_provider_are_cut_short_and_stripped_of_control_characters() {
    let s = super::error::from_idp(&format!("bad\x1b[31m\n{}", "x".repeat(300)));
    assert!(!s.contains('\x1b') && !s.contains('\n'));
    assert_eq!(s.chars().count(), 201);
}
