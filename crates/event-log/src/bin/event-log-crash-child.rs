//! Test helper for the real-crash test: appends from several threads and prints every ack.
//!
//! Usage: `event-log-crash-child <dir> <threads> <seed>`. Each acknowledged append prints
//! `ack <event-id-hex> <position> <stream-version> <hash-hex>` on its own line, flushed, after
//! the append returned (i.e. after it is durable). Runs until killed.

use std::io::Write;
use std::sync::{Arc, Mutex};

use event_log::{AppendRequest, Durability, EventLog, Options};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, threads, seed] = &args[..] else {
        eprintln!("usage: event-log-crash-child <dir> <threads> <seed>");
        std::process::exit(64);
    };
    let threads: u64 = threads.parse().expect("threads");
    let seed: u64 = seed.parse().expect("seed");
    let options =
        Options { segment_bytes: 256 * 1024, max_payload_bytes: 4096, ..Options::default() };
    let log = EventLog::open(dir, options).expect("open log");
    println!("ready {}", log.head().position);
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let log = log.clone();
            let out = out.clone();
            std::thread::spawn(move || {
                for i in 0u64.. {
                    let mut id = [0u8; 16];
                    id[..8].copy_from_slice(&seed.to_be_bytes());
                    id[8..12].copy_from_slice(&(t as u32).to_be_bytes());
                    id[12..].copy_from_slice(&(i as u32).to_be_bytes());
                    let payload = vec![(i % 251) as u8; (i % 300) as usize];
                    let mut request =
                        AppendRequest::new(format!("stream-{}", t % 3), id, "test", payload);
                    if i % 7 == 3 {
                        request.durability =
                            Durability::Within(std::time::Duration::from_millis(2));
                    }
                    let result = if i % 11 == 5 {
                        let mut second = request.clone();
                        second.event_id[12] ^= 0x80;
                        log.append_batch(vec![request.clone(), second.clone()])
                            .map(|r| vec![(request.event_id, r[0]), (second.event_id, r[1])])
                    } else {
                        log.append(request.clone()).map(|a| vec![(request.event_id, a)])
                    };
                    let acks = result.expect("append");
                    let mut out = out.lock().unwrap();
                    for (id, a) in acks {
                        writeln!(
                            out,
                            "ack {} {} {} {}",
                            hex(&id),
                            a.position,
                            a.stream_version,
                            hex(&a.hash)
                        )
                        .expect("stdout");
                    }
                    out.flush().expect("flush stdout");
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.join();
    }
}
