//! The redb index beside the log: stream -> positions, event id -> position, stream versions,
//! cursors and the checkpoint that says how much of the log the index covers.

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::error::{Error, Result, index};
use crate::options::{
    DEDUP_ID_AHEAD_MS_MAX, ID_CHUNK_MAX_BYTES, ID_CHUNK_MAX_EVENTS, ID_CHUNK_SPAN_MS_MAX,
};
use crate::record::Hash;

/// `meta`: named values; holds the checkpoint under [`CHECKPOINT_KEY`].
pub(crate) const META: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("meta");
/// `streams`: stream name -> its last version.
pub(crate) const STREAMS: TableDefinition<'_, &str, u64> = TableDefinition::new("streams");
/// `stream_chunks`: (stream, first version) -> the positions of versions `first..first + n`
/// (a chunk: the first position as a LEB128 varint, then each next one as a varint delta).
/// One entry per stream per index write instead of one per event.
pub(crate) const STREAM_CHUNKS: TableDefinition<'_, (&str, u64), &[u8]> =
    TableDefinition::new("stream_chunks");
/// Most versions in one `stream_chunks` entry (bounds the decoding of a cold stream read).
pub(crate) const STREAM_CHUNK_MAX_EVENTS: u64 = 4096;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The positions of a `stream_chunks` value, in version order; `None` if malformed.
pub(crate) fn decode_chunk(bytes: &[u8]) -> Option<Vec<u64>> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let mut last = 0u64;
    while at < bytes.len() {
        let mut v = 0u64;
        let mut shift = 0u32;
        loop {
            let b = *bytes.get(at)?;
            at += 1;
            if shift > 63 {
                return None;
            }
            v |= u64::from(b & 0x7F) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                break;
            }
        }
        last = if out.is_empty() { v } else { last.checked_add(v)? };
        out.push(last);
    }
    Some(out)
}

/// A chunk being built: versions `first..=last`, positions encoded in `bytes`.
struct ChunkBuilder {
    first: u64,
    last: u64,
    last_position: u64,
    bytes: Vec<u8>,
}
/// `event_ids`: event id as a big-endian u128 -> position, one entry per id, for the ids that
/// [`EVENT_ID_CHUNKS`] does not take: ids that are not UUIDv7 (never pruned), and UUIDv7 ids
/// not above every chunk already written (late ones) or too far ahead of the writer's clock.
pub(crate) const EVENT_IDS: TableDefinition<'_, u128, u64> = TableDefinition::new("event_ids");
/// `event_id_chunks`: UUIDv7 event ids packed in time-ordered chunks: the key is the largest
/// id key in the chunk, the value its ids in key order with their positions (see
/// [`IdChunkBuilder`]). A chunk only ever holds ids above every key already in the table when
/// it is written, so chunks never overlap and the one chunk that can hold an id is the first
/// whose key is not below it. One B-tree entry per up to [`ID_CHUNK_MAX_EVENTS`] ids, written
/// once, instead of one entry (24 bytes in half-full leaves) per event.
pub(crate) const EVENT_ID_CHUNKS: TableDefinition<'_, u128, &[u8]> =
    TableDefinition::new("event_id_chunks");
/// `offsets`: every [`OFFSET_INDEX_EVERY_EVENTS`]th position -> where its record starts
/// (segment first position, byte offset, hash of the previous event), so a cold read finds its
/// place without scanning a whole segment.
pub(crate) const OFFSETS: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("offsets");
/// Positions that are multiples of this get an `offsets` entry.
pub(crate) const OFFSET_INDEX_EVERY_EVENTS: u64 = 256;
/// `cursors`: cursor name -> position.
pub(crate) const CURSORS: TableDefinition<'_, &str, u64> = TableDefinition::new("cursors");

/// Key of the checkpoint in [`META`].
pub(crate) const CHECKPOINT_KEY: &str = "checkpoint";
/// Bytes of an encoded [`Checkpoint`].
const CHECKPOINT_BYTES: usize = 8 + 32 + 8 + 8;

/// How much of the log the index covers: every event up to `position` is indexed; the next
/// record starts at `next_offset` in the segment whose first position is `segment_first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    pub position: u64,
    pub hash: Hash,
    pub segment_first: u64,
    pub next_offset: u64,
}

