//! The outboxes: every event goes to JetStream `EDGE_EVENTS` (`Nats-Msg-Id` = the hex event
//! id), and every cycle becomes an increment of the `production` counter (op_id = the event
//! id), each from its own cursor in the log's index. A restart re-sends from the cursor; the
//! broker's dedup (by message id) and the counter's (by op_id) make that exactly once in
//! effect. While NATS is away nothing is lost: the log is the outbox, and it is not
//! compacted below a cursor until the cursor falls [`OUTBOX_HOLD_EVENTS_MAX`] behind.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use event_log::{Event, Subscription};
use service_kit::shutdown::Shutdown;
use wire::json::CounterIncrement;

use crate::controller::{Controller, event_json};
use crate::state::KIND_CYCLE;

/// Cursor name of the `EDGE_EVENTS` outbox.
pub const EVENTS_CURSOR: &str = "outbox.edge_events";
/// Cursor name of the production-counter outbox.
pub const COUNTER_CURSOR: &str = "outbox.counter.production";
/// The counter cycles increment.
pub const PRODUCTION_COUNTER: &str = "production";
/// Most events published before their acks are awaited.
pub const PUBLISH_WINDOW_EVENTS: usize = 256;
/// Time limit for one JetStream ack or counter reply.
pub const ACK_TIMEOUT_MS: u64 = 2_000;
/// First retry delay; doubles up to [`RETRY_DELAY_MS_MAX`].
pub const RETRY_DELAY_MS_MIN: u64 = 50;
/// Longest retry delay.
pub const RETRY_DELAY_MS_MAX: u64 = 2_000;
/// How far (events) an outbox may hold compaction back; beyond it the log is compacted
/// anyway and the outbox skips what was removed (counted in `keel_arm_outbox_dropped_total`).
pub const OUTBOX_HOLD_EVENTS_MAX: u64 = 5_000_000;
/// Events between cursor writes of the counter outbox when no cycle is among them.
const COUNTER_CURSOR_EVERY_EVENTS: u64 = 1_024;
/// Retention of `EDGE_EVENTS` when this controller creates it.
pub const STREAM_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The outboxes' cursors as last stored (position of the last event handed over).
#[derive(Debug, Default)]
pub struct Cursors {
    /// `EDGE_EVENTS`.
    pub events: AtomicU64,
    /// Production counter.
    pub counter: AtomicU64,
}

fn delay(attempt: u32) -> Duration {
    Duration::from_millis(
        RETRY_DELAY_MS_MIN.saturating_mul(1 << attempt.min(16)).min(RETRY_DELAY_MS_MAX),
    )
}

/// Sleeps `d` unless the shutdown fires first (then returns true).
async fn sleep_or_stop(d: Duration, stop: &Shutdown) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.wait() => true,
    }
}

/// Where an outbox starts: after its stored cursor, not below the compaction floor.
fn start_position(ctl: &Controller, name: &str) -> u64 {
    let stored = ctl.log().cursor(name).ok().flatten().unwrap_or(0);
    let first = ctl.log().head().first_position;
    if stored + 1 < first {
        metrics::counter!("keel_arm_outbox_dropped_total", "outbox" => name.to_owned())
            .increment(first - stored - 1);
        tracing::error!(outbox = name, stored, first, "outbox cursor below the compacted log");
    }
    (stored + 1).max(first)
}

/// Waits for the next event (or shutdown: `None`), resubscribing past a compaction.
async fn next_event(
    ctl: &Controller,
    name: &str,
    sub: &mut Subscription,
    stop: &Shutdown,
) -> Option<Event> {
    loop {
        let result = tokio::select! {
            r = sub.next_async() => r,
            _ = stop.wait() => return None,
        };
        match result {
            Ok(event) => return Some(event),
            Err(event_log::Error::Compacted { position, first_position }) => {
                metrics::counter!("keel_arm_outbox_dropped_total", "outbox" => name.to_owned())
                    .increment(first_position - position);
                tracing::error!(
                    outbox = name,
                    position,
                    first_position,
                    "outbox fell behind compaction"
                );
                *sub = ctl.log().subscribe(first_position);
            }
            Err(err) => {
                tracing::error!(outbox = name, error = %err, "outbox cannot read the log");
                if sleep_or_stop(Duration::from_millis(RETRY_DELAY_MS_MAX), stop).await {
                    return None;
                }
                *sub = ctl.log().subscribe(sub.position());
            }
        }
    }
}

/// Least time between two writes of one outbox's cursor: each write is an index
/// transaction that costs device pages, and a cursor that steps back only re-sends what the
/// broker and the counter deduplicate.
pub const CURSOR_STORE_INTERVAL: Duration = Duration::from_secs(1);

