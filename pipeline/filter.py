"""Filtering an ingested dataset, as DataComp measured it pays: rules, CLIP score, near-duplicates, decontamination.

`filter_dataset` reads a dataset written by `clipforge ingest` and writes a new one (same layout: tar shards,
`manifest.parquet`) holding the samples that pass, with every removed sample counted under exactly one reason:
kept + removed by reason = input, as ingest accounts for URLs. Three passes, each resumable after a kill:

1. scan: every sample is read once. Rules that look at one sample run here (the image bytes through the one
   validator, `pipeline.images`; image size and aspect ratio; caption length, word count, language), and its
   perceptual hash is computed; with a model (an `Embedder`), its image and caption are embedded and the pair's CLIP
   score (their cosine) kept. One parquet per input shard under `_filter/scan/`.
2. decide: rules that compare samples run over the whole scan, in this order: decontamination (a sample whose image
   is a near-copy of an evaluation image is removed and listed in `decontaminated.parquet`), CLIP score (a threshold
   and/or the top fraction, of the cosine or of its CSLS), near-duplicates (of each group of near-identical images
   with the same caption, the best-scoring is kept). Every sample gets one outcome: kept, or the first rule it fails
   (`_filter/decisions.parquet`, written once, so a resumed run writes exactly what an uninterrupted one would).
3. write: each input shard's kept samples are copied, bytes untouched, into the output shard of the same number,
   streamed (to S3 through a local temporary file), so a shard is never held in memory.

Near-neighbours are searched with faiss: exact search for small sets, an HNSW graph above `exact_search_limit`
samples; memory holds the index and one row of scan results per sample, never the images.

The model is not this module's business (pipeline imports no model): a caller that wants CLIP scores or embedding
near-duplicates passes an `Embedder`; `evaluation.filtering.ModelEmbedder` is the one clipforge provides.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import tarfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from typing import BinaryIO, Literal, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from pydantic import Field
from tqdm import tqdm

from pipeline import storage
from pipeline.config import Config, DeviceSetting, PrecisionSetting
from pipeline.errors import UserError
from pipeline.failures import Fault
from pipeline.images import check_image_bytes, decode_checked
from pipeline.ingest import image_settings, stored_like
from pipeline.manifest import IngestSummary, Manifest, ShardInfo, read_manifest, tar_sample_offsets, write_manifest
from pipeline.shards import iter_shard, sample_image
from pipeline.sources import detect_source, iter_samples
from pipeline.storage import StorageConfig

WORK_DIR = "_filter"
HASH_BITS = 768


class FilterConfig(Config):
    """One filtering run: the input and output datasets and which rules apply (a rule left unset does not run)."""

    data: str
    """The dataset to filter: a folder or s3:// prefix written by `clipforge ingest` (holds manifest.parquet)."""
    output: str
    """Where the filtered dataset is written (a new folder or s3:// prefix; re-running the same command resumes)."""
    min_caption_chars: int | None = Field(2, ge=0)
    """Captions shorter than this (after stripping spaces) are removed: caption_too_short."""
    max_caption_chars: int | None = Field(None, gt=0)
    """Captions longer than this are removed: caption_too_long."""
    min_words: int | None = Field(None, ge=0)
    """Captions with fewer words are removed: too_few_words (DataComp's basic rule keeps captions of 2+ words)."""
    max_words: int | None = Field(None, gt=0)
    """Captions with more words are removed: too_many_words."""
    languages: tuple[str, ...] = ()
    """Keep only captions in these ISO 639-1 languages (e.g. en), identified by py3langid, whose model ships inside
    the package; empty: no language rule. Unreliable on captions of one or two words."""
    min_language_confidence: float = Field(0.5, ge=0, le=1)
    """A caption whose language is identified with less confidence than this counts as not in `languages`."""
    min_image_size: int | None = Field(None, gt=0)
    """Images whose shorter side has fewer pixels are removed: too_small."""
    max_aspect_ratio: float | None = Field(None, ge=1)
    """Images longer than this many times their width (or wider than their height) are removed: aspect_ratio."""
    max_image_bytes: int = Field(20_000_000, gt=0)
    """Image files above this size are removed (too_large) unread, as at ingest."""
    max_image_pixels: int = Field(50_000_000, gt=0)
    """Images declaring more pixels are removed (decompression_bomb) without decoding, as at ingest."""
    model: str | None = None
    """A clipforge checkpoint (folder or s3://, from `clipforge train` or `clipforge import`) whose embeddings give
    the CLIP score and embedding near-duplicates; unset: only the rules that need no model run."""
    min_clip_score: float | None = Field(None, ge=-1, le=1)
    """Pairs whose image-caption cosine under `model` is below this are removed: clip_score (LAION used 0.28 with
    OpenAI's ViT-B/32; a model of your own has its own scale: look at the report's histogram first)."""
    clip_score_top_fraction: float | None = Field(None, gt=0, le=1)
    """Keep only this fraction of the best-scoring pairs among those the earlier rules kept (DataComp's best
    single filter kept the top 30 %): clip_score."""
    clip_score_csls: int | None = Field(None, gt=0)
    """Judge pairs by CSLS over this many neighbours (Conneau et al. 2018 used 10) instead of the raw cosine: twice
    the pair's cosine less the mean cosine of its caption with its nearest images and of its image with its nearest
    captions, among the pairs the earlier rules kept. A caption near many images (a generic one, or one of many
    variants) then no longer lifts pairs it does not describe. The CLIP-score thresholds apply to this score."""
    duplicate_similarity: float | None = Field(None, gt=0, le=1)
    """Image-embedding cosine at or above which two images are near-duplicates (needs `model`); e.g. 0.95."""
    duplicate_hash_distance: int | None = Field(None, ge=0, le=HASH_BITS)
    """Perceptual-hash (768-bit colour dHash) Hamming distance at or below which two images are near-duplicates; 0
    finds copies, 8 most JPEG re-encodings; crops need embeddings (`duplicate_similarity`)."""
    duplicate_captions: Literal["same", "any"] = "same"
    """same: near-duplicate images are duplicates only when their captions are equal (ignoring case and spacing), so
    drawings that differ in what the caption names (a skin tone, a colour) stay; any: by image alone."""
    decontaminate: tuple[str, ...] = ()
    """Evaluation sets whose images must not be trained on: ingested datasets, image folders or image lists (local
    or s3://). Training samples whose image is a near-copy of one are removed (contaminated) and listed."""
    contamination_hash_distance: int = Field(2, ge=0, le=HASH_BITS)
    """Perceptual-hash distance at or below which a training image copies an evaluation image (8 catches most JPEG
    re-encodings, but on icon sets also drawings that differ only in small details)."""
    contamination_similarity: float | None = Field(None, gt=0, le=1)
    """Image-embedding cosine at or above which a training image copies an evaluation image (needs `model`); unset:
    by perceptual hash alone. A model's cosine scale is its own: on the bundled catalog a small clipforge model puts
    different emoji above 0.95, so look at the distances before setting it."""
    exact_search_limit: int = Field(20_000, ge=0)
    """Up to this many samples near-neighbours are searched exactly; above it through an HNSW index."""
    neighbours: int = Field(16, gt=0)
    """Nearest neighbours looked at per sample when grouping near-duplicates."""
    batch_size: int = Field(128, gt=0)
    """Images per forward pass of the model."""
    ray_address: str | None = None
    """Ray cluster address (e.g. 10.0.0.5:6379, or auto): scan the shards as tasks on the cluster, each loading the
    model on its node (its GPU where it has one). Empty: scan in this process. Output on s3:// for a real cluster."""
    device: DeviceSetting = "auto"
    """Where the model runs: auto (a CUDA GPU when one is visible, else the CPU), cpu or cuda."""
    precision: PrecisionSetting = "auto"
    """auto: bf16 where the hardware runs it natively, else fp32."""
    storage: StorageConfig = StorageConfig()
    """How to reach object storage for s3:// locations."""

    @property
    def needs_model(self) -> bool:
        return any(v is not None for v in (self.min_clip_score, self.clip_score_top_fraction, self.duplicate_similarity,
                                           self.contamination_similarity))

    def rules(self) -> dict:
        """The settings that decide which samples are kept (a resumed run must have the same)."""
        rules = self.model_dump(mode="json", exclude={"output", "batch_size", "device", "precision", "storage",
                                                      "ray_address"})
        if rules["clip_score_csls"] is None:  # as runs made before the rule existed wrote them, so that they resume
            del rules["clip_score_csls"]
        return rules


