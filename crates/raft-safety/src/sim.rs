//! The deterministic simulation: [`Node`]s replicating the e-stop register over a simulated
//! network that drops, delays, duplicates, reorders and partitions messages, with nodes that
//! crash and restart from what they made durable. No sockets, no wall clock: one seed decides
//! everything, so a failing seed replays exactly.
//!
//! Checks, for every seed: the client history of the register is linearizable
//! ([`crate::linearizability`]); at most one leader per term; every member applies the same
//! entry at each index, also after restarting from its log and snapshot (no committed entry is
//! lost or changed); every acknowledged write is in the log at the index it was acknowledged
//! at; after the network heals and crashed members restart, a write commits within
//! [`HEAL_COMMIT_TICKS_MAX`] ticks; in the end all members converge on the same state.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use raft::prelude::{
    ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, Message,
};

use crate::config::NodeConfig;
use crate::estop::{EStop, EStopCommand, EStopQuery, EStopResponse};
use crate::linearizability::{self, OpKind, Operation, Verdict};
use crate::node::{Event, Node, ProposeError, RequestId, splitmix64};
use crate::storage::{CrashDisk, LogStore, MemStore, RedbStore, WalStore};

/// Simulated milliseconds per Raft tick.
pub const TICK_MS: u64 = 10;
/// Longest ordinary message delay.
pub const MESSAGE_DELAY_MS_MAX: u64 = 15;
/// Longest delay of a straggler (reordered far behind later messages).
pub const STRAGGLER_DELAY_MS_MAX: u64 = 200;
/// Bound on ticks from healing until a write proposed after the heal is acknowledged.
pub const HEAL_COMMIT_TICKS_MAX: u64 = 100;
/// How long clients keep working after the heal.
pub const AFTER_HEAL_MS: u64 = 1_500;
/// Bound on the time for all members to converge once clients stop.
pub const CONVERGE_MS_MAX: u64 = 5_000;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The seed; everything random derives from it.
    pub seed: u64,
    /// Initial voters (3 or 5 in the tests).
    pub nodes: usize,
    /// Extra nodes that start outside the group; during the faulty phase the leader is asked
    /// to swap one of them in for a voter (joint consensus). A member that learns it was
    /// removed is shut down for good (its id is never reused: a wiped node under an old id
    /// would vote without its log, which no Raft tolerates).
    pub spares: usize,
    /// Concurrent clients, each with at most one operation in flight.
    pub clients: usize,
    /// Length of the faulty phase.
    pub chaos_ms: u64,
    /// Applied entries between snapshots (small, to exercise snapshot transfer).
    pub snapshot_interval_entries: u64,
    /// The members' log store.
    pub store: StoreKind,
}

/// Which [`LogStore`] the simulated members run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// [`MemStore`]: the whole store survives a crash (fast).
    Memory,
    /// [`RedbStore`] on a [`CrashDisk`]: a crash loses every write redb had not synced.
    Redb,
    /// [`WalStore`] on two [`CrashDisk`]s (small files, so that rotation and growth happen):
    /// a crash loses every write not synced.
    Wal,
}

/// The two files of a simulated member's [`WalStore`].
#[derive(Debug, Clone, Default)]
struct WalDisks([CrashDisk; 2]);

/// File size of the simulated [`WalStore`]s: a few snapshots' worth.
const SIM_WAL_CAPACITY_BYTES: u64 = 8 << 10;

/// A simulated member's disk: what survives its crashes.
trait Disk: Clone + Default {
    type Store: LogStore;
    fn open(&self) -> Result<Self::Store, String>;
    fn crash(&self);
}

impl Disk for MemStore {
    type Store = MemStore;
    fn open(&self) -> Result<MemStore, String> {
        Ok(self.clone())
    }
    fn crash(&self) {}
}

impl Disk for CrashDisk {
    type Store = RedbStore;
    fn open(&self) -> Result<RedbStore, String> {
        RedbStore::open_with_backend(self.attach()).map_err(|e| format!("redb open failed: {e:?}"))
    }
    fn crash(&self) {
        CrashDisk::crash(self);
    }
}

