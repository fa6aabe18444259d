//! The on-disk record and segment header formats, and the chain hash (see `docs/FORMATS.md`).

use sha2::{Digest, Sha256};

/// A SHA-256 chain hash.
pub type Hash = [u8; 32];

/// The hash before the first event (position 0): all zeros.
pub const GENESIS_HASH: Hash = [0; 32];

/// Bytes before a record's body: `u32` body length and `u32` CRC-32 of the body.
pub const RECORD_PREFIX_BYTES: usize = 8;
/// Smallest possible record body: one-byte varints, empty stream, kind and payload.
pub const RECORD_MIN_BODY_BYTES: usize = 1 + 1 + 16 + 1 + 1 + 1 + 1 + 32;
/// Largest encoding of the fixed fields (varints at their longest) besides stream, kind and
/// payload: `stream_version` and `timestamp_ms` up to 10 bytes, `payload_len` up to 5.
pub const RECORD_MAX_FIXED_BODY_BYTES: usize = 10 + 10 + 16 + 1 + 1 + 1 + 5 + 32;
/// Record flag: more records of the same atomic batch follow this one.
pub const FLAG_BATCH_CONTINUES: u8 = 1;

/// Segment file header size; records start right after it.
pub const SEGMENT_HEADER_BYTES: usize = 64;
/// Magic at the start of every segment file.
pub const SEGMENT_MAGIC: &[u8; 8] = b"KEELSEG2";
/// Version of the segment and record format the writer writes: 3 = every write ends with an
/// end marker, and the file may be a recycled segment holding stale bytes past it (see
/// `docs/FORMATS.md`). Version 2 segments (zero-filled, same records) are still read.
pub const SEGMENT_FORMAT_VERSION: u32 = 3;
/// Segment format versions this build reads.
pub const SEGMENT_FORMAT_VERSIONS_READ: [u32; 2] = [2, 3];
/// Bytes of the end marker written after the last record of every write: an all-zero record
/// prefix (`body_len` = 0, CRC 0).
pub const END_MARKER_BYTES: usize = RECORD_PREFIX_BYTES;

/// Domain tag at the start of every hash input.
const HASH_DOMAIN: &[u8] = b"keel.event.v1";

/// One committed event, as stored and as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Global position, dense from 1.
    pub position: u64,
    /// The stream it belongs to.
    pub stream: String,
    /// Its version within the stream, dense from 1.
    pub stream_version: u64,
    /// The caller's id (a UUIDv7 by convention), the idempotency key.
    pub event_id: [u8; 16],
    /// An application-defined kind, e.g. `"plan.updated"`.
    pub kind: String,
    /// Milliseconds since the Unix epoch, stamped by the log's writer.
    pub timestamp_ms: u64,
    /// Opaque payload bytes.
    pub payload: Vec<u8>,
    /// Hash of the event at `position - 1` (or the compaction anchor's).
    pub prev_hash: Hash,
    /// SHA-256 over the canonical encoding of `prev_hash` and the fields above.
    pub hash: Hash,
}

/// The canonical hash of an event: SHA-256 over `domain, prev_hash, position, stream,
/// stream_version, event_id, kind, timestamp_ms, payload`, each field written as a `u32`
/// little-endian byte length followed by its bytes (integers as 8 bytes little-endian).
#[allow(clippy::too_many_arguments)]
pub fn event_hash(
    prev_hash: &Hash,
    position: u64,
    stream: &str,
    stream_version: u64,
    event_id: &[u8; 16],
    kind: &str,
    timestamp_ms: u64,
    payload: &[u8],
) -> Hash {
    let mut hasher = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u32).to_le_bytes());
        hasher.update(bytes);
    };
    field(HASH_DOMAIN);
    field(prev_hash);
    field(&position.to_le_bytes());
    field(stream.as_bytes());
    field(&stream_version.to_le_bytes());
    field(event_id);
    field(kind.as_bytes());
    field(&timestamp_ms.to_le_bytes());
    field(payload);
    hasher.finalize().into()
}

