//! Typed CRDT replicas on automerge, made durable through an op log and synced by change batches and anti-entropy.
//!
//! # Shape
//!
//! [`Replica`] is the core: one per node, holding named documents
//! ([`DocId`] = kind + name). Each document is one CRDT:
//!
//! - **counter** (PN-counter, idempotent by op_id across replicas):
//!   [`Replica::increment`], [`Replica::counter`];
//! - **register** (LWW by version, ties broken by the value's bytes):
//!   [`Replica::set_register`], [`Replica::register`];
//! - **set** (OR-set, add-wins): [`Replica::set_add`], [`Replica::set_remove`],
//!   [`Replica::set_members`];
//! - **list** (RGA): [`Replica::list_insert`], [`Replica::list_remove`],
//!   [`Replica::list_items`].
//!
//! No automerge type appears in the public API. The replica does no I/O and
//! reads no clock. A service drives it like this:
//!
//! 1. On start: `Replica::recover(config, log, latest_snapshot)` with
//!    `config.incarnation` bumped since the previous start.
//! 2. Per request: call the typed operation with `now_ms`. When it returns,
//!    the change is durable in the [`OpLog`]; answer the caller, then publish
//!    `update.changes` (coalesced with others for a flush interval) to peers.
//! 3. Per message from a peer: [`Replica::apply_changes`] (idempotent).
//! 4. On start, on reconnect ([`Replica::reset_peer`]) and periodically, for
//!    every document and peer, exchange [`Replica::sync_message`] /
//!    [`Replica::receive_sync_message`] until both sides return `None`
//!    (automerge's sync protocol: anti-entropy for lost messages).
//! 5. Periodically: [`Replica::tick`] (acks, folding, tombstone expiry;
//!    publish what it returns) and, at checkpoints, [`Replica::snapshot`]
//!    (automerge's compacted save of every document), persist it, then
//!    [`Replica::truncate_log`].
//!
//! [`sync::SyncedReplica`] does steps 2 to 5 over NATS (JetStream change
//! batches coalesced for a flush interval, anti-entropy on core NATS,
//! periodic ticks); the service only calls [`sync::SyncedReplica::update`]
//! and [`sync::SyncedReplica::read`], and checkpoints.
//!
//! # Idempotency by op_id across replicas, and its bound
//!
//! A counter document holds live op entries `ops[op_id] = amount`, per-node
//! folded totals `folded[node]` (automerge counters), acks and tombstones
//! (layout in the `counter` module). An increment whose op_id a replica
//! already sees (live, or folded within the dedup window) is a duplicate. Two
//! replicas that accept the same op_id concurrently both write the same key;
//! automerge keeps both writes as a conflict on one key, and the counter
//! counts the key once (amount of the write with the smallest automerge op
//! id, so replicas agree even if a client reused an op_id with another
//! amount concurrently). `value = sum(folded) + sum(live)`.
//!
//! Folding keeps `ops` bounded: each member acks, per writing actor, the
//! highest entry it has seen ([`Replica::tick`]). Once every member acked
//! every write of a key, the key is *stable*: no member will write it again
//! (each would see it first). Its folder, the node whose actor wrote the
//! winning entry, then deletes it, records the op_id in its tombstone bucket
//! and adds the amount to `folded[folder]`, all in one change. Only one node
//! folds a key, once, so the total never changes by folding.
//!
//! Bound and policy:
//!
//! - Live entries: those accepted since the slowest member's last ack, plus
//!   about two tick periods. A member that is down pins every entry written
//!   since its last ack (they stay live and are counted; only folding
//!   waits). Remove a member that is gone for good from
//!   [`ReplicaConfig::members`] on every replica to release them; never
//!   remove a live member (it could write an op_id again after it was
//!   folded).
//! - Tombstones: op_ids folded within the dedup window
//!   ([`DEDUP_WINDOW_MS_DEFAULT`], one hour), in
//!   [`TOMBSTONE_BUCKETS_PER_WINDOW`] buckets per folder; a retry of an
//!   op_id arriving later than the window after it was folded counts again.
//! - History: automerge keeps every change and every deleted op, and one
//!   remote apply costs a pass over the touched objects, so a counter's
//!   history is bounded by epochs (below): at most two epoch documents of
//!   about [`ReplicaConfig::epoch_changes_min`] changes each, plus the sealed
//!   tombstones of the dedup window (about 10 bytes per op_id of 8 bytes in
//!   the current epoch document for the epoch before it, deflated in the
//!   replica's archive for older ones, and 8 bytes of hash in memory).
//!
//! # Epochs (counters)
//!
//! A counter lives in a sequence of automerge documents, one per epoch. Epoch
//! 0 starts from the deterministic genesis. The *coordinator* (the lowest
//! member id) starts epoch e+1 at a tick when epoch e holds at least
//! `epoch_changes_min` changes, every member joined e and no older epoch is
//! kept: it builds a fresh document whose one genesis change holds the state
//! of e at its heads C: per-node totals (folded plus live, so every live
//! entry is folded), e's tombstones and live op_ids sealed into one sorted
//! bytes value per tombstone bucket, no acks, and `joined[coordinator]`.
//! It logs it, publishes it, and writes only to e+1 from then on. No
//! agreement on C is needed. The op_ids e itself inherited sealed (from
//! older epochs) are not copied: every replica moves them into its *archive*
//! when it moves to e+1 (kept in memory and in its snapshots, rebuilt from
//! the geneses when its log is replayed, each bucket dropped when it is past
//! the dedup window), so a genesis is bounded by its epoch, not by the window.
//! Sealed op_ids are known to a replica if the current epoch or its archive
//! holds them. A member restored without its data directory (or a new one)
//! rebuilds its documents by anti-entropy, starting a counter at a later
//! epoch, and so *wants* the archive: it asks its peers for theirs
//! ([`Replica::archives_wanted`], [`Replica::archive_reply`],
//! [`Replica::receive_archive`]; over NATS in [`sync`]) until a peer whose own
//! archive is complete answered, and merges the blobs it lacks. Until then
//! (a round trip when a peer is reachable) it refuses increments of that
//! counter ([`Error::Syncing`]): it recognises only the op_ids of the last two
//! epochs, so a retry of an older one would count again. With no complete peer
//! it takes them again once the dedup window has passed; the metric
//! `archives_wanted` counts such counters. A merged archive is kept in its snapshots (with
//! the want, format 5); recovered from its log alone it asks again. A genesis
//! built by an earlier version seals the whole window (the
//! archive is cleared then); an earlier version cannot use a chained one:
//! upgrade every member before the coordinator.
//!
//! The steps:
//!
//! 1. A member that receives the genesis moves to e+1 (e becomes its
//!    *previous* epoch) and *joins*: in one change it re-writes into e+1 every
//!    live entry of e that its own actors wrote and e+1 does not know (live or
//!    tombstone), and sets `joined[member]`. From then on it writes only to
//!    e+1 (increments, acks, folds). Entries in C are in the genesis; the
//!    entries beyond C are exactly the ones their authors carry over.
//! 2. No entry beyond C is folded in e: folding needs every member's ack and
//!    the coordinator acks nothing in e after C. So until a member joins, its
//!    entries beyond C are live in e at every replica that has them.
//! 3. Until every member has joined e+1, reads (and the duplicate check) add,
//!    from e, the live entries written by members that have not joined yet
//!    and unknown to e+1, once per op_id. When a member's join arrives, its
//!    entries move from that sum into e+1 in the same apply, so no counter is
//!    ever seen going down. Once every member joined, e is dropped.
//! 4. Change batches, sync messages, op log records and snapshots carry the
//!    epoch. A replica applies changes of its current, previous and next epoch
//!    (the next one waits for its genesis; anti-entropy fetches it) and
//!    ignores older ones. Moving epochs and dropping the previous one depend
//!    only on the documents' contents, so a replay of the log repeats them; a
//!    join that a crash cut off is written at recovery or the next tick.
//!
//! Epoch 0 needs no joins (every member holds it from the start). From epoch
//! 1 on, a member that is down pins the epoch: no new one starts until it has
//! joined, as it pins folding. A member without the document that hears of a
//! later epoch before its genesis refuses local increments
//! ([`Error::Syncing`]) until anti-entropy brings it. Members must agree on
//! the membership (as for folding): two coordinators would build two geneses.
//!
//! # Durability
//!
//! Everything that enters a document (local operations, remote changes,
//! changes from anti-entropy) is appended to the [`OpLog`] before the call
//! returns, so a replica that acked (or published an ack of) anything can
//! rebuild it: recovery = snapshot + replay of the log after the position it
//! covers. If the append fails, the document is rolled back and the call
//! returns the error: nothing applied.

