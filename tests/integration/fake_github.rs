//! A stateful fake of the GitHub REST API endpoints the GitHub forge uses,
//! served with axum on 127.0.0.1:0, plus git's smart HTTP protocol (through
//! `git http-backend` as a CGI) over a local bare repository whose merge
//! endpoint really squash-merges with git2.
//!
//! It keeps a per-endpoint request counter, ETags with 304 answers that cost
//! no budget, `x-ratelimit-*` headers, `Link` pagination, and injectable
//! faults. Every JSON body it emits is recorded so tests can check it against
//! the recorded real responses (`check_shapes`).
//!
//! GitHub App authentication ([`FakeGithub::enable_app`]): `GET
//! /repos/{owner}/{repo}/installation` and `POST
//! /app/installations/{id}/access_tokens` take the App's JWT, verified as
//! GitHub does (RS256 with the App's public key, `iss` the App's id, `exp`
//! in the future and at most ten minutes after `iat`, answered 401 "A JSON
//! web token could not be decoded" otherwise); the installation tokens they
//! mint (`ghs_…`, with `expires_at`) are accepted by the API and by git
//! until they expire or are revoked (`DELETE /installation/token`, or the
//! test's [`FakeGithub::expire_tokens`]); the key can be revoked
//! ([`FakeGithub::revoke_app_key`]). What an installation token posts is
//! authored by the App's bot user ([`APP_BOT`]).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Path as UrlPath, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post, put};
use base64::Engine;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

/// Owner of the fake repository.
pub const OWNER: &str = "octo-org";
/// Name of the fake repository.
pub const REPO: &str = "demo";
/// The only token the fake accepts.
pub const TOKEN: &str = "ghp_fakeTokenThatMustNeverLeak0123";
/// The rate-limit window size.
pub const LIMIT: u64 = 5000;
/// The rate-limit reset time the fake announces (Unix seconds).
pub const RESET: u64 = 4_102_444_800;
/// The fake GitHub App's id.
pub const APP_ID: u64 = 424_242;
/// Its installation on the fake repository's owner.
pub const INSTALLATION_ID: u64 = 7_777_777;
/// Its slug; its bot user is `<slug>[bot]`.
pub const APP_SLUG: &str = "hydraflow-test-app";
/// The login of the App's bot user: the author of what it posts.
pub const APP_BOT: &str = "hydraflow-test-app[bot]";
/// The author of what the token ([`TOKEN`]) posts.
pub const TOKEN_USER: &str = "hydraflow-bot";
/// The App's private key (a test key made for this suite, used nowhere else).
pub const APP_KEY_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/github-app/app-key.pem"
);
/// Its public key, as GitHub keeps it.
const APP_PUBLIC_KEY_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/github-app/app-key.pub.pem"
);
/// Another RSA key: a JWT it signs is refused.
pub const OTHER_KEY_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/github-app/other-key.pem"
);

/// A fault the next matching request gets instead of its answer.
#[derive(Debug, Clone)]
pub enum Fault {
    /// 403 "You have exceeded a secondary rate limit" with `Retry-After`.
    SecondaryLimit {
        /// Seconds.
        retry_after: u64,
    },
    /// 500 with GitHub's "Server Error" body.
    ServerError,
    /// 200 with a body that is not JSON.
    Malformed,
    /// 401 "Bad credentials".
    BadCredentials,
}

/// An issue held by the fake.
#[derive(Debug, Clone)]
pub struct FakeIssue {
    /// Title.
    pub title: String,
    /// Body.
    pub body: String,
    /// Label names.
    pub labels: Vec<String>,
    /// Author login.
    pub author: String,
    /// `open` or `closed`.
    pub state: String,
    /// Comments: (author, body).
    pub comments: Vec<(String, String)>,
}

/// A pull request held by the fake.
#[derive(Debug, Clone)]
pub struct FakePull {
    /// Title.
    pub title: String,
    /// Body.
    pub body: String,
    /// Head branch.
    pub head: String,
    /// Last known head SHA.
    pub head_sha: String,
    /// Base branch.
    pub base: String,
    /// `open` or `closed`.
    pub state: String,
    /// Merged.
    pub merged: bool,
    /// GETs left that answer `mergeable: null`.
    pub unknown_left: u32,
}

/// One API request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Logged {
    /// `GET`, `POST`, ...
    pub method: String,
    /// Path and query as sent (`/api/v3/repos/octo-org/demo/issues?state=open&...`).
    pub path: String,
    /// The status answered (304 included).
    pub status: u16,
    /// The JSON request body, if any.
    pub body: Option<Value>,
}

impl Logged {
    /// Whether the request cost budget (everything but a 304).
    pub fn budgeted(&self) -> bool {
        self.status != 304
    }
}

/// An installation token the fake minted.
#[derive(Debug, Clone)]
pub struct MintedToken {
    /// The token.
    pub token: String,
    /// When it stops being accepted.
    pub expires_at: std::time::SystemTime,
    /// Revoked (`DELETE /installation/token`).
    pub revoked: bool,
}

/// The fake's GitHub App.
#[derive(Debug, Clone)]
pub struct FakeApp {
    /// Its public key (PEM): JWTs are verified with it.
    pub public_key: String,
    /// The key was deleted from the App: every JWT is refused.
    pub key_revoked: bool,
    /// Installed on the fake repository (else 404 for its installation).
    pub installed: bool,
    /// How long a minted token lasts.
    pub token_ttl: std::time::Duration,
    /// Every token minted, oldest first.
    pub tokens: Vec<MintedToken>,
}

impl FakeApp {
    /// Whether `token` is one of its tokens and still accepted.
    pub fn accepts(&self, token: &str) -> bool {
        self.tokens
            .iter()
            .any(|t| t.token == token && !t.revoked && std::time::SystemTime::now() < t.expires_at)
    }
}

