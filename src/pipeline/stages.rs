//! The work of each stage on one issue (spec §3), and what happens when it
//! fails: a retry that counts an attempt, an escalation to a human with its
//! origin and cause, a pause of the whole pipeline, or a delayed retry.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::orchestrator::Pipeline;
use crate::agent::contract::{self, PlanResult, Verdict};
use crate::agent::parse::DisplayLine;
use crate::agent::prompts::{self, PromptContext, PromptKind};
use crate::agent::runner::{CallRequest, build_call};
use crate::agent::{AgentOutcome, Stage};
use crate::forge::{
    ChecksState, ForgeError, Issue, IssueState, NewPullRequest, PullRequest, PullRequestState,
    ReviewEvent,
};
use crate::layout::Layout;
use crate::store::events::EventType;
use crate::store::state::{HitlCommand, HitlRecord, Outcome};

/// Where an issue goes after a stage succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Into this stage's queue.
    Stage(Stage),
    /// Out of the pipeline (merged, closed, parked, skipped).
    Done,
    /// Waiting for a human.
    WaitForHuman,
}

/// How a stage failed.
#[derive(Debug)]
pub(crate) enum StageError {
    /// Counts an attempt; escalates once attempts run out.
    Retry(String),
    /// Straight to a human.
    Escalate(String),
    /// Pause the pipeline (auth failure, usage limit); the issue is retried after.
    Pause {
        reason: String,
        duration: Duration,
        auth: bool,
    },
    /// Try again after `after` without counting an attempt (5xx, rate limit).
    Later { cause: String, after: Duration },
    /// The issue is gone (deleted, closed): drop it.
    Gone(String),
}

impl From<ForgeError> for StageError {
    fn from(e: ForgeError) -> Self {
        match e {
            ForgeError::Auth(m) => StageError::Pause {
                reason: format!("forge authentication failed: {m}"),
                duration: Duration::from_secs(60),
                auth: true,
            },
            ForgeError::RateLimited { retry_after } => StageError::Later {
                cause: "forge rate limit reached".into(),
                after: retry_after,
            },
            ForgeError::Transient(m) => StageError::Later {
                cause: format!("forge temporarily failed: {m}"),
                after: Duration::from_secs(30),
            },
            ForgeError::NotFound(m) => StageError::Gone(m),
            e @ (ForgeError::MergeConflict(_) | ForgeError::Rejected(_) | ForgeError::Local(_)) => {
                StageError::Retry(e.to_string())
            }
        }
    }
}

impl From<crate::git::GitError> for StageError {
    fn from(e: crate::git::GitError) -> Self {
        StageError::Retry(format!("git: {e}"))
    }
}

/// The outcome of a stage with the issue as the stage left it (labels
/// included), also on failure, so escalation sees the current labels.
type StageResult = Result<(Next, Issue), (StageError, Issue)>;

/// Run `stage` on `issue`.
pub(crate) async fn run(ctx: Arc<Pipeline>, stage: Stage, mut issue: Issue) -> StageResult {
    match run_inner(&ctx, stage, &mut issue).await {
        Ok(next) => Ok((next, issue)),
        Err(e) => Err((e, issue)),
    }
}

async fn run_inner(ctx: &Pipeline, stage: Stage, issue: &mut Issue) -> Result<Next, StageError> {
    let n = issue.number;
    claim(ctx, issue).await?;
    let next = match stage {
        Stage::Triage => triage(ctx, issue).await?,
        Stage::Plan => plan(ctx, issue).await?,
        Stage::Implement => implement(ctx, issue).await?,
        Stage::Review => review(ctx, issue).await?,
        Stage::Hitl => hitl(ctx, issue).await?,
    };
    ctx.state
        .update_issue(n, |r| r.interrupted = None)
        .map_err(store_err)?;
    Ok(next)
}

fn store_err(e: crate::store::StoreError) -> StageError {
    StageError::Later {
        cause: format!("cannot write state: {e}"),
        after: Duration::from_secs(30),
    }
}

/// Record the claim, then mark the issue `hydraflow-in-progress` (kept while
/// the issue moves between stages; removed when it leaves the pipeline).
async fn claim(ctx: &Pipeline, issue: &mut Issue) -> Result<(), StageError> {
    let n = issue.number;
    ctx.state
        .update_issue(n, |r| r.claimed = true)
        .map_err(store_err)?;
    let marker = &ctx.labels.names().in_progress;
    if !issue.labels.contains(marker) {
        ctx.forge.add_label(n, marker).await?;
        issue.labels.push(marker.clone());
    }
    Ok(())
}

