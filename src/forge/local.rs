//! The embedded local forge: issues and pull requests as one JSON file each
//! under `data_root/<slug>/forge/`, safe to change from the CLI while a
//! worker runs (atomic writes under a lock), check runs reported by the
//! operator's CI, and a real squash merge of `agent/issue-<N>` into the base
//! branch with git2 that never puts the operator's checkout at risk.
//!
//! On disk (all written atomically: temp file in the same directory, fsync,
//! rename, fsync of the directory):
//! - `issues/<N>.json`: number, title, body, labels, author, state,
//!   created_at, updated_at, comments `[{author, body, created_at}]`, closed_at;
//! - `pulls/<N>.json`: number, head, base, head_sha, title, body, state,
//!   merged_sha, reviews `[{event, body, created_at}]`, created_at;
//! - `labels.json`: the label registry `[{name, color, description}]`;
//! - `checks/<sha>.json`: the check runs of commit `<sha>` (full, lowercase),
//!   a list of `{"name": "test", "status": "completed", "conclusion":
//!   "failure", "summary": "2 tests failed"}` in the vocabulary of GitHub's
//!   check runs (<https://docs.github.com/en/rest/checks/runs>): `status` is
//!   `queued`, `in_progress` or `completed` (`waiting`, `requested`,
//!   `pending` are read as running); `conclusion`, once completed, is
//!   `success`, `failure`, `neutral`, `cancelled`, `skipped`, `timed_out`,
//!   `action_required` or `stale`; `summary` is optional. No file means no
//!   checks ([`ChecksState::None`](super::ChecksState::None)); the summary is
//!   [`summarise_checks`]'s, as for GitHub. [`LocalForge::set_check_run`]
//!   (and `hydraflow check set`) writes one run;
//! - `checkout-sync.json`: `{base_ref, old, new, created_at, pid,
//!   index_lock}` while a merge moves the base branch the main checkout has
//!   checked out (below); `index_lock` is `{dev, ino, born_ns}`, the file
//!   that is or will be the checkout's `index.lock`;
//! - `.lock`: every read-modify-write, number allocation and merge holds an
//!   exclusive `flock` on it, so separate processes never lose an update.
//!
//! A merge builds the squash commit from trees alone (git2's merge of the
//! base tip and the head into an in-memory index, its tree written to the
//! object database, a commit made without moving any ref), then advances
//! `refs/heads/<base>` with a compare-and-swap against the tip it merged
//! onto. When the base moved meanwhile (someone committed), the merge is
//! computed again on the new tip, up to [`MERGE_TRIES`] times. A merge run
//! again after the base moved but before the pull request was recorded finds
//! its squash commit on the base (same message, same merged tree) and does
//! not merge twice.
//!
//! When the operator's checkout has the base branch checked out, it follows
//! the merge as `git checkout` follows a branch switch
//! ([`crate::git::checkout`]): the files and index entries the merge
//! changes are brought along, and the operator's own edits, staged or not,
//! on other paths are kept. Where the operator has something of their own
//! on a path the merge changes (an edit, a staged change, an untracked file
//! in the way), the merge is refused for now ([`ForgeError::Transient`],
//! naming the path) and nothing moves: a branch that moved under a checkout
//! left behind would have the operator's next `git commit -a` undo the
//! merge. A checkout on another branch or a detached `HEAD` is not touched.
//! The merge takes the checkout's `index.lock` (git's lock protocol,
//! [`crate::git::index_lock`]), checks that the branch is still where the
//! merge was computed, brings the checkout's files and index to the merge,
//! and only then moves the branch, before it lets the lock go. git reads
//! `HEAD` before the index and writes the index only under that lock, so a
//! concurrent `git commit -a` either finishes first (the merge is then
//! computed again on its commit), fails with git's own "index.lock: File
//! exists", or fails its own compare-and-swap of `HEAD`; it never commits
//! the index of before the merge on top of it (which would undo the merge).
//! While git holds the lock the merge waits about 2 s, then fails with
//! [`ForgeError::Transient`]. When the branch does not move after all, the
//! checkout is brought back. Before the lock is taken, `checkout-sync.json`
//! records the old and new commit and the lock's file; it goes with the
//! lock. Opening the forge or merging finishes what a crash interrupted: it
//! removes the `index.lock` the journal names if it is still there (its
//! process is gone: it held the forge lock), then brings the checkout to
//! the merge if the branch moved, or back to the commit before it if not
//! (every path holds the old or the new version), and leaves a checkout
//! with anything else alone.
//!
//! Issues and pull requests share one number sequence, like GitHub. Times are
//! RFC 3339 UTC. The async [`Forge`] methods run the blocking file and git
//! work on tokio's blocking pool; the inherent methods are blocking.

use std::fs::File;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use git2::{BranchType, ErrorCode, Repository};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{
    CheckRunView, ChecksSummary, Comment, Forge, ForgeError, ForgeResult, Issue, IssueDetail,
    IssueState, LabelSpec, MergeOutcome, NewPullRequest, PullRequest, PullRequestState, Review,
    ReviewEvent, summarise_checks,
};
use crate::git::GitError;
use crate::git::checkout::CheckoutSync;
use crate::git::index_lock::{IndexLock, LockFileId, LockWait};
use crate::layout::Layout;

/// Colour given to labels that are added to an issue before being registered.
const DEFAULT_LABEL_COLOR: &str = "ededed";

/// The local forge of one repository.
#[derive(Debug, Clone)]
pub struct LocalForge {
    dir: PathBuf,
    repo_path: PathBuf,
}

/// `issues/<N>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct IssueRecord {
    number: u64,
    title: String,
    #[serde(default)]
    body: String,
    #[serde(default)]
    labels: Vec<String>,
    author: String,
    state: IssueState,
    created_at: String,
    updated_at: String,
    #[serde(default)]
    comments: Vec<Comment>,
    #[serde(default)]
    closed_at: Option<String>,
}

impl IssueRecord {
    fn issue(&self) -> Issue {
        Issue {
            number: self.number,
            title: self.title.clone(),
            body: self.body.clone(),
            labels: self.labels.clone(),
            author: self.author.clone(),
            state: self.state,
            url: None,
        }
    }
}

/// One review in `pulls/<N>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ReviewRecord {
    event: ReviewEvent,
    body: String,
    created_at: String,
}

/// `pulls/<N>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PullRecord {
    number: u64,
    head: String,
    base: String,
    head_sha: String,
    title: String,
    #[serde(default)]
    body: String,
    state: PullRequestState,
    #[serde(default)]
    merged_sha: Option<String>,
    #[serde(default)]
    reviews: Vec<ReviewRecord>,
    created_at: String,
}

