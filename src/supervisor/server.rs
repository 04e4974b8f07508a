//! The server of the control protocol, on TCP (the original's clients) and on the Unix control
//! socket (the `hydraflow` CLI): one JSON line in, one out, then close (unless the request
//! asked for `keep_alive`); a `ping` already waiting when the connection is accepted is
//! answered in place (and a `list_repos` too while access control is off), anything else gets
//! a task of its own. A bounded number of connections is served at once; a silent client is
//! dropped after the idle timeout; a line over [`MAX_LINE`] bytes is refused. Handlers are
//! one-line adapters into [`Supervisor`].
//!
//! Access: every action needs a [`Right`] ([`right`]); `ping` and `version` are open, so they
//! need no lookup of the caller. For the others the caller is looked up once per connection,
//! in the connection's task, never on the accept path: `SO_PEERCRED` for the Unix socket, the
//! kernel's socket diagnostics for TCP ([`crate::access::peer`]); a refusal is the error reply
//! `permission denied: <user> may not <action>`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::FutureExt as _;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::Supervisor;
use super::protocol::{Action, Done, MAX_LINE, OK_LINE, Reply, Request, Response};
use crate::access::{Access, Caller, Right, peer};

/// How connections are handled.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout: Duration,
    /// Most connections served by tasks at once; more are answered with an error and closed.
    /// (A `ping` or `list_repos` answered in place, the moment it is accepted, needs no task
    /// and is not counted.)
    pub max_connections: usize,
    /// On shutdown, how long requests in flight may take before they are cut off.
    pub shutdown_grace: Duration,
}

impl Default for ServerOptions {
    /// 5 s idle timeout, 256 connections, 5 s shutdown grace.
    fn default() -> Self {
        ServerOptions {
            idle_timeout: Duration::from_secs(5),
            max_connections: 256,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// The right an action needs: `ping` and `version` are open, `list_repos` and `repo_status` read,
/// the rest manage.
pub fn right(action: &Action) -> Right {
    match action {
        Action::Ping | Action::Version => Right::Open,
        Action::ListRepos | Action::RepoStatus(_) | Action::ForgeStatus => Right::Read,
        Action::AddRepo { .. }
        | Action::RegisterRepo { .. }
        | Action::RemoveRepo(_)
        | Action::RestartRepo(_) => Right::Manage,
    }
}

/// What the server listens on: TCP, the Unix control socket, or both.
#[derive(Debug, Default)]
pub struct Listeners {
    /// The TCP listener (the original's clients), when TCP is on.
    pub tcp: Option<TcpListener>,
    /// The Unix control socket, when there is one.
    pub unix: Option<UnixListener>,
}

impl From<TcpListener> for Listeners {
    fn from(tcp: TcpListener) -> Listeners {
        Listeners {
            tcp: Some(tcp),
            unix: None,
        }
    }
}

/// A connected stream of either listener, with the non-blocking calls of the fast path.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn try_read(&self, buf: &mut [u8]) -> std::io::Result<usize>;
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize>;
}

impl Conn for TcpStream {
    fn try_read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        TcpStream::try_read(self, buf)
    }
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        TcpStream::try_write(self, buf)
    }
}

impl Conn for UnixStream {
    fn try_read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        UnixStream::try_read(self, buf)
    }
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        UnixStream::try_write(self, buf)
    }
}

/// Who is at the other end of a connection: known at accept (a Unix socket's `SO_PEERCRED`) or
/// looked up when first needed (TCP), then kept for the connection's life.
enum Peer {
    /// Known.
    Known(Caller),
    /// A TCP connection not looked up yet.
    Tcp {
        /// The connection's local (server) address.
        server: std::net::SocketAddr,
        /// The client's address.
        client: std::net::SocketAddr,
        /// Whether the listener is bound to a loopback address.
        loopback: bool,
    },
}

impl Peer {
    /// The caller, looked up on first use.
    fn caller(&mut self) -> &Caller {
        if let Peer::Tcp {
            server,
            client,
            loopback,
        } = *self
        {
            *self = Peer::Known(peer::tcp_caller(server, client, loopback));
        }
        match self {
            Peer::Known(caller) => caller,
            Peer::Tcp { .. } => unreachable!("looked up above"),
        }
    }
}

