//! The step journal's executor: carries out the outside side effects a
//! stage decided on ([`Journal`] in `state.json`), one at a time, recording
//! each before the next starts, so a crash at any instant is resumed
//! exactly where it stopped.
//!
//! The journal is written before its first effect; after each effect its
//! `done` count is advanced (together with what the effect produced, e.g. a
//! pull request number) in one atomic write. The effect in flight at a
//! crash is therefore known, and on resume it is repeated safely: label
//! swaps, pushes, "find or open" pull requests, merges (a merged pull
//! request is left alone), closes and worktree removal are idempotent;
//! comments and reviews carry a marker (`<!-- hydraflow:<key> -->`) that is
//! looked for before one whose step was in flight is posted again.

use super::context::Pipeline;
use super::decide::Failure;
use super::events::{MergeUpdate, PipelineEvent};
use crate::agent::Stage;
use crate::forge::{Issue, IssueState, NewPullRequest, PullRequestState};
use crate::layout::Layout;
use crate::store::state::{After, Effect, IssueRecord, Outcome, Phase, State};

/// The invisible marker appended to a comment or review with `key`.
pub fn marker(key: &str) -> String {
    format!("<!-- hydraflow:{key} -->")
}

/// `body` with its marker.
fn marked(body: &str, key: &str) -> String {
    format!("{body}\n\n{}", marker(key))
}

impl Effect {
    /// Short name for logs and the simulation's crash points.
    pub fn name(&self) -> &'static str {
        match self {
            Effect::Swap { .. } => "swap",
            Effect::ClearLabels => "clear_labels",
            Effect::Comment { .. } => "comment",
            Effect::Push => "push",
            Effect::OpenPullRequest { .. } => "open_pull_request",
            Effect::PostReview { .. } => "post_review",
            Effect::Merge { .. } => "merge",
            Effect::Close => "close",
            Effect::DestroyWorktree { .. } => "destroy_worktree",
            Effect::Release => "release",
        }
    }
}

/// Write a new journal of `effects` for the issue (with `change` applied to
/// its record in the same write), then carry it out.
///
/// # Errors
/// [`Failure::Storage`] when the journal cannot be written (nothing was
/// done then); else as [`resume`].
pub(crate) async fn start(
    ctx: &Pipeline,
    issue: &mut Issue,
    stage: Stage,
    effects: Vec<Effect>,
    then: After,
    change: impl FnOnce(&mut IssueRecord),
) -> Result<After, Failure> {
    ctx.state.update_issue(issue.number, |r| {
        change(r);
        r.start_journal(stage, effects, then);
    })?;
    run(ctx, issue, true).await
}

/// Carry out the rest of the issue's journal (after a crash, or after an
/// effect failed): the effect that was in flight is checked before it is
/// repeated. Returns where the issue goes; `issue` keeps the labels and
/// state the effects gave it.
///
/// # Errors
/// The failure of the effect that failed; the journal stays, so the next
/// call carries on from that effect. A merge the forge refuses drops the
/// journal (the review stage decides again from the forge's state).
pub(crate) async fn resume(ctx: &Pipeline, issue: &mut Issue) -> Result<After, Failure> {
    run(ctx, issue, false).await
}

async fn run(ctx: &Pipeline, issue: &mut Issue, fresh: bool) -> Result<After, Failure> {
    let n = issue.number;
    let mut check = !fresh;
    loop {
        let record = ctx.state.issue(n);
        let Some(journal) = record.journal else {
            return Err(Failure::Later {
                cause: format!("issue #{n} has no journal to carry out"),
                after: std::time::Duration::ZERO,
            });
        };
        let Some(effect) = journal.in_flight().cloned() else {
            let then = journal.then.clone();
            ctx.state.update(|s| finish(s, n, &then))?;
            return Ok(then);
        };
        let change = match apply(ctx, issue, &record.pull_request, &effect, check).await {
            Ok(change) => change,
            Err(Abort(failure)) => {
                ctx.state.update_issue(n, |r| r.journal = None)?;
                return Err(failure);
            }
            Err(Keep(failure)) => return Err(failure),
        };
        check = false;
        if matches!(effect, Effect::DestroyWorktree { .. }) {
            // Forge effects are reported by the forge (its fake, in the simulation).
            ctx.effect_done(effect.name()).await;
        }
        ctx.state.update_issue(n, |r| {
            if let Some(j) = &mut r.journal {
                j.done += 1;
            }
            if let Some(pr) = change.pull_request {
                r.pull_request = Some(pr);
            }
            if change.worktree_removed {
                r.worktree = None;
            }
            if change.branch_removed {
                r.branch = None;
            }
        })?;
    }
}

/// What an effect changed in the record.
#[derive(Default)]
struct Change {
    pull_request: Option<u64>,
    worktree_removed: bool,
    branch_removed: bool,
}

/// An effect's failure: keep the journal and try the effect again later, or
/// abort the journal.
enum EffectError {
    Keep(Failure),
    Abort(Failure),
}
use EffectError::{Abort, Keep};

impl From<Failure> for EffectError {
    fn from(e: Failure) -> EffectError {
        Keep(e)
    }
}

impl From<crate::forge::ForgeError> for EffectError {
    fn from(e: crate::forge::ForgeError) -> EffectError {
        Keep(e.into())
    }
}

