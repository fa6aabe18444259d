//! Recovery bench: builds a log of N events (150 arm streams, 128-byte payloads) with the
//! snapshotter taking a snapshot every 10,000 events, then measures, from a cold open of the log,
//! open-to-recovered with the newest snapshot against a full replay from position 1.
//!
//! `--after close` (the default) closes the log cleanly after the build; `--after sigkill` runs
//! the build in a child process and kills it with SIGKILL once its last append is acknowledged,
//! so the open re-indexes the tail past the last durable index checkpoint, as after a crash.
//!
//! `cargo run --release -p snapshotter --example recovery-bench -- --dir /tmp/keel-recovery
//!     --events 1000000 --after sigkill --json target/recovery-bench.json`

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use event_log::{AppendRequest, Event, EventLog, Options};
use serde::{Deserialize, Serialize};
use snapshotter::{Recover, SnapshotOptions, SnapshotPolicy, Snapshotter};

/// Events between snapshots.
const SNAPSHOT_EVERY_EVENTS: u64 = 10_000;
/// Events per append batch while building.
const BATCH_EVENTS: u64 = 1_000;
/// What the build child prints once its last append is acknowledged.
const BUILT_LINE: &str = "built";

#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
struct ArmCounts {
    per_stream: BTreeMap<String, u64>,
    payload_bytes: u64,
    last_position: u64,
}

impl Recover for ArmCounts {
    fn apply(&mut self, event: &Event) {
        *self.per_stream.entry(event.stream.clone()).or_default() += 1;
        self.payload_bytes += event.payload.len() as u64;
        self.last_position = event.position;
    }
}

fn snapshot_options() -> SnapshotOptions {
    SnapshotOptions {
        policy: SnapshotPolicy {
            every_events: Some(SNAPSHOT_EVERY_EVENTS),
            every: None,
            tail_bytes: None,
        },
        compact: false, // keep position 1 so the full replay can be compared
        ..SnapshotOptions::default()
    }
}

/// The log's options: the defaults, or `checkpoint_events` events between durable index
/// checkpoints (what bounds the tail re-indexed on open after a crash).
fn log_options(checkpoint_events: Option<u64>) -> Options {
    let defaults = Options::default();
    Options {
        checkpoint_events: checkpoint_events.unwrap_or(defaults.checkpoint_events),
        ..defaults
    }
}

/// Appends `events` events in batches, snapshotting per the policy; returns the open log.
fn build(dir: &Path, events: u64, options: Options) -> EventLog {
    let log = EventLog::open(dir.join("log"), options).unwrap();
    let mut snapshots = Snapshotter::open(dir.join("snapshots"), snapshot_options()).unwrap();
    let mut state = ArmCounts::default();
    let mut next = 1u64;
    while next <= events {
        let batch: Vec<AppendRequest> = (next..(next + BATCH_EVENTS).min(events + 1))
            .map(|i| {
                let mut id = [0u8; 16];
                id[8..].copy_from_slice(&i.to_be_bytes());
                AppendRequest::new(format!("arm-{}", i % 150), id, "sample", vec![0x42; 128])
            })
            .collect();
        let count = batch.len();
        let appended = log.append_batch(batch).unwrap();
        for event in log.read_range(next, count).unwrap() {
            state.apply(&event);
        }
        next += count as u64;
        let last = *appended.last().unwrap();
        snapshots.maybe_snapshot(&log, &state, last.into()).unwrap();
    }
    log
}

