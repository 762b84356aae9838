"""The one reader of image sources: every place images come from, as a stream of `Sample`s (key, bytes, caption).

Four kinds of location, told apart by `detect_source`:

- a dataset written by `clipforge ingest` (a folder or `s3://` prefix holding `manifest.parquet` and tar shards,
  read through `pipeline.shards`);
- an image list: a `.parquet` / `.csv` / `.tsv` / `.jsonl` / `.json` file (read by `pipeline.tables`) with an `image`
  column (a path relative to the list, an absolute path, `s3://...` or `http(s)://...`) and any label columns;
- a folder or `s3://` prefix of image files (found recursively by extension).

Nothing is decoded here. A source that yields no bytes becomes a sample with an `error` (`missing_image`,
`unreadable`, `corrupt_shard`, or `too_large` for a file above the size cap, which is never read), never an
exception, so one bad file loses nothing else. Embedding, brand profiles and the filter's decontamination read images
through this module; the bytes themselves are checked by `pipeline.images`.
"""

from __future__ import annotations

import json
import os
import posixpath
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline import storage
from pipeline.errors import UserError
from pipeline.failures import Fault
from pipeline.manifest import MANIFEST_NAME, read_manifest
from pipeline.shards import iter_dataset, sample_image
from pipeline.storage import StorageConfig
from pipeline.tables import TABLE_EXTENSIONS, read_table

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass
class Sample:
    """One image on its way to the model; `error` set means it could not even be read."""

    key: str
    source: str
    data: bytes | None
    caption: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def error_text(fault: Fault) -> str:
    """An error row's text: the reason name, then what was wrong (`too_large: 3,000,000 bytes, above ...`)."""
    return f"{fault.kind}: {fault.detail}"


# ---------------------------------------------------------------------------------------------------------------------
# 1. Where images come from


def detect_source(location: str, config: StorageConfig | None = None) -> Literal["list", "shards", "images"]:
    """Which kind of location this is (see the module docstring); raises `UserError` if it does not exist."""
    lower = location.lower()
    if lower.removesuffix(".gz").endswith(TABLE_EXTENSIONS):
        return "list"
    fs, path = storage.filesystem(location, config)
    with storage.storage_errors(location, config):
        if fs.exists(posixpath.join(path, MANIFEST_NAME)):
            return "shards"
        if not fs.exists(path):
            raise UserError(f"{location} does not exist")
    return "images"


def iter_shards(location: str, config: StorageConfig | None = None, max_image_bytes: int | None = None) -> Iterator[Sample]:
    """Samples of a dataset written by `clipforge ingest`, shard by shard; a corrupt shard becomes one error row."""
    broken: list[Sample] = []  # filled by iter_dataset's callback, emptied as soon as control comes back here

    def note(url: str, err: Exception) -> None:
        broken.append(Sample(key=url, source=url, data=None, error=f"corrupt_shard: {type(err).__name__}: {err}"))

    for raw in iter_dataset(location, config, on_error=note):
        yield from broken
        broken.clear()
        key = raw["__key__"]
        sample = Sample(key=key, source=f"{raw['__url__']}#{key}", data=sample_image(raw))
        if "txt" in raw:
            sample.caption = raw["txt"].decode("utf-8", errors="replace")
        try:
            sample.metadata = json.loads(raw["json"]) if "json" in raw else {}
        except json.JSONDecodeError as err:
            sample.error = f"corrupt_shard: {key}.json: {err}"
        if max_image_bytes and sample.data is not None and len(sample.data) > max_image_bytes:
            sample.error = f"too_large: {len(sample.data):,} bytes, above the limit of {max_image_bytes:,}"
            sample.data = None
        yield sample
    yield from broken


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
        raise Fault("too_large", f"more than the limit of {max_bytes:,} bytes")
    return data


def iter_image_list(location: str, config: StorageConfig | None = None, image_column: str = "image",
                    max_image_bytes: int | None = None) -> Iterator[Sample]:
    """Samples of an image list; relative image paths are read beside the list; other columns become metadata."""
    table = read_table(location, config, "image list")
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
        except Fault as err:
            sample.error = error_text(err)
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
    return iter_image_files(location, config, max_image_bytes)


def count_samples(location: str, config: StorageConfig | None = None) -> int | None:
    """How many samples a location holds when that is cheap to know (for the progress bar), else None."""
    kind = detect_source(location, config)
    if kind == "shards":
        return read_manifest(location, config).num_samples
    if kind == "list":
        return read_table(location, config, "image list").num_rows
    return len(list_image_files(location, config))
