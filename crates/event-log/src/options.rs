//! Options, limits and the request/response types of appends.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::record::{Hash, SEGMENT_HEADER_BYTES, record_len};

/// Default size of a preallocated segment file.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Default largest payload of one event.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 256 * 1024;
/// Longest stream name (bytes); the record format stores it with a one-byte length.
pub const MAX_STREAM_NAME_BYTES: usize = 128;
/// Longest event kind (bytes); the record format stores it with a one-byte length.
pub const MAX_KIND_BYTES: usize = 128;
/// Default most events in one `append_batch`.
pub const DEFAULT_MAX_BATCH_EVENTS: usize = 1024;
/// Default most encoded bytes in one `append_batch`.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Default most events the writer puts in one group commit.
pub const DEFAULT_MAX_GROUP_EVENTS: usize = 4096;
/// Default most bytes the writer puts in one group commit (a batch is never split).
pub const DEFAULT_MAX_GROUP_BYTES: usize = 1024 * 1024;
/// Default depth of the queue in front of the writer (callers block when it is full).
pub const DEFAULT_QUEUE_DEPTH: usize = 4096;
/// Most bytes written but not yet synced (`Within` appends) before the writer syncs anyway.
pub const MAX_UNSYNCED_BYTES: u64 = 1024 * 1024;
/// Default age of the idempotency window (by the UUIDv7 time in the event id).
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(3600);
/// Most UUIDv7 ids in one chunk of the dedup index (a lookup decodes one chunk).
pub const ID_CHUNK_MAX_EVENTS: usize = 4096;
/// Most bytes of one chunk of the dedup index: with redb's 24 bytes of leaf around it (page
/// header, value length, the 16-byte key) a full chunk fills a 32 KiB page exactly, and
/// larger than one 4 KiB page it never shares its leaf (redb rewrites a leaf's neighbours on
/// an insert otherwise). About 12 bytes per random UUIDv7 id: about 2,700 ids a chunk.
pub const ID_CHUNK_MAX_BYTES: usize = 32 * 1024 - 24;
/// Widest span of UUIDv7 time in one chunk. A chunk is pruned once its newest id leaves the
/// window, so an id may be remembered up to this much longer than `dedup_window`.
pub const ID_CHUNK_SPAN_MS_MAX: u64 = 10_000;
/// The count bound of the dedup window: most chunks kept. Beyond it the oldest chunks are
/// dropped at the next index write, so at high rates the window is shorter than
/// `dedup_window` (`Stats::dedup_chunks` shows how close the index is).
pub const DEDUP_WINDOW_MAX_CHUNKS: u64 = 8192;
/// Capacity the writer's group buffer keeps between group commits, or twice
/// `max_group_bytes` if that is more (a full group may double it). A larger record (a
/// counter epoch's genesis of several MB, say) grows it beyond; after that commit it is
/// released, so its pages do not stay resident for the rest of the process.
pub const GROUP_BUFFER_RETAIN_BYTES: usize = 1024 * 1024;
/// Most UUIDv7 ids the chunks hold (about 22 million of random ids, at 12 bytes each).
pub const DEDUP_WINDOW_MAX_EVENTS: u64 = DEDUP_WINDOW_MAX_CHUNKS * ID_CHUNK_MAX_EVENTS as u64;
/// Most bytes of chunk values (256 MiB of redb pages).
pub const DEDUP_WINDOW_MAX_BYTES: u64 = DEDUP_WINDOW_MAX_CHUNKS * 32 * 1024;
/// A UUIDv7 id more than this ahead of the writer's clock is indexed on its own instead of in
/// a chunk (a chunk of far-future ids would make every later id late, see `docs/FORMATS.md`).
pub const DEDUP_ID_AHEAD_MS_MAX: u64 = 60_000;
/// Default time between durable index checkpoints (bounds the log tail replayed on open).
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);
/// Default events between durable index checkpoints. 50,000: an open after a crash scans at
/// most 75,000 events plus one group (about 45 ms; 500,000 made it 0.5 s after a burst), and
/// the checkpoints cost 4–7 B/event more than at 500,000 (BENCHMARKS, event-log).
pub const DEFAULT_CHECKPOINT_EVENTS: u64 = 50_000;
/// Default events buffered before a (non-durable) index write. Large batches matter: every
/// index write rewrites the last B-tree page of each stream it touches.
pub const DEFAULT_INDEX_FLUSH_EVENTS: usize = 65_536;
/// Default time an indexed event may wait for its (non-durable) index write (reads see it
/// earlier, from memory).
pub const DEFAULT_INDEX_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// Smallest segment size accepted.
pub const MIN_SEGMENT_BYTES: u64 = 4096;

