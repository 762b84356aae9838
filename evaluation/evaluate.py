"""Evaluation: zero-shot classification and image-text retrieval on an embedded evaluation set.

`clipforge evaluate` embeds the evaluation images once (`evaluation.embed`), then computes:

**Zero-shot classification.** Each class name is put into every prompt template ("a photo of a {}.", ...); the
class's text embedding is the mean of the unit-length template embeddings, renormalised (template ensembling, as in
the CLIP paper). An image is assigned the class whose embedding has the highest cosine. Metrics: acc@1, acc@5 (the
true class among the five highest), balanced accuracy (the mean over classes present of correct / samples of that
class, i.e. mean per-class recall; robust to class imbalance) and the confusion matrix (rows: true class, columns:
predicted class).

**Retrieval** (as CLIP_benchmark defines it). Every caption is paired with exactly one image; an image may have
several captions. *Text-to-image recall@k*: the share of captions whose paired image is among the k images most
similar to the caption. *Image-to-text recall@k*: the share of images for which at least one of their paired
captions is among the k captions most similar to the image.

**Ties** are broken by index: items with the same score rank in the order they appear in the data set, so the
rank of an item p for a query is #{j : s_j > s_p} + #{j < p : s_j = s_p}, and p is "in the top-k" when that rank
is below k. Only counts of this kind are needed, so the similarity matrix is computed in query x gallery tiles of
`chunk_size` and never held whole (memory O(chunk_size^2), not O(N^2)).

Chance levels are reported beside every metric: acc@k = min(k, C) / C for C classes (uniform random guessing);
recall@k = min(k, N) / N for a gallery of N items. Zero-shot metrics also carry the majority baseline, what always
answering the most frequent classes scores: acc@k = the share of the k largest classes, balanced accuracy = 1 / C
(on skewed labels such as the emoji groups, where People & Body is most of the data, acc@1 must beat this, not
chance).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from pydantic import Field

from pipeline import storage
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.storage import StorageConfig
from training.device import DeviceSetting, PrecisionSetting, announce
from evaluation.embed import embed_location, encode_texts, error_counts, error_rows, valid_rows, vectors, write_embeddings
from training.model import CLIP
from training.tokenizer import Tokenizer

# A subset of the CLIP paper's 80 ImageNet templates that reads well for any object category.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a drawing of a {}.",
    "a rendering of a {}.",
    "a cartoon {}.",
    "a close-up photo of a {}.",
    "a good photo of a {}.",
    "a photo of the {}.",
    "art of the {}.",
    "a low resolution photo of a {}.",
    "itap of a {}.",
)
# Domain sets: `--templates emoji` (the bundled OpenMoji catalog) or `--templates shapes` (the synthetic catalog).
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "default": DEFAULT_TEMPLATES,
    "emoji": ("an emoji of {}.", "an emoji of a {}.", "an icon of {}.", "a {} emoji.", "a cartoon of {}.", "{}"),
    "shapes": ("a {}.", "a {} on a background.", "a drawing of a {}.", "a {} shape."),
}


class EvaluateConfig(Config):
    """One evaluation run: which model, which data, which labels and prompts, where the results go."""

    model: str
    """Checkpoint location (a folder or s3://...) to evaluate."""
    data: str
    """Evaluation images: an ingested dataset (has manifest.parquet), a labelled image list (.parquet/.csv with an
    `image` column and a label column), a folder of images, or an embedding table written before."""
    output: str
    """Folder (or s3:// prefix) for metrics.json, report.html and the embeddings.parquet that was computed."""
    label_field: str | None = None
    """Field holding each image's class for zero-shot classification (a shard json field such as `group`, or a
    list column). Empty: no zero-shot classification, retrieval only."""
    templates: str = "default"
    """Prompt templates: a named set (default, emoji, shapes) or a text file with one template per line, each with
    `{}` where the class name goes."""
    image_column: str = "image"
    """Column of an image list that holds each image's location."""
    batch_size: int = Field(128, gt=0)
    """Images (and captions) per forward pass."""
    chunk_size: int = Field(2048, gt=0)
    """Side of the similarity tiles for retrieval and classification; memory grows with its square, not with N^2."""
    device: DeviceSetting = "auto"
    """auto: a CUDA GPU when one is visible, else the CPU; cpu or cuda force it."""
    precision: PrecisionSetting = "auto"
    """auto: bf16 autocast where the hardware runs bf16 natively (CUDA with bf16, CPUs with AMX or AVX-512 BF16), else
    fp32; bf16 or fp32 force it."""
    retrieval: bool = True
    """Compute image-text retrieval from the captions (needs a caption per image)."""
    report: bool = True
    """Write the HTML report (confusion matrix, recall@k bars) beside metrics.json."""
    storage: StorageConfig = StorageConfig()
    """How to reach object storage for s3:// locations."""


# ---------------------------------------------------------------------------------------------------------------------
# Prompts and the zero-shot classifier


def load_templates(spec: str) -> list[str]:
    """A named template set, or a file with one template per line (blank lines and `#` comments skipped)."""
    if spec in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[spec])
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--templates {spec!r} is neither a file nor one of the sets {', '.join(TEMPLATE_SETS)}")
    templates = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.count("{}") != 1:
            raise UserError(f"{spec} line {number}: a template needs exactly one {{}} for the class name: {line!r}")
        templates.append(line)
    if not templates:
        raise UserError(f"{spec} holds no templates (one per line, each with {{}})")
    return templates


