//! [`Controller`]: the hosted arms, their durable state (folded from the event log) and
//! live state (folded from sensor frames), plan updates and cycles as single durable
//! events, reading events back, the per-sample safety check and the watchdog tick.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use event_log::{AppendRequest, Durability, Event, EventLog};
use serde_json::{Value, json};
use service_kit::ApiError;
use snapshotter::{RecoveryReport, SnapshotOptions, Snapshotter};
use tokio::sync::mpsc;
use wire::json::{EstopRequest, PlanAck, PlanUpdate};

use crate::clock;
use crate::safety::{SafetyCore, Verdict};
use crate::state::{
    AGGREGATE_BATCH_ARMS_MAX, AGGREGATE_STREAM, Ack, AggregateBatch, AggregatePayload, ArmDurable,
    CALLER_ID_BYTES_MAX, CyclePayload, KIND_AGGREGATE, KIND_CYCLE, KIND_PLAN, PlanPayload, State,
    cycle_event_id, plan_event_id,
};

/// Most events one `GET /arms/{arm}/events` returns.
pub const EVENTS_LIMIT_MAX: usize = 1_000;
/// Events returned when no `limit` is given.
pub const EVENTS_LIMIT_DEFAULT: usize = 100;
/// Depth of the queue of e-stop requests waiting to be sent to the quorum.
pub const ESTOP_QUEUE_DEPTH: usize = 64;

/// What the controller needs from its configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Hosted arm ids.
    pub arms: Vec<String>,
    /// Joints per arm.
    pub dof: usize,
    /// Largest |joint| accepted in a plan or seen in a sample (rad).
    pub joint_limit_rad: f64,
    /// Largest deviation of a sample from the plan before the arm stops (rad).
    pub deviation_limit_rad: f64,
    /// Stop an arm whose sensors fell silent this long after speaking (None: never).
    pub sensor_timeout: Option<Duration>,
    /// Deadman timeout of the safety heartbeat.
    pub deadman: Duration,
    /// Sensor aggregates are committed this often (None: never).
    pub aggregate_interval: Option<Duration>,
    /// This instance's id (source of its e-stop requests).
    pub node_id: String,
    /// Data directory (`log/` and `snapshots/` inside).
    pub data_dir: PathBuf,
    /// Event-log options.
    pub log_options: event_log::Options,
    /// Snapshot options (compaction is driven by the controller, not the snapshotter).
    pub snapshot_options: SnapshotOptions,
}

/// Live, not persisted per sample: what the sensors said lately.
#[derive(Debug, Default)]
struct Live {
    samples: u64,
    last_joints: Vec<f64>,
    last_ts_us: u64,
    last_at: Option<Instant>,
    last_seq: Option<u64>,
    seq_gaps: u64,
    plan: Option<(u64, Vec<f64>)>,
    deviation_rad: f64,
    rate_count: u64,
    samples_per_s: f64,
    window: Option<AggregatePayload>,
}

