//! The RabbitMQ Stream protocol's framing (PROTOCOL.adoc): a frame is a u32
//! size, then u16 key, u16 version and the command's fields; all integers
//! big-endian; `string` is an i16 length (-1: null) and UTF-8, `bytes` an i32
//! length (-1: null), arrays an i32 count. Responses carry the request's key
//! with the top bit set. Pure: no I/O, no state.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Command keys.
pub mod key {
    pub const DECLARE_PUBLISHER: u16 = 0x01;
    pub const PUBLISH: u16 = 0x02;
    pub const PUBLISH_CONFIRM: u16 = 0x03;
    pub const PUBLISH_ERROR: u16 = 0x04;
    pub const QUERY_PUBLISHER_SEQUENCE: u16 = 0x05;
    pub const DELETE_PUBLISHER: u16 = 0x06;
    pub const SUBSCRIBE: u16 = 0x07;
    pub const DELIVER: u16 = 0x08;
    pub const CREDIT: u16 = 0x09;
    pub const STORE_OFFSET: u16 = 0x0a;
    pub const QUERY_OFFSET: u16 = 0x0b;
    pub const UNSUBSCRIBE: u16 = 0x0c;
    pub const CREATE: u16 = 0x0d;
    pub const DELETE: u16 = 0x0e;
    pub const METADATA: u16 = 0x0f;
    pub const METADATA_UPDATE: u16 = 0x10;
    pub const PEER_PROPERTIES: u16 = 0x11;
    pub const SASL_HANDSHAKE: u16 = 0x12;
    pub const SASL_AUTHENTICATE: u16 = 0x13;
    pub const TUNE: u16 = 0x14;
    pub const OPEN: u16 = 0x15;
    pub const CLOSE: u16 = 0x16;
    pub const HEARTBEAT: u16 = 0x17;
    pub const ROUTE: u16 = 0x18;
    pub const PARTITIONS: u16 = 0x19;
    pub const CONSUMER_UPDATE: u16 = 0x1a;
    pub const EXCHANGE_COMMAND_VERSIONS: u16 = 0x1b;
    pub const STREAM_STATS: u16 = 0x1c;
    /// Set on the key of a response.
    pub const RESPONSE: u16 = 0x8000;
}

/// Response codes.
pub mod code {
    pub const OK: u16 = 0x01;
    pub const STREAM_DOES_NOT_EXIST: u16 = 0x02;
    pub const SUBSCRIPTION_ID_ALREADY_EXISTS: u16 = 0x03;
    pub const SUBSCRIPTION_ID_DOES_NOT_EXIST: u16 = 0x04;
    pub const STREAM_ALREADY_EXISTS: u16 = 0x05;
    pub const STREAM_NOT_AVAILABLE: u16 = 0x06;
    pub const SASL_MECHANISM_NOT_SUPPORTED: u16 = 0x07;
    pub const AUTHENTICATION_FAILURE: u16 = 0x08;
    pub const SASL_ERROR: u16 = 0x09;
    pub const AUTHENTICATION_FAILURE_LOOPBACK: u16 = 0x0b;
    pub const VIRTUAL_HOST_ACCESS_FAILURE: u16 = 0x0c;
    pub const UNKNOWN_FRAME: u16 = 0x0d;
    pub const FRAME_TOO_LARGE: u16 = 0x0e;
    pub const INTERNAL_ERROR: u16 = 0x0f;
    pub const ACCESS_REFUSED: u16 = 0x10;
    pub const PRECONDITION_FAILED: u16 = 0x11;
    pub const PUBLISHER_DOES_NOT_EXIST: u16 = 0x12;
    pub const NO_OFFSET: u16 = 0x13;
}

/// A frame that cannot be read: the connection is closed with `code`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text}")]
pub struct FrameError {
    pub code: u16,
    pub text: String,
}

impl FrameError {
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        FrameError {
            code,
            text: text.into(),
        }
    }

    fn truncated() -> Self {
        FrameError::new(code::UNKNOWN_FRAME, "frame shorter than its command")
    }
}

