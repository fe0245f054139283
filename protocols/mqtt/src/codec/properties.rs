//! MQTT 5 properties (spec 2.2.2): `property-length varint, (id varint, value)*`.
//!
//! One struct holds every property; each packet type allows a subset, checked on
//! decode ([`allowed`]) because a property in the wrong packet is a malformed
//! packet. Every property may appear once, except User Property (any number, order
//! kept) and Subscription Identifier (repeated in PUBLISH, once in SUBSCRIBE).

use bytes::{BufMut, Bytes, BytesMut};

use super::error::{CodecError, CodecResult};
use super::read::Reader;
use super::{put_binary, put_string, put_varint};

pub mod id {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

/// Which properties each packet may carry (spec 2.2.2.2).
pub mod allowed {
    use super::id::*;
    pub const CONNECT: &[u8] = &[
        SESSION_EXPIRY_INTERVAL,
        RECEIVE_MAXIMUM,
        MAXIMUM_PACKET_SIZE,
        TOPIC_ALIAS_MAXIMUM,
        REQUEST_RESPONSE_INFORMATION,
        REQUEST_PROBLEM_INFORMATION,
        USER_PROPERTY,
        AUTHENTICATION_METHOD,
        AUTHENTICATION_DATA,
    ];
    pub const WILL: &[u8] = &[
        WILL_DELAY_INTERVAL,
        PAYLOAD_FORMAT_INDICATOR,
        MESSAGE_EXPIRY_INTERVAL,
        CONTENT_TYPE,
        RESPONSE_TOPIC,
        CORRELATION_DATA,
        USER_PROPERTY,
    ];
    pub const CONNACK: &[u8] = &[
        SESSION_EXPIRY_INTERVAL,
        RECEIVE_MAXIMUM,
        MAXIMUM_QOS,
        RETAIN_AVAILABLE,
        MAXIMUM_PACKET_SIZE,
        ASSIGNED_CLIENT_IDENTIFIER,
        TOPIC_ALIAS_MAXIMUM,
        REASON_STRING,
        USER_PROPERTY,
        WILDCARD_SUBSCRIPTION_AVAILABLE,
        SUBSCRIPTION_IDENTIFIER_AVAILABLE,
        SHARED_SUBSCRIPTION_AVAILABLE,
        SERVER_KEEP_ALIVE,
        RESPONSE_INFORMATION,
        SERVER_REFERENCE,
        AUTHENTICATION_METHOD,
        AUTHENTICATION_DATA,
    ];
    pub const PUBLISH: &[u8] = &[
        PAYLOAD_FORMAT_INDICATOR,
        MESSAGE_EXPIRY_INTERVAL,
        TOPIC_ALIAS,
        RESPONSE_TOPIC,
        CORRELATION_DATA,
        USER_PROPERTY,
        SUBSCRIPTION_IDENTIFIER,
        CONTENT_TYPE,
    ];
    pub const ACK: &[u8] = &[REASON_STRING, USER_PROPERTY];
    pub const SUBSCRIBE: &[u8] = &[SUBSCRIPTION_IDENTIFIER, USER_PROPERTY];
    pub const UNSUBSCRIBE: &[u8] = &[USER_PROPERTY];
    pub const DISCONNECT: &[u8] = &[
        SESSION_EXPIRY_INTERVAL,
        REASON_STRING,
        USER_PROPERTY,
        SERVER_REFERENCE,
    ];
    pub const AUTH: &[u8] = &[
        AUTHENTICATION_METHOD,
        AUTHENTICATION_DATA,
        REASON_STRING,
        USER_PROPERTY,
    ];
}

/// Every MQTT 5 property, all optional. Packets of 3.1.1 carry none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    /// Repeated in a PUBLISH to a client (one per matching subscription).
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval: Option<u32>,
    pub assigned_client_identifier: Option<String>,
    pub server_keep_alive: Option<u16>,
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<u8>,
    pub will_delay_interval: Option<u32>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<String>,
    pub server_reference: Option<String>,
    pub reason_string: Option<String>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user_properties: Vec<(String, String)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
}

/// Stores `v` in `slot` unless it was already set (a repeated property).
fn once<T>(slot: &mut Option<T>, v: T) -> CodecResult<()> {
    if slot.is_some() {
        return Err(CodecError::Protocol("property included more than once"));
    }
    *slot = Some(v);
    Ok(())
}

