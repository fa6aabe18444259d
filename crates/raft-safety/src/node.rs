//! The core: [`Node`] wraps raft-rs's `RawNode` with the ready loop, proposal and read tracking,
//! snapshots and compaction. No I/O besides its [`LogStore`], no clock: callers feed it ticks,
//! messages and requests, and send the messages it hands back.

use std::collections::BTreeMap;

use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeV2, ConfState, Entry, EntryType, Message, MessageType, Snapshot,
};
use raft::{RawNode, ReadOnlyOption, SnapshotStatus, StateRole};
use thiserror::Error;

use crate::config::{ConfigError, NodeConfig};
use crate::state_machine::{StateMachine, StateMachineError};
use crate::storage::{LogStore, StoreError, WriteBatch};

/// Bytes of uncommitted entries a leader accepts before it drops new proposals (they are
/// retried until their deadline).
pub const UNCOMMITTED_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// Index of the snapshot an initial member bootstraps with (the log starts after it).
pub const BOOTSTRAP_INDEX: u64 = 1;
/// Term of the bootstrap snapshot.
pub const BOOTSTRAP_TERM: u64 = 1;

/// Bytes of a proposal or read context: node id, boot counter, sequence number (big endian).
const CONTEXT_BYTES: usize = 24;

/// Identifies a proposal or a read made on one node; completion arrives as an [`Event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// A command applied by the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Log index of the entry.
    pub index: u64,
    /// Term of the entry.
    pub term: u64,
    /// The state machine's response (for a membership change: the new `ConfState`, protobuf).
    pub response: Vec<u8>,
}

/// Something the caller must act on, drained with [`Node::drain_events`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A proposal finished.
    Proposal {
        /// Which.
        id: RequestId,
        /// Applied, or why not (an error other than `TooLarge`/`Busy` leaves the outcome
        /// unknown: the command may still be applied later).
        result: Result<Applied, ProposeError>,
    },
    /// A linearizable read finished.
    Read {
        /// Which.
        id: RequestId,
        /// The state machine's answer.
        result: Result<Vec<u8>, ReadError>,
    },
    /// An entry was applied (only with [`Node::observe_applied`] on; used by the simulation).
    EntryApplied {
        /// Log index.
        index: u64,
        /// Term.
        term: u64,
        /// Entry type (as raft's `EntryType` number).
        entry_type: i32,
        /// Entry payload.
        data: Vec<u8>,
    },
    /// The state machine was replaced by a snapshot from the leader (with `observe_applied`).
    SnapshotRestored {
        /// Index of the snapshot.
        index: u64,
    },
}

/// Why a proposal failed.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProposeError {
    /// No leader was known (no quorum reachable) until the deadline; nothing was proposed.
    #[error("no leader reachable before the deadline")]
    NoQuorum,
    /// The proposal reached a leader but was not applied before the deadline (outcome unknown).
    #[error("proposal not applied before the deadline")]
    Timeout,
    /// The leader (or term) changed after the proposal was handed to it (outcome unknown).
    #[error("leadership changed while the proposal was in flight")]
    LeadershipLost,
    /// The command is larger than `command_bytes_max`.
    #[error("command of {bytes} bytes exceeds {max} bytes")]
    TooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// Too many requests are waiting in this node.
    #[error("too many pending requests (max {0})")]
    Busy(usize),
    /// raft-rs refused the proposal or the membership change.
    #[error("rejected by raft: {0}")]
    Rejected(String),
    /// The node stopped (driver shut down or failed).
    #[error("raft node stopped")]
    Stopped,
}

/// Why a linearizable read failed.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReadError {
    /// No leader confirmed a read index before the deadline.
    #[error("no leader confirmed the read before the deadline")]
    NoQuorum,
    /// A read index was confirmed but not applied locally before the deadline.
    #[error("read not served before the deadline")]
    Timeout,
    /// Too many requests are waiting in this node.
    #[error("too many pending requests (max {0})")]
    Busy(usize),
    /// The node stopped.
    #[error("raft node stopped")]
    Stopped,
}

/// Why the node failed; after an error from [`Node::handle_ready`] the node must be dropped.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The configuration is invalid.
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    /// The log store failed.
    #[error("log store failed")]
    Store(#[from] StoreError),
    /// raft-rs reported an error.
    #[error("raft failed")]
    Raft(#[from] raft::Error),
    /// The state machine could not restore a snapshot.
    #[error("state machine failed")]
    StateMachine(#[from] StateMachineError),
    /// A committed entry does not decode.
    #[error("committed entry {index} is corrupt: {reason}")]
    CorruptEntry {
        /// Its index.
        index: u64,
        /// What is wrong.
        reason: String,
    },
}

/// This node's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Follows a leader (or waits for one).
    Follower,
    /// Pre-vote phase of an election.
    PreCandidate,
    /// Campaigning.
    Candidate,
    /// Leads the group.
    Leader,
}

/// A snapshot of the node's view, for `GET /cluster`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Status {
    /// This node's id.
    pub id: u64,
    /// The leader this node knows of.
    pub leader: Option<u64>,
    /// Current term.
    pub term: u64,
    /// Commit index.
    pub commit: u64,
    /// Applied index.
    pub applied: u64,
    /// Role.
    pub role: Role,
    /// Voters (incoming configuration when joint).
    pub voters: Vec<u64>,
    /// Voters of the outgoing configuration while a joint change is in progress.
    pub voters_outgoing: Vec<u64>,
    /// Learners.
    pub learners: Vec<u64>,
}