/// Runs the build in a child process and SIGKILLs it after its last acknowledged append.
fn build_and_kill(dir: &Path, events: u64, checkpoint_events: Option<u64>) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--dir", &dir.display().to_string(), "--events", &events.to_string()])
        .args(
            checkpoint_events
                .map(|n| ["--checkpoint-events".to_owned(), n.to_string()])
                .iter()
                .flatten(),
        )
        .args(["--build-child", "true"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = std::io::BufReader::new(stdout).lines().next().unwrap().unwrap();
    assert_eq!(line, BUILT_LINE, "the build child failed");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

fn main() {
    let mut dir = std::env::temp_dir().join("keel-recovery-bench");
    let mut events = 1_000_000u64;
    let mut json_path = PathBuf::from("recovery-bench.json");
    let mut after = String::from("close");
    let mut build_child = false;
    let mut checkpoint_events = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--dir" => dir = value.into(),
            "--events" => events = value.parse().expect("number"),
            "--json" => json_path = value.into(),
            "--after" => after = value,
            "--build-child" => build_child = value == "true",
            "--checkpoint-events" => checkpoint_events = Some(value.parse().expect("number")),
            other => panic!("unknown flag {other}"),
        }
    }
    if build_child {
        let _log = build(&dir, events, log_options(checkpoint_events));
        println!("{BUILT_LINE}");
        loop {
            std::thread::park(); // until the parent's SIGKILL
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let log_dir = dir.join("log");
    let snap_dir = dir.join("snapshots");
    let options = snapshot_options();

    let build_started = Instant::now();
    match after.as_str() {
        "close" => build(&dir, events, log_options(checkpoint_events)).close().unwrap(),
        "sigkill" => build_and_kill(&dir, events, checkpoint_events),
        other => panic!("--after is close or sigkill, not {other}"),
    }
    let build_s = build_started.elapsed().as_secs_f64();

    // Open-to-recovered with snapshots.
    let started = Instant::now();
    let log = EventLog::open(&log_dir, log_options(checkpoint_events)).unwrap();
    let log_open = started.elapsed();
    let tail_events_at_open = log.stats().tail_events_at_open;
    let mut snapshots = Snapshotter::open(&snap_dir, options.clone()).unwrap();
    let (recovered, report) = snapshots.recover::<ArmCounts>(&log).unwrap();
    let with_snapshot = started.elapsed();
    assert_eq!(recovered.last_position, events);
    drop(log);

    // Open-to-recovered replaying everything from position 1 (no snapshots).
    let empty = dir.join("no-snapshots");
    let started = Instant::now();
    let log = EventLog::open(&log_dir, Options::default()).unwrap();
    let mut none = Snapshotter::open(&empty, options).unwrap();
    let (full, full_report) = none.recover::<ArmCounts>(&log).unwrap();
    let full_replay = started.elapsed();
    assert_eq!(full, recovered);
    assert_eq!(full_report.events_replayed, events);

    let log_bytes: u64 = std::fs::read_dir(&log_dir)
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    let out = serde_json::json!({
        "events": events,
        "after": after,
        "checkpoint_events": log_options(checkpoint_events).checkpoint_events,
        "build_s": build_s,
        "snapshot_position": report.snapshot_position,
        "tail_events_replayed": report.events_replayed,
        "open_to_recovered_with_snapshot_ms": with_snapshot.as_secs_f64() * 1e3,
        "recover_call_ms": report.elapsed.as_secs_f64() * 1e3,
        "log_open_ms": log_open.as_secs_f64() * 1e3,
        "log_tail_events_at_open": tail_events_at_open,
        "open_to_recovered_full_replay_ms": full_replay.as_secs_f64() * 1e3,
        "full_replay_events_per_s": events as f64 / full_replay.as_secs_f64(),
        "speedup": full_replay.as_secs_f64() / with_snapshot.as_secs_f64(),
        "log_file_bytes": log_bytes,
    });
    println!(
        "| events | snapshot at | tail replayed | open→recovered (snapshot) ms | open→recovered (full replay) ms | full replay events/s | speedup |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {} | {:.1} | {:.0} | {:.0} | {:.0}x |",
        events,
        report.snapshot_position,
        report.events_replayed,
        with_snapshot.as_secs_f64() * 1e3,
        full_replay.as_secs_f64() * 1e3,
        events as f64 / full_replay.as_secs_f64(),
        full_replay.as_secs_f64() / with_snapshot.as_secs_f64()
    );
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
    std::fs::write(&json_path, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
