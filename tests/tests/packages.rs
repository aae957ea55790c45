//! The Debian packages `postern` and `postern-agent` (docs/operations.md, "Install"): built
//! with cargo-deb from the debug binaries already built (CI has no time for a release
//! build), checked with dpkg-deb, installed with dpkg on this machine, used — the installed
//! gateway and agent, started as their units say, join and serve a real ssh session —,
//! installed again (as an upgrade), and purged.
//!
//! Packages are installed system-wide, so this is one test, run as root (as CI does), and
//! robust to re-runs: it purges whatever an interrupted run left before it starts, and on
//! the way out, pass or fail.
//!
//! Every step runs in a private mount namespace whose `/var/lib` is a fresh tmpfs with only
//! the real `/var/lib/dpkg` and `/var/lib/systemd` (deb-systemd-helper's state) bound back
//! in: dpkg works on this machine's real package database, while the packages' state
//! directories start absent, as on a fresh server, and a gateway or agent state already on
//! this machine (a `postern quickstart` run as root keeps one in `/var/lib/postern`) is
//! neither used nor touched. The test reads that namespace's files through
//! `/proc/PID/root`.
//!
//! There is no running systemd in the test container, so `systemctl start` is not possible:
//! the test checks the units with `systemd-analyze verify`, then does what each unit says by
//! hand (its `ExecStart` command line, `User=`, `Environment=`, `UMask=`, its state
//! directory and `ConditionPathExists=`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use postern_e2e::*;
use serde_json::Value;

const PACKAGES: [&str; 2] = ["postern", "postern-agent"];
const GATEWAY_UNIT: &str = "/usr/lib/systemd/system/postern.service";
const AGENT_UNIT: &str = "/usr/lib/systemd/system/postern-agent.service";
/// A service's environment before its unit adds to it (systemd's default PATH).
const UNIT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The private mount namespace (see the module comment), held open by a `sleep`.
struct Ns {
    holder: Proc,
    /// The real `/var/lib`, bound here inside the namespace only.
    _real: tempfile::TempDir,
}

impl Ns {
    fn create(dir: &Path) -> Ns {
        let real = tempfile::tempdir().unwrap();
        let script = format!(
            "set -e\n\
             mount --bind /var/lib {real}\n\
             mount -t tmpfs -o mode=0755 postern-packages-test /var/lib\n\
             for d in dpkg systemd; do\n\
               if [ -d {real}/$d ]; then mkdir /var/lib/$d && mount --bind {real}/$d /var/lib/$d; fi\n\
             done\n\
             echo ready\n\
             exec sleep 900\n",
            real = real.path().display()
        );
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
        let holder = spawn_logged(cmd, &dir.join("namespace.log"));
        wait_until("the test's mount namespace", Duration::from_secs(10), || holder.log_text().contains("ready"));
        Ns { holder, _real: real }
    }

    fn pid(&self) -> u32 {
        self.holder.child.id()
    }

