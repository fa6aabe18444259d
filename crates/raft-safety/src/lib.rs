//! A Raft group (TiKV raft-rs) for safety-critical state: redb storage, TCP transport, ReadIndex reads.
//!
//! The pieces, from the inside out:
//! - [`Node`]: the core over raft-rs's `RawNode`, free of I/O and clocks (pre-vote and
//!   check-quorum on); it replicates a [`StateMachine`] such as the e-stop register [`EStop`].
//! - [`LogStore`]: the durable log seam, with [`RedbStore`] (redb, fsynced) and [`MemStore`].
//! - [`Transport`]: how messages leave, with [`TcpTransport`] (length-prefixed, reconnecting,
//!   bounded queues that drop rather than block, generic over the stream for TLS) and
//!   [`MemoryTransport`].
//! - [`RaftHandle`] / [`spawn`]: the async driver on tokio with a real clock: proposals and
//!   linearizable reads as futures, membership changes, leadership transfer, status.
//! - [`sim`] and [`linearizability`]: the deterministic simulation and the checker it uses.

pub mod config;
pub mod driver;
pub mod estop;
pub mod linearizability;
mod logging;
pub mod node;
pub mod sim;
pub mod state_machine;
pub mod storage;
pub mod transport;

pub use config::{ConfigError, NodeConfig};
pub use driver::{RaftHandle, inbound_channel, spawn};
pub use estop::{EStop, EStopCommand, EStopQuery, EStopResponse, EStopState};
pub use node::{Applied, Event, Node, NodeError, ProposeError, ReadError, RequestId, Role, Status};
pub use state_machine::{StateMachine, StateMachineError};
pub use storage::{LogStore, MemStore, RedbStore, StoreError, WriteBatch};
pub use transport::tcp::TcpTransport;
pub use transport::{MemoryTransport, Transport};

/// raft-rs's message and membership types, re-exported for callers.
pub use raft::prelude::{
    ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState, Message,
};
