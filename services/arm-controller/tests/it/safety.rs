//! Fail-safe stop: trips, committed states, the deadman, and the arm's own sensor check
//! (which asks the quorum for an e-stop). A stand-in leader plays safety-quorum on the wire.

use std::time::Duration;

use futures::StreamExt;
use prost::Message;
use serde_json::Value;
use testkit::wait_until;
use wire::{Sample, SensorFrame};

use crate::support::{self, WAIT, now_us, plan};

const J: [f64; 6] = [0.0; 6];

#[tokio::test]
async fn a_trip_stops_at_once_and_only_a_newer_committed_clear_resumes() {
    let Some(stack) = support::start("trip", &["--arm-count", "2"]).await else { return };
    stack.wait_state("arm-001", "running").await;
    assert_eq!(stack.put_plan("arm-001", &plan("a", 1, &J)).await.0, 200);

    stack.trip("operator pressed stop").await;
    let status = stack.wait_state("arm-002", "safe_stop").await;
    assert!(status["reason"].as_str().unwrap().contains("operator pressed stop"), "{status}");
    let (code, body) = stack.put_plan("arm-001", &plan("b", 2, &J)).await;
    assert_eq!((code, body["error"].as_str()), (423, Some("safe_stop")), "{body}");

    // Fresh heartbeats that repeat the clear committed before the trip (index 1) do not
    // resume: wait until many of them arrived after the trip.
    let before = support::metric(&stack.svc, "keel_arm_safety_trips_total", "").await;
    assert!(before >= 1.0);
    tokio::time::sleep(Duration::from_millis(20 * support::HEARTBEAT_MS)).await;
    assert_eq!(stack.status("arm-001").await["state"], "safe_stop");

    // The engage commits (index 2): still stopped. A clear commits (index 3): running.
    stack.set_leader(|l| {
        l.engaged = true;
        l.index = 2;
    });
    let status = stack.wait_state("arm-001", "safe_stop").await;
    assert!(status["reason"].is_string());
    stack.set_leader(|l| {
        l.engaged = false;
        l.index = 3;
    });
    stack.wait_state("arm-001", "running").await;
    stack.wait_state("arm-002", "running").await;
    let (code, body) = stack.put_plan("arm-001", &plan("b", 2, &J)).await;
    assert_eq!(code, 200, "{body}");
    let (_, plan_now) = stack.svc.get_json("/arms/arm-001/plan").await.unwrap();
    assert_eq!(plan_now["version"], 2);
}

#[tokio::test]
async fn heartbeat_silence_stops_every_arm_after_the_deadman() {
    let Some(stack) =
        support::start("deadman", &["--arm-count", "3", "--safety-timeout-ms", "100"]).await
    else {
        return;
    };
    stack.wait_state("arm-003", "running").await;
    stack.set_leader(|l| l.silent = true);
    for arm in ["arm-001", "arm-002", "arm-003"] {
        let status = stack.wait_state(arm, "safe_stop").await;
        assert!(status["reason"].as_str().unwrap().contains("heartbeat"), "{status}");
    }
    let (code, body) = stack.put_plan("arm-002", &plan("p", 1, &J)).await;
    assert_eq!((code, body["error"].as_str()), (423, Some("safe_stop")));
    // /readyz shows it (the watchdog's view, refreshed every few ms), still ready.
    wait_until("readyz safety: no_heartbeat", WAIT, || async {
        let (code, ready) = stack.svc.get_json("/readyz").await.ok()?;
        (code == 200 && ready["components"]["safety"] == "no_heartbeat").then_some(())
    })
    .await
    .unwrap();
    // No trip was heard: a fresh heartbeat of the committed clear is enough to resume.
    stack.set_leader(|l| l.silent = false);
    stack.wait_state("arm-002", "running").await;
    assert_eq!(stack.put_plan("arm-002", &plan("p", 1, &J)).await.0, 200);
}

fn frame(arm: &str, seq: u64, joints: &[[f64; 6]]) -> Vec<u8> {
    SensorFrame {
        arm: arm.into(),
        seq,
        samples: joints.iter().map(|j| Sample { ts_us: now_us(), joints: j.to_vec() }).collect(),
    }
    .encode_to_vec()
}

