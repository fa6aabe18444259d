//! How raft messages leave a node: the [`Transport`] seam, an in-memory [`MemoryTransport`], and
//! the TCP implementation in [`tcp`].

pub mod tcp;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use raft::prelude::Message;
use tokio::sync::mpsc;

/// Sends raft messages to peers. `send` is called from the ready loop: it must never block or
/// wait. A message it cannot queue is dropped (raft retransmits what matters).
pub trait Transport: Send + 'static {
    /// Queues `message` for `message.to`, or drops it.
    fn send(&self, message: Message);
}

/// An in-process transport: each peer is an `mpsc` inbox (tests, single-process clusters).
/// Clones share the peer table and the drop counter.
#[derive(Clone, Default)]
pub struct MemoryTransport {
    peers: Arc<Mutex<HashMap<u64, mpsc::Sender<Message>>>>,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTransport").field("dropped", &self.dropped_messages()).finish()
    }
}

impl MemoryTransport {
    /// A transport with no peers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Routes messages for `id` to `inbox` (replacing any previous route).
    pub fn add_peer(&self, id: u64, inbox: mpsc::Sender<Message>) {
        self.lock().insert(id, inbox);
    }

    /// Stops routing to `id`: messages to it are dropped from now on.
    pub fn remove_peer(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Messages dropped so far (no route, or the inbox was full).
    pub fn dropped_messages(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, mpsc::Sender<Message>>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Transport for MemoryTransport {
    fn send(&self, message: Message) {
        let inbox = self.lock().get(&message.to).cloned();
        let sent = inbox.is_some_and(|inbox| inbox.try_send(message).is_ok());
        if !sent {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}
