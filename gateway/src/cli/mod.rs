//! The `postern` command: gateway server, quickstart and admin commands.
//!
//! (Over 600 lines, on purpose: the clap definitions of every subcommand stay in one place,
//! so `--help`, completions and the consistency test see one tree; the printing lives in
//! the submodules.)

pub mod cluster;
pub mod doctor;
pub mod format;
pub mod history;
pub mod home;
pub mod login;
pub mod manage;
pub mod rdp;
pub mod session;
pub mod ssh_config;
pub mod user;
pub mod verify;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::admin::{AdminRequest, SessionSpec, request};
use crate::app::admin_socket_path;
use crate::config::{GatewayConfig, default_data_dir, parse_duration};
use crate::instances::InstanceRow;
use crate::services::Services;
use crate::store::Labels;
use format::{ago, table};

#[derive(Parser)]
#[command(
    name = "postern",
    version,
    about = "Postern: a self-hosted session manager. Servers dial out; people use ssh and RDP as usual.",
    after_help = "Examples:\n  postern quickstart                      gateway + local agent on this machine\n  postern gateway --config gateway.toml   run the gateway\n  postern token create --labels env=dev,role=web --ttl 15m\n  postern instances\n  postern exec web-01 -- uname -a\n  postern shell web-01\n  postern user add alice --group ops --key-file alice.pub\n  postern policy apply ops.toml\n  postern explain --user alice --target web-01 --action shell\n  postern rdp win-01 --gateway gw.example.com   RDP through the gateway (see docs/rdp.md)\n\nAs a user, through a gateway (set POSTERN_GATEWAY=gw.example.com:2222 or pass --gateway):\n  postern ls --labels env=prod\n  postern exec web-01 -- systemctl status nginx\n  postern shell web-01 --profile deploy\n  postern forward web-01 8080:80\n  postern run --targets env=prod --max-concurrency 10% --max-errors 2 -- 'apt-get -y upgrade'"
)]
pub struct Cli {
    /// Gateway configuration file (TOML). All settings have defaults.
    #[arg(long, global = true, env = "POSTERN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (database, CA, audit log, admin socket); overrides the config file.
    #[arg(long, global = true, env = "POSTERN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log filter for server commands (error, warn, info, debug, trace or a directive).
    #[arg(long, global = true, env = "POSTERN_LOG", default_value = "info")]
    pub log: String,
    /// Log as JSON lines.
    #[arg(long, global = true)]
    pub log_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// What a command talks to, which decides the global options its help shows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// The gateway process itself (`gateway`, `quickstart`): every global option.
    Server,
    /// The local gateway's admin socket and files: `--config` and `--data-dir` find them.
    Local,
    /// A gateway's SSH door as a user, or the local admin socket without `--gateway`.
    Either,
    /// A gateway's SSH door as a user (or nothing at all): no gateway-side option applies.
    User,
}

impl Reach {
    fn of(command: &str) -> Reach {
        match command {
            "gateway" | "quickstart" => Reach::Server,
            "exec" | "shell" | "ssh-config" => Reach::Either,
            "ls" | "forward" | "run" | "rdp" | "completions" | "login" | "logout" | "whoami" | "web-login" => {
                Reach::User
            }
            _ => Reach::Local,
        }
    }
}

/// The heading `exec`, `shell` and `ssh-config` show `--config` and `--data-dir` under.
pub const LOCAL_GATEWAY_HEADING: &str = "On the gateway host, without --gateway";

/// The `postern` command line, each command's help showing only the global options that do
/// something there: `--config` and `--data-dir` locate the local gateway (its files and admin
/// socket), so user commands, which talk to a gateway's SSH door, hide them, and `exec`,
/// `shell` and `ssh-config` show them under [`LOCAL_GATEWAY_HEADING`]; `--log` and
/// `--log-json` are the server's logging, shown by `gateway` and `quickstart`. Hidden options
/// are still accepted wherever they were (`postern --data-dir D ls` keeps working). The
/// clap derive cannot scope a global option, so the built command is adjusted in place
/// (`mut_args`/`mut_subcommands` keep the order clap indexed it in).
pub fn command() -> clap::Command {
    fn scope(cmd: clap::Command, reach: Reach) -> clap::Command {
        cmd.mut_args(|a| match a.get_id().as_str() {
            "config" | "data_dir" if reach == Reach::User => a.hide(true),
            "config" | "data_dir" if reach == Reach::Either => a.help_heading(LOCAL_GATEWAY_HEADING),
            "log" | "log_json" if reach != Reach::Server => a.hide(true),
            _ => a,
        })
        .mut_subcommands(|sub| scope(sub, reach))
    }
    let mut cmd = <Cli as clap::CommandFactory>::command();
    // Propagates the global options into every subcommand, where they can then be adjusted.
    cmd.build();
    cmd.mut_subcommands(|sub| {
        let reach = Reach::of(sub.get_name());
        scope(sub, reach)
    })
}

