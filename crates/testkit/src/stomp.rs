//! A small STOMP test client over TCP: sends frames (or raw bytes), reads frames
//! with the adapter's decoder, and waits for receipts. Frames that arrive while
//! it waits for something else are kept, in order, for the next [`StompClient::recv`].
//!
//! It reads with the same codec the broker uses; the codec's own tests (known
//! byte vectors) and the stomp.py and stompjs suites keep that from hiding a
//! codec bug on both sides at once.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use switchyard_stomp::codec::{Command, Decoder, Frame, Limits, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::READ_TIMEOUT;

pub use switchyard_stomp::codec;

/// A STOMP connection for tests.
pub struct StompClient {
    stream: TcpStream,
    buf: BytesMut,
    decoder: Decoder,
    version: Version,
    pending: VecDeque<Frame>,
    next_receipt: u64,
    closed: bool,
}

impl StompClient {
    /// Opens the TCP connection only (no CONNECT).
    pub async fn open(addr: SocketAddr) -> StompClient {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("testkit: cannot connect to STOMP at {addr}: {e}"));
        stream
            .set_nodelay(true)
            .expect("testkit: cannot set TCP_NODELAY");
        StompClient {
            stream,
            buf: BytesMut::new(),
            decoder: Decoder::new(Limits::default()),
            version: Version::V1_2,
            pending: VecDeque::new(),
            next_receipt: 1,
            closed: false,
        }
    }

    /// Connects as guest with STOMP 1.2 and waits for CONNECTED.
    pub async fn connect(addr: SocketAddr) -> StompClient {
        Self::connect_with(addr, "1.2", &[]).await.0
    }

    /// Connects with `accept-version` (e.g. `"1.0"`, `"1.1"`, `"1.2"`, or `""`
    /// for none, as a 1.0 client does) and extra CONNECT headers; expects
    /// CONNECTED and returns it.
    pub async fn connect_with(
        addr: SocketAddr,
        accept_version: &str,
        headers: &[(&str, &str)],
    ) -> (StompClient, Frame) {
        let mut c = Self::open(addr).await;
        let mut frame = Frame::new(Command::Connect);
        if !accept_version.is_empty() {
            frame = frame.header("accept-version", accept_version);
        }
        frame = frame.header("host", "/");
        if !headers.iter().any(|(k, _)| *k == "login") {
            frame = frame.header("login", "guest").header("passcode", "guest");
        }
        for (k, v) in headers {
            frame = frame.header(*k, *v);
        }
        c.send_frame(&frame).await;
        let connected = c.recv().await;
        assert_eq!(
            connected.command,
            Command::Connected,
            "testkit: expected CONNECTED, got {connected:?}"
        );
        let version = connected
            .get("version")
            .and_then(Version::parse)
            .unwrap_or(Version::V1_0);
        c.version = version;
        c.decoder.set_version(version);
        (c, connected)
    }

    /// The negotiated version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Sends a frame encoded for the negotiated version.
    pub async fn send_frame(&mut self, frame: &Frame) {
        let bytes = frame.to_bytes(self.version);
        self.send_raw(&bytes).await;
    }

    /// Sends bytes as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .await
            .unwrap_or_else(|e| panic!("testkit: STOMP send failed: {e}"));
    }

    /// SEND with a body and extra headers.
    pub async fn send(&mut self, destination: &str, body: &str, headers: &[(&str, &str)]) {
        let mut f = Frame::new(Command::Send).header("destination", destination);
        for (k, v) in headers {
            f = f.header(*k, *v);
        }
        let f = f.body(body.to_owned());
        self.send_frame(&f).await;
    }

    /// Sends `frame` with a fresh `receipt` header and waits for its RECEIPT
    /// (frames arriving before it are kept for [`StompClient::recv`]). Panics if
    /// an ERROR comes instead.
    pub async fn with_receipt(&mut self, frame: Frame) {
        let id = format!("r-{}", self.next_receipt);
        self.next_receipt += 1;
        self.send_frame(&frame.header("receipt", id.clone())).await;
        let mut held = VecDeque::new();
        loop {
            let f = self
                .read_frame(READ_TIMEOUT)
                .await
                .unwrap_or_else(|| panic!("testkit: no RECEIPT {id} within {READ_TIMEOUT:?}"));
            match f.command {
                Command::Receipt if f.get("receipt-id") == Some(id.as_str()) => break,
                Command::Error => panic!("testkit: ERROR instead of RECEIPT {id}: {f:?}"),
                _ => held.push_back(f),
            }
        }
        held.append(&mut self.pending);
        self.pending = held;
    }

    /// SUBSCRIBE and wait until the broker has set it up (by receipt).
    pub async fn subscribe(
        &mut self,
        id: &str,
        destination: &str,
        ack: &str,
        headers: &[(&str, &str)],
    ) {
        let mut f = Frame::new(Command::Subscribe)
            .header("id", id)
            .header("destination", destination)
            .header("ack", ack);
        for (k, v) in headers {
            f = f.header(*k, *v);
        }
        self.with_receipt(f).await;
    }

    /// The next frame; fails the test after [`READ_TIMEOUT`] or if the
    /// connection closes.
    pub async fn recv(&mut self) -> Frame {
        self.recv_within(READ_TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("testkit: no STOMP frame within {READ_TIMEOUT:?}"))
    }

    /// The next frame, or `None` if none arrives within `timeout` (or the
    /// connection closed).
    pub async fn recv_within(&mut self, timeout: Duration) -> Option<Frame> {
        if let Some(f) = self.pending.pop_front() {
            return Some(f);
        }
        self.read_frame(timeout).await
    }

    /// The next MESSAGE, failing the test on anything else.
    pub async fn recv_message(&mut self) -> Frame {
        let f = self.recv().await;
        assert_eq!(
            f.command,
            Command::Message,
            "testkit: expected MESSAGE, got {f:?}"
        );
        f
    }

    async fn read_frame(&mut self, timeout: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.decoder.decode(&mut self.buf) {
                Ok(Some(f)) => return Some(f),
                Ok(None) => {}
                Err(e) => panic!("testkit: the broker sent a bad frame: {e}"),
            }
            if self.closed {
                return None;
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => self.closed = true,
                Ok(Ok(n)) => self
                    .buf
                    .extend_from_slice(chunk.get(..n).unwrap_or_default()),
            }
        }
    }

    /// Expects an ERROR frame followed by the end of the connection; returns it.
    pub async fn expect_error(&mut self) -> Frame {
        let f = self.recv().await;
        assert_eq!(
            f.command,
            Command::Error,
            "testkit: expected ERROR, got {f:?}"
        );
        self.expect_closed().await;
        f
    }

    /// Expects the broker to close the connection (after any frames still
    /// buffered) within [`READ_TIMEOUT`].
    pub async fn expect_closed(&mut self) {
        let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
        while !self.closed {
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => panic!("testkit: STOMP connection still open after {READ_TIMEOUT:?}"),
                Ok(Ok(0)) | Ok(Err(_)) => self.closed = true,
                Ok(Ok(n)) => self
                    .buf
                    .extend_from_slice(chunk.get(..n).unwrap_or_default()),
            }
        }
    }

    /// Whether the broker has closed the connection (as far as seen so far).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// DISCONNECT with a receipt; waits for the RECEIPT and the close.
    pub async fn disconnect(mut self) {
        let f = Frame::new(Command::Disconnect);
        self.with_receipt(f).await;
        self.expect_closed().await;
    }

    /// The underlying stream.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}