impl Event {
    /// Recomputes this event's hash from its fields and `prev_hash`.
    pub fn compute_hash(&self) -> Hash {
        event_hash(
            &self.prev_hash,
            self.position,
            &self.stream,
            self.stream_version,
            &self.event_id,
            &self.kind,
            self.timestamp_ms,
            &self.payload,
        )
    }
}

/// Largest size of a whole encoded record (prefix + body) with these fields, whatever its
/// version and timestamp: the size limits are checked against it.
pub fn record_len(stream: &str, kind: &str, payload_len: usize) -> usize {
    RECORD_PREFIX_BYTES + RECORD_MAX_FIXED_BODY_BYTES + stream.len() + kind.len() + payload_len
}

/// Exact size of the encoded record of `event` (prefix + body).
pub fn encoded_len(event: &Event) -> usize {
    RECORD_PREFIX_BYTES
        + varint_len(event.stream_version)
        + varint_len(event.timestamp_ms)
        + 16
        + 1
        + 1
        + event.stream.len()
        + 1
        + event.kind.len()
        + varint_len(event.payload.len() as u64)
        + event.payload.len()
        + 32
}

/// Bytes of the LEB128 encoding of `v`.
pub fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The fields of one record, borrowed (the writer encodes without building an [`Event`]).
#[derive(Debug, Clone, Copy)]
pub struct RecordFields<'a> {
    /// Its stream.
    pub stream: &'a str,
    /// Its version within the stream.
    pub stream_version: u64,
    /// The caller's id.
    pub event_id: &'a [u8; 16],
    /// The kind.
    pub kind: &'a str,
    /// Writer timestamp, Unix milliseconds.
    pub timestamp_ms: u64,
    /// The payload.
    pub payload: &'a [u8],
    /// The chain hash of this event.
    pub hash: &'a Hash,
}

/// Appends the encoding of `event` to `out` (its position is not stored: it is implied by the
/// record's place in the segment).
pub fn encode_record(event: &Event, flags: u8, out: &mut Vec<u8>) {
    encode_fields(
        &RecordFields {
            stream: &event.stream,
            stream_version: event.stream_version,
            event_id: &event.event_id,
            kind: &event.kind,
            timestamp_ms: event.timestamp_ms,
            payload: &event.payload,
            hash: &event.hash,
        },
        flags,
        out,
    );
}

