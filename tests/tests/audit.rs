//! The audit log as an auditor sees it: `postern audit verify` on a real gateway's log,
//! intact, after a crash, and tampered with.
//!
//! (Over 600 lines, on purpose: one test binary per area keeps link times down on this
//! 2-core machine; the tests share one set-up.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::time::Duration;

use postern_e2e::*;

#[test]
fn verify_accepts_the_gateways_log_and_locates_tampering() {
    let mut gw = Gateway::start("");
    let agent = Agent::start(&gw, "web-01", vec![], &gw.listen);
    let out = gw.postern(&["exec", "web-01", "--", "echo audited"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    drop(agent);
    gw.stop();

    let out = gw.postern(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.contains("intact") && shown.contains("signed checkpoints"), "{shown}");
    let v: serde_json::Value = serde_json::from_slice(&gw.postern(&["audit", "verify", "--json"]).stdout).unwrap();
    assert_eq!(v["unsigned_tail"], 0, "a graceful stop ends with a checkpoint: {v}");
    assert!(v["checkpoints"].as_u64().unwrap() >= 1);

    // A crash (SIGKILL) leaves a log that still verifies; the newest events are chained but
    // not yet under a checkpoint, and the restarted gateway continues the chain.
    gw.restart();
    let _ = gw.postern(&["instances"]);
    gw.proc.as_ref().unwrap().signal(nix::sys::signal::Signal::SIGKILL);
    gw.proc.as_mut().unwrap().wait_exit(Duration::from_secs(10));
    gw.proc = None;
    let v: serde_json::Value = serde_json::from_slice(&gw.postern(&["audit", "verify", "--json"]).stdout).unwrap();
    assert_eq!(v["problems"].as_array().unwrap().len(), 0, "{v}");
    assert!(v["unsigned_tail"].as_u64().unwrap() >= 1, "{v}");
    gw.restart();
    let _ = gw.postern(&["instances"]);
    gw.stop();
    assert_eq!(gw.postern(&["audit", "verify"]).status.code(), Some(0));

    // Tampering: change one field of line 3.
    assert_eq!(gw.audit_segments().len(), 1, "restarts continue a clear segment");
    let log = gw.audit_segments()[0].clone();
    let original = std::fs::read_to_string(&log).unwrap();
    let mut lines: Vec<String> = original.lines().map(str::to_owned).collect();
    let mut third: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
    third["event"] = serde_json::json!("nothing.happened");
    lines[2] = serde_json::to_string(&third).unwrap();
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    let out = gw.postern(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let shown = text(&out.stdout);
    assert!(shown.contains("NOT intact") && shown.contains("line 4: chain broken: line 3 was modified"), "{shown}");

    // Deleting a line is located too.
    let mut lines: Vec<&str> = original.lines().collect();
    lines.remove(5);
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    let shown = text(&gw.postern(&["audit", "verify"]).stdout);
    assert!(shown.contains("line 6: seq 7 where 6 was expected: 1 event(s) deleted"), "{shown}");

    // A wrong key is a clear error, not a pass.
    std::fs::write(&log, &original).unwrap();
    let other = gw.dir.path().join("other.pub");
    std::fs::write(&other, format!("{}\n", "ab".repeat(32))).unwrap();
    let out = gw.postern(&["audit", "verify", "--key", other.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("signature does not verify"));
}

/// Lines of the (one) clear segment, and the 1-based line numbers of its checkpoints.
fn segment_lines(gw: &Gateway) -> (std::path::PathBuf, Vec<String>, Vec<usize>) {
    let segs = gw.audit_segments();
    assert_eq!(segs.len(), 1, "{segs:?}");
    let lines: Vec<String> = std::fs::read_to_string(&segs[0]).unwrap().lines().map(str::to_owned).collect();
    let checkpoints =
        (0..lines.len()).filter(|&i| lines[i].contains("\"event\":\"audit.checkpoint\"")).map(|i| i + 1).collect();
    (segs[0].clone(), lines, checkpoints)
}

/// Start the gateway and expect it to refuse (exit within 20 s): its standard error.
fn start_refused(gw: &Gateway) -> String {
    let log = gw.dir.path().join("refused.log");
    let mut cmd = std::process::Command::new(bin("postern"));
    cmd.arg("--config").arg(gw.dir.path().join("gateway.toml")).arg("gateway");
    let mut p = spawn_logged(cmd, &log);
    let code = p.wait_exit(Duration::from_secs(20));
    let shown = p.log_text();
    assert!(code.is_some_and(|c| c != 0), "the gateway started on a truncated log ({code:?}): {shown}");
    shown
}

/// Issue 15 item 12: a log cut back to an older signed checkpoint is still a valid chain; the
/// anchor in the database (the last checkpoint signed) shows the missing tail, and the
/// gateway refuses to continue (and sign over) the shorter chain.
#[test]
fn a_log_cut_back_to_a_checkpoint_is_refused_at_start_and_reported_by_verify() {
    let mut gw = Gateway::start("");
    let _ = gw.postern(&["instances"]);
    gw.stop();
    gw.restart();
    for _ in 0..3 {
        let _ = gw.postern(&["token", "create", "--ttl", "5m"]);
    }
    gw.stop();
    let (log, lines, checkpoints) = segment_lines(&gw);
    assert!(checkpoints.len() >= 2, "{checkpoints:?}");
    let last_seq = lines.len();
    assert_eq!(gw.postern(&["audit", "verify"]).status.code(), Some(0));

    // Cut the log back to the first checkpoint: a chain that is intact on its own.
    let keep = checkpoints[0];
    std::fs::write(&log, lines[..keep].join("\n") + "\n").unwrap();
    let loose = std::process::Command::new(bin("postern"))
        .args(["audit", "verify", "--file", log.to_str().unwrap(), "--key"])
        .arg(gw.data_dir().join("audit-signing.pub"))
        .env_remove("POSTERN_DATA_DIR")
        .env_remove("POSTERN_CONFIG")
        .output()
        .unwrap();
    assert_eq!(loose.status.code(), Some(0), "{}", text(&loose.stdout));
    assert!(text(&loose.stderr).contains("the end of the log cannot be checked"), "{}", text(&loose.stderr));

    // The gateway refuses to continue it, says what happened and what to do.
    let refused = start_refused(&gw);
    assert!(refused.contains("refusing to continue the audit log"), "{refused}");
    let removed = format!("events {}-{last_seq} at least were removed from the end of the log", keep + 1);
    assert!(refused.contains(&removed), "{refused}");
    assert!(refused.contains("Restore the log from a backup"), "{refused}");
    assert!(refused.contains(&format!("accept_truncation = {last_seq}")), "{refused}");
    // ... with an event in the log (not signed), and it did not sign over the gap.
    let (_, after, checkpoints_after) = segment_lines(&gw);
    assert_eq!(after.len(), keep + 1, "only the audit.truncated event was added");
    assert!(after[keep].contains("\"event\":\"audit.truncated\"") && after[keep].contains("\"accepted\":false"));
    assert_eq!(checkpoints_after, checkpoints[..1]);

    // verify, with the data directory, reports the missing tail against the anchor.
    let out = gw.postern(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let shown = text(&out.stdout);
    assert!(shown.contains(&format!("but the gateway signed a checkpoint at seq {last_seq}")), "{shown}");
    assert!(shown.contains("were removed from the end of the log"), "{shown}");

    // An emptied segment too.
    std::fs::write(&log, b"").unwrap();
    let shown = text(&gw.postern(&["audit", "verify"]).stdout);
    assert!(shown.contains(&format!("events 1-{last_seq} at least were removed")), "{shown}");
    assert!(start_refused(&gw).contains("refusing to continue the audit log"));

    // The documented override: accept the loss of that checkpoint's tail, on record.
    std::fs::write(&log, lines[..keep].join("\n") + "\n").unwrap();
    let config = gw.dir.path().join("gateway.toml");
    let mut toml = std::fs::read_to_string(&config).unwrap();
    toml.push_str(&format!("[audit]\naccept_truncation = {last_seq}\n"));
    std::fs::write(&config, toml).unwrap();
    gw.restart();
    gw.stop();
    let out = gw.postern(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("it reaches the last checkpoint the gateway recorded"));
    assert!(gw.audit_text().contains("\"accepted\":true"));
}

/// Issue 15 item 13: two adjacent lines swapped are named as such, and only they.
#[test]
fn verify_names_exactly_two_swapped_lines() {
    let mut gw = Gateway::start("");
    for _ in 0..3 {
        let _ = gw.postern(&["token", "create", "--ttl", "5m"]);
    }
    gw.stop();
    let (log, mut lines, _) = segment_lines(&gw);
    assert!(lines.len() >= 8, "{}", lines.len());
    lines.swap(3, 4);
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();
    let out = gw.postern(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let shown = text(&out.stdout);
    assert!(shown.contains("NOT intact (1 problems)"), "{shown}");
    assert!(shown.contains("line 4: lines 4 and 5 are swapped"), "{shown}");
}

/// `kill -9` of the gateway mid-session: the recording is readable up to what was shown, the
/// log verifies, and the restarted gateway writes the orphaned session's end event.
#[test]
fn a_gateway_crash_mid_session_leaves_a_readable_recording_and_an_end_event() {
    let dir = tempfile::tempdir().unwrap();
    let (mut gw, key, kh, _agent) = ssh_gateway_on(dir.path(), "");
    let mut child = ssh_to(&gw, &key, &kh, &["-tt"], "alice%web-01@127.0.0.1")
        // The output differs from the command text, which is also in the recording's title.
        .arg("echo before-the-$((6*7))-crash; sleep 60")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let recordings = gw.data_dir().join("recordings");
    let mut cast = std::path::PathBuf::new();
    wait_until("the recording shows the output", Duration::from_secs(20), || {
        let found = std::fs::read_dir(&recordings).ok().and_then(|d| d.flatten().next()).map(|e| e.path());
        match found {
            Some(p) if std::fs::read_to_string(&p).is_ok_and(|t| t.contains("before-the-42-crash")) => {
                cast = p;
                true
            }
            _ => false,
        }
    });
    gw.proc.as_ref().unwrap().signal(nix::sys::signal::Signal::SIGKILL);
    gw.proc.as_mut().unwrap().wait_exit(Duration::from_secs(10));
    gw.proc = None;
    let _ = child.kill();
    let _ = child.wait();

    let played = asciinema_cat(&cast);
    assert!(played.status.success(), "{}", text(&played.stderr));
    assert!(text(&played.stdout).contains("before-the-42-crash"));

    gw.restart();
    let sid = cast.file_stem().unwrap().to_str().unwrap().to_owned();
    let events = gw.audit_events();
    let end = events.iter().find(|e| e["event"] == "session.end" && e["session_id"] == sid.as_str());
    let end = end.unwrap_or_else(|| panic!("no end event for {sid}"));
    assert_eq!(end["end_reason"], "gateway-crash");
    assert_eq!(end["user"], "alice");
    // The session history marks it ended too.
    let out = gw.postern(&["sessions", "--all", "--json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let row = rows.iter().find(|r| r["id"] == sid.as_str()).unwrap_or_else(|| panic!("{rows:?}"));
    assert_eq!(
        (&row["end_reason"], &row["active"], &row["user"]),
        (&"gateway-crash".into(), &false.into(), &"alice".into())
    );
    assert!(row["ended_at"].is_i64(), "{row}");
    let out = gw.postern(&["replay", &sid, "--speed", "100"]);
    assert!(text(&out.stdout).contains("before-the-42-crash"), "{}", text(&out.stderr));
    assert!(text(&out.stderr).trim_end().ends_with("no exit status (gateway-crash)"), "{}", text(&out.stderr));
    gw.stop();
    let out = gw.postern(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
}

/// A database that cannot be written (another process holds its write lock past the
/// gateway's busy timeout) neither holds up nor fails sessions: they run at once, the lost
/// history write is a `gateway.history_failed` event (once per episode), and sessions after
/// the lock is gone are in the history again.
#[test]
fn a_locked_database_does_not_hold_up_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, key, kh, _agent) = ssh_gateway_on(dir.path(), "");
    let db = gw.data_dir().join("postern.db");
    let mut locker = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import sqlite3,sys,time\nc=sqlite3.connect({:?},isolation_level=None)\nc.execute('BEGIN EXCLUSIVE')\nprint('locked',flush=True)\nsys.stdin.read()\n",
            db.to_str().unwrap()
        ))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(locker.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line, "locked\n");
    }
    let started = std::time::Instant::now();
    for n in 0..2 {
        let out = ssh_run(&gw, &key, &kh, "alice%web-01@127.0.0.1", &format!("echo locked-{n}"));
        assert_eq!(text(&out.stdout), format!("locked-{n}\n"), "{}", text(&out.stderr));
    }
    // The history's busy timeout is 5 s per write: sessions that waited for it would take longer.
    assert!(started.elapsed() < Duration::from_secs(4), "sessions waited for the database: {:?}", started.elapsed());
    wait_until("the failed history write is audited", Duration::from_secs(20), || {
        gw.audit_events().iter().any(|e| e["event"] == "gateway.history_failed")
    });
    drop(locker.stdin.take());
    assert!(locker.wait().unwrap().success());
    let out = ssh_run(&gw, &key, &kh, "alice%web-01@127.0.0.1", "echo unlocked");
    assert_eq!(text(&out.stdout), "unlocked\n");
    let failed: Vec<serde_json::Value> =
        gw.audit_events().into_iter().filter(|e| e["event"] == "gateway.history_failed").collect();
    assert_eq!(failed.len(), 1, "once per episode: {failed:?}");
    assert_eq!(failed[0]["write"], "start");
    assert!(failed[0]["error"].as_str().unwrap().contains("locked"), "{}", failed[0]);
    let out = gw.postern(&["sessions", "--all", "--json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let last = rows.first().unwrap_or_else(|| panic!("the history is empty: {}", text(&out.stderr)));
    assert_eq!((&last["command"], &last["exit_code"]), (&"echo unlocked".into(), &0.into()));
}

/// A gateway whose SSH user `alice` may reach every instance, with an agent `web-01`;
/// returns (gateway, key, known_hosts file, agent).
fn ssh_gateway_on(dir: &std::path::Path, extra: &str) -> (Gateway, std::path::PathBuf, std::path::PathBuf, Agent) {
    let key = dir.join("alice");
    if !key.exists() {
        sh(&format!("ssh-keygen -q -t ed25519 -N '' -C alice -f {}", key.display()));
    }
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    let config = format!(
        "idle_timeout = \"0\"\n[[ssh.users]]\nname = \"alice\"\nkeys = [{:?}]\ninstances = [\"*\"]\nallow_root = true\n{extra}",
        public.trim()
    );
    let gw = Gateway::start(&config);
    let agent = Agent::start(&gw, "web-01", vec![], &gw.listen);
    let out = gw.postern(&["ssh-config", "--known-hosts-file", "/dev/null"]);
    let ca = text(&out.stdout).lines().find(|l| l.starts_with("@cert-authority")).unwrap().to_owned();
    let kh = dir.join(format!("known_hosts-{}", gw.ssh_port));
    std::fs::write(&kh, format!("{ca}\n")).unwrap();
    (gw, key, kh, agent)
}

/// `ssh` (bounded by `timeout`) to the gateway's no-config form `login`, trusting only its
/// host CA in `kh`; `extra` are options, the command is added by the caller.
fn ssh_to(
    gw: &Gateway,
    key: &std::path::Path,
    kh: &std::path::Path,
    extra: &[&str],
    login: &str,
) -> std::process::Command {
    let mut c = std::process::Command::new("timeout");
    c.args(["60", "ssh", "-p", &gw.ssh_port.to_string(), "-i"])
        .arg(key)
        .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o"])
        .arg(format!("UserKnownHostsFile={}", kh.display()))
        .args(extra)
        .arg(login);
    c
}

fn ssh_run(
    gw: &Gateway,
    key: &std::path::Path,
    kh: &std::path::Path,
    login: &str,
    command: &str,
) -> std::process::Output {
    ssh_to(gw, key, kh, &[], login).arg(command).stdin(std::process::Stdio::null()).output().unwrap()
}

fn ssh_exec(gw: &Gateway, key: &std::path::Path, kh: &std::path::Path, command: &str) -> std::process::Output {
    ssh_run(gw, key, kh, "alice%web-01@127.0.0.1", command)
}

#[test]
fn sessions_that_cannot_be_recorded_are_refused_unless_fail_closed_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let touch = format!("touch {}", marker.display());

    let (gw, key, kh, _agent) = ssh_gateway_on(dir.path(), "");
    // The recording sink is unusable: a file where the recordings directory should be.
    std::fs::write(gw.data_dir().join("recordings"), "not a directory").unwrap();
    let out = ssh_exec(&gw, &key, &kh, &touch);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("the session recording cannot be written"), "{}", text(&out.stderr));
    assert!(!marker.exists(), "nothing ran");
    assert!(
        gw.audit_events()
            .iter()
            .any(|e| e["event"] == "session.denied" && e["reason"].as_str().is_some_and(|r| r.contains("fail_closed")))
    );

    // With fail_closed = false the same session runs, marked unlogged with the reason.
    let (gw2, key, kh, _agent2) = ssh_gateway_on(dir.path(), "[audit]\nfail_closed = false\n");
    std::fs::write(gw2.data_dir().join("recordings"), "not a directory").unwrap();
    let out = ssh_exec(&gw2, &key, &kh, &touch);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(marker.exists());
    let start = gw2.audit_events().into_iter().find(|e| e["event"] == "session.start").unwrap();
    assert_eq!(start["logged"], false);
    assert_eq!(start["reason"], "recording could not be created");
}

/// Unmounts (lazily) a file system mounted for a test when dropped.
struct Unmount(std::path::PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The gateway's recordings directory on a 1 MiB tmpfs (the audit log stays writable).
fn small_recordings_dir(gw: &Gateway) -> (std::path::PathBuf, Unmount) {
    let rec = gw.data_dir().join("recordings");
    std::fs::create_dir_all(&rec).unwrap();
    sh(&format!("mount -t tmpfs -o size=1m tmpfs {}", rec.display()));
    (rec.clone(), Unmount(rec))
}

/// A recording that fills its disk during a session: failing closed, the session is ended
/// with a message; failing open, it runs on and its end says it was not fully logged. Either
/// way the recording keeps everything up to its last complete line, also when a write is cut
/// short part-way (a file size limit), which the gateway survives.
#[test]
fn a_recording_that_fills_the_disk_mid_session_ends_it_when_failing_closed() {
    // Megabytes of output, then a pause long enough to notice if the session is not ended.
    let command = "head -c 3000000 /dev/zero | tr '\\000' a; echo; sleep 20; echo after";
    let dir = tempfile::tempdir().unwrap();
    let (gw, key, kh, _agent) = ssh_gateway_on(dir.path(), "");
    let (rec, _unmount) = small_recordings_dir(&gw);
    let started = std::time::Instant::now();
    let out = ssh_exec(&gw, &key, &kh, command);
    assert!(started.elapsed() < Duration::from_secs(15), "session was not ended: {:?}", started.elapsed());
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("recording can no longer be written"), "{}", text(&out.stderr));
    assert!(!text(&out.stdout).contains("after"));
    let mut end = serde_json::Value::Null;
    wait_until("the session.end event", Duration::from_secs(10), || {
        end = gw.audit_events().into_iter().find(|e| e["event"] == "session.end").unwrap_or_default();
        !end.is_null()
    });
    assert_eq!(end["end_reason"], "recording-failed", "{end}");
    assert_eq!(end["logged"], false);
    assert!(end["reason"].as_str().unwrap().starts_with("recording failed during the session"), "{end}");
    // The recording is whole up to its last line: the header and output events all parse.
    let cast = std::fs::read_dir(&rec)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "cast"))
        .unwrap();
    let lines: Vec<String> = std::fs::read_to_string(&cast).unwrap().lines().map(str::to_owned).collect();
    assert!(lines.len() > 2, "{} lines", lines.len());
    for l in &lines {
        serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("torn line in {}: {e}", cast.display()));
    }

    // A write cut short part-way (here by a file size limit: the write stores what fits,
    // then fails) is cut back too, and the gateway lives on.
    let dir = tempfile::tempdir().unwrap();
    let (gw, key, kh, _agent) = ssh_gateway_on(dir.path(), "");
    let pid = gw.proc.as_ref().unwrap().child.id();
    sh(&format!("prlimit --pid {pid} --fsize=600001:600001"));
    let out = ssh_exec(&gw, &key, &kh, command);
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("recording can no longer be written"), "{}", text(&out.stderr));
    let mut end = serde_json::Value::Null;
    wait_until("the session.end event", Duration::from_secs(10), || {
        end = gw.audit_events().into_iter().find(|e| e["event"] == "session.end").unwrap_or_default();
        !end.is_null()
    });
    assert!(end["reason"].as_str().unwrap().contains("File too large"), "{end}");
    let cast = std::fs::read_dir(gw.data_dir().join("recordings")).unwrap().next().unwrap().unwrap().path();
    let recorded = std::fs::read_to_string(&cast).unwrap();
    assert!(recorded.ends_with('\n') && recorded.len() < 600_001, "{} bytes", recorded.len());
    for l in recorded.lines() {
        serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("torn line in {}: {e}", cast.display()));
    }
    assert_eq!(text(&ssh_exec(&gw, &key, &kh, "echo still-here").stdout), "still-here\n");

    // Failing open: the session runs to its end, and its end event says it was not logged.
    let dir = tempfile::tempdir().unwrap();
    let (gw, key, kh, _agent) = ssh_gateway_on(dir.path(), "[audit]\nfail_closed = false\n");
    let (_rec, _unmount) = small_recordings_dir(&gw);
    let out = ssh_exec(&gw, &key, &kh, &command.replace("sleep 20", "sleep 1"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).ends_with("after\n"));
    assert_eq!(out.stdout.len(), 3_000_000 + "\nafter\n".len());
    let mut end = serde_json::Value::Null;
    wait_until("the session.end event", Duration::from_secs(10), || {
        end = gw.audit_events().into_iter().find(|e| e["event"] == "session.end").unwrap_or_default();
        !end.is_null()
    });
    assert_eq!(end["end_reason"], serde_json::Value::Null, "{end}");
    assert_eq!(end["exit_code"], 0);
    assert_eq!(end["logged"], false);
    assert!(end["reason"].as_str().unwrap().contains("No space left on device"), "{end}");
}

