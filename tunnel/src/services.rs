//! What an agent does with a session stream: a PTY shell, an exec, or a TCP connection.
//! The agent enforces its own local limits here, whatever the gateway asked for.
//!
//! (Just over 600 lines with its tests: shell, exec and TCP share the stream handling and
//! the local limits; the code alone is under 600.)

use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::time::Duration;

use crate::transport::{RecvStream, SendStream};
use ipnet::IpNet;
use postern_proto::{
    Accept, Connected, ErrorCode, ExecCommand, ExecRequest, Exit, Message, Reject, SessionId, SessionRequest,
    ShellRequest, StreamKind, TcpByNameRequest, TcpRequest, read_frame, write_frame,
};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tracing::{debug, info};

/// How many outgoing frames may wait for the QUIC stream before producers pause.
const OUTBOUND_QUEUE: usize = 32;
/// After a process exits, how long to keep draining output written by its children.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// Local limits from the agent's own configuration file (`[limits]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalLimits {
    /// Concurrent sessions this agent serves; more are rejected.
    pub max_sessions: usize,
    /// Networks TCP sessions may connect to. Default: loopback only.
    pub tcp_allow: Vec<IpNet>,
    /// OS users sessions may run as, besides the agent's own user. Needs the agent to run as root.
    pub run_as: Vec<String>,
    /// Whether `root` may be a run-as user (it must also be listed in `run_as`).
    pub allow_root: bool,
    /// Shell for sessions when the user's login shell cannot be determined.
    pub default_shell: String,
    /// Where RDP sessions go (`host:port`); "" refuses RDP on this instance. The gateway
    /// cannot choose another destination for RDP, so `tcp_allow` does not apply.
    pub rdp_address: String,
    /// Where SSH passthrough goes (this host's sshd); "" refuses passthrough. As for RDP, `tcp_allow` does not apply.
    pub ssh_address: String,
}

