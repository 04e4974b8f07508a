//! The supervisor's dashboard (docs/design/dashboard.md) on TCP (127.0.0.1:5555 by
//! default): `GET /api/repos` (every registered repository with its unit
//! state and its worker's health, or why it is down), `/repos/{slug}/…`
//! proxied to that worker's Unix socket, `GET /ws?repo=__all__|<slug>`
//! fanning in the workers' events tagged with their slug, and the web page
//! at `/`.
//!
//! Fan-in: one upstream WebSocket per worker (reconnected every second
//! while down, resuming after the last id seen); each browser has a bounded
//! queue ([`CLIENT_QUEUE`] frames) that drops its oldest frame when full and
//! says how many it dropped (`{"type":"dropped","count":N}`), so one slow
//! browser never stalls the workers' streams or the other browsers.
//! Frames are `{"slug":S,"event":{…}}`, plus `{"slug":S,"type":"worker_down",
//! "error":…}` and `{"slug":S,"type":"worker_up"}`.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use futures_util::{SinkExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::ApiError;
use super::client::{self, ClientError};
use crate::api::{ForgeInfo, Health, InstanceStatus, RepoRow, Repos, WorkerHealth};

/// Frames queued per browser before the oldest is dropped.
pub const CLIENT_QUEUE: usize = 8192;
/// How long a proxied request may wait for the worker's response headers.
pub const PROXY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `/api/repos` waits for each worker's `/healthz`.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one frame to a browser may take before the browser is dropped.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the list of repositories is re-read and down workers retried.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(1);

/// The web page (no build step, nothing fetched from the internet).
const PAGE: &str = include_str!("page.html");

/// One registered repository, as the supervisor knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RepoEntry {
    /// The slug.
    pub slug: String,
    /// The checkout, when known.
    pub path: Option<PathBuf>,
    /// The worker's API socket.
    pub socket: PathBuf,
    /// The unit's state from the instance backend, when known.
    pub unit: Option<InstanceStatus>,
    /// Why the unit's state is unknown, when it is.
    pub unit_error: Option<String>,
}

/// Where the dashboard learns the registered repositories and their sockets
/// (the supervisor's registry and backend in production).
#[async_trait]
pub trait RepoDirectory: Send + Sync + 'static {
    /// Every registered repository.
    async fn repos(&self) -> Vec<RepoEntry>;
}

/// A fixed list of `(slug, socket)` (`hydraflow dashboard --worker`).
#[derive(Debug, Clone)]
pub struct StaticRepos(pub Vec<(String, PathBuf)>);

#[async_trait]
impl RepoDirectory for StaticRepos {
    async fn repos(&self) -> Vec<RepoEntry> {
        self.0
            .iter()
            .map(|(slug, socket)| RepoEntry {
                slug: slug.clone(),
                path: None,
                socket: socket.clone(),
                unit: None,
                unit_error: None,
            })
            .collect()
    }
}

/// One browser's queue.
#[derive(Debug)]
struct ClientQueue {
    /// `None`: every repository.
    slug: Option<String>,
    frames: Mutex<VecDeque<Arc<str>>>,
    dropped: AtomicU64,
    ready: Notify,
}

/// Recent frames kept to seed a browser that joins.
pub const RECENT: usize = 500;

/// The browsers' queues; workers' frames are pushed onto each.
#[derive(Debug, Default)]
pub struct Hub {
    clients: Mutex<Vec<Arc<ClientQueue>>>,
    /// The last [`RECENT`] frames with their slug.
    recent: Mutex<VecDeque<(String, Arc<str>)>>,
    /// Frames dropped for slow browsers, in total.
    dropped: AtomicU64,
}

impl Hub {
    fn add(&self, slug: Option<String>) -> Arc<ClientQueue> {
        // Under the clients lock, so no frame is both seeded and published.
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let seed: VecDeque<Arc<str>> = self
            .recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(s, _)| slug.as_deref().is_none_or(|want| want == s))
            .map(|(_, f)| Arc::clone(f))
            .collect();
        let q = Arc::new(ClientQueue {
            slug,
            frames: Mutex::new(seed),
            dropped: AtomicU64::new(0),
            ready: Notify::new(),
        });
        clients.push(Arc::clone(&q));
        q.ready.notify_one();
        q
    }

    fn remove(&self, q: &Arc<ClientQueue>) {
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|c| !Arc::ptr_eq(c, q));
    }

    /// Queue `frame` from `slug` for every browser watching it.
    pub fn publish(&self, slug: &str, frame: &Arc<str>) {
        let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() >= RECENT {
                recent.pop_front();
            }
            recent.push_back((slug.to_owned(), Arc::clone(frame)));
        }
        for c in clients.iter() {
            if c.slug.as_deref().is_some_and(|s| s != slug) {
                continue;
            }
            {
                let mut frames = c.frames.lock().unwrap_or_else(|p| p.into_inner());
                if frames.len() >= CLIENT_QUEUE {
                    frames.pop_front();
                    c.dropped.fetch_add(1, Ordering::Relaxed);
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
                frames.push_back(Arc::clone(frame));
            }
            c.ready.notify_one();
        }
    }

    /// Frames dropped for slow browsers so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct AppState {
    directory: Arc<dyn RepoDirectory>,
    hub: Arc<Hub>,
}

