//! arm-controller: per-arm motion plans, sensor ingest and fail-safe stop on the event
//! log. `run` wires config, readiness, recovery, NATS handlers, outboxes and the router.
//!
//! What is durable: plan updates and cycles (one `immediate` event each, acknowledged after
//! the fsync), and every `--aggregate-interval-ms` one event (stream `_sensors`) with a
//! sensor aggregate per arm (durable within that interval). Sensor samples themselves are
//! folded in memory only.
//!
//! Data dir layout: `log/` (event log: segments + `index.redb` with the outbox cursors) and
//! `snapshots/`.

pub mod clock;
pub mod controller;
pub mod http;
pub mod nats;
pub mod outbox;
pub mod safety;
pub mod snapshots;
pub mod state;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use service_kit::shutdown::Shutdown;
use service_kit::{CommonArgs, ComponentState, Readiness, Role};

pub use controller::{Controller, Settings};
pub use http::{AppState, router};

/// Most arms one controller hosts.
pub const ARMS_MAX: usize = 1024;
/// Most joints per arm.
pub const DOF_MAX: u8 = 16;

/// arm-controller flags (CONTRACT.md).
#[derive(Debug, Clone, Parser)]
#[command(name = "arm-controller", version, about = "Motion plans, sensor ingest, fail-safe stop")]
pub struct Config {
    /// Flags shared by every service.
    #[command(flatten)]
    pub common: CommonArgs,

    /// Arm ids hosted here, comma-separated (e.g. `arm-001,arm-002`).
    #[arg(long, env = "ARMS", value_delimiter = ',', conflicts_with = "arm_count")]
    pub arms: Vec<String>,

    /// Host `N` arms named `arm-001`.. (instead of `--arms`).
    #[arg(long, env = "ARM_COUNT", value_parser = clap::value_parser!(u32).range(1..=ARMS_MAX as i64))]
    pub arm_count: Option<u32>,

    /// Joints per arm.
    #[arg(long, env = "DOF", default_value_t = 6, value_parser = clap::value_parser!(u8).range(1..=DOF_MAX as i64))]
    pub dof: u8,

    /// Deadman: stop an arm when no fresh safety heartbeat arrived for this long (ms).
    #[arg(long, env = "SAFETY_TIMEOUT_MS", default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub safety_timeout_ms: u64,

    /// Largest |joint| (rad) a plan may ask for and a sensor sample may show.
    #[arg(long, env = "JOINT_LIMIT_RAD", default_value_t = std::f64::consts::PI)]
    pub joint_limit_rad: f64,

    /// A sample further than this (rad, any joint) from the plan stops the arm.
    #[arg(long, env = "DEVIATION_LIMIT_RAD", default_value_t = 0.5)]
    pub deviation_limit_rad: f64,

    /// An arm whose sensors fall silent this long (ms) after speaking stops; 0: never.
    #[arg(long, env = "SENSOR_TIMEOUT_MS", default_value_t = 250, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub sensor_timeout_ms: u64,

    /// Each arm's sensor aggregate is committed this often (ms); 0: never.
    #[arg(long, env = "AGGREGATE_INTERVAL_MS", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub aggregate_interval_ms: u64,

    /// Snapshot after this many events.
    #[arg(long, env = "SNAPSHOT_EVERY_EVENTS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_every_events: u64,

    /// Snapshot at least this often (s) when anything changed.
    #[arg(long, env = "SNAPSHOT_EVERY_S", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub snapshot_every_s: u64,

    /// Events kept in the log below the newest snapshot when compacting.
    #[arg(long, env = "KEEP_TAIL_EVENTS", default_value_t = 1_000)]
    pub keep_tail_events: u64,

    /// Size of each preallocated log segment (bytes); compaction removes whole segments.
    #[arg(long, env = "LOG_SEGMENT_BYTES", default_value_t = event_log::DEFAULT_SEGMENT_BYTES,
          value_parser = clap::value_parser!(u64).range(1_048_576..=1_073_741_824))]
    pub log_segment_bytes: u64,
}

