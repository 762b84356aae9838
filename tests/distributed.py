"""Test code in a few fresh processes joined by gloo on loopback, the way one Ray Train worker per process would be.

`spawn` never hangs the session: a process group that does not finish within its deadline is killed and the test
fails, and the processes are daemons, so nothing outlives the test run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from infra.processes import free_port


def spawn(fn: Callable[..., None], args: tuple, nprocs: int = 2, timeout: float = 300.0) -> None:
    """Run `fn(rank, world_size, port, *args)` in `nprocs` spawned processes; raise on the first error."""
    context = mp.start_processes(fn, args=(nprocs, free_port(), *args), nprocs=nprocs, join=False, daemon=True,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{nprocs} gloo processes did not finish within {timeout:.0f} s")


def init_gloo(rank: int, world_size: int, port: int) -> None:
    """One process of the group: gloo over loopback only, one torch thread (the test machines have 2 cores)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
