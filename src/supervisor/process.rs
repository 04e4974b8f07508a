//! The process backend: each instance is a child process `<worker_command> --instance <slug>` in
//! its own process group, with systemd's `Type=notify`, `Restart=on-failure` and
//! `KillMode=control-group` semantics reproduced by the supervisor itself.
//!
//! Each child runs in `<state dir>/<slug>/` (its data directory: the worker's data root is the
//! state directory, see [`crate::config::loader::state_dir`]) and gets `HYDRAFLOW_HOME=<state
//! dir>`, `HYDRAFLOW_CONFIG` (absolute) and its own
//! `NOTIFY_SOCKET` (an abstract `AF_UNIX` datagram socket owned by the supervisor, sd_notify(3));
//! `READY=1` on it is what makes the instance `active`. stdout and stderr are appended to
//! `<state dir>/<slug>/worker.log`. The child's pid is kept in `<state dir>/<slug>/worker.pid` so
//! that a restarted supervisor stops a survivor (checked against `/proc/<pid>/cmdline`) before
//! starting a new one: an instance never runs twice.
//!
//! **Invariant:** children never outlive the supervisor: `PR_SET_PDEATHSIG` (SIGTERM) is set in
//! the child before exec, and dropping the [`ProcessBackend`] stops every child (SIGTERM, then
//! SIGKILL after the stop timeout). Children are spawned from async tasks, i.e. on runtime worker
//! threads, which live as long as the runtime (the death signal follows the spawning thread).

use std::collections::HashMap;
use std::os::linux::net::SocketAddrExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::net::UnixDatagram;
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot, watch};

use super::backend::{BackendError, InstanceBackend, InstanceStatus};
use crate::config::{CONFIG_ENV, HOME_ENV};
use crate::layout::Slug;

/// The worker's stdout and stderr, in its instance directory.
pub const LOG_FILE: &str = "worker.log";
/// The worker's pid, in its instance directory.
pub const PID_FILE: &str = "worker.pid";

/// How the process backend runs instances.
#[derive(Debug, Clone)]
pub struct ProcessOptions {
    /// The supervisor's state directory; instance `<slug>` lives in `<state_dir>/<slug>/`.
    pub state_dir: PathBuf,
    /// argv before `--instance <slug>` (default: this executable and `worker`).
    pub worker_command: Vec<String>,
    /// The global configuration file, passed as `HYDRAFLOW_CONFIG`.
    pub config_file: PathBuf,
    /// Time between SIGTERM and SIGKILL when stopping (systemd `TimeoutStopSec`).
    pub stop_timeout: Duration,
    /// First delay before restarting a crashed instance; doubled on each crash up to
    /// `max_restart_delay`, reset after a minute of running.
    pub restart_delay: Duration,
    /// Longest delay between restarts.
    pub max_restart_delay: Duration,
}

impl ProcessOptions {
    /// Defaults: 5 s stop timeout, restart delay 1 s doubling up to 30 s.
    pub fn new(state_dir: PathBuf, worker_command: Vec<String>, config_file: PathBuf) -> Self {
        ProcessOptions {
            state_dir,
            worker_command,
            config_file,
            stop_timeout: Duration::from_secs(5),
            restart_delay: Duration::from_secs(1),
            max_restart_delay: Duration::from_secs(30),
        }
    }

    /// `<state_dir>/<slug>/`: the instance's data directory and working directory (its
    /// `HYDRAFLOW_HOME` is `state_dir`, so the worker's `data_root/<slug>` is this directory).
    pub fn instance_home(&self, slug: &Slug) -> PathBuf {
        self.state_dir.join(slug.as_str())
    }

    /// `<state_dir>/<slug>/worker.log`: the child's stdout and stderr.
    pub fn log_file(&self, slug: &Slug) -> PathBuf {
        self.instance_home(slug).join(LOG_FILE)
    }

    fn pid_file(&self, slug: &Slug) -> PathBuf {
        self.instance_home(slug).join(PID_FILE)
    }

    fn argv(&self, slug: &Slug) -> Vec<String> {
        let mut argv = self.worker_command.clone();
        argv.extend(["--instance".to_owned(), slug.as_str().to_owned()]);
        argv
    }
}

/// How the last run of an instance ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ended {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// Could not be spawned.
    Spawn(String),
}

