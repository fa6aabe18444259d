//! The event-log bench binary: measures the floor F (200-byte append + fdatasync on a
//! preallocated file) and, in the same run and directory, the log's single-writer and
//! 64-writer durable appends (64 tasks on a multi-thread tokio runtime, the primary case; 64
//! OS threads; 64 appends in flight from one thread) and device bytes per commit/event (from /proc/self/io and the
//! block device's counters), and (with `--features nats-peer`) the same workload on a local
//! nats-server with JetStream file storage (R1). Recovery is measured by the snapshotter's
//! `recovery-bench` example.
//!
//! `cargo run --release -p event-log --features nats-peer --example event-log-bench -- \
//!     --dir /tmp/keel-bench --json target/event-log-bench.json`
//!
//! Prints a markdown table and writes the figures as JSON.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use event_log::{AppendRequest, EventLog, Options};
use serde_json::{Value, json};

/// Bytes of one floor append.
const FLOOR_RECORD_BYTES: usize = 200;
/// Payload of one log append.
const PAYLOAD_BYTES: usize = 128;
/// Interleaved measurement rounds.
const ROUNDS: usize = 10;
/// Concurrent writers in the concurrent run.
const WRITERS: usize = 64;

struct Args {
    dir: PathBuf,
    json: PathBuf,
    single_events: usize,
    per_writer_events: usize,
    nats: bool,
    steady_secs: u64,
    /// Each steady-state load first runs this long unmeasured (segments rolled and compacted
    /// into the state a long-running service is in).
    steady_warmup_secs: u64,
    /// Steady state compacts (like a service after its snapshots) every this often...
    steady_compact_every: Duration,
    /// ...keeping this many events below the head; `None`: no compaction.
    steady_keep_events: Option<u64>,
}

fn parse_args() -> Args {
    let mut args = Args {
        dir: std::env::temp_dir().join("keel-event-log-bench"),
        json: PathBuf::from("event-log-bench.json"),
        single_events: 5_000,
        per_writer_events: 500,
        nats: true,
        steady_secs: 12,
        steady_warmup_secs: 3,
        steady_compact_every: Duration::from_millis(500),
        steady_keep_events: Some(100_000),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--dir" => args.dir = value().into(),
            "--json" => args.json = value().into(),
            "--single-events" => args.single_events = value().parse().expect("number"),
            "--per-writer-events" => args.per_writer_events = value().parse().expect("number"),
            "--no-nats" => args.nats = false,
            "--checkpoint-events" => {
                let n = value().parse().expect("number");
                CHECKPOINT_EVENTS.set(n).expect("--checkpoint-events given once");
            }
            "--steady-secs" => args.steady_secs = value().parse().expect("number"),
            "--steady-warmup-secs" => args.steady_warmup_secs = value().parse().expect("number"),
            "--steady-compact-every-ms" => {
                args.steady_compact_every = Duration::from_millis(value().parse().expect("number"))
            }
            "--steady-keep-events" => {
                args.steady_keep_events = Some(value().parse().expect("number"))
            }
            "--no-steady-compaction" => args.steady_keep_events = None,
            other => panic!("unknown flag {other}"),
        }
    }
    args
}

/// Bytes this process caused to be written to storage (page-dirtying time), from /proc.
fn write_bytes(pid: Option<u32>) -> u64 {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/io"),
        None => "/proc/self/io".to_owned(),
    };
    let text = std::fs::read_to_string(path).expect("read /proc/<pid>/io");
    text.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("write_bytes in /proc/<pid>/io")
}

/// `write_bytes` summed over this process's threads whose name starts with `prefix`
/// (`/proc/self/task/*/io`; threads that have exited are not counted).
fn thread_write_bytes(prefix: &str) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().filter_map(|e| e.ok()) {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        let io = std::fs::read_to_string(task.path().join("io")).unwrap_or_default();
        total += io
            .lines()
            .find_map(|l| l.strip_prefix("write_bytes:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

/// Bytes written to the block device holding `dir` (all processes), from /sys.
fn device_write_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).unwrap().dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let stat =
        std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).unwrap_or_default();
    stat.split_whitespace().nth(6).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0) * 512
}

#[derive(Debug, Clone)]
struct Latencies(Vec<Duration>);

