//! Helpers for end-to-end tests: start the real `postern` and `postern-agent` binaries in
//! temporary directories on loopback, run commands against them, and clean up on drop.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod oidc;
pub use oidc::*;

/// Directory holding the workspace binaries (`target/debug` next to the test executable).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_owned();
    for b in ["postern", "postern-agent"] {
        assert!(
            dir.join(b).exists(),
            "{} not found: build the binaries first (cargo build --workspace --bins), as tests/run.sh does",
            dir.join(b).display()
        );
    }
    dir
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A port that was free a moment ago on 127.0.0.1 for both UDP and TCP: a gateway's tunnel
/// listens on both with one number (QUIC, and the TCP fallback).
pub fn free_udp_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Poll `cond` every 25 ms until it holds or `timeout` passes; returns the time it took.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A child process killed (and reaped) on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }
    /// Wait for exit with a bound; returns the exit code (None if killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(start.elapsed() < timeout, "process did not exit within {timeout:?}; log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(25));
        }
    }
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn spawn_logged(mut cmd: Command, log: &Path) -> Proc {
    let out = std::fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    cmd.stdin(Stdio::null()).stdout(out).stderr(err).env("POSTERN_LOG", "info,postern_tunnel=debug");
    Proc { child: cmd.spawn().unwrap(), log: log.to_owned() }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        drop(self.proc.take());
        self.keep_dir_if_asked();
    }
}

/// A gateway process with its own data directory.
pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub listen: String,
    /// TCP port of the SSH front door on 127.0.0.1.
    pub ssh_port: u16,
    pub proc: Option<Proc>,
}

impl Gateway {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Start on 127.0.0.1 with extra `gateway.toml` content.
    pub fn start(extra_config: &str) -> Gateway {
        Self::start_on(&format!("127.0.0.1:{}", free_udp_port()), extra_config)
    }

    pub fn start_on(listen: &str, extra_config: &str) -> Gateway {
        let mut gw = Self::prepare_on(listen, extra_config);
        gw.restart();
        gw
    }

