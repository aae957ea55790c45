//! What can go wrong talking to a gateway, as variants a program can act on. Every message
//! says what failed and, where there is one, what to do next; the underlying I/O or SSH
//! error is the [`source`](std::error::Error::source), not part of the message.

use std::path::PathBuf;
use std::time::Duration;

/// An error of the client SDK.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The gateway address is not `host`, `host:port`, `[v6]:port` or a bare IPv6 address.
    #[error("invalid gateway address {address:?}: {problem}")]
    InvalidAddress { address: String, problem: String },

    /// No TCP connection to the gateway's SSH port.
    #[error("connecting to the gateway {address} (is it running, and is this its SSH port?)")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },

    /// Connected, but the SSH handshake failed (or the gateway closed the connection).
    #[error("the SSH handshake with the gateway {address} failed")]
    Handshake {
        address: String,
        #[source]
        source: russh::Error,
    },

    /// Connecting, key exchange and authentication took longer than the bound.
    #[error("connecting to the gateway {address} timed out (no answer within {}s)", after.as_secs())]
    ConnectTimeout { address: String, after: Duration },

    /// A gateway command got no complete answer within the bound.
    #[error("the gateway did not answer {command:?} in time ({}s)", after.as_secs())]
    CommandTimeout { command: String, after: Duration },

    /// The gateway's host key or host certificate does not verify against the known_hosts
    /// files read.
    #[error(
        "the gateway {address} is not trusted: {reason}. Put the `@cert-authority` line from \
         `postern ssh-config` in ~/.ssh/postern_known_hosts (or pass --known-hosts FILE); \
         known_hosts files read: {}",
        describe(files)
    )]
    HostKeyNotTrusted { address: String, reason: String, files: Vec<PathBuf> },

    /// Nothing to offer: no ssh-agent key and no key file found.
    #[error(
        "no SSH key to offer for user {user:?} (tried {tried}): load your key into ssh-agent \
         or pass it with -i FILE"
    )]
    NoIdentity { user: String, tried: String },

    /// A key file named explicitly could not be read or decrypted.
    #[error("cannot use {}: {error} (a key with a passphrase must be loaded into ssh-agent)", path.display())]
    UnusableKey { path: PathBuf, error: russh::keys::Error },

    /// Keys were offered and none was accepted.
    #[error(
        "the gateway did not accept any of your SSH keys for user {user:?} (tried {tried}); \
         is your key registered (`postern user key add`)?"
    )]
    AuthenticationRefused { user: String, tried: String },

    /// The gateway does not offer sign-in through an identity provider.
    #[error(
        "the gateway at {address} does not offer sign-in with an identity provider ([identity.oidc] is not \
         configured there); ask its administrator, or use an SSH key registered with `postern user key add`"
    )]
    SignInUnavailable { address: String },

    /// The gateway refused a command: `message` is what it printed (without its `postern: `
    /// prefix), e.g. `access denied (or no such instance)`.
    #[error("{message}")]
    CommandRefused { command: String, message: String, exit_status: Option<u32> },

    /// The answer to a command was larger than the bound on replies.
    #[error("the gateway's answer to {command:?} is larger than {} MiB", limit >> 20)]
    ReplyTooLarge { command: String, limit: usize },

    /// The answer to a command was not JSON.
    #[error("the gateway's answer to {command:?} is not JSON (is this a Postern gateway?)")]
    NotJson {
        command: String,
        #[source]
        source: serde_json::Error,
    },

    /// The answer was JSON, but not the shape the contract says.
    #[error("unexpected answer to {command} (is the gateway a different Postern version?)")]
    UnexpectedReply {
        command: String,
        #[source]
        source: serde_json::Error,
    },

    /// Opening or using an SSH channel failed (`what` says which step).
    #[error("{what}")]
    Channel {
        what: String,
        #[source]
        source: russh::Error,
    },

    /// The gateway refused a session (shell, exec) on the instance: access denied, unknown
    /// or offline instance, ...; `message` is the gateway's reason.
    #[error("{message}")]
    SessionRefused { message: String },

    /// The gateway refused a TCP forward (policy `forward_to`, or the agent's `tcp_allow`);
    /// `reason` is the gateway's text, when it gave one.
    #[error("the gateway refused a forward to {host}:{port}{}", because(reason))]
    ForwardRefused {
        host: String,
        port: u16,
        reason: Option<Box<str>>,
        #[source]
        source: Box<russh::Error>,
    },

    /// The gateway refused RDP to the instance (policy, or the instance has no RDP server).
    #[error("the gateway refused RDP to this instance{}", because(reason))]
    RdpRefused {
        reason: Option<Box<str>>,
        #[source]
        source: Box<russh::Error>,
    },

    /// A local forward could not listen on its address.
    #[error("listening on {address}")]
    Listen {
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

fn because(reason: &Option<Box<str>>) -> String {
    reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default()
}

pub(crate) fn describe(files: &[PathBuf]) -> String {
    if files.is_empty() {
        return "none".to_owned();
    }
    files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// An error with its sources, `outer: inner: innermost` (as `anyhow` prints `{:#}`), for
/// one-line reports such as a fleet outcome's `error`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_lists_sources() {
        let e = ClientError::Connect {
            address: "gw:2222".into(),
            source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"),
        };
        assert_eq!(
            error_chain(&e),
            "connecting to the gateway gw:2222 (is it running, and is this its SSH port?): refused"
        );
    }

    #[test]
    fn untrusted_gateway_says_what_to_do() {
        let e = ClientError::HostKeyNotTrusted {
            address: "gw:2222".into(),
            reason: "no @cert-authority entry for it".into(),
            files: vec![PathBuf::from("/h/.ssh/known_hosts")],
        };
        let text = e.to_string();
        assert!(text.starts_with("the gateway gw:2222 is not trusted: no @cert-authority"), "{text}");
        assert!(text.contains("postern ssh-config") && text.contains("/h/.ssh/known_hosts"), "{text}");
    }
}