impl Ended {
    fn from_status(status: ExitStatus) -> Ended {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => Ended::Code(code),
            (None, Some(sig)) => Ended::Signal(sig),
            (None, None) => Ended::Code(-1),
        }
    }

    /// systemd's `Service.Result` for this ending.
    fn result(&self) -> &'static str {
        match self {
            Ended::Code(0) => "success",
            Ended::Code(_) => "exit-code",
            Ended::Signal(_) => "signal",
            Ended::Spawn(_) => "resources",
        }
    }
}

/// What an instance's actor publishes.
#[derive(Debug, Clone)]
struct Snapshot {
    active_state: &'static str,
    sub_state: &'static str,
    main_pid: Option<u32>,
    n_restarts: u32,
    active_since: Option<String>,
    ended: Option<Ended>,
    /// Length of the log file when the current run was spawned: its output starts there.
    log_start: u64,
}

impl Snapshot {
    fn starting() -> Snapshot {
        Snapshot {
            active_state: "activating",
            sub_state: "start",
            main_pid: None,
            n_restarts: 0,
            active_since: None,
            ended: None,
            log_start: 0,
        }
    }

    /// The actor is gone: nothing runs and nothing will be restarted.
    fn finished(&self) -> bool {
        matches!(self.active_state, "inactive" | "failed")
    }
}

enum Control {
    Stop(oneshot::Sender<()>),
}

struct Entry {
    status: watch::Receiver<Snapshot>,
    commands: mpsc::Sender<Control>,
}

/// Runs instances as child processes; see the module documentation.
pub struct ProcessBackend {
    opts: Arc<ProcessOptions>,
    /// Bumped by every actor on every change of its snapshot ([`InstanceBackend::generation`]).
    changes: Arc<AtomicU64>,
    instances: Mutex<HashMap<Slug, Entry>>,
}

impl ProcessBackend {
    /// A backend with no instances running.
    pub fn new(opts: ProcessOptions) -> ProcessBackend {
        ProcessBackend {
            opts: Arc::new(opts),
            changes: Arc::new(AtomicU64::new(0)),
            instances: Mutex::new(HashMap::new()),
        }
    }

    fn instances(&self) -> MutexGuard<'_, HashMap<Slug, Entry>> {
        self.instances
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn unit(slug: &Slug) -> String {
        format!("hydraflow@{slug}.service")
    }

    fn status_of(&self, slug: &Slug, snap: &Snapshot) -> InstanceStatus {
        InstanceStatus {
            memory_bytes: snap.main_pid.and_then(rss_bytes),
            ..self.status_of_without_memory(slug, snap)
        }
    }

    fn status_of_without_memory(&self, slug: &Slug, snap: &Snapshot) -> InstanceStatus {
        InstanceStatus {
            slug: slug.as_str().to_owned(),
            unit: Self::unit(slug),
            active_state: snap.active_state.to_owned(),
            sub_state: snap.sub_state.to_owned(),
            main_pid: snap.main_pid,
            n_restarts: snap.n_restarts,
            memory_bytes: None,
            active_since: snap.active_since.clone(),
            result: snap.ended.as_ref().map(|e| e.result().to_owned()),
        }
    }

    /// The instance's status channel; spawns its actor when none runs. True when spawned.
    fn ensure_actor(&self, slug: &Slug) -> (watch::Receiver<Snapshot>, bool) {
        let mut instances = self.instances();
        match instances.get(slug).map(|e| e.status.clone()) {
            Some(status) if !status.borrow().finished() => (status, false),
            _ => {
                let (status_tx, status_rx) = watch::channel(Snapshot::starting());
                let (cmd_tx, cmd_rx) = mpsc::channel(4);
                let actor = Actor {
                    opts: self.opts.clone(),
                    changes: self.changes.clone(),
                    slug: slug.clone(),
                    status: status_tx,
                    commands: cmd_rx,
                };
                instances.insert(
                    slug.clone(),
                    Entry {
                        status: status_rx.clone(),
                        commands: cmd_tx,
                    },
                );
                tokio::spawn(actor.run());
                self.changes.fetch_add(1, Ordering::Release);
                (status_rx, true)
            }
        }
    }

    /// Wait until the instance is active or has ended, at most `timeout`.
    async fn wait_active(
        &self,
        slug: &Slug,
        mut status: watch::Receiver<Snapshot>,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        let log = self.opts.log_file(slug);
        let waited = tokio::time::timeout(
            timeout,
            status.wait_for(|s| s.active_state == "active" || s.finished()),
        )
        .await
        .map(|r| r.map(|snap| snap.clone()));
        match waited {
            Ok(Ok(snap)) if snap.active_state == "active" => Ok(()),
            Ok(Ok(snap)) => Err(start_failed(
                slug,
                snap.ended.as_ref(),
                &log,
                last_lines(&log, snap.log_start),
            )),
            Ok(Err(_)) => Err(start_failed(slug, None, &log, Vec::new())),
            Err(_) => {
                let _ = self.stop(slug).await;
                Err(BackendError::Timeout {
                    unit: Self::unit(slug),
                    after: timeout,
                    detail: format!("; see {}", log.display()),
                })
            }
        }
    }

