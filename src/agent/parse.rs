//! Stream parsers for agent stdout: Claude Code `stream-json`, Codex
//! `exec --json` (current and legacy `msg` formats) and plain text.
//!
//! A [`StreamParser`] is fed one stdout line at a time and returns the
//! [`DisplayLine`]s that line produces; [`StreamParser::finish`] returns the
//! [`StreamSummary`]: the final transcript, whether the agent reported an
//! error, and bookkeeping (session id, usage, cost, a recognised usage-limit or
//! auth block). Nothing here fails: a line that is not JSON in a JSON format,
//! truncated JSON, or an event type this parser does not know is shown as a
//! [`LineKind::System`] line and otherwise ignored.
//!
//! Sources of the formats: Claude Code's "CLI reference" and "headless mode"
//! pages (`--output-format stream-json`: `system`/`assistant`/`user`/`result`
//! events) and the recorded runs in `tests/fixtures/claude-stream-json`; Codex's
//! `docs/exec.md` (`thread.started`, `turn.*`, `item.*` events) and, for the
//! older `{"id", "msg": {..}}` format, recorded runs in
//! `tests/fixtures/codex-exec-json`.

use serde::Serialize;
use serde_json::Value;

use super::contract::detect_block;
use super::{AgentBlock, OutputFormat};

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
    /// The last usage object the agent reported (tokens), as sent.
    pub usage: Option<Value>,
    /// Claude `total_cost_usd`.
    pub cost_usd: Option<f64>,
    /// The first usage-limit or auth message found in error texts, junk lines
    /// or (plain format) any line; see [`super::contract::detect_block`].
    pub block: Option<AgentBlock>,
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

/// Remember the first block found in `text`.
fn note_block(slot: &mut Option<AgentBlock>, text: &str) {
    if slot.is_none() {
        *slot = text.lines().find_map(detect_block);
    }
}

/// Shared handling of lines that are not the format's JSON: shown as system
/// lines, kept as a transcript fallback and checked for block messages.
#[derive(Debug, Clone, Default)]
struct Junk {
    text: String,
}

impl Junk {
    fn feed(&mut self, line: &str, block: &mut Option<AgentBlock>) -> Vec<DisplayLine> {
        if line.trim().is_empty() {
            return Vec::new();
        }
        self.text.push_str(line);
        self.text.push('\n');
        note_block(block, line);
        vec![DisplayLine::new(LineKind::System, line)]
    }
}

/// Plain text: every line is display text; the transcript is all of stdout.
#[derive(Debug, Clone, Default)]
pub struct PlainParser {
    all: String,
    block: Option<AgentBlock>,
}

impl PlainParser {
    fn feed(&mut self, line: &str) -> Vec<DisplayLine> {
        self.all.push_str(line);
        self.all.push('\n');
        note_block(&mut self.block, line);
        if line.trim().is_empty() {
            Vec::new()
        } else {
            vec![DisplayLine::new(LineKind::Text, line)]
        }
    }

