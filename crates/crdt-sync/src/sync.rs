//! NATS transport for a `Replica`: coalesced change batches on JetStream, anti-entropy on core NATS, ticks.
//!
//! - Local changes are queued by [`SyncedReplica::update`] after they are
//!   durable (or by [`SyncedReplica::update_deferred`], held until the caller
//!   says they are) and published on JetStream
//!   stream [`STREAM_NAME`], subject `edge.crdt.{doc}.changes.{node}`, with
//!   the origin and publish times in headers ([`ORIGIN_HEADER`],
//!   [`ORIGIN_US_HEADER`], [`PUBLISHED_HEADER`]). A batch that is durable after a
//!   quiet spell leaves at once; under load publish cycles are at least the flush
//!   interval (default [`FLUSH_INTERVAL_MS_DEFAULT`]) apart and coalesce per
//!   document what came meanwhile, so no durable batch waits longer than that.
//! - Every replica follows the stream with an ordered push consumer that
//!   starts at new messages (anti-entropy covers what came before), applies
//!   what peers publish (idempotent; batches already waiting are applied
//!   together, because one automerge apply costs a pass over the document)
//!   and records the replication lag with its stages ([`LagSample`]).
//! - Anti-entropy: automerge sync messages on core NATS,
//!   `edge.crdt.{doc}.sync.{from}.{to}`. A full round (reset the per-peer sync
//!   state, send the first message of every document to every member) runs
//!   on start, when the service calls [`SyncedReplica::reconnected`] and when
//!   this replica enters a counter epoch. Replies flow until both sides are done.
//!   Every anti-entropy interval a *heads* round sends each peer, on
//!   `edge.crdt.{doc}.heads.{from}.{to}`, the heads of every document as they were
//!   at the previous heads round ([`crate::Replica::heads`]): changes the live
//!   stream has had a whole interval to deliver. A peer that lacks one of them
//!   ([`crate::Replica::lacks_heads`]) missed something and asks the sender, on
//!   `edge.crdt.{doc}.sync-want.{from}.{to}`, to open a full exchange about that
//!   document with it. So a change the live stream lost arrives
//!   within two intervals, and while nothing is lost a round costs a few hashes
//!   per document and peer instead of automerge's sync protocol over everything
//!   since the last round (which held the replica lock long enough to set the
//!   replication lag's tail: docs/BENCHMARKS.md, counter-service).
//! - Archive transfer: a replica that started a counter at a later epoch (restored
//!   without its data, or a new member) lacks the earlier epochs' sealed tombstones
//!   ([`crate::Replica::archives_wanted`]). It asks every peer on
//!   `edge.crdt.{doc}.archive-want.{from}.{to}` (empty payload) when it first hears of the
//!   counter and at every round until a peer whose own archive is complete answered on
//!   `edge.crdt.{doc}.archive.{from}.{to}` ([`crate::Replica::archive_reply`], in chunks
//!   of at most [`ARCHIVE_CHUNK_BYTES_MAX`] of blobs, each copied under the replica lock
//!   on its own and sent in parts like a large sync message; the last chunk's manifest
//!   tells the asker whether it has every blob).
//! - Ticks ([`crate::Replica::tick`]: acks, folding, tombstone expiry) run
//!   every tick interval and are published like local changes.
//!
//! The broker is transport, not truth: a batch that could not be queued or
//! published is counted and left to anti-entropy.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

use crate::batch::ChangeBatch;
use crate::doc_id::DocId;
use crate::error::Error;
use crate::oplog::OpLog;
use crate::replica::{ArchiveChunk, Replica, SYNC_MESSAGE_BYTES_MAX, Update};

/// JetStream stream carrying change batches.
pub const STREAM_NAME: &str = "EDGE_CRDT";
/// Subjects of the stream.
pub const STREAM_SUBJECTS: &str = "edge.crdt.*.changes.*";
/// Header with the origin time of a batch (ms since the Unix epoch, of its
/// oldest change).
pub const ORIGIN_HEADER: &str = "Keel-Origin-Ms";
/// The same origin time in µs (the lag's stages need finer steps than ms); a batch without
/// it (from an earlier version) counts from [`ORIGIN_HEADER`].
pub const ORIGIN_US_HEADER: &str = "Keel-Origin-Us";
/// When the publisher handed the batch to NATS (µs since the Unix epoch, by its clock).
pub const PUBLISHED_HEADER: &str = "Keel-Published-Us";
/// Default least time between two publish cycles (the longest a durable batch waits).
pub const FLUSH_INTERVAL_MS_DEFAULT: u64 = 2;
/// Default period of anti-entropy rounds.
pub const ANTI_ENTROPY_INTERVAL_MS_DEFAULT: u64 = 5_000;
/// Default period of [`crate::Replica::tick`].
pub const TICK_INTERVAL_MS_DEFAULT: u64 = 100;
/// Default age after which the stream drops batches (anti-entropy covers
/// older gaps).
pub const STREAM_MAX_AGE_MS_DEFAULT: u64 = 60 * 60 * 1000;
/// Batches waiting for the publisher; beyond it, batches are dropped (and
/// counted) and anti-entropy delivers them.
pub const OUTBOX_CAPACITY: usize = 4_096;
/// Publish cycles whose JetStream acks are awaited beside the publisher (which goes on
/// coalescing and publishing meanwhile); beyond it the publisher waits.
pub const ACK_CYCLES_IN_FLIGHT_MAX: usize = 64;
/// Largest published message; a coalesced batch above it is split.
pub const PUBLISH_BYTES_MAX: usize = 512 * 1024;
/// Most peer batches applied together in one automerge apply.
pub const RECEIVE_BATCHES_MAX: usize = 1_024;
/// Replication lag samples kept for percentiles.
pub const LAG_SAMPLES_MAX: usize = 10_000;
/// Most entries one tick step folds per counter (two automerge ops each, ~0.1 ms apiece on
/// the development machine). Above a steady tick's folds at 1,000 increments/s over three
/// replicas (~35), so that only a backlog (after a partition, say) is split; each step is
/// one more change in the epoch's history, which counts towards the next epoch change.
pub const TICK_FOLDS_PER_STEP: usize = 64;
/// Most steps of one tick; what is left waits for the next tick.
pub const TICK_STEPS_MAX: usize = 256;
/// Longest a tick waits between two steps for the callers blocked on the replica lock.
pub const HANDOFF_WAIT_MS_MAX: u64 = 5;
/// Most bytes of archived blobs in one chunk of an archive reply (sent in parts of
/// [`SYNC_PART_BYTES_MAX`]); the receiver merges chunk by chunk.
pub const ARCHIVE_CHUNK_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Header of one part of a sync message too large for one NATS message: `{index}/{count}`.
pub const SYNC_PART_HEADER: &str = "Keel-Sync-Part";
/// Largest part of a sync message; larger messages (a replica that missed a long stretch
/// of history gets it all in one automerge sync message) are sent in parts of this size,
/// well under nats-server's default 1 MiB `max_payload`.
pub const SYNC_PART_BYTES_MAX: usize = 512 * 1024;
/// Sync messages being reassembled at once (one per peer and document); beyond it the
/// oldest is dropped and the next anti-entropy round sends it again.
pub const SYNC_ASSEMBLIES_MAX: usize = 64;

