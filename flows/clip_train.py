"""The `clip-train` flow: the whole pipeline, from two URL lists to a registered, evaluated model.

    ingest train list ─> filter ─┐
    ingest val list ─────────────┼─> train on Ray ─> evaluate on val ─> brand profile (train) + scores (val)
                                 │                                              ─> register (+ promote the first)

Each step is a sub-flow (its own run in the UI, with its logs and artifacts) over a thin task. Re-running with the
same parameters reuses finished work: ingest resumes shard by shard and training resumes or reuses its Ray Train run,
so only evaluation, scoring and registration run again. A failing step fails the run with its one-line message and
leaves everything produced before it in place. The run ends with a markdown report artifact: metrics, and where the
model, the datasets and the HTML reports are.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.brand_flow import brand_score_flow
from flows.evaluate_flow import evaluate_flow, headline_metrics, metric_rows
from flows.filter_flow import filter_train_set
from flows.ingest_flow import ingest_flow
from flows.params import (BrandSettings, ClipTrainRegistry, EvaluationSettings, FilterSettings, FlowStorage,
                          IngestParams, TrainSettings, demo_settings, resolve_storage, retry_options, settings_dump,
                          with_defaults)
from flows.train_flow import train_flow
from pipeline.errors import UserError
from pipeline.ingest import IngestConfig
from pipeline.registry import ModelVersion, promote, promoted, register_model
from pipeline.storage import StorageConfig, absolute, is_remote, join, write_atomically
from evaluation.brand import BrandBuildConfig, BrandScoreConfig
from evaluation.evaluate import EvaluateConfig
from training.train import TrainConfig


@task(name="register-model", **retry_options())
def register_task(registry: str, name: str, model: str, config: dict[str, Any], metrics: dict[str, Any],
                  dataset: list[str], parent: str | None, storage_config: StorageConfig | None = None,
                  mixing_weight: float | None = None) -> ModelVersion:
    """Copy the exported model into the next version of `name`, with its lineage."""
    version = register_model(registry, name, model, config=config, metrics=metrics, dataset=dataset, parent=parent,
                             storage_config=storage_config, mixing_weight=mixing_weight)
    get_run_logger().info("registered %s at %s (parent: %s)", version.ref, version.location, parent or "none")
    return version


@task(name="promote-model", **retry_options())
def promote_task(registry: str, name: str, version: int, reason: str,
                 storage_config: StorageConfig | None = None) -> None:
    """Point the model's promoted pointer at `version` (atomically: old or new, never half-written)."""
    promote(registry, name, version, reason, storage_config)
    get_run_logger().info("promoted %s@%d: %s", name, version, reason)


def location_link(location: str) -> str:
    """Markdown for a location: a clickable file:// link for local paths, the s3:// URI as code otherwise."""
    if is_remote(location):
        return f"`{location}`"
    path = absolute(location)
    return f"[`{path}`](file://{path})"


def metrics_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| metric | value | chance | majority class |", "|---|---|---|---|"]
    lines += [f"| {r['metric']} | {r['value']} | {r['chance']} | {r.get('majority', '')} |" for r in rows]
    return "\n".join(lines)


def _config_json(config: Any) -> dict[str, Any]:
    return config.model_dump(mode="json")  # secrets are masked in JSON mode


CATALOG_PORT = 18_765
"""Loopback port the first bundled catalog is served on (the next on the next port): fixed, so their URL lists (and
so the ingest fingerprints) are the same on every re-run and finished shards are reused."""
BUNDLED_CATALOGS = {"openmoji": ("openmoji",), "fluent": ("fluent",), "both": ("openmoji", "fluent")}


@task(name="render-bundled-catalog", **retry_options(retries=0))
def catalog_task(catalog_dir: str, source: str, image_size: int) -> str:
    """Render one bundled catalog, OpenMoji or Fluent Emoji Flat (a no-op when it is already complete)."""
    from pipeline.catalog import build_fluent_catalog, build_openmoji_catalog

    build = build_openmoji_catalog if source == "openmoji" else build_fluent_catalog
    return str(build(catalog_dir, image_size=image_size))


class PhaseTimes(dict):
    """Wall-clock seconds of each phase of a run, in order: `with phases("train"): ...`."""

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            self[name] = round(time.monotonic() - start, 1)

    def line(self) -> str:
        return ", ".join(f"{name} {seconds:.0f} s" for name, seconds in self.items())


