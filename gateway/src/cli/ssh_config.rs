//! `postern ssh-config`: the `~/.ssh/config` Host blocks and the known_hosts line for plain
//! `ssh LOGIN@INSTANCE.<suffix>`, printed, or written where ssh reads them (`--install`).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use postern_core::command::SshConfig;

use super::user::GatewayArgs;
use crate::admin::{AdminRequest, request};

/// The file under `~/.ssh` that `--install` writes for the gateway with this suffix; every
/// such file is included by one `Include` line in `~/.ssh/config`.
const INSTALL_DIR: &str = "postern";

/// `postern ssh-config [--install] [-i KEY]...`, as a user through the gateway (`--gateway`)
/// or from the local admin socket (`socket`).
pub async fn run(
    socket: impl FnOnce() -> anyhow::Result<PathBuf>,
    gw: &GatewayArgs,
    known_hosts_file: &str,
    install: bool,
) -> anyhow::Result<i32> {
    let identity_files = identity_files(&gw.identity)?;
    let config: SshConfig = if gw.gateway.is_some() {
        let client = postern_client::Client::connect(&gw.options()?, None).await?;
        client.ssh_config(known_hosts_file).await?
    } else {
        let user = match &gw.user {
            Some(u) => u.clone(),
            None => super::user::local_user_name()?,
        };
        let req = AdminRequest::SshConfig { known_hosts_file: known_hosts_file.to_owned(), user };
        let (reply, _) = request(&socket()?, &req).await?;
        serde_json::from_value(reply.get("result").cloned().unwrap_or_default())
            .context("unexpected ssh-config reply from the gateway")?
    };
    if config.host.is_empty() || config.user.is_empty() {
        bail!("this gateway is too old to give the parts of its ssh config; upgrade it or use the printed config");
    }
    if !install {
        print!("{}", config.printed(known_hosts_file, &identity_files));
        return Ok(0);
    }
    let home = super::home::home_dir()?;
    let installed = install_config(&home, &config, known_hosts_file, &identity_files)?;
    println!(
        "Wrote the Host blocks for *.{suffix} to {blocks}\n\
         \x20 (included from {main}),\n\
         and the gateway's host CA line to {kh}.\n\
         Try: ssh LOGIN@INSTANCE.{suffix}   (you are {user} on the gateway; LOGIN is the OS account, see `postern ls`)",
        suffix = config.suffix,
        blocks = installed.blocks.display(),
        main = installed.main.display(),
        kh = installed.known_hosts.display(),
        user = config.user,
    );
    Ok(0)
}

/// `-i KEY` files as absolute paths (ssh reads the config from elsewhere); each must exist.
fn identity_files(given: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    given
        .iter()
        .map(|p| {
            if !p.is_file() {
                bail!("-i {}: no such key file", p.display());
            }
            let abs = std::path::absolute(p).with_context(|| format!("-i {}", p.display()))?;
            abs.to_str().map(str::to_owned).with_context(|| format!("-i {}: the path is not UTF-8", p.display()))
        })
        .collect()
}

/// Where `--install` wrote.
#[derive(Debug)]
pub struct Installed {
    pub main: PathBuf,
    pub blocks: PathBuf,
    pub known_hosts: PathBuf,
}

