//! Streams: what the core asks of a stream's log, as a trait (crates/store
//! implements it on files), and the pure rules every protocol shares: offset
//! specifications, RabbitMQ's `x-max-age` grammar, the Bloom filter of a chunk.
//!
//! A stream is an append-only log of entries with contiguous offsets from 0,
//! grouped in chunks (one chunk per write batch of the log's writer). Nothing
//! here touches a file or reads a clock: times come in as arguments.

use std::io;

use bytes::Bytes;
use tokio::sync::watch;

/// The consumer argument / header naming where to start reading.
pub const OFFSET_ARG: &str = "x-stream-offset";
/// The message header carrying a message's filter value.
pub const FILTER_VALUE_HEADER: &str = "x-stream-filter-value";
/// The consumer argument listing the filter values wanted.
pub const FILTER_ARG: &str = "x-stream-filter";
/// The consumer argument asking for messages without a filter value too.
pub const MATCH_UNFILTERED_ARG: &str = "x-stream-match-unfiltered";

/// Default segment size, as RabbitMQ (`x-stream-max-segment-size-bytes`).
pub const DEFAULT_SEGMENT_BYTES: u64 = 500_000_000;
/// The largest segment size RabbitMQ accepts.
pub const MAX_SEGMENT_BYTES: u64 = 3_000_000_000;
/// Default Bloom filter size per chunk, in bytes (`x-stream-filter-size-bytes`).
pub const DEFAULT_FILTER_BYTES: u8 = 16;

/// How a stream's entries are encoded. Every chunk holds entries of one
/// format, recorded in its header (the first reserved byte after the Bloom
/// size, 0 in chunks written before formats existed, which were all
/// [`EntryFormat::Core`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EntryFormat {
    /// postcard of the core's `Message` (AMQP 0-9-1, STOMP, MQTT publishes).
    #[default]
    Core,
    /// An AMQP 1.0 message exactly as a Stream client sent it: such a chunk's
    /// data section is what a Stream subscriber receives, byte for byte.
    Amqp10,
}

impl EntryFormat {
    pub fn byte(self) -> u8 {
        match self {
            EntryFormat::Core => 0,
            EntryFormat::Amqp10 => 1,
        }
    }

    pub fn from_byte(b: u8) -> Option<EntryFormat> {
        match b {
            0 => Some(EntryFormat::Core),
            1 => Some(EntryFormat::Amqp10),
            _ => None,
        }
    }
}

/// One entry to append: its bytes in `format`, and the filter value that goes
/// into the chunk's Bloom filter (`None`: unfiltered). The filter values of
/// [`EntryFormat::Amqp10`] entries are also kept in the chunk's trailer (the
/// bytes hold no place for them) for the exact per-message check.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEntry {
    pub filter: Option<String>,
    pub data: Bytes,
    pub format: EntryFormat,
}

/// Where a consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    /// The first entry still kept.
    First,
    /// The start of the last chunk written.
    Last,
    /// The next entry written after attaching.
    Next,
    /// This offset (clamped into what is kept).
    Offset(u64),
    /// The first chunk written at or after this time (ms since the epoch).
    Timestamp(i64),
}

/// Retention limits; whole segments go, the newest always stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    pub max_age_ms: Option<u64>,
    pub max_bytes: Option<u64>,
}

/// How a stream's log is laid out, fixed when it is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamConfig {
    pub segment_bytes: u64,
    pub filter_bytes: u8,
    pub retention: Retention,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            filter_bytes: DEFAULT_FILTER_BYTES,
            retention: Retention::default(),
        }
    }
}

/// What a stream holds right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamBounds {
    /// The first offset kept.
    pub first: u64,
    /// The offset the next entry will get (committed entries are `first..next`).
    pub next: u64,
    /// The first offset of the last committed chunk (`next` when empty).
    pub last_chunk: u64,
    /// Bytes on disk.
    pub bytes: u64,
    pub segments: usize,
}

/// One committed chunk as read back. `raw` is the whole chunk as stored
/// (osiris layout: 48-byte header, Bloom filter, data); the header fields are
/// decoded for convenience.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// The offset of its first entry (osiris' chunk id).
    pub id: u64,
    pub timestamp: i64,
    pub records: u32,
    /// The format of all its entries.
    pub format: EntryFormat,
    /// The CRC-32 (IEEE) of the data section, from the header.
    pub crc: u32,
    /// Header, Bloom filter and data as stored (no trailer).
    pub raw: Bytes,
    /// Where the data section starts within `raw`.
    pub data_start: usize,
    pub bloom: Bloom,
    /// The trailer: per entry a u16 length (`0xffff`: no filter value) and the
    /// filter value's bytes; empty when no entry had one or the chunk is
    /// [`EntryFormat::Core`] (its filter values are in the messages).
    pub trailer: Bytes,
}

