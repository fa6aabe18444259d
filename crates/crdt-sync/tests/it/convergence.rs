//! Property tests: random ops, random delivery, restarts, late members and counter epochs, then one anti-entropy round: replicas equal the model, and counters never go down.

use std::collections::{BTreeMap, BTreeSet};

use crdt_sync::{DocId, Error};
use proptest::prelude::*;

use crate::sim::Network;

/// Cases per run unless `PROPTEST_CASES` says otherwise.
const CASES_DEFAULT: u32 = 1_000;
/// Distinct op_ids the generator draws from (so duplicates are frequent).
const OP_IDS: u8 = 16;
/// Distinct set members.
const MEMBERS: u8 = 4;

#[derive(Debug, Clone)]
enum Action {
    Increment {
        node: usize,
        op: u8,
    },
    SetRegister {
        node: usize,
        version: u8,
        value: u8,
    },
    SetAdd {
        node: usize,
        member: u8,
    },
    SetRemove {
        node: usize,
        member: u8,
    },
    ListInsert {
        node: usize,
        position: usize,
        item: u8,
    },
    Deliver {
        index: usize,
    },
    Duplicate {
        index: usize,
    },
    Drop {
        index: usize,
    },
    Partition {
        mask: u8,
    },
    Heal,
    Tick {
        node: usize,
    },
    AntiEntropy {
        a: usize,
        b: usize,
    },
    Checkpoint {
        node: usize,
    },
    Restart {
        node: usize,
    },
    /// Down until its next restart (or the final settle).
    Stop {
        node: usize,
    },
}

fn action() -> impl Strategy<Value = Action> {
    let node = 0usize..5;
    prop_oneof![
        6 => (node.clone(), 0..OP_IDS).prop_map(|(node, op)| Action::Increment { node, op }),
        2 => (node.clone(), 0u8..6, 0u8..4)
            .prop_map(|(node, version, value)| Action::SetRegister { node, version, value }),
        2 => (node.clone(), 0..MEMBERS).prop_map(|(node, member)| Action::SetAdd { node, member }),
        2 => (node.clone(), 0..MEMBERS).prop_map(|(node, member)| Action::SetRemove { node, member }),
        1 => (node.clone(), 0usize..8, 0u8..10)
            .prop_map(|(node, position, item)| Action::ListInsert { node, position, item }),
        8 => any::<usize>().prop_map(|index| Action::Deliver { index }),
        2 => any::<usize>().prop_map(|index| Action::Duplicate { index }),
        2 => any::<usize>().prop_map(|index| Action::Drop { index }),
        1 => any::<u8>().prop_map(|mask| Action::Partition { mask }),
        1 => Just(Action::Heal),
        2 => node.clone().prop_map(|node| Action::Tick { node }),
        1 => (node.clone(), node.clone()).prop_map(|(a, b)| Action::AntiEntropy { a, b }),
        1 => node.clone().prop_map(|node| Action::Checkpoint { node }),
        2 => node.clone().prop_map(|node| Action::Restart { node }),
        1 => node.prop_map(|node| Action::Stop { node }),
    ]
}

/// Epoch thresholds the cases draw from: often, now and then, never.
fn epoch_changes_min() -> impl Strategy<Value = u64> {
    prop_oneof![Just(3u64), Just(12), Just(u64::MAX)]
}

/// The amount an op_id always carries: clients retry with the same body.
fn amount(op: u8, increments_only: bool) -> i64 {
    let magnitude = i64::from(op % 5) + 1;
    if op.is_multiple_of(3) && !increments_only { -magnitude } else { magnitude }
}

/// How a case runs.
#[derive(Debug, Clone, Copy)]
struct Setup {
    replica_count: usize,
    epoch_changes_min: u64,
    /// A member that is down from the start (joins late, at a restart or the final settle).
    late: Option<usize>,
    /// Positive amounts only, and every replica's counter is checked never to go down.
    increments_only: bool,
}

#[derive(Default)]
struct Model {
    /// op_id -> amount, for every op_id some replica accepted.
    counter: BTreeMap<String, i64>,
    /// Highest accepted `(version, json)`.
    register: Option<(u64, Vec<u8>)>,
    /// member -> every add tag.
    set_adds: BTreeMap<String, BTreeSet<String>>,
    /// member -> tags removed or superseded by a later add.
    set_killed: BTreeMap<String, BTreeSet<String>>,
}

impl Model {
    fn counter_value(&self) -> i64 {
        self.counter.values().sum()
    }

