//! A clustered quorum queue's link to its replicated log, on one node.
//!
//! The log itself is elsewhere (crates/cluster), behind [`QuorumLog`]: one
//! Raft group per queue. The link is the node's side of the design in
//! quorum.rs:
//!
//! - publishes become `Enqueue` commands, numbered by this node's enqueuer id
//!   (random per node incarnation) and a sequence; one proposer task per queue
//!   batches whatever piled up into one proposal and, on a failed or unknown
//!   outcome, resends the same batch with the same numbers (the machine
//!   deduplicates). A publisher's confirm waits for [`QuorumLink::committed`] to
//!   pass its sequence;
//! - what the log assigned to this node arrives through
//!   [`QuorumLink::assigned`] and goes into the node's ordinary core queue,
//!   with the log index as the message id, for local consumers;
//! - acks, returns and discards are proposed back, each giving the node its
//!   credit back (a `Checkout` in the same batch) while it has consumers; the
//!   node's credit window is its consumers' prefetch (bounded when unlimited);
//!   when its last consumer leaves, what it held undelivered is withdrawn;
//! - a node the queue's leader marked down (`NodeDown`: it was silent too
//!   long, partitioned or paused, but did not restart) learns it from its own
//!   copy of the machine ([`QuorumLink::marked_down`]): what it held was given
//!   to other nodes, so it drops what it still holds undelivered and announces
//!   itself again under the next incarnation (its checkouts are ignored while
//!   it is marked down). Acks of what it delivered before are proposed as
//!   usual and ignored by the machine (those messages were redelivered
//!   elsewhere: a duplicate, which at-least-once allows).

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{watch, Notify};

use crate::error::CoreResult;
use crate::message::Message;
use crate::queue::Queue;
use crate::quorum::{Assigned, Index, QueueCommand};

/// What [`QuorumLog::propose`] returns: resolves once the commands are
/// committed, or with an error (not committed, or an unknown outcome).
pub type Proposal = Pin<Box<dyn Future<Output = CoreResult<()>> + Send>>;

/// The replicated log that carries quorum queues' commands on a clustered node.
/// The log applies committed commands to each node's copy of the queue's
/// machine and hands a node what was assigned to it through
/// `VHost::quorum_assigned`.
pub trait QuorumLog: Send + Sync + Debug {
    /// This node's name (what `Checkout` and the machine's assignments name).
    fn node(&self) -> &str;
    /// This node's incarnation: random, chosen at start. A link that rejoins
    /// after being marked down counts up from it (see [`REJOINS`]).
    fn incarnation(&self) -> u64;
    /// Proposes `cmds` for the queue, in order, as one entry.
    fn propose(&self, vhost: &str, queue: &str, cmds: Vec<QueueCommand>) -> Proposal;
    /// Tells connections waiting for confirms that a commit moved.
    fn nudge(&self);
    /// The queue's messages as this node's copy of the machine has them
    /// (ready plus checked out to any node); `None`: this node has no copy.
    fn message_count(&self, _vhost: &str, _queue: &str) -> Option<usize> {
        None
    }
}

/// A link's incarnation is the process's plus the times it rejoined after
/// being marked down, fewer than this: the log side hands assignments to any
/// incarnation in `incarnation..incarnation + REJOINS` (the one the link runs
/// as is the last it announced). Another process's random incarnation lands
/// in that range with probability 2^-32.
pub const REJOINS: u64 = 1 << 32;

/// The credit window of a node whose consumers have unlimited prefetch.
pub const UNLIMITED_WINDOW: u64 = 256;
/// The most credit a node asks for at once, whatever its consumers' prefetch.
pub const MAX_WINDOW: u64 = 2000;

#[derive(Debug, Default)]
struct LinkState {
    /// The last sequence number given to an enqueue.
    seq: u64,
    /// Commands not proposed yet, in order.
    pending: Vec<QueueCommand>,
    /// Messages assigned to this node and not given back yet.
    held: u64,
    /// Credit asked for and not used yet (this node's view).
    credit: u64,
    /// What the node's consumers can take (0: no consumer).
    window: u64,
    /// The incarnation this link announced last (see [`REJOINS`]).
    incarnation: u64,
    closed: bool,
}

/// One quorum queue's log link on this node (see the module doc).
#[derive(Debug)]
pub struct QuorumLink {
    log: Arc<dyn QuorumLog>,
    vhost: String,
    queue_name: String,
    queue: Weak<Queue>,
    enqueuer: u64,
    state: Mutex<LinkState>,
    wake: Notify,
    committed: watch::Sender<u64>,
}

