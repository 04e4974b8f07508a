//! How a failed agent call is handled, decided here and nowhere else: an
//! [`AgentFailure`] says whether the failure counts as an attempt at the issue
//! (the agent's work failed), is retried later without counting (the model
//! API is overloaded, rate limited or unreachable), or pauses the whole
//! pipeline (a problem every issue would hit: authentication, a usage or
//! credit limit, the CLI refusing to run as root, a missing agent program).
//!
//! Structured fields first, text second:
//! 1. The kernel's OOM killer (the call's cgroup `memory.events`) and the
//!    timeout.
//! 2. Claude Code's `stream-json`: an assistant message carrying `error`
//!    (`authentication_failed`, `billing_error`, `rate_limit`,
//!    `server_error`, …) with `api_error_status` and `api_error`
//!    (`usage_limit_reached`, `connection_failed`), a `rate_limit_event`
//!    whose status is `rejected` (with `resetsAt`), and the `result` event
//!    (`is_error`, `api_error_status`, `terminal_reason`, `subtype`). The
//!    shapes are those Claude Code 2.1.328 prints for each API fault,
//!    recorded in `tests/fixtures/claude-stream-json/api-faults/`.
//! 3. Codex's `error` and `turn.failed` events, whose messages carry the
//!    HTTP status ("unexpected status 401 Unauthorized", "exceeded retry
//!    limit, last status: 429 Too Many Requests", "stream disconnected
//!    before completion"), recorded in `tests/fixtures/codex-exec-json/api-faults/`.
//! 4. Text, and only the text of a failed call (an error result, error
//!    events, stderr, the non-JSON lines of stdout): usage-limit and
//!    authentication phrases ([`super::contract::detect_block`]), an HTTP
//!    status, the root refusal. A successful call whose answer merely
//!    mentions "usage limit reached" is a success.
//!
//! The cause recorded for a failure is the agent's own error text (its error
//! result or error event, else stderr without known noise lines such as
//! Codex's "Reading additional input from stdin...").

use std::time::Duration;

use chrono::{Local, NaiveTime, TimeZone as _};
use serde::Serialize;

use super::contract::detect_block;
use super::{AgentBlock, AgentError, AgentOutcome};

/// How a failed agent call is handled.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "class", rename_all = "snake_case")]
pub enum AgentFailure {
    /// The agent's work failed: counts toward `max_issue_attempts`.
    Attempt {
        /// Why, in the agent's words where it gave any.
        cause: String,
    },
    /// Transient (overloaded, rate limited, unreachable model API): retry the
    /// issue after a backoff, honouring `retry_after` when known; no attempt
    /// is counted.
    Later {
        /// Why.
        cause: String,
        /// How long the agent or its API asked to wait.
        retry_after: Option<Duration>,
    },
    /// Wrong for every issue: the whole pipeline waits until `until` (Unix
    /// seconds) when known, else until a later call succeeds.
    Pause {
        /// What an operator reads (`STATUS=`, the journal, events).
        reason: String,
        /// What kind of problem.
        kind: PauseKind,
        /// When it is expected to clear (a usage limit's reset time, the
        /// next day for the daily budget).
        until: Option<u64>,
    },
}

/// Why the pipeline pauses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PauseKind {
    /// The model API refused the credentials (401, 403, not logged in).
    Auth,
    /// A usage or credit limit of the account.
    UsageLimit,
    /// The agent CLI refuses to run as root with the permission flags HydraFlow passes.
    RootRefusal,
    /// The agent program is missing or not executable.
    MissingBinary,
    /// `agent.daily_budget_usd` is spent for the day.
    Budget,
    /// The agent configuration cannot produce a command line.
    Config,
}

impl AgentFailure {
    /// The cause or reason text.
    pub fn cause(&self) -> &str {
        match self {
            AgentFailure::Attempt { cause } | AgentFailure::Later { cause, .. } => cause,
            AgentFailure::Pause { reason, .. } => reason,
        }
    }

    /// `attempt`, `later` or `pause`.
    pub fn class(&self) -> &'static str {
        match self {
            AgentFailure::Attempt { .. } => "attempt",
            AgentFailure::Later { .. } => "later",
            AgentFailure::Pause { .. } => "pause",
        }
    }
}

/// What Claude Code prints (on stderr, exit 1) when asked to skip permission
/// prompts as root.
const ROOT_REFUSAL: &str = "cannot be used with root/sudo privileges";

