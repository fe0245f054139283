//! Codec tests: known byte vectors (from the specs' examples and real clients),
//! round trips of every packet in every version, one-byte-at-a-time feeding,
//! size limits from the fixed header, and proptest properties (round trip, any
//! split, never panics on arbitrary bytes).
// Test helpers outside #[test] functions fail a test by panicking, as tests do.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use switchyard_mqtt::codec::{
    self, reason, Ack, CodecError, ConnAck, Connect, Decoder, Disconnect, LastWill, Packet,
    Properties, Publish, QoS, SubAck, SubOptions, Subscribe, UnsubAck, Unsubscribe, Version,
};

fn enc(p: &Packet, v: Version) -> Vec<u8> {
    let mut out = BytesMut::new();
    codec::encode_unlimited(p, v, &mut out);
    out.to_vec()
}

/// Decodes a stream of packets for `v` (a CONNECT of that version first).
fn decode_all(bytes: &[u8], v: Version, chunk: usize) -> Vec<Packet> {
    let mut d = Decoder::new(usize::MAX);
    // Prime the decoder's version with a CONNECT.
    let mut prime = BytesMut::from(&enc(&Packet::Connect(Box::new(connect(v))), v)[..]);
    d.decode(&mut prime).unwrap().unwrap();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in bytes.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        while let Some(p) = d.decode(&mut buf).unwrap() {
            out.push(p);
        }
    }
    assert!(buf.is_empty(), "left over: {buf:?}");
    out
}

fn connect(v: Version) -> Connect {
    Connect {
        version: v,
        clean_start: true,
        keep_alive: 60,
        properties: Properties::default(),
        client_id: "c1".into(),
        will: None,
        username: None,
        password: None,
    }
}

#[test]
fn known_vector_connect_311_from_mosquitto_pub() {
    // mosquitto_pub -V mqttv311 -i c1 -k 60 -u guest -P guest
    let bytes: Vec<u8> = [
        &[0x10, 28][..],
        &[0, 4, b'M', b'Q', b'T', b'T', 4, 0xc2, 0, 60],
        &[0, 2, b'c', b'1'],
        &[0, 5, b'g', b'u', b'e', b's', b't'],
        &[0, 5, b'g', b'u', b'e', b's', b't'],
    ]
    .concat();
    let p = codec::decode_one(&bytes, None).unwrap().unwrap();
    let Packet::Connect(c) = &p else {
        panic!("{p:?}")
    };
    assert_eq!(c.version, Version::V311);
    assert!(c.clean_start);
    assert_eq!(c.keep_alive, 60);
    assert_eq!(c.client_id, "c1");
    assert_eq!(c.username.as_deref(), Some("guest"));
    assert_eq!(c.password.as_deref(), Some(&b"guest"[..]));
    assert_eq!(enc(&p, Version::V311), bytes);
}

#[test]
fn known_vector_connect_31_mqisdp() {
    let bytes: Vec<u8> = [
        &[0x10, 16][..],
        &[0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 0x02, 0, 10],
        &[0, 2, b'c', b'1'],
    ]
    .concat();
    let Packet::Connect(c) = codec::decode_one(&bytes, None).unwrap().unwrap() else {
        panic!()
    };
    assert_eq!(c.version, Version::V31);
}

#[test]
fn known_vector_v5_publish_with_properties() {
    // PUBLISH QoS 1, topic "a/b", id 10, props: message expiry 30, topic alias 2.
    let bytes = [
        0x32, 15, 0, 3, b'a', b'/', b'b', 0, 10, 8, 0x02, 0, 0, 0, 30, 0x23, 0, 2, b'h', b'i',
    ];
    // remaining = 5 (topic) + 2 (id) + 1 (props len) + 8 (props) + 2 (payload) = 18
    let mut bytes = bytes.to_vec();
    bytes[1] = 18;
    let p = codec::decode_one(&bytes, Some(Version::V5))
        .unwrap()
        .unwrap();
    let Packet::Publish(pb) = &p else { panic!() };
    assert_eq!(pb.qos, QoS::AtLeastOnce);
    assert_eq!(pb.packet_id, 10);
    assert_eq!(pb.properties.message_expiry_interval, Some(30));
    assert_eq!(pb.properties.topic_alias, Some(2));
    assert_eq!(&pb.payload[..], b"hi");
    assert_eq!(enc(&p, Version::V5), bytes);
}

