//! The embedded local forge: issues and pull requests as one JSON file each
//! under `data_root/<slug>/forge/`, safe to change from the CLI while a
//! worker runs (atomic writes under a lock), and a real squash merge of
//! `agent/issue-<N>` into the base branch with git2.
//!
//! On disk (all written atomically: temp file in the same directory, fsync,
//! rename, fsync of the directory):
//! - `issues/<N>.json`: number, title, body, labels, author, state,
//!   created_at, updated_at, comments `[{author, body, created_at}]`, closed_at;
//! - `pulls/<N>.json`: number, head, base, head_sha, title, body, state,
//!   merged_sha, reviews `[{event, body, created_at}]`, created_at;
//! - `labels.json`: the label registry `[{name, color, description}]`;
//! - `.lock`: every read-modify-write and number allocation holds an
//!   exclusive `flock` on it, so separate processes never lose an update.
//!
//! Issues and pull requests share one number sequence, like GitHub. Times are
//! RFC 3339 UTC. The async [`Forge`] methods run the blocking file and git
//! work on tokio's blocking pool; the inherent methods are blocking.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use git2::{BranchType, ErrorCode, Repository};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{
    ChecksState, ChecksSummary, Comment, Forge, ForgeError, ForgeResult, Issue, IssueDetail,
    IssueState, LabelSpec, MergeOutcome, NewPullRequest, PullRequest, PullRequestState, Review,
    ReviewEvent,
};
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
    let dir = path
        .parent()
        .ok_or_else(|| ForgeError::Local(format!("{} has no parent directory", path.display())))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .map_err(local_io("create a temporary file in", dir))?;
    serde_json::to_writer_pretty(&mut tmp, value)
        .map_err(|e| ForgeError::Local(format!("cannot write {}: {e}", path.display())))?;
    tmp.write_all(b"\n").map_err(local_io("write", path))?;
    tmp.as_file().sync_all().map_err(local_io("sync", path))?;
    tmp.persist(path)
        .map_err(|e| local_io("replace", path)(e.error))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(local_io("sync directory", dir))?;
    Ok(())
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

/// Whether `refname` is checked out in the main checkout or any valid worktree.
fn checked_out_anywhere(repo: &Repository, refname: &str) -> bool {
    let head_is = |r: &Repository| {
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
            .and_then(|wt| Repository::open_from_worktree(&wt).ok())
            .is_some_and(|r| head_is(&r))
    })
}

impl LocalForge {
    /// Open (creating) `layout.forge_dir()` for the checkout at `repo_path`.
    ///
    /// # Errors
    /// [`super::ForgeError::Local`] when the directory cannot be created.
    pub fn open(layout: &Layout, repo_path: &Path) -> ForgeResult<LocalForge> {
        let dir = layout.forge_dir();
        for d in [dir.join("issues"), dir.join("pulls")] {
            std::fs::create_dir_all(&d).map_err(local_io("create", &d))?;
        }
        Ok(LocalForge {
            dir,
            repo_path: repo_path.to_path_buf(),
        })
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

    fn merge_blocking(&self, number: u64, title: &str) -> ForgeResult<MergeOutcome> {
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
        let what = format!(
            "pull request #{number} ({} into {})",
            record.head, record.base
        );
        let head = branch_commit(&repo, &record.head)?;
        let base = branch_commit(&repo, &record.base)?;
        let mut index = repo
            .merge_commits(&base, &head, None)
            .map_err(local_git(format!("cannot merge {what}")))?;
        if index.has_conflicts() {
            let paths = conflict_paths(&index)?;
            return Err(ForgeError::MergeConflict(format!(
                "{what} conflicts in {}",
                paths.join(", ")
            )));
        }
        let tree_id = index
            .write_tree_to(&repo)
            .map_err(local_git(format!("cannot write the merged tree of {what}")))?;
        let message = match issue_of_head(&record.head) {
            Some(issue) => format!("{title}\n\nCloses #{issue}"),
            None => title.to_owned(),
        };

        // A restart between moving the base branch and recording the merge:
        // the base tip already is this squash commit.
        let already = base.tree_id() == tree_id && base.message().ok() == Some(message.as_str());
        let sha = if already {
            base.id()
        } else {
            let tree = repo
                .find_tree(tree_id)
                .map_err(local_git(format!("cannot read the merged tree of {what}")))?;
            let sig = crate::git::signature(&repo).map_err(local_git("cannot make a signature"))?;
            let commit = repo
                .commit(None, &sig, &sig, &message, &tree, &[&base])
                .map_err(local_git(format!(
                    "cannot commit the squash merge of {what}"
                )))?;
            let base_ref = format!("refs/heads/{}", record.base);
            // Update the main checkout first, with the SAFE strategy against
            // HEAD (still the old tip): libgit2 checks every path before
            // writing any, so local edits the merge would touch make it refuse
            // and leave both the files and the base branch as they were.
            if !repo.is_bare() && main_checkout_on(&repo, &base_ref) {
                let mut checkout = git2::build::CheckoutBuilder::new();
                checkout.safe();
                repo.checkout_tree(tree.as_object(), Some(&mut checkout))
                    .map_err(|e| {
                        ForgeError::Local(format!(
                            "cannot update the checkout at {} to the merge of {what}: {}; commit or stash local changes and merge again",
                            self.repo_path.display(),
                            e.message()
                        ))
                    })?;
            }
            repo.reference_matching(
                &base_ref,
                commit,
                true,
                base.id(),
                &format!("hydraflow: squash merge {what}"),
            )
            .map_err(local_git(format!(
                "cannot move {} to the merge of {what}",
                record.base
            )))?;
            commit
        };

        record.state = PullRequestState::Merged;
        record.merged_sha = Some(sha.to_string());
        record.head_sha = head.id().to_string();
        write_json(&self.pull_file(number), &record)?;

        let head_ref = format!("refs/heads/{}", record.head);
        if checked_out_anywhere(&repo, &head_ref) {
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
        let _ = sha;
        Ok(ChecksSummary {
            state: ChecksState::None,
            failures: Vec::new(),
        })
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
