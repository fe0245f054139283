//! AMQP 0-9-1 primitive data types and RabbitMQ's field tables, read from a frame
//! payload and written into an output buffer.
//!
//! Grammar (AMQP 0-9-1 section 4.2.5, with the field-value tags RabbitMQ actually
//! uses, which differ from the spec's: see RabbitMQ's "AMQP 0-9-1 errata"):
//!
//! ```text
//! octet          = 1 byte
//! short          = 2 bytes, big-endian unsigned
//! long           = 4 bytes, big-endian unsigned
//! longlong       = 8 bytes, big-endian unsigned
//! timestamp      = longlong                      ; seconds since the epoch
//! bit            = packed with adjacent bits into octets, first bit in the LSB
//! shortstr       = octet-length *octet           ; at most 255 bytes, UTF-8
//! longstr        = long-length *octet            ; any bytes
//! field-table    = long-length *(field-name field-value)
//! field-name     = shortstr
//! field-array    = long-length *field-value
//! field-value    = 't' octet           ; boolean, non-zero is true
//!                / 'b' int8  / 'B' uint8
//!                / 's' int16 / 'u' uint16
//!                / 'I' int32 / 'i' uint32
//!                / 'l' int64
//!                / 'f' float32 / 'd' float64  ; IEEE 754, big-endian
//!                / 'D' octet-scale long-value ; decimal
//!                / 'S' longstr
//!                / 'A' field-array
//!                / 'T' timestamp
//!                / 'F' field-table
//!                / 'V'                 ; void, no bytes
//!                / 'x' longstr         ; byte array
//! ```
//!
//! Reading never indexes: every read goes through [`Reader::take`], which checks
//! the bounds first, so a truncated or lying length is a [`CodecError::Syntax`]
//! carrying the offset. Long strings are slices of the frame's `Bytes`, not copies.

use bytes::{BufMut, Bytes, BytesMut};
use switchyard_core::field::{FieldTable, FieldValue};
use switchyard_core::message::ShortStr;

use super::CodecError;

/// How deeply tables and arrays may nest inside one another. Decoding is
/// recursive, so without a limit a frame of nested `F` tags could exhaust the
/// stack; RabbitMQ's own clients never come close to this.
pub const MAX_NESTING_DEPTH: usize = 64;

