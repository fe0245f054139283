//! Typed header values: the AMQP 0-9-1 field table as RabbitMQ defines it.
//!
//! AMQP's table is the richest header model of the three protocols, so it is the
//! canonical one: MQTT user properties and STOMP headers map into string entries,
//! and broker features (`x-death`, queue arguments) use the typed values directly.
//! A table keeps its entries in order (it is what a client sent and expects back)
//! and is small, so lookups scan.

use bytes::Bytes;

use crate::message::ShortStr;

/// One typed value of a field table or array. The variants are RabbitMQ's type
/// tags (`t b B s u I i l f d D S A T F V x`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum FieldValue {
    Bool(bool),
    I8(i8),
    U8(u8),
    I16(i16),
    U16(u16),
    I32(i32),
    U32(u32),
    I64(i64),
    F32(f32),
    F64(f64),
    Decimal {
        scale: u8,
        value: u32,
    },
    /// A long string: bytes, not necessarily UTF-8.
    LongStr(Bytes),
    Array(Vec<FieldValue>),
    /// Seconds since the Unix epoch.
    Timestamp(u64),
    Table(FieldTable),
    Void,
    ByteArray(Bytes),
}

impl FieldValue {
    /// A string value, the common case for headers from MQTT and STOMP.
    pub fn string(s: impl Into<String>) -> Self {
        FieldValue::LongStr(Bytes::from(s.into()))
    }

    /// RabbitMQ's name of the value's type, as its error texts show it.
    pub fn type_name(&self) -> &'static str {
        match self {
            FieldValue::Bool(_) => "bool",
            FieldValue::I8(_) => "byte",
            FieldValue::U8(_) => "unsignedbyte",
            FieldValue::I16(_) => "short",
            FieldValue::U16(_) => "unsignedshort",
            FieldValue::I32(_) => "signedint",
            FieldValue::U32(_) => "unsignedint",
            FieldValue::I64(_) => "long",
            FieldValue::F32(_) => "float",
            FieldValue::F64(_) => "double",
            FieldValue::Decimal { .. } => "decimal",
            FieldValue::LongStr(_) => "longstr",
            FieldValue::Array(_) => "array",
            FieldValue::Timestamp(_) => "timestamp",
            FieldValue::Table(_) => "table",
            FieldValue::Void => "void",
            FieldValue::ByteArray(_) => "binary",
        }
    }

    /// The value as an integer, whatever its integer width (RabbitMQ accepts any
    /// integer type for numeric arguments such as `x-message-ttl`).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            FieldValue::I8(v) => Some(v.into()),
            FieldValue::U8(v) => Some(v.into()),
            FieldValue::I16(v) => Some(v.into()),
            FieldValue::U16(v) => Some(v.into()),
            FieldValue::I32(v) => Some(v.into()),
            FieldValue::U32(v) => Some(v.into()),
            FieldValue::I64(v) => Some(v),
            FieldValue::Timestamp(v) => i64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as text when it is a string (UTF-8 long string or byte array).
    pub fn as_str(&self) -> Option<&str> {
        match self {
            FieldValue::LongStr(b) | FieldValue::ByteArray(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            FieldValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_table(&self) -> Option<&FieldTable> {
        match self {
            FieldValue::Table(t) => Some(t),
            _ => None,
        }
    }
}

/// An ordered table of named values. Names are AMQP short strings (at most 255
/// bytes), kept as [`ShortStr`]: the usual header and argument names (up to 24
/// bytes, `x-mqtt-publish-qos`, `x-message-ttl`) are inline, not an allocation
/// per entry of every queued message that has headers. Serialised as strings,
/// exactly as before.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FieldTable(pub Vec<(ShortStr, FieldValue)>);

impl FieldTable {
    pub fn new() -> Self {
        FieldTable(Vec::new())
    }

    pub fn get(&self, name: &str) -> Option<&FieldValue> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// Sets `name`, replacing an existing entry in place or appending a new one.
    pub fn insert(&mut self, name: impl Into<ShortStr>, value: FieldValue) {
        let name = name.into();
        match self.0.iter_mut().find(|(k, _)| *k == name) {
            Some(entry) => entry.1 = value,
            None => self.0.push((name, value)),
        }
    }

    pub fn remove(&mut self, name: &str) -> Option<FieldValue> {
        let pos = self.0.iter().position(|(k, _)| k == name)?;
        Some(self.0.remove(pos).1)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &FieldValue)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn get_i64(&self, name: &str) -> Option<i64> {
        self.get(name).and_then(FieldValue::as_i64)
    }

    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(FieldValue::as_str)
    }

    pub fn get_bool(&self, name: &str) -> Option<bool> {
        self.get(name).and_then(FieldValue::as_bool)
    }
}

impl<K: Into<ShortStr>> FromIterator<(K, FieldValue)> for FieldTable {
    fn from_iter<I: IntoIterator<Item = (K, FieldValue)>>(iter: I) -> Self {
        FieldTable(iter.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stored messages carry their headers: inline names must serialise
    /// exactly as the `String` names did, both ways.
    #[test]
    fn stored_tables_are_unchanged_by_inline_names() {
        let long = "a-header-name-longer-than-twenty-four-bytes".to_owned();
        let old: Vec<(String, FieldValue)> = vec![
            ("x-mqtt-publish-qos".into(), FieldValue::U8(1)),
            (long.clone(), FieldValue::string("v")),
            (String::new(), FieldValue::Void),
        ];
        let bytes = postcard::to_allocvec(&old).unwrap();
        let table: FieldTable = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(table.get_i64("x-mqtt-publish-qos"), Some(1));
        assert_eq!(table.get_str(&long), Some("v"));
        assert_eq!(postcard::to_allocvec(&table).unwrap(), bytes);
    }
}
