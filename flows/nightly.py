"""The `nightly-finetune` flow: fine-tune the promoted model on URL lists that arrived since the last run, and
promote the result only if it is not worse on a fixed validation set.

    new lists under `incoming` ─> combine ─> ingest ─> filter ─> fine-tune from the promoted model ─> evaluate candidate
    and promoted model on the same validation set ─> register the candidate ─> promote it if
    candidate >= promoted - tolerance ─> record the lists as processed

A small state file (`NightlyState`: the processed list names and the last run's time) remembers what was done. It is
written only at the end of a successful run, atomically (`storage.write_atomically`), so a killed or failed run
leaves the old state and the next run retries the same lists, reusing their ingest and training. With no new list
the run ends at once in a Completed state whose message says "nothing to do". The new data is filtered as clip-train
filters its training set (`filtering`, basic rules by default), and decontaminated against `validation` and
`domain_validation`, so a copy of a validation image that arrives in a list is never trained on.

With `domain_validation` (the new catalog's validation set) the candidate is chosen by WiSE-FT: the promoted and the
fine-tuned weights are mixed over a grid, each mix is evaluated on the domain set and on `validation` (the guardrail),
and the best mix within the guardrail's tolerance is registered (its mixing weight in the lineage) and promoted only
if it beats the promoted model on the domain; the report plots both metrics over the grid.

The candidate is registered even when it is not promoted (its lineage names its parent), so a refused fine-tune
stays inspectable; the run's markdown report says which model is promoted and why.
"""

from __future__ import annotations

import base64
import hashlib
import io
import posixpath
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Completed
from pydantic import BaseModel, Field

from flows.clip_train import filter_line, location_link, metrics_markdown, promote_task, register_task
from flows.evaluate_flow import evaluate_flow, headline_metrics, metric_rows, metric_value
from flows.filter_flow import filter_train_set
from flows.ingest_flow import ingest_flow
from flows.params import (EvaluationSettings, FilterSettings, FinetuneSettings, FlowStorage, IngestSettings,
                          RegistrySettings, resolve_storage, retry_options, settings_dump)
from flows.train_flow import train_flow
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.ingest import IngestConfig, json_safe, read_url_list
from pipeline.registry import ModelVersion, promoted
from pipeline.storage import StorageConfig, absolute, filesystem, join, storage_errors, write_atomically
from evaluation.evaluate import EvaluateConfig
from training.train import TrainConfig
from training.wiseft import GridPoint, WiseChoice, choose_mixing_weight, grid_plot, write_grid

URL_LIST_SUFFIXES = (".parquet", ".csv", ".jsonl")


class NightlyParams(Config):
    """Where new URL lists arrive, the fixed validation set, and the rule that decides a promotion."""

    incoming: str = ".clipforge/incoming"
    """Folder or s3:// prefix where new URL lists (*.parquet, *.csv, *.jsonl) arrive; sub-folders are searched,
    names starting with `.` or `_` are skipped."""

    validation: str = ".clipforge/data/openmoji-val"
    """Fixed validation set (an ingested dataset, an image list or an embedding table): both the candidate and the
    promoted model are evaluated on it."""

    data_root: str = ".clipforge/data/nightly"
    """Where each night's new lists are combined and ingested: <data_root>/<batch>/ (batch: a hash of the names)."""

    metric: str = "retrieval.text_to_image.R@5"
    """Evaluation metric that decides the promotion, as a dotted path into metrics.json, e.g. zero_shot.acc@1 (needs
    evaluation.label_field) or retrieval.text_to_image.R@5."""

    tolerance: float = Field(0.01, ge=-1, le=1)
    """The candidate is promoted when its metric >= the promoted model's metric - tolerance. Negative: it must
    improve by at least that much."""

    state: str | None = None
    """State file (processed list names, last run time): a local path or s3:// key. Empty:
    <registry.location>/<registry.model_name>/nightly-state.json."""

    domain_validation: str | None = None
    """The new catalog's validation set. Set: WiSE-FT. The promoted and the fine-tuned weights are mixed over
    `mixing_weights`, each mix is evaluated here (domain_metric) and on `validation` (the guardrail, `metric`); the
    best mix whose guardrail falls by no more than `tolerance` is registered, and promoted only if it beats the
    promoted model on the domain. Empty: the fine-tuned model is judged on `validation` alone."""

    domain_metric: str | None = None
    """Metric on domain_validation, a dotted path into metrics.json. Empty: the same as `metric`."""

    mixing_weights: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0]
    """WiSE-FT grid of mixing weights (0: the promoted model, 1: the fine-tuned one; 0 is always included)."""


