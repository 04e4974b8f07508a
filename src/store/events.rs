//! The event bus: an in-memory broadcast for live subscribers plus the
//! append-only `events.jsonl`, one record per line in the original's shape
//! `{"id","type","timestamp","data","session_id","repo"}`, rotated by size
//! and age.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::StoreError;
use crate::config::EventsConfig;

/// Event types (the original's names; docs/design/persistence.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    /// An issue moved between stages.
    PhaseChange,
    /// A stage task started, progressed or ended.
    WorkerUpdate,
    /// One display line of an agent.
    TranscriptLine,
    /// A pull request was opened.
    PrCreated,
    /// A review verdict.
    ReviewUpdate,
    /// A triage result.
    TriageUpdate,
    /// A plan result.
    PlannerUpdate,
    /// A merge result.
    MergeUpdate,
    /// A CI check poll.
    CiCheck,
    /// An issue escalated to a human.
    HitlEscalation,
    /// A HITL command was received or applied.
    HitlUpdate,
    /// The orchestrator started, paused, resumed or stopped.
    OrchestratorStatus,
    /// Something failed.
    Error,
    /// Something an operator must look at (repeated failures, recovered state).
    SystemAlert,
    /// Queue depths changed.
    QueueUpdate,
    /// A worker session started.
    SessionStart,
    /// A worker session ended.
    SessionEnd,
    /// Agent activity (tool use, commands).
    AgentActivity,
    /// Worktrees or branches of finished issues were removed.
    GarbageCollected,
}

/// One event record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Increasing per repository, continued across restarts.
    pub id: u64,
    /// The event type.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// When it was published (RFC 3339 UTC).
    pub timestamp: DateTime<Utc>,
    /// Type-specific payload (always an object).
    pub data: serde_json::Value,
    /// The worker session that published it.
    pub session_id: String,
    /// The repository slug.
    pub repo: String,
}

/// Capacity of the live broadcast channel; a subscriber that falls further
/// behind gets `RecvError::Lagged`.
pub const CHANNEL_CAPACITY: usize = 4096;

/// Events kept in memory for [`EventBus::history`].
pub const HISTORY_LEN: usize = 5000;

/// How much of the end of `events.jsonl` `open` reads first to find the last
/// record (it reads further back only when that holds no valid record).
const TAIL_WINDOW: u64 = 1 << 20;

/// How much of the start of `events.jsonl` `open` reads to find the first
/// record's timestamp.
const HEAD_WINDOW: u64 = 64 << 10;

/// The event bus of one repository: internally synchronised, meant to be
/// shared in an `Arc`.
///
/// `publish` takes a short lock (one `write(2)` to the `O_APPEND` file, a push
/// onto the in-memory history, a non-blocking broadcast), so ids, file order,
/// history order and broadcast order agree.
///
/// Rotation (checked before each append): when the record would take the file
/// past `max_bytes`, or the file's first record is older than `max_age_days`.
/// A limit of 0 turns that check off.
#[derive(Debug)]
pub struct EventBus {
    sender: broadcast::Sender<Event>,
    repo: String,
    session_id: String,
    limits: EventsConfig,
    log: Mutex<Log>,
}

/// The file side and the history, under one lock.
#[derive(Debug)]
struct Log {
    path: PathBuf,
    /// Open for appending; `None` after a failed (re)open, retried on the next publish.
    file: Option<File>,
    /// Bytes in the current file.
    size: u64,
    /// Timestamp of the current file's first record.
    first_timestamp: Option<DateTime<Utc>>,
    /// The file may end in a partial line: write a newline before the next record.
    torn: bool,
    next_id: u64,
    history: VecDeque<Event>,
}

