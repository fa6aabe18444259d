//! Real-process test harness: nats-server, service binaries, SIGKILL, restarts and a partitioning TCP proxy.
