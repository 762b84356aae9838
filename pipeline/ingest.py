"""Ingest: a URL list of image-caption pairs -> clean, exactly counted WebDataset shards on storage.

The steps, in the order they run:
1. read the URL list (csv, tsv, parquet or jsonl; local or on object storage) and reject, with a reason, rows with
   no usable URL, captions outside the length limits and duplicate URLs;
2. write the surviving rows once to `<output>/_clipforge/input.parquet`; a re-run checks it holds the same input
   and settings, so a killed ingest resumes shard by shard (img2dataset skips shards whose stats file exists);
3. run img2dataset in a child process (`pipeline.download_worker`), which bounds every download by a wall-clock
   deadline and classifies every failure;
4. read every shard's per-row parquet and write `manifest.parquet` (exact sample count per shard, summary in its
   metadata) and `failures.parquet` (every rejected or failed row with its reason) beside the shards;
5. fail with one clear line if shards are missing or the success rate is below `min_success_rate`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import posixpath
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv
import pyarrow.json
import pyarrow.parquet as pq
from pydantic import Field
from tqdm import tqdm

from pipeline import cluster, storage
from pipeline.config import Config
from pipeline.failures import classify_error
from pipeline.errors import UserError
from pipeline.manifest import IngestSummary, Manifest, ShardInfo, tar_sample_offsets, write_manifest
from pipeline.storage import StorageConfig
from pipeline.tables import read_table

WORK_DIR = "_clipforge"
SETTINGS_NAME = "settings.json"  # the shard settings, readable (`image_settings`)
# columns img2dataset adds to each sample's json; an input column of the same name would be overwritten
_RESERVED = {"key", "status", "error_message", "width", "height", "original_width", "original_height", "exif", "sha256"}


class IngestConfig(Config):
    """Settings of one ingest run: where the URL list is, where shards go, how images are filtered and resized."""

    urls: str
    """URL list: a .csv, .tsv, .parquet or .jsonl file, local or s3://bucket/key, with a URL and a caption column."""

    output: str = ".clipforge/data/shards"
    """Where the WebDataset shards, manifest.parquet and failures.parquet are written: a folder or s3://bucket/prefix."""

    url_column: str = "url"
    """Name of the column holding image URLs."""

    caption_column: str = "caption"
    """Name of the column holding captions: text, or a list of captions per image (then the first is the caption
    evaluation reads, and the whole list is kept as the json field `captions`, which training samples per epoch)."""

    extra_columns: list[str] | None = None
    """Other input columns to keep in each sample's json. Empty: keep them all."""

    image_size: int = Field(64, gt=0)
    """Side of the stored images in pixels, after resizing."""

    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "center_crop"
    """How images are resized to image_size (img2dataset's modes): center_crop gives square images of that side."""

    image_format: Literal["jpg", "png", "webp"] = "jpg"
    """Encoding of the stored images."""

    encode_quality: int = Field(95, ge=1, le=100)
    """JPEG/WebP quality of the stored images."""

    min_image_size: int = Field(32, ge=0)
    """Images whose shorter side is below this many pixels are dropped (too_small)."""

    max_aspect_ratio: float = Field(3.0, gt=0)
    """Images longer than this many times their width (or wider than tall) are dropped (aspect_ratio)."""

    min_caption_length: int = Field(1, ge=0)
    """Captions shorter than this many characters are dropped (caption_too_short) before downloading."""

    max_caption_length: int = Field(1000, gt=0)
    """Captions longer than this many characters are dropped (caption_too_long) before downloading."""

    dedupe_urls: bool = True
    """Download each URL once: later rows with the same URL are dropped (duplicate_url)."""

    samples_per_shard: int = Field(1000, gt=0)
    """Input rows per shard. A shard is the unit of resumption; keep it the same when resuming."""

    processes: int | None = Field(None, gt=0)
    """Download processes. Empty: the number of CPUs."""

    threads: int = Field(16, gt=0)
    """Download threads per process."""

    timeout: float = Field(10.0, gt=0)
    """Seconds to wait for a connection or for the next bytes of an answer (per socket read)."""

    download_deadline: float = Field(30.0, gt=0)
    """Wall-clock seconds one image may take in all; bounds servers that send one byte a second (deadline_exceeded)."""

    max_image_bytes: int = Field(20_000_000, gt=0)
    """Largest download accepted, in bytes (too_large)."""

    max_image_pixels: int = Field(50_000_000, gt=0)
    """Largest width x height an image may declare; guards against decompression bombs (decompression_bomb)."""

    retries: int = Field(0, ge=0)
    """Extra attempts for a failed download."""

    disallowed_header_directives: list[str] = ["noai", "noimageai", "noindex", "noimageindex"]
    """X-Robots-Tag directives that opt an image out (robots_optout). Empty list: ignore the header."""

    user_agent_token: str | None = "clipforge"
    """Token added to the User-Agent and matched against `X-Robots-Tag: <token>: ...` directives."""

    min_success_rate: float = Field(0.5, ge=0, le=1)
    """The run fails when successes / input rows is below this; the shards written so far are kept."""

    max_duration: float | None = Field(None, gt=0)
    """Wall-clock seconds for the whole run; past it the run stops (finished shards are kept, re-run to resume)."""

    ray_address: str | None = None
    """Ray cluster address (e.g. 127.0.0.1:6379 or auto): distribute shards over the cluster instead of local processes."""

    storage: StorageConfig = StorageConfig()
    """How to reach object storage for s3:// locations."""