/// One frame, its size removed.
#[derive(Debug, Clone)]
pub struct Frame {
    pub key: u16,
    pub version: u16,
    /// The command's fields after key and version.
    pub body: Bytes,
}

/// Takes one whole frame off `input`; `Ok(None)` until it has arrived. A
/// frame larger than `max` (0: no limit) is an error before it is buffered.
pub fn decode_frame(input: &mut BytesMut, max: u32) -> Result<Option<Frame>, FrameError> {
    let Some(size) = input.get(..4).and_then(|b| <[u8; 4]>::try_from(b).ok()) else {
        return Ok(None);
    };
    let size = u32::from_be_bytes(size);
    if max != 0 && size > max {
        return Err(FrameError::new(
            code::FRAME_TOO_LARGE,
            format!("frame of {size} bytes is larger than the frame max of {max}"),
        ));
    }
    if size < 4 {
        return Err(FrameError::new(
            code::UNKNOWN_FRAME,
            "frame too short for a key and version",
        ));
    }
    let total = 4usize.saturating_add(usize::try_from(size).unwrap_or(usize::MAX));
    if input.len() < total {
        input.reserve(total - input.len());
        return Ok(None);
    }
    input.advance(4);
    let mut body = input.split_to(total - 4).freeze();
    let key = body.get_u16();
    let version = body.get_u16();
    Ok(Some(Frame { key, version, body }))
}

/// Reads a command's fields.
#[derive(Debug)]
pub struct Reader {
    buf: Bytes,
}

impl Reader {
    pub fn new(buf: Bytes) -> Self {
        Reader { buf }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    fn need(&self, n: usize) -> Result<(), FrameError> {
        if self.buf.len() < n {
            Err(FrameError::truncated())
        } else {
            Ok(())
        }
    }

    pub fn u8(&mut self) -> Result<u8, FrameError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }

    /// The next byte, left to read.
    pub fn peek_u8(&self) -> Result<u8, FrameError> {
        self.buf.first().copied().ok_or_else(FrameError::truncated)
    }

    pub fn u16(&mut self) -> Result<u16, FrameError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }

    pub fn u32(&mut self) -> Result<u32, FrameError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }

    pub fn i32(&mut self) -> Result<i32, FrameError> {
        self.need(4)?;
        Ok(self.buf.get_i32())
    }

    pub fn u64(&mut self) -> Result<u64, FrameError> {
        self.need(8)?;
        Ok(self.buf.get_u64())
    }

    pub fn i64(&mut self) -> Result<i64, FrameError> {
        self.need(8)?;
        Ok(self.buf.get_i64())
    }

    /// A string; null (length -1) is `None`.
    pub fn opt_string(&mut self) -> Result<Option<String>, FrameError> {
        let len = i16::from_be_bytes(self.u16()?.to_be_bytes());
        let Ok(len) = usize::try_from(len) else {
            return Ok(None);
        };
        self.need(len)?;
        let raw = self.buf.split_to(len);
        String::from_utf8(raw.to_vec())
            .map(Some)
            .map_err(|_| FrameError::new(code::UNKNOWN_FRAME, "string is not UTF-8"))
    }

    /// A string; null reads as empty.
    pub fn string(&mut self) -> Result<String, FrameError> {
        Ok(self.opt_string()?.unwrap_or_default())
    }

    /// `bytes`; null reads as empty.
    pub fn bytes(&mut self) -> Result<Bytes, FrameError> {
        let len = self.i32()?;
        let Ok(len) = usize::try_from(len) else {
            return Ok(Bytes::new());
        };
        self.raw(len)
    }

    pub fn raw(&mut self, len: usize) -> Result<Bytes, FrameError> {
        self.need(len)?;
        Ok(self.buf.split_to(len))
    }

    /// An array's count (a negative count is empty). The count is not trusted
    /// to size anything: each item still has to be read.
    pub fn count(&mut self) -> Result<usize, FrameError> {
        Ok(usize::try_from(self.i32()?).unwrap_or(0))
    }

    /// `[Key Value]` of strings.
    pub fn properties(&mut self) -> Result<Vec<(String, String)>, FrameError> {
        let n = self.count()?;
        let mut out = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            out.push((self.string()?, self.string()?));
        }
        Ok(out)
    }
}

