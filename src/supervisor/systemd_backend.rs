//! The systemd instance backend: starts, stops and inspects `hydraflow@<slug>.service` through
//! the manager's D-Bus API (org.freedesktop.systemd1(5)), waiting for jobs the way systemctl's
//! `bus-wait-for-jobs.c` does.
//!
//! **Invariant:** this is the only module that imports zbus. One `JobRemoved` match and stream
//! is held for the backend's lifetime; a background task routes each signal to the waiter of its
//! job path, so a signal that arrives before the method's reply is never lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::sync::oneshot;
use zbus::OwnedObjectPath;
use zbus::proxy::CacheProperties;
use zbus_systemd::systemd1::{JobRemovedStream, ManagerProxy, ServiceProxy, UnitProxy};

use super::backend::{BackendError, InstanceBackend, InstanceStatus};
use crate::layout::Slug;

/// The unit name prefix of worker instances.
const UNIT_PREFIX: &str = "hydraflow@";
/// The unit name suffix of worker instances.
const UNIT_SUFFIX: &str = ".service";
/// How long a `JobRemoved` for a job path nobody waits for yet is kept, in case its method
/// reply is still on its way.
const EARLY_SIGNAL_TTL: Duration = Duration::from_secs(30);
/// Where systemd puts unit objects (org.freedesktop.systemd1(5)).
const UNIT_PATH_NAMESPACE: &str = "/org/freedesktop/systemd1/unit";
/// The object path prefix of `hydraflow@…` units: `@` is escaped as `_40` in bus paths.
const UNIT_PATH_PREFIX: &str = "/org/freedesktop/systemd1/unit/hydraflow_40";
/// Upper bound for one D-Bus method call (systemd's own default, `DEFAULT_TIMEOUT_USEC`).
const METHOD_TIMEOUT: Duration = Duration::from_secs(25);
/// How long [`SystemdBackend::stop`] waits by default: systemd's `DefaultTimeoutStopSec=` (90 s)
/// plus room for the final SIGKILL.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(120);

/// The unit of an instance: `hydraflow@<slug>.service`.
pub fn unit_name(slug: &Slug) -> String {
    format!("{UNIT_PREFIX}{slug}{UNIT_SUFFIX}")
}

/// The instance name of a `hydraflow@<slug>.service` unit name, `None` for any other unit.
pub fn slug_of_unit(unit: &str) -> Option<&str> {
    unit.strip_prefix(UNIT_PREFIX)?
        .strip_suffix(UNIT_SUFFIX)
        .filter(|s| !s.is_empty())
}

/// Whether a job result (the `result` of `JobRemoved`) means success: `done` or `skipped`.
pub fn job_succeeded(result: &str) -> bool {
    matches!(result, "done" | "skipped")
}

