//! Consumers and the outbox through which queues hand them messages.
//!
//! A queue never talks to a socket. It pushes deliveries into the consumer's
//! connection [`Outbox`] (a short `Mutex` section) and the connection task, woken
//! only when the outbox goes from empty to non-empty, encodes and writes them all
//! in one batch. This keeps one wake-up per batch instead of per message, and lets
//! the publisher's own task do the routing (DESIGN.md: "few wake-ups per message").
//!
//! Flow control is credit: a delivery needs a free slot of the consumer's prefetch,
//! of the channel's shared (global) prefetch, and room in the outbox. When an ack
//! or a drained outbox frees credit, the connection asks the queue to dispatch
//! again.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::field::FieldTable;
use crate::queue::{Queue, QueuedMessage};

/// A counting limit shared between dispatchers and the acking connection.
/// `limit == 0` means unlimited. A credit with a parent (an AMQP channel's
/// within its connection's `max_unacked_per_connection`) takes a slot from
/// both, and gives both back.
#[derive(Debug, Default)]
pub struct Credit {
    limit: AtomicU32,
    used: AtomicU32,
    parent: Option<Arc<Credit>>,
}

impl Credit {
    pub fn new(limit: u32) -> Self {
        Credit {
            limit: AtomicU32::new(limit),
            used: AtomicU32::new(0),
            parent: None,
        }
    }

    /// A credit that also takes its slots from `parent`.
    pub fn with_parent(limit: u32, parent: Arc<Credit>) -> Self {
        Credit {
            parent: Some(parent),
            ..Credit::new(limit)
        }
    }

    /// Whether every slot is taken (never, when unlimited).
    pub fn is_full(&self) -> bool {
        let limit = self.limit();
        limit != 0 && self.used() >= limit
    }

    pub fn set_limit(&self, limit: u32) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    pub fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    pub fn used(&self) -> u32 {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes one slot if one is free (here and in the parent).
    pub fn try_acquire(&self) -> bool {
        let own = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                let limit = self.limit.load(Ordering::Relaxed);
                (limit == 0 || used < limit).then_some(used.saturating_add(1))
            })
            .is_ok();
        if !own {
            return false;
        }
        if let Some(parent) = &self.parent {
            if !parent.try_acquire() {
                self.release_own(1);
                return false;
            }
        }
        true
    }

    pub fn release(&self, n: u32) {
        self.release_own(n);
        if let Some(parent) = &self.parent {
            parent.release(n);
        }
    }

    fn release_own(&self, n: u32) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(n))
            });
    }
}

/// A message handed to a consumer, waiting in its connection's outbox.
#[derive(Debug)]
pub struct Delivery {
    pub consumer: Arc<Consumer>,
    pub queue: Arc<Queue>,
    pub message: QueuedMessage,
}

impl Delivery {
    /// Returns a delivery that never reached the client (its consumer or
    /// connection went away while it waited in the outbox): the prefetch slot is
    /// freed and the message goes back to its place in the queue. An automatic-ack
    /// consumer's delivery was settled when it was handed out and is gone.
    pub fn give_back(self) {
        if !self.consumer.no_ack() {
            self.consumer.release(1);
            self.queue.requeue(vec![self.message]);
        }
    }
}

/// What a connection's outbox carries.
#[derive(Debug)]
pub enum Outgoing {
    Deliver(Delivery),
    /// The broker cancelled this consumer (its queue was deleted).
    Cancelled(Arc<Consumer>),
}

/// The per-connection mailbox that queues deliver into.
#[derive(Debug)]
pub struct Outbox {
    items: Mutex<VecDeque<Outgoing>>,
    len: AtomicUsize,
    capacity: usize,
    notify: Notify,
    /// Set when a queue skipped a consumer for lack of outbox room: the connection
    /// must ask its queues to dispatch again once it has drained.
    starved: AtomicBool,
}

impl Outbox {
    /// `capacity` bounds the deliveries waiting to be written, so a slow reader
    /// with unlimited prefetch cannot make the broker buffer a whole queue.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Outbox {
            items: Mutex::new(VecDeque::new()),
            len: AtomicUsize::new(0),
            capacity: capacity.max(1),
            notify: Notify::new(),
            starved: AtomicBool::new(false),
        })
    }

    pub fn has_room(&self) -> bool {
        let room = self.len.load(Ordering::Acquire) < self.capacity;
        if !room {
            self.starved.store(true, Ordering::Release);
        }
        room
    }

    /// Queues an item, waking the connection if it was idle.
    pub fn push(&self, item: Outgoing) {
        let was_empty = {
            let mut items = self.items.lock();
            items.push_back(item);
            items.len() == 1
        };
        self.len.fetch_add(1, Ordering::AcqRel);
        if was_empty {
            self.notify.notify_one();
        }
    }

    /// Takes everything waiting, in order.
    pub fn drain(&self) -> VecDeque<Outgoing> {
        let items = std::mem::take(&mut *self.items.lock());
        self.len.fetch_sub(items.len(), Ordering::AcqRel);
        items
    }

    /// Gives back every delivery still waiting (the connection is closing).
    pub fn give_back_all(&self) {
        for item in self.drain() {
            if let Outgoing::Deliver(d) = item {
                d.give_back();
            }
        }
    }

    /// Whether some queue was refused room since the last call.
    pub fn take_starved(&self) -> bool {
        self.starved.swap(false, Ordering::AcqRel)
    }

    /// Wakes the connection task as a push would, with nothing to deliver: it
    /// then drains the outbox and looks at its other signals (a close request
    /// from the connection registry).
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Resolves when something was pushed since the last drain.
    pub async fn wait(&self) {
        self.notify.notified().await;
    }

    pub fn is_empty(&self) -> bool {
        self.len.load(Ordering::Acquire) == 0
    }
}

