//! Containment and accounting of agent calls.
//!
//! **Cgroup mode.** When systemd delegated a cgroup v2 subtree to the worker
//! (`Delegate=yes` in `hydraflow@.service`; see systemd.io
//! "CGROUP_DELEGATION"), the worker moves itself into the leaf `worker/` of
//! that subtree (a cgroup with processes cannot have controllers enabled for
//! its children: the "no internal processes" rule), enables the `memory` and
//! `pids` controllers for its children where the subtree has them, and runs
//! each agent call in a sibling `agent-<issue>-<stage>/` with `memory.max`
//! (`agent.memory_max`, with `memory.oom.group = 1`) and `pids.max`
//! (`agent.tasks_max`). The call's process joins that cgroup before it
//! executes anything (it writes `0` to `cgroup.procs` between fork and exec).
//! When the call ends, times out or is dropped, `cgroup.kill` kills
//! everything in it at once, `setsid` or not, and the cgroup is removed. At
//! start, `agent-*` cgroups a previous worker left are killed and removed.
//! CPU time comes from `cpu.stat` (`usage_usec`), the memory peak from
//! `memory.peak`, a kernel OOM kill from `memory.events` (`oom_kill`).
//! A subtree is taken as delegated when its directory carries systemd's
//! `trusted.delegate` or `user.delegate` extended attribute, or belongs to
//! the worker's own (non-root) user, and the worker can write its
//! `cgroup.procs`. The root cgroup is never used.
//!
//! **Subreaper mode.** Without a delegated cgroup (off systemd, or a unit
//! without `Delegate=yes`) each call runs under `hydraflow agent-shim`
//! ([`super::shim`]): a child subreaper (`PR_SET_CHILD_SUBREAPER`) that
//! inherits every orphaned descendant of the agent, kills all of them when
//! the agent exits, when it is told to stop, and when the worker dies (its
//! parent-death signal), and reports their CPU time and largest resident set.
//! Memory and task limits cannot be applied there: [`Containment::notes`]
//! says so, and the worker logs it at start. In cgroup mode the shim runs
//! inside the call's cgroup too.
//!
//! **Process-group mode** ([`Containment::default`]): the agent's own
//! process group only, for library users and tests that run no shim.

use std::ffi::CString;
use std::fs;
use std::io::{self, Write as _};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::Stage;

/// What one call used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Resources {
    /// Wall time, milliseconds.
    pub wall_ms: u64,
    /// CPU time of the agent and everything it started (user + system),
    /// milliseconds: the cgroup's `cpu.stat`, else the shim's report.
    pub cpu_ms: Option<u64>,
    /// Peak memory, bytes: the cgroup's `memory.peak` (all its processes
    /// together), else the largest resident set of one process.
    pub memory_peak_bytes: Option<u64>,
    /// Kernel OOM kills in the call's cgroup.
    pub oom_kills: u64,
    /// The `memory.max` the call ran under, bytes.
    pub memory_max: Option<u64>,
}

/// How calls are contained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Each call in its own cgroup of the delegated subtree.
    Cgroup,
    /// Each call under a child subreaper (`hydraflow agent-shim`).
    Subreaper,
    /// The agent's process group only.
    ProcessGroup,
}

/// Limits for each call (`agent.memory_max`, `agent.tasks_max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// `memory.max`, bytes.
    pub memory_max: Option<u64>,
    /// `pids.max`.
    pub tasks_max: Option<u64>,
}

/// The delegated cgroup subtree.
#[derive(Debug, Clone)]
struct Tree {
    /// The delegated cgroup (the worker lives in its `worker/` leaf).
    root: PathBuf,
    /// Controllers enabled for the agents' cgroups.
    memory: bool,
    pids: bool,
    limits: Limits,
}

/// How this worker contains its agent calls, decided once at start.
#[derive(Debug, Clone)]
pub struct Containment {
    mode: Mode,
    tree: Option<Tree>,
    /// The program run as the shim (`/proc/self/exe`: the running binary,
    /// even when the file was replaced by an upgrade).
    shim: Option<PathBuf>,
    notes: Vec<String>,
}

