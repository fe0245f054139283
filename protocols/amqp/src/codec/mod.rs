//! AMQP 0-9-1 wire codec: bytes <-> frames. Pure: no I/O, no async, no core calls.
//!
//! Grammar (AMQP 0-9-1 sections 4.2.2 to 4.2.7):
//!
//! ```text
//! amqp            = protocol-header *amqp-unit
//! protocol-header = "AMQP" %d0 %d0 %d9 %d1
//! amqp-unit       = method-frame / content-header-frame / body-frame / heartbeat-frame
//! frame           = frame-type channel size payload frame-end
//! frame-type      = %d1 (method) / %d2 (header) / %d3 (body) / %d8 (heartbeat)
//! channel         = short
//! size            = long                  ; payload length; size + 8 <= frame-max
//! frame-end       = %xCE
//! method-payload  = class-id method-id *argument              ; see `method`
//! header-payload  = class-id weight body-size property-flags property-list
//!                                                             ; see `properties`
//! body-payload    = *octet                ; a slice of the message body
//! heartbeat       = empty payload, channel 0
//! ```
//!
//! Decoding is incremental: [`decode_frame`] returns `Ok(None)` until a whole
//! frame is buffered, and checks the frame type and the announced size against
//! frame-max from the 7-byte header alone, so an oversized frame is refused before
//! any of it is buffered. Body payloads (and long strings) are slices of the read
//! buffer (`split_to(..).freeze()`), never copies. Tables and properties decode
//! straight into the core's [`FieldTable`](switchyard_core::field::FieldTable) and
//! [`Properties`]. Encoding appends to a caller's `BytesMut` and back-patches
//! length prefixes, so a frame costs no allocation of its own.
//!
//! What the codec does not do: it does not check that a channel is open, that a
//! header follows its method, that a heartbeat is on channel 0, or that the body
//! size matches the body frames. That is the session's job.

mod error;
mod method;
mod properties;
mod types;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use switchyard_core::message::Properties;
use switchyard_driver::Sink;

pub use error::CodecError;
pub use method::*;
pub use types::MAX_NESTING_DEPTH;

use properties::{decode_properties, encode_properties};
use types::{with_length_prefix, Reader};

/// The protocol header of AMQP 0-9-1, which a client sends first and a server
/// sends back before closing when it does not support what the client asked for.
pub const PROTOCOL_HEADER: [u8; 8] = *b"AMQP\x00\x00\x09\x01";

/// The smallest frame-max a peer may negotiate, and the limit before
/// connection.tune-ok has been received.
pub const FRAME_MIN_SIZE: u32 = 4096;

pub const FRAME_METHOD: u8 = 1;
pub const FRAME_HEADER: u8 = 2;
pub const FRAME_BODY: u8 = 3;
pub const FRAME_HEARTBEAT: u8 = 8;
pub const FRAME_END: u8 = 0xCE;

/// Frame type, channel and size.
pub const FRAME_HEADER_SIZE: usize = 7;
/// What a frame adds to its payload: the 7-byte header and the frame-end octet.
/// A frame-max of N leaves N - 8 bytes for the payload.
pub const FRAME_OVERHEAD: u32 = 8;

/// The class id of `basic`, the only class with content.
pub const BASIC_CLASS_ID: u16 = 60;

/// AMQP reply codes, for connection.close, channel.close and basic.return.
pub mod reply_code {
    pub const REPLY_SUCCESS: u16 = 200;
    pub const CONTENT_TOO_LARGE: u16 = 311;
    pub const NO_ROUTE: u16 = 312;
    pub const NO_CONSUMERS: u16 = 313;
    pub const CONNECTION_FORCED: u16 = 320;
    pub const INVALID_PATH: u16 = 402;
    pub const ACCESS_REFUSED: u16 = 403;
    pub const NOT_FOUND: u16 = 404;
    pub const RESOURCE_LOCKED: u16 = 405;
    pub const PRECONDITION_FAILED: u16 = 406;
    pub const FRAME_ERROR: u16 = 501;
    pub const SYNTAX_ERROR: u16 = 502;
    pub const COMMAND_INVALID: u16 = 503;
    pub const CHANNEL_ERROR: u16 = 504;
    pub const UNEXPECTED_FRAME: u16 = 505;
    pub const RESOURCE_ERROR: u16 = 506;
    pub const NOT_ALLOWED: u16 = 530;
    pub const NOT_IMPLEMENTED: u16 = 540;
    pub const INTERNAL_ERROR: u16 = 541;
}

/// A client opened with the AMQP 0-9-1 protocol header, the only one accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolHeader;

