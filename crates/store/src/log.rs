//! The message log: append-only segment files with group commit.
//!
//! Grammar of a segment file (`<data_dir>/messages/<8 hex digits>.seg`):
//!
//! ```text
//! segment  = *record
//! record   = length:u32 crc32:u32 payload     ; big-endian; crc over payload
//! payload  = %x01 id:u64 count:u16 count*queue:u64 message   ; postcard(Message)
//!          / %x02 queue:u64 id:u64                           ; ack: gone from queue
//!          / %x03 queue:u64 id:u64                           ; delivered once
//! ```
//!
//! Appending is cheap and never waits for the disk: a publisher encodes its record,
//! takes a mutex for the copy into the pending buffer, and goes on. One writer
//! thread takes everything pending, writes it, calls `fdatasync` once, and
//! announces the new synced position through a `watch` channel: one fsync covers
//! every record that arrived while the previous one ran, so throughput grows with
//! concurrency instead of being capped by disk latency.
//!
//! Segments roll at a fixed size. A segment is deleted once no message in it is
//! still in a queue *and* every older segment is gone: deleting only from the head
//! guarantees that an ack record is never deleted while the message it cancels is
//! still on disk (which would revive the message at the next start).
//!
//! Recovery reads every segment in order; a record whose length runs past the end
//! of the file or whose checksum fails is a torn write (power loss mid-append): the
//! file is truncated there. Nothing after it in that file was ever synced, so
//! nothing confirmed is lost. The process then starts a fresh segment.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use switchyard_core::message::Message;
use switchyard_core::persist::{RecoveredMessage, StoredRef};
use tokio::sync::watch;

const KIND_MESSAGE: u8 = 1;
const KIND_ACK: u8 = 2;
const KIND_DELIVERED: u8 = 3;
const HEADER: usize = 8;
/// Written by a clean shutdown after the last sync; removed at open.
const CLEAN_MARKER: &str = "clean-shutdown";

/// Records appended but not yet handed to the writer.
#[derive(Debug, Default)]
struct Pending {
    /// (segment, bytes) in append order.
    chunks: Vec<(u32, Vec<u8>)>,
    /// Bytes appended since start (this process's log position).
    position: u64,
    segment: u32,
    segment_len: u64,
    next_id: u64,
    shutdown: bool,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    segment_size: u64,
    pending: Mutex<Pending>,
    wake: Condvar,
    synced: watch::Sender<u64>,
    /// Live queue references per segment; a segment absent here holds none.
    live: Mutex<BTreeMap<u32, i64>>,
}

/// The message log.
#[derive(Debug)]
pub struct MessageLog {
    shared: Arc<Shared>,
    /// The writer thread; it returns whether everything handed to it was written.
    writer: Mutex<Option<JoinHandle<bool>>>,
}

/// What recovery found in the log for the queues that still exist.
pub struct LogRecovery {
    pub messages: HashMap<u64, Vec<RecoveredMessage>>,
    pub records: usize,
    pub truncated: usize,
}

fn segment_path(dir: &Path, segment: u32) -> PathBuf {
    dir.join(format!("{segment:08x}.seg"))
}

fn list_segments(dir: &Path) -> io::Result<Vec<u32>> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(hex) = name.strip_suffix(".seg") {
            if let Ok(n) = u32::from_str_radix(hex, 16) {
                segments.push(n);
            }
        }
    }
    segments.sort_unstable();
    Ok(segments)
}

fn frame(payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_be_bytes());
    out.extend_from_slice(payload);
}

/// An ack or delivered record's payload.
fn small_record(kind: u8, queue: u64, id: u64) -> Vec<u8> {
    let mut payload = Vec::with_capacity(17);
    payload.push(kind);
    payload.extend_from_slice(&queue.to_be_bytes());
    payload.extend_from_slice(&id.to_be_bytes());
    payload
}

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let b = bytes.get(at..at.checked_add(8)?)?;
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    let b = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes(b.try_into().ok()?))
}

