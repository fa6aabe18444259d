//! `Engine`: the node's replica (recovered from snapshot + op log), its NATS sync layer, the
//! increment batcher (one group commit per batch) and checkpoints.
//!
//! Until the sync layer is up (NATS unreachable at start), the replica runs local-only and
//! keeps taking writes; they reach the peers through the first anti-entropy round once it
//! starts. Starting the sync layer consumes the replica; if it fails, the replica is
//! recovered again from disk (everything it held is durable) and the start is retried.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crdt_sync::sync::{Publication, SyncConfig, SyncedReplica, now_ms};
use crdt_sync::{ChangeBatch, DocId, Error as CrdtError, Replica, ReplicaConfig, Update};
use event_log::EventLog;
use serde::Deserialize;
use snapshotter::{LogPoint, SnapshotOptions, Snapshotter};
use tokio::sync::{mpsc, oneshot};

use crdt_sync::OpLog;

use crate::oplog::EventOpLog;

/// Increments waiting for the batcher; beyond it callers get 503 `overloaded`.
pub const INCREMENT_QUEUE_MAX: usize = 16_384;
/// Most increments made durable by one group commit.
pub const INCREMENT_BATCH_MAX: usize = 4_096;
/// Longest a write waits for the sync layer to take the replica over.
pub const HANDOVER_WAIT_MS_MAX: u64 = 10_000;
/// Time limit for starting the sync layer once NATS is connected.
pub const SYNC_START_TIMEOUT_MS: u64 = 10_000;
/// Largest op record (a remote batch or sync message logged in one record).
pub const OP_RECORD_BYTES_MAX: usize = 16 * 1024 * 1024;

type Log = EventOpLog;

/// The snapshot payload: crdt-sync's encoded snapshot, written by
/// `Snapshotter::save_bytes` (its postcard form: a length, then the bytes, as versions that
/// saved this struct wrote it too), so that saving a snapshot of many megabytes (a
/// counter's archive of sealed tombstones, 10 bytes an op_id of the dedup window) does not
/// copy it.
#[derive(Deserialize)]
struct CrdtSnapshot {
    /// Read as a byte string in one piece (postcard hands it over as a slice), not byte by
    /// byte as a sequence.
    #[serde(deserialize_with = "from_bytes")]
    bytes: Vec<u8>,
}

fn from_bytes<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    struct Bytes;
    impl<'de> serde::de::Visitor<'de> for Bytes {
        type Value = Vec<u8>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("bytes")
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }
        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
            while let Some(byte) = seq.next_element()? {
                out.push(byte);
            }
            Ok(out)
        }
    }
    deserializer.deserialize_byte_buf(Bytes)
}

/// One increment waiting for the batcher.
pub struct IncrementRequest {
    /// The counter.
    pub doc: DocId,
    /// Idempotency key.
    pub op_id: String,
    /// Non-zero amount.
    pub amount: i64,
    /// Where the outcome goes: `(value, applied)` once durable.
    pub reply: oneshot::Sender<Result<(i64, bool), CrdtError>>,
}

/// What recovery did, for the log.
#[derive(Debug, Clone, Copy)]
pub struct RecoveryReport {
    /// Op log position the snapshot covered (0: none).
    pub snapshot_position: u64,
    /// Last op log position.
    pub log_position: u64,
    /// Time taken.
    pub elapsed: Duration,
}

/// How the engine is set up.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// This node.
    pub node_id: String,
    /// Every replica (this one included).
    pub members: Vec<String>,
    /// Where the log, the snapshots and the incarnation live.
    pub data_dir: PathBuf,
    /// The sync layer's timing.
    pub sync: SyncConfig,
    /// Op records between snapshots.
    pub snapshot_every_records: u64,
    /// See `crdt_sync::ReplicaConfig::epoch_changes_min`.
    pub epoch_changes_min: u64,
}

/// The node's replica and everything around it. Shared behind an `Arc`.
pub struct Engine {
    config: EngineConfig,
    replica_config: ReplicaConfig,
    log: Log,
    local: Mutex<Option<Replica<Log>>>,
    synced: OnceLock<SyncedReplica<Log>>,
    snapshots: Mutex<Snapshotter>,
    snapshot_position: AtomicU64,
    /// Held by the batcher while it commits, and by `close`: the log is never closed under
    /// a commit in flight.
    commit_gate: Mutex<bool>,
    increments: mpsc::Sender<IncrementRequest>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("node_id", &self.config.node_id).finish_non_exhaustive()
    }
}

