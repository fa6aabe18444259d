//! CPU cost per event of durable appends, for instruction counting under
//! `valgrind --tool=callgrind` (deterministic, independent of machine load): appends `--events`
//! 128-byte events with `--in-flight` appends outstanding from one thread (`append_async`) on
//! 64 streams, then closes the log. Run it twice with different `--events` and divide the
//! difference of the instruction counts by the difference of the event counts.
//!
//! `valgrind --tool=callgrind target/release/examples/event-log-cpu --dir /tmp/elcpu --events 20000`

use std::collections::VecDeque;
use std::path::PathBuf;

use event_log::{AppendRequest, EventLog, Options};

fn main() {
    let mut dir = std::env::temp_dir().join("keel-event-log-cpu");
    let mut events = 20_000u64;
    let mut in_flight = 64usize;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--dir" => dir = PathBuf::from(value),
            "--events" => events = value.parse().expect("number"),
            "--in-flight" => in_flight = value.parse().expect("number"),
            other => panic!("unknown flag {other}"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let options = Options { background_preallocation: false, ..Options::default() };
    let log = EventLog::open(&dir, options).unwrap();
    let mut queue = VecDeque::with_capacity(in_flight);
    let mut submitted = 0u64;
    let mut done = 0u64;
    let mut submit = |queue: &mut VecDeque<_>| {
        submitted += 1;
        let mut id = [0u8; 16];
        let ms = 1_700_000_000_000u64 + submitted / 64;
        id[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        id[6] = 0x70;
        id[8] = 0x80;
        id[9..].copy_from_slice(&submitted.to_be_bytes()[1..]);
        let stream = format!("arm-{}", submitted % 64);
        queue.push_back(log.append_async(AppendRequest::new(
            stream,
            id,
            "sample",
            vec![0x42; 128],
        )));
    };
    for _ in 0..in_flight.min(events as usize) {
        submit(&mut queue);
    }
    while let Some(pending) = queue.pop_front() {
        pending.wait().unwrap();
        done += 1;
        if done + (queue.len() as u64) < events {
            submit(&mut queue);
        }
    }
    let stats = log.stats();
    log.close().unwrap();
    println!("events {done} group_commits {}", stats.group_commits);
    let _ = std::fs::remove_dir_all(&dir);
}