impl Latencies {
    fn percentile_us(&self, p: f64) -> f64 {
        let mut v = self.0.clone();
        v.sort_unstable();
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v[i].as_secs_f64() * 1e6
    }
}

/// One measured run.
#[derive(Debug, Clone)]
struct Run {
    name: String,
    events: u64,
    commits: u64,
    elapsed: Duration,
    latencies: Latencies,
    device_bytes: u64,
    disk_bytes: u64,
}

impl Run {
    fn json(&self) -> Value {
        json!({
            "name": self.name,
            "events": self.events,
            "commits": self.commits,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "p50_us": self.latencies.percentile_us(0.50),
            "p99_us": self.latencies.percentile_us(0.99),
            "events_per_s": self.events as f64 / self.elapsed.as_secs_f64(),
            "commits_per_s": self.commits as f64 / self.elapsed.as_secs_f64(),
            "device_bytes_per_commit": self.device_bytes as f64 / self.commits.max(1) as f64,
            "device_bytes_per_event": self.device_bytes as f64 / self.events.max(1) as f64,
            "whole_disk_bytes_per_commit": self.disk_bytes as f64 / self.commits.max(1) as f64,
            "whole_disk_bytes_per_event": self.disk_bytes as f64 / self.events.max(1) as f64,
        })
    }
}

/// The floor's preallocated file: zero-filled in page-sized writes and synced.
struct FloorFile {
    file: std::fs::File,
    next: u64,
}

fn floor_file(dir: &Path, records: usize) -> FloorFile {
    let path = dir.join("floor.dat");
    let file =
        OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
    let len = (records * FLOOR_RECORD_BYTES + 4096) as u64;
    // Page-sized zero writes, like the log's preallocation (see ZERO_CHUNK_BYTES).
    let zeros = vec![0u8; 4096];
    let mut at = 0;
    while at < len {
        let k = (len - at).min(zeros.len() as u64);
        file.write_all_at(&zeros[..k as usize], at).unwrap();
        at += k;
    }
    file.sync_all().unwrap();
    FloorFile { file, next: 0 }
}

fn floor(dir: &Path, floor: &mut FloorFile, n: usize) -> Run {
    let record = [0x5au8; FLOOR_RECORD_BYTES];
    let mut latencies = Vec::with_capacity(n);
    let bytes_before = write_bytes(None);
    let disk_before = device_write_bytes(dir);
    let started = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        floor.file.write_all_at(&record, floor.next).unwrap();
        floor.file.sync_data().unwrap();
        floor.next += FLOOR_RECORD_BYTES as u64;
        latencies.push(t.elapsed());
    }
    let elapsed = started.elapsed();
    let device_bytes = write_bytes(None) - bytes_before;
    let disk_bytes = device_write_bytes(dir) - disk_before;
    Run {
        name: "F: 200 B pwrite + fdatasync, preallocated file".into(),
        events: n as u64,
        commits: n as u64,
        elapsed,
        latencies: Latencies(latencies),
        device_bytes,
        disk_bytes,
    }
}

/// Sums rounds of the same measurement.
fn merge(runs: Vec<Run>) -> Run {
    let mut out = runs[0].clone();
    for run in &runs[1..] {
        out.events += run.events;
        out.commits += run.commits;
        out.elapsed += run.elapsed;
        out.latencies.0.extend(&run.latencies.0);
        out.device_bytes += run.device_bytes;
        out.disk_bytes += run.disk_bytes;
    }
    out
}

/// A bijective 64-bit mix (splitmix64's finalizer): random-looking, distinct for distinct `n`.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn request(n: u64, stream: &str) -> AppendRequest {
    // A UUIDv7 as `Uuid::now_v7` makes it: the time in milliseconds, then 74 bits that look
    // random (they decide how well the dedup index packs), distinct for distinct `n`.
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
        as u64;
    let random = mix(n);
    let mut id = [0u8; 16];
    id[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    id[6..8].copy_from_slice(&(0x7000 | (mix(random) & 0x0FFF) as u16).to_be_bytes());
    id[8..].copy_from_slice(&random.to_be_bytes());
    id[8] = 0x80 | (id[8] & 0x3F);
    AppendRequest::new(stream, id, "sample", vec![0x42u8; PAYLOAD_BYTES])
}

/// `--checkpoint-events`: the log's events between durable index checkpoints, if not the
/// default.
static CHECKPOINT_EVENTS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();