impl Checkpoint {
    pub(crate) fn encode(&self) -> [u8; CHECKPOINT_BYTES] {
        let mut out = [0u8; CHECKPOINT_BYTES];
        out[0..8].copy_from_slice(&self.position.to_le_bytes());
        out[8..40].copy_from_slice(&self.hash);
        out[40..48].copy_from_slice(&self.segment_first.to_le_bytes());
        out[48..56].copy_from_slice(&self.next_offset.to_le_bytes());
        out
    }
    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != CHECKPOINT_BYTES {
            return None;
        }
        Some(Self {
            position: u64::from_le_bytes(bytes[0..8].try_into().ok()?),
            hash: bytes[8..40].try_into().ok()?,
            segment_first: u64::from_le_bytes(bytes[40..48].try_into().ok()?),
            next_offset: u64::from_le_bytes(bytes[48..56].try_into().ok()?),
        })
    }
}

/// Where a record starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Locator {
    pub segment_first: u64,
    pub offset: u64,
    pub prev_hash: Hash,
}

impl Locator {
    fn encode(&self) -> [u8; 48] {
        let mut out = [0u8; 48];
        out[0..8].copy_from_slice(&self.segment_first.to_le_bytes());
        out[8..16].copy_from_slice(&self.offset.to_le_bytes());
        out[16..48].copy_from_slice(&self.prev_hash);
        out
    }
    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 48 {
            return None;
        }
        Some(Self {
            segment_first: u64::from_le_bytes(bytes[0..8].try_into().ok()?),
            offset: u64::from_le_bytes(bytes[8..16].try_into().ok()?),
            prev_hash: bytes[16..48].try_into().ok()?,
        })
    }
}

/// The closest indexed record start at or before `position`.
pub(crate) fn locate(db: &redb::Database, position: u64) -> Result<Option<(u64, Locator)>> {
    let txn = db.begin_read().map_err(index("begin read"))?;
    let table = txn.open_table(OFFSETS).map_err(index("open offsets"))?;
    let mut range = table.range(..=position).map_err(index("range offsets"))?;
    let Some(item) = range.next_back() else { return Ok(None) };
    let (k, v) = item.map_err(index("read offsets"))?;
    Ok(Locator::decode(v.value()).map(|l| (k.value(), l)))
}

/// Positions of `stream`'s versions from `from_version` on (at most `max_count`), in version
/// order, from `stream_chunks`.
pub(crate) fn stream_positions(
    db: &redb::Database,
    stream: &str,
    from_version: u64,
    max_count: usize,
) -> Result<Vec<(u64, u64)>> {
    let txn = db.begin_read().map_err(index("begin read"))?;
    let table = txn.open_table(STREAM_CHUNKS).map_err(index("open stream_chunks"))?;
    let mut out = Vec::new();
    let push_chunk = |first: u64, bytes: &[u8], out: &mut Vec<(u64, u64)>| -> Result<()> {
        let positions = decode_chunk(bytes).ok_or_else(|| crate::error::Error::Index {
            op: "read stream",
            message: format!("malformed chunk of {stream} at version {first}"),
        })?;
        for (i, position) in positions.into_iter().enumerate() {
            let version = first + i as u64;
            if version >= from_version && out.len() < max_count {
                out.push((version, position));
            }
        }
        Ok(())
    };
    // The chunk that holds `from_version`, if it starts before it.
    if from_version > 0 {
        let mut before =
            table.range((stream, 0)..(stream, from_version)).map_err(index("range stream"))?;
        if let Some(item) = before.next_back() {
            let (k, v) = item.map_err(index("read stream"))?;
            push_chunk(k.value().1, v.value(), &mut out)?;
        }
    }
    let range =
        table.range((stream, from_version)..=(stream, u64::MAX)).map_err(index("range stream"))?;
    for item in range {
        if out.len() >= max_count {
            break;
        }
        let (k, v) = item.map_err(index("read stream"))?;
        push_chunk(k.value().1, v.value(), &mut out)?;
    }
    Ok(out)
}

/// One event's index entries.
#[derive(Debug, Clone)]
pub(crate) struct IndexEntry {
    pub position: u64,
    pub stream: String,
    pub stream_version: u64,
    pub event_id: [u8; 16],
    /// Set for every [`OFFSET_INDEX_EVERY_EVENTS`]th position.
    pub locator: Option<Locator>,
}

