//! The fail-safe core (DESIGN §2.7), free of I/O and wall clocks: it is fed trips, committed
//! safety states, the arms' own sensor faults and `now`, and says per arm whether it may run.
//!
//! An arm runs only when all hold: a committed safety state was heard, it says "not
//! engaged", its heartbeat is fresher than the deadman timeout, and the arm carries no
//! latched stop. A trip (any arm) or the arm's own sensor fault latches a stop; a latch is
//! released only by a committed clear that is newer than it: a Raft index above the highest
//! index known when the latch was set (a new commit, not a heartbeat repeating an old one),
//! and a publish time after the latch's time.

use std::time::{Duration, Instant};

use wire::json::{SafetyState, SafetyTrip};

/// Whether an arm may move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Running.
    Running,
    /// In safe stop, with the reason.
    SafeStop(String),
}

impl Verdict {
    /// True when stopped.
    pub fn is_stopped(&self) -> bool {
        matches!(self, Verdict::SafeStop(_))
    }
}

/// A stop that only a newer committed clear releases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Latch {
    /// Why (the first cause; later ones only raise the bounds).
    pub reason: String,
    /// Latest time (µs since the epoch) of a cause: a clear must be published after it.
    pub ts_us: u64,
    /// Highest committed index known when a cause arrived: a clear must be above it.
    pub floor_index: u64,
}

/// The committed e-stop state last heard.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Committed {
    engaged: bool,
    reason: String,
    term: u64,
    index: u64,
}

/// What [`SafetyCore::on_state`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateOutcome {
    /// The state was older than one already heard and was ignored.
    pub ignored: bool,
    /// Arms whose latch this clear released.
    pub released: Vec<usize>,
}

/// Safety state of every hosted arm (by index).
#[derive(Debug)]
pub struct SafetyCore {
    deadman: Duration,
    committed: Option<Committed>,
    last_heartbeat: Option<Instant>,
    latches: Vec<Option<Latch>>,
}

impl SafetyCore {
    /// For `arms` arms with the given deadman timeout. Every arm starts stopped: nothing has
    /// been heard yet.
    pub fn new(arms: usize, deadman: Duration) -> Self {
        Self { deadman, committed: None, last_heartbeat: None, latches: vec![None; arms] }
    }

    /// A trip: latches every arm at once (before any commit).
    pub fn on_trip(&mut self, trip: &SafetyTrip) {
        let reason = format!("e-stop trip from {}: {}", trip.source, trip.reason);
        for arm in 0..self.latches.len() {
            self.latch(arm, &reason, trip.ts);
        }
    }

    /// The arm's own check failed: latches it. Returns true when it was not latched before
    /// (the caller then asks the quorum for an e-stop).
    pub fn latch(&mut self, arm: usize, reason: &str, ts_us: u64) -> bool {
        let floor_index = self.committed.as_ref().map_or(0, |c| c.index);
        match &mut self.latches[arm] {
            Some(latch) => {
                latch.ts_us = latch.ts_us.max(ts_us);
                latch.floor_index = latch.floor_index.max(floor_index);
                false
            }
            slot @ None => {
                *slot = Some(Latch { reason: reason.to_owned(), ts_us, floor_index });
                true
            }
        }
    }

    /// A committed state (a change or a heartbeat) heard at `now`.
    pub fn on_state(&mut self, state: &SafetyState, now: Instant) -> StateOutcome {
        if let Some(current) = &self.committed
            && (state.index, state.term) < (current.index, current.term)
        {
            // An older commit (a deposed leader, a late message): not a heartbeat either.
            return StateOutcome { ignored: true, released: Vec::new() };
        }
        self.committed = Some(Committed {
            engaged: state.engaged,
            reason: state.reason.clone(),
            term: state.term,
            index: state.index,
        });
        self.last_heartbeat = Some(now);
        let mut released = Vec::new();
        if !state.engaged {
            for (arm, slot) in self.latches.iter_mut().enumerate() {
                if slot.as_ref().is_some_and(|l| state.index > l.floor_index && state.ts > l.ts_us)
                {
                    *slot = None;
                    released.push(arm);
                }
            }
        }
        StateOutcome { ignored: false, released }
    }

    /// Whether `arm` may run at `now`.
    pub fn verdict(&self, arm: usize, now: Instant) -> Verdict {
        if let Some(latch) = &self.latches[arm] {
            return Verdict::SafeStop(latch.reason.clone());
        }
        let Some(committed) = &self.committed else {
            return Verdict::SafeStop("no safety state heard yet".into());
        };
        if committed.engaged {
            return Verdict::SafeStop(format!("e-stop engaged: {}", committed.reason));
        }
        match self.last_heartbeat {
            Some(at) if now.saturating_duration_since(at) <= self.deadman => Verdict::Running,
            _ => Verdict::SafeStop(format!(
                "no safety heartbeat for more than {} ms",
                self.deadman.as_millis()
            )),
        }
    }