fn bench_options() -> Options {
    // Inline preallocation: the segment is made (and its zeros written) before measuring; a
    // background preallocation of the next segment would otherwise land inside the window.
    let defaults = Options::default();
    Options {
        background_preallocation: false,
        checkpoint_events: *CHECKPOINT_EVENTS.get().unwrap_or(&defaults.checkpoint_events),
        ..defaults
    }
}

fn open_log(dir: &Path, name: &str) -> EventLog {
    let log = EventLog::open(dir.join(name), bench_options()).unwrap();
    log.append(request(0, "arm-0")).unwrap(); // creates (preallocates) the segment
    log.checkpoint().unwrap();
    log
}

fn single_writer(dir: &Path, log: &EventLog, first: u64, n: usize) -> Run {
    let mut latencies = Vec::with_capacity(n);
    let bytes_before = write_bytes(None);
    let disk_before = device_write_bytes(dir);
    let commits_before = log.stats().group_commits;
    let started = Instant::now();
    for i in first..first + n as u64 {
        let t = Instant::now();
        log.append(request(i, "arm-1")).unwrap();
        latencies.push(t.elapsed());
    }
    let elapsed = started.elapsed();
    let device_bytes = write_bytes(None) - bytes_before;
    let disk_bytes = device_write_bytes(dir) - disk_before;
    Run {
        name: "event-log: 1 writer, 128 B, Immediate".into(),
        events: n as u64,
        commits: log.stats().group_commits - commits_before,
        elapsed,
        latencies: Latencies(latencies),
        device_bytes,
        disk_bytes,
    }
}

fn concurrent(dir: &Path, log: &EventLog, first: u64, per_writer: usize) -> Run {
    let barrier = Arc::new(Barrier::new(WRITERS + 1));
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let log = log.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let stream = format!("arm-{w}");
                let mut latencies = Vec::with_capacity(per_writer);
                barrier.wait();
                for i in 0..per_writer as u64 {
                    let t = Instant::now();
                    log.append(request(first + w as u64 * 1_000_000 + i, &stream)).unwrap();
                    latencies.push(t.elapsed());
                }
                latencies
            })
        })
        .collect();
    let bytes_before = write_bytes(None);
    let disk_before = device_write_bytes(dir);
    let commits_before = log.stats().group_commits;
    barrier.wait();
    let started = Instant::now();
    let mut latencies = Vec::new();
    for t in threads {
        latencies.extend(t.join().unwrap());
    }
    let elapsed = started.elapsed();
    let device_bytes = write_bytes(None) - bytes_before;
    let disk_bytes = device_write_bytes(dir) - disk_before;
    let events = (WRITERS * per_writer) as u64;
    let commits = log.stats().group_commits - commits_before;
    Run {
        name: format!("event-log: {WRITERS} writer threads, 128 B, Immediate"),
        events,
        commits,
        elapsed,
        latencies: Latencies(latencies),
        device_bytes,
        disk_bytes,
    }
}

/// 64 tasks on a multi-thread tokio runtime, each awaiting its `append_async` before the next
/// (how a service appends from many tasks); an ack's latency runs from the call to the wake-up.
fn tasks(
    dir: &Path,
    runtime: &tokio::runtime::Runtime,
    log: &EventLog,
    first: u64,
    per_writer: usize,
) -> Run {
    let bytes_before = write_bytes(None);
    let disk_before = device_write_bytes(dir);
    let commits_before = log.stats().group_commits;
    let (elapsed, latencies) = runtime.block_on(async {
        let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS + 1));
        let handles: Vec<_> = (0..WRITERS)
            .map(|w| {
                let log = log.clone();
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    let stream = format!("arm-{w}");
                    let mut latencies = Vec::with_capacity(per_writer);
                    barrier.wait().await;
                    for i in 0..per_writer as u64 {
                        let t = Instant::now();
                        log.append_async(request(first + w as u64 * 1_000_000 + i, &stream))
                            .await
                            .unwrap();
                        latencies.push(t.elapsed());
                    }
                    latencies
                })
            })
            .collect();
        barrier.wait().await;
        let started = Instant::now();
        let mut latencies = Vec::new();
        for handle in handles {
            latencies.extend(handle.await.unwrap());
        }
        (started.elapsed(), latencies)
    });
    let device_bytes = write_bytes(None) - bytes_before;
    let disk_bytes = device_write_bytes(dir) - disk_before;
    let events = (WRITERS * per_writer) as u64;
    Run {
        name: format!("event-log: {WRITERS} tasks (tokio, 2 workers), 128 B, Immediate"),
        events,
        commits: log.stats().group_commits - commits_before,
        elapsed,
        latencies: Latencies(latencies),
        device_bytes,
        disk_bytes,
    }
}

