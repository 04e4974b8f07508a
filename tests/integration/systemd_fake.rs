//! Fault injection for the systemd backend: a fake `org.freedesktop.systemd1` served with zbus
//! on a private `dbus-daemon`, scripted per test (job results, signal/reply order, a silent
//! job, the bus going away), driven through `SystemdBackend`.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hydraflow::layout::Slug;
use hydraflow::supervisor::backend::{BackendError, InstanceBackend, InstanceStatus};
use hydraflow::supervisor::systemd_backend::SystemdBackend;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use zbus::object_server::SignalEmitter;
use zbus::{Connection, ObjectPath, OwnedObjectPath, interface};

/// When the fake sends a job's `JobRemoved` relative to the method reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// Reply, then the signal from a task a moment later (what systemd usually does).
    ReplyFirst,
    /// The signal, then the reply.
    SignalFirst,
    /// A reply and never a signal.
    NoSignal,
}

/// What the fake manager does with the next jobs.
#[derive(Debug, Clone, Copy)]
struct Script {
    /// The `JobRemoved` result of start/restart jobs.
    job_result: &'static str,
    /// `Service.Result` after a start/restart job.
    service_result: &'static str,
    order: Order,
    /// Answer manage-units calls with polkit's "interactive authorization required".
    deny: bool,
}

const DONE: Script = Script {
    job_result: "done",
    service_result: "success",
    order: Order::ReplyFirst,
    deny: false,
};

/// One unit of the fake manager.
#[derive(Debug, Clone)]
struct FakeUnit {
    active_state: String,
    sub_state: String,
    main_pid: u32,
    n_restarts: u32,
    memory_current: u64,
    active_enter_timestamp: u64,
    result: String,
}

impl FakeUnit {
    fn dead() -> FakeUnit {
        FakeUnit {
            active_state: "inactive".into(),
            sub_state: "dead".into(),
            main_pid: 0,
            n_restarts: 0,
            memory_current: u64::MAX,
            active_enter_timestamp: 0,
            result: "success".into(),
        }
    }

    fn running() -> FakeUnit {
        FakeUnit {
            active_state: "active".into(),
            sub_state: "running".into(),
            main_pid: 4242,
            n_restarts: 0,
            memory_current: 8 << 20,
            active_enter_timestamp: 1_700_000_000_000_000,
            result: "success".into(),
        }
    }
}

#[derive(Debug)]
struct FakeState {
    script: Script,
    units: HashMap<String, FakeUnit>,
    next_job: u32,
    /// Every manager call, as `Method unit`.
    calls: Vec<String>,
}

type Shared = Arc<Mutex<FakeState>>;

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, FakeState> {
    state.lock().expect("fake state lock")
}

/// systemd's object path of a unit (`bus_label_escape`: every byte but [A-Za-z0-9] as `_xx`).
fn unit_path(unit: &str) -> OwnedObjectPath {
    let mut label = String::new();
    for b in unit.bytes() {
        if b.is_ascii_alphanumeric() {
            label.push(char::from(b));
        } else {
            label.push_str(&format!("_{b:02x}"));
        }
    }
    OwnedObjectPath::try_from(format!("/org/freedesktop/systemd1/unit/{label}"))
        .expect("valid unit path")
}

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.freedesktop.systemd1")]
enum SdError {
    #[zbus(error)]
    ZBus(zbus::Error),
    NoSuchUnit(String),
}

struct Manager {
    state: Shared,
}

/// Make sure `unit` exists in the fake with its Unit/Service objects; returns its path.
async fn load_unit_objects(
    state: &Shared,
    server: &zbus::ObjectServer,
    unit: &str,
) -> OwnedObjectPath {
    let path = unit_path(unit);
    let fresh = {
        let mut state = lock(state);
        if state.units.contains_key(unit) {
            false
        } else {
            state.units.insert(unit.to_owned(), FakeUnit::dead());
            true
        }
    };
    if fresh {
        let unit_obj = UnitObject {
            state: Arc::clone(state),
            unit: unit.to_owned(),
        };
        let service_obj = ServiceObject {
            state: Arc::clone(state),
            unit: unit.to_owned(),
        };
        server.at(&path, unit_obj).await.expect("serve unit");
        server.at(&path, service_obj).await.expect("serve service");
    }
    path
}

