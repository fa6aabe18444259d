//! PN-counter idempotent by op_id across replicas: live op entries, acks, folding, tombstones.
//!
//! Layout of a counter document (all maps created by genesis):
//!
//! - `shards`: `Uint(OP_SHARDS)` (layout 2). `ops` and every tombstone bucket are
//!   then maps of [`OP_SHARDS`] child maps, keyed by two hex digits of an FNV-1a hash
//!   of the op_id, and an op_id's key lives in its shard (below, `ops[op_id]` means
//!   `ops[shard(op_id)][op_id]`). automerge applies a remote change to a map by walking
//!   the map's ops, deleted ones too, up to the keys it writes; a flat map of every
//!   op_id of an epoch made each remote apply a pass over the epoch (2.3 ms p50 per
//!   batch at 1,000 increments/s, 0.57 ms with shards). Epoch 0 (the deterministic
//!   genesis, unchanged so that logs and peers of earlier versions still agree on it)
//!   and epochs built by earlier versions are flat; every genesis built now is sharded,
//!   and the coordinator rebases a flat epoch after at most
//!   [`crate::replica::FLAT_EPOCH_CHANGES_MAX`] changes. An earlier version cannot read
//!   a sharded epoch: upgrade every member before the coordinator (the lowest id).
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
//! A counter of epoch 1 or later (see "Epochs" in the crate docs) starts from a
//! genesis built by the coordinator that also holds `epoch` (Uint), `sealed`
//! (`"{node}|{bucket_end_ms}" -> Bytes`: tombstones the epoch inherited, one
//! sorted blob per bucket, layout at [`encode_sealed`]) and `joined`
//! (`node -> true`: the members that carried their writes over into this
//! epoch; only the member itself writes its key). A genesis with
//! `sealed_chain` (`Uint(1)`, [`SEALED_CHAIN_KEY`]) seals only the op_ids of
//! the epoch it rebases; those of earlier epochs are in every replica's
//! [`SealedArchive`], outside the documents. One without it (built by earlier
//! versions) seals the whole dedup window.
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

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use automerge::transaction::Transactable;
use automerge::{ActorId, ObjId, ObjType, ReadDoc, ScalarValue, Value};

use crate::doc::{actor_label, actor_node, root_object};
use crate::doc_id::{DocId, DocKind};
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

/// Child maps of `ops` and of every tombstone bucket in a sharded counter (layout 2).
/// automerge applies a remote change to a map by walking the map's ops (deleted ones
/// too) up to the keys it writes, so one flat map of every op_id of an epoch made each
/// remote apply cost a pass over the epoch; a shard holds 1/64 of it.
pub(crate) const OP_SHARDS: u64 = 64;
/// Root key of a sharded counter: `Uint(OP_SHARDS)`. Counters without it (created before
/// layout 2) keep one flat `ops` map and flat tombstone buckets until their next epoch.
pub(crate) const SHARDS_KEY: &str = "shards";

/// Root key of a genesis that seals only the epoch it rebases (see the module docs): the
/// tombstones of earlier epochs stay in each replica's [`SealedArchive`]. Before it, every
/// genesis copied the whole dedup window's sealed tombstones into a new document, a new
/// change and a new op log record (at 1,000 increments/s, 639 MB logged per 1,000,000
/// increments in crdt-sync's growth bench against 168 MB since, and counter-bench's
/// replica peaked at 91.0 MB of RSS against 44.6 MB since).
pub(crate) const SEALED_CHAIN_KEY: &str = "sealed_chain";

/// Whether counter document `doc` has the sharded layout (layout 2).
pub(crate) fn is_sharded<R: ReadDoc>(doc: &R) -> bool {
    matches!(doc.get(automerge::ROOT, SHARDS_KEY), Ok(Some(_)))
}

/// The shard key of `op_id`: two hex digits.
fn shard_key(op_id: &str) -> String {
    format!("{:02x}", op_hash(op_id) % OP_SHARDS)
}

/// A map of op_id keys: one map (layout 1) or [`OP_SHARDS`] child maps keyed by
/// [`shard_key`] (layout 2).
#[derive(Debug, Clone)]
pub(crate) struct OpMap {
    obj: ObjId,
    sharded: bool,
}

impl OpMap {
    /// Creates an op map at `parent[key]`.
    pub(crate) fn create<T: Transactable>(
        tx: &mut T,
        parent: &ObjId,
        key: &str,
        sharded: bool,
    ) -> Result<OpMap, Error> {
        let obj = tx.put_object(parent, key, ObjType::Map)?;
        if sharded {
            for shard in 0..OP_SHARDS {
                tx.put_object(&obj, format!("{shard:02x}").as_str(), ObjType::Map)?;
            }
        }
        Ok(OpMap { obj, sharded })
    }

    /// The map holding `op_id`.
    fn part<R: ReadDoc>(&self, doc: &R, id: &DocId, op_id: &str) -> Result<ObjId, Error> {
        if !self.sharded {
            return Ok(self.obj.clone());
        }
        let key = shard_key(op_id);
        match doc.get(&self.obj, key.as_str())? {
            Some((Value::Object(_), part)) => Ok(part),
            _ => Err(corrupt(id, format!("shard {key} is missing"))),
        }
    }

    /// Every map of it.
    fn parts<R: ReadDoc>(&self, doc: &R) -> Result<Vec<ObjId>, Error> {
        if !self.sharded {
            return Ok(vec![self.obj.clone()]);
        }
        let mut parts = Vec::with_capacity(OP_SHARDS as usize);
        for key in doc.keys(&self.obj) {
            if let Some((Value::Object(_), part)) = doc.get(&self.obj, key.as_str())? {
                parts.push(part);
            }
        }
        Ok(parts)
    }

    /// Every op_id with its amount, in one pass over each map. Reading a map key by key
    /// (`keys` then a `get` each) cost 12.7 µs a key in a sharded bucket of 18,900
    /// tombstones (240 ms for the epoch's genesis), one pass about 0.6 µs.
    fn amounts<R: ReadDoc>(&self, doc: &R, id: &DocId) -> Result<Vec<(String, i64)>, Error> {
        let mut amounts = Vec::new();
        for part in self.parts(doc)? {
            for item in doc.map_range(&part, ..) {
                let amount = match item.value {
                    automerge::ValueRef::Scalar(automerge::ScalarValueRef::Int(amount)) => amount,
                    _ => return Err(corrupt(id, format!("tombstone {:?}", item.key))),
                };
                amounts.push((item.key.into_owned(), amount));
            }
        }
        Ok(amounts)
    }

    /// How many op_ids it holds.
    fn len<R: ReadDoc>(&self, doc: &R) -> Result<usize, Error> {
        Ok(self.parts(doc)?.iter().map(|part| doc.length(part)).sum())
    }

