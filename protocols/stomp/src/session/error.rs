//! What a session answers with an ERROR frame: a short `message` header and a
//! readable body, plus any header that helps (the `version` list when no common
//! version exists). Every such error ends the connection, as the spec requires
//! after an ERROR.

use switchyard_core::CoreError;

use crate::codec::CodecError;
use crate::mapping::{BadDestination, BadHeader};

/// A refused frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    /// The ERROR frame's `message` header: short, stable.
    pub message: String,
    /// The body: what was wrong, readably.
    pub detail: String,
    /// Extra headers for the ERROR frame.
    pub headers: Vec<(String, String)>,
}

impl FrameError {
    pub fn new(message: impl Into<String>, detail: impl Into<String>) -> Self {
        FrameError {
            message: message.into(),
            detail: detail.into(),
            headers: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    pub fn missing_header(command: &str, header: &str) -> Self {
        FrameError::new(
            "missing header",
            format!("{command} frame is missing the required '{header}' header"),
        )
    }
}

/// A core refusal keeps RabbitMQ's category as the short message
/// (`NOT_FOUND`) and its full text as the body.
impl From<CoreError> for FrameError {
    fn from(e: CoreError) -> Self {
        FrameError::new(e.kind.name(), e.to_string())
    }
}

impl From<CodecError> for FrameError {
    fn from(e: CodecError) -> Self {
        FrameError::new(e.summary(), e.to_string())
    }
}

impl From<BadDestination> for FrameError {
    fn from(e: BadDestination) -> Self {
        FrameError::new("invalid destination", e.to_string())
    }
}

impl From<BadHeader> for FrameError {
    fn from(e: BadHeader) -> Self {
        FrameError::new("invalid header", e.to_string())
    }
}
