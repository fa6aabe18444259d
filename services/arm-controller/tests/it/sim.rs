//! arm-sim against the real controller (briefly, at a light rate): plans, cycles and sensor
//! frames all land, every sample sent is counted by the controller, nothing errs, and the
//! arms stay running (the simulated sensors follow the plans).

use clap::Parser;

use crate::support;

#[tokio::test]
async fn arm_sim_drives_the_controller_without_errors() {
    let Some(stack) = support::start(
        "arm-sim",
        &["--arm-count", "20", "--sensor-timeout-ms", "1000", "--aggregate-interval-ms", "200"],
    )
    .await
    else {
        return;
    };
    stack.wait_state("arm-020", "running").await;
    let url = stack.svc.base_url();
    let nats = stack.nats.url();
    let args = arm_sim::Args::try_parse_from([
        "arm-sim",
        "--arms",
        "20",
        "--controller-url",
        &url,
        "--nats-url",
        &nats,
        "--sensor-hz",
        "200",
        "--plan-hz",
        "5",
        "--cycle-hz",
        "1",
        "--duration-s",
        "3",
        "--progress-ms",
        "0",
    ])
    .unwrap();
    args.validate().unwrap();
    let report = arm_sim::run(args).await.unwrap();
    assert!(report.plans.ok >= 100, "{report:?}");
    assert!(report.cycles.ok >= 20, "{report:?}");
    assert!(report.plans.errors.is_empty() && report.cycles.errors.is_empty(), "{report:?}");
    assert!(report.sensors.samples_sent >= 20 * 200, "{report:?}");
    assert_eq!(report.sensors.samples_received, Some(report.sensors.samples_sent), "{report:?}");
    assert!(report.plans.latency.p50_ms > 0.0);
    for i in 1..=20 {
        let status = stack.status(&format!("arm-{i:03}")).await;
        assert_eq!(status["state"], "running", "{status}");
    }
    let (_, verify) = stack.svc.get_json("/log/verify").await.unwrap();
    assert_eq!(verify["ok"], true);
    // Sensor aggregates were committed (one batch event per interval).
    assert!(
        support::metric(&stack.svc, "keel_arm_commits_total", "sensor.aggregates").await >= 5.0
    );
}
