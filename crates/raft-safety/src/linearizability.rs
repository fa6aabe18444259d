//! A linearizability checker for the e-stop register (Wing & Gong search with memoisation, as in
//! Knossos / Porcupine), used by the simulation and tested here on known-bad histories.
//!
//! The model: the register holds the id of the engagement in force, or nothing. `Engage(id)`
//! engages when clear and changes nothing when engaged (the first engagement stays in force);
//! `Clear` clears; `Read` returns the engagement in force. An operation with no return
//! (`ret: None`, a write whose outcome the client never learnt) may take effect at any point
//! after its call, or never.

use std::collections::HashSet;
use std::fmt;

/// Bound on search states visited before the checker gives up (answering `Inconclusive`).
pub const SEARCH_STATES_MAX: usize = 2_000_000;

/// What an operation did and, for a read, what it saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// Engage with this request id.
    Engage(u32),
    /// Clear.
    Clear,
    /// A read that returned the engagement in force (`None`: clear).
    Read(Option<u32>),
}

/// One client operation: invoked at `call`, answered at `ret` (logical times, all distinct).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operation {
    /// Which client issued it (for the report only).
    pub client: u32,
    /// Invocation time.
    pub call: u64,
    /// Response time; `None` when the outcome is unknown (only meaningful for writes).
    pub ret: Option<u64>,
    /// The operation.
    pub kind: OpKind,
}

/// The verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Some total order explains every answer.
    Linearizable,
    /// No order explains the answers; `stuck_after` is the longest explained prefix found.
    NotLinearizable {
        /// Operations (by index into the history) of the longest linearized prefix.
        stuck_after: Vec<usize>,
    },
    /// The search hit [`SEARCH_STATES_MAX`].
    Inconclusive,
}

type State = Option<u32>;

fn step(state: State, kind: OpKind) -> Option<State> {
    match kind {
        OpKind::Engage(id) => Some(state.or(Some(id))),
        OpKind::Clear => Some(None),
        OpKind::Read(seen) => (seen == state).then_some(state),
    }
}

/// Checks a history (any order; reads without a return must be left out by the caller).
pub fn check(history: &[Operation]) -> Verdict {
    let n = history.len();
    let words = n.div_ceil(64).max(1);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| history[i].call);
    let completed = history.iter().filter(|op| op.ret.is_some()).count();

    struct Search<'a> {
        history: &'a [Operation],
        order: Vec<usize>,
        seen: HashSet<(Vec<u64>, State)>,
        best: Vec<usize>,
        visited: usize,
    }

    // Depth-first over (linearized set, state) with an explicit stack.
    let mut search = Search { history, order, seen: HashSet::new(), best: Vec::new(), visited: 0 };
    struct Frame {
        done: Vec<u64>,
        state: State,
        completed_done: usize,
        path: Vec<usize>,
    }
    let mut stack =
        vec![Frame { done: vec![0; words], state: None, completed_done: 0, path: Vec::new() }];
    while let Some(frame) = stack.pop() {
        if frame.completed_done == completed {
            return Verdict::Linearizable;
        }
        search.visited += 1;
        if search.visited > SEARCH_STATES_MAX {
            return Verdict::Inconclusive;
        }
        if frame.path.len() > search.best.len() {
            search.best = frame.path.clone();
        }
        let is_done = |i: usize| frame.done[i / 64] & (1 << (i % 64)) != 0;
        // An operation may go next only if no pending operation returned before it was called.
        let horizon = (0..n)
            .filter(|&i| !is_done(i))
            .filter_map(|i| search.history[i].ret)
            .min()
            .unwrap_or(u64::MAX);
        for &i in search.order.iter().rev() {
            let op = search.history[i];
            if is_done(i) || op.call > horizon {
                continue;
            }
            let Some(next) = step(frame.state, op.kind) else {
                continue;
            };
            let mut done = frame.done.clone();
            done[i / 64] |= 1 << (i % 64);
            if !search.seen.insert((done.clone(), next)) {
                continue;
            }
            let mut path = frame.path.clone();
            path.push(i);
            stack.push(Frame {
                done,
                state: next,
                completed_done: frame.completed_done + usize::from(op.ret.is_some()),
                path,
            });
        }
    }
    Verdict::NotLinearizable { stuck_after: search.best }
}

