//! [`WalStore`]: the durable [`LogStore`] for the write path: every ready round is one record
//! appended to a preallocated file with one write and one `fdatasync`, the floor the e-stop's
//! commit latency is measured against. A redb commit of the same round rewrote about nine pages
//! (docs/BENCHMARKS.md, raft-safety).
//!
//! Layout: two files (`raft-wal-0`, `raft-wal-1`), one active. A file is a sequence of records
//! (`len: u32 LE`, `crc: u32 LE`, `kind: u8`, `len` bytes of payload; format in
//! docs/FORMATS.md). The checksum of each record is chained from the previous record's, so a
//! record only counts in the sequence it was written in. A file starts with a header (magic,
//! format version, generation), then a base (the snapshot with the entries after it and the
//! hard state, the boot counter) closed by a seal, then the appended rounds.
//!
//! - A write: one record (`BATCH`: an optional snapshot from the leader, the entries, the
//!   resulting hard state), one write at the end, one `fdatasync`. A hard state that only
//!   moves the commit index is kept in memory and written with the next record.
//! - A compaction (a local snapshot) rewrites the live state as the base of the *other* file
//!   with the next generation, syncs it, and switches to it: the old file is left as it is and
//!   overwritten by the compaction after next. A file too small for what it must hold grows
//!   (zero-filled, synced) first.
//! - Open reads both files and takes the sealed one with the highest generation; it stops at
//!   the first record that is incomplete or whose checksum fails (a torn last write: the log
//!   syncs every write before the next, so at most one write is ever unsynced), and zeroes it.
//!   A store where no file is sealed is new only if both files are blank; otherwise it is
//!   refused (a member must never vote without its log).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use raft::prelude::{Entry, HardState, Snapshot};

use super::mirror::{Mirror, Plan, storage_from_mirror};
use super::{LogStore, StoreError, WriteBatch, decode};

/// Names of the two log files in the store's directory.
pub const WAL_FILE_NAMES: [&str; 2] = ["raft-wal-0", "raft-wal-1"];
/// Size each file is preallocated to (zero-filled, so an append rewrites data blocks only).
pub const WAL_CAPACITY_BYTES_DEFAULT: u64 = 8 << 20;
/// The largest record (a snapshot with its entries); a larger one is refused.
pub const WAL_RECORD_BYTES_MAX: usize = 64 << 20;

const MAGIC: &[u8; 8] = b"KEELRWAL";
const FORMAT_VERSION: u32 = 1;
const RECORD_HEADER_BYTES: usize = 9;
const READ_CHUNK_BYTES: usize = 256 << 10;
const ZERO_CHUNK_BYTES: usize = 1 << 20;

const KIND_HEADER: u8 = 1;
const KIND_BATCH: u8 = 2;
const KIND_BOOT: u8 = 3;
const KIND_SEAL: u8 = 4;

/// The file operations the log needs; [`std::fs::File`] and the simulation's
/// [`super::CrashDisk`] implement it.
pub trait WalFile: Send {
    /// Current length in bytes.
    fn len_bytes(&self) -> io::Result<u64>;
    /// Reads exactly `out.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, out: &mut [u8]) -> io::Result<()>;
    /// Writes all of `data` at `offset` (not durable until [`WalFile::sync_data`]).
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes every write so far durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
}

impl WalFile for File {
    fn len_bytes(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_at(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.read_exact_at(out, offset)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write_all_at(data, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }
}

/// A Raft log store in two preallocated append-only files.
pub struct WalStore {
    files: [Box<dyn WalFile>; 2],
    capacity_bytes: u64,
    active: usize,
    generation: u64,
    /// Where the next record goes in the active file.
    end: u64,
    /// Checksum of the last record in the active file (the next record chains from it).
    chain: u32,
    mirror: Mirror,
    buf: Vec<u8>,
}

impl std::fmt::Debug for WalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalStore")
            .field("generation", &self.generation)
            .field("active", &WAL_FILE_NAMES[self.active])
            .field("end", &self.end)
            .field("hard_state", &self.mirror.hard_state)
            .field("snapshot_index", &self.mirror.snapshot_index())
            .field("entries", &self.mirror.entries.len())
            .finish()
    }
}

