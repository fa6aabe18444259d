//! OR-set of strings with add-wins semantics, on an automerge map.
//!
//! Members are keys of the root map `members`. An add always writes the key
//! as a fresh automerge op (a new "tag", with a value above every add it
//! sees); a remove deletes the writes its replica has seen. An add
//! concurrent with a remove survives the remove, because the remove never
//! saw it: add wins.

use automerge::transaction::Transactable;
use automerge::{ReadDoc, ScalarValue};

use crate::doc::root_object;
use crate::doc_id::DocId;
use crate::error::Error;

/// Longest set member, in bytes.
pub const SET_MEMBER_BYTES_MAX: usize = 256;

/// The set's members, sorted.
pub(crate) fn members<R: ReadDoc>(doc: &R, id: &DocId) -> Result<Vec<String>, Error> {
    let members = root_object(doc, id, "members")?;
    Ok(doc.keys(&members).collect())
}

/// Whether `member` is in the set.
pub(crate) fn contains<R: ReadDoc>(doc: &R, id: &DocId, member: &str) -> Result<bool, Error> {
    let members = root_object(doc, id, "members")?;
    Ok(doc.get(&members, member)?.is_some())
}

/// The add tags of `member` this replica sees (one per concurrent add).
pub(crate) fn tags<R: ReadDoc>(doc: &R, id: &DocId, member: &str) -> Result<Vec<String>, Error> {
    let members = root_object(doc, id, "members")?;
    Ok(doc.get_all(&members, member)?.into_iter().map(|(_, exid)| exid.to_string()).collect())
}

/// Adds `member` with a fresh tag.
pub(crate) fn add<T: Transactable>(tx: &mut T, id: &DocId, member: &str) -> Result<(), Error> {
    let members = root_object(tx, id, "members")?;
    // automerge skips a put of the value already there, so each add writes
    // a number above every add it sees: always a fresh op.
    let mut next = 1u64;
    for (value, _) in tx.get_all(&members, member)? {
        next = next.max(value.as_u64().unwrap_or(0).saturating_add(1));
    }
    tx.put(&members, member, ScalarValue::Uint(next))?;
    Ok(())
}

/// Removes every add of `member` this replica has seen.
pub(crate) fn remove<T: Transactable>(tx: &mut T, id: &DocId, member: &str) -> Result<(), Error> {
    let members = root_object(tx, id, "members")?;
    tx.delete(&members, member)?;
    Ok(())
}