async fn find(directory: &dyn RepoDirectory, slug: &str) -> Result<RepoEntry, ApiError> {
    directory
        .repos()
        .await
        .into_iter()
        .find(|r| r.slug == slug)
        .ok_or_else(|| ApiError::not_found(format!("no repository {slug:?} is registered")))
}

/// What the worker at `socket` answers on `/healthz` (within [`HEALTH_TIMEOUT`]).
async fn worker_health(socket: &std::path::Path) -> WorkerHealth {
    let answer = client::json(socket, http::Method::GET, "/healthz", None, HEALTH_TIMEOUT).await;
    match answer {
        Ok((status, body)) => match serde_json::from_value::<Health>(body) {
            Ok(health) => WorkerHealth {
                up: true,
                http_status: Some(status.as_u16()),
                health: Some(health),
                error: None,
            },
            Err(e) => WorkerHealth {
                up: false,
                http_status: Some(status.as_u16()),
                health: None,
                error: Some(format!(
                    "the worker answered /healthz with {status} and no health report: {e}"
                )),
            },
        },
        Err(e) => WorkerHealth {
            up: false,
            http_status: None,
            health: None,
            error: Some(e.to_string()),
        },
    }
}

/// One row of `GET /api/repos`.
pub async fn repo_row(entry: RepoEntry) -> RepoRow {
    let worker = worker_health(&entry.socket).await;
    RepoRow {
        slug: entry.slug,
        path: entry.path,
        socket: entry.socket,
        unit: entry.unit,
        unit_error: entry.unit_error,
        worker,
    }
}

/// The forge of the worker at `socket` (its `/healthz`, within [`HEALTH_TIMEOUT`]).
///
/// # Errors
/// Why the worker could not be asked, or its answer has no forge.
pub async fn worker_forge(socket: &std::path::Path) -> Result<ForgeInfo, String> {
    let worker = worker_health(socket).await;
    let health = worker
        .health
        .ok_or_else(|| worker.error.unwrap_or_else(|| "no answer".into()))?;
    health
        .runtimes
        .into_iter()
        .next()
        .map(|r| r.forge)
        .ok_or_else(|| "the worker's /healthz names no runtime".into())
}

/// `GET /api/repos`: every repository, its workers asked in parallel.
pub async fn repos(directory: &dyn RepoDirectory) -> Vec<RepoRow> {
    let rows = directory.repos().await.into_iter().map(repo_row);
    futures_util::future::join_all(rows).await
}

async fn api_repos(State(s): State<AppState>) -> Json<Repos> {
    Json(Repos {
        repos: repos(&*s.directory).await,
        dropped_frames: s.hub.dropped(),
    })
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// `/repos/{slug}/`: the page with that repository selected (the protocol's `dashboard_url`,
/// which the original's `hf open` opens); a slug that is not registered is a 404.
async fn repo_page(
    State(s): State<AppState>,
    Path(slug): Path<String>,
) -> Result<Html<&'static str>, ApiError> {
    find(&*s.directory, &slug).await?;
    Ok(Html(PAGE))
}

/// `/repos/{slug}`: on to `/repos/{slug}/` (a relative redirect, so it works behind a prefix).
async fn repo_page_slash(Path(slug): Path<String>) -> axum::response::Redirect {
    let segment = percent_encoding::utf8_percent_encode(&slug, percent_encoding::NON_ALPHANUMERIC);
    axum::response::Redirect::permanent(&format!("{segment}/"))
}

/// Request headers not passed to a worker (hop-by-hop, and the access
/// token, which is the supervisor's business).
const DROP_HEADERS: [header::HeaderName; 6] = [
    header::HOST,
    header::CONNECTION,
    header::AUTHORIZATION,
    header::COOKIE,
    header::UPGRADE,
    header::TRANSFER_ENCODING,
];

