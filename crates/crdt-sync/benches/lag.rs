//! Replication lag between 3 replicas over a real nats-server at a steady increment rate, beside the NATS round trip.
//!
//! `cargo bench -p crdt-sync --bench lag -- [rate_per_s] [seconds]`
//! (defaults 1,000 and 10). Starts its own nats-server (`NATS_SERVER`,
//! PATH, /usr/bin or /usr/sbin) with JetStream on a free port.

use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crdt_sync::sync::{SyncConfig, SyncedReplica};
use crdt_sync::{DocId, MemOpLog, Replica, ReplicaConfig};
use futures::StreamExt;

/// Round trips measured for the NATS floor.
const ROUND_TRIPS: usize = 2_000;

fn arg(index: usize, default: u64) -> u64 {
    std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .nth(index)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn nats_server_binary() -> String {
    if let Ok(path) = std::env::var("NATS_SERVER") {
        return path;
    }
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|dir| std::path::Path::new(dir).join("nats-server"))
        .chain(["/usr/bin/nats-server".into(), "/usr/sbin/nats-server".into()])
        .find(|path| path.exists())
        .map(|path| path.display().to_string())
        .expect("nats-server not found (set NATS_SERVER)")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rate_per_s = arg(0, 1_000).max(1);
    let seconds = arg(1, 10).max(1);
    let port =
        TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let store = tempfile::tempdir().expect("temp dir");
    let mut server = Command::new(nats_server_binary())
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server starts");
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let url = format!("nats://127.0.0.1:{port}");

    // The floor: core NATS request/reply round trip in this run.
    let client = async_nats::connect(&url).await.expect("connect");
    let mut echo = client.subscribe("bench.echo").await.expect("subscribe");
    let responder = client.clone();
    let echo_task = tokio::spawn(async move {
        while let Some(message) = echo.next().await {
            if let Some(reply) = message.reply {
                let _ = responder.publish(reply, message.payload).await;
            }
        }
    });
    let mut rtt_ms = Vec::with_capacity(ROUND_TRIPS);
    for _ in 0..ROUND_TRIPS {
        let started = Instant::now();
        client.request("bench.echo", "x".into()).await.expect("echo");
        rtt_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    echo_task.abort();
    rtt_ms.sort_by(f64::total_cmp);

    let members = ["a", "b", "c"];
    let mut replicas = Vec::new();
    for node in members {
        let mut attempts = 0;
        let synced = loop {
            let client = async_nats::connect(&url).await.expect("connect");
            let replica =
                Replica::new(ReplicaConfig::new(node, &members), MemOpLog::new()).expect("replica");
            match SyncedReplica::start(client, replica, SyncConfig::default()).await {
                Ok(synced) => break synced,
                Err(error) => {
                    attempts += 1;
                    assert!(attempts < 500, "sync start: {error}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        replicas.push(synced);
    }
    let doc = DocId::counter("production").expect("doc id");
    let total = rate_per_s * seconds;
    let period = Duration::from_secs_f64(1.0 / rate_per_s as f64);
    let started = Instant::now();
    for i in 0..total {
        let due = started + period * i as u32;
        let now = Instant::now();
        if due > now {
            tokio::time::sleep(due - now).await;
        }
        let replica = &replicas[(i % 3) as usize];
        replica
            .update(&doc, |r, now_ms| r.increment(&doc, &format!("cycle-{i:09}"), 1, now_ms))
            .expect("increment");
    }
    let sent_in = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    while replicas
        .iter()
        .any(|r| r.read(|r| r.counter(&doc).ok().flatten().map_or(0, |c| c.value)) != total as i64)
    {
        assert!(Instant::now() < deadline, "replicas did not converge");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let converged_in = started.elapsed();
    let mut lag_ms: Vec<f64> =
        replicas.iter().flat_map(|r| r.lag_samples_ms()).map(|ms| ms as f64).collect();
    lag_ms.sort_by(f64::total_cmp);
    println!(
        "3 replicas, {total} increments at {rate_per_s}/s (sent in {:.2} s, all converged at {:.2} s)",
        sent_in.as_secs_f64(),
        converged_in.as_secs_f64()
    );
    println!(
        "replication lag over {} received batches: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (ms resolution)",
        lag_ms.len(),
        percentile(&lag_ms, 0.5),
        percentile(&lag_ms, 0.99),
        percentile(&lag_ms, 1.0)
    );
    println!(
        "NATS request/reply round trip, same run, {ROUND_TRIPS} requests: p50 {:.3} ms, p99 {:.3} ms",
        percentile(&rtt_ms, 0.5),
        percentile(&rtt_ms, 0.99)
    );
    for replica in &replicas {
        let metrics = replica.metrics();
        let doc_bytes = replica.read(|r| r.doc_bytes(&doc)).unwrap_or(0);
        println!(
            "  published {} batches, received {}, dropped {}, rejected {}; doc {} bytes",
            metrics.batches_published,
            metrics.batches_received,
            metrics.batches_dropped,
            metrics.messages_rejected,
            doc_bytes
        );
        replica.stop();
    }
    let _ = server.kill();
    let _ = server.wait();
}