impl Chunk {
    /// The offset after its last entry.
    pub fn next(&self) -> u64 {
        self.id.saturating_add(u64::from(self.records))
    }

    /// The data section (simple entries: u32 size with the top bit clear, then
    /// the bytes).
    pub fn data(&self) -> &[u8] {
        self.raw.get(self.data_start..).unwrap_or_default()
    }

    /// The entries with their offsets, as zero-copy slices of the chunk.
    pub fn entries(&self) -> Vec<(u64, Bytes)> {
        let mut out = Vec::with_capacity(usize::try_from(self.records).unwrap_or(0));
        let mut at = self.data_start;
        let mut offset = self.id;
        while let Some(len) = self
            .raw
            .get(at..at.saturating_add(4))
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_be_bytes)
        {
            let len = usize::try_from(len & 0x7fff_ffff).unwrap_or(usize::MAX);
            let start = at.saturating_add(4);
            let Some(end) = start.checked_add(len).filter(|e| *e <= self.raw.len()) else {
                break;
            };
            out.push((offset, self.raw.slice(start..end)));
            offset = offset.saturating_add(1);
            at = end;
        }
        out
    }

    /// The filter value of each entry, in order, from the trailer (empty
    /// when the chunk has none).
    pub fn trailer_filters(&self) -> Vec<Option<&str>> {
        let mut out = Vec::new();
        let t = self.trailer.as_ref();
        let mut at = 0;
        while let Some(len) = t
            .get(at..at + 2)
            .and_then(|b| <[u8; 2]>::try_from(b).ok())
            .map(u16::from_be_bytes)
        {
            at += 2;
            if len == u16::MAX {
                out.push(None);
                continue;
            }
            let end = at + usize::from(len);
            out.push(t.get(at..end).and_then(|b| std::str::from_utf8(b).ok()));
            at = end;
        }
        out
    }

    /// Whether a consumer with this filter may find something in the chunk.
    pub fn may_match(&self, filter: &Filter) -> bool {
        filter.may_match(&self.bloom)
    }
}

/// A consumer's filter: the values it wants, and whether it also wants
/// entries without one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Filter {
    pub values: Vec<String>,
    pub match_unfiltered: bool,
}

impl Filter {
    /// No filter at all: everything matches.
    pub fn is_none(&self) -> bool {
        self.values.is_empty()
    }

    /// The exact check on one entry's filter value.
    pub fn matches(&self, value: Option<&str>) -> bool {
        if self.values.is_empty() {
            return true;
        }
        match value {
            Some(v) => self.values.iter().any(|w| w == v),
            None => self.match_unfiltered,
        }
    }

    /// The chunk-level check: false only when no entry of the chunk can match.
    pub fn may_match(&self, bloom: &Bloom) -> bool {
        if self.values.is_empty() {
            return true;
        }
        if bloom.is_empty() {
            // No entry of the chunk had a filter value.
            return self.match_unfiltered;
        }
        (self.match_unfiltered && bloom.may_contain(UNFILTERED_MARK))
            || self.values.iter().any(|v| bloom.may_contain(v))
    }
}

/// What an entry without a filter value adds to a chunk's Bloom filter, so
/// `match-unfiltered` consumers can skip chunks of filtered entries only.
/// No filter value can be empty (the adapters refuse one), so this never
/// collides with a real value.
pub const UNFILTERED_MARK: &str = "";

/// A chunk's Bloom filter: `bytes * 8` bits, two hash functions (CRC-32 with
/// two seeds: stable across builds, which matters since it is stored).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Bloom {
    bits: Vec<u8>,
}

impl Bloom {
    pub fn new(bytes: u8) -> Self {
        Bloom {
            bits: vec![0; usize::from(bytes)],
        }
    }

