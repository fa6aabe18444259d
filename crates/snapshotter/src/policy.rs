//! When to take a snapshot: every N events, every T, or when the log tail exceeds S bytes.

use std::time::Duration;

/// Default events between snapshots.
pub const DEFAULT_EVERY_EVENTS: u64 = 10_000;
/// Default time between snapshots (if anything changed).
pub const DEFAULT_EVERY: Duration = Duration::from_secs(60);
/// Default log tail size (bytes since the last snapshot) that triggers one.
pub const DEFAULT_TAIL_BYTES: u64 = 64 * 1024 * 1024;

/// A snapshot is due when any enabled trigger fires (and at least one event is new).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotPolicy {
    /// Every this many events.
    pub every_events: Option<u64>,
    /// Every this long.
    pub every: Option<Duration>,
    /// When the log has grown this many bytes since the last snapshot.
    pub tail_bytes: Option<u64>,
}

impl Default for SnapshotPolicy {
    fn default() -> Self {
        Self {
            every_events: Some(DEFAULT_EVERY_EVENTS),
            every: Some(DEFAULT_EVERY),
            tail_bytes: Some(DEFAULT_TAIL_BYTES),
        }
    }
}

impl SnapshotPolicy {
    /// Whether a snapshot is due after `events` new events, `elapsed` time and `tail_bytes` of
    /// log growth since the last one.
    pub fn is_due(&self, events: u64, elapsed: Duration, tail_bytes: u64) -> bool {
        events > 0
            && (self.every_events.is_some_and(|n| events >= n)
                || self.every.is_some_and(|t| elapsed >= t)
                || self.tail_bytes.is_some_and(|s| tail_bytes >= s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_trigger_fires_alone() {
        let never = SnapshotPolicy { every_events: None, every: None, tail_bytes: None };
        assert!(!never.is_due(1_000_000, Duration::from_secs(1_000_000), u64::MAX));
        let events = SnapshotPolicy { every_events: Some(10), ..never };
        assert!(!events.is_due(9, Duration::ZERO, 0));
        assert!(events.is_due(10, Duration::ZERO, 0));
        let time = SnapshotPolicy { every: Some(Duration::from_secs(5)), ..never };
        assert!(!time.is_due(1, Duration::from_secs(4), 0));
        assert!(time.is_due(1, Duration::from_secs(5), 0));
        assert!(!time.is_due(0, Duration::from_secs(50), 0), "nothing new, nothing to save");
        let bytes = SnapshotPolicy { tail_bytes: Some(100), ..never };
        assert!(!bytes.is_due(1, Duration::ZERO, 99));
        assert!(bytes.is_due(1, Duration::ZERO, 100));
    }
}