class NightlyState(BaseModel):
    """What the nightly flow has done: the URL lists it processed and when it last succeeded."""

    processed: list[str] = []
    """Names of the processed URL lists, relative to `incoming`."""

    last_run: datetime | None = None
    """When the last successful run ended (UTC)."""

    last_version: int | None = None
    """The version the last fine-tune registered."""


# ---------------------------------------------------------------------------------------------------------------------
# the state file


def read_state(location: str, config: StorageConfig | None = None) -> NightlyState:
    fs, path = filesystem(location, config)
    with storage_errors(location, config):
        try:
            data = fs.cat_file(path)
        except FileNotFoundError:
            return NightlyState()
    return NightlyState.model_validate_json(data)


def write_state(location: str, state: NightlyState, config: StorageConfig | None = None) -> None:
    write_atomically(location, state.model_dump_json(indent=2).encode(), config)


# ---------------------------------------------------------------------------------------------------------------------
# finding and combining new lists


def list_url_lists(incoming: str, config: StorageConfig | None = None) -> list[str]:
    """Names (relative to `incoming`, sorted) of every URL list under it; [] when it does not exist."""
    fs, root = filesystem(incoming, config)
    root = root.rstrip("/")
    with storage_errors(incoming, config):
        try:
            found = fs.find(root)
        except FileNotFoundError:
            return []
    names = []
    for path in found:
        name = posixpath.relpath(path, root)
        if name.endswith(URL_LIST_SUFFIXES) and not any(p.startswith((".", "_")) for p in name.split("/")):
            names.append(name)
    return sorted(names)


def batch_name(names: list[str]) -> str:
    """A stable name for a set of lists: the same new lists give the same ingest and training folders on a re-run."""
    return "batch-" + hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:12]


def combine_url_lists(locations: list[str], output: str, config: StorageConfig | None = None) -> str:
    """Concatenate URL lists (columns unified, missing ones null) into one parquet at `output`; returns `output`.

    Columns are stored as ingest keeps them (`json_safe`): a caption list in a parquet list and the same list as JSON
    text in a csv line up."""
    tables = [pa.table({name: json_safe(table[name]) for name in table.column_names})
              for table in (read_url_list(location, config) for location in locations)]
    try:
        combined = pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowInvalid as err:
        raise UserError(f"the new URL lists have incompatible columns: {err}") from None
    buffer = io.BytesIO()
    pq.write_table(combined, buffer)
    write_atomically(output, buffer.getvalue(), config)
    return output


# ---------------------------------------------------------------------------------------------------------------------
# the promotion rule


def promotion_decision(metric: str, candidate: float | None, baseline: float | None,
                       tolerance: float) -> tuple[bool, str]:
    """(promote?, why in one sentence): promote when candidate >= baseline - tolerance."""
    if candidate is None:
        raise UserError(f"the evaluation has no metric {metric!r}: set `metric` to a dotted path in metrics.json, "
                        "e.g. retrieval.text_to_image.R@5, or zero_shot.acc@1 with evaluation.label_field set")
    if baseline is None:
        return True, f"{metric} {candidate:.4f}; the promoted model has no value to compare with"
    floor = baseline - tolerance
    if candidate >= floor:
        return True, (f"{metric} {candidate:.4f} >= {floor:.4f} (promoted model {baseline:.4f} - tolerance "
                      f"{tolerance:g})")
    return False, (f"{metric} {candidate:.4f} < {floor:.4f} (promoted model {baseline:.4f} - tolerance {tolerance:g}): "
                   "keeping the promoted model")