impl Manager {
    async fn load(&self, server: &zbus::ObjectServer, unit: &str) -> OwnedObjectPath {
        load_unit_objects(&self.state, server, unit).await
    }

    /// Record a manage-units call; polkit may say no.
    fn record(&self, method: &str, unit: &str) -> Result<Script, zbus::fdo::Error> {
        let mut state = lock(&self.state);
        state.calls.push(format!("{method} {unit}"));
        if state.script.deny {
            return Err(zbus::fdo::Error::InteractiveAuthorizationRequired(
                "Interactive authentication required.".into(),
            ));
        }
        Ok(state.script)
    }

    /// Make a job for `unit` that ends with `result`, the unit then in `after`.
    async fn job(
        &self,
        conn: &Connection,
        unit: &str,
        result: &'static str,
        after: FakeUnit,
        order: Order,
    ) -> OwnedObjectPath {
        let id = {
            let mut state = lock(&self.state);
            state.next_job += 1;
            state.next_job
        };
        let job = OwnedObjectPath::try_from(format!("/org/freedesktop/systemd1/job/{id}"))
            .expect("valid job path");
        let end = {
            let state = Arc::clone(&self.state);
            let conn = conn.clone();
            let unit = unit.to_owned();
            let job = job.clone();
            async move {
                lock(&state).units.insert(unit.clone(), after);
                let emitter =
                    SignalEmitter::new(&conn, "/org/freedesktop/systemd1").expect("emitter");
                Manager::job_removed(&emitter, id, job.as_ref(), &unit, result)
                    .await
                    .expect("emit JobRemoved");
            }
        };
        match order {
            Order::SignalFirst => end.await,
            Order::ReplyFirst => {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    end.await;
                });
            }
            Order::NoSignal => {}
        }
        job
    }

    fn after_start(script: Script) -> FakeUnit {
        if script.job_result == "done" {
            FakeUnit::running()
        } else {
            FakeUnit {
                active_state: "failed".into(),
                sub_state: "failed".into(),
                result: script.service_result.into(),
                ..FakeUnit::dead()
            }
        }
    }
}

#[interface(name = "org.freedesktop.systemd1.Manager")]
impl Manager {
    async fn subscribe(&self) {
        lock(&self.state).calls.push("Subscribe".into());
    }

    async fn get_unit(&self, name: String) -> Result<OwnedObjectPath, SdError> {
        let mut state = lock(&self.state);
        state.calls.push(format!("GetUnit {name}"));
        if state.units.contains_key(&name) {
            Ok(unit_path(&name))
        } else {
            Err(SdError::NoSuchUnit(format!("Unit {name} not loaded.")))
        }
    }

    async fn load_unit(
        &self,
        name: String,
        #[zbus(object_server)] server: &zbus::ObjectServer,
    ) -> OwnedObjectPath {
        lock(&self.state).calls.push(format!("LoadUnit {name}"));
        self.load(server, &name).await
    }

    async fn start_unit(
        &self,
        name: String,
        mode: String,
        #[zbus(object_server)] server: &zbus::ObjectServer,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<OwnedObjectPath> {
        assert_eq!(mode, "replace");
        let script = self.record("StartUnit", &name)?;
        self.load(server, &name).await;
        let after = Manager::after_start(script);
        Ok(self
            .job(conn, &name, script.job_result, after, script.order)
            .await)
    }

    async fn restart_unit(
        &self,
        name: String,
        mode: String,
        #[zbus(object_server)] server: &zbus::ObjectServer,
        #[zbus(connection)] conn: &Connection,
    ) -> zbus::fdo::Result<OwnedObjectPath> {
        assert_eq!(mode, "replace");
        let script = self.record("RestartUnit", &name)?;
        self.load(server, &name).await;
        let after = Manager::after_start(script);
        Ok(self
            .job(conn, &name, script.job_result, after, script.order)
            .await)
    }

