//! What a session has to send, in order: the bytes its encoder wrote, and
//! large message bodies handed over as the shared [`Bytes`] they already are.
//!
//! Copying a 64 KiB body into the output buffer was 16% of the broker's time
//! when delivering 64 KiB messages. A body of at least [`SHARED_BODY_MIN`]
//! bytes is instead recorded with the position in the byte buffer it follows,
//! and the driver writes bytes and bodies together with one vectored write
//! (`writev`). Smaller bodies are copied: a copy of a few KiB costs less than
//! an extra `iovec` and the reference count.
//!
//! It derefs to the byte buffer, so encoders keep appending to it as to any
//! `BytesMut`; only a body goes through [`Sink::put_body`]. Pure data: no I/O.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::ops::{Deref, DerefMut};

use bytes::{Buf, Bytes, BytesMut};

/// Bodies at least this large are written from their shared buffer.
pub const SHARED_BODY_MIN: usize = 8 * 1024;

/// Where an encoder appends: its bytes, and a body it may pass on shared.
/// Implemented by a plain `BytesMut` (which copies the body) so that codecs
/// stay usable, and tested, without a driver.
pub trait Sink {
    /// The byte buffer that frames are written into.
    fn bytes(&mut self) -> &mut BytesMut;
    /// Appends `body` after the bytes written so far.
    fn put_body(&mut self, body: &Bytes);
    /// Whether `put_body` would share a body of `len` bytes rather than
    /// copy it (encoders reserve room only for what they copy).
    fn shares(&self, len: usize) -> bool;
}

impl Sink for BytesMut {
    fn bytes(&mut self) -> &mut BytesMut {
        self
    }
    fn put_body(&mut self, body: &Bytes) {
        self.extend_from_slice(body);
    }
    fn shares(&self, _len: usize) -> bool {
        false
    }
}

/// A session's output: bytes, with large bodies spliced in (see the module).
#[derive(Debug, Default)]
pub struct Output {
    bytes: BytesMut,
    /// Bodies to send after `bytes[..at]`, in order of `at` (equal `at`s in
    /// the order they were put).
    bodies: VecDeque<(usize, Bytes)>,
}

impl Deref for Output {
    type Target = BytesMut;
    fn deref(&self) -> &BytesMut {
        &self.bytes
    }
}

impl DerefMut for Output {
    fn deref_mut(&mut self) -> &mut BytesMut {
        &mut self.bytes
    }
}

impl Sink for Output {
    fn bytes(&mut self) -> &mut BytesMut {
        &mut self.bytes
    }
    fn put_body(&mut self, body: &Bytes) {
        if self.shares(body.len()) {
            self.bodies.push_back((self.bytes.len(), body.clone()));
        } else {
            self.bytes.extend_from_slice(body);
        }
    }
    fn shares(&self, len: usize) -> bool {
        len >= SHARED_BODY_MIN
    }
}

impl Output {
    /// Bytes waiting to be written, bodies included.
    pub fn pending(&self) -> usize {
        self.bodies
            .iter()
            .fold(self.bytes.len(), |n, (_, b)| n.saturating_add(b.len()))
    }

    /// Nothing waits to be written.
    pub fn is_drained(&self) -> bool {
        self.bytes.is_empty() && self.bodies.is_empty()
    }

    /// Whether bodies are spliced in (a write must be vectored).
    pub fn has_bodies(&self) -> bool {
        !self.bodies.is_empty()
    }

    /// Moves everything in `other` after what is here, leaving `other` empty.
    pub fn append(&mut self, other: &mut Output) {
        let base = self.bytes.len();
        for (at, body) in other.bodies.drain(..) {
            self.bodies.push_back((base.saturating_add(at), body));
        }
        self.bytes.extend_from_slice(&other.bytes);
        other.bytes.clear();
    }

