//! The durability seam: `OpLog` (append durably before ack, replay on recovery) and `MemOpLog`.
//!
//! A replica appends every change that enters one of its documents (local
//! operations, remote changes, changes received by anti-entropy) before it
//! acknowledges or publishes anything that depends on it. Its own changes
//! are durable before they are answered or published ([`OpLog::append`]);
//! changes from peers are appended without waiting
//! ([`OpLog::append_unsynced`]): nothing is answered on them, the log is
//! one sequence (a crash keeps a prefix of it), and every change the
//! replica writes after them (an increment, the ack that lets a peer fold
//! them) is appended later, so it is durable only if they are. A crash can
//! lose remote changes that nothing durable depends on yet; the peers still
//! hold them and anti-entropy brings them back. Recovery is the
//! latest snapshot plus a replay of the records after the position the
//! snapshot covers. Replaying a record twice is harmless: automerge
//! recognises changes it already holds by their hash.
//!
//! Record byte layout (integers little-endian), as stored by an
//! implementation that persists bytes:
//!
//! ```text
//! format: u8 = 2 | doc_id_len: u16 | doc_id (UTF-8, "kind:name") | batch (see ChangeBatch)
//! ```
//!
//! The batch carries the epoch of the document the changes entered. Format 1
//! records (written before epochs) hold a format 1 batch and decode as epoch 0.

use crate::batch::ChangeBatch;
use crate::doc_id::DocId;
use crate::error::{Error, OpLogError};

/// Format byte of an encoded [`OpRecord`].
const RECORD_FORMAT: u8 = 2;
/// Format byte of records written before epochs.
const RECORD_FORMAT_LEGACY: u8 = 1;

/// One durable record: changes that entered one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpRecord {
    /// The document.
    pub doc: DocId,
    /// The changes.
    pub changes: ChangeBatch,
}

impl OpRecord {
    /// Encodes the record (layout in the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let doc = self.doc.to_string();
        let mut bytes = Vec::with_capacity(3 + doc.len() + self.changes.as_bytes().len());
        bytes.push(RECORD_FORMAT);
        // Document ids are far below u16::MAX bytes (DOC_NAME_BYTES_MAX).
        bytes.extend_from_slice(&(doc.len() as u16).to_le_bytes());
        bytes.extend_from_slice(doc.as_bytes());
        bytes.extend_from_slice(self.changes.as_bytes());
        bytes
    }

    /// Decodes a record.
    pub fn decode(bytes: &[u8]) -> Result<OpRecord, Error> {
        let malformed =
            |reason: &str| Error::Malformed { what: "op record", reason: reason.to_owned() };
        let (format, rest) = bytes.split_first().ok_or_else(|| malformed("empty"))?;
        if *format != RECORD_FORMAT && *format != RECORD_FORMAT_LEGACY {
            return Err(malformed("unknown format"));
        }
        let (len, rest) =
            rest.split_first_chunk::<2>().ok_or_else(|| malformed("truncated doc id length"))?;
        let len = usize::from(u16::from_le_bytes(*len));
        if rest.len() < len {
            return Err(malformed("truncated doc id"));
        }
        let (doc, rest) = rest.split_at(len);
        let doc =
            std::str::from_utf8(doc).map_err(|_| malformed("doc id is not UTF-8"))?.parse()?;
        let changes = if *format == RECORD_FORMAT_LEGACY {
            ChangeBatch::from_legacy_bytes(rest)?
        } else {
            ChangeBatch::from_bytes(rest)?
        };
        Ok(OpRecord { doc, changes })
    }
}

/// Where a replica makes its records durable. An implementation returns
/// from [`OpLog::append`] only once the records survive a crash or power
/// cut (group commit welcome).
pub trait OpLog {
    /// Appends `records` durably, in order; returns the position of the
    /// last one. Positions start at 1 and grow by one per record.
    fn append(&mut self, records: &[OpRecord]) -> Result<u64, OpLogError>;

    /// Appends `records` in order like [`OpLog::append`], but may return before they
    /// are durable: they become durable no later than the records of any later
    /// `append` (or [`OpLog::sync`]). A crash may lose them, and then every record
    /// appended after them too. The default waits, as `append` does.
    fn append_unsynced(&mut self, records: &[OpRecord]) -> Result<u64, OpLogError> {
        self.append(records)
    }

