//! The HTTP routes (counters, registers, sets), request validation shared with NATS, and the
//! mapping of crdt-sync refusals to `ApiError`s.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use crdt_sync::sync::LagSample;
use crdt_sync::{DocId, Error as CrdtError, Update};
use serde_json::{Value, json};
use service_kit::{ApiError, ApiJson};
use wire::json::CounterIncrement;

use crate::engine::Engine;

/// Builds the service's routes over `engine`.
pub fn routes(engine: Arc<Engine>) -> Router {
    Router::new()
        .route("/counters/{name}", get(get_counter))
        .route("/counters/{name}/increment", post(increment))
        .route("/registers/{name}", get(get_register).put(put_register))
        .route("/sets/{name}", get(get_set))
        .route("/sets/{name}/{op}", post(set_op))
        .route("/debug/sync", get(debug_sync))
        .with_state(engine)
}

/// Validates an increment body (HTTP or NATS): `amount` a non-zero integer in the `i64`
/// range, `op_id` a non-empty string, nothing else.
pub fn parse_increment(body: &[u8]) -> Result<CounterIncrement, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("body is not JSON: {e}")))?;
    increment_from_value(&value)
}

fn increment_from_value(value: &Value) -> Result<CounterIncrement, ApiError> {
    let Some(object) = value.as_object() else {
        return Err(ApiError::bad_request("invalid_body", "body must be a JSON object"));
    };
    if let Some(key) = object.keys().find(|k| *k != "amount" && *k != "op_id") {
        return Err(ApiError::bad_request("invalid_body", format!("unknown field {key:?}")));
    }
    let amount = match object.get("amount") {
        None => return Err(ApiError::bad_request("missing_amount", "amount is required")),
        Some(Value::Number(n)) => n.as_i64().ok_or_else(|| {
            ApiError::bad_request(
                "invalid_amount",
                format!("amount must be an integer in the i64 range, got {n}"),
            )
        })?,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_amount",
                format!("amount must be an integer, got {other}"),
            ));
        }
    };
    if amount == 0 {
        return Err(ApiError::bad_request("zero_amount", "amount must not be zero"));
    }
    let op_id = match object.get("op_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) | None => {
            return Err(ApiError::bad_request("missing_op_id", "op_id is required and non-empty"));
        }
        Some(_) => return Err(ApiError::bad_request("invalid_op_id", "op_id must be a string")),
    };
    Ok(CounterIncrement { amount, op_id })
}

/// Maps a crdt-sync refusal to its HTTP error.
pub fn crdt_error(err: CrdtError) -> ApiError {
    match err {
        CrdtError::ZeroAmount => ApiError::bad_request("zero_amount", err.to_string()),
        CrdtError::MissingOpId => ApiError::bad_request("missing_op_id", err.to_string()),
        CrdtError::Overflow { value, .. } => {
            ApiError::bad_request("overflow", err.to_string()).with("current", value)
        }
        CrdtError::TooLong { .. } => ApiError::bad_request("too_long", err.to_string()),
        CrdtError::InvalidName { .. } => ApiError::bad_request("invalid_name", err.to_string()),
        CrdtError::OpIdReused { existing, .. } => {
            ApiError::new(StatusCode::CONFLICT, "op_id_reused", err.to_string())
                .with("existing", existing)
        }
        CrdtError::StaleVersion { current, .. } => {
            ApiError::new(StatusCode::CONFLICT, "stale_version", err.to_string())
                .with("current", current)
        }
        CrdtError::WrongKind { .. } => ApiError::bad_request("wrong_kind", err.to_string()),
        CrdtError::IndexOutOfRange { .. } => {
            ApiError::bad_request("index_out_of_range", err.to_string())
        }
        CrdtError::Syncing { .. } => ApiError::unavailable("syncing", err.to_string()),
        other => ApiError::internal(other),
    }
}

fn doc(kind: fn(&str) -> Result<DocId, CrdtError>, name: &str) -> Result<DocId, ApiError> {
    kind(name).map_err(crdt_error)
}

/// Runs an increment through the batcher: `{"name","value"}` once durable.
pub async fn apply_increment(
    engine: &Engine,
    name: &str,
    increment: CounterIncrement,
) -> Result<Value, ApiError> {
    let doc = doc(DocId::counter, name)?;
    let outcome = engine
        .increment(doc, increment.op_id, increment.amount)
        .await
        .map_err(|_| ApiError::unavailable("overloaded", "too many increments waiting"))?;
    let (value, _applied) = outcome.map_err(crdt_error)?;
    Ok(json!({"name": name, "value": value}))
}

