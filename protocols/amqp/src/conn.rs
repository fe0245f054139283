//! The connection task: the only async code of the AMQP adapter.
//!
//! One task per connection owns the socket and the [`Session`], and waits with
//! `select!` on: bytes to read, room to write, deliveries in its outbox, the
//! memory alarm, heartbeat/handshake timers and broker shutdown. Reading and
//! writing proceed independently, so a client that is busy writing to us while
//! not reading (a full socket both ways) cannot deadlock the connection; instead
//! the task stops reading once too much output is waiting (back-pressure), and
//! stops taking deliveries from the outbox, which makes queues hold back.
//!
//! Everything produced while handling one read (replies, confirms, deliveries) is
//! written with one `write` call when the socket accepts it, not one per frame.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use switchyard_core::Broker;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, Instant};
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
}

/// Stop reading and taking deliveries while this much output waits to be written.
const OUTPUT_HIGH_WATER: usize = 1024 * 1024;
/// Read buffer growth step.
const READ_CHUNK: usize = 64 * 1024;
/// How long to wait for the client's close-ok after our connection.close.
const CLOSE_OK_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the socket stays open after our close-ok for the client to close it
/// (RabbitMQ's `CLOSING_TIMEOUT`; a shorter negotiated heartbeat wins).
const PEER_CLOSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one AMQP connection until it closes or `shutdown` fires (then the
/// client gets connection.close 320 CONNECTION_FORCED).
pub async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    broker: Arc<Broker>,
    settings: Arc<AmqpSettings>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut session = Session::new(broker.clone(), settings.clone(), peer);
    let outbox = session.outbox();
    let mut alarm = broker.memory.subscribe();
    let mut synced = session.synced();
    let mut input = BytesMut::with_capacity(READ_CHUNK);
    let mut output = BytesMut::with_capacity(READ_CHUNK);
    let started = Instant::now();
    let handshake_deadline = started + settings.handshake_timeout;
    let mut last_read = started;
    let mut last_write = started;
    let mut closing_deadline: Option<Instant> = None;
    let mut shutting_down = false;

    loop {
        take_output(&mut session, &mut output);
        if session.is_closed() {
            // Flush what is left (e.g. connection.close-ok), then close.
            if !output.is_empty() {
                let _ = tokio::time::timeout(CLOSE_OK_TIMEOUT, writer.write_all(&output)).await;
            }
            if session.peer_closes() && !shutting_down {
                let hb = Duration::from_secs(u64::from(session.heartbeat()));
                let wait = if hb.is_zero() {
                    PEER_CLOSE_TIMEOUT
                } else {
                    hb.min(PEER_CLOSE_TIMEOUT)
                };
                await_peer_close(&mut reader, &mut input, Instant::now() + wait, &shutdown).await;
            }
            break;
        }
        if session.is_closing() && closing_deadline.is_none() {
            closing_deadline = Some(Instant::now() + CLOSE_OK_TIMEOUT);
        }
        let alarm_on = *alarm.borrow();
        if alarm_on && session.blocks_on_alarm() {
            session.set_blocked(true);
            take_output(&mut session, &mut output);
        }
        let room = output.len() < OUTPUT_HIGH_WATER;
        let may_read = room && !(alarm_on && session.blocks_on_alarm());
        if input.capacity() - input.len() < READ_CHUNK / 4 {
            input.reserve(READ_CHUNK);
        }
        let timer = next_timer(
            &session,
            started,
            handshake_deadline,
            last_read,
            last_write,
            closing_deadline,
        );

        tokio::select! {
            written = writer.write_buf(&mut output), if !output.is_empty() => match written {
                Ok(0) | Err(_) => {
                    session.finish("socket closed while writing".into());
                    break;
                }
                Ok(_) => last_write = Instant::now(),
            },
            read = reader.read_buf(&mut input), if may_read => match read {
                Ok(0) => {
                    session.finish("client closed the socket".into());
                    break;
                }
                Err(e) => {
                    session.finish(format!("read error: {e}"));
                    break;
                }
                Ok(_) => {
                    last_read = Instant::now();
                    session.handle_input(&mut input);
                }
            },
            () = outbox.wait(), if room => session.handle_outbox(),
            changed = wait_synced(&mut synced), if session.awaits_sync() => {
                if changed {
                    session.flush_confirms();
                } else {
                    // The store is gone (shutting down): nothing more will sync.
                    synced = None;
                }
            }
            changed = alarm.changed() => {
                if changed.is_ok() {
                    let on = *alarm.borrow_and_update();
                    session.set_blocked(on);
                }
            }
            () = sleep_until(timer) => {
                let now = Instant::now();
                if !session.is_open() && !session.is_closing() && now >= handshake_deadline {
                    session.finish("handshake timeout".into());
                    continue;
                }
                if closing_deadline.is_some_and(|d| now >= d) {
                    session.finish("no connection.close-ok from client".into());
                    continue;
                }
                let hb = Duration::from_secs(u64::from(session.heartbeat()));
                if session.is_open() && !hb.is_zero() {
                    if now.duration_since(last_read) >= hb * 2 {
                        session.finish(format!("missed heartbeats from client, timeout: {}s", hb.as_secs()));
                        continue;
                    }
                    if now.duration_since(last_write) >= hb / 2 && output.is_empty() {
                        codec::encode_heartbeat(&mut output);
                    }
                }
            }
            () = shutdown.cancelled(), if !shutting_down => {
                shutting_down = true;
                session.shutdown();
            }
        }
    }
    let _ = writer.shutdown().await;
    let reason = session.close_reason().unwrap_or("closed");
    tracing::debug!(%peer, user = session.user(), reason, "AMQP connection closed");
}

/// After our close-ok, leaves the socket open until the client closes it (reading
/// and dropping anything it still sends), `deadline` passes or the broker stops.
async fn await_peer_close<R: AsyncRead + Unpin>(
    reader: &mut R,
    input: &mut BytesMut,
    deadline: Instant,
    shutdown: &CancellationToken,
) {
    loop {
        input.clear();
        tokio::select! {
            read = reader.read_buf(input) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            () = sleep_until(deadline) => return,
            () = shutdown.cancelled() => return,
        }
    }
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

/// When the task must next look at the clock.
fn next_timer(
    session: &Session,
    started: Instant,
    handshake_deadline: Instant,
    last_read: Instant,
    last_write: Instant,
    closing_deadline: Option<Instant>,
) -> Instant {
    let far = started + Duration::from_secs(365 * 24 * 3600);
    let mut next = far;
    if !session.is_open() {
        next = next.min(handshake_deadline);
    }
    if let Some(d) = closing_deadline {
        next = next.min(d);
    }
    let hb = Duration::from_secs(u64::from(session.heartbeat()));
    if session.is_open() && !hb.is_zero() {
        next = next.min(last_write + hb / 2).min(last_read + hb * 2);
    }
    next
}