/// Parse the process's arguments with [`command`] (exits with clap's message on bad usage).
pub fn parse() -> Cli {
    let mut matches = command().get_matches();
    <Cli as clap::FromArgMatches>::from_arg_matches_mut(&mut matches)
        .unwrap_or_else(|e| e.format(&mut command()).exit())
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the gateway (agent tunnel listener and admin socket) until Ctrl-C.
    #[command(
        after_help = "It prints every address it listens on when it starts; gateway.toml is described in the README.\n\nExamples:\n  postern gateway                                every setting at its default\n  postern gateway --config /etc/postern/gateway.toml\n  postern gateway --listen 0.0.0.0:4433 --log debug"
    )]
    Gateway {
        /// UDP address for agents, overriding the config file (e.g. 0.0.0.0:4433).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Start a gateway and enroll a local agent for this machine, ready to use. Listens on
    /// loopback unless the command line or the --config file says otherwise.
    #[command(
        after_help = "Examples:\n  postern quickstart                             gateway and local agent, on loopback\n  postern quickstart --config gateway.toml      listen addresses (and the RDP door) from the file\n  postern quickstart --ssh-listen 0.0.0.0:2222  the SSH door reachable from other machines\n  postern quickstart --web-listen off            no web console"
    )]
    Quickstart {
        /// UDP address for agents (default: [tunnel] listen from --config, else 127.0.0.1:4433).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// TCP address of the SSH front door (default: [ssh] listen from --config, else
        /// 127.0.0.1:2222).
        #[arg(long)]
        ssh_listen: Option<std::net::SocketAddr>,
        /// TCP address of the web console (HTTPS), or `off` (default: [web] listen from
        /// --config, else 127.0.0.1:8443; on unless the file sets [web] enabled = false).
        #[arg(long, value_name = "ADDR|off", value_parser = parse_web_listen)]
        web_listen: Option<WebListen>,
    },
    /// Enrollment tokens for new agents.
    #[command(after_help = "Examples:\n  postern token create --labels env=dev,role=web --ttl 15m --name web-01")]
    Token {
        #[command(subcommand)]
        action: TokenAction,
    },
    /// List enrolled instances (agents), or revoke one.
    Instances(InstancesArgs),
    /// Make the running gateway read its config file (the --config it was started with)
    /// again, as SIGHUP does. Users, profiles, user CAs and limits of [ssh], [audit] webhooks
    /// and log_level take effect at once, without dropping sessions; live sessions are
    /// re-checked against them (one whose user lost access ends, as does one older than a
    /// lowered max_session). Other changed keys are listed as needing a restart. An invalid
    /// file changes nothing: the error (file, line) is printed and the exit status is non-zero.
    #[command(
        after_help = "Examples:\n  postern --config /etc/postern/gateway.toml reload\n  postern --data-dir /var/lib/postern reload\n  systemctl reload postern      (a unit whose ExecReload sends SIGHUP)\n\nThe keys that change live and those that need a restart: docs/operations.md, \"Reload\"."
    )]
    Reload,
    /// Check this gateway's installation and print what to fix: the config file loads,
    /// data directory and key permissions, each listen port free (or held by the running
    /// gateway), certificate expiry, disk space for recordings, the store and S3 reachable,
    /// /readyz. Changes nothing; each check is bounded in time. Exit status 0 when no check
    /// fails (warnings do not fail), 1 when one does.
    #[command(
        after_help = "Examples:\n  postern --config /etc/postern/gateway.toml doctor\n  postern doctor --json | jq '.checks[] | select(.status != \"ok\")'\n  sudo -u postern postern --config /etc/postern/gateway.toml doctor   as the gateway's user\n\nEvery check, what it means and how to fix it: docs/operations.md, \"Doctor\"."
    )]
    Doctor {
        /// Print JSON: {"status": "ok"|"warn"|"fail", "checks": [{"name", "status", "detail", "fix"}]}.
        #[arg(long)]
        json: bool,
    },
    /// Run a command on an instance; exits with the command's status. With --gateway (or
    /// POSTERN_GATEWAY) as you through the gateway's SSH door, else via the local admin socket.
    #[command(
        after_help = "Examples:\n  postern exec web-01 -- uname -a                          through the local admin socket\n  postern exec web-01 -- 'df -h /; exit 3'                 exits 3; stdout and stderr kept apart\n  tar c dir | postern exec web-01 -- tar x -C /tmp         stdin is piped\n  postern exec --gateway gw.example.com web-01 -- uptime   as you, through the SSH door"
    )]
    Exec {
        #[command(flatten)]
        gateway: user::GatewayArgs,
        /// Instance name or id.
        instance: String,
        /// Command and arguments (run by the remote user's shell, as with ssh).
        #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// RDP to an instance: a single-use routing token for the gateway's RDP port (FreeRDP
    /// command line, .rdp file for mstsc), or a local port forward with --local.
    Rdp(rdp::RdpArgs),
    /// The ~/.ssh/config Host blocks and the known_hosts line for `ssh LOGIN@INSTANCE.<suffix>`
    /// (from the local admin socket, or as a user with --gateway): printed, or written with
    /// --install. The gateway hop logs in as your Postern user (--user, default your local
    /// account name); with -i KEY both hops use that key only.
    #[command(
        after_help = "Examples:\n  postern ssh-config --install                 on the gateway host; then: ssh LOGIN@web-01.postern\n  postern ssh-config --gateway gw.example.com --install -i ~/.ssh/id_ed25519\n  postern ssh-config > postern.conf          just print it"
    )]
    SshConfig {
        #[command(flatten)]
        gateway: user::GatewayArgs,
        /// File the config points at for the gateway's host CA line.
        #[arg(long, default_value = "~/.ssh/postern_known_hosts")]
        known_hosts_file: String,
        /// Write the Host blocks to ~/.ssh/postern/<suffix>.conf (included from ~/.ssh/config)
        /// and the host CA line to the known hosts file, instead of printing them. Idempotent.
        #[arg(long)]
        install: bool,
    },
    /// Users: add, remove, list, disable, keys and groups.
    #[command(
        after_help = "Examples:\n  postern user add alice --group ops --key-file alice.pub\n  postern user list\n  postern user key add alice --file alice-laptop.pub\n  postern user disable alice                   her live sessions end"
    )]
    User {
        #[command(subcommand)]
        action: manage::UserAction,
    },
    /// Groups and their members.
    #[command(
        after_help = "Examples:\n  postern group list\n  postern user groups alice ops,oncall         (members are set on the user)"
    )]
    Group {
        #[command(subcommand)]
        action: manage::GroupAction,
    },
    /// Policy documents: apply, check, list, show, history, diff, rm.
    #[command(
        after_help = "Examples:\n  postern policy check ops.toml\n  postern policy apply ops.toml                (the document: docs/policy.md)\n  postern policy list\n  postern policy diff ops"
    )]
    Policy {
        #[command(subcommand)]
        action: manage::PolicyAction,
    },
    /// Grant a user a policy for a limited time.
    #[command(after_help = "Examples:\n  postern grant --user bob --policy oncall-prod --for 8h --reason \"INC-4711\"")]
    Grant {
        #[arg(long)]
        user: String,
        /// Policy name (see `postern policy list`).
        #[arg(long)]
        policy: String,
        /// How long (90s, 15m, 8h, 7d).
        #[arg(long = "for")]
        duration: String,
        /// Why; recorded in the audit log.
        #[arg(long)]
        reason: String,
        #[arg(long)]
        json: bool,
    },
    /// List grants (active ones; --all includes expired and revoked).
    #[command(after_help = "Examples:\n  postern grants\n  postern grants --all --json")]
    Grants {
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Revoke grants by id, or all active grants of --user (optionally only of --policy).
    /// Live sessions that lose access end within seconds.
    #[command(
        after_help = "Examples:\n  postern revoke --user carol                  every active grant of carol\n  postern revoke --user carol --policy oncall\n  postern revoke gr-3f9c2a71b0de               one grant, by its id (postern grants)"
    )]
    Revoke {
        id: Option<String>,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        policy: Option<String>,
    },
    /// Would this be allowed, and which statements decide? Exits 0 for allow, 1 for deny.
    #[command(
        after_help = "Examples:\n  postern explain --user alice --target web-01 --action shell\n  postern explain --user alice --target web-01 --action shell --at 2026-12-24T22:00:00Z\n  postern explain --user alice --target db-01 --action shell --mfa      as after a login with MFA"
    )]
    Explain {
        #[arg(long)]
        user: String,
        /// Instance name or id.
        #[arg(long)]
        target: String,
        /// shell, exec, sftp, port-forward, ssh-passthrough.
        #[arg(long)]
        action: String,
        /// Evaluate at this time (RFC 3339; default now).
        #[arg(long)]
        at: Option<String>,
        /// Source address of the user.
        #[arg(long)]
        from: Option<std::net::IpAddr>,
        /// Forward destination HOST:PORT (port-forward).
        #[arg(long)]
        to: Option<String>,
        /// As for a session whose login used a second factor (`postern login` with MFA):
        /// statements with `require_mfa` apply.
        #[arg(long)]
        mfa: bool,
        #[arg(long)]
        json: bool,
    },
    /// Active sessions (--all: also recently ended ones), or terminate one.
    Sessions(SessionsArgs),
    /// Play a recorded session in this terminal (from the data directory, or from [audit.s3]
    /// once retention deleted the local copy), between a header (who, where, when, what) and
    /// its exit status, both on standard error.
    #[command(
        after_help = "Examples:\n  postern replay 5b0e6f3c --speed 2      a unique prefix of the id will do\n  postern replay 5b0e6f3c --raw | asciinema play -\n  (session ids: `postern sessions --all`; sessions without a recording say why)"
    )]
    Replay {
        /// Session id (or a unique prefix of one), or the path of a .cast or .cast.sealed file.
        session: String,
        /// Playback speed factor.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Shorten pauses to at most this many seconds (0 keeps them).
        #[arg(long, alias = "max-wait", default_value_t = 2.0)]
        idle_limit: f64,
        /// Print the recording itself (asciicast v2, decrypted) and nothing else, instead of
        /// playing it: for piping, e.g. to `asciinema play -`.
        #[arg(long)]
        raw: bool,
        /// Master key file for a sealed recording (default: [audit.encryption]).
        #[arg(long)]
        master_key: Vec<PathBuf>,
    },
    /// A cluster of gateways on one store: make the keys they share (docs/scale-out.md).
    #[command(after_help = "Examples:\n  postern cluster init --config gateway.toml")]
    Cluster {
        #[command(subcommand)]
        action: cluster::ClusterAction,
    },
    /// The audit log: verify, read, and manage its encryption key.
    #[command(
        after_help = "Examples:\n  postern audit verify\n  postern audit cat | jq -c 'select(.event == \"session.start\")'\n  postern audit keygen /etc/postern/audit-master.key"
    )]
    Audit {
        #[command(subcommand)]
        action: AuditAction,
    },
    /// Open an interactive shell on an instance (PTY).
    #[command(
        after_help = "Examples:\n  postern shell web-01           through the local admin socket\n  postern shell web-01 -c htop   a command on the PTY instead of a login shell\n  postern shell --gateway gw.example.com web-01 --profile deploy"
    )]
    Shell {
        #[command(flatten)]
        gateway: user::GatewayArgs,
        /// Instance name or id.
        instance: String,
        /// Run this command on the PTY instead of a login shell.
        #[arg(long, short = 'c')]
        command: Option<String>,
        /// Shell profile (one you are allowed; with --gateway).
        #[arg(long)]
        profile: Option<String>,
    },
    /// Sign in with your company's identity provider (single sign-on): get a short-lived SSH
    /// certificate for a new key, kept in ~/.ssh/postern/ and used by `postern`, `ssh
    /// INSTANCE.<suffix>` (the ssh config is installed), scp and sftp until it expires.
    #[command(after_help = "Examples:
  postern login --gateway gw.example.com           opens your browser
  postern login --gateway gw.example.com --device   no browser here: a code to enter elsewhere
  postern login --gateway gw.example.com --no-browser   print the address instead of opening it

