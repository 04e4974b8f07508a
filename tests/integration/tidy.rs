//! The architecture's invariants, checked on the sources (in the manner of
//! rust-analyzer's `tidy.rs`): each rule names a crate or call and the
//! modules that may use it, and the test fails, naming the file and line,
//! when it appears anywhere else. Comments, test modules and test-only files
//! are not looked at; string literals are looked at only by the rules about
//! names (environment variables, data files).
//!
//! ARCHITECTURE.md's section "Invariants checked by tests" lists exactly
//! these rules, in this order; the test checks that too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What a rule looks for.
#[derive(Clone, Copy)]
enum Find {
    /// Any of these words in code (strings and comments blanked).
    Code(&'static [&'static str]),
    /// A read of an environment variable (`var`, `var_os`) whose name
    /// (a literal, or a constant defined in the sources) starts with one of
    /// these prefixes or is one of these names.
    EnvRead(&'static [&'static str]),
    /// Any of these words inside string literals.
    Literal(&'static [&'static str]),
    /// A string literal that is exactly one of these.
    LiteralExact(&'static [&'static str]),
    /// A thiserror message (`#[error("…")]`) that prints the error's own
    /// `source()`: a `{source}` field, or `{0}` of a `#[from]`/`#[source]`
    /// field.
    SourceInMessage,
}

/// One invariant: `find` appears only in files under `allowed` (paths
/// relative to `src/`, a trailing `/` meaning a directory).
struct Rule {
    says: &'static str,
    find: Find,
    allowed: &'static [&'static str],
}

/// systemd's variables (systemd.exec(5), sd_listen_fds(3), sd_notify(3)).
const SYSTEMD_VARS: &[&str] = &[
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
    "CREDENTIALS_DIRECTORY",
    "RUNTIME_DIRECTORY",
    "STATE_DIRECTORY",
    "INVOCATION_ID",
];

