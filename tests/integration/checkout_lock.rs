//! The local forge's merges and real git in the operator's checkout at the
//! same time: the checkout's `index.lock` (git's lock protocol) keeps a
//! `git commit` from committing the index of before a merge on top of it,
//! a lock git holds makes the merge wait and then try later, and a lock a
//! killed merge left is removed at the next open.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hydraflow::forge::local::LocalForge;
use hydraflow::forge::{Forge, ForgeError, NewPullRequest, PullRequestState};
use hydraflow::git::index_lock::{IndexLock, LockFileId, LockWait};

use super::git_fixture::{Fixture, file_at, fixture, fsck, git, tip};

fn forge(fx: &Fixture) -> LocalForge {
    LocalForge::open(&fx.layout, &fx.repo_path).expect("open forge")
}

/// Branch `agent/issue-<n>` off `from` adding `merged-<n>.txt`, and its pull request.
async fn pull_request(fx: &Fixture, f: &LocalForge, from: git2::Oid, n: u64) -> u64 {
    let repo = fx.repo();
    let base = repo.find_commit(from).unwrap();
    let mut tb = repo.treebuilder(Some(&base.tree().unwrap())).unwrap();
    let file = format!("merged-{n}.txt");
    tb.insert(
        &file,
        repo.blob(format!("{n}\n").as_bytes()).unwrap(),
        0o100644,
    )
    .unwrap();
    let tree = repo.find_tree(tb.write().unwrap()).unwrap();
    let sig = git2::Signature::now("Agent", "agent@example.com").unwrap();
    repo.commit(
        Some(&format!("refs/heads/agent/issue-{n}")),
        &sig,
        &sig,
        &format!("add {file}"),
        &tree,
        &[&base],
    )
    .unwrap();
    f.find_or_create_pull_request(&NewPullRequest {
        head: format!("agent/issue-{n}"),
        base: "main".into(),
        title: format!("Fixes #{n}"),
        body: String::new(),
    })
    .await
    .unwrap()
    .number
}

fn journal(f: &LocalForge) -> std::path::PathBuf {
    f.dir().join("checkout-sync.json")
}

