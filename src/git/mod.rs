//! Git through git2: per-issue worktrees (create, resume, salvage, destroy,
//! GC), the read-only queries the pipeline needs (commits ahead of the
//! base branch, the diff for review, head SHAs) and bringing the main
//! checkout along after a merge moved its branch (`checkout`).
//!
//! **Invariant:** only `git` and `forge::local` (merging) open repositories
//! with git2; nothing shells out to `git`.

pub mod checkout;
pub mod worktree;

pub use worktree::{WorktreeInfo, Worktrees};

/// Why a git operation failed.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// The path is not a git repository.
    #[error("{path} is not a git repository: {message}")]
    NotARepository {
        /// The path given.
        path: std::path::PathBuf,
        /// git2's message.
        message: String,
    },
    /// The base branch does not exist.
    #[error("base branch {0:?} does not exist in the repository")]
    NoBaseBranch(String),
    /// A path outside the allowed roots was about to be removed.
    #[error("refusing to touch {0}: it is outside the worktree directory")]
    OutsideRoots(std::path::PathBuf),
    /// Any other git2 failure, with what was being done.
    #[error("{context}: {source}")]
    Git {
        /// What was being done.
        context: String,
        /// git2's error.
        source: git2::Error,
    },
    /// File system failure.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A [`GitError::Git`] maker that says what was being done.
pub(crate) fn git(context: impl Into<String>) -> impl FnOnce(git2::Error) -> GitError {
    let context = context.into();
    move |source| GitError::Git { context, source }
}

/// A [`GitError::Io`] maker that says what was being done.
pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> GitError {
    let context = context.into();
    move |source| GitError::Io { context, source }
}

/// Whether `refname` (`refs/heads/…`) is checked out in the main checkout
/// of `repo` or in any of its valid worktrees (when in doubt, yes).
pub fn checked_out(repo: &git2::Repository, refname: &str) -> bool {
    let head_is = |r: &git2::Repository| {
        r.find_reference("HEAD")
            .ok()
            .and_then(|h| h.symbolic_target().ok().flatten().map(|t| t == refname))
            .unwrap_or(false)
    };
    if head_is(repo) {
        return true;
    }
    let Ok(names) = repo.worktrees() else {
        return true;
    };
    names.iter().filter_map(|n| n.ok().flatten()).any(|name| {
        repo.find_worktree(name)
            .ok()
            .filter(|wt| wt.validate().is_ok())
            .and_then(|wt| git2::Repository::open_from_worktree(&wt).ok())
            .is_some_and(|r| head_is(&r))
    })
}

/// Name and e-mail used for commits when the repository configuration has no
/// `user.name`/`user.email`.
pub const FALLBACK_SIGNATURE: (&str, &str) = ("HydraFlow", "hydraflow@localhost");

/// The author/committer for commits HydraFlow makes in `repo`: the
/// repository's (or the user's global) `user.name` and `user.email`, else
/// [`FALLBACK_SIGNATURE`], timestamped now.
///
/// # Errors
/// git2's error when even the fallback signature cannot be made.
pub fn signature(repo: &git2::Repository) -> Result<git2::Signature<'static>, git2::Error> {
    repo.signature()
        .or_else(|_| git2::Signature::now(FALLBACK_SIGNATURE.0, FALLBACK_SIGNATURE.1))
}
