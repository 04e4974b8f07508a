//! The agents' output contract: the triage JSON object, `PLAN_START` …
//! `PLAN_END` with a `SUMMARY:` line, `ALREADY_SATISFIED_START` …
//! `ALREADY_SATISFIED_END`, `VERDICT: APPROVE|REQUEST_CHANGES|COMMENT`, and
//! the messages that mean a usage limit or an auth failure.

use serde::{Deserialize, Serialize};

use super::AgentBlock;

/// Why a transcript does not meet the contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ContractError(pub String);

/// The triage agent's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriageResult {
    /// Ready to plan.
    pub ready: bool,
    /// Why (or why not).
    #[serde(default)]
    pub reasons: Vec<String>,
    /// `bug`, `feature`, …
    #[serde(default)]
    pub issue_type: Option<String>,
    /// 0–10.
    #[serde(default)]
    pub clarity_score: Option<f64>,
    /// 0–10.
    #[serde(default)]
    pub complexity_score: Option<f64>,
    /// Needs exploration before planning.
    #[serde(default)]
    pub needs_discovery: bool,
    /// The repository already does what the issue asks.
    #[serde(default)]
    pub already_addressed: bool,
}

/// The plan agent's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanResult {
    /// A plan (text between the markers) and its `SUMMARY:` line.
    Plan {
        /// The plan text.
        plan: String,
        /// The summary line's text.
        summary: String,
    },
    /// The issue is already satisfied, with the explanation between the markers.
    AlreadySatisfied {
        /// Why.
        explanation: String,
    },
}

/// A review verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    /// `APPROVE`.
    Approve,
    /// `REQUEST_CHANGES`.
    RequestChanges,
    /// `COMMENT`.
    Comment,
}

/// The review agent's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewResult {
    /// The verdict.
    pub verdict: Verdict,
    /// The `SUMMARY:` line.
    pub summary: String,
    /// The whole transcript, as feedback for a fix round.
    pub feedback: String,
}

/// Find and parse the triage JSON object in `transcript`: the last JSON
/// object with a `"ready"` field, bare, inside a ```` ```json ```` fence or
/// surrounded by prose.
///
/// # Errors
/// [`ContractError`] saying what is missing or malformed.
pub fn parse_triage(transcript: &str) -> Result<TriageResult, ContractError> {
    let object = json_objects(transcript)
        .into_iter()
        .rfind(|v| v.get("ready").is_some())
        .ok_or_else(|| {
            ContractError(
                "the triage answer has no JSON object with a \"ready\" field".to_string(),
            )
        })?;
    serde_json::from_value(object)
        .map_err(|e| ContractError(format!("the triage JSON object is malformed: {e}")))
}

/// Every top-level JSON object in `text`, in order. Objects nested in an
/// object already found are not listed separately.
fn json_objects(text: &str) -> Vec<serde_json::Value> {
    let mut found = Vec::new();
    let mut pos = 0;
    while let Some(offset) = text[pos..].find('{') {
        let start = pos + offset;
        let mut stream =
            serde_json::Deserializer::from_str(&text[start..]).into_iter::<serde_json::Value>();
        match stream.next() {
            Some(Ok(value)) if value.is_object() => {
                pos = start + stream.byte_offset();
                found.push(value);
            }
            _ => pos = start + 1,
        }
    }
    found
}

/// The text between the last `end` marker and the last `start` marker before it.
fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let end_at = text.rfind(end)?;
    let start_at = text[..end_at].rfind(start)?;
    Some(&text[start_at + start.len()..end_at])
}

/// A line with markdown decoration (`**`, `#`, `>`, `-`, backticks) removed
/// from both ends.
fn undecorate(line: &str) -> &str {
    line.trim()
        .trim_start_matches(['#', '>', '-', '*', '`', ' ', '\t'])
        .trim_end_matches(['*', '`', ' ', '\t'])
}

/// The value of the last `KEY:` line (case-insensitive, markdown tolerated,
/// e.g. `**SUMMARY:** text` or `SUMMARY: **text**`). When the value is empty
/// on its own line, the next non-empty line is taken.
fn keyed_line(text: &str, key: &str) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = None;
    for (i, raw) in lines.iter().enumerate() {
        let line = undecorate(raw);
        let Some(head) = line.get(..key.len()) else {
            continue;
        };
        if !head.eq_ignore_ascii_case(key) {
            continue;
        }
        let rest = line[key.len()..].trim_start_matches(['*', ' ']);
        let Some(rest) = rest.strip_prefix(':') else {
            continue;
        };
        let mut value = undecorate(rest.trim_start_matches('*')).to_string();
        if value.is_empty() {
            value = lines[i + 1..]
                .iter()
                .map(|l| undecorate(l))
                .find(|l| !l.is_empty())
                .unwrap_or("")
                .to_string();
        }
        found = Some(value);
    }
    found
}