/// The issue leaves the pipeline's hands: drop the marker and the claim.
async fn release(ctx: &Pipeline, issue: &mut Issue) -> Result<(), StageError> {
    let n = issue.number;
    let marker = ctx.labels.names().in_progress.clone();
    if issue.labels.contains(&marker) {
        ctx.forge.remove_label(n, &marker).await?;
        issue.labels.retain(|l| *l != marker);
    }
    ctx.state
        .update_issue(n, |r| r.claimed = false)
        .map_err(store_err)?;
    Ok(())
}

async fn swap(ctx: &Pipeline, issue: &mut Issue, new: &str) -> Result<(), StageError> {
    let from = ctx.labels.current(&issue.labels);
    issue.labels = ctx
        .labels
        .swap(ctx.forge.as_ref(), issue.number, &issue.labels, new)
        .await?;
    tracing::info!(
        repo_slug = %ctx.layout.slug,
        issue = issue.number,
        from = from.as_deref().unwrap_or(""),
        to = new,
        "label swapped"
    );
    Ok(())
}

fn prompt_context(ctx: &Pipeline, issue: &Issue) -> PromptContext {
    let record = ctx.state.issue(issue.number);
    PromptContext {
        repo: ctx.repo_name.clone(),
        issue_number: issue.number,
        title: issue.title.clone(),
        body: issue.body.clone(),
        comments: Vec::new(),
        plan: std::fs::read_to_string(ctx.layout.plan_file(issue.number)).ok(),
        diff: None,
        feedback: None,
        correction: record.guidance,
        branch: Layout::branch_name(issue.number),
        base_branch: ctx.config.main_branch.clone(),
    }
}

