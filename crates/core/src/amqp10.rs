//! AMQP 1.0 messages, as the Stream protocol carries them: every message a
//! stream client publishes or receives is an AMQP 1.0 bare message (sections
//! header, message-annotations, properties, application-properties, data or
//! amqp-value). Streams store what Stream clients publish as these bytes
//! (unchanged); the core's [`Message`] model is used by everything else, so
//! this module converts both ways with RabbitMQ's mapping between AMQP 1.0 and
//! 0-9-1 (`mc_amqp` / `mc_amqpl`):
//!
//! | AMQP 1.0                         | core (AMQP 0-9-1)                      |
//! |----------------------------------|----------------------------------------|
//! | header `durable`, `priority`, `ttl` | `delivery_mode` 2, `priority`, `expiration` |
//! | properties `message-id`, `user-id`, `reply-to`, `correlation-id`, `content-type`, `content-encoding`, `creation-time` (ms) | the same properties (`timestamp` in s) |
//! | application-properties           | headers (simple values; lists and maps are not converted, as in RabbitMQ) |
//! | message-annotations `x-exchange`, `x-routing-key` | exchange, routing key |
//! | other `x-` message-annotations   | headers                                |
//! | data sections (concatenated), or an amqp-value string/binary | body |
//!
//! Decoding is strict about structure (a truncated or malformed message is an
//! error, never a panic) and tolerant about content: unknown sections and
//! values of unexpected types are skipped.

use crate::field::{FieldTable, FieldValue};
use crate::message::{Message, Properties, Stamp, DELIVERY_MODE_PERSISTENT};
use bytes::{BufMut, Bytes};

/// Section descriptors (AMQP 1.0 §3.2).
const HEADER: u64 = 0x70;
const DELIVERY_ANNOTATIONS: u64 = 0x71;
const MESSAGE_ANNOTATIONS: u64 = 0x72;
const PROPERTIES: u64 = 0x73;
const APPLICATION_PROPERTIES: u64 = 0x74;
const DATA: u64 = 0x75;
const AMQP_SEQUENCE: u64 = 0x76;
const AMQP_VALUE: u64 = 0x77;
const FOOTER: u64 = 0x78;

/// Nesting a hostile message may use before it is refused.
const MAX_DEPTH: usize = 32;

/// An AMQP 1.0 value, as far as the broker needs to look into one.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    UByte(u8),
    UShort(u16),
    UInt(u32),
    ULong(u64),
    Byte(i8),
    Short(i16),
    Int(i32),
    Long(i64),
    Float(f32),
    Double(f64),
    Char(u32),
    /// ms since the Unix epoch.
    Timestamp(i64),
    Uuid([u8; 16]),
    Binary(Bytes),
    String(String),
    Symbol(String),
    List(Vec<Value>),
    Map(Vec<(Value, Value)>),
    Array(Vec<Value>),
    Described(Box<Value>, Box<Value>),
    /// A decimal: kept as its raw bytes (nothing maps it).
    Decimal(Bytes),
}

impl Value {
    fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) | Value::Symbol(s) => Some(s),
            _ => None,
        }
    }

    fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::UByte(n) => Some(u64::from(n)),
            Value::UShort(n) => Some(u64::from(n)),
            Value::UInt(n) => Some(u64::from(n)),
            Value::ULong(n) => Some(n),
            Value::Byte(n) => u64::try_from(n).ok(),
            Value::Short(n) => u64::try_from(n).ok(),
            Value::Int(n) => u64::try_from(n).ok(),
            Value::Long(n) => u64::try_from(n).ok(),
            _ => None,
        }
    }

    /// A message or correlation id as 0-9-1's short string.
    fn id_string(&self) -> Option<String> {
        match self {
            Value::String(s) | Value::Symbol(s) => Some(s.clone()),
            Value::ULong(n) => Some(n.to_string()),
            Value::Uuid(u) => Some(uuid_string(u)),
            Value::Binary(b) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }
}