/// Stderr lines that are never the cause of a failure (Codex prints the
/// first when it reads its prompt from stdin, the second when `CODEX_HOME`
/// is under a temporary directory).
const STDERR_NOISE: &[&str] = &[
    "Reading additional input from stdin",
    "WARNING: proceeding, even though we could not create PATH aliases",
];

/// Longest cause kept, in characters.
const MAX_CAUSE: usize = 500;

fn clip(text: &str) -> String {
    let text = text.trim();
    if text.chars().count() <= MAX_CAUSE {
        return text.to_string();
    }
    let mut out: String = text.chars().take(MAX_CAUSE).collect();
    out.push('…');
    out
}

/// The meaningful lines of stderr, last first.
fn stderr_lines(o: &AgentOutcome) -> impl Iterator<Item = &str> {
    o.stderr_tail
        .lines()
        .rev()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !STDERR_NOISE.iter().any(|n| l.starts_with(n)))
}

/// How the process ended, as the start of a cause.
fn ending(o: &AgentOutcome) -> String {
    match (o.exit_code, o.signal) {
        (Some(0), _) => "agent reported an error".to_string(),
        (Some(code), _) => format!("agent exited with code {code}"),
        (None, Some(sig)) => format!("agent was killed by signal {sig}"),
        (None, None) => "agent was killed".to_string(),
    }
}

