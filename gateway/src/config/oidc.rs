//! `[identity.oidc]`: the gateway as an OpenID Connect relying party (docs/sso.md). Checked
//! and the client secret read when the config is loaded, so a bad setting stops start-up
//! with a message naming the file and key rather than failing the first login.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

/// The settings of `[identity.oidc]`. `client_secret` is filled in by [`OidcConfig::prepare`]
/// (at load) from `client_secret_file` or `client_secret_env`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The provider's issuer URL: https, or http on a loopback host (tests).
    pub issuer: String,
    pub client_id: String,
    /// File whose first line (trimmed) is the client secret; not accessible to other users.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// ... or the environment variable holding it.
    #[serde(default)]
    pub client_secret_env: Option<String>,
    /// Scopes asked for; "openid" is always added.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// The ID-token claim that names the Postern user.
    #[serde(default = "default_user_claim")]
    pub user_claim: String,
    /// The claim carrying the user's groups (an array of strings, or one string).
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Non-empty: the `email` claim's domain must be one of these and `email_verified` true.
    #[serde(default)]
    pub allowed_domains: Vec<String>,
    /// A login without a second factor (see `mfa_amr`, `mfa_acr`) is refused.
    #[serde(default)]
    pub require_mfa: bool,
    /// `amr` values that mean a second factor was used (RFC 8176).
    #[serde(default = "default_mfa_amr")]
    pub mfa_amr: Vec<String>,
    /// `acr` values that count as a login with a second factor.
    #[serde(default)]
    pub mfa_acr: Vec<String>,
    /// Whether a first login may take over an existing Postern user of the same name that
    /// did not come from the identity provider.
    #[serde(default)]
    pub link_existing: bool,
    /// Claim value -> Postern group. When present, only mapped groups are kept.
    #[serde(default)]
    pub groups: Option<BTreeMap<String, String>>,
    /// The client secret, read at load; never printed.
    #[serde(skip)]
    pub client_secret: Option<ClientSecret>,
}

fn default_scopes() -> Vec<String> {
    ["openid", "email", "profile"].map(String::from).to_vec()
}

fn default_user_claim() -> String {
    "preferred_username".into()
}

fn default_groups_claim() -> String {
    "groups".into()
}

/// RFC 8176 authentication method references that involve a second factor.
pub fn default_mfa_amr() -> Vec<String> {
    ["mfa", "otp", "hwk", "swk", "sms", "fpt", "face", "pin", "sc"].map(String::from).to_vec()
}

/// The OIDC client secret. Its `Debug` hides it, so it cannot reach a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientSecret(String);

impl ClientSecret {
    pub fn new(secret: impl Into<String>) -> Self {
        Self(secret.into())
    }

    /// The secret itself, for the token request's `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientSecret(<hidden>)")
    }
}

/// Longest client secret file read (a secret is a line, not a document).
const MAX_SECRET_FILE: u64 = 64 * 1024;

impl OidcConfig {
    /// Settings for `issuer` and `client_id` with every other option at its default and the
    /// secret given directly (tests and tools; a config file goes through [`Self::prepare`]).
    pub fn new(issuer: &str, client_id: &str, secret: ClientSecret) -> Self {
        Self {
            issuer: issuer.into(),
            client_id: client_id.into(),
            client_secret_file: None,
            client_secret_env: None,
            scopes: default_scopes(),
            user_claim: default_user_claim(),
            groups_claim: default_groups_claim(),
            allowed_domains: Vec::new(),
            require_mfa: false,
            mfa_amr: default_mfa_amr(),
            mfa_acr: Vec::new(),
            link_existing: false,
            groups: None,
            client_secret: Some(secret),
        }
    }

    /// Check every setting and read the client secret; errors name `file` and the key.
    pub fn prepare(&mut self, file: &Path) -> anyhow::Result<()> {
        let at = |key: &str| format!("{}: [identity.oidc] {key}", file.display());
        self.check().map_err(|(key, why)| anyhow::anyhow!("{} {why}", at(key)))?;
        let secret = match (&self.client_secret_file, &self.client_secret_env) {
            (Some(_), Some(_)) => bail!("{}: set client_secret_file or client_secret_env, not both", at("")),
            (None, None) => bail!(
                "{} is missing: the gateway is a confidential client; set client_secret_file (or client_secret_env)",
                at("client_secret_file")
            ),
            (Some(p), None) => read_secret_file(p).with_context(|| at("client_secret_file"))?,
            (None, Some(var)) => match std::env::var(var) {
                Ok(s) if !s.trim().is_empty() => s.trim().to_string(),
                Ok(_) => bail!("{}: the environment variable {var} is empty", at("client_secret_env")),
                Err(_) => bail!("{}: the environment variable {var} is not set", at("client_secret_env")),
            },
        };
        self.client_secret = Some(ClientSecret(secret));
        Ok(())
    }