/// Reads the 8-byte protocol header a client opens with.
///
/// `Ok(None)` until 8 bytes are buffered. Any other header (including AMQP 0-9's
/// `AMQP\x01\x01\x00\x09` and 0-8's `AMQP\x01\x01\x00\x08`) is
/// [`CodecError::BadProtocolHeader`]; the spec says the server then writes
/// [`PROTOCOL_HEADER`] and closes the socket. The 8 bytes are consumed either way.
pub fn decode_protocol_header(buf: &mut BytesMut) -> Result<Option<ProtocolHeader>, CodecError> {
    let Some(Ok(header)) = buf.get(..8).map(<[u8; 8]>::try_from) else {
        return Ok(None);
    };
    buf.advance(8);
    if header == PROTOCOL_HEADER {
        Ok(Some(ProtocolHeader))
    } else {
        Err(CodecError::BadProtocolHeader(header))
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Method {
        channel: u16,
        method: Method,
    },
    /// A content header. `class_id` is passed through unchecked (the session
    /// compares it with the method it follows); the properties are always read
    /// with basic's layout, the only content class.
    Header {
        channel: u16,
        class_id: u16,
        body_size: u64,
        properties: Properties,
    },
    /// A body frame; `payload` shares the read buffer's memory.
    Body {
        channel: u16,
        payload: Bytes,
    },
    /// A heartbeat, whatever channel it arrived on (the spec requires 0; the
    /// session enforces it).
    Heartbeat {
        channel: u16,
    },
}

/// Decodes one frame from the front of `buf`, removing it.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame (never an error
/// for that), leaving `buf` untouched. The frame type and the size limit are
/// checked as soon as the 7-byte header is there: `size + 8 > frame_max` is
/// [`CodecError::FrameTooLarge`] without waiting for the payload. `frame_max` 0
/// means no limit (as in connection.tune), i.e. `u32::MAX`; a server should
/// always pass its real limit, [`FRAME_MIN_SIZE`] before tuning.
///
/// After an error the buffer position is undefined; the connection must close.
pub fn decode_frame(buf: &mut BytesMut, frame_max: u32) -> Result<Option<Frame>, CodecError> {
    let Some(Ok(header)) = buf
        .get(..FRAME_HEADER_SIZE)
        .map(<[u8; FRAME_HEADER_SIZE]>::try_from)
    else {
        return Ok(None);
    };
    let [frame_type, c0, c1, s0, s1, s2, s3] = header;
    if !matches!(
        frame_type,
        FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
    ) {
        return Err(CodecError::UnknownFrameType(frame_type));
    }
    let channel = u16::from_be_bytes([c0, c1]);
    let size = u32::from_be_bytes([s0, s1, s2, s3]);
    let max = if frame_max == 0 { u32::MAX } else { frame_max };
    if u64::from(size) + u64::from(FRAME_OVERHEAD) > u64::from(max) {
        return Err(CodecError::FrameTooLarge { size, max });
    }
    // Within frame-max, so within u32 and (on 32-bit targets too) within usize.
    let too_large = CodecError::FrameTooLarge { size, max };
    let payload_len = usize::try_from(size).map_err(|_| too_large.clone())?;
    let total = payload_len
        .checked_add(FRAME_HEADER_SIZE + 1)
        .ok_or(too_large)?;
    let Some(&end) = buf.get(total - 1) else {
        return Ok(None);
    };
    if end != FRAME_END {
        return Err(CodecError::BadFrameEnd { got: end });
    }

    let mut frame = buf.split_to(total);
    frame.advance(FRAME_HEADER_SIZE);
    frame.truncate(payload_len);
    let payload = frame.freeze();

    let frame = match frame_type {
        FRAME_METHOD => Frame::Method {
            channel,
            method: Method::decode(&payload)?,
        },
        FRAME_HEADER => decode_header_payload(channel, &payload)?,
        FRAME_BODY => Frame::Body { channel, payload },
        _ => {
            if !payload.is_empty() {
                return Err(CodecError::MalformedFrame {
                    frame_type,
                    what: "heartbeat frame with a payload",
                });
            }
            Frame::Heartbeat { channel }
        }
    };
    Ok(Some(frame))
}

fn decode_header_payload(channel: u16, payload: &Bytes) -> Result<Frame, CodecError> {
    if payload.len() < 12 {
        return Err(CodecError::MalformedFrame {
            frame_type: FRAME_HEADER,
            what: "content header shorter than class-id, weight and body-size",
        });
    }
    let mut r = Reader::new(payload);
    let class_id = r.short()?;
    // The weight is unused in 0-9-1 and must be zero; RabbitMQ ignores it too.
    let _weight = r.short()?;
    let body_size = r.longlong()?;
    let properties = decode_properties(&mut r)?;
    r.finish()?;
    Ok(Frame::Header {
        channel,
        class_id,
        body_size,
        properties,
    })
}

/// Writes one frame whose payload `payload` appends, back-patching the size.
fn put_frame(
    buf: &mut BytesMut,
    frame_type: u8,
    channel: u16,
    payload: impl FnOnce(&mut BytesMut),
) {
    buf.put_u8(frame_type);
    buf.put_u16(channel);
    with_length_prefix(buf, payload);
    buf.put_u8(FRAME_END);
}

/// Appends a method frame.
///
/// Short strings longer than 255 bytes are cut at a character boundary (see the
/// session's duty to validate names); nothing else can fail.
pub fn encode_method(buf: &mut BytesMut, channel: u16, method: &Method) {
    put_frame(buf, FRAME_METHOD, channel, |buf| method.encode(buf));
}

/// Appends a content header frame (weight 0).
pub fn encode_header(
    buf: &mut BytesMut,
    channel: u16,
    class_id: u16,
    body_size: u64,
    properties: &Properties,
) {
    put_frame(buf, FRAME_HEADER, channel, |buf| {
        buf.put_u16(class_id);
        buf.put_u16(0);
        buf.put_u64(body_size);
        encode_properties(buf, properties);
    });
}

/// Appends one body frame holding `payload`, which the caller keeps within
/// frame-max - 8 bytes ([`encode_content`] does the splitting).
pub fn encode_body(buf: &mut BytesMut, channel: u16, payload: &[u8]) {
    put_frame(buf, FRAME_BODY, channel, |buf| buf.put_slice(payload));
}

/// Appends a heartbeat frame (always channel 0).
pub fn encode_heartbeat(buf: &mut BytesMut) {
    buf.put_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

/// Appends a content-carrying method, its header and its body split into body
/// frames of at most `frame_max - 8` payload bytes (`frame_max` 0 = no limit). An
/// empty body gets no body frame, as the spec says.
pub fn encode_content(
    out: &mut impl Sink,
    channel: u16,
    method: &Method,
    properties: &Properties,
    body: &Bytes,
    frame_max: u32,
) {
    let max = if frame_max == 0 { u32::MAX } else { frame_max };
    // max(1) keeps a nonsensical frame_max below 9 from looping forever (chunks(0)
    // would panic); the session never negotiates below FRAME_MIN_SIZE.
    let chunk = usize::try_from(max.saturating_sub(FRAME_OVERHEAD))
        .unwrap_or(usize::MAX)
        .max(1);
    let body_frames = body.len().div_ceil(chunk);
    // One reservation for the whole message: the body and each frame's overhead,
    // plus a guess for the method and header frames. Saturating, because only
    // the hint would overflow, not the frames.
    let overhead = body_frames.saturating_mul(FRAME_OVERHEAD as usize);
    // Body frames large enough are written from the message's own buffer
    // (see `switchyard_driver::Output`): only their 8 framing bytes are ours.
    let shared = out.shares(chunk.min(body.len()));
    let copied = if shared { 0 } else { body.len() };
    let buf = out.bytes();
    buf.reserve(copied.saturating_add(overhead).saturating_add(256));
    encode_method(buf, channel, method);
    let body_size = u64::try_from(body.len()).unwrap_or(u64::MAX);
    encode_header(buf, channel, method.class_id(), body_size, properties);
    let mut from = 0;
    while from < body.len() {
        let to = from.saturating_add(chunk).min(body.len());
        let part = body.slice(from..to);
        if out.shares(part.len()) {
            let buf = out.bytes();
            buf.put_u8(FRAME_BODY);
            buf.put_u16(channel);
            buf.put_u32(u32::try_from(part.len()).unwrap_or(u32::MAX));
            out.put_body(&part);
            out.bytes().put_u8(FRAME_END);
        } else {
            encode_body(out.bytes(), channel, &part);
        }
        from = to;
    }
}

/// Appends any frame; the inverse of [`decode_frame`].
pub fn encode_frame(buf: &mut BytesMut, frame: &Frame) {
    match frame {
        Frame::Method { channel, method } => encode_method(buf, *channel, method),
        Frame::Header {
            channel,
            class_id,
            body_size,
            properties,
        } => encode_header(buf, *channel, *class_id, *body_size, properties),
        Frame::Body { channel, payload } => encode_body(buf, *channel, payload),
        Frame::Heartbeat { channel } => {
            put_frame(buf, FRAME_HEARTBEAT, *channel, |_| {});
        }
    }
}

/// Decodes the entries of a field table that comes without its 4-byte length
/// prefix: the AMQPLAIN response to connection.start-ok is such a table.
pub fn decode_table_body(body: &Bytes) -> Result<switchyard_core::FieldTable, CodecError> {
    let len = u32::try_from(body.len()).map_err(|_| CodecError::Syntax {
        offset: 0,
        what: "table too long",
    })?;
    let mut framed = BytesMut::with_capacity(body.len() + 4);
    framed.put_u32(len);
    framed.put_slice(body);
    let framed = framed.freeze();
    let mut reader = Reader::new(&framed);
    let table = reader.table()?;
    reader.finish()?;
    Ok(table)
}
