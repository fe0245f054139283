//! The ready list of one priority level: a FIFO in chunks.
//!
//! A `VecDeque` of millions of entries is one allocation that doubles when it
//! fills: a backlog of 2^21 + 1 entries holds room for 2^22, and while it grows
//! the old and the new allocation are both alive (with 48-byte entries, 100 MB
//! and 200 MB at once). Under a memory watermark that slack is what stops a
//! backlog early (issue 11: the deque was 201 MB of a 262 MB broker holding
//! 3 M paged-out messages). Here a long list is a sequence of chunks of
//! [`CHUNK`] entries each, so its slack is at most one chunk at either end and
//! growing never copies what is already queued. A short list (one chunk) grows
//! as a `VecDeque` does, from nothing, so an idle queue holds a few entries'
//! room, not a chunk.

use std::collections::VecDeque;

/// Entries per chunk once a list needs more than one (24 KiB of 48-byte entries:
/// below glibc's mmap threshold, and a few hundred ns of copying per insert).
pub(super) const CHUNK: usize = 512;

/// A FIFO with `push_front` (returned messages), ordered insertion and
/// iteration, as the ready list needs.
#[derive(Debug)]
pub(super) struct Fifo<T> {
    /// Never holds an empty chunk unless it is the only one (and small).
    chunks: VecDeque<VecDeque<T>>,
}

impl<T> Default for Fifo<T> {
    fn default() -> Self {
        Fifo {
            chunks: VecDeque::new(),
        }
    }
}

impl<T> Fifo<T> {
    pub(super) fn from_one(value: T) -> Self {
        let mut fifo = Fifo::default();
        fifo.push_back(value);
        fifo
    }

    pub(super) fn front(&self) -> Option<&T> {
        self.chunks.front().and_then(VecDeque::front)
    }

    pub(super) fn push_back(&mut self, value: T) {
        match self.chunks.back_mut() {
            Some(chunk) if chunk.len() < CHUNK => chunk.push_back(value),
            _ => {
                let mut chunk = VecDeque::with_capacity(self.new_chunk_capacity());
                chunk.push_back(value);
                self.chunks.push_back(chunk);
            }
        }
    }

    pub(super) fn push_front(&mut self, value: T) {
        match self.chunks.front_mut() {
            Some(chunk) if chunk.len() < CHUNK => chunk.push_front(value),
            _ => {
                let mut chunk = VecDeque::with_capacity(self.new_chunk_capacity());
                chunk.push_front(value);
                self.chunks.push_front(chunk);
            }
        }
    }

    /// The first chunk grows on demand (a queue that never holds more than a
    /// few messages keeps a few entries' room); further ones are full-size.
    fn new_chunk_capacity(&self) -> usize {
        if self.chunks.is_empty() {
            0
        } else {
            CHUNK
        }
    }

    pub(super) fn pop_front(&mut self) -> Option<T> {
        let more = self.chunks.len() > 1;
        let chunk = self.chunks.front_mut()?;
        let value = chunk.pop_front()?;
        // An emptied chunk goes, unless it is the last and small: a queue
        // that hovers around empty keeps its few slots, a drained backlog
        // gives its memory back.
        if chunk.is_empty() && (more || chunk.capacity() >= CHUNK) {
            self.chunks.pop_front();
        }
        Some(value)
    }

    /// Inserts `value` before the first entry whose key is greater than its
    /// own, the entries being in key order (a returned message goes back to its
    /// place among the ready ones by id). A full chunk takes it anyway and
    /// grows: returns are few (at most the unacknowledged messages) and this
    /// keeps one insert one `VecDeque::insert`.
    pub(super) fn insert_by_key<K: Ord>(&mut self, value: T, key: impl Fn(&T) -> K) {
        let k = key(&value);
        // The first chunk whose last entry is after `value`: it belongs there.
        let at = self
            .chunks
            .partition_point(|c| c.back().is_none_or(|last| key(last) <= k));
        match self.chunks.get_mut(at) {
            Some(chunk) => {
                let pos = chunk.partition_point(|e| key(e) <= k);
                chunk.insert(pos, value);
            }
            None => self.push_back(value),
        }
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.chunks.iter_mut().flatten()
    }

