//! [`EventLog`]: the public handle, opening and recovery, reads, verification and subscriptions.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::Instant;

use redb::{ReadableDatabase, ReadableTable};
use tracing::{info, warn};

use crate::completion::{self, Notifier, Pending};
use crate::error::{Error, Result, index, io};
use crate::index::{self, Checkpoint, IndexEntry};
use crate::options::{
    AppendRequest, Appended, CompactReport, Head, MAX_UNSYNCED_BYTES, Options, VerifyReport,
};
use crate::record::{
    Event, FLAG_BATCH_CONTINUES, GENESIS_HASH, Hash, SEGMENT_HEADER_BYTES, SegmentHeader,
};
use crate::segment::{
    CLEAN_MARKER_NAME, PREALLOC_NAME, RecordFault, SPARSE_EVERY_EVENTS, Segment, SegmentReader,
    SparseEntry, TEMP_SUFFIX, ZERO_CHUNK_BYTES, parse_segment_name,
};
use crate::vfs::{RedbBackend, StdVfs, Vfs, join};
use crate::writer::{Command, Writer, WriterInit};

/// Name of the redb index file inside the log directory.
pub const INDEX_FILE_NAME: &str = "index.redb";
/// What the open's scrub of the torn tail reads at a time (a multiple of `ZERO_CHUNK_BYTES`).
const SCRUB_READ_BYTES: usize = 256 * 1024;

/// Bytes after a torn tail that are zeroed on open: everything an unsynced window can have
/// touched (unsynced bytes, plus one group commit, plus one batch).
pub(crate) fn scrub_window_bytes(options: &Options) -> u64 {
    MAX_UNSYNCED_BYTES + (options.max_group_bytes + 2 * options.max_batch_bytes) as u64
}

/// The head as the writer publishes it.
#[derive(Debug)]
pub(crate) struct HeadState {
    pub position: u64,
    pub hash: Hash,
    pub first_position: u64,
    pub anchor_hash: Hash,
    pub log_bytes: u64,
    pub closed: bool,
    pub wakers: Vec<Waker>,
}

/// State shared by the handles, the writer and the readers.
#[derive(Debug)]
pub(crate) struct Shared {
    pub vfs: Arc<dyn Vfs>,
    pub dir: PathBuf,
    pub options: Options,
    pub segments: RwLock<Vec<Arc<Segment>>>,
    pub head: Mutex<HeadState>,
    pub head_changed: Condvar,
    pub db: redb::Database,
    /// Durable stream entries not yet written to redb: stream -> (version, position) in
    /// version order.
    pub unindexed: Mutex<HashMap<String, VecDeque<(u64, u64)>>>,
    /// Every event up to this position is in redb.
    pub indexed_position: AtomicU64,
    /// Every event up to this position is in a durable redb checkpoint: what an open after a
    /// crash starts its scan from.
    pub checkpointed_position: AtomicU64,
    /// Set when an index write failed (the writer then fails the log).
    pub index_error: Mutex<Option<String>>,
    /// Wakes the threads blocked on appends, once per group commit.
    pub append_notifier: Arc<Notifier>,
    pub stats: Counters,
    /// Held while the log is open (an exclusive lock on `LOCK`).
    _lock: Box<dyn std::any::Any + Send + Sync>,
}

/// Name of the lock file in the log directory.
pub const LOCK_FILE_NAME: &str = "LOCK";

/// Counters the writer keeps.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub group_commits: AtomicU64,
    pub events: AtomicU64,
    pub index_writes: AtomicU64,
    pub checkpoints: AtomicU64,
    pub tail_waits: AtomicU64,
    pub tail_events_at_open: AtomicU64,
    pub segments_zero_filled: AtomicU64,
    pub segments_reused: AtomicU64,
    pub segments_recycled: AtomicU64,
    pub dedup_chunks: AtomicU64,
    pub group_buffer_bytes: AtomicU64,
}

/// What the writer has done since the log was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Group commits (one `fdatasync` of the active segment each).
    pub group_commits: u64,
    /// Events made durable.
    pub events: u64,
    /// Non-durable index writes.
    pub index_writes: u64,
    /// Durable index checkpoints.
    pub checkpoints: u64,
    /// Times the writer waited for a durable checkpoint because the events past the last one
    /// reached 1.5 × `checkpoint_events` (see [`crate::Options::checkpoint_events`]).
    pub tail_waits: u64,
    /// Events past the index's durable checkpoint that the open scanned and kept (0 after a
    /// clean close; after a crash, bounded through `tail_waits`).
    pub tail_events_at_open: u64,
    /// Segments started in a file made by writing zeros.
    pub segments_zero_filled: u64,
    /// Segments started in a file that needed no zeros (a recycled segment, or one left from
    /// an earlier run).
    pub segments_reused: u64,
    /// Compacted segments kept as the next segment's file instead of being removed.
    pub segments_recycled: u64,
    /// Chunks of UUIDv7 ids the dedup index held after its last write (at most
    /// [`crate::DEDUP_WINDOW_MAX_CHUNKS`]).
    pub dedup_chunks: u64,
    /// Capacity the writer's group buffer kept after its last commit (at most
    /// [`crate::GROUP_BUFFER_RETAIN_BYTES`] or twice `max_group_bytes`, the larger).
    pub group_buffer_bytes: u64,
}

