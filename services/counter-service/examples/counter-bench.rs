//! counter-service end-to-end bench (release): replication lag between 3 replicas at a fixed
//! rate beside the raw NATS round trip, durable increments/s beside the raw fdatasync floor,
//! disk bytes, RSS and document size as increments continue. Prints a table and JSON.
//!
//! `cargo build --release -p counter-service --examples && target/release/examples/counter-bench`
//! Flags (env): `LAG_RATE` (increments/s, 1000), `LAG_SECONDS` (10), `THROUGHPUT_SECONDS`
//! (10), `GROWTH_TOTAL` (1000000), `GROWTH_STEP` (100000), `CONCURRENCY` (128),
//! `REPLICA_ARGS` (extra counter-service flags, split on spaces), `REPLICA_LOG` (the replicas'
//! `RUST_LOG`, default `warn`).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use testkit::{NatsServer, ServiceProcess, ServiceSpec};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

async fn post(http: &reqwest::Client, base: &str, name: &str, op_id: String, amount: i64) -> bool {
    http.post(format!("{base}/counters/{name}/increment"))
        .json(&json!({"amount": amount, "op_id": op_id}))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

async fn debug(http: &reqwest::Client, base: &str, docs: bool) -> Value {
    let url = format!("{base}/debug/sync{}", if docs { "?docs=true" } else { "" });
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// The process's resident set (`VmRSS`) or its peak so far (`VmHWM`), in bytes.
fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Raw floor: 200-byte write + fdatasync, one at a time, for `seconds`.
fn fsync_floor(dir: &std::path::Path, seconds: u64) -> f64 {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(dir.join("floor"))
        .unwrap();
    let record = [7u8; 200];
    let started = Instant::now();
    let mut count = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        file.write_all_at(&record, count * 200).unwrap();
        file.sync_data().unwrap();
        count += 1;
    }
    count as f64 / started.elapsed().as_secs_f64()
}

/// Raw NATS request/reply round trips (µs), sequential.
async fn nats_round_trip_us(url: &str, count: usize) -> Vec<f64> {
    let client = async_nats::connect(url).await.unwrap();
    let mut sub = client.subscribe("bench.echo").await.unwrap();
    let echo = client.clone();
    let responder = tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            if let Some(reply) = msg.reply {
                let _ = echo.publish(reply, msg.payload).await;
            }
        }
    });
    client.flush().await.unwrap();
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        client.request("bench.echo", vec![0u8; 64].into()).await.unwrap();
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    responder.abort();
    samples.sort_by(f64::total_cmp);
    samples
}

