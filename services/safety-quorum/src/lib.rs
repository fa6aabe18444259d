//! safety-quorum: the e-stop flag replicated by Raft (raft-safety) across the floor.
//! `run` wires config, readiness, NATS and the router.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use clap::Parser;
use service_kit::shutdown::Shutdown;
use service_kit::{CommonArgs, ComponentState, Readiness, Role};

/// Most members in one safety group.
pub const MEMBERS_MAX: usize = 7;

/// safety-quorum flags (CONTRACT.md). `--node-id` is this member's Raft id (a number).
#[derive(Debug, Clone, Parser)]
#[command(name = "safety-quorum", version, about = "Raft-replicated e-stop")]
pub struct Config {
    /// Flags shared by every service.
    #[command(flatten)]
    pub common: CommonArgs,

    /// Raft peers, `id=host:port` comma-separated, including this member.
    #[arg(long, env = "PEERS", value_parser = parse_peers, default_value = "1=127.0.0.1:7101")]
    pub peers: Peers,
}

/// Raft member id -> peer address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peers(pub BTreeMap<u64, SocketAddr>);

/// Parses `1=127.0.0.1:7101,2=127.0.0.1:7102`.
pub fn parse_peers(raw: &str) -> Result<Peers, String> {
    let mut peers = BTreeMap::new();
    for item in raw.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (id, addr) =
            item.split_once('=').ok_or_else(|| format!("{item:?} is not id=host:port"))?;
        let id: u64 = id.parse().map_err(|_| format!("{id:?} is not a member id (1, 2, ...)"))?;
        if id == 0 {
            return Err("member ids start at 1".into());
        }
        let addr: SocketAddr = addr.parse().map_err(|_| format!("{addr:?} is not host:port"))?;
        if peers.insert(id, addr).is_some() {
            return Err(format!("member {id} listed twice"));
        }
    }
    if peers.is_empty() || peers.len() > MEMBERS_MAX {
        return Err(format!("between 1 and {MEMBERS_MAX} members"));
    }
    Ok(Peers(peers))
}

impl Config {
    /// This member's Raft id.
    pub fn member_id(&self) -> Result<u64, String> {
        let id: u64 =
            self.common.node_id.parse().map_err(|_| {
                format!("--node-id {:?} must be a member number", self.common.node_id)
            })?;
        if !self.peers.0.contains_key(&id) {
            return Err(format!("--node-id {id} is not in --peers"));
        }
        Ok(id)
    }

    /// Checks what clap cannot and prepares the data dir; exits 64 when invalid.
    pub fn validate_or_exit(&self) {
        if let Err(reason) = self.member_id() {
            service_kit::config::exit_invalid(&reason);
        }
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
    fn peers_parse_and_bad_ones_are_refused() {
        let peers = parse_peers("1=127.0.0.1:7101,2=127.0.0.1:7102").unwrap();
        assert_eq!(peers.0.len(), 2);
        for bad in
            ["", "1", "x=127.0.0.1:1", "0=127.0.0.1:1", "1=nowhere", "1=127.0.0.1:1,1=127.0.0.1:2"]
        {
            assert!(parse_peers(bad).is_err(), "{bad:?}");
        }
        let cfg =
            Config::try_parse_from(["s", "--node-id", "4", "--peers", "1=127.0.0.1:1"]).unwrap();
        assert!(cfg.member_id().is_err());
    }
}
