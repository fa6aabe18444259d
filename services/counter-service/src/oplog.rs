//! `EventOpLog`: crdt-sync's `OpLog` on the event-log crate (one event per op record, group commit).
//!
//! Every record is one event on stream [`STREAM`] (kind [`KIND`], payload =
//! `OpRecord::encode`), so op log positions are event-log positions: the log
//! holds nothing else, positions are dense from 1, and a snapshot's
//! `covers_position` is a position in this log.
//!
//! Three ways to append:
//!
//! - **unsynced** ([`OpLog::append_unsynced`], peers' changes): queued with the
//!   log's writer and not waited for; the writer group-commits it with what
//!   comes next, and every later append is durable only once it is;
//! - **immediate** (the default, what the `OpLog` contract asks): `append`
//!   returns once its records are fdatasynced;
//! - **deferred**, between [`EventOpLog::begin_deferred`] and
//!   [`EventOpLog::finish_deferred`]: `append` only queues the records with
//!   the log's writer and returns the position they will get; `finish_deferred`
//!   waits until all of them are durable ([`EventOpLog::end_deferred`] closes
//!   the batch without waiting, so the wait can happen after the replica lock is
//!   released). The increment batcher uses it so one group commit covers a whole
//!   batch of increments made under one replica lock, and peers' changes and
//!   ticks go on during the fdatasync; nothing of the batch is answered or
//!   published before the wait returns. If that wait fails, the replica holds
//!   changes that may not be durable: the caller must stop the process
//!   (fail-stop, as PostgreSQL does on an fsync error) and let recovery rebuild
//!   from disk.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crdt_sync::{Error as CrdtError, OpLog, OpLogError, OpRecord};
use event_log::{AppendRequest, Appended, EventLog, Pending};

/// Stream of the op records in the event log.
pub const STREAM: &str = "crdt";
/// Kind of an op record event.
pub const KIND: &str = "crdt.change";
/// Events read per chunk while replaying.
const REPLAY_CHUNK_EVENTS: usize = 4_096;
/// Most appends a deferred batch may queue before they are awaited.
pub const DEFERRED_APPENDS_MAX: usize = 8_192;

/// The event-log-backed op log. Cheap to clone (clones share the log and its position).
#[derive(Debug, Clone)]
pub struct EventOpLog {
    log: EventLog,
    inner: std::sync::Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Position of the last record appended (durable, or queued in a deferred batch).
    last_position: AtomicU64,
    /// Incarnation of this process (in every event id, so ids never repeat across starts).
    incarnation: u64,
    /// Events appended by this process (the rest of the event id).
    sequence: AtomicU64,
    /// `Some` while a deferred batch is open: its pending appends.
    deferred: Mutex<Option<Vec<Pending<Appended>>>>,
}

impl EventOpLog {
    /// Wraps an open event log; `incarnation` must differ from every earlier start.
    pub fn new(log: EventLog, incarnation: u64) -> EventOpLog {
        let last_position = log.head().position;
        EventOpLog {
            log,
            inner: std::sync::Arc::new(Inner {
                last_position: AtomicU64::new(last_position),
                incarnation,
                sequence: AtomicU64::new(0),
                deferred: Mutex::new(None),
            }),
        }
    }

    /// The event log underneath.
    pub fn event_log(&self) -> &EventLog {
        &self.log
    }

    /// Opens a deferred batch (see the module docs).
    pub fn begin_deferred(&self) {
        let mut deferred = self.inner.deferred.lock().unwrap_or_else(|e| e.into_inner());
        debug_assert!(deferred.is_none(), "deferred batches do not nest");
        *deferred = Some(Vec::new());
    }

    /// Closes the deferred batch and waits until every append queued in it is durable.
    pub fn finish_deferred(&self) -> Result<(), OpLogError> {
        self.end_deferred().wait()
    }

    /// Closes the deferred batch without waiting: later appends are immediate again, and
    /// the returned appends can be waited for once the replica lock is released.
    pub fn end_deferred(&self) -> DeferredAppends {
        let pending = self.inner.deferred.lock().unwrap_or_else(|e| e.into_inner()).take();
        DeferredAppends(pending.unwrap_or_default())
    }

    fn event_id(&self) -> [u8; 16] {
        event_id(crdt_sync::sync::now_ms(), self.inner.incarnation, {
            self.inner.sequence.fetch_add(1, Ordering::Relaxed)
        })
    }

    fn requests(&self, records: &[OpRecord]) -> Vec<AppendRequest> {
        records
            .iter()
            .map(|record| AppendRequest::new(STREAM, self.event_id(), KIND, record.encode()))
            .collect()
    }
}