The gateway's host key must be trusted first (its @cert-authority line in
~/.ssh/postern_known_hosts or ~/.ssh/known_hosts, from your administrator).")]
    Login(login::LoginArgs),
    /// A one-time link that signs a browser in to the gateway's web console as you (printed;
    /// open it within two minutes, it works once).
    #[command(
        after_help = "Examples:\n  postern web-login --gateway gw.example.com\n  xdg-open \"$(postern web-login)\""
    )]
    WebLogin {
        #[command(flatten)]
        gateway: user::GatewayArgs,
    },
    /// Sign out: revoke your sign-in certificate at the gateway and remove it and its key.
    #[command(after_help = "Examples:
  postern logout --gateway gw.example.com")]
    Logout {
        #[command(flatten)]
        gateway: user::GatewayArgs,
    },
    /// Who the gateway says you are: user, groups, and the certificate you signed in with.
    #[command(after_help = "Examples:
  postern whoami --gateway gw.example.com
  postern whoami --json")]
    Whoami {
        #[command(flatten)]
        gateway: user::GatewayArgs,
        #[arg(long)]
        json: bool,
    },
    /// The instances you may reach through the gateway (as a user, over SSH).
    #[command(
        after_help = "Examples:\n  postern ls --gateway gw.example.com:2222\n  postern ls --labels env=prod,role!=db\n  postern ls --json | jq -r '.[] | select(.online) | .name'"
    )]
    Ls {
        #[command(flatten)]
        gateway: user::GatewayArgs,
        /// Only instances matching this label selector (`env=prod,role!=db`).
        #[arg(long)]
        labels: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Forward local ports through an instance: `8080:80` (the instance itself) or
    /// `5432:db.internal:5432` (a host the instance can reach). Runs until Ctrl-C.
    #[command(
        after_help = "Examples:\n  postern forward web-01 8080:80\n  postern forward db-01 5432:db.internal:5432 --bind 0.0.0.0"
    )]
    Forward {
        #[command(flatten)]
        gateway: user::GatewayArgs,
        /// Instance name.
        instance: String,
        /// LOCAL_PORT:PORT or LOCAL_PORT:HOST:PORT (repeatable).
        #[arg(required = true)]
        specs: Vec<user::ForwardSpec>,
        /// Address the local ports listen on.
        #[arg(long, default_value = "127.0.0.1")]
        bind: std::net::IpAddr,
    },
    /// Run a command on every matching instance you may exec on, with a concurrency limit
    /// and an error budget; output saved per instance, a summary at the end.
    Run(user::RunArgs),
    /// Print a shell completion script.
    #[command(
        after_help = "Examples:\n  postern completions bash > /etc/bash_completion.d/postern\n  postern completions zsh > ~/.zfunc/_postern\n  postern completions fish > ~/.config/fish/completions/postern.fish"
    )]
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
pub enum TokenAction {
    /// Create a single-use enrollment token and print the join command.
    #[command(
        after_help = "Examples:\n  postern token create --labels env=dev,role=web --ttl 15m --name web-01\n  postern token create --labels env=prod --json"
    )]
    Create {
        /// Labels for the agent, e.g. env=dev,role=web.
        #[arg(long, value_delimiter = ',')]
        labels: Vec<String>,
        /// How long the token stays valid (90s, 15m, 8h; at most 7d).
        #[arg(long, default_value = "15m")]
        ttl: String,
        /// Instance name (default: the agent's hostname).
        #[arg(long)]
        name: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List enrollment tokens (never their secrets): id, name, labels, expiry, state
    /// (unused, used, expired, revoked) and the agent each enrolled.
    #[command(
        after_help = "Examples:\n  postern token list\n  postern token list --json | jq '.[] | select(.state == \"unused\")'"
    )]
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make an unused token unusable (id from `postern token list`, or the audit log's token_id).
    #[command(after_help = "Examples:\n  postern token revoke 3f9c2a71d0e4   (an id from postern token list)")]
    Revoke { id: String },
}

