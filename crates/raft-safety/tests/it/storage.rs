//! The storage conformance suite on the in-memory store, on redb and on the WAL (file and reopen).

use raft_safety::storage::conformance;
use raft_safety::{MemStore, RedbStore, WalStore};

#[test]
fn mem_store_passes_the_conformance_suite() {
    conformance::run_all(MemStore::new);
    conformance::run_durability(MemStore::new(), |store| store);
}

#[test]
fn redb_store_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    conformance::run_all(|| {
        n += 1;
        RedbStore::open(dir.path().join(format!("case-{n}.redb"))).unwrap()
    });
}

#[test]
fn redb_store_keeps_everything_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft.redb");
    conformance::run_durability(RedbStore::open(&path).unwrap(), |store| {
        drop(store);
        RedbStore::open(&path).unwrap()
    });
}

#[test]
fn wal_store_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    conformance::run_all(|| {
        n += 1;
        WalStore::open_with_capacity(dir.path().join(format!("case-{n}")), 64 << 10).unwrap()
    });
}

#[test]
fn wal_store_keeps_everything_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft");
    conformance::run_durability(WalStore::open(&path).unwrap(), |store| {
        drop(store);
        WalStore::open(&path).unwrap()
    });
}

#[test]
fn a_wal_store_is_held_by_one_process_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = WalStore::open(dir.path()).unwrap();
    assert!(matches!(WalStore::open(dir.path()), Err(raft_safety::StoreError::Locked(_))));
    drop(store);
    WalStore::open(dir.path()).unwrap();
}