/// Extract the plan or the already-satisfied explanation. A plan between
/// `PLAN_START` and `PLAN_END` wins over an `ALREADY_SATISFIED_START` …
/// `ALREADY_SATISFIED_END` block; the `SUMMARY:` line is looked for inside
/// the plan first, then in the whole transcript.
///
/// # Errors
/// [`ContractError`] when neither marker pair is present or the plan is empty
/// or has no `SUMMARY:` line.
pub fn parse_plan(transcript: &str) -> Result<PlanResult, ContractError> {
    if let Some(plan) = between(transcript, "PLAN_START", "PLAN_END") {
        let plan = plan.trim();
        if plan.is_empty() {
            return Err(ContractError(
                "the plan between PLAN_START and PLAN_END is empty".to_string(),
            ));
        }
        let summary = keyed_line(plan, "SUMMARY")
            .or_else(|| keyed_line(transcript, "SUMMARY"))
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ContractError("the plan has no SUMMARY: line".to_string()))?;
        return Ok(PlanResult::Plan {
            plan: plan.to_string(),
            summary,
        });
    }
    if let Some(explanation) = already_satisfied(transcript) {
        return Ok(PlanResult::AlreadySatisfied { explanation });
    }
    Err(ContractError(
        "the plan answer has neither PLAN_START…PLAN_END nor \
         ALREADY_SATISFIED_START…ALREADY_SATISFIED_END"
            .to_string(),
    ))
}

/// The verdict named by `value` (`APPROVE`, `approved`, `Request changes`,
/// `CHANGES_REQUESTED`, `comment`, …), from its first word-like run.
fn verdict_of(value: &str) -> Option<Verdict> {
    let word: String = value
        .trim()
        .chars()
        .take_while(|c| c.is_ascii_alphabetic() || matches!(c, '_' | '-' | ' '))
        .map(|c| match c {
            '-' | ' ' => '_',
            c => c.to_ascii_uppercase(),
        })
        .collect();
    let word = word.trim_matches('_');
    match word {
        w if w.starts_with("APPROVE") => Some(Verdict::Approve),
        w if w.starts_with("REQUEST_CHANGES") || w.starts_with("CHANGES_REQUESTED") => {
            Some(Verdict::RequestChanges)
        }
        w if w.starts_with("COMMENT") => Some(Verdict::Comment),
        _ => None,
    }
}

/// Extract `VERDICT:` and `SUMMARY:` (the last of each; markdown such as
/// `**VERDICT:** APPROVE` is tolerated). A missing summary is empty.
///
/// # Errors
/// [`ContractError`] when no verdict line is present.
pub fn parse_review(transcript: &str) -> Result<ReviewResult, ContractError> {
    let value = keyed_line(transcript, "VERDICT").ok_or_else(|| {
        ContractError(
            "the review has no VERDICT: line (expected APPROVE, REQUEST_CHANGES or COMMENT)"
                .to_string(),
        )
    })?;
    let verdict = verdict_of(&value).ok_or_else(|| {
        ContractError(format!(
            "the review verdict {value:?} is not APPROVE, REQUEST_CHANGES or COMMENT"
        ))
    })?;
    Ok(ReviewResult {
        verdict,
        summary: keyed_line(transcript, "SUMMARY").unwrap_or_default(),
        feedback: transcript.to_string(),
    })
}

/// The text between `ALREADY_SATISFIED_START` and `ALREADY_SATISFIED_END`
/// (trimmed), if both markers are present.
pub fn already_satisfied(transcript: &str) -> Option<String> {
    between(transcript, "ALREADY_SATISFIED_START", "ALREADY_SATISFIED_END")
        .map(|s| s.trim().to_string())
}

/// Phrases (lowercase) that mean a usage or credit limit.
const USAGE_LIMIT_PHRASES: &[&str] = &[
    "usage limit reached",
    "usage limit exceeded",
    "credit balance is too low",
    "hit your usage limit",
    "-hour limit reached",
    "weekly limit reached",
    "insufficient_quota",
];

/// Phrases (lowercase) that mean the agent could not authenticate.
const AUTH_PHRASES: &[&str] = &[
    "401 unauthorized",
    "invalid api key",
    "invalid x-api-key",
    "authentication_error",
    "please run /login",
    "oauth token has expired",
    "incorrect api key provided",
];

/// Recognise a usage-limit or auth-failure message in one line of output.
///
/// Usage limits: "usage limit reached" (Claude's `Claude AI usage limit
/// reached|1750000000` carries the reset time, Unix seconds, after `|`),
/// "credit balance is too low", "You've hit your usage limit" and other
/// "hit your … limit" forms, "5-hour limit reached", `insufficient_quota`.
/// Auth failures: "401 Unauthorized", "Invalid API key",
/// `authentication_error`, "Please run /login", a missing `OPENAI_API_KEY` or
/// `ANTHROPIC_API_KEY`. Matching is case-insensitive.
pub fn detect_block(line: &str) -> Option<AgentBlock> {
    let lower = line.to_lowercase();
    let message = line.trim().to_string();
    let hit_your_limit = lower
        .find("hit your")
        .is_some_and(|at| lower[at..].contains("limit"));
    if hit_your_limit || USAGE_LIMIT_PHRASES.iter().any(|p| lower.contains(p)) {
        return Some(AgentBlock::UsageLimit {
            resets_at: reset_time(line),
            message,
        });
    }
    let missing_key = ["openai_api_key", "anthropic_api_key"]
        .iter()
        .any(|k| lower.contains(k))
        && ["missing", "not set", "no api key", "must be set", "not found"]
            .iter()
            .any(|p| lower.contains(p));
    if missing_key || AUTH_PHRASES.iter().any(|p| lower.contains(p)) {
        return Some(AgentBlock::Auth { message });
    }
    None
}

/// The Unix time after a `|` (`…limit reached|1750000000`), when it is a
/// plausible timestamp (9 to 11 digits).
fn reset_time(line: &str) -> Option<u64> {
    let (_, after) = line.rsplit_once('|')?;
    let digits: String = after
        .trim()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    if (9..=11).contains(&digits.len()) {
        digits.parse().ok()
    } else {
        None
    }
}
