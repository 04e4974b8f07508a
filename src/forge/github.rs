//! The GitHub forge: [`Forge`] over GitHub's REST API (api.github.com or
//! GitHub Enterprise Server) with octocrab as the HTTP client, and clones,
//! fetches and branch pushes with git2 over git's smart HTTP protocol
//! ([`super::git_http`]: ureq and rustls, no OpenSSL).
//!
//! **Invariant:** only this module imports octocrab.
//!
//! Requests go through octocrab's raw `execute` (not its typed builders) so
//! that every response's status and headers are seen here: that is what
//! conditional requests (`ETag` / `If-None-Match`, a 304 costs no budget),
//! `x-ratelimit-*` accounting, `Retry-After` handling and the mapping to
//! [`ForgeError`] need. Response bodies are read into small serde structs
//! holding only the fields used, so a GitHub Enterprise Server that lacks a
//! newer field still works. Retries use `backon` (jittered exponential
//! backoff; a rate limit's own wait replaces the backoff delay). A tokio
//! semaphore caps concurrent requests per process. The token is never put in
//! a URL, a git config or a log: git's HTTP requests carry it through
//! [`super::git_http`] (git2 has no `https` feature and no credentials
//! callback here), only to the web URL's host.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use http::header::{ACCEPT, ETAG, HeaderMap, IF_NONE_MATCH, RETRY_AFTER};
use http::{Method, StatusCode};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use super::git_http;
use super::{
    CheckRunView, ChecksSummary, Comment, CommitStatusView, Forge, ForgeError, ForgeResult, Issue,
    IssueDetail, IssueState, LabelSpec, MergeOutcome, NewPullRequest, PullRequest,
    PullRequestState, RateBudget, Review, ReviewEvent, summarise_checks,
};
use crate::config::Config;

/// GitHub's limit on the body of one comment, in characters
/// (the API answers 422 "body is too long (maximum is 65536 characters)").
pub const COMMENT_LIMIT: usize = 65_536;

/// Environment variables consulted for the token, in order (docs/design/configuration.md).
pub const TOKEN_ENV_VARS: [&str; 3] = ["HYDRAFLOW_GH_TOKEN", "GH_TOKEN", "GITHUB_TOKEN"];

/// Name of the systemd credential holding the token.
pub const TOKEN_CREDENTIAL: &str = "github-token";

/// Characters escaped in a path segment or query value.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Pick the token: the systemd credential `github-token` when present and
/// non-empty, else the first non-empty of [`TOKEN_ENV_VARS`] as `env` returns
/// them. Surrounding whitespace (a trailing newline in a credential file) is
/// trimmed.
pub fn resolve_token(
    credential: Option<String>,
    env: impl Fn(&str) -> Option<String>,
) -> Option<String> {
    let nonempty = |v: String| {
        let t = v.trim();
        (!t.is_empty()).then(|| t.to_string())
    };
    credential.and_then(nonempty).or_else(|| {
        TOKEN_ENV_VARS
            .iter()
            .find_map(|k| env(k).and_then(nonempty))
    })
}

/// The token of this process: [`resolve_token`] over the systemd credential
/// and the real environment.
///
/// # Errors
/// [`ForgeError::Auth`] naming where a token was looked for when there is none.
pub fn token_from_environment() -> ForgeResult<String> {
    resolve_token(crate::systemd::read_credential(TOKEN_CREDENTIAL), |k| {
        std::env::var(k).ok()
    })
    .ok_or_else(|| {
        ForgeError::Auth(format!(
            "no GitHub token: set the systemd credential {TOKEN_CREDENTIAL:?} or one of {}",
            TOKEN_ENV_VARS.join(", ")
        ))
    })
}

/// Split a comment body into pieces of at most `limit` characters, cutting
/// after the last newline of a piece when there is one so lines stay whole.
/// An empty body gives one empty piece.
pub fn split_comment(body: &str, limit: usize) -> Vec<String> {
    let limit = limit.max(1);
    let mut pieces = Vec::new();
    let mut rest = body;
    while rest.chars().count() > limit {
        // Byte offset just past the `limit`-th character.
        let hard = rest
            .char_indices()
            .nth(limit)
            .map_or(rest.len(), |(i, _)| i);
        let cut = match rest[..hard].rfind('\n') {
            Some(i) if i > 0 => i + 1,
            _ => hard,
        };
        pieces.push(rest[..cut].to_string());
        rest = &rest[cut..];
    }
    pieces.push(rest.to_string());
    pieces
}

/// The `rel="next"` target of an RFC 8288 `Link` header as GitHub writes it
/// (`<url>; rel="next", <url>; rel="last"`). octocrab parses this only inside
/// its typed `Page`, which the conditional-request path cannot use.
pub fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let mut fields = part.split(';').map(str::trim);
        let target = fields.next()?.strip_prefix('<')?.strip_suffix('>')?;
        fields
            .any(|p| p == "rel=\"next\"" || p == "rel=next")
            .then(|| target.to_string())
    })
}

/// Everything [`GithubForge::new`] needs.
#[derive(Clone)]
pub struct GithubOptions {
    /// REST API base URL, e.g. `https://api.github.com` or `https://HOST/api/v3`.
    pub api_url: String,
    /// Web base URL; clone URLs are `<web_url>/<owner>/<repo>.git`.
    pub web_url: String,
    /// Repository owner.
    pub owner: String,
    /// Repository name.
    pub repo: String,
    /// The token (see [`resolve_token`]).
    pub token: String,
    /// Most concurrent API requests of this forge.
    pub max_concurrent_requests: usize,
    /// Only list issues whose author is a collaborator.
    pub collaborators_only: bool,
    /// Retries after a transient failure or a rate limit.
    pub max_retries: usize,
    /// Longest rate-limit wait slept inside a call; longer waits return
    /// [`ForgeError::RateLimited`] to the caller.
    pub max_retry_wait: Duration,
    /// First backoff delay after a transient failure.
    pub min_backoff: Duration,
    /// Times `get_pull_request` asks again while mergeability is unknown.
    pub mergeable_polls: u32,
    /// Delay between those polls.
    pub mergeable_poll_delay: Duration,
}