# ---------------------------------------------------------------------------------------------------------------------
# tasks


@task(name="find-new-url-lists", **retry_options())
def find_new_lists(incoming: str, state: NightlyState, config: StorageConfig | None = None) -> list[str]:
    names = [n for n in list_url_lists(incoming, config) if n not in set(state.processed)]
    get_run_logger().info("%d new URL list(s) under %s: %s", len(names), incoming, ", ".join(names) or "none")
    return names


@task(name="read-nightly-state", **retry_options())
def read_state_task(location: str, config: StorageConfig | None = None) -> NightlyState:
    return read_state(location, config)


@task(name="write-nightly-state", **retry_options())
def write_state_task(location: str, state: NightlyState, config: StorageConfig | None = None) -> None:
    write_state(location, state, config)
    get_run_logger().info("state saved to %s: %d lists processed", location, len(state.processed))


@task(name="combine-url-lists", **retry_options())
def combine_task(locations: list[str], output: str, config: StorageConfig | None = None) -> str:
    return combine_url_lists(locations, output, config)


@task(name="find-promoted-model", **retry_options())
def promoted_task(registry: str, name: str, config: StorageConfig | None = None) -> ModelVersion:
    version = promoted(registry, name, config)
    if version is None:
        raise UserError(f"model {name} in {registry} has no promoted version to fine-tune: run clip-train first")
    get_run_logger().info("fine-tuning from %s (%s)", version.ref, version.location)
    return version


# ---------------------------------------------------------------------------------------------------------------------
# the flow


