//! systemd integration, a no-op off systemd: `sd_notify` (`READY=1`,
//! `STATUS=`, `WATCHDOG=1`, `STOPPING=1`), logging to the journal when
//! `$JOURNAL_STREAM` says stderr is the journal (else readable lines on
//! stderr and optionally a log file), and credentials from
//! `$CREDENTIALS_DIRECTORY` (systemd.exec(5), sd_notify(3)).
//!
//! **Invariant:** every sd_notify, journald and credentials call of the
//! program goes through this module.

use std::path::Path;
use std::time::Duration;

/// Send `READY=1` with a `STATUS=` line.
pub fn notify_ready(status: &str) {
    let _ = status;
    todo!("systemd helper implements this")
}

/// Send `STATUS=<status>` (one line).
pub fn notify_status(status: &str) {
    let _ = status;
    todo!("systemd helper implements this")
}

/// Send `STOPPING=1`.
pub fn notify_stopping() {
    todo!("systemd helper implements this")
}

/// Send `WATCHDOG=1`.
pub fn notify_watchdog() {
    todo!("systemd helper implements this")
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC` when it is set for
/// this process (`$WATCHDOG_PID` absent or ours), else `None`.
pub fn watchdog_interval() -> Option<Duration> {
    todo!("systemd helper implements this")
}

/// True when `$JOURNAL_STREAM` names this process's stderr.
pub fn stderr_is_journal() -> bool {
    todo!("systemd helper implements this")
}

/// Where logs go, decided once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    /// The journal, with structured fields.
    Journal,
    /// Readable lines on stderr.
    Stderr,
}

/// Install the global tracing subscriber: the journal when stderr is the
/// journal (fields `REPO_SLUG`, `ISSUE`, `STAGE` become journal fields), else
/// readable lines on stderr, plus `log_file` (appended) when given. The level
/// comes from `$HYDRAFLOW_LOG` (an `EnvFilter` directive), default `info`.
/// Calling it twice is harmless.
pub fn init_logging(log_file: Option<&Path>) -> LogTarget {
    let _ = log_file;
    todo!("systemd helper implements this")
}

/// The content of credential `name` from `$CREDENTIALS_DIRECTORY` (trailing
/// newline trimmed), or `None` when there is no such credential.
pub fn read_credential(name: &str) -> Option<String> {
    let _ = name;
    todo!("systemd helper implements this")
}
