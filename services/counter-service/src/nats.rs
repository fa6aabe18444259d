//! NATS increments: `edge.counter.{name}.inc` in queue group [`QUEUE_GROUP`] (each increment is
//! handled by one replica), answered on the reply subject when there is one.
//!
//! A reply is `{"name","value"}` once durable, or `{"error","message","status"}`; malformed
//! payloads are counted (`keel_counter_nats_rejected_total`) and logged, and change nothing.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use service_kit::ApiError;
use tokio::sync::Semaphore;

use crate::api::{apply_increment, parse_increment};
use crate::engine::Engine;

/// Queue group of every replica's increment subscription.
pub const QUEUE_GROUP: &str = "counter-service";
/// Subscription filter.
pub const INCREMENT_SUBJECTS: &str = "edge.counter.*.inc";
/// Increments from NATS in flight at once; the subscription waits beyond it.
pub const NATS_IN_FLIGHT_MAX: usize = 4_096;

/// Serves increments from NATS until the client is dropped.
pub async fn serve_increments(engine: Arc<Engine>, client: async_nats::Client) {
    let mut subscriber = loop {
        match client.queue_subscribe(INCREMENT_SUBJECTS, QUEUE_GROUP.to_owned()).await {
            Ok(subscriber) => break subscriber,
            Err(err) => {
                tracing::warn!(error = %err, "cannot subscribe to increments; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        }
    };
    let in_flight = Arc::new(Semaphore::new(NATS_IN_FLIGHT_MAX));
    while let Some(message) = subscriber.next().await {
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        let engine = engine.clone();
        let client = client.clone();
        tokio::spawn(async move {
            let reply = handle(&engine, message.subject.as_str(), &message.payload).await;
            if let Some(to) = message.reply {
                let body = serde_json::to_vec(&reply).unwrap_or_default();
                if let Err(err) = client.publish(to, Bytes::from(body)).await {
                    tracing::warn!(error = %err, "cannot answer an increment");
                }
            }
            drop(permit);
        });
    }
}

async fn handle(engine: &Engine, subject: &str, payload: &[u8]) -> Value {
    let name = subject
        .strip_prefix("edge.counter.")
        .and_then(|rest| rest.strip_suffix(".inc"))
        .unwrap_or_default();
    let outcome = match parse_increment(payload) {
        Ok(increment) => apply_increment(engine, name, increment).await,
        Err(err) => Err(err),
    };
    match outcome {
        Ok(body) => body,
        Err(err) => {
            if err.status.is_client_error() {
                metrics::counter!("keel_counter_nats_rejected_total", "code" => err.code)
                    .increment(1);
                tracing::warn!(subject, code = err.code, message = %err.message, "increment refused");
            }
            error_body(&err)
        }
    }
}

fn error_body(err: &ApiError) -> Value {
    let mut body = err.body();
    body["status"] = Value::from(err.status.as_u16());
    body
}
