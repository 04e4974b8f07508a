//! GitHub webhooks through the supervisor (docs/design/forge.md, "Webhooks"):
//! `POST /github/webhook` on the supervisor's dashboard listener (or on
//! `webhook.listen`), authenticated by its signature alone, never by the
//! caller: a separate route outside the dashboard's access checks.
//!
//! A delivery (<https://docs.github.com/en/webhooks/webhook-events-and-payloads>)
//! is a JSON body with the headers `X-GitHub-Event` (its kind),
//! `X-GitHub-Delivery` (a GUID) and `X-Hub-Signature-256`
//! (`sha256=` and the hex HMAC-SHA256 of the body under the hook's secret,
//! <https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries>).
//! [`Receiver::receive`] refuses a delivery that is too large (over
//! [`MAX_BODY`], GitHub's own cap: 413), unsigned or wrongly signed (401,
//! `ring::hmac::verify` compares in constant time), without a delivery id or
//! event (400), not JSON (415/400), or already received in the last
//! [`REPLAY_WINDOW`] (409); it answers `ping` with 200, and every other
//! delivery with 202: the kinds that change what a worker would do
//! ([`EVENTS`]) for a registered repository (`repository.full_name`) wake
//! its worker; other kinds, and repositories not registered here, are only
//! logged (an error would make GitHub mark the hook as failing).
//!
//! Waking is [`Waker`]'s job: a set of repositories to wake (one entry per
//! repository however many deliveries name it, so a burst of deliveries
//! becomes one wake-up per worker) drained by one task that sends
//! `POST /api/wake` to each worker's API socket. The worker then polls the
//! forge at once (conditional requests: only what changed costs budget) and
//! slows its polling to `github.fallback_poll_interval` while deliveries
//! arrive.
//!
//! The delivery ids are remembered in memory: a supervisor restart forgets
//! them, and a delivery replayed after that only wakes a worker once more.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::ApiError;

/// The route.
pub const PATH: &str = "/github/webhook";

/// Name of the systemd credential holding the webhook secret.
pub const SECRET_CREDENTIAL: &str = "github-webhook-secret";

/// The largest body accepted: GitHub caps payloads at 25 MB and sends none larger.
pub const MAX_BODY: usize = 25 * 1024 * 1024;

/// How long a delivery id is remembered (a delivery replayed within it is refused).
pub const REPLAY_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// The most delivery ids remembered; the oldest go first beyond it.
pub const MAX_REMEMBERED: usize = 500_000;

/// The event kinds that wake a worker: what changes an issue's labels or
/// comments, a pull request, its reviews or its checks.
pub const EVENTS: [&str; 7] = [
    "issues",
    "issue_comment",
    "pull_request",
    "pull_request_review",
    "check_suite",
    "check_run",
    "label",
];

/// How long one wake-up may take before it is given up (the worker is down
/// or stuck; its own polling covers for it).
pub const WAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A registered instance a delivery is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Its slug.
    pub slug: String,
    /// Its worker's API socket.
    pub socket: PathBuf,
}

/// Where deliveries go: the registered instance of a GitHub repository.
pub trait Targets: Send + Sync + 'static {
    /// The instance registered for `full_name` (`owner/name`, compared
    /// without regard to case, as GitHub does), if any.
    fn target(&self, full_name: &str) -> Option<Target>;
}

/// One delivery as it arrived: its headers and body.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    /// `X-GitHub-Event`.
    pub event: Option<&'a str>,
    /// `X-GitHub-Delivery`.
    pub id: Option<&'a str>,
    /// `X-Hub-Signature-256`.
    pub signature: Option<&'a str>,
    /// `Content-Type`.
    pub content_type: Option<&'a str>,
    /// The body as sent.
    pub body: &'a [u8],
}

