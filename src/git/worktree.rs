//! Per-issue worktrees at `<worktree_base>/<slug>/issue-<N>` on branch
//! `agent/issue-<N>` (docs/design/data-layout.md, docs/design/pipeline.md).
//! Create and destroy are serialised per repository slug.
//!
//! git2 is blocking: every operation runs in [`tokio::task::spawn_blocking`]
//! and opens its own [`git2::Repository`] inside the closure.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use git2::{BranchType, DiffFormat, ErrorCode, IndexAddOption, Repository, StatusOptions};

use super::{GitError, git, io};
use crate::layout::Layout;

/// A worktree ready for an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorktreeInfo {
    /// Its directory.
    pub path: PathBuf,
    /// Its branch (`agent/issue-<N>`).
    pub branch: String,
    /// True when the branch existed already (its commits are kept).
    pub resumed: bool,
}

/// The worktrees of one repository.
#[derive(Debug, Clone)]
pub struct Worktrees {
    repo_path: PathBuf,
    layout: Layout,
    base_branch: String,
}

/// One async lock per repository slug, process-wide: create, destroy and GC
/// of the same repository never interleave.
static SLUG_LOCKS: LazyLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn slug_lock(slug: &str) -> Arc<tokio::sync::Mutex<()>> {
    let mut locks = SLUG_LOCKS.lock().unwrap_or_else(PoisonError::into_inner);
    locks.entry(slug.to_owned()).or_default().clone()
}

/// Run blocking git work on the blocking pool.
async fn blocking<T, F>(f: F) -> Result<T, GitError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, GitError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| GitError::Io {
            context: "git task did not finish".into(),
            cause: std::io::Error::other(e),
        })?
}

fn open_repo(path: &Path) -> Result<Repository, GitError> {
    Repository::open(path).map_err(|e| GitError::NotARepository {
        path: path.to_path_buf(),
        message: e.message().to_owned(),
    })
}

/// The tip of local branch `name`, `None` when the branch does not exist.
fn branch_tip<'r>(repo: &'r Repository, name: &str) -> Result<Option<git2::Commit<'r>>, GitError> {
    match repo.find_branch(name, BranchType::Local) {
        Ok(branch) => branch
            .get()
            .peel_to_commit()
            .map(Some)
            .map_err(git(format!("cannot read the tip of branch {name}"))),
        Err(e) if e.code() == ErrorCode::NotFound => Ok(None),
        Err(e) => Err(git(format!("cannot look up branch {name}"))(e)),
    }
}

fn base_tip<'r>(repo: &'r Repository, base: &str) -> Result<git2::Commit<'r>, GitError> {
    branch_tip(repo, base)?.ok_or_else(|| GitError::NoBaseBranch {
        branch: base.to_owned(),
        hint: super::base_branch_hint(repo, base),
    })
}

/// Remove every broken registration under `<common git dir>/worktrees/`, by
/// the rules of `git worktree prune` (git-worktree(1), "DETAILS"; git's
/// `should_prune_worktree`): an entry that is not a directory, or a
/// directory without a `locked` file whose `gitdir` file is missing,
/// unreadable or empty, or names a `.git` file that does not exist.
///
/// A registration with a `locked` file is never removed (a human locked it,
/// or git's own `worktree add` is still writing it: git locks the
/// registration while it fills it), nor is one whose `gitdir` names an
/// existing file, wherever that is. Nothing outside a registration's own
/// directory is touched: an entry that is a symbolic link is unlinked,
/// never followed, and removing a directory does not follow the links in
/// it.
///
/// libgit2 lists only registrations holding `commondir`, `gitdir` and
/// `HEAD`, so it cannot see what a worker killed inside `git_worktree_add`
/// leaves (which writes, in order: the registration directory, the working
/// directory, its `.git` file, `commondir`, `gitdir`, `HEAD`, then checks
/// out); hence the directory is read here. (libgit2 1.9 also skips the
/// entry after each one it filters out of that list, so two such entries
/// side by side make every `git_worktree_add` fail with "reference … is
/// already checked out".)
fn prune_stale(repo: &Repository) -> Result<(), GitError> {
    let root = repo.commondir().join("worktrees");
    let entries = match std::fs::read_dir(&root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(format!("cannot read {}", root.display()))(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(format!("cannot read {}", root.display())))?;
        let dir = entry.path();
        let Some(reason) = registration_defect(&dir)? else {
            continue;
        };
        tracing::info!(registration = %dir.display(), reason, "pruning a broken worktree registration");
        let is_dir = entry
            .file_type()
            .map_err(io(format!("cannot inspect {}", dir.display())))?
            .is_dir();
        if is_dir {
            std::fs::remove_dir_all(&dir)
        } else {
            std::fs::remove_file(&dir)
        }
        .map_err(io(format!(
            "cannot remove the broken worktree registration {}",
            dir.display()
        )))?;
    }
    Ok(())
}

