//! The event-log bench binary: measures the floor F (200-byte append + fdatasync on a
//! preallocated file) and, in the same run and directory, the log's single-writer and
//! 64-writer durable appends and device bytes per commit/event (from /proc/self/io and the
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
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use event_log::{AppendRequest, EventLog, Options};
use serde_json::{Value, json};

/// Bytes of one floor append.
const FLOOR_RECORD_BYTES: usize = 200;
/// Payload of one log append.
const PAYLOAD_BYTES: usize = 128;
/// Concurrent writers in the concurrent run.
const WRITERS: usize = 64;

struct Args {
    dir: PathBuf,
    json: PathBuf,
    single_events: usize,
    per_writer_events: usize,
    nats: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        dir: std::env::temp_dir().join("keel-event-log-bench"),
        json: PathBuf::from("event-log-bench.json"),
        single_events: 5_000,
        per_writer_events: 500,
        nats: true,
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

fn floor(dir: &Path, n: usize) -> Run {
    let path = dir.join("floor.dat");
    let file =
        OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
    let len = (n * FLOOR_RECORD_BYTES + 4096) as u64;
    // Page-sized zero writes, like the log's preallocation (see ZERO_CHUNK_BYTES).
    let zeros = vec![0u8; 4096];
    let mut at = 0;
    while at < len {
        let k = (len - at).min(zeros.len() as u64);
        file.write_all_at(&zeros[..k as usize], at).unwrap();
        at += k;
    }
    file.sync_all().unwrap();
    let record = [0x5au8; FLOOR_RECORD_BYTES];
    let mut latencies = Vec::with_capacity(n);
    let bytes_before = write_bytes(None);
    let disk_before = device_write_bytes(dir);
    let started = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        file.write_all_at(&record, (i * FLOOR_RECORD_BYTES) as u64).unwrap();
        file.sync_data().unwrap();
        latencies.push(t.elapsed());
    }
    let elapsed = started.elapsed();
    let device_bytes = write_bytes(None) - bytes_before;
    let disk_bytes = device_write_bytes(dir) - disk_before;
    std::fs::remove_file(&path).unwrap();
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

fn request(n: u64, stream: &str) -> AppendRequest {
    let mut id = [0u8; 16];
    // UUIDv7-shaped ids (time-ordered keys in the dedup index).
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
        as u64;
    id[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    id[6] = 0x70;
    id[8] = 0x80;
    id[9..].copy_from_slice(&n.to_be_bytes()[1..]);
    AppendRequest::new(stream, id, "sample", vec![0x42u8; PAYLOAD_BYTES])
}

fn bench_options() -> Options {
    // Inline preallocation: the segment is made (and its zeros written) before measuring; a
    // background preallocation of the next segment would otherwise land inside the window.
    Options { background_preallocation: false, ..Options::default() }
}

fn single_writer(dir: &Path, n: usize) -> Run {
    let log = EventLog::open(dir.join("single"), bench_options()).unwrap();
    log.append(request(0, "arm-0")).unwrap(); // creates the segment
    log.checkpoint().unwrap();
    let mut latencies = Vec::with_capacity(n);
    let bytes_before = write_bytes(None);
    let disk_before = device_write_bytes(dir);
    let started = Instant::now();
    for i in 1..=n as u64 {
        let t = Instant::now();
        log.append(request(i, "arm-1")).unwrap();
        latencies.push(t.elapsed());
    }
    let elapsed = started.elapsed();
    let device_bytes = write_bytes(None) - bytes_before;
    let disk_bytes = device_write_bytes(dir) - disk_before;
    log.close().unwrap();
    Run {
        name: "event-log: 1 writer, 128 B, Immediate".into(),
        events: n as u64,
        commits: n as u64,
        elapsed,
        latencies: Latencies(latencies),
        device_bytes,
        disk_bytes,
    }
}

fn concurrent(dir: &Path, per_writer: usize) -> Run {
    let log = EventLog::open(dir.join("concurrent"), bench_options()).unwrap();
    log.append(request(0, "arm-0")).unwrap();
    log.checkpoint().unwrap();
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
                    log.append(request(1 + w as u64 * 1_000_000 + i, &stream)).unwrap();
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
    log.close().unwrap();
    Run {
        name: format!("event-log: {WRITERS} writers, 128 B, Immediate"),
        events,
        commits,
        elapsed,
        latencies: Latencies(latencies),
        device_bytes,
        disk_bytes,
    }
}

/// 64 appends kept in flight by one thread (how an async caller with 64 tasks drives the log):
/// each ack's latency runs from its submission to its completion.
fn in_flight(dir: &Path, total: usize) -> Run {
    let log = EventLog::open(dir.join("in-flight"), bench_options()).unwrap();
    log.append(request(0, "arm-0")).unwrap();
    log.checkpoint().unwrap();
    let bytes_before = write_bytes(None);
    let disk_before = device_write_bytes(dir);
    let commits_before = log.stats().group_commits;
    let started = Instant::now();
    let mut queue = std::collections::VecDeque::with_capacity(WRITERS);
    let mut submitted = 0u64;
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
    log.close().unwrap();
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
    let f = floor(&args.dir, args.single_events);
    let single = single_writer(&args.dir, args.single_events);
    let many = concurrent(&args.dir, args.per_writer_events);
    let flight = in_flight(&args.dir, WRITERS * args.per_writer_events);
    let f_again = floor(&args.dir, args.single_events);
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
    let mut runs = vec![f.clone(), single.clone(), many.clone(), flight.clone(), f_again.clone()];
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
        "floor": fj,
        "floor_again": f_again.json(),
        "single_writer": single.json(),
        "concurrent_writers": many.json(),
        "in_flight": flight.json(),
        "writers": WRITERS,
        "nats_peer": peer.as_ref().map(|(a, b)| json!({"single": a.json(), "concurrent": b.json()})),
        "ratios": {
            "single_p50_over_f_p50": ratio(&single, "p50_us"),
            "single_p99_over_f_p99": ratio(&single, "p99_us"),
            "single_bytes_per_commit_over_f": ratio(&single, "device_bytes_per_commit"),
            "concurrent_events_per_s_over_f_commits_per_s": many.json()["events_per_s"].as_f64().unwrap() / fj["commits_per_s"].as_f64().unwrap(),
            "concurrent_p99_over_f_p99": ratio(&many, "p99_us"),
            "in_flight_events_per_s_over_f_commits_per_s": flight.json()["events_per_s"].as_f64().unwrap() / fj["commits_per_s"].as_f64().unwrap(),
            "in_flight_p99_over_f_p99": ratio(&flight, "p99_us"),
        },
    });
    std::fs::write(&args.json, serde_json::to_string_pretty(&out).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&args.dir);
}
