//! The quorum queue's state machine: deterministic, no I/O, no clock. Every
//! replica applies the same commands in log order and reaches the same state;
//! anything time-based later (TTL, delivery limits by age) must take its time
//! from the command (the leader stamps it), never from the local clock.
//!
//! State: the unsettled messages ordered by their log index (the index of the
//! `Enqueue` entry is the message's id), each with its delivery count; the
//! deduplication table (per enqueuer, the highest sequence number applied and
//! the index it got); counters. The snapshot is this whole state (serde).

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A command of a quorum queue's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueCommand {
    /// A message from an enqueuer (a publishing channel, or any node-unique
    /// producer id), with its sequence number. A `seq` not above the highest
    /// already applied for this enqueuer is a duplicate and changes nothing.
    Enqueue {
        enqueuer: u64,
        seq: u64,
        /// The core's encoded message (opaque here).
        message: Bytes,
    },
    /// Acknowledged: the messages leave the queue.
    Settle { indexes: Vec<u64> },
    /// Requeued (nack/reject with requeue, consumer gone): the messages stay
    /// at their place (ordered by index) with `delivery_count + 1`.
    Return { indexes: Vec<u64> },
    /// Dropped or dead-lettered: the messages leave the queue (counted apart
    /// from settlements).
    Discard { indexes: Vec<u64> },
    /// Every message leaves the queue.
    Purge,
    /// The enqueuer is gone (its channel closed): its dedup entry is dropped,
    /// so the table does not grow forever.
    ForgetEnqueuer { enqueuer: u64 },
}

/// What applying a command did (every replica computes the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Outcome {
    /// A blank or membership entry.
    #[default]
    Noop,
    /// The message is in the queue at this entry's index.
    Enqueued,
    /// Not added: the enqueuer's highest applied sequence number is `last_seq`
    /// (>= the proposed one), enqueued at `at_index`.
    Duplicate {
        last_seq: u64,
        at_index: u64,
    },
    /// How many of the given indexes were in the queue and left it (or, for
    /// `Returned`, were requeued); unknown indexes are ignored.
    Settled {
        count: u64,
    },
    Returned {
        count: u64,
    },
    Discarded {
        count: u64,
    },
    Purged {
        count: u64,
    },
    Forgot,
}

/// A message in the queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    pub message: Bytes,
    pub delivery_count: u32,
}

/// A message as the leader's broker-side queue reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyMessage {
    pub index: u64,
    pub message: Bytes,
    pub delivery_count: u32,
}

/// Totals since the queue was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub enqueued: u64,
    pub duplicates: u64,
    pub settled: u64,
    pub returned: u64,
    pub discarded: u64,
    pub purged: u64,
}

/// Per enqueuer: the highest sequence number applied and its entry's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnqueuerState {
    pub last_seq: u64,
    pub at_index: u64,
}

/// The replicated state of one quorum queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    messages: BTreeMap<u64, Stored>,
    enqueuers: BTreeMap<u64, EnqueuerState>,
    bytes: u64,
    counters: Counters,
}

impl QueueState {
    /// Applies the command of the entry at `index` (indexes only grow).
    pub fn apply(&mut self, index: u64, cmd: &QueueCommand) -> Outcome {
        match cmd {
            QueueCommand::Enqueue {
                enqueuer,
                seq,
                message,
            } => {
                if let Some(e) = self.enqueuers.get(enqueuer) {
                    if *seq <= e.last_seq {
                        self.counters.duplicates += 1;
                        return Outcome::Duplicate {
                            last_seq: e.last_seq,
                            at_index: e.at_index,
                        };
                    }
                }
                self.enqueuers.insert(
                    *enqueuer,
                    EnqueuerState {
                        last_seq: *seq,
                        at_index: index,
                    },
                );
                self.bytes += message.len() as u64;
                self.messages.insert(
                    index,
                    Stored {
                        message: message.clone(),
                        delivery_count: 0,
                    },
                );
                self.counters.enqueued += 1;
                Outcome::Enqueued
            }
            QueueCommand::Settle { indexes } => {
                let count = self.remove(indexes);
                self.counters.settled += count;
                Outcome::Settled { count }
            }
            QueueCommand::Discard { indexes } => {
                let count = self.remove(indexes);
                self.counters.discarded += count;
                Outcome::Discarded { count }
            }
            QueueCommand::Return { indexes } => {
                let mut count = 0;
                for i in indexes {
                    if let Some(m) = self.messages.get_mut(i) {
                        m.delivery_count = m.delivery_count.saturating_add(1);
                        count += 1;
                    }
                }
                self.counters.returned += count;
                Outcome::Returned { count }
            }
            QueueCommand::Purge => {
                let count = self.messages.len() as u64;
                self.messages.clear();
                self.bytes = 0;
                self.counters.purged += count;
                Outcome::Purged { count }
            }
            QueueCommand::ForgetEnqueuer { enqueuer } => {
                self.enqueuers.remove(enqueuer);
                Outcome::Forgot
            }
        }
    }