/// Appends the encoding of one record to `out`.
pub fn encode_fields(f: &RecordFields<'_>, flags: u8, out: &mut Vec<u8>) {
    let start = out.len();
    out.reserve(
        RECORD_PREFIX_BYTES
            + RECORD_MAX_FIXED_BODY_BYTES
            + f.stream.len()
            + f.kind.len()
            + f.payload.len(),
    );
    out.extend_from_slice(&[0; RECORD_PREFIX_BYTES]);
    put_varint(out, f.stream_version);
    put_varint(out, f.timestamp_ms);
    out.extend_from_slice(f.event_id);
    out.push(flags);
    out.push(f.stream.len() as u8);
    out.extend_from_slice(f.stream.as_bytes());
    out.push(f.kind.len() as u8);
    out.extend_from_slice(f.kind.as_bytes());
    put_varint(out, f.payload.len() as u64);
    out.extend_from_slice(f.payload);
    out.extend_from_slice(f.hash);
    let body_len = out.len() - start - RECORD_PREFIX_BYTES;
    let crc = crc32fast::hash(&out[start + RECORD_PREFIX_BYTES..]);
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// What a record prefix says about the bytes that follow it.
#[derive(Debug, PartialEq, Eq)]
pub enum Prefix {
    /// All-zero prefix: the end of the written part of a preallocated segment.
    End,
    /// A body of this many bytes with this CRC follows.
    Body { body_len: usize, crc: u32 },
}

/// Parses a record prefix; `None` if the length is impossible (`> max_body_bytes`).
pub fn parse_prefix(prefix: &[u8; RECORD_PREFIX_BYTES], max_body_bytes: usize) -> Option<Prefix> {
    let body_len = u32::from_le_bytes(prefix[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(prefix[4..8].try_into().expect("4 bytes"));
    if body_len == 0 && crc == 0 {
        return Some(Prefix::End);
    }
    if !(RECORD_MIN_BODY_BYTES..=max_body_bytes).contains(&body_len) {
        return None;
    }
    Some(Prefix::Body { body_len, crc })
}

/// A decoded record body (without `prev_hash`, which is not stored).
#[derive(Debug)]
pub struct DecodedRecord {
    /// The event (its `prev_hash` zeroed; the caller fills it in).
    pub event: Event,
    /// Record flags.
    pub flags: u8,
}

/// A record body decoded in place: its fields borrow the bytes read (the recovery scan reads
/// every record of the tail, and allocates only what it keeps).
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    pub stream_version: u64,
    pub timestamp_ms: u64,
    pub event_id: [u8; 16],
    pub flags: u8,
    pub stream: &'a str,
    pub kind: &'a str,
    pub payload: &'a [u8],
    pub hash: Hash,
}

impl RecordView<'_> {
    /// The hash this record must have at `position` after a record hashed `prev_hash`.
    pub fn expected_hash(&self, prev_hash: &Hash, position: u64) -> Hash {
        event_hash(
            prev_hash,
            position,
            self.stream,
            self.stream_version,
            &self.event_id,
            self.kind,
            self.timestamp_ms,
            self.payload,
        )
    }

    /// The owned event at `position` (its `prev_hash` zeroed; the caller fills it in).
    pub fn to_record(&self, position: u64) -> DecodedRecord {
        DecodedRecord {
            event: Event {
                position,
                stream: self.stream.to_owned(),
                stream_version: self.stream_version,
                event_id: self.event_id,
                kind: self.kind.to_owned(),
                timestamp_ms: self.timestamp_ms,
                payload: self.payload.to_vec(),
                prev_hash: GENESIS_HASH,
                hash: self.hash,
            },
            flags: self.flags,
        }
    }
}

/// Decodes a record body whose CRC has been checked, in place; `None` if it is malformed.
pub fn decode_view(body: &[u8]) -> Option<RecordView<'_>> {
    let mut r = Cursor { body, at: 0 };
    let stream_version = r.varint()?;
    let timestamp_ms = r.varint()?;
    let event_id: [u8; 16] = r.take(16)?.try_into().ok()?;
    let flags = r.take(1)?[0];
    let stream_len = r.take(1)?[0] as usize;
    let stream = std::str::from_utf8(r.take(stream_len)?).ok()?;
    let kind_len = r.take(1)?[0] as usize;
    let kind = std::str::from_utf8(r.take(kind_len)?).ok()?;
    let payload_len = usize::try_from(r.varint()?).ok()?;
    let payload = r.take(payload_len)?;
    let hash: Hash = r.take(32)?.try_into().ok()?;
    if r.at != body.len() {
        return None;
    }
    Some(RecordView { stream_version, timestamp_ms, event_id, flags, stream, kind, payload, hash })
}

/// Decodes a record body whose CRC has been checked, at `position` (the place of the record in
/// its segment: the segment's first position plus the records before it); `None` if it is
/// malformed.
pub fn decode_body(body: &[u8], position: u64) -> Option<DecodedRecord> {
    decode_view(body).map(|view| view.to_record(position))
}

struct Cursor<'a> {
    body: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let slice = self.body.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(slice)
    }

    /// A canonical LEB128 `u64` (no redundant trailing zero groups, no overflow).
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.take(1)?[0];
            if i == 9 && b > 1 {
                return None;
            }
            v |= u64::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    return None;
                }
                return Some(v);
            }
        }
        None
    }
}

/// A segment file header: the first position the segment holds and the hash before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Position of the first record in the segment.
    pub first_position: u64,
    /// Hash of the event at `first_position - 1` (the chain anchor of this segment).
    pub prev_hash: Hash,
}

