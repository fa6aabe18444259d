//! The single writer: drains queued appends into one write and one `fdatasync` (group commit),
//! then completes every waiter; keeps the redb index and its checkpoints off the ack path.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::collections::hash_map::Entry;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{error, warn};

use crate::completion::Completer;
use crate::error::{Error, Result, io};
use crate::index::{self, Checkpoint, IndexEntry, Locator};
use crate::log::Shared;
use crate::options::{
    AppendRequest, Appended, CompactReport, DEDUP_WINDOW_MAX_CHUNKS, Durability,
    GROUP_BUFFER_RETAIN_BYTES, MAX_UNSYNCED_BYTES,
};
use crate::record::{
    self, END_MARKER_BYTES, FLAG_BATCH_CONTINUES, GENESIS_HASH, Hash, SEGMENT_HEADER_BYTES,
    SegmentHeader,
};
use crate::segment::{
    CLEAN_MARKER_NAME, PREALLOC_NAME, Segment, TEMP_SUFFIX, ZERO_CHUNK_BYTES, segment_name,
};
use crate::vfs::{Vfs, VfsFile, join};

/// What the handles ask of the writer.
#[derive(Debug)]
pub(crate) enum Command {
    Append { request: AppendRequest, len_bytes: usize, done: Completer<Appended> },
    Batch { requests: Vec<AppendRequest>, len_bytes: usize, done: Completer<Vec<Appended>> },
    Flush { done: Completer<()> },
    Checkpoint { done: Completer<()> },
    Compact { below: u64, done: Completer<CompactReport> },
    Shutdown { done: Completer<()> },
}

/// The writer's starting state, from recovery.
#[derive(Debug)]
pub(crate) struct WriterInit {
    pub active: Option<Arc<Segment>>,
    pub write_offset: u64,
    pub position: u64,
    pub hash: Hash,
    pub streams: HashMap<String, u64>,
    /// The durable head.
    pub checkpoint: Checkpoint,
    /// What the index covers (the durable head when `tail` is empty).
    pub indexed: Checkpoint,
    pub sealed_bytes: u64,
    /// The largest event id key in the log (an id above it cannot be a duplicate).
    pub max_id_key: u128,
    /// The durable events past `indexed`: indexed by the first flush.
    pub tail: Vec<IndexEntry>,
    /// The hash of each event of `tail`.
    pub tail_hashes: Vec<Hash>,
}

#[derive(Debug)]
enum Waiter {
    One(Completer<Appended>, Appended),
    Many(Completer<Vec<Appended>>, Vec<Appended>),
}

impl Waiter {
    /// Fills the waiter's result; its thread wakes at the next [`Writer::wake_waiters`].
    fn complete(self) {
        match self {
            Waiter::One(done, result) => done.complete_deferred(Ok(result)),
            Waiter::Many(done, result) => done.complete_deferred(Ok(result)),
        }
    }
    /// Fails the waiter; its thread wakes at the next [`Writer::wake_waiters`].
    fn fail(self, error: &Error) {
        match self {
            Waiter::One(done, _) => done.complete_deferred(Err(error.duplicate())),
            Waiter::Many(done, _) => done.complete_deferred(Err(error.duplicate())),
        }
    }
}

/// A record staged in the group buffer.
#[derive(Debug)]
struct Span {
    start: usize,
    end: usize,
    position: u64,
    prev_hash: Hash,
}

/// The file that becomes the next segment: zero-filled, or a recycled compacted segment.
#[derive(Debug)]
struct Prealloc {
    path: PathBuf,
    file: Arc<dyn VfsFile>,
    /// Whether zeros were written to make it (a new file, not a reused one).
    zero_filled: bool,
}

