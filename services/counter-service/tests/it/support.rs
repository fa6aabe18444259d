//! Shared helpers: replicas with their flags, increments over HTTP, convergence waits.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use testkit::{ServiceProcess, ServiceSpec, wait_until};

pub const BIN: &str = env!("CARGO_BIN_EXE_counter-service");
/// Deadline of every wait. Convergence after the partition test's heal took 2-25 s in
/// debug builds on 2 shared cores (automerge applies of thousands of changes).
pub const WAIT: Duration = Duration::from_secs(120);
/// Interval between convergence checks.
pub const CONVERGENCE_POLL: Duration = Duration::from_millis(200);
/// Requests in flight while loading.
pub const CONCURRENCY: usize = 48;

/// One increment of a planned load.
#[derive(Debug, Clone)]
pub struct Op {
    pub op_id: String,
    pub amount: i64,
    /// Index of the replica it is sent to.
    pub target: usize,
}

/// A replica `node` of `nodes`, with fast anti-entropy for tests and a 20 ms flush interval:
/// coalescing keeps the debug build's automerge applies (a pass over the document each) off
/// the critical path of 10,000 increments on 2 cores.
pub fn spec(node: &str, nodes: &[&str], nats_url: &str) -> ServiceSpec {
    ServiceSpec::new(BIN, nats_url).args([
        "--node-id",
        node,
        "--peers",
        &nodes.join(","),
        "--anti-entropy-interval-ms",
        "500",
        "--tick-interval-ms",
        "100",
        "--flush-interval-ms",
        "20",
    ])
}

/// Starts every spec, then waits until each is ready and its sync layer runs (when
/// `synced`).
pub async fn start_all(specs: Vec<ServiceSpec>, synced: bool) -> Vec<ServiceProcess> {
    let mut replicas: Vec<ServiceProcess> =
        specs.into_iter().map(|spec| ServiceProcess::start(spec).unwrap()).collect();
    for replica in &mut replicas {
        replica.wait_ready().await.unwrap();
        if synced {
            wait_synced(replica).await;
        }
    }
    replicas
}

pub async fn wait_synced(replica: &ServiceProcess) {
    wait_until("sync layer started", WAIT, || async {
        let (_, body) = replica.get_json("/debug/sync").await.ok()?;
        (body["synced"] == true).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", replica.log_tail(20)));
}

/// The `nats` component of `/readyz` and the status.
pub async fn nats_state(replica: &ServiceProcess) -> Option<(u16, String)> {
    let (status, body) = replica.get_json("/readyz").await.ok()?;
    Some((status, body["components"]["nats"].as_str()?.to_owned()))
}

/// POSTs one increment to `base_url`.
pub async fn increment(
    http: &reqwest::Client,
    base_url: &str,
    name: &str,
    op_id: &str,
    amount: i64,
) -> anyhow::Result<(u16, Value)> {
    let resp = http
        .post(format!("{base_url}/counters/{name}/increment"))
        .json(&json!({"amount": amount, "op_id": op_id}))
        .send()
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

/// Sends `ops` to `base_urls[op.target]` with [`CONCURRENCY`] in flight; returns each
/// outcome in the order of `ops`.
pub async fn send_all(
    http: &reqwest::Client,
    base_urls: &[String],
    name: &str,
    ops: &[Op],
) -> Vec<anyhow::Result<(u16, Value)>> {
    futures::stream::iter(ops.iter().map(|op| {
        let url = base_urls[op.target].clone();
        async move { increment(http, &url, name, &op.op_id, op.amount).await }
    }))
    .buffered(CONCURRENCY)
    .collect()
    .await
}

/// `GET /counters/{name}`: the total and the sum of the per-replica contributions.
pub async fn counter(replica: &ServiceProcess, name: &str) -> Option<(i64, i64)> {
    let (status, body) = replica.get_json(&format!("/counters/{name}")).await.ok()?;
    if status != 200 {
        return None;
    }
    let total = body["value"].as_i64()?;
    let parts = body["replicas"].as_object()?.values().filter_map(Value::as_i64).sum();
    Some((total, parts))
}

/// Waits until every replica shows `expected` (and its contributions sum to it).
pub async fn wait_converged(replicas: &[&ServiceProcess], name: &str, expected: i64) {
    let started = std::time::Instant::now();
    let result = wait_until(&format!("{name} == {expected} on every replica"), WAIT, || async {
        // A read folds the whole counter under the replica lock (O(live entries), slow in
        // debug builds): poll at 5 Hz, not at wait_until's 100 Hz, so the reads do not starve
        // the convergence they wait for.
        tokio::time::sleep(CONVERGENCE_POLL).await;
        for replica in replicas {
            if counter(replica, name).await != Some((expected, expected)) {
                return None;
            }
        }
        Some(())
    })
    .await;
    if let Err(err) = result {
        let mut seen = Vec::new();
        let mut tail = String::new();
        for replica in replicas {
            let value = counter(replica, name).await;
            if tail.is_empty() && value != Some((expected, expected)) {
                let sync = replica.get_json("/debug/sync").await.map(|(_, b)| b).ok();
                tail = format!("{sync:?}\n{}", replica.log_tail(30));
            }
            seen.push(value);
        }
        panic!("{err}: saw {seen:?}\n{tail}");
    }
    eprintln!("converged on {expected} in {:?}", started.elapsed());
}

/// Value of the first `/metrics` line starting with `name` and containing `label`.
pub async fn metric(replica: &ServiceProcess, name: &str, label: &str) -> Option<f64> {
    let text = replica.http().get(replica.url("/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines()
        .filter(|line| line.starts_with(name) && line.contains(label))
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
}
