//! Fail-safe end to end with the real arm-controller: an engage on any member stops every
//! arm (the trip goes out before the commit), a committed clear resumes them, only the leader
//! publishes state, and when two of three members die the heartbeat stops and every arm
//! falls into safe stop by its deadman.

use std::time::{Duration, Instant};

use futures::StreamExt as _;
use testkit::{ServiceProcess, ServiceSpec, wait_until};

use crate::support::{Cluster, WAIT, serial};

const ARMS: [&str; 3] = ["arm-001", "arm-002", "arm-003"];
/// The arms' deadman in this test.
const DEADMAN_MS: u64 = 100;
/// Engage/clear rounds (correctness; the latency distribution is the bench's job).
const TRIALS: usize = 5;

async fn arm_states(arms: &ServiceProcess) -> Vec<(String, String)> {
    let mut states = Vec::new();
    for arm in ARMS {
        let (_, body) = arms.get_json(&format!("/arms/{arm}/status")).await.unwrap();
        states.push((
            body["state"].as_str().unwrap_or("?").to_owned(),
            body["reason"].as_str().unwrap_or("").to_owned(),
        ));
    }
    states
}

async fn all_arms(arms: &ServiceProcess, state: &str) -> Vec<String> {
    wait_until(&format!("every arm {state}"), WAIT, || async {
        let states = arm_states(arms).await;
        states.iter().all(|(s, _)| s == state).then(|| states.into_iter().map(|(_, r)| r).collect())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", arms.log_tail(20)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engage_stops_every_arm_and_losing_the_quorum_stops_them_by_deadman() {
    let _serial = serial().await;
    let Some(controller) = testkit::require("failsafe", testkit::process::binary("arm-controller"))
    else {
        return;
    };
    let Some(mut cluster) = Cluster::start("failsafe", 3).await else { return };
    let spec = ServiceSpec::new(controller, cluster.nats.url()).args([
        "--arms",
        &ARMS.join(","),
        "--safety-timeout-ms",
        &DEADMAN_MS.to_string(),
        "--node-id",
        "arms-1",
    ]);
    let mut arms = ServiceProcess::start(spec).unwrap();
    arms.wait_ready().await.unwrap();
    all_arms(&arms, "running").await;

    // Only the leader publishes, about every 10 ms.
    let client = async_nats::connect(cluster.nats.url()).await.unwrap();
    let mut states = client.subscribe(wire::subjects::SAFETY_STATE).await.unwrap();
    client.flush().await.unwrap();
    let leader = cluster.leader_among(&[1, 2, 3]).await;
    let window = Instant::now();
    let mut heard = 0;
    while window.elapsed() < Duration::from_millis(300) {
        let message = tokio::time::timeout(WAIT, states.next()).await.unwrap().unwrap();
        let state: wire::json::SafetyState = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(state.leader, leader, "a follower published {state:?}");
        heard += 1;
    }
    assert!(heard >= 10, "only {heard} heartbeats in 300 ms");

    // Engage on any member (followers included): every arm stops; a committed clear resumes.
    for trial in 0..TRIALS {
        let member = (trial as u64 % 3) + 1;
        let started = Instant::now();
        let request_id = format!("trip-{trial}");
        let engage = cluster.engage(member, &request_id);
        let stopped = async {
            let reasons = all_arms(&arms, "safe_stop").await;
            (started.elapsed(), reasons)
        };
        let ((status, body), (took, reasons)) = tokio::join!(engage, stopped);
        assert_eq!(status, 200, "{body}");
        println!("trial {trial}: engage on member {member}, every arm stopped after {took:?}");
        assert!(reasons.iter().all(|r| r.contains("e-stop")), "{reasons:?}");
        let (status, body) = cluster.clear(member, &format!("clear-{trial}")).await;
        assert_eq!(status, 200, "{body}");
        all_arms(&arms, "running").await;
    }

    // Kill both followers: the leader can no longer confirm a heartbeat, so none goes out.
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    for id in &followers {
        cluster.member_mut(*id).sigkill();
    }
    let killed_at = Instant::now();
    let (last_heartbeat, (reasons, stopped_after)) =
        tokio::join!(drain_until_silent(&mut states, Duration::from_millis(500)), async {
            (all_arms(&arms, "safe_stop").await, killed_at.elapsed())
        });
    let silent_after = last_heartbeat.map(|at| at.saturating_duration_since(killed_at));
    println!(
        "last heartbeat {silent_after:?} after the kill; every arm in safe stop after {stopped_after:?}"
    );
    assert!(reasons.iter().all(|r| r.contains("heartbeat")), "{reasons:?}");
    assert!(
        silent_after.is_none_or(|d| d < Duration::from_millis(200)),
        "heartbeats went on for {silent_after:?} without a quorum"
    );
    // The lone member steps down and stays silent.
    wait_until("the lone member to step down", WAIT, || async {
        let view = cluster.cluster_view(leader).await?;
        (view["role"] != "leader").then_some(())
    })
    .await
    .unwrap();
    let quiet = tokio::time::timeout(Duration::from_millis(300), states.next()).await;
    assert!(quiet.is_err(), "a state was published without a quorum: {quiet:?}");
    let (status, body) = cluster.engage(leader, "no-quorum").await;
    assert_eq!((status, body["error"].as_str()), (503, Some("no_quorum")), "{body}");
}

/// Reads states until none arrives for `quiet`; returns when the last one arrived.
async fn drain_until_silent(
    states: &mut async_nats::Subscriber,
    quiet: Duration,
) -> Option<Instant> {
    let mut last = None;
    while let Ok(Some(_)) = tokio::time::timeout(quiet, states.next()).await {
        last = Some(Instant::now());
    }
    last
}
