"""The filter (`pipeline.filter`, `clipforge filter`): each rule on crafted samples, exact accounting, decontamination
listed, resume after kill -9, and the CLIP score of a real (tiny) clipforge model."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageEnhance

from pipeline.errors import UserError
from pipeline.filter import (HASH_BITS, FilterConfig, csls, decide, filter_dataset, greedy_deduplicate,
                             perceptual_hash)
from pipeline.shards import iter_dataset
from tests.shards import write_pairs
from tests.test_evaluate import synthetic_catalog, synthetic_shards, tiny_checkpoint  # noqa: F401 - shared fixtures


def drawing(seed: int, size: tuple[int, int] = (48, 48)) -> Image.Image:
    """A picture of its own: blocks of random colour, so perceptual hashes of different seeds are far apart."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize(size, Image.NEAREST)


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def kept_keys(location: Path) -> list[str]:
    return [sample["__key__"] for sample in iter_dataset(str(location))]


def removed(location: Path) -> dict[str, str]:
    return {row["key"]: row["reason"] for row in pq.read_table(location / "removed.parquet").to_pylist()}


def test_each_rule_removes_its_crafted_sample_and_accounting_is_exact(tmp_path: Path) -> None:
    good = [(jpeg(drawing(i)), f"a picture of thing number {i}") for i in range(6)]
    crafted = [
        (jpeg(drawing(10)), "x"),                                         # caption_too_short
        (jpeg(drawing(11)), "a very long caption " * 20),                 # caption_too_long
        (jpeg(drawing(12)), "single"),                                    # too_few_words
        (jpeg(drawing(13), ), "ein Bild von einem roten Haus mit Garten und einem Baum"),  # language
        (jpeg(drawing(14, (8, 8))), "a tiny picture of a thing"),         # too_small
        (jpeg(drawing(15, (120, 20))), "a very wide picture of a thing"),  # aspect_ratio
        (b"<html><body>not found</body></html>", "a page that is not an image"),  # not_an_image
        (jpeg(drawing(16))[:-200], "a truncated picture of a thing"),     # truncated
        (jpeg(drawing(0), quality=95), "a picture of thing number 0"),    # duplicate: re-encoded, same caption
        (jpeg(drawing(1), quality=95), "a picture of something else"),    # near-identical image, other caption: kept
    ]
    data = write_pairs(tmp_path / "data", [good[:3] + crafted[:5], good[3:] + crafted[5:]])
    config = FilterConfig(data=str(data), output=str(tmp_path / "out"), min_caption_chars=3, max_caption_chars=200,
                          min_words=2, languages=("en",), min_image_size=16, max_aspect_ratio=3,
                          duplicate_hash_distance=8)
    manifest = filter_dataset(config, progress=False)

    reasons = removed(tmp_path / "out")
    assert sorted(reasons.values()) == sorted(["caption_too_short", "caption_too_long", "too_few_words", "language",
                                               "too_small", "aspect_ratio", "not_an_image", "truncated", "duplicate"])
    summary = manifest.summary
    assert summary.input_rows == 16 and summary.successes == 7
    assert summary.successes + sum(summary.failures.values()) == summary.input_rows
    kept = kept_keys(tmp_path / "out")
    assert len(kept) == 7 and not set(kept) & set(reasons)
    assert "000010007" in kept, "a near-identical image with another caption is a different pair"
    assert reasons["000010006"] == "duplicate"
    # the written shards carry the samples' bytes untouched, and their manifest indexes them
    original = {s["__key__"]: s for s in iter_dataset(str(data))}
    for sample in iter_dataset(str(tmp_path / "out")):
        assert sample["jpg"] == original[sample["__key__"]]["jpg"] and sample["txt"] == original[sample["__key__"]]["txt"]
    assert all(s.offsets is not None for s in manifest.shards)


