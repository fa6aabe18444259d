//! The conformance suite every [`LogStore`] passes (run by the tests on [`super::MemStore`] and
//! [`super::RedbStore`]); a failing case panics with what differed.

use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, StorageError};

use super::{LogStore, WriteBatch};

/// Runs every case, each on a fresh store from `make`.
pub fn run_all<S: LogStore>(mut make: impl FnMut() -> S) {
    empty_store(make());
    bootstrap_sets_membership(make());
    append_and_read(make());
    conflicting_append_replaces_tail(make());
    hard_state_round_trip(make());
    compact_keeps_tail_and_snapshot(make());
    snapshot_from_leader_replaces_log(make());
    boot_counter_increments(make());
}

/// Runs the durability case: `reopen` must return the store as a restarted process would see it.
pub fn run_durability<S: LogStore>(store: S, reopen: impl FnOnce(S) -> S) {
    let mut store = store;
    store.bootstrap(snapshot(1, 1, &[1, 2, 3], b"initial")).unwrap();
    append(&mut store, &[(2, 1), (3, 2), (4, 2)]);
    store
        .write(WriteBatch { hard_state: Some(&hard_state(2, 3, 3)), ..WriteBatch::default() })
        .unwrap();
    store.compact(snapshot(2, 1, &[1, 2, 3], b"state@2")).unwrap();
    let boot = store.next_boot().unwrap();
    let store = reopen(store);
    let state = store.initial_state().unwrap();
    assert_eq!(state.hard_state, hard_state(2, 3, 3));
    assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
    assert_eq!(store.first_index().unwrap(), 3);
    assert_eq!(store.last_index().unwrap(), 4);
    assert_eq!(store.term(2).unwrap(), 1);
    assert_eq!(terms(&store, 3, 5), vec![(3, 2), (4, 2)]);
    assert_eq!(store.snapshot(0, 2).unwrap().data, b"state@2".to_vec());
    let mut store = store;
    assert_eq!(store.next_boot().unwrap(), boot + 1);
}

fn entry(index: u64, term: u64) -> Entry {
    Entry { index, term, data: format!("{index}/{term}").into_bytes(), ..Entry::default() }
}

fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
    HardState { term, vote, commit }
}

fn snapshot(index: u64, term: u64, voters: &[u64], data: &[u8]) -> Snapshot {
    let mut snapshot = Snapshot { data: data.to_vec(), ..Snapshot::default() };
    let meta = snapshot.mut_metadata();
    meta.index = index;
    meta.term = term;
    meta.set_conf_state(ConfState::from((voters.to_vec(), vec![])));
    snapshot
}

fn append<S: LogStore>(store: &mut S, entries: &[(u64, u64)]) {
    let entries: Vec<Entry> = entries.iter().map(|&(i, t)| entry(i, t)).collect();
    store.write(WriteBatch { entries: &entries, ..WriteBatch::default() }).unwrap();
}

fn terms<S: LogStore>(store: &S, low: u64, high: u64) -> Vec<(u64, u64)> {
    store
        .entries(low, high, None, GetEntriesContext::empty(false))
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e.data, format!("{}/{}", e.index, e.term).into_bytes());
            (e.index, e.term)
        })
        .collect()
}

fn is_compacted<T: std::fmt::Debug>(result: raft::Result<T>) -> bool {
    matches!(result, Err(raft::Error::Store(StorageError::Compacted)))
}

fn empty_store<S: LogStore>(store: S) {
    let state = store.initial_state().unwrap();
    assert!(!state.initialized(), "a new store is not initialised");
    assert_eq!(state.hard_state, HardState::default());
    assert_eq!(store.first_index().unwrap(), 1);
    assert_eq!(store.last_index().unwrap(), 0);
    assert_eq!(store.term(0).unwrap(), 0);
}

fn bootstrap_sets_membership<S: LogStore>(mut store: S) {
    let mut first = snapshot(1, 1, &[1, 2, 3], b"initial");
    first.mut_metadata().mut_conf_state().learners = vec![4];
    store.bootstrap(first).unwrap();
    let state = store.initial_state().unwrap();
    assert!(state.initialized());
    assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
    assert_eq!(state.conf_state.learners, vec![4]);
    assert_eq!((state.hard_state.term, state.hard_state.commit), (1, 1));
    assert_eq!(store.first_index().unwrap(), 2, "the log starts after the snapshot");
    assert_eq!(store.last_index().unwrap(), 1);
    assert_eq!(store.term(1).unwrap(), 1);
    let snap = store.snapshot(0, 2).unwrap();
    assert_eq!(snap.get_metadata().get_conf_state().voters, vec![1, 2, 3]);
    assert_eq!(snap.data, b"initial".to_vec());
    assert!(
        store.bootstrap(snapshot(1, 1, &[1], b"again")).is_err(),
        "bootstrapping twice is refused"
    );
}