/// Why the worktree registration at `dir` is broken (see [`prune_stale`]),
/// or `None` when it is sound or locked.
fn registration_defect(dir: &Path) -> Result<Option<String>, GitError> {
    let meta =
        std::fs::symlink_metadata(dir).map_err(io(format!("cannot inspect {}", dir.display())))?;
    if !meta.is_dir() {
        return Ok(Some("it is not a directory".into()));
    }
    if std::fs::symlink_metadata(dir.join("locked")).is_ok() {
        return Ok(None);
    }
    let gitdir = match std::fs::read(dir.join("gitdir")) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Some("it has no gitdir file".into()));
        }
        Err(e) => return Ok(Some(format!("its gitdir file cannot be read: {e}"))),
    };
    let target = gitdir.trim_ascii();
    if target.is_empty() {
        return Ok(Some("its gitdir file is empty".into()));
    }
    // Relative with `worktree.useRelativePaths`: from the registration.
    let target = dir.join(bytes_path(target));
    match std::fs::symlink_metadata(&target) {
        Ok(_) => Ok(None),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            Ok(Some(format!(
                "its gitdir names {}, which does not exist",
                target.display()
            )))
        }
        // Cannot tell (permissions): keep it, as a valid one would be kept.
        Err(_) => Ok(None),
    }
}

fn bytes_path(bytes: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt as _;
    PathBuf::from(std::ffi::OsStr::from_bytes(bytes))
}

/// Valid registered worktrees: canonical working directory -> registration name.
fn registered(repo: &Repository) -> Result<HashMap<PathBuf, String>, GitError> {
    let mut out = HashMap::new();
    let names = repo.worktrees().map_err(git("cannot list worktrees"))?;
    for name in names.iter().filter_map(|n| n.ok().flatten()) {
        let Ok(wt) = repo.find_worktree(name) else {
            continue;
        };
        if wt.validate().is_ok()
            && let Ok(path) = wt.path().canonicalize()
        {
            out.insert(path, name.to_owned());
        }
    }
    Ok(out)
}

/// The full ref name checked out in the valid worktree at `path`, if `path`
/// is one of `repo`'s registered worktrees.
fn worktree_head_at(repo: &Repository, path: &Path) -> Result<Option<String>, GitError> {
    let Ok(canonical) = path.canonicalize() else {
        return Ok(None);
    };
    let Some(name) = registered(repo)?.remove(&canonical) else {
        return Ok(None);
    };
    let wt = repo
        .find_worktree(&name)
        .map_err(git(format!("cannot open worktree {name}")))?;
    let wt_repo = Repository::open_from_worktree(&wt)
        .map_err(git(format!("cannot open worktree {}", path.display())))?;
    let head = wt_repo
        .find_reference("HEAD")
        .map_err(git(format!("cannot read HEAD of {}", path.display())))?;
    Ok(Some(head.symbolic_target().ok().flatten().map_or_else(
        || "(detached HEAD)".to_owned(),
        str::to_owned,
    )))
}