async fn apply(
    ctx: &Pipeline,
    issue: &mut Issue,
    recorded_pr: &Option<u64>,
    effect: &Effect,
    check: bool,
) -> Result<Change, EffectError> {
    let n = issue.number;
    let mut change = Change::default();
    match effect {
        Effect::Swap { to } => {
            let from = ctx.labels.current(&issue.labels);
            issue.labels = ctx
                .labels
                .swap(ctx.forge.as_ref(), n, &issue.labels, to)
                .await?;
            tracing::info!(repo_slug = %ctx.layout.slug, issue = n, from = from.as_deref().unwrap_or(""), to = %to, "label swapped");
        }
        Effect::ClearLabels => {
            for label in ctx.labels.pipeline() {
                if issue.labels.contains(&label) {
                    ctx.forge.remove_label(n, &label).await?;
                    issue.labels.retain(|l| *l != label);
                }
            }
        }
        Effect::Comment { key, body } => {
            let posted = check && {
                let detail = ctx.forge.get_issue(n).await?;
                let m = marker(key);
                detail.comments.iter().any(|c| c.body.contains(&m))
            };
            if posted {
                tracing::info!(repo_slug = %ctx.layout.slug, issue = n, key, "comment already posted before a restart");
            } else {
                ctx.forge.comment(n, &marked(body, key)).await?;
            }
        }
        Effect::Push => {
            let branch = Layout::branch_name(n);
            let path = ctx.layout.worktree_path(n);
            let from = if path.is_dir() {
                path
            } else {
                ctx.worktrees.repo_path().to_owned()
            };
            ctx.forge.push_branch(&from, &branch).await?;
        }
        Effect::OpenPullRequest { title, body } => {
            let pr = ctx
                .forge
                .find_or_create_pull_request(&NewPullRequest {
                    head: Layout::branch_name(n),
                    base: ctx.config.main_branch.clone(),
                    title: title.clone(),
                    body: body.clone(),
                })
                .await?;
            if *recorded_pr != Some(pr.number) {
                ctx.publish(PipelineEvent::PrCreated {
                    issue: n,
                    pr: pr.number,
                    url: pr.url.clone(),
                    branch: pr.head.clone(),
                });
            }
            change.pull_request = Some(pr.number);
        }
        Effect::PostReview {
            pr,
            event,
            body,
            key,
        } => {
            let posted = check && {
                let m = marker(key);
                ctx.forge
                    .list_reviews(*pr)
                    .await?
                    .iter()
                    .any(|r| r.body.contains(&m))
            };
            if !posted {
                ctx.forge
                    .post_review(*pr, *event, &marked(body, key))
                    .await?;
            }
        }
        Effect::Merge { pr, title } => {
            let current = ctx.forge.get_pull_request(*pr).await?;
            let sha = match current.state {
                PullRequestState::Merged => None,
                PullRequestState::Closed => {
                    return Err(Abort(Failure::Escalate(format!(
                        "pull request #{pr} was closed without merging"
                    ))));
                }
                PullRequestState::Open => match ctx.forge.merge_pull_request(*pr, title).await {
                    Ok(outcome) => Some(outcome.sha),
                    Err(crate::forge::ForgeError::MergeConflict(message)) => {
                        return Err(Abort(Failure::Later {
                            cause: format!("merge conflict: {message}"),
                            after: ctx.poll_interval(),
                        }));
                    }
                    Err(crate::forge::ForgeError::Rejected(message)) => {
                        return Err(Abort(Failure::Attempt(format!(
                            "the forge refused to merge pull request #{pr}: {message}"
                        ))));
                    }
                    Err(e) => return Err(e.into()),
                },
            };
            ctx.publish(PipelineEvent::MergeUpdate(MergeUpdate::Merged {
                issue: n,
                pr: *pr,
                sha,
            }));
        }
        Effect::Close => {
            ctx.forge.close_issue(n).await?;
            issue.state = IssueState::Closed;
        }
        Effect::DestroyWorktree { delete_branch } => {
            match ctx.worktrees.destroy(n, *delete_branch).await {
                Ok(()) => {
                    change.worktree_removed = true;
                    change.branch_removed = *delete_branch;
                }
                // Garbage collection removes it later; nothing else depends on it.
                Err(e) => {
                    tracing::warn!(repo_slug = %ctx.layout.slug, issue = n, error = %e, "cannot remove the worktree; garbage collection will")
                }
            }
        }
        Effect::Release => {
            let marker = &ctx.labels.names().in_progress;
            if issue.labels.contains(marker) {
                ctx.forge.remove_label(n, marker).await?;
                issue.labels.retain(|l| l != marker);
            }
        }
    }
    Ok(change)
}

/// The journal is done: the record takes the phase it leads to.
fn finish(state: &mut State, n: u64, then: &After) {
    let r = state.issues.entry(n).or_default();
    r.journal = None;
    match then {
        After::Stage { stage } => r.phase = Phase::Claimed { stage: *stage },
        After::Done { outcome } => {
            r.phase = Phase::Done { outcome: *outcome };
            r.implemented = false;
            r.fix = None;
            r.approved_sha = None;
            r.ci_wait_since = None;
            state.session.issues_processed += 1;
            if matches!(outcome, Outcome::Merged | Outcome::AlreadySatisfied) {
                state.session.issues_succeeded += 1;
            }
        }
        After::Human { hitl } => {
            r.phase = Phase::WaitingForHuman {
                hitl: hitl.clone(),
                pending: None,
            };
            state.session.issues_failed += 1;
            state.session.issues_processed += 1;
        }
    }
}

/// The issues a crash or a stop left mid-way (a journal, or a claim), with
/// the stage to queue them in: queued at start, before the first poll.
pub(crate) fn pending_at_start(ctx: &Pipeline) -> Vec<(u64, Stage)> {
    ctx.state
        .snapshot()
        .issues
        .iter()
        .filter_map(|(n, r)| match (&r.journal, &r.phase) {
            (Some(j), _) => Some((*n, j.stage)),
            (None, Phase::Claimed { stage }) => Some((*n, *stage)),
            _ => None,
        })
        .collect()
}
