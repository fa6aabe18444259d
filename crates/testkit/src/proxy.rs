//! A loopback TCP proxy for one link: cut it (drop live connections, refuse new ones),
//! restore it, or delay every chunk it forwards. Partitions processes in tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Bytes read per forwarding step.
const CHUNK_BYTES: usize = 16 * 1024;

#[derive(Debug)]
struct Link {
    cut: AtomicBool,
    delay_ms: AtomicU64,
    /// Bumped on every cut; live connections close when it changes.
    epoch: watch::Sender<u64>,
}

/// A running proxy; stops (and closes every connection) on drop.
#[derive(Debug)]
pub struct Proxy {
    listen: SocketAddr,
    link: Arc<Link>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        Self::start_on(crate::free_port(), target).await
    }

    /// As [`Proxy::start`], on a given listen port.
    pub async fn start_on(port: u16, target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let listen = listener.local_addr()?;
        let (epoch, _) = watch::channel(0);
        let link =
            Arc::new(Link { cut: AtomicBool::new(false), delay_ms: AtomicU64::new(0), epoch });
        let accept_link = link.clone();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if accept_link.cut.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                tokio::spawn(forward(inbound, target, accept_link.clone()));
            }
        });
        Ok(Self { listen, link, accept })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    /// The listen port.
    pub fn port(&self) -> u16 {
        self.listen.port()
    }

    /// Cuts the link: live connections are closed and new ones refused until restored.
    pub fn cut(&self) {
        self.link.cut.store(true, Ordering::SeqCst);
        self.link.epoch.send_modify(|e| *e += 1);
    }

    /// Restores a cut link.
    pub fn restore(&self) {
        self.link.cut.store(false, Ordering::SeqCst);
    }

    /// Delays every forwarded chunk by `delay` (zero to stop delaying).
    pub fn set_delay(&self, delay: Duration) {
        self.link.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn forward(inbound: TcpStream, target: SocketAddr, link: Arc<Link>) {
    let Ok(outbound) = TcpStream::connect(target).await else { return };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let mut epoch = link.epoch.subscribe();
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    tokio::select! {
        _ = pump(in_read, out_write, &link) => {}
        _ = pump(out_read, in_write, &link) => {}
        _ = epoch.changed() => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: &Link,
) {
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let delay_ms = link.delay_ms.load(Ordering::SeqCst);
        if delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        }
        if link.cut.load(Ordering::SeqCst) || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