    fn remove(&mut self, indexes: &[u64]) -> u64 {
        let mut count = 0;
        for i in indexes {
            if let Some(m) = self.messages.remove(i) {
                self.bytes -= m.message.len() as u64;
                count += 1;
            }
        }
        count
    }

    /// The messages in the queue, in index order.
    pub fn ready(&self) -> impl Iterator<Item = ReadyMessage> + '_ {
        self.messages.iter().map(|(i, m)| ReadyMessage {
            index: *i,
            message: m.message.clone(),
            delivery_count: m.delivery_count,
        })
    }

    pub fn get(&self, index: u64) -> Option<&Stored> {
        self.messages.get(&index)
    }

    /// How many messages are in the queue.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// The message bytes in the queue.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The lowest index still needed (the oldest message), if any.
    pub fn first_index(&self) -> Option<u64> {
        self.messages.keys().next().copied()
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    pub fn enqueuer(&self, enqueuer: u64) -> Option<EnqueuerState> {
        self.enqueuers.get(&enqueuer).copied()
    }

    pub fn enqueuers(&self) -> usize {
        self.enqueuers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny deterministic PRNG (xorshift64*), so the test needs no crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// The sequential model: a plain list scanned linearly.
    #[derive(Default)]
    struct Model {
        /// (index, body, delivery_count), in index order.
        msgs: Vec<(u64, Vec<u8>, u32)>,
        last_seq: BTreeMap<u64, (u64, u64)>,
    }

    impl Model {
        fn apply(&mut self, index: u64, cmd: &QueueCommand) -> Outcome {
            match cmd {
                QueueCommand::Enqueue {
                    enqueuer,
                    seq,
                    message,
                } => match self.last_seq.get(enqueuer) {
                    Some(&(s, at)) if *seq <= s => Outcome::Duplicate {
                        last_seq: s,
                        at_index: at,
                    },
                    _ => {
                        self.last_seq.insert(*enqueuer, (*seq, index));
                        self.msgs.push((index, message.to_vec(), 0));
                        Outcome::Enqueued
                    }
                },
                QueueCommand::Settle { indexes } | QueueCommand::Discard { indexes } => {
                    let before = self.msgs.len();
                    self.msgs.retain(|m| !indexes.contains(&m.0));
                    let count = (before - self.msgs.len()) as u64;
                    if matches!(cmd, QueueCommand::Settle { .. }) {
                        Outcome::Settled { count }
                    } else {
                        Outcome::Discarded { count }
                    }
                }
                QueueCommand::Return { indexes } => {
                    let mut count = 0;
                    for i in indexes {
                        if let Some(m) = self.msgs.iter_mut().find(|m| m.0 == *i) {
                            m.2 += 1;
                            count += 1;
                        }
                    }
                    Outcome::Returned { count }
                }
                QueueCommand::Purge => {
                    let count = self.msgs.len() as u64;
                    self.msgs.clear();
                    Outcome::Purged { count }
                }
                QueueCommand::ForgetEnqueuer { enqueuer } => {
                    self.last_seq.remove(enqueuer);
                    Outcome::Forgot
                }
            }
        }
    }

    fn random_command(rng: &mut Rng, model: &Model, seqs: &mut [u64; 4]) -> QueueCommand {
        let pick = |rng: &mut Rng| -> Vec<u64> {
            let mut out = Vec::new();
            for _ in 0..=rng.below(3) {
                if model.msgs.is_empty() || rng.below(8) == 0 {
                    out.push(rng.below(1000)); // maybe unknown
                } else {
                    out.push(model.msgs[rng.below(model.msgs.len() as u64) as usize].0);
                }
            }
            out
        };
        match rng.below(100) {
            0..=49 => {
                let e = rng.below(4) as usize;
                // Mostly the next seq; sometimes a resend of an old one, or a gap.
                let seq = match rng.below(10) {
                    0 => seqs[e].saturating_sub(rng.below(3)),
                    1 => seqs[e] + 2,
                    _ => seqs[e] + 1,
                };
                seqs[e] = seqs[e].max(seq);
                QueueCommand::Enqueue {
                    enqueuer: e as u64,
                    seq,
                    message: Bytes::from(
                        rng.next().to_le_bytes()[..rng.below(8) as usize].to_vec(),
                    ),
                }
            }
            50..=69 => QueueCommand::Settle { indexes: pick(rng) },
            70..=84 => QueueCommand::Return { indexes: pick(rng) },
            85..=94 => QueueCommand::Discard { indexes: pick(rng) },
            95..=97 => QueueCommand::ForgetEnqueuer {
                enqueuer: rng.below(4),
            },
            _ => QueueCommand::Purge,
        }
    }

    fn same(state: &QueueState, model: &Model) {
        let got: Vec<(u64, Vec<u8>, u32)> = state
            .ready()
            .map(|m| (m.index, m.message.to_vec(), m.delivery_count))
            .collect();
        assert_eq!(got, model.msgs);
        let bytes: usize = model.msgs.iter().map(|m| m.1.len()).sum();
        assert_eq!(state.bytes(), bytes as u64);
        assert_eq!(state.len(), model.msgs.len());
    }

    #[test]
    fn matches_a_sequential_model_and_survives_snapshots() {
        for seed in 1..=40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut state = QueueState::default();
            let mut model = Model::default();
            let mut seqs = [0u64; 4];
            for index in 1..=400u64 {
                let cmd = random_command(&mut rng, &model, &mut seqs);
                let want = model.apply(index, &cmd);
                assert_eq!(
                    state.apply(index, &cmd),
                    want,
                    "seed {seed} index {index} {cmd:?}"
                );
                same(&state, &model);
                if index % 97 == 0 {
                    // The snapshot is the state itself: a round trip changes nothing.
                    let bytes = postcard::to_stdvec(&state).unwrap();
                    let back: QueueState = postcard::from_bytes(&bytes).unwrap();
                    assert_eq!(back, state);
                    state = back;
                }
            }
        }
    }

    #[test]
    fn a_resent_enqueue_is_a_duplicate_with_the_original_index() {
        let mut s = QueueState::default();
        let enq = |seq| QueueCommand::Enqueue {
            enqueuer: 7,
            seq,
            message: Bytes::from_static(b"m"),
        };
        assert_eq!(s.apply(1, &enq(1)), Outcome::Enqueued);
        assert_eq!(s.apply(2, &enq(2)), Outcome::Enqueued);
        assert_eq!(
            s.apply(3, &enq(2)),
            Outcome::Duplicate {
                last_seq: 2,
                at_index: 2
            }
        );
        assert_eq!(
            s.apply(4, &enq(1)),
            Outcome::Duplicate {
                last_seq: 2,
                at_index: 2
            }
        );
        assert_eq!(s.len(), 2);
        assert_eq!(s.counters().duplicates, 2);
        // Settled messages still count for dedup.
        s.apply(5, &QueueCommand::Settle { indexes: vec![2] });
        assert!(matches!(s.apply(6, &enq(2)), Outcome::Duplicate { .. }));
        // Returned ones keep their place and count deliveries.
        s.apply(7, &enq(3));
        s.apply(
            8,
            &QueueCommand::Return {
                indexes: vec![1, 1],
            },
        );
        let ready: Vec<(u64, u32)> = s.ready().map(|m| (m.index, m.delivery_count)).collect();
        assert_eq!(ready, vec![(1, 2), (7, 0)]);
        s.apply(9, &QueueCommand::ForgetEnqueuer { enqueuer: 7 });
        assert_eq!(s.enqueuers(), 0);
    }
}
