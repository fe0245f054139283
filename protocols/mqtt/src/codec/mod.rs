//! MQTT 3.1, 3.1.1 and 5.0 packets <-> bytes. Pure: no I/O, no async, no core.
//!
//! Grammar (spec 2.1): `packet = fixed-header variable-header payload`, with
//! `fixed-header = type(4 bits) flags(4 bits) remaining-length` and
//! `remaining-length` a variable byte integer (1-4 bytes, at most 268,435,455).
//! Version 5 adds a property block to most variable headers ([`properties`]).
//!
//! The version is sniffed from CONNECT (protocol name `MQIsdp` level 3, or `MQTT`
//! level 4 or 5) and then fixed for the connection: [`Decoder::decode`] must be
//! given it. The maximum packet size is checked from the fixed header, before the
//! body is buffered ([`Decoder::decode`] returns the error while the body is still
//! unread). `Ok(None)` means "need more bytes": how the stream is split never
//! changes what is decoded. Payloads are slices of the read buffer (`Bytes`),
//! so a message body is never copied on the way in.

pub mod error;
pub mod properties;
mod read;
pub mod reason;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use switchyard_driver::Sink;

pub use error::{CodecError, CodecResult};
pub use properties::Properties;
use read::Reader;

/// The largest remaining length the varint can carry.
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// The protocol version of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    /// MQTT 3.1 (`MQIsdp`, level 3): encoded like 3.1.1.
    V31,
    /// MQTT 3.1.1 (`MQTT`, level 4).
    V311,
    /// MQTT 5.0 (`MQTT`, level 5).
    V5,
}

impl Version {
    pub fn is_v5(self) -> bool {
        self == Version::V5
    }

    pub fn level(self) -> u8 {
        match self {
            Version::V31 => 3,
            Version::V311 => 4,
            Version::V5 => 5,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Version::V31 => "MQIsdp",
            _ => "MQTT",
        }
    }
}

/// Quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum QoS {
    #[default]
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_u8(v: u8) -> Option<QoS> {
        match v {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// A will message from CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastWill {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub version: Version,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub properties: Properties,
    pub client_id: String,
    pub will: Option<LastWill>,
    pub username: Option<String>,
    pub password: Option<Bytes>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    /// A v5 reason code or a v3 return code, as the version says.
    pub code: u8,
    pub properties: Properties,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// Empty when a v5 topic alias stands for it.
    pub topic: String,
    /// 0 for QoS 0 (the field is absent on the wire).
    pub packet_id: u16,
    pub properties: Properties,
    pub payload: Bytes,
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP share this shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub packet_id: u16,
    pub reason: u8,
    pub properties: Properties,
}

impl Ack {
    pub fn new(packet_id: u16, reason: u8) -> Self {
        Ack {
            packet_id,
            reason,
            properties: Properties::default(),
        }
    }
}

/// Subscription options of one filter (v5 byte; v3 uses only the QoS bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0 send retained at subscribe, 1 only if the subscription is new, 2 never.
    pub retain_handling: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: u16,
    pub properties: Properties,
    pub filters: Vec<(String, SubOptions)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubAck {
    pub packet_id: u16,
    pub properties: Properties,
    pub codes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: u16,
    pub properties: Properties,
    pub filters: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubAck {
    pub packet_id: u16,
    pub properties: Properties,
    /// v5 only; 3.1.1 UNSUBACK has no payload.
    pub codes: Vec<u8>,
}

/// DISCONNECT (v5 has a reason and properties) and AUTH share this shape.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Disconnect {
    pub reason: u8,
    pub properties: Properties,
}

/// Every packet of the three versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(Ack),
    PubRec(Ack),
    PubRel(Ack),
    PubComp(Ack),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Disconnect),
}

