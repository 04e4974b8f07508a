//! The worker daemon as a library function: one repository's runtime, its
//! API servers and its readiness, run until a shutdown future resolves (or
//! no work is left, when asked), over named tasks of which the first to end
//! unexpectedly is reported by name.
//!
//! The command line (`hydraflow worker|run`, `cli::worker`) sets up the
//! forge, the checkout, the runtime and the sockets, and passes SIGTERM or
//! SIGINT as the shutdown; tests pass a oneshot and bind sockets in a
//! temporary directory. The listeners arrive bound, so `READY=1` is sent only
//! once every one of them accepts connections and the loops run.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::runtime::{RepoRuntime, RepoRuntimeRegistry};

/// How long in-flight work gets to stop (agents killed, work salvaged).
pub const STOP_DEADLINE: Duration = Duration::from_secs(8);

/// The worker's sockets, already bound (or passed by socket activation).
#[derive(Debug)]
pub struct Listeners {
    /// The worker API's Unix socket.
    pub api: UnixListener,
    /// Its path.
    pub api_path: PathBuf,
    /// Remove the socket file when the worker stops (not one socket
    /// activation passed: its socket unit owns it and keeps listening).
    pub remove_api_socket: bool,
    /// The API over TCP (`dashboard.worker_listen`) and its access token.
    pub tcp: Option<(TcpListener, Option<Arc<str>>)>,
}

/// Where the worker reports readiness, status and stopping: systemd's
/// notify socket in production ([`Systemd`]), a recorder in tests.
pub trait Notifier: Send + Sync {
    /// Every listener is bound and the loops run (`READY=1`).
    fn ready(&self, status: &str);
    /// The one-line status changed (`STATUS=`).
    fn status(&self, line: &str);
    /// The loops are stopped but the process stays (`WATCHDOG=1`).
    fn alive(&self);
    /// The worker is stopping (`STOPPING=1`).
    fn stopping(&self);
}

/// [`Notifier`] over sd_notify(3) (no-ops off systemd).
#[derive(Debug, Default, Clone, Copy)]
pub struct Systemd;

impl Notifier for Systemd {
    fn ready(&self, status: &str) {
        crate::systemd::notify_ready(status);
    }
    fn status(&self, line: &str) {
        crate::systemd::notify_status(line);
    }
    fn alive(&self) {
        crate::systemd::notify_watchdog();
    }
    fn stopping(&self) {
        crate::systemd::notify_stopping();
    }
}

/// A task that runs beside the worker's own, by name; its ending stops the
/// worker and is reported as [`TaskEnded`].
pub type SideTask = (
    &'static str,
    std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>,
);

