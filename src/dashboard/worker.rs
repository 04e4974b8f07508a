//! A worker's API (docs/design/dashboard.md): plain functions over the
//! [`RepoRuntimeRegistry`] in [`api`], and an axum router whose handlers
//! are one-line adapters into them, served on an already-bound listener.
//!
//! Routes: `GET /healthz`, `/api/state`, `/api/pipeline`,
//! `/api/events?since=N`, `/api/sessions`, `/api/costs`, `/api/runtimes`,
//! `/api/runtimes/{slug}`, `POST /api/runtimes/{slug}/start|stop`,
//! `GET /api/hitl`, `POST /api/hitl/{n}/correct {"correction": "…"}`,
//! `/skip`, `/close`, `POST /api/wake` (a webhook delivery for the
//! repository, relayed by the supervisor: poll the forge now), and the WebSocket `/ws?since=N` (history, then live
//! events, one JSON event per text frame; `{"type":"dropped","count":N}`
//! when this client fell behind). Every route but `/healthz` and
//! `/api/runtimes*` addresses one runtime: the only one, or `?repo=<slug>`;
//! an unknown slug is a 404, never another repository.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::ApiError;
use crate::runtime::RepoRuntimeRegistry;
use crate::store::state::HitlCommand;

/// How long one WebSocket frame may take to send before the client is
/// dropped (a client that never reads must not hold the server).
pub const WS_SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a runtime may take to stop through `POST …/stop`.
pub const STOP_DEADLINE: Duration = Duration::from_secs(8);

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The runtimes.
    pub registry: Arc<RepoRuntimeRegistry>,
    /// When the API started (for uptime).
    pub started: Instant,
}

/// The plain functions behind the routes.
pub mod api {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Instant;

    use super::super::ApiError;
    use crate::agent::Stage;
    pub use crate::api::{Check, ForgeInfo, Health, RuntimeHealth};
    use crate::api::{
        CostToday, Costs, HealthStatus, HitlAccepted, HitlItem, IssueRow, IssueStatus, Pipeline,
        RuntimeInfo, Woke,
    };
    use crate::config::ForgeKind;
    use crate::pipeline::spool::{self, SubmitError};
    use crate::runtime::{RepoRuntime, RepoRuntimeRegistry};
    use crate::store::events::Event;
    use crate::store::sessions::{SessionLog, SessionRecord};
    use crate::store::state::HitlCommand;

