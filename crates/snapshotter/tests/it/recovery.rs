//! Recovery = newest valid snapshot + log tail; policy-driven snapshots and compaction.

use std::sync::Arc;

use event_log::sim::SimVfs;
use event_log::{EventLog, Options};
use snapshotter::{Codec, Error, LogPoint, SnapshotOptions, SnapshotPolicy, Snapshotter};

use crate::support::{Fold, fold, request, small_log_options};

#[test]
fn recovers_from_snapshot_plus_tail_with_either_codec() {
    for codec in [Codec::Postcard, Codec::Json] {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path().join("log"), Options::default()).unwrap();
        let options = SnapshotOptions { codec, compact: false, ..SnapshotOptions::default() };
        let mut snapshots = Snapshotter::open(dir.path().join("snap"), options.clone()).unwrap();

        // Nothing yet: empty state, nothing replayed.
        let (state, report) = snapshots.recover::<Fold>(&log).unwrap();
        assert_eq!(
            (state, report.snapshot_position, report.events_replayed),
            (Fold::default(), 0, 0)
        );

        let mut state = Fold::default();
        let mut last = None;
        for n in 1..=100u64 {
            let a = log.append(request(n, 20)).unwrap();
            state = fold(&log.read_range(1, usize::MAX).unwrap());
            last = Some(a);
            if n == 60 {
                snapshots.save(&state, a.into()).unwrap();
            }
        }
        let (recovered, report) = snapshots.recover::<Fold>(&log).unwrap();
        assert_eq!(recovered, state);
        assert_eq!(
            (report.snapshot_position, report.events_replayed, report.position),
            (60, 40, 100)
        );
        assert!(report.skipped.is_empty());
        snapshots.save(&state, last.unwrap().into()).unwrap();
        let json = snapshots.inspect_json::<Fold>().unwrap().unwrap();
        assert!(json.contains("\"events\": 100"), "{json}");

        // A fresh snapshotter (after a restart) finds the same.
        let mut reopened = Snapshotter::open(dir.path().join("snap"), options).unwrap();
        let (recovered, report) = reopened.recover::<Fold>(&log).unwrap();
        assert_eq!((recovered, report.events_replayed), (state, 0));
    }
}

#[test]
fn keeps_k_copies_and_policy_snapshots_compact_the_log() {
    let vfs = Arc::new(SimVfs::new());
    let log = EventLog::open_with_vfs(vfs.clone(), "/log", small_log_options()).unwrap();
    let options = SnapshotOptions {
        copies: 3,
        policy: SnapshotPolicy { every_events: Some(50), every: None, tail_bytes: None },
        keep_tail_events: 20,
        ..SnapshotOptions::default()
    };
    let mut snapshots = Snapshotter::open_with_vfs(vfs.clone(), "/snap", options.clone()).unwrap();
    let mut state = Fold::default();
    let mut taken = Vec::new();
    for n in 1..=400u64 {
        let a = log.append(request(n, 60)).unwrap();
        state = {
            let mut s = state;
            snapshotter::Recover::apply(&mut s, &log.read(a.position).unwrap().unwrap());
            s
        };
        if let Some(info) = snapshots.maybe_snapshot(&log, &state, a.into()).unwrap() {
            taken.push(info.position);
        }
    }
    assert_eq!(taken, (1..=8).map(|i| i * 50).collect::<Vec<_>>());
    let kept: Vec<u64> = snapshots.list().unwrap().iter().map(|s| s.position).collect();
    assert_eq!(kept, vec![400, 350, 300]);
    let head = log.head();
    assert!(head.first_position > 1, "log was not compacted");
    assert!(head.first_position <= 400 - 20 + 1, "compaction must keep the tail");
    let (recovered, report) = snapshots.recover::<Fold>(&log).unwrap();
    assert_eq!(recovered, state);
    assert_eq!(report.snapshot_position, 400);

    // Without any snapshot a compacted log cannot be recovered: a typed error, not a wrong state.
    for s in snapshots.list().unwrap() {
        event_log::Vfs::remove(vfs.as_ref(), &s.path).unwrap();
    }
    let mut empty = Snapshotter::open_with_vfs(vfs, "/snap", options).unwrap();
    assert!(matches!(empty.recover::<Fold>(&log), Err(Error::Unrecoverable { .. })));
}

#[test]
fn snapshot_that_disagrees_with_the_log_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path().join("log"), Options::default()).unwrap();
    let mut snapshots =
        Snapshotter::open(dir.path().join("snap"), SnapshotOptions::default()).unwrap();
    for n in 1..=10u64 {
        log.append(request(n, 5)).unwrap();
    }
    let truth = fold(&log.read_range(1, 100).unwrap());
    // A snapshot claiming position 10 with the wrong chain hash, and one beyond the head.
    snapshots
        .save(&Fold { events: 999, ..Fold::default() }, LogPoint { position: 10, hash: [9; 32] })
        .unwrap();
    snapshots
        .save(&Fold { events: 998, ..Fold::default() }, LogPoint { position: 50, hash: [9; 32] })
        .unwrap();
    let (state, report) = snapshots.recover::<Fold>(&log).unwrap();
    assert_eq!(state, truth);
    assert_eq!(report.skipped.len(), 2);
    assert_eq!(report.snapshot_position, 0);
}

#[test]
fn a_byte_string_saved_in_place_loads_like_a_saved_struct_and_obeys_the_size_limit() {
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Blob {
        bytes: Vec<u8>,
    }
    let dir = tempfile::tempdir().unwrap();
    // The JSON codec configured: save_bytes still writes postcard, and says so in the header.
    let options =
        SnapshotOptions { codec: Codec::Json, max_snapshot_bytes: 1_000, ..Default::default() };
    let mut snapshots = Snapshotter::open(dir.path(), options).unwrap();
    let at = |position| LogPoint { position, hash: [position as u8; 32] };
    // 300 bytes: a length of two varint bytes.
    let blob = Blob { bytes: (0..300u32).map(|i| (i % 251) as u8).collect() };
    let info = snapshots.save_bytes(&blob.bytes, at(5)).unwrap();
    let loaded = snapshots.load::<Blob>().unwrap().snapshot.unwrap();
    assert_eq!((&loaded.0, loaded.1.position), (&blob, 5));
    assert_eq!(info.len_bytes, 72 + 2 + 300);
    // Over the limit: refused, and the newest snapshot is still the one before.
    let big = vec![1u8; 1_000];
    assert!(matches!(snapshots.save_bytes(&big, at(6)), Err(Error::TooLarge { .. })));
    assert_eq!(snapshots.load::<Blob>().unwrap().snapshot.unwrap().1.position, 5);
}
