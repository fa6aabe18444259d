//! The redb index beside the log: stream -> positions, event id -> position, stream versions,
//! cursors and the checkpoint that says how much of the log the index covers.

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::{Result, index};
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
/// `event_ids`: event id as a big-endian u128 (time-ordered for UUIDv7) -> position.
pub(crate) const EVENT_IDS: TableDefinition<'_, u128, u64> = TableDefinition::new("event_ids");
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

/// Creates the tables if missing (a durable commit, so only when needed).
pub(crate) fn init(db: &redb::Database) -> Result<()> {
    {
        let txn = db.begin_read().map_err(index("begin read"))?;
        let present = txn.open_table(META).is_ok()
            && txn.open_table(STREAMS).is_ok()
            && txn.open_table(STREAM_CHUNKS).is_ok()
            && txn.open_table(EVENT_IDS).is_ok()
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

/// Writes entries and a checkpoint in one transaction; `durable` decides the commit kind.
/// `prune_ids_below_ms` removes dedup entries older than that (UUIDv7 time);
/// `prune_streams_below` removes stream entries of compacted positions.
pub(crate) fn write_batch(
    db: &redb::Database,
    entries: &[IndexEntry],
    checkpoint: &Checkpoint,
    durable: bool,
    prune_ids_below_ms: Option<u64>,
    prune_streams_below: Option<u64>,
) -> Result<()> {
    let mut txn = db.begin_write().map_err(index("begin write"))?;
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
        let mut offsets = txn.open_table(OFFSETS).map_err(index("open offsets"))?;
        for entry in entries {
            if let Some(locator) = &entry.locator {
                offsets
                    .insert(entry.position, locator.encode().as_slice())
                    .map_err(index("insert offset"))?;
            }
            ids.insert(id_key(&entry.event_id), entry.position).map_err(index("insert id"))?;
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
        if let Some(ms) = prune_ids_below_ms {
            // Only UUIDv7 ids carry a time; other ids are kept (see docs/FORMATS.md).
            ids.retain_in(..id_key_at_ms(ms), |k, _| !is_uuid_v7(k)).map_err(index("prune ids"))?;
        }
        if let Some(floor) = prune_streams_below {
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
    Ok(())
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
