//! A client of a worker's API over its Unix socket: one HTTP/1.1 request
//! per connection (hyper), and the WebSocket event stream
//! (tokio-tungstenite). Used by the supervisor's dashboard, the tests and
//! the benchmarks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Body;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// Why a request to a worker failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be connected.
    #[error("cannot connect to the worker socket {path}: {cause}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        cause: std::io::Error,
    },
    /// The worker did not answer in time.
    #[error("the worker at {path} did not answer within {after:?}")]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// The time allowed.
        after: Duration,
    },
    /// HTTP failed (handshake, request or body).
    #[error("HTTP to the worker at {path} failed: {message}")]
    Http {
        /// The socket.
        path: PathBuf,
        /// What hyper said.
        message: String,
    },
    /// The WebSocket handshake or stream failed.
    #[error("WebSocket to the worker at {path} failed: {message}")]
    WebSocket {
        /// The socket.
        path: PathBuf,
        /// What tungstenite said.
        message: String,
    },
}

/// `work` on the worker at `socket`, given at most `timeout`.
async fn within<T>(
    socket: &Path,
    timeout: Duration,
    work: impl std::future::Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ClientError::Timeout {
            path: socket.to_path_buf(),
            after: timeout,
        })?
}

/// Connect to the worker API socket at `socket`.
async fn connect(socket: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(socket)
        .await
        .map_err(|cause| ClientError::Connect {
            path: socket.to_path_buf(),
            cause,
        })
}

/// Send `request` (its URI holds only a path and query) to the worker at
/// `socket`; the response headers must arrive within `timeout`. The body is
/// streamed.
///
/// # Errors
/// [`ClientError`] for connect failures, timeouts and HTTP errors.
pub async fn send(
    socket: &Path,
    mut request: Request<Body>,
    timeout: Duration,
) -> Result<Response<Incoming>, ClientError> {
    let http = |e: hyper::Error| ClientError::Http {
        path: socket.to_path_buf(),
        message: e.to_string(),
    };
    let work = async {
        let stream = connect(socket).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        request.headers_mut().insert(
            http::header::HOST,
            http::HeaderValue::from_static("localhost"),
        );
        sender.send_request(request).await.map_err(http)
    };
    within(socket, timeout, work).await
}

/// `GET`/`POST` `path` with an optional JSON body, reading the whole
/// response within `timeout`; returns the status and the body as JSON
/// (`null` when empty or not JSON).
///
/// # Errors
/// [`ClientError`] for connect failures, timeouts and HTTP errors.
pub async fn json(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<(StatusCode, serde_json::Value), ClientError> {
    let work = async {
        let mut builder = Request::builder().method(method).uri(path);
        let body = match body {
            Some(v) => {
                builder = builder.header(http::header::CONTENT_TYPE, "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let request = builder.body(body).map_err(|e| ClientError::Http {
            path: socket.to_path_buf(),
            message: e.to_string(),
        })?;
        let response = send(socket, request, timeout).await?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Http {
                path: socket.to_path_buf(),
                message: e.to_string(),
            })?
            .to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Ok((status, value))
    };
    within(socket, timeout, work).await
}

/// Send `request` over TCP to `address` (`HOST:PORT`) and read the whole
/// answer within `timeout`: the status and the body as JSON (`null` when
/// empty or not JSON). For `hydraflow webhook test`.
///
/// # Errors
/// What failed, as text: connecting, HTTP, or the time running out.
pub async fn tcp_json(
    address: &str,
    request: Request<Body>,
    timeout: Duration,
) -> Result<(StatusCode, serde_json::Value), String> {
    let work = async {
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| format!("cannot connect to {address}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        ))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("{address} did not answer within {timeout:?}"))?
}

/// A WebSocket over a worker's Unix socket.
pub type EventSocket = tokio_tungstenite::WebSocketStream<UnixStream>;

/// Open the worker's `/ws` (with `query`, e.g. `since=12`) within `timeout`.
///
/// # Errors
/// [`ClientError`] for connect failures, timeouts and handshake errors.
pub async fn events(
    socket: &Path,
    query: &str,
    timeout: Duration,
) -> Result<EventSocket, ClientError> {
    let work = async {
        let stream = connect(socket).await?;
        let url = if query.is_empty() {
            "ws://localhost/ws".to_owned()
        } else {
            format!("ws://localhost/ws?{query}")
        };
        let (ws, _) = tokio_tungstenite::client_async(url, stream)
            .await
            .map_err(|e| ClientError::WebSocket {
                path: socket.to_path_buf(),
                message: e.to_string(),
            })?;
        Ok(ws)
    };
    within(socket, timeout, work).await
}
