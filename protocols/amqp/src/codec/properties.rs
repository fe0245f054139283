//! The content header's basic properties (class 60), decoded straight into the
//! core's [`Properties`].
//!
//! Grammar (AMQP 0-9-1 sections 4.2.6.1 and 4.2.6.2):
//!
//! ```text
//! content-header  = class-id weight body-size property-flags property-list
//! property-flags  = 15*bit continuation-bit    ; one short, bit 15 first
//!                   *(15*bit continuation-bit) ; further words while bit 0 is set
//! property-list   = *amqp-field                ; only the properties whose flag is set,
//!                                              ; in flag order
//! ```
//!
//! Basic's 14 properties use flag bits 15 down to 2:
//!
//! ```text
//! 15 content-type shortstr    14 content-encoding shortstr   13 headers table
//! 12 delivery-mode octet      11 priority octet              10 correlation-id shortstr
//!  9 reply-to shortstr         8 expiration shortstr          7 message-id shortstr
//!  6 timestamp timestamp       5 type shortstr                4 user-id shortstr
//!  3 app-id shortstr           2 cluster-id shortstr
//! ```
//!
//! Bit 1 and every bit of a continuation word name properties basic does not
//! have; their values have an unknown type and length, so they cannot be
//! skipped. A set unknown bit is a syntax error (as in RabbitMQ); all-zero
//! continuation words are accepted and ignored.

use bytes::{BufMut, BytesMut};
use switchyard_core::message::Properties;

use super::types::{put_shortstr, put_table, Reader};
use super::CodecError;

const CONTENT_TYPE: u16 = 1 << 15;
const CONTENT_ENCODING: u16 = 1 << 14;
const HEADERS: u16 = 1 << 13;
const DELIVERY_MODE: u16 = 1 << 12;
const PRIORITY: u16 = 1 << 11;
const CORRELATION_ID: u16 = 1 << 10;
const REPLY_TO: u16 = 1 << 9;
const EXPIRATION: u16 = 1 << 8;
const MESSAGE_ID: u16 = 1 << 7;
const TIMESTAMP: u16 = 1 << 6;
const KIND: u16 = 1 << 5;
const USER_ID: u16 = 1 << 4;
const APP_ID: u16 = 1 << 3;
const CLUSTER_ID: u16 = 1 << 2;
const UNUSED: u16 = 1 << 1;
const CONTINUATION: u16 = 1;

pub(crate) fn decode_properties(r: &mut Reader<'_>) -> Result<Properties, CodecError> {
    let flags_at = r.offset();
    let flags = r.short()?;
    if flags & UNUSED != 0 {
        return Err(CodecError::Syntax {
            offset: flags_at,
            what: "unknown basic property flag set",
        });
    }
    let mut more = flags & CONTINUATION != 0;
    while more {
        let at = r.offset();
        let word = r.short()?;
        if word & !CONTINUATION != 0 {
            return Err(CodecError::Syntax {
                offset: at,
                what: "unknown basic property flag set",
            });
        }
        more = word & CONTINUATION != 0;
    }

    let has = |bit: u16| flags & bit != 0;
    let mut p = Properties::default();
    // The order of these reads is the wire order; do not sort them.
    if has(CONTENT_TYPE) {
        p.content_type = Some(r.shortstr_string()?);
    }
    if has(CONTENT_ENCODING) {
        p.content_encoding = Some(r.shortstr_string()?);
    }
    if has(HEADERS) {
        p.headers = Some(r.table()?);
    }
    if has(DELIVERY_MODE) {
        p.delivery_mode = Some(r.octet()?);
    }
    if has(PRIORITY) {
        p.priority = Some(r.octet()?);
    }
    if has(CORRELATION_ID) {
        p.correlation_id = Some(r.shortstr_string()?);
    }
    if has(REPLY_TO) {
        p.reply_to = Some(r.shortstr_string()?);
    }
    if has(EXPIRATION) {
        p.expiration = Some(r.shortstr_string()?);
    }
    if has(MESSAGE_ID) {
        p.message_id = Some(r.shortstr_string()?);
    }
    if has(TIMESTAMP) {
        p.timestamp = Some(r.timestamp()?);
    }
    if has(KIND) {
        p.kind = Some(r.shortstr_string()?);
    }
    if has(USER_ID) {
        p.user_id = Some(r.shortstr_string()?);
    }
    if has(APP_ID) {
        p.app_id = Some(r.shortstr_string()?);
    }
    if has(CLUSTER_ID) {
        p.cluster_id = Some(r.shortstr_string()?);
    }
    Ok(p)
}

