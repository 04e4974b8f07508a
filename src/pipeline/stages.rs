//! The work of each stage on one issue (docs/design/pipeline.md). A stage reads, runs its
//! agent and decides; every outside side effect it then wants (labels,
//! comments, pushes, pull requests, reviews, merges, closes, worktree
//! removal) goes into a step journal that [`super::journal`] carries out,
//! so a crash after the decision never repeats the agent or the decision.
//!
//! What the stages record to resume without repeating work:
//! - a worktree is used only once its creation is recorded
//!   (`IssueRecord::worktree`); a directory without that record was left
//!   half-made by a crash and is made again;
//! - `implemented`: the implement agent finished and its work is committed,
//!   so a restart goes on to the quality check and the pull request;
//! - `approved_sha`: the review approved this head, so a restart (or the
//!   next look while CI runs) goes straight to the checks;
//! - `fix`: a fix round was decided (changes requested, red CI, conflict)
//!   and runs before anything else;
//! - `ci_wait_since`: waiting for CI is a state, not a sleeping task: the
//!   stage answers "look again later" and frees its permit.

use std::path::PathBuf;
use std::time::Duration;

use super::context::Pipeline;
use super::decide::{Failure, PauseCause, PauseKind, is_storage_io};
use super::events::{AgentActivity, MergeUpdate, PipelineEvent};
use super::journal;
use crate::agent::contract::{self, PlanResult, Verdict};
use crate::agent::parse::DisplayLine;
use crate::agent::prompts::{self, PromptContext, PromptKind};
use crate::agent::runner::{CallRequest, QualityOutcome, build_call};
use crate::agent::{AgentError, AgentFailure, AgentOutcome, Stage};
use crate::forge::{ChecksState, Comment, Issue, PullRequestState, ReviewEvent};
use crate::git::WorktreeInfo;
use crate::layout::Layout;
use crate::store::state::{After, Effect, FixKind, FixRound, HitlCommand, IssueRecord, Outcome};

/// Where an issue goes after a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Into this stage's queue.
    Stage(Stage),
    /// Out of the pipeline (merged, closed, parked, skipped).
    Done,
    /// Waiting for a human.
    WaitForHuman,
    /// The same stage again after this long, nothing counted (CI running).
    Later(Duration),
    /// Not this worker's to work (another worker holds it).
    Skip,
}

impl Next {
    /// Where a finished journal leads.
    pub fn after(then: &After) -> Next {
        match then {
            After::Stage { stage } => Next::Stage(*stage),
            After::Done { .. } => Next::Done,
            After::Human { .. } => Next::WaitForHuman,
        }
    }
}

/// Run `stage` on a claimed `issue` (its labels and state fresh from the
/// forge, `comments` its comments).
pub(crate) async fn run(
    ctx: &Pipeline,
    stage: Stage,
    issue: &mut Issue,
    comments: Vec<Comment>,
) -> Result<Next, Failure> {
    match stage {
        Stage::Triage => triage(ctx, issue, comments).await,
        Stage::Plan => plan(ctx, issue, comments).await,
        Stage::Implement => implement(ctx, issue).await,
        Stage::Review => review(ctx, issue).await,
        Stage::Hitl => hitl(ctx, issue).await,
    }
}

/// A comment marker key unique for the issue: `<what>-<journal number>`
/// (the number the next journal gets).
fn key(ctx: &Pipeline, n: u64, what: &str) -> String {
    format!("{what}-{}", ctx.state.issue(n).journals + 1)
}

fn prompt_context(ctx: &Pipeline, issue: &Issue, record: &IssueRecord) -> PromptContext {
    PromptContext {
        repo: ctx.repo_name.clone(),
        issue_number: issue.number,
        title: issue.title.clone(),
        body: issue.body.clone(),
        comments: Vec::new(),
        plan: std::fs::read_to_string(ctx.layout.plan_file(issue.number)).ok(),
        diff: None,
        feedback: None,
        correction: record.guidance.clone(),
        branch: Layout::branch_name(issue.number),
        base_branch: ctx.config.main_branch.clone(),
    }
}

