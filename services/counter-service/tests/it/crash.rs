//! SIGKILL a replica mid-load: every increment it acknowledged is in its log after the
//! restart (re-sending them to it alone changes nothing), and after the heal every replica
//! shows the exact total of all increments, each counted once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use testkit::{NatsServer, Proxy, wait_until};

use crate::support::{self, Op, WAIT};

const NODES: [&str; 3] = ["a", "b", "c"];
const OPS: usize = 3_000;
const KILL_AFTER_ACKS: usize = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_increments_survive_sigkill_and_count_once() {
    let Some(nats) = testkit::require("crash", NatsServer::start()) else { return };
    let proxy = Proxy::start(([127, 0, 0, 1], nats.port()).into()).await.unwrap();
    let proxied_url = format!("nats://127.0.0.1:{}", proxy.port());
    let mut replicas = support::start_all(
        vec![
            support::spec("a", &NODES, &nats.url()),
            support::spec("b", &NODES, &proxied_url),
            support::spec("c", &NODES, &nats.url()),
        ],
        true,
    )
    .await;
    let urls: Vec<String> = replicas.iter().map(|r| r.base_url()).collect();
    let ops: Vec<Op> = (0..OPS)
        .map(|i| Op { op_id: format!("crash-{i}"), amount: (i % 7 + 1) as i64, target: i % 3 })
        .collect();
    let expected: i64 = ops.iter().map(|op| op.amount).sum();

    let acks = Arc::new(AtomicUsize::new(0));
    let http = reqwest::Client::new();
    let load = {
        let (http, urls, ops, acks) = (http.clone(), urls.clone(), ops.clone(), acks.clone());
        tokio::spawn(async move {
            use futures::StreamExt;
            // Each op goes to its replica; if that one does not answer 200, the client
            // retries it at the next replica until one acknowledges it.
            futures::stream::iter(ops.into_iter().map(|op| {
                let (http, urls, acks) = (&http, &urls, &acks);
                async move {
                    for attempt in 0..30 {
                        let target = (op.target + attempt) % 3;
                        if let Ok((200, _)) =
                            support::increment(http, &urls[target], "crash", &op.op_id, op.amount)
                                .await
                        {
                            acks.fetch_add(1, Ordering::Relaxed);
                            return (op, target);
                        }
                    }
                    panic!("{} never acknowledged", op.op_id);
                }
            }))
            .buffer_unordered(support::CONCURRENCY)
            .collect::<Vec<(Op, usize)>>()
            .await
        })
    };
    wait_until("load under way", WAIT, || async {
        (acks.load(Ordering::Relaxed) >= KILL_AFTER_ACKS).then_some(())
    })
    .await
    .unwrap();
    replicas[1].sigkill();
    let acked = load.await.unwrap();
    assert_eq!(acked.len(), OPS);
    let acked_by_b: Vec<&Op> =
        acked.iter().filter(|(_, target)| *target == 1).map(|(op, _)| op).collect();
    assert!(acked_by_b.len() > KILL_AFTER_ACKS / 10, "b acknowledged {}", acked_by_b.len());

    // b comes back alone (its NATS link cut): what it shows is what it had on disk.
    proxy.cut();
    replicas[1].restart().unwrap();
    replicas[1].wait_ready().await.unwrap();
    let (before, _) = support::counter(&replicas[1], "crash").await.unwrap();
    for op in &acked_by_b {
        let (status, body) =
            support::increment(&http, &urls[1], "crash", &op.op_id, op.amount).await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let (after, _) = support::counter(&replicas[1], "crash").await.unwrap();
    assert_eq!(
        before,
        after,
        "re-sending the {} increments b acknowledged before SIGKILL must change nothing\n{}",
        acked_by_b.len(),
        replicas[1].log_tail(40)
    );

    proxy.restore();
    let refs: Vec<&testkit::ServiceProcess> = replicas.iter().collect();
    support::wait_converged(&refs, "crash", expected).await;
}