    /// `program` inside the namespace (`nsenter` executes it in place: the child is it).
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t").arg(self.pid().to_string()).arg("-m").arg("--").arg(program);
        c.stdin(Stdio::null()).current_dir("/");
        c
    }

    /// Run `program ARGS` in the namespace to completion, bounded by two minutes.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        let mut c = Command::new("timeout");
        c.args(["120", "nsenter", "-t", &self.pid().to_string(), "-m", "--", program]).args(args);
        c.stdin(Stdio::null()).current_dir("/").output().unwrap()
    }

    /// `dpkg ARGS` in the namespace, waiting (up to two minutes) while another dpkg or apt
    /// on this machine holds dpkg's lock.
    fn dpkg(&self, args: &[&str]) -> Output {
        let start = std::time::Instant::now();
        loop {
            let out = self.run("dpkg", args);
            let locked = text(&out.stderr).contains("lock");
            if out.status.success() || !locked || start.elapsed() > Duration::from_secs(120) {
                return out;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// As [`Ns::run`], asserting success; returns stdout.
    fn ok(&self, program: &str, args: &[&str]) -> String {
        let out = self.run(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?} failed ({}):\n{}{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// A path of the namespace's file system, as this process can reach it.
    fn path(&self, p: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{p}", self.pid()))
    }
}

/// Purge the packages and remove the `postern` account (kept by a purge, by design):
/// before the test (an interrupted run's leftovers) and after it, pass or fail.
fn purge_everything(ns: &Ns) {
    let _ = ns.dpkg(&["--purge", PACKAGES[0], PACKAGES[1]]);
    if ns.run("getent", &["passwd", "postern"]).status.success() {
        let _ = ns.run("userdel", &["postern"]);
    }
    if ns.run("getent", &["group", "postern"]).status.success() {
        let _ = ns.run("groupdel", &["postern"]);
    }
}

struct Cleanup<'a>(&'a Ns);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        purge_everything(self.0);
    }
}

/// `cargo deb` for one crate from the debug binaries (`--no-build --profile dev`) into `out`.
fn build_deb(crate_name: &str, out: &Path) -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let target_dir = bin_dir().parent().unwrap().to_owned();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let result = Command::new("timeout")
        .arg("300")
        .arg(&cargo)
        .args(["deb", "-p", crate_name, "--no-build", "--profile", "dev", "--fast", "-o"])
        .arg(out)
        .current_dir(workspace)
        .env("CARGO_TARGET_DIR", &target_dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "cargo deb -p {crate_name} failed (tests/run.sh installs cargo-deb):\n{}{}",
        text(&result.stdout),
        text(&result.stderr)
    );
    let path = PathBuf::from(text(&result.stdout).lines().last().unwrap().trim());
    assert!(path.is_file(), "cargo deb printed {path:?}, not a file");
    path
}

/// `dpkg-deb -c`: path -> (mode string, owner/group) of every entry.
fn contents(deb: &Path) -> BTreeMap<String, (String, String)> {
    let out = Command::new("dpkg-deb").arg("-c").arg(deb).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[5].trim_start_matches('.').trim_end_matches('/').to_owned(), (f[0].to_owned(), f[1].to_owned()))
        })
        .collect()
}

fn field(deb: &Path, name: &str) -> String {
    let out = Command::new("dpkg-deb").arg("-f").arg(deb).arg(name).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_owned()
}

