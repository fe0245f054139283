//! Criterion benchmarks of the STOMP codec: decode and encode per frame type
//! (SEND and MESSAGE at 16 B and 1 KiB, ACK, RECEIPT, CONNECT).
//!
//! Run: `cargo bench -p switchyard-stomp --bench codec`. CI only compiles them.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use switchyard_stomp::codec::{Command, Decoder, Frame, Limits, Version};

fn frames() -> Vec<(&'static str, Frame)> {
    let send = |n: usize| {
        Frame::new(Command::Send)
            .header("destination", "/queue/orders")
            .header("content-type", "application/json")
            .header("content-length", n.to_string())
            .header("receipt", "r-42")
            .body(Bytes::from(vec![b'x'; n]))
    };
    let message = |n: usize| {
        Frame::new(Command::Message)
            .header("subscription", "sub-0")
            .header("message-id", "T_sub-0@@session-abc@@42")
            .header("destination", "/queue/orders")
            .header("ack", "42")
            .header("content-length", n.to_string())
            .body(Bytes::from(vec![b'x'; n]))
    };
    vec![
        ("SEND/16B", send(16)),
        ("SEND/1KiB", send(1024)),
        ("MESSAGE/16B", message(16)),
        ("MESSAGE/1KiB", message(1024)),
        ("ACK", Frame::new(Command::Ack).header("id", "42")),
        (
            "RECEIPT",
            Frame::new(Command::Receipt).header("receipt-id", "r-42"),
        ),
        (
            "CONNECT",
            Frame::new(Command::Connect)
                .header("accept-version", "1.0,1.1,1.2")
                .header("host", "/")
                .header("login", "guest")
                .header("passcode", "guest")
                .header("heart-beat", "10000,10000"),
        ),
    ]
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("stomp_decode");
    for (name, frame) in frames() {
        let bytes = frame.to_bytes(Version::V1_2);
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), &bytes, |b, bytes| {
            b.iter(|| {
                let mut decoder = Decoder::new(Limits::default());
                decoder.set_version(Version::V1_2);
                let mut buf = bytes.clone();
                black_box(decoder.decode(&mut buf))
            })
        });
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("stomp_encode");
    let mut out = BytesMut::with_capacity(4096);
    for (name, frame) in frames() {
        group.bench_with_input(BenchmarkId::from_parameter(name), &frame, |b, frame| {
            b.iter(|| {
                out.clear();
                frame.encode(Version::V1_2, &mut out);
                black_box(out.len())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
