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
            ContractError("the triage answer has no JSON object with a \"ready\" field".to_string())
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
    between(
        transcript,
        "ALREADY_SATISFIED_START",
        "ALREADY_SATISFIED_END",
    )
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
        && [
            "missing",
            "not set",
            "no api key",
            "must be set",
            "not found",
        ]
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

#[cfg(test)]
mod tests {
    use super::*;

    fn check_block(line: &str, expected: Option<&str>, resets_at: Option<u64>) {
        let got = detect_block(line);
        let kind = got.as_ref().map(|b| match b {
            AgentBlock::UsageLimit { .. } => "usage",
            AgentBlock::Auth { .. } => "auth",
        });
        assert_eq!(kind, expected, "{line:?}: {got:?}");
        if let Some(AgentBlock::UsageLimit {
            resets_at: r,
            message,
        }) = &got
        {
            assert_eq!(*r, resets_at, "{line:?}");
            assert_eq!(message, line.trim());
        }
    }

    #[test]
    fn blocks() {
        let u = Some("usage");
        let a = Some("auth");
        check_block(
            "Claude AI usage limit reached|1750000000",
            u,
            Some(1_750_000_000),
        );
        check_block("Claude AI usage limit reached", u, None);
        check_block("  Error: Credit balance is too low  ", u, None);
        check_block(
            "You've hit your usage limit. Upgrade to Pro or try again in 4 hours.",
            u,
            None,
        );
        check_block(
            "You've hit your limit · resets 3pm (Europe/Berlin)",
            u,
            None,
        );
        check_block("5-hour limit reached ∙ resets 3pm", u, None);
        check_block("{\"error\":{\"code\":\"insufficient_quota\"}}", u, None);
        check_block("usage limit reached|not-a-time", u, None);
        check_block(
            "exceeded retry limit, last status: 401 Unauthorized, request id: 99cdbe04acfb0b34-AMS",
            a,
            None,
        );
        check_block("Invalid API key · Please run /login", a, None);
        check_block(
            "Missing environment variable: `OPENAI_API_KEY`. Create an API key",
            a,
            None,
        );
        check_block("ANTHROPIC_API_KEY is not set", a, None);
        check_block(
            "API Error: 401 {\"type\":\"error\",\"error\":{\"type\":\"authentication_error\"}}",
            a,
            None,
        );
        check_block(
            "OAuth token has expired. Please obtain a new token",
            a,
            None,
        );
        check_block("Reconnecting... 1/5", None, None);
        check_block("Set OPENAI_API_KEY in your shell profile", None, None);
        check_block("the rate limiter test passed", None, None);
        check_block("", None, None);
    }