class Embedder(Protocol):
    """What the filter needs of a model: unit-length embeddings of images (decoded by the filter's validator, so
    each is decoded once) and of captions."""

    def images(self, images: list[Image.Image]) -> np.ndarray: ...  # (N, D) float32, of decoded, checked images

    def texts(self, texts: list[str]) -> np.ndarray: ...  # (N, D) float32


# ---------------------------------------------------------------------------------------------------------------------
# 1. one sample: the rules that need nothing else


def perceptual_hash(image: Image.Image) -> bytes:
    """A 768-bit difference hash (dHash) in colour: the image shrunk to 17 x 16 by box averaging, one bit per
    horizontally adjacent pair and channel, set where the right pixel is brighter by more than 16 of 255 levels.

    The margin keeps flat areas (an icon's background and fills) from flipping with JPEG noise, and 768 bits tell apart
    drawings that a 64-bit greyscale dHash confuses (every yellow round face shares one). Survives re-encoding,
    resizing and small colour changes; not crops (use embeddings for those). Compared by Hamming distance.
    """
    pixels = np.asarray(image.convert("RGB").resize((17, 16), Image.BOX), dtype=np.int16)  # (16, 17, 3)
    return np.packbits(pixels[:, 1:] - pixels[:, :-1] > 16).tobytes()


