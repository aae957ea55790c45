//! `postern`: the gateway server and its admin and user commands.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use postern_gateway::app;
use postern_gateway::cli::{self, Cli, Command, InstancesAction, TokenAction};
use postern_tunnel::CancellationToken;
use postern_tunnel::agent::{self, Backoff, JoinOptions, RunOptions};
use postern_tunnel::services::LocalLimits;
use postern_tunnel::tls::TransportTimers;

/// Start listening for SIGINT (Ctrl-C) and SIGTERM now, before the slow parts of start-up,
/// so a stop request that arrives meanwhile is not lost (or fatal); the returned future
/// completes on the first of them.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    async move {
        tokio::select! {
            _ = wait_signal(term.as_mut()) => {}
            _ = wait_signal(int.as_mut()) => {}
        }
    }
}

async fn wait_signal(s: Option<&mut tokio::signal::unix::Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

/// A file that reaches the process's size limit (RLIMIT_FSIZE) is a failed write the
/// gateway handles (fail closed), not a reason to die: catching SIGXFSZ (and never reading
/// it) replaces its default action, which ends the process.
fn survive_file_size_limit() -> std::io::Result<()> {
    let xfsz = tokio::signal::unix::SignalKind::from_raw(nix::sys::signal::Signal::SIGXFSZ as i32);
    tokio::signal::unix::signal(xfsz).map(drop)
}

async fn run_gateway(cli: &Cli, listen: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    let mut cfg = cli::resolve_config(cli)?;
    if let Some(l) = listen {
        cfg.tunnel.listen = l;
    }
    let stop = shutdown_signal();
    survive_file_size_limit()?;
    // Registered before the gateway starts, so that a SIGHUP during the start is not fatal
    // (its default action) but a reload once it runs.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    if let Some(level) = &cfg.log_level
        && let Err(e) = postern_tunnel::set_log_filter(level)
    {
        tracing::warn!(error = %e, "cannot set log_level");
    }
    let running = app::start(cfg).await?;
    if let Some(path) = &cli.config {
        running.services.reload.watch_file(path, &cli.log)?;
    }
    let reloads = running.services.reload.clone();
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            // Reported by the reload itself (log and audit event).
            let _ = reloads.reload("signal");
        }
    });
    print_banner(
        &running.services,
        &format!(
            "Postern gateway is running.\n{}\nPress Ctrl-C (or send SIGTERM) to stop it.",
            cli::listener_lines(&running.services)
        ),
    );
    stop.await;
    tracing::info!("shutting down");
    running.stop().await;
    Ok(())
}

/// A start-up banner: on standard output, unless `[audit] stdout` makes that the event
/// stream (then on standard error, beside the logs), which must stay JSON lines only.
fn print_banner(state: &postern_gateway::services::Services, text: &str) {
    if state.config.audit.stdout {
        eprintln!("{text}");
    } else {
        println!("{text}");
    }
}

/// SSH public keys of the person running quickstart: `~/.ssh/*.pub` and a running ssh-agent.
async fn local_public_keys() -> Vec<String> {
    let mut keys = Vec::new();
    if let Some(home) = std::env::var_os("HOME")
        && let Ok(dir) = std::fs::read_dir(std::path::Path::new(&home).join(".ssh"))
    {
        for entry in dir.flatten() {
            if entry.path().extension().is_some_and(|e| e == "pub")
                && let Ok(text) = std::fs::read_to_string(entry.path())
            {
                keys.extend(text.lines().filter(|l| !l.trim().is_empty()).map(str::to_owned));
            }
        }
    }
    if std::env::var_os("SSH_AUTH_SOCK").is_some() {
        let out =
            tokio::time::timeout(Duration::from_secs(3), tokio::process::Command::new("ssh-add").arg("-L").output())
                .await;
        if let Ok(Ok(out)) = out
            && out.status.success()
        {
            keys.extend(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned));
        }
    }
    // Only lines that parse as OpenSSH public keys; certificates and junk are skipped.
    keys.retain(|k| russh::keys::PublicKey::from_openssh(k.trim()).is_ok());
    keys.sort();
    keys.dedup();
    keys
}

