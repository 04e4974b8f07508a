//! The session log: `sessions.jsonl`, one record per worker session, the last
//! ten kept.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::StoreError;

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
    /// # Errors
    /// [`StoreError::Io`] when the file cannot be written.
    pub fn start(path: &Path, repo: &str) -> Result<(SessionLog, SessionRecord), StoreError> {
        let _ = (path, repo);
        todo!("store helper implements this")
    }

    /// Replace the record with the same id (atomically rewriting the file).
    ///
    /// # Errors
    /// [`StoreError::Io`] when the file cannot be written.
    pub fn update(&self, record: &SessionRecord) -> Result<(), StoreError> {
        let _ = record;
        todo!("store helper implements this")
    }

    /// All records, oldest first; unreadable lines are skipped.
    ///
    /// # Errors
    /// [`StoreError::Io`] when the file exists but cannot be read.
    pub fn read_all(path: &Path) -> Result<Vec<SessionRecord>, StoreError> {
        let _ = path;
        todo!("store helper implements this")
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