impl PullRecord {
    /// As the trait returns it, without touching git (`mergeable: None`).
    fn stored(&self) -> PullRequest {
        PullRequest {
            number: self.number,
            head: self.head.clone(),
            head_sha: self.head_sha.clone(),
            base: self.base.clone(),
            title: self.title.clone(),
            body: self.body.clone(),
            state: self.state,
            mergeable: None,
            url: None,
        }
    }
}

/// One entry of `labels.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LabelRecord {
    name: String,
    color: String,
    #[serde(default)]
    description: String,
}

/// `checkout-sync.json`: a merge is moving `base_ref` from `old` to `new`
/// (full SHAs; empty until the merge is computed) and the main checkout,
/// which has it checked out, follows, under the checkout's `index.lock`,
/// which process `pid` takes as the file `index_lock` (recorded before the
/// lock is taken).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckoutSyncRecord {
    base_ref: String,
    old: String,
    new: String,
    created_at: String,
    #[serde(default)]
    pid: Option<u32>,
    #[serde(default)]
    index_lock: Option<LockFileId>,
}

/// Where a check run is in its life, in GitHub's check runs vocabulary
/// (<https://docs.github.com/en/rest/checks/runs>).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckStatus {
    /// `queued`: not started.
    Queued,
    /// `in_progress`: running.
    InProgress,
    /// `completed`: finished, with a conclusion.
    Completed,
    /// `waiting` (GitHub Actions): waiting for a deployment protection rule.
    Waiting,
    /// `requested` (GitHub Actions).
    Requested,
    /// `pending` (GitHub Actions).
    Pending,
}

impl CheckStatus {
    /// The wire name (`in_progress`).
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Queued => "queued",
            CheckStatus::InProgress => "in_progress",
            CheckStatus::Completed => "completed",
            CheckStatus::Waiting => "waiting",
            CheckStatus::Requested => "requested",
            CheckStatus::Pending => "pending",
        }
    }
}

/// How a completed check run ended, in GitHub's check runs vocabulary
/// (<https://docs.github.com/en/rest/checks/runs>): `success`, `neutral` and
/// `skipped` pass, the others fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckConclusion {
    /// `success`.
    Success,
    /// `failure`.
    Failure,
    /// `neutral`.
    Neutral,
    /// `cancelled`.
    Cancelled,
    /// `skipped`.
    Skipped,
    /// `timed_out`.
    TimedOut,
    /// `action_required`.
    ActionRequired,
    /// `stale` (set by GitHub only).
    Stale,
}

impl CheckConclusion {
    /// The wire name (`timed_out`).
    pub fn as_str(self) -> &'static str {
        match self {
            CheckConclusion::Success => "success",
            CheckConclusion::Failure => "failure",
            CheckConclusion::Neutral => "neutral",
            CheckConclusion::Cancelled => "cancelled",
            CheckConclusion::Skipped => "skipped",
            CheckConclusion::TimedOut => "timed_out",
            CheckConclusion::ActionRequired => "action_required",
            CheckConclusion::Stale => "stale",
        }
    }
}

/// One check run of a commit, as `checks/<sha>.json` lists them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckRun {
    /// The check's name (`build`, `test`); one run per name and commit.
    pub name: String,
    /// Where it is.
    pub status: CheckStatus,
    /// How it ended, once `completed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conclusion: Option<CheckConclusion>,
    /// A short text shown with a failure (the CI-fix prompt gets it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub summary: String,
}

impl CheckRun {
    fn view(&self) -> CheckRunView<'_> {
        CheckRunView {
            name: &self.name,
            status: self.status.as_str(),
            conclusion: self.conclusion.map(CheckConclusion::as_str),
            summary: Some(&self.summary),
        }
    }
}

/// Holds the exclusive lock on `forge/.lock` until dropped (closing the file
/// releases the `flock`).
struct ForgeLock {
    _file: File,
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn author() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "local".to_owned())
}

fn local_io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> ForgeError {
    let message = format!("cannot {what} {}", path.display());
    move |e| ForgeError::Local(format!("{message}: {e}"))
}

fn local_git(context: impl Into<String>) -> impl FnOnce(git2::Error) -> ForgeError {
    let context = context.into();
    move |e| ForgeError::Local(format!("{context}: {}", e.message()))
}

/// Replace `path` with `value` as pretty JSON, atomically.
fn write_json<T: Serialize>(path: &Path, value: &T) -> ForgeResult<()> {
    let mut bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| ForgeError::Local(format!("cannot write {}: {e}", path.display())))?;
    bytes.push(b'\n');
    crate::store::atomic::write_atomic(path, &bytes).map_err(local_io("replace", path))
}

/// Read and parse `path`; `Ok(None)` when it does not exist.
fn read_json<T: DeserializeOwned>(path: &Path) -> ForgeResult<Option<T>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(local_io("read", path)(e)),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        ForgeError::Local(format!("{} is not a valid forge file: {e}", path.display()))
    })
}

/// Numbers of the `<N>.json` files in `dir`, ascending.
fn numbers_in(dir: &Path) -> ForgeResult<Vec<u64>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(local_io("read directory", dir)(e)),
    };
    let mut numbers = Vec::new();
    for entry in entries {
        let entry = entry.map_err(local_io("read directory", dir))?;
        if let Some(n) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.strip_suffix(".json"))
            .and_then(|stem| stem.parse::<u64>().ok())
        {
            numbers.push(n);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

/// The issue number a head branch `agent/issue-<N>` is for.
fn issue_of_head(head: &str) -> Option<u64> {
    head.strip_prefix("agent/issue-")?.parse().ok()
}

fn branch_commit<'r>(repo: &'r Repository, branch: &str) -> ForgeResult<git2::Commit<'r>> {
    match repo.find_branch(branch, BranchType::Local) {
        Ok(b) => b
            .get()
            .peel_to_commit()
            .map_err(local_git(format!("cannot read the tip of branch {branch}"))),
        Err(e) if e.code() == ErrorCode::NotFound => {
            Err(ForgeError::NotFound(format!("branch {branch}")))
        }
        Err(e) => Err(local_git(format!("cannot look up branch {branch}"))(e)),
    }
}

/// Paths in conflict in a merge index, sorted, without duplicates.
fn conflict_paths(index: &git2::Index) -> ForgeResult<Vec<String>> {
    let mut paths = Vec::new();
    for conflict in index
        .conflicts()
        .map_err(local_git("cannot list conflicts"))?
    {
        let conflict = conflict.map_err(local_git("cannot list conflicts"))?;
        if let Some(entry) = conflict.our.or(conflict.their).or(conflict.ancestor) {
            paths.push(String::from_utf8_lossy(&entry.path).into_owned());
        }
    }
    paths.sort();
    paths.dedup();
    Ok(paths)
}