    /// The safety link as a whole at `now` (latches aside): `ok`, `no_state`, `engaged` or
    /// `no_heartbeat`; shown on `/readyz` as the degrading `safety` component.
    pub fn summary(&self, now: Instant) -> &'static str {
        match &self.committed {
            None => "no_state",
            Some(c) if c.engaged => "engaged",
            Some(_)
                if self
                    .last_heartbeat
                    .is_none_or(|at| now.saturating_duration_since(at) > self.deadman) =>
            {
                "no_heartbeat"
            }
            Some(_) => "ok",
        }
    }

    /// The latch of `arm`, if any.
    pub fn latch_of(&self, arm: usize) -> Option<&Latch> {
        self.latches[arm].as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(engaged: bool, index: u64, ts: u64) -> SafetyState {
        SafetyState { engaged, reason: "r".into(), term: 1, index, leader: 1, ts }
    }

    fn trip(ts: u64) -> SafetyTrip {
        SafetyTrip { request_id: "q".into(), reason: "button".into(), source: "hmi".into(), ts }
    }

    #[test]
    fn starts_stopped_and_runs_on_a_fresh_clear() {
        let t0 = Instant::now();
        let mut core = SafetyCore::new(2, Duration::from_millis(50));
        assert!(core.verdict(0, t0).is_stopped());
        core.on_state(&state(false, 1, 100), t0);
        assert_eq!(core.verdict(0, t0 + Duration::from_millis(50)), Verdict::Running);
        assert!(core.verdict(1, t0 + Duration::from_millis(51)).is_stopped(), "deadman");
        core.on_state(&state(false, 1, 200), t0 + Duration::from_millis(60));
        assert_eq!(core.verdict(1, t0 + Duration::from_millis(61)), Verdict::Running);
    }

    #[test]
    fn a_trip_holds_until_a_newer_committed_clear() {
        let t0 = Instant::now();
        let mut core = SafetyCore::new(2, Duration::from_secs(1));
        core.on_state(&state(false, 5, 100), t0);
        core.on_trip(&trip(150));
        assert!(core.verdict(0, t0).is_stopped());
        // Heartbeats repeating the old clear (index 5) do not release it, however fresh.
        assert!(core.on_state(&state(false, 5, 300), t0).released.is_empty());
        assert!(core.verdict(1, t0).is_stopped());
        // The engage commits, then a clear commits.
        core.on_state(&state(true, 6, 310), t0);
        assert!(core.verdict(0, t0).is_stopped());
        assert_eq!(core.on_state(&state(false, 7, 320), t0).released, vec![0, 1]);
        assert_eq!(core.verdict(0, t0), Verdict::Running);
    }

    #[test]
    fn a_clear_published_before_the_trip_does_not_release_it() {
        let t0 = Instant::now();
        let mut core = SafetyCore::new(1, Duration::from_secs(1));
        core.on_trip(&trip(1_000));
        assert!(core.on_state(&state(false, 3, 999), t0).released.is_empty());
        assert!(core.verdict(0, t0).is_stopped());
        assert_eq!(core.on_state(&state(false, 4, 1_001), t0).released, vec![0]);
    }

    #[test]
    fn older_states_are_ignored_and_are_no_heartbeat() {
        let t0 = Instant::now();
        let mut core = SafetyCore::new(1, Duration::from_millis(10));
        core.on_state(&state(true, 9, 100), t0);
        let late = t0 + Duration::from_millis(20);
        assert!(core.on_state(&state(false, 8, 200), late).ignored);
        assert!(core.verdict(0, late).is_stopped());
    }

    #[test]
    fn an_arm_latch_is_per_arm_and_reported_once() {
        let t0 = Instant::now();
        let mut core = SafetyCore::new(2, Duration::from_secs(1));
        core.on_state(&state(false, 1, 10), t0);
        assert!(core.latch(1, "joint 2 beyond limit", 20));
        assert!(!core.latch(1, "again", 30));
        assert_eq!(core.verdict(0, t0), Verdict::Running);
        assert_eq!(core.verdict(1, t0), Verdict::SafeStop("joint 2 beyond limit".into()));
        assert_eq!(core.latch_of(1).unwrap().ts_us, 30);
    }
}
