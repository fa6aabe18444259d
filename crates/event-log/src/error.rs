//! The log's error type.

use std::io;

/// Everything that can go wrong in the event log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file operation failed.
    #[error("{op} failed")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The index database failed.
    #[error("index {op} failed: {message}")]
    Index {
        /// What was being done.
        op: &'static str,
        /// redb's error, as text.
        message: String,
    },
    /// The stream is not at the expected version (optimistic concurrency).
    #[error("stream {stream:?} is at version {actual}, expected {expected}")]
    Conflict {
        /// The stream.
        stream: String,
        /// The version the caller expected.
        expected: u64,
        /// The stream's current version.
        actual: u64,
    },
    /// The stream name is empty.
    #[error("stream name is empty")]
    EmptyStreamName,
    /// The stream name is longer than allowed.
    #[error("stream name is {len_bytes} bytes, at most {max_bytes} allowed")]
    StreamNameTooLong {
        /// Its length.
        len_bytes: usize,
        /// The limit.
        max_bytes: usize,
    },
    /// The kind is longer than allowed.
    #[error("event kind is {len_bytes} bytes, at most {max_bytes} allowed")]
    KindTooLong {
        /// Its length.
        len_bytes: usize,
        /// The limit.
        max_bytes: usize,
    },
    /// The payload is larger than allowed.
    #[error("event payload is {len_bytes} bytes, at most {max_bytes} allowed")]
    EventTooLarge {
        /// Its size.
        len_bytes: usize,
        /// The limit.
        max_bytes: usize,
    },
    /// The batch has too many events or bytes.
    #[error(
        "batch of {events} events and {len_bytes} bytes exceeds {max_events} events or {max_bytes} bytes"
    )]
    BatchTooLarge {
        /// Events in the batch.
        events: usize,
        /// Encoded bytes of the batch.
        len_bytes: usize,
        /// The event limit.
        max_events: usize,
        /// The byte limit.
        max_bytes: usize,
    },
    /// The batch is empty.
    #[error("batch is empty")]
    EmptyBatch,
    /// The same event id appears twice in one batch.
    #[error("event id appears twice in one batch")]
    DuplicateInBatch,
    /// The requested events were compacted away.
    #[error("position {position} is below the compaction floor {first_position}")]
    Compacted {
        /// The position asked for.
        position: u64,
        /// The first position still stored.
        first_position: u64,
    },
    /// The log's files are not in a shape this version can open.
    #[error("log is corrupt at position {position}: {reason}")]
    Corrupt {
        /// The first position affected.
        position: u64,
        /// What is wrong.
        reason: String,
    },
    /// Options out of range.
    #[error("invalid options: {0}")]
    InvalidOptions(String),
    /// The log failed earlier (a write or sync error) and must be reopened; nothing more is
    /// accepted, since the state of the file after a failed fsync is unknown.
    #[error("log is failed after an earlier I/O error; reopen it")]
    Failed,
    /// Another process (or handle) has the log open (and kept it for `LOCK_WAIT_MAX`).
    #[error("log directory is locked by another owner")]
    Locked,
    /// The log was shut down.
    #[error("log is closed")]
    Closed,
}

/// Result with the log's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(op: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io { op, source }
}

pub(crate) fn index<E: std::fmt::Display>(op: &'static str) -> impl FnOnce(E) -> Error {
    move |e| Error::Index { op, message: e.to_string() }
}

impl Error {
    /// A copy suitable for handing to every waiter of a failed group commit.
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::Io { op, source } => {
                Error::Io { op, source: io::Error::new(source.kind(), source.to_string()) }
            }
            Error::Index { op, message } => Error::Index { op, message: message.clone() },
            Error::Corrupt { position, reason } => {
                Error::Corrupt { position: *position, reason: reason.clone() }
            }
            Error::Closed => Error::Closed,
            _ => Error::Failed,
        }
    }
}
