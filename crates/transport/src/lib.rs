//! The transport layer: TCP, TLS, WebSocket and WebSocket over TLS as one byte
//! stream ([`Stream`]), established by one accept loop ([`AcceptLoop`]) under
//! every protocol and every HTTP listener.
//!
//! A listener says which [`Transport`] it speaks; the accept loop accepts TCP
//! connections and hands each one to a task of its own, which runs the transport's
//! handshakes (TLS, then the WebSocket upgrade) under their deadlines and then
//! calls the listener's handler with a [`Connection`]: the stream, the addresses,
//! and the client's certificate when it presented one. A protocol adapter runs
//! that stream in the connection driver (`switchyard-driver`), so a new adapter
//! gets every transport by taking a [`Stream`]; an HTTP server takes the same
//! connections through [`HttpIncoming`].
//!
//! The accept loop never waits for a handshake: a slow or silent client (a
//! slow-loris, a half-open TLS handshake, a flood of connection attempts) holds
//! only its own task and a connection slot, until its deadline closes it.
//!
//! It must not know any protocol: no parsing beyond TLS and WebSocket, no login.

pub mod tls;
pub mod ws;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

pub use tls::{cert_login_name, CertLoginFrom, TlsContext, TlsError, TlsSettings};
pub use ws::WsOptions;

/// RabbitMQ's `ssl_handshake_timeout`: 5 s from accept to the end of the TLS handshake.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

const BACKOFF_START: Duration = Duration::from_millis(1);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What a listener speaks below its protocol.
#[derive(Debug, Clone)]
pub enum Transport {
    Tcp,
    Tls(Arc<TlsContext>),
    /// WebSocket (the upgrade's path and subprotocols).
    Ws(Arc<WsOptions>),
    /// WebSocket over TLS.
    Wss(Arc<TlsContext>, Arc<WsOptions>),
}

impl Transport {
    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_) | Transport::Wss(..))
    }

    pub fn is_websocket(&self) -> bool {
        matches!(self, Transport::Ws(_) | Transport::Wss(..))
    }
}

/// A connection's byte stream, whatever the transport.
pub enum Stream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Ws(Box<ws::WsByteStream<TcpStream>>),
    Wss(Box<ws::WsByteStream<TlsStream<TcpStream>>>),
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Tcp($s) => {
                let $s = Pin::new($s);
                $e
            }
            Stream::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
            Stream::Ws($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
            Stream::Wss($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(self, s => s.poll_write_vectored(cx, bufs))
    }

    /// As the stream inside: the driver writes large message bodies from
    /// their shared buffers only where one call takes several slices.
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
            Stream::Ws(s) => s.is_write_vectored(),
            Stream::Wss(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(self, s => s.poll_shutdown(cx))
    }
}

/// An established connection, handed to a listener's handler.
pub struct Connection {
    pub stream: Stream,
    pub peer: SocketAddr,
    /// The socket's own local address (the listener's may be 0.0.0.0).
    pub local: SocketAddr,
    pub tls: bool,
    pub websocket: bool,
    /// The client's certificate (leaf), verified against `cacertfile`, when it
    /// presented one.
    pub peer_certificate: Option<CertificateDer<'static>>,
}

/// Why a connection never got to its protocol.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("TLS handshake timed out")]
    TlsTimeout,
    #[error("WebSocket upgrade failed: {0}")]
    Ws(tokio_tungstenite::tungstenite::Error),
    #[error("WebSocket upgrade timed out")]
    WsTimeout,
}

/// Deadlines of the transport's own handshakes.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// From accept to the end of the TLS handshake.
    pub tls: Duration,
    /// From the end of TLS (or accept) to the end of the WebSocket upgrade.
    pub websocket: Duration,
}

/// Runs the transport's handshakes on an accepted socket.
pub async fn establish(
    tcp: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    transport: &Transport,
    deadlines: Deadlines,
) -> Result<Connection, HandshakeError> {
    let tls = |ctx: &TlsContext, tcp| {
        let acceptor = ctx.acceptor();
        async move {
            match tokio::time::timeout(deadlines.tls, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => {
                    let cert = s
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.clone().into_owned());
                    Ok((s, cert))
                }
                Ok(Err(e)) => Err(HandshakeError::Tls(e)),
                Err(_) => Err(HandshakeError::TlsTimeout),
            }
        }
    };
    let (stream, peer_certificate) = match transport {
        Transport::Tcp => (Stream::Tcp(tcp), None),
        Transport::Tls(ctx) => {
            let (s, cert) = tls(ctx, tcp).await?;
            (Stream::Tls(Box::new(s)), cert)
        }
        Transport::Ws(opts) => {
            let s = upgrade(tcp, opts, deadlines.websocket).await?;
            (Stream::Ws(Box::new(s)), None)
        }
        Transport::Wss(ctx, opts) => {
            let (s, cert) = tls(ctx, tcp).await?;
            let s = upgrade(s, opts, deadlines.websocket).await?;
            (Stream::Wss(Box::new(s)), cert)
        }
    };
    Ok(Connection {
        stream,
        peer,
        local,
        tls: transport.is_tls(),
        websocket: transport.is_websocket(),
        peer_certificate,
    })
}

async fn upgrade<S>(
    s: S,
    opts: &WsOptions,
    deadline: Duration,
) -> Result<ws::WsByteStream<S>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(deadline, ws::accept(s, opts)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(HandshakeError::Ws(e)),
        Err(_) => Err(HandshakeError::WsTimeout),
    }
}

