//! `<git dir>/index.lock`, taken and released by git's lock protocol (git's
//! `lockfile.h`, Documentation/technical/api-lockfile): whoever creates
//! `index.lock` exclusively may replace `index`, by writing the new content
//! into the lock file and renaming it over `index`; any other writer finds the
//! lock and stops (`git commit`: "Unable to create '…/index.lock': File
//! exists. Another git process seems to be running in this repository").
//! Holding it makes HydraFlow's writes to an operator's index and git's own
//! mutually exclusive. HydraFlow replaces the index while it holds the lock
//! ([`IndexLock::replace_index`]) rather than by renaming the lock file, so
//! that it can move the checked-out branch afterwards under the same lock.
//!
//! The lock file is made anonymous first (`O_TMPFILE` in the git directory,
//! open(2)) and takes the name `index.lock` only when the lock is taken
//! (`linkat(2)` from `/proc/self/fd`, which fails with `EEXIST` when the name
//! exists, the same exclusion as `O_CREAT|O_EXCL`). So its identity (device,
//! inode, birth time: [`LockFileId`]) is known before the name exists, a
//! journal can record it first, and a lock left by a process killed at any
//! instant is recognised and removed by [`remove_stale`], never somebody
//! else's. Where the file system has no `O_TMPFILE` the lock is created with
//! `O_CREAT|O_EXCL` and its identity is known once it is taken.
//!
//! Nothing here serialises two HydraFlow processes: callers hold their own
//! lock around taking, using and recovering this one (`forge::local`'s).

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use backon::BlockingRetryable as _;
use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, OFlag};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

use super::{GitError, io};

/// The first wait between two tries while another process holds the lock.
const FIRST_WAIT: Duration = Duration::from_millis(10);
/// The longest wait between two tries.
const LONGEST_WAIT: Duration = Duration::from_millis(200);
/// Tries after the first (about 2 s of waiting in all).
const RETRIES: usize = 12;

/// Which file a lock file is: enough to tell the one a process created from
/// any later file of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockFileId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
    /// Birth time (`statx` `stx_btime`) in nanoseconds since the Unix epoch,
    /// where the file system records one: an inode number freed and given to
    /// a new file gets a new birth time.
    #[serde(default)]
    pub born_ns: Option<u64>,
}

impl LockFileId {
    fn of(meta: &std::fs::Metadata) -> LockFileId {
        LockFileId {
            dev: meta.dev(),
            ino: meta.ino(),
            born_ns: meta
                .created()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .and_then(|d| u64::try_from(d.as_nanos()).ok()),
        }
    }

    /// Whether `meta` is this file.
    fn is(&self, meta: &std::fs::Metadata) -> bool {
        let other = LockFileId::of(meta);
        self.dev == other.dev
            && self.ino == other.ino
            && match (self.born_ns, other.born_ns) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

/// How long [`IndexLock::acquire`] waits for another process's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockWait {
    /// One try.
    No,
    /// About 2 s, in growing steps from 10 ms (git itself never waits for
    /// `index.lock`; its holders keep it for milliseconds, except a `git
    /// commit` whose editor is open).
    Briefly,
}

/// `<git dir>/index.lock`, prepared ([`IndexLock::prepare`]), then taken
/// ([`IndexLock::acquire`]), held while the index is replaced
/// ([`IndexLock::replace_index`]), and removed when dropped.
#[derive(Debug)]
pub struct IndexLock {
    /// The lock's file: anonymous until taken (or, without `O_TMPFILE`,
    /// opened when taken).
    file: Option<File>,
    id: Option<LockFileId>,
    lock_path: PathBuf,
    index_path: PathBuf,
    /// Whether `index.lock` is this lock's file (taken, not yet committed).
    named: bool,
}

impl IndexLock {
    /// Prepare the index lock of the repository whose git directory is
    /// `git_dir` (`Repository::path()` of a checkout): an anonymous file in
    /// that directory, whose [`id`](IndexLock::id) can be recorded before
    /// the lock is taken.
    ///
    /// # Errors
    /// [`GitError::Io`] when the file cannot be made or inspected.
    pub fn prepare(git_dir: &Path) -> Result<IndexLock, GitError> {
        IndexLock::prepare_as(git_dir, true)
    }

