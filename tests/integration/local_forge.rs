//! The local forge against real repositories: issues, labels under
//! concurrency, pull requests and real squash merges.

use std::sync::Arc;

use hydraflow::forge::local::LocalForge;
use hydraflow::forge::{
    ChecksState, Forge, ForgeError, IssueState, LabelSpec, NewPullRequest, PullRequestState,
    ReviewEvent,
};
use hydraflow::git::Worktrees;

use super::git_fixture::{Fixture, commit_files, file_at, fixture, tip};

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

#[tokio::test]
async fn merge_never_overwrites_uncommitted_edits_in_the_main_checkout() {
    let fx = fixture();
    let f = forge(&fx);
    let wts = Worktrees::open(&fx.repo_path, &fx.layout, "main").unwrap();
    let wt = wts.create_or_resume(3, false).await.unwrap();
    commit_files(&wt.path, &[("README.md", Some("merged\n"))], "agent");
    std::fs::write(fx.repo_path.join("README.md"), "my local edit\n").unwrap();
    let main_before = tip(&fx.repo(), "main").unwrap().id();

    let pr = f
        .find_or_create_pull_request(&pr_for(3, "Three"))
        .await
        .unwrap();
    let result = f.merge_pull_request(pr.number, "Three").await;
    match result {
        Err(ForgeError::Local(message)) => {
            assert!(
                message.contains("commit or stash local changes"),
                "{message}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        std::fs::read_to_string(fx.repo_path.join("README.md")).unwrap(),
        "my local edit\n"
    );
    assert_eq!(tip(&fx.repo(), "main").unwrap().id(), main_before);
}
