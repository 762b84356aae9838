"""Stopping the servers `infra/` starts: by process group (the leader's pid), never by name.

Each server is started with `start_new_session=True`, so it leads a process group of its own; stopping it sends
SIGTERM to that group, then SIGKILL after a grace period, and nothing else on the machine is touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(pid: int, process: subprocess.Popen[bytes] | None, grace: float) -> None:
    """SIGTERM the process group led by `pid`, SIGKILL it after `grace` seconds, and reap the leader."""
    if process is None and not pid_alive(pid):
        return
    if process is None or process.poll() is None:
        signal_group(pid, signal.SIGTERM)
        if not wait_exit(pid, process, grace):
            signal_group(pid, signal.SIGKILL)
            wait_exit(pid, process, grace)
    # anything the leader started is still in the group (and keeps the group id from being reused): end it too
    signal_group(pid, signal.SIGKILL)


def signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # the group id is the leader's pid (start_new_session=True)


def wait_exit(pid: int, process: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    if process is not None:
        try:
            process.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return False
