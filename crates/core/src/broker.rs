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
use crate::policy::Policies;
use crate::stats::{self, Lengths, MessageStats, NodeStats, Range, Snapshot};
use crate::timer::{Clock, Timers, NEVER};
use crate::vhost::VHost;

#[derive(Debug)]
pub struct Broker {
    vhosts: RwLock<HashMap<String, Arc<VHost>>>,
    pub auth: Auth,
    pub memory: Arc<MemoryMonitor>,
    next_id: AtomicU64,
    /// The store's synced log position, when there is a store.
    synced: Option<tokio::sync::watch::Receiver<u64>>,
    /// The store itself, for adapters' own records (MQTT retained messages and
    /// sessions); `None`: everything lives in memory only.
    store: Option<Arc<dyn Store>>,
    timers: Arc<Timers>,
    /// Message statistics of the node, its protocols and connections (stats.rs).
    pub stats: Arc<NodeStats>,
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
        Self::build(
            auth,
            vhosts,
            memory_high_watermark,
            store,
            Policies::default(),
            Clock::System,
        )
    }

    /// The most general constructor: with queue `policies` (applied to recovered
    /// and new queues) and the `clock` read by calls that take no `now`.
    pub fn build(
        auth: Auth,
        vhosts: &[String],
        memory_high_watermark: usize,
        store: Option<(Arc<dyn Store>, Recovered)>,
        policies: Policies,
        clock: Clock,
    ) -> Arc<Self> {
        let timers = Arc::new(Timers::new(clock));
        let policies = Arc::new(policies);
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
            map.entry(name.to_owned()).or_insert_with(|| {
                VHost::with_env(
                    name,
                    memory.clone(),
                    store.clone(),
                    timers.clone(),
                    policies.clone(),
                )
            });
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
            store,
            timers,
            stats: Arc::new(NodeStats::default()),
        })
    }

    /// The clock and the earliest deadline of every queue: the server's timer
    /// task sleeps until [`Timers::earliest`] or [`Timers::changed`].
    pub fn timers(&self) -> &Arc<Timers> {
        &self.timers
    }

    /// Does what is due at `now` (ms since the Unix epoch) in every vhost:
    /// expires messages and unused queues, releases delayed messages. Returns
    /// the next deadline (`timer::NEVER`: none). The core never sleeps; the
    /// server calls this from one timer task.
    pub fn tick(&self, now: u64) -> u64 {
        self.timers.clock.advance_to(now);
        self.timers.reset();
        let vhosts: Vec<Arc<VHost>> = self.vhosts.read().values().cloned().collect();
        let next = vhosts.iter().map(|v| v.tick(now)).fold(NEVER, u64::min);
        self.timers.note(next);
        next
    }

    /// Records a statistics sample of every object when one is due (every
    /// [`stats::SAMPLE_INTERVAL_MS`]); the server calls this from its timer
    /// task, which wakes at least once a second. Returns whether it sampled.
    pub fn sample_stats(&self, now: u64) -> bool {
        if !self.stats.sample_due(now) {
            return false;
        }
        self.sample_stats_now(now);
        true
    }

    /// Records a statistics sample of every object at `now`, due or not.
    pub fn sample_stats_now(&self, now: u64) {
        self.stats.sample_sources(now);
        let by_vhost = self.stats.by_vhost();
        let mut total = Snapshot::default();
        let mut lengths = Lengths::default();
        for v in self.vhosts() {
            let sources = by_vhost.get(&v.name).copied().unwrap_or_default();
            let (t, l) = v.sample_stats(now, &sources);
            total.merge(&t);
            lengths.merge(&l);
        }
        self.stats.history.record(now, total, lengths);
    }

    /// The overview's `message_stats` (the node's totals as of the last sample).
    pub fn message_stats(&self, range: Option<Range>) -> MessageStats {
        let (current, _) = self.stats.history.last();
        self.stats
            .history
            .message_stats(&current, stats::TOTAL_KEYS, range)
    }

    /// Every vhost.
    pub fn vhosts(&self) -> Vec<Arc<VHost>> {
        self.vhosts.read().values().cloned().collect()
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

    /// The store, if the broker has one: adapters keep their own records in it
    /// ([`Store::save_record`]). `None` for a broker in memory only.
    pub fn store(&self) -> Option<Arc<dyn Store>> {
        self.store.clone()
    }

    /// A broker-wide unique id (connections, consumers).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}
