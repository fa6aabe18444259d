//! Growth and throughput bench: document bytes per million increments (folding on), ops/s, RSS.
//!
//! `cargo bench -p crdt-sync --bench growth -- [increments] [tick_every] [rate_per_s] [sequential_ids] [remote_apply] [step]`
//! (defaults 1,000,000, 1,000, 1,000, 0, 1, 100,000). op_ids are random 36-character
//! UUID-shaped strings unless `sequential_ids` is 1 (which compress far
//! better). Prints one row per 100,000
//! increments: the curve. The op log is a counting sink here so the
//! figures are the replica's own.

use std::time::{Duration, Instant};

use crdt_sync::sync::ARCHIVE_CHUNK_BYTES_MAX;
use crdt_sync::{
    ArchiveChunk, ChangeBatch, DocId, Error, MemOpLog, OpLog, OpLogError, OpRecord, Replica,
    ReplicaConfig,
};

/// Rows of the curve, in increments (default; argument 5 overrides).
const STEP_INCREMENTS: u64 = 100_000;
/// Batch sizes of the remote-apply measurement (changes coalesced per apply).
const COALESCE: [usize; 3] = [1, 100, 1_000];
/// Changes of the remote-apply measurement (one apply costs a pass over
/// the document in automerge 0.12, so single-change batches are quadratic).
const REMOTE_APPLY_CHANGES: u64 = 20_000;

/// Counts what would be written; keeps nothing.
#[derive(Default)]
struct CountingLog {
    records: u64,
    bytes: u64,
}

impl OpLog for CountingLog {
    fn append(&mut self, records: &[OpRecord]) -> Result<u64, OpLogError> {
        for record in records {
            self.records += 1;
            self.bytes += record.encode().len() as u64;
        }
        Ok(self.records)
    }

    fn replay(
        &self,
        _after_position: u64,
        _visit: &mut dyn FnMut(u64, OpRecord) -> Result<(), Error>,
    ) -> Result<(), Error> {
        Ok(())
    }

    fn truncate_through(&mut self, _position: u64) -> Result<(), OpLogError> {
        Ok(())
    }