/// The load of a steady-state run.
#[derive(Debug, Clone, Copy)]
enum Load {
    /// One thread, one append at a time.
    Single,
    /// One thread keeping 64 appends in flight.
    InFlight,
    /// 64 tokio tasks.
    Tasks,
}

/// Appends for `secs` seconds under `load`, with the index's writes and checkpoints at their
/// default cadence and (unless turned off) a compaction every `steady_compact_every` keeping
/// `steady_keep_events` below the head, as a service compacts after its snapshots; bytes from
/// /proc/self/io.
fn steady(
    dir: &Path,
    log: &EventLog,
    runtime: &tokio::runtime::Runtime,
    load: Load,
    args: &Args,
    secs: u64,
) -> Value {
    let bytes_before = write_bytes(None);
    let disk_before = device_write_bytes(dir);
    let writer_before = thread_write_bytes("event-log-write");
    let index_before = thread_write_bytes("event-log-index");
    let stats_before = log.stats();
    let stop = Arc::new(AtomicBool::new(false));
    let compactor = args.steady_keep_events.map(|keep| {
        let (log, stop, every) = (log.clone(), stop.clone(), args.steady_compact_every);
        std::thread::spawn(move || {
            let mut compactions = 0u64;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(every);
                let below = log.head().position.saturating_sub(keep);
                log.compact(below).unwrap();
                compactions += 1;
            }
            compactions
        })
    });
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    // Ids: a different range per load and per call (the warm-up runs first).
    let base =
        5_000_000_000u64 + (load as u64 + 1) * 1_000_000_000_000 + log.stats().events * 100_000;
    let latencies = match load {
        Load::Single | Load::InFlight => {
            let depth = if matches!(load, Load::Single) { 1 } else { WRITERS };
            let mut latencies = Vec::new();
            let mut queue = std::collections::VecDeque::with_capacity(depth);
            let mut n = base;
            while Instant::now() < deadline {
                while queue.len() < depth {
                    n += 1;
                    let stream = format!("arm-{}", n % 150);
                    queue.push_back((Instant::now(), log.append_async(request(n, &stream))));
                }
                let (t, pending) = queue.pop_front().unwrap();
                pending.wait().unwrap();
                latencies.push(t.elapsed());
            }
            for (t, pending) in queue {
                pending.wait().unwrap();
                latencies.push(t.elapsed());
            }
            latencies
        }
        Load::Tasks => runtime.block_on(async {
            let handles: Vec<_> = (0..WRITERS as u64)
                .map(|w| {
                    let log = log.clone();
                    tokio::spawn(async move {
                        let stream = format!("arm-{w}");
                        let mut latencies = Vec::new();
                        let mut n = base + w * 10_000_000;
                        while Instant::now() < deadline {
                            n += 1;
                            let t = Instant::now();
                            log.append_async(request(n, &stream)).await.unwrap();
                            latencies.push(t.elapsed());
                        }
                        latencies
                    })
                })
                .collect();
            let mut latencies = Vec::new();
            for handle in handles {
                latencies.extend(handle.await.unwrap());
            }
            latencies
        }),
    };
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let compactions = compactor.map(|t| t.join().unwrap());
    let stats = log.stats();
    let events = stats.events - stats_before.events;
    let bytes = write_bytes(None) - bytes_before;
    let latencies = Latencies(latencies);
    json!({
        "load": format!("{load:?}"),
        "elapsed_s": elapsed.as_secs_f64(),
        "events": events,
        "events_per_s": events as f64 / elapsed.as_secs_f64(),
        "p50_us": latencies.percentile_us(0.50),
        "p99_us": latencies.percentile_us(0.99),
        "group_commits": stats.group_commits - stats_before.group_commits,
        "index_writes": stats.index_writes - stats_before.index_writes,
        "checkpoints": stats.checkpoints - stats_before.checkpoints,
        "tail_waits": stats.tail_waits - stats_before.tail_waits,
        "compactions": compactions,
        "segments_zero_filled": stats.segments_zero_filled - stats_before.segments_zero_filled,
        "segments_reused": stats.segments_reused - stats_before.segments_reused,
        "segments_recycled": stats.segments_recycled - stats_before.segments_recycled,
        "keep_events": args.steady_keep_events,
        "proc_write_bytes_per_event": bytes as f64 / events as f64,
        "writer_thread_bytes_per_event":
            (thread_write_bytes("event-log-write") - writer_before) as f64 / events as f64,
        "index_thread_bytes_per_event":
            (thread_write_bytes("event-log-index") - index_before) as f64 / events as f64,
        "whole_disk_bytes_per_event": (device_write_bytes(dir) - disk_before) as f64 / events as f64,
    })
}