/// How the worker runs.
#[derive(Default)]
pub struct Options {
    /// Stop once no work is left (`hydraflow run --exit-when-idle`).
    pub exit_when_idle: bool,
    /// Tasks to run beside the API servers (the binary passes none).
    pub side_tasks: Vec<SideTask>,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("exit_when_idle", &self.exit_when_idle)
            .field(
                "side_tasks",
                &self.side_tasks.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Why the worker stopped, when it stopped as asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// The shutdown future resolved with this reason (`SIGTERM`, …).
    Asked(String),
    /// No work was left (with [`Options::exit_when_idle`]).
    Idle,
}

/// A task of the worker ended while it should have run on.
#[derive(Debug, thiserror::Error)]
#[error("the worker's {task} task ended: {message}")]
pub struct TaskEnded {
    /// The task's name (`api`, `api-tcp`).
    pub task: &'static str,
    /// Its error, or that it ended without one.
    pub message: String,
}

/// Run `runtime` (created, not started) with its API on `listeners` until
/// `shutdown` resolves, or no work is left when asked. The runtime is then
/// stopped within [`STOP_DEADLINE`] and the socket removed (unless passed by
/// socket activation).
///
/// # Errors
/// [`TaskEnded`] naming the task (an API server, a side task) that ended
/// while the worker ran; the runtime is stopped first.
pub async fn run(
    runtime: Arc<RepoRuntime>,
    listeners: Listeners,
    notifier: &dyn Notifier,
    options: Options,
    shutdown: impl Future<Output = String>,
) -> Result<Stopped, TaskEnded> {
    let slug = runtime.slug().clone();
    let registry = Arc::new(RepoRuntimeRegistry::new());
    registry.register(Arc::clone(&runtime));
    runtime.start().await;

    let stop_api = CancellationToken::new();
    let mut tasks: JoinSet<(&'static str, Result<(), String>)> = JoinSet::new();
    {
        let (reg, stop) = (Arc::clone(&registry), stop_api.clone());
        let api = listeners.api;
        tasks.spawn(async move {
            let served =
                crate::dashboard::worker::serve(api, reg, async move { stop.cancelled().await })
                    .await;
            ("api", served.map_err(|e| e.to_string()))
        });
    }
    if let Some((listener, token)) = listeners.tcp {
        let (reg, stop) = (Arc::clone(&registry), stop_api.clone());
        tasks.spawn(async move {
            let shutdown = async move { stop.cancelled().await };
            let served = crate::dashboard::worker::serve_tcp(listener, reg, token, shutdown).await;
            ("api-tcp", served.map_err(|e| e.to_string()))
        });
    }

    for (name, task) in options.side_tasks {
        tasks.spawn(async move { (name, task.await) });
    }

    let status = runtime.status_line().await;
    notifier.ready(&status);
    tracing::info!(repo_slug = %slug, status, socket = %listeners.api_path.display(), "worker ready");

    let mut changes = runtime.status_changes().await;
    let mut idle_check = tokio::time::interval(Duration::from_millis(250));
    let mut stopped_tick = tokio::time::interval(Duration::from_secs(1));
    let mut idle_since: Option<Instant> = None;
    tokio::pin!(shutdown);
    let ended: Result<Stopped, TaskEnded> = loop {
        tokio::select! {
            reason = &mut shutdown => break Ok(Stopped::Asked(reason)),
            joined = tasks.join_next(), if !tasks.is_empty() => {
                let (task, message) = match joined {
                    Some(Ok((task, Ok(())))) => (task, "it returned".to_owned()),
                    Some(Ok((task, Err(e)))) => (task, e),
                    Some(Err(e)) => ("api", crate::pipeline::panic_message(e)),
                    None => continue,
                };
                break Err(TaskEnded { task, message });
            }
            changed = async { changes.as_mut()?.changed().await.ok() }, if changes.is_some() => {
                match changed {
                    Some(()) => {
                        let line = changes.as_mut().map(|c| c.borrow_and_update().clone()).unwrap_or_default();
                        notifier.status(&line);
                    }
                    // Stopped through the API: the process stays up to be started again.
                    None => {
                        changes = None;
                        notifier.status("stopped through the dashboard API");
                    }
                }
            }
            _ = stopped_tick.tick(), if changes.is_none() => {
                // The loops (which ping the watchdog) are stopped: keep the unit alive.
                notifier.alive();
                if runtime.running().await {
                    changes = runtime.status_changes().await;
                }
            }
            _ = idle_check.tick(), if options.exit_when_idle => {
                if runtime.is_idle().await {
                    let since = *idle_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= Duration::from_millis(500) {
                        break Ok(Stopped::Idle);
                    }
                } else {
                    idle_since = None;
                }
            }
        }
    };
    let reason = match &ended {
        Ok(Stopped::Asked(reason)) => reason.clone(),
        Ok(Stopped::Idle) => "no work left".to_owned(),
        Err(e) => e.to_string(),
    };
    stop_api.cancel();
    tracing::info!(repo_slug = %slug, reason, "stopping");
    notifier.stopping();
    notifier.status(&format!("stopping: {reason}"));
    runtime.stop(STOP_DEADLINE).await;
    while tasks.join_next().await.is_some() {}
    registry.remove(slug.as_str());
    if listeners.remove_api_socket {
        let _ = std::fs::remove_file(&listeners.api_path);
    }
    tracing::info!(repo_slug = %slug, "stopped");
    ended
}