/// Largest `--joint-limit-rad` accepted.
pub const JOINT_LIMIT_RAD_MAX: f64 = 100.0;
/// How long an event waits for its (non-durable) index write. The index is most of the
/// controller's device bytes at the case-study load: each write rewrites the B-tree pages
/// its events touch, so fewer, larger writes cost fewer pages (reads see unwritten entries
/// from memory).
pub const INDEX_FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// Time between durable index checkpoints; with [`INDEX_CHECKPOINT_EVENTS`], what bounds the
/// log tail re-indexed on open after a crash.
pub const INDEX_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);
/// Events between durable index checkpoints (at the 2 M events/s replay measured in
/// BENCHMARKS, re-indexing them on open takes about 5 ms).
pub const INDEX_CHECKPOINT_EVENTS: u64 = 10_000;
/// How often the watchdog runs (sensor silence, safety transitions).
pub const WATCHDOG_TICK_MS: u64 = 5;
/// How long shutdown waits for the background tasks.
pub const STOP_TIMEOUT_MS: u64 = 3_000;

impl Config {
    /// The arm ids this controller hosts (`arm-001` when neither flag is given).
    pub fn arm_ids(&self) -> Vec<String> {
        if !self.arms.is_empty() {
            return self.arms.clone();
        }
        (1..=self.arm_count.unwrap_or(1)).map(|i| format!("arm-{i:03}")).collect()
    }

    /// Checks what clap cannot and prepares the data dir; exits 64 when invalid.
    pub fn validate_or_exit(&self) {
        if let Err(reason) = self.validate() {
            service_kit::config::exit_invalid(&reason);
        }
        service_kit::ensure_data_dir(&self.common.data_dir);
    }

    fn validate(&self) -> Result<(), String> {
        let ids = self.arm_ids();
        if ids.len() > ARMS_MAX {
            return Err(format!("--arms: at most {ARMS_MAX} arms"));
        }
        for (flag, value) in [
            ("--joint-limit-rad", self.joint_limit_rad),
            ("--deviation-limit-rad", self.deviation_limit_rad),
        ] {
            if !(value.is_finite() && value > 0.0 && value <= JOINT_LIMIT_RAD_MAX) {
                return Err(format!("{flag}: must be a number in (0, {JOINT_LIMIT_RAD_MAX}]"));
            }
        }
        for (i, id) in ids.iter().enumerate() {
            if !wire::subjects::is_valid_token(id) {
                return Err(format!(
                    "--arms: {id:?} is not a valid arm id ([A-Za-z0-9_-], 1..=64)"
                ));
            }
            if id.starts_with('_') {
                return Err(format!("--arms: {id:?} may not start with '_' (reserved)"));
            }
            if ids[..i].contains(id) {
                return Err(format!("--arms: {id:?} is listed twice"));
            }
        }
        Ok(())
    }

    /// What the controller takes from the flags.
    pub fn settings(&self) -> Settings {
        let ms = |v: u64| (v > 0).then(|| Duration::from_millis(v));
        let log_options = event_log::Options {
            segment_bytes: self.log_segment_bytes,
            index_flush_interval: INDEX_FLUSH_INTERVAL,
            checkpoint_interval: INDEX_CHECKPOINT_INTERVAL,
            checkpoint_events: INDEX_CHECKPOINT_EVENTS,
            ..Default::default()
        };
        let snapshot_options = snapshotter::SnapshotOptions {
            policy: snapshotter::SnapshotPolicy {
                every_events: Some(self.snapshot_every_events),
                every: Some(Duration::from_secs(self.snapshot_every_s)),
                ..Default::default()
            },
            // Compaction is the controller's: it must respect the outbox cursors.
            compact: false,
            keep_tail_events: self.keep_tail_events,
            ..Default::default()
        };
        Settings {
            arms: self.arm_ids(),
            dof: usize::from(self.dof),
            joint_limit_rad: self.joint_limit_rad,
            deviation_limit_rad: self.deviation_limit_rad,
            sensor_timeout: ms(self.sensor_timeout_ms),
            deadman: Duration::from_millis(self.safety_timeout_ms),
            aggregate_interval: ms(self.aggregate_interval_ms),
            node_id: self.common.node_id.clone(),
            data_dir: self.common.data_dir.clone(),
            log_options,
            snapshot_options,
        }
    }
}