/// What became of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A `ping`: 200; the repository's instance, when the ping names a registered one.
    Pong {
        /// The repository the hook belongs to, when it says.
        repository: Option<String>,
        /// Its instance, when registered here.
        slug: Option<String>,
    },
    /// Its repository's worker will be woken: 202.
    Woken {
        /// The instance.
        slug: String,
    },
    /// Nothing to do (a kind not used, no repository, a repository not
    /// registered here): 202, and a log line.
    Ignored {
        /// Why.
        reason: String,
    },
    /// Refused: the status and why.
    Refused {
        /// 400, 401, 409, 413, 415 or 503.
        status: StatusCode,
        /// What is wrong and what to do.
        reason: String,
    },
}

impl IntoResponse for Outcome {
    fn into_response(self) -> Response {
        match self {
            Outcome::Pong { repository, slug } => (
                StatusCode::OK,
                Json(json!({"pong": true, "repository": repository, "slug": slug})),
            )
                .into_response(),
            Outcome::Woken { slug } => (
                StatusCode::ACCEPTED,
                Json(json!({"accepted": true, "slug": slug})),
            )
                .into_response(),
            Outcome::Ignored { reason } => (
                StatusCode::ACCEPTED,
                Json(json!({"accepted": true, "ignored": reason})),
            )
                .into_response(),
            Outcome::Refused { status, reason } => ApiError::new(status, reason).into_response(),
        }
    }
}

fn refused(status: StatusCode, reason: impl Into<String>) -> Outcome {
    Outcome::Refused {
        status,
        reason: reason.into(),
    }
}

/// The delivery ids seen in the last [`REPLAY_WINDOW`].
#[derive(Debug, Default)]
struct Seen {
    at: HashMap<String, Instant>,
    order: VecDeque<(Instant, String)>,
}

impl Seen {
    /// Record `id` at `now`; false when it was seen within the window.
    fn first_time(&mut self, id: &str, now: Instant) -> bool {
        while let Some((when, old)) = self.order.front() {
            if now.duration_since(*when) < REPLAY_WINDOW && self.order.len() < MAX_REMEMBERED {
                break;
            }
            if self.at.get(old) == Some(when) {
                self.at.remove(old);
            }
            self.order.pop_front();
        }
        if self.at.contains_key(id) {
            return false;
        }
        self.at.insert(id.to_owned(), now);
        self.order.push_back((now, id.to_owned()));
        true
    }
}

/// The parts of a delivery's body read here.
#[derive(Deserialize)]
struct Payload {
    repository: Option<Repository>,
    sender: Option<Sender>,
}

#[derive(Deserialize)]
struct Sender {
    login: String,
}

#[derive(Deserialize)]
struct Repository {
    full_name: String,
}

/// Judges deliveries and hands the ones to act on to the [`Waker`].
pub struct Receiver {
    /// The secret's HMAC-SHA256 key; `None`: webhooks are not configured.
    key: Option<ring::hmac::Key>,
    seen: Mutex<Seen>,
    targets: Arc<dyn Targets>,
    waker: Arc<Waker>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("configured", &self.key.is_some())
            .finish_non_exhaustive()
    }
}

/// `sha256=<hex>` as GitHub writes `X-Hub-Signature-256` for `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    format!(
        "sha256={}",
        hex::encode(ring::hmac::sign(&key, body).as_ref())
    )
}

