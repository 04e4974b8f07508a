//! The state tracker: `state.json`, the worker's durable memory of every issue
//! it touches (attempts, worktree, branch, pull request, HITL origin, cause and
//! pending correction, interrupted stage), session counters and heartbeats.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use chrono::{SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use super::StoreError;
use super::atomic;
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
    /// Under the lock: `f` runs, `last_updated` and `schema_version` are set,
    /// the backups shift (`.bak.2` to `.bak.3`, `.bak.1` to `.bak.2`, the
    /// current file hard-linked as `.bak.1`, copied where links fail) and the
    /// new pretty-printed JSON replaces `state.json` atomically. At every
    /// instant `state.json` exists.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the write fails; the in-memory change is kept
    /// and written again by the next successful update.
    pub fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> Result<R, StoreError> {
        let mut state = self.state.lock().expect("state lock");
        let result = f(&mut state);
        state.schema_version = SCHEMA_VERSION;
        state.last_updated = Some(Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true));
        let bytes = to_json(&state, &self.path)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io_error(dir))?;
        }
        rotate_backups(&self.path)?;
        atomic::write_atomic(&self.path, &bytes).map_err(io_error(&self.path))?;
        Ok(result)
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
        source,
    }
}

fn to_json(state: &State, path: &Path) -> Result<Vec<u8>, StoreError> {
    let mut bytes = serde_json::to_vec_pretty(state).map_err(|e| StoreError::Io {
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidData, e),
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
                    .insert("triage".into(), "2025-01-01T00:00:00Z".into());
            })
            .expect("update");
        tracker
            .update_issue(7, |r| {
                r.claimed = true;
                r.interrupted = Some(Stage::Implement);
                r.worktree = Some(PathBuf::from("/wt/issue-7"));
                r.branch = Some("agent/issue-7".into());
                r.pull_request = Some(12);
                r.hitl = Some(HitlRecord {
                    origin: "hydraflow-review".into(),
                    stage: Stage::Review,
                    cause: "ci failed\ntwice".into(),
                    escalated_at: "2025-01-01T00:00:00Z".into(),
                });
                r.pending_hitl = Some(HitlCommand::Correct {
                    text: "use x".into(),
                });
                r.outcome = Some(Outcome::Merged);
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