/// A systemd realtime timestamp (µs since the epoch; 0 = never) as RFC 3339 UTC.
fn timestamp_rfc3339(usec: u64) -> Option<String> {
    if usec == 0 {
        return None;
    }
    let usec = i64::try_from(usec).ok()?;
    chrono::DateTime::from_timestamp_micros(usec)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// `MemoryCurrent` in bytes; `u64::MAX` is systemd's "unknown" (no memory accounting).
fn memory_bytes(value: u64) -> Option<u64> {
    (value != u64::MAX).then_some(value)
}

/// `MainPID`; 0 means no main process.
fn main_pid(value: u32) -> Option<u32> {
    (value != 0).then_some(value)
}

/// The D-Bus error name and message of a method error reply, if `err` is one (zbus turns the
/// `org.freedesktop.DBus.Error.*` names into [`zbus::fdo::Error`]).
fn method_error(err: &zbus::Error) -> Option<(String, String)> {
    use zbus::DBusError;
    match err {
        zbus::Error::MethodError(name, text, _) => {
            Some((name.as_str().to_owned(), text.clone().unwrap_or_default()))
        }
        zbus::Error::FDO(fdo) => Some((
            fdo.name().as_str().to_owned(),
            fdo.description().unwrap_or_default().to_owned(),
        )),
        _ => None,
    }
}

/// Whether `err` is systemd's `NoSuchUnit` (the unit is not loaded or does not exist).
fn is_no_such_unit(err: &zbus::Error) -> bool {
    method_error(err).is_some_and(|(name, _)| name == "org.freedesktop.systemd1.NoSuchUnit")
}

/// A bus error as [`BackendError::Unavailable`], saying what to do about it. `what` names the
/// call, e.g. `StartUnit hydraflow@demo.service`.
fn bus_error(what: &str, err: &zbus::Error) -> BackendError {
    let message = match method_error(err) {
        Some((name, text)) => match name.as_str() {
            "org.freedesktop.DBus.Error.AccessDenied"
            | "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired" => format!(
                "{what}: permission denied by polkit ({text}): install the hydraflow polkit \
                     rule or run the supervisor as the hydraflow user"
            ),
            "org.freedesktop.DBus.Error.ServiceUnknown"
            | "org.freedesktop.DBus.Error.NameHasNoOwner" => format!(
                "{what}: systemd is not on this bus ({text}): boot with systemd or use the \
                     process backend"
            ),
            "org.freedesktop.systemd1.NoSuchUnit" => format!(
                "{what}: unit not found ({text}): install hydraflow@.service (the hydraflow \
                     package ships it) and run systemctl daemon-reload"
            ),
            other => format!("{what}: {other}: {text}"),
        },
        None => format!(
            "{what}: lost the D-Bus connection to systemd ({err}): check that dbus is running \
             and that the supervisor may use the system bus"
        ),
    };
    BackendError::Unavailable(message)
}

/// Where the `JobRemoved` of each job goes.
#[derive(Default)]
struct RouterState {
    /// Job paths being waited for, with where to send the job result.
    pending: HashMap<String, oneshot::Sender<String>>,
    /// Results of jobs that ended before anyone waited for them, with when they arrived.
    early: HashMap<String, (String, Instant)>,
    /// Why the signal stream ended, once it has.
    closed: Option<String>,
}

/// The routing table shared by the backend and its signal task.
#[derive(Default)]
struct JobRouter {
    state: Mutex<RouterState>,
    /// Bumped on every `JobRemoved` and `PropertiesChanged` of an instance unit
    /// ([`InstanceBackend::generation`]).
    changes: AtomicU64,
}

/// What [`JobRouter::watch`] found.
enum Watch<'a> {
    /// The job has already ended with this result.
    Ended(String),
    /// The job is running; await [`PendingJob::rx`].
    Pending(PendingJob<'a>),
    /// The signal stream is gone, with why.
    Closed(String),
}

/// A registered waiter; dropping it unregisters the job path (on timeout, say).
struct PendingJob<'a> {
    router: &'a JobRouter,
    path: String,
    rx: oneshot::Receiver<String>,
}

impl Drop for PendingJob<'_> {
    fn drop(&mut self) {
        self.router.lock().pending.remove(&self.path);
    }
}