#[derive(Debug)]
pub(crate) struct Writer {
    shared: Arc<Shared>,
    rx: Receiver<Command>,
    active: Option<Arc<Segment>>,
    write_offset: u64,
    sealed_bytes: u64,
    /// Last written position and hash (maybe not yet synced).
    position: u64,
    hash: Hash,
    streams: HashMap<String, u64>,
    /// Ids written but not yet in redb, and the same in position order for pruning.
    recent_ids: HashMap<[u8; 16], Appended>,
    recent_order: VecDeque<([u8; 16], u64)>,
    /// Largest id key the index can hold: the largest at open, raised as ids leave
    /// `recent_ids` for the index. An id above it that is not in `recent_ids` is new without an
    /// index read (time-ordered UUIDv7 ids mostly are, even from many interleaved writers).
    max_id_key: u128,
    /// The hashes of the recovered tail (`pending_index` at open), until [`Writer::run`] puts
    /// the tail's ids in `recent_ids`: on the writer's thread, beside the caller's recovery.
    recovered_hashes: Vec<Hash>,
    /// The dedup index, read once per group.
    id_index: Option<index::IdIndex>,
    index_tx: Option<SyncSender<IndexJob>>,
    index_thread: Option<JoinHandle<()>>,
    /// Written, not yet synced.
    unsynced: Vec<IndexEntry>,
    unsynced_bytes: u64,
    waiters: Vec<Waiter>,
    /// Appends were completed (deferred) and their threads are not woken yet.
    wake_pending: bool,
    /// Appends the last sync acknowledged, and when: the next group waits briefly for as many.
    released_appends: usize,
    released_at: Instant,
    sync_deadline: Option<Instant>,
    /// Durable, not yet in redb.
    pending_index: Vec<IndexEntry>,
    durable: Checkpoint,
    indexed: Checkpoint,
    last_index_write: Instant,
    last_checkpoint: Instant,
    events_since_checkpoint: u64,
    prune_streams_below: Option<u64>,
    prealloc: Option<JoinHandle<std::io::Result<Prealloc>>>,
    /// A compacted segment renamed to [`PREALLOC_NAME`], ready to become the next segment.
    spare: Option<Prealloc>,
    last_timestamp_ms: u64,
    failed: Option<Error>,
    // Group scratch.
    buf: Vec<u8>,
    spans: Vec<Span>,
    group_immediate: bool,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Makes (or reuses) the file of the next segment. A leftover of full length from an earlier
/// run (zero-filled, or a recycled segment, maybe with a header already written) is as good as
/// a new one: the roll writes the header and an end marker before any record.
fn preallocate(vfs: &dyn Vfs, path: PathBuf, len_bytes: u64) -> std::io::Result<Prealloc> {
    if vfs.exists(&path)? {
        let file = vfs.open(&path, false)?;
        if file.len()? == len_bytes {
            file.sync_data()?;
            return Ok(Prealloc { path, file, zero_filled: false });
        }
    }
    let file = vfs.open(&path, true)?;
    file.set_len(0)?;
    let zeros = [0u8; ZERO_CHUNK_BYTES];
    let mut at = 0u64;
    while at < len_bytes {
        let n = (len_bytes - at).min(ZERO_CHUNK_BYTES as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    file.sync_data()?;
    Ok(Prealloc { path, file, zero_filled: true })
}

impl Writer {
    pub(crate) fn new(shared: Arc<Shared>, rx: Receiver<Command>, init: WriterInit) -> Self {
        let now = Instant::now();
        let (index_tx, index_rx) = mpsc::sync_channel(INDEX_QUEUE_JOBS);
        let index_shared = shared.clone();
        let index_thread = std::thread::Builder::new()
            .name("event-log-index".into())
            .spawn(move || run_indexer(index_shared, index_rx))
            .ok();
        let pending_index = init.tail;
        // A recovered tail goes into a durable checkpoint at once (off the open path), as the
        // open itself used to write it: after a crash redb reopens fast only from a durable
        // commit (one that saved its allocator state), not from later non-durable ones.
        let events_since_checkpoint = if pending_index.is_empty() {
            0
        } else {
            shared.options.checkpoint_events.max(pending_index.len() as u64)
        };
        Self {
            shared,
            rx,
            active: init.active,
            write_offset: init.write_offset,
            sealed_bytes: init.sealed_bytes,
            position: init.position,
            hash: init.hash,
            streams: init.streams,
            recent_ids: HashMap::new(),
            recent_order: VecDeque::new(),
            recovered_hashes: init.tail_hashes,
            max_id_key: init.max_id_key,
            id_index: None,
            index_tx: Some(index_tx),
            index_thread,
            unsynced: Vec::new(),
            unsynced_bytes: 0,
            waiters: Vec::new(),
            wake_pending: false,
            released_appends: 0,
            released_at: now,
            sync_deadline: None,
            pending_index,
            durable: init.checkpoint,
            indexed: init.indexed,
            last_index_write: now,
            last_checkpoint: now,
            events_since_checkpoint,
            prune_streams_below: None,
            prealloc: None,
            spare: None,
            last_timestamp_ms: 0,
            failed: None,
            buf: Vec::new(),
            spans: Vec::new(),
            group_immediate: false,
        }
    }

    /// Starts making the next segment's file in the background, unless a spare (a recycled
    /// segment) is there or one is being made.
    fn start_prealloc(&mut self) {
        if !self.shared.options.background_preallocation
            || self.prealloc.is_some()
            || self.spare.is_some()
        {
            return;
        }
        let vfs = self.shared.vfs.clone();
        let path = join(&self.shared.dir, PREALLOC_NAME);
        let len = self.shared.options.segment_bytes;
        let spawned = std::thread::Builder::new()
            .name("event-log-prealloc".into())
            .spawn(move || preallocate(vfs.as_ref(), path, len));
        match spawned {
            Ok(handle) => self.prealloc = Some(handle),
            Err(e) => warn!(error = %e, "cannot spawn preallocation thread; preallocating inline"),
        }
    }

    fn take_prealloc(&mut self) -> Result<Prealloc> {
        if let Some(spare) = self.spare.take() {
            return Ok(spare);
        }
        if let Some(handle) = self.prealloc.take() {
            match handle.join() {
                Ok(result) => return result.map_err(io("preallocate segment")),
                Err(_) => warn!("preallocation thread panicked; preallocating inline"),
            }
        }
        let path = join(&self.shared.dir, PREALLOC_NAME);
        preallocate(self.shared.vfs.as_ref(), path, self.shared.options.segment_bytes)
            .map_err(io("preallocate segment"))
    }

    /// Seals the active segment (already synced by the caller) and starts a new one whose first
    /// record is `first_position`, durable together with its directory entry.
    fn roll(&mut self, first_position: u64, prev_hash: Hash) -> Result<()> {
        let Prealloc { path: tmp, file, zero_filled } = self.take_prealloc()?;
        let stats = &self.shared.stats;
        let counter =
            if zero_filled { &stats.segments_zero_filled } else { &stats.segments_reused };
        counter.fetch_add(1, Ordering::Relaxed);
        let header = SegmentHeader { first_position, prev_hash };
        // The header and an end marker: a reused file holds stale bytes after the header.
        let mut head = [0u8; SEGMENT_HEADER_BYTES + END_MARKER_BYTES];
        head[..SEGMENT_HEADER_BYTES].copy_from_slice(&header.encode());
        file.write_all_at(&head, 0).map_err(io("write segment header"))?;
        file.sync_data().map_err(io("sync segment header"))?;
        let path = join(&self.shared.dir, &segment_name(first_position));
        debug_assert!(tmp.to_string_lossy().ends_with(TEMP_SUFFIX));
        self.shared.vfs.rename(&tmp, &path).map_err(io("rename segment"))?;
        self.shared.vfs.sync_dir(&self.shared.dir).map_err(io("sync log directory"))?;
        let len_bytes = file.len().map_err(io("stat segment"))?;
        let segment = Arc::new(Segment::new(header, path, file, len_bytes));
        if let Some(old) = self.active.take() {
            self.sealed_bytes += old.len_bytes;
        }
        self.shared.segments.write().unwrap_or_else(|e| e.into_inner()).push(segment.clone());
        {
            let mut head = self.shared.head_state();
            if head.position == 0 && first_position == 1 {
                head.anchor_hash = GENESIS_HASH;
            }
        }
        self.active = Some(segment);
        self.write_offset = SEGMENT_HEADER_BYTES as u64;
        Ok(())
    }

    /// Puts the recovered tail's ids in the dedup map (see `recovered_hashes`).
    fn remember_recovered_tail(&mut self) {
        let hashes = std::mem::take(&mut self.recovered_hashes);
        self.recent_ids.reserve(hashes.len());
        self.recent_order.reserve(hashes.len());
        for (entry, hash) in self.pending_index.iter().zip(hashes) {
            let appended =
                Appended { position: entry.position, stream_version: entry.stream_version, hash };
            self.recent_ids.insert(entry.event_id, appended);
            self.recent_order.push_back((entry.event_id, entry.position));
        }
    }

    pub(crate) fn run(mut self) {
        self.remember_recovered_tail();
        // A fresh log has no segment yet, and a reopened one may be past the point where the
        // next segment is made: start making it now, not on the path of a first append that
        // would wait for its zeros (a whole segment written and synced).
        if self
            .active
            .as_ref()
            .is_none_or(|a| self.write_offset > a.len_bytes / PREALLOC_AT_FILL_DIVISOR)
        {
            self.start_prealloc();
        }
        loop {
            let first = match self.next_wakeup() {
                Some(deadline) => {
                    let timeout = deadline.saturating_duration_since(Instant::now());
                    match self.rx.recv_timeout(timeout) {
                        Ok(command) => Some(command),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                None => match self.rx.recv() {
                    Ok(command) => Some(command),
                    Err(_) => break,
                },
            };
            let mut controls = Vec::new();
            self.prune_recent();
            if let Some(command) = first {
                let expected_appends = std::mem::take(&mut self.released_appends);
                let mut appends = 0usize;
                let mut events = 0usize;
                let mut bytes = 0usize;
                let mut next = Some(command);
                while let Some(command) = next.take() {
                    match command {
                        Command::Append { request, len_bytes, done } => {
                            appends += 1;
                            events += 1;
                            bytes += len_bytes;
                            self.stage_one(request, done);
                        }
                        Command::Batch { requests, len_bytes, done } => {
                            appends += 1;
                            events += requests.len();
                            bytes += len_bytes;
                            self.stage_batch(requests, done);
                        }
                        other => controls.push(other),
                    }
                    if events >= self.shared.options.max_group_events
                        || bytes >= self.shared.options.max_group_bytes
                        || !controls.is_empty()
                    {
                        break;
                    }
                    next = match self.rx.try_recv() {
                        Ok(command) => Some(command),
                        Err(TryRecvError::Empty) if appends < expected_appends => self.gather(),
                        Err(TryRecvError::Empty | TryRecvError::Disconnected) => None,
                    };
                }
            }
            self.id_index = None;
            self.commit_group();
            // Appends answered while staging (duplicates, conflicts) whose group did not sync.
            self.wake_waiters();
            let mut stop = false;
            for control in controls {
                stop |= self.control(control);
            }
            if stop {
                return;
            }
            self.housekeeping();
        }
        let (done, _pending) = crate::completion::pair();
        self.control(Command::Shutdown { done });
    }

    /// Waits (yielding the CPU) up to [`GATHER_WAIT_MAX`] after the last sync for the next
    /// append. Callers whose appends the last sync acknowledged mostly append again at once; a
    /// group committed before they are back splits them over two fsyncs (two device pages).
    fn gather(&self) -> Option<Command> {
        let deadline = self.released_at + GATHER_WAIT_MAX;
        while Instant::now() < deadline {
            std::thread::yield_now();
            match self.rx.try_recv() {
                Ok(command) => return Some(command),
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => return None,
            }
        }
        None
    }

    fn next_wakeup(&self) -> Option<Instant> {
        let options = &self.shared.options;
        let mut next = self.sync_deadline;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        if self.failed.is_none() {
            if !self.pending_index.is_empty() {
                consider(self.last_index_write + options.index_flush_interval);
            }
            if self.durable.position != self.indexed.position || !self.pending_index.is_empty() {
                consider(self.last_checkpoint + options.checkpoint_interval);
                if self.events_since_checkpoint >= options.checkpoint_events {
                    consider(Instant::now());
                }
            }
        }
        next
    }

    /// Answers an append now; its thread wakes at the next [`Writer::wake_waiters`].
    fn answer<T>(&mut self, done: Completer<T>, result: Result<T>) {
        done.complete_deferred(result);
        self.wake_pending = true;
    }

    /// Wakes every thread blocked on an append answered since the last call: one broadcast for
    /// the whole group instead of one wake-up per waiter.
    fn wake_waiters(&mut self) {
        if std::mem::take(&mut self.wake_pending) {
            self.shared.append_notifier.notify_all();
        }
    }

    fn timestamp(&mut self) -> u64 {
        self.last_timestamp_ms = self.last_timestamp_ms.max(now_ms());
        self.last_timestamp_ms
    }

    fn lookup_id(&mut self, id: &[u8; 16]) -> Result<Option<Appended>> {
        if let Some(found) = self.recent_ids.get(id) {
            return Ok(Some(*found));
        }
        if index::id_key(id) > self.max_id_key {
            return Ok(None);
        }
        if self.id_index.is_none() {
            self.id_index = Some(index::IdIndex::open(&self.shared.db)?);
        }
        let ids = self.id_index.as_ref().expect("opened above");
        let Some(position) = ids.get(index::id_key(id))? else {
            return Ok(None);
        };
        let events = self.shared.read_span(position, position)?;
        let event = events
            .into_iter()
            .next()
            .ok_or(Error::Corrupt { position, reason: "indexed event missing".into() })?;
        // Paired with the index write: the event found is the one with this id.
        if event.event_id != *id {
            return Err(Error::Corrupt {
                position,
                reason: "the dedup index points to an event with another id".into(),
            });
        }
        Ok(Some(Appended { position, stream_version: event.stream_version, hash: event.hash }))
    }

    /// Forgets ids the index now holds.
    fn prune_recent(&mut self) {
        let indexed = self.shared.indexed_position.load(Ordering::Acquire);
        while let Some(&(id, position)) = self.recent_order.front() {
            if position > indexed {
                break;
            }
            self.recent_order.pop_front();
            self.max_id_key = self.max_id_key.max(index::id_key(&id));
            if let Entry::Occupied(entry) = self.recent_ids.entry(id)
                && entry.get().position == position
            {
                entry.remove();
            }
        }
    }

    /// Encodes one event at the next position into the group buffer (the caller has set its
    /// stream's version in `streams`); the request's stream name moves into the index entry.
    fn stage_event(&mut self, request: AppendRequest, version: u64, flags: u8) -> Appended {
        let position = self.position + 1;
        let timestamp_ms = self.timestamp();
        let hash = record::event_hash(
            &self.hash,
            position,
            &request.stream,
            version,
            &request.event_id,
            &request.kind,
            timestamp_ms,
            &request.payload,
        );
        let start = self.buf.len();
        record::encode_fields(
            &record::RecordFields {
                stream: &request.stream,
                stream_version: version,
                event_id: &request.event_id,
                kind: &request.kind,
                timestamp_ms,
                payload: &request.payload,
                hash: &hash,
            },
            flags,
            &mut self.buf,
        );
        self.spans.push(Span { start, end: self.buf.len(), position, prev_hash: self.hash });
        let appended = Appended { position, stream_version: version, hash };
        self.position = position;
        self.hash = hash;
        self.recent_ids.insert(request.event_id, appended);
        self.recent_order.push_back((request.event_id, position));
        self.unsynced.push(IndexEntry {
            position,
            stream: request.stream,
            stream_version: version,
            event_id: request.event_id,
            locator: None,
        });
        appended
    }

    fn note_durability(&mut self, durability: Durability) {
        match durability {
            Durability::Immediate => self.group_immediate = true,
            Durability::Within(d) => {
                let t = Instant::now() + d;
                self.sync_deadline = Some(self.sync_deadline.map_or(t, |n| n.min(t)));
            }
        }
    }

    fn stage_one(&mut self, request: AppendRequest, done: Completer<Appended>) {
        if let Some(e) = &self.failed {
            let e = e.duplicate();
            return self.answer(done, Err(e));
        }
        match self.lookup_id(&request.event_id) {
            Err(e) => return self.answer(done, Err(e)),
            Ok(Some(original)) => {
                if original.position <= self.durable.position {
                    return self.answer(done, Ok(original));
                }
                self.note_durability(request.durability);
                self.waiters.push(Waiter::One(done, original));
                return;
            }
            Ok(None) => {}
        }
        // One stream lookup: read the version, check it, then set the next one.
        let stream_version = self.streams.get_mut(request.stream.as_str());
        let current = stream_version.as_deref().copied().unwrap_or(0);
        if let Some(expected) = request.expected_version
            && expected != current
        {
            let conflict = Error::Conflict { stream: request.stream, expected, actual: current };
            return self.answer(done, Err(conflict));
        }
        match stream_version {
            Some(version) => *version = current + 1,
            None => {
                self.streams.insert(request.stream.clone(), current + 1);
            }
        }
        self.note_durability(request.durability);
        let appended = self.stage_event(request, current + 1, 0);
        self.waiters.push(Waiter::One(done, appended));
    }

    fn stage_batch(&mut self, requests: Vec<AppendRequest>, done: Completer<Vec<Appended>>) {
        if let Some(e) = &self.failed {
            let e = e.duplicate();
            return self.answer(done, Err(e));
        }
        // Check everything before staging anything: the batch is atomic.
        let mut originals = Vec::with_capacity(requests.len());
        for request in &requests {
            match self.lookup_id(&request.event_id) {
                Ok(found) => originals.push(found),
                Err(e) => return self.answer(done, Err(e)),
            }
        }
        let mut versions: HashMap<&str, u64> = HashMap::new();
        for (request, original) in requests.iter().zip(&originals) {
            if original.is_some() {
                continue;
            }
            let current = *versions
                .entry(&request.stream)
                .or_insert_with(|| self.streams.get(&request.stream).copied().unwrap_or(0));
            if let Some(expected) = request.expected_version
                && expected != current
            {
                let conflict =
                    Error::Conflict { stream: request.stream.clone(), expected, actual: current };
                return self.answer(done, Err(conflict));
            }
            versions.insert(&request.stream, current + 1);
        }
        let durability = if requests.iter().any(|r| r.durability == Durability::Immediate) {
            Durability::Immediate
        } else {
            requests
                .iter()
                .filter_map(|r| match r.durability {
                    Durability::Within(d) => Some(d),
                    Durability::Immediate => None,
                })
                .min()
                .map_or(Durability::Immediate, Durability::Within)
        };
        let last_new = originals.iter().rposition(Option::is_none);
        let mut results = Vec::with_capacity(requests.len());
        let mut all_durable = true;
        for (i, (request, original)) in requests.into_iter().zip(originals).enumerate() {
            let appended = match original {
                Some(original) => original,
                None => {
                    let version = match self.streams.get_mut(request.stream.as_str()) {
                        Some(version) => {
                            *version += 1;
                            *version
                        }
                        None => {
                            self.streams.insert(request.stream.clone(), 1);
                            1
                        }
                    };
                    let flags = if Some(i) == last_new { 0 } else { FLAG_BATCH_CONTINUES };
                    self.stage_event(request, version, flags)
                }
            };
            all_durable &= appended.position <= self.durable.position;
            results.push(appended);
        }
        if all_durable {
            return self.answer(done, Ok(results));
        }
        self.note_durability(durability);
        self.waiters.push(Waiter::Many(done, results));
    }

    /// Writes the staged records, syncs if anything needs it now, completes waiters.
    fn commit_group(&mut self) {
        let spans = std::mem::take(&mut self.spans);
        let buf = std::mem::take(&mut self.buf);
        let mut buf = buf;
        let result = self.write_spans(&mut buf, &spans);
        if let Some(active) = &self.active
            && !spans.is_empty()
            && self.write_offset > active.len_bytes / PREALLOC_AT_FILL_DIVISOR
        {
            // Half the segment is written: get the next one ready in the background, unless
            // a compaction has recycled one by now.
            self.start_prealloc();
        }
        self.buf = buf;
        self.buf.clear();
        // A full group may double the buffer past `max_group_bytes`; keep that much.
        let retain = GROUP_BUFFER_RETAIN_BYTES.max(2 * self.shared.options.max_group_bytes);
        if self.buf.capacity() > retain {
            // A huge record went through: do not keep its pages resident.
            self.buf = Vec::new();
        }
        self.shared.stats.group_buffer_bytes.store(self.buf.capacity() as u64, Ordering::Relaxed);
        if let Err(e) = result {
            return self.fail(e);
        }
        let due = self.sync_deadline.is_some_and(|t| t <= Instant::now());
        if (self.group_immediate || due || self.unsynced_bytes >= MAX_UNSYNCED_BYTES)
            && let Err(e) = self.sync()
        {
            self.fail(e);
        }
    }

    /// Writes the staged records (`buf`, which it may extend and shrink again), each write
    /// followed by an end marker where the segment has room for one: a recycled segment holds
    /// stale bytes after the written part, and a reader must find the end there.
    fn write_spans(&mut self, buf: &mut Vec<u8>, spans: &[Span]) -> Result<()> {
        let Some(first) = spans.first() else { return Ok(()) };
        if self.active.is_none() {
            self.roll(first.position, first.prev_hash)?;
        }
        let mut pending_from = 0usize;
        let mut pending_offset = self.write_offset;
        let mut cursor = self.write_offset;
        let first_entry = self.unsynced.len() - spans.len();
        for (i, span) in spans.iter().enumerate() {
            let len = (span.end - span.start) as u64;
            let capacity = self.active.as_ref().map_or(0, |s| s.len_bytes);
            if cursor + len > capacity {
                let active = self.active.clone().expect("active segment");
                active
                    .file
                    .write_all_at(&buf[pending_from..span.start], pending_offset)
                    .map_err(io("write segment"))?;
                if cursor + END_MARKER_BYTES as u64 <= capacity {
                    let marker = [0u8; END_MARKER_BYTES];
                    active.file.write_all_at(&marker, cursor).map_err(io("write end marker"))?;
                }
                active.file.sync_data().map_err(io("sync segment"))?;
                self.roll(span.position, span.prev_hash)?;
                pending_from = span.start;
                pending_offset = self.write_offset;
                cursor = self.write_offset;
            }
            if span.position.is_multiple_of(index::OFFSET_INDEX_EVERY_EVENTS) {
                let segment_first = self.active.as_ref().map_or(0, |s| s.header.first_position);
                self.unsynced[first_entry + i].locator =
                    Some(Locator { segment_first, offset: cursor, prev_hash: span.prev_hash });
            }
            cursor += len;
        }
        let active = self.active.clone().expect("active segment");
        let records_end = buf.len();
        if cursor + END_MARKER_BYTES as u64 <= active.len_bytes {
            buf.resize(records_end + END_MARKER_BYTES, 0);
        }
        let written = active.file.write_all_at(&buf[pending_from..], pending_offset);
        buf.truncate(records_end);
        written.map_err(io("write segment"))?;
        self.unsynced_bytes += records_end as u64;
        self.write_offset = cursor;
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        self.group_immediate = false;
        self.sync_deadline = None;
        if !self.unsynced.is_empty() {
            let active = self.active.clone().expect("active segment");
            active.file.sync_data().map_err(io("sync segment"))?;
            self.shared.stats.group_commits.fetch_add(1, Ordering::Relaxed);
            self.unsynced_bytes = 0;
            let active_first = active.header.first_position;
            self.durable = Checkpoint {
                position: self.position,
                hash: self.hash,
                segment_first: active_first,
                next_offset: self.write_offset,
            };
            let entries = std::mem::take(&mut self.unsynced);
            self.shared.stats.events.fetch_add(entries.len() as u64, Ordering::Relaxed);
            self.events_since_checkpoint += entries.len() as u64;
            {
                let mut unindexed = self.shared.unindexed.lock().unwrap_or_else(|e| e.into_inner());
                for entry in &entries {
                    let item = (entry.stream_version, entry.position);
                    match unindexed.get_mut(entry.stream.as_str()) {
                        Some(queue) => queue.push_back(item),
                        None => {
                            unindexed.insert(entry.stream.clone(), VecDeque::from([item]));
                        }
                    }
                }
            }
            self.pending_index.extend(entries);
            let wakers = {
                let mut head = self.shared.head_state();
                head.position = self.position;
                head.hash = self.hash;
                head.log_bytes = self.sealed_bytes + self.write_offset;
                std::mem::take(&mut head.wakers)
            };
            self.shared.head_changed.notify_all();
            wakers.into_iter().for_each(|w| w.wake());
        }
        self.released_appends = self.waiters.len();
        for waiter in self.waiters.drain(..) {
            waiter.complete();
            self.wake_pending = true;
        }
        self.wake_waiters();
        self.released_at = Instant::now();
        Ok(())
    }

    fn fail(&mut self, e: Error) {
        error!(error = %e, "event log write failed; the log refuses further writes until reopened");
        for waiter in self.waiters.drain(..) {
            waiter.fail(&e);
            self.wake_pending = true;
        }
        self.wake_waiters();
        self.spans.clear();
        self.buf.clear();
        self.unsynced.clear();
        self.sync_deadline = None;
        self.group_immediate = false;
        if self.failed.is_none() {
            self.failed = Some(e);
        }
    }

    /// Hands the durable, not yet indexed entries to the index thread (a non-durable redb
    /// write, or a durable checkpoint); `wait` blocks until it is committed, and until every
    /// job queued before it is (a checkpoint queued earlier without waiting must be durable
    /// before a compaction removes the segments it covers).
    fn write_index(&mut self, durable: bool, wait: bool) -> Result<()> {
        if self.pending_index.is_empty() && (!durable || self.indexed == self.durable) {
            return if wait { self.index_barrier() } else { Ok(()) };
        }
        let options = &self.shared.options;
        let now_ms = now_ms();
        let prune = index::Prune {
            ids_below_ms: durable
                .then(|| now_ms.saturating_sub(options.dedup_window.as_millis() as u64)),
            id_chunks_max: DEDUP_WINDOW_MAX_CHUNKS,
            streams_below: if durable { self.prune_streams_below.take() } else { None },
        };
        let (done, pending) = if wait {
            let (done, pending) = crate::completion::pair();
            (Some(done), Some(pending))
        } else {
            (None, None)
        };
        let job = IndexJob {
            entries: std::mem::take(&mut self.pending_index),
            checkpoint: self.durable,
            durable,
            barrier: false,
            now_ms,
            prune,
            done,
        };
        let tx = self.index_tx.as_ref().ok_or(Error::Closed)?;
        tx.send(job)
            .map_err(|_| Error::Index { op: "queue", message: "index thread gone".into() })?;
        self.last_index_write = Instant::now();
        if durable {
            self.indexed = self.durable;
            self.last_checkpoint = self.last_index_write;
            self.events_since_checkpoint = 0;
        }
        match pending {
            Some(pending) => pending.wait(),
            None => Ok(()),
        }
    }

    /// Waits until the index thread has committed every job queued so far (it applies them in
    /// order); fails if one of them failed.
    fn index_barrier(&mut self) -> Result<()> {
        let (done, pending) = crate::completion::pair();
        let job = IndexJob {
            entries: Vec::new(),
            checkpoint: self.durable,
            durable: false,
            barrier: true,
            now_ms: 0,
            prune: index::Prune::NOTHING,
            done: Some(done),
        };
        let tx = self.index_tx.as_ref().ok_or(Error::Closed)?;
        tx.send(job)
            .map_err(|_| Error::Index { op: "queue", message: "index thread gone".into() })?;
        pending.wait()
    }

    fn housekeeping(&mut self) {
        if self.failed.is_some() {
            return;
        }
        let now = Instant::now();
        if self.sync_deadline.is_some_and(|t| t <= now)
            && let Err(e) = self.sync()
        {
            return self.fail(e);
        }
        let options = &self.shared.options;
        let checkpoint_due = (self.indexed != self.durable || !self.pending_index.is_empty())
            && (now >= self.last_checkpoint + options.checkpoint_interval
                || self.events_since_checkpoint >= options.checkpoint_events);
        let flush_due = !self.pending_index.is_empty()
            && (self.pending_index.len() >= options.index_flush_events
                || now >= self.last_index_write + options.index_flush_interval);
        let index_error = self.shared.index_error.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let result = if let Some(message) = index_error {
            Err(Error::Index { op: "write", message })
        } else if checkpoint_due {
            self.write_index(true, false)
        } else if flush_due {
            self.write_index(false, false)
        } else {
            Ok(())
        };
        if let Err(e) = result {
            return self.fail(e);
        }
        // Bound the tail an open after a crash must scan: past one and a half checkpoint
        // spacings (the index thread fell behind), wait until a durable checkpoint commits.
        let checkpointed = self.shared.checkpointed_position.load(Ordering::Acquire);
        if self.durable.position.saturating_sub(checkpointed)
            >= max_tail_events(&self.shared.options)
        {
            self.shared.stats.tail_waits.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = self.write_index(true, true) {
                self.fail(e);
            }
        }
    }

    /// Records a clean close: everything is synced and indexed, and nothing follows the head.
    fn mark_clean(&mut self) -> Result<()> {
        let path = join(&self.shared.dir, CLEAN_MARKER_NAME);
        let file = self.shared.vfs.open(&path, true).map_err(io("create clean marker"))?;
        file.sync_data().map_err(io("sync clean marker"))?;
        self.shared.vfs.sync_dir(&self.shared.dir).map_err(io("sync log directory"))
    }

    fn compact(&mut self, below: u64) -> Result<CompactReport> {
        self.sync()?;
        let below = below.min(self.durable.position + 1);
        // Whole segments below `below`, never the active one. Only this thread changes the list.
        let removable = {
            let segments = self.shared.segments.read().unwrap_or_else(|e| e.into_inner());
            let mut n = 0;
            while n + 1 < segments.len() && segments[n + 1].header.first_position <= below {
                n += 1;
            }
            n
        };
        if removable > 0 {
            // The index must durably cover what goes: the log tail replayed on open will not
            // hold it any more. With nothing to remove there is nothing to cover, and a durable
            // index commit costs device bytes (services compact after every snapshot, far more
            // often than a segment fills).
            self.write_index(true, true)?;
        }
        let removed: Vec<Arc<Segment>> = self
            .shared
            .segments
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..removable)
            .collect();
        let segments = self.shared.segments();
        let first = segments.first().map_or(1, |s| s.header.first_position);
        let anchor = segments.first().map_or(GENESIS_HASH, |s| s.header.prev_hash);
        let mut bytes_removed = 0;
        let segments_removed = removed.len();
        if !removed.is_empty() {
            {
                let mut head = self.shared.head_state();
                head.first_position = first;
                head.anchor_hash = anchor;
            }
            // Lowest first, so a power cut keeps a contiguous run of segments whatever prefix
            // of these directory changes survives.
            for segment in removed {
                bytes_removed += segment.len_bytes;
                self.recycle_or_remove(segment)?;
            }
            self.shared.vfs.sync_dir(&self.shared.dir).map_err(io("sync log directory"))?;
            self.sealed_bytes -= bytes_removed;
            self.shared.head_state().log_bytes = self.sealed_bytes + self.write_offset;
            self.prune_streams_below = Some(first);
        }
        Ok(CompactReport { first_position: first, segments_removed, bytes_removed })
    }

    /// Takes a compacted segment out of use: renamed to [`PREALLOC_NAME`] as the next segment's
    /// file when none is there or being made (no zeros to write for it; its stale records can
    /// never continue the chain, see `docs/FORMATS.md`), else removed. Only a file no reader
    /// still holds is recycled (a reader of compacted positions must not see new records).
    fn recycle_or_remove(&mut self, segment: Arc<Segment>) -> Result<()> {
        let vfs = self.shared.vfs.clone();
        let segment = match Arc::try_unwrap(segment) {
            Ok(segment)
                if self.spare.is_none()
                    && self.prealloc.is_none()
                    && segment.len_bytes == self.shared.options.segment_bytes =>
            {
                segment
            }
            Ok(segment) => return vfs.remove(&segment.path).map_err(io("remove segment")),
            Err(shared) => return vfs.remove(&shared.path).map_err(io("remove segment")),
        };
        let path = join(&self.shared.dir, PREALLOC_NAME);
        vfs.rename(&segment.path, &path).map_err(io("recycle segment"))?;
        self.spare = Some(Prealloc { path, file: segment.file, zero_filled: false });
        self.shared.stats.segments_recycled.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Handles a control command; returns true when the writer must stop.
    fn control(&mut self, command: Command) -> bool {
        let failed = self.failed.as_ref().map(Error::duplicate);
        match command {
            Command::Append { done, .. } => done.complete(Err(Error::Failed)),
            Command::Batch { done, .. } => done.complete(Err(Error::Failed)),
            Command::Flush { done } => match failed {
                Some(e) => done.complete(Err(e)),
                None => {
                    let result = self.sync();
                    if let Err(e) = &result {
                        self.fail(e.duplicate());
                    }
                    done.complete(result)
                }
            },
            Command::Checkpoint { done } => match failed {
                Some(e) => done.complete(Err(e)),
                None => {
                    let result = self.sync().and_then(|()| self.write_index(true, true));
                    if let Err(e) = &result {
                        self.fail(e.duplicate());
                    }
                    done.complete(result)
                }
            },
            Command::Compact { below, done } => match failed {
                Some(e) => done.complete(Err(e)),
                None => {
                    let result = self.compact(below);
                    if let Err(e) = &result {
                        self.fail(e.duplicate());
                    }
                    done.complete(result)
                }
            },
            Command::Shutdown { done } => {
                let result = match failed {
                    Some(_) => Ok(()),
                    None => self
                        .sync()
                        .and_then(|()| self.write_index(true, true))
                        .and_then(|()| self.mark_clean()),
                };
                // Stop the index thread after its last job.
                self.index_tx = None;
                if let Some(handle) = self.index_thread.take() {
                    let _ = handle.join();
                }
                if let Some(handle) = self.prealloc.take() {
                    let _ = handle.join();
                }
                {
                    let mut head = self.shared.head_state();
                    head.closed = true;
                    head.wakers.drain(..).for_each(|w| w.wake());
                }
                self.shared.head_changed.notify_all();
                // Refuse whatever is still queued.
                while let Ok(command) = self.rx.try_recv() {
                    drop(command);
                }
                done.complete(result);
                return true;
            }
        }
        false
    }
}

/// The next segment's file is made in the background once the active one is more than
/// `1 / PREALLOC_AT_FILL_DIVISOR` full (not at the roll: a compaction until then may recycle one).
const PREALLOC_AT_FILL_DIVISOR: u64 = 2;

/// Longest a group waits, after the last sync, for the appends of the callers that sync
/// released (see [`Writer::gather`]); a fraction of one fsync.
const GATHER_WAIT_MAX: Duration = Duration::from_micros(100);

/// Most events past the last committed durable checkpoint before the writer waits for one:
/// one and a half checkpoint spacings, so a checkpoint queued at `checkpoint_events` has half
/// a spacing to commit before the writer would wait. With at most one group over it, this
/// bounds the records an open after a crash scans and holds in memory.
pub(crate) fn max_tail_events(options: &crate::Options) -> u64 {
    options.checkpoint_events.saturating_add(options.checkpoint_events / 2).max(1)
}

/// Most index jobs queued for the index thread before the writer waits.
const INDEX_QUEUE_JOBS: usize = 16;

/// One redb write for the index thread.
#[derive(Debug)]
struct IndexJob {
    entries: Vec<IndexEntry>,
    checkpoint: Checkpoint,
    durable: bool,
    /// Writes nothing: completes once every job before it is done.
    barrier: bool,
    /// The writer's clock when it queued the job.
    now_ms: u64,
    prune: index::Prune,
    done: Option<Completer<()>>,
}

/// The index thread: applies jobs to redb in order, publishes how far the index reaches.
fn run_indexer(shared: Arc<Shared>, rx: Receiver<IndexJob>) {
    while let Ok(job) = rx.recv() {
        let failed = shared.index_error.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let result = match failed {
            Some(message) => Err(Error::Index { op: "write", message }),
            None if job.barrier => {
                if let Some(done) = job.done {
                    done.complete(Ok(()));
                }
                continue;
            }
            None => index::write_batch(
                &shared.db,
                &job.entries,
                &job.checkpoint,
                job.durable,
                job.now_ms,
                &job.prune,
            ),
        };
        match &result {
            Ok(id_chunks) => {
                shared.stats.dedup_chunks.store(*id_chunks, Ordering::Relaxed);
                {
                    let mut unindexed = shared.unindexed.lock().unwrap_or_else(|e| e.into_inner());
                    for entry in &job.entries {
                        let Some(queue) = unindexed.get_mut(entry.stream.as_str()) else {
                            continue;
                        };
                        while queue.front().is_some_and(|(v, _)| *v <= entry.stream_version) {
                            queue.pop_front();
                        }
                        if queue.is_empty() {
                            unindexed.remove(entry.stream.as_str());
                        }
                    }
                }
                shared.indexed_position.fetch_max(job.checkpoint.position, Ordering::Release);
                if job.durable {
                    shared
                        .checkpointed_position
                        .fetch_max(job.checkpoint.position, Ordering::Release);
                }
                let counter = if job.durable {
                    &shared.stats.checkpoints
                } else {
                    &shared.stats.index_writes
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                error!(error = %e, "index write failed");
                let mut slot = shared.index_error.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert_with(|| e.to_string());
            }
        }
        if let Some(done) = job.done {
            done.complete(result.map(|_| ()));
        }
    }
}