#[derive(Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  postern instances\n  postern instances --json | jq -r '.[] | select(.online) | .name'\n  postern instances revoke web-01"
)]
pub struct InstancesArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub action: Option<InstancesAction>,
}

#[derive(Subcommand)]
pub enum AuditAction {
    /// Check that no event was modified, deleted, inserted or reordered, and (with the data
    /// directory) that the log reaches the last checkpoint recorded in the gateway's database.
    /// Works offline on the files; exits 0 when intact, 1 with the first broken line(s) otherwise.
    #[command(
        after_help = "Examples:\n  postern audit verify\n  postern --config gateway.toml audit verify --bucket\n  postern audit verify --key copy/audit-signing.pub --file copy/events-000000000001.jsonl \\\n      --file copy/events-000000004711.jsonl"
    )]
    Verify {
        /// Segment files, oldest first (default: every segment in DATA_DIR/audit).
        #[arg(long)]
        file: Vec<PathBuf>,
        /// Public key file of the checkpoint signer (default: DATA_DIR/audit-signing.pub).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Master key file for sealed segments (default: [audit.encryption]).
        #[arg(long)]
        master_key: Vec<PathBuf>,
        /// Print the full report as JSON.
        #[arg(long)]
        json: bool,
        /// Verify the copies in [audit.s3] instead of the local files: every gateway's chain
        /// found there (each cluster gateway's, with the checkpoint key and anchor it recorded
        /// in the database), one report per gateway.
        #[arg(long, conflicts_with = "file")]
        bucket: bool,
    },
    /// Print events as JSON lines (decrypting sealed segments), oldest first: `| jq`.
    #[command(
        after_help = "Examples:\n  postern audit cat | jq -c 'select(.user == \"alice\")'\n  postern audit cat --file copy/events-000000000001.jsonl --master-key audit-master.key"
    )]
    Cat {
        /// Segment files, oldest first (default: every segment in DATA_DIR/audit).
        #[arg(long)]
        file: Vec<PathBuf>,
        /// Master key file for sealed segments (default: [audit.encryption]).
        #[arg(long)]
        master_key: Vec<PathBuf>,
    },
    /// Create a master key file for encryption at rest (64 hex digits, mode 0600). Set it
    /// as [audit.encryption] key_file; keep a copy offline: without it, sealed recordings
    /// and logs cannot be read.
    #[command(after_help = "Examples:\n  postern audit keygen /etc/postern/audit-master.key")]
    Keygen {
        /// Where to write the key; an existing file is never overwritten.
        file: PathBuf,
    },
}

/// The keys for reading sealed files: the config's [audit.encryption] and `extra` key files.
fn read_keyring(cfg: &GatewayConfig, extra: &[PathBuf]) -> anyhow::Result<crate::audit::seal::Keyring> {
    use crate::audit::seal::{FileKey, KeyProvider, Keyring};
    let mut keys: Vec<std::sync::Arc<dyn KeyProvider>> = Vec::new();
    for f in extra {
        keys.push(std::sync::Arc::new(FileKey::load(f)?));
    }
    let configured = cfg.audit.encryption.keyring()?;
    Ok(Keyring::new(keys).merged(&configured))
}

fn warn_ending(path: &Path, ending: Option<crate::audit::seal::Ending>) {
    use crate::audit::seal::Ending;
    match ending {
        Some(Ending::Unfinished) => eprintln!(
            "postern: {} ends without its final record: the session is still running, the gateway stopped \
             before it ended, or the file was truncated",
            path.display()
        ),
        Some(Ending::Torn) => {
            eprintln!("postern: {} ends with a record cut off mid-write (a crash); shown up to it", path.display())
        }
        _ => {}
    }
}

/// `postern replay`.
pub async fn replay(
    cli: &Cli,
    session: &str,
    speed: f64,
    idle_limit: f64,
    raw: bool,
    master_key: &[PathBuf],
) -> anyhow::Result<i32> {
    let cfg = resolve_config(cli)?;
    let as_path = Path::new(session);
    let mut fetched: Option<crate::recording::Downloaded> = None;
    let mut found = None;
    let path = if (session.ends_with(".cast") || session.ends_with(".cast.sealed")) && as_path.exists() {
        as_path.to_path_buf()
    } else {
        found = history::find(&cfg.data_dir, cfg.store.url.as_deref(), session).await?;
        if let Some(why) = found.as_ref().and_then(history::not_recorded) {
            eprintln!("postern: {why}");
            return Ok(1);
        }
        let id = found.as_ref().map_or(session, |r| r.id.as_str());
        let dir = cfg.data_dir.join("recordings");
        match (crate::recording::find(&dir, id), &cfg.audit.s3) {
            (Some(p), _) => p,
            (None, Some(s3)) => {
                // A cluster's history says which gateway made it: the recording is in that
                // gateway's folder of the bucket (this one's when the history does not say).
                let made_at = found.as_ref().and_then(|r| r.gateway.as_deref()).or(cfg.gateway_id());
                let f = fetch_recording(s3, &cfg.data_dir, id, made_at).await?.with_context(|| {
                    format!("no recording for session {id} in {} or in the object store", dir.display())
                })?;
                fetched.insert(f).path().to_path_buf()
            }
            (None, None) => bail!(
                "no recording for session {id} in {} (sftp, forwards, passthrough, RDP and admin-socket sessions are \
                 not recorded; `postern sessions --all` says which are)",
                dir.display()
            ),
        }
    };
    let keyring = read_keyring(&cfg, master_key)?;
    let mut out = std::io::stdout().lock();
    let ending = if raw {
        let mut plain = crate::audit::seal::Plain::open(&path, &keyring)?;
        std::io::copy(&mut plain, &mut out).with_context(|| format!("reading {}", path.display()))?;
        plain.ending()
    } else {
        if let Some(r) = &found {
            eprint!("{}  recording: {}\n\n", history::header(r), path.display());
        }
        crate::recording::replay(&path, &keyring, speed, (idle_limit > 0.0).then_some(idle_limit), &mut out)?
    };
    warn_ending(&path, ending);
    if !raw && let Some(r) = &found {
        eprintln!("\n{}", history::footer(r));
    }
    Ok(0)
}