/// One listener's accept loop (after mini-redis `server.rs`).
///
/// - A semaphore, when given, caps the connections open at once. Over the cap a
///   connection is accepted and closed at once, with a warning: leaving it in the
///   kernel's backlog would make the client hang instead of failing fast.
/// - An accept error (EMFILE, ENOBUFS, a connection reset before accept) backs off
///   exponentially from 1 ms to 1 s and tries again; it never ends the listener.
/// - Each connection runs in its own task, handshakes included, with a clone
///   of the shutdown token; whatever happens to it stays in that task.
pub struct AcceptLoop {
    /// For logs: `amqp`, `mqtts`, `management`, ...
    pub name: &'static str,
    pub listener: TcpListener,
    pub transport: Transport,
    pub deadlines: Deadlines,
    pub limit: Option<Arc<Semaphore>>,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
}

impl AcceptLoop {
    /// Accepts until `shutdown` is cancelled; `handler` serves each established
    /// connection (in the connection's task) until it ends. The handler gets the
    /// shutdown token (a clone).
    pub async fn run<H, F>(self, handler: H)
    where
        H: Fn(Connection, CancellationToken) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let name = self.name;
        let fallback_local = self.listener.local_addr().ok();
        let mut backoff = BACKOFF_START;
        loop {
            let accepted = tokio::select! {
                () = self.shutdown.cancelled() => break,
                accepted = self.listener.accept() => accepted,
            };
            let (socket, peer) = match accepted {
                Ok(accepted) => {
                    backoff = BACKOFF_START;
                    accepted
                }
                Err(e) => {
                    warn!(listener = name, error = %e, ?backoff, "accept failed; retrying");
                    tokio::select! {
                        () = self.shutdown.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            let permit: Option<OwnedSemaphorePermit> = match &self.limit {
                None => None,
                Some(limit) => match limit.clone().try_acquire_owned() {
                    Ok(p) => Some(p),
                    Err(_) => {
                        warn!(listener = name, %peer, "connection limit reached; closing new connection");
                        drop(socket);
                        continue;
                    }
                },
            };
            if let Err(e) = socket.set_nodelay(true) {
                // Not fatal: the connection works, only small writes may wait.
                debug!(listener = name, %peer, error = %e, "cannot set TCP_NODELAY");
            }
            let Some(local) = socket.local_addr().ok().or(fallback_local) else {
                continue;
            };
            debug!(listener = name, %peer, "connection accepted");
            // A clone, not a child token: nothing cancels one connection's
            // token alone, and a child costs every connection a tree node
            // (about 110 bytes) and an entry in the parent's list.
            let token = self.shutdown.clone();
            let transport = self.transport.clone();
            let deadlines = self.deadlines;
            let handler = handler.clone();
            // At debug level: a span the subscriber records costs every
            // connection about 400 bytes for as long as it lives (its fields,
            // formatted, in the registry), which is most of what an idle
            // connection costs. The lines a connection logs at info and above
            // name their peer themselves; with debug logging on, every line
            // of the connection carries this span too.
            let span = tracing::debug_span!("conn", listener = name, %peer);
            let task = async move {
                // Boxed: the handshake's state (TLS, WebSocket upgrade) is
                // freed once done instead of sizing the task for its life.
                let conn = tokio::select! {
                    () = token.cancelled() => None,
                    r = Box::pin(establish(socket, peer, local, &transport, deadlines)) => match r {
                        Ok(conn) => Some(conn),
                        Err(e) => {
                            debug!(error = %e, "connection closed before its protocol started");
                            None
                        }
                    },
                };
                if let Some(conn) = conn {
                    handler(conn, token).await;
                }
                drop(permit);
                debug!("connection ended");
            }
            .instrument(span);
            self.tasks.spawn(task);
        }
        info!(listener = name, "listener stopped");
    }
}

/// Established connections for an HTTP server (axum's `Listener`): an
/// [`AcceptLoop`] feeds it, so HTTP listeners get the same transports and
/// handshake deadlines as the protocols.
pub struct HttpIncoming {
    rx: mpsc::Receiver<(Stream, SocketAddr)>,
    local: SocketAddr,
}

impl HttpIncoming {
    /// Starts `accept` (its tasks run on `accept.tasks`) and returns the
    /// connections it establishes.
    pub fn start(accept: AcceptLoop) -> (Self, tokio::task::JoinHandle<()>) {
        let local = accept
            .listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, rx) = mpsc::channel(64);
        let handle = tokio::spawn(accept.run(move |conn: Connection, _token| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((conn.stream, conn.peer)).await;
            }
        }));
        (HttpIncoming { rx, local }, handle)
    }

    /// The next established connection; `None` once the accept loop stopped.
    pub async fn next(&mut self) -> Option<(Stream, SocketAddr)> {
        self.rx.recv().await
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn plain_tcp_reaches_the_handler_and_a_silent_tls_client_does_not_block_it() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let accept = AcceptLoop {
            name: "test",
            listener,
            transport: Transport::Tcp,
            deadlines: Deadlines {
                tls: Duration::from_secs(1),
                websocket: Duration::from_secs(1),
            },
            limit: None,
            shutdown: shutdown.clone(),
            tasks: TaskTracker::new(),
        };
        tokio::spawn(accept.run(|mut conn: Connection, _| async move {
            let mut b = [0u8; 5];
            if conn.stream.read_exact(&mut b).await.is_ok() {
                let _ = conn.stream.write_all(&b).await;
            }
        }));
        // A silent client first: it holds a task, not the loop.
        let _silent = TcpStream::connect(addr).await.unwrap();
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut b = [0u8; 5];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"hello");
        shutdown.cancel();
    }
}
