//! `ChangeBatch`: automerge changes framed for publishing, coalescing and logging.
//!
//! Byte layout (all integers little-endian):
//!
//! ```text
//! format: u8 = 2 | epoch: u64 | count: u32 | count x (len: u32 | len bytes of one automerge change)
//! ```
//!
//! The epoch says which of a counter's epoch documents the changes belong to
//! (always 0 for other kinds; see "Epochs" in the crate docs). Format 1, read from op
//! logs written before epochs, had no format byte and no epoch: `count | changes`.

use crate::error::Error;

/// Most changes one batch may hold when decoded.
pub const BATCH_CHANGES_MAX: usize = 65_536;
/// Largest batch accepted when decoded, in bytes.
pub const BATCH_BYTES_MAX: usize = 64 * 1024 * 1024;

/// A batch of encoded automerge changes of one document. Opaque to callers:
/// publish [`ChangeBatch::as_bytes`], feed received bytes to
/// [`crate::Replica::apply_changes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeBatch {
    bytes: Vec<u8>,
    count: usize,
}

/// Format byte of an encoded batch.
const BATCH_FORMAT: u8 = 2;
/// Bytes before the first change: format, epoch, count.
const HEADER_BYTES: usize = 1 + 8 + 4;

impl Default for ChangeBatch {
    fn default() -> Self {
        ChangeBatch::new()
    }
}

impl ChangeBatch {
    /// An empty batch of epoch 0 (an empty batch takes the epoch of the first batch
    /// [`ChangeBatch::extend`] adds to it).
    pub fn new() -> ChangeBatch {
        ChangeBatch::for_epoch(0)
    }

