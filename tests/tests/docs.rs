//! The docs run as printed: every ```console block of README.md and docs/quickstart.md is
//! run against a fresh `postern quickstart`, as root and as an unprivileged user, so the
//! front door cannot drift from the product.
//!
//! How a console block is read:
//! - A line starting with `$ ` is a command, run with `sh -c` in the user's home directory
//!   (a heredoc, `<<'EOF'` ... `EOF`, continues it). It must exit with status 0.
//! - Other lines are that command's output, and each must appear in what it printed
//!   (stdout, then stderr), in order, compared with runs of spaces squeezed to one. `…`
//!   stands for any text within a line; a line of just `…` for lines left out. Blank
//!   lines are not checked.
//! - HTML comments on the lines right above the block's fence: `<!-- not run: REASON -->`
//!   (the block is not run; say why), `<!-- run as root -->` or `<!-- run as non-root -->`
//!   (only in that tour, for what differs between them, such as the data directory).
//!   Any other comment there is an error, so a typo cannot turn a block off.
//!
//! Each tour runs in its own mount, UTS and network namespaces (`unshare`): the host name is
//! `vm`, loopback is private (quickstart's default ports never clash with anything), the
//! home directory (root's `/root`, or `/home` for the user `postern-tour`, whose home is
//! `/home/postern-tour`) and `/var/lib` are fresh empty directories, so `ssh`, which reads
//! the home directory of the account rather than `$HOME`, sees only what the tour wrote.
//! The only preparation is an SSH key in `~/.ssh` (the README asks for one).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use postern_e2e::*;

/// The unprivileged account of the non-root tour (tests/run.sh creates it).
const TOUR_USER: &str = "postern-tour";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Root,
    User,
}

#[derive(Debug, PartialEq)]
struct Step {
    /// Line number of the command in its document.
    line: usize,
    command: String,
    /// The lines shown as its output (blank ones dropped).
    output: Vec<String>,
}

#[derive(Debug, PartialEq)]
struct Block {
    /// Line number of the opening fence.
    line: usize,
    not_run: Option<String>,
    only: Option<Who>,
    steps: Vec<Step>,
}

/// The ```console blocks of a Markdown document, by the rules in the module comment.
fn console_blocks(doc: &str) -> Result<Vec<Block>, String> {
    let lines: Vec<&str> = doc.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim_end() != "```console" {
            i += 1;
            continue;
        }
        let mut block = Block { line: i + 1, not_run: None, only: None, steps: Vec::new() };
        let mut above = i;
        while above > 0 && lines[above - 1].starts_with("<!--") {
            above -= 1;
            let comment = lines[above].trim();
            let inner =
                comment.strip_prefix("<!--").and_then(|c| c.strip_suffix("-->")).map(str::trim).ok_or_else(|| {
                    format!("line {}: a comment above a console block must fit on one line", above + 1)
                })?;
            match inner {
                "run as root" => block.only = Some(Who::Root),
                "run as non-root" => block.only = Some(Who::User),
                _ => match inner.strip_prefix("not run:").map(str::trim) {
                    Some(reason) if !reason.is_empty() => block.not_run = Some(reason.to_owned()),
                    _ => return Err(format!("line {}: unknown annotation {comment:?}", above + 1)),
                },
            }
        }
        i += 1;
        loop {
            let Some(line) = lines.get(i) else {
                return Err(format!("line {}: console block never closed", block.line));
            };
            i += 1;
            if line.trim_end() == "```" {
                break;
            }
            if let Some(command) = line.strip_prefix("$ ") {
                let at = i;
                let mut command = command.to_owned();
                if let Some(delimiter) = heredoc_delimiter(&command) {
                    loop {
                        let Some(body) = lines.get(i) else {
                            return Err(format!("line {}: heredoc never ends with {delimiter}", block.line));
                        };
                        i += 1;
                        command.push('\n');
                        command.push_str(body);
                        if body.trim_end() == delimiter {
                            break;
                        }
                    }
                }
                block.steps.push(Step { line: at, command, output: Vec::new() });
            } else if !line.trim().is_empty() {
                let step = block
                    .steps
                    .last_mut()
                    .ok_or_else(|| format!("line {i}: output before the first command of the block"))?;
                step.output.push((*line).to_owned());
            }
        }
        if block.steps.is_empty() {
            return Err(format!("line {}: a console block without a command", block.line));
        }
        blocks.push(block);
    }
    Ok(blocks)
}