    /// The amount stored for `op_id`.
    fn get<R: ReadDoc>(&self, doc: &R, id: &DocId, op_id: &str) -> Result<Option<i64>, Error> {
        match doc.get(&self.part(doc, id, op_id)?, op_id)? {
            Some((value, _)) => {
                Ok(Some(value.as_i64().ok_or_else(|| corrupt(id, format!("tombstone {op_id:?}")))?))
            }
            None => Ok(None),
        }
    }
}

/// The counter document's root objects.
pub(crate) struct Objs {
    ops: OpMap,
    sharded: bool,
    acks: ObjId,
    folded: ObjId,
    tomb: ObjId,
    /// Epochs 1 and later only.
    sealed: Option<ObjId>,
    /// Epochs 1 and later only.
    joined: Option<ObjId>,
}

impl Objs {
    pub(crate) fn load<R: ReadDoc>(doc: &R, id: &DocId) -> Result<Objs, Error> {
        let optional = |key: &str| -> Result<Option<ObjId>, Error> {
            Ok(match doc.get(automerge::ROOT, key)? {
                Some((Value::Object(_), obj)) => Some(obj),
                _ => None,
            })
        };
        let sharded = doc.get(automerge::ROOT, SHARDS_KEY)?.is_some();
        Ok(Objs {
            ops: OpMap { obj: root_object(doc, id, "ops")?, sharded },
            sharded,
            acks: root_object(doc, id, "acks")?,
            folded: root_object(doc, id, "folded")?,
            tomb: root_object(doc, id, "tomb")?,
            sealed: optional("sealed")?,
            joined: optional("joined")?,
        })
    }
}

/// FNV-1a, 64 bits: the in-memory index of sealed tombstones keeps only these (a hit
/// is confirmed against the blob, so a collision costs a read, never a lost increment).
fn op_hash(op_id: &str) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    for byte in op_id.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Marks a sealed blob of layout 2 in the top bit of its count.
const SEALED_COMPACT: u32 = 1 << 31;

/// Encodes sealed tombstones (sorted by op_id, as a `BTreeMap` iterates), layout 2:
/// `count | SEALED_COMPACT: u32 | count x (op_id_len: u8 | op_id | amount)`, little-endian,
/// the amount zigzag LEB128 (1 byte for -64..=63). Layout 1 (still read, no longer
/// written) had a clear top bit and the amount as a fixed 8-byte i64: 17 bytes an entry
/// for an 8-byte op_id against 10 now, in the document, every genesis change, the op log
/// and the snapshots. A member that only reads layout 1 cannot read a genesis of layout
/// 2: upgrade every member before the coordinator.
pub(crate) fn encode_sealed(entries: &BTreeMap<String, i64>) -> Vec<u8> {
    let mut blob = SealedWriter::with_capacity(entries.len() * 10);
    for (op_id, amount) in entries {
        blob.push(op_id, *amount);
    }
    blob.finish()
}

/// Builds a sealed blob of layout 2, entry by entry, in op_id order.
struct SealedWriter {
    bytes: Vec<u8>,
    count: u32,
}

impl SealedWriter {
    fn with_capacity(entry_bytes: usize) -> SealedWriter {
        let mut bytes = Vec::with_capacity(4 + entry_bytes);
        bytes.extend_from_slice(&SEALED_COMPACT.to_le_bytes());
        SealedWriter { bytes, count: 0 }
    }

    fn push(&mut self, op_id: &str, amount: i64) {
        // op_ids are at most OP_ID_BYTES_MAX (128) bytes.
        self.bytes.push(op_id.len() as u8);
        self.bytes.extend_from_slice(op_id.as_bytes());
        let mut zigzag = ((amount << 1) ^ (amount >> 63)) as u64;
        while zigzag >= 0x80 {
            self.bytes.push((zigzag as u8) | 0x80);
            zigzag >>= 7;
        }
        self.bytes.push(zigzag as u8);
        self.count += 1;
    }

    fn finish(mut self) -> Vec<u8> {
        self.bytes[..4].copy_from_slice(&(self.count | SEALED_COMPACT).to_le_bytes());
        self.bytes
    }
}

/// Reads a zigzag LEB128 i64 off the front of `bytes`.
fn take_zigzag(bytes: &[u8]) -> Option<(i64, &[u8])> {
    let mut value: u64 = 0;
    for (i, byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let amount = ((value >> 1) as i64) ^ -((value & 1) as i64);
            return Some((amount, &bytes[i + 1..]));
        }
    }
    None
}

/// Calls `visit` with every entry of a sealed blob (either layout); `false` if it is
/// malformed.
fn decode_sealed(bytes: &[u8], mut visit: impl FnMut(&str, i64) -> bool) -> bool {
    let Some((header, mut rest)) = crate::batch::take_u32(bytes) else {
        return false;
    };
    let compact = header & SEALED_COMPACT != 0;
    for _ in 0..header & !SEALED_COMPACT {
        let Some((len, after)) = rest.split_first() else {
            return false;
        };
        let len = usize::from(*len);
        if after.len() < len {
            return false;
        }
        let Ok(op_id) = std::str::from_utf8(&after[..len]) else {
            return false;
        };
        let after = &after[len..];
        let (amount, next) = if compact {
            match take_zigzag(after) {
                Some(taken) => taken,
                None => return false,
            }
        } else {
            match after.split_first_chunk::<8>() {
                Some((amount, next)) => (i64::from_le_bytes(*amount), next),
                None => return false,
            }
        };
        if !visit(op_id, amount) {
            return true;
        }
        rest = next;
    }
    rest.is_empty()
}

/// Hashes of the sealed tombstones of the current epoch document, per bucket key
/// (sorted, for binary search), and the [`SealedArchive`] of earlier epochs. Built when the
/// document is installed; a bucket deleted since (expiry) is skipped because lookups follow
/// the document's keys.
#[derive(Debug, Default)]
pub(crate) struct SealedIndex {
    buckets: BTreeMap<String, Vec<u64>>,
    pub(crate) archive: SealedArchive,
}

impl SealedIndex {
    /// An index of no document's buckets, with `archive`.
    pub(crate) fn with_archive(archive: SealedArchive) -> SealedIndex {
        SealedIndex { archive, ..SealedIndex::default() }
    }

    /// The index of `doc`'s sealed buckets, beside `archive`.
    pub(crate) fn build<R: ReadDoc>(
        doc: &R,
        id: &DocId,
        archive: SealedArchive,
    ) -> Result<SealedIndex, Error> {
        let mut index = SealedIndex::with_archive(archive);
        let Ok(objs) = Objs::load(doc, id) else {
            return Ok(index);
        };
        let Some(sealed) = &objs.sealed else {
            return Ok(index);
        };
        for key in doc.keys(sealed) {
            let bytes = sealed_blob(doc, id, sealed, &key)?;
            let hashes = sealed_hashes(&bytes)
                .ok_or_else(|| corrupt(id, format!("sealed bucket {key:?}")))?;
            index.buckets.insert(key, hashes);
        }
        Ok(index)
    }

