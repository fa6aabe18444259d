//! The seeded simulation: many seeds of 3- and 5-member clusters under faults; a failing seed
//! prints itself and replays alone with `KEEL_SEED=<n>`.

use std::time::Instant;

use raft_safety::sim::{self, SimConfig, SimReport, StoreKind};

/// Seeds per cluster size in one test run.
const SEEDS: u64 = 500;
/// Seeds with membership swaps (3 voters, 2 spares).
const MEMBERSHIP_SEEDS: u64 = 300;
/// Seeds run on redb over crashing disks (slower: a real redb commit per ready round).
const REDB_SEEDS: u64 = 150;
/// Seeds run on the WAL store over crashing disks.
const WAL_SEEDS: u64 = 300;

fn seeds(base: u64, count: u64) -> Vec<u64> {
    match std::env::var("KEEL_SEED") {
        Ok(seed) => vec![seed.parse().expect("KEEL_SEED is a number")],
        Err(_) => (base..base + count).collect(),
    }
}

fn run_many(
    nodes: usize,
    spares: usize,
    base: u64,
    store: StoreKind,
    count: u64,
) -> Vec<SimReport> {
    let started = Instant::now();
    let mut reports = Vec::new();
    for seed in seeds(base, count) {
        let config = SimConfig { store, spares, ..SimConfig::new(seed, nodes) };
        // A panic inside raft-rs (a broken invariant) must name its seed too.
        match std::panic::catch_unwind(|| sim::run(&config)) {
            Ok(Ok(report)) => reports.push(report),
            Ok(Err(failure)) => panic!("{failure}"),
            Err(_) => panic!("seed {seed}: panicked (replay with KEEL_SEED={seed})"),
        }
    }
    let total = |f: fn(&SimReport) -> usize| reports.iter().map(f).sum::<usize>();
    let max_heal = reports.iter().map(|r| r.heal_commit_ticks).max().unwrap_or(0);
    println!(
        "{nodes}+{spares} members on {store:?}: {} seeds in {:?}: {} ops checked, {} acked writes, {} reads, {} unknown, \
         {} crashes, {} partitions, {} transfers, {} membership swaps ({} joins, {} removals), {} snapshots installed, heal->commit max {max_heal} ticks",
        reports.len(),
        started.elapsed(),
        total(|r| r.operations),
        total(|r| r.acked_writes),
        total(|r| r.reads),
        total(|r| r.unknown_writes),
        total(|r| r.crashes),
        total(|r| r.partitions),
        total(|r| r.transfers),
        total(|r| r.membership_changes),
        total(|r| r.joins),
        total(|r| r.removals),
        total(|r| r.snapshots_installed),
    );
    reports
}

#[test]
fn three_members_stay_linearizable_under_faults() {
    let reports = run_many(3, 0, 0, StoreKind::Memory, SEEDS);
    if std::env::var("KEEL_SEED").is_err() {
        // The faults must actually have happened and the clients must have done work.
        assert!(reports.iter().map(|r| r.crashes).sum::<usize>() > 100);
        assert!(reports.iter().map(|r| r.acked_writes).sum::<usize>() > 1_000);
        assert!(reports.iter().map(|r| r.reads).sum::<usize>() > 500);
        assert!(reports.iter().map(|r| r.snapshots_installed).sum::<usize>() > 0);
    }
}

#[test]
fn five_members_stay_linearizable_under_faults() {
    let reports = run_many(5, 0, 1_000_000, StoreKind::Memory, SEEDS);
    if std::env::var("KEEL_SEED").is_err() {
        assert!(reports.iter().map(|r| r.crashes).sum::<usize>() > 100);
        assert!(reports.iter().map(|r| r.acked_writes).sum::<usize>() > 1_000);
    }
}

#[test]
fn redb_members_on_crashing_disks_stay_linearizable() {
    let reports = run_many(3, 0, 2_000_000, StoreKind::Redb, REDB_SEEDS);
    if std::env::var("KEEL_SEED").is_err() {
        assert!(reports.iter().map(|r| r.crashes).sum::<usize>() > 10);
        assert!(reports.iter().map(|r| r.acked_writes).sum::<usize>() > 100);
    }
}

#[test]
fn wal_members_on_crashing_disks_stay_linearizable() {
    let reports = run_many(3, 0, 4_000_000, StoreKind::Wal, WAL_SEEDS);
    if std::env::var("KEEL_SEED").is_err() {
        assert!(reports.iter().map(|r| r.crashes).sum::<usize>() > 20);
        assert!(reports.iter().map(|r| r.acked_writes).sum::<usize>() > 200);
        assert!(reports.iter().map(|r| r.snapshots_installed).sum::<usize>() > 0);
    }
}

#[test]
fn membership_swaps_by_joint_consensus_stay_linearizable() {
    let reports = run_many(3, 2, 3_000_000, StoreKind::Memory, MEMBERSHIP_SEEDS);
    if std::env::var("KEEL_SEED").is_err() {
        assert!(reports.iter().map(|r| r.joins).sum::<usize>() > 100, "spares joined");
        assert!(reports.iter().map(|r| r.removals).sum::<usize>() > 100, "members left");
        assert!(reports.iter().map(|r| r.acked_writes).sum::<usize>() > 1_000);
    }
}

#[test]
fn a_seed_replays_exactly() {
    let config = SimConfig::new(42, 3);
    let a = sim::run(&config).unwrap();
    let b = sim::run(&config).unwrap();
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
}
