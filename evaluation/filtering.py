"""`clipforge filter` with a model: the CLIP-score and embedding rules of `pipeline.filter`, and the filter's report.

`pipeline.filter` owns the rules, the accounting and the shards; it asks an `Embedder` for embeddings. This module
gives it one made of a clipforge checkpoint, through the same embedding path as `clipforge embed` (the same checks,
crop and autocast), and writes `report.html` beside the filtered dataset: counts per rule, the CLIP-score histogram
of kept and removed pairs, and thumbnails of removed pairs per reason.
"""

from __future__ import annotations

import functools
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipeline import storage
from pipeline.filter import WORK_DIR, FilterConfig, filter_dataset
from pipeline.manifest import Manifest, read_manifest
from pipeline.shards import iter_shard, sample_image
from evaluation.embed import encode_images, encode_texts, model_input
from training.model import CLIP
from training.tokenizer import Tokenizer


class ModelEmbedder:
    """A clipforge model as `pipeline.filter.Embedder`: unit image and caption embeddings."""

    def __init__(self, model: CLIP, tokenizer: Tokenizer, precision: str = "auto"):
        self.model, self.tokenizer, self.precision = model, tokenizer, precision

    def images(self, images: list[Image.Image]) -> np.ndarray:
        size = self.model.config.image_size
        batch = torch.stack([model_input(image, size)[0] for image in images])
        return encode_images(self.model, batch, self.precision)  # (B, D)

    def texts(self, texts: list[str]) -> np.ndarray:
        return encode_texts(self.model, self.tokenizer, texts, precision=self.precision)  # (B, D)


def model_embedder(config: FilterConfig) -> ModelEmbedder | None:
    """The embedder of `config.model` on the machine's device, or None when no rule needs one."""
    if config.model is None:
        return None
    from training.checkpoint import load_model
    from training.device import announce

    model, tokenizer = load_model(config.model, config.storage, announce("filter", config.device, config.precision)[0])
    return ModelEmbedder(model, tokenizer, config.precision)


def run_filter(config: FilterConfig, progress: bool = True) -> Manifest:
    """`clipforge filter`: filter the dataset, then write its report.html."""
    make_embedder = functools.partial(model_embedder, config) if config.model else None  # pickles for Ray tasks
    manifest = filter_dataset(config, make_embedder, progress)
    write_filter_report(config.output, config)
    return manifest


def _read(location: str, name: str, config: FilterConfig) -> pa.Table | None:
    fs, path = storage.filesystem(location, config.storage)
    target = posixpath.join(path, name)
    if not fs.exists(target):
        return None
    with fs.open(target, "rb") as f:
        return pq.read_table(f)


def removed_examples(config: FilterConfig, per_reason: int = 8) -> dict[str, list[tuple[bytes | None, str]]]:
    """Up to `per_reason` removed samples of each reason: (image bytes, "caption — detail")."""
    removed = _read(config.output, "removed.parquet", config)
    if removed is None or not removed.num_rows:
        return {}
    wanted: dict[tuple[int, int], tuple[str, str]] = {}
    for reason in sorted(set(removed["reason"].to_pylist())):
        for row in removed.filter(pc.equal(removed["reason"], reason)).slice(0, per_reason).to_pylist():
            wanted[(row["shard"], row["index"])] = (reason, row["detail"] or "")
    source = read_manifest(config.data, config.storage)
    examples: dict[str, list[tuple[bytes | None, str]]] = {}
    for info in source.shards:
        indices = {index for shard, index in wanted if shard == info.shard}
        if not indices:
            continue
        for index, sample in enumerate(iter_shard(storage.join(source.location, info.path), config.storage)):
            if index in indices:
                reason, detail = wanted[(info.shard, index)]
                caption = sample.get("txt", b"").decode("utf-8", errors="replace")
                examples.setdefault(reason, []).append((sample_image(sample), f"{caption} — {detail}"))
    return examples


def write_filter_report(location: str, config: FilterConfig) -> str:
    """report.html of a filtered dataset at `location`: counts per rule, score histograms, removed examples."""
    from evaluation.report import filter_report

    manifest = read_manifest(location, config.storage)
    decisions = _read(location, posixpath.join(WORK_DIR, "decisions.parquet"), config)
    scores: dict[str, Any] = {}
    if decisions is not None and "clip_score" in decisions.column_names:
        values = decisions["clip_score"].to_numpy(zero_copy_only=False)
        is_kept = decisions["reason"].is_null().to_numpy(zero_copy_only=False)
        scores = {"kept": values[is_kept & ~np.isnan(values)], "removed": values[~is_kept & ~np.isnan(values)]}
    page = filter_report(manifest.summary, config.rules(), scores, removed_examples(config))
    fs, path = storage.filesystem(location, config.storage)
    fs.pipe_file(posixpath.join(path, "report.html"), page.encode())
    return storage.join(location, "report.html")
