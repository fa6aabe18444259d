#!/usr/bin/env python3
"""arm-controller recovery after SIGKILL under load, on a log of 1,000,000 events.

Fills a data dir with `fill-log` (EVENTS plan events over 150 arms, a snapshot TAIL events
before the end), starts a JetStream nats-server, then runs TRIALS times: spawn the release
controller, poll `/readyz` (a fresh loopback connection every 0.5 ms) and time spawn -> 200,
read the controller's own recovery metrics, drive it with arm-sim (150 arms x 10 plan
updates/s over HTTP, `--fake-safety-leader`) until at least `--acks-before-kill` more updates
were acknowledged, and SIGKILL it mid-load. So every trial after the first recovers from a
crash: the newest snapshot, its tail, and the events past the last durable index
checkpoint. After the last trial the log's hash chain is verified over HTTP.

    scripts/bench-arm-recovery.py --json out.json

Build first: cargo build --release -p arm-controller -p arm-sim --examples
"""

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from bench_common import free_port, start_nats, wait_until

POLL_S = 0.0005


def get(port, path, timeout_s=1.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def metric_values(port):
    """The controller's Prometheus metrics as {name{labels}: value}."""
    _, body = get(port, "/metrics")
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def acked_updates(port):
    return sum(v for k, v in metric_values(port).items()
               if k.startswith("keel_arm_plan_updates_total") and 'status="200"' in k)


def pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin-dir", default="target/release")
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--arms", type=int, default=150)
    ap.add_argument("--tail", type=int, default=5_000)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--acks-before-kill", type=int, default=2_000)
    ap.add_argument("--dir", help="data dirs go here (default: a temp dir, removed)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if shutil.which("nats-server") is None:
        sys.exit("nats-server not found (scripts/prereqs.sh installs it)")
    base = args.dir or tempfile.mkdtemp(prefix="keel-recovery-")
    os.makedirs(base, exist_ok=True)
    data = os.path.join(base, "arm-controller")
    shutil.rmtree(data, ignore_errors=True)
    logs = open(os.path.join(base, "logs.txt"), "ab")
    fill = subprocess.run(
        [os.path.join(args.bin_dir, "examples", "fill-log"), data, str(args.events),
         str(args.arms), str(args.tail)], check=True, capture_output=True, text=True)
    print(fill.stdout.strip(), flush=True)
    nats_port = free_port()
    nats_url = f"nats://127.0.0.1:{nats_port}"
    nats = start_nats(nats_port, os.path.join(base, "nats"), logs)
    trials = []
    ctl = sim = None
    try:
        for trial in range(args.trials):
            port = free_port()
            started = time.monotonic()
            ctl = subprocess.Popen(
                [os.path.join(args.bin_dir, "arm-controller"), "--node-id", "recovery",
                 "--arm-count", str(args.arms), "--http-addr", f"127.0.0.1:{port}",
                 "--data-dir", data, "--nats-url", nats_url], stdout=logs, stderr=logs)
            wait_until("arm-controller /readyz", lambda: get(port, "/readyz")[0] == 200, 30,
                       POLL_S)
            ready_ms = (time.monotonic() - started) * 1e3
            m = metric_values(port)
            row = {
                "trial": trial,
                "spawn_to_ready_ms": ready_ms,
                "recovery_ms": m.get("keel_arm_recovery_seconds", float("nan")) * 1e3,
                "events_replayed": m.get("keel_arm_recovery_events_replayed"),
                "snapshot_position": m.get("keel_arm_recovery_snapshot_position"),
            }
            if trial + 1 < args.trials:
                before = acked_updates(port)
                sim = subprocess.Popen(
                    [os.path.join(args.bin_dir, "arm-sim"), "--arms", str(args.arms),
                     "--sensor-hz", "0", "--plan-hz", "10", "--cycle-hz", "0",
                     "--duration-s", "600", "--controller-url", f"http://127.0.0.1:{port}",
                     "--nats-url", nats_url, "--fake-safety-leader", "--progress-ms", "0"],
                    stdout=subprocess.DEVNULL, stderr=logs)
                wait_until(f"{args.acks_before_kill} acknowledged updates",
                           lambda: acked_updates(port) - before >= args.acks_before_kill, 120)
                row["acked_before_kill"] = acked_updates(port) - before
                ctl.kill()  # SIGKILL, mid-load
                ctl.wait()
                sim.send_signal(signal.SIGTERM)
                sim.wait(timeout=10)
                sim = None
            else:
                status, body = get(port, "/log/verify", timeout_s=120)
                row["verify"] = json.loads(body) if status == 200 else {"status": status}
                ctl.send_signal(signal.SIGTERM)
                ctl.wait(timeout=10)
            ctl = None
            trials.append(row)
            print(json.dumps(row), flush=True)
    finally:
        for p in (sim, ctl, nats):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    after_kill = [t["spawn_to_ready_ms"] for t in trials[1:]]
    summary = {
        "events": args.events,
        "first_after_fill_ms": trials[0]["spawn_to_ready_ms"],
        "after_sigkill": {
            "n": len(after_kill),
            "p50_ms": pct(after_kill, 0.5) if after_kill else None,
            "max_ms": max(after_kill) if after_kill else None,
        },
        "recovery_ms_max": max(t["recovery_ms"] for t in trials),
        "verify": trials[-1].get("verify"),
    }
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "trials": trials}, f, indent=1)
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