def test_duplicates_by_image_alone_and_the_best_scoring_copy_stays() -> None:
    # rows 0, 1, 2 are near-copies; 2 scores best, so it stays and removes 0 and 1; row 3 stands alone
    order = np.argsort(-np.array([0.1, 0.2, 0.9, 0.5]), kind="stable")
    removed_rows = greedy_deduplicate(order, [(0, 1), (0, 2), (1, 2)], ["a", "b", "c", "d"], same_caption=False)
    assert removed_rows == {0: 2, 1: 2}
    assert greedy_deduplicate(order, [(0, 1), (0, 2), (1, 2)], ["a", "b", "c", "d"], same_caption=True) == {}


def scan_table(scores: list[float]) -> pa.Table:
    n = len(scores)
    return pa.table({"key": [f"k{i}" for i in range(n)], "shard": [0] * n, "index": list(range(n)),
                     "caption": [f"caption {i}" for i in range(n)], "reason": pa.nulls(n, pa.string()),
                     "detail": pa.nulls(n, pa.string()),
                     "hash": pa.array([i.to_bytes(HASH_BITS // 8, "big") for i in range(n)], pa.binary(HASH_BITS // 8)),
                     "clip_score": pa.array(scores, pa.float32())})


def test_clip_score_threshold_and_top_fraction() -> None:
    scan = scan_table([0.10, 0.35, 0.20, 0.50, 0.05, 0.40, 0.30, 0.25, 0.45, 0.15])
    by_threshold, _ = decide(scan, FilterConfig(data="d", output="o", min_clip_score=0.28), None)
    assert [r for r in by_threshold["reason"].to_pylist()].count("clip_score") == 5
    top, _ = decide(scan, FilterConfig(data="d", output="o", clip_score_top_fraction=0.3), None)
    kept = [k for k, r in zip(top["key"].to_pylist(), top["reason"].to_pylist()) if r is None]
    assert kept == ["k3", "k5", "k8"]  # the three best of ten


def test_csls_ranks_a_caption_near_every_image_below_captions_that_name_their_own() -> None:
    # pair 0's caption is a hub, as near to every image as to its own (a generic caption): by cosine it is the best
    # pair; against how near it is to everything (CSLS), the worst
    n = 6
    images = np.eye(n + 1, dtype=np.float32)[:n]
    texts = np.zeros((n, n + 1), np.float32)
    texts[0, :n] = 1 / np.sqrt(n)  # cosine 0.408 with every image
    for i, cosine in enumerate([0.40, 0.39, 0.38, 0.37, 0.36], start=1):
        texts[i, i], texts[i, n] = cosine, np.sqrt(1 - cosine**2)

    def column(vectors: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), n + 1)

    scan = scan_table(list(np.sum(images * texts, axis=1)))
    scan = scan.append_column("embedding", column(images)).append_column("text_embedding", column(texts))

    def kept(config: FilterConfig) -> list[str]:
        decisions, _ = decide(scan, config, None)
        return [k for k, r in zip(decisions["key"].to_pylist(), decisions["reason"].to_pylist()) if r is None]

    top_half = FilterConfig(data="d", output="o", clip_score_top_fraction=0.5)
    assert kept(top_half) == ["k0", "k1", "k2"]
    assert kept(top_half.model_copy(update={"clip_score_csls": 3})) == ["k1", "k2", "k3"]


def test_decontamination_removes_and_lists_copies_of_evaluation_images(tmp_path: Path) -> None:
    evaluation = [(jpeg(drawing(100 + i)), f"an evaluation picture {i}") for i in range(3)]
    training = [(jpeg(drawing(i)), f"a training picture {i}") for i in range(5)]
    # a copy of evaluation image 0 (re-encoded, brightened) and an exact copy of 2, under training captions
    training.append((jpeg(ImageEnhance.Brightness(drawing(100)).enhance(1.05), quality=95), "a training copy"))
    training.append((evaluation[2][0], "another training copy"))
    data = write_pairs(tmp_path / "data", [training])
    held_out = write_pairs(tmp_path / "eval", [evaluation])
    config = FilterConfig(data=str(data), output=str(tmp_path / "out"), decontaminate=(str(held_out),),
                          contamination_hash_distance=16)
    manifest = filter_dataset(config, progress=False)
    assert manifest.summary.failures == {"contaminated": 2}
    listed = pq.read_table(tmp_path / "out" / "decontaminated.parquet").to_pylist()
    assert [(row["key"], row["evaluation_key"]) for row in listed] == [("000000005", "000000000"),
                                                                      ("000000006", "000000002")]
    assert listed[1]["value"] == 0  # an exact copy: hash distance 0
    assert len(kept_keys(tmp_path / "out")) == 5


def test_evaluation_originals_are_compared_as_ingest_stored_the_training_images(tmp_path: Path) -> None:
    """An evaluation folder of PNG originals against a dataset ingest stored as JPEG: each original is stored as the
    training images were before hashing, so copies match at the default distance; a set with no copy removes none."""
    import json

    from pipeline.ingest import SETTINGS_NAME, WORK_DIR, stored_like

    settings = {"image_size": 40, "resize_mode": "center_crop", "image_format": "jpg", "encode_quality": 75}
    store = stored_like(settings)
    originals = tmp_path / "originals"
    originals.mkdir()
    for i in range(3):
        drawing(100 + i, (56, 56)).save(originals / f"eval-{i}.png")
    # what ingest stores for six pictures of its own and copies of the first two originals (downloaded as PNG)
    pictures = [drawing(i, (56, 56)) for i in range(6)] + [Image.open(originals / f"eval-{i}.png") for i in range(2)]
    stored = []
    for picture in pictures:
        buffer = io.BytesIO()
        picture.save(buffer, "PNG")
        stored.append((store(buffer.getvalue()), f"a training picture {len(stored)}"))
    data = write_pairs(tmp_path / "data", [stored])
    (data / WORK_DIR).mkdir()
    (data / WORK_DIR / SETTINGS_NAME).write_text(json.dumps({**settings, "samples_per_shard": 256}))
    assert Image.open(io.BytesIO(stored[0][0])).size == (40, 40)

    manifest = filter_dataset(FilterConfig(data=str(data), output=str(tmp_path / "out"),
                                           decontaminate=(str(originals),)), progress=False)
    assert manifest.summary.failures == {"contaminated": 2}
    listed = pq.read_table(tmp_path / "out" / "decontaminated.parquet").to_pylist()
    assert [(row["key"], row["evaluation_key"], row["value"]) for row in listed] == [
        ("000000006", "eval-0.png", 0), ("000000007", "eval-1.png", 0)]

    originals_2 = tmp_path / "no-copies"
    originals_2.mkdir()
    drawing(200, (56, 56)).save(originals_2 / "other.png")
    clean = filter_dataset(FilterConfig(data=str(data), output=str(tmp_path / "out-2"),
                                        decontaminate=(str(originals_2),)), progress=False)
    assert clean.summary.failures == {} and clean.summary.successes == 8
    assert pq.read_table(tmp_path / "out-2" / "decontaminated.parquet").num_rows == 0


def test_perceptual_hash_survives_reencoding_and_tells_pictures_apart() -> None:
    def distance(a: Image.Image, b: Image.Image) -> int:
        return int(np.unpackbits(np.frombuffer(perceptual_hash(a), np.uint8) ^ np.frombuffer(perceptual_hash(b), np.uint8)).sum())

    image = drawing(7)
    recoded = Image.open(io.BytesIO(jpeg(image, quality=95)))
    assert distance(image, recoded) <= 16 and distance(image, image.resize((96, 96))) <= 16  # of 768 bits
    assert min(distance(drawing(7), drawing(seed)) for seed in range(8, 40)) > HASH_BITS // 8


def test_model_rules_without_a_model_and_output_over_input_are_user_errors(tmp_path: Path) -> None:
    data = write_pairs(tmp_path / "data", [[(jpeg(drawing(0)), "a picture")]])
    with pytest.raises(UserError, match="--model"):
        filter_dataset(FilterConfig(data=str(data), output=str(tmp_path / "out"), min_clip_score=0.2), progress=False)
    with pytest.raises(UserError, match="differ"):
        filter_dataset(FilterConfig(data=str(data), output=str(data)), progress=False)
    with pytest.raises(UserError, match="manifest"):
        filter_dataset(FilterConfig(data=str(tmp_path / "nothing"), output=str(tmp_path / "out")), progress=False)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "flows.cli", "filter", "--data", str(tmp_path / "missing"),
                             "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "manifest" in result.stderr


def test_a_rerun_with_other_rules_refuses_the_existing_output(tmp_path: Path) -> None:
    data = write_pairs(tmp_path / "data", [[(jpeg(drawing(i)), f"a picture {i}") for i in range(3)]])
    filter_dataset(FilterConfig(data=str(data), output=str(tmp_path / "out")), progress=False)
    with pytest.raises(UserError, match="other rules"):
        filter_dataset(FilterConfig(data=str(data), output=str(tmp_path / "out"), min_words=3), progress=False)


def test_clip_score_is_the_cosine_of_the_embedding_path_and_the_report_shows_it(
        tiny_checkpoint: Path, synthetic_shards: Path, tmp_path: Path) -> None:
    from evaluation.embed import embed_location, encode_texts, valid_rows, vectors
    from evaluation.filtering import run_filter
    from training.checkpoint import load_model

    config = FilterConfig(data=str(synthetic_shards), output=str(tmp_path / "out"), model=str(tiny_checkpoint),
                          clip_score_top_fraction=0.5, clip_score_csls=4, duplicate_similarity=0.999,
                          batch_size=3)  # several batches per shard, the last one short
    manifest = run_filter(config, progress=False)
    scan = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "out" / "_filter" / "scan").glob("*.parquet"))])
    model, tokenizer = load_model(str(tiny_checkpoint))
    table = valid_rows(embed_location(model, str(synthetic_shards), progress=False, thumbnail_size=0))
    images, texts = vectors(table), encode_texts(model, tokenizer, table["caption"].to_pylist())
    score = dict(zip(scan["key"].to_pylist(), scan["clip_score"].to_pylist()))
    np.testing.assert_allclose([score[k] for k in table["key"].to_pylist()], np.sum(images * texts, axis=1), atol=2e-3)
    # the rule judged by CSLS over the same embeddings (every pair reached it: no earlier rule removed one)
    decisions = pq.read_table(tmp_path / "out" / "_filter" / "decisions.parquet")
    judged = dict(zip(decisions["key"].to_pylist(), decisions["clip_score"].to_pylist()))
    np.testing.assert_allclose([judged[k] for k in table["key"].to_pylist()], csls(images, texts, 4, 100), atol=5e-3)
    total = manifest.summary.input_rows
    assert manifest.summary.failures["clip_score"] == total - round(0.5 * total)  # the best half stays
    page = (tmp_path / "out" / "report.html").read_text()
    assert "CLIP score" in page and "Removed: clip_score" in page and "<img" in page


