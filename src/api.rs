//! The JSON shapes HydraFlow's servers send and its clients read: the
//! worker API (`dashboard::worker`), the supervisor dashboard
//! (`dashboard::supervisor`) and the control protocol's replies
//! (`supervisor::protocol`) share these types, so a server and its client
//! cannot disagree on a field. Each type names the route or reply it is;
//! documented in docs/design/dashboard.md and docs/design/protocol.md.

use serde::{Deserialize, Serialize};

/// State of one worker instance, in systemd's terms (org.freedesktop.systemd1(5)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// The repository slug (the unit's instance name).
    pub slug: String,
    /// `hydraflow@<slug>.service`.
    pub unit: String,
    /// `active`, `activating`, `deactivating`, `inactive`, `failed`, `reloading`.
    pub active_state: String,
    /// systemd's SubState (`running`, `start`, `dead`, `auto-restart`, …).
    pub sub_state: String,
    /// Main PID while running.
    pub main_pid: Option<u32>,
    /// Restarts since the unit was started (systemd `NRestarts`).
    pub n_restarts: u32,
    /// Memory in bytes (systemd `MemoryCurrent`), when known.
    pub memory_bytes: Option<u64>,
    /// When it last became active (RFC 3339 UTC), when known.
    pub active_since: Option<String>,
    /// systemd `Service.Result` (`success`, `exit-code`, `timeout`, `watchdog`, `start-limit-hit`, …).
    pub result: Option<String>,
}

impl InstanceStatus {
    /// `ActiveState` is `active` or `reloading`.
    pub fn running(&self) -> bool {
        matches!(self.active_state.as_str(), "active" | "reloading")
    }
}

/// One health check of `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Whether it passes.
    pub ok: bool,
    /// What was seen.
    pub detail: String,
}

/// A runtime's forge as `GET /healthz` shows it (for `hydraflow repo list`
/// and the supervisor dashboard).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgeInfo {
    /// `local` or `github`.
    pub name: String,
    /// Who it acts as (`token`, `GitHub App 7, installation 42`); none for
    /// the local forge.
    pub identity: Option<String>,
    /// The REST budget the last response announced (requests left, window,
    /// reset time in Unix seconds); none before the first request and for
    /// the local forge.
    pub budget: Option<crate::forge::RateBudget>,
}

/// One runtime's entry of `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeHealth {
    /// The slug.
    pub slug: String,
    /// Whether the loops run.
    pub running: bool,
    /// The `STATUS=` line (or `stopped`).
    pub status_line: String,
    /// Queue depths and in-flight counts per stage.
    pub queues: crate::pipeline::issue_store::Depths,
    /// Issues waiting for a human.
    pub hitl_waiting: usize,
    /// Issues merged or closed as satisfied in this session.
    pub done: u64,
    /// The forge, who it acts as and its API budget.
    pub forge: ForgeInfo,
}

/// `ok`, `degraded` (running, a check fails) or `stopped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    /// Every runtime runs and every check passes.
    Ok,
    /// Running, but a check fails (a paused pipeline).
    Degraded,
    /// No runtime, or one is stopped.
    Stopped,
}

/// `GET /healthz` of a worker (200 when ready, else 503).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// The summary.
    pub status: HealthStatus,
    /// Every runtime's loops are running.
    pub ready: bool,
    /// Checks by component (`orchestrator:<slug>`, `pipeline:<slug>`).
    pub checks: std::collections::BTreeMap<String, Check>,
    /// Seconds since the API started.
    pub uptime_seconds: f64,
    /// Per runtime.
    pub runtimes: Vec<RuntimeHealth>,
}

/// Where an issue of `GET /api/pipeline` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IssueStatus {
    /// In a stage's queue.
    Queued,
    /// Being worked on.
    Running,
    /// Waiting for a human.
    Waiting,
}

/// One issue of `GET /api/pipeline`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssueRow {
    /// The issue number.
    pub number: u64,
    /// Its title, when the issue store has it.
    pub title: Option<String>,
    /// Its page on the forge.
    pub url: Option<String>,
    /// Its labels.
    pub labels: Vec<String>,
    /// Where it is.
    pub status: IssueStatus,
    /// Its pull request, once opened.
    pub pull_request: Option<u64>,
    /// The pull request's page (GitHub only).
    pub pull_request_url: Option<String>,
    /// Attempts counted so far.
    pub attempts: u32,
}

