//! The one error type every backend returns.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::config::ConfigError;

/// A boxed error cause, shareable so one failure can be reported to every event of a batch.
pub type Cause = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Where something happened in a stream: the position a malformed input was found at.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Position {
    /// A line of a text input (1-based), with its byte offset.
    Line {
        /// 1-based line number.
        line: u64,
        /// Byte offset of the line's start.
        offset: u64,
    },
    /// A byte offset in a file.
    Offset(u64),
    /// A Kafka partition and offset.
    Partition {
        /// The partition.
        partition: i32,
        /// The offset in it.
        offset: i64,
    },
    /// A SQL row id.
    Row(i64),
    /// An AMQP delivery tag.
    DeliveryTag(u64),
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Line { line, offset } => write!(f, "line {line} (byte {offset})"),
            Position::Offset(o) => write!(f, "byte offset {o}"),
            Position::Partition { partition, offset } => write!(f, "partition {partition} offset {offset}"),
            Position::Row(id) => write!(f, "row id {id}"),
            Position::DeliveryTag(t) => write!(f, "delivery tag {t}"),
        }
    }
}

/// Everything that can go wrong when publishing or consuming.
///
/// [`Error::is_temporary`] tells failures worth retrying (the service is away, a deadline passed)
/// from permanent ones (bad configuration, an event the broker refuses), so retry logic can be
/// written once for every backend.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid; nothing was connected.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The service cannot be reached or refused the connection. Temporary.
    #[error("{backend}: cannot connect: {reason}")]
    Unavailable {
        /// The backend's type name.
        backend: &'static str,
        /// What happened, without secrets.
        reason: String,
        /// The client library's error.
        #[source]
        cause: Option<Cause>,
    },
    /// The service refused who we are: wrong user name or password, not authorized, a
    /// certificate it does not trust or that does not match, a TLS handshake that cannot
    /// succeed. A configuration problem: trying again with the same settings will not help.
    #[error(
        "{backend}: cannot connect: {reason} (refused: check the credentials and certificates; trying again will not help)"
    )]
    Denied {
        /// The backend's type name.
        backend: &'static str,
        /// What happened, without secrets.
        reason: String,
        /// The client library's error.
        #[source]
        cause: Option<Cause>,
    },
    /// The broker refused this event (too large, invalid); other events are unaffected. Permanent.
    #[error("{backend}: event {event_id} rejected: {reason}")]
    Rejected {
        /// The backend's type name.
        backend: &'static str,
        /// The refused event's id.
        event_id: String,
        /// Why.
        reason: String,
    },
    /// Writing failed at the service (an I/O error, a failed commit). Temporary.
    #[error("{backend}: {operation} failed: {reason}")]
    Io {
        /// The backend's type name.
        backend: &'static str,
        /// What was being done ("writing rasa_event.log").
        operation: String,
        /// The cause, as text.
        reason: String,
        /// The underlying error.
        #[source]
        cause: Option<Cause>,
    },
    /// The broker was closed; nothing more is accepted.
    #[error("the broker is closed")]
    Closed,
    /// The buffer is full and the policy is `error`. Temporary.
    #[error("the buffer of {capacity} events is full (when_full: error)")]
    BufferFull {
        /// The configured capacity.
        capacity: usize,
    },
    /// Not delivered yet: the event is kept in the disk spool and goes out when the service is
    /// back, sent by this process or by the next one that opens the spool. Temporary; nothing is
    /// lost, and the event must not be published again by hand (it would arrive twice).
    #[error("{backend}: not delivered yet: kept in the disk spool, sent when the service is back")]
    Spooled {
        /// The layer's name (`spool`).
        backend: &'static str,
    },
    /// A deadline passed. Temporary.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// Input or a consumed message is not a valid event.
    #[error("malformed event at {position}: {reason}")]
    Malformed {
        /// Where.
        position: Position,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// Whether trying again later may succeed.
    pub fn is_temporary(&self) -> bool {
        matches!(
            self,
            Error::Unavailable { .. }
                | Error::Io { .. }
                | Error::BufferFull { .. }
                | Error::Timeout(_)
                | Error::Spooled { .. }
        )
    }

    /// An I/O failure of `backend` while doing `operation`.
    pub fn io(backend: &'static str, operation: impl Into<String>, err: std::io::Error) -> Error {
        Error::Io { backend, operation: operation.into(), reason: err.to_string(), cause: Some(Arc::new(err)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_and_permanent() {
        assert!(Error::Timeout(Duration::from_secs(1)).is_temporary());
        assert!(!Error::Closed.is_temporary());
        assert!(!Error::Denied { backend: "pika", reason: "403 ACCESS_REFUSED".into(), cause: None }.is_temporary());
        assert!(!Error::Rejected { backend: "file", event_id: "x".into(), reason: "too big".into() }.is_temporary());
    }
}