@flow(name="nightly-finetune", log_prints=True)
def nightly_finetune(
    nightly: NightlyParams = NightlyParams(),
    train: FinetuneSettings = FinetuneSettings(),  # type: ignore[valid-type]
    ingest: IngestSettings = IngestSettings(),  # type: ignore[valid-type]
    filtering: FilterSettings = FilterSettings(),  # type: ignore[valid-type]
    evaluation: EvaluationSettings = EvaluationSettings(),  # type: ignore[valid-type]
    registry: RegistrySettings = RegistrySettings(),
    storage: FlowStorage = FlowStorage(),
) -> Any:
    """Fine-tune the promoted model on newly arrived URL lists; promote the result unless the metric falls. Every
    step reaches object storage through `storage` (empty fields: the AWS variables and profiles of its process; keys
    from `storage.credentials_block` when named)."""
    logger, storage = get_run_logger(), resolve_storage(storage)
    state_location = nightly.state or join(registry.location, registry.model_name, "nightly-state.json")
    state = read_state_task(state_location, storage)
    new = find_new_lists(nightly.incoming, state, storage)
    if not new:
        since = state.last_run.isoformat(timespec="seconds") if state.last_run else "ever"
        message = f"nothing to do: no new URL lists under {nightly.incoming} since {since}"
        create_markdown_artifact(f"# nightly-finetune\n\n{message}.\n", key="nightly-report", description=message)
        return Completed(message=message)

    parent = promoted_task(registry.location, registry.model_name, storage)
    batch = batch_name(new)
    batch_root = join(nightly.data_root, batch)
    urls = combine_task([join(nightly.incoming, n) for n in new], join(batch_root, "urls.parquet"), storage)
    dataset = ingest_flow(IngestConfig(urls=urls, output=join(batch_root, "shards"), storage=storage,
                                       **settings_dump(ingest)))
    filtered = None
    if filtering.enabled:
        dataset = filtered = filter_train_set(filtering, dataset.location, join(batch_root, "shards-filtered"),
                                              [nightly.validation, *filter(None, [nightly.domain_validation])], storage)

    run_output = join(absolute(train.output), batch)
    train_config = TrainConfig(**{**settings_dump(train), "output": run_output}, data=dataset.location,
                               init_from=parent.location, storage=storage)
    result = train_flow(train_config)

    def evaluate(model: str, name: str, data: str = nightly.validation) -> dict[str, Any]:
        return evaluate_flow(EvaluateConfig(model=model, data=data, output=join(run_output, name), storage=storage,
                                            **settings_dump(evaluation)))

    wise: WiseFtResult | None = None
    if nightly.domain_validation:  # WiSE-FT: choose a mix of the promoted and the fine-tuned weights
        wise = wise_ft(parent.location, result.model, nightly, evaluate, run_output, storage)
        candidate, candidate_metrics, baseline_metrics = wise.choice.chosen.model, wise.chosen_metrics, wise.start_metrics
        promote, reason = wise.choice.promote, wise.choice.reason
    else:
        candidate = result.model
        candidate_metrics = evaluate(result.model, "eval-candidate")
        baseline_metrics = evaluate(parent.location, "eval-promoted")
        promote, reason = promotion_decision(nightly.metric, metric_value(candidate_metrics, nightly.metric),
                                             metric_value(baseline_metrics, nightly.metric), nightly.tolerance)

    domain_metrics = {} if wise is None else {"domain_validation": nightly.domain_validation,
                                              "domain_metric": wise.domain_metric, "domain": wise.choice.chosen.domain}
    version = register_task(
        registry.location, registry.model_name, candidate,
        config={"nightly": nightly.model_dump(mode="json"), "train": train_config.model_dump(mode="json"),
                "lists": new},
        metrics={**headline_metrics(candidate_metrics), "validation": nightly.validation, **domain_metrics},
        dataset=[dataset.location], parent=parent.ref, storage_config=storage,
        mixing_weight=None if wise is None else wise.choice.chosen.mixing_weight)
    if promote:
        promote_task(registry.location, registry.model_name, version.version, reason, storage)
    logger.info("%s %s: %s", "promoted" if promote else "did not promote", version.ref, reason)
    write_state_task(state_location, NightlyState(processed=sorted({*state.processed, *new}),
                                                  last_run=datetime.now(UTC), last_version=version.version), storage)

    rows = [{"metric": r["metric"], "candidate": r["value"],
             "promoted": _rounded(metric_value(baseline_metrics, r["metric"])), "chance": r["chance"],
             "majority": r["majority"]}
            for r in metric_rows(candidate_metrics)]
    create_table_artifact(rows, key="nightly-metrics",
                          description=f"{version.ref} vs the promoted {parent.ref} on {nightly.validation}")
    report = nightly_markdown(version, parent, promote, reason, new, dataset, filtered, result.model, run_output,
                              metric_rows(candidate_metrics))
    create_markdown_artifact(report + ("" if wise is None else wise_markdown(wise, nightly)), key="nightly-report",
                             description=f"{'promoted' if promote else 'kept'}: {reason}")
    outcome = {"version": version.version, "promoted": promote, "reason": reason, "lists": new}
    if wise is not None:
        outcome["wise_ft"] = {"mixing_weight": wise.choice.chosen.mixing_weight,
                              "grid": [p.model_dump() for p in wise.points], "plot": wise.plot}
    return outcome


# ---------------------------------------------------------------------------------------------------------------------
# WiSE-FT


class WiseFtResult(BaseModel):
    """The grid, the choice, the metrics of the chosen mix and of the start on the guardrail set, the plot."""

    points: list[GridPoint]
    choice: WiseChoice
    domain_metric: str
    chosen_metrics: dict[str, Any]
    start_metrics: dict[str, Any]
    plot: str
    plot_png: bytes


@task(name="wise-ft-grid", **retry_options())
def wise_grid_task(start: str, tuned: str, mixing_weights: list[float], output: str,
                   config: StorageConfig | None = None) -> dict[float, str]:
    return write_grid(start, tuned, sorted({0.0, *mixing_weights}), output, config)


