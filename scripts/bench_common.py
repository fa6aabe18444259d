"""Helpers shared by the bench scripts (loopback ports, waiting on a condition, nats-server)."""

import socket
import subprocess
import sys
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what, check, timeout_s, poll_s=0.02):
    """Polls `check` until it is true (OSError counts as not yet); exits after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(poll_s)
    sys.exit(f"timed out waiting for {what}")


def start_nats(port, store_dir, logs):
    """A JetStream nats-server on loopback `port`, storing in `store_dir`; returns once it
    accepts connections."""
    nats = subprocess.Popen(["nats-server", "-a", "127.0.0.1", "-p", str(port), "-js",
                             "-sd", store_dir], stdout=logs, stderr=logs)
    wait_until("nats-server", lambda: socket.create_connection(
        ("127.0.0.1", port), timeout=1).close() or True, 10)
    return nats
