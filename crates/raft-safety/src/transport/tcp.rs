//! [`TcpTransport`]: raft messages over TCP, one outbound connection per peer.
//!
//! Wire format: each frame is a 4-byte big-endian length followed by that many bytes of one
//! raft `Message` in raft-rs's protobuf encoding. A connection only ever carries frames from
//! the dialling node to the listening node; replies travel on the listener's own outbound
//! connection. Each peer has a bounded queue drained by its own task, which connects, writes,
//! and on any error reconnects with exponential backoff; a full queue drops the message.
//!
//! While a connection is open and idle, [`Transport::send`] writes the frame to the socket
//! itself, on the caller's thread, without waiting (a write that would block hands the rest
//! to the peer task): a leader's appends are on the wire before its own fdatasync starts,
//! and a follower's acknowledgement leaves the moment its write is durable, with no task
//! switch in between (docs/BENCHMARKS.md, safety-quorum). While
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
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadHalf, WriteHalf,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
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

/// Appends one length-prefixed frame to `out`.
pub fn encode_frame(message: &Message, out: &mut Vec<u8>) -> io::Result<()> {
    let bytes = message
        .write_to_bytes()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    if bytes.len() > FRAME_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("frame of {} bytes exceeds {FRAME_BYTES_MAX}", bytes.len()),
        ));
    }
    out.reserve(4 + bytes.len());
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(&bytes);
    Ok(())
}