impl std::fmt::Debug for GithubOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GithubOptions")
            .field("api_url", &self.api_url)
            .field("web_url", &self.web_url)
            .field("owner", &self.owner)
            .field("repo", &self.repo)
            .field("token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl GithubOptions {
    /// Options from the configuration (`repo` as `owner/name`, `[github]`,
    /// `collaborators_only`) and a token.
    ///
    /// # Errors
    /// [`ForgeError::Local`] when `repo` is missing or not `owner/name`.
    pub fn from_config(config: &Config, token: String) -> ForgeResult<GithubOptions> {
        let repo = config.repo.as_deref().unwrap_or_default();
        let (owner, name) = repo
            .split_once('/')
            .filter(|(o, n)| !o.is_empty() && !n.is_empty() && !n.contains('/'))
            .ok_or_else(|| {
                ForgeError::Local(format!(
                    "repo {repo:?} is not valid for the GitHub forge: expected \"owner/name\""
                ))
            })?;
        let gh = &config.github;
        Ok(GithubOptions {
            api_url: gh.api_url.clone(),
            web_url: gh.web_url.clone(),
            owner: owner.to_string(),
            repo: name.to_string(),
            token,
            max_concurrent_requests: gh.max_concurrent_requests.max(1),
            collaborators_only: config.collaborators_only,
            max_retries: gh.max_retries,
            max_retry_wait: Duration::from_secs(gh.max_retry_wait),
            min_backoff: Duration::from_millis(500),
            mergeable_polls: 5,
            mergeable_poll_delay: Duration::from_secs(2),
        })
    }
}

