//! Resource alarms: the memory alarm and the disk alarm. Either one blocks
//! publishers (AMQP `connection.blocked`, MQTT and STOMP stop reading) until it
//! clears, so the broker slows producers down instead of running out of memory or
//! disk.
//!
//! Memory is measured, not estimated: the server samples the process's resident
//! memory (VmRSS) every [`MEASURE_INTERVAL`] and reports it with
//! [`MemoryMonitor::measured`]. Between two samples a burst can grow the process by
//! hundreds of MB (700k msg/s at 600 bytes each is 40 MB per 100 ms), so queues
//! also keep a running estimate of what they hold ([`cost`] per message, charged
//! with [`MemoryMonitor::add`] and released with [`MemoryMonitor::sub`]) and the
//! level the alarm compares with the watermark is the last sample plus how much
//! that estimate moved since ([`MemoryMonitor::level`]): the sample is the truth,
//! the estimate only bridges the gap to the next one. Without samples (the core on
//! its own, in unit tests) the level is the estimate alone.
//!
//! Freed memory is not always given back to the system: the allocator keeps
//! some for reuse, so after consumers drain a queue the next sample can still
//! be above the watermark with nothing queued, and publishers would stay
//! blocked for good. So what the queues released between two samples (the
//! estimate's net fall) is counted as retained for reuse, and what they took
//! since as reusing it; retained memory is left out of the comparison, and it is
//! never more than the sample shows above the idle broker (the first sample)
//! and the queues' estimate, so memory the allocator gave back stops counting
//! ([`MemoryMonitor::retained`]). Growth that the queues do not explain (buffers,
//! connections) is never retained and sets the alarm.
//!
//! The estimate counts per queue copy: a message routed to three queues counts
//! three times. That over-estimates fan-out (the body is shared) but errs on the
//! safe side and needs no shared bookkeeping on the publish path. Disk is
//! measured by the server (free space under `data_dir`) and reported here.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// How often the server should sample resident memory.
pub const MEASURE_INTERVAL: Duration = Duration::from_millis(100);

/// Above this fraction of the watermark, queues keep the bodies of stored
/// messages on disk only (RabbitMQ's `vm_memory_high_watermark_paging_ratio`).
pub const PAGING_RATIO: f64 = 0.5;

/// What a message held in a queue costs besides its body, for the estimate that
/// bridges two samples: the `Message` with its properties and routing key, the
/// `Arc`, the queue entry and the body's own allocation. Measured as resident
/// memory grown per queued 16-byte AMQP message: about 600 bytes before issue
/// 11 compacted messages, about 265 since (`ONLY=BACKLOG bench/compare.sh`);
/// rounded up, so the estimate errs towards the alarm.
pub const MESSAGE_OVERHEAD: usize = 300;

/// What the memory alarm's estimate charges for one in-memory message with
/// `body_bytes`.
pub fn cost(body_bytes: usize) -> usize {
    body_bytes.saturating_add(MESSAGE_OVERHEAD)
}

/// What a whole message held in memory costs: [`cost`] of its body, plus its
/// properties' box when it has one (288 bytes that [`MESSAGE_OVERHEAD`],
/// measured with transient messages that carry none, leaves out; a persistent
/// message always has one, for its delivery mode). For budgets that must hold
/// without a measurement to correct them: recovery keeps whole messages up to
/// a budget before anything samples the process (issue 11: counted by body
/// cost alone, a 128 MiB budget held 233 MB of recovered messages).
pub fn message_cost(message: &crate::message::Message) -> usize {
    let properties = if message.properties.is_empty() {
        0
    } else {
        std::mem::size_of::<crate::message::Properties>()
    };
    cost(message.body.len()).saturating_add(properties)
}

use tokio::sync::watch;

#[derive(Debug)]
pub struct MemoryMonitor {
    /// The estimate: what queues hold, by [`cost`].
    used: AtomicUsize,
    /// The last measured resident memory (0: never measured).
    measured: AtomicUsize,
    /// `used` when `measured` was taken.
    used_at_sample: AtomicUsize,
    /// Freed memory the allocator is taken to hold for reuse (see the module
    /// comment); left out of the comparison.
    retained: AtomicUsize,
    /// The first sample: the idle broker.
    baseline: AtomicUsize,
    /// 0 = memory alarm off.
    high_watermark: AtomicUsize,
    memory_alarm: AtomicBool,
    disk_alarm: AtomicBool,
    /// Free disk space and its limit as last measured (0/0: never measured).
    disk_free: AtomicU64,
    disk_limit: AtomicU64,
    /// Either alarm is set; what publishers watch.
    alarm_tx: watch::Sender<bool>,
}

