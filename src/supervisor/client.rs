//! The client side of the control protocol, as the original client does it: find the port
//! (`$HF_SUPERVISOR_PORT_FILE`, else `<state dir>/supervisor-port`, else 8765), connect to
//! `127.0.0.1`, send one line, read the reply until the server closes the connection.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value};

use super::protocol::{MAX_LINE, Request, parse_reply};
use super::{DEFAULT_PORT, port_file};

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the address.
    #[error(
        "the supervisor is not running (nothing listens on {addr}): systemctl start hydraflow-supervisor, or run `hydraflow supervisor`"
    )]
    NotRunning {
        /// The address tried.
        addr: SocketAddr,
    },
    /// No reply within the timeout.
    #[error(
        "the supervisor at {addr} did not answer within {} s: see `journalctl -u hydraflow-supervisor` (or its log), then try again",
        .timeout.as_secs_f64()
    )]
    TimedOut {
        /// The address.
        addr: SocketAddr,
        /// How long the client waited.
        timeout: Duration,
    },
    /// Connecting, sending or reading failed.
    #[error("cannot talk to the supervisor at {addr}: {source}")]
    Io {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The reply could not be read.
    #[error("{0}")]
    BadReply(String),
    /// The supervisor answered with an error.
    #[error("{0}")]
    Refused(String),
}

/// The supervisor's address: the port in the port file when there is one, else 8765.
pub fn discover(state_dir: &Path) -> SocketAddr {
    let port = std::fs::read_to_string(port_file(state_dir))
        .ok()
        .and_then(|s| s.trim().parse::<u16>().ok())
        .unwrap_or(DEFAULT_PORT);
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Send `request` to `addr` and return the fields of the `ok` reply.
///
/// # Errors
/// [`ClientError::Refused`] with the supervisor's error text, else why there was no reply.
pub fn call(
    addr: SocketAddr,
    request: &Request,
    timeout: Duration,
) -> Result<Map<String, Value>, ClientError> {
    let io = |source| ClientError::Io { addr, source };
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => ClientError::NotRunning { addr },
            _ => io(e),
        })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.write_all(&request.to_line()).map_err(io)?;
    let mut reply = Vec::new();
    let limit = u64::try_from(16 * MAX_LINE).unwrap_or(u64::MAX);
    (&mut stream)
        .take(limit)
        .read_to_end(&mut reply)
        .map_err(|e| match e.kind() {
            // A read timeout (SO_RCVTIMEO) shows as EAGAIN: "Resource temporarily unavailable".
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                ClientError::TimedOut { addr, timeout }
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
        let err = call(addr, &request, Duration::from_millis(200)).expect_err("no answer");
        let _held = holder.join().expect("join");
        assert!(matches!(err, ClientError::TimedOut { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("did not answer within 0.2 s") && text.contains("journalctl"),
            "{text}"
        );
    }
}