impl Receiver {
    /// A receiver checking signatures with `secret` (none: every delivery
    /// is refused with 503), finding instances in `targets` and waking them
    /// with `waker`.
    pub fn new(secret: Option<&[u8]>, targets: Arc<dyn Targets>, waker: Arc<Waker>) -> Receiver {
        Receiver {
            key: secret.map(|s| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, s)),
            seen: Mutex::new(Seen::default()),
            targets,
            waker,
        }
    }

    /// Judge one delivery (see the module's documentation for the order
    /// of the checks) and, when it is for a registered repository, queue the
    /// wake-up of its worker.
    pub fn receive(&self, d: Delivery<'_>) -> Outcome {
        let Some(key) = &self.key else {
            return refused(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "webhooks are not set up here: give the supervisor the secret as the systemd \
                     credential {SECRET_CREDENTIAL:?} or webhook.secret_file"
                ),
            );
        };
        let Some(sig) = d.signature.map(str::trim).filter(|s| !s.is_empty()) else {
            return refused(
                StatusCode::UNAUTHORIZED,
                "the delivery is not signed (no X-Hub-Signature-256): set the webhook's secret on GitHub",
            );
        };
        let valid = sig
            .strip_prefix("sha256=")
            .and_then(|h| hex::decode(h).ok())
            .is_some_and(|mac| ring::hmac::verify(key, d.body, &mac).is_ok());
        if !valid {
            return refused(
                StatusCode::UNAUTHORIZED,
                "the signature (X-Hub-Signature-256) does not match the body: the webhook's secret \
                 on GitHub differs from the supervisor's",
            );
        }
        let Some(id) =
            d.id.map(str::trim)
                .filter(|i| !i.is_empty() && i.len() <= 100)
        else {
            return refused(
                StatusCode::BAD_REQUEST,
                "X-GitHub-Delivery is missing or longer than 100 characters",
            );
        };
        let Some(event) = d.event.map(str::trim).filter(|e| !e.is_empty()) else {
            return refused(StatusCode::BAD_REQUEST, "X-GitHub-Event is missing");
        };
        let json = d
            .content_type
            .and_then(|c| c.split(';').next())
            .is_some_and(|c| c.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return refused(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "the delivery's content type is {:?}: set the webhook's content type to application/json",
                    d.content_type.unwrap_or("none")
                ),
            );
        }
        if !self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .first_time(id, Instant::now())
        {
            return refused(
                StatusCode::CONFLICT,
                format!("delivery {id} was received already (a replay): nothing done"),
            );
        }
        let payload: Payload = match serde_json::from_slice(d.body) {
            Ok(p) => p,
            Err(e) => {
                return refused(
                    StatusCode::BAD_REQUEST,
                    format!("delivery {id}: the body is not a webhook payload: {e}"),
                );
            }
        };
        let repository = payload.repository.map(|r| r.full_name);
        let sender = payload.sender.map(|s| s.login);
        if event == "ping" {
            let slug = repository
                .as_deref()
                .and_then(|r| self.targets.target(r))
                .map(|t| t.slug);
            tracing::info!(delivery = id, repository, slug, "webhook ping");
            return Outcome::Pong { repository, slug };
        }
        if !EVENTS.contains(&event) {
            return Outcome::Ignored {
                reason: format!("{event} events are not used"),
            };
        }
        let Some(repository) = repository else {
            return Outcome::Ignored {
                reason: format!("the {event} delivery names no repository"),
            };
        };
        match self.targets.target(&repository) {
            Some(target) => {
                tracing::debug!(delivery = id, event, repository, slug = %target.slug, "webhook delivery");
                let slug = target.slug.clone();
                self.waker.wake(target, sender);
                Outcome::Woken { slug }
            }
            None => {
                tracing::info!(
                    delivery = id,
                    event,
                    repository,
                    "webhook delivery for a repository not registered here: ignored"
                );
                Outcome::Ignored {
                    reason: format!("{repository} is not registered here"),
                }
            }
        }
    }
}

/// Senders of the deliveries one wake-up stands for, at most this many
/// (more count as someone else's change: the worker polls).
pub const MAX_SENDERS: usize = 16;

/// One queued wake-up: the worker's socket and who sent the deliveries
/// (`None`: a delivery without a sender, or too many senders).
#[derive(Debug)]
struct Pending {
    socket: PathBuf,
    senders: Option<std::collections::BTreeSet<String>>,
}

