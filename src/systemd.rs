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

/// The sockets passed by socket activation (sd_listen_fds(3)): when `$LISTEN_PID` is this
/// process, descriptors 3 to 3 + `$LISTEN_FDS` - 1, marked close-on-exec. `$LISTEN_PID`,
/// `$LISTEN_FDS` and `$LISTEN_FDNAMES` are then removed, so call this once, before any other
/// thread starts. Without socket activation the list is empty.
///
/// # Errors
/// `$LISTEN_FDS` that is not a number, or a descriptor that cannot be marked close-on-exec.
pub fn take_listen_fds() -> std::io::Result<Vec<std::os::fd::OwnedFd>> {
    use std::os::fd::{FromRawFd, RawFd};

    const SD_LISTEN_FDS_START: RawFd = 3;
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS").ok();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // SAFETY: documented to be called before other threads exist (sd_listen_fds(3)
        // unsets these too), so nothing reads the environment concurrently.
        unsafe { std::env::remove_var(var) };
    }
    if !ours {
        return Ok(Vec::new());
    }
    let count: RawFd = match count {
        None => return Ok(Vec::new()),
        Some(n) => n.trim().parse().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("LISTEN_FDS={n:?} is not a number of descriptors"),
            )
        })?,
    };
    let mut fds = Vec::new();
    for fd in SD_LISTEN_FDS_START..SD_LISTEN_FDS_START.saturating_add(count.max(0)) {
        nix::fcntl::fcntl(
            // SAFETY: systemd passed this descriptor to this process (LISTEN_PID matched).
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(std::io::Error::from)?;
        // SAFETY: as above; each descriptor is taken once and owned from here on.
        fds.push(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
    }
    Ok(fds)
}
