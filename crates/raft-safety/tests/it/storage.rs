//! The storage conformance suite on the in-memory store and on redb (file and reopen).

use raft_safety::storage::conformance;
use raft_safety::{MemStore, RedbStore};

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
