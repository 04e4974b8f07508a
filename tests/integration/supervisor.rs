//! The supervisor's control protocol over real sockets, with real child processes run by the
//! process backend (a shell-script worker that sends READY=1 with systemd-notify), and the
//! `hydraflow supervisor` / `hydraflow repo` binaries end to end.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hydraflow::access::Access;
use hydraflow::config::SupervisorBackend;
use hydraflow::supervisor::process::ProcessOptions;
use hydraflow::supervisor::registry::Registry;
use hydraflow::supervisor::server::{self, ServerOptions};
use hydraflow::supervisor::{Settings, Supervisor, backend};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A worker whose behaviour depends on its slug (`$2`, after `--instance`); it runs in its
/// instance directory (`$PWD`, `<state dir>/<slug>`): `fail*` exits 1 before READY=1,
/// `gated*` waits for `./go` before READY=1, `crashy*` exits 3 after READY=1 once `./crash`
/// appears; every other slug is ready and waits.
const WORKER: &str = r#"#!/bin/sh
slug="$2"
echo "worker $slug starting in $PWD; HYDRAFLOW_HOME=$HYDRAFLOW_HOME HYDRAFLOW_CONFIG=$HYDRAFLOW_CONFIG"
touch "$PWD/started"
case "$slug" in
  fail*) echo "first line of the reason" >&2; echo "boom: cannot start" >&2; exit 1 ;;
  gated*) while [ ! -e "$PWD/go" ]; do sleep 0.02; done ;;
esac
systemd-notify --ready --status="serving $slug" || exit 70
case "$slug" in
  crashy*)
    while [ ! -e "$PWD/crash" ]; do sleep 0.02; done
    rm -f "$PWD/crash"
    exit 3 ;;
esac
sleep 100000 &
wait
"#;

