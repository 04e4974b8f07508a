//! The session log: `sessions.jsonl`, one record per worker session, the last
//! ten kept, each with the totals of its agent calls; and the call ledger,
//! `agent-calls.jsonl`, one record per agent call (wall and CPU time, memory
//! peak, tokens, cost), from which cost per issue and per day is summed and
//! `agent.daily_budget_usd` is checked. Days are UTC days.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::Mutex;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use super::StoreError;
use super::atomic;
use crate::agent::contain::Resources;
use crate::agent::{AgentCall, AgentOutcome, Stage, Usage};

/// Records kept in `sessions.jsonl`.
pub const KEEP_SESSIONS: usize = 10;

/// Whether a session is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionStatus {
    /// Running (or the worker died without ending it).
    Active,
    /// Ended cleanly.
    Completed,
}

/// One session record (docs/design/persistence.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// `<slug>-<timestamp>`.
    pub id: String,
    /// The repository slug.
    pub repo: String,
    /// RFC 3339 UTC.
    pub started_at: String,
    /// RFC 3339 UTC, once ended.
    pub ended_at: Option<String>,
    /// Issues that left a stage.
    pub issues_processed: u64,
    /// Issues merged or closed as satisfied.
    pub issues_succeeded: u64,
    /// Issues escalated.
    pub issues_failed: u64,
    /// Active or completed.
    pub status: SessionStatus,
    /// Totals of the session's agent calls (added to the original's shape;
    /// missing in records of older versions).
    #[serde(default)]
    pub agents: AgentTotals,
}

/// What a session's agent calls used, summed.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentTotals {
    /// Agent calls finished.
    pub calls: u64,
    /// Their cost in US dollars, as the agents reported it.
    pub cost_usd: f64,
    /// Input tokens (cache reads and writes included).
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Wall time, seconds.
    pub wall_seconds: f64,
    /// CPU time, seconds.
    pub cpu_seconds: f64,
}

impl AgentTotals {
    fn add(&mut self, r: &CallRecord) {
        self.calls += 1;
        self.cost_usd += r.cost_usd.unwrap_or(0.0);
        self.input_tokens += r.usage.input_tokens
            + r.usage.cache_read_input_tokens
            + r.usage.cache_creation_input_tokens;
        self.output_tokens += r.usage.output_tokens;
        self.wall_seconds += r.resources.wall_ms as f64 / 1000.0;
        self.cpu_seconds += r.resources.cpu_ms.unwrap_or(0) as f64 / 1000.0;
    }
}

/// The session log file.
#[derive(Debug, Clone)]
pub struct SessionLog {
    path: PathBuf,
}

impl SessionLog {
    /// Start a new session for `repo`: append an `active` record (dropping
    /// records beyond the last [`KEEP_SESSIONS`]).
    ///
    /// `repo` is the repository slug (`owner/repo` is accepted and turned into
    /// `owner-repo` for the id). The id is `<slug>-<YYYYmmddTHHMMSSZ>`, with
    /// `-2`, `-3`, … appended when a session of the same second is already
    /// recorded. The file (and its directory) is created when missing and
    /// rewritten atomically.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the file cannot be written.
    pub fn start(path: &Path, repo: &str) -> Result<(SessionLog, SessionRecord), StoreError> {
        let now = Utc::now();
        let mut records = SessionLog::read_all(path)?;
        let base = format!(
            "{}-{}",
            repo.replace('/', "-"),
            now.format("%Y%m%dT%H%M%SZ")
        );
        let mut id = base.clone();
        let mut n = 1;
        while records.iter().any(|r| r.id == id) {
            n += 1;
            id = format!("{base}-{n}");
        }
        let record = SessionRecord {
            id,
            repo: repo.to_owned(),
            started_at: now.to_rfc3339_opts(SecondsFormat::Secs, true),
            ended_at: None,
            issues_processed: 0,
            issues_succeeded: 0,
            issues_failed: 0,
            status: SessionStatus::Active,
            agents: AgentTotals::default(),
        };
        records.push(record.clone());
        let log = SessionLog {
            path: path.to_path_buf(),
        };
        log.write(&records)?;
        Ok((log, record))
    }