fn control_file(deb: &Path, name: &str) -> String {
    let out = Command::new("dpkg-deb").arg("-I").arg(deb).arg(name).output().unwrap();
    assert!(out.status.success(), "{name}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// A unit file's `[Service]` and `[Unit]` settings (a key given twice keeps the last).
fn unit_settings(unit: &str) -> BTreeMap<String, String> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn mode_owner(p: &Path) -> (u32, String, String) {
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let user = nix::unistd::User::from_uid(m.uid().into()).unwrap().map(|u| u.name).unwrap_or_default();
    let group = nix::unistd::Group::from_gid(m.gid().into()).unwrap().map(|g| g.name).unwrap_or_default();
    (m.permissions().mode() & 0o7777, user, group)
}

/// Replace `from` (which must occur exactly once) with `to`.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "expected {from:?} once in the packaged gateway.toml:\n{text}");
    text.replace(from, to)
}

#[test]
fn debian_packages_build_install_join_serve_and_purge() {
    assert!(nix::unistd::Uid::effective().is_root(), "this test installs packages: run it as root (CI does)");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ns = Ns::create(dir.path());
    purge_everything(&ns);
    let _cleanup = Cleanup(&ns);

    // --- Build, and look inside.
    let out_dir = dir.path().join("debs");
    let gateway_deb = build_deb("postern-gateway", &out_dir);
    let agent_deb = build_deb("postern-tunnel", &out_dir);
    assert_eq!(field(&gateway_deb, "Package"), "postern");
    assert_eq!(field(&agent_deb, "Package"), "postern-agent");
    assert!(field(&gateway_deb, "Depends").contains("adduser"), "postinst runs adduser");
    let gw_files = contents(&gateway_deb);
    let agent_files = contents(&agent_deb);
    for (files, path, mode) in [
        (&gw_files, "/usr/bin/postern", "-rwxr-xr-x"),
        (&gw_files, "/etc/postern/gateway.toml", "-rw-r--r--"),
        (&gw_files, GATEWAY_UNIT, "-rw-r--r--"),
        (&gw_files, "/usr/share/doc/postern/operations.md", "-rw-r--r--"),
        (&agent_files, "/usr/bin/postern-agent", "-rwxr-xr-x"),
        (&agent_files, "/etc/postern-agent/agent.toml", "-rw-r--r--"),
        (&agent_files, AGENT_UNIT, "-rw-r--r--"),
    ] {
        let entry = files.get(path).unwrap_or_else(|| panic!("{path} not in the package: {files:?}"));
        assert_eq!(entry, &(mode.to_owned(), "0/0".to_owned()), "{path}");
    }
    // The agent package brings no gateway, the gateway package no agent, and neither ships
    // a state directory (the gateway's is made by postinst, the agent's by join).
    assert!(!gw_files.contains_key("/usr/bin/postern-agent") && !agent_files.contains_key("/usr/bin/postern"));
    assert!(gw_files.keys().chain(agent_files.keys()).all(|p| !p.starts_with("/var")), "{gw_files:?}");
    assert_eq!(control_file(&gateway_deb, "conffiles").trim(), "/etc/postern/gateway.toml");
    assert_eq!(control_file(&agent_deb, "conffiles").trim(), "/etc/postern-agent/agent.toml");
    // Installing enables and starts nothing (deb-systemd-helper's "enable" and a plain
    // "start" are absent); an upgrade restarts what ran (try-restart).
    for deb in [&gateway_deb, &agent_deb] {
        let postinst = control_file(deb, "postinst");
        assert!(postinst.contains("deb-systemd-invoke try-restart"), "{postinst}");
        assert!(!postinst.contains("_dh_action=start") && !postinst.contains("invoke start"), "{postinst}");
    }

    // --- Install.
    let install = ns.dpkg(&["-i", gateway_deb.to_str().unwrap(), agent_deb.to_str().unwrap()]);
    assert!(install.status.success(), "dpkg -i failed:\n{}{}", text(&install.stdout), text(&install.stderr));
    for p in PACKAGES {
        assert!(ns.ok("dpkg-query", &["-W", "-f", "${Status}", p]).contains("install ok installed"), "{p}");
    }
    // The gateway's account: a system user with its own group, no login shell, no
    // password, its home the state directory.
    let passwd = ns.ok("getent", &["passwd", "postern"]);
    let f: Vec<&str> = passwd.trim().split(':').collect();
    assert!(f[2].parse::<u32>().unwrap() < 1000, "not a system uid: {passwd}");
    assert_eq!((f[5], f[6]), ("/var/lib/postern", "/usr/sbin/nologin"), "{passwd}");
    let shadow = ns.ok("getent", &["shadow", "postern"]);
    let hash = shadow.split(':').nth(1).unwrap();
    assert!(hash.starts_with('!') || hash.starts_with('*'), "postern can log in with a password: {shadow}");
    assert_eq!(ns.ok("id", &["-gn", "postern"]).trim(), "postern");
    assert_eq!(mode_owner(&ns.path("/var/lib/postern")), (0o700, "postern".into(), "postern".into()));
    assert!(!ns.path("/var/lib/postern-agent").exists(), "the agent's state exists before join");
    assert_eq!(mode_owner(&ns.path("/etc/postern/gateway.toml")), (0o644, "root".into(), "root".into()));
    assert_eq!(mode_owner(Path::new("/usr/bin/postern-agent")).0, 0o755);
    // Nothing enabled.
    for unit in ["postern.service", "postern-agent.service"] {
        assert!(!Path::new("/etc/systemd/system/multi-user.target.wants").join(unit).exists(), "{unit} enabled");
    }

    // --- The units: valid for systemd, with the hardening the docs describe.
    let verify = ns.run("systemd-analyze", &["verify", GATEWAY_UNIT, AGENT_UNIT]);
    assert!(
        verify.status.success() && verify.stderr.is_empty() && verify.stdout.is_empty(),
        "systemd-analyze verify:\n{}{}",
        text(&verify.stdout),
        text(&verify.stderr)
    );
    // systemd's own rating of the gateway's sandbox: "exposure" 2.0 or lower (of 10; the
    // threshold is in tenths), "OK". The agent's is 9.6, "UNSAFE", by design (below).
    let rating = ns.run("systemd-analyze", &["security", "--offline=true", "--threshold=20", GATEWAY_UNIT]);
    assert!(rating.status.success(), "postern.service's sandbox got weaker:\n{}", text(&rating.stdout));
    let gw_unit = unit_settings(&std::fs::read_to_string(GATEWAY_UNIT).unwrap());
    for (k, v) in [
        ("User", "postern"),
        ("StateDirectory", "postern"),
        ("StateDirectoryMode", "0700"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("Restart", "on-failure"),
    ] {
        assert_eq!(gw_unit.get(k).map(String::as_str), Some(v), "postern.service {k}");
    }
    // No capability to bind below 1024, so the default config must not need one.
    let packaged = std::fs::read_to_string(ns.path("/etc/postern/gateway.toml")).unwrap();
    for line in packaged.lines().filter(|l| l.trim_start().starts_with("listen")) {
        let port: u16 = line.rsplit(':').next().unwrap().trim_end_matches('"').parse().unwrap();
        assert!(port >= 1024, "the default config listens below 1024 without CAP_NET_BIND_SERVICE: {line}");
    }
    let agent_unit = unit_settings(&std::fs::read_to_string(AGENT_UNIT).unwrap());
    assert_eq!(agent_unit.get("ConditionPathExists").map(String::as_str), Some("/var/lib/postern-agent/agent.toml"));
    assert_eq!(agent_unit.get("Restart").map(String::as_str), Some("on-failure"));
    assert!(agent_unit.get("RestartSec").is_some_and(|s| s != "0"));
    assert!(!agent_unit.contains_key("User"), "the agent runs as root: it starts sessions as other users");
    // The agent's sessions are its children: a sandbox would be theirs too (sudo broken,
    // /usr read-only for administrators), so the unit has none.
    for k in ["NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "CapabilityBoundingSet"] {
        assert!(!agent_unit.contains_key(k), "postern-agent.service sets {k}: it would apply to users' sessions");
    }

    // --- The installed gateway, run as its unit says, on free loopback ports.
    let tunnel_port = free_udp_port();
    let ssh_port = free_tcp_port();
    let key = dir.path().join("alice");
    ssh_keygen(&key, "alice");
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let mut config =
        replace_once(&packaged, "listen = \"0.0.0.0:4433\"", &format!("listen = \"127.0.0.1:{tunnel_port}\""));
    config = replace_once(
        &config,
        "# advertise = \"gw.example.com:4433\"",
        &format!("advertise = \"127.0.0.1:{tunnel_port}\""),
    );
    config = replace_once(&config, "listen = \"0.0.0.0:2222\"", &format!("listen = \"127.0.0.1:{ssh_port}\""));
    config = replace_once(&config, "# public_host = \"gw.example.com\"", "public_host = \"127.0.0.1\"");
    config.push_str(&format!(
        "\n[[ssh.users]]\nname = \"alice\"\nkeys = [{:?}]\ninstances = [\"pkg-*\"]\nallow_root = true\n",
        public.trim()
    ));
    std::fs::write(ns.path("/etc/postern/gateway.toml"), config).unwrap();
    let exec_start: Vec<String> = gw_unit["ExecStart"].split_whitespace().map(str::to_owned).collect();
    assert_eq!(exec_start[..3], ["/usr/bin/postern", "--config", "/etc/postern/gateway.toml"]);
    let mut cmd = ns.cmd("setpriv");
    // As the unit: its user, NoNewPrivileges=yes, CapabilityBoundingSet= (empty), UMask=.
    cmd.args(["--reuid", "postern", "--regid", "postern", "--init-groups", "--no-new-privs", "--bounding-set", "-all"])
        .args(["--", "sh", "-c"])
        .arg(format!("umask {} && exec \"$0\" \"$@\"", gw_unit["UMask"]))
        .args(&exec_start)
        .env_clear()
        .env("PATH", UNIT_PATH)
        .env("HOME", "/var/lib/postern")
        .env("USER", "postern")
        .env("LOGNAME", "postern");
    let mut gateway = spawn_logged(cmd, &dir.path().join("gateway.log"));
    let admin = ns.path("/var/lib/postern/admin.sock");
    wait_until("the installed gateway's admin socket", Duration::from_secs(30), || {
        assert!(gateway.child.try_wait().unwrap().is_none(), "the gateway exited:\n{}", gateway.log_text());
        std::os::unix::net::UnixStream::connect(&admin).is_ok()
    });
    // Everything it wrote belongs to postern and is for its eyes only.
    for f in ["postern.db", "ca.key", "admin.sock"] {
        let (mode, user, _) = mode_owner(&ns.path(&format!("/var/lib/postern/{f}")));
        assert_eq!(user, "postern", "{f}");
        assert_eq!(mode & 0o077, 0, "{f} is readable by others: {mode:o}");
    }

    // --- `sudo postern token create` (root, no --config: the packaged data_dir is root's
    // default) prints the one-line install; its join and the unit's start run here.
    let created = ns.ok("/usr/bin/postern", &["token", "create", "--name", "pkg-01", "--json"]);
    let v: Value = serde_json::from_str(&created).unwrap();
    let line = v["install"].as_str().unwrap().to_owned();
    let steps: Vec<&str> = line.split(" && ").collect();
    assert_eq!(steps.len(), 3, "{line}");
    assert_eq!(steps[0], "sudo apt-get install -y ./postern-agent_*.deb");
    assert_eq!(steps[2], "sudo systemctl enable --now postern-agent");
    let join = steps[1].strip_prefix("sudo ").unwrap();
    assert!(
        join.starts_with(&format!("postern-agent join --gateway 127.0.0.1:{tunnel_port} --token pt_"))
            && join.ends_with(&format!("--ca-pin {}", v["ca_pin"].as_str().unwrap())),
        "{join}"
    );
    let human = ns.ok("/usr/bin/postern", &["token", "create", "--name", "pkg-02"]);
    assert!(
        human.contains(
            "\n  sudo apt-get install -y ./postern-agent_*.deb && sudo postern-agent join --gateway 127.0.0.1:"
        ),
        "{human}"
    );
    // The package was installed above with dpkg (apt-get would need the real /var/lib/apt
    // and its lock); the join runs as printed, with the installed binary found on PATH.
    let joined = ns.run(
        "env",
        &[&["-i", &format!("PATH={UNIT_PATH}")], &join.split_whitespace().collect::<Vec<_>>()[..]].concat(),
    );
    assert!(joined.status.success(), "join failed:\n{}{}", text(&joined.stdout), text(&joined.stderr));
    assert!(text(&joined.stdout).contains("state in /var/lib/postern-agent"), "{}", text(&joined.stdout));
    // What `systemctl enable --now` would start: the condition holds now, the state is
    // root's alone.
    assert!(ns.path(&agent_unit["ConditionPathExists"]).exists());
    assert_eq!(mode_owner(&ns.path("/var/lib/postern-agent")), (0o700, "root".into(), "root".into()));
    let exec_start: Vec<String> = agent_unit["ExecStart"].split_whitespace().map(str::to_owned).collect();
    assert_eq!(exec_start, ["/usr/bin/postern-agent", "run", "--config", "/etc/postern-agent/agent.toml"]);
    let mut cmd = ns.cmd(&exec_start[0]);
    cmd.args(&exec_start[1..]).env_clear().env("PATH", UNIT_PATH);
    let environment = agent_unit["Environment"].split_once('=').unwrap();
    assert_eq!(environment, ("POSTERN_AGENT_STATE_DIR", "/var/lib/postern-agent"));
    cmd.env(environment.0, environment.1);
    let mut agent = spawn_logged(cmd, &dir.path().join("agent.log"));
    wait_until("the installed agent online", Duration::from_secs(30), || {
        assert!(agent.child.try_wait().unwrap().is_none(), "the agent exited:\n{}", agent.log_text());
        let out = ns.run("/usr/bin/postern", &["instances", "--json"]);
        serde_json::from_slice::<Vec<Value>>(&out.stdout)
            .is_ok_and(|rows| rows.iter().any(|r| r["name"] == "pkg-01" && r["online"] == true))
    });

    // --- A real ssh session through the installed gateway and agent.
    let known_hosts = dir.path().join("known_hosts");
    let printed = ns.ok(
        "/usr/bin/postern",
        &["ssh-config", "--user", "alice", "--known-hosts-file", known_hosts.to_str().unwrap()],
    );
    let (host_blocks, rest) = printed.split_once("\n\n").unwrap();
    let ca_line = rest.lines().find(|l| l.starts_with("@cert-authority")).unwrap();
    std::fs::write(&known_hosts, format!("{ca_line}\n")).unwrap();
    let ssh_config = dir.path().join("ssh_config");
    std::fs::write(
        &ssh_config,
        format!(
            "{host_blocks}\nHost *\n    IdentityFile {}\n    IdentitiesOnly yes\n    BatchMode yes\n    ConnectTimeout 10\n",
            key.display()
        ),
    )
    .unwrap();
    let out = Command::new("timeout")
        .args(["60", "ssh", "-F"])
        .arg(&ssh_config)
        .args(["alice@pkg-01.postern", "echo served-by-the-package; id -u"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "served-by-the-package\n0\n", "ssh: {}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0));

    // --- Installing again (as an upgrade does) keeps the account, the state and the
    // changed configuration.
    let again = ns.dpkg(&["-i", gateway_deb.to_str().unwrap(), agent_deb.to_str().unwrap()]);
    assert!(again.status.success(), "dpkg -i again failed:\n{}{}", text(&again.stdout), text(&again.stderr));
    assert_eq!(ns.ok("getent", &["passwd", "postern"]), passwd);
    assert_eq!(mode_owner(&ns.path("/var/lib/postern")), (0o700, "postern".into(), "postern".into()));
    let kept = std::fs::read_to_string(ns.path("/etc/postern/gateway.toml")).unwrap();
    assert!(kept.contains(&format!("listen = \"127.0.0.1:{ssh_port}\"")), "the changed config was replaced:\n{kept}");

    // --- Stop both as systemd would (SIGTERM), then purge.
    for (name, p) in [("agent", &mut agent), ("gateway", &mut gateway)] {
        p.signal(nix::sys::signal::Signal::SIGTERM);
        assert_eq!(p.wait_exit(Duration::from_secs(15)), Some(0), "{name} did not stop cleanly:\n{}", p.log_text());
    }
    let purge = ns.dpkg(&["--purge", "postern-agent", "postern"]);
    assert!(purge.status.success(), "dpkg --purge failed:\n{}{}", text(&purge.stdout), text(&purge.stderr));
    let said = text(&purge.stderr);
    assert!(
        said.contains("postern: kept /var/lib/postern") && said.contains("postern-agent: kept /var/lib/postern-agent"),
        "{said}"
    );
    for p in PACKAGES {
        let status = ns.run("dpkg-query", &["-W", "-f", "${Status}", p]);
        assert!(!text(&status.stdout).contains("installed"), "{p} still installed: {}", text(&status.stdout));
    }
    // Gone: binaries, units, configuration (conffiles go with a purge), dpkg's records.
    for gone in [
        "/usr/bin/postern",
        "/usr/bin/postern-agent",
        GATEWAY_UNIT,
        AGENT_UNIT,
        "/etc/postern",
        "/etc/postern-agent",
        "/usr/share/doc/postern",
        "/usr/share/doc/postern-agent",
        "/var/lib/dpkg/info/postern.list",
        "/var/lib/dpkg/info/postern-agent.list",
    ] {
        assert!(!ns.path(gone).exists(), "{gone} is left after the purge");
    }
    // Kept, as docs/operations.md says: the gateway's keys, database and audit log with the
    // account that owns them, and the agent's identity (for the administrator to revoke and
    // delete).
    assert!(ns.path("/var/lib/postern/postern.db").exists() && ns.path("/var/lib/postern/ca.key").exists());
    assert!(ns.path("/var/lib/postern-agent/agent.toml").exists());
    assert!(ns.run("getent", &["passwd", "postern"]).status.success(), "the purge removed the postern user");
}