/// A response with its body read.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    fn json<T: DeserializeOwned>(&self, what: &str) -> ForgeResult<T> {
        serde_json::from_str(&self.body)
            .map_err(|e| ForgeError::Transient(format!("malformed response to {what}: {e}")))
    }

    fn message(&self) -> String {
        serde_json::from_str::<Value>(&self.body)
            .ok()
            .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| self.body.chars().take(200).collect())
    }

    /// Map a status the caller did not handle to an error.
    fn fail(&self, what: &str) -> ForgeError {
        let msg = format!("{what}: {} {}", self.status.as_u16(), self.message());
        match self.status.as_u16() {
            404 | 410 => ForgeError::NotFound(msg),
            405 | 409 => ForgeError::MergeConflict(msg),
            s if s >= 500 => ForgeError::Transient(msg),
            _ => ForgeError::Rejected(msg),
        }
    }

    fn ok(self, what: &str) -> ForgeResult<Reply> {
        if self.status.is_success() {
            Ok(self)
        } else {
            Err(self.fail(what))
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The GitHub forge of one repository.
pub struct GithubForge {
    client: octocrab::Octocrab,
    opts: GithubOptions,
    api: String,
    semaphore: Semaphore,
    /// Last `(etag, body)` per GET URL, for conditional requests.
    etags: Mutex<HashMap<String, (String, String)>>,
    budget: Mutex<Option<RateBudget>>,
    /// Whether a login is a collaborator, per login, for this process's life.
    collaborators: Mutex<HashMap<String, bool>>,
    /// Serialises fetches into the checkout (two refreshes at once would race on its refs).
    git_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for GithubForge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GithubForge")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct User {
    login: String,
}

#[derive(Deserialize)]
struct LabelJson {
    name: String,
}

#[derive(Deserialize)]
struct IssueJson {
    number: u64,
    title: String,
    body: Option<String>,
    #[serde(default)]
    labels: Vec<LabelJson>,
    user: Option<User>,
    state: String,
    html_url: Option<String>,
    pull_request: Option<Value>,
    /// How many comments the issue has (lets `get_issue` skip listing none).
    comments: Option<u64>,
}

impl IssueJson {
    fn into_issue(self) -> Issue {
        Issue {
            number: self.number,
            title: self.title,
            body: self.body.unwrap_or_default(),
            labels: self.labels.into_iter().map(|l| l.name).collect(),
            author: self.user.map(|u| u.login).unwrap_or_default(),
            state: if self.state == "closed" {
                IssueState::Closed
            } else {
                IssueState::Open
            },
            url: self.html_url,
        }
    }
}

#[derive(Deserialize)]
struct CommentJson {
    user: Option<User>,
    body: Option<String>,
    created_at: String,
}

#[derive(Deserialize)]
struct RefJson {
    #[serde(rename = "ref")]
    name: String,
    sha: String,
}

/// One entry of "List reviews for a pull request"
/// (<https://docs.github.com/en/rest/pulls/reviews#list-reviews-for-a-pull-request>):
/// `state` is `APPROVED`, `CHANGES_REQUESTED`, `COMMENTED`, `DISMISSED` or
/// `PENDING`; the last two are not verdicts and are left out.
#[derive(Debug, Deserialize)]
struct ReviewJson {
    #[serde(default)]
    body: Option<String>,
    state: String,
}

impl ReviewJson {
    fn into_review(self) -> Option<Review> {
        let event = match self.state.as_str() {
            "APPROVED" => ReviewEvent::Approve,
            "CHANGES_REQUESTED" => ReviewEvent::RequestChanges,
            "COMMENTED" => ReviewEvent::Comment,
            _ => return None,
        };
        Some(Review {
            event,
            body: self.body.unwrap_or_default(),
        })
    }
}

#[derive(Deserialize)]
struct PullJson {
    number: u64,
    state: String,
    title: String,
    body: Option<String>,
    head: RefJson,
    base: RefJson,
    mergeable: Option<bool>,
    #[serde(default)]
    merged: bool,
    merged_at: Option<String>,
    html_url: Option<String>,
}

impl PullJson {
    fn into_pull(self) -> PullRequest {
        let state = if self.merged || self.merged_at.is_some() {
            PullRequestState::Merged
        } else if self.state == "closed" {
            PullRequestState::Closed
        } else {
            PullRequestState::Open
        };
        PullRequest {
            number: self.number,
            head: self.head.name,
            head_sha: self.head.sha,
            base: self.base.name,
            title: self.title,
            body: self.body.unwrap_or_default(),
            state,
            mergeable: self.mergeable,
            url: self.html_url,
        }
    }
}

#[derive(Deserialize)]
struct CheckRunsJson {
    check_runs: Vec<CheckRunJson>,
}

#[derive(Deserialize)]
struct CheckRunOutput {
    summary: Option<String>,
}

#[derive(Deserialize)]
struct CheckRunJson {
    name: String,
    status: String,
    conclusion: Option<String>,
    output: Option<CheckRunOutput>,
}

#[derive(Deserialize)]
struct StatusJson {
    state: String,
    context: String,
    description: Option<String>,
}

#[derive(Deserialize)]
struct CombinedStatusJson {
    statuses: Vec<StatusJson>,
}

#[derive(Deserialize)]
struct MergeJson {
    sha: String,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Classify a 403/429: bad credentials, a rate limit (with its wait), or a
/// refusal (missing permission).
fn classify_forbidden(reply: &Reply, what: &str) -> ForgeError {
    let message = reply.message();
    let lower = message.to_lowercase();
    if lower.contains("bad credentials") {
        return ForgeError::Auth(format!(
            "{what}: GitHub rejected the token (bad credentials): check the token's value and expiry"
        ));
    }
    if let Some(secs) = reply
        .header(RETRY_AFTER.as_str())
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return ForgeError::RateLimited {
            retry_after: Duration::from_secs(secs),
        };
    }
    if reply.header("x-ratelimit-remaining") == Some("0") {
        let reset = reply
            .header("x-ratelimit-reset")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        return ForgeError::RateLimited {
            retry_after: Duration::from_secs(reset.saturating_sub(now_secs()).max(1)),
        };
    }
    if reply.status == StatusCode::TOO_MANY_REQUESTS
        || lower.contains("rate limit")
        || lower.contains("abuse")
    {
        // GitHub's advice for a secondary limit without Retry-After: wait a minute.
        return ForgeError::RateLimited {
            retry_after: Duration::from_secs(60),
        };
    }
    ForgeError::Auth(format!(
        "{what}: GitHub refused the token (403 {message}): check its permissions on the repository"
    ))
}

impl GithubForge {
    /// Build the forge; no request is sent.
    ///
    /// # Errors
    /// [`ForgeError::Local`] when the API URL is not a valid URI or the HTTP
    /// client cannot be built.
    pub fn new(opts: GithubOptions) -> ForgeResult<GithubForge> {
        let api = opts.api_url.trim_end_matches('/').to_string();
        // Before any git2 network operation of the process (see git_http::register).
        git_http::register().map_err(|e| ForgeError::Local(e.message().to_string()))?;
        let client = octocrab::Octocrab::builder()
            .base_uri(api.as_str())
            .map_err(|e| ForgeError::Local(format!("github.api_url {api:?} is not a URI: {e}")))?
            .personal_token(opts.token.clone())
            .set_connect_timeout(Some(Duration::from_secs(10)))
            .set_read_timeout(Some(Duration::from_secs(60)))
            .build()
            .map_err(|e| ForgeError::Local(format!("cannot build the GitHub client: {e}")))?;
        Ok(GithubForge {
            client,
            semaphore: Semaphore::new(opts.max_concurrent_requests.max(1)),
            api,
            opts,
            etags: Mutex::new(HashMap::new()),
            budget: Mutex::new(None),
            collaborators: Mutex::new(HashMap::new()),
            git_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The forge from the configuration, with the token from
    /// [`token_from_environment`].
    ///
    /// # Errors
    /// As [`GithubOptions::from_config`], [`token_from_environment`] and [`GithubForge::new`].
    pub fn from_config(config: &Config) -> ForgeResult<GithubForge> {
        GithubForge::new(GithubOptions::from_config(
            config,
            token_from_environment()?,
        )?)
    }

    /// The HTTPS clone URL (no credentials in it).
    pub fn clone_url(&self) -> String {
        format!(
            "{}/{}/{}.git",
            self.opts.web_url.trim_end_matches('/'),
            self.opts.owner,
            self.opts.repo
        )
    }

    fn repo_url(&self, rest: &str) -> String {
        format!(
            "{}/repos/{}/{}{rest}",
            self.api,
            enc(&self.opts.owner),
            enc(&self.opts.repo)
        )
    }

    fn record_budget(&self, headers: &HeaderMap) {
        let num = |k: &str| {
            headers
                .get(k)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(limit), Some(remaining), Some(reset_at)) = (
            num("x-ratelimit-limit"),
            num("x-ratelimit-remaining"),
            num("x-ratelimit-reset"),
        ) && let Ok(mut b) = self.budget.lock()
        {
            *b = Some(RateBudget {
                remaining,
                limit,
                reset_at,
            });
        }
    }

    /// One request, no retry. GETs are conditional: a 304 is answered with the
    /// cached body. 401/403/429/5xx and network failures become errors; other
    /// statuses are returned for the caller to judge.
    async fn send_once(
        &self,
        method: &Method,
        url: &str,
        body: Option<&Value>,
    ) -> ForgeResult<Reply> {
        let what = format!("{method} {}", url.strip_prefix(&self.api).unwrap_or(url));
        let _permit = self
            .semaphore
            .acquire()
            .await
            .map_err(|_| ForgeError::Local("request semaphore closed".into()))?;
        let cached = if *method == Method::GET {
            self.etags.lock().ok().and_then(|m| m.get(url).cloned())
        } else {
            None
        };
        let mut builder = http::Request::builder()
            .method(method.clone())
            .uri(url)
            .header(ACCEPT, "application/vnd.github+json")
            .header("x-github-api-version", "2022-11-28");
        if let Some((etag, _)) = &cached {
            builder = builder.header(IF_NONE_MATCH, etag.as_str());
        }
        let request = self
            .client
            .build_request(builder, body)
            .map_err(|e| ForgeError::Local(format!("{what}: cannot build the request: {e}")))?;
        let response = self
            .client
            .execute(request)
            .await
            .map_err(|e| ForgeError::Transient(format!("{what}: {e}")))?;
        let (parts, raw) = response.into_parts();
        let text = self
            .client
            .body_to_string(http::Response::new(raw))
            .await
            .map_err(|e| ForgeError::Transient(format!("{what}: cannot read the body: {e}")))?;
        let mut reply = Reply {
            status: parts.status,
            headers: parts.headers,
            body: text,
        };
        self.record_budget(&reply.headers);
        match reply.status.as_u16() {
            304 => match cached {
                Some((_, body)) => {
                    tracing::debug!(%what, "not modified");
                    reply.status = StatusCode::OK;
                    reply.body = body;
                }
                None => {
                    return Err(ForgeError::Transient(format!(
                        "{what}: 304 without a cached body"
                    )));
                }
            },
            401 => {
                return Err(ForgeError::Auth(format!(
                    "{what}: GitHub rejected the token (401 {}): check the token's value and expiry",
                    reply.message()
                )));
            }
            403 | 429 => return Err(classify_forbidden(&reply, &what)),
            s if s >= 500 => {
                return Err(ForgeError::Transient(format!(
                    "{what}: {s} {}",
                    reply.message()
                )));
            }
            s if (200..300).contains(&s) && *method == Method::GET => {
                if let (Some(etag), Ok(mut m)) = (
                    reply.header(ETAG.as_str()).map(str::to_string),
                    self.etags.lock(),
                ) {
                    m.insert(url.to_string(), (etag, reply.body.clone()));
                }
            }
            _ => {}
        }
        Ok(reply)
    }

    /// [`Self::send_once`] with retries: transient failures back off
    /// exponentially with jitter; a rate limit waits its `Retry-After` or
    /// reset time (plus jitter) when that is at most `max_retry_wait`.
    async fn send(&self, method: Method, url: &str, body: Option<&Value>) -> ForgeResult<Reply> {
        let max_wait = self.opts.max_retry_wait;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.opts.min_backoff)
            .with_max_delay(max_wait.max(self.opts.min_backoff))
            .with_max_times(self.opts.max_retries)
            .with_jitter();
        (|| self.send_once(&method, url, body))
            .retry(backoff)
            .when(ForgeError::is_transient)
            .adjust(move |err, delay| match err {
                ForgeError::RateLimited { retry_after } => {
                    if *retry_after > max_wait {
                        None
                    } else {
                        let jitter = retry_after.as_millis() as u64 / 10 + 50;
                        delay
                            .map(|_| *retry_after + Duration::from_millis(fastrand::u64(0..jitter)))
                    }
                }
                _ => delay,
            })
            .notify(
                |err, wait| tracing::warn!(error = %err, ?wait, "GitHub request failed, retrying"),
            )
            .await
    }

    /// Every item of a paginated GET, following `Link: rel="next"`.
    async fn get_all<T: DeserializeOwned>(&self, first: String, what: &str) -> ForgeResult<Vec<T>> {
        let mut items = Vec::new();
        let mut next = Some(first);
        while let Some(url) = next.take() {
            let reply = self.send(Method::GET, &url, None).await?.ok(what)?;
            items.extend(reply.json::<Vec<T>>(what)?);
            next = reply.header("link").and_then(next_link);
        }
        Ok(items)
    }

    async fn is_collaborator(&self, login: &str) -> ForgeResult<bool> {
        if let Some(known) = self
            .collaborators
            .lock()
            .ok()
            .and_then(|m| m.get(login).copied())
        {
            return Ok(known);
        }
        let url = self.repo_url(&format!("/collaborators/{}", enc(login)));
        let reply = self.send(Method::GET, &url, None).await?;
        let yes = match reply.status.as_u16() {
            204 => true,
            404 => false,
            _ => return Err(reply.fail(&format!("collaborator check of {login:?}"))),
        };
        if let Ok(mut m) = self.collaborators.lock() {
            m.insert(login.to_string(), yes);
        }
        Ok(yes)
    }

    async fn fetch_pull(&self, number: u64) -> ForgeResult<PullRequest> {
        let what = format!("pull request #{number}");
        let reply = self
            .send(
                Method::GET,
                &self.repo_url(&format!("/pulls/{number}")),
                None,
            )
            .await?
            .ok(&what)?;
        Ok(reply.json::<PullJson>(&what)?.into_pull())
    }

    /// Map a git2 failure of a network operation to a [`ForgeError`]: a refused
    /// token is [`ForgeError::Auth`], other network failures are transient,
    /// the rest local.
    fn git_error(e: &git2::Error, msg: String) -> ForgeError {
        match e.class() {
            _ if e.code() == git2::ErrorCode::Auth => ForgeError::Auth(msg),
            git2::ErrorClass::Http | git2::ErrorClass::Net | git2::ErrorClass::Ssl => {
                ForgeError::Transient(msg)
            }
            _ => ForgeError::Local(msg),
        }
    }

    /// Run a git2 network operation on this thread with the token sent to
    /// `web_url`'s host ([`git_http::with_token`]); its failure becomes
    /// [`ForgeError::Auth`] when the server refused the token, else as
    /// [`Self::git_error`] says, with the message `msg` makes.
    fn with_token<T>(
        web_url: &str,
        token: &str,
        op: impl FnOnce() -> Result<T, git2::Error>,
        msg: impl FnOnce(&git2::Error) -> String,
    ) -> ForgeResult<T> {
        let done = git_http::with_token(web_url, token, op)
            .map_err(|e| ForgeError::Local(e.to_string()))?;
        done.value.map_err(|e| {
            let msg = msg(&e);
            if done.token_refused {
                ForgeError::Auth(msg)
            } else {
                GithubForge::git_error(&e, msg)
            }
        })
    }

    /// Clone the repository into `dest` (which must not exist) over HTTPS,
    /// the token sent by [`git_http`] only: the clone's
    /// `origin` is [`Self::clone_url`], without credentials. The clone is
    /// made in a temporary directory next to `dest` and renamed into place,
    /// so a failed clone leaves nothing behind. When the remote's default
    /// branch is not `base`, a local `base` is created from `origin/base`.
    ///
    /// # Errors
    /// [`ForgeError::Auth`] when the token is refused, [`ForgeError::Transient`]
    /// for network failures, [`ForgeError::Local`] for disk failures, an
    /// existing `dest` or a missing `base` branch.
    pub async fn clone_into(&self, dest: &Path, base: &str) -> ForgeResult<()> {
        let dest = dest.to_path_buf();
        let base = base.to_string();
        let url = self.clone_url();
        let (web_url, token) = (self.opts.web_url.clone(), self.opts.token.clone());
        tokio::task::spawn_blocking(move || {
            GithubForge::clone_blocking(&url, &web_url, &token, &dest, &base)
        })
        .await
        .map_err(|e| ForgeError::Local(format!("clone task failed: {e}")))?
    }

    fn clone_blocking(
        url: &str,
        web_url: &str,
        token: &str,
        dest: &Path,
        base: &str,
    ) -> ForgeResult<()> {
        let local =
            |what: String| move |e: std::io::Error| ForgeError::Local(format!("{what}: {e}"));
        if dest.exists() {
            return Err(ForgeError::Local(format!(
                "cannot clone into {}: it already exists",
                dest.display()
            )));
        }
        let parent = dest.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)
            .map_err(local(format!("cannot create {}", parent.display())))?;
        let tmp = crate::store::atomic::staging_dir(parent, "clone-").map_err(local(format!(
            "cannot make a temporary directory in {}",
            parent.display()
        )))?;
        let staging = tmp.path().join("checkout");
        let repo = GithubForge::with_token(
            web_url,
            token,
            || git2::build::RepoBuilder::new().clone(url, &staging),
            |e| format!("cannot clone {url}: {}", e.message()),
        )?;
        if repo.find_branch(base, git2::BranchType::Local).is_err() {
            let remote = repo
                .find_reference(&format!("refs/remotes/origin/{base}"))
                .and_then(|r| r.peel_to_commit())
                .map_err(|e| {
                    ForgeError::Local(format!(
                        "the clone of {url} has no branch {base:?} (main_branch): {}",
                        e.message()
                    ))
                })?;
            repo.branch(base, &remote, false).map_err(|e| {
                ForgeError::Local(format!("cannot create branch {base}: {}", e.message()))
            })?;
        }
        drop(repo);
        std::fs::rename(&staging, dest).map_err(local(format!(
            "cannot move the clone to {}",
            dest.display()
        )))?;
        tracing::info!(url, dest = %dest.display(), "cloned the repository");
        Ok(())
    }

    fn refresh_blocking(
        repo_path: &Path,
        base: &str,
        url: &str,
        web_url: &str,
        token: &str,
    ) -> ForgeResult<()> {
        let ctx = |what: &str| {
            let what = format!("{what} in {}", repo_path.display());
            move |e: git2::Error| ForgeError::Local(format!("{what}: {}", e.message()))
        };
        let repo = git2::Repository::open(repo_path).map_err(ctx("cannot open the checkout"))?;
        // An anonymous remote lives only in memory: nothing reaches .git/config.
        let mut remote = repo
            .remote_anonymous(url)
            .map_err(ctx("cannot set up the remote"))?;
        let tracking = format!("refs/remotes/origin/{base}");
        let refspec = format!("+refs/heads/{base}:{tracking}");
        GithubForge::with_token(
            web_url,
            token,
            || remote.fetch(&[refspec.as_str()], None, None),
            |e| format!("cannot fetch {base} from {url}: {}", e.message()),
        )?;
        drop(remote);
        let fetched = repo
            .find_reference(&tracking)
            .and_then(|r| r.peel_to_commit())
            .map_err(ctx(&format!("cannot read {tracking}")))?;
        let local_ref = format!("refs/heads/{base}");
        let mut local = repo
            .find_reference(&local_ref)
            .map_err(ctx(&format!("cannot read {local_ref}")))?;
        let local_id = local
            .peel_to_commit()
            .map_err(ctx(&format!("cannot read {local_ref}")))?
            .id();
        if local_id == fetched.id()
            || repo
                .graph_descendant_of(local_id, fetched.id())
                .unwrap_or(false)
        {
            return Ok(());
        }
        if !repo
            .graph_descendant_of(fetched.id(), local_id)
            .unwrap_or(false)
        {
            tracing::warn!(
                base,
                checkout = %repo_path.display(),
                "the checkout's base branch has diverged from the forge's; worktrees start from the local one"
            );
            return Ok(());
        }
        let head_is_base = repo
            .head()
            .ok()
            .and_then(|h| h.name().ok().map(str::to_string))
            .is_some_and(|h| h == local_ref);
        if head_is_base && !repo.is_bare() {
            // Update the working tree too, refusing to overwrite local changes.
            let mut checkout = git2::build::CheckoutBuilder::new();
            checkout.safe();
            if let Err(e) = repo.checkout_tree(fetched.as_object(), Some(&mut checkout)) {
                tracing::warn!(
                    base,
                    checkout = %repo_path.display(),
                    error = e.message(),
                    "cannot fast-forward the checkout (local changes?); worktrees start from the local base"
                );
                return Ok(());
            }
        }
        local
            .set_target(fetched.id(), &format!("hydraflow: fast-forward {base}"))
            .map_err(ctx(&format!("cannot fast-forward {local_ref}")))?;
        tracing::info!(base, sha = %fetched.id(), "fast-forwarded the base branch");
        Ok(())
    }

    /// Push `branch` to `url`; run inside [`Self::with_token`].
    fn push_blocking(repo: &Path, branch: &str, url: &str) -> Result<(), git2::Error> {
        let repository = git2::Repository::open(repo)?;
        // An anonymous remote lives only in memory: nothing reaches .git/config.
        let mut remote = repository.remote_anonymous(url)?;
        let rejected: std::cell::RefCell<Option<String>> = std::cell::RefCell::new(None);
        let mut callbacks = git2::RemoteCallbacks::new();
        callbacks.push_update_reference(|name, status| {
            if let Some(s) = status {
                *rejected.borrow_mut() = Some(format!("{name}: {s}"));
            }
            Ok(())
        });
        let mut push = git2::PushOptions::new();
        push.remote_callbacks(callbacks);
        let refspec = format!("+refs/heads/{branch}:refs/heads/{branch}");
        remote.push(&[refspec.as_str()], Some(&mut push))?;
        drop(push);
        if let Some(reason) = rejected.into_inner() {
            return Err(git2::Error::from_str(&format!("push rejected: {reason}")));
        }
        Ok(())
    }
}

fn enc(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
}

#[async_trait]
impl Forge for GithubForge {
    fn name(&self) -> &'static str {
        "github"
    }

    async fn list_issues(&self, labels: &[String]) -> ForgeResult<Vec<Issue>> {
        // GitHub's `labels=a,b` means "all of"; "any of" takes one listing per label.
        let mut seen = std::collections::BTreeMap::new();
        for label in labels {
            let url = self.repo_url(&format!(
                "/issues?state=open&labels={}&per_page=100",
                enc(label)
            ));
            let issues: Vec<IssueJson> = self.get_all(url, "issue listing").await?;
            for issue in issues.into_iter().filter(|i| i.pull_request.is_none()) {
                seen.entry(issue.number)
                    .or_insert_with(|| issue.into_issue());
            }
        }
        let mut out = Vec::with_capacity(seen.len());
        for issue in seen.into_values() {
            if !self.opts.collaborators_only || self.is_collaborator(&issue.author).await? {
                out.push(issue);
            } else {
                tracing::debug!(number = issue.number, author = %issue.author, "skipping issue of a non-collaborator");
            }
        }
        Ok(out)
    }

    async fn get_issue(&self, number: u64) -> ForgeResult<IssueDetail> {
        let what = format!("issue #{number}");
        let reply = self
            .send(
                Method::GET,
                &self.repo_url(&format!("/issues/{number}")),
                None,
            )
            .await?
            .ok(&what)?;
        let json = reply.json::<IssueJson>(&what)?;
        // The issue carries its comment count: listing none would be a wasted request.
        let comments: Vec<CommentJson> = if json.comments == Some(0) {
            Vec::new()
        } else {
            self.get_all(
                self.repo_url(&format!("/issues/{number}/comments?per_page=100")),
                &format!("comments of issue #{number}"),
            )
            .await?
        };
        let issue = json.into_issue();
        Ok(IssueDetail {
            issue,
            comments: comments
                .into_iter()
                .map(|c| Comment {
                    author: c.user.map(|u| u.login).unwrap_or_default(),
                    body: c.body.unwrap_or_default(),
                    created_at: c.created_at,
                })
                .collect(),
        })
    }

    async fn add_label(&self, number: u64, label: &str) -> ForgeResult<()> {
        let body = json!({ "labels": [label] });
        self.send(
            Method::POST,
            &self.repo_url(&format!("/issues/{number}/labels")),
            Some(&body),
        )
        .await?
        .ok(&format!("adding label {label:?} to issue #{number}"))?;
        Ok(())
    }

    async fn remove_label(&self, number: u64, label: &str) -> ForgeResult<()> {
        let url = self.repo_url(&format!("/issues/{number}/labels/{}", enc(label)));
        let reply = self.send(Method::DELETE, &url, None).await?;
        if reply.status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        reply.ok(&format!("removing label {label:?} from issue #{number}"))?;
        Ok(())
    }

    async fn ensure_labels(&self, labels: &[LabelSpec]) -> ForgeResult<()> {
        let existing: Vec<LabelJson> = self
            .get_all(self.repo_url("/labels?per_page=100"), "label listing")
            .await?;
        for spec in labels {
            if existing
                .iter()
                .any(|l| l.name.eq_ignore_ascii_case(&spec.name))
            {
                continue;
            }
            let body = json!({
                "name": spec.name,
                "color": spec.color.trim_start_matches('#'),
                "description": spec.description,
            });
            let reply = self
                .send(Method::POST, &self.repo_url("/labels"), Some(&body))
                .await?;
            // 422 already_exists: created meanwhile by another worker.
            if reply.status == StatusCode::UNPROCESSABLE_ENTITY
                && reply.body.contains("already_exists")
            {
                continue;
            }
            reply.ok(&format!("creating label {:?}", spec.name))?;
        }
        Ok(())
    }

    async fn comment(&self, number: u64, body: &str) -> ForgeResult<()> {
        let url = self.repo_url(&format!("/issues/{number}/comments"));
        for piece in split_comment(body, COMMENT_LIMIT) {
            self.send(Method::POST, &url, Some(&json!({ "body": piece })))
                .await?
                .ok(&format!("commenting on issue #{number}"))?;
        }
        Ok(())
    }

    async fn close_issue(&self, number: u64) -> ForgeResult<()> {
        let body = json!({ "state": "closed", "state_reason": "completed" });
        self.send(
            Method::PATCH,
            &self.repo_url(&format!("/issues/{number}")),
            Some(&body),
        )
        .await?
        .ok(&format!("closing issue #{number}"))?;
        Ok(())
    }

    async fn push_branch(&self, repo: &Path, branch: &str) -> ForgeResult<()> {
        let repo = repo.to_path_buf();
        let branch_owned = branch.to_string();
        let url = self.clone_url();
        let (web_url, token) = (self.opts.web_url.clone(), self.opts.token.clone());
        tokio::task::spawn_blocking(move || {
            GithubForge::with_token(
                &web_url,
                &token,
                || GithubForge::push_blocking(&repo, &branch_owned, &url),
                |e| {
                    format!(
                        "cannot push {branch_owned} from {}: {}",
                        repo.display(),
                        e.message()
                    )
                },
            )
        })
        .await
        .map_err(|e| ForgeError::Local(format!("push task failed: {e}")))?
    }

    async fn find_or_create_pull_request(&self, req: &NewPullRequest) -> ForgeResult<PullRequest> {
        let list_url = self.repo_url(&format!(
            "/pulls?state=open&head={}&base={}&per_page=100",
            enc(&format!("{}:{}", self.opts.owner, req.head)),
            enc(&req.base)
        ));
        let find = || async {
            let open: Vec<PullJson> = self
                .get_all(list_url.clone(), "pull request listing")
                .await?;
            ForgeResult::Ok(open.into_iter().find(|p| p.head.name == req.head))
        };
        // Create first: the pull request is new in the common case, and GitHub
        // refuses a second open one for the same head (422 with a `custom`
        // error "A pull request already exists for …"), which is when the
        // listing is needed. Any 422 is checked against the listing, so the
        // wording of the error does not matter.
        let body = json!({
            "title": req.title,
            "head": req.head,
            "base": req.base,
            "body": req.body,
        });
        let reply = self
            .send(Method::POST, &self.repo_url("/pulls"), Some(&body))
            .await?;
        if reply.status == StatusCode::UNPROCESSABLE_ENTITY
            && let Some(pr) = find().await?
        {
            return Ok(pr.into_pull());
        }
        let what = format!("creating the pull request for {}", req.head);
        Ok(reply.ok(&what)?.json::<PullJson>(&what)?.into_pull())
    }

    async fn get_pull_request(&self, number: u64) -> ForgeResult<PullRequest> {
        let mut pr = self.fetch_pull(number).await?;
        let mut polls = 0;
        while pr.mergeable.is_none()
            && pr.state == PullRequestState::Open
            && polls < self.opts.mergeable_polls
        {
            polls += 1;
            tokio::time::sleep(self.opts.mergeable_poll_delay).await;
            pr = self.fetch_pull(number).await?;
        }
        Ok(pr)
    }

    async fn checks(&self, sha: &str) -> ForgeResult<ChecksSummary> {
        let what = format!("check runs of {sha}");
        let mut runs = Vec::new();
        let mut next =
            Some(self.repo_url(&format!("/commits/{}/check-runs?per_page=100", enc(sha))));
        while let Some(url) = next.take() {
            let reply = self.send(Method::GET, &url, None).await?.ok(&what)?;
            runs.extend(reply.json::<CheckRunsJson>(&what)?.check_runs);
            next = reply.header("link").and_then(next_link);
        }
        let what = format!("combined status of {sha}");
        let status: CombinedStatusJson = self
            .send(
                Method::GET,
                &self.repo_url(&format!("/commits/{}/status", enc(sha))),
                None,
            )
            .await?
            .ok(&what)?
            .json(&what)?;
        let runs: Vec<CheckRunView<'_>> = runs
            .iter()
            .map(|run| CheckRunView {
                name: &run.name,
                status: &run.status,
                conclusion: run.conclusion.as_deref(),
                summary: run.output.as_ref().and_then(|o| o.summary.as_deref()),
            })
            .collect();
        let statuses: Vec<CommitStatusView<'_>> = status
            .statuses
            .iter()
            .map(|s| CommitStatusView {
                context: &s.context,
                state: &s.state,
                description: s.description.as_deref(),
            })
            .collect();
        Ok(summarise_checks(&runs, &statuses))
    }

    async fn post_review(&self, number: u64, event: ReviewEvent, body: &str) -> ForgeResult<()> {
        let event = match event {
            ReviewEvent::Approve => "APPROVE",
            ReviewEvent::RequestChanges => "REQUEST_CHANGES",
            ReviewEvent::Comment => "COMMENT",
        };
        let body = json!({ "event": event, "body": body });
        self.send(
            Method::POST,
            &self.repo_url(&format!("/pulls/{number}/reviews")),
            Some(&body),
        )
        .await?
        .ok(&format!("reviewing pull request #{number}"))?;
        Ok(())
    }

    async fn list_reviews(&self, number: u64) -> ForgeResult<Vec<Review>> {
        let what = format!("reviews of pull request #{number}");
        let reply = self
            .send(
                Method::GET,
                &self.repo_url(&format!("/pulls/{number}/reviews?per_page=100")),
                None,
            )
            .await?
            .ok(&what)?;
        Ok(reply
            .json::<Vec<ReviewJson>>(&what)?
            .into_iter()
            .filter_map(ReviewJson::into_review)
            .collect())
    }

    async fn merge_pull_request(&self, number: u64, title: &str) -> ForgeResult<MergeOutcome> {
        let pr = self.fetch_pull(number).await?;
        if pr.state != PullRequestState::Open {
            return Err(ForgeError::Rejected(format!(
                "pull request #{number} is {:?}, not open",
                pr.state
            )));
        }
        let body = json!({
            "merge_method": "squash",
            "commit_title": format!("{title} (#{number})"),
            "sha": pr.head_sha,
        });
        let what = format!("merging pull request #{number}");
        let reply = self
            .send(
                Method::PUT,
                &self.repo_url(&format!("/pulls/{number}/merge")),
                Some(&body),
            )
            .await?;
        let merged: MergeJson = reply.ok(&what)?.json(&what)?;
        let reply = self
            .send(
                Method::DELETE,
                &self.repo_url(&format!(
                    "/git/refs/heads/{}",
                    pr.head.split('/').map(enc).collect::<Vec<_>>().join("/")
                )),
                None,
            )
            .await?;
        // Already gone (404/422 "Reference does not exist"): fine.
        if !reply.status.is_success()
            && reply.status != StatusCode::NOT_FOUND
            && reply.status != StatusCode::UNPROCESSABLE_ENTITY
        {
            tracing::warn!(
                number,
                status = reply.status.as_u16(),
                "cannot delete the merged branch"
            );
        }
        Ok(MergeOutcome { sha: merged.sha })
    }

    async fn refresh_base(&self, repo: &Path, base: &str) -> ForgeResult<()> {
        let _guard = self.git_lock.lock().await;
        let (repo, base) = (repo.to_path_buf(), base.to_string());
        let url = self.clone_url();
        let (web_url, token) = (self.opts.web_url.clone(), self.opts.token.clone());
        tokio::task::spawn_blocking(move || {
            GithubForge::refresh_blocking(&repo, &base, &url, &web_url, &token)
        })
        .await
        .map_err(|e| ForgeError::Local(format!("fetch task failed: {e}")))?
    }

    fn rate_budget(&self) -> Option<RateBudget> {
        self.budget.lock().ok().and_then(|b| *b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_token(cred: Option<&str>, env: &[(&str, &str)], expected: Option<&str>) {
        let got = resolve_token(cred.map(str::to_string), |k| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        });
        assert_eq!(got.as_deref(), expected, "cred {cred:?} env {env:?}");
    }

    #[test]
    fn token_resolution_order() {
        check_token(Some("cred\n"), &[("GH_TOKEN", "g")], Some("cred"));
        check_token(Some("  "), &[("GH_TOKEN", "g")], Some("g"));
        check_token(None, &[("GITHUB_TOKEN", "x"), ("GH_TOKEN", "g")], Some("g"));
        check_token(
            None,
            &[("GITHUB_TOKEN", "x"), ("HYDRAFLOW_GH_TOKEN", "h")],
            Some("h"),
        );
        check_token(None, &[("GITHUB_TOKEN", "x")], Some("x"));
        check_token(
            None,
            &[("HYDRAFLOW_GH_TOKEN", ""), ("GITHUB_TOKEN", "x")],
            Some("x"),
        );
        check_token(None, &[], None);
    }

    fn check_split(body: &str, limit: usize, expected: &[&str]) {
        let got = split_comment(body, limit);
        assert_eq!(got, expected, "body {body:?} limit {limit}");
        assert_eq!(got.concat(), body);
    }

    #[test]
    fn comment_splitting() {
        check_split("", 5, &[""]);
        check_split("abc", 5, &["abc"]);
        check_split("abcde", 5, &["abcde"]);
        check_split("abcdef", 5, &["abcde", "f"]);
        check_split("ab\ncdef", 5, &["ab\n", "cdef"]);
        check_split("\nabcdef", 5, &["\nabcd", "ef"]);
        check_split("ééééé€", 5, &["ééééé", "€"]);
        let big = "x".repeat(COMMENT_LIMIT * 2 + 1);
        let pieces = split_comment(&big, COMMENT_LIMIT);
        assert_eq!(
            pieces.iter().map(|p| p.chars().count()).collect::<Vec<_>>(),
            [COMMENT_LIMIT, COMMENT_LIMIT, 1]
        );
    }

    fn check_link(header: &str, expected: Option<&str>) {
        assert_eq!(next_link(header).as_deref(), expected, "{header}");
    }

    #[test]
    fn link_header() {
        check_link(
            r#"<https://api.github.com/repositories/1000/issues?per_page=3&page=2>; rel="next", <https://api.github.com/repositories/1000/issues?per_page=3&page=5>; rel="last""#,
            Some("https://api.github.com/repositories/1000/issues?per_page=3&page=2"),
        );
        check_link(
            r#"<https://x/a?page=1>; rel="prev", <https://x/a?page=1>; rel="first""#,
            None,
        );
        check_link("", None);
        check_link("garbage", None);
    }
}
