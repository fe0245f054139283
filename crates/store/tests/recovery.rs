//! The store's promises, tested through its public API: what was synced comes
//! back after a reopen, in order, with its delivered state; acked messages do not;
//! a torn tail is cut off; consumed segments are deleted.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use switchyard_core::exchange::{DestinationName, ExchangeOptions};
use switchyard_core::message::{Message, Properties};
use switchyard_core::persist::{BindingRecord, ExchangeRecord, QueueRecord, Store};
use switchyard_core::queue::QueueOptions;
use switchyard_core::FieldTable;
use switchyard_store::DiskStore;

fn msg(body: &str) -> Message {
    let props = Properties {
        delivery_mode: Some(2),
        ..Default::default()
    };
    Message::new("", "q", props, Bytes::from(body.to_owned()))
        .as_ref()
        .clone()
}

/// The first segment file of the log.
fn first_segment(dir: &std::path::Path) -> std::path::PathBuf {
    let mut segs: Vec<_> = std::fs::read_dir(dir.join("messages"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    segs.remove(0)
}

fn queue(id: u64, name: &str) -> QueueRecord {
    QueueRecord {
        vhost: "/".into(),
        name: name.into(),
        id,
        options: QueueOptions {
            durable: true,
            ..Default::default()
        },
    }
}

/// Waits until the writer has synced `position`.
fn wait_synced(store: &DiskStore, position: u64) {
    let rx = store.synced();
    for _ in 0..500 {
        if *rx.borrow() >= position {
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    panic!("position {position} never synced");
}

#[test]
fn synced_messages_come_back_in_order_and_acked_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b);
    {
        let (store, recovered, _) = DiskStore::open(dir.path()).unwrap();
        assert!(recovered.queues.is_empty());
        a = store.new_queue_id().unwrap();
        b = store.new_queue_id().unwrap();
        assert_ne!(a, b);
        store.save_queue(&queue(a, "a")).unwrap();
        store.save_queue(&queue(b, "b")).unwrap();
        let mut refs = Vec::new();
        let mut last = 0;
        for i in 0..10 {
            let (r, p) = store.append_message(&[a, b], &msg(&format!("m{i}")));
            refs.push(r);
            last = p;
        }
        store.append_ack(a, refs[0]);
        store.append_ack(a, refs[1]);
        store.append_delivered(a, refs[2]);
        store.append_ack(b, refs[9]);
        let (_, p) = store.append_message(&[a], &msg("last"));
        wait_synced(&store, p.max(last));
        store.close();
    }
    let (_store, recovered, report) = DiskStore::open(dir.path()).unwrap();
    assert_eq!(recovered.queues.len(), 2);
    let bodies = |q: u64| -> Vec<(String, bool)> {
        recovered.messages[&q]
            .iter()
            .map(|m| {
                (
                    String::from_utf8(m.message.as_ref().unwrap().body.to_vec()).unwrap(),
                    m.redelivered,
                )
            })
            .collect()
    };
    let got_a = bodies(a);
    assert_eq!(got_a.len(), 9);
    assert_eq!(
        got_a[0],
        ("m2".to_owned(), true),
        "delivered before the restart: redelivered"
    );
    assert_eq!(
        got_a[1],
        ("m3".to_owned(), false),
        "clean shutdown: exact delivered state"
    );
    assert_eq!(got_a.last().unwrap().0, "last");
    let got_b = bodies(b);
    assert_eq!(got_b.len(), 9);
    assert_eq!(got_b[0].0, "m0");
    assert_eq!(got_b[8].0, "m8");
    assert_eq!(report.messages, 18);
}

#[test]
fn after_a_crash_every_recovered_message_is_marked_redelivered() {
    let dir = tempfile::tempdir().unwrap();
    let q;
    {
        let (store, _, _) = DiskStore::open(dir.path()).unwrap();
        q = store.new_queue_id().unwrap();
        store.save_queue(&queue(q, "q")).unwrap();
        let (_, p) = store.append_message(&[q], &msg("m"));
        wait_synced(&store, p);
        store.close();
    }
    // As after kill -9: no clean-shutdown marker.
    std::fs::remove_file(dir.path().join("messages").join("clean-shutdown")).unwrap();
    {}
    let (_, recovered, _) = DiskStore::open(dir.path()).unwrap();
    assert!(recovered.messages[&q][0].redelivered);
}

#[test]
fn torn_tail_is_truncated_and_the_rest_survives() {
    let dir = tempfile::tempdir().unwrap();
    let q;
    {
        let (store, _, _) = DiskStore::open(dir.path()).unwrap();
        q = store.new_queue_id().unwrap();
        store.save_queue(&queue(q, "q")).unwrap();
        let mut p = 0;
        for i in 0..5 {
            p = store.append_message(&[q], &msg(&format!("m{i}"))).1;
        }
        wait_synced(&store, p);
        store.close();
    }
    // Power loss mid-append: half a record, then garbage after a valid one.
    let seg = first_segment(dir.path());
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(&[0, 0, 1, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3])
        .unwrap();
    drop(f);
    let len_before = std::fs::metadata(&seg).unwrap().len();
    let (store, recovered, report) = DiskStore::open(dir.path()).unwrap();
    assert_eq!(report.truncated_segments, 1);
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), len_before - 11);
    assert_eq!(recovered.messages[&q].len(), 5);
    // And the store keeps working after the cut.
    let (_, p) = store.append_message(&[q], &msg("after"));
    wait_synced(&store, p);
    store.close();
    drop(store);
    let (_, recovered, _) = DiskStore::open(dir.path()).unwrap();
    assert_eq!(recovered.messages[&q].len(), 6);
}