/// Remove `path` (a directory or a symlink) only when it resolves inside
/// `root`; a symlink itself is unlinked, never followed.
fn remove_inside(root: &Path, path: &Path) -> Result<(), GitError> {
    let canonical_root = root
        .canonicalize()
        .map_err(io(format!("cannot resolve {}", root.display())))?;
    let meta = std::fs::symlink_metadata(path)
        .map_err(io(format!("cannot inspect {}", path.display())))?;
    let resolved = path
        .canonicalize()
        .map_err(|_| GitError::OutsideRoots(path.to_path_buf()))?;
    if resolved == canonical_root || !resolved.starts_with(&canonical_root) {
        return Err(GitError::OutsideRoots(path.to_path_buf()));
    }
    if meta.file_type().is_symlink() || meta.is_file() {
        std::fs::remove_file(path)
    } else {
        std::fs::remove_dir_all(path)
    }
    .map_err(io(format!("cannot remove {}", path.display())))
}

fn salvage_blocking(path: &Path, issue: u64) -> Result<Option<String>, GitError> {
    if !path.is_dir() {
        return Ok(None);
    }
    let repo = match Repository::open(path) {
        Ok(repo) => repo,
        // Half made (killed inside `git_worktree_add`, before its `HEAD`):
        // no agent ever ran there, nothing to salvage.
        Err(e) if e.code() == ErrorCode::NotFound => {
            tracing::warn!(path = %path.display(), "not a worktree git can open: nothing to salvage");
            return Ok(None);
        }
        Err(e) => return Err(git(format!("cannot open worktree {}", path.display()))(e)),
    };
    let mut opts = StatusOptions::new();
    opts.include_untracked(true)
        .recurse_untracked_dirs(true)
        .include_ignored(false)
        .exclude_submodules(true);
    let dirty = !repo
        .statuses(Some(&mut opts))
        .map_err(git(format!("cannot read the status of {}", path.display())))?
        .is_empty();
    if !dirty {
        return Ok(None);
    }
    let context = format!("cannot salvage changes in {}", path.display());
    let mut index = repo.index().map_err(git(&context))?;
    index
        .add_all(["*"], IndexAddOption::DEFAULT, None)
        .map_err(git(&context))?;
    index.update_all(["*"], None).map_err(git(&context))?;
    index.write().map_err(git(&context))?;
    let tree_id = index.write_tree().map_err(git(&context))?;
    let parent = match repo.head() {
        Ok(head) => Some(head.peel_to_commit().map_err(git(&context))?),
        Err(e) if e.code() == ErrorCode::UnbornBranch => None,
        Err(e) => return Err(git(&context)(e)),
    };
    if parent.as_ref().is_some_and(|p| p.tree_id() == tree_id) {
        return Ok(None);
    }
    let tree = repo.find_tree(tree_id).map_err(git(&context))?;
    let sig = super::signature(&repo).map_err(git(&context))?;
    let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
    let oid = repo
        .commit(
            Some("HEAD"),
            &sig,
            &sig,
            &format!("chore: salvage uncommitted changes for issue #{issue}"),
            &tree,
            &parents,
        )
        .map_err(git(&context))?;
    tracing::info!(issue, commit = %oid, "salvaged uncommitted changes");
    Ok(Some(oid.to_string()))
}

/// Local branches named `agent/issue-<N>`, with their issue numbers.
fn agent_branches(repo: &Repository) -> Result<Vec<(u64, String)>, GitError> {
    let mut out = Vec::new();
    for branch in repo
        .branches(Some(BranchType::Local))
        .map_err(git("cannot list branches"))?
    {
        let (branch, _) = branch.map_err(git("cannot list branches"))?;
        let Ok(Some(name)) = branch.name() else {
            continue;
        };
        if let Some(n) = name
            .strip_prefix("agent/issue-")
            .and_then(|n| n.parse::<u64>().ok())
        {
            out.push((n, name.to_owned()));
        }
    }
    Ok(out)
}

