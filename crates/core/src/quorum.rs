//! The replicated state machine of a quorum queue: what every member of the
//! queue's Raft group applies, in log order, to the same result.
//!
//! Design (issue 14, README "Clustering"): messages live in the log and in
//! this machine on every member. A node does not deliver from a leader's
//! copy: it *checks out* messages for its own consumers. A `Checkout` adds
//! node-level credit (how many more messages the node can take now, from its
//! local consumers' prefetch); the machine hands ready messages, in index
//! order, to nodes with credit as they arrive, round-robin between nodes.
//! Each node then serves what it was given through its ordinary core queue,
//! with local consumers and local prefetch. Acks settle (`Settle`), nacks and
//! cancels return (`Return`, counting a delivery), rejects without requeue
//! discard (`Discard`, the node dead-letters). A node that restarts announces
//! its new incarnation (`NodeUp`) and a node found down is marked so
//! (`NodeDown`): what was checked out to it goes back to the ready list with
//! one more delivery counted, so consumers elsewhere get it, `redelivered`.
//!
//! Publishers are deduplicated: each enqueue carries the publishing node's
//! enqueuer id and a sequence number; after a leader change a node resends
//! what was not confirmed with the same numbers, and a number already applied
//! is answered with the index it got then.
//!
//! Nothing here does I/O or reads a clock: the same commands give the same
//! state and the same effects on every member.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// A log index: a message's identity in its queue.
pub type Index = u64;

/// A command of a quorum queue's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueCommand {
    /// A published message (the core's encoded `Message`, opaque here).
    Enqueue {
        enqueuer: u64,
        seq: u64,
        body: Vec<u8>,
    },
    /// `node` can take `credit` more messages (added to what it has left).
    /// Ignored unless `incarnation` is the node's current one and the node is
    /// not marked down: a late checkout of a dead node gives it nothing.
    Checkout {
        node: String,
        incarnation: u64,
        credit: u32,
    },
    /// Acked on `node`: the messages leave the queue.
    Settle { node: String, indexes: Vec<Index> },
    /// Back to the ready list, one delivery counted (nack/requeue, a cancelled
    /// consumer's unacked messages). Returning also gives the node its credit
    /// back only through a new `Checkout`.
    Return { node: String, indexes: Vec<Index> },
    /// Removed without being acked (reject without requeue, expired, over the
    /// delivery limit): the node dead-letters them if the queue says so.
    Discard { node: String, indexes: Vec<Index> },
    /// `node` (re)started as `incarnation`: what an older incarnation held goes
    /// back to the ready list.
    NodeUp { node: String, incarnation: u64 },
    /// `node` is down: what it held goes back, its credit is dropped.
    NodeDown { node: String },
    /// Every ready message is removed (checked-out ones stay).
    Purge,
    /// `node` has no consumer left: its credit is dropped and `indexes` (checked
    /// out to it but never delivered) go back to the ready list uncounted.
    Withdraw { node: String, indexes: Vec<Index> },
}

/// What applying a command answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueApplied {
    /// The enqueue's index; `duplicate`: applied before, under that index.
    Enqueued {
        index: Index,
        duplicate: bool,
    },
    /// Messages removed by a purge.
    Purged(u64),
    Done,
}

/// A message handed to a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    pub node: String,
    pub index: Index,
    /// Deliveries before this one (> 0: deliver with `redelivered` set).
    pub delivery_count: u32,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Held {
    body: Vec<u8>,
    delivery_count: u32,
}

/// The state of one quorum queue (serialisable whole: it is the snapshot).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueMachine {
    ready: BTreeMap<Index, Held>,
    /// Checked out: index -> (node, message).
    out: BTreeMap<Index, (String, Held)>,
    /// Credit each node has left.
    credit: BTreeMap<String, u64>,
    /// The incarnation each node announced last.
    incarnations: BTreeMap<String, u64>,
    /// Nodes marked down since their last `NodeUp`.
    down: std::collections::BTreeSet<String>,
    /// Per enqueuer: the highest sequence applied and the index it got.
    enqueuers: HashMap<u64, (u64, Index)>,
    /// The node that got the last message (round-robin between nodes).
    last_node: Option<String>,
    /// The last index applied.
    applied: Index,
}