async fn increment(
    State(engine): State<Arc<Engine>>,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<Value>,
) -> Result<ApiJson<Value>, ApiError> {
    let increment = increment_from_value(&body)?;
    apply_increment(&engine, &name, increment).await.map(ApiJson)
}

/// Runs a blocking closure off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(ApiError::internal)?
}

async fn get_counter(
    State(engine): State<Arc<Engine>>,
    Path(name): Path<String>,
) -> Result<ApiJson<Value>, ApiError> {
    let doc = doc(DocId::counter, &name)?;
    let value = blocking(move || engine.read(|r| r.counter(&doc)).map_err(crdt_error)).await?;
    let (total, replicas) = match value {
        Some(v) => (v.value, v.replicas),
        None => (0, BTreeMap::new()),
    };
    Ok(ApiJson(json!({"name": name, "value": total, "replicas": replicas})))
}

async fn put_register(
    State(engine): State<Arc<Engine>>,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<Value>,
) -> Result<ApiJson<Value>, ApiError> {
    let doc = doc(DocId::register, &name)?;
    let Some(object) = body.as_object() else {
        return Err(ApiError::bad_request("invalid_body", "body must be a JSON object"));
    };
    let Some(value) = object.get("value").cloned() else {
        return Err(ApiError::bad_request("missing_value", "value is required"));
    };
    let Some(version) = object.get("version").and_then(Value::as_u64) else {
        return Err(ApiError::bad_request("invalid_version", "version must be a u64"));
    };
    let update = blocking(move || {
        engine.update(&doc, |r, now| r.set_register(&doc, &value, version, now)).map_err(crdt_error)
    })
    .await?;
    Ok(ApiJson(json!({
        "name": name,
        "value": update.value.value,
        "version": update.value.version,
        "applied": update.applied,
    })))
}

async fn get_register(
    State(engine): State<Arc<Engine>>,
    Path(name): Path<String>,
) -> Result<ApiJson<Value>, ApiError> {
    let doc = doc(DocId::register, &name)?;
    let value = blocking(move || engine.read(|r| r.register(&doc)).map_err(crdt_error)).await?;
    match value {
        Some(v) => Ok(ApiJson(json!({"name": name, "value": v.value, "version": v.version}))),
        None => Err(ApiError::not_found(format!("register {name:?} was never set"))),
    }
}

async fn set_op(
    State(engine): State<Arc<Engine>>,
    Path((name, op)): Path<(String, String)>,
    ApiJson(body): ApiJson<Value>,
) -> Result<ApiJson<Value>, ApiError> {
    let doc = doc(DocId::set, &name)?;
    let add = match op.as_str() {
        "add" => true,
        "remove" => false,
        _ => return Err(ApiError::not_found("no such route")),
    };
    let Some(member) = body.get("member").and_then(Value::as_str).map(str::to_owned) else {
        return Err(ApiError::bad_request("missing_member", "member (a string) is required"));
    };
    let (applied, members) = blocking(move || {
        let update: Update<bool> = engine
            .update(&doc, |r, now| {
                if add { r.set_add(&doc, &member, now) } else { r.set_remove(&doc, &member, now) }
            })
            .map_err(crdt_error)?;
        let members = engine.read(|r| r.set_members(&doc)).map_err(crdt_error)?;
        Ok((update.applied, members))
    })
    .await?;
    Ok(ApiJson(json!({"name": name, "members": members, "applied": applied})))
}

async fn get_set(
    State(engine): State<Arc<Engine>>,
    Path(name): Path<String>,
) -> Result<ApiJson<Value>, ApiError> {
    let doc = doc(DocId::set, &name)?;
    let members =
        blocking(move || engine.read(|r| r.set_members(&doc)).map_err(crdt_error)).await?;
    Ok(ApiJson(json!({"name": name, "members": members})))
}

/// Lag samples per point of `/debug/sync`'s lag curve (`max_per_run`).
pub const LAG_CURVE_SAMPLES: usize = 500;