def caption_reason(caption: str, config: FilterConfig, language: tuple[str, float] | None) -> str | None:
    """The caption rule a caption fails, or None."""
    text = caption.strip()
    words = len(text.split())
    if config.min_caption_chars is not None and len(text) < config.min_caption_chars:
        return "caption_too_short"
    if config.max_caption_chars is not None and len(text) > config.max_caption_chars:
        return "caption_too_long"
    if config.min_words is not None and words < config.min_words:
        return "too_few_words"
    if config.max_words is not None and words > config.max_words:
        return "too_many_words"
    if language is not None and (language[0] not in config.languages or language[1] < config.min_language_confidence):
        return "language"
    return None


def image_reason(width: int, height: int, config: FilterConfig) -> str | None:
    """The image-shape rule an image fails, or None."""
    if config.min_image_size is not None and min(width, height) < config.min_image_size:
        return "too_small"
    if config.max_aspect_ratio is not None and max(width, height) > config.max_aspect_ratio * min(width, height):
        return "aspect_ratio"
    return None


def _language_identifier(config: FilterConfig):
    if not config.languages:
        return None
    from py3langid.langid import MODEL_FILE, LanguageIdentifier  # the model is a file inside the package

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class _Embeddings:
    """Images (and their captions) embedded `batch_size` at a time as they come, so that a shard's or an evaluation
    set's decoded images are never all held: by row, the image embedding and (with captions) the pair's cosine."""

    def __init__(self, embedder: Embedder, batch_size: int):
        self.embedder, self.batch_size = embedder, batch_size
        self.pending: list[tuple[int, Image.Image, str | None]] = []
        self.rows: list[int] = []
        self.vectors: list[np.ndarray] = []
        self.texts: list[np.ndarray] = []

    def add(self, row: int, image: Image.Image, caption: str | None = None) -> None:
        self.pending.append((row, image, caption))
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        rows, images, captions = zip(*self.pending)
        self.pending = []
        vectors = np.asarray(self.embedder.images(list(images)), np.float32)
        self.rows += rows
        self.vectors.append(vectors)
        if captions[0] is not None:
            self.texts.append(np.asarray(self.embedder.texts(list(captions)), np.float32))

    def result(self) -> tuple[list[int], np.ndarray, np.ndarray]:
        """(rows, their image embeddings (N, D), their caption embeddings (N, D) where captions were given)."""
        self.flush()
        dim = self.vectors[0].shape[1] if self.vectors else 0
        vectors = np.concatenate(self.vectors) if self.vectors else np.zeros((0, dim), np.float32)
        return self.rows, vectors, np.concatenate(self.texts) if self.texts else np.zeros((0, dim), np.float32)


