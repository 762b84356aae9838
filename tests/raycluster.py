"""Ray nodes started by tests with `ray start --block`, each in its own process group, stopped by that group's id
(never `ray stop`, which would stop every Ray of the user on the machine)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil


def ray_node(args: list[str], temp_dir: str, env: dict, python: str | None = None) -> subprocess.Popen:
    """`ray start --block` in its own process group: stopping it (by its pid) stops that node and nothing else.

    `python`: the interpreter the node (and so its workers) runs, e.g. one without clipforge; default this one's.
    """
    ray = [python, "-m", "ray.scripts.scripts"] if python else [str(Path(sys.executable).with_name("ray"))]
    return subprocess.Popen([*ray, "start", "--block", "--num-cpus=1", "--disable-usage-stats",
                             f"--temp-dir={temp_dir}", *args], start_new_session=True, env=env, cwd=temp_dir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_node(process: subprocess.Popen) -> None:
    group = [p for p in psutil.process_iter() if in_group(p, process.pid)]
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        _, alive = psutil.wait_procs(group, timeout=wait)
        if not alive:
            break


def in_group(process: psutil.Process, group: int) -> bool:
    try:
        return os.getpgid(process.pid) == group
    except (ProcessLookupError, psutil.Error):
        return False
