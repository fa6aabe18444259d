//! safety-quorum: the e-stop flag replicated by Raft (raft-safety) across the floor.
//! `run` wires config, the Raft member, readiness, NATS (trips, requests, the leader's state
//! and heartbeat) and the router.
//!
//! The pieces: [`member`] opens the redb store and runs the Raft member over TCP; [`api`]
//! holds the engage/clear/read logic shared by HTTP and NATS, and the router; [`publisher`]
//! is the leader-only `edge.safety.state` publisher and the `edge.safety.estop` responder.

pub mod api;
pub mod member;
pub mod publisher;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use service_kit::shutdown::Shutdown;
use service_kit::{CommonArgs, ComponentState, Readiness, Role};

pub use api::{App, router};

/// Most members in one safety group.
pub const MEMBERS_MAX: usize = 7;
/// Readiness component: the store is open and the Raft member runs (gating).
pub const COMPONENT_RECOVERED: &str = "recovered";
/// Readiness component: a leader is known (degrading; engages then wait or fail with 503).
pub const COMPONENT_RAFT: &str = "raft";
/// How long shutdown waits for the Raft member to stop.
pub const STOP_TIMEOUT_MS: u64 = 3_000;

/// safety-quorum flags (CONTRACT.md). `--node-id` is this member's Raft id (a number).
#[derive(Debug, Clone, Parser)]
#[command(name = "safety-quorum", version, about = "Raft-replicated e-stop")]
pub struct Config {
    /// Flags shared by every service.
    #[command(flatten)]
    pub common: CommonArgs,

    /// Raft peers, `id=host:port` comma-separated, including this member. This member's own
    /// entry is where it listens; the others are where it dials (a proxy may stand between).
    #[arg(long, env = "PEERS", value_parser = parse_peers, default_value = "1=127.0.0.1:7101")]
    pub peers: Peers,

    /// Length of one Raft tick (ms).
    #[arg(long, env = "TICK_MS", default_value_t = raft_safety::config::TICK_MS_DEFAULT,
          value_parser = clap::value_parser!(u64).range(1..=1_000))]
    pub tick_ms: u64,

    /// Election timeout in ticks (randomised in [n, 2n) by Raft).
    #[arg(long, env = "ELECTION_TICKS", default_value_t = raft_safety::config::ELECTION_TICKS_DEFAULT as u64,
          value_parser = clap::value_parser!(u64).range(3..=10_000))]
    pub election_ticks: u64,

    /// Raft heartbeat interval in ticks (between members; not the NATS heartbeat).
    #[arg(long, env = "RAFT_HEARTBEAT_TICKS", default_value_t = raft_safety::config::HEARTBEAT_TICKS_DEFAULT as u64,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub raft_heartbeat_ticks: u64,

    /// The leader publishes `edge.safety.state` this often (ms), each one confirmed by a quorum.
    #[arg(long, env = "HEARTBEAT_MS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub heartbeat_ms: u64,

    /// Bound on waiting for an engage or clear to commit (then 503 `no_quorum`); also bounds
    /// linearizable reads.
    #[arg(long, env = "COMMIT_TIMEOUT_MS", default_value_t = 1_000,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub commit_timeout_ms: u64,

    /// Applied entries between two snapshots (the log below is compacted).
    #[arg(long, env = "SNAPSHOT_INTERVAL_ENTRIES", default_value_t = raft_safety::config::SNAPSHOT_INTERVAL_ENTRIES_DEFAULT,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_interval_entries: u64,

    /// Token file (`service_kit::auth`: `name roles sha256-of-token` per line). When set,
    /// `POST /estop` needs any caller's bearer token and `POST /estop/clear` one with the
    /// `safety` role, and the audit records the caller's name. Unset: HTTP is open (a
    /// warning says so at start). NATS engage requests are left to the broker's own auth.
    #[arg(long, env = "AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<std::path::PathBuf>,

    /// The Raft log store in `--data-dir`: `wal` (two preallocated append-only files, one
    /// write and one fdatasync per round) or `redb` (one redb file, a redb commit per round).
    /// A data dir that holds the other kind's store is refused (exit 64): a member must never
    /// start without its log.
    #[arg(long, env = "RAFT_STORE", value_enum, default_value_t = RaftStore::Wal)]
    pub raft_store: RaftStore,
}

/// Which [`raft_safety::LogStore`] a member runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RaftStore {
    /// [`raft_safety::WalStore`] in `<data-dir>/raft-wal/`.
    Wal,
    /// [`raft_safety::RedbStore`] in `<data-dir>/raft.redb`.
    Redb,
}