    /// [`IndexLock::prepare`], with an anonymous file only when `anonymous`
    /// (else as without `O_TMPFILE`).
    fn prepare_as(git_dir: &Path, anonymous: bool) -> Result<IndexLock, GitError> {
        let mut lock = IndexLock {
            file: None,
            id: None,
            lock_path: git_dir.join("index.lock"),
            index_path: git_dir.join("index"),
            named: false,
        };
        if !anonymous {
            return Ok(lock);
        }
        let file = nix::fcntl::open(
            git_dir,
            OFlag::O_TMPFILE | OFlag::O_RDWR | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o666),
        );
        match file {
            Ok(fd) => {
                let file = File::from(fd);
                let meta = file.metadata().map_err(io(format!(
                    "cannot inspect the new lock file in {}",
                    git_dir.display()
                )))?;
                lock.id = Some(LockFileId::of(&meta));
                lock.file = Some(file);
            }
            // No O_TMPFILE here (kernel or file system): O_CREAT|O_EXCL when taken.
            Err(Errno::EOPNOTSUPP | Errno::EISDIR | Errno::EINVAL) => {}
            Err(e) => {
                return Err(io(format!(
                    "cannot make a lock file in {}",
                    git_dir.display()
                ))(e.into()));
            }
        }
        Ok(lock)
    }

    /// The lock file's identity: known from [`prepare`](IndexLock::prepare)
    /// on, except without `O_TMPFILE`, where it is known once taken.
    pub fn id(&self) -> Option<LockFileId> {
        self.id
    }

    /// `<git dir>/index.lock`.
    pub fn path(&self) -> &Path {
        &self.lock_path
    }

    /// Take the lock: give the prepared file the name `index.lock`, which
    /// fails while the name exists; then try again as `wait` says.
    ///
    /// # Errors
    /// [`GitError::IndexLocked`] while another process holds the lock,
    /// [`GitError::Io`] for any other failure.
    pub fn acquire(&mut self, wait: LockWait) -> Result<(), GitError> {
        if self.named {
            return Ok(());
        }
        let retries = match wait {
            LockWait::No => 0,
            LockWait::Briefly => RETRIES,
        };
        let taken = (|| self.try_take())
            .retry(
                backon::ExponentialBuilder::default()
                    .with_min_delay(FIRST_WAIT)
                    .with_max_delay(LONGEST_WAIT)
                    .with_max_times(retries)
                    .with_jitter(),
            )
            .when(|e| e.kind() == std::io::ErrorKind::AlreadyExists)
            .call();
        match taken {
            Ok(()) => {
                self.named = true;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(GitError::IndexLocked {
                path: self.lock_path.clone(),
            }),
            Err(e) => Err(io(format!("cannot create {}", self.lock_path.display()))(e)),
        }
    }

    fn try_take(&mut self) -> std::io::Result<()> {
        match &self.file {
            Some(file) => nix::unistd::linkat(
                AT_FDCWD,
                format!("/proc/self/fd/{}", file.as_raw_fd()).as_str(),
                AT_FDCWD,
                &self.lock_path,
                nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
            )
            .map_err(std::io::Error::from),
            None => {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&self.lock_path)?;
                self.id = Some(LockFileId::of(&file.metadata()?));
                self.file = Some(file);
                Ok(())
            }
        }
    }

    /// Replace the index with `bytes` (a whole index file) while keeping
    /// the lock: written to a temporary file beside it, synced, renamed over
    /// `<git dir>/index` ([`crate::store::atomic::write_atomic`]), so a
    /// reader sees the old index or the new one, never a part. Other
    /// writers stay locked out until the lock is dropped: a caller can
    /// replace the index and then move `HEAD`'s branch under one lock, and
    /// a git command that read the index before cannot write it afterwards.
    ///
    /// # Errors
    /// [`GitError::Io`] when the lock is not held or the write fails; the
    /// index is then unchanged.
    pub fn replace_index(&self, bytes: &[u8]) -> Result<(), GitError> {
        let context = format!("cannot replace {}", self.index_path.display());
        if !self.named {
            return Err(io(context)(std::io::Error::other(
                "the index lock is not held",
            )));
        }
        crate::store::atomic::write_atomic(&self.index_path, bytes).map_err(io(context))
    }

    /// The index the lock guards, as its bytes (empty when there is none).
    ///
    /// # Errors
    /// [`GitError::Io`] when it cannot be read.
    pub fn read_index(&self) -> Result<Vec<u8>, GitError> {
        match std::fs::read(&self.index_path) {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io(format!("cannot read {}", self.index_path.display()))(e)),
        }
    }
}

