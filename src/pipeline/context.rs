//! What every loop and stage of one repository's pipeline shares: the
//! configuration, the outside systems (forge, agent runner, worktrees), the
//! state tracker, event bus and issue store, and the pause. The orchestrator
//! builds it; stages, the task layer and the journal only read it, so none
//! of them imports another's internals.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::decide::{PauseCause, PauseKind, Policy, probe_delay};
use super::events::{self, OrchestratorStatus, PipelineEvent};
use super::issue_store::IssueStore;
use super::labels::LabelSet;
use crate::agent::Stage;
use crate::agent::runner::AgentRunner;
use crate::config::Config;
use crate::forge::Forge;
use crate::git::Worktrees;
use crate::layout::Layout;
use crate::store::events::EventBus;
use crate::store::state::StateTracker;

/// Called after every outside side effect the pipeline makes outside the
/// forge (an agent run, a worktree made, salvaged or removed), with its
/// name; forge effects are reported by the forge itself (its fake, in the
/// simulation). Production has none; the simulation's crash injector stops
/// the pipeline there (a future that never ends) to restart it from disk.
#[async_trait]
pub(crate) trait EffectHook: Send + Sync {
    /// The effect `what` just completed.
    async fn after(&self, what: &'static str);
}

/// Why, and until when, the pipeline is paused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pause {
    /// What happened.
    pub cause: PauseCause,
    /// When the probe runs (or the pause ends, for a known end).
    pub probe_at: Instant,
    /// Probes that failed so far (the backoff's position).
    pub failures: u32,
}

/// Everything the loops share.
pub(crate) struct Pipeline {
    pub config: Config,
    pub layout: Layout,
    /// `owner/name`, or the slug for the local forge; used in prompts.
    pub repo_name: String,
    pub forge: Arc<dyn Forge>,
    pub runner: Arc<dyn AgentRunner>,
    pub worktrees: Worktrees,
    pub state: Arc<StateTracker>,
    pub events: Arc<EventBus>,
    pub store: Arc<IssueStore>,
    pub labels: LabelSet,
    pub extra_agent_env: Vec<(String, String)>,
    pub hook: Option<Arc<dyn EffectHook>>,
    pub pause: watch::Sender<Option<Pause>>,
    heartbeats: Mutex<HashMap<&'static str, Instant>>,
    pub polled: AtomicBool,
    pub poll_now: tokio::sync::Notify,
    pub cancel: CancellationToken,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("slug", &self.layout.slug)
            .finish_non_exhaustive()
    }
}

/// What the orchestrator needs; built by [`crate::runtime::RepoRuntime`].
pub struct OrchestratorParts {
    /// The effective configuration.
    pub config: Config,
    /// The data layout.
    pub layout: Layout,
    /// `owner/name` or the slug; used in prompts.
    pub repo_name: String,
    /// The forge.
    pub forge: Arc<dyn Forge>,
    /// The agent runner.
    pub runner: Arc<dyn AgentRunner>,
    /// The worktrees.
    pub worktrees: Worktrees,
    /// The state tracker.
    pub state: Arc<StateTracker>,
    /// The event bus.
    pub events: Arc<EventBus>,
    /// The issue store.
    pub store: Arc<IssueStore>,
    /// Extra environment for agents (a token when the config allows it).
    pub extra_agent_env: Vec<(String, String)>,
}

impl Pipeline {
    /// The pipeline of `parts`; `hook` sees every side effect (the
    /// simulation's crash injector; `None` in production).
    pub fn new(parts: OrchestratorParts, hook: Option<Arc<dyn EffectHook>>) -> Pipeline {
        let (pause, _) = watch::channel(None);
        Pipeline {
            labels: LabelSet::new(&parts.config.labels),
            config: parts.config,
            layout: parts.layout,
            repo_name: parts.repo_name,
            forge: parts.forge,
            runner: parts.runner,
            worktrees: parts.worktrees,
            state: parts.state,
            events: parts.events,
            store: parts.store,
            extra_agent_env: parts.extra_agent_env,
            hook,
            pause,
            heartbeats: Mutex::new(HashMap::new()),
            polled: AtomicBool::new(false),
            poll_now: tokio::sync::Notify::new(),
            cancel: CancellationToken::new(),
        }
    }

    /// Record that loop `name` is alive (for the watchdog).
    pub fn beat(&self, name: &'static str) {
        if let Ok(mut h) = self.heartbeats.lock() {
            h.insert(name, Instant::now());
        }
    }

    /// Every loop has beaten within `max_age`.
    pub fn heartbeats_fresh(&self, max_age: Duration) -> bool {
        self.heartbeats
            .lock()
            .map(|h| h.values().all(|t| t.elapsed() <= max_age))
            .unwrap_or(false)
    }