/// The id's key in [`EVENT_IDS`].
pub(crate) fn id_key(event_id: &[u8; 16]) -> u128 {
    u128::from_be_bytes(*event_id)
}

/// The smallest id key whose UUIDv7 timestamp is `ms` (milliseconds since the epoch).
pub(crate) fn id_key_at_ms(ms: u64) -> u128 {
    u128::from(ms & 0xFFFF_FFFF_FFFF) << 80
}

/// Whether an id key is a UUIDv7 (version nibble 7, RFC 4122 variant).
pub(crate) fn is_uuid_v7(key: u128) -> bool {
    (key >> 76) & 0xF == 7 && (key >> 62) & 0b11 == 0b10
}

/// The UUIDv7 time of an id key (milliseconds since the epoch).
pub(crate) fn id_key_ms(key: u128) -> u64 {
    (key >> 80) as u64
}

fn put_varint128(out: &mut Vec<u8>, mut v: u128) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint128_len(v: u128) -> usize {
    (128 - v.leading_zeros() as usize).max(1).div_ceil(7)
}

/// Reads a LEB128 varint at `*at`; `None` if truncated or longer than a `u128`.
fn get_varint128(bytes: &[u8], at: &mut usize) -> Option<u128> {
    let mut v = 0u128;
    let mut shift = 0u32;
    loop {
        let b = *bytes.get(*at)?;
        *at += 1;
        if shift > 126 {
            return None;
        }
        v |= u128::from(b & 0x7F) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
}

fn zigzag(d: i128) -> u128 {
    ((d << 1) ^ (d >> 127)) as u128
}

fn unzigzag(v: u128) -> i128 {
    (v >> 1) as i128 ^ -((v & 1) as i128)
}

/// Bytes of a chunk's head: the first id key (16 bytes) and the first position (a varint of
/// at most 10 bytes).
const ID_CHUNK_HEAD_BYTES_MAX: usize = 16 + 10;

/// Builds the `event_id_chunks` values of ids sorted by key. A chunk: the first id key (16
/// bytes, big-endian) and its position (LEB128 varint); then for each next id the key's
/// delta to the previous one (varint, > 0) and the position's delta (zigzag varint). A chunk
/// ends at [`ID_CHUNK_MAX_EVENTS`] ids, at [`ID_CHUNK_MAX_BYTES`], or before an id more than
/// [`ID_CHUNK_SPAN_MS_MAX`] newer than its first one.
struct IdChunkBuilder {
    bytes: Vec<u8>,
    first_ms: u64,
    last_key: u128,
    last_position: u64,
    events: usize,
    done: Vec<(u128, Vec<u8>)>,
}

impl IdChunkBuilder {
    fn new() -> Self {
        Self {
            bytes: Vec::new(),
            first_ms: 0,
            last_key: 0,
            last_position: 0,
            events: 0,
            done: Vec::new(),
        }
    }

    /// Adds the next id (keys strictly ascending).
    fn push(&mut self, key: u128, position: u64) {
        debug_assert!(self.events == 0 && self.done.is_empty() || key > self.last_key);
        if self.events > 0 {
            let key_delta = key - self.last_key;
            let position_delta = zigzag(i128::from(position) - i128::from(self.last_position));
            let len = varint128_len(key_delta) + varint128_len(position_delta);
            if self.events < ID_CHUNK_MAX_EVENTS
                && self.bytes.len() + len <= ID_CHUNK_MAX_BYTES
                && id_key_ms(key) - self.first_ms <= ID_CHUNK_SPAN_MS_MAX
            {
                put_varint128(&mut self.bytes, key_delta);
                put_varint128(&mut self.bytes, position_delta);
                self.last_key = key;
                self.last_position = position;
                self.events += 1;
                return;
            }
            self.finish_chunk();
        }
        self.bytes.reserve(ID_CHUNK_HEAD_BYTES_MAX);
        self.bytes.extend_from_slice(&key.to_be_bytes());
        put_varint(&mut self.bytes, position);
        self.first_ms = id_key_ms(key);
        self.last_key = key;
        self.last_position = position;
        self.events = 1;
    }

    fn finish_chunk(&mut self) {
        if self.events > 0 {
            let bytes = std::mem::take(&mut self.bytes);
            debug_assert!(bytes.len() <= ID_CHUNK_MAX_BYTES);
            self.done.push((self.last_key, bytes));
            self.events = 0;
        }
    }

    /// The chunks: (largest key, value).
    fn finish(mut self) -> Vec<(u128, Vec<u8>)> {
        self.finish_chunk();
        self.done
    }
}

/// The ids and positions of an `event_id_chunks` value, in key order; `None` if malformed.
pub(crate) fn decode_id_chunk(bytes: &[u8]) -> Option<Vec<(u128, u64)>> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let mut key = u128::from_be_bytes(bytes.get(..16)?.try_into().ok()?);
    at += 16;
    let mut position = u64::try_from(get_varint128(bytes, &mut at)?).ok()?;
    out.push((key, position));
    while at < bytes.len() {
        let key_delta = get_varint128(bytes, &mut at)?;
        let position_delta = unzigzag(get_varint128(bytes, &mut at)?);
        key = key.checked_add(key_delta).filter(|_| key_delta > 0)?;
        position = u64::try_from(i128::from(position) + position_delta).ok()?;
        out.push((key, position));
    }
    Some(out)
}

