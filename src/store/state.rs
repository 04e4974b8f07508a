//! The state tracker: `state.json`, the worker's durable memory of every issue
//! it touches (attempts, worktree, branch, pull request, HITL origin, cause and
//! pending correction, interrupted stage), session counters and heartbeats.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::agent::Stage;

/// Version of the `state.json` schema written by this build.
pub const SCHEMA_VERSION: u32 = 1;

/// Everything in `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    /// [`SCHEMA_VERSION`] of the writer.
    pub schema_version: u32,
    /// Per-issue records keyed by issue number.
    pub issues: BTreeMap<u64, IssueRecord>,
    /// Counters of the current session.
    pub session: SessionCounters,
    /// Last heartbeat per loop name (RFC 3339 UTC).
    pub worker_heartbeats: BTreeMap<String, String>,
    /// When the file was last written (RFC 3339 UTC).
    pub last_updated: Option<String>,
}

impl Default for State {
    fn default() -> Self {
        State {
            schema_version: SCHEMA_VERSION,
            issues: BTreeMap::new(),
            session: SessionCounters::default(),
            worker_heartbeats: BTreeMap::new(),
            last_updated: None,
        }
    }
}

/// Issues processed in this session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SessionCounters {
    /// Issues that left a stage (any outcome).
    pub issues_processed: u64,
    /// Issues merged or closed as satisfied.
    pub issues_succeeded: u64,
    /// Issues escalated to HITL.
    pub issues_failed: u64,
}

/// How an issue left the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Its pull request was merged.
    Merged,
    /// Closed as already satisfied (triage or plan).
    AlreadySatisfied,
    /// Parked by triage for more information.
    Parked,
    /// Skipped by an operator from HITL.
    Skipped,
    /// Closed by an operator from HITL.
    Closed,
}

/// Why and from where an issue went to a human.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HitlRecord {
    /// The pipeline label it held before escalation (where a correction returns it).
    pub origin: String,
    /// The stage that escalated.
    pub stage: Stage,
    /// Why, in words.
    pub cause: String,
    /// When (RFC 3339 UTC).
    pub escalated_at: String,
}

/// A HITL command waiting for the HITL loop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum HitlCommand {
    /// Apply this correction and send the issue back.
    Correct {
        /// The human's correction.
        text: String,
    },
    /// Take the issue out of the pipeline.
    Skip,
    /// Close the issue.
    Close,
}

/// The worker's durable record of one issue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IssueRecord {
    /// Failed attempts so far.
    pub attempts: u32,
    /// This worker claimed the issue (set before `hydraflow-in-progress` is added).
    pub claimed: bool,
    /// The stage working on it when the worker stopped (checkpoint on SIGTERM).
    pub interrupted: Option<Stage>,
    /// Worktree path while one exists.
    pub worktree: Option<PathBuf>,
    /// Branch while one exists.
    pub branch: Option<String>,
    /// Pull request number once opened.
    pub pull_request: Option<u64>,
    /// Escalation, while the issue waits for a human.
    pub hitl: Option<HitlRecord>,
    /// A HITL command received and not yet applied.
    pub pending_hitl: Option<HitlCommand>,
    /// A correction applied by HITL, kept as guidance for later stages.
    pub guidance: Option<String>,
    /// Plan validation retries used.
    pub plan_retries: u32,
    /// Review-fix rounds used.
    pub review_rounds: u32,
    /// CI-fix rounds used.
    pub ci_fix_rounds: u32,
    /// Merge-conflict fixes used.
    pub conflict_fixes: u32,
    /// Review-stage polls that found no pull request.
    pub no_pr_polls: u32,
    /// How it left the pipeline, once it did.
    pub outcome: Option<Outcome>,
}

/// How `load` found the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadNote {
    /// No file yet: a fresh state.
    Fresh,
    /// Read as is.
    Loaded,
    /// `state.json` was unreadable; the named backup was used.
    RecoveredFromBackup {
        /// Why `state.json` was rejected.
        problem: String,
        /// The backup used.
        backup: PathBuf,
    },
}

/// The state tracker: `State` in memory, persisted atomically on every change
/// with the last few versions kept as `state.json.bak.1` (newest) … `.bak.3`.
#[derive(Debug)]
pub struct StateTracker {
    path: PathBuf,
    state: std::sync::Mutex<State>,
}

impl StateTracker {
    /// Load `path`, falling back to the newest good backup when it is
    /// unreadable (and saying so in the returned note), or start fresh.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] when the file and every backup are unreadable
    /// (nothing is overwritten then); [`StoreError::Io`] on other I/O errors.
    pub fn load(path: &Path) -> Result<(StateTracker, LoadNote), StoreError> {
        let _ = path;
        todo!("store helper implements this")
    }

    /// The file this tracker writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A copy of the whole state.
    pub fn snapshot(&self) -> State {
        self.state.lock().expect("state lock").clone()
    }

    /// A copy of one issue's record (default when unknown).
    pub fn issue(&self, number: u64) -> IssueRecord {
        self.state
            .lock()
            .expect("state lock")
            .issues
            .get(&number)
            .cloned()
            .unwrap_or_default()
    }

    /// Apply `f` to the state and persist it atomically before returning.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the write fails; the in-memory change is kept
    /// and written again by the next successful update.
    pub fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> Result<R, StoreError> {
        let _ = f;
        todo!("store helper implements this")
    }

    /// Apply `f` to one issue's record (created when missing) and persist.
    ///
    /// # Errors
    /// As [`StateTracker::update`].
    pub fn update_issue<R>(
        &self,
        number: u64,
        f: impl FnOnce(&mut IssueRecord) -> R,
    ) -> Result<R, StoreError> {
        self.update(|s| f(s.issues.entry(number).or_default()))
    }

    /// Read `path` (or its newest good backup) without taking ownership of the
    /// file: for the CLI, which never writes behind a running worker's back.
    ///
    /// # Errors
    /// As [`StateTracker::load`].
    pub fn read_only(path: &Path) -> Result<State, StoreError> {
        StateTracker::load(path).map(|(t, _)| t.snapshot())
    }
}
