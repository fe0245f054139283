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
//! - a publish not committed within the log's commit timeout
//!   ([`QuorumLog::commit_timeout`], `[cluster] quorum_commit_timeout_ms`)
//!   fails: the link is *stalled* (no majority: the minority side of a
//!   partition, or the other members down), its failure mark moves to every
//!   sequence given out so far and the waiting publishers get a negative
//!   answer (basic.nack, an MQTT 5 error reason code, a STOMP ERROR; MQTT
//!   3.1.1 has none and closes the connection). While stalled, new publishes
//!   are refused at once and never queued, so nothing piles up without bound.
//!   The link keeps resending what it gave a sequence to, failed or not: a
//!   proposal whose outcome is unknown may commit anyway, so dropping it would
//!   not undo it, and resending keeps what may yet commit from being lost. A
//!   failed publish that commits later is a duplicate if the publisher
//!   republishes (AMQP allows it; RabbitMQ's nack means the same). What never
//!   happens: a confirm for an uncommitted message (every sequence at or below
//!   [`QuorumLink::committed`] is committed: batches commit in order and
//!   nothing given a sequence is dropped), or a silent loss. The first batch
//!   that commits ends the stall;
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
use tokio::time::Instant;

use crate::error::CoreResult;
use crate::message::Message;
use crate::queue::Queue;
use crate::quorum::{Assigned, Index, QueueCommand};
use crate::vhost::StreamWait;

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
    /// How long a publish may wait for its commit before it fails (see the
    /// module doc).
    fn commit_timeout(&self) -> Duration {
        DEFAULT_COMMIT_TIMEOUT
    }
}

/// The default of [`QuorumLog::commit_timeout`] (`[cluster]
/// quorum_commit_timeout_ms`): well above a leader failover (an election
/// takes 0.5-1 s; the failover goals are 5 s after a kill, 10 s after a
/// partition), so a failover delays confirms but does not fail them.
pub const DEFAULT_COMMIT_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// When the oldest enqueue in `pending` not failed yet arrived: its
    /// commit timeout counts from then.
    pending_since: Option<Instant>,
    /// No commit within the timeout: publishes are refused until a batch
    /// commits.
    stalled: bool,
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
    /// Signalled when a publish starts the commit clock (nothing not failed
    /// was pending): the proposer looks at its deadline again. Once per
    /// batch, not per message.
    clock: Notify,
    committed: watch::Sender<u64>,
    /// Sequences up to it that are not committed failed (only grows).
    failed: watch::Sender<u64>,
    timeout: Duration,
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
            clock: Notify::new(),
            committed: watch::channel(0).0,
            failed: watch::channel(0).0,
            timeout: log.commit_timeout(),
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

    /// Proposes a published message; the publisher's answer waits on the
    /// returned [`StreamWait`]: done once committed, failed if it is not
    /// committed within the commit timeout, or failed at once if the link is
    /// stalled now (the message is then not proposed at all).
    pub fn enqueue(&self, message: &Message) -> StreamWait {
        let body = postcard::to_allocvec(message).unwrap_or_default();
        let (seq, clock) = {
            let mut st = self.state.lock();
            if st.stalled {
                return StreamWait::refused(self.committed.subscribe());
            }
            st.seq += 1;
            let seq = st.seq;
            st.pending.push(QueueCommand::Enqueue {
                enqueuer: self.enqueuer,
                seq,
                body,
            });
            let clock = st.pending_since.is_none();
            st.pending_since.get_or_insert_with(Instant::now);
            (seq, clock)
        };
        self.wake.notify_one();
        if clock {
            self.clock.notify_one();
        }
        StreamWait::quorum(self.committed.subscribe(), self.failed.subscribe(), seq)
    }

    /// Whether publishes are refused now (no commit within the timeout).
    pub fn stalled(&self) -> bool {
        self.state.lock().stalled
    }

    /// No commit within the timeout: every sequence given out so far fails,
    /// later publishes are refused until a batch commits.
    fn stall(&self) {
        let seq = {
            let mut st = self.state.lock();
            if st.stalled || st.closed {
                return;
            }
            st.stalled = true;
            // What is pending failed with the rest: no timeout of its own.
            st.pending_since = None;
            st.seq
        };
        tracing::warn!(queue = %self.queue_name, timeout_ms = self.timeout.as_millis() as u64,
            "quorum queue commit timed out (no majority?): publishes waiting on it fail, new ones are refused until it commits again");
        self.failed.send_replace(seq);
        self.log.nudge();
    }

    /// When the link stalls unless something commits first: the commit
    /// timeout after the oldest enqueue it waits for and has not failed yet
    /// (`batch_since`: the batch in flight; then what is pending).
    fn stall_at(&self, batch_since: Option<Instant>) -> Option<Instant> {
        let st = self.state.lock();
        if st.stalled {
            return None;
        }
        let since = match (batch_since, st.pending_since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        since.map(|t| t + self.timeout)
    }

    /// The queue's messages in the log (see [`QuorumLog::message_count`]).
    pub fn log_message_count(&self) -> Option<usize> {
        self.log.message_count(&self.vhost, &self.queue_name)
    }

    /// The highest enqueue sequence committed.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.subscribe()
    }

    /// The failure mark (see [`StreamWait::quorum`]).
    pub fn failed(&self) -> watch::Receiver<u64> {
        self.failed.subscribe()
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
/// While a batch waits, the link stalls once the oldest publish it waits for
/// is older than the commit timeout (see the module doc); the batch is still
/// resent until it commits.
async fn run(link: Arc<QuorumLink>) {
    loop {
        let (batch, batch_since) = {
            let mut st = link.state.lock();
            if st.closed {
                return;
            }
            (std::mem::take(&mut st.pending), st.pending_since.take())
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
            let proposal = link
                .log
                .propose(&link.vhost, &link.queue_name, batch.clone());
            match watch_stall(&link, batch_since, proposal).await {
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
                    watch_stall(&link, batch_since, async {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok(())
                    })
                    .await
                    .ok();
                }
            }
        }
        // Committed: whatever stalled the link is over.
        let was_stalled = std::mem::replace(&mut link.state.lock().stalled, false);
        if was_stalled {
            tracing::info!(queue = %link.queue_name, "quorum queue commits again; publishes are accepted");
        }
        if let Some(seq) = last_seq {
            link.committed.send_replace(seq);
            link.log.nudge();
        }
    }
}

