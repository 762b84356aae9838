"""How to join a Ray cluster given by address and what travels to its nodes; shared by ingest and training.

What a job sends to every node of a cluster joined by address:
- code: the project's packages (`pipeline`, `training`) as Ray `py_modules`, so a node needs only the third-party
  dependencies (an image built from `infra/docker/Dockerfile`, or the same venv), not clipforge itself;
- storage settings that are not secret (endpoint, region, profile name) as `runtime_env` variables. Ray shows a
  job's runtime_env in its dashboard and State API, so credentials never go there: keys given in the config travel as
  a Ray object (`ship_credentials`), and otherwise every node uses the credentials of its own environment.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from pipeline import storage

# the packages a Ray worker imports: training's worker function and the pipeline code it calls
WORKER_PACKAGES = ("pipeline", "training")


def ray_init_kwargs(address: str | None) -> dict[str, Any]:
    """Keyword arguments for `ray.init` that join the cluster at `address` (None: $RAY_ADDRESS, else a new local Ray).

    A cluster addressed on loopback registered its nodes there, so this process must look for its local raylet there
    too: Ray otherwise rewrites 127.0.0.1 to the machine's network address and finds no raylet (ray-project/ray#59110).
    """
    if address is None and not os.environ.get("RAY_ADDRESS"):
        # "local" starts a Ray of our own: None would join any cluster that `ray start` runs on this machine (Ray
        # finds it through /tmp/ray/ray_current_cluster), someone else's included. RAY_ADDRESS (set by KubeRay for
        # a RayJob's entrypoint) still wins.
        return {"address": "local"}
    host = (address or "").rsplit(":", 1)[0]
    loopback = {"_node_ip_address": "127.0.0.1"} if host in ("127.0.0.1", "localhost") else {}
    return {"address": address, **loopback}


def package_dirs(packages: tuple[str, ...] = WORKER_PACKAGES) -> list[str]:
    """The folders of the project's packages as this process imports them (what `py_modules` uploads)."""
    dirs = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue  # e.g. a package another branch has not added yet
        dirs.append(str(Path(next(iter(spec.submodule_search_locations))).resolve()))
    return dirs


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
        env["py_modules"] = package_dirs(packages)
        env["excludes"] = ["__pycache__", "*.pyc"]
    return env or None


def ship_credentials(storage_config: storage.StorageConfig | None) -> Any:
    """A Ray object holding the config's explicit keys (None when there are none), for workers to `adopt`.

    An object's value is sent to the workers that read it and to nowhere else: it is not in the job table, the State
    API's task and actor records, Ray Train's run records or the logs (tests/test_cluster.py greps all of them).
    """
    import ray

    credentials = storage.explicit_credentials(storage_config)
    return ray.put(credentials) if credentials else None


def adopt_credentials(credentials_ref: Any) -> None:
    """In a Ray worker: take the driver's explicit keys, if it shipped any, for this process's storage calls."""
    if credentials_ref is not None:
        import ray

        storage.adopt_credentials(ray.get(credentials_ref))


def missing_code_message(err: BaseException) -> str | None:
    """A one-line explanation when a Ray worker could not import the project, else None."""
    text = f"{type(err).__name__}: {err}"
    for package in ("pipeline", "training", "flows"):
        if f"No module named '{package}" in text:
            return (f"a Ray node could not import clipforge ({text.splitlines()[0]}): install it on every node (the "
                    "image infra/docker/Dockerfile) or join the cluster by address, which ships the code to the nodes")
    return None