/// One decoded record.
enum Record {
    Message {
        id: u64,
        queues: Vec<u64>,
        message: Box<Message>,
    },
    Ack {
        queue: u64,
        id: u64,
    },
    Delivered {
        queue: u64,
        id: u64,
    },
}

fn parse_payload(p: &[u8]) -> Option<Record> {
    match *p.first()? {
        KIND_MESSAGE => {
            let id = read_u64(p, 1)?;
            let count = usize::from(read_u16(p, 9)?);
            let mut queues = Vec::with_capacity(count);
            for i in 0..count {
                queues.push(read_u64(p, 11 + i * 8)?);
            }
            let bytes = p.get(11 + count * 8..)?;
            // Records written before `Message::topic` existed have the older layout.
            let message = postcard::from_bytes::<Message>(bytes)
                .or_else(|_| {
                    postcard::from_bytes::<switchyard_core::message::MessageV1>(bytes)
                        .map(Message::from)
                })
                .ok()?;
            Some(Record::Message {
                id,
                queues,
                message: Box::new(message),
            })
        }
        KIND_ACK => Some(Record::Ack {
            queue: read_u64(p, 1)?,
            id: read_u64(p, 9)?,
        }),
        KIND_DELIVERED => Some(Record::Delivered {
            queue: read_u64(p, 1)?,
            id: read_u64(p, 9)?,
        }),
        _ => None,
    }
}

/// Reads the records of one segment, truncating a torn or corrupt tail.
/// Streams the records of one segment, one at a time (memory stays bounded by
/// the largest record, not the segment), truncating a torn or corrupt tail.
fn read_segment(path: &Path, mut each: impl FnMut(Record, u64)) -> io::Result<(usize, bool)> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut reader = io::BufReader::with_capacity(1 << 20, file);
    let mut at = 0u64;
    let mut count = 0;
    let mut payload = Vec::new();
    while at < file_len {
        let mut header = [0u8; HEADER];
        let record = match reader.read_exact(&mut header) {
            Ok(()) => {
                let [l0, l1, l2, l3, c0, c1, c2, c3] = header;
                let len = u64::from(u32::from_be_bytes([l0, l1, l2, l3]));
                let crc = u32::from_be_bytes([c0, c1, c2, c3]);
                // A length running past the end is a torn write: do not allocate it.
                if at + HEADER as u64 + len > file_len {
                    None
                } else {
                    payload.resize(usize::try_from(len).unwrap_or(0), 0);
                    reader.read_exact(&mut payload)?;
                    (crc32fast::hash(&payload) == crc)
                        .then(|| parse_payload(&payload))
                        .flatten()
                        .map(|r| (r, HEADER as u64 + len))
                }
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => None,
            Err(e) => return Err(e),
        };
        match record {
            Some((r, size)) => {
                each(r, at);
                count += 1;
                at += size;
            }
            None => {
                tracing::warn!(path = %path.display(), offset = at, "torn or corrupt record: truncating the segment there");
                let file = OpenOptions::new().write(true).open(path)?;
                file.set_len(at)?;
                file.sync_all()?;
                return Ok((count, true));
            }
        }
    }
    Ok((count, false))
}

/// What recovery keeps in memory of a message it found, and the length of the
/// body it leaves on disk. Whole messages are kept while their cost (all that
/// a resident message holds, not only the body: 16-byte bodies would otherwise
/// keep millions resident) fits `budget`; past it, a body-less copy only if
/// the queue reads its properties while the message waits, otherwise nothing.
fn keep(
    mut message: Message,
    resident: &mut usize,
    budget: usize,
) -> (Option<Arc<Message>>, Option<u32>) {
    let len = message.body.len();
    let cost = switchyard_core::memory::message_cost(&message);
    if resident.saturating_add(cost) <= budget {
        *resident += cost;
        return (Some(Arc::new(message)), None);
    }
    let on_disk = Some(u32::try_from(len).unwrap_or(u32::MAX));
    if switchyard_core::queue::read_while_paged(&message) {
        message.body = bytes::Bytes::new();
        (Some(Arc::new(message)), on_disk)
    } else {
        (None, on_disk)
    }
}