/// What a scan of one file found.
struct Scanned {
    generation: u64,
    mirror: Mirror,
    end: u64,
    chain: u32,
    /// Bytes after `end` that an incomplete or corrupt record claims (zeroed on open).
    torn_bytes: u64,
}

impl WalStore {
    /// Opens (or creates) the store in directory `dir` with the default capacity. The first
    /// file is locked for this process (a second opener gets an error).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with_capacity(dir, WAL_CAPACITY_BYTES_DEFAULT)
    }

    /// [`WalStore::open`] with files preallocated to `capacity_bytes` each.
    pub fn open_with_capacity(
        dir: impl AsRef<Path>,
        capacity_bytes: u64,
    ) -> Result<Self, StoreError> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
        let mut created = false;
        let mut open = |name: &str| -> Result<File, StoreError> {
            let path = dir.join(name);
            created |= !path.exists();
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|e| io_error(&path, e))
        };
        let files = [open(WAL_FILE_NAMES[0])?, open(WAL_FILE_NAMES[1])?];
        match files[0].try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked(dir.join(WAL_FILE_NAMES[0])));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_error(dir, e)),
        }
        let [a, b] = files;
        let store = Self::open_with_files([Box::new(a), Box::new(b)], capacity_bytes)?;
        if created {
            // The new files' directory entries must be durable before anything in them counts.
            File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error(dir, e))?;
        }
        Ok(store)
    }

    /// Opens the store on two files (e.g. simulated disks), each preallocated to
    /// `capacity_bytes` if it is shorter.
    pub fn open_with_files(
        files: [Box<dyn WalFile>; 2],
        capacity_bytes: u64,
    ) -> Result<Self, StoreError> {
        let capacity_bytes = capacity_bytes.max(4096);
        let scans = [scan(files[0].as_ref())?, scan(files[1].as_ref())?];
        let best = (0..2)
            .filter(|&i| scans[i].is_some())
            .max_by_key(|&i| scans[i].as_ref().map(|s| s.generation));
        let mut store = Self {
            files,
            capacity_bytes,
            active: 0,
            generation: 0,
            end: 0,
            chain: 0,
            mirror: Mirror::default(),
            buf: Vec::new(),
        };
        for file in &store.files {
            preallocate(file.as_ref(), capacity_bytes)?;
        }
        match best {
            Some(i) => {
                let scan = scans.into_iter().nth(i).flatten().expect("picked a scanned file");
                store.active = i;
                store.generation = scan.generation;
                store.end = scan.end;
                store.chain = scan.chain;
                store.mirror = scan.mirror;
                store.mirror.check_contiguous()?;
                if scan.torn_bytes > 0 {
                    let file = store.files[i].as_ref();
                    zero(file, scan.end, scan.torn_bytes)?;
                    file.sync_data()?;
                }
            }
            None => {
                if !(blank(store.files[0].as_ref())? && blank(store.files[1].as_ref())?) {
                    return Err(StoreError::Corrupt(
                        "neither raft log file holds a complete header and base; refusing to \
                         start without the log (restore it, or wipe the member and re-add it)"
                            .into(),
                    ));
                }
                // New store: generation 1 in file 0 (rotating from generation 0 in file 1).
                store.active = 1;
                store.rotate()?;
            }
        }
        Ok(store)
    }

    /// The generation of the active file (bumped by every compaction).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Appends one record to the active file and makes it durable.
    fn append(&mut self, kind: u8, payload: &[u8]) -> Result<(), StoreError> {
        let len = (RECORD_HEADER_BYTES + payload.len()) as u64;
        let file_len = self.files[self.active].len_bytes()?;
        if self.end + len > file_len {
            // Full: the live state plus this record go to the other file.
            return self.rotate_with(Some((kind, payload)));
        }
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let chain = put_record(&mut buf, self.chain, kind, payload)?;
        let file = self.files[self.active].as_ref();
        let written = file.write_at(self.end, &buf).and_then(|()| file.sync_data());
        self.buf = buf;
        written?;
        self.end += len;
        self.chain = chain;
        Ok(())
    }

    /// Writes the live state as the base of the next generation into the other file, syncs it
    /// and makes it the active one.
    fn rotate(&mut self) -> Result<(), StoreError> {
        self.rotate_with(None)
    }

    fn rotate_with(&mut self, then: Option<(u8, &[u8])>) -> Result<(), StoreError> {
        let generation = self.generation + 1;
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let mut header = Vec::with_capacity(20);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        header.extend_from_slice(&generation.to_le_bytes());
        let mut chain = put_record(&mut buf, 0, KIND_HEADER, &header)?;
        let mut payload = Vec::new();
        let snapshot =
            (self.mirror.snapshot != Snapshot::default()).then_some(&self.mirror.snapshot);
        let entries: Vec<Entry> = self.mirror.entries.iter().cloned().collect();
        encode_batch(&mut payload, snapshot, &entries, &self.mirror.hard_state);
        chain = put_record(&mut buf, chain, KIND_BATCH, &payload)?;
        chain = put_record(&mut buf, chain, KIND_BOOT, &self.mirror.boot.to_le_bytes())?;
        chain = put_record(&mut buf, chain, KIND_SEAL, &[])?;
        if let Some((kind, payload)) = then {
            chain = put_record(&mut buf, chain, kind, payload)?;
        }
        let other = 1 - self.active;
        let file = self.files[other].as_ref();
        let needed = buf.len() as u64;
        let written = (|| -> Result<(), StoreError> {
            if needed * 2 > file.len_bytes()? {
                preallocate(file, (needed * 2).max(self.capacity_bytes))?;
            }
            file.write_at(0, &buf)?;
            file.sync_data()?;
            Ok(())
        })();
        self.buf = buf;
        written?;
        self.active = other;
        self.generation = generation;
        self.end = needed;
        self.chain = chain;
        Ok(())
    }
}

