"""Flows: parameter models, retry policy, nightly bookkeeping, and the promoted pointer and state file that a SIGKILL
never leaves half-written (fast); nightly-finetune end to end against a real Prefect server (slow)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
from prefect.states import Failed
from pydantic import ValidationError

from flows.evaluate_flow import headline_metrics, metric_value
from flows.nightly import (NightlyParams, NightlyState, batch_name, combine_url_lists, list_url_lists,
                           promotion_decision, read_state, write_state)
from flows.params import (EvaluationSettings, FinetuneSettings, FlowStorage, IngestParams, IngestSettings,
                          TrainSettings, demo_settings, resolve_storage, retry_unless_user_error)
from pipeline.errors import UserError
from pipeline.ingest import json_safe
from pipeline.manifest import read_manifest
from pipeline.registry import get_version, list_versions, promote, promoted, promotion, register_model
from pipeline.storage import StorageConfig

# --- parameter models -----------------------------------------------------------------------------------------------


def test_settings_keep_the_configs_fields_bounds_and_descriptions() -> None:
    assert "data" not in TrainSettings.model_fields
    assert TrainSettings.model_fields["batch_size"].description.startswith("Global contrastive batch")
    with pytest.raises(ValidationError, match="batch_size"):
        TrainSettings(batch_size=-1)
    with pytest.raises(ValidationError, match="bogus"):
        TrainSettings(bogus=1)
    assert list(IngestParams.model_fields)[:3] == ["train_urls", "val_urls", "output"]
    assert "urls" not in IngestParams.model_fields and "urls" not in IngestSettings.model_fields
    assert {"model", "data", "output"}.isdisjoint(EvaluationSettings.model_fields)
    finetune = FinetuneSettings()
    assert "init_from" not in FinetuneSettings.model_fields
    assert (finetune.lr, finetune.steps) == (1e-4, 100)  # the nightly run's own schedule


def test_each_bundled_catalog_choice_has_its_own_shards_run_and_model() -> None:
    """Switching `clipforge demo --catalog` (or ingest.catalog) never resumes another choice's shards or run."""
    from flows.demo import demo_parameters

    choices = {c: demo_parameters(Path("/w/.clipforge"), catalog=c) for c in ("openmoji", "fluent", "both")}
    assert demo_parameters(Path("/w/.clipforge")) == {**choices["openmoji"], "ingest": {
        k: v for k, v in choices["openmoji"]["ingest"].items() if k != "catalog"}}  # openmoji is the default
    for part in ("ingest", "train"):
        outputs = {c["ingest"]["catalog"]: c[part]["output"] for c in choices.values()}
        assert len(set(outputs.values())) == 3 and all(o.startswith("/w/.clipforge/") for o in outputs.values())
    assert choices["openmoji"]["train"]["output"] == "/w/.clipforge/runs/demo"  # where earlier demos left their run
    assert {c: demo_settings(c)["registry"]["model_name"] for c in choices} == {
        "openmoji": "openmoji-clip", "fluent": "fluent-clip", "both": "emoji-clip"}
    with pytest.raises(ValidationError, match="catalog"):
        IngestParams(catalog="bogus")


def test_flow_parameter_schema_describes_every_field() -> None:
    from prefect.utilities.callables import parameter_schema

    from flows.clip_train import clip_train
    from flows.nightly import nightly_finetune

    schema = parameter_schema(clip_train).model_dump()
    assert list(schema["properties"]) == ["ingest", "train", "filtering", "evaluation", "brand", "registry",
                                          "storage"]
    assert not schema.get("required")  # no parameters: the main job on the embedded defaults
    definitions = schema["definitions"]
    for model in ("IngestParams", "TrainSettings", "FilterSettings", "EvaluationSettings", "BrandSettings",
                  "ClipTrainRegistry", "FlowStorage"):
        properties = definitions[model]["properties"]
        missing = [name for name, field in properties.items() if not field.get("description")]
        assert not missing, f"{model} fields without description: {missing}"
        assert definitions[model]["additionalProperties"] is False
        # storage is one flow parameter that every step uses, not a setting of each step
        assert model == "FlowStorage" or "storage" not in properties, model
    assert "credentials_block" in definitions["FlowStorage"]["properties"]
    secret = definitions["FlowStorage"]["properties"]["secret_access_key"]["anyOf"][0]
    assert secret["format"] == "password" and secret["writeOnly"]  # the run form masks it
    nightly = parameter_schema(nightly_finetune).model_dump()
    assert not nightly.get("required")  # a scheduled run needs no parameters
    assert "storage" in nightly["properties"]
    assert not [m for m, d in nightly["definitions"].items() if m != "FlowStorage" and "storage" in d["properties"]]


