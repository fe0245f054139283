//! The inter-node transport: length-prefixed postcard frames over TCP (mutual
//! TLS when `[tls]` is set), one request and one response at a time per
//! connection. Dialing and securing accepted connections live in [`Link`] only.
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
    /// The hello of a quorum groups' connection (`quorum::network`): the rest
    /// of the connection carries the groups' multiplexed RPCs. Sent only by a
    /// node, after the connection was authenticated like any other.
    QuorumMux,
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

/// One frame's bytes: a big-endian u32 length, then the postcard body.
pub fn encode_frame<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
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
    Ok(buf)
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    value: &T,
) -> io::Result<()> {
    w.write_all(&encode_frame(value)?).await?;
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

/// Accepts one TCP connection; [`Link::secure`] then makes it a node stream
/// (in the connection's own task: a slow handshake must not stall accepting).
pub async fn accept(listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
    let (stream, peer) = listener.accept().await?;
    stream.set_nodelay(true)?;
    Ok((stream, peer))
}

/// A connection between nodes: TCP, or TLS over it.
pub trait NodeIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> NodeIo for T {}
pub type NodeStream = Box<dyn NodeIo>;

/// Mutual TLS between nodes (`[tls]` set): see
/// `switchyard_transport::tls::node_configs`.
pub struct NodeTls {
    acceptor: tokio_rustls::TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeTls")
    }
}

impl NodeTls {
    /// From the `[tls]` files (which must name the CA: `cacertfile`).
    pub fn load(
        settings: &switchyard_transport::TlsSettings,
    ) -> Result<Arc<Self>, switchyard_transport::TlsError> {
        let (server, client) = switchyard_transport::tls::node_configs(settings)?;
        Ok(Arc::new(NodeTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        }))
    }
}

/// How long a peer may take to finish the TLS handshake on an accepted
/// connection.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a node (or `switchyard ctl`) reaches nodes and serves them: the source
/// IP of its dials and, with `[tls]`, mutual TLS both ways. Dialing and
/// securing accepted connections live here only.
#[derive(Clone, Default)]
pub struct Link {
    /// A node whose `[cluster] listen` is a specific IP dials from that IP, so
    /// that a peer (or a fault-injecting proxy in tests) can tell nodes apart
    /// by their source address.
    source: Option<IpAddr>,
    tls: Option<Arc<NodeTls>>,
    /// The cluster's shared secret (`[cluster] cookie`): see [`Cookie`].
    cookie: Option<Cookie>,
}

/// The shared secret every node of a cluster is configured with (`[cluster]
/// cookie`, RabbitMQ's Erlang cookie). A connection starts with a challenge:
/// the accepting node sends 32 random bytes, the dialing one answers with
/// HMAC-SHA256(cookie, challenge); a wrong answer closes the connection before
/// any request is read. The secret itself never crosses the wire.
#[derive(Clone)]
pub struct Cookie(Arc<[u8]>);

impl std::fmt::Debug for Cookie {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret itself (it would end up in logs).
        f.write_str("Cookie(..)")
    }
}

impl Cookie {
    pub fn new(secret: &str) -> Self {
        Cookie(Arc::from(secret.as_bytes()))
    }

    fn mac(&self, challenge: &[u8]) -> hmac::Hmac<sha2::Sha256> {
        use hmac::Mac;
        // HMAC takes keys of any length: `new_from_slice` cannot fail.
        let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(b"switchyard cluster v1");
        mac.update(challenge);
        mac
    }

    /// The dialing side: answers the challenge.
    async fn prove(&self, stream: &mut NodeStream) -> io::Result<()> {
        use hmac::Mac;
        let mut challenge = [0u8; CHALLENGE_LEN];
        stream.read_exact(&mut challenge).await?;
        let answer = self.mac(&challenge).finalize().into_bytes();
        stream.write_all(&answer).await?;
        stream.flush().await
    }

    /// The accepting side: whether the peer knows the cookie.
    async fn check(&self, stream: &mut NodeStream) -> io::Result<bool> {
        use hmac::Mac;
        let challenge: [u8; CHALLENGE_LEN] = rand::random();
        stream.write_all(&challenge).await?;
        stream.flush().await?;
        let mut answer = [0u8; CHALLENGE_LEN];
        stream.read_exact(&mut answer).await?;
        // Compared in constant time.
        Ok(self.mac(&challenge).verify_slice(&answer).is_ok())
    }
}

