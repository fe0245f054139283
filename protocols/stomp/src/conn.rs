//! The connection task: the only async code of the STOMP adapter.
//!
//! One task per connection owns the byte stream (a TCP socket, or a WebSocket
//! seen as bytes: the same code serves both) and the [`Session`], and waits with
//! `select!` on: bytes to read, room to write, deliveries in its outbox, the
//! memory alarm, the handshake and heart-beat timers and broker shutdown. Reading
//! and writing proceed independently, so a client that writes to us without
//! reading cannot deadlock the connection; instead the task stops reading once
//! too much output waits (back-pressure) and stops taking deliveries from the
//! outbox, which makes queues hold back. Everything produced while handling one
//! read is written with one `write` call when the stream accepts it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use switchyard_core::Broker;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{sleep_until, Instant};
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

/// Stop reading and taking deliveries while this much output waits to be written.
const OUTPUT_HIGH_WATER: usize = 1024 * 1024;
/// Read buffer growth step.
const READ_CHUNK: usize = 64 * 1024;
/// How long the last frames (ERROR, RECEIPT of DISCONNECT) may take to flush.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

/// A client silent for this many of its promised heart-beat intervals is dead.
/// The spec asks receivers to be tolerant; two intervals absorb one late beat
/// (what RabbitMQ and stompjs do).
const HEARTBEAT_TOLERANCE: u32 = 2;

/// Serves one STOMP connection until it closes or `shutdown` fires (then the
/// client gets an ERROR saying so).
pub async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    broker: Arc<Broker>,
    settings: Arc<StompSettings>,
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
    let mut shutting_down = false;

    loop {
        take_output(&mut session, &mut output);
        if session.is_closed() {
            if !output.is_empty() {
                let _ = tokio::time::timeout(FLUSH_TIMEOUT, writer.write_all(&output)).await;
            }
            break;
        }
        let alarm_on = *alarm.borrow();
        let room = output.len() < OUTPUT_HIGH_WATER;
        let may_read = room && !(alarm_on && session.blocks_on_alarm());
        if input.capacity() - input.len() < READ_CHUNK / 4 {
            input.reserve(READ_CHUNK);
        }
        let timer = next_timer(&session, started, handshake_deadline, last_read, last_write);

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
                    session.finish("client closed the connection".into());
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
                    session.flush_receipts();
                } else {
                    // The store is gone (shutting down): nothing more will sync.
                    synced = None;
                }
            }
            changed = alarm.changed() => {
                // Nothing to tell a STOMP client: reading simply pauses (above).
                if changed.is_ok() {
                    alarm.borrow_and_update();
                }
            }
            () = sleep_until(timer) => {
                let now = Instant::now();
                if !session.is_open() && now >= handshake_deadline {
                    session.finish("no CONNECT within the handshake timeout".into());
                    continue;
                }
                let beat_in = session.heartbeat_in();
                if session.is_open() && !beat_in.is_zero()
                    && now.duration_since(last_read) >= beat_in * HEARTBEAT_TOLERANCE
                {
                    session.finish(format!(
                        "no heart-beat from the client for {} ms",
                        now.duration_since(last_read).as_millis()
                    ));
                    continue;
                }
                let beat_out = session.heartbeat_out();
                if session.is_open() && !beat_out.is_zero()
                    && now.duration_since(last_write) >= beat_out / 2 && output.is_empty()
                {
                    codec::encode_heartbeat(&mut output);
                    // Counted as written once it is; until then the timer must
                    // not fire again for the same beat.
                    last_write = now;
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
    tracing::debug!(%peer, user = session.user(), reason, "STOMP connection closed");
}

/// Waits for the store's synced position to move; false if it never will.
async fn wait_synced(synced: &mut Option<tokio::sync::watch::Receiver<u64>>) -> bool {
    match synced {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// Moves what the session produced into the stream's output buffer.
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
) -> Instant {
    let mut next = started + Duration::from_secs(365 * 24 * 3600);
    if !session.is_open() {
        next = next.min(handshake_deadline);
    }
    if session.is_open() {
        let beat_out = session.heartbeat_out();
        if !beat_out.is_zero() {
            // Beat at half the interval: a beat that is a little late on the
            // wire still arrives within the client's window.
            next = next.min(last_write + beat_out / 2);
        }
        let beat_in = session.heartbeat_in();
        if !beat_in.is_zero() {
            next = next.min(last_read + beat_in * HEARTBEAT_TOLERANCE);
        }
    }
    next
}