    /// Adds the blobs of a chunk of a peer's archive (checked when it was decoded) that
    /// neither the archive nor the current document holds. Returns how many it added.
    pub(crate) fn merge(&mut self, incoming: SealedArchive) -> usize {
        let before = self.archive.blobs.len();
        for blob in incoming.blobs {
            if self.buckets.get(&blob.bucket) != Some(&blob.hashes) {
                self.archive.push(blob.bucket, blob.deflated, blob.hashes);
            }
        }
        self.archive.blobs.len() - before
    }

    /// Whether the archive or the current document holds the blob of a manifest entry
    /// ([`SealedArchive::manifest`]).
    pub(crate) fn holds(&self, bucket: &str, digest: u64) -> bool {
        self.buckets.get(bucket).is_some_and(|hashes| hashes_digest(hashes) == digest)
            || self.archive.blobs.iter().any(|blob| blob.bucket == bucket && blob.digest == digest)
    }

    /// Sealed tombstones in buckets the document still holds, and in the archive.
    fn count<R: ReadDoc>(&self, doc: &R, objs: &Objs) -> usize {
        let Some(sealed) = &objs.sealed else {
            return self.archive.count();
        };
        let in_doc: usize =
            doc.keys(sealed).map(|key| self.buckets.get(&key).map_or(0, Vec::len)).sum();
        in_doc + self.archive.count()
    }

    fn lookup<R: ReadDoc>(
        &self,
        doc: &R,
        id: &DocId,
        sealed: Option<&ObjId>,
        op_id: &str,
    ) -> Result<Option<i64>, Error> {
        let hash = op_hash(op_id);
        if let Some(sealed) = sealed {
            for key in doc.keys(sealed) {
                let maybe =
                    self.buckets.get(&key).is_none_or(|hashes| hashes.binary_search(&hash).is_ok());
                if !maybe {
                    continue;
                }
                let bytes = sealed_blob(doc, id, sealed, &key)?;
                if let Some(amount) = find_sealed(&bytes, op_id) {
                    return Ok(Some(amount));
                }
            }
        }
        Ok(self.archive.lookup(hash, op_id))
    }
}

/// The sorted op_id hashes of a sealed blob, `None` if it is malformed.
fn sealed_hashes(bytes: &[u8]) -> Option<Vec<u64>> {
    let count = crate::batch::take_u32(bytes).map_or(0, |(header, _)| header & !SEALED_COMPACT);
    // Sized by the blob's count (each entry takes at least 2 bytes, so a malformed count
    // cannot reserve more than the blob's size in hashes).
    let mut hashes = Vec::with_capacity((count as usize).min(bytes.len() / 2));
    if !decode_sealed(bytes, |op_id, _| {
        hashes.push(op_hash(op_id));
        true
    }) {
        return None;
    }
    hashes.sort_unstable();
    Some(hashes)
}

/// The amount a sealed blob holds for `op_id`.
fn find_sealed(bytes: &[u8], op_id: &str) -> Option<i64> {
    let mut found = None;
    decode_sealed(bytes, |candidate, amount| {
        if candidate == op_id {
            found = Some(amount);
            return false;
        }
        true
    });
    found
}

/// A digest of a blob's sorted op_id hashes (FNV-1a over their bytes): names the blob in an
/// archive manifest.
fn hashes_digest(hashes: &[u64]) -> u64 {
    hashes
        .iter()
        .flat_map(|hash| hash.to_le_bytes())
        .fold(0xcbf2_9ce4_8422_2325_u64, |digest, byte| {
            (digest ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
        })
}

/// One archived sealed blob: a tombstone bucket of an earlier epoch.
#[derive(Debug, Clone)]
struct Archived {
    bucket: String,
    /// The end of the bucket's time range (from its key), for expiry.
    end_ms: u64,
    /// The sealed blob, deflated ([`deflate`]): read only when a hash matches.
    deflated: Vec<u8>,
    hashes: Vec<u64>,
    /// [`hashes_digest`] of `hashes`: names the blob in a manifest.
    digest: u64,
}

/// Largest sealed blob an archived one inflates to: far above an epoch's bucket (an epoch
/// of 20,000 changes seals at most a few hundred thousand op_ids, 10 bytes each for an
/// 8-byte op_id), so a corrupt or hostile blob cannot exhaust memory.
pub(crate) const ARCHIVED_BLOB_BYTES_MAX: u64 = 256 * 1024 * 1024;

/// Deflates a sealed blob (raw deflate, zlib's default level; once per blob, when it is
/// archived: 2.2 bytes an op_id for 20,000 ids of the shape `g-000000`, 3.9 at the fast
/// level).
fn deflate(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::DeflateEncoder::new(
        Vec::with_capacity(bytes.len() / 4),
        flate2::Compression::default(),
    );
    encoder.write_all(bytes).expect("writing to a vector");
    let mut out = encoder.finish().expect("writing to a vector");
    out.shrink_to_fit();
    out
}

/// Inflates an archived blob, `None` if it is malformed or inflates past
/// [`ARCHIVED_BLOB_BYTES_MAX`].
fn inflate(deflated: &[u8]) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    let decoder = flate2::read::DeflateDecoder::new(deflated);
    decoder.take(ARCHIVED_BLOB_BYTES_MAX + 1).read_to_end(&mut out).ok()?;
    (out.len() as u64 <= ARCHIVED_BLOB_BYTES_MAX).then_some(out)
}

/// The sealed tombstones of epochs before the current one, kept by a replica outside the
/// automerge documents (in memory and in its snapshots; rebuilt from the geneses when the
/// op log is replayed), so that a genesis carries only its own epoch's op_ids. A replica
/// moves the sealed blobs of the epoch it leaves into it when the next genesis is chained
/// ([`SEALED_CHAIN_KEY`]) and clears it when the next genesis seals the whole window, and
/// drops each blob once its bucket is past the dedup window. Blobs are kept deflated
/// (sealed, an 8-byte op_id takes 10 bytes; deflated, 2.2 for ids of the shape `g-000000`)
/// beside 8 bytes of hash per op_id. Every member that joined an epoch holds the blobs of
/// the epochs since the one it first held; a member restored without its data directory
/// merges a peer's ([`SealedIndex::merge`], see the crate docs).
#[derive(Debug, Clone, Default)]
pub(crate) struct SealedArchive {
    blobs: Vec<Archived>,
}

