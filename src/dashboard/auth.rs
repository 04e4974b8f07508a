//! Access control of the TCP dashboards: when a token is configured every
//! request must carry it, as `Authorization: Bearer <token>` or as the
//! `hydraflow_token` cookie (set by visiting `/login?token=<token>`).
//! The Unix sockets rely on file permissions instead (mode 0600).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};

use super::ApiError;

/// Name of the cookie that carries the token.
pub const COOKIE: &str = "hydraflow_token";

/// Compare without an early exit on the first differing byte.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token a request carries (bearer header first, then the cookie).
pub fn presented(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        && let Some(t) = v.strip_prefix("Bearer ")
    {
        return Some(t.trim().to_owned());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// Middleware: pass when no token is configured or the request carries it;
/// `/login?token=…` with the right token sets the cookie and redirects to `/`.
pub async fn require_token(
    State(token): State<Option<Arc<str>>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = token else {
        return next.run(request).await;
    };
    if request.uri().path() == "/login" {
        let given = request
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == "token")
            .map(|(_, v)| {
                percent_encoding::percent_decode_str(v)
                    .decode_utf8_lossy()
                    .into_owned()
            });
        return match given {
            Some(t) if same(t.as_bytes(), token.as_bytes()) => (
                [(
                    header::SET_COOKIE,
                    format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"),
                )],
                Redirect::to("/"),
            )
                .into_response(),
            _ => ApiError::new(StatusCode::UNAUTHORIZED, "wrong or missing token").into_response(),
        };
    }
    match presented(request.headers()) {
        Some(t) if same(t.as_bytes(), token.as_bytes()) => next.run(request).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "wrong access token").into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "an access token is required: send Authorization: Bearer <token>, or visit /login?token=<token>",
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_found_in_header_or_cookie() {
        let check = |name: header::HeaderName, value: &str, expected: Option<&str>| {
            let mut h = HeaderMap::new();
            h.insert(name, value.parse().expect("header value"));
            assert_eq!(presented(&h).as_deref(), expected, "{value}");
        };
        check(header::AUTHORIZATION, "Bearer abc", Some("abc"));
        check(header::AUTHORIZATION, "Basic abc", None);
        check(header::COOKIE, "a=1; hydraflow_token=xyz", Some("xyz"));
        check(header::COOKIE, "hydraflow_tokenx=1", None);
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }
}