impl Disk for WalDisks {
    type Store = WalStore;
    fn open(&self) -> Result<WalStore, String> {
        let [a, b] = &self.0;
        WalStore::open_with_files(
            [Box::new(a.attach()), Box::new(b.attach())],
            SIM_WAL_CAPACITY_BYTES,
        )
        .map_err(|e| format!("wal open failed: {e:?}"))
    }
    fn crash(&self) {
        self.0[0].crash();
        self.0[1].crash();
    }
}

impl SimConfig {
    /// The defaults the tests use for `nodes` members.
    pub fn new(seed: u64, nodes: usize) -> Self {
        Self {
            seed,
            nodes,
            spares: 0,
            clients: 3,
            chaos_ms: 2_500,
            snapshot_interval_entries: 12,
            store: StoreKind::Memory,
        }
    }
}

/// What one seed did.
#[derive(Debug, Clone, Default)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// Operations in the checked history.
    pub operations: usize,
    /// Writes acknowledged to clients.
    pub acked_writes: usize,
    /// Reads answered.
    pub reads: usize,
    /// Writes whose outcome stayed unknown to the client.
    pub unknown_writes: usize,
    /// Distinct (term, leader) pairs seen.
    pub leaders: usize,
    /// Crashes injected.
    pub crashes: usize,
    /// Partitions injected.
    pub partitions: usize,
    /// Leadership transfers requested.
    pub transfers: usize,
    /// Membership swaps proposed.
    pub membership_changes: usize,
    /// Members that learnt they were removed (and were shut down).
    pub removals: usize,
    /// Spares that became members.
    pub joins: usize,
    /// Snapshots installed from a leader.
    pub snapshots_installed: usize,
    /// Ticks from heal until a post-heal write was acknowledged.
    pub heal_commit_ticks: u64,
    /// Final applied index on every member.
    pub final_applied: u64,
}

/// A violated check, with everything needed to replay it.
#[derive(Debug, Clone)]
pub struct SimFailure {
    /// The seed to replay with `KEEL_SEED`.
    pub seed: u64,
    /// What went wrong.
    pub reason: String,
    /// The client history so far.
    pub history: String,
}

impl fmt::Display for SimFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {}: {} (replay with KEEL_SEED={})\nhistory:\n{}",
            self.seed, self.reason, self.seed, self.history
        )
    }
}