impl Shared {
    pub(crate) fn head_state(&self) -> MutexGuard<'_, HeadState> {
        self.head.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn segments(&self) -> Vec<Arc<Segment>> {
        self.segments.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn max_body_bytes(&self) -> usize {
        self.options.max_record_bytes()
    }

    pub(crate) fn head(&self) -> Head {
        let h = self.head_state();
        Head {
            position: h.position,
            hash: h.hash,
            first_position: h.first_position,
            anchor_hash: h.anchor_hash,
            log_bytes: h.log_bytes,
        }
    }

    /// Reads events `from..=to` (all durable), checking checksums and the position sequence.
    pub(crate) fn read_span(&self, from: u64, to: u64) -> Result<Vec<Event>> {
        let mut out = Vec::with_capacity((to + 1).saturating_sub(from).min(65_536) as usize);
        if from > to {
            return Ok(out);
        }
        let segments = self.segments();
        let Some(mut idx) = segments.iter().rposition(|s| s.header.first_position <= from) else {
            let first = segments.first().map_or(1, |s| s.header.first_position);
            return Err(Error::Compacted { position: from, first_position: first });
        };
        let mut start = segments[idx].sparse_floor(from);
        if from - start.position > SPARSE_EVERY_EVENTS {
            // Cold read: the index knows a closer record start.
            if let Some((position, locator)) = index::locate(&self.db, from)?
                && locator.segment_first == segments[idx].header.first_position
                && position > start.position
            {
                start =
                    SparseEntry { position, offset: locator.offset, prev_hash: locator.prev_hash };
                segments[idx].note(start);
            }
        }
        let mut position = start.position;
        let mut prev_hash = start.prev_hash;
        let mut offset = start.offset;
        let mut first_read = true;
        while position <= to {
            let segment = &segments[idx];
            let mut reader = SegmentReader::new(
                segment.file.as_ref(),
                offset,
                segment.len_bytes,
                self.max_body_bytes(),
            );
            loop {
                if position > to {
                    break;
                }
                let at = reader.offset();
                match reader.next_record(position).map_err(io("read segment"))? {
                    Ok(decoded) => {
                        let mut event = decoded.event;
                        event.prev_hash = prev_hash;
                        // Positions are not stored: the first record read from a remembered
                        // offset must continue the chain (later ones follow it by framing and CRC).
                        if first_read && event.compute_hash() != event.hash {
                            return Err(Error::Corrupt {
                                position,
                                reason: "record does not continue the chain".into(),
                            });
                        }
                        first_read = false;
                        segment.note(SparseEntry { position, offset: at, prev_hash });
                        prev_hash = event.hash;
                        position += 1;
                        if event.position >= from {
                            out.push(event);
                        }
                    }
                    Err(RecordFault::End) => break,
                    Err(RecordFault::Damaged(reason)) => {
                        return Err(Error::Corrupt { position, reason: reason.to_owned() });
                    }
                }
            }
            if position > to {
                break;
            }
            idx += 1;
            match segments.get(idx) {
                Some(next) if next.header.first_position == position => {
                    offset = SEGMENT_HEADER_BYTES as u64;
                    prev_hash = next.header.prev_hash;
                }
                _ => {
                    return Err(Error::Corrupt {
                        position,
                        reason: "segment ends before the head".into(),
                    });
                }
            }
        }
        Ok(out)
    }
}

/// The handle's inner part: dropping the last handle shuts the writer down.
#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    tx: SyncSender<Command>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let (done, pending) = completion::pair();
        if self.tx.send(Command::Shutdown { done }).is_ok() {
            let _ = pending.wait();
        }
        if let Some(handle) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = handle.join();
        }
    }
}

/// A durable, group-committed, hash-chained, multi-stream event log.
///
/// Cheap to clone; all clones share one writer thread. Appends return only once durable
/// (see [`crate::Durability`]). Reads, subscriptions and verification run on the caller's
/// thread and never see an event before it is durable.
#[derive(Debug, Clone)]
pub struct EventLog {
    inner: Arc<Inner>,
}

/// A tail subscription: every durable event from a position on, in order.
#[derive(Debug)]
pub struct Subscription {
    shared: Arc<Shared>,
    _log: EventLog,
    next_position: u64,
    buffer: std::collections::VecDeque<Event>,
}

/// Events fetched per subscription read.
const SUBSCRIPTION_CHUNK_EVENTS: u64 = 1024;

impl EventLog {
    /// Opens (or creates) the log in `dir` on the real file system.
    pub fn open(dir: impl AsRef<Path>, options: Options) -> Result<EventLog> {
        Self::open_with_vfs(Arc::new(StdVfs), dir, options)
    }