/// Render `kind`, run the stage's agent in `cwd`, and classify a failed run.
async fn run_agent(
    ctx: &Pipeline,
    stage: Stage,
    kind: PromptKind,
    pctx: &PromptContext,
    cwd: PathBuf,
) -> Result<AgentOutcome, Failure> {
    let n = pctx.issue_number;
    let prompt =
        prompts::render(kind, pctx, ctx.config.agent.prompts_dir.as_deref()).map_err(|e| {
            Failure::Pause(PauseCause::new(
                PauseKind::AgentUnavailable,
                format!("cannot render the {} prompt: {e}", kind.name()),
            ))
        })?;
    let request = CallRequest {
        stage,
        issue: n,
        prompt,
        cwd,
        transcript_path: ctx
            .layout
            .logs_dir()
            .join(format!("{}-{n}.txt", stage.transcript_prefix())),
        timeout: Duration::from_secs(ctx.config.agent_timeout),
        extra_env: ctx.extra_agent_env.clone(),
    };
    let call = build_call(&ctx.config.agent, request).map_err(|e| agent_error(ctx, e))?;
    let over = crate::store::sessions::over_budget(
        &ctx.layout.agent_calls_file(),
        ctx.config.agent.daily_budget_usd,
        chrono::Utc::now(),
    );
    if let Some(f) = crate::agent::failure::budget_pause(over, ctx.config.agent.daily_budget_usd) {
        return Err(agent_failure(ctx, f));
    }
    ctx.publish(PipelineEvent::AgentActivity(AgentActivity::Started {
        issue: n,
        stage,
        prompt: kind.name(),
        program: call.argv.first().cloned(),
    }));
    let events = std::sync::Arc::clone(&ctx.events);
    let on_line = move |line: &DisplayLine| {
        super::events::publish(
            &events,
            PipelineEvent::TranscriptLine {
                issue: n,
                stage,
                kind: line.kind,
                line: line.text.clone(),
            },
        );
    };
    let result = ctx.runner.run(&call, &on_line).await;
    ctx.effect_done("agent").await;
    let outcome = result.map_err(|e| agent_error(ctx, e))?;
    // Every classification of the outcome is agent::failure's.
    let failure = outcome.failure();
    ctx.publish(PipelineEvent::AgentActivity(AgentActivity::Finished {
        issue: n,
        stage,
        exit_code: outcome.exit_code,
        timed_out: outcome.timed_out,
        outcome: failure.as_ref().map_or("success", AgentFailure::class),
        cause: failure.as_ref().map(|f| f.cause().to_string()),
        resources: outcome.resources,
        usage: outcome.usage,
        cost_usd: outcome.cost_usd,
        model: outcome.model.clone(),
    }));
    match failure {
        None => Ok(outcome),
        Some(f) => Err(agent_failure(ctx, f)),
    }
}

/// The pipeline's failure for an agent's ([`crate::agent::failure`]).
fn agent_failure(ctx: &Pipeline, f: AgentFailure) -> Failure {
    use crate::agent::PauseKind as Agent;
    match f {
        AgentFailure::Attempt { cause } => Failure::Attempt(cause),
        // The CLIs retry the model API themselves first; then the poll interval.
        AgentFailure::Later { cause, retry_after } => Failure::Later {
            cause,
            after: retry_after.unwrap_or_else(|| ctx.poll_interval()),
        },
        AgentFailure::Pause {
            reason,
            kind,
            until,
        } => Failure::Pause(PauseCause {
            reason,
            kind: match kind {
                Agent::Auth => PauseKind::AgentAuth,
                Agent::UsageLimit => PauseKind::UsageLimit,
                Agent::Budget => PauseKind::Budget,
                Agent::RootRefusal | Agent::MissingBinary | Agent::Config => {
                    PauseKind::AgentUnavailable
                }
            },
            until: until.map(|t| std::time::UNIX_EPOCH + Duration::from_secs(t)),
        }),
    }
}

/// An agent that could not run: its program is missing (pause), or
/// HydraFlow could not write its transcript (storage, never an attempt).
fn agent_error(ctx: &Pipeline, e: AgentError) -> Failure {
    match e {
        AgentError::Io(e) if is_storage_io(&e) => {
            Failure::Storage(format!("cannot write the agent's transcript: {e}"))
        }
        AgentError::Io(e) => match ctx.storage_fault() {
            Some(fault) => Failure::Storage(fault),
            None => agent_failure(ctx, AgentError::Io(e).failure()),
        },
        e => agent_failure(ctx, e.failure()),
    }
}

