//! The connection driver: the one async loop that every protocol adapter (AMQP,
//! MQTT, STOMP, and the next one) runs its sessions in.
//!
//! A protocol's session is a state machine that never touches a socket: it takes
//! bytes and produces bytes (DESIGN.md, "Transport layer + connection driver").
//! [`drive`] owns the byte stream (TCP, or a WebSocket seen as bytes) and the
//! session, and waits with one `select!` on: bytes to read, room to write,
//! deliveries in the session's outbox, the store's synced position, the memory
//! alarm, the session's next deadline (handshake, heartbeats, keep-alive), a
//! takeover of the session by another connection, and broker shutdown.
//!
//! - Reading and writing proceed independently, so a client that writes without
//!   reading cannot deadlock its connection; instead the driver stops reading,
//!   and stops taking deliveries from the outbox, while more than
//!   [`OUTPUT_HIGH_WATER`] bytes wait to be written. That is how back-pressure
//!   reaches publishers and queues.
//! - Flow control (switchyard_core::flow): while a read is handled, the queues
//!   it published into that are behind their consumers are recorded; the driver
//!   then stops reading (and only reading) until they catch up, or at most
//!   [`FLOW_MAX_PAUSE`] per read. This is the one hook of it here.
//! - A connection yields to the runtime after every [`YIELD_AFTER`] bytes it
//!   handled, so the consumers its messages woke run while its client keeps
//!   streaming, even when the queue between them never falls behind (an MQTT
//!   subscription queue that drops its oldest at a limit).
//! - Everything produced while handling one read (replies, confirms,
//!   deliveries) goes out with one `write` when the stream accepts it.
//! - When the session closes, what it produced last (a close, an ERROR, a
//!   DISCONNECT) is flushed within [`FLUSH_TIMEOUT`]; a session whose peer closes
//!   the socket (AMQP after close-ok) is given the time to.
//!
//! The driver is generic over the [`Session`] trait and the stream, so each
//! adapter gets its own monomorphised copy: no dynamic dispatch and no allocation
//! per message beyond what the loops it replaces did.
//!
//! It must not know any protocol (no parsing, no reply codes, no texts), and it
//! must not open listeners or touch files.
//!
//! It is a crate of its own rather than a module of the core because it does I/O
//! and the core never touches a socket; the protocol crates depend on it and on
//! the core, never on each other. The transport layer beside it
//! (`switchyard-transport`: TCP, TLS, WebSocket and WebSocket over TLS as one
//! `Stream`, and the one accept loop) hands every adapter its stream, so a new
//! adapter gets every transport at once.

use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use switchyard_core::consumer::Outbox;
use switchyard_core::flow::{self, Blockers};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

mod output;
pub use output::{Output, Sink, SHARED_BODY_MIN};

/// Stop reading and taking deliveries while this much output waits to be written.
pub const OUTPUT_HIGH_WATER: usize = 1024 * 1024;
/// The longest a read waits for lagging queues to catch up before the next one
/// is read anyway: a guard against a connection that both consumes from a
/// queue and publishes into it waiting on itself. A publisher that keeps
/// hitting it still gets only one read per pause in.
pub const FLOW_MAX_PAUSE: Duration = Duration::from_secs(5);
/// Read buffer growth step.
pub const READ_CHUNK: usize = 64 * 1024;
/// How long the last bytes of a closed session (a close, an ERROR, a DISCONNECT)
/// may take to be written before the socket is closed anyway.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a connection we closed first keeps draining the client's input, so
/// that our last packet is read before the socket goes (see [`drive`]).
pub const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// A read, write or session buffer that grew past this (a burst of large
/// messages) is given back once it is empty, so a connection's peak does not
/// stay resident (and count against the memory alarm) after the burst.
pub const KEEP_BUFFER: usize = 2 * 1024 * 1024;
/// Buffers are held only while traffic is heavy. A connection without a read
/// buffer reads through a stack buffer of this size (only the bytes read are
/// copied to the heap), and a read or a write smaller than this that leaves
/// its buffer empty gives the buffer back: an idle connection holds neither
/// a read nor a write buffer. A read that fills it (more is probably waiting)
/// gets a [`READ_CHUNK`] buffer for the next one.
pub const SMALL_IO: usize = 4 * 1024;
/// A streaming connection yields to the runtime after handling this many
/// bytes, so the tasks it woke (its queues' consumers) get a turn. Without it
/// they wait in this worker's LIFO slot, which other workers cannot steal
/// from, until tokio's budget makes the task yield: 128 reads, a quarter of a
/// million small messages over TCP, and never over WebSocket (whose reads,
/// one message each, mostly come from its own buffer and spend no budget).
/// About a thousand 16-byte messages; one yield costs about a microsecond.
pub const YIELD_AFTER: usize = 32 * 1024;
/// The most slices one vectored write passes (Linux takes up to 1024).
pub const MAX_SLICES: usize = 64;

