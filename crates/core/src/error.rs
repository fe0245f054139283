//! The core's error type: what went wrong, in RabbitMQ's categories, with the
//! human-readable text RabbitMQ uses. Each protocol adapter turns the kind into its
//! own signal (an AMQP reply code, an MQTT reason code, a STOMP ERROR frame).

use std::fmt;

/// The category of a refused operation. The names follow AMQP's reply codes
/// because those are the categories RabbitMQ users already know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The named entity does not exist (AMQP 404).
    NotFound,
    /// The user may not do this, or the name is reserved (AMQP 403).
    AccessRefused,
    /// Another connection owns it exclusively (AMQP 405).
    ResourceLocked,
    /// The request contradicts existing state or is invalid (AMQP 406).
    PreconditionFailed,
    /// The request is malformed for this broker (AMQP 503).
    CommandInvalid,
    /// The vhost may not be used (AMQP 530, a connection-level error).
    NotAllowed,
    /// A resource limit was hit (AMQP 506).
    ResourceError,
    /// Valid but not supported (AMQP 540).
    NotImplemented,
}

impl ErrorKind {
    /// RabbitMQ's upper-case name of the category, which prefixes its reply texts.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "NOT_FOUND",
            ErrorKind::AccessRefused => "ACCESS_REFUSED",
            ErrorKind::ResourceLocked => "RESOURCE_LOCKED",
            ErrorKind::PreconditionFailed => "PRECONDITION_FAILED",
            ErrorKind::CommandInvalid => "COMMAND_INVALID",
            ErrorKind::NotAllowed => "NOT_ALLOWED",
            ErrorKind::ResourceError => "RESOURCE_ERROR",
            ErrorKind::NotImplemented => "NOT_IMPLEMENTED",
        }
    }
}

/// A refused core operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct CoreError {
    pub kind: ErrorKind,
    /// The explanation, without the category prefix.
    pub text: String,
}

impl fmt::Display for CoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} - {}", self.kind.name(), self.text)
    }
}

impl CoreError {
    pub fn new(kind: ErrorKind, text: impl Into<String>) -> Self {
        CoreError {
            kind,
            text: text.into(),
        }
    }
    pub fn not_found(text: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, text)
    }
    pub fn access_refused(text: impl Into<String>) -> Self {
        Self::new(ErrorKind::AccessRefused, text)
    }
    pub fn precondition(text: impl Into<String>) -> Self {
        Self::new(ErrorKind::PreconditionFailed, text)
    }
    pub fn locked(text: impl Into<String>) -> Self {
        Self::new(ErrorKind::ResourceLocked, text)
    }
    pub fn command_invalid(text: impl Into<String>) -> Self {
        Self::new(ErrorKind::CommandInvalid, text)
    }
    pub fn not_allowed(text: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotAllowed, text)
    }
    pub fn not_implemented(text: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotImplemented, text)
    }
}

pub type CoreResult<T> = Result<T, CoreError>;