    /// Opens (or creates) the log in `dir` on the given file system (e.g. a simulated disk).
    ///
    /// Recovery: the index's last checkpoint says how far it covers the log; the records after
    /// it are checked (checksum, position, chain hash, batch completeness) and indexed; a torn
    /// or incomplete tail is cut and zeroed. If the index cannot be opened it is rebuilt from
    /// the segments.
    pub fn open_with_vfs(
        vfs: Arc<dyn Vfs>,
        dir: impl AsRef<Path>,
        options: Options,
    ) -> Result<EventLog> {
        options.validate()?;
        let started = Instant::now();
        let dir = dir.as_ref().to_path_buf();
        vfs.create_dir_all(&dir).map_err(io("create log directory"))?;
        let lock = lock_dir(vfs.as_ref(), &dir)?;
        let recovered = recover(vfs.as_ref(), &dir, &options)?;
        let (tx, rx) = mpsc::sync_channel(options.queue_depth);
        let Recovered {
            db,
            dedup_chunks,
            segments,
            head,
            unindexed,
            indexed_position,
            writer_init,
        } = recovered;
        let shared = Arc::new(Shared {
            vfs,
            dir,
            options,
            segments: RwLock::new(segments),
            head: Mutex::new(head),
            head_changed: Condvar::new(),
            db,
            unindexed: Mutex::new(unindexed),
            indexed_position: AtomicU64::new(indexed_position),
            checkpointed_position: AtomicU64::new(indexed_position),
            index_error: Mutex::new(None),
            append_notifier: Arc::new(Notifier::default()),
            stats: Counters {
                dedup_chunks: AtomicU64::new(dedup_chunks),
                tail_events_at_open: AtomicU64::new(writer_init.tail.len() as u64),
                ..Counters::default()
            },
            _lock: lock,
        });
        info!(
            dir = %shared.dir.display(),
            head = shared.head().position,
            tail_events = shared.stats.tail_events_at_open.load(Ordering::Relaxed),
            elapsed_us = started.elapsed().as_micros() as u64,
            "event log opened"
        );
        let writer = Writer::new(shared.clone(), rx, writer_init);
        let handle = std::thread::Builder::new()
            .name("event-log-writer".into())
            .spawn(move || writer.run())
            .map_err(io("spawn writer thread"))?;
        Ok(EventLog { inner: Arc::new(Inner { shared, tx, writer: Mutex::new(Some(handle)) }) })
    }

    fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    fn send(&self, command: Command) -> Result<()> {
        self.inner.tx.send(command).map_err(|_| Error::Closed)
    }

    /// Appends one event; returns once it is durable (per its durability class).
    pub fn append(&self, request: AppendRequest) -> Result<Appended> {
        self.append_async(request).wait()
    }

    /// Appends one event; the returned [`Pending`] is a future (no runtime needed) that
    /// resolves once the event is durable, or can be waited on with [`Pending::wait`].
    /// Blocks briefly only when the writer's queue is full.
    pub fn append_async(&self, request: AppendRequest) -> Pending<Appended> {
        let (done, pending) = completion::pair_with(&self.shared().append_notifier);
        let len_bytes = match self.shared().options.check_request(&request) {
            Ok(len) => len,
            Err(e) => return completion::ready(Err(e)),
        };
        let command = Command::Append { request, len_bytes, done };
        if let Err(mpsc::SendError(Command::Append { done, .. })) = self.inner.tx.send(command) {
            done.complete(Err(Error::Closed));
        }
        pending
    }

    /// Appends a batch atomically: all events or none become visible, in order, at
    /// consecutive positions. Events already in the log (by id) return their original result;
    /// the others are appended. Durable per the strongest durability in the batch.
    pub fn append_batch(&self, requests: Vec<AppendRequest>) -> Result<Vec<Appended>> {
        self.append_batch_async(requests).wait()
    }

    /// [`EventLog::append_batch`] as a future.
    pub fn append_batch_async(&self, requests: Vec<AppendRequest>) -> Pending<Vec<Appended>> {
        let (done, pending) = completion::pair_with(&self.shared().append_notifier);
        let len_bytes = match self.shared().options.check_batch(&requests) {
            Ok(len) => len,
            Err(e) => return completion::ready(Err(e)),
        };
        let command = Command::Batch { requests, len_bytes, done };
        if let Err(mpsc::SendError(Command::Batch { done, .. })) = self.inner.tx.send(command) {
            done.complete(Err(Error::Closed));
        }
        pending
    }

    /// Makes every `Within` append written so far durable now.
    pub fn flush(&self) -> Result<()> {
        let (done, pending) = completion::pair();
        self.send(Command::Flush { done })?;
        pending.wait()
    }

    /// Writes the index durably with a checkpoint at the head (normally done periodically).
    pub fn checkpoint(&self) -> Result<()> {
        let (done, pending) = completion::pair();
        self.send(Command::Checkpoint { done })?;
        pending.wait()
    }