    /// Takes every entry, in order, leaving the list empty (and unallocated).
    pub(super) fn take_all(&mut self) -> impl Iterator<Item = T> {
        std::mem::take(&mut self.chunks).into_iter().flatten()
    }
}

impl<'a, T> IntoIterator for &'a Fifo<T> {
    type Item = &'a T;
    type IntoIter = std::iter::Flatten<std::collections::vec_deque::Iter<'a, VecDeque<T>>>;

    fn into_iter(self) -> Self::IntoIter {
        self.chunks.iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        PushBack,
        PushFront,
        Pop,
        /// Inserts a key just before the entry at this index (modulo the length).
        Insert(usize),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        let op = prop_oneof![
            4 => Just(Op::PushBack),
            1 => Just(Op::PushFront),
            3 => Just(Op::Pop),
            1 => any::<usize>().prop_map(Op::Insert),
        ];
        proptest::collection::vec(op, 0..3_000)
    }

    proptest! {
        /// Whatever the operations, the list holds what a `VecDeque` would, in
        /// the same order, and never an empty chunk beside others.
        #[test]
        fn behaves_as_a_vecdeque(ops in ops()) {
            let mut fifo = Fifo::default();
            let mut model = VecDeque::new();
            // Keys kept sorted: back pushes count up, front pushes count down,
            // in steps wide enough for inserts to take keys between them.
            const STEP: i64 = 1 << 30;
            let (mut back, mut front) = (0i64, 0i64);
            for op in ops {
                match op {
                    Op::PushBack => {
                        back += STEP;
                        fifo.push_back(back);
                        model.push_back(back);
                    }
                    Op::PushFront => {
                        front -= STEP;
                        fifo.push_front(front);
                        model.push_front(front);
                    }
                    Op::Pop => prop_assert_eq!(fifo.pop_front(), model.pop_front()),
                    Op::Insert(i) if !model.is_empty() => {
                        let pos = i % model.len();
                        let after = if pos == 0 { front - STEP } else { model[pos - 1] };
                        let k = after + (model[pos] - after) / 2;
                        if k != after {
                            fifo.insert_by_key(k, |e| *e);
                            model.insert(pos, k);
                        }
                    }
                    Op::Insert(_) => {}
                }
                prop_assert_eq!(fifo.front(), model.front());
                prop_assert!(fifo.chunks.len() <= 1 || fifo.chunks.iter().all(|c| !c.is_empty()));
                prop_assert!(fifo.chunks.iter().all(|c| c.len() <= 2 * CHUNK));
            }
            prop_assert!(fifo.into_iter().eq(model.iter()));
            let all: Vec<_> = fifo.take_all().collect();
            prop_assert_eq!(all, Vec::from(model));
            prop_assert!(fifo.front().is_none() && fifo.chunks.is_empty());
        }
    }

    #[test]
    fn a_long_list_has_at_most_a_chunk_of_slack_and_a_short_one_no_chunk() {
        let mut fifo = Fifo::default();
        fifo.push_back(1u64);
        assert!(
            fifo.chunks[0].capacity() < CHUNK,
            "a short list grows on demand"
        );
        let n = 10 * CHUNK + 1;
        for i in 1..n {
            fifo.push_back(i as u64);
        }
        let room: usize = fifo.chunks.iter().map(VecDeque::capacity).sum();
        assert!(room < n + 2 * CHUNK, "{room} slots for {n} entries");
        assert_eq!(fifo.chunks.len(), 11);
        while fifo.pop_front().is_some() {}
        assert!(fifo.chunks.is_empty(), "a drained backlog holds no chunk");
    }
}
