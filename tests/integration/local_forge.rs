//! The local forge against real repositories: issues, labels under
//! concurrency, pull requests, check runs, real squash merges and the
//! operator's checkout following them the way `git checkout` switches
//! between two commits (or the merge waiting for the operator's change it
//! would overwrite), also after a crash.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hydraflow::forge::local::LocalForge;
use hydraflow::forge::{
    ChecksState, Forge, ForgeError, IssueState, LabelSpec, NewPullRequest, PullRequestState,
    ReviewEvent,
};
use hydraflow::git::Worktrees;

use super::git_fixture::{Fixture, commit_files, file_at, fixture, fsck, git, tip};

fn forge(fx: &Fixture) -> LocalForge {
    LocalForge::open(&fx.layout, &fx.repo_path).expect("open forge")
}

fn labels(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

fn pr_for(issue: u64, title: &str) -> NewPullRequest {
    NewPullRequest {
        head: format!("agent/issue-{issue}"),
        base: "main".into(),
        title: title.into(),
        body: format!("Closes #{issue}"),
    }
}

/// Every file in the forge directory parses as JSON and no temp file is left.
fn assert_files_valid(forge: &LocalForge) {
    for sub in ["issues", "pulls"] {
        for entry in std::fs::read_dir(forge.dir().join(sub)).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                name.ends_with(".json") && !name.starts_with('.'),
                "stray file {path:?}"
            );
            let text = std::fs::read_to_string(&path).unwrap();
            serde_json::from_str::<serde_json::Value>(&text)
                .unwrap_or_else(|e| panic!("{path:?} is not JSON: {e}"));
        }
    }
}

#[tokio::test]
async fn issues_labels_comments_and_close() {
    let fx = fixture();
    let f = forge(&fx);
    let a = f
        .create_issue(
            "First",
            "body",
            &labels(&["hydraflow-find", "hydraflow-find"]),
        )
        .unwrap();
    let b = f.create_issue("Second", "", &labels(&["other"])).unwrap();
    assert_eq!((a.number, b.number), (1, 2));
    assert_eq!(a.labels, labels(&["hydraflow-find"]));
    assert_eq!(a.state, IssueState::Open);

    let found = f
        .list_issues(&labels(&["hydraflow-find", "x"]))
        .await
        .unwrap();
    assert_eq!(found.iter().map(|i| i.number).collect::<Vec<_>>(), vec![1]);

    f.add_label(1, "hydraflow-plan").await.unwrap();
    f.add_label(1, "hydraflow-plan").await.unwrap();
    f.remove_label(1, "hydraflow-find").await.unwrap();
    f.remove_label(1, "never-there").await.unwrap();
    f.comment(1, "a *comment*").await.unwrap();
    let detail = f.get_issue(1).await.unwrap();
    assert_eq!(detail.issue.labels, labels(&["hydraflow-plan"]));
    assert_eq!(detail.comments.len(), 1);
    assert_eq!(detail.comments[0].body, "a *comment*");

    f.close_issue(2).await.unwrap();
    assert_eq!(
        f.get_issue(2).await.unwrap().issue.state,
        IssueState::Closed
    );
    assert!(f.list_issues(&labels(&["other"])).await.unwrap().is_empty());
    assert_eq!(f.all_issues().unwrap().len(), 2);

    for result in [
        f.get_issue(42).await.map(drop),
        f.add_label(42, "x").await,
        f.comment(42, "x").await,
        f.close_issue(42).await,
    ] {
        assert!(matches!(result, Err(ForgeError::NotFound(_))), "{result:?}");
    }
    assert_files_valid(&f);
}

#[tokio::test]
async fn ensure_labels_keeps_one_registry_entry_per_name() {
    let fx = fixture();
    let f = forge(&fx);
    let spec = |name: &str| LabelSpec {
        name: name.into(),
        color: "0e8a16".into(),
        description: format!("{name} stage"),
    };
    f.ensure_labels(&[spec("hydraflow-find"), spec("hydraflow-plan")])
        .await
        .unwrap();
    f.ensure_labels(&[spec("hydraflow-find"), spec("hydraflow-ready")])
        .await
        .unwrap();
    let text = std::fs::read_to_string(f.dir().join("labels.json")).unwrap();
    let registry: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let names: Vec<&str> = registry
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["hydraflow-find", "hydraflow-plan", "hydraflow-ready"]
    );
    assert_eq!(registry[0]["color"], "0e8a16");
    assert_eq!(registry[0]["description"], "hydraflow-find stage");
}