/// Records one plan update's latency and outcome.
pub fn record_plan_metrics(transport: &'static str, status: u16, elapsed: Duration) {
    metrics::counter!("keel_arm_plan_updates_total", "transport" => transport, "status" => status.to_string())
        .increment(1);
    if status == 200 {
        metrics::histogram!("keel_arm_plan_update_seconds", "transport" => transport)
            .record(elapsed.as_secs_f64());
    }
}

fn process_write_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines().find_map(|l| l.strip_prefix("write_bytes:")).and_then(|v| v.trim().parse().ok())
}

/// The watchdog, rates, aggregates and gauges, until `stop`.
async fn run_ticker(ctl: Arc<Controller>, readiness: Readiness, stop: Shutdown) {
    let mut interval = tokio::time::interval(Duration::from_millis(WATCHDOG_TICK_MS));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_rates = Instant::now();
    let mut last_aggregate = Instant::now();
    let mut safety_summary = "";
    let mut last_stats = ctl.log().stats();
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.wait() => return,
        }
        let now = Instant::now();
        ctl.tick(now, clock::now_us());
        let summary = ctl.with_safety(|s| s.summary(now));
        if summary != safety_summary {
            safety_summary = summary;
            let state =
                if summary == "ok" { ComponentState::Ok } else { ComponentState::Down(summary) };
            readiness.set("safety", state);
        }
        if now.duration_since(last_rates) >= Duration::from_secs(1) {
            ctl.update_rates(now.duration_since(last_rates));
            last_rates = now;
            let head = ctl.log().head();
            metrics::gauge!("keel_arm_log_head_position").set(head.position as f64);
            metrics::gauge!("keel_arm_log_bytes").set(head.log_bytes as f64);
            if let Some(bytes) = process_write_bytes() {
                metrics::gauge!("keel_process_write_bytes").set(bytes as f64);
            }
            let stats = ctl.log().stats();
            let commits = stats.group_commits - last_stats.group_commits;
            let events = stats.events - last_stats.events;
            metrics::gauge!("keel_arm_log_group_commits").set(stats.group_commits as f64);
            metrics::gauge!("keel_arm_log_events").set(stats.events as f64);
            metrics::gauge!("keel_arm_log_checkpoints").set(stats.checkpoints as f64);
            if commits > 0 {
                // Mean events per group commit (one fdatasync) over the last second.
                metrics::gauge!("keel_arm_log_batch_events").set(events as f64 / commits as f64);
            }
            last_stats = stats;
        }
        if let Some(every) = ctl.settings().aggregate_interval
            && now.duration_since(last_aggregate) >= every
        {
            last_aggregate = now;
            let pending = ctl.flush_aggregates();
            if !pending.is_empty() {
                let ctl = ctl.clone();
                tokio::spawn(async move {
                    for (pending, batch) in pending {
                        match pending.await {
                            Ok(_) => ctl.aggregates_committed(&batch),
                            Err(err) => {
                                tracing::warn!(error = %err, "sensor aggregate not committed")
                            }
                        }
                    }
                });
            }
        }
    }
}

