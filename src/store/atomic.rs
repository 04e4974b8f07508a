//! Atomic file replacement: temp file in the same directory, write, fsync,
//! rename over the target, fsync the directory.

use std::io;
use std::path::Path;

/// Replace `path` with `bytes` atomically: readers see the old content or the
/// new, never a mix, and a crash at any instant leaves one of them on disk.
///
/// # Errors
/// The I/O error of the step that failed; `path` is then unchanged.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let _ = (path, bytes);
    todo!("store helper implements this")
}
