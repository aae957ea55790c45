//! Test keys, token making and a tiny loopback HTTP server standing in for a provider's
//! discovery, key-set, token and device endpoints (the end-to-end tests use a real one).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use serde_json::{Value, json};

pub const CLIENT_ID: &str = "postern";
pub const SECRET: &str = "s3:cr@t secret";

/// A 2048-bit RSA key made for these tests with `openssl genpkey` (PKCS#1 DER, base64):
/// ring cannot generate RSA keys.
const TEST_RSA_KEY: &str = concat!(
    "MIIEogIBAAKCAQEAo4vmzdFQD6yQODwOWuHFQg8XFwC8U5IdTpPl/1ySO4bQt5iFt4O6YTchlkCYtZ2TLxW0n3/ybniYOnFkqoiE",
    "p/YPNHGCplyCrTozMT/K5xPMDSziZJaaxmctBHv+2ieDlEQXWdz01Ion9EyTDih0rU0aDu12S1FdpbOr4uejlrtz17sO+4eejY6j",
    "CXaZUOxBHmUPQ4LQgOYZHaWF6OzLnE9irIeZMrHrUUoV2crZOnPvK/xHm8sPDz2axwK3GUsA3dxeUvQsm0pGnQ4BetRPOpEXbMIy",
    "YWZu/Rr419KwKzIiiuT2/GWkHWqrM3yfcZIy3QfrVzrcbLGhfN/gyGdosQIDAQABAoIBAAOD+JpgfzTTDAeVbOaRt1SH8AJf0uyF",
    "9cjQX4+JbSBH8dkcd3VeKMW5smhhK5ct07HdqNQL40lyIK2S7evHgvh8Ts/dB8atMubn2x1aJnGoqIh4+EXawel1Ys+Xnb8RPeAU",
    "RZ86I24lKR40fi29+2IVR/PdsV8FmPp8nfuC6K6PAKq4Gs7xoqyuZxFYoFEZzuxuyODxjKNiQ8vbtLmTr7g/mXIIyTpLnY9UokDu",
    "UYKJpLTILec/gnTlnnJuRtWp3itv7K/eD7WKYR6Q83SwMFVrmkzdBMvQuQkZUp5GWbpLy9eH/MHfbCVcuv2dzB872xmH/U0T7Mbz",
    "ef8oWSnLHAECgYEA2TeL/sMTIXmI3N2ZV1rKctYgdUwaic2Wxhot6EYkNp8b/VN0kGE87GDoPom0Kk+gI4UdQenbiqaDddA3Vtx4",
    "UooM0591YzKX+MMboHL9rZJXs0VFpQeQQs6e1LVO3Y53rPpIdpx1mSS0AbIyDbDdveREO/42abpcvIpb0kKmwbECgYEAwL81dssd",
    "SUaG7slKZayDHPgi7SdCMNCs7GjSanmvZ7T0NmTjvUCy8ZefHH3S6XUuKFfjfHaS8Dt2+zRbemqUeMFH3T2O8i/Y2Gx+ByTjNjHM",
    "gAJbfsxFr42YrWhY2Frw3BZMZpiC3s6Tndt2ry+aumjqbA2bfB+Lpbq1ykKl1wECgYB/NDtEjyKl6NFQXmlNMbr68xCBAHdOGdpg",
    "2rXlnyXX4ud2O6g4YOlXmAyJiwS5/nVON8cBcZ0Cni7AEJZHxMalt3h5eZk55UgAAuor1Qtf2SKItllpontF1FBJSoAL2UGWR9+l",
    "rkxjyY2srJkJUXkZmhKne2CMG/nw46mQAT48kQKBgGO9TjQ3rOLzHPXJsbblSz+dY61mqEjMYv8+ysuQRmUa7ViMYpDXPwHnXM2I",
    "irCGE6mKuUv5q9WmX85j7IZvSn8mPULODP9kJQjxM1INE4pCwLjo/2Gg4NqUIhJxsa/bd1HcNBLPDsGvEhIYs9S5hI67pbreW7wi",
    "MshC0rlkPZ8BAoGACEbnSxLeYweVvfhriGSICfay6rpugYhETdEj9swxxRFY+huphHWhPdyf23+3EEXRbJWT+d5FLxWMqAhyT4VH",
    "jQKd31U2I9yjAd0jur7RY5Vo1j5VVCY5yU7gRDY3CVwa3L8bXnnjZVx1t+OsQecjGyLdwySjTFkjC3+r3hewY9Y=",
);

pub enum Signer {
    Es256(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
    Rsa(RsaKeyPair, &'static dyn signature::RsaEncoding, &'static str),
}

/// A signing key with its kid and its public JWK.
pub struct TestKey {
    pub kid: String,
    pub signer: Signer,
}

impl TestKey {
    pub fn es256(kid: &str) -> Self {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        Self { kid: kid.into(), signer: Signer::Es256(EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap()) }
    }

    pub fn ed25519(kid: &str) -> Self {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Self { kid: kid.into(), signer: Signer::Ed25519(Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()) }
    }

    pub fn rsa(kid: &str, pss: bool) -> Self {
        let der = STANDARD.decode(TEST_RSA_KEY).unwrap();
        let kp = RsaKeyPair::from_der(&der).unwrap();
        let (enc, alg): (&'static dyn signature::RsaEncoding, _) =
            if pss { (&signature::RSA_PSS_SHA256, "PS256") } else { (&signature::RSA_PKCS1_SHA256, "RS256") };
        Self { kid: kid.into(), signer: Signer::Rsa(kp, enc, alg) }
    }

    pub fn alg(&self) -> &'static str {
        match &self.signer {
            Signer::Es256(_) => "ES256",
            Signer::Ed25519(_) => "EdDSA",
            Signer::Rsa(_, _, alg) => alg,
        }
    }

