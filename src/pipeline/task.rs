//! One issue through one stage, from pick-up to where it goes next, and the
//! thin layer that carries out the failure policy's decisions.
//!
//! Pick-up, in order: (1) a journal a crash or a failed effect left is
//! carried out first, and the issue goes where it leads (no agent is run
//! again); (2) the issue is read afresh from the forge, so a delayed retry
//! or a stale queue entry never acts on an old copy; (3) its labels and its
//! record route it (to another stage's queue, to a human, out of the
//! pipeline, or away when another worker holds it); (4) the record is
//! claimed and the `hydraflow-in-progress` label added; (5) the stage runs.

use std::sync::Arc;
use std::time::Duration;

use super::context::Pipeline;
use super::decide::{Decision, Failure, decide};
use super::events::{ErrorEvent, PipelineEvent, WorkerUpdate};
use super::journal;
use super::labels::Route;
use super::stages::{self, Next};
use crate::agent::Stage;
use crate::forge::{Issue, IssueState, PullRequestState};
use crate::store::state::{After, Effect, HitlRecord, Phase};

/// Work `issue` in `stage`, then route it on; failures go through the policy.
pub(crate) async fn process(ctx: Arc<Pipeline>, stage: Stage, issue: Issue) {
    let n = issue.number;
    tracing::info!(repo_slug = %ctx.layout.slug, issue = n, stage = %stage, title = %issue.title, "stage started");
    ctx.publish(PipelineEvent::WorkerUpdate(WorkerUpdate::Started {
        issue: n,
        stage,
        title: issue.title.clone(),
    }));
    // The stage runs in its own task so a panic is caught and handled.
    let task_ctx = Arc::clone(&ctx);
    let copy = issue.clone();
    let inner = tokio::spawn(async move {
        let mut issue = issue;
        let result = work(&task_ctx, stage, &mut issue).await;
        (result, issue)
    });
    let _abort_on_drop = AbortOnDrop(inner.abort_handle());
    let (result, issue) = match inner.await {
        Ok(done) => done,
        Err(e) if e.is_panic() => (
            Err(Failure::Attempt(format!(
                "stage task panicked: {}",
                Pipeline::panic_message(e)
            ))),
            copy,
        ),
        Err(_) => return,
    };
    match result {
        Ok(next) => {
            tracing::info!(repo_slug = %ctx.layout.slug, issue = n, stage = %stage, next = ?next, "stage finished");
            ctx.publish(PipelineEvent::WorkerUpdate(WorkerUpdate::Finished {
                issue: n,
                stage,
                next: format!("{next:?}"),
            }));
            route(&ctx, stage, issue, next);
        }
        Err(failure) => handle_failure(&ctx, stage, issue, failure).await,
    }
}

/// Put the issue where `next` says.
fn route(ctx: &Pipeline, stage: Stage, issue: Issue, next: Next) {
    let n = issue.number;
    match next {
        Next::Stage(to) => {
            if to != stage {
                ctx.publish(PipelineEvent::PhaseChange {
                    issue: n,
                    from: stage,
                    to,
                });
            }
            ctx.store.hand_off(issue, to);
        }
        Next::Done => {
            ctx.store.finish(n);
            ctx.store.forget(n);
        }
        Next::WaitForHuman | Next::Skip => {
            ctx.store.finish(n);
            ctx.store.upsert(issue);
        }
        Next::Later(after) => ctx.delay(n, stage, after),
    }
}

/// Pick-up and the stage's work (see the module doc).
async fn work(ctx: &Pipeline, stage: Stage, issue: &mut Issue) -> Result<Next, Failure> {
    let n = issue.number;
    let record = ctx.state.issue(n);
    if record.journal.is_some() {
        *issue = ctx.forge.get_issue(n).await?.issue;
        let then = journal::resume(ctx, issue).await?;
        return Ok(Next::after(&then));
    }
    let detail = ctx.forge.get_issue(n).await?;
    ctx.forge_ok();
    *issue = detail.issue;
    if issue.state == IssueState::Closed {
        if record.is_held() {
            ctx.state.update_issue(n, |r| {
                if r.is_claimed() {
                    r.phase = Phase::Open;
                }
            })?;
        }
        return Err(Failure::Gone(format!("issue #{n} was closed")));
    }
    let held = record.is_held();
    if issue.labels.contains(&ctx.labels.names().in_progress) && !held {
        tracing::debug!(repo_slug = %ctx.layout.slug, issue = n, "another worker holds the issue");
        return Ok(Next::Skip);
    }
    let target = match ctx.labels.route(&issue.labels) {
        Route::Stage(s) => s,
        Route::HitlActive => Stage::Hitl,
        Route::WaitingForHuman if record.pending_hitl().is_some() => Stage::Hitl,
        Route::WaitingForHuman => {
            if record.hitl().is_none() {
                escalated_by_hand(ctx, n)?;
            }
            return Ok(Next::WaitForHuman);
        }
        Route::Ignore if record.is_claimed() => return released(ctx, stage, issue).await,
        Route::Ignore => return Ok(Next::Done),
    };
    if target != stage {
        return Ok(Next::Stage(target));
    }
    claim(ctx, stage, issue).await?;
    stages::run(ctx, stage, issue, detail.comments).await
}

