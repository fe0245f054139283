//! Every AMQP 0-9-1 method of RabbitMQ's method table, as one struct each and
//! one [`Method`] enum, with their argument encoding.
//!
//! Grammar (AMQP 0-9-1 section 4.2.4):
//!
//! ```text
//! method-frame-payload = class-id method-id *amqp-field
//! class-id             = short
//! method-id            = short
//! amqp-field           = octet / short / long / longlong / shortstr / longstr
//!                      / timestamp / field-table / bits   ; see `types`
//! ```
//!
//! The table at the bottom is RabbitMQ's `amqp-0-9-1-rabbitmq.json`, one line per
//! method: `Variant = (class-id, method-id, "class.method", flags) { field: type }`,
//! where `type` is the argument's AMQP type after resolving its domain. A single
//! `macro_rules!` turns each line into the struct, its decoder and its encoder, so
//! the two directions cannot drift apart. Consecutive `bit` arguments share an
//! octet (the reader and writer in `types` handle that), so the table lists bits
//! exactly as the spec does.
//!
//! Naming: struct and variant names are the class and method in CamelCase
//! (`basic.get-ok` is `BasicGetOk`); fields are the argument names in snake_case,
//! except `type` is `kind` and `nowait` is `no_wait`. Reserved arguments
//! (`ticket`, `out_of_band`, `channel_id`, `known_hosts`, `capabilities`,
//! `insist`, `cluster_id`) stay ordinary fields so what is read is what is
//! written back; a server sends their defaults (zero / empty).

use bytes::{Bytes, BytesMut};
use switchyard_core::field::FieldTable;
use switchyard_core::message::ShortStr;

use super::types::{Reader, Writer};
use super::{CodecError, FRAME_METHOD};

/// The Rust type for an AMQP argument type.
macro_rules! amqp_type {
    (octet) => {
        u8
    };
    (short) => {
        u16
    };
    (long) => {
        u32
    };
    (longlong) => {
        u64
    };
    (timestamp) => {
        u64
    };
    (bit) => {
        bool
    };
    (shortstr) => {
        ShortStr
    };
    (longstr) => {
        Bytes
    };
    (table) => {
        FieldTable
    };
}

/// Whether a method line carries `flag` (`sync` or `content`).
macro_rules! has_flag {
    ($want:ident;) => { false };
    (sync; sync $($rest:ident)*) => { true };
    (content; content $($rest:ident)*) => { true };
    ($want:ident; $other:ident $($rest:ident)*) => { has_flag!($want; $($rest)*) };
}