/// Sync-layer figures for operators and the bench: lag percentiles and recent course,
/// counters, log position.
/// `?docs=true` adds each document's saved size (costs a save of each).
async fn debug_sync(
    State(engine): State<Arc<Engine>>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<ApiJson<Value>, ApiError> {
    let with_docs = query.get("docs").is_some_and(|v| v == "true");
    blocking(move || {
        let metrics = engine.read(|r| r.metrics());
        let mut body = json!({
            "node": engine.node_id(),
            "synced": engine.synced().is_some(),
            "log_position": metrics.log_position,
            "changes": metrics.changes,
            "automerge_ops": metrics.automerge_ops,
            "remote_changes": metrics.remote_changes,
            "folded_ops": metrics.folded_ops,
            "epoch": metrics.epoch,
            "epochs_entered": metrics.epochs_entered,
            "archives_wanted": metrics.archives_wanted,
            "disk_bytes": engine.disk_bytes(),
        });
        if with_docs {
            let docs: BTreeMap<String, usize> = engine.read(|r| {
                r.docs().iter().filter_map(|d| Some((d.to_string(), r.doc_bytes(d)?))).collect()
            });
            body["doc_bytes"] = json!(docs);
        }
        if let Some(synced) = engine.synced() {
            let samples = synced.lag_samples();
            let mut lag: Vec<u64> = samples.iter().map(|s| s.total_us / 1_000).collect();
            // The lag's recent course: the worst of each run of samples, oldest first.
            let curve: Vec<u64> = lag
                .chunks(LAG_CURVE_SAMPLES)
                .map(|run| run.iter().copied().max().unwrap_or(0))
                .collect();
            lag.sort_unstable();
            let pick = |q: f64| percentile(&lag, q);
            let m = synced.metrics();
            body["lag_ms"] = json!({
                "samples": lag.len(), "p50": pick(0.5), "p99": pick(0.99), "max": pick(1.0),
                "max_per_run": curve, "run_samples": LAG_CURVE_SAMPLES,
                "stages_us": lag_stages(&samples),
            });
            body["sync"] = json!({
                "batches_published": m.batches_published,
                "batches_dropped": m.batches_dropped,
                "batches_received": m.batches_received,
                "messages_rejected": m.messages_rejected,
                "sync_sent": m.sync_sent,
                "sync_received": m.sync_received,
                "heads_sent": m.heads_sent,
                "heads_lacking": m.heads_lacking,
                "archive_requests_sent": m.archive_requests_sent,
                "archive_replies_sent": m.archive_replies_sent,
                "archive_chunks_received": m.archive_chunks_received,
            });
        }
        Ok(ApiJson(body))
    })
    .await
}

/// The `q` quantile (0..=1, nearest rank) of sorted `values`; `None` if there are none.
fn percentile(values: &[u64], q: f64) -> Option<u64> {
    (!values.is_empty()).then(|| values[((values.len() - 1) as f64 * q).round() as usize])
}

/// Percentiles (µs) of each stage of the replication lag (see `crdt_sync::sync::LagSample`).
fn lag_stages(samples: &[LagSample]) -> Value {
    let summary = |mut values: Vec<u64>| -> Value {
        if values.is_empty() {
            return Value::Null;
        }
        values.sort_unstable();
        let pick = |q: f64| percentile(&values, q);
        json!({"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": pick(1.0)})
    };
    json!({
        "total": summary(samples.iter().map(|s| s.total_us).collect()),
        "queued": summary(samples.iter().filter_map(|s| s.queued_us).collect()),
        "transit": summary(samples.iter().filter_map(|s| s.transit_us).collect()),
        "waited": summary(samples.iter().map(|s| s.waited_us).collect()),
        "applied": summary(samples.iter().map(|s| s.applied_us).collect()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(body: &str) -> &'static str {
        parse_increment(body.as_bytes()).unwrap_err().code
    }

    #[test]
    fn increments_are_validated_with_clear_codes() {
        let ok = parse_increment(br#"{"amount": -3, "op_id": "x"}"#).unwrap();
        assert_eq!((ok.amount, ok.op_id.as_str()), (-3, "x"));
        assert_eq!(code(r#"{"amount": 0, "op_id": "x"}"#), "zero_amount");
        assert_eq!(code(r#"{"amount": 1.5, "op_id": "x"}"#), "invalid_amount");
        assert_eq!(code(r#"{"amount": "1", "op_id": "x"}"#), "invalid_amount");
        assert_eq!(code(r#"{"amount": 9223372036854775808, "op_id": "x"}"#), "invalid_amount");
        assert_eq!(code(r#"{"amount": 1}"#), "missing_op_id");
        assert_eq!(code(r#"{"amount": 1, "op_id": ""}"#), "missing_op_id");
        assert_eq!(code(r#"{"amount": 1, "op_id": 7}"#), "invalid_op_id");
        assert_eq!(code(r#"{"op_id": "x"}"#), "missing_amount");
        assert_eq!(code(r#"{"amount": 1, "op_id": "x", "extra": 1}"#), "invalid_body");
        assert_eq!(code("[1]"), "invalid_body");
        assert_eq!(code("{not json"), "invalid_json");
    }
}
