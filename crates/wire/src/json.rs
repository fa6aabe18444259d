//! JSON control messages (CONTRACT.md): plan updates, e-stop, safety state, counter
//! increments, and the error body every failure carries.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `PUT /arms/{arm}/plan` and NATS `edge.arm.{arm}.plan.update` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanUpdate {
    /// Caller's id of this update (idempotency key together with `version`).
    pub id: String,
    /// New plan version; must exceed the current one.
    pub version: u64,
    /// Target joint positions, exactly `dof` finite values.
    pub joints: Vec<f64>,
    /// Optional RFC 3339 timestamp from the caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
}

/// Reply to an accepted, durable plan update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanAck {
    /// Arm id.
    pub arm: String,
    /// The update's id.
    pub id: String,
    /// The committed version.
    pub version: u64,
    /// Position of the event in the controller's log.
    pub position: u64,
    /// Hex SHA-256 chain hash of the event.
    pub hash: String,
}

/// `POST /estop` and NATS `edge.safety.estop` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EstopRequest {
    /// Why the stop is engaged.
    pub reason: String,
    /// Who or what engaged it.
    pub source: String,
    /// Idempotency key.
    pub request_id: String,
}

/// `POST /estop/clear` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EstopClear {
    /// Who clears it (audited).
    pub by: String,
    /// Idempotency key.
    pub request_id: String,
    /// Why it is cleared (audited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Core NATS `edge.safety.trip`: sent before the commit by the member taking an engage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SafetyTrip {
    /// The engage request's id.
    pub request_id: String,
    /// Why.
    pub reason: String,
    /// Who.
    pub source: String,
    /// When the trip was sent, microseconds since the Unix epoch.
    pub ts: u64,
}

/// NATS `edge.safety.state`: the committed e-stop state, published by the leader on
/// every change and as a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SafetyState {
    /// Whether the e-stop is engaged.
    pub engaged: bool,
    /// Reason of the last change.
    pub reason: String,
    /// Raft term of the publishing leader.
    pub term: u64,
    /// Raft index of the last applied change.
    pub index: u64,
    /// Leader's node id.
    pub leader: u64,
    /// When published, microseconds since the Unix epoch.
    pub ts: u64,
}

/// `POST /counters/{name}/increment` and NATS `edge.counter.{name}.inc`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CounterIncrement {
    /// Non-zero amount.
    pub amount: i64,
    /// Idempotency key, counted once across all replicas.
    pub op_id: String,
}

/// A counter's value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterValue {
    /// Counter name.
    pub name: String,
    /// Total.
    pub value: i64,
}

/// The body of every error: `{"error": "<code>", "message": "..."}` plus extras.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable snake_case code.
    pub error: String,
    /// Human text.
    pub message: String,
    /// Any extra fields (e.g. `current`).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_update_refuses_unknown_fields_and_keeps_the_contract_shape() {
        let ok: PlanUpdate =
            serde_json::from_str(r#"{"id":"u1","version":3,"joints":[0.0,1.0]}"#).unwrap();
        assert_eq!(ok.version, 3);
        assert!(
            serde_json::from_str::<PlanUpdate>(r#"{"id":"u1","version":3,"joints":[],"x":1}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<PlanUpdate>(r#"{"id":"u1","joints":[]}"#).is_err());
    }

    #[test]
    fn error_body_keeps_extras() {
        let body: ErrorBody =
            serde_json::from_str(r#"{"error":"stale_version","message":"m","current":4}"#).unwrap();
        assert_eq!(body.extra["current"], 4);
    }
}