fn uuid_string(u: &[u8; 16]) -> String {
    let hex: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Why an AMQP 1.0 message could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed AMQP 1.0 message: {0}")]
pub struct DecodeError(pub &'static str);

type DecodeResult<T> = Result<T, DecodeError>;

/// A reader over one encoded value after another.
struct Decoder<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl<'a> Decoder<'a> {
    fn new(buf: &'a Bytes) -> Self {
        Decoder { buf, pos: 0 }
    }

    fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn take(&mut self, n: usize) -> DecodeResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.buf.len())
            .ok_or(DecodeError("truncated"))?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(DecodeError("truncated"))?;
        self.pos = end;
        Ok(s)
    }

    fn slice(&mut self, n: usize) -> DecodeResult<Bytes> {
        let start = self.pos;
        self.take(n)?;
        Ok(self.buf.slice(start..self.pos))
    }

    fn u8(&mut self) -> DecodeResult<u8> {
        Ok(self.take(1)?.first().copied().unwrap_or(0))
    }

    fn array<const N: usize>(&mut self) -> DecodeResult<[u8; N]> {
        <[u8; N]>::try_from(self.take(N)?).map_err(|_| DecodeError("truncated"))
    }

    fn u32(&mut self) -> DecodeResult<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn len(&mut self, wide: bool) -> DecodeResult<usize> {
        let n = if wide {
            self.u32()?
        } else {
            u32::from(self.u8()?)
        };
        usize::try_from(n).map_err(|_| DecodeError("length too large"))
    }

    fn text(&mut self, wide: bool) -> DecodeResult<String> {
        let n = self.len(wide)?;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| DecodeError("string is not UTF-8"))
    }

    fn value(&mut self, depth: usize) -> DecodeResult<Value> {
        let code = self.u8()?;
        self.with_code(code, depth)
    }

    fn with_code(&mut self, code: u8, depth: usize) -> DecodeResult<Value> {
        if depth > MAX_DEPTH {
            return Err(DecodeError("nested too deep"));
        }
        Ok(match code {
            0x00 => {
                let descriptor = self.value(depth + 1)?;
                let value = self.value(depth + 1)?;
                Value::Described(Box::new(descriptor), Box::new(value))
            }
            0x40 => Value::Null,
            0x41 => Value::Bool(true),
            0x42 => Value::Bool(false),
            0x56 => Value::Bool(self.u8()? != 0),
            0x50 => Value::UByte(self.u8()?),
            0x51 => Value::Byte(i8::from_be_bytes(self.array()?)),
            0x60 => Value::UShort(u16::from_be_bytes(self.array()?)),
            0x61 => Value::Short(i16::from_be_bytes(self.array()?)),
            0x70 => Value::UInt(self.u32()?),
            0x52 => Value::UInt(u32::from(self.u8()?)),
            0x43 => Value::UInt(0),
            0x71 => Value::Int(i32::from_be_bytes(self.array()?)),
            0x54 => Value::Int(i32::from(i8::from_be_bytes(self.array()?))),
            0x80 => Value::ULong(u64::from_be_bytes(self.array()?)),
            0x53 => Value::ULong(u64::from(self.u8()?)),
            0x44 => Value::ULong(0),
            0x81 => Value::Long(i64::from_be_bytes(self.array()?)),
            0x55 => Value::Long(i64::from(i8::from_be_bytes(self.array()?))),
            0x72 => Value::Float(f32::from_be_bytes(self.array()?)),
            0x82 => Value::Double(f64::from_be_bytes(self.array()?)),
            0x73 => Value::Char(self.u32()?),
            0x83 => Value::Timestamp(i64::from_be_bytes(self.array()?)),
            0x98 => Value::Uuid(self.array()?),
            0x74 => Value::Decimal(self.slice(4)?),
            0x84 => Value::Decimal(self.slice(8)?),
            0x94 => Value::Decimal(self.slice(16)?),
            0xa0 | 0xb0 => {
                let n = self.len(code == 0xb0)?;
                Value::Binary(self.slice(n)?)
            }
            0xa1 | 0xb1 => Value::String(self.text(code == 0xb1)?),
            0xa3 | 0xb3 => Value::Symbol(self.text(code == 0xb3)?),
            0x45 => Value::List(Vec::new()),
            0xc0 | 0xd0 | 0xc1 | 0xd1 => {
                let wide = code & 0xf0 == 0xd0;
                let size = self.len(wide)?;
                let end = self.pos.saturating_add(size);
                if end > self.buf.len() {
                    return Err(DecodeError("truncated"));
                }
                let count = self.len(wide)?;
                let mut items = Vec::with_capacity(count.min(256));
                for _ in 0..count {
                    if self.pos >= end {
                        return Err(DecodeError("compound shorter than its count"));
                    }
                    items.push(self.value(depth + 1)?);
                }
                self.pos = end;
                if code & 0x0f == 0x01 {
                    if items.len() % 2 != 0 {
                        return Err(DecodeError("map with an odd number of items"));
                    }
                    let mut pairs = Vec::with_capacity(items.len() / 2);
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    Value::Map(pairs)
                } else {
                    Value::List(items)
                }
            }
            0xe0 | 0xf0 => {
                let wide = code == 0xf0;
                let size = self.len(wide)?;
                let end = self.pos.saturating_add(size);
                if end > self.buf.len() {
                    return Err(DecodeError("truncated"));
                }
                let count = self.len(wide)?;
                let element = self.u8()?;
                // A described element type: the descriptor comes once.
                let descriptor = if element == 0x00 {
                    Some(self.value(depth + 1)?)
                } else {
                    None
                };
                let element = if descriptor.is_some() {
                    self.u8()?
                } else {
                    element
                };
                let mut items = Vec::with_capacity(count.min(256));
                for _ in 0..count {
                    if self.pos >= end {
                        return Err(DecodeError("array shorter than its count"));
                    }
                    let v = self.with_code(element, depth + 1)?;
                    items.push(match &descriptor {
                        Some(d) => Value::Described(Box::new(d.clone()), Box::new(v)),
                        None => v,
                    });
                }
                self.pos = end;
                Value::Array(items)
            }
            _ => return Err(DecodeError("unknown type code")),
        })
    }
}