impl Worktrees {
    /// Open the repository at `repo_path` and check that `base_branch` exists.
    ///
    /// # Errors
    /// [`GitError::NotARepository`], [`GitError::NoBaseBranch`].
    pub fn open(
        repo_path: &Path,
        layout: &Layout,
        base_branch: &str,
    ) -> Result<Worktrees, GitError> {
        let repo = open_repo(repo_path)?;
        base_tip(&repo, base_branch)?;
        Ok(Worktrees {
            repo_path: repo_path.to_path_buf(),
            layout: layout.clone(),
            base_branch: base_branch.to_owned(),
        })
    }

    /// The repository's checkout.
    pub fn repo_path(&self) -> &Path {
        &self.repo_path
    }

    /// The base branch.
    pub fn base_branch(&self) -> &str {
        &self.base_branch
    }

    /// The layout these worktrees follow.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Create the issue's worktree from the base branch, or resume it: an
    /// existing branch keeps its commits.
    ///
    /// `recorded` says whether the worktree's creation was recorded as
    /// complete (in `state.json`). An existing directory is reused only
    /// then: a directory without that record may be half checked out (the
    /// worker was killed while git wrote it), and files it lacks would look
    /// deleted to the agent's next `git add -A`. Such a directory is
    /// removed and the worktree made again; the branch and its commits are
    /// kept. A stale registration (directory deleted) is pruned and the
    /// worktree recreated; an `issue-<N>` directory git does not know is
    /// removed.
    ///
    /// # Errors
    /// [`GitError`] naming what failed, e.g. when the branch is checked out
    /// elsewhere or the directory holds a worktree of another branch.
    pub async fn create_or_resume(
        &self,
        issue: u64,
        recorded: bool,
    ) -> Result<WorktreeInfo, GitError> {
        let lock = slug_lock(self.layout.slug.as_str());
        let _guard = lock.lock().await;
        let this = self.clone();
        blocking(move || {
            if !recorded {
                this.discard_unrecorded(issue)?;
            }
            this.create_blocking(issue)
        })
        .await
    }

    /// Remove a worktree directory whose creation was never recorded, and
    /// its registration, which a kill inside libgit2's `git_worktree_add`
    /// may have left half written even where the directory is gone (the
    /// branch stays).
    fn discard_unrecorded(&self, issue: u64) -> Result<(), GitError> {
        let path = self.layout.worktree_path(issue);
        if std::fs::symlink_metadata(&path).is_ok() {
            tracing::warn!(issue, path = %path.display(), "removing a worktree whose creation was not recorded (interrupted); making it again");
            remove_inside(&self.layout.worktrees_dir(), &path)?;
        }
        let repo = open_repo(&self.repo_path)?;
        prune_stale(&repo)
    }