/// Record the claim, then mark the issue `hydraflow-in-progress` (kept while
/// the issue moves between stages; removed when it leaves the pipeline). A
/// finished or escalated issue that a human labelled for a stage again
/// starts a new pass with fresh counters.
async fn claim(ctx: &Pipeline, stage: Stage, issue: &mut Issue) -> Result<(), Failure> {
    let n = issue.number;
    let record = ctx.state.issue(n);
    let applying = record.pending_hitl().is_some();
    let already = matches!(record.phase, Phase::Claimed { stage: s } if s == stage);
    if !applying && !already {
        ctx.state.update_issue(n, |r| {
            if matches!(r.phase, Phase::Done { .. } | Phase::WaitingForHuman { .. }) {
                r.reset_counters();
            }
            r.phase = Phase::Claimed { stage };
        })?;
    }
    let marker = ctx.labels.names().in_progress.clone();
    if !issue.labels.contains(&marker) {
        ctx.forge.add_label(n, &marker).await?;
        issue.labels.push(marker);
    }
    Ok(())
}

/// An issue this worker claimed whose labels took it out of the pipeline:
/// a merge whose ending a crash cut short is finished (label, close,
/// worktree); otherwise a human took it, and the claim is released.
async fn released(ctx: &Pipeline, stage: Stage, issue: &mut Issue) -> Result<Next, Failure> {
    let n = issue.number;
    if let Some(pr) = ctx.state.issue(n).pull_request
        && ctx.forge.get_pull_request(pr).await?.state == PullRequestState::Merged
    {
        return stages::finish_merged(ctx, issue, pr, stage).await;
    }
    let marker = ctx.labels.names().in_progress.clone();
    if issue.labels.contains(&marker) {
        ctx.forge.remove_label(n, &marker).await?;
        issue.labels.retain(|l| *l != marker);
    }
    ctx.state.update_issue(n, |r| r.phase = Phase::Open)?;
    Ok(Next::Done)
}

/// An issue labelled `hydraflow-hitl` outside HydraFlow: remember it as
/// escalated so `hydraflow hitl` can answer it.
pub(crate) fn escalated_by_hand(ctx: &Pipeline, n: u64) -> Result<(), Failure> {
    let label = ctx.labels.names().hitl.clone();
    let origin = ctx.labels.names().ready.clone();
    ctx.state.update_issue(n, |r| {
        if r.hitl().is_none() {
            r.phase = Phase::WaitingForHuman {
                hitl: HitlRecord {
                    origin,
                    stage: Stage::Hitl,
                    cause: format!("labelled {label} outside HydraFlow"),
                    escalated_at: chrono::Utc::now(),
                },
                pending: None,
            };
        }
    })?;
    Ok(())
}