/// The position of `key` in an `event_id_chunks` value (`Ok(None)`: not there); `Err` if the
/// chunk is malformed. Stops at the first larger key.
fn find_in_id_chunk(bytes: &[u8], key: u128) -> std::result::Result<Option<u64>, ()> {
    let mut at = 0usize;
    let mut current = u128::from_be_bytes(bytes.get(..16).ok_or(())?.try_into().map_err(|_| ())?);
    at += 16;
    let mut position = get_varint128(bytes, &mut at).ok_or(())? as i128;
    loop {
        if current == key {
            return u64::try_from(position).map(Some).map_err(|_| ());
        }
        if current > key || at >= bytes.len() {
            return Ok(None);
        }
        let key_delta = get_varint128(bytes, &mut at).ok_or(())?;
        let position_delta = unzigzag(get_varint128(bytes, &mut at).ok_or(())?);
        if key_delta == 0 {
            return Err(());
        }
        current = current.checked_add(key_delta).ok_or(())?;
        position += position_delta;
    }
}

/// The dedup index as one read transaction sees it: `event_ids` and `event_id_chunks`.
pub(crate) struct IdIndex {
    ids: redb::ReadOnlyTable<u128, u64>,
    chunks: redb::ReadOnlyTable<u128, &'static [u8]>,
}

impl std::fmt::Debug for IdIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdIndex").finish_non_exhaustive()
    }
}

impl IdIndex {
    pub(crate) fn open(db: &redb::Database) -> Result<Self> {
        let txn = db.begin_read().map_err(index("begin read"))?;
        Ok(Self {
            ids: txn.open_table(EVENT_IDS).map_err(index("open event_ids"))?,
            chunks: txn.open_table(EVENT_ID_CHUNKS).map_err(index("open event_id_chunks"))?,
        })
    }

    /// The position the index holds for an id key.
    pub(crate) fn get(&self, key: u128) -> Result<Option<u64>> {
        if let Some(position) = self.ids.get(key).map_err(index("get id"))? {
            return Ok(Some(position.value()));
        }
        if !is_uuid_v7(key) {
            return Ok(None);
        }
        let mut range = self.chunks.range(key..).map_err(index("range id chunks"))?;
        let Some(item) = range.next() else { return Ok(None) };
        let (last, chunk) = item.map_err(index("read id chunk"))?;
        find_in_id_chunk(chunk.value(), key).map_err(|()| Error::Index {
            op: "read id chunk",
            message: format!("malformed id chunk ending at {:032x}", last.value()),
        })
    }

    /// Chunks held in `event_id_chunks`.
    pub(crate) fn chunk_count(&self) -> Result<u64> {
        self.chunks.len().map_err(index("count id chunks"))
    }

    /// The largest id key held.
    pub(crate) fn max_key(&self) -> Result<Option<u128>> {
        let ids = self.ids.last().map_err(index("last id"))?.map(|(k, _)| k.value());
        let chunks = self.chunks.last().map_err(index("last id chunk"))?.map(|(k, _)| k.value());
        Ok(ids.max(chunks))
    }
}