/// One hosted arm.
#[derive(Debug)]
pub struct Arm {
    /// Its id (= its stream in the log).
    pub id: String,
    /// Serializes this arm's plan updates and cycles (held across the durable append).
    gate: tokio::sync::Mutex<()>,
    durable: Mutex<ArmDurable>,
    live: Mutex<Live>,
    stopped: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Outcome of one sensor frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ingest {
    /// Folded; `stopped` says the per-sample check just latched the arm.
    Folded {
        /// Samples folded.
        samples: usize,
        /// The check latched a stop (an e-stop request was queued).
        stopped: bool,
    },
    /// Not a usable frame; the reason is a metric label.
    Malformed(&'static str),
    /// For an arm this controller does not host.
    UnknownArm,
}

/// The controller: arms, log, safety.
#[derive(Debug)]
pub struct Controller {
    settings: Settings,
    log: EventLog,
    arms: Vec<Arm>,
    by_id: HashMap<String, usize>,
    safety: Mutex<SafetyCore>,
    estop_tx: mpsc::Sender<EstopRequest>,
    frames: std::sync::atomic::AtomicU64,
}

/// Sensor frames between two samples of the sample-to-state lag histogram.
pub const LAG_SAMPLE_EVERY_FRAMES: u64 = 16;

/// What opening produced besides the controller.
#[derive(Debug)]
pub struct Opened {
    /// The controller.
    pub controller: Arc<Controller>,
    /// The recovered state (the snapshot thread's starting point).
    pub state: State,
    /// The snapshotter, positioned after recovery.
    pub snapshotter: Snapshotter,
    /// What recovery did.
    pub report: RecoveryReport,
    /// E-stop requests the controller wants sent.
    pub estop_rx: mpsc::Receiver<EstopRequest>,
}

fn log_error(err: event_log::Error) -> ApiError {
    match err {
        event_log::Error::Failed | event_log::Error::Closed | event_log::Error::Io { .. } => {
            tracing::error!(error = %err, "event log cannot take writes");
            ApiError::unavailable("log_unavailable", "the event log cannot take writes")
        }
        other => ApiError::internal(other),
    }
}

impl Controller {
    /// Opens the log and snapshots under the data dir and recovers the state (blocking).
    pub fn open(settings: Settings) -> anyhow::Result<Opened> {
        let started = Instant::now();
        let log = EventLog::open(settings.data_dir.join("log"), settings.log_options.clone())?;
        let mut snapshotter = Snapshotter::open(
            settings.data_dir.join("snapshots"),
            settings.snapshot_options.clone(),
        )?;
        let (state, mut report): (State, RecoveryReport) = snapshotter.recover(&log)?;
        report.elapsed = started.elapsed();
        let arms = settings
            .arms
            .iter()
            .map(|id| {
                let durable = state.arms.get(id).cloned().unwrap_or_default();
                let live = Live {
                    plan: durable.plan.as_ref().map(|(p, _, _)| (p.version, p.joints.clone())),
                    ..Live::default()
                };
                Arm {
                    id: id.clone(),
                    gate: tokio::sync::Mutex::new(()),
                    durable: Mutex::new(durable),
                    live: Mutex::new(live),
                    stopped: AtomicBool::new(true),
                }
            })
            .collect::<Vec<_>>();
        let by_id = settings.arms.iter().enumerate().map(|(i, id)| (id.clone(), i)).collect();
        let (estop_tx, estop_rx) = mpsc::channel(ESTOP_QUEUE_DEPTH);
        let safety = Mutex::new(SafetyCore::new(arms.len(), settings.deadman));
        let controller = Arc::new(Controller {
            settings,
            log,
            arms,
            by_id,
            safety,
            estop_tx,
            frames: Default::default(),
        });
        Ok(Opened { controller, state, snapshotter, report, estop_rx })
    }

    /// The event log.
    pub fn log(&self) -> &EventLog {
        &self.log
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Hosted arm ids.
    pub fn arm_ids(&self) -> impl Iterator<Item = &str> {
        self.arms.iter().map(|a| a.id.as_str())
    }

    fn arm_index(&self, arm: &str) -> Result<usize, ApiError> {
        self.by_id.get(arm).copied().ok_or_else(|| {
            ApiError::new(StatusCode::NOT_FOUND, "unknown_arm", format!("no arm {arm:?} here"))
        })
    }

    /// Feeds the safety core (trip, state) under its lock.
    pub fn with_safety<R>(&self, f: impl FnOnce(&mut SafetyCore) -> R) -> R {
        f(&mut lock(&self.safety))
    }

    fn verdict(&self, arm: usize, now: Instant) -> Verdict {
        lock(&self.safety).verdict(arm, now)
    }

    /// Checks a plan update against the arm's shape and limits (no state needed).
    pub fn validate_plan(&self, update: &PlanUpdate) -> Result<(), ApiError> {
        let bad = |code, msg: String| Err(ApiError::bad_request(code, msg));
        if update.id.is_empty() || update.id.len() > CALLER_ID_BYTES_MAX {
            return bad("invalid_id", format!("id must be 1..={CALLER_ID_BYTES_MAX} bytes"));
        }
        if update.version == 0 {
            return bad("invalid_version", "version must be at least 1".into());
        }
        if update.joints.len() != self.settings.dof {
            return bad(
                "wrong_joint_count",
                format!("{} joints given, this arm has {}", update.joints.len(), self.settings.dof),
            );
        }
        let limit = self.settings.joint_limit_rad;
        for (i, j) in update.joints.iter().enumerate() {
            if !j.is_finite() {
                return bad("non_finite_joint", format!("joint {i} is not a finite number"));
            }
            if j.abs() > limit {
                return bad(
                    "joint_out_of_limits",
                    format!("joint {i} = {j} rad is beyond the ±{limit} rad limit"),
                );
            }
        }
        if let Some(ts) = &update.timestamp
            && !clock::is_rfc3339(ts)
        {
            return bad("invalid_timestamp", "timestamp must be RFC 3339".into());
        }
        Ok(())
    }

    /// Validates, version-checks and commits a plan update as one durable event; the ack
    /// comes back only once it is durable. Runs as its own task, so a caller that goes away
    /// (timeout, disconnect) never leaves an append half-applied.
    pub async fn update_plan(
        self: &Arc<Self>,
        arm: &str,
        update: PlanUpdate,
    ) -> Result<PlanAck, ApiError> {
        let idx = self.arm_index(arm)?;
        self.validate_plan(&update)?;
        let this = self.clone();
        tokio::spawn(async move { this.commit_plan(idx, update).await })
            .await
            .map_err(ApiError::internal)?
    }

    async fn commit_plan(&self, idx: usize, update: PlanUpdate) -> Result<PlanAck, ApiError> {
        let arm = &self.arms[idx];
        let _gate = arm.gate.lock().await;
        let ack_of = |ack: &Ack| PlanAck {
            arm: arm.id.clone(),
            id: ack.id.clone(),
            version: ack.version,
            position: ack.position,
            hash: hex::encode(ack.hash),
        };
        {
            let durable = lock(&arm.durable);
            if let Some(ack) = durable.plan_retry(&update.id, update.version) {
                metrics::counter!("keel_arm_plan_retries_total").increment(1);
                return Ok(ack_of(ack));
            }
            let current = durable.plan_version();
            if update.version <= current {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "stale_version",
                    format!("version {} is not above the current {current}", update.version),
                )
                .with("current", current));
            }
        }
        if let Verdict::SafeStop(reason) = self.verdict(idx, Instant::now()) {
            return Err(ApiError::new(
                StatusCode::LOCKED,
                "safe_stop",
                format!("arm {} is in safe stop: {reason}", arm.id),
            )
            .with("reason", reason));
        }
        let payload = PlanPayload {
            arm: arm.id.clone(),
            id: update.id.clone(),
            version: update.version,
            joints: update.joints,
            timestamp: update.timestamp.unwrap_or_else(|| clock::rfc3339_from_us(clock::now_us())),
        };
        let bytes = serde_json::to_vec(&payload).map_err(ApiError::internal)?;
        let event_id = plan_event_id(&arm.id, &payload.id, payload.version);
        let request = AppendRequest::new(arm.id.clone(), event_id, KIND_PLAN, bytes.clone());
        let appended = self.log.append_async(request).await.map_err(log_error)?;
        // Plans fold idempotently by version, so applying a log-level retry is harmless.
        lock(&arm.durable).apply(KIND_PLAN, &bytes, appended.position, appended.hash);
        lock(&arm.live).plan = Some((payload.version, payload.joints));
        metrics::counter!("keel_arm_commits_total", "kind" => KIND_PLAN).increment(1);
        tracing::debug!(arm = %arm.id, version = payload.version, position = appended.position, "plan committed");
        Ok(ack_of(&Ack {
            id: payload.id,
            version: payload.version,
            position: appended.position,
            hash: appended.hash,
        }))
    }

    /// Records a completed cycle as one durable event (idempotent by its id).
    pub async fn record_cycle(self: &Arc<Self>, arm: &str, id: String) -> Result<Value, ApiError> {
        let idx = self.arm_index(arm)?;
        if id.is_empty() || id.len() > CALLER_ID_BYTES_MAX {
            return Err(ApiError::bad_request(
                "invalid_id",
                format!("id must be 1..={CALLER_ID_BYTES_MAX} bytes"),
            ));
        }
        let this = self.clone();
        tokio::spawn(async move { this.commit_cycle(idx, id).await })
            .await
            .map_err(ApiError::internal)?
    }

    async fn commit_cycle(&self, idx: usize, id: String) -> Result<Value, ApiError> {
        let arm = &self.arms[idx];
        let _gate = arm.gate.lock().await;
        let body = |ack: &Ack| json!({"arm": arm.id, "id": ack.id, "position": ack.position, "hash": hex::encode(ack.hash)});
        if let Some(ack) = lock(&arm.durable).cycle_retry(&id) {
            return Ok(body(ack));
        }
        let payload = CyclePayload {
            arm: arm.id.clone(),
            id: id.clone(),
            timestamp: clock::rfc3339_from_us(clock::now_us()),
        };
        let bytes = serde_json::to_vec(&payload).map_err(ApiError::internal)?;
        let request = AppendRequest::new(
            arm.id.clone(),
            cycle_event_id(&arm.id, &id),
            KIND_CYCLE,
            bytes.clone(),
        );
        // Cycles of one arm are serialized by the gate: an append that lands above the head
        // seen before it is new; one at or below it is the log recognising an older retry.
        let head_before = self.log.head().position;
        let appended = self.log.append_async(request).await.map_err(log_error)?;
        if appended.position > head_before {
            lock(&arm.durable).apply(KIND_CYCLE, &bytes, appended.position, appended.hash);
            metrics::counter!("keel_arm_commits_total", "kind" => KIND_CYCLE).increment(1);
        }
        Ok(body(&Ack { id, version: 0, position: appended.position, hash: appended.hash }))
    }

    /// `GET /arms/{arm}/plan` body.
    pub fn plan(&self, arm: &str) -> Result<Value, ApiError> {
        let idx = self.arm_index(arm)?;
        let durable = lock(&self.arms[idx].durable);
        let (plan, position, hash) = durable
            .plan
            .as_ref()
            .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "no_plan", "no plan yet"))?;
        Ok(json!({
            "arm": plan.arm, "id": plan.id, "version": plan.version, "joints": plan.joints,
            "timestamp": plan.timestamp, "position": position, "hash": hex::encode(hash),
        }))
    }

    /// `GET /arms/{arm}/status` body.
    pub fn status(&self, arm: &str) -> Result<Value, ApiError> {
        let idx = self.arm_index(arm)?;
        let now = Instant::now();
        let (state, reason) = match self.verdict(idx, now) {
            Verdict::Running => ("running", Value::Null),
            Verdict::SafeStop(reason) => ("safe_stop", Value::from(reason)),
        };
        let (plan_version, cycles) = {
            let d = lock(&self.arms[idx].durable);
            (d.plan_version(), d.cycles)
        };
        let live = lock(&self.arms[idx].live);
        Ok(json!({
            "arm": arm,
            "state": state,
            "reason": reason,
            "plan_version": plan_version,
            "samples": live.samples,
            "last_sample_age_ms": live.last_at.map(|at| now.saturating_duration_since(at).as_millis() as u64),
            "samples_per_s": live.samples_per_s,
            "deviation_rad": live.deviation_rad,
            "last_sample": if live.samples > 0 { Value::from(live.last_joints.clone()) } else { Value::Null },
            "sequence_gaps": live.seq_gaps,
            "cycles": cycles,
        }))
    }

    /// Up to `limit` events of `arm` at log positions from `from` on (blocking: reads files).
    pub fn events(&self, arm: &str, from: u64, limit: usize) -> Result<Value, ApiError> {
        self.arm_index(arm)?;
        let limit = limit.clamp(1, EVENTS_LIMIT_MAX);
        let version = self.first_version_at(arm, from).map_err(ApiError::internal)?;
        let events = self.log.read_stream(arm, version, limit).map_err(ApiError::internal)?;
        let head = self.log.head();
        Ok(json!({
            "events": events.iter().map(event_json).collect::<Vec<_>>(),
            "first_position": head.first_position,
            "head": head.position,
        }))
    }

    /// The smallest stream version of `arm` whose event is stored and sits at `from` or
    /// later (`from` at or above the compaction floor). Compaction removes a prefix, so
    /// "stored and at `from` or later" is false then true over the versions: a binary search.
    fn first_version_at(&self, arm: &str, from: u64) -> event_log::Result<u64> {
        let from = from.max(self.log.head().first_position);
        let (mut lo, mut hi) = (1u64, self.log.stream_version(arm)? + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.log.read_stream(arm, mid, 1)?.first() {
                Some(e) if e.stream_version == mid && e.position >= from => hi = mid,
                Some(e) if e.position < from => lo = e.stream_version + 1,
                // Compacted (the index may still list it until its next prune).
                _ => lo = mid + 1,
            }
        }
        Ok(lo)
    }

    /// Folds one sensor frame from `edge.arm.{subject_arm}.sensor` and runs the per-sample
    /// check; a failed check latches the arm and queues an e-stop request.
    pub fn ingest(&self, subject_arm: &str, bytes: &[u8], now: Instant, now_us: u64) -> Ingest {
        let Some(&idx) = self.by_id.get(subject_arm) else { return Ingest::UnknownArm };
        let frame = match wire::decode_sensor_frame(bytes) {
            Ok(frame) => frame,
            Err(_) => return Ingest::Malformed("undecodable"),
        };
        if !frame.arm.is_empty() && frame.arm != subject_arm {
            return Ingest::Malformed("arm_mismatch");
        }
        if frame.samples.is_empty() {
            return Ingest::Malformed("no_samples");
        }
        let dof = self.settings.dof;
        if frame.samples.iter().any(|s| s.joints.len() != dof) {
            return Ingest::Malformed("joint_count");
        }
        let arm = &self.arms[idx];
        let mut fault: Option<String> = None;
        {
            let mut live = lock(&arm.live);
            if let Some(last) = live.last_seq
                && frame.seq > last + 1
            {
                live.seq_gaps += frame.seq - last - 1;
            }
            live.last_seq = Some(frame.seq);
            for sample in &frame.samples {
                let (deviation, problem) = check_sample(
                    &sample.joints,
                    self.settings.joint_limit_rad,
                    live.plan.as_ref(),
                    self.settings.deviation_limit_rad,
                );
                if fault.is_none() {
                    fault = problem;
                }
                live.samples += 1;
                live.rate_count += 1;
                live.deviation_rad = deviation;
                live.last_ts_us = sample.ts_us;
                live.last_joints.clone_from(&sample.joints);
                fold_window(&mut live.window, &arm.id, sample.ts_us, &sample.joints, deviation);
            }
            live.last_at = Some(now);
        }
        let n = self.frames.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(LAG_SAMPLE_EVERY_FRAMES)
            && let Some(last) = frame.samples.last()
        {
            let lag_us = now_us.saturating_sub(last.ts_us);
            metrics::histogram!("keel_arm_sensor_lag_seconds").record(lag_us as f64 / 1e6);
        }
        let stopped = match fault {
            Some(reason) => self.stop_arm(idx, &reason, now_us, "sensor_check"),
            None => false,
        };
        Ingest::Folded { samples: frame.samples.len(), stopped }
    }

    /// Latches arm `idx` for its own reason and, the first time, queues an e-stop request.
    fn stop_arm(&self, idx: usize, reason: &str, now_us: u64, cause: &'static str) -> bool {
        let arm = &self.arms[idx];
        let reason = format!("{}: {reason}", arm.id);
        if !lock(&self.safety).latch(idx, &reason, now_us) {
            return false;
        }
        tracing::warn!(arm = %arm.id, reason, "arm stopped by its own check; requesting e-stop");
        metrics::counter!("keel_arm_safety_stops_total", "cause" => cause).increment(1);
        let request = EstopRequest {
            reason,
            source: format!("arm-controller/{}", self.settings.node_id),
            request_id: uuid::Uuid::now_v7().to_string(),
        };
        if self.estop_tx.try_send(request).is_err() {
            metrics::counter!("keel_arm_estop_requests_total", "outcome" => "queue_full")
                .increment(1);
        }
        true
    }

    /// The watchdog: latches arms whose sensors fell silent, and logs and exports every
    /// arm's running/safe-stop transition. Called every few milliseconds.
    pub fn tick(&self, now: Instant, now_us: u64) {
        let mut stopped_arms = 0u64;
        for (idx, arm) in self.arms.iter().enumerate() {
            if let Some(timeout) = self.settings.sensor_timeout {
                let silent = lock(&arm.live)
                    .last_at
                    .map(|at| now.saturating_duration_since(at))
                    .filter(|d| *d > timeout);
                if let Some(silent) = silent {
                    let reason = format!("sensors silent for {} ms", silent.as_millis());
                    self.stop_arm(idx, &reason, now_us, "sensor_stale");
                }
            }
            let verdict = self.verdict(idx, now);
            let stopped = verdict.is_stopped();
            stopped_arms += u64::from(stopped);
            if arm.stopped.swap(stopped, Ordering::Relaxed) != stopped {
                match &verdict {
                    Verdict::SafeStop(reason) => {
                        tracing::warn!(arm = %arm.id, reason, "arm in safe stop")
                    }
                    Verdict::Running => tracing::info!(arm = %arm.id, "arm running"),
                }
                metrics::gauge!("keel_arm_safe_stop", "arm" => arm.id.clone())
                    .set(f64::from(u8::from(stopped)));
            }
        }
        metrics::gauge!("keel_arm_safe_stop_arms").set(stopped_arms as f64);
    }

    /// Turns the sample counts since the last call into per-second rates (every second).
    pub fn update_rates(&self, elapsed: Duration) -> u64 {
        let secs = elapsed.as_secs_f64().max(1e-3);
        let mut total = 0;
        for arm in &self.arms {
            let mut live = lock(&arm.live);
            total += live.rate_count;
            live.samples_per_s = live.rate_count as f64 / secs;
            live.rate_count = 0;
        }
        metrics::gauge!("keel_arm_sensor_samples_per_second").set(total as f64 / secs);
        total
    }

    /// Commits the sensor aggregates of the interval just ended, as batch events in
    /// [`AGGREGATE_STREAM`] (durable within the interval, never on an acknowledgement path),
    /// and returns the pending appends with what they carry.
    pub fn flush_aggregates(
        &self,
    ) -> Vec<(event_log::Pending<event_log::Appended>, AggregateBatch)> {
        let Some(interval) = self.settings.aggregate_interval else { return Vec::new() };
        let windows: Vec<AggregatePayload> =
            self.arms.iter().filter_map(|arm| lock(&arm.live).window.take()).collect();
        let mut pending = Vec::new();
        for chunk in windows.chunks(AGGREGATE_BATCH_ARMS_MAX) {
            let batch = AggregateBatch { arms: chunk.to_vec() };
            let bytes = batch.encode();
            let request = AppendRequest::new(
                AGGREGATE_STREAM,
                *uuid::Uuid::now_v7().as_bytes(),
                KIND_AGGREGATE,
                bytes,
            )
            .with_durability(Durability::Within(interval));
            pending.push((self.log.append_async(request), batch));
        }
        pending
    }

    /// Folds a committed aggregate batch into the arms' durable state.
    pub fn aggregates_committed(&self, batch: &AggregateBatch) {
        for aggregate in &batch.arms {
            if let Some(&idx) = self.by_id.get(&aggregate.arm) {
                lock(&self.arms[idx].durable).apply_aggregate(aggregate);
            }
        }
        metrics::counter!("keel_arm_commits_total", "kind" => KIND_AGGREGATE).increment(1);
    }
}