impl EventBus {
    /// Open (append to) `path`, continuing ids after its last record.
    ///
    /// Only the tail of the file is read: its valid records seed the history
    /// and give the last id (a torn last line is skipped and the next record
    /// starts on a new line). When the file is missing or holds no valid
    /// record, the last id comes from `<path>.1` (the file was just rotated).
    /// Rotated files beyond `limits.keep_files` or older than
    /// `limits.max_age_days` are deleted.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the directory cannot be created or the file
    /// cannot be read or opened for appending.
    pub fn open(
        path: &Path,
        repo: &str,
        session_id: &str,
        limits: &EventsConfig,
    ) -> Result<EventBus, StoreError> {
        let io_err = |source| StoreError::Io {
            path: path.to_path_buf(),
            cause: source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: dir.to_path_buf(),
                cause: source,
            })?;
        }
        let mut tail = read_tail(path).map_err(io_err)?;
        if tail.events.is_empty() {
            let previous = rotated_path(path, 1);
            tail.events = read_tail(&previous)
                .map_err(|source| StoreError::Io {
                    path: previous.clone(),
                    cause: source,
                })?
                .events;
        }
        let first_timestamp = first_timestamp(path).map_err(io_err)?;
        let file = open_append(path).map_err(io_err)?;
        let next_id = tail.events.iter().map(|e| e.id).max().unwrap_or(0) + 1;
        let skip = tail.events.len().saturating_sub(HISTORY_LEN);
        let history: VecDeque<Event> = tail.events.into_iter().skip(skip).collect();
        prune_rotated(path, limits);
        let (sender, _) = broadcast::channel(CHANNEL_CAPACITY);
        Ok(EventBus {
            sender,
            repo: repo.to_owned(),
            session_id: session_id.to_owned(),
            limits: limits.clone(),
            log: Mutex::new(Log {
                path: path.to_path_buf(),
                file: Some(file),
                size: tail.size,
                first_timestamp,
                torn: tail.torn,
                next_id,
                history,
            }),
        })
    }

    /// Record and broadcast an event. A failed write is logged, never returned:
    /// the pipeline does not stop because the event log is full.
    ///
    /// `data` should be a JSON object (the original's shape); it is stored as given.
    pub fn publish(&self, kind: EventType, data: serde_json::Value) -> Event {
        let mut log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        let event = Event {
            id: log.next_id,
            kind,
            timestamp: Utc::now().trunc_subsecs(3),
            data,
            session_id: self.session_id.clone(),
            repo: self.repo.clone(),
        };
        log.next_id += 1;
        match serde_json::to_vec(&event) {
            Ok(mut line) => {
                line.push(b'\n');
                log.append(&line, event.timestamp, &self.limits);
            }
            Err(err) => tracing::warn!(id = event.id, "cannot serialise event: {err}"),
        }
        if log.history.len() >= HISTORY_LEN {
            log.history.pop_front();
        }
        log.history.push_back(event.clone());
        // No receivers is normal (no dashboard client connected).
        let _ = self.sender.send(event.clone());
        event
    }

    /// Live events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.sender.subscribe()
    }

    /// Recent events (the last [`HISTORY_LEN`] kept in memory, including the
    /// tail of the file read at `open`) with `id > since`, oldest first.
    pub fn history(&self, since: Option<u64>) -> Vec<Event> {
        let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        let start = since.map_or(0, |since| log.history.partition_point(|e| e.id <= since));
        log.history.range(start..).cloned().collect()
    }

    /// The id the next event will get.
    pub fn next_id(&self) -> u64 {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next_id
    }
}