/// A full disk under the data directory: new logged sessions are refused, nothing already
/// written is damaged, and service resumes when space is freed.
#[test]
fn a_full_disk_refuses_new_sessions_and_keeps_the_log_intact() {
    let dir = tempfile::tempdir().unwrap();
    let (mut gw, key, kh, agent) = ssh_gateway_on(dir.path(), "");
    assert_eq!(text(&ssh_exec(&gw, &key, &kh, "echo ok").stdout), "ok\n");
    drop(agent);
    gw.stop();
    // Move the data directory onto a small tmpfs and start again there.
    let data = gw.data_dir();
    let saved = dir.path().join("saved");
    sh(&format!("cp -a {} {}", data.display(), saved.display()));
    sh(&format!(
        "rm -rf {d} && mkdir {d} && mount -t tmpfs -o size=4m tmpfs {d} && cp -a {s}/. {d}/",
        d = data.display(),
        s = saved.display()
    ));
    let _unmount = Unmount(data.clone());
    gw.restart();
    let mut agent = Agent { dir: tempfile::tempdir().unwrap(), name: "web-01".into(), proc: None, prefix: vec![] };
    let (token, pin) = gw.token(&["--name", "web-02"]);
    let out = Agent::try_join(&[], &gw.listen, &token, &pin, &agent.state_dir());
    assert!(out.status.success());
    agent.run();
    wait_until("web-02 online", Duration::from_secs(20), || gw.is_online("web-02"));
    let exec2 = |cmd: &str| ssh_run(&gw, &key, &kh, "alice%web-02@127.0.0.1", cmd);
    assert_eq!(text(&exec2("echo on-tmpfs").stdout), "on-tmpfs\n");

    // Fill the disk.
    let filler = data.join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", &format!("of={}", filler.display()), "bs=64k"])
        .stderr(std::process::Stdio::null())
        .status();
    let out = exec2("echo should-not-run");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("cannot be written"), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());

    // Space again: sessions work, and the log verifies (no torn or half-written lines).
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(text(&exec2("echo recovered").stdout), "recovered\n");
    gw.stop();
    let out = gw.postern(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
}

