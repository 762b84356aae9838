"""The `train` flow: `training.ray_job.run_training` (Ray Train on a local or remote cluster) as a Prefect run.

`TorchTrainer.fit()` runs inside a plain task (no prefect-ray). A retry, or a re-run with the same config, resumes
the same Ray Train run from its last checkpoint (the run name is derived from the config), so nothing trained is
lost. The UI shows checkpoints as they land (progress artifact) and the final training metrics (table artifact).
"""

from __future__ import annotations

import re

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from flows.params import progress_artifact, retry_options
from pipeline import storage
from pipeline.manifest import read_manifest
from training.data import steps_per_epoch
from training.ray_job import TrainResult, run_name, run_training
from training.train import TrainConfig, total_steps


def _checkpoint_progress(config: TrainConfig, steps: int):
    """Share of steps done: the newest `step_<n>` checkpoint of the Ray Train run / all steps."""
    run_dir = storage.join(storage.absolute(config.output), "ray", run_name(config))

    def measure() -> float | None:
        fs, path = storage.filesystem(run_dir, config.storage)
        names = fs.glob(f"{path}/step_*")
        done = [int(m.group(1)) for n in names if (m := re.search(r"step_(\d+)$", n.rstrip("/")))]
        return max(done) / steps if done else None

    return measure


@task(name="train-on-ray", **retry_options(retries=1))
def train_task(config: TrainConfig) -> TrainResult:
    """Train (or resume, or reuse) the run described by `config`; returns the exported model and its metrics.
    A local Ray started for the run is taken down when it ends (its memory is free for evaluation)."""
    logger = get_run_logger()
    steps = total_steps(config, steps_per_epoch(read_manifest(config.data, config.storage), config.batch_size))
    model = f"fine-tuning {config.init_from}" if config.init_from else f"training preset {config.preset}"
    logger.info("%s for %d steps (batch %d, %d worker(s)) on %s -> %s, run %s", model, steps, config.batch_size,
                config.num_workers, config.data, storage.absolute(config.output), run_name(config))
    with progress_artifact("train-progress", f"steps of run {run_name(config)} checkpointed",
                           _checkpoint_progress(config, steps)):
        result = run_training(config)
    logger.info("model exported to %s after %d steps; loss %.4f", result.model, result.metrics.get("steps", steps),
                result.metrics.get("loss", float("nan")))
    return result


def metric_rows(metrics: dict[str, object]) -> list[dict[str, object]]:
    return [{"metric": key, "value": value} for key, value in metrics.items() if isinstance(value, int | float | str)]


@flow(name="train", log_prints=True)
def train_flow(config: TrainConfig) -> TrainResult:
    """Train a CLIP model on an ingested dataset with Ray Train; re-running resumes or reuses the same run."""
    result = train_task(config)
    create_table_artifact(metric_rows(result.metrics), key="train-metrics",
                          description=f"Last training metrics of run {result.run_name}; model at {result.model}")
    return result
