//! Starts, serves the shared endpoints, rides out a NATS outage, exits 0 on SIGTERM, and
//! refuses bad flags with exit 64.

const BIN: &str = env!("CARGO_BIN_EXE_safety-quorum");

#[tokio::test]
async fn serves_survives_nats_loss_and_exits_cleanly() {
    testkit::conformance::service_lifecycle(BIN, &["--node-id", "1"]).await.unwrap();
}

#[test]
fn bad_flag_value_exits_64_with_a_reason() {
    testkit::conformance::invalid_flag_exits_64(
        BIN,
        &["--node-id", "5", "--peers", "1=127.0.0.1:7101"],
        "--node-id",
    )
    .unwrap();
}

#[test]
fn an_unreadable_or_malformed_token_file_exits_64_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let malformed = dir.path().join("tokens");
    std::fs::write(&malformed, "alice safety not-a-hash\n").unwrap();
    let missing = dir.path().join("absent");
    for file in [&malformed, &missing] {
        let file = file.to_str().unwrap();
        testkit::conformance::invalid_flag_exits_64(
            BIN,
            &["--node-id", "1", "--auth-tokens-file", file],
            "--auth-tokens-file",
        )
        .unwrap();
    }
}

#[test]
fn a_data_dir_holding_the_other_raft_store_exits_64_instead_of_starting_empty() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    // A member that ran on redb, restarted with the default (wal) store.
    std::fs::write(dir.path().join("raft.redb"), b"").unwrap();
    testkit::conformance::invalid_flag_exits_64(
        BIN,
        &["--node-id", "1", "--data-dir", data],
        "--raft-store",
    )
    .unwrap();
    std::fs::remove_file(dir.path().join("raft.redb")).unwrap();
    std::fs::create_dir(dir.path().join("raft-wal")).unwrap();
    testkit::conformance::invalid_flag_exits_64(
        BIN,
        &["--node-id", "1", "--data-dir", data, "--raft-store", "redb"],
        "--raft-store",
    )
    .unwrap();
}