    async fn stop_unit(
        &self,
        name: String,
        mode: String,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, SdError> {
        assert_eq!(mode, "replace");
        let script = self
            .record("StopUnit", &name)
            .map_err(|e| SdError::ZBus(e.into()))?;
        if !lock(&self.state).units.contains_key(&name) {
            return Err(SdError::NoSuchUnit(format!("Unit {name} not loaded.")));
        }
        Ok(self
            .job(conn, &name, "done", FakeUnit::dead(), script.order)
            .await)
    }

    #[allow(clippy::type_complexity)]
    async fn list_units_by_patterns(
        &self,
        states: Vec<String>,
        patterns: Vec<String>,
    ) -> Vec<(
        String,
        String,
        String,
        String,
        String,
        String,
        OwnedObjectPath,
        u32,
        String,
        OwnedObjectPath,
    )> {
        let mut state = lock(&self.state);
        state.calls.push(format!(
            "ListUnitsByPatterns [{}] [{}]",
            states.join(","),
            patterns.join(",")
        ));
        let none = OwnedObjectPath::try_from("/").expect("root path");
        state
            .units
            .iter()
            .map(|(name, u)| {
                (
                    name.clone(),
                    "HydraFlow worker".to_owned(),
                    "loaded".to_owned(),
                    u.active_state.clone(),
                    u.sub_state.clone(),
                    String::new(),
                    unit_path(name),
                    0,
                    String::new(),
                    none.clone(),
                )
            })
            .collect()
    }

    #[zbus(signal)]
    async fn job_removed(
        emitter: &SignalEmitter<'_>,
        id: u32,
        job: ObjectPath<'_>,
        unit: &str,
        result: &str,
    ) -> zbus::Result<()>;
}

struct UnitObject {
    state: Shared,
    unit: String,
}

impl UnitObject {
    fn get(&self) -> FakeUnit {
        lock(&self.state)
            .units
            .get(&self.unit)
            .cloned()
            .unwrap_or_else(FakeUnit::dead)
    }
}

#[interface(name = "org.freedesktop.systemd1.Unit")]
impl UnitObject {
    #[zbus(property, name = "ActiveState")]
    fn active_state(&self) -> String {
        self.get().active_state
    }

    #[zbus(property, name = "SubState")]
    fn sub_state(&self) -> String {
        self.get().sub_state
    }

    #[zbus(property, name = "ActiveEnterTimestamp")]
    fn active_enter_timestamp(&self) -> u64 {
        self.get().active_enter_timestamp
    }
}

struct ServiceObject {
    state: Shared,
    unit: String,
}

impl ServiceObject {
    fn get(&self) -> FakeUnit {
        lock(&self.state)
            .units
            .get(&self.unit)
            .cloned()
            .unwrap_or_else(FakeUnit::dead)
    }
}

#[interface(name = "org.freedesktop.systemd1.Service")]
impl ServiceObject {
    #[zbus(property, name = "MainPID")]
    fn main_pid(&self) -> u32 {
        self.get().main_pid
    }

    #[zbus(property, name = "NRestarts")]
    fn n_restarts(&self) -> u32 {
        self.get().n_restarts
    }

    #[zbus(property, name = "MemoryCurrent")]
    fn memory_current(&self) -> u64 {
        self.get().memory_current
    }

