//! The AMQP codec against known byte vectors, split invariance and proptest
//! properties (round trip, any split, never panics).

// clippy.toml exempts #[test] functions; these helpers are test code too.
#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use switchyard_amqp::codec::*;
use switchyard_core::field::{FieldTable, FieldValue};
use switchyard_core::message::Properties;

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Decodes every whole frame in `bytes`, fed all at once.
fn decode_all(bytes: &[u8], frame_max: u32) -> Result<Vec<Frame>, CodecError> {
    let mut buf = BytesMut::from(bytes);
    let mut frames = Vec::new();
    while let Some(frame) = decode_frame(&mut buf, frame_max)? {
        frames.push(frame);
    }
    Ok(frames)
}

/// Decodes `bytes` fed in pieces split at `splits` (sorted offsets).
fn decode_split(bytes: &[u8], splits: &[usize], frame_max: u32) -> Result<Vec<Frame>, CodecError> {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut from = 0;
    for &to in splits.iter().chain(std::iter::once(&bytes.len())) {
        let to = to.clamp(from, bytes.len());
        buf.extend_from_slice(&bytes[from..to]);
        from = to;
        while let Some(frame) = decode_frame(&mut buf, frame_max)? {
            frames.push(frame);
        }
    }
    Ok(frames)
}

fn decode_bytewise(bytes: &[u8], frame_max: u32) -> Result<Vec<Frame>, CodecError> {
    let splits: Vec<usize> = (1..bytes.len()).collect();
    decode_split(bytes, &splits, frame_max)
}

fn one(bytes: &[u8]) -> Frame {
    let frames = decode_all(bytes, 131_072).unwrap();
    assert_eq!(frames.len(), 1);
    frames.into_iter().next().unwrap()
}

fn encoded(frame: &Frame) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode_frame(&mut buf, frame);
    buf.to_vec()
}

// connection.start as RabbitMQ sends it (server properties cut down to a
// capabilities table and the product name).
fn connection_start_bytes() -> Vec<u8> {
    cat(&[
        b"\x01\x00\x00\x00\x00\x00\x6e",
        b"\x00\x0a\x00\x0a",
        b"\x00\x09",
        b"\x00\x00\x00\x49",
        b"\x0ccapabilities",
        b"F\x00\x00\x00\x22",
        b"\x12publisher_confirmst\x01",
        b"\x0abasic.nackt\x01",
        b"\x07productS\x00\x00\x00\x08RabbitMQ",
        b"\x00\x00\x00\x0eAMQPLAIN PLAIN",
        b"\x00\x00\x00\x05en_US",
        b"\xce",
    ])
}

fn start_ok_bytes() -> Vec<u8> {
    cat(&[
        b"\x01\x00\x00\x00\x00\x00\x35",
        b"\x00\x0a\x00\x0b",
        b"\x00\x00\x00\x11\x07productS\x00\x00\x00\x04test",
        b"\x05PLAIN",
        b"\x00\x00\x00\x0c\x00guest\x00guest",
        b"\x05en_US",
        b"\xce",
    ])
}

// basic.publish to the default exchange, routing key "q", mandatory; then a
// header with content-type and delivery-mode; then the body "hello".
fn publish_bytes() -> Vec<u8> {
    cat(&[
        b"\x01\x00\x01\x00\x00\x00\x0a",
        b"\x00\x3c\x00\x28\x00\x00\x00\x01q\x01",
        b"\xce",
        b"\x02\x00\x01\x00\x00\x00\x1a",
        b"\x00\x3c\x00\x00\x00\x00\x00\x00\x00\x00\x00\x05",
        b"\x90\x00\x0atext/plain\x02",
        b"\xce",
        b"\x03\x00\x01\x00\x00\x00\x05hello\xce",
    ])
}

fn deliver_bytes() -> Vec<u8> {
    cat(&[
        b"\x01\x00\x01\x00\x00\x00\x15",
        b"\x00\x3c\x00\x3c",
        b"\x04ctag",
        b"\x00\x00\x00\x00\x00\x00\x00\x01",
        b"\x01",
        b"\x00",
        b"\x01q",
        b"\xce",
    ])
}

const HEARTBEAT: &[u8] = b"\x08\x00\x00\x00\x00\x00\x00\xce";