    pub fn from_bytes(bits: &[u8]) -> Self {
        Bloom {
            bits: bits.to_vec(),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    pub fn is_empty(&self) -> bool {
        self.bits.is_empty()
    }

    fn positions(&self, value: &str) -> [usize; 2] {
        let nbits = self.bits.len().saturating_mul(8).max(1);
        let mut a = crc32fast::Hasher::new_with_initial(0x5157_4152);
        a.update(value.as_bytes());
        let mut b = crc32fast::Hasher::new_with_initial(0x9e37_79b9);
        b.update(value.as_bytes());
        [
            usize::try_from(a.finalize()).unwrap_or(0) % nbits,
            usize::try_from(b.finalize()).unwrap_or(0) % nbits,
        ]
    }

    pub fn insert(&mut self, value: &str) {
        for p in self.positions(value) {
            if let Some(byte) = self.bits.get_mut(p / 8) {
                *byte |= 1 << (p % 8);
            }
        }
    }

    pub fn may_contain(&self, value: &str) -> bool {
        self.positions(value).iter().all(|p| {
            self.bits
                .get(p / 8)
                .is_some_and(|b| b & (1 << (p % 8)) != 0)
        })
    }
}

/// A stream's log. Appends return at once; an entry is durable (and visible
/// to readers) once [`StreamLog::committed`] has passed its offset.
pub trait StreamLog: Send + Sync + std::fmt::Debug {
    /// Appends entries with consecutive offsets; returns the offset of the
    /// first. `now_ms` becomes the timestamp of the chunk they end up in.
    fn append(&self, entries: Vec<StreamEntry>, now_ms: u64) -> io::Result<u64>;
    /// The offset after the last durable entry (everything below is on disk).
    fn committed(&self) -> watch::Receiver<u64>;
    fn bounds(&self) -> StreamBounds;
    /// Where a consumer with this spec starts.
    fn resolve(&self, spec: OffsetSpec) -> u64;
    /// The committed chunk holding `offset`, or the first one after it when
    /// `offset` was removed by retention; `None` when nothing is committed at
    /// or after `offset` yet.
    fn read_chunk(&self, offset: u64) -> io::Result<Option<Chunk>>;
    /// Changes the retention limits (a policy changed) and applies them.
    fn set_retention(&self, retention: Retention, now_ms: u64);
    /// The retention limits in force.
    fn retention(&self) -> Retention;
    /// Deletes the segments retention no longer keeps; returns how many.
    fn enforce_retention(&self, now_ms: u64) -> usize;
    /// Deletes the stream's files (the stream was deleted).
    fn destroy(&self);
    /// Adds a callback the writer runs after each commit (on its thread: keep
    /// it short and never block on the log from it).
    fn on_commit(&self, callback: Box<dyn Fn() + Send + Sync>);
}

/// RabbitMQ's `x-max-age` grammar (`rabbit_amqqueue:check_max_age/1`):
/// a positive integer and one unit of `Y` (365 days), `M` (30 days), `D`,
/// `h`, `m`, `s`. Returns milliseconds.
pub fn parse_max_age(s: &str) -> Option<u64> {
    let unit = s.chars().last()?;
    let digits = s.get(..s.len().saturating_sub(unit.len_utf8()))?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok().filter(|n| *n > 0)?;
    let secs: u64 = match unit {
        'Y' => 365 * 86_400,
        'M' => 30 * 86_400,
        'D' => 86_400,
        'h' => 3_600,
        'm' => 60,
        's' => 1,
        _ => return None,
    };
    n.checked_mul(secs)?.checked_mul(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_age_grammar_is_rabbitmqs() {
        assert_eq!(parse_max_age("10s"), Some(10_000));
        assert_eq!(parse_max_age("1h"), Some(3_600_000));
        assert_eq!(parse_max_age("7D"), Some(7 * 86_400_000));
        assert_eq!(parse_max_age("2M"), Some(60 * 86_400_000));
        assert_eq!(parse_max_age("1Y"), Some(365 * 86_400_000));
        for bad in ["1A", "D", "0s", "-1s", "", "1.5h", "h1", "1H"] {
            assert_eq!(parse_max_age(bad), None, "{bad}");
        }
    }

    #[test]
    fn bloom_has_no_false_negatives_and_filters_others() {
        let mut b = Bloom::new(16);
        for v in ["red", "green", "blue"] {
            b.insert(v);
        }
        for v in ["red", "green", "blue"] {
            assert!(b.may_contain(v));
        }
        let misses = (0..1000)
            .filter(|i| !b.may_contain(&format!("other-{i}")))
            .count();
        assert!(misses > 900, "too many false positives: {}", 1000 - misses);
    }

    #[test]
    fn filter_rules() {
        let f = Filter {
            values: vec!["a".into()],
            match_unfiltered: false,
        };
        assert!(f.matches(Some("a")));
        assert!(!f.matches(Some("b")));
        assert!(!f.matches(None));
        let mut bloom = Bloom::new(16);
        bloom.insert("b");
        assert!(!f.may_match(&bloom));
        assert!(!f.may_match(&Bloom::default()));
        let g = Filter {
            values: vec!["a".into()],
            match_unfiltered: true,
        };
        assert!(g.matches(None));
        assert!(g.may_match(&Bloom::default()));
        assert!(!g.may_match(&bloom));
        bloom.insert(UNFILTERED_MARK);
        assert!(g.may_match(&bloom));
        assert!(Filter::default().matches(Some("x")));
    }
}