/// A cursor over one frame payload (or a length-delimited part of it).
///
/// Offsets in errors are positions in the whole payload, also inside nested
/// tables, because a sub-reader shares the payload and only narrows `end`.
pub(crate) struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
    end: usize,
    /// The octet that the bits being read come from.
    bit_octet: u8,
    /// Index of the next bit in `bit_octet`; 8 means "start a new octet". Any
    /// non-bit read resets it, which is what makes only *consecutive* bits share
    /// an octet.
    bit_index: u8,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(data: &'a Bytes) -> Self {
        Reader {
            data,
            pos: 0,
            end: data.len(),
            bit_octet: 0,
            bit_index: 8,
        }
    }

    pub(crate) fn offset(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.end.saturating_sub(self.pos)
    }

    pub(crate) fn syntax(&self, what: &'static str) -> CodecError {
        CodecError::Syntax {
            offset: self.pos,
            what,
        }
    }

    /// Fails unless everything has been read: trailing bytes mean the peer's idea
    /// of the arguments differs from ours (RabbitMQ's generated decoders match
    /// the exact binary and fail the same way).
    pub(crate) fn finish(&self) -> Result<(), CodecError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(self.syntax("trailing bytes after the last argument"))
        }
    }

    /// The next `n` bytes, after checking they are there.
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        self.bit_index = 8;
        let end = match self.pos.checked_add(n) {
            Some(end) if end <= self.end => end,
            _ => return Err(self.syntax(what)),
        };
        let data: &'a [u8] = self.data;
        let slice = data.get(self.pos..end).ok_or_else(|| self.syntax(what))?;
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], CodecError> {
        let at = self.pos;
        let slice = self.take(N, what)?;
        <[u8; N]>::try_from(slice).map_err(|_| CodecError::Syntax { offset: at, what })
    }

    /// The next `n` bytes as a zero-copy slice of the payload.
    fn take_bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, CodecError> {
        let start = self.pos;
        self.take(n, what)?;
        // `take` checked start..start+n lies within the payload, so `slice` cannot panic.
        Ok(self.data.slice(start..self.pos))
    }

    /// A reader over the next `len` bytes, which this reader then skips.
    fn sub(&mut self, len: usize, what: &'static str) -> Result<Reader<'a>, CodecError> {
        let start = self.pos;
        self.take(len, what)?;
        Ok(Reader {
            data: self.data,
            pos: start,
            end: self.pos,
            bit_octet: 0,
            bit_index: 8,
        })
    }

    pub(crate) fn octet(&mut self) -> Result<u8, CodecError> {
        self.array::<1>("truncated octet").map(u8::from_be_bytes)
    }

    pub(crate) fn short(&mut self) -> Result<u16, CodecError> {
        self.array("truncated short").map(u16::from_be_bytes)
    }

    pub(crate) fn long(&mut self) -> Result<u32, CodecError> {
        self.array("truncated long").map(u32::from_be_bytes)
    }

    pub(crate) fn longlong(&mut self) -> Result<u64, CodecError> {
        self.array("truncated longlong").map(u64::from_be_bytes)
    }

    pub(crate) fn timestamp(&mut self) -> Result<u64, CodecError> {
        self.longlong()
    }

    pub(crate) fn bit(&mut self) -> Result<bool, CodecError> {
        if self.bit_index >= 8 {
            let octet = self.octet()?;
            self.bit_octet = octet;
            self.bit_index = 0;
        }
        let value = (self.bit_octet >> self.bit_index) & 1 == 1;
        self.bit_index += 1;
        Ok(value)
    }

    /// A method argument: inline when it fits (names and keys usually do).
    pub(crate) fn shortstr(&mut self) -> Result<ShortStr, CodecError> {
        self.short_str().map(ShortStr::from)
    }

    /// A property (the core's `Properties` hold `String`s).
    pub(crate) fn shortstr_string(&mut self) -> Result<String, CodecError> {
        self.short_str().map(str::to_owned)
    }

    fn short_str(&mut self) -> Result<&'a str, CodecError> {
        let len = self.octet()?;
        let at = self.pos;
        let raw = self.take(usize::from(len), "short string longer than the payload")?;
        match std::str::from_utf8(raw) {
            Ok(s) => Ok(s),
            Err(_) => Err(CodecError::Syntax {
                offset: at,
                what: "short string is not UTF-8",
            }),
        }
    }

    fn length(&mut self) -> Result<usize, CodecError> {
        let len = self.long()?;
        usize::try_from(len).map_err(|_| self.syntax("length does not fit in memory"))
    }

    pub(crate) fn longstr(&mut self) -> Result<Bytes, CodecError> {
        let len = self.length()?;
        self.take_bytes(len, "long string longer than the payload")
    }

    pub(crate) fn table(&mut self) -> Result<FieldTable, CodecError> {
        self.table_at(0)
    }

    fn table_at(&mut self, depth: usize) -> Result<FieldTable, CodecError> {
        if depth >= MAX_NESTING_DEPTH {
            return Err(self.syntax("field tables and arrays nested too deeply"));
        }
        let len = self.length()?;
        let mut inner = self.sub(len, "field table longer than its container")?;
        // No capacity from the wire: entries are pushed as they are proven present.
        let mut entries = Vec::new();
        while inner.remaining() > 0 {
            let name = inner.shortstr()?;
            let value = inner.field_value(depth)?;
            entries.push((name, value));
        }
        Ok(FieldTable(entries))
    }

    fn field_array(&mut self, depth: usize) -> Result<Vec<FieldValue>, CodecError> {
        if depth >= MAX_NESTING_DEPTH {
            return Err(self.syntax("field tables and arrays nested too deeply"));
        }
        let len = self.length()?;
        let mut inner = self.sub(len, "field array longer than its container")?;
        let mut values = Vec::new();
        while inner.remaining() > 0 {
            values.push(inner.field_value(depth)?);
        }
        Ok(values)
    }

    /// One tagged value; `depth` is the nesting depth of the table or array that
    /// holds it.
    fn field_value(&mut self, depth: usize) -> Result<FieldValue, CodecError> {
        let at = self.pos;
        let tag = self.octet()?;
        let value = match tag {
            b't' => FieldValue::Bool(self.octet()? != 0),
            b'b' => FieldValue::I8(self.array("truncated int8").map(i8::from_be_bytes)?),
            b'B' => FieldValue::U8(self.octet()?),
            b's' => FieldValue::I16(self.array("truncated int16").map(i16::from_be_bytes)?),
            b'u' => FieldValue::U16(self.short()?),
            b'I' => FieldValue::I32(self.array("truncated int32").map(i32::from_be_bytes)?),
            b'i' => FieldValue::U32(self.long()?),
            b'l' => FieldValue::I64(self.array("truncated int64").map(i64::from_be_bytes)?),
            b'f' => FieldValue::F32(self.array("truncated float").map(f32::from_be_bytes)?),
            b'd' => FieldValue::F64(self.array("truncated double").map(f64::from_be_bytes)?),
            b'D' => {
                let scale = self.octet()?;
                let value = self.long()?;
                FieldValue::Decimal { scale, value }
            }
            b'S' => FieldValue::LongStr(self.longstr()?),
            b'A' => FieldValue::Array(self.field_array(depth + 1)?),
            b'T' => FieldValue::Timestamp(self.timestamp()?),
            b'F' => FieldValue::Table(self.table_at(depth + 1)?),
            b'V' => FieldValue::Void,
            b'x' => FieldValue::ByteArray(self.longstr()?),
            _ => {
                return Err(CodecError::Syntax {
                    offset: at,
                    what: "unknown field value type tag",
                })
            }
        };
        Ok(value)
    }
}

