//! The arm state folded from events (plans, cycles, sensor aggregates): what recovery
//! rebuilds from a snapshot plus the log tail, and what every acknowledgement is checked
//! against. Event kinds, payloads and the deterministic event ids live here too.

use std::collections::{BTreeMap, VecDeque};

use event_log::{Event, Hash};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Kind of a committed plan update.
pub const KIND_PLAN: &str = "plan.updated";
/// Kind of a completed cycle.
pub const KIND_CYCLE: &str = "cycle.completed";
/// Kind of a periodic batch of sensor aggregates, one per arm that spoke in the interval
/// (durable within its interval, not immediately), in stream [`AGGREGATE_STREAM`].
pub const KIND_AGGREGATE: &str = "sensor.aggregates";
/// The stream of sensor aggregate batches. Arm ids may not start with `_`, so it never
/// collides with an arm's stream, and it is a valid subject token
/// (`edge.arm._sensors.events`).
pub const AGGREGATE_STREAM: &str = "_sensors";
/// Most arms' aggregates in one batch event (keeps it well under the log's payload limit).
pub const AGGREGATE_BATCH_ARMS_MAX: usize = 256;

/// Plan acknowledgements kept per arm so that a retry of a recent update (same id and
/// version) gets the identical body even after newer updates; older retries are stale.
pub const PLAN_RETRY_WINDOW: usize = 16;
/// Cycle acknowledgements kept per arm in memory; older retries are still answered
/// identically through the log's id index (the event id is deterministic).
pub const CYCLE_RETRY_WINDOW: usize = 64;
/// Longest caller-chosen id of a plan update or cycle, in bytes.
pub const CALLER_ID_BYTES_MAX: usize = 128;

/// Payload of a [`KIND_PLAN`] event (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanPayload {
    /// Arm id.
    pub arm: String,
    /// The caller's id of the update.
    pub id: String,
    /// Plan version.
    pub version: u64,
    /// Target joint positions (rad).
    pub joints: Vec<f64>,
    /// RFC 3339: the caller's timestamp, or when the controller accepted the update.
    pub timestamp: String,
}

/// Payload of a [`KIND_CYCLE`] event (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CyclePayload {
    /// Arm id.
    pub arm: String,
    /// The caller's id of the cycle.
    pub id: String,
    /// RFC 3339, when the controller recorded it.
    pub timestamp: String,
}

/// What a [`KIND_AGGREGATE`] event holds. One event per interval for all arms keeps
/// the index at one entry per interval instead of one per arm (index pages are most of the
/// bytes an event costs the device). Written in the compact form of
/// [`AggregateBatch::encode`] (`docs/FORMATS.md`); [`AggregateBatch::decode`] also reads the
/// first form, this struct as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AggregateBatch {
    /// One per arm that sent samples in the interval.
    pub arms: Vec<AggregatePayload>,
}

/// Format tag of the compact aggregate payload.
pub const AGGREGATE_FORMAT: u8 = 2;
/// Resolution of the angles in a compact aggregate payload (rad): a micro-radian, finer than
/// an industrial joint encoder resolves (a 20-bit encoder reads 6 µrad).
pub const AGGREGATE_UNIT_RAD: f64 = 1e-6;

/// The compact aggregate payload: angles as integers of `unit_rad`, times as offsets.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompactBatch {
    v: u8,
    unit_rad: f64,
    /// Smallest `from_ts_us` of the batch.
    t0_us: u64,
    arms: Vec<CompactArm>,
}

/// One arm, as a JSON array: id, samples, `from_ts_us - t0_us`, `to_ts_us - from_ts_us`,
/// joints min, max and last, largest deviation. A non-finite angle is `null`.
#[derive(Debug, Serialize, Deserialize)]
struct CompactArm(
    String,
    u64,
    u64,
    u64,
    Vec<Option<i64>>,
    Vec<Option<i64>>,
    Vec<Option<i64>>,
    Option<i64>,
);

/// `rad` in units of [`AGGREGATE_UNIT_RAD`] (saturating beyond ±9.2e12 rad).
fn to_units(rad: f64) -> Option<i64> {
    rad.is_finite().then(|| (rad / AGGREGATE_UNIT_RAD).round() as i64)
}

