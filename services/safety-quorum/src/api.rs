//! Engage, clear and reads (shared by HTTP and NATS), and the HTTP router.
//!
//! Engage: validate, publish `edge.safety.trip` at once, propose, answer once committed or
//! 503 `no_quorum` after the commit timeout (a retry with the same `request_id` is safe: the
//! state machine answers a repeated id with its first result). Clear: validate, propose,
//! answer once committed; no trip ever clears; a clear needs a reason. Reads: ReadIndex
//! (linearizable) unless `?stale=true`. With a token file (`--auth-tokens-file`), HTTP
//! engage needs an authenticated caller and clear the `safety` role (DESIGN §2.7), and the
//! audit records the caller's name.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use raft_safety::estop::{AuditRecord, TEXT_FIELD_BYTES_MAX};
use raft_safety::{
    Applied, EStop, EStopCommand, EStopQuery, EStopResponse, EStopState, ProposeError, RaftHandle,
    ReadError,
};
use serde_json::{Value, json};
use service_kit::auth::Tokens;
use service_kit::{ApiError, ApiJson};
use wire::json::{EstopClear, EstopRequest, SafetyTrip};

use crate::Config;

/// Bound on publishing a trip: a NATS client that is down never delays the proposal by more.
pub const TRIP_PUBLISH_TIMEOUT_MS: u64 = 20;
/// Pause between two proposals of the same request after an "outcome unknown" answer.
pub const PROPOSE_RETRY_PAUSE_MS: u64 = 5;
/// The role a caller needs to clear the e-stop when authentication is on.
pub const CLEAR_ROLE: &str = "safety";

/// What handlers share; cheap to clone.
#[derive(Clone)]
pub struct App {
    raft: RaftHandle,
    nats: Option<async_nats::Client>,
    commit_timeout: Duration,
    peers: BTreeMap<u64, SocketAddr>,
    auth: Option<Arc<Tokens>>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("raft", &self.raft).finish()
    }
}

/// Which command, for metrics.
#[derive(Debug, Clone, Copy)]
enum Op {
    Engage,
    Clear,
}

impl Op {
    fn label(self) -> &'static str {
        match self {
            Op::Engage => "engage",
            Op::Clear => "clear",
        }
    }
}

impl App {
    /// Handlers over `raft`; `nats` carries trips (None in router-only tests).
    pub fn new(raft: RaftHandle, nats: Option<async_nats::Client>, config: &Config) -> Self {
        Self {
            raft,
            nats,
            commit_timeout: config.commit_timeout(),
            peers: config.peers.0.clone(),
            auth: None,
        }
    }

    /// Requires bearer tokens from `tokens` on HTTP engage and clear.
    pub fn with_auth(mut self, tokens: Tokens) -> Self {
        self.auth = Some(Arc::new(tokens));
        self
    }

    /// As [`App::new`] with explicit settings (tests).
    pub fn with_settings(
        raft: RaftHandle,
        nats: Option<async_nats::Client>,
        commit_timeout: Duration,
        peers: BTreeMap<u64, SocketAddr>,
    ) -> Self {
        Self { raft, nats, commit_timeout, peers, auth: None }
    }

    /// Engages the e-stop: trip first, then commit. The audit records `source` as who.
    pub async fn engage(&self, request: EstopRequest) -> Result<Value, ApiError> {
        let who = request.source.clone();
        self.engage_as(request, who).await
    }

    /// [`App::engage`] recording `who` (the authenticated caller) in the audit.
    async fn engage_as(&self, request: EstopRequest, who: String) -> Result<Value, ApiError> {
        check_text("reason", &request.reason)?;
        check_text("source", &request.source)?;
        check_text("request_id", &request.request_id)?;
        self.trip(&request).await;
        let command = EStopCommand::Engage {
            request_id: request.request_id.clone(),
            reason: request.reason,
            who,
            source: request.source,
            at_ms: now_ms(),
        };
        let applied = self.commit(command.encode(), Op::Engage).await?;
        let response = decode_response(&applied)?;
        tracing::info!(request_id = %request.request_id, term = response.term, index = response.index, duplicate = response.duplicate, "e-stop engage committed");
        Ok(answer(&response))
    }

