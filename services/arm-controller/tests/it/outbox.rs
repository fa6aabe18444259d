//! The outboxes: every event reaches JetStream `EDGE_EVENTS` exactly once by message id,
//! across a NATS outage (during which HTTP acks go on) and a controller crash; cycles reach
//! the production counter exactly once in effect across a crash.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use testkit::wait_until;

use crate::support::{self, WAIT, plan};

const J: [f64; 6] = [0.0; 6];

/// Every message of `EDGE_EVENTS`: (Nats-Msg-Id, body).
async fn stream_messages(client: &async_nats::Client) -> Vec<(String, Value)> {
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js.get_stream(wire::subjects::STREAM_EVENTS).await.unwrap();
    let info = stream.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    for seq in info.first_sequence..=info.last_sequence {
        if info.messages == 0 {
            break;
        }
        let msg = stream.get_raw_message(seq).await.unwrap();
        let id = msg.headers.get("Nats-Msg-Id").map(|v| v.to_string()).unwrap_or_default();
        out.push((id, serde_json::from_slice(&msg.payload).unwrap()));
    }
    out
}

async fn stream_count(client: &async_nats::Client) -> Option<u64> {
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js.get_stream(wire::subjects::STREAM_EVENTS).await.ok()?;
    Some(stream.info().await.ok()?.state.messages)
}

#[tokio::test]
async fn every_event_reaches_edge_events_once_across_nats_and_controller_crashes() {
    // A long deadman: without NATS no heartbeat arrives, and the arms would (rightly) stop.
    let Some(mut stack) =
        support::start("outbox", &["--arm-count", "2", "--safety-timeout-ms", "60000"]).await
    else {
        return;
    };
    stack.wait_state("arm-001", "running").await;
    let mut version = 0;
    let mut acked = Vec::new();
    let mut put = async |stack: &support::Stack, n: usize| {
        for _ in 0..n {
            version += 1;
            let (code, body) =
                stack.put_plan("arm-001", &plan(&format!("u{version}"), version, &J)).await;
            assert_eq!(code, 200, "{body}");
            acked.push(body);
        }
    };
    put(&stack, 10).await;
    wait_until("10 events in EDGE_EVENTS", WAIT, || async {
        (stream_count(&stack.client).await? == 10).then_some(())
    })
    .await
    .unwrap();

    // NATS goes away: HTTP acks go on (local first).
    stack.nats.kill();
    put(&stack, 15).await;
    let (code, ready) = stack.svc.get_json("/readyz").await.unwrap();
    assert_eq!(code, 200, "{ready}");
    // The controller crashes too, with events not yet published, and comes back while NATS
    // is still away (ready, but its arms stay stopped until a safety state is heard).
    stack.svc.sigkill();
    stack.svc.restart().unwrap();
    stack.svc.wait_ready().await.unwrap();
    stack.nats.restart().unwrap();
    let client = async_nats::connect(stack.nats.url()).await.unwrap();
    stack.wait_state("arm-001", "running").await;
    put(&stack, 5).await;
    wait_until("30 events in EDGE_EVENTS", WAIT, || async {
        (stream_count(&client).await? >= 30).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", stack.svc.log_tail(30)));
    // Crash once more right after catching up: re-publishing from the cursor adds nothing.
    stack.svc.sigkill();
    stack.svc.restart().unwrap();
    stack.svc.wait_ready().await.unwrap();
    wait_until("outbox lag 0", WAIT, || async {
        (support::metric(&stack.svc, "keel_arm_outbox_lag_events", "edge_events").await == 0.0
            && support::metric(&stack.svc, "keel_arm_outbox_published_total", "edge_events").await
                >= 0.0)
            .then_some(())
    })
    .await
    .unwrap();

    let messages = stream_messages(&client).await;
    let ids: Vec<&str> = messages.iter().map(|(id, _)| id.as_str()).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "a message id appears twice");
    let events = support::all_events(&stack.svc, "arm-001").await;
    assert_eq!(events.len(), 30);
    let expected: HashSet<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(unique, expected, "EDGE_EVENTS holds exactly the log's events");
    for (id, body) in &messages {
        assert_eq!(body["id"].as_str(), Some(id.as_str()));
        assert_eq!(body["stream"], "arm-001");
    }
    for ack in &acked {
        assert!(messages.iter().any(|(_, b)| b["hash"] == ack["hash"]), "{ack} not published");
    }
}

/// A stand-in counter service: records op_ids, answers like counter-service.
async fn counter(client: async_nats::Client, seen: Arc<Mutex<HashMap<String, u32>>>) {
    let mut sub = client
        .queue_subscribe(wire::subjects::counter_inc("production"), "counter".into())
        .await
        .unwrap();
    while let Some(msg) = sub.next().await {
        let inc: wire::json::CounterIncrement = serde_json::from_slice(&msg.payload).unwrap();
        assert_eq!(inc.amount, 1);
        let value = {
            let mut seen = seen.lock().unwrap();
            *seen.entry(inc.op_id).or_default() += 1;
            seen.len()
        };
        if let Some(reply) = msg.reply {
            let body = json!({"name": "production", "value": value});
            client.publish(reply, serde_json::to_vec(&body).unwrap().into()).await.unwrap();
        }
    }
}

#[tokio::test]
async fn cycles_reach_the_counter_exactly_once_across_a_crash() {
    let Some(mut stack) = support::start("cycles", &["--arm-count", "2"]).await else { return };
    let post = async |stack: &support::Stack, arm: &str, id: &str| {
        let (code, body) = stack
            .svc
            .send_json(reqwest::Method::POST, &format!("/arms/{arm}/cycles"), &json!({"id": id}))
            .await
            .unwrap();
        assert_eq!(code, 200, "{body}");
        body
    };
    // No counter service yet: the cycles wait in the outbox.
    for i in 0..5 {
        post(&stack, "arm-001", &format!("c{i}")).await;
    }
    stack.svc.sigkill();
    stack.svc.restart().unwrap();
    stack.svc.wait_ready().await.unwrap();
    let seen: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let responder = tokio::spawn(counter(stack.client.clone(), seen.clone()));
    for i in 5..8 {
        post(&stack, "arm-002", &format!("c{i}")).await;
    }
    // A retried cycle (same id) is the same cycle.
    let again = post(&stack, "arm-001", "c0").await;
    assert_eq!(again["id"], "c0");
    // Crash again while increments may be in flight.
    tokio::time::sleep(Duration::from_millis(50)).await;
    stack.svc.sigkill();
    stack.svc.restart().unwrap();
    stack.svc.wait_ready().await.unwrap();

    let mut cycle_ids = HashSet::new();
    for arm in ["arm-001", "arm-002"] {
        for e in support::all_events(&stack.svc, arm).await {
            assert_eq!(e["kind"], "cycle.completed");
            cycle_ids.insert(e["id"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(cycle_ids.len(), 8, "one event per distinct cycle");
    wait_until("every cycle counted", WAIT, || async {
        let seen = seen.lock().unwrap();
        (seen.keys().cloned().collect::<HashSet<_>>() == cycle_ids).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", seen.lock().unwrap(), stack.svc.log_tail(20)));
    wait_until("counter outbox caught up", WAIT, || async {
        (support::metric(&stack.svc, "keel_arm_outbox_lag_events", "counter").await == 0.0)
            .then_some(())
    })
    .await
    .unwrap();
    // Re-sends after a crash are possible (at least once); the op_ids make them one.
    assert_eq!(seen.lock().unwrap().len(), 8);
    responder.abort();
}