impl Default for Containment {
    fn default() -> Self {
        Containment {
            mode: Mode::ProcessGroup,
            tree: None,
            shim: None,
            notes: Vec::new(),
        }
    }
}

/// cgroup2's `statfs` magic number (linux/magic.h).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == CGROUP2_SUPER_MAGIC)
}

/// Where the cgroup v2 hierarchy is mounted and whether the layout is
/// hybrid (v1 controllers at `/sys/fs/cgroup/<controller>`, a
/// controller-less v2 tree at `/sys/fs/cgroup/unified`).
fn v2_mount() -> Option<(PathBuf, bool)> {
    let unified = Path::new("/sys/fs/cgroup");
    if is_cgroup2(unified) {
        return Some((unified.to_path_buf(), false));
    }
    let hybrid = unified.join("unified");
    is_cgroup2(&hybrid).then_some((hybrid, true))
}

/// This process's cgroup v2 path (`0::/path` of `/proc/self/cgroup`).
fn own_cgroup() -> Option<String> {
    let text = fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

/// An extended attribute's value, when set and readable.
fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let path = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let name = CString::new(name).ok()?;
    let mut buf = [0u8; 16];
    // SAFETY: both strings are NUL-terminated and live across the call; the
    // buffer's pointer and length match.
    let n = unsafe {
        nix::libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    usize::try_from(n).ok().map(|n| buf[..n].to_vec())
}

fn writable(path: &Path) -> bool {
    nix::unistd::access(path, nix::unistd::AccessFlags::W_OK).is_ok()
}

/// Write `value` to the cgroup file `dir/name`.
fn write_file(dir: &Path, name: &str, value: &str) -> io::Result<()> {
    let path = dir.join(name);
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot write {value:?} to {}: {e}", path.display()),
            )
        })
}

/// A flat-keyed cgroup file (`cpu.stat`, `memory.events`): the value of `key`.
fn keyed(dir: &Path, file: &str, key: &str) -> Option<u64> {
    let text = fs::read_to_string(dir.join(file)).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// A single-value cgroup file (`memory.peak`).
fn single(dir: &Path, file: &str) -> Option<u64> {
    fs::read_to_string(dir.join(file)).ok()?.trim().parse().ok()
}

/// Kill everything in the cgroup `dir` and remove it: `cgroup.kill`
/// (Linux 5.14+), else SIGKILL to each process of `cgroup.procs`, until
/// `cgroup.events` says it is empty (at most about two seconds), then rmdir.
/// What a call's end, timeout or drop does to the call's cgroup.
///
/// # Errors
/// The cgroup cannot be removed (still populated, or no permission), naming it.
pub fn kill_and_remove(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let killed = write_file(dir, "cgroup.kill", "1").is_ok();
    for _ in 0..200 {
        if !killed && let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        if keyed(dir, "cgroup.events", "populated") == Some(0) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    fs::remove_dir(dir).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot remove cgroup {}: {e}", dir.display()),
        )
    })
}

impl Containment {
    /// Decide how calls are contained and set it up: look for a delegated
    /// cgroup v2 subtree, move this process into its `worker/` leaf, enable
    /// the controllers the limits need and remove cgroups a previous worker
    /// left; else fall back to the subreaper. `shim` is the program run as
    /// `hydraflow agent-shim`. Never fails: what cannot be done is in
    /// [`Containment::notes`].
    pub fn setup(limits: Limits, shim: PathBuf) -> Containment {
        let mut notes = Vec::new();
        match delegated_root() {
            Ok((root, hybrid)) => match enter(&root, limits, hybrid, &mut notes) {
                Ok(tree) => {
                    return Containment {
                        mode: Mode::Cgroup,
                        tree: Some(tree),
                        shim: Some(shim),
                        notes,
                    };
                }
                Err(e) => notes.push(format!("the delegated cgroup cannot be used: {e}")),
            },
            Err(why) => notes.push(why),
        }
        if limits.memory_max.is_some() || limits.tasks_max.is_some() {
            notes.push(
                "agent.memory_max and agent.tasks_max are not applied: they need a delegated cgroup"
                    .to_string(),
            );
        }
        Containment {
            mode: Mode::Subreaper,
            tree: None,
            shim: Some(shim),
            notes,
        }
    }

