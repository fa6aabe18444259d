//! Shared helpers: seeds (printed on failure, `KEEL_SEED` replays), small options, a tiny
//! executor for the async API.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;

use event_log::{AppendRequest, Options};

/// The seed for a test: `KEEL_SEED` if set, else from the clock. Printed if the test fails.
pub fn seed(test: &'static str) -> SeedGuard {
    let seed = std::env::var("KEEL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
            as u64
    });
    SeedGuard { test, seed }
}

pub struct SeedGuard {
    test: &'static str,
    pub seed: u64,
}

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "{} failed with seed {}; replay with KEEL_SEED={}",
                self.test, self.seed, self.seed
            );
        }
    }
}

/// Small segments and limits so tests roll segments and hit limits quickly.
pub fn small_options() -> Options {
    Options {
        segment_bytes: 8 * 1024,
        max_payload_bytes: 1024,
        max_batch_events: 16,
        max_batch_bytes: 6 * 1024,
        index_flush_events: 16,
        checkpoint_events: 64,
        background_preallocation: false,
        ..Options::default()
    }
}

pub fn id(n: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[8..].copy_from_slice(&n.to_be_bytes());
    id
}

pub fn request(stream: &str, n: u64, payload_len: usize) -> AppendRequest {
    AppendRequest::new(stream, id(n), "test", vec![(n % 251) as u8; payload_len])
}

struct ThreadWaker(Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs a future to completion on this thread.
pub fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let waker = Waker::from(Arc::new(ThreadWaker(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(value) => return value,
            Poll::Pending => std::thread::park(),
        }
    }
}

/// Waits until `condition` holds, checking every few milliseconds; panics naming `what` if it
/// does not within `timeout` (no sleep-and-hope: the deadline is the only fixed time).
pub fn wait_for(what: &str, timeout: std::time::Duration, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !condition() {
        assert!(std::time::Instant::now() < deadline, "timed out after {timeout:?}: {what}");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}
