//! A bounds-checked cursor over one packet's bytes. Every read checks what is
//! left first, so a lying length field is a `Malformed` error, never a panic;
//! strings and binaries are slices of the packet's `Bytes` (no copy for binary).

use bytes::{Buf, Bytes};

use super::error::{CodecError, CodecResult};

pub(crate) struct Reader {
    buf: Bytes,
    /// Offset of `buf`'s start within the packet, for error messages.
    base: usize,
    consumed: usize,
}

impl Reader {
    pub(crate) fn new(buf: Bytes, base: usize) -> Self {
        Reader {
            buf,
            base,
            consumed: 0,
        }
    }

    pub(crate) fn offset(&self) -> usize {
        self.base + self.consumed
    }

    fn short(&self, what: &'static str) -> CodecError {
        CodecError::Malformed {
            offset: self.offset(),
            what,
        }
    }

    pub(crate) fn has_remaining(&self) -> bool {
        self.buf.has_remaining()
    }

    fn need(&self, n: usize, what: &'static str) -> CodecResult<()> {
        if self.buf.remaining() < n {
            Err(self.short(what))
        } else {
            Ok(())
        }
    }

    pub(crate) fn u8(&mut self) -> CodecResult<u8> {
        self.need(1, "truncated byte")?;
        self.consumed += 1;
        Ok(self.buf.get_u8())
    }

    pub(crate) fn u16(&mut self) -> CodecResult<u16> {
        self.need(2, "truncated two-byte integer")?;
        self.consumed += 2;
        Ok(self.buf.get_u16())
    }

    pub(crate) fn u32(&mut self) -> CodecResult<u32> {
        self.need(4, "truncated four-byte integer")?;
        self.consumed += 4;
        Ok(self.buf.get_u32())
    }

    /// A variable byte integer (1 to 4 bytes, 7 bits each, low group first).
    pub(crate) fn varint(&mut self) -> CodecResult<u32> {
        let mut value: u32 = 0;
        for i in 0..4 {
            let b = self.u8()?;
            value |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(self.short("variable byte integer longer than 4 bytes"))
    }

    /// `n` bytes as a shared slice.
    pub(crate) fn bytes(&mut self, n: usize) -> CodecResult<Bytes> {
        self.need(n, "length field exceeds the packet")?;
        self.consumed += n;
        Ok(self.buf.split_to(n))
    }

    /// A sub-reader over the next `n` bytes.
    pub(crate) fn sub(&mut self, n: usize) -> CodecResult<Reader> {
        let base = self.offset();
        let buf = self.bytes(n)?;
        Ok(Reader::new(buf, base))
    }

    /// Binary data: two-byte length, then the bytes.
    pub(crate) fn binary(&mut self) -> CodecResult<Bytes> {
        let n = self.u16()?;
        self.bytes(usize::from(n))
    }

    /// A UTF-8 string (two-byte length). MQTT forbids invalid UTF-8 and U+0000
    /// (spec 1.5.4); both make the packet malformed.
    pub(crate) fn string(&mut self) -> CodecResult<String> {
        let at = self.offset();
        let raw = self.binary()?;
        let s = std::str::from_utf8(&raw).map_err(|_| CodecError::Malformed {
            offset: at,
            what: "invalid UTF-8 string",
        })?;
        if s.contains('\0') {
            return Err(CodecError::Malformed {
                offset: at,
                what: "string contains U+0000",
            });
        }
        Ok(s.to_owned())
    }

    /// Everything left.
    pub(crate) fn rest(&mut self) -> Bytes {
        self.consumed += self.buf.len();
        std::mem::take(&mut self.buf)
    }
}