#[test]
fn known_vectors_small_packets() {
    assert_eq!(enc(&Packet::PingReq, Version::V311), [0xc0, 0]);
    assert_eq!(enc(&Packet::PingResp, Version::V5), [0xd0, 0]);
    assert_eq!(
        enc(&Packet::PubRel(Ack::new(7, 0)), Version::V311),
        [0x62, 2, 0, 7]
    );
    // v5 success acks without properties are the short form.
    assert_eq!(
        enc(&Packet::PubAck(Ack::new(7, 0)), Version::V5),
        [0x40, 2, 0, 7]
    );
    assert_eq!(
        enc(&Packet::PubAck(Ack::new(7, 0x10)), Version::V5),
        [0x40, 3, 0, 7, 0x10]
    );
    // A v5 DISCONNECT always carries its reason code.
    assert_eq!(
        enc(&Packet::Disconnect(Disconnect::default()), Version::V5),
        [0xe0, 2, 0, 0]
    );
    assert_eq!(
        enc(&Packet::Disconnect(Disconnect::default()), Version::V311),
        [0xe0, 0]
    );
    // v5 short forms decode.
    assert_eq!(
        codec::decode_one(&[0x40, 2, 0, 7], Some(Version::V5)).unwrap(),
        Some(Packet::PubAck(Ack::new(7, 0)))
    );
    assert_eq!(
        codec::decode_one(&[0xe0, 0], Some(Version::V5)).unwrap(),
        Some(Packet::Disconnect(Disconnect::default()))
    );
    assert_eq!(
        enc(
            &Packet::ConnAck(ConnAck {
                session_present: true,
                code: 0,
                properties: Properties::default()
            }),
            Version::V311
        ),
        [0x20, 2, 1, 0]
    );
}

#[test]
fn remaining_length_varint_boundaries() {
    for (len, header) in [(127usize, 2usize), (128, 3), (16_383, 3), (16_384, 4)] {
        // topic "t" (3 bytes) + payload fills the rest.
        let payload = vec![7u8; len - 3];
        let p = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "t".into(),
            packet_id: 0,
            properties: Properties::default(),
            payload: Bytes::from(payload),
        });
        let bytes = enc(&p, Version::V311);
        assert_eq!(bytes.len(), header + len, "len {len}");
        assert_eq!(
            codec::decode_one(&bytes, Some(Version::V311)).unwrap(),
            Some(p)
        );
    }
}

