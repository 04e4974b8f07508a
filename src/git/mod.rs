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

/// Make a git repository at `path` (created if missing) whose branch
/// `branch` holds one commit of every file already in `path`, by `author`
/// (name, e-mail) with `message`.
///
/// # Errors
/// [`GitError`] naming what failed.
pub fn init_with_files(
    path: &std::path::Path,
    branch: &str,
    author: (&str, &str),
    message: &str,
) -> Result<(), GitError> {
    let context = format!("cannot create a git repository in {}", path.display());
    std::fs::create_dir_all(path).map_err(io(&context))?;
    let mut opts = git2::RepositoryInitOptions::new();
    opts.initial_head(branch);
    let repo = git2::Repository::init_opts(path, &opts).map_err(git(&context))?;
    let mut index = repo.index().map_err(git(&context))?;
    index
        .add_all(["*"], git2::IndexAddOption::DEFAULT, None)
        .map_err(git(&context))?;
    index.write().map_err(git(&context))?;
    let tree = index
        .write_tree()
        .and_then(|id| repo.find_tree(id))
        .map_err(git(&context))?;
    let sig = git2::Signature::now(author.0, author.1).map_err(git(&context))?;
    repo.commit(Some("HEAD"), &sig, &sig, message, &tree, &[])
        .map_err(git(&context))?;
    Ok(())
}

/// The newest `limit` commits of `branch` in the repository at `path`, as
/// (abbreviated SHA, subject), newest first.
///
/// # Errors
/// [`GitError`] naming what failed, including a missing branch.
pub fn log(
    path: &std::path::Path,
    branch: &str,
    limit: usize,
) -> Result<Vec<(String, String)>, GitError> {
    let context = format!("cannot read the history of {branch} in {}", path.display());
    let repo = git2::Repository::open(path).map_err(git(&context))?;
    let mut walk = repo.revwalk().map_err(git(&context))?;
    walk.push(
        repo.refname_to_id(&format!("refs/heads/{branch}"))
            .map_err(git(&context))?,
    )
    .map_err(git(&context))?;
    let mut out = Vec::new();
    for oid in walk.take(limit) {
        let commit = oid
            .and_then(|oid| repo.find_commit(oid))
            .map_err(git(&context))?;
        let sha = commit.id().to_string();
        let subject = commit.summary().ok().flatten().unwrap_or("").to_owned();
        out.push((sha[..10].to_owned(), subject));
    }
    Ok(out)
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