/// Download a session's recording from `[audit.s3]`, saying so; `None`: the store does not
/// have it either.
async fn fetch_recording(
    s3: &crate::audit::ship::S3Config,
    data_dir: &Path,
    session: &str,
    gateway_id: Option<&str>,
) -> anyhow::Result<Option<crate::recording::Downloaded>> {
    use crate::audit::ship::{Kind, Shipper};
    let shipper = Shipper::new(s3, data_dir)?.for_gateway(gateway_id);
    let fetched = crate::recording::download(&shipper, session, &std::env::temp_dir(), "postern-replay").await?;
    match &fetched {
        Some(f) => eprintln!(
            "postern: {} is not in the data directory; fetched it from {}",
            f.name(),
            shipper.location(Kind::Recording)
        ),
        None => eprintln!("postern: looked in {} too", shipper.location(Kind::Recording)),
    }
    Ok(fetched)
}

/// The segments to read: `files` as given, or every segment in DATA_DIR/audit.
fn segment_files(cfg: &GatewayConfig, files: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    if !files.is_empty() {
        return Ok(files.to_vec());
    }
    let dir = cfg.data_dir.join("audit");
    let segs = crate::audit::segments(&dir).with_context(|| format!("listing {}", dir.display()))?;
    if segs.is_empty() {
        let old = cfg.data_dir.join("audit.log");
        if old.exists() {
            return Ok(vec![old]);
        }
        bail!("no audit log in {} (give --file, or --data-dir / --config)", dir.display());
    }
    Ok(segs.into_iter().map(|(_, p)| p).collect())
}

/// `postern audit verify`.
pub async fn audit_verify(
    cli: &Cli,
    files_given: &[PathBuf],
    key: Option<&Path>,
    master_key: &[PathBuf],
    json: bool,
    bucket: bool,
) -> anyhow::Result<i32> {
    use crate::audit::verify::{Part, verify_parts};
    let cfg = resolve_config(cli)?;
    if bucket {
        let keyring = read_keyring(&cfg, master_key)?;
        let own_key = key.map(Path::to_path_buf).unwrap_or_else(|| cfg.data_dir.join("audit-signing.pub"));
        return verify::bucket(&cfg, &keyring, &own_key, json).await;
    }
    // The anchor first: a running gateway records a checkpoint's anchor only after writing
    // it to the log, so the files read after it hold it.
    let loose = !files_given.is_empty() && cli.data_dir.is_none() && cli.config.is_none();
    let (anchor, notes) =
        verify::anchor(&cfg.data_dir, cfg.store.url.as_deref(), cfg.audit.s3.as_ref(), loose, cfg.gateway_id()).await?;
    let files = segment_files(&cfg, files_given)?;
    let keyring = read_keyring(&cfg, master_key)?;
    let key_path = key.map(Path::to_path_buf).unwrap_or_else(|| cfg.data_dir.join("audit-signing.pub"));
    let key_text = std::fs::read_to_string(&key_path)
        .with_context(|| format!("reading the checkpoint public key {} (give --key)", key_path.display()))?;
    let key = crate::audit::verify::parse_public_key(&key_text)
        .with_context(|| format!("{} is not a hex ed25519 public key", key_path.display()))?;
    let mut texts = Vec::with_capacity(files.len());
    for f in &files {
        texts.push(crate::audit::seal::Plain::read_all(f, &keyring)?);
    }
    let parts: Vec<Part<'_>> = files
        .iter()
        .zip(&texts)
        .map(|(f, (text, ending))| Part { name: f.display().to_string(), text, ending: *ending })
        .collect();
    let report = verify_parts(&parts, Some(&key), anchor.as_ref().map(|c| (&c.anchor, c.recorded.as_str())));
    let what = if files.len() == 1 {
        files.first().map(|f| f.display().to_string()).unwrap_or_default()
    } else {
        format!("audit log ({} segments)", files.len())
    };
    verify::print(&what, &report, &notes, json)?;
    Ok(if report.ok() { 0 } else { 1 })
}

/// `postern audit cat`.
pub fn audit_cat(cli: &Cli, files: &[PathBuf], master_key: &[PathBuf]) -> anyhow::Result<i32> {
    use std::io::Write;
    let cfg = resolve_config(cli)?;
    let keyring = read_keyring(&cfg, master_key)?;
    let mut out = std::io::stdout().lock();
    for f in segment_files(&cfg, files)? {
        let mut plain = crate::audit::seal::Plain::open(&f, &keyring)?;
        match std::io::copy(&mut plain, &mut out) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(0),
            Err(e) => return Err(e).with_context(|| format!("reading {}", f.display())),
        }
        if plain.ending() == Some(crate::audit::seal::Ending::Torn) {
            warn_ending(&f, plain.ending());
        }
    }
    out.flush()?;
    Ok(0)
}

/// `postern audit keygen`.
pub fn audit_keygen(file: &Path) -> anyhow::Result<i32> {
    use crate::audit::seal::KeyProvider;
    let key = crate::audit::seal::FileKey::generate(file)?;
    println!("master key {} written to {} (mode 0600)", key.key_id(), file.display());
    println!("use it with:\n  [audit.encryption]\n  key_file = \"{}\"", file.display());
    println!("keep a copy somewhere safe: sealed recordings and logs cannot be read without it");
    Ok(0)
}