    /// Signal every running child's process group with SIGTERM, wait up to the stop timeout
    /// for them to go, then SIGKILL what is left. Blocks; used when the backend is dropped.
    fn terminate_all(&self) {
        // Dropping the command senders tells every actor to stop and not to restart.
        let instances: Vec<(Slug, Entry)> = self.instances().drain().collect();
        let pids: Vec<i32> = instances
            .iter()
            .filter_map(|(_, e)| e.status.borrow().main_pid)
            .filter_map(|p| i32::try_from(p).ok())
            .collect();
        for &pid in &pids {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + self.opts.stop_timeout;
        while pids.iter().any(|&p| is_alive(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for &pid in &pids {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        for (slug, _) in &instances {
            let _ = std::fs::remove_file(self.opts.pid_file(slug));
        }
    }
}

impl Drop for ProcessBackend {
    fn drop(&mut self) {
        self.terminate_all();
    }
}

/// Lines shown of a worker that failed to start: its last ones.
const LAST_LINES: usize = 8;
/// Longest line shown, in characters.
const LAST_LINE_CHARS: usize = 400;

/// The last [`LAST_LINES`] non-empty lines of `log` written from byte `from` on (what the
/// current run of the worker wrote), each cut to [`LAST_LINE_CHARS`].
fn last_lines(log: &Path, from: u64) -> Vec<String> {
    use std::io::{Read as _, Seek as _};
    let Ok(mut file) = std::fs::File::open(log) else {
        return Vec::new();
    };
    // At most the last 64 KiB of this run.
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = from.max(len.saturating_sub(64 * 1024)).min(len);
    let mut bytes = Vec::new();
    if file.seek(std::io::SeekFrom::Start(start)).is_err() || file.read_to_end(&mut bytes).is_err()
    {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<String> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mut line: String = l.chars().take(LAST_LINE_CHARS).collect();
            if line.len() < l.len() {
                line.push('…');
            }
            line
        })
        .collect();
    let skip = lines.len().saturating_sub(LAST_LINES);
    lines.drain(..skip);
    lines
}

fn start_failed(
    slug: &Slug,
    ended: Option<&Ended>,
    log: &Path,
    output: Vec<String>,
) -> BackendError {
    let (service_result, detail) = match ended {
        Some(Ended::Code(code)) => (format!("exit-code {code}"), String::new()),
        Some(Ended::Signal(sig)) => (format!("signal {sig}"), String::new()),
        Some(Ended::Spawn(err)) => ("resources".to_owned(), format!(": {err}")),
        None => ("unknown".to_owned(), String::new()),
    };
    BackendError::StartFailed {
        unit: ProcessBackend::unit(slug),
        job_result: "exited".into(),
        service_result,
        detail: format!("{detail}; see {}", log.display()),
        output,
    }
}

#[async_trait]
impl InstanceBackend for ProcessBackend {
    fn name(&self) -> &'static str {
        "process"
    }

    /// `<state_dir>/<slug>/dashboard.sock`.
    fn api_socket(&self, slug: &str) -> PathBuf {
        crate::dashboard::process_socket_path(&self.opts.state_dir, slug)
    }

    /// `<state_dir>/<slug>/worker.log`, the worker's standard output and error.
    fn log_location(&self, slug: &str) -> String {
        self.opts
            .state_dir
            .join(slug)
            .join(LOG_FILE)
            .display()
            .to_string()
    }

    /// Removes the log and PID files, then the instance directory if that
    /// left it empty (the worker's data stay).
    fn forget(&self, slug: &str) {
        let dir = self.opts.state_dir.join(slug);
        for name in [LOG_FILE, PID_FILE] {
            let _ = std::fs::remove_file(dir.join(name));
        }
        let _ = std::fs::remove_dir(&dir);
    }

    async fn start(&self, slug: &Slug, timeout: Duration) -> Result<bool, BackendError> {
        let home = self.opts.instance_home(slug);
        std::fs::create_dir_all(&home).map_err(|e| {
            BackendError::Unavailable(format!("cannot create {}: {e}", home.display()))
        })?;
        let (status, started) = self.ensure_actor(slug);
        // An instance already starting is waited for like a second start job would be.
        self.wait_active(slug, status, timeout)
            .await
            .map(|()| started)
    }

    async fn stop(&self, slug: &Slug) -> Result<(), BackendError> {
        let commands = self.instances().get(slug).map(|e| e.commands.clone());
        if let Some(commands) = commands {
            let (tx, rx) = oneshot::channel();
            if commands.send(Control::Stop(tx)).await.is_ok() {
                let _ = rx.await;
            }
        }
        Ok(())
    }

    async fn restart(&self, slug: &Slug, timeout: Duration) -> Result<(), BackendError> {
        self.stop(slug).await?;
        self.start(slug, timeout).await.map(|_| ())
    }

    async fn status(&self, slug: &Slug) -> Result<InstanceStatus, BackendError> {
        let snap = self
            .instances()
            .get(slug)
            .map(|e| e.status.borrow().clone());
        Ok(match snap {
            Some(snap) => self.status_of(slug, &snap),
            None => self.status_of(
                slug,
                &Snapshot {
                    active_state: "inactive",
                    sub_state: "dead",
                    ..Snapshot::starting()
                },
            ),
        })
    }

    fn generation(&self) -> Option<u64> {
        Some(self.changes.load(Ordering::Acquire))
    }

    async fn list(&self) -> Result<Vec<InstanceStatus>, BackendError> {
        let snaps: Vec<(Slug, Snapshot)> = self
            .instances()
            .iter()
            .map(|(slug, e)| (slug.clone(), e.status.borrow().clone()))
            .collect();
        // Like systemd's ListUnits, the list carries no memory figure (reading /proc for every
        // instance would make list_repos slow); `status` has it.
        let mut list: Vec<InstanceStatus> = snaps
            .iter()
            .map(|(slug, snap)| self.status_of_without_memory(slug, snap))
            .collect();
        list.sort_by(|a, b| a.slug.cmp(&b.slug));
        Ok(list)
    }
}

/// One instance's lifecycle: spawn, wait for READY=1, restart on failure, stop on request.
struct Actor {
    opts: Arc<ProcessOptions>,
    changes: Arc<AtomicU64>,
    slug: Slug,
    status: watch::Sender<Snapshot>,
    commands: mpsc::Receiver<Control>,
}

/// Numbers the notify sockets of this process.
static NEXT_SOCKET: AtomicU64 = AtomicU64::new(0);

/// How one run of the child ended.
enum RunEnd {
    /// The child exited on its own.
    Exited {
        ended: Ended,
        was_ready: bool,
        ran: Duration,
    },
    /// A stop was asked for (or the backend is gone); the child is stopped.
    Stopped(Option<oneshot::Sender<()>>),
}

impl Actor {
    async fn run(mut self) {
        stop_survivor(&self.opts, &self.slug).await;
        let (first, max) = (self.opts.restart_delay, self.opts.max_restart_delay);
        let restarts = move || crate::backoff::doubling(first, max);
        let mut delays = restarts();
        let mut first = true;
        loop {
            match self.run_once().await {
                RunEnd::Stopped(reply) => {
                    self.publish(|s| {
                        s.active_state = "inactive";
                        s.sub_state = "dead";
                        s.main_pid = None;
                        s.active_since = None;
                    });
                    if let Some(reply) = reply {
                        let _ = reply.send(());
                    }
                    return;
                }
                RunEnd::Exited {
                    ended,
                    was_ready,
                    ran,
                } => {
                    tracing::warn!(slug = %self.slug, ?ended, "worker exited");
                    let clean = ended == Ended::Code(0);
                    let failed_start = first && !was_ready;
                    self.publish(|s| {
                        s.main_pid = None;
                        s.active_since = None;
                        s.ended = Some(ended.clone());
                        (s.active_state, s.sub_state) = if clean {
                            ("inactive", "dead")
                        } else if failed_start || matches!(ended, Ended::Spawn(_)) {
                            ("failed", "failed")
                        } else {
                            ("activating", "auto-restart")
                        };
                    });
                    if self.status.borrow().finished() {
                        return;
                    }
                    if ran > Duration::from_secs(60) {
                        delays = restarts();
                    }
                    let delay = delays.next().unwrap_or(self.opts.max_restart_delay);
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        cmd = self.commands.recv() => {
                            self.publish(|s| { s.active_state = "inactive"; s.sub_state = "dead"; });
                            if let Some(Control::Stop(reply)) = cmd {
                                let _ = reply.send(());
                            }
                            return;
                        }
                    }
                    self.publish(|s| {
                        s.n_restarts += 1;
                        s.sub_state = "start";
                    });
                }
            }
            first = false;
        }
    }

    fn publish(&self, f: impl FnOnce(&mut Snapshot)) {
        self.status.send_modify(f);
        self.changes.fetch_add(1, Ordering::Release);
    }

    fn bind_notify_socket(&self) -> std::io::Result<(UnixDatagram, String)> {
        let name = format!(
            "hydraflow-supervisor/{}/{}",
            std::process::id(),
            NEXT_SOCKET.fetch_add(1, Ordering::Relaxed)
        );
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        let sock = std::os::unix::net::UnixDatagram::bind_addr(&addr)?;
        sock.set_nonblocking(true)?;
        Ok((UnixDatagram::from_std(sock)?, format!("@{name}")))
    }

    fn spawn(&self, notify_socket: &str) -> std::io::Result<Child> {
        let home = self.opts.instance_home(&self.slug);
        let log_path = self.opts.log_file(&self.slug);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot open {}: {e}", log_path.display()))
            })?;
        let argv = self.opts.argv(&self.slug);
        let (program, args) = argv.split_first().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "worker_command is empty")
        })?;
        // The supervisor's environment, without what systemd passed to the
        // supervisor itself (its sockets, its watchdog), plus the instance's.
        let own = [
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
        ];
        let mut env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .filter(|(k, _)| {
                !own.contains(&k.as_str())
                    && ![
                        HOME_ENV,
                        CONFIG_ENV,
                        "NOTIFY_SOCKET",
                        "HF_SUPERVISOR_PORT_FILE",
                    ]
                    .contains(&k.as_str())
            })
            .collect();
        env.push((HOME_ENV.into(), self.opts.state_dir.display().to_string()));
        env.push((
            CONFIG_ENV.into(),
            self.opts.config_file.display().to_string(),
        ));
        env.push(("NOTIFY_SOCKET".into(), notify_socket.to_owned()));
        let mut spec = crate::child::Spec::new(program.as_ref(), &env, &home);
        spec.args = args.iter().map(std::ffi::OsStr::new).collect();
        spec.stdio = [Stdio::null(), log.try_clone()?.into(), log.into()];
        spec.kill_on_drop = false;
        crate::child::spawn(spec)
    }

    async fn run_once(&mut self) -> RunEnd {
        let log_start = std::fs::metadata(self.opts.log_file(&self.slug)).map_or(0, |m| m.len());
        self.publish(|s| s.log_start = log_start);
        let (socket, notify_socket) = match self.bind_notify_socket() {
            Ok(s) => s,
            Err(e) => {
                return RunEnd::Exited {
                    ended: Ended::Spawn(format!("cannot bind the notify socket: {e}")),
                    was_ready: false,
                    ran: Duration::ZERO,
                };
            }
        };
        let mut child = match self.spawn(&notify_socket) {
            Ok(child) => child,
            Err(e) => {
                return RunEnd::Exited {
                    ended: Ended::Spawn(format!("cannot run {:?}: {e}", self.opts.worker_command)),
                    was_ready: false,
                    ran: Duration::ZERO,
                };
            }
        };
        let pid = child.id();
        let pid_file = self.opts.pid_file(&self.slug);
        if let Some(pid) = pid
            && let Err(e) = std::fs::write(&pid_file, format!("{pid}\n"))
        {
            tracing::warn!(slug = %self.slug, "cannot write {}: {e}", pid_file.display());
        }
        tracing::info!(slug = %self.slug, pid, "worker started");
        self.publish(|s| {
            s.active_state = "activating";
            s.sub_state = "start";
            s.main_pid = pid;
        });
        let started = Instant::now();
        let mut was_ready = false;
        let end = loop {
            tokio::select! {
                status = child.wait() => {
                    let ended = match status {
                        Ok(status) => Ended::from_status(status),
                        Err(_) => Ended::Code(-1),
                    };
                    break RunEnd::Exited { ended, was_ready, ran: started.elapsed() };
                }
                readable = socket.readable() => {
                    if readable.is_err() {
                        continue;
                    }
                    // The buffer lives on the stack only while a datagram is read: 200 idle
                    // instances keep no 4 KiB buffer each.
                    let mut buf = [0u8; 4096];
                    let Ok(n) = socket.try_recv(&mut buf) else { continue };
                    let msg = String::from_utf8_lossy(&buf[..n]);
                    for line in msg.lines() {
                        match line {
                            "READY=1" if !was_ready => {
                                was_ready = true;
                                tracing::info!(slug = %self.slug, "worker ready");
                                self.publish(|s| {
                                    s.active_state = "active";
                                    s.sub_state = "running";
                                    s.active_since = Some(now_rfc3339());
                                });
                            }
                            "STOPPING=1" => self.publish(|s| {
                                s.active_state = "deactivating";
                                s.sub_state = "stop";
                            }),
                            _ => {}
                        }
                    }
                }
                cmd = self.commands.recv() => {
                    let reply = cmd.map(|Control::Stop(reply)| reply);
                    self.publish(|s| {
                        s.active_state = "deactivating";
                        s.sub_state = "stop-sigterm";
                    });
                    terminate(&mut child, self.opts.stop_timeout).await;
                    break RunEnd::Stopped(reply);
                }
            }
        };
        // KillMode=control-group: nothing of this run outlives its main process.
        if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            wait_group_gone(pid, Duration::from_secs(1)).await;
        }
        let _ = std::fs::remove_file(&pid_file);
        end
    }
}

