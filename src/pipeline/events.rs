//! The pipeline's events as one typed enum. Each variant serialises to the
//! `type` and `data` of an `events.jsonl` record (docs/design/persistence.md), the same shape
//! the dashboard has always read: `PhaseChange { issue, from, to }` becomes
//! `{"type": "phase_change", "data": {"issue": 7, "from": "plan", "to":
//! "implement"}}`. Call sites build a variant; only [`publish`] touches JSON.

use std::path::PathBuf;

use serde::Serialize;

use super::issue_store::Depths;
use crate::agent::Stage;
use crate::agent::contract::{TriageResult, Verdict};
use crate::forge::{ChecksState, RateBudget};
use crate::store::events::{EventBus, EventType};
use crate::store::state::HitlCommand;

/// One pipeline event (`type` is the variant's snake-case name).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum PipelineEvent {
    /// An issue moved between stages.
    PhaseChange {
        /// Issue number.
        issue: u64,
        /// The stage it left.
        from: Stage,
        /// The stage it entered.
        to: Stage,
    },
    /// A stage task started or ended.
    WorkerUpdate(WorkerUpdate),
    /// One display line of an agent.
    TranscriptLine {
        /// Issue number.
        issue: u64,
        /// Stage.
        stage: Stage,
        /// `text`, `tool`, … (see [`crate::agent::parse::DisplayLine`]).
        kind: crate::agent::parse::LineKind,
        /// The line.
        line: String,
    },
    /// A pull request was opened.
    PrCreated {
        /// Issue number.
        issue: u64,
        /// Pull request number.
        pr: u64,
        /// Web URL, when the forge has one.
        url: Option<String>,
        /// Head branch.
        branch: String,
    },
    /// A review verdict.
    ReviewUpdate {
        /// Issue number.
        issue: u64,
        /// Pull request number.
        pr: u64,
        /// The verdict.
        verdict: Verdict,
        /// Its summary.
        summary: String,
    },
    /// A triage result.
    TriageUpdate {
        /// Issue number.
        issue: u64,
        /// The agent's answer.
        result: TriageResult,
    },
    /// A plan was saved.
    PlannerUpdate {
        /// Issue number.
        issue: u64,
        /// The plan's summary line.
        summary: String,
        /// `plans/issue-<N>.md`.
        path: PathBuf,
    },
    /// A merge result.
    MergeUpdate(MergeUpdate),
    /// A CI poll.
    CiCheck {
        /// Issue number.
        issue: u64,
        /// Pull request number.
        pr: u64,
        /// Head SHA.
        sha: String,
        /// The combined state.
        state: ChecksState,
    },
    /// An issue went to a human.
    HitlEscalation {
        /// Issue number.
        issue: u64,
        /// Its title.
        title: String,
        /// The stage that escalated.
        stage: Stage,
        /// The label a correction returns it to.
        origin: String,
        /// Why.
        cause: String,
    },
    /// A HITL command was received or applied.
    HitlUpdate(HitlUpdate),
    /// The pipeline started, paused, resumed, polled or stopped.
    OrchestratorStatus(OrchestratorStatus),
    /// Something failed.
    Error(ErrorEvent),
    /// Something an operator must look at.
    SystemAlert {
        /// The loop concerned, if any.
        #[serde(rename = "loop", skip_serializing_if = "Option::is_none")]
        loop_name: Option<&'static str>,
        /// What happened.
        message: String,
    },
    /// Queue contents changed after a poll.
    QueueUpdate {
        /// Queued issue numbers per stage.
        queues: std::collections::BTreeMap<Stage, Vec<u64>>,
        /// Depths and in-flight counts.
        depths: Depths,
    },
    /// An agent call started or ended.
    AgentActivity(AgentActivity),
    /// Worktrees or branches of finished issues were removed.
    GarbageCollected {
        /// Worktree directories removed.
        worktrees: Vec<PathBuf>,
        /// `agent/issue-<N>` branches deleted.
        branches: Vec<String>,
    },
}

/// `worker_update` payloads.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum WorkerUpdate {
    /// A stage took the issue.
    Started {
        /// Issue number.
        issue: u64,
        /// Stage.
        stage: Stage,
        /// Title.
        title: String,
    },
    /// The stage is done with it.
    Finished {
        /// Issue number.
        issue: u64,
        /// Stage.
        stage: Stage,
        /// Where it goes (`Stage(Review)`, `Done`, …).
        next: String,
    },
}

/// `merge_update` payloads.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum MergeUpdate {
    /// Merged (by HydraFlow or a human).
    Merged {
        /// Issue number.
        issue: u64,
        /// Pull request number.
        pr: u64,
        /// The squash commit, when HydraFlow merged it.
        sha: Option<String>,
    },
    /// The pull request conflicts with the base branch.
    Conflict {
        /// Issue number.
        issue: u64,
        /// The forge's message.
        message: String,
    },
}

/// `hitl_update` payloads.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum HitlUpdate {
    /// A command arrived through the spool.
    Received {
        /// Issue number.
        issue: u64,
        /// The command.
        command: HitlCommand,
    },
    /// A correction is being applied.
    Applying {
        /// Issue number.
        issue: u64,
        /// Where it came from.
        origin: String,
    },
    /// A correction was applied.
    Applied {
        /// Issue number.
        issue: u64,
        /// The stage it goes to.
        to: Stage,
    },
    /// An operator took it out of the pipeline.
    Skipped {
        /// Issue number.
        issue: u64,
    },
    /// An operator closed it.
    Closed {
        /// Issue number.
        issue: u64,
    },
}

