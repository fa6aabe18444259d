//! Appends, reads, idempotency, conflicts, batches, subscriptions, compaction, cursors, reopen.

use std::sync::Arc;
use std::time::{Duration, Instant};

use event_log::sim::SimVfs;
use event_log::{
    AppendRequest, Durability, Error, EventLog, GENESIS_HASH, GROUP_BUFFER_RETAIN_BYTES, Options,
};

use crate::support::{block_on, id, request, small_options, wait_for};

#[test]
fn append_read_and_chain() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), Options::default()).unwrap();
    let a = log.append(request("arm-1", 1, 10)).unwrap();
    let b = log.append(request("arm-2", 2, 0)).unwrap();
    let c = log.append(request("arm-1", 3, 300)).unwrap();
    assert_eq!((a.position, a.stream_version), (1, 1));
    assert_eq!((b.position, b.stream_version), (2, 1));
    assert_eq!((c.position, c.stream_version), (3, 2));
    let events = log.read_range(1, 10).unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(events[0].prev_hash, GENESIS_HASH);
    for pair in events.windows(2) {
        assert_eq!(pair[1].prev_hash, pair[0].hash);
    }
    for e in &events {
        assert_eq!(e.compute_hash(), e.hash);
    }
    assert_eq!(events[2].payload, vec![3; 300]);
    assert_eq!(events[2].hash, c.hash);
    let stream = log.read_stream("arm-1", 1, 10).unwrap();
    assert_eq!(stream.iter().map(|e| e.position).collect::<Vec<_>>(), vec![1, 3]);
    assert_eq!(log.read_stream("arm-1", 2, 10).unwrap()[0].position, 3);
    assert_eq!(log.stream_version("arm-1").unwrap(), 2);
    assert_eq!(log.stream_version("nope").unwrap(), 0);
    assert_eq!(log.head().position, 3);
    assert_eq!(log.head().hash, c.hash);
    let report = log.verify().unwrap();
    assert_eq!((report.events_checked, report.first_bad), (3, None));
    log.close().unwrap();
    assert!(matches!(log.append(request("arm-1", 4, 1)), Err(Error::Closed)));
    // One owner at a time: the directory stays locked until the last handle is dropped.
    assert!(matches!(EventLog::open(dir.path(), Options::default()), Err(Error::Locked)));
    drop(log);

    // Reopen: the same events, versions continue.
    let log = EventLog::open(dir.path(), Options::default()).unwrap();
    assert_eq!(log.head().position, 3);
    assert_eq!(log.read_range(1, 10).unwrap(), events);
    let d = log.append(request("arm-1", 5, 1).expect_version(2)).unwrap();
    assert_eq!((d.position, d.stream_version), (4, 3));
    assert_eq!(log.read_stream("arm-1", 1, 10).unwrap().len(), 3);
}

#[test]
fn idempotent_by_event_id_also_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), Options::default()).unwrap();
    let first = log.append(request("s", 7, 5)).unwrap();
    let mut again = request("s", 7, 99);
    again.stream = "other".into();
    assert_eq!(log.append(again.clone()).unwrap(), first);
    assert_eq!(log.head().position, 1);
    let batch = log.append_batch(vec![request("s", 7, 5), request("s", 8, 5)]).unwrap();
    assert_eq!(batch[0], first);
    assert_eq!(batch[1].position, 2);
    drop(log);
    let log = EventLog::open(dir.path(), Options::default()).unwrap();
    assert_eq!(log.append(again).unwrap(), first);
    assert_eq!(log.append_batch(vec![request("s", 8, 1)]).unwrap()[0], batch[1]);
    assert_eq!(log.head().position, 2);
}