impl MessageLog {
    /// Opens the log in `dir`, recovering the messages of the queues in `queues`
    /// (records of any other queue id belong to deleted queues and are dropped).
    /// At most `resident_budget` bytes of bodies are kept in memory; the bodies
    /// of further messages stay on disk and are read back when delivered.
    pub fn open(
        dir: &Path,
        segment_size: u64,
        queues: &HashSet<u64>,
        resident_budget: usize,
    ) -> io::Result<(Self, LogRecovery)> {
        // Records start below the segment size, and `StoredRef` keeps their
        // offset in 32 bits.
        let segment_size = segment_size.min(MAX_SEGMENT_SIZE);
        fs::create_dir_all(dir)?;
        // After a crash, delivered records that were not yet synced are lost, so a
        // message may have reached a consumer without the log knowing: mark every
        // recovered message redelivered (at-least-once's signal). After a clean
        // shutdown every record was synced and the exact state is known.
        let marker = dir.join(CLEAN_MARKER);
        let clean = marker.exists();
        if clean {
            fs::remove_file(&marker)?;
        }
        let segments = list_segments(dir)?;
        // Each queue's messages in log order, as compact entries (issue 11): a
        // message beyond the resident budget keeps no decoded copy, so the scan
        // costs one entry per message and queue, not a `Message` each. Acks and
        // delivered marks always come after the message they name (they are
        // appended once its append returned), so they are applied at the end.
        let mut lists: HashMap<u64, Vec<RecoveredMessage>> = HashMap::new();
        let mut resident = 0usize;
        let mut gone: HashSet<(u64, u64)> = HashSet::new();
        let mut delivered: HashSet<(u64, u64)> = HashSet::new();
        let mut next_id = 1;
        let mut records = 0;
        let mut truncated = 0;
        for &segment in &segments {
            let (n, torn) = read_segment(&segment_path(dir, segment), |r, offset| match r {
                Record::Message {
                    id,
                    queues: qs,
                    message,
                } => {
                    next_id = next_id.max(id.saturating_add(1));
                    if !qs.iter().any(|q| queues.contains(q)) {
                        return;
                    }
                    let received_ms = message.received_ms.get();
                    let (kept, on_disk) = keep(*message, &mut resident, resident_budget);
                    let stored = StoredRef {
                        id,
                        segment,
                        offset: record_offset(offset),
                    };
                    for q in qs.into_iter().filter(|q| queues.contains(q)) {
                        lists.entry(q).or_default().push(RecoveredMessage {
                            stored,
                            message: kept.clone(),
                            received_ms,
                            redelivered: false,
                            on_disk,
                        });
                    }
                }
                Record::Ack { queue, id } => {
                    gone.insert((queue, id));
                }
                Record::Delivered { queue, id } => {
                    delivered.insert((queue, id));
                }
            })?;
            records += n;
            truncated += usize::from(torn);
        }
        let mut live: BTreeMap<u32, i64> = BTreeMap::new();
        for (queue, list) in &mut lists {
            list.retain_mut(|m| {
                let key = (*queue, m.stored.id);
                if gone.contains(&key) {
                    return false;
                }
                m.redelivered = !clean || delivered.contains(&key);
                *live.entry(m.stored.segment).or_default() += 1;
                true
            });
            list.shrink_to_fit();
        }
        drop((gone, delivered));
        let recovered = lists;
        // Start a fresh segment: never append behind a tail that was truncated.
        let current = segments.last().map_or(0, |s| s.saturating_add(1));
        let (synced, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            segment_size,
            pending: Mutex::new(Pending {
                segment: current,
                next_id,
                ..Pending::default()
            }),
            wake: Condvar::new(),
            synced,
            live: Mutex::new(live),
        });
        // Segments holding nothing live are reclaimed right away.
        delete_dead_segments(&shared, current, &segments);
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("switchyard-log-writer".into())
            .spawn(move || writer_loop(&writer_shared))?;
        let log = MessageLog {
            shared,
            writer: Mutex::new(Some(writer)),
        };
        Ok((
            log,
            LogRecovery {
                messages: recovered,
                records,
                truncated,
            },
        ))
    }

    /// Appends a framed payload; returns its segment, its offset there and the
    /// position after it.
    fn append(&self, payload: &[u8]) -> (u32, u64, u64) {
        let mut framed = Vec::with_capacity(payload.len() + HEADER);
        frame(payload, &mut framed);
        let size = framed.len() as u64;
        let mut p = self.shared.pending.lock();
        if p.segment_len > 0 && p.segment_len + size > self.shared.segment_size {
            p.segment += 1;
            p.segment_len = 0;
        }
        let segment = p.segment;
        let offset = p.segment_len;
        p.segment_len += size;
        p.position += size;
        let position = p.position;
        let wake = p.chunks.is_empty();
        match p.chunks.last_mut() {
            Some((s, bytes)) if *s == segment => bytes.extend_from_slice(&framed),
            _ => p.chunks.push((segment, framed)),
        }
        drop(p);
        if wake {
            self.shared.wake.notify_one();
        }
        (segment, offset, position)
    }

    /// Appends a message for `queues`; returns where it is and the position that
    /// must be synced for it to be durable.
    pub fn append_message(&self, queues: &[u64], message: &Message) -> (StoredRef, u64) {
        // The id is only known under the pending lock; reserve room and patch it in.
        let mut payload = Vec::with_capacity(message.body.len() + 128 + queues.len() * 8);
        payload.push(KIND_MESSAGE);
        payload.extend_from_slice(&0u64.to_be_bytes());
        payload.extend_from_slice(
            &u16::try_from(queues.len())
                .unwrap_or(u16::MAX)
                .to_be_bytes(),
        );
        for q in queues.iter().take(usize::from(u16::MAX)) {
            payload.extend_from_slice(&q.to_be_bytes());
        }
        let payload = match postcard::to_extend(message, payload) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a message for the log");
                return (
                    StoredRef {
                        id: 0,
                        segment: 0,
                        offset: 0,
                    },
                    0,
                );
            }
        };
        let (stored, position) = self.append_with_id(payload);
        let refs = i64::try_from(queues.len()).unwrap_or(i64::MAX);
        *self.shared.live.lock().entry(stored.segment).or_default() += refs;
        (stored, position)
    }

    /// Reads one message record back from its segment.
    pub fn read_message(&self, stored: StoredRef) -> io::Result<Message> {
        use std::io::{Seek, SeekFrom};
        let bad = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("message {}: {what}", stored.id),
            )
        };
        let mut file = File::open(segment_path(&self.shared.dir, stored.segment))?;
        file.seek(SeekFrom::Start(u64::from(stored.offset)))?;
        let mut header = [0u8; HEADER];
        file.read_exact(&mut header)?;
        let [l0, l1, l2, l3, c0, c1, c2, c3] = header;
        let len =
            usize::try_from(u32::from_be_bytes([l0, l1, l2, l3])).map_err(|_| bad("length"))?;
        let mut payload = vec![0u8; len];
        file.read_exact(&mut payload)?;
        if crc32fast::hash(&payload) != u32::from_be_bytes([c0, c1, c2, c3]) {
            return Err(bad("checksum mismatch"));
        }
        match parse_payload(&payload) {
            Some(Record::Message { id, message, .. }) if id == stored.id => Ok(*message),
            _ => Err(bad("not this message's record")),
        }
    }

    /// Like `append`, writing the new message id into bytes 1..9 of the payload.
    fn append_with_id(&self, mut payload: Vec<u8>) -> (StoredRef, u64) {
        // Take the id first so it is unique, then frame with it in place. Ids only
        // need to be unique, not in log order.
        let id = {
            let mut p = self.shared.pending.lock();
            let id = p.next_id;
            p.next_id += 1;
            id
        };
        if let Some(slot) = payload.get_mut(1..9) {
            slot.copy_from_slice(&id.to_be_bytes());
        }
        let (segment, offset, position) = self.append(&payload);
        (
            StoredRef {
                id,
                segment,
                offset: record_offset(offset),
            },
            position,
        )
    }

    pub fn append_ack(&self, queue: u64, stored: StoredRef) {
        self.append(&small_record(KIND_ACK, queue, stored.id));
        let mut live = self.shared.live.lock();
        if let Some(n) = live.get_mut(&stored.segment) {
            *n -= 1;
        }
    }

    pub fn append_delivered(&self, queue: u64, stored: StoredRef) {
        self.append(&small_record(KIND_DELIVERED, queue, stored.id));
    }

    pub fn synced(&self) -> watch::Receiver<u64> {
        self.shared.synced.subscribe()
    }

    /// A callback that wakes everyone watching the synced position without
    /// moving it: stream logs sync on their own, and the sessions waiting for
    /// a stream's commit to confirm a publish watch this position.
    pub fn waker(&self) -> impl Fn() + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || shared.synced.send_modify(|_| {})
    }

    /// Writes and syncs everything pending, then stops the writer thread.
    pub fn close(&self) {
        self.shared.pending.lock().shutdown = true;
        self.shared.wake.notify_one();
        if let Some(writer) = self.writer.lock().take() {
            // Marked clean only if everything appended is on disk.
            if writer.join().unwrap_or(false) {
                let marked = File::create(self.shared.dir.join(CLEAN_MARKER))
                    .and_then(|f| f.sync_all())
                    .and_then(|()| File::open(&self.shared.dir)?.sync_all());
                if let Err(e) = marked {
                    tracing::warn!(error = %e, "cannot mark the message log cleanly closed");
                }
            }
        }
    }
}

