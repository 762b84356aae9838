"""Two hosts on loopback: a Ray head and a second Ray node, each a separate process tree with a clean environment
(no PYTHONPATH, no AWS variable, an interpreter in which clipforge is not importable), token authentication on, and
output on SeaweedFS with enforced keys given to the driver in a config file. Ingest and training run over that
cluster; the code reaches the nodes as Ray `py_modules` and the keys as a Ray object. Afterwards no secret may appear
in the nodes' session folders (logs included), the command output, the dashboard's job, State and Train APIs, or
anything the run wrote to storage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from infra.processes import free_port, running_in_group
from pipeline import storage
from pipeline.catalog import build_openmoji_catalog, serve_directory, write_url_list
from pipeline.cluster import stop_local_ray
from pipeline.manifest import read_manifest
from tests.conftest import TEST_BUCKET
from tests.raycluster import ray_node


def test_runtime_env_ships_the_code_and_no_secret() -> None:
    from pipeline import cluster

    config = storage.StorageConfig(endpoint_url="http://127.0.0.1:9", access_key_id="key-id", secret_access_key="s")
    env = cluster.runtime_env(config, ship_code=True)
    assert [Path(p).name for p in env["py_modules"]] == ["pipeline", "training"]
    assert env["env_vars"] == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    assert "key-id" not in json.dumps(env)
    assert "py_modules" not in cluster.runtime_env(config, ship_code=False)  # a local Ray shares this interpreter


def test_a_node_without_clipforge_is_named_in_one_line() -> None:
    from pipeline import cluster

    message = cluster.missing_code_message(ModuleNotFoundError("No module named 'training'"))
    assert message is not None and "\n" not in message and "install it on every node" in message
    assert cluster.missing_code_message(ModuleNotFoundError("No module named 'numpy'")) is None


def clean_interpreter(root: Path) -> str:
    """A venv that sees this venv's third-party packages but not clipforge (its editable-install hook is a .pth file
    in site-packages, which a path line in another .pth does not run): a node "without clipforge installed"."""
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = Path(sysconfig.get_paths(vars={"base": str(root), "platbase": str(root)})["purelib"])
    (site / "third-party.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return str(root / "bin" / "python")


def dashboard(port: int, path: str, token: str | None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def files_containing(root: str, secret: bytes) -> list[str]:
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):
                try:
                    if secret in Path(path).read_bytes():
                        found.append(path)
                except OSError:
                    pass
    return found


@pytest.mark.slow
def test_ingest_and_training_over_two_clean_nodes(seaweedfs, tmp_path: Path) -> None:
    location = f"s3://{TEST_BUCKET}/tests/cluster-{os.urandom(4).hex()}"
    secrets = {"access_key_id": seaweedfs.access_key, "secret_access_key": seaweedfs.secret_key}
    settings = {"endpoint_url": seaweedfs.endpoint_url, "region": seaweedfs.region, **secrets}
    explicit = storage.StorageConfig(**settings)

    node_python = clean_interpreter(tmp_path / "node-venv")
    token = os.urandom(16).hex()
    # what the cluster gives each node: its interpreter, a token, nothing of the driver's (no AWS, no PYTHONPATH)
    node_env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8", "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": token, "NO_ALBUMENTATIONS_UPDATE": "1"}
    probe = subprocess.run([node_python, "-c", "import ray, img2dataset, torch; import training"], env=node_env,
                           cwd=tmp_path, capture_output=True, text=True)
    assert "No module named 'training'" in probe.stderr, "the nodes must not have clipforge"

    # the driver: this checkout, keys only in its config file (explicit keys), no AWS variable
    driver_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    driver_env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    port, dashboard_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    head_dir, worker_dir = tempfile.mkdtemp(prefix="cfh"), tempfile.mkdtemp(prefix="cfw")  # short socket paths
    nodes = [ray_node(["--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=true",
                       "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"], head_dir, node_env,
                      python=node_python)]
    outputs = []
    try:
        root = tmp_path / "data"
        catalog = build_openmoji_catalog(root / "catalog", image_size=32, limit=400)
        time.sleep(8)  # the second node needs the head's GCS
        nodes.append(ray_node([f"--address={address}", "--node-ip-address=127.0.0.1"], worker_dir, node_env,
                              python=node_python))

        shards = storage.join(location, "shards")
        output = storage.join(location, "run")
        ingest_file, train_file = tmp_path / "ingest.yaml", tmp_path / "train.yaml"
        for path, config in ((ingest_file, {"output": shards, "image_size": 32, "samples_per_shard": 50,
                                            "threads": 8, "ray_address": address}),
                             (train_file, {"data": shards, "output": output, "num_workers": 2, "steps": 8,
                                           "checkpoint_every": 8, "cpus_per_worker": 1, "preset": "tiny",
                                           "batch_size": 32, "warmup_steps": 2, "log_every": 2,
                                           "loader_workers": 1, "ray_address": address})):
            path.write_text(yaml.safe_dump({**config, "storage": settings}))
            path.chmod(0o600)

        with serve_directory(catalog) as base_url:
            urls = write_url_list(catalog, base_url, "all", root / "urls.parquet")
            ingest = subprocess.run([sys.executable, "-m", "flows.cli", "ingest", "--config", str(ingest_file),
                                     "--urls", str(urls)], env=driver_env, capture_output=True, text=True,
                                    timeout=600)
        outputs.append(ingest.stdout + ingest.stderr)
        assert ingest.returncode == 0, outputs[-1][-3000:]
        assert read_manifest(shards, explicit).num_samples > 300

        train = None
        for _ in range(3):  # the second node may take a few seconds to register
            train = subprocess.run([sys.executable, "-m", "flows.cli", "train", "--config", str(train_file)],
                                   env=driver_env, capture_output=True, text=True, timeout=600)
            outputs.append(train.stdout + train.stderr)
            if train.returncode == 0:
                break
            time.sleep(5)
        assert train.returncode == 0, outputs[-1][-3000:]

        fs, path = storage.filesystem(output, explicit)
        records = [json.loads(fs.cat_file(p)) for p in fs.glob(f"{path}/workers/*.json")]
        assert sorted(r["rank"] for r in records) == [0, 1]
        assert len({r["node_id"] for r in records}) == 2, "the two workers ran on the two nodes"
        assert fs.exists(f"{path}/model/model.safetensors")
        # nor in anything the run wrote: manifests, checkpoints (their saved config), metrics, logs, the model
        bucket_fs, prefix = storage.filesystem(location, explicit)
        written = bucket_fs.find(prefix)
        assert len(written) > 20
        assert not [p for p in written if seaweedfs.secret_key.encode() in bucket_fs.cat_file(p)]

        # Ray's token authentication refuses a client without the token: over HTTP and as a driver
        status, _ = dashboard(dashboard_port, "/api/jobs/", None)
        assert status in (401, 403), status
        intruder = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{address}')"],
                                  env={**driver_env, "RAY_AUTH_TOKEN": "0" * 32}, capture_output=True, text=True,
                                  timeout=120)
        assert intruder.returncode != 0, intruder.stderr[-2000:]
        # what Ray shows about the jobs: the runtime_env carried the code and the endpoint, never a key
        status, jobs = dashboard(dashboard_port, "/api/jobs/", token)
        assert status == 200 and "py_modules" in jobs and seaweedfs.endpoint_url in jobs, jobs[:2000]
        for api in ("/api/jobs/", "/api/v0/tasks?detail=1&limit=10000", "/api/v0/actors?detail=1&limit=10000",
                    "/api/train/v2/runs", "/nodes?view=summary"):
            status, text = dashboard(dashboard_port, api, token)
            for secret in secrets.values():
                assert secret not in text, f"{api} shows a credential"
    finally:
        for node in reversed(nodes):
            stop_local_ray(node)
    for node in nodes:
        assert not running_in_group(node.pid), "a node we started is still running"
    for secret in (seaweedfs.secret_key,):  # the key id is not secret, the secret key is
        assert not files_containing(head_dir, secret.encode()), "a Ray session file holds the secret"
        assert not files_containing(worker_dir, secret.encode()), "a Ray session file holds the secret"
        assert all(secret not in text for text in outputs)
