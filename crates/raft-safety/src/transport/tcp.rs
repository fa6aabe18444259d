//! [`TcpTransport`]: raft messages over TCP, one outbound connection per peer.
//!
//! Wire format: each frame is a 4-byte big-endian length followed by that many bytes of one
//! raft `Message` in raft-rs's protobuf encoding. A connection only ever carries frames from
//! the dialling node to the listening node; replies travel on the listener's own outbound
//! connection. Each peer has a bounded queue drained by its own task, which connects, writes,
//! and on any error reconnects with exponential backoff; a full queue drops the message. While
//! idle the task watches its socket: a peer that closed the connection (it crashed or
//! restarted) is noticed at once, so the next message is written to a fresh connection and not
//! lost in the dead one. That matters for raft, where a follower may send nothing to another
//! follower for a long time and then, when the leader dies, one pre-vote that must arrive. TLS
//! plugs in through [`Connector`] and [`Acceptor`], which only need to produce a stream.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protobuf::Message as _;
use raft::prelude::Message;
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, ReadHalf,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::Transport;

/// Largest accepted frame (a snapshot of the state machine must fit).
pub const FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Messages queued per peer before new ones are dropped.
pub const PEER_QUEUE_MESSAGES_MAX: usize = 1_024;
/// First reconnect delay.
pub const RECONNECT_BACKOFF_MS_MIN: u64 = 10;
/// Longest reconnect delay.
pub const RECONNECT_BACKOFF_MS_MAX: u64 = 1_000;
/// Bound on connecting or writing one batch before the connection is given up.
pub const IO_TIMEOUT_MS: u64 = 1_000;
/// Messages written before one flush.
pub const WRITE_BATCH_MESSAGES_MAX: usize = 256;
/// Read buffer of an accepted connection.
pub const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Opens the stream to a peer (plain TCP, or TLS on top of it).
pub trait Connector: Send + Sync + 'static {
    /// The stream type.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Connects to `addr`.
    fn connect(&self, addr: SocketAddr) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

/// Wraps an accepted TCP connection (identity, or a TLS handshake).
pub trait Acceptor: Send + Sync + 'static {
    /// The stream type.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Turns an accepted connection into a stream.
    fn accept(&self, stream: TcpStream) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

/// Plain TCP with `TCP_NODELAY`.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainTcp;

impl Connector for PlainTcp {
    type Stream = TcpStream;
    async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl Acceptor for PlainTcp {
    type Stream = TcpStream;
    async fn accept(&self, stream: TcpStream) -> io::Result<TcpStream> {
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// Writes one length-prefixed frame (not flushed).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &Message,
) -> io::Result<()> {
    let bytes = message
        .write_to_bytes()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    if bytes.len() > FRAME_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("frame of {} bytes exceeds {FRAME_BYTES_MAX}", bytes.len()),
        ));
    }
    writer.write_u32(bytes.len() as u32).await?;
    writer.write_all(&bytes).await
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> io::Result<Option<Message>> {
    let length = match reader.read_u32().await {
        Ok(length) => length as usize,
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    };
    if length > FRAME_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {length} bytes exceeds {FRAME_BYTES_MAX}"),
        ));
    }
    let mut bytes = vec![0; length];
    reader.read_exact(&mut bytes).await?;
    let mut message = Message::default();
    message
        .merge_from_bytes(&bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    Ok(Some(message))
}

/// Accepts peers on `listener` forever, handing every message received to `inbound` (dropped
/// when `inbound` is full). Abort the task running it to stop listening.
pub async fn serve(listener: TcpListener, inbound: mpsc::Sender<Message>) -> io::Result<()> {
    serve_with(listener, PlainTcp, inbound).await
}

/// [`serve`] with an [`Acceptor`] (e.g. TLS).
pub async fn serve_with<A: Acceptor>(
    listener: TcpListener,
    acceptor: A,
    inbound: mpsc::Sender<Message>,
) -> io::Result<()> {
    let acceptor = Arc::new(acceptor);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = listener.accept().await?;
        let acceptor = Arc::clone(&acceptor);
        let inbound = inbound.clone();
        // Reap finished connection tasks so the set stays bounded by live connections.
        while connections.try_join_next().is_some() {}
        connections.spawn(async move {
            let Ok(stream) = acceptor.accept(stream).await else {
                return;
            };
            // One read takes in every frame that has arrived (a frame unbuffered is a read
            // of its length and a read of its body).
            let mut stream = BufReader::with_capacity(READ_BUFFER_BYTES, stream);
            loop {
                match read_frame(&mut stream).await {
                    Ok(Some(message)) => {
                        if inbound.try_send(message).is_err() && inbound.is_closed() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(error) => {
                        tracing::debug!(%peer, %error, "raft connection closed");
                        return;
                    }
                }
            }
        });
    }
}