/// Wakes workers: one pending wake-up per repository, sent by one task.
#[derive(Debug, Default)]
pub struct Waker {
    /// Repositories to wake, by slug (at most one entry each: deliveries coalesce).
    pending: Mutex<BTreeMap<String, Pending>>,
    ready: Notify,
    /// Wake-ups sent (answered or not).
    sent: AtomicU64,
    /// Wake-ups the worker did not answer with success.
    failed: AtomicU64,
}

impl Waker {
    /// Queue a wake-up of `target` for a delivery sent by `sender` (one
    /// wake-up per repository however many deliveries: the senders are
    /// gathered, so the worker can tell its own changes from others').
    pub fn wake(&self, target: Target, sender: Option<String>) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let entry = pending.entry(target.slug).or_insert_with(|| Pending {
            socket: target.socket,
            senders: Some(std::collections::BTreeSet::new()),
        });
        match (&mut entry.senders, sender) {
            (Some(senders), Some(sender))
                if senders.len() < MAX_SENDERS || senders.contains(&sender) =>
            {
                senders.insert(sender);
            }
            (senders, _) => *senders = None,
        }
        drop(pending);
        self.ready.notify_one();
    }

    /// Wake-ups sent so far, and how many of them failed.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    /// Send the queued wake-ups until `stop`: whatever is queued when a
    /// round starts goes out at once (in parallel); what arrives meanwhile
    /// waits for the next round.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = self.ready.notified() => {}
                () = stop.cancelled() => return,
            }
            loop {
                let batch =
                    std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
                if batch.is_empty() {
                    break;
                }
                let sends = batch
                    .into_iter()
                    .map(|(slug, pending)| self.send(slug, pending));
                futures_util::future::join_all(sends).await;
            }
        }
    }

    async fn send(&self, slug: String, pending: Pending) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        let body = json!({"senders": pending.senders});
        let answer = super::client::json(
            &pending.socket,
            http::Method::POST,
            "/api/wake",
            Some(&body),
            WAKE_TIMEOUT,
        )
        .await;
        match answer {
            Ok((status, _)) if status.is_success() => {}
            Ok((status, body)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(slug, %status, %body, "the worker refused the wake-up of a webhook delivery; its polling will catch up");
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(slug, error = %e, "cannot wake the worker for a webhook delivery; its polling will catch up");
            }
        }
    }
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn deliver(
    State(receiver): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return refused(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the delivery is larger than {MAX_BODY} bytes, GitHub's own limit"),
            )
            .into_response();
        }
        Err(e) => return refused(e.status(), e.body_text()).into_response(),
    };
    receiver
        .receive(Delivery {
            event: header(&headers, "x-github-event"),
            id: header(&headers, "x-github-delivery"),
            signature: header(&headers, "x-hub-signature-256"),
            content_type: header(&headers, "content-type"),
            body: &body,
        })
        .into_response()
}

/// The route alone (`POST /github/webhook`, bodies up to [`MAX_BODY`]), to
/// merge into a listener's router outside its access checks.
pub fn router(receiver: Arc<Receiver>) -> Router {
    Router::new()
        .route(PATH, post(deliver))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(receiver)
}

/// Serve only the webhook route on `listener` (`webhook.listen`) until
/// `shutdown` completes.
///
/// # Errors
/// I/O errors of the server.
pub async fn serve(
    listener: tokio::net::TcpListener,
    receiver: Arc<Receiver>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(receiver).fallback(super::no_route);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// The webhook secret: the systemd credential [`SECRET_CREDENTIAL`] when
/// present, else the file `secret_file` (`webhook.secret_file`; surrounding
/// whitespace trimmed); `None` when neither is set.
///
/// # Errors
/// The file's path and error when it is set but cannot be read or is empty.
pub fn secret(
    credential: Option<String>,
    secret_file: Option<&std::path::Path>,
) -> Result<Option<Vec<u8>>, String> {
    if let Some(secret) = credential.filter(|s| !s.trim().is_empty()) {
        return Ok(Some(secret.trim().as_bytes().to_vec()));
    }
    let Some(path) = secret_file else {
        return Ok(None);
    };
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => Ok(Some(text.trim().as_bytes().to_vec())),
        Ok(_) => Err(format!(
            "webhook.secret_file {} is empty: put the webhook's secret there",
            path.display()
        )),
        Err(e) => Err(format!(
            "cannot read webhook.secret_file {}: {e}",
            path.display()
        )),
    }
}

