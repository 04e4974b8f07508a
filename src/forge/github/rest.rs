//! The REST client of the GitHub forge: one request at a time through
//! octocrab's raw `execute` (not its typed builders), so that every
//! response's status and headers are seen here. That is what conditional
//! requests (`ETag` / `If-None-Match`: a 304 costs no budget), the
//! `x-ratelimit-*` accounting, `Retry-After` handling and the mapping to
//! [`ForgeError`] need (<https://docs.github.com/en/rest/using-the-rest-api/best-practices-for-using-the-rest-api>).
//! Retries use `backon` (jittered exponential backoff; a rate limit's own
//! wait replaces the backoff delay). A tokio semaphore caps concurrent
//! requests per process.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backon::{ExponentialBuilder, Retryable};
use http::header::{
    ACCEPT, AUTHORIZATION, ETAG, HeaderMap, HeaderValue, IF_NONE_MATCH, RETRY_AFTER,
};
use http::{Method, StatusCode};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::Semaphore;

use super::auth::Auth;
use crate::forge::{ForgeError, ForgeResult, RateBudget};

/// Characters escaped in a path segment or query value.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// `s` escaped as one path segment or query value.
pub(super) fn enc(s: &str) -> String {
    utf8_percent_encode(s, COMPONENT).to_string()
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

/// How a request is retried.
#[derive(Debug, Clone, Copy)]
pub(super) struct RetryPolicy {
    /// Retries after a transient failure or a rate limit.
    pub(super) max_retries: usize,
    /// Longest rate-limit wait slept inside a call.
    pub(super) max_retry_wait: Duration,
    /// First backoff delay after a transient failure.
    pub(super) min_backoff: Duration,
}

/// A response with its body read.
/// A response with its body read.
pub(super) struct Reply {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: String,
}

/// Send the request `builder` describes (with `body` as JSON) through
/// `client` and read the whole reply: the one place octocrab's raw
/// `execute` is called, for the REST client and the App's own requests.
///
/// # Errors
/// [`ForgeError::Local`] when the request cannot be built,
/// [`ForgeError::Transient`] when it cannot be sent or its body read.
pub(super) async fn exchange<B: serde::Serialize + ?Sized>(
    client: &octocrab::Octocrab,
    builder: http::request::Builder,
    body: Option<&B>,
    what: &str,
) -> ForgeResult<Reply> {
    let request = client
        .build_request(builder, body)
        .map_err(|e| ForgeError::Local(format!("{what}: cannot build the request: {e}")))?;
    let response = client
        .execute(request)
        .await
        .map_err(|e| ForgeError::Transient(format!("{what}: {e}")))?;
    let (parts, raw) = response.into_parts();
    let body = client
        .body_to_string(http::Response::new(raw))
        .await
        .map_err(|e| ForgeError::Transient(format!("{what}: cannot read the body: {e}")))?;
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

impl Reply {
    pub(super) fn json<T: DeserializeOwned>(&self, what: &str) -> ForgeResult<T> {
        serde_json::from_str(&self.body)
            .map_err(|e| ForgeError::Transient(format!("malformed response to {what}: {e}")))
    }

    pub(super) fn message(&self) -> String {
        serde_json::from_str::<Value>(&self.body)
            .ok()
            .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| self.body.chars().take(200).collect())
    }

    /// Map a status the caller did not handle to an error.
    pub(super) fn fail(&self, what: &str) -> ForgeError {
        let msg = format!("{what}: {} {}", self.status.as_u16(), self.message());
        match self.status.as_u16() {
            404 | 410 => ForgeError::NotFound(msg),
            405 | 409 => ForgeError::MergeConflict(msg),
            s if s >= 500 => ForgeError::Transient(msg),
            _ => ForgeError::Rejected(msg),
        }
    }

    pub(super) fn ok(self, what: &str) -> ForgeResult<Reply> {
        if self.status.is_success() {
            Ok(self)
        } else {
            Err(self.fail(what))
        }
    }

    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Classify a 403/429: bad credentials, a rate limit (with its wait), or a
/// refusal (missing permission).
pub(super) fn classify_forbidden(reply: &Reply, what: &str) -> ForgeError {
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

/// The REST client of one forge.
pub(super) struct Rest {
    /// Without credentials of its own: each request carries the token of
    /// [`Rest::auth`] (so an App's installation token can change).
    client: octocrab::Octocrab,
    /// Who requests are made as.
    pub(super) auth: Auth,
    /// The API base URL without a trailing slash.
    pub(super) api: String,
    semaphore: Semaphore,
    /// Last `(etag, body)` per GET URL, for conditional requests.
    etags: Mutex<HashMap<String, (String, String)>>,
    budget: Mutex<Option<RateBudget>>,
    retry: RetryPolicy,
}

impl Rest {
    /// A client of the API at `api_url` authenticated by `auth`; no request
    /// is sent.
    ///
    /// # Errors
    /// [`ForgeError::Local`] when the API URL is not a valid URI or the HTTP
    /// client cannot be built.
    pub(super) fn new(
        api_url: &str,
        auth: Auth,
        max_concurrent_requests: usize,
        retry: RetryPolicy,
    ) -> ForgeResult<Rest> {
        let api = api_url.trim_end_matches('/').to_string();
        let client = octocrab::Octocrab::builder()
            .base_uri(api.as_str())
            .map_err(|e| ForgeError::Local(format!("github.api_url {api:?} is not a URI: {e}")))?
            .set_connect_timeout(Some(Duration::from_secs(10)))
            .set_read_timeout(Some(Duration::from_secs(60)))
            .build()
            .map_err(|e| ForgeError::Local(format!("cannot build the GitHub client: {e}")))?;
        Ok(Rest {
            client,
            auth,
            api,
            semaphore: Semaphore::new(max_concurrent_requests.max(1)),
            etags: Mutex::new(HashMap::new()),
            budget: Mutex::new(None),
            retry,
        })
    }

    /// The budget the last response announced.
    pub(super) fn budget(&self) -> Option<RateBudget> {
        self.budget.lock().ok().and_then(|b| *b)
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

    /// One request as it goes out: the token, conditional when `cached`.
    async fn exchange(
        &self,
        method: &Method,
        url: &str,
        body: Option<&Value>,
        token: &str,
        cached: Option<&(String, String)>,
        what: &str,
    ) -> ForgeResult<Reply> {
        let mut authorization =
            HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                ForgeError::Auth(format!("{what}: the token is not a valid header value"))
            })?;
        authorization.set_sensitive(true);
        let mut builder = http::Request::builder()
            .method(method.clone())
            .uri(url)
            .header(ACCEPT, "application/vnd.github+json")
            .header(AUTHORIZATION, authorization)
            .header("x-github-api-version", "2022-11-28");
        if let Some((etag, _)) = cached {
            builder = builder.header(IF_NONE_MATCH, etag.as_str());
        }
        exchange(&self.client, builder, body, what).await
    }

    /// One request, no retry. GETs are conditional: a 304 is answered with the
    /// cached body. A 401 to an App's installation token drops the token and
    /// sends the request once more with a new one (GitHub revoked it). 401,
    /// 403, 429, 5xx and network failures become errors; other statuses are
    /// returned for the caller to judge.
    async fn send_once(
        &self,
        method: &Method,
        url: &str,
        body: Option<&Value>,
    ) -> ForgeResult<Reply> {
        let what = format!("{method} {}", url.strip_prefix(&self.api).unwrap_or(url));
        if !url.starts_with(&format!("{}/", self.api)) {
            // Never send the token elsewhere (a `Link` to another host).
            return Err(ForgeError::Transient(format!(
                "{what}: the URL is outside github.api_url {}",
                self.api
            )));
        }
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
        let token = self.auth.token(super::REFRESH_BEFORE).await?;
        let mut reply = self
            .exchange(method, url, body, &token, cached.as_ref(), &what)
            .await?;
        if reply.status == StatusCode::UNAUTHORIZED && self.auth.refused(&token) {
            let token = self.auth.token(super::REFRESH_BEFORE).await?;
            reply = self
                .exchange(method, url, body, &token, cached.as_ref(), &what)
                .await?;
        }
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
                    "{what}: GitHub rejected the token (401 {}): {}",
                    reply.message(),
                    self.auth.advice()
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
    pub(super) async fn send(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
    ) -> ForgeResult<Reply> {
        let max_wait = self.retry.max_retry_wait;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.retry.min_backoff)
            .with_max_delay(max_wait.max(self.retry.min_backoff))
            .with_max_times(self.retry.max_retries)
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
    pub(super) async fn get_all<T: DeserializeOwned>(
        &self,
        first: String,
        what: &str,
    ) -> ForgeResult<Vec<T>> {
        let mut items = Vec::new();
        let mut next = Some(first);
        while let Some(url) = next.take() {
            let reply = self.send(Method::GET, &url, None).await?.ok(what)?;
            items.extend(reply.json::<Vec<T>>(what)?);
            next = reply.header("link").and_then(next_link);
        }
        Ok(items)
    }
}
