"""What the flows share: their parameter models (the Prefect UI's run forms), the retry policy of every task, and
the progress artifacts that show long steps moving.

The composed flows (`clip-train`, `nightly-finetune`) take the jobs' own configs minus the fields the flow fills in
itself: `IngestConfig` without `urls`/`output` (the flow ingests a train and a val list), `TrainConfig` without
`data` (the flow passes the ingested train set), `EvaluateConfig` without `model`/`data`/`output`; none of them
carries `storage`, which the flow takes once and hands to every step (one endpoint, one set of keys). These settings
models are derived from the configs with `derive`, so every field keeps its type, bounds and description and there
is one source of truth: a field added to `TrainConfig` appears in the run form without touching this module.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.tasks import exponential_backoff
from pydantic import Field, ValidationError, create_model
from pydantic.fields import FieldInfo

from pipeline import storage
from pipeline.config import Config
from pipeline.errors import UserError
from pipeline.filter import FilterConfig
from pipeline.ingest import IngestConfig
from evaluation.evaluate import EvaluateConfig
from training.train import TrainConfig


def derive(name: str, doc: str, base: type[Config], drop: tuple[str, ...] = (), defaults: dict[str, Any] | None = None,
           **extra: tuple[Any, FieldInfo]) -> type[Config]:
    """A `Config` with `extra` fields first, then `base`'s fields minus `drop`, some with other `defaults`."""
    defaults = defaults or {}
    fields: dict[str, Any] = dict(extra)
    for field_name, info in base.model_fields.items():
        if field_name in drop:
            continue
        if field_name in defaults:
            info = FieldInfo.merge_field_infos(info, default=defaults[field_name])
        fields[field_name] = (info.annotation, info)
    return create_model(name, __base__=Config, __doc__=doc, __module__=__name__, **fields)


def _described(default: Any, description: str, **constraints: Any) -> FieldInfo:
    return Field(default, description=description, **constraints)