/// The appends of a closed deferred batch (see the module docs).
#[derive(Debug)]
#[must_use = "the batch is not durable until `wait` returns"]
pub struct DeferredAppends(Vec<Pending<Appended>>);

impl DeferredAppends {
    /// Waits until every append of the batch is durable.
    pub fn wait(self) -> Result<(), OpLogError> {
        let mut result = Ok(());
        for item in self.0 {
            if let Err(err) = item.wait() {
                result = Err(OpLogError::Storage(err.to_string()));
            }
        }
        result
    }
}

/// Bits of the sequence in an event id (2^38 events per incarnation).
const ID_SEQUENCE_BITS: u32 = 38;

/// A UUIDv7 (RFC 9562: 48-bit ms time, version 7, variant 0b10) whose 74 other bits
/// hold the low 36 bits of the incarnation and the low 38 bits of a per-process
/// sequence, so ids never repeat across starts and the event log prunes them from its
/// dedup index once they are older than its window (it prunes only UUIDv7 ids).
fn event_id(now_ms: u64, incarnation: u64, sequence: u64) -> [u8; 16] {
    let incarnation = incarnation & ((1 << 36) - 1);
    let rand_a = (incarnation >> 24) as u16 & 0x0FFF;
    let rand_b = ((incarnation & 0xFF_FFFF) << ID_SEQUENCE_BITS)
        | (sequence & ((1 << ID_SEQUENCE_BITS) - 1));
    let key = (u128::from(now_ms & 0xFFFF_FFFF_FFFF) << 80)
        | (0x7 << 76)
        | (u128::from(rand_a) << 64)
        | (0b10 << 62)
        | u128::from(rand_b);
    key.to_be_bytes()
}

fn storage(err: event_log::Error) -> OpLogError {
    OpLogError::Storage(err.to_string())
}

impl OpLog for EventOpLog {
    fn append(&mut self, records: &[OpRecord]) -> Result<u64, OpLogError> {
        if records.is_empty() {
            return Ok(self.last_position());
        }
        let mut requests = self.requests(records);
        let mut deferred = self.inner.deferred.lock().unwrap_or_else(|e| e.into_inner());
        let pending = if requests.len() == 1 {
            let pending = self.log.append_async(requests.remove(0));
            PendingAppend::One(pending)
        } else {
            PendingAppend::Batch(self.log.append_batch_async(requests))
        };
        match (deferred.as_mut(), pending) {
            (Some(queue), PendingAppend::One(pending)) if queue.len() < DEFERRED_APPENDS_MAX => {
                queue.push(pending);
            }
            (_, PendingAppend::One(pending)) => {
                pending.wait().map_err(storage)?;
            }
            (_, PendingAppend::Batch(pending)) => {
                pending.wait().map_err(storage)?;
            }
        }
        let count = records.len() as u64;
        Ok(self.inner.last_position.fetch_add(count, Ordering::AcqRel) + count)
    }

    fn append_unsynced(&mut self, records: &[OpRecord]) -> Result<u64, OpLogError> {
        if records.is_empty() {
            return Ok(self.last_position());
        }
        let deferred = self.inner.deferred.lock().unwrap_or_else(|e| e.into_inner());
        if deferred.is_some() {
            // Inside a deferred batch its end waits for everything anyway.
            drop(deferred);
            return self.append(records);
        }
        // Queued with the writer, which group-commits it with whatever comes next; not
        // waited for. A failed write fails every later append, and the increment
        // batcher stops the process on that (see the module docs).
        // A request the log refuses at once (too large, log closed) is an error here as
        // in `append`: the caller rolls the changes back, and positions stay dense.
        let mut requests = self.requests(records);
        let now = std::time::Instant::now();
        let refused = if requests.len() == 1 {
            self.log.append_async(requests.remove(0)).wait_until(now).ok().and_then(Result::err)
        } else {
            self.log.append_batch_async(requests).wait_until(now).ok().and_then(Result::err)
        };
        if let Some(err) = refused {
            return Err(storage(err));
        }
        let count = records.len() as u64;
        Ok(self.inner.last_position.fetch_add(count, Ordering::AcqRel) + count)
    }

    fn sync(&mut self) -> Result<(), OpLogError> {
        self.log.flush().map_err(storage)
    }

    fn replay(
        &self,
        after_position: u64,
        visit: &mut dyn FnMut(u64, OpRecord) -> Result<(), CrdtError>,
    ) -> Result<(), CrdtError> {
        let head = self.log.head().position;
        let mut next = after_position + 1;
        while next <= head {
            let events = self
                .log
                .read_range(next, REPLAY_CHUNK_EVENTS)
                .map_err(|err| CrdtError::from(storage(err)))?;
            if events.is_empty() {
                // The head says there is more: never stop a replay short silently.
                return Err(OpLogError::Storage(format!(
                    "log head is {head} but nothing could be read at position {next}"
                ))
                .into());
            }
            for event in events {
                if event.position != next {
                    return Err(OpLogError::Corrupt { position: next }.into());
                }
                let record = OpRecord::decode(&event.payload)
                    .map_err(|_| OpLogError::Corrupt { position: event.position })?;
                visit(event.position, record)?;
                next += 1;
            }
        }
        Ok(())
    }