/// 64 appends kept in flight by one thread (how an async caller with 64 tasks drives the log):
/// each ack's latency runs from its submission to its completion.
fn in_flight(dir: &Path, log: &EventLog, first: u64, total: usize) -> Run {
    let bytes_before = write_bytes(None);
    let disk_before = device_write_bytes(dir);
    let commits_before = log.stats().group_commits;
    let started = Instant::now();
    let mut queue = std::collections::VecDeque::with_capacity(WRITERS);
    let mut submitted = first;
    let mut latencies = Vec::with_capacity(total);
    let mut submit = |queue: &mut std::collections::VecDeque<_>| {
        submitted += 1;
        let stream = format!("arm-{}", submitted % WRITERS as u64);
        queue.push_back((Instant::now(), log.append_async(request(submitted, &stream))));
    };
    for _ in 0..WRITERS {
        submit(&mut queue);
    }
    while let Some((t, pending)) = queue.pop_front() {
        pending.wait().unwrap();
        latencies.push(t.elapsed());
        if latencies.len() + queue.len() < total {
            submit(&mut queue);
        }
    }
    let elapsed = started.elapsed();
    let device_bytes = write_bytes(None) - bytes_before;
    let disk_bytes = device_write_bytes(dir) - disk_before;
    let commits = log.stats().group_commits - commits_before;
    Run {
        name: format!("event-log: {WRITERS} appends in flight (1 thread, async-style), 128 B"),
        events: total as u64,
        commits,
        elapsed,
        latencies: Latencies(latencies),
        device_bytes,
        disk_bytes,
    }
}

#[cfg(feature = "nats-peer")]
mod nats {
    //! The peer: the same workload published to JetStream (file storage, R1) on a local
    //! nats-server started in a temporary directory on a free loopback port.

    use super::*;
    use std::process::{Child, Command, Stdio};

