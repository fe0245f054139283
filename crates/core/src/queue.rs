//! Queues: ordered messages, their consumers, and dispatch.
//!
//! All of a queue's mutable state sits behind one `parking_lot::Mutex`. Every
//! critical section is short and synchronous (no `.await` can happen while it is
//! held), so a blocking mutex is cheaper than an async one. Dispatch runs on
//! whichever task made progress possible: the publisher after enqueueing, the
//! consumer's connection after an ack. Lock order: queue state, then a consumer's
//! outbox (taken inside `Consumer::deliver`); never the other way round.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::consumer::{Consumer, Delivery};
use crate::error::{CoreError, CoreResult};
use crate::field::FieldTable;
use crate::memory::MemoryMonitor;
use crate::message::Message;
use crate::persist::{RecoveredMessage, Store, StoredRef};

/// A message in a queue, with what the queue knows of its history.
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    /// Position in the queue's arrival order; requeued messages go back there.
    pub id: u64,
    pub message: Arc<Message>,
    /// Delivered before (and not acknowledged).
    pub redelivered: bool,
    /// Where the message sits in the store, when it is persistent and the queue
    /// durable.
    pub stored: Option<StoredRef>,
}

/// Properties fixed at declaration; compared on re-declaration.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct QueueOptions {
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

#[derive(Debug, Default)]
struct QueueState {
    ready: VecDeque<QueuedMessage>,
    consumers: Vec<Arc<Consumer>>,
    /// Round-robin position in `consumers`.
    next_consumer: usize,
    next_id: u64,
    /// Delivered, not yet settled.
    unacked: usize,
    /// A consumer holds the queue exclusively.
    exclusive_consumer: bool,
    /// Auto-delete only applies once a first consumer has come and gone.
    had_consumer: bool,
    deleted: bool,
}

/// A queue.
#[derive(Debug)]
pub struct Queue {
    pub name: String,
    pub vhost: String,
    pub options: QueueOptions,
    /// The connection that declared an exclusive queue.
    pub owner: Option<u64>,
    state: Mutex<QueueState>,
    memory: Arc<MemoryMonitor>,
    /// The store and this queue's id in it, for a durable queue.
    durable: Option<(Arc<dyn Store>, u64)>,
}

/// What `basic.get` takes from a queue.
#[derive(Debug)]
pub struct Got {
    pub message: QueuedMessage,
    /// Ready messages left after this one.
    pub remaining: usize,
}

impl Queue {
    pub fn new(
        name: String,
        vhost: String,
        options: QueueOptions,
        owner: Option<u64>,
        memory: Arc<MemoryMonitor>,
    ) -> Arc<Self> {
        Arc::new(Queue {
            name,
            vhost,
            options,
            owner,
            state: Mutex::new(QueueState::default()),
            memory,
            durable: None,
        })
    }

    /// A queue whose persistent messages the store keeps under `id`.
    pub fn new_durable(
        name: String,
        vhost: String,
        options: QueueOptions,
        memory: Arc<MemoryMonitor>,
        store: Arc<dyn Store>,
        id: u64,
    ) -> Arc<Self> {
        Arc::new(Queue {
            name,
            vhost,
            options,
            owner: None,
            state: Mutex::new(QueueState::default()),
            memory,
            durable: Some((store, id)),
        })
    }

    /// The queue's id in the store, if it is durable and a store is in use.
    pub fn store_id(&self) -> Option<u64> {
        self.durable.as_ref().map(|(_, id)| *id)
    }

    /// Appends a message and hands out what can be handed out.
    pub fn publish(self: &Arc<Self>, message: Arc<Message>) {
        self.publish_stored(message, None);
    }

    /// Appends a message the store already holds for this queue (`stored`).
    pub fn publish_stored(self: &Arc<Self>, message: Arc<Message>, stored: Option<StoredRef>) {
        self.memory.add(message.body_size());
        let mut st = self.state.lock();
        if st.deleted {
            drop(st);
            self.memory.sub(message.body_size());
            self.forget_stored(stored.iter());
            return;
        }
        let id = st.next_id;
        st.next_id += 1;
        st.ready.push_back(QueuedMessage {
            id,
            message,
            redelivered: false,
            stored,
        });
        self.dispatch_locked(&mut st);
    }

    /// Puts messages recovered from the store back, in order, before any new one.
    pub fn restore(self: &Arc<Self>, messages: Vec<RecoveredMessage>) {
        let mut st = self.state.lock();
        for m in messages {
            self.memory.add(m.message.body_size());
            let id = st.next_id;
            st.next_id += 1;
            st.ready.push_back(QueuedMessage {
                id,
                message: m.message,
                redelivered: m.redelivered,
                stored: Some(m.stored),
            });
        }
    }

