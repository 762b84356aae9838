"""Embedding: images and captions -> unit-length float32 vectors, computed under bf16 autocast and saved as parquet.

Everything downstream (zero-shot evaluation, retrieval, brand profiles, image search, the filter's CLIP score)
starts from this module, so a library is embedded once and reused. Images come from any location `pipeline.sources`
reads (an ingested dataset, an image list, a folder or s3:// prefix of images), or an embedding table this module
wrote before (reused as is).

Images from outside (uploads, generated images) are checked by `pipeline.images` before they are decoded: file size
and declared pixel count are capped, and a corrupt or non-image file becomes a row with an `error` (`<reason>:
<detail>`, with ingest's reason names: too_large, not_an_image, decompression_bomb, corrupt, truncated; and
missing_image, unreadable, corrupt_shard for a source that yields no bytes) and no embedding, never an exception, so
nothing else in the batch is lost. The table's columns: `key`, `embedding`
(fixed_size_list<float32>[D], null on error rows), `error`, `caption`, `source`, `thumbnail` (small JPEG, optional)
and every field of a shard's json or an image list's other columns. The model location and kind are stored in the
parquet metadata under `clipforge.embeddings`.
"""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field
from tqdm import tqdm

from pipeline import storage
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.failures import Fault
from pipeline.images import decode_checked
from pipeline.sources import Sample, count_samples, error_text, iter_samples
from pipeline.storage import StorageConfig
from training.device import DeviceSetting, PrecisionSetting, announce, autocast, resolve_precision
from training.model import CLIP
from training.tokenizer import Tokenizer
from training.transforms import center_crop, to_tensor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
METADATA_KEY = b"clipforge.embeddings"
# columns this module owns; a shard json field or list column of the same name is not copied over them
RESERVED_COLUMNS = ("key", "embedding", "error", "caption", "source", "thumbnail")


class EmbedConfig(Config):
    """One embedding run: which model, which images, where the table goes, how outside images are limited."""

    model: str
    """Checkpoint location (a folder or s3://...) written by `clipforge train` or `save_checkpoint`."""
    data: str
    """Images: an ingested dataset (has manifest.parquet), an image list (.parquet/.csv/.tsv/.jsonl/.json with an
    `image` column), or a folder / s3:// prefix of image files."""
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
    """Images declaring more than width x height pixels are rejected before decoding (error row
    `decompression_bomb`)."""
    storage: StorageConfig = StorageConfig()
    """How to reach object storage for s3:// locations."""


# ---------------------------------------------------------------------------------------------------------------------
# 2. Checking and decoding one image


def load_image(data: bytes, image_size: int, max_image_bytes: int, max_image_pixels: int) -> tuple[torch.Tensor, Image.Image]:
    """Bytes -> ((3, S, S) model input, the centre-cropped PIL image); raises `Fault` with the reason.

    The header is checked first (`pipeline.images.decode_checked`): a file declaring more than `max_image_pixels`
    pixels is never decompressed.
    """
    return model_input(decode_checked(data, max_image_bytes, max_image_pixels), image_size)


def model_input(image: Image.Image, image_size: int) -> tuple[torch.Tensor, Image.Image]:
    """A decoded image -> ((3, S, S) model input, the centre-cropped PIL image): the one crop of evaluation,
    embedding and filtering."""
    image = center_crop(image, image_size)
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


@contextlib.contextmanager
def capture_blocks(model: CLIP, blocks: tuple[int, ...]) -> Iterator[dict[int, torch.Tensor]]:
    """Read the outputs of the image tower's blocks `blocks` during a forward pass, through forward hooks.

    Pure: the hooks only keep a reference to each block's output (B, T, C) and return nothing, so the forward pass
    and its result are unchanged; they are removed when the block exits.
    """
    captured: dict[int, torch.Tensor] = {}
    handles = [model.visual.blocks[index].register_forward_hook(
        lambda module, inputs, output, index=index: captured.__setitem__(index, output)) for index in blocks]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def style_statistics(tokens: torch.Tensor) -> torch.Tensor:
    """(B, T, C) block output -> (B, 2C): per-channel mean and standard deviation over the patch tokens.

    The class token is left out; what is kept is how the early features are distributed over the image (line,
    palette, texture), not where anything is: the statistics of style transfer (Gatys; Huang and Belongie's AdaIN).
    """
    patches = tokens[:, 1:].float()  # (B, T - 1, C)
    return torch.cat([patches.mean(dim=1), patches.std(dim=1)], dim=1)