fn append_and_read<S: LogStore>(mut store: S) {
    append(&mut store, &[(1, 1), (2, 1), (3, 2), (4, 2), (5, 3)]);
    assert_eq!(store.first_index().unwrap(), 1);
    assert_eq!(store.last_index().unwrap(), 5);
    assert_eq!(terms(&store, 2, 5), vec![(2, 1), (3, 2), (4, 2)]);
    for (index, term) in [(1, 1), (3, 2), (5, 3)] {
        assert_eq!(store.term(index).unwrap(), term);
    }
    assert!(matches!(store.term(6), Err(raft::Error::Store(StorageError::Unavailable))));
    let one = store.entries(1, 6, Some(1), GetEntriesContext::empty(false)).unwrap();
    assert_eq!(one.len(), 1, "max_size still returns one entry");
    let size = u64::from(protobuf::Message::compute_size(&entry(1, 1)))
        + u64::from(protobuf::Message::compute_size(&entry(2, 1)));
    let two = store.entries(1, 6, Some(size), GetEntriesContext::empty(false)).unwrap();
    assert_eq!(two.len(), 2, "max_size bounds the bytes");
    // Appending after the end is a gap.
    let gap = [entry(7, 3)];
    assert!(store.write(WriteBatch { entries: &gap, ..WriteBatch::default() }).is_err());
    assert_eq!(store.last_index().unwrap(), 5);
}

fn conflicting_append_replaces_tail<S: LogStore>(mut store: S) {
    append(&mut store, &[(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]);
    append(&mut store, &[(3, 2), (4, 2)]);
    assert_eq!(store.last_index().unwrap(), 4, "the old entry 5 is gone");
    assert_eq!(terms(&store, 1, 5), vec![(1, 1), (2, 1), (3, 2), (4, 2)]);
    append(&mut store, &[(5, 3)]);
    assert_eq!(terms(&store, 4, 6), vec![(4, 2), (5, 3)]);
}

fn hard_state_round_trip<S: LogStore>(mut store: S) {
    store
        .write(WriteBatch { hard_state: Some(&hard_state(7, 2, 0)), ..WriteBatch::default() })
        .unwrap();
    assert_eq!(store.initial_state().unwrap().hard_state, hard_state(7, 2, 0));
    append(&mut store, &[(1, 7), (2, 7)]);
    store.set_commit(2).unwrap();
    assert_eq!(store.initial_state().unwrap().hard_state.commit, 2);
    assert_eq!(store.initial_state().unwrap().hard_state.term, 7);
}

fn compact_keeps_tail_and_snapshot<S: LogStore>(mut store: S) {
    store.bootstrap(snapshot(1, 1, &[1, 2, 3], b"initial")).unwrap();
    append(&mut store, &[(2, 1), (3, 2), (4, 2), (5, 2)]);
    store.set_commit(3).unwrap();
    store.compact(snapshot(3, 2, &[1, 2, 3, 4], b"sm@3")).unwrap();
    assert_eq!(store.first_index().unwrap(), 4);
    assert_eq!(store.last_index().unwrap(), 5);
    assert_eq!(store.term(3).unwrap(), 2, "the term at the snapshot stays known");
    assert!(is_compacted(store.term(2)));
    assert!(is_compacted(store.entries(3, 5, None, GetEntriesContext::empty(false))));
    assert_eq!(terms(&store, 4, 6), vec![(4, 2), (5, 2)]);
    let snap = store.snapshot(0, 2).unwrap();
    assert_eq!(snap.data, b"sm@3".to_vec());
    assert_eq!((snap.get_metadata().index, snap.get_metadata().term), (3, 2));
    let state = store.initial_state().unwrap();
    assert_eq!(state.conf_state.voters, vec![1, 2, 3, 4]);
    assert!(state.hard_state.commit >= 3);
    assert!(matches!(
        store.snapshot(4, 2),
        Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable))
    ));
    // An older snapshot changes nothing; compacting everything leaves an empty log.
    store.compact(snapshot(2, 1, &[1], b"old")).unwrap();
    assert_eq!(store.first_index().unwrap(), 4);
    store.compact(snapshot(5, 2, &[1, 2, 3, 4], b"sm@5")).unwrap();
    assert_eq!(store.first_index().unwrap(), 6);
    assert_eq!(store.last_index().unwrap(), 5);
    append(&mut store, &[(6, 3)]);
    assert_eq!(terms(&store, 6, 7), vec![(6, 3)]);
}

fn snapshot_from_leader_replaces_log<S: LogStore>(mut store: S) {
    append(&mut store, &[(1, 1), (2, 1), (3, 1)]);
    let snap = snapshot(10, 4, &[1, 2, 3], b"sm@10");
    let next = [entry(11, 4)];
    store
        .write(WriteBatch {
            snapshot: Some(&snap),
            entries: &next,
            hard_state: Some(&hard_state(4, 0, 10)),
        })
        .unwrap();
    assert_eq!(store.first_index().unwrap(), 11);
    assert_eq!(store.last_index().unwrap(), 11);
    assert_eq!(store.term(10).unwrap(), 4);
    assert!(is_compacted(store.term(3)));
    assert_eq!(store.snapshot(0, 1).unwrap().data, b"sm@10".to_vec());
    assert_eq!(store.initial_state().unwrap().conf_state.voters, vec![1, 2, 3]);
    assert_eq!(store.initial_state().unwrap().hard_state.commit, 10);
    // Appending inside the snapshot is refused.
    let stale = [entry(5, 4)];
    assert!(store.write(WriteBatch { entries: &stale, ..WriteBatch::default() }).is_err());
}

fn boot_counter_increments<S: LogStore>(mut store: S) {
    let first = store.next_boot().unwrap();
    assert_eq!(first, 1);
    assert_eq!(store.next_boot().unwrap(), 2);
}
