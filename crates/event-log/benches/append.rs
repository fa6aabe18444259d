//! Criterion micro-benchmarks: record encoding, chain hashing, and durable appends on a real
//! directory (single writer and a batch).

use criterion::{Criterion, criterion_group, criterion_main};
use event_log::record::{Event, encode_record, event_hash};
use event_log::{AppendRequest, EventLog, Options};

fn event(payload_len: usize) -> Event {
    Event {
        position: 1,
        stream: "arm-17".into(),
        stream_version: 1,
        event_id: [7; 16],
        kind: "plan.updated".into(),
        timestamp_ms: 1_700_000_000_000,
        payload: vec![1; payload_len],
        prev_hash: [0; 32],
        hash: [0; 32],
    }
}

fn codec(c: &mut Criterion) {
    let e = event(128);
    c.bench_function("encode_record_128B", |b| {
        let mut buf = Vec::with_capacity(512);
        b.iter(|| {
            buf.clear();
            encode_record(&e, 0, &mut buf);
            buf.len()
        })
    });
    c.bench_function("event_hash_128B", |b| {
        b.iter(|| event_hash(&e.prev_hash, 1, &e.stream, 1, &e.event_id, &e.kind, 0, &e.payload))
    });
}

fn durable(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(std::env::var("KEEL_BENCH_DIR").unwrap_or_else(|_| ".".into()))
        .expect("bench dir");
    let log = EventLog::open(dir.path(), Options::default()).expect("open");
    let mut n = 0u64;
    let mut next = move || {
        n += 1;
        let mut id = [0u8; 16];
        id[8..].copy_from_slice(&n.to_be_bytes());
        AppendRequest::new("arm-1", id, "bench", vec![0u8; 128])
    };
    let mut group = c.benchmark_group("durable");
    group.sample_size(20);
    group.bench_function("append_128B_single_writer", |b| b.iter(|| log.append(next()).unwrap()));
    group.bench_function("append_batch_64x128B", |b| {
        b.iter(|| log.append_batch((0..64).map(|_| next()).collect()).unwrap())
    });
    group.finish();
}

criterion_group!(benches, codec, durable);
criterion_main!(benches);