#[tokio::test]
async fn sensor_frames_fold_and_a_bad_sample_stops_the_arm_and_requests_an_estop() {
    let Some(stack) = support::start("sensors", &["--arm-count", "2"]).await else { return };
    stack.wait_state("arm-001", "running").await;
    assert_eq!(stack.put_plan("arm-001", &plan("p", 1, &J)).await.0, 200);
    let mut estops = stack.client.subscribe(wire::subjects::SAFETY_ESTOP).await.unwrap();
    stack.client.flush().await.unwrap();
    let sensor = wire::subjects::arm_sensor("arm-001");

    // Good frames fold into the live state.
    for seq in 1..=10 {
        let bytes = frame("arm-001", seq, &[[0.01, 0.0, 0.0, 0.0, 0.0, 0.0]; 4]);
        stack.client.publish(sensor.clone(), bytes.into()).await.unwrap();
    }
    // Garbage, a wrong joint count and an unknown arm are counted and dropped.
    stack.client.publish(sensor.clone(), vec![0xff, 0xff, 0xff].into()).await.unwrap();
    let short = SensorFrame {
        arm: "arm-001".into(),
        seq: 11,
        samples: vec![Sample { ts_us: 1, joints: vec![0.0] }],
    };
    stack.client.publish(sensor.clone(), short.encode_to_vec().into()).await.unwrap();
    stack
        .client
        .publish("edge.arm.arm-404.sensor", frame("arm-404", 1, &[J]).into())
        .await
        .unwrap();
    stack.client.flush().await.unwrap();
    let status = wait_until("40 samples folded", WAIT, || async {
        let s = stack.status("arm-001").await;
        (s["samples"] == 40).then_some(s)
    })
    .await
    .unwrap();
    assert_eq!(status["state"], "running");
    assert!(status["last_sample_age_ms"].as_u64().is_some());
    assert!((status["deviation_rad"].as_f64().unwrap() - 0.01).abs() < 1e-9, "{status}");
    wait_until("malformed frames counted", WAIT, || async {
        (support::metric(&stack.svc, "keel_arm_sensor_malformed_total", "").await >= 3.0)
            .then_some(())
    })
    .await
    .unwrap();

    // A sample beyond the joint limit stops this arm (not the other) and asks for an e-stop.
    let bytes = frame("arm-001", 12, &[[0.0, 0.0, 3.3, 0.0, 0.0, 0.0]]);
    stack.client.publish(sensor.clone(), bytes.into()).await.unwrap();
    let status = stack.wait_state("arm-001", "safe_stop").await;
    assert!(status["reason"].as_str().unwrap().contains("joint 2"), "{status}");
    assert_eq!(stack.status("arm-002").await["state"], "running");
    let request = tokio::time::timeout(WAIT, estops.next()).await.unwrap().unwrap();
    let request: Value = serde_json::from_slice(&request.payload).unwrap();
    assert!(request["reason"].as_str().unwrap().contains("arm-001"), "{request}");
    assert!(request["request_id"].as_str().is_some_and(|id| !id.is_empty()));
    let (code, _) = stack.put_plan("arm-001", &plan("q", 2, &J)).await;
    assert_eq!(code, 423);

    // Only a newer committed clear releases it.
    stack.set_leader(|l| l.index = 2);
    stack.wait_state("arm-001", "running").await;

    // A sample far from the plan stops it again (deviation check).
    let bytes = frame("arm-001", 13, &[[0.0, 0.0, 0.0, 0.9, 0.0, 0.0]]);
    stack.client.publish(sensor, bytes.into()).await.unwrap();
    let status = stack.wait_state("arm-001", "safe_stop").await;
    assert!(status["reason"].as_str().unwrap().contains("deviates"), "{status}");
}

#[tokio::test]
async fn silent_sensors_stop_the_arm() {
    let Some(stack) =
        support::start("stale", &["--arm-count", "1", "--sensor-timeout-ms", "100"]).await
    else {
        return;
    };
    stack.wait_state("arm-001", "running").await;
    let sensor = wire::subjects::arm_sensor("arm-001");
    stack.client.publish(sensor, frame("arm-001", 1, &[J]).into()).await.unwrap();
    let status = stack.wait_state("arm-001", "safe_stop").await;
    assert!(status["reason"].as_str().unwrap().contains("silent"), "{status}");
}
