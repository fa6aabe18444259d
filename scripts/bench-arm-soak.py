#!/usr/bin/env python3
"""A long arm-controller run under arm-sim: RSS, CPU and disk bytes over time.

Starts a JetStream nats-server and a release arm-controller (150 arms) on fresh data
dirs, drives them with arm-sim (`--fake-safety-leader`) and samples the controller every
`--sample-s`: VmRSS and RssAnon (/proc/<pid>/status), write_bytes (/proc/<pid>/io, page
granular and an upper bound on this kernel, see BENCHMARKS), CPU ticks, and the sectors
written to the data dir's block device (every process on the machine: meaningful only
when nothing else writes). Prints one line per sample and, with --json, writes every
sample, arm-sim's report and a summary (RSS range and growth over the last
`--flat-window-s`, bytes/day between two sample times).

    scripts/bench-arm-soak.py --duration-s 930 --plan-hz 0.1 --cycle-hz 0.2 --json out.json

Build first: cargo build --release -p arm-controller -p arm-sim
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from bench_common import free_port, start_nats, wait_until

TICKS_PER_S = os.sysconf("SC_CLK_TCK")
SECTOR_BYTES = 512


def http_ok(url):
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def proc_sample(pid):
    status = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    io = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            key, _, value = line.partition(":")
            io[key] = int(value)
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu_ticks = int(fields[11]) + int(fields[12])
    kb = lambda key: int(status.get(key, "0 kB").split()[0])  # noqa: E731
    return {
        "rss_kb": kb("VmRSS"),
        "rss_anon_kb": kb("RssAnon"),
        "write_bytes": io["write_bytes"],
        "cpu_s": cpu_ticks / TICKS_PER_S,
    }


def device_stat_path(path):
    dev = os.stat(path).st_dev
    return f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat"


def sectors_written(stat_path):
    with open(stat_path) as f:
        return int(f.read().split()[6])


def dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin-dir", default="target/release")
    ap.add_argument("--duration-s", type=int, default=930)
    ap.add_argument("--arms", type=int, default=150)
    ap.add_argument("--sensor-hz", type=float, default=2000.0)
    ap.add_argument("--plan-hz", type=float, default=1 / 60)
    ap.add_argument("--cycle-hz", type=float, default=1 / 30)
    ap.add_argument("--safety-timeout-ms", type=int, default=50)
    ap.add_argument("--sample-s", type=float, default=30.0)
    ap.add_argument("--flat-window-s", type=float, default=600.0)
    ap.add_argument("--disk-from-s", type=float, default=60.0,
                    help="bytes/day from this sample time to the end")
    ap.add_argument("--dir", help="data dirs go here (default: a temp dir, removed)")
    ap.add_argument("--data-dir", help="the controller's data dir (default: under --dir); "
                    "on a file system of its own, device bytes are the controller's alone")
    ap.add_argument("--controller-arg", action="append", default=[])
    ap.add_argument("--sim-arg", action="append", default=[],
                    help="passed to arm-sim (e.g. --sim-arg=--floor)")
    ap.add_argument("--nats-dir", help="JetStream store (default: beside the data dir; "
                    "a tmpfs keeps nats-server's writes off the measured device)")
    ap.add_argument("--json")
    args = ap.parse_args()

    for tool in ("nats-server",):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found (scripts/prereqs.sh installs it)")
    base = args.dir or tempfile.mkdtemp(prefix="keel-soak-")
    os.makedirs(base, exist_ok=True)
    data = args.data_dir or os.path.join(base, "arm-controller")
    os.makedirs(data, exist_ok=True)
    nats_port, http_port = free_port(), free_port()
    nats_url = f"nats://127.0.0.1:{nats_port}"
    logs = open(os.path.join(base, "logs.txt"), "ab")
    procs = []

    def stop_all():
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

    try:
        procs.append(start_nats(nats_port, args.nats_dir or os.path.join(base, "nats"), logs))
        ctl = subprocess.Popen(
            [os.path.join(args.bin_dir, "arm-controller"), "--node-id", "soak",
             "--arm-count", str(args.arms), "--http-addr", f"127.0.0.1:{http_port}",
             "--data-dir", data, "--nats-url", nats_url,
             "--safety-timeout-ms", str(args.safety_timeout_ms), *args.controller_arg],
            stdout=logs, stderr=logs)
        procs.append(ctl)
        wait_until("arm-controller /readyz",
                   lambda: http_ok(f"http://127.0.0.1:{http_port}/readyz"), 30)
        stat_path = device_stat_path(data)
        sim_out = open(os.path.join(base, "arm-sim.json"), "wb")
        # arm-sim's progress lines go to logs.txt when asked for (--sim-arg=--progress-ms=250).
        asked = any(a.startswith("--progress-ms") for a in args.sim_arg)
        progress = [] if asked else ["--progress-ms", "0"]
        sim = subprocess.Popen(
            [os.path.join(args.bin_dir, "arm-sim"), "--arms", str(args.arms),
             "--sensor-hz", str(args.sensor_hz), "--plan-hz", str(args.plan_hz),
             "--cycle-hz", str(args.cycle_hz), "--duration-s", str(args.duration_s),
             "--controller-url", f"http://127.0.0.1:{http_port}", "--nats-url", nats_url,
             "--fake-safety-leader", "--json", *progress, *args.sim_arg],
            stdout=sim_out, stderr=logs)
        procs.append(sim)
        started = time.monotonic()
        samples = []
        next_at = 0.0
        while True:
            t = time.monotonic() - started
            if t >= next_at or sim.poll() is not None:
                s = proc_sample(ctl.pid)
                s["t_s"] = round(t, 1)
                s["device_bytes"] = sectors_written(stat_path) * SECTOR_BYTES
                s["data_dir_bytes"] = dir_bytes(data)
                samples.append(s)
                print(f"t={s['t_s']:7.1f}s rss={s['rss_kb'] / 1024:6.1f}MB "
                      f"anon={s['rss_anon_kb'] / 1024:6.1f}MB cpu={s['cpu_s']:8.1f}s "
                      f"write_bytes={s['write_bytes']:>12} device={s['device_bytes']:>14}",
                      flush=True)
                next_at += args.sample_s
            if sim.poll() is not None:
                break
            time.sleep(0.2)
        sim_out.close()
        with open(os.path.join(base, "arm-sim.json")) as f:
            text = f.read()
        try:
            sim_report = json.loads(text)
        except ValueError:
            sim_report = {"unparsed": text[-2000:]}
        # The controller's own view at the end: sample -> live-state lag (a summary with
        # quantiles) and samples counted, once the count has caught up with what arm-sim sent
        # (the last frames are still in flight when arm-sim exits) or after 5 s.
        sent = sim_report.get("sensors", {}).get("samples_sent", 0)
        controller_metrics = {}

        def caught_up():
            controller_metrics.clear()
            url = f"http://127.0.0.1:{http_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as resp:
                for line in resp.read().decode().splitlines():
                    if line.startswith(("keel_arm_sensor_lag_seconds",
                                        "keel_arm_sensor_samples")):
                        key, _, value = line.rpartition(" ")
                        controller_metrics[key] = float(value)
            return controller_metrics.get("keel_arm_sensor_samples_total", 0) >= sent

        deadline = time.monotonic() + 5
        while not caught_up() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop_all()

    last = samples[-1]
    window = [s for s in samples if s["t_s"] >= last["t_s"] - args.flat_window_s]
    disk = [s for s in samples if s["t_s"] >= args.disk_from_s]
    summary = {
        "rss_mb_max": max(s["rss_kb"] for s in samples) / 1024,
        "flat_window_s": last["t_s"] - window[0]["t_s"],
        "flat_rss_mb_first": window[0]["rss_kb"] / 1024,
        "flat_rss_mb_last": last["rss_kb"] / 1024,
        "flat_rss_mb_min": min(s["rss_kb"] for s in window) / 1024,
        "flat_rss_mb_max": max(s["rss_kb"] for s in window) / 1024,
    }
    if len(disk) >= 2:
        span = disk[-1]["t_s"] - disk[0]["t_s"]
        per_day = 86_400 / span
        summary.update({
            "disk_window_s": span,
            "write_bytes_per_day": (disk[-1]["write_bytes"] - disk[0]["write_bytes"]) * per_day,
            "device_bytes_per_day": (disk[-1]["device_bytes"] - disk[0]["device_bytes"]) * per_day,
            "cpu_fraction": (disk[-1]["cpu_s"] - disk[0]["cpu_s"]) / span,
        })
    print(json.dumps(controller_metrics, indent=1))
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "samples": samples, "sim": sim_report,
                       "controller_metrics": controller_metrics, "summary": summary}, f,
                      indent=1)
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