impl Status {
    /// Every member (voters of both configurations and learners), sorted.
    pub fn members(&self) -> Vec<u64> {
        let mut all: Vec<u64> = self
            .voters
            .iter()
            .chain(&self.voters_outgoing)
            .chain(&self.learners)
            .copied()
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

enum Payload {
    Command(Vec<u8>),
    ConfChange(ConfChangeV2),
}

struct PendingProposal {
    /// Set until raft accepted the proposal (a leader was known).
    payload: Option<Payload>,
    /// (term, leader) when raft accepted it.
    submitted: Option<(u64, u64)>,
    deadline_tick: u64,
}

struct PendingRead {
    query: Vec<u8>,
    deadline_tick: u64,
    requested_tick: Option<u64>,
    read_index: Option<u64>,
}

/// A Raft member replicating a [`StateMachine`] over a [`LogStore`].
///
/// Drive it with [`Node::tick`] (every `tick_ms`), [`Node::step`] (every message received),
/// [`Node::propose`] / [`Node::read`]; after any of them call [`Node::handle_ready`], which makes
/// new state durable and passes the messages to send to its callback, then
/// [`Node::drain_events`] for completed requests. A driver whose write blocks the thread its
/// sockets are served on calls the two halves, [`Node::begin_ready`] and
/// [`Node::finish_ready`], and lets the messages of the first leave in between.
pub struct Node<S: LogStore, M: StateMachine> {
    raw: RawNode<S>,
    sm: M,
    config: NodeConfig,
    boot: u64,
    next_seq: u64,
    ticks: u64,
    conf_state: ConfState,
    applied_index: u64,
    applied_term: u64,
    snapshot_index: u64,
    proposals: BTreeMap<u64, PendingProposal>,
    reads: BTreeMap<u64, PendingRead>,
    events: Vec<Event>,
    observe_applied: bool,
    /// A membership change added a member: snapshot at the next opportunity.
    snapshot_due: bool,
    /// The ready round begun by [`Node::begin_ready`] and not finished yet.
    ready: Option<raft::Ready>,
    /// Peers sent a snapshot in the current ready round.
    snapshot_targets: Vec<u64>,
    /// Deterministic source of election timeouts (see [`Node::set_election_seed`]).
    election_rng: u64,
    /// (term, role, leader) and timeout when the election timeout was last drawn.
    election_key: (u64, StateRole, u64),
    election_timeout_ticks: usize,
}

impl<S: LogStore, M: StateMachine> std::fmt::Debug for Node<S, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("status", &self.status()).finish()
    }
}

impl<S: LogStore, M: StateMachine> Node<S, M> {
    /// Opens a member on `store`: bootstraps an empty store with `config.peers` (a first
    /// snapshot at [`BOOTSTRAP_INDEX`]; a store that holds state keeps its own membership and
    /// `peers` is ignored), restores the state machine from the store's snapshot, and lets raft
    /// replay the committed log after it. With empty `peers` and an empty store the node waits
    /// to be added by a membership change and receives a snapshot from the leader.
    pub fn new(config: NodeConfig, mut store: S, mut sm: M) -> Result<Self, NodeError> {
        config.validate()?;
        let initial = store.initial_state()?;
        if !initial.initialized() && store.last_index()? == 0 && !config.peers.is_empty() {
            // Every initial member writes the same first snapshot: the empty state machine at
            // index 1, term 1, with the initial voters.
            let mut first = Snapshot { data: sm.snapshot(), ..Snapshot::default() };
            let meta = first.mut_metadata();
            meta.index = BOOTSTRAP_INDEX;
            meta.term = BOOTSTRAP_TERM;
            meta.set_conf_state(ConfState::from((config.peers.clone(), Vec::new())));
            store.bootstrap(first)?;
        }
        let boot = store.next_boot()?;
        let snapshot = store.snapshot(0, config.id)?;
        let meta = snapshot.get_metadata();
        if meta.index > 0 {
            sm.restore(&snapshot.data)?;
        }
        let conf_state = store.initial_state()?.conf_state;
        let raft_config = raft::Config {
            id: config.id,
            election_tick: config.election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            applied: meta.index,
            max_size_per_msg: config.message_entries_bytes_max,
            max_inflight_msgs: config.inflight_messages_max,
            check_quorum: true,
            pre_vote: true,
            read_only_option: ReadOnlyOption::Safe,
            max_uncommitted_size: UNCOMMITTED_BYTES_MAX,
            ..raft::Config::default()
        };
        let logger = crate::logging::raft_logger(config.id);
        let (applied_index, applied_term) = (meta.index, meta.term);
        let raw = RawNode::new(&raft_config, store, &logger)?;
        let mut node = Self {
            raw,
            sm,
            config,
            boot,
            next_seq: 1,
            ticks: 0,
            conf_state,
            applied_index,
            applied_term,
            snapshot_index: applied_index,
            proposals: BTreeMap::new(),
            reads: BTreeMap::new(),
            events: Vec::new(),
            observe_applied: false,
            snapshot_due: false,
            ready: None,
            snapshot_targets: Vec::new(),
            election_rng: 0,
            election_key: (0, StateRole::Follower, 0),
            election_timeout_ticks: 0,
        };
        node.set_election_seed(node.config.id ^ (node.boot << 32));
        Ok(node)
    }

