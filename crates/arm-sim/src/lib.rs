//! arm-sim: drives N arms against an arm-controller through its real interfaces: sensor
//! frames on core NATS (`edge.arm.{arm}.sensor`, protobuf), plan updates over HTTP or NATS
//! request, cycles over HTTP. Reports plan/cycle ack latency (p50/p99/p99.9), samples sent
//! and received (the controller's own counter), errors, a live progress line, and, with
//! `--floor`, the floors measured in the same run (raw fdatasync, NATS and HTTP round trips).

pub mod stats;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::Parser;
use futures::StreamExt;
use prost::Message;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;
use wire::{Sample, SensorFrame};

use crate::stats::{Series, Summary};

/// Most arms one simulator drives.
pub const ARMS_MAX: u32 = 4_096;
/// Most samples in one frame.
pub const SAMPLES_PER_FRAME_MAX: u32 = 64;
/// Sensor publisher tasks (arms are spread over them).
pub const SENSOR_SHARDS: usize = 4;
/// Largest |joint| the simulated arms move to (rad), well inside the controller's limit.
pub const JOINT_RANGE_RAD: f64 = 1.0;
/// Largest change of one joint between two plan updates (rad).
pub const PLAN_STEP_RAD: f64 = 0.005;
/// Sensor noise amplitude around the plan (rad).
pub const NOISE_RAD: f64 = 0.001;
/// Time limit of one plan or cycle request.
pub const REQUEST_TIMEOUT_MS: u64 = 10_000;
/// Round trips per floor measurement.
pub const FLOOR_ROUNDS: usize = 1_000;

/// How plan updates are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// `PUT /arms/{arm}/plan`.
    Http,
    /// NATS request `edge.arm.{arm}.plan.update`.
    Nats,
}

/// arm-sim flags.
#[derive(Debug, Clone, Parser, Serialize)]
#[command(name = "arm-sim", version, about = "Load generator for arm-controller")]
pub struct Args {
    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// arm-controller base URL.
    #[arg(long, env = "CONTROLLER_URL", default_value = "http://127.0.0.1:8081")]
    pub controller_url: String,
    /// Arms driven (`arm-001`..), as the controller's `--arm-count`.
    #[arg(long, default_value_t = 150, value_parser = clap::value_parser!(u32).range(1..=ARMS_MAX as i64))]
    pub arms: u32,
    /// Joints per arm.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u8).range(1..=16))]
    pub dof: u8,
    /// Sensor samples per second per arm (0: none).
    #[arg(long, default_value_t = 2_000.0)]
    pub sensor_hz: f64,
    /// Samples per frame (0: about one frame per 5 ms).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=SAMPLES_PER_FRAME_MAX as i64))]
    pub samples_per_frame: u32,
    /// Plan updates per second per arm (0: none).
    #[arg(long, default_value_t = 1.0)]
    pub plan_hz: f64,
    /// How plan updates are sent.
    #[arg(long, value_enum, default_value_t = Transport::Http)]
    pub plan_transport: Transport,
    /// Completed cycles per second per arm (0: none).
    #[arg(long, default_value_t = 1.0 / 30.0)]
    pub cycle_hz: f64,
    /// Stop after this many seconds (0: run until SIGINT/SIGTERM).
    #[arg(long, default_value_t = 0)]
    pub duration_s: u64,
    /// Print the final report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Interval of the progress line on stderr (ms; 0: none).
    #[arg(long, default_value_t = 1_000)]
    pub progress_ms: u64,
    /// Measure the floors first: fdatasync in `--floor-dir`, NATS and HTTP round trips.
    #[arg(long)]
    pub floor: bool,
    /// Where the fdatasync floor is measured (the controller's disk).
    #[arg(long, default_value = ".")]
    pub floor_dir: PathBuf,
    /// Publish clear `edge.safety.state` heartbeats every 10 ms, standing in for
    /// safety-quorum's leader. Only for benchmarks without a quorum: never beside a real one.
    #[arg(long)]
    pub fake_safety_leader: bool,
    /// With `--fake-safety-leader`: after an arm's e-stop request (`edge.safety.estop`, sent
    /// when it latched a stop, e.g. on silent sensors), commit a newer clear this many ms
    /// later, as an operator would, so that a long run resumes (0: never; the arms then stay
    /// stopped). Every stand-in clear is counted in the report.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub fake_clear_after_ms: u64,
}

