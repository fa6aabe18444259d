//! CPU cost per event of durable appends, for instruction counting under
//! `valgrind --tool=callgrind` (deterministic, independent of machine load) or for `perf`:
//! appends `--events` 128-byte events on 64 streams, then closes the log. By default one thread
//! keeps `--in-flight` appends outstanding (`append_async`); with `--threads N`, N threads each
//! append and wait (`append`), as the bench's concurrent writers do. Run it twice with different
//! `--events` and divide the difference of the instruction counts by the difference of the event
//! counts.
//!
//! `valgrind --tool=callgrind target/release/examples/event-log-cpu --dir /tmp/elcpu --events 20000`

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Instant;

use event_log::{AppendRequest, EventLog, Options};

/// A 128-byte event with a UUIDv7-shaped id (time-ordered, as the writers' ids are).
fn request(n: u64) -> AppendRequest {
    let mut id = [0u8; 16];
    let ms = 1_700_000_000_000u64 + n / 64;
    id[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    id[6] = 0x70;
    id[8] = 0x80;
    id[9..].copy_from_slice(&n.to_be_bytes()[1..]);
    AppendRequest::new(format!("arm-{}", n % 64), id, "sample", vec![0x42; 128])
}

/// One thread keeping `in_flight` appends outstanding.
fn one_thread(log: &EventLog, events: u64, in_flight: usize) -> u64 {
    let mut queue = VecDeque::with_capacity(in_flight);
    let mut submitted = 0u64;
    let mut done = 0u64;
    let mut submit = |queue: &mut VecDeque<_>| {
        submitted += 1;
        queue.push_back(log.append_async(request(submitted)));
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
    done
}

/// `threads` threads, each appending its share and waiting for every ack.
fn many_threads(log: &EventLog, events: u64, threads: u64) -> u64 {
    let per_thread = events / threads;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                for i in 0..per_thread {
                    // Thread t owns stream t % 64 and ids t, t + threads, ...: time-ordered per
                    // thread, interleaved across threads.
                    log.append(request(1 + t + i * threads)).unwrap();
                }
                per_thread
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).sum()
}

fn main() {
    let mut dir = std::env::temp_dir().join("keel-event-log-cpu");
    let mut events = 20_000u64;
    let mut in_flight = 64usize;
    let mut threads = 0u64;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--dir" => dir = PathBuf::from(value),
            "--events" => events = value.parse().expect("number"),
            "--in-flight" => in_flight = value.parse().expect("number"),
            "--threads" => threads = value.parse().expect("number"),
            other => panic!("unknown flag {other}"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let options = Options { background_preallocation: false, ..Options::default() };
    let log = EventLog::open(&dir, options).unwrap();
    // Creates (preallocates) the first segment outside the timed part.
    log.append(request(0)).unwrap();
    let started = Instant::now();
    let done = if threads == 0 {
        one_thread(&log, events, in_flight)
    } else {
        many_threads(&log, events, threads)
    };
    let elapsed = started.elapsed();
    let stats = log.stats();
    log.close().unwrap();
    println!(
        "events {done} group_commits {} elapsed_s {:.3} events_per_s {:.0}",
        stats.group_commits,
        elapsed.as_secs_f64(),
        done as f64 / elapsed.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