/// An outbox cursor: always current in memory (compaction reads it), written to the index
/// at most every [`CURSOR_STORE_INTERVAL`] and when the outbox stops. The periodic write runs
/// on a blocking thread: an index write waits for redb's write lock, which the log's index
/// thread holds for as long as it writes a flush or a checkpoint, and an outbox waiting for it
/// on a tokio worker holds up that worker's other tasks (plan updates among them; no effect on
/// plan-ack latency was measurable in the A/B of BENCHMARKS, 2026-12-02).
struct Cursor<'a> {
    ctl: &'a Controller,
    name: &'static str,
    cell: &'a AtomicU64,
    /// When the last write was started.
    stored_at: Instant,
    /// Set while a background write is in flight (at most one at a time).
    writing: Arc<AtomicBool>,
    /// The highest position written; held across each write, so writes never step back.
    written: Arc<Mutex<u64>>,
}

impl<'a> Cursor<'a> {
    fn new(ctl: &'a Controller, name: &'static str, cell: &'a AtomicU64, position: u64) -> Self {
        cell.store(position, Ordering::Relaxed);
        Self {
            ctl,
            name,
            cell,
            stored_at: Instant::now(),
            writing: Arc::new(AtomicBool::new(false)),
            written: Arc::new(Mutex::new(position)),
        }
    }

    fn position(&self) -> u64 {
        self.cell.load(Ordering::Relaxed)
    }

    fn advance(&mut self, position: u64) {
        self.cell.store(position, Ordering::Relaxed);
        let lag = self.ctl.log().head().position.saturating_sub(position);
        metrics::gauge!("keel_arm_outbox_lag_events", "outbox" => self.name).set(lag as f64);
        if self.stored_at.elapsed() >= CURSOR_STORE_INTERVAL {
            self.store_in_background();
        }
    }

    fn store_in_background(&mut self) {
        if self.writing.swap(true, Ordering::AcqRel) {
            return;
        }
        let position = self.position();
        // No write is in flight, so the lock is free; a failed write is retried here.
        if position <= *self.written.lock().unwrap_or_else(|e| e.into_inner()) {
            self.writing.store(false, Ordering::Release);
            return;
        }
        let (log, name) = (self.ctl.log().clone(), self.name);
        let (writing, written) = (self.writing.clone(), self.written.clone());
        tokio::task::spawn_blocking(move || {
            write_cursor(&log, name, &written, position);
            writing.store(false, Ordering::Release);
        });
        self.stored_at = Instant::now();
    }

    /// Writes the cursor now (after a background write in flight, which it never undoes).
    fn store(&mut self) {
        let position = self.position();
        write_cursor(self.ctl.log(), self.name, &self.written, position);
        self.stored_at = Instant::now();
    }
}

/// Writes `position` as cursor `name` unless a write at or above it is already done.
fn write_cursor(log: &event_log::EventLog, name: &str, written: &Mutex<u64>, position: u64) {
    let mut done = written.lock().unwrap_or_else(|e| e.into_inner());
    if position <= *done {
        return;
    }
    match log.set_cursor(name, position) {
        Ok(()) => *done = position,
        Err(err) => tracing::warn!(outbox = name, error = %err, "cannot store the outbox cursor"),
    }
}

impl Drop for Cursor<'_> {
    fn drop(&mut self) {
        self.store();
    }
}

async fn ensure_stream(js: &jetstream::Context) -> Result<(), String> {
    let config = jetstream::stream::Config {
        name: wire::subjects::STREAM_EVENTS.to_owned(),
        subjects: vec!["edge.arm.*.events".to_owned()],
        max_age: STREAM_MAX_AGE,
        ..Default::default()
    };
    js.get_or_create_stream(config).await.map(|_| ()).map_err(|e| e.to_string())
}

async fn publish_window(js: &jetstream::Context, batch: &[Event]) -> Result<u64, String> {
    let mut acks = Vec::with_capacity(batch.len());
    for event in batch {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, hex::encode(event.event_id).as_str());
        let body = serde_json::to_vec(&event_json(event)).map_err(|e| e.to_string())?;
        let ack = js
            .publish_with_headers(
                wire::subjects::arm_events(&event.stream),
                headers,
                Bytes::from(body),
            )
            .await
            .map_err(|e| e.to_string())?;
        acks.push(ack);
    }
    let mut duplicates = 0;
    for ack in acks {
        let ack = tokio::time::timeout(Duration::from_millis(ACK_TIMEOUT_MS), ack)
            .await
            .map_err(|_| "ack timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        duplicates += u64::from(ack.duplicate);
    }
    Ok(duplicates)
}