/// Render `kind`, run the stage's agent in `cwd`, and turn a failed run
/// into the right error.
async fn run_agent(
    ctx: &Pipeline,
    stage: Stage,
    kind: PromptKind,
    pctx: &PromptContext,
    cwd: PathBuf,
) -> Result<AgentOutcome, StageError> {
    let n = pctx.issue_number;
    let prompt =
        prompts::render(kind, pctx, ctx.config.agent.prompts_dir.as_deref()).map_err(|e| {
            StageError::Escalate(format!("cannot render the {} prompt: {e}", kind.name()))
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
    let call =
        build_call(&ctx.config.agent, request).map_err(|e| agent_stage_error(ctx, e.failure()))?;
    let budget = crate::store::sessions::over_budget(
        &ctx.layout.agent_calls_file(),
        ctx.config.agent.daily_budget_usd,
        chrono::Utc::now(),
    );
    if let Some(f) = crate::agent::failure::budget_pause(budget, ctx.config.agent.daily_budget_usd)
    {
        return Err(agent_stage_error(ctx, f));
    }
    ctx.publish(
        EventType::AgentActivity,
        json!({"issue": n, "stage": stage, "status": "started", "prompt": kind.name(), "program": call.argv.first()}),
    );
    let events = Arc::clone(&ctx.events);
    let on_line = move |line: &DisplayLine| {
        events.publish(
            EventType::TranscriptLine,
            json!({"issue": n, "stage": stage, "kind": line.kind, "line": line.text}),
        );
    };
    let outcome = ctx
        .runner
        .run(&call, &on_line)
        .await
        .map_err(|e| agent_stage_error(ctx, e.failure()))?;
    let failure = outcome.failure();
    ctx.publish(
        EventType::AgentActivity,
        json!({"issue": n, "stage": stage, "status": "finished", "exit_code": outcome.exit_code, "timed_out": outcome.timed_out,
               "outcome": failure.as_ref().map_or("success", |f| f.class()), "cause": failure.as_ref().map(|f| f.cause()),
               "resources": outcome.resources, "usage": outcome.usage, "cost_usd": outcome.cost_usd, "model": outcome.model}),
    );
    match failure {
        None => Ok(outcome),
        Some(f) => Err(agent_stage_error(ctx, f)),
    }
}

/// The stage error of an agent failure ([`crate::agent::failure`]).
fn agent_stage_error(ctx: &Pipeline, f: crate::agent::AgentFailure) -> StageError {
    use crate::agent::{AgentFailure, PauseKind};
    match f {
        AgentFailure::Attempt { cause } => StageError::Retry(cause),
        // The CLIs retry the model API themselves first; then the poll interval.
        AgentFailure::Later { cause, retry_after } => StageError::Later {
            cause,
            after: retry_after.unwrap_or_else(|| ctx.poll_interval()),
        },
        AgentFailure::Pause {
            reason,
            kind,
            until,
        } => {
            let now = chrono::Utc::now().timestamp().max(0) as u64;
            let duration = match (kind, until) {
                (_, Some(t)) => Duration::from_secs(t.saturating_sub(now).clamp(1, 24 * 3600)),
                (PauseKind::UsageLimit, None) => Duration::from_secs(3600),
                // The next call after the pause probes; repeats back off.
                _ => ctx.poll_interval(),
            };
            StageError::Pause {
                reason,
                duration,
                auth: !matches!(kind, PauseKind::UsageLimit | PauseKind::Budget),
            }
        }
    }
}

fn last_line(s: &str) -> String {
    let line = s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    line.chars().take(300).collect()
}

/// Close the issue as already done: comment, label fixed, close.
async fn close_as_satisfied(
    ctx: &Pipeline,
    issue: &mut Issue,
    stage: Stage,
    explanation: &str,
) -> Result<Next, StageError> {
    let n = issue.number;
    ctx.forge
        .comment(
            n,
            &format!(
                "HydraFlow found this issue already satisfied during {stage}:\n\n{explanation}"
            ),
        )
        .await?;
    let fixed = ctx.labels.names().fixed.clone();
    swap(ctx, issue, &fixed).await?;
    release(ctx, issue).await?;
    ctx.forge.close_issue(n).await?;
    issue.state = IssueState::Closed;
    finish(ctx, n, Outcome::AlreadySatisfied)?;
    Ok(Next::Done)
}

fn finish(ctx: &Pipeline, n: u64, outcome: Outcome) -> Result<(), StageError> {
    ctx.state
        .update(|s| {
            let r = s.issues.entry(n).or_default();
            r.outcome = Some(outcome);
            r.claimed = false;
            r.hitl = None;
            r.pending_hitl = None;
            r.worktree = None;
            s.session.issues_processed += 1;
            if matches!(outcome, Outcome::Merged | Outcome::AlreadySatisfied) {
                s.session.issues_succeeded += 1;
            }
        })
        .map_err(store_err)
}

/// The prompt context with the issue's current body and comments from the
/// forge; a closed issue has left the pipeline.
async fn context_with_comments(ctx: &Pipeline, issue: &Issue) -> Result<PromptContext, StageError> {
    let n = issue.number;
    let detail = ctx.forge.get_issue(n).await?;
    if detail.issue.state == IssueState::Closed {
        return Err(StageError::Gone(format!("issue #{n} was closed")));
    }
    let mut pctx = prompt_context(ctx, issue);
    pctx.body = detail.issue.body;
    pctx.comments = detail.comments;
    Ok(pctx)
}

async fn triage(ctx: &Pipeline, issue: &mut Issue) -> Result<Next, StageError> {
    let n = issue.number;
    let pctx = context_with_comments(ctx, issue).await?;
    let outcome = run_agent(
        ctx,
        Stage::Triage,
        PromptKind::Triage,
        &pctx,
        ctx.worktrees.repo_path().to_owned(),
    )
    .await?;
    let result = contract::parse_triage(&outcome.transcript)
        .map_err(|e| StageError::Retry(format!("triage answer is not valid: {e}")))?;
    ctx.publish(
        EventType::TriageUpdate,
        json!({"issue": n, "result": result}),
    );
    if result.already_addressed {
        let why = result.reasons.join("; ");
        return close_as_satisfied(ctx, issue, Stage::Triage, &why).await;
    }
    if !result.ready {
        let reasons: String = result.reasons.iter().map(|r| format!("- {r}\n")).collect();
        ctx.forge
            .comment(
                n,
                &format!(
                    "HydraFlow needs more information before planning this issue:\n\n{reasons}\nAdd the details and label the issue `{}` again.",
                    ctx.labels.names().find
                ),
            )
            .await?;
        let parked = ctx.labels.names().parked.clone();
        swap(ctx, issue, &parked).await?;
        release(ctx, issue).await?;
        finish(ctx, n, Outcome::Parked)?;
        return Ok(Next::Done);
    }
    let plan = ctx.labels.names().plan.clone();
    swap(ctx, issue, &plan).await?;
    Ok(Next::Stage(Stage::Plan))
}

async fn plan(ctx: &Pipeline, issue: &mut Issue) -> Result<Next, StageError> {
    let n = issue.number;
    let mut pctx = context_with_comments(ctx, issue).await?;
    pctx.plan = None;
    let outcome = run_agent(
        ctx,
        Stage::Plan,
        PromptKind::Plan,
        &pctx,
        ctx.worktrees.repo_path().to_owned(),
    )
    .await?;
    match contract::parse_plan(&outcome.transcript) {
        Ok(PlanResult::AlreadySatisfied { explanation }) => {
            close_as_satisfied(ctx, issue, Stage::Plan, &explanation).await
        }
        Ok(PlanResult::Plan { plan, summary }) => {
            let path = ctx.layout.plan_file(n);
            crate::store::atomic::write_atomic(&path, plan.as_bytes()).map_err(|e| {
                StageError::Later {
                    cause: format!("cannot write {}: {e}", path.display()),
                    after: Duration::from_secs(30),
                }
            })?;
            ctx.forge
                .comment(n, &format!("## Implementation Plan\n\n{plan}"))
                .await?;
            ctx.publish(
                EventType::PlannerUpdate,
                json!({"issue": n, "summary": summary, "path": path}),
            );
            let ready = ctx.labels.names().ready.clone();
            swap(ctx, issue, &ready).await?;
            Ok(Next::Stage(Stage::Implement))
        }
        Err(e) => {
            let retries = ctx
                .state
                .update_issue(n, |r| {
                    r.plan_retries += 1;
                    r.plan_retries
                })
                .map_err(store_err)?;
            if retries > ctx.config.escalation.plan_retries {
                Err(StageError::Escalate(format!(
                    "plan failed validation after {retries} tries: {e}"
                )))
            } else {
                Err(StageError::Later {
                    cause: format!("plan failed validation: {e}"),
                    after: Duration::ZERO,
                })
            }
        }
    }
}

/// Run the quality command in the worktree, if configured.
async fn quality_check(ctx: &Pipeline, cwd: &std::path::Path) -> Result<(), StageError> {
    let Some(command) = &ctx.config.quality_command else {
        return Ok(());
    };
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(ctx.config.agent_timeout), cmd.output())
        .await
        .map_err(|_| StageError::Retry(format!("quality command {command:?} timed out")))?
        .map_err(|e| StageError::Retry(format!("cannot run quality command {command:?}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        let text = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        Err(StageError::Retry(format!(
            "quality command {command:?} failed ({}): {}",
            out.status,
            last_line(&text)
        )))
    }
}

