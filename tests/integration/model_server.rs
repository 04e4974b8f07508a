//! A scripted model API on loopback for the real agent CLIs: the Anthropic
//! Messages API (`POST /v1/messages`, which Claude Code calls with
//! `stream: true` after `HEAD /api/hello`) and the OpenAI Responses API
//! (`POST /v1/responses`, Codex with `wire_api = "responses"`), both as
//! server-sent events.
//!
//! Streams, as the providers document them (Anthropic "Streaming messages":
//! `message_start`, `ping`, `content_block_start` / `content_block_delta`
//! (`text_delta`, or `input_json_delta` whose first `partial_json` is empty,
//! for a `tool_use` block with a `toolu_` id) / `content_block_stop`,
//! `message_delta` with `stop_reason` and `usage`, `message_stop`; OpenAI
//! "Responses streaming events": `response.created`, `response.in_progress`,
//! `response.output_item.added`, `response.content_part.added`,
//! `response.output_text.delta` / `.done`, `response.content_part.done`,
//! `response.function_call_arguments.delta` / `.done`,
//! `response.output_item.done`, `response.completed` with `usage`, each with
//! a `sequence_number`). Errors are the providers' JSON error bodies
//! (`{"type": "error", "error": {"type", "message"}}`; `{"error": {"type",
//! "code", "message"}}`) with `retry-after` on a 429.
//!
//! A [`Script`] answers each request: the first [`Turn`] whose `when` text
//! appears in the request's user text (never in tool results) runs its shell
//! commands one per request — as Claude Code's `Bash` tool or Codex's
//! `exec_command` function — then answers `answer`. Which step a request is
//! at is the number of tool results it carries. Requests no turn matches
//! (Claude Code's own side requests) get a short text. Faults are injected
//! per request ([`ModelServer::fail_next`]) or until cleared
//! ([`ModelServer::set_outage`]).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{any, post};
use serde_json::{Value, json};

/// A tool call the model makes.
#[derive(Debug, Clone)]
pub enum Action {
    /// Run a shell command (Claude Code's `Bash`, Codex's `exec_command`).
    Shell(String),
    /// Write a file, relative to the agent's working directory (Claude
    /// Code's `Write` with the absolute path; Codex's `exec_command` with printf).
    Write(String, String),
}

/// One scripted exchange: tool calls, then the answer.
#[derive(Debug, Clone)]
pub struct Turn {
    /// Texts that must all appear in the request's user text.
    pub when: Vec<String>,
    /// Tool calls the model makes, one per request.
    pub actions: Vec<Action>,
    /// The final answer.
    pub answer: String,
}

impl Turn {
    /// A turn matching `when`.
    pub fn new(when: &str, actions: Vec<Action>, answer: &str) -> Turn {
        Turn::all(&[when], actions, answer)
    }

    /// A turn matching requests that contain every text of `when`.
    pub fn all(when: &[&str], actions: Vec<Action>, answer: &str) -> Turn {
        Turn {
            when: when.iter().map(|w| (*w).to_string()).collect(),
            actions,
            answer: answer.into(),
        }
    }
}

/// The turns, in order of precedence.
pub type Script = Vec<Turn>;

/// An injected failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// An error status with the provider's error body (429 gets `retry-after: 1`).
    Status(u16),
    /// 200, the first event, then the connection is dropped mid-stream.
    Cut,
}

/// What one request asked for.
#[derive(Debug, Clone)]
pub struct Request {
    /// `anthropic` or `openai`.
    pub api: &'static str,
    /// The model named in the request.
    pub model: String,
    /// The fault it got, if any.
    pub fault: Option<Fault>,
}

#[derive(Default)]
struct Inner {
    script: Script,
    faults: VecDeque<Fault>,
    outage: Option<Fault>,
    requests: Vec<Request>,
    /// A key the server requires (401 otherwise), when set.
    key: Option<String>,
}

type Shared = Arc<Mutex<Inner>>;

/// The server, on its own thread and runtime (tests block their own);
/// stopped on drop.
pub struct ModelServer {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    inner: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ModelServer {
    /// Start answering with `script`.
    pub fn start(script: Script) -> ModelServer {
        ModelServer::start_in(script, None)
    }

