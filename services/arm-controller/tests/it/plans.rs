//! Plan updates over HTTP and NATS: durable acks, idempotent retries, stale versions, every
//! kind of bad input refused with a JSON error and no change, cycles, events and the chain.

use serde_json::{Value, json};

use crate::support::{self, plan, put_raw};

const J: [f64; 6] = [0.1, -0.2, 0.3, 0.0, 1.5, -1.5];

#[tokio::test]
async fn plans_are_versioned_idempotent_validated_and_listed() {
    let Some(stack) = support::start("plans", &["--arm-count", "2"]).await else { return };
    let svc = &stack.svc;
    stack.wait_state("arm-001", "running").await;

    let (code, first) = stack.put_plan("arm-001", &plan("u1", 1, &J)).await;
    assert_eq!(code, 200, "{first}");
    assert_eq!((first["arm"].as_str(), first["version"].as_u64()), (Some("arm-001"), Some(1)));
    assert_eq!(first["hash"].as_str().unwrap().len(), 64);
    let (code, again) = stack.put_plan("arm-001", &plan("u1", 1, &J)).await;
    assert_eq!((code, &again), (200, &first), "a retry gets the identical body");
    let (code, second) = stack.put_plan("arm-001", &plan("u2", 2, &[0.0; 6])).await;
    assert_eq!(code, 200, "{second}");
    assert!(second["position"].as_u64() > first["position"].as_u64());
    // The older update's retry still gets its own body (within the retry window).
    assert_eq!(stack.put_plan("arm-001", &plan("u1", 1, &J)).await, (200, first.clone()));
    let (code, stale) = stack.put_plan("arm-001", &plan("other", 2, &J)).await;
    assert_eq!(code, 409, "{stale}");
    assert_eq!(
        (stale["error"].as_str(), stale["current"].as_u64()),
        (Some("stale_version"), Some(2))
    );

    let (code, current) = svc.get_json("/arms/arm-001/plan").await.unwrap();
    assert_eq!(code, 200);
    assert_eq!((current["id"].as_str(), current["version"].as_u64()), (Some("u2"), Some(2)));
    assert_eq!(current["joints"], json!([0.0, 0.0, 0.0, 0.0, 0.0, 0.0]));
    assert!(current["timestamp"].as_str().is_some());

    // Bad input: a 4xx with a JSON error each, and the plan is unchanged.
    let huge = format!(r#"{{"id":"big","version":9,"joints":[{}0]}}"#, "0,".repeat(5_000_000));
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "overflowing number",
            br#"{"id":"x","version":9,"joints":[1e999,0,0,0,0,0]}"#.to_vec(),
            400,
        ),
        ("NaN as a string", br#"{"id":"x","version":9,"joints":["NaN",0,0,0,0,0]}"#.to_vec(), 400),
        ("null joint", br#"{"id":"x","version":9,"joints":[null,0,0,0,0,0]}"#.to_vec(), 400),
        ("too few joints", br#"{"id":"x","version":9,"joints":[0,0,0]}"#.to_vec(), 400),
        ("too many joints", br#"{"id":"x","version":9,"joints":[0,0,0,0,0,0,0]}"#.to_vec(), 400),
        (
            "beyond the joint limit",
            br#"{"id":"x","version":9,"joints":[3.2,0,0,0,0,0]}"#.to_vec(),
            400,
        ),
        ("missing version", br#"{"id":"x","joints":[0,0,0,0,0,0]}"#.to_vec(), 400),
        (
            "unknown field",
            br#"{"id":"x","version":9,"joints":[0,0,0,0,0,0],"speed":1}"#.to_vec(),
            400,
        ),
        ("version zero", br#"{"id":"x","version":0,"joints":[0,0,0,0,0,0]}"#.to_vec(), 400),
        ("empty id", br#"{"id":"","version":9,"joints":[0,0,0,0,0,0]}"#.to_vec(), 400),
        (
            "bad timestamp",
            br#"{"id":"x","version":9,"joints":[0,0,0,0,0,0],"timestamp":"noon"}"#.to_vec(),
            400,
        ),
        ("invalid JSON", b"{\"id\": \"x\", \"version\": 9, \"joints\": [0,".to_vec(), 400),
        ("not an object", b"[1,2,3]".to_vec(), 400),
    ];
    for (what, body, expected) in cases {
        let (code, err) = put_raw(svc, "arm-001", body).await;
        assert_eq!(code, expected, "{what}: {err}");
        assert!(err["error"].as_str().is_some_and(|c| !c.is_empty()), "{what}: {err}");
        assert!(err["message"].is_string(), "{what}: {err}");
    }
    // A 10 MB body: refused by its declared length before it is read (413 JSON)...
    let (code, err) = declared_length_only(svc, "/arms/arm-001/plan", huge.len()).await;
    assert_eq!((code, err["error"].as_str()), (413, Some("body_too_large")), "{err}");
    // ...and when it is actually sent, refused too: a 413, or the connection cut mid-body.
    let sent = svc
        .http()
        .put(svc.url("/arms/arm-001/plan"))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await;
    if let Ok(resp) = sent {
        assert_eq!(resp.status().as_u16(), 413);
    }
    let (code, err) = stack.put_plan("arm-999", &plan("x", 1, &J)).await;
    assert_eq!((code, err["error"].as_str()), (404, Some("unknown_arm")), "{err}");
    let (_, after) = svc.get_json("/arms/arm-001/plan").await.unwrap();
    assert_eq!(after, current, "bad input changed nothing");
    let (code, _) = svc.get_json("/arms/arm-002/plan").await.unwrap();
    assert_eq!(code, 404, "no plan yet");

    // NATS request: same body plus "status"; the same idempotency and staleness rules.
    let subject = wire::subjects::arm_plan_update("arm-002");
    let ask = |body: Value| {
        let client = stack.client.clone();
        let subject = subject.clone();
        async move {
            let reply =
                client.request(subject, serde_json::to_vec(&body).unwrap().into()).await.unwrap();
            serde_json::from_slice::<Value>(&reply.payload).unwrap()
        }
    };
    let ok = ask(plan("n1", 5, &J)).await;
    assert_eq!((ok["status"].as_u64(), ok["version"].as_u64()), (Some(200), Some(5)), "{ok}");
    assert_eq!(ask(plan("n1", 5, &J)).await, ok);
    let stale = ask(plan("n0", 4, &J)).await;
    assert_eq!(
        (stale["status"].as_u64(), stale["error"].as_str()),
        (Some(409), Some("stale_version"))
    );
    let garbage = {
        let reply = stack.client.request(subject.clone(), "{nope".into()).await.unwrap();
        serde_json::from_slice::<Value>(&reply.payload).unwrap()
    };
    assert_eq!(garbage["status"].as_u64(), Some(400), "{garbage}");
    let wrong = ask(json!({"id": "n2", "version": 6, "joints": [0.0]})).await;
    assert_eq!(
        (wrong["status"].as_u64(), wrong["error"].as_str()),
        (Some(400), Some("wrong_joint_count"))
    );

    // Cycles: durable, idempotent by id.
    let (code, cycle) = svc
        .send_json(reqwest::Method::POST, "/arms/arm-001/cycles", &json!({"id": "c1"}))
        .await
        .unwrap();
    assert_eq!(code, 200, "{cycle}");
    let (_, cycle_again) = svc
        .send_json(reqwest::Method::POST, "/arms/arm-001/cycles", &json!({"id": "c1"}))
        .await
        .unwrap();
    assert_eq!(cycle_again, cycle);
    let (code, _) = svc
        .send_json(reqwest::Method::POST, "/arms/arm-001/cycles", &json!({"nope": 1}))
        .await
        .unwrap();
    assert_eq!(code, 400);

    // Events list exactly the committed updates and the cycle, chained.
    let events = support::all_events(svc, "arm-001").await;
    let kinds: Vec<(&str, Option<u64>)> = events
        .iter()
        .map(|e| (e["kind"].as_str().unwrap(), e["payload"]["version"].as_u64()))
        .collect();
    assert_eq!(
        kinds,
        [("plan.updated", Some(1)), ("plan.updated", Some(2)), ("cycle.completed", None)]
    );
    assert_eq!(events[0]["hash"], first["hash"]);
    assert_eq!(events[1]["position"], second["position"]);
    let (code, page) = svc
        .get_json(&format!("/arms/arm-001/events?from={}&limit=1", events[1]["position"]))
        .await
        .unwrap();
    assert_eq!(code, 200);
    assert_eq!(page["events"].as_array().unwrap().len(), 1);
    assert_eq!(page["events"][0]["position"], events[1]["position"]);
    let (code, bad) = svc.get_json("/arms/arm-001/events?from=x").await.unwrap();
    assert_eq!((code, bad["error"].as_str()), (400, Some("invalid_query")));
    let (code, verify) = svc.get_json("/log/verify").await.unwrap();
    assert_eq!((code, verify["ok"].as_bool()), (200, Some(true)), "{verify}");
    assert_eq!(verify["events_checked"].as_u64(), Some(4));

    // The latency histogram and commit counter are exported.
    assert!(support::metric(svc, "keel_arm_commits_total", "plan.updated").await >= 3.0);
    assert!(support::metric(svc, "keel_arm_plan_update_seconds_count", "http").await >= 2.0);
    assert!(support::metric(svc, "keel_arm_recovery_seconds", "").await >= 0.0);
}

/// Sends only the head of a PUT that declares a `len`-byte JSON body, and reads the answer
/// (the server must refuse by the declared length without waiting for the body).
async fn declared_length_only(
    svc: &testkit::ServiceProcess,
    path: &str,
    len: usize,
) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = svc.base_url().trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "PUT {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(support::WAIT, stream.read_to_end(&mut response)).await.unwrap().unwrap();
    let text = String::from_utf8_lossy(&response);
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}