@contextlib.contextmanager
def bundled_catalog(ingest: Any, phases: PhaseTimes) -> Iterator[Any]:
    """While the block runs, the bundled catalog(s) are served over loopback HTTP; yields `ingest` with URL lists that
    hold every chosen catalog's split (`<catalog_dir>/lists/<catalog>/{train,val}.parquet`)."""
    from pipeline.catalog import serve_catalogs

    sources = BUNDLED_CATALOGS[ingest.catalog]
    root = Path(ingest.catalog_dir)
    with phases("catalog"):
        catalogs = {source: Path(catalog_task(str(root / source), source, ingest.image_size)) for source in sources}
    with serve_catalogs(catalogs, root / "lists" / ingest.catalog, first_port=CATALOG_PORT) as url_lists:
        urls = {f"{split}_urls": str(path) for split, path in url_lists.items()}
        get_run_logger().info("bundled catalog(s) %s served over loopback for the run", ", ".join(sources))
        yield ingest.model_copy(update=urls)


@flow(name="clip-train", log_prints=True)
def clip_train(
    ingest: IngestParams = IngestParams(),  # type: ignore[valid-type]
    train: TrainSettings = TrainSettings(),  # type: ignore[valid-type]
    filtering: FilterSettings = FilterSettings(),  # type: ignore[valid-type]
    evaluation: EvaluationSettings = EvaluationSettings(),  # type: ignore[valid-type]
    brand: BrandSettings = BrandSettings(),
    registry: ClipTrainRegistry = ClipTrainRegistry(),
    storage: FlowStorage = FlowStorage(),
) -> ModelVersion:
    """Ingest the train and val URL lists, filter the train set, train on Ray, evaluate on val, score brand alignment, register the model.

    With no URL lists, the main job on the embedded defaults (what `clipforge demo` runs): the bundled catalog(s)
    (`ingest.catalog`) served over loopback, with the demo's settings for every field not given. Every step reaches
    object storage (any `s3://` location) through `storage`; fields left empty come from the AWS variables and
    profiles of the process that runs the step, keys from `storage.credentials_block` when named."""
    logger, phases, storage = get_run_logger(), PhaseTimes(), resolve_storage(storage)
    use_catalog = ingest.train_urls is None
    if use_catalog != (ingest.val_urls is None):
        raise UserError("give both ingest.train_urls and ingest.val_urls, or neither (the bundled catalog)")
    if use_catalog:
        defaults = demo_settings(ingest.catalog)
        ingest, train, evaluation, registry = (with_defaults(settings, defaults[name]) for settings, name in
                                               ((ingest, "ingest"), (train, "train"), (evaluation, "evaluation"),
                                                (registry, "registry")))
    with bundled_catalog(ingest, phases) if use_catalog else contextlib.nullcontext(ingest) as ingest, phases("ingest"):
        ingest_settings = settings_dump(ingest, exclude=("train_urls", "val_urls", "output", "catalog_dir",
                                                         "catalog"))
        datasets = {
            split: ingest_flow(IngestConfig(urls=urls, output=join(ingest.output, split), storage=storage,
                                            **ingest_settings))
            for split, urls in (("train", ingest.train_urls), ("val", ingest.val_urls))
        }
    filtered = None
    if filtering.enabled:
        with phases("filter"):
            datasets["train"] = filtered = filter_train_set(filtering, datasets["train"].location,
                                                            join(ingest.output, "train-filtered"),
                                                            [datasets["val"].location], storage)
    train_config = TrainConfig(data=datasets["train"].location, storage=storage, **settings_dump(train))
    with phases("train"):
        result = train_flow(train_config)

    run_output = absolute(train_config.output)
    eval_config = EvaluateConfig(model=result.model, data=datasets["val"].location,
                                 output=join(run_output, "eval"), storage=storage, **settings_dump(evaluation))
    with phases("evaluate"):
        metrics = evaluate_flow(eval_config)

    brand_summary = None
    if brand.enabled:
        profile = join(run_output, "brand", "profile")
        with phases("brand"):
            brand_summary = brand_score_flow(
                score=BrandScoreConfig(profile=profile, images=brand.images or datasets["val"].location,
                                       output=join(run_output, "brand", "scores"), model=result.model,
                                       storage=storage),
                build=BrandBuildConfig(model=result.model, images=datasets["train"].location, output=profile,
                                       references=brand.references,
                                       target_false_accept_rate=brand.target_false_accept_rate,
                                       holdout_fraction=brand.holdout_fraction, min_images=brand.min_images,
                                       storage=storage),
            )

    with phases("register"):
        version = register_task(
            registry.location, registry.model_name, result.model,
            config={"ingest": _config_json(ingest), "filter": _config_json(filtering), "train": _config_json(train_config),
                    "evaluation": _config_json(eval_config), "runtime": result.runtime},
            metrics={**headline_metrics(metrics), **{f"train.{k}": v for k, v in result.metrics.items()
                                                     if isinstance(v, int | float) and not isinstance(v, bool)}},
            dataset=[d.location for d in datasets.values()], parent=None, storage_config=storage)
    current = promoted(registry.location, registry.model_name, storage)
    if registry.promote == "always" or (registry.promote == "first" and current is None):
        reason = "first version of the model" if current is None else "clip-train with promote=always"
        promote_task(registry.location, registry.model_name, version.version, reason, storage)
        promotion_note = f"promoted {version.ref}: {reason}"
    else:
        promotion_note = (f"not promoted (promote={registry.promote}); the promoted version stays "
                          f"{current.ref if current else 'none'}")
    logger.info(promotion_note)

    logger.info("phase times: %s", phases.line())
    write_atomically(join(run_output, "phases.json"), json.dumps(phases).encode(), storage)
    rows = metric_rows(metrics)
    create_table_artifact(rows, key="clip-train-metrics", description=f"Evaluation of {version.ref} on the val set")
    create_markdown_artifact(
        report_markdown(version, result, datasets, filtered, eval_config, rows, brand_summary, run_output,
                        promotion_note),
        key="clip-train-report", description=f"clip-train: {version.ref}")
    return version