def wise_ft(start: str, tuned: str, nightly: NightlyParams, evaluate, run_output: str,
            store: StorageConfig | None) -> WiseFtResult:
    """Mix, evaluate every mix on both sets, choose; the plot goes to <run_output>/wise-ft.png."""
    domain_metric = nightly.domain_metric or nightly.metric
    models = wise_grid_task(start, tuned, nightly.mixing_weights, join(run_output, "wise-ft"), store)
    guardrail_metrics = {w: evaluate(m, f"wise-ft/eval-guardrail-{w:.2f}") for w, m in models.items()}
    domain_metrics = {w: evaluate(m, f"wise-ft/eval-domain-{w:.2f}", nightly.domain_validation)
                      for w, m in models.items()}
    points = [GridPoint(mixing_weight=w, model=m, domain=metric_value(domain_metrics[w], domain_metric),
                        guardrail=metric_value(guardrail_metrics[w], nightly.metric)) for w, m in models.items()]
    for point in points:
        promotion_decision(nightly.metric, point.guardrail, None, 0)  # a missing metric: one clear UserError
        promotion_decision(domain_metric, point.domain, None, 0)
    choice = choose_mixing_weight(points, nightly.tolerance, domain_metric, nightly.metric)
    png = grid_plot(points, choice, domain_metric, nightly.metric, nightly.tolerance)
    plot = join(run_output, "wise-ft.png")
    write_atomically(plot, png, store)
    get_run_logger().info("WiSE-FT grid: %s; %s", ", ".join(
        f"{p.mixing_weight:g}: domain {p.domain:.4f} guardrail {p.guardrail:.4f}" for p in points), choice.reason)
    return WiseFtResult(points=points, choice=choice, domain_metric=domain_metric, plot=plot, plot_png=png,
                        chosen_metrics=guardrail_metrics[choice.chosen.mixing_weight], start_metrics=guardrail_metrics[0.0])


def wise_markdown(wise: WiseFtResult, nightly: NightlyParams) -> str:
    """The grid as a table and a plot (inline PNG), the chosen mixing weight marked."""
    rows = [f"| {p.mixing_weight:g}{' (chosen)' if p.mixing_weight == wise.choice.chosen.mixing_weight else ''} "
            f"| {p.domain:.4f} | {p.guardrail:.4f} |" for p in wise.points]
    image = base64.b64encode(wise.plot_png).decode()
    return "\n".join([
        "", "## WiSE-FT: mixing the promoted and the fine-tuned weights", "",
        f"Domain: `{wise.domain_metric}` on {nightly.domain_validation}; guardrail: `{nightly.metric}` on "
        f"{nightly.validation} (tolerance {nightly.tolerance:g}). Mixing weight 0 is the promoted model, 1 the "
        "fine-tuned one.", "",
        "| mixing weight | domain | guardrail |", "|---|---|---|", *rows, "",
        f"![WiSE-FT grid](data:image/png;base64,{image})", "", f"Plot: {location_link(wise.plot)}", ""])


def _rounded(value: float | None) -> float | str:
    return "" if value is None else round(value, 4)


def nightly_markdown(version: ModelVersion, parent: ModelVersion, promote: bool, reason: str, lists: list[str],
                     dataset: Any, filtered: Any | None, model: str, run_output: str,
                     rows: list[dict[str, Any]]) -> str:
    verdict = (f"**Promoted {version.ref}** (fine-tuned from {parent.ref})." if promote else
               f"**Kept {parent.ref}**: the fine-tuned {version.ref} is registered but not promoted.")
    lines = ["# nightly-finetune", "", verdict, "", f"Why: {reason}.", "", "## Candidate on the validation set", "",
             metrics_markdown(rows), "", "## Inputs and outputs", "",
             f"- new URL lists: {', '.join(f'`{n}`' for n in lists)}",
             f"- dataset manifest: {location_link(join(dataset.location, 'manifest.parquet'))} "
             f"({dataset.summary.successes} samples)",
             *([filter_line(filtered)] if filtered is not None else []),
             f"- fine-tuned checkpoint: {location_link(model)}",
             f"- registered version: {location_link(version.location)}",
             f"- evaluation reports: {location_link(join(run_output, 'eval-candidate', 'report.html'))}, "
             f"{location_link(join(run_output, 'eval-promoted', 'report.html'))}"]
    return "\n".join(lines) + "\n"
