//! NATS subject names (CONTRACT.md), built in one place and checked for token safety.

/// JetStream stream of arm events.
pub const STREAM_EVENTS: &str = "EDGE_EVENTS";
/// JetStream stream of CRDT changes.
pub const STREAM_CRDT: &str = "EDGE_CRDT";
/// Cloud-side stream of site snapshots.
pub const STREAM_CLOUD_SITES: &str = "CLOUD_SITES";
/// E-stop engage requests (NATS request/reply).
pub const SAFETY_ESTOP: &str = "edge.safety.estop";
/// Fast-path trips, before commit.
pub const SAFETY_TRIP: &str = "edge.safety.trip";
/// Committed state and heartbeats from the leader.
pub const SAFETY_STATE: &str = "edge.safety.state";

/// Longest token accepted in a subject (an arm id, a counter name, a node id).
pub const TOKEN_LEN_MAX: usize = 64;

/// True when `token` can stand as one subject token: 1..=64 chars of `[A-Za-z0-9_-]`.
pub fn is_valid_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= TOKEN_LEN_MAX
        && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `edge.arm.{arm}.sensor`
pub fn arm_sensor(arm: &str) -> String {
    format!("edge.arm.{arm}.sensor")
}

/// `edge.arm.{arm}.plan.update`
pub fn arm_plan_update(arm: &str) -> String {
    format!("edge.arm.{arm}.plan.update")
}

/// `edge.arm.{arm}.events`
pub fn arm_events(arm: &str) -> String {
    format!("edge.arm.{arm}.events")
}

/// `edge.counter.{name}.inc`
pub fn counter_inc(name: &str) -> String {
    format!("edge.counter.{name}.inc")
}

/// `edge.crdt.{doc}.changes.{node}`
pub fn crdt_changes(doc: &str, node: &str) -> String {
    format!("edge.crdt.{doc}.changes.{node}")
}

/// `cloud.site.{site}.{kind}`
pub fn cloud_site(site: &str, kind: &str) -> String {
    format!("cloud.site.{site}.{kind}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_with_wildcards_or_dots_are_refused() {
        assert!(is_valid_token("arm-001"));
        for bad in ["", "a.b", "a*", ">", "a b", &"x".repeat(65)] {
            assert!(!is_valid_token(bad), "{bad:?}");
        }
        assert_eq!(arm_sensor("arm-001"), "edge.arm.arm-001.sensor");
    }
}