/// The section code of a described section value.
fn section_code(descriptor: &Value) -> Option<u64> {
    match descriptor {
        Value::ULong(n) => Some(*n),
        Value::Symbol(s) => Some(match s.as_str() {
            "amqp:header:list" => HEADER,
            "amqp:delivery-annotations:map" => DELIVERY_ANNOTATIONS,
            "amqp:message-annotations:map" => MESSAGE_ANNOTATIONS,
            "amqp:properties:list" => PROPERTIES,
            "amqp:application-properties:map" => APPLICATION_PROPERTIES,
            "amqp:data:binary" => DATA,
            "amqp:amqp-sequence:list" => AMQP_SEQUENCE,
            "amqp:amqp-value:*" => AMQP_VALUE,
            "amqp:footer:map" => FOOTER,
            _ => return None,
        }),
        _ => None,
    }
}

/// A header value as a 0-9-1 field value (None: not converted, as RabbitMQ
/// leaves out lists and maps).
fn to_field(v: &Value) -> Option<FieldValue> {
    Some(match v {
        Value::Null => FieldValue::Void,
        Value::Bool(b) => FieldValue::Bool(*b),
        Value::UByte(n) => FieldValue::U8(*n),
        Value::UShort(n) => FieldValue::U16(*n),
        Value::UInt(n) => FieldValue::U32(*n),
        Value::ULong(n) => FieldValue::I64(i64::try_from(*n).unwrap_or(i64::MAX)),
        Value::Byte(n) => FieldValue::I8(*n),
        Value::Short(n) => FieldValue::I16(*n),
        Value::Int(n) => FieldValue::I32(*n),
        Value::Long(n) => FieldValue::I64(*n),
        Value::Float(f) => FieldValue::F32(*f),
        Value::Double(f) => FieldValue::F64(*f),
        Value::Timestamp(ms) => FieldValue::Timestamp(u64::try_from(*ms / 1000).unwrap_or(0)),
        Value::Uuid(u) => FieldValue::string(uuid_string(u)),
        Value::Binary(b) => FieldValue::ByteArray(b.clone()),
        Value::String(s) | Value::Symbol(s) => FieldValue::string(s.clone()),
        Value::Char(c) => FieldValue::string(char::from_u32(*c).unwrap_or('?').to_string()),
        Value::Described(_, inner) => return to_field(inner),
        Value::List(_) | Value::Map(_) | Value::Array(_) | Value::Decimal(_) => return None,
    })
}