/// Awaits `fut`, stalling the link if its commit timeout passes meanwhile
/// (the deadline is looked at again whenever something is queued).
async fn watch_stall<F>(link: &QuorumLink, batch_since: Option<Instant>, fut: F) -> CoreResult<()>
where
    F: Future<Output = CoreResult<()>>,
{
    tokio::pin!(fut);
    loop {
        let deadline = link.stall_at(batch_since);
        tokio::select! {
            r = &mut fut => return r,
            () = sleep_until(deadline) => link.stall(),
            // A publish started the clock (nothing else was pending).
            () = link.clock.notified() => {}
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    //! The commit timeout in tokio's paused time: nothing here sleeps for
    //! real, and the clock only moves when every task waits.

    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;
    use crate::error::CoreError;
    use crate::memory::MemoryMonitor;
    use crate::message::Properties;
    use crate::queue::QueueOptions;
    use crate::vhost::{QueueDeclare, VHost, WaitState};

    const TIMEOUT: Duration = Duration::from_secs(5);

    /// A log that commits at once while `up`, and otherwise fails every
    /// proposal (`hang`: never answers it, as a leader that lost its
    /// majority may do).
    #[derive(Debug, Default)]
    struct FakeLog {
        up: AtomicBool,
        hang: AtomicBool,
        proposals: AtomicUsize,
        enqueues: Mutex<Vec<u64>>,
    }

    impl QuorumLog for FakeLog {
        fn node(&self) -> &str {
            "n1"
        }
        fn incarnation(&self) -> u64 {
            1
        }
        fn propose(&self, _vhost: &str, _queue: &str, cmds: Vec<QueueCommand>) -> Proposal {
            self.proposals.fetch_add(1, Ordering::SeqCst);
            if self.up.load(Ordering::SeqCst) {
                let mut e = self.enqueues.lock();
                for c in cmds {
                    if let QueueCommand::Enqueue { seq, .. } = c {
                        e.push(seq);
                    }
                }
                return Box::pin(async { Ok(()) });
            }
            if self.hang.load(Ordering::SeqCst) {
                return Box::pin(std::future::pending());
            }
            Box::pin(async { Err(CoreError::precondition("no leader")) })
        }
        fn nudge(&self) {}
        fn commit_timeout(&self) -> Duration {
            TIMEOUT
        }
    }

    fn link(log: &Arc<FakeLog>) -> (Arc<VHost>, Arc<QuorumLink>) {
        let v = VHost::new("/", Arc::new(MemoryMonitor::new(0)), None);
        let q = v
            .declare_queue(QueueDeclare {
                name: "q".into(),
                options: QueueOptions::default(),
                connection: 1,
                ..Default::default()
            })
            .unwrap()
            .queue;
        let l = QuorumLink::start(log.clone(), &q, 7);
        (v, l)
    }

    fn message() -> Arc<Message> {
        Message::new(
            String::new(),
            "q",
            Properties::default(),
            bytes::Bytes::from_static(b"m"),
        )
    }

    /// Lets the proposer run (paused time: no clock moves).
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    async fn minority_publish_fails_after_the_timeout_then_recovers(hang: bool) {
        let log = Arc::new(FakeLog::default());
        log.hang.store(hang, Ordering::SeqCst);
        let (_v, l) = link(&log);
        settle().await;
        let first = l.enqueue(&message());
        tokio::time::sleep(TIMEOUT - Duration::from_millis(10)).await;
        settle().await;
        assert_eq!(
            first.state(),
            WaitState::Pending,
            "before the timeout it waits"
        );
        let second = l.enqueue(&message());
        tokio::time::sleep(Duration::from_millis(20)).await;
        settle().await;
        assert_eq!(first.state(), WaitState::Failed, "the timeout fails it");
        // Queued behind the stalled batch: it fails with it.
        assert_eq!(second.state(), WaitState::Failed);
        assert!(l.stalled());
        // While stalled, publishes are refused at once and not queued.
        let pending_before = l.state.lock().pending.len();
        let refused = l.enqueue(&message());
        assert_eq!(refused.state(), WaitState::Failed);
        assert_eq!(l.state.lock().pending.len(), pending_before);
        // The majority is back: what was given a sequence is still proposed
        // (never lost: a nacked message may commit, a duplicate if republished),
        // and new publishes are accepted again.
        log.up.store(true, Ordering::SeqCst);
        if hang {
            // A hung proposal is never given up on (its outcome is unknown);
            // here it stays hung, so the test stops at the refusal.
            return;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        settle().await;
        assert!(!l.stalled());
        assert_eq!(*log.enqueues.lock(), vec![1, 2]);
        // Committed wins over failed for what did commit.
        assert_eq!(first.state(), WaitState::Done);
        let third = l.enqueue(&message());
        settle().await;
        assert_eq!(third.state(), WaitState::Done);
        // The refused one never commits, whatever commits after it.
        assert_eq!(refused.state(), WaitState::Failed);
        assert_eq!(*log.enqueues.lock(), vec![1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_publish_without_a_majority_fails_after_the_commit_timeout() {
        minority_publish_fails_after_the_timeout_then_recovers(false).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_proposal_still_times_out() {
        minority_publish_fails_after_the_timeout_then_recovers(true).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_publish_committed_in_time_never_fails() {
        let log = Arc::new(FakeLog::default());
        log.up.store(true, Ordering::SeqCst);
        let (_v, l) = link(&log);
        let w = l.enqueue(&message());
        settle().await;
        assert_eq!(w.state(), WaitState::Done);
        tokio::time::sleep(TIMEOUT * 3).await;
        settle().await;
        assert_eq!(w.state(), WaitState::Done);
        assert!(!l.stalled());
    }

    #[tokio::test(start_paused = true)]
    async fn the_clock_starts_at_the_publish_not_at_a_stuck_settle() {
        // A settle-only batch is stuck; a publish queued behind it much later
        // gets its full timeout from its own arrival.
        let log = Arc::new(FakeLog::default());
        let (_v, l) = link(&log);
        settle().await; // the NodeUp batch is in flight and failing
        tokio::time::sleep(TIMEOUT * 2).await;
        settle().await;
        assert!(!l.stalled(), "no publish waited: nothing to fail");
        let w = l.enqueue(&message());
        tokio::time::sleep(TIMEOUT - Duration::from_millis(10)).await;
        settle().await;
        assert_eq!(w.state(), WaitState::Pending);
        tokio::time::sleep(Duration::from_millis(20)).await;
        settle().await;
        assert_eq!(w.state(), WaitState::Failed);
    }
}
