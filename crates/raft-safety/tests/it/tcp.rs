//! Three members on loopback through the TCP transport: elect, commit, lose the leader, elect
//! again and commit, then restart the old leader on its data dir.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use raft_safety::transport::tcp::serve;
use raft_safety::{
    EStop, EStopCommand, EStopQuery, Node, NodeConfig, NodeError, RaftHandle, RedbStore, Role,
    TcpTransport, inbound_channel, spawn,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Bound on any wait here.
const WAIT: Duration = Duration::from_secs(10);

struct Member {
    handle: RaftHandle,
    driver: JoinHandle<Result<(), NodeError>>,
    listener: JoinHandle<std::io::Result<()>>,
}

fn start(id: u64, dir: &Path, listener: TcpListener, addrs: &HashMap<u64, SocketAddr>) -> Member {
    let store = RedbStore::open(dir.join(format!("node-{id}.redb"))).unwrap();
    let node = Node::new(NodeConfig::new(id, vec![1, 2, 3]), store, EStop::new()).unwrap();
    let peers = addrs.iter().filter(|(p, _)| **p != id).map(|(p, a)| (*p, *a));
    let transport = TcpTransport::new(peers);
    let (tx, rx) = inbound_channel();
    let listener = tokio::spawn(serve(listener, tx));
    let (handle, driver) = spawn(node, transport, rx);
    Member { handle, driver, listener }
}

async fn leader_among(members: &[&Member]) -> u64 {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let leaders: Vec<u64> = members
            .iter()
            .map(|m| m.handle.status())
            .filter(|s| s.role == Role::Leader)
            .map(|s| s.id)
            .collect();
        if let [leader] = leaders.as_slice() {
            return *leader;
        }
        assert!(tokio::time::Instant::now() < deadline, "no single leader");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn command(engage: bool, id: &str) -> Vec<u8> {
    if engage {
        EStopCommand::Engage {
            request_id: id.into(),
            reason: "tcp test".into(),
            source: "it".into(),
            who: String::new(),
            at_ms: 1,
        }
        .encode()
    } else {
        EStopCommand::Clear {
            request_id: id.into(),
            by: "safety".into(),
            reason: "checked".into(),
            at_ms: 2,
        }
        .encode()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_over_tcp_survive_losing_the_leader() {
    let dir = tempfile::tempdir().unwrap();
    let mut listeners = HashMap::new();
    let mut addrs = HashMap::new();
    for id in 1..=3u64 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.insert(id, listener.local_addr().unwrap());
        listeners.insert(id, listener);
    }
    let mut members: HashMap<u64, Member> = (1..=3)
        .map(|id| {
            let listener = listeners.remove(&id).unwrap();
            (id, start(id, dir.path(), listener, &addrs))
        })
        .collect();

    let all: Vec<&Member> = members.values().collect();
    let first_leader = leader_among(&all).await;
    let follower = (1..=3).find(|&id| id != first_leader).unwrap();
    let applied = members[&follower].handle.propose(command(true, "tcp-1")).await.unwrap();
    assert!(applied.index > 0);

    // Kill the leader: its driver and listener stop, its connections drop.
    let killed = members.remove(&first_leader).unwrap();
    killed.handle.shutdown().await;
    killed.driver.await.unwrap().unwrap();
    killed.listener.abort();
    let _ = killed.listener.await;
    let lost_at = tokio::time::Instant::now();

    let rest: Vec<&Member> = members.values().collect();
    let new_leader = leader_among(&rest).await;
    assert_ne!(new_leader, first_leader);
    let cleared = members[&new_leader].handle.propose(command(false, "tcp-clear")).await.unwrap();
    assert!(cleared.index > applied.index && cleared.term > applied.term);
    println!("leader lost -> new leader committed in {:?}", lost_at.elapsed());
    let state = members[&new_leader].handle.read(EStopQuery::State.encode()).await.unwrap();
    assert!(!EStop::decode_state(&state).unwrap().engaged);

    // The old leader restarts on its data dir and port, and catches up.
    let listener = TcpListener::bind(addrs[&first_leader]).await.unwrap();
    let back = start(first_leader, dir.path(), listener, &addrs);
    let caught_up = back.handle.wait_for(WAIT, |s| s.applied >= cleared.index).await;
    assert!(caught_up.is_some(), "restarted member did not catch up");
    let local = back.handle.read_local(EStopQuery::State.encode()).await.unwrap();
    let local = EStop::decode_state(&local).unwrap();
    assert!(!local.engaged);
    assert_eq!(local.index, cleared.index);
}