storage_from_mirror!(WalStore);

impl LogStore for WalStore {
    fn write(&mut self, batch: WriteBatch<'_>) -> Result<(), StoreError> {
        let hard_state = match self.mirror.plan(&batch)? {
            Plan::CommitOnly(commit) => {
                self.mirror.set_commit(commit);
                return Ok(());
            }
            Plan::Write(hard_state) => hard_state,
        };
        let mut payload = Vec::new();
        encode_batch(&mut payload, batch.snapshot, batch.entries, &hard_state);
        self.append(KIND_BATCH, &payload)?;
        self.mirror.apply(&batch, hard_state);
        Ok(())
    }

    fn set_commit(&mut self, commit: u64) -> Result<(), StoreError> {
        self.mirror.set_commit(commit);
        Ok(())
    }

    fn compact(&mut self, snapshot: Snapshot) -> Result<(), StoreError> {
        let Some(hard_state) = self.mirror.plan_compact(&snapshot)? else {
            return Ok(());
        };
        // The rotation writes from the mirror; on failure, put the old state back.
        let before = self.mirror.clone();
        self.mirror.apply_compact(snapshot, hard_state);
        if let Err(error) = self.rotate() {
            self.mirror = before;
            return Err(error);
        }
        Ok(())
    }

    fn bootstrap(&mut self, snapshot: Snapshot) -> Result<(), StoreError> {
        let hard_state = self.mirror.plan_bootstrap(&snapshot)?;
        let mut payload = Vec::new();
        encode_batch(&mut payload, Some(&snapshot), &[], &hard_state);
        self.append(KIND_BATCH, &payload)?;
        let batch = WriteBatch { snapshot: Some(&snapshot), ..WriteBatch::default() };
        self.mirror.apply(&batch, hard_state);
        Ok(())
    }

    fn next_boot(&mut self) -> Result<u64, StoreError> {
        let boot = self.mirror.boot + 1;
        self.append(KIND_BOOT, &boot.to_le_bytes())?;
        self.mirror.boot = boot;
        Ok(boot)
    }
}

fn io_error(path: &Path, error: io::Error) -> StoreError {
    StoreError::Open { path: path.display().to_string(), source: error }
}

