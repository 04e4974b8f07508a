//! The client side of the control protocol: find the supervisor, connect, send one line, read
//! the reply until the server closes the connection.
//!
//! Where: the Unix control socket first (`[supervisor] control_socket`, else
//! `<state dir>/control.sock`, then the packaged `/run/hydraflow/control.sock`), then TCP on
//! `127.0.0.1` as the original client does (the port in `$HF_SUPERVISOR_PORT_FILE`, else
//! `<state dir>/supervisor-port`, else 8765). A socket that is missing, refuses the connection
//! or that this user may not open (the packaged one is for `hydraflow-admin`) is passed over
//! for the next. `control_socket = ""` keeps the client on TCP.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use super::protocol::{MAX_LINE, Request, parse_reply};
use super::{DEFAULT_PORT, SYSTEM_CONTROL_SOCKET, default_control_socket, port_file};

/// Where a supervisor may listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix control socket.
    Unix(PathBuf),
    /// TCP.
    Tcp(SocketAddr),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "{}", path.display()),
            Endpoint::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens where the supervisor was looked for.
    #[error(
        "the supervisor is not running (nothing listens on {at}): systemctl start hydraflow-supervisor, or run `hydraflow supervisor`"
    )]
    NotRunning {
        /// Where it was looked for.
        at: String,
    },
    /// No reply within the timeout.
    #[error(
        "the supervisor at {at} did not answer within {} s: see `journalctl -u hydraflow-supervisor` (or its log), then try again",
        .timeout.as_secs_f64()
    )]
    TimedOut {
        /// The endpoint.
        at: Endpoint,
        /// How long the client waited.
        timeout: Duration,
    },
    /// Connecting, sending or reading failed.
    #[error("cannot talk to the supervisor at {at}: {cause}")]
    Io {
        /// The endpoint.
        at: Endpoint,
        /// The I/O error.
        cause: std::io::Error,
    },
    /// The reply could not be read.
    #[error("{0}")]
    BadReply(String),
    /// The supervisor answered with an error (a refusal reads `permission denied: …`).
    #[error("{0}")]
    Refused(String),
}

/// The supervisor's TCP address: the port in the port file when there is one, else 8765.
pub fn discover(state_dir: &Path) -> SocketAddr {
    let port = std::fs::read_to_string(port_file(state_dir))
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok())
        .unwrap_or(DEFAULT_PORT);
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Where to look for the supervisor, in order: `control_socket` when given (empty: no Unix
/// socket at all), else `<state dir>/control.sock` and `/run/hydraflow/control.sock`; then TCP.
pub fn endpoints(state_dir: &Path, control_socket: Option<&Path>) -> Vec<Endpoint> {
    let mut out = Vec::new();
    match control_socket {
        Some(path) if path.as_os_str().is_empty() => {}
        Some(path) => out.push(Endpoint::Unix(path.to_path_buf())),
        None => {
            out.push(Endpoint::Unix(default_control_socket(state_dir)));
            out.push(Endpoint::Unix(PathBuf::from(SYSTEM_CONTROL_SOCKET)));
        }
    }
    out.push(Endpoint::Tcp(discover(state_dir)));
    out
}

/// Whether a failed connect means "not here": try the next endpoint.
fn not_here(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound
            | std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::PermissionDenied
    )
}

/// Send `request` to the first of `endpoints` that takes the connection and return the fields
/// of the `ok` reply.
///
/// # Errors
/// [`ClientError::Refused`] with the supervisor's error text, else why there was no reply.
pub fn call(
    endpoints: &[Endpoint],
    request: &Request,
    timeout: Duration,
) -> Result<Map<String, Value>, ClientError> {
    let mut tried = Vec::new();
    for at in endpoints {
        let connected = match at {
            Endpoint::Unix(path) => UnixStream::connect(path).and_then(|s| {
                s.set_read_timeout(Some(timeout))?;
                Ok(exchange(at, &s, request, timeout))
            }),
            Endpoint::Tcp(addr) => TcpStream::connect_timeout(addr, Duration::from_secs(1))
                .and_then(|s| {
                    s.set_read_timeout(Some(timeout))?;
                    Ok(exchange(at, &s, request, timeout))
                }),
        };
        match connected {
            Ok(result) => return result,
            Err(e) if not_here(&e) => tried.push(at.to_string()),
            Err(source) => {
                return Err(ClientError::Io {
                    at: at.clone(),
                    cause: source,
                });
            }
        }
    }
    Err(ClientError::NotRunning {
        at: tried.join(", "),
    })
}

/// One request and its reply on a connected stream (its read timeout set).
fn exchange<S>(
    at: &Endpoint,
    stream: &S,
    request: &Request,
    timeout: Duration,
) -> Result<Map<String, Value>, ClientError>
where
    for<'a> &'a S: Read + Write,
{
    let io = |source| ClientError::Io {
        at: at.clone(),
        cause: source,
    };
    let mut writer = stream;
    writer.write_all(&request.to_line()).map_err(io)?;
    let mut reply = Vec::new();
    let limit = u64::try_from(16 * MAX_LINE).unwrap_or(u64::MAX);
    stream
        .take(limit)
        .read_to_end(&mut reply)
        .map_err(|e| match e.kind() {
            // A read timeout (SO_RCVTIMEO) shows as EAGAIN: "Resource temporarily unavailable".
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                ClientError::TimedOut {
                    at: at.clone(),
                    timeout,
                }
            }
            _ => io(e),
        })?;
    let line = reply.split(|&b| b == b'\n').next().unwrap_or_default();
    parse_reply(line)
        .map_err(|e| ClientError::BadReply(e.0))?
        .map_err(ClientError::Refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::protocol::Action;

    #[test]
    fn a_supervisor_that_never_answers_is_a_timeout_that_says_what_to_do() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Accept and hold the connection without answering.
        let holder = std::thread::spawn(move || listener.accept().map(|(stream, _)| stream));
        let request = Request {
            action: Action::Ping,
            keep_alive: false,
        };
        let err = call(&[Endpoint::Tcp(addr)], &request, Duration::from_millis(200))
            .expect_err("no answer");
        let _held = holder.join().expect("join");
        assert!(matches!(err, ClientError::TimedOut { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("did not answer within 0.2 s") && text.contains("journalctl"),
            "{text}"
        );
    }
}
