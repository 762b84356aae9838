"""Image search: text queries against an embedded asset library (an embedding table from `clipforge embed`).

The search is exact: every query is compared with every image, a chunk of images at a time, and a running top-k is
merged chunk by chunk, so memory is O(queries x (chunk + k)) however large the library. Scores are cosine
similarities; ties go to the image that comes first in the table (the same rule as `evaluation.evaluate`).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch
from pydantic import Field

from pipeline import storage
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.storage import StorageConfig
from training.device import DeviceSetting, PrecisionSetting, announce
from evaluation.embed import encode_texts, read_embeddings, table_info, valid_rows, vectors


class SearchConfig(Config):
    """One search: which library, which queries, how many hits."""

    index: str
    """Embedding table of the library (a .parquet written by `clipforge embed`), local or s3://."""
    queries: list[str]
    """Text queries (the command's arguments)."""
    top_k: int = Field(10, gt=0)
    """Hits returned per query."""
    model: str | None = None
    """Checkpoint to embed the queries with. Empty: the one recorded in the index (it must be the same model)."""
    chunk_size: int = Field(65536, gt=0)
    """Library images compared per step."""
    device: DeviceSetting = "auto"
    """auto: a CUDA GPU when one is visible, else the CPU; cpu or cuda force it."""
    precision: PrecisionSetting = "auto"
    """auto: bf16 autocast where the hardware runs bf16 natively (CUDA with bf16, CPUs with AMX or AVX-512 BF16), else
    fp32; bf16 or fp32 force it."""
    output: str | None = None
    """Folder for results.json and report.html (thumbnails of the hits). Empty: print only."""
    storage: StorageConfig = StorageConfig()
    """How to reach object storage for s3:// locations."""


def top_k(queries: np.ndarray, library: np.ndarray, k: int, chunk_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """(Q, D) x (N, D) -> (scores (Q, k'), indices (Q, k')), k' = min(k, N), best first, exact."""
    q, lib = torch.from_numpy(np.ascontiguousarray(queries)), torch.from_numpy(np.ascontiguousarray(library))
    best_scores = torch.empty(len(q), 0)
    best_index = torch.empty(len(q), 0, dtype=torch.long)
    for start in range(0, len(lib), chunk_size):
        scores = q @ lib[start:start + chunk_size].T  # (Q, m)
        # candidates so far come first and have lower indices; a stable sort keeps that order among equal scores
        candidates = torch.cat([best_scores, scores], dim=1)
        indices = torch.cat([best_index, torch.arange(start, start + scores.shape[1]).expand(len(q), -1)], dim=1)
        order = torch.sort(candidates, dim=1, descending=True, stable=True).indices[:, :k]
        best_scores, best_index = candidates.gather(1, order), indices.gather(1, order)
    return best_scores.numpy(), best_index.numpy()


def search(config: SearchConfig, progress: bool = False) -> list[dict[str, Any]]:
    """`clipforge search`: per query, {"query", "hits": [{"rank", "key", "score", "source", "caption"}]}."""
    from training.checkpoint import load_model

    if not config.queries:
        raise UserError('give at least one query: clipforge search --index INDEX "a red circle"')
    table = read_embeddings(config.index, config.storage)
    model_location = config.model or table_info(table).get("model")
    if not model_location:
        raise UserError(f"{config.index} does not record its model: pass --model")
    table = valid_rows(table)
    model, tokenizer = load_model(model_location, config.storage,
                                  announce("search", config.device, config.precision)[0])
    library = vectors(table)
    if library.shape[1] != model.config.embed_dim:
        raise UserError(f"index {config.index} holds {library.shape[1]}-d embeddings but {model_location} makes "
                        f"{model.config.embed_dim}-d ones: search with the model that built the index")
    query_emb = encode_texts(model, tokenizer, list(config.queries), precision=config.precision)
    scores, indices = top_k(query_emb, library, config.top_k, config.chunk_size)
    keys, sources = table.column("key").to_pylist(), table.column("source").to_pylist()
    captions = table.column("caption").to_pylist()
    thumbnails = table.column("thumbnail").to_pylist() if "thumbnail" in table.column_names else [None] * len(keys)
    results = []
    for query, row_scores, row_indices in zip(config.queries, scores, indices):
        hits = [{"rank": rank + 1, "key": keys[i], "score": float(s), "source": sources[i], "caption": captions[i],
                 "thumbnail": thumbnails[i]} for rank, (s, i) in enumerate(zip(row_scores, row_indices))]
        results.append({"query": query, "hits": hits})
    if config.output:
        from evaluation.report import search_report

        fs, path = storage.filesystem(config.output, config.storage)
        plain = [{"query": r["query"], "hits": [{k: v for k, v in h.items() if k != "thumbnail"} for h in r["hits"]]}
                 for r in results]
        with storage.storage_errors(config.output, config.storage):
            with fs.open(f"{path}/results.json", "w") as file:
                file.write(json.dumps({"index": config.index, "model": model_location, "results": plain}, indent=2))
            with fs.open(f"{path}/report.html", "w") as file:
                file.write(search_report(config.index, results))
    return results