#[test]
fn conflicts_write_nothing_and_batches_are_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), Options::default()).unwrap();
    log.append(request("s", 1, 1).expect_version(0)).unwrap();
    match log.append(request("s", 2, 1).expect_version(0)) {
        Err(Error::Conflict { stream, expected: 0, actual: 1 }) => assert_eq!(stream, "s"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let batch = vec![
        request("s", 3, 1).expect_version(1),
        request("s", 4, 1).expect_version(2),
        request("t", 5, 1).expect_version(3),
    ];
    assert!(matches!(log.append_batch(batch), Err(Error::Conflict { .. })));
    assert_eq!(log.head().position, 1);
    let ok = log
        .append_batch(vec![
            request("s", 3, 1).expect_version(1),
            request("s", 4, 1).expect_version(2),
        ])
        .unwrap();
    assert_eq!(ok.iter().map(|a| a.stream_version).collect::<Vec<_>>(), vec![2, 3]);
    // The conflicting id 2 was never written, so it can be used now.
    assert_eq!(log.append(request("s", 2, 1)).unwrap().position, 4);
}

#[test]
fn concurrent_appends_share_fsyncs() {
    let vfs = SimVfs::new();
    let log = EventLog::open_with_vfs(Arc::new(vfs.clone()), "/log", Options::default()).unwrap();
    let (_, syncs_before) = vfs.io_counts();
    let total = 2000u64;
    let pending: Vec<_> =
        (0..total).map(|n| log.append_async(request(&format!("s{}", n % 5), n, 100))).collect();
    let mut positions: Vec<u64> = pending.into_iter().map(|p| p.wait().unwrap().position).collect();
    positions.sort_unstable();
    assert_eq!(positions, (1..=total).collect::<Vec<_>>());
    let (_, syncs_after) = vfs.io_counts();
    let syncs = syncs_after - syncs_before;
    assert!(syncs < total / 2, "{syncs} syncs for {total} appends: no group commit");
    assert_eq!(log.verify().unwrap().first_bad, None);

    // Threads too.
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                (0..50u64)
                    .filter(|i| log.append(request("x", 10_000 + t * 100 + i, 20)).is_ok())
                    .count()
            })
        })
        .collect();
    let n: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(log.head().position, total + n as u64);
    let versions: Vec<u64> =
        log.read_stream("x", 1, 1000).unwrap().iter().map(|e| e.stream_version).collect();
    assert_eq!(versions, (1..=400).collect::<Vec<_>>());
}

