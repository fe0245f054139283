//! A raw AMQP 0-9-1 client on Switchyard's own codec, for tests that need the
//! exact frames a real client library hides: the reply code and text of a
//! `connection.close` the broker sends, or a refusal during the handshake.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use switchyard_amqp::codec::{self, Frame, Method};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a read waits before the test fails.
const WAIT: Duration = Duration::from_secs(10);

/// A connection.close the broker sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    pub code: u16,
    pub text: String,
}

/// An AMQP connection driven frame by frame.
pub struct AmqpRaw {
    stream: TcpStream,
    buf: BytesMut,
}

impl AmqpRaw {
    /// Connects and completes the handshake (PLAIN login, `vhost`); the broker's
    /// connection.close during the handshake is returned as the error.
    pub async fn open(
        addr: SocketAddr,
        user: &str,
        password: &str,
        vhost: &str,
    ) -> Result<AmqpRaw, Closed> {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("testkit: cannot connect to {addr}: {e}"));
        let mut c = AmqpRaw {
            stream,
            buf: BytesMut::new(),
        };
        c.write(b"AMQP\x00\x00\x09\x01").await;
        c.expect(|m| matches!(m, Method::ConnectionStart(_)))
            .await?;
        let mut response = vec![0u8];
        response.extend_from_slice(user.as_bytes());
        response.push(0);
        response.extend_from_slice(password.as_bytes());
        let mut capabilities = switchyard_core::FieldTable::new();
        capabilities.insert(
            "authentication_failure_close",
            switchyard_core::FieldValue::Bool(true),
        );
        let mut properties = switchyard_core::FieldTable::new();
        properties.insert("product", switchyard_core::FieldValue::string("testkit"));
        properties.insert(
            "capabilities",
            switchyard_core::FieldValue::Table(capabilities),
        );
        c.send(
            0,
            Method::from(codec::ConnectionStartOk {
                client_properties: properties,
                mechanism: "PLAIN".into(),
                response: Bytes::from(response),
                locale: "en_US".into(),
            }),
        )
        .await;
        c.expect(|m| matches!(m, Method::ConnectionTune(_))).await?;
        c.send(
            0,
            Method::from(codec::ConnectionTuneOk {
                channel_max: 100,
                frame_max: 131_072,
                heartbeat: 0,
            }),
        )
        .await;
        c.send(
            0,
            Method::from(codec::ConnectionOpen {
                virtual_host: vhost.into(),
                ..Default::default()
            }),
        )
        .await;
        c.expect(|m| matches!(m, Method::ConnectionOpenOk(_)))
            .await?;
        Ok(c)
    }

    async fn write(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .await
            .unwrap_or_else(|e| panic!("testkit: write failed: {e}"));
    }

    /// Sends bytes as they are (frames encoded by the test, e.g. several in one
    /// write).
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.write(bytes).await;
    }

    /// Sends one method frame.
    pub async fn send(&mut self, channel: u16, method: Method) {
        let mut out = BytesMut::new();
        codec::encode_method(&mut out, channel, &method);
        self.write(&out).await;
    }

    /// The next method frame from the broker (content frames are skipped);
    /// `None` when the broker closed the socket.
    pub async fn next_method(&mut self) -> Option<(u16, Method)> {
        loop {
            match codec::decode_frame(&mut self.buf, 1 << 20) {
                Ok(Some(Frame::Method { channel, method })) => return Some((channel, method)),
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(e) => panic!("testkit: undecodable frame from the broker: {e}"),
            }
            let read = tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.buf))
                .await
                .unwrap_or_else(|_| panic!("testkit: no frame from the broker within {WAIT:?}"));
            match read {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Waits for a method matching `want`; a connection.close instead is the error.
    async fn expect(&mut self, want: impl Fn(&Method) -> bool) -> Result<Method, Closed> {
        loop {
            match self.next_method().await {
                Some((_, Method::ConnectionClose(c))) => {
                    return Err(Closed {
                        code: c.reply_code,
                        text: c.reply_text.to_string(),
                    })
                }
                Some((_, m)) if want(&m) => return Ok(m),
                Some(_) => continue,
                None => panic!("testkit: the broker closed the socket without connection.close"),
            }
        }
    }

    /// Opens a channel; a connection.close instead is the error.
    pub async fn open_channel(&mut self, channel: u16) -> Result<(), Closed> {
        self.send(
            channel,
            Method::from(codec::ChannelOpen {
                ..Default::default()
            }),
        )
        .await;
        self.expect(|m| matches!(m, Method::ChannelOpenOk(_)))
            .await
            .map(|_| ())
    }

    /// Waits for the broker's connection.close (skipping other frames), answers
    /// close-ok and returns its code and text.
    pub async fn expect_connection_close(&mut self) -> Closed {
        loop {
            match self.next_method().await {
                Some((_, Method::ConnectionClose(c))) => {
                    self.send(0, Method::from(codec::ConnectionCloseOk {}))
                        .await;
                    return Closed {
                        code: c.reply_code,
                        text: c.reply_text.to_string(),
                    };
                }
                Some(_) => continue,
                None => panic!("testkit: the broker closed the socket without connection.close"),
            }
        }
    }
}
