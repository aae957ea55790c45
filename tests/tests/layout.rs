//! Module-structure checks for the gateway crates, read from the source text (nothing is
//! built, so the check is fast and runs before anything compiles):
//!
//! - no import cycles between module files in `gateway/src`, `gateway/core/src` and
//!   `gateway/client/src`;
//! - the layer table `LAYERS` below holds for `gateway/src`: a module imports only its own
//!   layer or lower ones, and the front doors never import one another;
//! - every entry of the mutation matrix (tests/mutations.toml) still names code that exists
//!   exactly once (`tests/mutate --check`), so the matrix cannot go stale unnoticed.
//!
//! The scanner is deliberately small: it strips comments, string and char literals and
//! `#[cfg(test)]` items, then reads `use` trees and `crate::`/`super::`/`self::` paths (and
//! paths through names those bring into scope). It is not a Rust parser; the self-tests at
//! the bottom pin down what it must understand.
//!
//! (Over 600 lines, on purpose: the checker, a small reader of Rust paths, and its self-tests
//! are one unit; splitting it across test binaries would build it several times.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

/// The layers of `gateway/src`, lowest first, by top-level module (the first path component:
/// `audit::seal` is in `audit`'s layer). A module may import modules of its own layer or of
/// lower layers, never of a higher one. This table is the contract; docs/architecture.md
/// repeats it, so change both together.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "leaves",
        &[
            "accept",
            "config",
            "store",
            "audit",
            "cluster",
            "recording",
            "frames",
            "hostkeys",
            "rdp_wire",
            "addressing",
            "oidc",
            "metrics",
        ],
    ),
    (
        "services",
        &[
            "sessions",
            "connections",
            "access",
            "certs",
            "sso",
            "web_signin",
            "instances",
            "locations",
            "enforcer",
            "manage",
            "broker",
            "runs",
            "rdp_tokens",
            "history",
            "peering",
            "cluster_sessions",
            "session_relay",
            "reload",
        ],
    ),
    ("the services struct", &["services", "launch"]),
    ("doors", &["ssh", "rdp", "admin", "web", "monitor"]),
    ("app", &["app"]),
    ("cli", &["cli"]),
];

/// The layer whose modules may not import one another (each front door stands alone, so a
/// door can be removed or replaced without touching the others).
const DOORS_LAYER: &str = "doors";

/// Crate source directories that must be free of import cycles (relative to the workspace).
const CYCLE_CHECKED: &[&str] = &["gateway/src", "gateway/core/src", "gateway/client/src"];

/// The crate source directory the layer table applies to.
const LAYER_CHECKED: &str = "gateway/src";

