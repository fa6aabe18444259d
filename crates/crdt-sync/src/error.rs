//! The crate's error type: what a replica refuses, and why.

use crate::doc_id::DocKind;

/// Why a replica refused an operation. Whenever one of these is returned,
/// nothing was applied: the documents are as they were before the call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An increment's amount was zero.
    #[error("amount must not be zero")]
    ZeroAmount,
    /// The increment would take the counter outside the `i64` range.
    #[error("increment of {amount} overflows counter at {value}")]
    Overflow {
        /// Current value of the counter at this replica.
        value: i64,
        /// Rejected amount.
        amount: i64,
    },
    /// The op_id was empty.
    #[error("op_id is missing or empty")]
    MissingOpId,
    /// A name, op_id, member or value was longer than its limit.
    #[error("{what} is {len_bytes} bytes, limit is {max_bytes}")]
    TooLong {
        /// What was too long (`op_id`, `member`, `value`, ...).
        what: &'static str,
        /// Its length in bytes.
        len_bytes: usize,
        /// The limit in bytes.
        max_bytes: usize,
    },
    /// A name (document or node) contained a character it may not.
    #[error("invalid {what} {name:?}: {reason}")]
    InvalidName {
        /// What kind of name (`document name`, `node id`).
        what: &'static str,
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// The op_id was already used with a different amount.
    #[error("op_id {op_id:?} was already used with amount {existing}, not {amount}")]
    OpIdReused {
        /// The op_id.
        op_id: String,
        /// The amount recorded under it.
        existing: i64,
        /// The amount of the rejected request.
        amount: i64,
    },
    /// A register write was older than (or as old as, with another value)
    /// the register's current version.
    #[error("register version {version} is stale, current is {current}")]
    StaleVersion {
        /// The rejected version.
        version: u64,
        /// The register's current version.
        current: u64,
    },
    /// A list index was out of range.
    #[error("list index {index} is out of range for length {len}")]
    IndexOutOfRange {
        /// The rejected index.
        index: usize,
        /// The list's length.
        len: usize,
    },
    /// The document is at an epoch whose genesis this replica has not received
    /// yet (it heard of the document from a later epoch); anti-entropy brings it. Or a
    /// counter's increment while the replica waits for a peer's archive of earlier epochs
    /// ([`crate::Replica::archives_wanted`]).
    #[error("document {name:?} is still syncing epoch {epoch}")]
    Syncing {
        /// The document.
        name: String,
        /// The epoch it waits for.
        epoch: u64,
    },
    /// Creating the document would exceed [`crate::DOCS_MAX`].
    #[error("a replica holds at most {max} documents")]
    TooManyDocs {
        /// The limit.
        max: usize,
    },
    /// The document exists with another kind.
    #[error("document {name:?} is a {actual}, not a {expected}")]
    WrongKind {
        /// The document.
        name: String,
        /// The kind the operation needs.
        expected: DocKind,
        /// The document's kind.
        actual: DocKind,
    },
    /// Change bytes, a sync message, a snapshot or an op record could not be
    /// decoded or failed its checks.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was malformed.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The document was structurally invalid after a merge (for example a
    /// peer wrote a value of the wrong type).
    #[error("document {name:?} is corrupt: {reason}")]
    Corrupt {
        /// The document.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The op log refused the append; the operation was rolled back.
    #[error("op log append failed")]
    OpLog(#[from] OpLogError),
    /// automerge refused an operation.
    #[error("automerge refused the operation")]
    Automerge(#[from] automerge::AutomergeError),
}

/// Why an [`crate::OpLog`] could not append, replay or truncate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpLogError {
    /// The underlying storage failed.
    #[error("op log storage failed: {0}")]
    Storage(String),
    /// A stored record could not be decoded.
    #[error("op log record at position {position} is corrupt")]
    Corrupt {
        /// Position of the record.
        position: u64,
    },
}