const CHALLENGE_LEN: usize = 32;

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("source", &self.source)
            .field("tls", &self.tls.is_some())
            .field("cookie", &self.cookie.is_some())
            .finish()
    }
}

impl Link {
    /// A node's link: dials from `listen`'s IP when it names a specific one
    /// (not `0.0.0.0` or `::`).
    pub fn node(listen: &SocketAddr, tls: Option<Arc<NodeTls>>, cookie: Option<Cookie>) -> Self {
        let ip = listen.ip();
        Link {
            source: (!ip.is_unspecified()).then_some(ip),
            tls,
            cookie,
        }
    }

    /// A client's link (`switchyard ctl`): any source address.
    pub fn client(tls: Option<Arc<NodeTls>>, cookie: Option<Cookie>) -> Self {
        Link {
            source: None,
            tls,
            cookie,
        }
    }

    /// Whether connections are authenticated (mutual TLS or a cookie).
    pub fn is_authenticated(&self) -> bool {
        self.tls.is_some() || self.cookie.is_some()
    }

    /// Dials a node (TCP connect and TLS handshake within [`CONNECT_TIMEOUT`]).
    pub async fn dial(&self, addr: &str) -> io::Result<NodeStream> {
        let connect = async {
            let tcp = match self.source {
                None => TcpStream::connect(addr).await?,
                Some(ip) => {
                    let target = tokio::net::lookup_host(addr)
                        .await?
                        .find(|a| a.is_ipv4() == ip.is_ipv4())
                        .ok_or_else(|| {
                            io::Error::other(format!("{addr} has no address of {ip}'s family"))
                        })?;
                    let socket = if ip.is_ipv4() {
                        TcpSocket::new_v4()?
                    } else {
                        TcpSocket::new_v6()?
                    };
                    socket.bind(SocketAddr::new(ip, 0))?;
                    socket.connect(target).await?
                }
            };
            tcp.set_nodelay(true)?;
            let mut stream: NodeStream = match &self.tls {
                None => Box::new(tcp),
                Some(tls) => {
                    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                    Box::new(tls.connector.connect(name, tcp).await?)
                }
            };
            if let Some(cookie) = &self.cookie {
                cookie.prove(&mut stream).await?;
            }
            Ok(stream)
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting to {addr} timed out"),
                )
            })?
    }

    /// Makes an accepted connection a node stream: with TLS, after a handshake
    /// in which the peer proved it holds a certificate of the cluster's CA;
    /// with a cookie, after the peer answered its challenge.
    pub async fn secure(&self, tcp: TcpStream) -> io::Result<NodeStream> {
        let handshake = async {
            let mut stream: NodeStream = match &self.tls {
                None => Box::new(tcp),
                Some(tls) => Box::new(tls.acceptor.accept(tcp).await?),
            };
            if let Some(cookie) = &self.cookie {
                if !cookie.check(&mut stream).await? {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        "the peer does not know the cluster's cookie",
                    ));
                }
            }
            Ok(stream)
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))?
    }
}

/// One request and its response on a fresh connection (`switchyard ctl`).
pub async fn call_once(
    addr: &str,
    link: &Link,
    req: &Request,
    timeout: Duration,
) -> io::Result<Response> {
    tokio::time::timeout(timeout, async {
        let mut s = link.dial(addr).await?;
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
pub struct Peer {
    addr: String,
    link: Link,
    conn: Mutex<Option<NodeStream>>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer").field("addr", &self.addr).finish()
    }
}

impl Peer {
    pub fn new(addr: String, link: Link) -> Self {
        Peer {
            addr,
            link,
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
                *guard = Some(self.link.dial(&self.addr).await?);
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
    link: Link,
}

mod parking_lot_free {
    use super::*;

    #[derive(Debug, Default)]
    pub struct Map(std::sync::Mutex<HashMap<String, Arc<Peer>>>);

    impl Map {
        pub fn get(&self, addr: &str, link: &Link) -> Arc<Peer> {
            let mut m = match self.0.lock() {
                Ok(m) => m,
                Err(poisoned) => poisoned.into_inner(),
            };
            m.entry(addr.to_owned())
                .or_insert_with(|| Arc::new(Peer::new(addr.to_owned(), link.clone())))
                .clone()
        }
    }
}

impl Peers {
    /// Connections made through `link`.
    pub fn new(link: Link) -> Self {
        Peers {
            peers: Arc::default(),
            link,
        }
    }

    /// The connection to `addr` (created on first use).
    pub fn get(&self, addr: &str) -> Arc<Peer> {
        self.peers.get(addr, &self.link)
    }
}
