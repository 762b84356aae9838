"""How this process reaches Ray: join a cluster by address, or start a local one for the job and take it down after.

Shared by ingest (img2dataset's Ray distributor) and training. A local Ray is `ray start --head` on 127.0.0.1 with
free ports and its dashboard, so that Ray's State API exists (without it, Ray Train's controller polls it and floods
the output with `PlacementGroupCleaner ... Failed to query` warnings) and a person can watch the job; its address is
printed. It runs in a process group of its own: Ctrl-C in the terminal reaches this process only, and when the job
ends (normally, by an error, Ctrl-C or SIGTERM) that group is stopped by its id, the dashboard and runtime-env agents
included. A joined cluster is only disconnected from.

What a job sends to the nodes of a cluster it joins by address (`RAY_ADDRESS`, set by KubeRay for a RayJob's
entrypoint, counts as one):
- the code: the project's packages (`pipeline`, `training`) as Ray `py_modules`, so a node needs only the third-party
  dependencies (the image `infra/docker/Dockerfile`, or the same venv), not clipforge itself;
- storage settings that are not secret (endpoint, region, profile name) as `runtime_env` variables. Ray shows a job's
  runtime_env in its dashboard and State API, so credentials never go there: keys given in the config travel as a
  Ray object (`ship_credentials`), and otherwise every node uses the credentials of its own environment.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from infra.processes import free_port, still_running
from pipeline import storage
from pipeline.errors import UserError

# the packages a Ray worker imports: training's worker function and the pipeline code it calls
WORKER_PACKAGES = ("pipeline", "training")


def ray_init_kwargs(address: str | None) -> dict[str, Any]:
    """Keyword arguments for `ray.init` that join the cluster at `address` (None: start a new local Ray).

    A cluster addressed on loopback registered its nodes there, so this process must look for its local raylet there
    too: Ray otherwise rewrites 127.0.0.1 to the machine's network address and finds no raylet (ray-project/ray#59110).
    """
    host = (address or "").rsplit(":", 1)[0]
    loopback = {"_node_ip_address": "127.0.0.1"} if host in ("127.0.0.1", "localhost") else {}
    return {"address": address, **loopback}


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UserError(f"the local Ray did not start (`ray start` exited with status {process.returncode}); "
                            f"its logs are under /tmp/ray/session_latest/logs")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise UserError(f"the local Ray did not open its port {port} within {timeout:.0f} s")


def _enable_token_auth() -> None:
    """Ray's token authentication for the local cluster, exactly as a bare `ray.init()` sets it up for a new one
    (ray/_private/worker.py): RAY_AUTH_MODE=token unless the user set a mode, a token in the user's token file
    (`~/.ray/auth_token`, or RAY_AUTH_TOKEN_PATH) made if missing; `ray start` below inherits both."""
    from ray._private.authentication.authentication_token_setup import (  # ray
        enable_token_auth_by_default, ensure_token_if_auth_enabled)

    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    enable_token_auth_by_default()
    ensure_token_if_auth_enabled({}, create_token_if_missing=True)


def start_local_ray(num_cpus: int | None = None) -> tuple[subprocess.Popen, str, str]:
    """`ray start --head` on 127.0.0.1 with free ports and token authentication, in a process group of its own
    (stopped by its pid, never by `ray stop`); returns (process, GCS address, dashboard URL)."""
    ports = {name: free_port() for name in ("port", "dashboard-port", "ray-client-server-port",
                                             "dashboard-agent-listen-port", "metrics-export-port")}
    ray = str(Path(sys.executable).with_name("ray"))
    _enable_token_auth()
    command = [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
               "--include-dashboard=true", "--disable-usage-stats", *(f"--{k}={v}" for k, v in ports.items())]
    if num_cpus:
        command.append(f"--num-cpus={num_cpus}")
    process = subprocess.Popen(command, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    _guard(process.pid)
    try:
        _wait_for_port(ports["port"], process)
    except BaseException:
        stop_local_ray(process)
        raise
    return process, f"127.0.0.1:{ports['port']}", f"http://127.0.0.1:{ports['dashboard-port']}"


# A watchdog in its own process: when the process that started the local Ray is gone however it ended (SIGKILL, or a
# thread that never unwound), the Ray's process group goes too. It exits with the group.
_GUARD = """
import os, signal, sys, time
owner, group = int(sys.argv[1]), int(sys.argv[2])
def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
while alive(owner) and alive(group):
    time.sleep(1)
for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        break
    time.sleep(10)
