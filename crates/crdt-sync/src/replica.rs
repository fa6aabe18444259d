//! `Replica`: one node's named CRDT documents, local ops, remote changes, anti-entropy, recovery.
//!
//! The replica does no I/O and reads no clock: callers pass `now_ms`, publish
//! the [`ChangeBatch`]es it returns, feed it what peers send, and persist its
//! snapshots. Everything that enters a document goes through its [`OpLog`]
//! first; when the log refuses, the document is rolled back and the call
//! fails, so an error always means "nothing applied".

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use automerge::sync::{self, SyncDoc};
use automerge::transaction::{CommitOptions, Transaction};
use automerge::{ActorId, Automerge, Change, ReadDoc};

use crate::batch::ChangeBatch;
use crate::counter::{self, CounterValue};
use crate::doc::{actor_for, new_doc};
use crate::doc_id::{DocId, DocKind, validate_node_id};
use crate::error::Error;
use crate::list::{self, LIST_ITEM_BYTES_MAX};
use crate::oplog::{OpLog, OpRecord};
use crate::register::{self, REGISTER_VALUE_BYTES_MAX, RegisterValue};
use crate::set::{self, SET_MEMBER_BYTES_MAX};
use crate::snapshot::{self, Part, Role};

/// Longest op_id, in bytes.
pub const OP_ID_BYTES_MAX: usize = 128;
/// Default dedup window: how long a folded op_id is still recognised as a
/// duplicate (retries later than this count again).
pub const DEDUP_WINDOW_MS_DEFAULT: u64 = 60 * 60 * 1000;
/// Tombstones are kept in this many time buckets per dedup window; a bucket
/// is dropped whole once it is older than the window.
pub const TOMBSTONE_BUCKETS_PER_WINDOW: u64 = 12;
/// Most replicas in a membership.
pub const MEMBERS_MAX: usize = 64;
/// Most documents one replica holds (peers can create documents through
/// sync messages, so this bounds what they can make it hold).
pub const DOCS_MAX: usize = 1_024;
/// Largest sync message accepted, in bytes.
pub const SYNC_MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Most sync messages a replica sends one peer about one document between two calls of
/// [`Replica::reset_peer`] (one anti-entropy round). automerge's sync protocol answers every
/// message while the heads differ, and under load they always do (change batches keep
/// arriving), so without a bound a round never ends and every message costs a walk of the
/// change history. Filling a gap takes a handful of messages; what a round leaves unfinished
/// the next one continues from the heads both sides confirmed.
pub const SYNC_MESSAGES_PER_ROUND_MAX: u32 = 16;
/// Default number of changes a counter's epoch document holds before the coordinator
/// starts the next epoch (see [`ReplicaConfig::epoch_changes_min`]).
pub const EPOCH_CHANGES_MIN_DEFAULT: u64 = 20_000;
/// Changes a counter's epoch document holds before the coordinator rebases it while its
/// layout is flat (epoch 0, or an epoch an older version built): the next epoch is
/// sharded (see `counter::OP_SHARDS`), so a flat epoch is kept short. Ignored when
/// [`ReplicaConfig::epoch_changes_min`] is `u64::MAX` (never rebase).
pub const FLAT_EPOCH_CHANGES_MAX: u64 = 1_000;
/// Changes the replica wrote by itself while applying remote ones (joins of a new epoch)
/// kept for [`Replica::take_outgoing`]; beyond it the oldest go (anti-entropy delivers
/// them).
pub const OUTGOING_MAX: usize = 64;

/// How a replica is set up.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// This node's stable id (`[A-Za-z0-9_-]`, at most 64 bytes).
    pub node_id: String,
    /// Bumped on every start of the node (persist it next to the data):
    /// each incarnation writes with its own automerge actor.
    pub incarnation: u64,
    /// Every replica of the documents, this one included. Op entries are
    /// folded once all of them acknowledged them; a member that never comes
    /// back keeps entries live until it is removed from this list. Remove
    /// only members that are gone for good.
    pub members: Vec<String>,
    /// See [`DEDUP_WINDOW_MS_DEFAULT`].
    pub dedup_window_ms: u64,
    /// A counter's epoch document that holds at least this many changes is rebased by
    /// the coordinator (the lowest member id) onto a fresh epoch once every member joined
    /// it. See [`EPOCH_CHANGES_MIN_DEFAULT`]; `u64::MAX` never rebases.
    pub epoch_changes_min: u64,
}

impl ReplicaConfig {
    /// Incarnation 0 and the default dedup window.
    pub fn new(node_id: &str, members: &[&str]) -> ReplicaConfig {
        ReplicaConfig {
            node_id: node_id.to_owned(),
            incarnation: 0,
            members: members.iter().map(|m| (*m).to_owned()).collect(),
            dedup_window_ms: DEDUP_WINDOW_MS_DEFAULT,
            epoch_changes_min: EPOCH_CHANGES_MIN_DEFAULT,
        }
    }
}

/// The outcome of a local operation.
#[derive(Debug, Clone, PartialEq)]
pub struct Update<T> {
    /// The state after the operation (counter total, register value, ...).
    pub value: T,
    /// False when the operation was already in effect (a duplicate op_id,
    /// the same register version again, removing an absent member) and
    /// nothing new was written.
    pub applied: bool,
    /// The change to publish to peers, when something was written. It is
    /// durable in the op log already.
    pub changes: Option<ChangeBatch>,
}

/// The outcome of applying remote changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RemoteApplied {
    /// Changes that were new to this replica and are now applied.
    pub applied: usize,
    /// Changes this replica already had.
    pub duplicates: usize,
    /// Changes held back until the changes they depend on arrive
    /// (anti-entropy fetches those).
    pub pending: usize,
}

/// Counters of what a replica did, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplicaMetrics {
    /// Local operations that wrote a change.
    pub local_ops: u64,
    /// Local operations that were already in effect.
    pub duplicate_ops: u64,
    /// Remote changes applied (from batches and sync messages).
    pub remote_changes: u64,
    /// Op entries this replica folded.
    pub folded_ops: u64,
    /// Sync messages received.
    pub sync_messages: u64,
    /// Documents held.
    pub docs: u64,
    /// automerge changes held, over all documents.
    pub changes: u64,
    /// automerge operations held, over all documents.
    pub automerge_ops: u64,
    /// Position of the last op log record.
    pub log_position: u64,
    /// Counter epochs this replica moved to (started as coordinator or joined).
    pub epochs_entered: u64,
    /// Highest epoch over the counters held.
    pub epoch: u64,
    /// Counters waiting for a peer's archive of earlier epochs ([`Replica::archives_wanted`]).
    pub archives_wanted: u64,
}

/// A chunk of a peer's archive reply ([`Replica::archive_reply`]), decoded and checked
/// (every blob inflates and holds well-formed sealed tombstones) without the replica.
#[derive(Debug)]
pub struct ArchiveChunk {
    epoch: u64,
    complete: bool,
    blobs: counter::SealedArchive,
    manifest: Option<Vec<(String, u64)>>,
}

impl ArchiveChunk {
    /// Decodes `bytes` of counter `doc` (the document only names errors).
    pub fn decode(doc: &DocId, bytes: &[u8]) -> Result<ArchiveChunk, Error> {
        if bytes.len() > SYNC_MESSAGE_BYTES_MAX {
            return Err(Error::TooLong {
                what: "archive reply",
                len_bytes: bytes.len(),
                max_bytes: SYNC_MESSAGE_BYTES_MAX,
            });
        }
        let reply = snapshot::decode_archive_reply(bytes)?;
        Ok(ArchiveChunk {
            epoch: reply.epoch,
            complete: reply.complete,
            blobs: counter::SealedArchive::from_saved(doc, reply.archive, true)?,
            manifest: reply.manifest,
        })
    }
}

/// A snapshot of every document, and the op log position it covers.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Encoded snapshot (layout in the `snapshot` module docs).
    pub bytes: Vec<u8>,
    /// Op log position the snapshot covers; records up to it may be
    /// truncated once the snapshot is durable.
    pub covers_position: u64,
}

/// One epoch's automerge document of a document, with its per-peer sync states.
struct EpochDoc {
    epoch: u64,
    doc: Automerge,
    peers: BTreeMap<String, PeerSync>,
}

impl EpochDoc {
    fn new(epoch: u64, doc: Automerge) -> EpochDoc {
        EpochDoc { epoch, doc, peers: BTreeMap::new() }
    }

    /// Whether the document holds its genesis (a document created by changes or sync
    /// messages of a later epoch waits for it).
    fn ready(&self) -> bool {
        matches!(self.doc.get(automerge::ROOT, "kind"), Ok(Some(_)))
    }
}

/// Which epoch document of a [`DocState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Current,
    Previous,
    Next,
}

struct DocState {
    /// The epoch this replica writes to.
    cur: EpochDoc,
    /// The epoch before, kept (and read) until every member joined `cur`.
    previous: Option<EpochDoc>,
    /// Changes of the epoch after `cur` received before its genesis.
    next: Option<EpochDoc>,
    /// Hashes of `cur`'s sealed tombstones, and the archive of earlier epochs' (counters).
    sealed: counter::SealedIndex,
    /// Epoch of the last sync message from each peer, answered first.
    reply_epoch: BTreeMap<String, u64>,
    /// Whether `sealed` was built from a `cur` that held its genesis.
    indexed: bool,
    /// Whether this replica is known to have joined `cur`.
    self_joined: bool,
    /// A counter this replica started at a later epoch (restored without its data, or a
    /// new member) lacks the sealed tombstones of the epochs before: it asks its peers for
    /// their archive ([`Replica::archive_reply`]) until one whose own is complete answered.
    archive_wanted: bool,
    /// The first tick that found `archive_wanted` (not saved: a restart starts it again).
    /// Once the dedup window has passed since, nothing an archive could hold is inside it.
    archive_wanted_since_ms: Option<u64>,
    /// Exact counter total, for overflow checks; `None` after remote changes.
    counter_total: Option<i128>,
    /// Changes handed to automerge that it queued (their dependencies were missing), so
    /// that when a later batch releases them they are logged too. Mirrors automerge's
    /// queue, which it does not expose; `None` once more than [`PENDING_CHANGES_MAX`]
    /// were tracked (then an apply logs the whole difference of heads instead).
    pending: Option<Vec<Change>>,
}

/// automerge's sync state with one peer about one document, and what this round sent.
#[derive(Default)]
struct PeerSync {
    state: sync::State,
    sent_in_round: u32,
}

/// How [`Replica::local_change_as`] appends its record.
#[derive(Debug, Clone, Copy)]
enum Append {
    /// Durable before it returns.
    Synced,
    /// Queued; durable with the next sync (or any later synced append).
    Unsynced,
}

/// What one [`Replica::tick_step`] wrote.
#[derive(Debug, Default)]
pub struct TickStep {
    /// Changes to publish.
    pub changes: Vec<(DocId, ChangeBatch)>,
    /// Entries are left to fold: call again.
    pub more: bool,
}

/// Most queued changes a document tracks by itself (see `DocState::pending`).
const PENDING_CHANGES_MAX: usize = 4_096;

impl DocState {
    fn new(id: &DocId, epoch: u64, doc: Automerge) -> Result<DocState, Error> {
        let mut state = DocState {
            cur: EpochDoc::new(epoch, doc),
            previous: None,
            next: None,
            sealed: counter::SealedIndex::default(),
            reply_epoch: BTreeMap::new(),
            indexed: false,
            self_joined: false,
            archive_wanted: false,
            archive_wanted_since_ms: None,
            counter_total: None,
            pending: Some(Vec::new()),
        };
        state.reindex(id)?;
        Ok(state)
    }

    /// A state for a document first heard of at `epoch`: epoch 0 starts from the
    /// deterministic genesis, a later epoch waits for the coordinator's.
    fn fresh(id: &DocId, epoch: u64, actor: &ActorId) -> Result<DocState, Error> {
        let doc = if epoch == 0 {
            new_doc(id, actor)?
        } else {
            Automerge::new().with_actor(actor.clone())
        };
        let mut state = DocState::new(id, epoch, doc)?;
        // Epoch 0's document seals nothing; a later one's sealed the epochs before it, and
        // whatever earlier epochs sealed is in the peers' archives only.
        state.archive_wanted = epoch > 0 && id.kind() == DocKind::Counter;
        Ok(state)
    }

    /// After `cur` changed epochs or received its genesis.
    fn reindex(&mut self, id: &DocId) -> Result<(), Error> {
        self.indexed = self.cur.ready();
        let archive = std::mem::take(&mut self.sealed.archive);
        self.sealed = if id.kind() == DocKind::Counter && self.indexed {
            counter::SealedIndex::build(&self.cur.doc, id, archive)?
        } else {
            counter::SealedIndex::with_archive(archive)
        };
        if self.indexed && !counter::is_chained(&self.cur.doc) {
            // A genesis of an earlier version sealed the whole window: nothing to fetch.
            self.archive_wanted = false;
        }
        self.self_joined = false;
        self.counter_total = None;
        self.reset_pending();
        Ok(())
    }

