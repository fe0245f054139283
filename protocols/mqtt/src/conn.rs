//! The connection task: the MQTT session run by the shared connection driver
//! ([`switchyard_driver::drive`]: the select loop over the byte stream, outbox,
//! store sync, memory alarm, timers and shutdown). The stream is a TCP socket or
//! a WebSocket seen as bytes. What is MQTT's here: the keep-alive and handshake
//! timers, and the takeover of the session by another connection with the same
//! client identifier.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use switchyard_core::Broker;
use switchyard_driver::{Activity, End, Signals};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::session::{Now, Session};
use crate::state::MqttState;
use crate::MqttSettings;

/// Serves one MQTT connection until it closes or `shutdown` fires.
///
/// Not an `async fn`: the session is built here and moved straight into the
/// driver's box. In an `async fn` it would be a local of the connection's
/// future, which keeps room for it (about 1 kB) for as long as it runs.
pub fn serve<S>(
    stream: S,
    peer: SocketAddr,
    broker: Arc<Broker>,
    state: Arc<MqttState>,
    settings: Arc<MqttSettings>,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let session = Session::new(broker.clone(), state, settings.clone(), peer);
    let signals = Signals {
        outbox: session.outbox(),
        synced: session.synced(),
        alarm: broker.memory.subscribe(),
        takeover: Some(session.kicked()),
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
        self.session.handle_input(input, Now::read());
    }

    fn handle_outbox(&mut self) {
        self.session.handle_outbox(Now::read());
    }

    fn input_paused(&self) -> bool {
        self.session.login_pending()
    }

    fn awaits_sync(&self) -> bool {
        self.session.awaits_sync()
    }

    fn synced(&mut self) {
        self.session.flush_acks();
    }

    fn blocks_on_alarm(&self) -> bool {
        self.session.blocks_on_alarm()
    }

    fn takeover_applies(&self) -> bool {
        self.session.is_connected()
    }

    fn taken_over(&mut self) {
        self.session.taken_over();
    }

    fn next_deadline(&mut self, activity: &Activity) -> Option<Instant> {
        let keep_alive = match self.session.keep_alive() {
            // Keep-alive (spec 3.1.2.10): silent for 1.5 times the interval = gone.
            Some(ka) => Some(activity.last_read + ka + ka / 2),
            None if !self.session.is_connected() => Some(self.handshake_deadline),
            None => None,
        };
        match (keep_alive, self.session.token_expires()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn deadline(&mut self, now: Instant, activity: &Activity) {
        if !self.session.is_connected() {
            self.session.handshake_timeout();
        } else if self.session.token_expires().is_some_and(|at| now >= at) {
            self.session.token_expired();
        } else if self
            .session
            .keep_alive()
            .is_some_and(|ka| now >= activity.last_read + ka + ka / 2)
        {
            self.session.keep_alive_expired();
        }
    }

    fn is_closed(&self) -> bool {
        self.session.is_closed()
    }

    fn shutdown(&mut self) {
        self.session.shutdown();
    }

    fn finish(&mut self, end: End) {
        let end = match end {
            End::Closed => "closed",
            End::PeerClosed => "client closed the socket",
            End::ReadError(_) => "read error",
            End::WriteFailed => "socket closed while writing",
            End::BrokerGone => "broker stopped",
        };
        let s = &mut self.session;
        s.finish(end, Now::read());
        tracing::debug!(peer = %self.peer, client_id = s.client_id(), user = s.user(), reason = s.close_reason().unwrap_or(end), "MQTT connection closed");
    }
}
