//! The worker daemon in-process (`hydraflow::worker::run`): it reports
//! ready only once its listeners answer, stops when its shutdown future
//! resolves (removing its socket), runs an issue through on the way, and
//! names a task that ended under it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hydraflow::agent::runner::ProcessRunner;
use hydraflow::config::loader::{self, Target};
use hydraflow::forge::IssueState;
use hydraflow::forge::local::LocalForge;
use hydraflow::runtime::RepoRuntime;
use hydraflow::worker::{self, Listeners, Notifier, Options, Stopped};

use crate::util::Project;

const AGENT: &str = r#"#!/bin/sh
cat > /dev/null
case "$1" in
  triage) echo '{"ready": true, "reasons": []}' ;;
  plan) printf 'PLAN_START\nx\nSUMMARY: x\nPLAN_END\n' ;;
  implement) echo "$2" > "f-$2.txt"; git add -A; git diff --cached --quiet || git commit -qm "work $2" ;;
  review) printf 'VERDICT: APPROVE\nSUMMARY: ok\n' ;;
esac
"#;

/// What the worker told its notifier, in order; `ready` also records
/// whether the API socket accepted a connection at that moment.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<String>>,
    socket: Mutex<Option<std::path::PathBuf>>,
}

impl Notifier for Recorder {
    fn ready(&self, status: &str) {
        let answered = self
            .socket
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|p| std::os::unix::net::UnixStream::connect(p).is_ok());
        self.seen
            .lock()
            .unwrap()
            .push(format!("ready (socket answers: {answered}): {status}"));
    }
    fn status(&self, line: &str) {
        self.seen.lock().unwrap().push(format!("status: {line}"));
    }
    fn alive(&self) {}
    fn stopping(&self) {
        self.seen.lock().unwrap().push("stopping".into());
    }
}

/// A runtime for `p`'s checkout, and bound listeners in its data directory.
async fn runtime(p: &Project) -> (Arc<RepoRuntime>, Listeners) {
    let resolved = loader::resolve(
        &p.config,
        &Target {
            instance: None,
            repo: Some(p.repo().display().to_string()),
        },
        Vec::new(),
        Vec::new(),
        p.fx.tmp.path(),
    )
    .expect("resolve");
    let forge = LocalForge::open(&resolved.layout, &resolved.repo_path).expect("forge");
    let socket = resolved.layout.repo_dir().join("dashboard.sock");
    let rt = RepoRuntime::create(
        resolved,
        Arc::new(forge),
        Arc::new(ProcessRunner::default()),
        Vec::new(),
    )
    .expect("runtime");
    let api = hydraflow::dashboard::bind_private_socket(&socket).expect("bind");
    (
        rt,
        Listeners {
            api,
            api_path: socket,
            remove_api_socket: true,
            tcp: None,
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_after_its_listeners_then_stopped_by_its_shutdown_future() {
    let p = Project::new(AGENT, "");
    p.add_issue("Add a file", "please");
    let (rt, listeners) = runtime(&p).await;
    let socket = listeners.api_path.clone();
    let recorder = Arc::new(Recorder::default());
    *recorder.socket.lock().unwrap() = Some(socket.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = {
        let (rt, recorder) = (Arc::clone(&rt), Arc::clone(&recorder));
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
                "the test's shutdown".to_owned()
            };
            worker::run(
                rt,
                listeners,
                recorder.as_ref(),
                Options::default(),
                shutdown,
            )
            .await
        })
    };
    // It works the issue while running.
    let forge = LocalForge::open(rt.layout(), &rt.resolved().repo_path).expect("forge");
    crate::util::wait_for("the issue to be merged", || {
        forge
            .all_issues()
            .expect("issues")
            .iter()
            .any(|i| i.number == 1 && i.state == IssueState::Closed)
    });
    let _ = stop.send(());
    let ended = tokio::time::timeout(Duration::from_secs(30), handle)
        .await
        .expect("stops in time")
        .expect("task");
    assert_eq!(
        ended.expect("stopped as asked"),
        Stopped::Asked("the test's shutdown".into())
    );
    let seen = recorder.seen.lock().unwrap().clone();
    assert!(
        seen.first()
            .is_some_and(|s| s.starts_with("ready (socket answers: true)")),
        "ready first, once the socket answers: {seen:?}"
    );
    assert!(seen.iter().any(|s| s == "stopping"), "{seen:?}");
    assert!(!socket.exists(), "its socket is removed");
    assert!(!rt.running().await, "the runtime is stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_ends_is_reported_by_name() {
    let p = Project::new(AGENT, "");
    let (rt, listeners) = runtime(&p).await;
    let recorder = Recorder::default();
    let failing: worker::SideTask = (
        "probe",
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Err("it broke".to_owned())
        }),
    );
    let options = Options {
        exit_when_idle: false,
        side_tasks: vec![failing],
    };
    let ended = tokio::time::timeout(
        Duration::from_secs(30),
        worker::run(
            Arc::clone(&rt),
            listeners,
            &recorder,
            options,
            std::future::pending(),
        ),
    )
    .await
    .expect("ends in time");
    let err = ended.expect_err("a task ended");
    assert_eq!(err.task, "probe");
    assert_eq!(err.to_string(), "the worker's probe task ended: it broke");
    assert!(!rt.running().await, "the runtime was stopped first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nothing_to_do_it_stops_when_idle() {
    let p = Project::new(AGENT, "");
    let (rt, listeners) = runtime(&p).await;
    let recorder = Recorder::default();
    let options = Options {
        exit_when_idle: true,
        side_tasks: Vec::new(),
    };
    let ended = tokio::time::timeout(
        Duration::from_secs(30),
        worker::run(rt, listeners, &recorder, options, std::future::pending()),
    )
    .await
    .expect("ends in time");
    assert_eq!(ended.expect("idle"), Stopped::Idle);
}