impl Log {
    /// Append one line (rotating first when a limit is reached); errors are logged.
    fn append(&mut self, line: &[u8], timestamp: DateTime<Utc>, limits: &EventsConfig) {
        let too_big = limits.max_bytes > 0
            && self.size > 0
            && self.size + line.len() as u64 > limits.max_bytes;
        let too_old = limits.max_age_days > 0
            && self
                .first_timestamp
                .is_some_and(|first| timestamp - first > max_age(limits));
        if too_big || too_old {
            self.rotate(limits);
        }
        if self.file.is_none() {
            match open_append(&self.path) {
                Ok(file) => self.file = Some(file),
                Err(err) => {
                    tracing::warn!("cannot open {}: {err}", self.path.display());
                    return;
                }
            }
        }
        let Some(file) = self.file.as_mut() else {
            return;
        };
        let mut buf;
        let bytes = if self.torn {
            buf = Vec::with_capacity(line.len() + 1);
            buf.push(b'\n');
            buf.extend_from_slice(line);
            &buf[..]
        } else {
            line
        };
        match file.write_all(bytes) {
            Ok(()) => {
                self.size += bytes.len() as u64;
                self.torn = false;
                self.first_timestamp.get_or_insert(timestamp);
            }
            Err(err) => {
                // Part of the line may have been written.
                self.torn = true;
                tracing::warn!("cannot append to {}: {err}", self.path.display());
            }
        }
    }

    /// `events.jsonl` becomes `.1` (older ones shift up to `keep_files`, the
    /// rest and the too old are deleted) and a new file starts. On failure the
    /// current file is kept and the next attempt waits for the limits to be
    /// reached again.
    fn rotate(&mut self, limits: &EventsConfig) {
        self.file = None;
        if let Err(err) = shift_rotated(&self.path, limits.keep_files) {
            tracing::warn!("cannot rotate {}: {err}", self.path.display());
        }
        prune_rotated(&self.path, limits);
        self.size = 0;
        self.first_timestamp = None;
        match fs::metadata(&self.path) {
            Ok(meta) => self.torn = self.torn && meta.len() > 0,
            Err(_) => self.torn = false,
        }
    }
}

fn max_age(limits: &EventsConfig) -> chrono::Duration {
    i64::try_from(limits.max_age_days)
        .ok()
        .and_then(chrono::Duration::try_days)
        .unwrap_or(chrono::Duration::MAX)
}

/// `<path>.<n>`.
pub fn rotated_path(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn shift_rotated(path: &Path, keep: usize) -> io::Result<()> {
    if keep == 0 {
        return remove_if_exists(path);
    }
    for n in (1..keep).rev() {
        rename_if_exists(&rotated_path(path, n), &rotated_path(path, n + 1))?;
    }
    rename_if_exists(path, &rotated_path(path, 1))
}

fn rename_if_exists(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

/// Delete `<path>.<n>` for `n > keep_files`, and rotated files last written
/// more than `max_age_days` ago. Errors are logged.
fn prune_rotated(path: &Path, limits: &EventsConfig) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) => {
            tracing::warn!("cannot list {}: {err}", dir.display());
            return;
        }
    };
    let max_age = Duration::from_secs(limits.max_age_days.saturating_mul(86_400));
    let prefix = format!("{name}.");
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(n) = file_name
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let too_old = limits.max_age_days > 0
            && entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|modified| SystemTime::now().duration_since(modified).ok())
                .is_some_and(|age| age > max_age);
        if (n > limits.keep_files || too_old)
            && let Err(err) = remove_if_exists(&entry.path())
        {
            tracing::warn!("cannot delete {}: {err}", entry.path().display());
        }
    }
}

/// The end of an events file.
#[derive(Debug, Default)]
struct Tail {
    /// Valid records of the part read, in file order.
    events: Vec<Event>,
    /// File size in bytes.
    size: u64,
    /// The file does not end with a newline.
    torn: bool,
}

/// Read the valid records at the end of `path` (missing = empty), reading
/// further back while the part read holds none.
fn read_tail(path: &Path) -> io::Result<Tail> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Tail::default()),
        Err(err) => return Err(err),
    };
    let size = file.metadata()?.len();
    let mut window = TAIL_WINDOW;
    loop {
        let start = size.saturating_sub(window);
        file.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        Read::by_ref(&mut file)
            .take(size - start)
            .read_to_end(&mut buf)?;
        let torn = buf.last().is_some_and(|&b| b != b'\n');
        let mut text = &buf[..];
        if start > 0 {
            // The first line is (probably) cut: start after it.
            let cut = text
                .iter()
                .position(|&b| b == b'\n')
                .map_or(text.len(), |i| i + 1);
            text = &text[cut..];
        }
        let events: Vec<Event> = text
            .split(|&b| b == b'\n')
            .filter_map(|line| serde_json::from_slice(line).ok())
            .collect();
        if !events.is_empty() || start == 0 {
            return Ok(Tail { events, size, torn });
        }
        window = window.saturating_mul(4);
    }
}