    /// Deletes whole segments whose events are all below `below`, keeping the anchor (the
    /// position before the first kept event and its hash) in the next segment's header.
    /// Never removes the active segment.
    pub fn compact(&self, below: u64) -> Result<CompactReport> {
        let (done, pending) = completion::pair();
        self.send(Command::Compact { below, done })?;
        pending.wait()
    }

    /// Stops the writer after syncing and checkpointing. Later calls on any clone fail with
    /// [`Error::Closed`]. Also done when the last clone is dropped.
    pub fn close(&self) -> Result<()> {
        let (done, pending) = completion::pair();
        self.send(Command::Shutdown { done })?;
        let result = pending.wait();
        if let Some(handle) = self.inner.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = handle.join();
        }
        result
    }

    /// Counters of the writer's work since open.
    pub fn stats(&self) -> Stats {
        let c = &self.shared().stats;
        Stats {
            group_commits: c.group_commits.load(Ordering::Relaxed),
            events: c.events.load(Ordering::Relaxed),
            index_writes: c.index_writes.load(Ordering::Relaxed),
            checkpoints: c.checkpoints.load(Ordering::Relaxed),
            tail_waits: c.tail_waits.load(Ordering::Relaxed),
            tail_events_at_open: c.tail_events_at_open.load(Ordering::Relaxed),
            segments_zero_filled: c.segments_zero_filled.load(Ordering::Relaxed),
            segments_reused: c.segments_reused.load(Ordering::Relaxed),
            segments_recycled: c.segments_recycled.load(Ordering::Relaxed),
            dedup_chunks: c.dedup_chunks.load(Ordering::Relaxed),
            group_buffer_bytes: c.group_buffer_bytes.load(Ordering::Relaxed),
        }
    }

    /// The durable head, the compaction floor and the log size.
    pub fn head(&self) -> Head {
        self.shared().head()
    }

    /// Up to `max_count` durable events from position `from` on.
    pub fn read_range(&self, from: u64, max_count: usize) -> Result<Vec<Event>> {
        let shared = self.shared();
        let head = shared.head();
        let from = from.max(1);
        if from < head.first_position {
            return Err(Error::Compacted { position: from, first_position: head.first_position });
        }
        let to = head.position.min(from.saturating_add(max_count as u64).saturating_sub(1));
        shared.read_span(from, to)
    }

    /// One durable event, if stored.
    pub fn read(&self, position: u64) -> Result<Option<Event>> {
        Ok(self.read_range(position, 1)?.into_iter().next())
    }

    /// The current (durable) version of a stream (0 if it has no events).
    pub fn stream_version(&self, stream: &str) -> Result<u64> {
        let shared = self.shared();
        let unindexed = {
            let map = shared.unindexed.lock().unwrap_or_else(|e| e.into_inner());
            map.get(stream).and_then(|q| q.back()).map(|(v, _)| *v)
        };
        let txn = shared.db.begin_read().map_err(index("begin read"))?;
        let table = txn.open_table(index::STREAMS).map_err(index("open streams"))?;
        let indexed = table.get(stream).map_err(index("get stream"))?.map(|v| v.value());
        Ok(unindexed.unwrap_or(0).max(indexed.unwrap_or(0)))
    }

    /// Up to `max_count` events of `stream` with versions from `from_version` on, skipping
    /// compacted ones.
    pub fn read_stream(
        &self,
        stream: &str,
        from_version: u64,
        max_count: usize,
    ) -> Result<Vec<Event>> {
        let shared = self.shared();
        let mut positions: BTreeMap<u64, u64> = BTreeMap::new();
        {
            let map = shared.unindexed.lock().unwrap_or_else(|e| e.into_inner());
            for (v, p) in map.get(stream).into_iter().flatten().filter(|(v, _)| *v >= from_version)
            {
                positions.insert(*v, *p);
            }
        }
        for (version, position) in
            index::stream_positions(&shared.db, stream, from_version, max_count)?
        {
            positions.insert(version, position);
        }
        let first = shared.head().first_position;
        let mut out = Vec::new();
        for (_, position) in positions.into_iter().filter(|(_, p)| *p >= first).take(max_count) {
            match shared.read_span(position, position) {
                Ok(mut events) => out.append(&mut events),
                Err(Error::Compacted { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Subscribes to every durable event from `from_position` on (tail subscription).
    pub fn subscribe(&self, from_position: u64) -> Subscription {
        Subscription {
            shared: self.inner.shared.clone(),
            _log: self.clone(),
            next_position: from_position.max(1),
            buffer: Default::default(),
        }
    }

    /// Walks the chain from the compaction anchor to the durable head, checking every record's
    /// checksum, position and hash; reports the first bad position.
    pub fn verify(&self) -> Result<VerifyReport> {
        verify(self.shared())
    }

    /// Stores an outbox cursor (in the index; durable at the next checkpoint, so after a crash
    /// a cursor may step back, never forward).
    pub fn set_cursor(&self, name: &str, position: u64) -> Result<()> {
        let mut txn = self.shared().db.begin_write().map_err(index("begin write"))?;
        txn.set_durability(redb::Durability::None).map_err(index("set durability"))?;
        {
            let mut table = txn.open_table(index::CURSORS).map_err(index("open cursors"))?;
            table.insert(name, position).map_err(index("insert cursor"))?;
        }
        txn.commit().map_err(index("commit"))
    }

    /// A stored outbox cursor.
    pub fn cursor(&self, name: &str) -> Result<Option<u64>> {
        let txn = self.shared().db.begin_read().map_err(index("begin read"))?;
        let table = txn.open_table(index::CURSORS).map_err(index("open cursors"))?;
        Ok(table.get(name).map_err(index("get cursor"))?.map(|v| v.value()))
    }

    /// The directory of the log.
    pub fn dir(&self) -> &Path {
        &self.shared().dir
    }

    /// The file system the log runs on.
    pub fn vfs(&self) -> Arc<dyn Vfs> {
        self.shared().vfs.clone()
    }

    /// Paths of the segment files in use, oldest first.
    pub fn segment_paths(&self) -> Vec<PathBuf> {
        self.shared().segments().iter().map(|s| s.path.clone()).collect()
    }

    /// Where the record of `position` starts: (segment file, byte offset). For tests and tools.
    pub fn locate(&self, position: u64) -> Result<(PathBuf, u64)> {
        let shared = self.shared();
        shared.read_span(position, position)?;
        let segments = shared.segments();
        let seg = segments
            .iter()
            .rev()
            .find(|s| s.header.first_position <= position)
            .ok_or(Error::Compacted { position, first_position: 0 })?;
        let entry = seg.sparse_floor(position);
        let mut reader = SegmentReader::new(
            seg.file.as_ref(),
            entry.offset,
            seg.len_bytes,
            shared.max_body_bytes(),
        );
        for p in entry.position..position {
            reader
                .next_view()
                .map_err(io("read segment"))?
                .map_err(|_| Error::Corrupt { position: p, reason: "unreadable".into() })?;
        }
        Ok((seg.path.clone(), reader.offset()))
    }
}

impl Subscription {
    fn fill(&mut self) -> Result<bool> {
        if !self.buffer.is_empty() {
            return Ok(true);
        }
        let head = self.shared.head();
        if self.next_position < head.first_position {
            return Err(Error::Compacted {
                position: self.next_position,
                first_position: head.first_position,
            });
        }
        if self.next_position > head.position {
            return Ok(false);
        }
        let to = head.position.min(self.next_position + SUBSCRIPTION_CHUNK_EVENTS - 1);
        let events = self.shared.read_span(self.next_position, to)?;
        self.next_position = to + 1;
        self.buffer.extend(events);
        Ok(true)
    }

    /// The next event if one is already durable.
    pub fn try_next(&mut self) -> Result<Option<Event>> {
        self.fill()?;
        Ok(self.buffer.pop_front())
    }

    /// Blocks until the next event is durable, the log closes (`Err(Closed)`), or `deadline`
    /// passes (`Ok(None)`).
    pub fn next_blocking(&mut self, deadline: Option<Instant>) -> Result<Option<Event>> {
        loop {
            if self.fill()? {
                return Ok(self.buffer.pop_front());
            }
            let mut head = self.shared.head_state();
            while head.position < self.next_position {
                if head.closed {
                    return Err(Error::Closed);
                }
                match deadline {
                    None => {
                        head =
                            self.shared.head_changed.wait(head).unwrap_or_else(|e| e.into_inner())
                    }
                    Some(deadline) => {
                        let now = Instant::now();
                        if now >= deadline {
                            return Ok(None);
                        }
                        head = self
                            .shared
                            .head_changed
                            .wait_timeout(head, deadline - now)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                }
            }
        }
    }

    /// The next event, as a future.
    pub fn next_async(&mut self) -> impl Future<Output = Result<Event>> + '_ {
        NextEvent { subscription: self }
    }

    /// The position of the next event this subscription will deliver.
    pub fn position(&self) -> u64 {
        self.buffer.front().map_or(self.next_position, |e| e.position)
    }
}

struct NextEvent<'a> {
    subscription: &'a mut Subscription,
}

impl Future for NextEvent<'_> {
    type Output = Result<Event>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Event>> {
        let sub = &mut *self.subscription;
        match sub.fill() {
            Err(e) => return Poll::Ready(Err(e)),
            Ok(true) => return Poll::Ready(Ok(sub.buffer.pop_front().expect("filled"))),
            Ok(false) => {}
        }
        let mut head = sub.shared.head_state();
        if head.closed {
            return Poll::Ready(Err(Error::Closed));
        }
        if head.position >= sub.next_position {
            cx.waker().wake_by_ref();
        } else {
            head.wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

fn verify(shared: &Shared) -> Result<VerifyReport> {
    let head = shared.head();
    let segments = shared.segments();
    let mut report = VerifyReport {
        anchor_position: head.first_position - 1,
        last_position: head.first_position - 1,
        events_checked: 0,
        first_bad: None,
    };
    let mut position = head.first_position;
    let mut prev_hash = head.anchor_hash;
    let bad = |report: &mut VerifyReport, position: u64, reason: String| {
        report.first_bad = Some((position, reason));
    };
    for segment in &segments {
        if position > head.position {
            break;
        }
        if segment.header.first_position != position || segment.header.prev_hash != prev_hash {
            bad(&mut report, position, "segment header does not continue the chain".into());
            return Ok(report);
        }
        let mut reader = SegmentReader::new(
            segment.file.as_ref(),
            SEGMENT_HEADER_BYTES as u64,
            segment.len_bytes,
            shared.max_body_bytes(),
        );
        while position <= head.position {
            match reader.next_record(position).map_err(io("read segment"))? {
                Ok(decoded) => {
                    let mut event = decoded.event;
                    event.prev_hash = prev_hash;
                    if event.compute_hash() != event.hash {
                        bad(&mut report, position, "hash mismatch".into());
                        return Ok(report);
                    }
                    prev_hash = event.hash;
                    report.last_position = position;
                    report.events_checked += 1;
                    position += 1;
                }
                Err(RecordFault::End) => break,
                Err(RecordFault::Damaged(reason)) => {
                    bad(&mut report, position, reason.to_owned());
                    return Ok(report);
                }
            }
        }
    }
    if position <= head.position {
        bad(&mut report, position, "log ends before the head".into());
    } else if prev_hash != head.hash {
        bad(&mut report, head.position, "head hash mismatch".into());
    }
    Ok(report)
}

/// Longest wait for the directory lock (a previous owner may still be exiting).
pub const LOCK_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(5);
/// Pause between attempts to take the lock (`flock` has no timed wait).
const LOCK_RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

fn lock_dir(vfs: &dyn Vfs, dir: &Path) -> Result<Box<dyn std::any::Any + Send + Sync>> {
    let deadline = Instant::now() + LOCK_WAIT_MAX;
    loop {
        match vfs.lock(&join(dir, LOCK_FILE_NAME)) {
            Ok(guard) => return Ok(guard),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(Error::Locked);
                }
                std::thread::sleep(LOCK_RETRY_INTERVAL);
            }
            Err(e) => return Err(Error::Io { op: "lock log directory", source: e }),
        }
    }
}

/// What recovery hands to the handle and the writer.
struct Recovered {
    db: redb::Database,
    /// Chunks of the dedup index (for [`Stats::dedup_chunks`]).
    dedup_chunks: u64,
    segments: Vec<Arc<Segment>>,
    head: HeadState,
    /// The tail's stream versions and positions, for reads until the index holds them.
    unindexed: HashMap<String, VecDeque<(u64, u64)>>,
    /// The position the index covers (the checkpoint found on open).
    indexed_position: u64,
    writer_init: WriterInit,
}

/// redb's page cache for the index. redb's default (1 GiB) let the cache, and so the
/// process's memory, grow with the index file; the hot keys are time-ordered, so a few MiB
/// hold what appends and recent reads touch.
pub const INDEX_CACHE_BYTES: usize = 8 << 20;

pub(crate) fn open_index(vfs: &dyn Vfs, dir: &Path) -> Result<redb::Database> {
    let path = join(dir, INDEX_FILE_NAME);
    let open = |path: &Path| -> Result<redb::Database> {
        let file = vfs.open(path, true).map_err(io("open index file"))?;
        let db = redb::Database::builder()
            .set_cache_size(INDEX_CACHE_BYTES)
            .create_with_backend(RedbBackend::new(file))
            .map_err(index("open"))?;
        index::init(&db)?;
        Ok(db)
    };
    match open(&path) {
        Ok(db) => Ok(db),
        Err(e) => {
            // The index is derived data: rebuild it from the segments.
            warn!(error = %e, "index unusable, rebuilding it from the log");
            vfs.remove(&path).map_err(io("remove index file"))?;
            vfs.sync_dir(dir).map_err(io("sync log directory"))?;
            open(&path)
        }
    }
}

fn recover(vfs: &dyn Vfs, dir: &Path, options: &Options) -> Result<Recovered> {
    let max_body = options.max_record_bytes();
    // Segments and leftovers.
    let mut firsts = Vec::new();
    let mut removed_any = false;
    let mut clean = false;
    for name in vfs.list(dir).map_err(io("list log directory"))? {
        if name == CLEAN_MARKER_NAME {
            // Durably forget the clean close before anything can be written again.
            vfs.remove(&join(dir, &name)).map_err(io("remove clean marker"))?;
            removed_any = true;
            clean = true;
        } else if let Some(first) = parse_segment_name(&name) {
            firsts.push(first);
        } else if name.ends_with(TEMP_SUFFIX) && name != PREALLOC_NAME {
            vfs.remove(&join(dir, &name)).map_err(io("remove temporary file"))?;
            removed_any = true;
        }
    }
    if removed_any {
        vfs.sync_dir(dir).map_err(io("sync log directory"))?;
    }
    firsts.sort_unstable();
    let mut segments = Vec::new();
    for first in firsts {
        let path = join(dir, &crate::segment::segment_name(first));
        let file = vfs.open(&path, false).map_err(io("open segment"))?;
        let len_bytes = file.len().map_err(io("stat segment"))?;
        let mut header = [0u8; SEGMENT_HEADER_BYTES];
        file.read_exact_at(&mut header, 0).map_err(io("read segment header"))?;
        let header = SegmentHeader::decode(&header)
            .filter(|h| h.first_position == first)
            .ok_or_else(|| Error::Corrupt {
                position: first,
                reason: format!("bad header in {}", path.display()),
            })?;
        segments.push(Arc::new(Segment::new(header, path, file, len_bytes)));
    }
    let db = open_index(vfs, dir)?;

    // Where to start checking: the checkpoint if it points into a kept segment.
    let checkpoint = index::read_checkpoint(&db)?;
    let (mut seg_idx, mut offset, mut position, mut hash) = match (checkpoint, segments.first()) {
        (_, None) => (0, SEGMENT_HEADER_BYTES as u64, 0, GENESIS_HASH),
        (Some(cp), Some(_)) => {
            match segments.iter().position(|s| s.header.first_position == cp.segment_first) {
                Some(i) if cp.next_offset <= segments[i].len_bytes => {
                    (i, cp.next_offset, cp.position, cp.hash)
                }
                _ => {
                    let s = &segments[0];
                    (
                        0,
                        SEGMENT_HEADER_BYTES as u64,
                        s.header.first_position - 1,
                        s.header.prev_hash,
                    )
                }
            }
        }
        (None, Some(s)) => {
            (0, SEGMENT_HEADER_BYTES as u64, s.header.first_position - 1, s.header.prev_hash)
        }
    };
    let checkpoint_position = position;
    let indexed = Checkpoint {
        position,
        hash,
        segment_first: segments.get(seg_idx).map_or(0, |s| s.header.first_position),
        next_offset: offset,
    };

    // Scan the tail; keep only whole batches.
    let mut entries: Vec<IndexEntry> = Vec::new();
    let mut hashes: Vec<Hash> = Vec::new();
    let mut complete = (seg_idx, offset, position, hash, 0usize);
    let mut damaged_at: Option<(u64, &'static str)> = None;
    // Record starts for the segments' sparse indexes, so reads of the tail start near their
    // record rather than at the checkpoint (kept once the cut is known).
    let mut sparse: Vec<(usize, SparseEntry)> = Vec::new();
    while seg_idx < segments.len() {
        let segment = &segments[seg_idx];
        let mut reader =
            SegmentReader::new(segment.file.as_ref(), offset, segment.len_bytes, max_body);
        loop {
            let at = reader.offset();
            match reader.next_view().map_err(io("read segment"))? {
                Ok((view, next_offset)) => {
                    let next = position + 1;
                    if view.expected_hash(&hash, next) != view.hash {
                        damaged_at = Some((next, "record does not continue the chain"));
                        break;
                    }
                    let locator = next.is_multiple_of(index::OFFSET_INDEX_EVERY_EVENTS).then_some(
                        index::Locator {
                            segment_first: segment.header.first_position,
                            offset: at,
                            prev_hash: hash,
                        },
                    );
                    if (next - segment.header.first_position).is_multiple_of(SPARSE_EVERY_EVENTS) {
                        sparse.push((
                            seg_idx,
                            SparseEntry { position: next, offset: at, prev_hash: hash },
                        ));
                    }
                    position = next;
                    hash = view.hash;
                    offset = next_offset;
                    entries.push(IndexEntry {
                        position,
                        stream: view.stream.to_owned(),
                        stream_version: view.stream_version,
                        event_id: view.event_id,
                        locator,
                    });
                    hashes.push(hash);
                    if view.flags & FLAG_BATCH_CONTINUES == 0 {
                        complete = (seg_idx, offset, position, hash, entries.len());
                    }
                }
                Err(RecordFault::End) => break,
                Err(RecordFault::Damaged(reason)) => {
                    damaged_at = Some((position + 1, reason));
                    break;
                }
            }
        }
        if damaged_at.is_some() {
            break;
        }
        match segments.get(seg_idx + 1) {
            Some(next) if next.header.first_position == position + 1 => {
                seg_idx += 1;
                offset = SEGMENT_HEADER_BYTES as u64;
                if next.header.prev_hash != hash {
                    return Err(Error::Corrupt {
                        position: position + 1,
                        reason: "segment header does not continue the chain".into(),
                    });
                }
            }
            _ => break,
        }
    }
    let (cut_idx, cut_offset, head_position, head_hash, keep) = complete;
    entries.truncate(keep);
    hashes.truncate(keep);
    for (i, entry) in sparse {
        if entry.position <= head_position {
            segments[i].note(entry);
        }
    }
    if let Some((at, reason)) = damaged_at {
        if at <= checkpoint_position {
            return Err(Error::Corrupt { position: at, reason: reason.to_owned() });
        }
        warn!(position = at, reason, "torn tail found; cutting the log there");
    }

    // Cut: zero what lies after the last whole batch, drop later segments.
    if !segments.is_empty() {
        let mut removed = false;
        for later in segments.drain(cut_idx + 1..) {
            warn!(path = %later.path.display(), "removing segment after the torn tail");
            vfs.remove(&later.path).map_err(io("remove segment"))?;
            removed = true;
        }
        if removed {
            vfs.sync_dir(dir).map_err(io("sync log directory"))?;
        }
        let active = &segments[cut_idx];
        let end = (cut_offset + scrub_window_bytes(options)).min(active.len_bytes);
        // After a clean close with nothing past the checkpoint, the tail is known to be zeros.
        let known_clean = clean && damaged_at.is_none() && head_position == checkpoint_position;
        if end > cut_offset && !known_clean {
            // Read in pieces through one buffer (one large buffer costs a page fault per page).
            let mut buf = vec![0u8; SCRUB_READ_BYTES.min((end - cut_offset) as usize)];
            // Zero only the pages that hold anything (page-sized writes; see ZERO_CHUNK_BYTES).
            let zeros = [0u8; ZERO_CHUNK_BYTES];
            let mut zeroed = false;
            let mut at = cut_offset;
            while at < end {
                let piece = &mut buf[..SCRUB_READ_BYTES.min((end - at) as usize)];
                active.file.read_exact_at(piece, at).map_err(io("read tail"))?;
                for (i, chunk) in piece.chunks(ZERO_CHUNK_BYTES).enumerate() {
                    if chunk.iter().any(|&b| b != 0) {
                        active
                            .file
                            .write_all_at(&zeros[..chunk.len()], at + (i * ZERO_CHUNK_BYTES) as u64)
                            .map_err(io("zero torn tail"))?;
                        zeroed = true;
                    }
                }
                at += piece.len() as u64;
            }
            if zeroed {
                active.file.sync_data().map_err(io("sync segment"))?;
            }
        }
    }

    // The durable head (what the writer continues from).
    let first_position = segments.first().map_or(1, |s| s.header.first_position);
    let anchor_hash = segments.first().map_or(GENESIS_HASH, |s| s.header.prev_hash);
    let active_first = segments.get(cut_idx).map_or(head_position + 1, |s| s.header.first_position);
    let checkpoint = Checkpoint {
        position: head_position,
        hash: head_hash,
        segment_first: active_first,
        next_offset: cut_offset,
    };
    // The tail goes to the index thread with the writer's first flush, off the open path:
    // until then reads find it in `unindexed` and the dedup check in the writer's recent ids.
    // The index's checkpoint stays where it was until that write is durable; a crash before
    // it only means the same tail is scanned again.
    let mut streams = HashMap::new();
    let max_id_key;
    let dedup_chunks;
    {
        let ids = index::IdIndex::open(&db)?;
        let last = ids.max_key()?;
        dedup_chunks = ids.chunk_count()?;
        let txn = db.begin_read().map_err(index("begin read"))?;
        // Pruned ids are gone from the index, so also count what the tail scan saw.
        max_id_key = last
            .into_iter()
            .chain(entries.iter().map(|e| index::id_key(&e.event_id)))
            .max()
            .unwrap_or(0);
        let table = txn.open_table(index::STREAMS).map_err(index("open streams"))?;
        for item in table.iter().map_err(index("list streams"))? {
            let (k, v) = item.map_err(index("read stream"))?;
            streams.insert(k.value().to_owned(), v.value());
        }
    }
    let mut unindexed: HashMap<String, VecDeque<(u64, u64)>> = HashMap::new();
    // Looked up before inserting: a stream name is cloned once, not once per event.
    for entry in &entries {
        match streams.get_mut(entry.stream.as_str()) {
            Some(version) => *version = (*version).max(entry.stream_version),
            None => {
                streams.insert(entry.stream.clone(), entry.stream_version);
            }
        }
        let item = (entry.stream_version, entry.position);
        match unindexed.get_mut(entry.stream.as_str()) {
            Some(queue) => queue.push_back(item),
            None => {
                unindexed.insert(entry.stream.clone(), VecDeque::from([item]));
            }
        }
    }
    let log_bytes = segments
        .iter()
        .enumerate()
        .map(|(i, s)| if i == cut_idx { cut_offset } else { s.len_bytes })
        .sum();
    let head = HeadState {
        position: head_position,
        hash: head_hash,
        first_position,
        anchor_hash,
        log_bytes,
        closed: false,
        wakers: Vec::new(),
    };
    let active = segments.get(cut_idx).cloned();
    let indexed_position = if entries.is_empty() { head_position } else { checkpoint_position };
    Ok(Recovered {
        db,
        dedup_chunks,
        head,
        unindexed,
        indexed_position,
        writer_init: WriterInit {
            active,
            write_offset: cut_offset,
            position: head_position,
            hash: head_hash,
            streams,
            indexed: if entries.is_empty() { checkpoint } else { indexed },
            checkpoint,
            sealed_bytes: log_bytes - if segments.is_empty() { 0 } else { cut_offset },
            max_id_key,
            tail: entries,
            tail_hashes: hashes,
        },
        segments,
    })
}