impl QuorumLink {
    /// A link for `queue`; announces this node's incarnation (`NodeUp`) and
    /// starts the proposer task on the current tokio runtime.
    pub fn start(log: Arc<dyn QuorumLog>, queue: &Arc<Queue>, enqueuer: u64) -> Arc<QuorumLink> {
        let link = Arc::new(QuorumLink {
            vhost: queue.vhost.clone(),
            queue_name: queue.name.clone(),
            queue: Arc::downgrade(queue),
            enqueuer,
            state: Mutex::new(LinkState {
                incarnation: log.incarnation(),
                ..LinkState::default()
            }),
            wake: Notify::new(),
            committed: watch::channel(0).0,
            log,
        });
        link.push(vec![QueueCommand::NodeUp {
            node: link.log.node().to_owned(),
            incarnation: link.log.incarnation(),
        }]);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(run(link.clone()));
            }
            Err(_) => {
                tracing::error!(queue = %link.queue_name, "quorum queue link outside a runtime: it will not propose")
            }
        }
        link
    }

    fn push(&self, cmds: Vec<QueueCommand>) {
        if cmds.is_empty() {
            return;
        }
        self.state.lock().pending.extend(cmds);
        self.wake.notify_one();
    }

    fn node(&self) -> String {
        self.log.node().to_owned()
    }

    /// Proposes a published message; the returned sequence is confirmed once
    /// [`QuorumLink::committed`] reaches it.
    pub fn enqueue(&self, message: &Message) -> u64 {
        let body = postcard::to_allocvec(message).unwrap_or_default();
        let seq = {
            let mut st = self.state.lock();
            st.seq += 1;
            let seq = st.seq;
            st.pending.push(QueueCommand::Enqueue {
                enqueuer: self.enqueuer,
                seq,
                body,
            });
            seq
        };
        self.wake.notify_one();
        seq
    }

    /// The queue's messages in the log (see [`QuorumLog::message_count`]).
    pub fn log_message_count(&self) -> Option<usize> {
        self.log.message_count(&self.vhost, &self.queue_name)
    }

    /// The highest enqueue sequence committed.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.subscribe()
    }

    /// Messages the log assigned to this node: into the local queue.
    pub fn assigned(&self, assigned: Vec<Assigned>) {
        let Some(queue) = self.queue.upgrade() else {
            return;
        };
        let n = assigned.len() as u64;
        let mut undelivered = Vec::new();
        for a in assigned {
            match postcard::from_bytes::<Message>(&a.body) {
                Ok(m) => queue.enqueue_assigned(Arc::new(m), a.index, a.delivery_count),
                Err(e) => {
                    tracing::error!(queue = %self.queue_name, index = a.index, error = %e, "undecodable quorum queue message dropped");
                    undelivered.push(a.index);
                }
            }
        }
        let withdraw = {
            let mut st = self.state.lock();
            st.held += n;
            st.credit = st.credit.saturating_sub(n);
            st.window == 0
        };
        if !undelivered.is_empty() {
            self.discard(undelivered);
        }
        if withdraw {
            // No consumer here any more: give back what came in the meantime.
            self.withdraw(queue.take_ready_ids());
        }
    }

    /// The node's consumers can now take `window` messages in all.
    pub fn set_window(&self, window: u64) {
        let window = window.min(MAX_WINDOW);
        let cmd = {
            let mut st = self.state.lock();
            st.window = window;
            self.top_up(&mut st)
        };
        self.push(cmd.into_iter().collect());
    }

    /// Asks for credit up to the window (None: enough already).
    fn top_up(&self, st: &mut LinkState) -> Option<QueueCommand> {
        let have = st.held + st.credit;
        if st.window <= have || st.closed {
            return None;
        }
        let more = u32::try_from(st.window - have).unwrap_or(u32::MAX);
        st.credit += u64::from(more);
        Some(QueueCommand::Checkout {
            node: self.node(),
            incarnation: st.incarnation,
            credit: more,
        })
    }

    /// The incarnation this link runs as now.
    pub fn incarnation(&self) -> u64 {
        self.state.lock().incarnation
    }

    /// This node's copy of the machine marks it down while it announced
    /// `incarnation` (called by the log, in apply order). If that is the
    /// incarnation this link runs as: what the local queue holds undelivered
    /// was given back by the `NodeDown` and is dropped here, and the link
    /// announces the next incarnation (`NodeUp`) and asks for credit again.
    /// Otherwise (an older incarnation, or already rejoined) nothing happens.
    /// Returns whether it rejoined.
    pub fn marked_down(&self, incarnation: u64) -> bool {
        let next = {
            let mut st = self.state.lock();
            if st.closed || st.incarnation != incarnation {
                return false;
            }
            let next = st.incarnation.wrapping_add(1);
            if next.wrapping_sub(self.log.incarnation()) >= REJOINS {
                tracing::error!(queue = %self.queue_name, "quorum queue link rejoined too often; not rejoining");
                return false;
            }
            st.incarnation = next;
            next
        };
        // Outside the link's lock (the queue's lock is taken first elsewhere).
        // Nothing more is assigned here until the new `NodeUp` is applied.
        let dropped = self.queue.upgrade().map_or(0, |q| q.take_ready_ids().len()) as u64;
        let cmds = {
            let mut st = self.state.lock();
            // Held now: what consumers here have unacked (their acks are
            // still proposed, and still give the count back).
            st.held = st.held.saturating_sub(dropped);
            st.credit = 0;
            // Checkouts of the old incarnation would be ignored anyway.
            st.pending
                .retain(|c| !matches!(c, QueueCommand::Checkout { .. }));
            tracing::warn!(queue = %self.queue_name, dropped, "this node was marked down in the quorum queue's log; rejoining");
            let mut cmds = vec![QueueCommand::NodeUp {
                node: self.node(),
                incarnation: next,
            }];
            cmds.extend(self.top_up(&mut st));
            cmds
        };
        self.push(cmds);
        true
    }

    fn give_back(&self, cmd: QueueCommand, n: u64) {
        let top = {
            let mut st = self.state.lock();
            st.held = st.held.saturating_sub(n);
            self.top_up(&mut st)
        };
        self.push(std::iter::once(cmd).chain(top).collect());
    }

    /// Acked here.
    pub fn settle(&self, indexes: Vec<Index>) {
        if indexes.is_empty() {
            return;
        }
        let n = indexes.len() as u64;
        let node = self.node();
        self.give_back(QueueCommand::Settle { node, indexes }, n);
    }

    /// Nacked with requeue, or unacked when a consumer went: back to the log's
    /// ready list, one delivery counted.
    pub fn return_(&self, indexes: Vec<Index>) {
        if indexes.is_empty() {
            return;
        }
        let n = indexes.len() as u64;
        let node = self.node();
        self.give_back(QueueCommand::Return { node, indexes }, n);
    }

    /// Gone for good here (rejected, expired, dead-lettered).
    pub fn discard(&self, indexes: Vec<Index>) {
        if indexes.is_empty() {
            return;
        }
        let n = indexes.len() as u64;
        let node = self.node();
        self.give_back(QueueCommand::Discard { node, indexes }, n);
    }

    /// The last local consumer left: credit dropped, `indexes` (held here,
    /// never delivered) go back uncounted.
    pub fn withdraw(&self, indexes: Vec<Index>) {
        let n = indexes.len() as u64;
        {
            let mut st = self.state.lock();
            st.held = st.held.saturating_sub(n);
            st.credit = 0;
            st.window = 0;
        }
        let node = self.node();
        self.push(vec![QueueCommand::Withdraw { node, indexes }]);
    }

    /// The queue was deleted: the proposer stops.
    pub fn close(&self) {
        self.state.lock().closed = true;
        self.wake.notify_one();
    }
}

/// The proposer: one batch in flight at a time, resent until committed.
async fn run(link: Arc<QuorumLink>) {
    loop {
        let batch = {
            let mut st = link.state.lock();
            if st.closed {
                return;
            }
            std::mem::take(&mut st.pending)
        };
        if batch.is_empty() {
            link.wake.notified().await;
            continue;
        }
        let last_seq = batch
            .iter()
            .filter_map(|c| match c {
                QueueCommand::Enqueue { seq, .. } => Some(*seq),
                _ => None,
            })
            .max();
        let mut failures = 0u32;
        loop {
            match link
                .log
                .propose(&link.vhost, &link.queue_name, batch.clone())
                .await
            {
                Ok(()) => break,
                Err(e) => {
                    if link.state.lock().closed {
                        return;
                    }
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(50) {
                        tracing::warn!(queue = %link.queue_name, error = %e, failures, "quorum queue proposal failed; resending");
                    }
                    // The same commands with the same numbers: the machine
                    // ignores an enqueue it applied before.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        if let Some(seq) = last_seq {
            link.committed.send_replace(seq);
            link.log.nudge();
        }
    }
}
