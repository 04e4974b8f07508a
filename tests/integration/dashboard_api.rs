//! The worker API over its Unix socket, against a running worker with the
//! local forge: every route, bad input (unknown routes and slugs, malformed
//! JSON, a correction for an issue not in HITL), a WebSocket client that
//! never reads, the socket's mode, and a correction posted through the API
//! that takes the issue to merged.

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use futures_util::StreamExt as _;
use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::util::Project;
use crate::util_dashboard::{RunningWorker, call, until};

/// Issue 1 goes through; issue 2's first implementation commits nothing
/// (escalated to HITL) and its HITL run needs the correction.
const AGENT: &str = r#"#!/bin/sh
stage="$1"; issue="$2"
prompt=$(cat)
case "$stage" in
  triage) echo '{"ready": true, "reasons": ["ok"], "issue_type": "feature", "clarity_score": 8, "complexity_score": 2, "needs_discovery": false, "already_addressed": false}' ;;
  plan) printf 'PLAN_START\nWrite file-%s.txt.\nSUMMARY: add it\nPLAN_END\n' "$issue" ;;
  implement)
    if [ "$issue" = 2 ]; then echo "not sure"; exit 0; fi
    echo "content $issue" > "file-$issue.txt"; git add -A && git commit -q -m "implement #$issue" ;;
  hitl)
    case "$prompt" in *"use upper case"*) ;; *) exit 9;; esac
    echo "CONTENT $issue" > "file-$issue.txt"; git add -A && git commit -q -m "correct #$issue" ;;
  review) echo "VERDICT: APPROVE"; echo "SUMMARY: fine" ;;
