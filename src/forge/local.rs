//! The embedded local forge: issues and pull requests as one JSON file each
//! under `data_root/<slug>/forge/`, safe to change from the CLI while a
//! worker runs (atomic writes under a lock), and a real squash merge of
//! `agent/issue-<N>` into the base branch with git2.

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::{
    ChecksSummary, Forge, ForgeResult, Issue, IssueDetail, LabelSpec, MergeOutcome, NewPullRequest,
    PullRequest, ReviewEvent,
};
use crate::layout::Layout;

/// The local forge of one repository.
#[derive(Debug, Clone)]
pub struct LocalForge {
    dir: PathBuf,
    repo_path: PathBuf,
}

impl LocalForge {
    /// Open (creating) `layout.forge_dir()` for the checkout at `repo_path`.
    ///
    /// # Errors
    /// [`super::ForgeError::Local`] when the directory cannot be created.
    pub fn open(layout: &Layout, repo_path: &Path) -> ForgeResult<LocalForge> {
        let _ = (layout, repo_path);
        todo!("forge helper implements this")
    }

    /// File a new open issue.
    ///
    /// # Errors
    /// [`super::ForgeError::Local`] on I/O failure.
    pub fn create_issue(&self, title: &str, body: &str, labels: &[String]) -> ForgeResult<Issue> {
        let _ = (title, body, labels);
        todo!("forge helper implements this")
    }

    /// Every issue, open and closed, by number.
    ///
    /// # Errors
    /// [`super::ForgeError::Local`] on I/O failure.
    pub fn all_issues(&self) -> ForgeResult<Vec<Issue>> {
        todo!("forge helper implements this")
    }

    /// Every pull request, by number.
    ///
    /// # Errors
    /// [`super::ForgeError::Local`] on I/O failure.
    pub fn all_pull_requests(&self) -> ForgeResult<Vec<PullRequest>> {
        todo!("forge helper implements this")
    }

    /// The forge directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The checkout merges go into.
    pub fn repo_path(&self) -> &Path {
        &self.repo_path
    }
}

#[async_trait]
impl Forge for LocalForge {
    fn name(&self) -> &'static str {
        "local"
    }
    async fn list_issues(&self, labels: &[String]) -> ForgeResult<Vec<Issue>> {
        let _ = labels;
        todo!()
    }
    async fn get_issue(&self, number: u64) -> ForgeResult<IssueDetail> {
        let _ = number;
        todo!()
    }
    async fn add_label(&self, number: u64, label: &str) -> ForgeResult<()> {
        let _ = (number, label);
        todo!()
    }
    async fn remove_label(&self, number: u64, label: &str) -> ForgeResult<()> {
        let _ = (number, label);
        todo!()
    }
    async fn ensure_labels(&self, labels: &[LabelSpec]) -> ForgeResult<()> {
        let _ = labels;
        todo!()
    }
    async fn comment(&self, number: u64, body: &str) -> ForgeResult<()> {
        let _ = (number, body);
        todo!()
    }
    async fn close_issue(&self, number: u64) -> ForgeResult<()> {
        let _ = number;
        todo!()
    }
    async fn push_branch(&self, repo: &Path, branch: &str) -> ForgeResult<()> {
        let _ = (repo, branch);
        todo!()
    }
    async fn find_or_create_pull_request(&self, req: &NewPullRequest) -> ForgeResult<PullRequest> {
        let _ = req;
        todo!()
    }
    async fn get_pull_request(&self, number: u64) -> ForgeResult<PullRequest> {
        let _ = number;
        todo!()
    }
    async fn checks(&self, sha: &str) -> ForgeResult<ChecksSummary> {
        let _ = sha;
        todo!()
    }
    async fn post_review(&self, number: u64, event: ReviewEvent, body: &str) -> ForgeResult<()> {
        let _ = (number, event, body);
        todo!()
    }
    async fn merge_pull_request(&self, number: u64, title: &str) -> ForgeResult<MergeOutcome> {
        let _ = (number, title);
        todo!()
    }
}
