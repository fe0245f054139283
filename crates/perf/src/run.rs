//! What every protocol client shares: the run's settings, the counters the
//! progress line reads, the latency stamp in the body, and the rate limiter.
//!
//! Each producer and consumer is one task with its own connection. Counters are
//! relaxed atomics bumped once per batch (not per message), and each consumer keeps
//! its own latency histogram, merged at the end, so the client itself stays cheap.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::transport::Transport;

/// How producers and consumers are wired together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Topology {
    /// One queue shared by all consumers (competing consumers). For MQTT, which has
    /// no queues, all subscribers take the same topic, i.e. the same as `fanout`.
    Queue,
    /// Every consumer gets every message (AMQP: a fanout exchange with a queue per
    /// consumer; MQTT: one topic; STOMP: a /topic/ destination).
    Fanout,
    /// Producer i talks to consumer i only (needs as many producers as consumers).
    Pairs,
}

/// Settings of one run, protocol-independent.
#[derive(Debug, Clone)]
pub struct Settings {
    pub addr: SocketAddr,
    pub transport: Transport,
    pub ws_path: String,
    pub user: String,
    pub pass: String,
    pub vhost: String,
    pub producers: usize,
    pub consumers: usize,
    pub size: usize,
    /// Total messages per second over all producers; None = as fast as possible.
    pub rate: Option<f64>,
    /// Unconfirmed messages a producer may have outstanding (AMQP confirms, MQTT
    /// QoS 1 PUBACKs, STOMP receipts); None = no confirms.
    pub confirm: Option<u64>,
    pub prefetch: u16,
    /// Ack every N messages with `multiple`; None = autoack / no acks.
    pub multi_ack: Option<u64>,
    pub persistent: bool,
    pub qos: u8,
    pub mqtt_version: u8,
    pub topology: Topology,
    /// AMQP: route through a topic exchange with this many bindings (S11).
    pub topic_bindings: usize,
    pub idle: usize,
    pub idle_channels: u16,
    pub duration: Duration,
    /// Names are suffixed with this, so runs never see each other's leftovers.
    pub run_id: String,
    /// Stream protocol: the stream to use (default: one per run, deleted after).
    pub stream: Option<String>,
    /// AMQP: the queue to use with `Topology::Queue` (default: one per run,
    /// deleted after).
    pub queue: Option<String>,
    /// Stream protocol: consumers read from the first offset (replay) instead
    /// of the next one.
    pub stream_first: bool,
    /// AMQP: declare the queue(s) as this type (`stream`: durable, consumed
    /// from `next` with manual acks).
    pub queue_type: Option<String>,
    /// Stamp bodies as 16 hex digits rather than 8 raw bytes: STOMP brokers may send
    /// bodies in WebSocket text frames (RabbitMQ does), which must be UTF-8.
    pub text_stamp: bool,
}

impl Settings {
    /// Per-producer rate.
    pub fn producer_rate(&self) -> Option<f64> {
        self.rate.map(|r| r / self.producers.max(1) as f64)
    }
}

/// Counters read by the progress line and the report.
#[derive(Debug, Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub confirmed: AtomicU64,
    pub nacked: AtomicU64,
    pub received: AtomicU64,
    pub received_bytes: AtomicU64,
    /// When a consumer last counted messages, in ns since [`Run::epoch`]: a
    /// replay that reads everything before the window ends is measured over
    /// the time it took, not over the window.
    pub last_received_ns: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Shared by every task of a run.
#[derive(Debug)]
pub struct Run {
    pub settings: Settings,
    pub counters: Counters,
    /// Time zero of the latency stamps (all tasks are in this process).
    pub epoch: Instant,
    /// Set when the measured window ends: producers stop, consumers stop counting.
    /// A watch rather than a fixed instant because consumers subscribe before the
    /// window starts, and it wakes every waiting task at once.
    pub stop: tokio::sync::watch::Sender<bool>,
}

pub type Shared = Arc<Run>;