/// The fake's whole state.
#[derive(Debug, Default)]
pub struct FakeState {
    /// The GitHub App, once [`FakeGithub::enable_app`] made one.
    pub app: Option<FakeApp>,
    /// Where changes are reported as webhook deliveries, if anywhere.
    pub hook: Option<Hook>,
    /// Deliveries sent.
    pub deliveries: u64,
    /// The kind of credential of every git request that was let in, in
    /// arrival order: `token` or `installation`.
    pub git_credentials: Vec<&'static str>,
    /// Issues by number.
    pub issues: BTreeMap<u64, FakeIssue>,
    /// Pull requests by number (sharing the numbering with issues).
    pub pulls: BTreeMap<u64, FakePull>,
    /// Repository labels: (name, color, description).
    pub labels: Vec<(String, String, String)>,
    /// Collaborator logins.
    pub collaborators: HashSet<String>,
    /// Check runs per SHA: (name, status, conclusion).
    pub check_runs: HashMap<String, Vec<(String, String, Option<String>)>>,
    /// Commit statuses per SHA: (context, state).
    pub statuses: HashMap<String, Vec<(String, String)>>,
    /// Reviews posted: (pull number, event, body).
    pub reviews: Vec<(u64, String, String)>,
    /// Faults to inject: (route key such as `GET /repos/{owner}/{repo}/issues`, fault).
    pub faults: VecDeque<(String, Fault)>,
    /// Requests per route key (`METHOD template`), 304s included.
    pub counts: HashMap<String, u64>,
    /// Requests answered 304.
    pub not_modified: u64,
    /// Every API request in arrival order, with its final status.
    pub log: Vec<Logged>,
    /// Budget left in the window.
    pub remaining: u64,
    /// Every JSON body emitted: (route key, status, body).
    pub emitted: Vec<(String, u16, Value)>,
    /// Largest page size served (to force pagination).
    pub max_per_page: usize,
    /// `mergeable: null` answers a new pull request gets before the real value.
    pub unknown_polls: u32,
    /// Until then every API and git request is answered 502 (an outage).
    pub outage_until: Option<std::time::Instant>,
    /// Base URL of the API (`http://127.0.0.1:PORT/api/v3`).
    pub api: String,
    /// The bare repository.
    pub bare: PathBuf,
    next_number: u64,
}

type Shared = Arc<Mutex<FakeState>>;

/// A running fake; stops when dropped.
pub struct FakeGithub {
    /// Address it listens on.
    pub addr: SocketAddr,
    state: Shared,
    /// The bare repository (`<root>/octo-org/demo.git`).
    pub bare: PathBuf,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl FakeGithub {
    /// Start a fake with an empty bare repository whose `main` has one commit.
    pub async fn start() -> FakeGithub {
        let dir = tempfile::tempdir().expect("tempdir");
        let bare = dir
            .path()
            .join("git")
            .join(OWNER)
            .join(format!("{REPO}.git"));
        std::fs::create_dir_all(&bare).expect("mkdir bare");
        let repo = git2::Repository::init_bare(&bare).expect("init bare");
        repo.set_head("refs/heads/main").expect("head");
        {
            let sig = git2::Signature::now("fake", "fake@example.com").expect("sig");
            let blob = repo.blob(b"hello\n").expect("blob");
            let mut tb = repo.treebuilder(None).expect("tb");
            tb.insert("README", blob, 0o100644).expect("insert");
            let tree = repo.find_tree(tb.write().expect("tree")).expect("tree");
            repo.commit(Some("refs/heads/main"), &sig, &sig, "initial", &tree, &[])
                .expect("commit");
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state: Shared = Arc::new(Mutex::new(FakeState {
            remaining: LIMIT,
            max_per_page: 100,
            unknown_polls: 1,
            api: format!("http://{addr}/api/v3"),
            bare: bare.clone(),
            next_number: 1,
            ..FakeState::default()
        }));
        let r = "/api/v3/repos/{owner}/{repo}";
        let api = Router::new()
            .route(&format!("{r}/issues"), get(list_issues))
            .route(
                &format!("{r}/issues/{{number}}"),
                get(get_issue).patch(patch_issue),
            )
            .route(
                &format!("{r}/issues/{{number}}/comments"),
                get(list_comments).post(post_comment),
            )
            .route(&format!("{r}/issues/{{number}}/labels"), post(add_labels))
            .route(
                &format!("{r}/issues/{{number}}/labels/{{name}}"),
                delete(remove_label),
            )
            .route(&format!("{r}/labels"), get(list_labels).post(create_label))
            .route(&format!("{r}/collaborators/{{user}}"), get(collaborator))
            .route(&format!("{r}/pulls"), get(list_pulls).post(create_pull))
            .route(&format!("{r}/pulls/{{number}}"), get(get_pull))
            .route(&format!("{r}/pulls/{{number}}/merge"), put(merge_pull))
            .route(
                &format!("{r}/pulls/{{number}}/reviews"),
                get(list_reviews).post(post_review),
            )
            .route(&format!("{r}/commits/{{sha}}/check-runs"), get(check_runs))
            .route(&format!("{r}/commits/{{sha}}/status"), get(combined_status))
            .route(
                &format!("{r}/git/refs/heads/{{*branch}}"),
                delete(delete_ref),
            )
            .route(&format!("{r}/installation"), get(get_installation))
            .route(
                "/api/v3/app/installations/{installation_id}/access_tokens",
                post(mint_token),
            )
            .route("/api/v3/installation/token", delete(revoke_token))
            .route("/api/v3/user", get(authenticated_user))
            .layer(middleware::from_fn_with_state(state.clone(), api_layer));
        let app = Router::new()
            .route("/git/{*path}", any(git_http))
            .merge(api)
            .with_state(state.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
                .expect("serve");
        });
        FakeGithub {
            addr,
            state,
            bare,
            _dir: dir,
            _stop: tx,
        }
    }

    /// `http://ADDR/api/v3` (the GitHub Enterprise Server layout).
    pub fn api_url(&self) -> String {
        format!("http://{}/api/v3", self.addr)
    }

    /// `http://ADDR/git`; clone URLs are `<web_url>/<owner>/<repo>.git`.
    pub fn web_url(&self) -> String {
        format!("http://{}/git", self.addr)
    }

    /// Lock the state to arrange or inspect it.
    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().expect("fake state lock")
    }

    /// File an issue; returns its number.
    pub fn add_issue(&self, title: &str, author: &str, labels: &[&str]) -> u64 {
        let mut s = self.state();
        let n = s.next_number;
        s.next_number += 1;
        s.issues.insert(
            n,
            FakeIssue {
                title: title.into(),
                body: format!("body of {title}"),
                labels: labels.iter().map(|l| l.to_string()).collect(),
                author: author.into(),
                state: "open".into(),
                comments: Vec::new(),
            },
        );
        n
    }

    /// Answer every request with 502 Bad Gateway for `length`, as GitHub's
    /// front end does while the service behind it is down.
    pub fn outage(&self, length: std::time::Duration) {
        self.state().outage_until = Some(std::time::Instant::now() + length);
    }

    /// Queue a fault for the next request to `route` (`METHOD template`).
    pub fn fault(&self, route: &str, fault: Fault) {
        self.state().faults.push_back((route.to_string(), fault));
    }

    /// Requests seen for `route`.
    pub fn count(&self, route: &str) -> u64 {
        self.state().counts.get(route).copied().unwrap_or(0)
    }

    /// Make the GitHub App ([`APP_ID`], key [`APP_KEY_FILE`]), installed on
    /// the repository as [`INSTALLATION_ID`], its tokens lasting an hour.
    pub fn enable_app(&self) {
        let public_key = std::fs::read_to_string(APP_PUBLIC_KEY_FILE).expect("app public key");
        self.state().app = Some(FakeApp {
            public_key,
            key_revoked: false,
            installed: true,
            token_ttl: std::time::Duration::from_secs(3600),
            tokens: Vec::new(),
        });
    }