#[derive(Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Without --all: the sessions live now. With --all: the session history (every door, \
kept across restarts for [audit] history_retention), newest first, --limit rows at a time; the \
table shortens ids to 12 characters (`postern replay` takes any unique prefix, --json has them \
whole). For the next page, pass the last id shown as --before.\n\nExamples:\n  postern sessions --all --user alice --since 2h\n  postern sessions --all --kind forward --since 2026-12-01T10:00Z --until 2026-12-02T00:00Z\n  postern sessions --all --limit 20 --before 3f9c2a71b0de\n  postern sessions terminate 3f9c2a71b0de4a55c1e8d7f6a9b2c3d4"
)]
pub struct SessionsArgs {
    /// The session history: ended sessions too, also those from before a restart.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub history: history::HistoryArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(subcommand)]
    pub action: Option<manage::SessionsAction>,
}

#[derive(Subcommand)]
pub enum InstancesAction {
    /// Revoke an instance's agent: it is disconnected now and can no longer connect.
    #[command(after_help = "Examples:\n  postern instances revoke web-01")]
    Revoke { instance: String },
}

pub fn resolve_config(cli: &Cli) -> anyhow::Result<GatewayConfig> {
    let mut cfg = match &cli.config {
        Some(p) => GatewayConfig::load(p)?,
        None => GatewayConfig::default(),
    };
    if let Some(d) = &cli.data_dir {
        cfg.data_dir = d.clone();
    }
    Ok(cfg)
}

/// `quickstart --web-listen`: an address, or no console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebListen {
    At(SocketAddr),
    Off,
}

fn parse_web_listen(s: &str) -> Result<WebListen, String> {
    if s == "off" {
        return Ok(WebListen::Off);
    }
    s.parse().map(WebListen::At).map_err(|e| format!("{e} (an address like 127.0.0.1:8443, or off)"))
}

/// The configuration quickstart runs with. Each listen address comes from the command line,
/// else from the config file when it sets one, else it is loopback on the default port:
/// quickstart is for trying Postern on this machine, so it opens nothing to the network
/// unless told to. The SSH door is always on (quickstart is about using it); the RDP door
/// only when the file turns it on; the web console unless the command line or the file
/// turns it off.
pub fn quickstart_config(
    cli: &Cli,
    listen: Option<SocketAddr>,
    ssh_listen: Option<SocketAddr>,
    web_listen: Option<WebListen>,
) -> anyhow::Result<GatewayConfig> {
    let mut cfg = resolve_config(cli)?;
    let file_sets = |section: &str| -> anyhow::Result<bool> {
        match &cli.config {
            Some(path) => crate::config::file_sets(path, section, "listen"),
            None => Ok(false),
        }
    };
    let loopback = |port: u16| SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
    cfg.tunnel.listen = match listen {
        Some(a) => a,
        None if file_sets("tunnel")? => cfg.tunnel.listen,
        None => loopback(cfg.tunnel.listen.port()),
    };
    cfg.ssh.listen = match ssh_listen {
        Some(a) => a,
        None if file_sets("ssh")? => cfg.ssh.listen,
        None => loopback(cfg.ssh.listen.port()),
    };
    cfg.ssh.enabled = true;
    if !file_sets("rdp")? {
        cfg.rdp.listen = loopback(cfg.rdp.listen.port());
    }
    let web_off_in_file = match &cli.config {
        Some(path) => crate::config::file_sets(path, "web", "enabled")? && !cfg.web.enabled,
        None => false,
    };
    match web_listen {
        Some(WebListen::Off) => cfg.web.enabled = false,
        Some(WebListen::At(a)) => (cfg.web.enabled, cfg.web.listen) = (true, a),
        None if web_off_in_file => {}
        None => {
            cfg.web.enabled = true;
            if !file_sets("web")? {
                cfg.web.listen = loopback(cfg.web.listen.port());
            }
        }
    }
    Ok(cfg)
}

/// Every address a running gateway listens on (tunnel, doors, admin socket) and its data
/// directory, one aligned line each: the start-up banners of `postern gateway` and
/// `quickstart`.
pub fn listener_lines(state: &Services) -> String {
    let a = &state.addresses;
    let ssh = a.ssh.map_or_else(|| "off ([ssh] enabled = false)".to_owned(), |s| format!("tcp {s}"));
    let rdp = a.rdp.map_or_else(|| "off (turn it on with [rdp] enabled = true)".to_owned(), |r| format!("tcp {r}"));
    let tunnel = match a.tunnel_tcp {
        Some(tcp) => format!("udp {}, tcp {tcp}", a.tunnel),
        None => format!("udp {} (no TCP fallback: [tunnel] tcp_listen = \"off\")", a.tunnel),
    };
    let web = match (&state.web_signin, a.web) {
        (Some((_, origin)), Some(w)) => format!("{origin}   (tcp {w}; sign in with: postern web-login)"),
        _ => "off (turn it on with [web] enabled = true)".to_owned(),
    };
    format!(
        "  agents (tunnel):   {tunnel}   CA pin {pin}\n\
         \x20 SSH door:          {ssh}\n\
         \x20 RDP door:          {rdp}\n\
         \x20 web console:       {web}\n\
         \x20 admin socket:      {socket}\n\
         \x20 data directory:    {dir}",
        pin = state.instances.ca().pin(),
        socket = admin_socket_path(&state.config.data_dir).display(),
        dir = state.config.data_dir.display(),
    )
}

pub fn parse_labels(items: &[String]) -> anyhow::Result<Labels> {
    let mut labels = Labels::new();
    for item in items.iter().filter(|s| !s.is_empty()) {
        let (k, v) = item.split_once('=').with_context(|| format!("label {item:?} must look like key=value"))?;
        let valid = |s: &str, max| {
            !s.is_empty() && s.len() <= max && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        };
        if !valid(k, 63) || !(v.is_empty() || valid(v, 255)) {
            bail!("label {item:?}: keys and values use letters, digits, '-', '_', '.', '/' (keys up to 63 characters)");
        }
        labels.insert(k.to_owned(), v.to_owned());
    }
    Ok(labels)
}