impl Packet {
    /// The packet's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck(_) => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck(_) => "PUBACK",
            Packet::PubRec(_) => "PUBREC",
            Packet::PubRel(_) => "PUBREL",
            Packet::PubComp(_) => "PUBCOMP",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::SubAck(_) => "SUBACK",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::UnsubAck(_) => "UNSUBACK",
            Packet::PingReq => "PINGREQ",
            Packet::PingResp => "PINGRESP",
            Packet::Disconnect(_) => "DISCONNECT",
            Packet::Auth(_) => "AUTH",
        }
    }
}

/// Parses the fixed header at the start of `buf`: (first byte, remaining
/// length, header length), or `None` if more bytes are needed.
fn fixed_header(buf: &[u8]) -> CodecResult<Option<(u8, usize, usize)>> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut len: usize = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((first, len, 2 + i)));
        }
    }
    Err(CodecError::Malformed {
        offset: 1,
        what: "remaining length longer than 4 bytes",
    })
}

/// Decodes packets from a byte stream, one connection's worth.
#[derive(Debug, Clone)]
pub struct Decoder {
    /// `None` until CONNECT was decoded.
    version: Option<Version>,
    max_packet_size: usize,
}

impl Decoder {
    /// A decoder for a new connection, refusing packets larger than
    /// `max_packet_size` bytes (whole packet, fixed header included).
    pub fn new(max_packet_size: usize) -> Self {
        Decoder {
            version: None,
            max_packet_size,
        }
    }

    pub fn version(&self) -> Option<Version> {
        self.version
    }

    /// Changes the size limit (e.g. a larger one once the client logged in).
    pub fn set_max_packet_size(&mut self, max: usize) {
        self.max_packet_size = max;
    }

    /// Takes one packet off the front of `buf`, or returns `Ok(None)` (leaving
    /// `buf` as it is) when it is not complete yet.
    pub fn decode(&mut self, buf: &mut BytesMut) -> CodecResult<Option<Packet>> {
        let Some((first, remaining, header_len)) = fixed_header(buf)? else {
            return Ok(None);
        };
        let total = header_len.saturating_add(remaining);
        if total > self.max_packet_size {
            return Err(CodecError::TooLarge {
                size: total,
                limit: self.max_packet_size,
            });
        }
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let mut frame = buf.split_to(total).freeze();
        frame.advance(header_len);
        let packet = decode_body(first, Reader::new(frame, header_len), self.version)?;
        if let Packet::Connect(c) = &packet {
            self.version = Some(c.version);
        }
        Ok(Some(packet))
    }
}

/// Decodes a whole packet from `bytes` (fixed header included), as a connection
/// of `version` would (`None`: before CONNECT). For tests and tools.
pub fn decode_one(bytes: &[u8], version: Option<Version>) -> CodecResult<Option<Packet>> {
    let mut d = Decoder {
        version,
        max_packet_size: usize::MAX,
    };
    d.decode(&mut BytesMut::from(bytes))
}

fn flags_must_be(first: u8, want: u8) -> CodecResult<()> {
    if first & 0x0f == want {
        Ok(())
    } else {
        Err(CodecError::Malformed {
            offset: 0,
            what: "reserved fixed-header flags",
        })
    }
}

