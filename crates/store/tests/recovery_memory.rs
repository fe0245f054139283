//! Recovering a backlog whose bodies stay on disk costs the queue its entries,
//! not a decoded message each (issue 11): measured as the growth of this
//! process's peak resident memory (Linux's VmHWM, reset before recovery) while
//! the store opens and the broker restores the queue. A test binary of its own,
//! so that nothing else runs in the process meanwhile. Not timed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::Duration;

use bytes::Bytes;
use switchyard_core::admin::MetaCommand;
use switchyard_core::message::{Message, Properties};
use switchyard_core::persist::Store;
use switchyard_core::queue::QueueOptions;
use switchyard_core::timer::Clock;
use switchyard_core::vhost::QueueDeclare;
use switchyard_core::Broker;
use switchyard_store::DiskStore;

const COUNT: usize = 200_000;

/// A field of /proc/self/status, in kB.
fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn body(i: usize) -> Bytes {
    Bytes::from(format!("{i:016}"))
}

#[test]
fn recovering_a_backlog_on_disk_keeps_no_decoded_message_per_entry() {
    let dir = tempfile::tempdir().unwrap();
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
        let queue = broker
            .vhost("/")
            .unwrap()
            .declare_queue(QueueDeclare {
                name: "backlog".into(),
                options: QueueOptions {
                    durable: true,
                    ..Default::default()
                },
                ..Default::default()
            })
            .unwrap();
        let id = broker
            .vhost("/")
            .unwrap()
            .queue("backlog")
            .unwrap()
            .store_id()
            .unwrap();
        drop(queue);
        // Persistent messages, as a publisher's are: the delivery mode boxes
        // their properties, which a decoded copy would hold on to.
        let props = Properties {
            delivery_mode: Some(2),
            ..Default::default()
        };
        let mut last = 0;
        for i in 0..COUNT {
            let m = Message::new("", "backlog", props.clone(), body(i));
            last = store.append_message(&[id], &m).1;
        }
        let synced = store.synced();
        for _ in 0..3000 {
            if *synced.borrow() >= last {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(*synced.borrow() >= last, "the log was never synced");
        store.close();
    }

    // From here on, the peak is what recovery adds to what is resident now
    // (writing 5 resets VmHWM, Linux 4.0 and later).
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let base = status_kb("VmHWM:");
    // No resident budget: every body stays on disk, as past the budget.
    let (store, recovered, report) =
        DiskStore::open_with(dir.path(), switchyard_store::SEGMENT_SIZE, 0).unwrap();
    assert_eq!(report.messages, COUNT);
    let broker = Broker::open(store.clone(), recovered, 0, Clock::System).unwrap();
    let queue = broker.vhost("/").unwrap().queue("backlog").unwrap();
    assert_eq!(queue.message_count(), COUNT);
    let grown = status_kb("VmHWM:").saturating_sub(base) * 1024;
    let per_message = grown / COUNT as u64;
    eprintln!("recovery's peak: {grown} bytes over the start, {per_message} per message");
    // A queue entry is 72 bytes and recovery's own entry 56, taken back as the
    // queue fills. A body-less decoded copy of each message (the Arc'd
    // `Message` and its boxed properties, about 500 bytes) would be far above.
    assert!(
        per_message <= 200,
        "recovery peaked at {per_message} bytes per message on disk"
    );

    // Every message still comes back whole, in order, read from the store
    // when it is taken.
    for i in 0..COUNT {
        let got = queue
            .get(true)
            .unwrap_or_else(|| panic!("message {i} missing"));
        assert_eq!(got.message.message.body, body(i), "message {i}");
        assert_eq!(got.message.message.routing_key, "backlog");
        assert_eq!(got.message.message.properties.delivery_mode, Some(2));
    }
    assert!(queue.get(true).is_none());
    store.close();
}