const RULES: &[Rule] = &[
    Rule {
        says: "only `supervisor::systemd_backend` and `supervisor::polkit` speak D-Bus (`zbus`)",
        find: Find::Code(&["zbus"]),
        allowed: &["supervisor/systemd_backend.rs", "supervisor/polkit.rs"],
    },
    Rule {
        says: "only `forge::github` uses `octocrab`",
        find: Find::Code(&["octocrab"]),
        allowed: &["forge/github.rs", "forge/github/"],
    },
    Rule {
        says: "only `git` and `forge` open repositories with `git2`",
        find: Find::Code(&["git2"]),
        allowed: &["git/", "forge/"],
    },
    Rule {
        says: "only `child` starts processes (`std::process::Command`, `tokio::process::Command`), besides the agent shim and the demo agent, which wrap and stand in for an agent",
        find: Find::Code(&["Command::new", "process::Command"]),
        allowed: &["child.rs", "agent/shim.rs", "demo.rs"],
    },
    Rule {
        says: "only `config::loader` reads `HYDRAFLOW_*` variables from the environment",
        find: Find::EnvRead(&["HYDRAFLOW_"]),
        allowed: &["config/loader.rs"],
    },
    Rule {
        says: "only `systemd` reads systemd's variables (`NOTIFY_SOCKET`, `LISTEN_*`, `WATCHDOG_*`, `JOURNAL_STREAM`, `CREDENTIALS_DIRECTORY`, `RUNTIME_DIRECTORY`, `STATE_DIRECTORY`, `INVOCATION_ID`)",
        find: Find::EnvRead(SYSTEMD_VARS),
        allowed: &["systemd.rs"],
    },
    Rule {
        says: "only `systemd` looks for `/run/systemd/system` (whether the host booted with systemd)",
        find: Find::Literal(&["/run/systemd/system"]),
        allowed: &["systemd.rs"],
    },
    Rule {
        says: "only `systemd` talks to systemd's notify socket, journal and credentials (`sd_notify`, `libsystemd`, `tracing_journald`)",
        find: Find::Code(&["sd_notify", "libsystemd", "tracing_journald"]),
        allowed: &["systemd.rs"],
    },
    Rule {
        says: "only `store::atomic` makes temporary files (`tempfile`)",
        find: Find::Code(&["tempfile"]),
        allowed: &["store/atomic.rs"],
    },
    Rule {
        says: "only `layout` names the files of a repository's data directory (`state.json`, `events.jsonl`, `sessions.jsonl`, `agent-calls.jsonl`, `worker.lock`)",
        find: Find::LiteralExact(&[
            "state.json",
            "events.jsonl",
            "sessions.jsonl",
            "agent-calls.jsonl",
            "worker.lock",
        ]),
        allowed: &["layout.rs"],
    },
    Rule {
        says: "the pipeline builds no JSON by hand (`json!`): its events are `pipeline::events::PipelineEvent`",
        find: Find::Code(&["json!"]),
        allowed: &[],
    },
    Rule {
        says: "only `dashboard` serves or speaks HTTP to browsers and workers (`axum`, `hyper`)",
        find: Find::Code(&["axum", "hyper"]),
        allowed: &["dashboard/"],
    },
    Rule {
        says: "only `forge::git_http` uses `ureq` (git's smart HTTP)",
        find: Find::Code(&["ureq"]),
        allowed: &["forge/git_http.rs"],
    },
    Rule {
        says: "only `dashboard::webhook` computes and checks HMACs (`hmac`: the webhook deliveries' signatures)",
        find: Find::Code(&["hmac"]),
        allowed: &["dashboard/webhook.rs"],
    },
    Rule {
        says: "`anyhow` is used only by the command line (`cli`, `main.rs`, `demo`)",
        find: Find::Code(&["anyhow"]),
        allowed: &["cli/", "main.rs", "demo.rs"],
    },
    Rule {
        says: "only `access::peer` asks the kernel who owns a socket (`netlink_sys`, `netlink_packet_sock_diag`)",
        find: Find::Code(&[
            "netlink_sys",
            "netlink_packet_sock_diag",
            "netlink_packet_core",
        ]),
        allowed: &["access/peer.rs"],
    },
    Rule {
        says: "only `access` words a refusal (`permission denied: …`), which the protocol and the dashboards send as it is",
        find: Find::Literal(&["permission denied: "]),
        allowed: &["access/mod.rs"],
    },
    Rule {
        says: "only `supervisor::protocol` writes the control protocol's replies (`\"status\":`)",
        find: Find::Literal(&["\"status\":\"", "\"status\": \""]),
        allowed: &["supervisor/protocol.rs"],
    },
    Rule {
        says: "no error message prints the error's own `source()` (`{source}`, or `{0}` of a `#[from]` field): a cause is in the message or in the chain, so the chain prints it once",
        find: Find::SourceInMessage,
        allowed: &[],
    },
];

/// The pipeline rule applies to `pipeline/` only; every other rule to all of `src/`.
fn scope(rule: &Rule) -> &'static str {
    if rule.says.starts_with("the pipeline") {
        "pipeline/"
    } else {
        ""
    }
}

/// A source file: its path under `src/`, its lines as written, its code
/// with comments removed and strings blanked, and its string literals by
/// line.
struct Source {
    rel: String,
    raw: Vec<String>,
    code: Vec<String>,
    literals: Vec<Vec<String>>,
}