/// The one recording in the gateway's recordings directory: its size and its lines.
fn the_recording(gw: &Gateway) -> (u64, Vec<serde_json::Value>) {
    let cast = std::fs::read_dir(gw.data_dir().join("recordings")).unwrap().next().unwrap().unwrap().path();
    let text = std::fs::read_to_string(&cast).unwrap();
    let lines = text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("torn line: {e}"))).collect();
    (text.len() as u64, lines)
}

/// Bytes a base64 string stands for.
fn base64_len(b64: &str) -> usize {
    b64.len() / 4 * 3 - b64.bytes().rev().take_while(|&b| b == b'=').count()
}

/// Output that is not text goes into the recording as its exact bytes (`"b"` events,
/// base64, 4/3 of its size where JSON would spell a NUL in six bytes and mangle invalid
/// UTF-8), and `postern replay` gives back exactly what the client received; text stays
/// `"o"` events, which asciinema plays, and asciinema skips the others without failing.
#[test]
fn binary_output_round_trips_exactly_through_the_recording_and_text_is_unchanged() {
    const N: usize = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let (gw, key, kh, _agent) = ssh_gateway_on(dir.path(), "");
    let recording_of = |out: &std::process::Output| {
        let start = gw.audit_events().into_iter().rfind(|e| e["event"] == "session.start").unwrap();
        assert_eq!(start["logged"], true, "{start}");
        let sid = start["session_id"].as_str().unwrap().to_owned();
        let path = std::path::PathBuf::from(start["recording"].as_str().unwrap());
        let replayed = gw.postern(&["replay", &sid, "--speed", "1000", "--max-wait", "0.001"]);
        assert!(replayed.status.success(), "{}", text(&replayed.stderr));
        assert!(replayed.stdout == out.stdout, "{} bytes replayed of {}", replayed.stdout.len(), out.stdout.len());
        path
    };

    // Zeros, random bytes, colourful text, and a UTF-8 sequence cut off by the end.
    let command = format!(
        "head -c {N} /dev/zero; head -c {N} /dev/urandom; printf 'plain \\033[1mbold\\033[0m done\\n'; printf '\\342\\202'"
    );
    let out = ssh_exec(&gw, &key, &kh, &command);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(out.stdout.len(), 2 * N + "plain \x1b[1mbold\x1b[0m done\n".len() + 2);
    let cast = recording_of(&out);
    let size = std::fs::metadata(&cast).unwrap().len() as usize;
    assert!(size < out.stdout.len() * 4 / 3 + 20_000, "{size} bytes of recording for {} of output", out.stdout.len());
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&cast).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.iter().any(|l| l[1] == "b"));
    // asciinema plays the text, also when it came in the same chunk as the random bytes
    // (then after whatever of them happened to be valid UTF-8, as a terminal shows it).
    let played = asciinema_cat(&cast);
    assert!(played.status.success(), "asciinema cat: {}", text(&played.stderr));
    assert!(text(&played.stdout).ends_with("plain \x1b[1mbold\x1b[0m done\n"), "{:?}", text(&played.stdout));

    // Text, escapes and all, is recorded as "o" events as before, and asciinema plays it.
    let out = ssh_exec(&gw, &key, &kh, "seq 1 20000; printf '\\033[31mred\\033[0m\\t\\a€\\n'");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let cast = recording_of(&out);
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&cast).unwrap().lines().skip(1).map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut output = String::new();
    for l in lines.iter().filter(|l| l[1] != "m") {
        assert_eq!(l[1], "o", "{l}");
        output.push_str(l[2].as_str().unwrap());
    }
    assert_eq!(output.as_bytes(), out.stdout);
    let played = asciinema_cat(&cast);
    assert!(played.status.success(), "asciinema cat: {}", text(&played.stderr));
    assert!(played.stdout == out.stdout);
}

