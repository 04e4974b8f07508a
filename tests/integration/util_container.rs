//! A booted Debian 12 container for system tests (docs/design/systemd.md, "Testing
//! against the real thing"): a copy of the cached rootfs (built by
//! `tests/system/prepare-host.sh`), booted with `systemd-nspawn --boot --private-network` (only its own
//! loopback, so ports such as the supervisor's 127.0.0.1:8765 clash neither with the host's nor
//! with another test's) from a scratch cgroup,
//! its system bus socket bound to a host directory, the built `hydraflow` bound to
//! `/usr/bin/hydraflow`. Reusable by later system tests (e.g. one that installs a .deb: put it
//! with [`Container::write_file`] / [`ContainerConfig::files`] and run `dpkg -i` with
//! [`Container::exec`]).

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Why a booted-container test is `#[ignore]`d, as cargo prints it.
pub const NEEDS_CONTAINER: &str = "needs root and a booted Debian 12 container: as root run \
     tests/system/prepare-host.sh, then cargo test -- --include-ignored (.ci/run does both)";

/// Fail at once, saying what to do, when this process cannot boot a container: a test that
/// was asked to run (`--include-ignored`) never skips.
pub fn require_container_host() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test boots a container with systemd-nspawn and must run as root: {NEEDS_CONTAINER}"
    );
    let marker = cache_dir().join("rootfs/.hydraflow-rootfs-complete");
    assert!(
        marker.exists(),
        "no cached Debian 12 root file system at {}: run tests/system/prepare-host.sh as root",
        marker.display()
    );
}

/// Prints a step of a system test.
pub fn step(what: &str) {
    println!("[container] {what}");
}

/// The cache directory of the rootfs (`$HYDRAFLOW_TEST_CACHE`, default /var/cache/hydraflow-test).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("HYDRAFLOW_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/hydraflow-test"))
}

/// What to put into the container before it boots.
#[derive(Debug, Default, Clone)]
pub struct ContainerConfig {
    /// Files to write, as (absolute path inside the container, contents, mode).
    pub files: Vec<(String, String, u32)>,
    /// Host paths bound read-only into the container, as (host path, container path).
    pub bind_ro: Vec<(PathBuf, String)>,
    /// Host paths bound read-write into the container, as (host path, container path).
    pub bind: Vec<(PathBuf, String)>,
}

