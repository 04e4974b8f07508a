//! Stage prompts: built-in templates, overridable by files in
//! `agent.prompts_dir` named `<kind>.md`.

use std::path::Path;

use super::AgentError;
use crate::forge::Comment;

/// Which prompt to render.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptKind {
    /// Triage: answer with the triage JSON object.
    Triage,
    /// Plan: answer with PLAN_START…PLAN_END (or ALREADY_SATISFIED_START…END).
    Plan,
    /// Implement the plan in the worktree and commit.
    Implement,
    /// Review the diff: VERDICT and SUMMARY.
    Review,
    /// Address review feedback in the worktree.
    ReviewFix,
    /// Fix failing CI in the worktree.
    CiFix,
    /// Merge the base branch into the worktree's branch and resolve conflicts.
    ConflictFix,
    /// Apply a human correction in the worktree.
    Hitl,
}

impl PromptKind {
    /// File name stem of the template (`triage`, `plan`, `implement`, `review`,
    /// `review-fix`, `ci-fix`, `conflict-fix`, `hitl`).
    pub fn name(self) -> &'static str {
        match self {
            PromptKind::Triage => "triage",
            PromptKind::Plan => "plan",
            PromptKind::Implement => "implement",
            PromptKind::Review => "review",
            PromptKind::ReviewFix => "review-fix",
            PromptKind::CiFix => "ci-fix",
            PromptKind::ConflictFix => "conflict-fix",
            PromptKind::Hitl => "hitl",
        }
    }
}

/// Everything a prompt may mention; unset parts render as empty.
#[derive(Debug, Clone, Default)]
pub struct PromptContext {
    /// `owner/name` or the slug.
    pub repo: String,
    /// Issue number.
    pub issue_number: u64,
    /// Issue title.
    pub title: String,
    /// Issue body.
    pub body: String,
    /// Issue comments.
    pub comments: Vec<Comment>,
    /// The saved plan.
    pub plan: Option<String>,
    /// The pull request diff (review).
    pub diff: Option<String>,
    /// Review feedback or CI failures for a fix round.
    pub feedback: Option<String>,
    /// A human correction.
    pub correction: Option<String>,
    /// The issue's branch.
    pub branch: String,
    /// The base branch.
    pub base_branch: String,
}

/// Render `kind` for `ctx`, from `prompts_dir/<name>.md` when that file
/// exists, else the built-in template.
///
/// # Errors
/// [`AgentError::Io`] when an override exists but cannot be read.
pub fn render(
    kind: PromptKind,
    ctx: &PromptContext,
    prompts_dir: Option<&Path>,
) -> Result<String, AgentError> {
    let _ = (kind, ctx, prompts_dir);
    todo!("agent helper implements this")
}