/// Push the branch and find or open its pull request.
async fn publish_branch(ctx: &Pipeline, issue: &Issue) -> Result<PullRequest, StageError> {
    let n = issue.number;
    let branch = Layout::branch_name(n);
    let path = ctx.layout.worktree_path(n);
    ctx.forge.push_branch(&path, &branch).await?;
    let summary = ctx.state.issue(n).guidance.unwrap_or_default();
    let pr = ctx
        .forge
        .find_or_create_pull_request(&NewPullRequest {
            head: branch,
            base: ctx.config.main_branch.clone(),
            title: format!("Fixes #{n}: {}", issue.title),
            body: format!(
                "Closes #{n}\n\nImplemented by HydraFlow from the plan on the issue.{}",
                if summary.is_empty() {
                    String::new()
                } else {
                    format!("\n\nHuman guidance applied:\n\n{summary}")
                }
            ),
        })
        .await?;
    let known = ctx.state.issue(n).pull_request == Some(pr.number);
    ctx.state
        .update_issue(n, |r| r.pull_request = Some(pr.number))
        .map_err(store_err)?;
    if !known {
        ctx.publish(
            EventType::PrCreated,
            json!({"issue": n, "pr": pr.number, "url": pr.url, "branch": pr.head}),
        );
    }
    Ok(pr)
}

