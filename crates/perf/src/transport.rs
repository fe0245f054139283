//! TCP or WebSocket, as a read half and a write half of a byte stream.
//!
//! Over WebSocket every protocol packet travels as one binary message (brokers such
//! as Mosquitto and RabbitMQ's web plugins also accept packets that span messages,
//! but one packet per message is what browser clients send, so it is what we
//! measure). Writers take a batch buffer plus the packet boundaries inside it: TCP
//! writes the whole batch in one call, WebSocket feeds one message per packet and
//! flushes once.

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::WebSocketStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    Ws,
}

type Ws = WebSocketStream<TcpStream>;

pub enum Reader {
    Tcp(OwnedReadHalf),
    Ws(SplitStream<Ws>),
}

pub enum Writer {
    Tcp(OwnedWriteHalf),
    Ws(SplitSink<Ws, Message>),
}

/// Connects to a loopback address, over WebSocket offering `subprotocols`.
pub async fn connect(
    addr: SocketAddr,
    transport: Transport,
    ws_path: &str,
    subprotocols: &str,
) -> Result<(Reader, Writer)> {
    if !addr.ip().is_loopback() {
        bail!("{addr} is not a loopback address; switchyard-perf only targets this machine");
    }
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    // Small packets are batched by the tools' own buffers; Nagle would only add delay.
    tcp.set_nodelay(true)?;
    match transport {
        Transport::Tcp => {
            let (r, w) = tcp.into_split();
            Ok((Reader::Tcp(r), Writer::Tcp(w)))
        }
        Transport::Ws => {
            let url = format!("ws://{addr}{ws_path}");
            let mut request = url.as_str().into_client_request()?;
            request.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                HeaderValue::from_str(subprotocols)?,
            );
            let config = WebSocketConfig::default()
                .max_message_size(Some(256 << 20))
                .max_frame_size(Some(256 << 20));
            let (ws, _) = tokio_tungstenite::client_async_with_config(request, tcp, Some(config))
                .await
                .with_context(|| format!("WebSocket handshake with {url}"))?;
            let (w, r) = ws.split();
            Ok((Reader::Ws(r), Writer::Ws(w)))
        }
    }
}

impl Reader {
    /// Appends what arrives next to `buf`; Ok(0) at end of stream.
    pub async fn read(&mut self, buf: &mut BytesMut) -> Result<usize> {
        match self {
            Reader::Tcp(r) => {
                if buf.capacity() - buf.len() < 16 * 1024 {
                    buf.reserve(64 * 1024);
                }
                Ok(r.read_buf(buf).await?)
            }
            Reader::Ws(r) => loop {
                match r.next().await {
                    None => return Ok(0),
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(Message::Binary(b))) => {
                        buf.extend_from_slice(&b);
                        return Ok(b.len());
                    }
                    Some(Ok(Message::Text(t))) => {
                        buf.extend_from_slice(t.as_bytes());
                        return Ok(t.len());
                    }
                    Some(Ok(Message::Close(_))) => return Ok(0),
                    // Pings are answered by tungstenite on our next write or flush.
                    Some(Ok(_)) => continue,
                }
            },
        }
    }
}

impl Writer {
    /// Writes `buf`, whose packets end at the offsets in `ends` (ascending; the
    /// last is `buf.len()`), and clears both.
    pub async fn send(&mut self, buf: &mut BytesMut, ends: &mut Vec<usize>) -> Result<()> {
        match self {
            Writer::Tcp(w) => w.write_all(buf).await?,
            Writer::Ws(w) => {
                let mut all = buf.split().freeze();
                let mut at = 0;
                for &end in ends.iter() {
                    let packet = all.split_to(end.saturating_sub(at).min(all.len()));
                    at = end;
                    w.feed(Message::Binary(packet)).await?;
                }
                if !all.is_empty() {
                    w.feed(Message::Binary(all)).await?;
                }
                w.flush().await?;
            }
        }
        buf.clear();
        ends.clear();
        Ok(())
    }

    /// Writes one packet.
    pub async fn send_one(&mut self, packet: &[u8]) -> Result<()> {
        match self {
            Writer::Tcp(w) => w.write_all(packet).await?,
            Writer::Ws(w) => {
                w.send(Message::Binary(Bytes::copy_from_slice(packet)))
                    .await?
            }
        }
        Ok(())
    }

    /// Sends a last packet (a protocol's goodbye, may be empty) and closes, giving
    /// up after 2 s: a broker that stopped reading (socket full of our publishes)
    /// must not keep a finished run waiting.
    pub async fn finish(&mut self, last: &[u8]) {
        let bye = async {
            if !last.is_empty() {
                let _ = self.send_one(last).await;
            }
            self.close().await;
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), bye).await;
    }

    pub async fn close(&mut self) {
        match self {
            Writer::Tcp(w) => {
                let _ = w.shutdown().await;
            }
            Writer::Ws(w) => {
                let _ = w.close().await;
            }
        }
    }
}
