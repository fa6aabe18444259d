//! [`Mirror`]: the in-memory copy of a durable store's log, shared by [`super::RedbStore`] and
//! [`super::WalStore`]. It checks a write before the store persists it, and applies it after.
//!
//! The mirror holds exactly what the store holds on disk: the hard state, the latest snapshot
//! (metadata, conf state and state machine data) and the entries after it. The log is
//! compacted below each snapshot, so it stays bounded by the snapshot interval.

use std::collections::VecDeque;

use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{RaftState, StorageError};

use super::{StoreError, WriteBatch};

/// The log a store holds, in memory.
#[derive(Debug, Default, Clone)]
pub(crate) struct Mirror {
    pub hard_state: HardState,
    pub snapshot: Snapshot,
    pub entries: VecDeque<Entry>,
    pub boot: u64,
}

/// What a checked write will do.
#[derive(Debug)]
pub(crate) enum Plan {
    /// Only the commit index moves: keep it in memory, write nothing.
    CommitOnly(u64),
    /// Persist the batch with this resulting hard state, then [`Mirror::apply`] it.
    Write(HardState),
}

impl Mirror {
    pub fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    pub fn first(&self) -> u64 {
        self.snapshot_index() + 1
    }

    pub fn last(&self) -> u64 {
        self.entries.back().map_or(self.snapshot_index(), |entry| entry.index)
    }

    /// Checks a batch against the log, before anything is written.
    ///
    /// A hard state that only moves the commit index is not worth an fsync: it rides along
    /// with the next write. Raft needs the term, the vote and the entries durable, never the
    /// commit index (a restarted node learns it again from the leader; the snapshot covers what
    /// was compacted). raft-rs reports every commit advance as a new hard state, so without
    /// this a leader paid a second fsync on the path of every proposal, after the quorum had
    /// acknowledged it.
    pub fn plan(&self, batch: &WriteBatch<'_>) -> Result<Plan, StoreError> {
        let commit_only = batch.snapshot.is_none()
            && batch.entries.is_empty()
            && batch.hard_state.is_none_or(|hs| {
                hs.term == self.hard_state.term && hs.vote == self.hard_state.vote
            });
        if commit_only {
            return Ok(Plan::CommitOnly(batch.hard_state.map_or(0, |hs| hs.commit)));
        }
        let mut hard_state = batch.hard_state.cloned().unwrap_or_else(|| self.hard_state.clone());
        let (mut first, mut last) = (self.first(), self.last());
        if let Some(snapshot) = batch.snapshot {
            let index = snapshot.get_metadata().index;
            if index < self.snapshot_index() {
                return Err(StoreError::SnapshotOutOfDate {
                    snapshot_index: index,
                    first_index: self.first(),
                });
            }
            (first, last) = (index + 1, index);
        }
        if let Some(entry) = batch.entries.first() {
            if entry.index > last + 1 {
                return Err(StoreError::Gap { index: entry.index, last_index: last });
            }
            if entry.index < first {
                return Err(StoreError::Corrupt(format!(
                    "append at index {} overwrites compacted entries below {first}",
                    entry.index
                )));
            }
            if batch.entries.windows(2).any(|w| w[1].index != w[0].index + 1) {
                return Err(StoreError::Corrupt("appended entries are not contiguous".into()));
            }
        }
        if let Some(snapshot) = batch.snapshot {
            let meta = snapshot.get_metadata();
            hard_state.commit = hard_state.commit.max(meta.index);
            hard_state.term = hard_state.term.max(meta.term);
        }
        if batch.hard_state.is_none() {
            hard_state.commit = hard_state.commit.max(self.hard_state.commit);
        }
        Ok(Plan::Write(hard_state))
    }

    /// Applies a batch [`Mirror::plan`] accepted (and the store made durable).
    pub fn apply(&mut self, batch: &WriteBatch<'_>, hard_state: HardState) {
        if let Some(snapshot) = batch.snapshot {
            self.snapshot = snapshot.clone();
            self.entries.clear();
        }
        if let Some(entry) = batch.entries.first() {
            let keep = entry.index.saturating_sub(self.first()) as usize;
            self.entries.truncate(keep);
            self.entries.extend(batch.entries.iter().cloned());
        }
        self.hard_state = hard_state;
    }

