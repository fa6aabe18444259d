//! Shared test setup: a nats-server, the controller binary, a NATS client, and a stand-in
//! safety leader that publishes `edge.safety.state` heartbeats (safety-quorum is a separate
//! service; these tests play its part on the wire).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use testkit::{NatsServer, ServiceProcess, ServiceSpec, wait_until};
use wire::json::{SafetyState, SafetyTrip};

pub const BIN: &str = env!("CARGO_BIN_EXE_arm-controller");
/// Generous deadline for anything a test waits on.
pub const WAIT: Duration = Duration::from_secs(20);
/// Heartbeat period of the stand-in leader (as safety-quorum's).
pub const HEARTBEAT_MS: u64 = 10;

pub fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64
}

/// What the stand-in leader publishes.
#[derive(Debug, Clone)]
pub struct Leader {
    pub engaged: bool,
    pub index: u64,
    pub silent: bool,
}

pub struct Stack {
    pub nats: NatsServer,
    pub svc: ServiceProcess,
    pub client: async_nats::Client,
    pub leader: Arc<Mutex<Leader>>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// Default flags of these tests, as pairs (a roomy deadman: the machine is small and busy);
/// a flag given to [`start`] replaces its default.
pub const FLAGS: &[&str] =
    &["--safety-timeout-ms", "1000", "--sensor-timeout-ms", "0", "--aggregate-interval-ms", "0"];

/// Starts nats-server and the controller with `FLAGS` then `args`, waits for ready, and
/// starts heartbeats of a clear state; `None` when nats-server is missing (outside CI).
pub async fn start(test: &str, args: &[&str]) -> Option<Stack> {
    let nats = testkit::require(test, NatsServer::start())?;
    let defaults = FLAGS.chunks(2).filter(|pair| !args.contains(&pair[0])).flatten().copied();
    let spec = ServiceSpec::new(BIN, nats.url()).args(defaults).args(args.iter().copied());
    let mut svc = ServiceProcess::start(spec).unwrap();
    svc.wait_ready().await.unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let leader = Arc::new(Mutex::new(Leader { engaged: false, index: 1, silent: false }));
    let heartbeat = tokio::spawn(publish_heartbeats(client.clone(), leader.clone()));
    Some(Stack { nats, svc, client, leader, heartbeat })
}

async fn publish_heartbeats(client: async_nats::Client, leader: Arc<Mutex<Leader>>) {
    loop {
        let state = leader.lock().unwrap().clone();
        if !state.silent {
            let msg = SafetyState {
                engaged: state.engaged,
                reason: if state.engaged { "test engage".into() } else { "clear".into() },
                term: 1,
                index: state.index,
                leader: 1,
                ts: now_us(),
            };
            let _ = client
                .publish(wire::subjects::SAFETY_STATE, serde_json::to_vec(&msg).unwrap().into())
                .await;
        }
        tokio::time::sleep(Duration::from_millis(HEARTBEAT_MS)).await;
    }
}

impl Stack {
    pub fn set_leader(&self, f: impl FnOnce(&mut Leader)) {
        f(&mut self.leader.lock().unwrap());
    }

    pub async fn trip(&self, reason: &str) {
        let trip = SafetyTrip {
            request_id: format!("trip-{}", now_us()),
            reason: reason.into(),
            source: "test".into(),
            ts: now_us(),
        };
        self.client
            .publish(wire::subjects::SAFETY_TRIP, serde_json::to_vec(&trip).unwrap().into())
            .await
            .unwrap();
        self.client.flush().await.unwrap();
    }

    pub async fn status(&self, arm: &str) -> Value {
        let (code, body) = self.svc.get_json(&format!("/arms/{arm}/status")).await.unwrap();
        assert_eq!(code, 200, "{body}");
        body
    }

    /// Waits until `arm` reports `state` ("running" / "safe_stop").
    pub async fn wait_state(&self, arm: &str, state: &str) -> Value {
        wait_until(&format!("{arm} to be {state}"), WAIT, || async {
            let body = self.svc.get_json(&format!("/arms/{arm}/status")).await.ok()?.1;
            (body["state"] == state).then_some(body)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.svc.log_tail(20)))
    }

    pub async fn put_plan(&self, arm: &str, body: &Value) -> (u16, Value) {
        put_plan(&self.svc, arm, body).await
    }
}

pub async fn put_plan(svc: &ServiceProcess, arm: &str, body: &Value) -> (u16, Value) {
    svc.send_json(reqwest::Method::PUT, &format!("/arms/{arm}/plan"), body).await.unwrap()
}

/// Sends raw bytes as a JSON body.
pub async fn put_raw(
    svc: &ServiceProcess,
    arm: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let resp = svc
        .http()
        .put(svc.url(&format!("/arms/{arm}/plan")))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Every event of `arm` (paged through `GET /arms/{arm}/events`).
pub async fn all_events(svc: &ServiceProcess, arm: &str) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    let mut from = 1u64;
    loop {
        let (code, body) =
            svc.get_json(&format!("/arms/{arm}/events?from={from}&limit=1000")).await.unwrap();
        assert_eq!(code, 200, "{body}");
        let page = body["events"].as_array().unwrap().clone();
        let Some(last) = page.last() else { return out };
        from = last["position"].as_u64().unwrap() + 1;
        out.extend(page);
    }
}

/// A plan body.
pub fn plan(id: &str, version: u64, joints: &[f64]) -> Value {
    serde_json::json!({"id": id, "version": version, "joints": joints})
}

/// A metric's value from `/metrics` (sum over label sets that contain `labels`).
pub async fn metric(svc: &ServiceProcess, name: &str, labels: &str) -> f64 {
    let text = svc.http().get(svc.url("/metrics")).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| {
            let key = l.split_whitespace().next().unwrap_or("");
            key == name || (key.starts_with(&format!("{name}{{")) && key.contains(labels))
        })
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum()
}