    /// Change the App.
    fn with_app(&self, change: impl FnOnce(&mut FakeApp)) {
        change(self.state().app.as_mut().expect("enable_app first"));
    }

    /// Tokens minted from now on last `ttl` (and say so in `expires_at`).
    pub fn set_token_ttl(&self, ttl: std::time::Duration) {
        self.with_app(|app| app.token_ttl = ttl);
    }

    /// Every token minted so far expires now, whatever its `expires_at` said.
    pub fn expire_tokens(&self) {
        let now = std::time::SystemTime::now();
        self.with_app(|app| {
            for t in &mut app.tokens {
                t.expires_at = t.expires_at.min(now);
            }
        });
    }

    /// Delete the App's key: every JWT is refused from now on.
    pub fn revoke_app_key(&self) {
        self.with_app(|app| app.key_revoked = true);
    }

    /// Uninstall the App from the repository.
    pub fn uninstall_app(&self) {
        self.with_app(|app| app.installed = false);
    }

    /// The tokens minted so far.
    pub fn minted(&self) -> Vec<MintedToken> {
        self.state()
            .app
            .as_ref()
            .map(|a| a.tokens.clone())
            .unwrap_or_default()
    }
}

/// Where the fake sends webhook deliveries: the endpoint and the secret.
#[derive(Debug, Clone)]
pub struct Hook {
    /// `HOST:PORT` of the supervisor's listener.
    pub addr: SocketAddr,
    /// The hook's secret.
    pub secret: String,
}

/// The webhook event GitHub sends after a change through `route`, if any.
fn hook_event(route: &str) -> Option<&'static str> {
    let rest = route.split_once("{repo}").map(|(_, r)| r)?;
    Some(match (route.split(' ').next()?, rest) {
        (_, "/issues/{number}/labels" | "/issues/{number}/labels/{name}" | "/issues/{number}") => {
            "issues"
        }
        ("POST", "/issues/{number}/comments") => "issue_comment",
        ("POST", "/pulls") | ("PUT", "/pulls/{number}/merge") => "pull_request",
        ("POST", "/pulls/{number}/reviews") => "pull_request_review",
        ("POST", "/labels") => "label",
        _ => return None,
    })
}

/// Send one signed delivery of `event` by `sender` to `hook`, as GitHub does
/// after a change (the answer is not waited for by the change).
pub async fn send_delivery(hook: Hook, event: &'static str, id: String, sender: &str) {
    let body = json!({
        "action": "edited",
        "repository": {"id": 1, "name": REPO, "full_name": format!("{OWNER}/{REPO}")},
        "sender": {"login": sender, "id": 1, "type": "User"},
    })
    .to_string();
    let signature =
        hydraflow::dashboard::webhook::signature(hook.secret.as_bytes(), body.as_bytes());
    let Ok(stream) = tokio::net::TcpStream::connect(hook.addr).await else {
        return;
    };
    let Ok((mut tx, conn)) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await
    else {
        return;
    };
    tokio::spawn(conn);
    let request = axum::http::Request::post("/github/webhook")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .header("x-github-event", event)
        .header("x-github-delivery", id)
        .header("x-hub-signature-256", signature)
        .body(Body::from(body))
        .expect("delivery");
    let _ = tx.send_request(request).await;
}

/// Who a request authenticated as: the login that authors what it posts.
#[derive(Debug, Clone, Copy)]
pub struct Actor(pub &'static str);

/// The login a request's `Authorization` header stands for: [`TOKEN_USER`]
/// for [`TOKEN`], [`APP_BOT`] for an installation token still accepted.
fn actor_of(s: &FakeState, authorization: Option<&str>) -> Option<Actor> {
    let token = authorization?
        .strip_prefix("Bearer ")
        .or_else(|| authorization?.strip_prefix("token "))?;
    if token == TOKEN {
        return Some(Actor(TOKEN_USER));
    }
    s.app
        .as_ref()
        .filter(|app| app.accepts(token))
        .map(|_| Actor(APP_BOT))
}

/// The routes authenticated with the App's JWT instead of a token.
fn is_jwt_route(route: &str) -> bool {
    route.contains(" /api/v3/app/") || route.ends_with("/{repo}/installation")
}

/// Claims of the App's JWT as GitHub reads them.
#[derive(Debug, serde::Deserialize)]
struct AppClaims {
    iss: Value,
    iat: i64,
    exp: i64,
}

/// Check the App's JWT in `headers` as GitHub does; else the status and message GitHub answers.
fn verify_jwt(s: &FakeState, headers: &HeaderMap) -> Result<(), (StatusCode, &'static str)> {
    let undecodable = || {
        (
            StatusCode::UNAUTHORIZED,
            "A JSON web token could not be decoded",
        )
    };
    let Some(app) = s.app.as_ref() else {
        return Err((StatusCode::NOT_FOUND, "Not Found"));
    };
    let jwt = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(undecodable)?;
    let key =
        jsonwebtoken::DecodingKey::from_rsa_pem(app.public_key.as_bytes()).expect("public key");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    // GitHub's own checks of the claims follow, with its messages (`iss`
    // is the App's id, a number: jsonwebtoken's own check takes strings).
    validation.validate_exp = false;
    validation.required_spec_claims = ["exp", "iat"].iter().map(|c| c.to_string()).collect();
    let claims = jsonwebtoken::decode::<AppClaims>(jwt, &key, &validation)
        .map_err(|_| undecodable())?
        .claims;
    if app.key_revoked {
        return Err(undecodable());
    }
    let iss = claims
        .iss
        .as_u64()
        .or_else(|| claims.iss.as_str().and_then(|s| s.parse().ok()));
    if iss != Some(APP_ID) {
        return Err(undecodable());
    }
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs(),
    )
    .expect("seconds");
    if claims.iat > now + 60 {
        return Err((
            StatusCode::UNAUTHORIZED,
            "'Issued at' claim ('iat') must be an Integer representing the time that the assertion was issued",
        ));
    }
    if claims.exp <= now {
        return Err((
            StatusCode::UNAUTHORIZED,
            "'Expiration time' claim ('exp') must be a numeric value representing the future time at which the assertion expires",
        ));
    }
    if claims.exp - claims.iat > 600 + 60 {
        return Err((
            StatusCode::UNAUTHORIZED,
            "'Expiration time' claim ('exp') is too far in the future",
        ));
    }
    Ok(())
}

