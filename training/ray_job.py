"""The Ray Train wrapper: the same `train_loop` on N workers, with checkpoints and failure recovery on storage.

`run_training(config)` prepares what every worker needs (the dataset manifest, a tokenizer trained on its captions
or taken from the parent checkpoint), starts a local Ray on demand or joins `config.ray_address`, runs a
`TorchTrainer` (DDP with gloo on CPU, NCCL on GPU), then exports the final model to `<output>/model` and the
metrics to `<output>/metrics.jsonl` and `<output>/tensorboard`. Lines that touch Ray are marked `# ray`.

Re-running the same command resumes the run (`RunConfig(name=...)` is derived from the settings that shape the
model), so a killed job, or a job that already finished, is continued or reused rather than started over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import cluster, storage
from pipeline.cluster import ray_session
from pipeline.errors import UserError
from pipeline.manifest import Manifest, read_manifest
from training.checkpoint import MODEL_CONFIG_FILE, MODEL_FILE, STATE_FILE, open_checkpoint, upload_checkpoint
from training.data import read_captions, steps_per_epoch
from training.model import MODEL_PRESETS
from training.progress import ProgressDisplay, throttled
from training.tokenizer import Tokenizer, clip_tokenizer, train_tokenizer
from training.train import TrainConfig, default_tokenizer_vocab, loader_processes, total_steps, train_loop

# settings that do not change what is trained: a re-run that changes only these resumes the same run
_OPERATIONAL = {"ray_address", "max_failures", "run_name", "log_every", "loader_workers", "cpus_per_worker",
                "storage", "record_sample_keys", "output", "device", "compile", "activation_checkpointing"}


@dataclass(frozen=True)
class TrainResult:
    model: str
    """Location of the exported model (weights, model config, tokenizer)."""
    metrics: dict[str, Any]
    """The last reported metrics."""
    run_name: str
    steps: int
    runtime: dict[str, Any]
    """Where and how rank 0 ran: device, precision, hardware, world size, loader processes, torch threads."""


def run_name(config: TrainConfig) -> str:
    if config.run_name:
        return config.run_name
    shaping = config.model_dump(mode="json", exclude=_OPERATIONAL)
    return "clip-" + hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:10]


def _worker_config(config: TrainConfig) -> dict[str, Any]:
    """The config as the workers get it: credentials come from the workers' environment or a Ray object, never this."""
    return config.model_dump(mode="json",
                             exclude={"storage": {"access_key_id", "secret_access_key", "session_token"}})