#[test]
fn connection_start_known_bytes() {
    let bytes = connection_start_bytes();
    let capabilities = FieldTable(vec![
        ("publisher_confirms".into(), FieldValue::Bool(true)),
        ("basic.nack".into(), FieldValue::Bool(true)),
    ]);
    let expected = Frame::Method {
        channel: 0,
        method: Method::ConnectionStart(ConnectionStart {
            version_major: 0,
            version_minor: 9,
            server_properties: FieldTable(vec![
                ("capabilities".into(), FieldValue::Table(capabilities)),
                ("product".into(), FieldValue::string("RabbitMQ")),
            ]),
            mechanisms: Bytes::from_static(b"AMQPLAIN PLAIN"),
            locales: Bytes::from_static(b"en_US"),
        }),
    };
    assert_eq!(one(&bytes), expected);
    assert_eq!(encoded(&expected), bytes);
}

#[test]
fn connection_start_ok_plain_known_bytes() {
    let bytes = start_ok_bytes();
    let expected = Frame::Method {
        channel: 0,
        method: ConnectionStartOk {
            client_properties: FieldTable(vec![("product".into(), FieldValue::string("test"))]),
            mechanism: "PLAIN".into(),
            response: Bytes::from_static(b"\0guest\0guest"),
            locale: "en_US".into(),
        }
        .into(),
    };
    assert_eq!(one(&bytes), expected);
    assert_eq!(encoded(&expected), bytes);
}

fn publish_frames() -> Vec<Frame> {
    vec![
        Frame::Method {
            channel: 1,
            method: BasicPublish {
                routing_key: "q".into(),
                mandatory: true,
                ..Default::default()
            }
            .into(),
        },
        Frame::Header {
            channel: 1,
            class_id: 60,
            body_size: 5,
            properties: Properties {
                content_type: Some("text/plain".into()),
                delivery_mode: Some(2),
                ..Default::default()
            },
        },
        Frame::Body {
            channel: 1,
            payload: Bytes::from_static(b"hello"),
        },
    ]
}

#[test]
fn publish_header_body_known_bytes() {
    let bytes = publish_bytes();
    let frames = decode_all(&bytes, FRAME_MIN_SIZE).unwrap();
    assert_eq!(frames, publish_frames());

    let mut buf = BytesMut::new();
    let Frame::Method { method, .. } = &frames[0] else {
        unreachable!()
    };
    let Frame::Header { properties, .. } = &frames[1] else {
        unreachable!()
    };
    encode_content(
        &mut buf,
        1,
        method,
        properties,
        &Bytes::from_static(b"hello"),
        FRAME_MIN_SIZE,
    );
    assert_eq!(&buf[..], &bytes[..]);
}

#[test]
fn body_payload_is_not_copied() {
    let bytes = publish_bytes();
    let mut buf = BytesMut::from(&bytes[..]);
    let body_at = bytes.len() - 6;
    let expected_ptr = buf[body_at..].as_ptr();
    let mut last = None;
    while let Some(frame) = decode_frame(&mut buf, FRAME_MIN_SIZE).unwrap() {
        last = Some(frame);
    }
    let Some(Frame::Body { payload, .. }) = last else {
        panic!("no body frame")
    };
    assert_eq!(payload.as_ptr(), expected_ptr);
}

#[test]
fn basic_deliver_known_bytes() {
    let bytes = deliver_bytes();
    let expected = Frame::Method {
        channel: 1,
        method: BasicDeliver {
            consumer_tag: "ctag".into(),
            delivery_tag: 1,
            redelivered: true,
            exchange: Default::default(),
            routing_key: "q".into(),
        }
        .into(),
    };
    assert_eq!(one(&bytes), expected);
    assert_eq!(encoded(&expected), bytes);
}

#[test]
fn heartbeat_known_bytes() {
    assert_eq!(one(HEARTBEAT), Frame::Heartbeat { channel: 0 });
    let mut buf = BytesMut::new();
    encode_heartbeat(&mut buf);
    assert_eq!(&buf[..], HEARTBEAT);
}

#[test]
fn bad_frame_end() {
    let err = decode_all(b"\x08\x00\x00\x00\x00\x00\x00\x00", 0).unwrap_err();
    assert_eq!(err, CodecError::BadFrameEnd { got: 0 });
    assert_eq!(err.reply_code(), reply_code::FRAME_ERROR);
}

#[test]
fn oversize_frame_rejected_from_header_alone() {
    // A method frame announcing 4089 payload bytes: 4089 + 8 > 4096.
    let mut buf = BytesMut::from(&b"\x01\x00\x01\x00\x00\x0f\xf9"[..]);
    let err = decode_frame(&mut buf, FRAME_MIN_SIZE).unwrap_err();
    assert_eq!(
        err,
        CodecError::FrameTooLarge {
            size: 4089,
            max: 4096
        }
    );
    assert_eq!(err.reply_code(), 501);
    // 4088 + 8 is exactly frame-max: allowed, so the decoder waits for the payload.
    let mut buf = BytesMut::from(&b"\x03\x00\x01\x00\x00\x0f\xf8"[..]);
    assert_eq!(decode_frame(&mut buf, FRAME_MIN_SIZE), Ok(None));
    assert_eq!(buf.len(), 7, "an incomplete frame leaves the buffer alone");
}