# ---------------------------------------------------------------------------------------------------------------------
# 1. reading and cleaning the URL list


def read_url_list(location: str, config: StorageConfig | None = None) -> pa.Table:
    """Read a URL list into a table (`pipeline.tables.read_table`); raises `UserError` naming it a URL list."""
    return read_table(location, config, "URL list")


def _rejected(table: pa.Table, mask: pa.Array, reason: str) -> pa.Table:
    picked = table.filter(mask)
    return pa.table({
        "row": picked["row"],
        "url": picked["url"],
        "reason": pa.array([reason] * picked.num_rows, pa.string()),
        "error_message": pa.array([reason.replace("_", " ")] * picked.num_rows, pa.string()),
    })


def prepare_input(source: pa.Table, config: IngestConfig, location: str = "URL list") -> tuple[pa.Table, pa.Table]:
    """Normalise columns and filter rows. Returns (rows to download, rejected rows with their reason)."""
    columns = source.column_names
    for role, name in (("URL", config.url_column), ("caption", config.caption_column)):
        if name not in columns:
            option = "--url-column" if role == "URL" else "--caption-column"
            raise UserError(f"{location} has no {role} column {name!r} (columns: {', '.join(columns)}); set {option}")
    if source.num_rows == 0:
        raise UserError(f"{location} has no rows")
    extras = [c for c in (config.extra_columns if config.extra_columns is not None else columns)
              if c not in (config.url_column, config.caption_column, "row") and c not in _RESERVED]
    missing = [c for c in extras if c not in columns]
    if missing:
        raise UserError(f"{location} has no column(s) {', '.join(missing)} named in extra_columns")

    def as_string(name: str) -> pa.Array:
        column = source[name]
        return column if pa.types.is_string(column.type) else pc.cast(column, pa.string(), safe=False)

    captions = source[config.caption_column]
    listed = {}
    if pa.types.is_list(captions.type) or pa.types.is_large_list(captions.type):  # several captions per image
        listed = {"captions": json_safe(captions)} if "captions" not in extras else {}
        captions = pa.array([c[0] if c else None for c in captions.to_pylist()], pa.string())
    else:
        captions = as_string(config.caption_column)
    table = pa.table({
        "url": pc.utf8_trim_whitespace(as_string(config.url_column)),
        "caption": pc.fill_null(captions, ""),
        "row": pa.array(range(source.num_rows), pa.int64()),
        **{name: json_safe(source[name]) for name in extras},
        **listed,
    })

    rejected: list[pa.Table] = []

    def drop(mask: pa.Array, reason: str) -> None:
        nonlocal table
        mask = pc.fill_null(mask, True)
        if pc.any(mask).as_py():
            rejected.append(_rejected(table, mask, reason))
            table = table.filter(pc.invert(mask))

    url = table["url"]
    drop(pc.or_(pc.is_null(url), pc.equal(pc.utf8_length(url), 0)), "missing_url")
    lowered = pc.utf8_lower(table["url"])
    drop(pc.invert(pc.or_(pc.starts_with(lowered, "http://"), pc.starts_with(lowered, "https://"))), "invalid_url")
    length = pc.utf8_length(pc.utf8_trim_whitespace(table["caption"]))
    drop(pc.less(length, config.min_caption_length), "caption_too_short")
    drop(pc.greater(pc.utf8_length(table["caption"]), config.max_caption_length), "caption_too_long")
    if config.dedupe_urls and table.num_rows:
        first = table.group_by("url", use_threads=False).aggregate([("row", "min")])["row_min"]
        drop(pc.invert(pc.is_in(table["row"], value_set=first)), "duplicate_url")
    empty = pa.table({"row": pa.array([], pa.int64()), "url": pa.array([], pa.string()),
                      "reason": pa.array([], pa.string()), "error_message": pa.array([], pa.string())})
    return table, pa.concat_tables([empty, *rejected])


