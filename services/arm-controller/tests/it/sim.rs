//! arm-sim against the real controller (briefly, at a light rate): plans, cycles and sensor
//! frames all land, every sample sent is counted by the controller, nothing errs, and the
//! arms stay running (the simulated sensors follow the plans).

use clap::Parser;
use futures::StreamExt as _;

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

/// arm-sim's stand-in safety leader (`--fake-safety-leader`) answers an arm's e-stop request
/// with a newer committed clear `--fake-clear-after-ms` later, so a long benchmark resumes
/// after a latched stop, and it counts both in its report.
#[tokio::test]
async fn the_stand_in_leader_clears_a_latched_stop_and_counts_it() {
    let Some(stack) = support::start("arm-sim-leader", &["--arm-count", "2"]).await else {
        return;
    };
    stack.wait_state("arm-001", "running").await;
    // From now on only arm-sim's stand-in publishes the safety state.
    stack.set_leader(|l| l.silent = true);
    let args = arm_sim::Args::try_parse_from([
        "arm-sim",
        "--arms",
        "2",
        "--controller-url",
        &stack.svc.base_url(),
        "--nats-url",
        &stack.nats.url(),
        "--sensor-hz",
        "0",
        "--plan-hz",
        "0",
        "--cycle-hz",
        "0",
        "--progress-ms",
        "0",
        "--fake-safety-leader",
        "--fake-clear-after-ms",
        "200",
    ])
    .unwrap();
    args.validate().unwrap();
    let mut states = stack.client.subscribe(wire::subjects::SAFETY_STATE).await.unwrap();
    stack.client.flush().await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sim = tokio::spawn(arm_sim::run_until(args, async move {
        let _ = stopped.await;
    }));
    // The stand-in is up (it subscribed to e-stop requests before its first state).
    let stand_in = async {
        while let Some(message) = states.next().await {
            let state: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
            if state["reason"] == "arm-sim stand-in leader" {
                return;
            }
        }
    };
    tokio::time::timeout(support::WAIT, stand_in).await.expect("the stand-in never published");
    // A sample beyond the joint limit latches arm-001; the controller asks for an e-stop (only
    // when it latches), and the latch holds until a newer committed clear.
    let mut estops = stack.client.subscribe(wire::subjects::SAFETY_ESTOP).await.unwrap();
    stack.client.flush().await.unwrap();
    let sample =
        wire::Sample { ts_us: support::now_us(), joints: vec![0.0, 0.0, 3.3, 0.0, 0.0, 0.0] };
    let frame = wire::SensorFrame { arm: "arm-001".into(), seq: 1, samples: vec![sample] };
    stack
        .client
        .publish(
            wire::subjects::arm_sensor("arm-001"),
            prost::Message::encode_to_vec(&frame).into(),
        )
        .await
        .unwrap();
    let request = tokio::time::timeout(support::WAIT, estops.next()).await.unwrap().unwrap();
    let request: serde_json::Value = serde_json::from_slice(&request.payload).unwrap();
    assert!(request["reason"].as_str().unwrap().contains("arm-001"), "{request}");
    // The stand-in's newer clear releases it: running again can only come from that clear.
    stack.wait_state("arm-001", "running").await;
    assert_eq!(stack.status("arm-002").await["state"], "running");
    let _ = stop.send(());
    let report = sim.await.unwrap().unwrap();
    let leader = report.fake_leader.expect("a stand-in leader ran");
    assert!(leader.estop_requests >= 1 && leader.clears >= 1, "{leader:?}");
}