/// `GET /repos/{owner}/{repo}/installation` ("Get a repository installation
/// for the authenticated app"), with the App's JWT.
async fn get_installation(State(st): State<Shared>, headers: HeaderMap) -> Response {
    let s = lock(&st);
    if let Err((status, message)) = verify_jwt(&s, &headers) {
        return error(status, message);
    }
    if !s.app.as_ref().is_some_and(|a| a.installed) {
        return error(StatusCode::NOT_FOUND, "Not Found");
    }
    axum::Json(json!({
        "id": INSTALLATION_ID,
        "account": user_json(OWNER),
        "repository_selection": "all",
        "access_tokens_url": format!("{}/app/installations/{INSTALLATION_ID}/access_tokens", s.api),
        "repositories_url": format!("{}/installation/repositories", s.api),
        "html_url": format!("https://github.com/organizations/{OWNER}/settings/installations/{INSTALLATION_ID}"),
        "app_id": APP_ID,
        "app_slug": APP_SLUG,
        "target_id": 1000,
        "target_type": "Organization",
        "permissions": { "issues": "write", "contents": "write", "pull_requests": "write", "checks": "read", "metadata": "read" },
        "events": ["issues", "issue_comment", "pull_request", "pull_request_review", "check_suite", "check_run", "label"],
        "created_at": "2024-01-01T00:00:00Z",
        "updated_at": "2024-01-01T00:00:00Z",
        "single_file_name": Value::Null,
        "suspended_at": Value::Null,
        "suspended_by": Value::Null,
    }))
    .into_response()
}

/// `POST /app/installations/{installation_id}/access_tokens` ("Create an
/// installation access token for an app"), with the App's JWT: 201 with
/// the token and its `expires_at`.
async fn mint_token(
    State(st): State<Shared>,
    UrlPath(installation): UrlPath<u64>,
    headers: HeaderMap,
) -> Response {
    let mut s = lock(&st);
    if let Err((status, message)) = verify_jwt(&s, &headers) {
        return error(status, message);
    }
    let Some(app) = s
        .app
        .as_mut()
        .filter(|a| a.installed && installation == INSTALLATION_ID)
    else {
        return error(StatusCode::NOT_FOUND, "Not Found");
    };
    let token = format!(
        "ghs_{}",
        std::iter::repeat_with(fastrand::alphanumeric)
            .take(36)
            .collect::<String>()
    );
    let expires_at = std::time::SystemTime::now() + app.token_ttl;
    app.tokens.push(MintedToken {
        token: token.clone(),
        expires_at,
        revoked: false,
    });
    let expires = chrono::DateTime::<chrono::Utc>::from(expires_at)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    (
        StatusCode::CREATED,
        axum::Json(json!({
            "token": token,
            "expires_at": expires,
            "permissions": { "issues": "write", "contents": "write", "pull_requests": "write", "checks": "read", "metadata": "read" },
            "repository_selection": "all",
        })),
    )
        .into_response()
}

/// `GET /user` ("Get the authenticated user"): the token's user (an
/// installation token gets 403, as GitHub answers it).
async fn authenticated_user(axum::Extension(Actor(actor)): axum::Extension<Actor>) -> Response {
    if actor == APP_BOT {
        return error(
            StatusCode::FORBIDDEN,
            "Resource not accessible by integration",
        );
    }
    axum::Json(user_json(actor)).into_response()
}

/// `DELETE /installation/token` ("Revoke an installation access token"),
/// with the token itself: 204.
async fn revoke_token(State(st): State<Shared>, headers: HeaderMap) -> Response {
    let mut s = lock(&st);
    let presented = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string();
    if let Some(t) = s
        .app
        .as_mut()
        .and_then(|a| a.tokens.iter_mut().find(|t| t.token == presented))
    {
        t.revoked = true;
    }
    StatusCode::NO_CONTENT.into_response()
}

/// Route key of an API template, e.g. `key("GET", "/issues")`.
pub fn key(method: &str, rest: &str) -> String {
    format!("{method} /api/v3/repos/{{owner}}/{{repo}}{rest}")
}

fn lock(s: &Shared) -> MutexGuard<'_, FakeState> {
    s.lock().expect("fake state lock")
}

fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(json!({
            "message": message,
            "documentation_url": "https://docs.github.com/rest",
        })),
    )
        .into_response()
}

fn set_rate_headers(headers: &mut HeaderMap, remaining: u64) {
    let mut put = |k: &'static str, v: String| {
        headers.insert(k, HeaderValue::from_str(&v).expect("header"));
    };
    put("x-ratelimit-limit", LIMIT.to_string());
    put("x-ratelimit-remaining", remaining.to_string());
    put("x-ratelimit-reset", RESET.to_string());
    put("x-ratelimit-used", (LIMIT - remaining).to_string());
    put("x-ratelimit-resource", "core".into());
}

fn in_outage(s: &FakeState) -> bool {
    s.outage_until
        .is_some_and(|until| std::time::Instant::now() < until)
}

/// Counting, authentication, faults, ETag/304, budget and rate headers.
async fn api_layer(
    State(state): State<Shared>,
    matched: MatchedPath,
    req: Request,
    next: Next,
) -> Response {
    let route = format!("{} {}", req.method(), matched.as_str());
    let is_get = req.method() == Method::GET;
    let jwt = is_jwt_route(&route);
    let actor = actor_of(
        &lock(&state),
        req.headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
    );
    // The App's routes check its JWT themselves.
    let authorized = jwt || actor.is_some();
    let if_none_match = req
        .headers()
        .get("if-none-match")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string());
    let (req_parts, req_body) = req.into_parts();
    let req_bytes = axum::body::to_bytes(req_body, usize::MAX)
        .await
        .unwrap_or_default();
    let body_json = serde_json::from_slice::<Value>(&req_bytes).ok();
    let mut req = Request::from_parts(req_parts, Body::from(req_bytes));
    req.extensions_mut()
        .insert(actor.unwrap_or(Actor(TOKEN_USER)));
    let (fault, down) = {
        let mut s = lock(&state);
        *s.counts.entry(route.clone()).or_default() += 1;
        let pos = s.faults.iter().position(|(r, _)| *r == route);
        let fault = pos.and_then(|i| s.faults.remove(i)).map(|(_, f)| f);
        (fault, in_outage(&s))
    };
    let mut response = match (authorized, fault) {
        _ if down => error(StatusCode::BAD_GATEWAY, "Server Error"),
        (false, _) | (_, Some(Fault::BadCredentials)) => {
            error(StatusCode::UNAUTHORIZED, "Bad credentials")
        }
        (_, Some(Fault::SecondaryLimit { retry_after })) => {
            let mut r = error(
                StatusCode::FORBIDDEN,
                "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.",
            );
            r.headers_mut()
                .insert("retry-after", HeaderValue::from(retry_after));
            r
        }
        (_, Some(Fault::ServerError)) => error(StatusCode::INTERNAL_SERVER_ERROR, "Server Error"),
        (_, Some(Fault::Malformed)) => (
            StatusCode::OK,
            [("content-type", "application/json")],
            "{\"number\": 1, \"tit",
        )
            .into_response(),
        (true, None) => next.run(req).await,
    };
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let mut s = lock(&state);
    if is_get && parts.status == StatusCode::OK {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut h);
        let etag = format!("\"{:016x}\"", h.finish());
        parts
            .headers
            .insert("etag", HeaderValue::from_str(&etag).expect("etag"));
        if if_none_match.as_deref() == Some(etag.as_str()) {
            s.not_modified += 1;
            parts.status = StatusCode::NOT_MODIFIED;
            parts.headers.remove("content-type");
            parts.headers.remove("content-length");
            set_rate_headers(&mut parts.headers, s.remaining);
            s.log.push(Logged {
                method,
                path,
                status: 304,
                body: body_json,
            });
            return Response::from_parts(parts, Body::empty());
        }
    }
    if parts.status.is_success()
        && method != "GET"
        && !jwt
        && let (Some(hook), Some(event)) = (s.hook.clone(), hook_event(&route))
    {
        let sender = actor.unwrap_or(Actor(TOKEN_USER)).0;
        s.deliveries += 1;
        let id = format!("fake-{}", s.deliveries);
        tokio::spawn(send_delivery(hook, event, id, sender));
    }
    s.log.push(Logged {
        method,
        path,
        status: parts.status.as_u16(),
        body: body_json,
    });
    // Requests with the App's JWT count against the App's own limit.
    if !jwt {
        s.remaining = s.remaining.saturating_sub(1);
    }
    set_rate_headers(&mut parts.headers, s.remaining);
    if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
        s.emitted.push((route, parts.status.as_u16(), v));
    }
    response = Response::from_parts(parts, Body::from(bytes));
    response
}