fn sample_packets(v: Version) -> Vec<Packet> {
    let v5 = v.is_v5();
    let props = |p: Properties| if v5 { p } else { Properties::default() };
    let full = props(Properties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(99),
        content_type: Some("text/plain".into()),
        response_topic: Some("r/t".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01")),
        user_properties: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
        ..Properties::default()
    });
    let mut out = vec![
        Packet::Connect(Box::new(Connect {
            version: v,
            clean_start: false,
            keep_alive: 5,
            properties: props(Properties {
                session_expiry_interval: Some(3600),
                receive_maximum: Some(20),
                maximum_packet_size: Some(1000),
                topic_alias_maximum: Some(4),
                request_response_information: Some(1),
                request_problem_information: Some(0),
                user_properties: vec![("k".into(), "v".into())],
                ..Properties::default()
            }),
            client_id: "dev-42".into(),
            will: Some(LastWill {
                topic: "will/t".into(),
                payload: Bytes::from_static(b"gone"),
                qos: QoS::ExactlyOnce,
                retain: true,
                properties: props(Properties {
                    will_delay_interval: Some(3),
                    content_type: Some("x".into()),
                    ..Properties::default()
                }),
            }),
            username: Some("vh:user".into()),
            password: Some(Bytes::from_static(b"pw")),
        })),
        Packet::ConnAck(ConnAck {
            session_present: true,
            code: 0,
            properties: props(Properties {
                assigned_client_identifier: Some("auto-1".into()),
                server_keep_alive: Some(30),
                maximum_qos: Some(1),
                retain_available: Some(1),
                shared_subscription_available: Some(1),
                ..Properties::default()
            }),
        }),
        Packet::Publish(Publish {
            dup: true,
            qos: QoS::ExactlyOnce,
            retain: true,
            topic: "a/b/c".into(),
            packet_id: 65535,
            properties: Properties {
                subscription_identifiers: if v5 { vec![1, 268_435_455] } else { vec![] },
                ..full.clone()
            },
            payload: Bytes::from_static(b"payload"),
        }),
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "t".into(),
            packet_id: 0,
            properties: Properties::default(),
            payload: Bytes::new(),
        }),
        Packet::PubAck(Ack::new(1, 0)),
        Packet::PubRec(Ack::new(2, 0)),
        Packet::PubRel(Ack::new(3, 0)),
        Packet::PubComp(Ack::new(4, 0)),
        Packet::Subscribe(Subscribe {
            packet_id: 9,
            properties: props(Properties {
                subscription_identifiers: vec![77],
                ..Properties::default()
            }),
            filters: vec![
                ("a/+/c".into(), SubOptions::default()),
                (
                    "$share/g/#".into(),
                    SubOptions {
                        qos: QoS::ExactlyOnce,
                        no_local: false,
                        retain_as_published: v5,
                        retain_handling: if v5 { 2 } else { 0 },
                    },
                ),
            ],
        }),
        Packet::SubAck(SubAck {
            packet_id: 9,
            properties: Properties::default(),
            codes: vec![0, 2, 0x80],
        }),
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 10,
            properties: Properties::default(),
            filters: vec!["a/+/c".into(), "x".into()],
        }),
        Packet::UnsubAck(UnsubAck {
            packet_id: 10,
            properties: Properties::default(),
            codes: if v5 { vec![0, 0x11] } else { vec![] },
        }),
        Packet::PingReq,
        Packet::PingResp,
        Packet::Disconnect(Disconnect::default()),
    ];
    if v5 {
        out.extend([
            Packet::PubAck(Ack {
                packet_id: 5,
                reason: reason::NOT_AUTHORIZED,
                properties: Properties {
                    reason_string: Some("no".into()),
                    ..Properties::default()
                },
            }),
            Packet::PubRec(Ack::new(6, reason::NO_MATCHING_SUBSCRIBERS)),
            Packet::Disconnect(Disconnect {
                reason: reason::SESSION_TAKEN_OVER,
                properties: Properties {
                    session_expiry_interval: Some(0),
                    reason_string: Some("bye".into()),
                    ..Properties::default()
                },
            }),
            Packet::Auth(Disconnect {
                reason: reason::CONTINUE_AUTHENTICATION,
                properties: Properties {
                    authentication_method: Some("SCRAM".into()),
                    authentication_data: Some(Bytes::from_static(b"x")),
                    ..Properties::default()
                },
            }),
        ]);
    }
    out
}

#[test]
fn every_packet_round_trips_in_every_version_and_split() {
    for v in [Version::V31, Version::V311, Version::V5] {
        let packets = sample_packets(v);
        let mut stream = Vec::new();
        for p in &packets {
            let bytes = enc(p, v);
            let back = match p {
                // A CONNECT decodes on its own (it sets the version).
                Packet::Connect(_) => codec::decode_one(&bytes, None).unwrap().unwrap(),
                _ => codec::decode_one(&bytes, Some(v)).unwrap().unwrap(),
            };
            assert_eq!(&back, p, "{v:?}");
            if !matches!(p, Packet::Connect(_)) {
                stream.extend_from_slice(&bytes);
            }
        }
        let expected: Vec<Packet> = packets
            .into_iter()
            .filter(|p| !matches!(p, Packet::Connect(_)))
            .collect();
        // One byte at a time, and a few other splits: same packets.
        for chunk in [1, 2, 3, 7, 64, stream.len()] {
            assert_eq!(
                decode_all(&stream, v, chunk),
                expected,
                "{v:?} chunk {chunk}"
            );
        }
    }
}

