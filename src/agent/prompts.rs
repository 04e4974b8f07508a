//! Stage prompts: built-in templates, overridable by files in
//! `agent.prompts_dir` named `<kind>.md`.
//!
//! Templates are Markdown with `{{name}}` placeholders: `repo`,
//! `issue_number`, `title`, `body`, `comments`, `plan`, `diff`, `feedback`,
//! `correction`, `branch`, `base_branch`. Substitution is one pass, so text
//! inside a value (an issue body that says `{{plan}}`) is never expanded;
//! unknown placeholders are left as written. Unset values render as
//! `(none)`, except `{{diff}}` and `{{body}}`, which render as empty.

use std::io;
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

impl PromptKind {
    /// Every prompt kind.
    pub const ALL: [PromptKind; 8] = [
        PromptKind::Triage,
        PromptKind::Plan,
        PromptKind::Implement,
        PromptKind::Review,
        PromptKind::ReviewFix,
        PromptKind::CiFix,
        PromptKind::ConflictFix,
        PromptKind::Hitl,
    ];

    /// The built-in template (`src/agent/prompts/<name>.md`).
    pub fn builtin(self) -> &'static str {
        match self {
            PromptKind::Triage => include_str!("prompts/triage.md"),
            PromptKind::Plan => include_str!("prompts/plan.md"),
            PromptKind::Implement => include_str!("prompts/implement.md"),
            PromptKind::Review => include_str!("prompts/review.md"),
            PromptKind::ReviewFix => include_str!("prompts/review-fix.md"),
            PromptKind::CiFix => include_str!("prompts/ci-fix.md"),
            PromptKind::ConflictFix => include_str!("prompts/conflict-fix.md"),
            PromptKind::Hitl => include_str!("prompts/hitl.md"),
        }
    }
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
    let template = match prompts_dir {
        Some(dir) => {
            let path = dir.join(format!("{}.md", kind.name()));
            match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) if e.kind() == io::ErrorKind::NotFound => kind.builtin().to_string(),
                Err(e) => {
                    return Err(AgentError::Io(io::Error::new(
                        e.kind(),
                        format!("cannot read prompt template {}: {e}", path.display()),
                    )));
                }
            }
        }
        None => kind.builtin().to_string(),
    };
    Ok(fill(&template, ctx))
}

/// The value of placeholder `name`, or `None` for an unknown name.
fn value(name: &str, ctx: &PromptContext) -> Option<String> {
    let or_none = |v: &Option<String>| match v.as_deref().map(str::trim) {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => "(none)".to_string(),
    };
    Some(match name {
        "repo" => ctx.repo.clone(),
        "issue_number" => ctx.issue_number.to_string(),
        "title" => ctx.title.clone(),
        "body" => ctx.body.trim().to_string(),
        "comments" => render_comments(ctx),
        "plan" => or_none(&ctx.plan),
        "diff" => ctx.diff.clone().unwrap_or_default(),
        "feedback" => or_none(&ctx.feedback),
        "correction" => or_none(&ctx.correction),
        "branch" => ctx.branch.clone(),
        "base_branch" => ctx.base_branch.clone(),
        _ => return None,
    })
}

/// Comments as Markdown: `**author** (time):` then the body, oldest first.
fn render_comments(ctx: &PromptContext) -> String {
    if ctx.comments.is_empty() {
        return "(none)".to_string();
    }
    ctx.comments
        .iter()
        .map(|c| format!("**{}** ({}):\n\n{}", c.author, c.created_at, c.body.trim()))
        .collect::<Vec<_>>()
        .join("\n\n---\n\n")
}

