//! `ChangeBatch`: automerge changes framed for publishing, coalescing and logging.
//!
//! Byte layout (all integers little-endian):
//!
//! ```text
//! count: u32 | count x (len: u32 | len bytes of one automerge change)
//! ```

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

impl Default for ChangeBatch {
    fn default() -> Self {
        ChangeBatch::new()
    }
}

impl ChangeBatch {
    /// An empty batch.
    pub fn new() -> ChangeBatch {
        ChangeBatch { bytes: 0u32.to_le_bytes().to_vec(), count: 0 }
    }

    pub(crate) fn push(&mut self, change: &[u8]) {
        self.count += 1;
        self.bytes[..4].copy_from_slice(&(self.count as u32).to_le_bytes());
        self.bytes.extend_from_slice(&(change.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(change);
    }

    /// Appends every change of `other` (coalescing).
    pub fn extend(&mut self, other: &ChangeBatch) {
        self.count += other.count;
        self.bytes[..4].copy_from_slice(&(self.count as u32).to_le_bytes());
        self.bytes.extend_from_slice(&other.bytes[4..]);
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
        let changes = split(bytes)?;
        Ok(ChangeBatch { bytes: bytes.to_vec(), count: changes.len() })
    }

    /// The encoded changes.
    pub(crate) fn changes(&self) -> Vec<&[u8]> {
        // The framing was checked on construction.
        split(&self.bytes).unwrap_or_default()
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
        a.extend(&b);
        assert_eq!(a.len(), 3);
        let decoded = ChangeBatch::from_bytes(a.as_bytes()).unwrap();
        assert_eq!(decoded.changes(), vec![&b"one"[..], b"two", b""]);
    }

    #[test]
    fn bad_framing_is_rejected() {
        assert!(ChangeBatch::from_bytes(b"").is_err());
        assert!(ChangeBatch::from_bytes(&[1, 0, 0, 0]).is_err());
        assert!(ChangeBatch::from_bytes(&[1, 0, 0, 0, 9, 0, 0, 0, 1]).is_err());
        assert!(ChangeBatch::from_bytes(&[0, 0, 0, 0, 7]).is_err());
        assert!(ChangeBatch::from_bytes(&u32::MAX.to_le_bytes()).is_err());
    }
}
