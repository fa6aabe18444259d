//! The replicated state machine seam: a deterministic `apply` plus snapshot and restore.

use thiserror::Error;

/// A deterministic state machine replicated by a [`crate::Node`].
///
/// Every member applies the same committed commands in the same order, so `apply` must depend
/// only on its arguments and the current state: no clock, no randomness, no I/O. Malformed
/// commands must be answered (with an error response of the machine's own encoding), not
/// panicked on, since they are already committed.
pub trait StateMachine: Send + 'static {
    /// Applies the committed command at log position `index` (written in `term`) and returns the
    /// response handed to the proposer.
    fn apply(&mut self, index: u64, term: u64, command: &[u8]) -> Vec<u8>;

    /// Answers a read-only query against the current state.
    fn query(&self, query: &[u8]) -> Vec<u8>;

    /// Serialises the whole state (taken at the last applied index).
    fn snapshot(&self) -> Vec<u8>;

    /// Replaces the whole state with a snapshot produced by [`StateMachine::snapshot`].
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), StateMachineError>;
}

/// Why a state machine could not restore a snapshot.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StateMachineError {
    /// The snapshot bytes do not decode.
    #[error("snapshot does not decode: {0}")]
    Decode(String),
}
