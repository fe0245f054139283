//! Stream logs: one directory of segment files per stream, holding chunks in
//! osiris' layout so the Stream protocol can hand a chunk to a client as it
//! lies on disk.
//!
//! Grammar (`<data_dir>/streams/<queue id>/<first offset, 20 digits>.segment`):
//!
//! ```text
//! segment = *chunk
//! chunk   = header bloom data trailer
//! header  = %x50 type:u8(0) entries:u16 records:u32 timestamp:i64(ms) epoch:u64(1)
//!           id:u64 crc:u32 data-length:u32 trailer-length:u32 bloom-size:u8
//!           format:u8 2*%x00
//! bloom   = bloom-size*OCTET                           ; 0 when no entry had a filter value
//! data    = records*(size:u32 OCTETS)                  ; top bit of size clear: simple entry
//! trailer = records*(len:u16 OCTETS)                   ; filter values, see below
//! ```
//!
//! `format` ([`EntryFormat`]) says what every entry of the chunk is: 0, the
//! core's message model (postcard; chunks written before the byte existed have
//! 0 there too, so older streams read as before), or 1, an AMQP 1.0 message as
//! a Stream client published it. A format-1 chunk's data section is what a
//! Stream subscriber receives unchanged. Its trailer (only when an entry had a
//! filter value) holds each entry's filter value (`len` `0xffff`: none) for
//! the exact per-message check of AMQP 0-9-1 and STOMP consumers; format-0
//! entries carry theirs in their headers and have no trailer. The writer never
//! mixes formats in a chunk.
//!
//! All integers big-endian; `id` is the offset of the chunk's first entry, `crc`
//! the CRC-32 (IEEE) of `data`. A chunk is what one writer batch took: publishers
//! append entries to a pending buffer (taking their offsets there, so offsets are
//! contiguous), one writer thread per stream turns everything pending into one
//! chunk, writes it, calls `fdatasync` and then announces the new committed
//! offset; readers never see an entry before it is on disk.
//!
//! Index: sparse and in memory, rebuilt at open from the chunk headers (48 bytes
//! read per chunk, data skipped): the first chunk of a segment and then one chunk
//! per [`INDEX_EVERY`] bytes, each with its offset, timestamp and file position.
//! A lookup binary-searches the index and walks at most that many bytes of
//! headers.
//!
//! Retention: whole segments, oldest first, never the newest; by age (the newest
//! chunk of the segment is older than `max_age`) and by total size. Evaluated when
//! the writer rolls to a new segment and whenever [`StreamLog::enforce_retention`]
//! is called (the broker's timer), so `max-age` works even when nothing is written.
//!
//! Recovery: every chunk of the newest segment has its CRC checked (only it can
//! have a torn tail: older segments were synced before the roll); a chunk cut
//! short or failing its CRC truncates the segment there. Older segments are
//! checked for length only.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, RwLock};
use switchyard_core::stream::{
    Bloom, Chunk, EntryFormat, OffsetSpec, Retention, StreamBounds, StreamConfig, StreamEntry,
    StreamLog, UNFILTERED_MARK,
};
use tokio::sync::watch;

/// Size of a chunk header.
pub const HEADER: usize = 48;
/// Byte 0 of a header: osiris' magic (5) and version (0).
const MAGIC_VERSION: u8 = 0x50;
/// One index entry per this many bytes of segment, at least.
pub const INDEX_EVERY: u64 = 64 * 1024;

/// A decoded chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    records: u32,
    timestamp: i64,
    id: u64,
    crc: u32,
    data_len: u32,
    trailer_len: u32,
    bloom_len: u8,
    format: u8,
}

impl Header {
    fn total(&self) -> u64 {
        HEADER as u64
            + u64::from(self.bloom_len)
            + u64::from(self.data_len)
            + u64::from(self.trailer_len)
    }

    fn next(&self) -> u64 {
        self.id.saturating_add(u64::from(self.records))
    }