/// Appends one record to `buf` chained from `prev`; returns its checksum.
fn put_record(buf: &mut Vec<u8>, prev: u32, kind: u8, payload: &[u8]) -> Result<u32, StoreError> {
    if payload.len() > WAL_RECORD_BYTES_MAX {
        return Err(StoreError::TooLarge { bytes: payload.len(), max: WAL_RECORD_BYTES_MAX });
    }
    let len = payload.len() as u32;
    let crc = checksum(prev, kind, len, payload);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&crc.to_le_bytes());
    buf.push(kind);
    buf.extend_from_slice(payload);
    Ok(crc)
}

fn checksum(prev: u32, kind: u8, len: u32, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new_with_initial(prev);
    hasher.update(&[kind]);
    hasher.update(&len.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// `BATCH` payload: flags (bit 0: snapshot present), [snapshot], hard state, entry count,
/// entries; each message as `u32 LE length` + protobuf bytes.
fn encode_batch(out: &mut Vec<u8>, snapshot: Option<&Snapshot>, entries: &[Entry], hs: &HardState) {
    out.push(u8::from(snapshot.is_some()));
    if let Some(snapshot) = snapshot {
        put_message(out, snapshot);
    }
    put_message(out, hs);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for entry in entries {
        put_message(out, entry);
    }
}

fn put_message<M: protobuf::Message>(out: &mut Vec<u8>, message: &M) {
    // raft-rs's prost codec implements only the whole-message calls of `protobuf::Message`.
    let bytes = message.write_to_bytes().expect("raft protobuf messages always encode");
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(&bytes);
}

/// A decoded `BATCH`.
struct Batch {
    snapshot: Option<Snapshot>,
    hard_state: HardState,
    entries: Vec<Entry>,
}

fn decode_batch(mut bytes: &[u8]) -> Result<Batch, StoreError> {
    let flags = take(&mut bytes, 1)?[0];
    let snapshot = if flags & 1 == 1 {
        Some(decode::<Snapshot>(take_message(&mut bytes)?, "snapshot")?)
    } else {
        None
    };
    let hard_state = decode::<HardState>(take_message(&mut bytes)?, "hard state")?;
    let count = u32::from_le_bytes(take(&mut bytes, 4)?.try_into().expect("4 bytes"));
    let mut entries = Vec::with_capacity((count as usize).min(bytes.len() / 4));
    for _ in 0..count {
        entries.push(decode::<Entry>(take_message(&mut bytes)?, "entry")?);
    }
    if !bytes.is_empty() {
        return Err(StoreError::Corrupt("trailing bytes after a batch".into()));
    }
    Ok(Batch { snapshot, hard_state, entries })
}

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], StoreError> {
    if bytes.len() < n {
        return Err(StoreError::Corrupt("batch record ends early".into()));
    }
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    Ok(head)
}

fn take_message<'a>(bytes: &mut &'a [u8]) -> Result<&'a [u8], StoreError> {
    let len = u32::from_le_bytes(take(bytes, 4)?.try_into().expect("4 bytes"));
    take(bytes, len as usize)
}

/// Reads a file through a window, so that a scan costs a few large reads.
struct Reader<'a> {
    file: &'a dyn WalFile,
    len: u64,
    start: u64,
    window: Vec<u8>,
}

impl Reader<'_> {
    /// The `n` bytes at `offset`, or `None` past the end of the file.
    fn bytes(&mut self, offset: u64, n: usize) -> io::Result<Option<&[u8]>> {
        let end = offset.saturating_add(n as u64);
        if end > self.len {
            return Ok(None);
        }
        let cached = offset >= self.start && end <= self.start + self.window.len() as u64;
        if !cached {
            let size = (n.max(READ_CHUNK_BYTES) as u64).min(self.len - offset) as usize;
            self.window.resize(size, 0);
            self.file.read_at(offset, &mut self.window)?;
            self.start = offset;
        }
        let at = (offset - self.start) as usize;
        Ok(Some(&self.window[at..at + n]))
    }
}