    fn create_blocking(&self, issue: u64) -> Result<WorktreeInfo, GitError> {
        let repo = open_repo(&self.repo_path)?;
        let path = self.layout.worktree_path(issue);
        let branch = Layout::branch_name(issue);
        let refname = format!("refs/heads/{branch}");
        let name = format!("issue-{issue}");
        prune_stale(&repo)?;

        if std::fs::symlink_metadata(&path).is_ok() {
            match worktree_head_at(&repo, &path)? {
                Some(head) if head == refname => {
                    return Ok(WorktreeInfo {
                        path,
                        branch,
                        resumed: true,
                    });
                }
                Some(head) => {
                    return Err(GitError::Git {
                        context: format!("cannot use worktree {}", path.display()),
                        cause: git2::Error::from_str(&format!(
                            "it has {head} checked out, expected {refname}"
                        )),
                    });
                }
                None => {
                    tracing::warn!(path = %path.display(), "removing a directory git does not know as a worktree");
                    remove_inside(&self.layout.worktrees_dir(), &path)?;
                    // Its registration, if half written, now names nothing.
                    prune_stale(&repo)?;
                }
            }
        }

        let registration = repo.commondir().join("worktrees").join(&name);
        if std::fs::symlink_metadata(&registration).is_ok() {
            let why = match repo.find_worktree(&name) {
                Ok(wt) if wt.validate().is_ok() => {
                    format!("it is the worktree at {}", wt.path().display())
                }
                _ if registration.join("locked").exists() => format!(
                    "it is locked (by hand, or by a `git worktree add` still running): \
                     if no git command is running, remove {}",
                    registration.join("locked").display()
                ),
                _ => "it cannot be opened, yet its gitdir file names a working directory \
                      that exists: remove that directory, then run `git worktree prune`"
                    .to_owned(),
            };
            return Err(GitError::Git {
                context: format!("cannot create worktree {}", path.display()),
                cause: git2::Error::from_str(&format!(
                    "the worktree registration {} exists: {why}",
                    registration.display()
                )),
            });
        }

        let base = base_tip(&repo, &self.base_branch)?;
        let (reference, resumed) = match repo.find_branch(&branch, BranchType::Local) {
            Ok(existing) => (existing.into_reference(), true),
            Err(e) if e.code() == ErrorCode::NotFound => (
                repo.branch(&branch, &base, false)
                    .map_err(git(format!("cannot create branch {branch}")))?
                    .into_reference(),
                false,
            ),
            Err(e) => return Err(git(format!("cannot look up branch {branch}"))(e)),
        };
        let parent = self.layout.worktrees_dir();
        std::fs::create_dir_all(&parent)
            .map_err(io(format!("cannot create {}", parent.display())))?;
        let mut opts = git2::WorktreeAddOptions::new();
        opts.reference(Some(&reference));
        repo.worktree(&name, &path, Some(&opts))
            .map_err(git(format!(
                "cannot add worktree {} on branch {branch}",
                path.display()
            )))?;
        tracing::info!(issue, path = %path.display(), resumed, "worktree ready");
        Ok(WorktreeInfo {
            path,
            branch,
            resumed,
        })
    }

    /// Commit uncommitted changes (including untracked files not ignored by
    /// `.gitignore`) in the issue's worktree as
    /// "chore: salvage uncommitted changes for issue #N"; `None` when clean or
    /// when the worktree does not exist. The author is the repository's
    /// configured user, else [`super::FALLBACK_SIGNATURE`].
    ///
    /// # Errors
    /// [`GitError`] naming what failed.
    pub async fn salvage(&self, issue: u64) -> Result<Option<String>, GitError> {
        let path = self.layout.worktree_path(issue);
        blocking(move || salvage_blocking(&path, issue)).await
    }

    /// Salvage, then remove the worktree directory and prune it; with
    /// `delete_branch`, delete `agent/issue-<N>` too. A missing worktree or
    /// branch is not an error.
    ///
    /// # Errors
    /// [`GitError`] naming what failed.
    pub async fn destroy(&self, issue: u64, delete_branch: bool) -> Result<(), GitError> {
        let lock = slug_lock(self.layout.slug.as_str());
        let _guard = lock.lock().await;
        let this = self.clone();
        blocking(move || this.destroy_blocking(issue, delete_branch)).await
    }

    fn destroy_blocking(&self, issue: u64, delete_branch: bool) -> Result<(), GitError> {
        let path = self.layout.worktree_path(issue);
        salvage_blocking(&path, issue)?;
        let repo = open_repo(&self.repo_path)?;
        if std::fs::symlink_metadata(&path).is_ok() {
            remove_inside(&self.layout.worktrees_dir(), &path)?;
        }
        prune_stale(&repo)?;
        if delete_branch {
            let branch = Layout::branch_name(issue);
            match repo.find_branch(&branch, BranchType::Local) {
                Ok(mut b) => b
                    .delete()
                    .map_err(git(format!("cannot delete branch {branch}")))?,
                Err(e) if e.code() == ErrorCode::NotFound => {}
                Err(e) => return Err(git(format!("cannot look up branch {branch}"))(e)),
            }
        }
        tracing::info!(issue, delete_branch, "worktree destroyed");
        Ok(())
    }