def settings_dump(settings: Config, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings as keyword values for the job config they were derived from (secrets stay `SecretStr`)."""
    return {k: v for k, v in settings.model_dump().items() if k not in exclude}


# ---------------------------------------------------------------------------------------------------------------------
# Parameter models

IngestSettings = derive(
    "IngestSettings", "How URL lists are downloaded, filtered and resized (the fields of `clipforge ingest`).",
    IngestConfig, drop=("urls", "output", "storage"))

# With no URL lists, `clip-train` runs the main job on the embedded defaults, exactly as `clipforge demo` does: the
# bundled catalog, with these settings for every field the caller did not give (`with_defaults`).
DEMO_WORKDIR = ".clipforge"
DEMO_SETTINGS: dict[str, dict[str, Any]] = {
    "ingest": {"output": f"{DEMO_WORKDIR}/data/openmoji", "image_size": 64, "samples_per_shard": 256,
               "min_success_rate": 0.95},
    # patch dropout 0.5 makes a step 1.5x cheaper at equal quality per epoch, which buys 6 epochs for the time of 4
    # (README, "The demo's recipe")
    "train": {"output": f"{DEMO_WORKDIR}/runs/demo", "preset": "small", "epochs": 6, "batch_size": 128, "lr": 5e-4,
              "warmup_steps": 20, "checkpoint_every": 50, "patch_dropout": 0.5},
    "evaluation": {"label_field": "group", "templates": "emoji"},
    "registry": {"model_name": "openmoji-clip"},
}


def demo_settings(catalog: str = "openmoji") -> dict[str, dict[str, Any]]:
    """DEMO_SETTINGS for a choice of bundled catalog(s): each choice has its own shards, training run and model name
    (OpenMoji's are the ones above), so switching never resumes another choice's work."""
    if catalog == "openmoji":
        return DEMO_SETTINGS
    return {**DEMO_SETTINGS, "ingest": {**DEMO_SETTINGS["ingest"], "output": f"{DEMO_WORKDIR}/data/{catalog}"},
            "train": {**DEMO_SETTINGS["train"], "output": f"{DEMO_WORKDIR}/runs/demo-{catalog}"},
            "registry": {"model_name": "emoji-clip" if catalog == "both" else f"{catalog}-clip"}}


def with_defaults(settings: Config, defaults: dict[str, Any]) -> Config:
    """`settings` with `defaults` in every field the caller did not set."""
    return settings.model_copy(update={k: v for k, v in defaults.items() if k not in settings.model_fields_set})

IngestParams = derive(
    "IngestParams", "The train and validation URL lists and how they are ingested into WebDataset shards. Without "
    "URL lists, the bundled OpenMoji catalog is rendered and served over loopback HTTP for the run.",
    IngestConfig, drop=("urls", "output", "storage"),
    train_urls=(str | None, _described(None, "Training URL list: .csv, .tsv, .parquet or .jsonl, local or s3://, "
                                       "with a URL and a caption column. Empty: the bundled OpenMoji catalog's "
                                       "train split, served over loopback HTTP.")),
    val_urls=(str | None, _described(None, "Validation URL list (same format); evaluation and brand scoring use "
                                     "it. Empty: the bundled catalog's validation split (with train_urls empty).")),
    output=(str, _described(f"{DEMO_WORKDIR}/data/clip-train", "Folder or s3:// prefix: the train shards go to "
                            "<output>/train, the validation shards to <output>/val.")),
    catalog=(Literal["openmoji", "fluent", "both"], _described("openmoji", "Bundled catalog(s) used when no URL "
             "lists are given: OpenMoji, Microsoft's Fluent Emoji Flat, or both as one dataset (train and val splits "
             "of each; every emoji on the same side for both vendors).")),
    catalog_dir=(str, _described(f"{DEMO_WORKDIR}/catalog", "Local folder the bundled catalogs are rendered into "
                                 "(<catalog_dir>/openmoji, <catalog_dir>/fluent; reused when complete); their URL "
                                 "lists go to <catalog_dir>/lists/<catalog>.")),
)

TrainSettings = derive(
    "TrainSettings", "Model and optimisation of the training run (the fields of `clipforge train`, except `data`, "
    "which is the ingested train set).", TrainConfig, drop=("data", "storage"))

FinetuneSettings = derive(
    "FinetuneSettings", "The nightly fine-tune: its own schedule; it starts from the promoted model (init_from) and "
    "trains on the new data. Each night's run writes under <output>/<batch>.", TrainConfig,
    drop=("data", "init_from", "storage"),
    defaults={"output": ".clipforge/runs/nightly", "lr": 1e-4, "steps": 100, "warmup_steps": 10})

FilterSettings = derive(
    "FilterSettings", "Filtering of the ingested training set before training (the fields of `clipforge filter`, "
    "except data and output, which the flow fills in). The validation set is always among the sets decontaminated "
    "against: a training image that copies a validation image is removed.", FilterConfig,
    drop=("data", "output", "storage"),
    defaults={"duplicate_hash_distance": 0},
    enabled=(bool, _described(True, "Filter the training set (basic rules: caption length, exact-copy images with "
                              "the same caption, copies of validation images). Off: train on the ingested set.")),
)

EvaluationSettings = derive(
    "EvaluationSettings", "Zero-shot classification and retrieval on the validation set (the fields of "
    "`clipforge evaluate`, except model, data and output, which the flow fills in).", EvaluateConfig,
    drop=("model", "data", "output", "storage"))


class BrandSettings(Config):
    """Brand scoring: a profile built from the training images, then images scored against it."""

    enabled: bool = True
    """Build the profile and score images. Off: skip the step."""

    images: str | None = None
    """Images to score: a folder or s3:// prefix of images, an image list or an ingested dataset. Empty: the
    validation set."""

    references: str | None = None
    """Off-brand images for the profile (any image location). Empty: the generic set (the training images
    redrawn in other styles, and drawn shapes)."""

    target_false_accept_rate: float = Field(0.05, ge=0, le=1)
    """The profile's threshold accepts at most this share of held-out off-brand references."""

    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of the images held out of the scorer's fit to calibrate it and measure its ROC."""

    min_images: int = Field(10, ge=2)
    """Fewer readable training images than this fails the step."""


class RegistrySettings(Config):
    """Where models are registered, and under which name."""

    location: str = ".clipforge/registry"
    """Model registry: a folder or s3://bucket/prefix."""

    model_name: str = "clip"
    """Name of the model in the registry; versions are numbered 1, 2, 3..."""


class ClipTrainRegistry(RegistrySettings):
    """Where the trained model is registered, and whether it becomes the promoted (served) version."""


    promote: Literal["first", "always", "never"] = "first"
    """Promote the new version: `first` only when no version is promoted yet, `always`, or `never`."""


class FlowStorage(storage.StorageConfig):
    """How the run's steps reach object storage. Every field left empty falls back to the standard AWS variables and
    profiles of the process that runs the step. Keys written here are kept by Prefect with the run's parameters:
    prefer the worker's environment, or a Prefect Secret block named in `credentials_block`."""

    credentials_block: str | None = None
    """Name of a Prefect Secret block holding `{"access_key_id": ..., "secret_access_key": ...}` (and optionally
    `"session_token"`), read when the run starts, instead of keys written above."""


CREDENTIAL_FIELDS = ("access_key_id", "secret_access_key", "session_token")


def resolve_storage(config: FlowStorage) -> storage.StorageConfig:
    """The storage settings every step gets: `config`, with the keys of its `credentials_block` when it names one."""
    settings = config.model_dump(exclude={"credentials_block"})
    name = config.credentials_block
    if name:
        if any(settings[field] is not None for field in CREDENTIAL_FIELDS):
            raise UserError("storage: give the keys either in the parameter or in credentials_block, not both")
        from prefect.blocks.system import Secret

        try:
            keys = Secret.load(name).get()
        except ValueError as err:
            raise UserError(f"storage: cannot load the Prefect Secret block {name!r} ({err}); create it in the UI "
                            f"(Blocks, Secret) or with Secret(value={{...}}).save({name!r})") from None
        # the message names no value: a Prefect run log keeps it
        if not (isinstance(keys, dict) and {"access_key_id", "secret_access_key"} <= set(keys) <= set(CREDENTIAL_FIELDS)
                and all(isinstance(value, str) and value for value in keys.values())):
            raise UserError(f"storage: the Secret block {name!r} must hold a JSON object of non-empty strings: "
                            f"access_key_id, secret_access_key and optionally session_token")
        settings.update(keys)
    return storage.StorageConfig.model_validate(settings)


# ---------------------------------------------------------------------------------------------------------------------
# Retries: transient failures (object storage, HTTP, a lost Ray worker) are retried with backoff; a user error
# (bad config, missing file, failed quality floor) fails once, with its one-line message, and is logged in one line.

USER_ERRORS = (UserError, ValidationError)


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry every failure except the ones the user must fix."""
    error = state.result(raise_on_failure=False)  # the exception, not raised again (its traceback stays clean)
    return not isinstance(error, USER_ERRORS)


class UserErrorsInOneLine(logging.Filter):
    """Prefect logs a failed flow or task run with its traceback. For a user error the message says what to fix, and
    a traceback into clipforge would bury it: the record keeps its message and loses the traceback. Every other
    exception keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], USER_ERRORS):
            record.exc_info = record.exc_text = None
        return True