    fn last_position(&self) -> u64 {
        self.records
    }
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn arg(index: usize, default: u64) -> u64 {
    std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .nth(index)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Error> {
    let increments = arg(0, 1_000_000);
    let tick_every = arg(1, 1_000).max(1);
    let rate_per_s = arg(2, 1_000).max(1);
    let sequential_ids = arg(3, 0) == 1;
    let step_increments = arg(5, STEP_INCREMENTS).max(1);
    let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
    let mut op_id = |i: u64| -> String {
        if sequential_ids {
            return format!("cycle-{i:012}");
        }
        // xorshift64*: deterministic, UUID-shaped, incompressible enough.
        let mut word = || {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            seed.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let (a, b) = (word(), word());
        format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xffff,
            b >> 48,
            b & 0xffff_ffff_ffff
        )
    };
    let doc = DocId::counter("production")?;

    println!(
        "single replica, folding on: {increments} increments, tick every {tick_every}, \
         simulated rate {rate_per_s}/s, dedup window {} ms, {} op_ids",
        crdt_sync::DEDUP_WINDOW_MS_DEFAULT,
        if sequential_ids { "sequential" } else { "random 36-char" }
    );
    println!(
        "{:>10} {:>12} {:>9} {:>11} {:>11} {:>8} {:>10} {:>11} {:>10} {:>9}",
        "increments",
        "doc_bytes",
        "bytes/inc",
        "changes",
        "am_ops",
        "live",
        "tombstones",
        "log_bytes",
        "rss_mb",
        "incs/s"
    );
    let mut replica = Replica::new(ReplicaConfig::new("a", &["a"]), CountingLog::default())?;
    let started = Instant::now();
    let mut step_started = Instant::now();
    let mut busy = std::time::Duration::ZERO;
    for i in 1..=increments {
        let now_ms = i * 1_000 / rate_per_s;
        let id = op_id(i);
        let op_started = Instant::now();
        replica.increment(&doc, &id, 1, now_ms)?;
        if i % tick_every == 0 {
            replica.tick(now_ms)?;
        }
        busy += op_started.elapsed();
        if i % step_increments == 0 || i == increments {
            let step_elapsed = step_started.elapsed();
            let counter = replica.counter(&doc)?.expect("counter exists");
            assert_eq!(counter.value as u64, i);
            let doc_bytes = replica.doc_bytes(&doc).unwrap_or(0);
            let metrics = replica.metrics();
            let log = replica.log();
            println!(
                "{:>10} {:>12} {:>9.1} {:>11} {:>11} {:>8} {:>10} {:>11} {:>10.1} {:>9.0}",
                i,
                doc_bytes,
                doc_bytes as f64 / i as f64,
                metrics.changes,
                metrics.automerge_ops,
                counter.live_ops,
                counter.tombstones,
                log.bytes,
                rss_bytes() as f64 / 1e6,
                step_increments.min(i) as f64 / step_elapsed.as_secs_f64(),
            );
            step_started = Instant::now();
        }
    }
    println!(
        "total {:.1} s, {:.0} increments/s including ticks (excluding metrics)",
        started.elapsed().as_secs_f64(),
        increments as f64 / busy.as_secs_f64()
    );
    archive_transfer(&mut replica, &doc)?;
    if arg(4, 1) == 1 {
        remote_apply(increments.min(REMOTE_APPLY_CHANGES))?;
    }
    Ok(())
}

/// What a member restored without its data costs its peer and itself: `a`'s archive
/// reply (built under its lock), and its merge at a fresh replica that got the counter
/// by anti-entropy.
fn archive_transfer(a: &mut Replica<CountingLog>, doc: &DocId) -> Result<(), Error> {
    let config = ReplicaConfig { incarnation: 1, ..ReplicaConfig::new("b", &["a", "b"]) };
    let mut b = Replica::new(config, MemOpLog::new())?;
    let synced = Instant::now();
    for _ in 0..1_000 {
        let to_b = a.sync_message(doc, "b");
        if let Some(message) = &to_b {
            b.receive_sync_message(doc, "a", message)?;
        }
        let to_a = b.sync_message(doc, "a");
        if let Some(message) = &to_a {
            a.receive_sync_message(doc, "b", message)?;
        }
        if to_b.is_none() && to_a.is_none() {
            break;
        }
    }
    let sync_ms = synced.elapsed().as_secs_f64() * 1e3;
    let known_before = b.counter(doc)?.map_or(0, |value| value.tombstones);
    let (mut build, mut decode, mut merge) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let (mut chunks, mut reply_bytes, mut chunk_bytes_max, mut blobs) = (0, 0, 0, 0);
    let mut next = Some(0);
    while let Some(start) = next {
        let built = Instant::now();
        let (chunk, after) =
            a.archive_reply(doc, start, ARCHIVE_CHUNK_BYTES_MAX).expect("a holds the counter");
        build += built.elapsed();
        let decoded = Instant::now();
        let checked = ArchiveChunk::decode(doc, &chunk)?;
        decode += decoded.elapsed();
        let merged = Instant::now();
        blobs += b.receive_archive(doc, "a", checked);
        merge += merged.elapsed();
        chunks += 1;
        reply_bytes += chunk.len();
        chunk_bytes_max = chunk_bytes_max.max(chunk.len());
        next = after;
    }
    let known_after = b.counter(doc)?.map_or(0, |value| value.tombstones);
    println!(
        "archive transfer to a replica restored empty: anti-entropy {sync_ms:.0} ms, op_ids \
         known {known_before} -> {known_after}; reply {reply_bytes} bytes in {chunks} chunks \
         (largest {chunk_bytes_max}), {blobs} blobs; built in {:.1} ms (under a's lock), \
         decoded in {:.1} ms (no lock), merged in {:.1} ms (under b's lock); still wanted: {}",
        build.as_secs_f64() * 1e3,
        decode.as_secs_f64() * 1e3,
        merge.as_secs_f64() * 1e3,
        b.archives_wanted().len()
    );
    Ok(())
}

/// Remote apply throughput: changes made at one replica, applied at another.
fn remote_apply(increments: u64) -> Result<(), Error> {
    let doc = DocId::counter("production")?;
    let members = ["a", "b"];
    let mut a = Replica::new(ReplicaConfig::new("a", &members), MemOpLog::new())?;
    let mut batches = Vec::with_capacity(increments as usize);
    for i in 1..=increments {
        let update = a.increment(&doc, &format!("cycle-{i:012}"), 1, i)?;
        batches.push(update.changes.expect("fresh op").into_bytes());
    }
    for coalesce in COALESCE {
        let mut b = Replica::new(ReplicaConfig::new("b", &members), CountingLog::default())?;
        let started = Instant::now();
        for chunk in batches.chunks(coalesce) {
            let mut batch = ChangeBatch::new();
            for bytes in chunk {
                assert!(batch.extend(&ChangeBatch::from_bytes(bytes)?), "one epoch");
            }
            b.apply_changes(&doc, batch.as_bytes())?;
        }
        let elapsed = started.elapsed();
        assert_eq!(b.counter(&doc)?.expect("exists").value as u64, increments);
        println!(
            "remote apply: {increments} changes in batches of {coalesce}: {:.2} s = {:.0} changes/s",
            elapsed.as_secs_f64(),
            increments as f64 / elapsed.as_secs_f64()
        );
    }

    // Anti-entropy from scratch: a fresh replica syncs the whole history.
    let mut c = Replica::new(ReplicaConfig::new("c", &["a", "c"]), CountingLog::default())?;
    let started = Instant::now();
    let mut messages = 0;
    loop {
        let to_c = a.sync_message(&doc, "c");
        if let Some(message) = &to_c {
            c.receive_sync_message(&doc, "a", message)?;
            messages += 1;
        }
        let to_a = c.sync_message(&doc, "a");
        if let Some(message) = &to_a {
            a.receive_sync_message(&doc, "c", message)?;
            messages += 1;
        }
        if to_a.is_none() && to_c.is_none() {
            break;
        }
    }
    assert_eq!(c.counter(&doc)?.expect("exists").value as u64, increments);
    println!(
        "anti-entropy of {increments} changes from scratch: {messages} messages, {:.2} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
