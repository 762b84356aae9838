"""How this process reaches Ray: join a cluster by address, or start a local one for the job and take it down after.

Shared by ingest (img2dataset's Ray distributor) and training. A local Ray is started with its dashboard on
127.0.0.1, so that Ray's State API exists (without it, Ray Train's controller polls it and floods the output with
`PlacementGroupCleaner ... Failed to query` warnings) and a person can watch the job; its address is printed. When
the job ends (normally, by an error, Ctrl-C or SIGTERM) a Ray this process started is shut down together with every
process it spawned, the dashboard and runtime-env agents included; a joined cluster is only disconnected from.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections.abc import Iterator
from typing import Any

import psutil


def ray_init_kwargs(address: str | None) -> dict[str, Any]:
    """Keyword arguments for `ray.init` that join the cluster at `address` (None: start a new local Ray).

    A cluster addressed on loopback registered its nodes there, so this process must look for its local raylet there
    too: Ray otherwise rewrites 127.0.0.1 to the machine's network address and finds no raylet (ray-project/ray#59110).
    A local Ray is asked for as `address="local"`: a bare `ray.init()` would join any other Ray started on the machine.
    """
    if not address:
        return {"address": "local", "include_dashboard": True, "dashboard_host": "127.0.0.1"}
    host = address.rsplit(":", 1)[0]
    loopback = {"_node_ip_address": "127.0.0.1"} if host in ("127.0.0.1", "localhost") else {}
    return {"address": address, **loopback}


def _descendants() -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process().children(recursive=True)
    return []


def stop_processes(processes: list[psutil.Process], grace: float = 5.0) -> None:
    """SIGTERM these processes (by pid, as recorded), SIGKILL those still alive after `grace` seconds."""
    alive = [p for p in processes if p.is_running()]
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(alive, timeout=grace)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=grace)


@contextlib.contextmanager
def ray_session(address: str | None = None, env_vars: dict[str, str] | None = None) -> Iterator[None]:
    """Ray for the block: the cluster at `address`, or a local Ray started now and taken down on exit.

    A Ray already initialised in this process (a test, a flow that keeps it) is used as it is and left running.
    """
    import ray  # ray

    if ray.is_initialized():
        yield
        return
    spawned_before = {p.pid for p in _descendants()}
    context = ray.init(log_to_driver=True, logging_level=logging.WARNING,  # ray
                       runtime_env={"env_vars": env_vars} if env_vars else None, **ray_init_kwargs(address))
    if not address and context.dashboard_url:
        print(f"Ray dashboard: http://{context.dashboard_url} (while the job runs)", file=sys.stderr, flush=True)
    # recorded now and again at the end: Ctrl-C reaches Ray's processes too, and an agent whose raylet died first
    # is no longer our descendant by then
    started = {p.pid: p for p in _descendants() if p.pid not in spawned_before} if not address else {}
    try:
        yield
    finally:
        if not address:
            started.update({p.pid: p for p in _descendants() if p.pid not in spawned_before})
        with contextlib.suppress(Exception):
            ray.shutdown()  # ray
        stop_processes(list(started.values()))
