//! The orchestrator: the store poller, the HITL spool watcher and the five
//! stage loops as concurrent tokio tasks, each stage with its own
//! concurrency limit (spec §3). A loop that crashes is restarted and the
//! crash published; an authentication failure or an agent usage limit
//! pauses the pipeline instead of crash-looping. On stop, in-flight issues
//! are checkpointed in `state.json` so the next start resumes them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::issue_store::{Depths, IssueStore};
use super::labels::{LabelSet, Route};
use super::spool;
use super::stages::{self, Next, StageError};
use crate::agent::Stage;
use crate::agent::runner::AgentRunner;
use crate::config::Config;
use crate::forge::{Forge, ForgeError, Issue};
use crate::git::Worktrees;
use crate::layout::Layout;
use crate::store::events::{EventBus, EventType};
use crate::store::state::StateTracker;

/// Consecutive failures of one loop that raise a `system_alert`.
const ALERT_AFTER_FAILURES: u32 = 5;
/// How often the spool directory is read.
const SPOOL_INTERVAL: Duration = Duration::from_secs(1);
/// How often the status line and the watchdog are refreshed.
const STATUS_INTERVAL: Duration = Duration::from_secs(2);

/// Why the pipeline is paused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    /// What happened, for `STATUS=` and the journal.
    pub reason: String,
    /// When work resumes.
    pub until: Instant,
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
    pause: watch::Sender<Option<Pause>>,
    auth_failures: AtomicUsize,
    heartbeats: Mutex<HashMap<&'static str, Instant>>,
    delayed: AtomicUsize,
    polled: AtomicBool,
    poll_now: tokio::sync::Notify,
    cancel: CancellationToken,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("slug", &self.layout.slug)
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    fn beat(&self, name: &'static str) {
        if let Ok(mut h) = self.heartbeats.lock() {
            h.insert(name, Instant::now());
        }
    }

    /// Every loop has beaten within `max_age`.
    fn heartbeats_fresh(&self, max_age: Duration) -> bool {
        self.heartbeats
            .lock()
            .map(|h| h.values().all(|t| t.elapsed() <= max_age))
            .unwrap_or(false)
    }

    pub(crate) fn poll_interval(&self) -> Duration {
        Duration::from_secs(self.config.poll_interval)
    }

    /// How long work is paused, if it is.
    fn paused_for(&self) -> Option<Duration> {
        let pause = self.pause.borrow();
        let p = pause.as_ref()?;
        let left = p.until.saturating_duration_since(Instant::now());
        (!left.is_zero()).then_some(left)
    }

    /// Pause every loop for `duration`; an auth failure doubles its pause each
    /// time it repeats (up to 30 minutes), so it is retried, never spun.
    pub(crate) fn pause(&self, reason: &str, duration: Duration, auth: bool) {
        let duration = if auth {
            let n = self.auth_failures.fetch_add(1, Ordering::SeqCst) as u32;
            (duration * 2u32.saturating_pow(n.min(10))).min(Duration::from_secs(1800))
        } else {
            duration
        };
        tracing::warn!(
            repo_slug = %self.layout.slug,
            reason,
            seconds = duration.as_secs(),
            "pipeline paused"
        );
        self.events.publish(
            EventType::OrchestratorStatus,
            json!({"status": "paused", "reason": reason, "seconds": duration.as_secs()}),
        );
        self.pause.send_replace(Some(Pause {
            reason: reason.to_owned(),
            until: Instant::now() + duration,
        }));
    }

    /// A forge call succeeded: the auth backoff starts over.
    pub(crate) fn forge_ok(&self) {
        self.auth_failures.store(0, Ordering::SeqCst);
    }

    /// Put `issue` back into `stage`'s queue after `delay`, unless stopping.
    pub(crate) fn requeue_later(self: &Arc<Self>, issue: Issue, stage: Stage, delay: Duration) {
        let ctx = Arc::clone(self);
        ctx.delayed.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(delay) => { ctx.store.enqueue(issue, stage); }
                () = ctx.cancel.cancelled() => {}
            }
            ctx.delayed.fetch_sub(1, Ordering::SeqCst);
        });
    }

    /// Publish an event (convenience).
    pub(crate) fn publish(&self, kind: EventType, data: serde_json::Value) {
        self.events.publish(kind, data);
    }
}

