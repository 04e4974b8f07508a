//! The TCP server of the control protocol: one JSON line in, one out, then close (unless the
//! request asked for `keep_alive`); a `ping` or `list_repos` already waiting when the
//! connection is accepted is answered in place, anything else gets a task of its own. A bounded number of
//! connections is served at once; a silent client is dropped after the idle timeout; a line
//! over [`MAX_LINE`] bytes is refused. Handlers are one-line adapters into [`Supervisor`].

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::FutureExt as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::Supervisor;
use super::protocol::{Action, Done, MAX_LINE, OK_LINE, Reply, Request, Response};

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

/// Serve `listener` until `shutdown` resolves, then stop accepting, give requests in flight
/// [`ServerOptions::shutdown_grace`] and cut off the rest.
///
/// # Errors
/// Only a failure of the listener itself that is not about one connection.
pub async fn serve(
    listener: TcpListener,
    supervisor: Arc<Supervisor>,
    opts: ServerOptions,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(opts.max_connections));
    let refusals = Arc::new(Semaphore::new(opts.max_connections));
    let active = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Per-connection failures (ECONNABORTED) and running out of
                        // descriptors: wait a little and go on.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                // The original's clients send their one line right after connecting: when it
                // is already here and answered from memory, reply and close in place.
                let (stream, prefix) = match answer_at_once(stream, &supervisor) {
                    AtOnce::Answered => continue,
                    AtOnce::Rest(stream, rest) => {
                        tasks.spawn(finish_reply(stream, rest));
                        continue;
                    }
                    AtOnce::Serve(stream, prefix) => (stream, prefix),
                };
                let _ = stream.set_nodelay(true);
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    // Over the limit: answer with an error from a task of its own (bounded
                    // too), so that the reply is read before the close; beyond that, close.
                    if let Ok(permit) = refusals.clone().try_acquire_owned() {
                        let max = opts.max_connections;
                        tasks.spawn(async move {
                            refuse(stream, max).await;
                            drop(permit);
                        });
                    }
                    continue;
                };
                let sup = supervisor.clone();
                let active = active.clone();
                let idle = opts.idle_timeout;
                tasks.spawn(async move {
                    active.fetch_add(1, Ordering::Relaxed);
                    connection(stream, prefix, &sup, idle, &active).await;
                    active.fetch_sub(1, Ordering::Relaxed);
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(opts.shutdown_grace, drain)
        .await
        .is_err()
    {
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    Ok(())
}

/// What [`answer_at_once`] did with a new connection.
enum AtOnce {
    /// Replied in full; the connection is closed.
    Answered,
    /// Replied in part (the socket buffer is full): the rest is to be written by a task.
    Rest(TcpStream, Vec<u8>),
    /// Not answerable in place: serve it with [`connection`], which first reads the bytes
    /// already taken from the socket.
    Serve(TcpStream, Vec<u8>),
}

/// The fast path for one-shot clients: when a whole `ping` or `list_repos` line (without
/// `keep_alive`) is already in the socket's buffer and [`answer`] is ready at once (`ping`
/// always, `list_repos` when its cached line is current), write the reply and close, without a
/// task, a timer or a second poll. Anything else, and a line not yet complete, goes to
/// [`connection`] with what was read. Only actions without side effects are answered here,
/// because a reply that is not ready at once is dropped unfinished.
fn answer_at_once(stream: TcpStream, sup: &Supervisor) -> AtOnce {
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
        }) => action,
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
async fn finish_reply(mut stream: TcpStream, rest: Vec<u8>) {
    let write = async {
        stream.write_all(&rest).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
}

/// Tell a client over the connection limit to try again, and close.
async fn refuse(stream: TcpStream, max: usize) {
    let (mut reader, mut writer) = stream.into_split();
    let line = Response::error(format!("too many connections ({max}): try again")).to_line();
    let _ = writer.write_all(&line).await;
    let _ = writer.shutdown().await;
    drain(&mut reader, Duration::from_secs(1)).await;
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
/// `prefix` holds bytes already read from the socket (by [`answer_at_once`]).
async fn connection(
    stream: TcpStream,
    prefix: Vec<u8>,
    sup: &Supervisor,
    idle: Duration,
    active: &AtomicUsize,
) {
    let mut stream = stream;
    let (reader, mut writer) = stream.split();
    // Requests are short: a small buffer, grown by read_until for a long line.
    let mut reader = BufReader::with_capacity(1024, std::io::Cursor::new(prefix).chain(reader));
    let mut line = Vec::with_capacity(256);
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
            let _ = writer.write_all(&reply.to_line()).await;
            let _ = writer.shutdown().await;
            drain(&mut reader, idle.min(Duration::from_secs(1))).await;
            return;
        }
        let (response, keep_alive) = match Request::parse(&line) {
            Ok(request) => (
                answer(sup, request.action, active.load(Ordering::Relaxed)).await,
                request.keep_alive,
            ),
            Err(bad) => (Line::Owned(Response::error(bad.0).to_line()), false),
        };
        if writer.write_all(response.bytes()).await.is_err() {
            return;
        }
        if !keep_alive || !complete {
            break;
        }
    }
    let _ = writer.shutdown().await;
}