impl JobRouter {
    fn lock(&self) -> MutexGuard<'_, RouterState> {
        // A panic while holding this lock leaves only maps behind: keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait for `path`: it has already ended, or register a waiter.
    fn watch(&self, path: &str) -> Watch<'_> {
        let mut state = self.lock();
        if let Some((result, _)) = state.early.remove(path) {
            return Watch::Ended(result);
        }
        if let Some(reason) = &state.closed {
            return Watch::Closed(reason.clone());
        }
        let (tx, rx) = oneshot::channel();
        state.pending.insert(path.to_owned(), tx);
        Watch::Pending(PendingJob {
            router: self,
            path: path.to_owned(),
            rx,
        })
    }

    /// A `JobRemoved(id, job, unit, result)` arrived.
    fn removed(&self, path: &str, unit: &str, result: &str) {
        if slug_of_unit(unit).is_some() {
            // Before the waiter learns the result: a list made after the job sees the change.
            self.changed();
        }
        let mut state = self.lock();
        if let Some(tx) = state.pending.remove(path) {
            // The waiter may have timed out meanwhile; nothing to do then.
            let _ = tx.send(result.to_owned());
            return;
        }
        // Only our own units: other jobs on a busy system are not worth keeping.
        if slug_of_unit(unit).is_none() {
            return;
        }
        let now = Instant::now();
        state
            .early
            .retain(|_, (_, at)| now.duration_since(*at) < EARLY_SIGNAL_TTL);
        state
            .early
            .insert(path.to_owned(), (result.to_owned(), now));
    }

    /// An instance unit changed.
    fn changed(&self) {
        self.changes.fetch_add(1, Ordering::Release);
    }

    /// The signal stream ended: fail every waiter (their senders drop) and all later waits.
    fn close(&self, reason: String) {
        let mut state = self.lock();
        state.pending.clear();
        state.closed = Some(reason);
    }
}

/// Routes every `JobRemoved` of the stream until it ends (the connection closed).
async fn route_jobs(mut stream: JobRemovedStream, router: Arc<JobRouter>) {
    while let Some(signal) = stream.next().await {
        match signal.args() {
            Ok(args) => router.removed(args.job().as_str(), args.unit(), args.result()),
            Err(err) => tracing::warn!("ignoring a malformed JobRemoved signal: {err}"),
        }
    }
    router.close(
        "the D-Bus connection to systemd was closed: check that dbus and systemd are running"
            .to_owned(),
    );
}

/// Counts every `PropertiesChanged` of an instance unit (ActiveState, SubState, NRestarts, …:
/// systemd sends them to subscribed clients) until the stream ends; then the generation is no
/// longer tracked.
async fn watch_units(
    mut stream: zbus::MessageStream,
    router: Arc<JobRouter>,
    tracked: Arc<AtomicBool>,
) {
    while let Some(msg) = stream.next().await {
        let Ok(msg) = msg else { continue };
        if msg
            .header()
            .path()
            .is_some_and(|p| p.as_str().starts_with(UNIT_PATH_PREFIX))
        {
            router.changed();
        }
    }
    tracked.store(false, Ordering::Release);
}

/// The manager method that makes a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Start,
    Stop,
    Restart,
}

impl Verb {
    fn as_str(self) -> &'static str {
        match self {
            Verb::Start => "start",
            Verb::Stop => "stop",
            Verb::Restart => "restart",
        }
    }

    fn method(self) -> &'static str {
        match self {
            Verb::Start => "StartUnit",
            Verb::Stop => "StopUnit",
            Verb::Restart => "RestartUnit",
        }
    }
}

/// The systemd backend: `hydraflow@<slug>.service` units of the manager on a D-Bus connection.
pub struct SystemdBackend {
    conn: zbus::Connection,
    manager: ManagerProxy<'static>,
    jobs: Arc<JobRouter>,
    router_task: tokio::task::JoinHandle<()>,
    /// Counts unit property changes; `None` when the match could not be added.
    units_task: Option<tokio::task::JoinHandle<()>>,
    /// Whether unit changes are being counted (the signal streams are open).
    tracked: Arc<AtomicBool>,
    stop_timeout: Duration,
}

impl std::fmt::Debug for SystemdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemdBackend")
            .field("stop_timeout", &self.stop_timeout)
            .finish_non_exhaustive()
    }
}

impl Drop for SystemdBackend {
    fn drop(&mut self) {
        self.router_task.abort();
        if let Some(task) = &self.units_task {
            task.abort();
        }
    }
}