    /// An empty batch of `epoch`.
    pub(crate) fn for_epoch(epoch: u64) -> ChangeBatch {
        let mut bytes = Vec::with_capacity(HEADER_BYTES);
        bytes.push(BATCH_FORMAT);
        bytes.extend_from_slice(&epoch.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        ChangeBatch { bytes, count: 0 }
    }

    /// The epoch of the document the changes belong to.
    pub fn epoch(&self) -> u64 {
        let mut epoch = [0u8; 8];
        epoch.copy_from_slice(&self.bytes[1..9]);
        u64::from_le_bytes(epoch)
    }

    fn set_count(&mut self, count: usize) {
        self.count = count;
        self.bytes[9..HEADER_BYTES].copy_from_slice(&(count as u32).to_le_bytes());
    }

    pub(crate) fn push(&mut self, change: &[u8]) {
        self.set_count(self.count + 1);
        self.bytes.extend_from_slice(&(change.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(change);
    }

    /// Appends every change of `other` (coalescing). Batches of two epochs do not mix:
    /// returns false and changes nothing when both hold changes of different epochs (an
    /// empty batch takes `other`'s epoch).
    #[must_use]
    pub fn extend(&mut self, other: &ChangeBatch) -> bool {
        if self.count == 0 {
            self.bytes[1..9].copy_from_slice(&other.epoch().to_le_bytes());
        } else if other.count > 0 && other.epoch() != self.epoch() {
            return false;
        }
        self.set_count(self.count + other.count);
        self.bytes.extend_from_slice(&other.bytes[HEADER_BYTES..]);
        true
    }

    /// Number of changes.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the batch holds no change.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The encoded batch.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The encoded batch, by value.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Decodes and checks the framing (not the changes themselves).
    pub fn from_bytes(bytes: &[u8]) -> Result<ChangeBatch, Error> {
        let (format, _) = bytes.split_first().ok_or_else(|| malformed("empty"))?;
        if *format != BATCH_FORMAT {
            return Err(malformed(format!("unknown format {format}")));
        }
        if bytes.len() < HEADER_BYTES {
            return Err(malformed("truncated header"));
        }
        let changes = split(&bytes[9..])?;
        Ok(ChangeBatch { bytes: bytes.to_vec(), count: changes.len() })
    }

    /// Decodes a format 1 batch (op logs written before epochs): epoch 0.
    pub(crate) fn from_legacy_bytes(bytes: &[u8]) -> Result<ChangeBatch, Error> {
        let changes = split(bytes)?;
        let mut batch = ChangeBatch::new();
        for change in changes {
            batch.push(change);
        }
        Ok(batch)
    }

    /// The encoded changes.
    pub(crate) fn changes(&self) -> Vec<&[u8]> {
        // The framing was checked on construction.
        split(&self.bytes[9..]).unwrap_or_default()
    }
}

fn malformed(reason: impl Into<String>) -> Error {
    Error::Malformed { what: "change batch", reason: reason.into() }
}

fn split(bytes: &[u8]) -> Result<Vec<&[u8]>, Error> {
    if bytes.len() > BATCH_BYTES_MAX {
        return Err(malformed(format!("{} bytes exceeds the limit", bytes.len())));
    }
    let (count, mut rest) = take_u32(bytes).ok_or_else(|| malformed("truncated count"))?;
    let count = count as usize;
    if count > BATCH_CHANGES_MAX {
        return Err(malformed(format!("{count} changes exceeds the limit")));
    }
    let mut changes = Vec::with_capacity(count);
    for _ in 0..count {
        let (len, after) = take_u32(rest).ok_or_else(|| malformed("truncated length"))?;
        let len = len as usize;
        if after.len() < len {
            return Err(malformed("truncated change"));
        }
        let (change, after) = after.split_at(len);
        changes.push(change);
        rest = after;
    }
    if !rest.is_empty() {
        return Err(malformed(format!("{} trailing bytes", rest.len())));
    }
    Ok(changes)
}

pub(crate) fn take_u32(bytes: &[u8]) -> Option<(u32, &[u8])> {
    let (head, rest) = bytes.split_first_chunk::<4>()?;
    Some((u32::from_le_bytes(*head), rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip_and_coalesce() {
        let mut a = ChangeBatch::new();
        a.push(b"one");
        let mut b = ChangeBatch::new();
        b.push(b"two");
        b.push(b"");
        assert!(a.extend(&b));
        assert_eq!(a.len(), 3);
        let decoded = ChangeBatch::from_bytes(a.as_bytes()).unwrap();
        assert_eq!(decoded.changes(), vec![&b"one"[..], b"two", b""]);
        assert_eq!(decoded.epoch(), 0);
    }

    #[test]
    fn batches_of_two_epochs_do_not_mix() {
        let mut later = ChangeBatch::for_epoch(7);
        later.push(b"x");
        let mut empty = ChangeBatch::new();
        assert!(empty.extend(&later), "an empty batch takes the other's epoch");
        assert_eq!(ChangeBatch::from_bytes(empty.as_bytes()).unwrap().epoch(), 7);
        let mut earlier = ChangeBatch::for_epoch(6);
        earlier.push(b"y");
        assert!(!earlier.extend(&later));
        assert_eq!(earlier.len(), 1);
        assert_eq!(earlier.epoch(), 6);
        let legacy = [1u8, 0, 0, 0, 1, 0, 0, 0, b'z'];
        let decoded = ChangeBatch::from_legacy_bytes(&legacy).unwrap();
        assert_eq!((decoded.epoch(), decoded.changes()), (0, vec![&b"z"[..]]));
    }

    #[test]
    fn bad_framing_is_rejected() {
        let header = |count: u32| {
            let mut bytes = vec![BATCH_FORMAT];
            bytes.extend_from_slice(&3u64.to_le_bytes());
            bytes.extend_from_slice(&count.to_le_bytes());
            bytes
        };
        assert!(ChangeBatch::from_bytes(b"").is_err());
        assert!(ChangeBatch::from_bytes(&[BATCH_FORMAT, 0, 0]).is_err());
        assert!(ChangeBatch::from_bytes(&header(1)).is_err());
        let mut truncated = header(1);
        truncated.extend_from_slice(&[9, 0, 0, 0, 1]);
        assert!(ChangeBatch::from_bytes(&truncated).is_err());
        let mut trailing = header(0);
        trailing.push(7);
        assert!(ChangeBatch::from_bytes(&trailing).is_err());
        assert!(ChangeBatch::from_bytes(&header(u32::MAX)).is_err());
        assert!(ChangeBatch::from_bytes(&[1, 0, 0, 0, 0]).is_err(), "format 1 is not on the wire");
        assert_eq!(ChangeBatch::from_bytes(&header(0)).unwrap().epoch(), 3);
    }
}