#![deny(missing_docs)]

mod batch;
mod counter;
mod doc;
mod doc_id;
mod error;
mod list;
mod oplog;
mod register;
mod replica;
mod set;
mod snapshot;
pub mod sync;

pub use batch::{BATCH_BYTES_MAX, BATCH_CHANGES_MAX, ChangeBatch};
pub use counter::CounterValue;
pub use doc_id::{DOC_NAME_BYTES_MAX, DocId, DocKind, NODE_ID_BYTES_MAX, validate_node_id};
pub use error::{Error, OpLogError};
pub use list::LIST_ITEM_BYTES_MAX;
pub use oplog::{MemOpLog, OpLog, OpRecord, conformance as oplog_conformance};
pub use register::{REGISTER_VALUE_BYTES_MAX, RegisterValue};
pub use replica::{
    ArchiveChunk, DEDUP_WINDOW_MS_DEFAULT, DOCS_MAX, EPOCH_CHANGES_MIN_DEFAULT,
    FLAT_EPOCH_CHANGES_MAX, MEMBERS_MAX, OP_ID_BYTES_MAX, OUTGOING_MAX, RemoteApplied, Replica,
    ReplicaConfig, ReplicaMetrics, SYNC_MESSAGE_BYTES_MAX, Snapshot, TOMBSTONE_BUCKETS_PER_WINDOW,
    TickStep, Update,
};
pub use set::SET_MEMBER_BYTES_MAX;