impl MemoryMonitor {
    pub fn new(high_watermark: usize) -> Self {
        let (alarm_tx, _) = watch::channel(false);
        MemoryMonitor {
            used: AtomicUsize::new(0),
            measured: AtomicUsize::new(0),
            used_at_sample: AtomicUsize::new(0),
            retained: AtomicUsize::new(0),
            baseline: AtomicUsize::new(0),
            high_watermark: AtomicUsize::new(high_watermark),
            memory_alarm: AtomicBool::new(false),
            disk_alarm: AtomicBool::new(false),
            disk_free: AtomicU64::new(0),
            disk_limit: AtomicU64::new(0),
            alarm_tx,
        }
    }

    /// What queues hold by the estimate ([`cost`] per message).
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The last measured resident memory, if the server measures it.
    pub fn resident(&self) -> Option<usize> {
        Some(self.measured.load(Ordering::Relaxed)).filter(|m| *m > 0)
    }

    /// The memory the alarm compares with the watermark: the last sample moved
    /// by what the estimate moved since (the estimate alone if never sampled).
    pub fn level(&self) -> usize {
        let used = self.used();
        let measured = self.measured.load(Ordering::Relaxed);
        if measured == 0 {
            return used;
        }
        let at_sample = self.used_at_sample.load(Ordering::Relaxed);
        if used >= at_sample {
            measured.saturating_add(used - at_sample)
        } else {
            measured.saturating_sub(at_sample - used)
        }
    }

    /// Memory measured above the watermark that is taken as free for reuse
    /// inside the allocator (see the module comment).
    pub fn retained(&self) -> usize {
        self.retained.load(Ordering::Relaxed)
    }

    /// Resident memory the queues' estimate does not explain: the last sample
    /// less the idle broker (the first sample) and what queues hold. Live
    /// connections and buffers, and memory the allocator kept after anything
    /// was freed (what [`Self::retained`] counts of it came from queues).
    pub fn unexplained(&self) -> usize {
        self.measured
            .load(Ordering::Relaxed)
            .saturating_sub(self.baseline.load(Ordering::Relaxed))
            .saturating_sub(self.used())
    }

    /// What is compared with the watermark: [`Self::level`] less what is
    /// [`Self::retained`].
    fn effective(&self) -> usize {
        self.level().saturating_sub(self.retained())
    }