    /// After a rollback (`fork_at` drops automerge's queue) or a replay.
    fn reset_pending(&mut self) {
        self.pending = self.cur.doc.get_missing_deps(&[]).is_empty().then(Vec::new);
    }

    /// The slot of `epoch`'s document, `None` for an epoch this replica no longer (or
    /// not yet) keeps.
    fn slot_of(&self, epoch: u64) -> Option<Slot> {
        if epoch == self.cur.epoch {
            Some(Slot::Current)
        } else if self.previous.as_ref().is_some_and(|p| p.epoch == epoch) {
            Some(Slot::Previous)
        } else if Some(epoch) == self.cur.epoch.checked_add(1) {
            Some(Slot::Next)
        } else {
            None
        }
    }

    /// The document of `slot`, creating the next epoch's when it is asked for.
    fn slot_mut(&mut self, slot: Slot, actor: &ActorId) -> &mut EpochDoc {
        match slot {
            Slot::Current => &mut self.cur,
            Slot::Previous => self.previous.as_mut().expect("slot_of checked it"),
            Slot::Next => {
                let epoch = self.cur.epoch + 1;
                self.next.get_or_insert_with(|| {
                    EpochDoc::new(epoch, Automerge::new().with_actor(actor.clone()))
                })
            }
        }
    }

    fn epoch_docs(&self) -> impl Iterator<Item = &EpochDoc> {
        std::iter::once(&self.cur).chain(self.next.as_ref()).chain(self.previous.as_ref())
    }

    fn epoch_docs_mut(&mut self) -> impl Iterator<Item = &mut EpochDoc> {
        std::iter::once(&mut self.cur).chain(self.next.as_mut()).chain(self.previous.as_mut())
    }

    /// The members that joined `cur` (every member, for epoch 0).
    fn joined(&self, id: &DocId) -> Result<BTreeSet<String>, Error> {
        Ok(counter::joined(&self.cur.doc, id)?.unwrap_or_default())
    }

    /// What the previous epoch adds to a read of `cur` (empty once it is dropped).
    fn extra(&self, id: &DocId) -> Result<counter::Extra, Error> {
        match &self.previous {
            Some(previous) if self.cur.ready() => {
                let joined = self.joined(id)?;
                counter::extra(&previous.doc, &self.cur.doc, id, &self.sealed, &joined)
            }
            _ => Ok(counter::Extra::new()),
        }
    }
}

/// One node's replica of named CRDT documents. See the crate docs for how a
/// service drives it.
pub struct Replica<L: OpLog> {
    node_id: String,
    actor: ActorId,
    members: Vec<String>,
    dedup_window_ms: u64,
    epoch_changes_min: u64,
    outgoing: VecDeque<(DocId, ChangeBatch)>,
    /// Folds a bounded tick step planned but left for the next step, per counter, with the
    /// epoch they were planned in.
    fold_backlog: BTreeMap<DocId, (u64, counter::FoldBacklog)>,
    /// Latest `now_ms` a caller passed (the time of changes the replica writes by itself).
    last_now_ms: u64,
    docs: BTreeMap<DocId, DocState>,
    log: L,
    metrics: ReplicaMetrics,
}

