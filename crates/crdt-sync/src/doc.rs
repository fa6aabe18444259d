//! Document plumbing shared by the typed CRDTs: deterministic genesis, actor ids, object lookup.
//!
//! Every document starts from a *genesis* change that creates its root
//! objects. The genesis is built with a fixed actor and time, so every
//! replica produces the very same change (same hash): replicas that create a
//! document independently share its root objects instead of creating
//! conflicting ones.

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, Change, ObjId, ObjType, ROOT, ReadDoc, Value};

use crate::doc_id::{DocId, DocKind};
use crate::error::Error;

/// Actor of the genesis change of every document.
const GENESIS_ACTOR: &[u8] = b"keel-genesis";
/// Separator between node id and incarnation in an actor id.
pub(crate) const ACTOR_SEPARATOR: char = '#';

/// The genesis change of a document of `kind`; identical on every replica.
pub(crate) fn genesis_change(kind: DocKind) -> Change {
    let mut doc = Automerge::new().with_actor(ActorId::from(GENESIS_ACTOR));
    let mut tx = doc.transaction();
    let objects: &[(&str, ObjType)] = match kind {
        DocKind::Counter => &[
            ("ops", ObjType::Map),
            ("acks", ObjType::Map),
            ("folded", ObjType::Map),
            ("tomb", ObjType::Map),
        ],
        DocKind::Register => &[],
        DocKind::Set => &[("members", ObjType::Map)],
        DocKind::List => &[("items", ObjType::List)],
    };
    // Writes into a fresh, local document cannot fail.
    tx.put(ROOT, "kind", kind.as_str()).expect("genesis put on a fresh document");
    for (key, obj_type) in objects {
        tx.put_object(ROOT, *key, *obj_type).expect("genesis put_object on a fresh document");
    }
    tx.commit_with(CommitOptions::default().with_time(0));
    doc.get_last_local_change().expect("genesis change was just committed")
}

/// A new document for `id` holding only its genesis, written by `actor`.
pub(crate) fn new_doc(id: &DocId, actor: &ActorId) -> Result<Automerge, Error> {
    let mut doc = Automerge::new().with_actor(actor.clone());
    doc.apply_changes([genesis_change(id.kind())])?;
    Ok(doc)
}

/// The actor id of incarnation `incarnation` of node `node_id`.
pub(crate) fn actor_for(node_id: &str, incarnation: u64) -> ActorId {
    ActorId::from(format!("{node_id}{ACTOR_SEPARATOR}{incarnation}").into_bytes())
}

/// The actor's printable form: its UTF-8 text for Keel's actors, hex otherwise.
pub(crate) fn actor_label(actor: &ActorId) -> String {
    match std::str::from_utf8(actor.to_bytes()) {
        Ok(text) => text.to_owned(),
        Err(_) => actor.to_hex_string(),
    }
}

/// The node id an actor belongs to, if it is one of Keel's actors.
pub(crate) fn actor_node(actor: &ActorId) -> Option<&str> {
    let text = std::str::from_utf8(actor.to_bytes()).ok()?;
    let (node, _incarnation) = text.rsplit_once(ACTOR_SEPARATOR)?;
    Some(node)
}

/// The root object `key` of `doc`, which genesis created.
pub(crate) fn root_object<R: ReadDoc>(doc: &R, id: &DocId, key: &str) -> Result<ObjId, Error> {
    match doc.get(ROOT, key)? {
        Some((Value::Object(_), obj)) => Ok(obj),
        _ => Err(Error::Corrupt {
            name: id.to_string(),
            reason: format!("root object {key:?} is missing"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn genesis_is_identical_on_every_call() {
        for kind in DocKind::ALL {
            assert_eq!(genesis_change(kind).hash(), genesis_change(kind).hash());
        }
        assert_ne!(genesis_change(DocKind::Counter).hash(), genesis_change(DocKind::Set).hash());
    }

    #[test]
    fn actor_ids_carry_their_node() {
        let actor = actor_for("node-a", 7);
        assert_eq!(actor_node(&actor), Some("node-a"));
        assert_eq!(actor_label(&actor), "node-a#7");
        assert_eq!(actor_node(&ActorId::from(GENESIS_ACTOR)), None);
    }
}