#[test]
fn async_api_and_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), Options::default()).unwrap();
    let mut subscription = log.subscribe(1);
    let producer = {
        let log = log.clone();
        std::thread::spawn(move || {
            for n in 1..=50u64 {
                block_on(log.append_async(request("s", n, 8))).unwrap();
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    for expected in 1..=50u64 {
        let event = subscription.next_blocking(Some(deadline)).unwrap().expect("event in time");
        assert_eq!(event.position, expected);
    }
    producer.join().unwrap();
    assert!(subscription.try_next().unwrap().is_none());
    // The async form wakes on a later append.
    let log2 = log.clone();
    let later = std::thread::spawn(move || log2.append(request("s", 51, 1)).unwrap());
    let event = block_on(subscription.next_async()).unwrap();
    assert_eq!(event.position, 51);
    later.join().unwrap();
    let mut from_middle = log.subscribe(40);
    assert_eq!(from_middle.try_next().unwrap().unwrap().position, 40);
    log.close().unwrap();
    assert!(matches!(subscription.next_blocking(None), Err(Error::Closed)));
}

#[test]
fn within_durability_acks_after_flush_window() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), Options::default()).unwrap();
    let started = Instant::now();
    let pending: Vec<_> = (0..20u64)
        .map(|n| {
            log.append_async(
                request("agg", n, 50)
                    .with_durability(Durability::Within(Duration::from_millis(30))),
            )
        })
        .collect();
    for p in pending {
        p.wait().unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(log.head().position, 20);
    let p = log.append_async(
        request("agg", 100, 1).with_durability(Durability::Within(Duration::from_secs(3600))),
    );
    log.flush().unwrap();
    assert_eq!(p.wait().unwrap().position, 21);
}

#[test]
fn compaction_keeps_anchor_and_reopens() {
    let vfs = Arc::new(SimVfs::new());
    let options = small_options();
    let log = EventLog::open_with_vfs(vfs.clone(), "/log", options.clone()).unwrap();
    for n in 1..=300u64 {
        log.append(request(if n % 2 == 0 { "even" } else { "odd" }, n, 100)).unwrap();
    }
    assert!(log.segment_paths().len() > 5);
    let report = log.compact(200).unwrap();
    assert!(report.segments_removed > 0);
    assert!(report.first_position > 1 && report.first_position <= 200);
    let head = log.head();
    assert_eq!(head.first_position, report.first_position);
    assert!(matches!(log.read(1), Err(Error::Compacted { .. })));
    let kept = log.read_range(head.first_position, 1000).unwrap();
    assert_eq!(kept.len() as u64, 300 - head.first_position + 1);
    assert_eq!(kept[0].prev_hash, head.anchor_hash);
    let verify = log.verify().unwrap();
    assert_eq!(verify.first_bad, None);
    assert_eq!(verify.anchor_position, head.first_position - 1);
    let even = log.read_stream("even", 1, 1000).unwrap();
    assert!(even.iter().all(|e| e.position >= head.first_position));
    assert_eq!(even.last().unwrap().position, 300);
    drop(log);
    let log = EventLog::open_with_vfs(vfs, "/log", options).unwrap();
    assert_eq!(log.head(), head);
    assert_eq!(log.verify().unwrap().first_bad, None);
    assert_eq!(log.append(request("even", 301, 1)).unwrap().stream_version, 151);
}

#[test]
fn compacted_segments_are_recycled_and_their_stale_records_never_read() {
    let vfs = Arc::new(SimVfs::new());
    let options = small_options();
    let log = EventLog::open_with_vfs(vfs.clone(), "/log", options.clone()).unwrap();
    fn append(log: &EventLog, n: &mut u64, count: u64) {
        for _ in 0..count {
            *n += 1;
            log.append(request(if n.is_multiple_of(2) { "even" } else { "odd" }, *n, 100)).unwrap();
        }
    }
    let mut n = 0u64;
    append(&log, &mut n, 200);
    assert!(log.segment_paths().len() > 3);
    let report = log.compact(log.head().position).unwrap();
    assert!(report.segments_removed > 0);
    assert_eq!(log.stats().segments_recycled, 1, "one compacted segment becomes the spare");
    let zero_filled = log.stats().segments_zero_filled;
    // A few records into the next segment: it is the recycled file, full of stale records.
    let head = log.head().position;
    while log.stats().segments_reused == 0 {
        append(&log, &mut n, 1);
    }
    append(&log, &mut n, 2);
    assert_eq!(log.stats().segments_zero_filled, zero_filled, "no zeros written for it");
    let active = log.segment_paths().pop().unwrap();
    let bytes = vfs.read_file(&active).unwrap();
    let (_, at) = log.locate(log.head().position).unwrap();
    let end = at as usize + event_log::record::encoded_len(&log.read(n).unwrap().unwrap());
    assert_eq!(&bytes[end..end + 8], &[0u8; 8], "an end marker follows the last record");
    assert!(bytes[end + 8..].iter().any(|&b| b != 0), "stale bytes of the old segment remain");

    let check = |log: &EventLog, n: u64| {
        let head = log.head();
        assert_eq!(head.position, n);
        let verify = log.verify().unwrap();
        assert_eq!((verify.first_bad, verify.last_position), (None, n));
        let events = log.read_range(head.first_position, usize::MAX).unwrap();
        assert_eq!(events.len() as u64, n - head.first_position + 1);
        assert_eq!(events.last().unwrap().event_id, id(n));
        let even = log.read_stream("even", 1, usize::MAX).unwrap();
        assert_eq!(even.last().unwrap().stream_version, n / 2);
    };
    check(&log, n);
    assert!(head < n);
    drop(log);
    // A clean reopen, and one as after a crash (no clean marker: the tail is scanned and the
    // stale pages after the end are zeroed); neither finds anything past the head.
    let log = EventLog::open_with_vfs(vfs.clone(), "/log", options.clone()).unwrap();
    check(&log, n);
    drop(log);
    event_log::Vfs::remove(vfs.as_ref(), std::path::Path::new("/log/clean-shutdown")).unwrap();
    let log = EventLog::open_with_vfs(vfs.clone(), "/log", options.clone()).unwrap();
    check(&log, n);
    // The log goes on through more rolls and compactions.
    for _ in 0..5 {
        append(&log, &mut n, 60);
        log.compact(log.head().position.saturating_sub(10)).unwrap();
    }
    assert!(log.stats().segments_reused >= 3, "{:?}", log.stats());
    check(&log, n);
    drop(log);
    check(&EventLog::open_with_vfs(vfs, "/log", options).unwrap(), n);
}

#[test]
fn cursors_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), Options::default()).unwrap();
    assert_eq!(log.cursor("outbox").unwrap(), None);
    log.set_cursor("outbox", 41).unwrap();
    log.set_cursor("outbox", 42).unwrap();
    assert_eq!(log.cursor("outbox").unwrap(), Some(42));
    log.close().unwrap();
    drop(log);
    let log = EventLog::open(dir.path(), Options::default()).unwrap();
    assert_eq!(log.cursor("outbox").unwrap(), Some(42));
}

