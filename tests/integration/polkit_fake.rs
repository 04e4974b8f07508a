//! The polkit authority against a fake `org.freedesktop.PolicyKit1.Authority` on a private
//! `dbus-daemon`: it parses the subject as polkitd 122 does (`unix-process` with `pid` u32 and
//! `start-time` u64 required, `uid` i32), refuses actions it does not know with polkit's
//! "not registered" error, grants by a table of UIDs, and can be made silent, for what a real
//! polkit will not do on demand. The real polkit is tested in the booted container
//! (`system_deb.rs`).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hydraflow::access::{Authority, Caller, Identity, Right, Verdict};
use hydraflow::supervisor::polkit::Polkit;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use zbus::{OwnedVariant, interface};

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.freedesktop.PolicyKit1.Error")]
enum PkError {
    #[zbus(error)]
    ZBus(zbus::Error),
    Failed(String),
}

/// One `CheckAuthorization` as received: (pid, start-time, uid, action).
type Asked = (u32, u64, Option<i32>, String);

#[derive(Default)]
struct FakeState {
    /// Actions polkit knows (from installed .policy files).
    actions: HashSet<String>,
    /// (uid, action) pairs the rules grant.
    grants: HashSet<(i32, String)>,
    /// Never answer.
    silent: bool,
    asked: Vec<Asked>,
}

struct FakeAuthority {
    state: Arc<Mutex<FakeState>>,
}

#[interface(name = "org.freedesktop.PolicyKit1.Authority")]
impl FakeAuthority {
    async fn check_authorization(
        &self,
        subject: (String, HashMap<String, OwnedVariant>),
        action_id: String,
        details: HashMap<String, String>,
        flags: u32,
        _cancellation_id: String,
    ) -> Result<(bool, bool, HashMap<String, String>), PkError> {
        let (kind, fields) = subject;
        if kind != "unix-process" {
            return Err(PkError::Failed(format!("Unknown subject of kind `{kind}'")));
        }
        let pid: u32 = fields
            .get("pid")
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| PkError::Failed("Error parsing unix-process subject: pid".into()))?;
        let start: u64 = fields
            .get("start-time")
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| {
                PkError::Failed("Error parsing unix-process subject: start-time".into())
            })?;
        let uid: Option<i32> = fields.get("uid").and_then(|v| i32::try_from(v).ok());
        assert!(details.is_empty(), "no details are passed: {details:?}");
        assert_eq!(flags, 0, "no interaction is asked for");
        let silent = {
            let mut state = self.state.lock().expect("lock");
            state.asked.push((pid, start, uid, action_id.clone()));
            state.silent
        };
        if silent {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        let state = self.state.lock().expect("lock");
        if !state.actions.contains(&action_id) {
            return Err(PkError::Failed(format!(
                "Action {action_id} is not registered"
            )));
        }
        let Some(uid) = uid else {
            return Err(PkError::Failed(
                "Unix process subject does not have uid set".into(),
            ));
        };
        let granted = state.grants.contains(&(uid, action_id));
        Ok((granted, false, HashMap::new()))
    }
}

