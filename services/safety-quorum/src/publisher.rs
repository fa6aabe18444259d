//! The NATS side: the leader's `edge.safety.state` (every change, and a heartbeat every
//! `--heartbeat-ms`), and the `edge.safety.estop` request responder.
//!
//! Every heartbeat is a fresh proof of leadership: the leader publishes it only after a
//! ReadIndex round confirmed by a quorum in its current term. A leader cut off from the
//! majority therefore falls silent within one round, long before check-quorum deposes it,
//! and the arms' deadman stops them. Followers never publish.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use raft_safety::{EStop, EStopQuery, EStopState, RaftHandle, ReadError, Role, Status};
use serde_json::json;
use service_kit::shutdown::Shutdown;
use service_kit::{ApiError, ComponentState, Readiness};
use tokio::sync::Semaphore;
use wire::json::{EstopRequest, SafetyState};

use crate::api::App;
use crate::{COMPONENT_RAFT, Config};

/// Engage requests from NATS handled at once; more wait for a slot.
pub const NATS_REQUESTS_IN_FLIGHT_MAX: usize = 256;
/// Floor of the wait for one heartbeat's quorum confirmation.
pub const HEARTBEAT_CONFIRM_MS_MIN: u64 = 50;

/// How the publisher runs.
#[derive(Debug, Clone, Copy)]
pub struct PublisherSettings {
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// Bound on one heartbeat's quorum confirmation.
    pub confirm_timeout: Duration,
}

impl From<&Config> for PublisherSettings {
    fn from(config: &Config) -> Self {
        let heartbeat = Duration::from_millis(config.heartbeat_ms);
        let confirm_ms = (config.heartbeat_ms * 5).max(HEARTBEAT_CONFIRM_MS_MIN);
        Self { heartbeat, confirm_timeout: Duration::from_millis(confirm_ms) }
    }
}

type Confirm = Pin<Box<dyn Future<Output = (u64, Result<Vec<u8>, ReadError>)> + Send>>;

/// Publishes the committed state while this member leads, and keeps the `raft` readiness
/// component and the role/term gauges current, until `stop`.
pub async fn publish_state(
    raft: RaftHandle,
    nats: async_nats::Client,
    readiness: Readiness,
    settings: PublisherSettings,
    stop: Shutdown,
) {
    let mut status_rx = raft.subscribe();
    let mut ticker = tokio::time::interval(settings.heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut confirming: Option<Confirm> = None;
    // (term, index) of the last state published; a change is a newer register index.
    let mut published: Option<(u64, u64)> = None;
    let mut last_applied = 0;
    observe(&raft.status(), &readiness);
    loop {
        tokio::select! {
            _ = stop.wait() => return,
            _ = ticker.tick(), if confirming.is_none() => {
                let status = raft.status();
                if status.role == Role::Leader {
                    let raft = raft.clone();
                    let timeout = settings.confirm_timeout;
                    confirming = Some(Box::pin(async move {
                        let read = tokio::time::timeout(timeout, raft.read(EStopQuery::State.encode())).await;
                        (status.term, read.unwrap_or(Err(ReadError::Timeout)))
                    }));
                }
            }
            (term, read) = async { confirming.as_mut().expect("guarded").await }, if confirming.is_some() => {
                confirming = None;
                let status = raft.status();
                let still_leading = status.role == Role::Leader && status.term == term;
                match read.map(|bytes| EStop::decode_state(&bytes)) {
                    Ok(Ok(state)) if still_leading => {
                        if publish(&nats, &state, &status).await {
                            metrics::counter!("keel_safety_heartbeats_total").increment(1);
                            published = Some((status.term, state.index));
                        }
                    }
                    Ok(_) => {}
                    Err(error) => {
                        metrics::counter!("keel_safety_heartbeats_unconfirmed_total").increment(1);
                        tracing::debug!(%error, term, "heartbeat not confirmed by a quorum");
                    }
                }
            }
            changed = status_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                let status = status_rx.borrow_and_update().clone();
                observe(&status, &readiness);
                if status.role != Role::Leader || status.applied == last_applied {
                    continue;
                }
                last_applied = status.applied;
                // Applied entries are committed: a change may go out without another round.
                let Ok(bytes) = raft.read_local(EStopQuery::State.encode()).await else { continue };
                let Ok(state) = EStop::decode_state(&bytes) else { continue };
                let newer = published.is_none_or(|(term, index)| state.index > index || status.term > term);
                if newer && publish(&nats, &state, &status).await {
                    metrics::counter!("keel_safety_state_changes_published_total").increment(1);
                    published = Some((status.term, state.index));
                }
            }
        }
    }
}