    /// Tells the store these messages left the queue for good.
    fn forget_stored<'a>(&self, stored: impl Iterator<Item = &'a StoredRef>) {
        if let Some((store, queue_id)) = &self.durable {
            for s in stored {
                store.append_ack(*queue_id, *s);
            }
        }
    }

    /// Tells the store a message was handed out, so a restart marks it redelivered.
    fn note_delivered(&self, message: &QueuedMessage) {
        if let (Some((store, queue_id)), Some(stored), false) =
            (&self.durable, message.stored, message.redelivered)
        {
            store.append_delivered(*queue_id, stored);
        }
    }

    /// Hands ready messages to consumers with credit, round robin, until either
    /// runs out.
    pub fn dispatch(self: &Arc<Self>) {
        let mut st = self.state.lock();
        self.dispatch_locked(&mut st);
    }

    fn dispatch_locked(self: &Arc<Self>, st: &mut QueueState) {
        while !st.ready.is_empty() && !st.consumers.is_empty() {
            let n = st.consumers.len();
            let mut chosen = None;
            for i in 0..n {
                let idx = (st.next_consumer + i) % n;
                if st.consumers.get(idx).is_some_and(|c| c.try_reserve()) {
                    chosen = Some(idx);
                    break;
                }
            }
            let Some(idx) = chosen else { break };
            st.next_consumer = (idx + 1) % n;
            let (Some(consumer), Some(message)) =
                (st.consumers.get(idx).cloned(), st.ready.pop_front())
            else {
                break;
            };
            if consumer.no_ack() {
                self.memory.sub(message.message.body_size());
                self.forget_stored(message.stored.iter());
            } else {
                st.unacked += 1;
                self.note_delivered(&message);
            }
            consumer.deliver(Delivery {
                consumer: consumer.clone(),
                queue: self.clone(),
                message,
            });
        }
    }

    /// Adds a consumer. `exclusive` consumers need the queue to themselves.
    pub fn add_consumer(self: &Arc<Self>, consumer: Arc<Consumer>) -> CoreResult<()> {
        let mut st = self.state.lock();
        if st.deleted {
            return Err(CoreError::not_found(format!(
                "no queue '{}' in vhost '{}'",
                self.name, self.vhost
            )));
        }
        if st.exclusive_consumer || (consumer.options.exclusive && !st.consumers.is_empty()) {
            return Err(CoreError::access_refused(format!(
                "queue '{}' in vhost '{}' in exclusive use",
                self.name, self.vhost
            )));
        }
        st.exclusive_consumer = consumer.options.exclusive;
        st.had_consumer = true;
        st.consumers.push(consumer);
        self.dispatch_locked(&mut st);
        Ok(())
    }

    /// Removes a consumer. Returns true when the queue is auto-delete and this was
    /// its last consumer, i.e. the caller should delete it.
    pub fn remove_consumer(&self, consumer_id: u64) -> bool {
        let mut st = self.state.lock();
        let before = st.consumers.len();
        st.consumers.retain(|c| {
            let keep = c.id != consumer_id;
            if !keep {
                c.deactivate();
                // Its deliveries still in flight come back through requeue.
            }
            keep
        });
        if st.consumers.len() != before {
            st.exclusive_consumer = false;
        }
        if st.next_consumer >= st.consumers.len() {
            st.next_consumer = 0;
        }
        self.options.auto_delete && st.had_consumer && st.consumers.is_empty() && !st.deleted
    }

    /// Takes the first ready message (`basic.get`). With `no_ack` it is settled at once.
    pub fn get(&self, no_ack: bool) -> Option<Got> {
        let mut st = self.state.lock();
        let message = st.ready.pop_front()?;
        if no_ack {
            self.memory.sub(message.message.body_size());
            self.forget_stored(message.stored.iter());
        } else {
            st.unacked += 1;
            self.note_delivered(&message);
        }
        Some(Got {
            message,
            remaining: st.ready.len(),
        })
    }

    /// Settles delivered messages for good (acked, or rejected without requeue).
    pub fn settle(&self, messages: &[QueuedMessage]) {
        if messages.is_empty() {
            return;
        }
        let bytes: usize = messages.iter().map(|m| m.message.body_size()).sum();
        {
            let mut st = self.state.lock();
            st.unacked = st.unacked.saturating_sub(messages.len());
        }
        self.memory.sub(bytes);
        self.forget_stored(messages.iter().filter_map(|m| m.stored.as_ref()));
    }

    /// Puts delivered messages back at their original positions, marked
    /// redelivered, and dispatches them again.
    pub fn requeue(self: &Arc<Self>, messages: Vec<QueuedMessage>) {
        if messages.is_empty() {
            return;
        }
        let mut st = self.state.lock();
        st.unacked = st.unacked.saturating_sub(messages.len());
        if st.deleted {
            drop(st);
            self.memory
                .sub(messages.iter().map(|m| m.message.body_size()).sum());
            self.forget_stored(messages.iter().filter_map(|m| m.stored.as_ref()));
            return;
        }
        for mut m in messages {
            m.redelivered = true;
            // Usually older than everything ready: a search from the front is short.
            let pos = st.ready.partition_point(|r| r.id < m.id);
            st.ready.insert(pos, m);
        }
        self.dispatch_locked(&mut st);
    }

    /// Drops every ready message; returns how many.
    pub fn purge(&self) -> usize {
        let dropped = std::mem::take(&mut self.state.lock().ready);
        self.memory
            .sub(dropped.iter().map(|m| m.message.body_size()).sum());
        self.forget_stored(dropped.iter().filter_map(|m| m.stored.as_ref()));
        dropped.len()
    }

    pub fn message_count(&self) -> usize {
        self.state.lock().ready.len()
    }

    pub fn unacked_count(&self) -> usize {
        self.state.lock().unacked
    }

    pub fn consumer_count(&self) -> usize {
        self.state.lock().consumers.len()
    }

    pub fn is_deleted(&self) -> bool {
        self.state.lock().deleted
    }

    /// Marks the queue deleted, drops its messages and tells its consumers they
    /// were cancelled. Returns the number of ready messages it held.
    pub(crate) fn mark_deleted(&self) -> usize {
        let (consumers, dropped) = {
            let mut st = self.state.lock();
            st.deleted = true;
            (
                std::mem::take(&mut st.consumers),
                std::mem::take(&mut st.ready),
            )
        };
        self.memory
            .sub(dropped.iter().map(|m| m.message.body_size()).sum());
        // Acks let the store reclaim the space of a deleted queue's messages.
        self.forget_stored(dropped.iter().filter_map(|m| m.stored.as_ref()));
        for c in &consumers {
            c.notify_cancelled();
        }
        dropped.len()
    }
}
