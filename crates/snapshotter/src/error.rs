//! The snapshotter's error type.

/// Everything that can go wrong while saving, loading or recovering.
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
        source: std::io::Error,
    },
    /// The event log failed.
    #[error("event log {op} failed")]
    Log {
        /// What was being done.
        op: &'static str,
        /// The log's error.
        #[source]
        source: event_log::Error,
    },
    /// The state could not be encoded.
    #[error("snapshot encoding failed: {0}")]
    Encode(String),
    /// The encoded state is larger than allowed.
    #[error("snapshot is {len_bytes} bytes, at most {max_bytes} allowed")]
    TooLarge {
        /// Its size.
        len_bytes: u64,
        /// The limit.
        max_bytes: u64,
    },
    /// No usable snapshot, and the log no longer holds the events from position 1.
    #[error("cannot recover: no usable snapshot and the log starts at position {first_position}")]
    Unrecoverable {
        /// First position the log still holds.
        first_position: u64,
    },
    /// Options out of range.
    #[error("invalid options: {0}")]
    InvalidOptions(String),
}

/// Result with the snapshotter's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { op, source }
}

pub(crate) fn log_error(op: &'static str) -> impl FnOnce(event_log::Error) -> Error {
    move |source| Error::Log { op, source }
}
