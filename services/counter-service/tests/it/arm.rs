//! The arm-controller's cycle increments (its outbox, op_id = cycle event id) are counted
//! exactly once by the replicas, through a retried cycle and a SIGKILL of the controller.

use serde_json::json;
use testkit::{NatsServer, ServiceProcess, ServiceSpec, wait_until};

use crate::support::{self, WAIT};

const NODES: [&str; 2] = ["a", "b"];

async fn post_cycle(arm: &ServiceProcess, arm_id: &str, id: &str) {
    let (status, body) = arm
        .send_json(reqwest::Method::POST, &format!("/arms/{arm_id}/cycles"), &json!({"id": id}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm_controller_cycles_are_counted_exactly_once() {
    let Some(nats) = testkit::require("arm", NatsServer::start()) else { return };
    let Some(arm_bin) = testkit::require("arm", testkit::process::binary("arm-controller")) else {
        return;
    };
    let replicas = support::start_all(
        NODES.iter().map(|node| support::spec(node, &NODES, &nats.url())).collect(),
        true,
    )
    .await;
    let refs: Vec<&ServiceProcess> = replicas.iter().collect();
    let mut arm = ServiceProcess::start(ServiceSpec::new(arm_bin, nats.url()).args([
        "--arm-count",
        "2",
        "--safety-timeout-ms",
        "60000",
        "--sensor-timeout-ms",
        "0",
        "--aggregate-interval-ms",
        "0",
    ]))
    .unwrap();
    arm.wait_ready().await.unwrap();

    for i in 0..20 {
        post_cycle(&arm, if i % 2 == 0 { "arm-001" } else { "arm-002" }, &format!("c{i}")).await;
    }
    // Retried cycles (same id) are the same cycles.
    post_cycle(&arm, "arm-001", "c0").await;
    post_cycle(&arm, "arm-002", "c5").await;
    support::wait_converged(&refs, "production", 20).await;

    // Crash the controller with increments possibly in flight; its outbox re-sends from
    // its stored cursor after the restart.
    for i in 20..30 {
        post_cycle(&arm, "arm-001", &format!("c{i}")).await;
    }
    arm.sigkill();
    arm.restart().unwrap();
    arm.wait_ready().await.unwrap();
    for i in 30..35 {
        post_cycle(&arm, "arm-002", &format!("c{i}")).await;
    }
    post_cycle(&arm, "arm-001", "c20").await;
    support::wait_converged(&refs, "production", 35).await;
    wait_until("controller's counter outbox caught up", WAIT, || async {
        (support::metric(&arm, "keel_arm_outbox_lag_events", "counter").await == Some(0.0))
            .then_some(())
    })
    .await
    .unwrap();
    support::wait_converged(&refs, "production", 35).await;
}
