"""Ray nodes started by tests with `ray start --block`, each in its own process group, stopped by that group's id as
the CLI stops the local Ray it starts (`stop_local_ray`; never `ray stop`, which would stop every Ray of the user on
the machine)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from infra.processes import free_port
from pipeline.cluster import stop_local_ray


def ray_node(args: list[str], temp_dir: str, env: dict, python: str | None = None) -> subprocess.Popen:
    """`ray start --block` in its own process group: stopping it (by its pid) stops that node and nothing else.

    `python`: the interpreter the node (and so its workers) runs, e.g. one without clipforge; default this one's.
    """
    ray = [python, "-m", "ray.scripts.scripts"] if python else [str(Path(sys.executable).with_name("ray"))]
    return subprocess.Popen([*ray, "start", "--block", "--num-cpus=1", "--disable-usage-stats",
                             f"--temp-dir={temp_dir}", *args], start_new_session=True, env=env, cwd=temp_dir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def loopback_head(prefix: str) -> Iterator[tuple[str, dict]]:
    """A one-CPU Ray head on 127.0.0.1 with token authentication for the block: yields (its address, the environment
    a client needs to join it)."""
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex()}
    head = ray_node(["--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=false"],
                    tempfile.mkdtemp(prefix=prefix), env)
    try:
        time.sleep(8)
        yield f"127.0.0.1:{port}", env
    finally:
        stop_local_ray(head)