impl Args {
    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        for (flag, v) in [
            ("--sensor-hz", self.sensor_hz),
            ("--plan-hz", self.plan_hz),
            ("--cycle-hz", self.cycle_hz),
        ] {
            if !(v.is_finite() && (0.0..=100_000.0).contains(&v)) {
                return Err(format!("{flag}: must be in [0, 100000]"));
            }
        }
        if !(self.controller_url.starts_with("http://")
            || self.controller_url.starts_with("https://"))
        {
            return Err("--controller-url: must start with http:// or https://".into());
        }
        Ok(())
    }

    fn samples_per_frame(&self) -> u32 {
        if self.samples_per_frame > 0 {
            return self.samples_per_frame;
        }
        ((self.sensor_hz / 200.0).round() as u32).clamp(1, SAMPLES_PER_FRAME_MAX)
    }
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// One simulated arm: its committed plan (what its sensors follow).
#[derive(Debug)]
struct Arm {
    id: String,
    joints: Mutex<Vec<f64>>,
    version: AtomicU64,
}

/// Outcomes of one kind of request.
#[derive(Debug, Default)]
struct Requests {
    total: Series,
    interval: Series,
    errors: BTreeMap<String, u64>,
}

impl Requests {
    fn ok(&mut self, us: u64) {
        self.total.record(us);
        self.interval.record(us);
    }
    fn error(&mut self, kind: String) {
        *self.errors.entry(kind).or_default() += 1;
    }
}

#[derive(Debug, Default)]
struct Shared {
    plans: Mutex<Requests>,
    cycles: Mutex<Requests>,
    frames: AtomicU64,
    samples: AtomicU64,
    publish_errors: AtomicU64,
}

/// Results of one kind of request.
#[derive(Debug, Clone, Serialize)]
pub struct RequestReport {
    /// Acknowledged (200).
    pub ok: u64,
    /// Acknowledged per second.
    pub ok_per_s: f64,
    /// Ack latency.
    pub latency: Summary,
    /// Failures by status code or kind.
    pub errors: BTreeMap<String, u64>,
}

/// Sensor results.
#[derive(Debug, Clone, Serialize)]
pub struct SensorReport {
    /// Frames published.
    pub frames_sent: u64,
    /// Samples published.
    pub samples_sent: u64,
    /// Samples published per second.
    pub samples_per_s: f64,
    /// Samples the controller counted in the same time (its `keel_arm_sensor_samples_total`).
    pub samples_received: Option<u64>,
    /// Publish failures.
    pub publish_errors: u64,
}

/// What the stand-in safety leader did (`--fake-safety-leader`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct FakeLeaderReport {
    /// E-stop requests heard from the controller (each a latched stop).
    pub estop_requests: u64,
    /// Newer clears committed after them (`--fake-clear-after-ms`).
    pub clears: u64,
}

/// Floors measured in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct FloorReport {
    /// A 200-byte write + fdatasync in `--floor-dir`.
    pub fdatasync: Summary,
    /// A NATS request to a local echo responder.
    pub nats_round_trip: Summary,
    /// `GET /healthz` on the controller.
    pub http_round_trip: Summary,
}

/// The final report (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The flags.
    pub args: Args,
    /// Seconds the load ran.
    pub elapsed_s: f64,
    /// Plan updates.
    pub plans: RequestReport,
    /// Cycles.
    pub cycles: RequestReport,
    /// Sensor frames.
    pub sensors: SensorReport,
    /// Floors, with `--floor`.
    pub floor: Option<FloorReport>,
    /// The stand-in leader, with `--fake-safety-leader`.
    pub fake_leader: Option<FakeLeaderReport>,
}

async fn controller_samples(http: &reqwest::Client, base: &str) -> Option<u64> {
    let resp = http.get(format!("{base}/metrics")).send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let text = resp.text().await.ok()?;
    // Absent until the first sample arrives.
    Some(
        text.lines()
            .find(|l| l.starts_with("keel_arm_sensor_samples_total "))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .map_or(0, |v| v as u64),
    )
}

/// Runs the simulation until `--duration-s` passes or a signal arrives.
pub async fn run(args: Args) -> anyhow::Result<Report> {
    run_until(args, shutdown_signal()).await
}