/// Writes method arguments, packing consecutive bits into octets.
///
/// Bits are accumulated and written when the next non-bit argument (or
/// [`Writer::finish`]) comes, so no octet has to be patched afterwards.
pub(crate) struct Writer<'a> {
    buf: &'a mut BytesMut,
    bits: u8,
    bit_count: u8,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(buf: &'a mut BytesMut) -> Self {
        Writer {
            buf,
            bits: 0,
            bit_count: 0,
        }
    }

    fn flush_bits(&mut self) {
        if self.bit_count > 0 {
            self.buf.put_u8(self.bits);
            self.bits = 0;
            self.bit_count = 0;
        }
    }

    /// Writes any bits still pending. Must be called after the last argument.
    pub(crate) fn finish(mut self) {
        self.flush_bits();
    }

    pub(crate) fn octet(&mut self, v: &u8) {
        self.flush_bits();
        self.buf.put_u8(*v);
    }

    pub(crate) fn short(&mut self, v: &u16) {
        self.flush_bits();
        self.buf.put_u16(*v);
    }

    pub(crate) fn long(&mut self, v: &u32) {
        self.flush_bits();
        self.buf.put_u32(*v);
    }

    pub(crate) fn longlong(&mut self, v: &u64) {
        self.flush_bits();
        self.buf.put_u64(*v);
    }

    // No 0-9-1 method has a timestamp argument (only the timestamp property), but
    // the method table may name any AMQP type.
    #[allow(dead_code)]
    pub(crate) fn timestamp(&mut self, v: &u64) {
        self.longlong(v);
    }

    pub(crate) fn bit(&mut self, v: &bool) {
        if self.bit_count == 8 {
            self.flush_bits();
        }
        self.bits |= u8::from(*v) << self.bit_count;
        self.bit_count += 1;
    }

    pub(crate) fn shortstr(&mut self, v: &str) {
        self.flush_bits();
        put_shortstr(self.buf, v);
    }

    pub(crate) fn longstr(&mut self, v: &[u8]) {
        self.flush_bits();
        put_longstr(self.buf, v);
    }

    pub(crate) fn table(&mut self, v: &FieldTable) {
        self.flush_bits();
        put_table(self.buf, v);
    }
}

