//! Three real members over TCP: losing the leader to SIGKILL, a partition that cuts the leader
//! off (the minority cannot commit, the majority can), healing into one history, and a
//! restart of every member on its data dir.

use std::time::{Duration, Instant};

use serde_json::Value;
use testkit::wait_until;

use crate::support::{COMMIT_TIMEOUT_MS, Cluster, ELECTION_TIMEOUT_MAX, WAIT, serial};

/// Retries an engage with one request id on member `id` until it commits (idempotent).
async fn engage_until_committed(cluster: &Cluster, id: u64, request_id: &str) -> Value {
    wait_until("an engage to commit", WAIT, || async {
        let (status, body) = cluster.engage(id, request_id).await;
        (status == 200).then_some(body)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_leader_a_new_leader_commits_within_three_election_timeouts() {
    let _serial = serial().await;
    let Some(mut cluster) = Cluster::start("sigkill_leader", 3).await else { return };
    let leader = cluster.leader_among(&[1, 2, 3]).await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let (status, first) = cluster.engage(follower, "before-kill").await;
    assert_eq!(status, 200, "a follower forwards to the leader: {first}");
    let old_term = cluster.cluster_view(leader).await.unwrap()["term"].as_u64().unwrap();

    cluster.member_mut(leader).sigkill();
    let killed_at = Instant::now();
    let survivor = (1..=3).find(|id| *id != leader && *id != follower).unwrap();
    let after = engage_until_committed(&cluster, survivor, "after-kill").await;
    let failover = killed_at.elapsed();
    println!("leader {leader} killed -> engage committed on the new leader in {failover:?}");
    assert!(
        failover <= 3 * ELECTION_TIMEOUT_MAX,
        "failover took {failover:?}, more than 3 election timeouts of {ELECTION_TIMEOUT_MAX:?}"
    );
    assert!(after["index"].as_u64() > first["index"].as_u64());
    let new_leader = cluster.leader_among(&[follower, survivor]).await;
    let view = cluster.cluster_view(new_leader).await.unwrap();
    assert!(view["term"].as_u64().unwrap() > old_term, "{view}");

    // The old leader comes back on its data dir and catches up as a follower.
    cluster.member_mut(leader).restart().unwrap();
    cluster.member_mut(leader).wait_ready().await.unwrap();
    let commit = view["commit"].as_u64().unwrap();
    wait_until("the restarted member to catch up", WAIT, || async {
        let view = cluster.cluster_view(leader).await?;
        (view["applied"].as_u64()? >= commit && view["leader"].as_u64()? == new_leader)
            .then_some(())
    })
    .await
    .unwrap();
    let local = cluster.get(leader, "/estop?stale=true").await;
    assert_eq!(local["engaged"], true);
    assert_eq!(local["request_id"], "before-kill", "the first engagement stays in force");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_leader_cannot_commit_majority_can_heal_gives_one_history_restart_keeps_it() {
    let _serial = serial().await;
    let Some(mut cluster) = Cluster::start("partition", 3).await else { return };
    let old = cluster.leader_among(&[1, 2, 3]).await;
    let majority: Vec<u64> = (1..=3).filter(|id| *id != old).collect();
    assert_eq!(cluster.engage(majority[0], "e1").await.0, 200);
    assert_eq!(cluster.clear(majority[1], "c1").await.0, 200);

    cluster.isolate(old);
    // The minority side: no commit, no linearizable read, only the stale local state.
    let started = Instant::now();
    let (status, body) = cluster.engage(old, "minority-engage").await;
    assert_eq!((status, body["error"].as_str()), (503, Some("no_quorum")), "{body}");
    assert!(started.elapsed() >= Duration::from_millis(COMMIT_TIMEOUT_MS));
    let (status, body) = cluster.member(old).get_json("/estop").await.unwrap();
    assert_eq!((status, body["error"].as_str()), (503, Some("no_quorum")), "{body}");
    let stale = cluster.get(old, "/estop?stale=true").await;
    assert_eq!((stale["engaged"].as_bool(), stale["stale"].as_bool()), (Some(false), Some(true)));
    let (status, body) = cluster.clear(old, "minority-clear").await;
    assert_eq!(status, 503, "{body}");

    // The majority side elects and commits.
    let new = cluster.leader_among(&majority).await;
    assert_ne!(new, old);
    let (status, engaged) = cluster.engage(majority[1], "majority-engage").await;
    assert_eq!(status, 200, "{engaged}");
    let committed = engaged["index"].as_u64().unwrap();
    // The cut-off member has stepped down by now (check-quorum).
    let view = cluster.cluster_view(old).await.unwrap();
    assert_ne!(view["role"], "leader", "{view}");

    cluster.heal();
    wait_until("the old leader to follow and catch up", WAIT, || async {
        let view = cluster.cluster_view(old).await?;
        (view["leader"].as_u64()? == new && view["applied"].as_u64()? >= committed).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let history = one_history(&cluster).await;
    let ids: Vec<&str> = history["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["e1", "c1", "majority-engage"], "the minority's requests never committed");

    // Every member restarts on its data dir: the same state and history.
    for id in 1..=3 {
        cluster.member_mut(id).sigkill();
    }
    for id in 1..=3 {
        cluster.member_mut(id).restart().unwrap();
    }
    for id in 1..=3 {
        cluster.member_mut(id).wait_ready().await.unwrap();
    }
    cluster.leader_among(&[1, 2, 3]).await;
    let after = one_history(&cluster).await;
    assert_eq!(after, history, "state or audit changed across a restart of every member");
    let state = cluster.get(1, "/estop").await;
    assert_eq!(
        (state["engaged"].as_bool(), state["index"].as_u64()),
        (Some(true), Some(committed))
    );
}

/// Reads state and audit linearizably on every member and checks they agree; returns them.
async fn one_history(cluster: &Cluster) -> Value {
    let mut seen: Option<Value> = None;
    for id in 1..=3 {
        let mut state = cluster.get(id, "/estop").await;
        state.as_object_mut().unwrap().remove("leader");
        let audit = cluster.get(id, "/estop/audit").await;
        let view = serde_json::json!({"state": state, "records": audit["records"]});
        if let Some(first) = &seen {
            assert_eq!(&view, first, "member {id} disagrees");
        }
        seen = Some(view);
    }
    seen.unwrap()
}
