//! The snapshot file format: a fixed header (magic, version, codec, position, chain hash,
//! payload length, checksums) and the encoded state (see `docs/FORMATS.md`).

use event_log::Hash;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Magic at the start of every snapshot file.
pub const SNAPSHOT_MAGIC: &[u8; 8] = b"KEELSNAP";
/// Version of the snapshot file format.
pub const SNAPSHOT_FORMAT_VERSION: u16 = 1;
/// Bytes of the header; the payload follows.
pub const SNAPSHOT_HEADER_BYTES: usize = 72;
/// Suffix of snapshot files; the stem is `snapshot-` and the position, zero-padded to 20 digits.
pub const SNAPSHOT_SUFFIX: &str = ".snap";
/// Prefix of snapshot file names.
pub const SNAPSHOT_PREFIX: &str = "snapshot-";

/// How the state is encoded in the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Codec {
    /// `postcard`: compact binary (the default).
    #[default]
    Postcard,
    /// JSON: larger, readable, for inspection.
    Json,
}

impl Codec {
    fn tag(self) -> u8 {
        match self {
            Codec::Postcard => 1,
            Codec::Json => 2,
        }
    }
    fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            1 => Some(Codec::Postcard),
            2 => Some(Codec::Json),
            _ => None,
        }
    }

    /// Encodes a state.
    pub fn encode<S: Serialize>(self, state: &S) -> Result<Vec<u8>, String> {
        match self {
            Codec::Postcard => postcard::to_stdvec(state).map_err(|e| e.to_string()),
            Codec::Json => serde_json::to_vec(state).map_err(|e| e.to_string()),
        }
    }

    /// Decodes a state.
    pub fn decode<S: DeserializeOwned>(self, bytes: &[u8]) -> Result<S, String> {
        match self {
            Codec::Postcard => postcard::from_bytes(bytes).map_err(|e| e.to_string()),
            Codec::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
        }
    }
}

/// What a snapshot header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// Codec of the payload.
    pub codec: Codec,
    /// The log position the state reflects (every event up to it applied).
    pub position: u64,
    /// Chain hash of the event at `position` (the genesis hash for position 0).
    pub chain_hash: Hash,
    /// Payload bytes.
    pub payload_len: u64,
    /// CRC-32 of the payload.
    pub payload_crc: u32,
}

impl SnapshotHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; SNAPSHOT_HEADER_BYTES] {
        let mut out = [0u8; SNAPSHOT_HEADER_BYTES];
        out[0..8].copy_from_slice(SNAPSHOT_MAGIC);
        out[8..10].copy_from_slice(&SNAPSHOT_FORMAT_VERSION.to_le_bytes());
        out[10] = self.codec.tag();
        out[16..24].copy_from_slice(&self.position.to_le_bytes());
        out[24..56].copy_from_slice(&self.chain_hash);
        out[56..64].copy_from_slice(&self.payload_len.to_le_bytes());
        out[64..68].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32fast::hash(&out[0..68]);
        out[68..72].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and checks a header.
    pub fn decode(bytes: &[u8]) -> Result<Self, &'static str> {
        let bytes: &[u8; SNAPSHOT_HEADER_BYTES] = bytes
            .get(..SNAPSHOT_HEADER_BYTES)
            .and_then(|b| b.try_into().ok())
            .ok_or("shorter than a header")?;
        if &bytes[0..8] != SNAPSHOT_MAGIC {
            return Err("bad magic");
        }
        let crc = u32::from_le_bytes(bytes[68..72].try_into().expect("4 bytes"));
        if crc != crc32fast::hash(&bytes[0..68]) {
            return Err("header checksum mismatch");
        }
        if u16::from_le_bytes([bytes[8], bytes[9]]) != SNAPSHOT_FORMAT_VERSION {
            return Err("unknown format version");
        }
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8"));
        Ok(Self {
            codec: Codec::from_tag(bytes[10]).ok_or("unknown codec")?,
            position: u64_at(16),
            chain_hash: bytes[24..56].try_into().expect("32 bytes"),
            payload_len: u64_at(56),
            payload_crc: u32::from_le_bytes(bytes[64..68].try_into().expect("4 bytes")),
        })
    }
}

/// The file name of the snapshot at `position`.
pub fn snapshot_name(position: u64) -> String {
    format!("{SNAPSHOT_PREFIX}{position:020}{SNAPSHOT_SUFFIX}")
}

/// The position in a snapshot file name.
pub fn parse_snapshot_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(SNAPSHOT_PREFIX)?.strip_suffix(SNAPSHOT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Checks a whole snapshot file and returns its header and payload.
pub fn parse_file(bytes: &[u8]) -> Result<(SnapshotHeader, &[u8]), &'static str> {
    let header = SnapshotHeader::decode(bytes)?;
    let payload = &bytes[SNAPSHOT_HEADER_BYTES..];
    if payload.len() as u64 != header.payload_len {
        return Err("payload length mismatch (truncated or extended)");
    }
    if crc32fast::hash(payload) != header.payload_crc {
        return Err("payload checksum mismatch");
    }
    Ok((header, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_every_byte_is_covered() {
        let payload = b"state".to_vec();
        let header = SnapshotHeader {
            codec: Codec::Json,
            position: 12,
            chain_hash: [5; 32],
            payload_len: payload.len() as u64,
            payload_crc: crc32fast::hash(&payload),
        };
        let mut file = header.encode().to_vec();
        file.extend_from_slice(&payload);
        assert_eq!(parse_file(&file).unwrap(), (header, &payload[..]));
        for i in 0..file.len() {
            let mut bad = file.clone();
            bad[i] ^= 0x01;
            assert!(parse_file(&bad).is_err(), "flip at {i} not detected");
        }
        for len in 0..file.len() {
            assert!(parse_file(&file[..len]).is_err(), "truncation to {len} not detected");
        }
    }

    #[test]
    fn names_and_codecs() {
        assert_eq!(parse_snapshot_name(&snapshot_name(77)), Some(77));
        assert_eq!(parse_snapshot_name("snapshot-77.snap"), None);
        let v = vec![1u32, 2, 3];
        for codec in [Codec::Postcard, Codec::Json] {
            let bytes = codec.encode(&v).unwrap();
            assert_eq!(codec.decode::<Vec<u32>>(&bytes).unwrap(), v);
        }
        assert!(Codec::Postcard.encode(&v).unwrap().len() < Codec::Json.encode(&v).unwrap().len());
    }
}