impl SystemdBackend {
    /// Connect to the system bus (`address` = `None`) or to a D-Bus address such as
    /// `unix:path=/run/dbus/system_bus_socket`, open the `JobRemoved` stream and `Subscribe`.
    /// Must be called inside a Tokio runtime.
    ///
    /// # Errors
    /// [`BackendError::Unavailable`] when the bus cannot be reached or systemd is not on it.
    pub async fn connect(address: Option<&str>) -> Result<SystemdBackend, BackendError> {
        let builder = match address {
            Some(address) => zbus::connection::Builder::address(address),
            None => zbus::connection::Builder::system(),
        };
        let bus = address.unwrap_or("the system bus");
        let conn = builder
            .method_timeout(METHOD_TIMEOUT)
            .build()
            .await
            .map_err(|err| {
                BackendError::Unavailable(format!(
                    "cannot connect to {bus}: {err}: check that dbus is running and the socket \
                     is accessible"
                ))
            })?;
        let manager = ManagerProxy::builder(&conn)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(|err| bus_error("creating the systemd manager proxy", &err))?;
        // The match is registered before Subscribe and before any job is made.
        let stream = manager
            .receive_job_removed()
            .await
            .map_err(|err| bus_error("AddMatch JobRemoved", &err))?;
        manager
            .subscribe()
            .await
            .map_err(|err| bus_error("Subscribe", &err))?;
        let jobs = Arc::new(JobRouter::default());
        let router_task = tokio::spawn(route_jobs(stream, Arc::clone(&jobs)));
        let tracked = Arc::new(AtomicBool::new(false));
        let rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .interface("org.freedesktop.DBus.Properties")
            .member("PropertiesChanged")
            .path_namespace(UNIT_PATH_NAMESPACE)
            .build();
        let units = match rule {
            Ok(rule) => zbus::MessageStream::for_match_rule(rule, &conn, None).await,
            Err(err) => Err(err),
        };
        let units_task = match units {
            Ok(stream) => {
                tracked.store(true, Ordering::Release);
                Some(tokio::spawn(watch_units(
                    stream,
                    Arc::clone(&jobs),
                    Arc::clone(&tracked),
                )))
            }
            Err(err) => {
                tracing::warn!(
                    "cannot watch unit property changes ({err}): list_repos asks systemd every time"
                );
                None
            }
        };
        Ok(SystemdBackend {
            conn,
            manager,
            jobs,
            router_task,
            units_task,
            tracked,
            stop_timeout: DEFAULT_STOP_TIMEOUT,
        })
    }

    /// How long [`InstanceBackend::stop`] waits for the stop job (default
    /// [`DEFAULT_STOP_TIMEOUT`]).
    pub fn with_stop_timeout(mut self, timeout: Duration) -> SystemdBackend {
        self.stop_timeout = timeout;
        self
    }

    /// Call `StartUnit`/`StopUnit`/`RestartUnit(unit, "replace")` and wait for the job's
    /// `JobRemoved`; returns the job result (`done`, `failed`, …). Not bounded in time: callers
    /// wrap it in a timeout (dropping the future unregisters the waiter).
    async fn run_job(&self, verb: Verb, unit: &str) -> Result<String, BackendError> {
        let what = format!("{} {unit}", verb.method());
        let reply = match verb {
            Verb::Start => {
                self.manager
                    .start_unit(unit.to_owned(), "replace".to_owned())
                    .await
            }
            Verb::Stop => {
                self.manager
                    .stop_unit(unit.to_owned(), "replace".to_owned())
                    .await
            }
            Verb::Restart => {
                self.manager
                    .restart_unit(unit.to_owned(), "replace".to_owned())
                    .await
            }
        };
        let job: OwnedObjectPath = match reply {
            Ok(job) => job,
            // Stopping a unit systemd cannot even load: nothing runs, nothing to do.
            Err(err) if verb == Verb::Stop && is_no_such_unit(&err) => {
                return Ok("skipped".to_owned());
            }
            Err(err) => return Err(bus_error(&what, &err)),
        };
        tracing::debug!(%unit, job = job.as_str(), "waiting for job");
        let mut pending = match self.jobs.watch(job.as_str()) {
            Watch::Ended(result) => return Ok(result),
            Watch::Closed(reason) => {
                return Err(BackendError::Unavailable(format!("{what}: {reason}")));
            }
            Watch::Pending(pending) => pending,
        };
        (&mut pending.rx).await.map_err(|_| {
            BackendError::Unavailable(format!(
                "{what}: the D-Bus connection to systemd was closed while waiting for job {}: \
                 check that dbus and systemd are running",
                job.as_str()
            ))
        })
    }

