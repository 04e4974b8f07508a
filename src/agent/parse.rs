//! Stream parsers for agent stdout: Claude Code `stream-json`, Codex
//! `exec --json` (current and legacy `msg` formats) and plain text.
//!
//! A [`StreamParser`] is fed one stdout line at a time and returns the
//! [`DisplayLine`]s that line produces; [`StreamParser::finish`] returns the
//! [`StreamSummary`]: the final transcript, whether the agent reported an
//! error, the structured [`Signals`] of a failure (read by
//! [`super::failure`]), and bookkeeping (session id, model, token usage,
//! cost). Nothing here fails: a line that is not JSON in a JSON format,
//! truncated JSON, or an event type this parser does not know is shown as a
//! [`LineKind::System`] line and otherwise ignored.
//!
//! Sources of the formats: Claude Code's "CLI reference" and "headless mode"
//! pages (`--output-format stream-json`: `system`/`assistant`/`user`/`result`
//! events) and the recorded runs in `tests/fixtures/claude-stream-json`
//! (`api-faults/` holds what Claude Code 2.1.328 prints for each API fault:
//! an assistant message with `error`, `api_error_status` and `api_error`, a
//! `rate_limit_event`, and a `result` with `is_error`, `api_error_status`
//! and `terminal_reason`); Codex's `docs/exec.md` (`thread.started`,
//! `turn.*`, `item.*`, `error` events) and, for the older `{"id", "msg":
//! {..}}` format, recorded runs in `tests/fixtures/codex-exec-json` (Codex
//! 0.169.0's faults in `api-faults/`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::OutputFormat;

/// What kind of thing a display line shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LineKind {
    /// Assistant text.
    Text,
    /// A tool call or command the agent started.
    Tool,
    /// A tool or command result.
    ToolResult,
    /// Session start, usage, other bookkeeping.
    System,
    /// An error the agent reported.
    Error,
}

/// One human-readable line derived from the agent's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DisplayLine {
    /// What it shows.
    pub kind: LineKind,
    /// The text (one line, no trailing newline).
    pub text: String,
}

/// Longest display line, in bytes; longer text is cut with `…`.
pub const MAX_DISPLAY_LEN: usize = 400;

impl DisplayLine {
    /// A display line of `kind`: only the first line of `text`, cut to
    /// [`MAX_DISPLAY_LEN`] bytes, with `(+N lines)` when lines were dropped.
    pub fn new(kind: LineKind, text: &str) -> Self {
        let text = text.trim_end();
        let mut lines = text.lines();
        let first = lines.next().unwrap_or("");
        let more = lines.count();
        let mut out = truncate(first, MAX_DISPLAY_LEN);
        if more > 0 {
            out.push_str(&format!(" (+{more} lines)"));
        }
        DisplayLine { kind, text: out }
    }
}

/// `s` cut to at most `max` bytes on a character boundary, with `…` appended when cut.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// One display line per line of `text` (blank lines dropped), each cut to
/// [`MAX_DISPLAY_LEN`].
fn text_lines(kind: LineKind, text: &str, out: &mut Vec<DisplayLine>) {
    for line in text.lines() {
        if !line.trim().is_empty() {
            out.push(DisplayLine {
                kind,
                text: truncate(line.trim_end(), MAX_DISPLAY_LEN),
            });
        }
    }
}

/// Model tokens of one call, as the agent reported them (Claude's `result`
/// `usage`; the sum of Codex's `turn.completed` `usage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Usage {
    /// Input tokens not read from the cache.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Input tokens read from the prompt cache.
    pub cache_read_input_tokens: u64,
    /// Input tokens written to the prompt cache.
    pub cache_creation_input_tokens: u64,
}

impl Usage {
    /// Add `other` to this.
    pub fn add(&mut self, other: &Usage) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cache_read_input_tokens += other.cache_read_input_tokens;
        self.cache_creation_input_tokens += other.cache_creation_input_tokens;
    }
}

/// Claude Code's final `result` event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClaudeResult {
    /// `subtype`: `success`, `error_max_turns`, `error_during_execution`, …
    /// (an API failure still says `success`).
    pub subtype: String,
    /// `is_error`.
    pub is_error: bool,
    /// `api_error_status`: the HTTP status of the failed API call, when one failed.
    pub api_error_status: Option<u16>,
    /// `terminal_reason`: `completed`, `api_error`, …
    pub terminal_reason: Option<String>,
    /// `result`: the final text (the error message when `is_error`).
    pub text: Option<String>,
}

/// An assistant message Claude Code made up for a failed API call (it
/// carries `error`, and `is_api_error_message: true`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ApiError {
    /// `error`: `authentication_failed`, `billing_error`, `rate_limit`,
    /// `server_error`, `invalid_request`, …
    pub error: String,
    /// `api_error_status`: the HTTP status, when there was a response.
    pub status: Option<u16>,
    /// `api_error`: a finer kind, e.g. `usage_limit_reached` or `connection_failed`.
    pub detail: Option<String>,
    /// `api_error_params.rate_limit_info.resetsAt` (Unix seconds).
    pub resets_at: Option<u64>,
    /// The message's text.
    pub text: String,
}

/// Claude Code's `rate_limit_event` (`rate_limit_info`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RateLimit {
    /// `status`: `allowed`, `allowed_warning` or `rejected`.
    pub status: String,
    /// `resetsAt` (Unix seconds).
    pub resets_at: Option<u64>,
    /// `rateLimitType`, e.g. `five_hour`, `seven_day`.
    pub kind: Option<String>,
}

