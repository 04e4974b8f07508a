//! systemd integration, a no-op off systemd: `sd_notify` (`READY=1`,
//! `STATUS=`, `WATCHDOG=1`, `STOPPING=1`), logging to the journal when
//! `$JOURNAL_STREAM` says stderr is the journal (else readable lines on
//! stderr and optionally a log file), credentials from
//! `$CREDENTIALS_DIRECTORY` and sockets from socket activation
//! (systemd.exec(5), sd_notify(3), sd_listen_fds(3)).
//!
//! **Invariant:** every sd_notify, journald and credentials call of the
//! program goes through this module.

use std::env;
use std::fs::{self, OpenOptions};
use std::io::{self, IsTerminal};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The variable naming the log filter (an `EnvFilter` directive such as
/// `info` or `hydraflow=debug,warn`).
pub const LOG_ENV: &str = "HYDRAFLOW_LOG";

/// Send `states` when `$NOTIFY_SOCKET` is set. The variable is left set: the
/// worker notifies many times (status, watchdog). `wait` bounds how long a
/// full socket buffer may hold the caller: status and watchdog updates are
/// dropped at once rather than stall the runtime (systemd reads its socket;
/// a receiver that does not must not freeze the worker), while `READY=1`
/// and `STOPPING=1` wait up to two seconds.
fn notify(states: &[NotifyState<'_>], wait: Option<std::time::Duration>) {
    let Ok(name) = env::var("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(err) = send_notify(&name, states, wait) {
        if err.kind() == io::ErrorKind::WouldBlock {
            tracing::debug!("notify socket full; update dropped");
        } else {
            tracing::warn!("cannot notify the service manager: {err}");
        }
    }
}

/// One datagram to the `$NOTIFY_SOCKET` address: a path, or an abstract
/// socket written `@name` (sd_notify(3)), which the supervisor's process
/// backend uses. (sd-notify's own sender blocks and takes paths only.)
fn send_notify(
    name: &str,
    states: &[NotifyState<'_>],
    wait: Option<std::time::Duration>,
) -> io::Result<()> {
    use std::os::linux::net::SocketAddrExt as _;
    let addr = match name.strip_prefix('@') {
        Some(abstract_name) => {
            std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())?
        }
        None => std::os::unix::net::SocketAddr::from_pathname(name)?,
    };
    let message: String = states.iter().map(|s| format!("{s}\n")).collect();
    let socket = std::os::unix::net::UnixDatagram::unbound()?;
    match wait {
        Some(timeout) => socket.set_write_timeout(Some(timeout))?,
        None => socket.set_nonblocking(true)?,
    }
    socket.send_to_addr(message.as_bytes(), &addr)?;
    Ok(())
}

/// How long `READY=1` and `STOPPING=1` may wait for room on the socket.
const IMPORTANT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// `status` on one line: lines trimmed and joined with a space (sd_notify(3)
/// separates assignments with newlines).
fn one_line(status: &str) -> String {
    status
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether the host booted with systemd as its init (sd_booted(3): the
/// directory `/run/systemd/system` exists).
pub fn booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// The first directory of `$RUNTIME_DIRECTORY` (systemd.exec(5),
/// `RuntimeDirectory=`), when systemd made one for this service.
pub fn runtime_directory() -> Option<PathBuf> {
    let dirs = std::env::var_os("RUNTIME_DIRECTORY").filter(|d| !d.is_empty())?;
    let first = dirs.to_string_lossy().split(':').next()?.to_owned();
    (!first.is_empty()).then(|| PathBuf::from(first))
}

/// Send `READY=1` with a `STATUS=` line.
pub fn notify_ready(status: &str) {
    notify(
        &[NotifyState::Ready, NotifyState::Status(&one_line(status))],
        Some(IMPORTANT_WAIT),
    );
}

/// Send `STATUS=<status>` (made one line: newlines become spaces).
pub fn notify_status(status: &str) {
    notify(&[NotifyState::Status(&one_line(status))], None);
}

/// Send `STOPPING=1`.
pub fn notify_stopping() {
    notify(&[NotifyState::Stopping], Some(IMPORTANT_WAIT));
}

/// Send `WATCHDOG=1`.
pub fn notify_watchdog() {
    notify(&[NotifyState::Watchdog], None);
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC` when it is set for
/// this process (`$WATCHDOG_PID` absent or ours), else `None`.
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_interval_from(
        env::var("WATCHDOG_USEC").ok().as_deref(),
        env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

/// [`watchdog_interval`] from the variables' values (sd_watchdog_enabled(3)):
/// `usec` a positive decimal count of microseconds, `pid` absent or equal to
/// `our_pid`. Anything else means no watchdog.
fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, our_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid {
        let pid: u32 = pid.trim().parse().ok()?;
        if pid != our_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec) / 2)
}

/// True when `$JOURNAL_STREAM` names this process's stderr.
pub fn stderr_is_journal() -> bool {
    let Some(value) = env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some(value) = value.to_str() else {
        return false;
    };
    match nix::sys::stat::fstat(io::stderr()) {
        Ok(stat) => journal_stream_matches(value, stat.st_dev, stat.st_ino),
        Err(_) => false,
    }
}

/// Whether `$JOURNAL_STREAM` (`<device>:<inode>`, both decimal, systemd.exec(5))
/// names the file with `dev` and `ino`.
fn journal_stream_matches(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.trim().split_once(':') else {
        return false;
    };
    d.parse::<u64>() == Ok(dev) && i.parse::<u64>() == Ok(ino)
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
///
/// Journal fields: `tracing-journald` upper-cases field names (`repo_slug`
/// becomes `REPO_SLUG`); its field prefix is turned off here, so event
/// fields keep their names, and the fields of every span the event is in are
/// sent too (it walks the current span scope), so a field recorded on an
/// enclosing span (`info_span!("issue", issue = 42)`) reaches the journal as
/// `ISSUE=42`. When the journal socket cannot be reached, lines go to stderr.
///
/// Journal entries carry `SYSLOG_IDENTIFIER=<identifier>`, the same name the
/// unit's `SyslogIdentifier=` gives its stdout and stderr (`hydraflow@<slug>`,
/// `hydraflow-supervisor`), so `journalctl -t` finds both kinds of line.
///
/// The log file's parent directories are created; when it cannot be opened
/// a warning is logged and stderr/journal logging goes on. A second call
/// installs nothing and returns the target it would have chosen.
pub fn init_logging(identifier: &str, log_file: Option<&Path>) -> LogTarget {
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .with_env_var(LOG_ENV)
        .from_env_lossy();
    let wants_journal = stderr_is_journal();
    let (journal, journal_error) = if wants_journal {
        match tracing_journald::layer() {
            Ok(layer) => (
                Some(
                    layer
                        .with_field_prefix(None)
                        .with_syslog_identifier(identifier.to_owned()),
                ),
                None,
            ),
            Err(err) => (None, Some(err)),
        }
    } else {
        (None, None)
    };
    let target = if journal.is_some() {
        LogTarget::Journal
    } else {
        LogTarget::Stderr
    };
    let stderr = journal.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(io::stderr)
            .with_ansi(io::stderr().is_terminal())
    });
    let (file, file_error) = match log_file.map(open_log_file) {
        Some(Ok(f)) => {
            let layer = tracing_subscriber::fmt::layer()
                .with_writer(Mutex::new(f))
                .with_ansi(false);
            (Some(layer), None)
        }
        Some(Err(err)) => (None, Some(err)),
        None => (None, None),
    };
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(journal)
        .with(stderr)
        .with(file)
        .try_init()
        .is_ok();
    if installed {
        if let Some(err) = journal_error {
            tracing::warn!(
                "stderr is the journal but its socket cannot be used ({err}): logging to stderr"
            );
        }
        if let (Some(path), Some(err)) = (log_file, file_error) {
            tracing::warn!("cannot open log file {}: {err}", path.display());
        }
    }
    target
}

fn open_log_file(path: &Path) -> io::Result<fs::File> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

/// The content of credential `name` from `$CREDENTIALS_DIRECTORY` (trailing
/// newline trimmed), or `None` when there is no such credential.
///
/// Leading and trailing whitespace is trimmed; an empty credential counts as
/// none. Names with `/` (and `.`, `..`, empty) are rejected. A credential that
/// exists but cannot be read, or is not UTF-8, is logged and gives `None`.
pub fn read_credential(name: &str) -> Option<String> {
    let dir = env::var_os("CREDENTIALS_DIRECTORY")?;
    read_credential_in(Path::new(&dir), name)
}

/// [`read_credential`] from directory `dir`.
fn read_credential_in(dir: &Path, name: &str) -> Option<String> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return None;
    }
    let path = dir.join(name);
    match fs::read_to_string(&path) {
        Ok(text) => Some(text.trim().to_owned()).filter(|t| !t.is_empty()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => None,
        Err(err) => {
            tracing::warn!("cannot read credential {}: {err}", path.display());
            None
        }
    }
}

/// Set once the listen fds were taken, so they are never owned twice.
static LISTEN_FDS_TAKEN: AtomicBool = AtomicBool::new(false);

/// Take the sockets passed by socket activation (sd_listen_fds(3)): when
/// `$LISTEN_PID` is this process, `$LISTEN_FDS` descriptors starting at 3,
/// in the order of the socket unit's `Listen…=` lines, each set `FD_CLOEXEC`.
/// No activation gives an empty list; so does every call after the first
/// (of this function or [`take_named_listen_fds`]).
///
/// The `LISTEN_*` variables are removed when the process is still
/// single-threaded (call this first thing in `main`). Later they are left:
/// changing the environment while other threads may read it is undefined
/// behaviour, and they are harmless — `$LISTEN_PID` names this process, so a
/// child ignores them, and the descriptors are close-on-exec.
///
/// # Errors
/// `InvalidData` when the variables are malformed or a descriptor is not open.
pub fn take_listen_fds() -> io::Result<Vec<OwnedFd>> {
    Ok(take_named_listen_fds()?
        .into_iter()
        .map(|(_, fd)| fd)
        .collect())
}

/// Like [`take_listen_fds`], with each descriptor's name
/// (sd_listen_fds_with_names(3)): the socket unit's `FileDescriptorName=`
/// (default: the socket unit's name), from the colon-separated
/// `$LISTEN_FDNAMES`. Without `$LISTEN_FDNAMES` every name is `unknown`, as
/// sd_listen_fds_with_names(3) does.
///
/// # Errors
/// `InvalidData` when the variables are malformed, a descriptor is not open,
/// or `$LISTEN_FDNAMES` names fewer descriptors than `$LISTEN_FDS` passes.
pub fn take_named_listen_fds() -> io::Result<Vec<(String, OwnedFd)>> {
    if LISTEN_FDS_TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(Vec::new());
    }
    let invalid =
        |err: libsystemd::errors::SdError| io::Error::new(io::ErrorKind::InvalidData, err);
    let own = |d: libsystemd::activation::FileDescriptor| {
        // SAFETY: systemd passed these descriptors to this process (LISTEN_PID
        // matched and fcntl succeeded on each, so they are open); nothing else
        // in the program owns them, and LISTEN_FDS_TAKEN makes this the only
        // place that ever takes ownership of them.
        unsafe { OwnedFd::from_raw_fd(d.into_raw_fd()) }
    };
    let fds: Vec<(String, OwnedFd)> = if env::var_os("LISTEN_FDNAMES").is_some() {
        let passed: Option<usize> = env::var("LISTEN_FDS").ok().and_then(|n| n.parse().ok());
        let fds: Vec<(String, OwnedFd)> =
            libsystemd::activation::receive_descriptors_with_names(false)
                .map_err(invalid)?
                .into_iter()
                .map(|(d, name)| (name, own(d)))
                .collect();
        // The library pairs descriptors with names and leaves out unnamed ones.
        if let Some(passed) = passed
            && !fds.is_empty()
            && fds.len() != passed
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "LISTEN_FDNAMES names {} descriptors but LISTEN_FDS is {passed}: expected one name per descriptor",
                    fds.len()
                ),
            ));
        }
        fds
    } else {
        libsystemd::activation::receive_descriptors(false)
            .map_err(invalid)?
            .into_iter()
            .map(|d| ("unknown".to_owned(), own(d)))
            .collect()
    };
    if single_threaded() {
        for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            // SAFETY: this process has one thread (checked just above, and only
            // this thread could start another), so no other thread can read or
            // write the environment concurrently.
            unsafe { env::remove_var(var) };
        }
    }
    Ok(fds)
}

/// True when this process has exactly one thread (`Threads:` in
/// `/proc/self/status`, proc(5)).
fn single_threaded() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .is_some_and(|n| n.trim() == "1")
    })
}

#[cfg(test)]
mod tests {
    //! The environment is process-global, so every test that needs variables
    //! set runs its body in a child process: the test binary re-runs itself
    //! with `--exact <this test>` and [`CHILD`] set, and the child takes the
    //! other branch of the same test function.

    use super::*;
    use std::os::fd::{AsFd, AsRawFd};
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::{UnixDatagram, UnixListener};
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Output, Stdio};

    /// Set in the child process of a test.
    const CHILD: &str = "HYDRAFLOW_SYSTEMD_TEST_CHILD";

    fn in_child() -> bool {
        env::var_os(CHILD).is_some()
    }

    /// A command re-running test `name` in a child, with the systemd
    /// variables of the outer environment removed and `envs` set. Each
    /// variable in `own_pid` is set to the child's own pid (through
    /// `sh -c '…=$$ exec …'`, since `exec` keeps the pid).
    fn child(name: &str, envs: &[(&str, &str)], own_pid: &[&str]) -> Command {
        let exe = env::current_exe().expect("test binary path");
        let mut script = String::new();
        for var in own_pid {
            script.push_str(&format!("{var}=$$ "));
        }
        script.push_str("exec \"$0\" \"$@\"");
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script).arg(exe);
        cmd.args([
            &format!("systemd::tests::{name}"),
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ]);
        for var in [
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "JOURNAL_STREAM",
            "LISTEN_PID",
            "LISTEN_FDS",
            "LISTEN_FDNAMES",
            "CREDENTIALS_DIRECTORY",
            LOG_ENV,
        ] {
            cmd.env_remove(var);
        }
        cmd.env(CHILD, "1").envs(envs.iter().copied());
        cmd
    }

    fn run(mut cmd: Command) -> Output {
        let out = cmd.output().expect("spawn child");
        assert!(
            out.status.success(),
            "child failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    #[test]
    fn status_is_one_line() {
        let check = |input: &str, expected: &str| assert_eq!(one_line(input), expected);
        check("idle", "idle");
        check("a\nb", "a b");
        check("a\r\nb\n", "a b");
        check("  3 issues \n\n in review  ", "3 issues in review");
        check("", "");
    }

    #[test]
    fn notifications_reach_the_socket() {
        if in_child() {
            notify_ready("ready:\n2 issues");
            notify_status("reviewing #7\r\nci pending");
            notify_watchdog();
            notify_stopping();
            assert!(
                env::var_os("NOTIFY_SOCKET").is_some(),
                "the variable stays set"
            );
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind");
        let path_str = path.to_str().expect("utf-8 path");
        run(child(
            "notifications_reach_the_socket",
            &[("NOTIFY_SOCKET", path_str)],
            &[],
        ));
        socket.set_nonblocking(true).expect("nonblocking");
        let mut received = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            received.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        let expected = [
            "READY=1\nSTATUS=ready: 2 issues\n",
            "STATUS=reviewing #7 ci pending\n",
            "WATCHDOG=1\n",
            "STOPPING=1\n",
        ];
        assert_eq!(received, expected);
    }

    #[test]
    fn notifications_without_a_socket_do_nothing() {
        if in_child() {
            notify_ready("ready");
            notify_status("status");
            notify_watchdog();
            notify_stopping();
            println!("survived");
            return;
        }
        let out = run(child("notifications_without_a_socket_do_nothing", &[], &[]));
        assert!(String::from_utf8_lossy(&out.stdout).contains("survived"));
        assert!(!String::from_utf8_lossy(&out.stderr).contains("notify"));
    }

    #[test]
    fn watchdog_interval_values() {
        // Expected: microseconds.
        let check = |usec: Option<&str>, pid: Option<&str>, expected: Option<u64>| {
            let got = watchdog_interval_from(usec, pid, 4242).map(|d| d.as_micros());
            assert_eq!(got, expected.map(u128::from), "{usec:?} {pid:?}");
        };
        check(None, None, None);
        check(Some("20000000"), None, Some(10_000_000));
        check(Some("20000000"), Some("4242"), Some(10_000_000));
        check(Some("20000000"), Some("1"), None);
        check(Some("20000000"), Some("x"), None);
        check(Some("3001"), None, Some(1500));
        check(Some("0"), None, None);
        check(Some("-5"), None, None);
        check(Some("ten"), None, None);
        check(Some(""), None, None);
    }

    #[test]
    fn watchdog_interval_from_the_environment() {
        if in_child() {
            let expected = env::var("EXPECT_MS").expect("EXPECT_MS");
            let got = watchdog_interval().map(|d| d.as_millis().to_string());
            assert_eq!(got.unwrap_or_else(|| "none".into()), expected);
            return;
        }
        let name = "watchdog_interval_from_the_environment";
        let usec = ("WATCHDOG_USEC", "30000000");
        run(child(
            name,
            &[usec, ("EXPECT_MS", "15000")],
            &["WATCHDOG_PID"],
        ));
        run(child(name, &[usec, ("EXPECT_MS", "15000")], &[]));
        run(child(
            name,
            &[usec, ("WATCHDOG_PID", "1"), ("EXPECT_MS", "none")],
            &[],
        ));
        run(child(name, &[("EXPECT_MS", "none")], &[]));
    }

    #[test]
    fn journal_stream_values() {
        let check = |value: &str, expected: bool| {
            assert_eq!(
                journal_stream_matches(value, 25, 12345),
                expected,
                "{value:?}"
            );
        };
        check("25:12345", true);
        check("25:12345\n", true);
        check("25:12346", false);
        check("24:12345", false);
        check("25", false);
        check("", false);
        check("a:b", false);
        check("25:12345:1", false);
    }

    #[test]
    fn stderr_is_journal_compares_with_fd_2() {
        if in_child() {
            let expected = env::var("EXPECT").expect("EXPECT") == "yes";
            assert_eq!(stderr_is_journal(), expected);
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let err_path = dir.path().join("stderr");
        let err_file = fs::File::create(&err_path).expect("create");
        let meta = err_file.metadata().expect("stat");
        let name = "stderr_is_journal_compares_with_fd_2";
        let cases = [
            (format!("{}:{}", meta.dev(), meta.ino()), "yes"),
            (format!("{}:{}", meta.dev(), meta.ino() + 1), "no"),
            ("garbage".to_owned(), "no"),
        ];
        for (value, expect) in cases {
            let mut cmd = child(name, &[("JOURNAL_STREAM", &value), ("EXPECT", expect)], &[]);
            cmd.stderr(err_file.try_clone().expect("dup"));
            let out = cmd.output().expect("spawn");
            let err = fs::read_to_string(&err_path).unwrap_or_default();
            assert!(out.status.success(), "{value}: {err}");
        }
        // Unset: never the journal.
        run(child(name, &[("EXPECT", "no")], &[]));
    }

    #[test]
    fn logging_to_stderr_and_a_file() {
        if in_child() {
            let path = env::var("LOG_FILE").expect("LOG_FILE");
            let expected = match env::var("EXPECT").expect("EXPECT").as_str() {
                "journal" => LogTarget::Journal,
                _ => LogTarget::Stderr,
            };
            assert_eq!(
                init_logging("hydraflow-test", Some(Path::new(&path))),
                expected
            );
            // A second call is harmless.
            assert_eq!(init_logging("hydraflow-test", None), expected);
            let span = tracing::info_span!("issue", issue = 42, stage = "review");
            let _guard = span.enter();
            tracing::info!(repo_slug = "owner-repo", "picked up");
            tracing::debug!("debug line");
            tracing::trace!("trace line");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("logs").join("worker.log");
        let log_str = log.to_str().expect("utf-8");
        let name = "logging_to_stderr_and_a_file";
        let envs = [
            ("LOG_FILE", log_str),
            (LOG_ENV, "debug"),
            ("EXPECT", "stderr"),
        ];
        let out = run(child(name, &envs, &[]));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let file = fs::read_to_string(&log).expect("log file written");
        for text in [&*stderr, &*file] {
            assert!(text.contains("picked up"), "{text}");
            assert!(text.contains("repo_slug=\"owner-repo\""), "{text}");
            assert!(
                text.contains("issue=42") && text.contains("stage=\"review\""),
                "{text}"
            );
            assert!(text.contains("debug line"), "{text}");
            assert!(!text.contains("trace line"), "{text}");
            assert!(
                !text.contains('\x1b'),
                "no ANSI when not a terminal: {text}"
            );
        }

        // Default level info; the file is appended to.
        let envs = [("LOG_FILE", log_str), ("EXPECT", "stderr")];
        run(child(name, &envs, &[]));
        let file = fs::read_to_string(&log).expect("log file");
        assert_eq!(file.matches("picked up").count(), 2, "{file}");
        assert_eq!(file.matches("debug line").count(), 1, "{file}");
    }

    #[test]
    fn journal_stream_without_a_journal_falls_back_to_stderr() {
        // The child runs `logging_to_stderr_and_a_file` with the target computed here.
        let dir = tempfile::tempdir().expect("tempdir");
        let err_path = dir.path().join("stderr");
        let err_file = fs::File::create(&err_path).expect("create");
        let meta = err_file.metadata().expect("stat");
        let stream = format!("{}:{}", meta.dev(), meta.ino());
        let journal_up = UnixDatagram::unbound()
            .and_then(|s| s.connect("/run/systemd/journal/socket"))
            .is_ok();
        let expect = if journal_up { "journal" } else { "stderr" };
        let log = dir.path().join("worker.log");
        let envs = [
            ("JOURNAL_STREAM", stream.as_str()),
            ("LOG_FILE", log.to_str().expect("utf-8")),
            ("EXPECT", expect),
        ];
        let mut cmd = child("logging_to_stderr_and_a_file", &envs, &[]);
        cmd.stderr(err_file.try_clone().expect("dup"));
        let status = cmd.output().expect("spawn").status;
        let err = fs::read_to_string(&err_path).expect("stderr");
        assert!(status.success(), "{err}");
        assert!(fs::read_to_string(&log).expect("log").contains("picked up"));
        if !journal_up {
            assert!(err.contains("picked up"), "{err}");
            assert!(err.contains("journal"), "the fallback is logged: {err}");
        }
    }

    #[test]
    fn credentials() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("gh-token"), "ghp_abc\n").expect("write");
        fs::write(dir.path().join("spaced"), "  x y \n").expect("write");
        fs::write(dir.path().join("empty"), "\n").expect("write");
        fs::create_dir(dir.path().join("sub")).expect("mkdir");
        fs::write(dir.path().join("sub").join("inner"), "secret").expect("write");
        let check = |name: &str, expected: Option<&str>| {
            assert_eq!(
                read_credential_in(dir.path(), name).as_deref(),
                expected,
                "{name:?}"
            );
        };
        check("gh-token", Some("ghp_abc"));
        check("spaced", Some("x y"));
        check("empty", None);
        check("missing", None);
        check("sub/inner", None);
        check("../gh-token", None);
        check("/etc/passwd", None);
        check("", None);
        check(".", None);
        check("..", None);
        check("sub", None);
    }

    #[test]
    fn credentials_from_the_environment() {
        if in_child() {
            assert_eq!(read_credential("gh-token").as_deref(), Some("ghp_abc"));
            assert_eq!(read_credential("other"), None);
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("gh-token"), "ghp_abc\n").expect("write");
        let creds = ("CREDENTIALS_DIRECTORY", dir.path().to_str().expect("utf-8"));
        run(child("credentials_from_the_environment", &[creds], &[]));
    }

    #[test]
    fn no_credentials_directory_means_no_credentials() {
        if in_child() {
            assert_eq!(read_credential("gh-token"), None);
            return;
        }
        run(child(
            "no_credentials_directory_means_no_credentials",
            &[],
            &[],
        ));
    }

    #[test]
    fn socket_activation() {
        if in_child() {
            let fds = take_listen_fds().expect("take");
            assert_eq!(fds.len(), 2);
            for fd in &fds {
                let flags =
                    nix::fcntl::fcntl(fd.as_fd(), nix::fcntl::FcntlArg::F_GETFD).expect("F_GETFD");
                assert_ne!(flags & nix::libc::FD_CLOEXEC, 0, "close-on-exec");
            }
            assert_eq!(fds[0].as_raw_fd(), 3);
            let mut fds = fds.into_iter();
            let unix = UnixListener::from(fds.next().expect("fd 3"));
            let tcp = std::net::TcpListener::from(fds.next().expect("fd 4"));
            let unix_path = unix.local_addr().expect("addr");
            assert_eq!(
                unix_path.as_pathname().map(Path::to_path_buf),
                Some(env::var("UNIX_PATH").expect("UNIX_PATH").into())
            );
            assert_eq!(
                tcp.local_addr().expect("addr").to_string(),
                env::var("TCP_ADDR").expect("TCP_ADDR")
            );
            assert_eq!(take_listen_fds().expect("second").len(), 0, "taken once");
            if single_threaded() {
                assert!(env::var_os("LISTEN_PID").is_none());
                assert!(env::var_os("LISTEN_FDS").is_none());
            }
            println!("activated");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let unix_path = dir.path().join("api.sock");
        let unix = UnixListener::bind(&unix_path).expect("bind unix");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let tcp_addr = tcp.local_addr().expect("addr").to_string();
        // Park both far from 3 and 4 so the moves below cannot clobber them.
        let high = |fd: std::os::fd::BorrowedFd<'_>| {
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(100)).expect("dup")
        };
        let (a, b) = (high(unix.as_fd()), high(tcp.as_fd()));
        let envs = [
            ("LISTEN_FDS", "2"),
            ("UNIX_PATH", unix_path.to_str().expect("utf-8")),
            ("TCP_ADDR", tcp_addr.as_str()),
        ];
        let mut cmd = child("socket_activation", &envs, &["LISTEN_PID"]);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        // SAFETY: the closure only calls dup2(2), which is async-signal-safe, on
        // descriptors that stay open in the parent until the child has started.
        unsafe {
            cmd.pre_exec(move || {
                for (from, to) in [(a, 3), (b, 4)] {
                    if nix::libc::dup2(from, to) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let out = run(cmd);
        assert!(String::from_utf8_lossy(&out.stdout).contains("activated"));
        nix::unistd::close(a).expect("close");
        nix::unistd::close(b).expect("close");
    }

    #[test]
    fn named_socket_activation() {
        if in_child() {
            let got = match take_named_listen_fds() {
                Ok(fds) => fds
                    .iter()
                    .map(|(name, fd)| format!("{name}={}", fd.as_raw_fd()))
                    .collect::<Vec<_>>()
                    .join(" "),
                Err(err) => format!("error: {err}"),
            };
            assert_eq!(got, env::var("EXPECT").expect("EXPECT"));
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let unix = UnixListener::bind(dir.path().join("api.sock")).expect("bind unix");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let high = |fd: std::os::fd::BorrowedFd<'_>| {
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(100)).expect("dup")
        };
        let (a, b) = (high(unix.as_fd()), high(tcp.as_fd()));
        let check = |names: Option<&str>, expected: &str| {
            let mut envs = vec![("LISTEN_FDS", "2"), ("EXPECT", expected)];
            envs.extend(names.map(|n| ("LISTEN_FDNAMES", n)));
            let mut cmd = child("named_socket_activation", &envs, &["LISTEN_PID"]);
            // SAFETY: as in `socket_activation`: dup2(2) only, on open descriptors.
            unsafe {
                cmd.pre_exec(move || {
                    for (from, to) in [(a, 3), (b, 4)] {
                        if nix::libc::dup2(from, to) < 0 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
            run(cmd);
        };
        check(Some("dashboard:control"), "dashboard=3 control=4");
        check(Some("dashboard:dashboard"), "dashboard=3 dashboard=4");
        check(None, "unknown=3 unknown=4");
        check(
            Some("dashboard"),
            "error: LISTEN_FDNAMES names 1 descriptors but LISTEN_FDS is 2: expected one name per descriptor",
        );
        nix::unistd::close(a).expect("close");
        nix::unistd::close(b).expect("close");
    }

    #[test]
    fn threads_are_counted() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || rx.recv());
        assert!(!single_threaded(), "this thread and `other` are alive");
        drop(tx);
        let _ = other.join();
    }

    #[test]
    fn no_activation_means_no_fds() {
        if in_child() {
            assert_eq!(take_listen_fds().expect("take").len(), 0);
            return;
        }
        let name = "no_activation_means_no_fds";
        run(child(name, &[], &[]));
        // Meant for another process.
        run(child(
            name,
            &[("LISTEN_PID", "1"), ("LISTEN_FDS", "2")],
            &[],
        ));
    }
}