impl Default for LocalLimits {
    fn default() -> Self {
        Self {
            max_sessions: 256,
            tcp_allow: ["127.0.0.0/8", "::1/128"].iter().filter_map(|n| n.parse().ok()).collect(),
            run_as: Vec::new(),
            allow_root: false,
            default_shell: "/bin/sh".into(),
            rdp_address: "127.0.0.1:3389".into(),
            ssh_address: "127.0.0.1:22".into(),
        }
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:127.0.0.1`) are their IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

impl LocalLimits {
    /// Whether TCP sessions may connect to `ip`. Never the unspecified address (0.0.0.0,
    /// ::): connecting to it reaches this host's own listeners, whatever `tcp_allow` says.
    pub fn tcp_allowed(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        !ip.is_unspecified() && self.tcp_allow.iter().any(|n| n.contains(&ip))
    }
}

/// Whether `ip` is in one of the policy's deny ranges (sent with a `TcpByName` request).
fn policy_denies(deny: &[IpNet], ip: IpAddr) -> bool {
    let ip = canonical(ip);
    deny.iter().any(|n| n.contains(&ip))
}

struct Rejection(ErrorCode, String);

/// Serve one session stream opened by the gateway.
pub async fn serve_session(
    mut send: SendStream,
    mut recv: RecvStream,
    limits: &LocalLimits,
    permit: Option<OwnedSemaphorePermit>,
) {
    let open = match tokio::time::timeout(crate::server::HANDSHAKE_TIMEOUT, read_frame(&mut recv, StreamKind::Session))
        .await
    {
        Ok(Ok(Some(Message::Open(o)))) => o,
        Ok(Ok(other)) => {
            crate::warn_limited!(?other, "session stream did not start with an open request");
            send.reset(1);
            return;
        }
        Ok(Err(e)) => {
            crate::warn_limited!(error = %e, "malformed open request");
            send.reset(1);
            return;
        }
        Err(_) => {
            send.reset(1);
            return;
        }
    };
    let id = open.session_id;
    let Some(_permit) = permit else {
        reject(
            &mut send,
            id,
            ErrorCode::Unavailable,
            format!("agent is at its limit of {} sessions", limits.max_sessions),
        )
        .await;
        return;
    };
    if open.request.is_interactive() {
        send.prefer();
    }
    let result = match open.request {
        SessionRequest::Exec(req) => exec(id, req, send, recv, limits).await,
        SessionRequest::Shell(req) => shell(id, req, send, recv, limits).await,
        SessionRequest::Tcp(req) => tcp(id, req, send, recv, limits).await,
        SessionRequest::TcpByName(req) => tcp_by_name(id, req, send, recv, limits).await,
        SessionRequest::Rdp => configured(id, send, recv, (&limits.rdp_address, "rdp", "RDP")).await,
        SessionRequest::Ssh => configured(id, send, recv, (&limits.ssh_address, "ssh", "SSH passthrough")).await,
    };
    if let Err((mut send, Rejection(code, reason))) = result {
        info!(%id, ?code, %reason, "session rejected");
        reject(&mut send, id, code, reason).await;
    }
}

async fn reject(send: &mut SendStream, id: SessionId, code: ErrorCode, reason: String) {
    let _ = write_frame(send, &Message::Reject(Reject { session_id: id, code, reason })).await;
    let _ = send.finish();
}

type Outcome = Result<(), (SendStream, Rejection)>;

/// The OS account a session runs as: `user` is `None` when it is the agent's own user.
struct RunAs {
    user: Option<nix::unistd::User>,
    uid: nix::unistd::Uid,
    home: std::path::PathBuf,
    shell: String,
    name: String,
}

/// What a user sees when a session would run as root without a policy allowing it.
const ROOT_NOT_ALLOWED: &str = "this session would run as root and no policy allows root for you: \
     name an OS user for you in a policy statement (run_as = [\"deploy\"], also listed in this \
     agent's [limits] run_as) or allow root there (allow_root = true)";

/// The account a session runs as: `requested`, or the agent's own user when none is named.
/// Whatever the route, uid 0 needs `allow_root` from the gateway (a policy said so); a named
/// user other than the agent's own also needs the agent's local `run_as` (and `allow_root`
/// for root) and the agent running as root.
fn resolve_run_as(requested: Option<&str>, allow_root: bool, limits: &LocalLimits) -> Result<RunAs, Rejection> {
    let run_as = lookup_run_as(requested, limits)?;
    if run_as.uid.is_root() && !allow_root {
        return Err(Rejection(ErrorCode::Forbidden, ROOT_NOT_ALLOWED.into()));
    }
    Ok(run_as)
}

fn lookup_run_as(requested: Option<&str>, limits: &LocalLimits) -> Result<RunAs, Rejection> {
    use nix::unistd::{Uid, User};
    let me = User::from_uid(Uid::current()).ok().flatten();
    let describe = |u: &User, switch: bool| RunAs {
        uid: u.uid,
        home: u.dir.clone(),
        shell: u.shell.to_str().filter(|s| !s.is_empty()).unwrap_or(&limits.default_shell).to_owned(),
        name: u.name.clone(),
        user: if switch { Some(u.clone()) } else { None },
    };
    match requested {
        None => Ok(me.as_ref().map(|u| describe(u, false)).unwrap_or_else(|| RunAs {
            user: None,
            uid: Uid::current(),
            home: "/".into(),
            shell: limits.default_shell.clone(),
            name: Uid::current().to_string(),
        })),
        Some(name) if me.as_ref().is_some_and(|u| u.name == name) => me
            .as_ref()
            .map(|u| describe(u, false))
            .ok_or_else(|| Rejection(ErrorCode::Internal, "cannot look up the agent's own user".into())),
        Some(name) => {
            if name == "root" && !limits.allow_root {
                return Err(Rejection(
                    ErrorCode::Forbidden,
                    "running as root is not allowed by this agent's local configuration".into(),
                ));
            }
            if !limits.run_as.iter().any(|u| u == name) {
                return Err(Rejection(
                    ErrorCode::Forbidden,
                    format!("run-as user {name:?} is not allowed by this agent's local configuration"),
                ));
            }
            if !Uid::effective().is_root() {
                return Err(Rejection(
                    ErrorCode::Forbidden,
                    format!("agent is not running as root and cannot switch to {name:?}"),
                ));
            }
            let user = User::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| Rejection(ErrorCode::BadRequest, format!("no such user {name:?} on this host")))?;
            if user.uid.is_root() && !limits.allow_root {
                // Another name for uid 0 (e.g. `toor`) is root all the same.
                return Err(Rejection(
                    ErrorCode::Forbidden,
                    format!("{name:?} is root (uid 0), which this agent's local configuration does not allow"),
                ));
            }
            Ok(describe(&user, true))
        }
    }
}

fn base_env(run_as: &RunAs) -> Vec<(String, String)> {
    vec![
        ("HOME".into(), run_as.home.display().to_string()),
        ("USER".into(), run_as.name.clone()),
        ("LOGNAME".into(), run_as.name.clone()),
        ("SHELL".into(), run_as.shell.clone()),
        ("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()),
    ]
}

fn workdir(run_as: &RunAs) -> std::path::PathBuf {
    if run_as.home.is_dir() { run_as.home.clone() } else { "/".into() }
}

fn parse_signal(name: &str) -> Option<nix::sys::signal::Signal> {
    use std::str::FromStr;
    nix::sys::signal::Signal::from_str(&format!("SIG{}", name.trim_start_matches("SIG"))).ok()
}

fn signal_group(pid: Option<u32>, name: &str) {
    let (Some(pid), Some(sig)) = (pid, parse_signal(name)) else {
        debug!(signal = name, "ignoring unknown signal or exited process");
        return;
    };
    let Ok(pid) = i32::try_from(pid) else { return };
    // Each session's process leads its own process group, so the whole job gets the signal.
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), sig);
}

fn exit_of(status: std::process::ExitStatus) -> Exit {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => Exit { code, signal: None },
        (None, Some(sig)) => Exit {
            code: 128 + sig,
            signal: nix::sys::signal::Signal::try_from(sig)
                .ok()
                .map(|s| s.as_str().trim_start_matches("SIG").to_owned()),
        },
        (None, None) => Exit { code: 255, signal: None },
    }
}

/// Owns the send half: everything the agent says on a session goes through this queue.
fn spawn_writer(mut send: SendStream) -> (mpsc::Sender<Message>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Message>(OUTBOUND_QUEUE);
    let task = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if write_frame(&mut send, &msg).await.is_err() {
                return;
            }
        }
        let _ = send.finish();
    });
    (tx, task)
}

async fn pump<R: AsyncRead + Unpin>(mut reader: R, tx: mpsc::Sender<Message>, wrap: fn(Vec<u8>) -> Message) {
    let mut buf = vec![0u8; postern_proto::MAX_DATA_CHUNK];
    loop {
        match reader.read(&mut buf).await {
            // EIO on a PTY master means the last slave closed: normal end of output.
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send(wrap(buf.get(..n).unwrap_or_default().to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn exec(
    id: SessionId,
    req: ExecRequest,
    send: SendStream,
    mut recv: RecvStream,
    limits: &LocalLimits,
) -> Outcome {
    let run_as = match resolve_run_as(req.run_as.as_deref(), req.allow_root, limits) {
        Ok(r) => r,
        Err(rej) => return Err((send, rej)),
    };
    let mut cmd = match &req.command {
        ExecCommand::Shell(c) => {
            let mut cmd = tokio::process::Command::new(&run_as.shell);
            cmd.arg("-c").arg(c);
            cmd
        }
        ExecCommand::Argv(argv) => {
            let Some((prog, args)) = argv.split_first() else {
                return Err((send, Rejection(ErrorCode::BadRequest, "empty command".into())));
            };
            let mut cmd = tokio::process::Command::new(prog);
            cmd.args(args);
            cmd
        }
    };
    cmd.env_clear()
        .envs(base_env(&run_as))
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .current_dir(workdir(&run_as))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    if let Some(u) = &run_as.user {
        cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Err((send, Rejection(ErrorCode::BadRequest, format!("cannot start command: {e}")))),
    };
    let pid = child.id();
    info!(%id, pid, user = %run_as.name, "exec started");
    let (tx, writer) = spawn_writer(send);
    if tx.send(Message::Accept(Accept { session_id: id })).await.is_err() {
        return Ok(());
    }
    let mut stdin = child.stdin.take();
    let out = child.stdout.take().map(|o| tokio::spawn(pump(o, tx.clone(), Message::Stdout)));
    let err = child.stderr.take().map(|e| tokio::spawn(pump(e, tx.clone(), Message::Stderr)));

    let mut input_open = true;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            frame = read_frame(&mut recv, StreamKind::Session), if input_open => match frame {
                Ok(Some(Message::Stdin(data))) => {
                    if let Some(s) = stdin.as_mut() {
                        // A command that does not read its input blocks this write; the
                        // gateway ending the session (a reset) must still stop it.
                        tokio::select! {
                            r = s.write_all(&data) => if r.is_err() { stdin = None },
                            _ = recv.received_reset() => {
                                debug!(%id, "session ended while input was pending; killing the command");
                                signal_group(pid, "KILL");
                                break child.wait().await;
                            }
                        }
                    }
                }
                Ok(Some(Message::Eof)) => stdin = None,
                Ok(Some(Message::Signal(s))) => signal_group(pid, &s.name),
                Ok(Some(Message::Resize(_))) => {}
                Ok(None) => {
                    // The gateway finished sending: no more input, the command keeps running.
                    stdin = None;
                    input_open = false;
                }
                Ok(Some(other)) => {
                    crate::warn_limited!(%id, kind = ?other.kind(), "unexpected frame in exec session; ending it");
                    signal_group(pid, "KILL");
                    break child.wait().await;
                }
                Err(e) => {
                    debug!(%id, error = %e, "session stream lost; killing the command");
                    signal_group(pid, "KILL");
                    break child.wait().await;
                }
            }
        }
    };
    drop(stdin);
    for task in [out, err].into_iter().flatten() {
        let abort = task.abort_handle();
        if tokio::time::timeout(DRAIN_AFTER_EXIT, task).await.is_err() {
            abort.abort();
        }
    }
    let exit = match status {
        Ok(s) => exit_of(s),
        Err(_) => Exit { code: 255, signal: None },
    };
    info!(%id, code = exit.code, "exec ended");
    let _ = tx.send(Message::Exit(exit)).await;
    drop(tx);
    let _ = writer.await;
    Ok(())
}

async fn shell(
    id: SessionId,
    req: ShellRequest,
    send: SendStream,
    mut recv: RecvStream,
    limits: &LocalLimits,
) -> Outcome {
    let run_as = match resolve_run_as(req.run_as.as_deref(), req.allow_root, limits) {
        Ok(r) => r,
        Err(rej) => return Err((send, rej)),
    };
    let (pty, pts) = match pty_process::open() {
        Ok(p) => p,
        Err(e) => return Err((send, Rejection(ErrorCode::Unavailable, format!("cannot allocate a PTY: {e}")))),
    };
    let _ = pty.resize(pty_process::Size::new(req.rows.max(1), req.cols.max(1)));
    let mut cmd = pty_process::Command::new(&run_as.shell);
    cmd = match &req.command {
        Some(c) => cmd.arg("-c").arg(c),
        None => {
            // A leading dash in argv[0] makes it a login shell, as sshd does.
            let base = run_as.shell.rsplit('/').next().unwrap_or("sh");
            cmd.arg0(format!("-{base}"))
        }
    };
    cmd = cmd
        .env_clear()
        .envs(base_env(&run_as))
        .env("TERM", if req.term.is_empty() { "dumb" } else { &req.term })
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .current_dir(workdir(&run_as))
        .kill_on_drop(true);
    if let Some(u) = &run_as.user {
        cmd = cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
    }
    let mut child = match cmd.spawn(pts) {
        Ok(c) => c,
        Err(e) => return Err((send, Rejection(ErrorCode::BadRequest, format!("cannot start shell: {e}")))),
    };
    let pid = child.id();
    info!(%id, pid, user = %run_as.name, "shell started");
    let (tx, writer) = spawn_writer(send);
    if tx.send(Message::Accept(Accept { session_id: id })).await.is_err() {
        return Ok(());
    }
    let (reader, mut writer_half) = pty.into_split();
    let out = tokio::spawn(pump(reader, tx.clone(), Message::Stdout));
    let mut input_open = true;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            frame = read_frame(&mut recv, StreamKind::Session), if input_open => match frame {
                Ok(Some(Message::Stdin(data))) => {
                    // A terminal whose program does not read blocks this write; the gateway
                    // ending the session (a reset) must still stop it.
                    tokio::select! {
                        _ = writer_half.write_all(&data) => {}
                        _ = recv.received_reset() => {
                            debug!(%id, "session ended while input was pending; hanging up the shell");
                            signal_group(pid, "HUP");
                            break child.wait().await;
                        }
                    }
                }
                Ok(Some(Message::Resize(r))) => {
                    let _ = writer_half.resize(pty_process::Size::new(r.rows.max(1), r.cols.max(1)));
                }
                Ok(Some(Message::Signal(s))) => signal_group(pid, &s.name),
                // On a terminal, end of input is a byte the user types (^D), not a frame.
                Ok(Some(Message::Eof)) => {}
                Ok(None) => input_open = false,
                Ok(Some(other)) => {
                    crate::warn_limited!(%id, kind = ?other.kind(), "unexpected frame in shell session; ending it");
                    signal_group(pid, "KILL");
                    break child.wait().await;
                }
                Err(e) => {
                    debug!(%id, error = %e, "session stream lost; hanging up the shell");
                    signal_group(pid, "HUP");
                    break child.wait().await;
                }
            }
        }
    };
    drop(writer_half);
    let abort = out.abort_handle();
    if tokio::time::timeout(DRAIN_AFTER_EXIT, out).await.is_err() {
        abort.abort();
    }
    let exit = match status {
        Ok(s) => exit_of(s),
        Err(_) => Exit { code: 255, signal: None },
    };
    info!(%id, code = exit.code, "shell ended");
    let _ = tx.send(Message::Exit(exit)).await;
    drop(tx);
    let _ = writer.await;
    Ok(())
}

async fn tcp(id: SessionId, req: TcpRequest, send: SendStream, recv: RecvStream, limits: &LocalLimits) -> Outcome {
    let target = format!("{}:{}", req.host, req.port);
    let addrs = match resolve(&target).await {
        Ok(a) => a,
        Err(r) => return Err((send, r)),
    };
    // Check the resolved address we will actually connect to, not the name.
    let Some(addr) = addrs.into_iter().find(|a| limits.tcp_allowed(a.ip())) else {
        return Err((
            send,
            Rejection(
                ErrorCode::Forbidden,
                format!("destination {target} is not allowed by this agent's local configuration (tcp_allow)"),
            ),
        ));
    };
    relay_tcp(id, &target, addr, send, recv, "tcp forward", Message::Accept(Accept { session_id: id })).await
}

/// A name: resolved here, where the connection is made, and every address it resolves to
/// is checked against the policy's deny ranges and `tcp_allow` before one is dialled, so
/// a name cannot reach an address the policy denies. The answer names the address.
async fn tcp_by_name(
    id: SessionId,
    req: TcpByNameRequest,
    send: SendStream,
    recv: RecvStream,
    limits: &LocalLimits,
) -> Outcome {
    let mut deny = Vec::with_capacity(req.deny.len());
    for d in &req.deny {
        match d.parse::<IpNet>() {
            Ok(n) => deny.push(n),
            Err(_) => return Err((send, Rejection(ErrorCode::BadRequest, format!("bad deny range {d:?}")))),
        }
    }
    let target = format!("{}:{}", req.host, req.port);
    let addrs = match resolve(&target).await {
        Ok(a) => a,
        Err(r) => return Err((send, r)),
    };
    let Some(addr) = addrs.iter().copied().find(|a| !policy_denies(&deny, a.ip()) && limits.tcp_allowed(a.ip())) else {
        let denied = addrs.iter().any(|a| policy_denies(&deny, a.ip()));
        let why = if denied { "denied by policy" } else { "not allowed by this agent's local configuration" };
        return Err((
            send,
            Rejection(ErrorCode::Forbidden, format!("destination {target} resolves only to addresses {why}")),
        ));
    };
    let answer = Message::Connected(Connected { session_id: id, address: addr.to_string() });
    relay_tcp(id, &target, addr, send, recv, "tcp forward", answer).await
}

/// A configured destination: (address, setting, name).
type Service<'a> = (&'a str, &'static str, &'static str);

/// RDP and SSH passthrough go where this agent's configuration says (`rdp_address`,
/// `ssh_address`), never where the gateway asks.
async fn configured(id: SessionId, send: SendStream, recv: RecvStream, service: Service<'_>) -> Outcome {
    let (address, setting, what) = service;
    let target = address.trim();
    if target.is_empty() {
        let reason = format!("{what} is turned off on this instance ({setting}_address)");
        return Err((send, Rejection(ErrorCode::Forbidden, reason)));
    }
    let addr = match resolve(target).await {
        Ok(a) => a.into_iter().next(),
        Err(r) => return Err((send, r)),
    };
    let Some(addr) = addr else {
        return Err((send, Rejection(ErrorCode::Unavailable, format!("cannot resolve {what} address {target}"))));
    };
    relay_tcp(id, target, addr, send, recv, setting, Message::Accept(Accept { session_id: id })).await
}

async fn resolve(target: &str) -> Result<Vec<SocketAddr>, Rejection> {
    match tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host(target)).await {
        Ok(Ok(a)) => Ok(a.collect()),
        Ok(Err(e)) => Err(Rejection(ErrorCode::BadRequest, format!("cannot resolve {target}: {e}"))),
        Err(_) => Err(Rejection(ErrorCode::Unavailable, format!("resolving {target} timed out"))),
    }
}

/// Connect to `addr`, accept the session with `answer`, and move raw bytes both ways until
/// both ends finish.
async fn relay_tcp(
    id: SessionId,
    target: &str,
    addr: SocketAddr,
    mut send: SendStream,
    mut recv: RecvStream,
    what: &'static str,
    answer: Message,
) -> Outcome {
    let stream = match tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err((send, Rejection(ErrorCode::Unavailable, format!("connecting to {target} failed: {e}"))));
        }
        Err(_) => return Err((send, Rejection(ErrorCode::Unavailable, format!("connecting to {target} timed out")))),
    };
    let _ = stream.set_nodelay(true);
    if write_frame(&mut send, &answer).await.is_err() {
        return Ok(());
    }
    info!(%id, %addr, "{what} opened");
    let (tcp_read, mut tcp_write) = stream.into_split();
    // The gateway resets the stream when it ends the session (terminated, revoked, maximum
    // length): then the connection closes both ways at once, even if the destination is
    // silent and would otherwise hold it half open.
    let reset = tokio_util::sync::CancellationToken::new();
    let up = async {
        let n = match tokio::io::copy(&mut recv, &mut tcp_write).await {
            Ok(n) => n,
            Err(_) => {
                reset.cancel();
                0
            }
        };
        let _ = tcp_write.shutdown().await;
        n
    };
    let down = async {
        let mut r = tokio::io::BufReader::with_capacity(64 * 1024, tcp_read);
        let n = tokio::select! {
            n = tokio::io::copy_buf(&mut r, &mut send) => n.unwrap_or(0),
            _ = reset.cancelled() => 0,
        };
        let _ = send.finish();
        n
    };
    let (sent, received) = tokio::join!(up, down);
    info!(%id, bytes_to_target = sent, bytes_from_target = received, "{what} closed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_tcp_allow_is_loopback_only() {
        let l = LocalLimits::default();
        assert!(l.tcp_allowed("127.0.0.1".parse().unwrap()));
        assert!(l.tcp_allowed("127.5.6.7".parse().unwrap()));
        assert!(l.tcp_allowed("::1".parse().unwrap()));
        assert!(l.tcp_allowed("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!l.tcp_allowed("10.0.0.1".parse().unwrap()));
        assert!(!l.tcp_allowed("::ffff:10.0.0.1".parse().unwrap()));
        assert!(!l.tcp_allowed("192.168.1.1".parse().unwrap()));
        let open = LocalLimits { tcp_allow: vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()], ..l };
        assert!(!open.tcp_allowed("0.0.0.0".parse().unwrap()), "0.0.0.0 reaches this host's own listeners");
        assert!(!open.tcp_allowed("::".parse().unwrap()));
        assert!(!open.tcp_allowed("::ffff:0.0.0.0".parse().unwrap()));
    }

    #[test]
    fn policy_deny_ranges_cover_mapped_addresses() {
        let deny: Vec<IpNet> = vec!["127.0.0.1/32".parse().unwrap(), "::1/128".parse().unwrap()];
        assert!(policy_denies(&deny, "127.0.0.1".parse().unwrap()));
        assert!(policy_denies(&deny, "::ffff:127.0.0.1".parse().unwrap()));
        assert!(policy_denies(&deny, "::1".parse().unwrap()));
        assert!(!policy_denies(&deny, "127.0.0.2".parse().unwrap()));
    }

    #[test]
    fn root_needs_explicit_permission() {
        let am_root = nix::unistd::Uid::current().is_root();
        let forbidden = |r: Result<RunAs, Rejection>| r.is_err_and(|Rejection(c, _)| c == ErrorCode::Forbidden);
        let l = LocalLimits { run_as: vec!["root".into()], ..LocalLimits::default() };
        // Named root: the local allow_root is needed (unless root is the agent's own user).
        assert!(forbidden(resolve_run_as(Some("root"), true, &l)) || am_root);
        let l = LocalLimits::default();
        assert!(resolve_run_as(Some("nobody-such-user"), true, &l).is_err());
        // The agent's own user: fine unless that is root and no policy allows root.
        assert!(resolve_run_as(None, true, &l).is_ok());
        assert_eq!(forbidden(resolve_run_as(None, false, &l)), am_root);
        if am_root {
            let Err(Rejection(_, message)) = resolve_run_as(Some("root"), false, &l) else { panic!("root allowed") };
            assert!(message.contains("allow_root") && message.contains("run_as"), "{message}");
        }
    }

    #[test]
    fn signals_by_ssh_name() {
        assert_eq!(parse_signal("INT"), Some(nix::sys::signal::Signal::SIGINT));
        assert_eq!(parse_signal("TERM"), Some(nix::sys::signal::Signal::SIGTERM));
        assert_eq!(parse_signal("BOGUS"), None);
    }
}