for _run_logger in ("prefect.flow_runs", "prefect.task_runs"):  # the loggers of every flow and task run
    logging.getLogger(_run_logger).addFilter(UserErrorsInOneLine())


def retry_options(retries: int = 2, backoff_seconds: float = 10.0) -> dict[str, Any]:
    """Task decorator options: `retries` with exponential backoff and jitter, never for a `UserError`.

    No result caching: ingest and training reuse finished work themselves, keyed on their whole input, so a changed
    input is never hidden behind a cached result.
    """
    from prefect.cache_policies import NO_CACHE

    return {"retries": retries, "retry_delay_seconds": exponential_backoff(backoff_factor=backoff_seconds),
            "retry_jitter_factor": 0.5, "retry_condition_fn": retry_unless_user_error, "cache_policy": NO_CACHE}


# ---------------------------------------------------------------------------------------------------------------------
# Progress artifacts


@contextlib.contextmanager
def progress_artifact(key: str, description: str, measure: Callable[[], float | None],
                      interval: float = 3.0) -> Iterator[None]:
    """A progress artifact for the block: 0 at the start, `measure()` (a share in [0, 1]) every `interval` seconds
    while the block runs, 100 when it ends normally. A failing `measure` only skips that update."""
    logger = get_run_logger()
    artifact_id = create_progress_artifact(0.0, key=key, description=description)
    stop = threading.Event()
    shown = [0.0]

    def poll() -> None:
        while not stop.wait(interval):
            try:
                share = measure()
            except Exception as err:  # noqa: BLE001 - progress is best effort
                logger.debug("progress of %s not measured: %s", key, err)
                continue
            if share is not None and round(100 * share, 1) != shown[0]:
                shown[0] = round(100 * min(1.0, max(0.0, share)), 1)
                update_progress_artifact(artifact_id, shown[0])

    # the thread must see the flow run's settings (API URL) and client, which live in context variables
    thread = threading.Thread(target=contextvars.copy_context().run, args=(poll,), name=f"progress {key}",
                              daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    update_progress_artifact(artifact_id, 100.0)


def count_matches(location: str, pattern: str, config: storage.StorageConfig | None = None) -> int:
    """How many entries under `location` match the glob `pattern` (0 when the location does not exist yet)."""
    fs, path = storage.filesystem(location, config)
    return len(fs.glob(f"{path.rstrip('/')}/{pattern}"))
