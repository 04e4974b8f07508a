//! The design documents stay the ones the repository cites
//! (docs/design/README.md, "Citing them"): no source file, test, man page,
//! unit, packaging file, README.md, ARCHITECTURE.md or other document cites
//! the original project's functional spec by section, its decision records by
//! number, or the files of either; every `docs/design/…` path named anywhere
//! exists; every relative Markdown link of the documents resolves; and the
//! index docs/design/README.md lists every document of its directory.
//!
//! Inside docs/design/ the original's decision records may be named as
//! history (its README says so); the spec's sections may not.

use std::path::{Path, PathBuf};

/// The repository's root.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Directories scanned, relative to the root, and files among them that are
/// not the repository's own text (third-party recordings, build output).
const SCANNED_DIRS: &[&str] = &[
    "src",
    "tests",
    "benches",
    "bench",
    "man",
    "packaging",
    "systemd",
    "docs",
];
const SKIPPED: &[&str] = &["tests/fixtures", "packaging/out"];
const SCANNED_FILES: &[&str] = &[
    "README.md",
    "ARCHITECTURE.md",
    "BENCHMARKS.md",
    "Cargo.toml",
    "build.rs",
];

/// Where the design documents live, relative to the root.
const DESIGN_DIR: &str = "docs/design";

/// Every UTF-8 file under `dir` (binary files are skipped), depth first.
fn walk(root: &Path, rel: &str, out: &mut Vec<String>) {
    if SKIPPED.contains(&rel) {
        return;
    }
    let dir = root.join(rel);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry"))
        .collect();
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let child = format!("{rel}/{name}");
        let kind = entry.file_type().expect("file type");
        if kind.is_dir() {
            walk(root, &child, out);
        } else if kind.is_file() {
            out.push(child);
        }
    }
}

/// The scanned files with their text, relative paths first.
fn scanned() -> Vec<(String, String)> {
    let root = root();
    let mut paths: Vec<String> = SCANNED_FILES.iter().map(|s| (*s).to_owned()).collect();
    for dir in SCANNED_DIRS {
        walk(&root, dir, &mut paths);
    }
    paths
        .into_iter()
        .filter_map(|p| {
            let bytes =
                std::fs::read(root.join(&p)).unwrap_or_else(|e| panic!("cannot read {p}: {e}"));
            String::from_utf8(bytes).ok().map(|text| (p, text))
        })
        .collect()
}

/// Line numbers (from 1) and lines of `text` that contain `needle`.
fn lines_with<'t>(text: &'t str, needle: &str) -> Vec<(usize, &'t str)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .map(|(i, l)| (i + 1, l))
        .collect()
}

/// Whether `line` cites a decision record by number: `ADR` followed by an
/// optional `-` or space and a digit; `ADRs` or a bare `ADR` is no citation.
fn cites_adr(line: &str) -> bool {
    line.match_indices("ADR").any(|(i, _)| {
        let rest = &line.as_bytes()[i + 3..];
        match rest {
            [b'-' | b' ', d, ..] | [d, ..] => d.is_ascii_digit(),
            [] => false,
        }
    })
}

/// What in `text` (the file `path`) points outside the repository: one
/// message per offending line.
fn outside_citations(path: &str, text: &str) -> Vec<String> {
    // Built from pieces so that this file does not cite what it forbids.
    let spec_section = format!("spec {}", '\u{a7}');
    let outside_files = [
        concat!("shared/", "spec/"),
        concat!("shared/", "seeds/"),
        concat!("hydraflow-", "core.md"),
        concat!("supervisor-", "protocol.md"),
    ];
    let history_allowed = path.starts_with(&format!("{DESIGN_DIR}/"));
    let mut problems = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let what = if line.contains(&spec_section) {
            Some("cites the original's functional spec by section")
        } else if !history_allowed && cites_adr(line) {
            Some("cites a decision record by number")
        } else if outside_files.iter().any(|f| line.contains(f)) {
            Some("names a document outside the repository")
        } else {
            None
        };
        if let Some(what) = what {
            problems.push(format!(
                "{path}:{}: {what}: {}; cite the document in {DESIGN_DIR}/ instead",
                n + 1,
                line.trim()
            ));
        }
    }
    problems
}

