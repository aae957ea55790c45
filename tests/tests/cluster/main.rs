//! Several gateways as one cluster (docs/scale-out.md, issue 17), end to end: real gateways on
//! one real PostgreSQL database (and one S3-compatible bucket for the audit), real agents (in
//! network namespaces with no inbound route where it matters), stock OpenSSH clients. One
//! test binary, one module per part, to keep link times down.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};

use postern_e2e::{Gateway, ssh_keygen, text};

mod agents;
mod audit;
mod peering;
mod sessions;

/// alice, with a new key (`DIR/alice`), allowed to exec (as root) on `instances`: added
/// through `gw`, so on every gateway of its cluster. Her key file.
fn alice_may_exec(gw: &Gateway, dir: &Path, instances: &str) -> PathBuf {
    let key = dir.join("alice");
    ssh_keygen(&key, "alice");
    let policy = dir.join("ops.toml");
    std::fs::write(&policy, exec_policy("ops", "alice", instances)).unwrap();
    for args in [
        vec!["user", "add", "alice", "--key-file", key.with_extension("pub").to_str().unwrap()],
        vec!["policy", "apply", policy.to_str().unwrap()],
    ] {
        let out = gw.postern(&args);
        assert!(out.status.success(), "postern {args:?}: {}", text(&out.stderr));
    }
    key
}

/// Policy `name`: `user` may exec (as root) on `instances`.
fn exec_policy(name: &str, user: &str, instances: &str) -> String {
    format!(
        "name = {name:?}\n[[statement]]\neffect = \"allow\"\nusers = [{user:?}]\nactions = [\"exec\"]\n\
         instances = [{instances:?}]\nallow_root = true\n"
    )
}
