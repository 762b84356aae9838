"""Deployments against a real Prefect server: `clipforge serve` (as `python -m flows.serve_cli`) in a subprocess,
runs started with `prefect deployment run` from the command line, as a user would.

All slow: one server, one serve process and one served catalog for the module (127.0.0.1, stopped by PID).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RUN_TIMEOUT = 600
DEMO_TIMEOUT = 1500  # the whole main job; 8 minutes on a quiet 2-core machine, far more while CI shares it


@dataclass
class Served:
    root: Path
    env: dict[str, str]
    api_url: str
    train_list: Path
    val_list: Path
    serve_log: Path

    def log_tail(self, chars: int = 6000) -> str:
        return self.serve_log.read_text(errors="replace")[-chars:]


def _client(api_url: str, auth_string: str | None = None):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    class _Client:  # a sync client bound to the test's server, whatever the process settings say
        def __enter__(self):
            self._settings = temporary_settings(updates={PREFECT_API_URL: api_url,
                                                         PREFECT_API_AUTH_STRING: auth_string})
            self._settings.__enter__()
            self._client = get_client(sync_client=True).__enter__()
            return self._client

        def __exit__(self, *exc):
            self._client.__exit__(*exc)
            self._settings.__exit__(*exc)

    return _Client()


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the serve process's group (it pauses the schedules and exits), SIGKILL it after 20 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # whatever it started (flow runs, their Ray) goes too
    except ProcessLookupError:
        pass
    process.wait(10)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from infra.prefect_server import prefect_server
    from pipeline.catalog import build_openmoji_catalog, serve_directory, write_url_list

    root = tmp_path_factory.mktemp("deployments")
    catalog = build_openmoji_catalog(root / "catalog", limit=300)
    with serve_directory(catalog) as base_url, prefect_server(root / "prefect") as server:
        train_list = write_url_list(catalog, base_url, "train", root / "lists" / "train.parquet")
        val_list = write_url_list(catalog, base_url, "val", root / "lists" / "val.parquet")
        env = {**os.environ, **server.env(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        serve_log = root / "serve.log"
        with open(serve_log, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "flows.serve_cli", "--timezone", "Europe/Paris"], cwd=root, env=env,
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        served = Served(root, env, server.api_url, train_list, val_list, serve_log)
        try:
            deadline = time.monotonic() + 120
            while True:
                assert process.poll() is None, f"clipforge serve exited:\n{served.log_tail()}"
                with _client(server.api_url) as client:
                    names = {d.name for d in client.read_deployments()}
                if {"clip-train", "nightly"} <= names:
                    break
                assert time.monotonic() < deadline, f"deployments not registered:\n{served.log_tail()}"
                time.sleep(1)
            yield served
        finally:
            _stop_group(process)


def _deployment_run(served: Served, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    prefect = str(Path(sys.executable).with_name("prefect"))  # the venv's, as a user with it activated runs it
    return subprocess.run([prefect, "deployment", "run", "clip-train/clip-train", *args], env=served.env,
                          cwd=served.root, capture_output=True, text=True, timeout=timeout)


def _start(served: Served, parameters: dict) -> str:
    run = _deployment_run(served, "--params", json.dumps(parameters))
    assert run.returncode == 0, run.stdout + run.stderr
    return re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1)


def _wait(served: Served, flow_run_id: str):
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        with _client(served.api_url) as client:
            flow_run = client.read_flow_run(flow_run_id)
        if flow_run.state is not None and flow_run.state.is_final():
            return flow_run
        time.sleep(2)
    pytest.fail(f"flow run {flow_run_id} did not finish in {RUN_TIMEOUT} s:\n{served.log_tail()}")


def _parameters(served: Served, name: str, val_list: str | None = None) -> dict:
    """Tiny-preset parameters: a few dozen steps on the 300-emoji catalog."""
    return {
        "ingest": {"train_urls": str(served.train_list), "val_urls": val_list or str(served.val_list),
                   "output": str(served.root / name / "data"), "samples_per_shard": 64, "processes": 1,
                   "threads": 8},
        "train": {"preset": "tiny", "steps": 24, "batch_size": 32, "warmup_steps": 4, "checkpoint_every": 8,
                  "log_every": 4, "loader_workers": 1, "output": str(served.root / name / "run")},
        "evaluation": {"label_field": "group", "templates": "emoji", "batch_size": 64},
        "registry": {"location": str(served.root / "registry"), "model_name": name},
    }


def test_deployments_and_schedule(served: Served) -> None:
    with _client(served.api_url) as client:
        nightly = client.read_deployment_by_name("nightly-finetune/nightly")
        clip = client.read_deployment_by_name("clip-train/clip-train")
    assert [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == [("0 2 * * *", "Europe/Paris")]
    assert clip.schedules == [] and clip.enforce_parameter_schema
    train_form = clip.parameter_openapi_schema["definitions"]["TrainSettings"]["properties"]
    assert train_form["batch_size"]["description"].startswith("Global contrastive batch")


@pytest.mark.timeout(DEMO_TIMEOUT + 120)  # the run's own limit, not the suite's default
def test_a_run_with_no_parameters_runs_the_main_job_on_the_embedded_defaults(served: Served) -> None:
    """`prefect deployment run clip-train/clip-train` with nothing else (the UI's Quick run) is the demo: the bundled
    catalog served over loopback, the demo's settings, everything under `.clipforge` of the serving process. The run
    registers and promotes the model with its lineage, and leaves its reports and Prefect artifacts."""
    from pipeline.manifest import read_manifest
    from pipeline.registry import list_versions, promoted

    run = _deployment_run(served, "--watch", "--watch-timeout", str(DEMO_TIMEOUT), timeout=DEMO_TIMEOUT + 60)
    assert run.returncode == 0 and "Completed" in run.stdout, run.stdout + run.stderr + served.log_tail()
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1)
    workdir = served.root / ".clipforge"
    registry = str(workdir / "registry")
    version = promoted(registry, "openmoji-clip")
    assert version is not None and [v.version for v in list_versions(registry, "openmoji-clip")] == [version.version]
    assert version.config["train"]["preset"] == "small" and version.config["train"]["patch_dropout"] == 0.5
    assert version.config["ingest"]["train_urls"].endswith("lists/openmoji/train.parquet")  # the bundled catalog's
    assert version.config["runtime"]["device"] == "cpu"
    assert version.parent is None and len(version.dataset) == 2
    assert all(read_manifest(d).num_samples > 0 for d in version.dataset)
    assert version.metrics["retrieval.text_to_image.R@10"] > 0.1  # chance is 0.025 on the 402 validation emoji
    assert 0 <= version.metrics["zero_shot.acc@1"] <= 1
    demo = workdir / "runs" / "demo"
    phases = json.loads((demo / "phases.json").read_text())
    assert list(phases) == ["catalog", "ingest", "filter", "train", "evaluate", "brand", "register"]
    filtered = read_manifest(version.dataset[0])  # the training set is the filtered one, with its accounting
    assert filtered.location.endswith("train-filtered") and (Path(filtered.location) / "report.html").exists()
    assert filtered.summary.successes + filtered.summary.failed == filtered.summary.input_rows
    assert filtered.summary.failures.get("contaminated", 0) >= 47  # OpenMoji's own copies of validation drawings
    assert (demo / "eval" / "report.html").stat().st_size > 0 and (demo / "eval" / "metrics.json").exists()
    assert (demo / "brand" / "scores" / "report.html").exists()

    with _client(served.api_url) as client:
        artifacts = client.read_artifacts()  # this module's first run: every artifact so far is its own
    by_key: dict[str, list] = {}
    for artifact in artifacts:
        by_key.setdefault(artifact.key, []).append(artifact)
    assert str(by_key["clip-train-report"][0].flow_run_id) == flow_run_id
    report = by_key["clip-train-report"][0].data
    assert f"openmoji-clip@{version.version}" in report and "report.html" in report and "manifest.parquet" in report
    assert "zero_shot.acc@1" in report and "| majority class |" in report
    metrics_table = by_key["clip-train-metrics"][0]
    assert metrics_table.type == "table" and "retrieval.text_to_image.R@5" in json.dumps(metrics_table.data)
    table = json.loads(metrics_table.data) if isinstance(metrics_table.data, str) else metrics_table.data
    rows = {row["metric"]: row for row in table}  # zero-shot beside its majority baseline
    assert rows["zero_shot.balanced_accuracy"]["majority"] == pytest.approx(0.1)  # 10 Unicode groups in val
    assert 0.5 < rows["zero_shot.acc@1"]["majority"] < 0.7  # People & Body is most of val
    for key in ("ingest-progress", "train-progress"):
        assert any(a.type == "progress" and float(a.data) == 100.0 for a in by_key[key]), key
    assert {"ingest-summary", "filter-summary", "train-metrics", "evaluation-metrics", "brand-scores"} <= set(by_key)
    assert "filter report" in report


def test_invalid_parameters_are_rejected_with_the_field_named(served: Served) -> None:
    with _client(served.api_url) as client:
        runs_before = len(client.read_flow_runs())
    ingest = json.dumps({"ingest": _parameters(served, "invalid")["ingest"]})

    run = _deployment_run(served, "--params", ingest, "--param", 'train={"batch_size": -1}')
    assert run.returncode != 0
    assert "Validation failed for field 'train.batch_size'" in " ".join(run.stdout.split()), run.stdout

    run = _deployment_run(served, "--params", json.dumps({**json.loads(ingest), "train": {"bogus": 1}}))
    assert run.returncode != 0 and "'bogus' was unexpected" in run.stdout, run.stdout

    run = _deployment_run(served, "--params", json.dumps({**json.loads(ingest), "registry": {"promote": "maybe"}}))
    assert run.returncode != 0 and "registry.promote" in " ".join(run.stdout.split()), run.stdout

    with _client(served.api_url) as client:
        assert len(client.read_flow_runs()) == runs_before  # nothing was started


def test_failing_step_fails_the_run_clearly_and_keeps_finished_work(served: Served) -> None:
    from pipeline.manifest import read_manifest
    from pipeline.registry import list_versions

    missing = served.root / "lists" / "missing-val.parquet"
    flow_run = _wait(served, _start(served, _parameters(served, "failing", val_list=str(missing))))
    assert flow_run.state.is_failed()
    assert f"URL list {missing} does not exist" in flow_run.state.message, flow_run.state.message
    assert "Traceback" not in flow_run.state.message
    # the train list was ingested before the val list failed: its shards and manifest stay for the re-run
    train = read_manifest(str(served.root / "failing" / "data" / "train"))
    assert train.num_samples > 0 and all(Path(url).exists() for url in train.shard_urls())
    assert list_versions(str(served.root / "registry"), "failing") == []


def test_serve_starts_a_local_server_when_none_is_configured(tmp_path: Path) -> None:
    import threading
    import urllib.request

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    process = subprocess.Popen([sys.executable, "-m", "flows.serve_cli", "--prefect-home", str(tmp_path / "prefect")],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 180
        ui_url = None
        while ui_url is None:
            assert process.poll() is None and time.monotonic() < deadline, "".join(lines)[-4000:]
            ui_url = next((m.group(1) for line in list(lines) if (m := re.search(r"Prefect UI: (\S+)", line))), None)
            time.sleep(0.5)
        assert ui_url.startswith("http://127.0.0.1:")
        while True:  # the deployments reach the server it started
            with _client(f"{ui_url}/api") as client:
                if {"clip-train", "nightly"} <= {d.name for d in client.read_deployments()}:
                    break
            assert process.poll() is None and time.monotonic() < deadline, "".join(lines)[-4000:]
            time.sleep(1)
    finally:
        _stop_group(process)
    with pytest.raises(OSError):  # stopping `clipforge serve` stopped its server
        urllib.request.urlopen(f"{ui_url}/api/health", timeout=5)
