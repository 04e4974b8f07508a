//! `RepoRuntime` bundles one repository's configuration, state tracker,
//! event bus, issue store, session log and orchestrator into one lifecycle
//! unit; `RepoRuntimeRegistry` holds runtimes by slug (docs/design/process-model.md).
//! In production a worker process registers exactly one slug;
//! the registry exists so the API can list and address runtimes uniformly.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use serde_json::json;

use crate::agent::runner::AgentRunner;
use crate::config::loader::Resolved;
use crate::forge::Forge;
use crate::git::Worktrees;
use crate::layout::{Layout, Slug};
use crate::pipeline::Orchestrator;
use crate::pipeline::issue_store::IssueStore;
use crate::pipeline::orchestrator::{OrchestratorHandle, OrchestratorParts};
use crate::store::events::{EventBus, EventType};
use crate::store::sessions::{SessionLog, SessionRecord, SessionStatus};
use crate::store::state::{LoadNote, StateTracker};

/// Why a runtime could not be created or started.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The data directories could not be created.
    #[error("cannot create the data directories under {path}: {cause}")]
    Dirs {
        /// `data_root/<slug>`.
        path: std::path::PathBuf,
        /// The OS error.
        cause: std::io::Error,
    },
    /// Persistence failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The checkout is not usable.
    #[error(transparent)]
    Git(#[from] crate::git::GitError),
    /// The agent configuration is invalid.
    #[error(transparent)]
    Agent(#[from] crate::agent::AgentError),
    /// Another worker runs on this data directory, or its lock failed.
    #[error(transparent)]
    Locked(#[from] crate::worker_lock::WorkerLockError),
}

/// One repository's runtime.
pub struct RepoRuntime {
    resolved: Resolved,
    forge: Arc<dyn Forge>,
    runner: Arc<dyn AgentRunner>,
    worktrees: Worktrees,
    state: Arc<StateTracker>,
    events: Arc<EventBus>,
    store: Arc<IssueStore>,
    sessions: SessionLog,
    session: Mutex<SessionRecord>,
    orchestrator: tokio::sync::Mutex<Option<OrchestratorHandle>>,
    extra_agent_env: Vec<(String, String)>,
    /// Held for the runtime's life: one worker per data directory.
    _worker_lock: crate::worker_lock::WorkerLock,
}

impl std::fmt::Debug for RepoRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoRuntime")
            .field("slug", &self.resolved.layout.slug)
            .finish_non_exhaustive()
    }
}

impl RepoRuntime {
    /// Create the data directories, take the worker lock (one worker per
    /// data directory, held until the runtime is dropped), load `state.json` (recovering from a
    /// backup if needed, which is logged and published), open the event bus
    /// and start a session record. Nothing runs until [`RepoRuntime::start`].
    ///
    /// # Errors
    /// [`RuntimeError`] for unusable directories, state, checkout or agent
    /// settings, and [`RuntimeError::Locked`] naming the PID of another
    /// worker on the same data directory.
    pub fn create(
        resolved: Resolved,
        forge: Arc<dyn Forge>,
        runner: Arc<dyn AgentRunner>,
        extra_agent_env: Vec<(String, String)>,
    ) -> Result<Arc<RepoRuntime>, RuntimeError> {
        let layout = resolved.layout.clone();
        layout.create_dirs().map_err(|source| RuntimeError::Dirs {
            path: layout.repo_dir(),
            cause: source,
        })?;
        let worker_lock = crate::worker_lock::WorkerLock::acquire(&layout.worker_lock_file())?;
        crate::agent::runner::validate(&resolved.config.agent)?;
        let worktrees =
            Worktrees::open(&resolved.repo_path, &layout, &resolved.config.main_branch)?;
        let (state, note) = StateTracker::load(&layout.state_file())?;
        let (sessions, session) = SessionLog::start(&layout.sessions_file(), layout.slug.as_str())?;
        let events = EventBus::open(
            &layout.events_file(),
            layout.slug.as_str(),
            &session.id,
            &resolved.config.events,
        )?;
        if let LoadNote::RecoveredFromBackup { problem, backup } = &note {
            tracing::error!(
                repo_slug = %layout.slug,
                problem,
                backup = %backup.display(),
                "state.json was unreadable; recovered from the newest good backup"
            );
            events.publish(
                EventType::SystemAlert,
                json!({"message": "state.json was unreadable; recovered from a backup", "problem": problem, "backup": backup}),
            );
        }
        events.publish(
            EventType::SessionStart,
            json!({"session_id": session.id, "repo_path": resolved.repo_path, "forge": forge.name()}),
        );
        // A new session starts its counters afresh.
        state.update(|s| s.session = Default::default())?;
        Ok(Arc::new(RepoRuntime {
            resolved,
            forge,
            runner,
            worktrees,
            state: Arc::new(state),
            events: Arc::new(events),
            store: Arc::new(IssueStore::new()),
            sessions,
            session: Mutex::new(session),
            orchestrator: tokio::sync::Mutex::new(None),
            extra_agent_env,
            _worker_lock: worker_lock,
        }))
    }

    /// The slug.
    pub fn slug(&self) -> &Slug {
        &self.resolved.layout.slug
    }