#[test]
fn size_limit_is_checked_from_the_fixed_header() {
    let mut d = Decoder::new(100);
    // Only the fixed header of a 1 MB PUBLISH: refused before any body arrives.
    let mut buf = BytesMut::from(&[0x30u8, 0x80, 0x80, 0x40][..]);
    assert_eq!(
        d.decode(&mut buf),
        Err(CodecError::TooLarge {
            size: 1 + 3 + 1_048_576,
            limit: 100
        })
    );
    // Exactly at the limit is fine.
    let mut d = Decoder::new(10);
    let mut buf = BytesMut::from(&[0x30u8, 8, 0, 1, b't', 1, 2, 3, 4, 5][..]);
    assert!(matches!(d.decode(&mut buf), Ok(Some(Packet::Publish(_)))));
}

#[test]
fn bad_input_is_refused_with_the_right_error() {
    let v5 = Some(Version::V5);
    let v3 = Some(Version::V311);
    let malformed =
        |r: Result<Option<Packet>, CodecError>| matches!(r, Err(CodecError::Malformed { .. }));
    // QoS 3.
    assert!(malformed(codec::decode_one(&[0x36, 3, 0, 1, b't'], v3)));
    // Reserved flags on SUBSCRIBE / PUBREL / PINGREQ.
    assert!(malformed(codec::decode_one(
        &[0x80, 6, 0, 1, 0, 1, b'a', 0],
        v3
    )));
    assert!(malformed(codec::decode_one(&[0x60, 2, 0, 1], v3)));
    assert!(malformed(codec::decode_one(&[0xc1, 0], v3)));
    // Bad UTF-8 topic.
    assert!(malformed(codec::decode_one(
        &[0x30, 4, 0, 2, 0xc3, 0x28],
        v3
    )));
    // U+0000 in a topic.
    assert!(malformed(codec::decode_one(&[0x30, 4, 0, 2, b'a', 0], v3)));
    // String length beyond the packet.
    assert!(malformed(codec::decode_one(&[0x30, 3, 0, 9, b'a'], v3)));
    // Remaining length with 5 bytes.
    assert!(malformed(codec::decode_one(
        &[0x30, 0xff, 0xff, 0xff, 0xff, 0x01],
        v3
    )));
    // Packet id 0 on QoS 1.
    assert!(malformed(codec::decode_one(
        &[0x32, 5, 0, 1, b't', 0, 0],
        v3
    )));
    // DUP on QoS 0.
    assert!(malformed(codec::decode_one(&[0x38, 3, 0, 1, b't'], v3)));
    // Unknown packet type 0; AUTH in 3.1.1.
    assert!(malformed(codec::decode_one(&[0x00, 0], v3)));
    assert!(malformed(codec::decode_one(&[0xf0, 0], v3)));
    // A property not allowed in PUBLISH (session expiry), and a repeated one.
    assert!(malformed(codec::decode_one(
        &[0x30, 9, 0, 1, b't', 5, 0x11, 0, 0, 0, 1],
        v5
    )));
    assert_eq!(
        codec::decode_one(&[0x30, 8, 0, 1, b't', 4, 0x01, 1, 0x01, 1], v5),
        Err(CodecError::Protocol("property included more than once"))
    );
    // SUBSCRIBE with reserved option bits (3.1.1) and no filter.
    assert!(malformed(codec::decode_one(
        &[0x82, 6, 0, 1, 0, 1, b'a', 4],
        v3
    )));
    assert!(codec::decode_one(&[0x82, 2, 0, 1], v3).is_err());
    // CONNECT: reserved flag; unknown protocol level.
    let mut c = enc(
        &Packet::Connect(Box::new(connect(Version::V311))),
        Version::V311,
    );
    c[9] |= 1;
    assert!(malformed(codec::decode_one(&c, None)));
    let mut c = enc(
        &Packet::Connect(Box::new(connect(Version::V311))),
        Version::V311,
    );
    c[8] = 9;
    assert_eq!(
        codec::decode_one(&c, None),
        Err(CodecError::UnsupportedProtocol {
            name: "MQTT".into(),
            level: 9
        })
    );
    // Trailing bytes after a PINGREQ body.
    assert!(malformed(codec::decode_one(&[0xc0, 1, 0], v3)));
}