esac
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_api_over_its_unix_socket() {
    let p = Project::new(AGENT, "");
    p.add_issue("Add file 1", "please");
    p.add_issue("Add file 2", "please");
    let mut worker = RunningWorker::start(&p, "repo", &[]);
    let sock = worker.socket.clone();
    let mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "only the owner may connect");

    // A client that never reads must not stall anything below.
    let _silent = hydraflow::dashboard::client::events(&sock, "since=0", Duration::from_secs(20))
        .await
        .expect("silent client");
    let mut ws = hydraflow::dashboard::client::events(&sock, "since=0", Duration::from_secs(20))
        .await
        .expect("ws");

    until("issue 2 to wait for a human", || async {
        let (_, v) = call(&sock, Method::GET, "/api/hitl", None).await;
        v.as_array()
            .is_some_and(|a| a.iter().any(|r| r["issue"] == 2))
    })
    .await;
    until("issue 1 to be merged", || async {
        let (_, v) = call(&sock, Method::GET, "/api/state", None).await;
        v["issues"]["1"]["phase"]["outcome"].is_string()
    })
    .await;

    let check = async |method: Method,
                       path: &str,
                       body: Option<Value>,
                       status: StatusCode,
                       probe: &str,
                       expected: Value| {
        let (got, v) = call(&sock, method.clone(), path, body).await;
        assert_eq!(got, status, "{method} {path}: {v}");
        let at = v.pointer(probe).cloned().unwrap_or(Value::Null);
        assert_eq!(at, expected, "{method} {path} at {probe}: {v}");
    };
    let ok = StatusCode::OK;
    let get = Method::GET;
    let post = Method::POST;
    check(get.clone(), "/healthz", None, ok, "/status", json!("ok")).await;
    check(get.clone(), "/healthz", None, ok, "/ready", json!(true)).await;
    check(
        get.clone(),
        "/healthz",
        None,
        ok,
        "/runtimes/0/slug",
        json!("repo"),
    )
    .await;
    check(
        get.clone(),
        "/healthz",
        None,
        ok,
        "/checks/orchestrator:repo/ok",
        json!(true),
    )
    .await;
    check(
        get.clone(),
        "/healthz",
        None,
        ok,
        "/runtimes/0/hitl_waiting",
        json!(1),
    )
    .await;
    check(
        get.clone(),
        "/api/state",
        None,
        ok,
        "/issues/2/phase/hitl/origin",
        json!("hydraflow-ready"),
    )
    .await;
    check(
        get.clone(),
        "/api/state?repo=repo",
        None,
        ok,
        "/schema_version",
        json!(hydraflow::store::state::SCHEMA_VERSION),
    )
    .await;
    check(
        get.clone(),
        "/api/pipeline",
        None,
        ok,
        "/hitl_waiting/0/number",
        json!(2),
    )
    .await;
    check(
        get.clone(),
        "/api/pipeline",
        None,
        ok,
        "/hitl_waiting/0/title",
        json!("Add file 2"),
    )
    .await;
    check(
        get.clone(),
        "/api/pipeline",
        None,
        ok,
        "/stages/triage",
        json!([]),
    )
    .await;
    check(
        get.clone(),
        "/api/events?since=0",
        None,
        ok,
        "/0/type",
        json!("session_start"),
    )
    .await;
    check(
        get.clone(),
        "/api/events?since=999999",
        None,
        ok,
        "",
        json!([]),
    )
    .await;
    check(
        get.clone(),
        "/api/sessions",
        None,
        ok,
        "/0/repo",
        json!("repo"),
    )
    .await;
    check(
        get.clone(),
        "/api/costs",
        None,
        ok,
        "/daily_budget_usd",
        json!(null),
    )
    .await;
    check(
        get.clone(),
        "/api/runtimes",
        None,
        ok,
        "/0/slug",
        json!("repo"),
    )
    .await;
    check(
        get.clone(),
        "/api/runtimes/repo",
        None,
        ok,
        "/running",
        json!(true),
    )
    .await;
    check(get.clone(), "/api/hitl", None, ok, "/0/issue", json!(2)).await;
    // Bad input: clear JSON errors.
    let not_found = StatusCode::NOT_FOUND;
    let bad = StatusCode::BAD_REQUEST;
    check(
        get.clone(),
        "/api/runtimes/other",
        None,
        not_found,
        "/error",
        json!("no repository \"other\" here"),
    )
    .await;
    check(
        get.clone(),
        "/api/state?repo=other",
        None,
        not_found,
        "/error",
        json!("no repository \"other\" here"),
    )
    .await;
    check(
        post.clone(),
        "/api/runtimes/other/stop",
        None,
        not_found,
        "/error",
        json!("no repository \"other\" here"),
    )
    .await;
    check(
        get.clone(),
        "/api/nope",
        None,
        not_found,
        "/error",
        json!("no route for /api/nope"),
    )
    .await;
    check(
        get.clone(),
        "/api/hitl/2/correct",
        None,
        StatusCode::METHOD_NOT_ALLOWED,
        "/error",
        json!("GET is not allowed on /api/hitl/2/correct"),
    )
    .await;
    check(
        get.clone(),
        "/api/events?since=soon",
        None,
        bad,
        "/error",
        json!("Failed to deserialize query string: since: invalid digit found in string"),
    )
    .await;
    check(
        post.clone(),
        "/api/hitl/1/correct",
        Some(json!({"correction": "x"})),
        StatusCode::CONFLICT,
        "/error",
        json!("issue #1 is not waiting for a human: see `hydraflow hitl list`"),
    )
    .await;
    check(
        post.clone(),
        "/api/hitl/7/skip",
        None,
        StatusCode::CONFLICT,
        "/error",
        json!("issue #7 is not waiting for a human: see `hydraflow hitl list`"),
    )
    .await;
    check(post.clone(), "/api/hitl/2/correct", Some(json!({"text": "x"})), bad, "/error", json!("Failed to deserialize the JSON body into the target type: missing field `correction` at line 1 column 12")).await;
    check(
        post.clone(),
        "/api/hitl/2/correct",
        Some(json!({"correction": " "})),
        bad,
        "/error",
        json!("the correction is empty: say what the agent should do differently"),
    )
    .await;
    check(
        post.clone(),
        "/api/hitl/two/skip",
        None,
        bad,
        "/error",
        json!("Invalid URL: Cannot parse `two` to a `u64`"),
    )
    .await;
    // Malformed JSON (not expressible as a Value): sent raw.
    let raw = http::Request::post("/api/hitl/2/correct")
        .header("content-type", "application/json")
        .body(axum::body::Body::from("{\"correction\": "))
        .expect("request");
    let resp = hydraflow::dashboard::client::send(&sock, raw, Duration::from_secs(20))
        .await
        .expect("send");
    assert_eq!(resp.status(), bad);

    // Nothing above changed the state: issue 2 still waits, no spool file.
    assert_eq!(p.state().issues[&2].pending_hitl(), None);

    // The correction, through the same spool as the CLI.
    check(
        post.clone(),
        "/api/hitl/2/correct",
        Some(json!({"correction": "use upper case"})),
        ok,
        "/accepted",
        json!(true),
    )
    .await;
    until("issue 2 to be merged after the correction", || async {
        let (_, v) = call(&sock, Method::GET, "/api/state", None).await;
        v["issues"]["2"]["phase"]["outcome"].is_string()
    })
    .await;
    assert_eq!(p.main_file("file-2.txt").as_deref(), Some("CONTENT 2\n"));

    // The WebSocket gave history then live events, the correction among them.
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|e: &Value| e["type"] == "hitl_update" && e["data"]["issue"] == 2)
    {
        let frame = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("an event within the guard")
            .expect("stream open")
            .expect("frame");
        if let tokio_tungstenite::tungstenite::Message::Text(t) = frame {
            seen.push(serde_json::from_str(&t).expect("event JSON"));
        }
    }
    assert_eq!(seen[0]["type"], "session_start");
    let ids: Vec<u64> = seen.iter().filter_map(|e| e["id"].as_u64()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");

    // Stop and start the runtime through the API; the process stays up.
    check(
        post.clone(),
        "/api/runtimes/repo/stop",
        None,
        ok,
        "/running",
        json!(false),
    )
    .await;
    check(
        get.clone(),
        "/healthz",
        None,
        StatusCode::SERVICE_UNAVAILABLE,
        "/status",
        json!("stopped"),
    )
    .await;
    check(
        post.clone(),
        "/api/runtimes/repo/start",
        None,
        ok,
        "/running",
        json!(true),
    )
    .await;
    check(get.clone(), "/healthz", None, ok, "/ready", json!(true)).await;

    assert!(worker.stop(), "the worker exits cleanly on SIGTERM");
    assert!(!sock.exists(), "the socket is removed at exit");
}
