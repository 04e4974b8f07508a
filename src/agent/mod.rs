//! Agents: coding-agent CLIs run as child processes, one call per stage task
//! (docs/design/agents.md). `runner` spawns the process in its own process group with a
//! timeout that kills the group and streams stdout line by line; `parse`
//! turns Claude Code `stream-json`, Codex `--json` and plain text into display
//! lines and a final transcript; `prompts` renders the stage prompts;
//! `contract` extracts the output contract (triage JSON, plan markers,
//! verdicts); `failure` classifies a failed call (attempt, later, pause);
//! `contain` runs each call in its own cgroup or under a child subreaper
//! (`shim`) and measures what it used.
//!
//! **Invariant:** only `agent::runner` spawns agent processes, and every
//! classification of an agent's outcome is made in `agent::failure`.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod contain;
pub mod contract;
pub mod failure;
pub mod parse;
pub mod prompts;
pub mod runner;
pub mod shim;

pub use failure::{AgentFailure, PauseKind};
pub use parse::{Signals, Usage};

/// The five pipeline stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Triage (`hydraflow-find`).
    Triage,
    /// Plan (`hydraflow-plan`).
    Plan,
    /// Implement (`hydraflow-ready`).
    Implement,
    /// Review (`hydraflow-review`).
    Review,
    /// HITL correction (`hydraflow-hitl`).
    Hitl,
}

impl Stage {
    /// All stages in pipeline order.
    pub const ALL: [Stage; 5] = [
        Stage::Triage,
        Stage::Plan,
        Stage::Implement,
        Stage::Review,
        Stage::Hitl,
    ];

    /// Lowercase name (`triage`, `plan`, `implement`, `review`, `hitl`).
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Triage => "triage",
            Stage::Plan => "plan",
            Stage::Implement => "implement",
            Stage::Review => "review",
            Stage::Hitl => "hitl",
        }
    }

    /// Transcript file prefix of the original: `triage-issue`, `plan-issue`,
    /// `issue`, `review-pr`, `hitl-issue` (files are `logs/<prefix>-<N>.txt`).
    pub fn transcript_prefix(self) -> &'static str {
        match self {
            Stage::Triage => "triage-issue",
            Stage::Plan => "plan-issue",
            Stage::Implement => "issue",
            Stage::Review => "review-pr",
            Stage::Hitl => "hitl-issue",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an agent's stdout is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputFormat {
    /// Plain text: every line is display text; the transcript is all of it.
    #[serde(rename = "plain")]
    Plain,
    /// Claude Code `--output-format stream-json` (one JSON event per line).
    #[serde(rename = "claude-stream-json")]
    ClaudeStreamJson,
    /// Codex `exec --json` (current `type` events and the legacy `msg` format).
    #[serde(rename = "codex-json")]
    CodexJson,
}

/// One agent call, fully resolved: what to run, where, and for how long.
#[derive(Debug, Clone)]
pub struct AgentCall {
    /// The stage this call serves.
    pub stage: Stage,
    /// Issue (or pull request, for review) number, for file names and events.
    pub issue: u64,
    /// Program and arguments, placeholders already substituted.
    pub argv: Vec<String>,
    /// Written to the child's stdin, then stdin is closed; `None` = `/dev/null`.
    pub stdin: Option<String>,
    /// Working directory.
    pub cwd: PathBuf,
    /// The child's complete environment (already cleaned of the parent's git and agent variables).
    pub env: Vec<(String, String)>,
    /// How to parse stdout.
    pub output: OutputFormat,
    /// Kill the whole process group after this long.
    pub timeout: Duration,
    /// Where the transcript is saved (`logs/<prefix>-<N>.txt`).
    pub transcript_path: PathBuf,
}

/// Why an agent run hit a usage limit or auth failure, for pausing the pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentBlock {
    /// "usage limit reached", "credit balance is too low", "hit your … limit";
    /// `resets_at` is Unix seconds when the message says.
    UsageLimit {
        /// The matching line.
        message: String,
        /// Reset time, Unix seconds, when known.
        resets_at: Option<u64>,
    },
    /// The agent could not authenticate (401, missing API key, "invalid api key").
    Auth {
        /// The matching line.
        message: String,
    },
}

/// What an agent run produced.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AgentOutcome {
    /// Exit code; `None` when killed by a signal (including the timeout).
    pub exit_code: Option<i32>,
    /// The signal that ended it, when one did.
    pub signal: Option<i32>,
    /// True when the timeout killed the process group.
    pub timed_out: bool,
    /// The timeout the call ran under.
    pub timeout: Duration,
    /// The final result text, else the accumulated assistant text.
    pub transcript: String,
    /// The agent itself reported an error (Claude `is_error`, Codex `turn.failed`/`error`).
    pub is_error: bool,
    /// What the agent's stream said about a failure, structured
    /// (see [`failure`] for how it is read).
    pub signals: Signals,
    /// The last lines of stderr (at most a few KiB), for error messages.
    pub stderr_tail: String,
    /// Model tokens the call used, as the agent reported them.
    pub usage: Usage,
    /// Cost in US dollars as the agent reported it (Claude `total_cost_usd`).
    pub cost_usd: Option<f64>,
    /// The model the agent said it used (Claude's `init` event).
    pub model: Option<String>,
    /// Wall time, CPU time and memory of the call (see [`contain`]).
    pub resources: contain::Resources,
}

impl AgentOutcome {
    /// Exit 0, not timed out, no error reported.
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out && !self.is_error
    }

    /// How this outcome failed, or `None` when it succeeded; see [`failure`].
    pub fn failure(&self) -> Option<AgentFailure> {
        failure::classify(self)
    }
}

/// Why an agent could not be run at all.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The program could not be started.
    #[error("cannot start agent {program:?}: {cause}")]
    Spawn {
        /// argv\[0\].
        program: String,
        /// The OS error.
        cause: std::io::Error,
    },
    /// Reading its output or writing HydraFlow's own files (transcript,
    /// prompt file, cgroup) failed.
    #[error("agent i/o failed: {0}")]
    Io(std::io::Error),
    /// The configuration names an unknown preset or output format.
    #[error("{0}")]
    Config(String),
}

impl From<std::io::Error> for AgentError {
    /// [`AgentError::Io`]: the message carries the cause, so it is not also
    /// the error's `source()`.
    fn from(cause: std::io::Error) -> AgentError {
        AgentError::Io(cause)
    }
}

impl AgentError {
    /// How this error is handled; see [`failure::classify_error`].
    pub fn failure(&self) -> AgentFailure {
        failure::classify_error(self)
    }
}
