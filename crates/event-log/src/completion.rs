//! A one-shot completion: the writer fills it, the caller blocks on it or awaits it. A completer
//! dropped unfilled (the writer stopped) resolves to [`Error::Closed`].
//!
//! Completions made with a [`Notifier`] share one wake-up: the writer fills a whole group of
//! them quietly, then wakes every thread blocked on any of them with one broadcast (one futex
//! wake per group commit instead of one per waiter).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use crate::error::{Error, Result};

/// One wake-up shared by many completions (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Notifier {
    /// Held by a waiter from checking its slot until it sleeps, and by the notifier before it
    /// wakes: a fill between a waiter's check and its sleep cannot go unseen.
    lock: Mutex<()>,
    changed: Condvar,
}

impl Notifier {
    /// Wakes every thread blocked on a completion of this notifier (they re-check their slots).
    pub(crate) fn notify_all(&self) {
        drop(self.lock.lock().unwrap_or_else(|e| e.into_inner()));
        self.changed.notify_all();
    }
}

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
    /// Wakes a thread blocked in `wait` (when there is no notifier).
    ready: Condvar,
    notifier: Option<Arc<Notifier>>,
}

/// Whether filling a slot wakes a blocked thread now or leaves it to [`Notifier::notify_all`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    Now,
    Deferred,
}

impl<T> Shared<T> {
    fn fill(&self, value: Result<T>, wake: Wake) {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.value = Some(value);
        let waker = slot.waker.take();
        let waiting = slot.waiting;
        drop(slot);
        if waiting {
            match &self.notifier {
                None => self.ready.notify_all(),
                Some(notifier) if wake == Wake::Now => notifier.notify_all(),
                Some(_) => {}
            }
        }
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Takes the value if it is there, else notes that a thread is about to sleep on it.
    fn take_or_note_waiting(&self) -> Option<Result<T>> {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        match slot.value.take() {
            Some(value) => {
                slot.taken = true;
                Some(value)
            }
            None => {
                slot.waiting = true;
                None
            }
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
    make_pair(None)
}

/// A pair whose blocked waiter is woken through `notifier` (see the module docs).
pub(crate) fn pair_with<T>(notifier: &Arc<Notifier>) -> (Completer<T>, Pending<T>) {
    make_pair(Some(notifier.clone()))
}

fn make_pair<T>(notifier: Option<Arc<Notifier>>) -> (Completer<T>, Pending<T>) {
    let shared = Arc::new(Shared {
        slot: Mutex::new(Slot { value: None, waker: None, taken: false, waiting: false }),
        ready: Condvar::new(),
        notifier,
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
    /// Whether a thread noted it sleeps on this completion (tests wait on it instead of
    /// sleeping: with a notifier, one that noted it holds the notifier's lock until it sleeps).
    #[cfg(test)]
    fn has_waiter(&self) -> bool {
        self.shared
            .as_ref()
            .is_some_and(|shared| shared.slot.lock().unwrap_or_else(|e| e.into_inner()).waiting)
    }

    pub(crate) fn complete(mut self, value: Result<T>) {
        if let Some(shared) = self.shared.take() {
            shared.fill(value, Wake::Now);
        }
    }

    /// Fills the slot; a thread blocked on it wakes at its notifier's next
    /// [`Notifier::notify_all`], which the caller must make (a future's waker is woken now).
    pub(crate) fn complete_deferred(mut self, value: Result<T>) {
        if let Some(shared) = self.shared.take() {
            shared.fill(value, Wake::Deferred);
        }
    }
}

impl<T> Drop for Completer<T> {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            shared.fill(Err(Error::Closed), Wake::Now);
        }
    }
}

impl<T> Pending<T> {
    /// Blocks the calling thread until the result is there.
    pub fn wait(self) -> Result<T> {
        loop {
            if let Some(value) = self.wait_inner(None) {
                return value;
            }
        }
    }

    /// Blocks until the result is there or `deadline` passes (then gives `self` back).
    pub fn wait_until(self, deadline: Instant) -> std::result::Result<Result<T>, Self> {
        self.wait_inner(Some(deadline)).ok_or(self)
    }

    /// Blocks until the result is there (`Some`) or `deadline` passes (`None`).
    fn wait_inner(&self, deadline: Option<Instant>) -> Option<Result<T>> {
        let timeout = || deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if let Some(notifier) = &self.shared.notifier {
            let mut guard = notifier.lock.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(value) = self.shared.take_or_note_waiting() {
                    return Some(value);
                }
                guard = match timeout() {
                    None => notifier.changed.wait(guard).unwrap_or_else(|e| e.into_inner()),
                    Some(left) if left.is_zero() => return None,
                    Some(left) => {
                        notifier
                            .changed
                            .wait_timeout(guard, left)
                            .unwrap_or_else(|e| e.into_inner())
                            .0
                    }
                };
            }
        }
        let mut slot = self.shared.slot.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(value) = slot.value.take() {
                slot.taken = true;
                return Some(value);
            }
            slot.waiting = true;
            slot = match timeout() {
                None => self.shared.ready.wait(slot).unwrap_or_else(|e| e.into_inner()),
                Some(left) if left.is_zero() => return None,
                Some(left) => {
                    self.shared.ready.wait_timeout(slot, left).unwrap_or_else(|e| e.into_inner()).0
                }
            };
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

    /// Waits (with a deadline) until a thread sleeps, or is about to, on every completion.
    fn wait_for_waiters<T>(completers: &[Completer<T>]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !completers.iter().all(Completer::has_waiter) {
            assert!(Instant::now() < deadline, "the waiters never blocked");
            std::thread::yield_now();
        }
    }

    #[test]
    fn one_notify_wakes_every_deferred_waiter() {
        let notifier = Arc::new(Notifier::default());
        let (completers, waiters): (Vec<_>, Vec<_>) = (0..8u32)
            .map(|i| {
                let (c, p) = pair_with::<u32>(&notifier);
                (c, std::thread::spawn(move || p.wait().unwrap() + i))
            })
            .unzip();
        wait_for_waiters(&completers);
        for c in completers {
            c.complete_deferred(Ok(100));
        }
        notifier.notify_all();
        let got: Vec<u32> = waiters.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(got, (100..108).collect::<Vec<_>>());
    }

    #[test]
    fn notified_wait_until_times_out_and_a_dropped_completer_wakes_it() {
        let notifier = Arc::new(Notifier::default());
        let (c, p) = pair_with::<u32>(&notifier);
        let p = p.wait_until(Instant::now() + Duration::from_millis(1)).unwrap_err();
        let t = std::thread::spawn(move || p.wait());
        // The timed-out wait above already noted a waiter, so this may not wait for the
        // thread to sleep; the dropped completer is seen either way.
        wait_for_waiters(std::slice::from_ref(&c));
        drop(c);
        assert!(matches!(t.join().unwrap(), Err(Error::Closed)));
    }

    #[test]
    fn dropped_completer_means_closed() {
        let (c, p) = pair::<u32>();
        drop(c);
        assert!(matches!(p.wait(), Err(Error::Closed)));
    }
}
