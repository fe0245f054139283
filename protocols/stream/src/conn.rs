//! The connection task: the Stream protocol session run by the shared
//! connection driver ([`switchyard_driver::drive`]). What is the Stream
//! protocol's here: its timers (the handshake deadline, heartbeats both ways,
//! the wait for the client's answer to our Close).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use switchyard_core::Broker;
use switchyard_driver::{Activity, End, Signals};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::codec::{key, Writer};
use crate::session::Session;

/// Limits and offers for Stream protocol connections, from the config.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Largest frame accepted after Open, offered in Tune (RabbitMQ: 1 MiB).
    pub frame_max: u32,
    /// Heartbeat interval offered in Tune, in seconds (0 = none; RabbitMQ: 60).
    pub heartbeat: u32,
    /// Time allowed from accept to Open.
    pub handshake_timeout: Duration,
    /// Host named in Open's answer and in Metadata ("": the address the
    /// client reached).
    pub advertised_host: String,
    /// Port named there (0: the port the client reached).
    pub advertised_port: u16,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            frame_max: 1024 * 1024,
            heartbeat: 60,
            handshake_timeout: Duration::from_secs(10),
            advertised_host: String::new(),
            advertised_port: 0,
        }
    }
}

/// How long to wait for the client's answer to our Close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Serves one Stream protocol connection until it closes or `shutdown` fires.
///
/// Not an `async fn`: the session is built here and moved straight into the
/// driver's box. In an `async fn` it would be a local of the connection's
/// future, which keeps room for it (about 1 kB) for as long as it runs.
pub fn serve<S>(
    stream: S,
    peer: SocketAddr,
    broker: Arc<Broker>,
    settings: Arc<StreamSettings>,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let session = Session::new(broker.clone(), settings.clone(), peer);
    let signals = Signals {
        outbox: session.outbox(),
        synced: session.synced(),
        alarm: broker.memory.subscribe(),
        takeover: None,
        shutdown,
    };
    let conn = Conn {
        session,
        peer,
        handshake_deadline: Instant::now() + settings.handshake_timeout,
        closing_deadline: None,
    };
    switchyard_driver::drive(stream, conn, signals)
}

struct Conn {
    session: Session,
    peer: SocketAddr,
    handshake_deadline: Instant,
    closing_deadline: Option<Instant>,
}

impl switchyard_driver::Session for Conn {
    fn output(&mut self) -> &mut switchyard_driver::Output {
        self.session.output()
    }

    fn handle_input(&mut self, input: &mut BytesMut) {
        self.session.handle_input(input);
    }

    fn handle_outbox(&mut self) {
        self.session.handle_outbox();
    }

    fn input_paused(&self) -> bool {
        self.session.input_paused()
    }

    fn awaits_sync(&self) -> bool {
        self.session.awaits_sync()
    }

    fn synced(&mut self) {
        self.session.on_synced();
    }

    fn blocks_on_alarm(&self) -> bool {
        self.session.blocks_on_alarm()
    }

    fn next_deadline(&mut self, activity: &Activity) -> Option<Instant> {
        let s = &self.session;
        if s.is_closing() && self.closing_deadline.is_none() {
            self.closing_deadline = Some(Instant::now() + CLOSE_TIMEOUT);
        }
        let mut next = self.closing_deadline;
        if !s.is_open() {
            next = earliest(next, self.handshake_deadline);
        }
        let hb = Duration::from_secs(u64::from(s.heartbeat()));
        if s.is_open() && !hb.is_zero() {
            next = earliest(next, activity.last_read + hb * 2);
            if !activity.output_pending {
                next = earliest(next, activity.last_write + hb);
            }
        }
        next
    }

    fn deadline(&mut self, now: Instant, activity: &Activity) {
        let s = &mut self.session;
        if !s.is_open() && !s.is_closing() && now >= self.handshake_deadline {
            s.finish("handshake timeout".into());
            return;
        }
        if self.closing_deadline.is_some_and(|d| now >= d) {
            s.finish("no answer to close from client".into());
            return;
        }
        let hb = Duration::from_secs(u64::from(s.heartbeat()));
        if s.is_open() && !hb.is_zero() {
            if now.duration_since(activity.last_read) >= hb * 2 {
                s.finish(format!(
                    "missed heartbeats from client, timeout: {}s",
                    hb.as_secs()
                ));
                return;
            }
            if now.duration_since(activity.last_write) >= hb && !activity.output_pending {
                Writer::start(s.output(), key::HEARTBEAT, 1).finish();
            }
        }
    }

    fn is_closed(&self) -> bool {
        self.session.is_closed()
    }

    fn shutdown(&mut self) {
        self.session.shutdown();
    }

    fn finish(&mut self, end: End) {
        let s = &mut self.session;
        match end {
            End::Closed => {}
            End::PeerClosed => s.finish("client closed the socket".into()),
            End::ReadError(e) => s.finish(format!("read error: {e}")),
            End::WriteFailed => s.finish("socket closed while writing".into()),
            End::BrokerGone => s.finish("broker stopped".into()),
        }
        let reason = s.close_reason().unwrap_or("closed");
        tracing::debug!(peer = %self.peer, user = s.user(), reason, "stream connection closed");
    }
}

/// The earlier of an optional deadline and another.
fn earliest(a: Option<Instant>, b: Instant) -> Option<Instant> {
    Some(a.map_or(b, |a| a.min(b)))
}
