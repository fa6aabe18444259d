//! The HTTP side every service shares: `/healthz`, `/readyz`, `/metrics`, a JSON 404,
//! body-size and time limits, and serving with graceful shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;

use crate::error::ApiError;
use crate::readiness::Readiness;
use crate::shutdown::Shutdown;

/// Limits applied to every request.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Largest accepted body in bytes (413 `body_too_large` above it).
    pub body_limit_bytes: usize,
    /// Time limit per request (503 `timeout` after it).
    pub request_timeout_ms: u64,
}

impl From<&crate::CommonArgs> for HttpLimits {
    fn from(args: &crate::CommonArgs) -> Self {
        Self {
            body_limit_bytes: args.body_limit_bytes,
            request_timeout_ms: args.request_timeout_ms,
        }
    }
}

/// Adds the shared routes and layers to a service's router.
pub fn with_base(app: Router, readiness: Readiness, limits: HttpLimits) -> Router {
    let registry = crate::metrics::registry();
    let base = Router::new()
        .route("/healthz", get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .with_state(readiness)
        .route("/metrics", get(move || std::future::ready(registry.render())));
    let timeout = Duration::from_millis(limits.request_timeout_ms);
    let body_limit_bytes = limits.body_limit_bytes;
    app.merge(base)
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(middleware::from_fn(move |req: Request, next: Next| time_limit(req, next, timeout)))
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            refuse_declared_oversize(req, next, body_limit_bytes)
        }))
        .layer(DefaultBodyLimit::max(limits.body_limit_bytes))
}

/// Answers 413 at once when the declared `Content-Length` exceeds the limit, before any of
/// the body is read (a handler that reads the body would refuse it anyway, but only after
/// the client has sent it).
async fn refuse_declared_oversize(req: Request, next: Next, body_limit_bytes: usize) -> Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(len) if len > body_limit_bytes as u64 => {
            let mut response = ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("body of {len} bytes exceeds the {body_limit_bytes}-byte limit"),
            )
            .into_response();
            // The unread body makes the connection unusable for another request.
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            response
        }
        _ => next.run(req).await,
    }
}

async fn readyz(State(readiness): State<Readiness>) -> Response {
    let report = readiness.report();
    let status = if report.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(report)).into_response()
}

async fn time_limit(req: Request, next: Next, timeout: Duration) -> Response {
    match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::unavailable("timeout", "request took too long").into_response(),
    }
}

/// Binds `addr`, serves `app` until `shutdown` fires, then stops accepting and lets
/// in-flight requests finish.
pub async fn serve(addr: SocketAddr, app: Router, shutdown: Shutdown) -> anyhow::Result<()> {
    serve_on(bind(addr).await?, app, shutdown).await
}

/// Binds the HTTP listener (for a service that must listen before `app` can do its work,
/// e.g. to answer `/readyz` while it recovers).
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|err| anyhow::anyhow!("cannot listen on {addr}: {err}"))?;
    tracing::info!(%addr, "http listening");
    Ok(listener)
}

/// [`serve`] on a listener from [`bind`]. Every accepted connection has `TCP_NODELAY` set:
/// a response is one write and leaves at once, never held for the client's delayed ACK.
pub async fn serve_on(
    listener: TcpListener,
    app: Router,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let listener = listener.tap_io(|stream| {
        if let Err(err) = stream.set_nodelay(true) {
            tracing::warn!(%err, "cannot set TCP_NODELAY");
        }
    });
    axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.wait().await }).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ApiJson;
    use crate::readiness::{ComponentState, Role};
    use axum::body::Body;
    use axum::routing::post;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn limits() -> HttpLimits {
        HttpLimits { body_limit_bytes: 1024, request_timeout_ms: 200 }
    }

    async fn call(app: Router, req: Request<Body>) -> (StatusCode, serde_json::Value) {
        let resp = app.oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    fn get_req(path: &str) -> Request<Body> {
        Request::get(path).body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn readyz_follows_gating_components_and_lists_all() {
        let readiness = Readiness::new();
        readiness.register("recovered", Role::Gating);
        readiness.register("nats", Role::Degrading);
        let app = with_base(Router::new(), readiness.clone(), limits());
        let (status, body) = call(app.clone(), get_req("/readyz")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["components"]["recovered"], "pending");
        readiness.set("recovered", ComponentState::Ok);
        readiness.set("nats", ComponentState::Down("disconnected"));
        let (status, body) = call(app, get_req("/readyz")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            serde_json::json!({"ready": true, "components": {"nats": "disconnected", "recovered": "ok"}})
        );
    }

    #[tokio::test]
    async fn errors_are_json_with_a_code() {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Body1 {
            n: u32,
        }
        let app = Router::new()
            .route("/echo", post(|ApiJson(b): ApiJson<Body1>| async move { axum::Json(b.n) }));
        let app = with_base(app, Readiness::new(), limits());
        let post_req = |body: Vec<u8>| {
            Request::post("/echo")
                .header("content-type", "application/json")
                .body(Body::from(body))
                .unwrap()
        };
        let (status, body) = call(app.clone(), get_req("/nope")).await;
        assert_eq!((status, body["error"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
        let (status, body) = call(app.clone(), post_req(b"{not json".to_vec())).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_json"))
        );
        let (status, body) = call(app.clone(), post_req(br#"{"n": 1, "x": 2}"#.to_vec())).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_body"))
        );
        let big = format!(r#"{{"n": 1, "pad": "{}"}}"#, "x".repeat(4096));
        let (status, body) = call(app.clone(), post_req(big.into_bytes())).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, Some("body_too_large"))
        );
        let declared = Request::post("/echo")
            .header("content-type", "application/json")
            .header("content-length", "10485760")
            .body(Body::empty())
            .unwrap();
        let (status, body) = call(app.clone(), declared).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, Some("body_too_large"))
        );
        let (status, body) = call(app, post_req(br#"{"n": 5}"#.to_vec())).await;
        assert_eq!((status, body), (StatusCode::OK, serde_json::json!(5)));
    }

    #[tokio::test]
    async fn slow_requests_get_a_503_timeout() {
        let app = Router::new().route(
            "/slow",
            get(|| async {
                std::future::pending::<()>().await;
            }),
        );
        let app = with_base(app, Readiness::new(), limits());
        let (status, body) = call(app, get_req("/slow")).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, Some("timeout"))
        );
    }

    #[tokio::test]
    async fn metrics_render_prometheus_text() {
        let app = with_base(Router::new(), Readiness::new(), limits());
        metrics::counter!("keel_test_total").increment(1);
        let resp = app.oneshot(get_req("/metrics")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let text = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&text).contains("keel_test_total 1"));
    }
}
