//! What a session does: the one list of actions that policies name and sessions carry.

/// One kind of session. Policies name these by [`Action::name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Shell,
    Exec,
    Sftp,
    PortForward,
    SshPassthrough,
    Rdp,
}

/// Every action a session can be, in the order `explain` lists them.
pub const SESSION_ACTIONS: &[Action] =
    &[Action::Shell, Action::Exec, Action::Sftp, Action::PortForward, Action::SshPassthrough, Action::Rdp];

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Shell => "shell",
            Action::Exec => "exec",
            Action::Sftp => "sftp",
            Action::PortForward => "port-forward",
            Action::SshPassthrough => "ssh-passthrough",
            Action::Rdp => "rdp",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        SESSION_ACTIONS.iter().copied().find(|a| a.name() == s)
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for a in SESSION_ACTIONS {
            assert_eq!(Action::parse(a.name()), Some(*a));
        }
        assert_eq!(Action::parse("root"), None);
    }
}