    /// `poll_interval`: how long an idle loop sleeps.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_secs(self.config.poll_interval)
    }

    /// The failure policy's settings.
    pub fn policy(&self) -> Policy {
        Policy {
            max_attempts: self.config.max_issue_attempts,
            max_retry_delay: self.poll_interval(),
        }
    }

    /// Publish a pipeline event.
    pub fn publish(&self, event: PipelineEvent) {
        events::publish(&self.events, event);
    }

    /// The current pause, if work is paused.
    pub fn paused(&self) -> Option<Pause> {
        self.pause.borrow().clone()
    }

    /// Pause every loop for `cause`. A pause of the same kind that is
    /// already on keeps its backoff; another kind replaces it.
    pub fn pause(&self, cause: PauseCause) {
        let now = Instant::now();
        let first = match cause.until {
            Some(until) => until
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_secs(1)),
            None => probe_delay(&cause, 0),
        };
        let changed = self.pause.send_if_modified(|slot| match slot {
            Some(p) if p.cause.kind == cause.kind && p.cause.until == cause.until => false,
            _ => {
                *slot = Some(Pause {
                    cause: cause.clone(),
                    probe_at: now + first,
                    failures: 0,
                });
                true
            }
        });
        if changed {
            tracing::warn!(
                repo_slug = %self.layout.slug,
                reason = %cause.reason,
                seconds = first.as_secs(),
                "pipeline paused"
            );
            self.publish(PipelineEvent::OrchestratorStatus(
                OrchestratorStatus::Paused {
                    reason: cause.reason,
                    seconds: first.as_secs(),
                },
            ));
        }
    }

    /// A probe of the pause failed: wait longer before the next.
    pub fn probe_failed(&self, why: &str) {
        self.pause.send_modify(|slot| {
            if let Some(p) = slot {
                p.failures += 1;
                let wait = probe_delay(&p.cause, p.failures);
                p.probe_at = Instant::now() + wait;
                tracing::info!(repo_slug = %self.layout.slug, reason = %p.cause.reason, why, seconds = wait.as_secs(), "still paused");
            }
        });
    }

    /// End the pause (its probe succeeded or its time came).
    pub fn resume(&self) {
        let old = self.pause.send_replace(None);
        if let Some(p) = old {
            tracing::info!(repo_slug = %self.layout.slug, reason = %p.cause.reason, "pipeline resumed");
            self.publish(PipelineEvent::OrchestratorStatus(
                OrchestratorStatus::Resumed {
                    reason: p.cause.reason,
                },
            ));
            self.store.wake_all();
        }
    }

    /// How long until the pause's probe, while paused.
    pub fn paused_for(&self) -> Option<Duration> {
        self.pause
            .borrow()
            .as_ref()
            .map(|p| p.probe_at.saturating_duration_since(Instant::now()))
    }

    /// A forge call succeeded: a forge authentication pause is over.
    pub fn forge_ok(&self) {
        if self
            .paused()
            .is_some_and(|p| p.cause.kind == PauseKind::ForgeAuth)
        {
            self.resume();
        }
    }

    /// Retry `number` in `stage` after `after`; the delay loop queues it
    /// again then, after reading its record.
    pub fn delay(&self, number: u64, stage: Stage, after: Duration) {
        self.store.delay(number, stage, Instant::now() + after);
    }

    /// The outside side effect `what` just completed (the simulation stops here).
    pub async fn effect_done(&self, what: &'static str) {
        if let Some(hook) = &self.hook {
            hook.after(what).await;
        }
    }

    /// Why HydraFlow's own disk is at fault, if it is: a state write and a
    /// file in the worktree directory are tried. An agent failure counts as
    /// an attempt only when this finds nothing; it is also the probe that
    /// ends a storage pause.
    pub fn storage_fault(&self) -> Option<String> {
        if let Err(e) = self.state.probe() {
            return Some(e.to_string());
        }
        let dir = self.layout.worktrees_dir();
        if dir.is_dir()
            && let Err(e) = crate::store::atomic::probe_dir(&dir)
        {
            return Some(format!("cannot write in {}: {e}", dir.display()));
        }
        None
    }

    /// Whether the loops are stopping.
    pub fn stopping(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// The message of a task that panicked (or was cancelled).
    pub fn panic_message(e: tokio::task::JoinError) -> String {
        if e.is_cancelled() {
            return "cancelled".into();
        }
        match e.try_into_panic() {
            Ok(p) => p
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into()),
            Err(e) => e.to_string(),
        }
    }

    /// Whether the first poll completed.
    pub fn has_polled(&self) -> bool {
        self.polled.load(Ordering::SeqCst)
    }
}