fn last_line(s: &str) -> String {
    let line = s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    line.chars().take(300).collect()
}

/// The issue's worktree: created (or made again, when a crash left it
/// half-made) unless its creation is recorded; recorded once made.
async fn worktree(ctx: &Pipeline, n: u64) -> Result<WorktreeInfo, Failure> {
    let record = ctx.state.issue(n);
    let path = ctx.layout.worktree_path(n);
    let recorded = record.worktree.as_deref() == Some(path.as_path());
    let wt = ctx.worktrees.create_or_resume(n, recorded).await?;
    if !recorded {
        ctx.effect_done("create_worktree").await;
        ctx.state.update_issue(n, |r| {
            r.worktree = Some(wt.path.clone());
            r.branch = Some(wt.branch.clone());
        })?;
    }
    Ok(wt)
}

/// Commit what the agent left uncommitted in the worktree.
async fn salvage(ctx: &Pipeline, n: u64) -> Result<(), Failure> {
    if ctx.worktrees.salvage(n).await?.is_some() {
        ctx.effect_done("salvage").await;
    }
    Ok(())
}

/// Close the issue as already done: comment, label fixed, close.
async fn close_as_satisfied(
    ctx: &Pipeline,
    issue: &mut Issue,
    stage: Stage,
    explanation: &str,
    destroy_worktree: bool,
) -> Result<Next, Failure> {
    let n = issue.number;
    let mut effects = Vec::new();
    if destroy_worktree {
        effects.push(Effect::DestroyWorktree {
            delete_branch: true,
        });
    }
    effects.extend([
        Effect::Comment {
            key: key(ctx, n, "satisfied"),
            body: format!(
                "HydraFlow found this issue already satisfied during {stage}:\n\n{explanation}"
            ),
        },
        Effect::Swap {
            to: ctx.labels.names().fixed.clone(),
        },
        Effect::Release,
        Effect::Close,
    ]);
    let then = After::Done {
        outcome: Outcome::AlreadySatisfied,
    };
    let then = journal::start(ctx, issue, stage, effects, then, |_| ()).await?;
    Ok(Next::after(&then))
}

/// Issue body and comments into the prompt context.
fn with_comments(
    ctx: &Pipeline,
    issue: &Issue,
    comments: Vec<Comment>,
) -> (PromptContext, IssueRecord) {
    let record = ctx.state.issue(issue.number);
    let mut pctx = prompt_context(ctx, issue, &record);
    pctx.comments = comments;
    (pctx, record)
}

async fn triage(
    ctx: &Pipeline,
    issue: &mut Issue,
    comments: Vec<Comment>,
) -> Result<Next, Failure> {
    let n = issue.number;
    let (pctx, _) = with_comments(ctx, issue, comments);
    let cwd = ctx.worktrees.repo_path().to_owned();
    let outcome = run_agent(ctx, Stage::Triage, PromptKind::Triage, &pctx, cwd).await?;
    let result = contract::parse_triage(&outcome.transcript)
        .map_err(|e| Failure::Attempt(format!("triage answer is not valid: {e}")))?;
    ctx.publish(PipelineEvent::TriageUpdate {
        issue: n,
        result: result.clone(),
    });
    if result.already_addressed {
        let why = result.reasons.join("; ");
        return close_as_satisfied(ctx, issue, Stage::Triage, &why, false).await;
    }
    let (effects, then) = if result.ready {
        (
            vec![Effect::Swap {
                to: ctx.labels.names().plan.clone(),
            }],
            After::Stage { stage: Stage::Plan },
        )
    } else {
        let reasons: String = result.reasons.iter().map(|r| format!("- {r}\n")).collect();
        (
            vec![
                Effect::Comment {
                    key: key(ctx, n, "parked"),
                    body: format!(
                        "HydraFlow needs more information before planning this issue:\n\n{reasons}\nAdd the details and label the issue `{}` again.",
                        ctx.labels.names().find
                    ),
                },
                Effect::Swap {
                    to: ctx.labels.names().parked.clone(),
                },
                Effect::Release,
            ],
            After::Done {
                outcome: Outcome::Parked,
            },
        )
    };
    let then = journal::start(ctx, issue, Stage::Triage, effects, then, |_| ()).await?;
    Ok(Next::after(&then))
}