async fn implement(ctx: &Pipeline, issue: &mut Issue) -> Result<Next, StageError> {
    let n = issue.number;
    // A forge that merges on its server leaves the local base behind: start
    // the branch from what was merged so far, or later pull requests conflict.
    ctx.forge
        .refresh_base(ctx.worktrees.repo_path(), &ctx.config.main_branch)
        .await?;
    let wt = ctx.worktrees.create_or_resume(n).await?;
    ctx.state
        .update_issue(n, |r| {
            r.worktree = Some(wt.path.clone());
            r.branch = Some(wt.branch.clone());
        })
        .map_err(store_err)?;
    let pctx = prompt_context(ctx, issue);
    let outcome = run_agent(
        ctx,
        Stage::Implement,
        PromptKind::Implement,
        &pctx,
        wt.path.clone(),
    )
    .await?;
    if let Some(explanation) = contract::already_satisfied(&outcome.transcript) {
        ctx.worktrees.destroy(n, true).await?;
        return close_as_satisfied(ctx, issue, Stage::Implement, &explanation).await;
    }
    ctx.worktrees.salvage(n).await?;
    if ctx.worktrees.commits_ahead(n).await? == 0 {
        return Err(StageError::Escalate(
            "the implementation produced no diff: no commit on the branch".into(),
        ));
    }
    quality_check(ctx, &wt.path).await?;
    publish_branch(ctx, issue).await?;
    let review = ctx.labels.names().review.clone();
    swap(ctx, issue, &review).await?;
    Ok(Next::Stage(Stage::Review))
}

/// Run a fix round in the worktree, push, and send the issue back to review.
async fn fix_round(
    ctx: &Pipeline,
    issue: &Issue,
    kind: PromptKind,
    feedback: String,
) -> Result<Next, StageError> {
    let n = issue.number;
    let wt = ctx.worktrees.create_or_resume(n).await?;
    let mut pctx = prompt_context(ctx, issue);
    pctx.feedback = Some(feedback);
    run_agent(ctx, Stage::Review, kind, &pctx, wt.path.clone()).await?;
    ctx.worktrees.salvage(n).await?;
    quality_check(ctx, &wt.path).await?;
    ctx.forge.push_branch(&wt.path, &wt.branch).await?;
    Ok(Next::Stage(Stage::Review))
}

/// Count one more round of `what`; escalate once over `max`.
fn count_round(
    ctx: &Pipeline,
    n: u64,
    max: u32,
    what: &str,
    field: fn(&mut crate::store::state::IssueRecord) -> &mut u32,
) -> Result<(), StageError> {
    let used = ctx
        .state
        .update_issue(n, |r| {
            let f = field(r);
            *f += 1;
            *f
        })
        .map_err(store_err)?;
    if used > max {
        Err(StageError::Escalate(format!(
            "{what} {max} times without success"
        )))
    } else {
        Ok(())
    }
}