/// Stop what is left of this instance from an earlier supervisor, using the pid file: the
/// worker itself when `/proc/<pid>/cmdline` still shows its argv, and the rest of its process
/// group (the pid is the group id) when the worker is gone — Linux does not reuse a pid while a
/// process group of that id exists, so such a group can only be the old worker's.
async fn stop_survivor(opts: &ProcessOptions, slug: &Slug) {
    let pid_file = opts.pid_file(slug);
    let Some(pid) = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .filter(|&p| p > 1)
    else {
        return;
    };
    let ours = cmdline(pid).as_deref() == Some(opts.argv(slug).as_slice());
    let group = Pid::from_raw(pid);
    if (ours || !is_alive(pid)) && group_alive(pid) {
        tracing::warn!(slug = %slug, pid, "stopping what an earlier supervisor left running");
        let _ = killpg(group, Signal::SIGTERM);
        wait_group_gone(pid, opts.stop_timeout).await;
        let _ = killpg(group, Signal::SIGKILL);
        wait_group_gone(pid, Duration::from_secs(1)).await;
    }
    let _ = std::fs::remove_file(&pid_file);
}

/// SIGTERM to the child's process group, SIGKILL after `timeout`, then reap it.
async fn terminate(child: &mut Child, timeout: Duration) {
    let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
    if tokio::time::timeout(timeout, child.wait()).await.is_err() {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = child.wait().await;
    }
}

