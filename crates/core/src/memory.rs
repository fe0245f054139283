//! Resource alarms: the memory alarm and the disk alarm. Either one blocks
//! publishers (AMQP `connection.blocked`, MQTT and STOMP stop reading) until it
//! clears, so the broker slows producers down instead of running out of memory or
//! disk.
//!
//! Memory is counted as the bytes of message bodies held in queues plus a fixed
//! per-message overhead ([`cost`]), per queue copy:
//! a message routed to three queues counts three times. That over-estimates fan-out
//! (the body is shared) but errs on the safe side and needs no shared bookkeeping on
//! the publish path. Disk is measured by the server (free space under `data_dir`)
//! and reported here.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// What a message held in a queue costs besides its body: the `Message` with its
/// properties and routing key, the `Arc`, the queue entry and, for small bodies,
/// the read buffer it is a slice of. Measured (issue 6, bench/notes.md) as resident
/// memory grown per queued 16-byte message: about 600 bytes for AMQP (2.7 M
/// messages, 1.6 GB) and 350-400 for MQTT QoS 0, where 100 unlimited publishers
/// grew the broker to 6.5 GB in 10 s while the alarm, seeing 16 bytes a message,
/// never fired. Counting this too makes the watermark a bound on memory rather
/// than on body bytes.
pub const MESSAGE_OVERHEAD: usize = 600;

/// What the memory alarm charges for one in-memory message with `body_bytes`.
pub fn cost(body_bytes: usize) -> usize {
    body_bytes.saturating_add(MESSAGE_OVERHEAD)
}

use tokio::sync::watch;

#[derive(Debug)]
pub struct MemoryMonitor {
    used: AtomicUsize,
    /// 0 = memory alarm off.
    high_watermark: usize,
    /// Above this, queues keep the bodies of stored messages on disk only.
    paging_threshold: usize,
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
            high_watermark,
            paging_threshold: high_watermark / 2,
            memory_alarm: AtomicBool::new(false),
            disk_alarm: AtomicBool::new(false),
            disk_free: AtomicU64::new(0),
            disk_limit: AtomicU64::new(0),
            alarm_tx,
        }
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Whether queues should keep new stored messages on disk only: above half
    /// the watermark (RabbitMQ's paging ratio), so the alarm is the last resort.
    pub fn paging(&self) -> bool {
        self.paging_threshold != 0 && self.used() > self.paging_threshold
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

    pub fn add(&self, bytes: usize) {
        let now = self
            .used
            .fetch_add(bytes, Ordering::Relaxed)
            .saturating_add(bytes);
        if self.high_watermark != 0
            && now > self.high_watermark
            && !self.memory_alarm.swap(true, Ordering::AcqRel)
        {
            tracing::warn!(
                used = now,
                high_watermark = self.high_watermark,
                "memory alarm set: blocking publishers"
            );
            self.publish_state();
        }
    }

    pub fn sub(&self, bytes: usize) {
        let prev = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(bytes))
            })
            .unwrap_or(0);
        let now = prev.saturating_sub(bytes);
        if now <= self.high_watermark
            && self.memory_alarm.load(Ordering::Acquire)
            && self.memory_alarm.swap(false, Ordering::AcqRel)
        {
            tracing::info!(used = now, "memory alarm cleared");
            self.publish_state();
        }
    }

    /// The memory high watermark in bytes (0: no memory alarm).
    pub fn high_watermark(&self) -> usize {
        self.high_watermark
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
}