    fn parse(b: &[u8; HEADER]) -> Option<Header> {
        let u32_at = |at: usize| {
            b.get(at..at + 4)
                .and_then(|s| <[u8; 4]>::try_from(s).ok())
                .map(u32::from_be_bytes)
        };
        let u64_at = |at: usize| {
            b.get(at..at + 8)
                .and_then(|s| <[u8; 8]>::try_from(s).ok())
                .map(u64::from_be_bytes)
        };
        if b.first()? >> 4 != MAGIC_VERSION >> 4 {
            return None;
        }
        Some(Header {
            records: u32_at(4)?,
            timestamp: i64::from_be_bytes(u64_at(8)?.to_be_bytes()),
            id: u64_at(24)?,
            crc: u32_at(32)?,
            data_len: u32_at(36)?,
            trailer_len: u32_at(40)?,
            bloom_len: *b.get(44)?,
            format: *b.get(45)?,
        })
    }
}

/// Builds one chunk from a batch of entries, all of one format.
fn encode_chunk(id: u64, timestamp: i64, entries: &[StreamEntry], filter_bytes: u8) -> Vec<u8> {
    let format = entries.first().map_or(EntryFormat::Core, |e| e.format);
    let filtered = entries.iter().any(|e| e.filter.is_some());
    let mut bloom = Bloom::new(if filtered { filter_bytes } else { 0 });
    if filtered {
        for e in entries {
            bloom.insert(e.filter.as_deref().unwrap_or(UNFILTERED_MARK));
        }
    }
    let data_len: usize = entries.iter().map(|e| 4 + e.data.len()).sum();
    let mut trailer = Vec::new();
    if filtered && format == EntryFormat::Amqp10 {
        for e in entries {
            match e
                .filter
                .as_deref()
                .filter(|f| f.len() < usize::from(u16::MAX))
            {
                Some(f) => {
                    trailer.extend_from_slice(&u16::try_from(f.len()).unwrap_or(0).to_be_bytes());
                    trailer.extend_from_slice(f.as_bytes());
                }
                None => trailer.extend_from_slice(&u16::MAX.to_be_bytes()),
            }
        }
    }
    let mut out = Vec::with_capacity(HEADER + bloom.as_bytes().len() + data_len + trailer.len());
    out.push(MAGIC_VERSION);
    out.push(0); // chunk type: user data
    out.extend_from_slice(
        &u16::try_from(entries.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(
        &u32::try_from(entries.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(&timestamp.to_be_bytes());
    out.extend_from_slice(&1u64.to_be_bytes()); // epoch: one node, one leader term
    out.extend_from_slice(&id.to_be_bytes());
    let crc_at = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&u32::try_from(data_len).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&u32::try_from(trailer.len()).unwrap_or(0).to_be_bytes());
    out.push(u8::try_from(bloom.as_bytes().len()).unwrap_or(0));
    out.push(format.byte());
    out.extend_from_slice(&[0; 2]);
    out.extend_from_slice(bloom.as_bytes());
    let data_start = out.len();
    for e in entries {
        let len = u32::try_from(e.data.len()).unwrap_or(u32::MAX) & 0x7fff_ffff;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&e.data);
    }
    let crc = crc32fast::hash(out.get(data_start..).unwrap_or_default());
    out.extend_from_slice(&trailer);
    if let Some(slot) = out.get_mut(crc_at..crc_at + 4) {
        slot.copy_from_slice(&crc.to_be_bytes());
    }
    out
}

#[derive(Debug, Clone, Copy)]
struct IndexEntry {
    id: u64,
    timestamp: i64,
    pos: u64,
}

#[derive(Debug)]
struct Segment {
    /// Offset of its first chunk (its name).
    first: u64,
    file: Arc<File>,
    path: PathBuf,
    len: u64,
    /// Offset after its last entry.
    next: u64,
    /// Newest chunk timestamp in it.
    newest: i64,
    index: Vec<IndexEntry>,
    /// Position of the last indexed chunk.
    last_indexed: u64,
}

impl Segment {
    fn add_chunk(&mut self, h: &Header, pos: u64) {
        if self.index.is_empty() || pos.saturating_sub(self.last_indexed) >= INDEX_EVERY {
            self.index.push(IndexEntry {
                id: h.id,
                timestamp: h.timestamp,
                pos,
            });
            self.last_indexed = pos;
        }
        self.len = pos + h.total();
        self.next = h.next();
        self.newest = self.newest.max(h.timestamp);
    }

    fn read_header(&self, pos: u64) -> io::Result<Header> {
        let mut b = [0u8; HEADER];
        self.file.read_exact_at(&mut b, pos)?;
        Header::parse(&b).ok_or_else(|| bad("bad chunk header"))
    }

    /// Position and header of the chunk holding `offset`, or the first one after.
    fn find(&self, offset: u64) -> io::Result<Option<(u64, Header)>> {
        let i = self
            .index
            .partition_point(|e| e.id <= offset)
            .saturating_sub(1);
        let Some(mut pos) = self.index.get(i).map(|e| e.pos) else {
            return Ok(None);
        };
        while pos < self.len {
            let h = self.read_header(pos)?;
            if h.next() > offset {
                return Ok(Some((pos, h)));
            }
            pos += h.total();
        }
        Ok(None)
    }

    /// The first chunk written at or after `ts`.
    fn find_time(&self, ts: i64) -> io::Result<Option<Header>> {
        let i = self
            .index
            .partition_point(|e| e.timestamp < ts)
            .saturating_sub(1);
        let Some(mut pos) = self.index.get(i).map(|e| e.pos) else {
            return Ok(None);
        };
        while pos < self.len {
            let h = self.read_header(pos)?;
            if h.timestamp >= ts {
                return Ok(Some(h));
            }
            pos += h.total();
        }
        Ok(None)
    }
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// The committed view readers use.
#[derive(Debug, Default)]
struct Segments {
    list: Vec<Segment>,
    /// First offset of the last chunk.
    last_chunk: u64,
    /// Offset after the last committed entry.
    next: u64,
}

impl Segments {
    fn bounds(&self) -> StreamBounds {
        let first = self
            .list
            .first()
            .map_or(self.next, |s| s.first.min(self.next));
        StreamBounds {
            first,
            next: self.next,
            last_chunk: self.last_chunk,
            bytes: self.list.iter().map(|s| s.len).sum(),
            segments: self.list.len(),
        }
    }
}

#[derive(Debug, Default)]
struct Pending {
    entries: Vec<StreamEntry>,
    /// The offset the next appended entry gets.
    next: u64,
    timestamp: u64,
    shutdown: bool,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    config: Mutex<StreamConfig>,
    pending: Mutex<Pending>,
    wake: Condvar,
    committed: watch::Sender<u64>,
    segments: RwLock<Segments>,
    /// Run by the writer after each commit.
    callbacks: Callbacks,
}

/// Run by the writer after each commit.
struct Callbacks(RwLock<Vec<Box<dyn Fn() + Send + Sync>>>);

impl std::fmt::Debug for Callbacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("callbacks")
    }
}

/// A stream's log on disk.
#[derive(Debug)]
pub struct DiskStream {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.segment"))
}

fn open_segment_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
}

