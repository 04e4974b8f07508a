//! Git through git2: per-issue worktrees (create, resume, salvage, destroy,
//! GC), the read-only queries the pipeline needs (commits ahead of the
//! base branch, the diff for review, head SHAs) and bringing the main
//! checkout along after a merge moved its branch (`checkout`).
//!
//! **Invariant:** only `git` and `forge::local` (merging) open repositories
//! with git2; nothing shells out to `git`.

pub mod checkout;
pub mod index_lock;
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
    #[error("base branch {branch:?} does not exist in the repository{hint}")]
    NoBaseBranch {
        /// The branch configured as `main_branch`.
        branch: String,
        /// What to do, beginning with `: ` (see [`base_branch_hint`]), or empty.
        hint: String,
    },
    /// A path outside the allowed roots was about to be removed.
    #[error("refusing to touch {0}: it is outside the worktree directory")]
    OutsideRoots(std::path::PathBuf),
    /// Another process holds the checkout's index lock (git's lock protocol:
    /// [`index_lock`]).
    #[error(
        "{path} exists: another git process is using the checkout's index; if none is \
         running, remove that file"
    )]
    IndexLocked {
        /// `<git dir>/index.lock`.
        path: std::path::PathBuf,
    },
    /// Any other git2 failure, with what was being done.
    #[error("{context}: {cause}")]
    Git {
        /// What was being done.
        context: String,
        /// git2's error.
        cause: git2::Error,
    },
    /// File system failure.
    #[error("{context}: {cause}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        cause: std::io::Error,
    },
}

/// A [`GitError::Git`] maker that says what was being done.
pub(crate) fn git(context: impl Into<String>) -> impl FnOnce(git2::Error) -> GitError {
    let context = context.into();
    move |source| GitError::Git {
        context,
        cause: source,
    }
}

/// A [`GitError::Io`] maker that says what was being done.
pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> GitError {
    let context = context.into();
    move |source| GitError::Io {
        context,
        cause: source,
    }
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

/// What to do when the base branch `missing` is not in `repo`, as `: …` to append to the
/// error: set `main_branch` to the branch the checkout is on (a repository made with an older
/// git's default `master`), or make a first commit in an empty repository.
pub fn base_branch_hint(repo: &git2::Repository, missing: &str) -> String {
    let head = repo.find_reference("HEAD").ok();
    let on = head
        .as_ref()
        .and_then(|h| h.symbolic_target().ok().flatten())
        .and_then(|t| t.strip_prefix("refs/heads/"))
        .map(str::to_owned);
    let has_branches = repo
        .branches(Some(git2::BranchType::Local))
        .map(|mut b| b.next().is_some())
        .unwrap_or(false);
    match on {
        _ if !has_branches => ": the repository has no commits yet: make one first \
             (git commit --allow-empty -m 'Initial commit')"
            .to_owned(),
        Some(branch) if branch != missing => format!(
            ": the checkout is on {branch:?}: set main_branch = {branch:?} in the \
             configuration (or HYDRAFLOW_MAIN_BRANCH={branch})"
        ),
        _ => ": set main_branch in the configuration to the branch pull requests go to".to_owned(),
    }
}

/// Check that `path` is the top directory of a git checkout (or a bare repository), as the
/// local forge needs before an issue is filed for it. One owned by another user counts.
///
/// # Errors
/// [`GitError::NotARepository`] saying what to give instead: the checkout's top directory
/// when `path` is inside one, else a checkout or a supervised instance.
pub fn check_checkout(path: &std::path::Path) -> Result<(), GitError> {
    match git2::Repository::open(path) {
        Ok(_) => return Ok(()),
        // A repository another user owns (root filing an issue for an instance's checkout,
        // which belongs to the instance's user): it is one, which is all this checks.
        Err(e) if e.code() == git2::ErrorCode::Owner => return Ok(()),
        Err(_) => {}
    }
    let message = match git2::Repository::discover(path)
        .ok()
        .and_then(|r| r.workdir().map(std::path::Path::to_path_buf))
    {
        Some(top) => format!(
            "it is inside the checkout {}: run the command there or give --repo {}",
            top.display(),
            top.display()
        ),
        None => "give --repo PATH of a git checkout, or --instance SLUG of a supervised \
                 repository (or run git init there first)"
            .to_owned(),
    };
    Err(GitError::NotARepository {
        path: path.to_path_buf(),
        message,
    })
}

/// Keep `inner`, a directory inside the checkout at `repo_path` (the data root
/// `<checkout>/.hydraflow`), out of `git status`: add `/<relative path>/` to the repository's
/// own exclude file, `$GIT_DIR/info/exclude` (gitignore(5)), unless a line says so already.
/// The user's `.gitignore` is never touched. Nothing happens when `inner` is not inside the
/// checkout or `repo_path` is not a repository.
///
/// # Errors
/// [`GitError::Io`] when the exclude file cannot be read or written.
pub fn exclude_from_status(
    repo_path: &std::path::Path,
    inner: &std::path::Path,
) -> Result<(), GitError> {
    let Ok(repo) = git2::Repository::open(repo_path) else {
        return Ok(());
    };
    let Some(workdir) = repo.workdir() else {
        return Ok(());
    };
    let canonical =
        |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let Ok(relative) = canonical(inner)
        .strip_prefix(canonical(workdir))
        .map(std::path::Path::to_path_buf)
    else {
        return Ok(());
    };
    if relative.as_os_str().is_empty() {
        return Ok(());
    }
    let pattern = format!("/{}/", relative.to_string_lossy().replace('\\', "/"));
    let file = repo.path().join("info").join("exclude");
    let io = |what: &str| {
        let context = format!("cannot {what} {}", file.display());
        move |source| GitError::Io {
            context,
            cause: source,
        }
    };
    let text = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io("read")(e)),
    };
    let bare = pattern.trim_matches('/');
    if text
        .lines()
        .map(|l| l.trim().trim_matches('/'))
        .any(|l| l == bare)
    {
        return Ok(());
    }
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(io("create the directory of"))?;
    }
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)
        .map_err(io("open"))?;
    let separator = if text.is_empty() || text.ends_with('\n') {
        ""
    } else {
        "\n"
    };
    std::io::Write::write_all(
        &mut out,
        format!("{separator}# HydraFlow's data (hydraflow run, hydraflow issue)\n{pattern}\n")
            .as_bytes(),
    )
    .map_err(io("write"))
}
