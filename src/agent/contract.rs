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

/// Find and parse the triage JSON object in `transcript`.
///
/// # Errors
/// [`ContractError`] saying what is missing or malformed.
pub fn parse_triage(transcript: &str) -> Result<TriageResult, ContractError> {
    let _ = transcript;
    todo!("agent helper implements this")
}

/// Extract the plan or the already-satisfied explanation.
///
/// # Errors
/// [`ContractError`] when neither marker pair is present or the plan is empty
/// or has no `SUMMARY:` line.
pub fn parse_plan(transcript: &str) -> Result<PlanResult, ContractError> {
    let _ = transcript;
    todo!("agent helper implements this")
}

/// Extract `VERDICT:` and `SUMMARY:`.
///
/// # Errors
/// [`ContractError`] when no verdict line is present.
pub fn parse_review(transcript: &str) -> Result<ReviewResult, ContractError> {
    let _ = transcript;
    todo!("agent helper implements this")
}

/// The text between `ALREADY_SATISFIED_START` and `ALREADY_SATISFIED_END`, if any.
pub fn already_satisfied(transcript: &str) -> Option<String> {
    let _ = transcript;
    todo!("agent helper implements this")
}

/// Recognise a usage-limit or auth-failure message in one line of output.
pub fn detect_block(line: &str) -> Option<AgentBlock> {
    let _ = line;
    todo!("agent helper implements this")
}
