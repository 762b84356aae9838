"""Tests of embedding, zero-shot classification, retrieval, search and `clipforge evaluate`.

The metric functions are checked against independent dense computations (the full similarity matrix, sorted) and
against hand-computed values; the commands run on a tiny CLIP trained for a few dozen steps in-test on the synthetic
catalog. `tiny_checkpoint`, `synthetic_catalog` and `write_shards` are shared with test_brand and test_report.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from pipeline.catalog import build_synthetic_catalog, read_catalog
from pipeline.errors import UserError
from pipeline.manifest import IngestSummary, ShardInfo, write_manifest
from training.checkpoint import load_model, save_checkpoint
from evaluation.embed import encode_texts, read_embeddings, valid_rows, vectors
from evaluation.cli import commands
from evaluation.evaluate import (class_embeddings, load_templates, retrieval_metrics, zero_shot_metrics)
from training.loss import clip_loss
from training.model import create_model
from evaluation.search import top_k
from training.tokenizer import train_tokenizer
from training.transforms import train_transform

COMMANDS = {command.name: command for command in commands}


# ---------------------------------------------------------------------------------------------------------------------
# Shared fixtures


def train_tiny_checkpoint(catalog_dir: Path, output: Path, steps: int = 60, seed: int = 0) -> Path:
    """A `tiny` CLIP trained `steps` AdamW steps (batch 64) on a catalog's captions, saved as a checkpoint."""
    rows = read_catalog(catalog_dir).to_pylist()
    tokenizer = train_tokenizer([r["caption"] for r in rows], vocab_size=1024, context_length=32)
    torch.manual_seed(seed)
    model = create_model("tiny")
    if steps:
        rng = random.Random(seed)
        data = [((catalog_dir / r["image"]).read_bytes(), r["caption"]) for r in rows]
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
        for _ in range(steps):
            batch = rng.sample(data, min(64, len(data)))
            images = torch.stack([train_transform(image, model.config.image_size, rng) for image, _ in batch])
            with torch.autocast("cpu", dtype=torch.bfloat16):
                image_emb, text_emb, scale = model(images, tokenizer.encode_batch([c for _, c in batch]))
            loss = clip_loss(image_emb, text_emb, scale)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.clamp_logit_scale()
    return save_checkpoint(output, model.eval(), tokenizer)


# Built once per test session under fixed names in the session's base temp folder: the fixtures are imported into
# test_brand and test_report too, and pytest would otherwise run an imported session fixture once per module.


@pytest.fixture(scope="session")
def synthetic_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # idempotent: a no-op when the catalog is already complete
    return build_synthetic_catalog(tmp_path_factory.getbasetemp() / "shared-synthetic", count=160, image_size=64)