/// Reads, bumps and durably stores the incarnation counter in `dir`. A data dir without
/// one (new, or replacing a lost one) starts from the wall clock in µs, so a node restored
/// without its data never writes with an actor an earlier incarnation of it used (peers
/// hold that actor's changes, and automerge refuses a second change at the same sequence)
/// unless it had started more than once a µs since it first started.
fn next_incarnation(dir: &Path) -> anyhow::Result<u64> {
    let path = dir.join("incarnation");
    let previous = match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .map_err(|e| anyhow::anyhow!("{} is corrupt: {e}", path.display()))?,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => crdt_sync::sync::now_us(),
        Err(err) => return Err(anyhow::anyhow!("cannot read {}: {err}", path.display())),
    };
    let next = previous + 1;
    let tmp = dir.join("incarnation.tmp");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(next.to_string().as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(next)
}

/// How long the event log remembers an op record's event id. Op records are never retried
/// with the same id (each append makes a fresh UUIDv7, see `oplog.rs`; crdt-sync dedups by
/// op_id), so the event log's idempotency window only costs memory: its default of an hour
/// kept one entry per record, about 40 bytes per increment in the growth bench.
pub const OP_RECORD_DEDUP_WINDOW: Duration = Duration::from_secs(10);

fn log_options() -> event_log::Options {
    event_log::Options {
        max_payload_bytes: OP_RECORD_BYTES_MAX,
        max_batch_bytes: OP_RECORD_BYTES_MAX + 64 * 1024,
        dedup_window: OP_RECORD_DEDUP_WINDOW,
        ..event_log::Options::default()
    }
}

impl Engine {
    /// Recovers the replica from the newest valid snapshot plus the op log tail, and starts
    /// the increment batcher. Blocking (file I/O); call it from a blocking context.
    pub fn recover(config: EngineConfig) -> anyhow::Result<(Arc<Engine>, RecoveryReport)> {
        let started = Instant::now();
        let incarnation = next_incarnation(&config.data_dir)?;
        let event_log = EventLog::open(config.data_dir.join("log"), log_options())?;
        let log = EventOpLog::new(event_log, incarnation);
        let snapshots = Snapshotter::open(
            config.data_dir.join("snapshots"),
            SnapshotOptions { compact: false, ..SnapshotOptions::default() },
        )?;
        let members: Vec<&str> = config.members.iter().map(String::as_str).collect();
        let replica_config = ReplicaConfig {
            incarnation,
            epoch_changes_min: config.epoch_changes_min,
            ..ReplicaConfig::new(&config.node_id, &members)
        };
        let (replica, snapshot_position) = recover_replica(&replica_config, &log, &snapshots)?;
        let report = RecoveryReport {
            snapshot_position,
            log_position: log.event_log().head().position,
            elapsed: started.elapsed(),
        };
        let (increments, queue) = mpsc::channel(INCREMENT_QUEUE_MAX);
        let engine = Arc::new(Engine {
            config,
            replica_config,
            log,
            local: Mutex::new(Some(replica)),
            synced: OnceLock::new(),
            snapshots: Mutex::new(snapshots),
            snapshot_position: AtomicU64::new(snapshot_position),
            commit_gate: Mutex::new(false),
            increments,
        });
        let batcher = engine.clone();
        std::thread::Builder::new()
            .name("increment-batcher".into())
            .spawn(move || batcher.run_batcher(queue))?;
        Ok((engine, report))
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.config.node_id
    }

    /// The op log.
    pub fn log(&self) -> &EventOpLog {
        &self.log
    }

    /// The sync layer, once started.
    pub fn synced(&self) -> Option<&SyncedReplica<Log>> {
        self.synced.get()
    }

    /// Queues an increment for the batcher; resolves once it is durable (or refused).
    pub async fn increment(
        &self,
        doc: DocId,
        op_id: String,
        amount: i64,
    ) -> Result<Result<(i64, bool), CrdtError>, EngineBusy> {
        let (reply, outcome) = oneshot::channel();
        self.increments
            .try_send(IncrementRequest { doc, op_id, amount, reply })
            .map_err(|_| EngineBusy)?;
        outcome.await.map_err(|_| EngineBusy)
    }

