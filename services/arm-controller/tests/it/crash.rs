//! SIGKILL at random moments while clients update plans: after every restart each
//! acknowledged update is there, retries across the crash get identical bodies, and the
//! chain verifies (online, and offline on the log files after the last kill).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::support::{self, plan};

const ARMS: usize = 4;
const KILLS: usize = 20;

/// Acknowledged updates: (arm, version) -> the 200 body.
type Acks = Arc<Mutex<HashMap<(String, u64), Value>>>;

/// One client per arm: sends versions 1, 2, 3...; on a transport error or 423 it retries the
/// same update (same id and version) until it gets a definite answer.
async fn client(base: String, arm: String, acks: Acks, stop: Arc<AtomicBool>) -> u64 {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let mut version = 1u64;
    while !stop.load(Ordering::Relaxed) {
        let id = format!("{arm}-u{version}");
        let joints = [version as f64 * 1e-4; 6];
        let sent = http
            .put(format!("{base}/arms/{arm}/plan"))
            .json(&plan(&id, version, &joints))
            .send()
            .await;
        let Ok(resp) = sent else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let code = resp.status().as_u16();
        let Ok(body) = resp.json::<Value>().await else { continue };
        match code {
            200 => {
                let mut acks = acks.lock().unwrap();
                if let Some(earlier) = acks.insert((arm.clone(), version), body.clone()) {
                    assert_eq!(earlier, body, "a retry got a different body");
                }
                version += 1;
            }
            423 | 503 => tokio::time::sleep(Duration::from_millis(5)).await,
            other => panic!("{arm} v{version}: unexpected {other} {body}"),
        }
    }
    version - 1
}