/// Every `docs/design/…` path named in `text`, with its line number. A
/// path is the longest run of `[A-Za-z0-9._/-]` after the prefix, without
/// a trailing `.` (the end of a sentence).
fn design_paths(text: &str) -> Vec<(usize, String)> {
    let prefix = format!("{DESIGN_DIR}/");
    let mut out = Vec::new();
    for (n, line) in lines_with(text, &prefix) {
        for (i, _) in line.match_indices(&prefix) {
            let rest = &line[i + prefix.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-')))
                .unwrap_or(rest.len());
            let name = rest[..end].trim_end_matches('.');
            out.push((n, format!("{prefix}{name}")));
        }
    }
    out
}

/// The targets of the relative Markdown links `[text](target)` in `text`,
/// without `#fragment`; web, mail and in-page links are left out.
fn relative_links(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in lines_with(text, "](") {
        for (i, _) in line.match_indices("](") {
            let rest = &line[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = &rest[..end];
            let target = target.split('#').next().unwrap_or_default();
            let external = ["http://", "https://", "mailto:"]
                .iter()
                .any(|p| target.starts_with(p));
            if !target.is_empty() && !external && !target.contains(' ') {
                out.push((n, target.to_owned()));
            }
        }
    }
    out
}

#[test]
fn nothing_cites_a_document_outside_the_repository() {
    let problems: Vec<String> = scanned()
        .iter()
        .flat_map(|(path, text)| outside_citations(path, text))
        .collect();
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_named_design_document_exists() {
    let root = root();
    let mut problems = Vec::new();
    for (path, text) in scanned() {
        for (n, named) in design_paths(&text) {
            if !root.join(&named).exists() {
                problems.push(format!(
                    "{path}:{n}: names {named}, which does not exist: see {DESIGN_DIR}/README.md for the documents"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn relative_links_of_the_documents_resolve() {
    let root = root();
    let mut problems = Vec::new();
    for (path, text) in scanned() {
        if !path.ends_with(".md") {
            continue;
        }
        let dir = root.join(&path);
        let dir = dir.parent().expect("a file has a directory");
        for (n, target) in relative_links(&text) {
            if !dir.join(&target).exists() {
                problems.push(format!("{path}:{n}: the link to {target} leads nowhere"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_index_lists_every_design_document() {
    let dir = root().join(DESIGN_DIR);
    let index = std::fs::read_to_string(dir.join("README.md")).expect("docs/design/README.md");
    let linked: Vec<String> = relative_links(&index).into_iter().map(|(_, t)| t).collect();
    let mut documents: Vec<String> = std::fs::read_dir(&dir)
        .expect("read docs/design")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".md") && name != "README.md")
        .collect();
    documents.sort();
    assert!(documents.len() >= 10, "documents: {documents:?}");
    let missing: Vec<&String> = documents.iter().filter(|d| !linked.contains(d)).collect();
    assert!(
        missing.is_empty(),
        "{DESIGN_DIR}/README.md does not list {missing:?}: add a row for each to its table"
    );
}

/// The checks themselves, on one-line cases: each must find what it is for.
/// (The cases are assembled from pieces, so that this file passes the checks
/// it tests.)
#[test]
fn the_checks_find_what_they_look_for() {
    let section = format!("spec {}3", '\u{a7}');
    let adr = |rest: &str| format!("ADR{rest}");
    let design = |name: &str| format!("{DESIGN_DIR}/{name}");
    let check = |path: &str, line: &str, problems: usize| {
        assert_eq!(
            outside_citations(path, line).len(),
            problems,
            "{path}: {line:?}"
        );
    };
    check("src/a.rs", &format!("//! the loops ({section})"), 1);
    check(&design("a.md"), &format!("see {section}"), 1);
    check(
        "src/a.rs",
        &format!("//! one per repository ({})", adr("-0009")),
        1,
    );
    check("README.md", &format!("as {} decided", adr(" 10")), 1);
    check(
        "ARCHITECTURE.md",
        &format!("by slug ({})", adr("-0006/0038")),
        1,
    );
    check("man/a.8", &format!(".BR {}", adr("-0010")), 1);
    check(&design("README.md"), &format!("| {} |", adr("-0009")), 0);
    check("src/a.rs", "//! the ADRs of the original", 0);
    check("src/a.rs", "//! ADR", 0);
    check(
        "tests/a.rs",
        concat!("//! docs: /work/shared/", "spec/systemd.md"),
        1,
    );
    check("src/a.rs", &format!("//! see {}", design("pipeline.md")), 0);

    assert_eq!(
        design_paths(&format!(
            "x ({}). and `{}`",
            design("pipeline.md"),
            design("a-b.md")
        )),
        vec![(1, design("pipeline.md")), (1, design("a-b.md"))]
    );
    assert_eq!(
        design_paths(&format!("[d]({}) and {}", design("README.md"), design(""))),
        vec![(1, design("README.md")), (1, design(""))]
    );
    assert_eq!(
        relative_links("[a](a.md#x), [b](https://b), [c](#c), [d](../d/)"),
        vec![(1, "a.md".to_owned()), (1, "../d/".to_owned())]
    );
}