    /// Makes every record appended so far durable.
    fn sync(&mut self) -> Result<(), OpLogError> {
        Ok(())
    }

    /// Calls `visit` with every record after `after_position`, in order.
    fn replay(
        &self,
        after_position: u64,
        visit: &mut dyn FnMut(u64, OpRecord) -> Result<(), Error>,
    ) -> Result<(), Error>;

    /// Forgets records up to and including `position` (covered by a durable
    /// snapshot).
    fn truncate_through(&mut self, position: u64) -> Result<(), OpLogError>;

    /// Position of the last record appended, 0 if none.
    fn last_position(&self) -> u64;
}

/// An in-memory [`OpLog`] for tests and simulations: "durable" means the
/// value outlives the replica that owns it (take it back with
/// [`crate::Replica::into_log`]). It stores encoded records, so it
/// exercises the codec, and it can be told to fail appends.
#[derive(Debug, Default, Clone)]
pub struct MemOpLog {
    records: Vec<(u64, Vec<u8>)>,
    last_position: u64,
    /// Records up to here survive [`MemOpLog::crash`].
    synced_position: u64,
    failing_appends: usize,
}

impl MemOpLog {
    /// An empty log.
    pub fn new() -> MemOpLog {
        MemOpLog::default()
    }

    /// Makes the next `count` appends fail.
    pub fn fail_next_appends(&mut self, count: usize) {
        self.failing_appends = count;
    }

    /// A power cut: forgets the records appended by [`OpLog::append_unsynced`] since
    /// the last `append` or `sync`. Returns how many were lost.
    pub fn crash(&mut self) -> usize {
        let before = self.records.len();
        self.records.retain(|(position, _)| *position <= self.synced_position);
        self.last_position = self.synced_position;
        before - self.records.len()
    }

    /// Records held (after truncation).
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether the log holds no record.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.records.iter().map(|(_, bytes)| bytes.len()).sum()
    }
}

impl OpLog for MemOpLog {
    fn append(&mut self, records: &[OpRecord]) -> Result<u64, OpLogError> {
        self.append_unsynced(records)?;
        self.synced_position = self.last_position;
        Ok(self.last_position)
    }

    fn append_unsynced(&mut self, records: &[OpRecord]) -> Result<u64, OpLogError> {
        if self.failing_appends > 0 {
            self.failing_appends -= 1;
            return Err(OpLogError::Storage("injected append failure".to_owned()));
        }
        for record in records {
            self.last_position += 1;
            self.records.push((self.last_position, record.encode()));
        }
        Ok(self.last_position)
    }

    fn sync(&mut self) -> Result<(), OpLogError> {
        self.synced_position = self.last_position;
        Ok(())
    }

    fn replay(
        &self,
        after_position: u64,
        visit: &mut dyn FnMut(u64, OpRecord) -> Result<(), Error>,
    ) -> Result<(), Error> {
        for (position, bytes) in &self.records {
            if *position > after_position {
                let record = OpRecord::decode(bytes)
                    .map_err(|_| OpLogError::Corrupt { position: *position })?;
                visit(*position, record)?;
            }
        }
        Ok(())
    }

    fn truncate_through(&mut self, position: u64) -> Result<(), OpLogError> {
        self.records.retain(|(p, _)| *p > position);
        Ok(())
    }

    fn last_position(&self) -> u64 {
        self.last_position
    }
}

/// The conformance suite every [`OpLog`] implementation should pass (run
/// it from the implementation's tests with a constructor of empty logs).
pub mod conformance {
    use super::{OpLog, OpRecord};
    use crate::batch::ChangeBatch;
    use crate::doc_id::DocId;

    fn record(name: &str, change: &[u8]) -> OpRecord {
        let mut changes = ChangeBatch::new();
        changes.push(change);
        OpRecord { doc: DocId::counter(name).expect("valid name"), changes }
    }

    fn replayed<L: OpLog>(log: &L, after: u64) -> Vec<(u64, OpRecord)> {
        let mut out = Vec::new();
        log.replay(after, &mut |position, record| {
            out.push((position, record));
            Ok(())
        })
        .expect("replay");
        out
    }

