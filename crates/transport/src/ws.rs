//! WebSocket as a byte stream, so that MQTT and STOMP sessions serve WebSocket
//! clients with the same code as TCP ones.
//!
//! [`accept`] runs the HTTP upgrade: the request path must be the configured one
//! (`/ws`), and the first subprotocol the client offers that we support is chosen
//! (a client offering none is accepted without one, as browsers' `new
//! WebSocket(url)` does). [`WsByteStream`] then reads the payloads of data messages
//! back to back, so a protocol packet may span several WebSocket messages or share
//! one, and writes each `write` call as one message. Replies are binary, or text
//! when the client's messages are text and the reply is valid UTF-8 (web-stomp's
//! rule: answer text frames with text). Pings are answered by tungstenite itself.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_sink::Sink;
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// What a WebSocket endpoint accepts.
#[derive(Debug, Clone)]
pub struct WsOptions {
    /// The request path, e.g. `/ws`.
    pub path: String,
    /// Subprotocols in order of preference, e.g. `["mqtt", "mqttv3.1"]`.
    pub subprotocols: Vec<&'static str>,
    /// Largest WebSocket message accepted (the protocol's own limits still apply).
    pub max_message_size: usize,
}

/// Upgrades an accepted connection to WebSocket.
pub async fn accept<S>(
    stream: S,
    options: &WsOptions,
) -> Result<WsByteStream<S>, tokio_tungstenite::tungstenite::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    // The callback's signature is tungstenite's; its error type is what it is.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
        if request.uri().path() != options.path {
            let mut refusal = ErrorResponse::new(Some(format!(
                "no WebSocket endpoint at {}",
                request.uri().path()
            )));
            *refusal.status_mut() = StatusCode::NOT_FOUND;
            return Err(refusal);
        }
        let offered = request
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>();
        if let Some(chosen) = options.subprotocols.iter().find(|p| offered.contains(p)) {
            response
                .headers_mut()
                .insert("sec-websocket-protocol", HeaderValue::from_static(chosen));
        } else if !offered.is_empty() {
            let mut refusal = ErrorResponse::new(Some(format!(
                "none of the offered subprotocols is supported; use one of {}",
                options.subprotocols.join(", ")
            )));
            *refusal.status_mut() = StatusCode::BAD_REQUEST;
            return Err(refusal);
        }
        Ok(response)
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(options.max_message_size))
        .max_frame_size(Some(options.max_message_size));
    let ws =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await?;
    Ok(WsByteStream {
        ws,
        pending: Bytes::new(),
        text_replies: false,
        eof: false,
    })
}

/// A WebSocket connection seen as a byte stream.
pub struct WsByteStream<S> {
    ws: WebSocketStream<S>,
    /// The unread rest of the last data message.
    pending: Bytes,
    /// The client sends text messages, so replies go as text where possible.
    text_replies: bool,
    eof: bool,
}

impl<S> AsyncRead for WsByteStream<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                let chunk = self.pending.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => self.pending = data,
                Some(Ok(Message::Text(text))) => {
                    self.text_replies = true;
                    self.pending = Bytes::from(text);
                }
                // Pings are answered by tungstenite; pongs and raw frames carry no data.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => self.eof = true,
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
            }
        }
    }
}

impl<S> AsyncWrite for WsByteStream<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(io::Error::other)?;
        let message = match std::str::from_utf8(buf) {
            Ok(text) if self.text_replies => Message::text(text.to_owned()),
            _ => Message::binary(Bytes::copy_from_slice(buf)),
        };
        Pin::new(&mut self.ws)
            .start_send(message)
            .map_err(io::Error::other)?;
        // Push it towards the socket now; if the socket is full the next write's
        // poll_ready (or a flush) finishes the job.
        match Pin::new(&mut self.ws).poll_flush(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(io::Error::other(e))),
            _ => Poll::Ready(Ok(buf.len())),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws)
            .poll_flush(cx)
            .map_err(io::Error::other)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws)
            .poll_close(cx)
            .map_err(io::Error::other)
    }
}

impl<S> WsByteStream<S> {
    /// Whether the client has been sending text messages.
    pub fn replies_in_text(&self) -> bool {
        self.text_replies
    }

    /// Bytes read but not yet handed out (for tests).
    pub fn buffered(&self) -> usize {
        self.pending.remaining()
    }
}