/// Split Rust source into code (comments removed, string contents blanked)
/// and the string literals of each line.
fn scan(text: &str) -> (Vec<String>, Vec<Vec<String>>) {
    #[derive(PartialEq)]
    enum State {
        Code,
        LineComment,
        Block(usize),
        Str,
        Raw(usize),
    }
    let chars: Vec<char> = text.chars().collect();
    let mut code = vec![String::new()];
    let mut literals: Vec<Vec<String>> = vec![Vec::new()];
    let mut current = String::new();
    let mut state = State::Code;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '\n' {
            code.push(String::new());
            literals.push(Vec::new());
            if state == State::LineComment {
                state = State::Code;
            }
            if matches!(state, State::Str | State::Raw(_)) {
                current.push('\n');
            }
            i += 1;
            continue;
        }
        match state {
            State::Code => {
                if c == '/' && next == Some('/') {
                    state = State::LineComment;
                    i += 2;
                    continue;
                }
                if c == '/' && next == Some('*') {
                    state = State::Block(1);
                    i += 2;
                    continue;
                }
                if c == 'r' && (next == Some('"') || next == Some('#')) {
                    let mut j = i + 1;
                    let mut hashes = 0;
                    while chars.get(j) == Some(&'#') {
                        hashes += 1;
                        j += 1;
                    }
                    if chars.get(j) == Some(&'"') {
                        state = State::Raw(hashes);
                        code.last_mut().unwrap().push_str("r\"");
                        i = j + 1;
                        continue;
                    }
                }
                if c == '"' {
                    state = State::Str;
                    code.last_mut().unwrap().push('"');
                    i += 1;
                    continue;
                }
                if c == '\'' {
                    // A char literal ('x', '\n', '"'), or a lifetime.
                    if next == Some('\\') {
                        let end = (i + 2..chars.len()).find(|k| chars[*k] == '\'');
                        code.last_mut().unwrap().push_str("' '");
                        i = end.map_or(chars.len(), |e| e + 1);
                        continue;
                    }
                    if chars.get(i + 2) == Some(&'\'') {
                        code.last_mut().unwrap().push_str("' '");
                        i += 3;
                        continue;
                    }
                }
                code.last_mut().unwrap().push(c);
                i += 1;
            }
            State::LineComment => i += 1,
            State::Block(depth) => {
                if c == '*' && next == Some('/') {
                    state = if depth == 1 {
                        State::Code
                    } else {
                        State::Block(depth - 1)
                    };
                    i += 2;
                } else if c == '/' && next == Some('*') {
                    state = State::Block(depth + 1);
                    i += 2;
                } else {
                    i += 1;
                }
            }
            State::Str => {
                if c == '\\' && next != Some('\n') {
                    if let Some(n) = next {
                        current.push(n);
                    }
                    i += 2;
                } else if c == '\\' {
                    // A line continuation: the newline is counted above.
                    i += 1;
                } else if c == '"' {
                    literals
                        .last_mut()
                        .unwrap()
                        .push(std::mem::take(&mut current));
                    code.last_mut().unwrap().push('"');
                    state = State::Code;
                    i += 1;
                } else {
                    current.push(c);
                    i += 1;
                }
            }
            State::Raw(hashes) => {
                let closes = c == '"' && (1..=hashes).all(|k| chars.get(i + k) == Some(&'#'));
                if closes {
                    literals
                        .last_mut()
                        .unwrap()
                        .push(std::mem::take(&mut current));
                    code.last_mut().unwrap().push('"');
                    state = State::Code;
                    i += 1 + hashes;
                } else {
                    current.push(c);
                    i += 1;
                }
            }
        }
    }
    (code, literals)
}

/// The text before the first `#[cfg(test)]` that opens an inline module.
fn without_tests(text: &str) -> &str {
    let lines: Vec<&str> = text.lines().collect();
    let mut offset = 0;
    for (i, line) in lines.iter().enumerate() {
        if line.trim() == "#[cfg(test)]"
            && lines
                .get(i + 1)
                .is_some_and(|l| l.trim_start().starts_with("mod ") && l.trim_end().ends_with('{'))
        {
            return &text[..offset];
        }
        offset += line.len() + 1;
    }
    text
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read src") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Files declared `#[cfg(test)] mod name;`: test-only, not looked at.
fn test_only_files(files: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for (rel, text) in files {
        let dir = match Path::new(rel).file_name().and_then(|n| n.to_str()) {
            Some("mod.rs" | "lib.rs" | "main.rs") => Path::new(rel)
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            _ => Path::new(rel).with_extension(""),
        };
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim() != "#[cfg(test)]" {
                continue;
            }
            let Some(name) = lines
                .get(i + 1)
                .and_then(|l| l.trim().strip_prefix("mod "))
                .and_then(|l| l.strip_suffix(';'))
            else {
                continue;
            };
            for candidate in [
                dir.join(format!("{name}.rs")),
                dir.join(name).join("mod.rs"),
            ] {
                out.push(candidate.to_string_lossy().into_owned());
            }
        }
    }
    out
}

