"""Helpers shared by the bench scripts (loopback ports, waiting on a condition)."""

import socket
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
