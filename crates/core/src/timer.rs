//! Time in the core: a clock the server (or a test) controls, and the broker-wide
//! earliest deadline that the server's one timer task sleeps until.
//!
//! The core never sleeps and never starts a task. Operations that need the time
//! take `now` (milliseconds since the Unix epoch) from their caller; the older
//! entry points without a `now` parameter (kept so that every adapter keeps
//! compiling) read [`Clock`], which is the system clock in a server and a
//! manual one in tests. Queues with something timed (message TTL, queue expiry,
//! delayed messages) publish their next deadline here; [`crate::Broker::tick`]
//! does what is due and the timer task sleeps until [`Timers::earliest`] or
//! until [`Timers::changed`] says an earlier deadline appeared.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

/// No deadline.
pub const NEVER: u64 = u64::MAX;

/// Where the core reads the time when a caller did not pass it.
#[derive(Debug)]
pub enum Clock {
    /// The system clock (a server).
    System,
    /// A clock that moves only when told to (tests).
    Manual(AtomicU64),
}

impl Clock {
    pub fn now_ms(&self) -> u64 {
        match self {
            Clock::System => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            Clock::Manual(t) => t.load(Ordering::Acquire),
        }
    }

    /// Moves a manual clock forward to `now` (a system clock moves by itself).
    pub fn advance_to(&self, now: u64) {
        if let Clock::Manual(t) = self {
            t.fetch_max(now, Ordering::AcqRel);
        }
    }
}

/// The clock and the broker-wide earliest deadline.
#[derive(Debug)]
pub struct Timers {
    pub clock: Clock,
    earliest: AtomicU64,
    changed: Notify,
}

impl Timers {
    pub fn new(clock: Clock) -> Self {
        Timers {
            clock,
            earliest: AtomicU64::new(NEVER),
            changed: Notify::new(),
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Records a deadline; wakes the timer task if it is earlier than what it
    /// sleeps until. One atomic op when it is not.
    pub fn schedule(&self, deadline: u64) {
        if deadline < self.earliest.fetch_min(deadline, Ordering::AcqRel) {
            self.changed.notify_one();
        }
    }

    /// Records a deadline the timer task already knows of (it computed it), so
    /// that only earlier ones wake it.
    pub(crate) fn note(&self, deadline: u64) {
        self.earliest.fetch_min(deadline, Ordering::AcqRel);
    }

    /// The earliest deadline scheduled since the last `Timers::reset`.
    pub fn earliest(&self) -> u64 {
        self.earliest.load(Ordering::Acquire)
    }

    /// Forgets the recorded deadlines at the start of a tick, which notes the
    /// live ones again; a deadline scheduled meanwhile wakes the task once more.
    pub(crate) fn reset(&self) {
        self.earliest.store(NEVER, Ordering::Release);
    }

    /// Resolves when a deadline earlier than the recorded one was scheduled.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }
}
