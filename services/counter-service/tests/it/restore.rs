//! A replica restored without its data directory: anti-entropy gives it the counter at the
//! current epoch, and a peer's archive the op_ids sealed in the epochs before, so retries
//! of increments acknowledged epochs ago count once there too.

use serde_json::Value;
use testkit::{NatsServer, ServiceProcess, wait_until};

use crate::support::{self, Op, WAIT};

const NODES: [&str; 3] = ["a", "b", "c"];
const OPS: usize = 900;
const ROUND_OPS: usize = 100;
/// Epochs the counter moves through before c loses its data, so that the earliest op_ids
/// are sealed in the archive only (not in the current or the previous epoch's document).
const EPOCHS_MIN: u64 = 4;

async fn debug_sync(replica: &ServiceProcess) -> Option<Value> {
    let (status, body) = replica.get_json("/debug/sync").await.ok()?;
    (status == 200).then_some(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restored_without_its_data_dir_counts_old_retries_once() {
    let Some(nats) = testkit::require("restore", NatsServer::start()) else { return };
    let specs = NODES
        .iter()
        .map(|node| support::spec(node, &NODES, &nats.url()).args(["--epoch-changes", "40"]))
        .collect();
    let mut replicas = support::start_all(specs, true).await;
    let urls: Vec<String> = replicas.iter().map(ServiceProcess::base_url).collect();
    let http = reqwest::Client::new();
    let ops: Vec<Op> =
        (0..OPS).map(|i| Op { op_id: format!("restore-{i}"), amount: 1, target: i % 3 }).collect();
    // In rounds, each converged before the next, so the counter changes epochs on the way.
    for (round, chunk) in ops.chunks(ROUND_OPS).enumerate() {
        for outcome in support::send_all(&http, &urls, "restore", chunk).await {
            let (status, body) = outcome.unwrap();
            assert_eq!(status, 200, "{body}");
        }
        let refs: Vec<&ServiceProcess> = replicas.iter().collect();
        support::wait_converged(&refs, "restore", ((round + 1) * ROUND_OPS) as i64).await;
    }
    let epoch = |body: &Value| body["epoch"].as_u64().unwrap_or(0);
    wait_until("the counter past a few epochs", WAIT, || async {
        let body = debug_sync(&replicas[0]).await?;
        (epoch(&body) >= EPOCHS_MIN).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", replicas[0].log_tail(30)));

    // c loses its disk: killed, its data directory removed, started again on an empty one.
    replicas[2].sigkill();
    std::fs::remove_dir_all(replicas[2].data_dir().join("data")).unwrap();
    replicas[2].restart().unwrap();
    replicas[2].wait_ready().await.unwrap();
    support::wait_synced(&replicas[2]).await;
    let restored = wait_until("c has the counter and its peers' archive", WAIT, || async {
        let body = debug_sync(&replicas[2]).await?;
        let (total, _) = support::counter(&replicas[2], "restore").await?;
        (total == OPS as i64 && epoch(&body) >= EPOCHS_MIN && body["archives_wanted"] == 0)
            .then_some(body)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", replicas[2].log_tail(30)));
    assert!(restored["sync"]["archive_chunks_received"].as_u64().unwrap_or(0) >= 1, "{restored}");

    // Every increment retried at c, the oldest first: none counts again, at c or anywhere.
    let at_c: Vec<Op> = ops.iter().map(|op| Op { target: 2, ..op.clone() }).collect();
    for outcome in support::send_all(&http, &urls, "restore", &at_c).await {
        let (status, body) = outcome.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let (after, _) = support::counter(&replicas[2], "restore").await.unwrap();
    assert_eq!(after, OPS as i64, "retries at the restored replica counted again");
    let refs: Vec<&ServiceProcess> = replicas.iter().collect();
    support::wait_converged(&refs, "restore", OPS as i64).await;
}
