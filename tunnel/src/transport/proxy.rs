//! Reaching the gateway's TCP port through an HTTP proxy with `CONNECT` (`HTTPS_PROXY`, or
//! `[agent] proxy` in the agent's configuration), optionally with basic authentication.
//! After the proxy's `200`, the connection is a plain byte pipe to the gateway: TLS runs end
//! to end through it, so the proxy sees neither the certificates' keys nor the sessions.

use std::io;
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest answer header from a proxy that is read.
const MAX_ANSWER: usize = 8 * 1024;

/// An HTTP proxy: where it is and the credentials to give it, if any.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// `host:port`.
    pub address: String,
    user: Option<(String, String)>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password is never shown.
        f.debug_struct("Proxy")
            .field("address", &self.address)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .finish()
    }
}

impl std::fmt::Display for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.user {
            Some((user, _)) => write!(f, "http://{user}:***@{}", self.address),
            None => write!(f, "http://{}", self.address),
        }
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next(), bytes.next()];
            let [Some(h), Some(l)] = hex else { return Err("bad %-escape".into()) };
            let text = [h, l];
            let hex = std::str::from_utf8(&text).map_err(|_| "bad %-escape")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| "bad %-escape")?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).map_err(|_| "credentials are not UTF-8".into())
}

impl Proxy {
    /// `http://[user[:password]@]host[:port]` (port 3128 by default; `https://` proxies,
    /// TLS to the proxy itself, are not supported).
    pub fn parse(url: &str) -> Result<Self, String> {
        let url = url.trim();
        let rest = if let Some(rest) = url.strip_prefix("http://") {
            rest
        } else if url.starts_with("https://") {
            let url = Self::redact(url);
            return Err(format!("proxy {url}: only http:// proxies are supported (CONNECT carries TLS already)"));
        } else if url.contains("://") {
            return Err(format!("proxy {}: only http:// proxies are supported", Self::redact(url)));
        } else {
            url
        };
        let rest = rest.trim_end_matches('/');
        let (user, host) = match rest.rsplit_once('@') {
            Some((creds, host)) => {
                let (u, p) = creds.split_once(':').unwrap_or((creds, ""));
                let decode = |s: &str| percent_decode(s).map_err(|e| format!("proxy credentials: {e}"));
                (Some((decode(u)?, decode(p)?)), host)
            }
            None => (None, rest),
        };
        if host.is_empty() || host.contains('/') {
            return Err(format!("proxy {}: expected http://[user:password@]host[:port]", Self::redact(url)));
        }
        let has_port = if let Some(v6) = host.strip_prefix('[') { v6.contains("]:") } else { host.contains(':') };
        let address = if has_port { host.to_owned() } else { format!("{host}:3128") };
        Ok(Self { address, user })
    }

    /// A URL with any password replaced, for error messages.
    fn redact(url: &str) -> String {
        match url.rsplit_once('@') {
            Some((creds, host)) => {
                let scheme_end = creds.find("://").map_or(0, |i| i + 3);
                let user = creds.get(scheme_end..).unwrap_or_default().split(':').next().unwrap_or_default();
                format!("{}{user}:***@{host}", creds.get(..scheme_end).unwrap_or_default())
            }
            None => url.to_owned(),
        }
    }

    /// The proxy from the environment, as curl reads it: `HTTPS_PROXY`, `https_proxy`, then
    /// `ALL_PROXY`/`all_proxy`. `NO_PROXY` is not read: the agent has one destination, and
    /// `[agent] proxy = "none"` turns an inherited variable off.
    pub fn from_env() -> Result<Option<Self>, String> {
        for var in ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"] {
            if let Ok(value) = std::env::var(var)
                && !value.trim().is_empty()
            {
                return Self::parse(&value).map(Some).map_err(|e| format!("{var}: {e}"));
            }
        }
        Ok(None)
    }

    /// A TCP connection to `target` (`host:port`) through this proxy, ready for TLS.
    pub async fn connect(&self, target: &str, timeout: Duration) -> io::Result<TcpStream> {
        tokio::time::timeout(timeout, self.tunnel(target))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("proxy {self} did not connect in time")))?
    }

    async fn tunnel(&self, target: &str) -> io::Result<TcpStream> {
        let mut tcp = TcpStream::connect(&self.address)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("connecting to proxy {self}: {e}")))?;
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some((user, password)) = &self.user {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            request.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
        }
        request.push_str("\r\n");
        tcp.write_all(request.as_bytes()).await?;
        // Read the answer's header one byte at a time, so that nothing after it (the
        // gateway's first TLS bytes) is taken from the stream.
        let mut answer = Vec::with_capacity(256);
        while !answer.ends_with(b"\r\n\r\n") {
            if answer.len() >= MAX_ANSWER {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("proxy {self}: answer too long")));
            }
            let b = tcp.read_u8().await.map_err(|e| {
                io::Error::new(e.kind(), format!("proxy {self} closed the connection before answering CONNECT"))
            })?;
            answer.push(b);
        }
        let text = String::from_utf8_lossy(&answer);
        let status_line = text.lines().next().unwrap_or_default();
        let code = status_line.split_whitespace().nth(1).unwrap_or_default();
        match code {
            "200" => Ok(tcp),
            // 407 is the standard answer; some proxies (tinyproxy) say 401.
            "407" | "401" => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "proxy {self} wants credentials ({code}): set them in the proxy URL, \
                     http://user:password@host:port{}",
                    if self.user.is_some() { " (the ones given were refused)" } else { "" }
                ),
            )),
            _ => Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("proxy {self} refused CONNECT {target}: {status_line}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Proxy;

    #[test]
    fn proxy_urls_parse_and_never_show_the_password() {
        let p = Proxy::parse("http://alice:s%40cret@proxy.example:8080/").unwrap();
        assert_eq!(p.address, "proxy.example:8080");
        assert_eq!(p.user, Some(("alice".into(), "s@cret".into())));
        assert!(!format!("{p} {p:?}").contains("cret"), "{p} {p:?}");
        assert_eq!(Proxy::parse("proxy.example").unwrap().address, "proxy.example:3128");
        assert_eq!(Proxy::parse("http://[::1]:3128").unwrap().address, "[::1]:3128");
        assert_eq!(Proxy::parse("http://[::1]").unwrap().address, "[::1]:3128");
        let e = Proxy::parse("https://bob:hunter2@proxy:443").unwrap_err();
        assert!(e.contains("only http://") && !e.contains("hunter2"), "{e}");
        let e = Proxy::parse("http://bob:hunter2@").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }
}