/// How a [`SyncedReplica`] talks to NATS.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// Least time between two publish cycles, so the longest a durable batch waits for
    /// its cycle; a batch after a quiet spell leaves at once.
    pub flush_interval_ms: u64,
    /// Period of heads rounds (anti-entropy; see the module docs).
    pub anti_entropy_interval_ms: u64,
    /// Period of ticks (acks, folding).
    pub tick_interval_ms: u64,
    /// Age limit of the stream's messages.
    pub stream_max_age_ms: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            flush_interval_ms: FLUSH_INTERVAL_MS_DEFAULT,
            anti_entropy_interval_ms: ANTI_ENTROPY_INTERVAL_MS_DEFAULT,
            tick_interval_ms: TICK_INTERVAL_MS_DEFAULT,
            stream_max_age_ms: STREAM_MAX_AGE_MS_DEFAULT,
        }
    }
}

/// Why the sync layer could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// The stream could not be created or opened.
    #[error("cannot open JetStream stream {STREAM_NAME}: {0}")]
    Stream(String),
    /// The change consumer could not be created.
    #[error("cannot follow stream {STREAM_NAME}: {0}")]
    Consumer(String),
    /// A core NATS subscription failed.
    #[error("cannot subscribe to {subject}: {reason}")]
    Subscribe {
        /// The subject.
        subject: String,
        /// Why.
        reason: String,
    },
}

/// Counters of the sync layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncMetrics {
    /// Batches published.
    pub batches_published: u64,
    /// Batches that failed to publish or did not fit the outbox.
    pub batches_dropped: u64,
    /// Peer batches applied (including duplicates).
    pub batches_received: u64,
    /// Peer batches or sync messages refused as malformed.
    pub messages_rejected: u64,
    /// Sync messages sent.
    pub sync_sent: u64,
    /// Sync messages received.
    pub sync_received: u64,
    /// Heads messages sent (one per heads round, document and peer).
    pub heads_sent: u64,
    /// Peers' heads messages naming a change this replica lacked: each asked that peer
    /// for a full anti-entropy exchange.
    pub heads_lacking: u64,
    /// Archive requests sent (one per peer and counter).
    pub archive_requests_sent: u64,
    /// Archive replies sent to peers that asked (each in one or more chunks).
    pub archive_replies_sent: u64,
    /// Chunks of peers' archive replies merged.
    pub archive_chunks_received: u64,
}

#[derive(Default)]
struct Counters {
    batches_published: AtomicU64,
    batches_dropped: AtomicU64,
    batches_received: AtomicU64,
    messages_rejected: AtomicU64,
    sync_sent: AtomicU64,
    sync_received: AtomicU64,
    heads_sent: AtomicU64,
    heads_lacking: AtomicU64,
    archive_requests_sent: AtomicU64,
    archive_replies_sent: AtomicU64,
    archive_chunks_received: AtomicU64,
}

struct Shared<L: OpLog> {
    replica: Mutex<Replica<L>>,
    /// Callers blocked in [`lock`]: a tick lets them in between its steps (std's mutex is
    /// not fair, and relocking at once would starve them).
    waiting: AtomicUsize,
    node_id: String,
    outbox: mpsc::Sender<Outgoing>,
    counters: Counters,
    lag: Mutex<VecDeque<LagSample>>,
    round: Notify,
    /// Counters whose archive was asked for since the last round (a round asks again for
    /// every one still wanted).
    archive_asked: Mutex<BTreeSet<DocId>>,
    /// Each document's heads read at the last heads round, sent at the next.
    last_heads: Mutex<BTreeMap<DocId, Vec<u8>>>,
    /// Sequence of the next queued batch. Batches are queued under the replica lock right
    /// after their records are appended, so this order is the op log's order.
    next_seq: AtomicU64,
    /// Every queued batch with a sequence up to this one is durable (the log is durable in
    /// order, so one durable batch proves every earlier one).
    durable_seq: watch::Sender<u64>,
}

struct Outgoing {
    doc: DocId,
    changes: ChangeBatch,
    origin_us: u64,
    /// Published once `durable_seq` reaches it.
    seq: u64,
}

/// The changes of one [`SyncedReplica::update_deferred`], queued for publishing in commit
/// order but held until [`Publication::release`]: call it once they are durable. A later
/// batch made durable releases them too (the log is durable in order). Dropped unreleased
/// (the caller could not make them durable and must stop, since every later append
/// fails), they are never published, and neither is anything after them.
#[derive(Debug)]
#[must_use = "held changes are published only once released"]
pub struct Publication {
    seq: Option<u64>,
    durable_seq: watch::Sender<u64>,
}

impl Publication {
    /// The changes are durable: publish them.
    pub fn release(self) {
        if let Some(seq) = self.seq {
            mark_durable(&self.durable_seq, seq);
        }
    }
}

fn mark_durable(durable_seq: &watch::Sender<u64>, seq: u64) {
    durable_seq.send_if_modified(|durable| {
        let advanced = seq > *durable;
        *durable = (*durable).max(seq);
        advanced
    });
}

/// A [`Replica`] connected to its peers over NATS. Cloning gives another
/// handle to the same replica.
pub struct SyncedReplica<L: OpLog> {
    shared: Arc<Shared<L>>,
    tasks: Arc<Vec<JoinHandle<()>>>,
}

impl<L: OpLog> Clone for SyncedReplica<L> {
    fn clone(&self) -> Self {
        SyncedReplica { shared: self.shared.clone(), tasks: self.tasks.clone() }
    }
}

impl<L: OpLog> std::fmt::Debug for SyncedReplica<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncedReplica")
            .field("node_id", &self.shared.node_id)
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the Unix epoch, by the wall clock.
pub fn now_ms() -> u64 {
    now_us() / 1_000
}

/// Microseconds since the Unix epoch, by the wall clock.
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_micros() as u64)
}