fn user_json(login: &str) -> Value {
    // The fields every recorded user object has (2012 to 2022 recordings).
    json!({
        "login": login,
        "id": 1000,
        "avatar_url": "https://avatars.githubusercontent.com/u/1000?v=4",
        "gravatar_id": "",
        "url": format!("https://api.github.com/users/{login}"),
    })
}

fn label_json(s: &FakeState, name: &str) -> Value {
    let (color, description) = s
        .labels
        .iter()
        .find(|(n, _, _)| n == name)
        .map(|(_, c, d)| (c.clone(), d.clone()))
        .unwrap_or_else(|| ("ededed".into(), String::new()));
    json!({
        "id": 1000,
        "node_id": "MDA6RW50aXR5MQ==",
        "url": format!("{}/repos/{OWNER}/{REPO}/labels/{name}", s.api),
        "name": name,
        "color": color,
        "default": false,
        "description": description,
    })
}

fn issue_json(s: &FakeState, n: u64, i: &FakeIssue) -> Value {
    json!({
        "url": format!("{}/repos/{OWNER}/{REPO}/issues/{n}", s.api),
        "html_url": format!("https://github.com/{OWNER}/{REPO}/issues/{n}"),
        "id": 1000 + n,
        "node_id": "MDA6RW50aXR5MQ==",
        "number": n,
        "title": i.title,
        "user": user_json(&i.author),
        "labels": i.labels.iter().map(|l| label_json(s, l)).collect::<Vec<_>>(),
        "state": i.state,
        "locked": false,
        "comments": i.comments.len(),
        "created_at": "2024-01-01T00:00:00Z",
        "updated_at": "2024-01-01T00:00:00Z",
        "closed_at": Value::Null,
        "author_association": "MEMBER",
        "body": i.body,
    })
}

fn pull_issue_json(s: &FakeState, n: u64, p: &FakePull) -> Value {
    let mut v = issue_json(
        s,
        n,
        &FakeIssue {
            title: p.title.clone(),
            body: p.body.clone(),
            labels: Vec::new(),
            author: "hydraflow-bot".into(),
            state: p.state.clone(),
            comments: Vec::new(),
        },
    );
    v["pull_request"] = json!({
        "url": format!("{}/repos/{OWNER}/{REPO}/pulls/{n}", s.api),
        "html_url": format!("https://github.com/{OWNER}/{REPO}/pull/{n}"),
        "diff_url": format!("https://github.com/{OWNER}/{REPO}/pull/{n}.diff"),
        "patch_url": format!("https://github.com/{OWNER}/{REPO}/pull/{n}.patch"),
    });
    v
}

fn branch_sha(bare: &Path, branch: &str) -> Option<String> {
    let repo = git2::Repository::open_bare(bare).ok()?;
    let r = repo.find_reference(&format!("refs/heads/{branch}")).ok()?;
    r.target().map(|o| o.to_string())
}

/// Whether head merges into base without conflicts.
fn merges_cleanly(bare: &Path, base: &str, head: &str) -> Option<bool> {
    let repo = git2::Repository::open_bare(bare).ok()?;
    let b = repo
        .find_reference(&format!("refs/heads/{base}"))
        .ok()?
        .peel_to_commit()
        .ok()?;
    let h = repo
        .find_reference(&format!("refs/heads/{head}"))
        .ok()?
        .peel_to_commit()
        .ok()?;
    let index = repo.merge_commits(&b, &h, None).ok()?;
    Some(!index.has_conflicts())
}

fn pull_json(s: &FakeState, n: u64, p: &FakePull, mergeable: Option<bool>) -> Value {
    let sha = branch_sha(&s.bare, &p.head).unwrap_or_else(|| p.head_sha.clone());
    let base_sha = branch_sha(&s.bare, &p.base).unwrap_or_default();
    json!({
        "url": format!("{}/repos/{OWNER}/{REPO}/pulls/{n}", s.api),
        "html_url": format!("https://github.com/{OWNER}/{REPO}/pull/{n}"),
        "id": 2000 + n,
        "number": n,
        "state": p.state,
        "title": p.title,
        "body": p.body,
        "user": user_json("hydraflow-bot"),
        "created_at": "2024-01-01T00:00:00Z",
        "updated_at": "2024-01-01T00:00:00Z",
        "merged_at": if p.merged { json!("2024-01-02T00:00:00Z") } else { Value::Null },
        "head": { "label": format!("{OWNER}:{}", p.head), "ref": p.head, "sha": sha, "user": user_json(OWNER) },
        "base": { "label": format!("{OWNER}:{}", p.base), "ref": p.base, "sha": base_sha, "user": user_json(OWNER) },
        "merged": p.merged,
        "mergeable": mergeable,
        "commits": 1,
        "comments": 0,
    })
}

#[derive(serde::Deserialize)]
struct ListQuery {
    state: Option<String>,
    labels: Option<String>,
    head: Option<String>,
    per_page: Option<usize>,
    page: Option<usize>,
}

type RepoPath<T> = UrlPath<(String, String, T)>;

