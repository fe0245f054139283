//! The connection task: the AMQP session run by the shared connection driver
//! ([`switchyard_driver::drive`]: the select loop over the socket, outbox, store
//! sync, memory alarm, timers and shutdown). What is AMQP's here: its timers
//! (handshake, heartbeats both ways, the wait for close-ok), connection.blocked
//! on the memory alarm, and leaving the socket open after our close-ok until the
//! client closes it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use switchyard_core::Broker;
use switchyard_driver::{Activity, End, Signals};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::codec;
use crate::session::Session;

/// Limits and offers for AMQP connections, from the config.
#[derive(Debug, Clone)]
pub struct AmqpSettings {
    /// Largest frame accepted and offered in connection.tune (>= 4096).
    pub frame_max: u32,
    /// Highest channel number offered in connection.tune.
    pub channel_max: u16,
    /// Heartbeat interval offered, in seconds (0 = off).
    pub heartbeat: u16,
    /// Largest message body accepted.
    pub max_message_size: usize,
    /// Time allowed from accept to connection.open.
    pub handshake_timeout: Duration,
    /// Unacknowledged deliveries one connection may hold over all its channels
    /// and consumers (0 = no cap); deliveries pause at the cap, like a prefetch.
    pub max_unacked_per_connection: u32,
}

/// How long to wait for the client's close-ok after our connection.close.
const CLOSE_OK_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the socket stays open after our close-ok for the client to close it
/// (RabbitMQ's `CLOSING_TIMEOUT`; a shorter negotiated heartbeat wins).
const PEER_CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one AMQP connection until it closes or `shutdown` fires (then the
/// client gets connection.close 320 CONNECTION_FORCED).
///
/// Not an `async fn`: the session is built here and moved straight into the
/// driver's box. In an `async fn` it would be a local of the connection's
/// future, which keeps room for it (about 1 kB) for as long as it runs.
pub fn serve<S>(
    stream: S,
    peer: SocketAddr,
    broker: Arc<Broker>,
    settings: Arc<AmqpSettings>,
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

/// The session with the timers the driver asks it about.
struct Conn {
    session: Session,
    peer: SocketAddr,
    handshake_deadline: Instant,
    /// Set when we sent connection.close: the client's close-ok is due by then.
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
        self.session.login_pending()
    }

    fn awaits_sync(&self) -> bool {
        self.session.awaits_sync()
    }

    fn synced(&mut self) {
        self.session.flush_confirms();
    }

    fn blocks_on_alarm(&self) -> bool {
        self.session.blocks_on_alarm()
    }

    fn alarm(&mut self, on: bool) {
        self.session.set_blocked(on);
    }

    fn next_deadline(&mut self, activity: &Activity) -> Option<Instant> {
        let s = &self.session;
        if s.is_closing() && self.closing_deadline.is_none() {
            self.closing_deadline = Some(Instant::now() + CLOSE_OK_TIMEOUT);
        }
        let mut next = self.closing_deadline;
        if !s.is_open() {
            next = earliest(next, self.handshake_deadline);
        }
        let hb = Duration::from_secs(u64::from(s.heartbeat()));
        if s.is_open() && !hb.is_zero() {
            next = earliest(next, activity.last_read + hb * 2);
            if !activity.output_pending {
                next = earliest(next, activity.last_write + hb / 2);
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
            s.finish("no connection.close-ok from client".into());
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
            if now.duration_since(activity.last_write) >= hb / 2 && !activity.output_pending {
                codec::encode_heartbeat(s.output());
            }
        }
    }

    fn is_closed(&self) -> bool {
        self.session.is_closed()
    }

    fn shutdown(&mut self) {
        self.session.shutdown();
    }

    fn peer_closes(&self) -> Option<Duration> {
        if !self.session.peer_closes() {
            return None;
        }
        let hb = Duration::from_secs(u64::from(self.session.heartbeat()));
        Some(if hb.is_zero() {
            PEER_CLOSE_TIMEOUT
        } else {
            hb.min(PEER_CLOSE_TIMEOUT)
        })
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
        tracing::debug!(peer = %self.peer, user = s.user(), reason, "AMQP connection closed");
    }
}

/// The earlier of an optional deadline and another.
fn earliest(a: Option<Instant>, b: Instant) -> Option<Instant> {
    Some(a.map_or(b, |a| a.min(b)))
}
