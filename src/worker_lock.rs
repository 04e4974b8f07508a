//! One worker per data directory: an exclusive `flock(2)` on
//! `data_root/<slug>/worker.lock`, held by the worker's `RepoRuntime` for
//! its whole life and released by the kernel when the process exits, however
//! it exits. The holder writes its PID into the file so that a second worker
//! can say who holds it. Commands that only read or spool (`issue`, `hitl`,
//! `check`, `config`) never take it.

use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};

use backon::BlockingRetryable as _;

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
    /// The worker that wrote its PID has exited, but something it started
    /// still holds the lock (after waiting about 5 s for it to let go).
    #[error(
        "the worker with PID {pid} has exited, but a process it started still holds {path}: find it with `fuser -v {path}` and stop it"
    )]
    Leftover {
        /// The lock file.
        path: PathBuf,
        /// The PID the exited worker wrote.
        pid: i32,
    },
    /// The lock file could not be opened, locked or written.
    #[error("cannot take the worker lock {path}: {cause}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The OS error.
        cause: std::io::Error,
    },
}

/// How often, and how many times, the lock is tried again while the PID
/// in it belongs to no running process (about 5 s in all).
const DEAD_HOLDER_POLL: std::time::Duration = std::time::Duration::from_millis(50);
const DEAD_HOLDER_POLLS: usize = 100;

/// Why one try at the lock failed.
enum Taken {
    /// Someone holds it; the PID written in the file, if it parses.
    Held(Option<i32>),
    /// The lock call failed.
    Io(std::io::Error),
}

/// The PID written in the lock file.
fn holder_pid(mut file: &File) -> Option<i32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// Whether a process with this PID exists (signal 0, as `kill -0` does).
fn alive(pid: i32) -> bool {
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
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
            cause: source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        // A worker killed a moment ago may still be "holding" the lock
        // through a child it forked and that has not exec'd yet (the
        // descriptor is close-on-exec): when the PID in the file is gone,
        // wait a little for that child instead of refusing at once.
        let take = || match fs4::FileExt::try_lock(&file) {
            Ok(()) => Ok(()),
            Err(fs4::TryLockError::WouldBlock) => Err(Taken::Held(holder_pid(&file))),
            Err(fs4::TryLockError::Error(e)) => Err(Taken::Io(e)),
        };
        let taken = take
            .retry(
                backon::ConstantBuilder::default()
                    .with_delay(DEAD_HOLDER_POLL)
                    .with_max_times(DEAD_HOLDER_POLLS),
            )
            .when(|e| matches!(e, Taken::Held(Some(pid)) if !alive(*pid)))
            .call();
        match taken {
            Ok(()) => {}
            Err(Taken::Held(pid)) => {
                let holder = match pid {
                    Some(pid) if alive(pid) => format!("PID {pid}"),
                    Some(pid) => format!("PID {pid}, which has exited, but a process it started"),
                    None => "PID unknown".to_owned(),
                };
                return Err(WorkerLockError::Held {
                    path: path.to_path_buf(),
                    holder,
                });
            }
            Err(Taken::Io(e)) => return Err(io(e)),
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

    /// The PID in the file is gone but something still holds the lock (a
    /// child the killed worker forked): the taker waits for it.
    #[test]
    fn a_dead_holders_leftover_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.lock");
        let first = WorkerLock::acquire(&path).unwrap();
        // A PID no process has (the kernel's default pid_max is far lower).
        std::fs::write(&path, "2147483646\n").unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(first);
        });
        let started = std::time::Instant::now();
        let again = WorkerLock::acquire(&path).expect("taken once the leftover lets go");
        assert!(started.elapsed() >= std::time::Duration::from_millis(250));
        assert_eq!(again.path(), path);
        release.join().unwrap();
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
