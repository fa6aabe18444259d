//! Real crashes: a child process appends from several threads and prints each ack; it is
//! killed with SIGKILL at random moments; every acked event must be there after reopen.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use event_log::sim::SimRng;
use event_log::{EventLog, Options};

use crate::support::seed;

/// Kill cycles per run (the issue asks for at least 20).
const CYCLES: u64 = 24;
const THREADS: &str = "4";
/// Longest wait for the child to print what we wait for.
const DEADLINE: Duration = Duration::from_secs(60);

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

#[test]
fn every_ack_survives_sigkill() {
    let guard = seed("every_ack_survives_sigkill");
    let mut rng = SimRng::new(guard.seed);
    let dir = tempfile::tempdir().unwrap();
    let mut acked: HashMap<Vec<u8>, (u64, u64, Vec<u8>)> = HashMap::new();
    let mut kills_mid_stream = 0;
    for cycle in 0..CYCLES {
        let mut child = Command::new(env!("CARGO_BIN_EXE_event-log-crash-child"))
            .arg(dir.path())
            .arg(THREADS)
            .arg((guard.seed ^ cycle).to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Kill after a random number of acks (0 to 400), waiting for them with a deadline.
        let kill_after = rng.below(400);
        let deadline = Instant::now() + DEADLINE;
        let mut lines = Vec::new();
        let mut acks = 0;
        while acks < kill_after {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("cycle {cycle}: child stalled after {acks} acks"));
            acks += line.starts_with("ack ") as u64;
            lines.push(line);
        }
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        let rest: Vec<String> = rx.try_iter().collect();
        kills_mid_stream += (!rest.is_empty()) as u32;
        lines.extend(rest);
        for line in lines.iter().filter(|l| l.starts_with("ack ")) {
            let parts: Vec<&str> = line.split(' ').collect();
            let (id, position, version, hash) =
                (unhex(parts[1]), parts[2], parts[3], unhex(parts[4]));
            acked.insert(id, (position.parse().unwrap(), version.parse().unwrap(), hash));
        }

        let log = EventLog::open(
            dir.path(),
            Options { segment_bytes: 256 * 1024, max_payload_bytes: 4096, ..Options::default() },
        )
        .unwrap_or_else(|e| panic!("cycle {cycle}: reopen failed: {e}"));
        let head = log.head();
        let events = log.read_range(1, usize::MAX).unwrap();
        assert_eq!(events.len() as u64, head.position);
        let by_id: HashMap<Vec<u8>, &event_log::Event> =
            events.iter().map(|e| (e.event_id.to_vec(), e)).collect();
        assert_eq!(by_id.len(), events.len(), "cycle {cycle}: duplicate ids");
        for (id, (position, version, hash)) in &acked {
            let e = by_id
                .get(id)
                .unwrap_or_else(|| panic!("cycle {cycle}: acked event {position} lost"));
            assert_eq!(
                (e.position, e.stream_version, &e.hash.to_vec()),
                (*position, *version, hash)
            );
        }
        assert_eq!(log.verify().unwrap().first_bad, None, "cycle {cycle}");
    }
    assert!(acked.len() > 100, "too few acks to mean anything: {}", acked.len());
    eprintln!(
        "{} acks checked over {CYCLES} kills ({kills_mid_stream} with acks in flight)",
        acked.len()
    );
}