/// What the orchestrator needs; built by [`crate::runtime::RepoRuntime`].
pub struct OrchestratorParts {
    /// The effective configuration.
    pub config: Config,
    /// The data layout.
    pub layout: Layout,
    /// `owner/name` or the slug.
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

/// Builds and starts the loops.
#[derive(Debug)]
pub struct Orchestrator;

impl Orchestrator {
    /// Start the poller, spool watcher, status task and stage loops.
    pub fn start(parts: OrchestratorParts) -> OrchestratorHandle {
        let (pause, _) = watch::channel(None);
        let cancel = CancellationToken::new();
        let ctx = Arc::new(Pipeline {
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
            pause,
            auth_failures: AtomicUsize::new(0),
            heartbeats: Mutex::new(HashMap::new()),
            delayed: AtomicUsize::new(0),
            polled: AtomicBool::new(false),
            poll_now: tokio::sync::Notify::new(),
            cancel: cancel.clone(),
        });
        ctx.publish(
            EventType::OrchestratorStatus,
            json!({"status": "running", "forge": ctx.forge.name()}),
        );
        let (status_tx, status_rx) = watch::channel(String::new());
        let supervisor = tokio::spawn(supervise(Arc::clone(&ctx), status_tx));
        OrchestratorHandle {
            ctx,
            supervisor,
            status: status_rx,
        }
    }
}

/// A running orchestrator: ask it for its status, wait for idleness, stop it.
#[derive(Debug)]
pub struct OrchestratorHandle {
    ctx: Arc<Pipeline>,
    supervisor: tokio::task::JoinHandle<()>,
    status: watch::Receiver<String>,
}

impl OrchestratorHandle {
    /// The one-line pipeline summary (what `STATUS=` shows).
    pub fn status_line(&self) -> String {
        status_line(&self.ctx)
    }

    /// Queue depths and in-flight counts.
    pub fn depths(&self) -> Depths {
        self.ctx.store.depths()
    }

    /// Changes of the status line.
    pub fn status_changes(&self) -> watch::Receiver<String> {
        self.status.clone()
    }

    /// No work left: nothing queued, in flight, delayed or spooled, and at
    /// least one poll has completed (issues waiting for a human do not count).
    pub fn is_idle(&self) -> bool {
        is_idle(&self.ctx)
    }

    /// Stop: no new work, checkpoint in-flight issues as interrupted, cancel
    /// their agents (killing the process groups), salvage uncommitted work
    /// in their worktrees, and wait for the loops, within `deadline`.
    pub async fn shutdown(self, deadline: Duration) {
        let ctx = self.ctx;
        let in_flight = ctx.store.in_flight();
        if !in_flight.is_empty() {
            let result = ctx.state.update(|s| {
                for (n, stage) in &in_flight {
                    s.issues.entry(*n).or_default().interrupted = Some(*stage);
                }
            });
            if let Err(e) = result {
                tracing::error!(repo_slug = %ctx.layout.slug, error = %e, "cannot checkpoint in-flight issues");
            }
        }
        ctx.cancel.cancel();
        ctx.store.wake_all();
        let started = Instant::now();
        if tokio::time::timeout(deadline, self.supervisor)
            .await
            .is_err()
        {
            tracing::warn!(repo_slug = %ctx.layout.slug, "loops did not stop in time");
        }
        for (n, stage) in in_flight {
            if !matches!(stage, Stage::Implement | Stage::Hitl | Stage::Review) {
                continue;
            }
            let left = deadline.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, ctx.worktrees.salvage(n)).await {
                Ok(Ok(Some(sha))) => {
                    tracing::info!(repo_slug = %ctx.layout.slug, issue = n, sha, "salvaged uncommitted work")
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(repo_slug = %ctx.layout.slug, issue = n, error = %e, "cannot salvage worktree")
                }
                Err(_) => break,
            }
        }
        ctx.publish(
            EventType::OrchestratorStatus,
            json!({"status": "stopped", "interrupted": ctx.store.in_flight().len()}),
        );
    }
}

fn is_idle(ctx: &Pipeline) -> bool {
    ctx.polled.load(Ordering::SeqCst)
        && ctx.store.depths().is_empty()
        && ctx.delayed.load(Ordering::SeqCst) == 0
        && spool::pending(&ctx.layout.spool_dir()).is_empty()
        && !ctx
            .state
            .snapshot()
            .issues
            .values()
            .any(|r| r.pending_hitl.is_some())
}