async fn review(ctx: &Pipeline, issue: &mut Issue) -> Result<Next, StageError> {
    let n = issue.number;
    let record = ctx.state.issue(n);
    let pr_number = match record.pull_request {
        Some(p) => p,
        None if ctx.worktrees.commits_ahead(n).await? > 0 => {
            publish_branch(ctx, issue).await?.number
        }
        None => {
            let polls = ctx
                .state
                .update_issue(n, |r| {
                    r.no_pr_polls += 1;
                    r.no_pr_polls
                })
                .map_err(store_err)?;
            if polls >= ctx.config.escalation.no_pr_polls {
                return Err(StageError::Escalate(format!(
                    "labelled for review but no pull request after {polls} polls"
                )));
            }
            return Err(StageError::Later {
                cause: "no pull request yet".into(),
                after: ctx.poll_interval(),
            });
        }
    };
    let pr = ctx.forge.get_pull_request(pr_number).await?;
    match pr.state {
        PullRequestState::Merged => return merged(ctx, issue, pr_number, None).await,
        PullRequestState::Closed => return Err(closed_without_merging(pr_number)),
        PullRequestState::Open => {}
    }

    let mut pctx = prompt_context(ctx, issue);
    pctx.diff = Some(ctx.worktrees.diff_against_base(n).await?);
    let cwd = if ctx.layout.worktree_path(n).exists() {
        ctx.layout.worktree_path(n)
    } else {
        ctx.worktrees.repo_path().to_owned()
    };
    let outcome = run_agent(ctx, Stage::Review, PromptKind::Review, &pctx, cwd).await?;
    let verdict = contract::parse_review(&outcome.transcript)
        .map_err(|e| StageError::Retry(format!("review answer is not valid: {e}")))?;
    let event = match verdict.verdict {
        Verdict::Approve => ReviewEvent::Approve,
        Verdict::RequestChanges => ReviewEvent::RequestChanges,
        Verdict::Comment => ReviewEvent::Comment,
    };
    ctx.forge
        .post_review(pr_number, event, &verdict.summary)
        .await?;
    ctx.publish(
        EventType::ReviewUpdate,
        json!({"issue": n, "pr": pr_number, "verdict": verdict.verdict, "summary": verdict.summary}),
    );
    if verdict.verdict == Verdict::RequestChanges {
        count_round(
            ctx,
            n,
            ctx.config.escalation.review_fix_rounds,
            "review requested changes",
            |r| &mut r.review_rounds,
        )?;
        return fix_round(ctx, issue, PromptKind::ReviewFix, verdict.feedback).await;
    }

    // CI: poll the head's checks until they settle.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(ctx.config.ci_check_timeout);
    loop {
        // A human may close or merge the pull request at any time.
        let pr = ctx.forge.get_pull_request(pr_number).await?;
        match pr.state {
            PullRequestState::Merged => return merged(ctx, issue, pr_number, None).await,
            PullRequestState::Closed => return Err(closed_without_merging(pr_number)),
            PullRequestState::Open => {}
        }
        let checks = ctx.forge.checks(&pr.head_sha).await?;
        ctx.publish(
            EventType::CiCheck,
            json!({"issue": n, "pr": pr_number, "sha": pr.head_sha, "state": checks.state}),
        );
        match checks.state {
            ChecksState::None | ChecksState::Success => break,
            ChecksState::Failure => {
                count_round(
                    ctx,
                    n,
                    ctx.config.escalation.ci_fix_rounds,
                    "CI failed",
                    |r| &mut r.ci_fix_rounds,
                )?;
                return fix_round(ctx, issue, PromptKind::CiFix, checks.failures.join("\n")).await;
            }
            ChecksState::Pending => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(StageError::Retry(format!(
                        "CI checks did not finish within {} s",
                        ctx.config.ci_check_timeout
                    )));
                }
                tokio::time::sleep(Duration::from_secs(ctx.config.ci_poll_interval)).await;
            }
        }
    }

    // Mergeability: the forge may still be computing it.
    let mut mergeable = None;
    for attempt in 0..5u32 {
        let pr = ctx.forge.get_pull_request(pr_number).await?;
        match pr.state {
            PullRequestState::Merged => return merged(ctx, issue, pr_number, None).await,
            PullRequestState::Closed => return Err(closed_without_merging(pr_number)),
            PullRequestState::Open => {}
        }
        mergeable = pr.mergeable;
        if mergeable.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500 * 2u64.pow(attempt))).await;
    }
    if mergeable == Some(false) {
        return conflict(
            ctx,
            issue,
            format!(
                "pull request #{pr_number} conflicts with {}",
                ctx.config.main_branch
            ),
        )
        .await;
    }
    match ctx
        .forge
        .merge_pull_request(pr_number, &format!("Fixes #{n}: {}", issue.title))
        .await
    {
        Ok(outcome) => merged(ctx, issue, pr_number, Some(outcome.sha)).await,
        Err(ForgeError::MergeConflict(m)) => conflict(ctx, issue, m).await,
        Err(e) => Err(e.into()),
    }
}

/// A pull request closed by someone else: a human decides what next.
fn closed_without_merging(pr_number: u64) -> StageError {
    StageError::Escalate(format!(
        "pull request #{pr_number} was closed without merging"
    ))
}

async fn conflict(ctx: &Pipeline, issue: &Issue, message: String) -> Result<Next, StageError> {
    // The conflict-fix agent merges the base branch: make it the forge's.
    ctx.forge
        .refresh_base(ctx.worktrees.repo_path(), &ctx.config.main_branch)
        .await?;
    ctx.publish(
        EventType::MergeUpdate,
        json!({"issue": issue.number, "status": "conflict", "message": message}),
    );
    count_round(
        ctx,
        issue.number,
        ctx.config.escalation.merge_conflict_fixes,
        &format!("merge conflict ({message}) fixed"),
        |r| &mut r.conflict_fixes,
    )?;
    fix_round(ctx, issue, PromptKind::ConflictFix, message).await
}

async fn merged(
    ctx: &Pipeline,
    issue: &mut Issue,
    pr: u64,
    sha: Option<String>,
) -> Result<Next, StageError> {
    let n = issue.number;
    ctx.publish(
        EventType::MergeUpdate,
        json!({"issue": n, "pr": pr, "status": "merged", "sha": sha}),
    );
    let fixed = ctx.labels.names().fixed.clone();
    swap(ctx, issue, &fixed).await?;
    release(ctx, issue).await?;
    if issue.state == IssueState::Open {
        ctx.forge.close_issue(n).await?;
        issue.state = IssueState::Closed;
    }
    if let Err(e) = ctx.worktrees.destroy(n, true).await {
        tracing::warn!(repo_slug = %ctx.layout.slug, issue = n, error = %e, "cannot remove worktree");
    }
    finish(ctx, n, Outcome::Merged)?;
    ctx.state
        .update_issue(n, |r| r.branch = None)
        .map_err(store_err)?;
    Ok(Next::Done)
}