/// One peer batch's replication lag and its stages (µs). The origin and publish times are
/// the publisher's clock, the rest this replica's, so `transit_us` (and the total) hold
/// the clocks' offset too; `queued_us`, `waited_us` and `applied_us` each use one clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LagSample {
    /// From the batch's origin (its oldest change) to its apply here.
    pub total_us: u64,
    /// Origin to publish at the publisher: its group commit and the coalescing wait.
    /// `None`: the batch carried no publish time (an earlier version sent it).
    pub queued_us: Option<u64>,
    /// Publish to arrival here: the broker and the network.
    pub transit_us: Option<u64>,
    /// Arrival to this replica's lock: the batches taken with it, and whoever held the lock.
    pub waited_us: u64,
    /// Holding the lock: the automerge apply (of every batch taken with it) and its log append.
    pub applied_us: u64,
}

fn changes_subject(doc: &DocId, node: &str) -> String {
    format!("edge.crdt.{doc}.changes.{node}")
}

/// Kind token of anti-entropy messages.
const SYNC_KIND: &str = "sync";
/// Kind token of heads messages.
const HEADS_KIND: &str = "heads";
/// Kind token of a request for a full exchange (the sender lacks heads this node sent).
const SYNC_WANT_KIND: &str = "sync-want";
/// Kind token of archive requests.
const ARCHIVE_WANT_KIND: &str = "archive-want";
/// Kind token of archive replies.
const ARCHIVE_KIND: &str = "archive";

/// `edge.crdt.{doc}.{kind}.{from}.{to}`: a message from one replica to another.
fn peer_subject(doc: &DocId, kind: &str, from: &str, to: &str) -> String {
    format!("edge.crdt.{doc}.{kind}.{from}.{to}")
}

/// `(doc, kind, node tokens after the kind)` of an `edge.crdt.` subject.
fn parse_subject(subject: &str) -> Option<(DocId, &str, Vec<&str>)> {
    let mut tokens = subject.split('.');
    if tokens.next()? != "edge" || tokens.next()? != "crdt" {
        return None;
    }
    let doc = tokens.next()?.parse().ok()?;
    let kind = tokens.next()?;
    Some((doc, kind, tokens.collect()))
}

impl<L: OpLog + Send + 'static> SyncedReplica<L> {
    /// Connects `replica` to its peers through `client`: creates (or opens)
    /// the stream, follows it, answers anti-entropy, and starts the
    /// publisher, the ticks and a first anti-entropy round.
    pub async fn start(
        client: async_nats::Client,
        replica: Replica<L>,
        config: SyncConfig,
    ) -> Result<SyncedReplica<L>, SyncError> {
        let node_id = replica.node_id().to_owned();
        let context = jetstream::new(client.clone());
        let stream = context
            .get_or_create_stream(stream::Config {
                name: STREAM_NAME.to_owned(),
                subjects: vec![STREAM_SUBJECTS.to_owned()],
                max_age: Duration::from_millis(config.stream_max_age_ms),
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| SyncError::Stream(e.to_string()))?;
        let changes = stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: client.new_inbox(),
                filter_subject: STREAM_SUBJECTS.to_owned(),
                deliver_policy: consumer::DeliverPolicy::New,
                ..Default::default()
            })
            .await
            .map_err(|e| SyncError::Consumer(e.to_string()))?
            .messages()
            .await
            .map_err(|e| SyncError::Consumer(e.to_string()))?
            .filter_map(|message| std::future::ready(message.ok().map(|m| m.message)))
            .boxed();
        // Anti-entropy and archive messages to this node (`peer_subject`).
        let sync_filter = format!("edge.crdt.*.*.*.{node_id}");
        let sync_messages = client
            .subscribe(sync_filter.clone())
            .await
            .map_err(|e| SyncError::Subscribe { subject: sync_filter, reason: e.to_string() })?;

        let (outbox, outbox_rx) = mpsc::channel(OUTBOX_CAPACITY);
        let shared = Arc::new(Shared {
            replica: Mutex::new(replica),
            waiting: AtomicUsize::new(0),
            node_id,
            outbox,
            counters: Counters::default(),
            lag: Mutex::new(VecDeque::with_capacity(LAG_SAMPLES_MAX)),
            round: Notify::new(),
            archive_asked: Mutex::new(BTreeSet::new()),
            last_heads: Mutex::new(BTreeMap::new()),
            next_seq: AtomicU64::new(1),
            durable_seq: watch::Sender::new(0),
        });
        let tasks = vec![
            tokio::spawn(publish_loop(
                shared.clone(),
                context,
                outbox_rx,
                Duration::from_millis(config.flush_interval_ms),
            )),
            tokio::spawn(follow_changes(shared.clone(), changes)),
            tokio::spawn(answer_sync(shared.clone(), client.clone(), sync_messages)),
            tokio::spawn(periodic(shared.clone(), client, config)),
        ];
        shared.round.notify_one();
        Ok(SyncedReplica { shared, tasks: Arc::new(tasks) })
    }
}

impl<L: OpLog> SyncedReplica<L> {
    /// Runs a local operation on `doc` with the current time and queues
    /// its changes for publishing. When it returns `Ok`, the operation is
    /// durable. `operation` must touch only `doc`.
    pub fn update<T>(
        &self,
        doc: &DocId,
        operation: impl FnOnce(&mut Replica<L>, u64) -> Result<Update<T>, Error>,
    ) -> Result<Update<T>, Error> {
        let now_us = now_us();
        let mut replica = self.lock();
        let update = operation(&mut replica, now_us / 1_000)?;
        if let Some(changes) = &update.changes {
            // Queued under the lock, so batches leave in commit order.
            enqueue(&self.shared, doc.clone(), changes.clone(), now_us);
        }
        drop(replica);
        Ok(update)
    }

    /// Runs a local operation on `doc` whose log appends are queued but not waited for
    /// (e.g. a deferred group commit): `operation` runs under the replica lock, and its
    /// changes are queued for publishing in commit order but held. The caller makes them
    /// durable after this returns, without the lock (peers' changes, ticks and reads go
    /// on meanwhile, and may see them before they are durable), then releases the
    /// [`Publication`]. `operation` must touch only `doc`.
    pub fn update_deferred<T>(
        &self,
        doc: &DocId,
        operation: impl FnOnce(&mut Replica<L>, u64) -> Result<Update<T>, Error>,
    ) -> Result<(Update<T>, Publication), Error> {
        let now_us = now_us();
        let mut replica = self.lock();
        let update = operation(&mut replica, now_us / 1_000)?;
        let seq = update.changes.as_ref().map(|changes| {
            queue(&self.shared, doc.clone(), changes.clone(), now_us, Durable::Later)
        });
        let publication = Publication { seq, durable_seq: self.shared.durable_seq.clone() };
        drop(replica);
        Ok((update, publication))
    }

    /// Reads the replica.
    pub fn read<T>(&self, read: impl FnOnce(&Replica<L>) -> T) -> T {
        read(&self.lock())
    }

    /// Call when the NATS connection came back: runs an anti-entropy round.
    pub fn reconnected(&self) {
        self.shared.round.notify_one();
    }