    /// Clears the e-stop once committed; `reason` is required (DESIGN §2.7).
    pub async fn clear(&self, request: EstopClear) -> Result<Value, ApiError> {
        check_text("by", &request.by)?;
        check_text("request_id", &request.request_id)?;
        let Some(reason) = request.reason else {
            return Err(ApiError::bad_request("missing_reason", "a clear needs a reason"));
        };
        check_text("reason", &reason)?;
        let command = EStopCommand::Clear {
            request_id: request.request_id.clone(),
            by: request.by.clone(),
            reason,
            at_ms: now_ms(),
        };
        let applied = self.commit(command.encode(), Op::Clear).await?;
        let response = decode_response(&applied)?;
        tracing::info!(request_id = %request.request_id, by = %request.by, term = response.term, index = response.index, duplicate = response.duplicate, "e-stop clear committed");
        Ok(answer(&response))
    }

    async fn trip(&self, request: &EstopRequest) {
        let Some(nats) = &self.nats else { return };
        let trip = SafetyTrip {
            request_id: request.request_id.clone(),
            reason: request.reason.clone(),
            source: request.source.clone(),
            ts: crate::now_us(),
        };
        let body = serde_json::to_vec(&trip).expect("a trip serialises");
        let sent = tokio::time::timeout(
            Duration::from_millis(TRIP_PUBLISH_TIMEOUT_MS),
            nats.publish(wire::subjects::SAFETY_TRIP, body.into()),
        )
        .await;
        let outcome = match sent {
            Ok(Ok(())) => "sent",
            Ok(Err(_)) | Err(_) => "failed",
        };
        if outcome == "failed" {
            tracing::warn!(request_id = %request.request_id, "e-stop trip not sent (NATS); proposing anyway");
        }
        metrics::counter!("keel_safety_trips_total", "outcome" => outcome).increment(1);
    }

    /// Proposes until committed or the commit timeout passes. Answers that leave the outcome
    /// unknown (leader changed, proposal dropped) are retried: the command is idempotent.
    async fn commit(&self, command: Vec<u8>, op: Op) -> Result<Applied, ApiError> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + self.commit_timeout);
        loop {
            let outcome = tokio::time::timeout_at(deadline, self.raft.propose(command.clone()));
            match outcome.await {
                Ok(Ok(applied)) => {
                    metrics::counter!("keel_safety_commits_total", "op" => op.label()).increment(1);
                    metrics::histogram!("keel_safety_commit_seconds", "op" => op.label())
                        .record(started.elapsed().as_secs_f64());
                    return Ok(applied);
                }
                Ok(Err(
                    ProposeError::LeadershipLost | ProposeError::Timeout | ProposeError::NoQuorum,
                )) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(PROPOSE_RETRY_PAUSE_MS)).await;
                }
                Ok(Err(
                    ProposeError::LeadershipLost | ProposeError::Timeout | ProposeError::NoQuorum,
                ))
                | Err(_) => break,
                Ok(Err(ProposeError::Busy(max))) => {
                    return Err(ApiError::unavailable(
                        "busy",
                        format!("too many requests waiting (max {max})"),
                    ));
                }
                Ok(Err(error @ ProposeError::TooLarge { .. })) => {
                    return Err(ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        error.to_string(),
                    ));
                }
                Ok(Err(ProposeError::Stopped)) => {
                    return Err(ApiError::unavailable("stopped", "the raft member stopped"));
                }
                Ok(Err(error)) => return Err(ApiError::internal(error)),
            }
        }
        metrics::counter!("keel_safety_no_quorum_total", "op" => op.label()).increment(1);
        let status = self.raft.status();
        Err(ApiError::unavailable(
            "no_quorum",
            format!(
                "not committed within {} ms: no majority reachable (retry with the same request_id)",
                self.commit_timeout.as_millis()
            ),
        )
        .with("leader", status.leader)
        .with("term", status.term))
    }

    /// Runs a query, linearizable (ReadIndex) unless `stale`.
    async fn query(&self, query: EStopQuery, stale: bool) -> Result<Vec<u8>, ApiError> {
        let encoded = query.encode();
        let result = if stale {
            self.raft.read_local(encoded).await
        } else {
            match tokio::time::timeout(self.commit_timeout, self.raft.read(encoded)).await {
                Ok(result) => result,
                Err(_) => Err(ReadError::NoQuorum),
            }
        };
        result.map_err(|error| match error {
            ReadError::NoQuorum | ReadError::Timeout => {
                metrics::counter!("keel_safety_no_quorum_total", "op" => "read").increment(1);
                ApiError::unavailable(
                    "no_quorum",
                    format!(
                        "no majority confirmed the read within {} ms (use ?stale=true for the local state)",
                        self.commit_timeout.as_millis()
                    ),
                )
            }
            ReadError::Busy(max) => {
                ApiError::unavailable("busy", format!("too many requests waiting (max {max})"))
            }
            ReadError::Stopped => ApiError::unavailable("stopped", "the raft member stopped"),
            other => ApiError::internal(other),
        })
    }

    /// The register.
    pub async fn state(&self, stale: bool) -> Result<EStopState, ApiError> {
        let bytes = self.query(EStopQuery::State, stale).await?;
        EStop::decode_state(&bytes).map_err(ApiError::internal)
    }

    /// The audit list, oldest first.
    pub async fn audit(&self, stale: bool) -> Result<Vec<AuditRecord>, ApiError> {
        let bytes = self.query(EStopQuery::Audit, stale).await?;
        serde_json::from_slice(&bytes).map_err(ApiError::internal)
    }

    /// `GET /cluster`.
    pub fn cluster(&self) -> Value {
        let status = self.raft.status();
        let peers: BTreeMap<String, String> =
            self.peers.iter().map(|(id, addr)| (id.to_string(), addr.to_string())).collect();
        json!({
            "id": status.id,
            "leader": status.leader,
            "term": status.term,
            "commit": status.commit,
            "applied": status.applied,
            "role": status.role,
            "members": status.members(),
            "peers": peers,
        })
    }
}