#[test]
fn dedup_window_is_pruned_by_uuid_v7_time() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options { dedup_window: Duration::from_secs(60), ..Options::default() };
    let log = EventLog::open(dir.path(), options.clone()).unwrap();
    let old = *uuid::Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, 1_000, 0)).as_bytes();
    let fresh = *uuid::Uuid::now_v7().as_bytes();
    let a = log.append(AppendRequest::new("s", old, "k", vec![1])).unwrap();
    let b = log.append(AppendRequest::new("s", fresh, "k", vec![2])).unwrap();
    log.checkpoint().unwrap();
    // The fresh id is still deduplicated; the one from 1970 fell out of the window.
    assert_eq!(log.append(AppendRequest::new("s", fresh, "k", vec![2])).unwrap(), b);
    let again = log.append(AppendRequest::new("s", old, "k", vec![1])).unwrap();
    assert_ne!(again.position, a.position);
    let _ = id(0);
}

#[test]
fn uuid_v7_ids_dedup_from_their_chunks_also_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    // Small index writes: the ids land in many chunks over many writes.
    let options = Options { index_flush_events: 700, ..Options::default() };
    let log = EventLog::open(dir.path(), options.clone()).unwrap();
    let now_s =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() - 60;
    // 12,000 ids, 4 per millisecond, their times a little out of order (many writers' clocks).
    let v7 = |n: u64| {
        let ms = n / 4 + (n * 7_919) % 5;
        *uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
            uuid::NoContext,
            now_s + ms / 1_000,
            (ms % 1_000) as u32 * 1_000_000,
        ))
        .as_bytes()
    };
    let requests: Vec<AppendRequest> = (0..12_000)
        .map(|n| AppendRequest::new(format!("arm-{}", n % 7), v7(n), "k", vec![1]))
        .collect();
    let mut appended = Vec::new();
    for batch in requests.chunks(200) {
        appended.extend(log.append_batch(batch.to_vec()).unwrap());
        if appended.len() % 2_000 == 0 {
            log.checkpoint().unwrap();
        }
    }
    log.checkpoint().unwrap();
    assert!(log.stats().dedup_chunks >= 3, "{:?}", log.stats());
    let head = log.head();
    let check = |log: &EventLog, what: &str| {
        for (request, original) in requests.iter().zip(&appended).step_by(97) {
            assert_eq!(&log.append(request.clone()).unwrap(), original, "{what}");
        }
        let batch: Vec<AppendRequest> = requests.iter().skip(5).step_by(1_001).cloned().collect();
        let expected: Vec<_> = appended.iter().skip(5).step_by(1_001).copied().collect();
        assert_eq!(log.append_batch(batch).unwrap(), expected, "{what}: batch");
        assert_eq!(log.head(), head, "{what}: a retry wrote something");
    };
    check(&log, "after checkpoints");
    // A late id (older than every chunked one) is new, then deduplicated like the others.
    let mut late_id = v7(0);
    late_id[15] ^= 1;
    let late = AppendRequest::new("arm-0", late_id, "k", vec![2]);
    let late_appended = log.append(late.clone()).unwrap();
    assert_eq!(late_appended.position, head.position + 1);
    log.checkpoint().unwrap();
    assert_eq!(log.append(late.clone()).unwrap(), late_appended);
    log.close().unwrap();
    drop(log);
    let log = EventLog::open(dir.path(), options).unwrap();
    let head = log.head();
    for (request, original) in requests.iter().zip(&appended).step_by(89) {
        assert_eq!(&log.append(request.clone()).unwrap(), original, "after reopen");
    }
    assert_eq!(log.append(late).unwrap(), late_appended);
    assert_eq!(log.head(), head);
}

