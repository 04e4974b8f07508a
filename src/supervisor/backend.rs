//! The instance backend: how the supervisor starts, stops and inspects one worker instance per
//! repository slug — systemd units over D-Bus (`hydraflow@<slug>.service`) or child processes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::config::SupervisorBackend;
use crate::layout::Slug;
use crate::supervisor::process::{ProcessBackend, ProcessOptions};

pub use crate::api::InstanceStatus;

/// Why a backend operation failed; messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The job ended with a result other than `done`/`skipped`, or the process exited before READY=1.
    #[error(
        "{unit} failed to start: job result {job_result}, service result {service_result}{detail}{}",
        output_suffix(output)
    )]
    StartFailed {
        /// The unit name.
        unit: String,
        /// The job result (`failed`, `timeout`, `dependency`, …) or `exited` for the process backend.
        job_result: String,
        /// `Service.Result` (`exit-code`, `timeout`, …) or the exit status.
        service_result: String,
        /// Extra detail, e.g. "; see <log file>" (may be empty).
        detail: String,
        /// The last lines the instance wrote before it ended (process backend; empty when
        /// unknown), see [`output_suffix`].
        output: Vec<String>,
    },
    /// The instance did not become active within the time allowed.
    #[error("{unit} did not become active within {after:?}{detail}")]
    Timeout {
        /// The unit name.
        unit: String,
        /// The time allowed.
        after: Duration,
        /// Extra detail (may be empty).
        detail: String,
    },
    /// A stop or restart job failed.
    #[error("{unit}: {verb} failed: {message}")]
    JobFailed {
        /// The unit name.
        unit: String,
        /// `stop`, `restart`, …
        verb: String,
        /// Why.
        message: String,
    },
    /// The backend itself is unavailable (D-Bus gone, permission denied, cannot spawn).
    #[error("{0}")]
    Unavailable(String),
}

/// `output` as the end of a message: `"; its last output:\n  <line>\n  <line>"`, or nothing.
pub fn output_suffix(output: &[String]) -> String {
    if output.is_empty() {
        return String::new();
    }
    format!("; its last output:\n  {}", output.join("\n  "))
}

/// Starts, stops and inspects worker instances.
#[async_trait]
pub trait InstanceBackend: Send + Sync {
    /// `systemd` or `process`.
    fn name(&self) -> &'static str;

    /// Start the instance and wait until it is active (READY=1 reached) or has failed, at most
    /// `timeout`. Returns `false` when it was already running (nothing started).
    async fn start(&self, slug: &Slug, timeout: Duration) -> Result<bool, BackendError>;

    /// Stop the instance and wait until it is inactive. Stopping a stopped instance is success.
    async fn stop(&self, slug: &Slug) -> Result<(), BackendError>;

    /// Restart the instance and wait until it is active again, at most `timeout`.
    async fn restart(&self, slug: &Slug, timeout: Duration) -> Result<(), BackendError>;

    /// The instance's status (an unknown instance is `inactive`/`dead`).
    async fn status(&self, slug: &Slug) -> Result<InstanceStatus, BackendError>;

    /// Every instance the backend knows (systemd: `ListUnitsByPatterns([], ["hydraflow@*.service"])`).
    async fn list(&self) -> Result<Vec<InstanceStatus>, BackendError>;

    /// A counter that changes whenever what [`InstanceBackend::list`] returns may have changed
    /// (an instance started, became ready, crashed, was restarted or stopped, by whoever). Read
    /// it before calling `list` to know whether a list made earlier is still current. `None`
    /// (the default) when the backend cannot tell: callers then ask `list` every time.
    fn generation(&self) -> Option<u64> {
        None
    }

    /// The Unix socket the worker of `slug` serves its API on (the dashboard
    /// proxies to it, the webhook waker posts to it).
    fn api_socket(&self, slug: &str) -> PathBuf;

    /// Where the worker of `slug` logs, as the protocol's `log_file` says it:
    /// a file's path, or the `journalctl` command line that shows its journal.
    fn log_location(&self, slug: &str) -> String;

    /// Drop what the backend keeps of a removed instance (its log and PID
    /// files), leaving the worker's data. The default keeps nothing.
    fn forget(&self, slug: &str) {
        let _ = slug;
    }
}

/// Choose the backend for `kind`: `process` runs children of the supervisor; `systemd` drives
/// `hydraflow@<slug>.service` over D-Bus; `auto` is `systemd` when `/run/systemd/system` exists
/// (sd_booted(3)) and the system bus answers, else `process`.
///
/// # Errors
/// [`BackendError::Unavailable`] when `systemd` is asked for and cannot be used.
pub async fn select(
    kind: SupervisorBackend,
    process: ProcessOptions,
) -> Result<Arc<dyn InstanceBackend>, BackendError> {
    match kind {
        SupervisorBackend::Process => Ok(Arc::new(ProcessBackend::new(process))),
        SupervisorBackend::Systemd => connect_systemd().await,
        SupervisorBackend::Auto => {
            if crate::systemd::booted() {
                match connect_systemd().await {
                    Ok(backend) => return Ok(backend),
                    Err(err) => {
                        tracing::info!("systemd backend unavailable ({err}); using child processes")
                    }
                }
            }
            Ok(Arc::new(ProcessBackend::new(process)))
        }
    }
}

/// The systemd D-Bus backend on the system bus.
async fn connect_systemd() -> Result<Arc<dyn InstanceBackend>, BackendError> {
    let backend = super::systemd_backend::SystemdBackend::connect(None).await?;
    Ok(Arc::new(backend))
}