fn decode_response(applied: &Applied) -> Result<EStopResponse, ApiError> {
    let response = EStopResponse::decode(&applied.response).map_err(ApiError::internal)?;
    if let Some(error) = &response.error {
        // Validated before proposing, so a rejection here is a bug on one side or the other.
        return Err(ApiError::internal(format!("state machine rejected the command: {error}")));
    }
    Ok(response)
}

fn answer(response: &EStopResponse) -> Value {
    json!({
        "engaged": response.engaged,
        "term": response.term,
        "index": response.index,
        "changed": response.changed,
        "duplicate": response.duplicate,
    })
}

/// Non-empty, at most [`TEXT_FIELD_BYTES_MAX`] bytes, no control characters.
fn check_text(field: &'static str, value: &str) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        return Err(ApiError::bad_request("invalid_body", format!("{field} must not be empty")));
    }
    if value.len() > TEXT_FIELD_BYTES_MAX {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("{field} is longer than {TEXT_FIELD_BYTES_MAX} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid_body",
            format!("{field} must not contain control characters"),
        ));
    }
    Ok(())
}

fn now_ms() -> u64 {
    crate::now_us() / 1_000
}

/// Parses the only query parameter the reads take: `stale=true|false`.
fn stale_param(query: Option<String>) -> Result<bool, ApiError> {
    let mut stale = false;
    for pair in query.as_deref().unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=').unwrap_or((pair, "")) {
            ("stale", "true" | "1") => stale = true,
            ("stale", "false" | "0") => stale = false,
            ("stale", other) => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("stale must be true or false, not {other:?}"),
                ));
            }
            (key, _) => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("unknown query parameter {key:?}"),
                ));
            }
        }
    }
    Ok(stale)
}

/// The HTTP routes of this service (without the shared ones).
pub fn router(app: App) -> axum::Router {
    axum::Router::new()
        .route("/estop", post(post_engage).get(get_estop))
        .route("/estop/clear", post(post_clear))
        .route("/estop/audit", get(get_audit))
        .route("/cluster", get(get_cluster))
        .with_state(app)
}

async fn post_engage(
    State(app): State<App>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<EstopRequest>,
) -> Result<ApiJson<Value>, ApiError> {
    let who = match &app.auth {
        Some(tokens) => tokens.identify(&headers)?.name.clone(),
        None => request.source.clone(),
    };
    app.engage_as(request, who).await.map(ApiJson)
}

async fn post_clear(
    State(app): State<App>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<EstopClear>,
) -> Result<ApiJson<Value>, ApiError> {
    if let Some(tokens) = &app.auth {
        let caller = tokens.require(&headers, CLEAR_ROLE)?;
        if caller.name != request.by {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("by is {:?}, the caller is {:?}", request.by, caller.name),
            ));
        }
    }
    app.clear(request).await.map(ApiJson)
}

async fn get_estop(
    State(app): State<App>,
    RawQuery(query): RawQuery,
) -> Result<ApiJson<Value>, ApiError> {
    let stale = stale_param(query)?;
    let state = app.state(stale).await?;
    let leader = app.raft.status().leader;
    Ok(ApiJson(json!({
        "engaged": state.engaged,
        "reason": state.reason,
        "term": state.term,
        "index": state.index,
        "leader": leader,
        "source": state.source,
        "who": state.who,
        "at_ms": state.at_ms,
        "request_id": state.request_id,
        "stale": stale,
    })))
}

