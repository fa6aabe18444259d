//! Simulated power loss with snapshots and compactions: after any cut the recovered state
//! equals the state folded from the surviving events (and every acknowledged event survived).

use std::collections::BTreeMap;
use std::sync::Arc;

use event_log::sim::{SimRng, SimVfs};
use event_log::{AppendRequest, Event, EventLog};
use snapshotter::{Codec, Recover, SnapshotOptions, SnapshotPolicy, Snapshotter};

use crate::support::{Fold, seed, small_log_options};

/// Cut points per run (with snapshots and compactions; the event-log suite has its own).
const CUT_POINTS: u64 = 1_000;
const WORKLOAD_OPS: usize = 40;

fn snapshot_options(rng: &mut SimRng) -> SnapshotOptions {
    SnapshotOptions {
        copies: 2 + rng.below(2) as usize,
        codec: if rng.below(2) == 0 { Codec::Postcard } else { Codec::Json },
        policy: SnapshotPolicy {
            every_events: Some(5 + rng.below(10)),
            every: None,
            tail_bytes: None,
        },
        keep_tail_events: rng.below(10),
        ..SnapshotOptions::default()
    }
}

struct Run {
    next_id: u64,
    requests: BTreeMap<[u8; 16], AppendRequest>,
    /// Acknowledged events by position.
    acked: BTreeMap<u64, [u8; 16]>,
}

fn workload(vfs: &SimVfs, rng: &mut SimRng, options: &SnapshotOptions, run: &mut Run) {
    let Ok(log) = EventLog::open_with_vfs(Arc::new(vfs.clone()), "/log", small_log_options())
    else {
        return;
    };
    let Ok(mut snapshots) =
        Snapshotter::open_with_vfs(Arc::new(vfs.clone()), "/snap", options.clone())
    else {
        return;
    };
    let Ok((mut state, _)) = snapshots.recover::<Fold>(&log) else { return };
    for _ in 0..WORKLOAD_OPS {
        run.next_id += 1;
        let mut id = [0u8; 16];
        id[8..].copy_from_slice(&run.next_id.to_be_bytes());
        let len = rng.below(300) as usize;
        let payload: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let request = AppendRequest::new(format!("s{}", rng.below(3)), id, "k", payload);
        run.requests.insert(id, request.clone());
        let Ok(a) = log.append(request) else { return };
        run.acked.insert(a.position, id);
        let Ok(Some(event)) = log.read(a.position) else { return };
        state.apply(&event);
        if snapshots.maybe_snapshot(&log, &state, a.into()).is_err() {
            return;
        }
    }
}

#[test]
fn recovered_state_equals_fold_of_surviving_events() {
    let guard = seed("recovered_state_equals_fold_of_surviving_events");
    let mut master = SimRng::new(guard.seed);
    let calibration = SimVfs::new();
    let mut run = Run { next_id: 0, requests: BTreeMap::new(), acked: BTreeMap::new() };
    let options = snapshot_options(&mut SimRng::new(guard.seed));
    workload(&calibration, &mut SimRng::new(guard.seed), &options, &mut run);
    let total_ops = calibration.ops().max(10);
    let mut used_snapshot = 0;
    for cut in 0..CUT_POINTS {
        let case_seed = master.next_u64();
        let mut rng = SimRng::new(case_seed);
        let options = snapshot_options(&mut rng);
        let vfs = SimVfs::new();
        vfs.cut_power_at(1 + rng.below(total_ops));
        let mut run = Run { next_id: 0, requests: BTreeMap::new(), acked: BTreeMap::new() };
        workload(&vfs, &mut rng, &options, &mut run);
        vfs.cut_power_now();
        let what = format!("cut {cut} (case seed {case_seed})");

        let disk = Arc::new(vfs.after_power_cut(&mut rng));
        let log = EventLog::open_with_vfs(disk.clone(), "/log", small_log_options())
            .unwrap_or_else(|e| panic!("{what}: log reopen failed: {e}"));
        let mut snapshots = Snapshotter::open_with_vfs(disk, "/snap", options).unwrap();
        let (state, report) = snapshots
            .recover::<Fold>(&log)
            .unwrap_or_else(|e| panic!("{what}: recovery failed: {e}"));
        used_snapshot += (report.snapshot_position > 0) as u32;

        // Expected: the fold over positions 1..=head, below the compaction floor from what was
        // acknowledged (compaction only ever happens below acknowledged events).
        let head = log.head();
        let surviving: Vec<Event> = log.read_range(head.first_position, usize::MAX).unwrap();
        let mut expected = Fold::default();
        for p in 1..head.first_position {
            let id =
                run.acked.get(&p).unwrap_or_else(|| panic!("{what}: compacted {p} never acked"));
            let request = &run.requests[id];
            expected.apply(&Event {
                position: p,
                stream: request.stream.clone(),
                stream_version: 0,
                event_id: *id,
                kind: request.kind.clone(),
                timestamp_ms: 0,
                payload: request.payload.clone(),
                prev_hash: [0; 32],
                hash: [0; 32],
            });
        }
        surviving.iter().for_each(|e| expected.apply(e));
        assert!(!state.out_of_order, "{what}: replay out of order");
        assert_eq!(state, expected, "{what}: recovered state differs");
        for (p, id) in &run.acked {
            if *p >= head.first_position {
                assert_eq!(
                    &surviving[(p - head.first_position) as usize].event_id,
                    id,
                    "{what}: ack {p} lost"
                );
            }
        }
        assert_eq!(log.verify().unwrap().first_bad, None, "{what}");
    }
    assert!(used_snapshot > CUT_POINTS as u32 / 4, "snapshots were rarely used: {used_snapshot}");
}
