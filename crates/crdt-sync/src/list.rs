//! Ordered list of strings (RGA), on an automerge list.
//!
//! Concurrent inserts at the same position are all kept, in an order every
//! replica agrees on; a remove deletes the element its replica saw.

use automerge::transaction::Transactable;
use automerge::{ReadDoc, ScalarValue};

use crate::doc::root_object;
use crate::doc_id::DocId;
use crate::error::Error;

/// Longest list item, in bytes.
pub const LIST_ITEM_BYTES_MAX: usize = 4096;

/// The list's items, in order.
pub(crate) fn items<R: ReadDoc>(doc: &R, id: &DocId) -> Result<Vec<String>, Error> {
    let list = root_object(doc, id, "items")?;
    let mut items = Vec::with_capacity(doc.length(&list));
    for item in doc.list_range(&list, ..) {
        let index = item.index;
        match item.value.into_value().into_string() {
            Ok(text) => items.push(text),
            Err(_) => {
                return Err(Error::Corrupt {
                    name: id.to_string(),
                    reason: format!("list item {index} is not a string"),
                });
            }
        }
    }
    Ok(items)
}

/// Inserts `item` before position `index` (`index == len` appends).
pub(crate) fn insert<T: Transactable>(
    tx: &mut T,
    id: &DocId,
    index: usize,
    item: &str,
) -> Result<(), Error> {
    let list = root_object(tx, id, "items")?;
    let len = tx.length(&list);
    if index > len {
        return Err(Error::IndexOutOfRange { index, len });
    }
    tx.insert(&list, index, ScalarValue::Str(item.into()))?;
    Ok(())
}

/// Removes the item at `index`.
pub(crate) fn remove<T: Transactable>(tx: &mut T, id: &DocId, index: usize) -> Result<(), Error> {
    let list = root_object(tx, id, "items")?;
    let len = tx.length(&list);
    if index >= len {
        return Err(Error::IndexOutOfRange { index, len });
    }
    tx.delete(&list, index)?;
    Ok(())
}
