//! `git::Worktrees` against real repositories: create, resume, salvage,
//! destroy, queries and GC.

use std::path::Path;

use hydraflow::git::{GitError, Worktrees};

use super::git_fixture::{Fixture, commit_files, file_at, fixture, fsck, git, tip};

fn worktrees(fx: &Fixture) -> Worktrees {
    Worktrees::open(&fx.repo_path, &fx.layout, "main").expect("open worktrees")
}

#[tokio::test]
async fn create_then_resume_keeps_commits() {
    let fx = fixture();
    let wts = worktrees(&fx);
    let info = wts.create_or_resume(7, false).await.unwrap();
    assert_eq!(info.path, fx.layout.worktree_path(7));
    assert_eq!(info.branch, "agent/issue-7");
    assert!(!info.resumed);
    assert_eq!(
        std::fs::read_to_string(info.path.join("README.md")).unwrap(),
        "hello\n"
    );
    let work = commit_files(&info.path, &[("feature.txt", Some("x\n"))], "add feature");

    // A recorded worktree is reused as it is.
    let again = wts.create_or_resume(7, true).await.unwrap();
    assert!(again.resumed);
    assert_eq!(again.path, info.path);

    // After the worktree is gone, the branch (and its commit) comes back.
    wts.destroy(7, false).await.unwrap();
    assert!(!info.path.exists());
    let resumed = wts.create_or_resume(7, false).await.unwrap();
    assert!(resumed.resumed);
    assert_eq!(
        std::fs::read_to_string(resumed.path.join("feature.txt")).unwrap(),
        "x\n"
    );
    assert_eq!(
        wts.branch_sha("agent/issue-7").await.unwrap(),
        work.to_string()
    );
    assert_eq!(wts.commits_ahead(7).await.unwrap(), 1);
}

/// A worktree whose creation was not recorded (the worker was killed while
/// git checked it out) is made again, never used: files missing from it
/// would otherwise become deletions in the agent's next commit.
#[tokio::test]
async fn an_unrecorded_worktree_is_made_again() {
    let fx = fixture();
    let wts = worktrees(&fx);
    let info = wts.create_or_resume(9, false).await.unwrap();
    commit_files(&info.path, &[("done.txt", Some("done\n"))], "earlier work");
    // What a kill half-way through the checkout leaves: files missing.
    std::fs::remove_file(info.path.join("README.md")).unwrap();
    std::fs::remove_dir_all(info.path.join("src")).unwrap();
    let again = wts.create_or_resume(9, false).await.unwrap();
    assert!(again.resumed, "the branch and its commits are kept");
    for file in ["README.md", "src/lib.txt", "done.txt"] {
        assert!(again.path.join(file).is_file(), "{file} checked out again");
    }
    assert_eq!(wts.salvage(9).await.unwrap(), None, "nothing looks deleted");
    assert_eq!(fx.repo().worktrees().unwrap().len(), 1);
}

#[tokio::test]
async fn stale_registration_is_pruned_and_recreated() {
    let fx = fixture();
    let wts = worktrees(&fx);
    let info = wts.create_or_resume(3, false).await.unwrap();
    commit_files(&info.path, &[("kept.txt", Some("kept\n"))], "work");
    std::fs::remove_dir_all(&info.path).unwrap();
    let again = wts.create_or_resume(3, true).await.unwrap();
    assert!(again.resumed);
    assert!(again.path.join("kept.txt").is_file());
    assert_eq!(fx.repo().worktrees().unwrap().len(), 1);
}

/// Branch `agent/issue-<n>` off `main` with one commit adding `work.txt`.
fn agent_branch(fx: &Fixture, n: u64) -> git2::Oid {
    let repo = fx.repo();
    let main = tip(&repo, "main").unwrap();
    let mut tb = repo.treebuilder(Some(&main.tree().unwrap())).unwrap();
    tb.insert("work.txt", repo.blob(b"work\n").unwrap(), 0o100644)
        .unwrap();
    let tree = repo.find_tree(tb.write().unwrap()).unwrap();
    let sig = git2::Signature::now("Test Author", "test@example.com").unwrap();
    let refname = format!("refs/heads/agent/issue-{n}");
    repo.commit(Some(&refname), &sig, &sig, "work", &tree, &[&main])
        .unwrap()
}