#[tokio::test]
async fn every_acknowledged_update_survives_sigkill() {
    let arm_count = ARMS.to_string();
    let Some(mut stack) =
        support::start("crash", &["--arm-count", &arm_count, "--snapshot-every-events", "150"])
            .await
    else {
        return;
    };
    let seed: u64 = rand::rng().random();
    eprintln!("crash test seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let acks: Acks = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let arms: Vec<String> = (1..=ARMS).map(|i| format!("arm-{i:03}")).collect();
    let clients: Vec<_> = arms
        .iter()
        .map(|arm| {
            tokio::spawn(client(stack.svc.base_url(), arm.clone(), acks.clone(), stop.clone()))
        })
        .collect();

    for kill in 0..KILLS {
        // Each life of the controller acknowledges something before it is killed, however
        // slowly it comes up (connect, first safety heartbeat) on a loaded machine.
        let before = acks.lock().unwrap().len();
        testkit::wait_until("an acknowledged update since the last restart", support::WAIT, || {
            let now = acks.lock().unwrap().len();
            async move { (now > before).then_some(()) }
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(rng.random_range(30..300))).await;
        stack.svc.sigkill();
        let acked: HashMap<String, u64> =
            acks.lock().unwrap().keys().fold(HashMap::new(), |mut m, (a, v)| {
                let e = m.entry(a.clone()).or_insert(0);
                *e = (*e).max(*v);
                m
            });
        stack.svc.restart().unwrap();
        stack.svc.wait_ready().await.unwrap();
        for (arm, version) in &acked {
            let (code, current) = stack.svc.get_json(&format!("/arms/{arm}/plan")).await.unwrap();
            assert_eq!(code, 200, "kill {kill}: {arm} lost its plan: {current}");
            assert!(
                current["version"].as_u64().unwrap() >= *version,
                "kill {kill}: {arm} acked v{version} but has {current}"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let acks = acks.lock().unwrap().clone();
    assert!(acks.len() >= 40, "only {} updates acknowledged across {KILLS} kills", acks.len());
    eprintln!("crash test: {} updates acknowledged across {KILLS} SIGKILLs", acks.len());

    // Online: every ack is in the events at its position with its hash; the chain verifies.
    stack.svc.restart().unwrap();
    stack.svc.wait_ready().await.unwrap();
    let mut by_position: HashMap<u64, Value> = HashMap::new();
    for arm in &arms {
        for event in support::all_events(&stack.svc, arm).await {
            by_position.insert(event["position"].as_u64().unwrap(), event);
        }
    }
    for ((arm, version), ack) in &acks {
        let event = &by_position[&ack["position"].as_u64().unwrap()];
        assert_eq!(event["hash"], ack["hash"], "{arm} v{version}");
        assert_eq!(event["payload"]["version"].as_u64(), Some(*version));
        assert_eq!(event["payload"]["arm"].as_str(), Some(arm.as_str()));
    }
    let (_, verify) = stack.svc.get_json("/log/verify").await.unwrap();
    assert_eq!(verify["ok"], true, "{verify}");

    // Offline: kill once more and open the files directly.
    stack.svc.sigkill();
    let log = event_log::EventLog::open(
        stack.svc.data_dir().join("data/log"),
        event_log::Options::default(),
    )
    .unwrap();
    let report = log.verify().unwrap();
    assert!(report.first_bad.is_none(), "{report:?}");
    for ack in acks.values() {
        let event = log.read(ack["position"].as_u64().unwrap()).unwrap().unwrap();
        assert_eq!(hex::encode(event.hash), ack["hash"].as_str().unwrap());
    }
}

/// Snapshots and compaction: with small segments and frequent snapshots the log is compacted
/// below the snapshot (once the outboxes are past it), and a restart recovers from the
/// snapshot plus the tail with the same state and a chain that verifies from its anchor.
#[tokio::test]
async fn compaction_below_snapshots_keeps_state_and_chain() {
    let Some(mut stack) = support::start(
        "compaction",
        &[
            "--arm-count",
            "4",
            "--log-segment-bytes",
            "1048576",
            "--snapshot-every-events",
            "200",
            "--keep-tail-events",
            "10",
        ],
    )
    .await
    else {
        return;
    };
    stack.wait_state("arm-001", "running").await;
    let writers: Vec<_> = (1..=4)
        .map(|i| {
            let base = stack.svc.base_url();
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let arm = format!("arm-{i:03}");
                for v in 1..=1_200u64 {
                    let body = plan(&format!("{arm}-{v}"), v, &[1e-4 * v as f64; 6]);
                    let resp = http
                        .put(format!("{base}/arms/{arm}/plan"))
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(resp.status(), 200);
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let verify = testkit::wait_until("the log to be compacted", support::WAIT, || async {
        let (_, v) = stack.svc.get_json("/log/verify").await.ok()?;
        (v["anchor_position"].as_u64()? > 0).then_some(v)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", stack.svc.log_tail(20)));
    assert_eq!(verify["ok"], true, "{verify}");
    stack.svc.sigkill();
    stack.svc.restart().unwrap();
    stack.svc.wait_ready().await.unwrap();
    for i in 1..=4 {
        let (_, current) = stack.svc.get_json(&format!("/arms/arm-{i:03}/plan")).await.unwrap();
        assert_eq!(current["version"], 1_200, "{current}");
    }
    let (_, verify) = stack.svc.get_json("/log/verify").await.unwrap();
    assert_eq!(verify["ok"], true, "{verify}");
    assert!(verify["anchor_position"].as_u64().unwrap() > 0);
    let replayed = support::metric(&stack.svc, "keel_arm_recovery_events_replayed", "").await;
    assert!(replayed < 4_800.0, "recovered from a snapshot, not from the start: {replayed}");
    // Events below the compaction floor are gone; the listing starts at the floor.
    let (_, page) = stack.svc.get_json("/arms/arm-001/events?from=1&limit=1").await.unwrap();
    assert!(
        page["events"][0]["position"].as_u64().unwrap() >= page["first_position"].as_u64().unwrap()
    );
}
