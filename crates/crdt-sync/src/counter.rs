//! PN-counter idempotent by op_id across replicas: live op entries, acks, folding, tombstones.
//!
//! Layout of a counter document (all maps created by genesis):
//!
//! - `ops`: `op_id -> Int(amount)`, the *live* increments. Two replicas that
//!   accept the same op_id both write this key; the entries conflict in
//!   automerge and the counter counts the key once, with the amount of its
//!   *canonical* entry (the one with the smallest automerge op id).
//! - `acks`: `"{member}|{actor}" -> Uint(op counter)`: member has seen every
//!   `ops` entry written by `actor` up to that automerge op counter. Only the
//!   member itself writes its keys.
//! - `folded`: `node -> Counter`, the per-replica folded totals.
//! - `tomb`: `"{node}|{bucket_end_ms}" -> Map(op_id -> Int(amount))`, op_ids
//!   folded by `node`, kept for the dedup window. Only `node` writes them.
//!
//! `value = sum(folded) + sum(live canonical amounts)`.
//!
//! Folding: an entry is *stable* once every member acked every one of its
//! conflicting writes. A stable entry is folded only by its *folder*, the
//! node whose actor wrote the canonical entry, in one change that deletes the
//! key, records it in the folder's tombstone bucket and adds its amount to
//! `folded[folder]`. Why this is exact: a member writes an op_id only if it
//! sees it neither live nor in a tombstone, so every write of an op_id by a
//! member causally precedes that member's ack of it; once all members have
//! acked, the set of entries for the key is final, every replica computes
//! the same folder, and the folder deletes the key once. See the crate docs
//! for the bound.

use std::collections::BTreeMap;

use automerge::transaction::Transactable;
use automerge::{ActorId, ObjId, ObjType, ReadDoc, ScalarValue, Value};

use crate::doc::{actor_label, actor_node, root_object};
use crate::doc_id::DocId;
use crate::error::Error;

/// Separator inside `acks` and `tomb` keys.
const KEY_SEPARATOR: char = '|';

/// A counter as one replica sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterValue {
    /// The total: folded contributions plus live increments.
    pub value: i64,
    /// Each node's contribution (its folded total plus the live increments
    /// it will fold). Sums to `value`.
    pub replicas: BTreeMap<String, i64>,
    /// Live (not yet folded) op entries.
    pub live_ops: usize,
    /// Folded op_ids still remembered for deduplication.
    pub tombstones: usize,
}

/// The counter document's root objects.
pub(crate) struct Objs {
    ops: ObjId,
    acks: ObjId,
    folded: ObjId,
    tomb: ObjId,
}

impl Objs {
    pub(crate) fn load<R: ReadDoc>(doc: &R, id: &DocId) -> Result<Objs, Error> {
        Ok(Objs {
            ops: root_object(doc, id, "ops")?,
            acks: root_object(doc, id, "acks")?,
            folded: root_object(doc, id, "folded")?,
            tomb: root_object(doc, id, "tomb")?,
        })
    }
}

/// One write of an op_id.
struct Entry {
    amount: i64,
    counter: u64,
    actor: ActorId,
}

fn corrupt(id: &DocId, reason: String) -> Error {
    Error::Corrupt { name: id.to_string(), reason }
}

/// All conflicting writes of `op_id` in `ops`, canonical first.
fn entries<R: ReadDoc>(doc: &R, id: &DocId, objs: &Objs, op_id: &str) -> Result<Vec<Entry>, Error> {
    let mut entries = Vec::new();
    for (value, exid) in doc.get_all(&objs.ops, op_id)? {
        let amount = match &value {
            Value::Scalar(scalar) => match scalar.as_ref() {
                ScalarValue::Int(amount) => *amount,
                other => return Err(corrupt(id, format!("op {op_id:?} holds {other:?}"))),
            },
            Value::Object(_) => return Err(corrupt(id, format!("op {op_id:?} holds an object"))),
        };
        let automerge::ObjId::Id(counter, actor, _) = exid else {
            return Err(corrupt(id, format!("op {op_id:?} has a root id")));
        };
        entries.push(Entry { amount, counter, actor });
    }
    entries.sort_by(|a, b| (a.counter, a.actor.to_bytes()).cmp(&(b.counter, b.actor.to_bytes())));
    Ok(entries)
}

fn folder_of(entry: &Entry) -> String {
    actor_node(&entry.actor).map(str::to_owned).unwrap_or_else(|| actor_label(&entry.actor))
}

/// The counter's value, contributions and bookkeeping sizes.
pub(crate) fn read<R: ReadDoc>(doc: &R, id: &DocId) -> Result<CounterValue, Error> {
    let (replicas, live_ops, tombstones) = read_exact(doc, id)?;
    let total: i128 = replicas.values().sum();
    Ok(CounterValue {
        value: clamp(total),
        replicas: replicas.into_iter().map(|(node, v)| (node, clamp(v))).collect(),
        live_ops,
        tombstones,
    })
}

