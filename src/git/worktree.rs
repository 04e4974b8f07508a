//! Per-issue worktrees at `<worktree_base>/<slug>/issue-<N>` on branch
//! `agent/issue-<N>` (ADR-0010, spec §5). Create and destroy are serialised
//! per repository slug.

use std::path::{Path, PathBuf};

use super::GitError;
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
        let _ = (repo_path, layout, base_branch);
        todo!("git helper implements this")
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
    /// existing branch keeps its commits; an existing directory is reused.
    ///
    /// # Errors
    /// [`GitError`] naming what failed.
    pub async fn create_or_resume(&self, issue: u64) -> Result<WorktreeInfo, GitError> {
        let _ = issue;
        todo!("git helper implements this")
    }

    /// Commit uncommitted changes in the issue's worktree as
    /// "chore: salvage uncommitted changes for issue #N"; `None` when clean.
    ///
    /// # Errors
    /// [`GitError`] naming what failed.
    pub async fn salvage(&self, issue: u64) -> Result<Option<String>, GitError> {
        let _ = issue;
        todo!("git helper implements this")
    }

    /// Salvage, then remove the worktree directory and prune it; with
    /// `delete_branch`, delete `agent/issue-<N>` too.
    ///
    /// # Errors
    /// [`GitError`] naming what failed.
    pub async fn destroy(&self, issue: u64, delete_branch: bool) -> Result<(), GitError> {
        let _ = (issue, delete_branch);
        todo!("git helper implements this")
    }

    /// Commits on `agent/issue-<N>` not on the base branch (0 when the branch is missing).
    ///
    /// # Errors
    /// [`GitError`] naming what failed.
    pub async fn commits_ahead(&self, issue: u64) -> Result<usize, GitError> {
        let _ = issue;
        todo!("git helper implements this")
    }

    /// Unified diff of `agent/issue-<N>` against its merge base with the base branch.
    ///
    /// # Errors
    /// [`GitError`] naming what failed.
    pub async fn diff_against_base(&self, issue: u64) -> Result<String, GitError> {
        let _ = issue;
        todo!("git helper implements this")
    }

    /// SHA of the tip of `branch`.
    ///
    /// # Errors
    /// [`GitError`] naming what failed.
    pub async fn branch_sha(&self, branch: &str) -> Result<String, GitError> {
        let _ = branch;
        todo!("git helper implements this")
    }

    /// Remove worktrees under `<worktree_base>/<slug>/` whose issue `is_done`
    /// says is finished, and `issue-*` directories git does not know; never
    /// anything outside that directory. Returns what was removed.
    ///
    /// # Errors
    /// [`GitError`] naming what failed.
    pub async fn gc(&self, is_done: impl Fn(u64) -> bool + Send) -> Result<Vec<PathBuf>, GitError> {
        let _ = is_done;
        todo!("git helper implements this")
    }
}