/// Reads an AMQP 1.0 message into the core's model; `routing_key` is what a
/// message without an `x-routing-key` annotation gets (the stream's name).
pub fn decode(data: &Bytes, routing_key: &str) -> Result<Message, DecodeError> {
    let mut d = Decoder::new(data);
    let mut properties = Properties::default();
    let mut headers = FieldTable::new();
    let mut exchange = String::new();
    let mut key: Option<String> = None;
    let mut body: Vec<Bytes> = Vec::new();
    let mut sections = 0;
    while !d.at_end() {
        let Value::Described(descriptor, value) = d.value(0)? else {
            return Err(DecodeError("a section is not a described value"));
        };
        sections += 1;
        match (section_code(&descriptor), *value) {
            (Some(HEADER), Value::List(fields)) => {
                if fields.first() == Some(&Value::Bool(true)) {
                    properties.delivery_mode = Some(DELIVERY_MODE_PERSISTENT);
                }
                if let Some(p) = fields.get(1).and_then(Value::as_u64) {
                    properties.priority = Some(u8::try_from(p).unwrap_or(u8::MAX));
                }
                if let Some(ttl) = fields.get(2).and_then(Value::as_u64) {
                    properties.expiration = Some(ttl.to_string());
                }
            }
            (Some(MESSAGE_ANNOTATIONS), Value::Map(pairs)) => {
                for (k, v) in pairs {
                    let Some(name) = k.as_str() else { continue };
                    match name {
                        "x-exchange" => exchange = v.as_str().unwrap_or_default().to_owned(),
                        "x-routing-key" => key = v.as_str().map(str::to_owned),
                        "x-basic-type" => properties.kind = v.as_str().map(str::to_owned),
                        "x-basic-app-id" => properties.app_id = v.as_str().map(str::to_owned),
                        _ if name.starts_with("x-") => {
                            if let Some(f) = to_field(&v) {
                                headers.insert(name, f);
                            }
                        }
                        _ => {}
                    }
                }
            }
            (Some(PROPERTIES), Value::List(fields)) => {
                let field = |i: usize| fields.get(i).filter(|v| **v != Value::Null);
                properties.message_id = field(0).and_then(Value::id_string);
                properties.user_id = field(1).and_then(Value::id_string);
                properties.reply_to = field(4).and_then(|v| v.as_str().map(str::to_owned));
                properties.correlation_id = field(5).and_then(Value::id_string);
                properties.content_type = field(6).and_then(|v| v.as_str().map(str::to_owned));
                properties.content_encoding = field(7).and_then(|v| v.as_str().map(str::to_owned));
                if let Some(Value::Timestamp(ms)) = field(9) {
                    properties.timestamp = u64::try_from(*ms / 1000).ok();
                }
            }
            (Some(APPLICATION_PROPERTIES), Value::Map(pairs)) => {
                for (k, v) in pairs {
                    if let (Some(name), Some(f)) = (k.as_str(), to_field(&v)) {
                        headers.insert(name, f);
                    }
                }
            }
            (Some(DATA), Value::Binary(b)) => body.push(b),
            (Some(AMQP_VALUE), Value::Binary(b)) => body.push(b),
            (Some(AMQP_VALUE), Value::String(s)) => body.push(Bytes::from(s)),
            _ => {}
        }
    }
    if sections == 0 {
        return Err(DecodeError("no section"));
    }
    if !headers.0.is_empty() {
        properties.headers = Some(headers);
    }
    let body = match body.len() {
        0 => Bytes::new(),
        1 => body.pop().unwrap_or_default(),
        _ => Bytes::from(body.concat()),
    };
    Ok(Message {
        exchange: exchange.into(),
        routing_key: key.map_or_else(|| routing_key.into(), Into::into),
        properties: properties.into(),
        body,
        origin: Stamp::NONE,
        received_ms: Stamp::NONE,
        topic: None,
    })
}