/// Write the Host blocks to `~/.ssh/postern/<suffix>.conf`, make sure `~/.ssh/config`
/// includes that directory's `*.conf` (one line, at the top, so that it applies to every
/// host), and put the host CA line in the known_hosts file (replacing an earlier line for
/// the same names). Running it again changes nothing.
pub fn install_config(
    home: &Path,
    config: &SshConfig,
    known_hosts_file: &str,
    identity_files: &[String],
) -> anyhow::Result<Installed> {
    let ssh_dir = home.join(".ssh");
    let dir = ssh_dir.join(INSTALL_DIR);
    create_private_dir(&ssh_dir)?;
    create_private_dir(&dir)?;
    let known_hosts = match known_hosts_file.strip_prefix("~/") {
        Some(rest) => home.join(rest),
        None => {
            std::path::absolute(known_hosts_file).with_context(|| format!("known hosts file {known_hosts_file}"))?
        }
    };
    let kh_text = known_hosts.to_str().context("the known hosts path is not UTF-8")?.to_owned();
    if !valid_name(&config.suffix) {
        bail!("the gateway's suffix {:?} is not a plain name", config.suffix);
    }
    let blocks = dir.join(format!("{}.conf", config.suffix));
    let text = format!(
        "# Written by `postern ssh-config --install`; it is rewritten the next time.\n{}",
        config.host_blocks(&kh_text, identity_files)
    );
    postern_tunnel::agent::write_private(&blocks, text.as_bytes())?;

    if let Some(parent) = known_hosts.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    let ours: Vec<&str> = config.known_hosts_line.split_whitespace().take(2).collect();
    let old = read_if_exists(&known_hosts)?;
    let mut lines: Vec<&str> =
        old.lines().filter(|l| l.split_whitespace().take(2).collect::<Vec<_>>() != ours).collect();
    lines.push(&config.known_hosts_line);
    postern_tunnel::agent::write_private(&known_hosts, format!("{}\n", lines.join("\n")).as_bytes())?;

    let main = ssh_dir.join("config");
    let include = format!("Include {}", dir.join("*.conf").to_str().context("the ~/.ssh path is not UTF-8")?);
    let existing = read_if_exists(&main)?;
    if !existing.lines().any(|l| l.trim() == include) {
        // At the top: an Include after a Host line would apply to that Host only.
        let text = format!("# Added by `postern ssh-config --install`\n{include}\n\n{existing}");
        if main.exists() {
            std::fs::write(&main, text).with_context(|| format!("writing {}", main.display()))?;
        } else {
            postern_tunnel::agent::write_private(&main, text.as_bytes())?;
        }
    }
    Ok(Installed { main, blocks, known_hosts })
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn read_if_exists(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sample() -> SshConfig {
        SshConfig {
            config: String::new(),
            user: "alice".into(),
            host: "127.0.0.1".into(),
            port: 2222,
            suffix: "postern".into(),
            known_hosts_line: "@cert-authority [127.0.0.1]:2222,*.postern ssh-ed25519 AAAAC3Nz postern-host-ca".into(),
        }
    }

    #[test]
    fn install_twice_writes_the_same_files_and_one_include_line() {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir(home.path().join(".ssh")).unwrap();
        std::fs::write(home.path().join(".ssh/config"), "Host old\n    User bob\n").unwrap();
        let c = sample();
        let keys = vec!["/k/my key".to_owned()];
        let first = install_config(home.path(), &c, "~/.ssh/postern_known_hosts", &keys).unwrap();
        let snapshot =
            |i: &Installed| [&i.main, &i.blocks, &i.known_hosts].map(|p| std::fs::read_to_string(p).unwrap());
        let before = snapshot(&first);
        let second = install_config(home.path(), &c, "~/.ssh/postern_known_hosts", &keys).unwrap();
        assert_eq!(before, snapshot(&second), "a second install changes nothing");
        let [main, blocks, kh] = before;
        assert_eq!(main.matches("Include ").count(), 1, "{main}");
        assert!(main.starts_with("# Added by") && main.ends_with("Host old\n    User bob\n"), "{main}");
        assert!(blocks.contains("ProxyJump alice@postern-gateway\n"), "{blocks}");
        assert!(blocks.contains("IdentityFile \"/k/my key\"\n    IdentitiesOnly yes\n"), "{blocks}");
        assert_eq!(kh, format!("{}\n", c.known_hosts_line));
        // A new host CA for the same names replaces the old line; other lines stay.
        std::fs::write(&first.known_hosts, format!("@cert-authority *.other ssh-ed25519 X\n{kh}")).unwrap();
        let rotated = SshConfig { known_hosts_line: c.known_hosts_line.replace("AAAAC3Nz", "AAAAnew"), ..c };
        install_config(home.path(), &rotated, "~/.ssh/postern_known_hosts", &keys).unwrap();
        let kh = std::fs::read_to_string(&first.known_hosts).unwrap();
        assert_eq!(kh, format!("@cert-authority *.other ssh-ed25519 X\n{}\n", rotated.known_hosts_line));
    }
}
