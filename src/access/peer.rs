//! Who is calling: the user behind a connection, as the kernel reports it.
//!
//! - A Unix socket's peer: `SO_PEERCRED` (unix(7)), the credentials of the process that
//!   connected (UID and PID).
//! - A TCP connection: the UID that owns the client's end, found with the kernel's socket
//!   diagnostics (sock_diag(7): `NETLINK_SOCK_DIAG`, one exact `inet_diag` lookup of the
//!   connection's addresses and ports; what `ss -e` shows as `uid:`). Only a client on this host
//!   has such a socket; an SSH tunnel's connection belongs to the tunnelling user's `sshd`.
//!
//! A peer whose UID cannot be read is [`Identity::Unknown`], with the reason, and is treated
//! as nobody: a socket the client already closed (the kernel no longer ties it to a process: a
//! closed socket in `TIME_WAIT` or orphaned in `FIN_WAIT` reports UID 0 and inode 0, so those
//! are refused, never read as root), a connection from another host, or a lookup that failed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::{Socket, SocketAddr as NetlinkAddr, protocols::NETLINK_SOCK_DIAG};

/// Who a connection's peer is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// The kernel named the peer's user.
    Known {
        /// The peer's UID.
        uid: u32,
        /// The peer's PID (Unix sockets; a TCP connection has none).
        pid: Option<u32>,
    },
    /// The peer's user cannot be known; the text says why. Treated as nobody.
    Unknown(String),
}

/// A connection's peer: who, and from where (for messages and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Who.
    pub identity: Identity,
    /// Where the connection came from: `unix socket` or the client's address.
    pub from: String,
}

impl Caller {
    /// The caller's UID, when known.
    pub fn uid(&self) -> Option<u32> {
        match self.identity {
            Identity::Known { uid, .. } => Some(uid),
            Identity::Unknown(_) => None,
        }
    }

    /// The caller's PID, when known (Unix sockets).
    pub fn pid(&self) -> Option<u32> {
        match self.identity {
            Identity::Known { pid, .. } => pid,
            Identity::Unknown(_) => None,
        }
    }
}

/// The peer of a connected Unix stream socket, from `SO_PEERCRED`.
pub fn unix_caller(stream: &tokio::net::UnixStream) -> Caller {
    let identity = match stream.peer_cred() {
        Ok(cred) => Identity::Known {
            uid: cred.uid(),
            pid: cred
                .pid()
                .and_then(|p| u32::try_from(p).ok())
                .filter(|&p| p != 0),
        },
        Err(e) => Identity::Unknown(format!("SO_PEERCRED failed: {e}")),
    };
    Caller {
        identity,
        from: "unix socket".into(),
    }
}

/// The peer of an accepted TCP connection (`server` is the connection's local address, `client`
/// its peer's). `loopback_listener`: the listening socket is bound to a loopback address, so a
/// client address that is not loopback came through address translation from elsewhere and is
/// nobody without a lookup.
pub fn tcp_caller(server: SocketAddr, client: SocketAddr, loopback_listener: bool) -> Caller {
    let from = client.to_string();
    let client_ip = client.ip().to_canonical();
    let identity = if loopback_listener && !client_ip.is_loopback() {
        Identity::Unknown(format!(
            "the connection from {client} is not from this host's loopback"
        ))
    } else {
        match tcp_socket_owner(client, server) {
            Ok(Some(uid)) => Identity::Known { uid, pid: None },
            Ok(None) => Identity::Unknown(format!(
                "no open socket on this host is the client's end of the connection from {client} \
                 (closed already, or the client is on another host)"
            )),
            Err(e) => Identity::Unknown(format!(
                "cannot look up the owner of the connection from {client} (sock_diag): {e}"
            )),
        }
    };
    Caller { identity, from }
}

/// One netlink socket for every lookup, opened on first use; requests are short and answered
/// while they are sent, so a lock held for one send and one receive serialises them.
static DIAG: Mutex<Option<Socket>> = Mutex::new(None);
/// Sequence numbers of requests, to match replies.
static SEQ: AtomicU32 = AtomicU32::new(1);

/// Largest reply of one exact lookup (the header and a few attributes; one page is plenty).
const REPLY_BUFFER: usize = 8192;

fn open_diag() -> std::io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    // The kernel answers a sock_diag request while it is being sent; a reply that is not
    // there right after the send is not coming, and waiting for it must not stall the server.
    socket.set_non_blocking(true)?;
    Ok(socket)
}