    /// The checks of [`Self::prepare`] that need no file: `Err((key, what is wrong))`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        check_provider_url(&self.issuer).map_err(|e| ("issuer", e))?;
        if self.client_id.trim().is_empty() {
            return Err(("client_id", "must not be empty".into()));
        }
        if let Some(s) = self.scopes.iter().find(|s| s.is_empty() || !s.chars().all(|c| c.is_ascii_graphic())) {
            return Err(("scopes", format!("{s:?} is not a scope (printable characters, no spaces)")));
        }
        for (key, claim) in [("user_claim", &self.user_claim), ("groups_claim", &self.groups_claim)] {
            if claim.trim().is_empty() {
                return Err((key, "must not be empty".into()));
            }
        }
        if let Some(d) = self.allowed_domains.iter().find(|d| !plausible_domain(d)) {
            return Err(("allowed_domains", format!("{d:?} is not a domain name (like \"example.com\")")));
        }
        if self.require_mfa && self.mfa_amr.is_empty() && self.mfa_acr.is_empty() {
            return Err((
                "require_mfa",
                "needs mfa_amr or mfa_acr values: with both empty no login could count as MFA".into(),
            ));
        }
        if let Some(map) = &self.groups
            && let Some((claim, group)) = map.iter().find(|(_, g)| !postern_core::util::valid_name(g))
        {
            return Err((
                "groups",
                format!(
                    "{claim:?} maps to {group:?}, not a valid group name (letters, digits, '-', '_', '.', at most 63)"
                ),
            ));
        }
        Ok(())
    }
}

fn plausible_domain(d: &str) -> bool {
    !d.is_empty() && d.len() <= 253 && d.chars().all(|c| c.is_ascii_alphanumeric() || "-.".contains(c))
}

