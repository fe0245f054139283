//! Criterion benchmarks of the MQTT codec: decode and encode per packet type, for
//! 3.1.1 and 5.0 (PUBLISH at 16 B and 1 KiB, PUBACK, SUBSCRIBE, CONNECT, PINGREQ).
//!
//! Run: `cargo bench -p switchyard-mqtt --bench codec`. CI only compiles them.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use switchyard_mqtt::codec::{
    self, Ack, Connect, Decoder, Packet, Properties, Publish, QoS, SubOptions, Subscribe, Version,
};

fn connect(version: Version) -> Packet {
    Packet::Connect(Box::new(Connect {
        version,
        clean_start: true,
        keep_alive: 60,
        properties: Properties::default(),
        client_id: "sensor-kitchen-42".into(),
        will: None,
        username: Some("guest".into()),
        password: Some(Bytes::from_static(b"guest")),
    }))
}

fn packets(version: Version) -> Vec<(&'static str, Packet)> {
    let publish = |qos, n: usize| {
        Packet::Publish(Publish {
            dup: false,
            qos,
            retain: false,
            topic: "sensors/kitchen/temperature".into(),
            packet_id: if qos == QoS::AtMostOnce { 0 } else { 7 },
            properties: Properties::default(),
            payload: Bytes::from(vec![b'x'; n]),
        })
    };
    vec![
        ("CONNECT", connect(version)),
        ("PUBLISH-qos0/16B", publish(QoS::AtMostOnce, 16)),
        ("PUBLISH-qos1/16B", publish(QoS::AtLeastOnce, 16)),
        ("PUBLISH-qos0/1KiB", publish(QoS::AtMostOnce, 1024)),
        ("PUBACK", Packet::PubAck(Ack::new(7, 0))),
        (
            "SUBSCRIBE",
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                properties: Properties::default(),
                filters: vec![("sensors/+/temperature".into(), SubOptions::default())],
            }),
        ),
        ("PINGREQ", Packet::PingReq),
    ]
}

fn name(version: Version) -> &'static str {
    if version.is_v5() {
        "v5"
    } else {
        "v311"
    }
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("mqtt_decode");
    for version in [Version::V311, Version::V5] {
        // A decoder learns the version from CONNECT, as on a real connection.
        let mut primed = Decoder::new(usize::MAX);
        let mut hello = BytesMut::new();
        codec::encode_unlimited(&connect(version), version, &mut hello);
        let _ = primed.decode(&mut hello);
        for (kind, packet) in packets(version) {
            let mut bytes = BytesMut::new();
            codec::encode_unlimited(&packet, version, &mut bytes);
            group.throughput(Throughput::Bytes(bytes.len() as u64));
            let id = BenchmarkId::new(name(version), kind);
            group.bench_with_input(id, &bytes, |b, bytes| {
                b.iter(|| {
                    let mut decoder = primed.clone();
                    let mut buf = bytes.clone();
                    black_box(decoder.decode(&mut buf))
                })
            });
        }
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("mqtt_encode");
    let mut out = BytesMut::with_capacity(4096);
    for version in [Version::V311, Version::V5] {
        for (kind, packet) in packets(version) {
            let id = BenchmarkId::new(name(version), kind);
            group.bench_with_input(id, &packet, |b, packet| {
                b.iter(|| {
                    out.clear();
                    codec::encode_unlimited(black_box(packet), version, &mut out);
                    black_box(out.len())
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
