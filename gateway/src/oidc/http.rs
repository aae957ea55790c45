//! Requests to the identity provider: blocking `ureq` on tokio's blocking pool, 10 s per
//! request, no redirects, bodies of at most 1 MiB, JSON answers. Nothing here logs a request
//! body (codes, secrets) or a response body (tokens).

use std::io::Read;
use std::time::Duration;

use base64::Engine;
use serde_json::Value;

use super::error::{OidcError, from_idp};

/// Time for one request, connection to last byte.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest response body read.
pub const MAX_BODY: u64 = 1024 * 1024;

/// The answer of a form POST to the token or device endpoint.
#[derive(Debug)]
pub enum FormReply {
    /// A 2xx JSON object.
    Ok(Value),
    /// An OAuth error response (RFC 6749 5.2): `error` and `error_description`.
    OAuthError { error: String, description: Option<String> },
}

/// HTTP client for one provider. Cheap to share; each request runs on the blocking pool.
#[derive(Clone)]
pub struct IdpHttp {
    agent: ureq::Agent,
}

impl IdpHttp {
    pub fn new() -> Self {
        Self { agent: ureq::AgentBuilder::new().timeout(REQUEST_TIMEOUT).redirects(0).build() }
    }

    /// GET a JSON document (discovery, JWKS).
    pub async fn get_json(&self, what: &'static str, url: &str) -> Result<Value, OidcError> {
        let req = self.agent.get(url).set("Accept", "application/json");
        blocking(what, move || answer(what, req.call())).await?.map_err(|r| bad(what, r.describe()))
    }

    /// POST a form with HTTP Basic client authentication (client_secret_basic, RFC 6749
    /// 2.3.1: id and secret form-urlencoded before base64).
    pub async fn post_form(
        &self,
        what: &'static str,
        url: &str,
        client: (&str, &str),
        form: Vec<(&'static str, String)>,
    ) -> Result<FormReply, OidcError> {
        let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", enc(client.0), enc(client.1)));
        let req =
            self.agent.post(url).set("Accept", "application/json").set("Authorization", &format!("Basic {basic}"));
        let reply = blocking(what, move || {
            let pairs: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
            answer(what, req.send_form(&pairs))
        })
        .await?;
        match reply {
            Ok(v) => Ok(FormReply::Ok(v)),
            Err(Refused { body: Some(body), .. }) if body.get("error").and_then(Value::as_str).is_some() => {
                let field = |f: &str| body.get(f).and_then(Value::as_str).map(from_idp);
                Ok(FormReply::OAuthError {
                    error: field("error").unwrap_or_default(),
                    description: field("error_description"),
                })
            }
            Err(refused) => Err(bad(what, refused.describe())),
        }
    }
}

fn bad(what: &'static str, detail: String) -> OidcError {
    OidcError::IdpBadResponse { what, detail }
}

/// Run a blocking request on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, OidcError> + Send + 'static,
) -> Result<T, OidcError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OidcError::IdpUnreachable { what, detail: format!("request task failed: {e}") })?
}

/// A non-2xx answer: its status and its body, if that is a JSON object.
struct Refused {
    status: u16,
    body: Option<Value>,
}

impl Refused {
    fn describe(&self) -> String {
        let hint = if (300..400).contains(&self.status) { " (the gateway follows no redirects)" } else { "" };
        format!("HTTP {}{hint}", self.status)
    }
}

/// `Ok(json)` for a 2xx JSON object, `Err(Refused)` for any other status; transport
/// failures and unreadable 2xx bodies are errors.
fn answer(what: &'static str, r: Result<ureq::Response, ureq::Error>) -> Result<Result<Value, Refused>, OidcError> {
    let resp = match r {
        Ok(resp) => resp,
        Err(ureq::Error::Status(_, resp)) => resp,
        Err(ureq::Error::Transport(t)) => {
            return Err(OidcError::IdpUnreachable { what, detail: from_idp(&t.to_string()) });
        }
    };
    let status = resp.status();
    let mut body = Vec::new();
    resp.into_reader()
        .take(MAX_BODY + 1)
        .read_to_end(&mut body)
        .map_err(|e| OidcError::IdpUnreachable { what, detail: format!("reading the answer: {e}") })?;
    if body.len() as u64 > MAX_BODY {
        return Err(bad(what, "the answer is larger than 1 MiB".into()));
    }
    let json = serde_json::from_slice::<Value>(&body).ok().filter(Value::is_object);
    if !(200..300).contains(&status) {
        return Ok(Err(Refused { status, body: json }));
    }
    json.map(Ok).ok_or_else(|| bad(what, "the answer is not a JSON object".into()))
}
