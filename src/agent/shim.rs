//! `hydraflow agent-shim`: the parent of one agent process, which makes
//! sure nothing the agent started outlives the call.
//!
//! The worker runs `hydraflow agent-shim --parent <worker pid> -- <agent
//! argv…>` with the agent's environment, working directory and pipes (and,
//! in cgroup mode, already inside the call's cgroup). The shim
//! - becomes a child subreaper (`PR_SET_CHILD_SUBREAPER`, prctl(2)): every
//!   descendant of the agent whose parent exits, including those that left
//!   the agent's process group or session with `setsid`, is reparented to it;
//! - asks for SIGTERM when the worker dies (`PR_SET_PDEATHSIG`), even by
//!   SIGKILL;
//! - runs the agent and waits, reaping orphans as they exit;
//! - when the agent exits, or on SIGTERM, SIGINT or SIGHUP, sends SIGTERM to
//!   every descendant, then SIGKILL after [`GRACE`] to whatever is left,
//!   until it has no child at all;
//! - writes a one-line JSON report to descriptor 3 when the worker passed one
//!   ([`ShimReport`]): CPU time and largest resident set of everything it
//!   reaped (`getrusage(RUSAGE_CHILDREN)`), or why the agent could not start;
//! - exits with the agent's exit code, or dies of the agent's signal.
//!
//! It runs before any other thread exists and uses no async runtime: the
//! signals it waits for are blocked and taken with sigwait(2).

use std::ffi::OsString;
use std::fs;
use std::io::Write as _;
use std::os::fd::{FromRawFd as _, RawFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// The descriptor the report is written to.
pub const REPORT_FD: RawFd = 3;
/// Time between SIGTERM and SIGKILL for the agent's descendants.
pub const GRACE: Duration = Duration::from_secs(1);

/// What the shim reports on descriptor 3.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ShimReport {
    /// User plus system CPU time of everything reaped, milliseconds.
    pub cpu_ms: u64,
    /// Largest resident set of one reaped process, bytes.
    pub max_rss_bytes: u64,
    /// The agent could not be started: the error's text.
    pub spawn_error: Option<String>,
    /// …and its errno.
    pub spawn_errno: Option<i32>,
}

/// Every descendant of this process: the children of `/proc/*/stat`'s
/// parent links, transitively.
fn descendants() -> Vec<Pid> {
    let me = std::process::id() as i32;
    let mut links: Vec<(i32, i32)> = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            // proc(5): "pid (comm) state ppid …"; comm may hold spaces and parentheses.
            let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if let Some(ppid) = ppid {
                links.push((pid, ppid));
            }
        }
    }
    let mut found = vec![me];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            links
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found.into_iter().skip(1).map(Pid::from_raw).collect()
}

fn signal_all(signal: Signal) {
    for pid in descendants() {
        let _ = kill(pid, signal);
    }
}

/// Reap every child that has exited; returns the agent's status if it was
/// among them, and whether no child is left.
fn reap(agent: Pid, status: &mut Option<WaitStatus>) -> bool {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return false,
            Ok(s) => {
                if s.pid() == Some(agent) {
                    *status = Some(s);
                }
            }
            Err(Errno::EINTR) => {}
            Err(_) => return true,
        }
    }
}

fn write_report(report: &ShimReport) {
    // The worker passes a pipe as descriptor 3; without it there is nothing to do.
    if nix::fcntl::fcntl(
        unsafe { std::os::fd::BorrowedFd::borrow_raw(REPORT_FD) },
        nix::fcntl::FcntlArg::F_GETFD,
    )
    .is_err()
    {
        return;
    }
    // SAFETY: descriptor 3 is open (checked above) and owned by nobody else
    // in this process; the File takes it over and closes it.
    let mut file = unsafe { fs::File::from_raw_fd(REPORT_FD) };
    if let Ok(mut line) = serde_json::to_vec(report) {
        line.push(b'\n');
        let _ = file.write_all(&line);
    }
}

/// Mark descriptor 3 close-on-exec, so the agent does not inherit it.
fn keep_report_fd_private() {
    // SAFETY: only flags of descriptor 3 are changed, if it is open.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(REPORT_FD) };
    let _ = nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
}

fn usage_report() -> ShimReport {
    let mut report = ShimReport::default();
    if let Ok(u) = getrusage(UsageWho::RUSAGE_CHILDREN) {
        let ms = |t: nix::sys::time::TimeVal| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1000
                + u64::try_from(t.tv_usec()).unwrap_or(0) / 1000
        };
        report.cpu_ms = ms(u.user_time()) + ms(u.system_time());
        // ru_maxrss is in KiB on Linux.
        report.max_rss_bytes = u64::try_from(u.max_rss()).unwrap_or(0) * 1024;
    }
    report
}

/// Run the shim; returns the exit code when the agent exited normally (a
/// signal is re-raised on the shim itself).
pub fn run(parent: u32, argv: &[OsString]) -> i32 {
    keep_report_fd_private();
    // Subreaper first, then the death signal, then check the parent is
    // still the worker: had it died in between, the death signal would
    // never come.
    let _ = nix::sys::prctl::set_child_subreaper(true);
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM);
    if nix::unistd::getppid().as_raw() as u32 != parent {
        return 125;
    }
    let mut waited = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGALRM,
    ] {
        waited.add(s);
    }
    // Blocked here, taken by sigwait below; std resets the child's mask.
    let _ = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&waited), None);
    let Some((program, args)) = argv.split_first() else {
        return 125;
    };
    let child = match std::process::Command::new(program).args(args).spawn() {
        Ok(c) => c,
        Err(e) => {
            write_report(&ShimReport {
                spawn_error: Some(e.to_string()),
                spawn_errno: e.raw_os_error(),
                ..ShimReport::default()
            });
            return 127;
        }
    };
    let agent = Pid::from_raw(child.id() as i32);
    let mut status = None;
    let mut stopping = false;
    // Until the agent exits or the shim is told to stop.
    while status.is_none() && !stopping {
        if reap(agent, &mut status) || status.is_some() {
            break;
        }
        if let Ok(Signal::SIGTERM | Signal::SIGINT | Signal::SIGHUP) = waited.wait() {
            stopping = true;
        }
    }
    // Then end every descendant: SIGTERM, SIGKILL after the grace, until none is left.
    signal_all(Signal::SIGTERM);
    let _ = nix::unistd::alarm::set(GRACE.as_secs().max(1) as u32);
    loop {
        if reap(agent, &mut status) {
            break;
        }
        if let Ok(Signal::SIGALRM) = waited.wait() {
            signal_all(Signal::SIGKILL);
            let _ = nix::unistd::alarm::set(1);
        }
    }
    let _ = nix::unistd::alarm::cancel();
    write_report(&usage_report());
    match status {
        Some(WaitStatus::Exited(_, code)) => code,
        Some(WaitStatus::Signaled(_, signal, _)) => {
            // Die of the same signal, so the worker sees what the agent did.
            // SAFETY: restoring the default disposition has no preconditions.
            let _ =
                unsafe { nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigDfl) };
            let mut only = SigSet::empty();
            only.add(signal);
            let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&only), None);
            let _ = nix::sys::signal::raise(signal);
            128 + signal as i32
        }
        _ => 125,
    }
}