/// Creates the tables if missing (a durable commit, so only when needed).
pub(crate) fn init(db: &redb::Database) -> Result<()> {
    {
        let txn = db.begin_read().map_err(index("begin read"))?;
        let present = txn.open_table(META).is_ok()
            && txn.open_table(STREAMS).is_ok()
            && txn.open_table(STREAM_CHUNKS).is_ok()
            && txn.open_table(EVENT_IDS).is_ok()
            && txn.open_table(EVENT_ID_CHUNKS).is_ok()
            && txn.open_table(CURSORS).is_ok()
            && txn.open_table(OFFSETS).is_ok();
        if present {
            return Ok(());
        }
    }
    let txn = db.begin_write().map_err(index("begin"))?;
    {
        txn.open_table(META).map_err(index("open meta"))?;
        txn.open_table(STREAMS).map_err(index("open streams"))?;
        txn.open_table(STREAM_CHUNKS).map_err(index("open stream_chunks"))?;
        txn.open_table(EVENT_IDS).map_err(index("open event_ids"))?;
        txn.open_table(EVENT_ID_CHUNKS).map_err(index("open event_id_chunks"))?;
        txn.open_table(CURSORS).map_err(index("open cursors"))?;
        txn.open_table(OFFSETS).map_err(index("open offsets"))?;
    }
    txn.commit().map_err(index("commit"))?;
    Ok(())
}

pub(crate) fn read_checkpoint(db: &redb::Database) -> Result<Option<Checkpoint>> {
    let txn = db.begin_read().map_err(index("begin read"))?;
    let table = txn.open_table(META).map_err(index("open meta"))?;
    let value = table.get(CHECKPOINT_KEY).map_err(index("get checkpoint"))?;
    Ok(value.and_then(|v| Checkpoint::decode(v.value())))
}

/// What an index write prunes (a durable checkpoint prunes; other writes do not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Prune {
    /// Dedup entries whose UUIDv7 time is older than this go (the age bound of the window).
    pub ids_below_ms: Option<u64>,
    /// Most `event_id_chunks` entries kept: the oldest beyond it go (the count bound).
    pub id_chunks_max: u64,
    /// Stream chunks and offsets of positions below this go (compacted).
    pub streams_below: Option<u64>,
}

impl Prune {
    /// Prunes nothing.
    pub(crate) const NOTHING: Prune =
        Prune { ids_below_ms: None, id_chunks_max: u64::MAX, streams_below: None };
}