def scan_shard(url: str, shard: int, config: FilterConfig, embedder: Embedder | None, identifier=None) -> pa.Table:
    """One row per sample of one input shard: key, caption, reason (a one-sample rule failed) or hash (and with an
    embedder, the image embedding and the CLIP score). Metadata `read_error` where the shard broke off."""
    rows: list[dict] = []
    embeddings = _Embeddings(embedder, config.batch_size) if embedder is not None else None
    read_error = None
    samples = iter_shard(url, config.storage)
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            break
        except Exception as err:  # noqa: BLE001 - a broken shard keeps what was read; the rest is counted as unreadable
            read_error = f"{type(err).__name__}: {err}"
            break
        caption = sample.get("txt", b"").decode("utf-8", errors="replace")
        row = {"key": sample["__key__"], "shard": shard, "index": len(rows), "caption": caption, "reason": None,
               "detail": None, "hash": None, "width": None, "height": None}
        rows.append(row)
        data = sample_image(sample)
        try:
            if data is None:
                raise Fault("missing_image", "the sample has no image file")
            header = check_image_bytes(data, config.max_image_bytes, config.max_image_pixels)
            row["width"], row["height"] = header.width, header.height
            reason = image_reason(header.width, header.height, config)
            if reason:
                raise Fault(reason, f"{header.width}x{header.height}")
            image = decode_checked(data, config.max_image_bytes, config.max_image_pixels)
        except Fault as err:
            row["reason"], row["detail"] = err.kind, err.detail
            continue
        row["hash"] = perceptual_hash(image)
        language = identifier.classify(caption) if identifier is not None else None
        row["reason"] = caption_reason(caption, config, language)
        if language is not None:
            row["detail"] = f"{language[0]} {language[1]:.2f}"
        if embeddings is not None and row["reason"] is None:
            embeddings.add(len(rows) - 1, image, caption)
    columns = {name: [row[name] for row in rows] for name in
               ("key", "shard", "index", "caption", "reason", "detail", "hash", "width", "height")}
    table = pa.table(columns, schema=_SCAN_SCHEMA)
    if embeddings is not None:
        embedded, image_vectors, text_vectors = embeddings.result()
        score = np.full(len(rows), np.nan, np.float32)
        score[embedded] = np.sum(image_vectors * text_vectors, axis=1)
        table = table.append_column("clip_score", pa.array(score, mask=np.isnan(score)))
        table = table.append_column("embedding", _vector_column(image_vectors, embedded, len(rows)))
        if config.clip_score_csls is not None:  # CSLS compares every caption with every image
            table = table.append_column("text_embedding", _vector_column(text_vectors, embedded, len(rows)))
    return table.replace_schema_metadata({b"read_error": json.dumps(read_error).encode()})


def _vector_column(vectors: np.ndarray, rows: list[int], length: int) -> pa.Array:
    """A column of `length` rows holding `vectors` at `rows` and nulls elsewhere."""
    dim = vectors.shape[1]
    if not dim:
        return pa.nulls(length, pa.list_(pa.float32()))
    full = np.zeros((length, dim), np.float32)
    full[rows] = vectors
    mask = np.ones(length, bool)
    mask[rows] = False
    return pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1), pa.float32()), dim, mask=pa.array(mask))


_SCAN_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.int64()), ("index", pa.int64()), ("caption", pa.string()),
                          ("reason", pa.string()), ("detail", pa.string()), ("hash", pa.binary(HASH_BITS // 8)),
                          ("width", pa.int64()), ("height", pa.int64())])


# ---------------------------------------------------------------------------------------------------------------------
# 2. near-neighbours


