//! The orchestrator: the poller (which also probes a pause and wakes on
//! the local forge's changes), the HITL spool watcher, the delayed-retry
//! timer, garbage collection and the five stage loops as concurrent tokio
//! tasks, each stage with its own concurrency limit (docs/design/pipeline.md). A loop that
//! crashes is restarted and the crash published.
//!
//! At start, before the first poll, every issue whose record holds a
//! journal or a claim (a crash or a stop left it mid-way) is queued, so its
//! journal is finished and its stage resumed even when its labels no longer
//! route it (merged but not yet closed, say).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

pub use super::context::OrchestratorParts;
use super::context::Pipeline;
use super::decide::{PauseCause, PauseKind};
use super::events::{ErrorEvent, HitlUpdate, OrchestratorStatus, PipelineEvent};
use super::issue_store::Depths;
use super::journal;
use super::labels::Route;
use super::spool;
use super::task::{self, escalated_by_hand};
use crate::agent::Stage;
use crate::config::Config;
use crate::forge::ForgeError;
use crate::store::state::{HitlCommand, Phase};

/// Consecutive failures of one loop that raise a `system_alert`.
const ALERT_AFTER_FAILURES: u32 = 5;
/// How often the spool directory is read without inotify.
const SPOOL_INTERVAL: Duration = Duration::from_secs(1);
/// How often the status line and the watchdog are refreshed.
const STATUS_INTERVAL: Duration = Duration::from_secs(2);
/// How often worktrees and branches of finished issues are collected.
const GC_INTERVAL: Duration = Duration::from_secs(3600);
/// Changes of the local forge closer together than this wake one poll.
const WAKE_DEBOUNCE: Duration = Duration::from_millis(200);

/// Builds and starts the loops.
#[derive(Debug)]
pub struct Orchestrator;

impl Orchestrator {
    /// Start the poller, spool watcher, timers and stage loops.
    pub fn start(parts: OrchestratorParts) -> OrchestratorHandle {
        let ctx = Arc::new(Pipeline::new(parts, None));
        ctx.publish(PipelineEvent::OrchestratorStatus(
            OrchestratorStatus::Running {
                forge: ctx.forge.name(),
            },
        ));
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

    /// No work left: nothing queued, in flight, delayed, journalled or
    /// spooled, not paused, and at least one poll has completed (issues
    /// waiting for a human do not count).
    pub fn is_idle(&self) -> bool {
        is_idle(&self.ctx)
    }

    /// Stop: no new work, cancel the in-flight stages (killing agents'
    /// process groups), salvage uncommitted work in their worktrees, and
    /// wait for the loops, within `deadline`. Claims and journals are in
    /// `state.json` already, so the next start resumes them.
    pub async fn shutdown(self, deadline: Duration) {
        let ctx = self.ctx;
        let in_flight = ctx.store.in_flight();
        ctx.cancel.cancel();
        ctx.store.wake_all();
        let started = Instant::now();
        if tokio::time::timeout(deadline, self.supervisor)
            .await
            .is_err()
        {
            tracing::warn!(repo_slug = %ctx.layout.slug, "loops did not stop in time");
        }
        for (n, stage) in &in_flight {
            if !matches!(stage, Stage::Implement | Stage::Hitl | Stage::Review) {
                continue;
            }
            let left = deadline.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, ctx.worktrees.salvage(*n)).await {
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
        ctx.publish(PipelineEvent::OrchestratorStatus(
            OrchestratorStatus::Stopped {
                interrupted: in_flight.len(),
            },
        ));
    }
}

fn is_idle(ctx: &Pipeline) -> bool {
    ctx.has_polled()
        && ctx.paused().is_none()
        && ctx.store.depths().is_empty()
        && spool::pending(&ctx.layout.spool_dir()).is_empty()
        && !ctx
            .state
            .snapshot()
            .issues
            .values()
            .any(|r| r.pending_hitl().is_some() || r.journal.is_some())
}

/// `triage 1 · plan 0 · implement 1+1 running · review 0 · hitl 1 waiting · done 3`.
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
    if d.delayed > 0 {
        parts.push(format!("{} waiting to retry", d.delayed));
    }
    let state = ctx.state.snapshot();
    let waiting = state.issues.values().filter(|r| r.hitl().is_some()).count();
    parts.push(format!("hitl {waiting} waiting"));
    parts.push(format!("done {}", state.session.issues_succeeded));
    let mut line = parts.join(" · ");
    if let Some(budget) = ctx.forge.rate_budget() {
        line.push_str(&format!(" · api {}/{}", budget.remaining, budget.limit));
    }
    if let Some(p) = ctx.paused() {
        let secs = p
            .probe_at
            .saturating_duration_since(Instant::now())
            .as_secs();
        line = format!("paused ({}s): {} · {line}", secs, p.cause.reason);
    }
    line
}

/// The pipeline's loops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Loop {
    Poller,
    Spool,
    Delays,
    Gc,
    Stage(Stage),
}

