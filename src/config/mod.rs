//! Configuration: the typed schema, its defaults (docs/design/configuration.md), and loading in
//! layers — built-in defaults, the global `hydraflow.toml`, the per-instance
//! `repos/<slug>.toml`, then `HYDRAFLOW_<KEY>` environment overrides — with
//! the source of every value recorded for `hydraflow config show`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Default location of the global configuration file.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/hydraflow/hydraflow.toml";
/// Default directory of per-instance configuration files.
pub const DEFAULT_REPOS_DIR: &str = "/etc/hydraflow/repos";
/// Environment variable naming the global configuration file.
pub const CONFIG_ENV: &str = "HYDRAFLOW_CONFIG";
/// Environment variable naming the data root (docs/design/data-layout.md).
pub const HOME_ENV: &str = "HYDRAFLOW_HOME";

/// Which forge the worker talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ForgeKind {
    /// The embedded local forge: issues and pull requests under `data_root/<slug>/forge/`.
    #[default]
    Local,
    /// GitHub or GitHub Enterprise Server.
    Github,
}

/// The whole effective configuration of one worker. Every field has a default,
/// so an empty file is a valid configuration. Durations are whole seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// GitHub `owner/name` of the repository (required for the GitHub forge).
    pub repo: Option<String>,
    /// Path of the repository's checkout; `hydraflow run` defaults it to the current directory.
    pub repo_path: Option<PathBuf>,
    /// The instance slug; derived from `repo` or the checkout's directory name when unset.
    pub slug: Option<String>,
    /// Which forge to use.
    pub forge: ForgeKind,
    /// The base branch pull requests target.
    pub main_branch: String,
    /// Where worktrees go; default `<repo_path>/../hydraflow-worktrees`
    /// (docs/design/data-layout.md).
    pub worktree_base: Option<PathBuf>,
    /// Directory of per-instance files (`<repos_dir>/<slug>.toml`); global file only.
    pub repos_dir: PathBuf,
    /// Seconds an idle stage loop sleeps before looking again.
    pub poll_interval: u64,
    /// Seconds between refreshes of the issue store from the forge.
    pub data_poll_interval: u64,
    /// Seconds an agent call may run before its process group is killed.
    pub agent_timeout: u64,
    /// Failed attempts at one issue before it escalates to HITL.
    pub max_issue_attempts: u32,
    /// Seconds to wait for CI checks on a pull request.
    pub ci_check_timeout: u64,
    /// Seconds between CI check polls.
    pub ci_poll_interval: u64,
    /// A shell command run in the worktree after implementation (e.g. `make quality`); must exit 0.
    pub quality_command: Option<String>,
    /// Only pick up issues opened by collaborators (GitHub forge).
    pub collaborators_only: bool,
    /// Concurrency limits per stage.
    pub limits: Limits,
    /// Escalation thresholds.
    pub escalation: Escalation,
    /// Pipeline label names.
    pub labels: Labels,
    /// Agent command lines and prompts.
    pub agent: AgentConfig,
    /// `events.jsonl` rotation.
    pub events: EventsConfig,
    /// GitHub settings.
    pub github: GithubConfig,
    /// Supervisor settings (global file).
    pub supervisor: SupervisorConfig,
    /// Dashboard settings.
    pub dashboard: DashboardConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            repo: None,
            repo_path: None,
            slug: None,
            forge: ForgeKind::Local,
            main_branch: "main".into(),
            worktree_base: None,
            repos_dir: PathBuf::from(DEFAULT_REPOS_DIR),
            poll_interval: 30,
            data_poll_interval: 300,
            agent_timeout: 3600,
            max_issue_attempts: 3,
            ci_check_timeout: 600,
            ci_poll_interval: 30,
            quality_command: None,
            collaborators_only: true,
            limits: Limits::default(),
            escalation: Escalation::default(),
            labels: Labels::default(),
            agent: AgentConfig::default(),
            events: EventsConfig::default(),
            github: GithubConfig::default(),
            supervisor: SupervisorConfig::default(),
            dashboard: DashboardConfig::default(),
        }
    }
}

/// Per-stage concurrency limits (1 to 10 each).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Concurrent triage tasks.
    pub max_triagers: usize,
    /// Concurrent planning tasks.
    pub max_planners: usize,
    /// Concurrent implementation tasks.
    pub max_workers: usize,
    /// Concurrent review tasks.
    pub max_reviewers: usize,
    /// Concurrent HITL correction tasks.
    pub max_hitl_workers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_triagers: 1,
            max_planners: 1,
            max_workers: 1,
            max_reviewers: 1,
            max_hitl_workers: 1,
        }
    }
}