/// Renders a history, one operation a line, by call time (for failure reports).
pub fn render(history: &[Operation]) -> String {
    let mut order: Vec<&Operation> = history.iter().collect();
    order.sort_by_key(|op| op.call);
    let mut out = String::new();
    for op in order {
        out.push_str(&format!("{op}\n"));
    }
    out
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ret = self.ret.map_or("?".to_owned(), |r| r.to_string());
        write!(f, "client {} [{}, {}] {:?}", self.client, self.call, ret, self.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(call: u64, ret: u64, kind: OpKind) -> Operation {
        Operation { client: 0, call, ret: Some(ret), kind }
    }

    fn unknown(call: u64, kind: OpKind) -> Operation {
        Operation { client: 0, call, ret: None, kind }
    }

    fn bad(history: &[Operation]) -> bool {
        matches!(check(history), Verdict::NotLinearizable { .. })
    }

    use OpKind::{Clear, Engage, Read};

    #[test]
    fn sequential_histories() {
        assert_eq!(check(&[]), Verdict::Linearizable);
        let good = [
            op(1, 2, Read(None)),
            op(3, 4, Engage(1)),
            op(5, 6, Read(Some(1))),
            op(7, 8, Engage(2)),
            op(9, 10, Read(Some(1))),
            op(11, 12, Clear),
            op(13, 14, Read(None)),
        ];
        assert_eq!(check(&good), Verdict::Linearizable);
    }

    #[test]
    fn stale_read_after_completed_engage_is_caught() {
        assert!(bad(&[op(1, 2, Engage(1)), op(3, 4, Read(None))]));
    }

    #[test]
    fn read_of_a_value_never_written_is_caught() {
        assert!(bad(&[op(1, 2, Engage(1)), op(3, 4, Read(Some(5)))]));
    }

    #[test]
    fn lost_clear_is_caught() {
        assert!(bad(&[op(1, 2, Engage(1)), op(3, 4, Clear), op(5, 6, Read(Some(1))),]));
    }

    #[test]
    fn second_engagement_does_not_replace_the_first() {
        assert!(bad(&[op(1, 2, Engage(1)), op(3, 4, Engage(2)), op(5, 6, Read(Some(2))),]));
    }

    #[test]
    fn reads_must_not_go_back_in_time() {
        // The engage overlaps both reads, but once a read saw it, a later read must too.
        assert!(bad(&[op(1, 10, Engage(1)), op(2, 3, Read(Some(1))), op(4, 5, Read(None)),]));
        assert_eq!(
            check(&[op(1, 10, Engage(1)), op(2, 3, Read(None)), op(4, 5, Read(Some(1))),]),
            Verdict::Linearizable
        );
    }

    #[test]
    fn concurrent_writes_may_order_either_way() {
        let engage_first = [op(1, 10, Engage(1)), op(2, 9, Clear), op(11, 12, Read(None))];
        let clear_first = [op(1, 10, Engage(1)), op(2, 9, Clear), op(11, 12, Read(Some(1)))];
        assert_eq!(check(&engage_first), Verdict::Linearizable);
        assert_eq!(check(&clear_first), Verdict::Linearizable);
        // Clear strictly before engage: the read must see the engagement.
        assert!(bad(&[op(1, 2, Clear), op(3, 4, Engage(1)), op(5, 6, Read(None)),]));
    }

    #[test]
    fn unknown_outcomes_may_or_may_not_happen_but_only_once() {
        assert_eq!(check(&[unknown(1, Engage(1)), op(2, 3, Read(None))]), Verdict::Linearizable);
        assert_eq!(
            check(&[unknown(1, Engage(1)), op(2, 3, Read(None)), op(4, 5, Read(Some(1))),]),
            Verdict::Linearizable
        );
        // It may happen late, but not before it was called.
        assert!(bad(&[op(1, 2, Read(Some(1))), unknown(3, Engage(1))]));
        // Seen, then gone with no clear: not explainable.
        assert!(bad(&[unknown(1, Engage(1)), op(2, 3, Read(Some(1))), op(4, 5, Read(None)),]));
    }

    /// The definition, by brute force: some subset of the unknown operations plus every
    /// completed one, in some order that respects real time, replays on the model.
    fn linearizable_by_brute_force(history: &[Operation]) -> bool {
        fn permute(
            ops: &[Operation],
            used: &mut Vec<bool>,
            order: &mut Vec<usize>,
            state: Option<u32>,
        ) -> bool {
            if order.len() == ops.len() {
                return true;
            }
            for i in 0..ops.len() {
                if used[i] {
                    continue;
                }
                // Everything that returned before `i` was called must already be placed.
                let respects_time = (0..ops.len())
                    .all(|j| used[j] || j == i || ops[j].ret.is_none_or(|r| r > ops[i].call));
                if !respects_time {
                    continue;
                }
                let Some(next) = step(state, ops[i].kind) else {
                    continue;
                };
                used[i] = true;
                order.push(i);
                if permute(ops, used, order, next) {
                    return true;
                }
                order.pop();
                used[i] = false;
            }
            false
        }
        let unknown: Vec<usize> =
            (0..history.len()).filter(|&i| history[i].ret.is_none()).collect();
        (0..1u32 << unknown.len()).any(|mask| {
            let ops: Vec<Operation> = (0..history.len())
                .filter(|i| {
                    unknown.iter().position(|u| u == i).is_none_or(|bit| mask & (1 << bit) != 0)
                })
                .map(|i| history[i])
                .collect();
            permute(&ops, &mut vec![false; ops.len()], &mut Vec::new(), None)
        })
    }

    #[test]
    fn agrees_with_brute_force_on_random_small_histories() {
        let mut rng = 0x5eed_u64;
        let mut next = |n: u64| crate::node::splitmix64(&mut rng) % n;
        let (mut good, mut bad_count) = (0, 0);
        for _ in 0..3_000 {
            let len = 1 + next(6) as usize;
            let mut times: Vec<u64> = (0..2 * len as u64).collect();
            // Shuffle the time points, then pair them up as (call, ret).
            for i in (1..times.len()).rev() {
                times.swap(i, next(i as u64 + 1) as usize);
            }
            let history: Vec<Operation> = (0..len)
                .map(|i| {
                    let (a, b) = (times[2 * i], times[2 * i + 1]);
                    let kind = match next(3) {
                        0 => Engage(next(3) as u32),
                        1 => Clear,
                        _ => Read(match next(3) {
                            0 => None,
                            v => Some(v as u32),
                        }),
                    };
                    let unknown = !matches!(kind, Read(_)) && next(4) == 0;
                    Operation {
                        client: i as u32,
                        call: a.min(b),
                        ret: (!unknown).then_some(a.max(b)),
                        kind,
                    }
                })
                .collect();
            let expected = linearizable_by_brute_force(&history);
            let verdict = check(&history);
            assert_eq!(
                verdict == Verdict::Linearizable,
                expected,
                "checker and brute force disagree on\n{}",
                render(&history)
            );
            if expected { good += 1 } else { bad_count += 1 }
        }
        assert!(good > 300 && bad_count > 300, "both kinds were generated: {good} / {bad_count}");
    }

    #[test]
    fn larger_history_with_many_clients_checks_quickly() {
        // Four clients, 200 overlapping operations, consistent by construction.
        let mut history = Vec::new();
        let mut engaged: Option<u32> = None;
        for i in 0..200u64 {
            let kind = match i % 5 {
                0 | 3 => {
                    engaged = engaged.or(Some(i as u32));
                    Engage(i as u32)
                }
                2 => {
                    engaged = None;
                    Clear
                }
                _ => Read(engaged),
            };
            // Each operation overlaps its neighbours; its effect sits at time 10*i + 5.
            history.push(Operation {
                client: (i % 4) as u32,
                call: 10 * i,
                ret: Some(10 * i + 12),
                kind,
            });
        }
        assert_eq!(check(&history), Verdict::Linearizable);
        // Break one read in the middle.
        history[101].kind = Read(Some(999));
        assert!(bad(&history));
        assert!(render(&history).contains("Read(Some(999))"));
    }
}
