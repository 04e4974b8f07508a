//! Persistence of one repository's worker (docs/design/persistence.md): the state
//! tracker (`state.json`, atomic writes with rotated backups), the event bus
//! (broadcast + append-only `events.jsonl`, rotated by size and age) and the
//! session log (`sessions.jsonl`).
//!
//! **Invariant:** every file this module writes is replaced atomically
//! (temp file, fsync, rename, fsync of the directory) or appended to; a crash
//! at any instant leaves a readable file.

pub mod atomic;
pub mod events;
pub mod sessions;
pub mod state;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Reading or writing a file failed.
    #[error("{path}: {cause}")]
    Io {
        /// The file or directory.
        path: std::path::PathBuf,
        /// The OS error.
        cause: std::io::Error,
    },
    /// A file could not be parsed and no good backup was found.
    #[error("{path} is not valid: {message}")]
    Corrupt {
        /// The file.
        path: std::path::PathBuf,
        /// What was wrong.
        message: String,
    },
}
