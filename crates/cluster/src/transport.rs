//! The inter-node transport: length-prefixed postcard frames over TCP, one
//! request and one response at a time per connection. Dialing and accepting
//! live here only, so that TLS (h-tls's transport layer) wraps these two
//! functions and nothing else.
//!
//! Frame: a 4-byte big-endian length, then that many bytes of postcard.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Mutex;

use crate::types::{Applied, Command, Member, NodeId, TypeConfig};

/// Largest frame accepted (a snapshot chunk or a batch of entries fits easily).
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// How long a dial may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// A request from one node (or `switchyard ctl`) to another.
#[derive(Debug, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
pub enum Request {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A command proposed on another node, for the leader to write.
    Write(Command),
    /// Adds a node as a voter (joint consensus), on the leader.
    Join(Member),
    /// Removes a node by name from the membership, on the leader.
    Leave(String),
    /// The node's view of the cluster.
    Status,
}

/// Why a forwarded request was not done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refused {
    /// This node is not the leader; the leader it knows of, if any.
    NotLeader(Option<Member>),
    Failed(String),
}

/// What a [`Request::Write`] returns: the entry's index and the outcome of
/// applying it (on the leader; every node computes the same).
pub type WriteResult = Result<(u64, Applied), Refused>;

#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    Write(WriteResult),
    Membership(Result<(), Refused>),
    Status(crate::Status),
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    value: &T,
) -> io::Result<()> {
    let body = postcard::to_stdvec(value).map_err(io::Error::other)?;
    if body.len() > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "frame too large",
        ));
    }
    let len = u32::try_from(body.len()).map_err(io::Error::other)?;
    let mut buf = Vec::with_capacity(body.len() + 4);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    w.flush().await
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin, T: DeserializeOwned>(
    r: &mut R,
) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = usize::try_from(u32::from_be_bytes(len)).map_err(io::Error::other)?;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "frame too large",
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    postcard::from_bytes(&body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Binds the inter-node listener.
pub async fn bind(addr: &str) -> io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Accepts one connection.
pub async fn accept(listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
    let (stream, peer) = listener.accept().await?;
    stream.set_nodelay(true)?;
    Ok((stream, peer))
}

/// Dials a node, from `source` when given: a node whose `[cluster] listen` is
/// a specific IP dials from that IP, so that a peer (or a fault-injecting proxy
/// in tests) can tell nodes apart by their source address.
pub async fn dial(addr: &str, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let connect = async {
        let Some(ip) = source else {
            return TcpStream::connect(addr).await;
        };
        let target = tokio::net::lookup_host(addr)
            .await?
            .find(|a| a.is_ipv4() == ip.is_ipv4())
            .ok_or_else(|| io::Error::other(format!("{addr} has no address of {ip}'s family")))?;
        let socket = if ip.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(ip, 0))?;
        socket.connect(target).await
    };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {addr} timed out"),
            )
        })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One request and its response on a fresh connection (`switchyard ctl`).
pub async fn call_once(addr: &str, req: &Request, timeout: Duration) -> io::Result<Response> {
    tokio::time::timeout(timeout, async {
        let mut s = dial(addr, None).await?;
        write_frame(&mut s, req).await?;
        read_frame(&mut s)
            .await?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"))
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "request timed out"))?
}

/// Whether an error happened before anything was sent (the request certainly
/// had no effect).
#[derive(Debug)]
pub struct CallError {
    pub sent: bool,
    pub error: io::Error,
}

/// A reusable connection to one peer: requests on it are serialised.
#[derive(Debug)]
pub struct Peer {
    addr: String,
    source: Option<IpAddr>,
    conn: Mutex<Option<TcpStream>>,
}

impl Peer {
    pub fn new(addr: String, source: Option<IpAddr>) -> Self {
        Peer {
            addr,
            source,
            conn: Mutex::new(None),
        }
    }

    /// Sends `req` and reads its response within `timeout`; on any error the
    /// connection is dropped (the next call dials again).
    pub async fn call(&self, req: &Request, timeout: Duration) -> Result<Response, CallError> {
        let mut guard = self.conn.lock().await;
        let mut sent = false;
        let result = tokio::time::timeout(timeout, async {
            if guard.is_none() {
                *guard = Some(dial(&self.addr, self.source).await?);
            }
            let Some(stream) = guard.as_mut() else {
                return Err(io::Error::other("no connection"));
            };
            sent = true;
            write_frame(stream, req).await?;
            read_frame(stream)
                .await?
                .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"))
        })
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "request timed out")));
        if result.is_err() {
            *guard = None;
        }
        result.map_err(|error| CallError { sent, error })
    }
}

/// Connections to peers by address, shared by every Raft replication task.
#[derive(Debug, Default, Clone)]
pub struct Peers {
    peers: Arc<parking_lot_free::Map>,
    /// The IP outgoing connections are made from (see [`dial`]).
    source: Option<IpAddr>,
}

mod parking_lot_free {
    use super::*;

    #[derive(Debug, Default)]
    pub struct Map(std::sync::Mutex<HashMap<String, Arc<Peer>>>);

    impl Map {
        pub fn get(&self, addr: &str, source: Option<IpAddr>) -> Arc<Peer> {
            let mut m = match self.0.lock() {
                Ok(m) => m,
                Err(poisoned) => poisoned.into_inner(),
            };
            m.entry(addr.to_owned())
                .or_insert_with(|| Arc::new(Peer::new(addr.to_owned(), source)))
                .clone()
        }
    }
}

impl Peers {
    /// Connections dialled from `listen`'s IP when it names a specific one
    /// (not `0.0.0.0`, `::` or a host name).
    pub fn from_listen(listen: &SocketAddr) -> Self {
        let ip = listen.ip();
        Peers {
            peers: Arc::default(),
            source: (!ip.is_unspecified()).then_some(ip),
        }
    }

    /// The connection to `addr` (created on first use).
    pub fn get(&self, addr: &str) -> Arc<Peer> {
        self.peers.get(addr, self.source)
    }
}