#[test]
fn frame_max_zero_means_no_limit() {
    let mut buf = BytesMut::from(&b"\x03\x00\x01\x00\x10\x00\x00"[..]);
    assert_eq!(decode_frame(&mut buf, 0), Ok(None));
    let mut buf = BytesMut::from(&b"\x03\x00\x01\xff\xff\xff\xff"[..]);
    assert!(matches!(
        decode_frame(&mut buf, 0),
        Err(CodecError::FrameTooLarge { .. })
    ));
}

#[test]
fn unknown_frame_type_rejected_from_header_alone() {
    let mut buf = BytesMut::from(&b"\x04\x00\x00\x00\x00\x00\x00"[..]);
    assert_eq!(
        decode_frame(&mut buf, 0),
        Err(CodecError::UnknownFrameType(4))
    );
}

#[test]
fn malformed_frames() {
    let err = decode_all(b"\x08\x00\x00\x00\x00\x00\x01\x00\xce", 0).unwrap_err();
    assert!(matches!(
        err,
        CodecError::MalformedFrame { frame_type: 8, .. }
    ));
    let err = decode_all(b"\x01\x00\x00\x00\x00\x00\x02\x00\x0a\xce", 0).unwrap_err();
    assert!(matches!(
        err,
        CodecError::MalformedFrame { frame_type: 1, .. }
    ));
    let err = decode_all(b"\x02\x00\x01\x00\x00\x00\x02\x00\x3c\xce", 0).unwrap_err();
    assert!(matches!(
        err,
        CodecError::MalformedFrame { frame_type: 2, .. }
    ));
    assert_eq!(err.reply_code(), 501);
}

#[test]
fn syntax_errors_have_offsets_and_502() {
    // basic.consume-ok whose consumer tag claims 5 bytes but has 2.
    let err = decode_all(b"\x01\x00\x01\x00\x00\x00\x07\x00\x3c\x00\x15\x05ab\xce", 0).unwrap_err();
    assert_eq!(
        err,
        CodecError::Syntax {
            offset: 5,
            what: "short string longer than the payload"
        }
    );
    assert_eq!(err.reply_code(), 502);
    // Invalid UTF-8 in a short string.
    let err = decode_all(
        b"\x01\x00\x01\x00\x00\x00\x07\x00\x3c\x00\x15\x02\xc3\x28\xce",
        0,
    )
    .unwrap_err();
    assert_eq!(
        err,
        CodecError::Syntax {
            offset: 5,
            what: "short string is not UTF-8"
        }
    );
}

#[test]
fn unknown_method_is_540() {
    let err = decode_all(b"\x01\x00\x01\x00\x00\x00\x04\x00\x3c\x00\x07\xce", 0).unwrap_err();
    assert_eq!(
        err,
        CodecError::UnknownMethod {
            class_id: 60,
            method_id: 7
        }
    );
    assert_eq!(err.reply_code(), reply_code::NOT_IMPLEMENTED);
}

#[test]
fn protocol_header() {
    let mut buf = BytesMut::from(&b"AMQP\x00\x00\x09"[..]);
    assert_eq!(decode_protocol_header(&mut buf), Ok(None));
    buf.extend_from_slice(b"\x01\x01\x00\x00\x00");
    assert_eq!(decode_protocol_header(&mut buf), Ok(Some(ProtocolHeader)));
    assert_eq!(&buf[..], b"\x01\x00\x00\x00", "only the header is consumed");

    let mut buf = BytesMut::from(&b"AMQP\x01\x01\x00\x09"[..]);
    assert_eq!(
        decode_protocol_header(&mut buf),
        Err(CodecError::BadProtocolHeader(*b"AMQP\x01\x01\x00\x09"))
    );
    let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
    assert!(matches!(
        decode_protocol_header(&mut buf),
        Err(CodecError::BadProtocolHeader(_))
    ));
    assert_eq!(&PROTOCOL_HEADER, b"AMQP\x00\x00\x09\x01");
}