async fn hitl(ctx: &Pipeline, issue: &mut Issue) -> Result<Next, StageError> {
    let n = issue.number;
    let record = ctx.state.issue(n);
    let Some(command) = record.pending_hitl.clone() else {
        // Resumed with `hydraflow-hitl-active` but nothing pending: wait for a human.
        let hitl = ctx.labels.names().hitl.clone();
        swap(ctx, issue, &hitl).await?;
        return Ok(Next::WaitForHuman);
    };
    let origin = record
        .hitl
        .as_ref()
        .map_or_else(|| ctx.labels.names().ready.clone(), |h| h.origin.clone());
    match command {
        HitlCommand::Skip => {
            ctx.forge
                .comment(
                    n,
                    "HydraFlow: an operator took this issue out of the pipeline.",
                )
                .await?;
            let labels = ctx.labels.pipeline();
            for l in labels.iter().filter(|l| issue.labels.contains(l)) {
                ctx.forge.remove_label(n, l).await?;
            }
            issue.labels.retain(|l| !labels.contains(l));
            release(ctx, issue).await?;
            finish(ctx, n, Outcome::Skipped)?;
            ctx.publish(
                EventType::HitlUpdate,
                json!({"issue": n, "status": "skipped"}),
            );
            Ok(Next::Done)
        }
        HitlCommand::Close => {
            ctx.forge
                .comment(n, "HydraFlow: an operator closed this issue.")
                .await?;
            let labels = ctx.labels.pipeline();
            for l in labels.iter().filter(|l| issue.labels.contains(l)) {
                ctx.forge.remove_label(n, l).await?;
            }
            issue.labels.retain(|l| !labels.contains(l));
            release(ctx, issue).await?;
            ctx.forge.close_issue(n).await?;
            if ctx.layout.worktree_path(n).exists() {
                ctx.worktrees.destroy(n, false).await?;
            }
            finish(ctx, n, Outcome::Closed)?;
            ctx.publish(
                EventType::HitlUpdate,
                json!({"issue": n, "status": "closed"}),
            );
            Ok(Next::Done)
        }
        HitlCommand::Correct { text } => {
            let active = ctx.labels.names().hitl_active.clone();
            swap(ctx, issue, &active).await?;
            ctx.publish(
                EventType::HitlUpdate,
                json!({"issue": n, "status": "applying", "origin": origin}),
            );
            let wt = ctx.worktrees.create_or_resume(n).await?;
            let mut pctx = prompt_context(ctx, issue);
            pctx.correction = Some(text.clone());
            pctx.feedback = record.hitl.as_ref().map(|h| h.cause.clone());
            run_agent(ctx, Stage::Hitl, PromptKind::Hitl, &pctx, wt.path.clone()).await?;
            ctx.worktrees.salvage(n).await?;
            let ahead = ctx.worktrees.commits_ahead(n).await?;
            ctx.state
                .update_issue(n, |r| {
                    r.guidance = Some(text.clone());
                    r.pending_hitl = None;
                    r.hitl = None;
                    r.attempts = 0;
                    r.plan_retries = 0;
                    r.review_rounds = 0;
                    r.ci_fix_rounds = 0;
                    r.conflict_fixes = 0;
                    r.no_pr_polls = 0;
                    r.worktree = Some(wt.path.clone());
                    r.branch = Some(wt.branch.clone());
                })
                .map_err(store_err)?;
            let back_to_review = ahead > 0
                && (origin == ctx.labels.names().review || origin == ctx.labels.names().ready);
            let next = if back_to_review {
                quality_check(ctx, &wt.path).await?;
                publish_branch(ctx, issue).await?;
                Stage::Review
            } else {
                Stage::Implement
            };
            let label = ctx.labels.of_stage(next).to_owned();
            swap(ctx, issue, &label).await?;
            ctx.publish(
                EventType::HitlUpdate,
                json!({"issue": n, "status": "applied", "to": next}),
            );
            Ok(Next::Stage(next))
        }
    }
}