macro_rules! methods {
    ($(
        $variant:ident = ($class:literal, $method:literal, $name:literal $(, $flag:ident)*)
            { $($field:ident : $kind:ident),* $(,)? }
    )*) => {
        $(
            #[doc = concat!("`", $name, "` (class ", stringify!($class), ", method ", stringify!($method), ").")]
            #[derive(Debug, Clone, Default, PartialEq)]
            pub struct $variant {
                $(pub $field: amqp_type!($kind),)*
            }

            impl $variant {
                pub const CLASS_ID: u16 = $class;
                pub const METHOD_ID: u16 = $method;
                pub const NAME: &'static str = $name;

                #[allow(unused_variables)] // methods without arguments
                fn decode_args(r: &mut Reader<'_>) -> Result<Self, CodecError> {
                    Ok($variant { $($field: r.$kind()?,)* })
                }

                #[allow(unused_variables)]
                fn encode_args(&self, w: &mut Writer<'_>) {
                    $(w.$kind(&self.$field);)*
                }
            }

            impl From<$variant> for Method {
                fn from(m: $variant) -> Method {
                    Method::$variant(m)
                }
            }
        )*

        /// Any AMQP 0-9-1 method, named `ClassMethod` after its struct.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Method {
            $($variant($variant),)*
        }

        impl Method {
            pub fn class_id(&self) -> u16 {
                match self { $(Method::$variant(_) => $class,)* }
            }

            pub fn method_id(&self) -> u16 {
                match self { $(Method::$variant(_) => $method,)* }
            }

            /// The spec's name, e.g. `"basic.publish"`: for logs and close texts.
            pub fn name(&self) -> &'static str {
                match self { $(Method::$variant(_) => $name,)* }
            }

            /// Whether a content header and body frames follow this method
            /// (basic.publish, basic.return, basic.deliver, basic.get-ok).
            pub fn has_content(&self) -> bool {
                match self { $(Method::$variant(_) => has_flag!(content; $($flag)*),)* }
            }

            /// Whether the spec marks it synchronous: a request that expects a
            /// reply (unless it sets `no_wait`).
            pub fn is_synchronous(&self) -> bool {
                match self { $(Method::$variant(_) => has_flag!(sync; $($flag)*),)* }
            }

            fn decode_args(class_id: u16, method_id: u16, r: &mut Reader<'_>) -> Result<Method, CodecError> {
                match (class_id, method_id) {
                    $(($class, $method) => Ok(Method::$variant($variant::decode_args(r)?)),)*
                    _ => Err(CodecError::UnknownMethod { class_id, method_id }),
                }
            }

            fn encode_args(&self, w: &mut Writer<'_>) {
                match self { $(Method::$variant(m) => m.encode_args(w),)* }
            }
        }

        /// One value of every method, fields filled from a counter so that
        /// neighbouring bits differ; `seed` shifts the counter.
        #[cfg(test)]
        pub(crate) fn samples(seed: u32) -> Vec<Method> {
            use self::sample::Sample;
            let mut i = seed;
            let mut next = || { i += 1; i };
            vec![$(Method::$variant($variant { $($field: Sample::sample(next()),)* }),)*]
        }

        /// Every method with all-default (zero, empty) arguments.
        #[cfg(test)]
        pub(crate) fn defaults() -> Vec<Method> {
            vec![$(Method::$variant($variant::default()),)*]
        }
    };
}

impl Method {
    /// Decodes a method frame's payload (class id, method id, arguments).
    ///
    /// Long strings and tables' long strings are slices of `payload`, not copies.
    /// The whole payload must be consumed: trailing bytes are a syntax error.
    pub fn decode(payload: &Bytes) -> Result<Method, CodecError> {
        if payload.len() < 4 {
            return Err(CodecError::MalformedFrame {
                frame_type: FRAME_METHOD,
                what: "method frame shorter than its class and method ids",
            });
        }
        let mut r = Reader::new(payload);
        let class_id = r.short()?;
        let method_id = r.short()?;
        let method = Method::decode_args(class_id, method_id, &mut r)?;
        r.finish()?;
        Ok(method)
    }

    /// Appends the method payload (class id, method id, arguments), without a
    /// frame around it.
    pub fn encode(&self, buf: &mut BytesMut) {
        let mut w = Writer::new(buf);
        w.short(&self.class_id());
        w.short(&self.method_id());
        self.encode_args(&mut w);
        w.finish();
    }
}

#[cfg(test)]
mod sample {
    use bytes::Bytes;
    use switchyard_core::field::{FieldTable, FieldValue};
    use switchyard_core::message::ShortStr;

    pub(crate) trait Sample {
        fn sample(i: u32) -> Self;
    }