/// What libgit2's `git_worktree_add` (libgit2 1.9, `src/libgit2/worktree.c`)
/// has written for worktree `issue-<n>` when killed after its first
/// `writes` steps, in its order: the registration directory
/// `.git/worktrees/issue-<n>`, the working directory, the working
/// directory's `.git` file (created, then filled), `commondir` (created,
/// then filled), `gitdir` (created, then filled), `HEAD` (through
/// `HEAD.lock`), then the checkout (here: one file of it, no index yet).
const ADD_STEPS: usize = 11;

fn half_added(fx: &Fixture, n: u64, writes: usize) {
    let common = fx.repo_path.join(".git");
    let reg = common.join("worktrees").join(format!("issue-{n}"));
    let wd = fx.layout.worktree_path(n);
    let r = reg.display().to_string();
    let w = wd.display().to_string();
    let c = common.display().to_string();
    let steps: [&dyn Fn(); ADD_STEPS] = [
        &|| std::fs::create_dir_all(&reg).unwrap(),
        &|| std::fs::create_dir_all(&wd).unwrap(),
        &|| std::fs::write(wd.join(".git"), "").unwrap(),
        &|| std::fs::write(wd.join(".git"), format!("gitdir: {r}/\n")).unwrap(),
        &|| std::fs::write(reg.join("commondir"), "").unwrap(),
        &|| std::fs::write(reg.join("commondir"), format!("{c}/\n")).unwrap(),
        &|| std::fs::write(reg.join("gitdir"), "").unwrap(),
        &|| std::fs::write(reg.join("gitdir"), format!("{w}/.git\n")).unwrap(),
        &|| std::fs::write(reg.join("HEAD.lock"), "").unwrap(),
        &|| {
            std::fs::write(
                reg.join("HEAD.lock"),
                format!("ref: refs/heads/agent/issue-{n}\n"),
            )
            .unwrap();
            std::fs::rename(reg.join("HEAD.lock"), reg.join("HEAD")).unwrap();
        },
        &|| std::fs::write(wd.join("README.md"), "hello\n").unwrap(),
    ];
    for step in &steps[..writes] {
        step();
    }
}

/// The repository is sound by real git: `git worktree list` shows the main
/// checkout and exactly `expected` (path, branch), `git worktree prune`
/// finds nothing to prune, `git fsck` passes.
fn assert_sound(fx: &Fixture, expected: &[(&Path, &str)], case: &str) {
    let list = git(&fx.repo_path, &["worktree", "list", "--porcelain"]);
    let mut listed: Vec<(String, String)> = list
        .split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .skip(1)
        .map(|block| {
            let field = |key: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .unwrap_or("")
                    .to_owned()
            };
            (field("worktree "), field("branch "))
        })
        .collect();
    listed.sort();
    let mut want: Vec<(String, String)> = expected
        .iter()
        .map(|(p, b)| {
            (
                p.canonicalize().unwrap().display().to_string(),
                format!("refs/heads/{b}"),
            )
        })
        .collect();
    want.sort();
    assert_eq!(listed, want, "{case}: git worktree list:\n{list}");
    let prune = git(
        &fx.repo_path,
        &["worktree", "prune", "--dry-run", "--verbose"],
    );
    assert_eq!(prune, "", "{case}: git would prune");
    fsck(&fx.repo_path);
}

/// A worker killed at any point inside libgit2's worktree add, restarted:
/// the worktree is made again, whether the directory is still there or a
/// first recovery already removed it (crash campaign seed
/// 16534957302346885086, run 13: `.git/worktrees/issue-1` held only
/// `commondir` and an empty `gitdir`, and every later create failed with
/// "directory exists").
#[tokio::test]
async fn a_worktree_add_killed_at_any_write_is_made_again() {
    for writes in 1..=ADD_STEPS {
        for (directory_left, recorded) in [(true, false), (false, false), (false, true)] {
            let case = format!(
                "killed after write {writes}, directory {}, creation {}recorded",
                if directory_left { "left" } else { "removed" },
                if recorded { "" } else { "not " }
            );
            let fx = fixture();
            let wts = worktrees(&fx);
            let work = agent_branch(&fx, 1);
            half_added(&fx, 1, writes);
            if !directory_left && fx.layout.worktree_path(1).exists() {
                std::fs::remove_dir_all(fx.layout.worktree_path(1)).unwrap();
            }
            let info = wts
                .create_or_resume(1, recorded)
                .await
                .unwrap_or_else(|e| panic!("{case}: {e}"));
            assert!(info.resumed, "{case}: the branch is kept");
            for file in ["README.md", "src/lib.txt", "work.txt"] {
                assert!(info.path.join(file).is_file(), "{case}: {file}");
            }
            assert_eq!(
                wts.branch_sha("agent/issue-1").await.unwrap(),
                work.to_string(),
                "{case}"
            );
            assert_eq!(wts.salvage(1).await.unwrap(), None, "{case}: clean");
            assert_sound(&fx, &[(&info.path, "agent/issue-1")], &case);
        }
    }
}