/// The client secret file's first line, trimmed. The file must not be accessible to other
/// users, like the gateway's other key files (it lets anyone redeem codes as the gateway).
fn read_secret_file(path: &Path) -> anyhow::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mode = f.metadata().with_context(|| format!("reading {}", path.display()))?.permissions().mode();
    if mode & 0o007 != 0 {
        bail!(
            "{} is accessible to other users (mode {:o}): the client secret must be private; run `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    let mut text = String::new();
    f.take(MAX_SECRET_FILE)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {} (expected one line of text)", path.display()))?;
    let secret = text.lines().next().unwrap_or("").trim();
    if secret.is_empty() {
        bail!("{}: the first line is empty; it must hold the client secret", path.display());
    }
    Ok(secret.to_string())
}

/// The URL rule for the issuer and every endpoint the provider names: https, or plain http
/// to a loopback host (127.0.0.0/8, ::1, localhost) for tests; no credentials, no fragment.
pub fn check_provider_url(s: &str) -> Result<url::Url, String> {
    let u = url::Url::parse(s).map_err(|e| format!("{s:?} is not a URL ({e})"))?;
    if !u.username().is_empty() || u.password().is_some() || u.fragment().is_some() {
        return Err(format!("{s:?} may not hold a user name, password or #fragment"));
    }
    match u.scheme() {
        "https" if u.host().is_some() => Ok(u),
        "http" if is_loopback(&u) => Ok(u),
        "http" => Err(format!("{s:?} must use https (plain http only on a loopback host, for tests)")),
        _ => Err(format!("{s:?} must be an https:// URL")),
    }
}

/// Whether `u`'s host is this machine: 127.0.0.0/8, ::1 or `localhost`.
pub fn is_loopback(u: &url::Url) -> bool {
    match u.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn parse(extra: &str) -> OidcConfig {
        toml::from_str(&format!("issuer = \"https://idp.example.com/\"\nclient_id = \"postern\"\n{extra}")).unwrap()
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = parse("");
        assert_eq!(c.scopes, ["openid", "email", "profile"]);
        assert_eq!((c.user_claim.as_str(), c.groups_claim.as_str()), ("preferred_username", "groups"));
        assert_eq!(c.mfa_amr.len(), 9);
        assert!(c.allowed_domains.is_empty() && c.mfa_acr.is_empty() && c.groups.is_none());
        assert!(!c.require_mfa && !c.link_existing);
        let g = parse("[groups]\n\"eng@example.com\" = \"eng\"\n");
        assert_eq!(g.groups.unwrap().get("eng@example.com").map(String::as_str), Some("eng"));
        assert!(toml::from_str::<OidcConfig>("issuer = \"https://a\"\nclient_id = \"c\"\nscope = []").is_err());
    }

    #[test]
    fn issuer_and_endpoints_must_be_https_or_loopback_http() {
        for ok in [
            "https://idp.example.com/",
            "https://idp.example.com/realms/x",
            "http://127.0.0.1:5556/dex",
            "http://127.9.0.1/",
            "http://[::1]:8080",
            "http://localhost:3000",
        ] {
            assert!(check_provider_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://idp.example.com/",
            "http://10.0.0.1/",
            "ftp://idp",
            "idp.example.com",
            "https://u:p@idp.example.com/",
            "https://idp.example.com/#x",
            "http://localhost.evil.com/",
        ] {
            assert!(check_provider_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_settings_are_refused_naming_the_key() {
        let cases = [
            ("issuer = \"http://idp.example.com\"\nclient_id = \"c\"", "issuer"),
            ("issuer = \"https://idp\"\nclient_id = \" \"", "client_id"),
            ("issuer = \"https://idp\"\nclient_id = \"c\"\nscopes = [\"a b\"]", "scopes"),
            ("issuer = \"https://idp\"\nclient_id = \"c\"\nuser_claim = \"\"", "user_claim"),
            ("issuer = \"https://idp\"\nclient_id = \"c\"\nallowed_domains = [\"@x.com\"]", "allowed_domains"),
            ("issuer = \"https://idp\"\nclient_id = \"c\"\nrequire_mfa = true\nmfa_amr = []", "require_mfa"),
            ("issuer = \"https://idp\"\nclient_id = \"c\"\n[groups]\nx = \"no way\"", "groups"),
        ];
        for (text, key) in cases {
            let c: OidcConfig = toml::from_str(text).unwrap();
            assert_eq!(c.check().unwrap_err().0, key, "{text}");
        }
    }

    #[test]
    fn the_secret_comes_from_a_private_file_or_the_environment_and_is_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let cfg_file = dir.path().join("gateway.toml");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "  s3cr3t-value \nsecond line\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap();
        let mut c = parse(&format!("client_secret_file = {:?}", secret.display().to_string()));
        c.prepare(&cfg_file).unwrap();
        assert_eq!(c.client_secret.as_ref().unwrap().expose(), "s3cr3t-value");
        assert!(!format!("{c:?}").contains("s3cr3t"), "{c:?}");

        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = format!("{:#}", c.prepare(&cfg_file).unwrap_err());
        assert!(e.contains("client_secret_file") && e.contains("chmod 600") && e.contains("gateway.toml"), "{e}");
        assert!(!e.contains("s3cr3t"), "{e}");

        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&secret, "\n").unwrap();
        assert!(format!("{:#}", c.prepare(&cfg_file).unwrap_err()).contains("first line is empty"));

        let mut none = parse("");
        assert!(format!("{:#}", none.prepare(&cfg_file).unwrap_err()).contains("client_secret_file"));
        let mut both = parse("client_secret_file = \"/x\"\nclient_secret_env = \"Y\"");
        assert!(format!("{:#}", both.prepare(&cfg_file).unwrap_err()).contains("not both"));
        // Cargo sets CARGO_PKG_NAME for the tests it runs (setting a variable here is unsafe).
        let mut env = parse("client_secret_env = \"CARGO_PKG_NAME\"");
        env.prepare(&cfg_file).unwrap();
        assert_eq!(env.client_secret.unwrap().expose(), "postern-gateway");
        let mut env = parse("client_secret_env = \"POSTERN_TEST_OIDC_SECRET_UNSET_VARIABLE\"");
        let e = format!("{:#}", env.prepare(&cfg_file).unwrap_err());
        assert!(e.contains("POSTERN_TEST_OIDC_SECRET_UNSET_VARIABLE") && e.contains("not set"), "{e}");
    }
}