    /// The object path of a loaded unit, `None` when systemd does not have it loaded.
    async fn unit_path(&self, unit: &str) -> Result<Option<OwnedObjectPath>, BackendError> {
        match self.manager.get_unit(unit.to_owned()).await {
            Ok(path) => Ok(Some(path)),
            Err(err) if is_no_such_unit(&err) => Ok(None),
            Err(err) => Err(bus_error(&format!("GetUnit {unit}"), &err)),
        }
    }

    async fn unit_proxy(&self, path: &OwnedObjectPath) -> Result<UnitProxy<'static>, BackendError> {
        let what = format!("reading unit {}", path.as_str());
        UnitProxy::builder(&self.conn)
            .path(path.clone())
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(|err| bus_error(&what, &err))
    }

    async fn service_proxy(
        &self,
        path: &OwnedObjectPath,
    ) -> Result<ServiceProxy<'static>, BackendError> {
        let what = format!("reading service {}", path.as_str());
        ServiceProxy::builder(&self.conn)
            .path(path.clone())
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(|err| bus_error(&what, &err))
    }

    /// The unit's `ActiveState`, `None` when it is not loaded.
    async fn active_state(&self, unit: &str) -> Result<Option<String>, BackendError> {
        let Some(path) = self.unit_path(unit).await? else {
            return Ok(None);
        };
        let proxy = self.unit_proxy(&path).await?;
        let state = proxy
            .active_state()
            .await
            .map_err(|err| bus_error(&format!("reading ActiveState of {unit}"), &err))?;
        Ok(Some(state))
    }

    /// `Service.Result` of a unit after a failed job (`LoadUnit` so that a unit that systemd
    /// already garbage-collected still answers), or `unknown` when it cannot be read.
    async fn service_result(&self, unit: &str) -> String {
        let read = async {
            let path = self.manager.load_unit(unit.to_owned()).await?;
            let proxy = ServiceProxy::builder(&self.conn)
                .path(path)
                .cache_properties(CacheProperties::No)
                .build()
                .await?;
            proxy.result().await
        };
        match read.await {
            Ok(result) => result,
            Err(err) => {
                tracing::warn!(%unit, "cannot read Service.Result: {err}");
                "unknown".to_owned()
            }
        }
    }

    /// Every status property of a loaded unit.
    async fn read_status(
        &self,
        slug: &str,
        unit: &str,
        path: &OwnedObjectPath,
    ) -> Result<InstanceStatus, BackendError> {
        let what = format!("reading the status of {unit}");
        let e = |err: zbus::Error| bus_error(&what, &err);
        let u = self.unit_proxy(path).await?;
        let s = self.service_proxy(path).await?;
        Ok(InstanceStatus {
            slug: slug.to_owned(),
            unit: unit.to_owned(),
            active_state: u.active_state().await.map_err(e)?,
            sub_state: u.sub_state().await.map_err(e)?,
            main_pid: main_pid(s.main_pid().await.map_err(e)?),
            n_restarts: s.n_restarts().await.map_err(e)?,
            memory_bytes: memory_bytes(s.memory_current().await.map_err(e)?),
            active_since: timestamp_rfc3339(u.active_enter_timestamp().await.map_err(e)?),
            result: Some(s.result().await.map_err(e)?),
        })
    }

    /// Wait for a start or restart job within `timeout`.
    async fn activate(
        &self,
        verb: Verb,
        unit: &str,
        timeout: Duration,
    ) -> Result<(), BackendError> {
        let work = async {
            let result = self.run_job(verb, unit).await?;
            if job_succeeded(&result) {
                return Ok(());
            }
            let service_result = self.service_result(unit).await;
            Err(match verb {
                Verb::Restart => BackendError::JobFailed {
                    unit: unit.to_owned(),
                    verb: verb.as_str().to_owned(),
                    message: format!(
                        "job result {result}, service result {service_result}; see journalctl -u {unit}"
                    ),
                },
                _ => BackendError::StartFailed {
                    unit: unit.to_owned(),
                    job_result: result,
                    service_result,
                    detail: format!("; see journalctl -u {unit}"),
                    output: Vec::new(),
                },
            })
        };
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(BackendError::Timeout {
                    unit: unit.to_owned(),
                    after: timeout,
                    detail: format!("; the job may still be running, see systemctl status {unit}"),
                })
            })
    }
}

