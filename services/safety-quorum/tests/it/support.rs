//! A real three-member cluster for the tests: one nats-server, one safety-quorum process per
//! member, and a testkit proxy on every directed raft link, so that one member can be cut off.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use testkit::{NatsServer, Proxy, ServiceProcess, ServiceSpec, wait_until};

pub const BIN: &str = env!("CARGO_BIN_EXE_safety-quorum");

/// Bound on any wait for the cluster to settle.
pub const WAIT: Duration = Duration::from_secs(15);
/// Raft tick and election timeout the tests run with (the defaults).
pub const TICK_MS: u64 = 10;
pub const ELECTION_TICKS: u64 = 10;
/// The longest randomised election timeout (Raft draws it in [n, 2n) ticks).
pub const ELECTION_TIMEOUT_MAX: Duration = Duration::from_millis(2 * ELECTION_TICKS * TICK_MS);
/// Commit timeout the members run with.
pub const COMMIT_TIMEOUT_MS: u64 = 1_000;

/// The cluster tests share two cores: they run one at a time so that timings mean something.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

pub struct Cluster {
    pub nats: NatsServer,
    pub members: BTreeMap<u64, ServiceProcess>,
    /// (from, to) -> the proxy `from` dials to reach `to`.
    proxies: BTreeMap<(u64, u64), Proxy>,
}

impl Cluster {
    /// Starts nats-server and `n` members and waits until they agree on a leader. `None`
    /// when nats-server is missing outside CI.
    pub async fn start(test: &str, n: u64) -> Option<Self> {
        let nats = testkit::require(test, NatsServer::start())?;
        let raft: BTreeMap<u64, SocketAddr> = (1..=n)
            .map(|id| (id, SocketAddr::from(([127, 0, 0, 1], testkit::free_port()))))
            .collect();
        let mut proxies = BTreeMap::new();
        for from in 1..=n {
            for to in (1..=n).filter(|to| *to != from) {
                proxies.insert((from, to), Proxy::start(raft[&to]).await.unwrap());
            }
        }
        let mut members = BTreeMap::new();
        for id in 1..=n {
            let peers: Vec<String> = (1..=n)
                .map(|p| {
                    let addr = if p == id { raft[&p] } else { proxies[&(id, p)].addr() };
                    format!("{p}={addr}")
                })
                .collect();
            let spec = ServiceSpec::new(BIN, nats.url()).args([
                "--node-id".to_owned(),
                id.to_string(),
                "--peers".to_owned(),
                peers.join(","),
                "--commit-timeout-ms".to_owned(),
                COMMIT_TIMEOUT_MS.to_string(),
                "--tick-ms".to_owned(),
                TICK_MS.to_string(),
                "--election-ticks".to_owned(),
                ELECTION_TICKS.to_string(),
            ]);
            members.insert(id, ServiceProcess::start(spec).unwrap());
        }
        for member in members.values_mut() {
            member.wait_ready().await.unwrap();
        }
        let cluster = Self { nats, members, proxies };
        let ids: Vec<u64> = cluster.members.keys().copied().collect();
        cluster.leader_among(&ids).await;
        Some(cluster)
    }

    pub fn member(&self, id: u64) -> &ServiceProcess {
        &self.members[&id]
    }

    pub fn member_mut(&mut self, id: u64) -> &mut ServiceProcess {
        self.members.get_mut(&id).unwrap()
    }

    pub async fn cluster_view(&self, id: u64) -> Option<Value> {
        let (status, body) = self.member(id).get_json("/cluster").await.ok()?;
        (status == 200).then_some(body)
    }

    /// Waits until every member in `ids` names the same leader, itself one of `ids`.
    pub async fn leader_among(&self, ids: &[u64]) -> u64 {
        wait_until("one leader agreed on", WAIT, || async {
            let mut leaders = Vec::new();
            for id in ids {
                leaders.push(self.cluster_view(*id).await?["leader"].as_u64()?);
            }
            let first = leaders[0];
            (leaders.iter().all(|l| *l == first) && ids.contains(&first)).then_some(first)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()))
    }

    /// Cuts every raft link to and from `id`.
    pub fn isolate(&self, id: u64) {
        for ((from, to), proxy) in &self.proxies {
            if *from == id || *to == id {
                proxy.cut();
            }
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        for proxy in self.proxies.values() {
            proxy.restore();
        }
    }

    pub async fn engage(&self, id: u64, request_id: &str) -> (u16, Value) {
        let body = json!({"reason": "test stop", "source": "it", "request_id": request_id});
        self.member(id).send_json(reqwest::Method::POST, "/estop", &body).await.unwrap()
    }

    pub async fn clear(&self, id: u64, request_id: &str) -> (u16, Value) {
        let body =
            json!({"by": "safety-officer", "request_id": request_id, "reason": "cell checked"});
        self.member(id).send_json(reqwest::Method::POST, "/estop/clear", &body).await.unwrap()
    }

    /// GET `path` on member `id`, expecting 200.
    pub async fn get(&self, id: u64, path: &str) -> Value {
        let (status, body) = self.member(id).get_json(path).await.unwrap();
        assert_eq!(status, 200, "GET {path} on {id}: {body}");
        body
    }

    /// The last log lines of every member, for failure messages.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|(id, m)| format!("--- member {id}\n{}", m.log_tail(15)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
