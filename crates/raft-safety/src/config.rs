//! Node configuration: tick length, election and heartbeat ticks, timeouts and limits, validated.

use thiserror::Error;

/// Default length of one Raft tick.
pub const TICK_MS_DEFAULT: u64 = 10;
/// Default election timeout in ticks (randomised by raft-rs in `[n, 2n)`).
pub const ELECTION_TICKS_DEFAULT: usize = 10;
/// Default leader heartbeat interval in ticks.
pub const HEARTBEAT_TICKS_DEFAULT: usize = 2;
/// Default bound on how long a proposal may wait to be applied.
pub const PROPOSAL_TIMEOUT_TICKS_DEFAULT: u64 = 200;
/// Default bound on how long a linearizable read may wait.
pub const READ_TIMEOUT_TICKS_DEFAULT: u64 = 200;
/// Default number of applied entries between two state machine snapshots (log compaction).
pub const SNAPSHOT_INTERVAL_ENTRIES_DEFAULT: u64 = 1_000;
/// Default bound on the bytes of entries in one append message.
pub const MESSAGE_ENTRIES_BYTES_MAX_DEFAULT: u64 = 1024 * 1024;
/// Default bound on in-flight append messages per follower.
pub const INFLIGHT_MESSAGES_MAX_DEFAULT: usize = 256;
/// Default bound on proposals and reads waiting in one node.
pub const PENDING_REQUESTS_MAX_DEFAULT: usize = 4_096;
/// Default bound on the size of one command.
pub const COMMAND_BYTES_MAX_DEFAULT: usize = 64 * 1024;

/// Smallest accepted tick length.
pub const TICK_MS_MIN: u64 = 1;
/// Largest accepted tick length.
pub const TICK_MS_MAX: u64 = 1_000;
/// Smallest accepted election timeout in ticks.
pub const ELECTION_TICKS_MIN: usize = 3;
/// Largest accepted election timeout in ticks.
pub const ELECTION_TICKS_MAX: usize = 10_000;

/// Configuration of one Raft member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// This member's id (non-zero, unique in the group). Never reuse an id with a wiped data
    /// dir: a member that lost its log must rejoin under a new id (remove the old one, add the
    /// new one), or it may vote for a stale candidate and lose committed entries. The
    /// simulation found exactly that when it wiped and reused ids.
    pub id: u64,
    /// The initial voters, used only to bootstrap an empty store. Empty means "join": the node
    /// waits to be added by a membership change and to receive a snapshot from the leader.
    pub peers: Vec<u64>,
    /// Wall-clock length of one tick (used by the async driver; the core only counts ticks).
    pub tick_ms: u64,
    /// Election timeout in ticks; must be greater than `heartbeat_ticks`.
    pub election_ticks: usize,
    /// Leader heartbeat interval in ticks.
    pub heartbeat_ticks: usize,
    /// Ticks a proposal may wait to be applied before it fails.
    pub proposal_timeout_ticks: u64,
    /// Ticks a linearizable read may wait before it fails.
    pub read_timeout_ticks: u64,
    /// Applied entries between two snapshots; the log below a snapshot is compacted.
    pub snapshot_interval_entries: u64,
    /// Bytes of entries in one append message.
    pub message_entries_bytes_max: u64,
    /// In-flight append messages per follower.
    pub inflight_messages_max: usize,
    /// Proposals plus reads waiting in this node.
    pub pending_requests_max: usize,
    /// Bytes of one command.
    pub command_bytes_max: usize,
}

impl NodeConfig {
    /// A configuration with the defaults for member `id` of a group bootstrapped with `peers`.
    pub fn new(id: u64, peers: Vec<u64>) -> Self {
        Self {
            id,
            peers,
            tick_ms: TICK_MS_DEFAULT,
            election_ticks: ELECTION_TICKS_DEFAULT,
            heartbeat_ticks: HEARTBEAT_TICKS_DEFAULT,
            proposal_timeout_ticks: PROPOSAL_TIMEOUT_TICKS_DEFAULT,
            read_timeout_ticks: READ_TIMEOUT_TICKS_DEFAULT,
            snapshot_interval_entries: SNAPSHOT_INTERVAL_ENTRIES_DEFAULT,
            message_entries_bytes_max: MESSAGE_ENTRIES_BYTES_MAX_DEFAULT,
            inflight_messages_max: INFLIGHT_MESSAGES_MAX_DEFAULT,
            pending_requests_max: PENDING_REQUESTS_MAX_DEFAULT,
            command_bytes_max: COMMAND_BYTES_MAX_DEFAULT,
        }
    }

