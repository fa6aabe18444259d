//! [`MemStore`]: an in-memory [`LogStore`] on top of raft-rs's `MemStorage`.

use std::sync::{Arc, Mutex, MutexGuard};

use raft::prelude::{Entry, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage};

use super::{LogStore, StoreError, WriteBatch};

/// An in-memory log store: raft-rs's `MemStorage` for the log and hard state, plus the latest
/// snapshot with its data (which `MemStorage` does not keep). Nothing survives the process; in
/// the simulation the whole store survives a simulated crash, as a disk would.
///
/// Clones share the same storage (like two handles on one disk), which is how the simulation
/// keeps a crashed node's "disk" to restart it from.
#[derive(Clone, Default)]
pub struct MemStore {
    inner: MemStorage,
    extra: Arc<Mutex<Extra>>,
}

#[derive(Default)]
struct Extra {
    snapshot: Snapshot,
    boot: u64,
}

impl std::fmt::Debug for MemStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let core = self.inner.rl();
        f.debug_struct("MemStore")
            .field("hard_state", core.hard_state())
            .field("snapshot_index", &self.extra().snapshot.get_metadata().index)
            .finish()
    }
}

impl MemStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn extra(&self) -> MutexGuard<'_, Extra> {
        self.extra.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Storage for MemStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.inner.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.inner.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.inner.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.inner.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.inner.last_index()
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let extra = self.extra();
        if extra.snapshot.get_metadata().index < request_index {
            return Err(raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(extra.snapshot.clone())
    }
}

impl LogStore for MemStore {
    fn write(&mut self, batch: WriteBatch<'_>) -> Result<(), StoreError> {
        if let Some(snapshot) = batch.snapshot {
            let snapshot_index = snapshot.get_metadata().index;
            let first_index = self.inner.first_index().unwrap_or(1);
            self.inner
                .wl()
                .apply_snapshot(snapshot.clone())
                .map_err(|_| StoreError::SnapshotOutOfDate { snapshot_index, first_index })?;
            self.extra().snapshot = snapshot.clone();
        }
        if let Some(first) = batch.entries.first() {
            let first_index = self.inner.first_index().unwrap_or(1);
            let last_index = self.inner.last_index().unwrap_or(0);
            if first.index > last_index + 1 {
                return Err(StoreError::Gap { index: first.index, last_index });
            }
            if first.index < first_index {
                return Err(StoreError::Corrupt(format!(
                    "append at index {} overwrites compacted entries below {first_index}",
                    first.index
                )));
            }
            self.inner
                .wl()
                .append(batch.entries)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        }
        if let Some(hard_state) = batch.hard_state {
            self.inner.wl().set_hardstate(hard_state.clone());
        }
        Ok(())
    }

    fn set_commit(&mut self, commit: u64) -> Result<(), StoreError> {
        let mut core = self.inner.wl();
        let hard_state = core.mut_hard_state();
        hard_state.commit = hard_state.commit.max(commit);
        Ok(())
    }

    fn compact(&mut self, snapshot: Snapshot) -> Result<(), StoreError> {
        let index = snapshot.get_metadata().index;
        if index <= self.extra().snapshot.get_metadata().index {
            return Ok(());
        }
        let last = self.inner.last_index().unwrap_or(0);
        if index > last {
            return Err(StoreError::Gap { index, last_index: last });
        }
        let tail = if last > index {
            self.inner
                .entries(index + 1, last + 1, None, GetEntriesContext::empty(false))
                .map_err(|e| StoreError::Corrupt(e.to_string()))?
        } else {
            Vec::new()
        };
        let mut core = self.inner.wl();
        let mut hard_state = core.hard_state().clone();
        hard_state.commit = hard_state.commit.max(index);
        // MemStorage can only move its snapshot point by replacing the log: do that, then put
        // the entries after the snapshot back.
        core.apply_snapshot(snapshot.clone()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        core.append(&tail).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        core.set_hardstate(hard_state);
        drop(core);
        self.extra().snapshot = snapshot;
        Ok(())
    }

    fn bootstrap(&mut self, snapshot: Snapshot) -> Result<(), StoreError> {
        if self.inner.initial_state().is_ok_and(|s| s.initialized())
            || self.inner.last_index().unwrap_or(0) > 0
        {
            return Err(StoreError::AlreadyInitialised);
        }
        self.inner
            .wl()
            .apply_snapshot(snapshot.clone())
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.extra().snapshot = snapshot;
        Ok(())
    }

    fn next_boot(&mut self) -> Result<u64, StoreError> {
        let mut extra = self.extra();
        extra.boot += 1;
        Ok(extra.boot)
    }
}