/// Writes AMQP 1.0 values.
struct Encoder<'a> {
    out: &'a mut Vec<u8>,
}

impl Encoder<'_> {
    fn null(&mut self) {
        self.out.put_u8(0x40);
    }

    fn bool(&mut self, b: bool) {
        self.out.put_u8(if b { 0x41 } else { 0x42 });
    }

    fn variable(&mut self, short: u8, long: u8, bytes: &[u8]) {
        match u8::try_from(bytes.len()) {
            Ok(n) => {
                self.out.put_u8(short);
                self.out.put_u8(n);
            }
            Err(_) => {
                self.out.put_u8(long);
                self.out
                    .put_u32(u32::try_from(bytes.len()).unwrap_or(u32::MAX));
            }
        }
        self.out.extend_from_slice(bytes);
    }

    fn string(&mut self, s: &str) {
        self.variable(0xa1, 0xb1, s.as_bytes());
    }

    fn symbol(&mut self, s: &str) {
        self.variable(0xa3, 0xb3, s.as_bytes());
    }

    fn binary(&mut self, b: &[u8]) {
        self.variable(0xa0, 0xb0, b);
    }

    fn ubyte(&mut self, n: u8) {
        self.out.put_u8(0x50);
        self.out.put_u8(n);
    }

    fn uint(&mut self, n: u32) {
        self.out.put_u8(0x70);
        self.out.put_u32(n);
    }

    fn long(&mut self, n: i64) {
        self.out.put_u8(0x81);
        self.out.put_i64(n);
    }

    fn timestamp(&mut self, ms: i64) {
        self.out.put_u8(0x83);
        self.out.put_i64(ms);
    }

    /// `0x00 smallulong(code)`: the start of a section.
    fn section(&mut self, code: u64) {
        self.out.put_u8(0x00);
        self.out.put_u8(0x53);
        self.out.put_u8(u8::try_from(code).unwrap_or(0));
    }

    /// A list or map (`map`: `count` counts keys and values) whose encoded
    /// items are `items`, in the 32-bit form (simple, and the sizes of
    /// sections carried here do not matter).
    fn compound(&mut self, map: bool, count: usize, items: &[u8]) {
        self.out.put_u8(if map { 0xd1 } else { 0xd0 });
        self.out
            .put_u32(u32::try_from(items.len() + 4).unwrap_or(u32::MAX));
        self.out.put_u32(u32::try_from(count).unwrap_or(u32::MAX));
        self.out.extend_from_slice(items);
    }

    fn field(&mut self, v: &FieldValue) -> bool {
        match v {
            FieldValue::Bool(b) => self.bool(*b),
            FieldValue::I8(n) => {
                self.out.put_u8(0x51);
                self.out.put_i8(*n);
            }
            FieldValue::U8(n) => self.ubyte(*n),
            FieldValue::I16(n) => {
                self.out.put_u8(0x61);
                self.out.put_i16(*n);
            }
            FieldValue::U16(n) => {
                self.out.put_u8(0x60);
                self.out.put_u16(*n);
            }
            FieldValue::I32(n) => {
                self.out.put_u8(0x71);
                self.out.put_i32(*n);
            }
            FieldValue::U32(n) => self.uint(*n),
            FieldValue::I64(n) => self.long(*n),
            FieldValue::F32(f) => {
                self.out.put_u8(0x72);
                self.out.put_f32(*f);
            }
            FieldValue::F64(f) => {
                self.out.put_u8(0x82);
                self.out.put_f64(*f);
            }
            FieldValue::LongStr(b) => match std::str::from_utf8(b) {
                Ok(s) => self.string(s),
                Err(_) => self.binary(b),
            },
            FieldValue::ByteArray(b) => self.binary(b),
            FieldValue::Timestamp(s) => {
                self.timestamp(i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX));
            }
            FieldValue::Void => self.null(),
            // Not converted (RabbitMQ does not either): decimals, arrays, tables.
            FieldValue::Decimal { .. } | FieldValue::Array(_) | FieldValue::Table(_) => {
                return false
            }
        }
        true
    }
}