impl QueueMachine {
    pub fn new() -> Self {
        Self::default()
    }

    /// Messages ready (not checked out).
    pub fn ready_count(&self) -> usize {
        self.ready.len()
    }

    /// Messages checked out to nodes (delivered or about to be).
    pub fn checked_out_count(&self) -> usize {
        self.out.len()
    }

    /// Messages checked out to `node`, with their delivery counts (a node
    /// rebuilding its local queue after a restart of its broker side).
    pub fn checked_out_to(&self, node: &str) -> Vec<Assigned> {
        self.out
            .iter()
            .filter(|(_, (n, _))| n == node)
            .map(|(i, (n, h))| Assigned {
                node: n.clone(),
                index: *i,
                delivery_count: h.delivery_count,
                body: h.body.clone(),
            })
            .collect()
    }

    /// The incarnation `node` announced last.
    pub fn incarnation_of(&self, node: &str) -> Option<u64> {
        self.incarnations.get(node).copied()
    }

    /// Whether `node` is marked down (a `NodeDown` since its last `NodeUp`):
    /// its checkouts are ignored until it announces itself again.
    pub fn is_down(&self, node: &str) -> bool {
        self.down.contains(node)
    }

    /// Whether a failure detector should propose `NodeDown` for `node`: it is
    /// not marked down yet and holds messages or credit (a node that holds
    /// nothing loses nothing by staying up in the machine).
    pub fn worth_marking_down(&self, node: &str) -> bool {
        !self.down.contains(node)
            && (self.credit.contains_key(node) || self.out.values().any(|(n, _)| n == node))
    }

    /// The credit `node` has left.
    pub fn credit_of(&self, node: &str) -> u64 {
        self.credit.get(node).copied().unwrap_or(0)
    }

    /// The last log index applied.
    pub fn applied_index(&self) -> Index {
        self.applied
    }

    /// Applies the command at log `index`; what it assigned to nodes is pushed
    /// to `assigned` (every member computes the same; each node serves its own).
    pub fn apply(
        &mut self,
        index: Index,
        cmd: QueueCommand,
        assigned: &mut Vec<Assigned>,
    ) -> QueueApplied {
        self.applied = self.applied.max(index);
        let answer = match cmd {
            QueueCommand::Enqueue {
                enqueuer,
                seq,
                body,
            } => {
                if let Some(&(last, at)) = self.enqueuers.get(&enqueuer) {
                    if seq <= last {
                        return QueueApplied::Enqueued {
                            index: at,
                            duplicate: true,
                        };
                    }
                }
                self.enqueuers.insert(enqueuer, (seq, index));
                self.ready.insert(
                    index,
                    Held {
                        body,
                        delivery_count: 0,
                    },
                );
                QueueApplied::Enqueued {
                    index,
                    duplicate: false,
                }
            }
            QueueCommand::Checkout {
                node,
                incarnation,
                credit,
            } => {
                if self.incarnations.get(&node) == Some(&incarnation) && !self.down.contains(&node)
                {
                    *self.credit.entry(node).or_default() += u64::from(credit);
                }
                QueueApplied::Done
            }
            QueueCommand::Settle { node, indexes } => {
                for i in indexes {
                    self.take_out(&node, i);
                }
                QueueApplied::Done
            }
            QueueCommand::Discard { node, indexes } => {
                for i in indexes {
                    self.take_out(&node, i);
                }
                QueueApplied::Done
            }
            QueueCommand::Return { node, indexes } => {
                for i in indexes {
                    if let Some(mut held) = self.take_out(&node, i) {
                        held.delivery_count = held.delivery_count.saturating_add(1);
                        self.ready.insert(i, held);
                    }
                }
                QueueApplied::Done
            }
            QueueCommand::NodeUp { node, incarnation } => {
                if self.incarnations.get(&node) != Some(&incarnation) {
                    self.return_all_of(&node);
                    self.incarnations.insert(node.clone(), incarnation);
                }
                self.down.remove(&node);
                QueueApplied::Done
            }
            QueueCommand::NodeDown { node } => {
                self.return_all_of(&node);
                self.down.insert(node);
                QueueApplied::Done
            }
            QueueCommand::Purge => {
                let n = self.ready.len() as u64;
                self.ready.clear();
                QueueApplied::Purged(n)
            }
            QueueCommand::Withdraw { node, indexes } => {
                self.credit.remove(&node);
                for i in indexes {
                    if let Some(held) = self.take_out(&node, i) {
                        self.ready.insert(i, held);
                    }
                }
                QueueApplied::Done
            }
        };
        self.assign(assigned);
        answer
    }