def test_retries_skip_user_errors() -> None:
    assert retry_unless_user_error(None, None, Failed(data=UserError("URL list x does not exist"))) is False
    assert retry_unless_user_error(None, None, Failed(data=ConnectionResetError("reset by peer"))) is True


# --- nightly bookkeeping --------------------------------------------------------------------------------------------


def test_promotion_decision_by_tolerance() -> None:
    assert promotion_decision("m", 0.50, 0.50, 0.0)[0] is True
    assert promotion_decision("m", 0.48, 0.50, 0.05)[0] is True
    promote_it, reason = promotion_decision("m", 0.40, 0.50, 0.05)
    assert promote_it is False and "keeping the promoted model" in reason and "0.4000" in reason
    assert promotion_decision("m", 0.55, 0.50, -0.1)[0] is False  # negative tolerance: must improve by 0.1
    assert promotion_decision("m", 0.3, None, 0.0)[0] is True
    with pytest.raises(UserError, match="no metric 'zero_shot.acc@1'"):
        promotion_decision("zero_shot.acc@1", None, 0.5, 0.0)


def test_metric_paths() -> None:
    metrics = {"num_images": 4, "zero_shot": {"acc@1": 0.5, "chance": {"acc@1": 0.1}, "confusion_matrix": [[1]]},
               "retrieval": {"text_to_image": {"R@5": 0.25}}}
    assert metric_value(metrics, "retrieval.text_to_image.R@5") == 0.25
    assert metric_value(metrics, "zero_shot.acc@5") is None
    assert headline_metrics(metrics) == {"num_images": 4, "zero_shot.acc@1": 0.5, "retrieval.text_to_image.R@5": 0.25}


def test_new_url_lists_are_found_and_combined(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    (incoming / "2026" / "05").mkdir(parents=True)
    (incoming / "_clipforge").mkdir()
    pq.write_table(pa.table({"url": ["http://a/1.png"], "caption": ["one"], "captions": [["one", "uno"]]}),
                   incoming / "a.parquet")
    (incoming / "2026" / "05" / "b.csv").write_text('url,caption,group,captions\nhttp://a/2.png,two,g,"[""two""]"\n')
    (incoming / "c.jsonl").write_text(json.dumps({"url": "http://a/3.png", "caption": "three"}) + "\n")
    (incoming / "notes.txt").write_text("not a list")
    (incoming / "_clipforge" / "x.parquet").write_bytes(b"ours")
    (incoming / ".partial.csv").write_text("uploading")
    assert list_url_lists(str(incoming)) == ["2026/05/b.csv", "a.parquet", "c.jsonl"]
    assert list_url_lists(str(tmp_path / "absent")) == []
    assert batch_name(["a.parquet", "c.jsonl"]) == batch_name(["c.jsonl", "a.parquet"]) != batch_name(["a.parquet"])

    combined = combine_url_lists([str(incoming / n) for n in list_url_lists(str(incoming))],
                                 str(tmp_path / "batch" / "urls.parquet"))
    table = pq.read_table(combined)
    assert table.column("caption").to_pylist() == ["two", "one", "three"]
    assert table.column("group").to_pylist() == ["g", None, None]
    assert table.column("captions").to_pylist() == ['["two"]', '["one", "uno"]', None]  # lists as ingest keeps them


def test_state_round_trip_and_atomic_replace(tmp_path: Path) -> None:
    location = str(tmp_path / "registry" / "clip" / "nightly-state.json")
    assert read_state(location) == NightlyState()
    write_state(location, NightlyState(processed=["a.parquet"], last_version=2))
    write_state(location, NightlyState(processed=["a.parquet", "b.csv"], last_version=3))
    assert read_state(location).processed == ["a.parquet", "b.csv"]
    assert os.listdir(tmp_path / "registry" / "clip") == ["nightly-state.json"]  # no temporary left behind



@pytest.mark.slow
def test_nightly_bookkeeping_on_object_storage(s3_env: str) -> None:
    """What the nightly flow itself reads and writes (its steps are tested on S3 on their own): new lists found under
    an S3 prefix, combined there, and its state replaced there."""
    from pipeline import storage

    fs, prefix = storage.filesystem(s3_env)
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.table({"url": ["http://a/1.png"], "caption": ["one"]}), buffer)
    fs.pipe_file(f"{prefix}/incoming/2026/05/a.parquet", buffer.getvalue().to_pybytes())
    fs.pipe_file(f"{prefix}/incoming/b.csv", b"url,caption\nhttp://a/2.png,two\n")
    fs.pipe_file(f"{prefix}/incoming/_clipforge/x.parquet", b"ours")
    incoming = f"{s3_env}/incoming"
    assert list_url_lists(incoming) == ["2026/05/a.parquet", "b.csv"]
    assert list_url_lists(f"{s3_env}/absent") == []
    combined = combine_url_lists([f"{incoming}/{name}" for name in list_url_lists(incoming)],
                                 f"{s3_env}/batch/urls.parquet")
    with fs.open(f"{prefix}/batch/urls.parquet", "rb") as f:
        assert pq.read_table(f).column("caption").to_pylist() == ["one", "two"]
    assert combined == f"{s3_env}/batch/urls.parquet"

    state = f"{s3_env}/registry/clip/nightly-state.json"
    assert read_state(state) == NightlyState()
    write_state(state, NightlyState(processed=["2026/05/a.parquet"], last_version=2))
    write_state(state, NightlyState(processed=["2026/05/a.parquet", "b.csv"], last_version=3))
    assert read_state(state).processed == ["2026/05/a.parquet", "b.csv"] and read_state(state).last_version == 3
    assert fs.ls(f"{prefix}/registry/clip") == [f"{prefix}/registry/clip/nightly-state.json"]

