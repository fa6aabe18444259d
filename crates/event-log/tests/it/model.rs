//! Property test: any sequence of appends, batches, retries, reads, compactions and reopens
//! agrees with a simple in-memory model.

use std::sync::Arc;

use event_log::sim::SimVfs;
use event_log::{AppendRequest, Error, EventLog};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

use crate::support::{id, seed, small_options};

/// Generated sequences per run.
const CASES: u32 = 150;
const STREAMS: [&str; 3] = ["a", "b", "c"];

#[derive(Debug, Clone)]
enum Op {
    Append { stream: usize, len: usize, expect: Option<bool> },
    Batch { streams: Vec<usize>, len: usize },
    Retry { pick: usize },
    Read { from: u64, count: usize },
    ReadStream { stream: usize, from: u64 },
    Compact { keep: u64 },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..3usize, 0..300usize, prop::option::of(any::<bool>()))
            .prop_map(|(stream, len, expect)| Op::Append { stream, len, expect }),
        2 => (prop::collection::vec(0..3usize, 1..5), 0..200usize)
            .prop_map(|(streams, len)| Op::Batch { streams, len }),
        1 => any::<usize>().prop_map(|pick| Op::Retry { pick }),
        2 => (0..80u64, 1..30usize).prop_map(|(from, count)| Op::Read { from, count }),
        2 => (0..3usize, 0..20u64).prop_map(|(stream, from)| Op::ReadStream { stream, from }),
        1 => (0..40u64).prop_map(|keep| Op::Compact { keep }),
        1 => Just(Op::Reopen),
    ]
}

/// The model: events in order (id, stream, payload, version); the compaction floor.
#[derive(Default)]
struct Model {
    events: Vec<([u8; 16], String, Vec<u8>, u64)>,
    first_position: u64,
}

impl Model {
    fn version(&self, stream: &str) -> u64 {
        self.events.iter().filter(|e| e.1 == stream).count() as u64
    }
}

fn run_ops(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let vfs = Arc::new(SimVfs::new());
    let open = || EventLog::open_with_vfs(vfs.clone(), "/log", small_options()).unwrap();
    let mut log = open();
    let mut model = Model { first_position: 1, ..Model::default() };
    let mut next_id = 0u64;
    for op in ops {
        match op {
            Op::Append { stream, len, expect } => {
                let stream = STREAMS[stream];
                next_id += 1;
                let current = model.version(stream);
                let mut request =
                    AppendRequest::new(stream, id(next_id), "k", vec![next_id as u8; len]);
                request.expected_version = expect.map(|ok| if ok { current } else { current + 1 });
                let result = log.append(request.clone());
                if expect == Some(false) {
                    let is_conflict = matches!(result, Err(Error::Conflict { .. }));
                    prop_assert!(is_conflict);
                } else {
                    let a = result.unwrap();
                    model.events.push((
                        request.event_id,
                        stream.into(),
                        request.payload,
                        current + 1,
                    ));
                    prop_assert_eq!(a.position, model.events.len() as u64);
                    prop_assert_eq!(a.stream_version, current + 1);
                }
            }
            Op::Batch { streams, len } => {
                let requests: Vec<AppendRequest> = streams
                    .iter()
                    .map(|&s| {
                        next_id += 1;
                        AppendRequest::new(STREAMS[s], id(next_id), "k", vec![1; len])
                    })
                    .collect();
                let results = log.append_batch(requests.clone()).unwrap();
                for (r, a) in requests.into_iter().zip(results) {
                    let version = model.version(&r.stream) + 1;
                    model.events.push((r.event_id, r.stream, r.payload, version));
                    prop_assert_eq!(
                        (a.position, a.stream_version),
                        (model.events.len() as u64, version)
                    );
                }
            }
            Op::Retry { pick } => {
                if model.events.is_empty() {
                    continue;
                }
                let i = pick % model.events.len();
                if (i as u64 + 1) < model.first_position {
                    continue;
                }
                let (event_id, stream, payload, version) = model.events[i].clone();
                let a = log.append(AppendRequest::new(stream, event_id, "k", payload)).unwrap();
                prop_assert_eq!((a.position, a.stream_version), (i as u64 + 1, version));
            }
            Op::Read { from, count } => match log.read_range(from, count) {
                Err(Error::Compacted { .. }) => prop_assert!(from.max(1) < model.first_position),
                Err(e) => return Err(TestCaseError::fail(e.to_string())),
                Ok(events) => {
                    let from = from.max(1);
                    prop_assert!(from >= model.first_position);
                    let expected: Vec<_> = model
                        .events
                        .iter()
                        .enumerate()
                        .skip(from as usize - 1)
                        .take(count)
                        .collect();
                    prop_assert_eq!(events.len(), expected.len());
                    for (e, (i, m)) in events.iter().zip(expected) {
                        prop_assert_eq!(e.position, i as u64 + 1);
                        prop_assert_eq!(&e.event_id, &m.0);
                        prop_assert_eq!(&e.payload, &m.2);
                        prop_assert_eq!(e.stream_version, m.3);
                    }
                }
            },
            Op::ReadStream { stream, from } => {
                let stream = STREAMS[stream];
                let got: Vec<(u64, u64)> = log
                    .read_stream(stream, from, usize::MAX)
                    .unwrap()
                    .iter()
                    .map(|e| (e.position, e.stream_version))
                    .collect();
                let expected: Vec<(u64, u64)> = model
                    .events
                    .iter()
                    .enumerate()
                    .filter(|(i, e)| {
                        e.1 == stream && e.3 >= from && *i as u64 + 1 >= model.first_position
                    })
                    .map(|(i, e)| (i as u64 + 1, e.3))
                    .collect();
                prop_assert_eq!(got, expected);
            }
            Op::Compact { keep } => {
                let below = (model.events.len() as u64 + 1).saturating_sub(keep);
                let report = log.compact(below).unwrap();
                prop_assert!(report.first_position <= below.max(model.first_position));
                prop_assert!(report.first_position >= model.first_position);
                model.first_position = report.first_position;
            }
            Op::Reopen => {
                drop(log);
                log = open();
            }
        }
        let head = log.head();
        prop_assert_eq!(head.position, model.events.len() as u64);
        prop_assert_eq!(head.first_position, model.first_position);
    }
    prop_assert_eq!(log.verify().unwrap().first_bad, None);
    Ok(())
}

#[test]
fn log_agrees_with_model() {
    let guard = seed("log_agrees_with_model");
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&guard.seed.to_le_bytes());
    let config = Config { cases: CASES, failure_persistence: None, ..Config::default() };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes));
    let result = runner.run(&prop::collection::vec(op(), 1..40), run_ops);
    if let Err(e) = result {
        panic!("{e}");
    }
}