/// What the driver knows about the connection's traffic, for deadlines.
#[derive(Debug, Clone, Copy)]
pub struct Activity {
    /// When the connection was accepted.
    pub started: Instant,
    /// When bytes were last read.
    pub last_read: Instant,
    /// When bytes were last written.
    pub last_write: Instant,
    /// Output is waiting to be written: no heartbeat is needed to show life.
    pub output_pending: bool,
}

/// Why the driver stopped (see [`Session::finish`]).
#[derive(Debug)]
pub enum End {
    /// The session closed (it said so with [`Session::is_closed`]).
    Closed,
    /// The peer closed the stream (end of stream).
    PeerClosed,
    /// Reading failed.
    ReadError(std::io::Error),
    /// Writing failed, or the stream accepted nothing.
    WriteFailed,
    /// The broker is gone: the memory alarm's sender was dropped (seen by
    /// sessions the alarm can block, the only ones that watch it).
    BrokerGone,
}

/// A protocol session as the driver runs it. Methods are called from the
/// connection's task only, one at a time; none of them may block.
pub trait Session {
    /// The bytes the session produced, appended in order; the driver takes them
    /// (leaving the buffer empty) before every wait.
    fn output(&mut self) -> &mut Output;

    /// Bytes arrived. Whole frames are consumed from `input`; a partial frame
    /// stays for the next call.
    fn handle_input(&mut self, input: &mut BytesMut);

    /// The outbox was signalled: take deliveries from it.
    fn handle_outbox(&mut self);

    /// Whether something waits for the store to sync (confirms, acks, receipts).
    fn awaits_sync(&self) -> bool;

    /// The store's synced position moved: send what waited for it.
    fn synced(&mut self);

    /// Whether the memory alarm, when on, should stop reading from this client.
    fn blocks_on_alarm(&self) -> bool;

    /// Whether the memory alarm blocks this session now (it is on and
    /// [`Session::blocks_on_alarm`]). Called every turn of the loop, so the
    /// session acts on changes only; e.g. AMQP's connection.blocked/unblocked.
    fn alarm(&mut self, _blocked: bool) {}

    /// Whether the session takes no input now: a login waits for an external
    /// authentication backend. The driver stops reading (what the client sends
    /// waits in the socket), and once the session is no longer paused after
    /// [`Session::handle_outbox`] (the backend's answer wakes the outbox), it
    /// hands the session the input it already holds.
    fn input_paused(&self) -> bool {
        false
    }

    /// Whether a takeover (see [`Signals::takeover`]) applies now.
    fn takeover_applies(&self) -> bool {
        false
    }

    /// Another connection took this session over.
    fn taken_over(&mut self) {}

    /// When [`Session::deadline`] must next be called; `None`: no deadline.
    fn next_deadline(&mut self, activity: &Activity) -> Option<Instant>;

    /// The deadline given by [`Session::next_deadline`] has passed.
    fn deadline(&mut self, now: Instant, activity: &Activity);

    /// The stream should be closed once the output is flushed.
    fn is_closed(&self) -> bool;

    /// The broker is shutting down: close as the protocol says.
    fn shutdown(&mut self);

    /// Once closed and flushed, how long to leave the stream open for the peer
    /// to close it first (reading and dropping anything it still sends); `None`:
    /// close at once.
    fn peer_closes(&self) -> Option<Duration> {
        None
    }

    /// The driver stopped, for `end`: release what the connection held and log.
    /// Called exactly once, last.
    fn finish(&mut self, end: End);
}

/// What the driver waits on besides the stream and the clock.
pub struct Signals {
    /// Where queues put deliveries for this connection.
    pub outbox: Arc<Outbox>,
    /// The store's synced position (`None`: no store, nothing to wait for).
    pub synced: Option<watch::Receiver<u64>>,
    /// The broker's memory alarm.
    pub alarm: watch::Receiver<bool>,
    /// Cancelled when another connection takes the session over (MQTT).
    pub takeover: Option<CancellationToken>,
    /// Cancelled when the broker shuts down.
    pub shutdown: CancellationToken,
}

/// Runs `session` over `stream` until the session closes, the stream ends or
/// fails, or shutdown has closed it.
pub fn drive<S, T>(stream: T, session: S, signals: Signals) -> impl std::future::Future<Output = ()>
where
    S: Session,
    T: AsyncRead + AsyncWrite + Unpin,
{
    // The session lives in a box of its own, not in the future: an async
    // fn's arguments are stored in its future beside the locals they are
    // moved into, so a session passed by value is paid twice by every
    // connection (about 1.5 kB for MQTT) for as long as it lives.
    run(stream, Box::new(session), signals)
}

