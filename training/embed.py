"""Embedding: images and captions -> unit-length float32 vectors, computed under bf16 autocast and saved as parquet.

Everything downstream (zero-shot evaluation, retrieval, brand profiles, image search) starts from the table this
module writes, so a library is embedded once and reused. Images come from one of four kinds of location, told apart
by `detect_source`:

- a dataset written by `clipforge ingest` (a folder or `s3://` prefix holding `manifest.parquet` and tar shards);
- an image list: a `.parquet` / `.csv` / `.tsv` / `.jsonl` file with an `image` column (a path relative to the
  list, an absolute path, `s3://...` or `http(s)://...`) and any label columns (`label`, `caption`, ...);
- a folder or `s3://` prefix of image files (found recursively by extension);
- an embedding table this module wrote before (reused as is).

Images from outside (uploads, generated images) are checked before they are decoded: file size and declared pixel
count are capped, and a corrupt or non-image file becomes a row with an `error` and no embedding, never an
exception, so nothing else in the batch is lost. The table's columns: `key`, `embedding`
(fixed_size_list<float32>[D], null on error rows), `error`, `caption`, `source`, `thumbnail` (small JPEG, optional)
and every field of a shard's json or an image list's other columns. The model location and kind are stored in the
parquet metadata under `clipforge.embeddings`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import tarfile
import urllib.request
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv
import pyarrow.json
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from pydantic import Field
from tqdm import tqdm

from pipeline import storage
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.manifest import MANIFEST_NAME, read_manifest
from pipeline.storage import StorageConfig
from training.device import DeviceSetting, PrecisionSetting, announce, autocast, resolve_precision
from training.model import CLIP
from training.tokenizer import Tokenizer
from training.transforms import center_crop, decode, to_tensor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
LIST_EXTENSIONS = (".parquet", ".csv", ".tsv", ".jsonl")
METADATA_KEY = b"clipforge.embeddings"
# columns this module owns; a shard json field or list column of the same name is not copied over them
RESERVED_COLUMNS = ("key", "embedding", "error", "caption", "source", "thumbnail")


class EmbedConfig(Config):
    """One embedding run: which model, which images, where the table goes, how outside images are limited."""

    model: str
    """Checkpoint location (a folder or s3://...) written by `clipforge train` or `save_checkpoint`."""
    data: str
    """Images: an ingested dataset (has manifest.parquet), an image list (.parquet/.csv/.tsv/.jsonl with an `image`
    column), or a folder / s3:// prefix of image files."""
    output: str
    """Where the embedding table is written: a .parquet file path, local or s3://."""
    image_column: str = "image"
    """Column of an image list that holds each image's location."""
    batch_size: int = Field(128, gt=0)
    """Images per forward pass."""
    device: DeviceSetting = "auto"
    """auto: a CUDA GPU when one is visible, else the CPU; cpu or cuda force it."""
    precision: PrecisionSetting = "auto"
    """auto: bf16 autocast where the hardware runs bf16 natively (CUDA with bf16, CPUs with AMX or AVX-512 BF16), else
    fp32; bf16 or fp32 force it."""
    thumbnail_size: int = Field(64, ge=0)
    """Side of the JPEG thumbnail kept per image for reports and search results; 0 keeps none."""
    max_image_bytes: int = Field(20_000_000, gt=0)
    """Files larger than this many bytes are rejected (error row `too_large`) without being decoded."""
    max_image_pixels: int = Field(50_000_000, gt=0)
    """Images declaring more than width x height pixels are rejected before decoding (decompression bombs)."""
    storage: StorageConfig = StorageConfig()
    """How to reach object storage for s3:// locations."""


@dataclass
class Sample:
    """One image on its way to the model; `error` set means it could not even be read."""

    key: str
    source: str
    data: bytes | None
    caption: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class ImageRejected(Exception):
    """An image that will not be embedded; the message is the error row's reason (`kind: detail`)."""


# ---------------------------------------------------------------------------------------------------------------------
# 1. Where images come from


def detect_source(location: str, config: StorageConfig | None = None) -> Literal["embeddings", "list", "shards", "images"]:
    """Which kind of location this is (see the module docstring); raises `UserError` if it does not exist."""
    lower = location.lower()
    if lower.endswith(".parquet") and is_embedding_table(location, config):
        return "embeddings"
    if lower.endswith(LIST_EXTENSIONS):
        return "list"
    fs, path = storage.filesystem(location, config)
    with storage.storage_errors(location, config):
        if fs.exists(posixpath.join(path, MANIFEST_NAME)):
            return "shards"
        if not fs.exists(path):
            raise UserError(f"{location} does not exist")
    return "images"


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: `dir/0000012.jpg` -> ("dir/0000012", "jpg"); the extension starts at the first dot."""
    directory, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(directory, stem), extension.lower()


def iter_shards(location: str, config: StorageConfig | None = None, max_image_bytes: int | None = None) -> Iterator[Sample]:
    """Samples of a dataset written by `clipforge ingest`, shard by shard; a corrupt shard becomes one error row."""
    for url in read_manifest(location, config).shard_urls():
        fs, path = storage.filesystem(url, config)
        current: Sample | None = None
        try:
            with storage.storage_errors(url, config), fs.open(path, "rb") as file, tarfile.open(fileobj=file, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, extension = _split_key(member.name)
                    if current is None or current.key != key:
                        if current is not None:
                            yield current
                        current = Sample(key=key, source=f"{url}#{key}", data=None)
                    if extension in ("jpg", "jpeg", "png", "webp") and max_image_bytes and member.size > max_image_bytes:
                        current.error = f"too_large: {member.size:,} bytes, above the limit of {max_image_bytes:,}"
                        continue
                    content = tar.extractfile(member).read()
                    if extension in ("jpg", "jpeg", "png", "webp"):
                        current.data = content
                    elif extension == "txt":
                        current.caption = content.decode("utf-8", errors="replace")
                    elif extension == "json":
                        current.metadata = json.loads(content)
        except (tarfile.TarError, json.JSONDecodeError, EOFError) as err:
            yield Sample(key=url, source=url, data=None, error=f"corrupt_shard: {type(err).__name__}: {err}")
        if current is not None:
            yield current


def list_image_files(location: str, config: StorageConfig | None = None) -> list[tuple[str, str, int]]:
    """(key, path inside the filesystem, size in bytes) of every image file under `location`, sorted by key."""
    fs, root = storage.filesystem(location, config)
    with storage.storage_errors(location, config):
        if fs.isfile(root):
            return [(posixpath.basename(root), root, fs.size(root))]
        found = fs.find(root, detail=True)
    files = []
    for path, info in found.items():
        if path.lower().endswith(IMAGE_EXTENSIONS):
            key = posixpath.relpath(path, root) if not storage.is_remote(location) else path[len(root):].lstrip("/")
            files.append((key, path, int(info.get("size") or 0)))
    return sorted(files)


def iter_image_files(location: str, config: StorageConfig | None = None, max_image_bytes: int | None = None) -> Iterator[Sample]:
    """Samples of every image file under a folder or s3:// prefix; oversized and unreadable files are error rows."""
    files = list_image_files(location, config)
    if not files:
        raise UserError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {location}")
    fs, _ = storage.filesystem(location, config)
    for key, path, size in files:
        source = storage.join(location, key) if key != posixpath.basename(location) else location
        if max_image_bytes and size > max_image_bytes:
            yield Sample(key, source, None, error=f"too_large: {size:,} bytes, above the limit of {max_image_bytes:,}")
            continue
        try:
            yield Sample(key, source, fs.cat_file(path))
        except OSError as err:
            yield Sample(key, source, None, error=f"unreadable: {type(err).__name__}: {err}")


def read_table(location: str, config: StorageConfig | None = None) -> pa.Table:
    """A .parquet / .csv / .tsv / .jsonl file as a table (local or s3://)."""
    fs, path = storage.pyarrow_filesystem(location, config)
    lower = location.lower()
    with storage.storage_errors(location, config):
        try:
            if lower.endswith(".parquet"):
                return pq.read_table(path, filesystem=fs)
            with fs.open_input_stream(path) as stream:
                if lower.endswith(".jsonl"):
                    return pyarrow.json.read_json(stream)
                delimiter = "\t" if lower.endswith(".tsv") else ","
                return pyarrow.csv.read_csv(stream, parse_options=pyarrow.csv.ParseOptions(delimiter=delimiter))
        except pa.ArrowInvalid as err:
            raise UserError(f"cannot read {location}: {str(err).splitlines()[0]}") from None


def _read_location(location: str, config: StorageConfig | None, max_bytes: int | None, timeout: float = 30.0) -> bytes:
    if location.startswith(("http://", "https://")):
        with urllib.request.urlopen(location, timeout=timeout) as response:  # noqa: S310 - the user's own list
            data = response.read((max_bytes or 0) + 1 if max_bytes else -1)
    else:
        fs, path = storage.filesystem(location, config)
        if max_bytes and fs.size(path) > max_bytes:
            data = b"\0" * (max_bytes + 1)  # only its size matters: it is rejected as too large below
        else:
            data = fs.cat_file(path)
    if max_bytes and len(data) > max_bytes:
        raise ImageRejected(f"too_large: more than {max_bytes:,} bytes")
    return data


def iter_image_list(location: str, config: StorageConfig | None = None, image_column: str = "image",
                    max_image_bytes: int | None = None) -> Iterator[Sample]:
    """Samples of an image list; relative image paths are read beside the list; other columns become metadata."""
    table = read_table(location, config)
    if image_column not in table.column_names:
        raise UserError(f"{location} has no column {image_column!r} (columns: {', '.join(table.column_names)}); "
                        "set --image-column")
    base = posixpath.dirname(location) if storage.is_remote(location) else os.path.dirname(storage.absolute(location))
    for index, row in enumerate(table.to_pylist()):
        image = str(row.pop(image_column) or "")
        caption = row.pop("caption", None)
        absolute = image.startswith(("/", "s3://", "http://", "https://"))
        source = image if absolute else storage.join(base, image)
        key = str(row.pop("key", None) or image or index)
        sample = Sample(key, source, None, caption=caption, metadata=row)
        try:
            sample.data = _read_location(source, config, max_image_bytes)
        except ImageRejected as err:
            sample.error = str(err)
        except (OSError, UserError, ValueError) as err:  # urllib errors are OSErrors
            sample.error = f"unreadable: {type(err).__name__}: {err}"
        yield sample


def iter_samples(location: str, config: StorageConfig | None = None, image_column: str = "image",
                 max_image_bytes: int | None = None) -> Iterator[Sample]:
    """Samples from any image location (see `detect_source`)."""
    kind = detect_source(location, config)
    if kind == "shards":
        return iter_shards(location, config, max_image_bytes)
    if kind == "list":
        return iter_image_list(location, config, image_column, max_image_bytes)
    if kind == "images":
        return iter_image_files(location, config, max_image_bytes)
    raise UserError(f"{location} is already an embedding table: pass the images it was made from")


def count_samples(location: str, config: StorageConfig | None = None) -> int | None:
    """How many samples a location holds when that is cheap to know (for the progress bar), else None."""
    kind = detect_source(location, config)
    if kind == "shards":
        return read_manifest(location, config).num_samples
    if kind == "list":
        return read_table(location, config).num_rows
    return len(list_image_files(location, config))


# ---------------------------------------------------------------------------------------------------------------------
# 2. Checking and decoding one image


def load_image(data: bytes, image_size: int, max_image_bytes: int, max_image_pixels: int) -> tuple[torch.Tensor, Image.Image]:
    """Bytes -> ((3, S, S) model input, the centre-cropped PIL image); raises `ImageRejected` with the reason.

    The header is read first: a file declaring more than `max_image_pixels` pixels is never decompressed.
    """
    if len(data) > max_image_bytes:
        raise ImageRejected(f"too_large: {len(data):,} bytes, above the limit of {max_image_bytes:,}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
        except Image.DecompressionBombError as err:
            raise ImageRejected(f"too_many_pixels: {err}") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            raise ImageRejected(f"not_an_image: {type(err).__name__}: {err}") from None
        if width * height > max_image_pixels:
            raise ImageRejected(f"too_many_pixels: declares {width}x{height} = {width * height:,} pixels, "
                                f"above the limit of {max_image_pixels:,}")
        try:
            image = center_crop(decode(data), image_size)
        except Exception as err:  # noqa: BLE001 - PIL raises many types for truncated or corrupt data
            raise ImageRejected(f"corrupt_image: {type(err).__name__}: {err}") from None
    return to_tensor(image), image


def _thumbnail(image: Image.Image, size: int) -> bytes:
    thumb = image.copy()
    thumb.thumbnail((size, size))
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------------------
# 3. The model, under autocast


@contextlib.contextmanager
def inference(model: CLIP, precision: PrecisionSetting = "auto") -> Iterator[torch.device]:
    """No autograd, on the model's device, under bf16 autocast when `precision` resolves to bf16 there."""
    device = next(model.parameters()).device
    with torch.inference_mode(), autocast(device, resolve_precision(precision, device)):
        yield device


def encode_images(model: CLIP, images: torch.Tensor, precision: PrecisionSetting = "auto") -> np.ndarray:
    """(B, 3, S, S) normalised pixels -> (B, D) float32 unit vectors (normalised in fp32, after the bf16 towers)."""
    with inference(model, precision) as device:
        features = model.encode_image(images.to(device, non_blocking=True))
    return F.normalize(features.float(), dim=-1).cpu().numpy()


def encode_texts(model: CLIP, tokenizer: Tokenizer, texts: list[str], batch_size: int = 256,
                 precision: PrecisionSetting = "auto") -> np.ndarray:
    """N captions -> (N, D) float32 unit vectors, `batch_size` at a time."""
    parts = [np.zeros((0, model.config.embed_dim), dtype=np.float32)]
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer.encode_batch(texts[start:start + batch_size])  # (B, context_length)
        with inference(model, precision) as device:
            features = model.encode_text(tokens.to(device))
        parts.append(F.normalize(features.float(), dim=-1).cpu().numpy())
    return np.concatenate(parts)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Samples -> table


def embed_samples(model: CLIP, samples: Iterable[Sample], batch_size: int = 128, precision: PrecisionSetting = "auto",
                  max_image_bytes: int = 20_000_000, max_image_pixels: int = 50_000_000, thumbnail_size: int = 64,
                  progress: bool = True, total: int | None = None, model_location: str = "") -> pa.Table:
    """Embed every sample; rejected ones become rows with an `error` and a null embedding (see the module docstring)."""
    image_size, dim = model.config.image_size, model.config.embed_dim
    rows: list[dict[str, Any]] = []
    vectors: list[np.ndarray | None] = []
    pending: list[tuple[int, torch.Tensor]] = []  # (row index, image tensor) waiting for the next forward pass

    def flush() -> None:
        if pending:
            batch = torch.stack([tensor for _, tensor in pending])  # (B, 3, S, S)
            for (index, _), vector in zip(pending, encode_images(model, batch, precision)):
                vectors[index] = vector
            pending.clear()

    with tqdm(samples, total=total, desc="embedding", unit="img", disable=not progress) as bar:
        for sample in bar:
            extra = {k: v for k, v in sample.metadata.items() if k not in RESERVED_COLUMNS}
            row = {"key": sample.key, "error": sample.error, "caption": sample.caption, "source": sample.source,
                   "thumbnail": None, **extra}
            rows.append(row)
            vectors.append(None)
            if row["error"] is None:
                try:
                    if sample.data is None:
                        raise ImageRejected("missing_image: the sample has no image file")
                    tensor, image = load_image(sample.data, image_size, max_image_bytes, max_image_pixels)
                    pending.append((len(rows) - 1, tensor))
                    if thumbnail_size:
                        row["thumbnail"] = _thumbnail(image, thumbnail_size)
                except ImageRejected as err:
                    row["error"] = str(err)
            if len(pending) >= batch_size:
                flush()
        flush()
    device = next(model.parameters()).device
    return _to_table(rows, vectors, dim, {"model": model_location, "kind": "image", "embed_dim": dim,
                                          "device": device.type, "precision": resolve_precision(precision, device)})


def _column(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types across samples: keep them as JSON text
        return pa.array([None if v is None else json.dumps(v, default=str) for v in values], type=pa.string())


def _to_table(rows: list[dict[str, Any]], vectors: list[np.ndarray | None], dim: int, info: dict[str, Any]) -> pa.Table:
    names: dict[str, None] = dict.fromkeys(["key", "error", "caption", "source", "thumbnail"])
    for row in rows:
        names.update(dict.fromkeys(row))
    flat = np.stack([v if v is not None else np.zeros(dim, np.float32) for v in vectors]) if vectors else np.zeros((0, dim), np.float32)
    mask = pa.array([v is None for v in vectors], type=pa.bool_())
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=pa.float32()), dim, mask=mask)
    columns = {"key": pa.array([r["key"] for r in rows], type=pa.string()), "embedding": embedding}
    columns["error"] = pa.array([r.get("error") for r in rows], type=pa.string())
    columns["caption"] = pa.array([r.get("caption") for r in rows], type=pa.string())
    columns["source"] = pa.array([r.get("source") for r in rows], type=pa.string())
    columns["thumbnail"] = pa.array([r.get("thumbnail") for r in rows], type=pa.binary())
    for name in names:
        if name not in columns:
            columns[name] = _column([r.get(name) for r in rows])
    return pa.table(columns).replace_schema_metadata({METADATA_KEY: json.dumps(info).encode()})


# ---------------------------------------------------------------------------------------------------------------------
# 5. Reading and writing tables


def table_info(table: pa.Table) -> dict[str, Any]:
    """The `clipforge.embeddings` metadata of an embedding table (model location, kind, embed_dim, precision)."""
    return json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))