impl SealedArchive {
    /// An archive of saved `(bucket key, blob)` pairs (from a snapshot): deflated blobs
    /// ([`SealedArchive::saved`]), or plain sealed blobs if `deflated` is false.
    pub(crate) fn from_saved(
        id: &DocId,
        saved: Vec<(String, Vec<u8>)>,
        deflated: bool,
    ) -> Result<Self, Error> {
        let mut archive = SealedArchive::default();
        if !deflated {
            archive.extend(id, saved)?;
            return Ok(archive);
        }
        for (bucket, deflated) in saved {
            let malformed = || corrupt(id, format!("archived sealed bucket {bucket:?}"));
            let hashes =
                sealed_hashes(&inflate(&deflated).ok_or_else(malformed)?).ok_or_else(malformed)?;
            archive.push(bucket, deflated, hashes);
        }
        Ok(archive)
    }

    /// Its blobs as `(bucket key, deflated blob)` pairs, oldest first (for a snapshot).
    pub(crate) fn saved(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.blobs.iter().map(|blob| (blob.bucket.as_str(), blob.deflated.as_slice()))
    }

    /// Adds the sealed blobs of an epoch a replica leaves.
    fn extend(&mut self, id: &DocId, blobs: Vec<(String, Vec<u8>)>) -> Result<(), Error> {
        for (bucket, bytes) in blobs {
            let hashes = sealed_hashes(&bytes)
                .ok_or_else(|| corrupt(id, format!("archived sealed bucket {bucket:?}")))?;
            self.push(bucket, deflate(&bytes), hashes);
        }
        Ok(())
    }

    /// The blobs from the `skip`th on, as [`SealedArchive::saved`] lists them, up to
    /// `bytes_max` of deflated blobs (at least one), and the index to go on from (`None`:
    /// these are the last).
    pub(crate) fn chunk(
        &self,
        skip: usize,
        bytes_max: usize,
    ) -> (Vec<(&str, &[u8])>, Option<usize>) {
        let mut taken = Vec::new();
        let mut bytes = 0;
        for blob in self.blobs.iter().skip(skip) {
            if !taken.is_empty() && bytes + blob.deflated.len() > bytes_max {
                let next = skip + taken.len();
                return (taken, Some(next));
            }
            bytes += blob.deflated.len();
            taken.push((blob.bucket.as_str(), blob.deflated.as_slice()));
        }
        (taken, None)
    }

    /// `(bucket key, digest of its op_ids)` of every blob: what a peer that merged them all
    /// holds.
    pub(crate) fn manifest(&self) -> Vec<(&str, u64)> {
        self.blobs.iter().map(|blob| (blob.bucket.as_str(), blob.digest)).collect()
    }

    /// Adds a blob unless it is empty or already held: the same bucket key can come from
    /// two epochs, so a blob is the same one only if its op_ids are too (a merged peer's
    /// archive may hold blobs this replica archives itself later).
    fn push(&mut self, bucket: String, deflated: Vec<u8>, hashes: Vec<u64>) {
        if hashes.is_empty()
            || self.blobs.iter().any(|blob| blob.bucket == bucket && blob.hashes == hashes)
        {
            return;
        }
        let end_ms = bucket_end_ms(&bucket).unwrap_or(u64::MAX);
        let digest = hashes_digest(&hashes);
        self.blobs.push(Archived { bucket, end_ms, deflated, hashes, digest });
    }

    /// When a replica moves to a new epoch: `leaving` are the sealed blobs of the epoch it
    /// leaves; `chained` says the new epoch's genesis sealed only that epoch's op_ids
    /// (otherwise it sealed the whole window and the archive is not needed).
    pub(crate) fn advance(
        &mut self,
        id: &DocId,
        leaving: Vec<(String, Vec<u8>)>,
        chained: bool,
    ) -> Result<(), Error> {
        if !chained {
            self.blobs.clear();
            return Ok(());
        }
        self.extend(id, leaving)
    }

    /// Drops the blobs whose bucket ended at least `dedup_window_ms` before `now_ms`.
    pub(crate) fn expire(&mut self, now_ms: u64, dedup_window_ms: u64) {
        self.blobs.retain(|blob| blob.end_ms.saturating_add(dedup_window_ms) > now_ms);
    }

    fn lookup(&self, hash: u64, op_id: &str) -> Option<i64> {
        self.blobs
            .iter()
            .rev()
            .filter(|blob| blob.hashes.binary_search(&hash).is_ok())
            // Checked when archived or loaded, so it inflates.
            .find_map(|blob| find_sealed(&inflate(&blob.deflated)?, op_id))
    }

    /// Op_ids it holds.
    pub(crate) fn count(&self) -> usize {
        self.blobs.iter().map(|blob| blob.hashes.len()).sum()
    }

    /// Bytes of its deflated blobs (what a snapshot stores for it).
    pub(crate) fn bytes(&self) -> usize {
        self.blobs.iter().map(|blob| blob.bucket.len() + blob.deflated.len()).sum()
    }
}

/// The end of a tombstone bucket's time range, from its key `"{node}|{end_ms:020}"`.
fn bucket_end_ms(bucket: &str) -> Option<u64> {
    bucket.rsplit_once(KEY_SEPARATOR)?.1.parse().ok()
}

/// The sealed blobs of counter document `doc`, `(bucket key, blob)` (none before its
/// genesis).
pub(crate) fn sealed_buckets<R: ReadDoc>(
    doc: &R,
    id: &DocId,
) -> Result<Vec<(String, Vec<u8>)>, Error> {
    let Ok(objs) = Objs::load(doc, id) else {
        return Ok(Vec::new());
    };
    let Some(sealed) = &objs.sealed else {
        return Ok(Vec::new());
    };
    let mut blobs = Vec::new();
    for key in doc.keys(sealed) {
        let bytes = sealed_blob(doc, id, sealed, &key)?;
        blobs.push((key, bytes));
    }
    Ok(blobs)
}

/// Whether counter document `doc` starts from a chained genesis ([`SEALED_CHAIN_KEY`]).
pub(crate) fn is_chained<R: ReadDoc>(doc: &R) -> bool {
    matches!(doc.get(automerge::ROOT, SEALED_CHAIN_KEY), Ok(Some(_)))
}

fn sealed_blob<R: ReadDoc>(
    doc: &R,
    id: &DocId,
    sealed: &ObjId,
    key: &str,
) -> Result<Vec<u8>, Error> {
    match doc.get(sealed, key)? {
        Some((Value::Scalar(scalar), _)) => match scalar.into_owned() {
            ScalarValue::Bytes(bytes) => Ok(bytes),
            other => Err(corrupt(id, format!("sealed bucket {key:?} holds {other:?}"))),
        },
        _ => Err(corrupt(id, format!("sealed bucket {key:?} is not bytes"))),
    }
}