    /// Removes a message checked out to `node` (none if it is not: settled
    /// twice, or returned when the node was taken for down).
    fn take_out(&mut self, node: &str, index: Index) -> Option<Held> {
        match self.out.get(&index) {
            Some((n, _)) if n == node => self.out.remove(&index).map(|(_, h)| h),
            _ => None,
        }
    }

    /// Everything `node` holds goes back (one delivery counted: it may have
    /// been delivered), and its credit is dropped.
    fn return_all_of(&mut self, node: &str) {
        let held: Vec<Index> = self
            .out
            .iter()
            .filter(|(_, (n, _))| n == node)
            .map(|(i, _)| *i)
            .collect();
        for i in held {
            if let Some((_, mut h)) = self.out.remove(&i) {
                h.delivery_count = h.delivery_count.saturating_add(1);
                self.ready.insert(i, h);
            }
        }
        self.credit.remove(node);
    }

    /// Hands ready messages, oldest first, to nodes with credit, one node after
    /// the other in name order starting after the last one served.
    fn assign(&mut self, assigned: &mut Vec<Assigned>) {
        while !self.ready.is_empty() {
            let Some(node) = self.next_node() else {
                return;
            };
            let Some((index, held)) = self.ready.pop_first() else {
                return;
            };
            if let Some(c) = self.credit.get_mut(&node) {
                *c -= 1;
                if *c == 0 {
                    self.credit.remove(&node);
                }
            }
            assigned.push(Assigned {
                node: node.clone(),
                index,
                delivery_count: held.delivery_count,
                body: held.body.clone(),
            });
            self.out.insert(index, (node.clone(), held));
            self.last_node = Some(node);
        }
    }