struct Peer {
    queue: mpsc::Sender<Message>,
    connected: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

/// The TCP [`Transport`]. Create it inside a tokio runtime; dropping it stops its peer tasks.
pub struct TcpTransport<C: Connector = PlainTcp> {
    connector: Arc<C>,
    peers: Arc<Mutex<HashMap<u64, Peer>>>,
    dropped: Arc<AtomicU64>,
}

impl<C: Connector> std::fmt::Debug for TcpTransport<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport").field("dropped", &self.dropped_messages()).finish()
    }
}

impl TcpTransport<PlainTcp> {
    /// A plain-TCP transport to `peers` (id -> address; this node's own id may be left out).
    pub fn new(peers: impl IntoIterator<Item = (u64, SocketAddr)>) -> Self {
        Self::with_connector(PlainTcp, peers)
    }
}

impl<C: Connector> TcpTransport<C> {
    /// A transport that opens its connections with `connector`.
    pub fn with_connector(
        connector: C,
        peers: impl IntoIterator<Item = (u64, SocketAddr)>,
    ) -> Self {
        let transport = Self {
            connector: Arc::new(connector),
            peers: Arc::new(Mutex::new(HashMap::new())),
            dropped: Arc::new(AtomicU64::new(0)),
        };
        for (id, addr) in peers {
            transport.add_peer(id, addr);
        }
        transport
    }

    /// Starts sending to `id` at `addr` (replacing a previous address).
    pub fn add_peer(&self, id: u64, addr: SocketAddr) {
        let (queue, rx) = mpsc::channel(PEER_QUEUE_MESSAGES_MAX);
        let connected = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(peer_loop(
            id,
            addr,
            Arc::clone(&self.connector),
            rx,
            Arc::clone(&self.dropped),
            Arc::clone(&connected),
        ));
        if let Some(old) = self.lock().insert(id, Peer { queue, connected, task }) {
            old.task.abort();
        }
    }

    /// Stops sending to `id`.
    pub fn remove_peer(&self, id: u64) {
        if let Some(old) = self.lock().remove(&id) {
            old.task.abort();
        }
    }

    /// Whether a connection to `id` is open now (false before the first message to it, and
    /// from the moment the peer closes it until the next message reconnects).
    pub fn is_connected(&self, id: u64) -> bool {
        self.lock().get(&id).is_some_and(|peer| peer.connected.load(Ordering::Relaxed))
    }

