//! [`RedbStore`]: the durable [`LogStore`], a redb file plus an in-memory mirror of the live log.
//!
//! Layout (redb tables, values are raft-rs protobuf encodings):
//! - `raft_entries`: log index (u64) -> `Entry`, only the entries after the snapshot;
//! - `raft_meta`: `"hard_state"` -> `HardState`, `"snapshot"` -> `Snapshot` (metadata with the
//!   conf state, plus the state machine data), `"boot"` -> u64 little endian.
//!
//! Every write is one redb transaction committed with `Durability::Immediate` (fsync), except a
//! hard state that only moves the commit index: that one is kept in memory and written with the
//! next durable write (Raft does not need the commit index durable). Reads are
//! served from the mirror, which holds exactly what is in the file: the log is compacted below
//! each snapshot, so the mirror stays bounded by the snapshot interval.

use std::collections::VecDeque;
use std::path::Path;

use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage};
use redb::{Database, ReadableDatabase, TableDefinition};

use super::{LogStore, StoreError, WriteBatch};

const ENTRIES: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("raft_entries");
const META: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("raft_meta");
const KEY_HARD_STATE: &str = "hard_state";
const KEY_SNAPSHOT: &str = "snapshot";
const KEY_BOOT: &str = "boot";

/// A Raft log store in a redb database.
pub struct RedbStore {
    db: Database,
    hard_state: HardState,
    snapshot: Snapshot,
    entries: VecDeque<Entry>,
    boot: u64,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("hard_state", &self.hard_state)
            .field("snapshot_index", &self.snapshot.get_metadata().index)
            .field("entries", &self.entries.len())
            .finish()
    }
}

impl RedbStore {
    /// Opens (or creates) the store in the file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::load(Database::create(path)?)
    }

    /// Opens the store on another redb backend (e.g. `redb::backends::InMemoryBackend`).
    pub fn open_with_backend(
        backend: impl redb::StorageBackend + 'static,
    ) -> Result<Self, StoreError> {
        Self::load(Database::builder().create_with_backend(backend)?)
    }

    fn load(db: Database) -> Result<Self, StoreError> {
        {
            let txn = db.begin_write()?;
            txn.open_table(ENTRIES)?;
            txn.open_table(META)?;
            txn.commit()?;
        }
        let txn = db.begin_read()?;
        let meta = txn.open_table(META)?;
        let hard_state = match meta.get(KEY_HARD_STATE)? {
            Some(bytes) => decode::<HardState>(bytes.value(), "hard state")?,
            None => HardState::default(),
        };
        let snapshot = match meta.get(KEY_SNAPSHOT)? {
            Some(bytes) => decode::<Snapshot>(bytes.value(), "snapshot")?,
            None => Snapshot::default(),
        };
        let boot = match meta.get(KEY_BOOT)? {
            Some(bytes) => {
                let raw: [u8; 8] = bytes
                    .value()
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("boot counter is not 8 bytes".into()))?;
                u64::from_le_bytes(raw)
            }
            None => 0,
        };
        let table = txn.open_table(ENTRIES)?;
        let mut entries = VecDeque::new();
        let first = snapshot.get_metadata().index + 1;
        for (expected, row) in (first..).zip(table.range::<u64>(..)?) {
            let (key, value) = row?;
            let entry = decode::<Entry>(value.value(), "entry")?;
            if key.value() != expected || entry.index != expected {
                return Err(StoreError::Corrupt(format!(
                    "log not contiguous: expected index {expected}, found key {} entry {}",
                    key.value(),
                    entry.index
                )));
            }
            entries.push_back(entry);
        }
        drop(table);
        drop(meta);
        drop(txn);
        Ok(Self { db, hard_state, snapshot, entries, boot })
    }

    fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    fn first(&self) -> u64 {
        self.snapshot_index() + 1
    }

    fn last(&self) -> u64 {
        self.entries.back().map_or(self.snapshot_index(), |entry| entry.index)
    }
}

fn decode<M: protobuf::Message>(bytes: &[u8], what: &str) -> Result<M, StoreError> {
    let mut message = M::new();
    message
        .merge_from_bytes(bytes)
        .map_err(|error| StoreError::Corrupt(format!("{what} does not decode: {error}")))?;
    Ok(message)
}

fn encode<M: protobuf::Message>(message: &M) -> Vec<u8> {
    message.write_to_bytes().expect("raft protobuf messages always encode")
}