    impl Sample for u8 {
        fn sample(i: u32) -> Self {
            (i % 251) as u8 + 1
        }
    }
    impl Sample for u16 {
        fn sample(i: u32) -> Self {
            (i as u16).wrapping_mul(257).wrapping_add(1)
        }
    }
    impl Sample for u32 {
        fn sample(i: u32) -> Self {
            i.wrapping_mul(16_777_619).wrapping_add(3)
        }
    }
    impl Sample for u64 {
        fn sample(i: u32) -> Self {
            u64::from(i) << 40 | 5
        }
    }
    impl Sample for bool {
        fn sample(i: u32) -> Self {
            i % 2 == 1
        }
    }
    impl Sample for ShortStr {
        fn sample(i: u32) -> Self {
            // Past the 24 bytes kept inline every few samples, so both forms
            // round-trip.
            let long = if i.is_multiple_of(3) {
                "-a-name-longer-than-inline"
            } else {
                ""
            };
            compact_str::format_compact!("s{i}-é{long}")
        }
    }
    impl Sample for Bytes {
        fn sample(i: u32) -> Self {
            Bytes::from(vec![0, 1, 2, (i % 256) as u8])
        }
    }
    impl Sample for FieldTable {
        fn sample(i: u32) -> Self {
            FieldTable(vec![
                ("k".into(), FieldValue::U32(i)),
                ("nested".into(), FieldValue::Table(FieldTable::new())),
            ])
        }
    }
}

