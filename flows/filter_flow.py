"""The `filter` flow: an ingested dataset -> a filtered one (`pipeline.filter`, with a model through
`evaluation.filtering`), as a Prefect run.

The task is a thin wrapper over `run_filter`, which resumes pass by pass and shard by shard, so a retried or re-run
task reuses what it wrote. The UI shows the samples kept and removed by reason (table artifact); the HTML report
lies beside the filtered shards. `filter_train_set` is the filter step of `clip-train` and `nightly-finetune`.
"""

from __future__ import annotations

from collections.abc import Iterable

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from evaluation.embed import is_embedding_table
from evaluation.filtering import run_filter
from flows.ingest_flow import summary_rows
from flows.params import FilterSettings, retry_options, settings_dump
from pipeline import storage
from pipeline.errors import UserError
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


def filter_train_set(settings: FilterSettings, data: str, output: str, evaluation_sets: Iterable[str],
                     storage_config: storage.StorageConfig = storage.StorageConfig()) -> Manifest:
    """The filter step of a training flow: `settings` applied to the ingested `data`, the flow's evaluation sets
    among those decontaminated against (an embedding table holds no images to compare, so it is left out). A filter
    that keeps nothing is a `UserError`: there is nothing to train on."""
    references = list(settings.decontaminate)
    for location in evaluation_sets:
        if location.lower().endswith(".parquet") and is_embedding_table(location, storage_config):
            get_run_logger().warning("not decontaminating against %s: an embedding table holds no images", location)
        else:
            references.append(location)
    manifest = filter_flow(FilterConfig(data=data, output=output, decontaminate=tuple(dict.fromkeys(references)),
                                        storage=storage_config,
                                        **settings_dump(settings, exclude=("enabled", "decontaminate"))))
    if manifest.summary.successes == 0:
        raise UserError(f"the filter kept none of the {manifest.summary.input_rows} samples of {data} (removed: "
                        f"{manifest.summary.failures or 'none'}; report: {storage.join(output, 'report.html')}): "
                        f"loosen the `filtering` rules or set filtering.enabled to false")
    return manifest