impl Drop for MessageLog {
    fn drop(&mut self) {
        self.close();
    }
}

/// Deletes segments from the head while nothing in them is live.
fn delete_dead_segments(shared: &Shared, current: u32, existing: &[u32]) {
    let mut live = shared.live.lock();
    for &segment in existing.iter().filter(|s| **s < current) {
        if live.get(&segment).copied().unwrap_or(0) > 0 {
            break;
        }
        match fs::remove_file(segment_path(&shared.dir, segment)) {
            Ok(()) => {
                live.remove(&segment);
                tracing::debug!(segment, "deleted a fully consumed log segment");
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                live.remove(&segment);
            }
            Err(e) => {
                tracing::warn!(segment, error = %e, "cannot delete a consumed log segment");
                break;
            }
        }
    }
}

/// Writes what is appended, in batches, until the log is closed; returns whether
/// everything handed to it was written.
fn writer_loop(shared: &Shared) -> bool {
    let mut files: BTreeMap<u32, File> = BTreeMap::new();
    loop {
        let (chunks, position, current, shutdown) = {
            let mut p = shared.pending.lock();
            while p.chunks.is_empty() && !p.shutdown {
                shared.wake.wait(&mut p);
            }
            (
                std::mem::take(&mut p.chunks),
                p.position,
                p.segment,
                p.shutdown,
            )
        };
        if chunks.is_empty() && shutdown {
            return true;
        }
        let mut backoff = Duration::from_millis(10);
        while let Err(e) = write_batch(shared, &mut files, &chunks) {
            // Nothing of this batch is confirmed until it is on disk; keep trying,
            // unless the log is being closed: then nobody waits for a confirm any
            // more, and retrying forever would hang the close (and the process)
            // on a disk that fails or a data directory that was removed.
            if shared.pending.lock().shutdown {
                tracing::error!(error = %e, "cannot write the message log while closing; giving up (nothing of it was confirmed)");
                return false;
            }
            tracing::error!(error = %e, "cannot write the message log; retrying");
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
        shared.synced.send_replace(position);
        // Close files of segments before the current one: they are complete.
        let done: Vec<u32> = files.keys().copied().filter(|s| *s < current).collect();
        for s in &done {
            files.remove(s);
        }
        if let Ok(existing) = list_segments(&shared.dir) {
            delete_dead_segments(shared, current, &existing);
        }
    }
}

fn write_batch(
    shared: &Shared,
    files: &mut BTreeMap<u32, File>,
    chunks: &[(u32, Vec<u8>)],
) -> io::Result<()> {
    let mut touched = Vec::new();
    for (segment, bytes) in chunks {
        let file = match files.entry(*segment) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(segment_path(&shared.dir, *segment))?;
                // The new file's directory entry must be durable too.
                File::open(&shared.dir)?.sync_all()?;
                e.insert(f)
            }
        };
        let before = file.metadata()?.len();
        if let Err(e) = file.write_all(bytes) {
            // Leave no partial record behind for the retry to write after.
            let _ = file.set_len(before);
            return Err(e);
        }
        if !touched.contains(segment) {
            touched.push(*segment);
        }
    }
    for segment in touched {
        if let Some(f) = files.get(&segment) {
            f.sync_data()?;
        }
    }
    Ok(())
}

