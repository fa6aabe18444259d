//! A seeded, in-memory network of replicas: drop, duplicate, reorder, partition, heal, restart, late start.

use std::collections::BTreeSet;

use crdt_sync::{ArchiveChunk, DocId, DocKind, MemOpLog, Replica, ReplicaConfig};

/// A change batch in flight.
#[derive(Debug, Clone)]
pub struct Message {
    pub from: usize,
    pub to: usize,
    pub doc: DocId,
    pub bytes: Vec<u8>,
}

/// One node: its replica, its durable snapshot, its incarnation, and whether it runs
/// (a node that is down hears nothing and does nothing until it is restarted).
pub struct Node {
    pub replica: Replica<MemOpLog>,
    pub snapshot: Option<Vec<u8>>,
    pub incarnation: u64,
    pub up: bool,
}

pub struct Network {
    pub names: Vec<String>,
    pub nodes: Vec<Node>,
    pub in_flight: Vec<Message>,
    /// Side of each node while partitioned (`None`: healed).
    pub sides: Option<Vec<bool>>,
    pub dedup_window_ms: u64,
    /// See `ReplicaConfig::epoch_changes_min`.
    pub epoch_changes_min: u64,
}

impl Network {
    /// Epochs off.
    pub fn new(count: usize, dedup_window_ms: u64) -> Network {
        Network::with_epochs(count, dedup_window_ms, u64::MAX)
    }

    /// The coordinator starts a counter epoch every `epoch_changes_min` changes.
    pub fn with_epochs(count: usize, dedup_window_ms: u64, epoch_changes_min: u64) -> Network {
        let names: Vec<String> = (0..count).map(|i| format!("node-{i}")).collect();
        let nodes = (0..count)
            .map(|i| Node {
                replica: Replica::new(
                    config(&names, i, 0, dedup_window_ms, epoch_changes_min),
                    MemOpLog::new(),
                )
                .expect("valid config"),
                snapshot: None,
                incarnation: 0,
                up: true,
            })
            .collect();
        Network {
            names,
            nodes,
            in_flight: Vec::new(),
            sides: None,
            dedup_window_ms,
            epoch_changes_min,
        }
    }

    pub fn up(&self, i: usize) -> bool {
        self.nodes[i].up
    }