fn from_units(units: Option<i64>, unit_rad: f64) -> f64 {
    units.map_or(f64::NAN, |units| units as f64 * unit_rad)
}

impl AggregateBatch {
    /// The event payload: compact JSON, about 130 bytes an arm with 6 joints (the first
    /// form, this struct as JSON, took about 550).
    pub fn encode(&self) -> Vec<u8> {
        let t0_us = self.arms.iter().map(|a| a.from_ts_us).min().unwrap_or(0);
        let units = |joints: &[f64]| joints.iter().map(|&j| to_units(j)).collect();
        let compact = CompactBatch {
            v: AGGREGATE_FORMAT,
            unit_rad: AGGREGATE_UNIT_RAD,
            t0_us,
            arms: self
                .arms
                .iter()
                .map(|a| {
                    CompactArm(
                        a.arm.clone(),
                        a.samples,
                        a.from_ts_us - t0_us,
                        a.to_ts_us.saturating_sub(a.from_ts_us),
                        units(&a.joints_min),
                        units(&a.joints_max),
                        units(&a.joints_last),
                        to_units(a.deviation_max_rad),
                    )
                })
                .collect(),
        };
        serde_json::to_vec(&compact).expect("an aggregate batch serializes")
    }

    /// Reads a payload of either form.
    pub fn decode(payload: &[u8]) -> Result<AggregateBatch, serde_json::Error> {
        let compact = match serde_json::from_slice::<CompactBatch>(payload) {
            Ok(compact) => compact,
            Err(compact_err) => {
                return serde_json::from_slice::<AggregateBatch>(payload).map_err(|_| compact_err);
            }
        };
        if compact.v != AGGREGATE_FORMAT
            || !(compact.unit_rad.is_finite() && compact.unit_rad > 0.0)
        {
            return Err(serde::de::Error::custom(format!(
                "aggregate format {} with unit {} rad",
                compact.v, compact.unit_rad
            )));
        }
        let unit = compact.unit_rad;
        let rads =
            |units: Vec<Option<i64>>| units.into_iter().map(|u| from_units(u, unit)).collect();
        let arms = compact
            .arms
            .into_iter()
            .map(|CompactArm(arm, samples, from, span, min, max, last, deviation)| {
                let from_ts_us = compact.t0_us.saturating_add(from);
                AggregatePayload {
                    arm,
                    samples,
                    from_ts_us,
                    to_ts_us: from_ts_us.saturating_add(span),
                    joints_min: rads(min),
                    joints_max: rads(max),
                    joints_last: rads(last),
                    deviation_max_rad: from_units(deviation, unit),
                }
            })
            .collect();
        Ok(AggregateBatch { arms })
    }
}

/// What one arm's sensors said over one aggregation interval. Samples themselves are
/// never written one by one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AggregatePayload {
    /// Arm id.
    pub arm: String,
    /// Samples folded in this interval.
    pub samples: u64,
    /// Interval start and end, microseconds since the Unix epoch (sample time).
    pub from_ts_us: u64,
    /// See `from_ts_us`.
    pub to_ts_us: u64,
    /// Smallest value per joint.
    pub joints_min: Vec<f64>,
    /// Largest value per joint.
    pub joints_max: Vec<f64>,
    /// Last sample of the interval.
    pub joints_last: Vec<f64>,
    /// Largest deviation from the plan seen (rad; 0 without a plan).
    pub deviation_max_rad: f64,
}

/// What was acknowledged for one committed event: the body of a retry's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The caller's id.
    pub id: String,
    /// Plan version (0 for cycles).
    pub version: u64,
    /// Log position.
    pub position: u64,
    /// Chain hash.
    pub hash: Hash,
}

/// One arm's durable state: everything here is derived from its events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ArmDurable {
    /// The current plan and where it was committed.
    pub plan: Option<(PlanPayload, u64, Hash)>,
    /// Recent plan acknowledgements, oldest first (at most [`PLAN_RETRY_WINDOW`]).
    pub plan_acks: VecDeque<Ack>,
    /// Completed cycles.
    pub cycles: u64,
    /// Recent cycle acknowledgements, oldest first (at most [`CYCLE_RETRY_WINDOW`]).
    pub cycle_acks: VecDeque<Ack>,
    /// Sensor aggregates committed.
    pub aggregates: u64,
    /// Samples covered by committed aggregates.
    pub samples_aggregated: u64,
    /// Events of this arm whose payload could not be read (never expected).
    pub unreadable_events: u64,
}

