//! The state tracker: `state.json`, the worker's durable memory of every issue
//! it touches (attempts, worktree, branch, pull request, HITL origin, cause and
//! pending correction, interrupted stage), session counters and heartbeats.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use chrono::{DateTime, SubsecRound as _, Utc};
use serde::{Deserialize, Serialize};

use super::StoreError;
use super::atomic;
use crate::agent::Stage;

/// Version of the `state.json` schema written by this build. Version 1 kept
/// the lifecycle as separate fields (`claimed`, `interrupted`, `hitl`,
/// `pending_hitl`, `outcome`); they are read and turned into [`Phase`].
pub const SCHEMA_VERSION: u32 = 2;

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
    /// Last heartbeat per loop name (RFC 3339 UTC in the file).
    pub worker_heartbeats: BTreeMap<String, DateTime<Utc>>,
    /// When the file was last written (RFC 3339 UTC in the file).
    pub last_updated: Option<DateTime<Utc>>,
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
    /// Closed as already satisfied (triage, plan or implement).
    AlreadySatisfied,
    /// Parked by triage for more information.
    Parked,
    /// Skipped by an operator from HITL.
    Skipped,
    /// Closed by an operator from HITL.
    Closed,
}

impl Outcome {
    /// Whether the issue's worktree and `agent/issue-<N>` branch are of no
    /// further use (merged, satisfied or closed); a skipped or parked
    /// issue keeps them for the human.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Outcome::Merged | Outcome::AlreadySatisfied | Outcome::Closed
        )
    }
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
    /// When (RFC 3339 UTC in the file).
    pub escalated_at: DateTime<Utc>,
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

/// Where an issue stands in this worker's hands: the lifecycle, one variant
/// at a time (serialised as `{"phase": "claimed", "stage": "implement"}`, …).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Known but not held: its labels decide what happens next.
    #[default]
    Open,
    /// Held by this worker (recorded before `hydraflow-in-progress` is
    /// added) in `stage`. A record still claimed at start was interrupted
    /// there.
    Claimed {
        /// The stage working on it.
        stage: Stage,
    },
    /// Escalated: waiting for a human, with an optional command received
    /// and not yet applied.
    WaitingForHuman {
        /// Origin, stage and cause of the escalation.
        hitl: HitlRecord,
        /// A command from `hydraflow hitl` not yet applied.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pending: Option<HitlCommand>,
    },
    /// Out of the pipeline.
    Done {
        /// How it left.
        outcome: Outcome,
    },
}

/// One outside side effect of the pipeline, as the step journal records it.
/// Every effect is idempotent or checked before it is repeated: a comment
/// carries an invisible marker (`<!-- hydraflow:<key> -->`) that is looked
/// for before a comment whose step was in flight at a crash is posted again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "effect", rename_all = "snake_case")]
pub enum Effect {
    /// Add the label `to`, then remove every other pipeline label.
    Swap {
        /// The new pipeline label.
        to: String,
    },
    /// Remove every pipeline label (HITL skip and close).
    ClearLabels,
    /// Post a comment carrying the marker `key`.
    Comment {
        /// Unique per issue: `<what>-<journal number>`.
        key: String,
        /// The comment (the marker is appended when posted).
        body: String,
    },
    /// Publish `agent/issue-<N>` to the forge.
    Push,
    /// Find or open the pull request of `agent/issue-<N>`; its number is
    /// recorded in [`IssueRecord::pull_request`].
    OpenPullRequest {
        /// `Fixes #N: <title>`.
        title: String,
        /// Contains `Closes #N`.
        body: String,
    },
    /// Post a review on the pull request, carrying the marker `key`.
    PostReview {
        /// The pull request.
        pr: u64,
        /// The verdict.
        event: crate::forge::ReviewEvent,
        /// The review's text.
        body: String,
        /// The marker.
        key: String,
    },
    /// Squash-merge the pull request (done when it already is merged).
    Merge {
        /// The pull request.
        pr: u64,
        /// The squash commit's subject.
        title: String,
    },
    /// Close the issue.
    Close,
    /// Remove the issue's worktree (salvaging uncommitted work first), and
    /// with `delete_branch` its `agent/issue-<N>` branch.
    DestroyWorktree {
        /// Delete the branch too.
        delete_branch: bool,
    },
    /// Remove the `hydraflow-in-progress` marker.
    Release,
}

