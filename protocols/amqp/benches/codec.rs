//! Criterion benchmarks of the AMQP 0-9-1 codec: decode and encode per frame type
//! (the frames of the publish/deliver path, plus a table-heavy handshake method).
//!
//! Run: `cargo bench -p switchyard-amqp --bench codec`. CI only compiles them
//! (`cargo bench --no-run`).

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use switchyard_amqp::codec::{self, Method};
use switchyard_core::field::{FieldTable, FieldValue};
use switchyard_core::message::Properties;

fn frames() -> Vec<(&'static str, BytesMut)> {
    let mut out = Vec::new();
    let mut put = |name, f: &dyn Fn(&mut BytesMut)| {
        let mut b = BytesMut::new();
        f(&mut b);
        out.push((name, b));
    };
    put("method/basic.publish", &|b| {
        let m = codec::BasicPublish {
            exchange: "amq.topic".into(),
            routing_key: "sensors.kitchen.temperature".into(),
            ..Default::default()
        };
        codec::encode_method(b, 1, &Method::BasicPublish(m));
    });
    put("method/basic.deliver", &|b| {
        let m = codec::BasicDeliver {
            consumer_tag: "amq.ctag-Kx8b1".into(),
            delivery_tag: 123_456,
            redelivered: false,
            exchange: "amq.topic".into(),
            routing_key: "sensors.kitchen.temperature".into(),
        };
        codec::encode_method(b, 1, &Method::BasicDeliver(m));
    });
    put("method/basic.ack", &|b| {
        let m = codec::BasicAck {
            delivery_tag: 123_456,
            multiple: true,
        };
        codec::encode_method(b, 1, &Method::BasicAck(m));
    });
    put("method/queue.declare", &|b| {
        let mut args = FieldTable::new();
        args.0
            .push(("x-message-ttl".into(), FieldValue::I32(60_000)));
        args.0
            .push(("x-dead-letter-exchange".into(), FieldValue::string("dlx")));
        let m = codec::QueueDeclare {
            queue: "orders".into(),
            durable: true,
            arguments: args,
            ..Default::default()
        };
        codec::encode_method(b, 1, &Method::QueueDeclare(m));
    });
    put("header/minimal", &|b| {
        codec::encode_header(b, 1, 60, 16, &Properties::default());
    });
    put("header/full", &|b| {
        let mut headers = FieldTable::new();
        headers
            .0
            .push(("trace-id".into(), FieldValue::string("abc123")));
        headers.0.push(("attempt".into(), FieldValue::I32(1)));
        let p = Properties {
            content_type: Some("application/json".into()),
            headers: Some(headers),
            delivery_mode: Some(2),
            priority: Some(5),
            correlation_id: Some("c-42".into()),
            reply_to: Some("amq.rabbitmq.reply-to".into()),
            message_id: Some("m-42".into()),
            timestamp: Some(1_700_000_000),
            app_id: Some("bench".into()),
            ..Default::default()
        };
        codec::encode_header(b, 1, 60, 1024, &p);
    });
    put("body/16B", &|b| codec::encode_body(b, 1, &[7u8; 16]));
    put("body/64KiB", &|b| {
        codec::encode_body(b, 1, &vec![7u8; 65_536])
    });
    put("heartbeat", &|b| codec::encode_heartbeat(b));
    out
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("amqp_decode");
    for (name, bytes) in frames() {
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), &bytes, |b, bytes| {
            b.iter(|| {
                let mut buf = bytes.clone();
                black_box(codec::decode_frame(&mut buf, 131_072))
            })
        });
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("amqp_encode");
    let mut out = BytesMut::with_capacity(128 * 1024);
    for (name, bytes) in frames() {
        let Ok(Some(frame)) = codec::decode_frame(&mut bytes.clone(), 131_072) else {
            continue;
        };
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), &frame, |b, frame| {
            b.iter(|| {
                out.clear();
                codec::encode_frame(&mut out, black_box(frame));
                black_box(out.len())
            })
        });
    }
    // A whole delivery as the broker writes it: method, header and body frames.
    let deliver = Method::BasicDeliver(codec::BasicDeliver {
        consumer_tag: "amq.ctag-Kx8b1".into(),
        delivery_tag: 1,
        exchange: Default::default(),
        routing_key: "q".into(),
        redelivered: false,
    });
    let body = bytes::Bytes::from_static(&[7u8; 16]);
    group.bench_function("content/deliver-16B", |b| {
        b.iter(|| {
            out.clear();
            codec::encode_content(
                &mut out,
                1,
                &deliver,
                &Properties::default(),
                &body,
                131_072,
            );
            black_box(out.len())
        })
    });
    group.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