/// The webhook route, to serve beside a listener's own routes
/// ([`super::supervisor::serve_with`]).
#[derive(Debug)]
pub struct Route(pub(crate) Router);

/// The receiver as the supervisor runs it: its tasks, and its route when it
/// is to be served on the dashboard's listener.
#[derive(Debug)]
pub struct Service {
    /// `POST /github/webhook` for the dashboard's listener (none with `webhook.listen`).
    pub route: Option<Route>,
    /// The waker, and the listener of `webhook.listen`: they end with `stop`.
    pub tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Start the receiver of the supervisor: the secret from the systemd
/// credential [`SECRET_CREDENTIAL`] or `webhook.secret_file` (none: every
/// delivery is refused with 503, and the log says so), the waker task, and
/// the route, served on `webhook.listen` when set or else returned for the
/// dashboard's listener. Everything stops with `stop`.
pub async fn start(
    config: &crate::config::WebhookConfig,
    targets: Arc<dyn Targets>,
    stop: &CancellationToken,
) -> Service {
    let secret = match secret(
        crate::systemd::read_credential(SECRET_CREDENTIAL),
        config.secret_file.as_deref(),
    ) {
        Ok(Some(secret)) => Some(secret),
        Ok(None) => {
            tracing::info!(
                "GitHub webhooks are off (no secret): deliveries are refused with 503; workers poll"
            );
            None
        }
        Err(e) => {
            tracing::error!("GitHub webhooks are off: {e}");
            None
        }
    };
    let waker = Arc::new(Waker::default());
    let receiver = Arc::new(Receiver::new(
        secret.as_deref(),
        targets,
        Arc::clone(&waker),
    ));
    let mut tasks = vec![tokio::spawn(waker.run(stop.child_token()))];
    let Some(listen) = &config.listen else {
        return Service {
            route: Some(Route(router(receiver))),
            tasks,
        };
    };
    match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => {
            let address = listener
                .local_addr()
                .map_or_else(|_| listen.clone(), |a| a.to_string());
            tracing::info!(address, "GitHub webhooks listening");
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let shutdown = async move { stop.cancelled().await };
                if let Err(e) = serve(listener, receiver, shutdown).await {
                    tracing::error!("the webhook listener stopped: {e}");
                }
            }));
        }
        Err(e) => tracing::error!(
            "GitHub webhooks are not served: cannot listen on webhook.listen {listen}: {e}"
        ),
    }
    Service { route: None, tasks }
}

/// Send a signed `ping` delivery (as GitHub sends one when a hook is made,
/// naming `repository` when given) to `url` (`http://HOST:PORT/PATH`);
/// the status and JSON answer. For `hydraflow webhook test`.
///
/// # Errors
/// A URL that is not `http://`, or why the endpoint could not be reached.
pub async fn send_test_ping(
    url: &str,
    secret: &[u8],
    repository: Option<&str>,
) -> Result<(StatusCode, Value, String), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let (Some("http"), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(format!(
            "{url:?}: use the local endpoint, http://HOST:PORT{PATH} (TLS belongs to the reverse proxy)"
        ));
    };
    let mut body = json!({
        "zen": "Design for failure.",
        "hook_id": 0,
        "hook": {"type": "Repository", "events": EVENTS, "active": true},
    });
    if let Some(repo) = repository {
        body["repository"] = json!({"full_name": repo});
    }
    let body = body.to_string();
    let delivery = format!("hydraflow-test-{:016x}", fastrand::u64(..));
    let request = http::Request::post(uri.path_and_query().map_or(PATH, |p| p.as_str()))
        .header(http::header::HOST, authority.as_str())
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(
            http::header::USER_AGENT,
            "GitHub-Hookshot/hydraflow-webhook-test",
        )
        .header("x-github-event", "ping")
        .header("x-github-delivery", &delivery)
        .header("x-hub-signature-256", signature(secret, body.as_bytes()))
        .body(axum::body::Body::from(body))
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let port = authority.port_u16().unwrap_or(80);
    let address = format!("{}:{port}", authority.host());
    let (status, answer) = super::client::tcp_json(&address, request, WAKE_TIMEOUT)
        .await
        .map_err(|e| format!("cannot send the ping to {url}: {e}: is the supervisor running?"))?;
    Ok((status, answer, delivery))
}