// ---------------------------------------------------------------------------------------
// The real tree.

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn scan_real(rel: &str) -> Tree {
    let dir = workspace_root().join(rel);
    scan(&dir, rel).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_mutation_matrix_names_code_that_exists() {
    let out = std::process::Command::new("python3")
        .arg(workspace_root().join("tests/mutate"))
        .arg("--check")
        .output()
        .expect("python3 runs tests/mutate");
    assert!(
        out.status.success(),
        "tests/mutations.toml is stale (fix `find` where the code moved):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn no_import_cycles_in_the_gateway_crates() {
    // Every directory is checked and reported before failing, so one run shows all of it.
    let mut problems = Vec::new();
    for rel in CYCLE_CHECKED {
        match scan(&workspace_root().join(rel), rel) {
            Ok(tree) => problems.extend(find_cycles(&tree)),
            Err(e) => problems.push(e),
        }
    }
    assert!(problems.is_empty(), "{} problem(s):\n\n{}", problems.len(), problems.join("\n\n"));
}

#[test]
fn gateway_modules_respect_the_layer_table() {
    let tree = scan_real(LAYER_CHECKED);
    let problems = check_layers(&tree, LAYERS);
    assert!(problems.is_empty(), "{} layer problem(s):\n\n{}", problems.len(), problems.join("\n"));
}

// ---------------------------------------------------------------------------------------
// The scanner.

/// A module path inside one crate, `["audit", "seal"]` for `audit/seal.rs`; empty for the root.
type ModPath = Vec<String>;

fn show(m: &[String]) -> String {
    if m.is_empty() { "crate".to_owned() } else { m.join("::") }
}

/// One reference from a module file to another, where it is written and what it names.
#[derive(Debug, Clone)]
struct Site {
    file: String,
    line: usize,
    name: String,
}

#[derive(Debug, Default)]
struct Tree {
    /// The module files (crate roots and test-only files excluded).
    modules: BTreeSet<ModPath>,
    /// from -> to -> where.
    edges: BTreeMap<ModPath, BTreeMap<ModPath, Vec<Site>>>,
}

/// Reads every `.rs` file under `dir` (shown as `display` in messages) and builds the graph.
fn scan(dir: &Path, display: &str) -> Result<Tree, String> {
    if !dir.is_dir() {
        return Err(format!(
            "{display} does not exist: it is part of the target layout, and its import-cycle check \
             cannot pass until the crate is there"
        ));
    }
    let mut files = Vec::new();
    collect_rs(dir, &mut files)?;
    files.sort();

    // Pass 1: clean every file and note which child modules are declared under #[cfg(test)].
    struct File {
        display: String,
        module: ModPath,
        is_root: bool,
        text: Vec<char>,
        lines: Vec<usize>,
        test_only: bool,
    }
    let mut parsed = Vec::new();
    let mut test_modules: BTreeSet<ModPath> = BTreeSet::new();
    for path in &files {
        let rel = path.strip_prefix(dir).map_err(|e| e.to_string())?;
        let Some(module) = module_of(rel) else { continue };
        let src = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let original: Vec<char> = src.chars().collect();
        let stripped = strip_comments_and_literals(&original);
        let (text, test_children, whole_file_is_test) = strip_cfg_test(&stripped);
        for child in test_children {
            let mut m = module.clone();
            m.push(child);
            test_modules.insert(m);
        }
        let lines = original.iter().enumerate().filter(|(_, c)| **c == '\n').map(|(i, _)| i).collect();
        parsed.push(File {
            display: format!("{display}/{}", rel.display()),
            is_root: module.is_empty(),
            module,
            text,
            lines,
            test_only: whole_file_is_test,
        });
    }
    for f in &mut parsed {
        // A module declared under #[cfg(test)] is test code, and so is everything below it.
        if test_modules.iter().any(|t| f.module.starts_with(t)) {
            f.test_only = true;
        }
    }
    let mut tree = Tree::default();
    for f in &parsed {
        if !f.is_root && !f.test_only {
            tree.modules.insert(f.module.clone());
        }
    }

    // Pass 2: references. Crate roots only declare modules (lib.rs) or are separate binaries
    // that use the library by its crate name (main.rs), so they are not sources of edges.
    for f in parsed.iter().filter(|f| !f.is_root && !f.test_only) {
        for (at, path, name) in references(&f.text, &f.module, &tree.modules) {
            let Some(to) = deepest_module(&tree.modules, &path) else { continue };
            if to == f.module {
                continue; // a self-loop is no cycle
            }
            let line = f.lines.partition_point(|&nl| nl < at) + 1;
            tree.edges.entry(f.module.clone()).or_default().entry(to).or_default().push(Site {
                file: f.display.clone(),
                line,
                name,
            });
        }
    }
    Ok(tree)
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.is_dir() {
            collect_rs(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// `foo.rs` and `foo/mod.rs` -> `foo`, `foo/bar.rs` -> `foo::bar`, `lib.rs`/`main.rs` -> the
/// root (empty). `bin/*` are binary crate roots of their own: None.
fn module_of(rel: &Path) -> Option<ModPath> {
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.len() > 1 && parts[0] == "bin" {
        return None;
    }
    let last = parts.pop()?;
    let stem = last.strip_suffix(".rs")?;
    if parts.is_empty() && (stem == "lib" || stem == "main") {
        return Some(Vec::new());
    }
    if stem != "mod" {
        parts.push(stem.to_owned());
    }
    Some(parts)
}

/// The longest prefix of `path` that is a module file: `audit::seal::Keyring` -> `audit::seal`
/// when `audit/seal.rs` exists, else `audit`. None for items of the crate root.
fn deepest_module(modules: &BTreeSet<ModPath>, path: &[String]) -> Option<ModPath> {
    (1..=path.len()).rev().map(|n| path[..n].to_vec()).find(|p| modules.contains(p))
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn at(text: &[char], i: usize) -> char {
    text.get(i).copied().unwrap_or('\0')
}

/// Replaces comments, string literals and char literals with spaces, keeping newlines, so
/// positions (and line numbers) stay those of the original text.
fn strip_comments_and_literals(src: &[char]) -> Vec<char> {
    let mut out = src.to_vec();
    let blank = |out: &mut Vec<char>, from: usize, to: usize| {
        for c in out.iter_mut().take(to.min(src.len())).skip(from) {
            if *c != '\n' {
                *c = ' ';
            }
        }
    };
    let mut i = 0;
    while i < src.len() {
        let c = src[i];
        let prev = if i == 0 { '\0' } else { src[i - 1] };
        if c == '/' && at(src, i + 1) == '/' {
            let end = (i..src.len()).find(|&j| src[j] == '\n').unwrap_or(src.len());
            blank(&mut out, i, end);
            i = end;
        } else if c == '/' && at(src, i + 1) == '*' {
            // Block comments nest in Rust.
            let mut depth = 0usize;
            let mut j = i;
            while j < src.len() {
                if src[j] == '/' && at(src, j + 1) == '*' {
                    depth += 1;
                    j += 2;
                } else if src[j] == '*' && at(src, j + 1) == '/' {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if c == 'r'
            && (!is_ident_char(prev) || ((prev == 'b' || prev == 'c') && (i < 2 || !is_ident_char(src[i - 2]))))
        {
            // Raw string r"..." / r#"..."# (also br, cr); r#ident is a raw identifier.
            let mut j = i + 1;
            while at(src, j) == '#' {
                j += 1;
            }
            let hashes = j - i - 1;
            if at(src, j) != '"' {
                i += 1;
                continue;
            }
            let mut k = j + 1;
            while k < src.len() && !(src[k] == '"' && (1..=hashes).all(|h| at(src, k + h) == '#')) {
                k += 1;
            }
            let end = (k + 1 + hashes).min(src.len());
            blank(&mut out, i, end);
            i = end;
        } else if c == '"' {
            let mut j = i + 1;
            while j < src.len() && src[j] != '"' {
                j += if src[j] == '\\' { 2 } else { 1 };
            }
            blank(&mut out, i, j + 1);
            i = j + 1;
        } else if c == '\'' {
            // A char literal ('x', '\n', '\'', '\u{..}') or a lifetime/label ('a, 'static).
            if at(src, i + 1) == '\\' {
                let mut j = i + 3;
                while j < src.len() && src[j] != '\'' {
                    j += 1;
                }
                blank(&mut out, i, j + 1);
                i = j + 1;
            } else if at(src, i + 2) == '\'' {
                blank(&mut out, i, i + 3);
                i += 3;
            } else {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Index just past the bracket matching the opener at `open` (any of `([{`), or the end.
fn matching_close(text: &[char], open: usize) -> usize {
    let mut depth = 0usize;
    for (j, &c) in text.iter().enumerate().skip(open) {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
    }
    text.len()
}

fn skip_ws(text: &[char], mut i: usize) -> usize {
    while i < text.len() && text[i].is_whitespace() {
        i += 1;
    }
    i
}

fn read_ident(text: &[char], i: usize) -> Option<(String, usize)> {
    let mut j = i;
    while j < text.len() && is_ident_char(text[j]) {
        j += 1;
    }
    (j > i).then(|| (text[i..j].iter().collect(), j))
}

/// Blanks every item under `#[cfg(test)]` (the attribute through the end of the item: its
/// `;`, or the `}` closing its body). Returns the text, the names of child modules declared
/// as `#[cfg(test)] mod name;` (their files are test code), and whether the whole file is
/// test code (`#![cfg(test)]`).
fn strip_cfg_test(src: &[char]) -> (Vec<char>, Vec<String>, bool) {
    let mut out = src.to_vec();
    let mut children = Vec::new();
    let mut i = 0;
    while i < src.len() {
        if src[i] != '#' {
            i += 1;
            continue;
        }
        let inner = at(src, i + 1) == '!';
        let open = skip_ws(src, i + if inner { 2 } else { 1 });
        if at(src, open) != '[' {
            i += 1;
            continue;
        }
        let close = matching_close(src, open);
        let attr: String = src[open + 1..close.saturating_sub(1)].iter().filter(|c| !c.is_whitespace()).collect();
        if attr != "cfg(test)" {
            i = close;
            continue;
        }
        if inner {
            return (src.iter().map(|&c| if c == '\n' { '\n' } else { ' ' }).collect(), children, true);
        }
        // The item: up to a `;` outside brackets, or the `}` that closes a top-level brace.
        let mut depth = 0usize;
        let mut j = close;
        while j < src.len() {
            match src[j] {
                '(' | '[' | '{' => depth += 1,
                ')' | ']' => depth = depth.saturating_sub(1),
                '}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        j += 1;
                        break;
                    }
                }
                ';' if depth == 0 => {
                    j += 1;
                    break;
                }
                _ => {}
            }
            j += 1;
        }
        let item: String = src[close..j].iter().collect();
        if let Some(name) = declared_module(&item) {
            children.push(name);
        }
        for c in out.iter_mut().take(j).skip(i) {
            if *c != '\n' {
                *c = ' ';
            }
        }
        i = j;
    }
    (out, children, false)
}

/// `mod name;` (with any visibility and attributes before it) -> `name`.
fn declared_module(item: &str) -> Option<String> {
    let words: Vec<&str> = item.split(|c: char| c.is_whitespace() || c == ';').filter(|w| !w.is_empty()).collect();
    let m = words.iter().position(|w| *w == "mod")?;
    let name = words.get(m + 1)?;
    (item.trim_end().ends_with(';') && name.chars().all(is_ident_char)).then(|| (*name).to_owned())
}

/// Spans of inline `mod name { ... }` blocks: (start of body, end of body, name). Paths
/// inside one are relative to it (`super` there is the file's own module).
fn inline_modules(text: &[char]) -> Vec<(usize, usize, String)> {
    let mut spans = Vec::new();
    let mut i = 0;
    while let Some(k) = find_word(text, "mod", i) {
        i = k + 3;
        let n = skip_ws(text, i);
        let Some((name, after)) = read_ident(text, n) else { continue };
        let brace = skip_ws(text, after);
        if at(text, brace) == '{' {
            spans.push((brace, matching_close(text, brace), name));
        }
    }
    spans
}

/// The next occurrence of `word` from `from` as a whole word.
fn find_word(text: &[char], word: &str, from: usize) -> Option<usize> {
    let w: Vec<char> = word.chars().collect();
    (from..text.len().saturating_sub(w.len() - 1)).find(|&i| {
        text[i..i + w.len()] == w[..]
            && (i == 0 || !is_ident_char(text[i - 1]))
            && !is_ident_char(at(text, i + w.len()))
    })
}

/// The module a position is in: the file's module plus the inline modules around it.
fn module_at(file_module: &[String], inline: &[(usize, usize, String)], pos: usize) -> ModPath {
    let mut m = file_module.to_vec();
    for (start, end, name) in inline {
        // Spans come in source order, so outer modules precede the ones nested in them.
        if *start < pos && pos < *end {
            m.push(name.clone());
        }
    }
    m
}

/// Every module reference in a cleaned file: (position, absolute path, what is named).
fn references(text: &[char], file_module: &[String], modules: &BTreeSet<ModPath>) -> Vec<(usize, ModPath, String)> {
    let inline = inline_modules(text);
    let mut refs = Vec::new();
    // Names in scope that stand for modules: child modules declared here (`mod x;` makes
    // `x::f` a path to `self::x`) and modules imported by `use` (`use crate::audit;` makes
    // `audit::seal::Keyring` a path into `audit::seal`).
    let mut scope: BTreeMap<String, ModPath> = BTreeMap::new();
    let mut i = 0;
    while let Some(k) = find_word(text, "mod", i) {
        i = k + 3;
        if let Some((name, after)) = read_ident(text, skip_ws(text, i))
            && at(text, skip_ws(text, after)) == ';'
        {
            let mut m = module_at(file_module, &inline, k);
            m.push(name.clone());
            scope.insert(name, m);
        }
    }

    // `use` statements: each leaf of the tree, then blanked so the path scan below does not
    // read them twice.
    let mut rest = text.to_vec();
    let mut leaves = Vec::new();
    let mut i = 0;
    while let Some(k) = find_word(text, "use", i) {
        // A use tree starts with a name, `::` or `{`; anything else (`use<'a>` bounds) is not one.
        let next = at(text, skip_ws(text, k + 3));
        if !(is_ident_char(next) || next == ':' || next == '{') {
            i = k + 3;
            continue;
        }
        let mut end = k + 3;
        let mut depth = 0usize;
        while end < text.len() && !(text[end] == ';' && depth == 0) {
            match text[end] {
                '{' => depth += 1,
                '}' => depth = depth.saturating_sub(1),
                _ => {}
            }
            end += 1;
        }
        let ctx = module_at(file_module, &inline, k);
        let tokens = tokenize(text, k + 3, end);
        let mut t = 0;
        parse_use_tree(&tokens, &mut t, Vec::new(), &mut |segs: Vec<String>, pos: usize, alias: Option<String>| {
            leaves.push((pos, ctx.clone(), segs, alias));
        });
        for c in rest.iter_mut().take(end + 1).skip(k) {
            if *c != '\n' {
                *c = ' ';
            }
        }
        i = end + 1;
    }
    // Imported modules first (they may be used above their `use`, and by other `use`s).
    // Imported items (types, functions) are left out: `Type::new()` after `use
    // crate::a::Type` is the same edge as the `use`, listed once.
    for (_, ctx, segs, alias) in &leaves {
        let Some(name) = alias.clone().or_else(|| segs.last().cloned()) else { continue };
        if name == "*" || name == "_" {
            continue;
        }
        if let Some(abs) = absolute(segs, ctx, &BTreeMap::new()).filter(|a| modules.contains(a)) {
            scope.insert(name, abs);
        }
    }
    for (pos, ctx, segs, alias) in leaves {
        if let Some(abs) = absolute(&segs, &ctx, &scope) {
            let mut name = segs.join("::");
            if let Some(a) = alias {
                name.push_str(&format!(" as {a}"));
            }
            refs.push((pos, abs, name));
        }
    }

    // Paths anywhere else in the code: `crate::a::f()`, `super::X`, `alias::sub::f()`.
    let mut i = 0;
    while i < rest.len() {
        if !is_ident_char(rest[i]) || (i > 0 && is_ident_char(rest[i - 1])) {
            i += 1;
            continue;
        }
        let start = i;
        let mut segs = Vec::new();
        let mut j = i;
        while let Some((seg, after)) = read_ident(&rest, j) {
            segs.push(seg);
            let sep = skip_ws(&rest, after);
            if at(&rest, sep) == ':' && at(&rest, sep + 1) == ':' && is_ident_char(at(&rest, skip_ws(&rest, sep + 2))) {
                j = skip_ws(&rest, sep + 2);
            } else {
                j = after;
                break;
            }
        }
        i = j.max(start + 1);
        // `$crate::` belongs to macro hygiene; `pub(in crate::x)` is a visibility, not a use;
        // a segment after `::` continues a path that does not start here (`Self::x`, `<T>::x`).
        let before: String = rest[..start].iter().rev().take_while(|c| !c.is_whitespace()).collect();
        let prev_word: String = {
            let b = rest[..start].iter().rev().skip_while(|c| c.is_whitespace()).take_while(|c| is_ident_char(**c));
            b.collect::<String>().chars().rev().collect()
        };
        if segs.len() < 2 || before.starts_with('$') || before.starts_with("::") || prev_word == "in" {
            continue;
        }
        let ctx = module_at(file_module, &inline, start);
        if let Some(abs) = absolute(&segs, &ctx, &scope) {
            refs.push((start, abs, segs.join("::")));
        }
    }
    refs
}

#[derive(Debug, PartialEq)]
enum Tok {
    Ident(String),
    Sep,
    Open,
    Close,
    Comma,
    Star,
}

fn tokenize(text: &[char], from: usize, to: usize) -> Vec<(Tok, usize)> {
    let mut toks = Vec::new();
    let mut i = from;
    while i < to {
        let c = text[i];
        if let Some((id, after)) = read_ident(text, i).filter(|_| is_ident_char(c)) {
            toks.push((Tok::Ident(id), i));
            i = after;
            continue;
        }
        match c {
            ':' if at(text, i + 1) == ':' => {
                toks.push((Tok::Sep, i));
                i += 1;
            }
            '{' => toks.push((Tok::Open, i)),
            '}' => toks.push((Tok::Close, i)),
            ',' => toks.push((Tok::Comma, i)),
            '*' => toks.push((Tok::Star, i)),
            _ => {}
        }
        i += 1;
    }
    toks
}

/// Walks a use tree (`a::b::{c, d::{e as f, self}, *}`) and calls `leaf` with each full path,
/// the position of its last segment and its `as` name.
fn parse_use_tree(
    toks: &[(Tok, usize)],
    t: &mut usize,
    prefix: Vec<String>,
    leaf: &mut dyn FnMut(Vec<String>, usize, Option<String>),
) {
    let mut path = prefix;
    let mut pos = toks.get(*t).map(|x| x.1).unwrap_or(0);
    while let Some((tok, p)) = toks.get(*t) {
        match tok {
            Tok::Sep => *t += 1,
            Tok::Star => {
                *t += 1;
                path.push("*".to_owned());
                leaf(path, *p, None);
                return;
            }
            Tok::Open => {
                *t += 1;
                while let Some((tok, _)) = toks.get(*t) {
                    match tok {
                        Tok::Close => {
                            *t += 1;
                            break;
                        }
                        Tok::Comma => *t += 1,
                        _ => parse_use_tree(toks, t, path.clone(), leaf),
                    }
                }
                return;
            }
            Tok::Ident(s) => {
                path.push(s.clone());
                pos = *p;
                *t += 1;
                if toks.get(*t).map(|x| &x.0) != Some(&Tok::Sep) {
                    break;
                }
            }
            Tok::Close | Tok::Comma => break,
        }
    }
    let mut alias = None;
    if let (Some((Tok::Ident(a), _)), Some((Tok::Ident(name), _))) = (toks.get(*t), toks.get(*t + 1))
        && a == "as"
    {
        alias = Some(name.clone());
        *t += 2;
    }
    if path.last().is_some_and(|s| s == "self") && path.len() > 1 {
        path.pop(); // `a::{self}` is `a` itself
    }
    if !path.is_empty() {
        leaf(path, pos, alias);
    }
}

/// The absolute module path a written path refers to, for the crate-relative forms; None for
/// external crates and the standard library. `ctx` is the module the path is written in.
fn absolute(segs: &[String], ctx: &[String], scope: &BTreeMap<String, ModPath>) -> Option<ModPath> {
    let first = segs.first()?;
    let mut base: ModPath = match first.as_str() {
        "crate" => Vec::new(),
        "self" => ctx.to_vec(),
        "super" => {
            let mut m = ctx.to_vec();
            m.pop()?;
            m
        }
        other => scope.get(other)?.clone(),
    };
    let mut rest = segs.iter().skip(1).peekable();
    while rest.peek().is_some_and(|s| *s == "super") {
        base.pop()?;
        rest.next();
    }
    base.extend(rest.filter(|s| *s != "*").cloned());
    Some(base)
}

// ---------------------------------------------------------------------------------------
// Cycles.

/// One line per file:line, with the names imported there.
fn show_sites(sites: &[Site], indent: &str) -> String {
    let mut by_line: BTreeMap<(&str, usize), Vec<&str>> = BTreeMap::new();
    for s in sites {
        let names = by_line.entry((&s.file, s.line)).or_default();
        if !names.contains(&s.name.as_str()) {
            names.push(&s.name);
        }
    }
    by_line.iter().map(|((file, line), names)| format!("{indent}{file}:{line}  {}\n", names.join(", "))).collect()
}

/// Every strongly connected component with more than one module, with one concrete cycle
/// through it and every edge inside it (file:line and the names imported).
fn find_cycles(tree: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    for scc in strongly_connected(tree) {
        if scc.len() < 2 {
            continue;
        }
        let members: BTreeSet<&ModPath> = scc.iter().collect();
        let mut msg = format!(
            "import cycle among {} modules: {}\n",
            scc.len(),
            scc.iter().map(|m| show(m)).collect::<Vec<_>>().join(", ")
        );
        if let Some(cycle) = shortest_cycle(tree, &scc[0], &members) {
            msg.push_str(&format!(
                "  for example: {}\n",
                cycle.iter().map(|m| show(m)).collect::<Vec<_>>().join(" -> ")
            ));
        }
        msg.push_str("  the imports inside it (break at least one edge of every loop):\n");
        for from in &scc {
            for (to, sites) in tree.edges.get(from).into_iter().flatten() {
                if !members.contains(to) {
                    continue;
                }
                msg.push_str(&format!("    {} -> {}\n{}", show(from), show(to), show_sites(sites, "      ")));
            }
        }
        out.push(msg);
    }
    out
}

/// Tarjan's algorithm over the module graph.
fn strongly_connected(tree: &Tree) -> Vec<Vec<ModPath>> {
    struct State<'a> {
        tree: &'a Tree,
        index: BTreeMap<&'a ModPath, usize>,
        low: BTreeMap<&'a ModPath, usize>,
        stack: Vec<&'a ModPath>,
        on_stack: BTreeSet<&'a ModPath>,
        out: Vec<Vec<ModPath>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a ModPath) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.tree.edges.get(v).into_iter().flat_map(|m| m.keys()) {
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                comp.push(w.clone());
                if w == v {
                    break;
                }
            }
            comp.sort();
            s.out.push(comp);
        }
    }
    let mut s = State {
        tree,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for m in &tree.modules {
        if !s.index.contains_key(m) {
            visit(&mut s, m);
        }
    }
    s.out.sort();
    s.out
}

/// A shortest path from `start` back to itself inside `members` (breadth first).
fn shortest_cycle(tree: &Tree, start: &ModPath, members: &BTreeSet<&ModPath>) -> Option<Vec<ModPath>> {
    let mut came_from: BTreeMap<&ModPath, &ModPath> = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for w in tree.edges.get(v).into_iter().flat_map(|m| m.keys()) {
            if !members.contains(w) {
                continue;
            }
            if w == start {
                let mut path = vec![start.clone()];
                let mut cur = v;
                while cur != start {
                    path.push(cur.clone());
                    cur = came_from[cur];
                }
                path.push(start.clone());
                path.reverse();
                return Some(path);
            }
            if !came_from.contains_key(w) {
                came_from.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------------------
// Layers.

fn layer_of(layers: &[(&str, &[&str])], top: &str) -> Option<usize> {
    layers.iter().position(|(_, mods)| mods.contains(&top))
}

/// Every import from a lower layer to a higher one, every import between two doors, and
/// every top-level module the table does not place.
fn check_layers(tree: &Tree, layers: &[(&str, &[&str])]) -> Vec<String> {
    let mut out = Vec::new();
    let tops: BTreeSet<&str> = tree.modules.iter().filter_map(|m| m.first()).map(String::as_str).collect();
    for top in &tops {
        if layer_of(layers, top).is_none() {
            out.push(format!(
                "module {top} has no layer: add it to LAYERS in tests/tests/layout.rs and docs/architecture.md"
            ));
        }
    }
    let name = |i: usize| layers[i].0;
    for (from, tos) in &tree.edges {
        for (to, sites) in tos {
            let (Some(f), Some(t)) = (from.first(), to.first()) else { continue };
            if f == t {
                continue;
            }
            let (Some(lf), Some(lt)) = (layer_of(layers, f), layer_of(layers, t)) else { continue };
            let why = if lt > lf {
                format!("{f} ({}) imports {t} from a higher layer ({})", name(lf), name(lt))
            } else if lt == lf && name(lf) == DOORS_LAYER {
                format!("door {f} imports another door, {t} (doors never import each other)")
            } else {
                continue;
            };
            out.push(format!("{why}: {} -> {}\n{}", show(from), show(to), show_sites(sites, "    ")));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Self-tests: the checker finds what it must on small synthetic trees.

fn tree_of(files: &[(&str, &str)]) -> (tempfile::TempDir, Tree) {
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    let tree = scan(dir.path(), "src").unwrap();
    (dir, tree)
}

fn m(s: &str) -> ModPath {
    s.split("::").map(str::to_owned).collect()
}

fn edge_names(tree: &Tree, from: &str, to: &str) -> Vec<String> {
    tree.edges
        .get(&m(from))
        .and_then(|t| t.get(&m(to)))
        .map(|s| s.iter().map(|s| s.name.clone()).collect())
        .unwrap_or_default()
}

#[test]
fn self_test_two_file_cycle_through_use_crate() {
    let (_d, tree) = tree_of(&[
        ("lib.rs", "pub mod a;\npub mod b;\npub mod c;\n"),
        ("a.rs", "use crate::b::Thing;\npub fn f() {}\n"),
        ("b.rs", "pub struct Thing;\n\nfn g() {\n    crate::a::f();\n}\n"),
        ("c.rs", "use crate::a;\n"),
    ]);
    let cycles = find_cycles(&tree);
    assert_eq!(cycles.len(), 1, "{cycles:#?}");
    let c = &cycles[0];
    assert!(c.contains("import cycle among 2 modules: a, b"), "{c}");
    assert!(c.contains("src/a.rs:1  crate::b::Thing"), "{c}");
    assert!(c.contains("src/b.rs:4  crate::a::f"), "{c}");
    assert!(!c.contains("src/c.rs"), "c is outside the cycle: {c}");
}

#[test]
fn self_test_cycle_through_super_between_mod_rs_and_child() {
    let (_d, tree) = tree_of(&[
        ("lib.rs", "pub mod foo;\npub mod top;\n"),
        ("foo/mod.rs", "pub mod bar;\nuse bar::Helper;\npub struct Parent;\n"),
        ("foo/bar.rs", "use super::Parent;\npub struct Helper;\n"),
        // `super` in foo/mod.rs is the crate root: `super::top` is the top-level module.
        ("top.rs", "pub fn t() {}\n"),
    ]);
    let cycles = find_cycles(&tree);
    assert_eq!(cycles.len(), 1, "{cycles:#?}");
    assert!(cycles[0].contains("foo, foo::bar"), "{}", cycles[0]);
    assert!(cycles[0].contains("src/foo/bar.rs:1  super::Parent"), "{}", cycles[0]);

    // super::super from a grandchild, and `self::` to a child.
    let (_d, tree) = tree_of(&[
        ("lib.rs", "pub mod foo;\npub mod top;\n"),
        ("foo/mod.rs", "pub mod bar;\nfn f() { self::bar::h(); super::top::t(); }\n"),
        ("foo/bar.rs", "pub fn h() { super::super::top::t(); }\n"),
        ("top.rs", "pub fn t() {}\n"),
    ]);
    assert_eq!(edge_names(&tree, "foo", "foo::bar"), ["self::bar::h"]);
    assert_eq!(edge_names(&tree, "foo", "top"), ["super::top::t"]);
    assert_eq!(edge_names(&tree, "foo::bar", "top"), ["super::super::top::t"]);
    assert!(find_cycles(&tree).is_empty());
}

#[test]
fn self_test_grouped_multi_line_use_reaches_every_module() {
    let (_d, tree) = tree_of(&[
        ("lib.rs", "pub mod a;\npub mod b;\npub mod x;\n"),
        ("a.rs", "pub struct X;\n"),
        ("b/mod.rs", "pub mod deep;\npub struct Y;\n"),
        ("b/deep.rs", "pub struct Z;\n"),
        (
            "x.rs",
            "pub use crate::{\n    a::X,\n    b::{Y, deep::Z as Zed},\n};\nuse crate::b::{self};\nfn f() { b::deep::Z; }\n",
        ),
    ]);
    assert_eq!(edge_names(&tree, "x", "a"), ["crate::a::X"]);
    assert_eq!(edge_names(&tree, "x", "b"), ["crate::b::Y", "crate::b"]);
    // The deepest existing file wins, also through a module brought into scope by `use`.
    assert_eq!(edge_names(&tree, "x", "b::deep"), ["crate::b::deep::Z as Zed", "b::deep::Z"]);
    let site = &tree.edges[&m("x")][&m("a")][0];
    assert_eq!(site.line, 2, "the line of the imported name");
}

#[test]
fn self_test_tests_comments_and_strings_are_ignored() {
    let (_d, tree) = tree_of(&[
        ("lib.rs", "pub mod a;\npub mod b;\n"),
        (
            "a.rs",
            "//! Uses crate::b::Doc in prose.\n\
             /// See crate::b::X.\n\
             // use crate::b::Y;\n\
             /* use crate::b::Z; /* nested crate::b::W */ still comment crate::b::V */\n\
             const S: &str = \"crate::b::f()\";\n\
             const R: &str = r#\"use crate::b::Q; \"quoted\" \"#;\n\
             const C: char = '\"'; const L: &'static str = \"x\";\n\
             pub fn f() {}\n\
             #[cfg(test)]\n\
             mod tests {\n    use crate::b::T;\n    fn g() { crate::b::h(); if true { } }\n}\n\
             #[cfg(test)]\n\
             mod more_tests;\n",
        ),
        ("a/more_tests.rs", "use crate::b::M;\n"),
        ("b.rs", "use crate::a::f;\n"),
    ]);
    assert!(!tree.edges.contains_key(&m("a")), "{:#?}", tree.edges);
    assert!(!tree.modules.contains(&m("a::more_tests")));
    assert!(find_cycles(&tree).is_empty());
    assert_eq!(edge_names(&tree, "b", "a"), ["crate::a::f"]);
}

#[test]
fn self_test_layer_rules() {
    let layers: &[(&str, &[&str])] = &[("leaves", &["config"]), ("doors", &["ssh", "rdp"]), ("cli", &["cli"])];
    let (_d, tree) = tree_of(&[
        ("lib.rs", "pub mod config;\npub mod ssh;\npub mod rdp;\npub mod cli;\npub mod stray;\n"),
        ("config.rs", "use crate::ssh::Door;\n"),
        ("ssh/mod.rs", "pub mod inner;\npub struct Door;\nfn f() { crate::rdp::open(); crate::config::load(); }\n"),
        ("ssh/inner.rs", "use super::Door;\n"),
        ("rdp.rs", "pub fn open() {}\n"),
        ("cli.rs", "use crate::{ssh::Door, config};\n"),
        ("stray.rs", "\n"),
    ]);
    let problems = check_layers(&tree, layers);
    let text = problems.join("\n");
    assert!(text.contains("config (leaves) imports ssh from a higher layer (doors): config -> ssh"), "{text}");
    assert!(text.contains("src/config.rs:1  crate::ssh::Door"), "{text}");
    assert!(text.contains("door ssh imports another door, rdp"), "{text}");
    assert!(text.contains("src/ssh/mod.rs:3  crate::rdp::open"), "{text}");
    assert!(text.contains("module stray has no layer"), "{text}");
    // Downward imports, and imports inside one top-level module, are fine.
    assert!(!text.contains("cli (cli)"), "{text}");
    assert!(!text.contains("ssh::inner"), "{text}");
    assert_eq!(problems.len(), 3, "{text}");
}

#[test]
fn self_test_a_missing_crate_directory_fails() {
    let dir = tempfile::tempdir().unwrap();
    let err = scan(&dir.path().join("core/src"), "gateway/core/src").unwrap_err();
    assert!(err.contains("gateway/core/src does not exist"), "{err}");
}
