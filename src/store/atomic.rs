//! Atomic file replacement: temp file in the same directory, write, fsync,
//! rename over the target, fsync the directory.
//!
//! Temp files are named `.<target name>.<random>.tmp` next to the target, so a
//! reader that opens the target by name never sees them, and
//! [`remove_temp_files`] can find the ones a crash left behind.

use std::fs::{self, File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Replace `path` with `bytes` atomically: readers see the old content or the
/// new, never a mix, and a crash at any instant leaves one of them on disk.
///
/// The new file gets mode `0666` minus the process umask (as `open(2)` would
/// give a new file), not the temp file's `0600`.
///
/// # Errors
/// The I/O error of the step that failed; `path` is then unchanged.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_until(path, bytes, Stop::Never)
}

/// Remove temp files of [`write_atomic`] for `path` that a crash left behind
/// (`.<name>.*.tmp` in the same directory). Only the owner of `path` may call
/// this: a concurrent writer's temp file would be removed too.
///
/// Returns how many were removed.
///
/// # Errors
/// The I/O error of listing the directory or removing a file.
pub fn remove_temp_files(path: &Path) -> io::Result<usize> {
    let (dir, name) = split(path)?;
    let prefix = temp_prefix(&name);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(err) => return Err(err),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        if file_name.starts_with(&prefix) && file_name.ends_with(TEMP_SUFFIX) {
            fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

const TEMP_SUFFIX: &str = ".tmp";

fn temp_prefix(name: &str) -> String {
    format!(".{name}.")
}

/// The directory (`.` for a bare file name) and the file name of `path`.
fn split(path: &Path) -> io::Result<(PathBuf, String)> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} does not end in a UTF-8 file name", path.display()),
            )
        })?
        .to_owned();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name))
}

/// Create `path` with `bytes` unless it exists, atomically (temp file,
/// fsync, link into place without replacing, fsync of the directory):
/// `Ok(false)` when a file of that name is there already, which is left
/// untouched.
///
/// # Errors
/// The I/O error of the step that failed.
pub fn create_atomic(path: &Path, bytes: &[u8]) -> io::Result<bool> {
    let (dir, name) = split(path)?;
    let mut tmp = temp_beside(&dir, &name)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    match tmp.persist_noclobber(path) {
        Ok(_) => {}
        Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(e.error),
    }
    File::open(&dir)?.sync_all()?;
    Ok(true)
}

/// Check that `dir` takes a durable write: 4 KiB written to an anonymous
/// temporary file there and synced (the file never has a name, so nothing
/// is left behind). The storage probe of a paused pipeline.
///
/// # Errors
/// The I/O error of creating, writing or syncing the file (`ENOSPC`,
/// `EROFS`, `EACCES`, …).
pub fn probe_dir(dir: &Path) -> io::Result<()> {
    let mut file = tempfile::tempfile_in(dir)?;
    file.write_all(&[0u8; 4096])?;
    file.sync_all()
}

/// A temporary directory inside `parent` (named `.<prefix>…`), removed when
/// dropped unless it is renamed into place first: for building a directory
/// (a clone) that must appear whole or not at all.
///
/// # Errors
/// The I/O error of creating it.
pub fn staging_dir(parent: &Path, prefix: &str) -> io::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!(".{prefix}"))
        .tempdir_in(parent)
}

/// Where [`write_until`] stops, to simulate a crash in tests. A stopped write
/// leaves its temp file behind as a killed process would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Run to completion.
    Never,
    /// After creating the (empty) temp file.
    #[cfg(test)]
    AfterCreate,
    /// After writing half of the bytes.
    #[cfg(test)]
    AfterPartialWrite,
    /// After writing and syncing everything, before the rename.
    #[cfg(test)]
    AfterSync,
}

/// A new temporary file in `dir` for the file `name` (mode 0666 less the
/// umask, named so that [`temp_prefix`] and [`TEMP_SUFFIX`] recognise it).
fn temp_beside(dir: &Path, name: &str) -> io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(&temp_prefix(name))
        .suffix(TEMP_SUFFIX)
        .permissions(Permissions::from_mode(0o666))
        .tempfile_in(dir)
}

fn write_until(path: &Path, bytes: &[u8], stop: Stop) -> io::Result<()> {
    let (dir, name) = split(path)?;
    let mut tmp = temp_beside(&dir, &name)?;
    #[cfg(test)]
    if stop == Stop::AfterCreate {
        return tmp.keep().map(|_| ()).map_err(|e| e.error);
    }
    #[cfg(test)]
    if stop == Stop::AfterPartialWrite {
        tmp.write_all(&bytes[..bytes.len() / 2])?;
        return tmp.keep().map(|_| ()).map_err(|e| e.error);
    }
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    #[cfg(test)]
    if stop == Stop::AfterSync {
        return tmp.keep().map(|_| ()).map_err(|e| e.error);
    }
    let _ = stop;
    tmp.persist(path).map_err(|e| e.error)?;
    File::open(&dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(TEMP_SUFFIX))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn replaces_content_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        write_atomic(&path, b"one").expect("first write");
        write_atomic(&path, b"two, longer").expect("second write");
        assert_eq!(fs::read(&path).expect("read"), b"two, longer");
        assert_eq!(temp_files(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn new_file_mode_follows_umask_not_tempfile_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        write_atomic(&path, b"x").expect("write");
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        // The umask can only remove bits; 0600 would mean the temp file's mode leaked.
        assert_eq!(mode & 0o600, 0o600);
        let umask = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        nix::sys::stat::umask(umask);
        assert_eq!(mode, 0o666 & !umask.bits());
    }

    /// A write interrupted at each step leaves the old content readable; the
    /// stray temp file does not disturb readers, the next write, or cleanup.
    #[test]
    fn interrupted_write_keeps_old_content() {
        for stop in [Stop::AfterCreate, Stop::AfterPartialWrite, Stop::AfterSync] {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("state.json");
            write_atomic(&path, b"old content").expect("first write");
            write_until(&path, b"new content that never lands", stop).expect("stopped write");
            assert_eq!(fs::read(&path).expect("read"), b"old content", "{stop:?}");
            assert_eq!(temp_files(dir.path()).len(), 1, "{stop:?}");

            write_atomic(&path, b"next").expect("write after crash");
            assert_eq!(fs::read(&path).expect("read"), b"next", "{stop:?}");
            assert_eq!(remove_temp_files(&path).expect("cleanup"), 1, "{stop:?}");
            assert_eq!(temp_files(dir.path()), Vec::<String>::new(), "{stop:?}");
            assert_eq!(fs::read(&path).expect("read"), b"next", "{stop:?}");
        }
    }

    #[test]
    fn interrupted_first_write_leaves_no_target() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        write_until(&path, b"{}", Stop::AfterSync).expect("stopped write");
        assert!(!path.exists());
    }

    #[test]
    fn cleanup_only_touches_own_temp_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.json");
        write_until(&path, b"x", Stop::AfterSync).expect("stopped write");
        write_until(&dir.path().join("b.json"), b"y", Stop::AfterSync).expect("other");
        fs::write(dir.path().join("a.json.bak.1"), b"keep").expect("backup");
        assert_eq!(remove_temp_files(&path).expect("cleanup"), 1);
        let left = temp_files(dir.path());
        assert_eq!(left.len(), 1);
        assert!(left[0].starts_with(".b.json."), "{left:?}");
        assert!(dir.path().join("a.json.bak.1").exists());
    }

    #[test]
    fn missing_directory_is_an_error_and_creates_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing").join("f");
        let err = write_atomic(&path, b"x").expect_err("no directory");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(!path.exists());
    }
}
