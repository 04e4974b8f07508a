//! The session log: `sessions.jsonl`, one record per worker session, the last
//! ten kept.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use chrono::{SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

use super::StoreError;
use super::atomic;

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

/// One session record (spec §6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// removed) is appended.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the file cannot be written.
    pub fn update(&self, record: &SessionRecord) -> Result<(), StoreError> {
        let mut records = SessionLog::read_all(&self.path)?;
        match records.iter_mut().find(|r| r.id == record.id) {
            Some(slot) => *slot = record.clone(),
            None => records.push(record.clone()),
        }
        self.write(&records)
    }

    /// All records, oldest first; unreadable lines are skipped.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the file exists but cannot be read.
    pub fn read_all(path: &Path) -> Result<Vec<SessionRecord>, StoreError> {
        let text = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StoreError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        Ok(text
            .split(|&b| b == b'\n')
            .filter_map(|line| serde_json::from_slice(line).ok())
            .collect())
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rewrite the file with the last [`KEEP_SESSIONS`] of `records`.
    fn write(&self, records: &[SessionRecord]) -> Result<(), StoreError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
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
}