    /// Seeds the draw of randomised election timeouts (in `[election_ticks, 2 *
    /// election_ticks)`). raft-rs draws them from a thread-local RNG; the node replaces every
    /// draw with one from this seed so that a simulation replays exactly. The driver seeds it
    /// from the clock.
    pub fn set_election_seed(&mut self, seed: u64) {
        self.election_rng = seed;
        self.election_timeout_ticks = 0;
        self.pin_election_timeout();
    }

    fn pin_election_timeout(&mut self) {
        let raft = &self.raw.raft;
        let key = (raft.term, raft.state, raft.leader_id);
        if key == self.election_key
            && raft.randomized_election_timeout() == self.election_timeout_ticks
        {
            return;
        }
        let base = self.config.election_ticks;
        let timeout = base + (splitmix64(&mut self.election_rng) % base as u64) as usize;
        self.raw.raft.set_randomized_election_timeout(timeout);
        self.election_key = key;
        self.election_timeout_ticks = timeout;
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.config.id
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// Emits [`Event::EntryApplied`] and [`Event::SnapshotRestored`] from now on.
    pub fn observe_applied(&mut self, on: bool) {
        self.observe_applied = on;
    }

    /// Advances the logical clock by one tick: elections, heartbeats, retries and deadlines.
    pub fn tick(&mut self) {
        self.ticks += 1;
        self.raw.tick();
        self.pin_election_timeout();
        self.retry_and_expire();
    }

    /// Ticks counted since this node started.
    pub fn ticks(&self) -> u64 {
        self.ticks
    }

    /// Feeds a message from a peer. Messages that do not fit (unknown peer, stale) are ignored
    /// by raft and reported as an error that callers may log and otherwise ignore.
    pub fn step(&mut self, message: Message) -> Result<(), raft::Error> {
        if raft::raw_node::is_local_msg(message.get_msg_type()) {
            return Err(raft::Error::StepLocalMsg);
        }
        let result = self.raw.step(message);
        self.pin_election_timeout();
        result
    }

    /// Proposes a command; it is forwarded to the leader when this node follows. The outcome
    /// arrives as [`Event::Proposal`].
    pub fn propose(&mut self, command: Vec<u8>) -> Result<RequestId, ProposeError> {
        if command.len() > self.config.command_bytes_max {
            return Err(ProposeError::TooLarge {
                bytes: command.len(),
                max: self.config.command_bytes_max,
            });
        }
        self.add_proposal(Payload::Command(command))
    }

    /// Proposes a membership change (joint consensus when it changes more than one voter; raft
    /// leaves the joint configuration automatically with `ConfChangeTransition::Auto`). The
    /// outcome arrives as [`Event::Proposal`], whose response is the new `ConfState`.
    pub fn propose_conf_change(&mut self, change: ConfChangeV2) -> Result<RequestId, ProposeError> {
        self.add_proposal(Payload::ConfChange(change))
    }

    /// Withdraws a proposal nobody waits for any more, if it has not reached a leader yet;
    /// returns whether it was withdrawn. One that was handed to a leader stays (its entry may
    /// still commit) and completes as usual. The driver withdraws a proposal whose caller gave
    /// up, so that an answer of "no quorum" is never followed by a late commit.
    pub fn abandon(&mut self, id: RequestId) -> bool {
        let unsubmitted = self.proposals.get(&id.0).is_some_and(|p| p.payload.is_some());
        if unsubmitted {
            self.proposals.remove(&id.0);
        }
        unsubmitted
    }

    fn pending(&self) -> usize {
        self.proposals.len() + self.reads.len()
    }

    fn add_proposal(&mut self, payload: Payload) -> Result<RequestId, ProposeError> {
        if self.pending() >= self.config.pending_requests_max {
            return Err(ProposeError::Busy(self.config.pending_requests_max));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.proposals.insert(
            seq,
            PendingProposal {
                payload: Some(payload),
                submitted: None,
                deadline_tick: self.ticks + self.config.proposal_timeout_ticks,
            },
        );
        self.try_submit(seq);
        Ok(RequestId(seq))
    }

    /// Starts a linearizable read (ReadIndex): the query runs on the state machine once the
    /// leader confirmed its commit index with a quorum and this node applied up to it. The
    /// answer arrives as [`Event::Read`].
    pub fn read(&mut self, query: Vec<u8>) -> Result<RequestId, ReadError> {
        if self.pending() >= self.config.pending_requests_max {
            return Err(ReadError::Busy(self.config.pending_requests_max));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.reads.insert(
            seq,
            PendingRead {
                query,
                deadline_tick: self.ticks + self.config.read_timeout_ticks,
                requested_tick: None,
                read_index: None,
            },
        );
        self.try_request_read(seq);
        Ok(RequestId(seq))
    }

    /// Answers a query from local state, without asking the leader (may be stale).
    pub fn query_local(&self, query: &[u8]) -> Vec<u8> {
        self.sm.query(query)
    }

    /// The replicated state machine (as applied on this node).
    pub fn state_machine(&self) -> &M {
        &self.sm
    }

    /// Asks raft to hand leadership to `transferee` (a voter that is up to date).
    pub fn transfer_leader(&mut self, transferee: u64) {
        self.raw.transfer_leader(transferee);
        self.pin_election_timeout();
    }

    /// Starts an election now.
    pub fn campaign(&mut self) -> Result<(), raft::Error> {
        let result = self.raw.campaign();
        self.pin_election_timeout();
        result
    }

    /// The underlying raft-rs node (read-only).
    pub fn raw(&self) -> &RawNode<S> {
        &self.raw
    }

    /// The node's current view.
    pub fn status(&self) -> Status {
        let raft = &self.raw.raft;
        let role = match raft.state {
            StateRole::Follower => Role::Follower,
            StateRole::PreCandidate => Role::PreCandidate,
            StateRole::Candidate => Role::Candidate,
            StateRole::Leader => Role::Leader,
        };
        Status {
            id: self.config.id,
            leader: (raft.leader_id != raft::INVALID_ID).then_some(raft.leader_id),
            term: raft.term,
            commit: raft.raft_log.committed,
            applied: self.applied_index,
            role,
            voters: self.conf_state.voters.clone(),
            voters_outgoing: self.conf_state.voters_outgoing.clone(),
            learners: self.conf_state.learners.clone(),
        }
    }

    /// Whether this node leads.
    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    /// Index of the latest local snapshot (the log is compacted up to it).
    pub fn snapshot_index(&self) -> u64 {
        self.snapshot_index
    }

    /// Takes the events produced since the last call.
    pub fn drain_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Runs one round of the ready loop: sends what may go before the disk write, makes the
    /// round durable (one store write), restores a received snapshot, applies committed
    /// entries, sends what depended on the write, advances raft; then compacts, serves reads and
    /// fails proposals whose leader went away. `send` must not block (queue or drop).
    ///
    /// The same as [`Node::begin_ready`] followed by [`Node::finish_ready`].
    pub fn handle_ready(&mut self, send: &mut impl FnMut(Message)) -> Result<(), NodeError> {
        self.begin_ready(send);
        self.finish_ready(send)
    }

    /// The first half of a ready round: takes raft's ready state and sends the messages that
    /// may leave before the round's write (a leader's appends: raft-rs counts the leader's own
    /// acknowledgement only once the write is done). Returns whether it sent any and a disk
    /// write follows, so that a driver can let them leave (e.g. yield to the tasks that write
    /// them to the sockets) before it blocks on the write: the followers then persist in
    /// parallel with the leader. Call [`Node::finish_ready`] next, before anything else
    /// touches the node; a second `begin_ready` before it does nothing.
    pub fn begin_ready(&mut self, send: &mut impl FnMut(Message)) -> bool {
        if self.ready.is_some() || !self.raw.has_ready() {
            return false;
        }
        let mut ready = self.raw.ready();
        let messages = ready.take_messages();
        let sent = !messages.is_empty();
        for message in messages {
            self.out(message, send);
        }
        let writes = !ready.entries().is_empty() || !ready.snapshot().is_empty();
        self.ready = Some(ready);
        sent && writes
    }

    /// The second half of a ready round (see [`Node::handle_ready`]); with no round begun it
    /// begins one first.
    pub fn finish_ready(&mut self, send: &mut impl FnMut(Message)) -> Result<(), NodeError> {
        if self.ready.is_none() {
            self.begin_ready(send);
        }
        if let Some(mut ready) = self.ready.take() {
            let snapshot = (!ready.snapshot().is_empty()).then(|| ready.snapshot().clone());
            self.raw.mut_store().write(WriteBatch {
                snapshot: snapshot.as_ref(),
                entries: ready.entries(),
                hard_state: ready.hs(),
            })?;
            if let Some(snapshot) = snapshot {
                self.restore_snapshot(&snapshot)?;
            }
            self.apply_entries(ready.take_committed_entries())?;
            for state in ready.take_read_states() {
                self.on_read_state(&state.request_ctx, state.index);
            }
            // Votes and append responses promise durable state: only now may they leave.
            for message in ready.take_persisted_messages() {
                self.out(message, send);
            }
            let mut light = self.raw.advance(ready);
            if let Some(commit) = light.commit_index() {
                self.raw.mut_store().set_commit(commit)?;
            }
            for message in light.take_messages() {
                self.out(message, send);
            }
            self.apply_entries(light.take_committed_entries())?;
            self.raw.advance_apply_to(self.applied_index);
            // Snapshots travel over a lossy network: report them sent, so that a lost one
            // leads to a probe, a rejection and a new snapshot instead of a stuck follower.
            for to in std::mem::take(&mut self.snapshot_targets) {
                self.raw.report_snapshot(to, SnapshotStatus::Finish);
            }
        }
        self.maybe_compact()?;
        self.complete_reads();
        self.fail_orphaned_proposals();
        Ok(())
    }

    fn out(&mut self, message: Message, send: &mut impl FnMut(Message)) {
        if message.get_msg_type() == MessageType::MsgSnapshot {
            self.snapshot_targets.push(message.to);
        }
        send(message);
    }

    fn context(&self, seq: u64) -> Vec<u8> {
        let mut context = Vec::with_capacity(CONTEXT_BYTES);
        context.extend_from_slice(&self.config.id.to_be_bytes());
        context.extend_from_slice(&self.boot.to_be_bytes());
        context.extend_from_slice(&seq.to_be_bytes());
        context
    }

    /// The sequence number of a context made by this boot of this node.
    fn own_seq(&self, context: &[u8]) -> Option<u64> {
        if context.len() != CONTEXT_BYTES {
            return None;
        }
        let word =
            |i: usize| u64::from_be_bytes(context[i * 8..(i + 1) * 8].try_into().expect("8 bytes"));
        (word(0) == self.config.id && word(1) == self.boot).then(|| word(2))
    }

    fn leader_known(&self) -> bool {
        self.raw.raft.leader_id != raft::INVALID_ID
    }

    fn try_submit(&mut self, seq: u64) {
        if !self.leader_known() {
            return;
        }
        let context = self.context(seq);
        let Some(proposal) = self.proposals.get_mut(&seq) else {
            return;
        };
        let result = match &proposal.payload {
            Some(Payload::Command(data)) => self.raw.propose(context, data.clone()),
            Some(Payload::ConfChange(change)) => {
                self.raw.propose_conf_change(context, change.clone())
            }
            None => return,
        };
        match result {
            Ok(()) => {
                proposal.payload = None;
                proposal.submitted = Some((self.raw.raft.term, self.raw.raft.leader_id));
            }
            // No leader after all, or a leadership transfer in progress: retry on a tick.
            Err(raft::Error::ProposalDropped) => {}
            Err(error) => {
                self.proposals.remove(&seq);
                self.events.push(Event::Proposal {
                    id: RequestId(seq),
                    result: Err(ProposeError::Rejected(error.to_string())),
                });
            }
        }
    }

    fn try_request_read(&mut self, seq: u64) {
        if !self.leader_known() {
            return;
        }
        let context = self.context(seq);
        let ticks = self.ticks;
        if let Some(read) = self.reads.get_mut(&seq) {
            read.requested_tick = Some(ticks);
            self.raw.read_index(context);
        }
    }

    fn retry_and_expire(&mut self) {
        let now = self.ticks;
        let expired: Vec<(u64, ProposeError)> = self
            .proposals
            .iter()
            .filter(|(_, p)| p.deadline_tick <= now)
            .map(|(&seq, p)| {
                let error = if p.submitted.is_some() {
                    ProposeError::Timeout
                } else {
                    ProposeError::NoQuorum
                };
                (seq, error)
            })
            .collect();
        for (seq, error) in expired {
            self.proposals.remove(&seq);
            self.events.push(Event::Proposal { id: RequestId(seq), result: Err(error) });
        }
        let waiting: Vec<u64> = self
            .proposals
            .iter()
            .filter(|(_, p)| p.payload.is_some())
            .map(|(&seq, _)| seq)
            .collect();
        for seq in waiting {
            self.try_submit(seq);
        }

        let expired: Vec<(u64, ReadError)> = self
            .reads
            .iter()
            .filter(|(_, r)| r.deadline_tick <= now)
            .map(|(&seq, r)| {
                let error =
                    if r.read_index.is_some() { ReadError::Timeout } else { ReadError::NoQuorum };
                (seq, error)
            })
            .collect();
        for (seq, error) in expired {
            self.reads.remove(&seq);
            self.events.push(Event::Read { id: RequestId(seq), result: Err(error) });
        }
        // A read index request can be lost (message dropped, leader changed, new leader not yet
        // committed in its term): ask again every election timeout.
        let retry_ticks = self.config.election_ticks as u64;
        let again: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| {
                r.read_index.is_none() && r.requested_tick.is_none_or(|at| now >= at + retry_ticks)
            })
            .map(|(&seq, _)| seq)
            .collect();
        for seq in again {
            self.try_request_read(seq);
        }
    }

    fn on_read_state(&mut self, context: &[u8], index: u64) {
        if let Some(seq) = self.own_seq(context)
            && let Some(read) = self.reads.get_mut(&seq)
            && read.read_index.is_none()
        {
            read.read_index = Some(index);
        }
    }

    fn complete_reads(&mut self) {
        let applied = self.applied_index;
        let ready: Vec<u64> = self
            .reads
            .iter()
            .filter(|(_, r)| r.read_index.is_some_and(|index| index <= applied))
            .map(|(&seq, _)| seq)
            .collect();
        for seq in ready {
            let read = self.reads.remove(&seq).expect("listed above");
            let answer = self.sm.query(&read.query);
            self.events.push(Event::Read { id: RequestId(seq), result: Ok(answer) });
        }
    }

    fn fail_orphaned_proposals(&mut self) {
        let now = (self.raw.raft.term, self.raw.raft.leader_id);
        let orphaned: Vec<u64> = self
            .proposals
            .iter()
            .filter(|(_, p)| p.submitted.is_some_and(|at| at != now))
            .map(|(&seq, _)| seq)
            .collect();
        for seq in orphaned {
            self.proposals.remove(&seq);
            self.events.push(Event::Proposal {
                id: RequestId(seq),
                result: Err(ProposeError::LeadershipLost),
            });
        }
    }

    fn restore_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), NodeError> {
        let meta = snapshot.get_metadata();
        self.sm.restore(&snapshot.data)?;
        self.applied_index = meta.index;
        self.applied_term = meta.term;
        self.snapshot_index = meta.index;
        self.conf_state = meta.get_conf_state().clone();
        if self.observe_applied {
            self.events.push(Event::SnapshotRestored { index: meta.index });
        }
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), NodeError> {
        for entry in entries {
            if entry.index <= self.applied_index {
                continue;
            }
            debug_assert_eq!(entry.index, self.applied_index + 1, "entries apply in order");
            match entry.get_entry_type() {
                EntryType::EntryNormal => {
                    // The empty entry a new leader appends carries neither data nor context.
                    if !(entry.data.is_empty() && entry.context.is_empty()) {
                        let response = self.sm.apply(entry.index, entry.term, &entry.data);
                        self.complete_proposal(&entry, Ok(response));
                    }
                }
                EntryType::EntryConfChange => {
                    let mut change = ConfChange::default();
                    change.merge_from_bytes(&entry.data).map_err(|e| corrupt(&entry, e))?;
                    let result = self.raw.apply_conf_change(&change);
                    self.on_conf_change(&entry, result);
                }
                EntryType::EntryConfChangeV2 => {
                    let mut change = ConfChangeV2::default();
                    change.merge_from_bytes(&entry.data).map_err(|e| corrupt(&entry, e))?;
                    let result = self.raw.apply_conf_change(&change);
                    self.on_conf_change(&entry, result);
                }
            }
            self.applied_index = entry.index;
            self.applied_term = entry.term;
            if self.observe_applied {
                self.events.push(Event::EntryApplied {
                    index: entry.index,
                    term: entry.term,
                    entry_type: entry.entry_type,
                    data: entry.data,
                });
            }
        }
        Ok(())
    }

    fn on_conf_change(&mut self, entry: &Entry, result: raft::Result<ConfState>) {
        match result {
            Ok(conf_state) => {
                let response = conf_state.write_to_bytes().expect("conf state always encodes");
                // raft-rs refuses a snapshot whose membership does not include the receiver, so a
                // newcomer needs a snapshot taken after it was added: take one now.
                let before = members(&self.conf_state);
                if members(&conf_state).iter().any(|id| !before.contains(id)) {
                    self.snapshot_due = true;
                }
                self.conf_state = conf_state;
                self.complete_proposal(entry, Ok(response));
            }
            // Every member rejects the same committed change the same way: not fatal.
            Err(error) => self.complete_proposal(entry, Err(error.to_string())),
        }
    }

    fn complete_proposal(&mut self, entry: &Entry, outcome: Result<Vec<u8>, String>) {
        let Some(seq) = self.own_seq(&entry.context) else {
            return;
        };
        if self.proposals.remove(&seq).is_none() {
            return;
        }
        let result = match outcome {
            Ok(response) => Ok(Applied { index: entry.index, term: entry.term, response }),
            Err(reason) => Err(ProposeError::Rejected(reason)),
        };
        self.events.push(Event::Proposal { id: RequestId(seq), result });
    }

    fn maybe_compact(&mut self) -> Result<(), NodeError> {
        let interval_reached =
            self.applied_index >= self.snapshot_index + self.config.snapshot_interval_entries;
        if !(interval_reached || self.snapshot_due) || self.applied_index <= self.snapshot_index {
            return Ok(());
        }
        self.snapshot_due = false;
        let mut snapshot = Snapshot::default();
        snapshot.data = self.sm.snapshot();
        let meta = snapshot.mut_metadata();
        meta.index = self.applied_index;
        meta.term = self.applied_term;
        meta.set_conf_state(self.conf_state.clone());
        self.raw.mut_store().compact(snapshot)?;
        self.snapshot_index = self.applied_index;
        Ok(())
    }
}

/// One step of SplitMix64 (a small, well-mixed deterministic generator).
pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Every id in a configuration (voters of both halves, learners).
fn members(conf_state: &ConfState) -> Vec<u64> {
    conf_state
        .voters
        .iter()
        .chain(&conf_state.learners)
        .chain(&conf_state.voters_outgoing)
        .chain(&conf_state.learners_next)
        .copied()
        .collect()
}

fn corrupt(entry: &Entry, error: impl std::fmt::Display) -> NodeError {
    NodeError::CorruptEntry { index: entry.index, reason: error.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estop::{EStop, EStopCommand, EStopQuery};
    use crate::storage::MemStore;
    use raft::Storage;

    fn engage(id: &str) -> Vec<u8> {
        EStopCommand::Engage {
            request_id: id.into(),
            reason: "unit".into(),
            source: "test".into(),
            who: String::new(),
            at_ms: 1,
        }
        .encode()
    }

    fn single(store: MemStore, tweak: impl FnOnce(&mut NodeConfig)) -> Node<MemStore, EStop> {
        let mut config = NodeConfig::new(1, vec![1]);
        tweak(&mut config);
        Node::new(config, store, EStop::new()).unwrap()
    }

    /// Ticks and runs the ready loop until `done` or a bound.
    fn run_until(
        node: &mut Node<MemStore, EStop>,
        mut done: impl FnMut(&[Event]) -> bool,
    ) -> Vec<Event> {
        let mut events = Vec::new();
        for _ in 0..200 {
            node.tick();
            node.handle_ready(&mut |m| panic!("a single member sends nothing: {m:?}")).unwrap();
            events.extend(node.drain_events());
            if done(&events) {
                return events;
            }
        }
        panic!("condition not reached; events {events:?}");
    }

    fn applied(events: &[Event], id: RequestId) -> Option<&Applied> {
        events.iter().find_map(|e| match e {
            Event::Proposal { id: i, result: Ok(a) } if *i == id => Some(a),
            _ => None,
        })
    }

    #[test]
    fn single_member_elects_itself_applies_and_reads() {
        let mut node = single(MemStore::new(), |_| {});
        let proposal = node.propose(engage("r1")).unwrap();
        let read = node.read(EStopQuery::State.encode()).unwrap();
        let events = run_until(&mut node, |events| {
            applied(events, proposal).is_some()
                && events.iter().any(|e| matches!(e, Event::Read { id, .. } if *id == read))
        });
        assert!(node.is_leader());
        assert_eq!(node.status().members(), vec![1]);
        assert!(applied(&events, proposal).unwrap().index > 0);
        assert!(node.state_machine().state().engaged);
    }

    /// Runs the ready loop of three members of [1, 2, 3], delivering every message, until
    /// member 1 leads and everyone applied the first entry of its term.
    fn three_with_leader_1() -> Vec<Node<MemStore, EStop>> {
        let mut nodes: Vec<_> = (1..=3)
            .map(|id| Node::new(NodeConfig::new(id, vec![1, 2, 3]), MemStore::new(), EStop::new()))
            .collect::<Result<_, _>>()
            .unwrap();
        nodes[0].campaign().unwrap();
        for _ in 0..50 {
            let mut messages = Vec::new();
            for node in &mut nodes {
                node.handle_ready(&mut |m| messages.push(m)).unwrap();
            }
            for message in messages {
                let _ = nodes[message.to as usize - 1].step(message);
            }
            let commit = nodes[0].status().commit;
            if nodes[0].is_leader()
                && commit > BOOTSTRAP_INDEX
                && nodes.iter().all(|n| n.status().applied == commit)
            {
                return nodes;
            }
        }
        panic!("member 1 never led: {:?}", nodes.iter().map(Node::status).collect::<Vec<_>>());
    }

    #[test]
    fn a_leaders_appends_leave_before_its_write_and_acks_only_after_the_followers_write() {
        let mut nodes = three_with_leader_1();
        let last = nodes[0].raw().store().last_index().unwrap();
        nodes[0].propose(engage("r1")).unwrap();
        let mut early = Vec::new();
        assert!(nodes[0].begin_ready(&mut |m| early.push(m)), "appends sent and a write follows");
        let to: Vec<u64> = early
            .iter()
            .filter(|m| m.get_msg_type() == MessageType::MsgAppend && !m.entries.is_empty())
            .map(|m| m.to)
            .collect();
        assert_eq!(to, [2, 3], "both followers get the entry before the leader's write");
        assert_eq!(nodes[0].raw().store().last_index().unwrap(), last, "not written yet");
        assert!(!nodes[0].begin_ready(&mut |_| panic!("no second round")), "round already begun");
        nodes[0]
            .finish_ready(&mut |m| panic!("the leader sends nothing after its write: {m:?}"))
            .unwrap();
        assert_eq!(nodes[0].raw().store().last_index().unwrap(), last + 1, "written by finish");

        // A follower sends nothing before its write; its acknowledgement only after it.
        for message in early.into_iter().filter(|m| m.to == 2) {
            nodes[1].step(message).unwrap();
        }
        assert!(!nodes[1].begin_ready(&mut |m| panic!("a follower acks after its write: {m:?}")));
        let mut acks = Vec::new();
        nodes[1].finish_ready(&mut |m| acks.push(m)).unwrap();
        assert_eq!(nodes[1].raw().store().last_index().unwrap(), last + 1);
        assert!(
            acks.iter()
                .any(|m| m.get_msg_type() == MessageType::MsgAppendResponse && m.index == last + 1)
        );
    }

    #[test]
    fn oversized_commands_and_overload_are_refused_at_once() {
        let mut node = single(MemStore::new(), |c| {
            c.command_bytes_max = 16;
            c.pending_requests_max = 1;
        });
        assert!(matches!(
            node.propose(vec![0; 17]),
            Err(ProposeError::TooLarge { bytes: 17, max: 16 })
        ));
        node.propose(vec![1]).unwrap();
        assert_eq!(node.propose(vec![2]), Err(ProposeError::Busy(1)));
        assert_eq!(node.read(vec![]), Err(ReadError::Busy(1)));
    }

    #[test]
    fn invalid_configuration_is_a_typed_error() {
        let mut config = NodeConfig::new(1, vec![1]);
        config.election_ticks = 1;
        let error = Node::new(config, MemStore::new(), EStop::new()).unwrap_err();
        assert!(matches!(error, NodeError::Config(ConfigError::ElectionTicks { .. })));
    }

    #[test]
    fn no_leader_means_no_quorum_at_the_deadline() {
        // Member 1 of 3 alone: it never learns a leader.
        let mut config = NodeConfig::new(1, vec![1, 2, 3]);
        config.proposal_timeout_ticks = 30;
        let mut node = Node::new(config, MemStore::new(), EStop::new()).unwrap();
        let proposal = node.propose(engage("r1")).unwrap();
        let mut events = Vec::new();
        for _ in 0..30 {
            node.tick();
            node.handle_ready(&mut |_| {}).unwrap();
            events.extend(node.drain_events());
        }
        assert_eq!(
            events,
            vec![Event::Proposal { id: proposal, result: Err(ProposeError::NoQuorum) }]
        );
    }

    #[test]
    fn an_abandoned_proposal_never_commits_once_a_leader_appears() {
        let mut node = single(MemStore::new(), |_| {});
        // No leader yet (the single member has not campaigned): the proposal waits.
        let gone = node.propose(engage("abandoned")).unwrap();
        assert!(node.abandon(gone), "not submitted yet, so withdrawn");
        assert!(!node.abandon(gone), "already withdrawn");
        let kept = node.propose(engage("kept")).unwrap();
        let events = run_until(&mut node, |events| applied(events, kept).is_some());
        assert!(events.iter().all(|e| !matches!(e, Event::Proposal { id, .. } if *id == gone)));
        let ids: Vec<&str> = node.state_machine().audit().map(|r| r.request_id.as_str()).collect();
        assert_eq!(ids, ["kept"]);
        let late = node.propose(engage("late")).unwrap();
        assert!(!node.abandon(late), "a leader took it at once: it stays and commits");
        run_until(&mut node, |events| applied(events, late).is_some());
    }

    #[test]
    fn restart_restores_snapshot_replays_log_and_ignores_old_proposals() {
        let store = MemStore::new();
        let mut node = single(store.clone(), |c| c.snapshot_interval_entries = 3);
        let mut last = RequestId(0);
        for i in 0..5 {
            last = node.propose(engage(&format!("r{i}"))).unwrap();
        }
        let events = run_until(&mut node, |events| applied(events, last).is_some());
        let last_index = applied(&events, last).unwrap().index;
        assert!(node.snapshot_index() >= 3, "the log was compacted");
        assert!(store.first_index().unwrap() >= 4, "entries below the snapshot are gone");
        let before = node.state_machine().clone();
        drop(node);

        let mut node = single(store, |c| c.snapshot_interval_entries = 3);
        // The new boot numbers its proposals afresh; replayed entries must not answer them.
        let fresh = node.propose(engage("after-restart")).unwrap();
        assert_eq!(fresh, RequestId(1));
        let events = run_until(&mut node, |events| applied(events, fresh).is_some());
        let proposals: Vec<_> =
            events.iter().filter(|e| matches!(e, Event::Proposal { .. })).collect();
        assert_eq!(proposals.len(), 1, "only the new proposal completes: {proposals:?}");
        assert!(applied(&events, fresh).unwrap().index > last_index);
        // Replaying "after-restart" on top of the restored state changes only the audit.
        assert_eq!(node.state_machine().state(), before.state());
        assert_eq!(node.state_machine().audit().count(), before.audit().count() + 1);
    }
}