impl Run {
    pub fn now_nanos(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn new(settings: Settings) -> Shared {
        Arc::new(Run {
            settings,
            counters: Counters::default(),
            epoch: Instant::now(),
            stop: tokio::sync::watch::Sender::new(false),
        })
    }

    pub fn finished(&self) -> bool {
        *self.stop.borrow()
    }

    /// Resolves when the window ends.
    pub async fn stopped(&self) {
        let mut rx = self.stop.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// A body of `size` bytes to stamp (text bodies are filled with `x`, not NUL).
    pub fn body(&self) -> Vec<u8> {
        vec![if self.settings.text_stamp { b'x' } else { 0 }; self.settings.size]
    }

    /// Writes the send time into the start of `body`: 8 bytes big-endian, or 16
    /// hex digits for text bodies (no stamp if the body is too short).
    pub fn stamp(&self, body: &mut [u8]) {
        let now = self.now_nanos();
        if self.settings.text_stamp {
            if let Some(head) = body.get_mut(..16) {
                let hex = format!("{now:016x}");
                head.copy_from_slice(hex.as_bytes());
            }
        } else if let Some(head) = body.get_mut(..8) {
            head.copy_from_slice(&now.to_be_bytes());
        }
    }

    /// Latency of a body stamped by [`Run::stamp`], if it holds a stamp.
    pub fn latency(&self, body: &[u8]) -> Option<u64> {
        let stamp = if self.settings.text_stamp {
            u64::from_str_radix(std::str::from_utf8(body.get(..16)?).ok()?, 16).ok()?
        } else {
            u64::from_be_bytes(body.get(..8)?.try_into().ok()?)
        };
        Some(self.now_nanos().saturating_sub(stamp))
    }
}

/// A consumer's latency histogram in nanoseconds (1 ns to 60 s, 3 significant digits).
pub fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1_000, 60_000_000_000, 3)?)
}

/// Records latencies of bodies received by one consumer.
pub struct Recorder {
    pub hist: Histogram<u64>,
    run: Shared,
    pending: u64,
    pending_bytes: u64,
}

impl Recorder {
    pub fn new(run: Shared) -> anyhow::Result<Self> {
        Ok(Recorder {
            hist: histogram()?,
            run,
            pending: 0,
            pending_bytes: 0,
        })
    }

    /// One message received; `head` is at least the first 8 bytes of its body.
    pub fn message(&mut self, head: &[u8], body_len: usize) {
        if let Some(ns) = self.run.latency(head) {
            // Clamp to the histogram's lower bound rather than losing the sample.
            let _ = self.hist.record(ns.max(1_000));
        }
        self.pending += 1;
        self.pending_bytes += body_len as u64;
    }

    /// Publishes the counts of this batch to the shared counters.
    pub fn flush(&mut self) {
        if self.pending > 0 {
            let now = self.run.now_nanos();
            self.run
                .counters
                .last_received_ns
                .fetch_max(now, Ordering::Relaxed);
        }
        Counters::add(&self.run.counters.received, self.pending);
        Counters::add(&self.run.counters.received_bytes, self.pending_bytes);
        self.pending = 0;
        self.pending_bytes = 0;
    }
}

/// Paces one producer: how many messages are due now, and when the next one is.
pub struct Pacer {
    start: Instant,
    rate: Option<f64>,
    sent: u64,
}

impl Pacer {
    pub fn new(rate: Option<f64>) -> Self {
        Pacer {
            start: Instant::now(),
            rate,
            sent: 0,
        }
    }

    /// Messages that may be sent now (at most `max`); 0 means wait for [`Pacer::next_due`].
    pub fn due(&self, max: u64) -> u64 {
        match self.rate {
            None => max,
            Some(rate) => {
                let should = (self.start.elapsed().as_secs_f64() * rate) as u64;
                should.saturating_sub(self.sent).min(max)
            }
        }
    }

    pub fn sent(&mut self, n: u64) {
        self.sent += n;
    }

    /// When the next message is due (only meaningful with a rate).
    pub fn next_due(&self) -> Instant {
        match self.rate {
            Some(rate) if rate > 0.0 => {
                self.start + Duration::from_secs_f64((self.sent + 1) as f64 / rate)
            }
            _ => Instant::now() + Duration::from_millis(1),
        }
    }
}

/// Messages a producer encodes before one write when unlimited: big enough to keep
/// syscalls rare, small enough to keep latency samples honest.
pub fn batch_limit(size: usize) -> u64 {
    (64 * 1024 / (size + 64)).clamp(1, 256) as u64
}