/// How an append becomes durable before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Acknowledged after its own group commit's `fdatasync` (the default).
    #[default]
    Immediate,
    /// Acknowledged after the next periodic sync, at most this long after the append. A power cut
    /// may lose the last such window; for high-volume aggregates only.
    Within(Duration),
}

/// Tuning and limits of an [`crate::EventLog`].
#[derive(Debug, Clone)]
pub struct Options {
    /// Size of each preallocated segment file.
    pub segment_bytes: u64,
    /// Largest payload of one event.
    pub max_payload_bytes: usize,
    /// Most events in one batch.
    pub max_batch_events: usize,
    /// Most encoded bytes in one batch.
    pub max_batch_bytes: usize,
    /// Most events per group commit.
    pub max_group_events: usize,
    /// Most bytes per group commit.
    pub max_group_bytes: usize,
    /// Depth of the writer's queue.
    pub queue_depth: usize,
    /// How long an event id is remembered for idempotency (by its UUIDv7 time).
    pub dedup_window: Duration,
    /// Time between durable index checkpoints.
    pub checkpoint_interval: Duration,
    /// Events between durable index checkpoints. The writer also waits for a durable
    /// checkpoint once 1.5 × this many events are past the last one (the index thread fell
    /// behind), so an open after a crash scans at most that many plus one group.
    pub checkpoint_events: u64,
    /// Events buffered before a non-durable index write.
    pub index_flush_events: usize,
    /// Longest time an event waits for its non-durable index write.
    pub index_flush_interval: Duration,
    /// Preallocate the next segment on a background thread (off for deterministic tests).
    pub background_preallocation: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            max_batch_events: DEFAULT_MAX_BATCH_EVENTS,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            max_group_events: DEFAULT_MAX_GROUP_EVENTS,
            max_group_bytes: DEFAULT_MAX_GROUP_BYTES,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            dedup_window: DEFAULT_DEDUP_WINDOW,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            checkpoint_events: DEFAULT_CHECKPOINT_EVENTS,
            index_flush_events: DEFAULT_INDEX_FLUSH_EVENTS,
            index_flush_interval: DEFAULT_INDEX_FLUSH_INTERVAL,
            background_preallocation: true,
        }
    }
}

