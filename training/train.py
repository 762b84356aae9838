"""The training loop: a plain function that runs in one process (tests) or in each Ray Train worker.

`train_loop(config, ...)` never imports Ray. It gets its rank and world size from `torch.distributed` (when a
process group is initialised, DDP is applied from outside the model), a `report(metrics, checkpoint_dir)` callable to
hand metrics and checkpoints to whoever runs it, and optionally a checkpoint directory to resume from.

One step, in order: fetch the local batch; (accumulation) split it into micro-batches and cache their embeddings
without gradients, compute the loss of the whole contrastive batch on the cached embeddings, then re-run each
micro-batch with gradients and feed it the cached embedding gradients (GradCache: k micro-batches give exactly the
loss and gradients of one batch k times larger); clip gradients; AdamW step; clamp the temperature; log; checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import Field, field_validator

from pipeline.config import Config
from pipeline.manifest import read_manifest
from pipeline.storage import StorageConfig, absolute
from training.checkpoint import load_optimizer_state, load_weights, read_state, save_checkpoint
from training.data import make_loader, steps_per_epoch
from training.device import DeviceSetting, Precision, PrecisionSetting, autocast, describe, hardware_name, resolve_precision
from training.loss import distributed_clip_loss
from training.model import CLIP, MODEL_PRESETS, create_model
from training.parallel import (apply_activation_checkpointing, clip_grad_norm, compile_blocks, full_state_dict, is_sharded,
                               load_sharded, make_optimizer, resolve_compile, save_sharded, shard_model)
from training.progress import Progress
from training.tokenizer import Tokenizer
from training.transforms import check_augmentations, device_crops

Report = Callable[[dict[str, Any], Path | None], None]


class TrainConfig(Config):
    """One training run: data, model preset, optimisation, checkpointing and scale-out."""

    data: str
    """Dataset location written by `clipforge ingest` (folder or s3://...); epoch sizes come from its manifest."""

    output: str = ".clipforge/runs/clip"
    """Where the run writes checkpoints, metrics and the final model: a folder or s3://bucket/prefix."""

    preset: str = "small"
    """Model preset: tiny (tests), small (CPU demo), vit-b-32, vit-b-16, vit-l-14, openai-vit-b-32 (QuickGELU), ..."""

    init_from: str | None = None
    """Fine-tune: start from this checkpoint (its weights, model shape and tokenizer), with this run's own schedule."""

    epochs: int = Field(10, gt=0)
    """Passes over the data (ignored when `steps` is set)."""

    steps: int | None = Field(None, gt=0)
    """Total optimiser steps. Empty: epochs x steps per epoch."""

    batch_size: int = Field(128, gt=0)
    """Global contrastive batch: pairs compared with each other in one step, over all workers and micro-batches."""

    accum_steps: int = Field(1, gt=0)
    """Micro-batches per step. The contrastive batch stays whole (feature caching), only memory shrinks."""

    lr: float = Field(5e-4, gt=0)
    """Peak learning rate, reached after warm-up, then cosine decay to zero."""

    warmup_steps: int | None = Field(None, ge=0)
    """Steps of linear learning-rate warm-up. Empty: a tenth of the run's steps (at most 2,000), so that a short run
    is not spent inside its warm-up."""

    weight_decay: float = Field(0.2, ge=0)
    """AdamW weight decay, on weight matrices only (not norms, biases, embeddings or the temperature)."""

    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas (CLIP's 0.98 for stability with large batches)."""

    eps: float = 1e-6
    """AdamW epsilon."""

    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this. Empty: no clipping."""

    precision: PrecisionSetting = "auto"
    """Autocast of the towers; the loss and the temperature stay fp32. auto: bf16 where the worker's hardware runs it
    natively (CUDA GPUs with bf16, CPUs with AMX or AVX-512 BF16), else fp32; bf16 or fp32 force it."""

    loss_chunk_size: int | None = Field(None, gt=0)
    """Tile the contrastive loss in blocks of this many rows (memory linear in the batch). Empty: dense."""

    patch_dropout: float = Field(0.0, ge=0, lt=1)
    """Share of image patches dropped at random in training (FLIP; 0.5 about halves the image tower); never at
    evaluation."""

    patch_dropout_final_steps: int = Field(0, ge=0)
    """Train the last this many steps on every patch (FLIP's short unmasked phase)."""

    compile: bool | Literal["auto"] = "auto"
    """torch.compile each transformer block. "auto": on CUDA only (on CPU compiling outweighs short runs)."""

    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory (bigger batches), about 1/3 more compute."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    """Several workers: ddp (a full model on each) or fsdp (FSDP2: parameters, gradients and optimizer state sharded,
    every rank writing its part of each checkpoint; one safetensors model at the end)."""

    seed: int = 0
    """Seed of the initial weights, the epoch shuffles and the augmentations."""

    checkpoint_every: int = Field(100, gt=0)
    """Steps between checkpoints (a checkpoint is also written at the end)."""

    log_every: int | None = Field(None, gt=0)
    """Steps between metric records (and progress lines when the output is not a terminal). Empty: about 20
    records per run, every 1 to 50 steps."""

    loader_workers: int | None = Field(None, ge=0)
    """Data-loading processes per training worker. Empty: sized to the worker's CPUs (see `loader_processes`)."""

    shuffle_buffer: int = Field(1000, gt=0)
    """Samples in each loader worker's shuffle buffer."""

    crop_scale_min: float = Field(0.8, gt=0, le=1)
    """Random resized crop keeps between this share of the image area and all of it."""

    augment: list[str] = []
    """Style augmentations, each drawn per sample with its own chance: colour, grey, outline, blur, resolution,
    rotate (see `training.transforms.STYLE_AUGMENTATIONS`); they change how a picture is drawn, not what it shows.
    Training only: evaluation and embedding never apply them."""

    caption_field: str | None = "captions"
    """Field of each sample's json holding a list of captions (ingest keeps a list column as such): each epoch reads
    every sample with one of them, drawn from the epoch's seed. Samples without the field use their caption.
    Empty ("" or null): always the caption."""

    tokenizer_vocab_size: int | None = Field(None, ge=260)
    """Vocabulary of the BPE tokenizer trained on the captions. Empty: the preset's vocab_size."""

    tokenizer: Literal["byte-bpe", "clip-bpe"] = "byte-bpe"
    """From scratch: byte-bpe (trained on the captions) or clip-bpe (CLIP's 49,408 ids). Fine-tunes keep the parent's."""

    lock_image: bool = False
    """Freeze the image tower (LiT: train the text tower against fixed image features)."""

    lock_image_unlocked_layers: int = Field(0, ge=0)
    """With lock_image: its last N blocks and everything above them (final norm, projection) stay trainable."""

    lock_text: bool = False
    """Freeze the text tower (token and position embeddings, blocks, final norm, projection)."""

    lock_text_unlocked_layers: int = Field(0, ge=0)
    """With lock_text: its last N blocks and everything above them (final norm, projection) stay trainable."""

    tower_lr: float | None = Field(None, gt=0)
    """Peak learning rate of the towers' trainable weights, apart from the projections and temperature (which keep
    lr): e.g. 1e-5 with lr 1e-4 to fine-tune a released model gently. Empty: lr for everything."""

    num_workers: int = Field(1, gt=0)
    """Ray Train workers (processes, possibly on several nodes); the global batch is split between them."""

    cpus_per_worker: int | None = Field(None, gt=0)
    """CPUs each worker reserves, shared by its torch threads and loader processes. Empty: this machine's CPUs
    divided by num_workers."""

    device: DeviceSetting = "auto"
    """auto: one GPU per worker (NCCL) when the Ray cluster has GPUs, else CPUs (gloo); cpu or cuda force it."""

    ray_address: str | None = None
    """Ray cluster to join (e.g. 10.0.0.5:6379). Empty: a local Ray started on demand."""

    max_failures: int = Field(2, ge=0)
    """Worker failures Ray Train recovers from (restarting from the last checkpoint) before giving up."""

    run_name: str | None = None
    """Name of the Ray Train run; re-running with the same name resumes it. Empty: derived from output."""

    record_sample_keys: bool = False
    """Write the sample keys of every step to sample_keys.jsonl in each checkpoint (audits, tests)."""

    storage: StorageConfig = StorageConfig()
    """How to reach object storage for s3:// locations."""

    @field_validator("augment")
    @classmethod
    def _known_augmentations(cls, names: list[str]) -> list[str]:
        return list(check_augmentations(names))

    @field_validator("data", "init_from")
    @classmethod
    def _absolute(cls, location: str | None) -> str | None:
        """Read by Ray workers, which do not run in this process's folder: a relative path becomes absolute here."""
        return None if location is None else absolute(location)


# ---------------------------------------------------------------------------------------------------------------------
# optimisation


def parameter_groups(model: CLIP, weight_decay: float, tower_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: decay on weight matrices; none on norms, biases, embeddings and the
    temperature. Each group's `lr_scale` multiplies the schedule's rate: `tower_lr_scale` for the towers' weights,
    1 for the projections and the temperature."""
    no_decay_names = ("embedding", "class_token", "log_logit_scale")
    head_names = ("visual.projection.", "text.projection.", "log_logit_scale")
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:  # a locked tower
            continue
        decay = not (parameter.ndim < 2 or any(n in name for n in no_decay_names))
        head = tower_lr_scale != 1.0 and name.startswith(head_names)  # one rate: the two groups as before
        groups.setdefault((decay, head), []).append(parameter)
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0,
             "lr_scale": 1.0 if head else tower_lr_scale}
            for (decay, head), params in sorted(groups.items(), key=lambda item: (not item[0][0], item[0][1]))]


def lock_tower(tower: torch.nn.Module, unlocked_layers: int = 0) -> None:
    """Freeze a tower (`model.visual` or `model.text`) except its last `unlocked_layers` blocks and, when any are
    left trainable, everything above them (final norm and projection), as open_clip's lock_image/lock_text do."""
    for parameter in tower.parameters():
        parameter.requires_grad_(False)
    if unlocked_layers == 0:
        return
    for block in list(tower.blocks)[-unlocked_layers:]:
        block.requires_grad_(True)
    for name, module in tower.named_children():
        if name in ("ln_post", "ln_final", "projection"):
            module.requires_grad_(True)


def learning_rate(step: int, total_steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to zero at `total_steps`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def warmup_steps(config: TrainConfig, last_step: int) -> int:
    """The configured warm-up, or a tenth of the run (at most 2,000 steps)."""
    return config.warmup_steps if config.warmup_steps is not None else min(2_000, last_step // 10)


def log_every(config: TrainConfig, last_step: int) -> int:
    """The configured interval, or about 20 records per run (every 1 to 50 steps)."""
    return config.log_every or max(1, min(50, last_step // 20))


def loader_processes(config: TrainConfig, cpus: int, gpu: bool) -> int:
    """Loader processes per worker. On a CPU worker the model needs the cores far more than decoding 64-224 px
    images does (one process keeps the wait share near zero; see README, "CPU threads"); on a GPU worker the CPUs
    exist to feed the device, one is left for the training process itself."""
    if config.loader_workers is not None:
        return config.loader_workers
    return max(1, cpus - 1) if gpu else max(1, cpus // 8)


def contrastive_step(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor, config: TrainConfig,
                     device: torch.device, precision: Precision = "fp32") -> torch.Tensor:
    """Forward and backward of one step's contrastive loss; gradients are left in the parameters. Returns the loss."""
    k = config.accum_steps
    if k == 1:
        with autocast(device, precision):
            image_emb, text_emb, logit_scale = model(images, tokens)
        loss = distributed_clip_loss(image_emb, text_emb, logit_scale, config.loss_chunk_size)
        loss.backward()
        return loss.detach()

    # GradCache: 1) embeddings of every micro-batch without a graph
    image_chunks, token_chunks = images.chunk(k), tokens.chunk(k)
    with torch.no_grad(), autocast(device, precision):
        cached = [model(i, t) for i, t in zip(image_chunks, token_chunks)]
    image_emb = torch.cat([c[0] for c in cached]).float().requires_grad_()
    text_emb = torch.cat([c[1] for c in cached]).float().requires_grad_()
    logit_scale = cached[0][2].detach().float().requires_grad_()
    # 2) the loss of the whole contrastive batch, and its gradients with respect to the embeddings
    loss = distributed_clip_loss(image_emb, text_emb, logit_scale, config.loss_chunk_size)
    loss.backward()
    image_grads, text_grads = image_emb.grad.chunk(k), text_emb.grad.chunk(k)
    # 3) each micro-batch again, with a graph, fed its cached gradients (DDP syncs only on the last one)
    for j, (image_chunk, token_chunk) in enumerate(zip(image_chunks, token_chunks)):
        last = j == k - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(device, precision):
                chunk_image_emb, chunk_text_emb, chunk_scale = model(image_chunk, token_chunk)
            scale_grad = logit_scale.grad if last else torch.zeros_like(logit_scale)
            torch.autograd.backward([chunk_image_emb, chunk_text_emb, chunk_scale],
                                    [image_grads[j].to(chunk_image_emb.dtype), text_grads[j].to(chunk_text_emb.dtype),
                                     scale_grad.to(chunk_scale.dtype)])
    return loss.detach()


# ---------------------------------------------------------------------------------------------------------------------
# the loop


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def total_steps(config: TrainConfig, epoch_steps: int) -> int:
    return config.steps or config.epochs * epoch_steps


def train_loop(config: TrainConfig, tokenizer_path: str | Path, report: Report, resume_from: Path | None = None,
               device: str | torch.device = "cpu", prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
               progress: Progress | None = None, loader_workers: int | None = None) -> dict[str, Any]:
    """Train until `total_steps`; returns the last metrics. `prepare_model` wraps the model (DDP) from outside;
    `progress` receives rank 0's progress events (see `training/progress.py`)."""
    device = torch.device(device)
    precision = resolve_precision(config.precision, device)
    rank, world_size = _distributed()
    progress = progress if rank == 0 else None
    if loader_workers is None:
        loader_workers = loader_processes(config, torch.get_num_threads(), device.type == "cuda")
    if config.batch_size % (world_size * config.accum_steps):
        raise ValueError(f"batch_size {config.batch_size} must divide by num_workers x accum_steps "
                         f"({world_size} x {config.accum_steps})")
    local_batch = config.batch_size // world_size
    manifest = read_manifest(config.data, config.storage)
    epoch_steps = steps_per_epoch(manifest, config.batch_size)
    last_step = total_steps(config, epoch_steps)
    warmup, record_every = warmup_steps(config, last_step), log_every(config, last_step)
    runtime = {"device": device.type, "precision": precision, "hardware": hardware_name(device),
               "world_size": world_size, "loader_workers": loader_workers, "torch_threads": torch.get_num_threads()}
    tokenizer = Tokenizer.load(tokenizer_path)

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    if config.init_from is not None:
        model, _ = load_weights(config.init_from)  # a local copy of the parent checkpoint, see ray_job
    else:
        model = create_model(config.preset)
    model = model.to(device)
    if config.lock_image:
        lock_tower(model.visual, config.lock_image_unlocked_layers)
    if config.lock_text:
        lock_tower(model.text, config.lock_text_unlocked_layers)
    tower_lr_scale = (config.tower_lr or config.lr) / config.lr
    sharded = prepare_from_outside(model, config, device, world_size)
    optimizer = make_optimizer(parameter_groups(model, config.weight_decay, tower_lr_scale), device, lr=config.lr,
                               betas=config.betas, eps=config.eps)
    step, history, keys_log = 0, [], []
    if resume_from is not None:
        if is_sharded(resume_from):
            load_sharded(resume_from, model, optimizer)
        else:
            resumed, _ = load_weights(resume_from)
            model.load_state_dict(resumed.state_dict())
            load_optimizer_state(resume_from, optimizer)
        state = read_state(resume_from)
        step = state["step"]
        torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))
        random.setstate((state["rng"]["python"][0], tuple(state["rng"]["python"][1]), state["rng"]["python"][2]))
        history = _read_jsonl(resume_from / "metrics.jsonl")
        keys_log = _read_jsonl(resume_from / "sample_keys.jsonl") if config.record_sample_keys else []
    clip: CLIP = model
    trained = prepare_model(model) if prepare_model and not sharded else model  # DDP
    image_size = clip.config.image_size

    if progress:
        progress({"event": "start", "step": step, "total": last_step,
                  "runtime": f"{world_size} worker(s), {describe(device, precision)}, {loader_workers} loader "
                             f"process(es) and {torch.get_num_threads()} torch threads per worker"})
    metrics: dict[str, Any] = {}
    window = {"samples": 0, "waiting": 0.0, "loss": torch.zeros((), device=device), "steps": 0, "skipped": 0}
    window_start = time.perf_counter()
    first_epoch, start_step = divmod(step, epoch_steps)
    # one loader (and its processes) for every remaining epoch; uint8 images, pinned for asynchronous copies on CUDA
    loader = make_loader(manifest, tokenizer_path=tokenizer_path, seed=config.seed, epoch=first_epoch, rank=rank,
                         world_size=world_size, local_batch=local_batch, image_size=image_size,
                         loader_workers=loader_workers, start_step=start_step,
                         shuffle_buffer=config.shuffle_buffer, crop_scale=(config.crop_scale_min, 1.0),
                         augment=tuple(config.augment), caption_field=config.caption_field,
                         storage_config=config.storage, num_epochs=math.ceil(last_step / epoch_steps) - first_epoch,
                         pin_memory=device.type == "cuda")
    batches = iter(loader)
    while step < last_step:
        epoch = step // epoch_steps
        tick = time.perf_counter()
        batch = next(batches)
        window["waiting"] += time.perf_counter() - tick
        lr = learning_rate(step, last_step, config.lr, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        clip.visual.patch_dropout = config.patch_dropout if step < last_step - config.patch_dropout_final_steps else 0.0
        optimizer.zero_grad(set_to_none=True)
        images = device_crops(batch["images"].to(device, non_blocking=True),  # uint8 over the bus, cut on the device
                              batch["crops"].to(device, non_blocking=True), image_size, batch.get("style"))
        loss = contrastive_step(trained, images, batch["tokens"].to(device, non_blocking=True), config, device,
                                precision)
        if config.grad_clip is not None:
            clip_grad_norm(clip, config.grad_clip)
        optimizer.step()
        clip.clamp_logit_scale()
        step += 1
        if config.record_sample_keys:
            keys_log.append({"step": step, "epoch": epoch, "rank": rank, "keys": batch["keys"]})
        window["loss"] += loss  # stays on the device: no host sync until the window is logged
        window.update(samples=window["samples"] + config.batch_size, steps=window["steps"] + 1,
                      skipped=window["skipped"] + batch["skipped"])
        if progress:
            progress({"event": "step", "step": step})
        if step % record_every == 0 or step == last_step:
            metrics = _window_metrics(window, window_start, clip, step, epoch, lr, device)
            history.append(metrics)
            if progress:
                progress({"event": "metrics", "step": step, "metrics": metrics})
            window = {"samples": 0, "waiting": 0.0, "loss": torch.zeros((), device=device), "steps": 0, "skipped": 0}
            window_start = time.perf_counter()
        if step % config.checkpoint_every == 0 or step == last_step:
            _checkpoint(config, clip, tokenizer, optimizer, step, epoch_steps, history, keys_log, rank, report,
                        runtime, sharded=sharded, final=step == last_step)
    return metrics


def prepare_from_outside(model: CLIP, config: TrainConfig, device: torch.device, world_size: int) -> bool:
    """Activation checkpointing, compile, FSDP2 (in that order, before the optimizer is built; DDP comes after).
    Returns whether the model is now sharded."""
    if config.activation_checkpointing:
        apply_activation_checkpointing(model)
    if resolve_compile(config.compile, device):
        compile_blocks(model)
    if config.strategy == "fsdp" and world_size > 1:
        shard_model(model)
        return True
    return False


def _window_metrics(window: dict[str, Any], window_start: float, clip: CLIP, step: int, epoch: int, lr: float,
                    device: torch.device) -> dict[str, Any]:
    """The logged record of one window of steps: the one place the loop waits for the device."""
    loss = window["loss"].item() / window["steps"]  # the host sync: every step of the window has finished
    seconds = time.perf_counter() - window_start  # after the sync: the device's time, not the host's
    scale = clip.logit_scale().item()
    metrics = {
        "step": step, "epoch": epoch, "loss": loss, "lr": lr, "logit_scale": scale, "temperature": 1 / scale,
        "samples_per_second": window["samples"] / seconds, "data_wait_share": window["waiting"] / seconds,
        "skipped_samples": window["skipped"],
    }
    if device.type == "cuda":
        metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return metrics


def _checkpoint(config: TrainConfig, model: CLIP, tokenizer: Tokenizer, optimizer: torch.optim.Optimizer,
                step: int, epoch_steps: int, history: list[dict], keys_log: list[dict], rank: int,
                report: Report, runtime: dict[str, Any], sharded: bool = False, final: bool = False) -> None:
    """Every rank reports (Ray Train needs all of them); rank 0 attaches the checkpoint directory. A sharded model
    (FSDP2): every rank attaches a folder with its part (Ray Train merges them), the last one also the whole model."""
    if sharded:
        _sharded_checkpoint(config, model, tokenizer, optimizer, step, epoch_steps, history, rank, report, runtime,
                            final)
        return
    if config.record_sample_keys and dist.is_available() and dist.is_initialized():
        gathered: list[list[dict]] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(gathered, keys_log)
        # every rank logs its own keys; after a resume rank 0 also holds the others' earlier ones: keep each once
        unique = {(e["step"], e["rank"]): e for per_rank in gathered for e in per_rank}
        keys_log = sorted(unique.values(), key=lambda e: (e["step"], e["rank"]))
    metrics = {**(history[-1] if history else {}), "step": step}
    if rank != 0:
        report(metrics, None)
        return
    with tempfile.TemporaryDirectory(prefix="clipforge-ckpt-") as scratch:
        directory = save_checkpoint(Path(scratch) / f"step_{step:08d}", model, tokenizer, optimizer,
                                    _state(config, step, epoch_steps, runtime))
        (directory / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
        if config.record_sample_keys:
            (directory / "sample_keys.jsonl").write_text("".join(json.dumps(k) + "\n" for k in keys_log))
        report(metrics, directory)


def _state(config: TrainConfig, step: int, epoch_steps: int, runtime: dict[str, Any]) -> dict[str, Any]:
    epoch, step_in_epoch = divmod(step, epoch_steps)
    python_state = random.getstate()
    return {
        "step": step, "epoch": epoch, "step_in_epoch": step_in_epoch, "samples_seen": step * config.batch_size,
        "rng": {"torch": torch.get_rng_state().tolist(), "python": [python_state[0], list(python_state[1]),
                                                                      python_state[2]]},
        "config": config.model_dump(mode="json"), "runtime": runtime,
    }


def _sharded_checkpoint(config: TrainConfig, model: CLIP, tokenizer: Tokenizer, optimizer: torch.optim.Optimizer,
                        step: int, epoch_steps: int, history: list[dict], rank: int, report: Report,
                        runtime: dict[str, Any], final: bool) -> None:
    weights = full_state_dict(model) if final else {}  # collective; the single model file of the export
    metrics = {**(history[-1] if history else {}), "step": step}
    with tempfile.TemporaryDirectory(prefix="clipforge-ckpt-") as scratch:
        directory = Path(scratch) / f"step_{step:08d}"
        if rank == 0:
            save_checkpoint(directory, model, tokenizer, None, _state(config, step, epoch_steps, runtime), weights=weights)
            (directory / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))
        save_sharded(directory, model, optimizer)  # collective: each rank writes its own part
        report(metrics, directory)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def default_tokenizer_vocab(config: TrainConfig) -> int:
    return config.tokenizer_vocab_size or MODEL_PRESETS[config.preset].vocab_size


