//! Access control of the TCP dashboards (docs/design/access.md).
//!
//! - A connection from this host (its local address is loopback): the caller's UID decides,
//!   through [`Access`]: `GET` and `HEAD` need the read right, every other method the manage
//!   right (HITL corrections, runtime start and stop). The UID is looked up once per connection
//!   ([`Peer`]), when its first request needs it. A valid access token passes too.
//! - Any other connection (a non-loopback listener, which needs a token to start): the token,
//!   as `Authorization: Bearer <token>` or as the `hydraflow_token` cookie (set by visiting
//!   `/login?token=<token>`).
//!
//! A refusal is 403 with `{"error":"permission denied: <user> may not <METHOD> <path>"}`, logged
//! with the caller. Routes that authenticate themselves (a webhook's signature) are merged
//! outside the [`guard`] layer. The Unix sockets rely on file permissions instead (mode 0600).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::serve::{IncomingStream, Listener};

use super::ApiError;
use crate::access::{Access, Caller, Identity, Right, peer};

/// One TCP connection of a dashboard: its addresses, and its caller once looked up (axum's
/// connection info, made when the connection is accepted; the lookup waits for the first
/// request that needs it).
#[derive(Debug, Clone)]
pub struct Peer {
    /// The connection's local (server) address.
    pub server: SocketAddr,
    /// The client's address.
    pub client: SocketAddr,
    caller: Arc<OnceLock<Caller>>,
}

impl Peer {
    /// A connection between `server` and `client`.
    pub fn new(server: SocketAddr, client: SocketAddr) -> Peer {
        Peer {
            server,
            client,
            caller: Arc::default(),
        }
    }

    /// Whether the connection came to a loopback address (so from this host).
    pub fn is_loopback(&self) -> bool {
        self.server.ip().to_canonical().is_loopback()
    }

    /// The caller, looked up on first use (sock_diag) and kept for the connection.
    pub fn caller(&self) -> &Caller {
        self.caller
            .get_or_init(|| peer::tcp_caller(self.server, self.client, self.is_loopback()))
    }
}

/// A TCP listener whose connections have `TCP_NODELAY` set (small responses go out at once, not
/// after a delayed ACK), and whose connections carry a [`Peer`].
#[derive(Debug)]
pub struct NoDelay(pub tokio::net::TcpListener);

impl Listener for NoDelay {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = Listener::accept(&mut self.0).await;
        let _ = io.set_nodelay(true);
        (io, addr)
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

impl Connected<IncomingStream<'_, NoDelay>> for Peer {
    fn connect_info(stream: IncomingStream<'_, NoDelay>) -> Peer {
        let client = *stream.remote_addr();
        // Without its own address the connection counts as remote: the token decides.
        let server = stream
            .io()
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        Peer::new(server, client)
    }
}

/// How a TCP dashboard decides who may do what.
#[derive(Debug, Clone)]
pub struct Guard {
    /// The access token, when one is configured (required by non-loopback listeners).
    pub token: Option<Arc<str>>,
    /// Who may read and manage, for connections from this host.
    pub access: Arc<Access>,
}

/// The right a request needs: reading for `GET` and `HEAD`, managing for the rest.
pub fn right_of(method: &Method) -> Right {
    if method == Method::GET || method == Method::HEAD {
        Right::Read
    } else {
        Right::Manage
    }
}

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

/// `/login?token=…`: with the right token, set the cookie and redirect to `/`.
fn login(request: &Request, token: &str) -> Response {
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
    match given {
        Some(t) if same(t.as_bytes(), token.as_bytes()) => (
            [(
                header::SET_COOKIE,
                format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"),
            )],
            Redirect::to("/"),
        )
            .into_response(),
        _ => ApiError::new(StatusCode::UNAUTHORIZED, "wrong or missing token").into_response(),
    }
}