/// Not an `async fn`: its arguments would be stored in the future beside
/// the locals they are unpacked into (the stream beside its two halves,
/// `signals` beside its fields). Unpacked here, they are the async block's
/// captures, stored once.
fn run<S, T>(stream: T, session: Box<S>, signals: Signals) -> impl std::future::Future<Output = ()>
where
    S: Session,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let Signals {
        outbox,
        mut synced,
        alarm,
        takeover,
        shutdown,
    } = signals;
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut session = session;
    async move {
        let session = &mut *session;
        // Both allocated on demand, and given back when a small read or write
        // leaves them empty (see SMALL_IO): an idle connection holds neither.
        let mut input = BytesMut::new();
        let mut output = Output::default();
        // Whether the stream writes several slices in one call (TCP, TLS): then
        // large bodies are written from their shared buffers; else they are
        // copied into the output once, as before (see `Output`).
        let vectored = writer.is_write_vectored();
        let started = Instant::now();
        let mut activity = Activity {
            started,
            last_read: started,
            last_write: started,
            output_pending: false,
        };
        let far = started + Duration::from_secs(365 * 24 * 3600);
        let mut shutting_down = false;
        // Waits that most connections never arm live in boxes of their own while
        // armed, kept across turns, instead of in this future: `select!` stores
        // every branch's future whether enabled or not, and these four (a flow
        // pause's timeout, the store's and the alarm's watch, the takeover token)
        // would add about 600 bytes to every idle connection.
        // A flow pause: until the lagging queues the last read published into
        // catch up or its deadline passes.
        let mut flow_paused = None;
        // The store's synced position, while the session awaits it.
        let mut synced_wait = None;
        // The alarm's changes, while the alarm can block the session (see below);
        // `alarm` itself is only read.
        let mut alarm_rx = Some(alarm.clone());
        let mut alarm_wait = None;
        // Another connection taking the session over, while that applies.
        let mut takeover_wait = None;
        // Whether the last turn deliberately did not read (see `paused` below).
        let mut was_paused = false;
        // Bytes handled since this task last yielded to the runtime (see
        // YIELD_AFTER).
        let mut unyielded = 0usize;
        // Whether the read or write buffer held more than KEEP_BUFFER since it was
        // last empty. (`capacity()` cannot tell: it counts from the read position,
        // so a drained buffer reports little while its whole allocation lives on.)
        let (mut input_big, mut output_big) = (false, false);

        let end = loop {
            take_output(session, &mut output, vectored);
            output_big |= output.len() > KEEP_BUFFER;
            if session.is_closed() {
                if !output.is_drained() {
                    output.flatten();
                    let _ =
                        tokio::time::timeout(FLUSH_TIMEOUT, writer.write_all(&output[..])).await;
                }
                if let Some(wait) = session.peer_closes().filter(|_| !shutting_down) {
                    let deadline = Instant::now() + wait;
                    await_peer_close(&mut reader, &mut input, deadline, &shutdown).await;
                } else if !shutting_down {
                    // We close first (a DISCONNECT, an ERROR, a refusal): send our FIN,
                    // then read and drop what the client still sends for a moment.
                    // Closing a socket with unread input makes the kernel answer with a
                    // RST, which can reach the client before it has read our last packet
                    // (a client publishing fast sees "connection reset", not the reason).
                    let _ = writer.shutdown().await;
                    let deadline = Instant::now() + CLOSE_LINGER;
                    await_peer_close(&mut reader, &mut input, deadline, &shutdown).await;
                }
                break End::Closed;
            }
            // The alarm is told only to sessions it blocks (AMQP: those that
            // published), every turn, so a session that starts publishing while it
            // is on hears it; the session acts on changes. A pure consumer must not
            // hear it: lapin stops writing altogether (acks, heartbeats) once blocked.
            let blocked = *alarm.borrow() && session.blocks_on_alarm();
            session.alarm(blocked);
            take_output(session, &mut output, vectored);
            output_big |= output.len() > KEEP_BUFFER;
            let room = output.pending() < OUTPUT_HIGH_WATER;
            // We stop listening on purpose (alarm, flow control, a login waiting
            // for its backend): the client's silence meanwhile is ours, not its,
            // so it does not count towards its heartbeat timeout (RabbitMQ pauses
            // its heartbeat monitor while a connection is blocked). When only our
            // output is backed up, silence still counts.
            // The turn that resumes listening counts too: silence starts there.
            let paused = blocked || flow_paused.is_some() || session.input_paused();
            // Arm what the session now waits for (each box lives until it fires).
            if session.awaits_sync() && synced_wait.is_none() {
                if let Some(rx) = synced.take() {
                    synced_wait = Some(Box::pin(changed_owned(rx)));
                }
            }
            // A session the alarm cannot block does not watch it: it would only be
            // woken for nothing. (Its broker cannot go away while the session holds
            // it, and shutdown reaches it through `shutdown`.)
            if session.blocks_on_alarm() && alarm_wait.is_none() {
                if let Some(rx) = alarm_rx.take() {
                    alarm_wait = Some(Box::pin(changed_owned(rx)));
                }
            }
            if takeover_wait.is_none() && session.takeover_applies() {
                if let Some(token) = &takeover {
                    takeover_wait = Some(Box::pin(token.clone().cancelled_owned()));
                }
            }
            if paused || was_paused {
                activity.last_read = Instant::now();
            }
            was_paused = paused;
            let may_read = room && !paused;
            input_big |= input.len() > KEEP_BUFFER;
            if input.is_empty() && input_big {
                input = BytesMut::with_capacity(READ_CHUNK);
                input_big = false;
            } else if !input.is_empty() && input.capacity() - input.len() < READ_CHUNK / 4 {
                // A partial frame: read big next. (An empty input without a buffer
                // reads through the stack: see `read_some`.)
                input.reserve(READ_CHUNK);
            }
            activity.output_pending = !output.is_drained();
            let timer = session.next_deadline(&activity).unwrap_or(far);

            tokio::select! {
                written = write_output(&mut writer, &mut output), if !output.is_drained() => match written {
                    Ok(0) | Err(_) => break End::WriteFailed,
                    Ok(n) => {
                        activity.last_write = Instant::now();
                        if output.is_drained() && (output_big || n < SMALL_IO) {
                            // The session gets this buffer back at the next take:
                            // a fresh (unallocated) one instead of the burst's, or
                            // of a quiet connection's, allocation.
                            output = Output::default();
                            output_big = false;
                            if n < SMALL_IO {
                                release_if_empty(session.output());
                            }
                        }
                    }
                },
                read = read_some(&mut reader, &mut input), if may_read => match read {
                    Ok(0) => break End::PeerClosed,
                    Err(e) => break End::ReadError(e),
                    Ok(n) => {
                        activity.last_read = Instant::now();
                        if let Some(pause) = handle_read(session, &mut input, activity.last_read) {
                            flow_paused = Some(Box::pin(flow_resumed(pause)));
                        }
                        if input.is_empty() {
                            if n < SMALL_IO {
                                input = BytesMut::new();
                            } else {
                                // More is probably waiting: read it in big chunks.
                                input.reserve(READ_CHUNK);
                            }
                        }
                        unyielded += n;
                        if unyielded >= YIELD_AFTER {
                            unyielded = 0;
                            tokio::task::yield_now().await;
                        }
                    }
                },
                () = armed(&mut flow_paused), if flow_paused.is_some() => flow_paused = None,
                () = outbox.wait(), if room => {
                    let login_pending = session.input_paused();
                    session.handle_outbox();
                    if login_pending && !session.input_paused() && !input.is_empty() {
                        // What arrived while the login waited: handled as a read.
                        if let Some(pause) = handle_read(session, &mut input, Instant::now()) {
                            flow_paused = Some(Box::pin(flow_resumed(pause)));
                        }
                    }
                }
                (rx, changed) = armed(&mut synced_wait), if synced_wait.is_some() && session.awaits_sync() => {
                    synced_wait = None;
                    if changed {
                        synced = Some(rx);
                        session.synced();
                    }
                    // Else the store is gone (shutting down): nothing more will sync.
                }
                (rx, changed) = armed(&mut alarm_wait), if alarm_wait.is_some() => {
                    alarm_wait = None;
                    if !changed {
                        // The broker dropped its alarm: it is gone.
                        break End::BrokerGone;
                    }
                    // Seen; the next turn reads it and tells the session if it
                    // blocks it.
                    alarm_rx = Some(rx);
                }
                () = armed(&mut takeover_wait), if takeover_wait.is_some() && session.takeover_applies() => {
                    takeover_wait = None;
                    session.taken_over();
                }
                () = sleep_until(timer) => {
                    let now = Instant::now();
                    if paused {
                        activity.last_read = now;
                    }
                    session.deadline(now, &activity);
                }
                () = shutdown.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    session.shutdown();
                }
            }
        };
        session.finish(end);
        let _ = writer.shutdown().await;
    }
}