fn decode_body(first: u8, mut r: Reader, version: Option<Version>) -> CodecResult<Packet> {
    let kind = first >> 4;
    let v5 = version.is_some_and(Version::is_v5);
    let packet = match kind {
        1 => {
            flags_must_be(first, 0)?;
            Packet::Connect(Box::new(decode_connect(&mut r)?))
        }
        2 => {
            flags_must_be(first, 0)?;
            let flags = r.u8()?;
            if flags & 0xfe != 0 {
                return Err(CodecError::Malformed {
                    offset: r.offset(),
                    what: "reserved CONNACK flags",
                });
            }
            let code = r.u8()?;
            let properties = if v5 {
                Properties::decode(&mut r, properties::allowed::CONNACK)?
            } else {
                Properties::default()
            };
            Packet::ConnAck(ConnAck {
                session_present: flags & 1 == 1,
                code,
                properties,
            })
        }
        3 => Packet::Publish(decode_publish(first, &mut r, v5)?),
        4 | 5 | 7 => {
            flags_must_be(first, 0)?;
            let ack = decode_ack(&mut r, v5)?;
            match kind {
                4 => Packet::PubAck(ack),
                5 => Packet::PubRec(ack),
                _ => Packet::PubComp(ack),
            }
        }
        6 => {
            flags_must_be(first, 0b0010)?;
            Packet::PubRel(decode_ack(&mut r, v5)?)
        }
        8 => {
            flags_must_be(first, 0b0010)?;
            let packet_id = packet_id(&mut r)?;
            let properties = if v5 {
                Properties::decode(&mut r, properties::allowed::SUBSCRIBE)?
            } else {
                Properties::default()
            };
            if properties.subscription_identifiers.len() > 1 {
                return Err(CodecError::Protocol(
                    "more than one subscription identifier in SUBSCRIBE",
                ));
            }
            let mut filters = Vec::new();
            while r.has_remaining() {
                let filter = r.string()?;
                let at = r.offset();
                let o = r.u8()?;
                let reserved = if v5 { 0xc0 } else { 0xfc };
                let qos = QoS::from_u8(o & 0x03);
                let rh = (o >> 4) & 0x03;
                let (Some(qos), true, true) = (qos, o & reserved == 0, rh != 3) else {
                    return Err(CodecError::Malformed {
                        offset: at,
                        what: "invalid subscription options",
                    });
                };
                filters.push((
                    filter,
                    SubOptions {
                        qos,
                        no_local: v5 && o & 0x04 != 0,
                        retain_as_published: v5 && o & 0x08 != 0,
                        retain_handling: if v5 { rh } else { 0 },
                    },
                ));
            }
            if filters.is_empty() {
                return Err(CodecError::Protocol("SUBSCRIBE without a topic filter"));
            }
            Packet::Subscribe(Subscribe {
                packet_id,
                properties,
                filters,
            })
        }
        9 => {
            flags_must_be(first, 0)?;
            let packet_id = packet_id(&mut r)?;
            let properties = if v5 {
                Properties::decode(&mut r, properties::allowed::ACK)?
            } else {
                Properties::default()
            };
            let codes = r.rest().to_vec();
            Packet::SubAck(SubAck {
                packet_id,
                properties,
                codes,
            })
        }
        10 => {
            flags_must_be(first, 0b0010)?;
            let packet_id = packet_id(&mut r)?;
            let properties = if v5 {
                Properties::decode(&mut r, properties::allowed::UNSUBSCRIBE)?
            } else {
                Properties::default()
            };
            let mut filters = Vec::new();
            while r.has_remaining() {
                filters.push(r.string()?);
            }
            if filters.is_empty() {
                return Err(CodecError::Protocol("UNSUBSCRIBE without a topic filter"));
            }
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                properties,
                filters,
            })
        }
        11 => {
            flags_must_be(first, 0)?;
            let packet_id = packet_id(&mut r)?;
            let (properties, codes) = if v5 {
                (
                    Properties::decode(&mut r, properties::allowed::ACK)?,
                    r.rest().to_vec(),
                )
            } else {
                (Properties::default(), Vec::new())
            };
            Packet::UnsubAck(UnsubAck {
                packet_id,
                properties,
                codes,
            })
        }
        12 | 13 => {
            flags_must_be(first, 0)?;
            if r.has_remaining() {
                return Err(CodecError::Malformed {
                    offset: 1,
                    what: "PINGREQ/PINGRESP with a body",
                });
            }
            if kind == 12 {
                Packet::PingReq
            } else {
                Packet::PingResp
            }
        }
        14 => {
            flags_must_be(first, 0)?;
            let d = decode_reason_props(&mut r, v5, properties::allowed::DISCONNECT)?;
            Packet::Disconnect(d)
        }
        15 if v5 => {
            flags_must_be(first, 0)?;
            Packet::Auth(decode_reason_props(
                &mut r,
                true,
                properties::allowed::AUTH,
            )?)
        }
        _ => {
            return Err(CodecError::Malformed {
                offset: 0,
                what: "unknown packet type",
            })
        }
    };
    if r.has_remaining() {
        return Err(CodecError::Malformed {
            offset: r.offset(),
            what: "bytes after the end of the packet",
        });
    }
    Ok(packet)
}