impl Loop {
    const ALL: [Loop; 9] = [
        Loop::Poller,
        Loop::Spool,
        Loop::Delays,
        Loop::Gc,
        Loop::Stage(Stage::Triage),
        Loop::Stage(Stage::Plan),
        Loop::Stage(Stage::Implement),
        Loop::Stage(Stage::Review),
        Loop::Stage(Stage::Hitl),
    ];

    fn name(self) -> &'static str {
        match self {
            Loop::Poller => "poller",
            Loop::Spool => "spool",
            Loop::Delays => "delays",
            Loop::Gc => "gc",
            Loop::Stage(s) => s.as_str(),
        }
    }

    fn run(self, ctx: &Arc<Pipeline>) -> LoopFuture {
        let ctx = Arc::clone(ctx);
        match self {
            Loop::Poller => Box::pin(poller(ctx)),
            Loop::Spool => Box::pin(spool_loop(ctx)),
            Loop::Delays => Box::pin(delay_loop(ctx)),
            Loop::Gc => Box::pin(gc_loop(ctx)),
            Loop::Stage(s) => Box::pin(stage_loop(ctx, s)),
        }
    }
}

type LoopFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Run every loop; restart a loop that ends while not stopping (a panic),
/// publishing the crash, with backoff; alert after repeated failures.
async fn supervise(ctx: Arc<Pipeline>, status: watch::Sender<String>) {
    let mut set = JoinSet::new();
    let mut ids = HashMap::new();
    for l in Loop::ALL {
        ctx.beat(l.name());
        let id = set.spawn(l.run(&ctx)).id();
        ids.insert(id, l);
    }
    let mut failures: HashMap<Loop, u32> = HashMap::new();
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
                    Err(e) => (e.id(), Pipeline::panic_message(e)),
                };
                let Some(l) = ids.remove(&id) else { continue };
                if ctx.stopping() {
                    continue;
                }
                let n = failures.entry(l).or_insert(0);
                *n += 1;
                tracing::error!(repo_slug = %ctx.layout.slug, loop_name = l.name(), failures = *n, message, "loop crashed; restarting");
                ctx.publish(PipelineEvent::Error(ErrorEvent {
                    loop_name: Some(l.name()),
                    message: message.clone(),
                    consecutive_failures: Some(*n),
                    ..ErrorEvent::default()
                }));
                if *n >= ALERT_AFTER_FAILURES {
                    ctx.publish(PipelineEvent::SystemAlert {
                        loop_name: Some(l.name()),
                        message: format!("{} loop failed {n} times in a row: {message}", l.name()),
                    });
                }
                let backoff = crate::backoff::nth(Duration::from_millis(500), Duration::from_secs(64), *n);
                let ctx2 = Arc::clone(&ctx);
                let id = set.spawn(async move {
                    tokio::time::sleep(backoff).await;
                    l.run(&ctx2).await;
                }).id();
                ids.insert(id, l);
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
        if ctx.stopping() && set.is_empty() {
            break;
        }
    }
}

/// Sleep for `d` unless stopping; returns false when stopping.
async fn sleep_or_stop(ctx: &Pipeline, d: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => true,
        () = ctx.cancel.cancelled() => false,
    }
}