"""


def _guard(group: int) -> None:
    subprocess.Popen([sys.executable, "-c", _GUARD, str(os.getpid()), str(group)], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_local_ray(process: subprocess.Popen, grace: float = 3.0) -> None:
    """SIGTERM the Ray started by `start_local_ray` (its process group: head, workers, dashboard and runtime-env
    agents), SIGKILL what is left after `grace` seconds. A few seconds are all SIGTERM ever gets done: the GCS, raylet
    and dashboard end within two, while `ray start --block`, the autoscaler's monitor and idle workers outlast 20."""
    with contextlib.suppress(psutil.Error):
        leader = psutil.Process(process.pid)
        members = [*leader.children(recursive=True), leader]
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, sig)
            alive = still_running(members, wait)
            if not alive:
                break
        for leftover in alive:  # a member that left the group: by its pid
            with contextlib.suppress(psutil.Error):
                leftover.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


@contextlib.contextmanager
def ray_session(address: str | None = None, env_vars: dict[str, str] | None = None,
                num_cpus: int | None = None, packages: tuple[str, ...] = WORKER_PACKAGES) -> Iterator[None]:
    """Ray for the block: the cluster at `address`, or a local Ray started now and taken down on exit.

    A Ray already initialised in this process (a test, a flow that keeps it) is used as it is and left running.
    Workers' output stays in Ray's log files: progress reaches the driver through its own channel and errors through
    the job's exception, so the terminal shows what a user needs and not Ray's internals.
    """
    import ray  # ray

    if ray.is_initialized():
        yield
        return
    local = None
    address = address or os.environ.get("RAY_ADDRESS") or None  # a RayJob's entrypoint: the cluster KubeRay made
    if not address:
        local, address, dashboard = start_local_ray(num_cpus)
        print(f"Ray dashboard: {dashboard} (while the job runs)", file=sys.stderr, flush=True)
    try:
        # RAY_ADDRESS for every process of the job: Ray Train's controller asks the State API for "the" cluster,
        # which fails on a machine that runs more than one Ray
        # a joined cluster's nodes may lack clipforge: its packages travel with the job
        code = code_runtime_env(packages) if local is None else {}
        ray.init(log_to_driver=False, logging_level=logging.WARNING,  # ray
                 runtime_env={"env_vars": {**(env_vars or {}), "RAY_ADDRESS": address}, **code},
                 **ray_init_kwargs(address))
        yield
    finally:
        # this process leaves first: a driver whose local Ray dies under it ends itself with status 1 (its core worker
        # retries lost objects and quits when the raylet is gone), before any clean-up or message of ours
        with contextlib.suppress(Exception):
            ray.shutdown()  # ray: a thread still waiting on the cluster gets an error
        if local is not None:
            stop_local_ray(local)


# ---------------------------------------------------------------------------------------------------------------------
# what travels to the nodes


def package_dirs(packages: tuple[str, ...] = WORKER_PACKAGES) -> list[str]:
    """The folders of the project's packages as this process imports them (what `py_modules` uploads)."""
    dirs = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        dirs.append(str(Path(next(iter(spec.submodule_search_locations))).resolve()))
    return dirs


def code_runtime_env(packages: tuple[str, ...] = WORKER_PACKAGES) -> dict[str, Any]:
    """The `runtime_env` fields that ship the project's packages to every node (a package URI in Ray's job API)."""
    return {"py_modules": package_dirs(packages), "excludes": ["__pycache__", "*.pyc"]}


def runtime_env(storage_config: storage.StorageConfig | None, ship_code: bool,
                packages: tuple[str, ...] = WORKER_PACKAGES) -> dict[str, Any] | None:
    """The `runtime_env` of a job: the code when `ship_code` (joining a cluster by address), the storage settings.

    Nothing in it is secret: Ray records it in the job table that `GET /api/jobs/` and `ray list jobs` show.
    """
    env: dict[str, Any] = {}
    variables = storage.cluster_env(storage_config)
    if variables:
        env["env_vars"] = variables
    if ship_code:
        env.update(code_runtime_env(packages))
    return env or None


def ship_credentials(storage_config: storage.StorageConfig | None) -> Any:
    """A Ray object holding the config's explicit keys (None when there are none), for workers to `adopt`.

    An object's value is sent to the workers that read it and to nowhere else: it is not in the job table, the State
    API's task and actor records, Ray Train's run records or the logs (tests/test_cluster.py greps all of them).
    """
    import ray  # ray

    credentials = storage.explicit_credentials(storage_config)
    return ray.put(credentials) if credentials else None  # ray


def adopt_credentials(credentials_ref: Any) -> None:
    """In a Ray worker: take the driver's explicit keys, if it shipped any, for this process's storage calls."""
    if credentials_ref is not None:
        import ray  # ray

        storage.adopt_credentials(ray.get(credentials_ref))  # ray


def missing_code_message(err: BaseException) -> str | None:
    """A one-line explanation when a Ray worker could not import the project, else None."""
    text = f"{type(err).__name__}: {err}"
    for package in ("pipeline", "training", "evaluation", "flows"):
        if f"No module named '{package}" in text:
            return (f"a Ray node could not import clipforge ({text.splitlines()[0]}): install it on every node (the "
                    "image infra/docker/Dockerfile) or join the cluster by address, which ships the code to the nodes")
    return None
