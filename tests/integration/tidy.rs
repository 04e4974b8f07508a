//! Invariants of ARCHITECTURE.md that a reading of the sources can check: a crate or a text
//! appears only in the modules that own it.

use std::path::{Path, PathBuf};

/// Every `.rs` file under `src/`, with its path relative to the repository.
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src").flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    walk(&root.join("src"), &mut files);
    files
        .into_iter()
        .map(|p| {
            let rel = p
                .strip_prefix(root)
                .expect("under the root")
                .display()
                .to_string();
            (rel, std::fs::read_to_string(&p).expect("read source"))
        })
        .collect()
}

/// The files, other than `allowed`, whose code (not comments) contains `needle`.
fn offenders(needle: &str, allowed: &[&str]) -> Vec<String> {
    sources()
        .into_iter()
        .filter(|(path, _)| !allowed.contains(&path.as_str()))
        .filter(|(_, text)| {
            text.lines()
                .map(str::trim_start)
                .filter(|l| !l.starts_with("//"))
                .any(|l| l.contains(needle))
        })
        .map(|(path, _)| path)
        .collect()
}

#[test]
fn only_the_systemd_backend_and_polkit_import_zbus() {
    assert_eq!(
        offenders(
            "zbus",
            &[
                "src/supervisor/systemd_backend.rs",
                "src/supervisor/polkit.rs"
            ]
        ),
        Vec::<String>::new()
    );
}

#[test]
fn refusals_are_worded_in_access_alone() {
    assert_eq!(
        offenders("permission denied: ", &["src/access/mod.rs"]),
        Vec::<String>::new()
    );
}

#[test]
fn only_the_protocol_writes_reply_status_fields() {
    // The reply's `status` member is made by serde in `protocol` (and its one fallback line).
    assert_eq!(
        offenders(r#""status":"error""#, &["src/supervisor/protocol.rs"]),
        Vec::<String>::new()
    );
}

#[test]
fn only_access_peer_speaks_netlink() {
    assert_eq!(
        offenders("netlink_", &["src/access/peer.rs"]),
        Vec::<String>::new()
    );
}

#[test]
fn the_checks_find_what_they_look_for() {
    // A check that cannot fail is no check: each needle is found where it is allowed.
    for (needle, file) in [
        ("zbus", "src/supervisor/polkit.rs"),
        ("zbus", "src/supervisor/systemd_backend.rs"),
        ("permission denied: ", "src/access/mod.rs"),
        (r#""status":"error""#, "src/supervisor/protocol.rs"),
        ("netlink_", "src/access/peer.rs"),
    ] {
        assert!(
            offenders(needle, &[]).contains(&file.to_owned()),
            "{needle} not found in {file}"
        );
    }
}