    /// The public key as a JWK (with `use: sig`).
    pub fn jwk(&self) -> Value {
        let b = |x: &[u8]| URL_SAFE_NO_PAD.encode(x);
        match &self.signer {
            Signer::Es256(kp) => {
                let p = kp.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-256", "kid": self.kid, "use": "sig",
                       "x": b(&p[1..33]), "y": b(&p[33..65])})
            }
            Signer::Ed25519(kp) => {
                json!({"kty": "OKP", "crv": "Ed25519", "kid": self.kid, "x": b(kp.public_key().as_ref())})
            }
            Signer::Rsa(kp, _, _) => {
                let c = signature::RsaPublicKeyComponents::<Vec<u8>>::from(kp.public());
                json!({"kty": "RSA", "kid": self.kid, "use": "sig", "n": b(&c.n), "e": b(&c.e)})
            }
        }
    }

    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.signer {
            Signer::Es256(kp) => kp.sign(&rng, msg).unwrap().as_ref().to_vec(),
            Signer::Ed25519(kp) => kp.sign(msg).as_ref().to_vec(),
            Signer::Rsa(kp, enc, _) => {
                let mut sig = vec![0; kp.public().modulus_len()];
                kp.sign(*enc, &rng, msg, &mut sig).unwrap();
                sig
            }
        }
    }

    /// A compact JWS of `claims` with this key's alg and kid.
    pub fn token(&self, claims: &Value) -> String {
        self.token_with_header(&json!({"alg": self.alg(), "kid": self.kid, "typ": "JWT"}), claims)
    }

    pub fn token_with_header(&self, header: &Value, claims: &Value) -> String {
        let input = format!("{}.{}", b64json(header), b64json(claims));
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(self.sign(input.as_bytes())))
    }
}

pub fn b64json(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

pub fn jwks(keys: &[&TestKey]) -> Value {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()})
}

pub fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Claims a good login has, issued now by `issuer` for [`CLIENT_ID`] with `nonce`.
pub fn claims(issuer: &str, nonce: &str) -> Value {
    let now = now();
    json!({"iss": issuer, "aud": CLIENT_ID, "sub": "sub-alice", "exp": now + 300, "iat": now,
           "nonce": nonce, "preferred_username": "alice", "email": "alice@example.com",
           "email_verified": true, "groups": ["eng", "ops"], "amr": ["pwd", "otp"]})
}

/// One request the provider received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn form(&self) -> Vec<(String, String)> {
        url::form_urlencoded::parse(self.body.as_bytes()).into_owned().collect()
    }
}

#[derive(Default)]
pub struct ProviderState {
    pub discovery: Value,
    pub jwks: Value,
    /// Answers of the token endpoint, in order (status, JSON); empty: 500.
    pub token_replies: VecDeque<(u16, Value)>,
    pub device_reply: Value,
    pub seen: Vec<Seen>,
}

/// A provider on 127.0.0.1: `issuer` is `http://127.0.0.1:PORT`.
pub struct FakeProvider {
    pub issuer: String,
    pub state: Arc<Mutex<ProviderState>>,
}

impl FakeProvider {
    pub fn start(keys: &[&TestKey]) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let issuer = format!("http://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let state = Arc::new(Mutex::new(ProviderState {
            discovery: json!({
                "issuer": issuer,
                "authorization_endpoint": format!("{issuer}/auth?tenant=t1"),
                "token_endpoint": format!("{issuer}/token"),
                "jwks_uri": format!("{issuer}/jwks"),
                "device_authorization_endpoint": format!("{issuer}/device"),
            }),
            jwks: jwks(keys),
            ..Default::default()
        }));
        let shared = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let _ = serve_one(conn, &shared);
            }
        });
        Self { issuer, state }
    }

    pub fn seen(&self, path: &str) -> Vec<Seen> {
        self.state.lock().unwrap().seen.iter().filter(|s| s.path == path).cloned().collect()
    }

    pub fn count(&self, path: &str) -> usize {
        self.seen(path).len()
    }

    pub fn push_token_reply(&self, status: u16, body: Value) {
        self.state.lock().unwrap().token_replies.push_back((status, body));
    }
}

fn serve_one(conn: std::net::TcpStream, state: &Mutex<ProviderState>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split(' ').nth(1).unwrap_or("").split('?').next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    let (status, reply) = {
        let mut s = state.lock().unwrap();
        s.seen.push(Seen { path: path.clone(), headers, body: String::from_utf8_lossy(&body).into() });
        match path.as_str() {
            "/.well-known/openid-configuration" => (200, s.discovery.to_string()),
            "/jwks" => (200, s.jwks.to_string()),
            "/device" => (200, s.device_reply.to_string()),
            "/token" => s.token_replies.pop_front().map(|(c, v)| (c, v.to_string())).unwrap_or((500, String::new())),
            _ => (404, String::new()),
        }
    };
    let mut conn = conn;
    let extra = if status == 302 { "Location: http://127.0.0.1:9/elsewhere\r\n" } else { "" };
    write!(
        conn,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{reply}",
        reply.len()
    )?;
    conn.flush()
}