/// Decide what a failed stage means for the issue; returns a delayed requeue.
pub(crate) async fn handle_failure(
    ctx: &Arc<Pipeline>,
    stage: Stage,
    mut issue: Issue,
    error: StageError,
) -> Option<(Issue, Stage, Duration)> {
    let n = issue.number;
    match error {
        StageError::Gone(why) => {
            tracing::info!(repo_slug = %ctx.layout.slug, issue = n, stage = %stage, why, "issue left the pipeline");
            let _ = ctx.state.update_issue(n, |r| r.claimed = false);
            ctx.store.forget(n);
            None
        }
        StageError::Later { cause, after } => {
            tracing::warn!(repo_slug = %ctx.layout.slug, issue = n, stage = %stage, cause, "will retry later");
            ctx.publish(
                EventType::Error,
                json!({"issue": n, "stage": stage, "message": cause, "retry_in": after.as_secs()}),
            );
            Some((issue, stage, after))
        }
        StageError::Pause {
            reason,
            duration,
            auth,
        } => {
            ctx.pause(&reason, duration, auth);
            Some((issue, stage, Duration::ZERO))
        }
        StageError::Retry(cause) => {
            let attempts = ctx
                .state
                .update_issue(n, |r| {
                    r.attempts += 1;
                    r.attempts
                })
                .unwrap_or(u32::MAX);
            tracing::warn!(repo_slug = %ctx.layout.slug, issue = n, stage = %stage, attempts, cause, "attempt failed");
            ctx.publish(
                EventType::Error,
                json!({"issue": n, "stage": stage, "message": cause, "attempts": attempts}),
            );
            if attempts >= ctx.config.max_issue_attempts {
                escalate(
                    ctx,
                    stage,
                    &mut issue,
                    &format!("{cause} (after {attempts} attempts)"),
                )
                .await
            } else {
                let delay = Duration::from_secs(2u64.pow(attempts.min(6))).min(ctx.poll_interval());
                Some((issue, stage, delay))
            }
        }
        StageError::Escalate(cause) => escalate(ctx, stage, &mut issue, &cause).await,
    }
}

/// Send the issue to a human, recording where it came from and why.
async fn escalate(
    ctx: &Arc<Pipeline>,
    stage: Stage,
    issue: &mut Issue,
    cause: &str,
) -> Option<(Issue, Stage, Duration)> {
    let n = issue.number;
    let previous = ctx.state.issue(n).hitl;
    let origin = match (&previous, ctx.labels.current(&issue.labels)) {
        (Some(h), _) => h.origin.clone(),
        (None, Some(label)) if label != ctx.labels.names().hitl => label,
        _ => ctx.labels.names().ready.clone(),
    };
    let title = issue.title.clone();
    let record = HitlRecord {
        origin: origin.clone(),
        stage,
        cause: cause.to_owned(),
        escalated_at: chrono::Utc::now().to_rfc3339(),
    };
    let saved = ctx.state.update(|s| {
        let r = s.issues.entry(n).or_default();
        r.hitl = Some(record);
        r.pending_hitl = None;
        r.claimed = false;
        s.session.issues_failed += 1;
        s.session.issues_processed += 1;
    });
    if let Err(e) = saved {
        tracing::error!(repo_slug = %ctx.layout.slug, issue = n, error = %e, "cannot record escalation");
    }
    tracing::warn!(repo_slug = %ctx.layout.slug, issue = n, stage = %stage, origin, cause, "escalated to a human");
    ctx.publish(
        EventType::HitlEscalation,
        json!({"issue": n, "title": title, "stage": stage, "origin": origin, "cause": cause}),
    );
    let hitl = ctx.labels.names().hitl.clone();
    let labelled = async {
        swap(ctx, issue, &hitl).await?;
        release(ctx, issue).await?;
        ctx.forge
            .comment(
                n,
                &format!(
                    "HydraFlow escalated this issue to a human.\n\n- stage: {stage}\n- cause: {cause}\n\nSend a correction with `hydraflow hitl correct {n} \"…\"` (or `skip` / `close`)."
                ),
            )
            .await?;
        Ok::<(), StageError>(())
    };
    match labelled.await {
        Ok(()) => {
            ctx.store.upsert(issue.clone());
            None
        }
        Err(e) => {
            tracing::error!(repo_slug = %ctx.layout.slug, issue = n, error = ?e, "cannot label the escalation; retrying");
            Some((issue.clone(), stage, ctx.poll_interval()))
        }
    }
}
