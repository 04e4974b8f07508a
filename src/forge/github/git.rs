//! The git side of the GitHub forge: clones, fetches of the base branch and
//! branch pushes with git2 over git's smart HTTP protocol
//! ([`crate::forge::git_http`]: ureq and rustls, no OpenSSL). The token is
//! never put in a URL, a git config or a log: git's HTTP requests carry it
//! through `git_http`, only to the web URL's host (as `x-access-token`, the
//! user name GitHub expects with an installation or personal token).

use std::path::Path;
use std::sync::Arc;

use super::{GithubForge, REFRESH_BEFORE};
use crate::forge::{ForgeError, ForgeResult, git_http};

impl GithubForge {
    /// Run the blocking git operation `op(web_url, token)` on tokio's
    /// blocking pool with a token valid for at least [`REFRESH_BEFORE`];
    /// when GitHub refuses an App's installation token (revoked), once more
    /// with a new one. `what` names the operation for a failed task.
    pub(super) async fn run_git<T: Send + 'static>(
        &self,
        what: &'static str,
        op: impl Fn(&str, &str) -> ForgeResult<T> + Send + Sync + 'static,
    ) -> ForgeResult<T> {
        let op = Arc::new(op);
        let once = |token: String| {
            let (op, web_url) = (Arc::clone(&op), self.opts.web_url.clone());
            async move {
                tokio::task::spawn_blocking(move || op(&web_url, &token))
                    .await
                    .map_err(|e| ForgeError::Local(format!("{what} task failed: {e}")))?
            }
        };
        let token = self.rest.auth.token(REFRESH_BEFORE).await?;
        match once(token.clone()).await {
            Err(ForgeError::Auth(_)) if self.rest.auth.refused(&token) => {
                once(self.rest.auth.token(REFRESH_BEFORE).await?).await
            }
            done => done,
        }
    }

    /// Map a git2 failure of a network operation to a [`ForgeError`]: a refused
    /// token is [`ForgeError::Auth`], other network failures are transient,
    /// the rest local.
    fn git_error(e: &git2::Error, msg: String) -> ForgeError {
        match e.class() {
            _ if e.code() == git2::ErrorCode::Auth => ForgeError::Auth(msg),
            git2::ErrorClass::Http | git2::ErrorClass::Net | git2::ErrorClass::Ssl => {
                ForgeError::Transient(msg)
            }
            _ => ForgeError::Local(msg),
        }
    }

    /// Run a git2 network operation on this thread with the token sent to
    /// `web_url`'s host ([`git_http::with_token`]); its failure becomes
    /// [`ForgeError::Auth`] when the server refused the token, else as
    /// [`Self::git_error`] says, with the message `msg` makes.
    pub(super) fn with_token<T>(
        web_url: &str,
        token: &str,
        op: impl FnOnce() -> Result<T, git2::Error>,
        msg: impl FnOnce(&git2::Error) -> String,
    ) -> ForgeResult<T> {
        let done = git_http::with_token(web_url, token, op)
            .map_err(|e| ForgeError::Local(e.to_string()))?;
        done.value.map_err(|e| {
            let msg = msg(&e);
            if done.token_refused {
                ForgeError::Auth(msg)
            } else {
                GithubForge::git_error(&e, msg)
            }
        })
    }

    /// Clone the repository into `dest` (which must not exist) over HTTPS,
    /// the token sent by [`git_http`] only: the clone's
    /// `origin` is [`Self::clone_url`], without credentials. The clone is
    /// made in a temporary directory next to `dest` and renamed into place,
    /// so a failed clone leaves nothing behind. When the remote's default
    /// branch is not `base`, a local `base` is created from `origin/base`.
    ///
    /// # Errors
    /// [`ForgeError::Auth`] when the token is refused, [`ForgeError::Transient`]
    /// for network failures, [`ForgeError::Local`] for disk failures, an
    /// existing `dest` or a missing `base` branch.
    pub async fn clone_into(&self, dest: &Path, base: &str) -> ForgeResult<()> {
        let dest = dest.to_path_buf();
        let base = base.to_string();
        let url = self.clone_url();
        self.run_git("clone", move |web_url, token| {
            GithubForge::clone_blocking(&url, web_url, token, &dest, &base)
        })
        .await
    }

    fn clone_blocking(
        url: &str,
        web_url: &str,
        token: &str,
        dest: &Path,
        base: &str,
    ) -> ForgeResult<()> {
        let local =
            |what: String| move |e: std::io::Error| ForgeError::Local(format!("{what}: {e}"));
        if dest.exists() {
            return Err(ForgeError::Local(format!(
                "cannot clone into {}: it already exists",
                dest.display()
            )));
        }
        let parent = dest.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)
            .map_err(local(format!("cannot create {}", parent.display())))?;
        let tmp = crate::store::atomic::staging_dir(parent, "clone-").map_err(local(format!(
            "cannot make a temporary directory in {}",
            parent.display()
        )))?;
        let staging = tmp.path().join("checkout");
        let repo = GithubForge::with_token(
            web_url,
            token,
            || git2::build::RepoBuilder::new().clone(url, &staging),
            |e| format!("cannot clone {url}: {}", e.message()),
        )?;
        if repo.find_branch(base, git2::BranchType::Local).is_err() {
            let remote = repo
                .find_reference(&format!("refs/remotes/origin/{base}"))
                .and_then(|r| r.peel_to_commit())
                .map_err(|e| {
                    ForgeError::Local(format!(
                        "the clone of {url} has no branch {base:?} (main_branch): {}",
                        e.message()
                    ))
                })?;
            repo.branch(base, &remote, false).map_err(|e| {
                ForgeError::Local(format!("cannot create branch {base}: {}", e.message()))
            })?;
        }
        drop(repo);
        std::fs::rename(&staging, dest).map_err(local(format!(
            "cannot move the clone to {}",
            dest.display()
        )))?;
        tracing::info!(url, dest = %dest.display(), "cloned the repository");
        Ok(())
    }

    pub(super) fn refresh_blocking(
        repo_path: &Path,
        base: &str,
        url: &str,
        web_url: &str,
        token: &str,
    ) -> ForgeResult<()> {
        let ctx = |what: &str| {
            let what = format!("{what} in {}", repo_path.display());
            move |e: git2::Error| ForgeError::Local(format!("{what}: {}", e.message()))
        };
        let repo = git2::Repository::open(repo_path).map_err(ctx("cannot open the checkout"))?;
        // An anonymous remote lives only in memory: nothing reaches .git/config.
        let mut remote = repo
            .remote_anonymous(url)
            .map_err(ctx("cannot set up the remote"))?;
        let tracking = format!("refs/remotes/origin/{base}");
        let refspec = format!("+refs/heads/{base}:{tracking}");
        GithubForge::with_token(
            web_url,
            token,
            || remote.fetch(&[refspec.as_str()], None, None),
            |e| format!("cannot fetch {base} from {url}: {}", e.message()),
        )?;
        drop(remote);
        let fetched = repo
            .find_reference(&tracking)
            .and_then(|r| r.peel_to_commit())
            .map_err(ctx(&format!("cannot read {tracking}")))?;
        let local_ref = format!("refs/heads/{base}");
        let mut local = repo
            .find_reference(&local_ref)
            .map_err(ctx(&format!("cannot read {local_ref}")))?;
        let local_id = local
            .peel_to_commit()
            .map_err(ctx(&format!("cannot read {local_ref}")))?
            .id();
        if local_id == fetched.id()
            || repo
                .graph_descendant_of(local_id, fetched.id())
                .unwrap_or(false)
        {
            return Ok(());
        }
        if !repo
            .graph_descendant_of(fetched.id(), local_id)
            .unwrap_or(false)
        {
            tracing::warn!(
                base,
                checkout = %repo_path.display(),
                "the checkout's base branch has diverged from the forge's; worktrees start from the local one"
            );
            return Ok(());
        }
        let head_is_base = repo
            .head()
            .ok()
            .and_then(|h| h.name().ok().map(str::to_string))
            .is_some_and(|h| h == local_ref);
        if head_is_base && !repo.is_bare() {
            // Update the working tree too, refusing to overwrite local changes.
            let mut checkout = git2::build::CheckoutBuilder::new();
            checkout.safe();
            if let Err(e) = repo.checkout_tree(fetched.as_object(), Some(&mut checkout)) {
                tracing::warn!(
                    base,
                    checkout = %repo_path.display(),
                    error = e.message(),
                    "cannot fast-forward the checkout (local changes?); worktrees start from the local base"
                );
                return Ok(());
            }
        }
        local
            .set_target(fetched.id(), &format!("hydraflow: fast-forward {base}"))
            .map_err(ctx(&format!("cannot fast-forward {local_ref}")))?;
        tracing::info!(base, sha = %fetched.id(), "fast-forwarded the base branch");
        Ok(())
    }

    /// Push `branch` to `url`; run inside [`Self::with_token`].
    pub(super) fn push_blocking(repo: &Path, branch: &str, url: &str) -> Result<(), git2::Error> {
        let repository = git2::Repository::open(repo)?;
        // An anonymous remote lives only in memory: nothing reaches .git/config.
        let mut remote = repository.remote_anonymous(url)?;
        let rejected: std::cell::RefCell<Option<String>> = std::cell::RefCell::new(None);
        let mut callbacks = git2::RemoteCallbacks::new();
        callbacks.push_update_reference(|name, status| {
            if let Some(s) = status {
                *rejected.borrow_mut() = Some(format!("{name}: {s}"));
            }
            Ok(())
        });
        let mut push = git2::PushOptions::new();
        push.remote_callbacks(callbacks);
        let refspec = format!("+refs/heads/{branch}:refs/heads/{branch}");
        remote.push(&[refspec.as_str()], Some(&mut push))?;
        drop(push);
        if let Some(reason) = rejected.into_inner() {
            return Err(git2::Error::from_str(&format!("push rejected: {reason}")));
        }
        Ok(())
    }
}