    /// Commits on `agent/issue-<N>` not on the base branch (0 when the branch is missing).
    ///
    /// # Errors
    /// [`GitError`] naming what failed.
    pub async fn commits_ahead(&self, issue: u64) -> Result<usize, GitError> {
        let (repo_path, base) = (self.repo_path.clone(), self.base_branch.clone());
        blocking(move || {
            let repo = open_repo(&repo_path)?;
            let branch = Layout::branch_name(issue);
            let Some(head) = branch_tip(&repo, &branch)? else {
                return Ok(0);
            };
            let base = base_tip(&repo, &base)?;
            let (ahead, _behind) = repo
                .graph_ahead_behind(head.id(), base.id())
                .map_err(git(format!("cannot compare {branch} with the base branch")))?;
            Ok(ahead)
        })
        .await
    }

    /// Unified diff of `agent/issue-<N>` against its merge base with the base branch.
    ///
    /// # Errors
    /// [`GitError`] naming what failed, including a missing branch.
    pub async fn diff_against_base(&self, issue: u64) -> Result<String, GitError> {
        let (repo_path, base) = (self.repo_path.clone(), self.base_branch.clone());
        blocking(move || {
            let repo = open_repo(&repo_path)?;
            let branch = Layout::branch_name(issue);
            let context = format!("cannot diff {branch} against {base}");
            let head = branch_tip(&repo, &branch)?.ok_or_else(|| GitError::Git {
                context: context.clone(),
                cause: git2::Error::from_str(&format!("branch {branch} does not exist")),
            })?;
            let base = base_tip(&repo, &base)?;
            let merge_base = repo
                .merge_base(head.id(), base.id())
                .map_err(git(&context))?;
            let old = repo
                .find_commit(merge_base)
                .and_then(|c| c.tree())
                .map_err(git(&context))?;
            let new = head.tree().map_err(git(&context))?;
            let diff = repo
                .diff_tree_to_tree(Some(&old), Some(&new), None)
                .map_err(git(&context))?;
            let mut out = String::new();
            diff.print(DiffFormat::Patch, |_, _, line| {
                if matches!(line.origin(), '+' | '-' | ' ') {
                    out.push(line.origin());
                }
                out.push_str(&String::from_utf8_lossy(line.content()));
                true
            })
            .map_err(git(&context))?;
            Ok(out)
        })
        .await
    }

    /// SHA of the tip of `branch` (a local branch name such as `main`).
    ///
    /// # Errors
    /// [`GitError`] naming what failed, including a missing branch.
    pub async fn branch_sha(&self, branch: &str) -> Result<String, GitError> {
        let repo_path = self.repo_path.clone();
        let branch = branch.to_owned();
        blocking(move || {
            let repo = open_repo(&repo_path)?;
            let tip = branch_tip(&repo, &branch)?.ok_or_else(|| GitError::Git {
                context: format!("cannot read the tip of branch {branch}"),
                cause: git2::Error::from_str(&format!("branch {branch} does not exist")),
            })?;
            Ok(tip.id().to_string())
        })
        .await
    }

    /// Remove worktrees under `<worktree_base>/<slug>/` whose issue `is_done`
    /// says is finished (salvaging first; the branch is kept), and `issue-*`
    /// directories git does not know; never anything outside that directory
    /// (symlinks are skipped, every removal is checked against the
    /// canonical directory). Returns what was removed.
    ///
    /// # Errors
    /// [`GitError`] naming what failed.
    pub async fn gc(&self, is_done: impl Fn(u64) -> bool + Send) -> Result<Vec<PathBuf>, GitError> {
        let lock = slug_lock(self.layout.slug.as_str());
        let _guard = lock.lock().await;
        let this = self.clone();
        let candidates = blocking(move || this.gc_candidates()).await?;
        let doomed: Vec<(u64, PathBuf, bool)> = candidates
            .into_iter()
            .filter(|(issue, _, known)| !known || is_done(*issue))
            .collect();
        let this = self.clone();
        blocking(move || {
            let root = this.layout.worktrees_dir();
            let mut removed = Vec::new();
            for (issue, path, known) in doomed {
                if known {
                    salvage_blocking(&path, issue)?;
                }
                remove_inside(&root, &path)?;
                removed.push(path);
            }
            let repo = open_repo(&this.repo_path)?;
            prune_stale(&repo)?;
            Ok(removed)
        })
        .await
    }