    fn check_review(text: &str, verdict: Option<Verdict>, summary: &str) {
        match (parse_review(text), verdict) {
            (Ok(r), Some(v)) => {
                assert_eq!(r.verdict, v, "{text:?}");
                assert_eq!(r.summary, summary, "{text:?}");
                assert_eq!(r.feedback, text);
            }
            (Err(_), None) => {}
            (got, want) => panic!("{text:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn reviews() {
        use Verdict::*;
        check_review(
            "VERDICT: APPROVE\nSUMMARY: looks good",
            Some(Approve),
            "looks good",
        );
        check_review(
            "**VERDICT:** APPROVE\n**SUMMARY:** fine",
            Some(Approve),
            "fine",
        );
        check_review(
            "**VERDICT**: REQUEST_CHANGES\nSUMMARY: missing test",
            Some(RequestChanges),
            "missing test",
        );
        check_review("## Verdict: request changes\n", Some(RequestChanges), "");
        check_review("VERDICT: CHANGES_REQUESTED", Some(RequestChanges), "");
        check_review(
            "Verdict: comment — minor nits\nSummary: ok",
            Some(Comment),
            "ok",
        );
        check_review("VERDICT: `APPROVE`", Some(Approve), "");
        check_review("- VERDICT: Approved.", Some(Approve), "");
        check_review(
            "VERDICT:\nAPPROVE\nSUMMARY:\nall good",
            Some(Approve),
            "all good",
        );
        check_review(
            "Answer with VERDICT: REQUEST_CHANGES or\nVERDICT: APPROVE\nSUMMARY: a\nSUMMARY: b",
            Some(Approve),
            "b",
        );
        check_review("VERDICT: MAYBE", None, "");
        check_review("I think it is fine.", None, "");
        check_review("The verdict is APPROVE", None, "");
    }

    fn check_plan(text: &str, expected: Option<PlanResult>) {
        let got = parse_plan(text);
        match expected {
            Some(e) => assert_eq!(got.as_ref().ok(), Some(&e), "{text:?}: {got:?}"),
            None => assert!(got.is_err(), "{text:?}: {got:?}"),
        }
    }

    fn plan(plan: &str, summary: &str) -> Option<PlanResult> {
        Some(PlanResult::Plan {
            plan: plan.into(),
            summary: summary.into(),
        })
    }

    #[test]
    fn plans() {
        check_plan(
            "PLAN_START\nSUMMARY: Fix it.\n1. edit\nPLAN_END",
            plan("SUMMARY: Fix it.\n1. edit", "Fix it."),
        );
        check_plan(
            "prose\nPLAN_START\n**SUMMARY:** Fix it.\nPLAN_END\nmore",
            plan("**SUMMARY:** Fix it.", "Fix it."),
        );
        check_plan(
            "I will write PLAN_START…PLAN_END.\nPLAN_START\nSUMMARY: b\nPLAN_END",
            plan("SUMMARY: b", "b"),
        );
        check_plan(
            "SUMMARY: outside\nPLAN_START\n1. step\nPLAN_END",
            plan("1. step", "outside"),
        );
        check_plan("PLAN_START\n1. step\nPLAN_END", None);
        check_plan("PLAN_START\n\nPLAN_END", None);
        check_plan("PLAN_START\nSUMMARY: x\n", None);
        check_plan("nothing here", None);
        check_plan(
            "ALREADY_SATISFIED_START\nsrc/a.rs already does it.\nALREADY_SATISFIED_END",
            Some(PlanResult::AlreadySatisfied {
                explanation: "src/a.rs already does it.".into(),
            }),
        );
        check_plan(
            "PLAN_START\nSUMMARY: s\nPLAN_END\nALREADY_SATISFIED_START\nx\nALREADY_SATISFIED_END",
            plan("SUMMARY: s", "s"),
        );
    }

    #[test]
    fn already_satisfied_markers() {
        let check =
            |t: &str, e: Option<&str>| assert_eq!(already_satisfied(t).as_deref(), e, "{t:?}");
        check(
            "ALREADY_SATISFIED_START done ALREADY_SATISFIED_END",
            Some("done"),
        );
        check("ALREADY_SATISFIED_START\n\nALREADY_SATISFIED_END", Some(""));
        check("ALREADY_SATISFIED_START only", None);
        check("ALREADY_SATISFIED_END ALREADY_SATISFIED_START", None);
        check("", None);
    }

    fn check_triage(text: &str, ready: Option<bool>) {
        match (parse_triage(text), ready) {
            (Ok(t), Some(r)) => assert_eq!(t.ready, r, "{text:?}"),
            (Err(_), None) => {}
            (got, want) => panic!("{text:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn triage() {
        check_triage(r#"{"ready": true}"#, Some(true));
        check_triage(
            "Here is my answer:\n```json\n{\"ready\": false, \"reasons\": [\"no repro\"]}\n```\nThanks.",
            Some(false),
        );
        check_triage(
            r#"Example {"a": 1} then {"ready": true, "nested": {"ready": false}}"#,
            Some(true),
        );
        check_triage(
            r#"{"ready": false} and finally {"ready": true}"#,
            Some(true),
        );
        check_triage(
            r#"{ "x": "}" } {"ready": true, "reasons": ["a { brace"]}"#,
            Some(true),
        );
        check_triage(r#"{"ready": "yes"}"#, None);
        check_triage(r#"{"reasons": []}"#, None);
        check_triage(r#"{"ready": tru"#, None);
        check_triage("no json", None);
        let full = parse_triage(
            r#"{"ready": true, "reasons": ["clear"], "issue_type": "bug", "clarity_score": 8, "complexity_score": 2.5, "needs_discovery": true, "already_addressed": false}"#,
        );
        assert_eq!(
            full,
            Ok(TriageResult {
                ready: true,
                reasons: vec!["clear".into()],
                issue_type: Some("bug".into()),
                clarity_score: Some(8.0),
                complexity_score: Some(2.5),
                needs_discovery: true,
                already_addressed: false,
            })
        );
    }
}