    /// The next node with credit after `last_node` (wrapping around).
    fn next_node(&self) -> Option<String> {
        let after = self.last_node.as_deref().and_then(|last| {
            self.credit
                .range::<str, _>((std::ops::Bound::Excluded(last), std::ops::Bound::Unbounded))
                .next()
        });
        after
            .or_else(|| self.credit.iter().next())
            .map(|(n, _)| n.clone())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn enqueue(enqueuer: u64, seq: u64) -> QueueCommand {
        QueueCommand::Enqueue {
            enqueuer,
            seq,
            body: format!("{enqueuer}:{seq}").into_bytes(),
        }
    }

    /// A checkout of incarnation 1 (see `up`).
    fn checkout(node: &str, credit: u32) -> QueueCommand {
        QueueCommand::Checkout {
            node: node.into(),
            incarnation: 1,
            credit,
        }
    }

    fn up(node: &str, incarnation: u64) -> QueueCommand {
        QueueCommand::NodeUp {
            node: node.into(),
            incarnation,
        }
    }

    /// Applies commands with consecutive indexes from `next`, returning what
    /// was assigned.
    fn run(m: &mut QueueMachine, next: &mut Index, cmds: Vec<QueueCommand>) -> Vec<Assigned> {
        let mut out = Vec::new();
        for c in cmds {
            *next += 1;
            m.apply(*next, c, &mut out);
        }
        out
    }

    #[test]
    fn enqueues_are_deduplicated_per_enqueuer() {
        let mut m = QueueMachine::new();
        let mut out = Vec::new();
        assert_eq!(
            m.apply(1, enqueue(7, 1), &mut out),
            QueueApplied::Enqueued {
                index: 1,
                duplicate: false
            }
        );
        // Resent after a leader change: same numbers, no second copy.
        assert_eq!(
            m.apply(2, enqueue(7, 1), &mut out),
            QueueApplied::Enqueued {
                index: 1,
                duplicate: true
            }
        );
        m.apply(3, enqueue(8, 1), &mut out);
        assert_eq!(m.ready_count(), 2);
    }

    #[test]
    fn credit_hands_messages_in_order_round_robin_between_nodes() {
        let mut m = QueueMachine::new();
        let mut i = 0;
        let got = run(
            &mut m,
            &mut i,
            vec![
                up("n1", 1),
                up("n2", 1),
                checkout("n1", 2),
                checkout("n2", 2),
                enqueue(1, 1),
                enqueue(1, 2),
                enqueue(1, 3),
                enqueue(1, 4),
                enqueue(1, 5),
            ],
        );
        let who: Vec<(&str, Index)> = got.iter().map(|a| (a.node.as_str(), a.index)).collect();
        assert_eq!(who, [("n1", 5), ("n2", 6), ("n1", 7), ("n2", 8)]);
        // No credit left: the fifth waits until a node asks for more.
        assert_eq!(m.ready_count(), 1);
        let got = run(&mut m, &mut i, vec![checkout("n2", 10)]);
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].node.as_str(), got[0].index), ("n2", 9));
    }

    #[test]
    fn returned_and_orphaned_messages_come_back_counted_and_in_order() {
        let mut m = QueueMachine::new();
        let mut i = 0;
        run(
            &mut m,
            &mut i,
            vec![
                up("n1", 1),
                up("n2", 1),
                enqueue(1, 1),
                enqueue(1, 2),
                enqueue(1, 3),
                checkout("n1", 3),
            ],
        );
        assert_eq!(m.checked_out_count(), 3);
        // n1 acks the first, returns the second; the third is orphaned when n1
        // restarts as a new incarnation.
        run(
            &mut m,
            &mut i,
            vec![
                QueueCommand::Settle {
                    node: "n1".into(),
                    indexes: vec![3],
                },
                QueueCommand::Return {
                    node: "n1".into(),
                    indexes: vec![4],
                },
            ],
        );
        let got = run(&mut m, &mut i, vec![up("n1", 2), checkout("n2", 5)]);
        let counts: Vec<(Index, u32)> = got.iter().map(|a| (a.index, a.delivery_count)).collect();
        // Index order kept; each was (maybe) delivered once before.
        assert_eq!(counts, [(4, 1), (5, 1)]);
        // The old incarnation's late checkout gives it nothing.
        run(&mut m, &mut i, vec![checkout("n1", 5), enqueue(1, 4)]);
        assert_eq!(m.ready_count(), 0, "n2 still has credit");
        assert!(m.checked_out_to("n1").is_empty());
        // A settle from the node that no longer holds them changes nothing.
        run(
            &mut m,
            &mut i,
            vec![QueueCommand::Settle {
                node: "n1".into(),
                indexes: vec![4, 5],
            }],
        );
        assert_eq!(m.checked_out_count(), 3);
        assert_eq!(m.checked_out_to("n2").len(), 3);
    }

    #[test]
    fn a_node_down_loses_its_credit_and_holdings() {
        let mut m = QueueMachine::new();
        let mut i = 0;
        run(
            &mut m,
            &mut i,
            vec![up("n1", 1), checkout("n1", 10), enqueue(1, 1)],
        );
        assert_eq!(m.checked_out_to("n1").len(), 1);
        let got = run(
            &mut m,
            &mut i,
            vec![
                QueueCommand::NodeDown { node: "n1".into() },
                enqueue(1, 2),
                // Late, from before it was found down.
                checkout("n1", 10),
            ],
        );
        assert!(got.is_empty(), "no credit anywhere: {got:?}");
        assert_eq!(m.ready_count(), 2);
        // The same incarnation announcing itself again changes nothing.
        let mut m2 = QueueMachine::new();
        let mut j = 0;
        run(
            &mut m2,
            &mut j,
            vec![up("n1", 1), checkout("n1", 1), enqueue(1, 1), up("n1", 1)],
        );
        assert_eq!(m2.checked_out_count(), 1);
    }

    #[test]
    fn a_node_marked_down_without_restarting_rejoins_under_the_next_incarnation() {
        let mut m = QueueMachine::new();
        let mut i = 0;
        run(
            &mut m,
            &mut i,
            vec![
                up("n1", 1),
                up("n2", 1),
                checkout("n1", 2),
                enqueue(1, 1),
                enqueue(1, 2),
            ],
        );
        assert!(m.worth_marking_down("n1"), "holds two");
        assert!(!m.worth_marking_down("n2"), "holds nothing, no credit");
        let held: Vec<Index> = m.checked_out_to("n1").iter().map(|a| a.index).collect();
        // The leader's failure detector: n1 is silent.
        run(
            &mut m,
            &mut i,
            vec![QueueCommand::NodeDown { node: "n1".into() }],
        );
        assert!(m.is_down("n1") && !m.worth_marking_down("n1"));
        // n2's consumers get them, redelivered.
        let got = run(&mut m, &mut i, vec![checkout("n2", 5)]);
        assert_eq!(got.iter().map(|a| a.index).collect::<Vec<_>>(), held);
        assert!(got.iter().all(|a| a.node == "n2" && a.delivery_count == 1));
        // n1 comes back (partition healed): its ack of what it had delivered is
        // ignored (n2 holds those now), its old incarnation's checkout too.
        run(
            &mut m,
            &mut i,
            vec![
                QueueCommand::Settle {
                    node: "n1".into(),
                    indexes: held.clone(),
                },
                checkout("n1", 5),
            ],
        );
        assert_eq!(m.checked_out_to("n2").len(), 2);
        assert_eq!(m.credit_of("n1"), 0);
        // It announces the next incarnation and takes messages again.
        let got = run(
            &mut m,
            &mut i,
            vec![
                up("n1", 2),
                QueueCommand::Checkout {
                    node: "n1".into(),
                    incarnation: 2,
                    credit: 1,
                },
                enqueue(1, 3),
            ],
        );
        assert!(!m.is_down("n1"));
        assert_eq!(got.len(), 1);
        assert!(["n1", "n2"].contains(&got[0].node.as_str()));
        assert_eq!(m.ready_count() + m.checked_out_count(), 3, "nothing lost");
    }

    #[test]
    fn withdraw_drops_credit_and_returns_undelivered_messages_uncounted() {
        let mut m = QueueMachine::new();
        let mut next = 1;
        run(&mut m, &mut next, vec![up("a", 1), up("b", 1)]);
        run(&mut m, &mut next, vec![enqueue(1, 1), enqueue(1, 2)]);
        let got = run(&mut m, &mut next, vec![checkout("a", 5)]);
        assert_eq!(got.len(), 2);
        let idx: Vec<Index> = got.iter().map(|a| a.index).collect();
        let back = run(
            &mut m,
            &mut next,
            vec![QueueCommand::Withdraw {
                node: "a".into(),
                indexes: idx.clone(),
            }],
        );
        assert!(back.is_empty(), "a has no credit left: {back:?}");
        assert_eq!(m.credit_of("a"), 0);
        assert_eq!(m.ready_count(), 2);
        let got = run(&mut m, &mut next, vec![checkout("b", 5)]);
        assert_eq!(got.iter().map(|a| a.index).collect::<Vec<_>>(), idx);
        assert!(got.iter().all(|a| a.node == "b" && a.delivery_count == 0));
    }

    #[test]
    fn purge_removes_ready_messages_only() {
        let mut m = QueueMachine::new();
        let mut i = 0;
        run(
            &mut m,
            &mut i,
            vec![
                up("n1", 1),
                checkout("n1", 1),
                enqueue(1, 1),
                enqueue(1, 2),
                enqueue(1, 3),
            ],
        );
        let mut out = Vec::new();
        assert_eq!(
            m.apply(10, QueueCommand::Purge, &mut out),
            QueueApplied::Purged(2)
        );
        assert_eq!(m.checked_out_count(), 1);
    }

    /// Random commands against a sequential model of the invariants: every
    /// enqueued (non-duplicate) message is exactly once ready, out or gone, and
    /// gone only by a settle, discard or purge; replicas that apply the same
    /// log agree.
    #[test]
    fn random_logs_keep_every_message_accounted_for_and_replicas_equal() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _round in 0..50 {
            let mut a = QueueMachine::new();
            let mut b = QueueMachine::new();
            let mut removed = 0usize;
            let mut enqueued = 0usize;
            let mut seqs = [0u64; 3];
            for index in 1..=300u64 {
                let node = format!("n{}", rnd(3) + 1);
                let pick = |m: &QueueMachine, r: u64| -> Vec<Index> {
                    m.out
                        .iter()
                        .filter(|(_, (n, _))| *n == node)
                        .map(|(i, _)| *i)
                        .take(r as usize)
                        .collect()
                };
                let cmd = match rnd(9) {
                    0..=2 => {
                        let e = rnd(3) as usize;
                        // Sometimes a resend of the last sequence.
                        if rnd(4) != 0 {
                            seqs[e] += 1;
                        }
                        QueueCommand::Enqueue {
                            enqueuer: e as u64,
                            seq: seqs[e].max(1),
                            body: vec![index as u8],
                        }
                    }
                    3 => QueueCommand::Checkout {
                        incarnation: rnd(2),
                        credit: rnd(4) as u32 + 1,
                        node: node.clone(),
                    },
                    4 => QueueCommand::Settle {
                        indexes: pick(&a, rnd(3) + 1),
                        node: node.clone(),
                    },
                    5 => QueueCommand::Return {
                        indexes: pick(&a, rnd(3) + 1),
                        node: node.clone(),
                    },
                    6 => QueueCommand::Discard {
                        indexes: pick(&a, 1),
                        node: node.clone(),
                    },
                    7 => QueueCommand::NodeUp {
                        incarnation: rnd(2),
                        node: node.clone(),
                    },
                    _ => QueueCommand::NodeDown { node: node.clone() },
                };
                let before = a.ready_count() + a.checked_out_count();
                let (mut x, mut y) = (Vec::new(), Vec::new());
                let ra = a.apply(index, cmd.clone(), &mut x);
                let rb = b.apply(index, cmd.clone(), &mut y);
                assert_eq!(ra, rb);
                assert_eq!(x, y);
                let after = a.ready_count() + a.checked_out_count();
                match (&cmd, &ra) {
                    (
                        _,
                        QueueApplied::Enqueued {
                            duplicate: false, ..
                        },
                    ) => {
                        enqueued += 1;
                        assert_eq!(after, before + 1);
                    }
                    (QueueCommand::Settle { .. } | QueueCommand::Discard { .. }, _) => {
                        removed += before - after;
                    }
                    _ => assert_eq!(after, before, "{cmd:?}"),
                }
                // Every assignment went to a node that had credit and is now out.
                for got in &x {
                    assert_eq!(a.out.get(&got.index).map(|(n, _)| n), Some(&got.node));
                }
                assert_eq!(enqueued, removed + after);
            }
            assert_eq!(a, b);
        }
    }
}