    /// Start answering with `script` on the loopback of the network
    /// namespace `netns` (e.g. `/proc/<pid>/ns/net` of a container's init;
    /// needs root): the server's thread joins it before binding.
    pub fn start_in(script: Script, netns: Option<std::path::PathBuf>) -> ModelServer {
        let inner: Shared = Arc::new(Mutex::new(Inner {
            script,
            ..Inner::default()
        }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel::<SocketAddr>();
        let state = Arc::clone(&inner);
        let thread = std::thread::spawn(move || {
            if let Some(ns) = netns {
                let fd = std::fs::File::open(&ns).expect("open the network namespace");
                nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("join the network namespace");
            }
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("model server runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind the model server");
                addr_tx
                    .send(listener.local_addr().expect("address"))
                    .expect("send the address");
                let app = Router::new()
                    .route("/v1/messages", post(anthropic))
                    .route("/v1/responses", post(openai))
                    .fallback(any(other))
                    .with_state(state);
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        let addr = addr_rx.recv().expect("the model server's address");
        ModelServer {
            url: format!("http://{addr}"),
            inner,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next `n` model requests get `fault`.
    pub fn fail_next(&self, n: usize, fault: Fault) {
        let mut inner = self.lock();
        for _ in 0..n {
            inner.faults.push_back(fault.clone());
        }
    }

    /// Every model request gets `fault` until this is called with `None`.
    pub fn set_outage(&self, fault: Option<Fault>) {
        self.lock().outage = fault;
    }

    /// Require this key (`x-api-key` or `Authorization: Bearer`); others get 401.
    pub fn require_key(&self, key: Option<&str>) {
        self.lock().key = key.map(str::to_string);
    }

    /// Every model request so far.
    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `HEAD /api/hello` (Claude Code's reachability check) and anything else.
async fn other() -> StatusCode {
    StatusCode::OK
}

/// Text of the user's messages (not tool results) of an Anthropic request,
/// and the number of tool results.
fn anthropic_request(body: &Value) -> (String, usize) {
    let mut text = String::new();
    let mut results = 0;
    for message in body["messages"].as_array().into_iter().flatten() {
        if message["role"] != "user" {
            continue;
        }
        match &message["content"] {
            Value::String(s) => text.push_str(s),
            Value::Array(blocks) => {
                for b in blocks {
                    match b["type"].as_str() {
                        Some("text") => text.push_str(b["text"].as_str().unwrap_or("")),
                        Some("tool_result") => results += 1,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    (text, results)
}

/// The same for an OpenAI Responses request (`input` items).
fn openai_request(body: &Value) -> (String, usize) {
    let mut text = String::new();
    let mut results = 0;
    for item in body["input"].as_array().into_iter().flatten() {
        match item["type"].as_str() {
            Some("function_call_output") | Some("custom_tool_call_output") => results += 1,
            Some("message") if item["role"] == "user" => {
                for part in item["content"].as_array().into_iter().flatten() {
                    text.push_str(part["text"].as_str().unwrap_or(""));
                }
            }
            _ => {}
        }
    }
    (text, results)
}

/// What to answer: a fault, or the action at this step.
enum Answer {
    Fault(Fault),
    Tool(Action),
    Text(String),
}

fn decide(
    state: &Shared,
    api: &'static str,
    headers: &HeaderMap,
    body: &Value,
    text: &str,
    step: usize,
) -> Answer {
    let mut inner = state.lock().unwrap_or_else(|p| p.into_inner());
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| {
            headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_string)
        })
        .unwrap_or_default();
    let turn = inner
        .script
        .iter()
        .position(|t| t.when.iter().all(|w| text.contains(w.as_str())));
    let wrong_key = inner.key.as_ref().is_some_and(|k| *k != key);
    let fault = if wrong_key {
        Some(Fault::Status(401))
    } else {
        inner.faults.pop_front().or_else(|| inner.outage.clone())
    };
    inner.requests.push(Request {
        api,
        model: body["model"].as_str().unwrap_or("").to_string(),
        fault: fault.clone(),
    });
    if let Some(f) = fault {
        return Answer::Fault(f);
    }
    match turn.map(|i| &inner.script[i]) {
        Some(t) if step < t.actions.len() => Answer::Tool(t.actions[step].clone()),
        Some(t) => Answer::Text(t.answer.clone()),
        None => Answer::Text("OK".into()),
    }
}

/// The agent's working directory, from Claude Code's environment section
/// ("Primary working directory: /path").
fn working_directory(body: &Value) -> String {
    let text = body.to_string();
    text.split("Primary working directory: ")
        .nth(1)
        .and_then(|rest| rest.split("\\n").next())
        .unwrap_or(".")
        .trim()
        .to_string()
}

/// An SSE body: `event:` and `data:` lines per event.
fn sse(events: &[(&str, Value)]) -> String {
    events
        .iter()
        .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
        .collect()
}

fn stream_response(text: String) -> Response {
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from(text))
        .expect("response")
}

/// 200 with the first event, then the connection drops.
fn cut_response(first: String) -> Response {
    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::from(first)),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "scripted cut",
        )),
    ];
    Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .expect("response")
}

fn error_response(status: u16, body: Value) -> Response {
    let mut builder = Response::builder()
        .status(status)
        .header("content-type", "application/json");
    if status == 429 {
        builder = builder.header("retry-after", "1");
    }
    builder
        .body(Body::from(body.to_string()))
        .expect("response")
}

/// Split `s` into pieces of about `n` characters, as deltas arrive.
fn pieces(s: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    chars.chunks(n).map(|c| c.iter().collect()).collect()
}

async fn anthropic(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let (text, step) = anthropic_request(&body);
    let model = body["model"].as_str().unwrap_or("claude-test").to_string();
    let answer = decide(&state, "anthropic", &headers, &body, &text, step);
    let input_tokens = 1000 + 100 * step as u64;
    let start = json!({"type": "message_start", "message": {
        "id": format!("msg_{step:04}"), "type": "message", "role": "assistant", "model": model,
        "content": [], "stop_reason": null, "stop_sequence": null,
        "usage": {"input_tokens": input_tokens, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0, "output_tokens": 1}}});
    let (block, deltas, stop_reason) = match answer {
        Answer::Fault(Fault::Cut) => return cut_response(sse(&[("message_start", start)])),
        Answer::Fault(Fault::Status(code)) => {
            let kind = match code {
                400 => "invalid_request_error",
                401 => "authentication_error",
                403 => "permission_error",
                429 => "rate_limit_error",
                529 => "overloaded_error",
                _ => "api_error",
            };
            return error_response(
                code,
                json!({"type": "error", "error": {"type": kind, "message": format!("scripted {code}")},
                       "request_id": "req_scripted"}),
            );
        }
        Answer::Tool(action) => {
            let (name, input) = match action {
                Action::Shell(command) => (
                    "Bash",
                    json!({"command": command, "description": "Run a scripted command"}),
                ),
                Action::Write(path, content) => (
                    "Write",
                    json!({"file_path": format!("{}/{path}", working_directory(&body)), "content": content}),
                ),
            };
            let mut deltas = vec![json!({"type": "input_json_delta", "partial_json": ""})];
            deltas.extend(
                pieces(&input.to_string(), 40)
                    .into_iter()
                    .map(|p| json!({"type": "input_json_delta", "partial_json": p})),
            );
            (
                json!({"type": "tool_use", "id": format!("toolu_{step:04}"), "name": name, "input": {}}),
                deltas,
                "tool_use",
            )
        }
        Answer::Text(answer) => (
            json!({"type": "text", "text": ""}),
            pieces(&answer, 60)
                .into_iter()
                .map(|p| json!({"type": "text_delta", "text": p}))
                .collect(),
            "end_turn",
        ),
    };
    let mut events = vec![
        ("message_start", start),
        ("ping", json!({"type": "ping"})),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": block}),
        ),
    ];
    for d in deltas {
        events.push((
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": d}),
        ));
    }
    events.push((
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push((
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null},
               "usage": {"output_tokens": 50}}),
    ));
    events.push(("message_stop", json!({"type": "message_stop"})));
    stream_response(sse(&events))
}

async fn openai(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let (text, step) = openai_request(&body);
    let model = body["model"].as_str().unwrap_or("gpt-test").to_string();
    let answer = decide(&state, "openai", &headers, &body, &text, step);
    let id = format!("resp_{step:04}");
    let response = |status: &str, output: Value, usage: Value| {
        json!({"id": id, "object": "response", "created_at": 1_767_225_600, "status": status,
               "model": model, "output": output, "usage": usage, "error": null,
               "incomplete_details": null, "parallel_tool_calls": true, "tool_choice": "auto", "tools": []})
    };
    let created = json!({"type": "response.created", "sequence_number": 0,
                         "response": response("in_progress", json!([]), Value::Null)});
    let item = match answer {
        Answer::Fault(Fault::Cut) => return cut_response(sse(&[("response.created", created)])),
        Answer::Fault(Fault::Status(code)) => {
            let (kind, message) = match code {
                401 => ("invalid_request_error", "Incorrect API key provided"),
                429 => ("rate_limit_exceeded", "Rate limit reached"),
                _ => ("server_error", "The server had an error"),
            };
            return error_response(
                code,
                json!({"error": {"type": kind, "code": kind, "message": format!("{message} (scripted {code})"), "param": null}}),
            );
        }
        Answer::Tool(action) => {
            let command = match action {
                Action::Shell(c) => c,
                Action::Write(path, content) => format!(
                    "printf '%s' '{}' > '{path}'",
                    content.replace('\'', "'\\''")
                ),
            };
            json!({"type": "function_call", "id": format!("fc_{step:04}"),
            "call_id": format!("call_{step:04}"), "name": "exec_command",
            "arguments": json!({"cmd": command}).to_string(), "status": "completed"})
        }
        Answer::Text(answer) => json!({"type": "message", "id": format!("msg_{step:04}"),
            "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": answer, "annotations": []}]}),
    };
    let mut events = vec![
        ("response.created", created),
        (
            "response.in_progress",
            json!({"type": "response.in_progress", "response": response("in_progress", json!([]), Value::Null)}),
        ),
    ];
    let item_id = item["id"].clone();
    if item["type"] == "function_call" {
        let mut added = item.clone();
        added["arguments"] = json!("");
        added["status"] = json!("in_progress");
        events.push((
            "response.output_item.added",
            json!({"type": "response.output_item.added", "output_index": 0, "item": added}),
        ));
        let args = item["arguments"].as_str().unwrap_or("").to_string();
        for p in pieces(&args, 40) {
            events.push((
                "response.function_call_arguments.delta",
                json!({"type": "response.function_call_arguments.delta", "item_id": item_id, "output_index": 0, "delta": p}),
            ));
        }
        events.push((
            "response.function_call_arguments.done",
            json!({"type": "response.function_call_arguments.done", "item_id": item_id, "output_index": 0, "arguments": args}),
        ));
    } else {
        let text = item["content"][0]["text"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let mut added = item.clone();
        added["content"] = json!([]);
        added["status"] = json!("in_progress");
        events.push((
            "response.output_item.added",
            json!({"type": "response.output_item.added", "output_index": 0, "item": added}),
        ));
        let empty = json!({"type": "output_text", "text": "", "annotations": []});
        events.push((
            "response.content_part.added",
            json!({"type": "response.content_part.added", "item_id": item_id, "output_index": 0, "content_index": 0, "part": empty}),
        ));
        for p in pieces(&text, 60) {
            events.push((
                "response.output_text.delta",
                json!({"type": "response.output_text.delta", "item_id": item_id, "output_index": 0, "content_index": 0, "delta": p}),
            ));
        }
        events.push((
            "response.output_text.done",
            json!({"type": "response.output_text.done", "item_id": item_id, "output_index": 0, "content_index": 0, "text": text}),
        ));
        events.push((
            "response.content_part.done",
            json!({"type": "response.content_part.done", "item_id": item_id, "output_index": 0, "content_index": 0,
                   "part": item["content"][0].clone()}),
        ));
    }
    events.push((
        "response.output_item.done",
        json!({"type": "response.output_item.done", "output_index": 0, "item": item.clone()}),
    ));
    let usage = json!({"input_tokens": 1000 + 100 * step as u64, "input_tokens_details": {"cached_tokens": 0},
                       "output_tokens": 50, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 1050 + 100 * step as u64});
    events.push((
        "response.completed",
        json!({"type": "response.completed", "response": response("completed", json!([item]), usage)}),
    ));
    let numbered: Vec<(&str, Value)> = events
        .into_iter()
        .enumerate()
        .map(|(i, (name, mut data))| {
            data["sequence_number"] = json!(i);
            (name, data)
        })
        .collect();
    stream_response(sse(&numbered))
}
