//! Snapshot byte format: every document saved by automerge, plus the op log position covered.
//!
//! Layout (integers little-endian):
//!
//! ```text
//! magic: 8 bytes "KEELCRDT" | format: u16 = 5 | covers_position: u64 | doc_count: u32
//! doc_count x (id_len: u16 | id (UTF-8 "kind:name") | part_count: u8
//!              part_count x (role: u8 | epoch: u64 | doc_len: u32 | automerge save bytes)
//!              archive_count: u32
//!              archive_count x (bucket_len: u16 | bucket (UTF-8) | blob_len: u32 | blob)
//!              archive_wanted: u8)
//! crc32: u32 over every byte before it
//! ```
//!
//! The archive is a counter's sealed tombstones of earlier epochs
//! (`counter::SealedArchive`), in the order they were archived, each blob raw-deflated;
//! `archive_wanted` is 1 while the replica still waits for a peer's archive (it started
//! the document at a later epoch, having lost or never had the earlier ones). Format 4
//! had no `archive_wanted` (read as 0), format 3 stored the blobs plain (still read),
//! format 2 had no archive (read as an empty one: its geneses sealed the whole window).
//!
//! A peer's answer to an archive request is one or more chunks ([`encode_archive_reply`]),
//! each with some of its blobs in the archive's layout, the last with the manifest of
//! every blob it holds:
//!
//! ```text
//! epoch: u64 | complete: u8 | archive_count: u32 | archive_count x (...) | last: u8
//! last = 1: manifest_count: u32 | manifest_count x (bucket_len: u16 | bucket | digest: u64)
//! ```
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
const FORMAT: u16 = 5;
const FORMAT_NO_WANTED: u16 = 4;
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

/// A document to save: its id, its epoch documents, its archive and whether it still
/// wants a peer's.
pub(crate) type SavedDoc<'a> = (DocId, Vec<Part>, Vec<(&'a str, &'a [u8])>, bool);

/// A decoded document: as [`SavedDoc`], owned.
pub(crate) type DecodedDoc = (DocId, Vec<Part>, Archive, bool);

/// A decoded snapshot.
pub(crate) struct Decoded {
    pub(crate) covers_position: u64,
    pub(crate) docs: Vec<DecodedDoc>,
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
            .map(|(id, parts, archive, _)| {
                2 + id.to_string().len()
                    + 1
                    + parts.iter().map(|part| 1 + 8 + 4 + part.bytes.len()).sum::<usize>()
                    + archive_len_bytes(archive)
                    + 1
            })
            .sum::<usize>();
    let mut bytes = Vec::with_capacity(len_bytes);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&FORMAT.to_le_bytes());
    bytes.extend_from_slice(&covers_position.to_le_bytes());
    bytes.extend_from_slice(&(docs.len() as u32).to_le_bytes());
    for (id, parts, archive, wanted) in docs {
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
        put_archive(&mut bytes, archive);
        bytes.push(u8::from(*wanted));
    }
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(bytes.len(), len_bytes);
    bytes
}

fn archive_len_bytes(archive: &[(&str, &[u8])]) -> usize {
    4 + archive.iter().map(|(bucket, blob)| 2 + bucket.len() + 4 + blob.len()).sum::<usize>()
}

fn put_archive(bytes: &mut Vec<u8>, archive: &[(&str, &[u8])]) {
    // Bucket keys are bounded by NODE_ID_BYTES_MAX + 21, blobs by the archive's limits.
    bytes.extend_from_slice(&(archive.len() as u32).to_le_bytes());
    for (bucket, blob) in archive {
        bytes.extend_from_slice(&(bucket.len() as u16).to_le_bytes());
        bytes.extend_from_slice(bucket.as_bytes());
        bytes.extend_from_slice(&(blob.len() as u32).to_le_bytes());
        bytes.extend_from_slice(blob);
    }
}

