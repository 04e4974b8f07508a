//! The supervisor's dashboard against two running local-forge workers:
//! `/api/repos`, proxying to each worker's socket, the `__all__` fan-in
//! carrying both slugs, a killed worker shown down while the other still
//! streams, a worker socket that hangs, and a real headless Chromium loading
//! the page, seeing the repository table and a live event.

use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt as _;
use http::StatusCode;
use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::util::{HANG_GUARD, Project};
use crate::util_dashboard::{CALL_GUARD, RunningWorker, until};

/// Every stage succeeds at once (the pipeline keeps publishing events).
const AGENT: &str = r#"#!/bin/sh
stage="$1"; issue="$2"
cat >/dev/null
case "$stage" in
  triage) echo '{"ready": true, "reasons": ["ok"], "issue_type": "feature", "clarity_score": 8, "complexity_score": 2, "needs_discovery": false, "already_addressed": false}' ;;
  plan) printf 'PLAN_START\nWrite file-%s.txt.\nSUMMARY: add it\nPLAN_END\n' "$issue" ;;
  implement) echo "content $issue" > "file-$issue.txt"; git add -A && git commit -q -m "implement #$issue" ;;
  review) echo "VERDICT: APPROVE"; echo "SUMMARY: fine" ;;
esac
"#;

/// The dashboard process, killed when dropped.
struct Dashboard {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `hydraflow dashboard --listen 127.0.0.1:0 --worker …`, its address read from stderr.
fn dashboard(workers: &[(&str, &Path)]) -> Dashboard {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hydraflow"));
    cmd.args(["dashboard", "--listen", "127.0.0.1:0"])
        .env_remove("HYDRAFLOW_DASHBOARD_TOKEN");
    for (slug, socket) in workers {
        cmd.arg("--worker")
            .arg(format!("{slug}={}", socket.display()));
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the dashboard");
    let mut line = String::new();
    std::io::BufReader::new(child.stderr.take().expect("stderr"))
        .read_line(&mut line)
        .expect("read the address");
    let addr = line
        .trim()
        .strip_prefix("dashboard: http://")
        .and_then(|a| a.strip_suffix('/'))
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .expect("address");
    Dashboard { child, addr }
}

/// `GET path` on the dashboard: status and JSON body (`null` when not JSON).
async fn get(addr: SocketAddr, path: &str) -> (StatusCode, Value) {
    let work = async {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header("host", "localhost")
            .body(axum::body::Body::empty())
            .expect("request");
        let resp = tx.send_request(req).await.expect("response");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    };
    tokio::time::timeout(CALL_GUARD, work)
        .await
        .unwrap_or_else(|_| panic!("GET {path} hung"))
}

fn project(slug: &str) -> Project {
    let p = Project::new(AGENT, &format!("slug = {slug:?}"));
    p.add_issue(&format!("First {slug} issue"), "please");
    p
}

fn worker_up(repos: &Value, slug: &str) -> Option<bool> {
    repos["repos"]
        .as_array()?
        .iter()
        .find(|r| r["slug"] == slug)
        .and_then(|r| r["worker"]["up"].as_bool())
}

/// A Unix socket that accepts connections and never answers.
fn hanging_socket(dir: &Path) -> PathBuf {
    let path = dir.join("hang.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming() {
            held.push(s);
        }
    });
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_proxied_fanned_in_and_one_killed() {
    let (a, b) = (project("alpha"), project("beta"));
    let mut wa = RunningWorker::start(&a, "alpha", &[]);
    let _wb = RunningWorker::start(&b, "beta", &[]);
    let hang = hanging_socket(a.fx.tmp.path());
    let d = dashboard(&[
        ("alpha", &wa.socket),
        ("beta", &_wb.socket),
        ("hang", &hang),
    ]);

    let mut ws = tokio::time::timeout(
        CALL_GUARD,
        tokio_tungstenite::connect_async(format!("ws://{}/ws?repo=__all__", d.addr)),
    )
    .await
    .expect("ws in time")
    .expect("ws")
    .0;

    let (status, repos) = get(d.addr, "/api/repos").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(worker_up(&repos, "alpha"), Some(true), "{repos}");
    assert_eq!(worker_up(&repos, "beta"), Some(true), "{repos}");
    assert_eq!(worker_up(&repos, "hang"), Some(false), "{repos}");

    let check = async |path: &str, status: StatusCode, probe: &str, expected: Value| {
        let (got, v) = get(d.addr, path).await;
        assert_eq!(got, status, "{path}: {v}");
        assert_eq!(
            v.pointer(probe).cloned().unwrap_or(Value::Null),
            expected,
            "{path} at {probe}: {v}"
        );
    };
    check(
        "/repos/alpha/api/runtimes",
        StatusCode::OK,
        "/0/slug",
        "alpha".into(),
    )
    .await;
    check(
        "/repos/beta/healthz",
        StatusCode::OK,
        "/runtimes/0/slug",
        "beta".into(),
    )
    .await;
    check(
        "/repos/beta/api/events?since=0",
        StatusCode::OK,
        "/0/repo",
        "beta".into(),
    )
    .await;
    check(
        "/repos/gamma/api/state",
        StatusCode::NOT_FOUND,
        "/error",
        "no repository \"gamma\" is registered".into(),
    )
    .await;
    check(
        "/repos/alpha/api/nope",
        StatusCode::NOT_FOUND,
        "/error",
        "no route for /api/nope".into(),
    )
    .await;
    check(
        "/nope",
        StatusCode::NOT_FOUND,
        "/error",
        "no route for /nope".into(),
    )
    .await;
    check(
        "/ws?repo=gamma",
        StatusCode::NOT_FOUND,
        "/error",
        "no repository \"gamma\" is registered".into(),
    )
    .await;
    let (status, body) = get(d.addr, "/repos/hang/healthz").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("did not answer")),
        "{body}"
    );

    // The fan-in carries both slugs.
    let mut frames = Vec::<Value>::new();
    let mut next = async || -> Value {
        loop {
            let m = tokio::time::timeout(HANG_GUARD, ws.next())
                .await
                .expect("a frame within the guard")
                .expect("open")
                .expect("frame");
            if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
                return serde_json::from_str(&t).expect("JSON frame");
            }
        }
    };
    while !["alpha", "beta"].iter().all(|s| {
        frames
            .iter()
            .any(|f| f["slug"] == *s && f["event"]["repo"] == *s)
    }) {
        frames.push(next().await);
    }

    // Kill alpha: it shows as down, beta still streams.
    wa.kill();
    until("alpha to show as down", || async {
        let (_, repos) = get(d.addr, "/api/repos").await;
        worker_up(&repos, "alpha") == Some(false) && worker_up(&repos, "beta") == Some(true)
    })
    .await;
    let (status, body) = get(d.addr, "/repos/alpha/healthz").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    let last_beta = frames
        .iter()
        .filter(|f| f["slug"] == "beta")
        .filter_map(|f| f["event"]["id"].as_u64())
        .max()
        .unwrap_or(0);
    b.add_issue("Second beta issue", "please");
    let mut saw_down = frames
        .iter()
        .any(|f| f["slug"] == "alpha" && f["type"] == "worker_down");
    loop {
        let f = next().await;
        saw_down |= f["slug"] == "alpha" && f["type"] == "worker_down";
        if f["slug"] == "beta"
            && f["event"]["id"].as_u64().is_some_and(|id| id > last_beta)
            && saw_down
        {
            break;
        }
    }
}