#[test]
fn reason_codes_of_codec_errors() {
    assert_eq!(
        CodecError::TooLarge { size: 2, limit: 1 }.reason_code(),
        reason::PACKET_TOO_LARGE
    );
    assert_eq!(
        CodecError::Protocol("x").reason_code(),
        reason::PROTOCOL_ERROR
    );
    assert_eq!(
        CodecError::Malformed {
            offset: 0,
            what: "x"
        }
        .reason_code(),
        reason::MALFORMED_PACKET
    );
}

#[test]
fn encode_refuses_packets_over_the_peers_limit() {
    let p = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: "t".into(),
        packet_id: 0,
        properties: Properties::default(),
        payload: Bytes::from(vec![0; 100]),
    });
    let mut out = BytesMut::new();
    assert!(codec::encode(&p, Version::V5, 50, &mut out).is_err());
    assert!(out.is_empty());
    assert_eq!(codec::encode(&p, Version::V5, 106, &mut out), Ok(106));
}

fn arb_props() -> impl Strategy<Value = Properties> {
    (
        proptest::option::of(0u8..=1),
        proptest::option::of(any::<u32>()),
        proptest::option::of("[a-z/]{0,12}"),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
        proptest::collection::vec(("[a-z]{0,5}", "[ -~]{0,8}"), 0..3),
        proptest::option::of(1u16..),
    )
        .prop_map(|(pfi, exp, rt, cd, up, alias)| Properties {
            payload_format_indicator: pfi,
            message_expiry_interval: exp,
            response_topic: rt,
            correlation_data: cd.map(Bytes::from),
            user_properties: up,
            topic_alias: alias,
            ..Properties::default()
        })
}

fn arb_publish(v5: bool) -> impl Strategy<Value = Packet> {
    (
        0u8..3,
        any::<bool>(),
        any::<bool>(),
        "[a-zA-Z0-9/ _.$é]{1,30}",
        1u16..,
        arb_props(),
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(move |(q, dup, retain, topic, id, props, payload)| {
            let qos = QoS::from_u8(q).unwrap();
            Packet::Publish(Publish {
                dup: dup && qos != QoS::AtMostOnce,
                qos,
                retain,
                topic,
                packet_id: if qos == QoS::AtMostOnce { 0 } else { id },
                properties: if v5 { props } else { Properties::default() },
                payload: Bytes::from(payload),
            })
        })
}

proptest! {
    #[test]
    fn publish_round_trips_across_any_split(
        packets in proptest::collection::vec(arb_publish(true), 1..6),
        split in 1usize..50,
    ) {
        let mut stream = Vec::new();
        for p in &packets {
            stream.extend(enc(p, Version::V5));
        }
        prop_assert_eq!(decode_all(&stream, Version::V5, split), packets);
    }

    #[test]
    fn publish_v311_round_trips(p in arb_publish(false)) {
        let bytes = enc(&p, Version::V311);
        prop_assert_eq!(codec::decode_one(&bytes, Some(Version::V311)).unwrap(), Some(p));
    }

    #[test]
    fn over_limit_is_rejected_whatever_the_split(p in arb_publish(true), cut in 0usize..5) {
        let bytes = enc(&p, Version::V5);
        let limit = bytes.len() - 1;
        let mut d = Decoder::new(limit);
        let mut buf = BytesMut::from(&bytes[..bytes.len().min(2 + cut)]);
        // Either the header is incomplete (need more) or it is refused; never accepted.
        match d.decode(&mut buf) {
            Ok(None) => {}
            Err(CodecError::TooLarge { .. }) => {}
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        for v in [None, Some(Version::V311), Some(Version::V5)] {
            let mut d = Decoder::new(1000);
            if let Some(v) = v {
                let mut prime = BytesMut::from(&enc(&Packet::Connect(Box::new(connect(v))), v)[..]);
                d.decode(&mut prime).unwrap();
            }
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = d.decode(&mut buf) {}
        }
    }

    #[test]
    fn mutated_valid_packets_never_panic(
        i in 0usize..18, pos in any::<usize>(), byte in any::<u8>()
    ) {
        let packets = sample_packets(Version::V5);
        let p = &packets[i % packets.len()];
        let mut bytes = enc(p, Version::V5);
        let at = pos % bytes.len();
        bytes[at] = byte;
        let _ = codec::decode_one(&bytes, Some(Version::V5));
        let _ = codec::decode_one(&bytes, None);
    }
}
