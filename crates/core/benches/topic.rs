//! Criterion benchmarks of topic matching with 10 to 100k bindings: the trie's
//! cost should follow the routing key's length and the patterns that can match,
//! not the number of bindings.
//!
//! Run: `cargo bench -p switchyard-core --bench topic`. CI only compiles them.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use switchyard_core::topic::TopicTrie;

/// `n` bindings in the shapes seen in practice: exact keys, `*` and `#` patterns.
fn trie(n: usize) -> TopicTrie<usize> {
    let mut t = TopicTrie::new();
    for i in 0..n {
        let pattern = match i % 4 {
            0 => format!("sensors.{i}.temperature"),
            1 => format!("sensors.{i}.*"),
            2 => format!("orders.{i}.#"),
            _ => format!("*.{i}.status.#"),
        };
        t.insert(&pattern, i);
    }
    // Wildcards that every key meets.
    t.insert("#", n);
    t.insert("sensors.*.temperature", n + 1);
    t
}

fn matching(c: &mut Criterion) {
    let mut group = c.benchmark_group("topic_match");
    for n in [10usize, 1_000, 10_000, 100_000] {
        let t = trie(n);
        let key = format!("sensors.{}.temperature", n / 2 / 4 * 4);
        group.bench_with_input(BenchmarkId::new("hit", n), &key, |b, key| {
            b.iter(|| {
                let mut found = 0usize;
                t.matches(black_box(key), |_| found += 1);
                black_box(found)
            })
        });
        group.bench_with_input(
            BenchmarkId::new("miss-deep", n),
            &"a.b.c.d.e.f.g.h",
            |b, key| {
                b.iter(|| {
                    let mut found = 0usize;
                    t.matches(black_box(key), |_| found += 1);
                    black_box(found)
                })
            },
        );
    }
    group.finish();
}

fn insert(c: &mut Criterion) {
    c.bench_function("topic_insert_10k", |b| {
        b.iter(|| black_box(trie(10_000).len()))
    });
}

criterion_group!(benches, matching, insert);
criterion_main!(benches);