def encode_images_with_style(model: CLIP, images: torch.Tensor, blocks: tuple[int, ...],
                             precision: PrecisionSetting = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(B, 3, S, S) pixels -> ((B, D) unit embeddings, (B, 2C x len(blocks)) style statistics of those blocks)."""
    with inference(model, precision) as device, capture_blocks(model, blocks) as captured:
        features = model.encode_image(images.to(device, non_blocking=True))
    style = torch.cat([style_statistics(captured[index]) for index in blocks], dim=1)
    return F.normalize(features.float(), dim=-1).cpu().numpy(), style.cpu().numpy()


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
                  progress: bool = True, total: int | None = None, model_location: str = "",
                  style_blocks: tuple[int, ...] = ()) -> pa.Table:
    """Embed every sample; rejected ones become rows with an `error` and a null embedding (see the module docstring).

    With `style_blocks`, a `style` column holds the style statistics of those image-tower blocks (see
    `encode_images_with_style`), null on error rows.
    """
    image_size, dim = model.config.image_size, model.config.embed_dim
    rows: list[dict[str, Any]] = []
    vectors: list[np.ndarray | None] = []
    styles: list[np.ndarray | None] = []
    pending: list[tuple[int, torch.Tensor]] = []  # (row index, image tensor) waiting for the next forward pass

    def flush() -> None:
        if pending:
            batch = torch.stack([tensor for _, tensor in pending])  # (B, 3, S, S)
            if style_blocks:
                embedded, style = encode_images_with_style(model, batch, style_blocks, precision)
            else:
                embedded, style = encode_images(model, batch, precision), [None] * len(pending)
            for (index, _), vector, statistics in zip(pending, embedded, style):
                vectors[index], styles[index] = vector, statistics
            pending.clear()

    with tqdm(samples, total=total, desc="embedding", unit="img", disable=None if progress else True) as bar:  # None: terminals only
        for sample in bar:
            extra = {k: v for k, v in sample.metadata.items() if k not in RESERVED_COLUMNS}
            row = {"key": sample.key, "error": sample.error, "caption": sample.caption, "source": sample.source,
                   "thumbnail": None, **extra}
            rows.append(row)
            vectors.append(None)
            styles.append(None)
            if row["error"] is None and sample.data is None:
                row["error"] = "missing_image: the sample has no image file"
            elif row["error"] is None:
                try:
                    tensor, image = load_image(sample.data, image_size, max_image_bytes, max_image_pixels)
                    pending.append((len(rows) - 1, tensor))
                    if thumbnail_size:
                        row["thumbnail"] = _thumbnail(image, thumbnail_size)
                except Fault as err:
                    row["error"] = error_text(err)
            if len(pending) >= batch_size:
                flush()
        flush()
    device = next(model.parameters()).device
    table = _to_table(rows, vectors, dim, {"model": model_location, "kind": "image", "embed_dim": dim,
                                           "device": device.type, "precision": resolve_precision(precision, device),
                                           "style_blocks": list(style_blocks)})
    if style_blocks:
        width = 2 * model.config.vision_width * len(style_blocks)
        table = table.append_column("style", _fixed_size_list(styles, width))
    return table


def _fixed_size_list(vectors: list[np.ndarray | None], dim: int) -> pa.Array:
    """(N,) optional (dim,) vectors -> fixed_size_list<float32>[dim], null where a vector is None."""
    flat = np.stack([v if v is not None else np.zeros(dim, np.float32) for v in vectors]) if vectors else np.zeros((0, dim), np.float32)
    mask = pa.array([v is None for v in vectors], type=pa.bool_())
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.astype(np.float32).reshape(-1), type=pa.float32()), dim, mask=mask)


def _column(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types across samples: keep them as JSON text
        return pa.array([None if v is None else json.dumps(v, default=str) for v in values], type=pa.string())


def _to_table(rows: list[dict[str, Any]], vectors: list[np.ndarray | None], dim: int, info: dict[str, Any]) -> pa.Table:
    names: dict[str, None] = dict.fromkeys(["key", "error", "caption", "source", "thumbnail"])
    for row in rows:
        names.update(dict.fromkeys(row))
    columns = {"key": pa.array([r["key"] for r in rows], type=pa.string()), "embedding": _fixed_size_list(vectors, dim)}
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


def vectors(table: pa.Table, column_name: str = "embedding") -> np.ndarray:
    """(N, D) float32 embeddings (or another vector column) of a table whose rows all have one (`valid_rows` first)."""
    column = table.column(column_name).combine_chunks()
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
                   progress: bool = True, style_blocks: tuple[int, ...] = ()) -> pa.Table:
    """The embedding table of any image location; an existing embedding table is read, not recomputed."""
    if location.lower().endswith(".parquet") and is_embedding_table(location, config):
        table = read_embeddings(location, config)
        if style_blocks and table_info(table).get("style_blocks") != list(style_blocks):
            raise UserError(f"{location} holds no style statistics of blocks {list(style_blocks)}: pass the images")
        return table
    samples = iter_samples(location, config, image_column, max_image_bytes)
    return embed_samples(model, samples, batch_size, precision, max_image_bytes, max_image_pixels, thumbnail_size,
                         progress, count_samples(location, config), model_location, style_blocks)


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
