//! Snapshot byte format: every document saved by automerge, plus the op log position covered.
//!
//! Layout (integers little-endian):
//!
//! ```text
//! magic: 8 bytes "KEELCRDT" | format: u16 = 4 | covers_position: u64 | doc_count: u32
//! doc_count x (id_len: u16 | id (UTF-8 "kind:name") | part_count: u8
//!              part_count x (role: u8 | epoch: u64 | doc_len: u32 | automerge save bytes)
//!              archive_count: u32
//!              archive_count x (bucket_len: u16 | bucket (UTF-8) | blob_len: u32 | blob))
//! crc32: u32 over every byte before it
//! ```
//!
//! The archive is a counter's sealed tombstones of earlier epochs
//! (`counter::SealedArchive`), in the order they were archived, each blob raw-deflated.
//! Format 3 stored them plain (still read). Format 2 had no archive (read as an empty
//! one: its geneses sealed the whole window).
//!
//! A document is saved in up to three parts, one per epoch document it holds:
//! role 0 the current epoch, 1 the previous one (kept until every member
//! joined the current one), 2 the next one (changes received before its
//! genesis). Format 1 had one part per document, no role and no epoch:
//! `id_len | id | doc_len | bytes`, read as the current document of epoch 0.

use crate::batch::take_u32;
use crate::doc_id::DocId;
use crate::error::Error;

const MAGIC: &[u8; 8] = b"KEELCRDT";
const FORMAT: u16 = 4;
const FORMAT_PLAIN_ARCHIVE: u16 = 3;
const FORMAT_NO_ARCHIVE: u16 = 2;
const FORMAT_LEGACY: u16 = 1;

/// Which epoch document of a document a part holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Current = 0,
    Previous = 1,
    Next = 2,
}

/// One saved epoch document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Part {
    pub(crate) role: Role,
    pub(crate) epoch: u64,
    pub(crate) bytes: Vec<u8>,
}

/// A counter's archived sealed blobs: `(bucket key, blob)`.
pub(crate) type Archive = Vec<(String, Vec<u8>)>;

/// A document to save: its id, its epoch documents and its archive.
pub(crate) type SavedDoc<'a> = (DocId, Vec<Part>, Vec<(&'a str, &'a [u8])>);

/// A decoded snapshot.
pub(crate) struct Decoded {
    pub(crate) covers_position: u64,
    pub(crate) docs: Vec<(DocId, Vec<Part>, Archive)>,
    /// Whether the archives' blobs are deflated (format 4 on).
    pub(crate) archive_deflated: bool,
}

pub(crate) fn encode(covers_position: u64, docs: &[SavedDoc<'_>]) -> Vec<u8> {
    // Sized exactly: a growing vector of a large archive would hold up to twice its size.
    let len_bytes = 8
        + 2
        + 8
        + 4
        + 4
        + docs
            .iter()
            .map(|(id, parts, archive)| {
                2 + id.to_string().len()
                    + 1
                    + parts.iter().map(|part| 1 + 8 + 4 + part.bytes.len()).sum::<usize>()
                    + 4
                    + archive
                        .iter()
                        .map(|(bucket, blob)| 2 + bucket.len() + 4 + blob.len())
                        .sum::<usize>()
            })
            .sum::<usize>();
    let mut bytes = Vec::with_capacity(len_bytes);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&FORMAT.to_le_bytes());
    bytes.extend_from_slice(&covers_position.to_le_bytes());
    bytes.extend_from_slice(&(docs.len() as u32).to_le_bytes());
    for (id, parts, archive) in docs {
        let id = id.to_string();
        // Ids are bounded by DOC_NAME_BYTES_MAX; documents by memory, far
        // below 4 GiB; at most three parts; bucket keys by NODE_ID_BYTES_MAX + 21.
        bytes.extend_from_slice(&(id.len() as u16).to_le_bytes());
        bytes.extend_from_slice(id.as_bytes());
        bytes.push(parts.len() as u8);
        for part in parts {
            bytes.push(part.role as u8);
            bytes.extend_from_slice(&part.epoch.to_le_bytes());
            bytes.extend_from_slice(&(part.bytes.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&part.bytes);
        }
        bytes.extend_from_slice(&(archive.len() as u32).to_le_bytes());
        for (bucket, blob) in archive {
            bytes.extend_from_slice(&(bucket.len() as u16).to_le_bytes());
            bytes.extend_from_slice(bucket.as_bytes());
            bytes.extend_from_slice(&(blob.len() as u32).to_le_bytes());
            bytes.extend_from_slice(blob);
        }
    }
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(bytes.len(), len_bytes);
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
    let format = u16::from_le_bytes(*format);
    if ![FORMAT, FORMAT_PLAIN_ARCHIVE, FORMAT_NO_ARCHIVE, FORMAT_LEGACY].contains(&format) {
        return Err(malformed("unknown format"));
    }
    let (position, rest) =
        rest.split_first_chunk::<8>().ok_or_else(|| malformed("truncated position"))?;
    let (count, mut rest) = take_u32(rest).ok_or_else(|| malformed("truncated count"))?;
    let mut docs = Vec::new();
    for _ in 0..count {
        let (id, after) =
            take_str(rest, ["truncated id length", "truncated id", "id is not UTF-8"])?;
        let id: DocId = id.parse()?;
        let (parts, after) = if format == FORMAT_LEGACY {
            let (doc, after) = take_doc(after)?;
            (vec![Part { role: Role::Current, epoch: 0, bytes: doc }], after)
        } else {
            let (count, mut after) =
                after.split_first().ok_or_else(|| malformed("truncated part count"))?;
            let mut parts = Vec::new();
            for _ in 0..*count {
                let (role, rest) =
                    after.split_first().ok_or_else(|| malformed("truncated role"))?;
                let role = match role {
                    0 => Role::Current,
                    1 => Role::Previous,
                    2 => Role::Next,
                    _ => return Err(malformed("unknown role")),
                };
                let (epoch, rest) =
                    rest.split_first_chunk::<8>().ok_or_else(|| malformed("truncated epoch"))?;
                let (doc, rest) = take_doc(rest)?;
                parts.push(Part { role, epoch: u64::from_le_bytes(*epoch), bytes: doc });
                after = rest;
            }
            (parts, after)
        };
        let (archive, after) =
            if format >= FORMAT_PLAIN_ARCHIVE { take_archive(after)? } else { (Vec::new(), after) };
        docs.push((id, parts, archive));
        rest = after;
    }
    if !rest.is_empty() {
        return Err(malformed("trailing bytes"));
    }
    Ok(Decoded {
        covers_position: u64::from_le_bytes(*position),
        docs,
        archive_deflated: format >= FORMAT,
    })
}

/// A string prefixed by its u16 length off the front of `bytes`; `errors` name a missing
/// length, a short string and one that is not UTF-8.
fn take_str<'a>(bytes: &'a [u8], errors: [&str; 3]) -> Result<(&'a str, &'a [u8]), Error> {
    let (len, after) = bytes.split_first_chunk::<2>().ok_or_else(|| malformed(errors[0]))?;
    let len = usize::from(u16::from_le_bytes(*len));
    if after.len() < len {
        return Err(malformed(errors[1]));
    }
    let (text, after) = after.split_at(len);
    Ok((std::str::from_utf8(text).map_err(|_| malformed(errors[2]))?, after))
}