/// Updates gauges and the `raft` readiness component from a status.
fn observe(status: &Status, readiness: &Readiness) {
    let role = match status.role {
        Role::Follower => 0.0,
        Role::PreCandidate => 1.0,
        Role::Candidate => 2.0,
        Role::Leader => 3.0,
    };
    metrics::gauge!("keel_safety_role").set(role);
    metrics::gauge!("keel_safety_term").set(status.term as f64);
    metrics::gauge!("keel_safety_commit_index").set(status.commit as f64);
    metrics::gauge!("keel_safety_applied_index").set(status.applied as f64);
    metrics::gauge!("keel_safety_leader").set(status.leader.unwrap_or(0) as f64);
    let state = if status.leader.is_some() {
        ComponentState::Ok
    } else {
        ComponentState::Down("no_leader")
    };
    if readiness.state(COMPONENT_RAFT) != Some(state.clone()) {
        readiness.set(COMPONENT_RAFT, state);
    }
}

async fn publish(nats: &async_nats::Client, state: &EStopState, status: &Status) -> bool {
    let message = SafetyState {
        engaged: state.engaged,
        reason: state.reason.clone(),
        term: status.term,
        index: state.index,
        leader: status.id,
        ts: crate::now_us(),
    };
    let body = serde_json::to_vec(&message).expect("a safety state serialises");
    match nats.publish(wire::subjects::SAFETY_STATE, body.into()).await {
        Ok(()) => true,
        Err(error) => {
            tracing::debug!(%error, "safety state not published");
            false
        }
    }
}

/// Answers `edge.safety.estop` requests (same body and reply as `POST /estop`, plus
/// `"status"`) until `stop`. Every member subscribes (no queue group): any member that hears
/// a request trips the arms, and the requester takes the first reply, which a majority
/// member gives as soon as the engage commits.
pub async fn serve_estop_requests(
    app: App,
    nats: async_nats::Client,
    body_limit_bytes: usize,
    stop: Shutdown,
) {
    let mut requests = match nats.subscribe(wire::subjects::SAFETY_ESTOP).await {
        Ok(subscriber) => subscriber,
        Err(error) => {
            tracing::error!(%error, "cannot subscribe to e-stop requests");
            return;
        }
    };
    let slots = Arc::new(Semaphore::new(NATS_REQUESTS_IN_FLIGHT_MAX));
    loop {
        let message = tokio::select! {
            _ = stop.wait() => return,
            message = requests.next() => match message { Some(m) => m, None => return },
        };
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let app = app.clone();
        let nats = nats.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let reply = match decode_request(&message.payload, body_limit_bytes) {
                Ok(request) => app.engage(request).await,
                Err(error) => Err(error),
            };
            let body = match reply {
                Ok(mut body) => {
                    body["status"] = json!(200);
                    body
                }
                Err(error) => {
                    let mut body = error.body();
                    body["status"] = json!(error.status.as_u16());
                    body
                }
            };
            if let Some(reply_to) = message.reply {
                let bytes = serde_json::to_vec(&body).expect("a reply serialises");
                if let Err(error) = nats.publish(reply_to, bytes.into()).await {
                    tracing::debug!(%error, "e-stop reply not sent");
                }
            }
        });
    }
}

fn decode_request(payload: &[u8], body_limit_bytes: usize) -> Result<EstopRequest, ApiError> {
    if payload.len() > body_limit_bytes {
        metrics::counter!("keel_safety_nats_malformed_total", "kind" => "too_large").increment(1);
        return Err(ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request of {} bytes exceeds {body_limit_bytes}", payload.len()),
        ));
    }
    serde_json::from_slice::<EstopRequest>(payload).map_err(|error| {
        let code = if error.is_data() { "invalid_body" } else { "invalid_json" };
        metrics::counter!("keel_safety_nats_malformed_total", "kind" => code).increment(1);
        tracing::warn!(%error, "malformed e-stop request");
        ApiError::bad_request(code, error.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_requests_are_decoded_strictly() {
        let ok = br#"{"reason":"r","source":"s","request_id":"q"}"#;
        assert_eq!(decode_request(ok, 1024).unwrap().request_id, "q");
        let cases: [(&[u8], &str); 4] = [
            (b"{nope", "invalid_json"),
            (br#"{"reason":"r","source":"s"}"#, "invalid_body"),
            (br#"{"reason":"r","source":"s","request_id":"q","x":1}"#, "invalid_body"),
            (&[b' '; 2048], "body_too_large"),
        ];
        for (payload, code) in cases {
            assert_eq!(decode_request(payload, 1024).unwrap_err().code, code);
        }
    }
}