fn sources(files: &BTreeMap<String, String>) -> Vec<Source> {
    let test_only = test_only_files(files);
    files
        .iter()
        .filter(|(rel, _)| !test_only.contains(rel))
        .map(|(rel, text)| {
            let text = without_tests(text);
            let (code, literals) = scan(text);
            Source {
                rel: rel.clone(),
                raw: text.lines().map(str::to_owned).collect(),
                code,
                literals,
            }
        })
        .collect()
}

/// `name: &str = "VALUE"` constants of the sources, by name.
fn constants(sources: &[Source]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for s in sources {
        for (line, lits) in s.code.iter().zip(&s.literals) {
            let Some(rest) = line
                .trim_start()
                .strip_prefix("pub ")
                .or(Some(line.trim_start()))
            else {
                continue;
            };
            let Some(rest) = rest.strip_prefix("const ") else {
                continue;
            };
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if let [value] = lits.as_slice() {
                out.insert(name, value.clone());
            }
        }
    }
    out
}

fn is_word_boundary(c: Option<char>) -> bool {
    !c.is_some_and(|c| c.is_alphanumeric() || c == '_')
}

/// Whether `word` occurs in `line` as a whole word (or path segment).
fn has_word(line: &str, word: &str) -> bool {
    line.match_indices(word).any(|(at, _)| {
        let before = line[..at].chars().next_back();
        let after = line[at + word.len()..].chars().next();
        let word_end = word.ends_with(|c: char| !c.is_alphanumeric() && c != '_');
        is_word_boundary(before) && (word_end || is_word_boundary(after))
    })
}

/// The environment variable names a line reads (`var("X")`, `var_os(X)`).
fn env_reads(line: &str, literals: &[String], constants: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for call in ["var(", "var_os("] {
        for (at, _) in line.match_indices(call) {
            if !line[..at].ends_with("env::") && !line[..at].ends_with(' ') {
                continue;
            }
            let arg = line[at + call.len()..].trim_start();
            if arg.starts_with('"') {
                // The first literal of the line at or after the call.
                let index = line[..at].matches('"').count() / 2;
                if let Some(lit) = literals.get(index) {
                    out.push(lit.clone());
                }
            } else {
                let ident: String = arg
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let last = ident.rsplit("::").next().unwrap_or_default();
                if let Some(value) = constants.get(last) {
                    out.push(value.clone());
                }
            }
        }
    }
    out
}

/// Whether line `n` of `code` (whose literals are `lits`) is a thiserror
/// message printing the error's `source()`.
fn source_in_message(code: &[String], n: usize, lits: &[String]) -> bool {
    let attribute = code[n].contains("#[error(")
        || n.checked_sub(1)
            .is_some_and(|p| code[p].trim_end().ends_with("#[error("));
    if !attribute {
        return false;
    }
    // The variant's own lines: up to the next variant's message.
    let from_field = code
        .iter()
        .skip(n + 1)
        .take(4)
        .take_while(|c| !c.contains("#[error("))
        .any(|c| c.contains("#[from]") || c.contains("#[source]"));
    lits.iter()
        .any(|l| l.contains("{source}") || (from_field && l.contains("{0}")))
}

