//! How long a Prometheus scrape and a statistics sample take with many queues
//! (issue 9's goal: 10,000 queues, `/metrics` under 100 ms, per-object under
//! 1 s). A benchmark, not a test: run it in release mode,
//!
//! ```sh
//! cargo run --release -p switchyard-mgmt --example metrics_scale -- 10000
//! ```
//!
//! It builds an in-memory broker with that many queues (one message in each,
//! so every queue has counters and a length), a few hundred channels' worth of
//! sources, then renders each endpoint several times and prints the median.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use switchyard_core::auth::Auth;
use switchyard_core::message::{Message, Properties};
use switchyard_core::stats::Protocol;
use switchyard_core::vhost::QueueDeclare;
use switchyard_core::Broker;
use switchyard_mgmt::prometheus::{render, Identity};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let queues: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let broker = Broker::new(Auth::new(), &[], 0);
    let vhost = broker.vhost("/").unwrap();
    for i in 0..queues {
        let name = format!("queue-{i:05}");
        vhost
            .declare_queue(QueueDeclare {
                name: name.clone(),
                ..Default::default()
            })
            .unwrap();
        let m = Message::new(
            String::new(),
            name,
            Properties::default(),
            vec![0u8; 16].into(),
        );
        vhost.publish(m).unwrap();
    }
    let _sources: Vec<_> = (0..200)
        .map(|i| broker.stats.open_source(Protocol::Amqp091, i, 1, "/", true))
        .collect();
    let id = Identity::of_node();

    let mut sample = Vec::new();
    for i in 0..5u64 {
        let t = Instant::now();
        broker.sample_stats_now(1_000_000 + i * 5_000);
        sample.push(t.elapsed());
    }
    for (label, per_object) in [("/metrics", false), ("/metrics/per-object", true)] {
        let mut times = Vec::new();
        let mut size = 0;
        for _ in 0..7 {
            let t = Instant::now();
            let body = render(&broker, per_object, &id);
            times.push(t.elapsed());
            size = body.len();
        }
        println!(
            "{label:<22} {queues} queues: median {:>8.2} ms, {size} bytes",
            median(times).as_secs_f64() * 1000.0
        );
    }
    println!(
        "{:<22} {queues} queues: median {:>8.2} ms",
        "stats sample",
        median(sample).as_secs_f64() * 1000.0
    );
}