/// The longest prefix of `s` that fits in `max` bytes without splitting a
/// character.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// Writes a short string. A string over 255 bytes cannot be represented; it is
/// cut at the last character boundary within 255 bytes rather than corrupting
/// the frame. Names the broker sends (queues, tags, exchanges) are limited to 255
/// bytes by the session before they get here; only free text such as a
/// reply-text can meet this.
pub(crate) fn put_shortstr(buf: &mut BytesMut, s: &str) {
    let s = truncate_utf8(s, usize::from(u8::MAX));
    // The truncation above makes the length fit in an octet.
    buf.put_u8(u8::try_from(s.len()).unwrap_or(u8::MAX));
    buf.put_slice(s.as_bytes());
}

pub(crate) fn put_longstr(buf: &mut BytesMut, v: &[u8]) {
    with_length_prefix(buf, |buf| buf.put_slice(v));
}

/// Writes a 32-bit length, then whatever `body` writes, and back-patches the
/// length: the size of a table is only known once it is written, and measuring
/// it first would walk nested tables twice.
pub(crate) fn with_length_prefix(buf: &mut BytesMut, body: impl FnOnce(&mut BytesMut)) {
    let at = buf.len();
    buf.put_u32(0);
    body(buf);
    let len = buf.len() - at - 4;
    patch_u32(buf, at, len);
}

/// Overwrites the 4 bytes at `at` with `len`. Lengths over 4 GiB cannot be
/// expressed on the wire; callers keep frames far below that (frame-max is a u32).
pub(crate) fn patch_u32(buf: &mut BytesMut, at: usize, len: usize) {
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    if let Some(slot) = buf.get_mut(at..at + 4) {
        slot.copy_from_slice(&len.to_be_bytes());
    }
}

pub(crate) fn put_table(buf: &mut BytesMut, table: &FieldTable) {
    with_length_prefix(buf, |buf| {
        for (name, value) in &table.0 {
            put_shortstr(buf, name);
            put_field_value(buf, value);
        }
    });
}