    /// Takes node `i` down (it keeps its log and snapshot; [`Network::restart`] brings it
    /// back). A node down from the start is a member that joins late.
    pub fn stop(&mut self, i: usize) {
        self.nodes[i].up = false;
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn replica(&self, i: usize) -> &Replica<MemOpLog> {
        &self.nodes[i].replica
    }

    pub fn replica_mut(&mut self, i: usize) -> &mut Replica<MemOpLog> {
        &mut self.nodes[i].replica
    }

    pub fn connected(&self, a: usize, b: usize) -> bool {
        if !self.nodes[a].up || !self.nodes[b].up {
            return false;
        }
        match &self.sides {
            None => true,
            Some(sides) => sides[a] == sides[b],
        }
    }

    /// Queues `bytes` from `from` to every other node (what JetStream does).
    pub fn publish(&mut self, from: usize, doc: &DocId, bytes: &[u8]) {
        for to in 0..self.len() {
            if to != from {
                self.in_flight.push(Message { from, to, doc: doc.clone(), bytes: bytes.to_vec() });
            }
        }
    }

    /// Delivers message `index` (mod the queue length); a message across a
    /// partition is lost. `keep` leaves a copy queued (duplicate delivery).
    pub fn deliver(&mut self, index: usize, keep: bool) {
        if self.in_flight.is_empty() {
            return;
        }
        let index = index % self.in_flight.len();
        let message =
            if keep { self.in_flight[index].clone() } else { self.in_flight.remove(index) };
        if !self.connected(message.from, message.to) {
            return;
        }
        self.nodes[message.to]
            .replica
            .apply_changes(&message.doc, &message.bytes)
            .expect("a published batch applies");
        self.publish_outgoing(message.to);
    }

    /// Publishes what replica `i` wrote by itself (epoch joins).
    fn publish_outgoing(&mut self, i: usize) {
        for (doc, batch) in self.nodes[i].replica.take_outgoing() {
            self.publish(i, &doc, batch.as_bytes());
        }
    }

    pub fn drop_message(&mut self, index: usize) {
        if !self.in_flight.is_empty() {
            let index = index % self.in_flight.len();
            self.in_flight.remove(index);
        }
    }

    pub fn tick(&mut self, i: usize, now_ms: u64) {
        if !self.nodes[i].up {
            return;
        }
        let out = self.nodes[i].replica.tick(now_ms).expect("tick");
        for (doc, batch) in out {
            self.publish(i, &doc, batch.as_bytes());
        }
    }

    /// Anti-entropy between `a` and `b` for every document either holds,
    /// until both have nothing to say. No-op across a partition.
    pub fn anti_entropy(&mut self, a: usize, b: usize) {
        if a == b || !self.connected(a, b) {
            return;
        }
        let mut docs: BTreeSet<DocId> = self.nodes[a].replica.docs().into_iter().collect();
        docs.extend(self.nodes[b].replica.docs());
        let (name_a, name_b) = (self.names[a].clone(), self.names[b].clone());
        // One anti-entropy round, as `SyncedReplica` runs it: each side first forgets what
        // was in flight (and its per-round message budget).
        self.nodes[a].replica.reset_peer(&name_b);
        self.nodes[b].replica.reset_peer(&name_a);
        for doc in docs {
            let mut settled = false;
            for _round in 0..64 {
                let to_b = self.nodes[a].replica.sync_message(&doc, &name_b);
                if let Some(message) = &to_b {
                    self.nodes[b]
                        .replica
                        .receive_sync_message(&doc, &name_a, message)
                        .expect("sync message applies");
                }
                let to_a = self.nodes[b].replica.sync_message(&doc, &name_a);
                if let Some(message) = &to_a {
                    self.nodes[a]
                        .replica
                        .receive_sync_message(&doc, &name_b, message)
                        .expect("sync message applies");
                }
                if to_a.is_none() && to_b.is_none() {
                    settled = true;
                    break;
                }
            }
            assert!(settled, "anti-entropy {a}<->{b} on {doc} did not settle");
        }
        // A side that started a counter at a later epoch gets the other's archive.
        for (to, from) in [(a, b), (b, a)] {
            for doc in self.nodes[to].replica.archives_wanted() {
                let mut next = Some(0);
                while let Some(start) = next {
                    let Some((chunk, after)) =
                        self.nodes[from].replica.archive_reply(&doc, start, 64 * 1024)
                    else {
                        break;
                    };
                    let chunk = ArchiveChunk::decode(&doc, &chunk).expect("archive chunk");
                    let from_name = self.names[from].clone();
                    self.nodes[to].replica.receive_archive(&doc, &from_name, chunk);
                    next = after;
                }
            }
        }
        self.publish_outgoing(a);
        self.publish_outgoing(b);
    }

    /// Durable checkpoint: snapshot, then truncate the log it covers.
    pub fn checkpoint(&mut self, i: usize) {
        self.nodes[i].replica.sync_log().expect("sync");
        let snapshot = self.nodes[i].replica.snapshot();
        self.nodes[i].snapshot = Some(snapshot.bytes);
        self.nodes[i].replica.truncate_log(snapshot.covers_position).expect("truncate");
    }

    /// Crash and restart: the log loses what was appended unsynced (peers' changes
    /// nothing durable depends on yet), then the node recovers from the last snapshot
    /// and the log; the peers see a reconnect. Returns the records lost.
    ///
    /// Panics if, when nothing was lost, the recovered replica shows anything other than
    /// what it showed before the crash.
    pub fn restart(&mut self, i: usize) -> usize {
        let before = observed(&self.nodes[i].replica);
        let dbg_doc = DocId::counter("production").unwrap();
        let dbg_before = self.nodes[i].replica.epoch_summary(&dbg_doc);
        let (dedup_window_ms, epoch_changes_min) = (self.dedup_window_ms, self.epoch_changes_min);
        let node = &mut self.nodes[i];
        node.incarnation += 1;
        node.up = true;
        let config = config(&self.names, i, node.incarnation, dedup_window_ms, epoch_changes_min);
        let fresh = Replica::new(config.clone(), MemOpLog::new()).expect("valid config");
        let mut log = std::mem::replace(&mut node.replica, fresh).into_log();
        let lost = log.crash();
        node.replica = Replica::recover(config, log, node.snapshot.as_deref()).expect("recovery");
        if lost == 0 {
            assert_eq!(
                observed(&node.replica),
                before,
                "node {i} changed in its restart\nbefore {dbg_before}\nafter  {}",
                node.replica.epoch_summary(&dbg_doc)
            );
        }
        self.publish_outgoing(i);
        let name = self.names[i].clone();
        for (j, other) in self.nodes.iter_mut().enumerate() {
            if j != i {
                other.replica.reset_peer(&name);
            }
        }
        lost
    }

    /// Heal, then rounds of ticks and full anti-entropy until acks and folds
    /// have spread.
    pub fn settle(&mut self, now_ms: u64) {
        self.sides = None;
        for i in 0..self.len() {
            if !self.nodes[i].up {
                self.restart(i);
            }
        }
        for _round in 0..4 {
            for i in 0..self.len() {
                self.tick(i, now_ms);
            }
            for a in 0..self.len() {
                for b in (a + 1)..self.len() {
                    self.anti_entropy(a, b);
                }
            }
        }
    }
}

/// Everything a client can read from `replica`, document by document. A document that
/// holds nothing (made by an anti-entropy round that brought no change) is left out: it
/// has nothing to log, so it is not recovered, and reads the same as an absent one.
fn observed(replica: &Replica<MemOpLog>) -> Vec<String> {
    replica
        .docs()
        .into_iter()
        .filter_map(|doc| {
            let value = match doc.kind() {
                DocKind::Counter => match replica.counter(&doc) {
                    // A counter that waits for its epoch's genesis reads as absent.
                    Ok(None) => return None,
                    Ok(Some(v)) if v.value == 0 && v.live_ops == 0 && v.replicas.is_empty() => {
                        return None;
                    }
                    other => format!("{other:?}"),
                },
                DocKind::Register => match replica.register(&doc) {
                    Ok(None) => return None,
                    other => format!("{other:?}"),
                },
                DocKind::Set => match replica.set_members(&doc) {
                    Ok(members) if members.is_empty() => return None,
                    other => format!("{other:?}"),
                },
                DocKind::List => match replica.list_items(&doc) {
                    Ok(items) if items.is_empty() => return None,
                    other => format!("{other:?}"),
                },
                other => panic!("observed() does not know {other:?} documents yet"),
            };
            Some(format!("{doc}: {value}"))
        })
        .collect()
}

fn config(
    names: &[String],
    i: usize,
    incarnation: u64,
    dedup_window_ms: u64,
    epoch_changes_min: u64,
) -> ReplicaConfig {
    let members: Vec<&str> = names.iter().map(String::as_str).collect();
    ReplicaConfig {
        incarnation,
        dedup_window_ms,
        epoch_changes_min,
        ..ReplicaConfig::new(&names[i], &members)
    }
}