fn replica(bin: &std::path::Path, nats: &str, node: &str, peers: &str) -> ServiceSpec {
    let mut spec = ServiceSpec::new(bin, nats)
        .args(["--node-id", node, "--peers", peers])
        .env("RUST_LOG", &std::env::var("REPLICA_LOG").unwrap_or_else(|_| "warn".into()));
    // Replica flags to compare settings, e.g. `REPLICA_ARGS="--tick-interval-ms 500"`.
    if let Ok(extra) = std::env::var("REPLICA_ARGS") {
        spec = spec.args(extra.split_whitespace());
    }
    spec
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let lag_rate = env("LAG_RATE", 1_000);
    let lag_seconds = env("LAG_SECONDS", 10);
    let throughput_seconds = env("THROUGHPUT_SECONDS", 10);
    let growth_total = env("GROWTH_TOTAL", 1_000_000);
    let growth_step = env("GROWTH_STEP", 100_000);
    let concurrency = env("CONCURRENCY", 128) as usize;
    let bin = testkit::process::binary("counter-service")?;
    let nats = NatsServer::start()?;
    let http = reqwest::Client::builder().pool_max_idle_per_host(512).build()?;
    let mut report = json!({});

    // Floors.
    let rtt = nats_round_trip_us(&nats.url(), 2_000).await;
    let floor_dir = tempfile::tempdir()?;
    let fsync_per_s = fsync_floor(floor_dir.path(), 2);
    report["nats_round_trip_us"] =
        json!({"p50": percentile(&rtt, 0.5), "p99": percentile(&rtt, 0.99)});
    report["fdatasync_per_s"] = json!(fsync_per_s);

    // Replication lag: 3 replicas, `lag_rate` increments/s spread over all three.
    {
        let peers = "a,b,c";
        let mut replicas = Vec::new();
        for node in ["a", "b", "c"] {
            let mut svc = ServiceProcess::start(replica(&bin, &nats.url(), node, peers))?;
            svc.wait_ready().await?;
            replicas.push(svc);
        }
        for svc in &replicas {
            testkit::wait_until("sync up", Duration::from_secs(30), || async {
                (debug(&http, &svc.base_url(), false).await["synced"] == true).then_some(())
            })
            .await?;
        }
        let urls: Vec<String> = replicas.iter().map(|r| r.base_url()).collect();
        let total = lag_rate * lag_seconds;
        let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / lag_rate));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut tasks = Vec::with_capacity(total as usize);
        let started = Instant::now();
        for i in 0..total {
            ticker.tick().await;
            let (http, url) = (http.clone(), urls[(i % 3) as usize].clone());
            tasks.push(tokio::spawn(async move {
                post(&http, &url, "lag", format!("lag-{i}"), 1).await
            }));
        }
        let mut ok = 0;
        for task in tasks {
            ok += usize::from(task.await.unwrap_or(false));
        }
        let offered_per_s = total as f64 / started.elapsed().as_secs_f64();
        let expected = ok as i64;
        testkit::wait_until("lag counter converged", Duration::from_secs(60), || async {
            for url in &urls {
                let body: Value =
                    http.get(format!("{url}/counters/lag")).send().await.ok()?.json().await.ok()?;
                if body["value"].as_i64() != Some(expected) {
                    return None;
                }
            }
            Some(())
        })
        .await?;
        let mut per_replica = Vec::new();
        let mut sync = Vec::new();
        for url in &urls {
            let body = debug(&http, url, false).await;
            per_replica.push(body["lag_ms"].clone());
            sync.push(json!({
                "changes": body["changes"], "epoch": body["epoch"], "sync": body["sync"],
            }));
        }
        report["lag"] = json!({
            "rate_per_s": offered_per_s, "acknowledged": ok, "replicas": per_replica,
            "sync": sync,
        });
    }

    // Durable increments/s on one replica, then growth to `growth_total`.
    {
        let mut solo = ServiceProcess::start(replica(&bin, &nats.url(), "solo", "solo"))?;
        solo.wait_ready().await?;
        let base = solo.base_url();
        let next = Arc::new(AtomicU64::new(0));
        let run = |count: Option<u64>, seconds: Option<u64>| {
            let (http, base, next) = (http.clone(), base.clone(), next.clone());
            async move {
                let started = Instant::now();
                let deadline = seconds.map(|s| started + Duration::from_secs(s));
                let stop_at = count.map(|c| next.load(Ordering::Relaxed) + c);
                let done = futures::stream::iter(0..)
                    .take_while(|_| {
                        let i = next.load(Ordering::Relaxed);
                        let more = stop_at.is_none_or(|s| i < s)
                            && deadline.is_none_or(|d| Instant::now() < d);
                        std::future::ready(more)
                    })
                    .map(|_| {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let (http, base) = (http.clone(), base.clone());
                        async move { post(&http, &base, "growth", format!("g-{i}"), 1).await }
                    })
                    .buffer_unordered(concurrency)
                    .filter(|ok| std::future::ready(*ok))
                    .count()
                    .await;
                (done as u64, started.elapsed())
            }
        };
        let (done, elapsed) = run(None, Some(throughput_seconds)).await;
        let per_s = done as f64 / elapsed.as_secs_f64();
        report["durable_increments_per_s"] = json!(per_s);
        let pid = solo.pid().unwrap_or(0);
        let mut curve = Vec::new();
        let mut total_done = done;
        let growth_started = Instant::now();
        while total_done < growth_total {
            let step = growth_step.min(growth_total - total_done);
            let (done, elapsed) = run(Some(step), None).await;
            total_done += done;
            let body = debug(&http, &base, true).await;
            let point = json!({
                "increments": total_done,
                "step_per_s": done as f64 / elapsed.as_secs_f64(),
                "doc_bytes": body["doc_bytes"]["counter:growth"],
                "disk_bytes": body["disk_bytes"],
                "rss_bytes": status_bytes(pid, "VmRSS:"),
                "rss_peak_bytes": status_bytes(pid, "VmHWM:"),
                "automerge_ops": body["automerge_ops"],
                "changes": body["changes"],
                "epoch": body["epoch"],
            });
            eprintln!("{point}");
            curve.push(point);
            if growth_started.elapsed() > Duration::from_secs(env("GROWTH_SECONDS_MAX", 600)) {
                eprintln!("growth stopped at the time limit");
                break;
            }
        }
        report["growth"] = json!(curve);
        solo.sigterm(Duration::from_secs(60)).await?;
    }

    println!("{}", serde_json::to_string_pretty(&report)?);
    let mut out = std::io::stdout();
    writeln!(out, "\n| figure | value | floor |")?;
    writeln!(out, "|---|---|---|")?;
    writeln!(
        out,
        "| durable increments/s (1 replica, {concurrency} HTTP clients) | {:.0} | fdatasync {:.0}/s |",
        report["durable_increments_per_s"].as_f64().unwrap_or(0.0),
        fsync_per_s
    )?;
    for (i, lag) in report["lag"]["replicas"].as_array().into_iter().flatten().enumerate() {
        writeln!(
            out,
            "| replication lag at replica {i} p50 / p99 (ms) | {} / {} | NATS RTT p50 {:.0} µs, p99 {:.0} µs |",
            lag["p50"],
            lag["p99"],
            percentile(&rtt, 0.5),
            percentile(&rtt, 0.99)
        )?;
    }
    Ok(())
}