async fn get_audit(
    State(app): State<App>,
    RawQuery(query): RawQuery,
) -> Result<ApiJson<Value>, ApiError> {
    let stale = stale_param(query)?;
    let records = app.audit(stale).await?;
    Ok(ApiJson(json!({ "records": records, "stale": stale })))
}

async fn get_cluster(State(app): State<App>) -> ApiJson<Value> {
    ApiJson(app.cluster())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use raft_safety::{MemStore, MemoryTransport, Node, NodeConfig};
    use tower::ServiceExt;

    /// A single member on an in-memory store, its router with the shared layers.
    async fn single() -> (axum::Router, RaftHandle) {
        single_with(None).await
    }

    async fn single_with(auth: Option<Tokens>) -> (axum::Router, RaftHandle) {
        let node = Node::new(NodeConfig::new(1, vec![1]), MemStore::new(), EStop::new()).unwrap();
        let (_tx, rx) = raft_safety::inbound_channel();
        let (raft, _task) = raft_safety::spawn(node, MemoryTransport::new(), rx);
        raft.wait_for(Duration::from_secs(5), |s| s.leader == Some(1)).await.unwrap();
        let peers = BTreeMap::from([(1, "127.0.0.1:1".parse().unwrap())]);
        let mut app = App::with_settings(raft.clone(), None, Duration::from_secs(2), peers);
        if let Some(tokens) = auth {
            app = app.with_auth(tokens);
        }
        let limits =
            service_kit::http::HttpLimits { body_limit_bytes: 4096, request_timeout_ms: 5_000 };
        let router =
            service_kit::http::with_base(router(app), service_kit::Readiness::new(), limits);
        (router, raft)
    }

    async fn call(app: &axum::Router, method: &str, path: &str, body: &str) -> (u16, Value) {
        call_as(app, None, method, path, body).await
    }

    async fn call_as(
        app: &axum::Router,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: &str,
    ) -> (u16, Value) {
        let mut request =
            Request::builder().method(method).uri(path).header("content-type", "application/json");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request.body(Body::from(body.to_owned())).unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    #[tokio::test]
    async fn with_a_token_file_engage_needs_a_caller_and_clear_the_safety_role() {
        let tokens = Tokens::parse(&format!(
            "alice safety {}\npanel-3 operator {}\n",
            service_kit::auth::hash_token("alice-secret"),
            service_kit::auth::hash_token("panel-secret")
        ))
        .unwrap();
        let (app, _raft) = single_with(Some(tokens)).await;
        let engage = r#"{"reason":"person in cell","source":"panel-3","request_id":"r1"}"#;
        let clear = r#"{"by":"alice","request_id":"c1","reason":"cell checked"}"#;
        for (token, path, body, status, error) in [
            (None, "/estop", engage, 401, "unauthenticated"),
            (Some("wrong"), "/estop", engage, 401, "unauthenticated"),
            (None, "/estop/clear", clear, 401, "unauthenticated"),
            (Some("panel-secret"), "/estop/clear", clear, 403, "forbidden"),
            (
                Some("alice-secret"),
                "/estop/clear",
                r#"{"by":"bob","request_id":"c1","reason":"x"}"#,
                403,
                "forbidden",
            ),
        ] {
            let (got, answer) = call_as(&app, token, "POST", path, body).await;
            assert_eq!((got, answer["error"].as_str()), (status, Some(error)), "{path} {body}");
        }
        let (_, state) = call(&app, "GET", "/estop", "").await;
        assert_eq!(state["engaged"], false, "a refused request changes nothing");

        let (status, _) = call_as(&app, Some("panel-secret"), "POST", "/estop", engage).await;
        assert_eq!(status, 200);
        let (_, state) = call(&app, "GET", "/estop", "").await;
        assert_eq!(
            (state["engaged"].clone(), state["who"].clone()),
            (json!(true), json!("panel-3"))
        );
        let (status, _) = call_as(&app, Some("alice-secret"), "POST", "/estop/clear", clear).await;
        assert_eq!(status, 200);
        let (_, state) = call(&app, "GET", "/estop", "").await;
        assert_eq!(
            (state["engaged"].clone(), state["who"].clone()),
            (json!(false), json!("alice"))
        );
    }

    #[tokio::test]
    async fn engage_clear_and_reads_round_trip() {
        let (app, _raft) = single().await;
        let engage = r#"{"reason":"person in cell","source":"panel-3","request_id":"r1"}"#;
        let (status, first) = call(&app, "POST", "/estop", engage).await;
        assert_eq!(status, 200, "{first}");
        assert_eq!(first["engaged"], true);
        assert!(first["index"].as_u64().unwrap() > 1 && first["term"].as_u64().unwrap() >= 1);
        let (_, again) = call(&app, "POST", "/estop", engage).await;
        assert_eq!(
            (again["index"].clone(), again["duplicate"].clone()),
            (first["index"].clone(), json!(true))
        );

        let (status, state) = call(&app, "GET", "/estop", "").await;
        assert_eq!(status, 200);
        assert_eq!(
            (state["engaged"].clone(), state["reason"].clone()),
            (json!(true), json!("person in cell"))
        );
        assert_eq!(
            (state["index"].clone(), state["leader"].clone()),
            (first["index"].clone(), json!(1))
        );

        let (status, cleared) =
            call(&app, "POST", "/estop/clear", r#"{"by":"bob","request_id":"c1","reason":"ok"}"#)
                .await;
        assert_eq!((status, cleared["engaged"].clone()), (200, json!(false)));
        let (_, stale) = call(&app, "GET", "/estop?stale=true", "").await;
        assert_eq!((stale["engaged"].clone(), stale["who"].clone()), (json!(false), json!("bob")));
        let (_, audit) = call(&app, "GET", "/estop/audit", "").await;
        let actions: Vec<&str> = audit["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["action"].as_str().unwrap())
            .collect();
        assert_eq!(actions, ["engage", "clear"]);
        let (_, cluster) = call(&app, "GET", "/cluster", "").await;
        assert_eq!((cluster["id"].clone(), cluster["leader"].clone()), (json!(1), json!(1)));
        assert_eq!(cluster["members"], json!([1]));
    }

    #[tokio::test]
    async fn bad_input_is_a_4xx_and_proposes_nothing() {
        let (app, raft) = single().await;
        let before = raft.status().commit;
        let long = "x".repeat(TEXT_FIELD_BYTES_MAX + 1);
        let cases: Vec<(&str, String, u16, &str)> = vec![
            ("/estop", "{not json".into(), 400, "invalid_json"),
            ("/estop", r#"{"reason":"r","source":"s"}"#.into(), 400, "invalid_body"),
            (
                "/estop",
                r#"{"reason":"r","source":"s","request_id":"x","who":"w"}"#.into(),
                400,
                "invalid_body",
            ),
            (
                "/estop",
                r#"{"reason":"","source":"s","request_id":"x"}"#.into(),
                400,
                "invalid_body",
            ),
            (
                "/estop",
                r#"{"reason":"r","source":"s","request_id":"  "}"#.into(),
                400,
                "invalid_body",
            ),
            (
                "/estop",
                format!(r#"{{"reason":"{long}","source":"s","request_id":"x"}}"#),
                400,
                "invalid_body",
            ),
            (
                "/estop",
                r#"{"reason":"a\u0007b","source":"s","request_id":"x"}"#.into(),
                400,
                "invalid_body",
            ),
            (
                "/estop",
                format!(r#"{{"reason":"{}","source":"s","request_id":"x"}}"#, "y".repeat(8192)),
                413,
                "body_too_large",
            ),
            ("/estop", "[]".into(), 400, "invalid_body"),
            ("/estop/clear", r#"{"request_id":"c"}"#.into(), 400, "invalid_body"),
            ("/estop/clear", r#"{"by":"b","request_id":"c"}"#.into(), 400, "missing_reason"),
            ("/estop/clear", r#"{"by":"","request_id":"c"}"#.into(), 400, "invalid_body"),
            (
                "/estop/clear",
                r#"{"by":"b","request_id":"c","reason":""}"#.into(),
                400,
                "invalid_body",
            ),
            (
                "/estop/clear",
                r#"{"by":"b","request_id":"c","force":true}"#.into(),
                400,
                "invalid_body",
            ),
        ];
        for (path, body, code, error) in cases {
            let (status, answer) = call(&app, "POST", path, &body).await;
            assert_eq!(
                (status, answer["error"].as_str()),
                (code, Some(error)),
                "{path} {body:.80}"
            );
            assert!(answer["message"].is_string());
        }
        for query in ["/estop?stale=maybe", "/estop?fresh=1", "/estop/audit?x"] {
            let (status, answer) = call(&app, "GET", query, "").await;
            assert_eq!((status, answer["error"].as_str()), (400, Some("invalid_query")), "{query}");
        }
        // Nothing reached the log.
        assert_eq!(raft.status().commit, before);
        let (_, audit) = call(&app, "GET", "/estop/audit", "").await;
        assert_eq!(audit["records"], json!([]));
    }
}