@pytest.fixture(scope="session")
def tiny_checkpoint(synthetic_catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.getbasetemp() / "shared-tiny-checkpoint"
    if (path / "model.safetensors").exists():  # written atomically: present means complete
        return path
    return train_tiny_checkpoint(synthetic_catalog, path, steps=40)


def write_shards(catalog_dir: Path, output: Path, samples_per_shard: int = 50) -> Path:
    """The catalog as `clipforge ingest` lays it out: tar shards of jpg + txt + json, and manifest.parquet."""
    from PIL import Image

    output.mkdir(parents=True, exist_ok=True)
    rows = read_catalog(catalog_dir).to_pylist()
    shards = []
    for shard, start in enumerate(range(0, len(rows), samples_per_shard)):
        path = output / f"{shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for index, row in enumerate(rows[start:start + samples_per_shard], start=start):
                key = f"{index:07d}"
                buffer = io.BytesIO()
                Image.open(catalog_dir / row["image"]).convert("RGB").save(buffer, format="JPEG", quality=95)
                meta = {k: v for k, v in row.items() if k != "image"} | {"key": key, "status": "success"}
                for name, data in ((f"{key}.jpg", buffer.getvalue()), (f"{key}.txt", row["caption"].encode()),
                                   (f"{key}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        count = len(rows[start:start + samples_per_shard])
        shards.append(ShardInfo(shard, path.name, count, count, 0, path.stat().st_size))
    write_manifest(str(output), shards, IngestSummary(len(rows), len(rows), shards=len(shards)))
    return output


@pytest.fixture(scope="session")
def synthetic_shards(synthetic_catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(synthetic_catalog, tmp_path_factory.mktemp("shards"))


# ---------------------------------------------------------------------------------------------------------------------
# Retrieval: chunked == dense


def dense_recall(queries: np.ndarray, gallery: np.ndarray, positives: list[set[int]], k: int) -> float:
    """Reference: the full matrix, each row stably sorted by descending score (ties: lower index first)."""
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T  # (Q, G)
    hits = []
    for row, positive in zip(scores, positives):
        if not positive:
            continue
        order = np.argsort(-row, kind="stable")
        hits.append(any(int(j) in positive for j in order[:k]))
    return float(np.mean(hits))


def check_against_dense(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray, chunk_size: int) -> None:
    metrics = retrieval_metrics(image_emb, text_emb, text_image, ks=(1, 2, 5, 10), chunk_size=chunk_size)
    images_positives = [set(np.flatnonzero(text_image == i).tolist()) for i in range(len(image_emb))]
    texts_positives = [{int(i)} for i in text_image]
    for k in (1, 2, 5, 10):
        assert metrics["image_to_text"][f"R@{k}"] == pytest.approx(dense_recall(image_emb, text_emb, images_positives, k))
        assert metrics["text_to_image"][f"R@{k}"] == pytest.approx(dense_recall(text_emb, image_emb, texts_positives, k))


@pytest.mark.parametrize("chunk_size", [7, 16, 1000])
def test_chunked_retrieval_equals_dense_on_random_embeddings(chunk_size: int) -> None:
    rng = np.random.default_rng(0)
    image_emb = rng.normal(size=(53, 16)).astype(np.float32)
    text_emb = (image_emb + rng.normal(scale=1.5, size=image_emb.shape)).astype(np.float32)  # paired, noisy
    image_emb /= np.linalg.norm(image_emb, axis=1, keepdims=True)
    text_emb /= np.linalg.norm(text_emb, axis=1, keepdims=True)
    metrics = retrieval_metrics(image_emb, text_emb, chunk_size=chunk_size)
    assert 0 < metrics["text_to_image"]["R@1"] < metrics["text_to_image"]["R@10"] < 1  # a non-trivial case
    check_against_dense(image_emb, text_emb, np.arange(53), chunk_size)


@pytest.mark.parametrize("chunk_size", [3, 8, 64])
def test_chunked_retrieval_with_several_captions_per_image_duplicates_and_ties(chunk_size: int) -> None:
    """Small integer embeddings make every dot product exact, so ties are frequent and must break by index."""
    rng = np.random.default_rng(1)
    image_emb = rng.integers(-2, 3, size=(29, 4)).astype(np.float32)
    image_emb[5] = image_emb[3]  # two identical images
    text_image = np.concatenate([np.arange(27), rng.integers(0, 27, size=40)])  # images 27, 28 have no caption
    text_emb = np.clip(image_emb[text_image] + rng.integers(-1, 2, size=(len(text_image), 4)), -2, 2).astype(np.float32)
    text_emb[40:45] = text_emb[10]  # duplicate captions, paired with different images
    check_against_dense(image_emb, text_emb, text_image, chunk_size)
    metrics = retrieval_metrics(image_emb, text_emb, text_image, chunk_size=chunk_size)
    assert metrics["num_texts"] == len(text_image)
    assert metrics["chance"]["text_to_image"]["R@5"] == pytest.approx(5 / 29)


def test_tie_breaks_by_index() -> None:
    image_emb = np.ones((3, 2), dtype=np.float32)  # every score equal: rank = index
    metrics = retrieval_metrics(image_emb, image_emb.copy(), ks=(1, 2))
    assert metrics["text_to_image"]["R@1"] == pytest.approx(1 / 3)  # only caption 0 finds image 0 first
    assert metrics["text_to_image"]["R@2"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------------------------------
# Zero-shot


def test_zero_shot_matches_a_hand_computed_case() -> None:
    classes = np.array([[1, 0], [0, 1], [-1, 0]], dtype=np.float32)  # C = 3
    images = np.array([[0.9, 0.1],   # -> class 0, true 0: correct
                       [0.2, 0.8],   # -> class 1, true 1: correct
                       [0.6, 0.5],   # -> class 0, true 1: wrong (class 1 second)
                       [-0.7, 0.2],  # -> class 2, true 2: correct
                       [0.3, -0.9]], dtype=np.float32)  # -> class 0 (0.3 > -0.3 > -0.9), true 2: wrong, 2nd
    labels = np.array([0, 1, 1, 2, 2])
    metrics = zero_shot_metrics(images, labels, classes, ["a", "b", "c"], ks=(1, 2), chunk_size=2)
    assert metrics["acc@1"] == pytest.approx(3 / 5)
    assert metrics["acc@2"] == pytest.approx(5 / 5)
    assert metrics["balanced_accuracy"] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)
    assert metrics["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    assert metrics["chance"]["acc@1"] == pytest.approx(1 / 3)
    # always answering the largest classes: b and c hold 2 of 5 each, a 1
    assert metrics["majority"] == {"acc@1": pytest.approx(2 / 5), "acc@2": pytest.approx(4 / 5),
                                   "balanced_accuracy": pytest.approx(1 / 3)}
    assert metrics["per_class_recall"] == {"a": 1.0, "b": 0.5, "c": 0.5}


def test_zero_shot_tie_goes_to_the_lower_class_index() -> None:
    metrics = zero_shot_metrics(np.array([[1.0, 0.0]], np.float32), np.array([1]),
                                np.array([[1.0, 0.0], [1.0, 0.0]], np.float32), ks=(1, 2))
    assert metrics["acc@1"] == 0.0 and metrics["acc@2"] == 1.0
    assert metrics["confusion_matrix"] == [[0, 0], [1, 0]]


def test_template_ensembling_averages_normalised_prompt_embeddings(tiny_checkpoint: Path) -> None:
    model, tokenizer = load_model(str(tiny_checkpoint))
    templates = ["a photo of a {}.", "an emoji of {}.", "a {} shape."]
    classes = ["red circle", "blue_square", "star"]
    got = class_embeddings(model, tokenizer, classes, templates, batch_size=4)  # 1 class per batch
    for row, name in zip(got, ["red circle", "blue square", "star"]):
        prompts = encode_texts(model, tokenizer, [t.format(name) for t in templates])
        mean = prompts.mean(axis=0)
        np.testing.assert_allclose(row, mean / np.linalg.norm(mean), atol=1e-5)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def test_templates_file_and_named_sets(tmp_path: Path) -> None:
    assert "a photo of a {}." in load_templates("default")
    assert "an emoji of {}." in load_templates("emoji")
    path = tmp_path / "templates.txt"
    path.write_text("# brand prompts\na sticker of {}.\n\nour logo next to {}\n")
    assert load_templates(str(path)) == ["a sticker of {}.", "our logo next to {}"]
    path.write_text("a sticker of {}.\nno placeholder here\n")
    with pytest.raises(UserError, match="line 2"):
        load_templates(str(path))
    with pytest.raises(UserError, match="neither a file"):
        load_templates("missing.txt")


# ---------------------------------------------------------------------------------------------------------------------
# Embedding tables


def test_embed_writes_unit_vectors_with_metadata(tiny_checkpoint: Path, synthetic_shards: Path, tmp_path: Path) -> None:
    output = tmp_path / "lib.parquet"
    result = CliRunner().invoke(COMMANDS["embed"], ["--model", str(tiny_checkpoint), "--data", str(synthetic_shards),
                                                    "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert "embedded 160 of 160" in result.output
    schema = pq.read_schema(output)
    assert schema.field("embedding").type == pa.list_(pa.float32(), 64)
    table = read_embeddings(str(output))
    assert {"key", "caption", "source", "group", "subgroup", "shape", "colour"} <= set(table.column_names)
    emb = vectors(valid_rows(table))
    assert emb.shape == (160, 64) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    # bf16 autocast stays close to fp32
    fp32 = tmp_path / "fp32.parquet"
    CliRunner().invoke(COMMANDS["embed"], ["--model", str(tiny_checkpoint), "--data", str(synthetic_shards),
                                           "--output", str(fp32), "--precision", "fp32"])
    cosine = (emb * vectors(valid_rows(read_embeddings(str(fp32))))).sum(axis=1)
    assert cosine.min() > 0.98


def test_embed_folder_keeps_bad_files_as_error_rows(tiny_checkpoint: Path, synthetic_catalog: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for name in ("000000.png", "000001.png"):
        (folder / "sub" / name).write_bytes((synthetic_catalog / "images" / name).read_bytes())
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (folder / "notes.txt").write_text("not an image, not listed")
    output = tmp_path / "lib.parquet"
    result = CliRunner().invoke(COMMANDS["embed"], ["--model", str(tiny_checkpoint), "--data", str(folder),
                                                    "--output", str(output)])
    assert result.exit_code == 0, result.output
    rows = {r["key"]: r for r in read_embeddings(str(output)).to_pylist()}
    assert set(rows) == {"broken.jpg", "sub/000000.png", "sub/000001.png"}
    assert rows["broken.jpg"]["embedding"] is None and rows["broken.jpg"]["error"].startswith("corrupt:")
    assert rows["sub/000000.png"]["error"] is None and rows["sub/000000.png"]["thumbnail"]


# ---------------------------------------------------------------------------------------------------------------------
# clipforge evaluate


def test_evaluate_on_shards_writes_metrics_report_and_prints_chance(tiny_checkpoint: Path, synthetic_shards: Path,
                                                                     tmp_path: Path) -> None:
    output = tmp_path / "eval"
    result = CliRunner().invoke(COMMANDS["evaluate"], [
        "--model", str(tiny_checkpoint), "--data", str(synthetic_shards), "--label-field", "group",
        "--templates", "shapes", "--output", str(output), "--chunk-size", "64"])
    assert result.exit_code == 0, result.output
    assert "chance" in result.output
    assert "zero-shot acc@1" in result.output and "0.1250" in result.output  # 8 shapes: chance 1/8 beside acc@1
    metrics = json.loads((output / "metrics.json").read_text())
    zero_shot, retrieval = metrics["zero_shot"], metrics["retrieval"]
    assert zero_shot["num_classes"] == 8 and zero_shot["num_samples"] == 160
    assert np.asarray(zero_shot["confusion_matrix"]).sum() == 160
    assert retrieval["chance"]["text_to_image"]["R@10"] == pytest.approx(10 / 160)
    # trained on these very pairs for 60 steps: retrieval is far above chance
    assert retrieval["text_to_image"]["R@10"] > 5 * retrieval["chance"]["text_to_image"]["R@10"]
    assert (output / "report.html").read_text().count("data:image/png;base64,") >= 3
    # the embeddings written beside the metrics are reused as is
    again = CliRunner().invoke(COMMANDS["evaluate"], [
        "--model", str(tiny_checkpoint), "--data", str(output / "embeddings.parquet"), "--label-field", "group",
        "--templates", "shapes", "--output", str(tmp_path / "again"), "--no-report"])
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "again" / "metrics.json").read_text())["zero_shot"]["acc@1"] == zero_shot["acc@1"]


def test_evaluate_on_a_labelled_csv(tiny_checkpoint: Path, synthetic_catalog: Path, tmp_path: Path) -> None:
    rows = read_catalog(synthetic_catalog).to_pylist()[:40]
    csv = tmp_path / "labelled.csv"
    csv.write_text("image,label\n" + "".join(f"{synthetic_catalog / r['image']},{r['colour']}\n" for r in rows)
                   + "missing.png,red\n")
    result = CliRunner().invoke(COMMANDS["evaluate"], ["--model", str(tiny_checkpoint), "--data", str(csv),
                                                       "--label-field", "label", "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["num_images"] == 40 and metrics["num_errors"] == 1 and "retrieval" not in metrics
    assert metrics["zero_shot"]["num_classes"] == len({r["colour"] for r in rows})


def test_evaluate_unknown_label_field_is_a_user_error(tiny_checkpoint: Path, synthetic_shards: Path,
                                                      tmp_path: Path) -> None:
    result = CliRunner().invoke(COMMANDS["evaluate"], ["--model", str(tiny_checkpoint), "--data", str(synthetic_shards),
                                                       "--label-field", "species", "--output", str(tmp_path)])
    assert isinstance(result.exception, UserError)
    assert "no label field 'species'" in str(result.exception) and "group" in str(result.exception)


def test_search_queries_are_its_arguments_and_nothing_else() -> None:
    """One parameter named `queries`, positional: an option of the same name would clash with it (click warns)."""
    import warnings

    queries = [param for param in COMMANDS["search"].params if param.name == "queries"]
    assert len(queries) == 1 and queries[0].param_type_name == "argument"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = CliRunner().invoke(COMMANDS["search"], ["--index", "missing.parquet", "a red circle"])
    assert "embedding table missing.parquet does not exist" in str(result.exception)


def test_every_option_has_help() -> None:
    for command in [COMMANDS["embed"], COMMANDS["evaluate"], COMMANDS["search"], *COMMANDS["brand"].commands.values()]:
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help, f"{command.name} {param.name} has no help"


@pytest.mark.slow
def test_evaluate_on_a_dataset_written_by_clipforge_ingest(tiny_checkpoint: Path, synthetic_catalog: Path,
                                                           tmp_path: Path) -> None:
    from pipeline.catalog import serve_directory, write_url_list
    from pipeline.ingest import IngestConfig, ingest

    with serve_directory(synthetic_catalog) as base_url:
        urls = write_url_list(synthetic_catalog, base_url, "all", tmp_path / "urls.parquet")
        ingest(IngestConfig(urls=str(urls), output=str(tmp_path / "shards"), samples_per_shard=64, processes=1,
                            threads=8), progress=False)
    result = CliRunner().invoke(COMMANDS["evaluate"], ["--model", str(tiny_checkpoint), "--data", str(tmp_path / "shards"),
                                                       "--label-field", "group", "--output", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    assert "chance" in result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == 160 and metrics["zero_shot"]["num_classes"] == 8


# ---------------------------------------------------------------------------------------------------------------------
# Search


@pytest.mark.parametrize("chunk_size", [5, 1000])
def test_chunked_top_k_equals_a_full_sort(chunk_size: int) -> None:
    rng = np.random.default_rng(2)
    library = rng.integers(-2, 3, size=(41, 3)).astype(np.float32)  # exact scores, many ties
    queries = rng.integers(-2, 3, size=(4, 3)).astype(np.float32)
    scores, indices = top_k(queries, library, k=7, chunk_size=chunk_size)
    for query, got in zip(queries, indices):
        np.testing.assert_array_equal(got, np.argsort(-(library @ query), kind="stable")[:7])
    assert scores.shape == (4, 7)


def test_search_cli_returns_ranked_hits(tiny_checkpoint: Path, synthetic_shards: Path, tmp_path: Path) -> None:
    index = tmp_path / "lib.parquet"
    CliRunner().invoke(COMMANDS["embed"], ["--model", str(tiny_checkpoint), "--data", str(synthetic_shards),
                                           "--output", str(index)])
    result = CliRunner().invoke(COMMANDS["search"], ["--index", str(index), "a red circle", "a blue star",
                                                     "--top-k", "3", "--output", str(tmp_path / "search")])
    assert result.exit_code == 0, result.output
    assert result.output.count("query:") == 2
    hits = json.loads((tmp_path / "search" / "results.json").read_text())["results"][0]["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert (tmp_path / "search" / "report.html").read_text().count("data:image/png;base64,") == 6
    empty = CliRunner().invoke(COMMANDS["search"], ["--index", str(index)])
    assert isinstance(empty.exception, UserError)


@pytest.mark.slow
def test_embed_and_search_an_object_storage_prefix(tiny_checkpoint: Path, synthetic_catalog: Path, s3_env: str) -> None:
    from pipeline import storage

    fs, prefix = storage.filesystem(s3_env)
    for path in sorted((synthetic_catalog / "images").glob("*.png"))[:12]:
        fs.put_file(str(path), f"{prefix}/library/{path.name}")
    fs.pipe_file(f"{prefix}/library/broken.png", b"not a png")
    index = storage.join(s3_env, "index", "lib.parquet")
    result = CliRunner().invoke(COMMANDS["embed"], ["--model", str(tiny_checkpoint), "--data",
                                                    storage.join(s3_env, "library"), "--output", index])
    assert result.exit_code == 0, result.output
    table = read_embeddings(index)
    assert table.num_rows == 13 and valid_rows(table).num_rows == 12
    assert table.column("source").to_pylist()[0].startswith(s3_env)
    found = CliRunner().invoke(COMMANDS["search"], ["--index", index, "a green star", "--top-k", "4"])
    assert found.exit_code == 0, found.output
    assert len([line for line in found.output.splitlines() if line.startswith("  ")]) == 4
