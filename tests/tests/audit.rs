//! The audit log as an auditor sees it: `postern audit verify` on a real gateway's log,
//! intact, after a crash, and tampered with.
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
    let log = gw.data_dir().join("audit.log");

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