    /// Write the configuration without starting the process (see [`Gateway::config_path`]).
    pub fn prepare_on(listen: &str, extra_config: &str) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let gw = Gateway { dir, listen: listen.to_owned(), ssh_port: free_tcp_port(), proc: None };
        std::fs::write(
            gw.dir.path().join("gateway.toml"),
            format!(
                "data_dir = {:?}\n[tunnel]\nlisten = {:?}\n[ssh]\nlisten = \"127.0.0.1:{}\"\npublic_host = \"127.0.0.1\"\n{extra_config}\n",
                gw.data_dir(),
                listen,
                gw.ssh_port
            ),
        )
        .unwrap();
        gw
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("gateway.toml")
    }

    /// `postern --config GATEWAY.TOML ARGS` (the offline commands, and `gateway` itself when
    /// it is expected to refuse to start): bounded by 60 seconds.
    pub fn postern_config(&self, args: &[&str]) -> Output {
        Command::new("timeout")
            .arg("60")
            .arg(bin("postern"))
            .arg("--config")
            .arg(self.config_path())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// (Re)start the process and wait until its admin socket answers.
    pub fn restart(&mut self) {
        let mut cmd = Command::new(bin("postern"));
        cmd.arg("--config").arg(self.dir.path().join("gateway.toml")).arg("gateway");
        let n = std::fs::read_dir(self.dir.path()).map(|d| d.count()).unwrap_or(0);
        self.proc = Some(spawn_logged(cmd, &self.dir.path().join(format!("gateway-{n}.log"))));
        let sock = self.data_dir().join("admin.sock");
        let proc = self.proc.as_mut().expect("just started");
        wait_until("gateway admin socket", Duration::from_secs(20), || {
            // A gateway that exited (a port taken meanwhile, a bad config) says why at once.
            if let Ok(Some(status)) = proc.child.try_wait() {
                panic!("the gateway exited ({status}) before its admin socket answered:\n{}", proc.log_text());
            }
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
    }

    /// With `POSTERN_KEEP_TEST_DIRS` set, the gateway's directory (config, data, audit log,
    /// logs) is left in place when the test ends, for debugging and for collecting real
    /// audit events as documentation examples.
    fn keep_dir_if_asked(&mut self) {
        if std::env::var_os("POSTERN_KEEP_TEST_DIRS").is_some()
            && let Ok(replacement) = tempfile::tempdir()
        {
            let kept = std::mem::replace(&mut self.dir, replacement).keep();
            eprintln!("kept gateway directory {}", kept.display());
        }
    }

    /// Graceful stop (SIGTERM), bounded.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.signal(nix::sys::signal::Signal::SIGTERM);
            assert_eq!(
                p.wait_exit(Duration::from_secs(10)),
                Some(0),
                "gateway did not stop cleanly:\n{}",
                p.log_text()
            );
        }
    }

    /// Crash: SIGKILL, no chance to close connections or flush anything, then reaped.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.signal(nix::sys::signal::Signal::SIGKILL);
            assert_eq!(p.wait_exit(Duration::from_secs(10)), None, "the gateway was not killed by the signal");
        }
    }

    /// Write a known_hosts file trusting this gateway's host CA: the `@cert-authority` line
    /// `postern ssh-config` prints.
    pub fn write_known_hosts(&self, path: &Path) {
        let out = self.postern(&["ssh-config", "--known-hosts-file", "/dev/null"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let ca = text(&out.stdout).lines().find(|l| l.starts_with("@cert-authority")).unwrap().to_owned();
        std::fs::write(path, format!("{ca}\n")).unwrap();
    }

    pub fn postern(&self, args: &[&str]) -> Output {
        Command::new(bin("postern"))
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    pub fn postern_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write;
        let mut child = Command::new(bin("postern"))
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }

    /// `postern token create --json`: (token, ca_pin).
    pub fn token(&self, extra: &[&str]) -> (String, String) {
        let mut args = vec!["token", "create", "--json"];
        args.extend_from_slice(extra);
        let out = self.postern(&args);
        assert!(out.status.success(), "token create failed: {}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        (v["token"].as_str().unwrap().to_owned(), v["ca_pin"].as_str().unwrap().to_owned())
    }

    pub fn instances(&self) -> Vec<Value> {
        let out = self.postern(&["instances", "--json"]);
        assert!(out.status.success(), "instances failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap()
    }

    pub fn is_online(&self, name: &str) -> bool {
        self.instances().iter().any(|i| i["name"] == name && i["online"] == true)
    }

    /// The event log's segment files (`DATA_DIR/audit/events-*`), oldest first.
    pub fn audit_segments(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.data_dir().join("audit"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.retain(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("events-")));
        files.sort();
        files
    }

    /// The whole event log as text (clear segments).
    pub fn audit_text(&self) -> String {
        self.audit_segments().iter().map(|p| std::fs::read_to_string(p).unwrap_or_default()).collect()
    }

    /// Every complete event in the log. A running gateway may be writing the last line as
    /// it is read: only lines that end in a newline are complete.
    pub fn audit_events(&self) -> Vec<Value> {
        self.audit_text()
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// An enrolled agent (state in its own directory) and, once started, its process.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub name: String,
    pub proc: Option<Proc>,
    /// Command prefix, e.g. `ip netns exec NS`.
    pub prefix: Vec<String>,
}

impl Agent {
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn command(prefix: &[String]) -> Command {
        match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin("postern-agent"));
                c
            }
            None => Command::new(bin("postern-agent")),
        }
    }

    /// Run `postern-agent join`; returns its output without asserting success.
    pub fn try_join(prefix: &[String], gateway: &str, token: &str, pin: &str, state_dir: &Path) -> Output {
        Self::command(prefix)
            .arg("--state-dir")
            .arg(state_dir)
            .args(["join", "--gateway", gateway, "--token", token, "--ca-pin", pin])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Join with a fresh token named `name` and start `postern-agent run`; waits until online.
    pub fn start(gw: &Gateway, name: &str, prefix: Vec<String>, gateway_addr: &str) -> Agent {
        Self::start_labeled(gw, name, "env=test", prefix, gateway_addr)
    }

    /// As [`Agent::start`], with the token's labels (`env=prod,role=db`).
    pub fn start_labeled(gw: &Gateway, name: &str, labels: &str, prefix: Vec<String>, gateway_addr: &str) -> Agent {
        Self::start_with(gw, name, labels, prefix, gateway_addr, &[])
    }

    /// As [`Agent::start_labeled`], with more `postern-agent run` arguments.
    pub fn start_with(
        gw: &Gateway,
        name: &str,
        labels: &str,
        prefix: Vec<String>,
        gateway_addr: &str,
        run_args: &[&str],
    ) -> Agent {
        let (token, pin) = gw.token(&["--name", name, "--labels", labels]);
        let dir = tempfile::tempdir().unwrap();
        let mut agent = Agent { dir, name: name.to_owned(), proc: None, prefix };
        let out = Self::try_join(&agent.prefix, gateway_addr, &token, &pin, &agent.state_dir());
        assert!(
            out.status.success(),
            "join failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        agent.run_with(run_args);
        wait_until(&format!("agent {name} online"), Duration::from_secs(20), || gw.is_online(name));
        agent
    }

    pub fn run(&mut self) {
        self.run_with(&[]);
    }

    /// `postern-agent run` with more arguments (e.g. `--config FILE`).
    pub fn run_with(&mut self, extra: &[&str]) {
        let mut cmd = Self::command(&self.prefix);
        cmd.arg("--state-dir").arg(self.state_dir()).arg("run").args(extra);
        self.proc = Some(spawn_logged(cmd, &self.dir.path().join("agent.log")));
    }
}

/// A new ed25519 key pair without passphrase at `path` (and `path.pub`).
pub fn ssh_keygen(path: &Path, comment: &str) {
    sh(&format!("ssh-keygen -q -t ed25519 -N '' -C {comment} -f {}", path.display()));
}

/// Run a shell command (setup of namespaces and the like); panics with its output on failure.
pub fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Drive `cmd` (an interactive shell client) in a real terminal under tmux: set a prompt,
/// check the PTY size, resize the window, interrupt a remote command with Ctrl-C, and exit
/// with status 4. Panics with the screen contents on any failure.
pub fn drive_interactive_terminal(cmd: &str) {
    let sock = format!("postern-e2e-{}-{}", std::process::id(), free_tcp_port());
    let tmux = |args: &[&str]| Command::new("tmux").arg("-L").arg(&sock).args(args).output().unwrap();
    let screen = || text(&tmux(&["capture-pane", "-p", "-t", "t"]).stdout);
    // The client's exit status is printed by a wrapper shell rather than read from tmux,
    // which reaps its pane process lazily.
    let wrapped = format!("{cmd}; echo client-exit=$?; sleep 600");
    let out = tmux(&["new-session", "-d", "-x", "100", "-y", "30", "-s", "t", &wrapped]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    struct Kill(String);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = Command::new("tmux").args(["-L", &self.0, "kill-server"]).output();
        }
    }
    let _kill = Kill(sock.clone());
    let send = |keys: &[&str]| {
        let mut args = vec!["send-keys", "-t", "t"];
        args.extend_from_slice(keys);
        assert!(tmux(&args).status.success());
    };
    let wait_screen = |what: &str| {
        let start = std::time::Instant::now();
        while !screen().contains(what) {
            assert!(start.elapsed() < Duration::from_secs(10), "no {what:?} on the screen:\n{}", screen());
            std::thread::sleep(Duration::from_millis(25));
        }
    };

    send(&["export PS1='P''> '", "Enter"]);
    // capture-pane trims trailing blanks: look for the prompt at the start of a line.
    wait_until("prompt", Duration::from_secs(10), || screen().lines().any(|l| l.starts_with("P>")));
    send(&["stty size", "Enter"]);
    wait_screen("30 100");

    // Resize the terminal: the remote PTY follows.
    assert!(tmux(&["resize-window", "-t", "t", "-x", "120", "-y", "40"]).status.success());
    wait_until("window resized", Duration::from_secs(5), || {
        text(&tmux(&["display", "-p", "-t", "t", "#{window_width}x#{window_height}"]).stdout).trim() == "120x40"
    });
    send(&["clear; stty size", "Enter"]);
    wait_screen("40 120");

    // Ctrl-C interrupts the remote foreground process, not the client.
    let sleeper = format!("sleep {}", 4000 + std::process::id() % 1000);
    send(&[&format!("clear; {sleeper}; echo after-$((20+22))"), "Enter"]);
    wait_until("sleep running", Duration::from_secs(5), || {
        Command::new("pgrep").args(["-f", &sleeper]).output().unwrap().status.success()
    });
    send(&["C-c"]);
    send(&["echo alive-$((40+2))", "Enter"]);
    wait_screen("alive-42");
    assert!(!screen().contains("after-42"), "the interrupted command must not have continued");

    send(&["exit 4", "Enter"]);
    wait_screen("client-exit=4");
}

/// A network namespace with a veth link to the host and an inbound-drop firewall.
pub struct NetNs {
    pub name: String,
    pub host_if: String,
    pub host_ip: String,
    pub ns_ip: String,
}

impl NetNs {
    pub fn create() -> NetNs {
        let id = std::process::id() % 60000;
        let name = format!("pst{id}");
        let host_if = format!("pvh{id}");
        let ns_if = format!("pvn{id}");
        // A /30 from 10.231.0.0/16 chosen by pid, used only between host and this namespace.
        let n = (id % 16000) * 4;
        let (a, b) = (n / 256, n % 256);
        let host_ip = format!("10.231.{a}.{}", b + 1);
        let ns_ip = format!("10.231.{a}.{}", b + 2);
        let ns = NetNs { name: name.clone(), host_if: host_if.clone(), host_ip: host_ip.clone(), ns_ip: ns_ip.clone() };
        sh(&format!("ip netns add {name}"));
        sh(&format!("ip netns exec {name} ip link set lo up"));
        sh(&format!("ip link add {host_if} type veth peer name {ns_if}"));
        sh(&format!("ip link set {ns_if} netns {name}"));
        sh(&format!("ip addr add {host_ip}/30 dev {host_if} && ip link set {host_if} up"));
        sh(&format!("ip netns exec {name} ip addr add {ns_ip}/30 dev {ns_if}"));
        sh(&format!("ip netns exec {name} ip link set {ns_if} up"));
        sh(&format!(
            "ip netns exec {name} nft -f - <<'EOF'\n\
             table inet postern_test {{\n\
               chain input {{\n\
                 type filter hook input priority 0; policy drop;\n\
                 ct state established,related accept\n\
                 iif lo accept\n\
               }}\n\
             }}\nEOF"
        ));
        ns
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// `asciinema cat CAST` on a terminal of its own. asciinema opens `/dev/tty` to put it in
/// raw mode: under CI there is none (`setsid bash .ci/run </dev/null`), and on a developer's
/// terminal it would flip that terminal to raw mode. `script` gives it a private PTY as its
/// controlling terminal; what it prints still goes to files, returned as the output.
pub fn asciinema_cat(cast: &Path) -> Output {
    on_own_terminal(r#"exec asciinema cat "$ARG""#, cast)
}

/// Run the `sh` command `cmd` (`$ARG` is `arg`) with a new PTY as its controlling
/// terminal; its stdout and stderr are captured apart from the terminal.
pub fn on_own_terminal(cmd: &str, arg: &Path) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let status = Command::new("script")
        .args(["-qec", &format!(r#"{{ {cmd}; }} >"$OUT" 2>"$ERR""#), "/dev/null"])
        .env("ARG", arg)
        .env("OUT", &out)
        .env("ERR", &err)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("script (util-linux) is installed");
    Output { status, stdout: std::fs::read(out).unwrap_or_default(), stderr: std::fs::read(err).unwrap_or_default() }
}

/// A throwaway PostgreSQL server on loopback (`initdb` refuses root: run as `postgres`).
pub struct Postgres {
    dir: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
}

impl Postgres {
    pub fn start() -> Postgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server (apt-get install postgresql)")
            .flatten()
            .map(|e| e.path().join("bin"))
            .find(|b| b.join("initdb").exists())
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let port = free_tcp_port();
        let data = dir.path().join("data");
        sh(&format!("chown -R postgres {}", dir.path().display()));
        sh(&format!(
            "runuser -u postgres -- {}/initdb -D {} -U postgres -A trust --no-sync >/dev/null",
            bin.display(),
            data.display()
        ));
        let pg = Postgres { dir, port, bin };
        pg.resume();
        pg
    }

    /// Stop the server (fast shutdown: connections are closed), keeping its data.
    pub fn pause(&self) {
        sh(&format!(
            "runuser -u postgres -- {}/pg_ctl -D {}/data -m fast -w stop >/dev/null",
            self.bin.display(),
            self.dir.path().display()
        ));
    }

    /// Start the server (again), waiting until it accepts connections.
    pub fn resume(&self) {
        let dir = self.dir.path().display();
        sh(&format!(
            "runuser -u postgres -- {}/pg_ctl -D {dir}/data -l {dir}/log -w -o '-c listen_addresses=127.0.0.1 -p {} -k {dir}' start >/dev/null",
            self.bin.display(),
            self.port
        ));
    }

    /// Turn TLS on and refuse connections without it (`hostssl` only): a CA and a server
    /// certificate for 127.0.0.1 made with openssl. Returns the CA certificate's path.
    pub fn require_tls(&self) -> PathBuf {
        let d = self.dir.path();
        let data = d.join("data");
        sh(&format!(
            "cd {d} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
             -subj /CN=test-db-ca -keyout ca.key -out ca.crt 2>/dev/null && \
             openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
             -keyout server.key -out server.csr 2>/dev/null && \
             printf 'subjectAltName=IP:127.0.0.1\\n' > san.ext && \
             openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
             -extfile san.ext -out server.crt 2>/dev/null && \
             cp server.crt server.key {data}/ && chown postgres {data}/server.crt {data}/server.key && \
             chmod 600 {data}/server.key && \
             printf 'local all all trust\\nhostssl all all 127.0.0.1/32 trust\\nhostnossl all all 0.0.0.0/0 reject\\n' > {data}/pg_hba.conf && \
             chown postgres {data}/pg_hba.conf",
            d = d.display(),
            data = data.display()
        ));
        self.sql("postgres", "ALTER SYSTEM SET ssl = on");
        self.sql("postgres", "SELECT pg_reload_conf()");
        let ready = || {
            Command::new("timeout")
                .args(["10", "psql", "-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-Atc"])
                .arg("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .env("PGSSLMODE", "require")
                .output()
                .is_ok_and(|o| text(&o.stdout).trim() == "t")
        };
        wait_until("PostgreSQL serving TLS", Duration::from_secs(10), ready);
        d.join("ca.crt")
    }

    /// Run `sql` in database `db` with psql; its output, trimmed (empty on failure).
    pub fn sql(&self, db: &str, sql: &str) -> String {
        let out = Command::new("timeout")
            .args(["30", "psql", "-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-d", db])
            .args(["-v", "ON_ERROR_STOP=1", "-Atc", sql])
            .output()
            .unwrap();
        assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
        text(&out.stdout).trim().to_owned()
    }

    /// A connection URL for a fresh, empty database `name` on this server.
    pub fn new_database(&self, name: &str) -> String {
        let out = Command::new("timeout")
            .args(["30", "psql", "-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-Atc"])
            .arg(format!("CREATE DATABASE {name}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--", "sh", "-c"])
            .arg(format!(
                "$(dirname $(ls -d /usr/lib/postgresql/*/bin | head -1))/bin/pg_ctl -D {}/data -m immediate stop",
                self.dir.path().display()
            ))
            .output();
    }
}

/// A cluster's shared parts: a PostgreSQL database and a master key, with the cluster keys
/// made by `postern cluster init`. Gateways join it with [`Cluster::config`].
pub struct Cluster {
    pub pg: Postgres,
    pub db: String,
    pub url: String,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    pub fn new(db: &str) -> Cluster {
        let cluster = Self::create(db);
        let out = cluster.init();
        assert!(out.status.success(), "cluster init: {}{}", text(&out.stdout), text(&out.stderr));
        cluster
    }

    /// The database and master key, without `cluster init`.
    pub fn create(db: &str) -> Cluster {
        let pg = Postgres::start();
        let url = pg.new_database(db);
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(bin("postern"))
            .args(["audit", "keygen"])
            .arg(dir.path().join("cluster.key"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        Cluster { pg, db: db.to_owned(), url, dir }
    }

    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("cluster.key")
    }

    /// `postern cluster init` with a config naming this cluster's store and master key.
    pub fn init(&self) -> Output {
        let config = self.dir.path().join("init.toml");
        std::fs::write(&config, self.config_without_id()).unwrap();
        Command::new("timeout")
            .arg("60")
            .arg(bin("postern"))
            .arg("--config")
            .arg(&config)
            .args(["cluster", "init"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn config_without_id(&self) -> String {
        format!("[store]\nurl = {:?}\n[cluster]\nkey_file = {:?}\n", self.url, self.key_file())
    }

    /// The `gateway.toml` lines that make a gateway the cluster's member `gateway_id`.
    pub fn config(&self, gateway_id: &str) -> String {
        format!("{}gateway_id = {gateway_id:?}\n", self.config_without_id())
    }

    pub fn sql(&self, sql: &str) -> String {
        self.pg.sql(&self.db, sql)
    }
}

/// A version 2 preconnection blob carrying `token`.
pub fn rdp_pcb(token: &str) -> Vec<u8> {
    let units: Vec<u16> = token.encode_utf16().chain([0]).collect();
    let size = 16 + 2 + units.len() * 2;
    let mut b = Vec::new();
    b.extend_from_slice(&(size as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&(units.len() as u16).to_le_bytes());
    for u in units {
        b.extend_from_slice(&u.to_le_bytes());
    }
    b
}

/// An X.224 Connection Request with cookie `mstshash=<user>` asking for TLS and CredSSP.
pub fn rdp_connection_request(user: &str) -> Vec<u8> {
    let cookie = format!("Cookie: mstshash={user}\r\n");
    let neg = [1u8, 0, 8, 0, 3, 0, 0, 0];
    let li = 6 + cookie.len() + neg.len();
    let total = 4 + 1 + li;
    let mut b = vec![3, 0, (total >> 8) as u8, total as u8, li as u8, 0xe0, 0, 0, 0, 0, 0];
    b.extend_from_slice(cookie.as_bytes());
    b.extend_from_slice(&neg);
    b
}

/// A real sshd on loopback, the target of passthrough.
pub struct Sshd {
    pub proc: Proc,
    pub port: u16,
    /// The host key's public line (`ssh-ed25519 AAAA… comment`).
    pub host_key_pub: String,
}

pub fn start_sshd(dir: &Path, authorized: &Path) -> Sshd {
    let port = free_tcp_port();
    let host_key = dir.join("sshd_host_key");
    ssh_keygen(&host_key, "sshd");
    std::fs::create_dir_all("/run/sshd").unwrap();
    let cfg = dir.join("sshd_config");
    std::fs::write(
        &cfg,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile {}\nAuthorizedKeysFile {}\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
             PermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n",
            host_key.display(),
            dir.join("sshd.pid").display(),
            authorized.display()
        ),
    )
    .unwrap();
    sh(&format!("/usr/sbin/sshd -t -f {}", cfg.display()));
    let mut cmd = Command::new("/usr/sbin/sshd");
    cmd.arg("-D").arg("-e").arg("-f").arg(&cfg);
    let proc = spawn_logged(cmd, &dir.join("sshd.log"));
    wait_until("sshd listening", Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    Sshd { proc, port, host_key_pub: std::fs::read_to_string(host_key.with_extension("pub")).unwrap() }
}
