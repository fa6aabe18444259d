//! The partitioning proxy: forwards, cuts (live and new connections), restores, delays.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use testkit::Proxy;

/// An echo server; returns its address.
async fn echo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn round_trip(conn: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    conn.write_all(msg).await?;
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(2), conn.read_exact(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("timed out"))??;
    Ok(buf)
}

#[tokio::test]
async fn proxy_forwards_cuts_restores_and_delays() {
    let target = echo_server().await;
    let proxy = Proxy::start(target).await.unwrap();

    let mut live = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut live, b"hello").await.unwrap(), b"hello");

    proxy.cut();
    assert!(round_trip(&mut live, b"lost").await.is_err(), "a live connection survived the cut");
    let mut during = TcpStream::connect(proxy.addr()).await.unwrap();
    assert!(round_trip(&mut during, b"nope").await.is_err(), "a new connection passed the cut");

    proxy.restore();
    let mut after = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(round_trip(&mut after, b"back").await.unwrap(), b"back");

    proxy.set_delay(Duration::from_millis(100));
    let started = Instant::now();
    assert_eq!(round_trip(&mut after, b"slow").await.unwrap(), b"slow");
    assert!(started.elapsed() >= Duration::from_millis(200), "both directions are delayed");
}
