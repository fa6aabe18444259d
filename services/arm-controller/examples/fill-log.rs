//! Fills an arm-controller data dir with plan events for the recovery benchmark: `EVENTS`
//! events over `ARMS` arms, a snapshot `TAIL` events before the end (so recovery replays a
//! tail as after a crash between snapshots).
//!
//! `cargo run --release -p arm-controller --example fill-log -- <data-dir> [events] [arms] [tail]`

use arm_controller::state::{KIND_PLAN, PlanPayload, State, plan_event_id};
use event_log::{AppendRequest, EventLog, Options};
use snapshotter::{LogPoint, SnapshotOptions, Snapshotter};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(
        args.next()
            .ok_or_else(|| anyhow::anyhow!("usage: fill-log <data-dir> [events] [arms] [tail]"))?,
    );
    let events: u64 = args.next().map_or(Ok(1_000_000), |v| v.parse())?;
    let arms: u64 = args.next().map_or(Ok(150), |v| v.parse())?;
    let tail: u64 = args.next().map_or(Ok(5_000), |v| v.parse())?;
    let log = EventLog::open(dir.join("log"), Options::default())?;
    let mut snapshots = Snapshotter::open(dir.join("snapshots"), SnapshotOptions::default())?;
    let mut state = State::default();
    let started = std::time::Instant::now();
    let mut written = 0u64;
    let mut version = vec![0u64; arms as usize];
    while written < events {
        let n = (events - written).min(1_000);
        let mut batch = Vec::new();
        let mut payloads = Vec::new();
        for k in 0..n {
            let a = ((written + k) % arms) as usize;
            version[a] += 1;
            let arm = format!("arm-{:03}", a + 1);
            let id = format!("fill-{}", version[a]);
            let payload = PlanPayload {
                arm: arm.clone(),
                id: id.clone(),
                version: version[a],
                joints: vec![0.001 * (version[a] % 100) as f64; 6],
                timestamp: "2026-01-01T00:00:00.000Z".into(),
            };
            let bytes = serde_json::to_vec(&payload)?;
            batch.push(AppendRequest::new(
                arm.clone(),
                plan_event_id(&arm, &id, version[a]),
                KIND_PLAN,
                bytes.clone(),
            ));
            payloads.push((arm, bytes));
        }
        let appended = log.append_batch(batch)?;
        for ((arm, bytes), a) in payloads.into_iter().zip(appended) {
            state.arms.entry(arm).or_default().apply(KIND_PLAN, &bytes, a.position, a.hash);
            state.position = a.position;
            state.hash = a.hash;
        }
        written += n;
        if written == events.saturating_sub(tail) {
            snapshots.save(&state, LogPoint { position: state.position, hash: state.hash })?;
        }
    }
    log.close()?;
    println!(
        "{written} events over {arms} arms, snapshot {tail} before the end, in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