/// Reads one file: `None` unless it holds a valid header and a sealed base.
fn scan(file: &dyn WalFile) -> Result<Option<Scanned>, StoreError> {
    let mut reader = Reader { file, len: file.len_bytes()?, start: 0, window: Vec::new() };
    let mut offset = 0u64;
    let mut chain = 0u32;
    let mut generation = None;
    let mut sealed = false;
    let mut mirror = Mirror::default();
    let torn_bytes = loop {
        let Some(head) = reader.bytes(offset, RECORD_HEADER_BYTES)? else {
            break 0;
        };
        let len = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
        let kind = head[8];
        if len == 0 && crc == 0 && kind == 0 {
            break 0; // the zero-filled rest of the file
        }
        let claimed = RECORD_HEADER_BYTES as u64 + u64::from(len);
        let torn = claimed.min(reader.len - offset);
        if len as usize > WAL_RECORD_BYTES_MAX {
            break torn;
        }
        let Some(payload) = reader.bytes(offset + RECORD_HEADER_BYTES as u64, len as usize)? else {
            break torn;
        };
        if checksum(chain, kind, len, payload) != crc {
            break torn;
        }
        match (kind, generation) {
            (KIND_HEADER, None) => {
                if payload.len() != 20 || &payload[0..8] != MAGIC {
                    return Ok(None);
                }
                let version = u32::from_le_bytes(payload[8..12].try_into().expect("4 bytes"));
                if version != FORMAT_VERSION {
                    return Err(StoreError::Corrupt(format!(
                        "raft log format version {version}, this build reads {FORMAT_VERSION}"
                    )));
                }
                generation = Some(u64::from_le_bytes(payload[12..20].try_into().expect("8")));
            }
            (_, None) => return Ok(None),
            (KIND_BATCH, Some(_)) => {
                let batch = decode_batch(payload)?;
                let write = WriteBatch {
                    snapshot: batch.snapshot.as_ref(),
                    entries: &batch.entries,
                    hard_state: Some(&batch.hard_state),
                };
                mirror.plan(&write)?;
                mirror.apply(&write, batch.hard_state.clone());
            }
            (KIND_BOOT, Some(_)) => {
                let raw: [u8; 8] = payload
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("boot counter is not 8 bytes".into()))?;
                mirror.boot = u64::from_le_bytes(raw);
            }
            (KIND_SEAL, Some(_)) => sealed = true,
            (other, Some(_)) => {
                return Err(StoreError::Corrupt(format!("unknown raft log record kind {other}")));
            }
        }
        chain = crc;
        offset += claimed;
    };
    Ok(match generation {
        Some(generation) if sealed => {
            Some(Scanned { generation, mirror, end: offset, chain, torn_bytes })
        }
        _ => None,
    })
}

/// Whether a file holds nothing yet (shorter than a record header, or zeros there).
fn blank(file: &dyn WalFile) -> Result<bool, StoreError> {
    if file.len_bytes()? < RECORD_HEADER_BYTES as u64 {
        return Ok(true);
    }
    let mut head = [0u8; RECORD_HEADER_BYTES];
    file.read_at(0, &mut head)?;
    Ok(head.iter().all(|&b| b == 0))
}

/// Zero-fills a file up to `len` bytes (if shorter) and syncs it.
fn preallocate(file: &dyn WalFile, len: u64) -> Result<(), StoreError> {
    let current = file.len_bytes()?;
    if current >= len {
        return Ok(());
    }
    zero(file, current, len - current)?;
    file.sync_data()?;
    Ok(())
}

