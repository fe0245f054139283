//! The consumers of a queue, for the management API's `/api/consumers`.

use std::sync::Arc;

use super::Queue;
use crate::consumer::Consumer;

impl Queue {
    /// The consumers subscribed now, in round-robin order (a snapshot).
    pub fn consumers(&self) -> Vec<Arc<Consumer>> {
        self.state.lock().consumers.clone()
    }
}