#[test]
fn concurrent_label_changes_lose_nothing() {
    let fx = fixture();
    let f = forge(&fx);
    f.create_issue("Busy", "", &labels(&["start"])).unwrap();
    let threads: Vec<_> = ["worker", "cli"]
        .into_iter()
        .map(|who| {
            // A separate forge handle per thread, as a separate process would have.
            let f = LocalForge::open(&fx.layout, &fx.repo_path).unwrap();
            std::thread::spawn(move || {
                for i in 0..25 {
                    f.edit_labels(1, &[format!("{who}-{i}")], &[]).unwrap();
                }
                f.edit_labels(1, &[], &[format!("{who}-0")]).unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let issue = f.issue_detail(1).unwrap().issue;
    assert_eq!(issue.labels.len(), 1 + 2 * 24, "{:?}", issue.labels);
    for who in ["worker", "cli"] {
        assert!(!issue.labels.contains(&format!("{who}-0")));
        for i in 1..25 {
            assert!(issue.labels.contains(&format!("{who}-{i}")), "{who}-{i}");
        }
    }
    assert_files_valid(&f);
}

#[tokio::test]
async fn concurrent_issue_creation_allocates_distinct_numbers() {
    let fx = fixture();
    let f = Arc::new(forge(&fx));
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let f = Arc::clone(&f);
            tokio::task::spawn_blocking(move || f.create_issue(&format!("t{i}"), "", &[]).unwrap())
        })
        .collect();
    let mut numbers = Vec::new();
    for t in tasks {
        numbers.push(t.await.unwrap().number);
    }
    numbers.sort_unstable();
    assert_eq!(numbers, (1..=8).collect::<Vec<u64>>());
}

#[tokio::test]
async fn pull_requests_share_numbers_and_are_not_duplicated() {
    let fx = fixture();
    let f = forge(&fx);
    let wts = Worktrees::open(&fx.repo_path, &fx.layout, "main").unwrap();
    let issue = f.create_issue("Feature", "", &[]).unwrap();
    let wt = wts.create_or_resume(issue.number, false).await.unwrap();
    let sha = commit_files(&wt.path, &[("feature.txt", Some("f\n"))], "feature");
    f.push_branch(&wt.path, &wt.branch).await.unwrap();
    assert!(matches!(
        f.push_branch(&wt.path, "agent/issue-404").await,
        Err(ForgeError::NotFound(_))
    ));

    let pr = f
        .find_or_create_pull_request(&pr_for(1, "Fixes #1: Feature"))
        .await
        .unwrap();
    assert_eq!(pr.number, 2, "issues and pull requests share numbers");
    assert_eq!(pr.head_sha, sha.to_string());
    assert_eq!(pr.state, PullRequestState::Open);
    assert_eq!(pr.mergeable, Some(true));
    let same = f
        .find_or_create_pull_request(&pr_for(1, "Fixes #1: Feature"))
        .await
        .unwrap();
    assert_eq!(same.number, 2);
    assert_eq!(f.all_pull_requests().unwrap().len(), 1);
    assert_eq!(f.create_issue("Next", "", &[]).unwrap().number, 3);

    // A new commit on the head shows in get_pull_request.
    let newer = commit_files(&wt.path, &[("feature.txt", Some("g\n"))], "more");
    assert_eq!(
        f.get_pull_request(2).await.unwrap().head_sha,
        newer.to_string()
    );

    assert!(matches!(
        f.find_or_create_pull_request(&pr_for(9, "no branch")).await,
        Err(ForgeError::NotFound(_))
    ));
    assert!(matches!(
        f.get_pull_request(77).await,
        Err(ForgeError::NotFound(_))
    ));
    let checks = f.checks(&newer.to_string()).await.unwrap();
    assert_eq!(
        (checks.state, checks.failures.len()),
        (ChecksState::None, 0)
    );

    f.post_review(2, ReviewEvent::Approve, "looks good")
        .await
        .unwrap();
    let text = std::fs::read_to_string(f.dir().join("pulls/2.json")).unwrap();
    let record: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(record["reviews"][0]["event"], "APPROVE");
    assert_eq!(record["reviews"][0]["body"], "looks good");
    assert_files_valid(&f);
}

#[tokio::test]
async fn squash_merge_makes_one_commit_and_updates_the_main_checkout() {
    let fx = fixture();
    let f = forge(&fx);
    let wts = Worktrees::open(&fx.repo_path, &fx.layout, "main").unwrap();
    f.create_issue("Add a feature", "", &[]).unwrap();
    let wt = wts.create_or_resume(1, false).await.unwrap();
    commit_files(&wt.path, &[("feature.txt", Some("feature\n"))], "one");
    commit_files(
        &wt.path,
        &[("README.md", Some("hello\nworld\n")), ("src/lib.txt", None)],
        "two",
    );
    // main moved on in a file the branch does not touch.
    let main_before = commit_files(&fx.repo_path, &[("other.txt", Some("other\n"))], "main");
    // An uncommitted local edit in the main checkout that the merge does not touch.
    std::fs::write(fx.repo_path.join("scratch.txt"), "mine\n").unwrap();

    let pr = f
        .find_or_create_pull_request(&pr_for(1, "Fixes #1: Add a feature"))
        .await
        .unwrap();
    let outcome = f
        .merge_pull_request(pr.number, "Fixes #1: Add a feature")
        .await
        .unwrap();

    let repo = fx.repo();
    let main = tip(&repo, "main").unwrap();
    assert_eq!(main.id().to_string(), outcome.sha);
    assert_eq!(main.parent_ids().collect::<Vec<_>>(), vec![main_before]);
    assert_eq!(
        main.message().ok(),
        Some("Fixes #1: Add a feature\n\nCloses #1")
    );
    let check = |path: &str, expected: Option<&str>| {
        assert_eq!(
            file_at(&repo, "main", path).as_deref(),
            expected,
            "{path} on main"
        );
        let on_disk = std::fs::read_to_string(fx.repo_path.join(path)).ok();
        assert_eq!(on_disk.as_deref(), expected, "{path} in the main checkout");
    };
    check("feature.txt", Some("feature\n"));
    check("README.md", Some("hello\nworld\n"));
    check("src/lib.txt", None);
    check("other.txt", Some("other\n"));
    assert_eq!(
        std::fs::read_to_string(fx.repo_path.join("scratch.txt")).unwrap(),
        "mine\n"
    );
    let mut opts = git2::StatusOptions::new();
    opts.include_untracked(false);
    assert!(
        repo.statuses(Some(&mut opts)).unwrap().is_empty(),
        "index matches main"
    );
    assert_eq!(git_status(&fx.repo_path), "?? scratch.txt\n");
    assert!(!sync_journal(&f).exists());
    fsck(&fx.repo_path);

    let merged = f.get_pull_request(pr.number).await.unwrap();
    assert_eq!(merged.state, PullRequestState::Merged);
    // The worktree still has the branch checked out: it stays.
    assert!(tip(&repo, "agent/issue-1").is_some());
    // Idempotent for restarts.
    let again = f
        .merge_pull_request(pr.number, "Fixes #1: Add a feature")
        .await
        .unwrap();
    assert_eq!(again, outcome);
    assert_eq!(tip(&repo, "main").unwrap().id(), main.id());
    assert_files_valid(&f);
}

#[tokio::test]
async fn merge_deletes_a_head_branch_nobody_has_checked_out() {
    let fx = fixture();
    let f = forge(&fx);
    let repo = fx.repo();
    let head = repo.head().unwrap().peel_to_commit().unwrap();
    repo.branch("agent/issue-4", &head, false).unwrap();
    let wts = Worktrees::open(&fx.repo_path, &fx.layout, "main").unwrap();
    let wt = wts.create_or_resume(4, false).await.unwrap();
    commit_files(&wt.path, &[("four.txt", Some("4\n"))], "four");
    wts.destroy(4, false).await.unwrap();

    let pr = f
        .find_or_create_pull_request(&pr_for(4, "Four"))
        .await
        .unwrap();
    f.merge_pull_request(pr.number, "Four").await.unwrap();
    assert!(tip(&repo, "agent/issue-4").is_none());
    assert_eq!(file_at(&repo, "main", "four.txt").as_deref(), Some("4\n"));
    // The merged PR keeps its head SHA although the branch is gone.
    assert!(
        !f.get_pull_request(pr.number)
            .await
            .unwrap()
            .head_sha
            .is_empty()
    );
}

#[tokio::test]
async fn conflicting_pull_request_is_refused_with_the_paths() {
    let fx = fixture();
    let f = forge(&fx);
    let wts = Worktrees::open(&fx.repo_path, &fx.layout, "main").unwrap();
    let wt = wts.create_or_resume(2, false).await.unwrap();
    commit_files(
        &wt.path,
        &[
            ("README.md", Some("agent says hi\n")),
            ("src/lib.txt", Some("1\n")),
        ],
        "agent",
    );
    let main_before = commit_files(
        &fx.repo_path,
        &[
            ("README.md", Some("human says hi\n")),
            ("src/lib.txt", Some("2\n")),
        ],
        "human",
    );
    let pr = f
        .find_or_create_pull_request(&pr_for(2, "Two"))
        .await
        .unwrap();
    assert_eq!(pr.mergeable, Some(false));
    match f.merge_pull_request(pr.number, "Two").await {
        Err(ForgeError::MergeConflict(message)) => {
            assert!(message.contains("README.md, src/lib.txt"), "{message}");
        }
        other => panic!("expected a merge conflict, got {other:?}"),
    }
    let repo = fx.repo();
    assert_eq!(tip(&repo, "main").unwrap().id(), main_before);
    assert_eq!(
        std::fs::read_to_string(fx.repo_path.join("README.md")).unwrap(),
        "human says hi\n"
    );
    assert_eq!(
        f.get_pull_request(pr.number).await.unwrap().state,
        PullRequestState::Open
    );
}

/// `git status --porcelain` of the checkout at `dir`, by real git.
fn git_status(dir: &Path) -> String {
    let out = std::process::Command::new("git")
        .args(["-c", "safe.directory=*", "status", "--porcelain"])
        .current_dir(dir)
        .output()
        .expect("run git status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn sync_journal(f: &LocalForge) -> PathBuf {
    f.dir().join("checkout-sync.json")
}

/// Every file of the checkout (outside `.git`) with its content, and the
/// bytes of `.git/index`: what an operator could lose.
fn snapshot(dir: &Path) -> (BTreeMap<PathBuf, Vec<u8>>, Vec<u8>) {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path == root.join(".git") {
                continue;
            }
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap().to_path_buf();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut files = BTreeMap::new();
    walk(dir, dir, &mut files);
    (
        files,
        std::fs::read(dir.join(".git/index")).unwrap_or_default(),
    )
}

/// Issue `n`'s branch with `files` committed in its worktree, and its open pull request.
async fn branch_with_pr(
    fx: &Fixture,
    f: &LocalForge,
    n: u64,
    files: &[(&str, Option<&str>)],
) -> u64 {
    let wts = Worktrees::open(&fx.repo_path, &fx.layout, "main").unwrap();
    let wt = wts.create_or_resume(n, false).await.unwrap();
    commit_files(&wt.path, files, &format!("work on {n}"));
    f.find_or_create_pull_request(&pr_for(n, &format!("Fixes #{n}")))
        .await
        .unwrap()
        .number
}

/// Two pull requests: #1 changes `README.md` and adds `feature.txt` and
/// `docs/guide.md`; #2 adds `two.txt`.
async fn two_pull_requests(fx: &Fixture, f: &LocalForge) -> (u64, u64) {
    let first = branch_with_pr(
        fx,
        f,
        1,
        &[
            ("README.md", Some("merged\n")),
            ("feature.txt", Some("feature\n")),
            ("docs/guide.md", Some("guide\n")),
        ],
    )
    .await;
    let second = branch_with_pr(fx, f, 2, &[("two.txt", Some("2\n"))]).await;
    (first, second)
}

/// Something of the operator's on paths the merges do not change: the
/// checkout follows both merges, and the operator's files and `git status`
/// stay as they were.
async fn check_carried(case: &str, prepare: impl FnOnce(&Path)) {
    let fx = fixture();
    let f = forge(&fx);
    let (first, second) = two_pull_requests(&fx, &f).await;
    prepare(&fx.repo_path);
    let status = git_status(&fx.repo_path);
    let (mut expected, _) = snapshot(&fx.repo_path);
    for pr in [first, second] {
        let outcome = f
            .merge_pull_request(pr, &format!("Fixes #{pr}"))
            .await
            .unwrap_or_else(|e| panic!("{case}: merge of #{pr} failed: {e}"));
        assert_eq!(
            tip(&fx.repo(), "main").unwrap().id().to_string(),
            outcome.sha,
            "{case}"
        );
    }
    for (path, text) in [
        ("README.md", "merged\n"),
        ("feature.txt", "feature\n"),
        ("docs/guide.md", "guide\n"),
        ("two.txt", "2\n"),
    ] {
        assert_eq!(
            file_at(&fx.repo(), "main", path).as_deref(),
            Some(text),
            "{case}"
        );
        expected.insert(PathBuf::from(path), text.as_bytes().to_vec());
    }
    let (files, _) = snapshot(&fx.repo_path);
    assert!(files == expected, "{case}: {files:?}");
    assert_eq!(git_status(&fx.repo_path), status, "{case}");
    assert!(!sync_journal(&f).exists(), "{case}");
    assert!(!fx.repo_path.join(".git/index.lock").exists(), "{case}");
    fsck(&fx.repo_path);
}

/// Something of the operator's on a path the first merge changes: that
/// merge is refused for now, naming the path, and nothing moves; the
/// second merge, which does not touch it, goes through; once the operator's
/// thing is gone, the first goes through too.
async fn check_refused(
    case: &str,
    in_the_way: &str,
    prepare: impl FnOnce(&Path),
    clear: impl FnOnce(&Path),
) {
    let fx = fixture();
    let f = forge(&fx);
    let (first, second) = two_pull_requests(&fx, &f).await;
    prepare(&fx.repo_path);
    let before = snapshot(&fx.repo_path);
    let main = tip(&fx.repo(), "main").unwrap().id();

    let err = f.merge_pull_request(first, "Fixes #1").await.unwrap_err();
    assert!(err.is_transient(), "{case}: {err:?}");
    let message = err.to_string();
    assert!(
        message.contains(in_the_way) && message.contains("commit, stash or remove"),
        "{case}: {message}"
    );
    assert_eq!(tip(&fx.repo(), "main").unwrap().id(), main, "{case}");
    assert!(
        snapshot(&fx.repo_path) == before,
        "{case}: the checkout changed"
    );
    assert!(!sync_journal(&f).exists(), "{case}");
    assert!(!fx.repo_path.join(".git/index.lock").exists(), "{case}");
    assert_eq!(
        f.get_pull_request(first).await.unwrap().state,
        PullRequestState::Open,
        "{case}"
    );

    f.merge_pull_request(second, "Fixes #2")
        .await
        .unwrap_or_else(|e| panic!("{case}: the other merge failed: {e}"));
    assert_eq!(
        std::fs::read_to_string(fx.repo_path.join("two.txt")).unwrap(),
        "2\n",
        "{case}"
    );
    clear(&fx.repo_path);
    f.merge_pull_request(first, "Fixes #1")
        .await
        .unwrap_or_else(|e| panic!("{case}: the merge failed once cleared: {e}"));
    assert_eq!(
        std::fs::read_to_string(fx.repo_path.join("feature.txt")).unwrap(),
        "feature\n",
        "{case}"
    );
    assert_eq!(git_status(&fx.repo_path), "", "{case}");
    fsck(&fx.repo_path);
}

fn write(dir: &Path, path: &str, text: &str) {
    std::fs::create_dir_all(dir.join(path).parent().unwrap()).unwrap();
    std::fs::write(dir.join(path), text).unwrap();
}

fn stage(dir: &Path, path: &str) {
    let repo = git2::Repository::open(dir).unwrap();
    let mut index = repo.index().unwrap();
    index.add_path(Path::new(path)).unwrap();
    index.write().unwrap();
}

/// Back to `main`'s tip: index, files, and nothing untracked or ignored.
fn reset_hard(dir: &Path) {
    git(dir, &["reset", "-q", "--hard"]);
    git(dir, &["clean", "-q", "-fdx"]);
}

#[tokio::test]
async fn the_operators_changes_elsewhere_are_carried_along() {
    check_carried("a file the merges leave is edited", |d| {
        write(d, "src/lib.txt", "mine\n");
    })
    .await;
    check_carried("a file the merges leave is deleted", |d| {
        std::fs::remove_file(d.join("src/lib.txt")).unwrap();
    })
    .await;
    check_carried("a new file is staged", |d| {
        write(d, "staged.txt", "staged\n");
        stage(d, "staged.txt");
    })
    .await;
    check_carried("an edit is staged and then undone in the file", |d| {
        write(d, "src/lib.txt", "staged edit\n");
        stage(d, "src/lib.txt");
        write(d, "src/lib.txt", "one\ntwo\nthree\n");
    })
    .await;
    check_carried("untracked and ignored files elsewhere", |d| {
        write(d, "notes.txt", "mine\n");
        write(d, "debug.log", "ignored\n");
    })
    .await;
}

#[tokio::test]
async fn a_merge_that_would_overwrite_the_operators_changes_waits_for_them() {
    check_refused(
        "a file the merge changes is edited",
        "README.md",
        |d| write(d, "README.md", "my local edit\n"),
        reset_hard,
    )
    .await;
    check_refused(
        "a file the merge changes is staged",
        "README.md",
        |d| {
            write(d, "README.md", "my staged edit\n");
            stage(d, "README.md");
        },
        reset_hard,
    )
    .await;
    check_refused(
        "an untracked file is where the merge adds one",
        "feature.txt",
        |d| write(d, "feature.txt", "my own feature\n"),
        reset_hard,
    )
    .await;
    check_refused(
        "an ignored file is where the merge adds one",
        "feature.txt",
        |d| {
            write(d, ".gitignore", "*.log\nfeature.txt\n");
            git(d, &["commit", "-q", "-am", "ignore feature.txt"]);
            write(d, "feature.txt", "ignored but mine\n");
        },
        reset_hard,
    )
    .await;
    check_refused(
        "an untracked file is where the merge needs a directory",
        "docs",
        |d| write(d, "docs", "a file, not a directory\n"),
        reset_hard,
    )
    .await;
    check_refused(
        "an untracked file is in a directory the merge adds to",
        "docs/guide.md",
        |d| write(d, "docs/guide.md", "my guide\n"),
        reset_hard,
    )
    .await;
}

#[tokio::test]
async fn untracked_files_out_of_the_way_stay_and_the_checkout_follows() {
    let fx = fixture();
    let f = forge(&fx);
    let pr = branch_with_pr(
        &fx,
        &f,
        1,
        &[
            ("docs/guide.md", Some("guide\n")),
            ("src/lib.txt", None),
            ("README.md", None),
        ],
    )
    .await;
    std::fs::write(fx.repo_path.join("notes.txt"), "mine\n").unwrap();
    std::fs::create_dir(fx.repo_path.join("docs")).unwrap();
    std::fs::write(fx.repo_path.join("docs/draft.md"), "draft\n").unwrap();
    std::fs::write(fx.repo_path.join("debug.log"), "ignored\n").unwrap();
    f.merge_pull_request(pr, "Fixes #1").await.unwrap();

    let (files, _) = snapshot(&fx.repo_path);
    let names: Vec<String> = files.keys().map(|p| p.display().to_string()).collect();
    assert_eq!(
        names,
        [
            ".gitignore",
            "debug.log",
            "docs/draft.md",
            "docs/guide.md",
            "notes.txt"
        ]
    );
    assert!(!fx.repo_path.join("src").exists(), "emptied directories go");
    assert_eq!(
        git_status(&fx.repo_path),
        "?? docs/draft.md\n?? notes.txt\n"
    );
    fsck(&fx.repo_path);
}

#[tokio::test]
async fn a_checkout_not_on_the_base_branch_is_left_alone() {
    for case in ["another branch", "detached HEAD"] {
        let fx = fixture();
        let f = forge(&fx);
        let pr = branch_with_pr(&fx, &f, 1, &[("feature.txt", Some("f\n"))]).await;
        let repo = fx.repo();
        let main = tip(&repo, "main").unwrap();
        if case == "another branch" {
            repo.branch("topic", &main, false).unwrap();
            repo.set_head("refs/heads/topic").unwrap();
        } else {
            repo.set_head_detached(main.id()).unwrap();
        }
        let before = snapshot(&fx.repo_path);
        let outcome = f.merge_pull_request(pr, "Fixes #1").await.unwrap();
        assert_eq!(
            tip(&repo, "main").unwrap().id().to_string(),
            outcome.sha,
            "{case}"
        );
        assert!(
            snapshot(&fx.repo_path) == before,
            "{case}: the checkout changed"
        );
        assert!(!fx.repo_path.join("feature.txt").exists(), "{case}");
        assert!(!sync_journal(&f).exists(), "{case}");
        fsck(&fx.repo_path);
    }
}

/// A commit on `branch` of `repo` (bare or not, no checkout) with `files`
/// changed from `parent`'s tree.
fn commit_on(
    repo: &git2::Repository,
    branch: &str,
    parent: &git2::Commit<'_>,
    files: &[(&str, &str)],
) -> git2::Oid {
    let mut tb = repo.treebuilder(Some(&parent.tree().unwrap())).unwrap();
    for (name, text) in files {
        tb.insert(name, repo.blob(text.as_bytes()).unwrap(), 0o100644)
            .unwrap();
    }
    let tree = repo.find_tree(tb.write().unwrap()).unwrap();
    let sig = git2::Signature::now("T", "t@example.com").unwrap();
    repo.commit(
        Some(&format!("refs/heads/{branch}")),
        &sig,
        &sig,
        branch,
        &tree,
        &[parent],
    )
    .unwrap()
}

#[tokio::test]
async fn merges_into_a_bare_repository() {
    let fx = fixture();
    let bare = fx.tmp.path().join("bare.git");
    git2::build::RepoBuilder::new()
        .bare(true)
        .clone(fx.repo_path.to_str().unwrap(), &bare)
        .unwrap();
    let repo = git2::Repository::open_bare(&bare).unwrap();
    // The clone has origin/main; make the local main and an agent branch.
    let main = repo
        .find_reference("refs/remotes/origin/main")
        .or_else(|_| repo.find_reference("refs/heads/main"))
        .unwrap()
        .peel_to_commit()
        .unwrap();
    repo.reference("refs/heads/main", main.id(), true, "test")
        .unwrap();
    commit_on(&repo, "agent/issue-1", &main, &[("feature.txt", "f\n")]);
    let f = LocalForge::open(&fx.layout, &bare).unwrap();
    let pr = f
        .find_or_create_pull_request(&pr_for(1, "Fixes #1"))
        .await
        .unwrap();
    let outcome = f.merge_pull_request(pr.number, "Fixes #1").await.unwrap();
    assert_eq!(
        repo.refname_to_id("refs/heads/main").unwrap().to_string(),
        outcome.sha
    );
    assert_eq!(
        file_at(&repo, "main", "feature.txt").as_deref(),
        Some("f\n")
    );
    assert!(repo.find_reference("refs/heads/agent/issue-1").is_err());
    assert!(!sync_journal(&f).exists());
    fsck(&bare);
}

#[tokio::test]
async fn a_base_that_moves_during_the_merge_is_merged_onto_again() {
    let fx = fixture();
    let f = forge(&fx);
    let pr = branch_with_pr(&fx, &f, 1, &[("feature.txt", Some("f\n"))]).await;
    let stale = tip(&fx.repo(), "main").unwrap().id();
    // Someone commits on main between the merge's read of the tip and its ref update.
    let moved = commit_files(&fx.repo_path, &[("other.txt", Some("other\n"))], "human");

    let outcome = f
        .merge_pull_request_from(pr, "Fixes #1", &stale.to_string())
        .unwrap();
    let repo = fx.repo();
    let main = tip(&repo, "main").unwrap();
    assert_eq!(main.id().to_string(), outcome.sha);
    assert_eq!(main.parent_ids().collect::<Vec<_>>(), [moved]);
    assert_eq!(
        super::git_fixture::subjects(&repo, "refs/heads/main"),
        ["Fixes #1", "human", "initial commit"]
    );
    assert_eq!(
        file_at(&repo, "main", "other.txt").as_deref(),
        Some("other\n")
    );
    assert_eq!(
        file_at(&repo, "main", "feature.txt").as_deref(),
        Some("f\n")
    );
    assert_eq!(
        std::fs::read_to_string(fx.repo_path.join("feature.txt")).unwrap(),
        "f\n"
    );
    assert_eq!(git_status(&fx.repo_path), "");
    assert!(!sync_journal(&f).exists());
    fsck(&fx.repo_path);
}

#[tokio::test]
async fn a_merge_interrupted_before_it_was_recorded_is_not_made_twice() {
    let fx = fixture();
    let f = forge(&fx);
    let pr = branch_with_pr(&fx, &f, 1, &[("feature.txt", Some("f\n"))]).await;
    let first = f.merge_pull_request(pr, "Fixes #1").await.unwrap();
    // As a crash after the ref moved leaves it: the record still open.
    let path = f.dir().join(format!("pulls/{pr}.json"));
    let mut record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    record["state"] = "open".into();
    record["merged_sha"] = serde_json::Value::Null;
    std::fs::write(&path, serde_json::to_string(&record).unwrap()).unwrap();
    // And main moved on meanwhile.
    let later = commit_files(&fx.repo_path, &[("later.txt", Some("l\n"))], "later");

    let again = f.merge_pull_request(pr, "Fixes #1").await.unwrap();
    assert_eq!(again, first);
    assert_eq!(tip(&fx.repo(), "main").unwrap().id(), later);
    assert_eq!(
        f.get_pull_request(pr).await.unwrap().state,
        PullRequestState::Merged
    );
}

/// A checkout whose `main` was moved from O to N by a merge that was killed
/// before the checkout followed, with `checkout-sync.json` as the merge wrote it.
struct Interrupted {
    fx: Fixture,
    old: git2::Oid,
    new: git2::Oid,
}

/// N changes README.md, adds docs/new.md, deletes src/lib.txt; the checkout
/// and its index are left at O, `main` at N, the journal written.
fn interrupted_merge() -> Interrupted {
    let fx = fixture();
    let old = tip(&fx.repo(), "main").unwrap().id();
    let new = commit_files(
        &fx.repo_path,
        &[
            ("README.md", Some("hello\nmerged\n")),
            ("docs/new.md", Some("new\n")),
            ("src/lib.txt", None),
        ],
        "Fixes #1",
    );
    let repo = fx.repo();
    repo.reset(
        &repo.find_object(old, None).unwrap(),
        git2::ResetType::Hard,
        None,
    )
    .unwrap();
    repo.reference("refs/heads/main", new, true, "the merge's ref update")
        .unwrap();
    let f = forge(&fx);
    std::fs::write(
        sync_journal(&f),
        format!(
            r#"{{"base_ref": "refs/heads/main", "old": "{old}", "new": "{new}", "created_at": "2025-01-01T00:00:00Z"}}"#
        ),
    )
    .unwrap();
    Interrupted { fx, old, new }
}

/// A named change made to a checkout by hand.
type Case<'a> = (&'a str, &'a dyn Fn(&Path));

/// The checkout at `dir` is exactly `main`: files, index, nothing else.
fn assert_at_main(dir: &Path, case: &str) {
    let (files, _) = snapshot(dir);
    let repo = git2::Repository::open(dir).unwrap();
    let mut expected = BTreeMap::new();
    let tree = repo
        .revparse_single("main")
        .unwrap()
        .peel_to_tree()
        .unwrap();
    tree.walk(git2::TreeWalkMode::PreOrder, |root, entry| {
        if entry.kind() == Some(git2::ObjectType::Blob) {
            let blob = entry.to_object(&repo).unwrap().peel_to_blob().unwrap();
            expected.insert(
                PathBuf::from(format!("{root}{}", entry.name().unwrap())),
                blob.content().to_vec(),
            );
        }
        git2::TreeWalkResult::Ok
    })
    .unwrap();
    assert!(files == expected, "{case}: files {:?}", files.keys());
    assert_eq!(git_status(dir), "", "{case}");
}

#[test]
fn opening_the_forge_finishes_a_checkout_update_a_crash_interrupted() {
    let stage = |dir: &Path, path: &str| {
        let repo = git2::Repository::open(dir).unwrap();
        let mut index = repo.index().unwrap();
        if dir.join(path).exists() {
            index.add_path(Path::new(path)).unwrap();
        } else {
            index.remove_path(Path::new(path)).unwrap();
        }
        index.write().unwrap();
    };
    let cases: [Case<'_>; 4] = [
        ("killed before the checkout was touched", &|_| {}),
        ("killed after README.md was written", &|d| {
            std::fs::write(d.join("README.md"), "hello\nmerged\n").unwrap();
        }),
        ("killed with some files and index entries new", &|d| {
            std::fs::write(d.join("README.md"), "hello\nmerged\n").unwrap();
            stage(d, "README.md");
            std::fs::remove_file(d.join("src/lib.txt")).unwrap();
            std::fs::create_dir_all(d.join("docs")).unwrap();
            std::fs::write(d.join("docs/new.md"), "new\n").unwrap();
        }),
        ("killed after the index, before the files", &|d| {
            let repo = git2::Repository::open(d).unwrap();
            let mut index = repo.index().unwrap();
            index
                .read_tree(
                    &repo
                        .revparse_single("main")
                        .unwrap()
                        .peel_to_tree()
                        .unwrap(),
                )
                .unwrap();
            index.write().unwrap();
        }),
    ];
    for (case, half_update) in cases {
        let it = interrupted_merge();
        half_update(&it.fx.repo_path);
        let f = forge(&it.fx);
        assert!(!sync_journal(&f).exists(), "{case}: the journal stays");
        assert_eq!(tip(&it.fx.repo(), "main").unwrap().id(), it.new, "{case}");
        assert_at_main(&it.fx.repo_path, case);
        fsck(&it.fx.repo_path);
    }
}

/// An edit the operator made, after the kill, to a file the merge leaves
/// is carried along while the update is finished.
#[test]
fn an_interrupted_checkout_update_carries_the_operators_edits_elsewhere() {
    let it = interrupted_merge();
    std::fs::write(it.fx.repo_path.join(".gitignore"), "*.log\n*.tmp\n").unwrap();
    let f = forge(&it.fx);
    assert!(!sync_journal(&f).exists());
    let dir = &it.fx.repo_path;
    assert_eq!(
        std::fs::read_to_string(dir.join("README.md")).unwrap(),
        "hello\nmerged\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("docs/new.md")).unwrap(),
        "new\n"
    );
    assert!(!dir.join("src/lib.txt").exists());
    assert_eq!(git_status(dir), " M .gitignore\n");
    fsck(dir);
}

#[test]
fn an_interrupted_checkout_update_never_overwrites_the_operators_edits() {
    let cases: [Case<'_>; 2] = [
        ("a file the merge changes holds a third version", &|d| {
            std::fs::write(d.join("README.md"), "the operator's\n").unwrap();
        }),
        ("an untracked file is where the merge adds one", &|d| {
            std::fs::create_dir_all(d.join("docs")).unwrap();
            std::fs::write(d.join("docs/new.md"), "mine\n").unwrap();
        }),
    ];
    for (case, edit) in cases {
        let it = interrupted_merge();
        edit(&it.fx.repo_path);
        let before = snapshot(&it.fx.repo_path);
        let f = forge(&it.fx);
        assert!(!sync_journal(&f).exists(), "{case}: the journal is dropped");
        assert!(
            snapshot(&it.fx.repo_path) == before,
            "{case}: the checkout changed"
        );
        fsck(&it.fx.repo_path);
    }
}

#[test]
fn a_journal_of_a_merge_that_never_moved_the_branch_is_dropped() {
    let it = interrupted_merge();
    let repo = it.fx.repo();
    repo.reference("refs/heads/main", it.old, true, "back")
        .unwrap();
    let before = snapshot(&it.fx.repo_path);
    let f = forge(&it.fx);
    assert!(!sync_journal(&f).exists());
    assert!(snapshot(&it.fx.repo_path) == before);
    assert_eq!(git_status(&it.fx.repo_path), "");
}

/// A merge killed after the checkout followed it (wholly or in part) and
/// before the branch moved: the next open brings the checkout back to the
/// branch's commit, so `git commit -a` there cannot commit the merge's
/// files as the operator's.
#[test]
fn a_checkout_that_followed_a_merge_that_never_landed_is_brought_back() {
    let cases: [Case<'_>; 2] = [
        ("killed after the checkout followed", &|d| {
            git(d, &["reset", "-q", "--hard", "main"]);
        }),
        ("killed with README.md followed", &|d| {
            std::fs::write(d.join("README.md"), "hello\nmerged\n").unwrap();
        }),
    ];
    for (case, followed) in cases {
        let it = interrupted_merge();
        followed(&it.fx.repo_path);
        let repo = it.fx.repo();
        repo.reference("refs/heads/main", it.old, true, "the merge never moved it")
            .unwrap();
        let f = forge(&it.fx);
        assert!(!sync_journal(&f).exists(), "{case}");
        assert_eq!(tip(&repo, "main").unwrap().id(), it.old, "{case}");
        assert_at_main(&it.fx.repo_path, case);
        fsck(&it.fx.repo_path);
    }
}

#[tokio::test]
async fn check_runs_are_summarised_like_github() {
    use hydraflow::forge::local::{CheckConclusion, CheckRun, CheckStatus};
    let fx = fixture();
    let f = forge(&fx);
    let sha = tip(&fx.repo(), "main").unwrap().id().to_string();
    let run = |name: &str, status, conclusion, summary: &str| CheckRun {
        name: name.into(),
        status,
        conclusion,
        summary: summary.into(),
    };
    let state = |f: &LocalForge| {
        let f = f.clone();
        let sha = sha.clone();
        async move { f.checks(&sha).await.unwrap() }
    };

    assert_eq!(state(&f).await.state, ChecksState::None);
    f.set_check_run(&sha, run("build", CheckStatus::Queued, None, ""))
        .unwrap();
    f.set_check_run(&sha, run("test", CheckStatus::InProgress, None, ""))
        .unwrap();
    assert_eq!(state(&f).await.state, ChecksState::Pending);
    f.set_check_run(
        &sha,
        run(
            "build",
            CheckStatus::Queued,
            Some(CheckConclusion::Success),
            "",
        ),
    )
    .unwrap();
    assert_eq!(state(&f).await.state, ChecksState::Pending);
    f.set_check_run(
        &sha,
        run(
            "test",
            CheckStatus::Completed,
            Some(CheckConclusion::Skipped),
            "",
        ),
    )
    .unwrap();
    let summary = state(&f).await;
    assert_eq!(
        (summary.state, summary.failures.len()),
        (ChecksState::Success, 0)
    );
    f.set_check_run(
        &sha,
        run(
            "test",
            CheckStatus::InProgress,
            Some(CheckConclusion::Failure),
            "2 tests failed: parse::empty, parse::long",
        ),
    )
    .unwrap();
    let summary = state(&f).await;
    assert_eq!(summary.state, ChecksState::Failure);
    assert_eq!(
        summary.failures,
        ["test (failure): 2 tests failed: parse::empty, parse::long"]
    );
    // One run per name, completed once it has a conclusion.
    let runs = f.check_runs(&sha).unwrap();
    assert_eq!(
        runs.iter()
            .map(|r| (r.name.as_str(), r.status))
            .collect::<Vec<_>>(),
        [
            ("build", CheckStatus::Completed),
            ("test", CheckStatus::Completed)
        ]
    );
    let text = std::fs::read_to_string(f.dir().join(format!("checks/{sha}.json"))).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json[1]["conclusion"], "failure");
    assert_eq!(json[1]["status"], "completed");

    // A commit nobody reported on has no checks; a malformed SHA is refused.
    let other = "0123456789abcdef0123456789abcdef01234567";
    assert_eq!(f.checks(other).await.unwrap().state, ChecksState::None);
    assert!(matches!(
        f.checks("../../state").await,
        Err(ForgeError::Rejected(_))
    ));
    // A hand-written file with a word outside the vocabulary is an error naming it.
    std::fs::write(
        f.dir().join(format!("checks/{other}.json")),
        r#"[{"name": "x", "status": "done"}]"#,
    )
    .unwrap();
    match f.checks(other).await {
        Err(ForgeError::Local(message)) => assert!(message.contains(other), "{message}"),
        result => panic!("expected an error, got {result:?}"),
    }
}