/// `[audit] max_recording_bytes`: a small command can print more than a disk holds, and
/// output costs a recording up to 4/3 of its size as bytes (a NUL in text, six). At the
/// limit, failing closed, the session is ended with a message and all it showed is recorded;
/// failing open, it runs on unrecorded and its end says so. Either way the recording stays
/// under the limit and ends with a marker.
#[test]
fn a_recording_stops_at_its_size_limit() {
    const CAP: u64 = 1 << 20;
    const OUTPUT: usize = 20_000_000;
    let command = format!("head -c {OUTPUT} /dev/zero; sleep 20; echo after");
    let dir = tempfile::tempdir().unwrap();
    let (gw, key, kh, _agent) = ssh_gateway_on(dir.path(), &format!("[audit]\nmax_recording_bytes = {CAP}\n"));
    let started = std::time::Instant::now();
    let out = ssh_exec(&gw, &key, &kh, &command);
    assert!(started.elapsed() < Duration::from_secs(15), "session was not ended: {:?}", started.elapsed());
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("recording limit ([audit] max_recording_bytes)"), "{}", text(&out.stderr));
    assert!(out.stdout.len() < OUTPUT && !text(&out.stdout).contains("after"), "{} bytes", out.stdout.len());
    let mut end = serde_json::Value::Null;
    wait_until("the session.end event", Duration::from_secs(10), || {
        end = gw.audit_events().into_iter().find(|e| e["event"] == "session.end").unwrap_or_default();
        !end.is_null()
    });
    assert_eq!(end["end_reason"], "recording-limit", "{end}");
    assert_eq!(end["logged"], true, "all the session showed is recorded: {end}");
    let (size, lines) = the_recording(&gw);
    assert!(size <= CAP, "{size} bytes");
    // What the user saw is what was recorded (as bytes: NULs are not text).
    let recorded: usize = lines.iter().filter(|l| l[1] == "b").map(|l| base64_len(l[2].as_str().unwrap())).sum();
    assert_eq!(recorded, out.stdout.len());
    let marker = &lines[lines.len() - 2];
    assert!(marker[1] == "m" && marker[2].as_str().unwrap().contains("max_recording_bytes"), "{marker}");
    assert_eq!(lines[lines.len() - 1][2], "exit 255");

    // Failing open: the command runs to its end; the recording stops with a marker.
    let dir = tempfile::tempdir().unwrap();
    let (gw, key, kh, _agent) =
        ssh_gateway_on(dir.path(), &format!("[audit]\nfail_closed = false\nmax_recording_bytes = {CAP}\n"));
    let out = ssh_exec(&gw, &key, &kh, &command.replace("sleep 20", "sleep 1"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(out.stdout.len(), OUTPUT + "after\n".len());
    let mut end = serde_json::Value::Null;
    wait_until("the session.end event", Duration::from_secs(10), || {
        end = gw.audit_events().into_iter().find(|e| e["event"] == "session.end").unwrap_or_default();
        !end.is_null()
    });
    assert_eq!(end["end_reason"], serde_json::Value::Null, "{end}");
    assert_eq!(end["logged"], false, "{end}");
    assert!(end["reason"].as_str().unwrap().contains("max_recording_bytes"), "{end}");
    let (size, lines) = the_recording(&gw);
    assert!(size <= CAP, "{size} bytes");
    assert!(lines.iter().any(|l| l[1] == "m" && l[2].as_str().unwrap().contains("max_recording_bytes")));
    assert_eq!(lines[lines.len() - 1][2], "exit 0");
}

/// `[audit] min_free_space`: with less free space than that for recordings, new logged
/// sessions are refused (failing closed) or run unrecorded (failing open), and one
/// `gateway.disk_low` event marks the episode.
#[test]
fn too_little_free_space_refuses_new_sessions_with_one_alert() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let touch = format!("touch {}", marker.display());
    // More than any disk here has.
    let (gw, key, kh, _agent) = ssh_gateway_on(dir.path(), "[audit]\nmin_free_space = \"1000000TiB\"\n");
    for _ in 0..2 {
        let out = ssh_exec(&gw, &key, &kh, &touch);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("low disk space for recordings"), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("min_free_space"), "{}", text(&out.stderr));
        assert!(!marker.exists(), "nothing ran");
    }
    let events = gw.audit_events();
    let denied: Vec<_> = events.iter().filter(|e| e["event"] == "session.denied").collect();
    assert_eq!(denied.len(), 2);
    assert!(denied[0]["reason"].as_str().unwrap().contains("min_free_space"), "{}", denied[0]);
    let alerts: Vec<_> = events.iter().filter(|e| e["event"] == "gateway.disk_low").collect();
    assert_eq!(alerts.len(), 1, "one alert per episode");
    assert_eq!(alerts[0]["min_free_bytes"], 1_000_000u64 << 40);
    assert_eq!(alerts[0]["fail_closed"], true);
    assert!(!events.iter().any(|e| e["event"] == "session.start"));

    // Failing open: the session runs, unrecorded, and says why.
    let (gw2, key, kh, _agent2) =
        ssh_gateway_on(dir.path(), "[audit]\nfail_closed = false\nmin_free_space = \"100%\"\n");
    let out = ssh_exec(&gw2, &key, &kh, &touch);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(marker.exists());
    let events = gw2.audit_events();
    let start = events.iter().find(|e| e["event"] == "session.start").unwrap();
    assert_eq!(start["logged"], false);
    assert!(start["reason"].as_str().unwrap().contains("low disk space"), "{start}");
    let alert = events.iter().find(|e| e["event"] == "gateway.disk_low").unwrap();
    assert_eq!(alert["fail_closed"], false);
}