    /// The mode in use.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The delegated cgroup, in cgroup mode.
    pub fn cgroup_root(&self) -> Option<&Path> {
        self.tree.as_ref().map(|t| t.root.as_path())
    }

    /// The program run as the shim, when calls run under one.
    pub fn shim(&self) -> Option<&Path> {
        self.shim.as_deref()
    }

    /// What could not be set up, and why (one sentence each).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// One line for the log: the mode, where, and the limits in force.
    pub fn describe(&self) -> String {
        match (&self.mode, &self.tree) {
            (Mode::Cgroup, Some(t)) => {
                let mut limits = Vec::new();
                if t.memory
                    && let Some(m) = t.limits.memory_max
                {
                    limits.push(format!("memory.max {m}"));
                }
                if t.pids
                    && let Some(n) = t.limits.tasks_max
                {
                    limits.push(format!("pids.max {n}"));
                }
                format!(
                    "agent containment: cgroup mode, each call in {}/agent-<issue>-<stage>{}",
                    t.root.display(),
                    if limits.is_empty() {
                        String::new()
                    } else {
                        format!(" with {}", limits.join(", "))
                    }
                )
            }
            (Mode::Subreaper, _) => "agent containment: subreaper mode, each call under \
                 `hydraflow agent-shim`, which kills every descendant when the call ends"
                .to_string(),
            _ => "agent containment: process groups only".to_string(),
        }
    }

    /// Prepare one call: in cgroup mode, make its cgroup (replacing one left
    /// by an earlier call) with the limits written.
    ///
    /// # Errors
    /// A cgroup that cannot be made or configured, naming its path.
    pub fn prepare(&self, issue: u64, stage: Stage) -> io::Result<CallScope> {
        let cgroup = match &self.tree {
            Some(tree) => Some(AgentCgroup::create(tree, issue, stage)?),
            None => None,
        };
        Ok(CallScope {
            cgroup,
            started: Instant::now(),
        })
    }
}

/// The delegated cgroup of this process, or why there is none.
fn delegated_root() -> Result<(PathBuf, bool), String> {
    let (mount, hybrid) = v2_mount()
        .ok_or_else(|| "no cgroup is delegated: no cgroup v2 hierarchy is mounted".to_string())?;
    let own = own_cgroup().ok_or_else(|| {
        "no cgroup is delegated: /proc/self/cgroup names no cgroup v2 path".to_string()
    })?;
    if own == "/" {
        return Err(format!(
            "no cgroup is delegated: the worker runs in the root cgroup of {}",
            mount.display()
        ));
    }
    let dir = mount.join(own.trim_start_matches('/'));
    let flagged = ["trusted.delegate", "user.delegate"]
        .iter()
        .any(|n| xattr(&dir, n).is_some_and(|v| v == b"1"));
    let euid = nix::unistd::geteuid().as_raw();
    let owned = euid != 0 && fs::metadata(&dir).is_ok_and(|m| m.uid() == euid);
    if !flagged && !owned {
        return Err(format!(
            "no cgroup is delegated: {} is not marked delegated (run under systemd with \
             Delegate=yes, as hydraflow@.service does)",
            dir.display()
        ));
    }
    if !writable(&dir) || !writable(&dir.join("cgroup.procs")) {
        return Err(format!(
            "no cgroup is delegated: {} is not writable by the worker",
            dir.display()
        ));
    }
    Ok((dir, hybrid))
}

