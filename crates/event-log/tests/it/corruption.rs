//! Tampering: every single-byte change to a stored event is found by `verify` at its position.

use std::sync::Arc;

use event_log::EventLog;
use event_log::record::encoded_len;
use event_log::sim::{SimRng, SimVfs};

use crate::support::{request, seed, small_options};

/// Random single-byte changes checked per run (the issue asks for at least 1,000).
const TAMPER_CASES: usize = 1_200;
/// Of those, cases done on a closed log that is then reopened.
const TAMPER_REOPEN_CASES: usize = 40;
const EVENTS: u64 = 150;

#[test]
fn every_single_byte_change_is_found_at_its_position() {
    let guard = seed("every_single_byte_change_is_found_at_its_position");
    let mut rng = SimRng::new(guard.seed);
    let vfs = SimVfs::new();
    let options = small_options();
    let log = EventLog::open_with_vfs(Arc::new(vfs.clone()), "/log", options.clone()).unwrap();
    for n in 1..=EVENTS {
        let len = rng.below(400) as usize;
        log.append(request(&format!("arm-{}", n % 4), n, len)).unwrap();
    }
    log.checkpoint().unwrap();
    let events = log.read_range(1, EVENTS as usize).unwrap();
    let spans: Vec<_> = events
        .iter()
        .map(|e| {
            let (path, offset) = log.locate(e.position).unwrap();
            (path, offset, encoded_len(e) as u64)
        })
        .collect();
    assert_eq!(log.verify().unwrap().first_bad, None);

    let mut log = Some(log);
    for case in 0..TAMPER_CASES {
        let p = 1 + rng.below(EVENTS);
        let (path, offset, len) = &spans[(p - 1) as usize];
        let at = offset + rng.below(*len);
        let mask = 1 + rng.below(255) as u8;
        let reopen = case < TAMPER_REOPEN_CASES;
        if reopen {
            drop(log.take());
        }
        vfs.corrupt_byte(path, at, mask).unwrap();
        if reopen {
            log = Some(
                EventLog::open_with_vfs(Arc::new(vfs.clone()), "/log", options.clone()).unwrap(),
            );
        }
        let report = log.as_ref().unwrap().verify().unwrap();
        let (bad, reason) = report.first_bad.clone().unwrap_or_else(|| {
            panic!(
                "case {case}: change at {}+{} of position {p} not detected",
                path.display(),
                at - offset
            )
        });
        assert_eq!(bad, p, "case {case}: found at {bad} ({reason}), changed {p}");
        assert_eq!(report.last_position, p - 1);
        vfs.corrupt_byte(path, at, mask).unwrap();
    }
    assert_eq!(log.unwrap().verify().unwrap().first_bad, None);
}