/// Reads a segment's chunk headers, checking CRCs if `verify`; truncates a
/// torn or corrupt tail.
fn recover_segment(dir: &Path, first: u64, verify: bool) -> io::Result<Segment> {
    let path = segment_path(dir, first);
    let file = open_segment_file(&path)?;
    let file_len = file.metadata()?.len();
    let mut seg = Segment {
        first,
        file: Arc::new(file),
        path,
        len: 0,
        next: first,
        newest: i64::MIN,
        index: Vec::new(),
        last_indexed: 0,
    };
    let mut pos = 0u64;
    while pos < file_len {
        let good = match seg.read_header(pos) {
            Ok(h) if pos + h.total() <= file_len && h.id == seg.next => {
                let ok = if verify {
                    let mut data = vec![0u8; usize::try_from(h.data_len).unwrap_or(0)];
                    seg.file
                        .read_exact_at(&mut data, pos + HEADER as u64 + u64::from(h.bloom_len))?;
                    crc32fast::hash(&data) == h.crc
                } else {
                    true
                };
                ok.then_some(h)
            }
            Ok(_) => None,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => None,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => None,
            Err(e) => return Err(e),
        };
        match good {
            Some(h) => {
                seg.add_chunk(&h, pos);
                pos += h.total();
            }
            None => {
                tracing::warn!(path = %seg.path.display(), offset = pos, "torn or corrupt stream chunk: truncating the segment there");
                seg.file.set_len(pos)?;
                seg.file.sync_all()?;
                break;
            }
        }
    }
    Ok(seg)
}