/// A byte property whose only valid values are 0 and 1.
fn flag(r: &mut Reader) -> CodecResult<u8> {
    let at = r.offset();
    match r.u8()? {
        v @ (0 | 1) => Ok(v),
        _ => Err(CodecError::Malformed {
            offset: at,
            what: "property value must be 0 or 1",
        }),
    }
}

impl Properties {
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }

    /// Reads a property block, refusing properties not in `allowed`.
    pub(crate) fn decode(r: &mut Reader, allowed: &[u8]) -> CodecResult<Properties> {
        let len = r.varint()?;
        let mut block = r.sub(len as usize)?;
        let mut p = Properties::default();
        while block.has_remaining() {
            let at = block.offset();
            let id = block.varint()?;
            let id = u8::try_from(id)
                .ok()
                .filter(|id| allowed.contains(id))
                .ok_or(CodecError::Malformed {
                    offset: at,
                    what: "property not allowed in this packet",
                })?;
            let b = &mut block;
            match id {
                id::PAYLOAD_FORMAT_INDICATOR => once(&mut p.payload_format_indicator, flag(b)?)?,
                id::MESSAGE_EXPIRY_INTERVAL => once(&mut p.message_expiry_interval, b.u32()?)?,
                id::CONTENT_TYPE => once(&mut p.content_type, b.string()?)?,
                id::RESPONSE_TOPIC => once(&mut p.response_topic, b.string()?)?,
                id::CORRELATION_DATA => once(&mut p.correlation_data, b.binary()?)?,
                id::SUBSCRIPTION_IDENTIFIER => {
                    let at = b.offset();
                    let v = b.varint()?;
                    if v == 0 {
                        return Err(CodecError::Malformed {
                            offset: at,
                            what: "subscription identifier 0",
                        });
                    }
                    p.subscription_identifiers.push(v);
                }
                id::SESSION_EXPIRY_INTERVAL => once(&mut p.session_expiry_interval, b.u32()?)?,
                id::ASSIGNED_CLIENT_IDENTIFIER => {
                    once(&mut p.assigned_client_identifier, b.string()?)?
                }
                id::SERVER_KEEP_ALIVE => once(&mut p.server_keep_alive, b.u16()?)?,
                id::AUTHENTICATION_METHOD => once(&mut p.authentication_method, b.string()?)?,
                id::AUTHENTICATION_DATA => once(&mut p.authentication_data, b.binary()?)?,
                id::REQUEST_PROBLEM_INFORMATION => {
                    once(&mut p.request_problem_information, flag(b)?)?
                }
                id::WILL_DELAY_INTERVAL => once(&mut p.will_delay_interval, b.u32()?)?,
                id::REQUEST_RESPONSE_INFORMATION => {
                    once(&mut p.request_response_information, flag(b)?)?
                }
                id::RESPONSE_INFORMATION => once(&mut p.response_information, b.string()?)?,
                id::SERVER_REFERENCE => once(&mut p.server_reference, b.string()?)?,
                id::REASON_STRING => once(&mut p.reason_string, b.string()?)?,
                id::RECEIVE_MAXIMUM => {
                    let at = b.offset();
                    let v = b.u16()?;
                    if v == 0 {
                        return Err(CodecError::Malformed {
                            offset: at,
                            what: "receive maximum 0",
                        });
                    }
                    once(&mut p.receive_maximum, v)?
                }
                id::TOPIC_ALIAS_MAXIMUM => once(&mut p.topic_alias_maximum, b.u16()?)?,
                id::TOPIC_ALIAS => once(&mut p.topic_alias, b.u16()?)?,
                id::MAXIMUM_QOS => once(&mut p.maximum_qos, flag(b)?)?,
                id::RETAIN_AVAILABLE => once(&mut p.retain_available, flag(b)?)?,
                id::USER_PROPERTY => {
                    let k = b.string()?;
                    let v = b.string()?;
                    p.user_properties.push((k, v));
                }
                id::MAXIMUM_PACKET_SIZE => {
                    let at = b.offset();
                    let v = b.u32()?;
                    if v == 0 {
                        return Err(CodecError::Malformed {
                            offset: at,
                            what: "maximum packet size 0",
                        });
                    }
                    once(&mut p.maximum_packet_size, v)?
                }
                id::WILDCARD_SUBSCRIPTION_AVAILABLE => {
                    once(&mut p.wildcard_subscription_available, flag(b)?)?
                }
                id::SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                    once(&mut p.subscription_identifier_available, flag(b)?)?
                }
                id::SHARED_SUBSCRIPTION_AVAILABLE => {
                    once(&mut p.shared_subscription_available, flag(b)?)?
                }
                _ => {
                    return Err(CodecError::Malformed {
                        offset: at,
                        what: "unknown property",
                    })
                }
            }
        }
        Ok(p)
    }

    /// Writes the property block (length prefix included).
    pub(crate) fn encode(&self, out: &mut BytesMut) {
        let mut b = BytesMut::new();
        let byte = |b: &mut BytesMut, id: u8, v: Option<u8>| {
            if let Some(v) = v {
                b.put_u8(id);
                b.put_u8(v);
            }
        };
        let u16p = |b: &mut BytesMut, id: u8, v: Option<u16>| {
            if let Some(v) = v {
                b.put_u8(id);
                b.put_u16(v);
            }
        };
        let u32p = |b: &mut BytesMut, id: u8, v: Option<u32>| {
            if let Some(v) = v {
                b.put_u8(id);
                b.put_u32(v);
            }
        };
        let strp = |b: &mut BytesMut, id: u8, v: &Option<String>| {
            if let Some(v) = v {
                b.put_u8(id);
                put_string(b, v);
            }
        };
        let binp = |b: &mut BytesMut, id: u8, v: &Option<Bytes>| {
            if let Some(v) = v {
                b.put_u8(id);
                put_binary(b, v);
            }
        };
        byte(
            &mut b,
            id::PAYLOAD_FORMAT_INDICATOR,
            self.payload_format_indicator,
        );
        u32p(
            &mut b,
            id::MESSAGE_EXPIRY_INTERVAL,
            self.message_expiry_interval,
        );
        strp(&mut b, id::CONTENT_TYPE, &self.content_type);
        strp(&mut b, id::RESPONSE_TOPIC, &self.response_topic);
        binp(&mut b, id::CORRELATION_DATA, &self.correlation_data);
        for sid in &self.subscription_identifiers {
            b.put_u8(id::SUBSCRIPTION_IDENTIFIER);
            put_varint(&mut b, *sid);
        }
        u32p(
            &mut b,
            id::SESSION_EXPIRY_INTERVAL,
            self.session_expiry_interval,
        );
        strp(
            &mut b,
            id::ASSIGNED_CLIENT_IDENTIFIER,
            &self.assigned_client_identifier,
        );
        u16p(&mut b, id::SERVER_KEEP_ALIVE, self.server_keep_alive);
        strp(
            &mut b,
            id::AUTHENTICATION_METHOD,
            &self.authentication_method,
        );
        binp(&mut b, id::AUTHENTICATION_DATA, &self.authentication_data);
        byte(
            &mut b,
            id::REQUEST_PROBLEM_INFORMATION,
            self.request_problem_information,
        );
        u32p(&mut b, id::WILL_DELAY_INTERVAL, self.will_delay_interval);
        byte(
            &mut b,
            id::REQUEST_RESPONSE_INFORMATION,
            self.request_response_information,
        );
        strp(&mut b, id::RESPONSE_INFORMATION, &self.response_information);
        strp(&mut b, id::SERVER_REFERENCE, &self.server_reference);
        strp(&mut b, id::REASON_STRING, &self.reason_string);
        u16p(&mut b, id::RECEIVE_MAXIMUM, self.receive_maximum);
        u16p(&mut b, id::TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        u16p(&mut b, id::TOPIC_ALIAS, self.topic_alias);
        byte(&mut b, id::MAXIMUM_QOS, self.maximum_qos);
        byte(&mut b, id::RETAIN_AVAILABLE, self.retain_available);
        for (k, v) in &self.user_properties {
            b.put_u8(id::USER_PROPERTY);
            put_string(&mut b, k);
            put_string(&mut b, v);
        }
        u32p(&mut b, id::MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        byte(
            &mut b,
            id::WILDCARD_SUBSCRIPTION_AVAILABLE,
            self.wildcard_subscription_available,
        );
        byte(
            &mut b,
            id::SUBSCRIPTION_IDENTIFIER_AVAILABLE,
            self.subscription_identifier_available,
        );
        byte(
            &mut b,
            id::SHARED_SUBSCRIPTION_AVAILABLE,
            self.shared_subscription_available,
        );
        put_varint(out, u32::try_from(b.len()).unwrap_or(u32::MAX));
        out.extend_from_slice(&b);
    }
}