/// Answer one action; `connections` is the number being served now.
pub async fn dispatch(sup: &Supervisor, action: Action, connections: usize) -> Response {
    let result = match action {
        Action::Ping => Ok(Reply::Done(Done {})),
        Action::Version => Ok(Reply::Version(sup.version(connections))),
        Action::ListRepos => sup.list_repos().await.map(Reply::Repos),
        Action::AddRepo { target, slug } => sup.add_repo(target, slug).await.map(Reply::Added),
        Action::RegisterRepo { target, slug } => {
            sup.register_repo(target, slug).await.map(Reply::Registered)
        }
        Action::RemoveRepo(r) => sup.remove_repo(r).await.map(|()| Reply::Done(Done {})),
        Action::RestartRepo(r) => sup
            .restart_repo(r)
            .await
            .map(|s| Reply::Status(Box::new(s))),
        Action::RepoStatus(r) => sup.repo_status(r).await.map(|s| Reply::Status(Box::new(s))),
        Action::ForgeStatus => Ok(Reply::Forges(sup.forge_status().await)),
    };
    match result {
        Ok(reply) => Response::Ok(reply),
        Err(err) => Response::error(err.to_string()),
    }
}

/// One reply line: shared (the cached `list_repos` reply, a constant) or made for this request.
enum Line {
    Shared(Arc<[u8]>),
    Static(&'static [u8]),
    Owned(Vec<u8>),
}

impl Line {
    fn bytes(&self) -> &[u8] {
        match self {
            Line::Shared(b) => b,
            Line::Static(b) => b,
            Line::Owned(b) => b,
        }
    }
}

/// The reply line to one action: `ping` and `list_repos` (from the supervisor's cache) without
/// serialising anything, the rest through [`dispatch`].
async fn answer(sup: &Supervisor, action: Action, connections: usize) -> Line {
    match action {
        Action::Ping => Line::Static(OK_LINE),
        Action::ListRepos => match sup.list_repos_line().await {
            Ok(line) => Line::Shared(line),
            Err(err) => Line::Owned(Response::error(err.to_string()).to_line()),
        },
        other => Line::Owned(dispatch(sup, other, connections).await.to_line()),
    }
}

/// Accept on `listener` when there is one; never resolves without.
async fn accept_tcp(listener: Option<&TcpListener>) -> std::io::Result<TcpStream> {
    match listener {
        Some(l) => l.accept().await.map(|(stream, _)| stream),
        None => std::future::pending().await,
    }
}

/// Accept on the Unix control socket when there is one; never resolves without.
async fn accept_unix(listener: Option<&UnixListener>) -> std::io::Result<UnixStream> {
    match listener {
        Some(l) => l.accept().await.map(|(stream, _)| stream),
        None => std::future::pending().await,
    }
}

/// What every connection shares.
struct Shared {
    supervisor: Arc<Supervisor>,
    access: Arc<Access>,
    permits: Arc<Semaphore>,
    refusals: Arc<Semaphore>,
    active: Arc<AtomicUsize>,
    opts: ServerOptions,
}

impl Shared {
    /// Take a new connection: answer it in place when possible, else give it a task (or refuse
    /// it when over the limit).
    fn admit<S: Conn>(&self, stream: S, peer: Peer, tasks: &mut JoinSet<()>) {
        // The original's clients send their one line right after connecting: when it is
        // already here and answered from memory, reply and close in place.
        let (stream, prefix) = match answer_at_once(stream, &self.supervisor, &self.access) {
            AtOnce::Answered => return,
            AtOnce::Rest(stream, rest) => {
                tasks.spawn(finish_reply(stream, rest));
                return;
            }
            AtOnce::Serve(stream, prefix) => (stream, prefix),
        };
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            // Over the limit: answer with an error from a task of its own (bounded too), so
            // that the reply is read before the close; beyond that, close.
            if let Ok(permit) = self.refusals.clone().try_acquire_owned() {
                let max = self.opts.max_connections;
                tasks.spawn(async move {
                    refuse(stream, max).await;
                    drop(permit);
                });
            }
            return;
        };
        let sup = self.supervisor.clone();
        let access = self.access.clone();
        let active = self.active.clone();
        let idle = self.opts.idle_timeout;
        tasks.spawn(async move {
            active.fetch_add(1, Ordering::Relaxed);
            let mut peer = peer;
            connection(stream, prefix, &sup, &access, &mut peer, idle, &active).await;
            active.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

/// Serve `listeners` until `shutdown` resolves, then stop accepting, give requests in flight
/// [`ServerOptions::shutdown_grace`] and cut off the rest. `access` decides who may do what.
///
/// # Errors
/// Only a failure of a listener itself that is not about one connection.
pub async fn serve(
    listeners: impl Into<Listeners>,
    supervisor: Arc<Supervisor>,
    access: Arc<Access>,
    opts: ServerOptions,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let Listeners { tcp, unix } = listeners.into();
    let loopback = tcp
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .is_some_and(|a| a.ip().to_canonical().is_loopback());
    let shared = Shared {
        supervisor,
        access,
        permits: Arc::new(Semaphore::new(opts.max_connections)),
        refusals: Arc::new(Semaphore::new(opts.max_connections)),
        active: Arc::new(AtomicUsize::new(0)),
        opts,
    };
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = accept_tcp(tcp.as_ref()) => match accepted {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    let peer = match (stream.local_addr(), stream.peer_addr()) {
                        (Ok(server), Ok(client)) => Peer::Tcp { server, client, loopback },
                        (Err(e), _) | (_, Err(e)) => Peer::Known(Caller {
                            identity: crate::access::Identity::Unknown(format!(
                                "cannot read the connection's addresses: {e}"
                            )),
                            from: "tcp".into(),
                        }),
                    };
                    shared.admit(stream, peer, &mut tasks);
                }
                Err(e) => accept_failed(e).await,
            },
            accepted = accept_unix(unix.as_ref()) => match accepted {
                Ok(stream) => {
                    // SO_PEERCRED: the kernel kept the peer's credentials at connect; reading
                    // them is one getsockopt, not a lookup.
                    let peer = Peer::Known(peer::unix_caller(&stream));
                    shared.admit(stream, peer, &mut tasks);
                }
                Err(e) => accept_failed(e).await,
            },
        }
    }
    drop(tcp);
    drop(unix);
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(shared.opts.shutdown_grace, drain)
        .await
        .is_err()
    {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    Ok(())
}

/// Per-connection failures (ECONNABORTED) and running out of descriptors: wait a little and
/// go on.
async fn accept_failed(e: std::io::Error) {
    tracing::warn!("accept failed: {e}");
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// What [`answer_at_once`] did with a new connection.
enum AtOnce<S> {
    /// Replied in full; the connection is closed.
    Answered,
    /// Replied in part (the socket buffer is full): the rest is to be written by a task.
    Rest(S, Vec<u8>),
    /// Not answerable in place: serve it with [`connection`], which first reads the bytes
    /// already taken from the socket.
    Serve(S, Vec<u8>),
}

/// The fast path for one-shot clients: when a whole `ping` line (or, while access control is
/// off, `list_repos`), without `keep_alive`, is already in the socket's buffer and [`answer`]
/// is ready at once (`ping` always, `list_repos` when its cached line is current), write the
/// reply and close, without a task, a timer or a second poll. Anything else, and a line not
/// yet complete, goes to [`connection`] with what was read. Only actions without side effects
/// and that need no lookup of the caller are answered here, because a reply that is not ready
/// at once is dropped unfinished.
fn answer_at_once<S: Conn>(stream: S, sup: &Supervisor, access: &Access) -> AtOnce<S> {
    let mut buf = [0u8; 512];
    let n = match stream.try_read(&mut buf) {
        Ok(n) => n,
        Err(_) => return AtOnce::Serve(stream, Vec::new()),
    };
    let got = &buf[..n];
    let one_line = got.iter().position(|&b| b == b'\n') == Some(n.wrapping_sub(1));
    let request = one_line.then(|| Request::parse(got).ok()).flatten();
    let action = match request {
        Some(Request {
            action: action @ (Action::Ping | Action::ListRepos),
            keep_alive: false,
        }) if !access.needs_caller(right(&action)) => action,
        _ => return AtOnce::Serve(stream, got.to_vec()),
    };
    let Some(line) = answer(sup, action, 1).now_or_never() else {
        return AtOnce::Serve(stream, got.to_vec());
    };
    let bytes = line.bytes();
    match stream.try_write(bytes) {
        Ok(written) if written == bytes.len() => AtOnce::Answered,
        Ok(written) => AtOnce::Rest(stream, bytes[written..].to_vec()),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            AtOnce::Rest(stream, bytes.to_vec())
        }
        Err(_) => AtOnce::Answered,
    }
}

/// Write the rest of a reply [`answer_at_once`] began, then close.
async fn finish_reply(mut stream: impl Conn, rest: Vec<u8>) {
    let write = async {
        stream.write_all(&rest).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
}

/// Tell a client over the connection limit to try again, and close.
async fn refuse(mut stream: impl Conn, max: usize) {
    let line = Response::error(format!("too many connections ({max}): try again")).to_line();
    let _ = stream.write_all(&line).await;
    let _ = stream.shutdown().await;
    drain(&mut stream, Duration::from_secs(1)).await;
}

/// Read and discard what the client still sends, until it closes or for at most `limit`, so
/// that closing does not reset the connection before the client has read the reply.
async fn drain(reader: &mut (impl AsyncReadExt + Unpin), limit: Duration) {
    let mut sink = [0u8; 8192];
    let _ = tokio::time::timeout(limit, async {
        while matches!(reader.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

/// Serve one connection: requests until one without `keep_alive`, EOF, an error or silence.
/// `prefix` holds bytes already read from the socket (by [`answer_at_once`]). The caller is
/// looked up when the first request that needs a right comes, and what it was allowed is
/// remembered for the connection.
async fn connection<S: Conn>(
    stream: S,
    prefix: Vec<u8>,
    sup: &Supervisor,
    access: &Access,
    peer: &mut Peer,
    idle: Duration,
    active: &AtomicUsize,
) {
    // Requests are short: a small buffer, grown by read_until for a long line. Replies are
    // written to the stream under the reader.
    let mut reader = BufReader::with_capacity(1024, std::io::Cursor::new(prefix).chain(stream));
    let mut line = Vec::with_capacity(256);
    let mut allowed: Vec<Right> = Vec::new();
    loop {
        line.clear();
        let limit = u64::try_from(MAX_LINE).unwrap_or(u64::MAX) + 1;
        let mut limited = (&mut reader).take(limit);
        let read = limited.read_until(b'\n', &mut line);
        match tokio::time::timeout(idle, read).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(_)) => {}
        }
        let complete = line.last() == Some(&b'\n');
        if !complete && line.len() > MAX_LINE {
            let reply = Response::error(format!(
                "request line longer than {MAX_LINE} bytes: send one JSON object per line"
            ));
            let writer = reader.get_mut().get_mut().1;
            let _ = writer.write_all(&reply.to_line()).await;
            let _ = writer.shutdown().await;
            drain(&mut reader, idle.min(Duration::from_secs(1))).await;
            return;
        }
        let (response, keep_alive) = match Request::parse(&line) {
            Ok(request) => {
                let needs = right(&request.action);
                let permitted = if access.needs_caller(needs) && !allowed.contains(&needs) {
                    let result = access
                        .authorize(peer.caller(), needs, request.action.name())
                        .await;
                    if result.is_ok() {
                        allowed.push(needs);
                    }
                    result
                } else {
                    Ok(())
                };
                match permitted {
                    Ok(()) => (
                        answer(sup, request.action, active.load(Ordering::Relaxed)).await,
                        request.keep_alive,
                    ),
                    Err(denied) => (
                        Line::Owned(Response::error(denied.to_string()).to_line()),
                        request.keep_alive,
                    ),
                }
            }
            Err(bad) => (Line::Owned(Response::error(bad.0).to_line()), false),
        };
        let writer = reader.get_mut().get_mut().1;
        if writer.write_all(response.bytes()).await.is_err() {
            return;
        }
        if !keep_alive || !complete {
            break;
        }
    }
    let _ = reader.get_mut().get_mut().1.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rights_of_actions() {
        let check = |line: &str, expected: Right| {
            let request = Request::parse(line.as_bytes()).expect(line);
            assert_eq!(right(&request.action), expected, "{line}");
        };
        check(r#"{"action":"ping"}"#, Right::Open);
        check(r#"{"action":"version"}"#, Right::Open);
        check(r#"{"action":"list_repos"}"#, Right::Read);
        check(r#"{"action":"repo_status","slug":"s"}"#, Right::Read);
        check(r#"{"action":"add_repo","path":"/a"}"#, Right::Manage);
        check(r#"{"action":"register_repo","repo":"o/n"}"#, Right::Manage);
        check(r#"{"action":"remove_repo","slug":"s"}"#, Right::Manage);
        check(r#"{"action":"restart_repo","slug":"s"}"#, Right::Manage);
    }
}