/// Writes one frame into `out`; the size is filled in by [`Writer::finish`].
pub struct Writer<'a> {
    out: &'a mut BytesMut,
    start: usize,
}

impl<'a> Writer<'a> {
    pub fn start(out: &'a mut BytesMut, key: u16, version: u16) -> Self {
        let start = out.len();
        out.put_u32(0);
        out.put_u16(key);
        out.put_u16(version);
        Writer { out, start }
    }

    /// A response to the request with `correlation` (`code` follows).
    pub fn response(out: &'a mut BytesMut, key: u16, correlation: u32, code: u16) -> Self {
        let mut w = Writer::start(out, key | key::RESPONSE, 1);
        w.u32(correlation);
        w.u16(code);
        w
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.out.put_u8(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.out.put_u16(v);
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.out.put_u32(v);
        self
    }

    pub fn i32(&mut self, v: i32) -> &mut Self {
        self.out.put_i32(v);
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.out.put_u64(v);
        self
    }

    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.out.put_i64(v);
        self
    }

    /// A string (cut at 32767 bytes, the most an i16 length can say).
    pub fn string(&mut self, s: &str) -> &mut Self {
        let bytes = s.as_bytes();
        let bytes = bytes
            .get(..bytes.len().min(i16::MAX as usize))
            .unwrap_or(bytes);
        self.out
            .put_i16(i16::try_from(bytes.len()).unwrap_or(i16::MAX));
        self.out.put_slice(bytes);
        self
    }

    pub fn count(&mut self, n: usize) -> &mut Self {
        self.out.put_i32(i32::try_from(n).unwrap_or(i32::MAX));
        self
    }

    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.out.put_slice(b);
        self
    }

    pub fn properties<'p>(
        &mut self,
        props: impl ExactSizeIterator<Item = (&'p str, &'p str)>,
    ) -> &mut Self {
        self.count(props.len());
        for (k, v) in props {
            self.string(k);
            self.string(v);
        }
        self
    }

    /// Fills in the size.
    pub fn finish(self) {
        let size = u32::try_from(self.out.len() - self.start - 4).unwrap_or(u32::MAX);
        if let Some(slot) = self.out.get_mut(self.start..self.start + 4) {
            slot.copy_from_slice(&size.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_wait_for_their_end() {
        let mut out = BytesMut::new();
        let mut w = Writer::start(&mut out, key::OPEN, 1);
        w.u32(7).string("/").properties([("a", "b")].into_iter());
        w.finish();
        let whole = out.clone();
        let mut part = BytesMut::from(&whole[..whole.len() - 1]);
        assert!(decode_frame(&mut part, 0).unwrap().is_none());
        let mut input = whole;
        let f = decode_frame(&mut input, 0).unwrap().unwrap();
        assert!(input.is_empty());
        assert_eq!((f.key, f.version), (key::OPEN, 1));
        let mut r = Reader::new(f.body);
        assert_eq!(r.u32().unwrap(), 7);
        assert_eq!(r.string().unwrap(), "/");
        assert_eq!(r.properties().unwrap(), vec![("a".into(), "b".into())]);
        assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn bad_frames_are_errors() {
        let mut big = BytesMut::from(&[0, 0, 0x20, 1, 0, 1][..]);
        assert_eq!(
            decode_frame(&mut big, 8192).unwrap_err().code,
            code::FRAME_TOO_LARGE
        );
        let mut short = BytesMut::from(&[0, 0, 0, 2, 0, 1][..]);
        assert!(decode_frame(&mut short, 0).is_err());
        let mut r = Reader::new(Bytes::from_static(&[0, 5, b'a']));
        assert!(r.string().is_err());
        let mut r = Reader::new(Bytes::from_static(&[0xff, 0xff]));
        assert_eq!(r.opt_string().unwrap(), None);
        let mut r = Reader::new(Bytes::from_static(&[0x7f, 0xff, 0xff, 0xff]));
        assert!(r.bytes().is_err());
    }
}
