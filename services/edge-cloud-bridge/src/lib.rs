//! edge-cloud-bridge: ships safety state and counter aggregates to the cloud NATS and
//! pulls configuration down (cloud-sync). `run` wires config, readiness, NATS and the router.

use std::time::Duration;

use clap::Parser;
use service_kit::shutdown::Shutdown;
use service_kit::{CommonArgs, ComponentState, Readiness, Role};

/// edge-cloud-bridge flags (CONTRACT.md).
#[derive(Debug, Clone, Parser)]
#[command(name = "edge-cloud-bridge", version, about = "Edge-to-cloud store-and-forward")]
pub struct Config {
    /// Flags shared by every service.
    #[command(flatten)]
    pub common: CommonArgs,

    /// The cloud NATS server.
    #[arg(long, env = "CLOUD_URL", default_value = "nats://127.0.0.1:4223", value_parser = service_kit::config::parse_nats_url)]
    pub cloud_url: String,

    /// This site's id.
    #[arg(long, env = "SITE", default_value = "site-1", value_parser = parse_site)]
    pub site: String,

    /// How often snapshots are shipped (e.g. `1h`, `5s`).
    #[arg(long, env = "SNAPSHOT_INTERVAL", default_value = "1h", value_parser = parse_interval)]
    pub snapshot_interval: Duration,
}

fn parse_site(raw: &str) -> Result<String, String> {
    if wire::subjects::is_valid_token(raw) {
        Ok(raw.to_owned())
    } else {
        Err("a site id is 1..=64 of [A-Za-z0-9_-]".into())
    }
}

/// Parses `500ms`, `5s`, `1h`; at least 100 ms, at most 7 days.
pub fn parse_interval(raw: &str) -> Result<Duration, String> {
    let (digits, unit) = raw.split_at(raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len()));
    let n: u64 = digits.parse().map_err(|_| format!("{raw:?} is not a duration like 5s or 1h"))?;
    let ms = match unit {
        "ms" => n,
        "s" => n.saturating_mul(1_000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        _ => return Err(format!("{raw:?}: unit must be ms, s, m or h")),
    };
    if !(100..=7 * 24 * 3_600_000).contains(&ms) {
        return Err(format!("{raw:?} must be between 100ms and 168h"));
    }
    Ok(Duration::from_millis(ms))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_parse_with_units_and_limits() {
        assert_eq!(parse_interval("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_interval("1h").unwrap(), Duration::from_secs(3600));
        for bad in ["", "5", "5d", "10ms", "x"] {
            assert!(parse_interval(bad).is_err(), "{bad:?}");
        }
    }
}
