//! GitHub webhooks through the supervisor, end to end: `hydraflow
//! supervisor` (process backend) with two GitHub repositories, each on its
//! own fake GitHub, whose real workers poll once an hour (`octo-org/demo`)
//! and every second (`octo-org/other`). Signed deliveries of every kind
//! HydraFlow uses, sent to the dashboard's `/github/webhook`, wake the
//! right worker (the issue's triage starts within 2 s); bad deliveries
//! (wrong or missing signature, a replayed delivery id, a 30 MB body, an
//! unknown repository) are answered as they should be and wake nobody; a
//! burst of 1,000 deliveries is absorbed with few wake-ups and the other
//! repository's delivery among them is not lost; a worker that receives
//! deliveries slows its polling to `github.fallback_poll_interval`;
//! `hydraflow webhook test` and `hydraflow repo list` (identity, budget).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http::StatusCode;
use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use super::fake_github::{FakeGithub, TOKEN};
use super::util::HANG_GUARD;
use hydraflow::dashboard::webhook::signature;

const SECRET: &str = "a webhook secret for the tests";

/// Triage writes a marker and asks for more information (the issue is
/// parked: nothing more happens).
const AGENT: &str = r#"#!/bin/sh
cat > /dev/null
case "$1" in
  triage)
    touch "$HYDRAFLOW_TEST_DIR/triage-$2"
    echo '{"ready": false, "reasons": ["say more"]}'
    ;;
esac
"#;

/// The supervisor, its two fakes and where things are.
struct Hooked {
    tmp: tempfile::TempDir,
    config: PathBuf,
    demo: FakeGithub,
    other: FakeGithub,
    daemon: Child,
    dashboard: SocketAddr,
}