/// `/repos/{slug}/{*rest}`: the same request to that worker's socket.
async fn proxy(
    State(s): State<AppState>,
    Path((slug, rest)): Path<(String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    let entry = find(&*s.directory, &slug).await?;
    let (parts, body) = request.into_parts();
    let target = match parts.uri.query() {
        Some(q) => format!("/{rest}?{q}"),
        None => format!("/{rest}"),
    };
    let mut out = http::Request::builder().method(parts.method).uri(&target);
    for (k, v) in &parts.headers {
        if !DROP_HEADERS.contains(k) {
            out = out.header(k, v);
        }
    }
    let out = out
        .body(body)
        .map_err(|e| ApiError::bad_request(format!("cannot forward {target}: {e}")))?;
    match client::send(&entry.socket, out, PROXY_TIMEOUT).await {
        Ok(resp) => Ok(resp.map(Body::new)),
        Err(e @ ClientError::Timeout { .. }) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!("worker {slug}: {e}"),
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("worker {slug} is down: {e}"),
        )),
    }
}

/// `?repo=__all__|<slug>`.
#[derive(Debug, Deserialize)]
struct WsParams {
    repo: Option<String>,
}

async fn ws(
    State(s): State<AppState>,
    params: Result<Query<WsParams>, axum::extract::rejection::QueryRejection>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let slug = match params.repo.as_deref() {
        None | Some("__all__") => None,
        Some(slug) => Some(find(&*s.directory, slug).await?.slug),
    };
    let hub = Arc::clone(&s.hub);
    let upgrade = upgrade.map_err(|e| ApiError::bad_request(e.body_text()))?;
    Ok(upgrade.on_upgrade(move |socket| browser(socket, hub, slug)))
}

/// Feed one browser from its queue until it leaves or stops reading.
async fn browser(socket: WebSocket, hub: Arc<Hub>, slug: Option<String>) {
    let q = hub.add(slug);
    let (mut tx, mut rx) = socket.split();
    'outer: loop {
        tokio::select! {
            () = q.ready.notified() => {}
            incoming = rx.next() => match incoming {
                Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                Some(Ok(_)) => continue,
            },
        }
        loop {
            let dropped = q.dropped.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                let notice = json!({"type": "dropped", "count": dropped}).to_string();
                if !send(&mut tx, Message::Text(notice.into())).await {
                    break 'outer;
                }
            }
            let batch: Vec<Arc<str>> = {
                let mut frames = q.frames.lock().unwrap_or_else(|p| p.into_inner());
                let n = frames.len().min(256);
                frames.drain(..n).collect()
            };
            if batch.is_empty() {
                break;
            }
            for frame in batch {
                if tx.feed(Message::Text((&*frame).into())).await.is_err() {
                    break 'outer;
                }
            }
            if !matches!(
                tokio::time::timeout(SEND_TIMEOUT, tx.flush()).await,
                Ok(Ok(()))
            ) {
                break 'outer;
            }
        }
    }
    hub.remove(&q);
}

async fn send(tx: &mut futures_util::stream::SplitSink<WebSocket, Message>, m: Message) -> bool {
    matches!(
        tokio::time::timeout(SEND_TIMEOUT, tx.send(m)).await,
        Ok(Ok(()))
    )
}

#[derive(Deserialize)]
struct IdOnly {
    id: Option<u64>,
}