    /// Issue numbers that have an `issue-<N>` directory under this
    /// repository's worktree directory or a local `agent/issue-<N>` branch,
    /// ascending: what garbage collection looks at.
    ///
    /// # Errors
    /// [`GitError`] naming what failed.
    pub async fn leftovers(&self) -> Result<Vec<u64>, GitError> {
        let this = self.clone();
        blocking(move || {
            let mut out: Vec<u64> = this
                .gc_candidates()?
                .into_iter()
                .map(|(n, _, _)| n)
                .collect();
            let repo = open_repo(&this.repo_path)?;
            out.extend(agent_branches(&repo)?.into_iter().map(|(n, _)| n));
            out.sort_unstable();
            out.dedup();
            Ok(out)
        })
        .await
    }

    /// Delete the local `agent/issue-<N>` branches whose issue `is_done`
    /// says is finished, unless a worktree (or the main checkout) has one
    /// checked out. Returns the branches deleted.
    ///
    /// # Errors
    /// [`GitError`] naming what failed.
    pub async fn gc_branches(
        &self,
        is_done: impl Fn(u64) -> bool + Send + 'static,
    ) -> Result<Vec<String>, GitError> {
        let lock = slug_lock(self.layout.slug.as_str());
        let _guard = lock.lock().await;
        let repo_path = self.repo_path.clone();
        blocking(move || {
            let repo = open_repo(&repo_path)?;
            let mut deleted = Vec::new();
            for (issue, name) in agent_branches(&repo)? {
                if !is_done(issue) || super::checked_out(&repo, &format!("refs/heads/{name}")) {
                    continue;
                }
                if let Ok(mut branch) = repo.find_branch(&name, BranchType::Local) {
                    branch
                        .delete()
                        .map_err(git(format!("cannot delete branch {name}")))?;
                    tracing::info!(issue, branch = %name, "deleted the branch of a finished issue");
                    deleted.push(name);
                }
            }
            Ok(deleted)
        })
        .await
    }

    /// `(issue, path, registered as a worktree)` for every `issue-<N>`
    /// directory in this repository's worktree directory.
    fn gc_candidates(&self) -> Result<Vec<(u64, PathBuf, bool)>, GitError> {
        let root = self.layout.worktrees_dir();
        let entries = match std::fs::read_dir(&root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(format!("cannot read {}", root.display()))(e)),
        };
        let canonical_root = root
            .canonicalize()
            .map_err(io(format!("cannot resolve {}", root.display())))?;
        let repo = open_repo(&self.repo_path)?;
        prune_stale(&repo)?;
        let known = registered(&repo)?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io(format!("cannot read {}", root.display())))?;
            let file_name = entry.file_name();
            let Some(issue) = file_name
                .to_str()
                .and_then(|n| n.strip_prefix("issue-"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let path = entry.path();
            let file_type = entry
                .file_type()
                .map_err(io(format!("cannot inspect {}", path.display())))?;
            if !file_type.is_dir() {
                tracing::warn!(path = %path.display(), "gc skips what is not a plain directory");
                continue;
            }
            let Ok(canonical) = path.canonicalize() else {
                continue;
            };
            if !canonical.starts_with(&canonical_root) {
                continue;
            }
            out.push((issue, path, known.contains_key(&canonical)));
        }
        out.sort();
        Ok(out)
    }
}