/// The exact total, without saturation.
pub(crate) fn total<R: ReadDoc>(doc: &R, id: &DocId) -> Result<i128, Error> {
    Ok(read_exact(doc, id)?.0.values().sum())
}

type Contributions = BTreeMap<String, i128>;

fn read_exact<R: ReadDoc>(doc: &R, id: &DocId) -> Result<(Contributions, usize, usize), Error> {
    let objs = Objs::load(doc, id)?;
    let mut replicas: Contributions = BTreeMap::new();
    for node in doc.keys(&objs.folded) {
        if let Some((value, _)) = doc.get(&objs.folded, node.as_str())? {
            let total = value.as_i64().ok_or_else(|| corrupt(id, format!("folded[{node}]")))?;
            *replicas.entry(node).or_default() += i128::from(total);
        }
    }
    let mut live_ops = 0;
    for op_id in doc.keys(&objs.ops) {
        let entries = entries(doc, id, &objs, &op_id)?;
        if let Some(canonical) = entries.first() {
            live_ops += 1;
            *replicas.entry(folder_of(canonical)).or_default() += i128::from(canonical.amount);
        }
    }
    let mut tombstones = 0;
    for bucket_key in doc.keys(&objs.tomb) {
        if let Some((Value::Object(_), bucket)) = doc.get(&objs.tomb, bucket_key.as_str())? {
            tombstones += doc.length(&bucket);
        }
    }
    Ok((replicas, live_ops, tombstones))
}

/// Saturates an exact sum into `i64`; local writes keep totals in range, only
/// concurrent writes at several replicas can leave it.
fn clamp(value: i128) -> i64 {
    i64::try_from(value).unwrap_or(if value < 0 { i64::MIN } else { i64::MAX })
}

/// The map keys `changes` write (op ids, node names), or `None` if one of them writes a
/// root key (then nothing short of a full read knows the total).
pub(crate) fn touched_keys<'a>(
    changes: impl Iterator<Item = &'a automerge::Change>,
) -> Option<std::collections::BTreeSet<String>> {
    let mut keys = std::collections::BTreeSet::new();
    for change in changes {
        for op in change.decode().operations {
            if op.obj == automerge::legacy::ObjectId::Root {
                return None;
            }
            if let automerge::legacy::Key::Map(key) = op.key {
                keys.insert(key.to_string());
            }
        }
    }
    Some(keys)
}

/// What `keys` contribute to the total: each key's canonical live amount in `ops` plus its
/// folded total in `folded`. The total changes only through the keys a change writes, so
/// `total + after - before` over them keeps it exact without a walk of the document.
pub(crate) fn contribution<R: ReadDoc>(
    doc: &R,
    id: &DocId,
    keys: &std::collections::BTreeSet<String>,
) -> Result<i128, Error> {
    let objs = Objs::load(doc, id)?;
    let mut sum: i128 = 0;
    for key in keys {
        if let Some(canonical) = entries(doc, id, &objs, key)?.first() {
            sum += i128::from(canonical.amount);
        }
        if let Some((value, _)) = doc.get(&objs.folded, key.as_str())? {
            let folded = value.as_i64().ok_or_else(|| corrupt(id, format!("folded[{key}]")))?;
            sum += i128::from(folded);
        }
    }
    Ok(sum)
}

/// The amount already recorded for `op_id`, live or in a tombstone.
pub(crate) fn lookup<R: ReadDoc>(doc: &R, id: &DocId, op_id: &str) -> Result<Option<i64>, Error> {
    let objs = Objs::load(doc, id)?;
    if let Some(canonical) = entries(doc, id, &objs, op_id)?.first() {
        return Ok(Some(canonical.amount));
    }
    for bucket_key in doc.keys(&objs.tomb) {
        if let Some((Value::Object(_), bucket)) = doc.get(&objs.tomb, bucket_key.as_str())?
            && let Some((value, _)) = doc.get(&bucket, op_id)?
        {
            let amount =
                value.as_i64().ok_or_else(|| corrupt(id, format!("tombstone {op_id:?}")))?;
            return Ok(Some(amount));
        }
    }
    Ok(None)
}

/// Writes a fresh increment; the caller checked [`lookup`] first.
pub(crate) fn write_increment<T: Transactable>(
    tx: &mut T,
    id: &DocId,
    op_id: &str,
    amount: i64,
) -> Result<(), Error> {
    let objs = Objs::load(tx, id)?;
    tx.put(&objs.ops, op_id, ScalarValue::Int(amount))?;
    Ok(())
}

/// What one maintenance round of a replica writes.
#[derive(Debug, Default)]
pub(crate) struct Maintenance {
    acks: Vec<(String, u64)>,
    folds: Vec<(String, i64)>,
    fold_total: i64,
    expired_buckets: Vec<String>,
}