impl Options {
    /// Largest encoded record these options allow.
    pub fn max_record_bytes(&self) -> usize {
        record_len(&"s".repeat(MAX_STREAM_NAME_BYTES), &"k".repeat(MAX_KIND_BYTES), 0)
            + self.max_payload_bytes
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::InvalidOptions(m.to_owned()));
        if self.segment_bytes < MIN_SEGMENT_BYTES {
            return bad("segment_bytes below the minimum");
        }
        if (self.segment_bytes as usize) < SEGMENT_HEADER_BYTES + self.max_record_bytes() {
            return bad("segment_bytes must hold a header and one largest record");
        }
        if self.max_batch_bytes < self.max_record_bytes() {
            return bad("max_batch_bytes must hold one largest record");
        }
        if self.max_payload_bytes > u32::MAX as usize / 2 {
            return bad("max_payload_bytes too large");
        }
        if self.max_batch_events == 0 || self.max_group_events == 0 || self.queue_depth == 0 {
            return bad("event and queue limits must be positive");
        }
        Ok(())
    }

    /// Checks one request against the limits.
    pub(crate) fn check_request(&self, request: &AppendRequest) -> Result<usize> {
        if request.stream.is_empty() {
            return Err(Error::EmptyStreamName);
        }
        if request.stream.len() > MAX_STREAM_NAME_BYTES {
            return Err(Error::StreamNameTooLong {
                len_bytes: request.stream.len(),
                max_bytes: MAX_STREAM_NAME_BYTES,
            });
        }
        if request.kind.len() > MAX_KIND_BYTES {
            return Err(Error::KindTooLong {
                len_bytes: request.kind.len(),
                max_bytes: MAX_KIND_BYTES,
            });
        }
        if request.payload.len() > self.max_payload_bytes {
            return Err(Error::EventTooLarge {
                len_bytes: request.payload.len(),
                max_bytes: self.max_payload_bytes,
            });
        }
        Ok(record_len(&request.stream, &request.kind, request.payload.len()))
    }

    /// Checks a whole batch; returns its encoded size.
    pub(crate) fn check_batch(&self, requests: &[AppendRequest]) -> Result<usize> {
        if requests.is_empty() {
            return Err(Error::EmptyBatch);
        }
        let mut len_bytes = 0;
        for request in requests {
            len_bytes += self.check_request(request)?;
        }
        if requests.len() > self.max_batch_events || len_bytes > self.max_batch_bytes {
            return Err(Error::BatchTooLarge {
                events: requests.len(),
                len_bytes,
                max_events: self.max_batch_events,
                max_bytes: self.max_batch_bytes,
            });
        }
        let mut ids: Vec<&[u8; 16]> = requests.iter().map(|r| &r.event_id).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(Error::DuplicateInBatch);
        }
        Ok(len_bytes)
    }
}

/// One event to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendRequest {
    /// The stream, 1..=[`MAX_STREAM_NAME_BYTES`] bytes.
    pub stream: String,
    /// The caller's id, the idempotency key (a UUIDv7 keeps the dedup index time-ordered).
    pub event_id: [u8; 16],
    /// Application-defined kind, at most [`MAX_KIND_BYTES`] bytes.
    pub kind: String,
    /// Payload bytes, at most [`Options::max_payload_bytes`].
    pub payload: Vec<u8>,
    /// If set, the stream must be at exactly this version (0: the stream has no events yet),
    /// or the append fails with [`Error::Conflict`].
    pub expected_version: Option<u64>,
    /// When to acknowledge.
    pub durability: Durability,
}

impl AppendRequest {
    /// A request with `Immediate` durability and no expected version.
    pub fn new(
        stream: impl Into<String>,
        event_id: [u8; 16],
        kind: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Self {
        Self {
            stream: stream.into(),
            event_id,
            kind: kind.into(),
            payload: payload.into(),
            expected_version: None,
            durability: Durability::Immediate,
        }
    }

    /// Sets the expected stream version.
    pub fn expect_version(mut self, version: u64) -> Self {
        self.expected_version = Some(version);
        self
    }

    /// Sets the durability class.
    pub fn with_durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }
}

/// Where an appended event landed. An idempotent retry returns the original.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Global position.
    pub position: u64,
    /// Version within its stream.
    pub stream_version: u64,
    /// Chain hash of the event.
    pub hash: Hash,
}

/// The log's durable head and its compaction floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// Last durable position (0: empty).
    pub position: u64,
    /// Its hash (the anchor's hash if nothing is stored above the anchor).
    pub hash: Hash,
    /// First position still stored; the anchor is `first_position - 1`.
    pub first_position: u64,
    /// Hash of the anchor (`first_position - 1`).
    pub anchor_hash: Hash,
    /// Bytes of segment files in use (approximate: whole older segments plus the written part
    /// of the active one).
    pub log_bytes: u64,
}

/// Result of [`crate::EventLog::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// The anchor position the walk started after.
    pub anchor_position: u64,
    /// The last position checked.
    pub last_position: u64,
    /// Events whose checksum and hash were checked and found good.
    pub events_checked: u64,
    /// The first bad position, if any, and what is wrong there.
    pub first_bad: Option<(u64, String)>,
}

/// Result of [`crate::EventLog::compact`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactReport {
    /// First position still stored after compaction (whole segments are removed, so this may
    /// be below the requested bound).
    pub first_position: u64,
    /// Segment files removed.
    pub segments_removed: usize,
    /// Bytes of the removed files.
    pub bytes_removed: u64,
}