/// Publishes every event to `EDGE_EVENTS`, from the stored cursor on, until `stop`.
pub async fn run_events(
    ctl: Arc<Controller>,
    client: async_nats::Client,
    cursors: Arc<Cursors>,
    stop: Shutdown,
) {
    let mut js = jetstream::new(client);
    js.set_timeout(Duration::from_millis(ACK_TIMEOUT_MS));
    let start = start_position(&ctl, EVENTS_CURSOR);
    let mut cursor = Cursor::new(&ctl, EVENTS_CURSOR, &cursors.events, start - 1);
    let mut sub = ctl.log().subscribe(start);
    let mut batch: Vec<Event> = Vec::new();
    let mut stream_ready = false;
    let mut attempt = 0u32;
    let mut last_warn: Option<Instant> = None;
    loop {
        if batch.is_empty() {
            let Some(event) = next_event(&ctl, EVENTS_CURSOR, &mut sub, &stop).await else {
                return;
            };
            batch.push(event);
            while batch.len() < PUBLISH_WINDOW_EVENTS {
                match sub.try_next() {
                    Ok(Some(event)) => batch.push(event),
                    _ => break,
                }
            }
        }
        let result = if stream_ready {
            publish_window(&js, &batch).await
        } else {
            ensure_stream(&js).await.map(|()| 0)
        };
        match result {
            Ok(duplicates) if stream_ready => {
                let last = batch.last().map_or(0, |e| e.position);
                metrics::counter!("keel_arm_outbox_published_total", "outbox" => EVENTS_CURSOR)
                    .increment(batch.len() as u64);
                metrics::counter!("keel_arm_outbox_duplicates_total", "outbox" => EVENTS_CURSOR)
                    .increment(duplicates);
                cursor.advance(last);
                batch.clear();
                attempt = 0;
            }
            Ok(_) => stream_ready = true,
            Err(err) => {
                stream_ready = false;
                metrics::counter!("keel_arm_outbox_errors_total", "outbox" => EVENTS_CURSOR)
                    .increment(1);
                if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    tracing::warn!(outbox = EVENTS_CURSOR, error = %err, pending = batch.len(), "publishing events failed; retrying");
                    last_warn = Some(Instant::now());
                }
                if sleep_or_stop(delay(attempt), &stop).await {
                    return;
                }
                attempt += 1;
            }
        }
    }
}

/// What a counter reply says.
enum Reply {
    Counted,
    Retry(String),
    Refused(String),
}

fn classify(payload: &[u8]) -> Reply {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return Reply::Retry("reply is not JSON".into());
    };
    match body.get("error") {
        None => Reply::Counted,
        Some(code) => {
            let status = body.get("status").and_then(serde_json::Value::as_u64).unwrap_or(503);
            let text = format!("{code} ({status})");
            if (400..500).contains(&status) && status != 408 && status != 429 {
                Reply::Refused(text)
            } else {
                Reply::Retry(text)
            }
        }
    }
}

/// Sends one `production` increment per cycle event, from the stored cursor on, until
/// `stop`; each is retried until the counter service answers.
pub async fn run_counter(
    ctl: Arc<Controller>,
    client: async_nats::Client,
    cursors: Arc<Cursors>,
    stop: Shutdown,
) {
    let start = start_position(&ctl, COUNTER_CURSOR);
    let mut cursor = Cursor::new(&ctl, COUNTER_CURSOR, &cursors.counter, start - 1);
    let mut sub = ctl.log().subscribe(start);
    let subject = wire::subjects::counter_inc(PRODUCTION_COUNTER);
    let mut last_warn: Option<Instant> = None;
    loop {
        let event = match sub.try_next() {
            Ok(Some(event)) => event,
            _ => {
                // Idle: everything before the subscription's position is handled.
                if sub.position() > cursor.position() + 1 {
                    cursor.advance(sub.position() - 1);
                }
                let Some(event) = next_event(&ctl, COUNTER_CURSOR, &mut sub, &stop).await else {
                    return;
                };
                event
            }
        };
        if event.kind == KIND_CYCLE {
            let body = serde_json::to_vec(&CounterIncrement {
                amount: 1,
                op_id: hex::encode(event.event_id),
            })
            .unwrap_or_default();
            let mut attempt = 0u32;
            loop {
                let sent = tokio::time::timeout(
                    Duration::from_millis(ACK_TIMEOUT_MS),
                    client.request(subject.clone(), Bytes::from(body.clone())),
                )
                .await;
                let outcome = match sent {
                    Ok(Ok(reply)) => classify(&reply.payload),
                    Ok(Err(err)) => Reply::Retry(err.to_string()),
                    Err(_) => Reply::Retry("no reply in time".into()),
                };
                match outcome {
                    Reply::Counted => {
                        metrics::counter!("keel_arm_outbox_published_total", "outbox" => COUNTER_CURSOR)
                            .increment(1);
                        break;
                    }
                    Reply::Refused(why) => {
                        tracing::error!(
                            position = event.position,
                            why,
                            "counter refused a cycle increment; skipping it"
                        );
                        metrics::counter!("keel_arm_outbox_dropped_total", "outbox" => COUNTER_CURSOR)
                            .increment(1);
                        break;
                    }
                    Reply::Retry(why) => {
                        metrics::counter!("keel_arm_outbox_errors_total", "outbox" => COUNTER_CURSOR)
                            .increment(1);
                        if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                            tracing::warn!(
                                position = event.position,
                                why,
                                "counter increment not confirmed; retrying"
                            );
                            last_warn = Some(Instant::now());
                        }
                        if sleep_or_stop(delay(attempt), &stop).await {
                            return;
                        }
                        attempt += 1;
                    }
                }
            }
            cursor.advance(event.position);
        } else if event.position >= cursor.position() + COUNTER_CURSOR_EVERY_EVENTS {
            cursor.advance(event.position);
        }
    }
}