    /// The runtime `repo` names, or the only one when `repo` is `None`.
    ///
    /// # Errors
    /// 404 for an unknown slug; 503 with no runtime; 400 with several and no slug.
    pub fn runtime(
        registry: &RepoRuntimeRegistry,
        repo: Option<&str>,
    ) -> Result<Arc<RepoRuntime>, ApiError> {
        if let Some(slug) = repo {
            return registry
                .get(slug)
                .ok_or_else(|| ApiError::not_found(format!("no repository {slug:?} here")));
        }
        let mut all = registry.all();
        match all.len() {
            1 => Ok(all.remove(0)),
            0 => Err(ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "no repository runtime is registered",
            )),
            n => Err(ApiError::bad_request(format!(
                "{n} repositories are served here: pass ?repo=<slug>"
            ))),
        }
    }

    /// The forge of `rt`.
    pub fn forge_info(rt: &RepoRuntime) -> ForgeInfo {
        let forge = rt.forge();
        ForgeInfo {
            name: forge.name().to_owned(),
            identity: forge.identity(),
            budget: forge.rate_budget(),
        }
    }

    /// One runtime's health entry.
    pub async fn runtime_health(rt: &RepoRuntime) -> RuntimeHealth {
        let state = rt.state().snapshot();
        RuntimeHealth {
            slug: rt.slug().to_string(),
            running: rt.running().await,
            status_line: rt.status_line().await,
            queues: rt.store().depths(),
            hitl_waiting: state.issues.values().filter(|r| r.hitl().is_some()).count(),
            done: state.session.issues_succeeded,
            forge: forge_info(rt),
        }
    }

    /// Health of every runtime.
    pub async fn health(registry: &RepoRuntimeRegistry, started: Instant) -> Health {
        let mut runtimes = Vec::new();
        let mut checks = BTreeMap::new();
        for rt in registry.all() {
            let h = runtime_health(&rt).await;
            checks.insert(
                format!("orchestrator:{}", h.slug),
                Check {
                    ok: h.running,
                    detail: if h.running { "running" } else { "stopped" }.into(),
                },
            );
            let paused = h.status_line.starts_with("paused");
            checks.insert(
                format!("pipeline:{}", h.slug),
                Check {
                    ok: h.running && !paused,
                    detail: h.status_line.clone(),
                },
            );
            runtimes.push(h);
        }
        let ready = !runtimes.is_empty() && runtimes.iter().all(|r| r.running);
        let status = if !ready {
            HealthStatus::Stopped
        } else if checks.values().all(|c| c.ok) {
            HealthStatus::Ok
        } else {
            HealthStatus::Degraded
        };
        Health {
            status,
            ready,
            checks,
            uptime_seconds: started.elapsed().as_secs_f64(),
            runtimes,
        }
    }

    /// `GET /api/state`: `state.json` as the worker holds it.
    pub fn state(rt: &RepoRuntime) -> crate::store::state::State {
        rt.state().snapshot()
    }

    fn pr_url(rt: &RepoRuntime, pr: u64) -> Option<String> {
        let config = &rt.resolved().config;
        match (config.forge, &config.repo) {
            (ForgeKind::Github, Some(repo)) => Some(format!(
                "{}/{repo}/pull/{pr}",
                config.github.web_url.trim_end_matches('/')
            )),
            _ => None,
        }
    }

    fn issue_row(rt: &RepoRuntime, number: u64, status: IssueStatus) -> IssueRow {
        let issue = rt.store().get(number);
        let record = rt.state().issue(number);
        IssueRow {
            number,
            title: issue.as_ref().map(|i| i.title.clone()),
            url: issue.as_ref().and_then(|i| i.url.clone()),
            labels: issue.map(|i| i.labels).unwrap_or_default(),
            status,
            pull_request: record.pull_request,
            pull_request_url: record.pull_request.and_then(|pr| pr_url(rt, pr)),
            attempts: record.attempts,
        }
    }

    /// `GET /api/pipeline`: issues per stage (queued, then in flight), and
    /// the issues waiting for a human.
    pub fn pipeline(rt: &RepoRuntime) -> Pipeline {
        let mut stages: BTreeMap<Stage, Vec<IssueRow>> =
            Stage::ALL.into_iter().map(|s| (s, Vec::new())).collect();
        for (stage, numbers) in rt.store().queues() {
            for n in numbers {
                stages
                    .entry(stage)
                    .or_default()
                    .push(issue_row(rt, n, IssueStatus::Queued));
            }
        }
        for (n, stage) in rt.store().in_flight() {
            stages
                .entry(stage)
                .or_default()
                .push(issue_row(rt, n, IssueStatus::Running));
        }
        let state = rt.state().snapshot();
        let waiting: Vec<IssueRow> = state
            .issues
            .iter()
            .filter(|(_, r)| r.hitl().is_some())
            .map(|(n, _)| issue_row(rt, *n, IssueStatus::Waiting))
            .collect();
        Pipeline {
            repo: rt.slug().to_string(),
            stages,
            hitl_waiting: waiting,
            depths: rt.store().depths(),
            done: state.session.issues_succeeded,
        }
    }

    /// `GET /api/events?since=N`.
    pub fn events(rt: &RepoRuntime, since: Option<u64>) -> Vec<Event> {
        rt.events().history(since)
    }

    /// `GET /api/sessions`.
    ///
    /// # Errors
    /// 500 when `sessions.jsonl` cannot be read.
    pub fn sessions(rt: &RepoRuntime) -> Result<Vec<SessionRecord>, ApiError> {
        SessionLog::read_all(&rt.layout().sessions_file())
            .map_err(|e| ApiError::internal(e.to_string()))
    }

    /// `GET /api/costs`: the agents' cost per issue and per UTC day (from
    /// `agent-calls.jsonl`), today's total and `agent.daily_budget_usd`.
    ///
    /// # Errors
    /// 500 when `agent-calls.jsonl` cannot be read.
    pub fn costs(rt: &RepoRuntime) -> Result<Costs, ApiError> {
        let costs = crate::store::sessions::costs(&rt.layout().agent_calls_file())
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let day = chrono::Utc::now().format("%Y-%m-%d").to_string();
        let usd = costs.per_day.get(&day).copied().unwrap_or(0.0);
        Ok(Costs {
            per_issue: costs.per_issue,
            calls_per_issue: costs.calls_per_issue,
            per_day: costs.per_day,
            today: CostToday { day, usd },
            daily_budget_usd: rt.resolved().config.agent.daily_budget_usd,
        })
    }

    /// `POST /api/wake {"senders": [login, …] | null}`: webhook deliveries
    /// for the repository, sent by those logins (`null`: unknown). The
    /// poller slows to `github.fallback_poll_interval` while deliveries
    /// arrive, and polls now unless every sender is the forge's own login
    /// (the worker's own change, which it knows of). `{"polled": false}`
    /// when it did not poll, `{"woke": false}` when the loops are stopped.
    pub async fn wake(rt: &RepoRuntime, senders: Option<Vec<String>>) -> Woke {
        let own = rt.forge().login();
        let poll = match (&senders, &own) {
            (Some(senders), Some(own)) => senders.iter().any(|s| s != own),
            _ => true,
        };
        Woke {
            slug: rt.slug().to_string(),
            woke: rt.webhook_delivered(poll).await,
            polled: poll,
        }
    }

    /// One entry of `GET /api/runtimes`.
    pub async fn runtime_info(rt: &RepoRuntime) -> RuntimeInfo {
        RuntimeInfo {
            slug: rt.slug().to_string(),
            running: rt.running().await,
            status_line: rt.status_line().await,
            repo_path: rt.resolved().repo_path.clone(),
            data_dir: rt.layout().repo_dir(),
            forge: rt.resolved().config.forge,
        }
    }

    /// `GET /api/runtimes`.
    pub async fn runtimes(registry: &RepoRuntimeRegistry) -> Vec<RuntimeInfo> {
        let mut out = Vec::new();
        for rt in registry.all() {
            out.push(runtime_info(&rt).await);
        }
        out
    }

    /// `GET /api/hitl`: issues waiting for a human, with origin, cause and
    /// any command not yet applied.
    pub fn hitl(rt: &RepoRuntime) -> Vec<HitlItem> {
        rt.state()
            .snapshot()
            .issues
            .iter()
            .filter_map(|(n, r)| {
                r.hitl().map(|h| HitlItem {
                    issue: *n,
                    title: rt.store().get(*n).map(|i| i.title),
                    stage: h.stage,
                    origin: h.origin.clone(),
                    cause: h.cause.clone(),
                    escalated_at: h.escalated_at,
                    pending: r.pending_hitl().cloned(),
                })
            })
            .collect()
    }

    /// `POST /api/hitl/{n}/…`: hand `command` to the worker through the
    /// spool, exactly as `hydraflow hitl` does.
    ///
    /// # Errors
    /// 409 for an issue not waiting for a human, 400 for an empty
    /// correction, 500 for an unwritable spool.
    pub fn submit_hitl(
        rt: &RepoRuntime,
        issue: u64,
        command: HitlCommand,
    ) -> Result<HitlAccepted, ApiError> {
        let state = rt.state().snapshot();
        let path = spool::submit_command(&rt.layout().spool_dir(), &state, issue, command.clone())
            .map_err(|e| match e {
                SubmitError::NotWaiting(_) => ApiError::conflict(e.to_string()),
                SubmitError::EmptyCorrection => ApiError::bad_request(e.to_string()),
                SubmitError::Io { .. } => ApiError::internal(e.to_string()),
            })?;
        Ok(HitlAccepted {
            issue,
            accepted: true,
            command,
            spool_file: path,
        })
    }
}