impl DiskStream {
    /// Opens (or creates) the stream in `dir`, recovering what is there.
    pub fn open(dir: &Path, config: StreamConfig) -> io::Result<Arc<DiskStream>> {
        fs::create_dir_all(dir)?;
        let mut firsts: Vec<u64> = Vec::new();
        for entry in fs::read_dir(dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name.strip_suffix(".segment") {
                if let Ok(n) = n.parse() {
                    firsts.push(n);
                }
            }
        }
        firsts.sort_unstable();
        let mut segments = Segments::default();
        let count = firsts.len();
        for (i, first) in firsts.into_iter().enumerate() {
            let seg = recover_segment(dir, first, i + 1 == count)?;
            if seg.len == 0 && i + 1 < count {
                // An empty older segment (a roll that wrote nothing): drop it.
                fs::remove_file(&seg.path)?;
                continue;
            }
            if let Some(last) = seg.index.last() {
                // The last chunk's id: walk from the last index entry.
                let mut pos = last.pos;
                while pos < seg.len {
                    let h = seg.read_header(pos)?;
                    segments.last_chunk = h.id;
                    pos += h.total();
                }
            }
            segments.next = seg.next;
            segments.list.push(seg);
        }
        if segments.list.is_empty() {
            segments.last_chunk = 0;
        }
        let next = segments.next;
        let (committed, _) = watch::channel(next);
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            config: Mutex::new(config),
            pending: Mutex::new(Pending {
                next,
                ..Pending::default()
            }),
            wake: Condvar::new(),
            committed,
            segments: RwLock::new(segments),
            callbacks: Callbacks(RwLock::new(Vec::new())),
        });
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("switchyard-stream-writer".into())
            .spawn(move || writer_loop(&writer_shared))?;
        Ok(Arc::new(DiskStream {
            shared,
            writer: Mutex::new(Some(writer)),
        }))
    }

    /// Writes what is pending and stops the writer (also done on drop).
    pub fn close(&self) {
        self.shared.pending.lock().shutdown = true;
        self.shared.wake.notify_one();
        if let Some(w) = self.writer.lock().take() {
            let _ = w.join();
        }
    }
}

impl Drop for DiskStream {
    fn drop(&mut self) {
        self.close();
    }
}

