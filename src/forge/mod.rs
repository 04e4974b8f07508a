//! The forge: where issues, labels, comments, pull requests, checks, reviews
//! and merges live. [`Forge`] is shaped after the GitHub REST API operations
//! the pipeline needs (docs/design/forge.md); `local` implements it on disk with a real
//! git squash merge, and `github` implements it over GitHub's REST API with octocrab.
//!
//! **Invariant:** the pipeline reaches a forge only through this trait.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub mod git_http;
pub mod github;
pub mod local;

/// An issue as listed by the forge: enough to route it to a stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issue {
    /// Issue number.
    pub number: u64,
    /// Title.
    pub title: String,
    /// Body (Markdown); empty when none.
    pub body: String,
    /// Label names.
    pub labels: Vec<String>,
    /// Login of the author.
    pub author: String,
    /// `open` or `closed`.
    pub state: IssueState,
    /// Web URL, when the forge has one.
    pub url: Option<String>,
}

/// Whether an issue is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IssueState {
    /// Open.
    Open,
    /// Closed.
    Closed,
}

/// A comment on an issue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Comment {
    /// Author login.
    pub author: String,
    /// Body (Markdown).
    pub body: String,
    /// When it was posted (RFC 3339).
    pub created_at: String,
}

/// An issue with its comments, as `get_issue` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssueDetail {
    /// The issue.
    pub issue: Issue,
    /// Its comments, oldest first.
    pub comments: Vec<Comment>,
}

/// A label to create when missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSpec {
    /// Name.
    pub name: String,
    /// Colour, six hex digits without `#`.
    pub color: String,
    /// Description.
    pub description: String,
}

/// What `find_or_create_pull_request` needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPullRequest {
    /// Head branch (`agent/issue-<N>`).
    pub head: String,
    /// Base branch.
    pub base: String,
    /// Title: `Fixes #N: <issue title>`.
    pub title: String,
    /// Body; contains `Closes #N`.
    pub body: String,
}

/// State of a pull request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PullRequestState {
    /// Open.
    Open,
    /// Closed without merging.
    Closed,
    /// Merged.
    Merged,
}

/// A pull request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequest {
    /// Pull request number.
    pub number: u64,
    /// Head branch.
    pub head: String,
    /// SHA of the head commit.
    pub head_sha: String,
    /// Base branch.
    pub base: String,
    /// Title.
    pub title: String,
    /// Body.
    pub body: String,
    /// Open, closed or merged.
    pub state: PullRequestState,
    /// `Some(true)`/`Some(false)` once the forge knows; `None` while it is still
    /// computing (GitHub answers `mergeable: null` at first: poll).
    pub mergeable: Option<bool>,
    /// Web URL, when the forge has one.
    pub url: Option<String>,
}

/// The combined verdict of a commit's check runs and statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChecksState {
    /// No checks are configured: counts as a pass.
    None,
    /// Some checks have not finished.
    Pending,
    /// Every check passed.
    Success,
    /// At least one check failed.
    Failure,
}

/// Check runs and commit statuses of a head SHA, summarised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChecksSummary {
    /// The combined state.
    pub state: ChecksState,
    /// Names of failed checks with their summaries, for a CI-fix prompt.
    pub failures: Vec<String>,
}

/// One check run as [`summarise_checks`] reads it, in the vocabulary of
/// GitHub's check runs API (<https://docs.github.com/en/rest/checks/runs>).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckRunView<'a> {
    /// The check's name (`build`, `test`).
    pub name: &'a str,
    /// `queued`, `in_progress` or `completed` (GitHub Actions also reports
    /// `waiting`, `requested` and `pending`); anything but `completed` is
    /// still running.
    pub status: &'a str,
    /// Once completed: `success`, `failure`, `neutral`, `cancelled`,
    /// `skipped`, `timed_out`, `action_required` or `stale`. `success`,
    /// `neutral` and `skipped` pass; anything else, or none, fails.
    pub conclusion: Option<&'a str>,
    /// The summary of its output, shown with a failure.
    pub summary: Option<&'a str>,
}

