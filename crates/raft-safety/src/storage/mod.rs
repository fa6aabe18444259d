//! The Raft log seam: [`LogStore`] extends `raft::Storage` with durable writes; two implementations.
//!
//! [`MemStore`] keeps everything in memory on top of raft-rs's own `MemStorage` (tests and the
//! simulation); [`RedbStore`] keeps the log, hard state and snapshot in a redb file with a durable
//! (fsynced) commit per write. [`conformance`] is the suite both pass.

pub mod conformance;
mod crash_disk;
mod mem;
mod redb_store;

pub use crash_disk::CrashDisk;
pub use mem::MemStore;
pub use redb_store::RedbStore;

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
}

impl<E: Into<redb::Error>> From<E> for StoreError {
    fn from(error: E) -> Self {
        StoreError::Redb(Box::new(error.into()))
    }
}
