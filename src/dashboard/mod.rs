//! The dashboards (docs/design/dashboard.md): each worker's API on a Unix socket
//! in its runtime directory ([`worker`]), and the supervisor's dashboard on
//! TCP that lists every repository, proxies to each worker's socket, fans
//! in their events and serves the web page ([`supervisor`]), and GitHub's
//! webhook deliveries, which wake the worker of their repository ([`webhook`]).
//!
//! Where a worker's socket is: under the packaged units, the socket
//! `hydraflow@<slug>.socket` listens on (`/run/hydraflow-dashboard/<slug>.sock`,
//! owned by the supervisor's user `hydraflow`, mode 0600) and passes to the
//! worker as the descriptor named `dashboard` (socket activation), so the
//! supervisor can connect although the worker runs as its own dynamic user.
//! Without socket activation the worker binds one itself (mode 0600, its own
//! user): `$RUNTIME_DIRECTORY/dashboard.sock` when systemd set
//! `RuntimeDirectory=`, else `data_root/<slug>/dashboard.sock`.
//!
//! **Invariant:** route handlers are one-line adapters into plain functions
//! ([`worker::api`]); only this module speaks HTTP.

pub mod auth;
pub mod client;
pub mod supervisor;
pub mod webhook;
pub mod worker;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::layout::Layout;

/// File name of a worker's API socket.
pub const SOCKET_NAME: &str = "dashboard.sock";

/// Where the worker of `layout` listens: `$RUNTIME_DIRECTORY/dashboard.sock`
/// under systemd (the first directory when several are listed), else
/// `data_root/<slug>/dashboard.sock`.
pub fn worker_socket_path(layout: &Layout) -> PathBuf {
    match crate::systemd::runtime_directory() {
        Some(dir) => dir.join(SOCKET_NAME),
        None => layout.repo_dir().join(SOCKET_NAME),
    }
}

/// The directory of the workers' activation sockets (`hydraflow@.socket`'s
/// `ListenStream=`): one directory for every instance, apart from the
/// instances' `RuntimeDirectory=` (removed when a worker stops).
pub const SYSTEMD_SOCKET_DIR: &str = "/run/hydraflow-dashboard";

/// The `FileDescriptorName=` of the worker API's socket in
/// `hydraflow@.socket`, as `$LISTEN_FDNAMES` names it (sd_listen_fds_with_names(3)).
pub const ACTIVATION_NAME: &str = "dashboard";

/// Where the supervisor finds the worker of `slug` under systemd:
/// `/run/hydraflow-dashboard/<slug>.sock`, the `ListenStream=` of
/// `hydraflow@<slug>.socket` (owned by the supervisor's user).
pub fn systemd_socket_path(slug: &str) -> PathBuf {
    Path::new(SYSTEMD_SOCKET_DIR).join(format!("{slug}.sock"))
}

/// Where the supervisor finds the worker of `slug` under the process
/// backend: `<state_dir>/<slug>/dashboard.sock`, the worker's
/// `data_root/<slug>/` being its instance directory.
pub fn process_socket_path(state_dir: &Path, slug: &str) -> PathBuf {
    state_dir.join(slug).join(SOCKET_NAME)
}

/// Bind a Unix socket at `path` readable and writable only by this user (and
/// root): bound under a temporary name, set to mode 0600, then renamed into
/// place, so no other user can connect in between. A stale socket at `path`
/// is replaced.
///
/// # Errors
/// I/O errors naming the path.
pub fn bind_private_socket(path: &Path) -> Result<tokio::net::UnixListener, DashboardError> {
    let io = |source| DashboardError::Bind {
        address: path.display().to_string(),
        cause: source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let tmp = dir.join(format!(".{SOCKET_NAME}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = tokio::net::UnixListener::bind(&tmp).map_err(io)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(listener)
}

/// The worker API's listener from `fd`, a socket passed by socket activation
/// (the one named [`ACTIVATION_NAME`]); returns it with its path. Made
/// non-blocking for tokio; call it inside the runtime.
///
/// # Errors
/// [`DashboardError::Activated`] when `fd` is not a Unix socket bound to a path.
pub fn activated_socket(
    fd: std::os::fd::OwnedFd,
) -> Result<(tokio::net::UnixListener, PathBuf), DashboardError> {
    let bad = |source| DashboardError::Activated { cause: source };
    let listener = std::os::unix::net::UnixListener::from(fd);
    let path = listener
        .local_addr()
        .map_err(bad)?
        .as_pathname()
        .map(Path::to_path_buf)
        .ok_or_else(|| {
            bad(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the socket has no path: expected ListenStream=<path> in hydraflow@.socket",
            ))
        })?;
    listener.set_nonblocking(true).map_err(bad)?;
    let listener = tokio::net::UnixListener::from_std(listener).map_err(bad)?;
    Ok((listener, path))
}

/// Why a dashboard could not start.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    /// The socket or address could not be bound.
    #[error("cannot listen on {address}: {cause}")]
    Bind {
        /// The socket path or TCP address.
        address: String,
        /// The OS error.
        cause: std::io::Error,
    },
    /// The descriptor named `dashboard` by socket activation is not a
    /// listening Unix socket with a path.
    #[error(
        "the socket passed as {ACTIVATION_NAME:?} (LISTEN_FDNAMES) is not usable as the worker API: {cause}"
    )]
    Activated {
        /// What was wrong with it.
        cause: std::io::Error,
    },
    /// A TCP address that is not loopback without an access token.
    #[error(
        "refusing to listen on {address} without an access token: set dashboard.token (HYDRAFLOW_DASHBOARD_TOKEN) or listen on 127.0.0.1"
    )]
    TokenRequired {
        /// The address asked for.
        address: String,
    },
    /// An address that does not parse.
    #[error("dashboard address {address:?} is not valid: expected HOST:PORT, e.g. 127.0.0.1:5555")]
    Address {
        /// The address given.
        address: String,
    },
}

/// Bind a TCP dashboard at `address`; a non-loopback address needs `token`.
///
/// # Errors
/// [`DashboardError`] for a bad address, a missing token or a failed bind.
pub async fn bind_tcp(
    address: &str,
    token: Option<&str>,
) -> Result<tokio::net::TcpListener, DashboardError> {
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host(address)
        .await
        .map_err(|_| DashboardError::Address {
            address: address.to_owned(),
        })?
        .collect();
    if addrs.is_empty() {
        return Err(DashboardError::Address {
            address: address.to_owned(),
        });
    }
    if token.is_none_or(str::is_empty) && !addrs.iter().all(|a| a.ip().is_loopback()) {
        return Err(DashboardError::TokenRequired {
            address: address.to_owned(),
        });
    }
    tokio::net::TcpListener::bind(&addrs[..])
        .await
        .map_err(|source| DashboardError::Bind {
            address: address.to_owned(),
            cause: source,
        })
}

/// An API error: an HTTP status and a message, sent as `{"error": message}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong and what to do.
    pub message: String,
}

impl ApiError {
    /// 400.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
    /// 404.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }
    /// 409.
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, message)
    }
    /// 500.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
    /// Any status.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": self.message}))).into_response()
    }
}

/// The fallback route: a JSON 404 naming the path.
pub async fn no_route(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route for {}", uri.path()))
}