/// One commit status as [`summarise_checks`] reads it
/// (<https://docs.github.com/en/rest/commits/statuses>).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitStatusView<'a> {
    /// Its context (the name of the status).
    pub context: &'a str,
    /// `success`, `pending`, `failure` or `error`; anything but `success`
    /// and `pending` fails.
    pub state: &'a str,
    /// Its description, shown with a failure.
    pub description: Option<&'a str>,
}

/// The combined verdict of a commit's check runs and commit statuses, as
/// every forge reports it: `None` when there are neither, else `Failure`
/// when any failed (each listed as `name (conclusion): summary`), else
/// `Pending` when any is still running, else `Success`.
pub fn summarise_checks(
    runs: &[CheckRunView<'_>],
    statuses: &[CommitStatusView<'_>],
) -> ChecksSummary {
    let mut failures = Vec::new();
    let mut pending = false;
    for run in runs {
        if run.status != "completed" {
            pending = true;
            continue;
        }
        match run.conclusion {
            Some("success" | "neutral" | "skipped") => {}
            other => failures.push(format!(
                "{} ({}): {}",
                run.name,
                other.unwrap_or("no conclusion"),
                run.summary.unwrap_or_default()
            )),
        }
    }
    for s in statuses {
        match s.state {
            "success" => {}
            "pending" => pending = true,
            other => failures.push(format!(
                "{} ({other}): {}",
                s.context,
                s.description.unwrap_or_default()
            )),
        }
    }
    let state = if runs.is_empty() && statuses.is_empty() {
        ChecksState::None
    } else if !failures.is_empty() {
        ChecksState::Failure
    } else if pending {
        ChecksState::Pending
    } else {
        ChecksState::Success
    };
    ChecksSummary { state, failures }
}

/// A review verdict (GitHub's review events).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReviewEvent {
    /// `APPROVE`.
    Approve,
    /// `REQUEST_CHANGES`.
    RequestChanges,
    /// `COMMENT`.
    Comment,
}

/// A review posted on a pull request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Review {
    /// The verdict.
    pub event: ReviewEvent,
    /// Its text.
    pub body: String,
}

/// What a successful merge produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeOutcome {
    /// SHA of the squash commit on the base branch.
    pub sha: String,
}

/// Remaining API budget, for `STATUS=` and events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateBudget {
    /// Requests left in the window.
    pub remaining: u64,
    /// Window size.
    pub limit: u64,
    /// When the window resets (Unix seconds).
    pub reset_at: u64,
}

/// Why a forge operation failed; the variant decides what the pipeline does.
#[derive(Debug, thiserror::Error)]
pub enum ForgeError {
    /// Bad or missing credentials (401, 403 "Bad credentials"): pause the pipeline.
    #[error("forge authentication failed: {0}")]
    Auth(String),
    /// Rate limited: wait `retry_after` then try again.
    #[error("forge rate limit reached: retry after {retry_after:?}")]
    RateLimited {
        /// How long to wait.
        retry_after: Duration,
    },
    /// The issue, pull request or branch does not exist (any more).
    #[error("not found: {0}")]
    NotFound(String),
    /// The merge cannot happen: conflicts with the base branch.
    #[error("merge conflict: {0}")]
    MergeConflict(String),
    /// The forge refused the request as invalid (422 and the like).
    #[error("forge rejected the request: {0}")]
    Rejected(String),
    /// A passing failure (5xx, network, malformed body): retry later.
    #[error("forge temporarily failed: {0}")]
    Transient(String),
    /// A local failure (disk, git).
    #[error("{0}")]
    Local(String),
}

impl ForgeError {
    /// Whether retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ForgeError::Transient(_) | ForgeError::RateLimited { .. }
        )
    }
}

