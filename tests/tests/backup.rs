//! Backup and restore of a gateway's data directory, as docs/operations.md ("Backup and
//! restore") says: while the gateway runs, the database with `sqlite3 .backup` first, then
//! every other file; wipe; restore; the gateway starts on the copy with the same instances,
//! users and grants, and `postern audit verify` passes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::Path;
use std::process::Command;

use postern_e2e::*;
use serde_json::Value;

fn admin(gw: &Gateway, args: &[&str]) -> String {
    let out = gw.postern(args);
    assert!(out.status.success(), "postern {args:?}: {}{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

/// What the restore must bring back: instances (name, id), users, grants (by id).
fn inventory(gw: &Gateway) -> (Vec<(String, String)>, String, Vec<String>) {
    let mut instances: Vec<(String, String)> = gw
        .instances()
        .iter()
        .map(|i| (i["name"].as_str().unwrap().to_owned(), i["id"].as_str().unwrap().to_owned()))
        .collect();
    instances.sort();
    let users = admin(gw, &["user", "list"]);
    let grants: Vec<Value> = serde_json::from_str(&admin(gw, &["grants", "--all", "--json"])).unwrap();
    let mut grants: Vec<String> = grants.iter().map(|g| g["id"].to_string()).collect();
    grants.sort();
    (instances, users, grants)
}

fn sh_ok(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(out.status.success(), "{cmd}: {}{}", text(&out.stdout), text(&out.stderr));
}

#[test]
fn a_data_dir_backed_up_while_running_restores_with_its_state_and_a_verifying_audit_log() {
    let mut gw = Gateway::start("");
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("alice");
    ssh_keygen(&key, "alice");
    admin(&gw, &["user", "add", "alice", "--key-file", key.with_extension("pub").to_str().unwrap()]);
    let policy = keys.path().join("oncall.toml");
    std::fs::write(
        &policy,
        "name = \"oncall\"\n[[statement]]\neffect = \"allow\"\nusers = [\"nobody\"]\nactions = [\"exec\"]\ninstances = [\"*\"]\n",
    )
    .unwrap();
    admin(&gw, &["policy", "apply", policy.to_str().unwrap()]);
    admin(&gw, &["grant", "--user", "alice", "--policy", "oncall", "--for", "1h", "--reason", "INC-7"]);
    let mut agent = Agent::start(&gw, "web-01", vec![], &gw.listen.clone());
    let before = inventory(&gw);
    assert_eq!(before.0.len(), 1, "{before:?}");
    assert_eq!(before.2.len(), 1, "{before:?}");

    // The documented procedure, the gateway running: the database first (SQLite's online
    // backup), then everything else but the database files and the socket.
    let data = gw.data_dir();
    let backup = tempfile::tempdir().unwrap();
    let copy = backup.path().join("postern");
    std::fs::create_dir(&copy).unwrap();
    sh_ok(&format!(
        "sqlite3 {} \".backup '{}'\"",
        data.join("postern.db").display(),
        copy.join("postern.db").display()
    ));
    sh_ok(&format!(
        "cd {} && tar --exclude='./postern.db*' --exclude=./admin.sock -cf - . | tar -xf - -C {}",
        data.display(),
        copy.display()
    ));
    // Events after the backup (an agent going away) are lost with the wiped directory.
    agent.proc.take();
    gw.stop();

    std::fs::remove_dir_all(&data).unwrap();
    sh_ok(&format!("cp -a {} {}", copy.display(), data.display()));
    gw.restart();
    assert_eq!(mode(&data), 0o700, "the restored directory keeps its mode");
    agent.run();
    wait_until("web-01 online again", std::time::Duration::from_secs(20), || gw.is_online("web-01"));
    assert_eq!(inventory(&gw), before, "the same instances, users and grants");
    let verify = gw.postern(&["audit", "verify"]);
    assert!(verify.status.success(), "audit verify: {}{}", text(&verify.stdout), text(&verify.stderr));
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}