# --- SIGKILL while promoting and saving state -----------------------------------------------------------------

def _promote_forever(registry: str, state: str, ready) -> None:
    """The promote step and the state write of nightly-finetune, over and over, until killed."""
    ready.send("ready")
    step = 0
    while True:
        step += 1
        promote(registry, "clip", 1 + step % 2, reason="kill test " + "x" * (step % 500))
        write_state(state, NightlyState(processed=[f"list-{i}.parquet" for i in range(step % 200)], last_version=step))


def _fake_checkpoint(folder: Path, size: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(size))
    (folder / "model_config.json").write_text("{}")
    return folder


def test_promoted_pointer_and_state_survive_sigkill(tmp_path: Path) -> None:
    registry = str(tmp_path / "registry")
    for number in (1, 2):
        register_model(registry, "clip", str(_fake_checkpoint(tmp_path / f"ckpt{number}", 4096)), config={},
                       metrics={}, dataset="data", parent=None)
    state = str(tmp_path / "registry" / "clip" / "nightly-state.json")
    write_state(state, NightlyState(last_version=0))
    rng = random.Random(0)
    fork = multiprocessing.get_context("fork")  # no re-import per child: many kills in a few seconds
    for _ in range(20):
        ready, child_end = fork.Pipe()
        child = fork.Process(target=_promote_forever, args=(registry, state, child_end))
        child.start()
        assert ready.poll(30) and ready.recv() == "ready"
        time.sleep(rng.uniform(0.01, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        pointer = promotion(registry, "clip")  # parses: old or new, never a mixture
        assert pointer is not None and pointer.version in (1, 2) and pointer.reason.startswith("kill test")
        assert get_version(registry, "clip", pointer.version).location.endswith(str(pointer.version))
        saved = read_state(state)
        assert saved.last_version is not None and len(saved.processed) == saved.last_version % 200
    assert [v.version for v in list_versions(registry, "clip")] == [1, 2]


# --- slow: nightly-finetune end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nightly_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A Prefect server (loopback), a served catalog, a fixed validation list, and clip@1 promoted (untrained)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from infra.prefect_server import prefect_server
    from pipeline.catalog import build_openmoji_catalog, read_catalog, serve_directory, write_url_list
    from training.checkpoint import save_checkpoint
    from training.model import MODEL_PRESETS, create_model
    from training.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("nightly")
    catalog = build_openmoji_catalog(root / "catalog", limit=300)
    table = read_catalog(catalog)
    validation = catalog / "val.parquet"  # an image list beside the images: no ingest needed to evaluate
    pq.write_table(table.filter(pc.equal(table.column("split"), "val")), validation)

    captions = table.column("caption").to_pylist()
    tokenizer = train_tokenizer(captions, vocab_size=MODEL_PRESETS["tiny"].vocab_size,
                                context_length=MODEL_PRESETS["tiny"].context_length)
    base = save_checkpoint(root / "base-model", create_model("tiny"), tokenizer)
    registry = str(root / "registry")
    version = register_model(registry, "clip", str(base), config={}, metrics={}, dataset=[], parent=None)
    promote(registry, "clip", version.version, reason="base model for the test")

    with prefect_server(root / "prefect") as server, serve_directory(catalog) as base_url, \
            temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        train_list = write_url_list(catalog, base_url, "train", root / "lists" / "train.parquet")
        val_list = write_url_list(catalog, base_url, "val", root / "lists" / "val.parquet")
        try:
            yield {"root": root, "registry": registry, "validation": str(validation), "train_list": train_list,
                   "val_list": val_list, "api_url": server.api_url}
        finally:
            from prefect.logging.handlers import APILogHandler

            APILogHandler().flush()  # send the last run logs while the server still answers


def _nightly(env: dict, tolerance: float):
    from flows.nightly import nightly_finetune

    root = env["root"]
    return nightly_finetune(
        nightly=NightlyParams(incoming=str(root / "incoming"), validation=env["validation"],
                              data_root=str(root / "nightly-data"), tolerance=tolerance),
        train=FinetuneSettings(output=str(root / "runs"), steps=6, warmup_steps=2, batch_size=32, checkpoint_every=3,
                               loader_workers=1, log_every=3),
        ingest=IngestSettings(samples_per_shard=64, processes=1, threads=8),
        evaluation=EvaluationSettings(label_field="group", templates="emoji", batch_size=64),
        registry={"location": env["registry"], "model_name": "clip"},
        return_state=True)


def _artifacts(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in found}


@pytest.mark.slow
def test_transient_failures_are_retried_and_user_errors_are_not(nightly_env: dict) -> None:
    from prefect import flow, task

    from flows.params import retry_options

    calls = {"transient": 0, "user": 0}

    @task(**retry_options(retries=2, backoff_seconds=0))
    def flaky_download() -> str:
        calls["transient"] += 1
        if calls["transient"] < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    @task(**retry_options(retries=2, backoff_seconds=0))
    def misconfigured() -> None:
        calls["user"] += 1
        raise UserError("URL list x.parquet does not exist")

    @task
    def broken() -> None:
        raise KeyError("a bug")

    @flow
    def steps() -> None:
        assert flaky_download() == "ok"
        misconfigured()

    @flow
    def buggy() -> None:
        broken()

    logged: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(logging.Formatter().format(record))  # with its traceback, if any
    loggers = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        state = steps(return_state=True)
        bug = buggy(return_state=True)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert state.is_failed() and "URL list x.parquet does not exist" in state.message
    assert calls == {"transient": 3, "user": 1}  # two retries, then success; the user error fails at once
    # the user error is logged by the task and by the flow, each time in one line; a bug keeps its traceback
    user_lines = [text for text in logged if "URL list x.parquet does not exist" in text]
    assert len(user_lines) >= 2 and all("\n" not in text for text in user_lines), user_lines
    assert bug.is_failed() and any("KeyError" in text and "Traceback" in text for text in logged)


@pytest.mark.slow
def test_storage_keys_come_from_a_prefect_secret_block(nightly_env: dict) -> None:
    from prefect.blocks.system import Secret

    keys = {"access_key_id": "block-key", "secret_access_key": "block-secret"}
    Secret(value=keys).save("test-s3-keys", overwrite=True)
    resolved = resolve_storage(FlowStorage(region="eu-west-1", credentials_block="test-s3-keys"))
    assert type(resolved) is StorageConfig and resolved.region == "eu-west-1"  # what every step takes
    assert resolved.access_key_id.get_secret_value() == "block-key"
    assert resolved.secret_access_key.get_secret_value() == "block-secret"
    assert resolve_storage(FlowStorage(region="eu-west-1")) == StorageConfig(region="eu-west-1")
    with pytest.raises(UserError, match="either in the parameter or in credentials_block, not both"):
        resolve_storage(FlowStorage(access_key_id="given", credentials_block="test-s3-keys"))  # never a mixed pair

    Secret(value="block-key:block-secret").save("test-s3-text", overwrite=True)
    Secret(value={**keys, "secret_access_key": 123456789}).save("test-s3-number", overwrite=True)
    for name in ("test-s3-text", "test-s3-number"):
        with pytest.raises(UserError, match="must hold a JSON object of non-empty strings") as error:
            resolve_storage(FlowStorage(credentials_block=name))
        assert "block-key" not in str(error.value) and "123456789" not in str(error.value)
    with pytest.raises(UserError, match="cannot load the Prefect Secret block 'absent'"):
        resolve_storage(FlowStorage(credentials_block="absent"))


@pytest.mark.slow
def test_nightly_promotes_refuses_and_has_nothing_to_do(nightly_env: dict) -> None:
    root, registry = nightly_env["root"], nightly_env["registry"]
    train_rows = pq.read_table(nightly_env["train_list"])
    (root / "incoming").mkdir()

    # 1. new data, a tolerance any candidate meets: fine-tuned from clip@1, registered as clip@2 and promoted; the
    # list also carries 5 copies of validation images, which the filter step removes before training
    started = time.monotonic()
    copies = pq.read_table(nightly_env["val_list"]).slice(0, 5)
    pq.write_table(pa.concat_tables([train_rows.slice(0, 96), copies]), root / "incoming" / "day1.parquet")
    state = _nightly(nightly_env, tolerance=1.0)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["promoted"] is True and result["lists"] == ["day1.parquet"]
    assert promoted(registry, "clip").version == 2
    assert get_version(registry, "clip", 2).parent == "clip@1"
    trained_on = get_version(registry, "clip", 2).dataset[0]  # the filtered new data
    # the copies were re-encoded by ingest (JPEG) and the validation list holds the PNG originals: all five found
    decontaminated = pq.read_table(Path(trained_on) / "decontaminated.parquet")
    assert set(decontaminated["evaluation_key"].to_pylist()) == {u.split("/", 3)[3] for u in copies["url"].to_pylist()}
    summary = read_manifest(trained_on).summary
    assert summary.input_rows == 101 == summary.successes + summary.failed
    report = _artifacts(state.state_details.flow_run_id)["nightly-report"]
    assert "Promoted clip@2" in report.data and "contaminated" in report.data
    print(f"nightly with new data, promoted: {time.monotonic() - started:.0f} s")

    # 2. another list, a tolerance no candidate meets (it must improve by 1.0): registered as clip@3, not promoted
    day2 = train_rows.slice(96, 96)  # in a csv, the caption lists are JSON text (a csv holds no lists)
    day2 = pa.table({name: json_safe(day2[name]) for name in day2.column_names})
    pyarrow.csv.write_csv(day2, root / "incoming" / "day2.csv")
    state = _nightly(nightly_env, tolerance=-1.0)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["promoted"] is False and result["lists"] == ["day2.csv"]
    assert promoted(registry, "clip").version == 2  # the old model stays
    assert get_version(registry, "clip", 3).parent == "clip@2"
    artifacts = _artifacts(state.state_details.flow_run_id)
    assert "Kept clip@2" in artifacts["nightly-report"].data
    assert "keeping the promoted model" in artifacts["nightly-report"].data
    assert artifacts["nightly-metrics"].type == "table"
    assert read_state(str(Path(registry) / "clip" / "nightly-state.json")).processed == ["day1.parquet", "day2.csv"]

    # 3. nothing new: a Completed run that says so, having ingested and trained nothing
    def written() -> list[Path]:
        return sorted(p for folder in ("nightly-data", "runs") for p in (root / folder).rglob("*"))

    before = written()
    state = _nightly(nightly_env, tolerance=0.0)
    assert state.is_completed() and state.message.startswith("nothing to do"), state.message
    assert written() == before
    assert [v.version for v in list_versions(registry, "clip")] == [1, 2, 3]

    # 4. a list of validation copies only: the filter keeps none, so the night fails saying so before training; no
    # version is registered and the list stays unprocessed (a later night takes it with its new lists)
    pq.write_table(copies, root / "incoming" / "day3.parquet")
    state = _nightly(nightly_env, tolerance=0.0)
    assert state.is_failed() and "the filter kept none of the 5 samples" in state.message, state.message
    assert [v.version for v in list_versions(registry, "clip")] == [1, 2, 3]
    assert read_state(str(Path(registry) / "clip" / "nightly-state.json")).processed == ["day1.parquet", "day2.csv"]


@pytest.mark.slow
def test_demo_with_the_catalog_port_taken_ends_with_the_reason_in_one_line(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    from flows.clip_train import CATALOG_PORT

    with socket.socket() as holder:  # another run serving the bundled catalog
        holder.bind(("127.0.0.1", CATALOG_PORT))
        holder.listen()
        result = subprocess.run([sys.executable, "-m", "flows.cli", "demo", "--workdir", str(tmp_path)],
                                capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the clip-train flow run failed: cannot listen on 127.0.0.1:{CATALOG_PORT}"), last
    assert "another clipforge demo or clip-train run" in last
    assert "Traceback" not in result.stdout + result.stderr  # the flow run's own log says it in one line too