/// The status of a unit systemd does not have loaded.
fn not_loaded(slug: &str, unit: &str) -> InstanceStatus {
    InstanceStatus {
        slug: slug.to_owned(),
        unit: unit.to_owned(),
        active_state: "inactive".to_owned(),
        sub_state: "dead".to_owned(),
        main_pid: None,
        n_restarts: 0,
        memory_bytes: None,
        active_since: None,
        result: None,
    }
}

#[async_trait]
impl InstanceBackend for SystemdBackend {
    fn name(&self) -> &'static str {
        "systemd"
    }

    /// `/run/hydraflow-dashboard/<slug>.sock`, made by `hydraflow@<slug>.socket`.
    fn api_socket(&self, slug: &str) -> std::path::PathBuf {
        crate::dashboard::systemd_socket_path(slug)
    }

    /// `journalctl -u hydraflow@<slug>.service`.
    fn log_location(&self, slug: &str) -> String {
        format!("journalctl -u hydraflow@{slug}.service")
    }

    async fn start(&self, slug: &Slug, timeout: Duration) -> Result<bool, BackendError> {
        let unit = unit_name(slug);
        let state = tokio::time::timeout(timeout, self.active_state(&unit))
            .await
            .map_err(|_| BackendError::Timeout {
                unit: unit.clone(),
                after: timeout,
                detail: "; systemd did not answer GetUnit".to_owned(),
            })??;
        if matches!(state.as_deref(), Some("active" | "reloading")) {
            return Ok(false);
        }
        self.activate(Verb::Start, &unit, timeout).await?;
        Ok(true)
    }

    async fn stop(&self, slug: &Slug) -> Result<(), BackendError> {
        let unit = unit_name(slug);
        let result =
            match tokio::time::timeout(self.stop_timeout, self.run_job(Verb::Stop, &unit)).await {
                Err(_) => {
                    return Err(BackendError::JobFailed {
                        unit: unit.clone(),
                        verb: "stop".to_owned(),
                        message: format!(
                            "the unit did not stop within {:?}; see systemctl status {unit}",
                            self.stop_timeout
                        ),
                    });
                }
                Ok(result) => result?,
            };
        if job_succeeded(&result) {
            return Ok(());
        }
        Err(BackendError::JobFailed {
            unit: unit.clone(),
            verb: "stop".to_owned(),
            message: format!(
                "job result {result}, service result {}; see journalctl -u {unit}",
                self.service_result(&unit).await
            ),
        })
    }

    async fn restart(&self, slug: &Slug, timeout: Duration) -> Result<(), BackendError> {
        self.activate(Verb::Restart, &unit_name(slug), timeout)
            .await
    }

    async fn status(&self, slug: &Slug) -> Result<InstanceStatus, BackendError> {
        let unit = unit_name(slug);
        match self.unit_path(&unit).await? {
            Some(path) => self.read_status(slug.as_str(), &unit, &path).await,
            None => Ok(not_loaded(slug.as_str(), &unit)),
        }
    }

    fn generation(&self) -> Option<u64> {
        let closed = self.jobs.lock().closed.is_some();
        (self.tracked.load(Ordering::Acquire) && !closed)
            .then(|| self.jobs.changes.load(Ordering::Acquire))
    }

    async fn list(&self) -> Result<Vec<InstanceStatus>, BackendError> {
        let pattern = format!("{UNIT_PREFIX}*{UNIT_SUFFIX}");
        let units = self
            .manager
            .list_units_by_patterns(Vec::new(), vec![pattern.clone()])
            .await
            .map_err(|err| bus_error(&format!("ListUnitsByPatterns {pattern}"), &err))?;
        let mut statuses = Vec::with_capacity(units.len());
        for (name, _, _, _, _, _, path, _, _, _) in units {
            let Some(slug) = slug_of_unit(&name) else {
                continue;
            };
            statuses.push(self.read_status(slug, &name, &path).await?);
        }
        statuses.sort_by(|a, b| a.slug.cmp(&b.slug));
        Ok(statuses)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_names_round_trip() {
        let check = |slug: &str| {
            let unit = unit_name(&Slug::new(slug).expect("valid slug"));
            assert_eq!(unit, format!("hydraflow@{slug}.service"));
            assert_eq!(slug_of_unit(&unit), Some(slug));
        };
        check("demo");
        check("owner-repo");
        check("a.b_c-1");
    }

    #[test]
    fn other_units_have_no_slug() {
        let check = |unit: &str| assert_eq!(slug_of_unit(unit), None, "{unit}");
        check("hydraflow.service");
        check("hydraflow@.service");
        check("hydraflow@demo.socket");
        check("ssh.service");
    }

    #[test]
    fn job_results() {
        let check = |result: &str, ok: bool| assert_eq!(job_succeeded(result), ok, "{result}");
        check("done", true);
        check("skipped", true);
        for failed in [
            "canceled",
            "timeout",
            "failed",
            "dependency",
            "invalid",
            "assert",
            "unsupported",
            "collected",
            "once",
        ] {
            check(failed, false);
        }
    }

    #[test]
    fn property_conversions() {
        assert_eq!(timestamp_rfc3339(0), None);
        assert_eq!(
            timestamp_rfc3339(1_700_000_000_123_456).as_deref(),
            Some("2023-11-14T22:13:20Z")
        );
        assert_eq!(timestamp_rfc3339(u64::MAX), None);
        assert_eq!(memory_bytes(u64::MAX), None);
        assert_eq!(memory_bytes(4096), Some(4096));
        assert_eq!(main_pid(0), None);
        assert_eq!(main_pid(42), Some(42));
    }

    #[test]
    fn router_delivers_early_and_late_signals() {
        let router = JobRouter::default();
        // Early: the signal arrives before anyone waits.
        router.removed("/job/1", "hydraflow@a.service", "done");
        assert!(matches!(router.watch("/job/1"), Watch::Ended(r) if r == "done"));
        // Late: the waiter is registered first.
        let Watch::Pending(mut pending) = router.watch("/job/2") else {
            panic!("expected a pending job");
        };
        router.removed("/job/2", "hydraflow@a.service", "failed");
        assert_eq!(pending.rx.try_recv().ok().as_deref(), Some("failed"));
        drop(pending);
        assert!(router.lock().pending.is_empty());
        // Other units' jobs are not buffered.
        router.removed("/job/3", "ssh.service", "done");
        assert!(router.lock().early.is_empty());
        // Closed: waiters fail and new waits are refused.
        let Watch::Pending(mut pending) = router.watch("/job/4") else {
            panic!("expected a pending job");
        };
        router.close("gone".to_owned());
        assert!(pending.rx.try_recv().is_err());
        assert!(matches!(router.watch("/job/5"), Watch::Closed(r) if r == "gone"));
    }
}