    fn truncate_through(&mut self, position: u64) -> Result<(), OpLogError> {
        self.log.compact(position + 1).map(|_| ()).map_err(storage)
    }

    fn last_position(&self) -> u64 {
        self.inner.last_position.load(Ordering::Acquire)
    }
}

enum PendingAppend {
    One(Pending<Appended>),
    Batch(Pending<Vec<Appended>>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crdt_sync::{DocId, Replica, ReplicaConfig};

    fn open(dir: &std::path::Path, incarnation: u64) -> EventOpLog {
        EventOpLog::new(EventLog::open(dir, event_log::Options::default()).unwrap(), incarnation)
    }

    #[test]
    fn event_ids_are_uuid_v7_and_unique_across_incarnations() {
        let id = uuid::Uuid::from_bytes(event_id(1_700_000_000_123, 5, 9));
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        let ts = id.get_timestamp().expect("v7 has a timestamp").to_unix();
        assert_eq!((ts.0, ts.1 / 1_000_000), (1_700_000_000, 123));
        let mut seen = std::collections::HashSet::new();
        for incarnation in [1, 2, 1 << 24, (1 << 36) - 1] {
            for sequence in [0, 1, (1 << ID_SEQUENCE_BITS) - 1] {
                assert!(seen.insert(event_id(1_700_000_000_123, incarnation, sequence)));
            }
        }
    }

    #[test]
    fn unsynced_appends_keep_positions_dense_and_refuse_what_the_log_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = open(dir.path(), 1);
        // A batch (layout in crdt-sync's batch.rs) of one opaque change of `bytes` bytes.
        let record = |bytes: usize| {
            let mut framed = vec![2u8];
            framed.extend_from_slice(&0u64.to_le_bytes());
            framed.extend_from_slice(&1u32.to_le_bytes());
            framed.extend_from_slice(&(bytes as u32).to_le_bytes());
            framed.extend(std::iter::repeat_n(7u8, bytes));
            let changes = crdt_sync::ChangeBatch::from_bytes(&framed).unwrap();
            OpRecord { doc: DocId::counter("production").unwrap(), changes }
        };
        assert_eq!(log.append_unsynced(&[record(10)]).unwrap(), 1);
        let too_large = record(event_log::DEFAULT_MAX_PAYLOAD_BYTES + 1);
        assert!(log.append_unsynced(std::slice::from_ref(&too_large)).is_err());
        assert_eq!(log.last_position(), 1, "a refused record takes no position");
        assert_eq!(log.append_unsynced(&[record(20), record(30)]).unwrap(), 3);
        log.sync().unwrap();
        let mut seen = Vec::new();
        log.replay(0, &mut |position, record| {
            seen.push((position, record.changes.as_bytes().len() - 17));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![(1, 10), (2, 20), (3, 30)]);
    }

    #[test]
    fn a_replica_recovers_from_the_event_log_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let doc = DocId::counter("production").unwrap();
        {
            let log = open(dir.path(), 1);
            let mut replica = Replica::new(ReplicaConfig::new("a", &["a"]), log.clone()).unwrap();
            replica.increment(&doc, "op-1", 5, 1).unwrap();
            log.begin_deferred();
            replica.increment(&doc, "op-2", 2, 2).unwrap();
            replica.increment(&doc, "op-3", -1, 3).unwrap();
            log.finish_deferred().unwrap();
            assert_eq!(log.last_position(), 3);
            log.event_log().close().unwrap();
        }
        let log = open(dir.path(), 2);
        assert_eq!(log.last_position(), 3);
        let config = ReplicaConfig { incarnation: 2, ..ReplicaConfig::new("a", &["a"]) };
        let mut replica = Replica::recover(config, log.clone(), None).unwrap();
        assert_eq!(replica.counter(&doc).unwrap().unwrap().value, 6);
        assert!(!replica.increment(&doc, "op-2", 2, 4).unwrap().applied);
        assert!(replica.increment(&doc, "op-4", 4, 4).unwrap().applied);
        assert_eq!(log.last_position(), 4);
        let mut seen = Vec::new();
        log.replay(2, &mut |position, record| {
            seen.push((position, record.doc.to_string()));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![(3, "counter:production".to_owned()), (4, "counter:production".to_owned())]
        );
    }
}