#[test]
fn recordings_past_retention_are_deleted_and_the_deletion_is_audited() {
    let mut gw = Gateway::start("[audit]\nretention = \"1d\"\n");
    gw.stop();
    let rec = gw.data_dir().join("recordings");
    std::fs::create_dir_all(&rec).unwrap();
    let old = rec.join("11111111-1111-1111-1111-111111111111.cast");
    let fresh = rec.join("22222222-2222-2222-2222-222222222222.cast");
    std::fs::write(&old, "{\"version\":2}\n").unwrap();
    std::fs::write(&fresh, "{\"version\":2}\n").unwrap();
    sh(&format!("touch -d '3 days ago' {}", old.display()));
    gw.restart();
    wait_until("the old recording deleted", Duration::from_secs(10), || !old.exists());
    assert!(fresh.exists());
    let events = gw.audit_events();
    let ev = events.iter().find(|e| e["event"] == "audit.retention").unwrap();
    assert_eq!(ev["deleted_recordings"], 1);
    assert_eq!(ev["older_than_secs"], 86400);

    // A bad setting stops the gateway with a clear error.
    std::fs::write(
        gw.dir.path().join("bad.toml"),
        format!("data_dir = {:?}\n[audit]\nretention = \"forever\"\n", gw.dir.path().join("other")),
    )
    .unwrap();
    let out = std::process::Command::new(bin("postern"))
        .arg("--config")
        .arg(gw.dir.path().join("bad.toml"))
        .arg("gateway")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("[audit] retention"), "{}", text(&out.stderr));
}

/// A webhook receiver (python http.server) that checks the HMAC signature, appends what it
/// got to `out`, and answers `status`. Returns its port and process.
fn receiver(secret: &std::path::Path, out: &std::path::Path, status: u16) -> (u16, std::process::Child) {
    let script = r#"
import hmac, hashlib, json, sys, http.server
secret = open(sys.argv[1], 'rb').read().strip()
out = open(sys.argv[2], 'a')
status = int(sys.argv[3])
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers['Content-Length']))
        sig = 'sha256=' + hmac.new(secret, body, hashlib.sha256).hexdigest()
        ok = hmac.compare_digest(sig, self.headers.get('X-Postern-Signature', ''))
        out.write(json.dumps({'ok': ok, 'event': self.headers.get('X-Postern-Event'), 'body': json.loads(body)}) + '\n')
        out.flush()
        self.send_response(status if ok else 401)
        self.end_headers()
    def log_message(self, *a):
        pass
s = http.server.HTTPServer(('127.0.0.1', 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(secret)
        .arg(out)
        .arg(status.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.as_mut().unwrap()), &mut line).unwrap();
    (line.trim().parse().unwrap(), child)
}

