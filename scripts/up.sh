#!/usr/bin/env bash
# The README's main command: installs prerequisites, builds release binaries, and runs
# the whole stack locally with data under ./var/ until Ctrl-C (or SIGTERM), then stops
# every process cleanly. Data stays in ./var/ across runs.
#
#   KEEL_UP_NO_BUILD=1  skip `cargo build --release` (binaries already built)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/prereqs.sh
source scripts/prereqs.sh
keel_install_prereqs

if [ "${KEEL_UP_NO_BUILD:-}" != 1 ]; then
    echo "==> cargo build --release --workspace --bins"
    cargo build --release --workspace --bins
fi
bin=target/release
var=$PWD/var
mkdir -p "$var/log"

pids=()
names=()
stopping=0

stop_all() { # [exit code]
    local code=${1:-0}
    [ "$stopping" = 1 ] && return
    stopping=1
    echo
    echo "==> stopping"
    # Services first (they flush to NATS on the way out), nats-server last.
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill -TERM "${pids[$i]}" 2>/dev/null || true
        wait "${pids[$i]}" 2>/dev/null || true
        echo "    stopped ${names[$i]}"
    done
    echo "==> all stopped; data kept in ./var/"
    exit "$code"
}
trap 'stop_all 0' INT TERM

start() { # name logfile command...
    local name=$1 log=$2
    shift 2
    # Own session: a Ctrl-C reaches only this script, which then stops everyone in order.
    setsid "$@" >>"$log" 2>&1 &
    pids+=($!)
    names+=("$name")
}

wait_ready() { # name url
    local name=$1 url=$2 deadline=$((SECONDS + 60))
    until curl -fsS -o /dev/null "$url" 2>/dev/null || wget -q -O /dev/null "$url" 2>/dev/null; do
        if ((SECONDS > deadline)); then
            echo "$name did not become ready at $url; see ./var/log/" >&2
            stop_all 1
        fi
        sleep 0.1
    done
}

wait_port() { # name port
    local deadline=$((SECONDS + 30))
    until (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; do
        if ((SECONDS > deadline)); then
            echo "$1 did not listen on port $2; see ./var/log/" >&2
            stop_all 1
        fi
        sleep 0.1
    done
}

NATS_URL=nats://127.0.0.1:4222
CLOUD_URL=nats://127.0.0.1:4223
export LOG_FORMAT=json

echo "==> starting nats-server (edge :4222, cloud :4223)"
mkdir -p "$var/nats" "$var/cloud-nats"
start nats-server "$var/log/nats.log" nats-server -a 127.0.0.1 -p 4222 -js -sd "$var/nats" -m 8222
start cloud-nats "$var/log/cloud-nats.log" nats-server -a 127.0.0.1 -p 4223 -js -sd "$var/cloud-nats"
wait_port nats-server 4222
wait_port cloud-nats 4223

PEERS=1=127.0.0.1:7101,2=127.0.0.1:7102,3=127.0.0.1:7103
echo "==> starting services"
for n in 1 2 3; do
    start "safety-quorum-$n" "$var/log/safety-quorum-$n.log" "$bin/safety-quorum" \
        --node-id "$n" --peers "$PEERS" --http-addr "127.0.0.1:809$n" \
        --data-dir "$var/safety-quorum-$n" --nats-url "$NATS_URL"
done
start counter-service "$var/log/counter-service.log" "$bin/counter-service" \
    --node-id counter-1 --http-addr 127.0.0.1:8082 --data-dir "$var/counter-service" \
    --nats-url "$NATS_URL"
start arm-controller "$var/log/arm-controller.log" "$bin/arm-controller" \
    --node-id arm-controller-1 --arm-count 150 --http-addr 127.0.0.1:8081 \
    --data-dir "$var/arm-controller" --nats-url "$NATS_URL"
start edge-cloud-bridge "$var/log/edge-cloud-bridge.log" "$bin/edge-cloud-bridge" \
    --node-id bridge-1 --site site-1 --cloud-url "$CLOUD_URL" --http-addr 127.0.0.1:8084 \
    --data-dir "$var/edge-cloud-bridge" --nats-url "$NATS_URL"

for svc in "arm-controller 8081" "counter-service 8082" "edge-cloud-bridge 8084" \
    "safety-quorum-1 8091" "safety-quorum-2 8092" "safety-quorum-3 8093"; do
    set -- $svc
    wait_ready "$1" "http://127.0.0.1:$2/readyz"
done

# The load generator, at a light rate (150 arms, 100 Hz sensors, the case study's plan and
# cycle rates); its progress line goes to ./var/log/arm-sim.log.
start arm-sim "$var/log/arm-sim.log" "$bin/arm-sim" --arms 150 --sensor-hz 100 \
    --plan-hz 0.0167 --cycle-hz 0.0333 --progress-ms 10000 \
    --controller-url http://127.0.0.1:8081 --nats-url "$NATS_URL"

cat <<TXT

Keel is up (data in ./var/, logs in ./var/log/):

  nats-server (edge)   nats://127.0.0.1:4222   monitor http://127.0.0.1:8222
  nats-server (cloud)  nats://127.0.0.1:4223
  arm-controller       http://127.0.0.1:8081   (150 arms)
  counter-service      http://127.0.0.1:8082
  edge-cloud-bridge    http://127.0.0.1:8084   (site-1)
  safety-quorum 1..3   http://127.0.0.1:8091 8092 8093   raft 7101 7102 7103
  arm-sim              150 arms at 100 Hz (log: ./var/log/arm-sim.log)

Every service answers /healthz, /readyz and /metrics. Ctrl-C stops everything.
TXT

# Stay up until a signal arrives; report (and stop) if a process dies on its own.
while true; do
    for i in "${!pids[@]}"; do
        if ! kill -0 "${pids[$i]}" 2>/dev/null; then
            echo "${names[$i]} exited unexpectedly; see ./var/log/" >&2
            stop_all 1
        fi
    done
    sleep 1 &
    wait $! || true
done