/// One field of the properties section, by its AMQP 1.0 type.
#[derive(Clone, Copy)]
enum Prop<'a> {
    Str(&'a str),
    Sym(&'a str),
    Bin(&'a [u8]),
    Time(i64),
}

/// Encodes a message as an AMQP 1.0 bare message, appended to `out`.
pub fn encode(m: &Message, out: &mut Vec<u8>) {
    let p = &m.properties;
    let mut e = Encoder { out };
    // header: durable, priority, ttl.
    let ttl = p.expiration_ms().and_then(|t| u32::try_from(t).ok());
    if p.is_persistent() || p.priority.is_some() || ttl.is_some() {
        let mut items = Vec::new();
        let mut i = Encoder { out: &mut items };
        i.bool(p.is_persistent());
        match p.priority {
            Some(n) => i.ubyte(n),
            None => i.null(),
        }
        match ttl {
            Some(t) => i.uint(t),
            None => i.null(),
        }
        e.section(HEADER);
        e.compound(false, 3, &items);
    }
    // message-annotations: where it was published, and 0-9-1's type and app id.
    let mut items = Vec::new();
    let mut count = 0;
    {
        let mut i = Encoder { out: &mut items };
        let mut pair = |k: &str, v: &str| {
            i.symbol(k);
            i.string(v);
            count += 2;
        };
        if !m.exchange.is_empty() {
            pair("x-exchange", &m.exchange);
        }
        if !m.routing_key.is_empty() && !m.exchange.is_empty() {
            pair("x-routing-key", &m.routing_key);
        }
        if let Some(t) = &p.kind {
            pair("x-basic-type", t);
        }
        if let Some(a) = &p.app_id {
            pair("x-basic-app-id", a);
        }
    }
    if count > 0 {
        e.section(MESSAGE_ANNOTATIONS);
        e.compound(true, count, &items);
    }
    // properties (trailing nulls left out).
    let ms = |s: u64| i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX);
    let mut fields: Vec<Option<Prop<'_>>> = vec![
        p.message_id.as_deref().map(Prop::Str),
        p.user_id.as_deref().map(|s| Prop::Bin(s.as_bytes())),
        None, // to
        None, // subject
        p.reply_to.as_deref().map(Prop::Str),
        p.correlation_id.as_deref().map(Prop::Str),
        p.content_type.as_deref().map(Prop::Sym),
        p.content_encoding.as_deref().map(Prop::Sym),
        None, // absolute-expiry-time
        p.timestamp.map(|s| Prop::Time(ms(s))),
    ];
    while fields.last().is_some_and(Option::is_none) {
        fields.pop();
    }
    if !fields.is_empty() {
        let mut items = Vec::new();
        let mut i = Encoder { out: &mut items };
        for f in &fields {
            match *f {
                Some(Prop::Str(s)) => i.string(s),
                Some(Prop::Sym(s)) => i.symbol(s),
                Some(Prop::Bin(b)) => i.binary(b),
                Some(Prop::Time(t)) => i.timestamp(t),
                None => i.null(),
            }
        }
        e.section(PROPERTIES);
        e.compound(false, fields.len(), &items);
    }
    // application-properties: the headers with simple values.
    if let Some(headers) = &p.headers {
        let mut items = Vec::new();
        let mut count = 0;
        let mut i = Encoder { out: &mut items };
        for (k, v) in headers.iter() {
            let mark = i.out.len();
            i.string(k);
            if i.field(v) {
                count += 2;
            } else {
                i.out.truncate(mark);
            }
        }
        if count > 0 {
            e.section(APPLICATION_PROPERTIES);
            e.compound(true, count, &items);
        }
    }
    e.section(DATA);
    e.binary(&m.body);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> Message {
        let mut headers = FieldTable::new();
        headers.insert("color", FieldValue::string("red"));
        headers.insert("n", FieldValue::I64(-5));
        headers.insert("ok", FieldValue::Bool(true));
        headers.insert("nested", FieldValue::Table(FieldTable::new()));
        Message {
            exchange: "amq.topic".into(),
            routing_key: "a.b".into(),
            properties: Properties {
                content_type: Some("text/plain".into()),
                content_encoding: Some("utf-8".into()),
                headers: Some(headers),
                delivery_mode: Some(2),
                priority: Some(3),
                correlation_id: Some("c-1".into()),
                reply_to: Some("replies".into()),
                expiration: Some("60000".into()),
                message_id: Some("m-1".into()),
                timestamp: Some(1_700_000_000),
                kind: Some("order".into()),
                user_id: Some("guest".into()),
                app_id: Some("shop".into()),
                cluster_id: None,
            }
            .into(),
            body: Bytes::from_static(b"hello"),
            origin: Stamp::NONE,
            received_ms: Stamp::NONE,
            topic: None,
        }
    }

    #[test]
    fn a_message_survives_the_round_trip() {
        let m = message();
        let mut out = Vec::new();
        encode(&m, &mut out);
        let back = decode(&Bytes::from(out), "stream").unwrap();
        let mut want = m.clone();
        // Tables are not converted (as in RabbitMQ).
        if let Some(h) = want.properties.headers.as_mut() {
            h.0.retain(|(k, _)| k != "nested");
        }
        assert_eq!(back, want);
    }

    #[test]
    fn a_bare_data_section_is_the_body() {
        // What rstream's AMQPMessage(body=b"x") encodes to.
        let raw = Bytes::from_static(&[0x00, 0x53, 0x75, 0xa0, 0x01, b'x']);
        let m = decode(&raw, "s").unwrap();
        assert_eq!(m.body, Bytes::from_static(b"x"));
        assert_eq!(m.routing_key, "s");
        assert_eq!(m.exchange, "");
        let mut out = Vec::new();
        encode(&m, &mut out);
        assert_eq!(out, raw.to_vec());
    }

    #[test]
    fn amqp_value_strings_and_several_data_sections() {
        let raw = Bytes::from_static(&[
            0x00, 0x53, 0x77, 0xa1, 0x02, b'h', b'i', //
        ]);
        assert_eq!(decode(&raw, "s").unwrap().body, Bytes::from_static(b"hi"));
        let raw = Bytes::from_static(&[
            0x00, 0x53, 0x75, 0xa0, 0x01, b'a', 0x00, 0x53, 0x75, 0xa0, 0x01, b'b',
        ]);
        assert_eq!(decode(&raw, "s").unwrap().body, Bytes::from_static(b"ab"));
    }

    #[test]
    fn symbolic_descriptors_and_arrays_are_read() {
        let mut raw = vec![0x00, 0xa3, 20];
        raw.extend_from_slice(b"amqp:properties:list");
        // list8: size, count 1, message-id string "x"
        raw.extend_from_slice(&[0xc0, 4, 1, 0xa1, 1, b'x']);
        // an application-properties map holding an array (skipped)
        raw.extend_from_slice(&[
            0x00, 0x53, 0x74, 0xc1, 14, 4, 0xa1, 1, b'k', 0xe0, 4, 2, 0x50,
        ]);
        raw.extend_from_slice(&[1, 2, 0xa1, 1, b'j']);
        raw.extend_from_slice(&[0x41]);
        raw.extend_from_slice(&[0x00, 0x53, 0x75, 0xa0, 0x00]);
        let m = decode(&Bytes::from(raw), "s").unwrap();
        assert_eq!(m.properties.message_id.as_deref(), Some("x"));
        let h = m.properties.into_inner().headers.unwrap();
        assert_eq!(h.get("j"), Some(&FieldValue::Bool(true)));
        assert!(h.get("k").is_none());
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        for raw in [
            &[][..],
            &[0x00],
            &[0x00, 0x53, 0x75, 0xa0, 0x05, b'x'],
            &[0x00, 0x53, 0x73, 0xd0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1],
            &[0x00, 0x53, 0x74, 0xc1, 2, 1, 0x40],
            &[0x40],
            &[0xff],
        ] {
            assert!(
                decode(&Bytes::copy_from_slice(raw), "s").is_err(),
                "{raw:?}"
            );
        }
        // Deep nesting is refused, not recursed into.
        let mut deep = vec![0x00, 0x53, 0x77];
        for _ in 0..100 {
            deep.extend_from_slice(&[0x00, 0x53, 0x00]);
        }
        assert!(decode(&Bytes::from(deep), "s").is_err());
    }
}
