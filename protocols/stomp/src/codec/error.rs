//! What can be wrong with the bytes a STOMP peer sent.
//!
//! The codec only reports; the session turns every variant into an ERROR frame
//! (its `message` header is [`CodecError::summary`], its body the `Display` text)
//! and closes the connection, since after a framing error the stream position can
//! no longer be trusted. Offsets count from the first byte of the frame being
//! decoded (after any heart-beat EOLs before it), so a log line points at the
//! exact byte.

use std::fmt;

/// A fault in the bytes received from a peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The command line names no STOMP command (or is not upper-case ASCII).
    #[error("unknown command '{command}'")]
    UnknownCommand { command: String },

    /// A header line without the `:` that separates name and value.
    #[error("header line at byte {offset} of the frame has no ':'")]
    NoColon { offset: usize },

    /// A backslash followed by something the frame's version does not define
    /// (1.1: `\n \c \\`; 1.2 adds `\r`). The spec makes this a fatal error.
    #[error("undefined escape sequence {sequence} in a header at byte {offset} of the frame (STOMP {version} defines {allowed})")]
    BadEscape {
        offset: usize,
        sequence: Escaped,
        version: &'static str,
        allowed: &'static str,
    },

    /// A header name or value that is not UTF-8 (the spec's encoding for headers).
    #[error("header at byte {offset} of the frame is not valid UTF-8")]
    NotUtf8 { offset: usize },

    /// More header lines than the configured limit. Detected as the line that
    /// crosses the limit ends, before any more of the frame is buffered.
    #[error("frame has more than {limit} headers")]
    TooManyHeaders { limit: usize },

    /// A command or header line longer than the configured limit, detected as
    /// soon as that many bytes of the line are buffered.
    #[error("header line at byte {offset} of the frame is longer than {limit} bytes")]
    HeaderTooLong { offset: usize, limit: usize },

    /// A body larger than the configured limit: from `content-length` before any
    /// of the body is buffered, or, without one, once that many bytes arrived
    /// without the closing NUL.
    #[error("frame body of {size} bytes exceeds the limit of {limit} bytes")]
    BodyTooLarge { size: usize, limit: usize },

    /// A `content-length` that is not a decimal number.
    #[error("content-length '{value}' is not a non-negative decimal integer")]
    BadContentLength { value: String },

    /// The octet after a `content-length` body is not the NUL that ends a frame.
    #[error("the {length}-byte body given by content-length is followed by {found:#04x}, not NUL")]
    MissingNul { length: usize, found: u8 },
}

impl CodecError {
    /// A short text for the ERROR frame's `message` header.
    pub fn summary(&self) -> &'static str {
        match self {
            CodecError::UnknownCommand { .. } => "unknown command",
            CodecError::NoColon { .. }
            | CodecError::NotUtf8 { .. }
            | CodecError::MissingNul { .. } => "malformed frame",
            CodecError::BadEscape { .. } => "bad header escape",
            CodecError::TooManyHeaders { .. } => "too many headers",
            CodecError::HeaderTooLong { .. } => "header too long",
            CodecError::BodyTooLarge { .. } => "frame too large",
            CodecError::BadContentLength { .. } => "invalid content-length",
        }
    }
}

/// The two bytes of a bad escape sequence, shown readably (`\t`, `\x01`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Escaped(pub Option<u8>);

impl fmt::Display for Escaped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => write!(f, "'\\' at the end of the header"),
            Some(b) if b.is_ascii_graphic() => write!(f, "'\\{}'", char::from(b)),
            Some(b) => write!(f, "'\\' followed by byte {b:#04x}"),
        }
    }
}