async fn plan(ctx: &Pipeline, issue: &mut Issue, comments: Vec<Comment>) -> Result<Next, Failure> {
    let n = issue.number;
    let (mut pctx, _) = with_comments(ctx, issue, comments);
    pctx.plan = None;
    let cwd = ctx.worktrees.repo_path().to_owned();
    let outcome = run_agent(ctx, Stage::Plan, PromptKind::Plan, &pctx, cwd).await?;
    match contract::parse_plan(&outcome.transcript) {
        Ok(PlanResult::AlreadySatisfied { explanation }) => {
            close_as_satisfied(ctx, issue, Stage::Plan, &explanation, false).await
        }
        Ok(PlanResult::Plan { plan, summary }) => {
            let path = ctx.layout.plan_file(n);
            crate::store::atomic::write_atomic(&path, plan.as_bytes())
                .map_err(|e| Failure::Storage(format!("cannot write {}: {e}", path.display())))?;
            ctx.publish(PipelineEvent::PlannerUpdate {
                issue: n,
                summary,
                path,
            });
            let effects = vec![
                Effect::Comment {
                    key: key(ctx, n, "plan"),
                    body: format!("## Implementation Plan\n\n{plan}"),
                },
                Effect::Swap {
                    to: ctx.labels.names().ready.clone(),
                },
            ];
            let then = After::Stage {
                stage: Stage::Implement,
            };
            let then = journal::start(ctx, issue, Stage::Plan, effects, then, |_| ()).await?;
            Ok(Next::after(&then))
        }
        Err(e) => {
            let retries = ctx.state.update_issue(n, |r| {
                r.plan_retries += 1;
                r.plan_retries
            })?;
            if retries > ctx.config.escalation.plan_retries {
                Err(Failure::Escalate(format!(
                    "plan failed validation after {retries} tries: {e}"
                )))
            } else {
                Err(Failure::Later {
                    cause: format!("plan failed validation: {e}"),
                    after: Duration::ZERO,
                })
            }
        }
    }
}

/// Run the quality command in the worktree, if configured.
async fn quality_check(ctx: &Pipeline, cwd: &std::path::Path) -> Result<(), Failure> {
    let Some(command) = &ctx.config.quality_command else {
        return Ok(());
    };
    let timeout = Duration::from_secs(ctx.config.agent_timeout);
    match ctx.runner.run_quality(command, cwd, timeout).await {
        Ok(QualityOutcome::Passed) => Ok(()),
        Ok(QualityOutcome::TimedOut) => Err(Failure::Attempt(format!(
            "quality command {command:?} timed out after {} s",
            timeout.as_secs()
        ))),
        Ok(QualityOutcome::Failed { status, output }) => Err(Failure::Attempt(format!(
            "quality command {command:?} failed ({status}): {}",
            last_line(&output)
        ))),
        Err(e) => Err(Failure::Attempt(format!(
            "cannot run quality command {command:?}: {e}"
        ))),
    }
}

/// The effects that publish the branch and open its pull request.
fn publish_effects(ctx: &Pipeline, issue: &Issue) -> Vec<Effect> {
    let n = issue.number;
    let guidance = ctx.state.issue(n).guidance.unwrap_or_default();
    vec![
        Effect::Push,
        Effect::OpenPullRequest {
            title: format!("Fixes #{n}: {}", issue.title),
            body: format!(
                "Closes #{n}\n\nImplemented by HydraFlow from the plan on the issue.{}",
                if guidance.is_empty() {
                    String::new()
                } else {
                    format!("\n\nHuman guidance applied:\n\n{guidance}")
                }
            ),
        },
    ]
}