/// A chunk of a replica's answer to a peer's archive request: its current epoch of the
/// counter, whether its archive is complete (it does not want one itself), some blobs, and
/// in the last chunk the manifest of every blob it holds, `(bucket key, digest)`.
pub(crate) fn encode_archive_reply(
    epoch: u64,
    complete: bool,
    archive: &[(&str, &[u8])],
    manifest: Option<&[(&str, u64)]>,
) -> Vec<u8> {
    let manifest_bytes = manifest
        .map_or(0, |entries| 4 + entries.iter().map(|(b, _)| 2 + b.len() + 8).sum::<usize>());
    let mut bytes = Vec::with_capacity(8 + 1 + archive_len_bytes(archive) + 1 + manifest_bytes);
    bytes.extend_from_slice(&epoch.to_le_bytes());
    bytes.push(u8::from(complete));
    put_archive(&mut bytes, archive);
    bytes.push(u8::from(manifest.is_some()));
    if let Some(entries) = manifest {
        bytes.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for (bucket, digest) in entries {
            bytes.extend_from_slice(&(bucket.len() as u16).to_le_bytes());
            bytes.extend_from_slice(bucket.as_bytes());
            bytes.extend_from_slice(&digest.to_le_bytes());
        }
    }
    bytes
}

/// A decoded archive reply chunk.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ArchiveReply {
    pub(crate) epoch: u64,
    pub(crate) complete: bool,
    pub(crate) archive: Archive,
    /// In the last chunk: every blob the peer holds.
    pub(crate) manifest: Option<Vec<(String, u64)>>,
}