_RUN = """
import sys
from pipeline.filter import HASH_BITS, FilterConfig, filter_dataset
filter_dataset(FilterConfig(data=sys.argv[1], output=sys.argv[2], min_words=2, duplicate_hash_distance=4), progress=False)
"""


def _filter(data: str, output: str) -> list[str]:
    """The command of a filter run (`_RUN`) of `data` into `output`."""
    return [sys.executable, "-c", _RUN, data, output]


_ENV = {"PYTHONPATH": str(Path(__file__).parent.parent)}


def _data_and_a_clean_run(tmp_path: Path) -> tuple[Path, Path]:
    """Twelve shards of 40 pictures (every fifth captioned with one word), and their uninterrupted filter run."""
    shards = [[(jpeg(drawing(100 * s + i), quality=95), f"picture {i} of shard {s}" if i % 5 else "one")
               for i in range(40)] for s in range(12)]
    data = write_pairs(tmp_path / "data", shards)
    clean = subprocess.run(_filter(str(data), str(tmp_path / "clean")), env={**os.environ, **_ENV}, timeout=300)
    assert clean.returncode == 0
    return data, tmp_path / "clean"


def _kill_during_scan_then_resume(data: str, output: str, scans_written: Callable[[], int],
                                  manifest_written: Callable[[], bool]) -> None:
    """Filter `data` into `output`, kill -9 the run once it has written 3 shards' scans, then run it again."""
    env = {**os.environ, **_ENV}
    child = subprocess.Popen(_filter(data, output), env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and scans_written() < 3 and child.poll() is None:
        time.sleep(0.02)
    assert child.poll() is None, "the run finished before it could be killed: make the dataset bigger"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not manifest_written()
    assert subprocess.run(_filter(data, output), env=env, timeout=300).returncode == 0


def _assert_same_output(resumed: Path, clean: Path) -> None:
    assert kept_keys(resumed) == kept_keys(clean)
    assert removed(resumed) == removed(clean)
    assert not list(resumed.rglob("*.tmp"))
    for name in sorted(p.name for p in clean.glob("*.tar")):
        assert (resumed / name).read_bytes() == (clean / name).read_bytes()


@pytest.mark.slow
def test_kill_9_then_resume_writes_what_an_uninterrupted_run_writes(tmp_path: Path) -> None:
    data, clean = _data_and_a_clean_run(tmp_path)
    output = tmp_path / "killed"
    _kill_during_scan_then_resume(str(data), str(output), lambda: len(list(output.glob("_filter/scan/*.parquet"))),
                                  (output / "manifest.parquet").exists)
    _assert_same_output(output, clean)


@pytest.mark.slow
def test_on_object_storage_a_killed_run_resumes_to_what_a_local_run_writes(tmp_path: Path, s3_env: str) -> None:
    """Data and output on S3 (SeaweedFS, keys enforced, from the standard AWS variables): killed with -9 during its
    scan and re-run, the filter writes what it writes locally, byte for byte, and nothing else."""
    from pipeline import storage

    data, clean = _data_and_a_clean_run(tmp_path)
    fs, prefix = storage.filesystem(s3_env)
    for path in data.rglob("*"):
        if path.is_file():
            fs.put_file(str(path), f"{prefix}/data/{path.relative_to(data).as_posix()}")

    def scans_written() -> int:
        fs.invalidate_cache()
        return len(fs.glob(f"{prefix}/filtered/_filter/scan/*.parquet"))

    def manifest_written() -> bool:
        fs.invalidate_cache()
        return fs.exists(f"{prefix}/filtered/manifest.parquet")

    _kill_during_scan_then_resume(storage.join(s3_env, "data"), storage.join(s3_env, "filtered"), scans_written,
                                  manifest_written)
    fs.invalidate_cache()
    copy = tmp_path / "from-s3"
    for key in fs.find(f"{prefix}/filtered"):
        target = copy / key.removeprefix(f"{prefix}/filtered/")
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(key, str(target))
    _assert_same_output(copy, clean)
    local_files = sorted(p.relative_to(clean).as_posix() for p in clean.rglob("*") if p.is_file())
    assert sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()) == local_files


@pytest.mark.slow
def test_scanning_on_a_ray_cluster_decides_as_one_process_does(tiny_checkpoint: Path, synthetic_shards: Path,
                                                              tmp_path: Path) -> None:
    from tests.raycluster import loopback_head

    rules = ["--model", str(tiny_checkpoint), "--clip-score-top-fraction", "0.6", "--duplicate-similarity", "0.99",
             "--min-words", "2"]
    with loopback_head("cff") as (address, env):
        for name, extra in (("local", []), ("ray", ["--ray-address", address])):
            result = subprocess.run([sys.executable, "-m", "flows.cli", "filter", "--data", str(synthetic_shards),
                                     "--output", str(tmp_path / name), *rules, *extra],
                                    capture_output=True, text=True, env=env, timeout=600)
            assert result.returncode == 0, result.stderr[-3000:]
    scans = sorted((tmp_path / "ray" / "_filter" / "scan").glob("*.parquet"))
    assert len(scans) > 1
    assert all(pq.read_schema(p).metadata[b"scanned_by"].startswith(b"ray task") for p in scans)
    assert removed(tmp_path / "ray") == removed(tmp_path / "local")
    assert kept_keys(tmp_path / "ray") == kept_keys(tmp_path / "local")