#[test]
fn corrupted_record_is_never_returned_as_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let q;
    {
        let (store, _, _) = DiskStore::open(dir.path()).unwrap();
        q = store.new_queue_id().unwrap();
        store.save_queue(&queue(q, "q")).unwrap();
        let mut p = 0;
        for i in 0..3 {
            p = store.append_message(&[q], &msg(&format!("message-{i}"))).1;
        }
        wait_synced(&store, p);
        store.close();
    }
    let seg = first_segment(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0xff; // flip a byte inside the last record's body
    std::fs::write(&seg, &bytes).unwrap();
    let (_, recovered, _) = DiskStore::open(dir.path()).unwrap();
    let bodies: Vec<_> = recovered.messages[&q]
        .iter()
        .map(|m| m.message.as_ref().unwrap().body.clone())
        .collect();
    assert_eq!(bodies, [Bytes::from("message-0"), Bytes::from("message-1")]);
}

#[test]
fn consumed_segments_are_deleted_from_the_head() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = DiskStore::open_with_segment_size(dir.path(), 4096).unwrap();
    let q = store.new_queue_id().unwrap();
    store.save_queue(&queue(q, "q")).unwrap();
    let body = "x".repeat(1000);
    let mut refs = Vec::new();
    let mut p = 0;
    for _ in 0..40 {
        let (r, pos) = store.append_message(&[q], &msg(&body));
        refs.push(r);
        p = pos;
    }
    wait_synced(&store, p);
    let segments = || {
        std::fs::read_dir(dir.path().join("messages"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "seg")
            })
            .count()
    };
    assert!(segments() >= 10, "{} segments", segments());
    for r in &refs {
        store.append_ack(q, *r);
    }
    let (_, p) = store.append_message(&[q], &msg("keep"));
    wait_synced(&store, p);
    // The writer reclaims after its next batch.
    let (_, p) = store.append_message(&[q], &msg("keep2"));
    wait_synced(&store, p);
    assert!(segments() <= 2, "{} segments left", segments());
}

#[test]
fn metadata_round_trips_and_deletes_cascade_to_bindings() {
    let dir = tempfile::tempdir().unwrap();
    let x = ExchangeRecord {
        vhost: "/".into(),
        name: "orders".into(),
        kind: "topic".into(),
        options: ExchangeOptions {
            durable: true,
            auto_delete: false,
            internal: false,
            arguments: FieldTable::new(),
        },
    };
    let bind = |dest: DestinationName| BindingRecord {
        vhost: "/".into(),
        source: "orders".into(),
        destination: dest,
        routing_key: "a.*".into(),
        arguments: FieldTable::new(),
    };
    {
        let (store, _, _) = DiskStore::open(dir.path()).unwrap();
        store.save_exchange(&x).unwrap();
        store.save_queue(&queue(1, "q1")).unwrap();
        store.save_queue(&queue(2, "q2")).unwrap();
        store
            .save_binding(&bind(DestinationName::Queue("q1".into())))
            .unwrap();
        store
            .save_binding(&bind(DestinationName::Queue("q2".into())))
            .unwrap();
        store.delete_queue("/", "q2").unwrap();
    }
    let (_, recovered, _) = DiskStore::open(dir.path()).unwrap();
    assert_eq!(recovered.exchanges, vec![x]);
    assert_eq!(recovered.queues.len(), 1);
    assert_eq!(
        recovered.bindings,
        vec![bind(DestinationName::Queue("q1".into()))]
    );
}