/// `WORD` of a `<<'WORD'`, `<<"WORD"` or `<<WORD` heredoc in a command line.
fn heredoc_delimiter(command: &str) -> Option<String> {
    let rest = &command[command.find("<<")? + 2..];
    let rest = rest.trim_start_matches('-').trim_start();
    let word: String =
        rest.trim_start_matches(['\'', '"']).chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    (!word.is_empty()).then_some(word)
}

fn squeeze(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether an output line matches a shown one: the same text, spaces squeezed, `…` standing
/// for any text.
fn line_matches(shown: &str, actual: &str) -> bool {
    let (shown, actual) = (squeeze(shown), squeeze(actual));
    let parts: Vec<&str> = shown.split('…').collect();
    let (first, rest) = parts.split_first().unwrap();
    let Some(mut left) = actual.strip_prefix(first) else {
        return false;
    };
    let Some((last, middle)) = rest.split_last() else {
        return left.is_empty();
    };
    for part in middle {
        match left.find(part) {
            Some(at) => left = &left[at + part.len()..],
            None => return false,
        }
    }
    left.ends_with(last)
}

/// The shown lines that do not appear, in order, in `actual` (empty: all do).
fn unmatched(shown: &[String], actual: &str) -> Vec<String> {
    let actual: Vec<&str> = actual.lines().collect();
    let mut from = 0;
    let mut missing = Vec::new();
    for want in shown.iter().filter(|l| l.trim() != "…") {
        match actual[from..].iter().position(|a| line_matches(want, a)) {
            Some(at) => from += at + 1,
            None => missing.push(want.clone()),
        }
    }
    missing
}

#[test]
fn console_blocks_are_read_by_the_documented_rules() {
    let doc = "text\n<!-- run as root -->\n```console\n$ echo hi   # a comment\nhi\n\n$ cat > f <<'EOF'\na\n$ b\nEOF\n```\n\
               <!-- not run: needs a second machine -->\n```console\n$ ssh far\n```\n```sh\n$ not console\n```\n";
    let blocks = console_blocks(doc).unwrap();
    assert_eq!(
        blocks,
        [
            Block {
                line: 3,
                not_run: None,
                only: Some(Who::Root),
                steps: vec![
                    Step { line: 4, command: "echo hi   # a comment".into(), output: vec!["hi".into()] },
                    Step { line: 7, command: "cat > f <<'EOF'\na\n$ b\nEOF".into(), output: vec![] },
                ],
            },
            Block {
                line: 13,
                not_run: Some("needs a second machine".into()),
                only: None,
                steps: vec![Step { line: 14, command: "ssh far".into(), output: vec![] }],
            },
        ]
    );
    assert!(console_blocks("<!-- not ran: typo -->\n```console\n$ x\n```\n").unwrap_err().contains("unknown"));
    assert!(console_blocks("<!-- not run: -->\n```console\n$ x\n```\n").is_err());
    assert!(console_blocks("```console\noutput first\n```\n").is_err());
    assert!(console_blocks("```console\n$ x\n").is_err());

    assert!(line_matches("ag-…   vm  env=local", "ag-212e65583fb9951f  vm    env=local"));
    assert!(line_matches("expires: … (single use)", "expires: 2026-12-01T16:38:54Z (single use)"));
    assert!(line_matches("--token pt_… --ca-pin sha256:… --run", "--token pt_1 --ca-pin sha256:2 --run"));
    assert!(!line_matches("exit status 3", "exit status 30"));
    assert!(!line_matches("Linux …", "linux 6.1"));
    assert!(!line_matches("a … c", "a b d"));
    let shown = vec!["one".to_owned(), "…".to_owned(), "three".to_owned()];
    assert!(unmatched(&shown, "one\ntwo\nthree\n").is_empty());
    assert_eq!(unmatched(&shown, "three\none\n"), ["three"]);
}

/// One tour: namespaces with fresh home and data directories, and a quickstart in them.
struct Tour {
    dir: tempfile::TempDir,
    who: Who,
    /// `unshare` holding the namespaces open (its child sleeps; both go on drop).
    _holder: Proc,
    /// The holder's child, inside the namespaces: what `nsenter` targets.
    pid: String,
    quickstart: Option<Proc>,
}

impl Tour {
    fn start(who: Who) -> Tour {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "the docs tours create namespaces and switch users: run as root (CI does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Mount points for the binaries: reachable by the tour user wherever the build is.
        std::fs::create_dir(root.join("bin")).unwrap();
        for b in ["postern", "postern-agent"] {
            std::fs::write(root.join("bin").join(b), b"").unwrap();
            std::fs::set_permissions(root.join("bin").join(b), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::create_dir(root.join("varlib")).unwrap();
        let home_mount = match who {
            Who::Root => {
                std::fs::create_dir(root.join("home")).unwrap();
                std::fs::set_permissions(root.join("home"), std::fs::Permissions::from_mode(0o700)).unwrap();
                format!("mount --bind {}/home /root", root.display())
            }
            Who::User => {
                let user = tour_user();
                assert_eq!(user.dir, Path::new("/home").join(TOUR_USER), "{TOUR_USER}'s home directory");
                let home = root.join("homes").join(TOUR_USER);
                std::fs::create_dir_all(&home).unwrap();
                std::os::unix::fs::chown(&home, Some(user.uid.as_raw()), Some(user.gid.as_raw())).unwrap();
                std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
                format!("mount --bind {}/homes /home", root.display())
            }
        };
        let script = format!(
            "set -e; ip link set lo up; hostname vm; {home_mount}; mount --bind {root}/varlib /var/lib; \
             mount --bind {postern} {root}/bin/postern; mount --bind {agent} {root}/bin/postern-agent; \
             echo $$ > {root}/holder.pid; exec sleep 900",
            root = root.display(),
            postern = bin("postern").display(),
            agent = bin("postern-agent").display(),
        );
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--uts", "--net", "--fork", "--kill-child", "--", "sh", "-c", &script]);
        let mut holder = spawn_logged(cmd, &root.join("holder.log"));
        let pid_file = root.join("holder.pid");
        wait_until("the tour's namespaces", Duration::from_secs(10), || {
            if let Some(status) = holder.child.try_wait().unwrap() {
                panic!("unshare exited ({status}): {}", holder.log_text());
            }
            std::fs::read_to_string(&pid_file).is_ok_and(|p| p.ends_with('\n'))
        });
        let pid = std::fs::read_to_string(&pid_file).unwrap().trim().to_owned();
        let mut tour = Tour { dir, who, _holder: holder, pid, quickstart: None };
        // The one thing the README assumes: you have an SSH key.
        let keygen = tour.run("mkdir -p ~/.ssh && ssh-keygen -q -t ed25519 -N '' -C tour -f ~/.ssh/id_ed25519");
        assert!(keygen.status.success(), "ssh-keygen: {}", text(&keygen.stderr));
        tour.start_quickstart();
        tour
    }

    /// `CMD` in the namespaces, as the tour's user, with a clean environment.
    fn command(&self, program: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["--target", &self.pid, "--mount", "--uts", "--net", "--"]);
        let (home, user) = match self.who {
            Who::Root => ("/root".to_owned(), "root"),
            Who::User => {
                cmd.args(["setpriv", "--reuid", TOUR_USER, "--regid", TOUR_USER, "--init-groups", "--"]);
                (format!("/home/{TOUR_USER}"), TOUR_USER)
            }
        };
        cmd.args(program)
            .env_clear()
            .env("HOME", home)
            .env("USER", user)
            .env("LOGNAME", user)
            .env(
                "PATH",
                format!(
                    "{}/bin:/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
                    self.dir.path().display()
                ),
            )
            .current_dir("/")
            .stdin(Stdio::null());
        cmd
    }

    /// A documented command line, in the home directory, bounded in time.
    fn run(&self, line: &str) -> Output {
        self.command(&["timeout", "60", "sh", "-c", &format!("cd || exit 97\n{line}")]).output().unwrap()
    }

    /// `postern quickstart`, exactly as the README runs it (defaults for everything).
    fn start_quickstart(&mut self) {
        let cmd = self.command(&["postern", "quickstart"]);
        let mut qs = spawn_logged(cmd, &self.dir.path().join("quickstart.log"));
        wait_until("the quickstart banner", Duration::from_secs(60), || {
            if let Some(status) = qs.child.try_wait().unwrap() {
                panic!("quickstart exited ({status}): {}", qs.log_text());
            }
            qs.log_text().contains("Press Ctrl-C")
        });
        self.quickstart = Some(qs);
    }

    /// Run every block of `doc` meant for this tour; panics at the first command that fails
    /// or does not print what the document shows. Returns how many commands ran.
    fn follow(&self, doc_path: &str) -> usize {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(doc_path);
        let doc = std::fs::read_to_string(&path).unwrap();
        let blocks = console_blocks(&doc).unwrap_or_else(|e| panic!("{doc_path}: {e}"));
        let mut ran = 0;
        for block in blocks.iter().filter(|b| b.not_run.is_none() && b.only.is_none_or(|w| w == self.who)) {
            for step in &block.steps {
                let out = self.run(&step.command);
                let shown = format!("{}{}", text(&out.stdout), text(&out.stderr));
                let context = || {
                    format!(
                        "{doc_path}:{} ({:?} tour)\n$ {}\n--- printed (exit {:?}):\n{shown}--- quickstart log:\n{}",
                        step.line,
                        self.who,
                        step.command,
                        out.status.code(),
                        self.quickstart.as_ref().map(Proc::log_text).unwrap_or_default()
                    )
                };
                assert!(out.status.success(), "the command failed: {}", context());
                let missing = unmatched(&step.output, &shown);
                assert!(missing.is_empty(), "output shown in the docs but not printed: {missing:#?}\n{}", context());
                ran += 1;
            }
        }
        ran
    }

    /// Ctrl-C ends quickstart cleanly (the README says so).
    fn stop(mut self) {
        let mut qs = self.quickstart.take().unwrap();
        qs.signal(nix::sys::signal::Signal::SIGINT);
        assert_eq!(qs.wait_exit(Duration::from_secs(15)), Some(0), "{}", qs.log_text());
    }
}

fn tour_user() -> nix::unistd::User {
    nix::unistd::User::from_name(TOUR_USER).unwrap().unwrap_or_else(|| {
        panic!(
            "missing the OS account {TOUR_USER} (tests/run.sh creates it; or: useradd --system -M -d /home/{TOUR_USER} \
             -s /bin/sh {TOUR_USER})"
        )
    })
}

fn tour(doc: &str, who: Who, at_least: usize) {
    let tour = Tour::start(who);
    let ran = tour.follow(doc);
    eprintln!("{ran} commands of {doc} ran as printed in the {who:?} tour");
    // A parser that quietly found nothing would pass: the documents have this much in them.
    assert!(ran >= at_least, "only {ran} commands of {doc} ran in the {who:?} tour");
    tour.stop();
}

#[test]
fn readme_tour_runs_as_printed_as_root() {
    tour("README.md", Who::Root, 15);
}

#[test]
fn readme_tour_runs_as_printed_as_a_user() {
    tour("README.md", Who::User, 15);
}

#[test]
fn quickstart_doc_runs_as_printed_as_root() {
    tour("docs/quickstart.md", Who::Root, 4);
}

#[test]
fn quickstart_doc_runs_as_printed_as_a_user() {
    tour("docs/quickstart.md", Who::User, 4);
}

/// The tours' home directories are the accounts' own (`ssh` reads those, not `$HOME`).
#[test]
fn the_tour_user_exists_with_its_home_under_home() {
    let user = tour_user();
    assert_eq!(user.dir, PathBuf::from(format!("/home/{TOUR_USER}")));
    assert_ne!(user.uid.as_raw(), 0);
}