def _hash_matrix(hashes: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(-1, HASH_BITS // 8) if hashes else np.zeros((0, HASH_BITS // 8), np.uint8)


def neighbours(index_vectors: np.ndarray, queries: np.ndarray, k: int, exact_limit: int,
               binary: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(distances or similarities (Q, k), indices (Q, k), -1 where fewer) of each query's k nearest index rows.

    Vectors: inner product (cosine of unit vectors), exact (`IndexFlatIP`) up to `exact_limit` rows, else HNSW.
    Binary (packed hashes): Hamming distance, exact or binary HNSW likewise.
    """
    import faiss

    k = min(k, len(index_vectors))
    if k == 0 or len(queries) == 0:
        return np.zeros((len(queries), 0)), np.zeros((len(queries), 0), np.int64)
    exact = len(index_vectors) <= exact_limit
    if binary:
        index = faiss.IndexBinaryFlat(HASH_BITS) if exact else faiss.IndexBinaryHNSW(HASH_BITS, 32)
    else:
        dim = index_vectors.shape[1]
        index = faiss.IndexFlatIP(dim) if exact else faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    if not exact:
        index.hnsw.efSearch = max(64, 2 * k)  # the default (16) loses neighbours at k = 16
    index.add(np.ascontiguousarray(index_vectors))
    return index.search(np.ascontiguousarray(queries), k)


def near_duplicate_pairs(vectors: np.ndarray | None, hashes: np.ndarray | None, config: FilterConfig) -> list[tuple[int, int]]:
    """(i, j) pairs of rows whose images are near-duplicates by embedding and/or by perceptual hash."""
    pairs: set[tuple[int, int]] = set()
    for data, binary, close in ((vectors, False, lambda d: d >= config.duplicate_similarity),
                                (hashes, True, lambda d: d <= config.duplicate_hash_distance)):
        if data is None or not len(data):
            continue
        distance, found = neighbours(data, data, config.neighbours, config.exact_search_limit, binary)
        for i, j in zip(*np.nonzero(close(distance) & (found >= 0))):
            other = int(found[i, j])
            if other != i:
                pairs.add((min(i, other), max(i, other)))
    return sorted(pairs)


def _caption_key(caption: str) -> str:
    return " ".join(caption.lower().split())


def greedy_deduplicate(order: np.ndarray, pairs: list[tuple[int, int]], captions: list[str], same_caption: bool) -> dict[int, int]:
    """{removed row: the row it duplicates}: rows are visited in `order` (best first); each kept row removes its
    not-yet-removed near-duplicates that come later."""
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    linked: dict[int, list[int]] = {}
    for i, j in pairs:
        if not same_caption or _caption_key(captions[i]) == _caption_key(captions[j]):
            linked.setdefault(i, []).append(j)
            linked.setdefault(j, []).append(i)
    removed: dict[int, int] = {}
    for row in order:
        if row in removed:
            continue
        for other in linked.get(int(row), ()):
            if rank[other] > rank[row] and other not in removed:
                removed[other] = int(row)
    return removed


# ---------------------------------------------------------------------------------------------------------------------
# 3. the evaluation sets to keep out


def reference_features(locations: tuple[str, ...], config: FilterConfig, embedder: Embedder | None) -> pa.Table:
    """Every image of the evaluation sets: source, key, perceptual hash and (with an embedder) embedding.

    An evaluation set of originals (an image folder or list) is first stored as ingest stored the training images,
    where the training data says how (`stored_like`): a copy of an original that ingest re-encoded then hashes as the
    training sample does (JPEG at quality 95 alone moves this hash by a median 3 and up to 15 bits on the bundled
    drawings, further than the 2 bits that tell some distinct drawings apart). Shards are compared as they are."""
    rows: list[dict] = []
    embeddings = _Embeddings(embedder, config.batch_size) if embedder is not None else None
    data_settings = image_settings(config.data, config.storage)
    store = stored_like(data_settings) if data_settings is not None else None
    for location in locations:
        stored = store if detect_source(location, config.storage) != "shards" else None
        for sample in iter_samples(location, config.storage, max_image_bytes=config.max_image_bytes):
            if sample.error or sample.data is None:
                continue
            try:
                image = decode_checked(sample.data, config.max_image_bytes, config.max_image_pixels)
                if stored is not None:  # checked first: the resizer decodes whatever it is given
                    image = decode_checked(stored(sample.data), config.max_image_bytes, config.max_image_pixels)
            except Fault:
                continue
            rows.append({"source": location, "key": sample.key, "hash": perceptual_hash(image)})
            if embeddings is not None:
                embeddings.add(len(rows) - 1, image)
    table = pa.table({name: [r[name] for r in rows] for name in ("source", "key", "hash")},
                     schema=pa.schema([("source", pa.string()), ("key", pa.string()), ("hash", pa.binary(HASH_BITS // 8))]))
    if embeddings is not None and rows:
        embedded, vectors, _ = embeddings.result()
        table = table.append_column("embedding", _vector_column(vectors, embedded, len(rows)))
    return table


def _vectors(column: pa.ChunkedArray) -> np.ndarray:
    column = column.combine_chunks()
    if len(column) == 0:
        return np.zeros((0, column.type.list_size), np.float32)
    return np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(len(column), -1)


def find_contaminated(scan: pa.Table, alive: np.ndarray, references: pa.Table, config: FilterConfig) -> pa.Table:
    """Rows of `scan` (among `alive`) whose image is a near-copy of an evaluation image: the match of each."""
    rows = np.flatnonzero(alive)
    matches: dict[int, tuple[int, float, str]] = {}  # row -> (reference row, value, by)
    if references.num_rows and len(rows):
        distance, found = neighbours(_hash_matrix(references["hash"].to_pylist()),
                                     _hash_matrix(scan["hash"].take(rows).to_pylist()), 1, config.exact_search_limit, binary=True)
        for position in np.flatnonzero(distance[:, 0] <= config.contamination_hash_distance):
            matches[int(rows[position])] = (int(found[position, 0]), float(distance[position, 0]), "hash")
        if config.contamination_similarity is not None and "embedding" in references.column_names:
            similarity, found = neighbours(_vectors(references["embedding"]), _vectors(scan["embedding"].take(rows)), 1,
                                           config.exact_search_limit)
            for position in np.flatnonzero(similarity[:, 0] >= config.contamination_similarity):
                matches.setdefault(int(rows[position]), (int(found[position, 0]), float(similarity[position, 0]), "embedding"))
    ordered = sorted(matches)
    # typed row numbers: an empty take needs them
    taken, found_rows = pa.array(ordered, pa.int64()), pa.array([matches[r][0] for r in ordered], pa.int64())
    return pa.table({
        "key": scan["key"].take(taken), "shard": scan["shard"].take(taken),
        "evaluation_set": references["source"].take(found_rows), "evaluation_key": references["key"].take(found_rows),
        "matched_by": pa.array([matches[r][2] for r in ordered], pa.string()),
        "value": pa.array([matches[r][1] for r in ordered], pa.float64()),
    })


# ---------------------------------------------------------------------------------------------------------------------
# 4. decisions


def csls(images: np.ndarray, texts: np.ndarray, k: int, exact_limit: int) -> np.ndarray:
    """Cross-domain similarity local scaling (Conneau et al. 2018) of each pair (row i of unit `images` and `texts`):
    2 cos(image i, text i) less the mean cosine of text i with its k nearest images and of image i with its k nearest
    texts. A hub, close to everything, is judged against how close it is to everything."""
    score = 2 * np.sum(images * texts, axis=1, dtype=np.float64)
    for index, queries in ((images, texts), (texts, images)):
        near, found = neighbours(index, queries, k, exact_limit)
        if near.shape[1]:
            score -= np.nanmean(np.where(found >= 0, near, np.nan), axis=1)
    return score


def decide(scan: pa.Table, config: FilterConfig, references: pa.Table | None) -> tuple[pa.Table, pa.Table]:
    """(decisions: key, shard, index, reason (null: kept), detail; the contaminated rows and their matches)."""
    reason = np.array(scan["reason"].to_pylist(), dtype=object)
    detail = np.array(scan["detail"].to_pylist(), dtype=object)
    alive = np.array([r is None for r in reason])
    contaminated = pa.table({"key": pa.array([], pa.string())})
    if references is not None:
        contaminated = find_contaminated(scan, alive, references, config)
        index = {key: i for i, key in enumerate(scan["key"].to_pylist())}
        for row in contaminated.to_pylist():
            i = index[row["key"]]
            reason[i], detail[i] = "contaminated", f"{row['evaluation_set']}#{row['evaluation_key']} ({row['matched_by']} {row['value']:.3g})"
            alive[i] = False
    score = None
    if "clip_score" in scan.column_names:
        score = np.where(alive, np.array(scan["clip_score"].to_numpy(zero_copy_only=False), np.float64), np.nan)
        if config.clip_score_csls is not None:
            scored = np.flatnonzero(~np.isnan(score))
            images, texts = (_vectors(scan[name].take(scored)) for name in ("embedding", "text_embedding"))
            score[scored] = csls(images, texts, config.clip_score_csls, config.exact_search_limit)
        low = np.zeros(len(score), bool)
        if config.min_clip_score is not None:
            low |= alive & (score < config.min_clip_score)
        if config.clip_score_top_fraction is not None and alive.any():
            keep = max(1, round(config.clip_score_top_fraction * (alive & ~low).sum()))
            threshold = np.sort(score[alive & ~low])[::-1][keep - 1]
            low |= alive & (score < threshold)
        reason[low], detail[low] = "clip_score", [f"{s:.3f}" for s in score[low]]
        alive &= ~low
    if config.duplicate_similarity is not None or config.duplicate_hash_distance is not None:
        rows = np.flatnonzero(alive)
        vectors = _vectors(scan["embedding"].take(rows)) if config.duplicate_similarity is not None else None
        hashes = _hash_matrix(scan["hash"].take(rows).to_pylist()) if config.duplicate_hash_distance is not None else None
        pairs = near_duplicate_pairs(vectors, hashes, config)
        order = np.argsort(-score[rows], kind="stable") if score is not None else np.arange(len(rows))
        captions = scan["caption"].take(rows).to_pylist()
        keys = scan["key"].to_pylist()
        for removed, twin in greedy_deduplicate(order, pairs, captions, config.duplicate_captions == "same").items():
            reason[rows[removed]], detail[rows[removed]] = "duplicate", f"of {keys[rows[twin]]}"
    decisions = pa.table({"key": scan["key"], "shard": scan["shard"], "index": scan["index"],
                          "reason": pa.array(list(reason), pa.string()), "detail": pa.array(list(detail), pa.string())})
    if score is not None:  # the score the CLIP-score rule judged by; null: removed by an earlier rule
        decisions = decisions.append_column("clip_score", pa.array(score, pa.float64(), mask=np.isnan(score)))
    return decisions, contaminated


# ---------------------------------------------------------------------------------------------------------------------
# 5. writing


def _put(fs, path: str, data: bytes) -> None:
    with storage.open_atomic(fs, path) as file:
        file.write(data)


def _parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _scan_path(work: str, shard: int) -> str:
    return posixpath.join(work, "scan", f"{shard:05d}.parquet")


def _num_rows(fs, path: str) -> int:
    with fs.open(path, "rb") as f:
        return pq.read_metadata(f).num_rows


def _read_parquet(fs, path: str) -> pa.Table:
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def _copy_kept(url: str, kept: set[int], config: FilterConfig, file: BinaryIO) -> None:
    """Write into `file` a tar of the kept samples (by index) of one input shard, members and bytes as they were."""
    with tarfile.open(fileobj=file, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for index, sample in enumerate(iter_shard(url, config.storage)):
            if index not in kept:
                continue
            for extension, data in sample.items():
                if not extension.startswith("__"):
                    info = tarfile.TarInfo(f"{sample['__key__']}.{extension}")
                    info.size, info.mode, info.mtime = len(data), 0o644, 0
                    tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------------------------------------------------------------
# scanning on a Ray cluster


def _scanned_by(table: pa.Table, who: str) -> pa.Table:
    return table.replace_schema_metadata({**(table.schema.metadata or {}), b"scanned_by": who.encode()})


def _scan_task(url: str, shard: int, config: FilterConfig, make_embedder: Callable[[], Embedder] | None,
               output: str, credentials: object) -> int:
    """One shard's scan as a Ray task: build the embedder on this node, scan, write the scan file."""
    import ray  # ray

    from pipeline import cluster

    cluster.adopt_credentials(credentials)  # ray: the driver's explicit keys, if it shipped any
    table = scan_shard(url, shard, config, make_embedder() if make_embedder else None, _language_identifier(config))
    node = ray.get_runtime_context().get_node_id()[:8]  # ray
    fs, path = storage.filesystem(output, config.storage)
    _put(fs, _scan_path(posixpath.join(path, WORK_DIR), shard),
         _parquet(_scanned_by(table, f"ray task pid {os.getpid()} on node {node}")))
    return shard


def scan_on_ray(todo: list[tuple[str, int]], config: FilterConfig, output: str,
                make_embedder: Callable[[], Embedder] | None, progress: bool) -> None:
    """Scan the (url, shard) pairs as tasks on the Ray cluster at `config.ray_address`, one task per shard."""
    import ray  # ray

    from pipeline import cluster

    # the packages the tasks import: the filter, and the model's (training, evaluation) for the embedder
    with cluster.ray_session(config.ray_address, storage.cluster_env(config.storage),
                             packages=("pipeline", "training", "evaluation")):
        credentials = cluster.ship_credentials(config.storage)  # ray: an object, not recorded anywhere
        # a task sees a GPU only when it asks for one (Ray hides the others from it)
        gpus = 1 if config.device != "cpu" and ray.cluster_resources().get("GPU") else 0  # ray
        task = ray.remote(num_cpus=1, num_gpus=gpus)(_scan_task)  # ray
        pending = [task.remote(url, shard, config, make_embedder, output, credentials) for url, shard in todo]
        with tqdm(total=len(pending), desc="filter: scan on ray", unit="shard", disable=None if progress else True) as bar:
            while pending:
                done, pending = ray.wait(pending)  # ray
                ray.get(done)  # ray: a task's error is raised here
                bar.update(len(done))


# ---------------------------------------------------------------------------------------------------------------------
# the job


def filter_dataset(config: FilterConfig, make_embedder: Callable[[], Embedder] | None = None,
                   progress: bool = True) -> Manifest:
    """Run the filter described by `config` (see the module docstring); re-running after a kill resumes it.

    `make_embedder` builds the model's embedder (called once here, or once per Ray task: it must pickle then).
    """
    if config.needs_model and make_embedder is None:
        raise UserError("CLIP-score and embedding-duplicate rules need a model: set --model to a clipforge checkpoint")
    started = time.monotonic()
    source = read_manifest(config.data, config.storage)
    output = storage.absolute(config.output)
    if output.rstrip("/") == storage.absolute(config.data).rstrip("/"):
        raise UserError("--output must differ from --data: the filter writes a new dataset and keeps the input")
    storage.check_writable(output, config.storage)
    fs, path = storage.filesystem(output, config.storage)
    work = posixpath.join(path, WORK_DIR)
    with storage.storage_errors(output, config.storage):
        fs.makedirs(posixpath.join(work, "scan"), exist_ok=True)
        for folder in (path, work, posixpath.join(work, "scan")):  # what a killed run of this filter was writing
            storage.remove_temporaries(fs, folder)
        settings = posixpath.join(work, "rules.json")
        rules = json.dumps(config.rules(), indent=2, sort_keys=True)
        if fs.exists(settings) and fs.cat_file(settings).decode() != rules:
            raise UserError(f"{output} holds a filter run with other rules ({storage.join(output, WORK_DIR, 'rules.json')}): "
                            "choose another --output, or delete it to start over")
        _put(fs, settings, rules.encode())

        shards = [s for s in source.shards if s.samples > 0]
        todo = [(storage.join(source.location, s.path), s.shard) for s in shards if not fs.exists(_scan_path(work, s.shard))]
        embedder = None
        if todo and config.ray_address:
            scan_on_ray(todo, config, output, make_embedder, progress)
        elif todo:
            embedder = make_embedder() if make_embedder else None
            identifier = _language_identifier(config)
            for url, shard in tqdm(todo, desc="filter: scan", unit="shard", disable=None if progress else True):
                table = scan_shard(url, shard, config, embedder, identifier)
                _put(fs, _scan_path(work, shard), _parquet(_scanned_by(table, "this process")))
        unreadable = {info.shard: info.samples - _num_rows(fs, _scan_path(work, info.shard)) for info in shards}

        decisions_path = posixpath.join(work, "decisions.parquet")
        if not fs.exists(decisions_path):
            scan = pa.concat_tables([_read_parquet(fs, _scan_path(work, info.shard)) for info in shards]
                                    or [_SCAN_SCHEMA.empty_table()])
            if embedder is None and make_embedder is not None and config.decontaminate:
                embedder = make_embedder()
            references = reference_features(config.decontaminate, config, embedder) if config.decontaminate else None
            decisions, contaminated = decide(scan, config, references)
            _put(fs, posixpath.join(path, "decontaminated.parquet"), _parquet(contaminated))
            _put(fs, decisions_path, _parquet(decisions))
        decisions = _read_parquet(fs, decisions_path)

        kept_by_shard: dict[int, set[int]] = {info.shard: set() for info in shards}
        survivors = decisions.filter(pc.is_null(decisions["reason"]))
        for shard, index in zip(survivors["shard"].to_pylist(), survivors["index"].to_pylist()):
            kept_by_shard[shard].add(index)
        written: list[ShardInfo] = []
        for info in tqdm(shards, desc="filter: write", unit="shard", disable=None if progress else True):
            kept = kept_by_shard[info.shard]
            name = f"{info.shard:05d}.tar"
            target = posixpath.join(path, name)
            if not fs.exists(target):
                shard_url = storage.join(source.location, info.path)
                with storage.open_atomic(fs, target) as file:
                    _copy_kept(shard_url, kept, config, file)
            with fs.open(target, "rb") as stream:
                offsets = tar_sample_offsets(stream)
            written.append(ShardInfo(shard=info.shard, path=name, samples=len(kept), attempted=info.samples,
                                     failed=info.samples - len(kept), bytes=fs.size(target),
                                     offsets=offsets if len(offsets) == len(kept) + 1 else None))

        removed = decisions.filter(pc.is_valid(decisions["reason"]))
        failures = Counter(removed["reason"].to_pylist())
        if sum(unreadable.values()):
            failures["unreadable"] += sum(unreadable.values())
        summary = IngestSummary(input_rows=source.num_samples, successes=sum(s.samples for s in written),
                                failures=dict(failures.most_common()), bytes=sum(s.bytes for s in written),
                                shards=len(written), seconds=round(time.monotonic() - started, 2))
        _put(fs, posixpath.join(path, "removed.parquet"), _parquet(removed))
        _put(fs, posixpath.join(work, "summary.json"), json.dumps({**asdict(summary), "data": source.location}, indent=2).encode())
        write_manifest(output, written, summary, config.storage)
    return Manifest(location=output, shards=written, summary=summary)