fn labels_text(labels: &Labels) -> String {
    labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

pub async fn token_create(
    socket: &Path,
    labels: &[String],
    ttl: &str,
    name: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let labels = parse_labels(labels)?;
    let ttl = parse_duration(ttl).context("--ttl")?;
    if ttl > crate::instances::MAX_TOKEN_TTL {
        bail!(
            "--ttl {}: a token may live at most 7 days (it enrolls a machine: make one when you need it)",
            ttl_text(ttl)
        );
    }
    let (reply, _) = request(socket, &AdminRequest::TokenCreate { labels, ttl_secs: ttl.as_secs(), name }).await?;
    let mut r = reply.get("result").cloned().unwrap_or(Value::Null);
    let join = join_command(&r);
    let install = install_line(&join);
    if json {
        if let Some(fields) = r.as_object_mut() {
            fields.insert("install".into(), Value::String(install));
        }
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
    let labels: Labels = serde_json::from_value(r.get("labels").cloned().unwrap_or_default()).unwrap_or_default();
    let expires = r.get("expires_at").and_then(Value::as_i64).unwrap_or_default();
    println!("token:   {}", s("token"));
    println!("expires: {} (single use)", postern_core::util::rfc3339(expires));
    println!("ca pin:  {}", s("ca_pin"));
    if let Some(name) = r.get("name").and_then(Value::as_str) {
        println!("name:    {name}");
    }
    if !labels.is_empty() {
        println!("labels:  {}", labels_text(&labels));
    }
    println!();
    println!("On the server to add, run:");
    println!("  {join} --run");
    println!();
    println!("Or on a Debian server, with the postern-agent .deb at hand (docs/operations.md):");
    println!("  {install}");
    Ok(())
}

/// `postern-agent join --gateway ... --token ... --ca-pin ...` for a `token create` result:
/// one `--gateway` per advertised address (a cluster advertises several).
fn join_command(r: &Value) -> String {
    let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
    let mut gateways: Vec<String> = r
        .get("gateways")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default();
    if gateways.is_empty() {
        gateways.push(s("gateway"));
    }
    let flags: String = gateways.iter().map(|g| format!("--gateway {g} ")).collect();
    format!("postern-agent join {flags}--token {} --ca-pin {}", s("token"), s("ca_pin"))
}

/// The one line that makes a Debian server an agent with the packages (docs/operations.md):
/// install the package file, join with the agent's default state directory (the one the
/// unit uses), then enable and start the unit, which waits for that join.
fn install_line(join: &str) -> String {
    format!("sudo apt-get install -y ./postern-agent_*.deb && sudo {join} && sudo systemctl enable --now postern-agent")
}

fn ttl_text(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

/// `postern token list`.
pub async fn token_list(socket: &Path, json: bool) -> anyhow::Result<()> {
    let (reply, _) = request(socket, &AdminRequest::TokenList).await?;
    let rows: Vec<crate::instances::TokenRow> =
        serde_json::from_value(reply.get("result").cloned().unwrap_or_default())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("No tokens. Create one with `postern token create`.");
        return Ok(());
    }
    let when = postern_core::util::rfc3339;
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let t = &r.token;
            vec![
                t.id.clone(),
                t.name.clone().unwrap_or_else(|| "-".into()),
                labels_text(&t.labels),
                when(t.created_at),
                when(t.expires_at),
                r.state.clone(),
                t.used_by.clone().filter(|_| r.state == "used").unwrap_or_default(),
            ]
        })
        .collect();
    print!("{}", table(&["TOKEN", "NAME", "LABELS", "CREATED", "EXPIRES", "STATE", "ENROLLED"], &table_rows));
    Ok(())
}

/// `postern token revoke ID`.
pub async fn token_revoke(socket: &Path, id: &str) -> anyhow::Result<()> {
    request(socket, &AdminRequest::TokenRevoke { id: id.to_owned() }).await?;
    println!("revoked token {id}: it can no longer enroll an agent");
    Ok(())
}

pub async fn instances(socket: &Path, json: bool) -> anyhow::Result<()> {
    let (reply, _) = request(socket, &AdminRequest::Instances).await?;
    let rows: Vec<InstanceRow> = serde_json::from_value(reply.get("result").cloned().unwrap_or_default())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("No instances yet. Create a token with `postern token create` and join an agent.");
        return Ok(());
    }
    // A cluster's gateways name where each online agent is connected; a single gateway does not.
    let cluster = rows.iter().any(|r| r.gateway.is_some());
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut row = vec![
                r.id.clone(),
                r.name.clone(),
                labels_text(&r.labels),
                r.platform.clone(),
                r.agent_version.clone(),
                if r.online { "online".into() } else { "offline".into() },
                r.transport.clone().unwrap_or_else(|| "-".into()),
                if r.online { "now".into() } else { ago(r.last_seen) },
            ];
            if cluster {
                row.push(r.gateway.clone().unwrap_or_else(|| "-".into()));
            }
            row
        })
        .collect();
    let mut header = vec!["ID", "NAME", "LABELS", "PLATFORM", "VERSION", "STATUS", "TRANSPORT", "LAST SEEN"];
    if cluster {
        header.push("GATEWAY");
    }
    print!("{}", table(&header, &table_rows));
    Ok(())
}

pub async fn revoke(socket: &Path, instance: &str) -> anyhow::Result<()> {
    let (reply, _) = request(socket, &AdminRequest::Revoke { instance: instance.to_owned() }).await?;
    let r = reply.get("result").cloned().unwrap_or_default();
    println!(
        "revoked {} ({}){}",
        r.get("name").and_then(Value::as_str).unwrap_or_default(),
        r.get("id").and_then(Value::as_str).unwrap_or_default(),
        if r.get("was_online").and_then(Value::as_bool) == Some(true) { "; disconnected" } else { "" }
    );
    Ok(())
}

fn pass_env() -> Vec<(String, String)> {
    ["LANG", "LC_ALL", "LC_CTYPE"].iter().filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_owned(), v))).collect()
}

pub async fn exec(socket: &Path, instance: &str, command: &[String]) -> anyhow::Result<i32> {
    let spec = SessionSpec::Exec { command: command.join(" "), env: pass_env() };
    session::run(socket, instance, spec, false).await
}

pub async fn shell(socket: &Path, instance: &str, command: Option<String>) -> anyhow::Result<i32> {
    let interactive = session::stdin_is_tty();
    let (cols, rows) = session::terminal_size();
    let term = std::env::var("TERM").unwrap_or_else(|_| "xterm".into());
    let spec = SessionSpec::Shell { term, cols, rows, env: pass_env(), command };
    session::run(socket, instance, spec, interactive).await
}

/// `postern reload`: prints what changed and what needs a restart; an invalid file is an
/// error (the gateway's message, naming the file and line).
pub async fn reload(socket: &Path) -> anyhow::Result<()> {
    let (reply, _) = request(socket, &AdminRequest::Reload).await?;
    let report: crate::reload::ReloadReport = serde_json::from_value(reply.get("result").cloned().unwrap_or_default())
        .context("reading the gateway's reply")?;
    let list = |keys: &[String]| if keys.is_empty() { "nothing".to_owned() } else { keys.join(", ") };
    println!("reloaded {}", report.file);
    println!("applied: {}", list(&report.changed));
    if !report.needs_restart.is_empty() {
        println!("needs a restart to take effect (unchanged until then): {}", list(&report.needs_restart));
    }
    Ok(())
}

