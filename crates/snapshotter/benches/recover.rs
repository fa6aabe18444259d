//! Criterion benchmarks: snapshot save and load, and recovery (snapshot + 1,000-event tail)
//! against a full replay, on a 20,000-event log.

use criterion::{Criterion, criterion_group, criterion_main};
use event_log::{AppendRequest, Event, EventLog, Options};
use serde::{Deserialize, Serialize};
use snapshotter::{LogPoint, Recover, SnapshotOptions, Snapshotter};

#[derive(Default, Serialize, Deserialize)]
struct Counts {
    per_stream: std::collections::BTreeMap<String, u64>,
    bytes: u64,
}

impl Recover for Counts {
    fn apply(&mut self, event: &Event) {
        *self.per_stream.entry(event.stream.clone()).or_default() += 1;
        self.bytes += event.payload.len() as u64;
    }
}

const EVENTS: u64 = 20_000;

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path().join("log"), Options::default()).unwrap();
    let mut last = None;
    for chunk in 0..EVENTS / 500 {
        let batch: Vec<AppendRequest> = (0..500)
            .map(|i| {
                let n = chunk * 500 + i;
                let mut id = [0u8; 16];
                id[8..].copy_from_slice(&n.to_be_bytes());
                AppendRequest::new(format!("arm-{}", n % 150), id, "sample", vec![1u8; 128])
            })
            .collect();
        last = log.append_batch(batch).unwrap().last().copied();
    }
    let at_snapshot = log.read(EVENTS - 1_000).unwrap().unwrap();
    let options = SnapshotOptions { compact: false, ..SnapshotOptions::default() };
    let mut snapshots = Snapshotter::open(dir.path().join("snap"), options.clone()).unwrap();
    let mut state = Counts::default();
    for e in log.read_range(1, (EVENTS - 1_000) as usize).unwrap() {
        state.apply(&e);
    }
    snapshots
        .save(&state, LogPoint { position: at_snapshot.position, hash: at_snapshot.hash })
        .unwrap();
    let _ = last;
    let mut group = c.benchmark_group("recover");
    group.sample_size(10);
    group.bench_function("snapshot_plus_1000_tail", |b| {
        b.iter(|| snapshots.recover::<Counts>(&log).unwrap().1.events_replayed)
    });
    let empty_dir = tempfile::tempdir().unwrap();
    let mut none = Snapshotter::open(empty_dir.path(), options).unwrap();
    group.bench_function("full_replay_20000", |b| {
        b.iter(|| none.recover::<Counts>(&log).unwrap().1.events_replayed)
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