/// When an issue escalates to a human (docs/design/pipeline.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Escalation {
    /// Retries of a plan that fails validation.
    pub plan_retries: u32,
    /// Review-fix rounds before escalating.
    pub review_fix_rounds: u32,
    /// CI-fix rounds before escalating.
    pub ci_fix_rounds: u32,
    /// Merge-conflict fixes before escalating.
    pub merge_conflict_fixes: u32,
    /// Polls of a review-labelled issue without a pull request before escalating.
    pub no_pr_polls: u32,
}

impl Default for Escalation {
    fn default() -> Self {
        Escalation {
            plan_retries: 1,
            review_fix_rounds: 3,
            ci_fix_rounds: 2,
            merge_conflict_fixes: 3,
            no_pr_polls: 3,
        }
    }
}

/// Pipeline label names (docs/design/pipeline.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Labels {
    /// Triage queue.
    pub find: String,
    /// Planning.
    pub plan: String,
    /// Ready to implement.
    pub ready: String,
    /// Pull request open, under review.
    pub review: String,
    /// Waiting for a human.
    pub hitl: String,
    /// A human correction is being applied.
    pub hitl_active: String,
    /// Merged, done.
    pub fixed: String,
    /// Marker: an agent is working on the issue.
    pub in_progress: String,
    /// Marker: never pick up.
    pub human_required: String,
    /// Parking: triage needs more information from the author.
    pub parked: String,
}

impl Default for Labels {
    fn default() -> Self {
        Labels {
            find: "hydraflow-find".into(),
            plan: "hydraflow-plan".into(),
            ready: "hydraflow-ready".into(),
            review: "hydraflow-review".into(),
            hitl: "hydraflow-hitl".into(),
            hitl_active: "hydraflow-hitl-active".into(),
            fixed: "hydraflow-fixed".into(),
            in_progress: "hydraflow-in-progress".into(),
            human_required: "human-required".into(),
            parked: "hydraflow-parked".into(),
        }
    }
}

/// The agent presets `agent.preset` may name.
pub const PRESETS: &[&str] = &["claude", "codex", "command"];
/// The output formats `agent.output` may name.
pub const OUTPUTS: &[&str] = &["plain", "claude-stream-json", "codex-json"];

/// A string that must be one of `allowed`: the error (which toml places at the value's line
/// and key) names the value and what is allowed.
fn one_of<'de, D: serde::Deserializer<'de>>(
    d: D,
    what: &str,
    allowed: &[&str],
) -> Result<String, D::Error> {
    let value = String::deserialize(d)?;
    if allowed.contains(&value.as_str()) {
        return Ok(value);
    }
    let (last, rest) = allowed.split_last().unwrap_or((&"", &[]));
    Err(serde::de::Error::custom(format!(
        "{what} {value:?} is not known: use {} or {last}",
        rest.join(", ")
    )))
}

fn one_of_presets<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    one_of(d, "agent preset", PRESETS)
}

fn maybe_one_of_presets<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    one_of(d, "agent preset", PRESETS).map(Some)
}

fn maybe_one_of_outputs<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    one_of(d, "agent output format", OUTPUTS).map(Some)
}

/// Agent presets and per-stage command lines (docs/design/agents.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// `claude`, `codex` or `command` ([`PRESETS`]); each stage may override it.
    #[serde(deserialize_with = "one_of_presets")]
    pub preset: String,
    /// argv template for the `command` preset. Placeholders: `{{prompt}}`,
    /// `{{prompt_file}}`, `{{model}}`, `{{stage}}`, `{{issue}}`, `{{cwd}}`. Without
    /// `{{prompt}}` or `{{prompt_file}}` the prompt goes to stdin.
    pub command: Vec<String>,
    /// How to read the command's stdout: `plain`, `claude-stream-json` or `codex-json`
    /// ([`OUTPUTS`]).
    #[serde(deserialize_with = "maybe_one_of_outputs")]
    pub output: Option<String>,
    /// Directory of prompt templates overriding the built-in ones (`<stage>.md`).
    pub prompts_dir: Option<PathBuf>,
    /// Pass the GitHub token to agents (as `GH_TOKEN`).
    pub allow_token: bool,
    /// Extra environment variables for agents.
    pub env: BTreeMap<String, String>,
    /// More variables of the worker's environment passed to agents, beyond
    /// the built-in allow-list: names, or prefixes ending in `*` (`AWS_*`).
    pub pass_env: Vec<String>,
    /// `memory.max` of each agent call's cgroup, in bytes (cgroup mode only).
    pub memory_max: Option<u64>,
    /// `pids.max` of each agent call's cgroup (cgroup mode only).
    pub tasks_max: Option<u64>,
    /// Pause the pipeline once the agents' reported cost of the current UTC
    /// day reaches this many US dollars; it resumes the next day.
    pub daily_budget_usd: Option<f64>,
    /// Triage stage overrides.
    pub triage: StageAgent,
    /// Plan stage overrides.
    pub plan: StageAgent,
    /// Implement stage overrides.
    pub implement: StageAgent,
    /// Review stage overrides.
    pub review: StageAgent,
    /// HITL stage overrides.
    pub hitl: StageAgent,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            preset: "claude".into(),
            command: Vec::new(),
            output: None,
            prompts_dir: None,
            allow_token: false,
            env: BTreeMap::new(),
            pass_env: Vec::new(),
            memory_max: None,
            tasks_max: None,
            daily_budget_usd: None,
            triage: StageAgent::default(),
            plan: StageAgent::default(),
            implement: StageAgent::default(),
            review: StageAgent::default(),
            hitl: StageAgent::default(),
        }
    }
}