impl LocalForge {
    /// Open (creating) `layout.forge_dir()` for the checkout at `repo_path`.
    ///
    /// # Errors
    /// [`super::ForgeError::Local`] when the directory cannot be created.
    ///
    /// When a merge was interrupted before the main checkout followed it
    /// (`checkout-sync.json` exists), the checkout is brought along now, or
    /// left alone when it has changes of its own on the merge's paths; only by a process running as
    /// the checkout's owner (root's `hydraflow issue` on a packaged instance
    /// leaves it to the worker, so no file in the checkout becomes root's).
    pub fn open(layout: &Layout, repo_path: &Path) -> ForgeResult<LocalForge> {
        let dir = layout.forge_dir();
        for d in [dir.join("issues"), dir.join("pulls")] {
            std::fs::create_dir_all(&d).map_err(local_io("create", &d))?;
        }
        let forge = LocalForge {
            dir,
            repo_path: repo_path.to_path_buf(),
        };
        if forge.checkout_sync_file().exists() && forge.owns_checkout() {
            let _lock = forge.lock()?;
            match forge.open_repo() {
                Ok(repo) => forge.finish_checkout_sync(&repo),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the checkout to finish updating it");
                }
            }
        }
        Ok(forge)
    }

    /// Whether this process runs as the owner of the checkout.
    fn owns_checkout(&self) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::metadata(&self.repo_path).is_ok_and(|m| m.uid() == nix::unistd::geteuid().as_raw())
    }

    fn issue_file(&self, number: u64) -> PathBuf {
        self.dir.join("issues").join(format!("{number}.json"))
    }

    fn pull_file(&self, number: u64) -> PathBuf {
        self.dir.join("pulls").join(format!("{number}.json"))
    }

    fn labels_file(&self) -> PathBuf {
        self.dir.join("labels.json")
    }

    /// Take the exclusive lock on `forge/.lock` (blocks until free).
    fn lock(&self) -> ForgeResult<ForgeLock> {
        let path = self.dir.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(local_io("open", &path))?;
        fs4::FileExt::lock(&file).map_err(local_io("lock", &path))?;
        Ok(ForgeLock { _file: file })
    }

    fn read_issue(&self, number: u64) -> ForgeResult<IssueRecord> {
        read_json(&self.issue_file(number))?
            .ok_or_else(|| ForgeError::NotFound(format!("issue #{number}")))
    }

    fn read_pull(&self, number: u64) -> ForgeResult<PullRecord> {
        read_json(&self.pull_file(number))?
            .ok_or_else(|| ForgeError::NotFound(format!("pull request #{number}")))
    }

    fn all_pull_records(&self) -> ForgeResult<Vec<PullRecord>> {
        let mut out = Vec::new();
        for n in numbers_in(&self.dir.join("pulls"))? {
            if let Some(pull) = read_json(&self.pull_file(n))? {
                out.push(pull);
            }
        }
        Ok(out)
    }

    /// The next number of the shared issue/pull request sequence. Call with the lock held.
    fn next_number(&self) -> ForgeResult<u64> {
        let issues = numbers_in(&self.dir.join("issues"))?;
        let pulls = numbers_in(&self.dir.join("pulls"))?;
        Ok(issues
            .last()
            .copied()
            .max(pulls.last().copied())
            .unwrap_or(0)
            + 1)
    }

    /// Read-modify-write issue `number` under the lock.
    fn update_issue(
        &self,
        number: u64,
        change: impl FnOnce(&mut IssueRecord),
    ) -> ForgeResult<IssueRecord> {
        let _lock = self.lock()?;
        let mut record = self.read_issue(number)?;
        change(&mut record);
        record.updated_at = now();
        write_json(&self.issue_file(number), &record)?;
        Ok(record)
    }

    /// Register labels missing from `labels.json`. Call with the lock held.
    fn register_labels(&self, labels: &[LabelSpec]) -> ForgeResult<()> {
        let path = self.labels_file();
        let mut registry: Vec<LabelRecord> = read_json(&path)?.unwrap_or_default();
        let before = registry.len();
        for spec in labels {
            if !registry.iter().any(|l| l.name == spec.name) {
                registry.push(LabelRecord {
                    name: spec.name.clone(),
                    color: spec.color.clone(),
                    description: spec.description.clone(),
                });
            }
        }
        if registry.len() != before {
            write_json(&path, &registry)?;
        }
        Ok(())
    }

    /// File a new open issue.
    ///
    /// # Errors
    /// [`super::ForgeError::Local`] on I/O failure.
    pub fn create_issue(&self, title: &str, body: &str, labels: &[String]) -> ForgeResult<Issue> {
        let _lock = self.lock()?;
        let number = self.next_number()?;
        let mut unique: Vec<String> = Vec::new();
        for label in labels {
            if !unique.contains(label) {
                unique.push(label.clone());
            }
        }
        let created = now();
        let record = IssueRecord {
            number,
            title: title.to_owned(),
            body: body.to_owned(),
            labels: unique,
            author: author(),
            state: IssueState::Open,
            created_at: created.clone(),
            updated_at: created,
            comments: Vec::new(),
            closed_at: None,
        };
        write_json(&self.issue_file(number), &record)?;
        Ok(record.issue())
    }

    /// Every issue, open and closed, by number.
    ///
    /// # Errors
    /// [`super::ForgeError::Local`] on I/O failure.
    pub fn all_issues(&self) -> ForgeResult<Vec<Issue>> {
        let mut out = Vec::new();
        for n in numbers_in(&self.dir.join("issues"))? {
            if let Some(record) = read_json::<IssueRecord>(&self.issue_file(n))? {
                out.push(record.issue());
            }
        }
        Ok(out)
    }

    /// Every pull request, by number, as stored (`mergeable: None`).
    ///
    /// # Errors
    /// [`super::ForgeError::Local`] on I/O failure.
    pub fn all_pull_requests(&self) -> ForgeResult<Vec<PullRequest>> {
        Ok(self
            .all_pull_records()?
            .iter()
            .map(PullRecord::stored)
            .collect())
    }

    /// One issue with its comments (blocking).
    ///
    /// # Errors
    /// [`ForgeError::NotFound`] for an unknown number, [`ForgeError::Local`] on I/O failure.
    pub fn issue_detail(&self, number: u64) -> ForgeResult<IssueDetail> {
        let record = self.read_issue(number)?;
        Ok(IssueDetail {
            issue: record.issue(),
            comments: record.comments,
        })
    }

    /// Add `add` and remove `remove` from the issue's labels in one locked
    /// update (blocking); present labels are not duplicated, absent ones are
    /// not an error. Returns the issue as changed.
    ///
    /// # Errors
    /// [`ForgeError::NotFound`] for an unknown number, [`ForgeError::Local`] on I/O failure.
    pub fn edit_labels(
        &self,
        number: u64,
        add: &[String],
        remove: &[String],
    ) -> ForgeResult<Issue> {
        let record = self.update_issue(number, |record| {
            record.labels.retain(|l| !remove.contains(l));
            for label in add {
                if !record.labels.contains(label) {
                    record.labels.push(label.clone());
                }
            }
        })?;
        if !add.is_empty() {
            let _lock = self.lock()?;
            let specs: Vec<LabelSpec> = add
                .iter()
                .map(|name| LabelSpec {
                    name: name.clone(),
                    color: DEFAULT_LABEL_COLOR.to_owned(),
                    description: String::new(),
                })
                .collect();
            self.register_labels(&specs)?;
        }
        Ok(record.issue())
    }

    /// The pull requests whose head is `head`, newest first, as stored.
    ///
    /// # Errors
    /// [`super::ForgeError::Local`] on I/O failure.
    pub fn pull_requests_for_head(&self, head: &str) -> ForgeResult<Vec<PullRequest>> {
        let mut out: Vec<PullRequest> = self
            .all_pull_records()?
            .iter()
            .filter(|p| p.head == head)
            .map(PullRecord::stored)
            .collect();
        out.reverse();
        Ok(out)
    }

    /// The forge directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The checkout merges go into.
    pub fn repo_path(&self) -> &Path {
        &self.repo_path
    }

    fn open_repo(&self) -> ForgeResult<Repository> {
        Repository::open(&self.repo_path).map_err(local_git(format!(
            "cannot open the repository at {}",
            self.repo_path.display()
        )))
    }

    /// Run blocking work on tokio's blocking pool.
    async fn blocking<T, F>(&self, f: F) -> ForgeResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&LocalForge) -> ForgeResult<T> + Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .map_err(|e| ForgeError::Local(format!("local forge task did not finish: {e}")))?
    }

    /// The pull request with its head SHA read from git and, while open,
    /// whether squash-merging it would be conflict-free.
    fn live_pull(&self, record: &PullRecord) -> ForgeResult<PullRequest> {
        let mut pull = record.stored();
        if record.state != PullRequestState::Open {
            return Ok(pull);
        }
        let repo = self.open_repo()?;
        let head = match branch_commit(&repo, &record.head) {
            Ok(head) => head,
            Err(ForgeError::NotFound(_)) => {
                pull.mergeable = Some(false);
                return Ok(pull);
            }
            Err(e) => return Err(e),
        };
        pull.head_sha = head.id().to_string();
        let base = branch_commit(&repo, &record.base)?;
        let index = repo
            .merge_commits(&base, &head, None)
            .map_err(local_git(format!(
                "cannot merge {} into {}",
                record.head, record.base
            )))?;
        pull.mergeable = Some(!index.has_conflicts());
        Ok(pull)
    }

    fn find_or_create_pull_blocking(&self, req: &NewPullRequest) -> ForgeResult<PullRequest> {
        let _lock = self.lock()?;
        if let Some(open) = self
            .all_pull_records()?
            .into_iter()
            .find(|p| p.head == req.head && p.state == PullRequestState::Open)
        {
            return self.live_pull(&open);
        }
        if req.head == req.base {
            return Err(ForgeError::Rejected(format!(
                "head and base are the same branch {}",
                req.head
            )));
        }
        let repo = self.open_repo()?;
        let head = branch_commit(&repo, &req.head)?;
        branch_commit(&repo, &req.base)?;
        let number = self.next_number()?;
        let record = PullRecord {
            number,
            head: req.head.clone(),
            base: req.base.clone(),
            head_sha: head.id().to_string(),
            title: req.title.clone(),
            body: req.body.clone(),
            state: PullRequestState::Open,
            merged_sha: None,
            reviews: Vec::new(),
            created_at: now(),
        };
        write_json(&self.pull_file(number), &record)?;
        self.live_pull(&record)
    }

    /// Squash-merge pull request `number` (blocking), as
    /// [`Forge::merge_pull_request`] does.
    fn merge_blocking(&self, number: u64, title: &str) -> ForgeResult<MergeOutcome> {
        self.merge_with(number, title, |repo, _, base| {
            branch_commit(repo, base).map(|c| c.id())
        })
    }

    /// Squash-merge pull request `number` (blocking) as
    /// [`Forge::merge_pull_request`] does, except that the first attempt is
    /// computed against `base_tip` (a full commit SHA) as if the base branch
    /// had been read there before it moved: the compare-and-swap of the base
    /// branch then fails when the branch is elsewhere, and the merge is
    /// computed again against its real tip. For tests of that race.
    ///
    /// # Errors
    /// As [`Forge::merge_pull_request`]; [`ForgeError::Rejected`] when
    /// `base_tip` is not a commit SHA.
    pub fn merge_pull_request_from(
        &self,
        number: u64,
        title: &str,
        base_tip: &str,
    ) -> ForgeResult<MergeOutcome> {
        let first = git2::Oid::from_str(base_tip)
            .map_err(|_| ForgeError::Rejected(format!("{base_tip:?} is not a commit SHA")))?;
        self.merge_with(number, title, |repo, attempt, base| {
            if attempt == 0 {
                Ok(first)
            } else {
                branch_commit(repo, base).map(|c| c.id())
            }
        })
    }

    /// The merge: under the forge lock, finish an interrupted checkout
    /// update, then up to [`MERGE_TRIES`] times compute the squash commit on
    /// the tip `base_tip(repo, attempt, base)` gives and move the base
    /// branch there if it still is at that tip.
    fn merge_with(
        &self,
        number: u64,
        title: &str,
        mut base_tip: impl FnMut(&Repository, u32, &str) -> ForgeResult<git2::Oid>,
    ) -> ForgeResult<MergeOutcome> {
        let _lock = self.lock()?;
        let mut record = self.read_pull(number)?;
        match (record.state, &record.merged_sha) {
            (PullRequestState::Merged, Some(sha)) => {
                return Ok(MergeOutcome { sha: sha.clone() });
            }
            (PullRequestState::Open, _) => {}
            _ => {
                return Err(ForgeError::Rejected(format!(
                    "pull request #{number} is closed"
                )));
            }
        }
        let repo = self.open_repo()?;
        self.finish_checkout_sync(&repo);
        let what = format!(
            "pull request #{number} ({} into {})",
            record.head, record.base
        );
        let head = branch_commit(&repo, &record.head)?;
        let message = match issue_of_head(&record.head) {
            Some(issue) => format!("{title}\n\nCloses #{issue}"),
            None => title.to_owned(),
        };
        let base_ref = format!("refs/heads/{}", record.base);
        let mut attempt = 0;
        let sha = loop {
            // When the checkout follows, its index lock is held from before the tip is
            // read until the branch moved: git's commits, which need it, wait.
            let lock = self.begin_checkout_sync(&repo, &base_ref, &what)?;
            let computed: ForgeResult<Result<git2::Oid, (git2::Commit<'_>, git2::Oid)>> = 'merge: {
                let tip = match base_tip(&repo, attempt, &record.base) {
                    Ok(tip) => tip,
                    Err(e) => break 'merge Err(e),
                };
                let base = match repo.find_commit(tip) {
                    Ok(base) => base,
                    Err(e) => {
                        break 'merge Err(local_git(format!(
                            "cannot read commit {tip} of {}",
                            record.base
                        ))(e));
                    }
                };
                // A restart between moving the base branch and recording the
                // merge: the squash commit is already on the base branch.
                match find_squash(&repo, &base, &head, &message) {
                    Ok(Some(done)) => break 'merge Ok(Ok(done)),
                    Ok(None) => {}
                    Err(e) => break 'merge Err(e),
                }
                squash_commit(&repo, &base, &head, &message, &what).map(|c| Err((base, c)))
            };
            let (base, commit) = match computed {
                Ok(Err(merge)) => merge,
                Ok(Ok(done)) => {
                    self.unlock_untouched(lock);
                    break done;
                }
                Err(e) => {
                    self.unlock_untouched(lock);
                    return Err(e);
                }
            };
            if lock.is_some() {
                self.record_checkout_sync(base.id(), commit)?;
            }
            // The checkout follows first, under its index lock; the branch moves after
            // (see the module documentation).
            let tip_moved = lock.is_some() && repo.refname_to_id(&base_ref).ok() != Some(base.id());
            let mut followed = false;
            if let Some(held) = lock.as_ref().filter(|_| !tip_moved) {
                if let Err(e) = self.follow(&repo, &base_ref, base.id(), commit, held) {
                    return Err(match e {
                        // Refused before anything was touched.
                        ForgeError::Transient(why) => {
                            self.unlock_untouched(lock);
                            ForgeError::Transient(format!("{why}; {what} is merged on a later try"))
                        }
                        other => {
                            if let Some(lock) = lock {
                                self.release(&repo, &base_ref, base.id(), commit, lock);
                            }
                            other
                        }
                    });
                }
                followed = true;
            }
            let moved = if tip_moved {
                // It moved between reading its tip and taking the lock.
                Err(git2::Error::new(
                    ErrorCode::Modified,
                    git2::ErrorClass::Reference,
                    "the base branch moved",
                ))
            } else {
                repo.reference_matching(
                    &base_ref,
                    commit,
                    true,
                    base.id(),
                    &format!("hydraflow: squash merge {what}"),
                )
                .map(|_| ())
            };
            match moved {
                Ok(()) => {
                    self.unlock_untouched(lock);
                    break commit;
                }
                Err(e) => {
                    match lock {
                        Some(lock) if followed => {
                            self.release(&repo, &base_ref, base.id(), commit, lock);
                        }
                        lock => self.unlock_untouched(lock),
                    }
                    attempt += 1;
                    match e.code() {
                        ErrorCode::Modified if attempt < MERGE_TRIES => {
                            tracing::info!(
                                pull_request = number,
                                base = %record.base,
                                "the base branch moved while merging: merging onto its new tip"
                            );
                        }
                        ErrorCode::Modified => {
                            return Err(ForgeError::Transient(format!(
                                "{} moved during each of {MERGE_TRIES} attempts to merge {what}; it is merged on a later try",
                                record.base
                            )));
                        }
                        ErrorCode::Locked => {
                            return Err(ForgeError::Transient(format!(
                                "{base_ref} is locked by another git process (refs/heads/{}.lock exists); {what} is merged on a later try",
                                record.base
                            )));
                        }
                        _ => {
                            return Err(local_git(format!(
                                "cannot move {} to the merge of {what}",
                                record.base
                            ))(e));
                        }
                    }
                }
            }
        };

        record.state = PullRequestState::Merged;
        record.merged_sha = Some(sha.to_string());
        record.head_sha = head.id().to_string();
        write_json(&self.pull_file(number), &record)?;

        let head_ref = format!("refs/heads/{}", record.head);
        if crate::git::checked_out(&repo, &head_ref) {
            tracing::info!(branch = %record.head, "head branch is checked out: leaving it");
        } else if let Ok(mut branch) = repo.find_branch(&record.head, BranchType::Local)
            && let Err(e) = branch.delete()
        {
            tracing::warn!(branch = %record.head, error = %e, "cannot delete the merged head branch");
        }
        Ok(MergeOutcome {
            sha: sha.to_string(),
        })
    }

    /// `forge/checkout-sync.json`.
    fn checkout_sync_file(&self) -> PathBuf {
        self.dir.join("checkout-sync.json")
    }

    /// Before a merge into `base_ref` is computed, when the main checkout
    /// has it checked out: record in the journal which file will be the
    /// checkout's `index.lock`, then take that lock (waiting briefly for a
    /// git command holding it); the commits go into the journal once known
    /// ([`Self::record_checkout_sync`]). Returns the lock, `None` when the
    /// checkout does not follow. Call with the forge lock held.
    ///
    /// # Errors
    /// [`ForgeError::Transient`] when git keeps holding `index.lock` (`what`
    /// is merged on a later try); [`ForgeError::Local`] when the journal or
    /// the lock file cannot be written.
    fn begin_checkout_sync(
        &self,
        repo: &Repository,
        base_ref: &str,
        what: &str,
    ) -> ForgeResult<Option<IndexLock>> {
        if repo.is_bare() || !main_checkout_on(repo, base_ref) {
            return Ok(None);
        }
        let journal = CheckoutSyncRecord {
            base_ref: base_ref.to_owned(),
            old: String::new(),
            new: String::new(),
            created_at: now(),
            pid: None,
            index_lock: None,
        };
        match self.lock_index(repo, journal, LockWait::Briefly) {
            Ok(lock) => Ok(Some(lock)),
            Err(e) => {
                self.drop_checkout_sync();
                Err(match e {
                    ForgeError::Transient(held) => {
                        ForgeError::Transient(format!("{held}; {what} is merged on a later try"))
                    }
                    other => other,
                })
            }
        }
    }

    /// Release the checkout's index `lock` (if any) and drop the journal:
    /// the checkout is where the branch is.
    fn unlock_untouched(&self, lock: Option<IndexLock>) {
        if let Some(lock) = lock {
            drop(lock);
            self.drop_checkout_sync();
        }
    }

    /// Record in the journal the commits the checkout goes from and to,
    /// before it is touched.
    ///
    /// # Errors
    /// [`ForgeError::Local`] when the journal cannot be written.
    fn record_checkout_sync(&self, old: git2::Oid, new: git2::Oid) -> ForgeResult<()> {
        let path = self.checkout_sync_file();
        let mut journal: CheckoutSyncRecord = read_json(&path)?.ok_or_else(|| {
            ForgeError::Local(format!("{} vanished while merging", path.display()))
        })?;
        journal.old = old.to_string();
        journal.new = new.to_string();
        write_json(&path, &journal)
    }

    /// Take the checkout's `index.lock` for the sync `journal` describes:
    /// write the journal naming this process and the lock's file first, so
    /// a kill at any instant leaves a lock [`Self::finish_checkout_sync`]
    /// recognises. The journal stays on failure.
    fn lock_index(
        &self,
        repo: &Repository,
        mut journal: CheckoutSyncRecord,
        wait: LockWait,
    ) -> ForgeResult<IndexLock> {
        let local = |e: GitError| ForgeError::Local(e.to_string());
        let mut lock = IndexLock::prepare(repo.path()).map_err(local)?;
        journal.pid = Some(std::process::id());
        journal.index_lock = lock.id();
        write_json(&self.checkout_sync_file(), &journal)?;
        match lock.acquire(wait) {
            Ok(()) => {}
            Err(e @ GitError::IndexLocked { .. }) => {
                return Err(ForgeError::Transient(e.to_string()));
            }
            Err(e) => return Err(local(e)),
        }
        // Without O_TMPFILE the file is known only now.
        if journal.index_lock != lock.id() {
            journal.index_lock = lock.id();
            write_json(&self.checkout_sync_file(), &journal)?;
        }
        Ok(lock)
    }

    /// Remove the checkout-sync journal (a missing one is fine).
    fn drop_checkout_sync(&self) {
        let path = self.checkout_sync_file();
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove the checkout-sync journal");
            }
        }
    }

    /// Bring the checkout, which has `base_ref` checked out, from `from` to
    /// `to` under the held index `lock` ([`crate::git::checkout`]).
    ///
    /// # Errors
    /// [`ForgeError::Transient`] when the operator has something of their
    /// own on a path the two commits differ in (naming it; nothing was
    /// touched); [`ForgeError::Local`] when git or the file system failed
    /// part-way.
    fn follow(
        &self,
        repo: &Repository,
        base_ref: &str,
        from: git2::Oid,
        to: git2::Oid,
        lock: &IndexLock,
    ) -> ForgeResult<()> {
        match crate::git::checkout::sync_checkout(repo, base_ref, from, to, lock) {
            Ok(CheckoutSync::Updated { paths }) => {
                tracing::debug!(checkout = %self.repo_path.display(), commit = %to, paths, "the checkout follows");
                Ok(())
            }
            Ok(CheckoutSync::NotApplicable(reason)) => {
                tracing::debug!(checkout = %self.repo_path.display(), reason, "the checkout does not follow");
                Ok(())
            }
            Ok(CheckoutSync::LocalChanges(reason)) => Err(ForgeError::Transient(format!(
                "the checkout {} has changes of its own that the merge would overwrite ({reason}): \
                 commit, stash or remove them",
                self.repo_path.display()
            ))),
            Err(e) => Err(ForgeError::Local(format!(
                "cannot bring the checkout {} to {to}: {e}",
                self.repo_path.display()
            ))),
        }
    }

    /// The branch did not move to `new` after the checkout followed (or
    /// began to): bring the checkout back to `old` and release `lock` and
    /// the journal. When that fails, the lock stays taken, so no git
    /// command commits the half-made index, and the journal stays, for the
    /// next open or merge to finish ([`Self::finish_checkout_sync`]).
    fn release(
        &self,
        repo: &Repository,
        base_ref: &str,
        old: git2::Oid,
        new: git2::Oid,
        lock: IndexLock,
    ) {
        match self.follow(repo, base_ref, new, old, &lock) {
            Ok(()) => {
                drop(lock);
                self.drop_checkout_sync();
            }
            Err(e) => {
                tracing::error!(
                    checkout = %self.repo_path.display(),
                    lock = %lock.path().display(),
                    error = %e,
                    "cannot bring the checkout back after a merge that did not land; its index stays locked until the forge is next opened"
                );
                std::mem::forget(lock);
            }
        }
    }

    /// Finish what a killed merge left: when the checkout-sync journal
    /// exists, remove the `index.lock` it names if that file is still there
    /// (its process is gone: it held the forge lock, which is ours now),
    /// take the index lock again and bring the checkout to where the branch
    /// is: to the merge when it landed (the branch at it or past it), back
    /// to the commit before it otherwise. When git holds the index lock,
    /// the journal stays for the next open or merge. Never fails. Call with
    /// the forge lock held.
    fn finish_checkout_sync(&self, repo: &Repository) {
        let path = self.checkout_sync_file();
        let Some(journal) = self.read_checkout_sync() else {
            return;
        };
        if let Some(id) = &journal.index_lock {
            let lock_path = repo.path().join("index.lock");
            match crate::git::index_lock::remove_stale(&lock_path, id) {
                Ok(true) => tracing::warn!(
                    path = %lock_path.display(),
                    pid = journal.pid,
                    "removed the index lock a killed merge left"
                ),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot remove the index lock a killed merge left; trying again on the next open or merge");
                    return;
                }
            }
        }
        let (Ok(old), Ok(new)) = (
            git2::Oid::from_str(&journal.old),
            git2::Oid::from_str(&journal.new),
        ) else {
            tracing::warn!(path = %path.display(), "dropping a checkout-sync journal without valid commits");
            self.drop_checkout_sync();
            return;
        };
        if repo.is_bare() {
            self.drop_checkout_sync();
            return;
        }
        let base_ref = journal.base_ref.clone();
        let lock = match self.lock_index(repo, journal, LockWait::No) {
            Ok(lock) => lock,
            Err(e) => {
                tracing::warn!(error = %e, journal = %path.display(), "cannot lock the checkout's index to finish an interrupted merge; trying again on the next open or merge");
                return;
            }
        };
        let landed = repo
            .refname_to_id(&base_ref)
            .is_ok_and(|tip| tip == new || repo.graph_descendant_of(tip, new).unwrap_or(false));
        let (from, to) = if landed { (old, new) } else { (new, old) };
        let checkout = self.repo_path.display();
        match self.follow(repo, &base_ref, from, to, &lock) {
            Ok(()) => {
                tracing::info!(%checkout, commit = %to, "finished the checkout update of an interrupted merge");
            }
            Err(ForgeError::Transient(why)) => {
                tracing::warn!(%checkout, "leaving the checkout as it is: {why}");
            }
            Err(e) => {
                tracing::warn!(%checkout, error = %e, journal = %path.display(), "cannot finish the checkout update of an interrupted merge; trying again on the next open or merge");
                return;
            }
        }
        drop(lock);
        self.drop_checkout_sync();
    }

    /// The checkout-sync journal, if there is one; an unreadable one is
    /// logged and dropped.
    fn read_checkout_sync(&self) -> Option<CheckoutSyncRecord> {
        match read_json(&self.checkout_sync_file()) {
            Ok(journal) => journal,
            Err(e) => {
                tracing::warn!(error = %e, "dropping an unreadable checkout-sync journal");
                self.drop_checkout_sync();
                None
            }
        }
    }

    /// `forge/checks/<sha>.json`; `sha` must be a full commit SHA.
    fn checks_file(&self, sha: &str) -> ForgeResult<PathBuf> {
        let valid = matches!(sha.len(), 40 | 64)
            && sha
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !valid {
            return Err(ForgeError::Rejected(format!(
                "{sha:?} is not a full commit SHA (40 or 64 lowercase hex digits)"
            )));
        }
        Ok(self.dir.join("checks").join(format!("{sha}.json")))
    }

    /// The check runs reported for commit `sha` (a full SHA), in the order
    /// they were first reported; empty when none were.
    ///
    /// # Errors
    /// [`ForgeError::Rejected`] for a malformed SHA, [`ForgeError::Local`]
    /// for an unreadable or invalid `checks/<sha>.json` (named).
    pub fn check_runs(&self, sha: &str) -> ForgeResult<Vec<CheckRun>> {
        Ok(read_json(&self.checks_file(sha)?)?.unwrap_or_default())
    }

    /// The check runs of commit `sha` (a full SHA) summarised as for GitHub
    /// ([`summarise_checks`]); what [`Forge::checks`] answers.
    ///
    /// # Errors
    /// As [`LocalForge::check_runs`].
    pub fn check_summary(&self, sha: &str) -> ForgeResult<ChecksSummary> {
        let runs = self.check_runs(sha)?;
        let views: Vec<CheckRunView<'_>> = runs.iter().map(CheckRun::view).collect();
        Ok(summarise_checks(&views, &[]))
    }

    /// Report check run `run` for commit `sha` (a full SHA): it replaces the
    /// run of the same name, else is added. A conclusion makes the run
    /// `completed`, as on GitHub. Blocking; under the forge lock, written
    /// atomically.
    ///
    /// # Errors
    /// [`ForgeError::Rejected`] for a malformed SHA or an empty name,
    /// [`ForgeError::Local`] on I/O failure.
    pub fn set_check_run(&self, sha: &str, mut run: CheckRun) -> ForgeResult<()> {
        let path = self.checks_file(sha)?;
        if run.name.trim().is_empty() {
            return Err(ForgeError::Rejected("the check run's name is empty".into()));
        }
        if run.conclusion.is_some() {
            run.status = CheckStatus::Completed;
        }
        let dir = self.dir.join("checks");
        std::fs::create_dir_all(&dir).map_err(local_io("create", &dir))?;
        let _lock = self.lock()?;
        let mut runs: Vec<CheckRun> = read_json(&path)?.unwrap_or_default();
        match runs.iter_mut().find(|r| r.name == run.name) {
            Some(existing) => *existing = run,
            None => runs.push(run),
        }
        write_json(&path, &runs)
    }

    /// The full SHA of the commit `rev` names in the checkout (a SHA, a
    /// short SHA, a branch such as `agent/issue-3`, any git revision).
    ///
    /// # Errors
    /// [`ForgeError::NotFound`] when `rev` names no commit,
    /// [`ForgeError::Local`] when the repository cannot be opened.
    pub fn resolve_commit(&self, rev: &str) -> ForgeResult<String> {
        let repo = self.open_repo()?;
        repo.revparse_single(rev)
            .and_then(|o| o.peel_to_commit())
            .map(|c| c.id().to_string())
            .map_err(|e| {
                ForgeError::NotFound(format!(
                    "commit {rev:?} in {}: {}",
                    self.repo_path.display(),
                    e.message()
                ))
            })
    }
}

