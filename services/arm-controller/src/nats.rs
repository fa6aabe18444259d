//! The NATS side: plan-update requests, sensor frames, safety trips and states, and the
//! e-stop requests the arms' own checks raise. Malformed input is counted and logged (at a
//! bounded rate), never fatal.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use service_kit::ApiError;
use service_kit::shutdown::Shutdown;
use tokio::sync::{Semaphore, mpsc};
use wire::json::{EstopRequest, PlanUpdate, SafetyState, SafetyTrip};

use crate::clock;
use crate::controller::{Controller, Ingest};

/// Plan-update requests handled at once; more wait in the subscription's buffer.
pub const PLAN_REQUESTS_INFLIGHT_MAX: usize = 1_024;
/// Attempts to deliver one e-stop request to the quorum.
pub const ESTOP_ATTEMPTS_MAX: u32 = 5;
/// Time limit for one e-stop request's reply.
pub const ESTOP_TIMEOUT_MS: u64 = 1_000;
/// At most one warning per this interval per kind of bad input.
const WARN_INTERVAL: Duration = Duration::from_secs(1);

/// Logs at most once per [`WARN_INTERVAL`].
#[derive(Debug, Default)]
struct Throttle(Option<Instant>);

impl Throttle {
    fn ready(&mut self) -> bool {
        let now = Instant::now();
        if self.0.is_some_and(|t| now.duration_since(t) < WARN_INTERVAL) {
            return false;
        }
        self.0 = Some(now);
        true
    }
}

fn subject_arm(subject: &str) -> &str {
    subject.split('.').nth(2).unwrap_or("")
}

async fn subscribe(client: &async_nats::Client, subject: &str) -> Option<async_nats::Subscriber> {
    match client.subscribe(subject.to_owned()).await {
        Ok(sub) => Some(sub),
        Err(err) => {
            tracing::error!(subject, error = %err, "cannot subscribe");
            None
        }
    }
}

/// The reply to a plan-update request: the PUT's body plus `"status"`.
pub async fn plan_reply(
    ctl: &Arc<Controller>,
    arm: &str,
    payload: &[u8],
    body_limit: usize,
) -> Value {
    let started = Instant::now();
    let result = if payload.len() > body_limit {
        Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("{} bytes, at most {body_limit}", payload.len()),
        ))
    } else {
        match serde_json::from_slice::<PlanUpdate>(payload) {
            Ok(update) => ctl.update_plan(arm, update).await,
            Err(err) if err.is_data() => {
                Err(ApiError::bad_request("invalid_body", err.to_string()))
            }
            Err(err) => Err(ApiError::bad_request("invalid_json", err.to_string())),
        }
    };
    let (status, mut body) = match result {
        Ok(ack) => (200, serde_json::to_value(ack).unwrap_or(Value::Null)),
        Err(err) => (err.status.as_u16(), err.body()),
    };
    crate::record_plan_metrics("nats", status, started.elapsed());
    if let Value::Object(map) = &mut body {
        map.insert("status".into(), Value::from(status));
    }
    body
}

/// Serves `edge.arm.*.plan.update` requests until `stop`.
pub async fn serve_plan_requests(
    ctl: Arc<Controller>,
    client: async_nats::Client,
    body_limit: usize,
    stop: Shutdown,
) {
    let Some(mut sub) = subscribe(&client, "edge.arm.*.plan.update").await else { return };
    let inflight = Arc::new(Semaphore::new(PLAN_REQUESTS_INFLIGHT_MAX));
    loop {
        let msg = tokio::select! {
            msg = sub.next() => match msg { Some(msg) => msg, None => return },
            _ = stop.wait() => return,
        };
        let Ok(permit) = inflight.clone().acquire_owned().await else { return };
        let (ctl, client) = (ctl.clone(), client.clone());
        tokio::spawn(async move {
            let body = plan_reply(&ctl, subject_arm(&msg.subject), &msg.payload, body_limit).await;
            if let Some(reply) = msg.reply {
                let bytes = serde_json::to_vec(&body).unwrap_or_default();
                if let Err(err) = client.publish(reply, Bytes::from(bytes)).await {
                    tracing::warn!(error = %err, "cannot send a plan-update reply");
                }
            }
            drop(permit);
        });
    }
}