    /// A new sample of the process's resident memory, in bytes.
    pub fn measured(&self, resident: usize) {
        let used = self.used();
        let before = self.used_at_sample.swap(used, Ordering::Relaxed);
        let first = self.measured.swap(resident.max(1), Ordering::Relaxed) == 0;
        if first {
            self.baseline.store(resident, Ordering::Relaxed);
        }
        // Released since the last sample: retained; taken: reused. Never more
        // than the sample shows beyond the idle broker and what queues hold.
        let cap = resident
            .saturating_sub(self.baseline.load(Ordering::Relaxed))
            .saturating_sub(used);
        let _ = self
            .retained
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                let r = if before >= used {
                    r.saturating_add(before - used)
                } else {
                    r.saturating_sub(used - before)
                };
                Some(r.min(cap))
            });
        self.evaluate();
    }

    /// Changes the watermark at run time (0: alarm off); RabbitMQ's
    /// `rabbitmqctl set_vm_memory_high_watermark`.
    pub fn set_high_watermark(&self, bytes: usize) {
        self.high_watermark.store(bytes, Ordering::Relaxed);
        self.evaluate();
    }

    /// Whether queues should keep new stored messages on disk only: above
    /// [`PAGING_RATIO`] of the watermark, so the alarm is the last resort.
    pub fn paging(&self) -> bool {
        let wm = self.high_watermark();
        wm != 0 && self.effective() as f64 > wm as f64 * PAGING_RATIO
    }

    /// Whether publishers are blocked now (memory or disk).
    pub fn alarm(&self) -> bool {
        *self.alarm_tx.borrow()
    }

    /// A receiver that sees every change of the combined alarm state.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.alarm_tx.subscribe()
    }

    fn publish_state(&self) {
        let on =
            self.memory_alarm.load(Ordering::Acquire) || self.disk_alarm.load(Ordering::Acquire);
        self.alarm_tx.send_if_modified(|state| {
            let changed = *state != on;
            *state = on;
            changed
        });
    }

    /// Sets or clears the memory alarm from the current level.
    fn evaluate(&self) {
        let wm = self.high_watermark();
        let level = self.effective();
        if wm != 0 && level > wm {
            if !self.memory_alarm.swap(true, Ordering::AcqRel) {
                tracing::warn!(
                    memory = level,
                    high_watermark = wm,
                    "memory alarm set: blocking publishers"
                );
                self.publish_state();
            }
        } else if self.memory_alarm.load(Ordering::Acquire)
            && self.memory_alarm.swap(false, Ordering::AcqRel)
        {
            tracing::info!(memory = level, high_watermark = wm, "memory alarm cleared");
            self.publish_state();
        }
    }

    pub fn add(&self, bytes: usize) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
        if !self.memory_alarm.load(Ordering::Relaxed) {
            self.evaluate();
        }
    }

    pub fn sub(&self, bytes: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(bytes))
            });
        if self.memory_alarm.load(Ordering::Relaxed) {
            self.evaluate();
        }
    }

    /// The memory high watermark in bytes (0: no memory alarm).
    pub fn high_watermark(&self) -> usize {
        self.high_watermark.load(Ordering::Relaxed)
    }

    /// Whether the memory alarm is set.
    pub fn memory_alarm(&self) -> bool {
        self.memory_alarm.load(Ordering::Acquire)
    }

    /// Whether the disk alarm is set.
    pub fn disk_alarm(&self) -> bool {
        self.disk_alarm.load(Ordering::Acquire)
    }

    /// Free disk space and its limit as last measured; `None` when the disk
    /// is not watched.
    pub fn disk(&self) -> Option<(u64, u64)> {
        let limit = self.disk_limit.load(Ordering::Relaxed);
        (limit > 0).then(|| (self.disk_free.load(Ordering::Relaxed), limit))
    }

    /// Sets or clears the disk alarm (free space under the limit).
    pub fn set_disk_alarm(&self, on: bool, free_bytes: u64, limit: u64) {
        self.disk_free.store(free_bytes, Ordering::Relaxed);
        self.disk_limit.store(limit, Ordering::Relaxed);
        if self.disk_alarm.swap(on, Ordering::AcqRel) != on {
            if on {
                tracing::warn!(free_bytes, limit, "disk alarm set: blocking publishers");
            } else {
                tracing::info!(free_bytes, limit, "disk alarm cleared");
            }
            self.publish_state();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn either_alarm_blocks_and_both_must_clear() {
        let m = MemoryMonitor::new(100);
        let rx = m.subscribe();
        m.add(150);
        assert!(m.alarm() && *rx.borrow());
        m.set_disk_alarm(true, 1, 10);
        m.sub(100);
        assert!(m.alarm(), "disk alarm still set");
        m.set_disk_alarm(false, 20, 10);
        assert!(!m.alarm());
    }

    #[test]
    fn a_measurement_sets_and_clears_the_alarm_and_the_estimate_bridges_samples() {
        let m = MemoryMonitor::new(1000);
        m.add(100);
        assert_eq!(m.level(), 100, "never measured: the estimate alone");
        m.sub(100);
        m.measured(300); // the idle broker (baseline)
        m.measured(1200);
        assert!(m.memory_alarm(), "measured above the watermark");
        m.measured(900);
        assert!(!m.memory_alarm());
        assert_eq!(m.level(), 900);
        m.add(150); // a burst before the next sample
        assert_eq!(m.level(), 1050);
        assert!(m.memory_alarm());
        m.sub(150);
        assert_eq!(m.level(), 900);
        assert!(!m.memory_alarm());
        assert!(m.paging(), "above half the watermark");
        m.measured(300);
        // The queues take 800 and a sample sees it; then consumers drain it
        // all, but the allocator keeps the memory: the next sample is as high
        // as before. That memory is retained for reuse, not blocking.
        m.add(800);
        m.measured(1150);
        assert!(m.memory_alarm());
        m.sub(800);
        assert!(
            !m.memory_alarm(),
            "the estimate fell below before the sample"
        );
        m.measured(1150);
        assert_eq!(m.retained(), 800);
        assert!(!m.memory_alarm(), "retained memory does not block");
        // Queues reuse it: no growth, no alarm.
        m.add(500);
        m.measured(1150);
        assert_eq!(m.retained(), 300);
        assert!(!m.memory_alarm());
        // Growth the queues do not explain sets it.
        m.measured(1400);
        assert!(m.memory_alarm());
        // Given back to the system: retained no more than what is measured.
        m.sub(500);
        m.measured(400);
        assert!(!m.memory_alarm());
        assert_eq!(m.retained(), 100);
        m.set_high_watermark(0);
        m.add(1_000_000);
        assert!(!m.memory_alarm() && !m.paging(), "0: off");
    }
}