/// How many times a merge is computed again when the base branch moved
/// between computing it and moving the branch.
pub const MERGE_TRIES: u32 = 5;

/// How far down the base branch's first parents a squash commit made by an
/// interrupted merge is looked for.
const SQUASH_SEARCH_DEPTH: usize = 200;

/// The squash commit of `head` onto `base` with `message`, written to the
/// object database without moving any ref.
fn squash_commit(
    repo: &Repository,
    base: &git2::Commit<'_>,
    head: &git2::Commit<'_>,
    message: &str,
    what: &str,
) -> ForgeResult<git2::Oid> {
    let mut index = repo
        .merge_commits(base, head, None)
        .map_err(local_git(format!("cannot merge {what}")))?;
    if index.has_conflicts() {
        let paths = conflict_paths(&index)?;
        return Err(ForgeError::MergeConflict(format!(
            "{what} conflicts in {}",
            paths.join(", ")
        )));
    }
    let tree_id = index
        .write_tree_to(repo)
        .map_err(local_git(format!("cannot write the merged tree of {what}")))?;
    let tree = repo
        .find_tree(tree_id)
        .map_err(local_git(format!("cannot read the merged tree of {what}")))?;
    let sig = crate::git::signature(repo).map_err(local_git("cannot make a signature"))?;
    repo.commit(None, &sig, &sig, message, &tree, &[base])
        .map_err(local_git(format!(
            "cannot commit the squash merge of {what}"
        )))
}

