//! Shared helpers: a test state, seeds (printed on failure, `KEEL_SEED` replays), requests.

use std::collections::BTreeMap;

use event_log::{AppendRequest, Event, Options};
use serde::{Deserialize, Serialize};
use snapshotter::Recover;

/// A state folded from events; notices gaps or repeats in what it is fed.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fold {
    pub events: u64,
    pub last_position: u64,
    pub digest: u64,
    pub per_stream: BTreeMap<String, u64>,
    pub out_of_order: bool,
}

impl Recover for Fold {
    fn apply(&mut self, event: &Event) {
        if event.position != self.last_position + 1 {
            self.out_of_order = true;
        }
        self.events += 1;
        self.last_position = event.position;
        let mut d = self.digest ^ event.position.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for &b in &event.payload {
            d = (d ^ u64::from(b)).wrapping_mul(0x100_0000_01B3);
        }
        self.digest = d;
        *self.per_stream.entry(event.stream.clone()).or_default() += 1;
    }
}

pub fn fold(events: &[Event]) -> Fold {
    let mut state = Fold::default();
    events.iter().for_each(|e| state.apply(e));
    state
}

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

pub fn request(n: u64, payload_len: usize) -> AppendRequest {
    let mut id = [0u8; 16];
    id[8..].copy_from_slice(&n.to_be_bytes());
    AppendRequest::new(format!("arm-{}", n % 3), id, "test", vec![(n * 7 % 251) as u8; payload_len])
}

pub fn small_log_options() -> Options {
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