/// The timestamp of the first valid record near the start of `path`.
fn first_timestamp(path: &Path) -> io::Result<Option<DateTime<Utc>>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err),
    };
    let mut reader = BufReader::new(file.take(HEAD_WINDOW));
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(None);
        }
        if let Ok(event) = serde_json::from_slice::<Event>(&line) {
            return Ok(Some(event.timestamp));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    fn limits(max_bytes: u64, max_age_days: u64, keep_files: usize) -> EventsConfig {
        EventsConfig {
            max_bytes,
            max_age_days,
            keep_files,
        }
    }

    fn open(path: &Path) -> EventBus {
        EventBus::open(
            path,
            "owner-repo",
            "owner-repo-20250101T000000Z",
            &limits(1 << 20, 7, 3),
        )
        .expect("open")
    }

    /// Every line of a file: `Some(id)` for a valid record, `None` for a bad line.
    fn ids_in(path: &Path) -> Vec<Option<u64>> {
        let text = fs::read_to_string(path).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str::<Event>(l).ok().map(|e| e.id))
            .collect()
    }

    fn valid_ids(path: &Path) -> Vec<u64> {
        ids_in(path).into_iter().flatten().collect()
    }

    #[test]
    fn type_names_are_the_spec_names() {
        let check = |kind: EventType, name: &str| {
            assert_eq!(serde_json::to_value(kind).expect("serialise"), json!(name));
        };
        check(EventType::PhaseChange, "phase_change");
        check(EventType::WorkerUpdate, "worker_update");
        check(EventType::TranscriptLine, "transcript_line");
        check(EventType::PrCreated, "pr_created");
        check(EventType::ReviewUpdate, "review_update");
        check(EventType::TriageUpdate, "triage_update");
        check(EventType::PlannerUpdate, "planner_update");
        check(EventType::MergeUpdate, "merge_update");
        check(EventType::CiCheck, "ci_check");
        check(EventType::HitlEscalation, "hitl_escalation");
        check(EventType::HitlUpdate, "hitl_update");
        check(EventType::OrchestratorStatus, "orchestrator_status");
        check(EventType::Error, "error");
        check(EventType::SystemAlert, "system_alert");
        check(EventType::QueueUpdate, "queue_update");
        check(EventType::SessionStart, "session_start");
        check(EventType::SessionEnd, "session_end");
        check(EventType::AgentActivity, "agent_activity");
    }

    #[test]
    fn record_has_the_exact_shape() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let bus = open(&path);
        let data = json!({"issue": 7, "from": "hydraflow-plan", "to": "hydraflow-ready"});
        let event = bus.publish(EventType::PhaseChange, data.clone());
        let text = fs::read_to_string(&path).expect("read");
        assert!(
            text.ends_with('\n') && text.lines().count() == 1,
            "{text:?}"
        );
        let record: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(text.trim_end()).expect("json object");
        let mut keys: Vec<&str> = record.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["data", "id", "repo", "session_id", "timestamp", "type"]
        );
        assert_eq!(record["id"], json!(1));
        assert_eq!(record["type"], json!("phase_change"));
        assert_eq!(record["data"], data);
        assert_eq!(record["session_id"], json!("owner-repo-20250101T000000Z"));
        assert_eq!(record["repo"], json!("owner-repo"));
        let stamp = record["timestamp"].as_str().expect("timestamp string");
        assert!(stamp.ends_with('Z'), "{stamp}");
        let parsed = DateTime::parse_from_rfc3339(stamp).expect("rfc 3339");
        assert_eq!(parsed, event.timestamp);
        assert_eq!(
            serde_json::from_str::<Event>(text.trim_end()).expect("event"),
            event
        );
    }

    #[test]
    fn ids_continue_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let bus = open(&path);
        for _ in 0..3 {
            bus.publish(EventType::QueueUpdate, json!({}));
        }
        drop(bus);
        let bus = open(&path);
        assert_eq!(bus.next_id(), 4);
        assert_eq!(bus.publish(EventType::Error, json!({})).id, 4);
        let history: Vec<u64> = bus.history(None).iter().map(|e| e.id).collect();
        assert_eq!(history, [1, 2, 3, 4]);
        assert_eq!(valid_ids(&path), [1, 2, 3, 4]);
    }

    #[test]
    fn ids_continue_from_the_rotated_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let bus = open(&path);
        for _ in 0..5 {
            bus.publish(EventType::QueueUpdate, json!({}));
        }
        drop(bus);
        fs::rename(&path, rotated_path(&path, 1)).expect("rotate by hand");
        let bus = open(&path);
        assert_eq!(bus.publish(EventType::Error, json!({})).id, 6);
        assert_eq!(valid_ids(&path), [6]);
    }

    #[test]
    fn torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let bus = open(&path);
        bus.publish(EventType::QueueUpdate, json!({}));
        bus.publish(EventType::QueueUpdate, json!({}));
        drop(bus);
        let mut file = open_append(&path).expect("append");
        file.write_all(br#"{"id":3,"type":"err"#)
            .expect("torn write");
        drop(file);
        let bus = open(&path);
        assert_eq!(bus.publish(EventType::Error, json!({"x": 1})).id, 3);
        assert_eq!(ids_in(&path), [Some(1), Some(2), None, Some(3)]);
    }

    #[test]
    fn a_long_file_is_read_from_its_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let bus = open(&path);
        let filler = "x".repeat(1000);
        // Well over TAIL_WINDOW, so only the tail is read at open.
        for _ in 0..1500 {
            bus.publish(EventType::TranscriptLine, json!({"line": filler}));
        }
        drop(bus);
        let bus = open(&path);
        let history = bus.history(None);
        assert!(
            !history.is_empty() && history.len() < 1500,
            "{}",
            history.len()
        );
        assert_eq!(history.last().map(|e| e.id), Some(1500));
        assert_eq!(bus.publish(EventType::Error, json!({})).id, 1501);
    }

    #[test]
    fn rotates_by_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let bus = EventBus::open(&path, "o-r", "s", &limits(2000, 7, 2)).expect("open");
        for n in 0..60 {
            bus.publish(
                EventType::TranscriptLine,
                json!({"line": format!("{n:0>80}")}),
            );
        }
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["events.jsonl", "events.jsonl.1", "events.jsonl.2"]);
        let mut ids = Vec::new();
        for file in [rotated_path(&path, 2), rotated_path(&path, 1), path.clone()] {
            assert!(fs::metadata(&file).expect("stat").len() <= 2000);
            ids.extend(valid_ids(&file));
        }
        let first = ids[0];
        assert!(first > 1, "the oldest events were rotated out");
        assert_eq!(ids, (first..=60).collect::<Vec<_>>());
    }

    fn set_age(path: &Path, days: u64) {
        let file = File::options().append(true).open(path).expect("open");
        let when = SystemTime::now() - Duration::from_secs(days * 86_400);
        file.set_modified(when).expect("set mtime");
    }

    #[test]
    fn rotates_by_age_and_deletes_old_rotated_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let old = r#"{"id":7,"type":"error","timestamp":"2000-01-01T00:00:00Z","data":{},"session_id":"s","repo":"o-r"}"#;
        fs::write(&path, format!("{old}\n")).expect("old record");
        for (n, age) in [(1, 0), (2, 30), (9, 0)] {
            fs::write(rotated_path(&path, n), format!("{n}\n")).expect("rotated");
            set_age(&rotated_path(&path, n), age);
        }
        let bus = EventBus::open(&path, "o-r", "s", &limits(1 << 20, 7, 3)).expect("open");
        // At open: .2 is older than 7 days, .9 is beyond keep_files.
        assert!(!rotated_path(&path, 2).exists());
        assert!(!rotated_path(&path, 9).exists());
        // .1 ages out before the rotation that will shift it to .2.
        set_age(&rotated_path(&path, 1), 8);
        assert_eq!(bus.publish(EventType::Error, json!({})).id, 8);
        assert_eq!(valid_ids(&path), [8]);
        assert_eq!(valid_ids(&rotated_path(&path, 1)), [7]);
        assert!(!rotated_path(&path, 2).exists());
        // The new file's first record is recent: no further rotation.
        assert_eq!(bus.publish(EventType::Error, json!({})).id, 9);
        assert_eq!(valid_ids(&path), [8, 9]);
    }

    #[test]
    fn keep_zero_discards_old_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let bus = EventBus::open(&path, "o-r", "s", &limits(300, 7, 0)).expect("open");
        for _ in 0..10 {
            bus.publish(EventType::QueueUpdate, json!({"depth": 1}));
        }
        assert_eq!(fs::read_dir(dir.path()).expect("list").count(), 1);
        assert_eq!(valid_ids(&path).last(), Some(&10));
    }

    #[test]
    fn history_since() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bus = open(&dir.path().join("events.jsonl"));
        for _ in 0..10 {
            bus.publish(EventType::WorkerUpdate, json!({}));
        }
        let check = |since: Option<u64>, expected: &[u64]| {
            let ids: Vec<u64> = bus.history(since).iter().map(|e| e.id).collect();
            assert_eq!(ids, expected, "since {since:?}");
        };
        check(None, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        check(Some(0), &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
        check(Some(7), &[8, 9, 10]);
        check(Some(10), &[]);
        check(Some(99), &[]);
    }

    #[test]
    fn history_is_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bus = open(&dir.path().join("events.jsonl"));
        for _ in 0..HISTORY_LEN + 5 {
            bus.publish(EventType::WorkerUpdate, json!({}));
        }
        let history = bus.history(None);
        assert_eq!(history.len(), HISTORY_LEN);
        assert_eq!(history[0].id, 6);
    }

    #[test]
    fn subscribers_receive_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bus = open(&dir.path().join("events.jsonl"));
        bus.publish(EventType::WorkerUpdate, json!({"before": true}));
        let mut rx = bus.subscribe();
        let a = bus.publish(EventType::PrCreated, json!({"pr": 1}));
        let b = bus.publish(EventType::MergeUpdate, json!({"pr": 1}));
        assert_eq!(rx.try_recv().expect("first"), a);
        assert_eq!(rx.try_recv().expect("second"), b);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn write_errors_are_not_returned() {
        // /dev/full accepts the open and fails every write with ENOSPC.
        let bus = open(Path::new("/dev/full"));
        let mut rx = bus.subscribe();
        let event = bus.publish(EventType::Error, json!({"message": "disk full"}));
        assert_eq!(event.id, 1);
        assert_eq!(bus.history(None), std::slice::from_ref(&event));
        assert_eq!(rx.try_recv().expect("broadcast"), event);
        assert_eq!(bus.publish(EventType::Error, json!({})).id, 2);
    }

    #[test]
    fn concurrent_publishers_get_unique_ordered_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.jsonl");
        let bus = Arc::new(open(&path));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let bus = Arc::clone(&bus);
                std::thread::spawn(move || {
                    for n in 0..50 {
                        bus.publish(EventType::AgentActivity, json!({"thread": t, "n": n}));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert_eq!(ids_in(&path), (1..=200).map(Some).collect::<Vec<_>>());
        let history: Vec<u64> = bus.history(None).iter().map(|e| e.id).collect();
        assert_eq!(history, (1..=200).collect::<Vec<_>>());
    }
}
