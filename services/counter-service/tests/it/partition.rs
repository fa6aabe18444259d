//! Three replicas, one cut from NATS by a proxy: 10,000 increments (duplicates to the same
//! and to other replicas) over all three, then heal: every replica shows the exact total.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use testkit::{NatsServer, Proxy, wait_until};

use crate::support::{self, Op, WAIT};

const NODES: [&str; 3] = ["a", "b", "c"];
const DISTINCT_OPS: usize = 8_500;
const DUPLICATES: usize = 1_500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_replica_keeps_writing_and_all_converge_on_heal() {
    let Some(nats) = testkit::require("partition", NatsServer::start()) else { return };
    let proxy = Proxy::start(([127, 0, 0, 1], nats.port()).into()).await.unwrap();
    let proxied_url = format!("nats://127.0.0.1:{}", proxy.port());
    let replicas = support::start_all(
        vec![
            support::spec("a", &NODES, &nats.url()),
            support::spec("b", &NODES, &nats.url()),
            support::spec("c", &NODES, &proxied_url),
        ],
        true,
    )
    .await;
    let urls: Vec<String> = replicas.iter().map(|r| r.base_url()).collect();

    proxy.cut();
    wait_until("c sees NATS gone and stays ready", WAIT, || async {
        support::nats_state(&replicas[2]).await.filter(|(s, n)| *s == 200 && n != "ok")
    })
    .await
    .unwrap();

    // The plan: distinct ops with random non-zero amounts, plus retries of some of them to
    // the same replica or to another one, all shuffled (a retry may race its original).
    let mut rng = StdRng::seed_from_u64(6);
    let mut ops: Vec<Op> = (0..DISTINCT_OPS)
        .map(|i| {
            let amount = loop {
                let a = rng.random_range(-3..=10);
                if a != 0 {
                    break a;
                }
            };
            Op { op_id: format!("load-{i}"), amount, target: rng.random_range(0..3) }
        })
        .collect();
    let expected: i64 = ops.iter().map(|op| op.amount).sum();
    let mut to_other = 0;
    for _ in 0..DUPLICATES {
        let mut retry = ops[rng.random_range(0..DISTINCT_OPS)].clone();
        if rng.random_bool(0.5) {
            retry.target = (retry.target + rng.random_range(1..3)) % 3;
            to_other += 1;
        }
        ops.push(retry);
    }
    for i in (1..ops.len()).rev() {
        ops.swap(i, rng.random_range(0..=i));
    }

    let http = reqwest::Client::new();
    let started = std::time::Instant::now();
    let outcomes = support::send_all(&http, &urls, "load", &ops).await;
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for outcome in &outcomes {
        let (status, body) = outcome.as_ref().expect("request failed");
        assert_eq!(*status, 200, "{body}");
        *by_status.entry(*status).or_default() += 1;
    }
    eprintln!(
        "{} increments ({to_other} retries to another replica) acknowledged in {:?}",
        ops.len(),
        started.elapsed()
    );
    // While cut off, c knows only what it was sent.
    let (c_value, _) = support::counter(&replicas[2], "load").await.unwrap();
    assert_ne!(c_value, expected, "c cannot have the others' increments yet");

    proxy.restore();
    let refs: Vec<&testkit::ServiceProcess> = replicas.iter().collect();
    support::wait_converged(&refs, "load", expected).await;
    // Folding and retries after convergence change nothing.
    let retry = &ops[0];
    for url in &urls {
        let (status, _) =
            support::increment(&http, url, "load", &retry.op_id, retry.amount).await.unwrap();
        assert_eq!(status, 200);
    }
    support::wait_converged(&refs, "load", expected).await;
    // a and b replicated to each other over the stream: their lag and its stages show.
    for replica in &replicas[..2] {
        let (_, body) = replica.get_json("/debug/sync").await.unwrap();
        let stages = &body["lag_ms"]["stages_us"];
        for stage in ["total", "queued", "transit", "waited", "applied"] {
            let p50 = stages[stage]["p50"].as_u64();
            let max = stages[stage]["max"].as_u64();
            assert!(p50.is_some() && p50 <= max, "{stage}: {stages}");
        }
    }
}