impl<L: OpLog> std::fmt::Debug for Replica<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("node_id", &self.node_id)
            .field("members", &self.members)
            .field("docs", &self.docs.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl<L: OpLog> Replica<L> {
    /// A replica with no documents, writing to `log` (which should be empty;
    /// use [`Replica::recover`] otherwise).
    pub fn new(config: ReplicaConfig, log: L) -> Result<Replica<L>, Error> {
        validate_node_id(&config.node_id)?;
        let mut members = BTreeSet::new();
        for member in &config.members {
            validate_node_id(member)?;
            members.insert(member.clone());
        }
        members.insert(config.node_id.clone());
        if members.len() > MEMBERS_MAX {
            return Err(Error::TooLong {
                what: "members",
                len_bytes: members.len(),
                max_bytes: MEMBERS_MAX,
            });
        }
        Ok(Replica {
            actor: actor_for(&config.node_id, config.incarnation),
            node_id: config.node_id,
            members: members.into_iter().collect(),
            dedup_window_ms: config.dedup_window_ms.max(1),
            epoch_changes_min: config.epoch_changes_min.max(1),
            outgoing: VecDeque::new(),
            fold_backlog: BTreeMap::new(),
            last_now_ms: 0,
            docs: BTreeMap::new(),
            log,
            metrics: ReplicaMetrics::default(),
        })
    }

    /// Rebuilds a replica from its latest durable snapshot (if any) and the
    /// records of `log` after the position the snapshot covers.
    pub fn recover(
        config: ReplicaConfig,
        log: L,
        snapshot: Option<&[u8]>,
    ) -> Result<Replica<L>, Error> {
        let mut replica = Replica::new(config, log)?;
        let mut after_position = 0;
        if let Some(bytes) = snapshot {
            let decoded = snapshot::decode(bytes)?;
            after_position = decoded.covers_position;
            for (id, parts, archived, archive_wanted) in decoded.docs {
                let mut current = None;
                let mut previous = None;
                let mut next = None;
                for part in parts {
                    let mut doc = Automerge::load(&part.bytes).map_err(|e| Error::Malformed {
                        what: "snapshot document",
                        reason: e.to_string(),
                    })?;
                    doc.set_actor(replica.actor.clone());
                    let epoch_doc = Some(EpochDoc::new(part.epoch, doc));
                    match part.role {
                        Role::Current => current = epoch_doc,
                        Role::Previous => previous = epoch_doc,
                        Role::Next => next = epoch_doc,
                    }
                }
                let current = current.ok_or_else(|| Error::Malformed {
                    what: "snapshot",
                    reason: format!("{id} has no current epoch"),
                })?;
                let mut state = DocState::new(&id, current.epoch, current.doc)?;
                state.sealed.archive =
                    counter::SealedArchive::from_saved(&id, archived, decoded.archive_deflated)?;
                state.archive_wanted = archive_wanted;
                state.previous = previous;
                state.next = next;
                replica.docs.insert(id, state);
            }
        }
        let actor = replica.actor.clone();
        let members = replica.members.clone();
        let docs = &mut replica.docs;
        let mut entered = 0;
        replica.log.replay(after_position, &mut |_, record| {
            let changes = parse_changes(&record.changes)?;
            let epoch = record.changes.epoch();
            let state = match docs.entry(record.doc.clone()) {
                std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
                std::collections::btree_map::Entry::Vacant(entry) => {
                    entry.insert(DocState::fresh(&record.doc, epoch, &actor)?)
                }
            };
            let slot = match state.slot_of(epoch) {
                Some(slot) => slot,
                // Live, the previous epoch's document existed without a record (it held
                // nothing to log before the next epoch arrived, so this replay started
                // the document at the next epoch): it takes this record.
                None if state.previous.is_none()
                    && Some(epoch) == state.cur.epoch.checked_sub(1) =>
                {
                    let fresh = DocState::fresh(&record.doc, epoch, &actor)?;
                    state.previous = Some(fresh.cur);
                    Slot::Previous
                }
                None => return Ok(()),
            };
            state.slot_mut(slot, &actor).doc.apply_changes(changes)?;
            entered += settle_epochs(state, &record.doc, &members)?;
            Ok(())
        })?;
        replica.metrics.epochs_entered += entered;
        for (id, state) in &mut replica.docs {
            state.reset_pending();
            // Every applied change is logged in apply order, so a replay leaves nothing
            // waiting for a dependency; anything that does was never applied before the
            // crash either, or the log lost a change (anti-entropy fetches it from peers).
            let missing = state.cur.doc.get_missing_deps(&[]);
            if !missing.is_empty() && state.cur.ready() {
                tracing::error!(
                    doc = %id,
                    missing_deps = missing.len(),
                    "recovered document has changes waiting for dependencies the log lacks"
                );
            }
        }
        // A crash between entering an epoch and logging the join leaves it to do now.
        for id in replica.docs() {
            if let Err(error) = replica.join_epoch(&id) {
                tracing::warn!(doc = %id, %error, "joining the current epoch after recovery");
            }
        }
        replica.metrics.log_position = replica.log.last_position();
        Ok(replica)
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// All members, sorted.
    pub fn members(&self) -> &[String] {
        &self.members
    }

    /// The documents this replica holds.
    pub fn docs(&self) -> Vec<DocId> {
        self.docs.keys().cloned().collect()
    }

    /// The op log.
    pub fn log(&self) -> &L {
        &self.log
    }

    /// Gives the op log back (the replica is gone; recover from it).
    pub fn into_log(self) -> L {
        self.log
    }

    // ----- counters -----

    /// Adds `amount` to counter `doc` under `op_id`. An op_id already seen
    /// (live or within the dedup window) with the same amount is a duplicate:
    /// `applied` is false and nothing is written.
    pub fn increment(
        &mut self,
        doc: &DocId,
        op_id: &str,
        amount: i64,
        now_ms: u64,
    ) -> Result<Update<i64>, Error> {
        expect_kind(doc, DocKind::Counter)?;
        if op_id.is_empty() {
            return Err(Error::MissingOpId);
        }
        check_len("op_id", op_id, OP_ID_BYTES_MAX)?;
        if amount == 0 {
            return Err(Error::ZeroAmount);
        }
        self.check_ready(doc)?;
        if let Some(state) = self.docs.get(doc).filter(|state| state.archive_wanted) {
            // Without the earlier epochs' op_ids a retry of one of them would count again.
            return Err(Error::Syncing { name: doc.to_string(), epoch: state.cur.epoch });
        }
        if let Some(state) = self.docs.get(doc)
            && let Some(existing) = known_op(state, doc, op_id)?
        {
            if existing != amount {
                return Err(Error::OpIdReused { op_id: op_id.to_owned(), existing, amount });
            }
            self.metrics.duplicate_ops += 1;
            let value = self.counter_total(doc)?;
            return Ok(Update { value: clamp(value), applied: false, changes: None });
        }
        let total = self.counter_total(doc)?;
        let next = total + i128::from(amount);
        if i64::try_from(next).is_err() {
            return Err(Error::Overflow { value: clamp(total), amount });
        }
        let changes =
            self.local_change(doc, now_ms, |tx| counter::write_increment(tx, doc, op_id, amount))?;
        if let Some(state) = self.docs.get_mut(doc) {
            state.counter_total = Some(next);
        }
        Ok(Update { value: clamp(next), applied: true, changes })
    }

    /// Counter `doc` as this replica sees it, `None` if it does not exist.
    pub fn counter(&self, doc: &DocId) -> Result<Option<CounterValue>, Error> {
        expect_kind(doc, DocKind::Counter)?;
        match self.docs.get(doc) {
            Some(state) if state.cur.ready() => {
                Ok(Some(counter::read(&state.cur.doc, doc, &state.sealed, &state.extra(doc)?)?))
            }
            _ => Ok(None),
        }
    }

    /// The epoch documents of `doc` and what they add, for test diagnostics.
    #[doc(hidden)]
    pub fn epoch_summary(&self, doc: &DocId) -> String {
        match self.docs.get(doc) {
            None => "absent".into(),
            Some(s) => format!(
                "cur {} ready {} prev {:?} next {:?} joined {:?} extra {:?} heads {}",
                s.cur.epoch,
                s.cur.ready(),
                s.previous.as_ref().map(|p| p.epoch),
                s.next.as_ref().map(|p| (p.epoch, p.ready())),
                counter::joined(&s.cur.doc, doc).ok(),
                s.extra(doc).ok(),
                s.cur.doc.get_heads().len(),
            ),
        }
    }

    /// The epoch counter `doc` writes to, `None` if it does not exist.
    pub fn epoch(&self, doc: &DocId) -> Option<u64> {
        self.docs.get(doc).map(|state| state.cur.epoch)
    }

    /// Changes this replica wrote while applying remote ones or recovering (its join of
    /// a new epoch): publish them like the changes of local operations.
    pub fn take_outgoing(&mut self) -> Vec<(DocId, ChangeBatch)> {
        self.outgoing.drain(..).collect()
    }

    fn counter_total(&mut self, doc: &DocId) -> Result<i128, Error> {
        let Some(state) = self.docs.get_mut(doc) else {
            return Ok(0);
        };
        if let Some(total) = state.counter_total {
            return Ok(total);
        }
        let total = counter::total(&state.cur.doc, doc, &state.sealed, &state.extra(doc)?)?;
        state.counter_total = Some(total);
        Ok(total)
    }

    /// Acknowledges the counter entries this replica has seen, folds the
    /// stable entries it is the folder of, and drops its tombstone buckets
    /// past the dedup window, for every counter. Call it periodically (the
    /// fold lag is about two periods plus the sync lag). Returns the changes
    /// to publish.
    pub fn tick(&mut self, now_ms: u64) -> Result<Vec<(DocId, ChangeBatch)>, Error> {
        let changes = self.tick_step(now_ms, usize::MAX)?.changes;
        self.sync_log()?;
        Ok(changes)
    }

    /// One bounded step of [`Replica::tick`]: folds at most `folds_max` entries per counter
    /// (automerge writes two ops per fold, so a backlog folded at once holds the replica's
    /// lock for long); `more` says entries were left for the next step. A caller that holds
    /// a lock around each step lets other work in between. Its maintenance records are
    /// appended without waiting (`OpLog::append_unsynced`): call [`Replica::sync_log`]
    /// before publishing what it returns (an ack must never outlive what it acks).
    pub fn tick_step(&mut self, now_ms: u64, folds_max: usize) -> Result<TickStep, Error> {
        self.last_now_ms = self.last_now_ms.max(now_ms);
        let mut more = false;
        let counters: Vec<DocId> =
            self.docs.keys().filter(|id| id.kind() == DocKind::Counter).cloned().collect();
        let bucket_ms = (self.dedup_window_ms / TOMBSTONE_BUCKETS_PER_WINDOW).max(1);
        let mut out = Vec::new();
        for id in counters {
            let window_ms = self.dedup_window_ms;
            let state = self.docs.get_mut(&id).expect("listed above");
            if state.archive_wanted {
                let since_ms = *state.archive_wanted_since_ms.get_or_insert(now_ms);
                if now_ms.saturating_sub(since_ms) >= window_ms {
                    state.archive_wanted = false;
                    tracing::warn!(doc = %id, "no complete archive from a peer within the dedup window; taking increments again");
                }
            }
            if !self.docs[&id].cur.ready() {
                continue;
            }
            // A join that failed when the epoch arrived is retried here.
            self.join_epoch(&id)?;
            let state = self.docs.get_mut(&id).expect("listed above");
            state.sealed.archive.expire(now_ms, self.dedup_window_ms);
            let state = &self.docs[&id];
            // A backlog left by the previous step is written first, without a new scan
            // (a scan reads every live entry); it belongs to the epoch it was planned in.
            let backlog = self
                .fold_backlog
                .remove(&id)
                .filter(|(epoch, backlog)| *epoch == state.cur.epoch && !backlog.is_empty());
            let (plan, backlog) = match backlog {
                Some((_, mut backlog)) => {
                    let plan = counter::plan_backlog(
                        &state.cur.doc,
                        &id,
                        &self.node_id,
                        &mut backlog,
                        folds_max,
                    )?;
                    (plan, backlog)
                }
                None => {
                    let mut plan = counter::plan_maintenance(
                        &state.cur.doc,
                        &id,
                        &self.node_id,
                        &self.members,
                        now_ms,
                        self.dedup_window_ms,
                    )?;
                    let backlog = plan.split_folds(folds_max);
                    (plan, backlog)
                }
            };
            let left = !backlog.is_empty();
            if left {
                self.fold_backlog.insert(id.clone(), (state.cur.epoch, backlog));
            }
            more |= left;
            if !plan.is_empty() {
                let node = self.node_id.clone();
                let changes = self.local_change_as(&id, now_ms, Append::Unsynced, |tx| {
                    counter::apply_maintenance(tx, &id, &node, &plan, now_ms, bucket_ms)
                })?;
                self.metrics.folded_ops += plan.folds() as u64;
                if let Some(changes) = changes {
                    // Maintenance is not a client operation.
                    self.metrics.local_ops -= 1;
                    out.push((id.clone(), changes));
                }
            }
            if !left && let Some(genesis) = self.start_epoch(&id, now_ms, bucket_ms)? {
                out.push((id, genesis));
            }
        }
        out.extend(self.take_outgoing());
        Ok(TickStep { changes: out, more })
    }

    /// As the coordinator (the lowest member id), starts the next epoch of counter `id`
    /// when its current one holds at least `epoch_changes_min` changes, every member
    /// joined it and the one before is gone: builds the genesis from the current state
    /// (see `counter::build_genesis`), logs it, and moves to it. Returns it to publish.
    fn start_epoch(
        &mut self,
        id: &DocId,
        now_ms: u64,
        bucket_ms: u64,
    ) -> Result<Option<ChangeBatch>, Error> {
        let state = &self.docs[id];
        if self.members.first() != Some(&self.node_id)
            || state.previous.is_some()
            || state.next.is_some()
            || !state.cur.ready()
            || !state.cur.doc.get_missing_deps(&[]).is_empty()
            || (state.cur.doc.get_heads().is_empty())
            || changes_held(&state.cur.doc) < self.epoch_threshold(&state.cur.doc)
            || !counter::all_joined(&state.cur.doc, id, &self.members)?
        {
            return Ok(None);
        }
        let epoch = state.cur.epoch + 1;
        let started = std::time::Instant::now();
        let by = counter::GenesisBy {
            node: &self.node_id,
            actor: &self.actor,
            epoch,
            now_ms,
            tombstone_bucket_ms: bucket_ms,
        };
        let Some(genesis) = counter::build_genesis(&state.cur.doc, id, &state.sealed, &by)? else {
            return Ok(None);
        };
        let mut batch = ChangeBatch::for_epoch(epoch);
        for change in genesis.get_changes(&[]) {
            batch.push(change.raw_bytes());
        }
        let record = OpRecord { doc: id.clone(), changes: batch };
        self.log.append(std::slice::from_ref(&record))?;
        let state = self.docs.get_mut(id).expect("present");
        state.next = Some(EpochDoc::new(epoch, genesis));
        self.metrics.epochs_entered += settle_epochs(state, id, &self.members)?;
        tracing::info!(
            doc = %id,
            epoch,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            genesis_bytes = record.changes.as_bytes().len(),
            "started a counter epoch"
        );
        Ok(Some(record.changes))
    }

    /// Changes an epoch document holds before the coordinator rebases it.
    fn epoch_threshold(&self, doc: &Automerge) -> u64 {
        if self.epoch_changes_min == u64::MAX || counter::is_sharded(doc) {
            self.epoch_changes_min
        } else {
            self.epoch_changes_min.min(FLAT_EPOCH_CHANGES_MAX)
        }
    }

    /// Joins the current epoch of counter `id` if this replica has not yet: carries its
    /// own increments of the previous epoch that the current one does not know over, and
    /// marks itself joined, in one logged change (queued for [`Replica::take_outgoing`]).
    /// Then drops the previous epoch if every member has joined.
    fn join_epoch(&mut self, id: &DocId) -> Result<(), Error> {
        let Some(state) = self.docs.get_mut(id) else {
            return Ok(());
        };
        if id.kind() != DocKind::Counter
            || state.self_joined
            || state.cur.epoch == 0
            || !state.cur.ready()
        {
            return Ok(());
        }
        if state.joined(id)?.contains(&self.node_id) {
            state.self_joined = true;
            return Ok(());
        }
        let started = std::time::Instant::now();
        let carried = match &state.previous {
            Some(previous) => {
                counter::plan_join(&previous.doc, &state.cur.doc, id, &state.sealed, &self.node_id)?
            }
            None => Vec::new(),
        };
        let node = self.node_id.clone();
        let now_ms = self.last_now_ms;
        let changes =
            self.local_change(id, now_ms, |tx| counter::write_join(tx, id, &node, &carried))?;
        self.metrics.local_ops -= 1;
        let state = self.docs.get_mut(id).expect("present");
        state.self_joined = true;
        state.counter_total = None;
        settle_epochs(state, id, &self.members)?;
        if let Some(changes) = changes {
            if self.outgoing.len() >= OUTGOING_MAX {
                self.outgoing.pop_front();
            }
            self.outgoing.push_back((id.clone(), changes));
        }
        tracing::info!(
            doc = %id,
            carried = carried.len(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "joined a counter epoch"
        );
        Ok(())
    }

    // ----- registers -----

    /// Sets register `doc` to `value` at `version`. The version must be
    /// higher than the current one; the same version with the same value
    /// again is a duplicate.
    pub fn set_register(
        &mut self,
        doc: &DocId,
        value: &serde_json::Value,
        version: u64,
        now_ms: u64,
    ) -> Result<Update<RegisterValue>, Error> {
        expect_kind(doc, DocKind::Register)?;
        let json = serde_json::to_vec(value)
            .map_err(|e| Error::Malformed { what: "register value", reason: e.to_string() })?;
        if json.len() > REGISTER_VALUE_BYTES_MAX {
            return Err(Error::TooLong {
                what: "register value",
                len_bytes: json.len(),
                max_bytes: REGISTER_VALUE_BYTES_MAX,
            });
        }
        if let Some(state) = self.docs.get(doc)
            && let Some((current, current_json)) = register::read_raw(&state.cur.doc, doc)?
        {
            if version == current && json == current_json {
                self.metrics.duplicate_ops += 1;
                return Ok(Update {
                    value: RegisterValue { value: value.clone(), version },
                    applied: false,
                    changes: None,
                });
            }
            if version <= current {
                return Err(Error::StaleVersion { version, current });
            }
        }
        let changes = self.local_change(doc, now_ms, |tx| register::write(tx, version, &json))?;
        Ok(Update {
            value: RegisterValue { value: value.clone(), version },
            applied: true,
            changes,
        })
    }

    /// Register `doc`'s winning value, `None` if it was never set here.
    pub fn register(&self, doc: &DocId) -> Result<Option<RegisterValue>, Error> {
        expect_kind(doc, DocKind::Register)?;
        match self.docs.get(doc) {
            None => Ok(None),
            Some(state) => register::read(&state.cur.doc, doc),
        }
    }

    // ----- sets -----

    /// Adds `member` to set `doc` (always a fresh add, so it wins over
    /// concurrent removes). `value` is whether the member is present: true.
    pub fn set_add(
        &mut self,
        doc: &DocId,
        member: &str,
        now_ms: u64,
    ) -> Result<Update<bool>, Error> {
        expect_kind(doc, DocKind::Set)?;
        check_member(member)?;
        let changes = self.local_change(doc, now_ms, |tx| set::add(tx, doc, member))?;
        Ok(Update { value: true, applied: true, changes })
    }

    /// Removes `member` from set `doc` (the adds this replica has seen).
    /// `value` is whether the member is present: false.
    pub fn set_remove(
        &mut self,
        doc: &DocId,
        member: &str,
        now_ms: u64,
    ) -> Result<Update<bool>, Error> {
        expect_kind(doc, DocKind::Set)?;
        check_member(member)?;
        let present = match self.docs.get(doc) {
            Some(state) => set::contains(&state.cur.doc, doc, member)?,
            None => false,
        };
        if !present {
            self.metrics.duplicate_ops += 1;
            return Ok(Update { value: false, applied: false, changes: None });
        }
        let changes = self.local_change(doc, now_ms, |tx| set::remove(tx, doc, member))?;
        Ok(Update { value: false, applied: true, changes })
    }

    /// Set `doc`'s members, sorted (empty if the set does not exist).
    pub fn set_members(&self, doc: &DocId) -> Result<Vec<String>, Error> {
        expect_kind(doc, DocKind::Set)?;
        match self.docs.get(doc) {
            None => Ok(Vec::new()),
            Some(state) => set::members(&state.cur.doc, doc),
        }
    }

    /// The add tags of `member` this replica sees; for tests of add-wins.
    #[doc(hidden)]
    pub fn set_add_tags(&self, doc: &DocId, member: &str) -> Result<Vec<String>, Error> {
        expect_kind(doc, DocKind::Set)?;
        match self.docs.get(doc) {
            None => Ok(Vec::new()),
            Some(state) => set::tags(&state.cur.doc, doc, member),
        }
    }

    // ----- lists -----

    /// Inserts `item` before `index` in list `doc`; `value` is the new length.
    pub fn list_insert(
        &mut self,
        doc: &DocId,
        index: usize,
        item: &str,
        now_ms: u64,
    ) -> Result<Update<usize>, Error> {
        expect_kind(doc, DocKind::List)?;
        check_len("list item", item, LIST_ITEM_BYTES_MAX)?;
        let changes = self.local_change(doc, now_ms, |tx| list::insert(tx, doc, index, item))?;
        let len = self.list_items(doc)?.len();
        Ok(Update { value: len, applied: true, changes })
    }

    /// Removes the item at `index` of list `doc`; `value` is the new length.
    pub fn list_remove(
        &mut self,
        doc: &DocId,
        index: usize,
        now_ms: u64,
    ) -> Result<Update<usize>, Error> {
        expect_kind(doc, DocKind::List)?;
        let changes = self.local_change(doc, now_ms, |tx| list::remove(tx, doc, index))?;
        let len = self.list_items(doc)?.len();
        Ok(Update { value: len, applied: true, changes })
    }

    /// List `doc`'s items (empty if the list does not exist).
    pub fn list_items(&self, doc: &DocId) -> Result<Vec<String>, Error> {
        expect_kind(doc, DocKind::List)?;
        match self.docs.get(doc) {
            None => Ok(Vec::new()),
            Some(state) => list::items(&state.cur.doc, doc),
        }
    }

    // ----- replication -----

    /// Applies a batch a peer published. Idempotent: changes already held
    /// are skipped. Malformed bytes are refused whole. A batch of an epoch this
    /// replica no longer keeps counts as duplicates.
    pub fn apply_changes(&mut self, doc: &DocId, batch: &[u8]) -> Result<RemoteApplied, Error> {
        let batch = ChangeBatch::from_bytes(batch)?;
        let changes = parse_changes(&batch)?;
        let epoch = batch.epoch();
        let slot = match self.docs.get(doc) {
            Some(state) => state.slot_of(epoch),
            None => Some(Slot::Current),
        };
        match slot {
            None => Ok(RemoteApplied { duplicates: changes.len(), ..RemoteApplied::default() }),
            Some(Slot::Current) => self.apply_current(doc, epoch, changes),
            Some(_) => {
                let total = changes.len();
                let actor = self.actor.clone();
                let mut duplicates = 0;
                let applied = self.remote_changes(doc, epoch, None, |state, slot| {
                    let epoch_doc = state.slot_mut(slot, &actor);
                    let fresh: Vec<Change> =
                        changes.into_iter().filter(|c| !has_change(&epoch_doc.doc, c)).collect();
                    duplicates = total - fresh.len();
                    epoch_doc.doc.apply_changes(fresh)?;
                    Ok(None)
                })?;
                let pending = total.saturating_sub(duplicates + applied);
                Ok(RemoteApplied { applied, duplicates, pending })
            }
        }
    }

    fn apply_current(
        &mut self,
        doc: &DocId,
        epoch: u64,
        changes: Vec<Change>,
    ) -> Result<RemoteApplied, Error> {
        let mut outcome = RemoteApplied::default();
        let mut fresh = Vec::new();
        // Changes already applied but handed over again (not to be logged twice).
        let mut held = std::collections::HashSet::new();
        match self.docs.get(doc) {
            Some(state) => {
                // While automerge holds queued changes, hand it everything: each apply
                // is also what releases queued changes whose dependencies are now in.
                let queue_empty = state.cur.doc.get_missing_deps(&[]).is_empty();
                for change in changes {
                    if !has_change(&state.cur.doc, &change) {
                        fresh.push(change);
                    } else if queue_empty {
                        outcome.duplicates += 1;
                    } else {
                        outcome.duplicates += 1;
                        held.insert(change.hash());
                        fresh.push(change);
                    }
                }
            }
            None => fresh = changes,
        }
        if fresh.is_empty() {
            return Ok(outcome);
        }
        // A known counter total is carried across the apply through the keys it writes
        // (queued changes it may release included), instead of a walk of the document at
        // the next increment; not while an epoch changes hands (the previous epoch's
        // increments count too).
        let carried = match self.docs.get(doc) {
            Some(state)
                if doc.kind() == DocKind::Counter
                    && state.previous.is_none()
                    && state.next.is_none()
                    && state.cur.ready() =>
            {
                match (state.counter_total, &state.pending) {
                    (Some(total), Some(pending)) => {
                        match counter::touched_keys(fresh.iter().chain(pending.iter())) {
                            Some(keys) => {
                                let before = counter::contribution(&state.cur.doc, doc, &keys)?;
                                Some((total, keys, before))
                            }
                            None => None,
                        }
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        let count = fresh.len() - held.len();
        let applied = self.remote_changes(doc, epoch, None, |state, _| {
            state.cur.doc.apply_changes(fresh.iter().cloned())?;
            // Log what was applied, from the bytes received (asking automerge for the
            // new changes costs a scan of the document): this batch's applied changes
            // and the queued ones it released. Local changes made later depend on
            // both, so a log without them would not replay.
            let Some(pending) = state.pending.as_mut() else {
                return Ok(None);
            };
            let mut applied = ChangeBatch::for_epoch(epoch);
            let mut still_pending = Vec::new();
            let mut seen = held;
            for change in pending.drain(..).chain(fresh.iter().cloned()) {
                if !seen.insert(change.hash()) {
                    continue;
                }
                if has_change(&state.cur.doc, &change) {
                    applied.push(change.raw_bytes());
                } else {
                    still_pending.push(change);
                }
            }
            state.pending = (still_pending.len() <= PENDING_CHANGES_MAX).then_some(still_pending);
            Ok(Some(applied))
        })?;
        outcome.applied = applied;
        outcome.pending = count.saturating_sub(applied);
        if let Some((total, keys, before)) = carried
            && let Some(state) = self.docs.get_mut(doc)
            && state.counter_total.is_none()
            && state.cur.epoch == epoch
            && state.previous.is_none()
        {
            match counter::contribution(&state.cur.doc, doc, &keys) {
                Ok(after) => state.counter_total = Some(total + after - before),
                Err(_) => state.counter_total = None,
            }
        }
        Ok(outcome)
    }

    /// The next anti-entropy message for `peer` about `doc`, if there is
    /// anything to say. Send it to the peer, which answers through
    /// [`Replica::receive_sync_message`]; repeat until both sides return
    /// `None`. A counter that is changing epochs syncs each epoch's document
    /// (the one the peer last spoke about first).
    pub fn sync_message(&mut self, doc: &DocId, peer: &str) -> Option<Vec<u8>> {
        let state = self.docs.get_mut(doc)?;
        let preferred = state.reply_epoch.get(peer).copied();
        let mut order: Vec<u64> = preferred.into_iter().collect();
        order.extend(state.epoch_docs().map(|d| d.epoch).filter(|e| Some(*e) != preferred));
        for epoch in order {
            let epoch_doc = match state.slot_of(epoch) {
                Some(Slot::Current) => &mut state.cur,
                Some(Slot::Previous) => state.previous.as_mut()?,
                Some(Slot::Next) => match state.next.as_mut() {
                    Some(next) => next,
                    None => continue,
                },
                None => continue,
            };
            let peer_sync = epoch_doc.peers.entry(peer.to_owned()).or_default();
            if peer_sync.sent_in_round >= SYNC_MESSAGES_PER_ROUND_MAX {
                continue;
            }
            if let Some(message) = epoch_doc.doc.generate_sync_message(&mut peer_sync.state) {
                peer_sync.sent_in_round += 1;
                let mut bytes = epoch.to_le_bytes().to_vec();
                bytes.extend_from_slice(&message.encode());
                return Some(bytes);
            }
        }
        None
    }

    /// Receives an anti-entropy message from `peer` about `doc` (creating
    /// the document if this replica did not have it). Returns how many
    /// changes it applied. A message about an epoch this replica no longer
    /// keeps is ignored.
    pub fn receive_sync_message(
        &mut self,
        doc: &DocId,
        peer: &str,
        message: &[u8],
    ) -> Result<usize, Error> {
        validate_node_id(peer)?;
        if message.len() > SYNC_MESSAGE_BYTES_MAX {
            return Err(Error::TooLong {
                what: "sync message",
                len_bytes: message.len(),
                max_bytes: SYNC_MESSAGE_BYTES_MAX,
            });
        }
        let (epoch, message) = message
            .split_first_chunk::<8>()
            .ok_or_else(|| Error::Malformed { what: "sync message", reason: "truncated".into() })?;
        let epoch = u64::from_le_bytes(*epoch);
        let message = sync::Message::decode(message)
            .map_err(|e| Error::Malformed { what: "sync message", reason: e.to_string() })?;
        self.metrics.sync_messages += 1;
        let actor = self.actor.clone();
        self.remote_changes(doc, epoch, Some(peer), |state, slot| {
            state.reply_epoch.insert(peer.to_owned(), epoch);
            // Split borrow: the document and this peer's sync state.
            let EpochDoc { doc, peers, .. } = state.slot_mut(slot, &actor);
            let peer_sync = peers.entry(peer.to_owned()).or_default();
            doc.receive_sync_message(&mut peer_sync.state, message)?;
            Ok(None)
        })
    }

    /// The heads of every epoch document of `doc` this replica holds, encoded for a peer's
    /// [`Replica::lacks_heads`]: the cheap half of anti-entropy. Sent some time after they
    /// were read, they name changes the live stream has had time to deliver, so a peer that
    /// lacks one missed it. `None` for a document it does not hold.
    /// Layout: `count: u8 | count x (epoch: u64 | heads: u16 | heads x 32-byte hash)`.
    pub fn heads(&self, doc: &DocId) -> Option<Vec<u8>> {
        let state = self.docs.get(doc)?;
        let docs: Vec<&EpochDoc> = state.epoch_docs().collect();
        let mut bytes = vec![docs.len() as u8];
        for epoch_doc in docs {
            let heads = epoch_doc.doc.get_heads();
            bytes.extend_from_slice(&epoch_doc.epoch.to_le_bytes());
            // automerge documents have a handful of heads (one per concurrent writer).
            bytes.extend_from_slice(&(heads.len().min(usize::from(u16::MAX)) as u16).to_le_bytes());
            for head in heads.iter().take(usize::from(u16::MAX)) {
                bytes.extend_from_slice(head.as_ref());
            }
        }
        Some(bytes)
    }

    /// Whether this replica lacks a change a peer's [`Replica::heads`] of `doc` name (or the
    /// document, or an epoch it has not reached): then a full anti-entropy exchange with
    /// that peer is due. Heads of an epoch it has left behind are ignored.
    pub fn lacks_heads(&self, doc: &DocId, heads: &[u8]) -> Result<bool, Error> {
        let malformed = |reason: &str| Error::Malformed { what: "heads", reason: reason.into() };
        let (count, mut rest) = heads.split_first().ok_or_else(|| malformed("truncated"))?;
        let mut listed = Vec::new();
        for _ in 0..*count {
            let (epoch, after) =
                rest.split_first_chunk::<8>().ok_or_else(|| malformed("truncated"))?;
            let (len, after) =
                after.split_first_chunk::<2>().ok_or_else(|| malformed("truncated"))?;
            let len = usize::from(u16::from_le_bytes(*len));
            if after.len() < len * 32 {
                return Err(malformed("truncated"));
            }
            let (hashes, after) = after.split_at(len * 32);
            listed.push((u64::from_le_bytes(*epoch), hashes));
            rest = after;
        }
        if !rest.is_empty() {
            return Err(malformed("trailing bytes"));
        }
        let Some(state) = self.docs.get(doc) else {
            return Ok(true);
        };
        for (epoch, hashes) in listed {
            let epoch_doc = match state.slot_of(epoch) {
                Some(Slot::Current) => &state.cur,
                Some(Slot::Previous) => state.previous.as_ref().expect("slot_of checked it"),
                Some(Slot::Next) => match &state.next {
                    Some(next) => next,
                    None => return Ok(true),
                },
                None if epoch < state.cur.epoch => continue,
                None => return Ok(true),
            };
            for hash in hashes.chunks_exact(32) {
                let hash = automerge::ChangeHash::try_from(hash).expect("32 bytes");
                if epoch_doc.doc.get_change_meta_by_hash(&hash).is_none() {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Forgets what is in flight with `peer` (call at the start of every
    /// anti-entropy round and when the connection to it is re-established):
    /// changes sent but maybe lost are offered again. The heads both sides
    /// last confirmed are kept (automerge's persisted sync state), so a round
    /// compares only the changes since then, not the whole history; a peer
    /// that lost its data is detected by automerge and fully resynced.
    pub fn reset_peer(&mut self, peer: &str) {
        for state in self.docs.values_mut() {
            for epoch_doc in state.epoch_docs_mut() {
                if let Some(peer_sync) = epoch_doc.peers.get_mut(peer) {
                    let shared_heads = std::mem::take(&mut peer_sync.state.shared_heads);
                    *peer_sync = PeerSync::default();
                    peer_sync.state.shared_heads = shared_heads;
                }
            }
        }
    }

    // ----- archive transfer -----

    /// Counters whose archive of earlier epochs' sealed tombstones this replica lacks (it
    /// started them at a later epoch: restored without its data, or a new member). Until
    /// a peer's archive is merged ([`Replica::receive_archive`]) it refuses their
    /// increments ([`Error::Syncing`]: a retry of an op_id from those epochs would count
    /// again), or until the dedup window has passed since the first tick that found it
    /// wanting. Ask every peer for [`Replica::archive_reply`].
    pub fn archives_wanted(&self) -> Vec<DocId> {
        self.docs
            .iter()
            .filter(|(_, state)| state.archive_wanted)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// A chunk of this replica's answer to a peer that wants counter `doc`'s archive: its
    /// current epoch, whether its own archive is complete, and the archived blobs
    /// (deflated) from the `from_blob`th on, at most `bytes_max` of them (at least one);
    /// the last chunk adds the manifest of every blob. Returns the chunk and where the next
    /// one starts (`None` after the last). Start at 0; a peer merges each chunk as it comes
    /// ([`Replica::receive_archive`]). `None` for a document it does not hold or that is
    /// not a counter.
    pub fn archive_reply(
        &self,
        doc: &DocId,
        from_blob: usize,
        bytes_max: usize,
    ) -> Option<(Vec<u8>, Option<usize>)> {
        let state = self.docs.get(doc).filter(|_| doc.kind() == DocKind::Counter)?;
        let archive = &state.sealed.archive;
        let (blobs, next) = archive.chunk(from_blob, bytes_max);
        let manifest = next.is_none().then(|| archive.manifest());
        let complete = !state.archive_wanted;
        let bytes =
            snapshot::encode_archive_reply(state.cur.epoch, complete, &blobs, manifest.as_deref());
        Some((bytes, next))
    }

    /// Merges a chunk of a peer's [`Replica::archive_reply`] about counter `doc`, decoded
    /// (and checked) by [`ArchiveChunk::decode`], which needs no replica and is the costly
    /// part: adds the blobs this replica lacks. It stops wanting the archive at a last chunk
    /// from a peer whose own archive is complete, at this replica's epoch or a later one,
    /// once it holds every blob of that chunk's manifest (a lost chunk leaves it wanting,
    /// and it asks again). Returns the blobs added. Merged blobs are kept in snapshots; a
    /// replica recovered from its log alone asks again.
    pub fn receive_archive(&mut self, doc: &DocId, peer: &str, chunk: ArchiveChunk) -> usize {
        let Some(state) = self.docs.get_mut(doc).filter(|_| doc.kind() == DocKind::Counter) else {
            return 0;
        };
        let added = state.sealed.merge(chunk.blobs);
        let Some(manifest) = chunk.manifest else {
            return added;
        };
        if state.archive_wanted
            && chunk.complete
            && chunk.epoch >= state.cur.epoch
            && manifest.iter().all(|(bucket, digest)| state.sealed.holds(bucket, *digest))
        {
            state.archive_wanted = false;
            tracing::info!(doc = %doc, peer, blobs = manifest.len(), "archive of earlier epochs received");
        }
        added
    }

    // ----- snapshots, compaction, metrics -----

    /// Every document, saved (automerge's compacted form), with the op log
    /// position it covers. Records up to that position may not be durable yet
    /// (see [`Replica::sync_log`]): make them durable before truncating the log
    /// or trusting the position.
    pub fn snapshot(&self) -> Snapshot {
        let covers_position = self.log.last_position();
        let part = |role: Role, epoch_doc: &EpochDoc| Part {
            role,
            epoch: epoch_doc.epoch,
            bytes: epoch_doc.doc.save(),
        };
        let docs: Vec<snapshot::SavedDoc<'_>> = self
            .docs
            .iter()
            .map(|(id, state)| {
                let mut parts = vec![part(Role::Current, &state.cur)];
                parts.extend(state.previous.as_ref().map(|p| part(Role::Previous, p)));
                parts.extend(state.next.as_ref().map(|n| part(Role::Next, n)));
                (id.clone(), parts, state.sealed.archive.saved().collect(), state.archive_wanted)
            })
            .collect();
        Snapshot { bytes: snapshot::encode(covers_position, &docs), covers_position }
    }

    /// Makes every op log record appended so far durable (before a snapshot that covers
    /// them is relied on: records of peers' changes are appended without waiting).
    pub fn sync_log(&mut self) -> Result<(), Error> {
        self.log.sync().map_err(Error::from)
    }

    /// Drops op log records covered by a snapshot the caller made durable.
    pub fn truncate_log(&mut self, through_position: u64) -> Result<(), Error> {
        self.log.truncate_through(through_position)?;
        Ok(())
    }

    /// Size of `doc` saved (what a snapshot stores for it: its epoch documents and a
    /// counter's archive of sealed tombstones), in bytes.
    /// Costs a save; call it at metrics intervals, not per operation.
    pub fn doc_bytes(&self, doc: &DocId) -> Option<usize> {
        self.docs.get(doc).map(|state| {
            state.epoch_docs().map(|d| d.doc.save().len()).sum::<usize>()
                + state.sealed.archive.bytes()
        })
    }

    /// Counter epochs this replica entered (cheap; [`ReplicaMetrics::epochs_entered`]).
    pub fn epochs_entered(&self) -> u64 {
        self.metrics.epochs_entered
    }

    /// What this replica did and holds.
    pub fn metrics(&self) -> ReplicaMetrics {
        let mut metrics = self.metrics;
        metrics.docs = self.docs.len() as u64;
        metrics.changes = 0;
        metrics.automerge_ops = 0;
        metrics.epoch = 0;
        metrics.archives_wanted = 0;
        for state in self.docs.values() {
            metrics.epoch = metrics.epoch.max(state.cur.epoch);
            metrics.archives_wanted += u64::from(state.archive_wanted);
            for epoch_doc in state.epoch_docs() {
                let stats = epoch_doc.doc.stats();
                metrics.changes += stats.num_changes;
                metrics.automerge_ops += stats.num_ops;
            }
        }
        metrics.log_position = self.log.last_position();
        metrics
    }

    // ----- internals -----

    /// Refuses local operations on a document that waits for its epoch's genesis.
    fn check_ready(&self, id: &DocId) -> Result<(), Error> {
        match self.docs.get(id) {
            Some(state) if !state.cur.ready() => {
                Err(Error::Syncing { name: id.to_string(), epoch: state.cur.epoch })
            }
            _ => Ok(()),
        }
    }

    /// Runs `write` in one transaction on `doc`'s current epoch (creating the
    /// document), logs the change durably, and rolls everything back on any error.
    fn local_change(
        &mut self,
        id: &DocId,
        now_ms: u64,
        write: impl FnOnce(&mut Transaction<'_>) -> Result<(), Error>,
    ) -> Result<Option<ChangeBatch>, Error> {
        self.local_change_as(id, now_ms, Append::Synced, write)
    }

    /// [`Replica::local_change`], its record appended as `append` says.
    fn local_change_as(
        &mut self,
        id: &DocId,
        now_ms: u64,
        append: Append,
        write: impl FnOnce(&mut Transaction<'_>) -> Result<(), Error>,
    ) -> Result<Option<ChangeBatch>, Error> {
        self.last_now_ms = self.last_now_ms.max(now_ms);
        self.check_ready(id)?;
        let created = !self.docs.contains_key(id);
        if created {
            if self.docs.len() >= DOCS_MAX {
                return Err(Error::TooManyDocs { max: DOCS_MAX });
            }
            self.docs.insert(id.clone(), DocState::fresh(id, 0, &self.actor)?);
        }
        let state = self.docs.get_mut(id).expect("inserted above");
        let heads_before = state.cur.doc.get_heads();
        let mut tx = state.cur.doc.transaction();
        if let Err(error) = write(&mut tx) {
            tx.rollback();
            if created {
                self.docs.remove(id);
            }
            return Err(error);
        }
        let time = i64::try_from(now_ms).unwrap_or(i64::MAX);
        let (hash, _) = tx.commit_with(CommitOptions::default().with_time(time));
        if hash.is_none() {
            return Ok(None);
        }
        let mut change =
            state.cur.doc.get_last_local_change().expect("a change was just committed");
        let mut batch = ChangeBatch::for_epoch(state.cur.epoch);
        batch.push(&change.bytes());
        let record = OpRecord { doc: id.clone(), changes: batch };
        let appended = match append {
            Append::Synced => self.log.append(std::slice::from_ref(&record)),
            Append::Unsynced => self.log.append_unsynced(std::slice::from_ref(&record)),
        };
        if let Err(error) = appended {
            if created {
                self.docs.remove(id);
            } else {
                let state = self.docs.get_mut(id).expect("present");
                let mut doc = state.cur.doc.fork_at(&heads_before)?;
                doc.set_actor(self.actor.clone());
                state.cur.doc = doc;
                state.counter_total = None;
                state.reset_pending();
            }
            return Err(error.into());
        }
        self.metrics.local_ops += 1;
        Ok(Some(record.changes))
    }

    /// Runs `receive` on the document of `epoch` of `id` (creating the document, or
    /// the next epoch's), logs every change it applied, and rolls back on any error.
    /// `receive` returns the applied changes when it knows them, `None` to have them
    /// looked up. Then moves epochs on (`settle_epochs`) and joins a new one. Returns
    /// how many changes were applied (0 for an epoch this replica no longer keeps).
    fn remote_changes(
        &mut self,
        id: &DocId,
        epoch: u64,
        peer: Option<&str>,
        receive: impl FnOnce(&mut DocState, Slot) -> Result<Option<ChangeBatch>, Error>,
    ) -> Result<usize, Error> {
        let created = !self.docs.contains_key(id);
        if created {
            if self.docs.len() >= DOCS_MAX {
                return Err(Error::TooManyDocs { max: DOCS_MAX });
            }
            self.docs.insert(id.clone(), DocState::fresh(id, epoch, &self.actor)?);
        }
        let actor = self.actor.clone();
        let state = self.docs.get_mut(id).expect("inserted above");
        let Some(slot) = state.slot_of(epoch) else {
            return Ok(0);
        };
        let next_created = slot == Slot::Next && state.next.is_none();
        let heads_before = state.slot_mut(slot, &actor).doc.get_heads();
        let result = receive(state, slot).map(|applied| match applied {
            Some(applied) => applied,
            None => {
                let epoch_doc = state.slot_mut(slot, &actor);
                let mut applied = ChangeBatch::for_epoch(epoch);
                if epoch_doc.doc.get_heads() != heads_before {
                    for mut change in epoch_doc.doc.get_changes(&heads_before) {
                        applied.push(&change.bytes());
                    }
                }
                // The difference holds whatever left the queue; what a sync message
                // put in it is unknown here, so track it again only once it is empty.
                if slot == Slot::Current {
                    state.reset_pending();
                }
                applied
            }
        });
        let logged = match result {
            Err(error) => Err(error),
            Ok(applied) if applied.is_empty() => Ok(0),
            Ok(applied) => {
                let count = applied.len();
                let record = OpRecord { doc: id.clone(), changes: applied };
                // A peer's changes: nothing is answered on them, and whatever this
                // replica writes that depends on them is appended (durably) after them.
                self.log
                    .append_unsynced(std::slice::from_ref(&record))
                    .map(|_| count)
                    .map_err(Error::from)
            }
        };
        match logged {
            Ok(count) => {
                let state = self.docs.get_mut(id).expect("present");
                if count > 0 {
                    state.counter_total = None;
                }
                self.metrics.remote_changes += count as u64;
                self.metrics.epochs_entered += settle_epochs(state, id, &self.members)?;
                if let Err(error) = self.join_epoch(id) {
                    // The changes are durable; the next tick tries again.
                    tracing::warn!(doc = %id, %error, "joining the current epoch");
                }
                Ok(count)
            }
            Err(error) => {
                if created {
                    self.docs.remove(id);
                } else {
                    let state = self.docs.get_mut(id).expect("present");
                    if next_created {
                        state.next = None;
                    } else {
                        let epoch_doc = state.slot_mut(slot, &actor);
                        let mut doc = epoch_doc.doc.fork_at(&heads_before)?;
                        doc.set_actor(actor.clone());
                        epoch_doc.doc = doc;
                        if let Some(peer) = peer {
                            epoch_doc.peers.remove(peer);
                        }
                    }
                    state.counter_total = None;
                    state.reset_pending();
                }
                Err(error)
            }
        }
    }
}

/// Changes `doc` holds (O(1) in automerge 0.12).
fn changes_held(doc: &Automerge) -> u64 {
    doc.stats().num_changes
}

/// Moves `state` to the next epoch once its genesis arrived (the current epoch becomes
/// the previous one; an older one is dropped: every member had joined the current one
/// before the coordinator started the next), reindexes a current epoch whose genesis
/// just arrived, and drops the previous epoch once every member joined the current one.
/// Deterministic in the documents' contents, so a replay of the log does the same.
/// Returns the epochs entered (0 or 1).
fn settle_epochs(state: &mut DocState, id: &DocId, members: &[String]) -> Result<u64, Error> {
    if id.kind() != DocKind::Counter {
        return Ok(0);
    }
    let mut entered = 0;
    if state.next.as_ref().is_some_and(EpochDoc::ready) {
        // The sealed tombstones of the epoch left behind stay with this replica when the
        // new genesis does not copy them (see `counter::SealedArchive`); read before
        // anything moves (`cur`'s blobs were checked when it was indexed).
        let leaving = counter::sealed_buckets(&state.cur.doc, id)?;
        let chained = state.next.as_ref().is_some_and(|next| counter::is_chained(&next.doc));
        state.sealed.archive.advance(id, leaving, chained)?;
        let next = state.next.take().expect("checked above");
        state.previous = Some(std::mem::replace(&mut state.cur, next));
        state.reindex(id)?;
        entered = 1;
    } else if !state.indexed && state.cur.ready() {
        state.reindex(id)?;
    }
    if state.previous.is_some()
        && state.cur.ready()
        && counter::all_joined(&state.cur.doc, id, members)?
    {
        state.previous = None;
        state.counter_total = None;
    }
    Ok(entered)
}

/// The amount counter `id` already holds for `op_id`: in the current epoch, or in the
/// previous one from a member that has not joined the current one.
fn known_op(state: &DocState, id: &DocId, op_id: &str) -> Result<Option<i64>, Error> {
    if let Some(amount) = counter::lookup(&state.cur.doc, id, &state.sealed, op_id)? {
        return Ok(Some(amount));
    }
    match &state.previous {
        Some(previous) => counter::extra_lookup(&previous.doc, id, &state.joined(id)?, op_id),
        None => Ok(None),
    }
}

/// Whether `doc` has applied `change` (a change-graph lookup). Not
/// `get_missing_deps(&[hash]).is_empty()`: that also reports the missing
/// dependencies of every *queued* change, so while anything waits in the queue
/// it calls every change absent, and applied changes would go unlogged.
fn has_change(doc: &Automerge, change: &Change) -> bool {
    doc.get_change_meta_by_hash(&change.hash()).is_some()
}

fn parse_changes(batch: &ChangeBatch) -> Result<Vec<Change>, Error> {
    batch
        .changes()
        .into_iter()
        .map(|bytes| {
            Change::from_bytes(bytes.to_vec())
                .map_err(|e| Error::Malformed { what: "change", reason: e.to_string() })
        })
        .collect()
}

fn expect_kind(doc: &DocId, expected: DocKind) -> Result<(), Error> {
    if doc.kind() == expected {
        Ok(())
    } else {
        Err(Error::WrongKind { name: doc.to_string(), expected, actual: doc.kind() })
    }
}

fn check_len(what: &'static str, text: &str, max_bytes: usize) -> Result<(), Error> {
    if text.len() > max_bytes {
        return Err(Error::TooLong { what, len_bytes: text.len(), max_bytes });
    }
    Ok(())
}

fn check_member(member: &str) -> Result<(), Error> {
    if member.is_empty() {
        return Err(Error::InvalidName {
            what: "set member",
            name: String::new(),
            reason: "empty",
        });
    }
    check_len("set member", member, SET_MEMBER_BYTES_MAX)
}

fn clamp(value: i128) -> i64 {
    i64::try_from(value).unwrap_or(if value < 0 { i64::MIN } else { i64::MAX })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oplog::MemOpLog;

    const NODES: [&str; 3] = ["a", "b", "c"];

    fn replicas() -> Vec<Replica<MemOpLog>> {
        NODES
            .iter()
            .map(|node| Replica::new(ReplicaConfig::new(node, &NODES), MemOpLog::new()).unwrap())
            .collect()
    }

    fn production() -> DocId {
        DocId::counter("production").unwrap()
    }

    /// Full anti-entropy between every pair, until nobody has anything to say.
    fn sync_all(replicas: &mut [Replica<MemOpLog>]) {
        let mut docs = BTreeSet::new();
        for replica in replicas.iter() {
            docs.extend(replica.docs());
        }
        for doc in &docs {
            for i in 0..replicas.len() {
                for j in 0..replicas.len() {
                    if i != j {
                        sync_pair(replicas, doc, i, j);
                    }
                }
            }
        }
    }

    fn sync_pair(replicas: &mut [Replica<MemOpLog>], doc: &DocId, i: usize, j: usize) {
        let (ni, nj) = (replicas[i].node_id().to_owned(), replicas[j].node_id().to_owned());
        replicas[i].reset_peer(&nj);
        replicas[j].reset_peer(&ni);
        for _round in 0..100 {
            let to_j = replicas[i].sync_message(doc, &nj);
            if let Some(message) = &to_j {
                replicas[j].receive_sync_message(doc, &ni, message).unwrap();
            }
            let to_i = replicas[j].sync_message(doc, &ni);
            if let Some(message) = &to_i {
                replicas[i].receive_sync_message(doc, &nj, message).unwrap();
            }
            if to_j.is_none() && to_i.is_none() {
                return;
            }
        }
        panic!("sync between {ni} and {nj} did not settle");
    }

    fn tick_and_sync(replicas: &mut [Replica<MemOpLog>], now_ms: u64) {
        for _ in 0..3 {
            for replica in replicas.iter_mut() {
                replica.tick(now_ms).unwrap();
            }
            sync_all(replicas);
        }
    }

    /// One of [`replicas`] after a crash: incarnation 1, recovered from its log alone.
    fn restarted(replica: &mut Replica<MemOpLog>) -> Replica<MemOpLog> {
        let node_id = replica.node_id.clone();
        let config = ReplicaConfig { incarnation: 1, ..ReplicaConfig::new(&node_id, &NODES) };
        Replica::recover(config, std::mem::take(&mut replica.log), None).unwrap()
    }

    fn value(replica: &Replica<MemOpLog>) -> CounterValue {
        replica.counter(&production()).unwrap().unwrap()
    }

    #[test]
    fn duplicate_op_id_at_one_replica_counts_once() {
        let mut r = replicas();
        let first = r[0].increment(&production(), "op-1", 5, 1).unwrap();
        assert!(first.applied && first.changes.is_some());
        let again = r[0].increment(&production(), "op-1", 5, 2).unwrap();
        assert!(!again.applied && again.changes.is_none());
        assert_eq!(again.value, 5);
    }

    #[test]
    fn same_op_id_at_two_replicas_counts_once_and_folds_once() {
        let mut r = replicas();
        let doc = production();
        let a = r[0].increment(&doc, "op-1", 5, 1).unwrap().changes.unwrap();
        let b = r[1].increment(&doc, "op-1", 5, 1).unwrap().changes.unwrap();
        r[1].increment(&doc, "op-2", -2, 1).unwrap();
        r[0].apply_changes(&doc, b.as_bytes()).unwrap();
        r[1].apply_changes(&doc, a.as_bytes()).unwrap();
        assert_eq!(value(&r[0]).value, 5);
        sync_all(&mut r);
        for replica in &r {
            assert_eq!(value(replica).value, 3);
            assert_eq!(value(replica).live_ops, 2);
        }
        tick_and_sync(&mut r, 10);
        for replica in &r {
            let v = value(replica);
            assert_eq!(v.value, 3, "{v:?}");
            assert_eq!(v.live_ops, 0, "all entries folded: {v:?}");
            assert_eq!(v.tombstones, 2);
            assert_eq!(v.replicas.values().sum::<i64>(), 3);
        }
        // A retry after folding, at any replica, is still a duplicate.
        let retry = r[2].increment(&doc, "op-1", 5, 20).unwrap();
        assert!(!retry.applied);
        assert_eq!(retry.value, 3);
    }

    /// a wrote ten entries (amounts 1..=10, 55 in all) and every member acked them: they
    /// are stable, ready for a to fold.
    fn ten_entries_at_a_acked_by_all() -> (Vec<Replica<MemOpLog>>, DocId) {
        let mut r = replicas();
        let doc = production();
        for i in 0..10 {
            r[0].increment(&doc, &format!("op-{i}"), i + 1, 1).unwrap();
        }
        sync_all(&mut r);
        for replica in r.iter_mut().skip(1) {
            replica.tick(5).unwrap();
        }
        sync_all(&mut r);
        (r, doc)
    }

    #[test]
    fn a_known_total_is_carried_exactly_across_a_peers_folds() {
        let (mut r, doc) = ten_entries_at_a_acked_by_all();
        // b answers a write of its own with the total: from then on it carries the total
        // across what it applies instead of walking the document.
        assert_eq!(r[1].increment(&doc, "b-1", 100, 6).unwrap().value, 155);
        // a folds its ten entries (every member acked them); b applies the fold as a peer
        // batch: each op_id leaves the live entries and its amount joins folded[a].
        let folds = r[0].tick(10).unwrap();
        assert!(!folds.is_empty());
        for (doc, batch) in &folds {
            r[1].apply_changes(doc, batch.as_bytes()).unwrap();
        }
        assert_eq!(value(&r[1]).live_ops, 1, "a's entries folded at b: {:?}", value(&r[1]));
        // The carried total answers b's next write.
        assert_eq!(r[1].increment(&doc, "b-2", 1, 11).unwrap().value, 156);
    }

    #[test]
    fn tick_steps_fold_a_backlog_in_bounded_pieces_and_keep_the_value() {
        let (mut r, _) = ten_entries_at_a_acked_by_all();
        // Every member acked: a's ten entries are stable, folded at most three per step.
        let (mut steps, mut more) = (0, true);
        while more {
            let live_before = value(&r[0]).live_ops;
            let step = r[0].tick_step(10, 3).unwrap();
            r[0].sync_log().unwrap();
            more = step.more;
            steps += 1;
            let v = value(&r[0]);
            assert!(live_before - v.live_ops <= 3, "step {steps} folded too many: {v:?}");
            assert_eq!(v.value, 55, "the value never changes while folding: {v:?}");
            assert!(steps <= 4, "ten entries take four steps of three");
        }
        assert_eq!(steps, 4);
        tick_and_sync(&mut r, 20);
        for replica in &r {
            let v = value(replica);
            assert_eq!((v.value, v.live_ops, v.tombstones), (55, 0, 10), "{v:?}");
        }
    }

    #[test]
    fn a_dead_member_pins_entries_until_removed() {
        let mut r = replicas();
        let doc = production();
        r[0].increment(&doc, "op-1", 1, 1).unwrap();
        let (live, _dead) = r.split_at_mut(2);
        tick_and_sync(live, 10);
        assert_eq!(value(&live[0]).live_ops, 1, "c never acked");
        assert_eq!(value(&live[0]).value, 1);
        let log = std::mem::take(&mut live[0].log);
        let mut shrunk = Replica::recover(
            ReplicaConfig { incarnation: 1, ..ReplicaConfig::new("a", &["a", "b"]) },
            log,
            None,
        )
        .unwrap();
        shrunk.tick(20).unwrap();
        assert_eq!(value(&shrunk).live_ops, 0);
        assert_eq!(value(&shrunk).value, 1);
    }

    #[test]
    fn a_flat_epoch_is_rebased_early_onto_a_sharded_one() {
        let mut r = Replica::new(ReplicaConfig::new("a", &["a"]), MemOpLog::new()).unwrap();
        let doc = production();
        let is_sharded = |r: &Replica<MemOpLog>| counter::is_sharded(&r.docs[&doc].cur.doc);
        r.increment(&doc, "op-0", 1, 0).unwrap();
        assert!(!is_sharded(&r), "epoch 0 keeps the deterministic flat genesis");
        let mut now_ms = 0;
        for i in 1..FLAT_EPOCH_CHANGES_MAX {
            r.increment(&doc, &format!("op-{i}"), 1, now_ms).unwrap();
            if i % 100 == 0 {
                now_ms += 100;
                r.tick(now_ms).unwrap();
            }
        }
        assert_eq!(r.epoch(&doc), Some(0), "not before {FLAT_EPOCH_CHANGES_MAX} changes");
        for i in FLAT_EPOCH_CHANGES_MAX..FLAT_EPOCH_CHANGES_MAX + 200 {
            r.increment(&doc, &format!("op-{i}"), 1, now_ms).unwrap();
        }
        now_ms += 100;
        r.tick(now_ms).unwrap();
        r.tick(now_ms + 100).unwrap();
        assert_eq!(r.epoch(&doc), Some(1), "{FLAT_EPOCH_CHANGES_MAX} changes is far below 20,000");
        assert!(is_sharded(&r));
        // Sharded: increments, duplicates (live, folded, sealed) and folding still exact.
        let total = FLAT_EPOCH_CHANGES_MAX as i64 + 200;
        assert!(!r.increment(&doc, "op-7", 1, now_ms).unwrap().applied);
        assert!(r.increment(&doc, "fresh", 5, now_ms).unwrap().applied);
        assert!(!r.increment(&doc, "fresh", 5, now_ms).unwrap().applied);
        r.tick(now_ms + 200).unwrap();
        assert_eq!(value(&r).live_ops, 0);
        assert_eq!(value(&r).tombstones as i64, total + 1);
        assert!(!r.increment(&doc, "fresh", 5, now_ms + 300).unwrap().applied);
        assert_eq!(value(&r).value, total + 5);
        let config = ReplicaConfig { incarnation: 1, ..ReplicaConfig::new("a", &["a"]) };
        let mut recovered = Replica::recover(config, std::mem::take(&mut r.log), None).unwrap();
        assert_eq!(value(&recovered).value, total + 5);
        assert!(!recovered.increment(&doc, "fresh", 5, now_ms + 400).unwrap().applied);
    }

    /// Replicas whose counters change epochs every 30 changes, in a window of 120 s.
    fn epoch_config(node: &str, incarnation: u64) -> ReplicaConfig {
        ReplicaConfig {
            epoch_changes_min: 30,
            dedup_window_ms: 120_000,
            incarnation,
            ..ReplicaConfig::new(node, &NODES)
        }
    }

    /// 40 rounds, one a second, of 30 increments (`op-{round}-{i}`) over the three
    /// [`epoch_config`] replicas, each round ticked and synced: the replicas, the total
    /// and each epoch's genesis size at `a`.
    fn forty_rounds_of_epochs() -> (Vec<Replica<MemOpLog>>, usize, BTreeMap<u64, usize>) {
        let mut r: Vec<_> = NODES
            .iter()
            .map(|n| Replica::new(epoch_config(n, 0), MemOpLog::new()).unwrap())
            .collect();
        let doc = production();
        let genesis_bytes = |r: &Replica<MemOpLog>| {
            let cur = &r.docs[&doc].cur.doc;
            cur.get_changes(&[]).iter().find(|c| c.deps().is_empty()).map(|c| c.raw_bytes().len())
        };
        let mut geneses = BTreeMap::new();
        let mut total = 0;
        for round in 0..40u64 {
            let now_ms = round * 1_000;
            for i in 0..30u64 {
                let op_id = format!("op-{round}-{i}");
                assert!(r[(i % 3) as usize].increment(&doc, &op_id, 1, now_ms).unwrap().applied);
                total += 1;
            }
            tick_and_sync(&mut r, now_ms);
            if let (Some(epoch), Some(bytes)) = (r[0].epoch(&doc), genesis_bytes(&r[0])) {
                geneses.insert(epoch, bytes);
            }
        }
        (r, total, geneses)
    }

    /// Asserts that `r` counts `total`, remembers every op_id, and refuses retries of
    /// op_ids from all through the 40 rounds.
    fn remembers_every_op_id(r: &mut Replica<MemOpLog>, total: usize, now_ms: u64, what: &str) {
        assert_eq!(value(r).value, total as i64, "{what}");
        assert_eq!(value(r).tombstones, total, "{what}: every op_id remembered");
        for round in (0..40).step_by(7) {
            let op_id = format!("op-{round}-5");
            assert!(
                !r.increment(&production(), &op_id, 1, now_ms).unwrap().applied,
                "{what}: {op_id}"
            );
        }
    }

    #[test]
    fn a_genesis_seals_only_its_epoch_and_the_archive_survives_restarts_until_the_window() {
        let window_ms = 120_000;
        let config = epoch_config;
        let (mut r, total, geneses) = forty_rounds_of_epochs();
        let doc = production();
        assert!(geneses.len() >= 8, "epochs: {geneses:?}");
        // Each genesis seals one epoch's op_ids (a few dozen), not the window (up to 1,200):
        // the last one is at most twice the size of the third, and far below the window's.
        let sizes: Vec<usize> = geneses.values().copied().collect();
        let last = *sizes.last().unwrap();
        assert!(last <= 2 * sizes[2], "genesis bytes by epoch: {geneses:?}");
        assert!(last < 10 * total / 4, "genesis bytes by epoch: {geneses:?}");
        let check = |r: &mut Replica<MemOpLog>, now_ms: u64, what: &str| {
            remembers_every_op_id(r, total, now_ms, what)
        };
        for replica in &mut r {
            let node = replica.node_id.clone();
            check(replica, 40_000, &format!("{node} live"));
        }
        // Recovered from the log alone, the archive is rebuilt from the geneses.
        let log = std::mem::take(&mut r[1].log);
        r[1] = Replica::recover(config("b", 1), log, None).unwrap();
        check(&mut r[1], 40_000, "b from its log");
        // Recovered from a snapshot that covers the whole log, the archive is in it.
        for (i, node) in NODES.iter().enumerate() {
            r[i].sync_log().unwrap();
            let snapshot = r[i].snapshot();
            r[i].truncate_log(snapshot.covers_position).unwrap();
            let log = std::mem::take(&mut r[i].log);
            r[i] = Replica::recover(config(node, 2), log, Some(&snapshot.bytes)).unwrap();
            check(&mut r[i], 40_000, &format!("{node} from its snapshot"));
        }
        // Past the window every bucket expires, archived or not, and a retry counts again.
        tick_and_sync(&mut r, 40_000 + window_ms + 20_000);
        for replica in &mut r {
            assert_eq!(value(replica).tombstones, 0, "{}", replica.node_id);
        }
        assert!(r[2].increment(&doc, "op-0-5", 1, 200_000).unwrap().applied);
    }

    #[test]
    fn a_member_restored_without_its_data_gets_the_archive_from_a_peer() {
        let (mut r, total, geneses) = forty_rounds_of_epochs();
        let doc = production();
        assert!(geneses.len() >= 8, "epochs: {geneses:?}");
        assert!(r.iter().all(|replica| replica.archives_wanted().is_empty()));
        // c loses its data directory: a new incarnation on an empty log, given the
        // counter by anti-entropy at the current epoch.
        r[2] = Replica::new(epoch_config("c", 5), MemOpLog::new()).unwrap();
        sync_all(&mut r);
        assert_eq!(r[2].epoch(&doc), r[0].epoch(&doc));
        assert_eq!(value(&r[2]).value, total as i64);
        assert_eq!(r[2].archives_wanted(), vec![doc.clone()]);
        assert_eq!(r[2].metrics().archives_wanted, 1);
        let wanting = r[2].snapshot();
        let known_before = value(&r[2]).tombstones;
        assert!(known_before < total / 2, "without the archive: {known_before} of {total}");
        // Until then it takes no increment: a retry of an older op_id would count again.
        let refused = r[2].increment(&doc, "op-0-5", 1, 40_000);
        assert!(matches!(refused, Err(Error::Syncing { .. })), "{refused:?}");
        assert_eq!(value(&r[2]).value, total as i64);
        // Every chunk of `from`'s reply, `bytes_max` of blobs each.
        let reply = |from: &Replica<MemOpLog>, bytes_max: usize| {
            let mut chunks = Vec::new();
            let mut next = Some(0);
            while let Some(start) = next {
                let (bytes, after) = from.archive_reply(&doc, start, bytes_max).unwrap();
                chunks.push(bytes);
                next = after;
            }
            chunks
        };
        let merge = |to: &mut Replica<MemOpLog>, from: &str, bytes: &[u8]| {
            to.receive_archive(&doc, from, ArchiveChunk::decode(&doc, bytes).unwrap())
        };
        // A malformed chunk, and a reply from a peer that wants the archive itself, change
        // nothing and leave it wanted.
        let whole = reply(&r[0], usize::MAX);
        assert_eq!(whole.len(), 1);
        let last = &whole[0];
        assert!(ArchiveChunk::decode(&doc, &last[..last.len() - 1]).is_err());
        assert_eq!(value(&r[2]).tombstones, known_before);
        let incomplete = snapshot::decode_archive_reply(last).unwrap();
        let incomplete_bytes = {
            let archive: Vec<(&str, &[u8])> =
                incomplete.archive.iter().map(|(b, blob)| (b.as_str(), blob.as_slice())).collect();
            let manifest: Vec<(&str, u64)> = incomplete
                .manifest
                .iter()
                .flatten()
                .map(|(b, digest)| (b.as_str(), *digest))
                .collect();
            let last_blob = &archive[archive.len() - 1..];
            snapshot::encode_archive_reply(incomplete.epoch, false, last_blob, Some(&manifest))
        };
        assert_eq!(merge(&mut r[2], "b", &incomplete_bytes), 1);
        assert_eq!(r[2].archives_wanted(), vec![doc.clone()]);
        // A complete peer's reply, one blob a chunk, its first chunk lost: every other
        // blob is merged but the manifest shows the gap, so it still wants the archive.
        let chunks = reply(&r[0], 1);
        assert!(chunks.len() > 3, "chunks: {}", chunks.len());
        for chunk in &chunks[1..] {
            merge(&mut r[2], "a", chunk);
        }
        assert_eq!(r[2].archives_wanted(), vec![doc.clone()]);
        // The next round's reply fills it: every op_id is known again, retries are refused.
        assert!(chunks.iter().map(|chunk| merge(&mut r[2], "a", chunk)).sum::<usize>() > 0);
        assert!(r[2].archives_wanted().is_empty());
        remembers_every_op_id(&mut r[2], total, 40_000, "c with a's archive");
        // Another peer's reply adds nothing (the blobs are the same ones).
        for chunk in reply(&r[1], 1 << 20) {
            assert_eq!(merge(&mut r[2], "b", &chunk), 0);
        }
        assert_eq!(value(&r[2]).tombstones, total);
        // Its snapshot keeps the merged archive; its log alone does not, so it asks again.
        r[2].sync_log().unwrap();
        let snapshot = r[2].snapshot();
        let log = std::mem::take(&mut r[2].log);
        let from_snapshot =
            Replica::recover(epoch_config("c", 6), log, Some(&snapshot.bytes)).unwrap();
        assert!(from_snapshot.archives_wanted().is_empty());
        assert_eq!(value(&from_snapshot).tombstones, total);
        let from_log =
            Replica::recover(epoch_config("c", 7), from_snapshot.into_log(), None).unwrap();
        assert_eq!(from_log.archives_wanted(), vec![doc.clone()]);
        // A snapshot taken while the archive was wanted says so.
        let wanting = Replica::recover(epoch_config("c", 8), MemOpLog::new(), Some(&wanting.bytes));
        let mut wanting = wanting.unwrap();
        assert_eq!(wanting.archives_wanted(), vec![doc.clone()]);
        // With no complete peer ever answering, it takes increments again once the dedup
        // window has passed since its first tick that wanted the archive.
        wanting.tick(50_000).unwrap();
        wanting.tick(50_000 + 119_999).unwrap();
        assert_eq!(wanting.archives_wanted(), vec![doc.clone()]);
        wanting.tick(50_000 + 120_000).unwrap();
        assert!(wanting.archives_wanted().is_empty());
        assert!(wanting.increment(&doc, "late", 1, 170_000).unwrap().applied);
    }

    #[test]
    fn heads_name_what_a_peer_lacks_and_epochs_it_left_are_ignored() {
        let mut r: Vec<_> = NODES
            .iter()
            .map(|n| Replica::new(epoch_config(n, 0), MemOpLog::new()).unwrap())
            .collect();
        let doc = production();
        r[0].increment(&doc, "x", 1, 1).unwrap();
        sync_all(&mut r);
        let early = r[0].heads(&doc).unwrap();
        assert!(!r[1].lacks_heads(&doc, &early).unwrap());
        // A change b has not received: named by a's heads, until anti-entropy brings it.
        r[0].increment(&doc, "y", 1, 2).unwrap();
        let later = r[0].heads(&doc).unwrap();
        assert!(r[1].lacks_heads(&doc, &later).unwrap());
        assert!(!r[1].lacks_heads(&doc, &early).unwrap(), "older heads are held");
        sync_all(&mut r);
        assert!(!r[1].lacks_heads(&doc, &later).unwrap());
        // A document b does not hold, and malformed heads.
        let other = DocId::counter("other").unwrap();
        r[0].increment(&other, "z", 1, 3).unwrap();
        assert!(r[1].lacks_heads(&other, &r[0].heads(&other).unwrap()).unwrap());
        assert!(r[1].heads(&other).is_none());
        assert!(r[1].lacks_heads(&doc, &later[..later.len() - 1]).is_err());
        assert!(r[1].lacks_heads(&doc, &[]).is_err());
        // Epochs later, heads of epoch 0 name nothing b needs; heads of an epoch b has not
        // reached name something it lacks.
        for round in 0..12u64 {
            for i in 0..30u64 {
                let op_id = format!("op-{round}-{i}");
                r[(i % 3) as usize].increment(&doc, &op_id, 1, round * 1_000).unwrap();
            }
            tick_and_sync(&mut r, round * 1_000);
        }
        assert!(r[1].epoch(&doc).unwrap() >= 2, "epoch {:?}", r[1].epoch(&doc));
        assert!(!r[1].lacks_heads(&doc, &early).unwrap());
        let mut ahead = vec![1u8];
        ahead.extend_from_slice(&(r[1].epoch(&doc).unwrap() + 2).to_le_bytes());
        ahead.extend_from_slice(&0u16.to_le_bytes());
        assert!(r[1].lacks_heads(&doc, &ahead).unwrap());
    }

    #[test]
    fn tombstones_expire_after_the_dedup_window() {
        let config = ReplicaConfig { dedup_window_ms: 1_000, ..ReplicaConfig::new("a", &["a"]) };
        let mut r = Replica::new(config, MemOpLog::new()).unwrap();
        let doc = production();
        r.increment(&doc, "op-1", 1, 0).unwrap();
        r.tick(0).unwrap();
        assert_eq!(value(&r).tombstones, 1);
        assert!(!r.increment(&doc, "op-1", 1, 500).unwrap().applied);
        r.tick(5_000).unwrap();
        assert_eq!(value(&r).tombstones, 0);
        // Documented policy: a retry later than the window counts again.
        assert!(r.increment(&doc, "op-1", 1, 5_001).unwrap().applied);
        assert_eq!(value(&r).value, 2);
    }

    #[test]
    fn bad_increments_are_refused_and_change_nothing() {
        let mut r = replicas();
        let doc = production();
        r[0].increment(&doc, "op-1", i64::MAX - 1, 1).unwrap();
        let heads = r[0].docs[&doc].cur.doc.get_heads();
        assert!(matches!(r[0].increment(&doc, "x", 0, 1), Err(Error::ZeroAmount)));
        assert!(matches!(r[0].increment(&doc, "", 1, 1), Err(Error::MissingOpId)));
        assert!(matches!(
            r[0].increment(&doc, &"x".repeat(OP_ID_BYTES_MAX + 1), 1, 1),
            Err(Error::TooLong { .. })
        ));
        assert!(matches!(r[0].increment(&doc, "op-2", 2, 1), Err(Error::Overflow { .. })));
        assert!(matches!(
            r[0].increment(&doc, "op-1", 3, 1),
            Err(Error::OpIdReused { existing, .. }) if existing == i64::MAX - 1
        ));
        assert!(matches!(
            r[0].increment(&DocId::set("production").unwrap(), "op-3", 1, 1),
            Err(Error::WrongKind { .. })
        ));
        assert!(matches!(r[0].apply_changes(&doc, b"garbage"), Err(Error::Malformed { .. })));
        let mut batch = ChangeBatch::new();
        batch.push(b"not an automerge change");
        assert!(matches!(r[0].apply_changes(&doc, batch.as_bytes()), Err(Error::Malformed { .. })));
        assert!(matches!(
            r[0].receive_sync_message(&doc, "b", b"\x42junk"),
            Err(Error::Malformed { .. })
        ));
        assert_eq!(r[0].docs[&doc].cur.doc.get_heads(), heads);
        assert_eq!(value(&r[0]).value, i64::MAX - 1);
        assert_eq!(r[0].log().len(), 1);
    }

    #[test]
    fn changes_applied_out_of_order_are_logged_and_recover() {
        // a writes c1 then c2 (c2 depends on c1); b hears c2 first (automerge queues it),
        // then c1 (which releases c2), then writes c3 on top of both. After a restart from
        // its log alone, b must show exactly what it showed before: every change the
        // document applied is in the log, including the one released from the queue.
        let mut r = replicas();
        let doc = production();
        let c1 = r[0].increment(&doc, "op-1", 1, 1).unwrap().changes.unwrap();
        let c2 = r[0].increment(&doc, "op-2", 10, 2).unwrap().changes.unwrap();
        let outcome = r[1].apply_changes(&doc, c2.as_bytes()).unwrap();
        assert_eq!((outcome.applied, outcome.pending), (0, 1));
        let outcome = r[1].apply_changes(&doc, c1.as_bytes()).unwrap();
        assert_eq!((outcome.applied, outcome.pending), (2, 0), "c1 and the released c2");
        assert!(r[1].increment(&doc, "op-3", 100, 3).unwrap().applied);
        assert_eq!(value(&r[1]).value, 111);
        let mut recovered = restarted(&mut r[1]);
        assert_eq!(value(&recovered).value, 111);
        assert!(!recovered.increment(&doc, "op-2", 10, 4).unwrap().applied);
        assert!(!recovered.increment(&doc, "op-3", 100, 4).unwrap().applied);
    }

    #[test]
    fn an_applied_change_is_logged_while_another_waits_in_the_queue() {
        // One batch brings c1 (applicable) and c3 (its dependency c2 is missing): c1 is
        // applied while c3 waits. c1 must be logged although the queue is not empty.
        let mut r = replicas();
        let doc = production();
        let c1 = r[0].increment(&doc, "op-1", 1, 1).unwrap().changes.unwrap();
        r[0].increment(&doc, "op-2", 10, 2).unwrap();
        let c3 = r[0].increment(&doc, "op-3", 100, 3).unwrap().changes.unwrap();
        let mut batch = ChangeBatch::new();
        assert!(batch.extend(&c1));
        assert!(batch.extend(&c3));
        let outcome = r[1].apply_changes(&doc, batch.as_bytes()).unwrap();
        assert_eq!((outcome.applied, outcome.pending), (1, 1));
        assert!(r[1].increment(&doc, "op-b", 1_000, 4).unwrap().applied);
        assert_eq!(value(&r[1]).value, 1_001);
        let recovered = restarted(&mut r[1]);
        assert_eq!(value(&recovered).value, 1_001);
    }

    #[test]
    fn a_failed_log_append_rolls_the_operation_back() {
        let mut r = replicas();
        let doc = production();
        r[0].increment(&doc, "op-1", 1, 1).unwrap();
        let remote = r[1].increment(&doc, "op-9", 9, 1).unwrap().changes.unwrap();
        r[0].log.fail_next_appends(1);
        assert!(matches!(r[0].increment(&doc, "op-2", 2, 1), Err(Error::OpLog(_))));
        assert_eq!(value(&r[0]).value, 1);
        r[0].log.fail_next_appends(1);
        assert!(r[0].apply_changes(&doc, remote.as_bytes()).is_err());
        assert_eq!(value(&r[0]).value, 1);
        // The same op_id goes through once the log works again.
        assert!(r[0].increment(&doc, "op-2", 2, 1).unwrap().applied);
        r[0].apply_changes(&doc, remote.as_bytes()).unwrap();
        assert_eq!(value(&r[0]).value, 12);
        let fresh_doc = DocId::counter("other").unwrap();
        r[0].log.fail_next_appends(1);
        assert!(r[0].increment(&fresh_doc, "op-1", 1, 1).is_err());
        assert!(r[0].counter(&fresh_doc).unwrap().is_none());
    }

    #[test]
    fn the_number_of_documents_is_bounded() {
        let mut r = replicas();
        for i in 0..DOCS_MAX {
            let doc = DocId::set(&format!("s{i}")).unwrap();
            r[0].set_add(&doc, "m", 1).unwrap();
        }
        let one_more = DocId::set("one-more").unwrap();
        assert!(matches!(r[0].set_add(&one_more, "m", 1), Err(Error::TooManyDocs { .. })));
        let offer = r[1].set_add(&one_more, "m", 1).unwrap().changes.unwrap();
        assert!(matches!(
            r[0].apply_changes(&one_more, offer.as_bytes()),
            Err(Error::TooManyDocs { .. })
        ));
        assert_eq!(r[0].docs().len(), DOCS_MAX);
    }

    #[test]
    fn recovery_from_snapshot_and_log_restores_everything() {
        let mut r = replicas();
        let doc = production();
        r[0].increment(&doc, "op-1", 1, 1).unwrap();
        let snapshot = r[0].snapshot();
        r[0].truncate_log(snapshot.covers_position).unwrap();
        r[0].increment(&doc, "op-2", 2, 2).unwrap();
        let remote = r[1].increment(&doc, "op-3", 3, 2).unwrap().changes.unwrap();
        r[0].apply_changes(&doc, remote.as_bytes()).unwrap();
        let log = std::mem::take(&mut r[0].log);
        let config = ReplicaConfig { incarnation: 1, ..ReplicaConfig::new("a", &NODES) };
        let mut recovered = Replica::recover(config, log, Some(&snapshot.bytes)).unwrap();
        assert_eq!(value(&recovered).value, 6);
        assert!(!recovered.increment(&doc, "op-2", 2, 3).unwrap().applied);
        assert!(recovered.increment(&doc, "op-4", 4, 3).unwrap().applied);
        r[0] = recovered;
        tick_and_sync(&mut r, 10);
        for replica in &r {
            assert_eq!(value(replica).value, 10);
            assert_eq!(value(replica).live_ops, 0);
        }
        let mut corrupt = snapshot.bytes.clone();
        corrupt[20] ^= 0xff;
        assert!(
            Replica::recover(ReplicaConfig::new("a", &NODES), MemOpLog::new(), Some(&corrupt))
                .is_err()
        );
    }

    #[test]
    fn registers_keep_the_highest_version_whatever_the_order() {
        let mut r = replicas();
        let doc = DocId::register("config").unwrap();
        let v5 = r[0].set_register(&doc, &serde_json::json!({"speed": 5}), 5, 1).unwrap();
        let v3 = r[1].set_register(&doc, &serde_json::json!({"speed": 3}), 3, 2).unwrap();
        r[1].apply_changes(&doc, v5.changes.unwrap().as_bytes()).unwrap();
        r[0].apply_changes(&doc, v3.changes.unwrap().as_bytes()).unwrap();
        for replica in &r[..2] {
            let value = replica.register(&doc).unwrap().unwrap();
            assert_eq!(value.version, 5);
            assert_eq!(value.value, serde_json::json!({"speed": 5}));
        }
        assert!(matches!(
            r[1].set_register(&doc, &serde_json::json!(1), 4, 3),
            Err(Error::StaleVersion { current: 5, .. })
        ));
        let again = r[1].set_register(&doc, &serde_json::json!({"speed": 5}), 5, 3).unwrap();
        assert!(!again.applied);
        assert!(r[1].set_register(&doc, &serde_json::json!(6), 6, 3).unwrap().applied);
    }

    #[test]
    fn sets_let_a_concurrent_add_win_over_a_remove() {
        let mut r = replicas();
        let doc = DocId::set("flags").unwrap();
        let add = r[0].set_add(&doc, "beta", 1).unwrap().changes.unwrap();
        r[1].apply_changes(&doc, add.as_bytes()).unwrap();
        let remove = r[1].set_remove(&doc, "beta", 2).unwrap().changes.unwrap();
        let re_add = r[0].set_add(&doc, "beta", 2).unwrap().changes.unwrap();
        r[0].apply_changes(&doc, remove.as_bytes()).unwrap();
        r[1].apply_changes(&doc, re_add.as_bytes()).unwrap();
        assert_eq!(r[0].set_members(&doc).unwrap(), vec!["beta"]);
        assert_eq!(r[1].set_members(&doc).unwrap(), vec!["beta"]);
        r[0].set_remove(&doc, "beta", 3).unwrap();
        assert!(r[0].set_members(&doc).unwrap().is_empty());
        assert!(!r[0].set_remove(&doc, "beta", 3).unwrap().applied);
        assert!(r[0].set_add(&doc, "", 3).is_err());
    }

    #[test]
    fn lists_converge_under_concurrent_inserts() {
        let mut r = replicas();
        let doc = DocId::list("queue").unwrap();
        r[0].list_insert(&doc, 0, "x", 1).unwrap();
        sync_all(&mut r);
        r[0].list_insert(&doc, 1, "a", 2).unwrap();
        r[1].list_insert(&doc, 1, "b", 2).unwrap();
        r[2].list_remove(&doc, 0, 2).unwrap();
        sync_all(&mut r);
        let items = r[0].list_items(&doc).unwrap();
        assert_eq!(items.len(), 2);
        assert!(items.contains(&"a".to_owned()) && items.contains(&"b".to_owned()));
        for replica in &r {
            assert_eq!(replica.list_items(&doc).unwrap(), items);
        }
        assert!(matches!(
            r[0].list_remove(&doc, 5, 3),
            Err(Error::IndexOutOfRange { index: 5, len: 2 })
        ));
    }

    #[test]
    fn metrics_count_ops_and_doc_bytes_grow_with_history() {
        let mut r = replicas();
        let doc = production();
        for i in 0..50 {
            r[0].increment(&doc, &format!("op-{i}"), 1, i).unwrap();
        }
        let before = r[0].doc_bytes(&doc).unwrap();
        r[0].tick(100).unwrap();
        assert!(r[0].doc_bytes(&doc).unwrap() > before);
        let metrics = r[0].metrics();
        assert_eq!(metrics.local_ops, 50);
        assert_eq!(metrics.changes, 51 + 1);
        assert_eq!(metrics.log_position, 51);
    }
}