impl ArmDurable {
    /// The current plan version (0: none).
    pub fn plan_version(&self) -> u64 {
        self.plan.as_ref().map_or(0, |(p, _, _)| p.version)
    }

    /// The acknowledgement of a recent plan update with this id and version.
    pub fn plan_retry(&self, id: &str, version: u64) -> Option<&Ack> {
        self.plan_acks.iter().rev().find(|a| a.version == version && a.id == id)
    }

    /// The acknowledgement of a recent cycle with this id.
    pub fn cycle_retry(&self, id: &str) -> Option<&Ack> {
        self.cycle_acks.iter().rev().find(|a| a.id == id)
    }

    /// Folds one event of this arm.
    pub fn apply(&mut self, kind: &str, payload: &[u8], position: u64, hash: Hash) {
        match kind {
            KIND_PLAN => match serde_json::from_slice::<PlanPayload>(payload) {
                Ok(plan) if plan.version > self.plan_version() => {
                    push_bounded(
                        &mut self.plan_acks,
                        Ack { id: plan.id.clone(), version: plan.version, position, hash },
                        PLAN_RETRY_WINDOW,
                    );
                    self.plan = Some((plan, position, hash));
                }
                Ok(plan) => tracing::warn!(
                    position,
                    version = plan.version,
                    current = self.plan_version(),
                    "plan event not newer than the current plan; ignored"
                ),
                Err(err) => self.unreadable(position, kind, &err),
            },
            KIND_CYCLE => match serde_json::from_slice::<CyclePayload>(payload) {
                Ok(cycle) => {
                    self.cycles += 1;
                    push_bounded(
                        &mut self.cycle_acks,
                        Ack { id: cycle.id, version: 0, position, hash },
                        CYCLE_RETRY_WINDOW,
                    );
                }
                Err(err) => self.unreadable(position, kind, &err),
            },
            // Kinds written by a newer version: kept in the log, nothing to fold here.
            _ => {}
        }
    }

    /// Folds this arm's entry of an aggregate batch.
    pub fn apply_aggregate(&mut self, aggregate: &AggregatePayload) {
        self.aggregates += 1;
        self.samples_aggregated += aggregate.samples;
    }

    fn unreadable(&mut self, position: u64, kind: &str, err: &serde_json::Error) {
        self.unreadable_events += 1;
        tracing::error!(position, kind, error = %err, "unreadable event payload");
    }
}

/// Appends to a retry window, dropping its oldest entry when full. The window takes its whole
/// capacity at its first push, so its memory is reached at once and does not creep up by
/// doublings as it fills (a cycle window fills in 32 minutes at a cycle every 30 s).
fn push_bounded(acks: &mut VecDeque<Ack>, ack: Ack, max: usize) {
    if acks.len() >= max {
        acks.pop_front();
    }
    if acks.capacity() < max {
        acks.reserve_exact(max - acks.len());
    }
    acks.push_back(ack);
}

/// The whole controller's durable state, as of a log position (what snapshots hold).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Per arm (every stream seen in the log, hosted now or not).
    pub arms: BTreeMap<String, ArmDurable>,
    /// Position of the last event folded in.
    pub position: u64,
    /// Its chain hash.
    pub hash: Hash,
}

impl snapshotter::Recover for State {
    fn apply(&mut self, event: &Event) {
        debug_assert!(event.position > self.position, "events fold in log order");
        self.position = event.position;
        self.hash = event.hash;
        if event.kind == KIND_AGGREGATE {
            match AggregateBatch::decode(&event.payload) {
                Ok(batch) => {
                    for aggregate in &batch.arms {
                        self.arms
                            .entry(aggregate.arm.clone())
                            .or_default()
                            .apply_aggregate(aggregate);
                    }
                }
                Err(err) => {
                    tracing::error!(position = event.position, error = %err, "unreadable aggregate batch")
                }
            }
            return;
        }
        self.arms.entry(event.stream.clone()).or_default().apply(
            &event.kind,
            &event.payload,
            event.position,
            event.hash,
        );
    }
}