/// Move into `root/worker`, enable controllers, clean up old agent cgroups.
fn enter(root: &Path, limits: Limits, hybrid: bool, notes: &mut Vec<String>) -> io::Result<Tree> {
    let leaf = root.join("worker");
    match fs::create_dir(&leaf) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot create {}: {e}", leaf.display()),
            ));
        }
    }
    write_file(&leaf, "cgroup.procs", &std::process::id().to_string())?;
    if let Ok(entries) = fs::read_dir(root) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with("agent-")
                && entry.path().is_dir()
                && let Err(e) = kill_and_remove(&entry.path())
            {
                notes.push(format!("a previous agent cgroup was left: {e}"));
            }
        }
    }
    let available = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let has = |c: &str| available.split_whitespace().any(|a| a == c);
    let why_missing = |c: &str| {
        format!(
            "the {c} controller is not available in {} (cgroup.controllers: {:?}){}",
            root.display(),
            available.trim(),
            if hybrid {
                "; this host mounts its controllers on cgroup v1 (hybrid layout)"
            } else {
                ""
            }
        )
    };
    let mut memory = false;
    let mut pids = false;
    for (controller, flag) in [("memory", &mut memory), ("pids", &mut pids)] {
        if !has(controller) {
            continue;
        }
        match write_file(root, "cgroup.subtree_control", &format!("+{controller}")) {
            Ok(()) => *flag = true,
            Err(e) => notes.push(format!(
                "the {controller} controller cannot be enabled: {e}"
            )),
        }
    }
    if let Some(m) = limits.memory_max
        && !memory
    {
        notes.push(format!(
            "agent.memory_max = {m} is not applied: {}",
            why_missing("memory")
        ));
    }
    if let Some(n) = limits.tasks_max
        && !pids
    {
        notes.push(format!(
            "agent.tasks_max = {n} is not applied: {}",
            why_missing("pids")
        ));
    }
    if !memory && limits.memory_max.is_none() {
        notes.push(format!(
            "memory.peak is not recorded: {}",
            why_missing("memory")
        ));
    }
    Ok(Tree {
        root: root.to_path_buf(),
        memory,
        pids,
        limits,
    })
}

/// One call's cgroup.
#[derive(Debug)]
struct AgentCgroup {
    dir: PathBuf,
    procs: OwnedFd,
    memory_max: Option<u64>,
}

impl AgentCgroup {
    fn create(tree: &Tree, issue: u64, stage: Stage) -> io::Result<AgentCgroup> {
        let dir = tree.root.join(format!("agent-{issue}-{stage}"));
        kill_and_remove(&dir)?;
        fs::create_dir(&dir).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot create cgroup {}: {e}", dir.display()),
            )
        })?;
        let settings = limit_settings(tree.memory, tree.pids, tree.limits);
        for (file, value) in &settings {
            write_file(&dir, file, value)?;
        }
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot open {}/cgroup.procs: {e}", dir.display()),
                )
            })?;
        Ok(AgentCgroup {
            dir,
            procs: procs.into(),
            memory_max: if tree.memory {
                tree.limits.memory_max
            } else {
                None
            },
        })
    }
}

/// The files written into a call's cgroup, in order: `memory.max` and
/// `memory.oom.group` (kill the whole call when it runs out, not one process
/// of it) when the memory controller is enabled and a limit is set,
/// `pids.max` when the pids controller is enabled and a limit is set.
pub fn limit_settings(memory: bool, pids: bool, limits: Limits) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if memory && let Some(m) = limits.memory_max {
        out.push(("memory.max", m.to_string()));
        out.push(("memory.oom.group", "1".to_string()));
    }
    if pids && let Some(n) = limits.tasks_max {
        out.push(("pids.max", n.to_string()));
    }
    out
}

/// One running call's containment: its cgroup (cgroup mode) and its clock.
#[derive(Debug)]
pub struct CallScope {
    cgroup: Option<AgentCgroup>,
    started: Instant,
}

