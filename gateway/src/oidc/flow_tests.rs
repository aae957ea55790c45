//! The flows against a stand-in provider on loopback: discovery and its cache, the
//! authorization URL, redeeming a code (client_secret_basic, PKCE), key rotation without a
//! refetch storm, the device flow. Token validation itself is in tests.rs.

use base64::Engine;
use serde_json::json;

use super::test_support::*;
use super::{JWKS_REFETCH_INTERVAL, Oidc};
use crate::config::{ClientSecret, OidcConfig};

fn oidc(p: &FakeProvider) -> Oidc {
    Oidc::new(&OidcConfig::new(&p.issuer, CLIENT_ID, ClientSecret::new(SECRET))).unwrap()
}

fn query(url: &str) -> std::collections::HashMap<String, String> {
    url::Url::parse(url).unwrap().query_pairs().into_owned().collect()
}

const REDIRECT: &str = "http://127.0.0.1:45678/callback";

#[tokio::test]
async fn begin_sends_the_user_to_the_provider_with_pkce_state_and_nonce() {
    let p = FakeProvider::start(&[]);
    let o = oidc(&p);
    let a = o.begin(REDIRECT).await.unwrap();
    let b = o.begin("http://[::1]:5000/cb").await.unwrap();
    assert_eq!(p.count("/.well-known/openid-configuration"), 1, "discovery is cached");
    assert!(a.authorization_url.starts_with(&format!("{}/auth?tenant=t1&", p.issuer)), "{}", a.authorization_url);
    let q = query(&a.authorization_url);
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["client_id"], CLIENT_ID);
    assert_eq!(q["redirect_uri"], REDIRECT);
    assert_eq!(q["scope"], "openid email profile");
    assert_eq!(q["state"], a.state);
    assert_eq!(q["nonce"], a.nonce);
    assert_eq!(q["code_challenge_method"], "S256");
    let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(ring::digest::digest(&ring::digest::SHA256, a.verifier.as_bytes()));
    assert_eq!(q["code_challenge"], challenge);
    assert!(a.verifier.len() >= 43);
    assert!(!a.authorization_url.contains(&a.verifier));
    assert_ne!((&a.state, &a.nonce, &a.verifier), (&b.state, &b.nonce, &b.verifier));
    assert!(a.check_state(&a.state).is_ok());
    assert_eq!(a.check_state(&b.state).unwrap_err().kind(), "state_mismatch");
    assert_eq!(a.check_state("").unwrap_err().kind(), "state_mismatch");
    assert!(!format!("{a:?}").contains(&a.verifier));
}

#[tokio::test]
async fn a_redirect_elsewhere_is_refused_before_anything_is_asked() {
    let p = FakeProvider::start(&[]);
    let e = oidc(&p).begin("https://evil.example.com/steal").await.unwrap_err();
    assert_eq!(e.kind(), "bad_redirect_uri");
    assert!(p.state.lock().unwrap().seen.is_empty());
}

#[tokio::test]
async fn a_discovery_document_for_another_issuer_is_refused() {
    let p = FakeProvider::start(&[]);
    p.state.lock().unwrap().discovery["issuer"] = json!("https://evil.example.com");
    let o = oidc(&p);
    let e = o.begin(REDIRECT).await.unwrap_err();
    assert_eq!(e.kind(), "wrong_issuer");
    // A trailing '/' on one side only is the same issuer (docs/sso.md); and a refused
    // document was not kept: the next login fetches it again.
    let issuer = format!("{}/", p.issuer);
    p.state.lock().unwrap().discovery["issuer"] = json!(issuer);
    o.begin(REDIRECT).await.unwrap();
    assert_eq!(p.count("/.well-known/openid-configuration"), 2);
    // Endpoints are held to the issuer's rule: no plain http off this machine.
    p.state.lock().unwrap().discovery["token_endpoint"] = json!("http://idp.example.com/token");
    assert_eq!(oidc(&p).begin(REDIRECT).await.unwrap_err().kind(), "idp_bad_response");
}