    pub fn set_commit(&mut self, commit: u64) {
        if commit > self.hard_state.commit {
            self.hard_state.commit = commit;
        }
    }

    /// Checks a local snapshot: `None` if it is not newer than the current one (nothing to
    /// do), else the hard state after compacting to it.
    pub fn plan_compact(&self, snapshot: &Snapshot) -> Result<Option<HardState>, StoreError> {
        let index = snapshot.get_metadata().index;
        if index <= self.snapshot_index() {
            return Ok(None);
        }
        if index > self.last() {
            return Err(StoreError::Gap { index, last_index: self.last() });
        }
        let mut hard_state = self.hard_state.clone();
        hard_state.commit = hard_state.commit.max(index);
        Ok(Some(hard_state))
    }

    /// Applies a compaction [`Mirror::plan_compact`] accepted: drops the entries the snapshot
    /// covers.
    pub fn apply_compact(&mut self, snapshot: Snapshot, hard_state: HardState) {
        let index = snapshot.get_metadata().index;
        let drop_count = (index + 1).saturating_sub(self.first()) as usize;
        self.entries.drain(..drop_count.min(self.entries.len()));
        self.snapshot = snapshot;
        self.hard_state = hard_state;
    }

    /// Checks a bootstrap snapshot: the hard state after it.
    pub fn plan_bootstrap(&self, snapshot: &Snapshot) -> Result<HardState, StoreError> {
        let initialised = *self.snapshot.get_metadata().get_conf_state() != ConfState::default();
        if initialised || self.last() > 0 {
            return Err(StoreError::AlreadyInitialised);
        }
        let meta = snapshot.get_metadata();
        let mut hard_state = self.hard_state.clone();
        hard_state.term = hard_state.term.max(meta.term);
        hard_state.commit = hard_state.commit.max(meta.index);
        Ok(hard_state)
    }

    /// Checks that the entries follow the snapshot without a gap (what a store loaded).
    pub fn check_contiguous(&self) -> Result<(), StoreError> {
        for (expected, entry) in (self.first()..).zip(&self.entries) {
            if entry.index != expected {
                return Err(StoreError::Corrupt(format!(
                    "log not contiguous: expected index {expected}, found entry {}",
                    entry.index
                )));
            }
        }
        Ok(())
    }

    // The `raft::Storage` reads.

    pub fn initial_state(&self) -> RaftState {
        RaftState::new(
            self.hard_state.clone(),
            self.snapshot.get_metadata().get_conf_state().clone(),
        )
    }

    pub fn entries(&self, low: u64, high: u64, max_size: Option<u64>) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let offset = (low - self.first()) as usize;
        let count = (high - low) as usize;
        let mut entries: Vec<Entry> = self.entries.range(offset..offset + count).cloned().collect();
        raft::util::limit_size(&mut entries, max_size);
        Ok(entries)
    }

    pub fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snapshot_index() {
            return Ok(self.snapshot.get_metadata().term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first()) as usize].term)
    }

    pub fn snapshot(&self, request_index: u64) -> raft::Result<Snapshot> {
        if self.snapshot_index() < request_index {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(self.snapshot.clone())
    }
}

/// Implements `raft::Storage` for a store with a `mirror: Mirror` field.
macro_rules! storage_from_mirror {
    ($store:ty) => {
        impl raft::Storage for $store {
            fn initial_state(&self) -> raft::Result<raft::RaftState> {
                Ok(self.mirror.initial_state())
            }

            fn entries(
                &self,
                low: u64,
                high: u64,
                max_size: impl Into<Option<u64>>,
                _context: raft::GetEntriesContext,
            ) -> raft::Result<Vec<raft::prelude::Entry>> {
                self.mirror.entries(low, high, max_size.into())
            }

            fn term(&self, idx: u64) -> raft::Result<u64> {
                self.mirror.term(idx)
            }

            fn first_index(&self) -> raft::Result<u64> {
                Ok(self.mirror.first())
            }

            fn last_index(&self) -> raft::Result<u64> {
                Ok(self.mirror.last())
            }

            fn snapshot(
                &self,
                request_index: u64,
                _to: u64,
            ) -> raft::Result<raft::prelude::Snapshot> {
                self.mirror.snapshot(request_index)
            }
        }
    };
}
pub(crate) use storage_from_mirror;
