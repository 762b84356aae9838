"""What the training code applies to the pure model from outside, in this order: activation checkpointing,
`torch.compile`, then FSDP2 sharding (DDP stays with the caller, Ray Train's `prepare_model`); and the sharded
checkpoints that go with FSDP2.

Each transformation keeps the module tree and the parameter names of `training.model.CLIP`, so a checkpoint written
by any combination loads into a plain model. A sharded checkpoint is a `torch.distributed.checkpoint` folder
(`sharded/`) to which every rank writes its own part; `full_state_dict` gathers the whole model (on CPU) for the
single safetensors file exported at the end of a run.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.utils.checkpoint import checkpoint

from training.model import CLIP

SHARDED_DIR = "sharded"


def _blocks(model: CLIP) -> list[torch.nn.Module]:
    return [*model.visual.blocks, *model.text.blocks]


def apply_activation_checkpointing(model: CLIP) -> None:
    """Recompute every transformer block's activations in the backward pass instead of keeping them (memory for
    compute: about one extra forward)."""
    for block in _blocks(model):
        forward = block.forward
        block.forward = lambda x, forward=forward: checkpoint(forward, x, use_reentrant=False)


def compile_blocks(model: CLIP) -> None:
    """`torch.compile` each transformer block in place (names unchanged; one compiled graph reused by every block of
    a tower; composes with FSDP2 and DDP, as in torchtitan)."""
    for block in _blocks(model):
        block.compile(dynamic=False)  # a few static shapes (tokens per tower), no symbolic-shape graphs


def resolve_compile(setting: bool | str, device: torch.device) -> bool:
    """"auto" compiles on CUDA (where it pays) and not on CPU (where compilation time dominates short runs)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def shard_model(model: CLIP) -> CLIP:
    """FSDP2: each block is its own unit (its parameters are gathered just before it runs), the rest is the root.

    The temperature is a scalar, which FSDP2 cannot shard: it stays a plain replicated parameter whose gradient is
    averaged over the ranks by a hook (what FSDP does for the others).
    """
    from torch.distributed.fsdp import fully_shard

    for block in _blocks(model):
        fully_shard(block)
    fully_shard(model, ignored_params={model.log_logit_scale})
    world_size = dist.get_world_size()

    def average(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad / world_size

    model.log_logit_scale.register_hook(average)
    return model


def make_optimizer(groups: list[dict], device: torch.device, **hyper) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step on CUDA (the foreach default elsewhere). Under FSDP2 the sharded
    parameters (DTensors) and the plain ones go in separate groups: one multi-tensor kernel cannot take both."""
    split = []
    for group in groups:
        for is_sharded_group in (True, False):
            params = [p for p in group["params"] if isinstance(p, DTensor) == is_sharded_group]
            if params:
                split.append({**group, "params": params})
    return torch.optim.AdamW(split, fused=device.type == "cuda" or None, **hyper)


def clip_grad_norm(model: CLIP, max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` over all parameters, sharded (DTensor) or not; returns the total norm before clipping."""
    parameters = [p for p in model.parameters() if p.grad is not None]
    if not any(isinstance(p, DTensor) for p in parameters):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    norms = [torch.linalg.vector_norm(p.grad) for p in parameters]
    norms = [n.full_tensor() if isinstance(n, DTensor) else n for n in norms]  # the sharded ones are partial sums
    total = torch.linalg.vector_norm(torch.stack(norms))
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in parameters:
        p.grad.mul_(scale.item() if isinstance(p.grad, DTensor) else scale)
    return total


def save_sharded(directory: Path, model: CLIP, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its own shards of the model and optimizer to `directory/sharded` (rank 0 also the metadata);
    the union of the ranks' folders is the checkpoint."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state},
             storage_writer=dcp.FileSystemWriter(str(directory / SHARDED_DIR)))


def load_sharded(directory: Path, model: CLIP, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint into a sharded model and its optimizer (every rank reads what it owns)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(directory / SHARDED_DIR)))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def is_sharded(directory: Path) -> bool:
    return (Path(directory) / SHARDED_DIR).is_dir()


def full_state_dict(model: CLIP) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU, on rank 0 (a collective: every rank calls it; the others get {})."""
    if not (dist.is_available() and dist.is_initialized()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