/// Publish the branch, open the pull request and label the issue for review.
async fn to_review(ctx: &Pipeline, issue: &mut Issue, stage: Stage) -> Result<Next, Failure> {
    let mut effects = publish_effects(ctx, issue);
    effects.push(Effect::Swap {
        to: ctx.labels.names().review.clone(),
    });
    let then = After::Stage {
        stage: Stage::Review,
    };
    let then = journal::start(ctx, issue, stage, effects, then, |r| {
        r.implemented = false;
        r.approved_sha = None;
        r.ci_wait_since = None;
        r.fix = None;
    })
    .await?;
    Ok(Next::after(&then))
}

async fn implement(ctx: &Pipeline, issue: &mut Issue) -> Result<Next, Failure> {
    let n = issue.number;
    // A forge that merges on its server leaves the local base behind: start
    // the branch from what was merged so far, or later pull requests conflict.
    ctx.forge
        .refresh_base(ctx.worktrees.repo_path(), &ctx.config.main_branch)
        .await?;
    let wt = worktree(ctx, n).await?;
    let record = ctx.state.issue(n);
    if !record.implemented {
        let pctx = prompt_context(ctx, issue, &record);
        let outcome = run_agent(
            ctx,
            Stage::Implement,
            PromptKind::Implement,
            &pctx,
            wt.path.clone(),
        )
        .await?;
        if let Some(explanation) = contract::already_satisfied(&outcome.transcript) {
            return close_as_satisfied(ctx, issue, Stage::Implement, &explanation, true).await;
        }
        salvage(ctx, n).await?;
        if ctx.worktrees.commits_ahead(n).await? == 0 {
            return Err(Failure::Escalate(
                "the implementation produced no diff: no commit on the branch".into(),
            ));
        }
        ctx.state.update_issue(n, |r| r.implemented = true)?;
    }
    if let Err(e) = quality_check(ctx, &wt.path).await {
        // The agent must run again to fix what the quality command found.
        ctx.state.update_issue(n, |r| r.implemented = false)?;
        return Err(e);
    }
    to_review(ctx, issue, Stage::Implement).await
}

/// Run the recorded fix round in the worktree, push, and send the issue
/// back to review.
async fn fix_round(ctx: &Pipeline, issue: &mut Issue, fix: FixRound) -> Result<Next, Failure> {
    let n = issue.number;
    let wt = worktree(ctx, n).await?;
    let record = ctx.state.issue(n);
    let mut pctx = prompt_context(ctx, issue, &record);
    pctx.feedback = Some(fix.feedback);
    let kind = match fix.kind {
        FixKind::ReviewFix => PromptKind::ReviewFix,
        FixKind::CiFix => PromptKind::CiFix,
        FixKind::ConflictFix => PromptKind::ConflictFix,
    };
    run_agent(ctx, Stage::Review, kind, &pctx, wt.path.clone()).await?;
    salvage(ctx, n).await?;
    quality_check(ctx, &wt.path).await?;
    let then = After::Stage {
        stage: Stage::Review,
    };
    let then = journal::start(ctx, issue, Stage::Review, vec![Effect::Push], then, |r| {
        r.fix = None;
        r.approved_sha = None;
        r.ci_wait_since = None;
    })
    .await?;
    Ok(Next::after(&then))
}

/// Count one more round of `what`; escalate once over `max`.
fn count_round(
    ctx: &Pipeline,
    n: u64,
    max: u32,
    what: &str,
    field: fn(&mut IssueRecord) -> &mut u32,
) -> Result<(), Failure> {
    let used = ctx.state.update_issue(n, |r| {
        let f = field(r);
        *f += 1;
        *f
    })?;
    if used > max {
        Err(Failure::Escalate(format!(
            "{what} {max} times without success"
        )))
    } else {
        Ok(())
    }
}

/// Decide a fix round (recorded first), then run it.
async fn decide_fix(
    ctx: &Pipeline,
    issue: &mut Issue,
    kind: FixKind,
    feedback: String,
) -> Result<Next, Failure> {
    let fix = FixRound { kind, feedback };
    let saved = fix.clone();
    ctx.state
        .update_issue(issue.number, |r| r.fix = Some(saved))?;
    fix_round(ctx, issue, fix).await
}

/// What follows a merge: label fixed, release, close, remove the worktree
/// and the branch.
fn merged_effects(ctx: &Pipeline) -> [Effect; 4] {
    [
        Effect::Swap {
            to: ctx.labels.names().fixed.clone(),
        },
        Effect::Release,
        Effect::Close,
        Effect::DestroyWorktree {
            delete_branch: true,
        },
    ]
}