/// Whether the pause's probe succeeds now (`Err` says why not).
pub(crate) async fn probe(ctx: &Pipeline, cause: &PauseCause) -> Result<(), String> {
    match cause.kind {
        PauseKind::Storage => ctx.storage_fault().map_or(Ok(()), Err),
        PauseKind::ForgeAuth => ctx
            .forge
            .list_issues(&ctx.labels.listed())
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
        // Time was what they waited for; the next call tells.
        PauseKind::RateLimit
        | PauseKind::UsageLimit
        | PauseKind::Budget
        | PauseKind::AgentAuth
        | PauseKind::AgentUnavailable => Ok(()),
    }
}

/// Probe the pause when its time comes; returns false when stopping.
async fn wait_out_pause(ctx: &Pipeline) -> bool {
    let Some(pause) = ctx.paused() else {
        return true;
    };
    let wait = pause.probe_at.saturating_duration_since(Instant::now());
    if !wait.is_zero() {
        let mut changes = ctx.pause.subscribe();
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = changes.changed() => {}
            () = ctx.cancel.cancelled() => return false,
        }
        return true;
    }
    match probe(ctx, &pause.cause).await {
        Ok(()) => ctx.resume(),
        Err(why) => ctx.probe_failed(&why),
    }
    true
}

/// Queue what a crash or a stop left mid-way (journals, claims): their
/// issues are read from the forge and queued in the recorded stage.
/// Returns false when the forge could not be read (tried again next poll).
pub(crate) async fn resume_interrupted(ctx: &Pipeline) -> bool {
    let mut ok = true;
    for (n, stage) in journal::pending_at_start(ctx) {
        if ctx.store.is_busy(n) {
            continue;
        }
        match ctx.forge.get_issue(n).await {
            Ok(detail) => {
                tracing::info!(repo_slug = %ctx.layout.slug, issue = n, stage = %stage, "resuming after an interruption");
                ctx.store.enqueue(detail.issue, stage);
            }
            Err(ForgeError::NotFound(_)) => {
                let _ = ctx.state.update_issue(n, |r| {
                    r.journal = None;
                    r.phase = Phase::Open;
                });
            }
            Err(e) => {
                tracing::warn!(repo_slug = %ctx.layout.slug, issue = n, error = %e, "cannot read an interrupted issue; trying again");
                ok = false;
            }
        }
    }
    ok
}

