//! Catch-up after a NATS outage: replays the peers' change batches that `EDGE_CRDT` kept
//! while this replica was away, before the anti-entropy round.
//!
//! Why: crdt-sync's anti-entropy sends every change a peer lacks in one automerge sync
//! message, and nats-server refuses messages above its `max_payload` (1 MiB by default). A
//! replica cut off while its peers took a few thousand increments would never receive them
//! that way. The stream holds those batches (for its max age), so the replica reads them
//! from the time it lost the link, applies them (idempotent), and anti-entropy then has only
//! a small remainder to send. What this replica wrote while away still reaches the peers
//! through anti-entropy in the other direction, so that direction keeps crdt-sync's limit:
//! what one replica wrote while away must fit one sync message.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use crdt_sync::sync::{STREAM_NAME, STREAM_SUBJECTS};
use crdt_sync::{DocId, Update};
use futures::StreamExt;

use crate::engine::Engine;

/// Batches applied together (one automerge apply and one log record per document).
pub const CATCH_UP_CHUNK_BATCHES: usize = 256;
/// Longest wait for the next stored batch before the catch-up ends.
pub const CATCH_UP_IDLE_MS: u64 = 2_000;
/// Margin before the moment the link was seen lost.
pub const CATCH_UP_MARGIN_MS: u64 = 2_000;

/// Applies the peers' batches stored since `since_ms` (ms since the Unix epoch); returns how
/// many were read.
pub async fn catch_up(
    engine: Arc<Engine>,
    client: async_nats::Client,
    since_ms: u64,
) -> anyhow::Result<usize> {
    let start_ms = since_ms.saturating_sub(CATCH_UP_MARGIN_MS);
    let start_time = async_nats::datetime::from_nanos(i128::from(start_ms) * 1_000_000)
        .map_err(|e| anyhow::anyhow!("catch-up start time: {e}"))?;
    let stream = jetstream::new(client).get_stream(STREAM_NAME).await?;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: STREAM_SUBJECTS.to_owned(),
            deliver_policy: consumer::DeliverPolicy::ByStartTime { start_time },
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let own_suffix = format!(".changes.{}", engine.node_id());
    let mut read = 0usize;
    let mut chunk: Vec<(DocId, Vec<u8>)> = Vec::new();
    loop {
        let next =
            tokio::time::timeout(Duration::from_millis(CATCH_UP_IDLE_MS), messages.next()).await;
        let Ok(Some(Ok(message))) = next else { break };
        let pending = message.info().map(|info| info.pending).unwrap_or(0);
        read += 1;
        let subject = message.subject.as_str();
        if !subject.ends_with(&own_suffix)
            && let Some(doc) = subject
                .strip_prefix("edge.crdt.")
                .and_then(|rest| rest.split(".changes.").next())
                .and_then(|doc| doc.parse::<DocId>().ok())
        {
            chunk.push((doc, message.payload.to_vec()));
        }
        if chunk.len() >= CATCH_UP_CHUNK_BATCHES || pending == 0 {
            apply(&engine, std::mem::take(&mut chunk)).await;
        }
        if pending == 0 {
            break;
        }
    }
    apply(&engine, chunk).await;
    metrics::counter!("keel_counter_catch_up_batches_total").increment(read as u64);
    Ok(read)
}

async fn apply(engine: &Arc<Engine>, chunk: Vec<(DocId, Vec<u8>)>) {
    if chunk.is_empty() {
        return;
    }
    let engine = engine.clone();
    let _ = tokio::task::spawn_blocking(move || {
        let mut by_doc: BTreeMap<DocId, Vec<Vec<u8>>> = BTreeMap::new();
        for (doc, payload) in chunk {
            by_doc.entry(doc).or_default().push(payload);
        }
        for (doc, payloads) in by_doc {
            let mut combined = crdt_sync::ChangeBatch::new();
            let mut framed = true;
            for payload in &payloads {
                match crdt_sync::ChangeBatch::from_bytes(payload) {
                    // Batches of two epochs (around an epoch change) go one by one.
                    Ok(batch) => framed &= combined.extend(&batch),
                    Err(_) => framed = false,
                }
            }
            let applied = engine.update(&doc, |replica, _| {
                // All at once; if anything is refused, one by one so only the bad ones fail.
                if !(framed && replica.apply_changes(&doc, combined.as_bytes()).is_ok()) {
                    for payload in &payloads {
                        if replica.apply_changes(&doc, payload).is_err() {
                            metrics::counter!("keel_counter_catch_up_rejected_total").increment(1);
                        }
                    }
                }
                Ok(Update { value: (), applied: false, changes: None })
            });
            if let Err(err) = applied {
                tracing::warn!(%doc, error = %err, "catch-up apply failed; anti-entropy will cover it");
            }
        }
    })
    .await;
}