/// Some process of group `pgid` is alive (not a zombie), from `/proc/<pid>/stat` (proc(5)).
fn group_alive(pgid: i32) -> bool {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .any(|stat| {
            // After the parenthesised name: state, ppid, pgrp.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let mut fields = rest.split_whitespace();
            let state = fields.next().unwrap_or("Z");
            let pgrp = fields.nth(1).and_then(|g| g.parse::<i32>().ok());
            pgrp == Some(pgid) && state != "Z" && state != "X"
        })
}

/// Wait until no process of group `pgid` is alive, at most `limit`.
async fn wait_group_gone(pgid: i32, limit: Duration) {
    let deadline = Instant::now() + limit;
    while group_alive(pgid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `/proc/<pid>/cmdline` as argv, when the process exists.
fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
    )
}

/// The process exists and is not a zombie (`/proc/<pid>/stat`, proc(5)).
fn is_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself hold ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// Resident set size of `pid` in bytes (`VmRSS` of `/proc/<pid>/status`, proc(5)).
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_state_of_self_and_of_nothing() {
        let me = i32::try_from(std::process::id()).unwrap();
        assert!(is_alive(me));
        assert!(!is_alive(i32::MAX));
        assert!(rss_bytes(std::process::id()).is_some_and(|b| b > 0));
        assert!(cmdline(me).is_some_and(|argv| !argv.is_empty()));
        let my_group = nix::unistd::getpgrp().as_raw();
        assert!(group_alive(my_group));
    }

    #[test]
    fn endings_map_to_systemd_results() {
        assert_eq!(Ended::Code(0).result(), "success");
        assert_eq!(Ended::Code(1).result(), "exit-code");
        assert_eq!(Ended::Signal(9).result(), "signal");
        assert_eq!(Ended::Spawn("x".into()).result(), "resources");
    }
}