#[test]
fn encode_content_splits_body_by_frame_max() {
    let body: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let method: Method = BasicDeliver {
        consumer_tag: "c".into(),
        delivery_tag: 9,
        ..Default::default()
    }
    .into();
    let mut buf = BytesMut::new();
    encode_content(
        &mut buf,
        3,
        &method,
        &Properties::default(),
        &Bytes::from(body.clone()),
        FRAME_MIN_SIZE,
    );
    let frames = decode_all(&buf, FRAME_MIN_SIZE).unwrap();
    assert_eq!(frames.len(), 5);
    assert_eq!(frames[0], Frame::Method { channel: 3, method });
    assert!(matches!(
        frames[1],
        Frame::Header {
            channel: 3,
            class_id: 60,
            body_size: 10_000,
            ..
        }
    ));
    let sizes: Vec<usize> = frames[2..]
        .iter()
        .map(|f| match f {
            Frame::Body { payload, .. } => payload.len(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(sizes, [4088, 4088, 1824]);
    let joined: Vec<u8> = frames[2..]
        .iter()
        .flat_map(|f| match f {
            Frame::Body { payload, .. } => payload.to_vec(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(joined, body);
}

#[test]
fn empty_body_has_no_body_frame() {
    let method: Method = BasicPublish::default().into();
    let mut buf = BytesMut::new();
    encode_content(
        &mut buf,
        1,
        &method,
        &Properties::default(),
        &Bytes::new(),
        FRAME_MIN_SIZE,
    );
    let frames = decode_all(&buf, FRAME_MIN_SIZE).unwrap();
    assert_eq!(frames.len(), 2);
    assert!(matches!(frames[1], Frame::Header { body_size: 0, .. }));
}

fn mixed_stream() -> Vec<u8> {
    cat(&[
        &start_ok_bytes(),
        &publish_bytes(),
        HEARTBEAT,
        &deliver_bytes(),
        &connection_start_bytes(),
    ])
}

#[test]
fn byte_at_a_time_equals_all_at_once() {
    let stream = mixed_stream();
    let whole = decode_all(&stream, FRAME_MIN_SIZE).unwrap();
    assert_eq!(whole.len(), 7);
    assert_eq!(decode_bytewise(&stream, FRAME_MIN_SIZE).unwrap(), whole);
}

#[test]
fn every_split_point_gives_the_same_frames() {
    let stream = mixed_stream();
    let whole = decode_all(&stream, FRAME_MIN_SIZE).unwrap();
    for at in 0..=stream.len() {
        assert_eq!(
            decode_split(&stream, &[at], FRAME_MIN_SIZE).unwrap(),
            whole,
            "split at {at}"
        );
    }
}

#[test]
fn reply_codes() {
    use reply_code::*;
    let all = [
        REPLY_SUCCESS,
        CONTENT_TOO_LARGE,
        NO_ROUTE,
        NO_CONSUMERS,
        CONNECTION_FORCED,
        INVALID_PATH,
        ACCESS_REFUSED,
        NOT_FOUND,
        RESOURCE_LOCKED,
        PRECONDITION_FAILED,
        FRAME_ERROR,
        SYNTAX_ERROR,
        COMMAND_INVALID,
        CHANNEL_ERROR,
        UNEXPECTED_FRAME,
        RESOURCE_ERROR,
        NOT_ALLOWED,
        NOT_IMPLEMENTED,
        INTERNAL_ERROR,
    ];
    assert_eq!(
        all,
        [
            200, 311, 312, 313, 320, 402, 403, 404, 405, 406, 501, 502, 503, 504, 505, 506, 530,
            540, 541
        ]
    );
}

// ---- proptest ----

fn short_string() -> impl Strategy<Value = String> {
    // At most 60 chars of at most 4 bytes: always within a short string's 255.
    "\\PC{0,60}"
}

fn field_value() -> impl Strategy<Value = FieldValue> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(FieldValue::Bool),
        any::<i8>().prop_map(FieldValue::I8),
        any::<u8>().prop_map(FieldValue::U8),
        any::<i16>().prop_map(FieldValue::I16),
        any::<u16>().prop_map(FieldValue::U16),
        any::<i32>().prop_map(FieldValue::I32),
        any::<u32>().prop_map(FieldValue::U32),
        any::<i64>().prop_map(FieldValue::I64),
        // NaN != NaN would fail equality, not the codec.
        any::<f32>()
            .prop_filter("not NaN", |f| !f.is_nan())
            .prop_map(FieldValue::F32),
        any::<f64>()
            .prop_filter("not NaN", |f| !f.is_nan())
            .prop_map(FieldValue::F64),
        (any::<u8>(), any::<u32>()).prop_map(|(scale, value)| FieldValue::Decimal { scale, value }),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(|v| FieldValue::LongStr(v.into())),
        any::<u64>().prop_map(FieldValue::Timestamp),
        Just(FieldValue::Void),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(|v| FieldValue::ByteArray(v.into())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(FieldValue::Array),
            proptest::collection::vec((short_string(), inner), 0..6)
                .prop_map(|entries| FieldValue::Table(entries.into_iter().collect())),
        ]
    })
}

fn field_table() -> impl Strategy<Value = FieldTable> {
    proptest::collection::vec((short_string(), field_value()), 0..8)
        .prop_map(|entries| entries.into_iter().collect())
}

prop_compose! {
    fn properties()(
        strings in proptest::collection::vec(proptest::option::of(short_string()), 11),
        headers in proptest::option::of(field_table()),
        delivery_mode in proptest::option::of(any::<u8>()),
        priority in proptest::option::of(any::<u8>()),
        timestamp in proptest::option::of(any::<u64>()),
    ) -> Properties {
        let mut s = strings.into_iter();
        let mut next = || s.next().flatten();
        Properties {
            content_type: next(),
            content_encoding: next(),
            headers,
            delivery_mode,
            priority,
            correlation_id: next(),
            reply_to: next(),
            expiration: next(),
            message_id: next(),
            timestamp,
            kind: next(),
            user_id: next(),
            app_id: next(),
            cluster_id: next(),
        }
    }
}

prop_compose! {
    fn publish()(
        ticket in any::<u16>(),
        exchange in short_string(),
        routing_key in short_string(),
        mandatory in any::<bool>(),
        immediate in any::<bool>(),
    ) -> BasicPublish {
        BasicPublish { ticket, exchange: exchange.into(), routing_key: routing_key.into(), mandatory, immediate }
    }
}

proptest! {
    #[test]
    fn field_tables_round_trip(table in field_table()) {
        let method: Method = QueueDeclare { queue: "q".into(), arguments: table, ..Default::default() }.into();
        let frame = Frame::Method { channel: 7, method };
        prop_assert_eq!(decode_all(&encoded(&frame), 0).unwrap(), vec![frame]);
    }

    #[test]
    fn properties_round_trip(properties in properties(), body_size in any::<u64>()) {
        let frame = Frame::Header { channel: 2, class_id: 60, body_size, properties };
        prop_assert_eq!(decode_all(&encoded(&frame), 0).unwrap(), vec![frame]);
    }

    #[test]
    fn publish_content_round_trips_at_any_split(
        publish in publish(),
        properties in properties(),
        body in proptest::collection::vec(any::<u8>(), 0..3000),
        frame_max in 4096u32..6000,
        channel in any::<u16>(),
        split in any::<prop::sample::Index>(),
    ) {
        let method: Method = publish.into();
        let mut buf = BytesMut::new();
        encode_content(&mut buf, channel, &method, &properties, &Bytes::from(body.clone()), frame_max);
        let frames = decode_all(&buf, frame_max).unwrap();
        prop_assert_eq!(&frames[0], &Frame::Method { channel, method });
        let Frame::Header { properties: got, body_size, .. } = &frames[1] else {
            return Err(TestCaseError::fail("no header"));
        };
        prop_assert_eq!(got, &properties);
        prop_assert_eq!(*body_size, body.len() as u64);
        let joined: Vec<u8> = frames[2..].iter().flat_map(|f| match f {
            Frame::Body { payload, .. } => payload.to_vec(),
            _ => Vec::new(),
        }).collect();
        prop_assert_eq!(joined, body);
        let at = split.index(buf.len() + 1);
        prop_assert_eq!(decode_split(&buf, &[at], frame_max).unwrap(), frames);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        frame_max in prop_oneof![Just(0u32), Just(4096u32), 0u32..64],
    ) {
        let _ = decode_all(&bytes, frame_max);
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = decode_protocol_header(&mut buf);
    }

    #[test]
    fn mutated_frames_never_panic_and_split_invariant(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        splits in proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
    ) {
        // Valid frames with a few bytes changed reach deeper into the parsers than
        // random bytes do.
        let mut stream = mixed_stream();
        for (at, byte) in flips {
            let i = at.index(stream.len());
            stream[i] = byte;
        }
        let whole = decode_all(&stream, FRAME_MIN_SIZE);
        let mut at: Vec<usize> = splits.iter().map(|s| s.index(stream.len() + 1)).collect();
        at.sort_unstable();
        let split = decode_split(&stream, &at, FRAME_MIN_SIZE);
        // Splitting may only change how far we got before an error, never what was
        // decoded or which error.
        prop_assert_eq!(whole, split);
    }
}
