"""Stopping the servers `infra/` starts: by process group (the leader's pid), never by name.

Each server is started with `start_new_session=True`, so it leads a process group of its own; stopping it sends
SIGTERM to that group, then SIGKILL after a grace period, and nothing else on the machine is touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import psutil


def free_ports(count: int = 1, host: str = "127.0.0.1", avoid: frozenset[int] = frozenset()) -> list[int]:
    """`count` distinct ports the OS reports free on `host` (held open together so that they differ)."""
    sockets: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
            if sock.getsockname()[1] not in avoid:
                ports.append(sock.getsockname()[1])
    finally:
        for sock in sockets:
            sock.close()
    return ports


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a process that has not ended. A zombie has ended: it only waits for its parent to reap it,
    or, once its parent is gone, for whoever adopted it (a container's PID 1 may never reap)."""
    try:
        return _running(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def still_running(processes: list[psutil.Process], timeout: float = 0.0) -> list[psutil.Process]:
    """Those of `processes` still running after up to `timeout` seconds (zombies have ended)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [process for process in processes if _running(process)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.2)


def running_in_group(group: int) -> list[psutil.Process]:
    """The processes of a process group that have not ended (zombies have)."""
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(ProcessLookupError, psutil.Error):
            if os.getpgid(process.pid) == group:
                members.append(process)
    return still_running(members)


def _running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def stop_group(pid: int, process: subprocess.Popen[bytes] | None, grace: float) -> None:
    """SIGTERM the process group led by `pid`, SIGKILL it after `grace` seconds, and reap the leader. The group is
    signalled even when its leader has ended: it may still hold what the leader started."""
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


def run_in_foreground(name: str, start: Callable[[], ServerHandle], failure: type[Exception],
                      ready: Callable[[ServerHandle, float], str], log_tail: Callable[[ServerHandle], str]) -> int:
    """The foreground mode of `python -m infra.*`: start the server (a `failure` is one line on stderr, exit status
    1), print `ready(server, seconds it took)`, then block until Ctrl-C/SIGTERM (exit status 0) or until the server
    dies on its own (1, with its exit code and `log_tail(server)` on stderr); the server is stopped either way."""
    stop_requested = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop_requested.set())
    started = time.monotonic()
    try:
        server = start()
    except failure as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(ready(server, time.monotonic() - started))
    print("# Ctrl-C to stop", flush=True)
    try:
        while not stop_requested.wait(1.0):
            if not server.running():
                print(f"error: {name} exited (code {server.exit_code()}){log_tail(server)}", file=sys.stderr)
                return 1
    finally:
        server.stop()
    print("# stopped", flush=True)
    return 0


class ServerHandle:
    """What the handles of `infra/` servers share (a mixin for dataclasses with `pid`, `process` and `_stopped`):
    liveness, stopping by process group, and use as a context manager. `stop_grace` is each server's own."""

    stop_grace: float = 5.0

    def running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return pid_alive(self.pid)

    def exit_code(self) -> int | None:
        """The server's exit status once it has exited (None while it runs, or if this process did not start it)."""
        return self.process.poll() if self.process is not None else None

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM the server's process group, SIGKILL it after `grace` seconds. Safe to call twice."""
        if not self._stopped:
            self._stopped = True  # signal the group once: its id may be reused by someone else later
            stop_group(self.pid, self.process, self.stop_grace if grace is None else grace)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