    /// Replace the record with the same id (atomically rewriting the file).
    /// A record whose id is not in the file (trimmed away, or the file was
    /// removed) is appended. The agent totals are [`CallLedger`]'s: the
    /// file's are kept when they are further along than `record`'s.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the file cannot be written.
    pub fn update(&self, record: &SessionRecord) -> Result<(), StoreError> {
        let mut records = SessionLog::read_all(&self.path)?;
        match records.iter_mut().find(|r| r.id == record.id) {
            Some(slot) => {
                let agents = if slot.agents.calls > record.agents.calls {
                    slot.agents
                } else {
                    record.agents
                };
                *slot = record.clone();
                slot.agents = agents;
            }
            None => records.push(record.clone()),
        }
        self.write(&records)
    }

    /// All records, oldest first; unreadable lines are skipped.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the file exists but cannot be read.
    pub fn read_all(path: &Path) -> Result<Vec<SessionRecord>, StoreError> {
        read_json_lines(path)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Add one call to the totals of the newest record (this worker's
    /// session: one worker runs a repository at a time).
    fn add_call(&self, call: &CallRecord) -> Result<(), StoreError> {
        let mut records = SessionLog::read_all(&self.path)?;
        if let Some(last) = records.last_mut() {
            last.agents.add(call);
            self.write(&records)?;
        }
        Ok(())
    }

    /// Rewrite the file with the last [`KEEP_SESSIONS`] of `records`.
    fn write(&self, records: &[SessionRecord]) -> Result<(), StoreError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io {
                path,
                cause: source,
            }
        };
        let keep = &records[records.len().saturating_sub(KEEP_SESSIONS)..];
        let mut bytes = Vec::new();
        for record in keep {
            serde_json::to_writer(&mut bytes, record)
                .map_err(|e| io_err(&self.path)(io::Error::new(io::ErrorKind::InvalidData, e)))?;
            bytes.push(b'\n');
        }
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        atomic::write_atomic(&self.path, &bytes).map_err(io_err(&self.path))
    }
}

/// Days of call records kept in `agent-calls.jsonl`.
pub const KEEP_CALL_DAYS: i64 = 90;

/// One agent call, as recorded in `agent-calls.jsonl` and in the
/// `agent_activity` event of its end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallRecord {
    /// When it ended, RFC 3339 UTC.
    pub at: String,
    /// Its UTC day, `YYYY-MM-DD`.
    pub day: String,
    /// Issue (or pull request) number.
    pub issue: u64,
    /// Stage.
    pub stage: Stage,
    /// The agent program (argv\[0\]).
    pub program: String,
    /// The model the agent reported.
    #[serde(default)]
    pub model: Option<String>,
    /// Exit code.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// The signal that ended it.
    #[serde(default)]
    pub signal: Option<i32>,
    /// Killed by the timeout.
    #[serde(default)]
    pub timed_out: bool,
    /// `success`, or the failure's class (`attempt`, `later`, `pause`).
    pub outcome: String,
    /// Time and memory.
    #[serde(default)]
    pub resources: Resources,
    /// Tokens.
    #[serde(default)]
    pub usage: Usage,
    /// Cost in US dollars, as the agent reported it.
    #[serde(default)]
    pub cost_usd: Option<f64>,
}

impl CallRecord {
    /// The record of `call` ending with `outcome` at `at`.
    pub fn of(call: &AgentCall, outcome: &AgentOutcome, at: DateTime<Utc>) -> CallRecord {
        CallRecord {
            at: at.to_rfc3339_opts(SecondsFormat::Secs, true),
            day: at.format("%Y-%m-%d").to_string(),
            issue: call.issue,
            stage: call.stage,
            program: call.argv.first().cloned().unwrap_or_default(),
            model: outcome.model.clone(),
            exit_code: outcome.exit_code,
            signal: outcome.signal,
            timed_out: outcome.timed_out,
            outcome: outcome
                .failure()
                .map_or("success", |f| f.class())
                .to_string(),
            resources: outcome.resources,
            usage: outcome.usage,
            cost_usd: outcome.cost_usd,
        }
    }
}

/// Cost summed per issue and per UTC day.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Costs {
    /// US dollars per issue number.
    pub per_issue: BTreeMap<u64, f64>,
    /// US dollars per day (`YYYY-MM-DD`).
    pub per_day: BTreeMap<String, f64>,
    /// Agent calls per issue number.
    pub calls_per_issue: BTreeMap<u64, u64>,
}

/// The call ledger of one repository.
#[derive(Debug)]
pub struct CallLedger {
    calls: PathBuf,
    sessions: SessionLog,
    lock: Mutex<()>,
}

