//! Segment files: naming, the per-segment sparse offset index and a buffered record reader.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::record::{
    self, DecodedRecord, Hash, Prefix, RECORD_PREFIX_BYTES, RecordView, SEGMENT_HEADER_BYTES,
    SegmentHeader,
};
use crate::vfs::VfsFile;

/// Suffix of segment files; the stem is the first position, zero-padded to 20 digits.
pub const SEGMENT_SUFFIX: &str = ".seg";
/// Suffix of temporary files (removed on open, except a complete preallocated segment).
pub const TEMP_SUFFIX: &str = ".tmp";
/// Name of the preallocated (zero-filled) file that becomes the next segment.
pub const PREALLOC_NAME: &str = "next-segment.tmp";
/// Marker file written at a clean close: the bytes after the head are known to be zeros, so
/// the next open need not check them. Removed (durably) by the open that finds it.
pub const CLEAN_MARKER_NAME: &str = "clean-shutdown";
/// Zeros written per call while preallocating and when zeroing a torn tail. One page: on
/// kernels with large page-cache folios, bigger writes create bigger folios, and a later small
/// append into one dirties (and is accounted as) the whole folio.
pub const ZERO_CHUNK_BYTES: usize = 4096;
/// A sparse offset entry is kept every this many records.
pub const SPARSE_EVERY_EVENTS: u64 = 64;
/// Most bytes a sequential reader fetches per read.
pub const READ_CHUNK_BYTES: usize = 256 * 1024;
/// Bytes a reader fetches on its first read; each later read doubles it, up to
/// [`READ_CHUNK_BYTES`]. A segment's limit is its preallocated size, so a fixed
/// [`READ_CHUNK_BYTES`] made every read of a few tail events (a subscription, an outbox, a
/// GET) zero and copy 256 KiB: at 1,500 events/s that was a third of arm-controller's CPU.
pub const READ_FIRST_BYTES: usize = 4096;

/// The file name of the segment whose first position is `first_position`.
pub fn segment_name(first_position: u64) -> String {
    format!("{first_position:020}{SEGMENT_SUFFIX}")
}

/// The first position encoded in a segment file name.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(SEGMENT_SUFFIX)?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

/// A sparse index entry: the record of `position` starts at `offset`, after `prev_hash`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SparseEntry {
    pub position: u64,
    pub offset: u64,
    pub prev_hash: Hash,
}

/// An open segment file.
#[derive(Debug)]
pub(crate) struct Segment {
    pub header: SegmentHeader,
    pub path: PathBuf,
    pub file: Arc<dyn VfsFile>,
    pub len_bytes: u64,
    sparse: Mutex<Vec<SparseEntry>>,
}

impl Segment {
    pub(crate) fn new(
        header: SegmentHeader,
        path: PathBuf,
        file: Arc<dyn VfsFile>,
        len_bytes: u64,
    ) -> Self {
        let first = SparseEntry {
            position: header.first_position,
            offset: SEGMENT_HEADER_BYTES as u64,
            prev_hash: header.prev_hash,
        };
        Self { header, path, file, len_bytes, sparse: Mutex::new(vec![first]) }
    }

    /// The closest known record start at or before `position`.
    pub(crate) fn sparse_floor(&self, position: u64) -> SparseEntry {
        let sparse = self.sparse.lock().unwrap_or_else(|e| e.into_inner());
        let i = sparse.partition_point(|e| e.position <= position);
        sparse[i.saturating_sub(1)]
    }

    /// Remembers a record start found while reading.
    pub(crate) fn note(&self, entry: SparseEntry) {
        if !(entry.position - self.header.first_position).is_multiple_of(SPARSE_EVERY_EVENTS) {
            return;
        }
        let mut sparse = self.sparse.lock().unwrap_or_else(|e| e.into_inner());
        let i = sparse.partition_point(|e| e.position < entry.position);
        if sparse.get(i).is_none_or(|e| e.position != entry.position) {
            sparse.insert(i, entry);
        }
    }
}

/// Why a record could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RecordFault {
    /// An all-zero prefix: nothing was written here.
    End,
    /// The prefix or body is damaged (bad length, CRC mismatch, undecodable, cut short).
    Damaged(&'static str),
}

/// Reads records sequentially from a segment through a buffer.
#[derive(Debug)]
pub(crate) struct SegmentReader<'a> {
    file: &'a dyn VfsFile,
    limit: u64,
    buf: Vec<u8>,
    buf_start: u64,
    offset: u64,
    max_body_bytes: usize,
    /// Bytes the next refill fetches (at least the record asked for).
    read_bytes: usize,
}

impl<'a> SegmentReader<'a> {
    /// A reader starting at `offset`, never reading at or past `limit` bytes.
    pub(crate) fn new(file: &'a dyn VfsFile, offset: u64, limit: u64, max_body: usize) -> Self {
        Self {
            file,
            limit,
            buf: Vec::new(),
            buf_start: offset,
            offset,
            max_body_bytes: max_body,
            read_bytes: READ_FIRST_BYTES,
        }
    }

    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    fn bytes(&mut self, at: u64, len: usize) -> std::io::Result<Option<&[u8]>> {
        if at + len as u64 > self.limit {
            return Ok(None);
        }
        let buf_end = self.buf_start + self.buf.len() as u64;
        if at < self.buf_start || at + len as u64 > buf_end {
            let want = len.max(self.read_bytes).min((self.limit - at) as usize);
            self.read_bytes = (self.read_bytes * 2).min(READ_CHUNK_BYTES);
            self.buf.resize(want, 0);
            let mut done = 0;
            while done < want {
                let n = self.file.read_at(&mut self.buf[done..], at + done as u64)?;
                if n == 0 {
                    break;
                }
                done += n;
            }
            self.buf.truncate(done);
            self.buf_start = at;
            if done < len {
                return Ok(None);
            }
        }
        let from = (at - self.buf_start) as usize;
        Ok(Some(&self.buf[from..from + len]))
    }