    /// Replication lag samples (ms from a batch's origin to its apply
    /// here), oldest first, at most [`LAG_SAMPLES_MAX`].
    pub fn lag_samples_ms(&self) -> Vec<u64> {
        self.lag_samples().iter().map(|sample| sample.total_us / 1_000).collect()
    }

    /// Replication lag samples with their stages, oldest first, at most
    /// [`LAG_SAMPLES_MAX`].
    pub fn lag_samples(&self) -> Vec<LagSample> {
        self.shared.lag.lock().map(|lag| lag.iter().copied().collect()).unwrap_or_default()
    }

    /// Counters of the sync layer.
    pub fn metrics(&self) -> SyncMetrics {
        let c = &self.shared.counters;
        SyncMetrics {
            batches_published: c.batches_published.load(Ordering::Relaxed),
            batches_dropped: c.batches_dropped.load(Ordering::Relaxed),
            batches_received: c.batches_received.load(Ordering::Relaxed),
            messages_rejected: c.messages_rejected.load(Ordering::Relaxed),
            sync_sent: c.sync_sent.load(Ordering::Relaxed),
            sync_received: c.sync_received.load(Ordering::Relaxed),
            heads_sent: c.heads_sent.load(Ordering::Relaxed),
            heads_lacking: c.heads_lacking.load(Ordering::Relaxed),
            archive_requests_sent: c.archive_requests_sent.load(Ordering::Relaxed),
            archive_replies_sent: c.archive_replies_sent.load(Ordering::Relaxed),
            archive_chunks_received: c.archive_chunks_received.load(Ordering::Relaxed),
        }
    }

    /// Stops the background tasks (the replica stays readable through
    /// other handles).
    pub fn stop(&self) {
        for task in self.tasks.iter() {
            task.abort();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Replica<L>> {
        lock(&self.shared)
    }
}

fn lock<L: OpLog>(shared: &Shared<L>) -> MutexGuard<'_, Replica<L>> {
    if let Ok(guard) = shared.replica.try_lock() {
        return guard;
    }
    shared.waiting.fetch_add(1, Ordering::AcqRel);
    // A panic while holding the lock leaves the replica consistent (every
    // operation is all-or-nothing), so a poisoned lock is still usable.
    let guard = shared.replica.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    shared.waiting.fetch_sub(1, Ordering::AcqRel);
    guard
}

/// Waits (briefly, at most [`HANDOFF_WAIT_MS_MAX`]) until the callers blocked on the
/// replica lock got it.
fn hand_off<L: OpLog>(shared: &Shared<L>) {
    let deadline = std::time::Instant::now() + Duration::from_millis(HANDOFF_WAIT_MS_MAX);
    while shared.waiting.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline {
        std::thread::yield_now();
    }
}

/// Queues durable changes (call it under the replica lock).
fn enqueue<L: OpLog>(shared: &Shared<L>, doc: DocId, changes: ChangeBatch, origin_us: u64) {
    queue(shared, doc, changes, origin_us, Durable::Now);
}

/// Whether a queued batch's records are durable yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durable {
    Now,
    /// Held until `durable_seq` reaches its sequence.
    Later,
}

/// Queues a batch under the replica lock, right after its records were appended; returns
/// its sequence.
fn queue<L: OpLog>(
    shared: &Shared<L>,
    doc: DocId,
    changes: ChangeBatch,
    origin_us: u64,
    durable: Durable,
) -> u64 {
    let seq = shared.next_seq.fetch_add(1, Ordering::Relaxed);
    if durable == Durable::Now {
        mark_durable(&shared.durable_seq, seq);
    }
    if shared.outbox.try_send(Outgoing { doc, changes, origin_us, seq }).is_err() {
        shared.counters.batches_dropped.fetch_add(1, Ordering::Relaxed);
    }
    seq
}

/// Waits until `item`'s records are durable; `false`: never (the sync layer stops).
async fn releasable(durable_seq: &mut watch::Receiver<u64>, item: &Outgoing) -> bool {
    durable_seq.wait_for(|durable| *durable >= item.seq).await.is_ok()
}