/// `GET /api/pipeline`: issues per stage (queued, then in flight), and the
/// issues waiting for a human.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pipeline {
    /// The slug.
    pub repo: String,
    /// Issues per stage.
    pub stages: std::collections::BTreeMap<crate::agent::Stage, Vec<IssueRow>>,
    /// Issues waiting for a human.
    pub hitl_waiting: Vec<IssueRow>,
    /// Queue depths.
    pub depths: crate::pipeline::issue_store::Depths,
    /// Issues merged or closed as satisfied in this session.
    pub done: u64,
}

/// Today's agent cost in `GET /api/costs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostToday {
    /// The UTC day, `YYYY-MM-DD`.
    pub day: String,
    /// US dollars spent on it so far.
    pub usd: f64,
}

/// `GET /api/costs`: the agents' cost per issue and per UTC day (from
/// `agent-calls.jsonl`), today's total and `agent.daily_budget_usd`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Costs {
    /// US dollars per issue.
    pub per_issue: std::collections::BTreeMap<u64, f64>,
    /// Agent calls per issue.
    pub calls_per_issue: std::collections::BTreeMap<u64, u64>,
    /// US dollars per UTC day.
    pub per_day: std::collections::BTreeMap<String, f64>,
    /// Today.
    pub today: CostToday,
    /// The configured daily budget, if any.
    pub daily_budget_usd: Option<f64>,
}

/// `POST /api/wake`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Woke {
    /// The runtime woken.
    pub slug: String,
    /// False when its loops are stopped.
    pub woke: bool,
    /// Whether it polls the forge now (not when every sender is its own login).
    pub polled: bool,
}

/// One entry of `GET /api/runtimes` (and `/api/runtimes/{slug}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeInfo {
    /// The slug.
    pub slug: String,
    /// Whether its loops run.
    pub running: bool,
    /// The `STATUS=` line.
    pub status_line: String,
    /// The checkout.
    pub repo_path: std::path::PathBuf,
    /// Its data directory.
    pub data_dir: std::path::PathBuf,
    /// `local` or `github`.
    pub forge: crate::config::ForgeKind,
}

/// One issue of `GET /api/hitl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HitlItem {
    /// The issue number.
    pub issue: u64,
    /// Its title, when known.
    pub title: Option<String>,
    /// The stage that escalated.
    pub stage: crate::agent::Stage,
    /// The pipeline label it held before (where a correction returns it).
    pub origin: String,
    /// Why, in words.
    pub cause: String,
    /// When (RFC 3339 UTC).
    pub escalated_at: chrono::DateTime<chrono::Utc>,
    /// A command received and not yet applied.
    pub pending: Option<crate::store::state::HitlCommand>,
}

/// The answer to `POST /api/hitl/{n}/correct|skip|close`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HitlAccepted {
    /// The issue number.
    pub issue: u64,
    /// Always true (a refusal is an error status).
    pub accepted: bool,
    /// The command as spooled.
    pub command: crate::store::state::HitlCommand,
    /// The spool file it was written to.
    pub spool_file: std::path::PathBuf,
}

/// The worker of one row of the supervisor dashboard's `GET /api/repos`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerHealth {
    /// Whether its `/healthz` answered with JSON.
    pub up: bool,
    /// The status it answered with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// What it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// Why it could not be asked or read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One row of the supervisor dashboard's `GET /api/repos`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RepoRow {
    /// The slug.
    pub slug: String,
    /// The checkout, for a repository registered by path.
    pub path: Option<std::path::PathBuf>,
    /// Its worker's API socket.
    pub socket: std::path::PathBuf,
    /// The backend's status of its instance.
    pub unit: Option<InstanceStatus>,
    /// Why the backend could not tell.
    pub unit_error: Option<String>,
    /// Its worker.
    pub worker: WorkerHealth,
}

/// The supervisor dashboard's `GET /api/repos`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Repos {
    /// Every registered repository.
    pub repos: Vec<RepoRow>,
    /// WebSocket frames dropped for slow browsers so far.
    pub dropped_frames: u64,
}