/// The answer to a delivery as JSON, for `hydraflow webhook test`.
pub fn describe(status: StatusCode, body: &Value) -> String {
    let detail = body
        .get("error")
        .or_else(|| body.get("ignored"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| body.to_string());
    format!("{} {detail}", status.as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"It's a Secret to Everybody";

    #[test]
    fn signature_matches_githubs_documented_example() {
        // docs.github.com, "Validating webhook deliveries", "Testing the webhook payload validation".
        assert_eq!(
            signature(SECRET, b"Hello, World!"),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }

    struct One;

    impl Targets for One {
        fn target(&self, full_name: &str) -> Option<Target> {
            full_name
                .eq_ignore_ascii_case("octo-org/demo")
                .then(|| Target {
                    slug: "octo-org-demo".into(),
                    socket: PathBuf::from("/nonexistent/dashboard.sock"),
                })
        }
    }

    fn receiver() -> (Receiver, Arc<Waker>) {
        let waker = Arc::new(Waker::default());
        (
            Receiver::new(Some(SECRET), Arc::new(One), Arc::clone(&waker)),
            waker,
        )
    }

    /// Deliver `body` as `event` with id `id`, signed with `secret` (`None`: unsigned).
    fn check(
        r: &Receiver,
        event: &str,
        id: &str,
        body: &str,
        secret: Option<&[u8]>,
        expected: Result<&str, u16>,
    ) {
        let sig = secret.map(|s| signature(s, body.as_bytes()));
        let got = r.receive(Delivery {
            event: Some(event),
            id: Some(id),
            signature: sig.as_deref(),
            content_type: Some("application/json"),
            body: body.as_bytes(),
        });
        let summary = match &got {
            Outcome::Pong { slug, .. } => Ok(format!("pong {}", slug.as_deref().unwrap_or("-"))),
            Outcome::Woken { slug } => Ok(format!("woken {slug}")),
            Outcome::Ignored { reason } => Ok(format!("ignored: {reason}")),
            Outcome::Refused { status, .. } => Err(status.as_u16()),
        };
        assert_eq!(
            summary.as_deref().map_err(|s| *s),
            expected,
            "{event} {id}: {got:?}"
        );
    }

    const DEMO: &str = r#"{"action":"opened","repository":{"full_name":"Octo-Org/demo"}}"#;

    #[test]
    fn deliveries_are_judged() {
        let (r, waker) = receiver();
        check(
            &r,
            "issues",
            "1",
            DEMO,
            Some(SECRET),
            Ok("woken octo-org-demo"),
        );
        check(&r, "issues", "1", DEMO, Some(SECRET), Err(409));
        check(&r, "issues", "2", DEMO, None, Err(401));
        check(&r, "issues", "3", DEMO, Some(b"another secret"), Err(401));
        // A refused delivery is not remembered: its redelivery, signed, is taken.
        check(
            &r,
            "issues",
            "2",
            DEMO,
            Some(SECRET),
            Ok("woken octo-org-demo"),
        );
        check(
            &r,
            "push",
            "4",
            DEMO,
            Some(SECRET),
            Ok("ignored: push events are not used"),
        );
        check(
            &r,
            "issues",
            "5",
            r#"{"repository":{"full_name":"someone/else"}}"#,
            Some(SECRET),
            Ok("ignored: someone/else is not registered here"),
        );
        check(
            &r,
            "label",
            "6",
            "{}",
            Some(SECRET),
            Ok("ignored: the label delivery names no repository"),
        );
        check(
            &r,
            "ping",
            "7",
            DEMO,
            Some(SECRET),
            Ok("pong octo-org-demo"),
        );
        check(
            &r,
            "ping",
            "8",
            r#"{"zen":"Keep it logically awesome."}"#,
            Some(SECRET),
            Ok("pong -"),
        );
        check(&r, "issues", "9", "not json", Some(SECRET), Err(400));
        for (n, event) in EVENTS.iter().enumerate() {
            check(
                &r,
                event,
                &format!("e{n}"),
                DEMO,
                Some(SECRET),
                Ok("woken octo-org-demo"),
            );
        }
        // Nine deliveries for one repository, one pending wake-up.
        assert_eq!(waker.pending.lock().unwrap().len(), 1);
        let unsigned_form = r.receive(Delivery {
            event: Some("issues"),
            id: Some("10"),
            signature: Some(&signature(SECRET, b"payload=%7B%7D")),
            content_type: Some("application/x-www-form-urlencoded"),
            body: b"payload=%7B%7D",
        });
        assert!(
            matches!(unsigned_form, Outcome::Refused { status, .. } if status == StatusCode::UNSUPPORTED_MEDIA_TYPE)
        );
        let no_id = r.receive(Delivery {
            event: Some("issues"),
            id: None,
            signature: Some(&signature(SECRET, DEMO.as_bytes())),
            content_type: Some("application/json"),
            body: DEMO.as_bytes(),
        });
        assert!(
            matches!(no_id, Outcome::Refused { status, .. } if status == StatusCode::BAD_REQUEST)
        );
    }

    #[test]
    fn a_wake_up_gathers_its_deliveries_senders() {
        let waker = Waker::default();
        let target = || Target {
            slug: "s".into(),
            socket: PathBuf::from("/x"),
        };
        let senders = |w: &Waker| w.pending.lock().unwrap()["s"].senders.clone();
        waker.wake(target(), Some("bot".into()));
        waker.wake(target(), Some("bot".into()));
        assert_eq!(senders(&waker), Some(["bot".to_owned()].into()));
        waker.wake(target(), Some("alice".into()));
        assert_eq!(senders(&waker).map(|s| s.len()), Some(2));
        // A delivery without a sender: the worker cannot tell whose change it is.
        waker.wake(target(), None);
        assert_eq!(senders(&waker), None);
        waker.wake(target(), Some("bot".into()));
        assert_eq!(senders(&waker), None, "unknown stays unknown");
        let many = Waker::default();
        for n in 0..=MAX_SENDERS {
            many.wake(target(), Some(format!("user{n}")));
        }
        assert_eq!(senders(&many), None, "too many senders count as unknown");
    }

    #[test]
    fn without_a_secret_every_delivery_is_refused() {
        let r = Receiver::new(None, Arc::new(One), Arc::new(Waker::default()));
        check(&r, "issues", "1", DEMO, Some(SECRET), Err(503));
    }

    #[test]
    fn delivery_ids_are_forgotten_after_the_window() {
        let mut seen = Seen::default();
        let start = Instant::now();
        assert!(seen.first_time("a", start));
        assert!(!seen.first_time("a", start + Duration::from_secs(3600)));
        assert!(seen.first_time("b", start + Duration::from_secs(3600)));
        let later = start + REPLAY_WINDOW + Duration::from_secs(1);
        assert!(seen.first_time("a", later), "a day later it is new again");
        assert!(!seen.first_time("b", later), "b is not a day old yet");
        assert_eq!(seen.order.len(), 2);
    }
}