def _cpus(config: TrainConfig) -> int:
    return config.cpus_per_worker or max(1, (os.cpu_count() or 1) // config.num_workers)


def _use_gpu(config: TrainConfig) -> bool:
    """device auto: one GPU per worker when the cluster has enough of them; cpu/cuda force it."""
    import ray  # ray

    gpus = int(ray.cluster_resources().get("GPU", 0))  # ray
    if config.device == "cpu":
        return False
    if gpus >= config.num_workers:
        return True
    if config.device == "cuda" or gpus:
        raise UserError(f"the Ray cluster has {gpus} GPU(s) for {config.num_workers} worker(s) asking one each: lower "
                        f"num_workers, or set device cpu")
    return False


def _train_worker(loop_config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker process."""
    import ray.train  # ray
    import ray.train.torch  # ray

    cluster.adopt_credentials(loop_config.get("credentials"))  # ray: the driver's explicit keys, if any
    config = TrainConfig.model_validate(loop_config["config"])  # re-validated on the worker
    torch.set_num_threads(loop_config["threads"])
    context = ray.train.get_context()  # ray
    queue = loop_config["progress"]

    def send(event: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):  # progress is best effort: the driver may already be gone
            queue.put_nowait(event)

    def report(metrics: dict[str, Any], directory: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if directory else None  # ray
        ray.train.report(metrics, checkpoint=checkpoint,  # ray
                         checkpoint_dir_name=f"step_{metrics['step']:08d}" if directory else None)

    _record_worker(config, context)
    with contextlib.ExitStack() as stack:
        tokenizer_dir = stack.enter_context(open_checkpoint(loop_config["tokenizer"], config.storage))
        if config.init_from:
            parent = stack.enter_context(open_checkpoint(config.init_from, config.storage))
            config = config.model_copy(update={"init_from": str(parent)})
        checkpoint = ray.train.get_checkpoint()  # ray: set when Ray restarts the run after a failure
        resume = Path(stack.enter_context(checkpoint.as_directory())) if checkpoint else None
        multi = context.get_world_size() > 1
        train_loop(config, tokenizer_dir, report, resume_from=resume, device=ray.train.torch.get_device(),  # ray
                   prepare_model=ray.train.torch.prepare_model if multi else None,  # ray: DDP
                   progress=throttled(send), loader_workers=loop_config["loader_workers"])


def _record_worker(config: TrainConfig, context: Any) -> None:
    """Leave `<output>/workers/rank<R>-pid<P>.json`: which node and process ran each rank (a restart adds files)."""
    import ray  # ray

    record = {"rank": context.get_world_rank(), "world_size": context.get_world_size(), "pid": os.getpid(),
              "node_id": ray.get_runtime_context().get_node_id(), "hostname": os.uname().nodename}  # ray
    location = storage.join(storage.absolute(config.output), "workers")
    fs, path = storage.filesystem(location, config.storage)
    fs.pipe_file(f"{path}/rank{record['rank']}-pid{record['pid']}.json", json.dumps(record).encode())


def prepare_tokenizer(config: TrainConfig, manifest: Manifest) -> str:
    """The run's tokenizer at `<output>/tokenizer`: the parent's when fine-tuning, else trained on the captions."""
    location = storage.join(storage.absolute(config.output), "tokenizer")
    fs, path = storage.filesystem(location, config.storage)
    with storage.storage_errors(location, config.storage):
        if fs.exists(f"{path}/tokenizer.json"):
            return location
    with tempfile.TemporaryDirectory(prefix="clipforge-tokenizer-") as scratch:
        if config.init_from:
            with open_checkpoint(config.init_from, config.storage) as parent:
                tokenizer = Tokenizer.load(parent)
        elif config.tokenizer == "clip-bpe":
            tokenizer = clip_tokenizer(MODEL_PRESETS[config.preset].context_length)
        else:
            context_length = MODEL_PRESETS[config.preset].context_length
            tokenizer = train_tokenizer(read_captions(manifest, config=config.storage, caption_field=config.caption_field),
                                        vocab_size=default_tokenizer_vocab(config), context_length=context_length)
        tokenizer.save(scratch)
        upload_checkpoint(Path(scratch), location, config.storage)
    return location


def prepare_parent(config: TrainConfig) -> TrainConfig:
    """`init_from` may name a released CLIP (OpenAI / open_clip / Hugging Face file or folder): import it once to
    `<output>/init` and start from that clipforge checkpoint."""
    from training.convert import ImportConfig, import_checkpoint, is_released_source

    if not config.init_from or storage.is_remote(config.init_from) or not is_released_source(config.init_from):
        return config
    location = storage.join(storage.absolute(config.output), "init")
    fs, path = storage.filesystem(location, config.storage)
    if not fs.exists(f"{path}/{STATE_FILE}"):  # state.json is written last: present means complete
        import_checkpoint(ImportConfig(source=config.init_from, output=location, storage=config.storage))
    return config.model_copy(update={"init_from": location})


def validate(config: TrainConfig) -> Manifest:
    """Fail fast, with one line, on what would otherwise fail inside a Ray worker."""
    if config.preset not in MODEL_PRESETS and not config.init_from:
        raise UserError(f"unknown preset {config.preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
    if config.tokenizer == "clip-bpe" and not config.init_from and MODEL_PRESETS[config.preset].vocab_size < 49408:
        raise UserError(f"clip-bpe needs 49,408 token embeddings; preset {config.preset} has "
                        f"{MODEL_PRESETS[config.preset].vocab_size} (use vit-b-32 or an openai-* preset)")
    manifest = read_manifest(config.data, config.storage)
    if config.batch_size % (config.num_workers * config.accum_steps):
        raise UserError(f"batch_size {config.batch_size} must divide by num_workers x accum_steps "
                        f"({config.num_workers} x {config.accum_steps})")
    try:
        steps_per_epoch(manifest, config.batch_size)
    except ValueError as err:
        raise UserError(str(err)) from None
    storage.check_writable(storage.absolute(config.output), config.storage)
    return manifest


def _ray_storage(config: TrainConfig) -> dict[str, Any]:
    location = storage.join(storage.absolute(config.output), "ray")
    if not storage.is_remote(location):
        return {"storage_path": location}
    filesystem, path = storage.pyarrow_filesystem(location, config.storage)
    return {"storage_path": path, "storage_filesystem": filesystem}


def export_model(checkpoint_dir: Path, config: TrainConfig) -> str:
    """Copy the weights, model config, tokenizer, state and metrics (not the optimizer) to `<output>/model`."""
    location = storage.join(storage.absolute(config.output), "model")
    with tempfile.TemporaryDirectory(prefix="clipforge-export-") as scratch:
        for name in (MODEL_FILE, MODEL_CONFIG_FILE, "tokenizer.json", "metrics.jsonl", STATE_FILE):
            if (checkpoint_dir / name).exists():
                shutil.copy(checkpoint_dir / name, Path(scratch) / name)
        upload_checkpoint(Path(scratch), location, config.storage)
    return location


def write_logs(checkpoint_dir: Path, config: TrainConfig) -> None:
    """metrics.jsonl and TensorBoard event files beside the model."""
    from torch.utils.tensorboard import SummaryWriter

    history = [json.loads(line) for line in (checkpoint_dir / "metrics.jsonl").read_text().splitlines() if line]
    with tempfile.TemporaryDirectory(prefix="clipforge-logs-") as scratch:
        shutil.copy(checkpoint_dir / "metrics.jsonl", Path(scratch) / "metrics.jsonl")
        writer = SummaryWriter(str(Path(scratch) / "tensorboard"))
        for record in history:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, int | float):
                    writer.add_scalar(f"train/{key}", value, record["step"])
        writer.close()
        target = storage.absolute(config.output)
        fs, path = storage.filesystem(target, config.storage)
        with storage.storage_errors(target, config.storage):
            fs.put(str(Path(scratch)) + "/", path, recursive=True)


def _show_progress(queue: Any, display: ProgressDisplay, stop: threading.Event) -> None:
    """Driver thread: draw the events rank 0 puts on the queue until `stop` is set and the queue is empty."""
    from ray.util.queue import Empty  # ray

    while True:
        try:
            display(queue.get(timeout=0.5))
        except Empty:
            if stop.is_set():
                return
        except Exception:  # noqa: BLE001 - the queue's actor is gone (Ray shutting down): nothing more to show
            return


def _root_cause(err: BaseException) -> BaseException:
    """The error behind Ray's wrappers: the lowest failed rank's own exception, its causes followed."""
    while True:
        if failures := getattr(err, "worker_failures", None):  # ray: WorkerGroupError, rank -> error
            err = failures[min(failures)]
        elif isinstance(getattr(err, "cause", None), BaseException):  # ray: RayTaskError around the worker's error
            err = err.cause
        elif err.__cause__ is not None:
            err = err.__cause__
        else:
            return err


def _fit(trainer: Any) -> Any:
    """`trainer.fit()` on a helper thread, so that Ctrl-C and SIGTERM reach this process as KeyboardInterrupt and
    unwind it (taking down the local Ray): on the main thread, Ray Train installs a SIGINT handler of its own that
    ends the process with its own exit status and leaves our clean-up unrun."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()  # ray
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # short waits: the main thread stays interruptible
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def run_training(config: TrainConfig) -> TrainResult:
    """Train on Ray (local on demand, or the cluster at `config.ray_address`); returns the exported model."""
    import ray.train  # ray
    from ray.train.torch import TorchTrainer  # ray
    from ray.util.queue import Queue  # ray

    config = prepare_parent(config)
    manifest = validate(config)
    tokenizer = prepare_tokenizer(config, manifest)
    name = run_name(config)
    # code and non-secret storage settings travel in the runtime_env (visible in Ray's job API); keys never do
    worker_env = storage.cluster_env(config.storage)
    with ray_session(config.ray_address, worker_env):
        credentials = cluster.ship_credentials(config.storage)  # ray: an object, not recorded anywhere
        use_gpu, cpus = _use_gpu(config), _cpus(config)
        loaders = loader_processes(config, cpus, use_gpu)
        threads = max(1, cpus - loaders) if use_gpu else cpus  # on CPU the loader processes mostly sleep
        print(f"train: run {name}, {config.num_workers} worker(s) x {cpus} CPU(s){' + 1 GPU' if use_gpu else ''}",
              file=sys.stderr, flush=True)
        queue = Queue(actor_options={"num_cpus": 0})  # ray: rank 0's progress events, drawn here
        display, stop = ProgressDisplay(), threading.Event()
        drawer = threading.Thread(target=_show_progress, args=(queue, display, stop), daemon=True)
        drawer.start()
        trainer = TorchTrainer(  # ray
            _train_worker,
            train_loop_config={"config": _worker_config(config), "tokenizer": tokenizer, "threads": threads,
                               "loader_workers": loaders, "progress": queue, "credentials": credentials},
            scaling_config=ray.train.ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu,  # ray
                                                   resources_per_worker={"CPU": cpus}),
            run_config=ray.train.RunConfig(  # ray
                name=name,
                failure_config=ray.train.FailureConfig(max_failures=config.max_failures),  # ray
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=3),  # ray
                worker_runtime_env={"env_vars": worker_env} if worker_env else None,
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # ray: our progress display says it all
                **_ray_storage(config),
            ),
        )
        try:
            result = _fit(trainer)
        except Exception as err:  # noqa: BLE001 - Ray wraps worker errors; show the root cause in one line
            cause = _root_cause(err)
            if isinstance(cause, UserError):
                raise UserError(storage.redact(str(cause))) from err
            if message := cluster.missing_code_message(cause):
                raise UserError(message) from err
            raise UserError(f"training failed: {type(cause).__name__}: "
                            f"{storage.redact(str(cause)).splitlines()[0]}") from err
        finally:
            stop.set()
            drawer.join(timeout=5)
            display.close()
        if result.checkpoint is None:
            raise UserError("training ended without a checkpoint")
        with result.checkpoint.as_directory() as directory:  # ray
            directory = Path(directory)
            model_location = export_model(directory, config)
            write_logs(directory, config)
            state = json.loads((directory / STATE_FILE).read_text())
    epoch_steps = steps_per_epoch(manifest, config.batch_size)
    metrics = {**result.metrics, "steps": state["step"], "steps_per_epoch": epoch_steps}
    return TrainResult(model=model_location, metrics=metrics, run_name=name, steps=total_steps(config, epoch_steps),
                       runtime=state.get("runtime", {}))