impl Drop for Hooked {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.daemon.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let started = Instant::now();
        while started.elapsed() < HANG_GUARD {
            if self.daemon.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// GET listings of the fake: each poll lists every pipeline label once.
fn listings(fake: &FakeGithub) -> usize {
    fake.state()
        .log
        .iter()
        .filter(|l| l.method == "GET" && l.path.contains("/issues?"))
        .count()
}

/// Listings per poll: one per pipeline label (find, plan, ready, review, hitl, hitl-active).
const LISTINGS_PER_POLL: usize = 6;

/// The fake's listings once a second has passed without one (the poll under way is over).
async fn settled(fake: &FakeGithub) -> usize {
    let mut last = listings(fake);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = listings(fake);
        if now == last {
            return now;
        }
        last = now;
    }
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < HANG_GUARD,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Hooked {
    async fn start() -> Hooked {
        let (demo, other) = (FakeGithub::start().await, FakeGithub::start().await);
        for fake in [&demo, &other] {
            fake.state().collaborators.insert("alice".into());
        }
        // The second fake serves its repository as octo-org/other.
        std::os::unix::fs::symlink(
            &other.bare,
            other.bare.parent().expect("owner dir").join("other.git"),
        )
        .expect("symlink");
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let agent = dir.join("agent.sh");
        std::fs::write(&agent, AGENT).expect("agent");
        std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::write(dir.join("webhook-secret"), format!("{SECRET}\n")).expect("secret");
        let repos = dir.join("repos");
        std::fs::create_dir_all(&repos).expect("repos dir");
        std::fs::write(
            repos.join("octo-org-other.toml"),
            format!(
                "repo = \"octo-org/other\"\nforge = \"github\"\ndata_poll_interval = 1\n\
                 [github]\napi_url = {:?}\nweb_url = {:?}\n",
                other.api_url(),
                other.web_url()
            ),
        )
        .expect("instance file");
        let config = dir.join("supervisor.toml");
        std::fs::write(
            &config,
            format!(
                "repos_dir = {repos:?}\npoll_interval = 1\ndata_poll_interval = 3600\n\
                 [github]\napi_url = {api:?}\nweb_url = {web:?}\nmax_retry_wait = 5\n\
                 fallback_poll_interval = 1800\n\
                 [agent]\npreset = \"command\"\ncommand = [{agent:?}, \"{{{{stage}}}}\", \"{{{{issue}}}}\"]\n\
                 output = \"plain\"\n[agent.env]\nHYDRAFLOW_TEST_DIR = {dir:?}\n\
                 [supervisor]\nlisten = \"127.0.0.1:0\"\nbackend = \"process\"\nstate_dir = {state:?}\n\
                 [dashboard]\nlisten = \"127.0.0.1:0\"\ntoken = \"dashboard-token\"\n\
                 [webhook]\nsecret_file = {secret:?}\n",
                repos = repos.display().to_string(),
                api = demo.api_url(),
                web = demo.web_url(),
                agent = agent.display().to_string(),
                dir = dir.display().to_string(),
                state = dir.join("state").display().to_string(),
                secret = dir.join("webhook-secret").display().to_string(),
            ),
        )
        .expect("config");
        let daemon = hydraflow(&config)
            .arg("supervisor")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the supervisor");
        let port_file = dir.join("state").join("supervisor-port");
        until("the supervisor's port file", || port_file.exists()).await;
        let mut dashboard = None;
        for repo in ["octo-org/demo", "octo-org/other"] {
            let out = hydraflow(&config)
                .args(["repo", "add", repo])
                .output()
                .expect("repo add");
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "repo add {repo}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let url = stdout
                .split("; ")
                .find_map(|f| f.strip_prefix("dashboard: "))
                .unwrap_or_else(|| panic!("no dashboard url in {stdout:?}"));
            dashboard = url
                .strip_prefix("http://")
                .and_then(|rest| rest.split('/').next())
                .and_then(|a| a.parse().ok());
        }
        let hooked = Hooked {
            tmp,
            config,
            demo,
            other,
            daemon,
            dashboard: dashboard.expect("the dashboard's address"),
        };
        until("both workers' first polls", || {
            listings(&hooked.demo) > 0 && listings(&hooked.other) > 0
        })
        .await;
        hooked
    }

    fn marker(&self, issue: u64) -> PathBuf {
        self.tmp.path().join(format!("triage-{issue}"))
    }
}

/// The binary with the supervisor's configuration and the token, nothing else of the caller's.
pub(crate) fn hydraflow(config: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hydraflow"));
    for (k, _) in std::env::vars() {
        if k.starts_with("HYDRAFLOW_")
            || k.starts_with("WATCHDOG_")
            || [
                "GH_TOKEN",
                "GITHUB_TOKEN",
                "CREDENTIALS_DIRECTORY",
                "NOTIFY_SOCKET",
                "JOURNAL_STREAM",
                "HF_SUPERVISOR_PORT_FILE",
                "LISTEN_FDS",
                "LISTEN_PID",
            ]
            .contains(&k.as_str())
        {
            cmd.env_remove(k);
        }
    }
    cmd.env("HYDRAFLOW_CONFIG", config)
        .env("HYDRAFLOW_GH_TOKEN", TOKEN)
        .env("HYDRAFLOW_LOG", "info");
    cmd
}

/// One delivery as GitHub sends it: `POST /github/webhook` with the event,
/// delivery id and (when given) signature headers; the status and JSON answer.
async fn deliver(
    addr: SocketAddr,
    event: &str,
    id: &str,
    body: Vec<u8>,
    signature: Option<String>,
) -> (StatusCode, Value) {
    let work = async {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let mut req = http::Request::post("/github/webhook")
            .header("host", "hooks.example.org")
            .header("content-type", "application/json")
            .header("user-agent", "GitHub-Hookshot/test")
            .header("x-github-event", event)
            .header("x-github-delivery", id)
            .header("x-github-hook-id", "1");
        if let Some(sig) = signature {
            req = req.header("x-hub-signature-256", sig);
        }
        let req = req.body(axum::body::Body::from(body)).expect("request");
        let resp = tx.send_request(req).await.expect("response");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    };
    tokio::time::timeout(HANG_GUARD, work)
        .await
        .unwrap_or_else(|_| panic!("delivery {id} hung"))
}

/// A bad delivery: what it is, its id, body and signature, and the status it must get.
type BadCase = (
    &'static str,
    &'static str,
    Vec<u8>,
    Option<String>,
    StatusCode,
);

/// `GET path` without credentials: the status.
async fn get_status(addr: SocketAddr, path: &str) -> StatusCode {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "localhost")
        .body(axum::body::Body::empty())
        .expect("request");
    tokio::time::timeout(HANG_GUARD, tx.send_request(req))
        .await
        .expect("GET hung")
        .expect("response")
        .status()
}

/// `GET path` with the dashboard's token: the JSON answer.
async fn get_json(addr: SocketAddr, path: &str, token: &str) -> Value {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", "localhost")
        .header("authorization", format!("Bearer {token}"))
        .body(axum::body::Body::empty())
        .expect("request");
    let resp = tokio::time::timeout(HANG_GUARD, tx.send_request(req))
        .await
        .expect("GET hung")
        .expect("response");
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    serde_json::from_slice(&bytes).expect("JSON")
}

/// A payload of `event` for `repo`, in the shape GitHub documents for it
/// (docs.github.com, "Webhook events and payloads"; only the fields read
/// here and a few around them).
fn payload(event: &str, repo: &str) -> Vec<u8> {
    let repository =
        json!({"id": 1, "name": repo.split('/').nth(1), "full_name": repo, "private": true});
    let sender = json!({"login": "alice", "id": 1, "type": "User"});
    let body = match event {
        "issues" => {
            json!({"action": "opened", "issue": {"number": 1, "title": "Add a file"}, "repository": repository, "sender": sender})
        }
        "issue_comment" => {
            json!({"action": "created", "issue": {"number": 1}, "comment": {"id": 1, "body": "more"}, "repository": repository, "sender": sender})
        }
        "pull_request" => {
            json!({"action": "closed", "number": 2, "pull_request": {"number": 2, "merged": false}, "repository": repository, "sender": sender})
        }
        "pull_request_review" => {
            json!({"action": "submitted", "review": {"id": 1, "state": "approved"}, "pull_request": {"number": 2}, "repository": repository, "sender": sender})
        }
        "check_suite" => {
            json!({"action": "completed", "check_suite": {"id": 1, "head_sha": "abc", "conclusion": "success"}, "repository": repository, "sender": sender})
        }
        "check_run" => {
            json!({"action": "completed", "check_run": {"id": 1, "head_sha": "abc", "status": "completed", "conclusion": "failure"}, "repository": repository, "sender": sender})
        }
        "label" => {
            json!({"action": "created", "label": {"name": "hydraflow-find"}, "repository": repository, "sender": sender})
        }
        other => panic!("no payload for {other}"),
    };
    body.to_string().into_bytes()
}

fn signed(body: &[u8]) -> Option<String> {
    Some(signature(SECRET.as_bytes(), body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_deliveries_wake_the_right_worker() {
    let h = Hooked::start().await;
    let addr = h.dashboard;

    // The webhook route, signed, needs no token and no local caller's
    // rights (GitHub is neither). The dashboard's own routes let a loopback
    // caller in by its UID, here the supervisor's own user; whom they refuse
    // is `access::` tests' business (other local users) and
    // `dashboard_supervisor`'s (non-loopback callers without the token).
    let (status, _) = deliver(addr, "ping", "ping-0", b"{}".to_vec(), signed(b"{}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(get_status(addr, "/api/repos").await, StatusCode::OK);

    // `other` polls every second until a delivery arrives, then every
    // github.fallback_poll_interval (1800 s).
    let before = listings(&h.other);
    until("other's polling at data_poll_interval", || {
        listings(&h.other) >= before + 2 * LISTINGS_PER_POLL
    })
    .await;
    let body = payload("label", "octo-org/other");
    let (status, answer) = deliver(addr, "label", "other-1", body.clone(), signed(&body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["slug"], "octo-org-other");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let slowed = listings(&h.other);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        listings(&h.other),
        slowed,
        "polling slowed down to the fallback interval"
    );

    // An issue filed on GitHub: its `issues` delivery starts the triage within 2 s.
    h.demo.add_issue("Add a file", "alice", &["hydraflow-find"]);
    let body = payload("issues", "octo-org/demo");
    let sent = Instant::now();
    let (status, answer) = deliver(addr, "issues", "demo-1", body.clone(), signed(&body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["slug"], "octo-org-demo");
    until("the triage of #1", || h.marker(1).exists()).await;
    let took = sent.elapsed();
    println!("triage started {took:?} after the delivery (polling set to an hour)");
    assert!(took <= Duration::from_secs(2), "{took:?}");
    assert_eq!(listings(&h.other), slowed, "the other worker was not woken");

    // Every other kind wakes the demo worker (a poll), and only it.
    for (n, event) in [
        "issue_comment",
        "pull_request",
        "pull_request_review",
        "check_suite",
        "check_run",
        "label",
    ]
    .iter()
    .enumerate()
    {
        let polled = listings(&h.demo);
        let body = payload(event, "octo-org/demo");
        let id = format!("demo-kind-{n}");
        let (status, answer) = deliver(addr, event, &id, body.clone(), signed(&body)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{event}: {answer}");
        until(&format!("a poll after the {event} delivery"), || {
            listings(&h.demo) > polled
        })
        .await;
    }
    assert_eq!(listings(&h.other), slowed, "the other worker was not woken");

    // Bad deliveries: each answered, none wakes anyone.
    let (demo_polls, other_polls) = (settled(&h.demo).await, listings(&h.other));
    let body = payload("issues", "octo-org/demo");
    let wrong = Some(signature(b"not the secret", &body));
    let cases: [BadCase; 4] = [
        (
            "wrong signature",
            "bad-1",
            body.clone(),
            wrong,
            StatusCode::UNAUTHORIZED,
        ),
        (
            "no signature",
            "bad-2",
            body.clone(),
            None,
            StatusCode::UNAUTHORIZED,
        ),
        (
            "a replayed delivery id",
            "demo-1",
            body.clone(),
            signed(&body),
            StatusCode::CONFLICT,
        ),
        (
            "an unknown repository",
            "bad-3",
            payload("issues", "someone/else"),
            signed(&payload("issues", "someone/else")),
            StatusCode::ACCEPTED,
        ),
    ];
    for (what, id, body, sig, expected) in cases {
        let (status, answer) = deliver(addr, "issues", id, body, sig).await;
        assert_eq!(status, expected, "{what}: {answer}");
        if expected == StatusCode::ACCEPTED {
            assert_eq!(answer["ignored"], "someone/else is not registered here");
        } else {
            assert!(
                answer["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{what}: {answer}"
            );
        }
    }
    // 30 MB, signed: over GitHub's 25 MB cap.
    let mut big = br#"{"repository":{"full_name":"octo-org/demo"},"padding":""#.to_vec();
    big.resize(30 * 1024 * 1024, b'x');
    big.extend_from_slice(b"\"}");
    let sig = signed(&big);
    let (status, answer) = deliver(addr, "issues", "bad-4", big, sig).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        (listings(&h.demo), listings(&h.other)),
        (demo_polls, other_polls),
        "bad deliveries woke nobody"
    );

    // A burst of 1,000 deliveries for demo, with one for other among them.
    let started = Instant::now();
    let mut sends = tokio::task::JoinSet::new();
    let mut statuses = Vec::new();
    for n in 0..1000u32 {
        let (repo, id) = if n == 500 {
            ("octo-org/other", "burst-other".to_owned())
        } else {
            ("octo-org/demo", format!("burst-{n}"))
        };
        let body = payload("issue_comment", repo);
        let sig = signed(&body);
        sends.spawn(async move { deliver(addr, "issue_comment", &id, body, sig).await.0 });
        // At most 50 connections at a time.
        while sends.len() >= 50 {
            statuses.push(
                sends
                    .join_next()
                    .await
                    .expect("a task")
                    .expect("delivery task"),
            );
        }
    }
    while let Some(done) = sends.join_next().await {
        statuses.push(done.expect("delivery task"));
    }
    println!("1,000 deliveries answered in {:?}", started.elapsed());
    assert_eq!(statuses.len(), 1000);
    assert!(
        statuses.iter().all(|s| *s == StatusCode::ACCEPTED),
        "every delivery of the burst was accepted"
    );
    until("the other repository's delivery to wake its worker", || {
        listings(&h.other) > other_polls
    })
    .await;
    until("the demo worker to be woken", || {
        listings(&h.demo) > demo_polls
    })
    .await;
    let polls = (settled(&h.demo).await - demo_polls) / LISTINGS_PER_POLL;
    println!("the burst caused {polls} polls of the demo worker");
    assert!(
        (1..=20).contains(&polls),
        "the wake-ups were coalesced: {polls} polls for 999 deliveries"
    );

    // `hydraflow webhook test` through the same endpoint.
    let out = hydraflow(&h.config)
        .args(["webhook", "test", "--repo", "octo-org/demo", "--url"])
        .arg(format!("http://{addr}/github/webhook"))
        .output()
        .expect("webhook test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("answered the signed ping")
            && stdout.contains("wake the worker of octo-org-demo"),
        "{stdout}"
    );
    let bad = hydraflow(&h.config)
        .args(["webhook", "test", "--secret-file"])
        .arg(h.tmp.path().join("agent.sh"))
        .arg("--url")
        .arg(format!("http://{addr}/github/webhook"))
        .output()
        .expect("webhook test with a wrong secret");
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    // The dashboard's rows carry each worker's forge: identity and budget.
    let repos = get_json(addr, "/api/repos", "dashboard-token").await;
    for slug in ["octo-org-demo", "octo-org-other"] {
        let row = repos["repos"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["slug"] == slug))
            .unwrap_or_else(|| panic!("no {slug} in {repos}"));
        let forge = &row["worker"]["health"]["runtimes"][0]["forge"];
        assert_eq!(forge["name"], "github", "{row}");
        assert_eq!(forge["identity"], "token", "{row}");
        assert_eq!(forge["budget"]["limit"], 5000, "{row}");
        assert_eq!(forge["budget"]["reset_at"], 4_102_444_800u64, "{row}");
    }

    // `repo list`: each worker's identity, budget and reset time.
    let out = hydraflow(&h.config)
        .args(["repo", "list"])
        .output()
        .expect("repo list");
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{list}");
    let header = list.lines().next().expect("header");
    for column in ["IDENTITY", "BUDGET", "RESETS"] {
        assert!(header.contains(column), "{list}");
    }
    for slug in ["octo-org-demo", "octo-org-other"] {
        let row = list
            .lines()
            .find(|l| l.starts_with(slug))
            .unwrap_or_else(|| panic!("no {slug} in {list}"));
        assert!(row.contains(" token "), "{row}");
        assert!(row.contains("/5000"), "{row}");
        assert!(row.contains("2100-01-01 00:00:00Z"), "{row}");
    }
}