methods! {
    // connection (class 10)
    ConnectionStart = (10, 10, "connection.start", sync) { version_major: octet, version_minor: octet, server_properties: table, mechanisms: longstr, locales: longstr }
    ConnectionStartOk = (10, 11, "connection.start-ok") { client_properties: table, mechanism: shortstr, response: longstr, locale: shortstr }
    ConnectionSecure = (10, 20, "connection.secure", sync) { challenge: longstr }
    ConnectionSecureOk = (10, 21, "connection.secure-ok") { response: longstr }
    ConnectionTune = (10, 30, "connection.tune", sync) { channel_max: short, frame_max: long, heartbeat: short }
    ConnectionTuneOk = (10, 31, "connection.tune-ok") { channel_max: short, frame_max: long, heartbeat: short }
    ConnectionOpen = (10, 40, "connection.open", sync) { virtual_host: shortstr, capabilities: shortstr, insist: bit }
    ConnectionOpenOk = (10, 41, "connection.open-ok") { known_hosts: shortstr }
    ConnectionClose = (10, 50, "connection.close", sync) { reply_code: short, reply_text: shortstr, class_id: short, method_id: short }
    ConnectionCloseOk = (10, 51, "connection.close-ok") {}
    ConnectionBlocked = (10, 60, "connection.blocked") { reason: shortstr }
    ConnectionUnblocked = (10, 61, "connection.unblocked") {}
    ConnectionUpdateSecret = (10, 70, "connection.update-secret", sync) { new_secret: longstr, reason: shortstr }
    ConnectionUpdateSecretOk = (10, 71, "connection.update-secret-ok") {}
    // channel (class 20)
    ChannelOpen = (20, 10, "channel.open", sync) { out_of_band: shortstr }
    ChannelOpenOk = (20, 11, "channel.open-ok") { channel_id: longstr }
    ChannelFlow = (20, 20, "channel.flow", sync) { active: bit }
    ChannelFlowOk = (20, 21, "channel.flow-ok") { active: bit }
    ChannelClose = (20, 40, "channel.close", sync) { reply_code: short, reply_text: shortstr, class_id: short, method_id: short }
    ChannelCloseOk = (20, 41, "channel.close-ok") {}
    // access (class 30)
    AccessRequest = (30, 10, "access.request", sync) { realm: shortstr, exclusive: bit, passive: bit, active: bit, write: bit, read: bit }
    AccessRequestOk = (30, 11, "access.request-ok") { ticket: short }
    // exchange (class 40)
    ExchangeDeclare = (40, 10, "exchange.declare", sync) { ticket: short, exchange: shortstr, kind: shortstr, passive: bit, durable: bit, auto_delete: bit, internal: bit, no_wait: bit, arguments: table }
    ExchangeDeclareOk = (40, 11, "exchange.declare-ok") {}
    ExchangeDelete = (40, 20, "exchange.delete", sync) { ticket: short, exchange: shortstr, if_unused: bit, no_wait: bit }
    ExchangeDeleteOk = (40, 21, "exchange.delete-ok") {}
    ExchangeBind = (40, 30, "exchange.bind", sync) { ticket: short, destination: shortstr, source: shortstr, routing_key: shortstr, no_wait: bit, arguments: table }
    ExchangeBindOk = (40, 31, "exchange.bind-ok") {}
    ExchangeUnbind = (40, 40, "exchange.unbind", sync) { ticket: short, destination: shortstr, source: shortstr, routing_key: shortstr, no_wait: bit, arguments: table }
    ExchangeUnbindOk = (40, 51, "exchange.unbind-ok") {}
    // queue (class 50)
    QueueDeclare = (50, 10, "queue.declare", sync) { ticket: short, queue: shortstr, passive: bit, durable: bit, exclusive: bit, auto_delete: bit, no_wait: bit, arguments: table }
    QueueDeclareOk = (50, 11, "queue.declare-ok") { queue: shortstr, message_count: long, consumer_count: long }
    QueueBind = (50, 20, "queue.bind", sync) { ticket: short, queue: shortstr, exchange: shortstr, routing_key: shortstr, no_wait: bit, arguments: table }
    QueueBindOk = (50, 21, "queue.bind-ok") {}
    QueuePurge = (50, 30, "queue.purge", sync) { ticket: short, queue: shortstr, no_wait: bit }
    QueuePurgeOk = (50, 31, "queue.purge-ok") { message_count: long }
    QueueDelete = (50, 40, "queue.delete", sync) { ticket: short, queue: shortstr, if_unused: bit, if_empty: bit, no_wait: bit }
    QueueDeleteOk = (50, 41, "queue.delete-ok") { message_count: long }
    QueueUnbind = (50, 50, "queue.unbind", sync) { ticket: short, queue: shortstr, exchange: shortstr, routing_key: shortstr, arguments: table }
    QueueUnbindOk = (50, 51, "queue.unbind-ok") {}
    // basic (class 60)
    BasicQos = (60, 10, "basic.qos", sync) { prefetch_size: long, prefetch_count: short, global: bit }
    BasicQosOk = (60, 11, "basic.qos-ok") {}
    BasicConsume = (60, 20, "basic.consume", sync) { ticket: short, queue: shortstr, consumer_tag: shortstr, no_local: bit, no_ack: bit, exclusive: bit, no_wait: bit, arguments: table }
    BasicConsumeOk = (60, 21, "basic.consume-ok") { consumer_tag: shortstr }
    BasicCancel = (60, 30, "basic.cancel", sync) { consumer_tag: shortstr, no_wait: bit }
    BasicCancelOk = (60, 31, "basic.cancel-ok") { consumer_tag: shortstr }
    BasicPublish = (60, 40, "basic.publish", content) { ticket: short, exchange: shortstr, routing_key: shortstr, mandatory: bit, immediate: bit }
    BasicReturn = (60, 50, "basic.return", content) { reply_code: short, reply_text: shortstr, exchange: shortstr, routing_key: shortstr }
    BasicDeliver = (60, 60, "basic.deliver", content) { consumer_tag: shortstr, delivery_tag: longlong, redelivered: bit, exchange: shortstr, routing_key: shortstr }
    BasicGet = (60, 70, "basic.get", sync) { ticket: short, queue: shortstr, no_ack: bit }
    BasicGetOk = (60, 71, "basic.get-ok", content) { delivery_tag: longlong, redelivered: bit, exchange: shortstr, routing_key: shortstr, message_count: long }
    BasicGetEmpty = (60, 72, "basic.get-empty") { cluster_id: shortstr }
    BasicAck = (60, 80, "basic.ack") { delivery_tag: longlong, multiple: bit }
    BasicReject = (60, 90, "basic.reject") { delivery_tag: longlong, requeue: bit }
    BasicRecoverAsync = (60, 100, "basic.recover-async") { requeue: bit }
    BasicRecover = (60, 110, "basic.recover", sync) { requeue: bit }
    BasicRecoverOk = (60, 111, "basic.recover-ok") {}
    BasicNack = (60, 120, "basic.nack") { delivery_tag: longlong, multiple: bit, requeue: bit }
    // tx (class 90)
    TxSelect = (90, 10, "tx.select", sync) {}
    TxSelectOk = (90, 11, "tx.select-ok") {}
    TxCommit = (90, 20, "tx.commit", sync) {}
    TxCommitOk = (90, 21, "tx.commit-ok") {}
    TxRollback = (90, 30, "tx.rollback", sync) {}
    TxRollbackOk = (90, 31, "tx.rollback-ok") {}
    // confirm (class 85)
    ConfirmSelect = (85, 10, "confirm.select", sync) { no_wait: bit }
    ConfirmSelectOk = (85, 11, "confirm.select-ok") {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(m: &Method) -> Method {
        let mut buf = BytesMut::new();
        m.encode(&mut buf);
        Method::decode(&buf.freeze()).unwrap()
    }

    #[test]
    fn every_method_round_trips() {
        for seed in [0, 1] {
            let all = samples(seed);
            assert_eq!(all.len(), 66); // every method in the JSON table
            for m in &all {
                assert_eq!(&round_trip(m), m, "{}", m.name());
            }
        }
    }

    #[test]
    fn every_default_method_round_trips() {
        let all = defaults();
        assert_eq!(all.len(), 66); // every method in the JSON table
        for m in &all {
            assert_eq!(&round_trip(m), m, "{}", m.name());
        }
    }

    #[test]
    fn ids_are_unique_and_names_match() {
        let all = samples(0);
        let mut ids: Vec<_> = all.iter().map(|m| (m.class_id(), m.method_id())).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), all.len());
        let content: Vec<_> = all
            .iter()
            .filter(|m| m.has_content())
            .map(Method::name)
            .collect();
        assert_eq!(
            content,
            [
                "basic.publish",
                "basic.return",
                "basic.deliver",
                "basic.get-ok"
            ]
        );
        assert!(Method::from(QueueDeclare::default()).is_synchronous());
        assert!(!Method::from(BasicAck::default()).is_synchronous());
        assert_eq!(Method::from(ExchangeUnbindOk {}).method_id(), 51);
    }

    #[test]
    fn truncated_payload_is_syntax_error_at_every_length() {
        for m in samples(0) {
            let mut buf = BytesMut::new();
            m.encode(&mut buf);
            for len in 4..buf.len() {
                let short = Bytes::copy_from_slice(&buf[..len]);
                let err = Method::decode(&short).unwrap_err();
                assert!(
                    matches!(err, CodecError::Syntax { .. }),
                    "{} at {len}: {err:?}",
                    m.name()
                );
            }
        }
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let payload =
            Bytes::from_static(b"\x00\x3c\x00\x50\x00\x00\x00\x00\x00\x00\x00\x01\x00\xff");
        assert_eq!(
            Method::decode(&payload).unwrap_err(),
            CodecError::Syntax {
                offset: 13,
                what: "trailing bytes after the last argument"
            }
        );
    }

    #[test]
    fn unknown_method_and_short_payload() {
        let err = Method::decode(&Bytes::from_static(b"\x00\x3c\x00\x99")).unwrap_err();
        assert_eq!(
            err,
            CodecError::UnknownMethod {
                class_id: 60,
                method_id: 0x99
            }
        );
        assert_eq!(err.reply_code(), 540);
        let err = Method::decode(&Bytes::from_static(b"\x00\x3c\x00")).unwrap_err();
        assert!(matches!(
            err,
            CodecError::MalformedFrame { frame_type: 1, .. }
        ));
    }

    #[test]
    fn five_bits_share_one_octet() {
        let m: Method = QueueDeclare {
            queue: "q".into(),
            passive: true,
            durable: false,
            exclusive: true,
            auto_delete: false,
            no_wait: true,
            ..Default::default()
        }
        .into();
        let mut buf = BytesMut::new();
        m.encode(&mut buf);
        assert_eq!(
            &buf[..],
            b"\x00\x32\x00\x0a\x00\x00\x01q\x15\x00\x00\x00\x00"
        );
    }
}