async fn quickstart(
    cli: &Cli,
    listen: Option<std::net::SocketAddr>,
    ssh_listen: Option<std::net::SocketAddr>,
    web_listen: Option<cli::WebListen>,
) -> anyhow::Result<()> {
    let cfg = cli::quickstart_config(cli, listen, ssh_listen, web_listen)?;
    let data_dir = cfg.data_dir.clone();
    let stop = shutdown_signal();
    survive_file_size_limit()?;
    let running = app::start(cfg).await?;
    let state = running.services.clone();
    let agent_dir = data_dir.join("local-agent");

    // Reuse the local agent from an earlier quickstart if the gateway still knows it.
    let known = match agent::load_state(&agent_dir) {
        Ok(s) => state.store.agent(&s.agent_id).await?.filter(|a| !a.revoked).map(|_| s),
        Err(_) => None,
    };
    let local = match known {
        Some(s) => s,
        None => {
            let labels = cli::parse_labels(&["env=local".to_owned()])?;
            let token = state.instances.create_token(labels, Duration::from_secs(300), None, "quickstart").await?;
            agent::join(&JoinOptions {
                gateways: vec![state.addresses.tunnel.to_string()],
                token: token.token,
                ca_pin: token.ca_pin,
                state_dir: agent_dir.clone(),
                route: Default::default(),
            })
            .await
            .context("enrolling the local agent")?
        }
    };
    let stop_agent = CancellationToken::new();
    let agent_task = tokio::spawn(agent::run(
        RunOptions {
            state_dir: agent_dir,
            gateways: vec![state.addresses.tunnel.to_string()],
            limits: LocalLimits::default(),
            backoff: Backoff::default(),
            timers: TransportTimers::default(),
            route: Default::default(),
        },
        stop_agent.clone(),
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while state.instances.registry().get(&local.agent_id).is_none() {
        if tokio::time::Instant::now() > deadline || agent_task.is_finished() {
            anyhow::bail!("the local agent did not come online; run with --log debug for details");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let dd =
        if cli::is_default_data_dir(&data_dir) { String::new() } else { format!(" --data-dir {}", data_dir.display()) };

    // Let the person running quickstart ssh into this machine with the keys they already have.
    let me = nix::unistd::User::from_uid(nix::unistd::Uid::current())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| "admin".into());
    let keys = local_public_keys().await;
    let ssh_port = state.addresses.ssh.map(|a| a.port()).unwrap_or(2222);
    let ssh_help = if keys.is_empty() {
        "No SSH public keys found in ~/.ssh or a running ssh-agent: create one with\n\
         \x20 ssh-keygen -t ed25519\n\
         and start quickstart again to ssh into this machine through the gateway."
            .to_owned()
    } else {
        state.access.add(&postern_gateway::config::UserConfig {
            name: me.clone(),
            keys: keys.clone(),
            instances: vec![local.name.clone()],
            actions: None,
            // Their own account is their login on this machine: `ssh {me}@{name}.{suffix}`.
            run_as: Some(me.clone()),
            idle_timeout: None,
            max_session: None,
            profiles: Vec::new(),
            default_profile: None,
            // The local agent runs as the person running quickstart; when that is root, their
            // sessions are root sessions, which needs saying so (docs/ssh.md).
            allow_root: nix::unistd::Uid::current().is_root(),
        })?;
        let known_hosts = data_dir.join("known_hosts");
        let line = state
            .host_keys
            .known_hosts_line(&postern_gateway::addressing::known_hosts_patterns(&state.config, ssh_port))?;
        postern_tunnel::agent::write_private(&known_hosts, format!("{line}\n").as_bytes())?;
        let web = if state.config.web.enabled {
            format!(
                "\nIn a browser (the web console, docs/web.md), with a one-time sign-in link:\n\
                 \x20 postern web-login --gateway 127.0.0.1:{ssh_port} --known-hosts {kh}\n\
                 (its certificate is from the gateway's own CA, {ca}: import that, or accept the warning)",
                kh = known_hosts.display(),
                ca = data_dir.join("ca.crt").display(),
            )
        } else {
            String::new()
        };
        format!(
            "SSH into this machine through the gateway ({n} key(s) of yours registered as user {me}):\n\
             \x20 ssh -o UserKnownHostsFile={kh} -p {ssh_port} {me}%{name}@127.0.0.1\n\
             For `ssh {me}@{name}.{suffix}` (your account here is your login): postern{dd} ssh-config --install\n\
             As a user with the postern client (docs/client.md):\n\
             \x20 postern ls --gateway 127.0.0.1:{ssh_port} --known-hosts {kh}{web}",
            n = keys.len(),
            kh = known_hosts.display(),
            name = local.name,
            suffix = state.config.ssh.suffix,
        )
    };
    print_banner(
        &state,
        &format!(
            "\nPostern is running.\n\
         {listeners}\n\
         \x20 local agent:       {name} ({id}) online\n\n\
         Try it from another terminal:\n\
         \x20 postern{dd} instances\n\
         \x20 postern{dd} exec {name} -- uname -a\n\
         \x20 postern{dd} shell {name}\n\n\
         {ssh_help}\n\n\
         Add another server:\n\
         \x20 postern{dd} token create --labels env=dev --ttl 15m     (prints the postern-agent join command)\n\n\
         Press Ctrl-C to stop the gateway and the local agent.",
            listeners = cli::listener_lines(&state),
            name = local.name,
            id = local.agent_id,
        ),
    );
    stop.await;
    tracing::info!("shutting down");
    stop_agent.cancel();
    let _ = tokio::time::timeout(cli::SHUTDOWN_GRACE, agent_task).await;
    running.stop().await;
    Ok(())
}

async fn real_main(cli: Cli) -> anyhow::Result<i32> {
    match &cli.command {
        Command::Gateway { listen } => run_gateway(&cli, *listen).await.map(|()| 0),
        Command::Quickstart { listen, ssh_listen, web_listen } => {
            quickstart(&cli, *listen, *ssh_listen, *web_listen).await.map(|()| 0)
        }
        Command::Token { action: TokenAction::Create { labels, ttl, name, json } } => {
            cli::token_create(&cli::socket_for(&cli)?, labels, ttl, name.clone(), *json).await.map(|()| 0)
        }
        Command::Token { action: TokenAction::List { json } } => {
            cli::token_list(&cli::socket_for(&cli)?, *json).await.map(|()| 0)
        }
        Command::Token { action: TokenAction::Revoke { id } } => {
            cli::token_revoke(&cli::socket_for(&cli)?, id).await.map(|()| 0)
        }
        Command::Doctor { json } => {
            let report = cli::doctor::report(&cli).await;
            if *json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.human());
            }
            Ok(i32::from(report.exit_code()))
        }
        Command::Reload => cli::reload(&cli::socket_for_reload(&cli)?).await.map(|()| 0),
        Command::Instances(args) => match &args.action {
            None => cli::instances(&cli::socket_for(&cli)?, args.json).await.map(|()| 0),
            Some(InstancesAction::Revoke { instance }) => {
                cli::revoke(&cli::socket_for(&cli)?, instance).await.map(|()| 0)
            }
        },
        Command::Exec { gateway, instance, command } if gateway.gateway.is_some() => {
            cli::user::exec(gateway, instance, command).await
        }
        Command::Exec { instance, command, .. } => cli::exec(&cli::socket_for(&cli)?, instance, command).await,
        Command::Shell { gateway, instance, command, profile } if gateway.gateway.is_some() => {
            cli::user::shell(gateway, instance, command.clone(), profile.as_deref()).await
        }
        Command::Shell { instance, command, profile, .. } => {
            if profile.is_some() {
                anyhow::bail!("--profile needs --gateway (a user session through the SSH door)");
            }
            cli::shell(&cli::socket_for(&cli)?, instance, command.clone()).await
        }
        Command::Ls { gateway, labels, json } => cli::user::ls(gateway, labels.as_deref(), *json).await,
        Command::Forward { gateway, instance, specs, bind } => {
            cli::user::forward(gateway, instance, specs, *bind).await
        }
        Command::Run(args) => cli::user::run(args).await,
        Command::Login(args) => cli::login::login(args).await,
        Command::Logout { gateway } => cli::login::logout(gateway).await,
        Command::WebLogin { gateway } => cli::login::web_login(gateway).await,
        Command::Whoami { gateway, json } => cli::login::whoami(gateway, *json).await,
        Command::Completions { shell } => {
            // Generated into memory: clap_complete panics when its writer fails, and a
            // reader that goes away (`| head`) must end the command quietly.
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut cli::command(), "postern", &mut script);
            let mut out = std::io::stdout().lock();
            match std::io::Write::write_all(&mut out, &script).and_then(|()| std::io::Write::flush(&mut out)) {
                Ok(()) => Ok(0),
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(141),
                Err(e) => Err(e.into()),
            }
        }
        Command::User { action } => cli::manage::user(&cli::socket_for(&cli)?, action).await.map(|()| 0),
        Command::Group { action } => cli::manage::group(&cli::socket_for(&cli)?, action).await.map(|()| 0),
        Command::Policy { action } => {
            let socket = cli::socket_for(&cli).ok();
            cli::manage::policy(socket.as_deref(), action).await.map(|()| 0)
        }
        Command::Grant { user, policy, duration, reason, json } => {
            cli::manage::grant(&cli::socket_for(&cli)?, user, policy, duration, reason, *json).await.map(|()| 0)
        }
        Command::Grants { all, json } => cli::manage::grants(&cli::socket_for(&cli)?, *all, *json).await.map(|()| 0),
        Command::Revoke { id, user, policy } => {
            cli::manage::revoke_grants(&cli::socket_for(&cli)?, id.clone(), user.clone(), policy.clone())
                .await
                .map(|()| 0)
        }
        Command::Explain { user, target, action, at, from, to, mfa, json } => {
            let request = postern_gateway::manage::ManageRequest::Explain {
                user: user.clone(),
                target: target.clone(),
                action: action.clone(),
                at: at.clone(),
                from: *from,
                to: to.clone(),
                mfa: *mfa,
            };
            cli::manage::explain(&cli::socket_for(&cli)?, request, *json).await
        }
        Command::Sessions(args) => {
            let socket = cli::socket_for(&cli)?;
            cli::manage::sessions(&socket, args.all, args.json, &args.history, args.action.as_ref()).await.map(|()| 0)
        }
        Command::Replay { session, speed, idle_limit, raw, master_key } => {
            cli::replay(&cli, session, *speed, *idle_limit, *raw, master_key).await
        }
        Command::Cluster { action } => cli::cluster::run(&cli::resolve_config(&cli)?, action).await,
        Command::Audit { action } => match action {
            cli::AuditAction::Verify { file, key, master_key, json, bucket } => {
                cli::audit_verify(&cli, file, key.as_deref(), master_key, *json, *bucket).await
            }
            cli::AuditAction::Cat { file, master_key } => cli::audit_cat(&cli, file, master_key),
            cli::AuditAction::Keygen { file } => cli::audit_keygen(file),
        },
        Command::Rdp(args) => cli::rdp::run(args).await,
        Command::SshConfig { gateway, known_hosts_file, install } => {
            cli::ssh_config::run(|| cli::socket_for(&cli), gateway, known_hosts_file, *install).await
        }
    }
}

/// `postern instances --json | head -1`: a reader that goes away ends the command quietly
/// (status 141, as for a shell tool killed by SIGPIPE) instead of with a panic message.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let p = info.payload();
        let msg = p.downcast_ref::<String>().map(String::as_str).or_else(|| p.downcast_ref::<&str>().copied());
        if msg.is_some_and(|m| m.starts_with("failed printing to stdout") && m.contains("Broken pipe")) {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    quiet_on_closed_stdout();
    let cli = cli::parse();
    let server = matches!(cli.command, Command::Gateway { .. } | Command::Quickstart { .. });
    postern_tunnel::init_logging(if server { &cli.log } else { "warn" }, cli.log_json);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("postern: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Summaries of rate-limited log lines (postern_tunnel::log_limit): each minute, and what
    // is left when the command ends.
    let summaries = CancellationToken::new();
    rt.spawn(postern_tunnel::log_limit::run_summaries(summaries.clone()));
    let result = rt.block_on(real_main(cli));
    summaries.cancel();
    postern_tunnel::log_limit::flush_all();
    // A blocked stdin read must not keep the process alive after the session ended.
    rt.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(255)),
        Err(e) => {
            eprintln!("postern: error: {e:#}");
            ExitCode::from(255)
        }
    }
}