    /// Checks every field; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id == 0 {
            return Err(ConfigError::ZeroId);
        }
        if !(TICK_MS_MIN..=TICK_MS_MAX).contains(&self.tick_ms) {
            return Err(ConfigError::TickMs(self.tick_ms));
        }
        if self.heartbeat_ticks == 0 {
            return Err(ConfigError::HeartbeatTicks(self.heartbeat_ticks));
        }
        if !(ELECTION_TICKS_MIN..=ELECTION_TICKS_MAX).contains(&self.election_ticks)
            || self.election_ticks <= self.heartbeat_ticks
        {
            return Err(ConfigError::ElectionTicks {
                election_ticks: self.election_ticks,
                heartbeat_ticks: self.heartbeat_ticks,
            });
        }
        let election = self.election_ticks as u64;
        if self.proposal_timeout_ticks <= election {
            return Err(ConfigError::Timeout {
                field: "proposal_timeout_ticks",
                ticks: self.proposal_timeout_ticks,
            });
        }
        if self.read_timeout_ticks <= election {
            return Err(ConfigError::Timeout {
                field: "read_timeout_ticks",
                ticks: self.read_timeout_ticks,
            });
        }
        for (field, value) in [
            ("snapshot_interval_entries", self.snapshot_interval_entries),
            ("message_entries_bytes_max", self.message_entries_bytes_max),
            ("inflight_messages_max", self.inflight_messages_max as u64),
            ("pending_requests_max", self.pending_requests_max as u64),
            ("command_bytes_max", self.command_bytes_max as u64),
        ] {
            if value == 0 {
                return Err(ConfigError::ZeroLimit(field));
            }
        }
        if !self.peers.is_empty() {
            if self.peers.contains(&0) {
                return Err(ConfigError::Peers("peer id 0"));
            }
            let mut sorted = self.peers.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if sorted.len() != self.peers.len() {
                return Err(ConfigError::Peers("duplicate peer id"));
            }
            if !self.peers.contains(&self.id) {
                return Err(ConfigError::Peers("peers do not include this node's id"));
            }
        }
        Ok(())
    }
}

/// Why a [`NodeConfig`] was rejected.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// Node ids start at 1.
    #[error("node id must not be 0")]
    ZeroId,
    /// The tick length is out of range.
    #[error("tick_ms {0} is outside {TICK_MS_MIN}..={TICK_MS_MAX}")]
    TickMs(u64),
    /// The heartbeat interval is zero.
    #[error("heartbeat_ticks must be at least 1, got {0}")]
    HeartbeatTicks(usize),
    /// The election timeout is out of range or not above the heartbeat interval.
    #[error(
        "election_ticks {election_ticks} must be in {ELECTION_TICKS_MIN}..={ELECTION_TICKS_MAX} and greater than heartbeat_ticks {heartbeat_ticks}"
    )]
    ElectionTicks {
        /// The rejected election timeout.
        election_ticks: usize,
        /// The heartbeat interval it was compared with.
        heartbeat_ticks: usize,
    },
    /// A request timeout does not exceed one election timeout.
    #[error("{field} {ticks} must exceed election_ticks")]
    Timeout {
        /// The field.
        field: &'static str,
        /// Its value.
        ticks: u64,
    },
    /// A limit is zero.
    #[error("{0} must not be 0")]
    ZeroLimit(&'static str),
    /// The initial peer list is malformed.
    #[error("invalid peers: {0}")]
    Peers(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_pre_vote_friendly() {
        let config = NodeConfig::new(1, vec![1, 2, 3]);
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.tick_ms, 10);
    }

    #[test]
    fn rejects_bad_ticks_and_peers() {
        let base = NodeConfig::new(1, vec![1, 2, 3]);
        let mut c = base.clone();
        c.election_ticks = c.heartbeat_ticks;
        assert!(matches!(c.validate(), Err(ConfigError::ElectionTicks { .. })));
        let mut c = base.clone();
        c.heartbeat_ticks = 0;
        assert_eq!(c.validate(), Err(ConfigError::HeartbeatTicks(0)));
        let mut c = base.clone();
        c.tick_ms = 0;
        assert_eq!(c.validate(), Err(ConfigError::TickMs(0)));
        let mut c = base.clone();
        c.id = 0;
        assert_eq!(c.validate(), Err(ConfigError::ZeroId));
        let mut c = base.clone();
        c.peers = vec![2, 3];
        assert!(matches!(c.validate(), Err(ConfigError::Peers(_))));
        let mut c = base.clone();
        c.peers = vec![1, 2, 2];
        assert!(matches!(c.validate(), Err(ConfigError::Peers(_))));
        let mut c = base.clone();
        c.proposal_timeout_ticks = 5;
        assert!(matches!(c.validate(), Err(ConfigError::Timeout { .. })));
        let mut c = base;
        c.snapshot_interval_entries = 0;
        assert_eq!(c.validate(), Err(ConfigError::ZeroLimit("snapshot_interval_entries")));
        let join = NodeConfig::new(4, vec![]);
        assert_eq!(join.validate(), Ok(()));
    }
}