fn packet_id(r: &mut Reader) -> CodecResult<u16> {
    let at = r.offset();
    match r.u16()? {
        0 => Err(CodecError::Malformed {
            offset: at,
            what: "packet identifier 0",
        }),
        id => Ok(id),
    }
}

/// v5 reason code and properties, both optional at the end of the packet.
fn decode_reason_props(r: &mut Reader, v5: bool, allowed: &[u8]) -> CodecResult<Disconnect> {
    if !v5 || !r.has_remaining() {
        return Ok(Disconnect::default());
    }
    let reason = r.u8()?;
    let properties = if r.has_remaining() {
        Properties::decode(r, allowed)?
    } else {
        Properties::default()
    };
    Ok(Disconnect { reason, properties })
}

fn decode_ack(r: &mut Reader, v5: bool) -> CodecResult<Ack> {
    let packet_id = packet_id(r)?;
    let d = decode_reason_props(r, v5, properties::allowed::ACK)?;
    Ok(Ack {
        packet_id,
        reason: d.reason,
        properties: d.properties,
    })
}

fn decode_publish(first: u8, r: &mut Reader, v5: bool) -> CodecResult<Publish> {
    let dup = first & 0x08 != 0;
    let retain = first & 0x01 != 0;
    let qos = QoS::from_u8((first >> 1) & 0x03).ok_or(CodecError::Malformed {
        offset: 0,
        what: "PUBLISH with QoS 3",
    })?;
    if dup && qos == QoS::AtMostOnce {
        return Err(CodecError::Malformed {
            offset: 0,
            what: "DUP set on a QoS 0 PUBLISH",
        });
    }
    let topic = r.string()?;
    let packet_id = if qos == QoS::AtMostOnce {
        0
    } else {
        packet_id(r)?
    };
    let properties = if v5 {
        Properties::decode(r, properties::allowed::PUBLISH)?
    } else {
        Properties::default()
    };
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        packet_id,
        properties,
        payload: r.rest(),
    })
}