/// Result of a forge call.
pub type ForgeResult<T> = Result<T, ForgeError>;

/// The operations the pipeline needs from a forge (docs/design/forge.md). Issue and pull
/// request numbers are the forge's own; label names are exact.
#[async_trait]
pub trait Forge: Send + Sync {
    /// Short name for logs (`local`, `github`).
    fn name(&self) -> &'static str;

    /// Open issues (never pull requests) carrying any of `labels`, all pages.
    async fn list_issues(&self, labels: &[String]) -> ForgeResult<Vec<Issue>>;

    /// One issue with its labels and comments.
    async fn get_issue(&self, number: u64) -> ForgeResult<IssueDetail>;

    /// Add `label` to the issue (adding a present label is success).
    async fn add_label(&self, number: u64, label: &str) -> ForgeResult<()>;

    /// Remove `label` from the issue; an absent label is success.
    async fn remove_label(&self, number: u64, label: &str) -> ForgeResult<()>;

    /// Create the labels that do not exist yet.
    async fn ensure_labels(&self, labels: &[LabelSpec]) -> ForgeResult<()>;

    /// Post a comment; bodies over the forge's limit are split into several comments.
    async fn comment(&self, number: u64, body: &str) -> ForgeResult<()>;

    /// Close the issue.
    async fn close_issue(&self, number: u64) -> ForgeResult<()>;

    /// Publish `branch` from the repository at `repo` (a checkout or worktree)
    /// to the forge; a no-op where the forge shares the repository.
    async fn push_branch(&self, repo: &Path, branch: &str) -> ForgeResult<()>;

    /// The open pull request whose head is `req.head`, else a new one.
    async fn find_or_create_pull_request(&self, req: &NewPullRequest) -> ForgeResult<PullRequest>;

    /// A pull request with its current mergeability.
    async fn get_pull_request(&self, number: u64) -> ForgeResult<PullRequest>;

    /// Check runs and combined status of `sha`.
    async fn checks(&self, sha: &str) -> ForgeResult<ChecksSummary>;

    /// Post a review on the pull request.
    async fn post_review(&self, number: u64, event: ReviewEvent, body: &str) -> ForgeResult<()>;

    /// The reviews posted on the pull request, oldest first (GitHub: "List
    /// reviews for a pull request", first 100).
    async fn list_reviews(&self, number: u64) -> ForgeResult<Vec<Review>>;

    /// Squash-merge the pull request with `title` as the commit subject and
    /// delete its head branch.
    async fn merge_pull_request(&self, number: u64, title: &str) -> ForgeResult<MergeOutcome>;

    /// Bring the base branch of the checkout at `repo` up to the forge's
    /// (fetch it and fast-forward the local branch), so a worktree created
    /// next starts from what was merged on the server. A no-op where the forge
    /// shares the repository (the local forge merges into it directly).
    async fn refresh_base(&self, repo: &Path, base: &str) -> ForgeResult<()> {
        let _ = (repo, base);
        Ok(())
    }

    /// A directory whose files change whenever an issue is filed, labelled
    /// or commented (the local forge's `issues/`): the worker watches it and
    /// polls at once. `None` for forges that are only polled.
    fn watch_dir(&self) -> Option<std::path::PathBuf> {
        None
    }

    /// The API budget left, when the forge has one.
    fn rate_budget(&self) -> Option<RateBudget> {
        None
    }

    /// Who the forge acts as, for people (`token`, `GitHub App 7,
    /// installation 42`); `None` where there is no such thing (the local
    /// forge).
    fn identity(&self) -> Option<String> {
        None
    }

    /// The login that authors what this forge posts (`hydraflow-bot`,
    /// `my-app[bot]`), once known: a webhook delivery whose sender it is
    /// reports the worker's own change and needs no poll. `None` while
    /// unknown and for the local forge.
    fn login(&self) -> Option<String> {
        None
    }
}