    pub struct Server {
        child: Child,
        pub port: u16,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    pub fn start(store: &Path) -> Option<Server> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let server = Server { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    pub fn bench(store: &Path, single: usize, per_writer: usize) -> Option<(Run, Run)> {
        let server = start(store)?;
        let pid = server.child.id();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .ok()?;
        let result = runtime.block_on(async move {
            let client = async_nats::connect(format!("127.0.0.1:{}", server.port)).await.ok()?;
            let js = async_nats::jetstream::new(client);
            js.create_stream(async_nats::jetstream::stream::Config {
                name: "BENCH".into(),
                subjects: vec!["bench.>".into()],
                storage: async_nats::jetstream::stream::StorageType::File,
                num_replicas: 1,
                ..Default::default()
            })
            .await
            .ok()?;
            let payload = vec![0x42u8; PAYLOAD_BYTES];
            for _ in 0..100 {
                js.publish("bench.warm", payload.clone().into()).await.ok()?.await.ok()?;
            }
            // One publisher, waiting for each ack.
            let mut latencies = Vec::with_capacity(single);
            let before = write_bytes(Some(pid));
            let disk_before = device_write_bytes(store);
            let started = Instant::now();
            for _ in 0..single {
                let t = Instant::now();
                js.publish("bench.one", payload.clone().into()).await.ok()?.await.ok()?;
                latencies.push(t.elapsed());
            }
            let elapsed = started.elapsed();
            let one = Run {
                name: "NATS JetStream 2.9 (file, R1): 1 publisher".into(),
                events: single as u64,
                commits: single as u64,
                elapsed,
                latencies: Latencies(latencies),
                device_bytes: write_bytes(Some(pid)) - before,
                disk_bytes: device_write_bytes(store) - disk_before,
            };
            // 64 publishers.
            let before = write_bytes(Some(pid));
            let disk_before = device_write_bytes(store);
            let started = Instant::now();
            let tasks: Vec<_> = (0..WRITERS)
                .map(|w| {
                    let js = js.clone();
                    let payload = payload.clone();
                    tokio::spawn(async move {
                        let mut latencies = Vec::with_capacity(per_writer);
                        for _ in 0..per_writer {
                            let t = Instant::now();
                            js.publish(format!("bench.w{w}"), payload.clone().into())
                                .await
                                .ok()?
                                .await
                                .ok()?;
                            latencies.push(t.elapsed());
                        }
                        Some(latencies)
                    })
                })
                .collect();
            let mut latencies = Vec::new();
            for t in tasks {
                latencies.extend(t.await.ok()??);
            }
            let elapsed = started.elapsed();
            let events = (WRITERS * per_writer) as u64;
            let many = Run {
                name: format!("NATS JetStream 2.9 (file, R1): {WRITERS} publishers"),
                events,
                commits: events,
                elapsed,
                latencies: Latencies(latencies),
                device_bytes: write_bytes(Some(pid)) - before,
                disk_bytes: device_write_bytes(store) - disk_before,
            };
            drop(server);
            Some((one, many))
        });
        runtime.shutdown_timeout(Duration::from_secs(1));
        result
    }
}

fn main() {
    let args = parse_args();
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir).unwrap();
    // Interleaved rounds: the floor and each log run take turns, so a change in the machine's
    // load hits all of them alike and the ratios stay meaningful.
    let mut floor_file = floor_file(&args.dir, 2 * args.single_events + 4096);
    let single_log = open_log(&args.dir, "single");
    let task_log = open_log(&args.dir, "tasks");
    let many_log = open_log(&args.dir, "concurrent");
    let flight_log = open_log(&args.dir, "in-flight");
    // What a service runs on: a multi-thread runtime with one worker per core.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let (mut fs, mut singles, mut task_runs, mut manys, mut flights, mut f_agains) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let logs = [&single_log, &task_log, &many_log, &flight_log];
    for round in 0..ROUNDS {
        let first = 1 + (round * 1_000_000_000) as u64;
        // Index writes of the previous round happen here, outside every window: the rounds
        // measure the log's own writes; the steady-state runs below include the index.
        for log in logs {
            log.checkpoint().unwrap();
        }
        fs.push(floor(&args.dir, &mut floor_file, args.single_events / ROUNDS));
        singles.push(single_writer(&args.dir, &single_log, first, args.single_events / ROUNDS));
        task_runs.push(tasks(
            &args.dir,
            &runtime,
            &task_log,
            first,
            args.per_writer_events / ROUNDS,
        ));
        manys.push(concurrent(&args.dir, &many_log, first, args.per_writer_events / ROUNDS));
        flights.push(in_flight(
            &args.dir,
            &flight_log,
            first,
            WRITERS * args.per_writer_events / ROUNDS,
        ));
        for log in logs {
            log.checkpoint().unwrap();
        }
        f_agains.push(floor(&args.dir, &mut floor_file, args.single_events / ROUNDS));
    }
    // Steady state: each load alone for a while, index writes and checkpoints at their own
    // cadence, everything the process writes counted.
    let steady_run = |log: &EventLog, load: Load| {
        if args.steady_warmup_secs > 0 {
            steady(&args.dir, log, &runtime, load, &args, args.steady_warmup_secs);
        }
        steady(&args.dir, log, &runtime, load, &args, args.steady_secs)
    };
    let steady_single = steady_run(&single_log, Load::Single);
    let steady_tasks = steady_run(&task_log, Load::Tasks);
    let steady_flight = steady_run(&flight_log, Load::InFlight);
    for log in [single_log, task_log, many_log, flight_log] {
        log.close().unwrap();
    }
    let steady_json = json!({
        "seconds": args.steady_secs,
        "warmup_seconds": args.steady_warmup_secs,
        "compact_every_ms": args.steady_compact_every.as_millis() as u64,
        "keep_events": args.steady_keep_events,
        "single_writer": steady_single,
        "tasks_64": steady_tasks,
        "in_flight_64": steady_flight,
    });
    let mut f = merge(fs);
    let f_after = merge(f_agains);
    f.name = "F (before each round)".into();
    let mut f_again = f_after;
    f_again.name = "F (after each round)".into();
    let single = merge(singles);
    let task_run = merge(task_runs);
    let many = merge(manys);
    let flight = merge(flights);
    #[cfg(feature = "nats-peer")]
    let peer = if args.nats {
        nats::bench(&args.dir.join("nats"), args.single_events, args.per_writer_events)
    } else {
        None
    };
    #[cfg(not(feature = "nats-peer"))]
    let peer: Option<(Run, Run)> = None;