/// A booted container; powered off and removed on drop.
pub struct Container {
    /// The container's copy of the rootfs and the bus directory live here.
    dir: tempfile::TempDir,
    nspawn: Option<Child>,
    /// PID (on the host) of the container's systemd.
    init_pid: u32,
    /// Scratch cgroup directories, removed depth-first on drop.
    cgroups: Vec<PathBuf>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn run(cmd: &mut Command) -> Output {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "{cmd:?} failed with {}: {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Make sure the cached rootfs exists (running prepare-host.sh when not) and return it.
fn cached_rootfs() -> PathBuf {
    let rootfs = cache_dir().join("rootfs");
    if !rootfs.join(".hydraflow-rootfs-complete").exists() {
        step("building the cached rootfs with tests/system/prepare-host.sh");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/system/prepare-host.sh");
        run(Command::new(script).stdout(Stdio::inherit()));
    }
    rootfs
}

/// Host PIDs of the children of `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// The first descendant of `pid` whose command is `systemd` (the container's init).
fn find_init(pid: u32) -> Option<u32> {
    let mut queue = children(pid);
    while let Some(p) = queue.pop() {
        if fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "systemd") {
            return Some(p);
        }
        queue.extend(children(p));
    }
    None
}

/// Poll `probe` every 100 ms until it returns `Some`, at most `limit`.
fn wait_for<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "gave up waiting for {what} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Container {
    /// Copy the cached rootfs, apply `config`, boot it and wait until its system bus socket is
    /// there and `systemctl is-system-running --wait` returns.
    pub fn boot(config: &ContainerConfig) -> Container {
        let rootfs = cached_rootfs();
        let dir = tempfile::Builder::new()
            .prefix("hydraflow-container-")
            .tempdir_in(cache_dir())
            .expect("temp dir next to the cached rootfs");
        let root = dir.path().join("root");
        let bus = dir.path().join("dbus");
        fs::create_dir(&bus).expect("bus dir");
        step(&format!(
            "copying {} to {}",
            rootfs.display(),
            root.display()
        ));
        run(Command::new("cp")
            .arg("-a")
            .arg("--reflink=auto")
            .arg(&rootfs)
            .arg(&root));
        let mut container = Container {
            dir,
            nspawn: None,
            init_pid: 0,
            cgroups: Vec::new(),
        };
        for (path, contents, mode) in &config.files {
            container.write_file(path, contents, *mode);
        }

        // A scratch cgroup in each hierarchy nspawn uses, so its payload/ and supervisor/
        // cgroups are made there and not in the root.
        let name = format!(
            "hydraflow-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut join = String::new();
        for hierarchy in ["systemd", "unified"] {
            let base = Path::new("/sys/fs/cgroup").join(hierarchy);
            if !base.is_dir() {
                continue;
            }
            let cg = base.join(&name);
            fs::create_dir(&cg).unwrap_or_else(|e| panic!("mkdir {}: {e}", cg.display()));
            join.push_str(&format!("echo $$ > '{}/cgroup.procs' && ", cg.display()));
            container.cgroups.push(cg);
        }

        let mut cmd = format!(
            "{join}exec systemd-nspawn --quiet -D '{}' --boot --register=no --keep-unit \
             --private-network --bind='{}':/run/dbus",
            root.display(),
            bus.display()
        );
        for (host, inside) in &config.bind_ro {
            cmd.push_str(&format!(" --bind-ro='{}':'{inside}'", host.display()));
        }
        for (host, inside) in &config.bind {
            cmd.push_str(&format!(" --bind='{}':'{inside}'", host.display()));
        }
        step("booting with systemd-nspawn");
        let log = fs::File::create(container.dir.path().join("console.log")).expect("log file");
        let nspawn = Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn systemd-nspawn");
        let nspawn_pid = nspawn.id();
        container.nspawn = Some(nspawn);
        let socket = container.bus_socket();
        wait_for(
            "the container's system bus socket",
            Duration::from_secs(60),
            || socket.exists().then_some(()),
        );
        container.init_pid = wait_for("the container's init", Duration::from_secs(30), || {
            find_init(nspawn_pid)
        });
        step(&format!(
            "container init is host pid {}",
            container.init_pid
        ));
        // `degraded` is fine (minbase has units that cannot start in a container).
        let _ = container.exec(&["systemctl", "is-system-running", "--wait"]);
        step("container booted");
        container
    }

    /// The container's network namespace (`/proc/<init>/ns/net`), for a
    /// test server that must listen on the container's loopback.
    pub fn netns(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.init_pid))
    }

    /// The host path of the container's system bus socket.
    pub fn bus_socket(&self) -> PathBuf {
        self.dir.path().join("dbus/system_bus_socket")
    }

    /// The D-Bus address of the container's system bus.
    pub fn bus_address(&self) -> String {
        format!("unix:path={}", self.bus_socket().display())
    }

    /// Write a file into the container's root (before or after boot).
    pub fn write_file(&self, path: &str, contents: &str, mode: u32) {
        let target = self
            .dir
            .path()
            .join("root")
            .join(path.trim_start_matches('/'));
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).expect("create parent dir");
        }
        let mut f = fs::File::create(&target)
            .unwrap_or_else(|e| panic!("create {}: {e}", target.display()));
        f.write_all(contents.as_bytes()).expect("write file");
        fs::set_permissions(&target, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// Run a command inside the container (`nsenter -t <init> -a`); returns its output
    /// whatever its exit status.
    pub fn exec(&self, argv: &[&str]) -> Output {
        Command::new("nsenter")
            .arg("-t")
            .arg(self.init_pid.to_string())
            .arg("-a")
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("nsenter {argv:?}: {e}"))
    }

    /// Run a command inside the container and require success; returns its stdout.
    pub fn exec_ok(&self, argv: &[&str]) -> String {
        let out = self.exec(argv);
        assert!(
            out.status.success(),
            "{argv:?} in the container failed with {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Power the container off through its manager's `PowerOff` and wait for nspawn to exit.
    pub async fn power_off(&mut self) {
        step("powering off");
        let address = self.bus_address();
        let called = async {
            let conn = zbus::connection::Builder::address(address.as_str())
                .build()
                .await?;
            let manager = zbus_systemd::systemd1::ManagerProxy::new(&conn).await?;
            manager.power_off().await
        }
        .await;
        if let Err(err) = called {
            step(&format!(
                "PowerOff failed ({err}); nspawn will be terminated"
            ));
        }
        self.reap(Duration::from_secs(60));
    }

    /// Wait up to `limit` for nspawn to exit, then SIGTERM, then SIGKILL it.
    fn reap(&mut self, limit: Duration) {
        let Some(mut child) = self.nspawn.take() else {
            return;
        };
        let start = Instant::now();
        let mut signalled = 0;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                step(&format!("systemd-nspawn exited: {status}"));
                return;
            }
            if start.elapsed() > limit && signalled == 0 {
                let pid = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                signalled = 1;
            } else if start.elapsed() > limit * 2 && signalled == 1 {
                let _ = child.kill();
                signalled = 2;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Remove a cgroup directory tree depth-first (cgroup directories hold only pseudo-files,
/// removed with their directory).
fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&entry.path());
            }
        }
    }
    if let Err(e) = fs::remove_dir(dir) {
        eprintln!("cannot remove scratch cgroup {}: {e}", dir.display());
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.nspawn.is_some() {
            let _ = self.exec(&["systemctl", "poweroff"]);
            self.reap(Duration::from_secs(30));
        }
        for cg in self.cgroups.drain(..) {
            remove_cgroup(&cg);
        }
    }
}