impl CallLedger {
    /// The ledger at `calls` (`agent-calls.jsonl`), adding totals to the
    /// session log at `sessions`. Records older than [`KEEP_CALL_DAYS`] are
    /// dropped (the file is rewritten atomically when any are).
    ///
    /// # Errors
    /// [`StoreError::Io`] when an existing file cannot be read or rewritten.
    pub fn open(calls: &Path, sessions: &Path) -> Result<CallLedger, StoreError> {
        let records = read_calls(calls)?;
        let cutoff = (Utc::now() - chrono::Duration::days(KEEP_CALL_DAYS))
            .format("%Y-%m-%d")
            .to_string();
        if records.iter().any(|r| r.day < cutoff) {
            let mut bytes = Vec::new();
            for r in records.iter().filter(|r| r.day >= cutoff) {
                serde_json::to_writer(&mut bytes, r).map_err(|e| StoreError::Io {
                    path: calls.to_path_buf(),
                    cause: io::Error::new(io::ErrorKind::InvalidData, e),
                })?;
                bytes.push(b'\n');
            }
            atomic::write_atomic(calls, &bytes).map_err(|source| StoreError::Io {
                path: calls.to_path_buf(),
                cause: source,
            })?;
        }
        Ok(CallLedger {
            calls: calls.to_path_buf(),
            sessions: SessionLog {
                path: sessions.to_path_buf(),
            },
            lock: Mutex::new(()),
        })
    }

    /// Append `record` and add it to the session's totals.
    ///
    /// # Errors
    /// [`StoreError::Io`] naming the file that cannot be written.
    pub fn record(&self, record: &CallRecord) -> Result<(), StoreError> {
        let _held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let io_err = |source| StoreError::Io {
            path: self.calls.clone(),
            cause: source,
        };
        let mut line = serde_json::to_vec(record)
            .map_err(|e| io_err(io::Error::new(io::ErrorKind::InvalidData, e)))?;
        line.push(b'\n');
        if let Some(dir) = self.calls.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(io_err)?;
        }
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.calls)
            .map_err(io_err)?;
        // One write(2) of a whole line in append mode: a crash leaves whole lines.
        file.write_all(&line).map_err(io_err)?;
        self.sessions.add_call(record)
    }
}

/// Every record of `agent-calls.jsonl`, oldest first; unreadable lines are skipped.
///
/// # Errors
/// [`StoreError::Io`] when the file exists but cannot be read.
pub fn read_calls(path: &Path) -> Result<Vec<CallRecord>, StoreError> {
    read_json_lines(path)
}

/// Every line of the JSON Lines file at `path` that reads as a `T` (a line
/// cut short by a crash, or of another shape, is skipped); a missing file
/// is empty.
///
/// # Errors
/// [`StoreError::Io`] when the file exists but cannot be read.
fn read_json_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>, StoreError> {
    let text = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(cause) => {
            return Err(StoreError::Io {
                path: path.to_path_buf(),
                cause,
            });
        }
    };
    Ok(text
        .split(|&b| b == b'\n')
        .filter_map(|line| serde_json::from_slice(line).ok())
        .collect())
}

/// Cost per issue and per day of the ledger at `path`.
///
/// # Errors
/// As [`read_calls`].
pub fn costs(path: &Path) -> Result<Costs, StoreError> {
    let mut costs = Costs::default();
    for r in read_calls(path)? {
        let cost = r.cost_usd.unwrap_or(0.0);
        *costs.per_issue.entry(r.issue).or_default() += cost;
        *costs.per_day.entry(r.day.clone()).or_default() += cost;
        *costs.calls_per_issue.entry(r.issue).or_default() += 1;
    }
    Ok(costs)
}