/// Garbage collection and destroy prune a half-written registration too.
#[tokio::test]
async fn gc_and_destroy_prune_half_written_registrations() {
    let fx = fixture();
    let wts = worktrees(&fx);
    agent_branch(&fx, 1);
    agent_branch(&fx, 2);
    half_added(&fx, 1, 8);
    half_added(&fx, 2, 7);
    std::fs::remove_dir_all(fx.layout.worktree_path(1)).unwrap();
    std::fs::remove_dir_all(fx.layout.worktree_path(2)).unwrap();
    let registrations = fx.repo_path.join(".git/worktrees");
    wts.gc(|_| false).await.unwrap();
    assert!(!registrations.join("issue-1").exists());
    assert!(!registrations.join("issue-2").exists());

    half_added(&fx, 3, 6);
    wts.destroy(3, false).await.unwrap();
    assert!(!registrations.join("issue-3").exists());
    assert!(!fx.layout.worktree_path(3).exists());
    assert_sound(&fx, &[], "after gc and destroy");
}

/// Pruning removes only broken registrations, and only inside
/// `.git/worktrees/`: a registration of a worktree that exists (wherever
/// it is) and a locked one stay, links are never followed.
#[tokio::test]
async fn pruning_keeps_sound_and_locked_registrations_and_touches_nothing_outside() {
    let fx = fixture();
    let wts = worktrees(&fx);
    let registrations = fx.repo_path.join(".git/worktrees");
    let elsewhere = fx.tmp.path().join("operators-worktree");
    git(
        &fx.repo_path,
        &[
            "worktree",
            "add",
            "-q",
            "-b",
            "op",
            elsewhere.to_str().unwrap(),
        ],
    );
    std::fs::write(elsewhere.join("draft.txt"), "the operator's\n").unwrap();
    let precious = fx.tmp.path().join("precious");
    std::fs::create_dir_all(&precious).unwrap();
    std::fs::write(precious.join("data"), "keep me\n").unwrap();

    // Locked (by hand, or a `git worktree add` still writing it): kept.
    std::fs::create_dir_all(registrations.join("issue-3")).unwrap();
    std::fs::write(registrations.join("issue-3/locked"), "initializing").unwrap();
    // Not a directory, a link to one outside: the link goes, not its target.
    std::os::unix::fs::symlink(&precious, registrations.join("issue-4")).unwrap();
    // Broken, holding a link outside: removed without following it.
    std::fs::create_dir_all(registrations.join("issue-5")).unwrap();
    std::fs::write(registrations.join("issue-5/commondir"), "../..\n").unwrap();
    std::os::unix::fs::symlink(&precious, registrations.join("issue-5/evil")).unwrap();
    // `gitdir` unreadable (a directory): broken.
    std::fs::create_dir_all(registrations.join("issue-6/gitdir")).unwrap();
    // The operator's `gitdir` relative to its registration, as git 2.48's
    // `worktree.useRelativePaths` writes it: kept.
    let op_gitdir = registrations.join("operators-worktree/gitdir");
    let absolute = std::fs::read_to_string(&op_gitdir).unwrap();
    std::fs::write(&op_gitdir, "../../../../operators-worktree/.git\n").unwrap();

    let info = wts.create_or_resume(7, false).await.unwrap();
    for gone in ["issue-4", "issue-5", "issue-6"] {
        assert!(
            std::fs::symlink_metadata(registrations.join(gone)).is_err(),
            "{gone} is pruned"
        );
    }
    assert!(registrations.join("issue-3/locked").is_file());
    assert!(op_gitdir.is_file());
    assert_eq!(
        std::fs::read_to_string(precious.join("data")).unwrap(),
        "keep me\n"
    );
    assert_eq!(
        std::fs::read_to_string(elsewhere.join("draft.txt")).unwrap(),
        "the operator's\n"
    );

    // The locked registration stands in the way of issue 3, with the reason.
    let err = wts.create_or_resume(3, false).await.unwrap_err();
    assert!(
        err.to_string().contains("is locked") && err.to_string().contains("issue-3/locked"),
        "{err}"
    );
    wts.gc(|_| true).await.unwrap();
    assert!(registrations.join("issue-3/locked").is_file());
    assert!(elsewhere.join("draft.txt").is_file());

    assert!(op_gitdir.is_file());

    // (git 2.47 reads a relative `gitdir` from its working directory.)
    std::fs::write(&op_gitdir, absolute).unwrap();
    std::fs::remove_dir_all(registrations.join("issue-3")).unwrap();
    assert_sound(&fx, &[(&elsewhere, "op")], "after pruning");
    assert!(!info.path.exists(), "gc removed the finished worktree");
}

