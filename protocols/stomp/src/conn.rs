//! The connection task: the STOMP session run by the shared connection driver
//! ([`switchyard_driver::drive`]: the select loop over the byte stream, outbox,
//! store sync, memory alarm, timers and shutdown). The stream is a TCP socket or
//! a WebSocket seen as bytes: the same code serves both. What is STOMP's here:
//! its timers (handshake, heart-beats both ways). On the memory alarm reading
//! simply pauses: there is nothing to tell a STOMP client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use switchyard_core::Broker;
use switchyard_driver::{Activity, End, Signals};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::codec::{self, Limits};
use crate::session::Session;

/// STOMP settings, from the config's `[stomp]` and `[limits]`.
#[derive(Debug, Clone)]
pub struct StompSettings {
    /// Frame limits: header count, header line length, body size.
    pub limits: Limits,
    /// The vhost for a CONNECT whose `host` names no vhost.
    pub default_vhost: String,
    /// The login used when CONNECT has none (RabbitMQ's `stomp.default_user`);
    /// `None`: CONNECT must carry a login.
    pub default_login: Option<(String, String)>,
    /// The shortest heart-beat interval the broker agrees to, either way.
    pub heartbeat_min: Duration,
    /// Time allowed from accept to CONNECTED.
    pub handshake_timeout: Duration,
}

impl Default for StompSettings {
    fn default() -> Self {
        StompSettings {
            limits: Limits::default(),
            default_vhost: "/".into(),
            default_login: Some(("guest".into(), "guest".into())),
            heartbeat_min: Duration::from_millis(1000),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// A client silent for this many of its promised heart-beat intervals is dead.
/// The spec asks receivers to be tolerant; two intervals absorb one late beat
/// (what RabbitMQ and stompjs do).
const HEARTBEAT_TOLERANCE: u32 = 2;

/// Serves one STOMP connection until it closes or `shutdown` fires (then the
/// client gets an ERROR saying so).
///
/// Not an `async fn`: the session is built here and moved straight into the
/// driver's box. In an `async fn` it would be a local of the connection's
/// future, which keeps room for it (about 1 kB) for as long as it runs.
pub fn serve<S>(
    stream: S,
    peer: SocketAddr,
    broker: Arc<Broker>,
    settings: Arc<StompSettings>,
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
    };
    switchyard_driver::drive(stream, conn, signals)
}

/// The session with the timers the driver asks it about.
struct Conn {
    session: Session,
    peer: SocketAddr,
    handshake_deadline: Instant,
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
        self.session.flush_receipts();
    }

    fn blocks_on_alarm(&self) -> bool {
        self.session.blocks_on_alarm()
    }

    fn next_deadline(&mut self, activity: &Activity) -> Option<Instant> {
        let s = &self.session;
        if !s.is_open() {
            return Some(self.handshake_deadline);
        }
        let mut next = None;
        let beat_out = s.heartbeat_out();
        if !beat_out.is_zero() && !activity.output_pending {
            // Beat at half the interval: a beat that is a little late on the
            // wire still arrives within the client's window.
            next = Some(activity.last_write + beat_out / 2);
        }
        let beat_in = s.heartbeat_in();
        if !beat_in.is_zero() {
            let silent = activity.last_read + beat_in * HEARTBEAT_TOLERANCE;
            next = Some(next.map_or(silent, |n: Instant| n.min(silent)));
        }
        next
    }

    fn deadline(&mut self, now: Instant, activity: &Activity) {
        let s = &mut self.session;
        if !s.is_open() && now >= self.handshake_deadline {
            s.finish("no CONNECT within the handshake timeout".into());
            return;
        }
        let beat_in = s.heartbeat_in();
        if s.is_open()
            && !beat_in.is_zero()
            && now.duration_since(activity.last_read) >= beat_in * HEARTBEAT_TOLERANCE
        {
            s.finish(format!(
                "no heart-beat from the client for {} ms",
                now.duration_since(activity.last_read).as_millis()
            ));
            return;
        }
        let beat_out = s.heartbeat_out();
        if s.is_open()
            && !beat_out.is_zero()
            && now.duration_since(activity.last_write) >= beat_out / 2
            && !activity.output_pending
        {
            // Pending output from now on: no further beat until it is written.
            codec::encode_heartbeat(s.output());
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
            End::PeerClosed => s.finish("client closed the connection".into()),
            End::ReadError(e) => s.finish(format!("read error: {e}")),
            End::WriteFailed => s.finish("socket closed while writing".into()),
            End::BrokerGone => s.finish("broker stopped".into()),
        }
        let reason = s.close_reason().unwrap_or("closed");
        tracing::debug!(peer = %self.peer, user = s.user(), reason, "STOMP connection closed");
    }
}