def class_display_name(label: str) -> str:
    """How a label is spoken in a prompt: `smileys-emotion` / `red_circle` -> `smileys emotion` / `red circle`."""
    return " ".join(str(label).replace("_", " ").replace("-", " ").split())


def class_embeddings(model: CLIP, tokenizer: Tokenizer, class_names: Sequence[str], templates: Sequence[str],
                     batch_size: int = 256, precision: PrecisionSetting = "auto") -> np.ndarray:
    """(C, D) unit vectors: per class, the renormalised mean of its templates' unit text embeddings.

    Built a few classes at a time (about `batch_size` prompts per forward pass), so any number of classes fits.
    """
    classes_per_batch = max(1, batch_size // len(templates))
    parts = [np.zeros((0, model.config.embed_dim), dtype=np.float32)]
    for start in range(0, len(class_names), classes_per_batch):
        names = class_names[start:start + classes_per_batch]
        prompts = [template.format(class_display_name(name)) for name in names for template in templates]
        prompt_emb = encode_texts(model, tokenizer, prompts, batch_size, precision)  # (c * T, D), unit rows
        mean = prompt_emb.reshape(len(names), len(templates), -1).mean(axis=1)  # (c, D)
        parts.append(mean / np.linalg.norm(mean, axis=1, keepdims=True))
    return np.concatenate(parts).astype(np.float32)


def _tiles(length: int, chunk_size: int) -> list[slice]:
    return [slice(start, min(start + chunk_size, length)) for start in range(0, length, chunk_size)]


def zero_shot_metrics(image_emb: np.ndarray, labels: np.ndarray, class_emb: np.ndarray,
                      class_names: Sequence[str] | None = None, ks: Sequence[int] = (1, 5),
                      chunk_size: int = 4096) -> dict[str, Any]:
    """acc@k, balanced accuracy and the confusion matrix of (N, D) images with (N,) int labels vs (C, D) classes, with
    chance and majority baselines."""
    images, classes = torch.from_numpy(np.ascontiguousarray(image_emb)), torch.from_numpy(np.ascontiguousarray(class_emb))
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    num_classes = len(classes)
    class_index = torch.arange(num_classes)
    ranks, predictions = [], []
    for rows in _tiles(len(images), chunk_size):
        scores = images[rows] @ classes.T  # (n, C)
        true = labels_t[rows]
        true_score = scores.gather(1, true[:, None])  # (n, 1)
        ahead = (scores > true_score) | ((scores == true_score) & (class_index[None, :] < true[:, None]))
        ranks.append(ahead.sum(dim=1))  # (n,) 0 = predicted correctly
        predictions.append(scores.argmax(dim=1))  # first maximum: the same tie rule
    rank = torch.cat(ranks).numpy() if ranks else np.zeros(0, dtype=np.int64)
    predicted = torch.cat(predictions).numpy() if predictions else np.zeros(0, dtype=np.int64)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (np.asarray(labels, dtype=np.int64), predicted), 1)
    support = confusion.sum(axis=1)
    present = support > 0
    recall_per_class = np.divide(np.diag(confusion), support, out=np.zeros(num_classes), where=present)
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    metrics: dict[str, Any] = {"num_samples": int(len(rank)), "num_classes": num_classes}
    for k in ks:
        metrics[f"acc@{k}"] = float((rank < k).mean()) if len(rank) else 0.0
    metrics["balanced_accuracy"] = float(recall_per_class[present].mean()) if present.any() else 0.0
    metrics["chance"] = {**{f"acc@{k}": min(k, num_classes) / num_classes for k in ks},
                         "balanced_accuracy": 1 / num_classes}
    largest = np.sort(support)[::-1] / max(1, len(rank))
    metrics["majority"] = {**{f"acc@{k}": float(largest[:k].sum()) for k in ks},
                           "balanced_accuracy": 1 / max(1, int(present.sum()))}
    metrics["per_class_recall"] = {names[c]: float(recall_per_class[c]) for c in np.flatnonzero(present)}
    metrics["class_names"] = names
    metrics["confusion_matrix"] = confusion.tolist()
    return metrics