    fn set_members(&self) -> Vec<String> {
        self.set_adds
            .iter()
            .filter(|(member, tags)| {
                let killed = self.set_killed.get(*member);
                tags.iter().any(|tag| killed.is_none_or(|k| !k.contains(tag)))
            })
            .map(|(member, _)| member.clone())
            .collect()
    }
}

struct Docs {
    counter: DocId,
    register: DocId,
    set: DocId,
    list: DocId,
}

fn docs() -> Docs {
    Docs {
        counter: DocId::counter("production").unwrap(),
        register: DocId::register("config").unwrap(),
        set: DocId::set("flags").unwrap(),
        list: DocId::list("queue").unwrap(),
    }
}

fn counter_at(net: &Network, node: usize, doc: &DocId) -> i64 {
    net.replica(node).counter(doc).expect("read").map_or(0, |c| c.value)
}

fn run(setup: Setup, actions: &[Action]) -> Result<(), TestCaseError> {
    let docs = docs();
    let n = setup.replica_count;
    let mut net =
        Network::with_epochs(n, crdt_sync::DEDUP_WINDOW_MS_DEFAULT, setup.epoch_changes_min);
    if let Some(late) = setup.late {
        net.stop(late % n);
    }
    let mut model = Model::default();
    let mut seen: Vec<i64> = vec![0; n];
    let amount = |op: u8| amount(op, setup.increments_only);
    let mut now_ms = 0u64;
    for action in actions {
        now_ms += 1;
        let acting = match &action {
            Action::Increment { node, .. }
            | Action::SetRegister { node, .. }
            | Action::SetAdd { node, .. }
            | Action::SetRemove { node, .. }
            | Action::ListInsert { node, .. }
            | Action::Tick { node }
            | Action::Checkpoint { node } => Some(*node % n),
            _ => None,
        };
        if acting.is_some_and(|node| !net.up(node)) {
            continue;
        }
        match action.clone() {
            Action::Increment { node, op } => {
                let node = node % n;
                let op_id = format!("op-{op}");
                let update = match net.replica_mut(node).increment(
                    &docs.counter,
                    &op_id,
                    amount(op),
                    now_ms,
                ) {
                    Ok(update) => update,
                    // A late member that heard of a later epoch before its genesis.
                    Err(Error::Syncing { .. }) => continue,
                    Err(e) => return Err(TestCaseError::fail(format!("increment: {e}"))),
                };
                // The total an increment returns (carried across remote applies) is the
                // one a full read sees.
                let read = net.replica(node).counter(&docs.counter).expect("read").expect("exists");
                prop_assert_eq!(update.value, read.value, "increment's total at node {}", node);
                model.counter.insert(op_id, amount(op));
                if let Some(changes) = update.changes {
                    net.publish(node, &docs.counter, changes.as_bytes());
                }
            }
            Action::SetRegister { node, version, value } => {
                let node = node % n;
                let value = serde_json::json!({ "speed": value });
                match net.replica_mut(node).set_register(
                    &docs.register,
                    &value,
                    u64::from(version),
                    now_ms,
                ) {
                    Ok(update) => {
                        let candidate = (u64::from(version), serde_json::to_vec(&value).unwrap());
                        if model.register.as_ref().is_none_or(|best| candidate > *best) {
                            model.register = Some(candidate);
                        }
                        if let Some(changes) = update.changes {
                            net.publish(node, &docs.register, changes.as_bytes());
                        }
                    }
                    Err(Error::StaleVersion { .. }) => {}
                    Err(e) => return Err(TestCaseError::fail(format!("register: {e}"))),
                }
            }
            Action::SetAdd { node, member } => {
                let node = node % n;
                let member = format!("m{member}");
                let before = net.replica(node).set_add_tags(&docs.set, &member).unwrap();
                let update = net.replica_mut(node).set_add(&docs.set, &member, now_ms).unwrap();
                let after = net.replica(node).set_add_tags(&docs.set, &member).unwrap();
                prop_assert_eq!(after.len(), 1, "an add leaves exactly its own tag visible");
                model.set_killed.entry(member.clone()).or_default().extend(before);
                model.set_adds.entry(member).or_default().extend(after);
                if let Some(changes) = update.changes {
                    net.publish(node, &docs.set, changes.as_bytes());
                }
            }
            Action::SetRemove { node, member } => {
                let node = node % n;
                let member = format!("m{member}");
                let observed = net.replica(node).set_add_tags(&docs.set, &member).unwrap();
                let update = net.replica_mut(node).set_remove(&docs.set, &member, now_ms).unwrap();
                prop_assert_eq!(update.applied, !observed.is_empty());
                model.set_killed.entry(member).or_default().extend(observed);
                if let Some(changes) = update.changes {
                    net.publish(node, &docs.set, changes.as_bytes());
                }
            }
            Action::ListInsert { node, position, item } => {
                let node = node % n;
                let len = net.replica(node).list_items(&docs.list).unwrap().len();
                let update = net
                    .replica_mut(node)
                    .list_insert(&docs.list, position % (len + 1), &format!("i{item}"), now_ms)
                    .unwrap();
                if let Some(changes) = update.changes {
                    net.publish(node, &docs.list, changes.as_bytes());
                }
            }
            Action::Deliver { index } => net.deliver(index, false),
            Action::Duplicate { index } => net.deliver(index, true),
            Action::Drop { index } => net.drop_message(index),
            Action::Partition { mask } => {
                net.sides = Some((0..n).map(|i| mask & (1 << i) != 0).collect());
            }
            Action::Heal => net.sides = None,
            Action::Tick { node } => net.tick(node % n, now_ms),
            Action::AntiEntropy { a, b } => net.anti_entropy(a % n, b % n),
            Action::Checkpoint { node } => net.checkpoint(node % n),
            Action::Restart { node } => {
                // Peers' changes nothing durable depended on may be lost in the crash
                // (anti-entropy brings them back): the node's own count may go down.
                if net.restart(node % n) > 0 {
                    seen[node % n] = counter_at(&net, node % n, &docs.counter);
                }
            }
            Action::Stop { node } => net.stop(node % n),
        }
        if setup.increments_only {
            for (node, seen) in seen.iter_mut().enumerate() {
                if net.up(node) {
                    let value = counter_at(&net, node, &docs.counter);
                    prop_assert!(
                        value >= *seen,
                        "counter at node {} went down from {} to {} after {:?}",
                        node,
                        *seen,
                        value,
                        action
                    );
                    *seen = value;
                }
            }
        }
    }

    net.settle(now_ms + 1);

    let expected_members = model.set_members();
    let expected_register = model.register.as_ref().map(|(version, json)| {
        (*version, serde_json::from_slice::<serde_json::Value>(json).unwrap())
    });
    let first_list = net.replica(0).list_items(&docs.list).unwrap();
    for i in 0..n {
        let replica = net.replica(i);
        let counter = replica.counter(&docs.counter).unwrap();
        let value = counter.as_ref().map_or(0, |c| c.value);
        prop_assert_eq!(value, model.counter_value(), "counter at node {}", i);
        if let Some(counter) = &counter {
            prop_assert_eq!(counter.live_ops, 0, "every entry folded at node {}", i);
            prop_assert_eq!(counter.replicas.values().sum::<i64>(), value);
            prop_assert_eq!(counter.tombstones, model.counter.len());
        }
        let register = replica.register(&docs.register).unwrap().map(|r| (r.version, r.value));
        prop_assert_eq!(&register, &expected_register, "register at node {}", i);
        prop_assert_eq!(
            replica.set_members(&docs.set).unwrap(),
            expected_members.clone(),
            "set at node {}",
            i
        );
        prop_assert_eq!(
            &replica.list_items(&docs.list).unwrap(),
            &first_list,
            "list at node {}",
            i
        );
    }
    // Contributions agree too, not just totals.
    let contributions: Vec<_> = (0..n)
        .map(|i| net.replica(i).counter(&docs.counter).unwrap().map(|c| c.replicas))
        .collect();
    prop_assert!(contributions.windows(2).all(|w| w[0] == w[1]));

    // Every op_id is still recognised after convergence, at every replica.
    for (op_id, amount) in &model.counter {
        for i in 0..n {
            let retry =
                net.replica_mut(i).increment(&docs.counter, op_id, *amount, now_ms + 2).unwrap();
            prop_assert!(!retry.applied, "retry of {} at node {} counted", op_id, i);
        }
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(CASES_DEFAULT)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 2_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn replicas_converge_to_the_model(
        replica_count in 3usize..=5,
        epoch_changes_min in epoch_changes_min(),
        late in proptest::option::weighted(0.25, 0usize..5),
        actions in proptest::collection::vec(action(), 1..80),
    ) {
        let setup = Setup { replica_count, epoch_changes_min, late, increments_only: false };
        run(setup, &actions)?;
    }

    #[test]
    fn counters_never_go_down_across_epochs(
        replica_count in 3usize..=5,
        epoch_changes_min in epoch_changes_min(),
        late in proptest::option::weighted(0.25, 0usize..5),
        actions in proptest::collection::vec(action(), 1..80),
    ) {
        let setup = Setup { replica_count, epoch_changes_min, late, increments_only: true };
        run(setup, &actions)?;
    }
}

#[test]
fn a_partitioned_majority_and_minority_converge_on_heal() {
    let docs = docs();
    let mut net = Network::new(3, crdt_sync::DEDUP_WINDOW_MS_DEFAULT);
    net.sides = Some(vec![true, true, false]);
    // Retries of the same op_ids land on both sides of the partition.
    for i in 0..100u64 {
        for node in [0, 2] {
            let update =
                net.replica_mut(node).increment(&docs.counter, &format!("op-{i}"), 1, i).unwrap();
            if let Some(changes) = update.changes {
                net.publish(node, &docs.counter, changes.as_bytes());
            }
        }
        net.tick((i % 3) as usize, i);
    }
    while !net.in_flight.is_empty() {
        net.deliver(0, false);
    }
    assert_eq!(net.replica(0).counter(&docs.counter).unwrap().unwrap().value, 100);
    assert_eq!(net.replica(2).counter(&docs.counter).unwrap().unwrap().value, 100);
    net.settle(1_000);
    for i in 0..3 {
        let counter = net.replica(i).counter(&docs.counter).unwrap().unwrap();
        assert_eq!(counter.value, 100);
        assert_eq!(counter.live_ops, 0);
    }
}

#[test]
fn a_replica_restarted_after_acking_still_recognises_the_op_id() {
    let docs = docs();
    let mut net = Network::new(3, crdt_sync::DEDUP_WINDOW_MS_DEFAULT);
    let update = net.replica_mut(0).increment(&docs.counter, "op-1", 5, 1).unwrap();
    net.publish(0, &docs.counter, update.changes.unwrap().as_bytes());
    while !net.in_flight.is_empty() {
        net.deliver(0, false);
    }
    // Everyone acks; the acks reach node 0, which folds op-1.
    for node in 0..3 {
        net.tick(node, 2);
    }
    while !net.in_flight.is_empty() {
        net.deliver(0, false);
    }
    net.tick(0, 3);
    assert_eq!(net.replica(0).counter(&docs.counter).unwrap().unwrap().live_ops, 0);
    net.in_flight.clear();
    // Node 2 crashes before it hears of the fold, and the retry lands there.
    net.restart(2);
    let retry = net.replica_mut(2).increment(&docs.counter, "op-1", 5, 4).unwrap();
    assert!(!retry.applied, "node 2 lost op-1 in its restart");
    net.settle(5);
    for node in 0..3 {
        let counter = net.replica(node).counter(&docs.counter).unwrap().unwrap();
        assert_eq!(counter.value, 5);
    }
}

/// Delivers everything in flight (nothing is lost while healed).
fn deliver_all(net: &mut Network) {
    while !net.in_flight.is_empty() {
        net.deliver(0, false);
    }
}

#[test]
fn epochs_bound_the_history_and_keep_every_op_id() {
    let docs = docs();
    let mut net = Network::with_epochs(3, crdt_sync::DEDUP_WINDOW_MS_DEFAULT, 50);
    let mut most_changes = 0;
    for i in 0..2_000u64 {
        let node = (i % 3) as usize;
        let update =
            net.replica_mut(node).increment(&docs.counter, &format!("op-{i}"), 1, i).unwrap();
        net.publish(node, &docs.counter, update.changes.unwrap().as_bytes());
        if i % 10 == 0 {
            deliver_all(&mut net);
            for node in 0..3 {
                net.tick(node, i);
            }
            deliver_all(&mut net);
        }
        most_changes = most_changes.max(net.replica(0).metrics().changes);
    }
    net.settle(3_000);
    for node in 0..3 {
        let replica = net.replica(node);
        let counter = replica.counter(&docs.counter).unwrap().unwrap();
        assert_eq!(counter.value, 2_000, "node {node}");
        assert_eq!(counter.tombstones, 2_000, "every op_id is remembered at node {node}");
        assert!(replica.metrics().epoch >= 10, "epochs: {:?}", replica.metrics());
    }
    // Two epoch documents at most, each of about the threshold plus what arrives while
    // every member joins: far below one change per increment.
    assert!(most_changes < 400, "history held: {most_changes} changes");
    for i in (0..2_000u64).step_by(97) {
        for node in 0..3 {
            let retry = net
                .replica_mut(node)
                .increment(&docs.counter, &format!("op-{i}"), 1, 5_000)
                .unwrap();
            assert!(!retry.applied, "op-{i} counted again at node {node}");
        }
    }
}

#[test]
fn a_member_partitioned_across_an_epoch_change_carries_its_increments_over() {
    let docs = docs();
    let mut net = Network::with_epochs(3, crdt_sync::DEDUP_WINDOW_MS_DEFAULT, 5);
    let increment = |net: &mut Network, node: usize, op: &str, now_ms: u64| {
        if let Some(changes) =
            net.replica_mut(node).increment(&docs.counter, op, 1, now_ms).unwrap().changes
        {
            net.publish(node, &docs.counter, changes.as_bytes());
        }
    };
    for i in 0..6 {
        increment(&mut net, i % 3, &format!("before-{i}"), 1);
    }
    deliver_all(&mut net);
    // node-2 is cut off, then the coordinator starts an epoch without it.
    net.sides = Some(vec![true, true, false]);
    increment(&mut net, 2, "minority-1", 2);
    increment(&mut net, 2, "both-sides", 2);
    for node in 0..3 {
        net.tick(node, 3);
    }
    deliver_all(&mut net);
    assert_eq!(net.replica(0).epoch(&docs.counter), Some(1));
    assert_eq!(net.replica(1).epoch(&docs.counter), Some(1));
    assert_eq!(net.replica(2).epoch(&docs.counter), Some(0));
    increment(&mut net, 1, "majority-1", 4);
    increment(&mut net, 0, "both-sides", 4);
    deliver_all(&mut net);
    let before: Vec<i64> = (0..3).map(|node| counter_at(&net, node, &docs.counter)).collect();
    assert_eq!(before, vec![8, 8, 8]);
    // node-2 restarts while still cut off, then the partition heals.
    net.restart(2);
    net.sides = None;
    net.anti_entropy(0, 2);
    assert_eq!(net.replica(2).epoch(&docs.counter), Some(1), "node-2 joined the new epoch");
    for (node, before) in before.iter().enumerate() {
        assert!(counter_at(&net, node, &docs.counter) >= *before);
    }
    net.settle(10);
    for node in 0..3 {
        let counter = net.replica(node).counter(&docs.counter).unwrap().unwrap();
        assert_eq!(counter.value, 9, "node {node}: {counter:?}");
        assert_eq!(counter.live_ops, 0, "node {node}: {counter:?}");
        for op in ["before-0", "minority-1", "both-sides", "majority-1"] {
            assert!(!net.replica_mut(node).increment(&docs.counter, op, 1, 11).unwrap().applied);
        }
    }
}

#[test]
fn a_member_that_starts_late_joins_the_current_epoch() {
    let docs = docs();
    let mut net = Network::with_epochs(3, crdt_sync::DEDUP_WINDOW_MS_DEFAULT, 5);
    net.stop(2);
    for i in 0..30u64 {
        let node = (i % 2) as usize;
        let update =
            net.replica_mut(node).increment(&docs.counter, &format!("op-{i}"), 1, i).unwrap();
        net.publish(node, &docs.counter, update.changes.unwrap().as_bytes());
        deliver_all(&mut net);
        net.tick(0, i);
        net.tick(1, i);
        deliver_all(&mut net);
    }
    // Epoch 0 is everyone's from the start, so epoch 1 begins without node-2, but epoch 2
    // waits for it to join epoch 1.
    assert_eq!(net.replica(0).epoch(&docs.counter), Some(1));
    net.restart(2);
    let update = net.replica_mut(2).increment(&docs.counter, "late-1", 1, 40);
    assert!(update.is_ok(), "a member without the document starts it: {update:?}");
    net.publish(2, &docs.counter, update.unwrap().changes.unwrap().as_bytes());
    net.settle(100);
    for i in 0..20u64 {
        for node in 0..3 {
            net.tick(node, 100 + i);
        }
        deliver_all(&mut net);
    }
    assert!(net.replica(2).epoch(&docs.counter).unwrap() >= 2, "node-2 joined and epochs went on");
    for node in 0..3 {
        assert_eq!(counter_at(&net, node, &docs.counter), 31, "node {node}");
    }
}
