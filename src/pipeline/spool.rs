//! The HITL spool: `data_root/<slug>/spool/`, where `hydraflow hitl`
//! drops one JSON file per command for the running worker to apply, so the
//! CLI never writes `state.json` behind the worker's back. Files are
//! written atomically (temp file, rename); the worker deletes each file once
//! the command is recorded in `state.json`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::store::state::{HitlCommand, State};

/// Why a HITL command was refused before reaching the spool.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The issue has no HITL record in `state.json`.
    #[error("issue #{0} is not waiting for a human: see `hydraflow hitl list`")]
    NotWaiting(u64),
    /// A correction with no text.
    #[error("the correction is empty: say what the agent should do differently")]
    EmptyCorrection,
    /// The spool directory could not be written.
    #[error("cannot write to the spool directory {dir}: {cause}")]
    Io {
        /// The spool directory.
        dir: PathBuf,
        /// The OS error.
        cause: std::io::Error,
    },
}

/// Check `command` for `issue` against `state` (the issue must be waiting
/// for a human; a correction must have text) and hand it to the worker
/// through `dir`. The one path by which the CLI and the dashboard API send
/// HITL commands; returns the spool file written.
///
/// # Errors
/// [`SubmitError`] for an issue not in HITL, an empty correction or an I/O failure.
pub fn submit_command(
    dir: &Path,
    state: &State,
    issue: u64,
    command: HitlCommand,
) -> Result<PathBuf, SubmitError> {
    if let HitlCommand::Correct { text } = &command
        && text.trim().is_empty()
    {
        return Err(SubmitError::EmptyCorrection);
    }
    if state.issues.get(&issue).is_none_or(|r| r.hitl().is_none()) {
        return Err(SubmitError::NotWaiting(issue));
    }
    submit(
        dir,
        &SpoolEntry {
            issue,
            command,
            created_at: chrono::Utc::now().to_rfc3339(),
        },
    )
    .map_err(|source| SubmitError::Io {
        dir: dir.to_path_buf(),
        cause: source,
    })
}

/// One spooled command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolEntry {
    /// Issue number.
    pub issue: u64,
    /// The command.
    pub command: HitlCommand,
    /// When it was written (RFC 3339 UTC).
    pub created_at: String,
}

/// Write `entry` into `dir` atomically; returns the file written.
///
/// # Errors
/// I/O errors naming the directory.
pub fn submit(dir: &Path, entry: &SpoolEntry) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let path = dir.join(format!("hitl-{}-{nanos}.json", entry.issue));
    crate::store::atomic::write_atomic(&path, &serde_json::to_vec(entry)?)?;
    Ok(path)
}

/// The spooled commands in `dir`, oldest first, with their files. Files that
/// cannot be parsed are returned as errors with their path so the caller can
/// report and set them aside.
pub fn pending(dir: &Path) -> Vec<(PathBuf, Result<SpoolEntry, String>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("hitl-") && n.ends_with(".json"))
        })
        .collect();
    files.sort_by_key(|p| {
        p.file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.rsplit('-').next())
            .and_then(|n| n.parse::<u128>().ok())
            .unwrap_or_default()
    });
    files
        .into_iter()
        .map(|p| {
            let parsed = std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()));
            (p, parsed)
        })
        .collect()
}

/// Move an unusable spool file to `spool/rejected/` so it is kept but not retried.
pub fn reject(path: &Path) {
    if let Some(dir) = path.parent() {
        let rejected = dir.join("rejected");
        let _ = std::fs::create_dir_all(&rejected);
        if let Some(name) = path.file_name() {
            let _ = std::fs::rename(path, rejected.join(name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submit_then_pending_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for (i, cmd) in [
            HitlCommand::Skip,
            HitlCommand::Correct {
                text: "use X".into(),
            },
        ]
        .into_iter()
        .enumerate()
        {
            submit(
                dir.path(),
                &SpoolEntry {
                    issue: i as u64 + 1,
                    command: cmd,
                    created_at: "2026-01-01T00:00:00Z".into(),
                },
            )
            .unwrap();
        }
        std::fs::write(dir.path().join("hitl-9-1.json"), b"{garbage").unwrap();
        std::fs::write(dir.path().join(".tmp-abc"), b"partial").unwrap();
        let got = pending(dir.path());
        assert_eq!(got.len(), 3);
        assert!(got[0].1.is_err(), "the garbage file has the smallest stamp");
        assert_eq!(got[1].1.as_ref().unwrap().command, HitlCommand::Skip);
        assert_eq!(
            got[2].1.as_ref().unwrap().command,
            HitlCommand::Correct {
                text: "use X".into()
            }
        );
        reject(&got[0].0);
        assert!(dir.path().join("rejected/hitl-9-1.json").exists());
    }
}
