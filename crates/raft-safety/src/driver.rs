//! The async driver: one tokio task runs a [`Node`]'s ready loop with a real clock and a
//! [`Transport`]; a cloneable [`RaftHandle`] turns proposals and reads into futures.

use std::collections::HashMap;
use std::time::Duration;

use protobuf::Message as _;
use raft::prelude::{
    ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState, Message,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::node::{Applied, Event, Node, NodeError, ProposeError, ReadError, RequestId, Status};
use crate::state_machine::StateMachine;
use crate::storage::LogStore;
use crate::transport::Transport;

/// Requests queued from handles to the driver task before callers wait.
pub const COMMAND_QUEUE_MAX: usize = 1_024;
/// Messages or commands handled per loop turn before the ready loop runs.
pub const BATCH_MAX: usize = 256;
/// Inbound messages queued before the transport drops them (size the inbound channel with it).
pub const INBOUND_QUEUE_MESSAGES_MAX: usize = 4_096;

enum Command {
    Propose(Vec<u8>, oneshot::Sender<Result<Applied, ProposeError>>),
    ConfChange(ConfChangeV2, oneshot::Sender<Result<Applied, ProposeError>>),
    Read(Vec<u8>, oneshot::Sender<Result<Vec<u8>, ReadError>>),
    ReadLocal(Vec<u8>, oneshot::Sender<Vec<u8>>),
    TransferLeader(u64),
    Campaign,
    Shutdown,
}

/// A handle on a running node; cheap to clone. When every handle is dropped the node stops.
#[derive(Clone)]
pub struct RaftHandle {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<Status>,
}

impl std::fmt::Debug for RaftHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftHandle").field("status", &*self.status.borrow()).finish()
    }
}

/// An inbound channel sized for the driver: give the sender to the transport's listener (e.g.
/// [`crate::transport::tcp::serve`]) and the receiver to [`spawn`].
pub fn inbound_channel() -> (mpsc::Sender<Message>, mpsc::Receiver<Message>) {
    mpsc::channel(INBOUND_QUEUE_MESSAGES_MAX)
}

/// Runs `node` on a tokio task: ticks every `tick_ms`, steps every message from `inbound`,
/// sends through `transport`. Returns the handle and the task (which ends with the node's
/// fatal error, if any, after failing every waiting request).
pub fn spawn<S, M, T>(
    mut node: Node<S, M>,
    transport: T,
    inbound: mpsc::Receiver<Message>,
) -> (RaftHandle, JoinHandle<Result<(), NodeError>>)
where
    S: LogStore + Send + 'static,
    M: StateMachine,
    T: Transport,
{
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ node.id().rotate_left(32);
    node.set_election_seed(seed);
    let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE_MAX);
    let (status_tx, status) = watch::channel(node.status());
    let task = tokio::spawn(run(node, transport, inbound, command_rx, status_tx));
    (RaftHandle { commands, status }, task)
}

#[derive(Default)]
struct Waiters {
    proposals: HashMap<RequestId, oneshot::Sender<Result<Applied, ProposeError>>>,
    reads: HashMap<RequestId, oneshot::Sender<Result<Vec<u8>, ReadError>>>,
}