/// Follow one worker's events into the hub until `stop`; reconnect after
/// [`RECONCILE_INTERVAL`] while it is down, resuming after the last id.
async fn upstream(hub: Arc<Hub>, slug: String, socket: PathBuf, stop: CancellationToken) {
    let tag = serde_json::to_string(&slug).unwrap_or_default();
    let mut last: Option<u64> = None;
    let mut down_reported = false;
    loop {
        let query = last.map(|id| format!("since={id}")).unwrap_or_default();
        let error = match client::events(&socket, &query, HEALTH_TIMEOUT).await {
            Ok(mut ws) => {
                hub.publish(
                    &slug,
                    &Arc::from(format!(r#"{{"slug":{tag},"type":"worker_up"}}"#)),
                );
                down_reported = false;
                loop {
                    let next = tokio::select! {
                        n = ws.next() => n,
                        () = stop.cancelled() => return,
                    };
                    match next {
                        Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                            if let Ok(IdOnly { id: Some(id) }) = serde_json::from_str(&t) {
                                last = Some(id);
                            }
                            let frame: Arc<str> =
                                Arc::from(format!(r#"{{"slug":{tag},"event":{}}}"#, t.as_str()));
                            hub.publish(&slug, &frame);
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => break e.to_string(),
                        None => break "the worker closed the stream".to_owned(),
                    }
                }
            }
            Err(e) => e.to_string(),
        };
        if !down_reported {
            let frame = json!({"slug": slug, "type": "worker_down", "error": error}).to_string();
            hub.publish(&slug, &Arc::from(frame));
            down_reported = true;
        }
        tokio::select! {
            () = tokio::time::sleep(RECONCILE_INTERVAL) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Keep one upstream per registered repository until `stop`.
async fn fan_in(directory: Arc<dyn RepoDirectory>, hub: Arc<Hub>, stop: CancellationToken) {
    let mut running: HashMap<String, (PathBuf, CancellationToken)> = HashMap::new();
    loop {
        let repos = directory.repos().await;
        running.retain(|slug, (socket, token)| {
            let keep = repos.iter().any(|r| &r.slug == slug && &r.socket == socket);
            if !keep {
                token.cancel();
            }
            keep
        });
        for r in repos {
            if let std::collections::hash_map::Entry::Vacant(slot) = running.entry(r.slug) {
                let token = stop.child_token();
                tokio::spawn(upstream(
                    Arc::clone(&hub),
                    slot.key().clone(),
                    r.socket.clone(),
                    token.clone(),
                ));
                slot.insert((r.socket, token));
            }
        }
        tokio::select! {
            () = tokio::time::sleep(RECONCILE_INTERVAL) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// The supervisor dashboard's router, its hub and the fan-in task, which
/// runs until `stop` is cancelled.
pub fn router(
    directory: Arc<dyn RepoDirectory>,
    guard: super::auth::Guard,
    stop: CancellationToken,
) -> (Router, Arc<Hub>, tokio::task::JoinHandle<()>) {
    let hub = Arc::new(Hub::default());
    let fan = tokio::spawn(fan_in(Arc::clone(&directory), Arc::clone(&hub), stop));
    let app = AppState {
        directory,
        hub: Arc::clone(&hub),
    };
    let router = Router::new()
        .route("/", get(page))
        .route("/api/repos", get(api_repos))
        .route("/repos/{slug}", get(repo_page_slash))
        .route("/repos/{slug}/", get(repo_page))
        .route("/repos/{slug}/{*rest}", any(proxy))
        .route("/ws", get(ws))
        .fallback(super::no_route)
        .with_state(app)
        .layer(axum::middleware::from_fn_with_state(
            guard,
            super::auth::guard,
        ));
    (router, hub, fan)
}

/// Serve the supervisor dashboard on an already-bound listener until
/// `shutdown` completes, letting in whom `guard` lets in. Bind it with
/// [`super::bind_tcp`], which refuses a non-loopback address without a token.
///
/// # Errors
/// I/O errors of the server.
pub async fn serve(
    listener: tokio::net::TcpListener,
    directory: Arc<dyn RepoDirectory>,
    guard: super::auth::Guard,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, directory, guard, None, shutdown).await
}

/// [`serve`], with the routes of `outside` served beside the dashboard's
/// and outside its access checks (the GitHub webhook route, which its
/// signature authenticates: [`super::webhook`]).
///
/// # Errors
/// I/O errors of the server.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    directory: Arc<dyn RepoDirectory>,
    guard: super::auth::Guard,
    outside: Option<super::webhook::Route>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stop = CancellationToken::new();
    let (app, _hub, fan) = router(directory, guard, stop.clone());
    let app = match outside {
        Some(route) => route.0.merge(app),
        None => app,
    };
    let listener = super::auth::NoDelay(listener);
    let app = app.into_make_service_with_connect_info::<super::auth::Peer>();
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await;
    stop.cancel();
    let _ = fan.await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_browser_drops_its_oldest_frames_and_counts_them() {
        let hub = Hub::default();
        let slow = hub.add(None);
        let beta_only = hub.add(Some("beta".into()));
        for n in 0..CLIENT_QUEUE + 10 {
            hub.publish("alpha", &Arc::from(format!("a{n}")));
        }
        hub.publish("beta", &Arc::from("b"));
        let frames = slow.frames.lock().unwrap();
        assert_eq!(frames.len(), CLIENT_QUEUE);
        assert_eq!(&*frames[0], "a11", "the oldest went first");
        assert_eq!(frames.back().map(|f| &**f), Some("b"));
        assert_eq!(slow.dropped.load(Ordering::Relaxed), 11);
        assert_eq!(hub.dropped(), 11);
        let only: Vec<String> = beta_only
            .frames
            .lock()
            .unwrap()
            .iter()
            .map(|f| f.to_string())
            .collect();
        assert_eq!(only, ["b"]);
        drop(frames);
        let late = hub.add(Some("beta".into()));
        assert_eq!(
            late.frames.lock().unwrap().len(),
            1,
            "seeded with recent beta frames"
        );
    }
}