/// `triage 1 · plan 0 · implement 1/2 · review 0 · hitl 1 waiting · merged 3`.
fn status_line(ctx: &Pipeline) -> String {
    let d = ctx.store.depths();
    let mut parts: Vec<String> = Stage::ALL
        .into_iter()
        .filter(|s| *s != Stage::Hitl)
        .map(|s| {
            let running = d.in_flight.get(&s).copied().unwrap_or(0);
            let queued = d.queued.get(&s).copied().unwrap_or(0);
            if running > 0 {
                format!("{s} {queued}+{running} running")
            } else {
                format!("{s} {queued}")
            }
        })
        .collect();
    let state = ctx.state.snapshot();
    let waiting = state.issues.values().filter(|r| r.hitl.is_some()).count();
    parts.push(format!("hitl {waiting} waiting"));
    parts.push(format!("done {}", state.session.issues_succeeded));
    let mut line = parts.join(" · ");
    if let Some(budget) = ctx.forge.rate_budget() {
        line.push_str(&format!(" · api {}/{}", budget.remaining, budget.limit));
    }
    if let Some(p) = ctx.pause.borrow().as_ref()
        && p.until > Instant::now()
    {
        line = format!(
            "paused {}s: {} · {line}",
            p.until.saturating_duration_since(Instant::now()).as_secs(),
            p.reason
        );
    }
    line
}

type LoopFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

fn make_loop(ctx: &Arc<Pipeline>, name: &'static str) -> LoopFuture {
    let ctx = Arc::clone(ctx);
    match name {
        "poller" => Box::pin(poller(ctx)),
        "spool" => Box::pin(spool_loop(ctx)),
        "triage" => Box::pin(stage_loop(ctx, Stage::Triage)),
        "plan" => Box::pin(stage_loop(ctx, Stage::Plan)),
        "implement" => Box::pin(stage_loop(ctx, Stage::Implement)),
        "review" => Box::pin(stage_loop(ctx, Stage::Review)),
        _ => Box::pin(stage_loop(ctx, Stage::Hitl)),
    }
}

/// Run every loop; restart a loop that ends while not stopping (a panic),
/// publishing the crash, with backoff; alert after repeated failures.
async fn supervise(ctx: Arc<Pipeline>, status: watch::Sender<String>) {
    const LOOPS: [&str; 7] = [
        "poller",
        "spool",
        "triage",
        "plan",
        "implement",
        "review",
        "hitl",
    ];
    let mut set = JoinSet::new();
    let mut ids = HashMap::new();
    for name in LOOPS {
        ctx.beat(name);
        let id = set.spawn(make_loop(&ctx, name)).id();
        ids.insert(id, name);
    }
    let mut failures: HashMap<&'static str, u32> = HashMap::new();
    let watchdog = crate::systemd::watchdog_interval();
    // The status line is recomputed when the issue store or the pause
    // changes, and at least every poll interval (API budget, pause
    // countdown); the watchdog, when asked for, ticks every half period.
    let mut store_changes = ctx.store.changes();
    let mut pause_changes = ctx.pause.subscribe();
    let mut status_tick = tokio::time::interval(STATUS_INTERVAL.max(ctx.poll_interval()));
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    watchdog_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let refresh = |status: &watch::Sender<String>| {
        let line = status_line(&ctx);
        status.send_if_modified(|old| {
            if *old == line {
                false
            } else {
                old.clone_from(&line);
                true
            }
        });
    };
    let stale_after = ctx.poll_interval() * 3 + Duration::from_secs(10);
    loop {
        tokio::select! {
            joined = set.join_next_with_id() => {
                let Some(joined) = joined else { break };
                let (id, message) = match joined {
                    Ok((id, ())) => (id, "loop ended".to_owned()),
                    Err(e) => (e.id(), panic_message(e)),
                };
                let Some(name) = ids.remove(&id) else { continue };
                if ctx.cancel.is_cancelled() {
                    continue;
                }
                let n = failures.entry(name).or_insert(0);
                *n += 1;
                tracing::error!(repo_slug = %ctx.layout.slug, loop_name = name, failures = *n, message, "loop crashed; restarting");
                ctx.publish(EventType::Error, json!({"loop": name, "message": message, "consecutive_failures": *n}));
                if *n >= ALERT_AFTER_FAILURES {
                    ctx.publish(EventType::SystemAlert, json!({"loop": name, "message": format!("{name} loop failed {n} times in a row: {message}")}));
                }
                let backoff = Duration::from_millis(500 * 2u64.pow((*n).min(7)));
                let ctx2 = Arc::clone(&ctx);
                let id = set.spawn(async move {
                    tokio::time::sleep(backoff).await;
                    make_loop(&ctx2, name).await;
                }).id();
                ids.insert(id, name);
            }
            _ = status_tick.tick() => {
                refresh(&status);
                failures.retain(|_, n| *n < ALERT_AFTER_FAILURES * 4);
            }
            Ok(()) = store_changes.changed() => refresh(&status),
            Ok(()) = pause_changes.changed() => refresh(&status),
            _ = watchdog_tick.tick(), if watchdog.is_some() => {
                // A runtime whose loops stopped beating stops pinging, and
                // systemd restarts it.
                if ctx.heartbeats_fresh(stale_after) {
                    crate::systemd::notify_watchdog();
                }
            }
            () = ctx.cancel.cancelled(), if set.is_empty() => break,
        }
        if ctx.cancel.is_cancelled() && set.is_empty() {
            break;
        }
    }
}