impl CallScope {
    /// The descriptor of the call's `cgroup.procs`, to join it between fork
    /// and exec (writing `0` moves the writer).
    pub fn procs_fd(&self) -> Option<i32> {
        self.cgroup.as_ref().map(|c| c.procs.as_raw_fd())
    }

    /// Kill everything in the call's cgroup now (no-op without one).
    pub fn kill(&self) {
        if let Some(c) = &self.cgroup {
            let _ = write_file(&c.dir, "cgroup.kill", "1");
        }
    }

    /// Read what the call used, then kill what is left and remove its cgroup.
    /// `reported` is the shim's report, used where there is no cgroup.
    pub fn finish(mut self, reported: Option<Resources>) -> Resources {
        let mut r = reported.unwrap_or_default();
        r.wall_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if let Some(c) = self.cgroup.take() {
            if let Some(usec) = keyed(&c.dir, "cpu.stat", "usage_usec") {
                r.cpu_ms = Some(usec / 1000);
            }
            if let Some(peak) = single(&c.dir, "memory.peak") {
                r.memory_peak_bytes = Some(peak);
            }
            r.oom_kills = keyed(&c.dir, "memory.events", "oom_kill").unwrap_or(0);
            r.memory_max = c.memory_max;
            if let Err(e) = kill_and_remove(&c.dir) {
                tracing::warn!(error = %e, "cannot remove an agent cgroup");
            }
        }
        r
    }
}

impl Drop for CallScope {
    fn drop(&mut self) {
        if let Some(c) = self.cgroup.take()
            && let Err(e) = kill_and_remove(&c.dir)
        {
            tracing::warn!(error = %e, "cannot remove an agent cgroup");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_written_only_where_the_controller_is() {
        let limits = Limits {
            memory_max: Some(1 << 30),
            tasks_max: Some(512),
        };
        assert_eq!(
            limit_settings(true, true, limits),
            vec![
                ("memory.max", "1073741824".to_string()),
                ("memory.oom.group", "1".to_string()),
                ("pids.max", "512".to_string()),
            ]
        );
        assert_eq!(
            limit_settings(false, true, limits),
            vec![("pids.max", "512".to_string())]
        );
        assert_eq!(limit_settings(true, true, Limits::default()), vec![]);
    }

    /// What a call's cgroup holds after `create`, on a plain directory
    /// standing in for a cgroup (the files exist there as they would in cgroupfs).
    #[test]
    fn call_cgroup_files() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let tree = Tree {
            root: dir.path().to_path_buf(),
            memory: true,
            pids: true,
            limits: Limits {
                memory_max: Some(256 << 20),
                tasks_max: Some(64),
            },
        };
        // cgroupfs makes these files with the directory; here the test does.
        let call = dir.path().join("agent-7-implement");
        fs::create_dir(&call)?;
        let cg = (|| {
            for f in ["memory.max", "memory.oom.group", "pids.max", "cgroup.procs"] {
                fs::write(call.join(f), "")?;
            }
            for (file, value) in limit_settings(tree.memory, tree.pids, tree.limits) {
                write_file(&call, file, &value)?;
            }
            io::Result::Ok(())
        })();
        cg?;
        assert_eq!(fs::read_to_string(call.join("memory.max"))?, "268435456");
        assert_eq!(fs::read_to_string(call.join("memory.oom.group"))?, "1");
        assert_eq!(fs::read_to_string(call.join("pids.max"))?, "64");
        fs::write(
            call.join("cpu.stat"),
            "usage_usec 1500000\nuser_usec 1000000\n",
        )?;
        fs::write(call.join("memory.peak"), "12345\n")?;
        fs::write(
            call.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )?;
        assert_eq!(keyed(&call, "cpu.stat", "usage_usec"), Some(1_500_000));
        assert_eq!(single(&call, "memory.peak"), Some(12345));
        assert_eq!(keyed(&call, "memory.events", "oom_kill"), Some(1));
        Ok(())
    }
}
