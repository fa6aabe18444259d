//! The HTTP API (CONTRACT.md, arm-controller): plans, status, events, cycles, and a chain
//! check of the log. Until recovery has finished every arm route answers 503 `recovering`.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;
use serde_json::{Value, json};
use service_kit::{ApiError, ApiJson};
use wire::json::{PlanAck, PlanUpdate};

use crate::controller::{Controller, EVENTS_LIMIT_DEFAULT};

/// What the handlers share: the controller, once recovered, and the body limit.
#[derive(Debug, Clone)]
pub struct AppState {
    controller: Arc<OnceLock<Arc<Controller>>>,
    body_limit_bytes: usize,
}

impl Default for AppState {
    fn default() -> Self {
        Self::new(service_kit::config::BODY_LIMIT_BYTES_DEFAULT)
    }
}

impl AppState {
    /// Handlers without a controller yet, refusing bodies declared larger than the limit.
    pub fn new(body_limit_bytes: usize) -> Self {
        Self { controller: Arc::default(), body_limit_bytes }
    }

    /// Hands the recovered controller to the handlers.
    pub fn set(&self, controller: Arc<Controller>) {
        let _ = self.controller.set(controller);
    }

    fn get(&self) -> Result<&Arc<Controller>, ApiError> {
        self.controller
            .get()
            .ok_or_else(|| ApiError::unavailable("recovering", "recovery has not finished"))
    }
}

/// The arm-controller's own routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/arms", get(list_arms))
        .route("/arms/{arm}/plan", put(put_plan).get(get_plan))
        .route("/arms/{arm}/status", get(get_status))
        .route("/arms/{arm}/events", get(get_events))
        .route("/arms/{arm}/cycles", post(post_cycle))
        .route("/log/verify", get(verify))
        .layer(middleware::from_fn_with_state(state.body_limit_bytes, refuse_declared_oversize))
        .with_state(state)
}

/// Refuses a body whose declared length is over the limit at once, without reading it
/// (the shared limit layer counts bytes as they arrive, so a large declared body would
/// otherwise hold the connection until the request time limit).
async fn refuse_declared_oversize(
    State(limit): State<usize>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("body of {} bytes, at most {limit} accepted", declared.unwrap_or(0)),
        )
        .into_response();
    }
    next.run(req).await
}

async fn list_arms(State(s): State<AppState>) -> Result<ApiJson<Value>, ApiError> {
    let ctl = s.get()?;
    Ok(ApiJson(json!({"arms": ctl.arm_ids().collect::<Vec<_>>(), "dof": ctl.settings().dof})))
}

async fn put_plan(
    State(s): State<AppState>,
    Path(arm): Path<String>,
    body: Result<ApiJson<PlanUpdate>, ApiError>,
) -> Result<ApiJson<PlanAck>, ApiError> {
    let started = Instant::now();
    let result = async {
        let ctl = s.get()?;
        ctl.status(&arm)?; // 404 for an unknown arm before any complaint about the body
        let ApiJson(update) = body?;
        ctl.update_plan(&arm, update).await
    }
    .await;
    let status = result.as_ref().map_or_else(|e| e.status.as_u16(), |_| 200);
    crate::record_plan_metrics("http", status, started.elapsed());
    result.map(ApiJson)
}

async fn get_plan(
    State(s): State<AppState>,
    Path(arm): Path<String>,
) -> Result<ApiJson<Value>, ApiError> {
    s.get()?.plan(&arm).map(ApiJson)
}

async fn get_status(
    State(s): State<AppState>,
    Path(arm): Path<String>,
) -> Result<ApiJson<Value>, ApiError> {
    s.get()?.status(&arm).map(ApiJson)
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    from: Option<u64>,
    limit: Option<usize>,
}

async fn get_events(
    State(s): State<AppState>,
    Path(arm): Path<String>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<ApiJson<Value>, ApiError> {
    let ctl = s.get()?.clone();
    let Query(q) = query.map_err(|e| ApiError::bad_request("invalid_query", e.body_text()))?;
    let (from, limit) = (q.from.unwrap_or(1), q.limit.unwrap_or(EVENTS_LIMIT_DEFAULT));
    tokio::task::spawn_blocking(move || ctl.events(&arm, from, limit))
        .await
        .map_err(ApiError::internal)?
        .map(ApiJson)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CycleBody {
    id: String,
}

async fn post_cycle(
    State(s): State<AppState>,
    Path(arm): Path<String>,
    body: Result<ApiJson<CycleBody>, ApiError>,
) -> Result<ApiJson<Value>, ApiError> {
    let ctl = s.get()?;
    ctl.status(&arm)?;
    let ApiJson(body) = body?;
    ctl.record_cycle(&arm, body.id).await.map(ApiJson)
}

async fn verify(State(s): State<AppState>) -> Result<ApiJson<Value>, ApiError> {
    let log = s.get()?.log().clone();
    let report = tokio::task::spawn_blocking(move || log.verify())
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    Ok(ApiJson(json!({
        "ok": report.first_bad.is_none(),
        "anchor_position": report.anchor_position,
        "last_position": report.last_position,
        "events_checked": report.events_checked,
        "first_bad": report.first_bad.map(|(position, reason)| json!({"position": position, "reason": reason})),
    })))
}