fn panic_message(e: tokio::task::JoinError) -> String {
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

/// Sleep for `d` unless stopping; returns false when stopping.
async fn sleep_or_stop(ctx: &Pipeline, d: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = ctx.cancel.cancelled() => false,
    }
}

/// Refresh the issue store every `data_poll_interval` (and at start).
async fn poller(ctx: Arc<Pipeline>) {
    let labels = ctx.labels.specs();
    let mut labels_ensured = false;
    loop {
        ctx.beat("poller");
        if let Some(wait) = ctx.paused_for() {
            if !sleep_or_stop(&ctx, wait.min(ctx.poll_interval())).await {
                return;
            }
            continue;
        }
        if !labels_ensured {
            match ctx.forge.ensure_labels(&labels).await {
                Ok(()) => labels_ensured = true,
                Err(e) => {
                    tracing::warn!(repo_slug = %ctx.layout.slug, error = %e, "cannot create pipeline labels")
                }
            }
        }
        let wait = match poll_once(&ctx).await {
            Ok(()) => {
                ctx.forge_ok();
                ctx.polled.store(true, Ordering::SeqCst);
                if let Some(budget) = ctx.forge.rate_budget() {
                    // The API budget after each poll (also on `STATUS=`).
                    ctx.publish(
                        EventType::OrchestratorStatus,
                        json!({"status": "polled", "api_remaining": budget.remaining, "api_limit": budget.limit, "api_reset_at": budget.reset_at}),
                    );
                }
                Duration::from_secs(ctx.config.data_poll_interval)
            }
            Err(ForgeError::Auth(message)) => {
                ctx.pause(
                    &format!("forge authentication failed: {message}"),
                    Duration::from_secs(60),
                    true,
                );
                continue;
            }
            Err(ForgeError::RateLimited { retry_after }) => {
                ctx.pause("forge rate limit reached", retry_after, false);
                continue;
            }
            Err(e) => {
                tracing::warn!(repo_slug = %ctx.layout.slug, error = %e, "cannot list issues; retrying");
                ctx.publish(
                    EventType::Error,
                    json!({"loop": "poller", "message": e.to_string()}),
                );
                ctx.poll_interval()
            }
        };
        let mut beat = tokio::time::interval(ctx.poll_interval());
        beat.tick().await;
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => break,
                () = ctx.poll_now.notified() => break,
                _ = beat.tick() => ctx.beat("poller"),
                () = ctx.cancel.cancelled() => return,
            }
        }
    }
}