#[tokio::test]
async fn unknown_directory_in_the_way_is_replaced() {
    let fx = fixture();
    let wts = worktrees(&fx);
    let path = fx.layout.worktree_path(4);
    std::fs::create_dir_all(&path).unwrap();
    std::fs::write(path.join("junk"), "junk").unwrap();
    let info = wts.create_or_resume(4, false).await.unwrap();
    assert!(!info.path.join("junk").exists());
    assert!(info.path.join("README.md").is_file());
}

#[tokio::test]
async fn salvage_commits_everything_but_ignored_files() {
    let fx = fixture();
    let wts = worktrees(&fx);
    let info = wts.create_or_resume(5, false).await.unwrap();
    assert_eq!(wts.salvage(5).await.unwrap(), None, "clean worktree");

    std::fs::write(info.path.join("README.md"), "changed\n").unwrap();
    std::fs::write(info.path.join(".hidden"), "dot\n").unwrap();
    std::fs::create_dir_all(info.path.join("new/dir")).unwrap();
    std::fs::write(info.path.join("new/dir/file.txt"), "new\n").unwrap();
    std::fs::write(info.path.join("debug.log"), "ignored\n").unwrap();
    std::fs::remove_file(info.path.join("src/lib.txt")).unwrap();

    let sha = wts.salvage(5).await.unwrap().expect("a salvage commit");
    let repo = fx.repo();
    let commit = repo
        .find_commit(git2::Oid::from_str(&sha).unwrap())
        .unwrap();
    assert_eq!(
        commit.message().ok(),
        Some("chore: salvage uncommitted changes for issue #5")
    );
    assert_eq!(commit.author().name().ok(), Some("Test Author"));
    assert_eq!(tip(&repo, "agent/issue-5").unwrap().id(), commit.id());
    let check = |path: &str, expected: Option<&str>| {
        assert_eq!(
            file_at(&repo, &sha, path).as_deref(),
            expected,
            "{path} in the salvage commit"
        );
    };
    check("README.md", Some("changed\n"));
    check(".hidden", Some("dot\n"));
    check("new/dir/file.txt", Some("new\n"));
    check("debug.log", None);
    check("src/lib.txt", None);
    assert_eq!(wts.salvage(5).await.unwrap(), None, "nothing left");
    assert_eq!(wts.salvage(99).await.unwrap(), None, "no worktree");
}

#[tokio::test]
async fn destroy_salvages_prunes_and_deletes_the_branch() {
    let fx = fixture();
    let wts = worktrees(&fx);
    let info = wts.create_or_resume(6, false).await.unwrap();
    std::fs::write(info.path.join("wip.txt"), "wip\n").unwrap();
    wts.destroy(6, false).await.unwrap();
    let repo = fx.repo();
    assert!(!info.path.exists());
    assert!(repo.worktrees().unwrap().is_empty());
    assert_eq!(
        file_at(&repo, "agent/issue-6", "wip.txt").as_deref(),
        Some("wip\n")
    );

    wts.create_or_resume(6, false).await.unwrap();
    wts.destroy(6, true).await.unwrap();
    assert!(tip(&repo, "agent/issue-6").is_none());
    assert!(repo.worktrees().unwrap().is_empty());
    // Destroying what is gone is fine.
    wts.destroy(6, true).await.unwrap();
}