#[test]
fn torn_tail_on_a_real_file_is_cut_and_zeroed() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), Options::default()).unwrap();
    for n in 1..=10u64 {
        log.append(request("s", n, 50)).unwrap();
    }
    let segment = log.segment_paths().pop().unwrap();
    let (_, end) = log.locate(10).unwrap();
    let end = end + event_log::record::encoded_len(&log.read(10).unwrap().unwrap()) as u64;
    log.close().unwrap();
    drop(log);
    // A clean close leaves the marker; a crash would not have: remove it, then leave a torn
    // record (a plausible prefix and garbage) after the head.
    let marker = dir.path().join("clean-shutdown");
    assert!(marker.exists());
    std::fs::remove_file(&marker).unwrap();
    let file = std::fs::OpenOptions::new().write(true).read(true).open(&segment).unwrap();
    let mut torn = vec![0xAB; 300];
    torn[..4].copy_from_slice(&200u32.to_le_bytes());
    file.write_all_at(&torn, end).unwrap();
    file.write_all_at(&[0xCD; 64], end + 9000).unwrap();

    let log = EventLog::open(dir.path(), Options::default()).unwrap();
    assert!(!marker.exists(), "open must remove the clean marker");
    assert_eq!(log.head().position, 10);
    assert_eq!(log.verify().unwrap().first_bad, None);
    let mut after = vec![1u8; 10_000];
    file.read_exact_at(&mut after, end).unwrap();
    assert!(after.iter().all(|&b| b == 0), "torn bytes were not zeroed");
    assert_eq!(log.append(request("s", 11, 5)).unwrap().position, 11);
    log.close().unwrap();
    assert!(marker.exists());
}

/// Options under which nothing reaches the index before a power cut.
fn index_never_written() -> Options {
    Options {
        index_flush_events: 1 << 20,
        index_flush_interval: Duration::from_secs(3600),
        checkpoint_events: 1 << 20,
        checkpoint_interval: Duration::from_secs(3600),
        ..Options::default()
    }
}