/// A fresh headless Chromium driven over the DevTools protocol.
struct Browser {
    child: Child,
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
    session: Option<String>,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    async fn launch(profile: &Path) -> Browser {
        let child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run chromium: this test needs it on PATH (apt-get install chromium)");
        let port_file = profile.join("DevToolsActivePort");
        until("chromium's DevTools port", || async {
            std::fs::read_to_string(&port_file).is_ok_and(|t| t.lines().count() >= 2)
        })
        .await;
        let text = std::fs::read_to_string(&port_file).expect("DevToolsActivePort");
        let mut lines = text.lines();
        let (port, path) = (lines.next().expect("port"), lines.next().expect("path"));
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}{path}"))
            .await
            .expect("DevTools WebSocket");
        Browser {
            child,
            ws,
            next_id: 0,
            session: None,
        }
    }

    /// Send a DevTools command and wait for its result.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        use futures_util::SinkExt as _;
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = serde_json::json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = s.clone().into();
        }
        self.ws
            .send(tokio_tungstenite::tungstenite::Message::Text(
                msg.to_string().into(),
            ))
            .await
            .expect("send to chromium");
        loop {
            let m = tokio::time::timeout(CALL_GUARD, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("chromium did not answer {method}"))
                .expect("open")
                .expect("frame");
            if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
                let v: Value = serde_json::from_str(&t).expect("DevTools JSON");
                if v["id"] == id {
                    assert!(v.get("error").is_none(), "{method}: {v}");
                    return v["result"].clone();
                }
            }
        }
    }

    async fn open(&mut self, url: &str) {
        let target = self
            .call("Target.createTarget", serde_json::json!({"url": url}))
            .await;
        let attached = self
            .call(
                "Target.attachToTarget",
                serde_json::json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        self.session = attached["sessionId"].as_str().map(str::to_owned);
    }

    async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                serde_json::json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        r["result"]["value"].clone()
    }

    /// Wait until `expression` is true in the page.
    async fn until(&mut self, what: &str, expression: &str) {
        let started = std::time::Instant::now();
        while self.eval(expression).await != Value::Bool(true) {
            assert!(
                started.elapsed() < HANG_GUARD,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium: apt-get install chromium, then cargo test -- --include-ignored (.ci/run does both)"]
async fn headless_chromium_shows_repositories_and_a_live_event() {
    use base64::Engine as _;
    let (a, b) = (project("alpha"), project("beta"));
    let wa = RunningWorker::start(&a, "alpha", &[]);
    let wb = RunningWorker::start(&b, "beta", &[]);
    let d = dashboard(&[("alpha", &wa.socket), ("beta", &wb.socket)]);
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut browser = Browser::launch(&tmp.path().join("profile")).await;
    browser.open(&format!("http://{}/", d.addr)).await;

    browser
        .until(
            "the repository table with both workers up",
            r#"document.querySelectorAll('tr.repo[data-slug="alpha"] .up, tr.repo[data-slug="beta"] .up').length === 2"#,
        )
        .await;
    browser
        .until(
            "the WebSocket to be live",
            r#"document.getElementById('conn').textContent === 'live'"#,
        )
        .await;
    // File an issue now: the worker publishes its events, the page must show one live.
    b.add_issue("Live issue from the test", "b");
    browser
        .until(
            "a live event of the new issue",
            r#"[...document.querySelectorAll('#events li.event[data-slug="beta"]')].some(li => li.textContent.includes('Live issue from the test'))"#,
        )
        .await;
    // The selected repository's agent cost: today's total and the budget.
    browser.eval(r#"select("beta"); true"#).await;
    browser
        .until(
            "the agent cost of the selected repository",
            r#"document.getElementById('costs').textContent.includes('today (') && document.getElementById('costs').textContent.includes('no daily budget')"#,
        )
        .await;
    let shot = browser
        .call(
            "Page.captureScreenshot",
            serde_json::json!({"format": "png"}),
        )
        .await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().expect("screenshot data"))
        .expect("base64");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    std::fs::write(tmp.path().join("dashboard.png"), &png).expect("save the screenshot");
    if let Ok(dir) = std::env::var("HYDRAFLOW_SCREENSHOT_DIR") {
        std::fs::write(Path::new(&dir).join("dashboard.png"), &png).expect("copy the screenshot");
    }
}

/// `hydraflow supervisor` (process backend, real `hydraflow worker`s, its dashboard on a port
/// of its own choosing) with `alpha` and `beta` added; the `dashboard_url` of each as
/// `repo add` printed it.
struct Supervised {
    daemon: Dashboard,
    state: PathBuf,
    urls: Vec<(String, String)>,
    _projects: (Project, Project),
}

impl Supervised {
    async fn start() -> Supervised {
        let (a, b) = (project("alpha"), project("beta"));
        let dir = a.fx.tmp.path();
        let state = dir.join("state");
        let config = dir.join("supervisor.toml");
        let base = std::fs::read_to_string(&a.config).expect("config");
        let base = base.replace("slug = \"alpha\"\n", "");
        std::fs::write(
            &config,
            format!(
                "repos_dir = {:?}\n{base}\n[supervisor]\nlisten = \"127.0.0.1:0\"\nbackend = \"process\"\nstate_dir = {:?}\n[dashboard]\nlisten = \"127.0.0.1:0\"\n",
                dir.join("repos").display().to_string(),
                state.display().to_string(),
            ),
        )
        .expect("write config");
        let hydraflow = || {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_hydraflow"));
            cmd.env("HYDRAFLOW_CONFIG", &config)
                .env_remove("NOTIFY_SOCKET")
                .env_remove("JOURNAL_STREAM")
                .env_remove("HYDRAFLOW_HOME")
                .env_remove("HF_SUPERVISOR_PORT_FILE")
                .env_remove("LISTEN_FDS")
                .env_remove("LISTEN_PID")
                .env_remove("HYDRAFLOW_DASHBOARD_TOKEN");
            cmd
        };
        let child = hydraflow()
            .arg("supervisor")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the supervisor");
        let mut daemon = Dashboard {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        until("the supervisor's port file", || async {
            state.join("supervisor-port").exists()
        })
        .await;
        let mut urls = Vec::new();
        for (p, slug) in [(&a, "alpha"), (&b, "beta")] {
            let out = hydraflow()
                .args(["repo", "add", "--slug", slug])
                .arg(p.repo())
                .output()
                .expect("repo add");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let url = stdout
                .split("; ")
                .find_map(|f| f.strip_prefix("dashboard: "))
                .unwrap_or_else(|| panic!("no dashboard url in {stdout:?}"))
                .to_owned();
            urls.push((slug.to_owned(), url));
        }
        let addr = urls[0]
            .1
            .strip_prefix("http://")
            .and_then(|rest| rest.split('/').next())
            .expect("address in dashboard_url");
        daemon.addr = addr.parse().expect("address");
        Supervised {
            daemon,
            state,
            urls,
            _projects: (a, b),
        }
    }

    fn url(&self, slug: &str) -> &str {
        &self.urls.iter().find(|(s, _)| s == slug).expect("slug").1
    }

    fn stop(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.daemon.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        assert!(self.daemon.child.wait().expect("wait").success());
    }
}

/// `GET path` on the dashboard: status, content type and body text.
async fn get_text(addr: SocketAddr, path: &str) -> (StatusCode, String, String) {
    let work = async {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header("host", "localhost")
            .body(axum::body::Body::empty())
            .expect("request");
        let resp = tx.send_request(req).await.expect("response");
        let status = resp.status();
        let location = resp
            .headers()
            .get(http::header::LOCATION)
            .or_else(|| resp.headers().get(http::header::CONTENT_TYPE))
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (
            status,
            location,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    };
    tokio::time::timeout(CALL_GUARD, work)
        .await
        .unwrap_or_else(|_| panic!("GET {path} hung"))
}

/// `hydraflow supervisor` (process backend, real `hydraflow worker`s) serves
/// the dashboard: both repositories with their unit state, each worker's
/// socket at `<state_dir>/<slug>/dashboard.sock`, proxying to it, and each
/// repository's `dashboard_url` (`/repos/<slug>/`) is the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_supervisor_daemon_serves_the_dashboard() {
    let sup = Supervised::start().await;
    let addr = sup.daemon.addr;
    until("both workers up in /api/repos", || async {
        let (_, repos) = get(addr, "/api/repos").await;
        worker_up(&repos, "alpha") == Some(true) && worker_up(&repos, "beta") == Some(true)
    })
    .await;
    let (_, repos) = get(addr, "/api/repos").await;
    for slug in ["alpha", "beta"] {
        let row = repos["repos"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["slug"] == slug))
            .expect("row");
        assert_eq!(row["unit"]["active_state"], "active", "{row}");
        assert_eq!(
            row["socket"],
            sup.state
                .join(slug)
                .join("dashboard.sock")
                .display()
                .to_string()
        );
        assert_eq!(
            sup.url(slug),
            format!("http://{addr}/repos/{slug}/"),
            "dashboard_url"
        );
    }
    let (status, v) = get(addr, "/repos/beta/api/runtimes").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v[0]["slug"], "beta");
    let (_, page) = get(addr, "/").await;
    assert_eq!(page, Value::Null, "the page is HTML, not JSON");
    // `hf open`'s link: the page, for a registered repository only.
    let (status, kind, body) = get_text(addr, "/repos/beta/").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(kind.starts_with("text/html"), "{kind}");
    assert!(body.contains("<title>HydraFlow</title>"), "{body}");
    let (status, location, _) = get_text(addr, "/repos/beta").await;
    assert!(status.is_redirection(), "{status}");
    assert_eq!(location, "beta/");
    let (status, ghost) = get(addr, "/repos/ghost/").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{ghost}");
    assert_eq!(ghost["error"], "no repository \"ghost\" is registered");
    sup.stop();
}

/// The original client's `hf open` link, `dashboard_url`, in a real browser: the page loads
/// with that repository selected and its pipeline shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium: apt-get install chromium, then cargo test -- --include-ignored (.ci/run does both)"]
async fn headless_chromium_opens_a_repository_dashboard_url() {
    let sup = Supervised::start().await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut browser = Browser::launch(&tmp.path().join("profile")).await;
    browser.open(sup.url("beta")).await;
    browser
        .until(
            "beta selected in the repository table",
            r#"document.querySelector('tr.repo.selected')?.dataset.slug === 'beta'"#,
        )
        .await;
    browser
        .until(
            "beta's pipeline shown",
            r#"document.getElementById('selected').textContent === 'beta' && document.querySelectorAll('#pipeline .stage').length === 5"#,
        )
        .await;
    browser
        .until(
            "the WebSocket to be live",
            r#"document.getElementById('conn').textContent === 'live'"#,
        )
        .await;
    let rows = browser
        .eval(r#"[...document.querySelectorAll('tr.repo')].map(r => r.dataset.slug).join(',')"#)
        .await;
    assert_eq!(rows, Value::String("alpha,beta".into()));
    drop(browser);
    sup.stop();
}