    /// The data layout.
    pub fn layout(&self) -> &Layout {
        &self.resolved.layout
    }

    /// The effective configuration and paths.
    pub fn resolved(&self) -> &Resolved {
        &self.resolved
    }

    /// The state tracker.
    pub fn state(&self) -> &Arc<StateTracker> {
        &self.state
    }

    /// The event bus.
    pub fn events(&self) -> &Arc<EventBus> {
        &self.events
    }

    /// The issue store.
    pub fn store(&self) -> &Arc<IssueStore> {
        &self.store
    }

    /// The forge.
    pub fn forge(&self) -> &Arc<dyn Forge> {
        &self.forge
    }

    /// Start the orchestrator's loops (no-op when running).
    pub async fn start(&self) {
        let mut slot = self.orchestrator.lock().await;
        if slot.is_some() {
            return;
        }
        let config = &self.resolved.config;
        let repo_name = config
            .repo
            .clone()
            .unwrap_or_else(|| self.slug().to_string());
        *slot = Some(Orchestrator::start(OrchestratorParts {
            config: config.clone(),
            layout: self.resolved.layout.clone(),
            repo_name,
            forge: Arc::clone(&self.forge),
            runner: Arc::clone(&self.runner),
            worktrees: self.worktrees.clone(),
            state: Arc::clone(&self.state),
            events: Arc::clone(&self.events),
            store: Arc::clone(&self.store),
            extra_agent_env: self.extra_agent_env.clone(),
        }));
    }

    /// Whether the loops are running.
    pub async fn running(&self) -> bool {
        self.orchestrator.lock().await.is_some()
    }

    /// The one-line status (`STATUS=`), or `stopped`.
    pub async fn status_line(&self) -> String {
        match self.orchestrator.lock().await.as_ref() {
            Some(o) => o.status_line(),
            None => "stopped".into(),
        }
    }

    /// Whether the pipeline has nothing left to do (see [`OrchestratorHandle::is_idle`]).
    pub async fn is_idle(&self) -> bool {
        self.orchestrator
            .lock()
            .await
            .as_ref()
            .is_some_and(OrchestratorHandle::is_idle)
    }

    /// Webhook deliveries for this repository (`POST /api/wake`): poll now
    /// when `poll`; false when the loops are stopped.
    pub async fn webhook_delivered(&self, poll: bool) -> bool {
        match self.orchestrator.lock().await.as_ref() {
            Some(o) => {
                o.webhook_delivered(poll);
                true
            }
            None => false,
        }
    }

    /// Changes of the status line while running.
    pub async fn status_changes(&self) -> Option<tokio::sync::watch::Receiver<String>> {
        self.orchestrator
            .lock()
            .await
            .as_ref()
            .map(OrchestratorHandle::status_changes)
    }

    /// Stop the loops within `deadline`, checkpointing in-flight issues, and
    /// record the session's end.
    pub async fn stop(&self, deadline: Duration) {
        let handle = self.orchestrator.lock().await.take();
        if let Some(handle) = handle {
            handle.shutdown(deadline).await;
        }
        let counters = self.state.snapshot().session;
        let record = {
            let mut s = self.session.lock().unwrap_or_else(|p| p.into_inner());
            s.ended_at =
                Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
            s.status = SessionStatus::Completed;
            s.issues_processed = counters.issues_processed;
            s.issues_succeeded = counters.issues_succeeded;
            s.issues_failed = counters.issues_failed;
            s.clone()
        };
        if let Err(e) = self.sessions.update(&record) {
            tracing::warn!(repo_slug = %self.slug(), error = %e, "cannot record the session end");
        }
        self.events
            .publish(EventType::SessionEnd, json!({"session": record}));
    }
}

/// Runtimes by slug: one per process in production (docs/design/process-model.md).
#[derive(Debug, Default)]
pub struct RepoRuntimeRegistry {
    runtimes: RwLock<BTreeMap<Slug, Arc<RepoRuntime>>>,
}

impl RepoRuntimeRegistry {
    /// An empty registry.
    pub fn new() -> RepoRuntimeRegistry {
        RepoRuntimeRegistry::default()
    }

    /// Add a runtime; returns the one it replaced, if any.
    pub fn register(&self, runtime: Arc<RepoRuntime>) -> Option<Arc<RepoRuntime>> {
        self.runtimes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(runtime.slug().clone(), runtime)
    }

    /// The runtime of `slug`; never another repository's.
    pub fn get(&self, slug: &str) -> Option<Arc<RepoRuntime>> {
        self.runtimes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(s, _)| s.as_str() == slug)
            .map(|(_, r)| Arc::clone(r))
    }

    /// Remove and return the runtime of `slug`.
    pub fn remove(&self, slug: &str) -> Option<Arc<RepoRuntime>> {
        let mut map = self.runtimes.write().unwrap_or_else(|p| p.into_inner());
        let key = map.keys().find(|s| s.as_str() == slug).cloned()?;
        map.remove(&key)
    }

    /// Every runtime, by slug.
    pub fn all(&self) -> Vec<Arc<RepoRuntime>> {
        self.runtimes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}
