//! The systemd backend against a real systemd 252 in a booted Debian 12 container
//! (`HYDRAFLOW_SYSTEM_TESTS=1`, as root): start, a SIGKILLed worker restarted by systemd,
//! stop, and a worker that fails before READY=1.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hydraflow::layout::Slug;
use hydraflow::supervisor::backend::{BackendError, InstanceBackend, InstanceStatus};
use hydraflow::supervisor::systemd_backend::SystemdBackend;

use crate::util_container::{Container, ContainerConfig, step, system_tests_enabled};

/// The stand-in worker until `hydraflow worker` exists: fails for instances named `fail*`,
/// otherwise says READY=1 and sleeps.
const TEST_WORKER: &str = "#!/bin/sh
case \"$1\" in
fail*) echo \"test worker: failing on purpose for $1\" >&2; exit 1 ;;
esac
systemd-notify --ready --status=\"test worker for $1\"
exec sleep infinity
";

/// The ExecStart of the test template; switch to `/usr/bin/hydraflow worker --instance %i` once
/// the real worker is in the tree.
const EXEC_START: &str = "/usr/local/bin/hydraflow-test-worker %i";

/// A `hydraflow@.service` for tests, with `exec_start` as its ExecStart=.
fn template(exec_start: &str) -> String {
    format!(
        "[Unit]
Description=HydraFlow worker for %i (test template)

[Service]
Type=notify
NotifyAccess=all
ExecStart={exec_start}
Restart=on-failure
RestartSec=1
TimeoutStartSec=30
TimeoutStopSec=10
"
    )
}

fn slug(s: &str) -> Slug {
    Slug::new(s).expect("valid slug")
}

/// Poll the status every 200 ms until `done` holds (at most 30 s).
async fn status_until(
    backend: &SystemdBackend,
    slug: &Slug,
    what: &str,
    done: impl Fn(&InstanceStatus) -> bool,
) -> InstanceStatus {
    let start = Instant::now();
    loop {
        let status = backend.status(slug).await.expect("status");
        if done(&status) {
            return status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "gave up waiting for {what}: last status {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_backend_in_a_booted_container() {
    if !system_tests_enabled("systemd_backend_in_a_booted_container") {
        return;
    }
    let config = ContainerConfig {
        files: vec![
            (
                "/usr/local/bin/hydraflow-test-worker".into(),
                TEST_WORKER.into(),
                0o755,
            ),
            (
                "/etc/systemd/system/hydraflow@.service".into(),
                template(EXEC_START),
                0o644,
            ),
        ],
        bind_ro: vec![(
            PathBuf::from(env!("CARGO_BIN_EXE_hydraflow")),
            "/usr/bin/hydraflow".into(),
        )],
    };
    let mut container = Container::boot(&config);
    step(&format!("connecting to {}", container.bus_address()));
    let backend = SystemdBackend::connect(Some(&container.bus_address()))
        .await
        .expect("connect to the container's systemd");
    let demo = slug("demo");
    let timeout = Duration::from_secs(60);

    step("start hydraflow@demo.service");
    assert!(
        backend.start(&demo, timeout).await.expect("start"),
        "it was not running"
    );
    let status = backend.status(&demo).await.expect("status");
    assert_eq!(
        (status.active_state.as_str(), status.sub_state.as_str()),
        ("active", "running"),
        "{status:?}"
    );
    assert_eq!(status.n_restarts, 0);
    assert!(status.active_since.is_some(), "{status:?}");
    let pid = status.main_pid.expect("a main pid");
    step(&format!("active, main pid {pid} (in the container)"));
    assert!(
        !backend.start(&demo, timeout).await.expect("start again"),
        "it is already running"
    );

    step("SIGKILL the main process");
    // minbase has no kill(1): use the shell's builtin.
    container.exec_ok(&["sh", "-c", &format!("kill -KILL {pid}")]);
    let status = status_until(&backend, &demo, "the restart", |s| {
        s.n_restarts == 1 && s.running() && s.main_pid.is_some_and(|p| p != pid)
    })
    .await;
    step(&format!(
        "restarted by systemd: n_restarts {}, main pid {:?}",
        status.n_restarts, status.main_pid
    ));
    let listed = backend.list().await.expect("list");
    assert!(
        listed.iter().any(|s| s.slug == "demo" && s.running()),
        "{listed:?}"
    );

    step("restart");
    backend.restart(&demo, timeout).await.expect("restart");
    assert!(backend.status(&demo).await.expect("status").running());

    step("stop");
    backend.stop(&demo).await.expect("stop");
    let status = backend.status(&demo).await.expect("status");
    assert!(
        matches!(status.active_state.as_str(), "inactive" | "failed") && !status.running(),
        "{status:?}"
    );
    backend.stop(&demo).await.expect("stop a stopped instance");

    step("start an instance whose worker exits 1");
    let err = backend
        .start(&slug("failing"), timeout)
        .await
        .expect_err("the worker fails");
    step(&format!("start failed as expected: {err}"));
    match err {
        BackendError::StartFailed {
            job_result,
            service_result,
            ..
        } => {
            assert_eq!(job_result, "failed");
            assert_eq!(service_result, "exit-code");
        }
        other => panic!("expected StartFailed, got {other}"),
    }
    let _ = backend.stop(&slug("failing")).await;

    drop(backend);
    container.power_off().await;
    step("done");
}