/// The pull request was merged (by HydraFlow or a human): label fixed,
/// release, close, remove the worktree and branch.
pub(crate) async fn finish_merged(
    ctx: &Pipeline,
    issue: &mut Issue,
    pr: u64,
    stage: Stage,
) -> Result<Next, Failure> {
    let n = issue.number;
    ctx.publish(PipelineEvent::MergeUpdate(MergeUpdate::Merged {
        issue: n,
        pr,
        sha: None,
    }));
    let then = After::Done {
        outcome: Outcome::Merged,
    };
    let effects = merged_effects(ctx).to_vec();
    let then = journal::start(ctx, issue, stage, effects, then, |_| ()).await?;
    Ok(Next::after(&then))
}

fn closed_without_merging(pr: u64) -> Failure {
    Failure::Escalate(format!("pull request #{pr} was closed without merging"))
}

async fn review(ctx: &Pipeline, issue: &mut Issue) -> Result<Next, Failure> {
    let n = issue.number;
    let record = ctx.state.issue(n);
    if let Some(fix) = record.fix.clone() {
        return fix_round(ctx, issue, fix).await;
    }
    let pr_number = match record.pull_request {
        Some(p) => p,
        None if ctx.worktrees.commits_ahead(n).await? > 0 => {
            // A restart between the commit and the pull request (or an
            // issue labelled for review by hand).
            let effects = publish_effects(ctx, issue);
            let then = After::Stage {
                stage: Stage::Review,
            };
            journal::start(ctx, issue, Stage::Review, effects, then, |_| ()).await?;
            ctx.state
                .issue(n)
                .pull_request
                .ok_or_else(|| Failure::Attempt("no pull request was recorded".into()))?
        }
        None => {
            let polls = ctx.state.update_issue(n, |r| {
                r.no_pr_polls += 1;
                r.no_pr_polls
            })?;
            if polls >= ctx.config.escalation.no_pr_polls {
                return Err(Failure::Escalate(format!(
                    "labelled for review but no pull request after {polls} polls"
                )));
            }
            return Err(Failure::Later {
                cause: "no pull request yet".into(),
                after: ctx.poll_interval(),
            });
        }
    };
    let pr = ctx.forge.get_pull_request(pr_number).await?;
    match pr.state {
        PullRequestState::Merged => {
            return finish_merged(ctx, issue, pr_number, Stage::Review).await;
        }
        PullRequestState::Closed => return Err(closed_without_merging(pr_number)),
        PullRequestState::Open => {}
    }

    if record.approved_sha.as_deref() != Some(pr.head_sha.as_str()) {
        let mut pctx = prompt_context(ctx, issue, &record);
        pctx.diff = Some(ctx.worktrees.diff_against_base(n).await?);
        let cwd = if ctx.layout.worktree_path(n).is_dir() && record.worktree.is_some() {
            ctx.layout.worktree_path(n)
        } else {
            ctx.worktrees.repo_path().to_owned()
        };
        let outcome = run_agent(ctx, Stage::Review, PromptKind::Review, &pctx, cwd).await?;
        let verdict = contract::parse_review(&outcome.transcript)
            .map_err(|e| Failure::Attempt(format!("review answer is not valid: {e}")))?;
        ctx.publish(PipelineEvent::ReviewUpdate {
            issue: n,
            pr: pr_number,
            verdict: verdict.verdict,
            summary: verdict.summary.clone(),
        });
        let event = match verdict.verdict {
            Verdict::Approve => ReviewEvent::Approve,
            Verdict::RequestChanges => ReviewEvent::RequestChanges,
            Verdict::Comment => ReviewEvent::Comment,
        };
        let post = Effect::PostReview {
            pr: pr_number,
            event,
            body: verdict.summary.clone(),
            key: key(ctx, n, "review"),
        };
        let then = After::Stage {
            stage: Stage::Review,
        };
        if verdict.verdict == Verdict::RequestChanges {
            count_round(
                ctx,
                n,
                ctx.config.escalation.review_fix_rounds,
                "review requested changes",
                |r| &mut r.review_rounds,
            )?;
            let fix = FixRound {
                kind: FixKind::ReviewFix,
                feedback: verdict.feedback,
            };
            let saved = fix.clone();
            journal::start(ctx, issue, Stage::Review, vec![post], then, |r| {
                r.fix = Some(saved)
            })
            .await?;
            return fix_round(ctx, issue, fix).await;
        }
        let head = pr.head_sha.clone();
        journal::start(ctx, issue, Stage::Review, vec![post], then, |r| {
            r.approved_sha = Some(head);
            r.ci_wait_since = None;
        })
        .await?;
    }

    // CI: one look at the head's checks; while they run the stage frees
    // its permit and looks again after `ci_poll_interval`.
    let checks = ctx.forge.checks(&pr.head_sha).await?;
    ctx.publish(PipelineEvent::CiCheck {
        issue: n,
        pr: pr_number,
        sha: pr.head_sha.clone(),
        state: checks.state,
    });
    match checks.state {
        ChecksState::None | ChecksState::Success => {}
        ChecksState::Failure => {
            count_round(
                ctx,
                n,
                ctx.config.escalation.ci_fix_rounds,
                "CI failed",
                |r| &mut r.ci_fix_rounds,
            )?;
            return decide_fix(ctx, issue, FixKind::CiFix, checks.failures.join("\n")).await;
        }
        ChecksState::Pending => {
            let now = chrono::Utc::now();
            let Some(since) = ctx.state.issue(n).ci_wait_since else {
                ctx.state.update_issue(n, |r| r.ci_wait_since = Some(now))?;
                return Ok(Next::Later(Duration::from_secs(
                    ctx.config.ci_poll_interval,
                )));
            };
            let waited = (now - since).num_seconds().max(0) as u64;
            if waited >= ctx.config.ci_check_timeout {
                ctx.state.update_issue(n, |r| r.ci_wait_since = None)?;
                return Err(Failure::Attempt(format!(
                    "CI checks did not finish within {} s",
                    ctx.config.ci_check_timeout
                )));
            }
            return Ok(Next::Later(Duration::from_secs(
                ctx.config.ci_poll_interval,
            )));
        }
    }

    // Mergeability: the forge may still be computing it.
    let pr = ctx.forge.get_pull_request(pr_number).await?;
    match pr.state {
        PullRequestState::Merged => {
            return finish_merged(ctx, issue, pr_number, Stage::Review).await;
        }
        PullRequestState::Closed => return Err(closed_without_merging(pr_number)),
        PullRequestState::Open => {}
    }
    match pr.mergeable {
        None => Ok(Next::Later(Duration::from_secs(
            ctx.config.ci_poll_interval.min(10),
        ))),
        Some(false) => {
            let message = format!(
                "pull request #{pr_number} conflicts with {}",
                ctx.config.main_branch
            );
            // The conflict-fix agent merges the base branch: make it the forge's.
            ctx.forge
                .refresh_base(ctx.worktrees.repo_path(), &ctx.config.main_branch)
                .await?;
            ctx.publish(PipelineEvent::MergeUpdate(MergeUpdate::Conflict {
                issue: n,
                message: message.clone(),
            }));
            count_round(
                ctx,
                n,
                ctx.config.escalation.merge_conflict_fixes,
                &format!("merge conflict ({message}) fixed"),
                |r| &mut r.conflict_fixes,
            )?;
            decide_fix(ctx, issue, FixKind::ConflictFix, message).await
        }
        Some(true) => {
            let mut effects = vec![Effect::Merge {
                pr: pr_number,
                title: format!("Fixes #{n}: {}", issue.title),
            }];
            effects.extend(merged_effects(ctx));
            let then = After::Done {
                outcome: Outcome::Merged,
            };
            let then = journal::start(ctx, issue, Stage::Review, effects, then, |_| ()).await?;
            Ok(Next::after(&then))
        }
    }
}