/// After a crash the events past the index's durable checkpoint are not in the index; the
/// open leaves them to the index thread. Until it has written them, reads by stream, stream
/// versions and the dedup check must still see them, and another power cut, whether or not
/// that write was durable by then, must lose nothing.
#[test]
fn a_tail_past_the_index_checkpoint_is_read_and_deduplicated_after_a_crash() {
    let options = index_never_written();
    let mut vfs = SimVfs::new();
    let mut log = EventLog::open_with_vfs(Arc::new(vfs.clone()), "/log", options.clone()).unwrap();
    let acked: Vec<_> =
        (0..300u64).map(|n| log.append(request(&format!("s{}", n % 3), n, 40)).unwrap()).collect();
    let mut rng = event_log::sim::SimRng::new(7);
    for round in 0..3 {
        vfs.cut_power_now();
        drop(log);
        vfs = vfs.after_power_cut(&mut rng);
        log = EventLog::open_with_vfs(Arc::new(vfs.clone()), "/log", options.clone()).unwrap();
        assert_eq!(log.head().position, 300, "round {round}");
        let s1: Vec<u64> =
            log.read_stream("s1", 1, 1000).unwrap().iter().map(|e| e.position).collect();
        assert_eq!(s1, (0..300u64).filter(|n| n % 3 == 1).map(|n| n + 1).collect::<Vec<_>>());
        assert_eq!(log.stream_version("s2").unwrap(), 100);
        // A retry of an event in the tail returns its original result and writes nothing.
        assert_eq!(log.append(request("s0", 42, 40)).unwrap(), acked[42]);
        assert_eq!(log.head().position, 300);
        assert!(matches!(
            log.append(request("s0", 1000, 1).expect_version(99)),
            Err(Error::Conflict { .. })
        ));
        assert_eq!(log.verify().unwrap().first_bad, None);
    }
}

/// The recovered tail goes into a durable index checkpoint at once, not after the
/// checkpoint interval: the next crash then reopens from it.
#[test]
fn a_recovered_tail_is_checkpointed_without_waiting_for_the_intervals() {
    let options = index_never_written();
    let vfs = SimVfs::new();
    let log = EventLog::open_with_vfs(Arc::new(vfs.clone()), "/log", options.clone()).unwrap();
    for n in 0..50u64 {
        log.append(request("s", n, 40)).unwrap();
    }
    assert_eq!(log.stats().checkpoints, 0);
    vfs.cut_power_now();
    drop(log);
    let vfs = vfs.after_power_cut(&mut event_log::sim::SimRng::new(1));
    let log = EventLog::open_with_vfs(Arc::new(vfs), "/log", options).unwrap();
    wait_for("the recovered tail checkpointed", Duration::from_secs(10), || {
        log.stats().checkpoints > 0
    });
    assert_eq!(log.head().position, 50);
}

/// A file system whose index file syncs slowly (a slow or busy device): the index thread's
/// durable checkpoints then fall behind the writer.
#[derive(Debug)]
struct SlowIndexSync {
    inner: SimVfs,
    sync_delay: Duration,
}

#[derive(Debug)]
struct SlowSyncFile {
    inner: Arc<dyn event_log::VfsFile>,
    sync_delay: Duration,
}

impl event_log::VfsFile for SlowSyncFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        std::thread::sleep(self.sync_delay);
        self.inner.sync_data()
    }
    fn set_len(&self, len_bytes: u64) -> std::io::Result<()> {
        self.inner.set_len(len_bytes)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
}

impl event_log::Vfs for SlowIndexSync {
    fn create_dir_all(&self, dir: &std::path::Path) -> std::io::Result<()> {
        self.inner.create_dir_all(dir)
    }
    fn list(&self, dir: &std::path::Path) -> std::io::Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn open(
        &self,
        path: &std::path::Path,
        create: bool,
    ) -> std::io::Result<Arc<dyn event_log::VfsFile>> {
        let file = self.inner.open(path, create)?;
        if !path.ends_with(event_log::INDEX_FILE_NAME) {
            return Ok(file);
        }
        Ok(Arc::new(SlowSyncFile { inner: file, sync_delay: self.sync_delay }))
    }
    fn remove(&self, path: &std::path::Path) -> std::io::Result<()> {
        self.inner.remove(path)
    }
    fn rename(&self, from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
        self.inner.rename(from, to)
    }
    fn sync_dir(&self, dir: &std::path::Path) -> std::io::Result<()> {
        self.inner.sync_dir(dir)
    }
    fn exists(&self, path: &std::path::Path) -> std::io::Result<bool> {
        self.inner.exists(path)
    }
}

