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
//!
//! Operating rules the library cannot enforce: a member's data dir (its [`RedbStore`]) is its
//! identity; restarting on the same data dir rejoins with its state, but a member whose data
//! was lost must come back under a new id through a membership change, never under its old one.
//!
//! How a service drives it (one member of `--peers 1=...,2=...,3=...`):
//!
//! ```no_run
//! # async fn member() -> anyhow::Result<()> {
//! use std::collections::HashMap;
//! use std::net::SocketAddr;
//! use raft_safety::transport::tcp::serve;
//! use raft_safety::{EStop, EStopCommand, EStopQuery, EStopResponse, Node, NodeConfig};
//! use raft_safety::{RedbStore, TcpTransport, inbound_channel, spawn};
//!
//! let id = 1;
//! let peers: HashMap<u64, SocketAddr> = HashMap::from([
//!     (1, "127.0.0.1:7101".parse()?),
//!     (2, "127.0.0.1:7102".parse()?),
//!     (3, "127.0.0.1:7103".parse()?),
//! ]);
//! // Construct: a redb file in the data dir, the e-stop state machine, the peers' addresses.
//! let store = RedbStore::open("/var/lib/keel/safety/raft.redb")?;
//! let node = Node::new(NodeConfig::new(id, vec![1, 2, 3]), store, EStop::new())?;
//! let (inbound_tx, inbound_rx) = inbound_channel();
//! let listener = tokio::net::TcpListener::bind(peers[&id]).await?;
//! tokio::spawn(serve(listener, inbound_tx));
//! let transport = TcpTransport::new(peers.iter().filter(|(p, _)| **p != id).map(|(p, a)| (*p, *a)));
//! // Run: the ready loop on its own task.
//! let (raft, _task) = spawn(node, transport, inbound_rx);
//!
//! // Propose: resolves once committed and applied (or NoQuorum / Timeout / LeadershipLost).
//! let engage = EStopCommand::Engage {
//!     request_id: "req-42".into(),
//!     reason: "person in cell".into(),
//!     source: "panel-3".into(),
//!     who: "alice".into(),
//!     at_ms: 1_700_000_000_000,
//! };
//! let applied = raft.propose(engage.encode()).await?;
//! let answer = EStopResponse::decode(&applied.response)?;
//! assert!(answer.engaged);
//!
//! // Read: linearizable (ReadIndex), or local with `read_local`.
//! let state = EStop::decode_state(&raft.read(EStopQuery::State.encode()).await?)?;
//! // Status for `GET /cluster` and for the leader-only heartbeat.
//! let status = raft.status();
//! println!("{} engaged={} leader={:?} term={}", status.id, state.engaged, status.leader, status.term);
//! # Ok(()) }
//! ```

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
pub use storage::{LogStore, MemStore, RedbStore, StoreError, WalStore, WriteBatch};
pub use transport::tcp::TcpTransport;
pub use transport::{MemoryTransport, Transport};

/// raft-rs's message and membership types, re-exported for callers.
pub use raft::prelude::{
    ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState, Message,
};