fn decode_connect(r: &mut Reader) -> CodecResult<Connect> {
    let name = r.string()?;
    let level = r.u8()?;
    let version = match (name.as_str(), level) {
        ("MQIsdp", 3) => Version::V31,
        ("MQTT", 4) => Version::V311,
        ("MQTT", 5) => Version::V5,
        _ => return Err(CodecError::UnsupportedProtocol { name, level }),
    };
    let v5 = version.is_v5();
    let at = r.offset();
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(CodecError::Malformed {
            offset: at,
            what: "reserved CONNECT flag set",
        });
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(CodecError::Malformed {
            offset: at,
            what: "will QoS or retain without a will",
        });
    }
    let will_qos = QoS::from_u8(will_qos).ok_or(CodecError::Malformed {
        offset: at,
        what: "will QoS 3",
    })?;
    if !v5 && has_password && !has_username {
        return Err(CodecError::Malformed {
            offset: at,
            what: "password without a user name",
        });
    }
    let keep_alive = r.u16()?;
    let properties = if v5 {
        Properties::decode(r, properties::allowed::CONNECT)?
    } else {
        Properties::default()
    };
    let client_id = r.string()?;
    let will = if will_flag {
        let properties = if v5 {
            Properties::decode(r, properties::allowed::WILL)?
        } else {
            Properties::default()
        };
        let topic = r.string()?;
        let payload = r.binary()?;
        Some(LastWill {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(r.string()?)
    } else {
        None
    };
    let password = if has_password {
        Some(r.binary()?)
    } else {
        None
    };
    Ok(Connect {
        version,
        clean_start,
        keep_alive,
        properties,
        client_id,
        will,
        username,
        password,
    })
}

// ---------------------------------------------------------------- encoding

pub(crate) fn put_varint(out: &mut BytesMut, mut v: u32) {
    loop {
        let mut b = (v & 0x7f) as u8;
        v >>= 7;
        if v != 0 {
            b |= 0x80;
        }
        out.put_u8(b);
        if v == 0 {
            break;
        }
    }
}

/// Writes a length-prefixed string; longer than 65,535 bytes is cut at a char
/// boundary (callers validate lengths first; this only keeps the output sane).
pub(crate) fn put_string(out: &mut BytesMut, s: &str) {
    let mut end = s.len().min(usize::from(u16::MAX));
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let s = s.get(..end).unwrap_or("");
    out.put_u16(u16::try_from(s.len()).unwrap_or(u16::MAX));
    out.put_slice(s.as_bytes());
}

pub(crate) fn put_binary(out: &mut BytesMut, b: &[u8]) {
    let b = b.get(..b.len().min(usize::from(u16::MAX))).unwrap_or(b);
    out.put_u16(u16::try_from(b.len()).unwrap_or(u16::MAX));
    out.put_slice(b);
}

/// The encoded size of a packet would exceed the limit given to [`encode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("encoded packet of {size} bytes exceeds the peer's maximum of {limit}")]
pub struct TooLargeForPeer {
    pub size: usize,
    pub limit: usize,
}

/// Encodes `packet` for a connection of `version` and appends it to `out`,
/// unless it would be larger than `limit` bytes (then `out` is unchanged).
pub fn encode(
    packet: &Packet,
    version: Version,
    limit: usize,
    out: &mut impl Sink,
) -> Result<usize, TooLargeForPeer> {
    let v5 = version.is_v5();
    // The variable header (and small payloads) go to a scratch buffer so the
    // remaining length is known; a PUBLISH payload is appended straight to `out`
    // (a large one shared, not copied: see `switchyard_driver::Output`).
    let mut vh = BytesMut::new();
    let mut payload: Option<&Bytes> = None;
    let first: u8 = match packet {
        Packet::Connect(c) => {
            put_string(&mut vh, c.version.name());
            vh.put_u8(c.version.level());
            let mut flags = 0u8;
            if c.clean_start {
                flags |= 0x02;
            }
            if let Some(w) = &c.will {
                flags |= 0x04 | (w.qos.as_u8() << 3);
                if w.retain {
                    flags |= 0x20;
                }
            }
            if c.password.is_some() {
                flags |= 0x40;
            }
            if c.username.is_some() {
                flags |= 0x80;
            }
            vh.put_u8(flags);
            vh.put_u16(c.keep_alive);
            let cv5 = c.version.is_v5();
            if cv5 {
                c.properties.encode(&mut vh);
            }
            put_string(&mut vh, &c.client_id);
            if let Some(w) = &c.will {
                if cv5 {
                    w.properties.encode(&mut vh);
                }
                put_string(&mut vh, &w.topic);
                put_binary(&mut vh, &w.payload);
            }
            if let Some(u) = &c.username {
                put_string(&mut vh, u);
            }
            if let Some(p) = &c.password {
                put_binary(&mut vh, p);
            }
            0x10
        }
        Packet::ConnAck(a) => {
            vh.put_u8(u8::from(a.session_present));
            vh.put_u8(a.code);
            if v5 {
                a.properties.encode(&mut vh);
            }
            0x20
        }
        Packet::Publish(p) => {
            put_string(&mut vh, &p.topic);
            if p.qos != QoS::AtMostOnce {
                vh.put_u16(p.packet_id);
            }
            if v5 {
                p.properties.encode(&mut vh);
            }
            payload = Some(&p.payload);
            let mut first = 0x30 | (p.qos.as_u8() << 1);
            if p.dup && p.qos != QoS::AtMostOnce {
                first |= 0x08;
            }
            if p.retain {
                first |= 0x01;
            }
            first
        }
        Packet::PubAck(a) => encode_ack(&mut vh, a, v5, 0x40),
        Packet::PubRec(a) => encode_ack(&mut vh, a, v5, 0x50),
        Packet::PubRel(a) => encode_ack(&mut vh, a, v5, 0x62),
        Packet::PubComp(a) => encode_ack(&mut vh, a, v5, 0x70),
        Packet::Subscribe(s) => {
            vh.put_u16(s.packet_id);
            if v5 {
                s.properties.encode(&mut vh);
            }
            for (f, o) in &s.filters {
                put_string(&mut vh, f);
                let mut b = o.qos.as_u8();
                if v5 {
                    b |= u8::from(o.no_local) << 2
                        | u8::from(o.retain_as_published) << 3
                        | (o.retain_handling & 3) << 4;
                }
                vh.put_u8(b);
            }
            0x82
        }
        Packet::SubAck(s) => {
            vh.put_u16(s.packet_id);
            if v5 {
                s.properties.encode(&mut vh);
            }
            vh.put_slice(&s.codes);
            0x90
        }
        Packet::Unsubscribe(u) => {
            vh.put_u16(u.packet_id);
            if v5 {
                u.properties.encode(&mut vh);
            }
            for f in &u.filters {
                put_string(&mut vh, f);
            }
            0xa2
        }
        Packet::UnsubAck(u) => {
            vh.put_u16(u.packet_id);
            if v5 {
                u.properties.encode(&mut vh);
                vh.put_slice(&u.codes);
            }
            0xb0
        }
        Packet::PingReq => 0xc0,
        Packet::PingResp => 0xd0,
        Packet::Disconnect(d) => {
            // Always with a reason code: rumqttc's v5 client cannot decode a
            // DISCONNECT without one (DESIGN.md).
            if v5 {
                vh.put_u8(d.reason);
                d.properties.encode(&mut vh);
            }
            0xe0
        }
        Packet::Auth(d) => {
            vh.put_u8(d.reason);
            d.properties.encode(&mut vh);
            0xf0
        }
    };
    let payload_len = payload.map_or(0, Bytes::len);
    let remaining = vh.len().saturating_add(payload_len);
    let header = 1 + varint_len(remaining);
    let size = header.saturating_add(remaining);
    if size > limit || remaining > MAX_REMAINING_LENGTH {
        return Err(TooLargeForPeer { size, limit });
    }
    let copied = if out.shares(payload_len) {
        size.saturating_sub(payload_len)
    } else {
        size
    };
    let buf = out.bytes();
    buf.reserve(copied);
    buf.put_u8(first);
    put_varint(buf, u32::try_from(remaining).unwrap_or(u32::MAX));
    buf.extend_from_slice(&vh);
    if let Some(payload) = payload {
        out.put_body(payload);
    }
    Ok(size)
}

fn encode_ack(vh: &mut BytesMut, a: &Ack, v5: bool, first: u8) -> u8 {
    vh.put_u16(a.packet_id);
    if v5 && (a.reason != 0 || !a.properties.is_empty()) {
        vh.put_u8(a.reason);
        if !a.properties.is_empty() {
            a.properties.encode(vh);
        }
    }
    first
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Encodes with no size limit (tests, tools, our own packets to a peer that set
/// none).
pub fn encode_unlimited(packet: &Packet, version: Version, out: &mut impl Sink) {
    // Only `limit` can make encode fail, and it is unlimited here.
    let _ = encode(packet, version, usize::MAX, out);
}