    /// Runs a local operation on `doc` (blocking: it may fsync). Its changes are published
    /// when the sync layer is up.
    pub fn update<T>(
        &self,
        doc: &DocId,
        operation: impl FnOnce(&mut Replica<Log>, u64) -> Result<Update<T>, CrdtError>,
    ) -> Result<Update<T>, CrdtError> {
        self.with_writer(|writer| match writer {
            Writer::Synced(synced) => synced.update(doc, operation),
            Writer::Local(replica) => operation(replica, now_ms()),
        })?
    }

    /// Runs a local operation on `doc` whose appends are deferred (see
    /// `EventOpLog::end_deferred`): its changes are held until the returned publication is
    /// released, which the caller does once they are durable (`None`: not synced yet, the
    /// first anti-entropy round carries them).
    fn update_deferred<T>(
        &self,
        doc: &DocId,
        operation: impl FnOnce(&mut Replica<Log>, u64) -> Result<Update<T>, CrdtError>,
    ) -> Result<(Update<T>, Option<Publication>), CrdtError> {
        self.with_writer(|writer| match writer {
            Writer::Synced(synced) => {
                synced.update_deferred(doc, operation).map(|(update, held)| (update, Some(held)))
            }
            Writer::Local(replica) => operation(replica, now_ms()).map(|update| (update, None)),
        })?
    }