fn put_field_value(buf: &mut BytesMut, value: &FieldValue) {
    match value {
        FieldValue::Bool(v) => {
            buf.put_u8(b't');
            buf.put_u8(u8::from(*v));
        }
        FieldValue::I8(v) => {
            buf.put_u8(b'b');
            buf.put_i8(*v);
        }
        FieldValue::U8(v) => {
            buf.put_u8(b'B');
            buf.put_u8(*v);
        }
        FieldValue::I16(v) => {
            buf.put_u8(b's');
            buf.put_i16(*v);
        }
        FieldValue::U16(v) => {
            buf.put_u8(b'u');
            buf.put_u16(*v);
        }
        FieldValue::I32(v) => {
            buf.put_u8(b'I');
            buf.put_i32(*v);
        }
        FieldValue::U32(v) => {
            buf.put_u8(b'i');
            buf.put_u32(*v);
        }
        FieldValue::I64(v) => {
            buf.put_u8(b'l');
            buf.put_i64(*v);
        }
        FieldValue::F32(v) => {
            buf.put_u8(b'f');
            buf.put_f32(*v);
        }
        FieldValue::F64(v) => {
            buf.put_u8(b'd');
            buf.put_f64(*v);
        }
        FieldValue::Decimal { scale, value } => {
            buf.put_u8(b'D');
            buf.put_u8(*scale);
            buf.put_u32(*value);
        }
        FieldValue::LongStr(v) => {
            buf.put_u8(b'S');
            put_longstr(buf, v);
        }
        FieldValue::Array(values) => {
            buf.put_u8(b'A');
            with_length_prefix(buf, |buf| {
                for value in values {
                    put_field_value(buf, value);
                }
            });
        }
        FieldValue::Timestamp(v) => {
            buf.put_u8(b'T');
            buf.put_u64(*v);
        }
        FieldValue::Table(table) => {
            buf.put_u8(b'F');
            put_table(buf, table);
        }
        FieldValue::Void => buf.put_u8(b'V'),
        FieldValue::ByteArray(v) => {
            buf.put_u8(b'x');
            put_longstr(buf, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_table(bytes: &[u8]) -> Result<FieldTable, CodecError> {
        let data = Bytes::copy_from_slice(bytes);
        let mut r = Reader::new(&data);
        let t = r.table()?;
        r.finish()?;
        Ok(t)
    }

    fn every_value() -> FieldTable {
        let mut inner = FieldTable::new();
        inner.insert(
            "deep",
            FieldValue::Array(vec![FieldValue::Void, FieldValue::Table(FieldTable::new())]),
        );
        FieldTable(vec![
            ("t".into(), FieldValue::Bool(true)),
            ("b".into(), FieldValue::I8(-5)),
            ("B".into(), FieldValue::U8(250)),
            ("s".into(), FieldValue::I16(-300)),
            ("u".into(), FieldValue::U16(60000)),
            ("I".into(), FieldValue::I32(-70000)),
            ("i".into(), FieldValue::U32(4_000_000_000)),
            ("l".into(), FieldValue::I64(-9_000_000_000)),
            ("f".into(), FieldValue::F32(1.5)),
            ("d".into(), FieldValue::F64(-2.25)),
            (
                "D".into(),
                FieldValue::Decimal {
                    scale: 2,
                    value: 12345,
                },
            ),
            ("S".into(), FieldValue::string("héllo")),
            (
                "A".into(),
                FieldValue::Array(vec![
                    FieldValue::I32(1),
                    FieldValue::string("x"),
                    FieldValue::Table(inner.clone()),
                ]),
            ),
            ("T".into(), FieldValue::Timestamp(1_700_000_000)),
            ("F".into(), FieldValue::Table(inner)),
            ("V".into(), FieldValue::Void),
            (
                "x".into(),
                FieldValue::ByteArray(Bytes::from_static(&[0, 255, 1])),
            ),
        ])
    }

    #[test]
    fn table_with_every_type_round_trips() {
        let table = every_value();
        let mut buf = BytesMut::new();
        put_table(&mut buf, &table);
        assert_eq!(decode_table(&buf).unwrap(), table);
    }

    #[test]
    fn table_known_bytes() {
        // {"a": int32 1, "b": bool true}
        let bytes = b"\x00\x00\x00\x0b\x01aI\x00\x00\x00\x01\x01bt\x01";
        let t = decode_table(bytes).unwrap();
        assert_eq!(
            t,
            FieldTable(vec![
                ("a".into(), FieldValue::I32(1)),
                ("b".into(), FieldValue::Bool(true))
            ])
        );
        let mut buf = BytesMut::new();
        put_table(&mut buf, &t);
        assert_eq!(&buf[..], &bytes[..]);
    }

    #[test]
    fn table_length_past_end_is_syntax_error() {
        let err = decode_table(b"\x00\x00\x00\x10\x01aV").unwrap_err();
        assert!(
            matches!(err, CodecError::Syntax { offset: 4, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn unknown_tag_is_syntax_error_at_tag() {
        let err = decode_table(b"\x00\x00\x00\x03\x01aZ").unwrap_err();
        assert_eq!(
            err,
            CodecError::Syntax {
                offset: 6,
                what: "unknown field value type tag"
            }
        );
    }

    #[test]
    fn entry_running_past_table_length_is_rejected() {
        // Table claims 4 bytes but its one entry (name "a", int32) needs 7.
        let err = decode_table(b"\x00\x00\x00\x04\x01aI\x00\x00\x00\x01").unwrap_err();
        assert!(matches!(err, CodecError::Syntax { .. }), "{err:?}");
    }

    #[test]
    fn bad_utf8_key_is_syntax_error() {
        let err = decode_table(b"\x00\x00\x00\x03\x01\xffV").unwrap_err();
        assert_eq!(
            err,
            CodecError::Syntax {
                offset: 5,
                what: "short string is not UTF-8"
            }
        );
    }

    fn nested(depth: usize) -> FieldTable {
        let mut t = FieldTable::new();
        for _ in 0..depth {
            t = FieldTable(vec![("n".into(), FieldValue::Table(t))]);
        }
        t
    }

    #[test]
    fn nesting_limit() {
        // The outer table is depth 0, so MAX - 1 nested tables is the most allowed.
        let mut buf = BytesMut::new();
        put_table(&mut buf, &nested(MAX_NESTING_DEPTH - 1));
        assert!(decode_table(&buf).is_ok());
        buf.clear();
        put_table(&mut buf, &nested(MAX_NESTING_DEPTH));
        assert!(matches!(
            decode_table(&buf),
            Err(CodecError::Syntax {
                what: "field tables and arrays nested too deeply",
                ..
            })
        ));
    }

    #[test]
    fn hostile_deep_nesting_does_not_overflow_the_stack() {
        // 100k nested array tags with lengths that claim "everything after me".
        let depth = 100_000usize;
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&u32::try_from(depth * 5 + 2).unwrap().to_be_bytes());
        bytes.extend_from_slice(b"\x01a");
        for i in 0..depth {
            bytes.push(b'A');
            bytes.extend_from_slice(&u32::try_from((depth - i - 1) * 5).unwrap().to_be_bytes());
        }
        assert!(decode_table(&bytes).is_err());
    }

    #[test]
    fn bits_pack_lsb_first_and_restart_after_other_types() {
        let mut buf = BytesMut::new();
        let mut w = Writer::new(&mut buf);
        w.bit(&true);
        w.bit(&false);
        w.bit(&true);
        w.octet(&7);
        w.bit(&true);
        w.finish();
        assert_eq!(&buf[..], &[0b101, 7, 1]);
        let data = buf.freeze();
        let mut r = Reader::new(&data);
        assert!(r.bit().unwrap());
        assert!(!r.bit().unwrap());
        assert!(r.bit().unwrap());
        assert_eq!(r.octet().unwrap(), 7);
        assert!(r.bit().unwrap());
        r.finish().unwrap();
    }

    #[test]
    fn nine_bits_take_two_octets() {
        let mut buf = BytesMut::new();
        let mut w = Writer::new(&mut buf);
        for i in 0..9 {
            w.bit(&(i % 2 == 0));
        }
        w.finish();
        assert_eq!(&buf[..], &[0b0101_0101, 1]);
    }

    #[test]
    fn long_shortstr_is_truncated_on_a_char_boundary() {
        let s = "é".repeat(200); // 400 bytes
        let mut buf = BytesMut::new();
        put_shortstr(&mut buf, &s);
        assert_eq!(buf[0], 254);
        let data = buf.freeze();
        let got = Reader::new(&data).shortstr().unwrap();
        assert_eq!(got, "é".repeat(127));
    }

    #[test]
    fn longstr_is_a_slice_of_the_payload() {
        let data = Bytes::from_static(b"\x00\x00\x00\x03abc");
        let s = Reader::new(&data).longstr().unwrap();
        assert_eq!(&s[..], b"abc");
        assert_eq!(s.as_ptr(), data[4..].as_ptr());
    }
}