    /// Copies the bodies into the byte buffer, in place: for a stream that
    /// cannot write vectored (one slice per call would mean a system call
    /// per body and frame).
    pub fn flatten(&mut self) {
        if self.bodies.is_empty() {
            return;
        }
        let mut flat = BytesMut::with_capacity(self.pending());
        let mut from = 0;
        for (at, body) in self.bodies.drain(..) {
            flat.extend_from_slice(self.bytes.get(from..at).unwrap_or_default());
            flat.extend_from_slice(&body);
            from = at;
        }
        flat.extend_from_slice(self.bytes.get(from..).unwrap_or_default());
        self.bytes = flat;
    }

    /// The slices to write, in order, at most `max` of them.
    pub fn slices(&self, max: usize) -> Vec<IoSlice<'_>> {
        let mut out = Vec::with_capacity(max.min(self.bodies.len().saturating_mul(2) + 1));
        let mut from = 0;
        for (at, body) in &self.bodies {
            if out.len() + 2 > max {
                return out;
            }
            if let Some(head) = self.bytes.get(from..*at).filter(|h| !h.is_empty()) {
                out.push(IoSlice::new(head));
            }
            out.push(IoSlice::new(body));
            from = *at;
        }
        if let Some(tail) = self.bytes.get(from..).filter(|t| !t.is_empty()) {
            if out.len() < max {
                out.push(IoSlice::new(tail));
            }
        }
        out
    }

    /// Drops the first `n` bytes written.
    pub fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let head = self.bodies.front().map_or(self.bytes.len(), |(at, _)| *at);
            if head > 0 {
                let take = n.min(head);
                self.bytes.advance(take);
                for (at, _) in &mut self.bodies {
                    *at = at.saturating_sub(take);
                }
                n -= take;
                continue;
            }
            let Some((_, body)) = self.bodies.front_mut() else {
                // More than was pending: cannot happen with a correct writer.
                self.bytes.clear();
                return;
            };
            let take = n.min(body.len());
            body.advance(take);
            n -= take;
            if body.is_empty() {
                self.bodies.pop_front();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(o: &Output) -> Vec<u8> {
        o.slices(usize::MAX)
            .iter()
            .flat_map(|s| s.to_vec())
            .collect()
    }

    fn output() -> (Output, Vec<u8>) {
        let big = Bytes::from(vec![b'B'; SHARED_BODY_MIN]);
        let mut o = Output::default();
        o.extend_from_slice(b"head1");
        o.put_body(&big);
        o.extend_from_slice(b"end1");
        o.put_body(&Bytes::from_static(b"small"));
        o.put_body(&big);
        o.put_body(&big);
        let mut want = b"head1".to_vec();
        want.extend_from_slice(&big);
        want.extend_from_slice(b"end1small");
        want.extend_from_slice(&big);
        want.extend_from_slice(&big);
        (o, want)
    }

    #[test]
    fn bodies_keep_their_place_and_large_ones_are_not_copied() {
        let (o, want) = output();
        assert_eq!(o.bodies.len(), 3);
        assert_eq!(o.len(), b"head1end1small".len());
        assert_eq!(o.pending(), want.len());
        assert_eq!(written(&o), want);
        let mut flat = output().0;
        flat.flatten();
        assert!(!flat.has_bodies());
        assert_eq!(&flat[..], &want[..]);
    }

    #[test]
    fn any_sequence_of_partial_writes_sends_everything_in_order() {
        for step in [1, 3, 4, 5, 1000, SHARED_BODY_MIN, SHARED_BODY_MIN + 7] {
            let (mut o, want) = output();
            let mut sent = Vec::new();
            while !o.is_drained() {
                let first: Vec<u8> = o.slices(2).iter().flat_map(|s| s.to_vec()).collect();
                let n = step.min(first.len());
                sent.extend_from_slice(&first[..n]);
                o.advance(n);
            }
            assert_eq!(sent, want, "step {step}");
        }
    }

    #[test]
    fn appending_shifts_the_bodies_after_what_waits() {
        let (mut a, mut want) = output();
        let (mut b, want_b) = output();
        a.append(&mut b);
        want.extend_from_slice(&want_b);
        assert!(b.is_drained());
        assert_eq!(written(&a), want);
    }
}