#[test]
fn webhooks_are_signed_retried_and_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret-for-hmac\n").unwrap();
    let (good_port, mut good) = receiver(&secret, &dir.path().join("good.jsonl"), 200);
    let (bad_port, mut bad) = receiver(&secret, &dir.path().join("bad.jsonl"), 500);
    let extra = format!(
        "[[audit.webhooks]]\nurl = \"http://127.0.0.1:{good_port}/hook\"\nsecret_file = {s:?}\n\
         [[audit.webhooks]]\nurl = \"http://127.0.0.1:{bad_port}/hook\"\nsecret_file = {s:?}\nevents = [\"session.denied\"]\nmax_attempts = 3\n",
        s = secret
    );
    let (gw, key, kh, _agent) = ssh_gateway_on(dir.path(), &extra);
    assert_eq!(text(&ssh_exec(&gw, &key, &kh, "echo hooked").stdout), "hooked\n");
    // A denied session (unknown instance) goes to both receivers.
    let out = ssh_run(&gw, &key, &kh, "alice%nope-1@127.0.0.1", "true");
    assert_eq!(out.status.code(), Some(1));

    let read = |f: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.path().join(f))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    wait_until("start, end and denied delivered", Duration::from_secs(20), || read("good.jsonl").len() >= 3);
    let got = read("good.jsonl");
    assert!(got.iter().all(|g| g["ok"] == true), "signatures verify: {got:?}");
    let names: Vec<&str> = got.iter().map(|g| g["event"].as_str().unwrap()).collect();
    for e in ["session.start", "session.end", "session.denied"] {
        assert!(names.contains(&e), "{names:?}");
    }
    // The body is the audit event itself.
    let start = got.iter().find(|g| g["event"] == "session.start").unwrap();
    assert_eq!(start["body"]["user"], "alice");
    assert!(gw.audit_events().iter().any(|e| e["id"] == start["body"]["id"]));

    // The failing receiver saw every attempt, then the event went to the dead-letter file.
    let dead = gw.data_dir().join("webhooks-dead-letter.jsonl");
    wait_until("dead letter written", Duration::from_secs(20), || dead.exists());
    assert_eq!(read("bad.jsonl").len(), 3, "max_attempts = 3");
    let letter: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&dead).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(letter["event"], "session.denied");
    assert_eq!(letter["attempts"], 3);
    assert_eq!(letter["error"], "HTTP 500");
    assert_eq!(letter["body"]["event"], "session.denied");
    let _ = good.kill();
    let _ = bad.kill();
    let _ = good.wait();
    let _ = bad.wait();
}