def filter_line(filtered: Any) -> str:
    """The report's line on the filter step: where its report is, what it kept and removed."""
    summary = filtered.summary
    removed = ", ".join(f"{reason} {count}" for reason, count in summary.failures.items()) or "none"
    return (f"- filter report: {location_link(join(filtered.location, 'report.html'))} "
            f"(kept {summary.successes} of {summary.input_rows}; removed: {removed})")


def report_markdown(version: ModelVersion, result: Any, datasets: dict[str, Any], filtered: Any | None,
                    eval_config: EvaluateConfig, rows: list[dict[str, Any]], brand_summary: dict[str, Any] | None,
                    run_output: str, promotion_note: str) -> str:
    lines = [f"# clip-train: {version.ref}", "", promotion_note, "", "## Evaluation on the validation set", "",
             metrics_markdown(rows), "",
             f"Training: {result.metrics.get('steps')} steps, final loss {result.metrics.get('loss', float('nan')):.4f} "
             f"(run `{result.run_name}`).", "", "## Where things are", "",
             f"- registered model: {location_link(version.location)}",
             f"- exported checkpoint: {location_link(result.model)}",
             f"- training run (checkpoints, metrics.jsonl, tensorboard): {location_link(run_output)}"]
    for split, manifest in datasets.items():
        lines.append(f"- {split} dataset manifest: {location_link(join(manifest.location, 'manifest.parquet'))}"
                     f" ({manifest.summary.successes} samples, {manifest.summary.success_rate:.1%} of the list)")
    if filtered is not None:
        lines.append(filter_line(filtered))
    lines.append(f"- evaluation report: {location_link(join(eval_config.output, 'report.html'))}")
    if brand_summary is not None:
        lines += [f"- brand scores report: {location_link(join(run_output, 'brand', 'scores', 'report.html'))}",
                  "", "## Brand scoring", "",
                  f"{brand_summary['on-brand']} on-brand, {brand_summary['off-brand']} off-brand, "
                  f"{brand_summary['error']} unreadable of {brand_summary['images']} "
                  f"(threshold: probability {brand_summary['threshold']:.3f}; the profile's held-out ROC AUC "
                  f"{brand_summary['profile_auc']:.3f}).", *([f"**WARNING: {brand_summary['profile_warning']}**"]
                                                            if brand_summary.get("profile_warning") else [])]
    return "\n".join(lines) + "\n"