/// Reads into `input`. Without a buffer (an idle connection's), the read goes
/// through a stack buffer of [`SMALL_IO`] bytes, so waiting for bytes holds no
/// heap allocation; what was read is then copied into `input`. (`read_buf`
/// into an empty `BytesMut` would read 64 bytes at a time.) A pending read
/// leaves nothing in the stack buffer, so dropping it between polls is safe.
async fn read_some<R: AsyncRead + Unpin>(
    reader: &mut R,
    input: &mut BytesMut,
) -> std::io::Result<usize> {
    if input.capacity() > input.len() {
        return reader.read_buf(input).await;
    }
    std::future::poll_fn(|cx| {
        // Uninitialised: this runs at every poll of the read branch (each
        // wake-up of the connection, e.g. per delivery batch of a consumer),
        // and zeroing 4 KiB each time measurably slowed a busy consumer.
        let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); SMALL_IO];
        let mut buf = ReadBuf::uninit(&mut stack);
        match Pin::new(&mut *reader).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                input.extend_from_slice(buf.filled());
                Poll::Ready(Ok(buf.filled().len()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Frees an empty buffer's allocation, if it has one. (`capacity()` cannot
/// tell: it counts from the read position, so it is not consulted.)
fn release_if_empty(buf: &mut Output) {
    if buf.is_drained() {
        *buf = Output::default();
    }
}

/// Writes what `output` holds: with one vectored write when bodies are
/// spliced in (at most [`MAX_SLICES`] slices a call), else from the buffer.
async fn write_output<W: AsyncWrite + Unpin>(
    writer: &mut W,
    output: &mut Output,
) -> std::io::Result<usize> {
    if !output.has_bodies() {
        return writer.write_buf(&mut **output).await;
    }
    std::future::poll_fn(|cx| {
        let polled = {
            let slices = output.slices(MAX_SLICES);
            Pin::new(&mut *writer).poll_write_vectored(cx, &slices)
        };
        if let Poll::Ready(Ok(n)) = polled {
            output.advance(n);
        }
        polled
    })
    .await
}

/// Hands the session what was read, recording the lagging queues it
/// published into (flow control); returns the pause they call for, if any.
fn handle_read<S: Session>(
    session: &mut S,
    input: &mut BytesMut,
    now: Instant,
) -> Option<(Blockers, Instant)> {
    let ((), lagging) = flow::record(|| session.handle_input(input));
    (!lagging.is_empty()).then(|| (lagging, now + FLOW_MAX_PAUSE))
}

/// Moves what the session produced into the stream's output buffer: a swap when
/// nothing is pending (no copy on the hot path), else an append. A stream that
/// cannot write vectored gets the bodies copied in.
fn take_output<S: Session + ?Sized>(session: &mut S, output: &mut Output, vectored: bool) {
    let produced = session.output();
    if produced.is_drained() {
        return;
    }
    if !vectored {
        produced.flatten();
    }
    if output.is_drained() {
        // The session now fills what was our (empty) buffer; one that held a
        // burst was replaced by a fresh one once written (see `output_big`).
        std::mem::swap(output, produced);
    } else {
        output.append(produced);
    }
}

/// Waits until the lagging queues caught up or the pause's deadline passed.
async fn flow_resumed((lagging, until): (Blockers, Instant)) {
    let _ = tokio::time::timeout_at(until, lagging.wait()).await;
}

/// Waits for a change of `rx`'s value, and gives `rx` back; false if the
/// sender is gone (nothing will change any more).
async fn changed_owned<T>(mut rx: watch::Receiver<T>) -> (watch::Receiver<T>, bool) {
    let changed = rx.changed().await.is_ok();
    (rx, changed)
}

/// Waits for an armed wait (see `run`) to fire; forever if none is armed.
/// The caller disarms it (`None`) once it fired: it must not be polled again.
async fn armed<F: std::future::Future>(wait: &mut Option<Pin<Box<F>>>) -> F::Output {
    match wait {
        Some(f) => f.as_mut().await,
        None => std::future::pending().await,
    }
}

/// After the session closed, leaves the stream open until the peer closes it
/// (reading and dropping anything it still sends), `deadline` passes or the
/// broker stops.
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;

    /// Echoes each line back; "bye\n" closes (after "ok\n"); a deadline, when
    /// set, writes "tick\n"; shutdown writes "shutdown\n" and closes.
    #[derive(Default)]
    struct Echo {
        out: Output,
        closed: bool,
        linger: Option<Duration>,
        tick_every: Option<Duration>,
        ticks: usize,
        /// Blocked by the alarm (as a publisher is); says "blocked"/"unblocked".
        publishes: bool,
        told_blocked: bool,
        /// Closes with "silent" when nothing was read for this long.
        silence_timeout: Option<Duration>,
        ended: Option<tokio::sync::oneshot::Sender<String>>,
        /// The input buffer's allocation at each `handle_input`, and the
        /// output buffer's at each deadline (what an idle connection holds).
        seen: Arc<std::sync::Mutex<Seen>>,
        /// Counted by another task each time it runs (see `Seen`).
        other_task: Option<Arc<std::sync::atomic::AtomicUsize>>,
    }

    #[derive(Default)]
    struct Seen {
        input_capacity: Vec<usize>,
        output_capacity: Vec<usize>,
        /// `other_task`'s count at each `handle_input`, when set.
        other_task_at_input: Vec<usize>,
    }

    impl Session for Echo {
        fn output(&mut self) -> &mut Output {
            &mut self.out
        }
        fn handle_input(&mut self, input: &mut BytesMut) {
            if let Ok(mut seen) = self.seen.lock() {
                seen.input_capacity.push(input.capacity());
                if let Some(count) = &self.other_task {
                    seen.other_task_at_input
                        .push(count.load(std::sync::atomic::Ordering::Relaxed));
                }
            }
            while let Some(n) = input.iter().position(|b| *b == b'\n') {
                let line = input.split_to(n + 1);
                if &line[..] == b"big\n" {
                    // A large body between two frames' bytes.
                    self.out.extend_from_slice(b"<");
                    self.out.put_body(&big_body());
                    self.out.extend_from_slice(b">\n");
                    continue;
                }
                if &line[..] == b"bye\n" {
                    self.out.extend_from_slice(b"ok\n");
                    self.closed = true;
                    return;
                }
                self.out.extend_from_slice(&line);
            }
        }
        fn handle_outbox(&mut self) {}
        fn awaits_sync(&self) -> bool {
            false
        }
        fn synced(&mut self) {}
        fn blocks_on_alarm(&self) -> bool {
            self.publishes
        }
        fn alarm(&mut self, blocked: bool) {
            if blocked != self.told_blocked {
                self.told_blocked = blocked;
                let said: &[u8] = if blocked {
                    b"blocked\n"
                } else {
                    b"unblocked\n"
                };
                self.out.extend_from_slice(said);
            }
        }
        fn next_deadline(&mut self, activity: &Activity) -> Option<Instant> {
            // As a heartbeat: none while output waits to be written.
            let tick = self
                .tick_every
                .filter(|_| !activity.output_pending)
                .map(|t| activity.last_write + t);
            let silence = self.silence_timeout.map(|t| activity.last_read + t);
            match (tick, silence) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
        fn deadline(&mut self, now: Instant, activity: &Activity) {
            if let Ok(mut seen) = self.seen.lock() {
                seen.output_capacity.push(self.out.capacity());
            }
            if let Some(t) = self.silence_timeout {
                if now.duration_since(activity.last_read) >= t {
                    self.out.extend_from_slice(b"silent\n");
                    self.closed = true;
                    return;
                }
            }
            if self.tick_every.is_some() {
                self.ticks += 1;
                self.out.extend_from_slice(b"tick\n");
            }
        }
        fn is_closed(&self) -> bool {
            self.closed
        }
        fn shutdown(&mut self) {
            self.out.extend_from_slice(b"shutdown\n");
            self.closed = true;
        }
        fn peer_closes(&self) -> Option<Duration> {
            self.linger
        }
        fn finish(&mut self, end: End) {
            if let Some(tx) = self.ended.take() {
                let _ = tx.send(format!("{end:?}"));
            }
        }
    }

    /// The signals, and the alarm's sender (the broker's), which must outlive
    /// the driver: its loss means the broker is gone.
    fn signals(shutdown: &CancellationToken) -> (Signals, watch::Sender<bool>) {
        let (alarm_tx, alarm) = watch::channel(false);
        let signals = Signals {
            outbox: Outbox::new(16),
            synced: None,
            alarm,
            takeover: None,
            shutdown: shutdown.clone(),
        };
        (signals, alarm_tx)
    }

    async fn read_all(c: &mut DuplexStream) -> Vec<u8> {
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        got
    }

    #[tokio::test]
    async fn input_reaches_the_session_and_its_output_the_peer_then_close_flushes() {
        let (mut client, server) = tokio::io::duplex(1024);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let session = Echo {
            ended: Some(tx),
            ..Default::default()
        };
        let (signals, _alarm) = signals(&CancellationToken::new());
        let task = tokio::spawn(drive(server, session, signals));
        client.write_all(b"one\ntwo\nbye\nignored\n").await.unwrap();
        assert_eq!(read_all(&mut client).await, b"one\ntwo\nok\n");
        task.await.unwrap();
        assert_eq!(rx.await.unwrap(), "Closed");
    }

    #[tokio::test]
    async fn the_peer_closing_ends_the_driver() {
        let (client, server) = tokio::io::duplex(1024);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let session = Echo {
            ended: Some(tx),
            ..Default::default()
        };
        let (signals, _alarm) = signals(&CancellationToken::new());
        let task = tokio::spawn(drive(server, session, signals));
        drop(client);
        task.await.unwrap();
        assert_eq!(rx.await.unwrap(), "PeerClosed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lingering_session_waits_for_the_peer_to_close_or_the_deadline() {
        let (mut client, server) = tokio::io::duplex(1024);
        let session = Echo {
            linger: Some(Duration::from_secs(30)),
            ..Default::default()
        };
        let (signals, _alarm) = signals(&CancellationToken::new());
        let task = tokio::spawn(drive(server, session, signals));
        client.write_all(b"bye\n").await.unwrap();
        let mut ok = [0u8; 3];
        client.read_exact(&mut ok).await.unwrap();
        assert_eq!(&ok, b"ok\n");
        // Still open: nothing more to read, and no end of stream, for 29 s.
        let mut byte = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_secs(29), client.read(&mut byte)).await;
        assert!(early.is_err(), "closed before the peer or the deadline");
        // What the peer sends meanwhile is dropped; the deadline then closes.
        client.write_all(b"more\n").await.unwrap();
        assert_eq!(read_all(&mut client).await, b"");
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_fire_when_the_session_says_and_shutdown_closes() {
        let (mut client, server) = tokio::io::duplex(1024);
        let session = Echo {
            tick_every: Some(Duration::from_secs(5)),
            ..Default::default()
        };
        let shutdown = CancellationToken::new();
        let (signals, _alarm) = signals(&shutdown);
        let task = tokio::spawn(drive(server, session, signals));
        let start = Instant::now();
        let mut tick = [0u8; 5];
        client.read_exact(&mut tick).await.unwrap();
        assert_eq!(&tick, b"tick\n");
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        client.read_exact(&mut tick).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        shutdown.cancel();
        assert_eq!(read_all(&mut client).await, b"shutdown\n");
        task.await.unwrap();
    }

    // Only a session the alarm can block watches it (the others' brokers
    // cannot go away under them: they hold them), so this one publishes.
    #[tokio::test]
    async fn the_broker_going_away_ends_the_driver() {
        let (_client, server) = tokio::io::duplex(1024);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let session = Echo {
            ended: Some(tx),
            publishes: true,
            ..Default::default()
        };
        let (signals, alarm) = signals(&CancellationToken::new());
        let task = tokio::spawn(drive(server, session, signals));
        drop(alarm);
        task.await.unwrap();
        assert_eq!(rx.await.unwrap(), "BrokerGone");
    }

    async fn read_line(c: &mut DuplexStream) -> String {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while c.read_exact(&mut byte).await.is_ok() {
            line.push(byte[0]);
            if byte[0] == b'\n' {
                break;
            }
        }
        String::from_utf8(line).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn the_alarm_is_told_only_to_connections_it_blocks() {
        let shutdown = CancellationToken::new();
        let (alarm_tx, alarm) = watch::channel(false);
        let start = |publishes: bool| {
            let (client, server) = tokio::io::duplex(1024);
            let session = Echo {
                publishes,
                ..Default::default()
            };
            let signals = Signals {
                outbox: Outbox::new(16),
                synced: None,
                alarm: alarm.clone(),
                takeover: None,
                shutdown: shutdown.clone(),
            };
            tokio::spawn(drive(server, session, signals));
            client
        };
        let mut publisher = start(true);
        let mut consumer = start(false);
        alarm_tx.send(true).unwrap();
        assert_eq!(read_line(&mut publisher).await, "blocked\n");
        // The consumer hears nothing of it and is still read.
        consumer.write_all(b"ack\n").await.unwrap();
        assert_eq!(read_line(&mut consumer).await, "ack\n");
        // The blocked publisher is not read until the alarm clears.
        publisher.write_all(b"publish\n").await.unwrap();
        let early = tokio::time::timeout(Duration::from_secs(60), read_line(&mut publisher)).await;
        assert!(early.is_err(), "a blocked connection was read");
        alarm_tx.send(false).unwrap();
        assert_eq!(read_line(&mut publisher).await, "unblocked\n");
        assert_eq!(read_line(&mut publisher).await, "publish\n");
        shutdown.cancel();
        drop(alarm_tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_we_do_not_read_is_not_timed_out_for_silence() {
        let (mut client, server) = tokio::io::duplex(1024);
        let session = Echo {
            publishes: true,
            silence_timeout: Some(Duration::from_secs(10)),
            ..Default::default()
        };
        let (signals, alarm) = signals(&CancellationToken::new());
        let task = tokio::spawn(drive(server, session, signals));
        alarm.send(true).unwrap();
        assert_eq!(read_line(&mut client).await, "blocked\n");
        // Blocked for six timeouts: its silence is ours, it stays connected.
        tokio::time::sleep(Duration::from_secs(60)).await;
        alarm.send(false).unwrap();
        assert_eq!(read_line(&mut client).await, "unblocked\n");
        client.write_all(b"still here\n").await.unwrap();
        assert_eq!(read_line(&mut client).await, "still here\n");
        // Once read again, a silent client is timed out as before.
        assert_eq!(read_line(&mut client).await, "silent\n");
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_connection_holds_no_read_or_write_buffer() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
        let session = Echo {
            tick_every: Some(Duration::from_secs(5)),
            seen: seen.clone(),
            ..Default::default()
        };
        let shutdown = CancellationToken::new();
        let (signals, _alarm) = signals(&shutdown);
        let task = tokio::spawn(drive(server, session, signals));
        for line in ["one\n", "two\n"] {
            client.write_all(line.as_bytes()).await.unwrap();
            assert_eq!(read_line(&mut client).await, line);
        }
        // Quiet now: the next deadline sees the session's output buffer.
        assert_eq!(read_line(&mut client).await, "tick\n");
        // A burst is read in big chunks: the buffer it lands in is kept
        // while it lasts (a full stack read asks for a READ_CHUNK one).
        let burst = vec![b'x'; 3 * READ_CHUNK];
        client.write_all(&burst).await.unwrap();
        client.write_all(b"\nthree\n").await.unwrap();
        let mut echoed = vec![0u8; burst.len() + 1];
        client.read_exact(&mut echoed).await.unwrap();
        assert_eq!(read_line(&mut client).await, "three\n");
        shutdown.cancel();
        assert_eq!(read_all(&mut client).await, b"shutdown\n");
        task.await.unwrap();
        let seen = seen.lock().unwrap();
        // Small reads arrive in a buffer just their size (read through the
        // stack), not in a READ_CHUNK one held for the connection's life.
        assert!(
            seen.input_capacity[..2].iter().all(|c| *c < SMALL_IO),
            "{:?}",
            seen.input_capacity
        );
        assert!(
            seen.input_capacity.iter().any(|c| *c >= READ_CHUNK),
            "{:?}",
            seen.input_capacity
        );
        // After small writes, the session's output buffer was given back.
        assert_eq!(seen.output_capacity.first(), Some(&0));
    }

    /// A client that always has another chunk of lines ready (a publisher
    /// streaming faster than the broker reads), `chunks` times, and takes
    /// whatever is written to it. Its reads never return `Pending`, so they
    /// never make the reading task yield by themselves.
    struct Flood {
        chunks: usize,
        /// Bytes per read at most (a WebSocket stream gives one message a read).
        chunk: usize,
    }

    impl AsyncRead for Flood {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if self.chunks > 0 {
                self.chunks -= 1;
                let line = b"0123456789abcde\n";
                let mut room = buf.remaining().min(self.chunk);
                while room >= line.len() {
                    buf.put_slice(line);
                    room -= line.len();
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Flood {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// The MQTT S5 collapse: a publisher's task that always had input handled
    /// it for hundreds of thousands of messages before the subscriber's task
    /// (woken by those very messages) got a turn. On one thread, so the order
    /// of turns is deterministic. Large reads (TCP) and small ones (WebSocket:
    /// one message a read) alike.
    #[tokio::test(flavor = "current_thread")]
    async fn a_streaming_connection_lets_other_tasks_run_between_chunks() {
        for (chunk, chunks) in [(READ_CHUNK, 50), (1024, 400)] {
            // The reads in a row that found the other task had not run since
            // the one before: at most those of YIELD_AFTER bytes (and the
            // first, small, read).
            let longest = reads_without_other_tasks(Flood { chunks, chunk }).await;
            assert!(
                longest <= YIELD_AFTER / chunk + 2,
                "{chunk}-byte reads: {longest} in a row without a yield"
            );
        }
    }

    async fn reads_without_other_tasks(flood: Flood) -> usize {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let chunks = flood.chunks;
        let count = Arc::new(AtomicUsize::new(0));
        let other = tokio::spawn({
            let count = count.clone();
            async move {
                loop {
                    count.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            }
        });
        let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
        let session = Echo {
            seen: seen.clone(),
            other_task: Some(count.clone()),
            ..Default::default()
        };
        let (signals, _alarm) = signals(&CancellationToken::new());
        drive(flood, session, signals).await;
        other.abort();
        let seen = seen.lock().unwrap();
        let at = &seen.other_task_at_input;
        assert!(at.len() >= chunks, "{} reads", at.len());
        at.chunk_by(|a, b| a == b)
            .map(<[usize]>::len)
            .max()
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn a_frame_split_across_many_reads_is_reassembled() {
        let (mut client, server) = tokio::io::duplex(256);
        let (signals, _alarm) = signals(&CancellationToken::new());
        let task = tokio::spawn(drive(server, Echo::default(), signals));
        // One byte per write, each read on its own: the partial line stays
        // buffered between reads.
        for b in b"split\n" {
            client.write_all(&[*b]).await.unwrap();
            tokio::task::yield_now().await;
        }
        assert_eq!(read_line(&mut client).await, "split\n");
        // A line larger than any buffer step, through a 256-byte pipe.
        let long: Vec<u8> = (0..5 * READ_CHUNK).map(|i| b'a' + (i % 26) as u8).collect();
        let writer = tokio::spawn(async move {
            client.write_all(&long).await.unwrap();
            client.write_all(b"\nbye\n").await.unwrap();
            let got = read_all(&mut client).await;
            (long, got)
        });
        let (long, got) = writer.await.unwrap();
        let mut want = long;
        want.extend_from_slice(b"\nok\n");
        assert_eq!(got.len(), want.len());
        assert!(got == want, "the long line came back changed");
        task.await.unwrap();
    }

    fn big_body() -> bytes::Bytes {
        (0..4 * SHARED_BODY_MIN)
            .map(|i| b'a' + u8::try_from(i % 26).unwrap())
            .collect::<Vec<u8>>()
            .into()
    }

    /// Over TCP (vectored writes: the body is written from its buffer) and a
    /// pipe (no vectored writes: it is copied), a large body arrives in its
    /// place between the bytes around it.
    #[tokio::test]
    async fn large_bodies_are_written_in_order_whatever_the_stream() {
        let want = |n: usize| {
            let mut v = Vec::new();
            for _ in 0..n {
                v.extend_from_slice(b"one\n<");
                v.extend_from_slice(&big_body());
                v.extend_from_slice(b">\n");
            }
            v.extend_from_slice(b"ok\n");
            v
        };
        let script = b"one\nbig\none\nbig\none\nbig\nbye\n";

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        assert!(server.is_write_vectored());
        let (signals_tcp, _alarm_tcp) = signals(&CancellationToken::new());
        let task = tokio::spawn(drive(server, Echo::default(), signals_tcp));
        client.write_all(script).await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert!(
            got == want(3),
            "TCP: {} bytes, want {}",
            got.len(),
            want(3).len()
        );
        task.await.unwrap();

        let (mut pipe, server) = tokio::io::duplex(1024);
        let (signals_pipe, _alarm_pipe) = signals(&CancellationToken::new());
        let task = tokio::spawn(drive(server, Echo::default(), signals_pipe));
        pipe.write_all(script).await.unwrap();
        assert!(read_all(&mut pipe).await == want(3), "pipe");
        task.await.unwrap();
    }
}