    let fj = f.json();
    let ratio =
        |run: &Run, key: &str| run.json()[key].as_f64().unwrap() / fj[key].as_f64().unwrap();
    let mut runs = vec![
        f.clone(),
        single.clone(),
        task_run.clone(),
        many.clone(),
        flight.clone(),
        f_again.clone(),
    ];
    println!("steady state: {}", serde_json::to_string(&steady_json).unwrap());
    println!(
        "| steady ({} s) | events/s | p50 µs | p99 µs | /proc B/event | writer | index | zero-filled / reused segments |",
        args.steady_secs
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|");
    for key in ["single_writer", "tasks_64", "in_flight_64"] {
        let j = &steady_json[key];
        let f = |k: &str| j[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {key} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} / {} |",
            f("events_per_s"),
            f("p50_us"),
            f("p99_us"),
            f("proc_write_bytes_per_event"),
            f("writer_thread_bytes_per_event"),
            f("index_thread_bytes_per_event"),
            j["segments_zero_filled"],
            j["segments_reused"],
        );
    }
    if let Some((a, b)) = &peer {
        runs.push(a.clone());
        runs.push(b.clone());
    }
    println!(
        "| run | events | p50 µs | p99 µs | events/s | fsyncs/s | /proc B/commit | /proc B/event | disk B/event | p50/F | p99/F | events/s ÷ F commits/s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for run in &runs {
        let j = run.json();
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.1} |",
            run.name,
            run.events,
            j["p50_us"].as_f64().unwrap(),
            j["p99_us"].as_f64().unwrap(),
            j["events_per_s"].as_f64().unwrap(),
            j["commits_per_s"].as_f64().unwrap(),
            j["device_bytes_per_commit"].as_f64().unwrap(),
            j["device_bytes_per_event"].as_f64().unwrap(),
            j["whole_disk_bytes_per_event"].as_f64().unwrap(),
            ratio(run, "p50_us"),
            ratio(run, "p99_us"),
            j["events_per_s"].as_f64().unwrap() / fj["commits_per_s"].as_f64().unwrap(),
        );
    }
    let out = json!({
        "checkpoint_events": bench_options().checkpoint_events,
        "floor": fj,
        "floor_again": f_again.json(),
        "single_writer": single.json(),
        "tasks": task_run.json(),
        "concurrent_threads": many.json(),
        "in_flight": flight.json(),
        "steady_state": steady_json,
        "writers": WRITERS,
        "nats_peer": peer.as_ref().map(|(a, b)| json!({"single": a.json(), "concurrent": b.json()})),
        "ratios": {
            "single_p50_over_f_p50": ratio(&single, "p50_us"),
            "single_p99_over_f_p99": ratio(&single, "p99_us"),
            "single_bytes_per_commit_over_f": ratio(&single, "device_bytes_per_commit"),
            "tasks_events_per_s_over_f_commits_per_s": task_run.json()["events_per_s"].as_f64().unwrap() / fj["commits_per_s"].as_f64().unwrap(),
            "tasks_p99_over_f_p99": ratio(&task_run, "p99_us"),
            "concurrent_threads_events_per_s_over_f_commits_per_s": many.json()["events_per_s"].as_f64().unwrap() / fj["commits_per_s"].as_f64().unwrap(),
            "concurrent_threads_p99_over_f_p99": ratio(&many, "p99_us"),
            "in_flight_events_per_s_over_f_commits_per_s": flight.json()["events_per_s"].as_f64().unwrap() / fj["commits_per_s"].as_f64().unwrap(),
            "in_flight_p99_over_f_p99": ratio(&flight, "p99_us"),
        },
    });
    std::fs::write(&args.json, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&args.dir);
}
