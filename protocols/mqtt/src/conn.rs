//! The connection task: the only async code of the MQTT adapter.
//!
//! One task per connection owns the socket (TCP or WebSocket, both are byte
//! streams here) and the [`Session`], and waits with `select!` on: bytes to
//! read, room to write, deliveries in its outbox, the memory alarm, the
//! keep-alive and handshake timers, a takeover of its session by another
//! connection, and broker shutdown. Reading and writing proceed independently;
//! the task stops reading (and taking deliveries) while too much output waits,
//! which is how back-pressure reaches publishers and queues.
//!
//! Everything produced while handling one read is written with one `write`
//! call when the socket accepts it, not one per packet.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use switchyard_core::Broker;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use crate::session::{Now, Session};
use crate::state::MqttState;
use crate::MqttSettings;

/// Stop reading and taking deliveries while this much output waits.
const OUTPUT_HIGH_WATER: usize = 1024 * 1024;
/// Read buffer growth step.
const READ_CHUNK: usize = 64 * 1024;
/// How long the last packets (a DISCONNECT, a refusing CONNACK) may take to go.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

/// Serves one MQTT connection until it closes or `shutdown` fires.
pub async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    broker: Arc<Broker>,
    state: Arc<MqttState>,
    settings: Arc<MqttSettings>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut session = Session::new(broker.clone(), state, settings.clone(), peer);
    let outbox = session.outbox();
    let kicked = session.kicked();
    let mut synced = session.synced();
    let mut alarm = broker.memory.subscribe();
    let mut input = BytesMut::with_capacity(READ_CHUNK);
    let mut output = BytesMut::new();
    let started = Instant::now();
    let handshake_deadline = started + settings.handshake_timeout;
    let mut last_read = started;
    let mut shutting_down = false;
    let mut end = "closed";

    loop {
        take_output(&mut session, &mut output);
        if session.is_closed() {
            if !output.is_empty() {
                let _ = tokio::time::timeout(FLUSH_TIMEOUT, writer.write_all(&output)).await;
            }
            break;
        }
        let blocked = *alarm.borrow() && session.blocks_on_alarm();
        let room = output.len() < OUTPUT_HIGH_WATER;
        let may_read = room && !blocked;
        if input.capacity() - input.len() < READ_CHUNK / 4 {
            input.reserve(READ_CHUNK);
        }
        // Keep-alive (spec 3.1.2.10): silent for 1.5 times the interval = gone.
        let timer = match session.keep_alive() {
            Some(ka) => last_read + ka + ka / 2,
            None if !session.is_connected() => handshake_deadline,
            None => started + Duration::from_secs(365 * 24 * 3600),
        };

        tokio::select! {
            written = writer.write_buf(&mut output), if !output.is_empty() => match written {
                Ok(0) | Err(_) => {
                    end = "socket closed while writing";
                    break;
                }
                Ok(_) => {}
            },
            read = reader.read_buf(&mut input), if may_read => match read {
                Ok(0) => {
                    end = "client closed the socket";
                    break;
                }
                Err(_) => {
                    end = "read error";
                    break;
                }
                Ok(_) => {
                    last_read = Instant::now();
                    session.handle_input(&mut input, Now::read());
                }
            },
            () = outbox.wait(), if room => session.handle_outbox(Now::read()),
            changed = wait_synced(&mut synced), if session.awaits_sync() => {
                if changed {
                    session.flush_acks();
                } else {
                    // The store is gone (shutting down): nothing more will sync.
                    synced = None;
                }
            }
            changed = alarm.changed() => {
                if changed.is_err() {
                    // The broker is gone; nothing will clear the alarm now.
                    end = "broker stopped";
                    break;
                }
            }
            () = kicked.cancelled(), if session.is_connected() => session.taken_over(),
            () = sleep_until(timer) => {
                if session.is_connected() {
                    session.keep_alive_expired();
                } else {
                    session.handshake_timeout();
                }
            }
            () = shutdown.cancelled(), if !shutting_down => {
                shutting_down = true;
                session.shutdown();
            }
        }
    }
    session.finish(end, Now::read());
    let _ = writer.shutdown().await;
    tracing::debug!(%peer, client_id = session.client_id(), user = session.user(), reason = session.close_reason().unwrap_or(end), "MQTT connection closed");
}

/// Waits for the store's synced position to move; false if it never will.
async fn wait_synced(synced: &mut Option<tokio::sync::watch::Receiver<u64>>) -> bool {
    match synced {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Moves what the session produced into the socket's output buffer.
fn take_output(session: &mut Session, output: &mut BytesMut) {
    let produced = session.output();
    if produced.is_empty() {
        return;
    }
    if output.is_empty() {
        std::mem::swap(output, produced);
    } else {
        output.extend_from_slice(produced);
        produced.clear();
    }
}
