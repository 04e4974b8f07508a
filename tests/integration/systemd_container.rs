//! The supervisor with its systemd backend against a real systemd 252 in a booted Debian 12
//! container (ignored unless asked for: as root, `cargo test -- --include-ignored`), driven through the TCP control protocol: the
//! supervisor runs on the host, connected to the container's system bus; a test
//! `hydraflow@.service` runs the real `hydraflow worker --instance %i` inside. The host's repos
//! directory is bound to `/etc/hydraflow/repos` and the checkouts directory to the same path, so
//! the instance files the supervisor writes are what the worker reads.
//!
//! Checked: add_repo → unit active; a SIGKILLed worker is restarted by systemd and repo_status
//! shows one restart; remove_repo → inactive; a restarted supervisor starts the registered repos
//! and duplicates nothing; a worker that fails to start → add_repo error with `exit-code`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hydraflow::layout::Slug;
use hydraflow::supervisor::backend::InstanceBackend;
use hydraflow::supervisor::registry::Registry;
use hydraflow::supervisor::server::{self, ServerOptions};
use hydraflow::supervisor::systemd_backend::SystemdBackend;
use hydraflow::supervisor::{Settings, Supervisor};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::git_fixture::commit_files;
use crate::util_container::{Container, ContainerConfig, cache_dir, require_container_host, step};

/// The test template: the real worker, its data in a state directory per instance.
const TEMPLATE: &str = "[Unit]
Description=HydraFlow worker for %i (test template)

[Service]
Type=notify
NotifyAccess=main
ExecStart=/usr/bin/hydraflow worker --instance %i
Environment=HYDRAFLOW_HOME=/var/lib/hydraflow
StateDirectory=hydraflow/%i
Restart=on-failure
RestartSec=1
TimeoutStartSec=30
TimeoutStopSec=10
";

/// A supervisor serving on a loopback port, its systemd backend on the container's bus.
struct Served {
    addr: SocketAddr,
    backend: Arc<SystemdBackend>,
    supervisor: Arc<Supervisor>,
    shutdown: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Served {
    /// Load the registry from `base/state`, connect to `bus`, start the registered repositories
    /// (reconcile, awaited) and serve.
    async fn start(base: &Path, bus: &str) -> Served {
        let backend = Arc::new(
            SystemdBackend::connect(Some(bus))
                .await
                .expect("connect to the container's systemd")
                .with_stop_timeout(Duration::from_secs(60)),
        );
        let state = base.join("state");
        std::fs::create_dir_all(&state).expect("state dir");
        let settings = Settings {
            state_dir: state.clone(),
            repos_dir: base.join("repos"),
            start_timeout: Duration::from_secs(60),
            dashboard_base: "http://127.0.0.1:5555".into(),
            dashboard_port: 5555,
        };
        let registry = Registry::load(&state).expect("registry").registry;
        let supervisor = Arc::new(Supervisor::new(
            registry,
            backend.clone() as Arc<dyn InstanceBackend>,
            settings,
        ));
        supervisor.clone().reconcile().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (shutdown, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(server::serve(
            listener,
            supervisor.clone(),
            Arc::new(hydraflow::access::Access::groups("", "")),
            ServerOptions::default(),
            async {
                let _ = rx.await;
            },
        ));
        Served {
            addr,
            backend,
            supervisor,
            shutdown,
            server,
        }
    }

    /// One request line, one reply line (read to end of file, as the original's client).
    async fn req(&self, request: Value) -> Value {
        let mut stream = TcpStream::connect(self.addr).await.expect("connect");
        stream
            .write_all(format!("{request}\n").as_bytes())
            .await
            .expect("send");
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await.expect("read");
        serde_json::from_slice(&reply)
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&reply)))
    }

    async fn status(&self, slug: &str) -> Value {
        let reply = self
            .req(json!({"action": "repo_status", "slug": slug}))
            .await;
        assert_eq!(reply["status"], "ok", "{reply}");
        reply
    }

    /// Stop serving and drop the supervisor (units keep running: systemd owns them).
    async fn stop(self) {
        let _ = self.shutdown.send(());
        self.server.await.expect("server task").expect("serve");
        drop(self.supervisor);
        drop(self.backend);
    }
}