#[tokio::test]
async fn an_unreachable_provider_is_reported_and_not_cached() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = OidcConfig::new(&format!("http://127.0.0.1:{port}"), CLIENT_ID, ClientSecret::new(SECRET));
    let e = Oidc::new(&cfg).unwrap().begin(REDIRECT).await.unwrap_err();
    assert_eq!(e.kind(), "idp_unreachable", "{e}");
}

#[tokio::test]
async fn finish_redeems_the_code_with_basic_auth_and_the_verifier_and_validates_the_token() {
    let key = TestKey::es256("k1");
    let p = FakeProvider::start(&[&key]);
    let o = oidc(&p);
    let pending = o.begin(REDIRECT).await.unwrap();
    let token = key.token(&claims(&p.issuer, &pending.nonce));
    p.push_token_reply(200, json!({"access_token": "at", "token_type": "Bearer", "id_token": token}));
    let facts = o.finish(&pending, "the-code").await.unwrap();
    assert_eq!((facts.user.as_str(), facts.subject.as_str()), ("alice", "sub-alice"));
    assert_eq!(facts.issuer, p.issuer);
    assert!(facts.mfa);

    let req = &p.seen("/token")[0];
    // RFC 6749 2.3.1: both form-urlencoded, then base64.
    let basic = base64::engine::general_purpose::STANDARD.encode("postern:s3%3Acr%40t+secret");
    assert_eq!(req.header("authorization"), Some(format!("Basic {basic}").as_str()));
    let form = req.form();
    let get = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get("grant_type"), Some("authorization_code"));
    assert_eq!(get("code"), Some("the-code"));
    assert_eq!(get("redirect_uri"), Some(REDIRECT));
    assert_eq!(get("code_verifier"), Some(pending.verifier.as_str()));
    assert_eq!(get("client_secret"), None);

    // A token for another login's nonce is refused even though the provider sent it.
    let other = o.begin(REDIRECT).await.unwrap();
    p.push_token_reply(200, json!({"id_token": key.token(&claims(&p.issuer, &other.nonce))}));
    assert_eq!(o.finish(&pending, "c2").await.unwrap_err().kind(), "nonce_mismatch");
    assert_eq!(p.count("/jwks"), 1, "keys are cached");
}

#[tokio::test]
async fn a_refused_code_is_a_clear_error_without_secrets() {
    let key = TestKey::es256("k1");
    let p = FakeProvider::start(&[&key]);
    let o = oidc(&p);
    let pending = o.begin(REDIRECT).await.unwrap();
    p.push_token_reply(400, json!({"error": "invalid_grant", "error_description": "grant request is invalid"}));
    let e = o.finish(&pending, "secret-code-123").await.unwrap_err();
    assert_eq!(e.kind(), "code_rejected");
    let msg = e.to_string();
    assert!(msg.contains("invalid_grant") && msg.contains("grant request is invalid"), "{msg}");
    assert!(!msg.contains("secret-code-123") && !msg.contains(SECRET), "{msg}");

    p.push_token_reply(401, json!({"error": "invalid_client"}));
    assert_eq!(o.finish(&pending, "c").await.unwrap_err().kind(), "idp_error");
    p.push_token_reply(302, json!({}));
    let e = o.finish(&pending, "c").await.unwrap_err();
    assert!(e.to_string().contains("no redirects"), "{e}");
    p.push_token_reply(200, json!({"access_token": "only"}));
    assert!(o.finish(&pending, "c").await.unwrap_err().to_string().contains("no id_token"));
    assert_eq!(o.finish(&pending, "").await.unwrap_err().kind(), "code_rejected");
}

