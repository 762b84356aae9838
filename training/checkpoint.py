"""Checkpoints: a directory that holds everything needed to resume a run or use the model, and nothing executable.

    model.safetensors      weights (safetensors: loading never unpickles anything)
    model_config.json      the `ModelConfig` the weights belong to
    tokenizer.json         the tokenizer the model was trained with (byte-bpe or clip-bpe; state.json names it too)
    optimizer.safetensors  AdamW moments, flattened (absent in an export for inference)
    state.json             step, epoch, data position, RNG states, optimizer hyper-parameters, the run's config

`save_checkpoint` writes into a sibling temporary directory and renames it into place, so a checkpoint is either
complete or absent. `open_checkpoint` reads one from a local folder or from object storage (through
`pipeline.storage`), downloading it to a temporary folder first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline import storage
from pipeline.errors import UserError
from pipeline.storage import StorageConfig
from training.model import CLIP, ModelConfig
from training.tokenizer import Tokenizer

MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, MODEL_CONFIG_FILE = (
    "model.safetensors", "optimizer.safetensors", "state.json", "model_config.json")


def _unwrap(model: torch.nn.Module) -> CLIP:
    return getattr(model, "module", model)  # DDP wraps the model in .module


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into flat tensors (for safetensors) and the JSON-able rest."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *rest["scalars"].items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(directory: str | Path, model: torch.nn.Module, tokenizer: Tokenizer,
                    optimizer: torch.optim.Optimizer | None = None, state: dict[str, Any] | None = None,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint to the local `directory` atomically (complete or absent) and return it.

    `weights` replaces the model's own state dict (FSDP2: the gathered one); an empty dict writes no weights file
    (a sharded checkpoint keeps them in `sharded/`, see training.parallel).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    clip = _unwrap(model)
    if weights is None:
        weights = clip.state_dict()
    if weights:
        save_file({name: tensor.detach().contiguous().cpu() for name, tensor in weights.items()}, staging / MODEL_FILE)
    (staging / MODEL_CONFIG_FILE).write_text(clip.config.model_dump_json(indent=2))
    tokenizer.save(staging)
    full_state = {**(state or {}), "tokenizer": tokenizer.kind}
    if optimizer is not None:
        tensors, rest = _optimizer_tensors(optimizer)
        save_file(tensors, staging / OPTIMIZER_FILE)
        full_state["optimizer"] = rest
    (staging / STATE_FILE).write_text(json.dumps(full_state, indent=2, default=str))
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(staging, directory)
    return directory


def read_state(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def load_weights(directory: str | Path, device: str | torch.device = "cpu") -> tuple[CLIP, Tokenizer]:
    """The model and tokenizer of a local checkpoint directory."""
    directory = Path(directory)
    missing = [f for f in (MODEL_FILE, MODEL_CONFIG_FILE, "tokenizer.json") if not (directory / f).exists()]
    if missing:
        raise UserError(f"{directory} is not a clipforge checkpoint (missing {', '.join(missing)})")
    config = ModelConfig.model_validate_json((directory / MODEL_CONFIG_FILE).read_text())
    model = CLIP(config)
    model.load_state_dict(load_file(directory / MODEL_FILE, device="cpu"))
    return model.to(device), Tokenizer.load(directory)


def load_optimizer_state(directory: str | Path, optimizer: torch.optim.Optimizer) -> None:
    directory = Path(directory)
    rest = read_state(directory).get("optimizer")
    if rest is None or not (directory / OPTIMIZER_FILE).exists():
        raise UserError(f"{directory} holds no optimizer state (an export for inference cannot resume training)")
    optimizer.load_state_dict(_optimizer_state(load_file(directory / OPTIMIZER_FILE), rest))


@contextlib.contextmanager
def open_checkpoint(location: str, config: StorageConfig | None = None) -> Iterator[Path]:
    """A local directory holding the checkpoint at `location` (a folder or s3://...), for the duration of the block."""
    if not storage.is_remote(location):
        path = Path(location)
        if not path.is_dir():
            raise UserError(f"checkpoint {location} does not exist")
        yield path
        return
    fs, remote = storage.filesystem(location, config)
    with tempfile.TemporaryDirectory(prefix="clipforge-checkpoint-") as scratch:
        with storage.storage_errors(location, config):
            if not fs.exists(remote):
                raise UserError(f"checkpoint {location} does not exist")
            fs.get(remote.rstrip("/") + "/", scratch, recursive=True)
        yield Path(scratch)


def load_model(location: str, config: StorageConfig | None = None,
               device: str | torch.device = "cpu") -> tuple[CLIP, Tokenizer]:
    """The model (in eval mode) and tokenizer of the checkpoint at `location`, local or on object storage."""
    with open_checkpoint(location, config) as directory:
        model, tokenizer = load_weights(directory, device)
    return model.eval(), tokenizer


def upload_checkpoint(directory: str | Path, location: str, config: StorageConfig | None = None) -> str:
    """Copy a local checkpoint directory to `location` (folder or s3://); the state file goes last."""
    directory = Path(directory)
    if not storage.is_remote(location):
        target = Path(location)
        if target.resolve() != directory.resolve():
            staging = target.parent / f".{target.name}.staging"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(directory, staging)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        return str(target)
    fs, remote = storage.filesystem(location, config)
    with storage.storage_errors(location, config):
        files = sorted(p for p in directory.iterdir() if p.is_file())
        for path in sorted(files, key=lambda p: p.name == STATE_FILE):  # state.json last: present means complete
            fs.put_file(str(path), f"{remote}/{path.name}")
    return location
