//! Snapshot byte format: every document saved by automerge, plus the op log position covered.
//!
//! Layout (integers little-endian):
//!
//! ```text
//! magic: 8 bytes "KEELCRDT" | format: u16 = 1 | covers_position: u64 | doc_count: u32
//! doc_count x (id_len: u16 | id (UTF-8 "kind:name") | doc_len: u32 | automerge save bytes)
//! crc32: u32 over every byte before it
//! ```

use crate::batch::take_u32;
use crate::doc_id::DocId;
use crate::error::Error;

const MAGIC: &[u8; 8] = b"KEELCRDT";
const FORMAT: u16 = 1;

/// A decoded snapshot.
pub(crate) struct Decoded {
    pub(crate) covers_position: u64,
    pub(crate) docs: Vec<(DocId, Vec<u8>)>,
}

pub(crate) fn encode(covers_position: u64, docs: &[(DocId, Vec<u8>)]) -> Vec<u8> {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&FORMAT.to_le_bytes());
    bytes.extend_from_slice(&covers_position.to_le_bytes());
    bytes.extend_from_slice(&(docs.len() as u32).to_le_bytes());
    for (id, doc) in docs {
        let id = id.to_string();
        // Ids are bounded by DOC_NAME_BYTES_MAX; documents by memory, far
        // below 4 GiB.
        bytes.extend_from_slice(&(id.len() as u16).to_le_bytes());
        bytes.extend_from_slice(id.as_bytes());
        bytes.extend_from_slice(&(doc.len() as u32).to_le_bytes());
        bytes.extend_from_slice(doc);
    }
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

fn malformed(reason: &str) -> Error {
    Error::Malformed { what: "snapshot", reason: reason.to_owned() }
}

pub(crate) fn decode(bytes: &[u8]) -> Result<Decoded, Error> {
    let (body, crc) = bytes.split_last_chunk::<4>().ok_or_else(|| malformed("truncated"))?;
    if crc32fast::hash(body) != u32::from_le_bytes(*crc) {
        return Err(malformed("checksum mismatch"));
    }
    let rest = body.strip_prefix(MAGIC).ok_or_else(|| malformed("bad magic"))?;
    let (format, rest) =
        rest.split_first_chunk::<2>().ok_or_else(|| malformed("truncated format"))?;
    if u16::from_le_bytes(*format) != FORMAT {
        return Err(malformed("unknown format"));
    }
    let (position, rest) =
        rest.split_first_chunk::<8>().ok_or_else(|| malformed("truncated position"))?;
    let (count, mut rest) = take_u32(rest).ok_or_else(|| malformed("truncated count"))?;
    let mut docs = Vec::new();
    for _ in 0..count {
        let (id_len, after) =
            rest.split_first_chunk::<2>().ok_or_else(|| malformed("truncated id length"))?;
        let id_len = usize::from(u16::from_le_bytes(*id_len));
        if after.len() < id_len {
            return Err(malformed("truncated id"));
        }
        let (id, after) = after.split_at(id_len);
        let id: DocId =
            std::str::from_utf8(id).map_err(|_| malformed("id is not UTF-8"))?.parse()?;
        let (doc_len, after) = take_u32(after).ok_or_else(|| malformed("truncated doc length"))?;
        let doc_len = doc_len as usize;
        if after.len() < doc_len {
            return Err(malformed("truncated doc"));
        }
        let (doc, after) = after.split_at(doc_len);
        docs.push((id, doc.to_vec()));
        rest = after;
    }
    if !rest.is_empty() {
        return Err(malformed("trailing bytes"));
    }
    Ok(Decoded { covers_position: u64::from_le_bytes(*position), docs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_round_trip_and_detect_corruption() {
        let docs = vec![(DocId::counter("a").unwrap(), vec![1, 2, 3])];
        let mut bytes = encode(42, &docs);
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.covers_position, 42);
        assert_eq!(decoded.docs, docs);
        bytes[12] ^= 1;
        assert!(decode(&bytes).is_err());
        assert!(decode(&[]).is_err());
    }
}