async fn list_issues(State(st): State<Shared>, Query(q): Query<ListQuery>) -> Response {
    let s = lock(&st);
    let wanted: Vec<&str> = q
        .labels
        .as_deref()
        .map(|l| l.split(',').collect())
        .unwrap_or_default();
    let state = q.state.clone().unwrap_or_else(|| "open".into());
    let mut all: Vec<(u64, Value)> = s
        .issues
        .iter()
        .filter(|(_, i)| i.state == state && wanted.iter().all(|w| i.labels.iter().any(|l| l == w)))
        .map(|(n, i)| (*n, issue_json(&s, *n, i)))
        .collect();
    if wanted.is_empty() {
        all.extend(
            s.pulls
                .iter()
                .filter(|(_, p)| p.state == state)
                .map(|(n, p)| (*n, pull_issue_json(&s, *n, p))),
        );
    }
    all.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    let items: Vec<Value> = all.into_iter().map(|(_, v)| v).collect();
    paged(
        &s,
        items,
        &q,
        &format!("/repos/{OWNER}/{REPO}/issues"),
        |q| {
            let mut out = format!("state={state}");
            if let Some(l) = &q.labels {
                out.push_str(&format!("&labels={}", urlencode(l)));
            }
            out
        },
    )
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn paged(
    s: &FakeState,
    items: Vec<Value>,
    q: &ListQuery,
    path: &str,
    query: impl Fn(&ListQuery) -> String,
) -> Response {
    let per_page = q.per_page.unwrap_or(30).clamp(1, s.max_per_page);
    let page = q.page.unwrap_or(1).max(1);
    let last = items.len().div_ceil(per_page).max(1);
    let chunk: Vec<Value> = items
        .into_iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .collect();
    let mut response = axum::Json(Value::Array(chunk)).into_response();
    let base = format!("{}{path}?{}&per_page={per_page}", s.api, query(q));
    let mut links = Vec::new();
    if page < last {
        links.push(format!("<{base}&page={}>; rel=\"next\"", page + 1));
        links.push(format!("<{base}&page={last}>; rel=\"last\""));
    }
    if page > 1 {
        links.push(format!("<{base}&page={}>; rel=\"prev\"", page - 1));
        links.push(format!("<{base}&page=1>; rel=\"first\""));
    }
    if !links.is_empty() {
        response.headers_mut().insert(
            "link",
            HeaderValue::from_str(&links.join(", ")).expect("link"),
        );
    }
    response
}

async fn get_issue(State(st): State<Shared>, UrlPath((_, _, n)): RepoPath<u64>) -> Response {
    let s = lock(&st);
    match s.issues.get(&n) {
        Some(i) => axum::Json(issue_json(&s, n, i)).into_response(),
        None => error(StatusCode::NOT_FOUND, "Not Found"),
    }
}

async fn patch_issue(
    State(st): State<Shared>,
    UrlPath((_, _, n)): RepoPath<u64>,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let mut s = lock(&st);
    let Some(i) = s.issues.get_mut(&n) else {
        return error(StatusCode::NOT_FOUND, "Not Found");
    };
    if let Some(state) = body.get("state").and_then(Value::as_str) {
        i.state = state.to_string();
    }
    let i = i.clone();
    axum::Json(issue_json(&s, n, &i)).into_response()
}

fn comment_json(s: &FakeState, n: u64, idx: usize, author: &str, body: &str) -> Value {
    json!({
        "url": format!("{}/repos/{OWNER}/{REPO}/issues/comments/{}", s.api, n * 1000 + idx as u64),
        "id": n * 1000 + idx as u64,
        "user": user_json(author),
        "created_at": format!("2024-01-01T00:00:{:02}Z", idx % 60),
        "updated_at": format!("2024-01-01T00:00:{:02}Z", idx % 60),
        "body": body,
    })
}

async fn list_comments(
    State(st): State<Shared>,
    UrlPath((_, _, n)): RepoPath<u64>,
    Query(q): Query<ListQuery>,
) -> Response {
    let s = lock(&st);
    let Some(i) = s.issues.get(&n) else {
        return error(StatusCode::NOT_FOUND, "Not Found");
    };
    let items = i
        .comments
        .iter()
        .enumerate()
        .map(|(idx, (a, b))| comment_json(&s, n, idx, a, b))
        .collect();
    paged(
        &s,
        items,
        &q,
        &format!("/repos/{OWNER}/{REPO}/issues/{n}/comments"),
        |_| String::new(),
    )
}

async fn post_comment(
    State(st): State<Shared>,
    UrlPath((_, _, n)): RepoPath<u64>,
    axum::Extension(Actor(actor)): axum::Extension<Actor>,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let mut s = lock(&st);
    let text = body
        .get("body")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if text.chars().count() > 65_536 {
        return validation_failed("IssueComment", "body", "custom");
    }
    let Some(i) = s.issues.get_mut(&n) else {
        return error(StatusCode::NOT_FOUND, "Not Found");
    };
    i.comments.push((actor.into(), text.clone()));
    let idx = i.comments.len() - 1;
    (
        StatusCode::CREATED,
        axum::Json(comment_json(&s, n, idx, actor, &text)),
    )
        .into_response()
}

fn validation_failed(resource: &str, field: &str, code: &str) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        axum::Json(json!({
            "message": "Validation Failed",
            "errors": [{ "resource": resource, "code": code, "field": field }],
            "documentation_url": "https://docs.github.com/rest",
        })),
    )
        .into_response()
}

async fn add_labels(
    State(st): State<Shared>,
    UrlPath((_, _, n)): RepoPath<u64>,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let mut s = lock(&st);
    let new: Vec<String> = body
        .get("labels")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let Some(i) = s.issues.get_mut(&n) else {
        return error(StatusCode::NOT_FOUND, "Not Found");
    };
    for l in new {
        if !i.labels.contains(&l) {
            i.labels.push(l);
        }
    }
    let labels = i.labels.clone();
    axum::Json(labels.iter().map(|l| label_json(&s, l)).collect::<Vec<_>>()).into_response()
}

async fn remove_label(
    State(st): State<Shared>,
    UrlPath((_, _, n, name)): UrlPath<(String, String, u64, String)>,
) -> Response {
    let mut s = lock(&st);
    let Some(i) = s.issues.get_mut(&n) else {
        return error(StatusCode::NOT_FOUND, "Not Found");
    };
    let Some(pos) = i.labels.iter().position(|l| *l == name) else {
        return error(StatusCode::NOT_FOUND, "Label does not exist");
    };
    i.labels.remove(pos);
    let labels = i.labels.clone();
    axum::Json(labels.iter().map(|l| label_json(&s, l)).collect::<Vec<_>>()).into_response()
}

async fn list_labels(State(st): State<Shared>, Query(q): Query<ListQuery>) -> Response {
    let s = lock(&st);
    let items = s.labels.iter().map(|(n, _, _)| label_json(&s, n)).collect();
    paged(
        &s,
        items,
        &q,
        &format!("/repos/{OWNER}/{REPO}/labels"),
        |_| String::new(),
    )
}