def json_safe(column: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    """A column img2dataset's json writer can hold: scalars as they are, a list (several captions) as its JSON text
    (`["a", "b"]`, which the training loader reads back), anything else (nested, binary, timestamps) as text."""
    dtype = column.type
    if (pa.types.is_string(dtype) or pa.types.is_integer(dtype) or pa.types.is_floating(dtype)
            or pa.types.is_boolean(dtype)):
        return column
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in column.to_pylist()],
                        pa.string())
    return pc.cast(column, pa.string(), safe=False)


# ---------------------------------------------------------------------------------------------------------------------
# 2. the input, written once per output location


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _shard_settings(config: IngestConfig) -> dict:
    """Settings that shape the shards: changing one of them between a run and its resumption would mix shards."""
    keys = ("url_column", "caption_column", "extra_columns", "image_size", "resize_mode", "image_format",
            "encode_quality", "min_image_size", "max_aspect_ratio", "min_caption_length", "max_caption_length",
            "dedupe_urls", "samples_per_shard", "max_image_bytes", "max_image_pixels", "disallowed_header_directives")
    return {k: getattr(config, k) for k in keys}


IMAGE_SETTINGS = ("image_size", "resize_mode", "image_format", "encode_quality")  # what shapes a stored image


def image_settings(dataset: str, config: StorageConfig | None = None) -> dict | None:
    """How ingest stored the images of the dataset it wrote at `dataset` (`IMAGE_SETTINGS`); None where it does not
    say (written by an older ingest, or by the filter)."""
    fs, path = storage.filesystem(dataset, config)
    with storage.storage_errors(dataset, config):
        try:
            settings = json.loads(fs.cat_file(posixpath.join(path, WORK_DIR, SETTINGS_NAME)))
        except FileNotFoundError:
            return None
    return {k: settings[k] for k in IMAGE_SETTINGS}


