//! The NATS sync layer against a real nats-server: convergence, late joiner, malformed payloads.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crdt_sync::sync::{SyncConfig, SyncedReplica};
use crdt_sync::{DocId, MemOpLog, Replica, ReplicaConfig};

/// Where nats-server may live when `NATS_SERVER` and `PATH` do not say.
const NATS_SERVER_PATHS: [&str; 2] = ["/usr/bin/nats-server", "/usr/sbin/nats-server"];
/// How long a condition may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(10);

/// A nats-server with JetStream on a free loopback port, killed on drop.
struct NatsServer {
    child: Child,
    url: String,
    _store: tempfile::TempDir,
}

impl NatsServer {
    fn start() -> NatsServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("free port")
            .port();
        let store = tempfile::tempdir().expect("temp dir");
        let child = Command::new(nats_server_binary())
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        let server = NatsServer { child, url: format!("nats://127.0.0.1:{port}"), _store: store };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < DEADLINE, "nats-server never listened");
            std::thread::sleep(POLL);
        }
        server
    }
}

fn nats_server_binary() -> String {
    if let Ok(path) = std::env::var("NATS_SERVER") {
        return path;
    }
    let on_path = std::env::var("PATH").unwrap_or_default().split(':').find_map(|dir| {
        let candidate = std::path::Path::new(dir).join("nats-server");
        candidate.exists().then(|| candidate.display().to_string())
    });
    on_path
        .or_else(|| {
            NATS_SERVER_PATHS
                .iter()
                .find(|path| std::path::Path::new(path).exists())
                .map(|path| (*path).to_owned())
        })
        .expect("nats-server not found (set NATS_SERVER)")
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config() -> SyncConfig {
    SyncConfig { anti_entropy_interval_ms: 300, tick_interval_ms: 20, ..SyncConfig::default() }
}

async fn start(server: &NatsServer, node: &str, members: &[&str]) -> SyncedReplica<MemOpLog> {
    let replica = Replica::new(ReplicaConfig::new(node, members), MemOpLog::new());
    start_replica(server, replica.expect("replica")).await
}

async fn start_replica(server: &NatsServer, replica: Replica<MemOpLog>) -> SyncedReplica<MemOpLog> {
    let started = Instant::now();
    let mut replica = Some(replica);
    loop {
        let client = async_nats::connect(&server.url).await.expect("connect");
        // JetStream may take a moment after the port opens; a failed start keeps nothing,
        // so the replica is rebuilt from its log for the next attempt.
        let taken = replica.take().expect("replica");
        let members: Vec<String> = taken.members().to_vec();
        let members: Vec<&str> = members.iter().map(String::as_str).collect();
        let replica_config = ReplicaConfig::new(taken.node_id(), &members);
        let log = taken.log().clone();
        match SyncedReplica::start(client, taken, config()).await {
            Ok(synced) => return synced,
            Err(error) => {
                assert!(started.elapsed() < DEADLINE, "sync start: {error}");
                replica = Some(Replica::recover(replica_config, log, None).expect("recover"));
                tokio::time::sleep(POLL).await;
            }
        }
    }
}

/// Polls `condition` until it holds or the deadline passes.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

fn counter(replica: &SyncedReplica<MemOpLog>, doc: &DocId) -> (i64, usize) {
    replica.read(|r| r.counter(doc).expect("counter").map_or((0, 0), |c| (c.value, c.live_ops)))
}

fn increment(replica: &SyncedReplica<MemOpLog>, doc: &DocId, op_id: &str) -> bool {
    replica.update(doc, |r, now_ms| r.increment(doc, op_id, 1, now_ms)).expect("increment").applied
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_converge_with_duplicates_across_replicas() {
    let server = NatsServer::start();
    let members = ["a", "b", "c"];
    let mut replicas = Vec::new();
    for node in members {
        replicas.push(start(&server, node, &members).await);
    }
    let doc = DocId::counter("production").unwrap();
    // 600 requests, 200 distinct op_ids: each op_id lands on three
    // replicas, the same one twice or two different ones.
    for i in 0..600usize {
        let op_id = format!("op-{}", i % 200);
        let target = (i * 7 / 3) % 3;
        increment(&replicas[target], &doc, &op_id);
    }
    eventually("every replica at 200 with all entries folded", || {
        replicas.iter().all(|r| counter(r, &doc) == (200, 0))
    })
    .await;
    let mut lag: Vec<u64> = replicas.iter().flat_map(|r| r.lag_samples_ms()).collect();
    lag.sort_unstable();
    assert!(!lag.is_empty(), "no batch was received over JetStream");
    println!(
        "replication lag over {} batches: p50 {} ms, p99 {} ms, max {} ms",
        lag.len(),
        lag[lag.len() / 2],
        lag[lag.len() * 99 / 100],
        lag[lag.len() - 1]
    );
    for replica in &replicas {
        assert_eq!(replica.metrics().messages_rejected, 0);
        replica.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_after_a_quiet_spell_is_published_at_once_and_its_lag_is_split_in_stages() {
    let server = NatsServer::start();
    let members = ["a", "b"];
    // Nothing but the increments is published: no ticks, no anti-entropy after the first
    // round (core NATS, not the publisher).
    let flush_interval = Duration::from_secs(2);
    let quiet = SyncConfig {
        flush_interval_ms: flush_interval.as_millis() as u64,
        anti_entropy_interval_ms: 600_000,
        tick_interval_ms: 600_000,
        ..SyncConfig::default()
    };
    let mut replicas = Vec::new();
    for node in members {
        let client = async_nats::connect(&server.url).await.expect("connect");
        let replica =
            Replica::new(ReplicaConfig::new(node, &members), MemOpLog::new()).expect("replica");
        replicas.push(SyncedReplica::start(client, replica, quiet.clone()).await.expect("start"));
    }
    let (a, b) = (&replicas[0], &replicas[1]);
    let doc = DocId::counter("production").unwrap();

    let started = Instant::now();
    assert!(increment(a, &doc, "first"));
    eventually("b sees the first increment", || counter(b, &doc).0 == 1).await;
    // The publisher had published nothing before: the batch left without waiting for a
    // flush interval.
    assert!(
        started.elapsed() < flush_interval,
        "the first batch took {:?}, a whole flush interval",
        started.elapsed()
    );
    let samples = b.lag_samples();
    assert_eq!(samples.len(), 1);
    let sample = samples[0];
    let stages = sample.queued_us.expect("publish time sent")
        + sample.transit_us.expect("publish time sent")
        + sample.waited_us
        + sample.applied_us;
    assert_eq!(stages, sample.total_us, "the stages add up to the lag: {sample:?}");

    // Right after a publish, the next batch waits for its cycle, and still arrives.
    assert!(increment(a, &doc, "second"));
    eventually("b sees the second increment", || counter(b, &doc).0 == 2).await;
    for replica in &replicas {
        replica.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_never_published_arrives_by_heads_and_quiet_rounds_send_only_heads() {
    let server = NatsServer::start();
    let members = ["a", "b"];
    let doc = DocId::counter("production").unwrap();
    // a holds a change it never published, and its start round finished before b existed:
    // only a's heads rounds can tell b about it.
    let mut replica = Replica::new(ReplicaConfig::new("a", &members), MemOpLog::new()).unwrap();
    assert!(replica.increment(&doc, "unpublished", 1, 1).unwrap().applied);
    let a = start_replica(&server, replica).await;
    eventually("a's start round", || a.metrics().sync_sent >= 1).await;
    let b = start(&server, "b", &members).await;
    eventually("b at 1 by anti-entropy", || counter(&b, &doc).0 == 1).await;
    assert!(b.metrics().heads_lacking >= 1, "{:?}", b.metrics());
    // Steady state (ticks keep writing acks and folds, delivered live): rounds send heads,
    // and no automerge sync message goes either way.
    increment(&a, &doc, "live");
    eventually("b at 2", || counter(&b, &doc).0 == 2).await;
    let heads_a = a.metrics().heads_sent;
    eventually("a heads round", || a.metrics().heads_sent > heads_a).await;
    let sync_sent = |r: &SyncedReplica<MemOpLog>| r.metrics().sync_sent;
    let lacking = |r: &SyncedReplica<MemOpLog>| r.metrics().heads_lacking;
    let before = (sync_sent(&a), sync_sent(&b), lacking(&a), lacking(&b));
    let heads_a = a.metrics().heads_sent;
    eventually("three more heads rounds", || a.metrics().heads_sent >= heads_a + 3).await;
    assert_eq!((sync_sent(&a), sync_sent(&b), lacking(&a), lacking(&b)), before);
    for replica in [a, b] {
        replica.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_replica_catches_up_by_anti_entropy() {
    let server = NatsServer::start();
    let members = ["a", "b", "c"];
    let a = start(&server, "a", &members).await;
    let b = start(&server, "b", &members).await;
    let doc = DocId::counter("production").unwrap();
    let flags = DocId::set("flags").unwrap();
    for i in 0..50 {
        increment(&a, &doc, &format!("op-{i}"));
    }
    a.update(&flags, |r, now_ms| r.set_add(&flags, "beta", now_ms)).unwrap();
    eventually("b at 50", || counter(&b, &doc).0 == 50).await;
    // c never acked: nothing can be folded yet.
    assert_eq!(counter(&a, &doc).1, 50);

    // c starts after the batches were published: its consumer starts at
    // new messages, so only anti-entropy can bring the history.
    let c = start(&server, "c", &members).await;
    eventually("c at 50 and everything folded", || {
        [&a, &b, &c].iter().all(|r| counter(r, &doc) == (50, 0))
    })
    .await;
    eventually("c has the set", || {
        c.read(|r| r.set_members(&flags).unwrap()) == vec!["beta".to_owned()]
    })
    .await;
    // A retry at the newcomer is recognised.
    assert!(!increment(&c, &doc, "op-7"));
    for replica in [a, b, c] {
        replica.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_replica_gets_a_history_larger_than_one_nats_message() {
    let server = NatsServer::start();
    let members = ["a", "b"];
    let a = start(&server, "a", &members).await;
    let doc = DocId::register("device-config").unwrap();
    // 60 versions of a 60 kB value of random letters: automerge keeps them all, so the sync
    // message b needs (about as large as the compressed saved document) is more than twice
    // nats-server's 1 MiB max_payload.
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut value = String::new();
    for version in 1..=60 {
        value = (0..60_000)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                char::from(
                    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                        [(seed % 62) as usize],
                )
            })
            .collect();
        let json = serde_json::Value::String(value.clone());
        a.update(&doc, |r, now_ms| r.set_register(&doc, &json, version, now_ms)).expect("set");
    }
    let saved = a.read(|r| r.doc_bytes(&doc)).expect("a holds the register");
    assert!(saved > 2 * 1024 * 1024, "the history is only {saved} bytes");

    let b = start(&server, "b", &members).await;
    eventually("b has the last version", || {
        b.read(|r| r.register(&doc).expect("register")).is_some_and(|r| r.version == 60)
    })
    .await;
    let at_b = b.read(|r| r.register(&doc).expect("register")).expect("present");
    assert_eq!(at_b.value, serde_json::Value::String(value));
    assert_eq!(b.metrics().messages_rejected, 0);
    for replica in [a, b] {
        replica.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads_are_rejected_and_the_replica_keeps_working() {
    let server = NatsServer::start();
    let members = ["a", "b"];
    let a = start(&server, "a", &members).await;
    let b = start(&server, "b", &members).await;
    let doc = DocId::counter("production").unwrap();
    let client = async_nats::connect(&server.url).await.unwrap();
    let jetstream = async_nats::jetstream::new(client.clone());
    jetstream
        .publish("edge.crdt.counter:production.changes.x", "garbage".into())
        .await
        .unwrap()
        .await
        .unwrap();
    client.publish("edge.crdt.counter:production.sync.x.a", "junk".into()).await.unwrap();
    client.flush().await.unwrap();
    eventually("both replicas reject the batch and a the sync message", || {
        a.metrics().messages_rejected >= 2 && b.metrics().messages_rejected >= 1
    })
    .await;
    increment(&b, &doc, "op-1");
    eventually("a applies b's increment", || counter(&a, &doc).0 == 1).await;
    a.stop();
    b.stop();
}