/// Writes one length-prefixed frame (not flushed).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &Message,
) -> io::Result<()> {
    let mut frame = Vec::new();
    encode_frame(message, &mut frame)?;
    writer.write_all(&frame).await
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
            // One read syscall takes in every frame that has arrived, not two per frame.
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

/// What a peer's task and [`Transport::send`] share.
struct Shared<S> {
    direct: Mutex<Direct<S>>,
    /// Tells the task that `direct` needs it (a half-written frame, a broken connection).
    wake: Notify,
    connected: AtomicBool,
}

/// The connection's write half, lent to senders while the peer task is idle.
struct Direct<S> {
    /// `Some` only while the task is idle with an open connection and nothing queued: then a
    /// sender may write to it directly.
    writer: Option<WriteHalf<S>>,
    /// Bytes of a frame a direct write could not finish, for the task to write first.
    leftover: Vec<u8>,
    /// A direct write could not finish (bytes left over, or a flush that would block): the
    /// task takes the writer back and completes it; meanwhile senders queue.
    handoff: bool,
    /// A direct write failed: the writer was dropped and the task must reconnect.
    broken: bool,
}

impl<S> Shared<S> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Direct<S>> {
        self.direct.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Peer<S> {
    queue: mpsc::Sender<Message>,
    shared: Arc<Shared<S>>,
    task: JoinHandle<()>,
}

/// The TCP [`Transport`]. Create it inside a tokio runtime; dropping it stops its peer tasks.
pub struct TcpTransport<C: Connector = PlainTcp> {
    connector: Arc<C>,
    peers: Arc<Mutex<HashMap<u64, Peer<C::Stream>>>>,
    dropped: Arc<AtomicU64>,
    /// A message went to a peer task's queue since [`Transport::take_queued`] last looked.
    queued: AtomicBool,
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
            queued: AtomicBool::new(false),
        };
        for (id, addr) in peers {
            transport.add_peer(id, addr);
        }
        transport
    }

    /// Starts sending to `id` at `addr` (replacing a previous address).
    pub fn add_peer(&self, id: u64, addr: SocketAddr) {
        let (queue, rx) = mpsc::channel(PEER_QUEUE_MESSAGES_MAX);
        let shared = Arc::new(Shared {
            direct: Mutex::new(Direct {
                writer: None,
                leftover: Vec::new(),
                handoff: false,
                broken: false,
            }),
            wake: Notify::new(),
            connected: AtomicBool::new(false),
        });
        let task = tokio::spawn(peer_loop(
            id,
            addr,
            Arc::clone(&self.connector),
            rx,
            Arc::clone(&self.dropped),
            Arc::clone(&shared),
        ));
        if let Some(old) = self.lock().insert(id, Peer { queue, shared, task }) {
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
        self.lock().get(&id).is_some_and(|peer| peer.shared.connected.load(Ordering::Relaxed))
    }

    /// Messages dropped so far (queue full, no route, or lost with a broken connection).
    pub fn dropped_messages(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Peer<C::Stream>>> {
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
        let peers = self.lock();
        let Some(peer) = peers.get(&message.to) else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut direct = peer.shared.lock();
        if !direct.handoff
            && let Some(writer) = direct.writer.as_mut()
        {
            // The task is idle and its queue empty (it lends the writer only then, and while
            // it is lent nothing is queued), so this frame is next on the wire.
            let mut frame = Vec::new();
            if encode_frame(&message, &mut frame).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            match write_now(writer, &frame) {
                Ok(WriteNow::Done) => {}
                Ok(WriteNow::Partial(written)) => {
                    // The socket is full: the task writes the rest (and what queues after it).
                    direct.leftover = frame.split_off(written);
                    direct.handoff = true;
                    peer.shared.wake.notify_one();
                }
                Ok(WriteNow::Unflushed) => {
                    direct.handoff = true;
                    peer.shared.wake.notify_one();
                }
                Err(_) => {
                    direct.writer = None;
                    direct.broken = true;
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    peer.shared.wake.notify_one();
                }
            }
            return;
        }
        if peer.queue.try_send(message).is_ok() {
            self.queued.store(true, Ordering::Relaxed);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn take_queued(&self) -> bool {
        self.queued.swap(false, Ordering::Relaxed)
    }
}

/// What a [`write_now`] achieved.
enum WriteNow {
    /// Every byte written and flushed.
    Done,
    /// Only this many bytes were taken; the rest would block.
    Partial(usize),
    /// Every byte taken, but the flush would block (a stream with its own buffer, e.g. TLS).
    Unflushed,
}

/// Writes as much of `bytes` as the stream takes now, without waiting, and flushes when all of
/// it was taken.
fn write_now<W: AsyncWrite + Unpin>(writer: &mut W, bytes: &[u8]) -> io::Result<WriteNow> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut written = 0;
    while written < bytes.len() {
        match Pin::new(&mut *writer).poll_write(&mut cx, &bytes[written..]) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => written += n,
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => return Ok(WriteNow::Partial(written)),
        }
    }
    match Pin::new(&mut *writer).poll_flush(&mut cx) {
        Poll::Ready(Ok(())) => Ok(WriteNow::Done),
        Poll::Ready(Err(e)) => Err(e),
        Poll::Pending => Ok(WriteNow::Unflushed),
    }
}

async fn peer_loop<C: Connector>(
    id: u64,
    addr: SocketAddr,
    connector: Arc<C>,
    mut queue: mpsc::Receiver<Message>,
    dropped: Arc<AtomicU64>,
    shared: Arc<Shared<C::Stream>>,
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
        shared.connected.store(true, Ordering::Relaxed);
        let (mut reader, mut writer) = tokio::io::split(stream);
        let mut pending = Vec::new();
        if encode_frame(&first, &mut pending).is_err() {
            dropped.fetch_add(1, Ordering::Relaxed);
            pending.clear();
        }
        let broken = 'connection: loop {
            // Busy: write what is pending and everything queued, in order.
            loop {
                let mut batched = 0;
                while batched < WRITE_BATCH_MESSAGES_MAX {
                    let Ok(message) = queue.try_recv() else { break };
                    batched += 1;
                    if encode_frame(&message, &mut pending).is_err() {
                        dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let write = async {
                    writer.write_all(&pending).await?;
                    writer.flush().await
                };
                match tokio::time::timeout(io_timeout, write).await {
                    Ok(Ok(())) => pending.clear(),
                    Ok(Err(_)) | Err(_) => {
                        dropped.fetch_add(batched.max(1) as u64, Ordering::Relaxed);
                        break 'connection true;
                    }
                }
                // Idle when nothing is queued: lend the writer to senders. Checked under the
                // lock senders take, so nothing can be queued behind a lent writer.
                let mut direct = shared.lock();
                if queue.is_empty() {
                    direct.writer = Some(writer);
                    direct.handoff = false;
                    break;
                }
            }
            // Idle: senders write directly; wake for a handoff, a queued message (a sender
            // that found the writer handed back), or the peer closing the connection.
            let woken = tokio::select! {
                () = shared.wake.notified() => None,
                message = queue.recv() => match message {
                    Some(message) => Some(message),
                    None => return,
                },
                () = closed_by_peer(&mut reader) => {
                    tracing::debug!(peer = id, %addr, "raft peer closed the connection");
                    shared.lock().writer = None;
                    break 'connection false;
                }
            };
            let mut direct = shared.lock();
            if direct.broken {
                direct.broken = false;
                break 'connection true;
            }
            let Some(lent) = direct.writer.take() else {
                break 'connection true;
            };
            writer = lent;
            pending.append(&mut direct.leftover);
            direct.handoff = false;
            drop(direct);
            if let Some(message) = woken
                && encode_frame(&message, &mut pending).is_err()
            {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
        };
        if broken {
            tracing::debug!(peer = id, %addr, "raft peer connection broken; reconnecting");
        }
        {
            let mut direct = shared.lock();
            direct.writer = None;
            direct.leftover.clear();
            direct.handoff = false;
            direct.broken = false;
        }
        shared.connected.store(false, Ordering::Relaxed);
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_socket_hands_the_rest_to_the_peer_task_in_order() {
        // A peer that does not read until every message was sent: direct writes fill the
        // socket, one is left half-written for the task, later ones queue, the rest drop.
        // Whatever arrives must be whole frames, in the order sent, each at most once.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (start_reading, go) = tokio::sync::oneshot::channel::<()>();
        let reader = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            go.await.unwrap();
            let mut stream = BufReader::new(stream);
            let mut indexes = Vec::new();
            while let Ok(Some(message)) = read_frame(&mut stream).await {
                indexes.push(message.index);
            }
            indexes
        });
        let transport = TcpTransport::new([(2, addr)]);
        let payload = vec![7u8; 4096];
        let sends = 4_000u64;
        transport.send(Message { to: 2, index: 0, ..Message::default() });
        wait_connected(&transport, true).await;
        for index in 1..sends {
            transport.send(Message {
                to: 2,
                index,
                context: payload.clone(),
                ..Message::default()
            });
        }
        start_reading.send(()).unwrap();
        // Everything not dropped arrives: wait for it, then close so the reader ends.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let expected = loop {
            let expected = sends - transport.dropped_messages();
            let idle = {
                let peers = transport.lock();
                let peer = &peers[&2];
                peer.shared.lock().writer.is_some()
                    && peer.queue.capacity() == PEER_QUEUE_MESSAGES_MAX
            };
            if idle {
                break expected;
            }
            assert!(tokio::time::Instant::now() < deadline, "the peer task never caught up");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        drop(transport);
        let indexes = tokio::time::timeout(Duration::from_secs(20), reader).await.unwrap().unwrap();
        assert!(indexes.windows(2).all(|w| w[0] < w[1]), "frames out of order or repeated");
        assert_eq!(indexes.len() as u64, expected, "a frame was lost without being counted");
        assert!(expected > 1_000, "only {expected} of {sends} delivered");
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
