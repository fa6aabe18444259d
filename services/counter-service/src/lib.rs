//! counter-service: production counters, LWW registers and OR-sets replicated as CRDTs
//! (crdt-sync) over NATS JetStream. `run` wires config, recovery, NATS and the router.

pub mod api;
pub mod catchup;
pub mod engine;
pub mod nats;
pub mod oplog;

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use crdt_sync::sync::SyncConfig;
use service_kit::shutdown::Shutdown;
use service_kit::{CommonArgs, ComponentState, Readiness, Role};

use crate::engine::{Engine, EngineConfig};

/// Period of the metrics and checkpoint loop.
pub const HOUSEKEEPING_INTERVAL_MS: u64 = 1_000;
/// Period of the NATS reconnect watch.
pub const RECONNECT_WATCH_MS: u64 = 100;
/// glibc malloc arenas of the process (`service_kit::limit_malloc_arenas`). After 1,000,000
/// increments in counter-bench the replica held 69.5 MB with glibc's default, 64.7 MB with
/// 2 arenas and 57.9 MB with 1 (one run each, docs/BENCHMARKS.md); 2 is one per core of a
/// 2-core edge node, and 1 looked slower on durable increments/s, within the noise.
pub const MALLOC_ARENAS_MAX: usize = 2;

/// counter-service flags (CONTRACT.md).
#[derive(Debug, Clone, Parser)]
#[command(name = "counter-service", version, about = "Production counters and CRDT state")]
pub struct Config {
    /// Flags shared by every service.
    #[command(flatten)]
    pub common: CommonArgs,

    /// Node ids of every replica (this one is added if missing). Op entries are folded once
    /// all of them have seen them; list every replica, and remove one only when it is gone
    /// for good.
    #[arg(long, env = "PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,

    /// Least time between two publish cycles of local changes, in milliseconds: the longest
    /// a durable change waits to be published (after a quiet spell it leaves at once).
    #[arg(long, env = "FLUSH_INTERVAL_MS", default_value_t = crdt_sync::sync::FLUSH_INTERVAL_MS_DEFAULT,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub flush_interval_ms: u64,

    /// Period of anti-entropy heads rounds, in milliseconds: each peer gets the heads of
    /// every document as of the round before and asks for a full exchange if it lacks one
    /// (full rounds run on start, reconnect and epoch entry).
    #[arg(long, env = "ANTI_ENTROPY_INTERVAL_MS", default_value_t = crdt_sync::sync::ANTI_ENTROPY_INTERVAL_MS_DEFAULT,
          value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub anti_entropy_interval_ms: u64,

    /// Period of acks and folding, in milliseconds.
    #[arg(long, env = "TICK_INTERVAL_MS", default_value_t = crdt_sync::sync::TICK_INTERVAL_MS_DEFAULT,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub tick_interval_ms: u64,

    /// Op records between snapshots (the log is compacted below each).
    #[arg(long, env = "SNAPSHOT_EVERY_RECORDS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_every_records: u64,

    /// Changes a counter's epoch document holds before the coordinator (the lowest member
    /// id) rebases it onto a fresh epoch, which bounds its history.
    #[arg(long, env = "EPOCH_CHANGES", default_value_t = crdt_sync::EPOCH_CHANGES_MIN_DEFAULT,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub epoch_changes: u64,
}

impl Config {
    /// Checks what clap cannot and prepares the data dir; exits 64 when invalid.
    pub fn validate_or_exit(&self) {
        for node in self.peers.iter().chain(std::iter::once(&self.common.node_id)) {
            if let Err(err) = crdt_sync::validate_node_id(node) {
                service_kit::config::exit_invalid(&format!("--peers / --node-id: {err}"));
            }
        }
        if self.members().len() > crdt_sync::MEMBERS_MAX {
            service_kit::config::exit_invalid(&format!(
                "--peers: at most {} replicas",
                crdt_sync::MEMBERS_MAX
            ));
        }
        service_kit::ensure_data_dir(&self.common.data_dir);
    }

    /// Every replica, this one included, sorted.
    pub fn members(&self) -> Vec<String> {
        let mut members: Vec<String> = self.peers.clone();
        members.push(self.common.node_id.clone());
        members.sort();
        members.dedup();
        members
    }

    fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            node_id: self.common.node_id.clone(),
            members: self.members(),
            data_dir: self.common.data_dir.clone(),
            sync: SyncConfig {
                flush_interval_ms: self.flush_interval_ms,
                anti_entropy_interval_ms: self.anti_entropy_interval_ms,
                tick_interval_ms: self.tick_interval_ms,
                ..SyncConfig::default()
            },
            snapshot_every_records: self.snapshot_every_records,
            epoch_changes_min: self.epoch_changes,
        }
    }
}

/// The HTTP routes of this service (without the shared ones).
pub fn router(engine: Arc<Engine>) -> axum::Router {
    api::routes(engine)
}