/// What the stream said about a failure, for [`super::failure`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Signals {
    /// Claude's `result` event (the last one).
    pub result: Option<ClaudeResult>,
    /// Claude's last API error message.
    pub api_error: Option<ApiError>,
    /// Claude's last `rate_limit_event`.
    pub rate_limit: Option<RateLimit>,
    /// Codex's error messages (`error` events, `turn.failed`, legacy
    /// `msg.type: "error"`), in order.
    pub errors: Vec<String>,
    /// Codex reported `turn.failed` (or a legacy error).
    pub turn_failed: bool,
    /// The end (at most [`JUNK_TAIL`] bytes) of the stdout lines that are not
    /// the format's JSON, and of all stdout in the plain format.
    pub junk: String,
}

/// Bytes of non-JSON stdout kept in [`Signals::junk`].
pub const JUNK_TAIL: usize = 8 * 1024;

/// What a finished stream amounted to.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StreamSummary {
    /// The final result text, else the accumulated assistant text (see each format).
    pub transcript: String,
    /// The agent reported an error (Claude `is_error` or an `error…` result
    /// subtype; Codex `turn.failed`, an `error` event not followed by a
    /// completed turn, or a legacy `msg.type: "error"`).
    pub is_error: bool,
    /// Claude `session_id` or Codex `thread_id`.
    pub session_id: Option<String>,
    /// The model named by Claude's `init` event.
    pub model: Option<String>,
    /// Tokens used.
    pub usage: Usage,
    /// Claude `total_cost_usd`.
    pub cost_usd: Option<f64>,
    /// Structured facts about a failure.
    pub signals: Signals,
}

/// A parser for one agent run's stdout.
#[derive(Debug, Clone)]
pub enum StreamParser {
    /// Plain text.
    Plain(PlainParser),
    /// Claude Code `stream-json`.
    Claude(ClaudeParser),
    /// Codex `exec --json`, current and legacy.
    Codex(CodexParser),
}

impl StreamParser {
    /// A fresh parser for `format`.
    pub fn new(format: OutputFormat) -> Self {
        match format {
            OutputFormat::Plain => StreamParser::Plain(PlainParser::default()),
            OutputFormat::ClaudeStreamJson => StreamParser::Claude(ClaudeParser::default()),
            OutputFormat::CodexJson => StreamParser::Codex(CodexParser::default()),
        }
    }

    /// Feed one stdout line (without its newline); returns what to display.
    pub fn feed(&mut self, line: &str) -> Vec<DisplayLine> {
        let line = line.trim_end_matches(['\r', '\n']);
        match self {
            StreamParser::Plain(p) => p.feed(line),
            StreamParser::Claude(p) => p.feed(line),
            StreamParser::Codex(p) => p.feed(line),
        }
    }

    /// The summary of everything fed so far.
    pub fn finish(self) -> StreamSummary {
        match self {
            StreamParser::Plain(p) => p.finish(),
            StreamParser::Claude(p) => p.finish(),
            StreamParser::Codex(p) => p.finish(),
        }
    }
}

/// Parse a whole captured output at once: every display line and the summary.
pub fn parse_all(format: OutputFormat, output: &str) -> (Vec<DisplayLine>, StreamSummary) {
    let mut parser = StreamParser::new(format);
    let mut lines = Vec::new();
    for line in output.lines() {
        lines.extend(parser.feed(line));
    }
    (lines, parser.finish())
}