async fn hitl(ctx: &Pipeline, issue: &mut Issue) -> Result<Next, Failure> {
    let n = issue.number;
    let record = ctx.state.issue(n);
    let hitl = record.hitl().cloned();
    let Some(command) = record.pending_hitl().cloned() else {
        // Resumed with `hydraflow-hitl-active` but nothing pending: wait for a human.
        let hitl = hitl.unwrap_or_else(|| crate::store::state::HitlRecord {
            origin: ctx.labels.names().ready.clone(),
            stage: Stage::Hitl,
            cause: "a correction was interrupted; send it again".into(),
            escalated_at: chrono::Utc::now(),
        });
        let effects = vec![
            Effect::Swap {
                to: ctx.labels.names().hitl.clone(),
            },
            Effect::Release,
        ];
        let then = After::Human { hitl };
        let then = journal::start(ctx, issue, Stage::Hitl, effects, then, |_| ()).await?;
        return Ok(Next::after(&then));
    };
    let origin = hitl
        .as_ref()
        .map_or_else(|| ctx.labels.names().ready.clone(), |h| h.origin.clone());
    match command {
        HitlCommand::Skip => {
            let effects = vec![
                Effect::Comment {
                    key: key(ctx, n, "skip"),
                    body: "HydraFlow: an operator took this issue out of the pipeline.".into(),
                },
                Effect::ClearLabels,
                Effect::Release,
            ];
            let then = After::Done {
                outcome: Outcome::Skipped,
            };
            let then = journal::start(ctx, issue, Stage::Hitl, effects, then, |_| ()).await?;
            ctx.publish(PipelineEvent::HitlUpdate(
                super::events::HitlUpdate::Skipped { issue: n },
            ));
            Ok(Next::after(&then))
        }
        HitlCommand::Close => {
            let effects = vec![
                Effect::Comment {
                    key: key(ctx, n, "close"),
                    body: "HydraFlow: an operator closed this issue.".into(),
                },
                Effect::ClearLabels,
                Effect::Release,
                Effect::Close,
                Effect::DestroyWorktree {
                    delete_branch: true,
                },
            ];
            let then = After::Done {
                outcome: Outcome::Closed,
            };
            let then = journal::start(ctx, issue, Stage::Hitl, effects, then, |_| ()).await?;
            ctx.publish(PipelineEvent::HitlUpdate(
                super::events::HitlUpdate::Closed { issue: n },
            ));
            Ok(Next::after(&then))
        }
        HitlCommand::Correct { text } => {
            let active = ctx.labels.names().hitl_active.clone();
            if !issue.labels.contains(&active) {
                // Idempotent, and the pending command in the record says
                // what is under way: a restart applies the correction again.
                issue.labels = ctx
                    .labels
                    .swap(ctx.forge.as_ref(), n, &issue.labels, &active)
                    .await?;
            }
            ctx.publish(PipelineEvent::HitlUpdate(
                super::events::HitlUpdate::Applying {
                    issue: n,
                    origin: origin.clone(),
                },
            ));
            let wt = worktree(ctx, n).await?;
            let mut pctx = prompt_context(ctx, issue, &record);
            pctx.correction = Some(text.clone());
            pctx.feedback = hitl.as_ref().map(|h| h.cause.clone());
            run_agent(ctx, Stage::Hitl, PromptKind::Hitl, &pctx, wt.path.clone()).await?;
            salvage(ctx, n).await?;
            let ahead = ctx.worktrees.commits_ahead(n).await?;
            let back_to_review = ahead > 0
                && (origin == ctx.labels.names().review || origin == ctx.labels.names().ready);
            let (mut effects, next) = if back_to_review {
                quality_check(ctx, &wt.path).await?;
                (publish_effects(ctx, issue), Stage::Review)
            } else {
                (Vec::new(), Stage::Implement)
            };
            effects.push(Effect::Swap {
                to: ctx.labels.of_stage(next).to_owned(),
            });
            let then = After::Stage { stage: next };
            let then = journal::start(ctx, issue, Stage::Hitl, effects, then, |r| {
                r.guidance = Some(text.clone());
                r.phase = crate::store::state::Phase::Claimed { stage: Stage::Hitl };
                r.reset_counters();
                r.implemented = false;
            })
            .await?;
            ctx.publish(PipelineEvent::HitlUpdate(
                super::events::HitlUpdate::Applied { issue: n, to: next },
            ));
            Ok(Next::after(&then))
        }
    }
}
