//! arm-controller: per-arm motion plans, sensor ingest and fail-safe stop on the event
//! log. `run` wires config, readiness, NATS and the router.

use clap::Parser;
use service_kit::shutdown::Shutdown;
use service_kit::{CommonArgs, ComponentState, Readiness, Role};

/// Most arms one controller hosts.
pub const ARMS_MAX: usize = 1024;
/// Most joints per arm.
pub const DOF_MAX: u8 = 16;

/// arm-controller flags (CONTRACT.md).
#[derive(Debug, Clone, Parser)]
#[command(name = "arm-controller", version, about = "Motion plans, sensor ingest, fail-safe stop")]
pub struct Config {
    /// Flags shared by every service.
    #[command(flatten)]
    pub common: CommonArgs,

    /// Arm ids hosted here, comma-separated (e.g. `arm-001,arm-002`).
    #[arg(long, env = "ARMS", value_delimiter = ',', conflicts_with = "arm_count")]
    pub arms: Vec<String>,

    /// Host `N` arms named `arm-001`.. (instead of `--arms`).
    #[arg(long, env = "ARM_COUNT", value_parser = clap::value_parser!(u32).range(1..=ARMS_MAX as i64))]
    pub arm_count: Option<u32>,

    /// Joints per arm.
    #[arg(long, env = "DOF", default_value_t = 6, value_parser = clap::value_parser!(u8).range(1..=DOF_MAX as i64))]
    pub dof: u8,

    /// Deadman: stop an arm when no fresh safety heartbeat arrived for this long (ms).
    #[arg(long, env = "SAFETY_TIMEOUT_MS", default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub safety_timeout_ms: u64,
}

impl Config {
    /// The arm ids this controller hosts (`arm-001` when neither flag is given).
    pub fn arm_ids(&self) -> Vec<String> {
        if !self.arms.is_empty() {
            return self.arms.clone();
        }
        (1..=self.arm_count.unwrap_or(1)).map(|i| format!("arm-{i:03}")).collect()
    }

    /// Checks what clap cannot and prepares the data dir; exits 64 when invalid.
    pub fn validate_or_exit(&self) {
        if let Err(reason) = self.validate() {
            service_kit::config::exit_invalid(&reason);
        }
        service_kit::ensure_data_dir(&self.common.data_dir);
    }

    fn validate(&self) -> Result<(), String> {
        let ids = self.arm_ids();
        if ids.len() > ARMS_MAX {
            return Err(format!("--arms: at most {ARMS_MAX} arms"));
        }
        for (i, id) in ids.iter().enumerate() {
            if !wire::subjects::is_valid_token(id) {
                return Err(format!(
                    "--arms: {id:?} is not a valid arm id ([A-Za-z0-9_-], 1..=64)"
                ));
            }
            if ids[..i].contains(id) {
                return Err(format!("--arms: {id:?} is listed twice"));
            }
        }
        Ok(())
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
    tracing::info!(arms = config.arm_ids().len(), dof = config.dof, "arms hosted");
    let app = service_kit::http::with_base(router(), readiness, (&config.common).into());
    service_kit::http::serve(config.common.http_addr, app, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arm_ids_come_from_either_flag_and_are_checked() {
        let cfg = Config::try_parse_from(["a", "--arm-count", "3"]).unwrap();
        assert_eq!(cfg.arm_ids(), ["arm-001", "arm-002", "arm-003"]);
        let cfg = Config::try_parse_from(["a", "--arms", "x,y"]).unwrap();
        assert_eq!(cfg.arm_ids(), ["x", "y"]);
        assert!(Config::try_parse_from(["a", "--arms", "x,x"]).unwrap().validate().is_err());
        assert!(Config::try_parse_from(["a", "--arms", "a.b"]).unwrap().validate().is_err());
        assert!(Config::try_parse_from(["a", "--arms", "x", "--arm-count", "2"]).is_err());
        assert!(Config::try_parse_from(["a", "--dof", "0"]).is_err());
    }
}