/// Writes entries and a checkpoint in one transaction; `durable` decides the commit kind.
/// UUIDv7 ids above every chunk already written (and at most [`DEDUP_ID_AHEAD_MS_MAX`]
/// ahead of `now_ms`) go into new `event_id_chunks`, every other id into `event_ids`.
/// Returns how many id chunks the index holds after it.
pub(crate) fn write_batch(
    db: &redb::Database,
    entries: &[IndexEntry],
    checkpoint: &Checkpoint,
    durable: bool,
    now_ms: u64,
    prune: &Prune,
) -> Result<u64> {
    let mut txn = db.begin_write().map_err(index("begin write"))?;
    let id_chunks_held;
    if durable {
        // Saves the allocator state with each checkpoint: reopening after a crash then needs no
        // walk of the whole index.
        txn.set_quick_repair(true);
    } else {
        txn.set_durability(redb::Durability::None).map_err(index("set durability"))?;
    }
    {
        let mut streams = txn.open_table(STREAMS).map_err(index("open streams"))?;
        let mut stream_chunks =
            txn.open_table(STREAM_CHUNKS).map_err(index("open stream_chunks"))?;
        let mut ids = txn.open_table(EVENT_IDS).map_err(index("open event_ids"))?;
        let mut id_chunks =
            txn.open_table(EVENT_ID_CHUNKS).map_err(index("open event_id_chunks"))?;
        let mut offsets = txn.open_table(OFFSETS).map_err(index("open offsets"))?;
        // Chunks never overlap: only ids above the largest chunked key start new ones.
        let chunked_max = id_chunks.last().map_err(index("last id chunk"))?.map(|(k, _)| k.value());
        let chunkable_max =
            id_key_at_ms(now_ms.saturating_add(DEDUP_ID_AHEAD_MS_MAX + 1)).saturating_sub(1);
        let mut chunked: Vec<(u128, u64)> = Vec::with_capacity(entries.len());
        for entry in entries {
            if let Some(locator) = &entry.locator {
                offsets
                    .insert(entry.position, locator.encode().as_slice())
                    .map_err(index("insert offset"))?;
            }
            let key = id_key(&entry.event_id);
            if is_uuid_v7(key) && chunked_max.is_none_or(|max| key > max) && key <= chunkable_max {
                chunked.push((key, entry.position));
            } else {
                ids.insert(key, entry.position).map_err(index("insert id"))?;
            }
        }
        chunked.sort_unstable();
        let mut builder = IdChunkBuilder::new();
        for (key, position) in chunked {
            builder.push(key, position);
        }
        for (last, chunk) in builder.finish() {
            // Paired with the read: what is written decodes, and ends at its key.
            debug_assert_eq!(
                decode_id_chunk(&chunk).and_then(|c| c.last().map(|e| e.0)),
                Some(last)
            );
            id_chunks.insert(last, chunk.as_slice()).map_err(index("insert id chunk"))?;
        }
        // Stream entries: one chunk per run of consecutive versions of a stream.
        let mut open: std::collections::HashMap<&str, ChunkBuilder> =
            std::collections::HashMap::new();
        let mut done: Vec<(&str, ChunkBuilder)> = Vec::new();
        for entry in entries {
            let stream = entry.stream.as_str();
            if let Some(chunk) = open.get_mut(stream) {
                if chunk.last + 1 == entry.stream_version
                    && entry.position > chunk.last_position
                    && chunk.last + 1 - chunk.first < STREAM_CHUNK_MAX_EVENTS
                {
                    put_varint(&mut chunk.bytes, entry.position - chunk.last_position);
                    chunk.last = entry.stream_version;
                    chunk.last_position = entry.position;
                    continue;
                }
                let full = open.remove(stream).expect("present");
                done.push((stream, full));
            }
            let mut bytes = Vec::with_capacity(64);
            put_varint(&mut bytes, entry.position);
            open.insert(
                stream,
                ChunkBuilder {
                    first: entry.stream_version,
                    last: entry.stream_version,
                    last_position: entry.position,
                    bytes,
                },
            );
        }
        done.extend(open);
        for (stream, chunk) in &done {
            stream_chunks
                .insert((*stream, chunk.first), chunk.bytes.as_slice())
                .map_err(index("insert stream chunk"))?;
        }
        // Last version per stream: entries come in position order, so the last one wins.
        let mut last: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
        for entry in entries {
            last.insert(&entry.stream, entry.stream_version);
        }
        for (stream, version) in last {
            let current = streams.get(stream).map_err(index("get stream"))?.map(|v| v.value());
            if current.is_none_or(|c| c < version) {
                streams.insert(stream, version).map_err(index("insert stream"))?;
            }
        }
        if let Some(ms) = prune.ids_below_ms {
            // Only UUIDv7 ids carry a time; other ids are kept (see docs/FORMATS.md).
            ids.retain_in(..id_key_at_ms(ms), |k, _| !is_uuid_v7(k)).map_err(index("prune ids"))?;
            // A chunk goes once its newest id is out of the window.
            id_chunks
                .retain_in(..id_key_at_ms(ms), |_, _| false)
                .map_err(index("prune id chunks"))?;
        }
        let held = id_chunks.len().map_err(index("count id chunks"))?;
        for _ in prune.id_chunks_max..held {
            id_chunks.pop_first().map_err(index("prune id chunks"))?;
        }
        id_chunks_held = held.min(prune.id_chunks_max);
        if let Some(floor) = prune.streams_below {
            offsets.retain_in(..floor, |_, _| false).map_err(index("prune offsets"))?;
            let names: Vec<String> = streams
                .iter()
                .map_err(index("list streams"))?
                .filter_map(|r| r.ok().map(|(k, _)| k.value().to_owned()))
                .collect();
            for name in names {
                // A chunk goes when its last position is compacted away; a chunk that
                // straddles the floor stays (reads skip its compacted positions).
                stream_chunks
                    .retain_in((name.as_str(), 0)..=(name.as_str(), u64::MAX), |_, chunk| {
                        decode_chunk(chunk)
                            .and_then(|p| p.last().copied())
                            .is_some_and(|p| p >= floor)
                    })
                    .map_err(index("prune stream chunks"))?;
            }
        }
        let mut meta = txn.open_table(META).map_err(index("open meta"))?;
        meta.insert(CHECKPOINT_KEY, checkpoint.encode().as_slice())
            .map_err(index("insert checkpoint"))?;
    }
    txn.commit().map_err(index("commit"))?;
    Ok(id_chunks_held)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_round_trip() {
        let mut bytes = Vec::new();
        put_varint(&mut bytes, 1_000_000);
        for d in [1u64, 64, 300, 1 << 40] {
            put_varint(&mut bytes, d);
        }
        assert_eq!(
            decode_chunk(&bytes),
            Some(vec![1_000_000, 1_000_001, 1_000_065, 1_000_365, 1_000_365 + (1 << 40)])
        );
        assert_eq!(decode_chunk(&[0x80]), None);
    }

    /// A UUIDv7 id key at `ms` with random bits from `rng`.
    fn v7_key(ms: u64, rng: &mut u64) -> u128 {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        let random = ((u128::from(*rng) << 64)
            | u128::from(rng.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
            & ((1u128 << 80) - 1);
        let key = id_key_at_ms(ms) | random;
        let key = (key & !(0xFu128 << 76)) | (7u128 << 76);
        (key & !(0b11u128 << 62)) | (0b10u128 << 62)
    }

    fn v7_keys(n: usize, first_ms: u64, per_ms: usize, rng: &mut u64) -> Vec<u128> {
        let mut keys: Vec<u128> =
            (0..n).map(|i| v7_key(first_ms + (i / per_ms) as u64, rng)).collect();
        keys.sort_unstable();
        keys.dedup();
        keys
    }

    #[test]
    fn id_chunks_round_trip_within_their_bounds() {
        let mut rng = 0x1234_5678_9abc_def0u64;
        let keys = v7_keys(20_000, 1_700_000_000_000, 100, &mut rng);
        let mut builder = IdChunkBuilder::new();
        // Positions near key order, as from many interleaved writers.
        let positions: Vec<u64> = (0..keys.len() as u64).map(|i| 1_000_000 + (i ^ 0x2F)).collect();
        for (key, position) in keys.iter().zip(&positions) {
            builder.push(*key, *position);
        }
        let chunks = builder.finish();
        assert!(chunks.len() >= 20_000 / ID_CHUNK_MAX_EVENTS, "{} chunks", chunks.len());
        let mut decoded = Vec::new();
        let mut bytes = 0;
        for (last, chunk) in &chunks {
            assert!(chunk.len() <= ID_CHUNK_MAX_BYTES);
            let entries = decode_id_chunk(chunk).unwrap();
            assert!(entries.len() <= ID_CHUNK_MAX_EVENTS);
            assert_eq!(entries.last().unwrap().0, *last);
            assert!(id_key_ms(*last) - id_key_ms(entries[0].0) <= ID_CHUNK_SPAN_MS_MAX);
            bytes += chunk.len();
            decoded.extend(entries);
        }
        let expected: Vec<(u128, u64)> = keys.iter().copied().zip(positions).collect();
        assert_eq!(decoded, expected);
        // About 12 bytes per random id (10 of key delta, 2 of position delta).
        let per_id = bytes as f64 / keys.len() as f64;
        assert!(per_id < 13.0, "{per_id} bytes per id");
        // Every id is found in the first chunk whose key is not below it; nothing else is.
        for (key, position) in expected.iter().step_by(7) {
            let at = chunks.partition_point(|(last, _)| last < key);
            assert_eq!(find_in_id_chunk(&chunks[at].1, *key), Ok(Some(*position)));
            assert_eq!(find_in_id_chunk(&chunks[at].1, key + 1), Ok(None));
        }
        assert_eq!(find_in_id_chunk(&chunks[0].1, keys[0] - 1), Ok(None));
        assert_eq!(decode_id_chunk(&chunks[0].1[..20]), None);
        assert_eq!(find_in_id_chunk(&[0; 8], 5), Err(()));
    }

    #[test]
    fn id_chunks_split_at_their_time_span() {
        let mut rng = 7u64;
        let mut builder = IdChunkBuilder::new();
        let old = v7_key(1_000, &mut rng);
        let fresh = v7_key(1_000 + ID_CHUNK_SPAN_MS_MAX + 1, &mut rng);
        builder.push(old, 1);
        builder.push(fresh, 2);
        let chunks = builder.finish();
        assert_eq!(chunks.len(), 2);
        assert_eq!((chunks[0].0, chunks[1].0), (old, fresh));
    }

    fn entry(key: u128, position: u64) -> IndexEntry {
        IndexEntry {
            position,
            stream: "s".into(),
            stream_version: position,
            event_id: key.to_be_bytes(),
            locator: None,
        }
    }

    #[test]
    fn dedup_index_takes_late_and_other_ids_singly_and_prunes_by_age_and_count() {
        let db = redb::Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .unwrap();
        init(&db).unwrap();
        let now_ms = 1_700_000_000_000u64;
        let mut rng = 99u64;
        let checkpoint =
            Checkpoint { position: 0, hash: [0; 32], segment_first: 1, next_offset: 64 };
        // Three writes of ids a second apart; then a late id, a non-UUIDv7 id, a future one.
        let mut all = Vec::new();
        let mut position = 0;
        for second in 0..3 {
            let keys = v7_keys(5_000, now_ms + second * 1_000, 5, &mut rng);
            let entries: Vec<IndexEntry> = keys
                .iter()
                .map(|&k| {
                    position += 1;
                    all.push((k, position));
                    entry(k, position)
                })
                .collect();
            write_batch(&db, &entries, &checkpoint, false, now_ms, &Prune::NOTHING).unwrap();
        }
        let late = v7_key(now_ms + 500, &mut rng);
        let other = 0x42u128;
        let future = v7_key(now_ms + DEDUP_ID_AHEAD_MS_MAX + 10_000, &mut rng);
        let odd: Vec<IndexEntry> = [late, other, future]
            .iter()
            .enumerate()
            .map(|(i, &k)| entry(k, 20_000 + i as u64))
            .collect();
        let held = write_batch(&db, &odd, &checkpoint, true, now_ms, &Prune::NOTHING).unwrap();
        all.extend([(late, 20_000), (other, 20_001), (future, 20_002)]);
        let ids = IdIndex::open(&db).unwrap();
        assert_eq!(ids.chunk_count().unwrap(), held);
        assert!(held >= 15_000 / ID_CHUNK_MAX_EVENTS as u64);
        for (key, position) in &all {
            assert_eq!(ids.get(*key).unwrap(), Some(*position), "{key:032x}");
        }
        assert_eq!(ids.get(late + 1).unwrap(), None);
        assert_eq!(ids.max_key().unwrap(), Some(future));
        {
            let txn = db.begin_read().unwrap();
            let singles = txn.open_table(EVENT_IDS).unwrap();
            assert_eq!(singles.len().unwrap(), 3, "late, other and future ids go in event_ids");
        }
        drop(ids);
        // Age: everything before the third second goes, except the non-UUIDv7 id.
        let prune = Prune {
            ids_below_ms: Some(now_ms + 2_000),
            id_chunks_max: u64::MAX,
            streams_below: None,
        };
        write_batch(&db, &[], &checkpoint, true, now_ms, &prune).unwrap();
        let ids = IdIndex::open(&db).unwrap();
        for (key, position) in &all {
            let kept = *key == other || id_key_ms(*key) >= now_ms + 2_000;
            assert_eq!(ids.get(*key).unwrap(), kept.then_some(*position), "{key:032x}");
        }
        drop(ids);
        // Count: only the newest chunk stays.
        let prune = Prune { ids_below_ms: None, id_chunks_max: 1, streams_below: None };
        assert_eq!(write_batch(&db, &[], &checkpoint, false, now_ms, &prune).unwrap(), 1);
        let ids = IdIndex::open(&db).unwrap();
        let (newest, position) = all[14_999];
        assert_eq!(ids.get(newest).unwrap(), Some(position));
        assert_eq!(ids.chunk_count().unwrap(), 1);
    }

    #[test]
    fn checkpoint_round_trips_and_id_keys_are_time_ordered() {
        let c = Checkpoint { position: 9, hash: [3; 32], segment_first: 1, next_offset: 640 };
        assert_eq!(Checkpoint::decode(&c.encode()), Some(c));
        assert_eq!(Checkpoint::decode(&[0; 3]), None);
        let mut early = [0xffu8; 16];
        early[..6].copy_from_slice(&1000u64.to_be_bytes()[2..]);
        assert!(id_key(&early) < id_key_at_ms(1001));
        assert!(id_key(&early) >= id_key_at_ms(1000));
        assert!(!is_uuid_v7(id_key(&early)));
        let v7: u128 = 0x0190_0000_0000_7000_8000_0000_0000_0000;
        assert!(is_uuid_v7(v7));
    }
}