/// Folds `edge.arm.*.sensor` frames until `stop`.
pub async fn serve_sensors(ctl: Arc<Controller>, client: async_nats::Client, stop: Shutdown) {
    let Some(mut sub) = subscribe(&client, "edge.arm.*.sensor").await else { return };
    let mut throttle = Throttle::default();
    loop {
        let msg = tokio::select! {
            msg = sub.next() => match msg { Some(msg) => msg, None => return },
            _ = stop.wait() => return,
        };
        let arm = subject_arm(&msg.subject);
        match ctl.ingest(arm, &msg.payload, Instant::now(), clock::now_us()) {
            Ingest::Folded { samples, .. } => {
                metrics::counter!("keel_arm_sensor_frames_total").increment(1);
                metrics::counter!("keel_arm_sensor_samples_total").increment(samples as u64);
            }
            Ingest::Malformed(reason) => {
                metrics::counter!("keel_arm_sensor_malformed_total", "reason" => reason)
                    .increment(1);
                if throttle.ready() {
                    tracing::warn!(
                        arm,
                        reason,
                        len_bytes = msg.payload.len(),
                        "malformed sensor frame dropped"
                    );
                }
            }
            Ingest::UnknownArm => {
                metrics::counter!("keel_arm_sensor_malformed_total", "reason" => "unknown_arm")
                    .increment(1);
                if throttle.ready() {
                    tracing::warn!(arm, "sensor frame for an arm not hosted here dropped");
                }
            }
        }
    }
}

/// Feeds `edge.safety.trip` and `edge.safety.state` into the safety core until `stop`.
pub async fn serve_safety(ctl: Arc<Controller>, client: async_nats::Client, stop: Shutdown) {
    let Some(mut trips) = subscribe(&client, wire::subjects::SAFETY_TRIP).await else { return };
    let Some(mut states) = subscribe(&client, wire::subjects::SAFETY_STATE).await else { return };
    let mut throttle = Throttle::default();
    loop {
        tokio::select! {
            msg = trips.next() => {
                let Some(msg) = msg else { return };
                match serde_json::from_slice::<SafetyTrip>(&msg.payload) {
                    Ok(trip) => {
                        ctl.with_safety(|s| s.on_trip(&trip));
                        tracing::warn!(request_id = %trip.request_id, source = %trip.source, reason = %trip.reason, "e-stop trip: every arm stops");
                        metrics::counter!("keel_arm_safety_trips_total").increment(1);
                        ctl.tick(Instant::now(), clock::now_us());
                    }
                    Err(err) => malformed("trip", &err, &mut throttle),
                }
            }
            msg = states.next() => {
                let Some(msg) = msg else { return };
                match serde_json::from_slice::<SafetyState>(&msg.payload) {
                    Ok(state) => {
                        let outcome = ctl.with_safety(|s| s.on_state(&state, Instant::now()));
                        if !outcome.released.is_empty() {
                            tracing::info!(index = state.index, term = state.term, arms = outcome.released.len(), "committed clear released stopped arms");
                        }
                        if outcome.ignored {
                            metrics::counter!("keel_arm_safety_states_ignored_total").increment(1);
                        }
                    }
                    Err(err) => malformed("state", &err, &mut throttle),
                }
            }
            _ = stop.wait() => return,
        }
    }
}

fn malformed(what: &'static str, err: &serde_json::Error, throttle: &mut Throttle) {
    metrics::counter!("keel_arm_safety_malformed_total", "kind" => what).increment(1);
    if throttle.ready() {
        tracing::warn!(kind = what, error = %err, "malformed safety message dropped");
    }
}

/// Sends the arms' e-stop requests to the quorum (`edge.safety.estop`), retrying a few times.
pub async fn send_estops(
    client: async_nats::Client,
    mut rx: mpsc::Receiver<EstopRequest>,
    stop: Shutdown,
) {
    loop {
        let request = tokio::select! {
            r = rx.recv() => match r { Some(r) => r, None => return },
            _ = stop.wait() => return,
        };
        let body = Bytes::from(serde_json::to_vec(&request).unwrap_or_default());
        let mut outcome = "failed";
        for attempt in 0..ESTOP_ATTEMPTS_MAX {
            let sent = tokio::time::timeout(
                Duration::from_millis(ESTOP_TIMEOUT_MS),
                client.request(wire::subjects::SAFETY_ESTOP, body.clone()),
            )
            .await;
            match sent {
                Ok(Ok(reply)) => {
                    tracing::info!(request_id = %request.request_id, reply = %String::from_utf8_lossy(&reply.payload), "e-stop request answered");
                    outcome = "answered";
                    break;
                }
                Ok(Err(err)) => {
                    tracing::warn!(request_id = %request.request_id, attempt, error = %err, "e-stop request not answered")
                }
                Err(_) => {
                    tracing::warn!(request_id = %request.request_id, attempt, "e-stop request timed out")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100 << attempt)) => {}
                _ = stop.wait() => return,
            }
        }
        metrics::counter!("keel_arm_estop_requests_total", "outcome" => outcome).increment(1);
    }
}
