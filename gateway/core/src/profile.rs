//! Shell profiles, as in AWS Session Manager: a shell, environment, working directory and
//! startup commands for interactive sessions, a run-as user, or a single command with
//! parameters that is all a session may run.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    /// Login shell for interactive sessions (default: the run-as user's shell).
    #[serde(default)]
    pub shell: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Directory sessions start in.
    #[serde(default)]
    pub workdir: Option<String>,
    /// Shell commands run at the start of interactive sessions.
    #[serde(default)]
    pub startup: Vec<String>,
    /// OS user the session runs as (overrides the user's `run_as`).
    #[serde(default)]
    pub run_as: Option<String>,
    /// Sessions may run as root only with this set (on the profile or the user).
    #[serde(default)]
    pub allow_root: bool,
    /// Interactive-command profile: the only command sessions may run, with `{name}`
    /// placeholders filled from `name=value` arguments the user gives as the ssh command.
    #[serde(default)]
    pub command: Option<String>,
    /// Parameter names `command` accepts.
    #[serde(default)]
    pub parameters: Vec<String>,
}

/// Quote for `sh`: the value comes out as one literal word.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn cd_prefix(p: &Profile) -> String {
    match &p.workdir {
        Some(d) => format!("cd {} || exit 1; ", quote(d)),
        None => String::new(),
    }
}

/// What an interactive shell runs under this profile; `None` means a plain login shell.
pub fn interactive_script(p: &Profile) -> Option<String> {
    if p.workdir.is_none() && p.startup.is_empty() && p.shell.is_none() {
        return None;
    }
    let mut script = cd_prefix(p);
    for line in &p.startup {
        script.push_str(line);
        script.push_str("; ");
    }
    match &p.shell {
        Some(sh) => script.push_str(&format!("exec {} -l", quote(sh))),
        None => script.push_str("exec \"$SHELL\" -l"),
    }
    Some(script)
}

/// A user's exec command under this profile (working directory applied).
pub fn wrap_command(p: &Profile, command: &str) -> String {
    format!("{}{command}", cd_prefix(p))
}

fn valid_value(v: &str) -> bool {
    !v.is_empty() && v.len() <= 256 && v.chars().all(|c| c.is_ascii_alphanumeric() || "._:/@%+,=-".contains(c))
}

/// Fill a command profile's template from `name=value` words. Values are limited to a safe
/// character set and quoted, so they can never become shell syntax.
pub fn render_command(p: &Profile, args: &str) -> Result<String, String> {
    let Some(template) = &p.command else { return Err("profile has no command".into()) };
    let mut values: BTreeMap<&str, &str> = BTreeMap::new();
    for word in args.split_whitespace() {
        let (k, v) = word.split_once('=').ok_or_else(|| format!("argument {word:?} must look like name=value"))?;
        if !p.parameters.iter().any(|n| n == k) {
            return Err(format!("unknown parameter {k:?}; this profile accepts: {}", p.parameters.join(", ")));
        }
        if !valid_value(v) {
            return Err(format!("value of {k} may only contain letters, digits and ._:/@%+,=-"));
        }
        values.insert(k, v);
    }
    let mut out = template.clone();
    for name in &p.parameters {
        let placeholder = format!("{{{name}}}");
        if out.contains(&placeholder) {
            let v = values.get(name.as_str()).ok_or_else(|| format!("missing parameter {name}=..."))?;
            out = out.replace(&placeholder, &quote(v));
        }
    }
    Ok(wrap_command(p, &out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts() {
        let p = Profile {
            name: "ops".into(),
            workdir: Some("/srv/app dir".into()),
            startup: vec!["echo hi".into()],
            ..Profile::default()
        };
        assert_eq!(interactive_script(&p).unwrap(), "cd '/srv/app dir' || exit 1; echo hi; exec \"$SHELL\" -l");
        assert_eq!(interactive_script(&Profile::default()), None);
        assert_eq!(wrap_command(&p, "ls"), "cd '/srv/app dir' || exit 1; ls");
        assert_eq!(quote("it's"), "'it'\\''s'");
    }

    #[test]
    fn command_profiles_only_take_safe_parameters() {
        let p = Profile {
            name: "logs".into(),
            command: Some("journalctl -u {unit} -n {lines}".into()),
            parameters: vec!["unit".into(), "lines".into()],
            ..Profile::default()
        };
        assert_eq!(render_command(&p, "unit=nginx lines=50").unwrap(), "journalctl -u 'nginx' -n '50'");
        assert!(render_command(&p, "unit=nginx").unwrap_err().contains("missing parameter lines"));
        assert!(render_command(&p, "unit=x;rm lines=1").is_err());
        assert!(render_command(&p, "unit=$(id) lines=1").is_err());
        assert!(render_command(&p, "other=1").unwrap_err().contains("unknown parameter"));
        assert!(render_command(&p, "rm -rf /").is_err());
    }
}