/// `?repo=<slug>&since=<id>`.
#[derive(Debug, Default, Deserialize)]
pub struct Params {
    /// The repository slug.
    pub repo: Option<String>,
    /// Only events with a greater id.
    pub since: Option<u64>,
}

/// `{"correction": "…"}`.
#[derive(Debug, Deserialize)]
pub struct Correction {
    /// What the agent should do differently.
    pub correction: String,
}

fn query(q: Result<Query<Params>, QueryRejection>) -> Result<Params, ApiError> {
    q.map(|Query(p)| p)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

fn path<T>(p: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    p.map(|Path(v)| v)
        .map_err(|e| ApiError::bad_request(e.body_text()))
}

type Q = Result<Query<Params>, QueryRejection>;
type Api<T> = Result<Json<T>, ApiError>;

async fn healthz(State(s): State<AppState>) -> Response {
    let h = api::health(&s.registry, s.started).await;
    let code = if h.ready {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(h)).into_response()
}

async fn state(State(s): State<AppState>, q: Q) -> Api<crate::store::state::State> {
    Ok(Json(api::state(&*api::runtime(
        &s.registry,
        query(q)?.repo.as_deref(),
    )?)))
}

async fn pipeline(State(s): State<AppState>, q: Q) -> Api<crate::api::Pipeline> {
    Ok(Json(api::pipeline(&*api::runtime(
        &s.registry,
        query(q)?.repo.as_deref(),
    )?)))
}

async fn events(State(s): State<AppState>, q: Q) -> Api<Vec<crate::store::events::Event>> {
    let p = query(q)?;
    Ok(Json(api::events(
        &*api::runtime(&s.registry, p.repo.as_deref())?,
        p.since,
    )))
}

async fn sessions(
    State(s): State<AppState>,
    q: Q,
) -> Api<Vec<crate::store::sessions::SessionRecord>> {
    Ok(Json(api::sessions(&*api::runtime(
        &s.registry,
        query(q)?.repo.as_deref(),
    )?)?))
}

async fn costs(State(s): State<AppState>, q: Q) -> Api<crate::api::Costs> {
    Ok(Json(api::costs(&*api::runtime(
        &s.registry,
        query(q)?.repo.as_deref(),
    )?)?))
}

/// `POST /api/wake`'s body.
#[derive(Debug, Default, Deserialize)]
struct WakeBody {
    senders: Option<Vec<String>>,
}

async fn wake(
    State(s): State<AppState>,
    q: Q,
    body: Result<Json<WakeBody>, JsonRejection>,
) -> Api<crate::api::Woke> {
    let rt = api::runtime(&s.registry, query(q)?.repo.as_deref())?;
    // No body (or not JSON): senders unknown, the worker polls.
    let senders = body.ok().and_then(|Json(b)| b.senders);
    Ok(Json(api::wake(&rt, senders).await))
}

async fn runtimes(State(s): State<AppState>) -> Json<Vec<crate::api::RuntimeInfo>> {
    Json(api::runtimes(&s.registry).await)
}

async fn runtime_one(
    State(s): State<AppState>,
    slug: Result<Path<String>, PathRejection>,
) -> Api<crate::api::RuntimeInfo> {
    let rt = api::runtime(&s.registry, Some(&path(slug)?))?;
    Ok(Json(api::runtime_info(&rt).await))
}

async fn runtime_start(
    State(s): State<AppState>,
    slug: Result<Path<String>, PathRejection>,
) -> Api<crate::api::RuntimeInfo> {
    let rt = api::runtime(&s.registry, Some(&path(slug)?))?;
    rt.start().await;
    Ok(Json(api::runtime_info(&rt).await))
}

async fn runtime_stop(
    State(s): State<AppState>,
    slug: Result<Path<String>, PathRejection>,
) -> Api<crate::api::RuntimeInfo> {
    let rt = api::runtime(&s.registry, Some(&path(slug)?))?;
    if rt.running().await {
        rt.stop(STOP_DEADLINE).await;
    }
    Ok(Json(api::runtime_info(&rt).await))
}

async fn hitl(State(s): State<AppState>, q: Q) -> Api<Vec<crate::api::HitlItem>> {
    Ok(Json(api::hitl(&*api::runtime(
        &s.registry,
        query(q)?.repo.as_deref(),
    )?)))
}

type IssueNumber = Result<Path<u64>, PathRejection>;

async fn hitl_correct(
    State(s): State<AppState>,
    n: IssueNumber,
    q: Q,
    body: Result<Json<Correction>, JsonRejection>,
) -> Api<crate::api::HitlAccepted> {
    let rt = api::runtime(&s.registry, query(q)?.repo.as_deref())?;
    let n = path(n)?;
    let Json(c) = body.map_err(|e| ApiError::bad_request(e.body_text()))?;
    Ok(Json(api::submit_hitl(
        &rt,
        n,
        HitlCommand::Correct { text: c.correction },
    )?))
}

async fn hitl_skip(
    State(s): State<AppState>,
    n: IssueNumber,
    q: Q,
) -> Api<crate::api::HitlAccepted> {
    let rt = api::runtime(&s.registry, query(q)?.repo.as_deref())?;
    Ok(Json(api::submit_hitl(&rt, path(n)?, HitlCommand::Skip)?))
}

async fn hitl_close(
    State(s): State<AppState>,
    n: IssueNumber,
    q: Q,
) -> Api<crate::api::HitlAccepted> {
    let rt = api::runtime(&s.registry, query(q)?.repo.as_deref())?;
    Ok(Json(api::submit_hitl(&rt, path(n)?, HitlCommand::Close)?))
}

async fn ws(
    State(s): State<AppState>,
    q: Q,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let p = query(q)?;
    let rt = api::runtime(&s.registry, p.repo.as_deref())?;
    let events = Arc::clone(rt.events());
    let upgrade = upgrade.map_err(|e| ApiError::bad_request(e.body_text()))?;
    Ok(upgrade.on_upgrade(move |socket| stream_events(socket, events, p.since)))
}

/// Send history after `since`, then live events, until the client goes
/// away or a frame cannot be sent within [`WS_SEND_TIMEOUT`].
async fn stream_events(
    mut socket: WebSocket,
    events: Arc<crate::store::events::EventBus>,
    since: Option<u64>,
) {
    let mut rx = events.subscribe();
    let mut last = since.unwrap_or(0);
    for e in events.history(since) {
        last = e.id;
        if !send_json(&mut socket, &e).await {
            return;
        }
    }
    loop {
        tokio::select! {
            got = rx.recv() => match got {
                Ok(e) if e.id <= last => {}
                Ok(e) => {
                    last = e.id;
                    if !send_json(&mut socket, &e).await { return; }
                }
                Err(RecvError::Lagged(n)) => {
                    let notice = serde_json::json!({"type": "dropped", "count": n});
                    if !send_json(&mut socket, &notice).await { return; }
                }
                Err(RecvError::Closed) => return,
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

async fn send_json(socket: &mut WebSocket, value: &impl serde::Serialize) -> bool {
    let Ok(text) = serde_json::to_string(value) else {
        return true;
    };
    matches!(
        tokio::time::timeout(WS_SEND_TIMEOUT, socket.send(Message::Text(text.into()))).await,
        Ok(Ok(()))
    )
}

/// The worker API's router (without access control).
pub fn router(registry: Arc<RepoRuntimeRegistry>) -> Router {
    let app = AppState {
        registry,
        started: Instant::now(),
    };
    Router::new()
        .route("/healthz", get(healthz))
        .route("/api/state", get(state))
        .route("/api/pipeline", get(pipeline))
        .route("/api/events", get(events))
        .route("/api/sessions", get(sessions))
        .route("/api/costs", get(costs))
        .route("/api/wake", post(wake))
        .route("/api/runtimes", get(runtimes))
        .route("/api/runtimes/{slug}", get(runtime_one))
        .route("/api/runtimes/{slug}/start", post(runtime_start))
        .route("/api/runtimes/{slug}/stop", post(runtime_stop))
        .route("/api/hitl", get(hitl))
        .route("/api/hitl/{n}/correct", post(hitl_correct))
        .route("/api/hitl/{n}/skip", post(hitl_skip))
        .route("/api/hitl/{n}/close", post(hitl_close))
        .route("/ws", get(ws))
        .fallback(super::no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(app)
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

/// Serve the worker API on an already-bound Unix socket until `shutdown`
/// completes (open WebSockets are closed then).
///
/// # Errors
/// I/O errors of the server.
pub async fn serve(
    listener: tokio::net::UnixListener,
    registry: Arc<RepoRuntimeRegistry>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(registry))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serve the worker API on an already-bound TCP listener, letting in whom
/// `guard` lets in (see [`super::auth`]).
///
/// # Errors
/// I/O errors of the server.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    registry: Arc<RepoRuntimeRegistry>,
    guard: super::auth::Guard,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(registry)
        .layer(axum::middleware::from_fn_with_state(
            guard,
            super::auth::guard,
        ))
        .into_make_service_with_connect_info::<super::auth::Peer>();
    let listener = super::auth::NoDelay(listener);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