/// List the pipeline's issues and route each into its queue.
async fn poll_once(ctx: &Arc<Pipeline>) -> Result<(), ForgeError> {
    let issues = ctx.forge.list_issues(&ctx.labels.listed()).await?;
    let in_progress = ctx.labels.names().in_progress.clone();
    let state = ctx.state.snapshot();
    let mut seen = std::collections::HashSet::new();
    for issue in issues {
        let n = issue.number;
        seen.insert(n);
        let record = state.issues.get(&n).cloned().unwrap_or_default();
        if issue.labels.contains(&in_progress) && !record.claimed && !ctx.store.is_busy(n) {
            tracing::debug!(repo_slug = %ctx.layout.slug, issue = n, "skipping issue another worker holds");
            continue;
        }
        match ctx.labels.route(&issue.labels) {
            Route::Stage(stage) => {
                ctx.store.enqueue(issue, stage);
            }
            Route::HitlActive => {
                ctx.store.enqueue(issue, Stage::Hitl);
            }
            Route::WaitingForHuman => {
                if record.pending_hitl.is_some() {
                    ctx.store.enqueue(issue, Stage::Hitl);
                } else {
                    if record.hitl.is_none() {
                        // Escalated by hand (or by an older worker): remember it.
                        let stage_label = ctx.labels.names().hitl.clone();
                        let _ = ctx.state.update_issue(n, |r| {
                            r.hitl = Some(crate::store::state::HitlRecord {
                                origin: ctx.labels.names().ready.clone(),
                                stage: Stage::Hitl,
                                cause: format!("labelled {stage_label} outside HydraFlow"),
                                escalated_at: chrono::Utc::now().to_rfc3339(),
                            });
                        });
                    }
                    ctx.store.upsert(issue);
                }
            }
            Route::Ignore => ctx.store.forget(n),
        }
    }
    for known in ctx.store.all() {
        if !seen.contains(&known.number) {
            ctx.store.forget(known.number);
        }
    }
    ctx.publish(
        EventType::QueueUpdate,
        json!({"queues": ctx.store.queues(), "depths": ctx.store.depths()}),
    );
    Ok(())
}

/// Apply HITL commands the CLI dropped into the spool directory.
///
/// The directory is watched with inotify, so an idle worker does not wake up
/// to look; without inotify it is read every [`SPOOL_INTERVAL`].
async fn spool_loop(ctx: Arc<Pipeline>) {
    use futures_util::StreamExt as _;
    let dir: PathBuf = ctx.layout.spool_dir();
    let _ = std::fs::create_dir_all(&dir);
    let mut watch = inotify::Inotify::init()
        .and_then(|ino| {
            ino.watches().add(
                &dir,
                inotify::WatchMask::MOVED_TO | inotify::WatchMask::CLOSE_WRITE,
            )?;
            ino.into_event_stream([0u8; 1024])
        })
        .map_err(|e| {
            tracing::warn!(repo_slug = %ctx.layout.slug, error = %e, "cannot watch the spool directory; reading it every second");
        })
        .ok();
    loop {
        ctx.beat("spool");
        for (path, entry) in spool::pending(&dir) {
            let entry = match entry {
                Ok(e) => e,
                Err(message) => {
                    tracing::warn!(repo_slug = %ctx.layout.slug, path = %path.display(), message, "unreadable spool file set aside");
                    ctx.publish(
                        EventType::Error,
                        json!({"loop": "spool", "path": path, "message": message}),
                    );
                    spool::reject(&path);
                    continue;
                }
            };
            let n = entry.issue;
            if ctx.state.issue(n).hitl.is_none() {
                let message = format!("issue #{n} is not waiting for a human");
                tracing::warn!(repo_slug = %ctx.layout.slug, issue = n, "{message}; command set aside");
                ctx.publish(
                    EventType::Error,
                    json!({"loop": "spool", "issue": n, "message": message}),
                );
                spool::reject(&path);
                continue;
            }
            let command = entry.command.clone();
            match ctx
                .state
                .update_issue(n, |r| r.pending_hitl = Some(command))
            {
                Ok(()) => {
                    let _ = std::fs::remove_file(&path);
                    tracing::info!(repo_slug = %ctx.layout.slug, issue = n, stage = "hitl", "HITL command received");
                    ctx.publish(
                        EventType::HitlUpdate,
                        json!({"issue": n, "status": "received", "command": entry.command}),
                    );
                    match ctx.store.get(n) {
                        Some(issue) => {
                            ctx.store.enqueue(issue, Stage::Hitl);
                        }
                        None => ctx.poll_now.notify_one(),
                    }
                }
                Err(e) => {
                    tracing::error!(repo_slug = %ctx.layout.slug, issue = n, error = %e, "cannot record HITL command; will retry");
                }
            }
        }
        let wait = match watch.as_mut() {
            Some(events) => tokio::select! {
                event = events.next() => {
                    if event.is_none() {
                        watch = None;
                    }
                    true
                }
                () = tokio::time::sleep(ctx.poll_interval()) => true,
                () = ctx.cancel.cancelled() => false,
            },
            None => sleep_or_stop(&ctx, SPOOL_INTERVAL).await,
        };
        if !wait {
            return;
        }
    }
}