fn writer_loop(shared: &Shared) {
    let mut current: Option<Arc<File>> = None;
    loop {
        let (entries, first, timestamp, shutdown) = {
            let mut p = shared.pending.lock();
            while p.entries.is_empty() && !p.shutdown {
                shared.wake.wait(&mut p);
            }
            let entries = std::mem::take(&mut p.entries);
            let first = p.next - entries.len() as u64;
            (entries, first, p.timestamp, p.shutdown)
        };
        if entries.is_empty() {
            if shutdown {
                return;
            }
            continue;
        }
        // A chunk's entry count is a u16 in the header, and a chunk holds one
        // format: split larger batches and at every change of format.
        let mut id = first;
        for batch in entries
            .chunk_by(|a, b| a.format == b.format)
            .flat_map(|run| run.chunks(usize::from(u16::MAX)))
        {
            let config = *shared.config.lock();
            let ts = i64::try_from(timestamp).unwrap_or(i64::MAX);
            let bytes = encode_chunk(id, ts, batch, config.filter_bytes);
            let mut backoff = Duration::from_millis(10);
            loop {
                match write_chunk(shared, &mut current, &bytes, id, config) {
                    Ok(()) => break,
                    Err(e) => {
                        if shared.pending.lock().shutdown {
                            tracing::error!(error = %e, "cannot write a stream chunk while closing; giving up (nothing of it was confirmed)");
                            return;
                        }
                        tracing::error!(error = %e, "cannot write a stream chunk; retrying");
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                }
            }
            id += batch.len() as u64;
            shared.committed.send_replace(id);
            for callback in shared.callbacks.0.read().iter() {
                callback();
            }
        }
    }
}

/// Appends one chunk (rolling to a new segment first when it would overflow),
/// syncs it and makes it visible.
fn write_chunk(
    shared: &Shared,
    current: &mut Option<Arc<File>>,
    bytes: &[u8],
    id: u64,
    config: StreamConfig,
) -> io::Result<()> {
    let size = bytes.len() as u64;
    let (roll, pos) = {
        let segs = shared.segments.read();
        match segs.list.last() {
            Some(s) => (s.len > 0 && s.len + size > config.segment_bytes, s.len),
            None => (true, 0),
        }
    };
    let file = match (roll, current.as_ref()) {
        (false, Some(f)) => f.clone(),
        (false, None) => {
            let segs = shared.segments.read();
            let f = segs
                .list
                .last()
                .map(|s| s.file.clone())
                .ok_or_else(|| bad("no segment"))?;
            *current = Some(f.clone());
            f
        }
        (true, _) => {
            let path = segment_path(&shared.dir, id);
            let f = Arc::new(open_segment_file(&path)?);
            File::open(&shared.dir)?.sync_all()?;
            shared.segments.write().list.push(Segment {
                first: id,
                file: f.clone(),
                path,
                len: 0,
                next: id,
                newest: i64::MIN,
                index: Vec::new(),
                last_indexed: 0,
            });
            *current = Some(f.clone());
            f
        }
    };
    let pos = if roll { 0 } else { pos };
    let mut writer = file.as_ref();
    if let Err(e) = writer.write_all(bytes) {
        let _ = file.set_len(pos);
        return Err(e);
    }
    file.sync_data()?;
    let mut header = [0u8; HEADER];
    if let Some(h) = bytes.get(..HEADER) {
        header.copy_from_slice(h);
    }
    let h = Header::parse(&header).ok_or_else(|| bad("bad chunk header"))?;
    {
        let mut segs = shared.segments.write();
        if let Some(s) = segs.list.last_mut() {
            s.add_chunk(&h, pos);
        }
        segs.next = h.next();
        segs.last_chunk = h.id;
    }
    if roll {
        // The batch's time is the writer's "now": no clock is read here.
        retain(
            shared,
            config.retention,
            u64::try_from(h.timestamp).unwrap_or(0),
        );
    }
    Ok(())
}

/// Deletes the oldest segments beyond the retention limits, never the newest.
fn retain(shared: &Shared, retention: Retention, now_ms: u64) -> usize {
    let mut gone = Vec::new();
    {
        let mut segs = shared.segments.write();
        let mut total: u64 = segs.list.iter().map(|s| s.len).sum();
        while segs.list.len() > 1 {
            let Some(oldest) = segs.list.first() else {
                break;
            };
            let too_old = retention.max_age_ms.is_some_and(|age| {
                let newest = u64::try_from(oldest.newest).unwrap_or(0);
                newest.saturating_add(age) < now_ms
            });
            let too_big = retention.max_bytes.is_some_and(|max| total > max);
            if !(too_old || too_big) {
                break;
            }
            let seg = segs.list.remove(0);
            total = total.saturating_sub(seg.len);
            gone.push(seg.path);
        }
    }
    for path in &gone {
        // Readers holding the file open keep reading it; the name goes now.
        match fs::remove_file(path) {
            Ok(()) => tracing::debug!(path = %path.display(), "stream retention deleted a segment"),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete a stream segment")
            }
        }
    }
    gone.len()
}

