//! One worker per data directory: an exclusive `flock(2)` on
//! `data_root/<slug>/worker.lock`, held by the worker's `RepoRuntime` for
//! its whole life and released by the kernel when the process exits, however
//! it exits. The holder writes its PID into the file so that a second worker
//! can say who holds it. Commands that only read or spool (`issue`, `hitl`,
//! `check`, `config`) never take it.

use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};

/// Why the worker lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum WorkerLockError {
    /// Another process holds the lock.
    #[error(
        "another worker ({holder}) already runs on this data directory: it holds {path}; stop that worker first (`kill <pid>`, or `hydraflow repo remove` / `systemctl stop hydraflow@<slug>` for a service), or give this one another checkout or HYDRAFLOW_HOME"
    )]
    Held {
        /// The lock file.
        path: PathBuf,
        /// `PID <n>` as the holder wrote it, or `PID unknown`.
        holder: String,
    },
    /// The lock file could not be opened, locked or written.
    #[error("cannot take the worker lock {path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The held lock; dropping it (or exiting) releases it. The file stays.
#[derive(Debug)]
pub struct WorkerLock {
    path: PathBuf,
    _file: File,
}

impl WorkerLock {
    /// Take the exclusive lock on `path` without waiting and write this
    /// process's PID into it.
    ///
    /// # Errors
    /// [`WorkerLockError::Held`] naming the holder's PID when another
    /// process holds it, [`WorkerLockError::Io`] when the file cannot be
    /// opened, locked or written.
    pub fn acquire(path: &Path) -> Result<WorkerLock, WorkerLockError> {
        let io = |source| WorkerLockError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        match fs4::FileExt::try_lock(&file) {
            Ok(()) => {}
            Err(fs4::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = match text.trim().parse::<u32>() {
                    Ok(pid) => format!("PID {pid}"),
                    Err(_) => "PID unknown".to_owned(),
                };
                return Err(WorkerLockError::Held {
                    path: path.to_path_buf(),
                    holder,
                });
            }
            Err(fs4::TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        file.sync_data().map_err(io)?;
        Ok(WorkerLock {
            path: path.to_path_buf(),
            _file: file,
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_taker_is_told_the_holders_pid_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.lock");
        let first = WorkerLock::acquire(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", std::process::id())
        );
        // flock(2) locks belong to the open file description: a second open
        // in this process is refused like another process would be.
        let err = WorkerLock::acquire(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "another worker (PID {}) already runs on this data directory: it holds {}; stop that worker first (`kill <pid>`, or `hydraflow repo remove` / `systemctl stop hydraflow@<slug>` for a service), or give this one another checkout or HYDRAFLOW_HOME",
                std::process::id(),
                path.display()
            )
        );
        drop(first);
        let again = WorkerLock::acquire(&path).unwrap();
        assert_eq!(again.path(), path);
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope/worker.lock");
        let err = WorkerLock::acquire(&path).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("cannot take the worker lock {}", path.display())),
            "{err}"
        );
    }
}