fn fold_window(
    window: &mut Option<AggregatePayload>,
    arm: &str,
    ts_us: u64,
    joints: &[f64],
    deviation: f64,
) {
    let w = window.get_or_insert_with(|| AggregatePayload {
        arm: arm.to_owned(),
        samples: 0,
        from_ts_us: ts_us,
        to_ts_us: ts_us,
        joints_min: joints.to_vec(),
        joints_max: joints.to_vec(),
        joints_last: Vec::new(),
        deviation_max_rad: 0.0,
    });
    w.samples += 1;
    w.from_ts_us = w.from_ts_us.min(ts_us);
    w.to_ts_us = w.to_ts_us.max(ts_us);
    for (i, &j) in joints.iter().enumerate() {
        if j.is_finite() {
            w.joints_min[i] = w.joints_min[i].min(j);
            w.joints_max[i] = w.joints_max[i].max(j);
        }
    }
    w.joints_last.clear();
    w.joints_last.extend_from_slice(joints);
    if deviation.is_finite() {
        w.deviation_max_rad = w.deviation_max_rad.max(deviation);
    }
}

/// The per-sample safety check: returns the deviation from the plan and the first problem.
pub fn check_sample(
    joints: &[f64],
    limit_rad: f64,
    plan: Option<&(u64, Vec<f64>)>,
    deviation_limit_rad: f64,
) -> (f64, Option<String>) {
    let mut problem = None;
    let mut deviation: f64 = 0.0;
    for (i, &j) in joints.iter().enumerate() {
        if !j.is_finite() {
            problem.get_or_insert_with(|| format!("sensor fault: joint {i} reads {j}"));
            continue;
        }
        if j.abs() > limit_rad {
            problem.get_or_insert_with(|| {
                format!("joint {i} at {j:.4} rad is beyond the ±{limit_rad} rad limit")
            });
        }
        if let Some((_, target)) = plan {
            deviation = deviation.max((j - target[i]).abs());
        }
    }
    if problem.is_none()
        && deviation > deviation_limit_rad
        && let Some((version, _)) = plan
    {
        problem = Some(format!(
            "deviates {deviation:.4} rad from plan v{version} (limit {deviation_limit_rad} rad)"
        ));
    }
    (deviation, problem)
}

/// One event as the API shows it.
pub fn event_json(e: &Event) -> Value {
    json!({
        "position": e.position,
        "stream": e.stream,
        "stream_version": e.stream_version,
        "id": hex::encode(e.event_id),
        "kind": e.kind,
        "ts": e.timestamp_ms,
        "prev_hash": hex::encode(e.prev_hash),
        "hash": hex::encode(e.hash),
        "payload": serde_json::from_slice::<Value>(&e.payload).unwrap_or(Value::Null),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_check_finds_limits_faults_and_deviation() {
        let plan = (3, vec![0.0, 0.0]);
        assert_eq!(check_sample(&[0.1, -0.1], 1.0, Some(&plan), 0.5), (0.1, None));
        let (_, p) = check_sample(&[1.5, 0.0], 1.0, None, 0.5);
        assert!(p.unwrap().contains("joint 0"));
        let (_, p) = check_sample(&[0.0, f64::NAN], 1.0, None, 0.5);
        assert!(p.unwrap().contains("sensor fault"));
        let (d, p) = check_sample(&[0.0, 0.7], 1.0, Some(&plan), 0.5);
        assert!((d - 0.7).abs() < 1e-9);
        assert!(p.unwrap().contains("plan v3"));
    }
}
