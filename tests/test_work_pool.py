"""The deployments of `prefect.yaml` on a process work pool, as production runs them: `prefect work-pool create`,
`prefect deploy --all`, `prefect worker start`, then `prefect deployment run clip-train/clip-train` to Completed
through the worker (not through `serve`), its data, run and registry on object storage (SeaweedFS: its endpoint in
the flow's one `storage` parameter, the keys in a Prefect Secret block it names). Commands run as a user types them,
against the multi-user form of the Prefect server: its database on PostgreSQL (infra/postgres.py) and API
authentication on, which refuses a client without the auth string. (The SQLite form runs the same flow through
`serve` on local folders in tests/test_deployments.py.)
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.test_deployments import _client, _stop_group

ROOT = Path(__file__).resolve().parents[1]
POOL = "clipforge"


def prefect(*args: str, env: dict, timeout: int = 180) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).with_name("prefect")), "--no-prompt", *args]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def api_status(api_url: str, path: str, auth_string: str | None) -> int:
    request = urllib.request.Request(f"{api_url}{path}", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    if auth_string:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth_string.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def stop_worker(worker: subprocess.Popen) -> None:
    """`prefect worker start` ignores SIGTERM; a second SIGINT stops it. Then anything left in its group goes."""
    for _ in range(2):
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.wait(15)
    _stop_group(worker)


def deploy_and_run_through_a_worker(api_env: dict[str, str], root: Path, location: str) -> None:
    """The whole work-pool path against the server `api_env` points at: pool, deploy, worker, a run to Completed that
    writes everything under `location` (an S3 prefix) and nothing in `root`. The worker's environment has neither the
    endpoint nor the keys: each step must reach storage through the run's `storage` parameter alone, which names the
    endpoint and a Prefect Secret block holding the keys."""
    from pipeline import storage
    from pipeline.catalog import build_openmoji_catalog, serve_directory, write_url_list
    from pipeline.manifest import read_manifest
    from pipeline.registry import promoted

    env = {**os.environ, **api_env, "CLIPFORGE_SOURCE": str(ROOT)}
    created = prefect("work-pool", "create", POOL, "--type", "process", env=env)
    assert created.returncode == 0, created.stdout + created.stderr
    deployed = prefect("deploy", "--all", env=env)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

    catalog = build_openmoji_catalog(root / "catalog", image_size=32, limit=200)
    worker_log = root / "worker.log"
    with serve_directory(catalog) as base_url, open(worker_log, "wb") as log:
        lists = {split: write_url_list(catalog, base_url, split, root / f"{split}.parquet")
                 for split in ("train", "val")}
        endpoint = {name: env[name] for name in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
        keys = {"access_key_id": env["AWS_ACCESS_KEY_ID"], "secret_access_key": env["AWS_SECRET_ACCESS_KEY"]}
        with _client(api_env["PREFECT_API_URL"], api_env.get("PREFECT_API_AUTH_STRING")):  # settings for the save
            from prefect.blocks.system import Secret

            Secret(value=keys).save("pool-s3-keys")
        worker_env = {k: v for k, v in env.items() if k not in {*endpoint, *storage.CREDENTIAL_VARIABLES}}
        worker = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", POOL,
                                   "--limit", "1"], env=worker_env, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            parameters = {
                "ingest": {"train_urls": str(lists["train"]), "val_urls": str(lists["val"]),
                           "output": storage.join(location, "data"), "image_size": 32, "samples_per_shard": 50, "processes": 1,
                           "threads": 8},
                "train": {"preset": "tiny", "steps": 6, "batch_size": 32, "warmup_steps": 2, "checkpoint_every": 6,
                          "log_every": 2, "loader_workers": 1, "num_workers": 1, "output": storage.join(location, "run")},
                "evaluation": {"label_field": "group", "templates": "emoji", "batch_size": 64},
                "registry": {"location": storage.join(location, "registry"), "model_name": "pool"},
                "storage": {"endpoint_url": endpoint["AWS_ENDPOINT_URL"], "region": endpoint["AWS_DEFAULT_REGION"],
                            "credentials_block": "pool-s3-keys"},
            }
            run = prefect("deployment", "run", "clip-train/clip-train", "--params", json.dumps(parameters), env=env)
            assert run.returncode == 0, run.stdout + run.stderr
            flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1)
            deadline = time.monotonic() + 900
            while True:
                with _client(api_env["PREFECT_API_URL"], api_env.get("PREFECT_API_AUTH_STRING")) as client:
                    flow_run = client.read_flow_run(flow_run_id)
                if flow_run.state is not None and flow_run.state.is_final():
                    break
                assert worker.poll() is None, worker_log.read_text(errors="replace")[-4000:]
                assert time.monotonic() < deadline, worker_log.read_text(errors="replace")[-4000:]
                time.sleep(2)
        finally:
            stop_worker(worker)
    log_text = worker_log.read_text(errors="replace")
    assert flow_run.state.is_completed(), f"{flow_run.state.message}\n{log_text[-4000:]}"
    assert flow_run.work_pool_name == POOL, "the run went through the work pool"
    assert flow_run_id in log_text, "the worker picked the run up"
    version = promoted(storage.join(location, "registry"), "pool")
    assert version is not None and all(dataset.startswith(location) for dataset in version.dataset)
    assert read_manifest(version.dataset[0]).location.endswith("train-filtered")
    fs, prefix = storage.filesystem(location)
    for written in ("run/model/model.safetensors", "run/eval/metrics.json", "run/brand/scores/report.html",
                    "run/phases.json", "data/train-filtered/report.html", "data/val/manifest.parquet"):
        assert fs.exists(f"{prefix}/{written}"), written
    assert not [p for p in ("data", "run", "registry") if (root / p).exists()], "written locally instead"


@pytest.mark.slow
def test_deploy_and_run_through_a_process_worker_on_postgres_with_auth_to_s3(tmp_path: Path, s3_env: str) -> None:
    import asyncio

    import asyncpg

    from infra.postgres import PostgresError, binary, start_postgres
    from infra.prefect_server import prefect_server

    try:
        binary("initdb")
    except PostgresError as err:
        pytest.skip(str(err))
    # PostgreSQL runs as the `postgres` user when we are root: its folder must be reachable by it (pytest's is not)
    shared = Path(tempfile.mkdtemp(prefix="clipforge-pg-"))
    shared.chmod(0o755)
    auth = f"clipforge:{os.urandom(12).hex()}"
    try:
        with start_postgres(shared / "pg", password=os.urandom(12).hex()) as database, \
                prefect_server(tmp_path / "prefect", database_url=database.url(), auth_string=auth) as server:
            # API authentication: refused without the auth string or with a wrong one, accepted with it
            assert api_status(server.api_url, "/work_pools/filter", None) == 401
            assert api_status(server.api_url, "/work_pools/filter", "clipforge:wrong") == 401
            assert api_status(server.api_url, "/work_pools/filter", auth) == 200
            unauthenticated = {k: v for k, v in server.env().items() if k != "PREFECT_API_AUTH_STRING"}
            refused = prefect("work-pool", "ls", env={**os.environ, **unauthenticated})
            assert refused.returncode != 0

            deploy_and_run_through_a_worker(server.env(), tmp_path, s3_env)
            with _client(server.api_url, auth) as client:
                nightly = client.read_deployment_by_name("nightly-finetune/nightly")
            assert nightly.work_pool_name == POOL
            assert [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == [("0 2 * * *", "UTC")]

            async def runs_in_postgres() -> int:  # the server's state is in PostgreSQL, not in a SQLite file
                connection = await asyncpg.connect(database.url(driver="postgresql"))
                try:
                    return await connection.fetchval("SELECT count(*) FROM flow_run")
                finally:
                    await connection.close()

            assert asyncio.run(runs_in_postgres()) >= 1
            assert not (tmp_path / "prefect" / "prefect.db").exists()
    finally:
        shutil.rmtree(shared, ignore_errors=True)