/// A squash commit of `head` with `message` already on the base branch:
/// a commit on the first-parent line from `tip` down to where `head`
/// forked, with that message and exactly the tree that squash-merging
/// `head` onto its parent gives.
fn find_squash(
    repo: &Repository,
    tip: &git2::Commit<'_>,
    head: &git2::Commit<'_>,
    message: &str,
) -> ForgeResult<Option<git2::Oid>> {
    let fork = repo.merge_base(tip.id(), head.id()).ok();
    let mut commit = tip.clone();
    for _ in 0..SQUASH_SEARCH_DEPTH {
        if Some(commit.id()) == fork {
            break;
        }
        let Ok(parent) = commit.parent(0) else {
            break;
        };
        if commit.parent_count() == 1 && commit.message().ok() == Some(message) {
            let mut index = repo
                .merge_commits(&parent, head, None)
                .map_err(local_git("cannot check for an earlier squash merge"))?;
            if !index.has_conflicts()
                && index
                    .write_tree_to(repo)
                    .map_err(local_git("cannot check for an earlier squash merge"))?
                    == commit.tree_id()
            {
                return Ok(Some(commit.id()));
            }
        }
        commit = parent;
    }
    Ok(None)
}

/// Whether the main checkout (not a linked worktree) has `refname` checked out.
fn main_checkout_on(repo: &Repository, refname: &str) -> bool {
    repo.find_reference("HEAD")
        .ok()
        .and_then(|h| h.symbolic_target().ok().flatten().map(|t| t == refname))
        .unwrap_or(false)
}

