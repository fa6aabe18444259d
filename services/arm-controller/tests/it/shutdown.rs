//! SIGTERM: in-flight work finishes, a last snapshot is taken, and the process exits 0
//! promptly even while NATS is away; the next start replays nothing.

use std::time::Duration;

use crate::support::{self, plan};

#[tokio::test]
async fn sigterm_without_nats_exits_0_after_a_last_snapshot() {
    let Some(mut stack) =
        support::start("sigterm", &["--arm-count", "2", "--safety-timeout-ms", "60000"]).await
    else {
        return;
    };
    stack.wait_state("arm-001", "running").await;
    for v in 1..=20 {
        assert_eq!(stack.put_plan("arm-001", &plan(&format!("u{v}"), v, &[0.0; 6])).await.0, 200);
    }
    stack.nats.kill();
    let status = stack.svc.sigterm(Duration::from_secs(8)).await.unwrap();
    assert!(status.success(), "exit {status}\n{}", stack.svc.log_tail(20));
    stack.nats.restart().unwrap();
    stack.svc.restart().unwrap();
    stack.svc.wait_ready().await.unwrap();
    let (_, current) = stack.svc.get_json("/arms/arm-001/plan").await.unwrap();
    assert_eq!(current["version"], 20);
    assert_eq!(support::metric(&stack.svc, "keel_arm_recovery_events_replayed", "").await, 0.0);
    assert_eq!(support::metric(&stack.svc, "keel_arm_recovery_snapshot_position", "").await, 20.0);
}
