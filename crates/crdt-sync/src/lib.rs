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
//! - History: automerge keeps every change and every deleted op; the saved
//!   document and the in-memory op set grow with every operation even when
//!   the current state is bounded (`benches/growth.rs` measures it). In
//!   automerge 0.12 one remote apply also costs a pass over the document,
//!   so the sync layer applies waiting batches together. Bounding history
//!   needs an epoch rebase (replicas agree on a stable state and restart
//!   from a deterministic genesis of it), not built yet.
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
    DEDUP_WINDOW_MS_DEFAULT, DOCS_MAX, MEMBERS_MAX, OP_ID_BYTES_MAX, RemoteApplied, Replica,
    ReplicaConfig, ReplicaMetrics, SYNC_MESSAGE_BYTES_MAX, Snapshot, TOMBSTONE_BUCKETS_PER_WINDOW,
    Update,
};
pub use set::SET_MEMBER_BYTES_MAX;