#[async_trait]
impl Forge for LocalForge {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn list_issues(&self, labels: &[String]) -> ForgeResult<Vec<Issue>> {
        let labels = labels.to_vec();
        self.blocking(move |f| {
            Ok(f.all_issues()?
                .into_iter()
                .filter(|i| i.state == IssueState::Open)
                .filter(|i| i.labels.iter().any(|l| labels.contains(l)))
                .collect())
        })
        .await
    }

    async fn get_issue(&self, number: u64) -> ForgeResult<IssueDetail> {
        self.blocking(move |f| f.issue_detail(number)).await
    }

    async fn add_label(&self, number: u64, label: &str) -> ForgeResult<()> {
        let label = label.to_owned();
        self.blocking(move |f| f.edit_labels(number, &[label], &[]).map(drop))
            .await
    }

    async fn remove_label(&self, number: u64, label: &str) -> ForgeResult<()> {
        let label = label.to_owned();
        self.blocking(move |f| f.edit_labels(number, &[], &[label]).map(drop))
            .await
    }

    async fn ensure_labels(&self, labels: &[LabelSpec]) -> ForgeResult<()> {
        let labels = labels.to_vec();
        self.blocking(move |f| {
            let _lock = f.lock()?;
            f.register_labels(&labels)
        })
        .await
    }