def valid_rows(table: pa.Table) -> pa.Table:
    """The rows that have an embedding (no error)."""
    return table.filter(pc.is_null(table.column("error")))


def error_rows(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_valid(table.column("error")))


def error_counts(table: pa.Table) -> dict[str, int]:
    """Error rows by reason (`too_large`, `not_an_image`, ...: the text before the first colon)."""
    counts: dict[str, int] = {}
    for message in table.column("error").drop_null().to_pylist():
        reason = message.split(":")[0]
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def vectors(table: pa.Table) -> np.ndarray:
    """(N, D) float32 embeddings of a table whose rows all have one (use `valid_rows` first)."""
    column = table.column("embedding").combine_chunks()
    if column.null_count:
        raise ValueError("table has rows without an embedding; filter with valid_rows first")
    dim = column.type.list_size
    return np.array(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)  # writable copy


def write_table(table: pa.Table, location: str, config: StorageConfig | None = None) -> str:
    """Write a table as one parquet file at `location` (local or s3://)."""
    fs, path = storage.pyarrow_filesystem(location, config)
    with storage.storage_errors(location, config):
        if not storage.is_remote(location):
            fs.create_dir(posixpath.dirname(path), recursive=True)
        pq.write_table(table, path, filesystem=fs)
    return location


write_embeddings = write_table


