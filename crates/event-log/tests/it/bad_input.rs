//! Bad input: typed errors, and nothing written.

use std::sync::Arc;

use event_log::sim::SimVfs;
use event_log::{AppendRequest, Error, EventLog, MAX_KIND_BYTES, MAX_STREAM_NAME_BYTES, Options};

use crate::support::{request, small_options};

#[test]
fn bad_requests_are_typed_errors_and_write_nothing() {
    let vfs = SimVfs::new();
    let options = small_options();
    let log = EventLog::open_with_vfs(Arc::new(vfs.clone()), "/log", options.clone()).unwrap();
    log.append(request("s", 1, 10)).unwrap();
    log.checkpoint().unwrap(); // nothing left for the background index writer to do
    let head = log.head();
    let io_before = vfs.io_counts();

    let too_big = request("s", 2, options.max_payload_bytes + 1);
    assert!(matches!(
        log.append(too_big.clone()),
        Err(Error::EventTooLarge { len_bytes, max_bytes }) if len_bytes == max_bytes + 1
    ));
    assert!(matches!(log.append(request("", 3, 1)), Err(Error::EmptyStreamName)));
    let long = "x".repeat(MAX_STREAM_NAME_BYTES + 1);
    assert!(matches!(
        log.append(request(&long, 4, 1)),
        Err(Error::StreamNameTooLong { len_bytes, .. }) if len_bytes == MAX_STREAM_NAME_BYTES + 1
    ));
    let mut long_kind = request("s", 5, 1);
    long_kind.kind = "k".repeat(MAX_KIND_BYTES + 1);
    assert!(matches!(log.append(long_kind), Err(Error::KindTooLong { .. })));
    assert!(matches!(
        log.append(request("s", 6, 1).expect_version(7)),
        Err(Error::Conflict { .. })
    ));
    assert!(matches!(log.append_batch(vec![]), Err(Error::EmptyBatch)));
    let many: Vec<AppendRequest> =
        (0..options.max_batch_events as u64 + 1).map(|n| request("s", 100 + n, 1)).collect();
    assert!(matches!(log.append_batch(many), Err(Error::BatchTooLarge { .. })));
    let heavy: Vec<AppendRequest> = (0..8u64).map(|n| request("s", 200 + n, 1000)).collect();
    assert!(matches!(log.append_batch(heavy), Err(Error::BatchTooLarge { .. })));
    assert!(matches!(
        log.append_batch(vec![request("s", 300, 1), request("s", 300, 2)]),
        Err(Error::DuplicateInBatch)
    ));
    assert!(matches!(
        log.append_batch(vec![request("s", 301, 1), too_big]),
        Err(Error::EventTooLarge { .. })
    ));
    assert!(matches!(
        log.append_batch(vec![
            request("s", 302, 1).expect_version(1),
            request("s", 303, 1).expect_version(1)
        ]),
        Err(Error::Conflict { .. })
    ));

    assert_eq!(log.head(), head);
    assert_eq!(vfs.io_counts(), io_before, "a rejected request touched the disk");
    assert_eq!(log.verify().unwrap().first_bad, None);
    // The log still works, and the rejected ids are free.
    assert_eq!(log.append(request("s", 2, 1)).unwrap().position, 2);
}

#[test]
fn invalid_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tiny = Options { segment_bytes: 100, ..Options::default() };
    assert!(matches!(EventLog::open(dir.path(), tiny), Err(Error::InvalidOptions(_))));
    let small_segment = Options { segment_bytes: 64 * 1024, ..Options::default() };
    assert!(matches!(EventLog::open(dir.path(), small_segment), Err(Error::InvalidOptions(_))));
}