# ---------------------------------------------------------------------------------------------------------------------
# Retrieval


def best_positive_ranks(queries: np.ndarray, gallery: np.ndarray, query_owner: np.ndarray, gallery_owner: np.ndarray,
                        chunk_size: int = 2048) -> np.ndarray:
    """For each query, the rank of its best-ranked positive in the gallery (-1 when it has none).

    A gallery item is a positive of a query when their owners are equal. Rank follows the module's tie rule, so the
    query's retrieval is correct at k iff rank < k. Two passes over (chunk x chunk) tiles: the first finds each
    query's best positive (highest score, lowest index among equals), the second counts what ranks ahead of it.
    The tiles of both passes are the same products of the same inputs, so their scores agree bit for bit.
    """
    q, g = torch.from_numpy(np.ascontiguousarray(queries)), torch.from_numpy(np.ascontiguousarray(gallery))
    q_owner, g_owner = torch.as_tensor(query_owner), torch.as_tensor(gallery_owner)
    gallery_index = torch.arange(len(g))
    ranks = torch.full((len(q),), -1, dtype=torch.long)
    for rows in _tiles(len(q), chunk_size):
        best_score = torch.full((rows.stop - rows.start,), -torch.inf, dtype=q.dtype)
        best_index = torch.full_like(best_score, len(g), dtype=torch.long)
        for cols in _tiles(len(g), chunk_size):
            scores = q[rows] @ g[cols].T  # (n, m)
            positive = q_owner[rows, None] == g_owner[None, cols]  # (n, m)
            masked = scores.masked_fill(~positive, -torch.inf)
            chunk_best, chunk_arg = masked.max(dim=1)  # first maximum within the tile
            better = chunk_best > best_score  # strict: on a tie the earlier tile (lower index) keeps it
            best_score = torch.where(better, chunk_best, best_score)
            best_index = torch.where(better, chunk_arg + cols.start, best_index)
        count = torch.zeros_like(best_index)
        for cols in _tiles(len(g), chunk_size):
            scores = q[rows] @ g[cols].T  # (n, m)
            ahead = (scores > best_score[:, None]) | (
                (scores == best_score[:, None]) & (gallery_index[None, cols] < best_index[:, None]))
            count += ahead.sum(dim=1)
        ranks[rows] = torch.where(best_index < len(g), count, torch.full_like(count, -1))
    return ranks.numpy()


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray | None = None,
                      ks: Sequence[int] = (1, 5, 10), chunk_size: int = 2048) -> dict[str, Any]:
    """Image-to-text and text-to-image recall@k (definitions in the module docstring), computed in tiles.

    `text_image[t]` is the index of caption t's image (default: caption i belongs to image i). Images without any
    caption are left out of image-to-text.
    """
    num_images, num_texts = len(image_emb), len(text_emb)
    text_image = np.arange(num_texts) if text_image is None else np.asarray(text_image, dtype=np.int64)
    if len(text_image) != num_texts or (num_texts and (text_image.min() < 0 or text_image.max() >= num_images)):
        raise ValueError("text_image must give, for every caption, the index of an image")
    text_to_image = best_positive_ranks(text_emb, image_emb, text_image, np.arange(num_images), chunk_size)
    image_to_text = best_positive_ranks(image_emb, text_emb, np.arange(num_images), text_image, chunk_size)
    image_to_text = image_to_text[image_to_text >= 0]
    metrics: dict[str, Any] = {"num_images": num_images, "num_texts": num_texts,
                               "image_to_text": {}, "text_to_image": {}, "chance": {"image_to_text": {}, "text_to_image": {}}}
    for k in ks:
        metrics["text_to_image"][f"R@{k}"] = float((text_to_image < k).mean()) if num_texts else 0.0
        metrics["image_to_text"][f"R@{k}"] = float((image_to_text < k).mean()) if len(image_to_text) else 0.0
        metrics["chance"]["text_to_image"][f"R@{k}"] = min(k, num_images) / num_images if num_images else 0.0
        metrics["chance"]["image_to_text"][f"R@{k}"] = min(k, num_texts) / num_texts if num_texts else 0.0
    return metrics