/// The agent's own error text: its error result or error events, else
/// stderr's last meaningful line, else the last line of its non-JSON output.
fn own_error_text(o: &AgentOutcome) -> String {
    let s = &o.signals;
    let from_stream = s
        .result
        .as_ref()
        .filter(|r| r.is_error)
        .and_then(|r| r.text.clone())
        .filter(|t| !t.trim().is_empty())
        .or_else(|| s.api_error.as_ref().map(|a| a.text.clone()))
        .or_else(|| s.errors.last().cloned())
        .filter(|t| !t.trim().is_empty());
    from_stream
        .or_else(|| stderr_lines(o).next().map(str::to_string))
        .or_else(|| {
            s.junk
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// `ending: text`, or `ending` alone.
fn cause_of(o: &AgentOutcome) -> String {
    let text = own_error_text(o);
    if text.is_empty() {
        ending(o)
    } else {
        format!("{}: {}", ending(o), clip(&text))
    }
}

/// The first HTTP status (400–599) after "status" in `text`, e.g.
/// "unexpected status 401 Unauthorized", "last status: 429", "API Error: 500".
fn http_status(text: &str) -> Option<u16> {
    let lower = text.to_lowercase();
    for key in ["status", "api error"] {
        let mut rest = lower.as_str();
        while let Some(at) = rest.find(key) {
            rest = &rest[at + key.len()..];
            let digits: String = rest
                .trim_start_matches([':', ' ', '('])
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if digits.len() == 3
                && let Ok(n) = digits.parse::<u16>()
                && (400..600).contains(&n)
            {
                return Some(n);
            }
        }
    }
    None
}

/// "try again in 20s" / "try again in 1.5s" / "retry after 30 seconds".
fn retry_after_text(text: &str) -> Option<Duration> {
    let lower = text.to_lowercase();
    for key in ["try again in ", "retry after "] {
        if let Some(at) = lower.find(key) {
            let number: String = lower[at + key.len()..]
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            if let Ok(secs) = number.parse::<f64>()
                && secs.is_finite()
                && secs >= 0.0
            {
                return Some(Duration::from_secs_f64(secs.ceil()));
            }
        }
    }
    None
}

/// "try again at 4:45 PM" (Codex's usage limit): the next such local time, as Unix seconds.
fn reset_clock_time(text: &str, now: i64) -> Option<u64> {
    let lower = text.to_lowercase();
    let at = lower.find("try again at ")?;
    let rest = &text[at + "try again at ".len()..];
    let words: Vec<&str> = rest.split_whitespace().take(2).collect();
    let candidate = words.join(" ").trim_end_matches('.').to_uppercase();
    let time = NaiveTime::parse_from_str(&candidate, "%I:%M %p").ok()?;
    let today = Local.timestamp_opt(now, 0).single()?.date_naive();
    for day in [today, today.succ_opt()?] {
        let t = Local
            .from_local_datetime(&day.and_time(time))
            .earliest()?
            .timestamp();
        if t > now {
            return u64::try_from(t).ok();
        }
    }
    None
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

fn usage_limit(message: &str, until: Option<u64>) -> AgentFailure {
    AgentFailure::Pause {
        reason: format!("agent usage limit reached: {}", clip(message)),
        kind: PauseKind::UsageLimit,
        until,
    }
}

fn auth(message: &str) -> AgentFailure {
    AgentFailure::Pause {
        reason: format!(
            "agent authentication failed: {}: check the model API key or login the agent \
             uses (credentials anthropic-api-key, openai-api-key or claude-oauth-token)",
            clip(message)
        ),
        kind: PauseKind::Auth,
        until: None,
    }
}

/// Claude Code's structured fields.
fn claude(o: &AgentOutcome) -> Option<AgentFailure> {
    let s = &o.signals;
    let api = s.api_error.as_ref();
    let result = s.result.as_ref().filter(|r| r.is_error);
    let rejected = s.rate_limit.as_ref().filter(|r| r.status == "rejected");
    if api.is_none() && result.is_none() && rejected.is_none() {
        return None;
    }
    let text = own_error_text(o);
    let status = api
        .and_then(|a| a.status)
        .or(result.and_then(|r| r.api_error_status));
    let kind = api.map(|a| a.error.as_str()).unwrap_or("");
    let detail = api.and_then(|a| a.detail.as_deref()).unwrap_or("");
    if rejected.is_some() || detail == "usage_limit_reached" || kind == "billing_error" {
        let until = api
            .and_then(|a| a.resets_at)
            .or(rejected.and_then(|r| r.resets_at));
        return Some(usage_limit(&text, until));
    }
    if kind == "authentication_failed" || matches!(status, Some(401 | 403)) {
        return Some(auth(&text));
    }
    let cause = format!("{}: {}", ending(o), clip(&text));
    let api_failed = result.is_some_and(|r| r.terminal_reason.as_deref() == Some("api_error"));
    if status == Some(429) || kind == "rate_limit" {
        return Some(AgentFailure::Later {
            cause,
            retry_after: retry_after_text(&text),
        });
    }
    if status.is_some_and(|s| s >= 500)
        || kind == "server_error"
        || detail == "connection_failed"
        || (api_failed && status.is_none())
    {
        return Some(AgentFailure::Later {
            cause,
            retry_after: None,
        });
    }
    if let Some(r) = result
        && r.subtype == "error_max_turns"
    {
        return Some(AgentFailure::Attempt {
            cause: format!(
                "agent stopped at its turn limit (error_max_turns): {}",
                clip(&text)
            ),
        });
    }
    Some(AgentFailure::Attempt { cause })
}

/// Words of a transient failure in an error message.
const TRANSIENT_PHRASES: &[&str] = &[
    "stream disconnected",
    "high demand",
    "temporar",
    "overloaded",
    "connection reset",
    "connection refused",
    "connection was lost",
    "timed out",
    "error sending request",
    "network error",
];

/// Text classification of an error message (Codex's events, plain agents).
fn by_text(o: &AgentOutcome, message: &str) -> Option<AgentFailure> {
    match detect_block(message) {
        Some(AgentBlock::UsageLimit { message, resets_at }) => {
            let until = resets_at.or_else(|| reset_clock_time(&message, now_secs()));
            return Some(usage_limit(&message, until));
        }
        Some(AgentBlock::Auth { message }) => return Some(auth(&message)),
        None => {}
    }
    let lower = message.to_lowercase();
    if lower.contains("quota exceeded") {
        return Some(usage_limit(message, None));
    }
    let cause = format!("{}: {}", ending(o), clip(message));
    match http_status(message) {
        Some(401 | 403) => Some(auth(message)),
        Some(429) => Some(AgentFailure::Later {
            cause,
            retry_after: retry_after_text(message),
        }),
        Some(s) if s >= 500 => Some(AgentFailure::Later {
            cause,
            retry_after: None,
        }),
        _ if TRANSIENT_PHRASES.iter().any(|p| lower.contains(p)) => Some(AgentFailure::Later {
            cause,
            retry_after: retry_after_text(message),
        }),
        _ => None,
    }
}

/// Classify a finished call; `None` when it succeeded. See the module docs
/// for the order of the checks.
pub fn classify(o: &AgentOutcome) -> Option<AgentFailure> {
    if o.succeeded() {
        return None;
    }
    if o.resources.oom_kills > 0 {
        let limit = o
            .resources
            .memory_max
            .map_or_else(String::new, |m| format!(" ({m} bytes)"));
        return Some(AgentFailure::Attempt {
            cause: format!(
                "the agent was killed by the kernel: its cgroup went past agent.memory_max{limit} \
                 ({} OOM kill{}); raise agent.memory_max or make the work smaller",
                o.resources.oom_kills,
                if o.resources.oom_kills == 1 { "" } else { "s" }
            ),
        });
    }
    if o.timed_out {
        return Some(AgentFailure::Attempt {
            cause: format!(
                "agent timed out after {} s and was killed",
                o.timeout.as_secs()
            ),
        });
    }
    if let Some(line) = stderr_lines(o).find(|l| l.contains(ROOT_REFUSAL)) {
        return Some(AgentFailure::Pause {
            reason: format!(
                "the agent refuses to run as root: {}: run HydraFlow as an unprivileged user \
                 (the packaged hydraflow@.service does)",
                clip(line)
            ),
            kind: PauseKind::RootRefusal,
            until: None,
        });
    }
    if let Some(f) = claude(o) {
        return Some(f);
    }
    // Codex's error events: the last one is the most specific ("turn.failed").
    if let Some(f) = o.signals.errors.last().and_then(|m| by_text(o, m)) {
        return Some(f);
    }
    // Text of a failed call: stderr and the non-JSON stdout lines.
    let lines: Vec<&str> = stderr_lines(o)
        .chain(o.signals.junk.lines().rev())
        .collect();
    if let Some(f) = lines.iter().find_map(|l| by_text(o, l)) {
        return Some(f);
    }
    Some(AgentFailure::Attempt { cause: cause_of(o) })
}

/// Classify an error that kept the call from running or finishing: a missing
/// or non-executable program pauses; HydraFlow's own files failing (the
/// transcript, the prompt file, the call's cgroup) is never the agent's
/// fault and is retried later; a configuration that cannot make a command
/// line pauses.
pub fn classify_error(e: &AgentError) -> AgentFailure {
    match e {
        AgentError::Spawn {
            program,
            cause: source,
        } => match source.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                AgentFailure::Pause {
                    reason: format!(
                        "agent program {program:?} cannot be run: {source}: install it on the \
                         worker's PATH or set agent.command (`hydraflow config check` lists \
                         each stage's program)"
                    ),
                    kind: PauseKind::MissingBinary,
                    until: None,
                }
            }
            _ => AgentFailure::Later {
                cause: format!("cannot start agent {program:?}: {source}"),
                retry_after: None,
            },
        },
        AgentError::Io(source) => AgentFailure::Later {
            cause: format!("HydraFlow cannot write its agent files: {source}"),
            retry_after: None,
        },
        AgentError::Config(message) => AgentFailure::Pause {
            reason: format!("agent configuration: {message}"),
            kind: PauseKind::Config,
            until: None,
        },
    }
}

/// The pause for a spent daily budget: `over` is
/// [`crate::store::sessions::over_budget`]'s answer (the next UTC midnight
/// when today's cost reached `budget_usd`). A ledger that cannot be read
/// does not stop agents; it is logged.
pub fn budget_pause(
    over: Result<Option<u64>, crate::store::StoreError>,
    budget_usd: Option<f64>,
) -> Option<AgentFailure> {
    match over {
        Ok(Some(until)) => Some(AgentFailure::Pause {
            reason: format!(
                "agent.daily_budget_usd ({:.2} USD) is spent for today (UTC); agents run again at \
                 the next UTC midnight",
                budget_usd.unwrap_or(0.0)
            ),
            kind: PauseKind::Budget,
            until: Some(until),
        }),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the agent call ledger to check the daily budget");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::OutputFormat;
    use crate::agent::parse::parse_all;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");

    fn fixture(path: &str) -> String {
        std::fs::read_to_string(format!("{FIXTURES}{path}"))
            .unwrap_or_else(|e| panic!("cannot read fixture {path}: {e}"))
    }

    fn outcome(format: OutputFormat, stdout: &str, stderr: &str, exit: i32) -> AgentOutcome {
        let (_, summary) = parse_all(format, stdout);
        AgentOutcome {
            exit_code: Some(exit),
            transcript: summary.transcript,
            is_error: summary.is_error,
            signals: summary.signals,
            stderr_tail: stderr.to_string(),
            timeout: Duration::from_secs(60),
            ..AgentOutcome::default()
        }
    }

    /// `class` of the failure, and whether its cause contains `text`.
    fn check(o: &AgentOutcome, class: &str, kind: Option<PauseKind>, text: &str) {
        let f = o.failure().unwrap_or_else(|| panic!("no failure: {o:?}"));
        assert_eq!(f.class(), class, "{f:?}");
        if let AgentFailure::Pause { kind: k, .. } = &f {
            assert_eq!(Some(*k), kind, "{f:?}");
        }
        assert!(f.cause().contains(text), "{f:?} lacks {text:?}");
    }

    fn claude(name: &str) -> AgentOutcome {
        outcome(
            OutputFormat::ClaudeStreamJson,
            &fixture(&format!(
                "claude-stream-json/api-faults/claude-2.1.328_{name}.jsonl"
            )),
            "",
            1,
        )
    }

    fn codex(name: &str) -> AgentOutcome {
        outcome(
            OutputFormat::CodexJson,
            &fixture(&format!(
                "codex-exec-json/api-faults/codex-0.169.0_{name}.jsonl"
            )),
            &fixture("codex-exec-json/api-faults/codex-0.169.0_401.stderr"),
            1,
        )
    }

    #[test]
    fn claude_faults_recorded_from_the_real_cli() {
        use PauseKind::*;
        check(
            &claude("401"),
            "pause",
            Some(Auth),
            "Failed to authenticate. API Error: 401",
        );
        check(&claude("403"), "pause", Some(Auth), "API Error: 403");
        check(&claude("nokey"), "pause", Some(Auth), "Not logged in");
        check(
            &claude("429"),
            "later",
            None,
            "agent exited with code 1: API Error: Request rejected (429)",
        );
        check(&claude("529"), "later", None, "API Error: 529");
        check(&claude("500"), "later", None, "API Error: 500 scripted 500");
        check(
            &claude("cut"),
            "later",
            None,
            "Connection to the API was lost",
        );
        check(
            &claude("400-credit-balance"),
            "pause",
            Some(UsageLimit),
            "Credit balance is too low",
        );
        let limit = claude("429-usage-limit-oauth");
        check(&limit, "pause", Some(UsageLimit), "hit your 5-hour limit");
        assert!(
            matches!(
                limit.failure(),
                Some(AgentFailure::Pause {
                    until: Some(1_795_797_943),
                    ..
                })
            ),
            "{:?}",
            limit.failure()
        );
        // The same run exiting 0 with a good result is a success.
        let ok = outcome(
            OutputFormat::ClaudeStreamJson,
            &fixture("claude-stream-json/api-faults/claude-2.1.328_success.jsonl"),
            "",
            0,
        );
        assert_eq!(ok.failure(), None);
    }

    #[test]
    fn claude_root_refusal_pauses() {
        let o = outcome(
            OutputFormat::ClaudeStreamJson,
            "",
            &fixture("claude-stream-json/api-faults/claude-2.1.328_root-refusal.stderr"),
            1,
        );
        check(
            &o,
            "pause",
            Some(PauseKind::RootRefusal),
            "run HydraFlow as an unprivileged user",
        );
        check(
            &o,
            "pause",
            Some(PauseKind::RootRefusal),
            "--dangerously-skip-permissions cannot be used",
        );
    }

    #[test]
    fn codex_faults_recorded_from_the_real_cli() {
        check(
            &codex("401"),
            "pause",
            Some(PauseKind::Auth),
            "unexpected status 401 Unauthorized",
        );
        check(
            &codex("429"),
            "later",
            None,
            "last status: 429 Too Many Requests",
        );
        check(&codex("500"), "later", None, "high demand");
        check(
            &codex("cut"),
            "later",
            None,
            "stream disconnected before completion",
        );
        check(
            &codex("429-usage-limit"),
            "pause",
            Some(PauseKind::UsageLimit),
            "hit your usage limit",
        );
        // The cause is never Codex's "Reading additional input from stdin..." line.
        for name in ["401", "429", "500", "cut"] {
            let f = codex(name).failure();
            assert!(
                !f.as_ref()
                    .is_some_and(|f| f.cause().contains("Reading additional input")),
                "{name}: {f:?}"
            );
        }
        let quota = outcome(
            OutputFormat::CodexJson,
            "{\"type\":\"turn.failed\",\"error\":{\"message\":\"Quota exceeded. Check your plan and billing details.\"}}\n",
            "",
            1,
        );
        check(
            &quota,
            "pause",
            Some(PauseKind::UsageLimit),
            "Quota exceeded",
        );
    }

    #[test]
    fn limit_phrases_only_in_failed_calls() {
        let said = "{\"type\":\"result\",\"subtype\":\"success\",\"is_error\":false,\"result\":\"I documented the usage limit reached message.\"}\n";
        let o = outcome(OutputFormat::ClaudeStreamJson, said, "", 0);
        assert_eq!(o.failure(), None);
        let plain = outcome(
            OutputFormat::Plain,
            "Claude AI usage limit reached|1750000000\n",
            "",
            0,
        );
        assert_eq!(plain.failure(), None);
        let failed = outcome(
            OutputFormat::Plain,
            "Claude AI usage limit reached|1750000000\n",
            "",
            1,
        );
        assert!(
            matches!(
                failed.failure(),
                Some(AgentFailure::Pause {
                    kind: PauseKind::UsageLimit,
                    until: Some(1_750_000_000),
                    ..
                })
            ),
            "{:?}",
            failed.failure()
        );
    }

    #[test]
    fn plain_agents_and_causes() {
        let o = outcome(
            OutputFormat::Plain,
            "working\n",
            "boom: tests failed\nReading additional input from stdin...\n",
            2,
        );
        check(
            &o,
            "attempt",
            None,
            "agent exited with code 2: boom: tests failed",
        );
        let o = outcome(OutputFormat::Plain, "step\nlast words\n", "", 3);
        check(&o, "attempt", None, "agent exited with code 3: last words");
        let o = outcome(
            OutputFormat::Plain,
            "",
            "Error: 503 Service Unavailable (status 503)\n",
            1,
        );
        check(&o, "later", None, "503");
        let o = outcome(
            OutputFormat::Plain,
            "",
            "Invalid API key · Please run /login\n",
            1,
        );
        check(&o, "pause", Some(PauseKind::Auth), "Invalid API key");
        let mut o = outcome(OutputFormat::Plain, "", "", 0);
        o.exit_code = None;
        o.timed_out = true;
        check(&o, "attempt", None, "agent timed out after 60 s");
        let mut o = outcome(OutputFormat::Plain, "", "", 0);
        o.exit_code = None;
        o.signal = Some(9);
        o.resources.oom_kills = 1;
        o.resources.memory_max = Some(1 << 20);
        check(
            &o,
            "attempt",
            None,
            "killed by the kernel: its cgroup went past agent.memory_max (1048576 bytes)",
        );
    }

    #[test]
    fn errors_of_the_call() {
        let missing = AgentError::Spawn {
            program: "claude".into(),
            cause: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let f = missing.failure();
        assert!(
            matches!(
                f,
                AgentFailure::Pause {
                    kind: PauseKind::MissingBinary,
                    ..
                }
            ),
            "{f:?}"
        );
        assert!(f.cause().contains("\"claude\""), "{f:?}");
        let io = AgentError::Io(std::io::Error::other(
            "cannot write /data/logs/issue-1.txt: disk full",
        ));
        let f = io.failure();
        assert_eq!(f.class(), "later");
        assert!(f.cause().contains("/data/logs/issue-1.txt"), "{f:?}");
    }

    #[test]
    fn texts() {
        assert_eq!(
            http_status("unexpected status 401 Unauthorized: x"),
            Some(401)
        );
        assert_eq!(
            http_status("exceeded retry limit, last status: 429 Too Many"),
            Some(429)
        );
        assert_eq!(http_status("API Error: 500 scripted"), Some(500));
        assert_eq!(http_status("status 200"), None);
        assert_eq!(http_status("no number"), None);
        assert_eq!(
            retry_after_text("Please try again in 1.5s."),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            retry_after_text("retry after 30 seconds"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(retry_after_text("try again later"), None);
        let now = Local
            .with_ymd_and_hms(2026, 3, 10, 15, 0, 0)
            .single()
            .map(|t| t.timestamp())
            .unwrap_or_default();
        assert_eq!(
            reset_clock_time("or try again at 4:45 PM.", now),
            u64::try_from(now + 6300).ok()
        );
        assert_eq!(
            reset_clock_time("try again at 2:00 PM", now),
            u64::try_from(now + 23 * 3600).ok()
        );
        assert_eq!(reset_clock_time("try again later", now), None);
    }
}