    #[zbus(property, name = "Result")]
    fn result(&self) -> String {
        self.get().result
    }
}

/// A private bus with the fake manager on it and a backend connected to it.
struct Harness {
    _dir: tempfile::TempDir,
    daemon: Child,
    state: Shared,
    _server: Connection,
    backend: SystemdBackend,
}

/// Start `dbus-daemon --session` on a socket in a temp dir; returns it and its address once it
/// listens.
async fn private_bus(dir: &Path) -> (Child, String) {
    let socket = dir.join("bus");
    let mut daemon = Command::new("dbus-daemon")
        .arg("--session")
        .arg("--nofork")
        .arg("--nopidfile")
        .arg(format!("--address=unix:path={}", socket.display()))
        .arg("--print-address")
        .stdout(Stdio::piped())
        // It warns that it cannot raise its fd limit, which does not matter here.
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn dbus-daemon (apt package dbus)");
    let stdout = daemon.stdout.take().expect("dbus-daemon stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .await
        .expect("read the bus address");
    let address = line.trim().to_owned();
    assert!(address.starts_with("unix:path="), "bus address {address:?}");
    (daemon, address)
}

async fn harness(script: Script, units: &[(&str, FakeUnit)]) -> Harness {
    let dir = tempfile::tempdir().expect("temp dir");
    let (daemon, address) = private_bus(dir.path()).await;
    let state = Arc::new(Mutex::new(FakeState {
        script,
        units: HashMap::new(),
        next_job: 0,
        calls: Vec::new(),
    }));
    let manager = Manager {
        state: Arc::clone(&state),
    };
    let server = zbus::connection::Builder::address(address.as_str())
        .name("org.freedesktop.systemd1")
        .serve_at("/org/freedesktop/systemd1", manager)
        .build()
        .await
        .expect("serve the fake manager");
    for (unit, fake) in units {
        load_unit_objects(&state, server.object_server(), unit).await;
        lock(&state).units.insert((*unit).to_owned(), fake.clone());
    }
    let backend = SystemdBackend::connect(Some(&address))
        .await
        .expect("connect to the fake manager");
    lock(&state).calls.clear();
    Harness {
        _dir: dir,
        daemon,
        state,
        _server: server,
        backend,
    }
}

impl Harness {
    fn calls(&self) -> Vec<String> {
        lock(&self.state).calls.clone()
    }
}

fn demo() -> Slug {
    Slug::new("demo").expect("valid slug")
}

const UNIT: &str = "hydraflow@demo.service";

/// Start `demo` under `script` (bounded by `timeout`) and compare the outcome, as `Ok(bool)` or
/// the error message.
async fn check_start(script: Script, timeout: Duration, expected: Result<bool, &str>) {
    let h = harness(script, &[]).await;
    let got = h
        .backend
        .start(&demo(), timeout)
        .await
        .map_err(|e| e.to_string());
    assert_eq!(got, expected.map_err(str::to_owned), "{script:?}");
    assert!(
        h.calls().contains(&format!("StartUnit {UNIT}")),
        "{:?}",
        h.calls()
    );
}

const LONG: Duration = Duration::from_secs(30);

#[tokio::test]
async fn start_job_results() {
    check_start(DONE, LONG, Ok(true)).await;
    check_start(
        Script {
            job_result: "done",
            order: Order::SignalFirst,
            ..DONE
        },
        LONG,
        Ok(true),
    )
    .await;
    check_start(
        Script {
            job_result: "skipped",
            ..DONE
        },
        LONG,
        Ok(true),
    )
    .await;
    check_start(
        Script {
            job_result: "failed",
            service_result: "exit-code",
            ..DONE
        },
        LONG,
        Err("hydraflow@demo.service failed to start: job result failed, service result exit-code; see journalctl -u hydraflow@demo.service"),
    )
    .await;
    check_start(
        Script {
            job_result: "timeout",
            service_result: "timeout",
            order: Order::SignalFirst,
            ..DONE
        },
        LONG,
        Err("hydraflow@demo.service failed to start: job result timeout, service result timeout; see journalctl -u hydraflow@demo.service"),
    )
    .await;
    check_start(
        Script {
            order: Order::NoSignal,
            ..DONE
        },
        Duration::from_millis(300),
        Err("hydraflow@demo.service did not become active within 300ms; the job may still be running, see systemctl status hydraflow@demo.service"),
    )
    .await;
}

#[tokio::test]
async fn start_of_a_running_instance_starts_nothing() {
    let h = harness(DONE, &[(UNIT, FakeUnit::running())]).await;
    assert_eq!(h.backend.start(&demo(), LONG).await.ok(), Some(false));
    assert_eq!(h.calls(), vec![format!("GetUnit {UNIT}")]);
}

#[tokio::test]
async fn polkit_denial_says_what_to_do() {
    let h = harness(Script { deny: true, ..DONE }, &[]).await;
    let err = h.backend.start(&demo(), LONG).await.expect_err("denied");
    assert!(
        matches!(&err, BackendError::Unavailable(m) if m.contains("permission denied by polkit") && m.contains("install the hydraflow polkit rule")),
        "{err}"
    );
}

#[tokio::test]
async fn bus_going_away_mid_wait_is_unavailable() {
    let mut h = harness(
        Script {
            order: Order::NoSignal,
            ..DONE
        },
        &[],
    )
    .await;
    let state = Arc::clone(&h.state);
    let daemon = &mut h.daemon;
    let slug = demo();
    let start = h.backend.start(&slug, Duration::from_secs(600));
    let kill = async {
        // Once the job exists, the bus dies.
        while !lock(&state)
            .calls
            .iter()
            .any(|c| c.starts_with("StartUnit"))
        {
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        daemon.kill().await.expect("kill dbus-daemon");
    };
    let (result, ()) = tokio::join!(start, kill);
    let err = result.expect_err("the bus is gone");
    assert!(
        matches!(&err, BackendError::Unavailable(m) if m.contains("connection to systemd was closed")),
        "{err}"
    );
    // Later calls fail too, without hanging.
    assert!(matches!(
        h.backend.start(&demo(), Duration::from_secs(600)).await,
        Err(BackendError::Unavailable(_))
    ));
}

#[tokio::test]
async fn stop_and_restart() {
    let h = harness(DONE, &[(UNIT, FakeUnit::running())]).await;
    h.backend.restart(&demo(), LONG).await.expect("restart");
    h.backend.stop(&demo()).await.expect("stop");
    assert_eq!(
        h.backend
            .status(&demo())
            .await
            .expect("status")
            .active_state,
        "inactive"
    );
    // Stopping a unit systemd does not know is success.
    h.backend
        .stop(&Slug::new("unknown").expect("slug"))
        .await
        .expect("stop unknown");
    assert_eq!(
        h.calls(),
        vec![
            format!("RestartUnit {UNIT}"),
            format!("StopUnit {UNIT}"),
            format!("GetUnit {UNIT}"),
            "StopUnit hydraflow@unknown.service".to_owned(),
        ]
    );

    let h = harness(
        Script {
            job_result: "failed",
            service_result: "exit-code",
            ..DONE
        },
        &[(UNIT, FakeUnit::running())],
    )
    .await;
    let err = h.backend.restart(&demo(), LONG).await.expect_err("fails");
    assert_eq!(
        err.to_string(),
        "hydraflow@demo.service: restart failed: job result failed, service result exit-code; see journalctl -u hydraflow@demo.service"
    );
}

#[tokio::test]
async fn status_and_list() {
    let h = harness(
        DONE,
        &[
            (UNIT, FakeUnit::running()),
            ("hydraflow@other.service", FakeUnit::dead()),
        ],
    )
    .await;
    let running = InstanceStatus {
        slug: "demo".into(),
        unit: UNIT.into(),
        active_state: "active".into(),
        sub_state: "running".into(),
        main_pid: Some(4242),
        n_restarts: 0,
        memory_bytes: Some(8 << 20),
        active_since: Some("2023-11-14T22:13:20Z".into()),
        result: Some("success".into()),
    };
    let dead = InstanceStatus {
        slug: "other".into(),
        unit: "hydraflow@other.service".into(),
        active_state: "inactive".into(),
        sub_state: "dead".into(),
        main_pid: None,
        n_restarts: 0,
        memory_bytes: None,
        active_since: None,
        result: Some("success".into()),
    };
    assert_eq!(h.backend.status(&demo()).await.expect("status"), running);
    assert_eq!(h.backend.list().await.expect("list"), vec![running, dead]);
    assert!(
        h.calls()
            .contains(&"ListUnitsByPatterns [] [hydraflow@*.service]".to_owned()),
        "{:?}",
        h.calls()
    );
    let unknown = h
        .backend
        .status(&Slug::new("nope").expect("slug"))
        .await
        .expect("status");
    assert_eq!(
        (
            unknown.active_state.as_str(),
            unknown.sub_state.as_str(),
            unknown.running()
        ),
        ("inactive", "dead", false)
    );
}