async fn create_label(State(st): State<Shared>, axum::Json(body): axum::Json<Value>) -> Response {
    let mut s = lock(&st);
    let field = |k: &str| {
        body.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let (name, color) = (field("name"), field("color"));
    if color.len() != 6 || !color.chars().all(|c| c.is_ascii_hexdigit()) {
        return validation_failed("Label", "color", "invalid");
    }
    if s.labels
        .iter()
        .any(|(n, _, _)| n.eq_ignore_ascii_case(&name))
    {
        return validation_failed("Label", "name", "already_exists");
    }
    s.labels.push((name.clone(), color, field("description")));
    (StatusCode::CREATED, axum::Json(label_json(&s, &name))).into_response()
}

async fn collaborator(
    State(st): State<Shared>,
    UrlPath((_, _, user)): RepoPath<String>,
) -> Response {
    if lock(&st).collaborators.contains(&user) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(StatusCode::NOT_FOUND, "Not Found")
    }
}

async fn list_pulls(State(st): State<Shared>, Query(q): Query<ListQuery>) -> Response {
    let s = lock(&st);
    let state = q.state.clone().unwrap_or_else(|| "open".into());
    let head = q
        .head
        .as_deref()
        .and_then(|h| h.split_once(':'))
        .map(|(_, b)| b.to_string());
    let items = s
        .pulls
        .iter()
        .rev()
        .filter(|(_, p)| p.state == state && head.as_ref().is_none_or(|h| *h == p.head))
        .map(|(n, p)| pull_json(&s, *n, p, None))
        .collect();
    paged(
        &s,
        items,
        &q,
        &format!("/repos/{OWNER}/{REPO}/pulls"),
        |q| {
            format!(
                "state={state}{}",
                q.head
                    .as_deref()
                    .map(|h| format!("&head={}", urlencode(h)))
                    .unwrap_or_default()
            )
        },
    )
}

async fn create_pull(State(st): State<Shared>, axum::Json(body): axum::Json<Value>) -> Response {
    let mut s = lock(&st);
    let field = |k: &str| {
        body.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let (head, base) = (field("head"), field("base"));
    let Some(head_sha) = branch_sha(&s.bare, &head) else {
        return validation_failed("PullRequest", "head", "invalid");
    };
    if s.pulls
        .values()
        .any(|p| p.state == "open" && p.head == head)
    {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({
                "message": "Validation Failed",
                "errors": [{ "resource": "PullRequest", "code": "custom",
                             "message": format!("A pull request already exists for {OWNER}:{head}.") }],
                "documentation_url": "https://docs.github.com/rest",
            })),
        )
            .into_response();
    }
    let n = s.next_number;
    s.next_number += 1;
    let pull = FakePull {
        title: field("title"),
        body: field("body"),
        head,
        head_sha,
        base,
        state: "open".into(),
        merged: false,
        unknown_left: s.unknown_polls,
    };
    s.pulls.insert(n, pull.clone());
    (
        StatusCode::CREATED,
        axum::Json(pull_json(&s, n, &pull, None)),
    )
        .into_response()
}

async fn get_pull(State(st): State<Shared>, UrlPath((_, _, n)): RepoPath<u64>) -> Response {
    let mut s = lock(&st);
    let bare = s.bare.clone();
    let Some(p) = s.pulls.get_mut(&n) else {
        return error(StatusCode::NOT_FOUND, "Not Found");
    };
    let mergeable = if p.state != "open" {
        None
    } else if p.unknown_left > 0 {
        p.unknown_left -= 1;
        None
    } else {
        merges_cleanly(&bare, &p.base, &p.head)
    };
    let p = p.clone();
    axum::Json(pull_json(&s, n, &p, mergeable)).into_response()
}

/// Squash-merge head into base in the bare repository.
fn squash(bare: &Path, base: &str, head: &str, message: &str) -> Result<String, String> {
    let repo = git2::Repository::open_bare(bare).map_err(|e| e.to_string())?;
    let base_ref = format!("refs/heads/{base}");
    let b = repo
        .find_reference(&base_ref)
        .and_then(|r| r.peel_to_commit())
        .map_err(|e| e.to_string())?;
    let h = repo
        .find_reference(&format!("refs/heads/{head}"))
        .and_then(|r| r.peel_to_commit())
        .map_err(|e| e.to_string())?;
    let mut index = repo
        .merge_commits(&b, &h, None)
        .map_err(|e| e.to_string())?;
    if index.has_conflicts() {
        return Err("conflict".into());
    }
    let tree = repo
        .find_tree(index.write_tree_to(&repo).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let sig = git2::Signature::now("GitHub", "noreply@github.com").map_err(|e| e.to_string())?;
    let oid = repo
        .commit(Some(&base_ref), &sig, &sig, message, &tree, &[&b])
        .map_err(|e| e.to_string())?;
    Ok(oid.to_string())
}

async fn merge_pull(
    State(st): State<Shared>,
    UrlPath((_, _, n)): RepoPath<u64>,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let mut s = lock(&st);
    let bare = s.bare.clone();
    let Some(p) = s.pulls.get_mut(&n) else {
        return error(StatusCode::NOT_FOUND, "Not Found");
    };
    if p.state != "open" {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "Pull Request is not mergeable",
        );
    }
    if body.get("merge_method").and_then(Value::as_str) != Some("squash") {
        return error(StatusCode::METHOD_NOT_ALLOWED, "Merge method not allowed");
    }
    if let Some(expected) = body.get("sha").and_then(Value::as_str)
        && branch_sha(&bare, &p.head).as_deref() != Some(expected)
    {
        return error(
            StatusCode::CONFLICT,
            "Head branch was modified. Review and try the merge again.",
        );
    }
    let title = body
        .get("commit_title")
        .and_then(Value::as_str)
        .unwrap_or(&p.title)
        .to_string();
    match squash(&bare, &p.base, &p.head, &title) {
        Ok(sha) => {
            p.state = "closed".into();
            p.merged = true;
            axum::Json(json!({ "sha": sha, "merged": true, "message": "Pull Request successfully merged" }))
                .into_response()
        }
        Err(_) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "Pull Request is not mergeable",
        ),
    }
}

/// The review's `state` as GitHub reports it for a posted `event`.
fn review_state(event: &str) -> &'static str {
    match event {
        "APPROVE" => "APPROVED",
        "REQUEST_CHANGES" => "CHANGES_REQUESTED",
        _ => "COMMENTED",
    }
}