    async fn comment(&self, number: u64, body: &str) -> ForgeResult<()> {
        let body = body.to_owned();
        self.blocking(move |f| {
            f.update_issue(number, |record| {
                record.comments.push(Comment {
                    author: author(),
                    body,
                    created_at: now(),
                });
            })
            .map(drop)
        })
        .await
    }

    async fn close_issue(&self, number: u64) -> ForgeResult<()> {
        self.blocking(move |f| {
            f.update_issue(number, |record| {
                if record.state != IssueState::Closed {
                    record.state = IssueState::Closed;
                    record.closed_at = Some(now());
                }
            })
            .map(drop)
        })
        .await
    }

    async fn push_branch(&self, repo: &Path, branch: &str) -> ForgeResult<()> {
        let (repo, branch) = (repo.to_path_buf(), branch.to_owned());
        self.blocking(move |_| {
            let repo = Repository::open(&repo).map_err(local_git(format!(
                "cannot open the repository at {}",
                repo.display()
            )))?;
            branch_commit(&repo, &branch).map(drop)
        })
        .await
    }

    async fn find_or_create_pull_request(&self, req: &NewPullRequest) -> ForgeResult<PullRequest> {
        let req = req.clone();
        self.blocking(move |f| f.find_or_create_pull_blocking(&req))
            .await
    }

