//! The memory alarm: counts the bytes of message bodies held in queues and raises
//! an alarm above a high watermark, so publishers can be blocked (AMQP
//! `connection.blocked`) before the broker runs out of memory.
//!
//! Counting is per queue copy: a message routed to three queues counts three
//! times. That over-estimates fan-out (the body is shared) but errs on the safe
//! side and needs no shared bookkeeping on the publish path.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::watch;

#[derive(Debug)]
pub struct MemoryMonitor {
    used: AtomicUsize,
    /// 0 = alarm off.
    high_watermark: usize,
    alarm: AtomicBool,
    alarm_tx: watch::Sender<bool>,
}

impl MemoryMonitor {
    pub fn new(high_watermark: usize) -> Self {
        let (alarm_tx, _) = watch::channel(false);
        MemoryMonitor {
            used: AtomicUsize::new(0),
            high_watermark,
            alarm: AtomicBool::new(false),
            alarm_tx,
        }
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn alarm(&self) -> bool {
        self.alarm.load(Ordering::Relaxed)
    }

    /// A receiver that sees every change of the alarm state.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.alarm_tx.subscribe()
    }

    pub fn add(&self, bytes: usize) {
        let now = self
            .used
            .fetch_add(bytes, Ordering::Relaxed)
            .saturating_add(bytes);
        if self.high_watermark != 0
            && now > self.high_watermark
            && !self.alarm.swap(true, Ordering::AcqRel)
        {
            tracing::warn!(
                used = now,
                high_watermark = self.high_watermark,
                "memory alarm set: blocking publishers"
            );
            self.alarm_tx.send_replace(true);
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
            && self.alarm.load(Ordering::Acquire)
            && self.alarm.swap(false, Ordering::AcqRel)
        {
            tracing::info!(used = now, "memory alarm cleared: unblocking publishers");
            self.alarm_tx.send_replace(false);
        }
    }
}