/// Largest segment: a record starts below it, so its offset fits a `u32`.
const MAX_SEGMENT_SIZE: u64 = u32::MAX as u64;

/// A record's offset in its segment as `StoredRef` keeps it (below
/// [`MAX_SEGMENT_SIZE`] by construction; a larger one, from a segment written
/// with a larger size, cannot be addressed and saturates, so reading it back
/// fails its id check instead of reading the wrong record silently).
fn record_offset(offset: u64) -> u32 {
    u32::try_from(offset).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use switchyard_core::Properties;

    /// The layout of `Message` before `topic` existed.
    #[derive(serde::Serialize)]
    struct OldMessage {
        exchange: String,
        routing_key: String,
        properties: Properties,
        body: Bytes,
        origin: Option<u64>,
        received_ms: Option<u64>,
    }

    fn payload(message: &[u8]) -> Vec<u8> {
        let mut p = vec![KIND_MESSAGE];
        p.extend_from_slice(&7u64.to_be_bytes());
        p.extend_from_slice(&1u16.to_be_bytes());
        p.extend_from_slice(&3u64.to_be_bytes());
        p.extend_from_slice(message);
        p
    }

    #[test]
    fn records_written_before_the_topic_annotation_still_decode() {
        let old = postcard::to_stdvec(&OldMessage {
            exchange: "amq.topic".into(),
            routing_key: "a.b".into(),
            properties: Properties::default(),
            body: Bytes::from_static(b"x"),
            origin: Some(5),
            received_ms: Some(9),
        })
        .unwrap();
        let Some(Record::Message { id, message, .. }) = parse_payload(&payload(&old)) else {
            panic!("old record not read");
        };
        assert_eq!(
            (id, &message.routing_key[..], message.origin.get()),
            (7, "a.b", Some(5))
        );
        assert_eq!(message.topic, None);

        let mut new =
            (*Message::new("amq.topic", "v1.2.x", Properties::default(), Bytes::new())).clone();
        new.topic = Some("v1.2/x".into());
        let bytes = postcard::to_stdvec(&new).unwrap();
        let Some(Record::Message { message, .. }) = parse_payload(&payload(&bytes)) else {
            panic!("new record not read");
        };
        assert_eq!(*message, new);
    }
}