impl Storage for RedbStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.snapshot.get_metadata().get_conf_state().clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(raft::StorageError::Unavailable));
        }
        let offset = (low - self.first()) as usize;
        let count = (high - low) as usize;
        let mut entries: Vec<Entry> = self.entries.range(offset..offset + count).cloned().collect();
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snapshot_index() {
            return Ok(self.snapshot.get_metadata().term);
        }
        if idx < self.first() {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(raft::Error::Store(raft::StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snapshot_index() < request_index {
            return Err(raft::Error::Store(raft::StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(self.snapshot.clone())
    }
}

impl LogStore for RedbStore {
    fn write(&mut self, batch: WriteBatch<'_>) -> Result<(), StoreError> {
        // A commit index alone is not worth an fsync: it rides along with the next write. Raft
        // needs the term, the vote and the entries durable, never the commit index (a restarted
        // node learns it again from the leader; the snapshot covers what was compacted). raft-rs
        // reports every commit advance as a new hard state, so without this a leader paid a
        // second fsync on the path of every proposal, after the quorum had acknowledged it.
        let commit_only = batch.snapshot.is_none()
            && batch.entries.is_empty()
            && batch.hard_state.is_none_or(|hs| {
                hs.term == self.hard_state.term && hs.vote == self.hard_state.vote
            });
        if commit_only {
            if let Some(hs) = batch.hard_state {
                self.set_commit(hs.commit)?;
            }
            return Ok(());
        }
        // Check everything before writing anything.
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
            debug_assert!(
                batch.entries.windows(2).all(|w| w[1].index == w[0].index + 1),
                "appended entries are contiguous"
            );
        }
        if let Some(snapshot) = batch.snapshot {
            let meta = snapshot.get_metadata();
            hard_state.commit = hard_state.commit.max(meta.index);
            hard_state.term = hard_state.term.max(meta.term);
        }
        if batch.hard_state.is_none() {
            hard_state.commit = hard_state.commit.max(self.hard_state.commit);
        }

        let txn = self.db.begin_write()?;
        {
            let mut entries = txn.open_table(ENTRIES)?;
            let mut meta = txn.open_table(META)?;
            if let Some(snapshot) = batch.snapshot {
                entries.retain(|_, _| false)?;
                meta.insert(KEY_SNAPSHOT, encode(snapshot).as_slice())?;
            }
            if let Some(entry) = batch.entries.first() {
                entries.retain_in(entry.index.., |_, _| false)?;
                for entry in batch.entries {
                    entries.insert(entry.index, encode(entry).as_slice())?;
                }
            }
            meta.insert(KEY_HARD_STATE, encode(&hard_state).as_slice())?;
        }
        txn.commit()?;

        // Durable: now mirror it.
        if let Some(snapshot) = batch.snapshot {
            self.snapshot = snapshot.clone();
            self.entries.clear();
        }
        if let Some(entry) = batch.entries.first() {
            let keep = (entry.index - self.first()) as usize;
            self.entries.truncate(keep);
            self.entries.extend(batch.entries.iter().cloned());
        }
        self.hard_state = hard_state;
        debug_assert_eq!(self.last(), batch.entries.last().map_or(last, |e| e.index));
        Ok(())
    }

    fn set_commit(&mut self, commit: u64) -> Result<(), StoreError> {
        if commit > self.hard_state.commit {
            self.hard_state.commit = commit;
        }
        Ok(())
    }

    fn compact(&mut self, snapshot: Snapshot) -> Result<(), StoreError> {
        let index = snapshot.get_metadata().index;
        if index <= self.snapshot_index() {
            return Ok(());
        }
        if index > self.last() {
            return Err(StoreError::Gap { index, last_index: self.last() });
        }
        let mut hard_state = self.hard_state.clone();
        hard_state.commit = hard_state.commit.max(index);
        let txn = self.db.begin_write()?;
        {
            let mut entries = txn.open_table(ENTRIES)?;
            let mut meta = txn.open_table(META)?;
            entries.retain_in(..=index, |_, _| false)?;
            meta.insert(KEY_SNAPSHOT, encode(&snapshot).as_slice())?;
            meta.insert(KEY_HARD_STATE, encode(&hard_state).as_slice())?;
        }
        txn.commit()?;
        let drop_count = (index + 1 - self.first()) as usize;
        self.entries.drain(..drop_count);
        self.snapshot = snapshot;
        self.hard_state = hard_state;
        Ok(())
    }

    fn bootstrap(&mut self, snapshot: Snapshot) -> Result<(), StoreError> {
        let initialised = *self.snapshot.get_metadata().get_conf_state() != ConfState::default();
        if initialised || self.last() > 0 {
            return Err(StoreError::AlreadyInitialised);
        }
        let meta = snapshot.get_metadata();
        let mut hard_state = self.hard_state.clone();
        hard_state.term = hard_state.term.max(meta.term);
        hard_state.commit = hard_state.commit.max(meta.index);
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            meta.insert(KEY_SNAPSHOT, encode(&snapshot).as_slice())?;
            meta.insert(KEY_HARD_STATE, encode(&hard_state).as_slice())?;
        }
        txn.commit()?;
        self.snapshot = snapshot;
        self.hard_state = hard_state;
        Ok(())
    }

    fn next_boot(&mut self) -> Result<u64, StoreError> {
        let boot = self.boot + 1;
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            meta.insert(KEY_BOOT, boot.to_le_bytes().as_slice())?;
        }
        txn.commit()?;
        self.boot = boot;
        Ok(boot)
    }
}