impl StreamLog for DiskStream {
    fn append(&self, entries: Vec<StreamEntry>, now_ms: u64) -> io::Result<u64> {
        let mut p = self.shared.pending.lock();
        if p.shutdown {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the stream is closed",
            ));
        }
        let first = p.next;
        p.next += entries.len() as u64;
        p.timestamp = p.timestamp.max(now_ms);
        let wake = p.entries.is_empty();
        p.entries.extend(entries);
        drop(p);
        if wake {
            self.shared.wake.notify_one();
        }
        Ok(first)
    }

    fn committed(&self) -> watch::Receiver<u64> {
        self.shared.committed.subscribe()
    }

    fn bounds(&self) -> StreamBounds {
        self.shared.segments.read().bounds()
    }

    fn resolve(&self, spec: OffsetSpec) -> u64 {
        let segs = self.shared.segments.read();
        let b = segs.bounds();
        match spec {
            OffsetSpec::First => b.first,
            OffsetSpec::Last => b.last_chunk.max(b.first),
            OffsetSpec::Next => b.next,
            OffsetSpec::Offset(n) => n.clamp(b.first, b.next),
            OffsetSpec::Timestamp(ts) => segs
                .list
                .iter()
                .filter(|s| s.newest >= ts)
                .find_map(|s| s.find_time(ts).ok().flatten())
                .map_or(b.next, |h| h.id),
        }
    }

    fn read_chunk(&self, offset: u64) -> io::Result<Option<Chunk>> {
        let (file, pos, h) =
            {
                let segs = self.shared.segments.read();
                let offset = offset.max(segs.bounds().first);
                let i = segs
                    .list
                    .partition_point(|s| s.first <= offset)
                    .saturating_sub(1);
                let Some(found) =
                    segs.list.get(i..).unwrap_or_default().iter().find_map(|s| {
                        match s.find(offset) {
                            Ok(Some((pos, h))) => Some(Ok((s.file.clone(), pos, h))),
                            Ok(None) => None,
                            Err(e) => Some(Err(e)),
                        }
                    })
                else {
                    return Ok(None);
                };
                found?
            };
        // One read from the page cache into one buffer; entries are slices of it.
        let format = EntryFormat::from_byte(h.format).ok_or_else(|| bad("unknown entry format"))?;
        let with_trailer = format == EntryFormat::Amqp10 && h.trailer_len > 0;
        let len = usize::try_from(h.total()).map_err(|_| bad("chunk too large"))?;
        let data_end = len.saturating_sub(h.trailer_len as usize);
        let mut raw = vec![0u8; if with_trailer { len } else { data_end }];
        file.read_exact_at(&mut raw, pos)?;
        let data_start = HEADER + usize::from(h.bloom_len);
        let bloom = Bloom::from_bytes(raw.get(HEADER..data_start).unwrap_or_default());
        let mut raw = Bytes::from(raw);
        let trailer = if with_trailer {
            raw.split_off(data_end)
        } else {
            Bytes::new()
        };
        Ok(Some(Chunk {
            id: h.id,
            timestamp: h.timestamp,
            records: h.records,
            format,
            crc: h.crc,
            raw,
            data_start,
            bloom,
            trailer,
        }))
    }

    fn set_retention(&self, retention: Retention, now_ms: u64) {
        self.shared.config.lock().retention = retention;
        retain(&self.shared, retention, now_ms);
    }

    fn retention(&self) -> Retention {
        self.shared.config.lock().retention
    }

    fn enforce_retention(&self, now_ms: u64) -> usize {
        let retention = self.shared.config.lock().retention;
        retain(&self.shared, retention, now_ms)
    }

    fn on_commit(&self, callback: Box<dyn Fn() + Send + Sync>) {
        self.shared.callbacks.0.write().push(callback);
    }

    fn destroy(&self) {
        self.close();
        self.shared.segments.write().list.clear();
        if let Err(e) = fs::remove_dir_all(&self.shared.dir) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.shared.dir.display(), error = %e, "cannot delete a stream's files");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::stream::Filter;

    fn entry(s: &str) -> StreamEntry {
        StreamEntry {
            filter: None,
            data: Bytes::copy_from_slice(s.as_bytes()),
            format: EntryFormat::Core,
        }
    }

    fn config(segment_bytes: u64) -> StreamConfig {
        StreamConfig {
            segment_bytes,
            ..StreamConfig::default()
        }
    }

    /// Appends and waits until the writer committed it.
    fn put(s: &DiskStream, entries: Vec<StreamEntry>, now: u64) -> u64 {
        let n = entries.len() as u64;
        let first = s.append(entries, now).unwrap();
        let mut rx = s.committed();
        while *rx.borrow_and_update() < first + n {
            // The writer runs on its own thread: block on the watch.
            futures_block(&mut rx);
        }
        first
    }

    fn futures_block(rx: &mut watch::Receiver<u64>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(rx.changed()).unwrap();
    }

    fn all(s: &DiskStream, from: u64) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        let mut at = from;
        while let Some(c) = s.read_chunk(at).unwrap() {
            for (o, b) in c.entries() {
                if o >= at {
                    out.push((o, String::from_utf8(b.to_vec()).unwrap()));
                }
            }
            at = c.next();
        }
        out
    }

    #[test]
    fn offsets_are_contiguous_across_chunks_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = DiskStream::open(dir.path(), config(1 << 20)).unwrap();
            assert_eq!(put(&s, vec![entry("a"), entry("b")], 1_000), 0);
            assert_eq!(put(&s, vec![entry("c")], 2_000), 2);
            assert_eq!(
                all(&s, 0),
                vec![(0, "a".into()), (1, "b".into()), (2, "c".into())]
            );
            assert_eq!(all(&s, 1), vec![(1, "b".into()), (2, "c".into())]);
            let b = s.bounds();
            assert_eq!((b.first, b.next, b.last_chunk), (0, 3, 2));
        }
        let s = DiskStream::open(dir.path(), config(1 << 20)).unwrap();
        assert_eq!(put(&s, vec![entry("d")], 3_000), 3);
        assert_eq!(all(&s, 0).len(), 4);
        let c = s.read_chunk(0).unwrap().unwrap();
        assert_eq!((c.id, c.records, c.timestamp), (0, 2, 1_000));
        assert_eq!(crc32fast::hash(c.data()), {
            let mut b = [0u8; 4];
            b.copy_from_slice(&c.raw[32..36]);
            u32::from_be_bytes(b)
        });
    }

    #[test]
    fn offset_specs_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStream::open(dir.path(), config(200)).unwrap();
        assert_eq!(s.resolve(OffsetSpec::First), 0);
        assert_eq!(s.resolve(OffsetSpec::Next), 0);
        for t in 0..10u64 {
            put(&s, vec![entry("x"), entry("y")], 10_000 + t * 1_000);
        }
        assert!(s.bounds().segments > 1, "small segments roll");
        assert_eq!(s.resolve(OffsetSpec::First), 0);
        assert_eq!(s.resolve(OffsetSpec::Last), 18);
        assert_eq!(s.resolve(OffsetSpec::Next), 20);
        assert_eq!(s.resolve(OffsetSpec::Offset(7)), 7);
        assert_eq!(s.resolve(OffsetSpec::Offset(700)), 20);
        assert_eq!(s.resolve(OffsetSpec::Timestamp(13_000)), 6);
        assert_eq!(s.resolve(OffsetSpec::Timestamp(12_500)), 6);
        assert_eq!(s.resolve(OffsetSpec::Timestamp(0)), 0);
        assert_eq!(s.resolve(OffsetSpec::Timestamp(99_000)), 20);
        assert_eq!(all(&s, 7).first(), Some(&(7, "y".into())));
        assert_eq!(all(&s, 7).len(), 13);
    }

    #[test]
    fn sparse_index_finds_every_offset_in_big_segments() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStream::open(dir.path(), config(1 << 30)).unwrap();
        let body = "z".repeat(10_000);
        for _ in 0..40 {
            put(&s, vec![entry(&body), entry(&body)], 1);
        }
        {
            let segs = s.shared.segments.read();
            let idx = segs.list.first().unwrap().index.len();
            assert!(
                idx > 1 && idx < 40,
                "sparse: {idx} index entries for 40 chunks"
            );
        }
        for o in [0, 1, 33, 57, 79] {
            let c = s.read_chunk(o).unwrap().unwrap();
            assert!(c.id <= o && o < c.next(), "{o} in {}..{}", c.id, c.next());
        }
        assert!(s.read_chunk(80).unwrap().is_none());
    }

    #[test]
    fn retention_by_bytes_and_age_keeps_the_newest_segment() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStream::open(dir.path(), config(150)).unwrap();
        for t in 0..10u64 {
            put(&s, vec![entry(&"m".repeat(60))], t * 1_000);
        }
        let before = s.bounds();
        assert!(before.segments >= 5);
        s.set_retention(
            Retention {
                max_age_ms: None,
                max_bytes: Some(300),
            },
            10_000,
        );
        let after = s.bounds();
        assert!(after.bytes <= 300, "{after:?}");
        assert!(after.first > 0 && after.next == 10);
        assert_eq!(all(&s, 0).first().map(|e| e.0), Some(after.first));
        // Age: everything is older than 1 s at t=100 s, but one segment stays.
        s.set_retention(
            Retention {
                max_age_ms: Some(1_000),
                max_bytes: None,
            },
            100_000,
        );
        let b = s.bounds();
        assert_eq!(b.segments, 1);
        assert_eq!(b.next, 10);
        assert!(!all(&s, 0).is_empty());
        // New writes go on from there.
        assert_eq!(put(&s, vec![entry("n")], 100_000), 10);
        // Age with nothing written: the timer's call does it.
        for t in 0..5u64 {
            put(&s, vec![entry(&"m".repeat(60))], 200_000 + t);
        }
        assert!(s.bounds().segments > 1);
        assert_eq!(s.enforce_retention(200_010), 0, "not old yet");
        assert!(s.enforce_retention(900_000) > 0);
        assert_eq!(s.bounds().segments, 1);
    }

    #[test]
    fn a_torn_tail_is_truncated_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = DiskStream::open(dir.path(), config(1 << 20)).unwrap();
            put(&s, vec![entry("a")], 1);
            put(&s, vec![entry("b")], 2);
        }
        let path = segment_path(dir.path(), 0);
        let len = fs::metadata(&path).unwrap().len();
        // Corrupt the last byte of the second chunk's data.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_at(b"X", len - 1).unwrap();
        drop(f);
        let s = DiskStream::open(dir.path(), config(1 << 20)).unwrap();
        assert_eq!(all(&s, 0), vec![(0, "a".into())]);
        assert_eq!(put(&s, vec![entry("c")], 3), 1);
        assert_eq!(all(&s, 0), vec![(0, "a".into()), (1, "c".into())]);
    }

    #[test]
    fn bloom_lets_readers_skip_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStream::open(dir.path(), config(1 << 20)).unwrap();
        let f = |v: &str| StreamEntry {
            filter: Some(v.into()),
            data: Bytes::from_static(b"x"),
            format: EntryFormat::Core,
        };
        put(&s, vec![f("red"), f("red")], 1);
        put(&s, vec![f("blue")], 2);
        put(&s, vec![entry("plain")], 3);
        let red = Filter {
            values: vec!["red".into()],
            match_unfiltered: false,
        };
        let chunks: Vec<Chunk> = [0, 2, 3]
            .iter()
            .map(|o| s.read_chunk(*o).unwrap().unwrap())
            .collect();
        let hits: Vec<bool> = chunks.iter().map(|c| c.may_match(&red)).collect();
        assert_eq!(hits, [true, false, false]);
        let red_or_plain = Filter {
            match_unfiltered: true,
            ..red
        };
        let hits: Vec<bool> = chunks.iter().map(|c| c.may_match(&red_or_plain)).collect();
        assert_eq!(hits, [true, false, true]);
    }

    #[test]
    fn formats_never_share_a_chunk_and_amqp10_filters_go_to_the_trailer() {
        let dir = tempfile::tempdir().unwrap();
        let amqp = |d: &'static [u8], f: Option<&str>| StreamEntry {
            filter: f.map(str::to_owned),
            data: Bytes::from_static(d),
            format: EntryFormat::Amqp10,
        };
        {
            let s = DiskStream::open(dir.path(), config(1 << 20)).unwrap();
            // One append, two formats: three chunks.
            put(
                &s,
                vec![
                    amqp(b"a1", Some("red")),
                    amqp(b"a2", None),
                    entry("core"),
                    amqp(b"a3", None),
                ],
                1,
            );
        }
        let s = DiskStream::open(dir.path(), config(1 << 20)).unwrap();
        let c = s.read_chunk(0).unwrap().unwrap();
        assert_eq!((c.id, c.records, c.format), (0, 2, EntryFormat::Amqp10));
        assert_eq!(c.trailer_filters(), vec![Some("red"), None]);
        assert_eq!(c.crc, crc32fast::hash(c.data()));
        let entries: Vec<Bytes> = c.entries().into_iter().map(|(_, b)| b).collect();
        assert_eq!(
            entries,
            vec![Bytes::from_static(b"a1"), Bytes::from_static(b"a2")]
        );
        let c = s.read_chunk(2).unwrap().unwrap();
        assert_eq!((c.id, c.records, c.format), (2, 1, EntryFormat::Core));
        assert!(c.trailer.is_empty());
        let c = s.read_chunk(3).unwrap().unwrap();
        assert_eq!((c.id, c.format), (3, EntryFormat::Amqp10));
        assert!(
            c.trailer_filters().is_empty(),
            "no filter value, no trailer"
        );
        assert_eq!(s.bounds().next, 4);
    }

    #[test]
    fn destroy_removes_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("s");
        let s = DiskStream::open(&sub, config(1 << 20)).unwrap();
        put(&s, vec![entry("a")], 1);
        s.destroy();
        assert!(!sub.exists());
        assert!(s.append(vec![entry("b")], 2).is_err());
    }
}