/// The UID owning the TCP socket on this host whose local address is `local` and whose peer
/// is `remote` (for the client's end of an accepted connection: the connection's peer address
/// and the server's address). `None` when no open socket has them: none exists (the client is
/// elsewhere), or it is closed (`TIME_WAIT`, or orphaned: inode 0).
///
/// # Errors
/// The netlink socket cannot be opened, or the kernel's answer cannot be read.
pub fn tcp_socket_owner(local: SocketAddr, remote: SocketAddr) -> std::io::Result<Option<u32>> {
    let (family, source, destination) =
        match (local.ip().to_canonical(), remote.ip().to_canonical()) {
            (l @ IpAddr::V4(_), r @ IpAddr::V4(_)) => (AF_INET, l, r),
            _ => (
                AF_INET6,
                IpAddr::V6(match local.ip() {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                }),
                IpAddr::V6(match remote.ip() {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                }),
            ),
        };
    let mut socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    socket_id.source_address = source;
    socket_id.source_port = local.port();
    socket_id.destination_address = destination;
    socket_id.destination_port = remote.port();
    // INET_DIAG_NOCOOKIE: any socket with these addresses, whatever its cookie.
    socket_id.cookie = [0xff; 8];
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let mut header = NetlinkHeader::default();
    // No NLM_F_DUMP: an exact lookup of one socket (inet_diag_find_one_icsk).
    header.flags = NLM_F_REQUEST;
    header.sequence_number = seq;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id,
        })
        .into(),
    );
    request.finalize();
    let mut out = vec![0; request.buffer_len()];
    request.serialize(&mut out);

    let mut guard = DIAG
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if guard.is_none() {
        *guard = Some(open_diag()?);
    }
    let Some(socket) = guard.as_ref() else {
        return Err(std::io::Error::other("no netlink socket"));
    };
    let result = exchange(socket, &out, seq);
    if result.is_err() {
        // A socket in an unknown state (a stale reply queued): open a fresh one next time.
        *guard = None;
    }
    result
}

/// Send one request and read its reply on `socket`.
fn exchange(socket: &Socket, request: &[u8], seq: u32) -> std::io::Result<Option<u32>> {
    socket.send(request, 0)?;
    let mut buf = Vec::with_capacity(REPLY_BUFFER);
    loop {
        buf.clear();
        let n = socket.recv(&mut buf, 0)?;
        let mut offset = 0;
        while offset < n {
            let message = <NetlinkMessage<SockDiagMessage>>::deserialize(&buf[offset..n])
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            let len = message.header.length as usize;
            if message.header.sequence_number == seq {
                return Ok(match message.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                        let h = &response.header;
                        // A closed socket: TIME_WAIT (and FIN_WAIT2 after close) are reported
                        // with UID 0 and inode 0; an orphaned full socket has inode 0 too.
                        (h.inode != 0).then_some(h.uid)
                    }
                    NetlinkPayload::Error(e) => match e.code.map(|c| -c.get()) {
                        Some(code) if code == nix::libc::ENOENT => None,
                        Some(code) => return Err(std::io::Error::from_raw_os_error(code)),
                        None => None,
                    },
                    _ => None,
                });
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn the_owner_of_a_loopback_client_socket_is_this_process_s_user() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (accepted, peer) = listener.accept().expect("accept");
        let server = accepted.local_addr().expect("local");
        let caller = tcp_caller(server, peer, true);
        assert_eq!(
            caller.identity,
            Identity::Known {
                uid: nix::unistd::geteuid().as_raw(),
                pid: None
            }
        );
        // Once the client has closed its end, nobody owns it any more.
        drop(client);
        let caller = tcp_caller(server, peer, true);
        assert!(
            matches!(caller.identity, Identity::Unknown(ref why) if why.contains("no open socket")),
            "{caller:?}"
        );
    }

    #[test]
    fn ipv6_loopback_clients_are_found_too() {
        let Ok(listener) = TcpListener::bind("[::1]:0") else {
            // No IPv6 on this host: nothing to look up.
            return;
        };
        let _client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (accepted, peer) = listener.accept().expect("accept");
        let caller = tcp_caller(accepted.local_addr().expect("local"), peer, true);
        assert_eq!(caller.uid(), Some(nix::unistd::geteuid().as_raw()));
    }

    #[test]
    fn a_client_that_is_not_on_loopback_is_nobody_on_a_loopback_listener() {
        let caller = tcp_caller(
            "127.0.0.1:8765".parse().expect("addr"),
            "192.0.2.7:40000".parse().expect("addr"),
            true,
        );
        assert!(
            matches!(caller.identity, Identity::Unknown(_)),
            "{caller:?}"
        );
        assert_eq!(caller.from, "192.0.2.7:40000");
    }

    #[test]
    fn a_tuple_no_socket_has_is_nobody() {
        // Port 1 on loopback: nothing is connected from there.
        let owner = tcp_socket_owner(
            "127.0.0.1:1".parse().expect("addr"),
            "127.0.0.1:2".parse().expect("addr"),
        )
        .expect("lookup");
        assert_eq!(owner, None);
    }

    #[tokio::test]
    async fn unix_peers_are_named_by_so_peercred() {
        let (a, _b) = tokio::net::UnixStream::pair().expect("pair");
        let caller = unix_caller(&a);
        assert_eq!(caller.uid(), Some(nix::unistd::geteuid().as_raw()));
        assert_eq!(caller.pid(), Some(std::process::id()));
    }
}