impl RaftStore {
    /// The flag value.
    pub fn name(self) -> &'static str {
        match self {
            RaftStore::Wal => "wal",
            RaftStore::Redb => "redb",
        }
    }
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

    /// Ticks in `ms`, rounded up, at least one more than an election timeout (raft-safety
    /// requires request deadlines beyond one election).
    fn timeout_ticks(&self, ms: u64) -> u64 {
        ms.div_ceil(self.tick_ms).max(self.election_ticks + 1)
    }

    /// The Raft member's configuration.
    pub fn node_config(&self) -> Result<raft_safety::NodeConfig, String> {
        let id = self.member_id()?;
        let mut node = raft_safety::NodeConfig::new(id, self.peers.0.keys().copied().collect());
        node.tick_ms = self.tick_ms;
        node.election_ticks = self.election_ticks as usize;
        node.heartbeat_ticks = self.raft_heartbeat_ticks as usize;
        // Requests outlive our own wait a little, so that our deadline decides the answer.
        node.proposal_timeout_ticks = self.timeout_ticks(self.commit_timeout_ms) + 1;
        node.read_timeout_ticks = self.timeout_ticks(self.commit_timeout_ms) + 1;
        node.snapshot_interval_entries = self.snapshot_interval_entries;
        node.validate()
            .map_err(|e| format!("--tick-ms/--election-ticks/--raft-heartbeat-ticks: {e}"))?;
        Ok(node)
    }

    /// Bound on a commit or a linearizable read.
    pub fn commit_timeout(&self) -> Duration {
        Duration::from_millis(self.commit_timeout_ms)
    }

    /// The callers `--auth-tokens-file` names, `None` without the flag.
    pub fn auth_tokens(&self) -> Result<Option<service_kit::auth::Tokens>, String> {
        self.auth_tokens_file
            .as_deref()
            .map(|path| {
                service_kit::auth::Tokens::load(path).map_err(|e| format!("--auth-tokens-file {e}"))
            })
            .transpose()
    }

    /// Refuses a data dir that holds the store of the other `--raft-store` kind.
    pub fn check_raft_store(&self) -> Result<(), String> {
        let dir = &self.common.data_dir;
        let (wal, redb) = (dir.join(member::WAL_DIR), dir.join(member::REDB_FILE));
        let other = match self.raft_store {
            RaftStore::Wal => redb.exists().then_some(("redb", redb)),
            RaftStore::Redb => wal.exists().then_some(("wal", wal)),
        };
        match other {
            Some((kind, path)) => Err(format!(
                "--raft-store {}: {} holds a {kind} raft store; start with --raft-store {kind} \
                 (a member must not start without its log)",
                self.raft_store.name(),
                path.display()
            )),
            None => Ok(()),
        }
    }

    /// Checks what clap cannot and prepares the data dir; exits 64 when invalid.
    pub fn validate_or_exit(&self) {
        if let Err(reason) = self
            .node_config()
            .and_then(|_| self.auth_tokens().map(drop))
            .and_then(|()| self.check_raft_store())
        {
            service_kit::config::exit_invalid(&reason);
        }
        service_kit::ensure_data_dir(&self.common.data_dir);
    }
}

/// Runs the service until `shutdown` fires (or the Raft member fails).
pub async fn run(config: Config, shutdown: Shutdown) -> anyhow::Result<()> {
    let readiness = Readiness::new();
    readiness.register(COMPONENT_RECOVERED, Role::Gating);
    readiness.register(COMPONENT_RAFT, Role::Degrading);
    let nats =
        service_kit::nats::connect(&config.common.nats_url, &config.common.node_id, &readiness)
            .await?;
    let mut member = member::Member::start(&config).await?;
    readiness.set(COMPONENT_RECOVERED, ComponentState::Ok);
    tracing::info!(member = member.id, peers = ?config.peers.0, "raft member running");

    let mut app = App::new(member.raft.clone(), Some(nats.clone()), &config);
    match config.auth_tokens().map_err(anyhow::Error::msg)? {
        Some(tokens) => app = app.with_auth(tokens),
        None => tracing::warn!(
            "no --auth-tokens-file: anyone who reaches the HTTP port can engage and clear"
        ),
    }
    let (stop_trigger, stop) = Shutdown::new();
    let publisher = tokio::spawn(publisher::publish_state(
        member.raft.clone(),
        nats.clone(),
        readiness.clone(),
        publisher::PublisherSettings::from(&config),
        stop.clone(),
    ));
    let responder = tokio::spawn(publisher::serve_estop_requests(
        app.clone(),
        nats.clone(),
        config.common.body_limit_bytes,
        stop.clone(),
    ));
    let http = service_kit::http::with_base(router(app), readiness, (&config.common).into());
    let serving = tokio::spawn(service_kit::http::serve(config.common.http_addr, http, shutdown));

    let outcome = tokio::select! {
        served = serving => served.map_err(anyhow::Error::from).and_then(|r| r),
        failed = &mut member.driver => match failed {
            Ok(Ok(())) => Err(anyhow::anyhow!("raft member stopped")),
            Ok(Err(error)) => Err(anyhow::Error::from(error).context("raft member failed")),
            Err(error) => Err(anyhow::Error::from(error).context("raft member panicked")),
        },
    };
    stop_trigger.fire();
    let _ = tokio::time::timeout(Duration::from_millis(STOP_TIMEOUT_MS), async {
        let _ = publisher.await;
        let _ = responder.await;
    })
    .await;
    member.stop(Duration::from_millis(STOP_TIMEOUT_MS)).await;
    service_kit::nats::flush_on_exit(&nats).await;
    outcome
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
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

    #[test]
    fn raft_settings_are_validated_and_deadlines_follow_the_commit_timeout() {
        let cfg = Config::try_parse_from(["s", "--node-id", "1"]).unwrap();
        let node = cfg.node_config().unwrap();
        assert_eq!((node.tick_ms, node.election_ticks, node.heartbeat_ticks), (10, 10, 2));
        assert_eq!(node.proposal_timeout_ticks, 101, "1 s of 10 ms ticks, plus one");
        let cfg = Config::try_parse_from([
            "s",
            "--node-id",
            "1",
            "--election-ticks",
            "3",
            "--raft-heartbeat-ticks",
            "3",
        ])
        .unwrap();
        assert!(cfg.node_config().unwrap_err().contains("election_ticks"));
        let cfg =
            Config::try_parse_from(["s", "--node-id", "1", "--commit-timeout-ms", "10"]).unwrap();
        assert_eq!(cfg.node_config().unwrap().proposal_timeout_ticks, 12);
    }
}