def stored_like(settings: dict) -> Callable[[bytes], bytes]:
    """Image bytes -> what ingest with these `image_settings` stores for them (img2dataset's resizer), to compare outside
    images with a dataset's. Bytes the resizer refuses are returned as they are."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations (imported by img2dataset) phones home
    from img2dataset.resizer import Resizer

    resizer = Resizer(image_size=settings["image_size"], resize_mode=settings["resize_mode"],
                      resize_only_if_bigger=False, encode_format=settings["image_format"],
                      encode_quality=settings["encode_quality"])

    def store(data: bytes) -> bytes:
        stored, *_, error = resizer(io.BytesIO(data))
        return data if error or stored is None else stored

    return store


def write_input_once(output: str, prepared: pa.Table, rejected: pa.Table, config: IngestConfig) -> str:
    """Write the input (and its fingerprint) the first time; on a re-run check it is the same. Returns its location."""
    fs, path = storage.filesystem(output, config.storage)
    work = posixpath.join(path, WORK_DIR)
    data = _parquet_bytes(prepared)
    fingerprint = hashlib.sha256(data + json.dumps(_shard_settings(config), sort_keys=True).encode()).hexdigest()
    fingerprint_path = posixpath.join(work, "fingerprint")
    with storage.storage_errors(output, config.storage):
        if fs.exists(fingerprint_path):
            if fs.cat_file(fingerprint_path).decode() != fingerprint:
                raise UserError(
                    f"{output} already holds shards of a different URL list or different shard settings; "
                    "use a new --output, or delete it to start over"
                )
            return storage.join(output, WORK_DIR, "input.parquet")
        fs.makedirs(work, exist_ok=True)
        fs.pipe_file(posixpath.join(work, "input.parquet"), data)
        fs.pipe_file(posixpath.join(work, "rejected.parquet"), _parquet_bytes(rejected))
        fs.pipe_file(posixpath.join(work, SETTINGS_NAME), json.dumps(_shard_settings(config), indent=2).encode())
        fs.pipe_file(fingerprint_path, fingerprint.encode())  # last: its presence means the input is complete
    return storage.join(output, WORK_DIR, "input.parquet")


# ---------------------------------------------------------------------------------------------------------------------
# 3. img2dataset in a child process


def _shard_digits(num_shards: int) -> int:
    return max(5, len(str(max(num_shards - 1, 0))))


def _finished_shards(fs, path: str) -> set[int]:
    names = fs.glob(posixpath.join(path, "*_stats.json"))
    return {int(posixpath.basename(n).split("_")[0]) for n in names}


def _run_img2dataset(config: IngestConfig, output: str, input_location: str, columns: list[str], num_shards: int,
                     progress: bool) -> None:
    processes = config.processes or os.cpu_count() or 1
    spec = {
        "url_list": input_location,
        "output_folder": output,
        "input_format": "parquet",
        "url_col": "url",
        "caption_col": "caption",
        "save_additional_columns": [c for c in columns if c not in ("url", "caption")],
        "output_format": "webdataset",
        "image_size": config.image_size,
        "resize_mode": config.resize_mode,
        "encode_format": config.image_format,
        "encode_quality": config.encode_quality,
        "min_image_size": config.min_image_size,
        "max_aspect_ratio": config.max_aspect_ratio,
        "processes_count": processes,
        "thread_count": config.threads,
        "number_sample_per_shard": config.samples_per_shard,
        "oom_shard_count": _shard_digits(num_shards),
        "timeout": config.timeout,
        "retries": config.retries,
        "extract_exif": False,
        "enable_wandb": False,
        "incremental_mode": "incremental",
        "max_shard_retry": 1,
        "user_agent_token": config.user_agent_token,
        "disallowed_header_directives": config.disallowed_header_directives,
        "limits": {"deadline_seconds": config.download_deadline, "max_bytes": config.max_image_bytes,
                   "max_pixels": config.max_image_pixels},
        "ray_address": config.ray_address,
        # on a cluster: the code and the non-secret storage settings; keys travel inside the pickled downloader
        "runtime_env": cluster.runtime_env(config.storage, True, ("pipeline",)) if config.ray_address else None,
        "ship_credentials": bool(storage.explicit_credentials(config.storage)),
    }
    fs, path = storage.filesystem(output, config.storage)
    with tempfile.TemporaryDirectory(prefix="clipforge-ingest-") as scratch:
        spec_file = Path(scratch, "spec.json")
        spec_file.write_text(json.dumps(spec))
        log_file = Path(scratch, "img2dataset.log")
        env = {**os.environ, **storage.subprocess_env(config.storage), "NO_ALBUMENTATIONS_UPDATE": "1",
               "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
        started = time.monotonic()
        with open(log_file, "wb") as log:
            child = subprocess.Popen(
                [sys.executable, "-c", "from pipeline.download_worker import main; main()", str(spec_file)],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
            try:
                _watch(child, fs, path, num_shards, started, config.max_duration, progress)
            finally:
                if child.poll() is None:  # interrupted or over time: stop the whole process group
                    _kill_group(child)
        with storage.storage_errors(output, config.storage):
            fs.put_file(str(log_file), posixpath.join(path, WORK_DIR, "img2dataset.log"))
        if child.returncode != 0:
            tail = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()][-1:]
            raise UserError(
                f"img2dataset stopped with exit status {child.returncode} ({storage.redact(' '.join(tail))}); "
                f"finished shards are kept, re-run the same command to resume (log: {output}/{WORK_DIR}/img2dataset.log)"
            )


def _kill_group(child: subprocess.Popen) -> None:
    import signal

    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        try:
            child.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _watch(child, fs, path, num_shards, started, max_duration, progress) -> None:
    """Show shard progress until the child ends; stop it past `max_duration`."""
    done = len(_finished_shards(fs, path))
    with tqdm(total=num_shards, initial=done, unit="shard", desc="ingest", disable=None if progress else True,
              dynamic_ncols=True) as bar:
        while child.poll() is None:
            try:
                child.wait(timeout=1.0)  # returns as soon as the child ends
            except subprocess.TimeoutExpired:
                pass
            now = len(_finished_shards(fs, path))
            bar.update(now - bar.n)
            if max_duration is not None and time.monotonic() - started > max_duration:
                _kill_group(child)
                raise UserError(
                    f"ingest exceeded max_duration={max_duration:g} s with {now} of {num_shards} shards done; "
                    "finished shards are kept, re-run the same command to resume"
                )
        bar.update(len(_finished_shards(fs, path)) - bar.n)


# ---------------------------------------------------------------------------------------------------------------------
# 4. exact accounting


def _read_shard(fs, path: str, shard: int, digits: int) -> tuple[ShardInfo, pa.Table] | None:
    name = f"{shard:0{digits}d}"
    if not fs.exists(posixpath.join(path, f"{name}_stats.json")):
        return None
    with fs.open(posixpath.join(path, f"{name}.parquet"), "rb") as f:
        rows = pq.read_table(f, columns=["row", "url", "status", "error_message"])
    ok = pc.equal(rows["status"], "success")
    samples = pc.sum(ok).as_py() or 0
    failed = rows.filter(pc.invert(ok))
    reasons = [classify_error(m) for m in failed["error_message"].to_pylist()]
    failures = pa.table({
        "row": failed["row"], "url": failed["url"], "reason": pa.array(reasons, pa.string()),
        "error_message": pc.cast(failed["error_message"], pa.string()),
    })
    with fs.open(posixpath.join(path, f"{name}.tar"), "rb") as f:  # the sample index (see pipeline.manifest)
        offsets = tar_sample_offsets(f)
    info = ShardInfo(shard=shard, path=f"{name}.tar", samples=samples, attempted=rows.num_rows,
                     failed=rows.num_rows - samples, bytes=fs.size(posixpath.join(path, f"{name}.tar")),
                     offsets=offsets if len(offsets) == samples + 1 else None)
    return info, failures


def collect(output: str, num_shards: int, config: IngestConfig) -> tuple[list[ShardInfo], pa.Table, list[int]]:
    """Read every finished shard's per-row results. Returns (shards, failed rows, missing shard numbers)."""
    fs, path = storage.filesystem(output, config.storage)
    digits = _shard_digits(num_shards)
    with storage.storage_errors(output, config.storage), ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: _read_shard(fs, path, i, digits), range(num_shards)))
        rejected = pq.read_table(fs.open(posixpath.join(path, WORK_DIR, "rejected.parquet"), "rb"))
    shards = [r[0] for r in results if r is not None]
    missing = [i for i, r in enumerate(results) if r is None]
    failures = pa.concat_tables([rejected, *(r[1] for r in results if r is not None)]).sort_by("row")
    return shards, failures, missing