/// Poll `f` until it returns `Some`, for at most a minute (a hang guard, not a timing check).
async fn eventually<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Harness {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Harness {
    async fn start(opts: ServerOptions) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let script = dir.path().join("worker.sh");
        std::fs::write(&script, WORKER).unwrap();
        let mut process = ProcessOptions::new(
            state.clone(),
            vec!["/bin/sh".into(), script.display().to_string()],
            dir.path().join("hydraflow.toml"),
        );
        process.restart_delay = Duration::from_millis(20);
        let backend = backend::select(SupervisorBackend::Process, process)
            .await
            .unwrap();
        let settings = Settings {
            state_dir: state.clone(),
            repos_dir: dir.path().join("repos"),
            start_timeout: Duration::from_secs(20),
            // No dashboard here: `port` is 0.
            dashboard_base: "http://127.0.0.1:0".into(),
            dashboard_port: 0,
        };
        let registry = Registry::load(&state).unwrap().registry;
        let sup = Arc::new(Supervisor::new(registry, backend, settings));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        // Access control on, as in production: the test runs as the server's own user.
        let access = Arc::new(Access::groups("", ""));
        let server = tokio::spawn(server::serve(listener, sup, access, opts, async {
            let _ = rx.await;
        }));
        Harness {
            dir,
            addr,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    async fn default() -> Harness {
        Harness::start(ServerOptions::default()).await
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A checkout directory named `name`.
    fn checkout(&self, name: &str) -> String {
        let path = self.dir.path().join("checkouts").join(name);
        std::fs::create_dir_all(&path).unwrap();
        path.display().to_string()
    }

    /// Send raw bytes, read to end of file.
    async fn raw(&self, bytes: &[u8]) -> String {
        let mut stream = TcpStream::connect(self.addr).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await.unwrap();
        String::from_utf8(reply).unwrap()
    }

    /// Send one request object, return the one reply object.
    async fn req(&self, request: Value) -> Value {
        let reply = self.raw(format!("{request}\n").as_bytes()).await;
        assert!(
            reply.ends_with('\n') && reply.matches('\n').count() == 1,
            "{reply:?}"
        );
        serde_json::from_str(&reply).unwrap()
    }

    /// The registry file, which must always be complete JSON.
    fn state_file(&self) -> Value {
        match std::fs::read(self.state().join("supervisor-state.json")) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap(),
            Err(_) => json!({"repos": []}),
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
    }
}

fn ok() -> Value {
    json!({"status": "ok"})
}

fn pid_alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !matches!(
                s.rsplit_once(')')
                    .map(|(_, r)| r.trim_start().as_bytes()[0]),
                Some(b'Z')
            )
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compatibility_one_line_one_read_then_closed() {
    let h = Harness::default().await;
    let addr = h.addr;
    let dir = h.checkout("compat");
    let replies = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for request in [
            r#"{"action": "ping"}"#.to_owned(),
            format!(r#"{{"action": "register_repo", "path": "{dir}"}}"#),
            r#"{"action": "list_repos"}"#.to_owned(),
        ] {
            // Exactly what the original client does.
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(25))).unwrap();
            s.write_all(format!("{request}\n").as_bytes()).unwrap();
            let mut buf = vec![0u8; 65535];
            let n = s.read(&mut buf).unwrap();
            let second = s.read(&mut [0u8; 16]).unwrap();
            assert_eq!(second, 0, "the server must close after one reply");
            out.push(String::from_utf8(buf[..n].to_vec()).unwrap());
        }
        out
    })
    .await
    .unwrap();
    assert_eq!(replies[0], "{\"status\":\"ok\"}\n");
    let reg: Value = serde_json::from_str(&replies[1]).unwrap();
    assert_eq!(reg["slug"], "compat");
    let list: Value = serde_json::from_str(&replies[2]).unwrap();
    let repo = &list["repos"][0];
    for key in [
        "path",
        "slug",
        "port",
        "dashboard_url",
        "log_file",
        "running",
    ] {
        assert!(repo.get(key).is_some(), "list_repos lacks {key}: {repo}");
    }
    assert_eq!(repo["running"], false);
    assert_eq!(h.state_file()["repos"][0]["slug"], "compat");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_list_status_remove_with_a_real_worker() {
    let h = Harness::default().await;
    let path = h.checkout("demo");
    let added = h.req(json!({"action": "add_repo", "path": path})).await;
    assert_eq!(added["status"], "ok", "{added}");
    assert_eq!(added["slug"], "demo");
    assert_eq!(added["started"], true);
    let log = h.state().join("demo").join("worker.log");
    assert_eq!(added["log_file"], log.display().to_string());
    let instance_file = std::fs::read_to_string(h.dir.path().join("repos/demo.toml")).unwrap();
    let instance: toml::Table = toml::from_str(&instance_file).unwrap();
    assert_eq!(instance["repo_path"].as_str(), Some(path.as_str()));

    let list = h.req(json!({"action": "list_repos"})).await;
    assert_eq!(list["repos"][0]["running"], true, "{list}");
    assert_eq!(list["repos"][0]["active_state"], "active");

    let status = h
        .req(json!({"action": "repo_status", "slug": "demo"}))
        .await;
    assert_eq!(status["sub_state"], "running", "{status}");
    assert_eq!(status["unit"], "hydraflow@demo.service");
    assert_eq!(status["n_restarts"], 0);
    assert!(status["active_since"].is_string());
    let pid = status["main_pid"].as_u64().unwrap();
    assert!(pid_alive(pid));
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        cmdline.ends_with("worker.sh\0--instance\0demo\0"),
        "{cmdline:?}"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains(&format!(
            "starting in {}; HYDRAFLOW_HOME={} ",
            h.state().join("demo").display(),
            h.state().display()
        )),
        "{logged}"
    );

    let again = h.req(json!({"action": "add_repo", "path": path})).await;
    assert_eq!(again["started"], false, "{again}");

    assert_eq!(
        h.req(json!({"action": "remove_repo", "path": path})).await,
        ok()
    );
    assert!(!pid_alive(pid));
    let list = h.req(json!({"action": "list_repos"})).await;
    assert_eq!(list["repos"], json!([]));
    assert_eq!(h.state_file()["repos"], json!([]));
    // What the supervisor wrote went with the registration; what the worker wrote stayed.
    assert!(!h.dir.path().join("repos/demo.toml").exists());
    assert!(!log.exists());
    assert!(!h.state().join("demo").join("worker.pid").exists());
    assert!(h.state().join("demo").join("started").exists());
    // An instance file edited since the supervisor wrote it is the administrator's: kept.
    let edited = h.checkout("edited");
    let reg = h
        .req(json!({"action": "register_repo", "path": edited}))
        .await;
    assert_eq!(reg["status"], "ok", "{reg}");
    let file = h.dir.path().join("repos/edited.toml");
    let text = std::fs::read_to_string(&file).unwrap() + "poll_interval = 5\n";
    std::fs::write(&file, &text).unwrap();
    assert_eq!(
        h.req(json!({"action": "remove_repo", "slug": "edited"}))
            .await,
        ok()
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
    let gone = h
        .req(json!({"action": "remove_repo", "slug": "demo"}))
        .await;
    assert_eq!(
        gone,
        json!({"status": "error", "error": "Repo not found: \"demo\" is not registered (see hydraflow repo list)"})
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_exits_reports_its_exit_code_and_log() {
    let h = Harness::default().await;
    let path = h.checkout("fail-early");
    let reply = h.req(json!({"action": "add_repo", "path": path})).await;
    let log = h.state().join("fail-early").join("worker.log");
    // The reply carries the worker's last lines: its reason, not only where the log is.
    assert_eq!(
        reply,
        json!({"status": "error", "error": format!(
            "Repo process exited with code 1; see {}; its last output:\n  \
             worker fail-early starting in {}; HYDRAFLOW_HOME={} HYDRAFLOW_CONFIG={}\n  \
             first line of the reason\n  boom: cannot start",
            log.display(),
            h.state().join("fail-early").display(),
            h.state().display(),
            h.dir.path().join("hydraflow.toml").display(),
        )})
    );
    assert_eq!(h.state_file()["repos"], json!([]));
    // The instance file the failed add wrote is gone; one an administrator wrote stays.
    assert!(!h.dir.path().join("repos/fail-early.toml").exists());
    let admin = h.dir.path().join("repos/fail-admin.toml");
    std::fs::write(&admin, "# mine\nforge = \"local\"\n").unwrap();
    let reply = h
        .req(json!({"action": "add_repo", "path": h.checkout("fail-admin")}))
        .await;
    assert_eq!(reply["status"], "error", "{reply}");
    assert_eq!(
        std::fs::read_to_string(&admin).unwrap(),
        "# mine\nforge = \"local\"\n"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_worker_is_restarted_and_counted() {
    let h = Harness::default().await;
    let path = h.checkout("crashy");
    let added = h.req(json!({"action": "add_repo", "path": path})).await;
    assert_eq!(added["started"], true, "{added}");
    let first = h
        .req(json!({"action": "repo_status", "slug": "crashy"}))
        .await["main_pid"]
        .clone();
    std::fs::write(h.state().join("crashy").join("crash"), "").unwrap();
    let status = eventually("restarted and active again", async || {
        let s = h
            .req(json!({"action": "repo_status", "slug": "crashy"}))
            .await;
        (s["n_restarts"] == 1 && s["active_state"] == "active").then_some(s)
    })
    .await;
    assert_ne!(status["main_pid"], first);
    assert_eq!(status["result"], "exit-code");
    let list = h.req(json!({"action": "list_repos"})).await;
    assert_eq!(list["repos"][0]["n_restarts"], 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_is_answered_while_an_add_repo_is_in_flight() {
    let h = Arc::new(Harness::default().await);
    let path = h.checkout("gated");
    let adder = {
        let h = h.clone();
        tokio::spawn(async move { h.req(json!({"action": "add_repo", "path": path})).await })
    };
    let started = h.state().join("gated").join("started");
    eventually("the worker runs", async || started.exists().then_some(())).await;
    assert_eq!(h.req(json!({"action": "ping"})).await, ok());
    let list = h.req(json!({"action": "list_repos"})).await;
    assert_eq!(list["repos"][0]["active_state"], "activating", "{list}");
    assert!(
        !adder.is_finished(),
        "add_repo cannot finish before READY=1"
    );
    std::fs::write(h.state().join("gated").join("go"), "").unwrap();
    let added = adder.await.unwrap();
    assert_eq!(added["started"], true, "{added}");
    Arc::into_inner(h).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_an_error_and_the_server_keeps_serving() {
    let h = Harness::default().await;
    let missing = h.dir.path().join("nope").display().to_string();
    let long = "x".repeat(300);
    let cases: Vec<(String, String)> = vec![
        ("{\"action\":".into(), "malformed JSON request: ".into()),
        ("not json".into(), "malformed JSON request: ".into()),
        ("".into(), "malformed JSON request: ".into()),
        (
            "[1,2]".into(),
            "the request must be a JSON object, found an array".into(),
        ),
        (
            "\"ping\"".into(),
            "the request must be a JSON object, found a string".into(),
        ),
        ("{}".into(), "missing field \"action\"".into()),
        (r#"{"action":"dance"}"#.into(), "unknown action".into()),
        (
            r#"{"action":null}"#.into(),
            "missing field \"action\"".into(),
        ),
        (
            r#"{"action":["ping"]}"#.into(),
            "field \"action\" must be a string, found an array".into(),
        ),
        (r#"{"action":"add_repo"}"#.into(), "Missing path".into()),
        (
            r#"{"action":"register_repo"}"#.into(),
            "Missing path".into(),
        ),
        (
            r#"{"action":"remove_repo"}"#.into(),
            "Missing path or slug".into(),
        ),
        (
            r#"{"action":"remove_repo","slug":""}"#.into(),
            "Missing path or slug".into(),
        ),
        (
            r#"{"action":"repo_status"}"#.into(),
            "Missing path or slug".into(),
        ),
        (
            r#"{"action":"add_repo","path":42}"#.into(),
            "field \"path\" must be a string, found a number".into(),
        ),
        (
            r#"{"action":"add_repo","path":"/tmp","repo_slug":true}"#.into(),
            "field \"repo_slug\" must be a string, found a boolean".into(),
        ),
        (
            format!(r#"{{"action":"add_repo","path":"{missing}"}}"#),
            format!("Repo path not found: {missing}"),
        ),
        (
            r#"{"action":"add_repo","path":"/tmp","repo_slug":"../x"}"#.into(),
            "field \"repo_slug\": instance name \"../x\" is not valid".into(),
        ),
        (
            r#"{"action":"add_repo","path":"/tmp","repo_slug":"a/b"}"#.into(),
            "field \"repo_slug\": instance name \"a/b\" is not valid".into(),
        ),
        (
            r#"{"action":"add_repo","path":"/tmp","repo_slug":"a:b"}"#.into(),
            "field \"repo_slug\": instance name \"a:b\" is not valid".into(),
        ),
        (
            r#"{"action":"add_repo","path":"/tmp","repo_slug":"héllo"}"#.into(),
            "field \"repo_slug\": instance name \"héllo\" is not valid".into(),
        ),
        (
            format!(r#"{{"action":"add_repo","path":"/tmp","repo_slug":"{long}"}}"#),
            "field \"repo_slug\": instance name \"xxxxxxxxxxxxxxxxxxxx…\" is 300 characters long"
                .into(),
        ),
        (
            r#"{"action":"remove_repo","slug":"../x"}"#.into(),
            "field \"slug\": instance name \"../x\" is not valid".into(),
        ),
        (
            r#"{"action":"add_repo","repo":"not-a-repo"}"#.into(),
            "repository \"not-a-repo\" is not valid".into(),
        ),
        (
            r#"{"action":"add_repo","repo":"o/n/x"}"#.into(),
            "repository \"o/n/x\" is not valid".into(),
        ),
        (
            r#"{"action":"remove_repo","slug":"ghost"}"#.into(),
            "Repo not found: \"ghost\" is not registered (see hydraflow repo list)".into(),
        ),
        (
            r#"{"action":"repo_status","path":"/nowhere"}"#.into(),
            "Repo not found: /nowhere is not registered".into(),
        ),
        (
            r#"{"action":"ping","keep_alive":1}"#.into(),
            "field \"keep_alive\" must be a boolean".into(),
        ),
    ];
    for (line, expected) in cases {
        let reply = h.raw(format!("{line}\n").as_bytes()).await;
        let reply: Value = serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_eq!(reply["status"], "error", "{line}");
        let error = reply["error"].as_str().unwrap();
        assert!(
            error.starts_with(&expected),
            "{line}: {error:?} does not start with {expected:?}"
        );
        assert_eq!(h.req(json!({"action": "ping"})).await, ok());
    }
    assert_eq!(h.state_file()["repos"], json!([]));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_over_64_kib_is_refused() {
    let h = Harness::default().await;
    let mut line = br#"{"action":"ping","pad":""#.to_vec();
    line.extend(std::iter::repeat_n(b'x', 70 * 1024));
    line.extend(b"\"}\n");
    let reply: Value = serde_json::from_str(&h.raw(&line).await).unwrap();
    assert_eq!(
        reply["error"],
        "request line longer than 65536 bytes: send one JSON object per line"
    );
    assert_eq!(h.req(json!({"action": "ping"})).await, ok());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_and_its_task_ends() {
    let h = Harness::start(ServerOptions {
        idle_timeout: Duration::from_millis(200),
        ..ServerOptions::default()
    })
    .await;
    let mut silent = TcpStream::connect(h.addr).await.unwrap();
    let mut buf = Vec::new();
    assert_eq!(silent.read_to_end(&mut buf).await.unwrap(), 0);
    eventually("only the asking connection is left", async || {
        let v = h.req(json!({"action": "version"})).await;
        (v["connections"] == 1).then_some(())
    })
    .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_list_reaches_a_client_that_reads_slowly() {
    // A long reply (answered in place when it is accepted, or by a task) reaches a client
    // with a small receive window that starts reading late, whole, then the connection closes.
    let h = Harness::default().await;
    for i in 0..120 {
        let path = h.checkout(&format!("repo-{i:03}"));
        let reply = h
            .req(json!({"action": "register_repo", "path": path}))
            .await;
        assert_eq!(reply["status"], "ok", "{reply}");
    }
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(2048).unwrap();
    let mut stream = socket.connect(h.addr).await.unwrap();
    stream
        .write_all(b"{\"action\":\"list_repos\"}\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.unwrap();
    assert!(reply.len() > 16 * 1024, "{} bytes", reply.len());
    let reply: Value = serde_json::from_slice(&reply).unwrap();
    let repos = reply["repos"].as_array().expect("repos");
    assert_eq!(repos.len(), 120);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connections_is_bounded_and_service_resumes() {
    let h = Harness::start(ServerOptions {
        idle_timeout: Duration::from_secs(60),
        max_connections: 4,
        ..ServerOptions::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(h.addr).await.unwrap());
    }
    // `version` always needs a task (a `ping` that has arrived by the time it is accepted is
    // answered in place, without one, so it may be served even now).
    let mut refused = 0;
    for _ in 0..6 {
        let reply = h.raw(b"{\"action\":\"version\"}\n").await;
        let reply: Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(reply["error"], "too many connections (4): try again");
        refused += 1;
    }
    assert_eq!(refused, 6);
    drop(held);
    eventually("served again", async || {
        let reply = h.raw(b"{\"action\":\"ping\"}\n").await;
        (reply == "{\"status\":\"ok\"}\n").then_some(())
    })
    .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_add_and_remove_of_one_repo_serialise() {
    let h = Arc::new(Harness::default().await);
    let path = h.checkout("race");
    let mut tasks = Vec::new();
    for i in 0..12 {
        let h = h.clone();
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            let action = if i % 2 == 0 {
                "add_repo"
            } else {
                "remove_repo"
            };
            h.req(json!({"action": action, "path": path})).await
        }));
    }
    for t in tasks {
        let reply = t.await.unwrap();
        assert!(
            reply == ok()
                || reply["started"].is_boolean()
                || reply["error"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("Repo not found: ")),
            "{reply}"
        );
    }
    let registered = h.state_file()["repos"].as_array().unwrap().len();
    let list = h.req(json!({"action": "list_repos"})).await;
    assert_eq!(list["repos"].as_array().unwrap().len(), registered);
    if registered == 1 {
        assert_eq!(list["repos"][0]["running"], true);
        assert_eq!(
            h.req(json!({"action": "remove_repo", "slug": "race"}))
                .await,
            ok()
        );
    }
    let status = h
        .req(json!({"action": "register_repo", "path": path}))
        .await;
    assert_eq!(status["slug"], "race");
    let status = h
        .req(json!({"action": "repo_status", "slug": "race"}))
        .await;
    assert_eq!(status["active_state"], "inactive", "{status}");
    Arc::into_inner(h).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_serves_several_requests_on_one_connection() {
    let h = Harness::default().await;
    let reply = h
        .raw(b"{\"action\":\"ping\",\"keep_alive\":true}\n{\"action\":\"version\"}\n{\"action\":\"ping\"}\n")
        .await;
    let lines: Vec<Value> = reply
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.len(),
        2,
        "closed after the request without keep_alive: {reply}"
    );
    assert_eq!(lines[0], ok());
    assert_eq!(lines[1]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(lines[1]["backend"], "process");
    h.stop().await;
}

/// Run the `hydraflow` binary with a test configuration.
fn hydraflow(config: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_hydraflow"));
    cmd.env("HYDRAFLOW_CONFIG", config)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .env_remove("HYDRAFLOW_HOME")
        .env_remove("HF_SUPERVISOR_PORT_FILE")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID");
    cmd
}

/// A running daemon, killed when dropped (also when a test fails).
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn output(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The worker processes (by argv) of instance `slug` that are alive, without their forked
/// children that have not exec'd yet.
fn workers_of(slug: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let argv: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if argv
            .windows(2)
            .any(|w| w[0] == b"--instance" && w[1] == slug.as_bytes())
            && pid_alive(u64::from(pid))
        {
            pids.push(pid);
        }
    }
    // A child the worker forks has its argv until it execs: count only the topmost.
    let parent = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
            })
    };
    let all = pids.clone();
    pids.retain(|&p| parent(p).is_none_or(|pp| !all.contains(&pp)));
    pids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_and_the_cli_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let script = dir.path().join("worker.sh");
    std::fs::write(&script, WORKER).unwrap();
    let config = dir.path().join("hydraflow.toml");
    std::fs::write(
        &config,
        format!(
            "repos_dir = \"{}\"\n[supervisor]\nlisten = \"127.0.0.1:0\"\nbackend = \"process\"\nstate_dir = \"{}\"\nworker_command = [\"/bin/sh\", \"{}\"]\n[dashboard]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().join("repos").display(),
            state.display(),
            script.display()
        ),
    )
    .unwrap();
    let checkout = dir.path().join("e2e-demo");
    std::fs::create_dir_all(&checkout).unwrap();
    let port_file = state.join("supervisor-port");

    let not_running = hydraflow(&config).arg("ping").output().unwrap();
    assert!(!not_running.status.success());
    assert!(
        String::from_utf8_lossy(&not_running.stderr)
            .contains("systemctl start hydraflow-supervisor"),
        "{}",
        String::from_utf8_lossy(&not_running.stderr)
    );

    let mut daemon = Daemon(hydraflow(&config).arg("supervisor").spawn().unwrap());
    eventually("the port file", async || port_file.exists().then_some(())).await;
    assert_eq!(output(hydraflow(&config).arg("ping")), "ok\n");
    let added = output(hydraflow(&config).args(["repo", "add"]).arg(&checkout));
    assert!(
        added.starts_with("e2e-demo: started; dashboard: http://127.0.0.1:"),
        "{added}"
    );
    // The dashboard listens on a port of its own choosing (port 0), which `port` reports.
    let dashboard = added
        .split("; ")
        .find_map(|f| f.strip_prefix("dashboard: "))
        .expect("dashboard url");
    let port: u16 = dashboard
        .trim_start_matches("http://127.0.0.1:")
        .trim_end_matches("/repos/e2e-demo/")
        .parse()
        .unwrap_or_else(|_| panic!("{dashboard}"));
    assert_ne!(port, 0);
    let reply = {
        let mut s = std::net::TcpStream::connect(
            std::fs::read_to_string(&port_file)
                .map(|p| format!("127.0.0.1:{}", p.trim()))
                .unwrap(),
        )
        .unwrap();
        s.write_all(b"{\"action\": \"list_repos\"}\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        serde_json::from_str::<Value>(&text).unwrap()
    };
    assert_eq!(reply["repos"][0]["port"], port, "{reply}");
    assert_eq!(reply["repos"][0]["dashboard_url"], dashboard, "{reply}");
    let list = output(hydraflow(&config).args(["repo", "list"]));
    let mut lines = list.lines();
    assert!(lines.next().unwrap().starts_with("SLUG"), "{list}");
    let row = lines.next().unwrap();
    assert!(
        row.starts_with("e2e-demo") && row.contains("active (running)"),
        "{list}"
    );
    // The forge's columns: this stand-in worker serves no API to ask.
    assert!(
        list.starts_with("SLUG")
            && list
                .lines()
                .next()
                .unwrap()
                .ends_with("IDENTITY  BUDGET  RESETS"),
        "{list}"
    );
    assert_eq!(
        row.split_whitespace().rev().take(3).collect::<Vec<_>>(),
        ["-", "-", "-"],
        "{list}"
    );
    let status = output(hydraflow(&config).args(["repo", "status", "e2e-demo"]));
    assert!(
        status.contains("unit: hydraflow@e2e-demo.service"),
        "{status}"
    );
    assert_eq!(workers_of("e2e-demo").len(), 1);

    // SIGTERM: the port file goes, and so does the worker.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(daemon.0.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(daemon.0.wait().unwrap().success());
    assert!(!port_file.exists());
    eventually("no worker left", async || {
        workers_of("e2e-demo").is_empty().then_some(())
    })
    .await;

    // A new supervisor starts what is registered; after a SIGKILLed one, nothing of the old
    // worker's process group is left and the worker runs once.
    let group_exists =
        |g: i32| nix::sys::signal::killpg(nix::unistd::Pid::from_raw(g), None).is_ok();
    let mut last_group: Option<i32> = None;
    for round in 0..3 {
        let mut daemon = Daemon(hydraflow(&config).arg("supervisor").spawn().unwrap());
        eventually("restarted and running", async || {
            let list = hydraflow(&config).args(["repo", "list"]).output().ok()?;
            String::from_utf8_lossy(&list.stdout)
                .contains("active (running)")
                .then_some(())
        })
        .await;
        if let Some(group) = last_group {
            eventually(
                "nothing of the old worker's process group is left",
                async || (!group_exists(group)).then_some(()),
            )
            .await;
        }
        assert_eq!(workers_of("e2e-demo").len(), 1);
        let status = output(hydraflow(&config).args(["repo", "status", "e2e-demo"]));
        let pid = status
            .lines()
            .find_map(|l| l.trim().strip_prefix("main pid: "))
            .and_then(|p| p.parse::<i32>().ok())
            .unwrap_or_else(|| panic!("no main pid in {status}"));
        last_group = Some(pid);
        if round == 2 {
            assert_eq!(
                output(hydraflow(&config).args(["repo", "remove", "e2e-demo"])),
                "e2e-demo: removed\n"
            );
            eventually("the removed worker's group is gone", async || {
                (!group_exists(pid)).then_some(())
            })
            .await;
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(daemon.0.id()).unwrap()),
                nix::sys::signal::Signal::SIGTERM,
            )
            .unwrap();
            assert!(daemon.0.wait().unwrap().success());
        }
        drop(daemon); // SIGKILL (rounds 0 and 1)
    }
    let list = std::fs::read_to_string(state.join("supervisor-state.json")).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&list).unwrap()["repos"],
        json!([])
    );
}