    /// Runs `write` on whoever holds the replica: the sync layer, or the local replica under
    /// its lock (waiting while the sync layer takes it over).
    fn with_writer<R>(&self, write: impl FnOnce(Writer<'_>) -> R) -> Result<R, CrdtError> {
        let deadline = Instant::now() + Duration::from_millis(HANDOVER_WAIT_MS_MAX);
        loop {
            if let Some(synced) = self.synced.get() {
                return Ok(write(Writer::Synced(synced)));
            }
            {
                let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(replica) = local.as_mut() {
                    return Ok(write(Writer::Local(replica)));
                }
            }
            if Instant::now() > deadline {
                return Err(CrdtError::OpLog(crdt_sync::OpLogError::Storage(
                    "replica handover to the sync layer did not finish".into(),
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Reads the replica (blocking briefly while the sync layer takes it over).
    pub fn read<T>(&self, read: impl FnOnce(&Replica<Log>) -> T) -> T {
        let mut read = Some(read);
        loop {
            if let Some(synced) = self.synced.get() {
                return synced.read(read.take().expect("runs once"));
            }
            {
                let local = self.local.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(replica) = local.as_ref() {
                    return read.take().expect("runs once")(replica);
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Hands the replica to the NATS sync layer; retries (re-recovering the replica from
    /// disk after a failed start) until it is up.
    pub async fn start_sync(self: &Arc<Self>, client: async_nats::Client) {
        let mut attempt = 0usize;
        loop {
            if client.connection_state() != async_nats::connection::State::Connected {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let Some(replica) = self.local.lock().unwrap_or_else(|e| e.into_inner()).take() else {
                return;
            };
            let started = tokio::time::timeout(
                Duration::from_millis(SYNC_START_TIMEOUT_MS),
                SyncedReplica::start(client.clone(), replica, self.config.sync.clone()),
            )
            .await;
            match started {
                Ok(Ok(synced)) => {
                    let _ = self.synced.set(synced);
                    tracing::info!(node = %self.config.node_id, "sync layer started");
                    return;
                }
                Ok(Err(err)) => tracing::warn!(error = %err, "sync layer did not start; retrying"),
                Err(_) => tracing::warn!("sync layer start timed out; retrying"),
            }
            let engine = self.clone();
            let recovered = tokio::task::spawn_blocking(move || {
                let snapshots = engine.snapshots.lock().unwrap_or_else(|e| e.into_inner());
                recover_replica(&engine.replica_config, &engine.log, &snapshots).map(|(r, _)| r)
            })
            .await;
            match recovered {
                Ok(Ok(replica)) => {
                    *self.local.lock().unwrap_or_else(|e| e.into_inner()) = Some(replica);
                }
                other => {
                    // Everything is on disk; without a replica nothing can be served.
                    tracing::error!(?other, "cannot recover the replica again; exiting");
                    std::process::abort();
                }
            }
            attempt += 1;
            tokio::time::sleep(service_kit::nats::backoff(attempt + 1)).await;
        }
    }

    /// Takes a snapshot when `snapshot_every_records` op records were written since the last
    /// one (or `force`), saves it atomically, then compacts the log below it.
    pub fn maybe_snapshot(&self, force: bool) -> anyhow::Result<bool> {
        let last = self.snapshot_position.load(Ordering::Acquire);
        let head = self.log.last_position();
        if head == last || (!force && head - last < self.config.snapshot_every_records) {
            return Ok(false);
        }
        let snapshot = self.read(|replica| replica.snapshot());
        if snapshot.covers_position == 0 {
            return Ok(false);
        }
        // Peers' changes are logged without waiting (crdt_sync::OpLog::append_unsynced):
        // everything the snapshot covers is made durable before the log below it goes.
        self.log.event_log().flush()?;
        let event = self.log.event_log().read(snapshot.covers_position)?.ok_or_else(|| {
            anyhow::anyhow!("position {} not in the log", snapshot.covers_position)
        })?;
        let at = LogPoint { position: snapshot.covers_position, hash: event.hash };
        let info = self
            .snapshots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .save_bytes(&snapshot.bytes, at)?;
        self.snapshot_position.store(snapshot.covers_position, Ordering::Release);
        metrics::gauge!("keel_counter_snapshot_bytes").set(info.len_bytes as f64);
        // Compact below the previous snapshot, not this one: if this one is ever unreadable,
        // recovery falls back to the previous snapshot and still finds the log after it.
        if last > 0 {
            self.log.event_log().compact(last + 1)?;
        }
        tracing::info!(
            position = snapshot.covers_position,
            len_bytes = info.len_bytes,
            "checkpoint"
        );
        Ok(true)
    }

    /// Bytes of the op log's segment files plus the snapshot files on disk.
    pub fn disk_bytes(&self) -> u64 {
        dir_bytes(&self.config.data_dir)
    }

    /// Closes the log cleanly (after the batcher drained).
    pub fn close(&self) {
        let mut closed = self.commit_gate.lock().unwrap_or_else(|e| e.into_inner());
        *closed = true;
        if let Err(err) = self.log.event_log().close() {
            tracing::warn!(error = %err, "closing the op log");
        }
    }

    fn run_batcher(self: Arc<Self>, mut queue: mpsc::Receiver<IncrementRequest>) {
        while let Some(first) = queue.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < INCREMENT_BATCH_MAX {
                match queue.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => break,
                }
            }
            let mut by_doc: BTreeMap<DocId, Vec<IncrementRequest>> = BTreeMap::new();
            for item in batch {
                by_doc.entry(item.doc.clone()).or_default().push(item);
            }
            for (doc, items) in by_doc {
                self.commit_increments(&doc, items);
            }
        }
    }

    /// Applies `items` to `doc` under one replica lock, makes them durable with one group
    /// commit after the lock is released, then publishes and answers.
    fn commit_increments(&self, doc: &DocId, items: Vec<IncrementRequest>) {
        let closed = self.commit_gate.lock().unwrap_or_else(|e| e.into_inner());
        if *closed {
            // Shutting down: the callers see the queue gone (503) and retry elsewhere.
            return;
        }
        let count = items.len();
        let mut outcomes: Vec<Result<(i64, bool), CrdtError>> = Vec::with_capacity(count);
        let log = self.log.clone();
        let mut appends = None;
        let result = self.update_deferred(doc, |replica, now| {
            let mut changes = ChangeBatch::new();
            log.begin_deferred();
            for item in &items {
                let outcome = replica.increment(doc, &item.op_id, item.amount, now);
                outcomes.push(outcome.map(|update| {
                    if let Some(batch) = &update.changes {
                        // One update writes to one epoch.
                        let merged = changes.extend(batch);
                        debug_assert!(merged, "increments of one batch share an epoch");
                    }
                    (update.value, update.applied)
                }));
            }
            appends = Some(log.end_deferred());
            let applied = !changes.is_empty();
            Ok(Update { value: (), applied, changes: applied.then_some(changes) })
        });
        // The group commit, without the replica lock: the batcher is the only writer of
        // increments and takes the next batch only after this one is durable, so no answer
        // (a duplicate's included) ever rests on an increment that is not durable yet.
        if let Some(Err(err)) = appends.map(|appends| appends.wait()) {
            // The replica holds changes that may not be durable: stop, recover from disk.
            tracing::error!(error = %err, "op log group commit failed; exiting");
            std::process::abort();
        }
        let result = result.map(|(update, held)| {
            if let Some(held) = held {
                held.release();
            }
            update
        });
        if let Err(err) = result {
            let text = err.to_string();
            outcomes.clear();
            for _ in 0..count {
                outcomes.push(Err(CrdtError::OpLog(crdt_sync::OpLogError::Storage(text.clone()))));
            }
        }
        metrics::histogram!("keel_counter_commit_batch_size").record(count as f64);
        for (item, outcome) in items.into_iter().zip(outcomes) {
            let label = match &outcome {
                Ok((_, true)) => "applied",
                Ok((_, false)) => "duplicate",
                Err(_) => "refused",
            };
            metrics::counter!("keel_counter_increments_total", "outcome" => label).increment(1);
            let _ = item.reply.send(outcome);
        }
    }
}

/// Who holds the replica for a write.
enum Writer<'a> {
    Synced(&'a SyncedReplica<Log>),
    Local(&'a mut Replica<Log>),
}

/// The batcher's queue is full or gone.
#[derive(Debug, Clone, Copy)]
pub struct EngineBusy;

fn recover_replica(
    config: &ReplicaConfig,
    log: &EventOpLog,
    snapshots: &Snapshotter,
) -> anyhow::Result<(Replica<Log>, u64)> {
    let loaded = snapshots.load::<CrdtSnapshot>()?;
    for skipped in &loaded.skipped {
        tracing::warn!(path = %skipped.path.display(), reason = %skipped.reason, "snapshot skipped");
    }
    match loaded.snapshot {
        Some((snapshot, info)) => {
            let replica = Replica::recover(config.clone(), log.clone(), Some(&snapshot.bytes))?;
            Ok((replica, info.position))
        }
        None => Ok((Replica::recover(config.clone(), log.clone(), None)?, 0)),
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_bytes(&entry.path()),
            Ok(meta) => {
                use std::os::unix::fs::MetadataExt;
                meta.blocks() * 512
            }
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The payload as versions before `save_bytes` saved it (a serialized struct).
    #[derive(serde::Serialize)]
    struct Saved {
        bytes: Vec<u8>,
    }

    #[test]
    fn a_data_dir_without_an_incarnation_never_reuses_an_earlier_one() {
        let dir = tempfile::tempdir().unwrap();
        let before_us = crdt_sync::sync::now_us();
        let first = next_incarnation(dir.path()).unwrap();
        assert!(first >= before_us, "a new data dir starts from the clock: {first}");
        assert_eq!(next_incarnation(dir.path()).unwrap(), first + 1);
        // The same node restored on an empty data dir: above every incarnation it had.
        let restored = tempfile::tempdir().unwrap();
        assert!(next_incarnation(restored.path()).unwrap() > first + 1);
        std::fs::write(dir.path().join("incarnation"), "x").unwrap();
        assert!(next_incarnation(dir.path()).is_err(), "a corrupt file is an error");
    }

    fn loaded(snapshots: &Snapshotter) -> Vec<u8> {
        snapshots.load::<CrdtSnapshot>().unwrap().snapshot.expect("a snapshot").0.bytes
    }

    #[test]
    fn snapshots_saved_as_bytes_or_as_a_struct_load_alike() {
        let dir = tempfile::tempdir().unwrap();
        let mut snapshots = Snapshotter::open(dir.path(), SnapshotOptions::default()).unwrap();
        // Long enough for a length of two varint bytes.
        let bytes: Vec<u8> = (0..=255).cycle().take(70_000).collect();
        let at = |position| LogPoint { position, hash: [7; 32] };
        let old = snapshots.save(&Saved { bytes: bytes.clone() }, at(1)).unwrap();
        assert_eq!(loaded(&snapshots), bytes);
        let new = snapshots.save_bytes(&bytes, at(2)).unwrap();
        assert_eq!(loaded(&snapshots), bytes);
        assert_eq!(new.len_bytes, old.len_bytes, "the same payload on disk");
        assert_eq!(
            std::fs::read(&new.path).unwrap()[72..],
            std::fs::read(&old.path).unwrap()[72..],
        );
        // A JSON snapshot of the struct (an array of numbers) still reads.
        let json = serde_json::to_vec(&Saved { bytes: bytes.clone() }).unwrap();
        assert_eq!(serde_json::from_slice::<CrdtSnapshot>(&json).unwrap().bytes, bytes);
    }
}