/// Carry out the policy's decision on a failed stage.
pub(crate) async fn handle_failure(
    ctx: &Pipeline,
    stage: Stage,
    mut issue: Issue,
    failure: Failure,
) {
    let n = issue.number;
    // An attempt counts only when HydraFlow's own disk is sound: a failure
    // to write a transcript, a worktree or the local forge's files is never
    // the agent's fault.
    let failure = match failure {
        Failure::Attempt(cause) => match ctx.storage_fault() {
            Some(fault) => Failure::Storage(format!("{fault} (while: {cause})")),
            None => Failure::Attempt(cause),
        },
        other => other,
    };
    let record = ctx.state.issue(n);
    let decision = decide(&failure, &record, &ctx.policy());
    let mut event = ErrorEvent {
        issue: Some(n),
        stage: Some(stage),
        message: failure.cause().to_owned(),
        class: Some(failure.class()),
        ..ErrorEvent::default()
    };
    match decision {
        Decision::Drop => {
            tracing::info!(repo_slug = %ctx.layout.slug, issue = n, stage = %stage, cause = failure.cause(), "issue left the pipeline");
            if matches!(failure, Failure::Gone(_)) {
                // Deleted or closed: nothing of ours is left to do for it.
                let released = ctx.state.update_issue(n, |r| {
                    r.journal = None;
                    if r.is_claimed() {
                        r.phase = Phase::Open;
                    }
                });
                if let Err(e) = released {
                    tracing::warn!(repo_slug = %ctx.layout.slug, issue = n, error = %e, "cannot record that the issue left");
                }
                ctx.publish(PipelineEvent::Error(event));
            }
            ctx.store.finish(n);
            ctx.store.forget(n);
        }
        Decision::Later { after } => {
            tracing::warn!(repo_slug = %ctx.layout.slug, issue = n, stage = %stage, cause = failure.cause(), seconds = after.as_secs(), "will retry later");
            event.retry_in = Some(after.as_secs());
            ctx.publish(PipelineEvent::Error(event));
            ctx.delay(n, stage, after);
        }
        Decision::Pause(cause) => {
            ctx.publish(PipelineEvent::Error(event));
            ctx.pause(cause);
            ctx.delay(n, stage, Duration::ZERO);
        }
        Decision::Retry { attempts, after } => {
            if let Err(e) = ctx.state.update_issue(n, |r| r.attempts = attempts) {
                // Not counted: the disk is at fault, not the agent.
                let storage = Failure::from(e);
                tracing::error!(repo_slug = %ctx.layout.slug, issue = n, error = storage.cause(), "cannot record the attempt; pausing");
                if let Decision::Pause(cause) = decide(&storage, &record, &ctx.policy()) {
                    ctx.pause(cause);
                }
                ctx.delay(n, stage, Duration::ZERO);
                return;
            }
            tracing::warn!(repo_slug = %ctx.layout.slug, issue = n, stage = %stage, attempts, cause = failure.cause(), "attempt failed");
            event.attempts = Some(attempts);
            event.retry_in = Some(after.as_secs());
            ctx.publish(PipelineEvent::Error(event));
            ctx.delay(n, stage, after);
        }
        Decision::Escalate { cause, attempts } => {
            event.attempts = Some(attempts);
            ctx.publish(PipelineEvent::Error(event));
            match escalate(ctx, stage, &mut issue, &cause, attempts).await {
                Ok(next) => route(ctx, stage, issue, next),
                Err(f) => {
                    // The escalation is journalled: the retry finishes it,
                    // and its comment is posted once.
                    tracing::error!(repo_slug = %ctx.layout.slug, issue = n, error = f.cause(), "cannot finish the escalation; will retry");
                    let after = match &f {
                        Failure::Later { after, .. } => *after,
                        Failure::Storage(_) | Failure::Pause(_) => {
                            if let Decision::Pause(cause) = decide(&f, &record, &ctx.policy()) {
                                ctx.pause(cause);
                            }
                            Duration::ZERO
                        }
                        _ => ctx.poll_interval(),
                    };
                    ctx.delay(n, stage, after);
                }
            }
        }
    }
}

/// Send the issue to a human, recording where it came from and why: one
/// journal (label `hydraflow-hitl`, release, one comment).
async fn escalate(
    ctx: &Pipeline,
    stage: Stage,
    issue: &mut Issue,
    cause: &str,
    attempts: u32,
) -> Result<Next, Failure> {
    let n = issue.number;
    let record = ctx.state.issue(n);
    let hitl_label = ctx.labels.names().hitl.clone();
    let origin = match (record.hitl(), ctx.labels.current(&issue.labels)) {
        (Some(h), _) => h.origin.clone(),
        (None, Some(label)) if label != hitl_label => label,
        _ => ctx.labels.names().ready.clone(),
    };
    let hitl = HitlRecord {
        origin: origin.clone(),
        stage,
        cause: cause.to_owned(),
        escalated_at: chrono::Utc::now(),
    };
    tracing::warn!(repo_slug = %ctx.layout.slug, issue = n, stage = %stage, origin, cause, "escalated to a human");
    ctx.publish(PipelineEvent::HitlEscalation {
        issue: n,
        title: issue.title.clone(),
        stage,
        origin,
        cause: cause.to_owned(),
    });
    let key = format!("escalation-{}", record.journals + 1);
    let effects = vec![
        Effect::Swap { to: hitl_label },
        Effect::Release,
        Effect::Comment {
            key,
            body: format!(
                "HydraFlow escalated this issue to a human.\n\n- stage: {stage}\n- cause: {cause}\n\nSend a correction with `hydraflow hitl correct {n} \"…\"` (or `skip` / `close`)."
            ),
        },
    ];
    let then = After::Human { hitl };
    let then = journal::start(ctx, issue, stage, effects, then, |r| {
        r.attempts = attempts;
    })
    .await?;
    Ok(Next::after(&then))
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