/// When the index's durable checkpoints fall behind, the writer waits for them rather than
/// let the tail grow: after a power cut the open scans at most 1.5 × `checkpoint_events`
/// events plus one group, and every acknowledged event is there.
#[test]
fn a_lagging_index_makes_the_writer_wait_so_the_tail_after_a_crash_stays_bounded() {
    let options = Options { checkpoint_events: 64, ..small_options() };
    let bound = 64 + 32 + options.max_batch_events as u64;
    let vfs = SimVfs::new();
    let slow = SlowIndexSync { inner: vfs.clone(), sync_delay: Duration::from_millis(20) };
    let log = EventLog::open_with_vfs(Arc::new(slow), "/log", options.clone()).unwrap();
    let mut n = 0u64;
    for _ in 0..100 {
        let batch: Vec<_> = (0..options.max_batch_events)
            .map(|_| {
                n += 1;
                request(&format!("s{}", n % 5), n, 40)
            })
            .collect();
        log.append_batch(batch).unwrap();
    }
    let stats = log.stats();
    assert!(stats.tail_waits > 0, "the writer never waited for the lagging index: {stats:?}");
    vfs.cut_power_now();
    drop(log);
    let vfs = vfs.after_power_cut(&mut event_log::sim::SimRng::new(3));
    let log = EventLog::open_with_vfs(Arc::new(vfs), "/log", options).unwrap();
    assert_eq!(log.head().position, n, "an acknowledged event was lost");
    let tail = log.stats().tail_events_at_open;
    assert!(tail <= bound, "the open scanned {tail} events past the checkpoint (bound {bound})");
    assert_eq!(log.verify().unwrap().first_bad, None);
}

#[test]
fn a_fresh_log_makes_its_first_segment_before_the_first_append() {
    // The first append must not wait for a whole segment of zeros to be written and synced.
    let dir = tempfile::tempdir().unwrap();
    let options = Options { segment_bytes: 4 * 1024 * 1024, ..Options::default() };
    let log = EventLog::open(dir.path(), options.clone()).unwrap();
    let next = dir.path().join(event_log::PREALLOC_NAME);
    wait_for("a segment made in the background after open", Duration::from_secs(20), || {
        std::fs::metadata(&next).map_or(0, |m| m.len()) >= options.segment_bytes
    });
    assert!(log.segment_paths().is_empty(), "no append yet, so no segment yet");
    log.append(request("arm-1", 1, 10)).unwrap();
    assert_eq!(log.segment_paths().len(), 1);
    assert_eq!(log.stats().segments_zero_filled, 1);
    assert!(!next.exists(), "the made file became the first segment");
}

#[test]
fn a_huge_record_does_not_keep_the_group_buffer_large() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        max_payload_bytes: 8 * GROUP_BUFFER_RETAIN_BYTES,
        max_batch_bytes: 9 * GROUP_BUFFER_RETAIN_BYTES,
        ..Options::default()
    };
    let log = EventLog::open(dir.path(), options).unwrap();
    log.append(request("s", 1, 4 * GROUP_BUFFER_RETAIN_BYTES)).unwrap();
    let after_huge = log.stats().group_buffer_bytes;
    let retain = GROUP_BUFFER_RETAIN_BYTES.max(2 * Options::default().max_group_bytes);
    assert!(
        after_huge <= retain as u64,
        "the writer kept {after_huge} bytes of buffer after a 4 MiB record"
    );
    // Small records still go through the kept buffer, and the huge one reads back whole.
    log.append(request("s", 2, 100)).unwrap();
    assert!(log.stats().group_buffer_bytes > 0);
    let huge = log.read(1).unwrap().unwrap();
    assert_eq!(huge.payload.len(), 4 * GROUP_BUFFER_RETAIN_BYTES);
}