#[tokio::test]
async fn a_rotated_key_is_fetched_once_and_unknown_keys_cause_no_refetch_storm() {
    let (old, new) = (TestKey::es256("old"), TestKey::ed25519("new"));
    let p = FakeProvider::start(&[&old]);
    let o = oidc(&p);
    let pending = o.begin(REDIRECT).await.unwrap();
    p.push_token_reply(200, json!({"id_token": old.token(&claims(&p.issuer, &pending.nonce))}));
    o.finish(&pending, "c").await.unwrap();
    assert_eq!(p.count("/jwks"), 1);

    // The provider rotates: a token under the new kid makes the gateway fetch the keys again.
    p.state.lock().unwrap().jwks = jwks(&[&new]);
    p.push_token_reply(200, json!({"id_token": new.token(&claims(&p.issuer, &pending.nonce))}));
    o.finish(&pending, "c").await.unwrap();
    assert_eq!(p.count("/jwks"), 2);

    // Tokens naming keys nobody publishes are refused without fetching again within 30 s.
    let stranger = TestKey::es256("stranger");
    for _ in 0..5 {
        p.push_token_reply(200, json!({"id_token": stranger.token(&claims(&p.issuer, &pending.nonce))}));
        assert_eq!(o.finish(&pending, "c").await.unwrap_err().kind(), "unknown_key");
    }
    assert_eq!(p.count("/jwks"), 2, "no refetch within {JWKS_REFETCH_INTERVAL:?}");

    // Once the interval has passed, an unknown kid may fetch again (once).
    o.cache().last_rotation_fetch = Some(std::time::Instant::now() - JWKS_REFETCH_INTERVAL);
    p.push_token_reply(200, json!({"id_token": stranger.token(&claims(&p.issuer, &pending.nonce))}));
    assert_eq!(o.finish(&pending, "c").await.unwrap_err().kind(), "unknown_key");
    assert_eq!(p.count("/jwks"), 3);
}

#[tokio::test]
async fn an_old_pending_login_is_refused() {
    let p = FakeProvider::start(&[]);
    let o = oidc(&p);
    let mut pending = o.begin(REDIRECT).await.unwrap();
    pending.created -= super::PENDING_TTL + std::time::Duration::from_secs(1);
    assert_eq!(o.finish(&pending, "c").await.unwrap_err().kind(), "login_expired");
    assert!(p.seen("/token").is_empty());
}

#[tokio::test]
async fn the_device_flow_polls_until_approved_and_reports_denial() {
    let key = TestKey::rsa("r", false);
    let p = FakeProvider::start(&[&key]);
    p.state.lock().unwrap().device_reply = json!({"device_code": "dc-1", "user_code": "WDJB-MJHT",
        "verification_uri": format!("{}/device-ui", p.issuer), "expires_in": 120, "interval": 1});
    let o = oidc(&p);
    let device = o.device_begin().await.unwrap();
    assert_eq!(device.user_code, "WDJB-MJHT");
    assert_eq!(device.verification_uri, format!("{}/device-ui", p.issuer));
    assert!(!format!("{device:?}").contains("dc-1"));
    let form = p.seen("/device")[0].form();
    assert!(form.contains(&("scope".into(), "openid email profile".into())), "{form:?}");

    p.push_token_reply(400, json!({"error": "authorization_pending"}));
    p.push_token_reply(200, json!({"id_token": key.token(&claims(&p.issuer, "whatever"))}));
    let facts = o.device_wait(&device).await.unwrap();
    assert_eq!(facts.user, "alice");
    let polls = p.seen("/token");
    assert_eq!(polls.len(), 2);
    let form = polls[1].form();
    assert!(form.contains(&("grant_type".into(), "urn:ietf:params:oauth:grant-type:device_code".into())));
    assert!(form.contains(&("device_code".into(), "dc-1".into())));

    p.push_token_reply(400, json!({"error": "access_denied"}));
    assert_eq!(o.device_wait(&device).await.unwrap_err().kind(), "access_denied");
    p.push_token_reply(400, json!({"error": "expired_token"}));
    assert_eq!(o.device_wait(&device).await.unwrap_err().kind(), "device_expired");
    let mut old = device.clone();
    old.created -= std::time::Duration::from_secs(120);
    assert_eq!(o.device_wait(&old).await.unwrap_err().kind(), "device_expired");

    p.state.lock().unwrap().discovery.as_object_mut().unwrap().remove("device_authorization_endpoint");
    assert_eq!(oidc(&p).device_begin().await.unwrap_err().kind(), "device_unsupported");
}