async fn publish_loop<L: OpLog + Send + 'static>(
    shared: Arc<Shared<L>>,
    context: jetstream::Context,
    mut outbox: mpsc::Receiver<Outgoing>,
    flush_interval: Duration,
) {
    // Acks are counted by their own task: waiting for them here would hold every change
    // queued meanwhile for a JetStream round trip.
    let (ack_tx, mut ack_rx) =
        mpsc::channel::<Vec<jetstream::context::PublishAckFuture>>(ACK_CYCLES_IN_FLIGHT_MAX);
    let counting = shared.clone();
    let acks_task = tokio::spawn(async move {
        while let Some(acks) = ack_rx.recv().await {
            for ack in acks {
                let counter = match ack.await {
                    Ok(_) => &counting.counters.batches_published,
                    Err(_) => &counting.counters.batches_dropped,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let mut durable_seq = shared.durable_seq.subscribe();
    // A batch taken from the outbox but not durable when its cycle closed: the next
    // cycle's first.
    let mut carried: Option<Outgoing> = None;
    let mut last_publish: Option<tokio::time::Instant> = None;
    let mut stopping = false;
    while !stopping {
        let Some(first) = (match carried.take() {
            Some(item) => Some(item),
            None => outbox.recv().await,
        }) else {
            break;
        };
        if !releasable(&mut durable_seq, &first).await {
            break;
        }
        // After a quiet spell a batch leaves at once; under load cycles are at least the
        // flush interval apart, and what comes meanwhile is coalesced. Either way no batch
        // waits longer than the flush interval once it is durable.
        let now = tokio::time::Instant::now();
        let deadline = last_publish.map_or(now, |at| (at + flush_interval).max(now));
        let mut pending: BTreeMap<DocId, Vec<(ChangeBatch, u64)>> = BTreeMap::new();
        let mut add = |item: Outgoing| {
            let batches = pending.entry(item.doc).or_default();
            let merged = match batches.last_mut() {
                Some((batch, _))
                    if batch.as_bytes().len() + item.changes.as_bytes().len()
                        <= PUBLISH_BYTES_MAX =>
                {
                    // Batches of two epochs are published apart.
                    batch.extend(&item.changes)
                }
                _ => false,
            };
            if !merged {
                batches.push((item.changes, item.origin_us));
            }
        };
        add(first);
        loop {
            // Past the deadline only what is already waiting joins the cycle.
            let next = if tokio::time::Instant::now() < deadline {
                tokio::time::timeout_at(deadline, outbox.recv()).await.ok().flatten()
            } else {
                outbox.try_recv().ok()
            };
            let Some(item) = next else {
                break;
            };
            if *durable_seq.borrow() >= item.seq {
                add(item);
                continue;
            }
            // Not durable yet: wait for it until the deadline at most, else it opens the
            // next cycle (batches leave in order).
            match tokio::time::timeout_at(deadline, releasable(&mut durable_seq, &item)).await {
                Ok(true) => add(item),
                Ok(false) => {
                    stopping = true;
                    break;
                }
                Err(_) => {
                    carried = Some(item);
                    break;
                }
            }
        }
        let mut acks = Vec::new();
        for (doc, batches) in pending {
            let subject = changes_subject(&doc, &shared.node_id);
            for (batch, origin_us) in batches {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(ORIGIN_HEADER, (origin_us / 1_000).to_string().as_str());
                headers.insert(ORIGIN_US_HEADER, origin_us.to_string().as_str());
                headers.insert(PUBLISHED_HEADER, now_us().to_string().as_str());
                match context
                    .publish_with_headers(subject.clone(), headers, Bytes::from(batch.into_bytes()))
                    .await
                {
                    Ok(ack) => acks.push(ack),
                    Err(_) => {
                        shared.counters.batches_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
        last_publish = Some(tokio::time::Instant::now());
        if ack_tx.send(acks).await.is_err() {
            break;
        }
    }
    drop(ack_tx);
    let _ = acks_task.await;
}

/// A peer batch received from the stream.
struct Received {
    doc: DocId,
    payload: Bytes,
    /// The publisher's origin time of the batch (µs).
    origin_us: Option<u64>,
    /// When the publisher published it (µs, its clock).
    published_us: Option<u64>,
    /// When it arrived here (µs).
    arrived_us: u64,
}

async fn follow_changes<L: OpLog>(
    shared: Arc<Shared<L>>,
    mut changes: futures::stream::BoxStream<'static, async_nats::Message>,
) {
    use futures::FutureExt;
    while let Some(message) = changes.next().await {
        // Drain what is already waiting: one automerge apply costs a pass
        // over the document, so applying many batches at once is far
        // cheaper than one by one. Applied here rather than handed to a thread of its
        // own: the wake-up of that thread cost a quarter of a millisecond or more at the median
        // (docs/BENCHMARKS.md, counter-service).
        let mut received: Vec<Received> = accept(&shared, message).into_iter().collect();
        while received.len() < RECEIVE_BATCHES_MAX {
            match changes.next().now_or_never() {
                Some(Some(message)) => received.extend(accept(&shared, message)),
                _ => break,
            }
        }
        apply_received(&shared, received);
    }
}

fn accept<L: OpLog>(shared: &Shared<L>, message: async_nats::Message) -> Option<Received> {
    let Some((doc, "changes", nodes)) = parse_subject(message.subject.as_str()) else {
        shared.counters.messages_rejected.fetch_add(1, Ordering::Relaxed);
        return None;
    };
    if nodes.first().copied() == Some(shared.node_id.as_str()) {
        return None;
    }
    let header = |name: &str| {
        message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(name))
            .and_then(|value| value.as_str().parse::<u64>().ok())
    };
    let origin_us = header(ORIGIN_US_HEADER)
        .or_else(|| header(ORIGIN_HEADER).map(|ms| ms.saturating_mul(1_000)));
    Some(Received {
        doc,
        payload: message.payload.clone(),
        origin_us,
        published_us: header(PUBLISHED_HEADER),
        arrived_us: now_us(),
    })
}

fn apply_received<L: OpLog>(shared: &Shared<L>, received: Vec<Received>) {
    let mut by_doc: BTreeMap<DocId, Vec<Received>> = BTreeMap::new();
    for item in received {
        by_doc.entry(item.doc.clone()).or_default().push(item);
    }
    let mut replica = lock(shared);
    let locked_us = now_us();
    let entered = replica.epochs_entered();
    for (doc, items) in by_doc {
        let mut combined = ChangeBatch::new();
        let mut framed = true;
        for item in &items {
            match ChangeBatch::from_bytes(&item.payload) {
                // Batches of two epochs (around an epoch change) go one by one.
                Ok(batch) => framed &= combined.extend(&batch),
                Err(_) => framed = false,
            }
        }
        // One apply for all; if anything in it is bad, one by one so only
        // the bad batches are refused.
        let together = framed && replica.apply_changes(&doc, combined.as_bytes()).is_ok();
        for item in &items {
            let ok = together || replica.apply_changes(&doc, &item.payload).is_ok();
            let counter = if ok {
                &shared.counters.batches_received
            } else {
                &shared.counters.messages_rejected
            };
            counter.fetch_add(1, Ordering::Relaxed);
            if ok && let Some(origin_us) = item.origin_us {
                let applied_us = now_us();
                record_lag(
                    shared,
                    LagSample {
                        total_us: applied_us.saturating_sub(origin_us),
                        queued_us: item.published_us.map(|p| p.saturating_sub(origin_us)),
                        transit_us: item.published_us.map(|p| item.arrived_us.saturating_sub(p)),
                        waited_us: locked_us.saturating_sub(item.arrived_us),
                        applied_us: applied_us.saturating_sub(locked_us),
                    },
                );
            }
        }
    }
    after_remote(shared, &mut replica, entered);
}

/// Publishes what the replica wrote by itself while applying remote changes (its join of
/// a new epoch) and, when it entered an epoch, starts an anti-entropy round: a genesis
/// too large for one message travels in sync message parts.
fn after_remote<L: OpLog>(shared: &Shared<L>, replica: &mut Replica<L>, entered_before: u64) {
    let now = now_us();
    for (doc, changes) in replica.take_outgoing() {
        enqueue(shared, doc, changes, now);
    }
    if replica.epochs_entered() != entered_before {
        shared.round.notify_one();
    }
}

fn record_lag<L: OpLog>(shared: &Shared<L>, sample: LagSample) {
    if let Ok(mut samples) = shared.lag.lock() {
        if samples.len() == LAG_SAMPLES_MAX {
            samples.pop_front();
        }
        samples.push_back(sample);
    }
}

async fn answer_sync<L: OpLog + Send + 'static>(
    shared: Arc<Shared<L>>,
    client: async_nats::Client,
    mut messages: async_nats::Subscriber,
) {
    let mut assemblies = Assemblies::default();
    let mut archive_assemblies = Assemblies::default();
    while let Some(message) = messages.next().await {
        let Some((doc, kind, nodes)) = parse_subject(message.subject.as_str()) else {
            continue;
        };
        let [from, _to] = nodes[..] else {
            continue;
        };
        let from = from.to_owned();
        let assemblies = match kind {
            SYNC_KIND => &mut assemblies,
            ARCHIVE_KIND => &mut archive_assemblies,
            ARCHIVE_WANT_KIND => {
                answer_archive_request(&shared, &client, doc, from).await;
                continue;
            }
            HEADS_KIND => {
                check_heads(&shared, &client, doc, from, message.payload.clone()).await;
                continue;
            }
            SYNC_WANT_KIND => {
                open_exchange(&shared, &client, doc, from).await;
                continue;
            }
            _ => continue,
        };
        let part = message.headers.as_ref().and_then(|headers| headers.get(SYNC_PART_HEADER));
        let payload = match part {
            None => message.payload.clone(),
            Some(part) => {
                let Some((index, count)) = parse_part(part.as_str()) else {
                    shared.counters.messages_rejected.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                match assemblies.add(&doc, &from, index, count, &message.payload) {
                    Assembled::Complete(payload) => payload,
                    Assembled::Waiting => continue,
                    Assembled::Refused => {
                        shared.counters.messages_rejected.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
            }
        };
        if kind == ARCHIVE_KIND {
            receive_archive(&shared, doc, from, payload).await;
            continue;
        }
        // Off the runtime's workers: it waits for the replica lock and may apply a genesis.
        let receiving = (shared.clone(), doc.clone(), from.clone());
        let (reply, ask_archive) = tokio::task::spawn_blocking(move || {
            let (shared, doc, from) = receiving;
            let mut replica = lock(&shared);
            let entered = replica.epochs_entered();
            let reply = match replica.receive_sync_message(&doc, &from, &payload) {
                Ok(_) => {
                    shared.counters.sync_received.fetch_add(1, Ordering::Relaxed);
                    replica.sync_message(&doc, &from)
                }
                Err(_) => {
                    shared.counters.messages_rejected.fetch_add(1, Ordering::Relaxed);
                    None
                }
            };
            after_remote(&shared, &mut replica, entered);
            // A counter first heard of at a later epoch: ask for the archive now rather
            // than at the next round.
            let ask = replica.archives_wanted().contains(&doc)
                && shared.archive_asked.lock().is_ok_and(|mut asked| asked.insert(doc.clone()));
            (reply, ask.then(|| peers_of(&shared, &replica)))
        })
        .await
        .unwrap_or_default();
        if let Some(reply) = reply {
            send_sync(&shared, &client, &doc, &from, reply).await;
        }
        for peer in ask_archive.iter().flatten() {
            request_archive(&shared, &client, &doc, peer).await;
        }
    }
}

async fn send_sync<L: OpLog>(
    shared: &Shared<L>,
    client: &async_nats::Client,
    doc: &DocId,
    to: &str,
    message: Vec<u8>,
) {
    let subject = peer_subject(doc, SYNC_KIND, &shared.node_id, to);
    if send_parts(client, subject, message).await {
        shared.counters.sync_sent.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs `f` on the replica under its lock, on a blocking thread (it waits for the lock);
/// `None` if that thread panicked.
async fn with_replica<L: OpLog + Send + 'static, T: Send + 'static>(
    shared: &Arc<Shared<L>>,
    f: impl FnOnce(&mut Replica<L>) -> T + Send + 'static,
) -> Option<T> {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || f(&mut lock(&shared))).await.ok()
}

/// A peer's heads: if this replica lacks any of them, it asks that peer to open a full
/// exchange about `doc` (the peer holds the document and the epochs this one may not).
async fn check_heads<L: OpLog + Send + 'static>(
    shared: &Arc<Shared<L>>,
    client: &async_nats::Client,
    doc: DocId,
    from: String,
    heads: Bytes,
) {
    let (checked, peer) = (doc.clone(), from.clone());
    let lacks = with_replica(shared, move |replica| {
        let lacks = replica.lacks_heads(&checked, &heads);
        if let Ok(true) = lacks {
            // A new exchange: this side's per-round limits start afresh too.
            replica.reset_peer(&peer);
        }
        lacks
    })
    .await;
    match lacks {
        Some(Ok(false)) => {}
        Some(Ok(true)) => {
            shared.counters.heads_lacking.fetch_add(1, Ordering::Relaxed);
            let subject = peer_subject(&doc, SYNC_WANT_KIND, &shared.node_id, &from);
            let _ = client.publish(subject, Bytes::new()).await;
        }
        _ => {
            shared.counters.messages_rejected.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A peer lacks something of `doc`: a full exchange with it, opened here.
async fn open_exchange<L: OpLog + Send + 'static>(
    shared: &Arc<Shared<L>>,
    client: &async_nats::Client,
    doc: DocId,
    to: String,
) {
    let (opened, peer) = (doc.clone(), to.clone());
    let messages = with_replica(shared, move |replica| {
        replica.reset_peer(&peer);
        opening_for(replica, &opened, &peer)
    })
    .await
    .unwrap_or_default();
    for message in messages {
        send_sync(shared, client, &doc, &to, message).await;
    }
}

async fn request_archive<L: OpLog>(
    shared: &Shared<L>,
    client: &async_nats::Client,
    doc: &DocId,
    to: &str,
) {
    let subject = peer_subject(doc, ARCHIVE_WANT_KIND, &shared.node_id, to);
    if client.publish(subject, Bytes::new()).await.is_ok() {
        shared.counters.archive_requests_sent.fetch_add(1, Ordering::Relaxed);
    }
}

async fn answer_archive_request<L: OpLog + Send + 'static>(
    shared: &Arc<Shared<L>>,
    client: &async_nats::Client,
    doc: DocId,
    to: String,
) {
    let subject = peer_subject(&doc, ARCHIVE_KIND, &shared.node_id, &to);
    let mut from_blob = Some(0);
    while let Some(start) = from_blob {
        // One chunk copied under the lock at a time (an hour's archive at 1,000 random
        // op_ids a second is tens of MB).
        let read = doc.clone();
        let chunk = with_replica(shared, move |replica| {
            replica.archive_reply(&read, start, ARCHIVE_CHUNK_BYTES_MAX)
        })
        .await
        .flatten();
        let Some((bytes, next)) = chunk else {
            return;
        };
        if !send_parts(client, subject.clone(), bytes).await {
            return;
        }
        from_blob = next;
    }
    shared.counters.archive_replies_sent.fetch_add(1, Ordering::Relaxed);
}

async fn receive_archive<L: OpLog + Send + 'static>(
    shared: &Arc<Shared<L>>,
    doc: DocId,
    from: String,
    payload: Bytes,
) {
    let receiving = shared.clone();
    let merged = tokio::task::spawn_blocking(move || {
        // Inflated and checked before the lock: tens of ms for a chunk of random op_ids.
        let chunk = ArchiveChunk::decode(&doc, &payload)?;
        Ok::<_, Error>(lock(&receiving).receive_archive(&doc, &from, chunk))
    })
    .await;
    let counter = match merged {
        Ok(Ok(_)) => &shared.counters.archive_chunks_received,
        _ => &shared.counters.messages_rejected,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Publishes `message` on `subject`, in parts of at most [`SYNC_PART_BYTES_MAX`] when it
/// is larger; whether every part was handed to NATS.
async fn send_parts(client: &async_nats::Client, subject: String, message: Vec<u8>) -> bool {
    if message.len() <= SYNC_PART_BYTES_MAX {
        return client.publish(subject, Bytes::from(message)).await.is_ok();
    }
    // Too large for one NATS message: in parts, in order (core NATS keeps the order of one
    // publisher's messages on one subject); a lost part drops the whole message, which the
    // next round sends again.
    let message = Bytes::from(message);
    let count = message.len().div_ceil(SYNC_PART_BYTES_MAX);
    for (index, start) in (0..message.len()).step_by(SYNC_PART_BYTES_MAX).enumerate() {
        let end = (start + SYNC_PART_BYTES_MAX).min(message.len());
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(SYNC_PART_HEADER, format!("{index}/{count}").as_str());
        let part = message.slice(start..end);
        if client.publish_with_headers(subject.clone(), headers, part).await.is_err() {
            return false;
        }
    }
    true
}

/// `(index, count)` of a [`SYNC_PART_HEADER`] value.
fn parse_part(value: &str) -> Option<(usize, usize)> {
    let (index, count) = value.split_once('/')?;
    let (index, count) = (index.parse().ok()?, count.parse().ok()?);
    (index < count).then_some((index, count))
}

/// Sync messages arriving in parts, per (document, sender), at most
/// [`SYNC_ASSEMBLIES_MAX`] of them and [`SYNC_MESSAGE_BYTES_MAX`] bytes in all.
#[derive(Default)]
struct Assemblies {
    /// Oldest first.
    partial: VecDeque<Assembly>,
}

struct Assembly {
    doc: DocId,
    from: String,
    count: usize,
    next: usize,
    bytes: Vec<u8>,
}

enum Assembled {
    Complete(Bytes),
    Waiting,
    /// Out of order, without its first part, or too large: dropped.
    Refused,
}

impl Assemblies {
    fn add(
        &mut self,
        doc: &DocId,
        from: &str,
        index: usize,
        count: usize,
        part: &[u8],
    ) -> Assembled {
        let found = self.partial.iter().position(|a| a.doc == *doc && a.from == from);
        let mut assembly = match (index, found) {
            // A new message from this sender replaces whatever was unfinished.
            (0, found) => {
                if let Some(at) = found {
                    self.partial.remove(at);
                }
                Assembly {
                    doc: doc.clone(),
                    from: from.to_owned(),
                    count,
                    next: 0,
                    bytes: Vec::new(),
                }
            }
            (_, Some(at)) => self.partial.remove(at).expect("found"),
            (_, None) => return Assembled::Refused,
        };
        if assembly.count != count || assembly.next != index {
            return Assembled::Refused;
        }
        assembly.bytes.extend_from_slice(part);
        assembly.next += 1;
        if assembly.bytes.len() > SYNC_MESSAGE_BYTES_MAX {
            return Assembled::Refused;
        }
        if assembly.next == assembly.count {
            return Assembled::Complete(Bytes::from(assembly.bytes));
        }
        // Make room: the oldest unfinished messages go first.
        let mut held: usize = self.partial.iter().map(|a| a.bytes.len()).sum();
        while self.partial.len() >= SYNC_ASSEMBLIES_MAX
            || held + assembly.bytes.len() > SYNC_MESSAGE_BYTES_MAX
        {
            match self.partial.pop_front() {
                Some(dropped) => held -= dropped.bytes.len(),
                None => break,
            }
        }
        self.partial.push_back(assembly);
        Assembled::Waiting
    }
}

async fn periodic<L: OpLog + Send + 'static>(
    shared: Arc<Shared<L>>,
    client: async_nats::Client,
    config: SyncConfig,
) {
    let mut ticks = tokio::time::interval(Duration::from_millis(config.tick_interval_ms.max(1)));
    let mut rounds =
        tokio::time::interval(Duration::from_millis(config.anti_entropy_interval_ms.max(1)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    enum Round {
        Tick,
        Heads,
        Full,
    }
    loop {
        let round = tokio::select! {
            _ = ticks.tick() => Round::Tick,
            _ = rounds.tick() => Round::Heads,
            () = shared.round.notified() => Round::Full,
        };
        match round {
            Round::Full => {
                let opening = shared.clone();
                let (messages, wanted) =
                    tokio::task::spawn_blocking(move || opening_messages(&opening))
                        .await
                        .unwrap_or_default();
                for (doc, peer, message) in messages {
                    send_sync(&shared, &client, &doc, &peer, message).await;
                }
                for (doc, peer) in wanted {
                    request_archive(&shared, &client, &doc, &peer).await;
                }
            }
            Round::Heads => {
                let reading = shared.clone();
                let (heads, wanted) = tokio::task::spawn_blocking(move || heads_round(&reading))
                    .await
                    .unwrap_or_default();
                for (doc, peer, bytes) in heads {
                    let subject = peer_subject(&doc, HEADS_KIND, &shared.node_id, &peer);
                    if client.publish(subject, Bytes::from(bytes)).await.is_ok() {
                        shared.counters.heads_sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                for (doc, peer) in wanted {
                    request_archive(&shared, &client, &doc, &peer).await;
                }
            }
            Round::Tick => {
                // Off the runtime's workers: a tick holds the replica lock for milliseconds.
                let ticking = shared.clone();
                let _ = tokio::task::spawn_blocking(move || tick(&ticking)).await;
            }
        }
    }
}

/// A heads round: each document's heads of the previous round to every peer
/// (`(doc, peer, heads)`), today's kept for the next; and the archive requests due.
fn heads_round<L: OpLog>(shared: &Shared<L>) -> Opening {
    let replica = lock(shared);
    let peers = peers_of(shared, &replica);
    let mut messages = Vec::new();
    if let Ok(mut last_heads) = shared.last_heads.lock() {
        for doc in replica.docs() {
            let Some(heads) = replica.heads(&doc) else { continue };
            if let Some(previous) = last_heads.insert(doc.clone(), heads) {
                for peer in &peers {
                    messages.push((doc.clone(), peer.clone(), previous.clone()));
                }
            }
        }
    }
    (messages, archive_requests(shared, &replica, &peers))
}

fn peers_of<L: OpLog>(shared: &Shared<L>, replica: &Replica<L>) -> Vec<String> {
    replica.members().iter().filter(|member| **member != shared.node_id).cloned().collect()
}

/// `(counter, peer)` for every counter whose archive this replica wants; marks them asked.
fn archive_requests<L: OpLog>(
    shared: &Shared<L>,
    replica: &Replica<L>,
    peers: &[String],
) -> Vec<(DocId, String)> {
    let wanted = replica.archives_wanted();
    if let Ok(mut asked) = shared.archive_asked.lock() {
        asked.clear();
        asked.extend(wanted.iter().cloned());
    }
    wanted
        .into_iter()
        .flat_map(|doc| peers.iter().map(move |peer| (doc.clone(), peer.clone())))
        .collect()
}

/// The opening of a full exchange about `doc` with `peer`: one message per epoch document
/// (a counter changing epochs holds up to three).
fn opening_for<L: OpLog>(replica: &mut Replica<L>, doc: &DocId, peer: &str) -> Vec<Vec<u8>> {
    (0..3).map_while(|_| replica.sync_message(doc, peer)).collect()
}

/// Messages `(doc, peer, bytes)` and archive requests `(doc, peer)` of a round.
type Opening = (Vec<(DocId, String, Vec<u8>)>, Vec<(DocId, String)>);

/// An anti-entropy round's opening: the first sync message of every document to every
/// peer, their sync states reset; and the archive requests, `(counter, peer)`, of the
/// counters whose archive this replica still wants.
fn opening_messages<L: OpLog>(shared: &Shared<L>) -> Opening {
    let mut replica = lock(shared);
    let peers = peers_of(shared, &replica);
    let mut messages = Vec::new();
    for peer in &peers {
        replica.reset_peer(peer);
        for doc in replica.docs() {
            for message in opening_for(&mut replica, &doc, peer) {
                messages.push((doc.clone(), peer.clone(), message));
            }
        }
    }
    let requests = archive_requests(shared, &replica, &peers);
    (messages, requests)
}

/// One tick: maintenance in bounded steps, each under the lock, its records appended
/// without waiting and its changes queued held (peers' changes and local writes get the
/// lock in between); they are published once the log is durable past them.
fn tick<L: OpLog>(shared: &Shared<L>) {
    let now_us = now_us();
    let now = now_us / 1_000;
    let mut last_held = None;
    let mut entered = false;
    for _ in 0..TICK_STEPS_MAX {
        let more = {
            let mut replica = lock(shared);
            let before = replica.epochs_entered();
            let step = replica.tick_step(now, TICK_FOLDS_PER_STEP);
            entered |= replica.epochs_entered() != before;
            let Ok(step) = step else {
                break;
            };
            // The last step syncs under its own lock hold (no wait for the lock again, and
            // the publisher is not held up behind it); earlier steps wait for it.
            let durable = if step.more || step.changes.is_empty() {
                Durable::Later
            } else if replica.sync_log().is_ok() {
                Durable::Now
            } else {
                Durable::Later
            };
            for (doc, changes) in step.changes {
                last_held = Some(queue(shared, doc, changes, now_us, durable));
            }
            step.more
        };
        if !more {
            break;
        }
        hand_off(shared);
    }
    // Under load a later group commit has already made them durable; else one sync.
    if let Some(seq) = last_held
        && *shared.durable_seq.borrow() < seq
    {
        let mut replica = lock(shared);
        if *shared.durable_seq.borrow() < seq && replica.sync_log().is_ok() {
            mark_durable(&shared.durable_seq, seq);
        }
    }
    if entered {
        // The genesis may be too large for one message; sync sends it in parts.
        shared.round.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_round_trip() {
        let doc = DocId::counter("production").unwrap();
        let changes = changes_subject(&doc, "node-a");
        assert_eq!(changes, "edge.crdt.counter:production.changes.node-a");
        let (parsed, kind, nodes) = parse_subject(&changes).unwrap();
        assert_eq!((parsed, kind, nodes), (doc.clone(), "changes", vec!["node-a"]));
        let sync = peer_subject(&doc, SYNC_KIND, "a", "b");
        let (parsed, kind, nodes) = parse_subject(&sync).unwrap();
        assert_eq!((parsed, kind, nodes), (doc, "sync", vec!["a", "b"]));
        assert!(parse_subject("edge.crdt.gauge:x.changes.a").is_none());
        assert!(parse_subject("edge.other.counter:x.changes.a").is_none());
        assert!(parse_subject("edge.crdt").is_none());
    }

    #[test]
    fn sync_parts_reassemble_in_order_and_refuse_gaps() {
        let doc = DocId::counter("production").unwrap();
        let mut assemblies = Assemblies::default();
        assert_eq!(parse_part("0/3"), Some((0, 3)));
        assert_eq!(parse_part("3/3"), None);
        assert_eq!(parse_part("x/3"), None);
        assert!(matches!(assemblies.add(&doc, "a", 0, 3, b"ab"), Assembled::Waiting));
        // Another sender's parts interleave without mixing.
        assert!(matches!(assemblies.add(&doc, "b", 0, 2, b"xy"), Assembled::Waiting));
        assert!(matches!(assemblies.add(&doc, "a", 1, 3, b"cd"), Assembled::Waiting));
        match assemblies.add(&doc, "a", 2, 3, b"e") {
            Assembled::Complete(bytes) => assert_eq!(&bytes[..], b"abcde"),
            _ => panic!("a's message is complete"),
        }
        // A gap (part 0 of b, then part 2 of 2) drops b's message.
        assert!(matches!(assemblies.add(&doc, "b", 2, 3, b"z"), Assembled::Refused));
        assert!(matches!(assemblies.add(&doc, "b", 1, 2, b"z"), Assembled::Refused));
        // A part without its start is refused.
        assert!(matches!(assemblies.add(&doc, "c", 1, 2, b"z"), Assembled::Refused));
        assert!(assemblies.partial.is_empty());
        // Unfinished messages are bounded in number: the oldest go.
        for i in 0..SYNC_ASSEMBLIES_MAX + 3 {
            let from = format!("n{i}");
            assert!(matches!(assemblies.add(&doc, &from, 0, 2, b"z"), Assembled::Waiting));
        }
        assert_eq!(assemblies.partial.len(), SYNC_ASSEMBLIES_MAX);
        assert!(matches!(assemblies.add(&doc, "n0", 1, 2, b"z"), Assembled::Refused));
    }

    #[test]
    fn stream_subjects_cover_change_subjects_only() {
        let doc = DocId::set("flags").unwrap();
        let matches = |subject: &str| {
            let pattern: Vec<&str> = STREAM_SUBJECTS.split('.').collect();
            let tokens: Vec<&str> = subject.split('.').collect();
            pattern.len() == tokens.len()
                && pattern.iter().zip(&tokens).all(|(p, t)| *p == "*" || p == t)
        };
        assert!(matches(&changes_subject(&doc, "a")));
        assert!(!matches(&peer_subject(&doc, SYNC_KIND, "a", "b")));
        assert!(!matches(&peer_subject(&doc, ARCHIVE_KIND, "a", "b")));
        assert!(!matches(&peer_subject(&doc, ARCHIVE_WANT_KIND, "a", "b")));
    }
}