/// `orchestrator_status` payloads.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum OrchestratorStatus {
    /// The loops started.
    Running {
        /// `local` or `github`.
        forge: &'static str,
    },
    /// Work is paused.
    Paused {
        /// Why.
        reason: String,
        /// Until the next probe or the reset time, in seconds.
        seconds: u64,
    },
    /// Work resumed after a pause.
    Resumed {
        /// The pause's reason.
        reason: String,
    },
    /// A poll of the forge completed (with the API budget, when it has one).
    Polled {
        /// Requests left.
        api_remaining: u64,
        /// Window size.
        api_limit: u64,
        /// Reset time (Unix seconds).
        api_reset_at: u64,
    },
    /// The loops stopped.
    Stopped {
        /// Issues in flight at the stop (resumed at the next start).
        interrupted: usize,
    },
}

impl OrchestratorStatus {
    /// The `polled` status of a budget.
    pub fn polled(budget: RateBudget) -> OrchestratorStatus {
        OrchestratorStatus::Polled {
            api_remaining: budget.remaining,
            api_limit: budget.limit,
            api_reset_at: budget.reset_at,
        }
    }
}

/// `error` payloads: what failed, where, and what happens next.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ErrorEvent {
    /// The loop that failed, when it is a loop's failure.
    #[serde(rename = "loop", skip_serializing_if = "Option::is_none")]
    pub loop_name: Option<&'static str>,
    /// The issue, when it is an issue's failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issue: Option<u64>,
    /// The stage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    /// A file concerned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// What happened.
    pub message: String,
    /// The failure's class: `attempt`, `later`, `pause`, `escalate`, `gone`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<&'static str>,
    /// Seconds until the issue is tried again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_in: Option<u64>,
    /// Attempts counted so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Consecutive failures of a loop.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
}

/// `agent_activity` payloads.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum AgentActivity {
    /// The agent was started.
    Started {
        /// Issue number.
        issue: u64,
        /// Stage.
        stage: Stage,
        /// The prompt's name.
        prompt: &'static str,
        /// argv\[0\].
        program: Option<String>,
    },
    /// The agent ended.
    Finished {
        /// Issue number.
        issue: u64,
        /// Stage.
        stage: Stage,
        /// Exit code; `None` when killed by a signal.
        exit_code: Option<i32>,
        /// Killed by the timeout.
        timed_out: bool,
        /// `success`, or the failure's class (`attempt`, `later`, `pause`;
        /// see `agent::failure`).
        outcome: &'static str,
        /// The failure's cause, in the agent's words.
        cause: Option<String>,
        /// Wall and CPU time, memory peak (see `agent::contain`).
        resources: crate::agent::contain::Resources,
        /// Model tokens.
        usage: crate::agent::Usage,
        /// Cost in US dollars, as the agent reported it.
        cost_usd: Option<f64>,
        /// The model the agent reported.
        model: Option<String>,
    },
}

/// Record `event` on `bus` (its `type` and `data`).
pub fn publish(bus: &EventBus, event: PipelineEvent) {
    match split(&event) {
        Ok((kind, data)) => {
            bus.publish(kind, data);
        }
        Err(e) => tracing::warn!(error = %e, ?event, "cannot serialise pipeline event"),
    }
}

/// The `type` and `data` of `event`.
fn split(event: &PipelineEvent) -> Result<(EventType, serde_json::Value), serde_json::Error> {
    let serde_json::Value::Object(mut fields) = serde_json::to_value(event)? else {
        return Err(serde::ser::Error::custom("event is not an object"));
    };
    let kind = serde_json::from_value(fields.remove("type").unwrap_or_default())?;
    let data = fields.remove("data").unwrap_or_default();
    Ok((kind, data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(event: PipelineEvent, kind: EventType, data: serde_json::Value) {
        let (k, d) = split(&event).expect("split");
        assert_eq!((k, d), (kind, data));
    }

    /// The wire shape the dashboard reads is unchanged.
    #[test]
    fn wire_shapes() {
        check(
            PipelineEvent::PhaseChange {
                issue: 7,
                from: Stage::Plan,
                to: Stage::Implement,
            },
            EventType::PhaseChange,
            json!({"issue": 7, "from": "plan", "to": "implement"}),
        );
        check(
            PipelineEvent::WorkerUpdate(WorkerUpdate::Started {
                issue: 1,
                stage: Stage::Triage,
                title: "t".into(),
            }),
            EventType::WorkerUpdate,
            json!({"status": "started", "issue": 1, "stage": "triage", "title": "t"}),
        );
        check(
            PipelineEvent::OrchestratorStatus(OrchestratorStatus::Paused {
                reason: "disk".into(),
                seconds: 5,
            }),
            EventType::OrchestratorStatus,
            json!({"status": "paused", "reason": "disk", "seconds": 5}),
        );
        check(
            PipelineEvent::Error(ErrorEvent {
                issue: Some(3),
                stage: Some(Stage::Review),
                message: "boom".into(),
                attempts: Some(2),
                class: Some("attempt"),
                ..ErrorEvent::default()
            }),
            EventType::Error,
            json!({"issue": 3, "stage": "review", "message": "boom", "attempts": 2, "class": "attempt"}),
        );
        check(
            PipelineEvent::HitlUpdate(HitlUpdate::Received {
                issue: 2,
                command: HitlCommand::Skip,
            }),
            EventType::HitlUpdate,
            json!({"status": "received", "issue": 2, "command": {"action": "skip"}}),
        );
        check(
            PipelineEvent::MergeUpdate(MergeUpdate::Merged {
                issue: 1,
                pr: 5,
                sha: None,
            }),
            EventType::MergeUpdate,
            json!({"status": "merged", "issue": 1, "pr": 5, "sha": null}),
        );
        check(
            PipelineEvent::SystemAlert {
                loop_name: Some("poller"),
                message: "m".into(),
            },
            EventType::SystemAlert,
            json!({"loop": "poller", "message": "m"}),
        );
    }
}