/// Middleware: a connection from this host passes with a valid token or when its caller holds
/// the request's right ([`right_of`]); any other connection needs the token (none configured:
/// it passes, which [`super::bind_tcp`] allows on loopback addresses only). `/login?token=…`
/// with the right token sets the cookie and redirects to `/`.
pub async fn guard(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    if let Some(token) = guard.token.as_deref()
        && request.uri().path() == "/login"
    {
        return login(&request, token);
    }
    let token_ok = match (guard.token.as_deref(), presented(request.headers())) {
        (Some(token), Some(t)) => Some(same(t.as_bytes(), token.as_bytes())),
        (Some(_), None) => None,
        (None, _) => Some(false),
    };
    if token_ok == Some(true) {
        return next.run(request).await;
    }
    let peer = request
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .map(|c| &c.0);
    // Served without connection info: the caller is unknown, and refused below.
    let local = peer.is_none_or(Peer::is_loopback);
    if !local {
        return match (guard.token.is_some(), token_ok) {
            (false, _) => next.run(request).await,
            (true, Some(_)) => {
                ApiError::new(StatusCode::UNAUTHORIZED, "wrong access token").into_response()
            }
            (true, None) => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "an access token is required: send Authorization: Bearer <token>, or visit /login?token=<token>",
            )
            .into_response(),
        };
    }
    let right = right_of(request.method());
    if !guard.access.needs_caller(right) {
        return next.run(request).await;
    }
    let unknown;
    let caller = match peer {
        Some(peer) => peer.caller(),
        None => {
            unknown = Caller {
                identity: Identity::Unknown("the connection's addresses are not known".into()),
                from: "tcp".into(),
            };
            &unknown
        }
    };
    let action = format!("{} {}", request.method(), request.uri().path());
    match guard.access.authorize(caller, right, &action).await {
        Ok(()) => next.run(request).await,
        Err(denied) => ApiError::new(StatusCode::FORBIDDEN, denied.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rights_of_methods() {
        for (method, right) in [
            (Method::GET, Right::Read),
            (Method::HEAD, Right::Read),
            (Method::POST, Right::Manage),
            (Method::PUT, Right::Manage),
            (Method::DELETE, Right::Manage),
            (Method::PATCH, Right::Manage),
            (Method::OPTIONS, Right::Manage),
        ] {
            assert_eq!(right_of(&method), right, "{method}");
        }
    }

    #[test]
    fn loopback_is_the_connection_s_local_address() {
        let peer = |server: &str| {
            Peer::new(
                server.parse().expect("addr"),
                "192.0.2.1:4000".parse().expect("addr"),
            )
        };
        assert!(peer("127.0.0.1:5555").is_loopback());
        assert!(peer("[::1]:5555").is_loopback());
        assert!(peer("[::ffff:127.0.0.1]:5555").is_loopback());
        assert!(!peer("192.0.2.2:5555").is_loopback());
        // A client from elsewhere on a loopback connection (translated) is nobody.
        assert!(matches!(
            peer("127.0.0.1:5555").caller().identity,
            Identity::Unknown(_)
        ));
    }

    /// `GET path` over TCP to `addr` with `token` (if any) as a bearer
    /// token: the status.
    async fn status_of(addr: SocketAddr, path: &str, token: Option<&str>) -> StatusCode {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut tx, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let mut request = axum::http::Request::get(path).header(header::HOST, "dashboard");
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request.body(axum::body::Body::empty()).expect("request");
        tx.send_request(request).await.expect("response").status()
    }

    /// A connection that came to a non-loopback address (as a listener on
    /// `0.0.0.0` sees a client on the network) needs the token on every
    /// guarded route, whoever the caller; routes merged outside the guard
    /// (the webhook's) need nothing. Real HTTP over a real socket; only the
    /// connection's addresses are given (the connection info the listener
    /// would attach, set by an `Extension` layer).
    #[tokio::test]
    async fn a_connection_from_elsewhere_needs_the_token_and_outside_routes_do_not() {
        let guard = Guard {
            token: Some(Arc::from("s3cret")),
            access: Arc::new(Access::off()),
        };
        let guarded = axum::Router::new()
            .route("/api/repos", axum::routing::get(|| async { "repos" }))
            .layer(axum::middleware::from_fn_with_state(guard, super::guard));
        let outside =
            axum::Router::new().route("/github/webhook", axum::routing::get(|| async { "hook" }));
        let from_elsewhere = Peer::new(
            "192.0.2.2:5555".parse().expect("addr"),
            "198.51.100.7:40000".parse().expect("addr"),
        );
        let app = outside
            .merge(guarded)
            .layer(axum::Extension(ConnectInfo(from_elsewhere)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });

        assert_eq!(
            status_of(addr, "/api/repos", None).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status_of(addr, "/api/repos", Some("wrong")).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status_of(addr, "/api/repos", Some("s3cret")).await,
            StatusCode::OK
        );
        assert_eq!(
            status_of(addr, "/github/webhook", None).await,
            StatusCode::OK
        );
    }

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