/// Refresh the issue store every `data_poll_interval` (at once when the
/// local forge's issues change), after resuming what was interrupted.
async fn poller(ctx: Arc<Pipeline>) {
    let labels = ctx.labels.specs();
    let mut labels_ensured = false;
    let mut resumed = false;
    let mut forge_changes = ctx.forge.watch_dir().and_then(|dir| watch_dir(&ctx, dir));
    loop {
        ctx.beat("poller");
        if ctx.paused().is_some() {
            if !wait_out_pause(&ctx).await {
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
        if !resumed {
            resumed = resume_interrupted(&ctx).await;
        }
        let wait = match poll_once(&ctx).await {
            Ok(()) => {
                ctx.forge_ok();
                ctx.polled.store(true, Ordering::SeqCst);
                if let Some(budget) = ctx.forge.rate_budget() {
                    ctx.publish(PipelineEvent::OrchestratorStatus(
                        OrchestratorStatus::polled(budget),
                    ));
                }
                Duration::from_secs(ctx.config.data_poll_interval)
            }
            Err(ForgeError::Auth(message)) => {
                ctx.pause(PauseCause::new(
                    PauseKind::ForgeAuth,
                    format!("forge authentication failed: {message}"),
                ));
                continue;
            }
            Err(ForgeError::RateLimited { retry_after }) => {
                ctx.pause(PauseCause {
                    reason: "forge rate limit reached".into(),
                    kind: PauseKind::RateLimit,
                    until: Some(std::time::SystemTime::now() + retry_after),
                });
                continue;
            }
            Err(e) => {
                tracing::warn!(repo_slug = %ctx.layout.slug, error = %e, "cannot list issues; retrying");
                ctx.publish(PipelineEvent::Error(ErrorEvent {
                    loop_name: Some("poller"),
                    message: e.to_string(),
                    ..ErrorEvent::default()
                }));
                ctx.poll_interval()
            }
        };
        let mut beat = tokio::time::interval(ctx.poll_interval());
        beat.tick().await;
        let sleep = tokio::time::sleep(wait);
        tokio::pin!(sleep);
        let mut pause_changes = ctx.pause.subscribe();
        loop {
            let changed = tokio::select! {
                () = &mut sleep => break,
                () = ctx.poll_now.notified() => break,
                changed = next_change(&mut forge_changes) => changed,
                Ok(()) = pause_changes.changed() => break,
                _ = beat.tick() => {
                    ctx.beat("poller");
                    continue;
                }
                () = ctx.cancel.cancelled() => return,
            };
            if !changed {
                forge_changes = None;
                continue;
            }
            // Let a burst of writes settle into one poll.
            tokio::time::sleep(WAKE_DEBOUNCE).await;
            break;
        }
    }
}

type ChangeStream = inotify::EventStream<[u8; 1024]>;

/// Watch `dir` for files written into it (the local forge's issues).
fn watch_dir(ctx: &Pipeline, dir: PathBuf) -> Option<ChangeStream> {
    let _ = std::fs::create_dir_all(&dir);
    inotify::Inotify::init()
        .and_then(|ino| {
            ino.watches().add(
                &dir,
                inotify::WatchMask::MOVED_TO | inotify::WatchMask::CLOSE_WRITE,
            )?;
            ino.into_event_stream([0u8; 1024])
        })
        .map_err(|e| {
            tracing::warn!(repo_slug = %ctx.layout.slug, dir = %dir.display(), error = %e, "cannot watch the forge for changes; polling only");
        })
        .ok()
}

/// The next change of a watch (true), or its end (false); pending forever without one.
async fn next_change(stream: &mut Option<ChangeStream>) -> bool {
    use futures_util::StreamExt as _;
    match stream {
        Some(s) => {
            let first = s.next().await;
            first.is_some_and(|e| e.is_ok())
        }
        None => std::future::pending().await,
    }
}

/// List the pipeline's issues and route each into its queue.
pub(crate) async fn poll_once(ctx: &Pipeline) -> Result<(), ForgeError> {
    // Issues that leave a stage while the listing is under way are routed
    // by the stage, not by this (then stale) listing.
    let listed_at = ctx.store.version();
    let issues = ctx.forge.list_issues(&ctx.labels.listed()).await?;
    let in_progress = ctx.labels.names().in_progress.clone();
    let state = ctx.state.snapshot();
    let mut seen = HashSet::new();
    for issue in issues {
        let n = issue.number;
        seen.insert(n);
        if ctx.store.settled_since(n, listed_at) {
            continue;
        }
        let record = state.issues.get(&n).cloned().unwrap_or_default();
        if let Some(journal) = &record.journal {
            // Side effects a failure cut short: finished before anything else.
            ctx.store.enqueue(issue, journal.stage);
            continue;
        }
        if issue.labels.contains(&in_progress) && !record.is_held() && !ctx.store.is_busy(n) {
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
                if record.pending_hitl().is_some() {
                    ctx.store.enqueue(issue, Stage::Hitl);
                } else {
                    if record.hitl().is_none()
                        && let Err(f) = escalated_by_hand(ctx, n)
                    {
                        tracing::warn!(repo_slug = %ctx.layout.slug, issue = n, error = f.cause(), "cannot record a hand-made escalation");
                    }
                    ctx.store.upsert(issue);
                }
            }
            Route::Ignore => ctx.store.forget(n),
        }
    }
    for known in ctx.store.all() {
        let n = known.number;
        if seen.contains(&n) || ctx.store.settled_since(n, listed_at) {
            continue;
        }
        // Unlisted (labelled fixed, say) but queued to finish what a crash
        // cut short: it stays.
        let held = state.issues.get(&n).is_some_and(|r| r.is_held());
        if held && ctx.store.is_busy(n) {
            continue;
        }
        ctx.store.forget(n);
    }
    ctx.publish(PipelineEvent::QueueUpdate {
        queues: ctx.store.queues(),
        depths: ctx.store.depths(),
    });
    Ok(())
}

/// Apply HITL commands the CLI dropped into the spool directory.
///
/// The directory is watched with inotify, so an idle worker does not wake up
/// to look; without inotify it is read every [`SPOOL_INTERVAL`].
async fn spool_loop(ctx: Arc<Pipeline>) {
    let dir: PathBuf = ctx.layout.spool_dir();
    let mut watch = watch_dir(&ctx, dir.clone());
    loop {
        ctx.beat("spool");
        take_spooled(&ctx, &dir);
        let wait = if watch.is_some() {
            let (changed, go_on) = tokio::select! {
                changed = next_change(&mut watch) => (Some(changed), true),
                () = tokio::time::sleep(ctx.poll_interval()) => (None, true),
                () = ctx.cancel.cancelled() => (None, false),
            };
            if changed == Some(false) {
                watch = None;
            }
            go_on
        } else {
            sleep_or_stop(&ctx, SPOOL_INTERVAL).await
        };
        if !wait {
            return;
        }
    }
}

/// Record each spooled command in `state.json` (the file is removed once
/// it is) and queue its issue for the HITL loop.
pub(crate) fn take_spooled(ctx: &Pipeline, dir: &std::path::Path) {
    for (path, entry) in spool::pending(dir) {
        let entry = match entry {
            Ok(e) => e,
            Err(message) => {
                tracing::warn!(repo_slug = %ctx.layout.slug, path = %path.display(), message, "unreadable spool file set aside");
                ctx.publish(PipelineEvent::Error(ErrorEvent {
                    loop_name: Some("spool"),
                    path: Some(path.clone()),
                    message,
                    ..ErrorEvent::default()
                }));
                spool::reject(&path);
                continue;
            }
        };
        let n = entry.issue;
        if ctx.state.issue(n).hitl().is_none() {
            let message = format!("issue #{n} is not waiting for a human");
            tracing::warn!(repo_slug = %ctx.layout.slug, issue = n, "{message}; command set aside");
            ctx.publish(PipelineEvent::Error(ErrorEvent {
                loop_name: Some("spool"),
                issue: Some(n),
                message,
                ..ErrorEvent::default()
            }));
            spool::reject(&path);
            continue;
        }
        let command: HitlCommand = entry.command.clone();
        let recorded = ctx.state.update_issue(n, |r| {
            if let Phase::WaitingForHuman { pending, .. } = &mut r.phase {
                *pending = Some(command);
                // The human's command gets attempts of its own.
                r.attempts = 0;
            }
        });
        match recorded {
            Ok(()) => {
                let _ = std::fs::remove_file(&path);
                tracing::info!(repo_slug = %ctx.layout.slug, issue = n, stage = "hitl", "HITL command received");
                ctx.publish(PipelineEvent::HitlUpdate(HitlUpdate::Received {
                    issue: n,
                    command: entry.command,
                }));
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
}

/// Queue delayed retries when they are due, after reading the record: an
/// issue a human now has, or that is finished, is not run again.
async fn delay_loop(ctx: Arc<Pipeline>) {
    let mut changes = ctx.store.changes();
    loop {
        ctx.beat("delays");
        release_due(&ctx, Some(Instant::now()));
        let wait = ctx
            .store
            .next_due()
            .map_or(ctx.poll_interval(), |due| {
                due.saturating_duration_since(Instant::now())
            })
            .min(ctx.poll_interval());
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            Ok(()) = changes.changed() => {}
            () = ctx.cancel.cancelled() => return,
        }
    }
}

/// Queue the retries due at `now` (all with `None`) that are still to do.
pub(crate) fn release_due(ctx: &Pipeline, now: Option<Instant>) {
    for (n, stage) in ctx.store.take_due(now) {
        let record = ctx.state.issue(n);
        let settled = record.journal.is_none()
            && match &record.phase {
                Phase::Done { .. } => true,
                Phase::WaitingForHuman { pending, .. } => pending.is_none(),
                _ => false,
            };
        if settled {
            tracing::debug!(repo_slug = %ctx.layout.slug, issue = n, "retry no longer needed");
            continue;
        }
        match ctx.store.get(n) {
            Some(issue) => {
                ctx.store.enqueue(issue, stage);
            }
            None => ctx.poll_now.notify_one(),
        }
    }
}

/// Collect worktrees and branches of finished issues at start and then
/// every [`GC_INTERVAL`].
async fn gc_loop(ctx: Arc<Pipeline>) {
    // After the first poll, so interrupted work is queued (and held) first.
    while !ctx.has_polled() {
        if !sleep_or_stop(&ctx, Duration::from_millis(200)).await {
            return;
        }
    }
    loop {
        ctx.beat("gc");
        collect_garbage(&ctx).await;
        let mut beat = tokio::time::interval(ctx.poll_interval());
        beat.tick().await;
        let sleep = tokio::time::sleep(GC_INTERVAL);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => break,
                _ = beat.tick() => ctx.beat("gc"),
                () = ctx.cancel.cancelled() => return,
            }
        }
    }
}

/// Remove the worktrees and `agent/issue-<N>` branches of issues that are
/// merged, satisfied or closed (by the record, else by the forge); never
/// of an issue in flight, held, waiting for a human or unknown to the forge.
pub(crate) async fn collect_garbage(ctx: &Pipeline) {
    let leftovers = match ctx.worktrees.leftovers().await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(repo_slug = %ctx.layout.slug, error = %e, "cannot list worktrees and branches for garbage collection");
            return;
        }
    };
    let state = ctx.state.snapshot();
    let mut done = HashSet::new();
    for n in leftovers {
        if ctx.store.is_busy(n) {
            continue;
        }
        let record = state.issues.get(&n);
        let finished = match record {
            Some(r) if r.is_held() || r.hitl().is_some() => false,
            Some(r) if r.outcome().is_some_and(|o| o.is_final()) => true,
            _ => matches!(
                ctx.forge.get_issue(n).await,
                Ok(d) if d.issue.state == crate::forge::IssueState::Closed
            ),
        };
        if finished {
            done.insert(n);
        }
    }
    if done.is_empty() {
        return;
    }
    let done = Arc::new(done);
    let worktrees = ctx
        .worktrees
        .gc(|n| done.contains(&n))
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(repo_slug = %ctx.layout.slug, error = %e, "garbage collection of worktrees failed");
            Vec::new()
        });
    let in_branches = Arc::clone(&done);
    let branches = ctx
        .worktrees
        .gc_branches(move |n| in_branches.contains(&n))
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(repo_slug = %ctx.layout.slug, error = %e, "garbage collection of branches failed");
            Vec::new()
        });
    if !worktrees.is_empty() || !branches.is_empty() {
        tracing::info!(repo_slug = %ctx.layout.slug, worktrees = worktrees.len(), branches = branches.len(), "removed worktrees and branches of finished issues");
        let _ = ctx.state.update(|s| {
            for n in done.iter() {
                if let Some(r) = s.issues.get_mut(n) {
                    r.worktree = None;
                    r.branch = None;
                }
            }
        });
        ctx.publish(PipelineEvent::GarbageCollected {
            worktrees,
            branches,
        });
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
        if ctx.stopping() {
            break;
        }
        if let Some(wait) = ctx.paused_for() {
            let mut changes = ctx.pause.subscribe();
            tokio::select! {
                () = tokio::time::sleep(wait.clamp(Duration::from_millis(100), ctx.poll_interval())) => {}
                _ = changes.changed() => {}
                () = ctx.cancel.cancelled() => break,
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
                    task::process(ctx, stage, issue).await;
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
    // Stopping: claims and journals are on disk; dropping the tasks kills
    // their agents' process groups.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}