/// Poll repo_status every 200 ms until `done` holds (a hang guard of 60 s, not a timing check).
async fn status_until(served: &Served, slug: &str, what: &str, done: impl Fn(&Value) -> bool) {
    let start = Instant::now();
    loop {
        let status = served.status(slug).await;
        if done(&status) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "gave up waiting for {what}: last status {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A git checkout with one commit on `main` at `dir`.
fn git_checkout(dir: &Path) {
    let mut opts = git2::RepositoryInitOptions::new();
    opts.initial_head("main");
    let repo = git2::Repository::init_opts(dir, &opts).expect("git init");
    let mut config = repo.config().expect("config");
    config.set_str("user.name", "Test Author").expect("name");
    config
        .set_str("user.email", "test@example.com")
        .expect("email");
    commit_files(dir, &[("README.md", Some("hello\n"))], "initial commit");
}

/// `hydraflow@<slug>.service` units the container's systemd has, with their ActiveState.
fn units_in_container(container: &Container) -> String {
    container.exec_ok(&[
        "systemctl",
        "list-units",
        "--all",
        "--plain",
        "--no-legend",
        "hydraflow@*",
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a booted Debian 12 container: as root run tests/system/prepare-host.sh, then cargo test -- --include-ignored (.ci/run does both)"]
async fn supervisor_with_systemd_in_a_booted_container() {
    require_container_host();
    // On the real filesystem next to the cached rootfs (bound into the container).
    let tmp = tempfile::Builder::new()
        .prefix("hydraflow-supervisor-")
        .tempdir_in(cache_dir())
        .expect("temp dir");
    let base = tmp.path().to_owned();
    let repos = base.join("repos");
    let checkouts = base.join("checkouts");
    std::fs::create_dir_all(&repos).expect("repos dir");
    for name in ["demo", "second"] {
        git_checkout(&checkouts.join(name));
    }
    std::fs::create_dir_all(checkouts.join("notgit")).expect("not a repository");
    let config = ContainerConfig {
        files: vec![(
            "/etc/systemd/system/hydraflow@.service".into(),
            TEMPLATE.into(),
            0o644,
        )],
        bind_ro: vec![(
            PathBuf::from(env!("CARGO_BIN_EXE_hydraflow")),
            "/usr/bin/hydraflow".into(),
        )],
        bind: vec![
            (repos.clone(), "/etc/hydraflow/repos".into()),
            (checkouts.clone(), checkouts.display().to_string()),
        ],
    };
    let mut container = Container::boot(&config);
    let bus = container.bus_address();
    step(&format!("supervisor on the host, backend on {bus}"));
    let served = Served::start(&base, &bus).await;
    let demo_path = checkouts.join("demo").display().to_string();

    step("add_repo demo: the real worker sends READY=1");
    let added = served
        .req(json!({"action": "add_repo", "path": demo_path}))
        .await;
    assert_eq!(added["status"], "ok", "{added}");
    assert_eq!(added["slug"], "demo", "{added}");
    assert_eq!(added["started"], true, "{added}");
    assert!(repos.join("demo.toml").is_file(), "the instance file");
    let status = served.status("demo").await;
    assert_eq!(
        (
            &status["active_state"],
            &status["sub_state"],
            &status["running"]
        ),
        (&json!("active"), &json!("running"), &json!(true)),
        "{status}"
    );
    assert_eq!(status["n_restarts"], 0, "{status}");
    assert_eq!(status["backend"], "systemd", "{status}");
    let pid = status["main_pid"].as_u64().expect("a main pid");
    let cmdline = container.exec_ok(&["cat", &format!("/proc/{pid}/cmdline")]);
    assert_eq!(
        cmdline, "/usr/bin/hydraflow\0worker\0--instance\0demo\0",
        "the real worker runs"
    );
    let again = served
        .req(json!({"action": "add_repo", "path": demo_path}))
        .await;
    assert_eq!(again["started"], false, "already running: {again}");

    step(&format!("SIGKILL the worker (pid {pid} in the container)"));
    // minbase has no kill(1): use the shell's builtin.
    container.exec_ok(&["sh", "-c", &format!("kill -KILL {pid}")]);
    status_until(&served, "demo", "systemd's restart", |s| {
        s["n_restarts"] == 1 && s["running"] == true && s["main_pid"].as_u64() != Some(pid)
    })
    .await;
    let status = served.status("demo").await;
    let pid = status["main_pid"].as_u64().expect("a main pid");
    step(&format!("restarted by systemd: {status}"));

    step("register_repo second (not started), then restart the supervisor");
    let registered = served
        .req(json!({"action": "register_repo", "path": checkouts.join("second")}))
        .await;
    assert_eq!(registered["status"], "ok", "{registered}");
    assert_eq!(served.status("second").await["running"], false);
    served.stop().await;
    let served = Served::start(&base, &bus).await;
    let list = served.req(json!({"action": "list_repos"})).await;
    let repos_listed = list["repos"].as_array().expect("repos");
    let slugs: Vec<&str> = repos_listed
        .iter()
        .map(|r| r["slug"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(slugs, ["demo", "second"], "{list}");
    assert!(
        repos_listed.iter().all(|r| r["running"] == true),
        "every registered repo runs: {list}"
    );
    let status = served.status("demo").await;
    assert_eq!(
        (status["main_pid"].as_u64(), &status["n_restarts"]),
        (Some(pid), &json!(1)),
        "the running worker was kept, not started twice: {status}"
    );
    let units = units_in_container(&container);
    assert_eq!(
        units.lines().filter(|l| l.contains("active")).count(),
        2,
        "{units}"
    );

    step("remove_repo demo: the unit stops, the instance file the supervisor wrote goes");
    let removed = served
        .req(json!({"action": "remove_repo", "slug": "demo"}))
        .await;
    assert_eq!(removed, json!({"status": "ok"}));
    assert!(
        !repos.join("demo.toml").exists(),
        "the instance file is left"
    );
    let gone = served
        .req(json!({"action": "repo_status", "slug": "demo"}))
        .await;
    assert_eq!(
        gone["error"], "Repo not found: \"demo\" is not registered (see hydraflow repo list)",
        "{gone}"
    );
    let unit = served
        .backend
        .status(&Slug::new("demo").expect("slug"))
        .await
        .expect("status");
    assert!(
        matches!(unit.active_state.as_str(), "inactive" | "failed"),
        "{unit:?}"
    );

    step("add_repo of a path that is not a git repository: the worker fails");
    let failed = served
        .req(json!({"action": "add_repo", "path": checkouts.join("notgit")}))
        .await;
    assert_eq!(failed["status"], "error", "{failed}");
    let message = failed["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("exit-code") && message.contains("hydraflow@notgit.service"),
        "{message}"
    );
    step(&format!("add_repo failed as expected: {message}"));
    let list = served.req(json!({"action": "list_repos"})).await;
    let slugs: Vec<&str> = list["repos"]
        .as_array()
        .expect("repos")
        .iter()
        .map(|r| r["slug"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(slugs, ["second"], "the failed add is taken back: {list}");
    let unit = served
        .backend
        .status(&Slug::new("notgit").expect("slug"))
        .await
        .expect("status");
    assert!(
        !unit.running() && unit.active_state != "activating",
        "the failed unit is not left restarting: {unit:?}"
    );

    step("add_repo → active, five times (printed for BENCHMARKS.md, not asserted)");
    let mut took = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let added = served
            .req(json!({"action": "add_repo", "path": demo_path}))
            .await;
        took.push(start.elapsed());
        assert_eq!(added["started"], true, "{added}");
        let removed = served
            .req(json!({"action": "remove_repo", "slug": "demo"}))
            .await;
        assert_eq!(removed, json!({"status": "ok"}));
    }
    took.sort();
    step(&format!(
        "add_repo → active: median {:?}, all {took:?}",
        took[took.len() / 2]
    ));

    served.stop().await;
    container.power_off().await;
    step("done");
}