#[test]
fn stored_messages_read_back_by_reference_before_and_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = DiskStore::open_with_segment_size(dir.path(), 4096).unwrap();
    let q = store.new_queue_id().unwrap();
    store.save_queue(&queue(q, "q")).unwrap();
    let mut refs = Vec::new();
    let mut p = 0;
    for i in 0..20 {
        let (r, pos) = store.append_message(&[q], &msg(&format!("body-{i}-{}", "y".repeat(300))));
        refs.push(r);
        p = pos;
    }
    wait_synced(&store, p);
    for (i, r) in refs.iter().enumerate() {
        let m = store.read_message(*r).unwrap();
        assert!(m.body.starts_with(format!("body-{i}-").as_bytes()));
    }
    store.close();
    drop(store);
    let (store, recovered, _) = DiskStore::open_with_segment_size(dir.path(), 4096).unwrap();
    for m in &recovered.messages[&q] {
        assert_eq!(
            store.read_message(m.stored).unwrap().body,
            m.message.as_ref().unwrap().body
        );
    }
    let wrong = switchyard_core::persist::StoredRef {
        offset: refs[3].offset + 1,
        ..refs[3]
    };
    assert!(
        store.read_message(wrong).is_err(),
        "a bad reference is an error, not garbage"
    );
}

#[test]
fn adapter_records_survive_a_reopen_per_kind() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _, _) = DiskStore::open(dir.path()).unwrap();
        store.save_record("a", "x\0one", b"1").unwrap();
        store.save_record("a", "x\0two", b"2").unwrap();
        store.save_record("a", "x\0two", b"2b").unwrap();
        store.save_record("ab", "k", b"other kind").unwrap();
        store.save_record("b", "gone", b"3").unwrap();
        store.delete_record("b", "gone").unwrap();
        store.delete_record("b", "never there").unwrap();
        store.close();
    }
    let (store, _, _) = DiskStore::open(dir.path()).unwrap();
    assert_eq!(
        store.records("a").unwrap(),
        [
            ("x\0one".to_owned(), b"1".to_vec()),
            ("x\0two".to_owned(), b"2b".to_vec())
        ]
    );
    assert_eq!(
        store.records("ab").unwrap(),
        [("k".to_owned(), b"other kind".to_vec())]
    );
    assert!(store.records("b").unwrap().is_empty());
}

/// Closing a log that cannot be written (a failing disk, or here its directory
/// removed, as a test's temporary directory is) returns instead of retrying
/// forever: nothing waits for a confirm any more, and the process must be able
/// to end. What could not be written is not marked cleanly closed.
#[test]
fn closing_a_log_that_cannot_be_written_returns() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _, _) = DiskStore::open(dir.path()).unwrap();
    let q = store.new_queue_id().unwrap();
    store.save_queue(&queue(q, "q")).unwrap();
    std::fs::remove_dir_all(dir.path().join("messages")).unwrap();
    let (_, position) = store.append_message(&[q], &msg("lost"));
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let closer = std::thread::spawn(move || {
        store.close();
        done_tx.send(*store.synced().borrow()).unwrap();
    });
    let synced = done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("close() did not return");
    closer.join().unwrap();
    assert!(
        synced < position,
        "an unwritten message was reported synced"
    );
    assert!(!dir.path().join("messages/clean-shutdown").exists());
}

