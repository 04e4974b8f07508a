//! Stream parsers for agent stdout: Claude Code `stream-json`, Codex
//! `exec --json` (current and legacy `msg` formats) and plain text.

use serde::Serialize;

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