fn take_archive(bytes: &[u8]) -> Result<(Archive, &[u8]), Error> {
    let (count, mut rest) = take_u32(bytes).ok_or_else(|| malformed("truncated archive"))?;
    let mut archive = Vec::new();
    for _ in 0..count {
        let (bucket, after) =
            take_str(rest, ["truncated bucket length", "truncated bucket", "bucket is not UTF-8"])?;
        let (blob, after) = take_doc(after)?;
        archive.push((bucket.to_owned(), blob));
        rest = after;
    }
    Ok((archive, rest))
}

fn take_doc(bytes: &[u8]) -> Result<(Vec<u8>, &[u8]), Error> {
    let (doc_len, after) = take_u32(bytes).ok_or_else(|| malformed("truncated doc length"))?;
    let doc_len = doc_len as usize;
    if after.len() < doc_len {
        return Err(malformed("truncated doc"));
    }
    let (doc, after) = after.split_at(doc_len);
    Ok((doc.to_vec(), after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_round_trip_and_detect_corruption() {
        let parts = vec![
            Part { role: Role::Current, epoch: 3, bytes: vec![1, 2, 3] },
            Part { role: Role::Previous, epoch: 2, bytes: vec![4] },
        ];
        let archive: Vec<(&str, &[u8])> = vec![("a|7", &[5, 6]), ("b|8", &[])];
        let docs = vec![(DocId::counter("a").unwrap(), parts.clone(), archive)];
        let mut bytes = encode(42, &docs);
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.covers_position, 42);
        let expected_archive = vec![("a|7".to_owned(), vec![5, 6]), ("b|8".to_owned(), vec![])];
        assert_eq!(decoded.docs, vec![(DocId::counter("a").unwrap(), parts, expected_archive)]);
        assert!(decoded.archive_deflated);
        // Format 3: the same layout, archive blobs plain.
        let mut plain = bytes[..bytes.len() - 4].to_vec();
        plain[8..10].copy_from_slice(&FORMAT_PLAIN_ARCHIVE.to_le_bytes());
        let crc = crc32fast::hash(&plain);
        plain.extend_from_slice(&crc.to_le_bytes());
        let decoded_plain = decode(&plain).unwrap();
        assert!(!decoded_plain.archive_deflated);
        assert_eq!(decoded_plain.docs, decoded.docs);
        bytes[12] ^= 1;
        assert!(decode(&bytes).is_err());
        assert!(decode(&[]).is_err());
    }

    #[test]
    fn format_2_snapshots_are_read_with_an_empty_archive() {
        let parts = vec![Part { role: Role::Current, epoch: 1, bytes: vec![7] }];
        let docs = vec![(DocId::counter("a").unwrap(), parts.clone(), Vec::new())];
        let bytes = encode(9, &docs);
        // Format 2: the same bytes without the archive count, and its own checksum.
        let mut old = bytes[..bytes.len() - 8].to_vec();
        old[8..10].copy_from_slice(&FORMAT_NO_ARCHIVE.to_le_bytes());
        let crc = crc32fast::hash(&old);
        old.extend_from_slice(&crc.to_le_bytes());
        let decoded = decode(&old).unwrap();
        assert_eq!(decoded.docs, vec![(DocId::counter("a").unwrap(), parts, Vec::new())]);
        assert!(!decoded.archive_deflated);
        // Format 3 read as format 2 would leave the archive count behind: refused.
        let mut relabelled = bytes[..bytes.len() - 4].to_vec();
        relabelled[8..10].copy_from_slice(&FORMAT_NO_ARCHIVE.to_le_bytes());
        let crc = crc32fast::hash(&relabelled);
        relabelled.extend_from_slice(&crc.to_le_bytes());
        assert!(decode(&relabelled).is_err());
    }
}