/// Whether the day of `now` has spent `budget_usd` or more: `Some(t)` with
/// `t` the next UTC midnight (Unix seconds), when agents may run again;
/// `None` when under budget or when no budget is set.
///
/// # Errors
/// As [`read_calls`].
pub fn over_budget(
    path: &Path,
    budget_usd: Option<f64>,
    now: DateTime<Utc>,
) -> Result<Option<u64>, StoreError> {
    let Some(budget) = budget_usd else {
        return Ok(None);
    };
    let today = now.format("%Y-%m-%d").to_string();
    let spent = costs(path)?.per_day.get(&today).copied().unwrap_or(0.0);
    if spent < budget {
        return Ok(None);
    }
    let next = now
        .date_naive()
        .succ_opt()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp());
    Ok(next.and_then(|t| u64::try_from(t).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_appends_an_active_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("o-r").join("sessions.jsonl");
        let (log, record) = SessionLog::start(&path, "owner/repo").expect("start");
        assert_eq!(log.path(), path);
        assert_eq!(record.status, SessionStatus::Active);
        assert_eq!(record.repo, "owner/repo");
        assert_eq!(record.ended_at, None);
        let stamp = record.id.strip_prefix("owner-repo-").expect("slug prefix");
        let parsed = chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%dT%H%M%SZ").expect("stamp");
        let started = chrono::DateTime::parse_from_rfc3339(&record.started_at).expect("rfc 3339");
        assert_eq!(parsed, started.naive_utc());
        assert_eq!(SessionLog::read_all(&path).expect("read"), [record]);
    }

    #[test]
    fn record_shape_is_the_spec_shape() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sessions.jsonl");
        SessionLog::start(&path, "o-r").expect("start");
        let text = fs::read_to_string(&path).expect("read");
        let value: serde_json::Value = serde_json::from_str(text.trim_end()).expect("json");
        let mut keys: Vec<&str> = value
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        let expected = [
            "agents",
            "ended_at",
            "id",
            "issues_failed",
            "issues_processed",
            "issues_succeeded",
            "repo",
            "started_at",
            "status",
        ];
        assert_eq!(keys, expected);
        assert_eq!(value["status"], "active");
    }

    #[test]
    fn update_replaces_by_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sessions.jsonl");
        let (_, first) = SessionLog::start(&path, "o-r").expect("start");
        let (log, mut second) = SessionLog::start(&path, "o-r").expect("start");
        assert_ne!(first.id, second.id, "same-second sessions get distinct ids");
        second.status = SessionStatus::Completed;
        second.ended_at = Some("2030-01-01T00:00:00Z".into());
        second.issues_processed = 3;
        second.issues_succeeded = 2;
        second.issues_failed = 1;
        log.update(&second).expect("update");
        assert_eq!(SessionLog::read_all(&path).expect("read"), [first, second]);
    }

    #[test]
    fn keeps_the_last_sessions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sessions.jsonl");
        let ids: Vec<String> = (0..KEEP_SESSIONS + 3)
            .map(|_| SessionLog::start(&path, "o-r").expect("start").1.id)
            .collect();
        let kept: Vec<String> = SessionLog::read_all(&path)
            .expect("read")
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(kept, ids[3..]);
    }

    #[test]
    fn bad_lines_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sessions.jsonl");
        let (_, record) = SessionLog::start(&path, "o-r").expect("start");
        let good = fs::read_to_string(&path).expect("read");
        fs::write(
            &path,
            format!("not json\n{good}{{\"id\": 3}}\n\n{{\"id\":\"x\",\"re"),
        )
        .expect("write");
        assert_eq!(
            SessionLog::read_all(&path).expect("read"),
            std::slice::from_ref(&record)
        );
        // The next rewrite drops them.
        let (_, next) = SessionLog::start(&path, "o-r").expect("start");
        assert_eq!(SessionLog::read_all(&path).expect("read"), [record, next]);
        assert_eq!(fs::read_to_string(&path).expect("read").lines().count(), 2);
    }

    #[test]
    fn missing_file_reads_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let records = SessionLog::read_all(&dir.path().join("sessions.jsonl")).expect("read");
        assert_eq!(records, []);
    }

    #[test]
    fn unreadable_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A directory where the file should be: read fails with EISDIR.
        let path = dir.path().join("sessions.jsonl");
        fs::create_dir(&path).expect("mkdir");
        let err = SessionLog::read_all(&path).expect_err("a directory");
        assert!(matches!(err, StoreError::Io { path: p, .. } if p == path));
        assert!(SessionLog::start(&path, "o-r").is_err());
    }

    fn call(issue: u64, at: &str, usd: f64) -> CallRecord {
        let at = DateTime::parse_from_rfc3339(at)
            .expect("time")
            .with_timezone(&Utc);
        CallRecord {
            at: at.to_rfc3339_opts(SecondsFormat::Secs, true),
            day: at.format("%Y-%m-%d").to_string(),
            issue,
            stage: Stage::Implement,
            program: "claude".into(),
            model: Some("claude-opus".into()),
            exit_code: Some(0),
            signal: None,
            timed_out: false,
            outcome: "success".into(),
            resources: Resources {
                wall_ms: 2000,
                cpu_ms: Some(500),
                ..Resources::default()
            },
            usage: Usage {
                input_tokens: 100,
                output_tokens: 10,
                cache_read_input_tokens: 5,
                cache_creation_input_tokens: 0,
            },
            cost_usd: Some(usd),
        }
    }

    #[test]
    fn ledger_sums_per_issue_and_day_and_session() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sessions = dir.path().join("sessions.jsonl");
        let calls = dir.path().join("agent-calls.jsonl");
        let (log, mut record) = SessionLog::start(&sessions, "o-r").expect("start");
        let ledger = CallLedger::open(&calls, &sessions).expect("open");
        let now = Utc::now();
        let today = now.to_rfc3339();
        ledger.record(&call(1, &today, 0.5)).expect("record");
        ledger.record(&call(2, &today, 0.25)).expect("record");
        ledger.record(&call(1, &today, 1.0)).expect("record");
        let c = costs(&calls).expect("costs");
        assert_eq!(c.per_issue.get(&1), Some(&1.5));
        assert_eq!(c.per_issue.get(&2), Some(&0.25));
        assert_eq!(c.calls_per_issue.get(&1), Some(&2));
        assert_eq!(
            c.per_day.get(&now.format("%Y-%m-%d").to_string()),
            Some(&1.75)
        );
        let stored = SessionLog::read_all(&sessions).expect("read");
        let agents = stored[0].agents;
        assert_eq!(agents.calls, 3);
        assert!((agents.cost_usd - 1.75).abs() < 1e-9);
        assert_eq!(agents.input_tokens, 315);
        assert_eq!(agents.output_tokens, 30);
        assert!((agents.wall_seconds - 6.0).abs() < 1e-9);
        assert!((agents.cpu_seconds - 1.5).abs() < 1e-9);
        // The runtime's end-of-session update keeps the ledger's totals.
        record.status = SessionStatus::Completed;
        log.update(&record).expect("update");
        assert_eq!(
            SessionLog::read_all(&sessions).expect("read")[0]
                .agents
                .calls,
            3
        );
    }

    #[test]
    fn old_calls_are_dropped_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let calls = dir.path().join("agent-calls.jsonl");
        let sessions = dir.path().join("sessions.jsonl");
        let old = (Utc::now() - chrono::Duration::days(KEEP_CALL_DAYS + 2)).to_rfc3339();
        let recent = Utc::now().to_rfc3339();
        let ledger = CallLedger::open(&calls, &sessions).expect("open");
        ledger.record(&call(1, &old, 1.0)).expect("record");
        ledger.record(&call(2, &recent, 2.0)).expect("record");
        CallLedger::open(&calls, &sessions).expect("reopen");
        let kept: Vec<u64> = read_calls(&calls)
            .expect("read")
            .iter()
            .map(|c| c.issue)
            .collect();
        assert_eq!(kept, [2]);
    }

    /// The daily budget with an injected clock: spent on one UTC day, the
    /// pause lasts until the next UTC midnight; the next day is free again.
    #[test]
    fn daily_budget_pauses_until_the_next_day() {
        let dir = tempfile::tempdir().expect("tempdir");
        let calls = dir.path().join("agent-calls.jsonl");
        let ledger = CallLedger::open(&calls, &dir.path().join("sessions.jsonl")).expect("open");
        ledger
            .record(&call(1, "2026-03-01T09:00:00Z", 3.0))
            .expect("record");
        ledger
            .record(&call(2, "2026-03-01T17:30:00Z", 2.5))
            .expect("record");
        let at = |t: &str| {
            DateTime::parse_from_rfc3339(t)
                .expect("time")
                .with_timezone(&Utc)
        };
        let midnight = at("2026-03-02T00:00:00Z").timestamp() as u64;
        let check = |budget: Option<f64>, now: &str, want: Option<u64>| {
            assert_eq!(
                over_budget(&calls, budget, at(now)).expect("check"),
                want,
                "{budget:?} at {now}"
            );
        };
        check(Some(5.0), "2026-03-01T18:00:00Z", Some(midnight));
        check(Some(5.5), "2026-03-01T23:59:59Z", Some(midnight));
        check(Some(6.0), "2026-03-01T18:00:00Z", None);
        check(None, "2026-03-01T18:00:00Z", None);
        // The next day resumes.
        check(Some(5.0), "2026-03-02T00:00:00Z", None);
        // A missing ledger is no cost at all.
        assert_eq!(
            over_budget(
                &dir.path().join("none.jsonl"),
                Some(0.01),
                at("2026-03-01T18:00:00Z")
            )
            .expect("check"),
            None
        );
    }
}
