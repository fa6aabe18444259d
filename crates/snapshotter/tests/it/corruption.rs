//! Corrupt snapshots: random byte flips and truncations of the newest snapshot fall back to the
//! previous one, never to a wrong state.

use std::sync::Arc;

use event_log::sim::{SimRng, SimVfs};
use event_log::{EventLog, Vfs};
use snapshotter::{Codec, SnapshotOptions, Snapshotter};

use crate::support::{Fold, fold, request, seed, small_log_options};

/// Random damages per run.
const CASES: u64 = 400;

#[test]
fn damaged_newest_snapshot_falls_back_to_previous() {
    let guard = seed("damaged_newest_snapshot_falls_back_to_previous");
    let mut rng = SimRng::new(guard.seed);
    let vfs = SimVfs::new();
    let log = EventLog::open_with_vfs(Arc::new(vfs.clone()), "/log", small_log_options()).unwrap();
    for codec in [Codec::Postcard, Codec::Json] {
        let options = SnapshotOptions { codec, compact: false, ..SnapshotOptions::default() };
        let dir = format!("/snap-{codec:?}");
        let mut snapshots =
            Snapshotter::open_with_vfs(Arc::new(vfs.clone()), &dir, options).unwrap();
        let base = log.head().position;
        let mut at = Vec::new();
        for round in 0..3u64 {
            for n in 0..20u64 {
                log.append(request(
                    base + round * 20 + n + 1 + if codec == Codec::Json { 10_000 } else { 0 },
                    30,
                ))
                .unwrap();
            }
            let events = log.read_range(1, usize::MAX).unwrap();
            let a = events.last().unwrap().clone();
            let point = snapshotter::LogPoint { position: a.position, hash: a.hash };
            snapshots.save(&fold(&events), point).unwrap();
            at.push(a.position);
        }
        let truth = fold(&log.read_range(1, usize::MAX).unwrap());
        let newest = snapshots.list().unwrap()[0].clone();
        let original = vfs.read_file(&newest.path).unwrap();
        for case in 0..CASES {
            let truncate = rng.below(4) == 0;
            if truncate {
                vfs.truncate_durably(&newest.path, rng.below(original.len() as u64)).unwrap();
            } else {
                let offset = rng.below(original.len() as u64);
                vfs.corrupt_byte(&newest.path, offset, 1 + rng.below(255) as u8).unwrap();
            }
            let (state, report) = snapshots.recover::<Fold>(&log).unwrap();
            assert_eq!(state, truth, "case {case}: wrong state");
            assert!(!state.out_of_order);
            assert_eq!(
                report.snapshot_position, at[1],
                "case {case}: did not use the previous snapshot"
            );
            assert_eq!(report.skipped.len(), 1);
            // Restore the newest snapshot.
            let file = vfs.open(&newest.path, false).unwrap();
            file.set_len(0).unwrap();
            file.write_all_at(&original, 0).unwrap();
            file.sync_data().unwrap();
        }
        let (state, report) = snapshots.recover::<Fold>(&log).unwrap();
        assert_eq!((state, report.snapshot_position), (truth, at[2]));
    }
    let _ = Fold::default();
}