pub(crate) fn decode_archive_reply(bytes: &[u8]) -> Result<ArchiveReply, Error> {
    let malformed =
        |reason: &str| Error::Malformed { what: "archive reply", reason: reason.to_owned() };
    let (epoch, rest) = bytes.split_first_chunk::<8>().ok_or_else(|| malformed("truncated"))?;
    let (complete, rest) = rest.split_first().ok_or_else(|| malformed("truncated"))?;
    let (archive, rest) = take_archive(rest)?;
    let (last, mut rest) = rest.split_first().ok_or_else(|| malformed("truncated"))?;
    if *complete > 1 || *last > 1 {
        return Err(malformed("bad flag"));
    }
    let manifest = if *last == 1 {
        let (count, after) = take_u32(rest).ok_or_else(|| malformed("truncated manifest"))?;
        rest = after;
        let mut entries = Vec::new();
        for _ in 0..count {
            let (bucket, after) =
                take_str(rest, ["truncated manifest", "truncated bucket", "bucket is not UTF-8"])?;
            let (digest, after) =
                after.split_first_chunk::<8>().ok_or_else(|| malformed("truncated digest"))?;
            entries.push((bucket.to_owned(), u64::from_le_bytes(*digest)));
            rest = after;
        }
        Some(entries)
    } else {
        None
    };
    if !rest.is_empty() {
        return Err(malformed("trailing bytes"));
    }
    Ok(ArchiveReply {
        epoch: u64::from_le_bytes(*epoch),
        complete: *complete == 1,
        archive,
        manifest,
    })
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
    if ![FORMAT, FORMAT_NO_WANTED, FORMAT_PLAIN_ARCHIVE, FORMAT_NO_ARCHIVE, FORMAT_LEGACY]
        .contains(&format)
    {
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
        let (wanted, after) = if format >= FORMAT {
            match after.split_first() {
                Some((0, after)) => (false, after),
                Some((1, after)) => (true, after),
                _ => return Err(malformed("bad archive_wanted")),
            }
        } else {
            (false, after)
        };
        docs.push((id, parts, archive, wanted));
        rest = after;
    }
    if !rest.is_empty() {
        return Err(malformed("trailing bytes"));
    }
    Ok(Decoded {
        covers_position: u64::from_le_bytes(*position),
        docs,
        archive_deflated: format >= FORMAT_NO_WANTED,
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

    /// `bytes` (one document, encoded now) as format `format`: without the trailing
    /// `archive_wanted` byte (formats 3 and 4) and the archive count (format 2, when the
    /// archive is empty), with its own checksum.
    fn relabelled(bytes: &[u8], format: u16, strip: usize) -> Vec<u8> {
        let mut old = bytes[..bytes.len() - 4 - strip].to_vec();
        old[8..10].copy_from_slice(&format.to_le_bytes());
        let crc = crc32fast::hash(&old);
        old.extend_from_slice(&crc.to_le_bytes());
        old
    }

    #[test]
    fn snapshots_round_trip_and_detect_corruption() {
        let parts = vec![
            Part { role: Role::Current, epoch: 3, bytes: vec![1, 2, 3] },
            Part { role: Role::Previous, epoch: 2, bytes: vec![4] },
        ];
        let archive: Vec<(&str, &[u8])> = vec![("a|7", &[5, 6]), ("b|8", &[])];
        let id = DocId::counter("a").unwrap();
        let expected_archive = vec![("a|7".to_owned(), vec![5, 6]), ("b|8".to_owned(), vec![])];
        for wanted in [false, true] {
            let docs = vec![(id.clone(), parts.clone(), archive.clone(), wanted)];
            let bytes = encode(42, &docs);
            let decoded = decode(&bytes).unwrap();
            assert_eq!(decoded.covers_position, 42);
            let expected = (id.clone(), parts.clone(), expected_archive.clone(), wanted);
            assert_eq!(decoded.docs, vec![expected]);
            assert!(decoded.archive_deflated);
            // Format 4: no `archive_wanted`, read as not wanted; format 3: the blobs plain.
            for (format, deflated) in [(FORMAT_NO_WANTED, true), (FORMAT_PLAIN_ARCHIVE, false)] {
                let old = decode(&relabelled(&bytes, format, 1)).unwrap();
                assert_eq!(old.archive_deflated, deflated);
                let expected = (id.clone(), parts.clone(), expected_archive.clone(), false);
                assert_eq!(old.docs, vec![expected]);
            }
            // Format 4 bytes read as format 5 lack the flag: refused.
            assert!(decode(&relabelled(&bytes, FORMAT, 1)).is_err());
        }
        let docs = vec![(id, parts, archive, false)];
        let mut bytes = encode(42, &docs);
        let last = bytes.len() - 5;
        bytes[last] = 2;
        let crc = crc32fast::hash(&bytes[..bytes.len() - 4]);
        let at = bytes.len() - 4;
        bytes[at..].copy_from_slice(&crc.to_le_bytes());
        assert!(decode(&bytes).is_err(), "a flag other than 0 or 1");
        bytes[12] ^= 1;
        assert!(decode(&bytes).is_err());
        assert!(decode(&[]).is_err());
    }

    #[test]
    fn format_2_snapshots_are_read_with_an_empty_archive() {
        let parts = vec![Part { role: Role::Current, epoch: 1, bytes: vec![7] }];
        let docs = vec![(DocId::counter("a").unwrap(), parts.clone(), Vec::new(), false)];
        let bytes = encode(9, &docs);
        // Format 2: the same bytes without the archive count and the flag.
        let decoded = decode(&relabelled(&bytes, FORMAT_NO_ARCHIVE, 5)).unwrap();
        assert_eq!(decoded.docs, vec![(DocId::counter("a").unwrap(), parts, Vec::new(), false)]);
        assert!(!decoded.archive_deflated);
        // Format 3 read as format 2 would leave the archive count behind: refused.
        assert!(decode(&relabelled(&bytes, FORMAT_NO_ARCHIVE, 1)).is_err());
    }

    #[test]
    fn archive_replies_round_trip_and_refuse_bad_bytes() {
        let archive: Vec<(&str, &[u8])> = vec![("a|7", &[5, 6]), ("b|8", &[9])];
        let manifest: Vec<(&str, u64)> = vec![("a|7", 11), ("b|8", 12), ("c|9", 13)];
        let bytes = encode_archive_reply(12, true, &archive, Some(&manifest));
        let reply = decode_archive_reply(&bytes).unwrap();
        let expected = vec![("a|7".to_owned(), vec![5, 6]), ("b|8".to_owned(), vec![9])];
        let expected_manifest: Vec<(String, u64)> =
            manifest.iter().map(|(b, d)| ((*b).to_owned(), *d)).collect();
        assert_eq!(
            reply,
            ArchiveReply {
                epoch: 12,
                complete: true,
                archive: expected,
                manifest: Some(expected_manifest)
            }
        );
        let middle = decode_archive_reply(&encode_archive_reply(3, false, &archive, None)).unwrap();
        assert!(!middle.complete && middle.manifest.is_none());
        for cut in 0..bytes.len() {
            assert!(decode_archive_reply(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(decode_archive_reply(&trailing).is_err());
        let mut flag = bytes;
        flag[8] = 7;
        assert!(decode_archive_reply(&flag).is_err());
    }
}