/// Where an issue goes once its journal is done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "to", rename_all = "snake_case")]
pub enum After {
    /// Into this stage's queue (still claimed).
    Stage {
        /// The next stage.
        stage: Stage,
    },
    /// Out of the pipeline.
    Done {
        /// How it left.
        outcome: Outcome,
    },
    /// To a human.
    Human {
        /// Origin, stage and cause.
        hitl: HitlRecord,
    },
}

/// The step journal of one issue: the outside side effects a stage decided
/// on, in order, and how many are done. Written before the first effect;
/// `done` is advanced (and written) after each, so at every instant the
/// record says which effect is in flight: `effects[done]`. A restart
/// carries on from there, never deciding again (no agent is re-run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    /// The stage that decided.
    pub stage: Stage,
    /// The effects, in order.
    pub effects: Vec<Effect>,
    /// How many of them are done.
    pub done: usize,
    /// Where the issue goes afterwards.
    pub then: After,
}

impl Journal {
    /// A journal of `effects` decided by `stage`, none done yet.
    pub fn new(stage: Stage, effects: Vec<Effect>, then: After) -> Journal {
        Journal {
            stage,
            effects,
            done: 0,
            then,
        }
    }

    /// The effect in flight (the next one to do), if any is left.
    pub fn in_flight(&self) -> Option<&Effect> {
        self.effects.get(self.done)
    }
}

/// A fix round decided by review (changes requested, red CI, a merge
/// conflict) and not yet run: a restart runs it instead of reviewing again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FixRound {
    /// Which prompt.
    pub kind: FixKind,
    /// What to fix (review feedback, failed checks, conflict message).
    pub feedback: String,
}

/// What a fix round fixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FixKind {
    /// Changes a review requested.
    ReviewFix,
    /// Failed CI checks.
    CiFix,
    /// A conflict with the base branch.
    ConflictFix,
}

/// The worker's durable record of one issue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "RawIssueRecord")]
pub struct IssueRecord {
    /// The lifecycle.
    pub phase: Phase,
    /// Outside side effects decided and not all done yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal: Option<Journal>,
    /// Journals started so far: makes comment markers unique.
    pub journals: u32,
    /// Failed attempts so far (never above `max_issue_attempts`).
    pub attempts: u32,
    /// Worktree path, recorded once its creation completed. A worktree
    /// directory without this record was left half-made by a crash and is
    /// made again, never used.
    pub worktree: Option<PathBuf>,
    /// Branch while one exists.
    pub branch: Option<String>,
    /// The implement agent ran to completion and its work is committed on
    /// the branch: a restart goes on to the quality check and the pull
    /// request without running it again.
    pub implemented: bool,
    /// Pull request number once opened.
    pub pull_request: Option<u64>,
    /// The pull request head SHA the review approved: while CI runs on it,
    /// the review is not run again.
    pub approved_sha: Option<String>,
    /// When waiting for CI on `approved_sha` began (RFC 3339 UTC in the file).
    pub ci_wait_since: Option<DateTime<Utc>>,
    /// A fix round decided and not yet run.
    pub fix: Option<FixRound>,
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
}

impl IssueRecord {
    /// The escalation, while the issue waits for a human.
    pub fn hitl(&self) -> Option<&HitlRecord> {
        match &self.phase {
            Phase::WaitingForHuman { hitl, .. } => Some(hitl),
            _ => None,
        }
    }

    /// A HITL command received and not yet applied.
    pub fn pending_hitl(&self) -> Option<&HitlCommand> {
        match &self.phase {
            Phase::WaitingForHuman { pending, .. } => pending.as_ref(),
            _ => None,
        }
    }

    /// How it left the pipeline, once it did.
    pub fn outcome(&self) -> Option<Outcome> {
        match self.phase {
            Phase::Done { outcome } => Some(outcome),
            _ => None,
        }
    }

    /// Claimed by this worker for a stage.
    pub fn is_claimed(&self) -> bool {
        matches!(self.phase, Phase::Claimed { .. })
    }

    /// This worker holds the issue: claimed, applying a human's command, or
    /// with side effects still to carry out. A `hydraflow-in-progress`
    /// label on an issue not held here is another worker's.
    pub fn is_held(&self) -> bool {
        self.is_claimed() || self.pending_hitl().is_some() || self.journal.is_some()
    }