    fn finish(self) -> StreamSummary {
        StreamSummary {
            transcript: self.all,
            block: self.block,
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

/// Claude Code `stream-json`. The transcript is the `result` event's text,
/// else the assistant text blocks joined by newlines, else (no JSON event at
/// all) the junk lines.
#[derive(Debug, Clone, Default)]
pub struct ClaudeParser {
    assistant_text: Vec<String>,
    result: Option<String>,
    is_error: bool,
    session_id: Option<String>,
    usage: Option<Value>,
    cost_usd: Option<f64>,
    block: Option<AgentBlock>,
    junk: Junk,
    events: usize,
}

impl ClaudeParser {
    fn feed(&mut self, line: &str) -> Vec<DisplayLine> {
        let Some(event) = parse_json_line(line) else {
            return self.junk.feed(line, &mut self.block);
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
            Some(other) => out.push(DisplayLine::new(LineKind::System, &format!("[{other}]"))),
            None => out.push(DisplayLine::new(LineKind::System, line)),
        }
        out
    }

    fn system(&mut self, event: &Value, out: &mut Vec<DisplayLine>) {
        let subtype = str_of(event, "subtype").unwrap_or("system");
        if subtype == "init" {
            let model = str_of(event, "model").unwrap_or("?");
            let cwd = str_of(event, "cwd").unwrap_or("?");
            let mode = str_of(event, "permissionMode").unwrap_or("?");
            out.push(DisplayLine::new(
                LineKind::System,
                &format!("session started: model {model}, permission mode {mode}, cwd {cwd}"),
            ));
        } else {
            out.push(DisplayLine::new(LineKind::System, &format!("[system {subtype}]")));
        }
    }

    fn assistant(&mut self, event: &Value, out: &mut Vec<DisplayLine>) {
        let blocks = event
            .pointer("/message/content")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
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
        self.usage = event.get("usage").cloned().or(self.usage.take());
        self.cost_usd = event
            .get("total_cost_usd")
            .or_else(|| event.get("cost_usd"))
            .and_then(Value::as_f64)
            .or(self.cost_usd);
        let text = str_of(event, "result").map(str::to_string);
        if let Some(t) = &text {
            // A short one-line result is how Claude reports "usage limit reached|<time>".
            if is_error || (!t.contains('\n') && t.len() < 300) {
                note_block(&mut self.block, t);
            }
        }
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
            usage: self.usage,
            cost_usd: self.cost_usd,
            block: self.block,
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
    errors: Vec<String>,
    turn_failed: bool,
    /// An `error` event not (yet) followed by `turn.completed`.
    pending_error: bool,
    session_id: Option<String>,
    usage: Option<Value>,
    block: Option<AgentBlock>,
    junk: Junk,
    events: usize,
}

impl CodexParser {
    fn feed(&mut self, line: &str) -> Vec<DisplayLine> {
        let Some(event) = parse_json_line(line) else {
            return self.junk.feed(line, &mut self.block);
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
        note_block(&mut self.block, message);
        self.errors.push(message.to_string());
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
                out.push(DisplayLine::new(LineKind::System, &format!("thread started: {id}")));
            }
            "turn.started" => out.push(DisplayLine::new(LineKind::System, "turn started")),
            "turn.completed" => {
                self.pending_error = false;
                self.usage = event.get("usage").cloned();
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
                self.turn_failed = true;
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
                out.push(DisplayLine::new(LineKind::System, &format!("thinking: {text}")));
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
                out.push(DisplayLine::new(LineKind::Tool, &format!("{server}.{tool}")));
            }
            "web_search" if completed => {
                let query = str_of(item, "query").unwrap_or("");
                out.push(DisplayLine::new(LineKind::Tool, &format!("web search: {query}")));
            }
            "error" if completed => {
                let msg = str_of(item, "message").unwrap_or("error");
                note_block(&mut self.block, msg);
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
                out.push(DisplayLine::new(LineKind::System, &format!("thinking: {text}")));
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
                self.turn_failed = true;
                let message = str_of(msg, "message").unwrap_or("error");
                self.error(message, out);
            }
            "token_count" => self.usage = msg.get("info").or(Some(msg)).cloned(),
            // Streaming deltas repeat what the full messages say.
            "agent_message_delta" | "agent_reasoning_delta" | "exec_command_output_delta" => {}
            other => out.push(DisplayLine::new(LineKind::System, &format!("[{other}]"))),
        }
    }

    fn finish(self) -> StreamSummary {
        let transcript = match (self.final_message, self.last_message) {
            (Some(f), _) if !f.trim().is_empty() => f,
            (_, Some(m)) => m,
            _ if !self.errors.is_empty() => self.errors.join("\n"),
            _ if self.events == 0 => self.junk.text,
            _ => String::new(),
        };
        StreamSummary {
            transcript,
            is_error: self.turn_failed || self.pending_error,
            session_id: self.session_id,
            usage: self.usage,
            cost_usd: None,
            block: self.block,
        }
    }
}