    /// The next record, which must be the one at `position`, or why there is none. I/O errors
    /// are returned as `Err`.
    pub(crate) fn next_record(
        &mut self,
        position: u64,
    ) -> std::io::Result<Result<DecodedRecord, RecordFault>> {
        Ok(self.next_view()?.map(|(view, _)| view.to_record(position)))
    }

    /// The next record decoded in place (borrowing the reader's buffer) and the offset after
    /// it, or why there is none. I/O errors are returned as `Err`.
    pub(crate) fn next_view(
        &mut self,
    ) -> std::io::Result<Result<(RecordView<'_>, u64), RecordFault>> {
        let offset = self.offset;
        let max_body = self.max_body_bytes;
        let Some(prefix) = self.bytes(offset, RECORD_PREFIX_BYTES)? else {
            return Ok(Err(RecordFault::End));
        };
        let prefix: [u8; RECORD_PREFIX_BYTES] = prefix.try_into().expect("prefix length");
        let (body_len, crc) = match record::parse_prefix(&prefix, max_body) {
            Some(Prefix::End) => return Ok(Err(RecordFault::End)),
            None => return Ok(Err(RecordFault::Damaged("impossible record length"))),
            Some(Prefix::Body { body_len, crc }) => (body_len, crc),
        };
        let body_at = offset + RECORD_PREFIX_BYTES as u64;
        let next_offset = body_at + body_len as u64;
        if self.bytes(body_at, body_len)?.is_none() {
            return Ok(Err(RecordFault::Damaged("record runs past the end of the segment")));
        }
        // The body is in the buffer now (just checked), so borrow it from there.
        let from = (body_at - self.buf_start) as usize;
        let body = &self.buf[from..from + body_len];
        if crc32fast::hash(body) != crc {
            return Ok(Err(RecordFault::Damaged("record checksum mismatch")));
        }
        let Some(view) = record::decode_view(body) else {
            return Ok(Err(RecordFault::Damaged("record body malformed")));
        };
        self.offset = next_offset;
        Ok(Ok((view, next_offset)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A file in memory that counts the bytes read from it.
    #[derive(Debug, Default)]
    struct CountingFile {
        data: Mutex<Vec<u8>>,
        read_bytes: AtomicU64,
    }

    impl VfsFile for CountingFile {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
            let data = self.data.lock().unwrap();
            let from = (offset as usize).min(data.len());
            let n = buf.len().min(data.len() - from);
            buf[..n].copy_from_slice(&data[from..from + n]);
            self.read_bytes.fetch_add(n as u64, Ordering::Relaxed);
            Ok(n)
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            let mut data = self.data.lock().unwrap();
            let end = offset as usize + buf.len();
            if data.len() < end {
                data.resize(end, 0);
            }
            data[offset as usize..end].copy_from_slice(buf);
            Ok(())
        }
        fn sync_data(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn set_len(&self, len_bytes: u64) -> std::io::Result<()> {
            self.data.lock().unwrap().resize(len_bytes as usize, 0);
            Ok(())
        }
        fn len(&self) -> std::io::Result<u64> {
            Ok(self.data.lock().unwrap().len() as u64)
        }
    }

    #[test]
    fn a_short_read_fetches_one_page_and_a_scan_grows_its_fetches() {
        let size = 4 * READ_CHUNK_BYTES;
        let file = CountingFile::default();
        let pattern: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        file.write_all_at(&pattern, 0).unwrap();

        // A few tail events: one small fetch, not a whole chunk of a preallocated segment.
        let mut reader = SegmentReader::new(&file, 1000, size as u64, 1 << 20);
        assert_eq!(reader.bytes(1000, 300).unwrap().unwrap(), &pattern[1000..1300]);
        assert_eq!(file.read_bytes.load(Ordering::Relaxed), READ_FIRST_BYTES as u64);

        // A scan: fetches double up to the chunk size (about 10 of them for 1 MiB), and each
        // byte is read once, but for the part of a record that straddled the last fetch.
        file.read_bytes.store(0, Ordering::Relaxed);
        let mut reader = SegmentReader::new(&file, 0, size as u64, 1 << 20);
        let mut at = 0;
        while at + 1000 <= size {
            assert_eq!(reader.bytes(at as u64, 1000).unwrap().unwrap(), &pattern[at..at + 1000]);
            at += 1000;
        }
        assert!(reader.buf.len() <= READ_CHUNK_BYTES);
        assert!(file.read_bytes.load(Ordering::Relaxed) < size as u64 + 16 * 1000);

        // A record longer than the chunk is still read whole; nothing past the limit.
        let mut reader = SegmentReader::new(&file, 10, size as u64, 1 << 20);
        let long = READ_CHUNK_BYTES + 5;
        assert_eq!(reader.bytes(10, long).unwrap().unwrap(), &pattern[10..10 + long]);
        assert!(reader.bytes(size as u64 - 10, 11).unwrap().is_none());
    }

    #[test]
    fn names_round_trip_and_sort_by_position() {
        assert_eq!(segment_name(42), "00000000000000000042.seg");
        assert_eq!(parse_segment_name(&segment_name(42)), Some(42));
        assert_eq!(parse_segment_name("42.seg"), None);
        assert_eq!(parse_segment_name("0000000000000000004x.seg"), None);
        assert!(segment_name(9) < segment_name(10));
    }
}
