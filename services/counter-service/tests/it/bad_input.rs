//! Bad input over HTTP and NATS gets a clear error, applies nothing, and the service keeps
//! serving; registers and sets answer their contract.

use serde_json::{Value, json};
use testkit::{NatsServer, ServiceProcess, wait_until};

use crate::support::{self, WAIT};

async fn post(svc: &ServiceProcess, path: &str, body: Value) -> (u16, Value) {
    svc.send_json(reqwest::Method::POST, path, &body).await.unwrap()
}

#[tokio::test]
async fn bad_increments_are_refused_and_change_nothing() {
    let Some(nats) = testkit::require("bad_input", NatsServer::start()) else { return };
    let svc = support::start_all(vec![support::spec("solo", &["solo"], &nats.url())], true)
        .await
        .pop()
        .unwrap();
    let inc = "/counters/bad/increment";
    assert_eq!(post(&svc, inc, json!({"amount": 2, "op_id": "ok-1"})).await.0, 200);
    for (body, code) in [
        (json!({"amount": 0, "op_id": "x"}), "zero_amount"),
        (json!({"amount": 1.5, "op_id": "x"}), "invalid_amount"),
        (json!({"amount": "1", "op_id": "x"}), "invalid_amount"),
        (json!({"amount": 9_223_372_036_854_775_808u64, "op_id": "x"}), "invalid_amount"),
        (json!({"amount": 1}), "missing_op_id"),
        (json!({"amount": 1, "op_id": ""}), "missing_op_id"),
        (json!({"op_id": "x"}), "missing_amount"),
        (json!({"amount": 1, "op_id": "x".repeat(500)}), "too_long"),
        (json!({"amount": 1, "op_id": "x", "more": true}), "invalid_body"),
    ] {
        let (status, reply) = post(&svc, inc, body.clone()).await;
        assert_eq!((status, reply["error"].as_str()), (400, Some(code)), "{body} -> {reply}");
    }
    let (status, reply) =
        post(&svc, "/counters/no.dots/increment", json!({"amount": 1, "op_id": "y"})).await;
    assert_eq!((status, reply["error"].as_str()), (400, Some("invalid_name")), "{reply}");
    let resp = svc
        .http()
        .post(svc.url(inc))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // Overflow of the i64 sum is refused; so is an op_id reused with another amount.
    let (status, _) = post(&svc, inc, json!({"amount": i64::MAX - 2, "op_id": "big"})).await;
    assert_eq!(status, 200);
    let (status, reply) = post(&svc, inc, json!({"amount": 1, "op_id": "over"})).await;
    assert_eq!((status, reply["error"].as_str()), (400, Some("overflow")), "{reply}");
    let (status, reply) = post(&svc, inc, json!({"amount": 3, "op_id": "ok-1"})).await;
    assert_eq!((status, reply["error"].as_str()), (409, Some("op_id_reused")), "{reply}");
    assert_eq!(support::counter(&svc, "bad").await, Some((i64::MAX, i64::MAX)));

    // NATS: malformed payloads are answered with an error and counted; nothing applied.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let subject = wire::subjects::counter_inc("nats");
    for (payload, code) in [
        (&b"garbage"[..], "invalid_json"),
        (&br#"{"amount":0,"op_id":"z"}"#[..], "zero_amount"),
        (&br#"{"amount":1}"#[..], "missing_op_id"),
        (&br#"{"amount":1.25,"op_id":"z"}"#[..], "invalid_amount"),
    ] {
        let reply = client.request(subject.clone(), payload.to_vec().into()).await.unwrap();
        let reply: Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(
            (reply["error"].as_str(), reply["status"].as_u64()),
            (Some(code), Some(400)),
            "{reply}"
        );
    }
    client.publish(subject.clone(), b"\xff\xfe".to_vec().into()).await.unwrap();
    let reply = client
        .request(subject.clone(), br#"{"amount":4,"op_id":"n-1"}"#.to_vec().into())
        .await
        .unwrap();
    let reply: Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(reply, json!({"name": "nats", "value": 4}));
    wait_until("malformed NATS payloads counted", WAIT, || async {
        let total =
            support::metric(&svc, "keel_counter_nats_rejected_total", "invalid_json").await?;
        (total >= 2.0).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(support::counter(&svc, "nats").await, Some((4, 4)));
    assert_eq!(svc.get_json("/readyz").await.unwrap().0, 200);
}

#[tokio::test]
async fn registers_and_sets_follow_the_contract() {
    let Some(nats) = testkit::require("registers", NatsServer::start()) else { return };
    let svc = support::start_all(vec![support::spec("solo", &["solo"], &nats.url())], false)
        .await
        .pop()
        .unwrap();
    let put = |body: Value| {
        let svc = &svc;
        async move { svc.send_json(reqwest::Method::PUT, "/registers/speed", &body).await.unwrap() }
    };
    assert_eq!(svc.get_json("/registers/speed").await.unwrap().0, 404);
    assert_eq!(put(json!({"value": {"max": 5}, "version": 2})).await.0, 200);
    let (status, reply) = put(json!({"value": 1, "version": 1})).await;
    assert_eq!(
        (status, reply["error"].as_str(), reply["current"].as_u64()),
        (409, Some("stale_version"), Some(2))
    );
    assert_eq!(put(json!({"value": 1})).await.0, 400);
    assert_eq!(put(json!({"value": {"max": 5}, "version": 2})).await.0, 200, "same write again");
    let (_, body) = svc.get_json("/registers/speed").await.unwrap();
    assert_eq!(body, json!({"name": "speed", "value": {"max": 5}, "version": 2}));

    assert_eq!(post(&svc, "/sets/flags/add", json!({"member": "beta"})).await.0, 200);
    assert_eq!(post(&svc, "/sets/flags/add", json!({"member": "gamma"})).await.0, 200);
    assert_eq!(post(&svc, "/sets/flags/remove", json!({"member": "beta"})).await.0, 200);
    assert_eq!(post(&svc, "/sets/flags/add", json!({"member": 3})).await.0, 400);
    assert_eq!(post(&svc, "/sets/flags/toggle", json!({"member": "x"})).await.0, 404);
    let (_, body) = svc.get_json("/sets/flags").await.unwrap();
    assert_eq!(body, json!({"name": "flags", "members": ["gamma"]}));
}
