//! Real git repositories in temp dirs for the worktree and local forge tests.

use std::path::{Path, PathBuf};

use git2::{Repository, RepositoryInitOptions, Signature};
use hydraflow::layout::{Layout, Slug};
use tempfile::TempDir;

/// A repository at `<tmp>/repo` with an initial commit on `main`, and a
/// layout with `data_root = <tmp>/data`, `worktree_base = <tmp>/wt`.
pub struct Fixture {
    /// Owns the temp dir.
    pub tmp: TempDir,
    /// The main checkout.
    pub repo_path: PathBuf,
    /// Where HydraFlow keeps its files.
    pub layout: Layout,
}

impl Fixture {
    /// The repository, opened.
    pub fn repo(&self) -> Repository {
        Repository::open(&self.repo_path).expect("open fixture repository")
    }
}

/// Make a fixture whose `main` holds `README.md` ("hello\n"),
/// `.gitignore` ("*.log\n") and `src/lib.txt` ("one\ntwo\nthree\n").
pub fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("temp dir");
    let repo_path = tmp.path().join("repo");
    let mut opts = RepositoryInitOptions::new();
    opts.initial_head("main");
    let repo = Repository::init_opts(&repo_path, &opts).expect("git init");
    let mut config = repo.config().expect("config");
    config
        .set_str("user.name", "Test Author")
        .expect("user.name");
    config
        .set_str("user.email", "test@example.com")
        .expect("user.email");
    commit_files(
        &repo_path,
        &[
            ("README.md", Some("hello\n")),
            (".gitignore", Some("*.log\n")),
            ("src/lib.txt", Some("one\ntwo\nthree\n")),
        ],
        "initial commit",
    );
    let layout = Layout {
        slug: Slug::new("repo").expect("slug"),
        data_root: tmp.path().join("data"),
        worktree_base: tmp.path().join("wt"),
    };
    Fixture {
        tmp,
        repo_path,
        layout,
    }
}

/// Write (`Some`) or delete (`None`) files in the checkout or worktree at
/// `dir`, stage exactly them and commit on HEAD. Returns the commit id.
pub fn commit_files(dir: &Path, files: &[(&str, Option<&str>)], message: &str) -> git2::Oid {
    let repo = Repository::open(dir).expect("open");
    let mut index = repo.index().expect("index");
    for (path, content) in files {
        let full = dir.join(path);
        match content {
            Some(text) => {
                std::fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
                std::fs::write(&full, text).expect("write");
                index.add_path(Path::new(path)).expect("add");
            }
            None => {
                std::fs::remove_file(&full).expect("remove");
                index.remove_path(Path::new(path)).expect("rm");
            }
        }
    }
    index.write().expect("write index");
    let tree = repo
        .find_tree(index.write_tree().expect("write tree"))
        .expect("tree");
    let sig = Signature::now("Test Author", "test@example.com").expect("sig");
    let parent = repo.head().ok().map(|h| h.peel_to_commit().expect("head"));
    let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
    repo.commit(Some("HEAD"), &sig, &sig, message, &tree, &parents)
        .expect("commit")
}

/// Commit `content` to `file` on `main` of the bare repository at `bare` directly, as a
/// human pushing to the forge would (no checkout).
pub fn commit_on_bare_main(bare: &Path, file: &str, content: &str) {
    let repo = Repository::open_bare(bare).expect("bare");
    let head = repo
        .find_reference("refs/heads/main")
        .and_then(|r| r.peel_to_commit())
        .expect("main");
    let mut tb = repo
        .treebuilder(Some(&head.tree().expect("tree")))
        .expect("tb");
    tb.insert(file, repo.blob(content.as_bytes()).expect("blob"), 0o100644)
        .expect("insert");
    let tree = repo.find_tree(tb.write().expect("write")).expect("tree");
    let sig = Signature::now("human", "human@example.com").expect("sig");
    repo.commit(
        Some("refs/heads/main"),
        &sig,
        &sig,
        "human change",
        &tree,
        &[&head],
    )
    .expect("commit");
}

/// The content of `path` in the tree of `rev`, `None` when absent.
pub fn file_at(repo: &Repository, rev: &str, path: &str) -> Option<String> {
    let tree = repo
        .revparse_single(rev)
        .expect("rev")
        .peel_to_tree()
        .expect("tree");
    let entry = tree.get_path(Path::new(path)).ok()?;
    let blob = entry.to_object(repo).ok()?.peel_to_blob().ok()?;
    Some(String::from_utf8_lossy(blob.content()).into_owned())
}

/// The tip commit of local branch `name`, `None` when it does not exist.
pub fn tip<'r>(repo: &'r Repository, name: &str) -> Option<git2::Commit<'r>> {
    repo.find_branch(name, git2::BranchType::Local)
        .ok()
        .map(|b| b.get().peel_to_commit().expect("tip"))
}

/// Subjects of the commits reachable from `refname` (e.g. `refs/heads/main`), newest first.
pub fn subjects(repo: &Repository, refname: &str) -> Vec<String> {
    let mut walk = repo.revwalk().expect("revwalk");
    walk.push_ref(refname).expect("ref");
    walk.map(|oid| {
        repo.find_commit(oid.expect("oid"))
            .expect("commit")
            .summary()
            .ok()
            .flatten()
            .unwrap_or("")
            .to_owned()
    })
    .collect()
}

/// Run real `git` with `args` in `dir` (any owner), asserting success; what it
/// printed (stdout, then stderr).
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(["-c", "safe.directory=*"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?} failed in {dir:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `git fsck --strict` of the repository at `dir` succeeds.
pub fn fsck(dir: &Path) {
    git(dir, &["fsck", "--strict", "--no-dangling"]);
}