def is_embedding_table(location: str, config: StorageConfig | None = None) -> bool:
    fs, path = storage.pyarrow_filesystem(location, config)
    with storage.storage_errors(location, config):
        try:
            schema = pq.read_schema(path, filesystem=fs)
        except (FileNotFoundError, pa.ArrowInvalid):
            return False
    return METADATA_KEY in (schema.metadata or {})


def read_embeddings(location: str, config: StorageConfig | None = None) -> pa.Table:
    """An embedding table written by `write_embeddings` (raises `UserError` if `location` is not one)."""
    fs, path = storage.pyarrow_filesystem(location, config)
    with storage.storage_errors(location, config):
        try:
            table = pq.read_table(path, filesystem=fs)
        except FileNotFoundError:
            raise UserError(f"embedding table {location} does not exist") from None
        except pa.ArrowInvalid as err:
            raise UserError(f"{location} is not a parquet file: {str(err).splitlines()[0]}") from None
    if METADATA_KEY not in (table.schema.metadata or {}) or "embedding" not in table.column_names:
        raise UserError(f"{location} is not an embedding table (write one with `clipforge embed`)")
    return table


def embed_location(model: CLIP, location: str, model_location: str = "", config: StorageConfig | None = None,
                   image_column: str = "image", batch_size: int = 128, precision: PrecisionSetting = "auto",
                   thumbnail_size: int = 64, max_image_bytes: int = 20_000_000, max_image_pixels: int = 50_000_000,
                   progress: bool = True) -> pa.Table:
    """The embedding table of any image location; an existing embedding table is read, not recomputed."""
    if detect_source(location, config) == "embeddings":
        return read_embeddings(location, config)
    samples = iter_samples(location, config, image_column, max_image_bytes)
    return embed_samples(model, samples, batch_size, precision, max_image_bytes, max_image_pixels, thumbnail_size,
                         progress, count_samples(location, config), model_location)


def embed(config: EmbedConfig, progress: bool = True) -> dict[str, Any]:
    """`clipforge embed`: embed `config.data` with `config.model` and write the table to `config.output`."""
    from training.checkpoint import load_model

    if not config.output.lower().endswith(".parquet"):
        raise UserError(f"--output must be a .parquet file path, got {config.output}")
    model, _ = load_model(config.model, config.storage, announce("embed", config.device, config.precision)[0])
    table = embed_location(model, config.data, config.model, config.storage, config.image_column, config.batch_size,
                           config.precision, config.thumbnail_size, config.max_image_bytes, config.max_image_pixels,
                           progress)
    write_embeddings(table, config.output, config.storage)
    errors = error_rows(table)
    return {"output": config.output, "rows": table.num_rows, "embedded": table.num_rows - errors.num_rows,
            "errors": errors.num_rows, "embed_dim": model.config.embed_dim}
