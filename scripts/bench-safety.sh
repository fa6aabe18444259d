#!/usr/bin/env bash
# safety-quorum benchmark: floors, commit latency, failover, trip-to-stop, memory, and etcd
# beside it. Needs nats-server and etcd (apt-get install -y nats-server etcd-server).
# Usage: scripts/bench-safety.sh [--json var/bench-safety.json] [--entries N] [--no-etcd] ...
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p safety-quorum -p arm-controller --bins --examples
exec target/release/examples/quorum-bench "$@"
