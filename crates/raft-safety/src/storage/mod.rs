//! The Raft log seam: [`LogStore`] extends `raft::Storage` with durable writes; two implementations.
//!
//! [`MemStore`] keeps everything in memory on top of raft-rs's own `MemStorage` (tests and the
//! simulation); [`WalStore`] appends each write to a preallocated log file (one write, one
//! fdatasync: what safety-quorum runs on); [`RedbStore`] keeps the log, hard state and snapshot
//! in a redb file with a durable commit per write (about nine pages per commit). [`conformance`]
//! is the suite all three pass.

pub mod conformance;
mod crash_disk;
mod mem;
mod mirror;
mod redb_store;
mod wal_store;

pub use crash_disk::CrashDisk;
pub use mem::MemStore;
pub use redb_store::RedbStore;
pub use wal_store::{
    WAL_CAPACITY_BYTES_DEFAULT, WAL_FILE_NAMES, WAL_RECORD_BYTES_MAX, WalFile, WalStore,
};

use raft::prelude::{Entry, HardState, Snapshot};
use thiserror::Error;

/// What one ready round makes durable, in this order: a snapshot received from the leader, new
/// log entries (replacing any conflicting tail), the hard state.
#[derive(Debug, Default, Clone, Copy)]
pub struct WriteBatch<'a> {
    /// A snapshot from the leader; the log is replaced by it.
    pub snapshot: Option<&'a Snapshot>,
    /// Entries to append; an entry whose index already exists replaces it and everything after.
    pub entries: &'a [Entry],
    /// The new hard state (term, vote, commit).
    pub hard_state: Option<&'a HardState>,
}

impl WriteBatch<'_> {
    /// Whether the batch writes nothing.
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none() && self.entries.is_empty() && self.hard_state.is_none()
    }
}

/// A `raft::Storage` that can also be written. Every method that returns `Ok` has made its
/// effect durable unless it says otherwise: the node sends messages that depend on a write only
/// after the write returned.
///
/// The conf state reported by `initial_state` is the one of the latest snapshot (or of the
/// bootstrap); membership changes after it are re-applied from the log on restart.
pub trait LogStore: raft::Storage {
    /// Durably writes a ready round (one fsync for the whole batch; an empty batch may write
    /// nothing).
    fn write(&mut self, batch: WriteBatch<'_>) -> Result<(), StoreError>;

    /// Records a commit index learnt after the ready round. It need not be durable by itself
    /// (the commit index is recovered from the leader); it is written with the next write.
    fn set_commit(&mut self, commit: u64) -> Result<(), StoreError>;

    /// Durably records a snapshot taken locally at `snapshot.metadata.index` (at most the last
    /// index) and drops the entries up to and including it. An older snapshot is ignored.
    fn compact(&mut self, snapshot: Snapshot) -> Result<(), StoreError>;

    /// Durably initialises an empty store with a first snapshot (index at least 1, the initial
    /// membership in its metadata). Starting the log after a snapshot means a member added
    /// later always receives a snapshot, and with it the membership, instead of replaying a
    /// log that does not contain the initial configuration.
    fn bootstrap(&mut self, snapshot: Snapshot) -> Result<(), StoreError>;

    /// Durably increments and returns the boot counter (1 on the first boot). The node mixes it
    /// into proposal ids so that entries proposed before a restart never match new proposals.
    fn next_boot(&mut self) -> Result<u64, StoreError>;
}

/// Why a store operation failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// redb failed (I/O, corruption detected by redb, ...).
    #[error("redb operation failed")]
    Redb(#[source] Box<redb::Error>),
    /// Stored bytes do not decode or break an invariant of the log.
    #[error("stored raft state is corrupt: {0}")]
    Corrupt(String),
    /// A snapshot is older than the log it should replace.
    #[error("snapshot at index {snapshot_index} is older than the first log index {first_index}")]
    SnapshotOutOfDate {
        /// The snapshot's index.
        snapshot_index: u64,
        /// The store's first index.
        first_index: u64,
    },
    /// An append would leave a gap in the log.
    #[error("append at index {index} leaves a gap after last index {last_index}")]
    Gap {
        /// First index of the appended entries.
        index: u64,
        /// The store's last index.
        last_index: u64,
    },
    /// The store was bootstrapped already.
    #[error("store is already initialised")]
    AlreadyInitialised,
    /// Reading or writing the log files failed.
    #[error("raft log I/O failed")]
    Io(#[source] std::io::Error),
    /// Opening or creating a file or directory of the store failed.
    #[error("cannot open {path}")]
    Open {
        /// The file or directory.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another process holds the store open.
    #[error("{0} is locked by another process")]
    Locked(std::path::PathBuf),
    /// A record (a snapshot with its entries) is larger than the log accepts.
    #[error("raft log record of {bytes} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The record's size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
}

impl From<std::io::Error> for StoreError {
    fn from(error: std::io::Error) -> Self {
        StoreError::Io(error)
    }
}

macro_rules! from_redb {
    ($($error:ty),*) => {$(
        impl From<$error> for StoreError {
            fn from(error: $error) -> Self {
                StoreError::Redb(Box::new(error.into()))
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// Decodes a raft protobuf message from a store.
pub(crate) fn decode<M: protobuf::Message>(bytes: &[u8], what: &str) -> Result<M, StoreError> {
    let mut message = M::new();
    message
        .merge_from_bytes(bytes)
        .map_err(|error| StoreError::Corrupt(format!("{what} does not decode: {error}")))?;
    Ok(message)
}