# ---------------------------------------------------------------------------------------------------------------------
# the job


def ingest(config: IngestConfig, progress: bool = True) -> Manifest:
    """Run the whole ingest described by `config`; returns the manifest. Re-running after a kill resumes it."""
    started = time.monotonic()
    output = storage.absolute(config.output)
    storage.check_writable(output, config.storage)

    source = read_url_list(config.urls, config.storage)
    prepared, rejected = prepare_input(source, config, location=f"URL list {config.urls}")
    input_location = write_input_once(output, prepared, rejected, config)
    num_shards = math.ceil(prepared.num_rows / config.samples_per_shard)

    fs, path = storage.filesystem(output, config.storage)
    with storage.storage_errors(output, config.storage):
        finished = _finished_shards(fs, path)
    if num_shards and len(finished & set(range(num_shards))) < num_shards:
        _run_img2dataset(config, output, input_location, prepared.column_names, num_shards, progress)

    shards, failures, missing = collect(output, num_shards, config)
    summary = IngestSummary(
        input_rows=source.num_rows,
        successes=sum(s.samples for s in shards),
        failures=dict(Counter(failures["reason"].to_pylist()).most_common()),
        bytes=sum(s.bytes for s in shards),
        shards=len(shards),
        seconds=round(time.monotonic() - started, 2),
    )
    fs.pipe_file(posixpath.join(path, "failures.parquet"), _parquet_bytes(failures))
    fs.pipe_file(posixpath.join(path, WORK_DIR, "summary.json"), json.dumps(summary.__dict__, indent=2).encode())
    write_manifest(output, shards, summary, config.storage)

    if missing:
        raise UserError(f"{len(missing)} of {num_shards} shards did not finish (first: {missing[0]}); "
                        "re-run the same command to retry them")
    if summary.success_rate < config.min_success_rate:
        top = ", ".join(f"{reason} {count}" for reason, count in list(summary.failures.items())[:3])
        raise UserError(
            f"only {summary.successes} of {summary.input_rows} rows succeeded ({summary.success_rate:.1%}), "
            f"below min_success_rate {config.min_success_rate:.0%}; top failures: {top}; "
            f"see {storage.join(output, 'failures.parquet')}"
        )
    return Manifest(location=output, shards=shards, summary=summary)
