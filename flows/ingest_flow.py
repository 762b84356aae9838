"""The `ingest` flow: one URL list -> WebDataset shards, manifest and failures (`pipeline.ingest`), as a Prefect run.

The task is a thin wrapper over `ingest()`, which runs img2dataset in a child process (so a task thread is fine) and
resumes shard by shard: a retried or re-run task reuses the shards already written. The UI shows the shards as they
finish (progress artifact) and the run's summary (table artifact).
"""

from __future__ import annotations

import math
import posixpath

import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from flows.params import count_matches, progress_artifact, retry_options
from pipeline import storage
from pipeline.ingest import WORK_DIR, IngestConfig, ingest
from pipeline.manifest import Manifest


def _shard_progress(config: IngestConfig):
    """Share of shards finished: stats files written so far / shards planned from the prepared input."""
    output = storage.absolute(config.output)
    planned: list[int] = []

    def measure() -> float | None:
        if not planned:
            fs, path = storage.filesystem(output, config.storage)
            input_path = posixpath.join(path, WORK_DIR, "input.parquet")
            if not fs.exists(posixpath.join(path, WORK_DIR, "fingerprint")):
                return None  # the input is still being prepared
            with fs.open(input_path, "rb") as file:
                planned.append(max(1, math.ceil(pq.read_metadata(file).num_rows / config.samples_per_shard)))
        return count_matches(output, "*_stats.json", config.storage) / planned[0]

    return measure


@task(name="ingest-url-list", **retry_options())
def ingest_task(config: IngestConfig) -> Manifest:
    """Download, filter and shard one URL list; returns its manifest."""
    logger = get_run_logger()
    logger.info("ingesting %s -> %s", config.urls, storage.absolute(config.output))
    with progress_artifact("ingest-progress", f"shards of {config.urls} written", _shard_progress(config)):
        manifest = ingest(config, progress=False)
    summary = manifest.summary
    logger.info("%s: %d of %d rows ingested into %d shards (%.1f%%) in %.1f s; failures: %s", manifest.location,
                summary.successes, summary.input_rows, summary.shards, 100 * summary.success_rate, summary.seconds,
                summary.failures or "none")
    return manifest


def summary_rows(manifest: Manifest) -> list[dict[str, object]]:
    """The manifest's summary as table rows: counts first, then failures by reason."""
    summary = manifest.summary
    rows: list[dict[str, object]] = [
        {"item": "location", "value": manifest.location},
        {"item": "input rows", "value": summary.input_rows},
        {"item": "samples", "value": summary.successes},
        {"item": "success rate", "value": f"{summary.success_rate:.1%}"},
        {"item": "shards", "value": summary.shards},
        {"item": "bytes", "value": summary.bytes},
    ]
    rows += [{"item": f"failed: {reason}", "value": count} for reason, count in summary.failures.items()]
    return rows


@flow(name="ingest", log_prints=True)
def ingest_flow(config: IngestConfig) -> Manifest:
    """Ingest one URL list into WebDataset shards; re-running resumes or reuses the shards already written."""
    manifest = ingest_task(config)
    create_table_artifact(summary_rows(manifest), key="ingest-summary",
                          description=f"Ingest of {config.urls} into {manifest.location}")
    return manifest