async fn list_reviews(State(st): State<Shared>, UrlPath((_, _, n)): RepoPath<u64>) -> Response {
    let s = lock(&st);
    if !s.pulls.contains_key(&n) {
        return error(StatusCode::NOT_FOUND, "Not Found");
    }
    let reviews: Vec<Value> = s
        .reviews
        .iter()
        .enumerate()
        .filter(|(_, (pr, _, _))| *pr == n)
        .map(|(i, (_, event, body))| {
            json!({ "id": i + 1, "user": user_json("hydraflow-bot"), "body": body, "state": review_state(event) })
        })
        .collect();
    axum::Json(reviews).into_response()
}

async fn post_review(
    State(st): State<Shared>,
    UrlPath((_, _, n)): RepoPath<u64>,
    axum::Extension(Actor(actor)): axum::Extension<Actor>,
    axum::Json(body): axum::Json<Value>,
) -> Response {
    let mut s = lock(&st);
    if !s.pulls.contains_key(&n) {
        return error(StatusCode::NOT_FOUND, "Not Found");
    }
    let field = |k: &str| {
        body.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let (event, text) = (field("event"), field("body"));
    s.reviews.push((n, event.clone(), text.clone()));
    let state = review_state(&event);
    axum::Json(
        json!({ "id": s.reviews.len(), "user": user_json(actor), "body": text, "state": state }),
    )
    .into_response()
}

async fn check_runs(State(st): State<Shared>, UrlPath((_, _, sha)): RepoPath<String>) -> Response {
    let s = lock(&st);
    let runs: Vec<Value> = s
        .check_runs
        .get(&sha)
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, (name, status, conclusion))| {
            json!({
                "id": i + 1,
                "node_id": "MDg6Q2hlY2tSdW4x",
                "head_sha": sha,
                "external_id": "",
                "url": format!("{}/repos/{OWNER}/{REPO}/check-runs/{}", s.api, i + 1),
                "html_url": format!("https://github.com/{OWNER}/{REPO}/runs/{}", i + 1),
                "details_url": format!("https://github.com/{OWNER}/{REPO}/runs/{}", i + 1),
                "status": status,
                "conclusion": conclusion,
                "started_at": "2024-01-01T00:00:00Z",
                "completed_at": if status == "completed" { json!("2024-01-01T00:01:00Z") } else { Value::Null },
                "output": { "title": name, "summary": format!("{name} {status}"), "text": Value::Null,
                            "annotations_count": 0,
                            "annotations_url": format!("{}/repos/{OWNER}/{REPO}/check-runs/{}/annotations", s.api, i + 1) },
                "name": name,
            })
        })
        .collect();
    axum::Json(json!({ "total_count": runs.len(), "check_runs": runs })).into_response()
}

async fn combined_status(
    State(st): State<Shared>,
    UrlPath((_, _, sha)): RepoPath<String>,
) -> Response {
    let s = lock(&st);
    let list = s.statuses.get(&sha).cloned().unwrap_or_default();
    let state = if list.iter().any(|(_, st)| st == "failure" || st == "error") {
        "failure"
    } else if list.is_empty() || list.iter().any(|(_, st)| st == "pending") {
        "pending"
    } else {
        "success"
    };
    let statuses: Vec<Value> = list
        .iter()
        .enumerate()
        .map(|(i, (context, st))| {
            json!({
                "url": format!("{}/repos/{OWNER}/{REPO}/statuses/{sha}", s.api),
                "id": i + 1,
                "node_id": "MDA6RW50aXR5MQ==",
                "state": st,
                "description": format!("{context} is {st}"),
                "target_url": Value::Null,
                "context": context,
                "created_at": "2024-01-01T00:00:00Z",
                "updated_at": "2024-01-01T00:00:00Z",
            })
        })
        .collect();
    axum::Json(json!({
        "state": state,
        "statuses": statuses,
        "sha": sha,
        "total_count": list.len(),
        "commit_url": format!("{}/repos/{OWNER}/{REPO}/commits/{sha}", s.api),
        "url": format!("{}/repos/{OWNER}/{REPO}/commits/{sha}/status", s.api),
    }))
    .into_response()
}

async fn delete_ref(
    State(st): State<Shared>,
    UrlPath((_, _, branch)): RepoPath<String>,
) -> Response {
    let bare = lock(&st).bare.clone();
    let deleted = git2::Repository::open_bare(&bare).and_then(|repo| {
        repo.find_reference(&format!("refs/heads/{branch}"))?
            .delete()
    });
    match deleted {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(_) => error(StatusCode::UNPROCESSABLE_ENTITY, "Reference does not exist"),
    }
}

/// git's smart HTTP protocol: `git http-backend` as a CGI, behind Basic auth
/// with the token as the password.
async fn git_http(
    State(st): State<Shared>,
    UrlPath(path): UrlPath<String>,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if in_outage(&lock(&st)) {
        return error(StatusCode::BAD_GATEWAY, "Server Error");
    }
    *lock(&st)
        .counts
        .entry(format!("{method} /git"))
        .or_default() += 1;
    // HTTP Basic with the user `x-access-token` and the token or an
    // installation token as the password, as GitHub takes it.
    let password = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|pair| pair.strip_prefix("x-access-token:").map(str::to_string));
    let credential = {
        let s = lock(&st);
        match password.as_deref() {
            Some(TOKEN) => Some("token"),
            Some(p) if s.app.as_ref().is_some_and(|a| a.accepts(p)) => Some("installation"),
            _ => None,
        }
    };
    if let Some(kind) = credential {
        lock(&st).git_credentials.push(kind);
    } else {
        return (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Basic realm=\"fake GitHub\"")],
            "authentication required",
        )
            .into_response();
    }
    let root = lock(&st)
        .bare
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("git root");
    let header = |k: &str| {
        headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let mut child = tokio::process::Command::new("git")
        .arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", &root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REMOTE_USER", "x-access-token")
        .env("PATH_INFO", format!("/{path}"))
        .env("REQUEST_METHOD", method.as_str())
        .env("QUERY_STRING", uri.query().unwrap_or_default())
        .env("CONTENT_TYPE", header("content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn git http-backend");
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&body).await;
    });
    let out = child.wait_with_output().await.expect("git http-backend");
    let _ = writer.await;
    let mut parsed = [httparse::EMPTY_HEADER; 32];
    let Ok(httparse::Status::Complete((len, cgi_headers))) =
        httparse::parse_headers(&out.stdout, &mut parsed)
    else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
            .into_response();
    };
    let mut response = Response::new(Body::from(out.stdout[len..].to_vec()));
    for h in cgi_headers.iter() {
        let value = String::from_utf8_lossy(h.value).to_string();
        if h.name.eq_ignore_ascii_case("status") {
            let code = value
                .split_whitespace()
                .next()
                .and_then(|c| c.parse().ok())
                .unwrap_or(200);
            *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
        } else if let (Ok(n), Ok(v)) = (
            axum::http::HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            response.headers_mut().insert(n, v);
        }
    }
    response
}
