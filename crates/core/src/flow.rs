//! Flow control from queues to the connections that publish into them: the
//! per-connection analogue of RabbitMQ's credit flow.
//!
//! In RabbitMQ a queue process that falls behind stops granting credit to the
//! channel that sends to it, which stops reading its socket. Here a publisher's
//! own task routes and enqueues (DESIGN.md, "few wake-ups per message"), so no
//! queue is ever behind in the sense of an unread mailbox; what grows instead is
//! the queue's ready backlog while its consumers cannot keep up. So:
//!
//! - A queue with at least one consumer whose ready backlog passes
//!   [`HIGH_MESSAGES`] messages or [`HIGH_BYTES`] body bytes closes its [`Gate`]
//!   ("behind"); it opens again once the backlog is down to half of both (the
//!   hysteresis keeps a publisher from flapping on every message) or the queue
//!   loses its last consumer or is deleted. A queue nobody consumes never closes
//!   its gate: filling it is what it is for, and the memory alarm (with paging)
//!   is what bounds it, as in RabbitMQ.
//! - While a connection handles one read ([`record`]), every queue that a
//!   message entered and that is behind notes its gate. The driver then stops
//!   reading that connection until those gates open ([`Blockers::wait`]). Only
//!   connections that published into a lagging queue pause; the others keep
//!   reading, so their latency does not pay for someone else's backlog.
//!
//! The recording is a thread-local set only for the duration of a synchronous
//! `handle_input` call, so it needs no change to any publish signature and no
//! lock; nothing awaits while it is set, so the task cannot move threads.

use std::cell::RefCell;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// A queue with consumers whose ready backlog passes this many messages is
/// behind. At the single-queue throughput of the benchmarks (about 700k msg/s)
/// 8192 messages are about 12 ms of queueing, well inside the 50 ms p99 goal,
/// and large enough that a publisher's read batch (up to 64 KiB) never trips it
/// on its own.
pub const HIGH_MESSAGES: usize = 8192;
/// ... or this many body bytes (large messages: 128 bodies of 64 KiB).
pub const HIGH_BYTES: usize = 8 * 1024 * 1024;

/// A queue's flow state, shared with the connections it is blocking.
#[derive(Debug, Default)]
pub struct Gate {
    behind: AtomicBool,
    opened: Notify,
}

impl Gate {
    /// Whether the queue is behind (publishers into it should pause).
    pub fn is_behind(&self) -> bool {
        self.behind.load(Ordering::Acquire)
    }

    /// Recomputes the state from the backlog (`ready` messages and `bytes`) and
    /// whether the queue has consumers; called by the queue at the end of each
    /// of its critical sections.
    pub fn update(&self, ready: usize, bytes: usize, has_consumers: bool) {
        let behind = self.is_behind();
        let now = if !has_consumers {
            false
        } else if behind {
            ready > HIGH_MESSAGES / 2 || bytes > HIGH_BYTES / 2
        } else {
            ready > HIGH_MESSAGES || bytes > HIGH_BYTES
        };
        if now != behind {
            self.set(now);
        }
    }

    /// Opens (or closes) the gate; opening wakes every paused publisher.
    pub fn set(&self, behind: bool) {
        if self.behind.swap(behind, Ordering::AcqRel) && !behind {
            self.opened.notify_waiters();
        }
    }

    /// Waits until the gate is open.
    pub async fn wait_open(&self) {
        loop {
            let mut opened = pin!(self.opened.notified());
            // Registered before the check, so an opening between the check and
            // the await is not missed.
            opened.as_mut().enable();
            if !self.is_behind() {
                return;
            }
            opened.await;
        }
    }
}

thread_local! {
    /// The gates noted during the current [`record`] call, if one is running.
    static NOTED: RefCell<Option<Vec<Arc<Gate>>>> = const { RefCell::new(None) };
}

/// A queue that is behind took a message: remember its gate for the connection
/// being recorded (no-op outside [`record`]).
pub fn note(gate: &Arc<Gate>) {
    NOTED.with(|noted| {
        if let Some(gates) = noted.borrow_mut().as_mut() {
            if !gates.iter().any(|g| Arc::ptr_eq(g, gate)) {
                gates.push(gate.clone());
            }
        }
    });
}

/// The gates of the lagging queues a connection published into.
#[derive(Debug, Default)]
pub struct Blockers(Vec<Arc<Gate>>);

impl Blockers {
    /// No lagging queue was published into: keep reading.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many queues hold the connection back.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Waits until every one of the queues has caught up.
    pub async fn wait(&self) {
        for gate in &self.0 {
            gate.wait_open().await;
        }
    }
}

/// Runs `f` (a connection handling its input) and returns, besides its result,
/// the gates of the lagging queues it published into. Nested calls each see
/// their own.
pub fn record<R>(f: impl FnOnce() -> R) -> (R, Blockers) {
    let outer = NOTED.with(|noted| noted.borrow_mut().replace(Vec::new()));
    let result = f();
    let gates = NOTED.with(|noted| std::mem::replace(&mut *noted.borrow_mut(), outer));
    (result, Blockers(gates.unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_consumed_queue_past_the_mark_is_behind_with_hysteresis() {
        let g = Gate::default();
        g.update(HIGH_MESSAGES + 1, 0, false);
        assert!(
            !g.is_behind(),
            "nobody consumes: the alarm bounds it instead"
        );
        g.update(HIGH_MESSAGES + 1, 0, true);
        assert!(g.is_behind());
        g.update(HIGH_MESSAGES, 0, true);
        assert!(g.is_behind(), "stays behind until half the mark");
        g.update(HIGH_MESSAGES / 2, 0, true);
        assert!(!g.is_behind());
        g.update(1, HIGH_BYTES + 1, true);
        assert!(g.is_behind(), "bytes count too");
        g.update(1, HIGH_BYTES + 1, false);
        assert!(!g.is_behind(), "the last consumer left");
    }

    #[test]
    fn record_collects_each_lagging_gate_once_and_only_inside() {
        let a = Arc::new(Gate::default());
        let b = Arc::new(Gate::default());
        note(&a); // outside any recording: ignored
        let ((), blockers) = record(|| {
            note(&a);
            note(&b);
            note(&a);
            let ((), inner) = record(|| note(&b));
            assert_eq!(inner.len(), 1);
        });
        assert_eq!(blockers.len(), 2);
        let ((), none) = record(|| {});
        assert!(none.is_empty());
    }

    #[tokio::test]
    async fn wait_returns_once_every_gate_opened() {
        let a = Arc::new(Gate::default());
        a.set(true);
        let ((), blockers) = record(|| note(&a));
        let waiter = tokio::spawn(async move { blockers.wait().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        a.set(false);
        waiter.await.unwrap();
    }
}