/// `git` in `dir`, not asserting success: (success, stderr).
fn try_git(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("git")
        .args(["-c", "safe.directory=*"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run git");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const MERGES: u64 = 40;

/// The operator runs `git commit -a` in a loop in the clean checkout while
/// 40 pull requests are merged into the branch it has checked out. Without
/// the index lock, a commit between the merge's ref update and the
/// checkout's sync takes the new `HEAD` and the old index, and the merged
/// files vanish from `main`.
#[tokio::test]
async fn git_commit_a_in_the_checkout_never_undoes_a_merge() {
    let fx = fixture();
    let f = forge(&fx);
    let root = tip(&fx.repo(), "main").unwrap().id();
    let stop = Arc::new(AtomicBool::new(false));
    let operator = {
        let (dir, stop) = (fx.repo_path.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut committed, mut refused) = (0, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match try_git(
                    &dir,
                    &["commit", "-a", "-q", "--allow-empty", "-m", "operator"],
                ) {
                    (true, _) => committed += 1,
                    (false, stderr) => refused.push(stderr),
                }
                std::thread::sleep(Duration::from_millis(fastrand::u64(0..3)));
            }
            (committed, refused)
        })
    };
    let mut later = 0;
    for n in 1..=MERGES {
        let pr = pull_request(&fx, &f, root, n).await;
        let mut tries = 0;
        loop {
            match f.merge_pull_request(pr, &format!("Fixes #{n}")).await {
                Ok(_) => break,
                Err(e) if e.is_transient() && tries < 100 => {
                    tries += 1;
                    later += 1;
                }
                Err(e) => panic!("merge of #{n} (after {tries} tries): {e}"),
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (committed, refused) = operator.join().unwrap();
    assert!(committed > 0, "the operator's commits ran: {refused:?}");
    for stderr in &refused {
        assert!(
            stderr.contains("index.lock': File exists")
                || stderr.contains("cannot lock ref 'HEAD'"),
            "git refused for another reason: {stderr}"
        );
    }

    // Every merge is on main, and no commit on main ever lost a file.
    let repo = fx.repo();
    if (1..=MERGES).any(|n| file_at(&repo, "main", &format!("merged-{n}.txt")).is_none()) {
        eprintln!(
            "DEBUG {}",
            git(
                &fx.repo_path,
                &[
                    "log",
                    "--format=%h %p %s",
                    "--name-status",
                    "-n",
                    "60",
                    "main"
                ]
            )
        );
    }
    for n in 1..=MERGES {
        assert_eq!(
            file_at(&repo, "main", &format!("merged-{n}.txt")),
            Some(format!("{n}\n")),
            "merged-{n}.txt on main ({committed} operator commits, {} refused, {later} merges tried later)",
            refused.len()
        );
    }
    let mut walk = repo.revwalk().unwrap();
    walk.push_ref("refs/heads/main").unwrap();
    for oid in walk {
        let commit = repo.find_commit(oid.unwrap()).unwrap();
        let Ok(parent) = commit.parent(0) else {
            continue;
        };
        let diff = repo
            .diff_tree_to_tree(
                Some(&parent.tree().unwrap()),
                Some(&commit.tree().unwrap()),
                None,
            )
            .unwrap();
        let deleted: Vec<_> = diff
            .deltas()
            .filter(|d| d.status() == git2::Delta::Deleted)
            .map(|d| d.old_file().path().unwrap().display().to_string())
            .collect();
        assert!(
            deleted.is_empty(),
            "commit {} ({:?}) deletes {deleted:?}",
            commit.id(),
            commit.summary()
        );
        if commit.summary().ok().flatten() == Some("operator") {
            assert_eq!(commit.tree_id(), parent.tree_id(), "{}", commit.id());
        }
    }
    assert_eq!(git(&fx.repo_path, &["status", "--porcelain"]), "");
    assert!(!fx.repo_path.join(".git/index.lock").exists());
    assert!(!journal(&f).exists());
    fsck(&fx.repo_path);
}

/// While a git command holds the checkout's `index.lock`, a merge into the
/// branch the checkout has checked out waits a little, then fails for
/// later without moving anything; git's lock is left as it is.
#[tokio::test]
async fn a_merge_waits_for_gits_index_lock_then_is_tried_later() {
    let fx = fixture();
    let f = forge(&fx);
    let root = tip(&fx.repo(), "main").unwrap().id();
    let pr = pull_request(&fx, &f, root, 1).await;
    let lock = fx.repo_path.join(".git/index.lock");
    std::fs::write(&lock, "git's").unwrap();

    let err = f.merge_pull_request(pr, "Fixes #1").await.unwrap_err();
    assert!(matches!(err, ForgeError::Transient(_)), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(&lock.display().to_string())
            && message.contains("pull request #1")
            && message.contains("merged on a later try"),
        "{message}"
    );
    assert_eq!(tip(&fx.repo(), "main").unwrap().id(), root);
    assert_eq!(std::fs::read_to_string(&lock).unwrap(), "git's");
    assert!(!journal(&f).exists());
    assert_eq!(
        f.get_pull_request(pr).await.unwrap().state,
        PullRequestState::Open
    );

    std::fs::remove_file(&lock).unwrap();
    f.merge_pull_request(pr, "Fixes #1").await.unwrap();
    assert!(fx.repo_path.join("merged-1.txt").is_file());
    assert_eq!(git(&fx.repo_path, &["status", "--porcelain"]), "");
    fsck(&fx.repo_path);
}

/// Real git honours the lock HydraFlow takes, and HydraFlow honours git's.
#[test]
fn the_lock_excludes_git_and_git_excludes_the_lock() {
    let fx = fixture();
    let git_dir = fx.repo_path.join(".git");
    let mut ours = IndexLock::prepare(&git_dir).unwrap();
    ours.acquire(LockWait::No).unwrap();
    let (ok, stderr) = try_git(&fx.repo_path, &["commit", "-a", "--allow-empty", "-m", "x"]);
    assert!(
        !ok && stderr.contains("index.lock': File exists"),
        "{stderr}"
    );
    drop(ours);
    assert!(
        !git_dir.join("index.lock").exists(),
        "released when dropped"
    );
    git(
        &fx.repo_path,
        &["commit", "-a", "-q", "--allow-empty", "-m", "x"],
    );

    std::fs::write(git_dir.join("index.lock"), "git's").unwrap();
    let mut second = IndexLock::prepare(&git_dir).unwrap();
    let err = second.acquire(LockWait::No).unwrap_err();
    assert!(err.to_string().contains("index.lock exists"), "{err}");
    drop(second);
    assert_eq!(
        std::fs::read_to_string(git_dir.join("index.lock")).unwrap(),
        "git's"
    );
}

/// `main` moved to a commit adding `merged-1.txt`; the checkout and its
/// index still at the old commit, as a kill right after the ref update
/// leaves them. Returns the new commit.
fn main_moved_under_the_checkout(fx: &Fixture) -> git2::Oid {
    let repo = fx.repo();
    let old = tip(&repo, "main").unwrap();
    let mut tb = repo.treebuilder(Some(&old.tree().unwrap())).unwrap();
    tb.insert("merged-1.txt", repo.blob(b"1\n").unwrap(), 0o100644)
        .unwrap();
    let tree = repo.find_tree(tb.write().unwrap()).unwrap();
    let sig = git2::Signature::now("T", "t@example.com").unwrap();
    let new = repo
        .commit(None, &sig, &sig, "Fixes #1", &tree, &[&old])
        .unwrap();
    repo.reference("refs/heads/main", new, true, "the merge")
        .unwrap();
    new
}

fn write_journal(fx: &Fixture, old: git2::Oid, new: git2::Oid, lock: &LockFileId) {
    let path = fx.layout.forge_dir().join("checkout-sync.json");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let journal = serde_json::json!({
        "base_ref": "refs/heads/main",
        "old": old.to_string(),
        "new": new.to_string(),
        "created_at": "2026-01-01T00:00:00Z",
        "pid": 4_194_304,
        "index_lock": lock,
    });
    std::fs::write(path, serde_json::to_vec(&journal).unwrap()).unwrap();
}

/// A merge killed while it held the checkout's `index.lock` (after the ref
/// update, before the index was replaced): the next open removes that lock
/// and brings the checkout along, so git works again without a human.
#[test]
fn opening_the_forge_removes_the_index_lock_a_killed_merge_left() {
    let fx = fixture();
    let git_dir = fx.repo_path.join(".git");
    let old = tip(&fx.repo(), "main").unwrap().id();
    let mut lock = IndexLock::prepare(&git_dir).unwrap();
    lock.acquire(LockWait::No).unwrap();
    let id = lock.id().expect("known once taken");
    // A killed process runs no destructor.
    std::mem::forget(lock);
    let new = main_moved_under_the_checkout(&fx);
    write_journal(&fx, old, new, &id);
    let (ok, stderr) = try_git(&fx.repo_path, &["status"]);
    assert!(ok, "{stderr}");
    let (ok, stderr) = try_git(&fx.repo_path, &["commit", "-a", "--allow-empty", "-m", "x"]);
    assert!(!ok && stderr.contains("index.lock"), "blocked: {stderr}");

    let f = forge(&fx);
    assert!(!git_dir.join("index.lock").exists());
    assert!(!journal(&f).exists());
    assert_eq!(
        std::fs::read_to_string(fx.repo_path.join("merged-1.txt")).unwrap(),
        "1\n"
    );
    assert_eq!(git(&fx.repo_path, &["status", "--porcelain"]), "");
    git(
        &fx.repo_path,
        &["commit", "-a", "-q", "--allow-empty", "-m", "x"],
    );
    fsck(&fx.repo_path);
}

/// The journal names a lock file that never got the name (killed before
/// taking the lock) while git holds `index.lock`: git's lock stays, and so
/// does the journal, until the next open after git is done.
#[test]
fn a_lock_the_journal_does_not_name_is_never_removed() {
    let fx = fixture();
    let git_dir = fx.repo_path.join(".git");
    let old = tip(&fx.repo(), "main").unwrap().id();
    let new = main_moved_under_the_checkout(&fx);
    let other = git_dir.join("description");
    let meta = std::fs::metadata(&other).unwrap();
    let id = LockFileId {
        dev: std::os::unix::fs::MetadataExt::dev(&meta),
        ino: std::os::unix::fs::MetadataExt::ino(&meta),
        born_ns: None,
    };
    write_journal(&fx, old, new, &id);
    std::fs::write(git_dir.join("index.lock"), "git's").unwrap();

    let f = forge(&fx);
    assert_eq!(
        std::fs::read_to_string(git_dir.join("index.lock")).unwrap(),
        "git's"
    );
    assert!(journal(&f).exists(), "kept to finish later");
    assert!(!fx.repo_path.join("merged-1.txt").exists(), "not touched");
    assert!(other.is_file());

    std::fs::remove_file(git_dir.join("index.lock")).unwrap();
    let f = forge(&fx);
    assert!(!journal(&f).exists());
    assert!(fx.repo_path.join("merged-1.txt").is_file());
    assert_eq!(git(&fx.repo_path, &["status", "--porcelain"]), "");
    fsck(&fx.repo_path);
}
