//! Supervised child processes: the one place HydraFlow starts a program
//! (an agent or its shim, a worker instance of the supervisor's process
//! backend, the repository's quality command).
//!
//! Every child:
//! - runs in its own process group (so the whole group can be signalled);
//! - gets SIGTERM when its parent dies, however it dies
//!   (`PR_SET_PDEATHSIG`, see prctl(2)); a parent that died between the fork
//!   and that call sent nothing, so the child checks its parent afterwards
//!   and does not start;
//! - starts with exactly the environment it is given (none of the parent's
//!   variables leak in);
//! - can join a cgroup before its first instruction (it writes `0` to the
//!   cgroup's `cgroup.procs`, opened before the fork), and can receive one
//!   descriptor at a fixed number.
//!
//! **Invariant:** nothing else in HydraFlow starts a process (the demo agent
//! and the agent shim, which stand in for and wrap an agent, excepted).

use std::ffi::OsStr;
use std::io;
use std::os::fd::RawFd;
use std::path::Path;
use std::process::Stdio;

use tokio::process::{Child, Command};

/// What to start, and how.
#[derive(Debug)]
pub struct Spec<'a> {
    /// The program (looked up on the given environment's `PATH` when it has
    /// no slash).
    pub program: &'a OsStr,
    /// `argv[0]` when it differs from the program.
    pub arg0: Option<&'a str>,
    /// The arguments after `argv[0]`.
    pub args: Vec<&'a OsStr>,
    /// The child's complete environment.
    pub env: &'a [(String, String)],
    /// Its working directory.
    pub cwd: &'a Path,
    /// Standard input, output and error.
    pub stdio: [Stdio; 3],
    /// Kill (SIGKILL) the child itself when its [`Child`] is dropped.
    pub kill_on_drop: bool,
    /// An open `cgroup.procs` of the cgroup to join before exec.
    pub cgroup_procs: Option<RawFd>,
    /// A descriptor to pass, and the number it gets in the child.
    pub pass_fd: Option<(RawFd, RawFd)>,
}

impl<'a> Spec<'a> {
    /// `program args…` in `cwd` with `env`, stdin from `/dev/null` and
    /// output to pipes, killed when dropped.
    pub fn new(program: &'a OsStr, env: &'a [(String, String)], cwd: &'a Path) -> Spec<'a> {
        Spec {
            program,
            arg0: None,
            args: Vec::new(),
            env,
            cwd,
            stdio: [Stdio::null(), Stdio::piped(), Stdio::piped()],
            kill_on_drop: true,
            cgroup_procs: None,
            pass_fd: None,
        }
    }
}

/// Start the child described by `spec`.
///
/// # Errors
/// The error of starting it: the program missing or not executable, the
/// cgroup not writable, or its parent gone before it started.
pub fn spawn(spec: Spec<'_>) -> io::Result<Child> {
    let mut command = Command::new(spec.program);
    if let Some(arg0) = spec.arg0 {
        command.arg0(arg0);
    }
    let [stdin, stdout, stderr] = spec.stdio;
    command
        .args(&spec.args)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(spec.cwd)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(spec.kill_on_drop);
    let parent = nix::unistd::getpid();
    let (procs, pass) = (spec.cgroup_procs, spec.pass_fd);
    // SAFETY: the closure runs in the forked child before exec and makes
    // only async-signal-safe system calls (write, fcntl, dup2, prctl,
    // getppid) on descriptors opened before the fork; it allocates nothing
    // but the error of a parent that died meanwhile.
    unsafe {
        command.pre_exec(move || {
            if let Some(fd) = procs
                && nix::libc::write(fd, b"0".as_ptr().cast(), 1) != 1
            {
                return Err(io::Error::last_os_error());
            }
            if let Some((fd, target)) = pass {
                let r = if fd == target {
                    nix::libc::fcntl(fd, nix::libc::F_SETFD, 0)
                } else {
                    nix::libc::dup2(fd, target)
                };
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                .map_err(io::Error::from)?;
            if nix::unistd::getppid() != parent {
                return Err(io::Error::other(
                    "the parent exited while starting the child",
                ));
            }
            Ok(())
        });
    }
    command.spawn()
}

/// Kill a child's whole process group with SIGKILL (a group already gone
/// is fine).
pub fn kill_group(child: &Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Vec<(String, String)> {
        vec![
            ("PATH".into(), "/usr/bin:/bin".into()),
            ("ONLY".into(), "this".into()),
        ]
    }

    #[tokio::test]
    async fn the_child_gets_exactly_its_environment_and_its_own_group() {
        let env = env();
        let dir = tempfile::tempdir().unwrap();
        let mut spec = Spec::new(OsStr::new("sh"), &env, dir.path());
        spec.args = vec![
            OsStr::new("-c"),
            OsStr::new("env; cut -d' ' -f5 /proc/$$/stat; pwd"),
        ];
        let out = spawn(spec).unwrap().wait_with_output().await.unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let mut lines = text.lines();
        let vars: Vec<&str> = lines
            .by_ref()
            .take_while(|l| l.contains('='))
            .filter(|l| !l.starts_with("PWD=") && !l.starts_with("SHLVL=") && !l.starts_with("_="))
            .collect();
        assert_eq!(vars, ["PATH=/usr/bin:/bin", "ONLY=this"], "{text}");
        let pgid: u32 = text
            .lines()
            .find_map(|l| l.trim().parse().ok())
            .expect("pgid");
        assert_ne!(pgid, std::process::id(), "its own process group");
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
    }

    #[tokio::test]
    async fn a_missing_program_is_an_error() {
        let env = env();
        let dir = tempfile::tempdir().unwrap();
        let err = spawn(Spec::new(
            OsStr::new("no-such-program-here"),
            &env,
            dir.path(),
        ))
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