/// Past the resident budget, recovery hands a queue compact entries (issue 11):
/// a message the queue reads nothing of while it waits keeps no decoded copy at
/// all, only where it is, its body's length and when it was received; one whose
/// priority, TTL or delay the queue needs keeps a copy without its body. Either
/// way the whole message comes back from the store by reference.
#[test]
fn messages_past_the_budget_are_recovered_as_compact_entries() {
    let dir = tempfile::tempdir().unwrap();
    let q;
    let with = |f: &dyn Fn(&mut Properties)| {
        let mut m = msg("needs properties");
        f(&mut m.properties);
        m
    };
    let needing = [
        with(&|p| p.priority = Some(3)),
        with(&|p| p.expiration = Some("60000".into())),
        with(&|p| {
            let mut h = FieldTable::new();
            h.insert("x-delay", switchyard_core::FieldValue::I64(60_000));
            p.headers = Some(h);
        }),
    ];
    {
        let (store, _, _) = DiskStore::open(dir.path()).unwrap();
        q = store.new_queue_id().unwrap();
        store.save_queue(&queue(q, "q")).unwrap();
        let mut p = 0;
        for i in 0..100 {
            let mut m = msg(&format!("plain-{i}"));
            m.received_ms = Some(1_000 + i).into();
            p = store.append_message(&[q], &m).1;
        }
        for m in &needing {
            p = store.append_message(&[q], m).1;
        }
        wait_synced(&store, p);
        store.close();
    }
    // No budget: every body stays on disk.
    let (store, recovered, _) =
        DiskStore::open_with(dir.path(), switchyard_store::SEGMENT_SIZE, 0).unwrap();
    let list = &recovered.messages[&q];
    assert_eq!(list.len(), 103);
    for (i, m) in list.iter().take(100).enumerate() {
        assert!(m.message.is_none(), "message {i} kept a decoded copy");
        assert_eq!(m.on_disk, Some(format!("plain-{i}").len() as u32));
        assert_eq!(m.received_ms, Some(1_000 + i as u64));
        let full = store.read_message(m.stored).unwrap();
        assert_eq!(full.body, Bytes::from(format!("plain-{i}")));
    }
    for (m, original) in list.iter().skip(100).zip(&needing) {
        let kept = m.message.as_ref().expect("a copy with its properties");
        assert!(kept.body.is_empty(), "the body stays on disk");
        assert_eq!(kept.properties, original.properties);
        assert_eq!(m.on_disk, Some(original.body.len() as u32));
    }
}

/// Compact recovered entries keep what the queue needs of them before they are
/// read back: a priority queue still serves the higher priority first, a queue
/// TTL still counts from when the message was received (an old one expires
/// unseen), and a message delivered before the restart comes back redelivered.
#[test]
fn compact_recovered_entries_keep_priority_ttl_and_redelivery() {
    use switchyard_core::admin::MetaCommand;
    use switchyard_core::timer::Clock;
    use switchyard_core::vhost::QueueDeclare;
    use switchyard_core::{Broker, FieldValue};

    let dir = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    {
        let (store, recovered, _) = DiskStore::open(dir.path()).unwrap();
        let broker = Broker::open(store.clone(), recovered, 0, Clock::System).unwrap();
        broker
            .apply(MetaCommand::PutVhost {
                name: "/".into(),
                description: String::new(),
                tags: Vec::new(),
                default_queue_type: None,
            })
            .unwrap();
        let mut arguments = FieldTable::new();
        arguments.insert("x-max-priority", FieldValue::I64(5));
        arguments.insert("x-message-ttl", FieldValue::I64(60_000));
        broker
            .vhost("/")
            .unwrap()
            .declare_queue(QueueDeclare {
                name: "q".into(),
                options: QueueOptions {
                    durable: true,
                    arguments,
                    ..Default::default()
                },
                ..Default::default()
            })
            .unwrap();
        let id = broker
            .vhost("/")
            .unwrap()
            .queue("q")
            .unwrap()
            .store_id()
            .unwrap();
        let append = |body: &str, received: u64, priority: Option<u8>| {
            let mut m = msg(body);
            m.received_ms = Some(received).into();
            m.properties.priority = priority;
            store.append_message(&[id], &m)
        };
        append("stale", now - 120_000, None);
        let (delivered, _) = append("fresh", now, None);
        append("fresh-2", now, None);
        append("urgent", now, Some(4));
        store.append_delivered(id, delivered);
        // Closing writes and syncs everything appended.
        store.close();
    }
    let (store, recovered, _) =
        DiskStore::open_with(dir.path(), switchyard_store::SEGMENT_SIZE, 0).unwrap();
    assert!(
        recovered
            .messages
            .values()
            .flatten()
            .all(|m| m.on_disk.is_some()),
        "no budget: every body on disk"
    );
    let broker = Broker::open(store.clone(), recovered, 0, Clock::System).unwrap();
    let queue = broker.vhost("/").unwrap().queue("q").unwrap();
    let mut got = Vec::new();
    while let Some(g) = queue.get(true) {
        got.push((
            String::from_utf8(g.message.message.body.to_vec()).unwrap(),
            g.message.redelivered(),
        ));
    }
    assert_eq!(
        got,
        [
            ("urgent".to_owned(), false),
            ("fresh".to_owned(), true),
            ("fresh-2".to_owned(), false),
        ],
        "the stale message expired by its receive time"
    );
}