    /// Positions start at 1 and grow by one per record; replay returns
    /// exactly what was appended, in order, after the given position;
    /// truncation forgets records up to a position and nothing after it.
    pub fn run<L: OpLog>(mut new_log: impl FnMut() -> L) {
        let mut log = new_log();
        assert_eq!(log.last_position(), 0);
        assert!(replayed(&log, 0).is_empty());
        let (a, b, c) = (record("a", b"1"), record("b", b"22"), record("c", &[0u8; 300]));
        assert_eq!(log.append(std::slice::from_ref(&a)).expect("append"), 1);
        assert_eq!(log.append(&[b.clone(), c.clone()]).expect("append"), 3);
        assert_eq!(log.last_position(), 3);
        assert_eq!(replayed(&log, 0), vec![(1, a.clone()), (2, b.clone()), (3, c.clone())]);
        assert_eq!(replayed(&log, 2), vec![(3, c.clone())]);
        log.truncate_through(1).expect("truncate");
        assert_eq!(replayed(&log, 0), vec![(2, b.clone()), (3, c.clone())]);
        assert_eq!(log.last_position(), 3);
        assert_eq!(log.append(std::slice::from_ref(&a)).expect("append"), 4);
        assert_eq!(replayed(&log, 3), vec![(4, a.clone())]);
        // Unsynced appends take the next positions and replay once synced.
        assert_eq!(log.append_unsynced(std::slice::from_ref(&b)).expect("append"), 5);
        assert_eq!(log.append_unsynced(&[c.clone(), a.clone()]).expect("append"), 7);
        log.sync().expect("sync");
        assert_eq!(replayed(&log, 4), vec![(5, b), (6, c), (7, a)]);
        assert!(new_log().last_position() == 0, "a new log starts empty");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> OpRecord {
        let mut changes = ChangeBatch::new();
        changes.push(name.as_bytes());
        OpRecord { doc: DocId::counter(name).unwrap(), changes }
    }

    #[test]
    fn mem_log_passes_the_conformance_suite() {
        conformance::run(MemOpLog::new);
    }

    #[test]
    fn records_round_trip() {
        let record = record("production");
        assert_eq!(OpRecord::decode(&record.encode()).unwrap(), record);
        assert!(OpRecord::decode(&[3, 0, 0]).is_err());
        let mut legacy = vec![1u8, 12, 0];
        legacy.extend_from_slice(b"counter:prod");
        legacy.extend_from_slice(&[1, 0, 0, 0, 2, 0, 0, 0, b'h', b'i']);
        let decoded = OpRecord::decode(&legacy).unwrap();
        assert_eq!(decoded.changes.epoch(), 0);
        assert_eq!(decoded.changes.changes(), vec![&b"hi"[..]]);
        assert!(OpRecord::decode(&[1, 200, 0, b'x']).is_err());
    }

    #[test]
    fn a_crash_loses_only_the_unsynced_tail() {
        let mut log = MemOpLog::new();
        log.append(&[record("a")]).unwrap();
        log.append_unsynced(&[record("b")]).unwrap();
        // A later append makes everything before it durable too.
        log.append(&[record("c")]).unwrap();
        log.append_unsynced(&[record("d"), record("e")]).unwrap();
        assert_eq!(log.crash(), 2);
        assert_eq!(log.last_position(), 3);
        assert_eq!(log.crash(), 0);
        assert_eq!(log.append_unsynced(&[record("f")]).unwrap(), 4);
        log.sync().unwrap();
        assert_eq!(log.crash(), 0);
        assert_eq!(log.len(), 4);
    }

    #[test]
    fn mem_log_appends_replays_truncates_and_fails_on_demand() {
        let mut log = MemOpLog::new();
        assert_eq!(log.append(&[record("a"), record("b")]).unwrap(), 2);
        log.fail_next_appends(1);
        assert!(log.append(&[record("c")]).is_err());
        assert_eq!(log.append(&[record("c")]).unwrap(), 3);
        log.truncate_through(1).unwrap();
        let mut seen = Vec::new();
        log.replay(0, &mut |position, record| {
            seen.push((position, record.doc.name().to_owned()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![(2, "b".to_owned()), (3, "c".to_owned())]);
        assert_eq!(log.last_position(), 3);
    }
}