/// One stage's agent settings; unset fields fall back to [`AgentConfig`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct StageAgent {
    /// Preset for this stage ([`PRESETS`]).
    #[serde(deserialize_with = "maybe_one_of_presets")]
    pub preset: Option<String>,
    /// Model name passed as `{{model}}` / `--model`. Unset: the `claude`
    /// preset uses `opus` for plan, implement and HITL and `sonnet` for
    /// triage and review; `codex` and `command` pass none.
    pub model: Option<String>,
    /// argv template for this stage.
    pub command: Option<Vec<String>>,
    /// Output format for this stage ([`OUTPUTS`]).
    #[serde(deserialize_with = "maybe_one_of_outputs")]
    pub output: Option<String>,
    /// Extra arguments appended to a preset's command line.
    pub extra_args: Vec<String>,
}

/// `events.jsonl` rotation limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// Rotate when the file exceeds this many bytes.
    pub max_bytes: u64,
    /// Rotate when the oldest record is older than this many days; rotated files older than this are deleted.
    pub max_age_days: u64,
    /// Rotated files kept.
    pub keep_files: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            max_bytes: 10 * 1024 * 1024,
            max_age_days: 7,
            keep_files: 3,
        }
    }
}

/// GitHub settings (issue: GitHub forge).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GithubConfig {
    /// REST API base URL (`https://api.github.com`, or GitHub Enterprise Server's `https://HOST/api/v3`).
    pub api_url: String,
    /// Web base URL used for clone URLs.
    pub web_url: String,
    /// Most concurrent API requests of this process.
    pub max_concurrent_requests: usize,
    /// Retries of one request after a transient failure (5xx, network) or a rate limit.
    pub max_retries: usize,
    /// Longest wait, in seconds, for a rate limit (`Retry-After`, `x-ratelimit-reset`)
    /// slept inside a request; a longer one is reported to the pipeline instead.
    pub max_retry_wait: u64,
}

impl Default for GithubConfig {
    fn default() -> Self {
        GithubConfig {
            api_url: "https://api.github.com".into(),
            web_url: "https://github.com".into(),
            max_concurrent_requests: 4,
            max_retries: 3,
            max_retry_wait: 120,
        }
    }
}

/// Which instance backend the supervisor uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SupervisorBackend {
    /// systemd when `/run/systemd/system` exists and the system bus answers, else child processes.
    #[default]
    Auto,
    /// `hydraflow@<slug>.service` units over D-Bus.
    Systemd,
    /// Child processes of the supervisor.
    Process,
}

/// Supervisor settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SupervisorConfig {
    /// Listen address of the TCP control protocol.
    pub listen: String,
    /// How instances run: `auto`, `systemd` or `process`.
    pub backend: SupervisorBackend,
    /// Seconds `add_repo` waits for an instance to become active (READY=1) or fail.
    pub start_timeout: u64,
    /// The supervisor's state directory: the registry, the port file, and `<slug>/`, the data
    /// of each instance (a configured instance's data root, with either backend); default
    /// `$HYDRAFLOW_HOME`, else `~/.hydraflow` (see [`loader::state_dir`]).
    pub state_dir: Option<PathBuf>,
    /// argv the process backend runs for an instance, before `--instance <slug>`;
    /// default: this executable and `worker`.
    pub worker_command: Option<Vec<String>>,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            listen: "127.0.0.1:8765".into(),
            backend: SupervisorBackend::Auto,
            start_timeout: 20,
            state_dir: None,
            worker_command: None,
        }
    }
}

/// Dashboard settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DashboardConfig {
    /// Listen address of the supervisor's dashboard.
    pub listen: String,
    /// Optional TCP listen address of a worker's API (besides its Unix socket).
    pub worker_listen: Option<String>,
    /// Access token for the TCP dashboards (`Authorization: Bearer …` or the
    /// `hydraflow_token` cookie); required to listen on a non-loopback address.
    pub token: Option<String>,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        DashboardConfig {
            listen: "127.0.0.1:5555".into(),
            worker_listen: None,
            token: None,
        }
    }
}
pub mod loader;