/// `[audit] stdout = true`: every event also goes to standard output, one JSON line each,
/// byte for byte as in the log (log shippers read it; tracing logs stay on stderr).
#[test]
fn events_can_also_go_to_standard_output() {
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("stdout.jsonl");
    // Not through the harness's Gateway, which merges stdout and stderr into one file.
    let data = dir.path().join("data");
    let cfg_path = dir.path().join("gateway.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "data_dir = {data:?}\n[tunnel]\nlisten = \"127.0.0.1:{}\"\n[ssh]\nlisten = \"127.0.0.1:{}\"\n[audit]\nstdout = true\n",
            free_udp_port(),
            free_tcp_port()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(bin("postern"))
        .arg("--config")
        .arg(&cfg_path)
        .arg("gateway")
        .stdout(std::fs::File::create(&out_file).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let sock = data.join("admin.sock");
    wait_until("admin socket", Duration::from_secs(20), || std::os::unix::net::UnixStream::connect(&sock).is_ok());
    let out = std::process::Command::new(bin("postern"))
        .arg("--data-dir")
        .arg(&data)
        .args(["token", "create", "--name", "x"])
        .output()
        .unwrap();
    assert!(out.status.success());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_until("the gateway exits", Duration::from_secs(10), || child.try_wait().unwrap().is_some());
    let printed = std::fs::read_to_string(&out_file).unwrap();
    let logged: String = std::fs::read_dir(data.join("audit"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    // Everything but the log's own checkpoint lines, identical and in order.
    let events: Vec<&str> = logged.lines().filter(|l| !l.contains("\"event\":\"audit.checkpoint\"")).collect();
    assert_eq!(printed.lines().collect::<Vec<_>>(), events);
    assert!(printed.contains("\"event\":\"token.created\""));
}

/// `postern` with the gateway's own config file (for its [audit.encryption] keys).
fn postern_cfg(gw: &Gateway, config: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin("postern"))
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(gw.data_dir())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Encryption at rest: recordings and log segments are sealed with a fresh data key under
/// the master key; `postern replay`, `audit cat` and `audit verify` read them with the key,
/// and a wrong or missing key is a clear error. Exec recordings carry the command and exit
/// code; input is recorded when asked for.
#[test]
fn recordings_and_the_event_log_are_encrypted_at_rest() {
    let dir = tempfile::tempdir().unwrap();
    let master = dir.path().join("master.key");
    let keygen = |p: &std::path::Path| {
        std::process::Command::new(bin("postern")).args(["audit", "keygen"]).arg(p).output().unwrap()
    };
    let out = keygen(&master);
    assert!(out.status.success() && text(&out.stdout).contains("key_file"), "{}", text(&out.stderr));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&master).unwrap().permissions().mode() & 0o777, 0o600);
    let again = keygen(&master);
    assert!(!again.status.success() && text(&again.stderr).contains("must not exist"), "{}", text(&again.stderr));

    let extra = format!("[audit]\nrecord_input = true\n[audit.encryption]\nkey_file = {master:?}\n");
    let (mut gw, key, kh, agent) = ssh_gateway_on(dir.path(), &extra);
    let config = gw.dir.path().join("gateway.toml");
    let out = ssh_exec(&gw, &key, &kh, "echo sealed-$((6*7)); exit 3");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("sealed-42"));
    // A shell session with typed input.
    let mut shell = ssh_to(&gw, &key, &kh, &["-tt"], "alice%web-01@127.0.0.1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        shell.stdin.take().unwrap().write_all(b"echo typed-$((2+3))\nexit\n").unwrap();
    }
    let shown = shell.wait_with_output().unwrap();
    assert!(text(&shown.stdout).contains("typed-5"), "{}", text(&shown.stdout));
    drop(agent);
    gw.stop();

    // On disk: sealed files only, no plaintext.
    let recordings: Vec<std::path::PathBuf> =
        std::fs::read_dir(gw.data_dir().join("recordings")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(recordings.len(), 2, "{recordings:?}");
    for r in &recordings {
        assert!(r.to_string_lossy().ends_with(".cast.sealed"), "{r:?}");
        let raw = std::fs::read(r).unwrap();
        assert!(!contains(&raw, "sealed-42") && !contains(&raw, "typed-"), "plaintext in {r:?}");
    }
    let segments = gw.audit_segments();
    assert!(!segments.is_empty());
    for s in &segments {
        assert!(s.to_string_lossy().ends_with(".jsonl.sealed"), "{s:?}");
        assert!(!contains(&std::fs::read(s).unwrap(), "alice"), "plaintext in {s:?}");
    }

    // With the key: the log reads and verifies, recordings play.
    let cat = postern_cfg(&gw, &config, &["audit", "cat"]);
    assert!(cat.status.success(), "{}", text(&cat.stderr));
    let events: Vec<serde_json::Value> = text(&cat.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let exec = events.iter().find(|e| e["event"] == "session.start" && e["kind"] == "exec").unwrap();
    let sid = exec["session_id"].as_str().unwrap();
    let shell_sid =
        events.iter().find(|e| e["event"] == "session.start" && e["kind"] == "shell").unwrap()["session_id"]
            .as_str()
            .unwrap()
            .to_owned();
    let verify = postern_cfg(&gw, &config, &["audit", "verify"]);
    assert_eq!(verify.status.code(), Some(0), "{}{}", text(&verify.stdout), text(&verify.stderr));
    let played = postern_cfg(&gw, &config, &["replay", sid, "--speed", "100"]);
    assert!(played.status.success(), "{}", text(&played.stderr));
    assert!(text(&played.stdout).contains("sealed-42"));
    // --raw gives the asciicast itself, which asciinema accepts: command, output, exit code.
    let raw = postern_cfg(&gw, &config, &["replay", sid, "--raw"]);
    let cast_text = text(&raw.stdout);
    let cast: Vec<serde_json::Value> = cast_text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(cast[0]["command"], "echo sealed-$((6*7)); exit 3");
    assert_eq!(cast.last().unwrap()[1], "m");
    assert_eq!(cast.last().unwrap()[2], "exit 3");
    let plain = dir.path().join("exec.cast");
    std::fs::write(&plain, &raw.stdout).unwrap();
    let ac = asciinema_cat(&plain);
    assert!(ac.status.success() && text(&ac.stdout).contains("sealed-42"), "{}", text(&ac.stderr));
    let shell_cast = text(&postern_cfg(&gw, &config, &["replay", &shell_sid, "--raw"]).stdout);
    assert!(
        shell_cast.lines().any(|l| l.contains("\"i\"") && l.contains("typed-$((2+3))")),
        "input recorded: {shell_cast}"
    );

    // A wrong key, or none, is a clear error naming the key the files need.
    let other = dir.path().join("other.key");
    assert!(keygen(&other).status.success());
    let wrong = dir.path().join("wrong.toml");
    std::fs::write(&wrong, format!("[audit.encryption]\nkey_file = {other:?}\n")).unwrap();
    for args in [vec!["replay", sid], vec!["audit", "verify"], vec!["audit", "cat"]] {
        let out = postern_cfg(&gw, &wrong, &args);
        assert!(!out.status.success(), "{args:?} passed with the wrong key");
        let e = text(&out.stderr);
        assert!(e.contains("is encrypted with master key") && e.contains("not configured here"), "{args:?}: {e}");
    }
    let out = gw.postern(&["replay", sid]);
    assert!(!out.status.success() && text(&out.stderr).contains("configured: none"), "{}", text(&out.stderr));
    // ... but the key can be given on the command line.
    let out = gw.postern(&["replay", sid, "--speed", "100", "--master-key", master.to_str().unwrap()]);
    assert!(out.status.success() && text(&out.stdout).contains("sealed-42"), "{}", text(&out.stderr));
    // A gateway started with the wrong key refuses to start rather than break the chain.
    let bad_gw = std::process::Command::new(bin("postern"))
        .arg("--config")
        .arg(&wrong)
        .arg("--data-dir")
        .arg(gw.data_dir())
        .arg("gateway")
        .output()
        .unwrap();
    assert!(!bad_gw.status.success());
    assert!(text(&bad_gw.stderr).contains("cannot continue the audit chain"), "{}", text(&bad_gw.stderr));
}

/// The log rotates into segments; retention deletes the oldest closed ones, and the rest
/// still verifies from a signed anchor, while a segment removed by hand is reported.
#[test]
fn log_segments_rotate_and_retention_keeps_the_rest_verifiable() {
    let mut gw = Gateway::start("[audit]\nrotate_bytes = 4096\nlog_retention = \"1d\"\n");
    for i in 0..45 {
        let out = gw.postern(&["token", "create", "--name", &format!("n{i}")]);
        assert!(out.status.success());
    }
    gw.stop();
    let before = gw.audit_segments();
    assert!(before.len() >= 6, "{before:?}");
    let out = gw.postern(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains(&format!("({} segments)", before.len())), "{}", text(&out.stdout));

    for old in &before[..2] {
        sh(&format!("touch -d '3 days ago' {}", old.display()));
    }
    gw.restart();
    wait_until("retention deletes two segments", Duration::from_secs(10), || {
        !before[0].exists() && !before[1].exists()
    });
    gw.stop();
    assert!(before[2..].iter().all(|p| p.exists()), "only the old prefix is deleted");
    let ev = gw.audit_events().into_iter().find(|e| e["event"] == "audit.retention").unwrap();
    assert_eq!(ev["deleted_segments"], 2);
    assert_eq!(ev["log_older_than_secs"], 86400);
    let out = gw.postern(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("older segments deleted by retention"), "{}", text(&out.stdout));

    // Deleting a segment without retention is caught: at the start of the log ...
    std::fs::remove_file(&before[2]).unwrap();
    let out = gw.postern(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("no audit.retention event records deleting"), "{}", text(&out.stdout));
    // ... and in the middle.
    std::fs::remove_file(&before[4]).unwrap();
    let out = gw.postern(&["audit", "verify"]);
    assert!(text(&out.stdout).contains("a segment is missing"), "{}", text(&out.stdout));
}

/// A signed S3 request to moto on `port` through boto3 (which moto brings): "create" the
/// test bucket, "get" an object (`None`: no such key), or "put KEY FILE".
fn s3(port: u16, op: &str, key: &str) -> Option<Vec<u8>> {
    const SCRIPT: &str = "import sys, boto3\n\
s3 = boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1')\n\
if sys.argv[2] == 'create':\n    s3.create_bucket(Bucket='postern-audit')\n    sys.exit(0)\n\
if sys.argv[2] == 'put':\n    s3.put_object(Bucket='postern-audit', Key=sys.argv[3], Body=open(sys.argv[4], 'rb').read())\n    sys.exit(0)\n\
try:\n    sys.stdout.buffer.write(s3.get_object(Bucket='postern-audit', Key=sys.argv[3])['Body'].read())\n\
except s3.exceptions.NoSuchKey:\n    sys.exit(3)\n";
    let out = std::process::Command::new("python3")
        .args(["-c", SCRIPT, &format!("http://127.0.0.1:{port}"), op])
        .args(key.split(' '))
        .output()
        .unwrap();
    match out.status.code() {
        Some(0) => Some(out.stdout),
        Some(3) => None,
        _ => panic!("s3 {op} {key}: {}", text(&out.stderr)),
    }
}

/// With [audit.s3], closed segments and finished recordings are copied to an S3-compatible
/// store (moto). While it is down they stay spooled locally, the outage is an audit event,
/// and everything is uploaded once it is back.
#[test]
fn closed_segments_and_recordings_reach_s3_and_are_spooled_while_it_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_tcp_port();
    let extra = format!(
        "[audit]\nrotate_bytes = 4096\n[audit.s3]\nbucket = \"postern-audit\"\nprefix = \"site-a\"\n\
         endpoint = \"http://127.0.0.1:{port}\"\nallow_http = true\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\n"
    );
    let (mut gw, key, kh, agent) = ssh_gateway_on(dir.path(), &extra);
    let out = ssh_exec(&gw, &key, &kh, "echo to-the-bucket");
    assert!(out.status.success(), "{}", text(&out.stderr));
    for i in 0..15 {
        assert!(gw.postern(&["token", "create", "--name", &format!("n{i}")]).status.success());
    }
    wait_until("the outage is audited", Duration::from_secs(30), || {
        gw.audit_events().iter().any(|e| e["event"] == "audit.sink" && e["state"] == "unreachable")
    });
    let uploaded = gw.data_dir().join("uploaded");
    assert!(!uploaded.exists() || std::fs::read_dir(&uploaded).unwrap().count() == 0);
    // Nothing is lost: the files are all still here.
    let recording = std::fs::read_dir(gw.data_dir().join("recordings")).unwrap().next().unwrap().unwrap().path();
    assert!(gw.audit_segments().len() >= 2);

    // The store comes up (with its bucket): the backlog is uploaded, byte for byte.
    let mut moto = std::process::Command::new("moto_server");
    moto.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
    let _moto = spawn_logged(moto, &dir.path().join("moto.log"));
    wait_until("moto listens", Duration::from_secs(30), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    s3(port, "create", "");
    wait_until("the backlog is uploaded", Duration::from_secs(90), || {
        gw.audit_events().iter().any(|e| e["event"] == "audit.sink" && e["state"] == "recovered")
    });
    let name = |p: &std::path::Path| p.file_name().unwrap().to_string_lossy().into_owned();
    let recorded = s3(port, "get", &format!("site-a/recordings/{}", name(&recording)));
    assert_eq!(recorded, Some(std::fs::read(&recording).unwrap()));
    let segments = gw.audit_segments();
    for s in &segments[..segments.len() - 1] {
        assert_eq!(s3(port, "get", &format!("site-a/audit/{}", name(s))), Some(std::fs::read(s).unwrap()), "{s:?}");
    }
    // The segment being written is not uploaded yet.
    assert_eq!(s3(port, "get", &format!("site-a/audit/{}", name(segments.last().unwrap()))), None);

    // With the store up, a finished session's recording goes up right away.
    let out = ssh_exec(&gw, &key, &kh, "echo second");
    assert!(out.status.success());
    let sid = gw.audit_events().into_iter().rfind(|e| e["event"] == "session.end").unwrap()["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_until("the new recording is uploaded", Duration::from_secs(20), || {
        s3(port, "get", &format!("site-a/recordings/{sid}.cast")).is_some()
    });
    // The session history says where the recording is: here and in the object store, then
    // (the local copy gone, as retention does) only there.
    let located = || {
        let out = gw.postern(&["sessions", "--all", "--json"]);
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let row = rows.into_iter().find(|r| r["id"] == sid.as_str()).unwrap();
        (row["recording_local"].as_bool(), row["recording_s3"].as_str().map(str::to_owned))
    };
    let object = format!("s3://postern-audit/site-a/recordings/{sid}.cast");
    wait_until("the history shows the uploaded copy", Duration::from_secs(10), || {
        located() == (Some(true), Some(object.clone()))
    });
    std::fs::remove_file(gw.data_dir().join("recordings").join(format!("{sid}.cast"))).unwrap();
    assert_eq!(located(), (Some(false), Some(object.clone())));
    drop(agent);
    gw.stop();

    // Once the local copy is gone (retention), replay fetches the recording from the store.
    let replay = |session: &str| {
        std::process::Command::new(bin("postern"))
            .arg("--config")
            .arg(gw.dir.path().join("gateway.toml"))
            .args(["replay", session, "--speed", "1000", "--max-wait", "0"])
            .output()
            .unwrap()
    };
    let out = replay(&sid);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "second\n");
    assert!(
        text(&out.stderr).contains("fetched it from s3://postern-audit/site-a/recordings/"),
        "{}",
        text(&out.stderr)
    );
    let out = replay("0123456789abcdef0123456789abcdef");
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("or in the object store"), "{}", text(&out.stderr));
    // Nothing is left behind in the temporary directory.
    let left = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains(&sid))
        .count();
    assert_eq!(left, 0);
}