/// Every place a rule is broken: `rule says: file:line: the line`.
fn violations(sources: &[Source]) -> Vec<String> {
    let constants = constants(sources);
    let mut out = Vec::new();
    for rule in RULES {
        let scope = scope(rule);
        for s in sources {
            if !s.rel.starts_with(scope) {
                continue;
            }
            if rule.allowed.iter().any(|a| {
                if a.ends_with('/') {
                    s.rel.starts_with(a)
                } else {
                    s.rel == *a
                }
            }) {
                continue;
            }
            for (n, (line, lits)) in s.code.iter().zip(&s.literals).enumerate() {
                let hit = match rule.find {
                    Find::Code(words) => words.iter().any(|w| has_word(line, w)),
                    Find::Literal(words) => {
                        lits.iter().any(|l| words.iter().any(|w| l.contains(w)))
                    }
                    Find::LiteralExact(words) => lits.iter().any(|l| words.contains(&l.as_str())),
                    Find::EnvRead(names) => env_reads(line, lits, &constants)
                        .iter()
                        .any(|v| names.iter().any(|p| v.starts_with(p))),
                    Find::SourceInMessage => source_in_message(&s.code, n, lits),
                };
                if hit {
                    let written = s.raw.get(n).map_or(line.as_str(), String::as_str);
                    out.push(format!(
                        "{}: src/{}:{}: {}",
                        rule.says,
                        s.rel,
                        n + 1,
                        written.trim()
                    ));
                }
            }
        }
    }
    out
}

fn read_tree(root: &Path) -> BTreeMap<String, String> {
    rust_files(root)
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(root)
                .expect("under src")
                .to_string_lossy()
                .into_owned();
            (rel, std::fs::read_to_string(&p).expect("read"))
        })
        .collect()
}

#[test]
fn every_invariant_holds() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let found = violations(&sources(&read_tree(&root)));
    assert!(
        found.is_empty(),
        "{} place(s) break the architecture's invariants (ARCHITECTURE.md):\n{}",
        found.len(),
        found.join("\n")
    );
}

