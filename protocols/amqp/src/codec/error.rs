//! What can be wrong with bytes a peer sent, and which AMQP reply code says so.
//!
//! The codec only reports; the session decides what to send. Every variant maps to
//! the reply code RabbitMQ uses for the same fault (`rabbit_reader`,
//! `rabbit_binary_parser`), so a client sees the same connection.close from us as
//! from RabbitMQ. All of these are connection-level (hard) errors: after a framing
//! or syntax error the stream position can no longer be trusted.

use super::reply_code;

/// A fault in the bytes received from a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The 8 bytes a client opened with are not `AMQP\0\0\x09\x01` (this includes
    /// the older `AMQP\x01\x01\x00\x09` of 0-9 and 0-8). The spec's answer is not a
    /// connection.close: the server writes its own protocol header and closes the
    /// socket. The bytes received are kept for the log.
    #[error("unsupported protocol header {0:02x?}")]
    BadProtocolHeader([u8; 8]),

    /// The frame header announces a payload larger than the negotiated frame-max
    /// allows (`size + 8 > max`). Detected from the 7-byte header alone, before
    /// any of the payload is buffered.
    #[error("frame payload of {size} bytes exceeds frame-max {max}")]
    FrameTooLarge { size: u32, max: u32 },

    /// The octet after the payload is not the frame-end marker 0xCE: the peer's
    /// framing and ours disagree, so nothing after this point can be parsed.
    #[error("bad frame-end octet {got:#04x}, expected 0xce")]
    BadFrameEnd { got: u8 },

    /// The frame type octet is not one of method (1), header (2), body (3) or
    /// heartbeat (8).
    #[error("unknown frame type {0}")]
    UnknownFrameType(u8),

    /// A frame whose payload cannot even be split into its fixed parts: a method
    /// frame shorter than its class and method ids, a content header shorter than
    /// its 12 fixed bytes, a heartbeat with a payload. RabbitMQ treats these as
    /// frame errors (`analyze_frame` returns `error`), not syntax errors.
    #[error("malformed frame of type {frame_type}: {what}")]
    MalformedFrame { frame_type: u8, what: &'static str },

    /// A method frame naming a class/method pair this codec does not know.
    #[error("unknown method {class_id}/{method_id}")]
    UnknownMethod { class_id: u16, method_id: u16 },

    /// The payload of a method or content-header frame does not follow the
    /// grammar: truncated arguments, a string that is not UTF-8, an unknown field
    /// value tag, a table whose length runs past its container, nesting deeper
    /// than the limit, trailing bytes. `offset` counts from the first payload byte
    /// of the frame (the byte after the 7-byte frame header).
    #[error("syntax error at payload offset {offset}: {what}")]
    Syntax { offset: usize, what: &'static str },
}

impl CodecError {
    /// The AMQP reply code for the connection.close the session sends for this
    /// error:
    ///
    /// - 501 `FRAME_ERROR` for frame-level faults (bad protocol header, frame too
    ///   large, bad frame end, unknown frame type, malformed frame). For
    ///   [`CodecError::BadProtocolHeader`] no close is sent at all (the server
    ///   answers with its protocol header); 501 is only what a log should show.
    /// - 502 `SYNTAX_ERROR` for a malformed method or content-header payload.
    /// - 540 `NOT_IMPLEMENTED` for an unknown class/method pair.
    pub fn reply_code(&self) -> u16 {
        match self {
            CodecError::BadProtocolHeader(_)
            | CodecError::FrameTooLarge { .. }
            | CodecError::BadFrameEnd { .. }
            | CodecError::UnknownFrameType(_)
            | CodecError::MalformedFrame { .. } => reply_code::FRAME_ERROR,
            CodecError::Syntax { .. } => reply_code::SYNTAX_ERROR,
            CodecError::UnknownMethod { .. } => reply_code::NOT_IMPLEMENTED,
        }
    }
}