/// Runs the service until `shutdown` fires.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let readiness = Readiness::new();
    readiness.register("recovered", Role::Gating);
    readiness.register("sync", Role::Degrading);
    readiness.set("sync", ComponentState::Down("starting"));
    let client =
        service_kit::nats::connect(&config.common.nats_url, &config.common.node_id, &readiness)
            .await?;
    let engine_config = config.engine_config();
    let (engine, report) =
        tokio::task::spawn_blocking(move || Engine::recover(engine_config)).await??;
    tracing::info!(
        node = %config.common.node_id,
        members = ?config.members(),
        snapshot_position = report.snapshot_position,
        log_position = report.log_position,
        elapsed_ms = report.elapsed.as_millis() as u64,
        "recovered"
    );
    readiness.set("recovered", ComponentState::Ok);

    let sync_engine = engine.clone();
    let sync_client = client.clone();
    let sync_readiness = readiness.clone();
    tokio::spawn(async move {
        sync_engine.start_sync(sync_client.clone()).await;
        sync_readiness.set("sync", ComponentState::Ok);
        watch_reconnects(sync_engine, sync_client).await;
    });
    let nats_increments = tokio::spawn(nats::serve_increments(engine.clone(), client.clone()));
    tokio::spawn(housekeeping(engine.clone()));

    let app =
        service_kit::http::with_base(router(engine.clone()), readiness, (&config.common).into());
    let served = service_kit::http::serve(config.common.http_addr, app, shutdown).await;
    nats_increments.abort();
    if let Some(synced) = engine.synced() {
        synced.stop();
    }
    let closing = engine.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(err) = closing.maybe_snapshot(true) {
            tracing::warn!(error = %err, "final checkpoint failed");
        }
        closing.close();
    })
    .await?;
    served
}

/// Runs an anti-entropy round whenever the NATS connection comes back.
async fn watch_reconnects(engine: Arc<Engine>, client: async_nats::Client) {
    use async_nats::connection::State;
    let mut lost_at_ms: Option<u64> = None;
    loop {
        tokio::time::sleep(Duration::from_millis(RECONNECT_WATCH_MS)).await;
        let connected = client.connection_state() == State::Connected;
        match (connected, lost_at_ms) {
            (false, None) => lost_at_ms = Some(crdt_sync::sync::now_ms()),
            (true, Some(since_ms)) => {
                lost_at_ms = None;
                match catchup::catch_up(engine.clone(), client.clone(), since_ms).await {
                    Ok(read) => tracing::info!(read, "nats back: caught up from the stream"),
                    Err(err) => tracing::warn!(error = %err, "catch-up from the stream failed"),
                }
                if let Some(synced) = engine.synced() {
                    synced.reconnected();
                }
            }
            _ => {}
        }
    }
}

/// Checkpoints and gauges, once per [`HOUSEKEEPING_INTERVAL_MS`].
async fn housekeeping(engine: Arc<Engine>) {
    let mut lag_seen = 0u64;
    loop {
        tokio::time::sleep(Duration::from_millis(HOUSEKEEPING_INTERVAL_MS)).await;
        let engine = engine.clone();
        let seen = lag_seen;
        let result = tokio::task::spawn_blocking(move || {
            if let Err(err) = engine.maybe_snapshot(false) {
                tracing::warn!(error = %err, "checkpoint failed");
            }
            record_gauges(&engine, seen)
        })
        .await;
        if let Ok(seen) = result {
            lag_seen = seen;
        }
    }
}

/// Publishes gauges; feeds the lag histogram with the samples received since `lag_seen`
/// (batches received); returns the new count.
fn record_gauges(engine: &Engine, lag_seen: u64) -> u64 {
    let (metrics, live_ops) = engine.read(|replica| {
        let live: usize = replica
            .docs()
            .iter()
            .filter(|doc| doc.kind() == crdt_sync::DocKind::Counter)
            .filter_map(|doc| replica.counter(doc).ok().flatten())
            .map(|value| value.live_ops)
            .sum();
        (replica.metrics(), live)
    });
    metrics::gauge!("keel_counter_ops_live").set(live_ops as f64);
    metrics::gauge!("keel_crdt_docs").set(metrics.docs as f64);
    metrics::gauge!("keel_crdt_changes").set(metrics.changes as f64);
    metrics::gauge!("keel_crdt_epoch").set(metrics.epoch as f64);
    metrics::gauge!("keel_crdt_archives_wanted").set(metrics.archives_wanted as f64);
    metrics::gauge!("keel_crdt_automerge_ops").set(metrics.automerge_ops as f64);
    metrics::gauge!("keel_crdt_log_position").set(metrics.log_position as f64);
    metrics::gauge!("keel_counter_disk_bytes").set(engine.disk_bytes() as f64);
    let Some(synced) = engine.synced() else { return lag_seen };
    let sync = synced.metrics();
    metrics::gauge!("keel_crdt_batches_published").set(sync.batches_published as f64);
    metrics::gauge!("keel_crdt_batches_dropped").set(sync.batches_dropped as f64);
    metrics::gauge!("keel_crdt_batches_received").set(sync.batches_received as f64);
    metrics::gauge!("keel_crdt_messages_rejected").set(sync.messages_rejected as f64);
    metrics::gauge!("keel_crdt_sync_messages_sent").set(sync.sync_sent as f64);
    metrics::gauge!("keel_crdt_sync_messages_received").set(sync.sync_received as f64);
    metrics::gauge!("keel_crdt_archive_chunks_received").set(sync.archive_chunks_received as f64);
    let fresh = sync.batches_received.saturating_sub(lag_seen) as usize;
    let samples = synced.lag_samples_ms();
    for lag_ms in samples.iter().skip(samples.len().saturating_sub(fresh)) {
        metrics::histogram!("keel_crdt_replication_lag_ms").record(*lag_ms as f64);
    }
    sync.batches_received
}