impl Maintenance {
    pub(crate) fn is_empty(&self) -> bool {
        self.acks.is_empty() && self.folds.is_empty() && self.expired_buckets.is_empty()
    }

    /// Entries this round folds.
    pub(crate) fn folds(&self) -> usize {
        self.folds.len()
    }
}

/// Plans `node`'s acks, folds and tombstone expiry. `members` are all
/// replicas of the counter (including `node`).
pub(crate) fn plan_maintenance<R: ReadDoc>(
    doc: &R,
    id: &DocId,
    node: &str,
    members: &[String],
    now_ms: u64,
    dedup_window_ms: u64,
) -> Result<Maintenance, Error> {
    let objs = Objs::load(doc, id)?;
    let mut plan = Maintenance::default();

    // What this replica has seen, per writing actor.
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    let mut live = Vec::new();
    for op_id in doc.keys(&objs.ops) {
        let entries = entries(doc, id, &objs, &op_id)?;
        for entry in &entries {
            let seen_counter = seen.entry(actor_label(&entry.actor)).or_default();
            *seen_counter = (*seen_counter).max(entry.counter);
        }
        live.push((op_id, entries));
    }
    let ack_of = |member: &str, actor: &str| -> Result<u64, Error> {
        let key = format!("{member}{KEY_SEPARATOR}{actor}");
        Ok(match doc.get(&objs.acks, key.as_str())? {
            Some((value, _)) => value.as_u64().unwrap_or(0),
            None => 0,
        })
    };
    for (actor, counter) in &seen {
        if *counter > ack_of(node, actor)? {
            plan.acks.push((format!("{node}{KEY_SEPARATOR}{actor}"), *counter));
        }
    }

    // Stable entries this replica folds.
    let folded_now = match doc.get(&objs.folded, node)? {
        Some((value, _)) => i128::from(value.as_i64().unwrap_or(0)),
        None => 0,
    };
    let mut fold_total: i128 = 0;
    'entries: for (op_id, entries) in live {
        let Some(canonical) = entries.first() else {
            continue;
        };
        if folder_of(canonical) != node {
            continue;
        }
        for entry in &entries {
            let actor = actor_label(&entry.actor);
            for member in members {
                let acked = if member == node {
                    seen.get(&actor).copied().unwrap_or(0)
                } else {
                    ack_of(member, &actor)?
                };
                if acked < entry.counter {
                    continue 'entries;
                }
            }
        }
        let next = fold_total + i128::from(canonical.amount);
        if i64::try_from(folded_now + next).is_err() {
            // Leave it live; it is still counted, just not folded.
            continue;
        }
        fold_total = next;
        plan.folds.push((op_id, canonical.amount));
    }
    plan.fold_total = i64::try_from(fold_total).unwrap_or(0);

    // This replica's tombstone buckets past the dedup window.
    let prefix = format!("{node}{KEY_SEPARATOR}");
    for bucket_key in doc.keys(&objs.tomb) {
        if let Some(end_ms) =
            bucket_key.strip_prefix(&prefix).and_then(|end| end.parse::<u64>().ok())
            && end_ms.saturating_add(dedup_window_ms) <= now_ms
        {
            plan.expired_buckets.push(bucket_key);
        }
    }
    Ok(plan)
}

/// Writes a planned maintenance round into `tx`.
pub(crate) fn apply_maintenance<T: Transactable>(
    tx: &mut T,
    id: &DocId,
    node: &str,
    plan: &Maintenance,
    now_ms: u64,
    tombstone_bucket_ms: u64,
) -> Result<(), Error> {
    let objs = Objs::load(tx, id)?;
    for (key, counter) in &plan.acks {
        tx.put(&objs.acks, key.as_str(), ScalarValue::Uint(*counter))?;
    }
    if !plan.folds.is_empty() {
        let bucket_ms = tombstone_bucket_ms.max(1);
        let end_ms = (now_ms / bucket_ms).saturating_add(1).saturating_mul(bucket_ms);
        let bucket_key = format!("{node}{KEY_SEPARATOR}{end_ms:020}");
        let bucket = match tx.get(&objs.tomb, bucket_key.as_str())? {
            Some((Value::Object(_), bucket)) => bucket,
            _ => tx.put_object(&objs.tomb, bucket_key.as_str(), ObjType::Map)?,
        };
        for (op_id, amount) in &plan.folds {
            tx.delete(&objs.ops, op_id.as_str())?;
            tx.put(&bucket, op_id.as_str(), ScalarValue::Int(*amount))?;
        }
        if plan.fold_total != 0 {
            match tx.get(&objs.folded, node)? {
                Some(_) => tx.increment(&objs.folded, node, plan.fold_total)?,
                None => tx.put(&objs.folded, node, ScalarValue::counter(plan.fold_total))?,
            }
        }
    }
    for bucket_key in &plan.expired_buckets {
        tx.delete(&objs.tomb, bucket_key.as_str())?;
    }
    Ok(())
}
