//! counter-service: production counters, LWW registers and OR-sets replicated as CRDTs
//! (crdt-sync) over NATS JetStream. `run` wires config, readiness, NATS and the router.

use clap::Parser;
use service_kit::shutdown::Shutdown;
use service_kit::{CommonArgs, ComponentState, Readiness, Role};

/// counter-service flags (CONTRACT.md).
#[derive(Debug, Clone, Parser)]
#[command(name = "counter-service", version, about = "Production counters and CRDT state")]
pub struct Config {
    /// Flags shared by every service.
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Config {
    /// Checks what clap cannot and prepares the data dir; exits 64 when invalid.
    pub fn validate_or_exit(&self) {
        service_kit::ensure_data_dir(&self.common.data_dir);
    }
}

/// The HTTP routes of this service (without the shared ones).
pub fn router() -> axum::Router {
    axum::Router::new()
}

/// Runs the service until `shutdown` fires.
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let readiness = Readiness::new();
    readiness.register("recovered", Role::Gating);
    let _nats =
        service_kit::nats::connect(&config.common.nats_url, &config.common.node_id, &readiness)
            .await?;
    readiness.set("recovered", ComponentState::Ok);
    let app = service_kit::http::with_base(router(), readiness, (&config.common).into());
    service_kit::http::serve(config.common.http_addr, app, shutdown).await
}
