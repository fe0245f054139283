//! Codec errors: what was wrong with the bytes, where, and which MQTT 5 reason
//! code the session closes the connection with.

use super::reason;

/// A packet that cannot be decoded (or encoded). Decoding stops at the first
/// error: the connection is closed, so nothing after it needs parsing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The bytes do not follow the grammar (bad length, bad UTF-8, truncated
    /// field, unknown property). `offset` counts from the packet's first byte.
    #[error("malformed packet at offset {offset}: {what}")]
    Malformed { offset: usize, what: &'static str },
    /// Well-formed bytes that the protocol forbids (reserved flags, QoS 3,
    /// a repeated property, a packet type the client may not send).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// The fixed header announces more than the limit; refused before the body
    /// is buffered.
    #[error("packet of {size} bytes exceeds the maximum packet size of {limit}")]
    TooLarge { size: usize, limit: usize },
    /// CONNECT names a protocol or level we do not serve.
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocol { name: String, level: u8 },
}

impl CodecError {
    /// The MQTT 5 reason code for a DISCONNECT (or CONNACK) caused by this error.
    pub fn reason_code(&self) -> u8 {
        match self {
            CodecError::Malformed { .. } => reason::MALFORMED_PACKET,
            CodecError::Protocol(_) => reason::PROTOCOL_ERROR,
            CodecError::TooLarge { .. } => reason::PACKET_TOO_LARGE,
            CodecError::UnsupportedProtocol { .. } => reason::UNSUPPORTED_PROTOCOL_VERSION,
        }
    }
}

pub type CodecResult<T> = Result<T, CodecError>;