#[tokio::test]
async fn commits_ahead_and_diff_against_the_merge_base() {
    let fx = fixture();
    let wts = worktrees(&fx);
    assert_eq!(wts.commits_ahead(8).await.unwrap(), 0, "no branch yet");
    let info = wts.create_or_resume(8, false).await.unwrap();
    assert_eq!(wts.commits_ahead(8).await.unwrap(), 0);
    commit_files(
        &info.path,
        &[("README.md", Some("hello\nfrom the agent\n"))],
        "one",
    );
    commit_files(&info.path, &[("added.txt", Some("added\n"))], "two");
    // main moves on meanwhile: not part of the branch's diff.
    commit_files(
        &fx.repo_path,
        &[("src/lib.txt", Some("one\n"))],
        "main moves",
    );

    assert_eq!(wts.commits_ahead(8).await.unwrap(), 2);
    let diff = wts.diff_against_base(8).await.unwrap();
    assert!(
        diff.contains("diff --git a/README.md b/README.md"),
        "{diff}"
    );
    assert!(diff.contains("+from the agent\n"), "{diff}");
    assert!(diff.contains(" hello\n"), "{diff}");
    assert!(diff.contains("+++ b/added.txt"), "{diff}");
    assert!(!diff.contains("lib.txt"), "{diff}");
    assert!(wts.diff_against_base(99).await.is_err());
}

#[tokio::test]
async fn gc_removes_done_and_orphan_worktrees_only_inside_its_directory() {
    let fx = fixture();
    let wts = worktrees(&fx);
    let done = wts.create_or_resume(1, false).await.unwrap();
    let active = wts.create_or_resume(2, false).await.unwrap();
    let root = fx.layout.worktrees_dir();
    let orphan = root.join("issue-9");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("left-over"), "x").unwrap();
    let outside = fx.tmp.path().join("precious");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("data"), "keep me").unwrap();
    std::os::unix::fs::symlink(&outside, root.join("issue-10")).unwrap();
    std::fs::create_dir_all(root.join("not-an-issue")).unwrap();

    let mut removed = wts.gc(|n| n == 1 || n == 10).await.unwrap();
    removed.sort();
    assert_eq!(removed, vec![done.path.clone(), orphan.clone()]);
    assert!(!done.path.exists() && !orphan.exists());
    assert!(active.path.join("README.md").is_file());
    assert_eq!(
        std::fs::read_to_string(outside.join("data")).unwrap(),
        "keep me"
    );
    assert!(root.join("issue-10").exists());
    assert!(root.join("not-an-issue").is_dir());
    assert_eq!(fx.repo().worktrees().unwrap().len(), 1);
    assert!(
        tip(&fx.repo(), "agent/issue-1").is_some(),
        "gc keeps branches"
    );

    // Branches are collected on their own; a checked-out one never.
    assert_eq!(wts.leftovers().await.unwrap(), vec![1, 2]);
    let deleted = wts.gc_branches(|n| n == 1 || n == 2).await.unwrap();
    assert_eq!(deleted, vec!["agent/issue-1".to_owned()]);
    assert!(tip(&fx.repo(), "agent/issue-1").is_none());
    assert!(tip(&fx.repo(), "agent/issue-2").is_some(), "checked out");
    assert_eq!(wts.leftovers().await.unwrap(), vec![2]);
}

#[tokio::test]
async fn gc_without_a_worktree_directory_does_nothing() {
    let fx = fixture();
    assert!(worktrees(&fx).gc(|_| true).await.unwrap().is_empty());
}

#[test]
fn open_refuses_non_repositories_and_missing_base_branches() {
    let fx = fixture();
    let not_repo = fx.tmp.path().join("plain");
    std::fs::create_dir_all(&not_repo).unwrap();
    let check = |path: &Path, base: &str, expected: &str| {
        let err = Worktrees::open(path, &fx.layout, base).unwrap_err();
        assert!(
            matches!(
                (&err, expected),
                (GitError::NotARepository { .. }, "not a repository")
                    | (GitError::NoBaseBranch { .. }, "no base branch")
            ),
            "{path:?} {base}: {err}"
        );
    };
    check(&not_repo, "main", "not a repository");
    check(&fx.repo_path, "develop", "no base branch");
    assert_eq!(
        Worktrees::open(&fx.repo_path, &fx.layout, "develop")
            .unwrap_err()
            .to_string(),
        "base branch \"develop\" does not exist in the repository: the checkout is on \"main\": \
         set main_branch = \"main\" in the configuration (or HYDRAFLOW_MAIN_BRANCH=main)"
    );
}