    /// Messages dropped so far (queue full, no route, or lost with a broken connection).
    pub fn dropped_messages(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Peer>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<C: Connector> Drop for TcpTransport<C> {
    fn drop(&mut self) {
        for (_, peer) in self.lock().drain() {
            peer.task.abort();
        }
    }
}

impl<C: Connector> Transport for TcpTransport<C> {
    fn send(&self, message: Message) {
        let sent =
            self.lock().get(&message.to).is_some_and(|peer| peer.queue.try_send(message).is_ok());
        if !sent {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn peer_loop<C: Connector>(
    id: u64,
    addr: SocketAddr,
    connector: Arc<C>,
    mut queue: mpsc::Receiver<Message>,
    dropped: Arc<AtomicU64>,
    connected: Arc<AtomicBool>,
) {
    let io_timeout = Duration::from_millis(IO_TIMEOUT_MS);
    let mut backoff_ms = RECONNECT_BACKOFF_MS_MIN;
    // Wait for something to send before dialling.
    let Some(mut first) = queue.recv().await else {
        return;
    };
    loop {
        let stream = match tokio::time::timeout(io_timeout, connector.connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(_)) | Err(_) => {
                tracing::debug!(peer = id, %addr, backoff_ms, "raft peer unreachable");
                tokio::time::sleep(Duration::from_millis(backoff_ms)).await;
                backoff_ms = (backoff_ms * 2).min(RECONNECT_BACKOFF_MS_MAX);
                // What queued up meanwhile is stale: keep only the newest message.
                while let Ok(message) = queue.try_recv() {
                    first = message;
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
        };
        backoff_ms = RECONNECT_BACKOFF_MS_MIN;
        connected.store(true, Ordering::Relaxed);
        let (mut reader, writer) = tokio::io::split(stream);
        let mut writer = BufWriter::new(writer);
        let mut batch = vec![first];
        loop {
            while batch.len() < WRITE_BATCH_MESSAGES_MAX {
                match queue.try_recv() {
                    Ok(message) => batch.push(message),
                    Err(_) => break,
                }
            }
            let write = async {
                for message in &batch {
                    write_frame(&mut writer, message).await?;
                }
                writer.flush().await
            };
            match tokio::time::timeout(io_timeout, write).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    dropped.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    break;
                }
            }
            batch.clear();
            tokio::select! {
                message = queue.recv() => match message {
                    Some(message) => batch.push(message),
                    None => return,
                },
                () = closed_by_peer(&mut reader) => {
                    tracing::debug!(peer = id, %addr, "raft peer closed the connection");
                    break;
                }
            }
        }
        connected.store(false, Ordering::Relaxed);
        // Reconnect once there is something to send.
        first = match queue.recv().await {
            Some(message) => message,
            None => return,
        };
    }
}

/// Resolves when the peer ends or breaks the connection. The listener never writes on it, so
/// anything it reads is discarded.
async fn closed_by_peer<S: AsyncRead>(reader: &mut ReadHalf<S>) {
    let mut discard = [0u8; 64];
    loop {
        match reader.read(&mut discard).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_oversized_lengths_are_refused() {
        let message =
            Message { from: 1, to: 2, term: 7, context: b"ctx".to_vec(), ..Message::default() };
        let mut buffer = Vec::new();
        write_frame(&mut buffer, &message).await.unwrap();
        write_frame(&mut buffer, &message).await.unwrap();
        let mut reader = buffer.as_slice();
        assert_eq!(read_frame(&mut reader).await.unwrap(), Some(message.clone()));
        assert_eq!(read_frame(&mut reader).await.unwrap(), Some(message));
        assert_eq!(read_frame(&mut reader).await.unwrap(), None);
        let huge = ((FRAME_BYTES_MAX + 1) as u32).to_be_bytes();
        assert!(read_frame(&mut huge.as_slice()).await.is_err());
    }

    /// A connector that counts its dials: the seam a TLS connector plugs into.
    #[derive(Default)]
    struct Counting(std::sync::atomic::AtomicU64);

    impl Connector for Arc<Counting> {
        type Stream = TcpStream;
        async fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
            self.0.fetch_add(1, Ordering::Relaxed);
            PlainTcp.connect(addr).await
        }
    }

    /// Sends heartbeats (as raft would keep doing) until one arrives or the deadline passes.
    async fn deliver(
        transport: &TcpTransport<Arc<Counting>>,
        inbound: &mut mpsc::Receiver<Message>,
        term: u64,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            transport.send(Message { to: 2, from: 1, term, ..Message::default() });
            match tokio::time::timeout(Duration::from_millis(20), inbound.recv()).await {
                Ok(Some(message)) if message.term == term => return,
                _ => assert!(tokio::time::Instant::now() < deadline, "term {term} never arrived"),
            }
        }
    }

    #[tokio::test]
    async fn the_transport_reconnects_after_the_peer_restarts() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut inbound) = mpsc::channel(1024);
        let server = tokio::spawn(serve(listener, tx.clone()));
        let connector = Arc::new(Counting::default());
        let transport = TcpTransport::with_connector(Arc::clone(&connector), [(2, addr)]);
        deliver(&transport, &mut inbound, 1).await;
        assert_eq!(connector.0.load(Ordering::Relaxed), 1, "one connection per peer");

        // The peer goes away (listener and connections), then comes back on the same address.
        server.abort();
        let _ = server.await;
        let listener = TcpListener::bind(addr).await.unwrap();
        let server = tokio::spawn(serve(listener, tx));
        deliver(&transport, &mut inbound, 2).await;
        assert!(connector.0.load(Ordering::Relaxed) >= 2, "it dialled again");
        server.abort();
    }

    /// Waits (with a deadline) until `transport`'s connection to peer 2 is `open`.
    async fn wait_connected<C: Connector>(transport: &TcpTransport<C>, open: bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while transport.is_connected(2) != open {
            assert!(tokio::time::Instant::now() < deadline, "connected never became {open}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn one_message_after_a_quiet_peer_restarted_is_not_lost() {
        // Raft's case: a follower sends nothing to another follower for a long time, that
        // follower restarts, and later a single pre-vote must arrive.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut inbound) = mpsc::channel(1024);
        let server = tokio::spawn(serve(listener, tx.clone()));
        let transport = TcpTransport::new([(2, addr)]);
        transport.send(Message { to: 2, from: 1, term: 1, ..Message::default() });
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.recv()).await;
        assert_eq!(first.unwrap().unwrap().term, 1);
        wait_connected(&transport, true).await;

        // The peer dies (its connections close) and comes back on the same address.
        server.abort();
        let _ = server.await;
        wait_connected(&transport, false).await;
        let listener = TcpListener::bind(addr).await.unwrap();
        let server = tokio::spawn(serve(listener, tx));

        // Exactly one message, no retries.
        transport.send(Message { to: 2, from: 1, term: 2, ..Message::default() });
        let second = tokio::time::timeout(Duration::from_secs(10), inbound.recv()).await;
        assert_eq!(second.expect("the single message was lost").unwrap().term, 2);
        server.abort();
    }

    #[tokio::test]
    async fn an_unreachable_peer_drops_messages_instead_of_blocking() {
        // A port nobody listens on: bind, learn the port, close.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let transport = TcpTransport::new([(2, addr)]);
        let sends = 3 * PEER_QUEUE_MESSAGES_MAX;
        let started = std::time::Instant::now();
        for _ in 0..sends {
            transport.send(Message { to: 2, ..Message::default() });
        }
        // Messages to unknown peers are dropped too.
        transport.send(Message { to: 9, ..Message::default() });
        assert!(started.elapsed() < Duration::from_secs(1), "send blocked");
        assert!(transport.dropped_messages() >= (sends - PEER_QUEUE_MESSAGES_MAX) as u64);
    }
}