/// The rules catch what they are for: a tree with one violation each.
#[test]
fn the_rules_catch_their_violations() {
    let check = |rel: &str, text: &str, expected: &str| {
        let tree = BTreeMap::from([(rel.to_owned(), text.to_owned())]);
        let found = violations(&sources(&tree));
        assert!(
            found.iter().any(|v| v.starts_with(expected)),
            "{rel}: {text:?} should break {expected:?}, found {found:?}"
        );
    };
    let none = |rel: &str, text: &str| {
        let tree = BTreeMap::from([(rel.to_owned(), text.to_owned())]);
        let found = violations(&sources(&tree));
        assert!(found.is_empty(), "{rel}: {text:?} broke {found:?}");
    };
    check(
        "pipeline/x.rs",
        "use zbus::Connection;",
        "only `supervisor::systemd_backend`",
    );
    check(
        "dashboard/x.rs",
        "let c = octocrab::instance();",
        "only `forge::github`",
    );
    check(
        "demo.rs",
        "let r = git2::Repository::open(p);",
        "only `git` and `forge`",
    );
    check(
        "pipeline/stages.rs",
        "let c = tokio::process::Command::new(\"sh\");",
        "only `child`",
    );
    check(
        "supervisor/mod.rs",
        "std::env::var_os(\"HYDRAFLOW_HOME\")",
        "only `config::loader`",
    );
    check(
        "supervisor/mod.rs",
        "const HOME: &str = \"HYDRAFLOW_HOME\";\nfn f() { std::env::var_os(HOME); }",
        "only `config::loader`",
    );
    check(
        "dashboard/mod.rs",
        "match std::env::var_os(\"RUNTIME_DIRECTORY\") {}",
        "only `systemd` reads",
    );
    check(
        "supervisor/backend.rs",
        "Path::new(\"/run/systemd/system\").is_dir()",
        "only `systemd` looks",
    );
    check(
        "cli/x.rs",
        "sd_notify::notify(false, &[]);",
        "only `systemd` talks",
    );
    check(
        "forge/local.rs",
        "tempfile::NamedTempFile::new_in(d)",
        "only `store::atomic`",
    );
    check(
        "supervisor/x.rs",
        "dir.join(\"state.json\")",
        "only `layout`",
    );
    check(
        "pipeline/task.rs",
        "publish(json!({\"a\": 1}));",
        "the pipeline builds",
    );
    check("supervisor/x.rs", "use axum::Router;", "only `dashboard`");
    check("forge/github.rs", "ureq::get(u)", "only `forge::git_http`");
    check(
        "supervisor/mod.rs",
        "ring::hmac::verify(&key, body, &sig)",
        "only `dashboard::webhook`",
    );
    check(
        "dashboard/auth.rs",
        "let s = netlink_sys::Socket::new(4);",
        "only `access::peer`",
    );
    check(
        "supervisor/server.rs",
        "Response::error(format!(\"permission denied: {u} may not {a}\"))",
        "only `access` words",
    );
    check(
        "supervisor/server.rs",
        "w.write_all(b\"{\\\"status\\\":\\\"ok\\\"}\\n\")",
        "only `supervisor::protocol`",
    );
    check(
        "git/mod.rs",
        "enum E {\n    #[error(\"{path}: {source}\")]\n    Io { path: String, source: std::io::Error },\n}",
        "no error message prints",
    );
    check(
        "agent/mod.rs",
        "enum E {\n    #[error(\"agent i/o failed: {0}\")]\n    Io(#[from] std::io::Error),\n}",
        "no error message prints",
    );
    none(
        "agent/mod.rs",
        "enum E {\n    #[error(\"agent i/o failed: {0}\")]\n    Io(std::io::Error),\n    #[error(transparent)]\n    Git(#[from] GitError),\n}",
    );
    check(
        "pipeline/x.rs",
        "fn f() -> anyhow::Result<()> {}",
        "`anyhow`",
    );
    // Comments, strings, test modules and test-only files do not count.
    none(
        "pipeline/x.rs",
        "// zbus would not belong here\n/* nor octocrab */",
    );
    none("pipeline/x.rs", "let s = \"git2 in a message\";");
    none(
        "pipeline/x.rs",
        "fn f() {}\n#[cfg(test)]\nmod tests {\n    use tempfile::tempdir;\n}\n",
    );
    let tree = BTreeMap::from([
        (
            "pipeline/mod.rs".to_owned(),
            "#[cfg(test)]\nmod sim;\n".to_owned(),
        ),
        (
            "pipeline/sim.rs".to_owned(),
            "use git2::Repository;".to_owned(),
        ),
    ]);
    assert!(violations(&sources(&tree)).is_empty());
    // And what is allowed is allowed.
    none("supervisor/systemd_backend.rs", "use zbus::Connection;");
    none("supervisor/polkit.rs", "use zbus::Variant;");
    none("access/peer.rs", "use netlink_sys::Socket;");
    none("git/worktree.rs", "use git2::Repository;");
    none("systemd.rs", "std::env::var_os(\"NOTIFY_SOCKET\")");
    none(
        "config/loader.rs",
        "std::env::var(\"HYDRAFLOW_POLL_INTERVAL\")",
    );
}

/// ARCHITECTURE.md lists exactly what this test enforces.
#[test]
fn architecture_lists_exactly_these_rules() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("ARCHITECTURE.md"))
            .expect("ARCHITECTURE.md");
    let heading = "## Invariants checked by tests";
    let section = text
        .split(heading)
        .nth(1)
        .unwrap_or_else(|| panic!("ARCHITECTURE.md has no section {heading:?}"));
    let section = section.split("\n## ").next().unwrap_or(section);
    let listed: Vec<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("- "))
        .map(str::to_owned)
        .collect();
    let rules: Vec<String> = RULES.iter().map(|r| r.says.to_owned()).collect();
    assert_eq!(
        listed, rules,
        "ARCHITECTURE.md's invariants and tests/integration/tidy.rs differ"
    );
}