/// Replace every known `{{name}}` in `template` in one pass ([`crate::template`]).
fn fill(template: &str, ctx: &PromptContext) -> String {
    crate::template::fill(template, |name| value(name, ctx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> PromptContext {
        PromptContext {
            repo: "acme/widgets".into(),
            issue_number: 42,
            title: "Crash on empty input".into(),
            body: "It crashes. Mentions {{plan}} and {{nope}}.".into(),
            comments: vec![Comment {
                author: "alice".into(),
                body: "Still happens on 1.2".into(),
                created_at: "2025-01-02T03:04:05Z".into(),
            }],
            plan: Some("1. Guard the empty case".into()),
            diff: Some("+ if input.is_empty() { return }".into()),
            feedback: Some("Add a test".into()),
            correction: Some("Use a Result instead".into()),
            branch: "agent/issue-42".into(),
            base_branch: "main".into(),
        }
    }

    /// Every built-in template renders every placeholder and states its contract.
    #[test]
    fn builtins_render_and_state_the_contract() {
        let check = |kind: PromptKind, must: &[&str]| {
            let plain = PromptContext {
                body: "It crashes.".into(),
                ..ctx()
            };
            let text = render(kind, &plain, None).unwrap_or_else(|e| panic!("{kind:?}: {e}"));
            assert!(!text.contains("{{"), "{kind:?} left a placeholder:\n{text}");
            assert!(
                text.contains("#42") && text.contains("Crash on empty input"),
                "{kind:?}"
            );
            for m in must {
                assert!(text.contains(m), "{kind:?} lacks {m:?}:\n{text}");
            }
        };
        check(
            PromptKind::Triage,
            &[
                "\"ready\"",
                "\"reasons\"",
                "\"issue_type\"",
                "\"clarity_score\"",
                "\"complexity_score\"",
                "\"needs_discovery\"",
                "\"already_addressed\"",
                "Still happens on 1.2",
            ],
        );
        check(
            PromptKind::Plan,
            &[
                "PLAN_START",
                "PLAN_END",
                "SUMMARY:",
                "ALREADY_SATISFIED_START",
                "ALREADY_SATISFIED_END",
            ],
        );
        check(
            PromptKind::Implement,
            &["1. Guard the empty case", "git commit", "agent/issue-42"],
        );
        check(
            PromptKind::Review,
            &[
                "VERDICT:",
                "SUMMARY:",
                "APPROVE",
                "REQUEST_CHANGES",
                "COMMENT",
                "+ if input.is_empty()",
            ],
        );
        check(
            PromptKind::ReviewFix,
            &["Add a test", "git commit", "agent/issue-42"],
        );
        check(PromptKind::CiFix, &["Add a test", "git commit"]);
        check(PromptKind::ConflictFix, &["git merge main", "git commit"]);
        check(PromptKind::Hitl, &["Use a Result instead", "git commit"]);
        assert_eq!(PromptKind::ALL.len(), 8);
    }

    #[test]
    fn values_are_not_expanded_again() {
        let text = render(PromptKind::Triage, &ctx(), None).unwrap_or_default();
        assert!(
            text.contains("It crashes. Mentions {{plan}} and {{nope}}."),
            "{text}"
        );
    }

    #[test]
    fn fill_cases() {
        let c = PromptContext {
            title: "T".into(),
            ..PromptContext::default()
        };
        let check = |t: &str, e: &str| assert_eq!(fill(t, &c), e, "{t:?}");
        check("{{title}}", "T");
        check("{{ title }}!", "T!");
        check("{{unknown}} {{title}}", "{{unknown}} T");
        check("{{title", "{{title");
        check("{{plan}}|{{diff}}|{{comments}}", "(none)||(none)");
        check("{ {title}} {{{title}}}", "{ {title}} {T}");
    }

    #[test]
    fn override_file_replaces_builtin() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        std::fs::write(
            dir.path().join("plan.md"),
            "Custom plan for {{repo}}#{{issue_number}}",
        )?;
        assert_eq!(
            render(PromptKind::Plan, &ctx(), Some(dir.path()))?,
            "Custom plan for acme/widgets#42"
        );
        // No override for review: the built-in one.
        assert!(render(PromptKind::Review, &ctx(), Some(dir.path()))?.contains("VERDICT:"));
        // An override that cannot be read (a directory) is an error naming it.
        std::fs::create_dir(dir.path().join("triage.md"))?;
        let err = render(PromptKind::Triage, &ctx(), Some(dir.path()))
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("triage.md")),
            "{err:?}"
        );
        Ok(())
    }
}