    /// Start a new journal of `effects` (numbered, for comment markers).
    pub fn start_journal(&mut self, stage: Stage, effects: Vec<Effect>, then: After) {
        self.journals += 1;
        self.journal = Some(Journal::new(stage, effects, then));
    }

    /// Forget the counters of one pass through the pipeline (a HITL
    /// correction or a relabel by a human starts a new one).
    pub fn reset_counters(&mut self) {
        self.attempts = 0;
        self.plan_retries = 0;
        self.review_rounds = 0;
        self.ci_fix_rounds = 0;
        self.conflict_fixes = 0;
        self.no_pr_polls = 0;
        self.approved_sha = None;
        self.ci_wait_since = None;
        self.fix = None;
    }
}

/// What `state.json` may hold for an issue: this schema's fields and
/// version 1's lifecycle fields, which become [`Phase`].
#[derive(Deserialize, Default)]
#[serde(default)]
struct RawIssueRecord {
    phase: Option<Phase>,
    journal: Option<Journal>,
    journals: u32,
    attempts: u32,
    worktree: Option<PathBuf>,
    branch: Option<String>,
    implemented: bool,
    pull_request: Option<u64>,
    approved_sha: Option<String>,
    ci_wait_since: Option<DateTime<Utc>>,
    fix: Option<FixRound>,
    guidance: Option<String>,
    plan_retries: u32,
    review_rounds: u32,
    ci_fix_rounds: u32,
    conflict_fixes: u32,
    no_pr_polls: u32,
    // Version 1.
    claimed: bool,
    interrupted: Option<Stage>,
    hitl: Option<HitlRecord>,
    pending_hitl: Option<HitlCommand>,
    outcome: Option<Outcome>,
}

impl From<RawIssueRecord> for IssueRecord {
    fn from(raw: RawIssueRecord) -> IssueRecord {
        let phase = raw.phase.unwrap_or_else(|| match (raw.outcome, raw.hitl) {
            (_, Some(hitl)) => Phase::WaitingForHuman {
                hitl,
                pending: raw.pending_hitl,
            },
            (Some(outcome), None) if !raw.claimed => Phase::Done { outcome },
            _ if raw.claimed => Phase::Claimed {
                stage: raw.interrupted.unwrap_or(Stage::Implement),
            },
            _ => Phase::Open,
        });
        IssueRecord {
            phase,
            journal: raw.journal,
            journals: raw.journals,
            attempts: raw.attempts,
            worktree: raw.worktree,
            branch: raw.branch,
            implemented: raw.implemented,
            pull_request: raw.pull_request,
            approved_sha: raw.approved_sha,
            ci_wait_since: raw.ci_wait_since,
            fix: raw.fix,
            guidance: raw.guidance,
            plan_retries: raw.plan_retries,
            review_rounds: raw.review_rounds,
            ci_fix_rounds: raw.ci_fix_rounds,
            conflict_fixes: raw.conflict_fixes,
            no_pr_polls: raw.no_pr_polls,
        }
    }
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
    /// A missing `state.json` means a fresh state (backups are not consulted:
    /// the writer never leaves the file missing, so a missing file was removed
    /// on purpose). Temp files a crashed write left behind are removed. When
    /// a backup is used, the rejected file is kept as
    /// `state.json.corrupt-<YYYYmmddTHHMMSSZ>` and `state.json` is rewritten
    /// with the backup's content.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] when the file and every backup are unreadable
    /// (nothing is overwritten then); [`StoreError::Io`] on other I/O errors.
    pub fn load(path: &Path) -> Result<(StateTracker, LoadNote), StoreError> {
        let (state, note) = load_state(path, true)?;
        let tracker = StateTracker {
            path: path.to_path_buf(),
            state: std::sync::Mutex::new(state),
        };
        Ok((tracker, note))
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
    /// Under the lock: `f` runs on a copy, `last_updated` and
    /// `schema_version` are set, the backups shift (`.bak.2` to `.bak.3`,
    /// `.bak.1` to `.bak.2`, the current file hard-linked as `.bak.1`,
    /// copied where links fail) and the new pretty-printed JSON replaces
    /// `state.json` atomically. At every instant `state.json` exists.
    ///
    /// The copy becomes the state only once it is on disk, so memory never
    /// runs ahead of the file: a caller that goes on to an outside side
    /// effect after `update` returned `Ok` knows the record survives a crash.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the write fails (a full disk, a read-only
    /// data directory); the state is then unchanged, in memory and on disk.
    pub fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> Result<R, StoreError> {
        let mut state = self.state.lock().expect("state lock");
        let mut next = state.clone();
        let result = f(&mut next);
        next.schema_version = SCHEMA_VERSION;
        next.last_updated = Some(Utc::now().trunc_subsecs(0));
        self.persist(&next)?;
        *state = next;
        Ok(result)
    }

    /// Write the current state again: succeeds when the data directory
    /// takes a durable write (the probe that ends a storage pause).
    ///
    /// # Errors
    /// As [`StateTracker::update`].
    pub fn probe(&self) -> Result<(), StoreError> {
        self.update(|_| ())
    }

    fn persist(&self, state: &State) -> Result<(), StoreError> {
        let bytes = to_json(state, &self.path)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io_error(dir))?;
        }
        rotate_backups(&self.path)?;
        atomic::write_atomic(&self.path, &bytes).map_err(io_error(&self.path))
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
    /// Unlike [`StateTracker::load`] it changes nothing on disk.
    ///
    /// # Errors
    /// As [`StateTracker::load`].
    pub fn read_only(path: &Path) -> Result<State, StoreError> {
        load_state(path, false).map(|(state, _)| state)
    }
}