    async fn get_pull_request(&self, number: u64) -> ForgeResult<PullRequest> {
        self.blocking(move |f| f.live_pull(&f.read_pull(number)?))
            .await
    }

    async fn checks(&self, sha: &str) -> ForgeResult<ChecksSummary> {
        let sha = sha.to_owned();
        self.blocking(move |f| f.check_summary(&sha)).await
    }

    async fn post_review(&self, number: u64, event: ReviewEvent, body: &str) -> ForgeResult<()> {
        let body = body.to_owned();
        self.blocking(move |f| {
            let _lock = f.lock()?;
            let mut record = f.read_pull(number)?;
            record.reviews.push(ReviewRecord {
                event,
                body,
                created_at: now(),
            });
            write_json(&f.pull_file(number), &record)
        })
        .await
    }

    async fn list_reviews(&self, number: u64) -> ForgeResult<Vec<Review>> {
        self.blocking(move |f| {
            Ok(f.read_pull(number)?
                .reviews
                .into_iter()
                .map(|r| Review {
                    event: r.event,
                    body: r.body,
                })
                .collect())
        })
        .await
    }

    fn watch_dir(&self) -> Option<PathBuf> {
        Some(self.dir.join("issues"))
    }

    async fn merge_pull_request(&self, number: u64, title: &str) -> ForgeResult<MergeOutcome> {
        let title = title.to_owned();
        self.blocking(move |f| f.merge_blocking(number, &title))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Slug;

    /// A checkout on `main` with a root commit, a second commit on `main`,
    /// and `agent/issue-1` forked from the root with one more file.
    fn repo_with_a_pull_request() -> (tempfile::TempDir, LocalForge, git2::Oid, git2::Oid) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("repo");
        let mut opts = git2::RepositoryInitOptions::new();
        opts.initial_head("main");
        let repo = Repository::init_opts(&path, &opts).unwrap();
        let sig = git2::Signature::now("T", "t@example.com").unwrap();
        let commit = |refname: &str, parent: Option<git2::Oid>, file: &str| {
            let mut tb = repo.treebuilder(None).unwrap();
            if let Some(p) = parent {
                tb = repo
                    .treebuilder(Some(&repo.find_commit(p).unwrap().tree().unwrap()))
                    .unwrap();
            }
            tb.insert(file, repo.blob(file.as_bytes()).unwrap(), 0o100644)
                .unwrap();
            let tree = repo.find_tree(tb.write().unwrap()).unwrap();
            let parents: Vec<git2::Commit<'_>> = parent
                .map(|p| repo.find_commit(p).unwrap())
                .into_iter()
                .collect();
            let parents: Vec<&git2::Commit<'_>> = parents.iter().collect();
            repo.commit(Some(refname), &sig, &sig, file, &tree, &parents)
                .unwrap()
        };
        let root = commit("refs/heads/main", None, "root.txt");
        commit("refs/heads/agent/issue-1", Some(root), "feature.txt");
        let moved = commit("refs/heads/main", Some(root), "other.txt");
        let layout = Layout {
            slug: Slug::new("repo").unwrap(),
            data_root: tmp.path().join("data"),
            worktree_base: tmp.path().join("wt"),
        };
        let forge = LocalForge::open(&layout, &path).unwrap();
        forge
            .find_or_create_pull_blocking(&NewPullRequest {
                head: "agent/issue-1".into(),
                base: "main".into(),
                title: "Fixes #1".into(),
                body: String::new(),
            })
            .unwrap();
        (tmp, forge, root, moved)
    }

    #[test]
    fn a_base_that_keeps_moving_fails_the_merge_for_later() {
        let (_tmp, forge, stale, moved) = repo_with_a_pull_request();
        let mut attempts = 0;
        let result = forge.merge_with(1, "Fixes #1", |_, _, _| {
            attempts += 1;
            Ok(stale)
        });
        match result {
            Err(e @ ForgeError::Transient(_)) => {
                assert!(
                    e.to_string()
                        .contains("main moved during each of 5 attempts to merge pull request #1"),
                    "{e}"
                );
            }
            other => panic!("expected a transient failure, got {other:?}"),
        }
        assert_eq!(attempts, MERGE_TRIES);
        let repo = forge.open_repo().unwrap();
        assert_eq!(repo.refname_to_id("refs/heads/main").unwrap(), moved);
        assert!(!forge.checkout_sync_file().exists());
        assert_eq!(forge.read_pull(1).unwrap().state, PullRequestState::Open);
        // With the real tip it merges.
        let outcome = forge.merge_blocking(1, "Fixes #1").unwrap();
        let merged = repo
            .find_commit(git2::Oid::from_str(&outcome.sha).unwrap())
            .unwrap();
        assert_eq!(merged.parent_id(0).unwrap(), moved);
    }
}
