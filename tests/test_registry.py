"""Model registry: numbered versions with lineage, an atomic promoted pointer, nothing half-written after a kill."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline import registry as reg
from pipeline.errors import UserError
from pipeline.registry import get_version, list_versions, promote, promoted, promotion, register_model
from pipeline.storage import filesystem, join, open_atomic

MODEL = "clip-tiny"


def make_checkpoint(folder: Path, payload: bytes = b"weights") -> Path:
    (folder / "nested").mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(payload)
    (folder / "nested" / "config.json").write_text('{"width": 64}')
    return folder


def register(registry: str, checkpoint: str, **overrides) -> reg.ModelVersion:
    values = dict(
        config={"image_size": 64, "lr": 1e-3},
        metrics={"recall@1": 0.25},
        dataset="data/manifest.json",
        parent=None,
    )
    values.update(overrides)
    return register_model(registry, MODEL, checkpoint, **values)


def test_two_versions_round_trip_lineage_and_list_in_order(tmp_path: Path) -> None:
    registry = str(tmp_path / "registry")
    first_ckpt = make_checkpoint(tmp_path / "ckpt1", b"one")
    second_ckpt = make_checkpoint(tmp_path / "ckpt2", b"two")

    first = register(registry, str(first_ckpt))
    second = register(
        registry,
        str(second_ckpt),
        config={"image_size": 64, "lr": 5e-4, "nested": {"layers": [1, 2]}},
        metrics={"recall@1": 0.41, "loss": 1.5},
        dataset=["s3://bucket/a/manifest.json", "s3://bucket/b/manifest.json"],
        parent=first.ref,
    )

    assert (first.version, second.version) == (1, 2)
    assert second.location == join(registry, MODEL, "versions", "2")
    assert Path(second.location, "model.safetensors").read_bytes() == b"two"
    assert Path(second.location, "nested", "config.json").read_text() == '{"width": 64}'

    listed = list_versions(registry, MODEL)
    assert [v.version for v in listed] == [1, 2]
    assert listed == [first, second]  # every lineage field survives registration.json
    read = get_version(registry, MODEL, 2)
    assert read == second
    assert read.parent == "clip-tiny@1"
    assert read.dataset == ["s3://bucket/a/manifest.json", "s3://bucket/b/manifest.json"]
    assert read.config == {"image_size": 64, "lr": 5e-4, "nested": {"layers": [1, 2]}}
    assert read.metrics == {"recall@1": 0.41, "loss": 1.5}
    assert read.source == str(second_ckpt)
    assert read.created_at.tzinfo is not None and read.created_at >= first.created_at
    assert get_version(registry, MODEL, 1).dataset == [str(Path("data/manifest.json").resolve())]  # saved absolute

    saved = json.loads(Path(second.location, "registration.json").read_text())
    assert set(saved) == {"name", "version", "created_at", "dataset", "config", "metrics", "parent", "source",
                          "mixing_weight"}


def test_single_file_checkpoint_and_empty_registry(tmp_path: Path) -> None:
    registry = str(tmp_path / "registry")
    assert list_versions(registry, MODEL) == []
    assert promoted(registry, MODEL) is None
    weights = tmp_path / "last.pt"
    weights.write_bytes(b"pt")
    version = register(registry, str(weights))
    assert Path(version.location, "last.pt").read_bytes() == b"pt"


def test_promote_moves_the_pointer(tmp_path: Path) -> None:
    registry = str(tmp_path / "registry")
    ckpt = str(make_checkpoint(tmp_path / "ckpt"))
    first, second = register(registry, ckpt), register(registry, ckpt)

    promote(registry, MODEL, 1, reason="first model")
    assert promoted(registry, MODEL) == first
    promote(registry, MODEL, 2, reason="recall@1 0.41 > 0.25")
    assert promoted(registry, MODEL) == second
    pointer = promotion(registry, MODEL)
    assert pointer is not None and pointer.version == 2 and pointer.reason == "recall@1 0.41 > 0.25"
    assert set(json.loads(Path(registry, MODEL, "promoted.json").read_text())) == {"version", "promoted_at", "reason"}

    with pytest.raises(UserError, match="has no version 7.*versions: 1, 2"):
        promote(registry, MODEL, 7, reason="typo")
    assert promoted(registry, MODEL) == second
    # no temporary file is left by a promote that finished
    assert sorted(p.name for p in Path(registry, MODEL).iterdir()) == ["promoted.json", "versions"]


def test_bad_inputs_are_user_errors(tmp_path: Path) -> None:
    registry = str(tmp_path / "registry")
    ckpt = str(make_checkpoint(tmp_path / "ckpt"))
    with pytest.raises(UserError, match="does not exist"):
        register(registry, str(tmp_path / "missing"))
    with pytest.raises(UserError, match="name@version"):
        register(registry, ckpt, parent="clip-tiny")
    with pytest.raises(UserError, match="model name"):
        register_model(registry, "../escape", ckpt, config={}, metrics={}, dataset=[], parent=None)
    with pytest.raises(UserError, match="plain JSON"):
        register(registry, ckpt, metrics={"loss": object()})
    with pytest.raises(UserError, match="plain JSON"):
        register(registry, ckpt, metrics={"loss": float("nan")})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "registration.json").write_text("{}")
    with pytest.raises(UserError, match="contains a file named"):
        register(registry, str(tmp_path / "bad"))
    assert list_versions(registry, MODEL) == []  # nothing was published by the refused calls
    assert not Path(registry).exists()  # they fail before creating anything, staging folders included


def test_concurrent_registrations_get_distinct_numbers(tmp_path: Path) -> None:
    registry = str(tmp_path / "registry")
    ckpt = str(make_checkpoint(tmp_path / "ckpt"))
    results: list[int] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()
        results.append(register(registry, ckpt).version)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [1, 2, 3, 4]
    assert [v.version for v in list_versions(registry, MODEL)] == [1, 2, 3, 4]


# --- kill -9 ---------------------------------------------------------------------------------------------------------
# The children are forked from this process (modules already imported), so a kill lands within milliseconds of start.


def _slow_write(location: str, data: bytes, storage_config=None) -> None:
    """`write_atomically` with a pause in the middle: a kill often lands between the two halves."""
    fs, path = filesystem(location, storage_config)
    with open_atomic(fs, path) as f:
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(random.uniform(0, 0.004))
        f.write(data[len(data) // 2 :])


def _promote_forever(registry: str) -> None:
    reg.write_atomically = _slow_write  # what `promote` writes its pointer with
    random.seed(os.getpid())
    while True:
        version = random.choice([1, 2, 3])
        promote(registry, MODEL, version, reason=f"version {version} " * 300)  # a torn file would mix reasons


def test_promote_killed_at_random_moments_leaves_a_whole_pointer(tmp_path: Path) -> None:
    registry = str(tmp_path / "registry")
    ckpt = str(make_checkpoint(tmp_path / "ckpt"))
    for _ in range(3):
        register(registry, ckpt)
    promote(registry, MODEL, 1, reason="version 1 " * 300)
    complete = {v.version for v in list_versions(registry, MODEL)}

    fork = multiprocessing.get_context("fork")
    seen = set()
    for _ in range(20):
        child = fork.Process(target=_promote_forever, args=(registry,))
        child.start()
        time.sleep(random.uniform(0.02, 0.2))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL

        pointer = promotion(registry, MODEL)  # parses, or this raises
        assert pointer is not None and pointer.version in complete
        assert pointer.reason == f"version {pointer.version} " * 300
        assert promoted(registry, MODEL).version == pointer.version
        seen.add(pointer.version)

    leftovers = [p for p in Path(registry, MODEL).iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "no kill landed during a write: the test did not exercise what it claims"
    assert len(seen) > 1  # the pointer did move between kills


def _register_slowly(registry: str, ckpt: str) -> None:
    def copy_then_hang(reader, writer, length=0):
        writer.write(reader.read(3))  # part of the first file, then wait to be killed
        print("copying", flush=True)
        time.sleep(60)

    reg.shutil.copyfileobj = copy_then_hang
    register(registry, ckpt)


def test_half_copied_version_is_invisible(tmp_path: Path) -> None:
    registry = str(tmp_path / "registry")
    ckpt = str(make_checkpoint(tmp_path / "ckpt"))
    first = register(registry, ckpt)

    child = multiprocessing.get_context("fork").Process(target=_register_slowly, args=(registry, ckpt))
    child.start()
    versions = Path(registry, MODEL, "versions")
    deadline = time.monotonic() + 30
    while not any(p.name.startswith(".staging-") and any(p.rglob("*.safetensors")) for p in versions.iterdir()):
        assert time.monotonic() < deadline and child.is_alive(), "the child never started copying"
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.join()

    assert [p.name.startswith(".staging-") for p in versions.iterdir()].count(True) == 1  # left behind by the kill
    (versions / "2").mkdir()  # and, as a writer on S3 would leave it, a claimed number without registration.json
    (versions / "2" / "model.safetensors").write_bytes(b"partial")
    assert list_versions(registry, MODEL) == [first]
    with pytest.raises(UserError, match="no version 2"):
        get_version(registry, MODEL, 2)
    with pytest.raises(UserError, match="no version 2"):
        promote(registry, MODEL, 2, reason="incomplete")

    assert register(registry, ckpt).version == 3  # the next registration skips both
    assert [v.version for v in list_versions(registry, MODEL)] == [1, 3]


# --- S3 --------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_register_and_promote_on_s3(s3_env: str, tmp_path: Path) -> None:
    registry = s3_env
    ckpt = str(make_checkpoint(tmp_path / "ckpt", b"s3-weights"))
    first = register(registry, ckpt)
    second = register(registry, ckpt, parent=first.ref, metrics={"recall@1": 0.5})
    assert (first.version, second.version) == (1, 2)
    assert second.location == f"{registry}/{MODEL}/versions/2"

    fs, path = filesystem(second.location)
    assert fs.cat_file(f"{path}/model.safetensors") == b"s3-weights"
    assert fs.cat_file(f"{path}/nested/config.json") == b'{"width": 64}'

    # a writer killed after claiming number 3 leaves a claim and a partial file: invisible, and number 3 is skipped
    _, registry_path = filesystem(registry)
    fs.pipe_file(f"{registry_path}/{MODEL}/versions/3/.claim", b"{}")
    fs.pipe_file(f"{registry_path}/{MODEL}/versions/3/model.safetensors", b"part")
    assert list_versions(registry, MODEL) == [first, second]

    # two writers at once: the conditional PUT gives each its own number
    numbers: list[int] = []
    threads = [threading.Thread(target=lambda: numbers.append(register(registry, ckpt).version)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(numbers) == [4, 5]

    assert promoted(registry, MODEL) is None
    promote(registry, MODEL, 2, reason="best recall")
    assert promoted(registry, MODEL) == second
    assert promotion(registry, MODEL).reason == "best recall"
    promote(registry, MODEL, 4, reason="newer")
    assert promoted(registry, MODEL).version == 4
    assert [v.version for v in list_versions(registry, MODEL)] == [1, 2, 4, 5]
    assert get_version(registry, MODEL, 2).parent == "clip-tiny@1"


def test_registry_imports_neither_prefect_nor_torch() -> None:
    code = "import sys, pipeline.registry; print(sorted({'prefect', 'torch', 'ray'} & set(sys.modules)))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"