/// Backups kept: `state.json.bak.1` (newest) to `state.json.bak.<BACKUPS>`.
pub const BACKUPS: usize = 3;

/// `<path>.bak.<n>`.
pub fn backup_path(path: &Path, n: usize) -> PathBuf {
    with_suffix(path, &format!(".bak.{n}"))
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        cause: source,
    }
}

fn to_json(state: &State, path: &Path) -> Result<Vec<u8>, StoreError> {
    let mut bytes = serde_json::to_vec_pretty(state).map_err(|e| StoreError::Io {
        path: path.to_path_buf(),
        cause: io::Error::new(io::ErrorKind::InvalidData, e),
    })?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// What reading one candidate file gave.
enum Read {
    Missing,
    Good(Box<State>),
    Bad(String),
}

fn read_state(path: &Path) -> Result<Read, StoreError> {
    match fs::read(path) {
        Ok(bytes) => Ok(match serde_json::from_slice::<State>(&bytes) {
            Ok(state) => Read::Good(Box::new(state)),
            Err(err) => Read::Bad(format!("not a valid state file: {err}")),
        }),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Read::Missing),
        Err(err) => Err(io_error(path)(err)),
    }
}

fn load_state(path: &Path, owner: bool) -> Result<(State, LoadNote), StoreError> {
    if owner {
        atomic::remove_temp_files(path).map_err(io_error(path))?;
    }
    let problem = match read_state(path)? {
        Read::Missing => return Ok((State::default(), LoadNote::Fresh)),
        Read::Good(state) => return Ok((*state, LoadNote::Loaded)),
        Read::Bad(problem) => problem,
    };
    let mut problems = vec![format!("{}: {problem}", path.display())];
    for n in 1..=BACKUPS {
        let backup = backup_path(path, n);
        let found = match read_state(&backup) {
            Ok(Read::Good(state)) => state,
            Ok(Read::Missing) => {
                problems.push(format!("{}: missing", backup.display()));
                continue;
            }
            Ok(Read::Bad(p)) => {
                problems.push(format!("{}: {p}", backup.display()));
                continue;
            }
            Err(err) => {
                problems.push(err.to_string());
                continue;
            }
        };
        if owner {
            set_aside(path)?;
            atomic::write_atomic(path, &to_json(&found, path)?).map_err(io_error(path))?;
        }
        let note = LoadNote::RecoveredFromBackup { problem, backup };
        return Ok((*found, note));
    }
    Err(StoreError::Corrupt {
        path: path.to_path_buf(),
        message: format!("no good backup either ({})", problems.join("; ")),
    })
}

/// Keep the rejected file as `<path>.corrupt-<timestamp>` (hard link, copy
/// where links fail), leaving `path` in place until it is replaced.
fn set_aside(path: &Path) -> Result<PathBuf, StoreError> {
    let stamp = Utc::now().format("%Y%m%dT%H%M%SZ").to_string();
    let mut aside = with_suffix(path, &format!(".corrupt-{stamp}"));
    let mut n = 1;
    while aside.exists() {
        n += 1;
        aside = with_suffix(path, &format!(".corrupt-{stamp}-{n}"));
    }
    link_or_copy(path, &aside)?;
    Ok(aside)
}