pub(crate) fn encode_properties(buf: &mut BytesMut, p: &Properties) {
    let flag = |present: bool, bit: u16| if present { bit } else { 0 };
    let flags = flag(p.content_type.is_some(), CONTENT_TYPE)
        | flag(p.content_encoding.is_some(), CONTENT_ENCODING)
        | flag(p.headers.is_some(), HEADERS)
        | flag(p.delivery_mode.is_some(), DELIVERY_MODE)
        | flag(p.priority.is_some(), PRIORITY)
        | flag(p.correlation_id.is_some(), CORRELATION_ID)
        | flag(p.reply_to.is_some(), REPLY_TO)
        | flag(p.expiration.is_some(), EXPIRATION)
        | flag(p.message_id.is_some(), MESSAGE_ID)
        | flag(p.timestamp.is_some(), TIMESTAMP)
        | flag(p.kind.is_some(), KIND)
        | flag(p.user_id.is_some(), USER_ID)
        | flag(p.app_id.is_some(), APP_ID)
        | flag(p.cluster_id.is_some(), CLUSTER_ID);
    buf.put_u16(flags);
    if let Some(v) = &p.content_type {
        put_shortstr(buf, v);
    }
    if let Some(v) = &p.content_encoding {
        put_shortstr(buf, v);
    }
    if let Some(v) = &p.headers {
        put_table(buf, v);
    }
    if let Some(v) = p.delivery_mode {
        buf.put_u8(v);
    }
    if let Some(v) = p.priority {
        buf.put_u8(v);
    }
    if let Some(v) = &p.correlation_id {
        put_shortstr(buf, v);
    }
    if let Some(v) = &p.reply_to {
        put_shortstr(buf, v);
    }
    if let Some(v) = &p.expiration {
        put_shortstr(buf, v);
    }
    if let Some(v) = &p.message_id {
        put_shortstr(buf, v);
    }
    if let Some(v) = p.timestamp {
        buf.put_u64(v);
    }
    if let Some(v) = &p.kind {
        put_shortstr(buf, v);
    }
    if let Some(v) = &p.user_id {
        put_shortstr(buf, v);
    }
    if let Some(v) = &p.app_id {
        put_shortstr(buf, v);
    }
    if let Some(v) = &p.cluster_id {
        put_shortstr(buf, v);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use switchyard_core::field::{FieldTable, FieldValue};

    use super::*;

    fn decode(bytes: &[u8]) -> Result<Properties, CodecError> {
        let data = Bytes::copy_from_slice(bytes);
        let mut r = Reader::new(&data);
        let p = decode_properties(&mut r)?;
        r.finish()?;
        Ok(p)
    }

    fn all_fourteen() -> Properties {
        Properties {
            content_type: Some("application/json".into()),
            content_encoding: Some("gzip".into()),
            headers: Some(FieldTable(vec![("x-retry".into(), FieldValue::I32(3))])),
            delivery_mode: Some(2),
            priority: Some(9),
            correlation_id: Some("corr".into()),
            reply_to: Some("amq.rabbitmq.reply-to".into()),
            expiration: Some("60000".into()),
            message_id: Some("m-1".into()),
            timestamp: Some(1_700_000_000),
            kind: Some("order.created".into()),
            user_id: Some("guest".into()),
            app_id: Some("shop".into()),
            cluster_id: Some("c1".into()),
        }
    }

    #[test]
    fn all_fourteen_round_trip() {
        let p = all_fourteen();
        let mut buf = BytesMut::new();
        encode_properties(&mut buf, &p);
        assert_eq!(&buf[..2], &[0xff, 0xfc]);
        assert_eq!(decode(&buf).unwrap(), p);
    }

    #[test]
    fn empty_properties_are_a_zero_flag_word() {
        let mut buf = BytesMut::new();
        encode_properties(&mut buf, &Properties::default());
        assert_eq!(&buf[..], &[0, 0]);
        assert_eq!(decode(&buf).unwrap(), Properties::default());
    }

    #[test]
    fn type_property_maps_to_kind() {
        let p = decode(b"\x00\x20\x03abc").unwrap();
        assert_eq!(p.kind.as_deref(), Some("abc"));
    }

    #[test]
    fn zero_continuation_words_are_skipped() {
        // delivery-mode + continuation, then an empty continuation word, then the value.
        let p = decode(b"\x10\x01\x00\x00\x02").unwrap();
        assert_eq!(p.delivery_mode, Some(2));
    }

    #[test]
    fn unknown_flags_are_rejected() {
        assert!(matches!(
            decode(b"\x00\x02"),
            Err(CodecError::Syntax { offset: 0, .. })
        ));
        assert!(matches!(
            decode(b"\x00\x01\x80\x00"),
            Err(CodecError::Syntax { offset: 2, .. })
        ));
        // A continuation flag with no following word is a truncated payload.
        assert!(matches!(
            decode(b"\x00\x01"),
            Err(CodecError::Syntax { .. })
        ));
    }

    #[test]
    fn flag_without_value_is_syntax_error() {
        assert!(matches!(
            decode(b"\x80\x00"),
            Err(CodecError::Syntax { offset: 2, .. })
        ));
    }
}
