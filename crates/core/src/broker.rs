//! The broker: its vhosts, users and shared counters. One `Arc<Broker>` is shared
//! by every connection task.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::auth::Auth;
use crate::error::{CoreError, CoreResult};
use crate::memory::MemoryMonitor;
use crate::persist::{Recovered, Store};
use crate::vhost::VHost;

#[derive(Debug)]
pub struct Broker {
    vhosts: RwLock<HashMap<String, Arc<VHost>>>,
    pub auth: Auth,
    pub memory: Arc<MemoryMonitor>,
    next_id: AtomicU64,
    /// The store's synced log position, when there is a store.
    synced: Option<tokio::sync::watch::Receiver<u64>>,
}

impl Broker {
    /// A broker with the given users and vhosts (`/` always exists).
    pub fn new(auth: Auth, vhosts: &[String], memory_high_watermark: usize) -> Arc<Self> {
        Self::with_store(auth, vhosts, memory_high_watermark, None)
    }

    /// A broker whose durable entities and persistent messages live in `store`,
    /// starting from what the store recovered.
    pub fn with_store(
        auth: Auth,
        vhosts: &[String],
        memory_high_watermark: usize,
        store: Option<(Arc<dyn Store>, Recovered)>,
    ) -> Arc<Self> {
        let memory = Arc::new(MemoryMonitor::new(memory_high_watermark));
        let (store, mut recovered) = match store {
            Some((s, r)) => (Some(s), r),
            None => (None, Recovered::default()),
        };
        let mut map = HashMap::new();
        for name in vhosts
            .iter()
            .map(String::as_str)
            .chain(std::iter::once("/"))
        {
            map.entry(name.to_owned())
                .or_insert_with(|| VHost::new(name, memory.clone(), store.clone()));
        }
        for vhost in map.values() {
            vhost.restore(&mut recovered);
        }
        let synced = store.as_ref().map(|s| s.synced());
        Arc::new(Broker {
            vhosts: RwLock::new(map),
            auth,
            memory,
            next_id: AtomicU64::new(1),
            synced,
        })
    }

    pub fn vhost(&self, name: &str) -> CoreResult<Arc<VHost>> {
        self.vhosts
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| CoreError::not_allowed(format!("vhost '{name}' not found")))
    }

    pub fn has_vhost(&self, name: &str) -> bool {
        self.vhosts.read().contains_key(name)
    }

    /// Follows the store's synced position: a publish whose `Routed::durable_at`
    /// is at or below it is on disk. `None` without a store (nothing to wait for).
    pub fn synced(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.synced.clone()
    }

    /// A broker-wide unique id (connections, consumers).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}