/// One write of an op_id.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    amount: i64,
    counter: u64,
    actor: ActorId,
}

fn corrupt(id: &DocId, reason: String) -> Error {
    Error::Corrupt { name: id.to_string(), reason }
}

/// All conflicting writes of `op_id` in `ops`, canonical first.
fn entries<R: ReadDoc>(doc: &R, id: &DocId, ops: &OpMap, op_id: &str) -> Result<Vec<Entry>, Error> {
    let mut entries = Vec::new();
    for (value, exid) in doc.get_all(&ops.part(doc, id, op_id)?, op_id)? {
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

/// Every op_id of `ops` with all its conflicting writes, canonical first, in one pass over
/// each map; only a key with conflicts is read again (see [`OpMap::amounts`]).
fn all_entries<R: ReadDoc>(
    doc: &R,
    id: &DocId,
    ops: &OpMap,
) -> Result<Vec<(String, Vec<Entry>)>, Error> {
    let mut all = Vec::new();
    for part in ops.parts(doc)? {
        for item in doc.map_range(&part, ..) {
            let exid = item.id();
            let op_id = item.key.into_owned();
            if item.conflict {
                let entries = entries(doc, id, ops, &op_id)?;
                all.push((op_id, entries));
                continue;
            }
            let amount = match item.value {
                automerge::ValueRef::Scalar(automerge::ScalarValueRef::Int(amount)) => amount,
                other => return Err(corrupt(id, format!("op {op_id:?} holds {other:?}"))),
            };
            let automerge::ObjId::Id(counter, actor, _) = exid else {
                return Err(corrupt(id, format!("op {op_id:?} has a root id")));
            };
            all.push((op_id, vec![Entry { amount, counter, actor }]));
        }
    }
    Ok(all)
}

fn folder_of(entry: &Entry) -> String {
    actor_node(&entry.actor).map(str::to_owned).unwrap_or_else(|| actor_label(&entry.actor))
}

/// The counter's value, contributions and bookkeeping sizes; `extra` is what the
/// previous epoch adds while members have not joined the current one.
pub(crate) fn read<R: ReadDoc>(
    doc: &R,
    id: &DocId,
    sealed: &SealedIndex,
    extra: &Extra,
) -> Result<CounterValue, Error> {
    let (mut replicas, mut live_ops, tombstones) = read_exact(doc, id, sealed)?;
    for (amount, node) in extra.values() {
        *replicas.entry(node.clone()).or_default() += i128::from(*amount);
        live_ops += 1;
    }
    let total: i128 = replicas.values().sum();
    Ok(CounterValue {
        value: clamp(total),
        replicas: replicas.into_iter().map(|(node, v)| (node, clamp(v))).collect(),
        live_ops,
        tombstones,
    })
}

/// The exact total, without saturation.
pub(crate) fn total<R: ReadDoc>(
    doc: &R,
    id: &DocId,
    sealed: &SealedIndex,
    extra: &Extra,
) -> Result<i128, Error> {
    let extra: i128 = extra.values().map(|(amount, _)| i128::from(*amount)).sum();
    Ok(read_exact(doc, id, sealed)?.0.values().sum::<i128>() + extra)
}

type Contributions = BTreeMap<String, i128>;

/// op_id -> (amount, writer's node): increments in the previous epoch document, written
/// by members that have not joined the current epoch yet, that the current one does not
/// know. Counted once each, beside the current document.
pub(crate) type Extra = BTreeMap<String, (i64, String)>;

fn read_exact<R: ReadDoc>(
    doc: &R,
    id: &DocId,
    sealed: &SealedIndex,
) -> Result<(Contributions, usize, usize), Error> {
    let objs = Objs::load(doc, id)?;
    let mut replicas: Contributions = BTreeMap::new();
    for node in doc.keys(&objs.folded) {
        if let Some((value, _)) = doc.get(&objs.folded, node.as_str())? {
            let total = value.as_i64().ok_or_else(|| corrupt(id, format!("folded[{node}]")))?;
            *replicas.entry(node).or_default() += i128::from(total);
        }
    }
    let mut live_ops = 0;
    for (_, entries) in all_entries(doc, id, &objs.ops)? {
        if let Some(canonical) = entries.first() {
            live_ops += 1;
            *replicas.entry(folder_of(canonical)).or_default() += i128::from(canonical.amount);
        }
    }
    let mut tombstones = 0;
    for bucket_key in doc.keys(&objs.tomb) {
        if let Some(bucket) = tomb_bucket(doc, &objs.tomb, objs.sharded, &bucket_key)? {
            tombstones += bucket.len(doc)?;
        }
    }
    tombstones += sealed.count(doc, &objs);
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
        if let Some(canonical) = entries(doc, id, &objs.ops, key)?.first() {
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
pub(crate) fn lookup<R: ReadDoc>(
    doc: &R,
    id: &DocId,
    sealed: &SealedIndex,
    op_id: &str,
) -> Result<Option<i64>, Error> {
    // The hot path of every increment: only the root objects it needs (each a map get).
    let sharded = is_sharded(doc);
    let ops = OpMap { obj: root_object(doc, id, "ops")?, sharded };
    if let Some(canonical) = entries(doc, id, &ops, op_id)?.first() {
        return Ok(Some(canonical.amount));
    }
    let tomb = root_object(doc, id, "tomb")?;
    for bucket_key in doc.keys(&tomb) {
        if let Some(bucket) = tomb_bucket(doc, &tomb, sharded, &bucket_key)?
            && let Some(amount) = bucket.get(doc, id, op_id)?
        {
            return Ok(Some(amount));
        }
    }
    let sealed_obj = match doc.get(automerge::ROOT, "sealed")? {
        Some((Value::Object(_), obj)) => Some(obj),
        _ => None,
    };
    sealed.lookup(doc, id, sealed_obj.as_ref(), op_id)
}

/// The tombstone bucket `tomb[bucket_key]`.
fn tomb_bucket<R: ReadDoc>(
    doc: &R,
    tomb: &ObjId,
    sharded: bool,
    bucket_key: &str,
) -> Result<Option<OpMap>, Error> {
    Ok(match doc.get(tomb, bucket_key)? {
        Some((Value::Object(_), obj)) => Some(OpMap { obj, sharded }),
        _ => None,
    })
}

/// Writes a fresh increment; the caller checked [`lookup`] first.
pub(crate) fn write_increment<T: Transactable>(
    tx: &mut T,
    id: &DocId,
    op_id: &str,
    amount: i64,
) -> Result<(), Error> {
    let ops = OpMap { obj: root_object(tx, id, "ops")?, sharded: is_sharded(tx) };
    let part = ops.part(tx, id, op_id)?;
    tx.put(&part, op_id, ScalarValue::Int(amount))?;
    Ok(())
}

/// What one maintenance round of a replica writes.
#[derive(Debug, Default)]
pub(crate) struct Maintenance {
    acks: Vec<(String, u64)>,
    folds: Vec<Fold>,
    fold_total: i64,
    expired_buckets: Vec<String>,
    expired_sealed: Vec<String>,
}

impl Maintenance {
    pub(crate) fn is_empty(&self) -> bool {
        self.acks.is_empty()
            && self.folds.is_empty()
            && self.expired_buckets.is_empty()
            && self.expired_sealed.is_empty()
    }

    /// Entries this round folds.
    pub(crate) fn folds(&self) -> usize {
        self.folds.len()
    }

    /// Keeps the first `max` folds (a prefix of the planned order, so its total fits as the
    /// whole did) and returns the rest, for later rounds ([`plan_backlog`]).
    pub(crate) fn split_folds(&mut self, max: usize) -> FoldBacklog {
        if self.folds.len() <= max {
            return FoldBacklog::default();
        }
        let rest = self.folds.split_off(max);
        let total: i128 = self.folds.iter().map(|fold| i128::from(fold.amount)).sum();
        self.fold_total = i64::try_from(total).expect("every running total fits");
        FoldBacklog { folds: rest.into() }
    }
}

/// One planned fold: the entry's op_id, its canonical amount, and every write of the op_id
/// seen when it was planned.
#[derive(Debug)]
pub(crate) struct Fold {
    op_id: String,
    amount: i64,
    entries: Vec<Entry>,
}

/// Folds planned but not written yet, oldest first.
#[derive(Debug, Default)]
pub(crate) struct FoldBacklog {
    folds: VecDeque<Fold>,
}

impl FoldBacklog {
    pub(crate) fn is_empty(&self) -> bool {
        self.folds.is_empty()
    }
}

/// A maintenance round of at most `max` folds taken from `backlog`, without a new scan of
/// the document: a planned fold is kept only if its op_id still holds exactly the writes it
/// held when planned (they were all acked then, and acks only grow), and the folds'
/// running total still fits.
pub(crate) fn plan_backlog<R: ReadDoc>(
    doc: &R,
    id: &DocId,
    node: &str,
    backlog: &mut FoldBacklog,
    max: usize,
) -> Result<Maintenance, Error> {
    let objs = Objs::load(doc, id)?;
    let folded_now = match doc.get(&objs.folded, node)? {
        Some((value, _)) => i128::from(value.as_i64().unwrap_or(0)),
        None => 0,
    };
    let mut plan = Maintenance::default();
    let mut total: i128 = 0;
    while plan.folds.len() < max {
        let Some(fold) = backlog.folds.pop_front() else {
            break;
        };
        if entries(doc, id, &objs.ops, &fold.op_id)? != fold.entries {
            continue;
        }
        let next = total + i128::from(fold.amount);
        if i64::try_from(folded_now + next).is_err() || i64::try_from(next).is_err() {
            continue;
        }
        total = next;
        plan.folds.push(fold);
    }
    plan.fold_total = i64::try_from(total).expect("checked at every step");
    Ok(plan)
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
    for (op_id, entries) in all_entries(doc, id, &objs.ops)? {
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
        // Every running total fits, so a prefix of the folds (`truncate_folds`) does too.
        if i64::try_from(folded_now + next).is_err() || i64::try_from(next).is_err() {
            // Leave it live; it is still counted, just not folded.
            continue;
        }
        fold_total = next;
        let amount = canonical.amount;
        plan.folds.push(Fold { op_id, amount, entries });
    }
    plan.fold_total = i64::try_from(fold_total).expect("checked at every step");

    // This replica's tombstone buckets past the dedup window.
    let prefix = format!("{node}{KEY_SEPARATOR}");
    let expired = |bucket_key: &str| {
        bucket_key
            .strip_prefix(&prefix)
            .and_then(|end| end.parse::<u64>().ok())
            .is_some_and(|end_ms| end_ms.saturating_add(dedup_window_ms) <= now_ms)
    };
    plan.expired_buckets = doc.keys(&objs.tomb).filter(|key| expired(key)).collect();
    if let Some(sealed) = &objs.sealed {
        plan.expired_sealed = doc.keys(sealed).filter(|key| expired(key)).collect();
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
        let bucket_key = bucket_key(node, now_ms, tombstone_bucket_ms);
        let bucket = match tomb_bucket(tx, &objs.tomb, objs.sharded, &bucket_key)? {
            Some(bucket) => bucket,
            None => OpMap::create(tx, &objs.tomb, &bucket_key, objs.sharded)?,
        };
        // Each shard looked up once per round (a map get each).
        let mut parts: BTreeMap<(bool, String), ObjId> = BTreeMap::new();
        for Fold { op_id, amount, .. } in &plan.folds {
            let shard = shard_key(op_id);
            let live = match parts.get(&(false, shard.clone())) {
                Some(part) => part.clone(),
                None => {
                    let part = objs.ops.part(tx, id, op_id)?;
                    parts.insert((false, shard.clone()), part.clone());
                    part
                }
            };
            tx.delete(&live, op_id.as_str())?;
            let tomb = match parts.get(&(true, shard.clone())) {
                Some(part) => part.clone(),
                None => {
                    let part = bucket.part(tx, id, op_id)?;
                    parts.insert((true, shard), part.clone());
                    part
                }
            };
            tx.put(&tomb, op_id.as_str(), ScalarValue::Int(*amount))?;
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
    if let Some(sealed) = &objs.sealed {
        for bucket_key in &plan.expired_sealed {
            tx.delete(sealed, bucket_key.as_str())?;
        }
    }
    Ok(())
}

/// The bucket key of tombstones `node` writes at `now_ms`.
fn bucket_key(node: &str, now_ms: u64, tombstone_bucket_ms: u64) -> String {
    let bucket_ms = tombstone_bucket_ms.max(1);
    let end_ms = (now_ms / bucket_ms).saturating_add(1).saturating_mul(bucket_ms);
    format!("{node}{KEY_SEPARATOR}{end_ms:020}")
}

/// The members that joined `doc`'s epoch; `None` for epoch 0, which every member holds
/// from the start.
pub(crate) fn joined<R: ReadDoc>(doc: &R, id: &DocId) -> Result<Option<BTreeSet<String>>, Error> {
    let objs = Objs::load(doc, id)?;
    Ok(objs.joined.map(|joined| doc.keys(&joined).collect()))
}

/// Whether every one of `members` joined `doc`'s epoch.
pub(crate) fn all_joined<R: ReadDoc>(
    doc: &R,
    id: &DocId,
    members: &[String],
) -> Result<bool, Error> {
    Ok(match joined(doc, id)? {
        None => true,
        Some(joined) => members.iter().all(|member| joined.contains(member)),
    })
}

/// See [`Extra`]: the live entries of `previous` written by members not in `joined`
/// whose op_id `current` does not know.
pub(crate) fn extra(
    previous: &automerge::Automerge,
    current: &automerge::Automerge,
    id: &DocId,
    sealed: &SealedIndex,
    joined: &BTreeSet<String>,
) -> Result<Extra, Error> {
    let objs = Objs::load(previous, id)?;
    let mut extra = Extra::new();
    for (op_id, entries) in all_entries(previous, id, &objs.ops)? {
        let Some(unjoined) = entries.iter().find(|entry| !joined.contains(&folder_of(entry)))
        else {
            continue;
        };
        if lookup(current, id, sealed, &op_id)?.is_none() {
            extra.insert(op_id, (unjoined.amount, folder_of(unjoined)));
        }
    }
    Ok(extra)
}

/// The amount `previous` holds for `op_id` from a member not in `joined` (see [`Extra`];
/// the caller checked that the current epoch does not know it).
pub(crate) fn extra_lookup(
    previous: &automerge::Automerge,
    id: &DocId,
    joined: &BTreeSet<String>,
    op_id: &str,
) -> Result<Option<i64>, Error> {
    let objs = Objs::load(previous, id)?;
    let entries = entries(previous, id, &objs.ops, op_id)?;
    Ok(entries.iter().find(|entry| !joined.contains(&folder_of(entry))).map(|entry| entry.amount))
}

/// What `node` carries over when it joins `current`: the live entries of `previous`
/// that its own actors wrote and `current` does not know, with their amounts.
pub(crate) fn plan_join(
    previous: &automerge::Automerge,
    current: &automerge::Automerge,
    id: &DocId,
    sealed: &SealedIndex,
    node: &str,
) -> Result<Vec<(String, i64)>, Error> {
    let objs = Objs::load(previous, id)?;
    let mut carried = Vec::new();
    for (op_id, entries) in all_entries(previous, id, &objs.ops)? {
        let Some(own) = entries.iter().find(|entry| actor_node(&entry.actor) == Some(node)) else {
            continue;
        };
        if lookup(current, id, sealed, &op_id)?.is_none() {
            carried.push((op_id, own.amount));
        }
    }
    Ok(carried)
}

/// Writes `node`'s join of the current epoch: its carried entries and `joined[node]`.
pub(crate) fn write_join<T: Transactable>(
    tx: &mut T,
    id: &DocId,
    node: &str,
    carried: &[(String, i64)],
) -> Result<(), Error> {
    let objs = Objs::load(tx, id)?;
    let joined = objs.joined.ok_or_else(|| corrupt(id, "an epoch without members".into()))?;
    for (op_id, amount) in carried {
        let part = objs.ops.part(tx, id, op_id)?;
        tx.put(&part, op_id.as_str(), ScalarValue::Int(*amount))?;
    }
    tx.put(&joined, node, true)?;
    Ok(())
}

/// Who builds a genesis, for which epoch, when.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GenesisBy<'a> {
    pub(crate) node: &'a str,
    pub(crate) actor: &'a ActorId,
    pub(crate) epoch: u64,
    pub(crate) now_ms: u64,
    pub(crate) tombstone_bucket_ms: u64,
}

/// The genesis of epoch `epoch` built from `doc` (the current epoch, at its heads) by
/// the coordinator `node` with `actor`: per-node totals (folded plus live, so every
/// live entry is folded), the epoch's tombstones and live op_ids sealed into one blob per
/// bucket (the sealed blobs `doc` inherited go to every replica's [`SealedArchive`], not
/// into the genesis: [`SEALED_CHAIN_KEY`]), no acks, and `joined[node]`. `None` if a total
/// does not fit an i64. Its size is bounded by the epoch's, not by the dedup window.
pub(crate) fn build_genesis(
    doc: &automerge::Automerge,
    id: &DocId,
    sealed: &SealedIndex,
    by: &GenesisBy<'_>,
) -> Result<Option<automerge::Automerge>, Error> {
    let GenesisBy { node, actor, epoch, now_ms, tombstone_bucket_ms } = *by;
    let objs = Objs::load(doc, id)?;
    let (totals, _, _) = read_exact(doc, id, sealed)?;
    // What this epoch folded or holds live (bounded by the epoch's size), per bucket.
    let mut recent: BTreeMap<String, BTreeMap<String, i64>> = BTreeMap::new();
    for bucket in doc.keys(&objs.tomb) {
        if let Some(tombs) = tomb_bucket(doc, &objs.tomb, objs.sharded, &bucket)? {
            recent.entry(bucket.clone()).or_default().extend(tombs.amounts(doc, id)?);
        }
    }
    for (op_id, entries) in all_entries(doc, id, &objs.ops)? {
        if let Some(canonical) = entries.first() {
            let bucket = bucket_key(&folder_of(canonical), now_ms, tombstone_bucket_ms);
            recent.entry(bucket).or_default().insert(op_id, canonical.amount);
        }
    }
    let mut totals_i64 = Vec::with_capacity(totals.len());
    for (node, total) in totals {
        match i64::try_from(total) {
            Ok(total) => totals_i64.push((node, total)),
            Err(_) => return Ok(None),
        }
    }
    let mut genesis = automerge::Automerge::new().with_actor(actor.clone());
    let mut tx = genesis.transaction();
    let root = automerge::ROOT;
    tx.put(root.clone(), "kind", DocKind::Counter.as_str())?;
    tx.put(root.clone(), "epoch", ScalarValue::Uint(epoch))?;
    // Every new epoch is sharded, whatever the layout of the one it rebases.
    tx.put(root.clone(), SHARDS_KEY, ScalarValue::Uint(OP_SHARDS))?;
    tx.put(root.clone(), SEALED_CHAIN_KEY, ScalarValue::Uint(1))?;
    OpMap::create(&mut tx, &root, "ops", true)?;
    for key in ["acks", "tomb"] {
        tx.put_object(root.clone(), key, ObjType::Map)?;
    }
    let folded = tx.put_object(root.clone(), "folded", ObjType::Map)?;
    for (node, total) in totals_i64 {
        tx.put(&folded, node.as_str(), ScalarValue::counter(total))?;
    }
    let sealed_obj = tx.put_object(root.clone(), "sealed", ObjType::Map)?;
    for (bucket, entries) in &recent {
        if !entries.is_empty() {
            tx.put(&sealed_obj, bucket.as_str(), ScalarValue::Bytes(encode_sealed(entries)))?;
        }
    }
    let joined = tx.put_object(root, "joined", ObjType::Map)?;
    tx.put(&joined, node, true)?;
    let time = i64::try_from(now_ms).unwrap_or(i64::MAX);
    tx.commit_with(automerge::transaction::CommitOptions::default().with_time(time));
    Ok(Some(genesis))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, i64)]) -> BTreeMap<String, i64> {
        entries.iter().map(|(op_id, amount)| ((*op_id).to_owned(), *amount)).collect()
    }

    fn decoded(blob: &[u8]) -> Vec<(String, i64)> {
        let mut out = Vec::new();
        assert!(decode_sealed(blob, |op_id, amount| {
            out.push((op_id.to_owned(), amount));
            true
        }));
        out
    }

    #[test]
    fn sealed_blobs_round_trip_sorted_and_refuse_truncation() {
        let entries = map(&[("b", 2), ("a", 1), ("e", -5)]);
        let blob = encode_sealed(&entries);
        let expected: Vec<(String, i64)> =
            [("a", 1), ("b", 2), ("e", -5)].map(|(k, v)| (k.to_owned(), v)).into();
        assert_eq!(decoded(&blob), expected);
        assert_eq!(find_sealed(&blob, "e"), Some(-5));
        assert_eq!(find_sealed(&blob, "c"), None);
        assert_eq!(decoded(&encode_sealed(&BTreeMap::new())), vec![]);
        assert!(!decode_sealed(&blob[..blob.len() - 1], |_, _| true));
        assert!(!decode_sealed(&[1, 0, 0, 0, 200], |_, _| true));
    }

    #[test]
    fn the_archive_keeps_earlier_epochs_until_their_window_passes() {
        let id = DocId::counter("production").unwrap();
        let bucket = |node: &str, end_ms: u64| format!("{node}|{end_ms:020}");
        let mut archive = SealedArchive::default();
        // Epoch 1 leaves a bucket of a's ending at 1,000 ms; epoch 2 one of b's at 2,000.
        let first = vec![(bucket("a", 1_000), encode_sealed(&map(&[("x", 3), ("y", 4)])))];
        archive.advance(&id, first, true).unwrap();
        let second = vec![(bucket("b", 2_000), encode_sealed(&map(&[("z", -1)])))];
        archive.advance(&id, second, true).unwrap();
        assert_eq!(archive.count(), 3);
        assert_eq!(archive.lookup(op_hash("x"), "x"), Some(3));
        assert_eq!(archive.lookup(op_hash("z"), "z"), Some(-1));
        assert_eq!(archive.lookup(op_hash("w"), "w"), None);
        // A snapshot's copy reads back the same.
        let saved: Vec<(String, Vec<u8>)> =
            archive.saved().map(|(k, v)| (k.to_owned(), v.to_vec())).collect();
        let restored = SealedArchive::from_saved(&id, saved, true).unwrap();
        assert_eq!(restored.count(), 3);
        assert_eq!(restored.lookup(op_hash("y"), "y"), Some(4));
        // Expiry is per bucket: a's ends first.
        archive.expire(1_000 + 500, 500);
        assert_eq!(archive.lookup(op_hash("x"), "x"), None);
        assert_eq!(archive.lookup(op_hash("z"), "z"), Some(-1));
        archive.expire(2_499, 500);
        assert_eq!(archive.count(), 1);
        // A genesis that seals the whole window makes the archive redundant.
        archive.advance(&id, vec![], false).unwrap();
        assert_eq!(archive.count(), 0);
        // Plain sealed blobs (snapshot format 3) read too.
        let plain = vec![(bucket("c", 3_000), encode_sealed(&map(&[("v", 8)])))];
        let restored = SealedArchive::from_saved(&id, plain, false).unwrap();
        assert_eq!(restored.lookup(op_hash("v"), "v"), Some(8));
        // A malformed blob is refused, not half-read, plain or deflated.
        let bad = vec![(bucket("a", 1), vec![9, 0, 0, 0, 1])];
        assert!(SealedArchive::from_saved(&id, bad.clone(), false).is_err());
        assert!(SealedArchive::from_saved(&id, bad, true).is_err());
        let truncated = deflate(&encode_sealed(&map(&[("x", 3), ("y", 4)])));
        let truncated = vec![(bucket("a", 1), truncated[..truncated.len() / 2].to_vec())];
        assert!(SealedArchive::from_saved(&id, truncated, true).is_err());
        // Kept deflated: 20,000 ids of a shared shape take far less than their 10 bytes each.
        let ids: BTreeMap<String, i64> = (0..20_000).map(|i| (format!("g-{i:06}"), 1)).collect();
        let mut big = SealedArchive::default();
        big.advance(&id, vec![(bucket("a", 9), encode_sealed(&ids))], true).unwrap();
        assert!(big.bytes() < 20_000 * 10 / 3, "{} bytes", big.bytes());
        assert_eq!(big.lookup(op_hash("g-012345"), "g-012345"), Some(1));
    }

    /// Layout 1 as earlier versions wrote it: fixed 8-byte amounts, top bit of the count
    /// clear.
    fn layout_1(entries: &[(&str, i64)]) -> Vec<u8> {
        let mut bytes = (entries.len() as u32).to_le_bytes().to_vec();
        for (op_id, amount) in entries {
            bytes.push(op_id.len() as u8);
            bytes.extend_from_slice(op_id.as_bytes());
            bytes.extend_from_slice(&amount.to_le_bytes());
        }
        bytes
    }

    #[test]
    fn sealed_blobs_of_layout_1_are_read_and_layout_2_is_written() {
        let extremes = [("a", i64::MIN), ("b", -65), ("c", -64), ("d", 0), ("e", 63), ("f", 64)];
        let old = layout_1(&extremes[..3]);
        let expected: Vec<(String, i64)> = extremes.map(|(k, v)| (k.to_owned(), v)).into();
        assert_eq!(decoded(&old), expected[..3]);
        assert_eq!(find_sealed(&old, "b"), Some(-65));
        let new = encode_sealed(&map(&extremes));
        assert_ne!(u32::from_le_bytes(new[..4].try_into().unwrap()) & SEALED_COMPACT, 0);
        assert_eq!(decoded(&new), expected);
        assert_eq!(decoded(&encode_sealed(&map(&[("z", i64::MAX)]))), vec![("z".into(), i64::MAX)]);
        // An op_id of 8 bytes and an amount of 1: 10 bytes an entry, against 17 in layout 1.
        let ids: Vec<String> = (0..100).map(|i| format!("g-{i:06}")).collect();
        let entries: BTreeMap<String, i64> = ids.iter().map(|id| (id.clone(), 1)).collect();
        assert_eq!(encode_sealed(&entries).len(), 4 + 100 * 10);
        // A truncated amount is refused.
        let one = encode_sealed(&map(&[("x", -1_000_000)]));
        assert!(!decode_sealed(&one[..one.len() - 1], |_, _| true));
    }
}