/// The admin socket for `postern reload`: from --data-dir, else the --config file (whose
/// `data_dir` is read even when the rest of the file is invalid, since the point may be
/// to hear what is wrong with it from the gateway), else the default.
pub fn socket_for_reload(cli: &Cli) -> anyhow::Result<PathBuf> {
    if let Some(d) = &cli.data_dir {
        return Ok(admin_socket_path(d));
    }
    match (resolve_config(cli), &cli.config) {
        (Ok(cfg), _) => Ok(admin_socket_path(&cfg.data_dir)),
        (Err(e), Some(path)) => {
            let data_dir = std::fs::read_to_string(path)
                .ok()
                .and_then(|t| t.parse::<toml::Table>().ok())
                .and_then(|t| t.get("data_dir").and_then(toml::Value::as_str).map(PathBuf::from));
            match data_dir {
                Some(d) => Ok(admin_socket_path(&d)),
                None => Err(e.context("the gateway's data directory cannot be read from the config file; pass --data-dir to reach the gateway")),
            }
        }
        (Err(e), None) => Err(e),
    }
}

pub fn socket_for(cli: &Cli) -> anyhow::Result<PathBuf> {
    Ok(admin_socket_path(&resolve_config(cli)?.data_dir))
}

pub fn is_default_data_dir(dir: &Path) -> bool {
    dir == default_data_dir()
}

pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[cfg(test)]
mod cli_tests {
    use clap::FromArgMatches;

    /// The one-line agent install carries every advertised gateway, the token and the pin,
    /// joins without `--run` (the unit runs the agent) and ends by enabling the unit.
    #[test]
    fn install_line_joins_every_gateway_then_enables_the_unit() {
        let r = serde_json::json!({
            "token": "pt_abc", "ca_pin": "sha256:00ff", "gateway": "gw-a:4433",
            "gateways": ["gw-a:4433", "gw-b:4433"],
        });
        let join = super::join_command(&r);
        assert_eq!(
            join,
            "postern-agent join --gateway gw-a:4433 --gateway gw-b:4433 --token pt_abc --ca-pin sha256:00ff"
        );
        assert_eq!(
            super::install_line(&join),
            format!(
                "sudo apt-get install -y ./postern-agent_*.deb && sudo {join} && sudo systemctl enable --now postern-agent"
            )
        );
        let single = serde_json::json!({"token": "pt_x", "ca_pin": "sha256:11", "gateway": "gw:4433"});
        assert_eq!(
            super::join_command(&single),
            "postern-agent join --gateway gw:4433 --token pt_x --ca-pin sha256:11"
        );
    }

    /// Catches clashing flags (e.g. a subcommand's `--log` against the global one) that clap
    /// would otherwise only report as a panic when the command runs.
    #[test]
    fn command_definitions_are_consistent() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
        super::command().debug_assert();
    }

    /// Every command, the groups as well as the leaves, has an Examples section in its
    /// `--help` (docs/client.md promises it).
    #[test]
    fn every_command_has_examples() {
        fn walk(cmd: &clap::Command, path: String, missing: &mut Vec<String>) {
            let after: Vec<String> = [cmd.get_after_help(), cmd.get_after_long_help()]
                .into_iter()
                .flatten()
                .map(|h| h.to_string())
                .collect();
            if !after.iter().any(|h| h.contains("Examples:\n  postern ")) {
                missing.push(path.clone());
            }
            // Narrow enough that clap (wrapping at 100 columns) never breaks an example.
            for line in after.iter().flat_map(|h| h.lines()).filter(|l| l.starts_with("  ") && l.chars().count() > 100)
            {
                missing.push(format!("{path}: a line over 100 columns: {line:?}"));
            }
            for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                walk(sub, format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::command(), "postern".into(), &mut missing);
        assert!(missing.is_empty(), "commands without an \"Examples:\" section in --help: {missing:#?}");
    }

    fn help(path: &[&str]) -> String {
        let mut cmd = super::command();
        for name in path {
            cmd = cmd.find_subcommand(name).unwrap_or_else(|| panic!("no command {path:?}")).clone();
        }
        cmd.render_long_help().to_string()
    }

    /// User commands do not show the options that only mean something on the gateway host;
    /// commands that are both show them under a heading saying when they apply; the logging
    /// options belong to the server commands.
    #[test]
    fn help_shows_only_the_global_options_that_apply() {
        let gateway_side = ["--config", "--data-dir", "--log ", "--log-json"];
        for user in [&["ls"][..], &["forward"], &["run"], &["rdp"], &["completions"]] {
            let text = help(user);
            for opt in gateway_side {
                assert!(!text.contains(opt), "postern {user:?} --help shows {opt}:\n{text}");
            }
        }
        for either in [&["exec"][..], &["shell"], &["ssh-config"]] {
            let text = help(either);
            let local = text.find(super::LOCAL_GATEWAY_HEADING).unwrap_or_else(|| panic!("{either:?}:\n{text}"));
            assert!(text[local..].contains("--data-dir") && text[local..].contains("--config"), "{text}");
            assert!(!text.contains("--log"), "postern {either:?} --help shows --log:\n{text}");
        }
        for local in [&["instances"][..], &["user", "add"], &["audit", "verify"], &["sessions"]] {
            let text = help(local);
            assert!(text.contains("--data-dir") && text.contains("--config"), "{local:?}:\n{text}");
            assert!(!text.contains("--log"), "postern {local:?} --help shows --log:\n{text}");
        }
        for server in ["gateway", "quickstart"] {
            let text = help(&[server]);
            for opt in gateway_side {
                assert!(text.contains(opt), "postern {server} --help lacks {opt}:\n{text}");
            }
        }
    }

    /// Hidden is not refused: the options are accepted where they were before.
    #[test]
    fn hidden_global_options_are_still_accepted() {
        for args in [
            &["postern", "--data-dir", "/d", "ls"][..],
            &["postern", "ls", "--data-dir", "/d"],
            &["postern", "forward", "web-01", "8080:80", "--config", "/c.toml", "--data-dir", "/d"],
        ] {
            let matches = super::command().try_get_matches_from(args).unwrap();
            let cli = super::Cli::from_arg_matches(&matches).unwrap();
            assert_eq!(cli.data_dir.as_deref(), Some(std::path::Path::new("/d")), "{args:?}");
        }
    }
}
