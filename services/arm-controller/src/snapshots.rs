//! The snapshot thread: keeps its own copy of the state, folded from a tail subscription in
//! log order (so every snapshot is a consistent cut, whatever order concurrent appends of
//! different arms completed in), saves it when the policy says so, and compacts the log
//! below it — never below an outbox cursor, unless that cursor is more than
//! [`crate::outbox::OUTBOX_HOLD_EVENTS_MAX`] behind.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use snapshotter::{LogPoint, Recover, Snapshotter};

use crate::controller::Controller;
use crate::outbox::{Cursors, OUTBOX_HOLD_EVENTS_MAX};
use crate::state::State;

/// How often the policy is consulted.
const POLICY_CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// What the thread needs.
#[derive(Debug)]
pub struct SnapshotTask {
    /// The controller (its log).
    pub controller: Arc<Controller>,
    /// The recovered state.
    pub state: State,
    /// The snapshotter, positioned after recovery.
    pub snapshotter: Snapshotter,
    /// Outbox cursors that hold compaction back.
    pub cursors: Arc<Cursors>,
    /// Events kept below a snapshot when compacting.
    pub keep_tail_events: u64,
    /// Whether the outboxes run (without NATS they would hold compaction forever).
    pub outboxes: bool,
}

/// Starts the thread; it stops (after a last snapshot if anything is new) once `stop` is set.
pub fn spawn(task: SnapshotTask, stop: Arc<AtomicBool>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("snapshots".into()).spawn(move || run(task, &stop))
}

fn run(mut task: SnapshotTask, stop: &AtomicBool) {
    let log = task.controller.log().clone();
    let mut sub = log.subscribe(task.state.position + 1);
    let mut last_check = Instant::now();
    let mut saved_position = task.state.position;
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        let deadline =
            if stopping { Instant::now() } else { Instant::now() + POLICY_CHECK_INTERVAL };
        match sub.next_blocking(Some(deadline)) {
            Ok(Some(event)) => {
                task.state.apply(&event);
                if last_check.elapsed() < POLICY_CHECK_INTERVAL {
                    continue;
                }
            }
            Ok(None) if stopping => {
                if task.state.position > saved_position {
                    snapshot(&mut task, true);
                }
                return;
            }
            Ok(None) => {}
            Err(event_log::Error::Closed) => return,
            Err(err) => {
                tracing::error!(error = %err, "snapshot thread cannot read the log");
                std::thread::sleep(POLICY_CHECK_INTERVAL);
                sub = log.subscribe(task.state.position + 1);
                continue;
            }
        }
        last_check = Instant::now();
        if let Some(position) = snapshot(&mut task, false) {
            saved_position = position;
        }
    }
}

/// Takes a snapshot if due (or `now`), then compacts; returns the snapshot's position.
fn snapshot(task: &mut SnapshotTask, now: bool) -> Option<u64> {
    let log = task.controller.log();
    let at = LogPoint { position: task.state.position, hash: task.state.hash };
    let result = if now {
        task.snapshotter.snapshot_now(log, &task.state, at).map(Some)
    } else {
        task.snapshotter.maybe_snapshot(log, &task.state, at)
    };
    let info = match result {
        Ok(Some(info)) => info,
        Ok(None) => return None,
        Err(err) => {
            tracing::error!(error = %err, "snapshot failed");
            metrics::counter!("keel_arm_snapshot_failures_total").increment(1);
            return None;
        }
    };
    metrics::counter!("keel_arm_snapshots_total").increment(1);
    metrics::gauge!("keel_arm_snapshot_position").set(info.position as f64);
    let head = log.head();
    let mut below = (info.position + 1).saturating_sub(task.keep_tail_events);
    if task.outboxes {
        for cursor in [&task.cursors.events, &task.cursors.counter] {
            let cursor = cursor.load(Ordering::Relaxed);
            if head.position.saturating_sub(cursor) <= OUTBOX_HOLD_EVENTS_MAX {
                below = below.min(cursor + 1);
            }
        }
    }
    if below > head.first_position {
        match log.compact(below) {
            Ok(report) if report.segments_removed > 0 => tracing::info!(
                first_position = report.first_position,
                segments_removed = report.segments_removed,
                bytes_removed = report.bytes_removed,
                "log compacted"
            ),
            Ok(_) => {}
            Err(err) => tracing::error!(error = %err, "compaction failed"),
        }
    }
    Some(info.position)
}