/// Parse a line of a JSON-lines format. Lines with a prefix before the JSON
/// (a logger's `[timestamp] [INFO] {...}`) are parsed from the first `{`.
fn parse_json_line(line: &str) -> Option<Value> {
    let trimmed = line.trim();
    if let Ok(v) = serde_json::from_str::<Value>(trimmed) {
        return v.is_object().then_some(v);
    }
    let start = trimmed.find('{')?;
    if start == 0 {
        return None;
    }
    serde_json::from_str::<Value>(&trimmed[start..])
        .ok()
        .filter(Value::is_object)
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// Keep the last [`JUNK_TAIL`] bytes of `text` plus `line`.
fn push_tail(text: &mut String, line: &str) {
    text.push_str(line);
    text.push('\n');
    if text.len() > JUNK_TAIL {
        let mut cut = text.len() - JUNK_TAIL;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text.drain(..cut);
    }
}

/// Shared handling of lines that are not the format's JSON: shown as system
/// lines and kept as a transcript fallback and in [`Signals::junk`].
#[derive(Debug, Clone, Default)]
struct Junk {
    text: String,
}

impl Junk {
    fn feed(&mut self, line: &str, signals: &mut Signals) -> Vec<DisplayLine> {
        if line.trim().is_empty() {
            return Vec::new();
        }
        self.text.push_str(line);
        self.text.push('\n');
        push_tail(&mut signals.junk, line);
        vec![DisplayLine::new(LineKind::System, line)]
    }
}

/// Plain text: every line is display text; the transcript is all of stdout.
#[derive(Debug, Clone, Default)]
pub struct PlainParser {
    all: String,
    signals: Signals,
}

impl PlainParser {
    fn feed(&mut self, line: &str) -> Vec<DisplayLine> {
        self.all.push_str(line);
        self.all.push('\n');
        if line.trim().is_empty() {
            Vec::new()
        } else {
            push_tail(&mut self.signals.junk, line);
            vec![DisplayLine::new(LineKind::Text, line)]
        }
    }

    fn finish(self) -> StreamSummary {
        StreamSummary {
            transcript: self.all,
            signals: self.signals,
            ..StreamSummary::default()
        }
    }
}

/// A one-line summary of a tool's input: the most telling field, else compact JSON.
fn tool_input_summary(input: &Value) -> String {
    for key in [
        "command",
        "file_path",
        "path",
        "pattern",
        "url",
        "query",
        "description",
        "prompt",
    ] {
        if let Some(s) = input.get(key).and_then(Value::as_str) {
            return s.to_string();
        }
    }
    match input {
        Value::Null => String::new(),
        Value::Object(m) if m.is_empty() => String::new(),
        other => other.to_string(),
    }
}

/// Text of a Claude `tool_result` content: a string or a list of text blocks.
fn tool_result_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| str_of(p, "text"))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// A non-negative JSON integer as `u64`.
fn u64_of(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

/// An HTTP status field (`api_error_status`), when it is a number.
fn status_of(v: &Value, key: &str) -> Option<u16> {
    u64_of(v, key).and_then(|n| u16::try_from(n).ok())
}

/// Claude's `usage` object as [`Usage`].
fn claude_usage(usage: &Value) -> Usage {
    Usage {
        input_tokens: u64_of(usage, "input_tokens").unwrap_or(0),
        output_tokens: u64_of(usage, "output_tokens").unwrap_or(0),
        cache_read_input_tokens: u64_of(usage, "cache_read_input_tokens").unwrap_or(0),
        cache_creation_input_tokens: u64_of(usage, "cache_creation_input_tokens").unwrap_or(0),
    }
}

/// Claude's `rate_limit_info` object (of a `rate_limit_event`, or of an API
/// error's `api_error_params`).
fn rate_limit_of(info: &Value) -> RateLimit {
    RateLimit {
        status: str_of(info, "status").unwrap_or("").to_string(),
        resets_at: u64_of(info, "resetsAt"),
        kind: str_of(info, "rateLimitType").map(str::to_string),
    }
}

/// Claude Code `stream-json`. The transcript is the `result` event's text,
/// else the assistant text blocks joined by newlines, else (no JSON event at
/// all) the junk lines. Assistant messages that carry `error` are API
/// failures Claude Code reports as text: they go to [`Signals::api_error`],
/// not into the transcript.
#[derive(Debug, Clone, Default)]
pub struct ClaudeParser {
    assistant_text: Vec<String>,
    result: Option<String>,
    is_error: bool,
    session_id: Option<String>,
    model: Option<String>,
    usage: Usage,
    cost_usd: Option<f64>,
    signals: Signals,
    junk: Junk,
    events: usize,
}

impl ClaudeParser {
    fn feed(&mut self, line: &str) -> Vec<DisplayLine> {
        let Some(event) = parse_json_line(line) else {
            return self.junk.feed(line, &mut self.signals);
        };
        self.events += 1;
        if self.session_id.is_none() {
            self.session_id = str_of(&event, "session_id").map(str::to_string);
        }
        let mut out = Vec::new();
        match str_of(&event, "type") {
            Some("system") => self.system(&event, &mut out),
            Some("assistant") => self.assistant(&event, &mut out),
            Some("user") => Self::user(&event, &mut out),
            Some("result") => self.result(&event, &mut out),
            Some("rate_limit_event") => self.rate_limit(&event, &mut out),
            Some(other) => out.push(DisplayLine::new(LineKind::System, &format!("[{other}]"))),
            None => out.push(DisplayLine::new(LineKind::System, line)),
        }
        out
    }

    fn system(&mut self, event: &Value, out: &mut Vec<DisplayLine>) {
        let subtype = str_of(event, "subtype").unwrap_or("system");
        if subtype == "init" {
            let model = str_of(event, "model").unwrap_or("?");
            if model != "?" {
                self.model = Some(model.to_string());
            }
            let cwd = str_of(event, "cwd").unwrap_or("?");
            let mode = str_of(event, "permissionMode").unwrap_or("?");
            out.push(DisplayLine::new(
                LineKind::System,
                &format!("session started: model {model}, permission mode {mode}, cwd {cwd}"),
            ));
        } else {
            out.push(DisplayLine::new(
                LineKind::System,
                &format!("[system {subtype}]"),
            ));
        }
    }

    fn rate_limit(&mut self, event: &Value, out: &mut Vec<DisplayLine>) {
        let info = rate_limit_of(event.get("rate_limit_info").unwrap_or(&Value::Null));
        let mut text = format!("rate limit: {}", info.status);
        if let Some(kind) = &info.kind {
            text.push_str(&format!(" ({kind})"));
        }
        if let Some(at) = info.resets_at {
            text.push_str(&format!(", resets at {at}"));
        }
        let kind = if info.status == "rejected" {
            LineKind::Error
        } else {
            LineKind::System
        };
        out.push(DisplayLine::new(kind, &text));
        self.signals.rate_limit = Some(info);
    }

    fn assistant(&mut self, event: &Value, out: &mut Vec<DisplayLine>) {
        let blocks = event
            .pointer("/message/content")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if let Some(error) = str_of(event, "error") {
            let text = blocks
                .iter()
                .filter_map(|b| str_of(b, "text"))
                .collect::<Vec<_>>()
                .join("\n");
            out.push(DisplayLine::new(LineKind::Error, &text));
            let info = event.pointer("/api_error_params/rate_limit_info");
            self.signals.api_error = Some(ApiError {
                error: error.to_string(),
                status: status_of(event, "api_error_status"),
                detail: str_of(event, "api_error").map(str::to_string),
                resets_at: info.map(rate_limit_of).and_then(|r| r.resets_at),
                text,
            });
            return;
        }
        for block in blocks {
            match str_of(block, "type") {
                Some("text") => {
                    let text = str_of(block, "text").unwrap_or("");
                    text_lines(LineKind::Text, text, out);
                    self.assistant_text.push(text.to_string());
                }
                Some("tool_use") => {
                    let name = str_of(block, "name").unwrap_or("?");
                    let input = tool_input_summary(block.get("input").unwrap_or(&Value::Null));
                    let text = if input.is_empty() {
                        name.to_string()
                    } else {
                        format!("{name}: {input}")
                    };
                    out.push(DisplayLine::new(LineKind::Tool, &text));
                }
                // Thinking blocks and anything newer are not shown.
                _ => {}
            }
        }
    }

    fn user(event: &Value, out: &mut Vec<DisplayLine>) {
        let Some(blocks) = event.pointer("/message/content").and_then(Value::as_array) else {
            return;
        };
        for block in blocks {
            if str_of(block, "type") != Some("tool_result") {
                continue;
            }
            let text = tool_result_text(block.get("content"));
            let failed = block.get("is_error").and_then(Value::as_bool) == Some(true);
            let kind = if failed {
                LineKind::Error
            } else {
                LineKind::ToolResult
            };
            let text = if text.trim().is_empty() {
                "(no output)".to_string()
            } else {
                text
            };
            out.push(DisplayLine::new(kind, &text));
        }
    }

    fn result(&mut self, event: &Value, out: &mut Vec<DisplayLine>) {
        let subtype = str_of(event, "subtype").unwrap_or("");
        let is_error = event.get("is_error").and_then(Value::as_bool) == Some(true)
            || subtype.starts_with("error");
        self.is_error |= is_error;
        if let Some(usage) = event.get("usage").filter(|u| u.is_object()) {
            self.usage = claude_usage(usage);
        }
        self.cost_usd = event
            .get("total_cost_usd")
            .or_else(|| event.get("cost_usd"))
            .and_then(Value::as_f64)
            .or(self.cost_usd);
        let text = str_of(event, "result").map(str::to_string);
        self.signals.result = Some(ClaudeResult {
            subtype: subtype.to_string(),
            is_error,
            api_error_status: status_of(event, "api_error_status"),
            terminal_reason: str_of(event, "terminal_reason").map(str::to_string),
            text: text.clone(),
        });
        let turns = event.get("num_turns").and_then(Value::as_u64).unwrap_or(0);
        let mut summary = format!(
            "result: {}, {turns} turns",
            if subtype.is_empty() { "?" } else { subtype }
        );
        if let Some(cost) = self.cost_usd {
            summary.push_str(&format!(", ${cost:.4}"));
        }
        out.push(DisplayLine::new(LineKind::System, &summary));
        if is_error {
            let msg = text.as_deref().unwrap_or(subtype);
            out.push(DisplayLine::new(LineKind::Error, msg));
        }
        if text.is_some() {
            self.result = text;
        }
    }

    fn finish(self) -> StreamSummary {
        let transcript = match self.result {
            Some(r) if !r.trim().is_empty() => r,
            _ if !self.assistant_text.is_empty() => self.assistant_text.join("\n"),
            _ if self.events == 0 => self.junk.text,
            _ => String::new(),
        };
        StreamSummary {
            transcript,
            is_error: self.is_error,
            session_id: self.session_id,
            model: self.model,
            usage: self.usage,
            cost_usd: self.cost_usd,
            signals: self.signals,
        }
    }
}

/// Codex `exec --json`, both the current event stream (`thread.started`,
/// `turn.*`, `item.*`, `error`) and the legacy `{"id", "msg": {"type", ..}}`
/// lines (whose header lines without a type are skipped). The transcript is
/// the legacy `task_complete.last_agent_message`, else the last agent
/// message, else the error messages, else (no JSON event at all) the junk lines.
#[derive(Debug, Clone, Default)]
pub struct CodexParser {
    last_message: Option<String>,
    final_message: Option<String>,
    /// An `error` event not (yet) followed by `turn.completed`.
    pending_error: bool,
    session_id: Option<String>,
    usage: Usage,
    signals: Signals,
    junk: Junk,
    events: usize,
}

/// Codex's `usage` object (`input_tokens` includes `cached_input_tokens`) as [`Usage`].
fn codex_usage(usage: &Value) -> Usage {
    let input = u64_of(usage, "input_tokens").unwrap_or(0);
    let cached = u64_of(usage, "cached_input_tokens").unwrap_or(0);
    Usage {
        input_tokens: input.saturating_sub(cached),
        output_tokens: u64_of(usage, "output_tokens").unwrap_or(0),
        cache_read_input_tokens: cached,
        cache_creation_input_tokens: u64_of(usage, "cache_write_input_tokens").unwrap_or(0),
    }
}

impl CodexParser {
    fn feed(&mut self, line: &str) -> Vec<DisplayLine> {
        let Some(event) = parse_json_line(line) else {
            return self.junk.feed(line, &mut self.signals);
        };
        self.events += 1;
        let mut out = Vec::new();
        if let Some(msg) = event.get("msg").filter(|m| m.is_object()) {
            self.legacy(msg, &mut out);
        } else if let Some(kind) = str_of(&event, "type") {
            self.current(kind, &event, &mut out);
        }
        // Else a legacy header (config object, `{"prompt": ..}`): skipped.
        out
    }

    fn error(&mut self, message: &str, out: &mut Vec<DisplayLine>) {
        self.signals.errors.push(message.to_string());
        out.push(DisplayLine::new(LineKind::Error, message));
    }

    fn message(&mut self, text: &str, out: &mut Vec<DisplayLine>) {
        text_lines(LineKind::Text, text, out);
        self.last_message = Some(text.to_string());
    }

    fn current(&mut self, kind: &str, event: &Value, out: &mut Vec<DisplayLine>) {
        match kind {
            "thread.started" => {
                let id = str_of(event, "thread_id").unwrap_or("?");
                self.session_id = Some(id.to_string());
                out.push(DisplayLine::new(
                    LineKind::System,
                    &format!("thread started: {id}"),
                ));
            }
            "turn.started" => out.push(DisplayLine::new(LineKind::System, "turn started")),
            "turn.completed" => {
                self.pending_error = false;
                if let Some(usage) = event.get("usage") {
                    self.usage.add(&codex_usage(usage));
                }
                let tokens = |k: &str| {
                    event
                        .pointer(&format!("/usage/{k}"))
                        .and_then(Value::as_u64)
                        .unwrap_or(0)
                };
                out.push(DisplayLine::new(
                    LineKind::System,
                    &format!(
                        "turn completed: {} input tokens ({} cached), {} output tokens",
                        tokens("input_tokens"),
                        tokens("cached_input_tokens"),
                        tokens("output_tokens")
                    ),
                ));
            }
            "turn.failed" => {
                self.signals.turn_failed = true;
                let msg = event
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("turn failed");
                self.error(msg, out);
            }
            "error" => {
                self.pending_error = true;
                let msg = str_of(event, "message").unwrap_or("error");
                self.error(msg, out);
            }
            "item.started" | "item.updated" | "item.completed" => {
                if let Some(item) = event.get("item") {
                    self.item(kind, item, out);
                }
            }
            other => out.push(DisplayLine::new(LineKind::System, &format!("[{other}]"))),
        }
    }

    fn item(&mut self, phase: &str, item: &Value, out: &mut Vec<DisplayLine>) {
        let completed = phase == "item.completed";
        match str_of(item, "type").unwrap_or("") {
            "agent_message" if completed => {
                self.message(str_of(item, "text").unwrap_or(""), out);
            }
            "reasoning" if completed => {
                let text = str_of(item, "text").unwrap_or("").trim().trim_matches('*');
                out.push(DisplayLine::new(
                    LineKind::System,
                    &format!("thinking: {text}"),
                ));
            }
            "command_execution" => {
                let command = str_of(item, "command").unwrap_or("?");
                if phase == "item.started" {
                    out.push(DisplayLine::new(LineKind::Tool, &format!("$ {command}")));
                } else if completed {
                    let code = item.get("exit_code").and_then(Value::as_i64);
                    let output = str_of(item, "aggregated_output").unwrap_or("");
                    let status = match code {
                        Some(c) => format!("exit {c}"),
                        None => str_of(item, "status").unwrap_or("done").to_string(),
                    };
                    let text = if output.trim().is_empty() {
                        status
                    } else {
                        format!("{status}: {}", output.trim())
                    };
                    out.push(DisplayLine::new(LineKind::ToolResult, &text));
                }
            }
            "file_change" if completed => {
                let changes = item
                    .get("changes")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                for change in changes {
                    let kind = str_of(change, "kind").unwrap_or("update");
                    let path = str_of(change, "path").unwrap_or("?");
                    out.push(DisplayLine::new(LineKind::Tool, &format!("{kind} {path}")));
                }
            }
            "todo_list" => {
                let items = item
                    .get("items")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let done = items
                    .iter()
                    .filter(|i| i.get("completed").and_then(Value::as_bool) == Some(true))
                    .count();
                out.push(DisplayLine::new(
                    LineKind::System,
                    &format!("todo: {done}/{} done", items.len()),
                ));
            }
            "mcp_tool_call" if phase == "item.started" => {
                let server = str_of(item, "server").unwrap_or("?");
                let tool = str_of(item, "tool").unwrap_or("?");
                out.push(DisplayLine::new(
                    LineKind::Tool,
                    &format!("{server}.{tool}"),
                ));
            }
            "web_search" if completed => {
                let query = str_of(item, "query").unwrap_or("");
                out.push(DisplayLine::new(
                    LineKind::Tool,
                    &format!("web search: {query}"),
                ));
            }
            // Warnings such as "Model metadata for … not found": shown, not failures.
            "error" if completed => {
                let msg = str_of(item, "message").unwrap_or("error");
                out.push(DisplayLine::new(LineKind::Error, msg));
            }
            _ => {}
        }
    }

    fn legacy(&mut self, msg: &Value, out: &mut Vec<DisplayLine>) {
        match str_of(msg, "type").unwrap_or("") {
            "task_started" => out.push(DisplayLine::new(LineKind::System, "task started")),
            "agent_reasoning" => {
                let text = str_of(msg, "text").unwrap_or("").trim().trim_matches('*');
                out.push(DisplayLine::new(
                    LineKind::System,
                    &format!("thinking: {text}"),
                ));
            }
            "agent_message" => self.message(str_of(msg, "message").unwrap_or(""), out),
            "exec_command_begin" => {
                let command = match msg.get("command") {
                    Some(Value::Array(parts)) => parts
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(" "),
                    Some(Value::String(s)) => s.clone(),
                    _ => "?".to_string(),
                };
                out.push(DisplayLine::new(LineKind::Tool, &format!("$ {command}")));
            }
            "exec_command_end" => {
                let code = msg.get("exit_code").and_then(Value::as_i64).unwrap_or(-1);
                let stdout = str_of(msg, "stdout").unwrap_or("").trim();
                let stderr = str_of(msg, "stderr").unwrap_or("").trim();
                let shown = if stdout.is_empty() { stderr } else { stdout };
                let text = if shown.is_empty() {
                    format!("exit {code}")
                } else {
                    format!("exit {code}: {shown}")
                };
                out.push(DisplayLine::new(LineKind::ToolResult, &text));
            }
            "task_complete" => {
                if let Some(m) = str_of(msg, "last_agent_message") {
                    self.final_message = Some(m.to_string());
                }
                out.push(DisplayLine::new(LineKind::System, "task complete"));
            }
            "error" => {
                self.signals.turn_failed = true;
                let message = str_of(msg, "message").unwrap_or("error");
                self.error(message, out);
            }
            "token_count" => {
                let info = msg.get("info").unwrap_or(msg);
                if let Some(total) = info.get("total_token_usage") {
                    self.usage = codex_usage(total);
                }
            }
            // Streaming deltas repeat what the full messages say.
            "agent_message_delta" | "agent_reasoning_delta" | "exec_command_output_delta" => {}
            other => out.push(DisplayLine::new(LineKind::System, &format!("[{other}]"))),
        }
    }

    fn finish(self) -> StreamSummary {
        let transcript = match (self.final_message, self.last_message) {
            (Some(f), _) if !f.trim().is_empty() => f,
            (_, Some(m)) => m,
            _ if !self.signals.errors.is_empty() => self.signals.errors.join("\n"),
            _ if self.events == 0 => self.junk.text,
            _ => String::new(),
        };
        StreamSummary {
            transcript,
            is_error: self.signals.turn_failed || self.pending_error,
            session_id: self.session_id,
            model: None,
            usage: self.usage,
            cost_usd: None,
            signals: self.signals,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");

    fn fixture(path: &str) -> String {
        std::fs::read_to_string(format!("{FIXTURES}{path}"))
            .unwrap_or_else(|e| panic!("cannot read fixture {path}: {e}"))
    }

    /// What a parsed fixture must show.
    struct Expect<'a> {
        /// The transcript starts with this.
        transcript: &'a str,
        is_error: bool,
        /// Tool display lines start with these, in order (other tool lines may come between).
        tools: &'a [&'a str],
        /// Some("usage") / Some("auth") / None.
        block: Option<&'a str>,
        session: Option<&'a str>,
    }

    fn check(format: OutputFormat, path: &str, expect: Expect<'_>) {
        let (lines, summary) = parse_all(format, &fixture(path));
        assert!(
            summary.transcript.starts_with(expect.transcript),
            "{path}: transcript {:?} does not start with {:?}",
            summary.transcript,
            expect.transcript
        );
        assert_eq!(summary.is_error, expect.is_error, "{path}: is_error");
        let tools: Vec<&str> = lines
            .iter()
            .filter(|l| l.kind == LineKind::Tool)
            .map(|l| l.text.as_str())
            .collect();
        let mut want = expect.tools.iter().peekable();
        for tool in &tools {
            if want.peek().is_some_and(|w| tool.starts_with(**w)) {
                want.next();
            }
        }
        assert!(
            want.peek().is_none(),
            "{path}: tool lines {tools:?} lack {:?}",
            want.collect::<Vec<_>>()
        );
        // The failure class of this stream as a call that exited 1.
        let outcome = crate::agent::AgentOutcome {
            exit_code: Some(1),
            is_error: summary.is_error,
            signals: summary.signals.clone(),
            ..crate::agent::AgentOutcome::default()
        };
        let block = match outcome.failure() {
            Some(crate::agent::AgentFailure::Pause {
                kind: crate::agent::PauseKind::Auth,
                ..
            }) => Some("auth"),
            Some(crate::agent::AgentFailure::Pause {
                kind: crate::agent::PauseKind::UsageLimit,
                ..
            }) => Some("usage"),
            _ => None,
        };
        if summary.is_error || expect.block.is_some() {
            assert_eq!(block, expect.block, "{path}: {:?}", outcome.failure());
        }
        if let Some(session) = expect.session {
            assert_eq!(summary.session_id.as_deref(), Some(session), "{path}");
        }
        for line in &lines {
            assert!(
                !line.text.contains('\n'),
                "{path}: multi-line display {line:?}"
            );
            assert!(
                line.text.len() <= MAX_DISPLAY_LEN + 40,
                "{path}: long display"
            );
        }
    }

    fn ok<'a>(transcript: &'a str, tools: &'a [&'a str]) -> Expect<'a> {
        Expect {
            transcript,
            is_error: false,
            tools,
            block: None,
            session: None,
        }
    }

    #[test]
    fn claude_stream_json_fixtures() {
        let c = OutputFormat::ClaudeStreamJson;
        let dir = "claude-stream-json/guess-claude_code_2025-06_";
        check(
            c,
            &format!("{dir}math_calculation.jsonl"),
            Expect {
                session: Some("648a1ab8-66c3-4d46-b4b2-c9e9bdaa2fd3"),
                ..ok("4", &[])
            },
        );
        check(
            c,
            &format!("{dir}file_listing.jsonl"),
            ok(
                "The current directory contains:\n- Configuration files",
                &["LS: /Users/steve/repos/guess/claude_code"],
            ),
        );
        check(
            c,
            &format!("{dir}complex_tool_chain.jsonl"),
            ok(
                "Done. Created VERSION.txt with version 0.1.0-alpha.1 from mix.exs:4.",
                &[
                    "Read: /Users/steve/repos/guess/claude_code/mix.exs",
                    "Write: /Users/steve/repos/guess/claude_code/VERSION.txt",
                ],
            ),
        );
        check(
            c,
            &format!("{dir}error_case.jsonl"),
            ok(
                "The file `/nonexistent/file.txt` does not exist.",
                &["Read: /nonexistent/file.txt"],
            ),
        );
        check(
            c,
            &format!("{dir}allowed_tools_read.jsonl"),
            ok(
                "I need permission to create the file.",
                &["Read: ", "Write: "],
            ),
        );
        check(
            c,
            &format!("{dir}disallowed_write.jsonl"),
            ok(
                "I need permission to create files.",
                &[
                    "Edit: ",
                    "Bash: touch blocked.txt",
                    "Edit: ",
                    "MultiEdit: ",
                    "mcp__filesystem__write_file: ",
                ],
            ),
        );
        check(
            c,
            &format!("{dir}create_file_denied.jsonl"),
            ok("I cannot create that file.", &[]),
        );
        check(
            c,
            "claude-stream-json/gleam-sdk-2.1.x/golden_basic_query.ndjson",
            Expect {
                session: Some("1d1e46f9-35c7-4834-b529-846d5bb82288"),
                ..ok("4", &[])
            },
        );
        check(
            c,
            "claude-json-oneshot/result_success_cli-1.0.x_guess-file_listing.json",
            ok("The current directory contains:", &[]),
        );
    }

    #[test]
    fn claude_tool_errors_are_error_lines_but_not_run_errors() {
        let (lines, summary) = parse_all(
            OutputFormat::ClaudeStreamJson,
            &fixture("claude-stream-json/guess-claude_code_2025-06_error_case.jsonl"),
        );
        assert!(!summary.is_error);
        assert!(lines.contains(&DisplayLine {
            kind: LineKind::Error,
            text: "File does not exist.".into()
        }));
        let cost = summary.cost_usd.unwrap_or_default();
        assert!((cost - 0.113_464_05).abs() < 1e-9, "{cost}");
        assert_eq!(summary.usage.output_tokens, 93);
    }

    /// The pretty-printed single-event files, each compacted to one line.
    #[test]
    fn claude_single_event_files() {
        let dir = "claude-stream-json/gleam-sdk-2.1.x/";
        let mut parser = StreamParser::new(OutputFormat::ClaudeStreamJson);
        let mut lines = Vec::new();
        for name in [
            "system_message",
            "assistant_message",
            "user_message",
            "result_success",
        ] {
            let event: Value = serde_json::from_str(&fixture(&format!("{dir}{name}.json")))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            lines.extend(parser.feed(&event.to_string()));
        }
        let summary = parser.finish();
        assert_eq!(
            summary.transcript,
            "Here are the files in the current directory."
        );
        assert!(!summary.is_error);
        assert_eq!(
            summary.session_id.as_deref(),
            Some("40e7b02d-c0f9-4876-9010-f514d4eb0603")
        );
        let cost = summary.cost_usd.unwrap_or_default();
        assert!((cost - 0.247_224_25).abs() < 1e-9, "{cost}");
        let texts: Vec<(LineKind, &str)> =
            lines.iter().map(|l| (l.kind, l.text.as_str())).collect();
        assert_eq!(
            texts,
            vec![
                (
                    LineKind::System,
                    "session started: model claude-opus-4-5-20251101, permission mode acceptEdits, cwd /home/cyou/claude-agent-sdk-gleam"
                ),
                (LineKind::Tool, "Bash: ls -la"),
                (LineKind::ToolResult, "total 1976 (+2 lines)"),
                (LineKind::System, "result: success, 2 turns, $0.2472"),
            ]
        );
    }

    #[test]
    fn codex_fixtures() {
        let x = OutputFormat::CodexJson;
        let dir = "codex-exec-json/";
        let hello = "**What I Did**\n- Implemented a V “Hello, World!” program";
        let tools = &[
            "$ bash -lc \"echo 'Listing files'",
            "add /tmp/gh-issue-solver-1762008239822/main.v",
            "add /tmp/gh-issue-solver-1762008239822/hello.v",
            "add /tmp/gh-issue-solver-1762008239822/hello_test.v",
            "$ bash -lc \"(echo 'Attempting to run V tests'",
        ];
        check(
            x,
            &format!("{dir}hive-mind_issue-642_success_gpt5_tools.jsonl"),
            Expect {
                session: Some("019a3fe0-82fb-7e31-8e96-1d5c0544fd8a"),
                ..ok(hello, tools)
            },
        );
        // The logger's raw output: prefixed JSON and log lines mixed.
        check(
            x,
            &format!("{dir}hive-mind_issue-642_raw-log-lines-190-263.txt"),
            Expect {
                session: Some("019a3fe0-82fb-7e31-8e96-1d5c0544fd8a"),
                ..ok(hello, tools)
            },
        );
        let failed = Expect {
            transcript: "Reconnecting... 1/5\n",
            is_error: true,
            tools: &[],
            block: Some("auth"),
            session: Some("019a72db-80ed-7911-8a8a-94994ffc009b"),
        };
        check(
            x,
            &format!("{dir}hive-mind_issue-715_auth-401_turn-failed.jsonl"),
            failed,
        );
        let failed = Expect {
            transcript: "Reconnecting... 1/5\n",
            is_error: true,
            tools: &[],
            block: Some("auth"),
            session: Some("019a72db-80ed-7911-8a8a-94994ffc009b"),
        };
        check(
            x,
            &format!("{dir}hive-mind_issue-715_raw-log-lines-245-266.txt"),
            failed,
        );
        check(
            x,
            &format!("{dir}agent-wrappers_streaming_readonly.jsonl"),
            ok(
                "- Unable to check hygiene (read-only mode, no commands run)",
                &[],
            ),
        );
        check(
            x,
            &format!("{dir}agent-wrappers_resume_readonly.jsonl"),
            Expect {
                session: Some("019ab7c5-3c6c-7dd3-8e6e-cec2a5a49a62"),
                ..ok("- Still no repo visibility", &[])
            },
        );
        check(
            x,
            &format!("{dir}openai-codex_docs-exec-md_sample.jsonl"),
            ok(
                "Yep — there’s a `README.md` in the repository root.",
                &["$ bash -lc ls"],
            ),
        );
        check(
            x,
            &format!("{dir}vibe-kanban_legacy-msg-format_exec-command.jsonl"),
            ok(
                "I can see the directory structure of your project. This appears to be a Rust project",
                &["$ bash -lc ls -1"],
            ),
        );
        check(
            x,
            &format!("{dir}vibe-kanban_legacy-msg-format_missing-api-key_error.jsonl"),
            Expect {
                transcript: "Missing environment variable: `OPENAI_API_KEY`.",
                is_error: true,
                tools: &[],
                block: Some("auth"),
                session: None,
            },
        );
    }

    #[test]
    fn codex_usage_and_results() {
        let (lines, summary) = parse_all(
            OutputFormat::CodexJson,
            &fixture("codex-exec-json/openai-codex_docs-exec-md_sample.jsonl"),
        );
        // Codex counts cached tokens inside input_tokens; Usage keeps them apart.
        assert_eq!(
            summary.usage.input_tokens + summary.usage.cache_read_input_tokens,
            24763
        );
        let results: Vec<&str> = lines
            .iter()
            .filter(|l| l.kind == LineKind::ToolResult)
            .map(|l| l.text.as_str())
            .collect();
        assert_eq!(results.len(), 1);
        assert!(
            results[0].starts_with("exit 0: 2025-09-11 (+"),
            "{results:?}"
        );
    }

    /// An `error` event followed by a completed turn was transient.
    #[test]
    fn codex_transient_error_is_not_a_failure() {
        let out = "{\"type\":\"turn.started\"}\n\
                   {\"type\":\"error\",\"message\":\"Reconnecting... 1/5\"}\n\
                   {\"type\":\"item.completed\",\"item\":{\"id\":\"item_0\",\"type\":\"agent_message\",\"text\":\"done\"}}\n\
                   {\"type\":\"turn.completed\",\"usage\":{\"input_tokens\":1}}\n";
        let (_, summary) = parse_all(OutputFormat::CodexJson, out);
        assert!(!summary.is_error);
        assert_eq!(summary.transcript, "done");
    }

    #[test]
    fn junk_never_fails() {
        let junk = "not json at all\n{\"type\":\"assistant\",\"message\":{\"content\":[{\"type\":\"text\",\"text\":\"hi\"}]}}\n\
                    {\"type\":\"assist\n{\"type\":\"brand_new_event\",\"x\":1}\n[1,2,3]\n\u{fffd}\u{fffd} binary\n\n{\"type\":\"result\",\"result\":null}\n";
        for format in [
            OutputFormat::ClaudeStreamJson,
            OutputFormat::CodexJson,
            OutputFormat::Plain,
        ] {
            let (lines, _) = parse_all(format, junk);
            assert!(
                lines.iter().any(|l| l.text == "not json at all"),
                "{format:?}: {lines:?}"
            );
        }
        let (lines, summary) = parse_all(OutputFormat::ClaudeStreamJson, junk);
        assert_eq!(summary.transcript, "hi");
        assert!(lines.contains(&DisplayLine {
            kind: LineKind::System,
            text: "[brand_new_event]".into()
        }));
        assert!(lines.contains(&DisplayLine {
            kind: LineKind::System,
            text: "{\"type\":\"assist".into()
        }));
    }

    /// A JSON format that got no JSON at all keeps what was printed.
    #[test]
    fn json_format_with_only_plain_output_keeps_it() {
        let out = "Invalid API key · Please run /login\n";
        for format in [OutputFormat::ClaudeStreamJson, OutputFormat::CodexJson] {
            let (_, summary) = parse_all(format, out);
            assert_eq!(summary.transcript, out, "{format:?}");
            assert_eq!(summary.signals.junk, out, "{format:?}");
        }
    }

    #[test]
    fn claude_api_error_signals() {
        let (lines, summary) = parse_all(
            OutputFormat::ClaudeStreamJson,
            &fixture("claude-stream-json/api-faults/claude-2.1.328_429-usage-limit-oauth.jsonl"),
        );
        assert!(summary.is_error);
        let s = &summary.signals;
        assert_eq!(
            s.rate_limit,
            Some(RateLimit {
                status: "rejected".into(),
                resets_at: Some(1_795_797_943),
                kind: Some("five_hour".into()),
            })
        );
        let api = s.api_error.clone().unwrap_or_default();
        assert_eq!(api.error, "rate_limit");
        assert_eq!(api.status, Some(429));
        assert_eq!(api.detail.as_deref(), Some("usage_limit_reached"));
        assert_eq!(api.resets_at, Some(1_795_797_943));
        let result = s.result.clone().unwrap_or_default();
        assert_eq!(result.subtype, "success");
        assert_eq!(result.api_error_status, Some(429));
        assert_eq!(result.terminal_reason.as_deref(), Some("api_error"));
        // The made-up assistant message is an error line, not assistant text.
        assert!(
            lines
                .iter()
                .any(|l| l.kind == LineKind::Error && l.text.contains("5-hour limit"))
        );
        let (_, cut) = parse_all(
            OutputFormat::ClaudeStreamJson,
            &fixture("claude-stream-json/api-faults/claude-2.1.328_cut.jsonl"),
        );
        assert_eq!(
            cut.signals.api_error.map(|a| (a.error, a.status, a.detail)),
            Some((
                "server_error".to_string(),
                None,
                Some("connection_failed".to_string())
            ))
        );
        let (_, ok) = parse_all(
            OutputFormat::ClaudeStreamJson,
            &fixture("claude-stream-json/api-faults/claude-2.1.328_success.jsonl"),
        );
        assert_eq!(ok.transcript, "hello there");
        assert_eq!(ok.usage.input_tokens, 10);
        assert_eq!(ok.usage.output_tokens, 5);
        assert_eq!(ok.model.as_deref(), Some("claude-opus-5-5"));
        assert!(ok.cost_usd.is_some_and(|c| c > 0.0));
    }

    #[test]
    fn plain_keeps_everything() {
        let (lines, summary) = parse_all(OutputFormat::Plain, "a\n\n{\"type\":\"result\"}\nb\n");
        assert_eq!(summary.transcript, "a\n\n{\"type\":\"result\"}\nb\n");
        assert_eq!(lines.len(), 3);
        assert!(lines.iter().all(|l| l.kind == LineKind::Text));
    }

    #[test]
    fn display_lines_are_cut() {
        let long = "x".repeat(10_000);
        let d = DisplayLine::new(LineKind::Text, &format!("é{long}\nsecond\nthird"));
        assert!(
            d.text.ends_with("… (+2 lines)"),
            "{}",
            &d.text[d.text.len() - 20..]
        );
        assert!(d.text.len() < MAX_DISPLAY_LEN + 20);
    }
}
