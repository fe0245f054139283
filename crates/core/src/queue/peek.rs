//! Browsing a queue without consuming it: the management API's `peek`.
//!
//! A peek copies the first ready messages, in the order consumers would get them
//! (highest priority first, then arrival), and changes nothing: no message is
//! taken, marked redelivered or counted as delivered, and a body paged out to
//! disk is read into the copy only, so the memory alarm's count does not move.
//! The queue's lock is held while the copies are made (cheap: `Arc` clones),
//! never while a paged-out body is read back.

use std::sync::Arc;

use super::{released, Queue, QueuedMessage};
use crate::message::Message;

/// One message as a peek shows it.
#[derive(Debug, Clone)]
pub struct Peeked {
    pub message: Arc<Message>,
    /// Delivered before and returned.
    pub redelivered: bool,
    /// How often it came back (quorum queues' delivery count).
    pub delivery_count: u32,
}

impl Queue {
    /// Copies of the first `count` ready messages, leaving the queue as it is.
    /// A paged-out body that cannot be read back is left out of the answer.
    pub fn peek(&self, count: usize) -> Vec<Peeked> {
        let head: Vec<QueuedMessage> = {
            let st = self.state.lock();
            st.ready
                .levels
                .iter()
                .rev()
                .flatten()
                .take(count)
                .cloned()
                .collect()
        };
        head.into_iter()
            .filter_map(|m| {
                let (redelivered, delivery_count) = (m.redelivered(), m.delivery_count());
                let message = match (m.on_disk(), &self.durable, m.stored()) {
                    (None, _, _) => m.message,
                    (Some(_), Some((store, _)), Some(stored)) => {
                        released(&Arc::new(store.read_message(stored).ok()?))
                    }
                    (Some(_), _, _) => return None,
                };
                Some(Peeked {
                    message,
                    redelivered,
                    delivery_count,
                })
            })
            .collect()
    }
}