async fn run<S, M, T>(
    mut node: Node<S, M>,
    transport: T,
    mut inbound: mpsc::Receiver<Message>,
    mut commands: mpsc::Receiver<Command>,
    status: watch::Sender<Status>,
) -> Result<(), NodeError>
where
    S: LogStore + Send + 'static,
    M: StateMachine,
    T: Transport,
{
    let mut ticker = tokio::time::interval(Duration::from_millis(node.config().tick_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut waiters = Waiters::default();
    let mut inbound_open = true;
    // Messages of a ready round that leave after its write, sent once the round is done.
    let mut outbox: Vec<Message> = Vec::new();
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                // Waiting proposals are handed to a leader only on a tick: first withdraw
                // those whose caller gave up, so that a caller told "no quorum" never sees
                // its command commit later.
                waiters.proposals.retain(|&id, reply| {
                    let abandoned = reply.is_closed();
                    if abandoned {
                        node.abandon(id);
                    }
                    !abandoned
                });
                node.tick();
            }
            message = inbound.recv(), if inbound_open => match message {
                Some(message) => {
                    let _ = node.step(message);
                    for _ in 1..BATCH_MAX {
                        let Ok(message) = inbound.try_recv() else { break };
                        let _ = node.step(message);
                    }
                }
                None => inbound_open = false,
            },
            command = commands.recv() => {
                let Some(command) = command else { break };
                if !handle_command(&mut node, command, &mut waiters) {
                    break;
                }
                let mut stop = false;
                for _ in 1..BATCH_MAX {
                    let Ok(command) = commands.try_recv() else { break };
                    if !handle_command(&mut node, command, &mut waiters) {
                        stop = true;
                        break;
                    }
                }
                if stop {
                    break;
                }
            }
        }
        // A leader's appends go to the peer tasks first; yielding lets those tasks write them
        // to the sockets (on this worker, before the blocking write below) so that the
        // followers persist in parallel with the leader instead of after it. Not when more
        // requests or messages wait: then the tasks that would run first are mostly clients'
        // (delaying this round's write behind them), and the next round is due at once.
        let sent_before_write = node.begin_ready(&mut |message| transport.send(message));
        if sent_before_write && commands.is_empty() && inbound.is_empty() {
            tokio::task::yield_now().await;
        }
        if let Err(error) = node.finish_ready(&mut |message| outbox.push(message)) {
            tracing::error!(node = node.id(), ?error, "raft node failed; stopping");
            return Err(error);
        }
        // Wake-up order: a task woken last runs first on this worker once the loop waits
        // again (tokio's LIFO slot); the others wait for another worker. So status watchers
        // (the publisher) are told first, then the messages that depended on the write go to
        // the peer tasks (a follower's acknowledgement), and the callers whose requests
        // completed are woken last (the leader's answer to a client).
        let current = node.status();
        status.send_if_modified(|old| {
            let changed = *old != current;
            if changed {
                *old = current;
            }
            changed
        });
        for message in outbox.drain(..) {
            transport.send(message);
        }
        for event in node.drain_events() {
            match event {
                Event::Proposal { id, result } => {
                    if let Some(waiter) = waiters.proposals.remove(&id) {
                        let _ = waiter.send(result);
                    }
                }
                Event::Read { id, result } => {
                    if let Some(waiter) = waiters.reads.remove(&id) {
                        let _ = waiter.send(result);
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Returns false when the driver should stop.
fn handle_command<S: LogStore, M: StateMachine>(
    node: &mut Node<S, M>,
    command: Command,
    waiters: &mut Waiters,
) -> bool {
    match command {
        Command::Propose(data, reply) => match node.propose(data) {
            Ok(id) => {
                waiters.proposals.insert(id, reply);
            }
            Err(error) => {
                let _ = reply.send(Err(error));
            }
        },
        Command::ConfChange(change, reply) => match node.propose_conf_change(change) {
            Ok(id) => {
                waiters.proposals.insert(id, reply);
            }
            Err(error) => {
                let _ = reply.send(Err(error));
            }
        },
        Command::Read(query, reply) => match node.read(query) {
            Ok(id) => {
                waiters.reads.insert(id, reply);
            }
            Err(error) => {
                let _ = reply.send(Err(error));
            }
        },
        Command::ReadLocal(query, reply) => {
            let _ = reply.send(node.query_local(&query));
        }
        Command::TransferLeader(to) => node.transfer_leader(to),
        Command::Campaign => {
            let _ = node.campaign();
        }
        Command::Shutdown => return false,
    }
    true
}

impl RaftHandle {
    /// Proposes a command; resolves once it is applied on this node (with the state machine's
    /// response), or fails: `NoQuorum` (no leader before the deadline; nothing proposed),
    /// `Timeout` / `LeadershipLost` (outcome unknown: retry with the same idempotency key),
    /// `Stopped`.
    pub async fn propose(&self, command: Vec<u8>) -> Result<Applied, ProposeError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Propose(command, reply))
            .await
            .map_err(|_| ProposeError::Stopped)?;
        answer.await.map_err(|_| ProposeError::Stopped)?
    }

    /// A linearizable read (ReadIndex): the query runs on the state machine once this node has
    /// applied everything committed when the leader confirmed the read with a quorum.
    pub async fn read(&self, query: Vec<u8>) -> Result<Vec<u8>, ReadError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Read(query, reply)).await.map_err(|_| ReadError::Stopped)?;
        answer.await.map_err(|_| ReadError::Stopped)?
    }

    /// A local (possibly stale) read, answered from this node's applied state.
    pub async fn read_local(&self, query: Vec<u8>) -> Result<Vec<u8>, ReadError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::ReadLocal(query, reply))
            .await
            .map_err(|_| ReadError::Stopped)?;
        answer.await.map_err(|_| ReadError::Stopped)
    }

    /// Proposes a membership change; resolves with the new configuration once applied.
    pub async fn change_membership(&self, change: ConfChangeV2) -> Result<ConfState, ProposeError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::ConfChange(change, reply))
            .await
            .map_err(|_| ProposeError::Stopped)?;
        let applied = answer.await.map_err(|_| ProposeError::Stopped)??;
        let mut conf_state = ConfState::default();
        conf_state
            .merge_from_bytes(&applied.response)
            .map_err(|e| ProposeError::Rejected(e.to_string()))?;
        Ok(conf_state)
    }

    /// Adds and removes voters in one change: a single change applies directly, several go
    /// through joint consensus, left automatically once the joint configuration is committed.
    pub async fn change_voters(
        &self,
        add: &[u64],
        remove: &[u64],
    ) -> Result<ConfState, ProposeError> {
        let mut change = ConfChangeV2::default();
        change.set_transition(ConfChangeTransition::Auto);
        for (ids, change_type) in
            [(add, ConfChangeType::AddNode), (remove, ConfChangeType::RemoveNode)]
        {
            for &id in ids {
                let mut single = ConfChangeSingle::default();
                single.set_change_type(change_type);
                single.node_id = id;
                change.changes.push(single);
            }
        }
        self.change_membership(change).await
    }

    /// Asks the leader to hand leadership to `to` (observe the outcome with [`Self::status`]).
    pub async fn transfer_leader(&self, to: u64) -> Result<(), ProposeError> {
        self.commands.send(Command::TransferLeader(to)).await.map_err(|_| ProposeError::Stopped)
    }

    /// Starts an election on this node now.
    pub async fn campaign(&self) -> Result<(), ProposeError> {
        self.commands.send(Command::Campaign).await.map_err(|_| ProposeError::Stopped)
    }

    /// This node's latest view (id, leader, term, commit, applied, role, members).
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// A receiver that wakes on every status change (leader, term, commit, applied, ...).
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Waits until `condition` holds for the status, or `timeout` passes.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut condition: impl FnMut(&Status) -> bool,
    ) -> Option<Status> {
        let mut status = self.status.clone();
        let waited = tokio::time::timeout(timeout, status.wait_for(|s| condition(s))).await;
        match waited {
            Ok(Ok(status)) => Some(status.clone()),
            _ => None,
        }
    }

    /// Stops the node (pending requests fail with `Stopped`). Returns at once; await the task
    /// returned by [`spawn`] to know it ended.
    pub async fn shutdown(&self) {
        let _ = self.commands.send(Command::Shutdown).await;
    }
}