fn stage_limit(config: &Config, stage: Stage) -> usize {
    let l = &config.limits;
    match stage {
        Stage::Triage => l.max_triagers,
        Stage::Plan => l.max_planners,
        Stage::Implement => l.max_workers,
        Stage::Review => l.max_reviewers,
        Stage::Hitl => l.max_hitl_workers,
    }
}

/// Take issues from `stage`'s queue, up to its concurrency limit at once.
async fn stage_loop(ctx: Arc<Pipeline>, stage: Stage) {
    let permits = Arc::new(Semaphore::new(stage_limit(&ctx.config, stage)));
    let mut tasks = JoinSet::new();
    let name = stage.as_str();
    loop {
        ctx.beat(name);
        while tasks.try_join_next().is_some() {}
        if ctx.cancel.is_cancelled() {
            break;
        }
        if let Some(wait) = ctx.paused_for() {
            if !sleep_or_stop(&ctx, wait.min(ctx.poll_interval())).await {
                break;
            }
            continue;
        }
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = tokio::time::sleep(ctx.poll_interval()) => continue,
            () = ctx.cancel.cancelled() => break,
        };
        match ctx.store.take(stage) {
            Some(issue) => {
                let ctx = Arc::clone(&ctx);
                tasks.spawn(async move {
                    process(ctx, stage, issue).await;
                    drop(permit);
                });
            }
            None => {
                drop(permit);
                tokio::select! {
                    () = ctx.store.notified(stage) => {}
                    () = tokio::time::sleep(ctx.poll_interval()) => {}
                    () = ctx.cancel.cancelled() => break,
                }
            }
        }
    }
    // Stopping: the issues were checkpointed by the handle; dropping the
    // tasks kills their agents' process groups.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// Work one issue in one stage, then route it on.
async fn process(ctx: Arc<Pipeline>, stage: Stage, issue: Issue) {
    let n = issue.number;
    tracing::info!(repo_slug = %ctx.layout.slug, issue = n, stage = %stage, title = %issue.title, "stage started");
    ctx.publish(
        EventType::WorkerUpdate,
        json!({"issue": n, "stage": stage, "status": "started", "title": issue.title}),
    );
    // The handler runs in its own task so a panic is caught and retried.
    let inner = tokio::spawn(stages::run(Arc::clone(&ctx), stage, issue.clone()));
    let abort = inner.abort_handle();
    let _abort_on_drop = AbortOnDrop(abort);
    let result = match inner.await {
        Ok(r) => r,
        Err(e) if e.is_panic() => Err((
            StageError::Retry(format!("stage task panicked: {}", panic_message(e))),
            issue,
        )),
        Err(_) => return,
    };
    match result {
        Ok((next, issue)) => {
            ctx.forge_ok();
            tracing::info!(repo_slug = %ctx.layout.slug, issue = n, stage = %stage, next = ?next, "stage finished");
            ctx.publish(
                EventType::WorkerUpdate,
                json!({"issue": n, "stage": stage, "status": "finished", "next": format!("{next:?}")}),
            );
            match next {
                Next::Stage(next_stage) => {
                    ctx.publish(
                        EventType::PhaseChange,
                        json!({"issue": n, "from": stage, "to": next_stage}),
                    );
                    ctx.store.hand_off(issue, next_stage);
                }
                Next::Done => {
                    ctx.store.finish(n);
                    ctx.store.forget(n);
                }
                Next::WaitForHuman => {
                    ctx.store.finish(n);
                    ctx.store.upsert(issue);
                }
            }
        }
        Err((e, issue)) => {
            // The issue stays in flight until its failure is handled, so the
            // pipeline never looks idle in between.
            if let Some((issue, stage, delay)) = stages::handle_failure(&ctx, stage, issue, e).await
            {
                ctx.requeue_later(issue, stage, delay);
            }
            ctx.store.finish(n);
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
