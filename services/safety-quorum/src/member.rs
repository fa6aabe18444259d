//! One Raft member: the log store in the data dir (`--raft-store`), the e-stop state machine, the TCP
//! listener for peers and the TCP transport to them, driven by raft-safety's async driver.

use std::time::Duration;

use anyhow::Context as _;
use raft_safety::transport::tcp::serve;
use raft_safety::{
    EStop, LogStore, Node, NodeError, RaftHandle, RedbStore, TcpTransport, WalStore,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::{Config, RaftStore};

/// Directory of the WAL store (`--raft-store wal`) inside `--data-dir`.
pub const WAL_DIR: &str = "raft-wal";
/// File of the redb store (`--raft-store redb`) inside `--data-dir`.
pub const REDB_FILE: &str = "raft.redb";

/// A running member.
pub struct Member {
    /// This member's id.
    pub id: u64,
    /// Proposals, reads, status.
    pub raft: RaftHandle,
    /// The ready loop; ends with the node's fatal error, if any.
    pub driver: JoinHandle<Result<(), NodeError>>,
    listener: Option<JoinHandle<std::io::Result<()>>>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member").field("id", &self.id).field("raft", &self.raft).finish()
    }
}

impl Member {
    /// Opens the store (restoring the state machine and replaying the log), binds the peer
    /// listener and starts the ready loop.
    pub async fn start(config: &Config) -> anyhow::Result<Self> {
        let node_config = config.node_config().map_err(anyhow::Error::msg)?;
        config.check_raft_store().map_err(anyhow::Error::msg)?;
        match config.raft_store {
            RaftStore::Wal => {
                let path = config.common.data_dir.join(WAL_DIR);
                let shown = path.display().to_string();
                Self::start_on(config, node_config, move || WalStore::open(&path), shown).await
            }
            RaftStore::Redb => {
                let path = config.common.data_dir.join(REDB_FILE);
                let shown = path.display().to_string();
                Self::start_on(config, node_config, move || RedbStore::open(&path), shown).await
            }
        }
    }

    async fn start_on<S: LogStore + Send + 'static>(
        config: &Config,
        node_config: raft_safety::NodeConfig,
        open: impl FnOnce() -> Result<S, raft_safety::StoreError> + Send + 'static,
        what: String,
    ) -> anyhow::Result<Self> {
        let id = node_config.id;
        let node = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let store = open().with_context(|| format!("cannot open the raft store {what}"))?;
            Node::new(node_config, store, EStop::new()).context("cannot start the raft member")
        })
        .await??;
        let status = node.status();
        tracing::info!(
            member = id,
            term = status.term,
            commit = status.commit,
            applied = status.applied,
            members = ?status.members(),
            "raft store opened"
        );
        let listen = config.peers.0[&id];
        let (inbound_tx, inbound_rx) = raft_safety::inbound_channel();
        let listener = match TcpListener::bind(listen).await {
            Ok(listener) => Some(tokio::spawn(serve(listener, inbound_tx))),
            // A group of one needs no peer port (a laptop with the default port taken).
            Err(error) if config.peers.0.len() == 1 => {
                tracing::warn!(%listen, %error, "cannot listen for peers; running alone");
                None
            }
            Err(error) => {
                return Err(anyhow::anyhow!("cannot listen for raft peers on {listen}: {error}"));
            }
        };
        let peers = config.peers.0.iter().filter(|(p, _)| **p != id).map(|(p, a)| (*p, *a));
        let transport = TcpTransport::new(peers);
        let (raft, driver) = raft_safety::spawn(node, transport, inbound_rx);
        Ok(Self { id, raft, driver, listener })
    }

    /// Stops the ready loop (waiting up to `timeout`) and the listener.
    pub async fn stop(mut self, timeout: Duration) {
        self.raft.shutdown().await;
        if tokio::time::timeout(timeout, &mut self.driver).await.is_err() {
            tracing::warn!(member = self.id, "raft member did not stop in time");
            self.driver.abort();
        }
        if let Some(listener) = self.listener.take() {
            listener.abort();
        }
    }
}