/// Start `dbus-daemon --session` on a socket in `dir`; returns it and its address.
async fn private_bus(dir: &Path) -> (Child, String) {
    let mut daemon = Command::new("dbus-daemon")
        .arg("--session")
        .arg("--nofork")
        .arg("--nopidfile")
        .arg(format!("--address=unix:path={}", dir.join("bus").display()))
        .arg("--print-address")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn dbus-daemon (apt package dbus)");
    let mut line = String::new();
    BufReader::new(daemon.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .await
        .expect("read the bus address");
    (daemon, line.trim().to_owned())
}

struct Harness {
    _dir: tempfile::TempDir,
    _daemon: Child,
    _server: zbus::Connection,
    address: String,
    state: Arc<Mutex<FakeState>>,
}

async fn harness(actions: &[&str], grants: &[(i32, &str)]) -> Harness {
    let dir = tempfile::tempdir().expect("temp dir");
    let (daemon, address) = private_bus(dir.path()).await;
    let state = Arc::new(Mutex::new(FakeState {
        actions: actions.iter().map(|a| (*a).to_owned()).collect(),
        grants: grants.iter().map(|(u, a)| (*u, (*a).to_owned())).collect(),
        ..FakeState::default()
    }));
    let server = zbus::connection::Builder::address(address.as_str())
        .name("org.freedesktop.PolicyKit1")
        .serve_at(
            "/org/freedesktop/PolicyKit1/Authority",
            FakeAuthority {
                state: Arc::clone(&state),
            },
        )
        .build()
        .await
        .expect("serve the fake authority");
    Harness {
        _dir: dir,
        _daemon: daemon,
        _server: server,
        address,
        state,
    }
}

const ACTIONS: [&str; 2] = ["org.hydraflow.read", "org.hydraflow.manage"];

fn tcp_caller(uid: u32) -> Caller {
    Caller {
        identity: Identity::Known { uid, pid: None },
        from: "127.0.0.1:40000".into(),
    }
}

#[tokio::test]
async fn polkit_decides_by_the_callers_uid_and_process() {
    let h = harness(
        &ACTIONS,
        &[
            (1001, "org.hydraflow.read"),
            (1001, "org.hydraflow.manage"),
            (1002, "org.hydraflow.read"),
        ],
    )
    .await;
    let polkit = Polkit::connect(Some(&h.address)).await.expect("connect");
    assert_eq!(polkit.name(), "polkit");
    // The start-up probe asked about nobody.
    let probe = h.state.lock().expect("lock").asked.clone();
    assert_eq!(
        probe,
        [(
            std::process::id(),
            0,
            Some(65534),
            "org.hydraflow.read".into()
        )]
    );
    let check = |uid: u32, right: Right| {
        let polkit = &polkit;
        async move { polkit.check(&tcp_caller(uid), uid, right).await }
    };
    assert_eq!(check(1001, Right::Manage).await, Verdict::Allow);
    assert_eq!(check(1002, Right::Read).await, Verdict::Allow);
    assert_eq!(check(1002, Right::Manage).await, Verdict::Deny(None));
    assert_eq!(check(1003, Right::Read).await, Verdict::Deny(None));
    // A Unix-socket caller is checked as its own process.
    let unix = Caller {
        identity: Identity::Known {
            uid: 1001,
            pid: Some(4242),
        },
        from: "unix socket".into(),
    };
    assert_eq!(polkit.check(&unix, 1001, Right::Read).await, Verdict::Allow);
    let asked = h.state.lock().expect("lock").asked.clone();
    let last = asked.last().expect("asked");
    assert_eq!(last, &(4242, 0, Some(1001), "org.hydraflow.read".into()));
    // A TCP caller is checked as the supervisor's process with the caller's UID.
    assert_eq!(
        asked[1],
        (
            std::process::id(),
            0,
            Some(1001),
            "org.hydraflow.manage".into()
        )
    );
}

#[tokio::test]
async fn a_polkit_without_hydraflow_s_policy_is_not_used() {
    let h = harness(&["org.freedesktop.systemd1.manage-units"], &[]).await;
    let err = Polkit::connect(Some(&h.address))
        .await
        .err()
        .expect("the probe fails");
    let text = err.to_string();
    assert!(
        text.contains("Action org.hydraflow.read is not registered")
            && text.contains("install org.hydraflow.policy"),
        "{text}"
    );
}

#[tokio::test]
async fn a_bus_without_polkit_is_not_used() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_daemon, address) = private_bus(dir.path()).await;
    let err = Polkit::connect(Some(&address))
        .await
        .err()
        .expect("nobody answers");
    assert!(err.to_string().contains("polkit"), "{err}");
}

#[tokio::test]
async fn a_silent_polkit_is_a_refusal_with_that_reason() {
    let h = harness(&ACTIONS, &[(1001, "org.hydraflow.manage")]).await;
    let polkit = Polkit::connect(Some(&h.address)).await.expect("connect");
    h.state.lock().expect("lock").silent = true;
    let verdict = polkit.check(&tcp_caller(1001), 1001, Right::Manage).await;
    assert_eq!(
        verdict,
        Verdict::Deny(Some("polkit did not answer within 1 s".into()))
    );
}
