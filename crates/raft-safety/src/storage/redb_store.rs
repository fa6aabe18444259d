//! [`RedbStore`]: the durable [`LogStore`], a redb file plus an in-memory mirror of the live log.
//!
//! Layout (redb tables, values are raft-rs protobuf encodings):
//! - `raft_entries`: log index (u64) -> `Entry`, only the entries after the snapshot;
//! - `raft_meta`: `"hard_state"` -> `HardState`, `"snapshot"` -> `Snapshot` (metadata with the
//!   conf state, plus the state machine data), `"boot"` -> u64 little endian.
//!
//! Every write is one redb transaction committed with `Durability::Immediate` (fsync), except a
//! hard state that only moves the commit index: that one is kept in memory and written with the
//! next durable write (Raft does not need the commit index durable). Reads are served from the
//! [`Mirror`], which holds exactly what is in the file.

use std::path::Path;

use raft::prelude::{Entry, HardState, Snapshot};
use redb::{Database, ReadableDatabase, TableDefinition};

use super::mirror::{Mirror, Plan, storage_from_mirror};
use super::{LogStore, StoreError, WriteBatch, decode};

const ENTRIES: TableDefinition<'static, u64, &[u8]> = TableDefinition::new("raft_entries");
const META: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("raft_meta");
const KEY_HARD_STATE: &str = "hard_state";
const KEY_SNAPSHOT: &str = "snapshot";
const KEY_BOOT: &str = "boot";

/// A Raft log store in a redb database.
pub struct RedbStore {
    db: Database,
    mirror: Mirror,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("hard_state", &self.mirror.hard_state)
            .field("snapshot_index", &self.mirror.snapshot_index())
            .field("entries", &self.mirror.entries.len())
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
        let mut mirror = Mirror::default();
        if let Some(bytes) = meta.get(KEY_HARD_STATE)? {
            mirror.hard_state = decode::<HardState>(bytes.value(), "hard state")?;
        }
        if let Some(bytes) = meta.get(KEY_SNAPSHOT)? {
            mirror.snapshot = decode::<Snapshot>(bytes.value(), "snapshot")?;
        }
        if let Some(bytes) = meta.get(KEY_BOOT)? {
            let raw: [u8; 8] = bytes
                .value()
                .try_into()
                .map_err(|_| StoreError::Corrupt("boot counter is not 8 bytes".into()))?;
            mirror.boot = u64::from_le_bytes(raw);
        }
        let table = txn.open_table(ENTRIES)?;
        let first = mirror.first();
        for (expected, row) in (first..).zip(table.range::<u64>(..)?) {
            let (key, value) = row?;
            if key.value() != expected {
                return Err(StoreError::Corrupt(format!(
                    "log not contiguous: expected index {expected}, found key {}",
                    key.value()
                )));
            }
            mirror.entries.push_back(decode::<Entry>(value.value(), "entry")?);
        }
        mirror.check_contiguous()?;
        drop(table);
        drop(meta);
        drop(txn);
        Ok(Self { db, mirror })
    }
}

fn encode<M: protobuf::Message>(message: &M) -> Vec<u8> {
    message.write_to_bytes().expect("raft protobuf messages always encode")
}

storage_from_mirror!(RedbStore);

impl LogStore for RedbStore {
    fn write(&mut self, batch: WriteBatch<'_>) -> Result<(), StoreError> {
        let hard_state = match self.mirror.plan(&batch)? {
            Plan::CommitOnly(commit) => {
                self.mirror.set_commit(commit);
                return Ok(());
            }
            Plan::Write(hard_state) => hard_state,
        };
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
        self.mirror.apply(&batch, hard_state);
        Ok(())
    }

    fn set_commit(&mut self, commit: u64) -> Result<(), StoreError> {
        self.mirror.set_commit(commit);
        Ok(())
    }

    fn compact(&mut self, snapshot: Snapshot) -> Result<(), StoreError> {
        let Some(hard_state) = self.mirror.plan_compact(&snapshot)? else {
            return Ok(());
        };
        let index = snapshot.get_metadata().index;
        let txn = self.db.begin_write()?;
        {
            let mut entries = txn.open_table(ENTRIES)?;
            let mut meta = txn.open_table(META)?;
            entries.retain_in(..=index, |_, _| false)?;
            meta.insert(KEY_SNAPSHOT, encode(&snapshot).as_slice())?;
            meta.insert(KEY_HARD_STATE, encode(&hard_state).as_slice())?;
        }
        txn.commit()?;
        self.mirror.apply_compact(snapshot, hard_state);
        Ok(())
    }

    fn bootstrap(&mut self, snapshot: Snapshot) -> Result<(), StoreError> {
        let hard_state = self.mirror.plan_bootstrap(&snapshot)?;
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            meta.insert(KEY_SNAPSHOT, encode(&snapshot).as_slice())?;
            meta.insert(KEY_HARD_STATE, encode(&hard_state).as_slice())?;
        }
        txn.commit()?;
        self.mirror.snapshot = snapshot;
        self.mirror.hard_state = hard_state;
        Ok(())
    }

    fn next_boot(&mut self) -> Result<u64, StoreError> {
        let boot = self.mirror.boot + 1;
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            meta.insert(KEY_BOOT, boot.to_le_bytes().as_slice())?;
        }
        txn.commit()?;
        self.mirror.boot = boot;
        Ok(boot)
    }
}