fn link_or_copy(from: &Path, to: &Path) -> Result<(), StoreError> {
    match fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Err(io_error(from)(err)),
        Err(_) => {
            let bytes = fs::read(from).map_err(io_error(from))?;
            atomic::write_atomic(to, &bytes).map_err(io_error(to))
        }
    }
}

/// Shift the backups by one and make the current file `.bak.1`.
fn rotate_backups(path: &Path) -> Result<(), StoreError> {
    for n in (1..BACKUPS).rev() {
        let from = backup_path(path, n);
        match fs::rename(&from, backup_path(path, n + 1)) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(io_error(&from)(err)),
        }
    }
    if !path.exists() {
        return Ok(());
    }
    let newest = backup_path(path, 1);
    match fs::remove_file(&newest) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(io_error(&newest)(err)),
    }
    link_or_copy(path, &newest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap as Map;
    use std::sync::Arc;

    fn at(rfc3339: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(rfc3339)
            .expect("time")
            .to_utc()
    }

    /// Every file in `dir` with its content.
    fn files(dir: &Path) -> Map<String, Vec<u8>> {
        fs::read_dir(dir)
            .expect("read dir")
            .map(|e| {
                let e = e.expect("entry");
                let name = e.file_name().to_string_lossy().into_owned();
                (name, fs::read(e.path()).expect("read"))
            })
            .collect()
    }

    /// A tracker whose issue 1 has been updated with attempts 1..=n.
    fn tracker_with_updates(dir: &Path, n: u32) -> StateTracker {
        let (tracker, note) = StateTracker::load(&dir.join("state.json")).expect("load");
        assert_eq!(note, LoadNote::Fresh);
        for k in 1..=n {
            tracker.update_issue(1, |r| r.attempts = k).expect("update");
        }
        tracker
    }

    fn attempts_in(path: &Path) -> u32 {
        let state: State = serde_json::from_slice(&fs::read(path).expect("read")).expect("parse");
        state.issues[&1].attempts
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("repo").join("state.json");
        let (tracker, note) = StateTracker::load(&path).expect("load");
        assert_eq!(note, LoadNote::Fresh);
        tracker
            .update(|s| {
                s.session.issues_processed = 2;
                s.worker_heartbeats
                    .insert("triage".into(), at("2025-01-01T00:00:00Z"));
            })
            .expect("update");
        tracker
            .update_issue(7, |r| {
                r.phase = Phase::WaitingForHuman {
                    hitl: HitlRecord {
                        origin: "hydraflow-review".into(),
                        stage: Stage::Review,
                        cause: "ci failed\ntwice".into(),
                        escalated_at: at("2025-01-01T00:00:00Z"),
                    },
                    pending: Some(HitlCommand::Correct {
                        text: "use x".into(),
                    }),
                };
                r.worktree = Some(PathBuf::from("/wt/issue-7"));
                r.branch = Some("agent/issue-7".into());
                r.pull_request = Some(12);
                r.start_journal(
                    Stage::Review,
                    vec![
                        Effect::Swap {
                            to: "hydraflow-hitl".into(),
                        },
                        Effect::Comment {
                            key: "escalation-1".into(),
                            body: "help".into(),
                        },
                    ],
                    After::Done {
                        outcome: Outcome::Merged,
                    },
                );
            })
            .expect("update issue");
        let written = tracker.snapshot();
        assert!(written.last_updated.is_some());
        let (again, note) = StateTracker::load(&path).expect("reload");
        assert_eq!(note, LoadNote::Loaded);
        assert_eq!(again.snapshot(), written);
        assert_eq!(again.issue(7), written.issues[&7]);
        assert_eq!(again.issue(8), IssueRecord::default());
        assert_eq!(StateTracker::read_only(&path).expect("read only"), written);
    }

    #[test]
    fn unknown_and_missing_fields_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        let text = r#"{"schema_version": 2, "from_the_future": [1, 2],
            "issues": {"5": {"attempts": 2, "new_field": {"x": 1}}}}"#;
        fs::write(&path, text).expect("write");
        let (tracker, note) = StateTracker::load(&path).expect("load");
        assert_eq!(note, LoadNote::Loaded);
        let state = tracker.snapshot();
        assert_eq!(state.schema_version, 2);
        assert_eq!(state.issues[&5].attempts, 2);
        assert_eq!(state.session, SessionCounters::default());
    }

    #[test]
    fn backups_hold_the_previous_versions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tracker = tracker_with_updates(dir.path(), 5);
        let path = tracker.path().to_path_buf();
        assert_eq!(attempts_in(&path), 5);
        assert_eq!(attempts_in(&backup_path(&path, 1)), 4);
        assert_eq!(attempts_in(&backup_path(&path, 2)), 3);
        assert_eq!(attempts_in(&backup_path(&path, 3)), 2);
        let mut names: Vec<String> = files(dir.path()).into_keys().collect();
        names.sort();
        let expected = [
            "state.json",
            "state.json.bak.1",
            "state.json.bak.2",
            "state.json.bak.3",
        ];
        assert_eq!(names, expected);
    }

    #[test]
    fn corrupt_file_recovers_from_newest_good_backup() {
        // (garbage written over: state.json, then also .bak.1, …) -> backup used, attempts in it
        let cases: [(&[&str], usize, u32); 4] = [
            (&["state.json"], 1, 4),
            (&["state.json", "state.json.bak.1"], 2, 3),
            (
                &["state.json", "state.json.bak.1", "state.json.bak.2"],
                3,
                2,
            ),
            (&["state.json", "state.json.bak.2"], 1, 4),
        ];
        for (corrupt, backup, attempts) in cases {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = tracker_with_updates(dir.path(), 5).path().to_path_buf();
            for name in corrupt {
                fs::write(dir.path().join(name), b"{\"issues\": {\"1\": {\"att").expect("corrupt");
            }
            let (tracker, note) = StateTracker::load(&path).expect("load");
            let LoadNote::RecoveredFromBackup {
                problem,
                backup: used,
            } = note
            else {
                panic!("{corrupt:?}: expected recovery, got {note:?}");
            };
            assert_eq!(used, backup_path(&path, backup), "{corrupt:?}");
            assert!(problem.contains("not a valid state file"), "{problem}");
            assert_eq!(tracker.issue(1).attempts, attempts, "{corrupt:?}");
            // state.json now holds the recovered state; the bad file is kept aside.
            assert_eq!(attempts_in(&path), attempts, "{corrupt:?}");
            let aside: Vec<Vec<u8>> = files(dir.path())
                .into_iter()
                .filter(|(n, _)| n.starts_with("state.json.corrupt-"))
                .map(|(_, c)| c)
                .collect();
            assert_eq!(
                aside,
                vec![b"{\"issues\": {\"1\": {\"att".to_vec()],
                "{corrupt:?}"
            );
            // And it keeps working.
            tracker.update_issue(1, |r| r.attempts = 9).expect("update");
            assert_eq!(attempts_in(&path), 9);
            assert_eq!(attempts_in(&backup_path(&path, 1)), attempts);
        }
    }

    #[test]
    fn all_corrupt_is_an_error_and_touches_nothing() {
        for garbage in [&b""[..], b"not json", b"[1,2]", b"{\"issues\": 3}"] {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = tracker_with_updates(dir.path(), 5).path().to_path_buf();
            for name in [
                "state.json",
                "state.json.bak.1",
                "state.json.bak.2",
                "state.json.bak.3",
            ] {
                fs::write(dir.path().join(name), garbage).expect("corrupt");
            }
            let before = files(dir.path());
            let err = StateTracker::load(&path).expect_err("all corrupt");
            let StoreError::Corrupt { path: bad, message } = &err else {
                panic!("expected Corrupt, got {err:?}");
            };
            assert_eq!(bad, &path);
            assert!(message.contains("state.json.bak.3"), "{message}");
            assert!(StateTracker::read_only(&path).is_err());
            assert_eq!(files(dir.path()), before);
        }
    }

    #[test]
    fn read_only_recovers_without_writing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = tracker_with_updates(dir.path(), 3).path().to_path_buf();
        fs::write(&path, b"garbage").expect("corrupt");
        let before = files(dir.path());
        let state = StateTracker::read_only(&path).expect("read only");
        assert_eq!(state.issues[&1].attempts, 2);
        assert_eq!(files(dir.path()), before);
    }

    #[test]
    fn leftover_temp_files_are_ignored_and_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = tracker_with_updates(dir.path(), 2).path().to_path_buf();
        // What a crash mid-write leaves: an empty and a half-written temp file.
        fs::write(dir.path().join(".state.json.a1B2c3.tmp"), b"").expect("temp");
        fs::write(dir.path().join(".state.json.x9Y8z7.tmp"), b"{\"issues\": {").expect("temp");
        let names = |d: &Path| files(d).into_keys().collect::<Vec<_>>();
        let with_temps = names(dir.path());
        assert_eq!(with_temps.len(), 4, "{with_temps:?}");
        assert_eq!(
            StateTracker::read_only(&path).expect("read").issues[&1].attempts,
            2
        );
        assert_eq!(names(dir.path()), with_temps, "read_only removed nothing");
        let (tracker, note) = StateTracker::load(&path).expect("load");
        assert_eq!(note, LoadNote::Loaded);
        assert_eq!(tracker.issue(1).attempts, 2);
        assert_eq!(names(dir.path()), ["state.json", "state.json.bak.1"]);
    }

    /// A version 1 record's lifecycle fields become one phase.
    #[test]
    fn version_1_records_are_migrated() {
        let hitl = r#"{"origin": "hydraflow-ready", "stage": "implement", "cause": "c", "escalated_at": "2025-01-01T00:00:00Z"}"#;
        let cases: Vec<(String, Phase)> = vec![
            ("{}".into(), Phase::Open),
            (
                r#"{"claimed": true, "interrupted": "review"}"#.into(),
                Phase::Claimed {
                    stage: Stage::Review,
                },
            ),
            (
                r#"{"claimed": true, "outcome": null}"#.into(),
                Phase::Claimed {
                    stage: Stage::Implement,
                },
            ),
            (
                r#"{"claimed": false, "outcome": "merged"}"#.into(),
                Phase::Done {
                    outcome: Outcome::Merged,
                },
            ),
            (
                format!(r#"{{"hitl": {hitl}, "pending_hitl": {{"action": "skip"}}}}"#),
                Phase::WaitingForHuman {
                    hitl: serde_json::from_str(hitl).expect("hitl"),
                    pending: Some(HitlCommand::Skip),
                },
            ),
        ];
        for (json, phase) in cases {
            let record: IssueRecord = serde_json::from_str(&json).expect(&json);
            assert_eq!(record.phase, phase, "{json}");
            // Written back in this schema, and read the same.
            let again: IssueRecord =
                serde_json::from_str(&serde_json::to_string(&record).expect("ser")).expect("de");
            assert_eq!(again, record, "{json}");
        }
    }

    /// A write that fails leaves the state as it was, in memory and on disk.
    #[test]
    fn failed_write_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tracker = tracker_with_updates(dir.path(), 2);
        // A directory where state.json's temp file would go makes the rename fail.
        let path = tracker.path().to_path_buf();
        fs::remove_file(&path).expect("remove");
        fs::create_dir(&path).expect("dir in the way");
        fs::write(path.join("x"), b"x").expect("non-empty");
        let err = tracker.update_issue(1, |r| r.attempts = 7);
        assert!(err.is_err());
        assert_eq!(tracker.issue(1).attempts, 2, "memory not ahead of disk");
        fs::remove_dir_all(&path).expect("clear");
        tracker.probe().expect("probe writes the old state");
        assert_eq!(attempts_in(&path), 2);
    }

    #[test]
    fn concurrent_updates_are_all_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (tracker, _) = StateTracker::load(&dir.path().join("state.json")).expect("load");
        let tracker = Arc::new(tracker);
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let tracker = Arc::clone(&tracker);
                std::thread::spawn(move || {
                    for _ in 0..10 {
                        tracker
                            .update_issue(t, |r| r.attempts += 1)
                            .expect("update");
                        tracker
                            .update(|s| s.session.issues_processed += 1)
                            .expect("update");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let (reloaded, note) = StateTracker::load(tracker.path()).expect("reload");
        assert_eq!(note, LoadNote::Loaded);
        let state = reloaded.snapshot();
        assert_eq!(state.session.issues_processed, 80);
        assert_eq!(state.issues.len(), 8);
        assert!(state.issues.values().all(|r| r.attempts == 10));
        assert_eq!(state, tracker.snapshot());
    }
}
