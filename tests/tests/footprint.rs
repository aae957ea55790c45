//! Dependency footprints: what each crate may not pull in, from `cargo tree` over the
//! locked dependency graph (normal edges only: what ships, not what tests or builds use).
//!
//! `cargo tree` reads Cargo.lock and the local registry cache; it takes no build lock, so it
//! runs from inside `cargo test` or `cargo nextest`, and `--offline` keeps it off the network
//! (the crates are in the cache once the workspace has been built, which running tests implies).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// The user-side SDK and CLI: no database, object store, RDP parser, QUIC, certificate
/// authority, PTY or gateway/agent internals. Its size is reported in the docs.
const CLIENT: &str = "postern-client";
const CLIENT_FORBIDDEN: &[&str] = &[
    "sqlx",
    "object_store",
    "ironrdp-pdu",
    "ironrdp-core",
    "quinn",
    "rcgen",
    "pty-process",
    "postern-gateway",
    "postern-tunnel",
];
/// Unique crates under postern-client (itself excluded) the refactor commits to.
const CLIENT_MAX_DEPS: usize = 150;

/// Shared types and pure logic: no runtime, no I/O stacks.
const CORE: &str = "postern-core";
const CORE_FORBIDDEN: &[&str] =
    &["tokio", "russh", "sqlx", "quinn", "object_store", "ironrdp-pdu", "postern-tunnel", "postern-gateway", "mio"];

/// The agent stays small: no SSH, RDP, database or object store.
const TUNNEL: &str = "postern-tunnel";
const TUNNEL_FORBIDDEN: &[&str] = &["russh", "ironrdp-pdu", "sqlx", "object_store", "postern-gateway"];

/// Unique crate names in `package`'s normal dependency tree, itself included.
fn dependency_names(package: &str) -> BTreeSet<String> {
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(cargo)
        .current_dir(&root)
        .args(["tree", "--locked", "--offline", "--edges", "normal", "--prefix", "none", "-p", package])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo} tree: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "`cargo tree -p {package}` failed; if the crate does not exist yet, it is part of the target \
         layout and this check cannot pass until it does:\n{stderr}"
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn assert_none_of(package: &str, deps: &BTreeSet<String>, forbidden: &[&str]) {
    let found: Vec<&str> = forbidden.iter().copied().filter(|f| deps.contains(*f)).collect();
    assert!(
        found.is_empty(),
        "{package} depends on {found:?} (normal edges); `cargo tree -e normal -p {package} -i <crate>` shows the path"
    );
}

#[test]
fn client_footprint() {
    let deps = dependency_names(CLIENT);
    assert_none_of(CLIENT, &deps, CLIENT_FORBIDDEN);
    let count = deps.len() - 1;
    println!("{CLIENT}: {count} unique dependencies (normal edges, itself excluded)");
    assert!(count <= CLIENT_MAX_DEPS, "{CLIENT} has {count} unique dependencies, more than {CLIENT_MAX_DEPS}");
}

#[test]
fn core_footprint() {
    assert_none_of(CORE, &dependency_names(CORE), CORE_FORBIDDEN);
}

#[test]
fn tunnel_footprint() {
    assert_none_of(TUNNEL, &dependency_names(TUNNEL), TUNNEL_FORBIDDEN);
}

#[test]
fn cargo_tree_reports_names_for_a_real_crate() {
    // Guards the parsing: a format change would otherwise make every check pass vacuously.
    let deps = dependency_names(TUNNEL);
    assert!(deps.contains("postern-tunnel") && deps.contains("postern-proto") && deps.contains("quinn"), "{deps:?}");
}