impl SegmentHeader {
    /// Encodes the header (64 bytes).
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES] {
        let mut out = [0u8; SEGMENT_HEADER_BYTES];
        out[0..8].copy_from_slice(SEGMENT_MAGIC);
        out[8..12].copy_from_slice(&SEGMENT_FORMAT_VERSION.to_le_bytes());
        out[16..24].copy_from_slice(&self.first_position.to_le_bytes());
        out[24..56].copy_from_slice(&self.prev_hash);
        let crc = crc32fast::hash(&out[0..56]);
        out[56..60].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and checks a header.
    pub fn decode(bytes: &[u8; SEGMENT_HEADER_BYTES]) -> Option<Self> {
        if &bytes[0..8] != SEGMENT_MAGIC {
            return None;
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().ok()?);
        if !SEGMENT_FORMAT_VERSIONS_READ.contains(&version) {
            return None;
        }
        let crc = u32::from_le_bytes(bytes[56..60].try_into().ok()?);
        if crc != crc32fast::hash(&bytes[0..56]) {
            return None;
        }
        Some(Self {
            first_position: u64::from_le_bytes(bytes[16..24].try_into().ok()?),
            prev_hash: bytes[24..56].try_into().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Event {
        let mut e = Event {
            position: 7,
            stream: "arm-1".into(),
            stream_version: 3,
            event_id: [9; 16],
            kind: "plan".into(),
            timestamp_ms: 1_700_000_000_000,
            payload: b"hello".to_vec(),
            prev_hash: [1; 32],
            hash: [0; 32],
        };
        e.hash = e.compute_hash();
        e
    }

    #[test]
    fn record_round_trips_and_crc_covers_every_body_byte() {
        let e = sample();
        let mut buf = Vec::new();
        encode_record(&e, FLAG_BATCH_CONTINUES, &mut buf);
        assert_eq!(buf.len(), encoded_len(&e));
        assert!(buf.len() <= record_len("arm-1", "plan", 5));
        let prefix: [u8; 8] = buf[..8].try_into().unwrap();
        let Some(Prefix::Body { body_len, crc }) = parse_prefix(&prefix, 1 << 20) else {
            panic!("bad prefix")
        };
        assert_eq!(crc, crc32fast::hash(&buf[8..8 + body_len]));
        let decoded = decode_body(&buf[8..], 7).unwrap();
        assert_eq!(decoded.flags, FLAG_BATCH_CONTINUES);
        assert_eq!(Event { prev_hash: e.prev_hash, ..decoded.event }, e);
        for i in 8..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            assert_ne!(crc32fast::hash(&bad[8..]), crc, "byte {i}");
        }
    }

    #[test]
    fn varints_round_trip_at_every_length() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, 1_700_000_000_000, u64::MAX] {
            let mut e = sample();
            e.stream_version = v;
            e.timestamp_ms = v;
            let mut buf = Vec::new();
            encode_record(&e, 0, &mut buf);
            assert_eq!(buf.len(), encoded_len(&e), "{v}");
            let mut one = Vec::new();
            put_varint(&mut one, v);
            assert_eq!(varint_len(v), one.len(), "{v}");
            let decoded = decode_body(&buf[8..], 7).unwrap();
            assert_eq!(decoded.event.stream_version, v);
            assert_eq!(decoded.event.timestamp_ms, v);
        }
        // A non-canonical varint (a redundant zero group) is malformed.
        let mut buf = Vec::new();
        encode_record(&sample(), 0, &mut buf);
        let mut body = buf[8..].to_vec();
        body[0] |= 0x80;
        body.insert(1, 0);
        assert!(decode_body(&body, 7).is_none());
    }

    #[test]
    fn hash_is_length_prefixed() {
        // Moving a byte between adjacent fields must change the hash.
        let a = event_hash(&[0; 32], 1, "ab", 1, &[0; 16], "c", 0, b"");
        let b = event_hash(&[0; 32], 1, "a", 1, &[0; 16], "bc", 0, b"");
        assert_ne!(a, b);
    }

    #[test]
    fn zero_prefix_is_end_and_header_round_trips() {
        assert_eq!(parse_prefix(&[0; 8], 100), Some(Prefix::End));
        assert_eq!(parse_prefix(&[1, 0, 0, 0, 0, 0, 0, 0], 100), None);
        let h = SegmentHeader { first_position: 42, prev_hash: [7; 32] };
        assert_eq!(SegmentHeader::decode(&h.encode()), Some(h));
        let mut bad = h.encode();
        bad[30] ^= 1;
        assert_eq!(SegmentHeader::decode(&bad), None);
    }
}
