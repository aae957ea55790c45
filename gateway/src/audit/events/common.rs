//! Types several events share (a separate file so the event files need not import `mod.rs`).

use serde::{Deserialize, Serialize};

/// `kind` and `action` are [`postern_core::Action`]s, written by [`postern_core::Action::name`].
pub(super) mod action_name {
    use postern_core::Action;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(a: &Action, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(a.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Action, D::Error> {
        let s = String::deserialize(d)?;
        Action::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("unknown action {s:?}")))
    }
}

/// Which way into RDP a session came: the gateway's RDP port, or `ssh -L` to `@rdp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RdpMode {
    Gateway,
    Local,
}

/// What an RDP client's connection request said (present once it has been read).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RdpRequest {
    /// `mstshash` cookie, usually the user name typed into the client.
    pub cookie: Option<String>,
    /// Security protocols asked for ("tls", "credssp", ...).
    pub protocols: Vec<String>,
}