/// Runs the service until `shutdown` fires: recovers the state (snapshot + log tail) on a
/// blocking thread while it connects to NATS and binds HTTP (503 until recovered), then
/// starts the NATS handlers, outboxes, watchdog and snapshot thread, and turns `recovered`
/// ok. On shutdown: stops taking requests, lets in-flight
/// commits finish, stops the tasks, takes a last snapshot and closes the log.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let started = Instant::now();
    let readiness = Readiness::new();
    readiness.register("recovered", Role::Gating);
    readiness.register("safety", Role::Degrading);
    // Recovery first: it needs neither NATS nor the listener, and nothing else on the way to
    // `/readyz` should add to it.
    let settings = config.settings();
    let opening = tokio::task::spawn_blocking(move || Controller::open(settings));
    let client =
        service_kit::nats::connect(&config.common.nats_url, &config.common.node_id, &readiness)
            .await?;
    let app_state = AppState::new(config.common.body_limit_bytes);
    let app = service_kit::http::with_base(
        router(app_state.clone()),
        readiness.clone(),
        (&config.common).into(),
    );
    let listener = service_kit::http::bind(config.common.http_addr).await?;
    let server = tokio::spawn(service_kit::http::serve_on(listener, app, shutdown.clone()));

    let opened = opening.await??;
    let ctl = opened.controller.clone();
    let report = &opened.report;
    metrics::gauge!("keel_arm_recovery_seconds").set(report.elapsed.as_secs_f64());
    metrics::gauge!("keel_arm_recovery_events_replayed").set(report.events_replayed as f64);
    metrics::gauge!("keel_arm_recovery_snapshot_position").set(report.snapshot_position as f64);
    tracing::info!(
        arms = config.arm_ids().len(),
        dof = config.dof,
        snapshot_position = report.snapshot_position,
        events_replayed = report.events_replayed,
        position = report.position,
        recovery_us = report.elapsed.as_micros() as u64,
        "recovered"
    );

    let (stop_trigger, stop) = Shutdown::new();
    let cursors = Arc::new(outbox::Cursors::default());
    let body_limit = config.common.body_limit_bytes;
    let tasks = vec![
        tokio::spawn(nats::serve_plan_requests(
            ctl.clone(),
            client.clone(),
            body_limit,
            stop.clone(),
        )),
        tokio::spawn(nats::serve_sensors(ctl.clone(), client.clone(), stop.clone())),
        tokio::spawn(nats::serve_safety(ctl.clone(), client.clone(), stop.clone())),
        tokio::spawn(nats::send_estops(client.clone(), opened.estop_rx, stop.clone())),
        tokio::spawn(outbox::run_events(
            ctl.clone(),
            client.clone(),
            cursors.clone(),
            stop.clone(),
        )),
        tokio::spawn(outbox::run_counter(
            ctl.clone(),
            client.clone(),
            cursors.clone(),
            stop.clone(),
        )),
        tokio::spawn(run_ticker(ctl.clone(), readiness.clone(), stop.clone())),
    ];
    let snapshot_stop = Arc::new(AtomicBool::new(false));
    let snapshot_thread = snapshots::spawn(
        snapshots::SnapshotTask {
            controller: ctl.clone(),
            state: opened.state,
            snapshotter: opened.snapshotter,
            cursors,
            keep_tail_events: config.keep_tail_events,
            outboxes: true,
        },
        snapshot_stop.clone(),
    )?;
    app_state.set(ctl.clone());
    readiness.set("recovered", ComponentState::Ok);
    metrics::gauge!("keel_arm_start_to_ready_seconds").set(started.elapsed().as_secs_f64());

    let served = server.await;
    stop_trigger.fire();
    let stop_deadline = Duration::from_millis(STOP_TIMEOUT_MS);
    for task in tasks {
        if tokio::time::timeout(stop_deadline, task).await.is_err() {
            tracing::warn!("a background task did not stop in time");
        }
    }
    snapshot_stop.store(true, Ordering::Relaxed);
    let log = ctl.log().clone();
    tokio::task::spawn_blocking(move || {
        let _ = snapshot_thread.join();
        log.close()
    })
    .await??;
    // Hand over what is buffered for NATS, but never wait on an absent server.
    match tokio::time::timeout(Duration::from_millis(STOP_TIMEOUT_MS), client.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::debug!(error = %err, "nats flush on shutdown"),
        Err(_) => tracing::warn!("nats flush on shutdown timed out"),
    }
    served??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arm_ids_come_from_either_flag_and_are_checked() {
        let cfg = Config::try_parse_from(["a", "--arm-count", "3"]).unwrap();
        assert_eq!(cfg.arm_ids(), ["arm-001", "arm-002", "arm-003"]);
        let cfg = Config::try_parse_from(["a", "--arms", "x,y"]).unwrap();
        assert_eq!(cfg.arm_ids(), ["x", "y"]);
        assert!(Config::try_parse_from(["a", "--arms", "x,x"]).unwrap().validate().is_err());
        assert!(Config::try_parse_from(["a", "--arms", "a.b"]).unwrap().validate().is_err());
        assert!(Config::try_parse_from(["a", "--arms", "x", "--arm-count", "2"]).is_err());
        assert!(Config::try_parse_from(["a", "--dof", "0"]).is_err());
    }
}