/// A moto S3 server on a free loopback port with the test bucket; returns its port and process.
fn moto_with_bucket(dir: &std::path::Path) -> (u16, Proc) {
    let port = free_tcp_port();
    let mut moto = std::process::Command::new("moto_server");
    moto.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
    let proc = spawn_logged(moto, &dir.join("moto.log"));
    wait_until("moto listens", Duration::from_secs(30), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    s3(port, "create", "");
    (port, proc)
}

/// Issue 15 item 12: with [audit.s3] every checkpoint's anchor also goes to the object store
/// (`anchor.json`, and one `anchors/SEQ.json` per checkpoint). Cutting the log back AND
/// putting back an older copy of the database (whose anchor then matches the shorter log)
/// passes the database's check, but `audit verify` with the config checks against the
/// object store's anchor and reports the missing tail; so it does when `anchor.json` was
/// lowered too, from the history.
#[test]
fn a_log_cut_back_with_its_database_anchor_lowered_is_caught_by_the_object_stores_anchor() {
    let dir = tempfile::tempdir().unwrap();
    let (port, _moto) = moto_with_bucket(dir.path());
    let extra = format!(
        "[audit.s3]\nbucket = \"postern-audit\"\nprefix = \"site-a\"\n\
         endpoint = \"http://127.0.0.1:{port}\"\nallow_http = true\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\n"
    );
    let mut gw = Gateway::start(&extra);
    let config = gw.dir.path().join("gateway.toml");
    let _ = gw.postern(&["instances"]);
    gw.stop();
    // The attacker's older copy: the database as it was when the log ended here.
    let (_, early_lines, _) = segment_lines(&gw);
    let db_copy = dir.path().join("db-copy");
    std::fs::create_dir(&db_copy).unwrap();
    for e in std::fs::read_dir(gw.data_dir()).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("postern.db") {
            std::fs::copy(e.path(), db_copy.join(e.file_name())).unwrap();
        }
    }
    gw.restart();
    for _ in 0..3 {
        let _ = gw.postern(&["token", "create", "--ttl", "5m"]);
    }
    gw.stop();
    let (log, lines, _) = segment_lines(&gw);
    let last_seq = lines.len();
    assert!(lines[last_seq - 1].contains("\"event\":\"audit.checkpoint\""));

    // The anchor of the last checkpoint is in the store, and in the history.
    let latest: serde_json::Value = serde_json::from_slice(&s3(port, "get", "site-a/anchor.json").unwrap()).unwrap();
    assert_eq!(latest["seq"], last_seq as u64, "{latest}");
    assert!(latest["key_id"].as_str().is_some_and(|k| k.len() == 16), "{latest}");
    assert!(latest["time"].as_str().is_some(), "{latest}");
    let early_seq = early_lines.len() as u64;
    assert!(s3(port, "get", &format!("site-a/anchors/{early_seq:020}.json")).is_some(), "the first run's last anchor");
    let out = postern_cfg(&gw, &config, &["audit", "verify"]);
    assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        text(&out.stdout)
            .contains(&format!("(seq {last_seq}, in the object store at s3://postern-audit/site-a/anchor.json)")),
        "{}",
        text(&out.stdout)
    );

    // The attack: the log cut back to the first run's end, the database put back to match.
    std::fs::write(&log, early_lines.join("\n") + "\n").unwrap();
    for e in std::fs::read_dir(gw.data_dir()).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with("postern.db") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    for e in std::fs::read_dir(&db_copy).unwrap().flatten() {
        std::fs::copy(e.path(), gw.data_dir().join(e.file_name())).unwrap();
    }
    // The database's anchor cannot see it ...
    let out = gw.postern(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(0), "the store anchor alone is fooled: {}", text(&out.stdout));
    assert!(text(&out.stdout).contains(&format!("(seq {early_seq}, in its database)")), "{}", text(&out.stdout));
    // ... the object store's does, and the output says which anchor it used.
    let removed = format!(
        "the log ends at seq {early_seq}, but the gateway signed a checkpoint at seq {last_seq} (recorded in the object store at s3://postern-audit/site-a/anchor.json): events {}-{last_seq} at least were removed",
        early_seq + 1
    );
    let out = postern_cfg(&gw, &config, &["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains(&removed), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains(&format!(
            "the database's anchor (seq {early_seq}) is behind the object store's (seq {last_seq})"
        )),
        "{}",
        text(&out.stderr)
    );

    // With the gateway's S3 credentials the attacker lowers anchor.json as well: the history
    // (kept by object lock in production) still holds the later checkpoint.
    let early = s3(port, "get", &format!("site-a/anchors/{early_seq:020}.json")).unwrap();
    let early_file = dir.path().join("early-anchor.json");
    std::fs::write(&early_file, early).unwrap();
    s3(port, "put", &format!("site-a/anchor.json {}", early_file.display()));
    let out = postern_cfg(&gw, &config, &["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let from_history = format!(
        "but the gateway signed a checkpoint at seq {last_seq} (recorded in the object store at s3://postern-audit/site-a/anchors/{last_seq:020}.json)"
    );
    assert!(text(&out.stdout).contains(&from_history), "{}", text(&out.stdout));
}