# ---------------------------------------------------------------------------------------------------------------------
# The run


def _write_text(location: str, name: str, text: str, config: StorageConfig | None) -> str:
    target = storage.join(location, name)
    fs, path = storage.filesystem(target, config)
    with storage.storage_errors(target, config), fs.open(path, "w", encoding="utf-8") as file:
        file.write(text)
    return target


def labels_of(table: pa.Table, label_field: str, location: str) -> tuple[np.ndarray, list[str], pa.Table]:
    """(N,) class indices, sorted class names, and the rows that have a label."""
    if label_field not in table.column_names:
        fields = [n for n in table.column_names if n not in ("embedding", "thumbnail", "error")]
        raise UserError(f"no label field {label_field!r} in {location}; fields: {', '.join(fields)}")
    table = table.filter(pc.is_valid(table.column(label_field)))
    values = [str(v) for v in table.column(label_field).to_pylist()]
    if not values:
        raise UserError(f"no image in {location} has a value for {label_field!r}")
    class_names = sorted(set(values))
    index = {name: i for i, name in enumerate(class_names)}
    return np.array([index[v] for v in values], dtype=np.int64), class_names, table


def evaluate(config: EvaluateConfig, progress: bool = True) -> dict[str, Any]:
    """`clipforge evaluate`: embed, classify, retrieve; write metrics.json (and report.html); return the metrics."""
    from training.checkpoint import load_model

    templates = load_templates(config.templates) if config.label_field else []
    device, precision = announce("evaluate", config.device, config.precision)
    model, tokenizer = load_model(config.model, config.storage, device)
    table = embed_location(model, config.data, config.model, config.storage, config.image_column,
                           config.batch_size, config.precision, progress=progress)
    write_embeddings(table, storage.join(config.output, "embeddings.parquet"), config.storage)
    errors = error_rows(table)
    table = valid_rows(table)
    if table.num_rows == 0:
        raise UserError(f"no image of {config.data} could be embedded ({errors.num_rows} errors)")
    metrics: dict[str, Any] = {
        "model": config.model, "data": config.data, "num_images": table.num_rows, "num_errors": errors.num_rows,
        "errors": error_counts(errors), "device": device.type, "precision": precision,
    }
    if config.label_field:
        labels, class_names, labelled = labels_of(table, config.label_field, config.data)
        class_emb = class_embeddings(model, tokenizer, class_names, templates, config.batch_size, config.precision)
        zero_shot = zero_shot_metrics(vectors(labelled), labels, class_emb, class_names, chunk_size=config.chunk_size)
        metrics["zero_shot"] = {"label_field": config.label_field, "templates": templates, **zero_shot}
    captions = table.column("caption")
    if config.retrieval and captions.null_count < table.num_rows:
        with_caption = table.filter(pc.is_valid(captions))
        text_emb = encode_texts(model, tokenizer, with_caption.column("caption").to_pylist(), config.batch_size,
                                config.precision)
        metrics["retrieval"] = retrieval_metrics(vectors(with_caption), text_emb, chunk_size=config.chunk_size)
    _write_text(config.output, "metrics.json", json.dumps(metrics, indent=2), config.storage)
    if config.report:
        from evaluation.report import evaluation_report

        _write_text(config.output, "report.html", evaluation_report(metrics), config.storage)
    return metrics


def output_files(config: EvaluateConfig) -> list[str]:
    names = ["metrics.json", "embeddings.parquet"] + (["report.html"] if config.report else [])
    return [posixpath.join(config.output, name) if storage.is_remote(config.output) else str(Path(config.output, name))
            for name in names]