impl std::error::Error for SimFailure {}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        splitmix64(&mut self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

struct SimNode<D: Disk> {
    node: Option<Node<D::Store, EStop>>,
    /// Starts with the initial voters (an empty disk bootstraps); false for spares.
    bootstrap: bool,
    /// The simulation's record of whether the node knows itself a member.
    member: bool,
    /// Removed from the group and shut down for good.
    retired: bool,
    /// The node's "disk": what survives crashes.
    disk: D,
    tick_offset_ms: u64,
}

struct Pending {
    client: usize,
    op: usize,
    write: bool,
}

struct Sim<D: Disk> {
    config: SimConfig,
    rng: Rng,
    now_ms: u64,
    /// Logical clock for the history: every call and return gets the next value.
    clock: u64,
    nodes: Vec<SimNode<D>>,
    /// (deliver at, tie breaker) -> message.
    network: BTreeMap<(u64, u64), Message>,
    groups: Vec<u8>,
    drop_p: f64,
    duplicate_p: f64,
    straggler_p: f64,
    history: Vec<Option<Operation>>,
    /// Per client: whether an operation is in flight.
    busy: Vec<bool>,
    pending: HashMap<(u64, RequestId), Pending>,
    next_request: u32,
    committed: BTreeMap<u64, (u64, i32, Vec<u8>)>,
    acked: Vec<(u64, String)>,
    leaders: HashMap<u64, u64>,
    heal_ms: Option<u64>,
    /// The history clock at the heal: writes called after it count for the heal bound.
    heal_clock: u64,
    healed_commit_ms: Option<u64>,
    report: SimReport,
}

/// Runs one seed; `Ok` with what happened, or the first violated check.
pub fn run(config: &SimConfig) -> Result<SimReport, SimFailure> {
    match config.store {
        StoreKind::Memory => run_on::<MemStore>(config),
        StoreKind::Redb => run_on::<CrashDisk>(config),
        StoreKind::Wal => run_on::<WalDisks>(config),
    }
}

fn run_on<D: Disk>(config: &SimConfig) -> Result<SimReport, SimFailure> {
    let mut sim = Sim::<D>::new(config.clone());
    let outcome = sim.run();
    outcome.map(|()| sim.report.clone()).map_err(|reason| SimFailure {
        seed: config.seed,
        reason,
        history: linearizability::render(
            &sim.history.iter().flatten().copied().collect::<Vec<_>>(),
        ),
    })
}

impl<D: Disk> Sim<D> {
    fn new(config: SimConfig) -> Self {
        let mut rng = Rng(config.seed ^ 0x6b65_656c_7369_6d00);
        let nodes = (0..config.nodes + config.spares)
            .map(|i| SimNode {
                node: None,
                bootstrap: i < config.nodes,
                member: i < config.nodes,
                retired: false,
                disk: D::default(),
                tick_offset_ms: rng.below(TICK_MS),
            })
            .collect();
        let drop_p = [0.0, 0.02, 0.1, 0.25][rng.below(4) as usize];
        let duplicate_p = [0.0, 0.05][rng.below(2) as usize];
        let straggler_p = [0.0, 0.02][rng.below(2) as usize];
        Self {
            report: SimReport { seed: config.seed, ..SimReport::default() },
            groups: vec![0; config.nodes + config.spares],
            busy: vec![false; config.clients],
            config,
            rng,
            now_ms: 0,
            clock: 0,
            nodes,
            network: BTreeMap::new(),
            drop_p,
            duplicate_p,
            straggler_p,
            history: Vec::new(),
            pending: HashMap::new(),
            next_request: 0,
            committed: BTreeMap::new(),
            acked: Vec::new(),
            leaders: HashMap::new(),
            heal_ms: None,
            heal_clock: 0,
            healed_commit_ms: None,
        }
    }

    fn node_config(&self, id: u64) -> NodeConfig {
        let peers = if self.nodes[id as usize - 1].bootstrap {
            (1..=self.config.nodes as u64).collect()
        } else {
            Vec::new()
        };
        let mut config = NodeConfig::new(id, peers);
        config.tick_ms = TICK_MS;
        config.election_ticks = 10;
        config.heartbeat_ticks = 2;
        config.proposal_timeout_ticks = 40;
        config.read_timeout_ticks = 40;
        config.snapshot_interval_entries = self.config.snapshot_interval_entries;
        config
    }

    fn start(&mut self, index: usize) -> Result<(), String> {
        let id = index as u64 + 1;
        let config = self.node_config(id);
        let store = self.nodes[index].disk.open()?;
        let mut node = Node::new(config, store, EStop::new())
            .map_err(|e| format!("node {id} failed to start: {e:?}"))?;
        node.observe_applied(true);
        node.set_election_seed(self.rng.next());
        self.nodes[index].node = Some(node);
        self.ready(index)
    }

    fn crash(&mut self, index: usize) {
        // Power cut first: nothing the dying process does afterwards reaches its disk.
        self.nodes[index].disk.crash();
        self.stop(index);
        self.report.crashes += 1;
    }

    fn stop(&mut self, index: usize) {
        let id = index as u64 + 1;
        self.nodes[index].node = None;
        // Every operation in flight on it has an unknown outcome (writes) or failed (reads).
        let mut lost: Vec<(u64, RequestId)> =
            self.pending.keys().filter(|(node, _)| *node == id).copied().collect();
        lost.sort();
        for key in lost {
            let pending = self.pending.remove(&key).expect("listed above");
            self.busy[pending.client] = false;
            if !pending.write {
                self.history[pending.op] = None;
            }
        }
    }

    fn alive(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].node.is_some()).collect()
    }

    fn run(&mut self) -> Result<(), String> {
        for index in 0..self.nodes.len() {
            self.start(index)?;
        }
        let chaos_end = self.config.chaos_ms;
        let clients_stop = chaos_end + AFTER_HEAL_MS;
        let deadline = clients_stop + CONVERGE_MS_MAX;
        loop {
            self.now_ms += 1;
            let now = self.now_ms;
            if now < chaos_end && now.is_multiple_of(TICK_MS) {
                self.inject_faults()?;
            }
            if now == chaos_end {
                self.heal()?;
            }
            self.deliver()?;
            for index in 0..self.nodes.len() {
                let offset = self.nodes[index].tick_offset_ms;
                if let Some(node) = self.nodes[index].node.as_mut()
                    && (now + offset).is_multiple_of(TICK_MS)
                {
                    node.tick();
                }
            }
            if now < clients_stop {
                self.clients_act()?;
            }
            for index in 0..self.nodes.len() {
                self.ready(index)?;
            }
            self.check_leaders()?;
            self.track_membership()?;
            if let (Some(heal), None) = (self.heal_ms, self.healed_commit_ms)
                && now > heal + HEAL_COMMIT_TICKS_MAX * TICK_MS
            {
                return Err(format!(
                    "no write committed within {HEAL_COMMIT_TICKS_MAX} ticks after healing"
                ));
            }
            if now >= clients_stop && self.pending.is_empty() && self.converged() {
                break;
            }
            if now >= deadline {
                return Err(format!(
                    "members did not converge within {CONVERGE_MS_MAX} ms: applied {:?}, pending {}",
                    self.applied(),
                    self.pending.len()
                ));
            }
        }
        self.final_checks()
    }

    fn applied(&self) -> Vec<u64> {
        self.nodes.iter().map(|n| n.node.as_ref().map_or(0, |node| node.status().applied)).collect()
    }

    fn leader_index(&self) -> Option<usize> {
        self.nodes.iter().position(|s| s.node.as_ref().is_some_and(|node| node.is_leader()))
    }

    /// The members of the leader's configuration, all running; `None` while some is not.
    fn final_members(&self) -> Option<Vec<&Node<D::Store, EStop>>> {
        let leader = self.nodes[self.leader_index()?].node.as_ref()?;
        leader
            .status()
            .members()
            .iter()
            .map(|&id| self.nodes.get(id as usize - 1).and_then(|n| n.node.as_ref()))
            .collect()
    }

    fn converged(&self) -> bool {
        let Some(members) = self.final_members() else {
            return false;
        };
        let applied = members[0].status().applied;
        members.iter().all(|n| {
            let status = n.status();
            status.applied == applied
                && status.commit == applied
                && status.voters_outgoing.is_empty()
        })
    }

    /// Spares that were added become members; members that learnt of their removal retire.
    fn track_membership(&mut self) -> Result<(), String> {
        for index in 0..self.nodes.len() {
            let id = index as u64 + 1;
            let Some(status) = self.nodes[index].node.as_ref().map(|n| n.status()) else {
                continue;
            };
            let listed = status.members().contains(&id);
            if !self.nodes[index].member && listed {
                self.nodes[index].member = true;
                self.report.joins += 1;
            } else if self.nodes[index].member
                && !listed
                && status.voters_outgoing.is_empty()
                && !status.voters.is_empty()
            {
                self.stop(index);
                self.nodes[index].retired = true;
                self.nodes[index].member = false;
                self.report.removals += 1;
            }
        }
        Ok(())
    }

    fn propose_swap(&mut self) {
        let Some(leader) = self.leader_index() else {
            return;
        };
        let status = self.nodes[leader].node.as_ref().expect("leader runs").status();
        if !status.voters_outgoing.is_empty() {
            return;
        }
        let spares: Vec<u64> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].node.is_some() && !self.nodes[i].member)
            .map(|i| i as u64 + 1)
            .filter(|id| !status.members().contains(id))
            .collect();
        let voters: Vec<u64> =
            status.voters.iter().copied().filter(|&id| id != status.id).collect();
        if spares.is_empty() || voters.is_empty() {
            return;
        }
        let add = spares[self.rng.below(spares.len() as u64) as usize];
        let remove = voters[self.rng.below(voters.len() as u64) as usize];
        let mut change = ConfChangeV2::default();
        change.set_transition(ConfChangeTransition::Auto);
        for (id, change_type) in
            [(add, ConfChangeType::AddNode), (remove, ConfChangeType::RemoveNode)]
        {
            let mut single = ConfChangeSingle::default();
            single.set_change_type(change_type);
            single.node_id = id;
            change.changes.push(single);
        }
        let node = self.nodes[leader].node.as_mut().expect("leader runs");
        if node.propose_conf_change(change).is_ok() {
            self.report.membership_changes += 1;
        }
    }

    fn down(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].node.is_none() && !self.nodes[i].retired)
            .collect()
    }

    fn inject_faults(&mut self) -> Result<(), String> {
        let n = self.nodes.len();
        let crashed = self.down().len();
        let roll = self.rng.below(1000);
        match roll {
            // Partition: isolate the leader or split at random.
            0..=14 => {
                self.report.partitions += 1;
                let leader = self
                    .nodes
                    .iter()
                    .position(|s| s.node.as_ref().is_some_and(|node| node.is_leader()));
                if let (Some(leader), true) = (leader, self.rng.chance(0.5)) {
                    self.groups = vec![0; n];
                    self.groups[leader] = 1;
                } else {
                    for group in &mut self.groups {
                        *group = self.rng.below(2) as u8;
                    }
                }
            }
            15..=34 => self.groups = vec![0; n],
            // Crash a member, keeping a majority up most of the time.
            35..=44 if crashed < n / 2 || self.rng.chance(0.1) => {
                let alive = self.alive();
                if !alive.is_empty() {
                    let index = alive[self.rng.below(alive.len() as u64) as usize];
                    self.crash(index);
                }
            }
            45..=74 if crashed > 0 => {
                let down = self.down();
                let index = down[self.rng.below(down.len() as u64) as usize];
                self.start(index)?;
            }
            85..=99 if self.config.spares > 0 => self.propose_swap(),
            // Hand leadership to another member (it may be unreachable: then nothing happens).
            75..=84 => {
                let leader = self
                    .nodes
                    .iter()
                    .position(|s| s.node.as_ref().is_some_and(|node| node.is_leader()));
                if let Some(leader) = leader {
                    let target = self.rng.below(n as u64) + 1;
                    if target != leader as u64 + 1 {
                        self.report.transfers += 1;
                        let node = self.nodes[leader].node.as_mut().expect("alive");
                        node.transfer_leader(target);
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn heal(&mut self) -> Result<(), String> {
        self.groups = vec![0; self.nodes.len()];
        self.drop_p = 0.0;
        self.duplicate_p = 0.0;
        self.straggler_p = 0.0;
        for index in self.down() {
            self.start(index)?;
        }
        self.heal_ms = Some(self.now_ms);
        self.heal_clock = self.clock;
        Ok(())
    }

    fn send(&mut self, message: Message) {
        if self.rng.chance(self.drop_p) {
            return;
        }
        let copies = if self.rng.chance(self.duplicate_p) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = if self.rng.chance(self.straggler_p) {
                self.rng.below(STRAGGLER_DELAY_MS_MAX) + 1
            } else {
                self.rng.below(MESSAGE_DELAY_MS_MAX) + 1
            };
            let key = (self.now_ms + delay, self.rng.next());
            self.network.insert(key, message.clone());
        }
    }

    fn deliver(&mut self) -> Result<(), String> {
        while let Some(entry) = self.network.first_entry() {
            if entry.key().0 > self.now_ms {
                break;
            }
            let message = entry.remove();
            let (from, to) = (message.from as usize - 1, message.to as usize - 1);
            if to >= self.nodes.len() || self.groups[from] != self.groups[to] {
                continue;
            }
            if let Some(node) = self.nodes[to].node.as_mut() {
                // Stale or unknown-peer messages are refused by raft; the network does that.
                let _ = node.step(message);
            }
        }
        Ok(())
    }

    fn ready(&mut self, index: usize) -> Result<(), String> {
        let Some(node) = self.nodes[index].node.as_mut() else {
            return Ok(());
        };
        let mut outbox = Vec::new();
        node.handle_ready(&mut |m| outbox.push(m))
            .map_err(|e| format!("node {} failed: {e:?}", index + 1))?;
        let events = node.drain_events();
        for message in outbox {
            self.send(message);
        }
        for event in events {
            self.on_event(index as u64 + 1, event)?;
        }
        Ok(())
    }

    fn tick_clock(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn clients_act(&mut self) -> Result<(), String> {
        for client in 0..self.busy.len() {
            if self.busy[client] || !self.rng.chance(1.0 / 25.0) {
                continue;
            }
            // Clients mostly talk to members; now and then to anyone (a spare answers NoQuorum).
            let mut alive = self.alive();
            if !self.rng.chance(0.1) {
                alive.retain(|&i| self.nodes[i].member);
            }
            if alive.is_empty() {
                return Ok(());
            }
            let index = alive[self.rng.below(alive.len() as u64) as usize];
            let id = index as u64 + 1;
            let roll = self.rng.below(100);
            self.next_request += 1;
            let request = self.next_request;
            let (kind, submitted) = {
                let node = self.nodes[index].node.as_mut().expect("alive");
                if roll < 40 {
                    let command = EStopCommand::Engage {
                        request_id: format!("e{request}"),
                        reason: "sim".into(),
                        source: format!("client-{client}"),
                        who: String::new(),
                        at_ms: self.now_ms,
                    };
                    (OpKind::Engage(request), node.propose(command.encode()).ok())
                } else if roll < 65 {
                    let command = EStopCommand::Clear {
                        request_id: format!("c{request}"),
                        by: format!("client-{client}"),
                        reason: "sim".into(),
                        at_ms: self.now_ms,
                    };
                    (OpKind::Clear, node.propose(command.encode()).ok())
                } else {
                    (OpKind::Read(None), node.read(EStopQuery::State.encode()).ok())
                }
            };
            let Some(request_id) = submitted else {
                continue;
            };
            let call = self.tick_clock();
            self.history.push(Some(Operation { client: client as u32, call, ret: None, kind }));
            self.busy[client] = true;
            self.pending.insert(
                (id, request_id),
                Pending {
                    client,
                    op: self.history.len() - 1,
                    write: !matches!(kind, OpKind::Read(_)),
                },
            );
        }
        Ok(())
    }

    fn on_event(&mut self, id: u64, event: Event) -> Result<(), String> {
        match event {
            Event::Proposal { id: request, result } => {
                let Some(pending) = self.pending.remove(&(id, request)) else {
                    return Ok(());
                };
                self.busy[pending.client] = false;
                match result {
                    Ok(applied) => {
                        let response = EStopResponse::decode(&applied.response)
                            .map_err(|e| format!("undecodable response: {e}"))?;
                        if let Some(error) = response.error {
                            return Err(format!("valid command rejected: {error}"));
                        }
                        let ret = self.tick_clock();
                        let op = self.history[pending.op].as_mut().expect("writes stay");
                        op.ret = Some(ret);
                        let request_id = match op.kind {
                            OpKind::Engage(n) => format!("e{n}"),
                            _ => String::new(),
                        };
                        self.acked.push((applied.index, request_id));
                        self.report.acked_writes += 1;
                        if let Some(heal) = self.heal_ms
                            && self.healed_commit_ms.is_none()
                            && op.call > self.heal_clock
                        {
                            self.healed_commit_ms = Some(self.now_ms);
                            self.report.heal_commit_ticks = (self.now_ms - heal) / TICK_MS;
                        }
                    }
                    // Never handed to raft: no effect.
                    Err(ProposeError::NoQuorum | ProposeError::Busy(_)) => {
                        self.history[pending.op] = None;
                    }
                    Err(_) => self.report.unknown_writes += 1,
                }
            }
            Event::Read { id: request, result } => {
                let Some(pending) = self.pending.remove(&(id, request)) else {
                    return Ok(());
                };
                self.busy[pending.client] = false;
                match result {
                    Ok(bytes) => {
                        let state = EStop::decode_state(&bytes)
                            .map_err(|e| format!("undecodable read: {e}"))?;
                        let seen = if state.engaged {
                            let n = state
                                .request_id
                                .strip_prefix('e')
                                .and_then(|n| n.parse::<u32>().ok())
                                .ok_or_else(|| format!("engaged by {:?}", state.request_id))?;
                            Some(n)
                        } else {
                            None
                        };
                        let ret = self.tick_clock();
                        let op = self.history[pending.op].as_mut().expect("reads in flight stay");
                        op.ret = Some(ret);
                        op.kind = OpKind::Read(seen);
                        self.report.reads += 1;
                    }
                    Err(_) => self.history[pending.op] = None,
                }
            }
            Event::EntryApplied { index, term, entry_type, data } => {
                match self.committed.get(&index) {
                    Some(known) if *known != (term, entry_type, data.clone()) => {
                        return Err(format!(
                            "node {id} applied entry {index} (term {term}) but term {} was applied before",
                            known.0
                        ));
                    }
                    Some(_) => {}
                    None => {
                        self.committed.insert(index, (term, entry_type, data));
                    }
                }
            }
            Event::SnapshotRestored { .. } => self.report.snapshots_installed += 1,
        }
        Ok(())
    }

    fn check_leaders(&mut self) -> Result<(), String> {
        for sim_node in &self.nodes {
            let Some(node) = sim_node.node.as_ref() else {
                continue;
            };
            if !node.is_leader() {
                continue;
            }
            let term = node.status().term;
            match self.leaders.get(&term) {
                Some(&other) if other != node.id() => {
                    return Err(format!("two leaders in term {term}: {other} and {}", node.id()));
                }
                Some(_) => {}
                None => {
                    self.leaders.insert(term, node.id());
                    self.report.leaders += 1;
                }
            }
        }
        Ok(())
    }

    fn final_checks(&mut self) -> Result<(), String> {
        // Every acknowledged write sits in the log where it was acknowledged.
        for (index, request_id) in &self.acked {
            let Some((_, _, data)) = self.committed.get(index) else {
                return Err(format!("acknowledged entry {index} was never applied"));
            };
            if !request_id.is_empty() {
                let command: EStopCommand = serde_json::from_slice(data)
                    .map_err(|e| format!("entry {index} is not a command: {e}"))?;
                if !matches!(&command, EStopCommand::Engage { request_id: r, .. } if r == request_id)
                {
                    return Err(format!(
                        "acknowledged {request_id} at {index} but the log holds {command:?}"
                    ));
                }
            }
        }
        // Every member holds the same state.
        let nodes = self.final_members().ok_or("a member is down at the end")?;
        for pair in nodes.windows(2) {
            if pair[0].state_machine() != pair[1].state_machine() {
                return Err(format!(
                    "members {} and {} diverged at applied {}",
                    pair[0].id(),
                    pair[1].id(),
                    pair[0].status().applied
                ));
            }
        }
        self.report.final_applied = nodes.first().map_or(0, |n| n.status().applied);
        let history: Vec<Operation> = self.history.iter().flatten().copied().collect();
        self.report.operations = history.len();
        match linearizability::check(&history) {
            Verdict::Linearizable => Ok(()),
            Verdict::NotLinearizable { stuck_after } => Err(format!(
                "history not linearizable; longest explained prefix has {} operations, last {:?}",
                stuck_after.len(),
                stuck_after.last().map(|&i| history[i])
            )),
            Verdict::Inconclusive => Err("linearizability search inconclusive".to_owned()),
        }
    }
}
