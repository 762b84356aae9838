"""The `filter` flow: an ingested dataset -> a filtered one (`pipeline.filter`, with a model through
`evaluation.filtering`), as a Prefect run.

The task is a thin wrapper over `run_filter`, which resumes pass by pass and shard by shard, so a retried or re-run
task reuses what it wrote. The UI shows the samples kept and removed by reason (table artifact); the HTML report
lies beside the filtered shards.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from evaluation.filtering import run_filter
from flows.ingest_flow import summary_rows
from flows.params import retry_options
from pipeline import storage
from pipeline.filter import FilterConfig
from pipeline.manifest import Manifest


@task(name="filter-dataset", **retry_options())
def filter_task(config: FilterConfig) -> Manifest:
    """Filter one dataset; returns the filtered dataset's manifest."""
    manifest = run_filter(config, progress=False)
    summary = manifest.summary
    get_run_logger().info("%s: kept %d of %d samples; removed: %s; report: %s", manifest.location,
                          summary.successes, summary.input_rows, summary.failures or "none",
                          storage.join(manifest.location, "report.html"))
    return manifest


@flow(name="filter", log_prints=True)
def filter_flow(config: FilterConfig) -> Manifest:
    """Filter an ingested dataset into a new one: rules, CLIP score, near-duplicates, decontamination."""
    manifest = filter_task(config)
    rows = [{"item": row["item"].replace("failed: ", "removed: ").replace("samples", "kept samples"),
             "value": row["value"]} for row in summary_rows(manifest) if row["item"] != "success rate"]
    create_table_artifact(rows, key="filter-summary", description=f"Filter of {config.data} into {manifest.location}")
    return manifest