/// [`run`] until `--duration-s` passes or `stop` resolves.
pub async fn run_until(
    args: Args,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<Report> {
    let mut stop_requested = std::pin::pin!(stop);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(REQUEST_TIMEOUT_MS))
        .pool_max_idle_per_host(args.arms as usize)
        .build()?;
    let nats = async_nats::ConnectOptions::new()
        .name("arm-sim")
        .connect(args.nats_url.as_str())
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {}: {e}", args.nats_url))?;
    let base = args.controller_url.trim_end_matches('/').to_owned();
    let (stop_tx, stop) = watch::channel(false);
    let mut tasks = Vec::new();
    let fake = Arc::new(FakeLeader::default());
    if args.fake_safety_leader {
        let subscription = nats
            .subscribe(wire::subjects::SAFETY_ESTOP)
            .await
            .map_err(|e| anyhow::anyhow!("cannot subscribe to e-stop requests: {e}"))?;
        tasks.push(tokio::spawn(fake_leader(
            nats.clone(),
            subscription,
            fake.clone(),
            args.fake_clear_after_ms,
            stop.clone(),
        )));
    }
    let floor =
        if args.floor { Some(measure_floor(&args, &nats, &http, &base).await?) } else { None };

    let dof = usize::from(args.dof);
    let mut arms = Vec::new();
    for i in 1..=args.arms {
        let id = format!("arm-{i:03}");
        let (version, joints) = match http.get(format!("{base}/arms/{id}/plan")).send().await {
            Ok(resp) if resp.status() == 200 => {
                let body: Value = resp.json().await.unwrap_or(Value::Null);
                let joints: Vec<f64> =
                    serde_json::from_value(body["joints"].clone()).unwrap_or_default();
                let joints = if joints.len() == dof { joints } else { vec![0.0; dof] };
                (body["version"].as_u64().unwrap_or(0), joints)
            }
            Ok(resp) if resp.status() == 404 => (0, vec![0.0; dof]),
            Ok(resp) => anyhow::bail!("GET /arms/{id}/plan answered {}", resp.status()),
            Err(err) => anyhow::bail!("cannot reach the controller at {base}: {err}"),
        };
        arms.push(Arc::new(Arm {
            id,
            joints: Mutex::new(joints),
            version: AtomicU64::new(version),
        }));
    }
    let received_before = controller_samples(&http, &base).await;
    let shared = Arc::new(Shared::default());
    let run_id = now_us() % 1_000_000_000;
    let started = Instant::now();

    if args.sensor_hz > 0.0 {
        let per_shard = arms.len().div_ceil(SENSOR_SHARDS);
        for shard in arms.chunks(per_shard) {
            tasks.push(tokio::spawn(sensors(
                args.clone(),
                nats.clone(),
                shard.to_vec(),
                shared.clone(),
                stop.clone(),
            )));
        }
    }
    for (n, arm) in arms.iter().enumerate() {
        let offset =
            |hz: f64| Duration::from_secs_f64((n as f64 / arms.len() as f64) / hz.max(1e-9));
        if args.plan_hz > 0.0 {
            let ctx = (http.clone(), nats.clone(), base.clone(), shared.clone(), stop.clone());
            tasks.push(tokio::spawn(plans(
                args.clone(),
                arm.clone(),
                offset(args.plan_hz),
                run_id,
                ctx,
            )));
        }
        if args.cycle_hz > 0.0 {
            let ctx = (http.clone(), base.clone(), shared.clone(), stop.clone());
            tasks.push(tokio::spawn(cycles(
                args.clone(),
                arm.clone(),
                offset(args.cycle_hz),
                run_id,
                ctx,
            )));
        }
    }

    // Progress and the end.
    let deadline = (args.duration_s > 0).then(|| started + Duration::from_secs(args.duration_s));
    let progress =
        Duration::from_millis(if args.progress_ms == 0 { 1_000 } else { args.progress_ms });
    let mut last = (Instant::now(), 0u64);
    loop {
        let until_deadline = deadline
            .map_or(progress, |d| d.saturating_duration_since(Instant::now()).min(progress));
        tokio::select! {
            _ = tokio::time::sleep(until_deadline) => {}
            () = &mut stop_requested => break,
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if args.progress_ms > 0 {
            let samples = shared.samples.load(Ordering::Relaxed);
            let secs = last.0.elapsed().as_secs_f64();
            let (plan_line, plan_errors) = {
                let mut p = shared.plans.lock().expect("plans");
                let s = p.interval.summary();
                p.interval = Series::default();
                (s, p.errors.values().sum::<u64>())
            };
            eprintln!(
                "arm-sim t={:>5.1}s plans {:>7.1}/s p50 {:>6.2}ms p99 {:>6.2}ms p99.9 {:>6.2}ms errors {} | samples {:>9.0}/s",
                started.elapsed().as_secs_f64(),
                plan_line.count as f64 / secs,
                plan_line.p50_ms,
                plan_line.p99_ms,
                plan_line.p999_ms,
                plan_errors,
                (samples - last.1) as f64 / secs,
            );
            last = (Instant::now(), samples);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_millis(REQUEST_TIMEOUT_MS), task).await;
    }
    // Bounded: with nats-server gone a plain flush waits for a reconnection forever.
    let _ = tokio::time::timeout(Duration::from_millis(1_000), nats.flush()).await;
    // Give the controller a moment to fold what is in flight before reading its counter.
    let samples_sent = shared.samples.load(Ordering::Relaxed);
    let mut samples_received = None;
    if let Some(before) = received_before {
        let drain_until = Instant::now() + Duration::from_secs(3);
        loop {
            let now = controller_samples(&http, &base).await.map(|v| v.saturating_sub(before));
            samples_received = now.or(samples_received);
            if now.is_none_or(|v| v >= samples_sent) || Instant::now() >= drain_until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let report_of = |r: &Mutex<Requests>| {
        let r = r.lock().expect("requests");
        RequestReport {
            ok: r.total.count(),
            ok_per_s: r.total.count() as f64 / elapsed,
            latency: r.total.summary(),
            errors: r.errors.clone(),
        }
    };
    let fake_leader = args.fake_safety_leader.then(|| FakeLeaderReport {
        estop_requests: fake.estop_requests.load(Ordering::Relaxed),
        clears: fake.clears.load(Ordering::Relaxed),
    });
    Ok(Report {
        args,
        elapsed_s: elapsed,
        plans: report_of(&shared.plans),
        cycles: report_of(&shared.cycles),
        sensors: SensorReport {
            frames_sent: shared.frames.load(Ordering::Relaxed),
            samples_sent,
            samples_per_s: samples_sent as f64 / elapsed,
            samples_received,
            publish_errors: shared.publish_errors.load(Ordering::Relaxed),
        },
        floor,
        fake_leader,
    })
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn ticker(period: Duration) -> tokio::time::Interval {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}

async fn sensors(
    args: Args,
    nats: async_nats::Client,
    arms: Vec<Arc<Arm>>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let per_frame = args.samples_per_frame();
    let period = Duration::from_secs_f64(f64::from(per_frame) / args.sensor_hz);
    let sample_gap_us = (1e6 / args.sensor_hz) as u64;
    let mut interval = ticker(period);
    let mut seq = 0u64;
    let mut phase = 0.0f64;
    // Catch up when late, so the sample rate holds (bounded: at most 8 frames at once).
    let started = Instant::now();
    let mut sent_frames = 0u64;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.changed() => return,
        }
        let due = (started.elapsed().as_secs_f64() / period.as_secs_f64()) as u64 + 1;
        let frames_now = due.saturating_sub(sent_frames).clamp(1, 8);
        for _ in 0..frames_now {
            seq += 1;
            sent_frames += 1;
            let end_us = now_us();
            for arm in &arms {
                let target = arm.joints.lock().expect("joints").clone();
                let samples = (0..per_frame)
                    .map(|k| {
                        phase += 0.01;
                        let noise = NOISE_RAD * phase.sin();
                        Sample {
                            ts_us: end_us - u64::from(per_frame - 1 - k) * sample_gap_us,
                            joints: target.iter().map(|j| j + noise).collect(),
                        }
                    })
                    .collect();
                let frame = SensorFrame { arm: arm.id.clone(), seq, samples };
                let subject = wire::subjects::arm_sensor(&arm.id);
                match nats.publish(subject, Bytes::from(frame.encode_to_vec())).await {
                    Ok(()) => {
                        shared.frames.fetch_add(1, Ordering::Relaxed);
                        shared.samples.fetch_add(u64::from(per_frame), Ordering::Relaxed);
                    }
                    Err(_) => {
                        shared.publish_errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

type PlanCtx = (reqwest::Client, async_nats::Client, String, Arc<Shared>, watch::Receiver<bool>);

async fn plans(args: Args, arm: Arc<Arm>, offset: Duration, run_id: u64, ctx: PlanCtx) {
    let (http, nats, base, shared, mut stop) = ctx;
    tokio::select! {
        _ = tokio::time::sleep(offset) => {}
        _ = stop.changed() => return,
    }
    let mut interval = ticker(Duration::from_secs_f64(1.0 / args.plan_hz));
    let mut step = 0u64;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.changed() => return,
        }
        step += 1;
        let version = arm.version.load(Ordering::Relaxed) + 1;
        let joints: Vec<f64> = {
            let current = arm.joints.lock().expect("joints");
            current
                .iter()
                .enumerate()
                .map(|(i, j)| {
                    let direction =
                        if (step / 50 + i as u64).is_multiple_of(2) { 1.0 } else { -1.0 };
                    (j + direction * PLAN_STEP_RAD).clamp(-JOINT_RANGE_RAD, JOINT_RANGE_RAD)
                })
                .collect()
        };
        let body = json!({"id": format!("sim-{run_id}-{}-{version}", arm.id), "version": version, "joints": joints});
        let sent = Instant::now();
        let outcome: Result<(u16, Value), String> = match args.plan_transport {
            Transport::Http => {
                match http.put(format!("{base}/arms/{}/plan", arm.id)).json(&body).send().await {
                    Ok(resp) => {
                        let code = resp.status().as_u16();
                        Ok((code, resp.json().await.unwrap_or(Value::Null)))
                    }
                    Err(err) => {
                        Err(if err.is_timeout() { "timeout".into() } else { "http_error".into() })
                    }
                }
            }
            Transport::Nats => {
                let payload = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
                match nats.request(wire::subjects::arm_plan_update(&arm.id), payload).await {
                    Ok(reply) => {
                        let v: Value =
                            serde_json::from_slice(&reply.payload).unwrap_or(Value::Null);
                        Ok((v["status"].as_u64().unwrap_or(0) as u16, v))
                    }
                    Err(_) => Err("nats_error".into()),
                }
            }
        };
        let us = sent.elapsed().as_micros() as u64;
        let mut plans = shared.plans.lock().expect("plans");
        match outcome {
            Ok((200, _)) => {
                plans.ok(us);
                arm.version.store(version, Ordering::Relaxed);
                *arm.joints.lock().expect("joints") = joints;
            }
            Ok((409, reply)) => {
                plans.error("409".into());
                if let Some(current) = reply["current"].as_u64() {
                    arm.version.store(current, Ordering::Relaxed);
                }
            }
            Ok((code, _)) => plans.error(code.to_string()),
            Err(kind) => plans.error(kind),
        }
    }
}

type CycleCtx = (reqwest::Client, String, Arc<Shared>, watch::Receiver<bool>);

async fn cycles(args: Args, arm: Arc<Arm>, offset: Duration, run_id: u64, ctx: CycleCtx) {
    let (http, base, shared, mut stop) = ctx;
    tokio::select! {
        _ = tokio::time::sleep(offset) => {}
        _ = stop.changed() => return,
    }
    let mut interval = ticker(Duration::from_secs_f64(1.0 / args.cycle_hz));
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.changed() => return,
        }
        n += 1;
        let body = json!({"id": format!("sim-{run_id}-{}-c{n}", arm.id)});
        let sent = Instant::now();
        let result = http.post(format!("{base}/arms/{}/cycles", arm.id)).json(&body).send().await;
        let us = sent.elapsed().as_micros() as u64;
        let mut cycles = shared.cycles.lock().expect("cycles");
        match result {
            Ok(resp) if resp.status() == 200 => cycles.ok(us),
            Ok(resp) => cycles.error(resp.status().as_u16().to_string()),
            Err(_) => cycles.error("http_error".into()),
        }
    }
}

/// The stand-in leader's counters.
#[derive(Debug, Default)]
struct FakeLeader {
    estop_requests: AtomicU64,
    clears: AtomicU64,
}

/// Publishes a clear committed state every 10 ms (term 1, index 1 at first). An e-stop
/// request from the controller (it latched a stop) schedules a newer clear (the next index)
/// `clear_after_ms` later, which releases the latch; 0 never does.
async fn fake_leader(
    nats: async_nats::Client,
    mut requests: async_nats::Subscriber,
    counters: Arc<FakeLeader>,
    clear_after_ms: u64,
    mut stop: watch::Receiver<bool>,
) {
    let mut interval = ticker(Duration::from_millis(10));
    let mut index = 1u64;
    let mut clear_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.changed() => return,
            request = requests.next() => {
                let Some(request) = request else { return };
                counters.estop_requests.fetch_add(1, Ordering::Relaxed);
                if let Some(reply) = request.reply {
                    // It does not engage (the other arms keep running); it says what it does.
                    let answer = json!({"stand_in": true, "engaged": false, "index": index, "clear_after_ms": clear_after_ms});
                    let _ = nats.publish(reply, Bytes::from(answer.to_string())).await;
                }
                if clear_after_ms > 0 && clear_at.is_none() {
                    clear_at = Some(tokio::time::Instant::now() + Duration::from_millis(clear_after_ms));
                }
                continue;
            }
        }
        if clear_at.is_some_and(|at| tokio::time::Instant::now() >= at) {
            clear_at = None;
            index += 1;
            counters.clears.fetch_add(1, Ordering::Relaxed);
        }
        let state = json!({"engaged": false, "reason": "arm-sim stand-in leader", "term": 1, "index": index, "leader": 0, "ts": now_us()});
        let _ = nats
            .publish(
                wire::subjects::SAFETY_STATE,
                Bytes::from(serde_json::to_vec(&state).unwrap_or_default()),
            )
            .await;
    }
}

async fn measure_floor(
    args: &Args,
    nats: &async_nats::Client,
    http: &reqwest::Client,
    base: &str,
) -> anyhow::Result<FloorReport> {
    let dir = args.floor_dir.clone();
    let fdatasync = tokio::task::spawn_blocking(move || -> anyhow::Result<Series> {
        use std::io::{Seek, SeekFrom, Write};
        let path = dir.join(format!(".arm-sim-floor-{}", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        file.set_len(4 * 1024 * 1024)?;
        file.sync_all()?;
        let record = [0x5au8; 200];
        let mut series = Series::default();
        for i in 0..FLOOR_ROUNDS as u64 {
            let t = Instant::now();
            file.seek(SeekFrom::Start(i * 200))?;
            file.write_all(&record)?;
            file.sync_data()?;
            series.record(t.elapsed().as_micros() as u64);
        }
        drop(file);
        std::fs::remove_file(&path)?;
        Ok(series)
    })
    .await??;

    let subject = format!("arm-sim.floor.{}", std::process::id());
    let mut echo = nats.subscribe(subject.clone()).await?;
    let responder = nats.clone();
    let echo_task = tokio::spawn(async move {
        while let Some(msg) = echo.next().await {
            if let Some(reply) = msg.reply {
                let _ = responder.publish(reply, msg.payload).await;
            }
        }
    });
    nats.flush().await?;
    let mut nats_rtt = Series::default();
    for _ in 0..FLOOR_ROUNDS {
        let t = Instant::now();
        nats.request(subject.clone(), Bytes::from_static(b"{}")).await?;
        nats_rtt.record(t.elapsed().as_micros() as u64);
    }
    echo_task.abort();
    let mut http_rtt = Series::default();
    for _ in 0..FLOOR_ROUNDS {
        let t = Instant::now();
        http.get(format!("{base}/healthz")).send().await?.bytes().await?;
        http_rtt.record(t.elapsed().as_micros() as u64);
    }
    Ok(FloorReport {
        fdatasync: fdatasync.summary(),
        nats_round_trip: nats_rtt.summary(),
        http_round_trip: http_rtt.summary(),
    })
}

/// The human-readable final report.
pub fn render(report: &Report) -> String {
    let line = |name: &str, r: &RequestReport| {
        format!(
            "{name:<7} ok {:>8} ({:>7.1}/s)  mean {:.2} ms  p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  max {:.2} ms  errors {:?}\n",
            r.ok,
            r.ok_per_s,
            r.latency.mean_ms,
            r.latency.p50_ms,
            r.latency.p99_ms,
            r.latency.p999_ms,
            r.latency.max_ms,
            r.errors
        )
    };
    let mut out = format!("arm-sim: {} arms for {:.1} s\n", report.args.arms, report.elapsed_s);
    out += &line("plans", &report.plans);
    out += &line("cycles", &report.cycles);
    let s = &report.sensors;
    out += &format!(
        "sensors frames {}  samples sent {} ({:.0}/s)  received {}  publish errors {}\n",
        s.frames_sent,
        s.samples_sent,
        s.samples_per_s,
        s.samples_received.map_or("?".to_owned(), |v| v.to_string()),
        s.publish_errors
    );
    if let Some(f) = &report.fake_leader {
        out += &format!(
            "stand-in safety leader: e-stop requests {}  clears committed {}\n",
            f.estop_requests, f.clears
        );
    }
    if let Some(f) = &report.floor {
        for (name, v) in [
            ("fdatasync", f.fdatasync),
            ("nats rtt", f.nats_round_trip),
            ("http rtt", f.http_round_trip),
        ] {
            out += &format!("floor {name:<9} p50 {:.3} ms  p99 {:.3} ms\n", v.p50_ms, v.p99_ms);
        }
    }
    out
}