fn derived_id(domain: &[u8], fields: &[&[u8]]) -> [u8; 16] {
    let mut hasher = Sha256::new();
    for field in std::iter::once(domain).chain(fields.iter().copied()) {
        hasher.update((field.len() as u32).to_le_bytes());
        hasher.update(field);
    }
    let digest = hasher.finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    // Shape it as a UUIDv8 (custom): never mistaken for a UUIDv7, whose embedded time the
    // log uses to age ids out of its idempotency index.
    id[6] = (id[6] & 0x0f) | 0x80;
    id[8] = (id[8] & 0x3f) | 0x80;
    id
}

/// The event id of plan update `id`@`version` of `arm`: the same update always maps to the
/// same id, so a retry after a crash is idempotent at the log too.
pub fn plan_event_id(arm: &str, id: &str, version: u64) -> [u8; 16] {
    derived_id(b"keel.arm.plan.v1", &[arm.as_bytes(), id.as_bytes(), &version.to_le_bytes()])
}

/// The event id of cycle `id` of `arm`.
pub fn cycle_event_id(arm: &str, id: &str) -> [u8; 16] {
    derived_id(b"keel.arm.cycle.v1", &[arm.as_bytes(), id.as_bytes()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshotter::Recover;

    fn plan_event(position: u64, arm: &str, id: &str, version: u64) -> Event {
        let payload = PlanPayload {
            arm: arm.into(),
            id: id.into(),
            version,
            joints: vec![0.1; 6],
            timestamp: "2026-01-01T00:00:00Z".into(),
        };
        Event {
            position,
            stream: arm.into(),
            stream_version: position,
            event_id: plan_event_id(arm, id, version),
            kind: KIND_PLAN.into(),
            timestamp_ms: 0,
            payload: serde_json::to_vec(&payload).unwrap(),
            prev_hash: [0; 32],
            hash: [position as u8; 32],
        }
    }

    #[test]
    fn plans_fold_in_order_and_keep_a_bounded_retry_window() {
        let mut state = State::default();
        state.apply(&plan_event(1, "arm-001", "u1", 1));
        // The window's memory is taken at its first entry, not in doublings as it fills.
        let capacity = state.arms["arm-001"].plan_acks.capacity();
        assert!(capacity >= PLAN_RETRY_WINDOW, "capacity {capacity} after the first entry");
        for v in 2..=(PLAN_RETRY_WINDOW as u64 + 5) {
            state.apply(&plan_event(v, "arm-001", &format!("u{v}"), v));
        }
        let arm = &state.arms["arm-001"];
        assert_eq!(arm.plan_acks.capacity(), capacity, "no growth while it fills");
        assert_eq!(arm.plan_version(), PLAN_RETRY_WINDOW as u64 + 5);
        assert_eq!(arm.plan_acks.len(), PLAN_RETRY_WINDOW);
        assert!(arm.plan_retry("u1", 1).is_none(), "outside the window");
        let last = arm.plan_retry("u21", 21).unwrap();
        assert_eq!((last.position, last.hash), (21, [21; 32]));
        assert!(arm.plan_retry("other", 21).is_none(), "same version, other id");
    }

    #[test]
    fn snapshots_round_trip_through_postcard() {
        let mut state = State::default();
        state.apply(&plan_event(1, "arm-001", "a", 1));
        let bytes = postcard_like(&state);
        assert_eq!(bytes, state);
    }

    fn postcard_like(state: &State) -> State {
        let codec = snapshotter::Codec::Postcard;
        codec.decode(&codec.encode(state).unwrap()).unwrap()
    }

    /// The first event of a log: an aggregate batch with `payload`.
    fn aggregate_event(payload: Vec<u8>) -> Event {
        Event {
            position: 1,
            stream: AGGREGATE_STREAM.into(),
            stream_version: 1,
            event_id: [7; 16],
            kind: KIND_AGGREGATE.into(),
            timestamp_ms: 0,
            payload,
            prev_hash: [0; 32],
            hash: [1; 32],
        }
    }

    #[test]
    fn an_aggregate_batch_folds_into_each_arm() {
        let agg = |arm: &str, samples| AggregatePayload {
            arm: arm.into(),
            samples,
            from_ts_us: 1,
            to_ts_us: 2,
            joints_min: vec![0.0],
            joints_max: vec![0.1],
            joints_last: vec![0.05],
            deviation_max_rad: 0.01,
        };
        let batch = AggregateBatch { arms: vec![agg("arm-001", 10), agg("arm-002", 4)] };
        let mut state = State::default();
        state.apply(&aggregate_event(serde_json::to_vec(&batch).unwrap()));
        assert_eq!(state.arms["arm-001"].samples_aggregated, 10);
        assert_eq!(state.arms["arm-002"].aggregates, 1);
        assert!(!state.arms.contains_key(AGGREGATE_STREAM));
        assert_eq!(state.position, 1);
    }

    #[test]
    fn aggregates_are_written_compactly_and_read_back_within_a_micro_radian() {
        let arm = |i: usize| AggregatePayload {
            arm: format!("arm-{i:03}"),
            samples: 1_810,
            from_ts_us: 1_796_153_199_073_021 + i as u64,
            to_ts_us: 1_796_153_199_974_064,
            joints_min: vec![-0.000977903014, -0.005999999962, -1.234567891, -3.1, 0.0, 2.0],
            joints_max: vec![0.005999999658, 0.000998381260, 1.234567891, 3.1, 0.25, 2.5],
            joints_last: vec![0.004809082239, f64::NAN, -0.5, 1.0, 0.125, f64::INFINITY],
            deviation_max_rad: 0.000999999962,
        };
        let batch = AggregateBatch { arms: (1..=150).map(arm).collect() };
        let payload = batch.encode();
        let per_arm = payload.len() / 150;
        assert!(per_arm <= 160, "{per_arm} bytes an arm: {}", String::from_utf8_lossy(&payload));
        let old_form = serde_json::to_vec(&batch).unwrap().len() / 150;
        assert!(per_arm * 2 < old_form, "{per_arm} vs {old_form} bytes an arm");

        let back = AggregateBatch::decode(&payload).unwrap();
        assert_eq!(back.arms.len(), 150);
        for (got, want) in back.arms.iter().zip(&batch.arms) {
            assert_eq!((&got.arm, got.samples), (&want.arm, want.samples));
            assert_eq!((got.from_ts_us, got.to_ts_us), (want.from_ts_us, want.to_ts_us));
            let close = |a: &[f64], b: &[f64]| {
                a.len() == b.len()
                    && a.iter().zip(b).all(|(x, y)| {
                        (x.is_nan() && !y.is_finite()) || (x - y).abs() <= AGGREGATE_UNIT_RAD / 2.0
                    })
            };
            assert!(close(&got.joints_min, &want.joints_min), "{got:?}");
            assert!(close(&got.joints_max, &want.joints_max), "{got:?}");
            assert!(close(&got.joints_last, &want.joints_last), "{got:?}");
            assert!((got.deviation_max_rad - want.deviation_max_rad).abs() <= 5e-7);
        }

        // Folded on recovery like the first form.
        let mut state = State::default();
        state.apply(&aggregate_event(payload));
        assert_eq!(state.arms["arm-150"].samples_aggregated, 1_810);
    }

    #[test]
    fn an_aggregate_payload_of_an_unknown_format_is_refused() {
        let later = br#"{"v":3,"unit_rad":1e-6,"t0_us":0,"arms":[]}"#;
        assert!(AggregateBatch::decode(later).is_err());
        let no_unit = br#"{"v":2,"unit_rad":0,"t0_us":0,"arms":[]}"#;
        assert!(AggregateBatch::decode(no_unit).is_err());
        assert!(AggregateBatch::decode(b"not json").is_err());
        assert!(AggregateBatch::decode(br#"{"arms":[]}"#).unwrap().arms.is_empty());
    }

    #[test]
    fn event_ids_are_deterministic_and_never_uuid_v7() {
        let a = plan_event_id("arm-001", "u1", 3);
        assert_eq!(a, plan_event_id("arm-001", "u1", 3));
        assert_ne!(a, plan_event_id("arm-001", "u1", 4));
        assert_ne!(a, plan_event_id("arm-002", "u1", 3));
        assert_ne!(cycle_event_id("arm-001", "c"), cycle_event_id("arm-001", "d"));
        for id in [a, cycle_event_id("x", "y")] {
            assert_eq!(id[6] >> 4, 8, "UUIDv8");
            assert_eq!(id[8] >> 6, 0b10, "RFC 4122 variant");
        }
    }
}
