//! Bad input over real HTTP and NATS: malformed JSON, missing request_id, unknown fields,
//! empty strings, oversized bodies -> a 4xx JSON error, and nothing reaches the log.

use std::time::Duration;

use futures::StreamExt as _;
use serde_json::{Value, json};
use testkit::{NatsServer, ServiceProcess, ServiceSpec};

use crate::support::BIN;

async fn post_raw(svc: &ServiceProcess, path: &str, body: Vec<u8>) -> (u16, Value) {
    let resp = svc
        .http()
        .post(svc.url(path))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// An `edge.safety.estop` request, retried while the service has not subscribed yet.
async fn request(client: &async_nats::Client, payload: Vec<u8>) -> Value {
    let reply = testkit::wait_until("an e-stop request answered", Duration::from_secs(10), || {
        let payload = payload.clone();
        async move { client.request(wire::subjects::SAFETY_ESTOP, payload.into()).await.ok() }
    })
    .await
    .unwrap();
    serde_json::from_slice(&reply.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_4xx_and_nothing_is_proposed() {
    let Some(nats) = testkit::require("bad_input", NatsServer::start()) else { return };
    let peers = format!("1=127.0.0.1:{}", testkit::free_port());
    let spec = ServiceSpec::new(BIN, nats.url()).args(["--node-id", "1", "--peers", &peers]);
    let mut svc = ServiceProcess::start(spec).unwrap();
    svc.wait_ready().await.unwrap();
    // A linearizable read succeeds only once the leader committed its first entry of the
    // term, so the commit index read after it no longer moves by itself.
    testkit::wait_until("a linearizable read", Duration::from_secs(10), || async {
        svc.get_json("/estop").await.ok().filter(|(status, _)| *status == 200)
    })
    .await
    .unwrap();
    let commit_before = svc.get_json("/cluster").await.unwrap().1["commit"].clone();

    let huge = format!(r#"{{"reason":"{}","source":"s","request_id":"x"}}"#, "y".repeat(100_000));
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("/estop", b"{\"reason\": ".to_vec(), 400, "invalid_json"),
        ("/estop", br#"{"reason":"r","source":"s"}"#.to_vec(), 400, "invalid_body"),
        (
            "/estop",
            br#"{"reason":"r","source":"s","request_id":"x","by":"b"}"#.to_vec(),
            400,
            "invalid_body",
        ),
        ("/estop", br#"{"reason":"r","source":"","request_id":"x"}"#.to_vec(), 400, "invalid_body"),
        ("/estop", br#"{"reason":"r","source":"s","request_id":7}"#.to_vec(), 400, "invalid_body"),
        ("/estop", huge.into_bytes(), 413, "body_too_large"),
        ("/estop/clear", br#"{"by":"b"}"#.to_vec(), 400, "invalid_body"),
        ("/estop/clear", br#"{"by":"","request_id":"c"}"#.to_vec(), 400, "invalid_body"),
    ];
    for (path, body, code, error) in cases {
        let (status, answer) = post_raw(&svc, path, body).await;
        assert_eq!((status, answer["error"].as_str()), (code, Some(error)), "{path}: {answer}");
    }

    // NATS: malformed requests are answered with the same codes and change nothing.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let mut trips = client.subscribe(wire::subjects::SAFETY_TRIP).await.unwrap();
    client.flush().await.unwrap();
    for (payload, code) in [
        (b"not json".to_vec(), "invalid_json"),
        (br#"{"reason":"r","source":"s","request_id":"q","extra":1}"#.to_vec(), "invalid_body"),
        (br#"{"reason":" ","source":"s","request_id":"q"}"#.to_vec(), "invalid_body"),
    ] {
        let reply = request(&client, payload).await;
        assert_eq!(
            (reply["status"].as_u64(), reply["error"].as_str()),
            (Some(400), Some(code)),
            "{reply}"
        );
    }
    let (_, cluster) = svc.get_json("/cluster").await.unwrap();
    assert_eq!(cluster["commit"], commit_before, "something was proposed: {cluster}");
    let (_, audit) = svc.get_json("/estop/audit").await.unwrap();
    assert_eq!(audit["records"], json!([]));
    let no_trip = tokio::time::timeout(Duration::from_millis(200), trips.next()).await;
    assert!(no_trip.is_err(), "bad input sent a trip");

    // A good NATS request trips first, then answers once committed.
    let body = json!({"reason": "light curtain", "source": "cell-7", "request_id": "n1"});
    let reply = request(&client, serde_json::to_vec(&body).unwrap()).await;
    assert_eq!(
        (reply["status"].as_u64(), reply["engaged"].as_bool()),
        (Some(200), Some(true)),
        "{reply}"
    );
    let trip = tokio::time::timeout(Duration::from_secs(5), trips.next()).await.unwrap().unwrap();
    let trip: wire::json::SafetyTrip = serde_json::from_slice(&trip.payload).unwrap();
    assert_eq!((trip.request_id.as_str(), trip.source.as_str()), ("n1", "cell-7"));
    let (_, state) = svc.get_json("/estop").await.unwrap();
    assert_eq!(
        (state["engaged"].as_bool(), state["index"].clone()),
        (Some(true), reply["index"].clone())
    );
}