fn zero(file: &dyn WalFile, offset: u64, len: u64) -> Result<(), StoreError> {
    let zeros = vec![0u8; ZERO_CHUNK_BYTES.min(len as usize)];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(zeros.len() as u64) as usize;
        file.write_at(offset + at, &zeros[..n])?;
        at += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::CrashDisk;
    use raft::Storage;

    fn disks() -> [CrashDisk; 2] {
        [CrashDisk::new(), CrashDisk::new()]
    }

    fn open(disks: &[CrashDisk; 2], capacity: u64) -> Result<WalStore, StoreError> {
        WalStore::open_with_files(
            [Box::new(disks[0].attach()), Box::new(disks[1].attach())],
            capacity,
        )
    }

    fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        range.map(|index| Entry { index, term, data: vec![7; 40], ..Entry::default() }).collect()
    }

    #[test]
    fn one_write_is_one_sync() {
        let disks = disks();
        let mut store = open(&disks, 1 << 16).unwrap();
        let before = disks[0].syncs() + disks[1].syncs();
        store.write(WriteBatch { entries: &entries(1..=3, 1), ..WriteBatch::default() }).unwrap();
        assert_eq!(disks[0].syncs() + disks[1].syncs(), before + 1);
    }

    #[test]
    fn a_crash_keeps_every_acknowledged_write_across_rotations_and_growth() {
        let disks = disks();
        let mut store = open(&disks, 4096).unwrap();
        let hs = HardState { term: 3, vote: 2, commit: 0 };
        store.write(WriteBatch { hard_state: Some(&hs), ..WriteBatch::default() }).unwrap();
        for i in 0..200u64 {
            let batch = entries(i * 5 + 1..=i * 5 + 5, 3);
            store.write(WriteBatch { entries: &batch, ..WriteBatch::default() }).unwrap();
            if i % 37 == 36 {
                let mut snapshot = Snapshot::default();
                snapshot.mut_metadata().index = i * 5;
                snapshot.mut_metadata().term = 3;
                snapshot.data = vec![1; 3000];
                store.compact(snapshot).unwrap();
            }
        }
        let generation = store.generation();
        assert!(generation > 5, "compactions and full files rotated ({generation})");
        // Something unsynced on the active file: lost by the crash.
        let active = &disks[store.active];
        active.write_at(store.end, &[9; 100]).unwrap();
        disks[0].crash();
        disks[1].crash();
        drop(store);
        let store = open(&disks, 4096).unwrap();
        assert_eq!(store.generation(), generation);
        assert_eq!(store.last_index().unwrap(), 1000);
        assert_eq!(store.first_index().unwrap(), 184 * 5 + 1, "compacted at 920 last");
        assert_eq!(store.initial_state().unwrap().hard_state.vote, 2);
        assert_eq!(store.term(1000).unwrap(), 3);
    }

    #[test]
    fn a_torn_last_write_is_cut_and_zeroed_and_the_log_goes_on() {
        let disks = disks();
        let mut store = open(&disks, 1 << 16).unwrap();
        store.write(WriteBatch { entries: &entries(1..=2, 1), ..WriteBatch::default() }).unwrap();
        let end = store.end;
        // A torn write of the next round: its header and half its payload reached the disk.
        let mut buf = Vec::new();
        let mut payload = Vec::new();
        let next = entries(3..=3, 1);
        encode_batch(&mut payload, None, &next, &HardState::default());
        put_record(&mut buf, store.chain, KIND_BATCH, &payload).unwrap();
        let active = store.active;
        drop(store);
        disks[active].write_at(end, &buf[..buf.len() / 2]).unwrap();
        disks[active].sync_data().unwrap();
        let mut store = open(&disks, 1 << 16).unwrap();
        assert_eq!(store.last_index().unwrap(), 2, "the torn round is not in the log");
        let mut rest = vec![0u8; buf.len()];
        disks[active].read_at(end, &mut rest).unwrap();
        assert!(rest.iter().all(|&b| b == 0), "the torn bytes are zeroed");
        store.write(WriteBatch { entries: &entries(3..=4, 2), ..WriteBatch::default() }).unwrap();
        drop(store);
        let store = open(&disks, 1 << 16).unwrap();
        assert_eq!(store.last_index().unwrap(), 4);
        assert_eq!(store.term(4).unwrap(), 2);
    }

    #[test]
    fn a_damaged_log_is_refused_not_started_empty() {
        let disks = disks();
        let mut store = open(&disks, 1 << 16).unwrap();
        store.write(WriteBatch { entries: &entries(1..=2, 1), ..WriteBatch::default() }).unwrap();
        let active = store.active;
        drop(store);
        disks[active].write_at(3, &[0xff]).unwrap(); // the header's checksum no longer holds
        disks[active].sync_data().unwrap();
        let error = open(&disks, 1 << 16).unwrap_err();
        assert!(matches!(error, StoreError::Corrupt(_)), "{error:?}");
    }
}
