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
            out.push(DisplayLine::new(
                LineKind::System,
                &format!("[system {subtype}]"),
            ));
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
                out.push(DisplayLine::new(
                    LineKind::System,
                    &format!("thread started: {id}"),
                ));
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
        let block = summary.block.as_ref().map(|b| match b {
            AgentBlock::UsageLimit { .. } => "usage",
            AgentBlock::Auth { .. } => "auth",
        });
        assert_eq!(block, expect.block, "{path}: block {:?}", summary.block);
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
        assert_eq!(
            summary
                .usage
                .as_ref()
                .and_then(|u| u["output_tokens"].as_u64()),
            Some(93)
        );
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
        assert_eq!(
            summary
                .usage
                .as_ref()
                .and_then(|u| u["input_tokens"].as_u64()),
            Some(24763)
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
            assert!(
                matches!(summary.block, Some(AgentBlock::Auth { .. })),
                "{format:?}"
            );
        }
    }

    #[test]
    fn claude_usage_limit_result() {
        let out = "{\"type\":\"result\",\"subtype\":\"success\",\"is_error\":true,\"result\":\"Claude AI usage limit reached|1750000000\"}\n";
        let (lines, summary) = parse_all(OutputFormat::ClaudeStreamJson, out);
        assert!(summary.is_error);
        assert_eq!(
            summary.block,
            Some(AgentBlock::UsageLimit {
                message: "Claude AI usage limit reached|1750000000".into(),
                resets_at: Some(1_750_000_000)
            })
        );
        assert_eq!(lines.last().map(|l| l.kind), Some(LineKind::Error));
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
