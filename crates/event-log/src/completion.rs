//! A one-shot completion: the writer fills it, the caller blocks on it or awaits it. A completer
//! dropped unfilled (the writer stopped) resolves to [`Error::Closed`].

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use crate::error::{Error, Result};

#[derive(Debug)]
struct Slot<T> {
    value: Option<Result<T>>,
    waker: Option<Waker>,
    taken: bool,
    /// A thread is blocked in `wait` (saves the wake-up syscall when nobody is).
    waiting: bool,
}

#[derive(Debug)]
struct Shared<T> {
    slot: Mutex<Slot<T>>,
    ready: Condvar,
}

impl<T> Shared<T> {
    fn fill(&self, value: Result<T>) {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.value = Some(value);
        let waker = slot.waker.take();
        let waiting = slot.waiting;
        drop(slot);
        if waiting {
            self.ready.notify_all();
        }
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// The writer's half.
#[derive(Debug)]
pub(crate) struct Completer<T> {
    shared: Option<Arc<Shared<T>>>,
}

/// The caller's half of an operation in flight: a future (no runtime needed), or
/// [`Pending::wait`] to block the thread.
#[derive(Debug)]
#[must_use = "the result says whether the operation is durable"]
pub struct Pending<T> {
    shared: Arc<Shared<T>>,
}

pub(crate) fn pair<T>() -> (Completer<T>, Pending<T>) {
    let shared = Arc::new(Shared {
        slot: Mutex::new(Slot { value: None, waker: None, taken: false, waiting: false }),
        ready: Condvar::new(),
    });
    (Completer { shared: Some(shared.clone()) }, Pending { shared })
}

/// A pending completion that is already done.
pub(crate) fn ready<T>(value: Result<T>) -> Pending<T> {
    let (completer, pending) = pair();
    completer.complete(value);
    pending
}

impl<T> Completer<T> {
    pub(crate) fn complete(mut self, value: Result<T>) {
        if let Some(shared) = self.shared.take() {
            shared.fill(value);
        }
    }
}

impl<T> Drop for Completer<T> {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            shared.fill(Err(Error::Closed));
        }
    }
}

impl<T> Pending<T> {
    /// Blocks the calling thread until the result is there.
    pub fn wait(self) -> Result<T> {
        let mut slot = self.shared.slot.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(value) = slot.value.take() {
                slot.taken = true;
                return value;
            }
            slot.waiting = true;
            slot = self.shared.ready.wait(slot).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Blocks until the result is there or `deadline` passes (then gives `self` back).
    pub fn wait_until(self, deadline: Instant) -> std::result::Result<Result<T>, Self> {
        let mut slot = self.shared.slot.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(value) = slot.value.take() {
                slot.taken = true;
                return Ok(value);
            }
            let now = Instant::now();
            if now >= deadline {
                drop(slot);
                return Err(self);
            }
            slot.waiting = true;
            slot = self
                .shared
                .ready
                .wait_timeout(slot, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl<T> Future for Pending<T> {
    type Output = Result<T>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let mut slot = self.shared.slot.lock().unwrap_or_else(|e| e.into_inner());
        match slot.value.take() {
            Some(value) => {
                slot.taken = true;
                Poll::Ready(value)
            }
            None => {
                assert!(!slot.taken, "Pending polled after completion");
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn wait_gets_value_from_another_thread() {
        let (c, p) = pair::<u32>();
        let t = std::thread::spawn(move || c.complete(Ok(5)));
        assert_eq!(p.wait().unwrap(), 5);
        t.join().unwrap();
    }

    #[test]
    fn wait_until_times_out_then_succeeds() {
        let (c, p) = pair::<u32>();
        let p = p.wait_until(Instant::now() + Duration::from_millis(1)).unwrap_err();
        c.complete(Ok(1));
        let got = p.wait_until(Instant::now() + Duration::from_secs(5)).ok().unwrap();
        assert_eq!(got.unwrap(), 1);
    }

    #[test]
    fn dropped_completer_means_closed() {
        let (c, p) = pair::<u32>();
        drop(c);
        assert!(matches!(p.wait(), Err(Error::Closed)));
    }
}
