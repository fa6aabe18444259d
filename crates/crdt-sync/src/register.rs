//! LWW-register of versioned JSON values: the highest version wins, ties by the value's bytes.
//!
//! The register is the root key `value` holding `Bytes(version_be_u64 ||
//! json)`. Concurrent writes conflict in automerge; the register reads all
//! conflicting writes and returns the one with the highest
//! `(version, json bytes)`, so every replica picks the same winner whatever
//! automerge's own conflict order. A later write overwrites every write its
//! replica has seen.

use automerge::transaction::Transactable;
use automerge::{ROOT, ReadDoc, ScalarValue, Value};

use crate::doc_id::DocId;
use crate::error::Error;

/// Largest register value, in bytes of its JSON encoding.
pub const REGISTER_VALUE_BYTES_MAX: usize = 64 * 1024;

/// Root key of the register's value.
const VALUE_KEY: &str = "value";
/// Bytes of the version prefix.
const VERSION_BYTES: usize = 8;

/// A register's current value.
#[derive(Debug, Clone, PartialEq)]
pub struct RegisterValue {
    /// The value.
    pub value: serde_json::Value,
    /// Its version.
    pub version: u64,
}

/// The winning `(version, json)` write, if any.
pub(crate) fn read_raw<R: ReadDoc>(doc: &R, id: &DocId) -> Result<Option<(u64, Vec<u8>)>, Error> {
    let mut best: Option<(u64, Vec<u8>)> = None;
    for (value, _) in doc.get_all(ROOT, VALUE_KEY)? {
        let bytes = match &value {
            Value::Scalar(scalar) => match scalar.as_ref() {
                ScalarValue::Bytes(bytes) if bytes.len() >= VERSION_BYTES => bytes.clone(),
                _ => return Err(corrupt(id)),
            },
            Value::Object(_) => return Err(corrupt(id)),
        };
        let (version, json) = bytes.split_at(VERSION_BYTES);
        let version = u64::from_be_bytes(version.try_into().map_err(|_| corrupt(id))?);
        let candidate = (version, json.to_vec());
        if best.as_ref().is_none_or(|best| candidate > *best) {
            best = Some(candidate);
        }
    }
    Ok(best)
}

fn corrupt(id: &DocId) -> Error {
    Error::Corrupt {
        name: id.to_string(),
        reason: "register value is not versioned bytes".to_owned(),
    }
}

/// The register's winning value, decoded.
pub(crate) fn read<R: ReadDoc>(doc: &R, id: &DocId) -> Result<Option<RegisterValue>, Error> {
    match read_raw(doc, id)? {
        None => Ok(None),
        Some((version, json)) => {
            let value = serde_json::from_slice(&json).map_err(|_| Error::Corrupt {
                name: id.to_string(),
                reason: "register value is not JSON".to_owned(),
            })?;
            Ok(Some(RegisterValue { value, version }))
        }
    }
}

/// Writes `(version, json)`; the caller checked it against [`read_raw`].
pub(crate) fn write<T: Transactable>(tx: &mut T, version: u64, json: &[u8]) -> Result<(), Error> {
    let mut bytes = Vec::with_capacity(VERSION_BYTES + json.len());
    bytes.extend_from_slice(&version.to_be_bytes());
    bytes.extend_from_slice(json);
    tx.put(ROOT, VALUE_KEY, ScalarValue::Bytes(bytes))?;
    Ok(())
}