impl Drop for IndexLock {
    /// Release a lock taken (git's `rollback_lock_file`), unless
    /// `index.lock` is no longer this lock's file.
    fn drop(&mut self) {
        if !self.named {
            return;
        }
        if let Some(id) = self.id
            && let Err(e) = remove_stale(&self.lock_path, &id)
        {
            tracing::warn!(path = %self.lock_path.display(), error = %e, "cannot remove the index lock");
        }
    }
}

/// Remove `lock_path` (a `<git dir>/index.lock`) when it is the file `id`
/// names: a lock a process took and never committed or released because it
/// was killed. Returns whether it was removed. Call only while no process
/// can be using that lock (the caller's own lock held).
///
/// # Errors
/// [`GitError::Io`] when the file cannot be inspected or removed.
pub fn remove_stale(lock_path: &Path, id: &LockFileId) -> Result<bool, GitError> {
    let meta = match std::fs::symlink_metadata(lock_path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io(format!("cannot inspect {}", lock_path.display()))(e)),
    };
    if !id.is(&meta) {
        return Ok(false);
    }
    match std::fs::remove_file(lock_path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io(format!("cannot remove {}", lock_path.display()))(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ways of making the lock file: anonymous, then linked (the
    /// identity known beforehand; `/tmp` here supports `O_TMPFILE`), and
    /// created with `O_CREAT|O_EXCL`.
    const WAYS: [bool; 2] = [true, false];

    #[test]
    fn one_holder_at_a_time_and_a_dropped_lock_is_released() {
        for anonymous in WAYS {
            let dir = tempfile::tempdir().unwrap();
            let mut first = IndexLock::prepare_as(dir.path(), anonymous).unwrap();
            let prepared = first.id();
            assert_eq!(prepared.is_some(), anonymous, "known before it is taken");
            first.acquire(LockWait::No).unwrap();
            assert!(first.id().is_some());
            if anonymous {
                assert_eq!(first.id(), prepared, "the identity recorded beforehand");
            }
            let lock_path = dir.path().join("index.lock");
            assert!(lock_path.is_file());

            let mut second = IndexLock::prepare_as(dir.path(), anonymous).unwrap();
            let wait = if anonymous {
                LockWait::Briefly
            } else {
                LockWait::No
            };
            match second.acquire(wait) {
                Err(GitError::IndexLocked { path }) => assert_eq!(path, lock_path),
                other => panic!("expected the lock to be held, got {other:?}"),
            }
            drop(first);
            assert!(!lock_path.exists(), "released");
            second.acquire(LockWait::No).unwrap();
            second.replace_index(b"new index").unwrap();
            assert!(lock_path.exists(), "still held");
            assert_eq!(second.read_index().unwrap(), b"new index");
            drop(second);
            assert!(!lock_path.exists());
            assert_eq!(
                std::fs::read(dir.path().join("index")).unwrap(),
                b"new index"
            );
        }
    }

    #[test]
    fn only_the_recorded_lock_is_removed_as_stale() {
        for anonymous in WAYS {
            only_the_recorded_lock_is_removed(anonymous);
        }
    }

    fn only_the_recorded_lock_is_removed(anonymous: bool) {
        let dir = tempfile::tempdir().unwrap();
        let lock_path = dir.path().join("index.lock");
        let mut killed = IndexLock::prepare_as(dir.path(), anonymous).unwrap();
        killed.acquire(LockWait::No).unwrap();
        let id = killed.id().expect("known once taken");
        // A killed process runs no destructor.
        std::mem::forget(killed);

        // Somebody else's lock of the same name is not it.
        let renamed = dir.path().join("kept");
        std::fs::rename(&lock_path, &renamed).unwrap();
        std::fs::write(&lock_path, "git's").unwrap();
        assert!(!remove_stale(&lock_path, &id).unwrap());
        assert_eq!(std::fs::read_to_string(&lock_path).unwrap(), "git's");

        std::fs::remove_file(&lock_path).unwrap();
        std::fs::rename(&renamed, &lock_path).unwrap();
        assert!(remove_stale(&lock_path, &id).unwrap());
        assert!(!lock_path.exists());
        assert!(!remove_stale(&lock_path, &id).unwrap(), "already gone");
    }
}