/// How a consumer wants its messages.
#[derive(Debug, Clone, Default)]
pub struct ConsumerOptions {
    pub tag: String,
    /// Adapter-defined sub-session the consumer lives in (the AMQP channel).
    pub channel: u16,
    pub no_ack: bool,
    pub exclusive: bool,
    /// Per-consumer prefetch (0 = unlimited).
    pub prefetch: u32,
    pub arguments: FieldTable,
}

/// A subscription of one session to one queue.
#[derive(Debug)]
pub struct Consumer {
    pub id: u64,
    pub options: ConsumerOptions,
    own: Credit,
    /// The channel-wide (AMQP `global`) prefetch shared by the channel's consumers.
    shared: Arc<Credit>,
    outbox: Arc<Outbox>,
    active: AtomicBool,
}

impl Consumer {
    pub fn new(
        id: u64,
        options: ConsumerOptions,
        shared: Arc<Credit>,
        outbox: Arc<Outbox>,
    ) -> Arc<Self> {
        let own = Credit::new(options.prefetch);
        Arc::new(Consumer {
            id,
            options,
            own,
            shared,
            outbox,
            active: AtomicBool::new(true),
        })
    }

    /// Identifies the connection this consumer delivers to (its outbox), for
    /// the management API's `channel_details`: see
    /// [`crate::connections::Connection::outbox_id`].
    pub fn outbox_id(&self) -> usize {
        Arc::as_ptr(&self.outbox) as usize
    }

    pub fn tag(&self) -> &str {
        &self.options.tag
    }

    pub fn no_ack(&self) -> bool {
        self.options.no_ack
    }

    /// Reserves credit for one delivery; the caller must deliver or release it.
    pub(crate) fn try_reserve(&self) -> bool {
        if !self.active.load(Ordering::Acquire) || !self.outbox.has_room() {
            return false;
        }
        if self.options.no_ack {
            return true;
        }
        if !self.own.try_acquire() {
            return false;
        }
        if !self.shared.try_acquire() {
            self.own.release(1);
            return false;
        }
        true
    }

    /// Gives back the credit of `n` settled deliveries (acked, rejected, requeued).
    pub fn release(&self, n: u32) {
        if !self.options.no_ack {
            self.own.release(n);
            self.shared.release(n);
        }
    }

    pub(crate) fn deliver(&self, delivery: Delivery) {
        self.outbox.push(Outgoing::Deliver(delivery));
    }

    pub(crate) fn notify_cancelled(self: &Arc<Self>) {
        self.deactivate();
        self.outbox.push(Outgoing::Cancelled(self.clone()));
    }

    /// Stops further deliveries to this consumer.
    pub fn deactivate(&self) {
        self.active.store(false, Ordering::Release);
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Deliveries handed to this consumer and not settled yet (0 for no-ack).
    pub fn in_flight(&self) -> u32 {
        if self.options.no_ack {
            0
        } else {
            self.own.used()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_limits_and_releases() {
        let c = Credit::new(2);
        assert!(c.try_acquire());
        assert!(c.try_acquire());
        assert!(!c.try_acquire());
        c.release(1);
        assert!(c.try_acquire());
        c.set_limit(0);
        assert!(c.try_acquire());
        c.release(10);
        assert_eq!(c.used(), 0);
    }

    #[test]
    fn a_child_credit_takes_and_gives_back_its_parents_slots_too() {
        let conn = Arc::new(Credit::new(2));
        let a = Credit::with_parent(0, conn.clone());
        let b = Credit::with_parent(1, conn.clone());
        assert!(a.try_acquire());
        assert!(b.try_acquire());
        assert!(conn.is_full());
        assert!(!a.try_acquire(), "the connection's cap");
        assert_eq!(a.used(), 1, "a refused slot is given back");
        a.release(1);
        assert!(!conn.is_full());
        assert!(!b.try_acquire(), "b's own limit");
        assert!(a.try_acquire());
    }

    #[test]
    fn consumer_needs_own_shared_and_outbox_room() {
        let outbox = Outbox::new(3);
        let shared = Arc::new(Credit::new(1));
        let opts = ConsumerOptions {
            prefetch: 5,
            ..Default::default()
        };
        let c = Consumer::new(1, opts, shared.clone(), outbox.clone());
        assert!(c.try_reserve());
        assert!(!c.try_reserve(), "channel-wide limit of 1 reached");
        c.release(1);
        assert!(c.try_reserve());
        assert_eq!(shared.used(), 1);
    }
}
